//! Attribution: what a run collected ([`Collected`]) turned into its report. Journeys are
//! rebuilt from the events and the traffic's stamps, each direction's most common path becomes
//! its waterfall, and drops are named by reason and device. Nothing here needs root or the lab:
//! `profiler report --events FILE` runs it on a saved collection.

use std::collections::BTreeMap;

use profiler_common::Event;

use super::{
    agent::{self, GuestPart},
    alltoall::{self, AlltoallSpec},
    journey::{self, Attribution},
    record::Collected,
    rr, Driven,
};
use crate::{
    datapath::{
        path::{self, Attached, Inodes},
        HopKey,
    },
    kernel::btf::DropReasons,
    lab::target::Devices,
    report::schema::{
        AlltoallResult, CrossingReport, DirectionReport, DropReport, EventsReport, Hop, MissingHop,
        OtherPath, PathKindResult, RunReport, SegmentReport, Stats, StreamResult, TrafficReport,
        RUN_SCHEMA,
    },
};

/// Paths other than the most common one shown per direction.
const MAX_OTHER_PATHS: usize = 3;

/// What a direction's waterfall is named after: the devices, their namespaces' inodes and the
/// hooks' program types.
struct Naming<'a> {
    devices: &'a Devices,
    inodes: &'a Inodes,
    attached: &'a Attached,
}

/// The run's report from what it collected.
pub fn attribute(c: &Collected) -> RunReport {
    let mut events = c.events();
    let mut inodes = Inodes::from_all(&c.inodes);
    let mut driven = c.driven.clone();
    let crossings = match &mut driven {
        Driven::Rr(outcome) if !c.guests.is_empty() => {
            on_host_timeline(&c.guests, &mut events, outcome, &mut inodes)
        }
        _ => Vec::new(),
    };
    let drop_reasons = DropReasons::named(c.drop_reasons.iter().map(|(&v, n)| (v, n.as_str())));
    let attached = Attached::from_statuses(&c.hooks[..c.host_hooks.min(c.hooks.len())]);
    let naming = Naming {
        devices: &c.devices,
        inodes: &inodes,
        attached: &attached,
    };
    let sorted = match &driven {
        Driven::Alltoall(s, o) => {
            let pod_ns: Vec<u32> = c.pod_netns.iter().map(|n| inodes.get(n)).collect();
            journey::observations_by(&events, &o.stamps, |st| {
                let (a, b) = s.pods_of(st.direction);
                (pod_ns[a as usize], pod_ns[b as usize])
            })
        }
        driven => {
            let app_netns = [inodes.get(&c.client_netns), inodes.get(&c.server_netns)];
            journey::observations(&events, driven.stamps(), app_netns)
        }
    };
    let mut drops = sorted.drops;
    if let Some(unspecified) = drop_reasons.value("not_specified") {
        journey::drop_transmit_frees(&mut drops, &events, unspecified);
    }
    let mut directions = Vec::new();
    let mut incomplete = 0;
    for (dir, name) in driven.directions() {
        let report = direction(&name, dir, &sorted.observations, &naming);
        incomplete += report.incomplete_packets;
        directions.push(report);
    }
    let alltoall = match &driven {
        Driven::Alltoall(s, o) => {
            let a = alltoall_report(s, o, &sorted.observations, &c.pod_netns, &naming);
            incomplete += a.incomplete;
            directions.extend(a.directions);
            Some(a.result)
        }
        _ => None,
    };
    RunReport {
        made: c.made.clone(),
        schema: RUN_SCHEMA.into(),
        kernel: c.kernel.clone(),
        topology: c.devices.name.clone(),
        service: c.service.clone(),
        traffic: TrafficReport {
            proto: c.proto,
            size: c.size,
            count: c.count,
            completed: driven.completed(),
        },
        directions,
        events: EventsReport {
            received: events.len() as u64,
            lost: c.lost,
            incomplete_packets: incomplete,
            unreadable: c.unreadable,
            fragments: sorted.fragments,
            drops: drop_report(&drops, &c.devices, &inodes, &drop_reasons),
        },
        hook_set: c.hook_set,
        hooks: c.hooks.clone(),
        program_costs: c.program_costs.clone(),
        stream: match &driven {
            Driven::Stream(s, o) => Some(StreamResult {
                unprofiled_gbit_per_s: c.unprofiled.as_ref().map(|u| u.gbit_per_s),
                unprofiled_sent_gbit_per_s: c.unprofiled.as_ref().map(|u| u.sent_gbit_per_s),
                ..o.result(s)
            }),
            _ => None,
        },
        alltoall,
        crossings,
    }
}

/// A nested run's guests' events and stamps put on the host's timeline (agent/merge.rs), each
/// against the host's events alone: their hops join the host's, the outcome takes a guest
/// client's stamps and the guests' servers'. Returns each guest's crossing.
fn on_host_timeline(
    guests: &[GuestPart],
    events: &mut Vec<Event>,
    outcome: &mut rr::Outcome,
    inodes: &mut Inodes,
) -> Vec<CrossingReport> {
    let (mut guest_events, mut server, mut client) = (Vec::new(), Vec::new(), None);
    let mut crossings = Vec::new();
    for part in guests {
        let merged = agent::merge(part, events, &outcome.stamps, inodes);
        guest_events.extend(merged.events);
        server.extend(merged.server);
        if part.client.is_some() {
            client = Some(rr::client_outcome(&merged.client));
        }
        crossings.push(merged.report);
    }
    events.extend(guest_events);
    if let Some(c) = client {
        *outcome = c;
    }
    rr::apply_server_log(outcome, &server);
    crossings
}

/// All-to-all's figures, and the waterfall of each path kind's best-attributed pod pair.
struct AlltoallReport {
    result: AlltoallResult,
    directions: Vec<DirectionReport>,
    /// Tagged messages whose journey did not match their pod pair's path.
    incomplete: u64,
}

/// One path kind's pod pairs, added up, and its best-attributed pair (attributed, pair).
struct KindTally {
    result: PathKindResult,
    best: Option<(u64, u32)>,
}

impl KindTally {
    fn new(kind: &str) -> KindTally {
        KindTally {
            result: PathKindResult {
                kind: kind.to_string(),
                pod_pairs: 0,
                tagged: 0,
                attributed: 0,
                unattributed_pairs: 0,
            },
            best: None,
        }
    }

    fn add(&mut self, pair: u32, tagged: u64, attributed: u64) {
        let r = &mut self.result;
        r.pod_pairs += 1;
        r.tagged += tagged;
        r.attributed += attributed;
        r.unattributed_pairs += u32::from(attributed == 0);
        if self.best.is_none_or(|(best, _)| attributed > best) {
            self.best = Some((attributed, pair));
        }
    }
}

fn alltoall_report(
    spec: &AlltoallSpec,
    out: &alltoall::AlltoallOutcome,
    observations: &[journey::Observation],
    pod_netns: &[String],
    naming: &Naming,
) -> AlltoallReport {
    let n = spec.pods.len() as u32;
    // The pod's role: the last two words of its namespace's name (prof-bridge-pod-c).
    let pod_name = |p: u32| {
        let ns = &pod_netns[p as usize];
        let at = ns.rfind('-').and_then(|i| ns[..i].rfind('-'));
        ns[at.map_or(0, |i| i + 1)..].to_string()
    };
    let mut kinds: BTreeMap<&str, KindTally> = BTreeMap::new();
    let mut incomplete = 0;
    for (a, b) in (0..n).flat_map(|a| (0..n).map(move |b| (a, b))) {
        if a == b && spec.procs < 2 {
            continue;
        }
        let pair = spec.pair(a, b);
        let keys = journey::modal_path(observations, pair);
        let attribution = journey::attribute(observations, pair, &keys);
        incomplete += attribution.incomplete;
        let tagged = out.stamps.iter().filter(|s| s.direction == pair).count() as u64;
        let kind = spec.path_kind(a, b);
        kinds
            .entry(kind)
            .or_insert_with(|| KindTally::new(kind))
            .add(pair, tagged, attribution.complete);
    }
    let directions = kinds
        .iter()
        .filter_map(|(kind, tally)| {
            let (_, pair) = tally.best?;
            let (a, b) = spec.pods_of(pair);
            let title = format!("{kind} ({} -> {})", pod_name(a), pod_name(b));
            Some(direction(&title, pair, observations, naming))
        })
        .collect();
    let rounds: Vec<u64> = out.rounds.iter().map(|d| d.as_nanos() as u64).collect();
    let rounds = journey::stats_of(&rounds);
    AlltoallReport {
        result: AlltoallResult {
            pods: n / spec.hosts(),
            procs: spec.procs,
            size: spec.size,
            rounds: spec.rounds,
            completed_rounds: out.rounds.len() as u32,
            round_p50_ms: rounds.p50_ns as f64 / 1e6,
            round_p99_ms: rounds.p99_ns as f64 / 1e6,
            tag_every: spec.tag_every,
            path_kinds: kinds.into_values().map(|k| k.result).collect(),
        },
        directions,
        incomplete,
    }
}

/// One direction's waterfall: its most common path, and the others packets took.
fn direction(
    name: &str,
    dir: u32,
    observations: &[journey::Observation],
    naming: &Naming,
) -> DirectionReport {
    let lab = naming.devices;
    let paths = journey::paths(observations, dir);
    let keys = paths.first().map(|(k, _)| k.clone()).unwrap_or_default();
    let describe = |keys: &[HopKey]| {
        let flags = journey::hop_flags(observations, dir, keys);
        path::describe(keys, &flags, lab, naming.inodes, naming.attached)
    };
    let attribution = journey::attribute(observations, dir, &keys);
    let mut report = direction_report(name, &keys, describe(&keys), attribution, lab);
    report.other_paths = paths
        .iter()
        .skip(1)
        .take(MAX_OTHER_PATHS)
        .map(|(keys, packets)| {
            let hops = describe(keys);
            let a = journey::attribute(observations, dir, keys);
            OtherPath {
                packets: *packets,
                segments: segment_reports(keys, &hops, a.segments, lab),
                hops,
                end_to_end: a.end_to_end,
            }
        })
        .collect();
    report
}

fn direction_report(
    name: &str,
    keys: &[HopKey],
    hops: Vec<Hop>,
    a: Attribution,
    lab: &Devices,
) -> DirectionReport {
    let segments = segment_reports(keys, &hops, a.segments, lab);
    DirectionReport {
        direction: name.into(),
        hops,
        segments,
        profiler_programs: a.programs,
        end_to_end: a.end_to_end,
        complete_packets: a.complete,
        incomplete_packets: a.incomplete,
        missing_hops: a
            .missing
            .into_iter()
            .map(|(hop, packets)| MissingHop { hop, packets })
            .collect(),
        other_paths: Vec::new(),
    }
}

fn segment_reports(
    keys: &[HopKey],
    hops: &[Hop],
    stats: Vec<Stats>,
    lab: &Devices,
) -> Vec<SegmentReport> {
    path::segments(keys, hops, lab)
        .into_iter()
        .zip(stats)
        .enumerate()
        .map(|(i, (named, stats))| SegmentReport {
            name: named.name,
            from: i,
            to: i + 1,
            userspace: named.userspace,
            estimated: named.estimated,
            stats,
        })
        .collect()
}

fn drop_report(
    drops: &[Event],
    devices: &Devices,
    inodes: &Inodes,
    reasons: &DropReasons,
) -> Vec<DropReport> {
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for d in drops {
        let reason = reasons.name(d.drop_reason);
        // An ifindex names a device only within its namespace.
        let ifname = devices
            .interfaces
            .iter()
            .find(|i| i.ifindex == d.ifindex && inodes.get(&i.netns) == d.netns)
            .map_or(format!("ifindex {}", d.ifindex), |i| i.ifname.clone());
        *counts.entry((reason, ifname)).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|((reason, ifname), packets)| DropReport {
            reason,
            ifname,
            packets,
        })
        .collect()
}

/// Properties of attribution, checked on what real runs collected (tests/fixtures, written by
/// `run --save-events`): a clock shifted as a whole changes nothing, a hold at one hop lands
/// in the segment that ends there and nowhere else, a lost hop makes its packet incomplete,
/// and a drop is named by its reason and device.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use profiler_common::{HookId, DIR_REQUEST};
    use proptest::prelude::*;

    use super::*;
    use crate::run::traffic::Stamp;

    /// Request/response on bridge and across hosts on flannel-vxlan, all-to-all, and a nested
    /// path (bmp2vmp: a pod in a 6.1 guest, its agent's part on the guest's clock).
    const FIXTURES: [&str; 4] = [
        include_str!("../../../tests/fixtures/events-bridge.json"),
        include_str!("../../../tests/fixtures/events-flannel-vxlan.json"),
        include_str!("../../../tests/fixtures/events-alltoall.json"),
        include_str!("../../../tests/fixtures/events-bmp2vmp.json"),
    ];
    const NESTED: usize = 3;

    fn fixture(i: usize) -> Collected {
        Collected::parse(FIXTURES[i]).expect("a fixture written by run --save-events")
    }

    fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
        serde_json::to_value(v).expect("a report as JSON")
    }

    fn stamps_mut(c: &mut Collected) -> &mut Vec<Stamp> {
        match &mut c.driven {
            Driven::Rr(o) => &mut o.stamps,
            Driven::Stream(_, o) => &mut o.stamps,
            Driven::Alltoall(_, o) => &mut o.stamps,
        }
    }

    /// Each request's events, their indexes in `c.events` in time order, by packet.
    fn requests(c: &Collected) -> BTreeMap<u32, Vec<usize>> {
        let mut by_seq: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, e) in c.events.iter().enumerate() {
            if e.2 == DIR_REQUEST {
                by_seq.entry(e.1).or_default().push(i);
            }
        }
        for events in by_seq.values_mut() {
            events.sort_by_key(|&i| c.events[i].0);
        }
        by_seq
    }

    /// Where two reports differ, by JSON path: a readable failure for reports this long.
    fn differences(a: &serde_json::Value, b: &serde_json::Value, at: &str) -> Vec<String> {
        use serde_json::Value::{Array, Object};
        match (a, b) {
            (Object(x), Object(y)) => x
                .keys()
                .chain(y.keys().filter(|k| !x.contains_key(*k)))
                .flat_map(|k| {
                    let (u, v) = (&x.get(k), &y.get(k));
                    match (u, v) {
                        (Some(u), Some(v)) => differences(u, v, &format!("{at}.{k}")),
                        _ => vec![format!("{at}.{k}: {u:?} / {v:?}")],
                    }
                })
                .collect(),
            (Array(x), Array(y)) if x.len() == y.len() => x
                .iter()
                .zip(y)
                .enumerate()
                .flat_map(|(i, (u, v))| differences(u, v, &format!("{at}[{i}]")))
                .collect(),
            _ if a == b => Vec::new(),
            _ => vec![format!("{at}: {a} / {b}")],
        }
    }

    #[test]
    fn the_fixtures_are_whole_journeys() {
        for i in 0..FIXTURES.len() {
            let r = attribute(&fixture(i));
            assert!(!r.directions.is_empty(), "fixture {i}");
            for d in &r.directions {
                assert!(d.complete_packets > 0, "fixture {i} {}", d.direction);
                assert_eq!(d.incomplete_packets, 0, "fixture {i} {}", d.direction);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn a_clock_shifted_as_a_whole_changes_nothing(shift in 1u64..1 << 40, i in 0..3usize) {
            let mut c = fixture(i);
            let before = json(&attribute(&c));
            for e in &mut c.events {
                e.0 += shift;
            }
            for s in stamps_mut(&mut c) {
                s.send_ns += shift;
                s.recv_ns += shift;
            }
            prop_assert_eq!(json(&attribute(&c)), before);
        }

        /// The busy-wait injector's ground truth, on paper: every request held `hold` ns just
        /// before hop `at` of its path grows that hop's incoming segment by exactly `hold`.
        #[test]
        fn a_hold_before_one_hop_lands_in_the_segment_ending_there(
            at in 0.0..1.0f64,
            hold in 1u64..1_000_000,
            i in 0..2usize,
        ) {
            let mut c = fixture(i);
            let before = attribute(&c);
            let by_seq = requests(&c);
            let hops = before.directions[0].hops.len();
            // Segment s ends at hop s + 1: the event of rank s, or the receiving app's stamp.
            let s = (at * (hops - 1) as f64) as usize;
            for (seq, events) in &by_seq {
                prop_assert_eq!(events.len(), hops - 2, "packet {} has a hop twice", seq);
                for &e in &events[s.min(events.len())..] {
                    c.events[e].0 += hold;
                }
            }
            for st in stamps_mut(&mut c).iter_mut().filter(|st| st.direction == DIR_REQUEST) {
                st.recv_ns += hold;
            }
            let after = attribute(&c);
            let (b, a) = (&before.directions[0], &after.directions[0]);
            prop_assert_eq!(a.complete_packets, b.complete_packets);
            for (k, (sa, sb)) in a.segments.iter().zip(&b.segments).enumerate() {
                let grown = sa.stats.mean_ns - sb.stats.mean_ns;
                let want = if k == s { hold as f64 } else { 0.0 };
                prop_assert!((grown - want).abs() < 1e-3, "segment {} grew {} ns, not {}", k, grown, want);
            }
            let e2e = a.end_to_end.mean_ns - b.end_to_end.mean_ns;
            prop_assert!((e2e - hold as f64).abs() < 1e-3, "end to end grew {}", e2e);
            prop_assert_eq!(json(&after.directions[1]), json(&before.directions[1]));
        }

        /// A guest's clock set differently (booted earlier or later): its crossing's offset
        /// moves by as much, and nothing else does (its hops land on the host's timeline where
        /// they did).
        #[test]
        fn a_guest_clock_shifted_moves_only_the_offset(shift in -(1i64 << 40)..1 << 40) {
            let mut c = fixture(NESTED);
            // A clock reads no time before its boot: the guest's earliest stays at 0 or later.
            let earliest = c.guests.iter().flat_map(|g| g.done.events.iter().map(|e| e.0)).min();
            prop_assume!(earliest.is_some_and(|t| t as i64 + shift >= 0));
            let before = attribute(&c);
            let moved = |t: &mut u64| *t = t.wrapping_add_signed(shift);
            for g in &mut c.guests {
                g.done.events.iter_mut().for_each(|e| moved(&mut e.0));
                for (_, recv, send) in &mut g.done.stamps {
                    moved(recv);
                    moved(send);
                }
                for (_, sent, recv) in g.client.iter_mut().flatten() {
                    moved(sent);
                    moved(recv);
                }
            }
            let mut after = attribute(&c);
            // A drift is a slope of the offsets: the same, to a float's last bits.
            let same = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
            for (x, b) in after.crossings.iter_mut().zip(&before.crossings) {
                x.offset_ns -= shift;
                x.offset_p10_p90_ns.0 -= shift;
                x.offset_p10_p90_ns.1 -= shift;
                prop_assert!(same(x.drift_ppm, b.drift_ppm), "drift {} / {}", x.drift_ppm, b.drift_ppm);
                x.drift_ppm = b.drift_ppm;
                if let (Some(xb), Some(bb)) = (&mut x.bounds, &b.bounds) {
                    xb.offset_ns.0 -= shift;
                    xb.offset_ns.1 -= shift;
                    prop_assert!(same(xb.drift_ppm.0, bb.drift_ppm.0) && same(xb.drift_ppm.1, bb.drift_ppm.1));
                    xb.drift_ppm = bb.drift_ppm;
                }
            }
            let differ = differences(&json(&after), &json(&before), "");
            prop_assert!(differ.is_empty(), "{:?}", differ);
        }

        /// A hop event lost: its packet is incomplete, missing that hop; the others unchanged.
        #[test]
        fn a_lost_hop_makes_its_packet_incomplete(pick in any::<prop::sample::Index>(), i in 0..2usize) {
            let mut c = fixture(i);
            let before = attribute(&c);
            let by_seq = requests(&c);
            let events: Vec<(usize, usize)> = by_seq
                .values()
                .flat_map(|e| e.iter().enumerate().map(|(rank, &i)| (i, rank)))
                .collect();
            let (lost, rank) = *pick.get(&events);
            c.events.remove(lost);
            let after = attribute(&c);
            let (b, a) = (&before.directions[0], &after.directions[0]);
            prop_assert_eq!(a.complete_packets, b.complete_packets - 1);
            prop_assert_eq!(a.incomplete_packets, 1);
            prop_assert_eq!(json(&a.missing_hops), json(&[MissingHop { hop: rank + 1, packets: 1 }]));
            prop_assert_eq!(after.events.incomplete_packets, 1);
            prop_assert_eq!(json(&after.directions[1]), json(&before.directions[1]));
        }

        /// A drop is reported under its reason's name and its device's.
        #[test]
        fn a_drop_is_named_by_reason_and_device(
            reason in any::<prop::sample::Index>(),
            device in any::<prop::sample::Index>(),
        ) {
            let mut c = fixture(0);
            let reasons: Vec<(u32, String)> = c.drop_reasons.clone().into_iter().collect();
            let (number, name) = reason.get(&reasons).clone();
            let iface = device.get(&c.devices.interfaces).clone();
            let netns = c.inodes[&iface.netns];
            // A packet no hop saw: no transmit of it can explain the drop away.
            let drop = (1u64 << 40, 1_000_000, DIR_REQUEST, iface.ifindex, netns, 100, number, HookId::KfreeSkb as u8, 0, 0);
            c.events.push(drop);
            let r = attribute(&c);
            prop_assert_eq!(
                json(&r.events.drops),
                json(&[DropReport { reason: name, ifname: iface.ifname, packets: 1 }])
            );
        }
    }
}
