//! The tables people read: each report exactly as the command that made it printed it.

use std::fmt::Write as _;

use super::schema::{
    AlltoallResult, AttachDrop, AttachPath, AttachReport, ClockBounds, CompareReport,
    CrossingReport, DirectionReport, DoctorReport, HookSet, HookStatus, Hop, NodeLink, PathAcross,
    ProgramCost, RunReport, SegmentAcross, SegmentReport, SegmentSummary, Stats, Status,
    StreamResult, WireCrossing, WireSummary,
};
use crate::lab::names::HOST_NODE;

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
pub fn run(r: &RunReport) -> String {
    let mut out = String::new();
    let t = &r.traffic;
    let proto = format!("{:?}", t.proto).to_uppercase();
    match (&r.stream, &r.alltoall) {
        (Some(s), _) => render_stream(&mut out, s, &r.topology, &r.kernel),
        (_, Some(a)) => render_alltoall(&mut out, a, &r.topology, &r.kernel),
        _ => {
            let _ = writeln!(
                out,
                "{proto} {} B x {} on {} (kernel {}): {} of {} exchanges completed",
                t.size, t.count, r.topology, r.kernel, t.completed, t.count
            );
        }
    }
    if let Some(svc) = &r.service {
        let _ = writeln!(out, "through {svc}");
    }
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
    for c in &r.crossings {
        out += &render_crossing(c);
    }
    out += &render_hooks(&r.hooks);
    if let Some(costs) = &r.program_costs {
        out += &render_costs(costs);
    }
    out
}

/// How a guest's clock was related to the host's, under the tables' "~" segments.
fn render_crossing(c: &CrossingReport) -> String {
    let (p10, p90) = c.offset_p10_p90_ns;
    let mut out = format!(
        "crossings host <-> {} (~ estimated): clock offset {} (p10 {}, p90 {}), drift {:.1} ppm, \
         both crossings together {} mean, {} p50, over {} exchanges; split: {}\n",
        c.node,
        signed_us(c.offset_ns),
        signed_us(p10),
        signed_us(p90),
        c.drift_ppm,
        us(c.crossing_sum.mean_ns),
        us(c.crossing_sum.p50_ns as f64),
        c.exchanges,
        c.method
    );
    if let Some(b) = &c.bounds {
        out += &format!(
            "  bounds from every exchange, no direction assumed as fast as the other: {}\n",
            clock_bounds(b, "exchanges")
        );
    }
    out
}

/// "clock offset A..B (W wide) at the middle, drift C..D ppm, from N s of WHAT".
fn clock_bounds(b: &ClockBounds, what: &str) -> String {
    format!(
        "clock offset {}..{} ({} wide) at the middle, drift {:.1}..{:.1} ppm{}",
        signed_us(b.offset_ns.0),
        signed_us(b.offset_ns.1),
        us((b.offset_ns.1 - b.offset_ns.0) as f64),
        b.drift_ppm.0,
        b.drift_ppm.1,
        b.over_ns
            .map(|o| format!(", from {:.1} s of {what}", o as f64 / 1e9))
            .unwrap_or_default()
    )
}

/// A clock offset: seconds when it is (guests boot later than their host), else as `us`.
fn signed_us(ns: i64) -> String {
    let sign = if ns < 0 { "-" } else { "" };
    let abs = ns.unsigned_abs() as f64;
    if abs >= 1e9 {
        format!("{sign}{:.6}s", abs / 1e9)
    } else {
        format!("{sign}{}", us(abs))
    }
}

fn render_stream(out: &mut String, s: &StreamResult, topology: &str, kernel: &str) {
    let proto = format!("{:?}", s.proto).to_uppercase();
    let lost = s.lost_messages.map_or(String::new(), |l| {
        let sent = (s.messages + l).max(1);
        format!(", {l} lost ({:.2}%)", l as f64 * 100.0 / sent as f64)
    });
    let _ = writeln!(
        out,
        "{proto} stream of {} B messages for {:.1} s on {topology} (kernel {kernel}): {:.2} Gbit/s ({:.2} sent), {:.0} messages/s{lost}",
        s.size, s.duration_s, s.gbit_per_s, s.sent_gbit_per_s, s.messages_per_s
    );
    if let (Some(g), Some(sent)) = (s.unprofiled_gbit_per_s, s.unprofiled_sent_gbit_per_s) {
        let _ = writeln!(
            out,
            "without the profiler's programs: {g:.2} Gbit/s ({sent:.2} sent), the same stream untagged just before"
        );
    }
    let _ = writeln!(
        out,
        "tagged: 1 message in {}, {} arrived",
        s.tag_every, s.tagged
    );
}

fn render_alltoall(out: &mut String, a: &AlltoallResult, topology: &str, kernel: &str) {
    let _ = writeln!(
        out,
        "all-to-all of {} B messages, {} pods x {} processes on {topology} (kernel {kernel}): {} of {} rounds, round p50 {:.3} ms, p99 {:.3} ms",
        a.size, a.pods, a.procs, a.completed_rounds, a.rounds, a.round_p50_ms, a.round_p99_ms
    );
    let _ = writeln!(out, "tagged: every message of 1 round in {}", a.tag_every);
    for k in &a.path_kinds {
        let _ = writeln!(
            out,
            "  {:<10} {:>3} pod pairs, {} tagged messages, {} attributed, {} pairs with none attributed",
            k.kind, k.pod_pairs, k.tagged, k.attributed, k.unattributed_pairs
        );
    }
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
        let _ = write!(
            out,
            "  {:<28} {:>10} runs {:>8.1} ns/run",
            c.program, c.run_count, c.ns_per_run
        );
        let _ = match c.verified_insns {
            Some(n) => writeln!(out, " {n:>9} insns verified"),
            None => writeln!(out),
        };
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
    segment_rows(out, &d.segments, &d.hops, total);
    let p = &d.profiler_programs;
    let share = format!("{:>4.1}%", p.mean_ns / total * 100.0);
    total_row(out, "(the profiler's own programs)", p, &share);
    let e = &d.end_to_end;
    total_row(out, "end to end", e, &format!("({} samples)", e.samples));
    for m in &d.missing_hops {
        let hop = d.hops.get(m.hop).map_or("?", |h| h.name.as_str());
        let _ = writeln!(out, "      missing hop {}: {} packets", hop, m.packets);
    }
    let names = |hops: &[Hop]| hops.iter().map(|h| h.name.clone()).collect::<Vec<_>>();
    let main = names(&d.hops);
    for p in &d.other_paths {
        let other = names(&p.hops);
        // Such packets are complete on the main path too: say so, or they look counted twice.
        let note = if passes_in_order(&main, &other) {
            format!(
                " (every hop of the path above and {} more: also counted complete above)",
                other.len() - main.len()
            )
        } else {
            String::new()
        };
        let _ = writeln!(out, "  another path, taken by {} packets{note}:", p.packets);
        segment_rows(out, &p.segments, &p.hops, p.end_to_end.mean_ns.max(1.0));
        total_row(
            out,
            "end to end",
            &p.end_to_end,
            &format!("({} samples)", p.end_to_end.samples),
        );
    }
}

/// Whether `other` meets every hop of `main` in `main`'s order, with hops of its own between.
fn passes_in_order(main: &[String], other: &[String]) -> bool {
    let mut rest = other.iter();
    main.iter().all(|hop| rest.any(|o| o == hop))
}

/// On a nested path (hops in more than one kernel), the kernel each segment is measured in
/// ("vm1", or "host>vm1" where it crosses), to go before its name.
fn segment_node(s: &SegmentReport, hops: &[Hop]) -> Option<String> {
    if hops.iter().all(|h| h.node == HOST_NODE) {
        return None;
    }
    let node = |i: usize| hops.get(i).map_or("?", |h| h.node.as_str());
    let (a, b) = (node(s.from), node(s.to));
    Some(if a == b {
        format!("[{a}] ")
    } else {
        format!("[{a}>{b}] ")
    })
}

fn segment_rows(out: &mut String, segments: &[SegmentReport], hops: &[Hop], total: f64) {
    for (i, s) in segments.iter().enumerate() {
        let share = s.stats.mean_ns / total;
        let bar = "#".repeat((share * BAR_WIDTH).round().max(0.0) as usize);
        // "~": estimated from two clocks, not measured on one.
        let mark = if s.estimated { '~' } else { ' ' };
        let name = segment_node(s, hops).unwrap_or_default() + &s.name;
        let _ = writeln!(
            out,
            "  {:>2}{mark} {:<44} {:>8} {:>8} {:>8} {:>8} {:>8}  {:>4.1}% {}",
            i + 1,
            truncate(&name, 44),
            us(s.stats.mean_ns),
            us(s.stats.p50_ns as f64),
            us(s.stats.p90_ns as f64),
            us(s.stats.p99_ns as f64),
            us(s.stats.max_ns as f64),
            share * 100.0,
            bar
        );
    }
    // Which segments no kernel hook can split; one alone is named in full (the column
    // truncates).
    let userspace: Vec<(usize, &SegmentReport)> = segments
        .iter()
        .enumerate()
        .filter(|(_, s)| s.userspace)
        .map(|(i, s)| (i + 1, s))
        .collect();
    let which = match userspace.as_slice() {
        [] => return,
        [(i, s)] => format!("segment {i} ({})", s.name),
        many => {
            let numbers: Vec<String> = many.iter().map(|(i, _)| i.to_string()).collect();
            format!("segments {}", numbers.join(", "))
        }
    };
    let _ = writeln!(
        out,
        "      userspace: {which}; no kernel hook inside, user probes (--uprobe) split it"
    );
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

/// `profiler attach`'s summary: every segment with its packet count and percentiles; the
/// header lists every target with `all_targets`, else counts them beyond a few.
pub fn attach(r: &AttachReport, all_targets: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "attach on {} ({}) for {:.1} s, filter {:?}, 1 packet in {} followed, {} mode",
        r.node,
        targets(&r.targets, all_targets),
        r.duration_s,
        r.filter,
        r.sample,
        r.mode
    );
    services(&mut out, &r.services);
    if let Some(c) = &r.command {
        let how = match (c.exit_code, c.signal) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!("was ended by signal {sig}"),
            (None, None) => "ended".to_string(),
        };
        let _ = writeln!(out, "command: {} {how}", c.argv.join(" "));
    }
    if r.paths.is_empty() {
        // Reports written before paths were kept: every segment, the most crossed first.
        segment_list(&mut out, &r.segments);
    }
    for p in &r.paths {
        path_waterfall(&mut out, p);
    }
    if r.rare_paths.paths > 0 {
        let _ = writeln!(
            out,
            "{} other paths, taken by {} packets in all",
            r.rare_paths.paths, r.rare_paths.packets
        );
    }
    let j = &r.journeys;
    let _ = writeln!(
        out,
        "journeys: {} started, {} consumed, {} dropped, {} ended unseen, {} unfinished, {} kept across a reallocated buffer; {} events lost",
        j.started, j.consumed, j.dropped, j.ended_unseen, j.unfinished, j.reheaded, r.lost_events
    );
    if j.multicast_not_followed > 0 {
        let _ = writeln!(
            out,
            "  not followed: {} copies of multicast or broadcast frames (flooded to every port)",
            j.multicast_not_followed
        );
    }
    let mut hinted = Vec::new();
    for d in &r.drops {
        let what = match d.protocol.as_str() {
            "" => String::new(),
            p => format!(" {p}"),
        };
        let _ = writeln!(
            out,
            "  dropped: {}{what} packets after {} ({})",
            d.packets, d.after, d.reason
        );
        // A hint is said once, under the first (largest) drops it explains.
        if let Some(hint) = d.hint.as_ref().filter(|h| !hinted.contains(h)) {
            let _ = writeln!(out, "    ({hint})");
            hinted.push(hint);
        }
    }
    if let Some(w) = &r.wire {
        wire(&mut out, w);
    }
    out += &render_hooks(&r.hooks);
    if let Some(costs) = &r.program_costs {
        out += &render_costs(costs);
    }
    for peer in &r.peers {
        out += "\n";
        out += &attach(peer, all_targets);
    }
    for l in &r.links {
        link(&mut out, l);
    }
    out
}

/// `attach --lab`: the wire between two nodes, both ways, on the first node's clock.
fn link(out: &mut String, l: &NodeLink) {
    let clock = match (&l.clock, &l.unfit) {
        (Some(b), _) => clock_bounds(b, "pairs"),
        (None, Some(why)) => format!("clocks not related: {why}"),
        (None, None) => "clocks not related".to_string(),
    };
    let _ = writeln!(out, "\nwire {} <-> {}: {clock}", l.a, l.b);
    for d in &l.directions {
        let _ = writeln!(
            out,
            "  {} -> {}: {} ambiguous, {} left and never entered, {} entered and never left{}",
            d.from_node,
            d.to_node,
            d.ambiguous,
            d.unmatched_leaving,
            d.unmatched_entering,
            if d.untimed > 0 {
                format!(", {} paired where no clock fit covers them", d.untimed)
            } else {
                String::new()
            }
        );
        for c in &d.crossings {
            let _ = writeln!(out, "    {}", crossing(c));
        }
        for p in &d.paths {
            path_across(
                out,
                p,
                "way across (each node's busiest path to and from the wire)",
            );
        }
        for p in &d.packet_paths {
            let packets = p.segments.first().map_or(0, |s| s.packets);
            let title =
                format!("packets across ({packets} took these hops, each its own journeys)");
            path_across(out, p, &title);
        }
        if d.unjoined > 0 {
            let _ = writeln!(
                out,
                "    {} paired packets not joined packet by packet (a journey not kept)",
                d.unjoined
            );
        }
    }
    if let Some(s) = &l.streamed {
        let _ = writeln!(
            out,
            "  {} sent {} sightings while following ({:.0}/s, {:.1} kB/s), {} before the stop",
            l.b,
            s.lines,
            s.lines as f64 / s.seconds.max(1e-9),
            s.bytes as f64 / 1e3 / s.seconds.max(1e-9),
            s.lines_before_stop
        );
    }
}

/// A way across two nodes as one waterfall under `title`, each segment with its node (both
/// on the wire) and its share of the summed p50s (no mean sums: in a busiest-path way the
/// parts are medians of different packets).
fn path_across(out: &mut String, p: &PathAcross, title: &str) {
    let (Some(first), Some(last)) = (p.segments.first(), p.segments.last()) else {
        return;
    };
    let _ = writeln!(
        out,
        "    {title}, {}: {} -> {}: {}:",
        first.from_node, first.from, last.to_node, last.to
    );
    let node = |s: &SegmentAcross| match s.from_node == s.to_node {
        true => s.from_node.clone(),
        false => format!("{} -> {}", s.from_node, s.to_node),
    };
    let widest = |f: &dyn Fn(&SegmentAcross) -> usize| p.segments.iter().map(f).max().unwrap_or(0);
    let wn = widest(&|s| node(s).chars().count());
    let w = widest(&|s| s.name.chars().count()).max("sum of the p50s".len().saturating_sub(wn + 2));
    let total: f64 = p.segments.iter().map(|s| s.p50_ns).sum::<f64>().max(1.0);
    let _ = writeln!(
        out,
        "      {:>2}  {:<wn$}  {:<w$} {:>8} {:>8} {:>8} {:>8} {:>8}  share",
        "#", "node", "segment", "packets", "p50", "p90", "p99", "bound"
    );
    for (i, s) in p.segments.iter().enumerate() {
        let share = s.p50_ns / total;
        let bound = match s.bound_ns {
            0 => String::new(),
            b => format!("+-{}", us(b as f64)),
        };
        let _ = writeln!(
            out,
            "      {:>2}  {:<wn$}  {:<w$} {:>8} {:>8} {:>8} {:>8} {:>8}  {:>4.1}% {}",
            i + 1,
            node(s),
            s.name,
            s.packets,
            us(s.p50_ns),
            us(s.p90_ns),
            us(s.p99_ns),
            bound,
            share * 100.0,
            "#".repeat((share * BAR_WIDTH).round() as usize)
        );
    }
    let _ = writeln!(
        out,
        "          {:<width$} {:>8} {:>8}",
        "sum of the p50s",
        "",
        us(total),
        width = wn + 2 + w
    );
}

/// "FROM -> TO: N packets paired by what they carry, p50 .. max ..[, each within +-B]".
fn crossing(c: &WireCrossing) -> String {
    let bound = if c.bound_ns > 0 {
        format!(", each within +-{}", us(c.bound_ns as f64))
    } else {
        String::new()
    };
    format!(
        "{} -> {}: {} packets paired by what they carry, p50 {} p90 {} p99 {} max {}{bound}",
        c.from,
        c.to,
        c.packets,
        us(c.p50_ns as f64),
        us(c.p90_ns as f64),
        us(c.p99_ns as f64),
        us(c.max_ns as f64)
    )
}

/// `attach --wire`: what crossed the wire-facing devices, and the crossings paired on this node.
fn wire(out: &mut String, w: &WireSummary) {
    let _ = writeln!(
        out,
        "wire ({}): {} packets seen leaving, {} entering; {} with an identity another packet \
         had (not paired), {} not kept past the memory bound",
        w.devices.join(", "),
        w.leaving,
        w.entering,
        w.ambiguous,
        w.not_kept
    );
    if w.not_sent > 0 {
        let _ = writeln!(
            out,
            "  {} sightings not sent to, or not kept by, the node joining them (past its bounds)",
            w.not_sent
        );
    }
    for c in &w.crossings {
        let _ = writeln!(out, "  {}", crossing(c));
    }
}

/// Places shown by the drops view at most; the JSON report has them all.
const SHOWN_DROPS: usize = 20;

/// `attach --drops`: the journeys that ended in a drop, by the kernel's reason, then where
/// (the last hop that saw them, with its pod or namespace) and what they were, the most first,
/// and what the known harmless kinds are.
pub fn drops(r: &AttachReport, all_targets: bool) -> String {
    let mut out = String::new();
    let dropped: u64 = r.drops.iter().map(|d| d.packets).sum();
    let _ = writeln!(
        out,
        "drops on {} ({}) in {:.1} s: {dropped} of {} journeys ended in a drop",
        r.node,
        targets(&r.targets, all_targets),
        r.duration_s,
        r.journeys.started
    );
    if r.drops.is_empty() {
        return out;
    }
    let mut reasons: Vec<(&str, u64, usize)> = Vec::new();
    for d in &r.drops {
        match reasons.iter_mut().find(|(reason, ..)| *reason == d.reason) {
            Some((_, packets, places)) => {
                *packets += d.packets;
                *places += 1;
            }
            None => reasons.push((&d.reason, d.packets, 1)),
        }
    }
    reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let _ = writeln!(out, "by reason:");
    for (reason, packets, places) in &reasons {
        let where_ = if *places == 1 { "place" } else { "places" };
        let _ = writeln!(out, "{packets:>10}  {reason} ({places} {where_})");
    }
    let width = |f: fn(&AttachDrop) -> &str, title: &str| {
        r.drops
            .iter()
            .map(|d| f(d).len())
            .fold(title.len(), usize::max)
    };
    let (rw, pw) = (
        width(|d| &d.reason, "reason"),
        width(|d| &d.protocol, "protocol"),
    );
    let _ = writeln!(out, "where:");
    let _ = writeln!(
        out,
        "{:>10}  {:rw$}  {:pw$}  after hop (pod or namespace)",
        "packets", "reason", "protocol"
    );
    for d in r.drops.iter().take(SHOWN_DROPS) {
        let _ = writeln!(
            out,
            "{:>10}  {:rw$}  {:pw$}  {}",
            d.packets, d.reason, d.protocol, d.after
        );
    }
    if let Some(rest) = r.drops.get(SHOWN_DROPS..).filter(|r| !r.is_empty()) {
        let packets: u64 = rest.iter().map(|d| d.packets).sum();
        let _ = writeln!(
            out,
            "  and {} more places with {packets} packets (the JSON report lists them all)",
            rest.len()
        );
    }
    let mut hinted: Vec<(&str, &str)> = Vec::new();
    for d in &r.drops {
        let Some(hint) = &d.hint else { continue };
        if hinted.contains(&(&d.reason, &d.protocol)) {
            continue;
        }
        if hinted.is_empty() {
            let _ = writeln!(out, "known kinds:");
        }
        let _ = writeln!(out, "  {} {}: {hint}", d.reason, d.protocol);
        hinted.push((&d.reason, &d.protocol));
    }
    out
}

/// Targets shown in the header at most: a node's hundreds of pods would fill screens.
const SHOWN_TARGETS: usize = 4;

/// The Services the filter sees through, a few of them (a node may have hundreds).
fn services(out: &mut String, all: &[String]) {
    const SHOWN: usize = 3;
    for s in all.iter().take(SHOWN) {
        let _ = writeln!(out, "Service NAT {s}");
    }
    if all.len() > SHOWN {
        let _ = writeln!(
            out,
            "and {} more Service ports (in the JSON)",
            all.len() - SHOWN
        );
    }
}

/// The targets: every one if few, else the patterns (`--pod *`) and the number of namespaces
/// they and the others name, with the first few.
fn targets(all: &[String], every: bool) -> String {
    if every || all.len() <= SHOWN_TARGETS {
        return all.join(", ");
    }
    let (patterns, named): (Vec<&String>, Vec<&String>) =
        all.iter().partition(|t| t.starts_with("--"));
    let first: Vec<&str> = named
        .iter()
        .take(SHOWN_TARGETS - 1)
        .map(|t| t.as_str())
        .collect();
    let mut out = String::new();
    for p in patterns {
        out += p;
        out += ", ";
    }
    out += &format!("{} namespaces: {}", named.len(), first.join(", "));
    if named.len() > first.len() {
        out += &format!(
            ", and {} more (the JSON report lists them all)",
            named.len() - first.len()
        );
    }
    out
}

fn segment_list(out: &mut String, segments: &[SegmentSummary]) {
    let _ = writeln!(
        out,
        "{:<56} {:>9} {:>9} {:>9} {:>9}",
        "segment", "packets", "p50 us", "p90 us", "p99 us"
    );
    for s in segments {
        let _ = writeln!(
            out,
            "{:<56} {:>9} {:>9.1} {:>9.1} {:>9.1}",
            s.name,
            s.count,
            s.p50_ns / 1e3,
            s.p90_ns / 1e3,
            s.p99_ns / 1e3
        );
    }
}

/// A path of followed packets as a waterfall: its segments in order, each with its share of
/// the path's summed means.
fn path_waterfall(out: &mut String, p: &AttachPath) {
    let total: f64 = p.segments.iter().map(|s| s.mean_ns).sum::<f64>().max(1.0);
    let _ = writeln!(
        out,
        "\npath taken by {} packets, {} -> {}:",
        p.packets,
        p.hops.first().map_or("?", String::as_str),
        p.hops.last().map_or("?", String::as_str)
    );
    // As wide as the longest name: a pod's name ends it, and cut it would say nothing.
    let w = p
        .segments
        .iter()
        .map(|s| s.name.chars().count())
        .max()
        .unwrap_or(0)
        .max("sum of the means".len());
    let _ = writeln!(
        out,
        "  {:>2}  {:<w$} {:>8} {:>8} {:>8} {:>8} {:>8}  share",
        "#", "segment", "packets", "mean", "p50", "p90", "p99"
    );
    for (i, s) in p.segments.iter().enumerate() {
        let share = s.mean_ns / total;
        let bar = "#".repeat((share * BAR_WIDTH).round().max(0.0) as usize);
        let _ = writeln!(
            out,
            "  {:>2}  {:<w$} {:>8} {:>8} {:>8} {:>8} {:>8}  {:>4.1}% {}",
            i + 1,
            s.name,
            s.count,
            us(s.mean_ns),
            us(s.p50_ns),
            us(s.p90_ns),
            us(s.p99_ns),
            share * 100.0,
            bar
        );
    }
    let _ = writeln!(
        out,
        "      {:<w$} {:>8} {:>8}",
        "sum of the means",
        "",
        us(total)
    );
    for line in shared_segments(p) {
        let _ = writeln!(out, "      {line}");
    }
}

/// Where a path's segments count more packets than the path: those segments are the start it
/// shares with other paths (the kernel keeps one histogram per way to a segment, and cannot
/// know where a packet will go next), so their counts take in packets that went on another way
/// or stopped sooner. Said per run of equal counts.
fn shared_segments(p: &AttachPath) -> Vec<String> {
    let mut lines = Vec::new();
    let mut i = 0;
    while i < p.segments.len() {
        let count = p.segments[i].count;
        let end = i + p.segments[i..]
            .iter()
            .take_while(|s| s.count == count)
            .count();
        if count > p.packets {
            let which = if end - i == 1 {
                format!("segment {}", i + 1)
            } else {
                format!("segments {}-{}", i + 1, end)
            };
            lines.push(format!(
                "{which}: {count} packets, {} of which took another way on or stopped sooner",
                count - p.packets
            ));
        }
        i = end;
    }
    lines
}

/// `profiler compare`: latency per type and size, then what makes each type differ.
pub fn compare(c: &CompareReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "request latency by network type ({}), microseconds",
        c.placement.words()
    );
    // As wide as the longest type (`flannel-vxlan-xhost+nftables`), at least 20.
    let w = (c.summary.iter().map(|r| r.topology.len()))
        .chain(c.skipped.iter().map(|s| s.topology.len()))
        .fold(20, usize::max);
    let _ = writeln!(
        out,
        "{:<w$} {:>7} {:>9} {:>9} {:>10}",
        "type", "size", "p50", "p99", "vs base"
    );
    for r in &c.summary {
        let delta = r
            .delta_ns
            .map_or("baseline".to_string(), |d| format!("{:+.1}", d / 1e3));
        let _ = writeln!(
            out,
            "{:<w$} {:>7} {:>9.1} {:>9.1} {:>10}",
            r.topology,
            r.size,
            r.p50_ns as f64 / 1e3,
            r.p99_ns as f64 / 1e3,
            delta
        );
    }
    for s in &c.skipped {
        let _ = writeln!(out, "{:<w$} skipped: {}", s.topology, s.reason);
    }
    let _ = writeln!(
        out,
        "\nwhere the difference to the baseline comes from (request direction):"
    );
    for r in c.summary.iter().filter(|r| r.delta_ns.is_some()) {
        let _ = writeln!(
            out,
            "{} at {} B ({:+.1} us):",
            r.topology,
            r.size,
            r.delta_ns.unwrap_or(0.0) / 1e3
        );
        for s in &r.contributors {
            let _ = writeln!(
                out,
                "  {:<48} {:>+8.1} us {:>6.0}%",
                s.segment,
                s.delta_ns / 1e3,
                s.percent
            );
        }
    }
    out
}

/// `profiler doctor`: the checks, then every hook of both modes with why it did not attach.
pub fn doctor(d: &DoctorReport) -> String {
    let line = |c: &super::schema::Check| {
        format!(
            "  {:<28} {:<12} {}\n",
            c.name,
            format!("{:?}", c.status).to_lowercase(),
            c.reason.as_deref().unwrap_or("")
        )
    };
    let mut out = format!("kernel {}\n", d.kernel);
    out += &line(&d.privileges);
    out += &line(&d.btf);
    out += "program types:\n";
    d.program_types.iter().for_each(|c| out += &line(c));
    for (title, hooks) in [
        ("hooks (run):", &d.hooks),
        ("hooks (attach):", &d.follow_hooks),
    ] {
        out += title;
        out += "\n";
        for h in hooks {
            out += &format!(
                "  {:<28} {:<12} {} {}\n",
                h.name,
                format!("{:?}", h.status).to_lowercase(),
                h.kind,
                h.reason.as_deref().unwrap_or("")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_way_across_names_each_node_and_sums_the_p50s() {
        let seg =
            |from_node: &str, to_node: &str, name: &str, p50_us: f64, bound_ns| SegmentAcross {
                from_node: from_node.into(),
                to_node: to_node.into(),
                name: name.into(),
                from: format!("{name} start"),
                to: format!("{name} end"),
                packets: 20,
                p50_ns: p50_us * 1e3,
                p90_ns: p50_us * 2e3,
                p99_ns: p50_us * 3e3,
                bound_ns,
            };
        let way = PathAcross {
            segments: vec![
                seg("node-a", "node-a", "qdisc eth0", 4.0, 0),
                seg("node-a", "node-b", "wire", 12.0, 8_000),
                seg("node-b", "node-b", "backlog eth0", 4.0, 0),
            ],
        };
        let mut out = String::new();
        path_across(
            &mut out,
            &way,
            "way across (each node's busiest path to and from the wire)",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "    way across (each node's busiest path to and from the wire), node-a: qdisc eth0 start -> node-b: backlog eth0 end:",
                "       #  node              segment       packets      p50      p90      p99    bound  share",
                "       1  node-a            qdisc eth0         20    4.0us    8.0us   12.0us           20.0% #####",
                "       2  node-a -> node-b  wire               20   12.0us   24.0us   36.0us  +-8.0us  60.0% ##############",
                "       3  node-b            backlog eth0       20    4.0us    8.0us   12.0us           20.0% #####",
                "          sum of the p50s                           20.0us",
            ],
            "{out}"
        );
    }

    #[test]
    fn formats_microseconds_and_milliseconds() {
        assert_eq!(us(1500.0), "1.5us");
        assert_eq!(us(2_500_000.0), "2.50ms");
        assert_eq!(truncate("abcdef", 4), "abc~");
        assert_eq!(truncate("abc", 4), "abc");
    }

    #[test]
    fn a_path_with_extra_hops_around_the_main_one_passes_it_in_order() {
        let v = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert!(passes_in_order(&v("a c d"), &v("a b c x d")));
        assert!(!passes_in_order(&v("a c d"), &v("a d c")));
        assert!(!passes_in_order(&v("a c d"), &v("a b d")));
    }

    #[test]
    fn a_path_says_which_segments_it_shares_with_others() {
        let seg = |count| SegmentSummary {
            count,
            ..Default::default()
        };
        let p = AttachPath {
            packets: 100,
            hops: Vec::new(),
            segments: [151, 151, 151, 100, 100].into_iter().map(seg).collect(),
        };
        assert_eq!(
            shared_segments(&p),
            ["segments 1-3: 151 packets, 51 of which took another way on or stopped sooner"]
        );
        let p = AttachPath {
            packets: 50,
            segments: [51, 50].into_iter().map(seg).collect(),
            ..p
        };
        assert_eq!(
            shared_segments(&p),
            ["segment 1: 51 packets, 1 of which took another way on or stopped sooner"]
        );
        let alone = AttachPath {
            segments: vec![seg(50)],
            ..p
        };
        assert!(shared_segments(&alone).is_empty());
    }

    #[test]
    fn many_targets_are_counted_not_listed() {
        let few: Vec<String> = (0..4).map(|i| format!("pod p-{i}")).collect();
        assert_eq!(targets(&few, false), few.join(", "));
        let mut many: Vec<String> = (0..250).map(|i| format!("pod p-{i}")).collect();
        many.push("--pod *".into());
        assert_eq!(
            targets(&many, false),
            "--pod *, 250 namespaces: pod p-0, pod p-1, pod p-2, and 247 more (the JSON report lists them all)"
        );
        assert_eq!(targets(&many, true), many.join(", "));
    }

    #[test]
    fn the_drops_view_goes_by_reason_then_place_and_says_each_hint_once() {
        let drop = |reason: &str, protocol: &str, after: &str, packets: u64| AttachDrop {
            hint: (reason, protocol)
                .eq(&("no_socket", "ipv4/icmp"))
                .then(|| "echo replies read through a raw socket".to_string()),
            reason: reason.into(),
            protocol: protocol.into(),
            after: after.into(),
            pod: None,
            namespace: None,
            packets,
        };
        let mut all = vec![
            drop(
                "no_socket",
                "ipv4/icmp",
                "netif_receive_skb eth0 (shop/web-1)",
                500,
            ),
            drop(
                "not_specified",
                "ipv6/icmpv6",
                "netif_receive_skb eth0 (shop/web-2)",
                300,
            ),
            drop(
                "no_socket",
                "ipv4/icmp",
                "netif_receive_skb eth0 (shop/web-2)",
                200,
            ),
        ];
        all.extend((0..25).map(|i| drop("queue_purge", "ipv4/tcp", &format!("hop {i}"), 1)));
        let report: AttachReport = serde_json::from_value(serde_json::json!({
            "schema": "profiler.attach.v1", "kernel": "6.1", "node": "n1",
            "targets": ["pod shop/web-1"], "filter": "", "sample": 1, "mode": "summary",
            "duration_s": 2.0, "segments": [], "journeys": {"started": 2000, "consumed": 975,
            "dropped": 1025, "ended_unseen": 0, "unfinished": 0, "reheaded": 0},
            "drops": [], "lost_events": 0, "hook_set": "stable", "hooks": []
        }))
        .expect("a minimal attach report");
        let report = AttachReport {
            drops: all,
            ..report
        };
        let view = drops(&report, false);
        let lines: Vec<&str> = view.lines().collect();
        assert_eq!(
            lines[0],
            "drops on n1 (pod shop/web-1) in 2.0 s: 1025 of 2000 journeys ended in a drop"
        );
        assert_eq!(lines[2], "       700  no_socket (2 places)", "{view}");
        assert_eq!(lines[3], "       300  not_specified (1 place)", "{view}");
        assert_eq!(lines[4], "        25  queue_purge (25 places)", "{view}");
        assert!(
            view.contains(
                "       500  no_socket      ipv4/icmp    netif_receive_skb eth0 (shop/web-1)"
            ),
            "{view}"
        );
        assert!(
            view.contains("  and 8 more places with 8 packets (the JSON report lists them all)"),
            "{view}"
        );
        assert_eq!(
            view.matches("echo replies read through a raw socket")
                .count(),
            1,
            "{view}"
        );
        let table = attach(&report, false);
        assert_eq!(
            table
                .matches("echo replies read through a raw socket")
                .count(),
            1,
            "{table}"
        );
        assert_eq!(table.matches("dropped:").count(), 28, "{table}");
    }
}
