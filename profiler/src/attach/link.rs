//! The wire between two nodes from what each saw cross it: the packets paired both ways
//! (cluster/join.rs), the two clocks related from those pairs (cluster/clock.rs), and each
//! packet's time on the wire on the first node's clock with its bound. The report joins every
//! sighting kept when the attach ends (across.rs); /metrics the latest ones as they come
//! (live.rs).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::{
    packets::{self, TimedPair},
    wire,
};
use crate::{
    cluster::{
        clock::Fit,
        join::{self, Joined, Pair, Sighting},
    },
    report::schema::{ClockBounds, LinkDirection, NodeLink, SightingLine, WireCrossing},
};

/// Where no line fits the whole attach, the clocks are fitted over this horizon around each
/// packet (cluster/clock.rs `track`).
const CLOCK_HORIZON_NS: u64 = 8_000_000_000;

/// One node's wire sightings as the join takes them (some 70 bytes each), its hops' names
/// kept once: what a host holds of a peer's stream.
#[derive(Clone, Default)]
pub(super) struct Seen {
    hops: Vec<String>,
    leaving: Vec<Sighting>,
    entering: Vec<Sighting>,
    /// When the last one was added (on this host's clock): the live join leaves out a node
    /// that has said nothing for its whole window.
    added: Option<Instant>,
}

impl Seen {
    pub(super) fn of<'l>(lines: impl IntoIterator<Item = &'l SightingLine>) -> Seen {
        let mut seen = Seen::default();
        for l in lines {
            seen.add(l);
        }
        seen
    }

    pub(super) fn add(&mut self, l: &SightingLine) {
        let at = match self.hops.iter().position(|h| *h == l.hop) {
            Some(i) => i,
            None => {
                self.hops.push(l.hop.clone());
                self.hops.len() - 1
            }
        };
        let s = Sighting {
            id: l.id,
            ts: l.ts_ns,
            journey: packets::key(&l.journey),
            at: at as u64,
        };
        if l.direction == "leaving" {
            self.leaving.push(s);
        } else {
            self.entering.push(s);
        }
        self.added = Some(Instant::now());
    }

    pub(super) fn len(&self) -> usize {
        self.leaving.len() + self.entering.len()
    }

    /// The node's latest sighting, on its clock. They come nearly in order (read from
    /// per-CPU rings in turns), so the last few hold it.
    fn newest(&self) -> u64 {
        let tail = |v: &[Sighting]| v.iter().rev().take(256).map(|s| s.ts).max();
        tail(&self.leaving).max(tail(&self.entering)).unwrap_or(0)
    }

    /// The sightings of the last `window_ns` before its newest (at most `most` each way);
    /// none if nothing came for that long.
    pub(super) fn recent(&self, window_ns: u64, most: usize) -> Seen {
        let quiet = self
            .added
            .is_none_or(|t| t.elapsed() > Duration::from_nanos(window_ns));
        let since = self.newest().saturating_sub(window_ns);
        let tail = |v: &[Sighting]| -> Vec<Sighting> {
            let v = if quiet { &[][..] } else { v };
            (v[v.len().saturating_sub(most)..].iter())
                .filter(|s| s.ts >= since)
                .cloned()
                .collect()
        };
        Seen {
            hops: self.hops.clone(),
            leaving: tail(&self.leaving),
            entering: tail(&self.entering),
            added: self.added,
        }
    }

    /// Forgets what [`Seen::recent`] would leave out.
    pub(super) fn forget_before(&mut self, window_ns: u64, most: usize) {
        *self = self.recent(window_ns, most);
    }
}

/// The hop a link names "NODE: HOP" (as `link` names them) on `node`.
pub(super) fn hop_on<'a>(named: &'a str, node: &str) -> &'a str {
    (named.strip_prefix(node))
        .and_then(|rest| rest.strip_prefix(": "))
        .unwrap_or(named)
}

/// Each direction's paired packets with their time on the wire (A to B, then B to A), and the
/// hops their sightings name (`Sighting::at`): A's, then B's, as each node names them.
#[derive(Default)]
pub(super) struct Timed {
    pub hops: Vec<String>,
    pub directions: [Vec<TimedPair>; 2],
}

/// The wire between node A and node B from their sightings: pairs both ways, B's clock related
/// to A's, each pair's time on the wire on A's clock; and those pairs one by one.
pub(super) fn link((a, a_seen): (&str, Seen), (b, mut b_seen): (&str, Seen)) -> (NodeLink, Timed) {
    // One numbering of both nodes' hops: B's after A's.
    let offset = a_seen.hops.len() as u64;
    for s in b_seen.leaving.iter_mut().chain(&mut b_seen.entering) {
        s.at += offset;
    }
    let hops: Vec<String> = (a_seen.hops.iter().map(|h| format!("{a}: {h}")))
        .chain(b_seen.hops.iter().map(|h| format!("{b}: {h}")))
        .collect();
    let mut timed = Timed {
        hops: a_seen.hops.iter().chain(&b_seen.hops).cloned().collect(),
        ..Timed::default()
    };
    let (ab, ba) = (
        join::join(a_seen.leaving, b_seen.entering),
        join::join(b_seen.leaving, a_seen.entering),
    );
    let clocks = join::clocks(&ab.pairs, &ba.pairs);
    // A's times of the pairs: when the first left A or entered it, to the last.
    let times = ab
        .pairs
        .iter()
        .map(|p| p.left.ts)
        .chain(ba.pairs.iter().map(|p| p.entered.ts));
    let (from, to) = times.fold((u64::MAX, 0), |(lo, hi), t| (lo.min(t), hi.max(t)));
    let whole = (from <= to).then(|| clocks.fit(from, to));
    // Tracked second by second only where no line fits the whole stretch.
    let timeline = matches!(whole, Some(Err(_))).then(|| clocks.track(CLOCK_HORIZON_NS));
    let fit_at = |t: u64| -> Option<Fit> {
        match (&whole, &timeline) {
            (Some(Ok(fit)), _) => Some(fit.clone()),
            (_, Some(timeline)) => timeline.at(t).ok().cloned(),
            _ => None,
        }
    };
    let mid = from / 2 + to / 2;
    let (clock, unfit) = match (&whole, fit_at(mid)) {
        (_, Some(fit)) => (Some(ClockBounds::of(&fit, mid)), None),
        (None, None) => (None, Some("no packet crossed either way".to_string())),
        (Some(Err(why)), None) => (None, Some(why.to_string())),
        (Some(Ok(_)), None) => unreachable!("a whole fit fits its middle"),
    };
    let [there, back] = &mut timed.directions;
    let directions = vec![
        direction((a, b), &ab, &hops, there, |p| {
            fit_at(p.left.ts).map(|f| join::on_the_wire(p, &f))
        }),
        direction((b, a), &ba, &hops, back, |p| {
            fit_at(p.entered.ts).map(|f| join::on_the_wire_back(p, &f))
        }),
    ];
    let link = NodeLink {
        a: a.to_string(),
        b: b.to_string(),
        clock,
        unfit,
        directions,
        streamed: None,
    };
    (link, timed)
}

/// One direction's pairs as crossings per pair of hops, each timed pair also kept in `each`;
/// `timed` gives a pair's time on the wire and its bound, None where no fit covers it.
fn direction(
    (from, to): (&str, &str),
    joined: &Joined,
    hops: &[String],
    each: &mut Vec<TimedPair>,
    timed: impl Fn(&Pair) -> Option<(i64, u64)>,
) -> LinkDirection {
    let mut by_hops: HashMap<(u64, u64), (Vec<u64>, Vec<u64>)> = HashMap::new();
    let mut untimed = 0;
    for p in &joined.pairs {
        let Some((ns, bound)) = timed(p) else {
            untimed += 1;
            continue;
        };
        let ns = ns.max(0) as u64;
        let (times, bounds) = by_hops.entry((p.left.at, p.entered.at)).or_default();
        times.push(ns);
        bounds.push(bound);
        each.push(TimedPair {
            left: p.left.clone(),
            entered: p.entered.clone(),
            ns,
            bound,
        });
    }
    let mut crossings: Vec<WireCrossing> = by_hops
        .into_iter()
        .map(|((l, e), (times, mut bounds))| {
            bounds.sort_unstable();
            let bound = bounds[bounds.len() / 2];
            wire::crossing(
                hops[l as usize].clone(),
                hops[e as usize].clone(),
                times,
                bound,
            )
        })
        .collect();
    wire::by_packets(&mut crossings);
    LinkDirection {
        from_node: from.to_string(),
        to_node: to.to_string(),
        crossings,
        ambiguous: joined.ambiguous,
        unmatched_leaving: joined.unmatched_leaving,
        unmatched_entering: joined.unmatched_entering,
        untimed,
        ..LinkDirection::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::join::{Flow, WireId};

    fn line(node: &str, direction: &str, hop: &str, ts_ns: u64, n: u16) -> SightingLine {
        SightingLine {
            node: node.into(),
            direction: direction.into(),
            hop: hop.into(),
            netns: None,
            ifname: None,
            ts_ns,
            journey: String::new(),
            id: WireId {
                outer: Flow {
                    saddr: 1,
                    daddr: 2,
                    proto: 1,
                    sport: 0x0800,
                    dport: n,
                    ip_id: n,
                },
                ..WireId::default()
            },
        }
    }

    /// B's clock an hour behind A's and drifting 20 ppm; packets 40-90 us on the wire each way.
    #[test]
    fn a_link_pairs_both_ways_and_bounds_every_packet() {
        let b = |t: u64| ((t as f64) * (1.0 + 20e-6)) as u64 - 3_600_000_000_000;
        let wire = |i: u64| 40_000 + (i * 7_919) % 50_000;
        let start = 4_000_000_000_000;
        let (mut a_lines, mut b_lines) = (Vec::new(), Vec::new());
        for i in 0..500u64 {
            let t = start + i * 10_000_000;
            let n = i as u16;
            a_lines.push(line("host", "leaving", "xmit tap", t, n));
            b_lines.push(line("vm1", "entering", "rx eth0", b(t + wire(i)), n));
            let t = t + 5_000_000;
            b_lines.push(line("vm1", "leaving", "xmit eth0", b(t), 1000 + n));
            a_lines.push(line(
                "host",
                "entering",
                "rx tap",
                t + wire(i + 1),
                1000 + n,
            ));
        }
        // A packet lost on the way, and one the guest saw twice (with the one it was sent as).
        a_lines.push(line(
            "host",
            "leaving",
            "xmit tap",
            start + 6_000_000_000,
            5000,
        ));
        b_lines.push(line("vm1", "entering", "rx eth0", b(start + 10), 7));
        let (l, _) = link(("host", Seen::of(&a_lines)), ("vm1", Seen::of(&b_lines)));
        let clock = l.clock.expect("the clocks related");
        let truth = b(clock.at_ns) as i64 - clock.at_ns as i64;
        assert!(
            clock.offset_ns.0 <= truth && truth <= clock.offset_ns.1,
            "{clock:?} {truth}"
        );
        let (there, back) = (&l.directions[0], &l.directions[1]);
        assert_eq!((there.ambiguous, there.unmatched_leaving), (3, 1));
        assert_eq!((back.ambiguous, back.unmatched_leaving), (0, 0));
        let c = &there.crossings[0];
        assert_eq!(
            (c.from.as_str(), c.to.as_str(), c.packets),
            ("host: xmit tap", "vm1: rx eth0", 499)
        );
        let c = &back.crossings[0];
        assert_eq!(
            (c.from.as_str(), c.to.as_str(), c.packets),
            ("vm1: xmit eth0", "host: rx tap", 500)
        );
        // The median packet's time is the median truth (65 us) within its bound.
        for c in [&there.crossings[0], &back.crossings[0]] {
            assert!(
                c.p50_ns.abs_diff(65_000) <= c.bound_ns && c.bound_ns <= 50_000,
                "{c:?}"
            );
        }
    }

    #[test]
    fn packets_one_way_only_are_paired_and_not_timed() {
        let a: Vec<SightingLine> = (0..10)
            .map(|i| {
                line(
                    "host",
                    "leaving",
                    "xmit tap",
                    1_000 + i * 1_000_000,
                    i as u16,
                )
            })
            .collect();
        let b: Vec<SightingLine> = (0..10)
            .map(|i| {
                line(
                    "vm1",
                    "entering",
                    "rx eth0",
                    50_000 + i * 1_000_000,
                    i as u16,
                )
            })
            .collect();
        let (l, _) = link(("host", Seen::of(&a)), ("vm1", Seen::of(&b)));
        assert!(l.clock.is_none());
        assert!(l.unfit.expect("why").contains("one way"));
        assert_eq!(l.directions[0].untimed, 10);
        assert!(l.directions[0].crossings.is_empty());
    }

    /// The live join's window: the last 30 s before the newest sighting, the latest `most`
    /// at most; nothing from a node that said nothing for the whole window.
    #[test]
    fn the_live_window_keeps_the_latest_sightings_only() {
        let s = 1_000_000_000;
        let lines: Vec<SightingLine> = (0..100)
            .map(|i| {
                line(
                    "host",
                    ["leaving", "entering"][i % 2],
                    "xmit tap",
                    i as u64 * s,
                    i as u16,
                )
            })
            .collect();
        let mut seen = Seen::of(&lines);
        let recent = seen.recent(30 * s, 1000);
        let mut kept: Vec<u64> = recent
            .leaving
            .iter()
            .chain(&recent.entering)
            .map(|x| x.ts / s)
            .collect();
        kept.sort_unstable();
        assert_eq!(kept, (69..100).collect::<Vec<_>>());
        assert_eq!(seen.recent(30 * s, 5).len(), 10);
        seen.forget_before(30 * s, 1000);
        assert_eq!(seen.len(), 31);
        seen.added = Some(Instant::now() - Duration::from_secs(31));
        assert_eq!(
            seen.recent(30 * s, 1000).len(),
            0,
            "a quiet node's window is empty"
        );
    }

    /// What one live join costs at its bound (2^17 sightings each way on each node, as at
    /// about 4 k followed packets a second each way over the 30 s window): run by hand,
    /// `cargo test --release -p profiler --lib -- --ignored a_live_join_at_its_bound --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn a_live_join_at_its_bound() {
        let most = 1 << 17;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 0..most as u64 {
            let t = 1_000_000_000 + i * 200_000;
            let n = (i % 65_536) as u16;
            let mut out = line("a", "leaving", "xmit eth0", t, n);
            out.id.tcp_seq = i as u32;
            let mut got = line("b", "entering", "rx eth0", t + 50_000, n);
            got.id.tcp_seq = i as u32;
            let mut back = line("b", "leaving", "xmit eth0", t + 100_000, n);
            back.id.tcp_seq = !(i as u32);
            let mut home = line("a", "entering", "rx eth0", t + 150_000, n);
            home.id.tcp_seq = !(i as u32);
            a.extend([out, home]);
            b.extend([got, back]);
        }
        let (a, b) = (Seen::of(&a), Seen::of(&b));
        let started = Instant::now();
        let (l, _) = link(
            ("a", a.recent(u64::MAX, most)),
            ("b", b.recent(u64::MAX, most)),
        );
        let took = started.elapsed();
        let paired: u64 = l
            .directions
            .iter()
            .flat_map(|d| &d.crossings)
            .map(|c| c.packets)
            .sum();
        assert_eq!(paired, 2 * most as u64);
        eprintln!(
            "a live join of {} sightings on each node: {took:?}",
            2 * most
        );
    }
}
