//! Ways across nodes packet by packet (`attach --peer ... --mode events`). Each node follows
//! every packet on a journey of its own and says, in each wire sighting, which journey the
//! packet was on; a pair of sightings (link.rs) therefore joins the packet's journey on the
//! leaving node, up to the hop it left at, with its journey on the entering node, from the hop
//! it entered at, and the wire between. Packets that took the same hops are grouped, and every
//! segment of a group counts the same packets (unlike stitch.rs, which joins each node's
//! busiest path through the crossing, medians of different packets).

use std::collections::HashMap;

use super::{
    otlp::{Step, Trace, Traces},
    wire,
};
use crate::{
    cluster::join::Sighting,
    report::schema::{AttachReport, HopLine, JourneyLine, PathAcross, SegmentAcross},
};

/// A packet paired at the wire (link.rs): its sightings on both nodes, and its time on the
/// wire on the first node's clock, with the bound.
pub(super) struct TimedPair {
    pub left: Sighting,
    pub entered: Sighting,
    pub ns: u64,
    pub bound: u64,
}

/// Journeys kept per node for the join: the memory bound (a journey line is some hundreds of
/// bytes); past it a peer's are counted, this node's not sent (events.rs), and their packets
/// are `unjoined`.
pub(super) const KEPT: usize = 1 << 16;

/// A node's journeys by their key.
#[derive(Default)]
pub struct Journeys {
    by_key: HashMap<u64, JourneyLine>,
    pub not_kept: u64,
}

impl Journeys {
    pub fn add(&mut self, j: JourneyLine) {
        if self.by_key.len() >= KEPT {
            self.not_kept += 1;
        } else {
            self.by_key.insert(key(&j.journey), j);
        }
    }
}

/// A journey's key from its name (`journey_name`: its first buffer in hex, a dash, its start):
/// the same for a sighting that names it and for the journey's own line.
pub fn key(name: &str) -> u64 {
    let (head, start) = name.split_once('-').unwrap_or((name, ""));
    let head = u64::from_str_radix(head, 16).unwrap_or(0);
    let start: u64 = start.parse().unwrap_or(0);
    head ^ start.rotate_left(32)
}

/// The hops a group of packets took: the leaving node's up to the wire, the entering node's
/// from it; and each segment's times, the wire's between.
#[derive(Default)]
struct Group {
    before: Vec<String>,
    after: Vec<String>,
    before_ns: Vec<Vec<u64>>,
    wire_ns: Vec<u64>,
    bounds: Vec<u64>,
    after_ns: Vec<Vec<u64>>,
}

/// One direction's timed pairs as ways across, most packets first, and how many could not be
/// joined (a journey not kept, or without the hop it crossed at). `hops` names the pairs'
/// hops (link.rs `Timed`); `from` and `to` are the nodes' reports, their journeys `journeys`.
/// With `traces`, each joined packet is also offered there (one in N is kept), its steps on
/// this node's clock: the flag says whether this node is the one the packets left (the pairs'
/// time on the wire is on this node's clock either way).
pub(super) fn ways(
    pairs: &[TimedPair],
    hops: &[String],
    (from, to): (&AttachReport, &AttachReport),
    journeys: (&Journeys, &Journeys),
    mut traces: Option<(&mut Traces, bool)>,
) -> (Vec<PathAcross>, u64) {
    let mut groups: HashMap<(Vec<String>, Vec<String>), Group> = HashMap::new();
    let mut unjoined = 0;
    for p in pairs {
        let Some(c) = cut(p, hops, journeys) else {
            unjoined += 1;
            continue;
        };
        if let Some((traces, here_leaves)) = traces.as_mut() {
            traces.offer(|| trace(p, &c, (from, to), *here_leaves));
        }
        let Cut { before, after } = c;
        let names = |h: &[HopLine]| -> Vec<String> { h.iter().map(|h| h.hop.clone()).collect() };
        let g = groups.entry((names(before), names(after))).or_default();
        if g.wire_ns.is_empty() {
            (g.before, g.after) = (names(before), names(after));
            g.before_ns = vec![Vec::new(); before.len() - 1];
            g.after_ns = vec![Vec::new(); after.len() - 1];
        }
        for (times, w) in g.before_ns.iter_mut().zip(before.windows(2)) {
            times.push(w[1].at_ns.saturating_sub(w[0].at_ns));
        }
        for (times, w) in g.after_ns.iter_mut().zip(after.windows(2)) {
            times.push(w[1].at_ns.saturating_sub(w[0].at_ns));
        }
        g.wire_ns.push(p.ns);
        g.bounds.push(p.bound);
    }
    let mut ways: Vec<PathAcross> = groups.into_values().map(|g| way(g, from, to)).collect();
    ways.sort_by_key(|w| std::cmp::Reverse(w.segments.iter().map(|s| s.packets).max()));
    (ways, unjoined)
}

/// A paired packet's journeys on both nodes, cut at the wire: the leaving node's hops up to
/// the one it left at, the entering node's from the one it entered at.
struct Cut<'j> {
    before: &'j [HopLine],
    after: &'j [HopLine],
}

/// The pair's cut, if both journeys were kept and crossed the pair's hops.
fn cut<'j>(
    p: &TimedPair,
    hops: &[String],
    (from_journeys, to_journeys): (&'j Journeys, &'j Journeys),
) -> Option<Cut<'j>> {
    let left = from_journeys.by_key.get(&p.left.journey)?;
    let entered = to_journeys.by_key.get(&p.entered.journey)?;
    let up_to = position(left, &hops[p.left.at as usize])?;
    let from_on = position(entered, &hops[p.entered.at as usize])?;
    Some(Cut {
        before: &left.hops[..=up_to],
        // Empty when the journey ended at the hop it entered by: nothing to join.
        after: crossed(entered).get(from_on..).filter(|a| !a.is_empty())?,
    })
}

/// A joined packet's steps: the leaving node's up to the wire, the wire, the entering node's;
/// each node's placed from the time the packet left or entered on this node's clock.
fn trace(
    p: &TimedPair,
    c: &Cut,
    (from, to): (&AttachReport, &AttachReport),
    here_leaves: bool,
) -> Trace {
    let departs = if here_leaves {
        p.left.ts
    } else {
        p.entered.ts.saturating_sub(p.ns)
    };
    let arrives = departs + p.ns;
    let (last, first) = (c.before.last(), c.after.first());
    let last_ns = last.map_or(0, |h| h.at_ns);
    let first_ns = first.map_or(0, |h| h.at_ns);
    let within = |r: &AttachReport, hops: &[HopLine], at: &dyn Fn(u64) -> u64| {
        let steps = hops.windows(2).map(|w| Step {
            from_node: r.node.clone(),
            to_node: r.node.clone(),
            name: segment_name(r, &w[0].hop, &w[1].hop),
            from: w[0].hop.clone(),
            to: w[1].hop.clone(),
            start_ns: at(w[0].at_ns),
            end_ns: at(w[1].at_ns),
            bound_ns: 0,
        });
        steps.collect::<Vec<_>>()
    };
    let wire = Step {
        from_node: from.node.clone(),
        to_node: to.node.clone(),
        name: "wire".to_string(),
        from: last.map_or_else(String::new, |h| h.hop.clone()),
        to: first.map_or_else(String::new, |h| h.hop.clone()),
        start_ns: departs,
        end_ns: arrives,
        bound_ns: p.bound,
    };
    // A journey's hops are in time order, so neither difference wraps; saturating all the same.
    Trace {
        steps: (within(from, c.before, &|at| {
            departs.saturating_sub(last_ns.saturating_sub(at))
        }))
        .into_iter()
        .chain([wire])
        .chain(within(to, c.after, &|at| {
            arrives + at.saturating_sub(first_ns)
        }))
        .collect(),
    }
}

/// A segment's name in the node's report, else its hops'.
fn segment_name(r: &AttachReport, from: &str, to: &str) -> String {
    (r.segments.iter())
        .find(|s| s.from == from && s.to == to)
        .map_or_else(|| format!("{from} -> {to}"), |s| s.name.clone())
}

/// The journey's hops without the one that ended it (the buffer freed, consumed or dropped),
/// which the node's own segments leave out too.
fn crossed(j: &JourneyLine) -> &[HopLine] {
    match j.end.as_str() {
        "consumed" | "dropped" => &j.hops[..j.hops.len().saturating_sub(1)],
        _ => &j.hops,
    }
}

/// Where the journey crossed `hop` (the first time).
fn position(j: &JourneyLine, hop: &str) -> Option<usize> {
    j.hops.iter().position(|h| h.hop == hop)
}

fn way(g: Group, from: &AttachReport, to: &AttachReport) -> PathAcross {
    let within = |r: &AttachReport, hops: &[String], times: Vec<Vec<u64>>| {
        let segments = hops.windows(2).zip(times).map(move |(w, ns)| {
            let name = segment_name(r, &w[0], &w[1]);
            segment(&r.node, &r.node, name, &w[0], &w[1], ns, 0)
        });
        segments.collect::<Vec<_>>()
    };
    let mut bounds = g.bounds;
    bounds.sort_unstable();
    let bound = bounds[bounds.len() / 2];
    let (left, entered) = (g.before.last(), g.after.first());
    let wire = segment(
        &from.node,
        &to.node,
        "wire".to_string(),
        left.map_or("", String::as_str),
        entered.map_or("", String::as_str),
        g.wire_ns,
        bound,
    );
    PathAcross {
        segments: (within(from, &g.before, g.before_ns).into_iter())
            .chain([wire])
            .chain(within(to, &g.after, g.after_ns))
            .collect(),
    }
}

fn segment(
    from_node: &str,
    to_node: &str,
    name: String,
    from: &str,
    to: &str,
    ns: Vec<u64>,
    bound_ns: u64,
) -> SegmentAcross {
    let c = wire::crossing(from.to_string(), to.to_string(), ns, bound_ns);
    SegmentAcross {
        from_node: from_node.to_string(),
        to_node: to_node.to_string(),
        name,
        from: c.from,
        to: c.to,
        packets: c.packets,
        p50_ns: c.p50_ns as f64,
        p90_ns: c.p90_ns as f64,
        p99_ns: c.p99_ns as f64,
        bound_ns: c.bound_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cluster::join::WireId,
        report::schema::{journey_name, HopLine},
    };

    fn journey(head: u64, start: u64, hops: &[(&str, u64)]) -> JourneyLine {
        JourneyLine {
            journey: journey_name(head, start),
            start_ns: start,
            end: "consumed".into(),
            drop_reason: None,
            hops: hops
                .iter()
                .map(|&(hop, at_ns)| HopLine {
                    hop: hop.into(),
                    at_ns,
                    len: 100,
                    pod: None,
                    namespace: None,
                })
                .collect(),
        }
    }

    fn report(node: &str) -> AttachReport {
        serde_json::from_value(serde_json::json!({
            "schema": "profiler.attach.v1", "kernel": "6.1", "node": node, "targets": [],
            "filter": "", "sample": 1, "mode": "events", "duration_s": 1.0, "segments": [],
            "journeys": {"started": 0, "consumed": 0, "dropped": 0, "ended_unseen": 0,
            "unfinished": 0, "reheaded": 0}, "lost_events": 0, "hook_set": "stable",
            "hooks": []
        }))
        .expect("a minimal attach report")
    }

    fn seen(name: &str, at: u64) -> Sighting {
        Sighting {
            id: WireId::default(),
            ts: 0,
            journey: key(name),
            at,
        }
    }

    /// Three packets, two of one way and one of another: each way's segments count its own
    /// packets and give their own times; a packet whose journey was not kept is counted.
    #[test]
    fn paired_packets_join_their_journeys_at_the_wire() {
        let hops = vec!["xmit eth0".to_string(), "rx eth0".to_string()];
        let (mut a, mut b) = (Journeys::default(), Journeys::default());
        let mut pairs = Vec::new();
        for (i, (qdisc_us, via)) in [(10, "bridge"), (30, "bridge"), (5, "routed")]
            .into_iter()
            .enumerate()
        {
            let (head, start) = (0xf00 + i as u64, 1_000 + i as u64);
            a.add(journey(
                head,
                start,
                &[("queue eth0", 0), ("xmit eth0", qdisc_us * 1000)],
            ));
            b.add(journey(
                head,
                start,
                &[
                    ("rx eth0", 0),
                    (via, 2_000),
                    ("socket", 7_000),
                    ("consume_skb", 9_000),
                ],
            ));
            let name = journey_name(head, start);
            pairs.push(TimedPair {
                left: seen(&name, 0),
                entered: seen(&name, 1),
                ns: 40_000 + i as u64,
                bound: 3_000,
            });
        }
        pairs.push(TimedPair {
            left: seen("dead-1", 0),
            entered: seen("beef-2", 1),
            ns: 1,
            bound: 1,
        });
        let (ways, unjoined) = ways(&pairs, &hops, (&report("a"), &report("b")), (&a, &b), None);
        assert_eq!(unjoined, 1);
        assert_eq!(ways.len(), 2);
        let names: Vec<(&str, &str, u64)> = ways[0]
            .segments
            .iter()
            .map(|s| (s.from_node.as_str(), s.name.as_str(), s.packets))
            .collect();
        assert_eq!(
            names,
            [
                ("a", "queue eth0 -> xmit eth0", 2),
                ("a", "wire", 2),
                ("b", "rx eth0 -> bridge", 2),
                ("b", "bridge -> socket", 2),
            ]
        );
        let qdisc = &ways[0].segments[0];
        assert_eq!((qdisc.p50_ns, qdisc.p99_ns), (30_000.0, 30_000.0));
        assert_eq!(ways[0].segments[1].bound_ns, 3_000);
        assert_eq!(ways[1].segments[2].name, "rx eth0 -> routed");
    }

    /// A joined packet's steps on this node's clock, whichever node it left: the leaving
    /// node's before the wire, ending where the wire starts, the entering node's after.
    #[test]
    fn a_joined_packet_is_traced_on_this_nodes_clock() {
        let hops = vec!["xmit eth0".to_string(), "rx eth0".to_string()];
        let (mut a, mut b) = (Journeys::default(), Journeys::default());
        a.add(journey(1, 100, &[("queue eth0", 0), ("xmit eth0", 10_000)]));
        b.add(journey(
            2,
            900_000,
            &[("rx eth0", 0), ("socket", 7_000), ("consume_skb", 9_000)],
        ));
        let pair = |left_ts, entered_ts| TimedPair {
            left: Sighting {
                ts: left_ts,
                ..seen(&journey_name(1, 100), 0)
            },
            entered: Sighting {
                ts: entered_ts,
                ..seen(&journey_name(2, 900_000), 1)
            },
            ns: 40_000,
            bound: 3_000,
        };
        let ends = (&report("a"), &report("b"));
        let steps = |here_leaves, p: TimedPair| {
            let mut t = Traces::new(1);
            let (ways, _) = ways(&[p], &hops, ends, (&a, &b), Some((&mut t, here_leaves)));
            assert_eq!(ways.len(), 1);
            let times = |s: &Step| (s.from_node.clone(), s.start_ns, s.end_ns);
            t.kept[0].steps.iter().map(times).collect::<Vec<_>>()
        };
        let want = |at: u64| {
            vec![
                ("a".to_string(), at - 10_000, at),
                ("a".to_string(), at, at + 40_000),
                ("b".to_string(), at + 40_000, at + 47_000),
            ]
        };
        // Here is a: its sighting's time is the departure.
        assert_eq!(steps(true, pair(10_100, 0)), want(10_100));
        // Here is b: the departure is its sighting's time less the wire's.
        assert_eq!(steps(false, pair(0, 500_000)), want(460_000));
    }

    #[test]
    fn a_journey_is_found_by_its_name() {
        assert_eq!(key(&journey_name(0xabc, 42)), 0xabc ^ 42u64.rotate_left(32));
        assert_eq!(key(""), 0);
    }
}
