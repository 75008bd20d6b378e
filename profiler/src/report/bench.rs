//! `profiler bench paper` as people read it: the table it prints, its line per finished cell,
//! and BENCHMARKS.md (`--markdown`). Both renderings share one layout: a grid per experiment
//! (labs down, sizes or process counts across), the labs and cells not run with why, and the
//! findings with their verdicts, figures and segments.

use std::fmt::Write as _;

use super::schema::{
    BenchCell, BenchReport, CellStatus, Finding, FindingNumber, SegmentDifference, TrafficKind,
};

/// One experiment's figures: a title, column heads, and a row per lab.
pub struct Grid {
    pub title: &'static str,
    pub heads: Vec<String>,
    pub rows: Vec<(String, Vec<String>)>,
}

const EXPERIMENTS: [(TrafficKind, &str); 3] = [
    (
        TrafficKind::Rr,
        "request/response: UDP one-way request latency, p50 / p99 (us)",
    ),
    (TrafficKind::Stream, "stream: TCP throughput (Gbit/s)"),
    (
        TrafficKind::Alltoall,
        "all-to-all, 16 KiB messages: round latency p50 / p99 (ms)",
    ),
];

/// A grid per experiment, labs in the order they ran.
pub fn grids(r: &BenchReport) -> Vec<Grid> {
    EXPERIMENTS
        .iter()
        .map(|&(experiment, title)| {
            let cells: Vec<&BenchCell> = r
                .cells
                .iter()
                .filter(|c| c.experiment == experiment)
                .collect();
            let mut columns: Vec<(usize, Option<u32>)> =
                cells.iter().map(|c| (c.size, c.procs)).collect();
            columns.sort_unstable();
            columns.dedup();
            let mut labs: Vec<&str> = Vec::new();
            for c in &cells {
                if !labs.contains(&c.lab.as_str()) {
                    labs.push(&c.lab);
                }
            }
            let rows = labs
                .iter()
                .map(|&lab| {
                    let values = columns.iter().map(|&(size, procs)| {
                        cells
                            .iter()
                            .find(|c| c.lab == lab && c.size == size && c.procs == procs)
                            .map_or("-".to_string(), |c| value(c))
                    });
                    (lab.to_string(), values.collect())
                })
                .collect();
            Grid {
                title,
                heads: columns.iter().map(|&(s, p)| head(s, p)).collect(),
                rows,
            }
        })
        .collect()
}

fn head(size: usize, procs: Option<u32>) -> String {
    match procs {
        Some(p) => format!("{p} procs"),
        None => format!("{size} B"),
    }
}

/// A cell's figure as its grid shows it.
fn value(c: &BenchCell) -> String {
    let r = &c.result;
    match (c.status, c.experiment) {
        (CellStatus::Skipped, _) => "skipped".into(),
        (CellStatus::Failed, _) => "failed".into(),
        (CellStatus::Ok, TrafficKind::Rr) => pair(r.p50_ns.map(us), r.p99_ns.map(us)),
        (CellStatus::Ok, TrafficKind::Stream) => {
            r.gbit_per_s.map_or("-".into(), |g| format!("{g:.2}"))
        }
        (CellStatus::Ok, TrafficKind::Alltoall) => pair(r.round_p50_ms, r.round_p99_ms),
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

fn pair(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{a:.1} / {b:.1}"),
        _ => "-".into(),
    }
}

/// The line printed when a cell finishes.
pub fn cell_line(c: &BenchCell) -> String {
    let what = match c.experiment {
        TrafficKind::Alltoall => format!("alltoall {} procs", c.procs.unwrap_or(0)),
        e => format!("{} {} B", experiment_name(e), c.size),
    };
    let result = match c.status {
        CellStatus::Ok => value(c),
        _ => format!("{}: {}", value(c), c.reason.as_deref().unwrap_or("")),
    };
    format!(
        "{:<22} {:<22} {result} ({:.1} s){}",
        c.lab,
        what,
        c.elapsed_s,
        lost(c).map_or(String::new(), |n| format!(", {n} EVENTS LOST"))
    )
}

/// Events the kernel could not hand over in the cell's run, if any.
fn lost(c: &BenchCell) -> Option<u64> {
    c.run.as_ref().map(|r| r.events.lost).filter(|&n| n > 0)
}

pub fn experiment_name(e: TrafficKind) -> &'static str {
    match e {
        TrafficKind::Rr => "rr",
        TrafficKind::Stream => "stream",
        TrafficKind::Alltoall => "alltoall",
    }
}

/// The cells not run, grouped by reason ("12 cell(s) alltoall skipped: reason"), and those
/// whose run lost events.
fn not_run(r: &BenchReport) -> Vec<String> {
    let mut groups: Vec<(String, usize)> = Vec::new();
    for c in r.cells.iter().filter(|c| c.status != CellStatus::Ok) {
        let key = format!(
            "{} {}: {}",
            experiment_name(c.experiment),
            format!("{:?}", c.status).to_lowercase(),
            c.reason.as_deref().unwrap_or("")
        );
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => groups.push((key, 1)),
        }
    }
    let groups = groups.into_iter().map(|(k, n)| format!("{n} cell(s) {k}"));
    let losses = r.cells.iter().filter_map(|c| {
        let what = format!("{} {} {} B", c.lab, experiment_name(c.experiment), c.size);
        lost(c).map(|n| format!("{what}: {n} events lost (its segments miss those packets)"))
    });
    groups.chain(losses).collect()
}

pub fn verdict(f: &Finding) -> &'static str {
    match f.holds {
        Some(true) => "holds",
        Some(false) => "does not hold",
        None => "not testable here",
    }
}

fn numbers(n: &[FindingNumber]) -> String {
    n.iter()
        .map(|n| format!("{} {} B {:.2}", n.lab, n.size, n.value))
        .collect::<Vec<_>>()
        .join(", ")
}

fn difference_title(d: &SegmentDifference) -> String {
    format!(
        "{} vs {} ({} {} B): {:+.1} us per message",
        d.lab,
        d.versus,
        experiment_name(d.experiment),
        d.size,
        d.delta_ns / 1e3
    )
}

fn head_line(r: &BenchReport) -> String {
    format!(
        "profiler bench paper{} on kernel {}, {}: {} cells in {:.0} s",
        if r.quick { " --quick" } else { "" },
        r.kernel,
        r.machine,
        r.cells.len(),
        r.elapsed_s
    )
}

/// The table `bench paper` prints.
pub fn table(r: &BenchReport) -> String {
    let mut out = head_line(r) + "\n";
    for g in grids(r).iter().filter(|g| !g.rows.is_empty()) {
        let _ = writeln!(out, "\n{}", g.title);
        let _ = write!(out, "{:<22}", "lab");
        g.heads.iter().for_each(|h| {
            let _ = write!(out, " {h:>16}");
        });
        out.push('\n');
        for (lab, values) in &g.rows {
            let _ = write!(out, "{lab:<22}");
            values.iter().for_each(|v| {
                let _ = write!(out, " {v:>16}");
            });
            out.push('\n');
        }
    }
    if !r.skipped.is_empty() {
        out.push('\n');
    }
    for s in &r.skipped {
        let _ = writeln!(out, "skipped lab {}: {}", s.topology, s.reason);
    }
    for line in not_run(r) {
        let _ = writeln!(out, "{line}");
    }
    out += "\nthe study's findings on this machine:\n";
    for f in &r.findings {
        let _ = writeln!(out, "{}. {}: {}", f.number, verdict(f), f.claim);
        let _ = writeln!(out, "   tested: {}", f.test);
        if let Some(why) = &f.why {
            let _ = writeln!(out, "   {why}");
        }
        if !f.numbers.is_empty() {
            let _ = writeln!(out, "   {}: {}", f.numbers[0].metric, numbers(&f.numbers));
        }
        for d in &f.segments {
            let _ = writeln!(out, "   {}", difference_title(d));
            for c in &d.contributors {
                let _ = writeln!(
                    out,
                    "     {:<48} {:>+8.1} us {:>6.0}%",
                    c.segment,
                    c.delta_ns / 1e3,
                    c.percent
                );
            }
        }
    }
    out
}

/// BENCHMARKS.md: where and how the figures were made, then the same as the table, in
/// Markdown tables.
pub fn markdown(r: &BenchReport) -> String {
    let mut out = String::from("# Benchmarks: the study's experiments on this machine\n\n");
    out += "Written by `profiler bench paper --markdown`; do not edit by hand.\n\n";
    let _ = writeln!(out, "- command: `{}`", r.command);
    let _ = writeln!(out, "- machine: {}", r.machine);
    let _ = writeln!(out, "- kernel: {}", r.kernel);
    let _ = writeln!(
        out,
        "- commit: {}",
        r.commit.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(
        out,
        "- {} cells in {:.0} s ({:.1} min)",
        r.cells.len(),
        r.elapsed_s,
        r.elapsed_s / 60.0
    );
    let _ = writeln!(
        out,
        "- load average {:.2} at the start, {:.2} at the end: the machine is shared, and other \
         work running meanwhile shows in the figures (p99 most)\n",
        r.load_start, r.load_end
    );
    for g in grids(r).iter().filter(|g| !g.rows.is_empty()) {
        let _ = writeln!(out, "## {}\n", g.title);
        let _ = writeln!(out, "| lab | {} |", g.heads.join(" | "));
        let _ = writeln!(out, "|---|{}", "---:|".repeat(g.heads.len()));
        for (lab, values) in &g.rows {
            let _ = writeln!(out, "| {lab} | {} |", values.join(" | "));
        }
        out.push('\n');
    }
    let not_run = not_run(r);
    if !r.skipped.is_empty() || !not_run.is_empty() {
        out += "## Not run\n\n";
        for s in &r.skipped {
            let _ = writeln!(out, "- lab {}: {}", s.topology, s.reason);
        }
        for line in not_run {
            let _ = writeln!(out, "- {line}");
        }
        out.push('\n');
    }
    out += "## The study's findings\n\n| # | verdict | claim | tested here |\n|---|---|---|---|\n";
    for f in &r.findings {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}{} |",
            f.number,
            verdict(f),
            f.claim,
            f.test,
            f.why
                .as_deref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default()
        );
    }
    for f in r.findings.iter().filter(|f| !f.segments.is_empty()) {
        let _ = writeln!(out, "\n### Finding {}: {}\n", f.number, verdict(f));
        let _ = writeln!(out, "{}: {}\n", f.numbers[0].metric, numbers(&f.numbers));
        for d in &f.segments {
            let _ = writeln!(out, "{}:\n", difference_title(d));
            out += "| segment | difference (us) | share |\n|---|---:|---:|\n";
            for c in &d.contributors {
                let _ = writeln!(
                    out,
                    "| {} | {:+.1} | {:.0}% |",
                    c.segment,
                    c.delta_ns / 1e3,
                    c.percent
                );
            }
            out.push('\n');
        }
    }
    out
}
