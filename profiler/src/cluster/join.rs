//! One packet seen by two nodes: where it left one node's device and where it entered the
//! next's, recognised by what it carries on the wire, with no tag and no kernel patch.
//!
//! A packet's wire identity is what both kernels read the same: the outer and the inner IPv4
//! headers' addresses, protocol and IP ID, the inner transport's ports (ICMP's type, code
//! and checksum), the TCP sequence number, and a hash of the first payload bytes. Two packets of
//! one flow rarely share all of it, but they can: a retransmission, unconnected UDP with DF
//! (its IP ID is 0), a repeated payload. Such an identity is ambiguous and its packets are
//! counted, never paired by guess. A packet seen leaving with no arrival (dropped between,
//! sampled out on the other node, or not yet read) is counted too.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::clock::{Clocks, Fit};

/// The transport part of an identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    pub proto: u8,
    /// Source and destination port; ICMP's type and code, and its checksum.
    pub sport: u16,
    pub dport: u16,
    pub ip_id: u16,
}

/// What a packet carries that both nodes read alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct WireId {
    pub outer: Flow,
    /// The encapsulated packet (VXLAN, Geneve, GRE), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner: Option<Flow>,
    pub tcp_seq: u32,
    /// A hash of the first bytes of the innermost payload.
    pub payload: u32,
}

/// A packet at a node's wire-facing device: leaving it toward the other node, or entering.
#[derive(Clone, Debug, PartialEq)]
pub struct Sighting {
    pub id: WireId,
    /// On the node's own clock.
    pub ts: u64,
    /// Which journey of that node the packet was on (the node's own numbering).
    pub journey: u64,
    /// Where it was seen: a device of that node, in the node's own numbering.
    pub at: u64,
}

/// A packet seen leaving A and entering B.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub left: Sighting,
    pub entered: Sighting,
}

/// What joining two nodes' sightings gave.
#[derive(Debug, Default, PartialEq)]
pub struct Joined {
    pub pairs: Vec<Pair>,
    /// Sightings whose identity more than one packet had on either side.
    pub ambiguous: u64,
    /// Left A, never seen entering B.
    pub unmatched_leaving: u64,
    /// Entered B, never seen leaving A.
    pub unmatched_entering: u64,
}

/// Pairs the packets that left A (`leaving`) with those that entered B (`entering`) by their
/// wire identity: a pair only where each side saw that identity exactly once.
pub fn join(leaving: Vec<Sighting>, entering: Vec<Sighting>) -> Joined {
    let mut by_id: HashMap<WireId, (Vec<Sighting>, Vec<Sighting>)> = HashMap::new();
    for s in leaving {
        by_id.entry(s.id).or_default().0.push(s);
    }
    for s in entering {
        by_id.entry(s.id).or_default().1.push(s);
    }
    let mut out = Joined::default();
    for (_, (mut left, mut entered)) in by_id {
        match (left.len(), entered.len()) {
            (1, 1) => out.pairs.push(Pair {
                left: left.pop().unwrap(),
                entered: entered.pop().unwrap(),
            }),
            (l, 0) if l <= 1 => out.unmatched_leaving += l as u64,
            (0, e) if e <= 1 => out.unmatched_entering += e as u64,
            (l, e) => out.ambiguous += (l + e) as u64,
        }
    }
    out.pairs.sort_by_key(|p| p.left.ts);
    out
}

/// Two nodes' clocks from the pairs of both directions: `a_to_b` left A and entered B,
/// `b_to_a` the other way.
pub fn clocks(a_to_b: &[Pair], b_to_a: &[Pair]) -> Clocks {
    let mut clocks = Clocks::default();
    for p in a_to_b {
        clocks.a_to_b(p.left.ts, p.entered.ts);
    }
    for p in b_to_a {
        clocks.b_to_a(p.left.ts, p.entered.ts);
    }
    clocks
}

/// A pair's time on the wire (from leaving A to entering B) on A's clock, with its bound; the
/// lower end is never below zero, since a packet cannot arrive before it left.
pub fn on_the_wire(p: &Pair, fit: &Fit) -> (i64, u64) {
    let entered = fit.to_a(p.entered.ts);
    within(entered.lo - p.left.ts as i64, entered.hi - p.left.ts as i64)
}

/// The same for a pair that left B and entered A.
pub fn on_the_wire_back(p: &Pair, fit: &Fit) -> (i64, u64) {
    let left = fit.to_a(p.left.ts);
    let entered = p.entered.ts as i64;
    within(entered - left.hi, entered - left.lo)
}

/// The middle of [lo, hi] with half its width, lo raised to zero.
fn within(lo: i64, hi: i64) -> (i64, u64) {
    let lo = lo.max(0);
    let hi = hi.max(lo);
    (lo + (hi - lo) / 2, ((hi - lo) / 2) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u32, payload: u32) -> WireId {
        WireId {
            outer: Flow {
                saddr: 0xc613_0002,
                daddr: 0xc613_0003,
                proto: 17,
                sport: 40_000,
                dport: 4789,
                ip_id: seq as u16,
            },
            inner: Some(Flow {
                saddr: 0xc612_0102,
                daddr: 0xc612_0202,
                proto: 6,
                sport: 5201,
                dport: 33_000,
                ip_id: 0,
            }),
            tcp_seq: seq * 1448,
            payload,
        }
    }

    fn seen(id: WireId, ts: u64, journey: u64) -> Sighting {
        Sighting {
            id,
            ts,
            journey,
            at: 0,
        }
    }

    #[test]
    fn packets_pair_by_what_they_carry_and_doubtful_ones_are_counted() {
        let b = |t: u64| t + 3_600_000_000_000; // B's clock, an hour ahead
        let mut leaving: Vec<Sighting> = (0..100u64)
            .map(|i| seen(id(i as u32, 7), i * 1000, i))
            .collect();
        let mut entering: Vec<Sighting> = (0..100u64)
            .map(|i| seen(id(i as u32, 7), b(i * 1000 + 60), 1000 + i))
            .collect();
        // A retransmission of packet 5: one identity, twice each side.
        leaving.push(seen(id(5, 7), 200_000, 500));
        entering.push(seen(id(5, 7), b(200_060), 1500));
        // Packet 100 left and was not seen entering; 101 entered from elsewhere.
        leaving.push(seen(id(100, 7), 300_000, 100));
        entering.push(seen(id(101, 9), b(300_060), 1101));
        let joined = join(leaving, entering);
        assert_eq!(joined.pairs.len(), 99);
        assert_eq!(joined.ambiguous, 4);
        assert_eq!(
            (joined.unmatched_leaving, joined.unmatched_entering),
            (1, 1)
        );
        for p in &joined.pairs {
            assert_eq!(p.left.id, p.entered.id);
            assert_eq!(p.entered.journey, p.left.journey + 1000);
        }
        // One payload hash apart is another packet.
        let apart = join(vec![seen(id(1, 7), 0, 0)], vec![seen(id(1, 8), 0, 0)]);
        assert!(apart.pairs.is_empty());
    }

    /// Joined pairs both ways relate the clocks, and each pair's time on the wire is recovered
    /// within its bound although B's clock is an hour off and drifts.
    #[test]
    fn joined_pairs_give_the_wire_time_within_its_bound() {
        let b = |t: u64| (t as f64 * (1.0 + 50e-6)) as u64 + 3_600_000_000_000;
        let wire = |i: u64| 30_000 + (i * 7919) % 20_000; // 30 to 50 us
        let mut ab = (Vec::new(), Vec::new());
        let mut ba = (Vec::new(), Vec::new());
        for i in 0..2000u64 {
            let t = i * 5_000_000;
            ab.0.push(seen(id(i as u32, 1), t, i));
            ab.1.push(seen(id(i as u32, 1), b(t + wire(i)), i));
            let t = t + 2_000_000;
            ba.0.push(seen(id(i as u32, 2), b(t), i));
            ba.1.push(seen(id(i as u32, 2), t + wire(i + 1), i));
        }
        let (ab, ba) = (join(ab.0, ab.1), join(ba.0, ba.1));
        assert_eq!((ab.pairs.len(), ba.pairs.len()), (2000, 2000));
        let clocks = clocks(&ab.pairs, &ba.pairs);
        let fit = clocks.fit(0, 10_000_000_000).expect("a fit");
        for (i, p) in ab.pairs.iter().enumerate() {
            let (estimate, bound) = on_the_wire(p, &fit);
            let truth = wire(i as u64) as i64;
            assert!(
                (estimate - truth).unsigned_abs() <= bound,
                "pair {i}: {estimate} +- {bound}, truth {truth}"
            );
            assert!(bound <= 40_000, "pair {i}: bound {bound}");
        }
        for (i, p) in ba.pairs.iter().enumerate() {
            let (estimate, bound) = on_the_wire_back(p, &fit);
            let truth = wire(i as u64 + 1) as i64;
            assert!(
                (estimate - truth).unsigned_abs() <= bound,
                "back pair {i}: {estimate} +- {bound}, truth {truth}"
            );
            assert!(bound <= 40_000, "back pair {i}: bound {bound}");
        }
    }
}
