//! A guest's part of a run put on the host's timeline: its namespaces keyed apart from the
//! host's, its clock estimated per exchange (crossing.rs), its transmit returns set apart.

use std::collections::HashMap;

use profiler_common::{Event, HookId, DIR_REQUEST};

use super::Done;
use crate::run::{
    crossing::{self, Collect, Estimate},
    record::from_wire,
    traffic,
};
use crate::{datapath::path::Inodes, lab::nested, report::schema::CrossingReport};

/// The guest's namespaces as the run keys hops: ids that no host namespace inode can be
/// (inodes are above 2^28), one range per guest, inserted into `inodes` by their host names.
fn guest_ids(node: &str, index: u32, namespaces: &[String], ids: &mut Inodes) -> Vec<u32> {
    namespaces
        .iter()
        .enumerate()
        .map(|(k, ns)| {
            let id = ((index + 1) << 16) + k as u32 + 1;
            ids.insert(nested::guest_ns(node, ns), id);
            id
        })
        .collect()
}

/// Whether `e` is on the side where its packet leaves the kernel toward the other (the request
/// on the exchange's originator, the response on its responder).
fn leaving(e: &Event, originator: bool) -> bool {
    (e.direction == DIR_REQUEST) == originator
}

/// A transmit's return: the end of a (nested) transmit's unwinding, not packet movement. Under
/// TCG the guest's comes after QEMU has handed the packet to the host, which may already have
/// delivered it.
fn unwinding(e: &Event) -> bool {
    e.hook == HookId::NetDevXmit as u8
}

/// One guest's part of a run, as its agent handed it over (a run's collection keeps it so).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct GuestPart {
    pub node: String,
    /// Its place among the run's guests (its namespaces' ids depend on it).
    pub index: u32,
    pub done: Done,
    /// Its namespaces with their inodes in its kernel.
    pub namespaces: Vec<(String, u32)>,
    /// Its client's (seq, sent, received) stamps when its pod sent the requests: it is then
    /// the exchanges' originator (t1, t4 on its side), else the responder.
    pub client: Option<Vec<(u32, u64, u64)>>,
}

/// A guest's part on the host's timeline.
pub struct Merged {
    pub events: Vec<Event>,
    /// Its client's stamps, if it ran the client.
    pub client: Vec<(u32, u64, u64)>,
    /// Its server's (seq, received, sent) stamps, if it ran the server.
    pub server: Vec<(u32, u64, u64)>,
    pub report: CrossingReport,
}

/// Puts a guest's events and stamps on the host's timeline: estimates the guest clock per
/// exchange (crossing.rs) from the host's events (`host_events`, the host's alone) and client
/// stamps (`host_client`, when the host ran the client) and the guest's. Drops from
/// `host_events` the returns of transmits that handed a packet to the guest.
pub fn merge(
    part: &GuestPart,
    host_events: &mut Vec<Event>,
    host_client: &[traffic::Stamp],
    inodes: &mut Inodes,
) -> Merged {
    let guest_side = part.client.is_some();
    let host_side = !guest_side;
    let mut c = Collect::default();
    let mut add = |originator: bool, seq, request, ts| match originator {
        true => c.originator(seq, request, ts),
        false => c.responder(seq, request, ts),
    };
    let hops = |e: &&Event, originator| !(leaving(e, originator) && unwinding(e));
    for e in host_events.iter().filter(|e| hops(e, host_side)) {
        add(host_side, e.seq, e.direction == DIR_REQUEST, e.ts_ns);
    }
    for s in host_client {
        let request = s.direction == DIR_REQUEST;
        add(
            true,
            s.seq,
            request,
            if request { s.send_ns } else { s.recv_ns },
        );
    }
    let mut guest: Vec<Event> = part.done.events.iter().map(from_wire).collect();
    for e in guest.iter().filter(|e| hops(e, guest_side)) {
        add(guest_side, e.seq, e.direction == DIR_REQUEST, e.ts_ns);
    }
    for &(seq, recv, send) in &part.done.stamps {
        add(false, seq, true, recv);
        add(false, seq, false, send);
    }
    for &(seq, sent, recv) in part.client.iter().flatten() {
        add(true, seq, true, sent);
        add(true, seq, false, recv);
    }
    let exchanges = c.complete();
    // The returns of the transmits that handed the packet over, once it was in the other
    // kernel: not where the packet is.
    let handed_over = |e: &Event, originator: bool| {
        let last = |x: &crossing::Exchange| if originator { x.t1 } else { x.t3 };
        leaving(e, originator)
            && unwinding(e)
            && exchanges.get(&e.seq).is_some_and(|x| e.ts_ns > last(x))
    };
    host_events.retain(|e| !handed_over(e, host_side));
    guest.retain(|e| !handed_over(e, guest_side));
    let est = Estimate::of(&part.node, &exchanges, guest_side);
    let names: Vec<String> = part.namespaces.iter().map(|(n, _)| n.clone()).collect();
    let ids = guest_ids(&part.node, part.index, &names, inodes);
    let by_inode: HashMap<u32, u32> = part
        .namespaces
        .iter()
        .zip(ids)
        .map(|((_, inode), id)| (*inode, id))
        .collect();
    let on_host = |stamps: &[(u32, u64, u64)]| -> Vec<(u32, u64, u64)> {
        let at = |seq, ts| est.to_host(seq, ts);
        stamps
            .iter()
            .map(|&(s, a, b)| (s, at(s, a), at(s, b)))
            .collect()
    };
    Merged {
        events: guest
            .into_iter()
            .map(|e| Event {
                ts_ns: est.to_host(e.seq, e.ts_ns),
                netns: by_inode.get(&e.netns).copied().unwrap_or(0),
                ..e
            })
            .collect(),
        client: on_host(part.client.as_deref().unwrap_or_default()),
        server: on_host(&part.done.stamps),
        report: est.report,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{kernel::btf::DropReasons, run::record::to_wire};

    fn ev(seq: u32, direction: u32, hook: HookId, ts_ns: u64) -> Event {
        Event {
            ts_ns,
            seq,
            direction,
            hook: hook as u8,
            ..Event::default()
        }
    }

    /// The host hands the request over at 1000 and unwinds until 1500 (a late return); the
    /// guest (clock 10^6 ahead) has it at 1_001_200 and hands the response over at 1_001_400,
    /// unwinding until 1_002_000, after the host got it at 1800. The returns after the hand-over
    /// are left out, and each crossing gets half of (1800 - 1000) - (1400 - 1200) = 600.
    #[test]
    fn transmit_returns_after_the_hand_over_are_no_hops() {
        use profiler_common::DIR_RESPONSE;
        use HookId::*;
        let mut events = vec![
            ev(1, DIR_REQUEST, NetDevStartXmit, 1000),
            ev(1, DIR_REQUEST, NetDevXmit, 1500),
            ev(1, DIR_RESPONSE, NetifReceiveSkb, 1800),
            ev(1, DIR_RESPONSE, NetDevXmit, 1900),
        ];
        let done = Done {
            run_id: 1,
            events: [
                ev(1, DIR_REQUEST, NapiGroReceiveEntry, 1_001_200),
                ev(1, DIR_RESPONSE, NetDevStartXmit, 1_001_400),
                ev(1, DIR_RESPONSE, NetDevXmit, 1_002_000),
            ]
            .iter()
            .map(to_wire)
            .collect(),
            stamps: Vec::new(),
            lost: 0,
            unreadable: 0,
            drop_reasons: Vec::new(),
        };
        let mut inodes = Inodes::default();
        let part = GuestPart {
            node: "vm1".into(),
            index: 0,
            done,
            namespaces: Vec::new(),
            client: None,
        };
        let merged = merge(&part, &mut events, &[], &mut inodes);
        let report = merged.report;
        events.extend(merged.events);
        let mut ts: Vec<(u32, u8, u64)> = events
            .iter()
            .map(|e| (e.direction, e.hook, e.ts_ns))
            .collect();
        ts.sort_by_key(|t| t.2);
        assert_eq!(
            ts,
            [
                (DIR_REQUEST, NetDevStartXmit as u8, 1000),
                (DIR_REQUEST, NapiGroReceiveEntry as u8, 1300),
                (DIR_RESPONSE, NetDevStartXmit as u8, 1500),
                (DIR_RESPONSE, NetifReceiveSkb as u8, 1800),
                (DIR_RESPONSE, NetDevXmit as u8, 1900),
            ]
        );
        assert_eq!(report.offset_ns, 1_000_000 - 100);
        assert_eq!(report.crossing_sum.mean_ns, 600.0);
    }

    fn done(events: &[Event], stamps: Vec<(u32, u64, u64)>) -> Done {
        Done {
            run_id: 1,
            events: events.iter().map(to_wire).collect(),
            stamps,
            lost: 0,
            unreadable: 0,
            drop_reasons: Vec::new(),
        }
    }

    /// VMP2VMP: vm1 (clock 10^6 ahead) sends the request through the host to vm2 (clock
    /// 2 * 10^6 ahead), each crossing taking 200 ns both ways. vm1 is the originator of its
    /// exchanges with the host, the host of its with vm2: both guests' events, the client's
    /// and the server's stamps land at their true host times.
    #[test]
    fn two_guests_each_side_of_the_host_land_on_its_timeline() {
        use profiler_common::DIR_RESPONSE;
        use HookId::*;
        let (vm1, vm2) = (1_000_000, 2_000_000);
        let mut events = vec![
            ev(1, DIR_REQUEST, NetifReceiveSkb, 1200),
            ev(1, DIR_REQUEST, NetDevStartXmit, 1300),
            ev(1, DIR_RESPONSE, NetifReceiveSkb, 2000),
            ev(1, DIR_RESPONSE, NetDevStartXmit, 2100),
        ];
        let first = done(
            &[
                ev(1, DIR_REQUEST, NetDevStartXmit, vm1 + 1000),
                ev(1, DIR_RESPONSE, NapiGroReceiveEntry, vm1 + 2300),
            ],
            Vec::new(),
        );
        let second = done(
            &[
                ev(1, DIR_REQUEST, NapiGroReceiveEntry, vm2 + 1500),
                ev(1, DIR_RESPONSE, NetDevStartXmit, vm2 + 1800),
            ],
            vec![(1, vm2 + 1600, vm2 + 1700)],
        );
        let mut inodes = Inodes::default();
        let one = merge(
            &GuestPart {
                node: "vm1".into(),
                index: 0,
                done: first,
                namespaces: Vec::new(),
                client: Some(vec![(1, vm1 + 900, vm1 + 2400)]),
            },
            &mut events,
            &[],
            &mut inodes,
        );
        let two = merge(
            &GuestPart {
                node: "vm2".into(),
                index: 1,
                done: second,
                namespaces: Vec::new(),
                client: None,
            },
            &mut events,
            &[],
            &mut inodes,
        );
        assert_eq!(one.report.offset_ns, vm1 as i64);
        assert_eq!(two.report.offset_ns, vm2 as i64);
        assert_eq!(one.client, [(1, 900, 2400)]);
        assert_eq!(two.server, [(1, 1600, 1700)]);
        events.extend(one.events.into_iter().chain(two.events));
        let mut ts: Vec<u64> = events.iter().map(|e| e.ts_ns).collect();
        ts.sort_unstable();
        assert_eq!(ts, [1000, 1200, 1300, 1500, 1800, 2000, 2100, 2300]);
    }

    /// A 6.1 guest's "not_specified" (1) is the host's 2 on 6.18: renumbered by name; a
    /// reason the host does not name, and events that are no drops, keep their numbers.
    #[test]
    fn guest_drop_reasons_are_renumbered_by_name() {
        let drop = |reason| Event {
            hook: HookId::KfreeSkb as u8,
            drop_reason: reason,
            ..Event::default()
        };
        let other = Event {
            hook: HookId::NetifRx as u8,
            drop_reason: 1,
            ..Event::default()
        };
        let mut d = done(&[drop(1), drop(40), other], Vec::new());
        d.drop_reasons = vec![(1, "not_specified".into()), (40, "guest_only".into())];
        let host = DropReasons::named([(2, "not_specified"), (1, "consumed")]);
        d.renumber_drops(&host);
        let reasons: Vec<u32> = d.events.iter().map(|e| e.6).collect();
        assert_eq!(reasons, [2, 40, 1]);
    }
}
