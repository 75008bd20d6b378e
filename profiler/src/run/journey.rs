//! Rebuilds each tagged packet's journey from kernel events and application stamps, checks it
//! against the path the topology predicts, and attributes the time between consecutive hops to
//! the segment between them.

use std::collections::{BTreeMap, HashMap, HashSet};

use hdrhistogram::Histogram;
use profiler_common::{Event, HookId, FLAG_FRAGMENT, HOOK_UPROBE};

use super::traffic::Stamp;
use crate::{
    datapath::{HopKey, Point},
    report::schema::Stats,
};

/// One observation of one packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub seq: u32,
    pub direction: u32,
    pub ts_ns: u64,
    /// The profiler's own time at this hop (the program's run before it submitted the event).
    pub cost_ns: u64,
    pub hop: HopKey,
    /// Event flags (FLAG_ENCAP, tunnel kind...): how the hop saw the packet.
    pub flags: u8,
}

/// Kernel events sorted for attribution.
#[derive(Debug, Default)]
pub struct Sorted {
    pub observations: Vec<Observation>,
    pub drops: Vec<Event>,
    /// Events of later IPv4 fragments of tagged datagrams: counted, not hops.
    pub fragments: u64,
}

/// Turns kernel events into observations; drops and fragments are set apart. `app_netns` is
/// the [client, server] namespace of ping-pong's stamps: requests go from the client.
pub fn observations(events: &[Event], stamps: &[Stamp], app_netns: [u32; 2]) -> Sorted {
    observations_by(events, stamps, |s| {
        if s.direction == 0 {
            (app_netns[0], app_netns[1])
        } else {
            (app_netns[1], app_netns[0])
        }
    })
}

/// Takes out of `drops` a driver's frees of packets it transmitted: `kfree_skb` without a
/// reason (`unspecified`: this kernel's number for it) on the device whose transmit had
/// returned for that packet before. A driver that completes transmits with
/// dev_kfree_skb_any in hard irq (igbvf on 6.1) has them reported by net_tx_action that way,
/// though nothing was lost (a packet that does not arrive is counted incomplete all the same).
/// Returns how many it took out.
pub fn drop_transmit_frees(drops: &mut Vec<Event>, events: &[Event], unspecified: u32) -> usize {
    let device = |e: &Event| (e.seq, e.direction, e.ifindex, e.netns);
    let transmitted: HashMap<_, u64> = events
        .iter()
        .filter(|e| e.hook == HookId::NetDevXmit as u8)
        .fold(HashMap::new(), |mut m, e| {
            let first = m.entry(device(e)).or_insert(e.ts_ns);
            *first = (*first).min(e.ts_ns);
            m
        });
    let before = drops.len();
    drops.retain(|d| {
        d.drop_reason != unspecified
            || transmitted
                .get(&device(d))
                .is_none_or(|&xmit| xmit > d.ts_ns)
    });
    before - drops.len()
}

/// [`observations`] with each stamp's (sending, receiving) namespace given by `ends`.
pub fn observations_by(
    events: &[Event],
    stamps: &[Stamp],
    ends: impl Fn(&Stamp) -> (u32, u32),
) -> Sorted {
    let mut out = Sorted {
        observations: Vec::with_capacity(events.len() + stamps.len()),
        ..Default::default()
    };
    for ev in events {
        if ev.hook == HOOK_UPROBE {
            // A user probe: its index rides in ifindex; it has no device.
            out.observations.push(Observation {
                seq: ev.seq,
                direction: ev.direction,
                ts_ns: ev.ts_ns,
                cost_ns: ev.cost_ns as u64,
                hop: HopKey {
                    point: Point::Uprobe(ev.ifindex),
                    netns: 0,
                    ifindex: 0,
                },
                flags: ev.flags,
            });
            continue;
        }
        let Some(hook) = HookId::from_u8(ev.hook) else {
            continue;
        };
        if ev.flags & FLAG_FRAGMENT != 0 {
            out.fragments += 1;
            continue;
        }
        if hook == HookId::KfreeSkb {
            out.drops.push(*ev);
            continue;
        }
        let hop = HopKey {
            point: Point::Hook(hook),
            netns: ev.netns,
            ifindex: ev.ifindex,
        };
        out.observations.push(Observation {
            seq: ev.seq,
            direction: ev.direction,
            ts_ns: ev.ts_ns,
            cost_ns: ev.cost_ns as u64,
            hop,
            flags: ev.flags,
        });
    }
    for s in stamps {
        let (from, to) = ends(s);
        let app = |point, netns, ts_ns| Observation {
            seq: s.seq,
            direction: s.direction,
            ts_ns,
            cost_ns: 0,
            hop: HopKey {
                point,
                netns,
                ifindex: 0,
            },
            flags: 0,
        };
        out.observations.push(app(Point::AppSend, from, s.send_ns));
        out.observations.push(app(Point::AppRecv, to, s.recv_ns));
    }
    out
}

/// Each packet's hops of one direction, in time order, a hop counted once (its first time).
fn journeys(obs: &[Observation], direction: u32) -> HashMap<u32, Vec<&Observation>> {
    let mut per_packet: HashMap<u32, Vec<&Observation>> = HashMap::new();
    for o in obs.iter().filter(|o| o.direction == direction) {
        per_packet.entry(o.seq).or_default().push(o);
    }
    for seen in per_packet.values_mut() {
        // Stable: events of one CPU arrive in order, which settles equal timestamps.
        seen.sort_by_key(|o| o.ts_ns);
        let mut unique = HashSet::new();
        seen.retain(|o| unique.insert(o.hop.clone()));
    }
    per_packet
}

/// The path of one direction: the most common hop sequence among packets that went from the
/// application to the application (ties: the longest). Observing the path instead of predicting
/// it makes any topology, or a path the profiler did not build, work the same way.
pub fn modal_path(obs: &[Observation], direction: u32) -> Vec<HopKey> {
    paths(obs, direction)
        .into_iter()
        .next()
        .map(|(keys, _)| keys)
        .unwrap_or_default()
}

/// Every hop sequence packets took from application to application, with how many took it,
/// most common first (ties: the longest). Packets of one flow can differ: the first one of an
/// OVS flow goes up to ovs-vswitchd, the others stay in the kernel.
pub fn paths(obs: &[Observation], direction: u32) -> Vec<(Vec<HopKey>, u64)> {
    let mut counts: HashMap<Vec<HopKey>, u64> = HashMap::new();
    for seen in journeys(obs, direction).into_values() {
        let keys: Vec<HopKey> = seen.iter().map(|o| o.hop.clone()).collect();
        let ends = keys.first().map(|k| &k.point) == Some(&Point::AppSend)
            && keys.last().map(|k| &k.point) == Some(&Point::AppRecv);
        if ends {
            *counts.entry(keys).or_default() += 1;
        }
    }
    let mut paths: Vec<_> = counts.into_iter().collect();
    paths.sort_by(|(a, n), (b, m)| (m, b.len(), b).cmp(&(n, a.len(), a)));
    paths
}

/// The flags each hop of `path` saw most often (how it saw the packet: encapsulated or not).
pub fn hop_flags(obs: &[Observation], direction: u32, path: &[HopKey]) -> Vec<u8> {
    path.iter()
        .map(|k| {
            let mut counts: HashMap<u8, u64> = HashMap::new();
            for o in obs
                .iter()
                .filter(|o| o.direction == direction && &o.hop == k)
            {
                *counts.entry(o.flags).or_default() += 1;
            }
            // Ties go to the lowest flags, so the same events always name a hop the same way.
            counts
                .into_iter()
                .max_by_key(|&(f, n)| (n, std::cmp::Reverse(f)))
                .map_or(0, |(f, _)| f)
        })
        .collect()
}

/// The statistics of a segment's (or the whole journey's) latencies.
pub fn stats_of(values: &[u64]) -> Stats {
    if values.is_empty() {
        return Stats::default();
    }
    // 1 ns to 1 hour at 3 significant digits: percentiles within 0.1%; the mean is exact.
    let mut h =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds");
    for &v in values {
        h.saturating_record(v);
    }
    let sum: u128 = values.iter().map(|&v| v as u128).sum();
    Stats {
        samples: values.len() as u64,
        mean_ns: sum as f64 / values.len() as f64,
        p50_ns: h.value_at_quantile(0.50),
        p90_ns: h.value_at_quantile(0.90),
        p99_ns: h.value_at_quantile(0.99),
        max_ns: h.max(),
    }
}

/// Result of attributing one direction's journeys to the segments of its expected path.
#[derive(Clone, Debug, Default)]
pub struct Attribution {
    /// One entry per segment: from hop k to hop k+1 of the expected path.
    pub segments: Vec<Stats>,
    pub end_to_end: Stats,
    /// The profiler's own programs' time on the path, per packet: with the segments, it makes
    /// up the end-to-end time.
    pub programs: Stats,
    pub complete: u64,
    /// Packets seen at some hop whose journey does not match the expected path.
    pub incomplete: u64,
    /// For incomplete journeys: how often each expected hop was missing.
    pub missing: BTreeMap<usize, u64>,
    /// Hops observed that the expected path does not have, with their counts.
    pub unexpected: BTreeMap<HopKey, u64>,
    /// For the integration tests: every complete journey had exactly the expected hop order.
    pub out_of_order: u64,
}

/// Attributes the journeys of one direction. `expected` is the predicted hop order.
pub fn attribute(obs: &[Observation], direction: u32, expected: &[HopKey]) -> Attribution {
    let position: HashMap<&HopKey, usize> =
        expected.iter().enumerate().map(|(i, k)| (k, i)).collect();
    let mut out = Attribution::default();
    let mut deltas: Vec<Vec<u64>> = vec![Vec::new(); expected.len().saturating_sub(1)];
    let mut totals = Vec::new();
    let mut probes = Vec::new();
    for (_, seen) in journeys(obs, direction) {
        match timeline(&seen, &position, expected.len(), &mut out) {
            Some(ts) => {
                // A segment starts when the profiler's program at its first hop is done.
                for (k, w) in ts.windows(2).enumerate() {
                    deltas[k].push(w[1].0.saturating_sub(w[0].0 + w[0].1));
                }
                totals.push(ts[ts.len() - 1].0.saturating_sub(ts[0].0));
                probes.push(ts[..ts.len() - 1].iter().map(|t| t.1).sum());
                out.complete += 1;
            }
            None => {
                log::debug!(
                    "incomplete journey dir {direction}: {:?}",
                    seen.iter().map(|o| (o.ts_ns, &o.hop)).collect::<Vec<_>>()
                );
                out.incomplete += 1;
            }
        }
    }
    out.segments = deltas.iter().map(|d| stats_of(d)).collect();
    out.end_to_end = stats_of(&totals);
    out.programs = stats_of(&probes);
    out
}

/// The packet's (timestamp, profiler cost) in expected-path order, or None (recording why) when it is not a
/// complete journey through every expected hop in order.
fn timeline(
    seen: &[&Observation],
    position: &HashMap<&HopKey, usize>,
    hops: usize,
    out: &mut Attribution,
) -> Option<Vec<(u64, u64)>> {
    if hops == 0 {
        // No path was observed: nothing to attribute to.
        return None;
    }
    let mut ts: Vec<Option<(u64, u64)>> = vec![None; hops];
    let mut order = Vec::with_capacity(hops);
    for o in seen {
        match position.get(&o.hop) {
            Some(&i) => {
                ts[i] = Some((o.ts_ns, o.cost_ns));
                order.push(i);
            }
            None => *out.unexpected.entry(o.hop.clone()).or_default() += 1,
        }
    }
    if ts.iter().any(Option::is_none) {
        for (i, t) in ts.iter().enumerate() {
            if t.is_none() {
                *out.missing.entry(i).or_default() += 1;
            }
        }
        return None;
    }
    if order.windows(2).any(|w| w[0] > w[1]) {
        out.out_of_order += 1;
        return None;
    }
    Some(ts.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_large_values_are_not_clamped() {
        let values: Vec<u64> = (1..=1000).map(|i| i * 1_000).collect();
        let s = stats_of(&values);
        assert_eq!(s.samples, 1000);
        assert!((s.p50_ns as f64 - 500_000.0).abs() < 1_000.0, "{s:?}");
        assert!((s.max_ns as f64 - 1_000_000.0).abs() < 1_000.0, "{s:?}");
        assert_eq!(s.mean_ns, 500_500.0);
    }

    fn key(point: Point, ifindex: u32) -> HopKey {
        HopKey {
            point,
            netns: 1,
            ifindex,
        }
    }

    fn path() -> Vec<HopKey> {
        vec![
            key(Point::AppSend, 0),
            key(Point::Hook(HookId::TcEgress), 2),
            key(Point::Hook(HookId::NetifReceiveSkb), 3),
            key(Point::AppRecv, 0),
        ]
    }

    fn packet(seq: u32, times: &[u64]) -> Vec<Observation> {
        path()
            .into_iter()
            .zip(times)
            .map(|(hop, &ts_ns)| Observation {
                seq,
                direction: 0,
                ts_ns,
                cost_ns: 0,
                hop,
                flags: 0,
            })
            .collect()
    }

    #[test]
    fn every_path_is_counted_most_common_first() {
        let mut obs = packet(0, &[100, 110, 130, 160]);
        obs.extend(packet(1, &[200, 220, 230, 300]));
        // Packet 2 took a detour (an OVS upcall) between the kernel hops.
        let detour = key(Point::Hook(HookId::OvsDpUpcall), 2);
        obs.extend(packet(2, &[400, 410, 900, 950]));
        obs.push(Observation {
            seq: 2,
            direction: 0,
            ts_ns: 420,
            cost_ns: 0,
            hop: detour.clone(),
            flags: 0,
        });
        let p = paths(&obs, 0);
        let mut other = path();
        other.insert(2, detour);
        assert_eq!(p, vec![(path(), 2), (other.clone(), 1)]);
        assert_eq!(modal_path(&obs, 0), path());
        let a = attribute(&obs, 0, &other);
        assert_eq!(a.complete, 1);
        assert_eq!(a.segments[2].mean_ns, 480.0);
    }

    #[test]
    fn segments_telescope_to_end_to_end() {
        let mut obs = packet(0, &[100, 110, 130, 160]);
        obs.extend(packet(1, &[200, 220, 230, 300]));
        let a = attribute(&obs, 0, &path());
        assert_eq!(a.complete, 2);
        assert_eq!(a.incomplete, 0);
        let means: Vec<f64> = a.segments.iter().map(|s| s.mean_ns).collect();
        assert_eq!(means, vec![15.0, 15.0, 50.0]);
        assert_eq!(a.end_to_end.mean_ns, 80.0);
        assert_eq!(a.end_to_end.max_ns, 100);
        assert_eq!(a.segments[2].p50_ns, 30);
        assert_eq!(a.segments[2].p99_ns, 70);
    }

    #[test]
    fn the_profilers_own_time_is_no_segments() {
        let mut obs = packet(0, &[100, 110, 130, 160]);
        // The programs at the two kernel hops ran 3 and 5 ns before they submitted.
        obs[1].cost_ns = 3;
        obs[2].cost_ns = 5;
        let a = attribute(&obs, 0, &path());
        let means: Vec<f64> = a.segments.iter().map(|s| s.mean_ns).collect();
        assert_eq!(means, vec![10.0, 17.0, 25.0]);
        assert_eq!(a.programs.mean_ns, 8.0);
        assert_eq!(a.end_to_end.mean_ns, 60.0);
    }

    #[test]
    fn out_of_order_events_are_sorted_and_duplicates_keep_the_first() {
        let mut obs = packet(0, &[100, 110, 130, 160]);
        obs.reverse();
        // A retransmission seen again at the tc hop later.
        obs.push(Observation {
            seq: 0,
            direction: 0,
            ts_ns: 150,
            cost_ns: 0,
            hop: key(Point::Hook(HookId::TcEgress), 2),
            flags: 0,
        });
        let a = attribute(&obs, 0, &path());
        assert_eq!(a.complete, 1);
        assert_eq!(a.segments[0].mean_ns, 10.0);
    }

    #[test]
    fn missing_hops_are_counted_not_dropped() {
        let mut obs = packet(0, &[100, 110, 130, 160]);
        obs.retain(|o| o.hop.point != Point::Hook(HookId::NetifReceiveSkb));
        obs.extend(packet(1, &[200, 220, 230, 300]));
        let a = attribute(&obs, 0, &path());
        assert_eq!((a.complete, a.incomplete), (1, 1));
        assert_eq!(a.missing.get(&2), Some(&1));
        assert_eq!(a.segments[0].samples, 1);
    }

    #[test]
    fn hops_in_the_wrong_order_make_a_journey_incomplete() {
        let obs = packet(0, &[100, 140, 130, 160]);
        let a = attribute(&obs, 0, &path());
        assert_eq!((a.complete, a.out_of_order), (0, 1));
    }

    #[test]
    fn unexpected_hops_are_reported() {
        let mut obs = packet(0, &[100, 110, 130, 160]);
        let stray = key(Point::Hook(HookId::NetDevQueue), 9);
        obs.push(Observation {
            seq: 0,
            direction: 0,
            ts_ns: 120,
            cost_ns: 0,
            hop: stray.clone(),
            flags: 0,
        });
        let a = attribute(&obs, 0, &path());
        assert_eq!(a.complete, 1);
        assert_eq!(a.unexpected.get(&stray), Some(&1));
    }

    #[test]
    fn the_modal_sequence_is_the_path() {
        let mut obs = packet(0, &[100, 110, 130, 160]);
        obs.extend(packet(1, &[200, 220, 230, 300]));
        // A third packet missed a hop; one never reached the application.
        let mut partial = packet(2, &[300, 310, 330, 360]);
        partial.remove(2);
        obs.extend(partial);
        obs.extend(packet(3, &[400, 410, 430, 460]).into_iter().take(3));
        assert_eq!(modal_path(&obs, 0), path());
        let a = attribute(&obs, 0, &modal_path(&obs, 0));
        assert_eq!((a.complete, a.incomplete), (2, 2));
        assert_eq!(hop_flags(&obs, 0, &path()), vec![0; 4]);
    }

    #[test]
    fn other_direction_is_ignored() {
        let mut obs = packet(0, &[100, 110, 130, 160]);
        for o in &mut obs {
            o.direction = 1;
        }
        let a = attribute(&obs, 0, &path());
        assert_eq!((a.complete, a.incomplete), (0, 0));
        assert_eq!(a.end_to_end, Stats::default());
    }

    /// The free after the transmit returned on the same device is the driver's; one before
    /// it (inside the transmit), one on another device and one with a reason are drops.
    #[test]
    fn a_drivers_free_after_its_transmit_is_no_drop() {
        let ev = |hook: HookId, ifindex, ts_ns, drop_reason| Event {
            hook: hook as u8,
            seq: 3,
            ifindex,
            netns: 9,
            ts_ns,
            drop_reason,
            ..Default::default()
        };
        let events = [ev(HookId::NetDevXmit, 4, 100, 0)];
        let mut drops = vec![
            ev(HookId::KfreeSkb, 4, 150, 1),
            ev(HookId::KfreeSkb, 4, 90, 1),
            ev(HookId::KfreeSkb, 5, 150, 1),
            ev(HookId::KfreeSkb, 4, 160, 7),
        ];
        assert_eq!(drop_transmit_frees(&mut drops, &events, 1), 1);
        let left: Vec<(u32, u64, u32)> = drops
            .iter()
            .map(|d| (d.ifindex, d.ts_ns, d.drop_reason))
            .collect();
        assert_eq!(left, [(4, 90, 1), (5, 150, 1), (4, 160, 7)]);
    }

    #[test]
    fn observations_split_drops_and_keep_each_hops_namespace() {
        let tc = Event {
            hook: HookId::TcEgress as u8,
            ifindex: 5,
            netns: 77,
            ts_ns: 1,
            ..Default::default()
        };
        let drop = Event {
            hook: HookId::KfreeSkb as u8,
            ifindex: 5,
            drop_reason: 2,
            ..Default::default()
        };
        let stamps = [Stamp {
            seq: 0,
            direction: 1,
            send_ns: 10,
            recv_ns: 20,
        }];
        let frag = Event {
            hook: HookId::NetifRx as u8,
            flags: FLAG_FRAGMENT,
            ..Default::default()
        };
        let sorted = observations(&[tc, drop, frag], &stamps, [1, 2]);
        let (obs, drops) = (&sorted.observations, &sorted.drops);
        assert_eq!((drops.len(), sorted.fragments), (1, 1));
        assert_eq!(obs[0].hop.netns, 77);
        // A response is sent by the server (namespace 2) and received by the client (1).
        assert_eq!(
            obs[1].hop,
            HopKey {
                point: Point::AppSend,
                netns: 2,
                ifindex: 0
            }
        );
        assert_eq!(
            obs[2].hop,
            HopKey {
                point: Point::AppRecv,
                netns: 1,
                ifindex: 0
            }
        );
    }
}
