//! One self-contained HTML page per report (no script, no network): the table the command
//! printed, and for run reports (and each run of a comparison) the waterfall of every direction
//! drawn as an SVG, one bar per segment starting where the previous one ended.

use svg::{
    node::element::{Rectangle, Text, Title},
    Document,
};

use super::{
    schema::{DirectionReport, RunReport},
    Report,
};

const WIDTH: f64 = 960.0;
/// Room for the segment names left of the bars.
const LABELS: f64 = 360.0;
/// Room for the values right of the bars.
const VALUES: f64 = 90.0;
const ROW: f64 = 20.0;

pub fn page(report: &Report) -> String {
    let (title, waterfalls) = match report {
        Report::Run(r) => (run_title(r), run_waterfalls(r)),
        Report::Compare(c) => (
            format!("profiler compare ({:?})", c.placement),
            c.runs.iter().map(run_waterfalls).collect(),
        ),
        Report::Attach(a) => (format!("profiler attach on {}", a.node), String::new()),
        Report::Doctor(d) => (
            format!("profiler doctor: kernel {}", d.kernel),
            String::new(),
        ),
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n<title>{t}</title>\n\
         <style>body{{font-family:sans-serif;margin:2em}}pre{{font-size:12px}}\
         svg text{{font-family:monospace;font-size:12px}}</style>\n</head>\n<body>\n\
         <h1>{t}</h1>\n{waterfalls}<h2>Table</h2>\n<pre>{table}</pre>\n</body>\n</html>\n",
        t = escape(&title),
        table = escape(&report.table()),
    )
}

fn run_title(r: &RunReport) -> String {
    let t = &r.traffic;
    format!(
        "{} {} B x {} on {} (kernel {})",
        format!("{:?}", t.proto).to_uppercase(),
        t.size,
        t.count,
        r.topology,
        r.kernel
    )
}

fn run_waterfalls(r: &RunReport) -> String {
    r.directions
        .iter()
        .map(|d| {
            format!(
                "<h2>{} at {} B: {}</h2>\n{}\n",
                escape(&r.topology),
                r.traffic.size,
                escape(&d.direction),
                waterfall(d)
            )
        })
        .collect()
}

/// The direction's segments as a waterfall: each bar's width is the segment's mean, and it
/// starts where the one before ended; the last row is the end-to-end mean.
pub fn waterfall(d: &DirectionReport) -> Document {
    let total = d.end_to_end.mean_ns.max(1.0);
    let scale = (WIDTH - LABELS - VALUES) / total;
    let rows = d.segments.len() + 1;
    let mut doc = Document::new()
        .set("width", WIDTH)
        .set("height", ROW * (rows as f64 + 1.0))
        .set("viewBox", (0.0, 0.0, WIDTH, ROW * (rows as f64 + 1.0)));
    let mut start = 0.0;
    for (i, s) in d.segments.iter().enumerate() {
        let tip = format!(
            "{}: mean {}, p50 {}, p99 {}",
            s.name,
            us(s.stats.mean_ns),
            us(s.stats.p50_ns as f64),
            us(s.stats.p99_ns as f64)
        );
        doc = doc.add(bar(
            i,
            &s.name,
            start * scale,
            s.stats.mean_ns,
            scale,
            &tip,
            "#4c78a8",
        ));
        start += s.stats.mean_ns;
    }
    let e = &d.end_to_end;
    let tip = format!(
        "end to end: mean {}, p99 {}",
        us(e.mean_ns),
        us(e.p99_ns as f64)
    );
    doc.add(bar(
        d.segments.len(),
        "end to end",
        0.0,
        e.mean_ns,
        scale,
        &tip,
        "#999999",
    ))
}

fn bar(
    row: usize,
    name: &str,
    x: f64,
    mean_ns: f64,
    scale: f64,
    tip: &str,
    fill: &str,
) -> svg::node::element::Group {
    let y = ROW * (row as f64 + 0.5);
    let width = (mean_ns * scale).max(1.0);
    svg::node::element::Group::new()
        .add(Title::new(tip))
        .add(Text::new(name).set("x", 4).set("y", y + ROW * 0.7))
        .add(
            Rectangle::new()
                .set("x", LABELS + x)
                .set("y", y + 3.0)
                .set("width", width)
                .set("height", ROW - 6.0)
                .set("fill", fill),
        )
        .add(
            Text::new(us(mean_ns))
                .set("x", LABELS + x + width + 4.0)
                .set("y", y + ROW * 0.7),
        )
}

fn us(ns: f64) -> String {
    format!("{:.1} us", ns / 1e3)
}

/// Text for HTML: the five characters with a meaning there, escaped.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}
