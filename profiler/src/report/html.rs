//! One self-contained HTML page per report (no script, no network): the table the command
//! printed, and for run reports (and each run of a comparison) the waterfall of every direction
//! drawn as an SVG, one bar per segment starting where the previous one ended. An attach report
//! gets one per path of each node and one per way across two nodes (their segments and the
//! wire, coloured by node). A bench report gets its charts ([`super::charts`]), the all-to-all
//! table and the findings instead.

use svg::{
    node::element::{Rectangle, Text, Title},
    Document,
};

use super::{
    bench::verdict,
    charts::{self, Series, Stack},
    schema::{
        AttachPath, AttachReport, BenchCell, BenchReport, CellStatus, DirectionReport, PathAcross,
        RunReport, TrafficKind,
    },
    Report,
};

const WIDTH: f64 = 960.0;
/// Room for the segment names left of the bars.
const LABELS: f64 = 360.0;
/// Room for the values right of the bars.
const VALUES: f64 = 90.0;
const ROW: f64 = 20.0;

pub fn page(report: &Report) -> String {
    let (title, body) = match report {
        Report::Run(r) => (run_title(r), run_waterfalls(r)),
        Report::Compare(c) => (
            format!("profiler compare ({:?})", c.placement),
            c.runs.iter().map(run_waterfalls).collect(),
        ),
        Report::Bench(b) => (bench_title(b), bench_body(b)),
        Report::Attach(a) => (
            format!("profiler attach on {}", a.node),
            attach_waterfalls(a),
        ),
        Report::Doctor(d) => (
            format!("profiler doctor: kernel {}", d.kernel),
            String::new(),
        ),
    };
    skeleton(&title, &body, &report.table())
}

/// `bench paper --html`: the same page as `profiler report FILE --format html` draws.
pub fn bench_page(b: &BenchReport) -> String {
    skeleton(&bench_title(b), &bench_body(b), &super::bench::table(b))
}

/// The page every report shares: its title, what is drawn of it, and its table.
fn skeleton(title: &str, body: &str, table: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n<title>{t}</title>\n\
         <style>body{{font-family:sans-serif;margin:2em}}pre{{font-size:12px}}\
         svg text{{font-family:monospace;font-size:12px}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px}}\
         .key{{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px}}</style>\n\
         </head>\n<body>\n<h1>{t}</h1>\n{body}<h2>Table</h2>\n<pre>{table}</pre>\n</body>\n</html>\n",
        t = escape(title),
        table = escape(table),
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

/// A bar of a waterfall: its name, its length, what hovering it says, its colour.
struct Bar {
    name: String,
    ns: f64,
    tip: String,
    fill: &'static str,
}

const SEGMENT: &str = "#4c78a8";
const WHOLE: &str = "#999999";
/// The wire between two nodes, and the other nodes' segments of a way across.
const WIRE: &str = "#e45756";
const OTHER_NODE: &str = "#f58518";

/// The direction's segments as a waterfall: each bar's width is the segment's mean, and it
/// starts where the one before ended; the last row is the end-to-end mean.
pub fn waterfall(d: &DirectionReport) -> Document {
    let bars = d.segments.iter().map(|s| Bar {
        name: s.name.clone(),
        ns: s.stats.mean_ns,
        tip: format!(
            "{}: mean {}, p50 {}, p99 {}",
            s.name,
            us(s.stats.mean_ns),
            us(s.stats.p50_ns as f64),
            us(s.stats.p99_ns as f64)
        ),
        fill: SEGMENT,
    });
    let e = &d.end_to_end;
    let whole = Bar {
        name: "end to end".into(),
        ns: e.mean_ns,
        tip: format!(
            "end to end: mean {}, p99 {}",
            us(e.mean_ns),
            us(e.p99_ns as f64)
        ),
        fill: WHOLE,
    };
    draw(bars.collect(), whole)
}

/// Each node's paths, then each way across two nodes.
fn attach_waterfalls(a: &AttachReport) -> String {
    let mut out = String::new();
    for node in std::iter::once(a).chain(&a.peers) {
        for p in &node.paths {
            let (Some(first), Some(last)) = (p.hops.first(), p.hops.last()) else {
                continue;
            };
            out += &format!(
                "<h2>{}: path taken by {} packets, {} -&gt; {}</h2>\n{}\n",
                escape(&node.node),
                p.packets,
                escape(first),
                escape(last),
                path_waterfall(p)
            );
        }
    }
    for d in a.links.iter().flat_map(|l| &l.directions) {
        let ways = (d
            .paths
            .iter()
            .map(|p| (p, "each node's busiest path to and from the wire")))
        .chain((d.packet_paths.iter()).map(|p| (p, "packet by packet, each its own journeys")));
        for (p, how) in ways {
            out += &format!(
                "<h2>way across {} -&gt; {} ({how})</h2>\n{}\n",
                escape(&d.from_node),
                escape(&d.to_node),
                way_across(p, &a.node)
            );
        }
    }
    out
}

/// A node's path: each segment's p50 (its packets include those that went on further, so
/// the p50s are summed, not the means of one population).
fn path_waterfall(p: &AttachPath) -> Document {
    let bars = p.segments.iter().map(|s| Bar {
        name: s.name.clone(),
        ns: s.p50_ns,
        tip: format!(
            "{}: {} packets, p50 {}, p90 {}, p99 {}",
            s.name,
            s.count,
            us(s.p50_ns),
            us(s.p90_ns),
            us(s.p99_ns)
        ),
        fill: SEGMENT,
    });
    let sum = p.segments.iter().map(|s| s.p50_ns).sum::<f64>();
    draw(bars.collect(), sum_of_p50s(sum))
}

/// A way across nodes: `me`'s segments in one colour, the other node's in another, the wire
/// in a third with its clock bound in the tip.
fn way_across(p: &PathAcross, me: &str) -> Document {
    let bars = p.segments.iter().map(|s| {
        let wire = s.from_node != s.to_node;
        let bound = match wire {
            true => format!(", within +-{}", us(s.bound_ns as f64)),
            false => String::new(),
        };
        Bar {
            name: match wire {
                true => format!("{} -> {}: {}", s.from_node, s.to_node, s.name),
                false => format!("{}: {}", s.from_node, s.name),
            },
            ns: s.p50_ns,
            tip: format!(
                "{}: {} packets, p50 {}, p90 {}, p99 {}{bound}",
                s.name,
                s.packets,
                us(s.p50_ns),
                us(s.p90_ns),
                us(s.p99_ns)
            ),
            fill: match (wire, s.from_node == me) {
                (true, _) => WIRE,
                (false, true) => SEGMENT,
                (false, false) => OTHER_NODE,
            },
        }
    });
    let sum = p.segments.iter().map(|s| s.p50_ns).sum::<f64>();
    draw(bars.collect(), sum_of_p50s(sum))
}

fn sum_of_p50s(ns: f64) -> Bar {
    Bar {
        name: "sum of the p50s".into(),
        ns,
        tip: format!("sum of the p50s: {}", us(ns)),
        fill: WHOLE,
    }
}

/// The bars in turn, each starting where the one before ended, and `whole` from the start
/// under them, scaled so the longer of the sum and the whole fits.
fn draw(bars: Vec<Bar>, whole: Bar) -> Document {
    let summed: f64 = bars.iter().map(|b| b.ns).sum();
    let scale = (WIDTH - LABELS - VALUES) / summed.max(whole.ns).max(1.0);
    let rows = bars.len() + 1;
    let height = ROW * (rows as f64 + 1.0);
    let mut doc = Document::new()
        .set("width", WIDTH)
        .set("height", height)
        .set("viewBox", (0.0, 0.0, WIDTH, height));
    let mut start = 0.0;
    for (i, b) in bars.iter().enumerate() {
        doc = doc.add(bar(i, b, start * scale, scale));
        start += b.ns;
    }
    doc.add(bar(bars.len(), &whole, 0.0, scale))
}

fn bar(row: usize, b: &Bar, x: f64, scale: f64) -> svg::node::element::Group {
    let y = ROW * (row as f64 + 0.5);
    let width = (b.ns * scale).max(1.0);
    svg::node::element::Group::new()
        .add(Title::new(b.tip.as_str()))
        .add(
            Text::new(b.name.as_str())
                .set("x", 4)
                .set("y", y + ROW * 0.7),
        )
        .add(
            Rectangle::new()
                .set("x", LABELS + x)
                .set("y", y + 3.0)
                .set("width", width)
                .set("height", ROW - 6.0)
                .set("fill", b.fill),
        )
        .add(
            Text::new(us(b.ns))
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

fn bench_title(b: &BenchReport) -> String {
    format!(
        "profiler bench paper{} (kernel {}, {})",
        if b.quick { " --quick" } else { "" },
        b.kernel,
        b.machine
    )
}

/// The charts against message size, each size's segments per lab, the all-to-all table and
/// the findings.
fn bench_body(b: &BenchReport) -> String {
    let ok = |e: TrafficKind| {
        b.cells
            .iter()
            .filter(move |c| c.experiment == e && c.status == CellStatus::Ok)
    };
    let rr = series(ok(TrafficKind::Rr), |c| {
        c.result.p50_ns.map(|n| n as f64 / 1e3)
    });
    let stream = series(ok(TrafficKind::Stream), |c| c.result.gbit_per_s);
    let mut out = String::from("<h2>Against message size</h2>\n");
    out += &charts::lines("UDP request latency, p50", "one-way latency (us)", &rr);
    out += &charts::lines("TCP stream throughput", "Gbit/s", &stream);
    out += &stacks(b);
    out += &alltoall_table(b);
    out += "<h2>The study's findings on this machine</h2>\n<ol>\n";
    for f in &b.findings {
        let colour = match f.holds {
            Some(true) => "#2e7d32",
            Some(false) => "#c62828",
            None => "#757575",
        };
        out += &format!(
            "<li><b style=\"color:{colour}\">{}</b>: {}<br/><small>tested: {}{}</small></li>\n",
            verdict(f),
            escape(&f.claim),
            escape(&f.test),
            f.why
                .as_deref()
                .map(|w| format!("<br/>{}", escape(w)))
                .unwrap_or_default()
        );
    }
    out + "</ol>\n"
}

/// One line per lab through its cells' values, in size order.
fn series<'a>(
    cells: impl Iterator<Item = &'a BenchCell>,
    value: impl Fn(&BenchCell) -> Option<f64>,
) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for c in cells {
        let Some(v) = value(c) else { continue };
        let point = (c.size as f64, v);
        match out.iter_mut().find(|s| s.name == c.lab) {
            Some(s) => s.points.push(point),
            None => out.push(Series {
                name: c.lab.clone(),
                points: vec![point],
            }),
        }
    }
    out
}

/// Per rr size: each lab's request segments as one stacked bar, a segment name coloured alike
/// in every chart, and the key below.
fn stacks(b: &BenchReport) -> String {
    let rr: Vec<&BenchCell> = b
        .cells
        .iter()
        .filter(|c| c.experiment == TrafficKind::Rr)
        .collect();
    let request = |c: &BenchCell| -> Vec<(String, f64)> {
        let run = c.run.as_ref();
        let request = run.and_then(|r| r.direction("request"));
        request.map_or(Vec::new(), |d| {
            let means = d
                .segments
                .iter()
                .map(|s| (s.name.clone(), s.stats.mean_ns / 1e3));
            means.collect()
        })
    };
    let mut names: Vec<String> = Vec::new();
    for c in &rr {
        for (name, _) in request(c) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    let colour_of = |n: &str| charts::colour(names.iter().position(|x| x == n).unwrap_or(0));
    let mut sizes: Vec<usize> = rr.iter().map(|c| c.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut out = String::from("<h2>Where the time goes (request direction)</h2>\n");
    for size in sizes {
        let bars: Vec<Stack> = rr
            .iter()
            .filter(|c| c.size == size)
            .map(|c| Stack {
                lab: c.lab.clone(),
                segments: request(c),
            })
            .filter(|s| !s.segments.is_empty())
            .collect();
        out += &charts::stacked(&format!("segments at {size} B"), &bars, &colour_of);
    }
    out += "<p>";
    for n in &names {
        out += &format!(
            "<span class=\"key\" style=\"background:{}\"></span>{}",
            charts::hex(colour_of(n)),
            escape(n)
        );
    }
    out + "</p>\n"
}

/// Round latency per type, a row per placement and process count, as the study's Table 3.
fn alltoall_table(b: &BenchReport) -> String {
    let cells: Vec<&BenchCell> = b
        .cells
        .iter()
        .filter(|c| c.experiment == TrafficKind::Alltoall)
        .collect();
    let mut types: Vec<&str> = Vec::new();
    for c in &cells {
        if !types.contains(&c.topology.as_str()) {
            types.push(&c.topology);
        }
    }
    let mut rows: Vec<(crate::lab::Placement, Option<u32>)> =
        cells.iter().map(|c| (c.placement, c.procs)).collect();
    rows.sort_by_key(|&(p, procs)| (p == crate::lab::Placement::CrossHost, procs));
    rows.dedup();
    let mut out = String::from(
        "<h2>All-to-all round latency, ms (p50 / p99), as the study's Table 3</h2>\n<table>\n<tr><th>case</th>",
    );
    for t in &types {
        out += &format!("<th>{}</th>", escape(t));
    }
    out += "</tr>\n";
    for (placement, procs) in rows {
        out += &format!(
            "<tr><td>{placement:?}, {} procs per pod</td>",
            procs.unwrap_or(0)
        );
        for t in &types {
            let cell = cells
                .iter()
                .find(|c| c.topology == *t && c.placement == placement && c.procs == procs);
            let text = match cell {
                Some(c) if c.status == CellStatus::Ok => format!(
                    "{:.2} / {:.2}",
                    c.result.round_p50_ms.unwrap_or(f64::NAN),
                    c.result.round_p99_ms.unwrap_or(f64::NAN)
                ),
                Some(c) => format!("{:?}", c.status).to_lowercase(),
                None => "-".into(),
            };
            out += &format!("<td>{}</td>", escape(&text));
        }
        out += "</tr>\n";
    }
    out + "</table>\n"
}
