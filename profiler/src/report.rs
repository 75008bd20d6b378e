//! The run report: `profiler.run.v1` JSON for machines, a waterfall table for people.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    datapath::HookSet,
    hooks::{HookStatus, ProgramCost, Status},
    journey::Stats,
    path::Hop,
    traffic::Proto,
};

pub const RUN_SCHEMA: &str = "profiler.run.v1";

#[derive(Debug, Serialize)]
pub struct RunReport {
    pub schema: &'static str,
    pub kernel: String,
    pub topology: String,
    pub traffic: TrafficReport,
    pub directions: Vec<DirectionReport>,
    pub events: EventsReport,
    /// The hooks in effect: deep, or stable where no deep hook could attach.
    pub hook_set: HookSet,
    pub hooks: Vec<HookStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub program_costs: Option<Vec<ProgramCost>>,
}

#[derive(Debug, Serialize)]
pub struct TrafficReport {
    pub proto: Proto,
    pub size: usize,
    pub count: u32,
    pub completed: u32,
}

#[derive(Debug, Serialize)]
pub struct DirectionReport {
    pub direction: &'static str,
    pub hops: Vec<Hop>,
    pub segments: Vec<SegmentReport>,
    /// The profiler's own programs' time per packet on this path, left out of the segments.
    pub profiler_programs: Stats,
    pub end_to_end: Stats,
    pub complete_packets: u64,
    pub incomplete_packets: u64,
    /// For incomplete packets: how many missed each hop.
    pub missing_hops: Vec<MissingHop>,
    /// The other hop sequences packets took (the first of an OVS flow, up to ovs-vswitchd),
    /// most common first.
    pub other_paths: Vec<OtherPath>,
}

#[derive(Debug, Serialize)]
pub struct OtherPath {
    pub packets: u64,
    pub hops: Vec<Hop>,
    pub segments: Vec<SegmentReport>,
    pub end_to_end: Stats,
}

#[derive(Debug, Serialize)]
pub struct SegmentReport {
    pub name: String,
    /// Hop indices.
    pub from: usize,
    pub to: usize,
    #[serde(flatten)]
    pub stats: Stats,
}

#[derive(Debug, Serialize)]
pub struct MissingHop {
    pub hop: usize,
    pub packets: u64,
}

#[derive(Debug, Serialize)]
pub struct EventsReport {
    pub received: u64,
    /// Events the kernel could not hand over (ring buffer full).
    pub lost: u64,
    pub incomplete_packets: u64,
    /// TCP segments whose tag no hook could read (counted in the kernel).
    pub unreadable: u64,
    /// Events of later IPv4 fragments of tagged datagrams (the first fragment is the hop).
    pub fragments: u64,
    pub drops: Vec<DropReport>,
}

#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct DropReport {
    pub reason: String,
    pub ifname: String,
    pub packets: u64,
}

fn us(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2}ms", ns / 1e6)
    } else {
        format!("{:.1}us", ns / 1e3)
    }
}

const BAR_WIDTH: f64 = 24.0;

/// The human-readable waterfall: one table per direction, a bar per segment's share of the
/// end-to-end mean, then what was lost, incomplete or unavailable.
pub fn render(r: &RunReport) -> String {
    let mut out = String::new();
    let t = &r.traffic;
    let _ = writeln!(
        out,
        "{} {} B x {} on {} (kernel {}): {} of {} exchanges completed",
        format!("{:?}", t.proto).to_uppercase(),
        t.size,
        t.count,
        r.topology,
        r.kernel,
        t.completed,
        t.count
    );
    for d in &r.directions {
        render_direction(&mut out, d);
    }
    let e = &r.events;
    let _ = writeln!(
        out,
        "\nevents: {} received, {} lost, {} incomplete packets, {} unreadable TCP tags, {} fragment events",
        e.received, e.lost, e.incomplete_packets, e.unreadable, e.fragments
    );
    for d in &e.drops {
        let _ = writeln!(
            out,
            "  dropped: {} packets on {} ({})",
            d.packets, d.ifname, d.reason
        );
    }
    out += &render_hooks(&r.hooks);
    if let Some(costs) = &r.program_costs {
        out += &render_costs(costs);
    }
    out
}

/// Stable hooks that did not attach, each with why; deep hooks counted, with the attached ones
/// named (a kernel without a datapath's module lacks all its functions: `profiler doctor` says
/// why for each).
pub fn render_hooks(hooks: &[HookStatus]) -> String {
    let mut out = String::new();
    for h in hooks
        .iter()
        .filter(|h| h.set == HookSet::Stable && h.status != Status::Attached)
    {
        let _ = writeln!(
            out,
            "hook {} ({}) {:?}: {}",
            h.name,
            h.kind,
            h.status,
            h.reason.as_deref().unwrap_or("")
        );
    }
    let deep: Vec<_> = hooks.iter().filter(|h| h.set == HookSet::Deep).collect();
    if deep.is_empty() {
        return out;
    }
    let attached: Vec<&str> = deep
        .iter()
        .filter(|h| h.status == Status::Attached)
        .map(|h| h.name.as_str())
        .collect();
    let _ = write!(
        out,
        "deep hooks: {} of {} attached",
        attached.len(),
        deep.len()
    );
    if attached.is_empty() {
        let why = deep[0].reason.as_deref().unwrap_or("");
        let _ = writeln!(out, " ({why}; `profiler doctor` lists each)");
    } else {
        let _ = writeln!(
            out,
            " ({}; `profiler doctor` says why not the others)",
            attached.join(", ")
        );
    }
    out
}

/// The programs that ran, with their kernel cost per invocation.
pub fn render_costs(costs: &[ProgramCost]) -> String {
    let mut out = String::from("\nkernel cost per program invocation (bpf_stats):\n");
    for c in costs.iter().filter(|c| c.run_count > 0) {
        let _ = writeln!(
            out,
            "  {:<28} {:>10} runs {:>8.1} ns/run",
            c.program, c.run_count, c.ns_per_run
        );
    }
    out
}

fn render_direction(out: &mut String, d: &DirectionReport) {
    let _ = writeln!(
        out,
        "\n{}: {} complete, {} incomplete packets",
        d.direction, d.complete_packets, d.incomplete_packets
    );
    let _ = writeln!(
        out,
        "  {:>2}  {:<44} {:>8} {:>8} {:>8} {:>8} {:>8}  share",
        "#", "segment", "mean", "p50", "p90", "p99", "max"
    );
    let total = d.end_to_end.mean_ns.max(1.0);
    segment_rows(out, &d.segments, total);
    let p = &d.profiler_programs;
    let share = format!("{:>4.1}%", p.mean_ns / total * 100.0);
    total_row(out, "(the profiler's own programs)", p, &share);
    let e = &d.end_to_end;
    total_row(out, "end to end", e, &format!("({} samples)", e.samples));
    for m in &d.missing_hops {
        let hop = d.hops.get(m.hop).map_or("?", |h| h.name.as_str());
        let _ = writeln!(out, "      missing hop {}: {} packets", hop, m.packets);
    }
    for p in &d.other_paths {
        let _ = writeln!(out, "  another path, taken by {} packets:", p.packets);
        segment_rows(out, &p.segments, p.end_to_end.mean_ns.max(1.0));
        total_row(
            out,
            "end to end",
            &p.end_to_end,
            &format!("({} samples)", p.end_to_end.samples),
        );
    }
}

fn segment_rows(out: &mut String, segments: &[SegmentReport], total: f64) {
    for (i, s) in segments.iter().enumerate() {
        let share = s.stats.mean_ns / total;
        let bar = "#".repeat((share * BAR_WIDTH).round().max(0.0) as usize);
        let _ = writeln!(
            out,
            "  {:>2}  {:<44} {:>8} {:>8} {:>8} {:>8} {:>8}  {:>4.1}% {}",
            i + 1,
            truncate(&s.name, 44),
            us(s.stats.mean_ns),
            us(s.stats.p50_ns as f64),
            us(s.stats.p90_ns as f64),
            us(s.stats.p99_ns as f64),
            us(s.stats.max_ns as f64),
            share * 100.0,
            bar
        );
    }
}

/// A row below the segments: its statistics, then `tail`.
fn total_row(out: &mut String, label: &str, s: &Stats, tail: &str) {
    let _ = writeln!(
        out,
        "      {:<44} {:>8} {:>8} {:>8} {:>8} {:>8}  {tail}",
        label,
        us(s.mean_ns),
        us(s.p50_ns as f64),
        us(s.p90_ns as f64),
        us(s.p99_ns as f64),
        us(s.max_ns as f64),
    );
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "~"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_microseconds_and_milliseconds() {
        assert_eq!(us(1500.0), "1.5us");
        assert_eq!(us(2_500_000.0), "2.50ms");
        assert_eq!(truncate("abcdef", 4), "abc~");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
