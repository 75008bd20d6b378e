//! The segments that cross between two kernels (host tap -> guest virtio-net and back), whose
//! ends are stamped by two clocks that nothing synchronises. Neither clock is trusted: for each
//! request/response exchange the originator's t1 (the request's last hop on the side that sends
//! it: the host for a bare-metal client, the guest for a client in the guest) and t4 (the
//! response's first hop there) and the responder's t2 (the request's first hop on the other
//! side) and t3 (the response's last) give the two crossings' sum exactly,
//! (t4 - t1) - (t3 - t2), and, NTP's way, the responder clock's offset
//! ((t2 - t1) + (t3 - t4)) / 2 under the assumption that both crossings take as long; the
//! report gives it as the guest's clock minus the host's either way. Each exchange's guest times are moved onto the host clock with its own offset, so
//! each crossing gets half of that exchange's sum: the split is symmetric by construction, and
//! each direction's estimate is off by half the exchange's asymmetry (d_req - d_resp) / 2, which
//! no clock reading can reveal. The sum, and every segment within one kernel, are exact.

use std::collections::BTreeMap;

use super::journey::stats_of;
use crate::{
    cluster::clock::Clocks,
    report::schema::{ClockBounds, CrossingReport},
};

/// How long a line must hold two clocks when the exchanges do not agree on one for the run.
const CLOCK_HORIZON_NS: u64 = 10_000_000_000;

/// How the crossing segments were estimated, for the report.
pub const METHOD: &str = "per exchange: sum (t4-t1)-(t3-t2) measured (t1, t4 on the side that \
     sends the request), split half and half (each direction is biased by half the exchange's \
     asymmetry); clock offset ((t2-t1)+(t3-t4))/2, given as guest minus host; t1 and t3 are the \
     last hops before the packet is handed over, not the returns of the transmits that handed \
     it over (those are left out)";

/// One exchange's four times: t1 and t4 on the originator's clock, t2 and t3 on the
/// responder's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exchange {
    pub t1: u64,
    pub t2: u64,
    pub t3: u64,
    pub t4: u64,
}

impl Exchange {
    /// The responder's clock minus the originator's, assuming both crossings take as long.
    pub fn offset(&self) -> i64 {
        let (t1, t2, t3, t4) = (
            self.t1 as i128,
            self.t2 as i128,
            self.t3 as i128,
            self.t4 as i128,
        );
        (((t2 - t1) + (t3 - t4)) / 2) as i64
    }

    /// Both crossings' time together: the round trip less the responder's residence.
    pub fn crossing_sum(&self) -> i64 {
        (self.t4 as i64 - self.t1 as i64) - (self.t3 as i64 - self.t2 as i64)
    }
}

/// Times of tagged packets by exchange (seq): which side saw them and when, per direction.
#[derive(Default)]
pub struct Collect {
    exchanges: BTreeMap<u32, Partial>,
}

#[derive(Default, Clone, Copy)]
struct Partial {
    t1: Option<u64>,
    t2: Option<u64>,
    t3: Option<u64>,
    t4: Option<u64>,
}

impl Collect {
    /// An originator's time of the request (`request`) or the response of exchange `seq`.
    pub fn originator(&mut self, seq: u32, request: bool, ts: u64) {
        let p = self.exchanges.entry(seq).or_default();
        if request {
            p.t1 = Some(p.t1.map_or(ts, |t| t.max(ts)));
        } else {
            p.t4 = Some(p.t4.map_or(ts, |t| t.min(ts)));
        }
    }

    /// A responder's time of the request or the response of exchange `seq`.
    pub fn responder(&mut self, seq: u32, request: bool, ts: u64) {
        let p = self.exchanges.entry(seq).or_default();
        if request {
            p.t2 = Some(p.t2.map_or(ts, |t| t.min(ts)));
        } else {
            p.t3 = Some(p.t3.map_or(ts, |t| t.max(ts)));
        }
    }

    /// The exchanges both kernels saw both ways.
    pub fn complete(&self) -> BTreeMap<u32, Exchange> {
        self.exchanges
            .iter()
            .filter_map(|(&seq, p)| {
                Some((
                    seq,
                    Exchange {
                        t1: p.t1?,
                        t2: p.t2?,
                        t3: p.t3?,
                        t4: p.t4?,
                    },
                ))
            })
            .collect()
    }
}

/// The guest clock's offset from the host's per exchange, and what the report says of it.
pub struct Estimate {
    offsets: BTreeMap<u32, i64>,
    /// For exchanges without all four times: the median offset.
    median: i64,
    pub report: CrossingReport,
}

impl Estimate {
    /// `guest_originates`: the guest sends the requests (t1, t4 are the guest's).
    pub fn of(node: &str, exchanges: &BTreeMap<u32, Exchange>, guest_originates: bool) -> Estimate {
        let sign = if guest_originates { -1 } else { 1 };
        let offsets: BTreeMap<u32, i64> = exchanges
            .iter()
            .map(|(&s, e)| (s, sign * e.offset()))
            .collect();
        let mut sorted: Vec<i64> = offsets.values().copied().collect();
        sorted.sort_unstable();
        let at = |q: f64| {
            sorted
                .get(((sorted.len().saturating_sub(1)) as f64 * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        let median = at(0.5);
        let sums: Vec<u64> = exchanges
            .values()
            .map(|e| e.crossing_sum().max(0) as u64)
            .collect();
        Estimate {
            median,
            report: CrossingReport {
                node: node.to_string(),
                method: METHOD.to_string(),
                exchanges: exchanges.len() as u64,
                offset_ns: median,
                offset_p10_p90_ns: (at(0.1), at(0.9)),
                drift_ppm: drift_ppm(exchanges, &offsets),
                crossing_sum: stats_of(&sums),
                bounds: bounds(exchanges, guest_originates),
            },
            offsets,
        }
    }

    /// A guest time of exchange `seq` on the host's clock.
    pub fn to_host(&self, seq: u32, guest_ts: u64) -> u64 {
        let offset = self.offsets.get(&seq).copied().unwrap_or(self.median);
        (guest_ts as i64 - offset).max(0) as u64
    }
}

/// What all the exchanges bound (cluster/clock.rs: each request and response is a packet
/// crossing one way), given as the guest's clock minus the host's.
fn bounds(exchanges: &BTreeMap<u32, Exchange>, guest_originates: bool) -> Option<ClockBounds> {
    let mut clocks = Clocks::default();
    for e in exchanges.values() {
        clocks.a_to_b(e.t1, e.t2);
        clocks.b_to_a(e.t3, e.t4);
    }
    let from = exchanges.values().map(|e| e.t1).min()?;
    let to = exchanges.values().map(|e| e.t4).max()?;
    let mid = from + (to - from) / 2;
    let fit = match clocks.fit(from, to) {
        Ok(fit) => fit,
        Err(_) => clocks.track(CLOCK_HORIZON_NS).at(mid).ok()?.clone(),
    };
    let b = ClockBounds::of(&fit, mid);
    // The originator's clock is A: a guest that sends the requests sees the host's offset.
    Some(if guest_originates {
        let middle = b.offset_ns.0 + (b.offset_ns.1 - b.offset_ns.0) / 2;
        ClockBounds {
            at_ns: (mid as i64 + middle).max(0) as u64,
            offset_ns: (-b.offset_ns.1, -b.offset_ns.0),
            drift_ppm: (-b.drift_ppm.1, -b.drift_ppm.0),
            over_ns: b.over_ns,
        }
    } else {
        b
    })
}

/// The slope of the offsets over the originator's time (least squares; either clock does for
/// a slope in ppm), in parts per million: how fast the guest clock runs away from the host's
/// during the run.
fn drift_ppm(exchanges: &BTreeMap<u32, Exchange>, offsets: &BTreeMap<u32, i64>) -> f64 {
    let n = exchanges.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let t0 = exchanges.values().map(|e| e.t1).min().unwrap_or(0);
    let points: Vec<(f64, f64)> = exchanges
        .iter()
        .map(|(s, e)| ((e.t1 - t0) as f64, offsets[s] as f64))
        .collect();
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (sxy, sxx) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx * 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exchanges as two real clocks would stamp them: the guest's runs `offset` ahead and drifts
    /// `ppm`; the request crosses in `d_req`, the response in `d_resp`, the guest holds the
    /// packet `residence`, with some jitter on every part.
    fn synthetic(offset: i64, ppm: f64, d_req: u64, d_resp: u64) -> BTreeMap<u32, Exchange> {
        let mut out = BTreeMap::new();
        for seq in 0..1000u32 {
            let jitter = |k: u32| ((seq.wrapping_mul(2654435761).rotate_left(k)) % 20_000) as u64;
            let t1 = 1_000_000_000 + seq as u64 * 10_000_000;
            let arrive = t1 + d_req + jitter(3);
            let leave = arrive + 500_000 + jitter(11);
            let t4 = leave + d_resp + jitter(19);
            let guest =
                |host: u64| (host as i64 + offset + (host as f64 * ppm / 1e6) as i64) as u64;
            out.insert(
                seq,
                Exchange {
                    t1,
                    t2: guest(arrive),
                    t3: guest(leave),
                    t4,
                },
            );
        }
        out
    }

    #[test]
    fn the_sum_is_exact_and_the_offset_is_off_by_half_the_asymmetry() {
        let (offset, d_req, d_resp) = (-123_456_789_i64, 900_000, 300_000);
        let exchanges = synthetic(offset, 0.0, d_req, d_resp);
        let est = Estimate::of("vm1", &exchanges, false);
        let half_asymmetry = (d_req as i64 - d_resp as i64) / 2;
        let error = est.report.offset_ns - offset;
        println!(
            "offset error {error} ns, half the asymmetry {half_asymmetry} ns, jitter up to 20 us per part"
        );
        // Biased by half the asymmetry (plus half the jitter difference, < 10 us), never more.
        assert!(
            (error - half_asymmetry).abs() <= 10_000,
            "offset error {error} ns, half the asymmetry {half_asymmetry} ns"
        );
        for e in exchanges.values() {
            let true_sum = (e.t4 - e.t1) as i64 - (e.t3 - e.t2) as i64;
            assert_eq!(e.crossing_sum(), true_sum);
        }
        let mean_sum = est.report.crossing_sum.mean_ns;
        let expected = (d_req + d_resp) as f64 + 20_000.0;
        assert!(
            (mean_sum - expected).abs() < 2_000.0,
            "mean crossing sum {mean_sum}, expected about {expected}"
        );
    }

    #[test]
    fn each_direction_gets_half_the_sum_on_the_host_clock() {
        let exchanges = synthetic(5_000_000_000, 0.0, 700_000, 100_000);
        let est = Estimate::of("vm1", &exchanges, false);
        for (&seq, e) in &exchanges {
            let req = est.to_host(seq, e.t2) as i64 - e.t1 as i64;
            let resp = e.t4 as i64 - est.to_host(seq, e.t3) as i64;
            assert!((req - resp).abs() <= 1, "seq {seq}: {req} vs {resp}");
            assert!((req + resp - e.crossing_sum()).abs() <= 1);
            // The true request crossing is ~700 us, the estimate half the sum (~400 us): the
            // bias is half the asymmetry, 300 us.
            assert!((300_000..=420_000).contains(&req), "seq {seq}: {req}");
        }
    }

    /// VMP2VMP: the guest sends the requests, so t1 and t4 are on its clock and t2 and t3 on
    /// the host's; the offset is still reported as the guest's minus the host's, and guest
    /// times still land on the host clock with half the sum per crossing.
    #[test]
    fn a_guest_that_sends_the_requests_is_the_originator() {
        let (offset, d_req, d_resp) = (300_000_000_i64, 500_000, 500_000);
        // Seen from the guest, the host runs `-offset` ahead.
        let exchanges = synthetic(-offset, 0.0, d_req, d_resp);
        let est = Estimate::of("vm1", &exchanges, true);
        let error = est.report.offset_ns - offset;
        println!("guest as originator: offset error {error} ns (jitter up to 20 us per part)");
        assert!(error.abs() <= 10_000, "offset error {error} ns");
        for (&seq, e) in &exchanges {
            // The guest's t1 on the host clock, then the request's crossing to the host's t2.
            let req = e.t2 as i64 - est.to_host(seq, e.t1) as i64;
            let resp = est.to_host(seq, e.t4) as i64 - e.t3 as i64;
            assert!((req - resp).abs() <= 1, "seq {seq}: {req} vs {resp}");
            assert!((req + resp - e.crossing_sum()).abs() <= 1);
        }
        let ppm = Estimate::of("vm1", &synthetic(0, 50.0, 1, 1), true)
            .report
            .drift_ppm;
        assert!(
            (ppm + 50.0).abs() < 1.0,
            "drift {ppm} ppm: the host's 50 seen from the guest"
        );
    }

    /// The bounds hold the true offset at the middle of the run and the true drift, whichever
    /// side sends the requests, however asymmetric the crossings.
    #[test]
    fn the_bounds_hold_the_truth_whoever_originates() {
        for (offset, ppm, d_req, d_resp) in [
            (5_000_000_i64, 100.0, 900_000, 100_000),
            (-5_000_000, -100.0, 100_000, 900_000),
        ] {
            let ex = synthetic(offset, ppm, d_req, d_resp);
            let b = Estimate::of("vm1", &ex, false)
                .report
                .bounds
                .expect("bounds");
            let truth = offset + (b.at_ns as f64 * ppm / 1e6) as i64;
            println!("{b:?}, truth {truth}");
            assert!(
                (b.offset_ns.0..=b.offset_ns.1).contains(&truth),
                "{b:?} {truth}"
            );
            // No wider than one exchange's two crossings (the jitter adds up to 20 us to each).
            assert!(
                b.offset_ns.1 - b.offset_ns.0 <= (d_req + d_resp + 40_000) as i64,
                "{b:?}"
            );
            assert!(b.drift_ppm.0 <= ppm && ppm <= b.drift_ppm.1, "{b:?}");
            // Linear clocks: one line fits the whole run (10 s of exchanges).
            assert!(b.over_ns.is_some_and(|o| o > 9_000_000_000), "{b:?}");
            // The same clocks seen from a guest that sends the requests: the host runs
            // -offset ahead of it.
            let ex = synthetic(-offset, 0.0, d_req, d_resp);
            let b = Estimate::of("vm1", &ex, true)
                .report
                .bounds
                .expect("bounds");
            assert!(
                (b.offset_ns.0..=b.offset_ns.1).contains(&offset),
                "{b:?} {offset}"
            );
        }
    }

    #[test]
    fn drift_is_measured() {
        let est = Estimate::of("vm1", &synthetic(0, 50.0, 200_000, 200_000), false);
        let ppm = est.report.drift_ppm;
        assert!((ppm - 50.0).abs() < 1.0, "drift {ppm} ppm, made 50");
    }

    #[test]
    fn an_exchange_missing_a_time_is_not_complete() {
        let mut c = Collect::default();
        c.originator(1, true, 10);
        c.originator(1, true, 20);
        c.responder(1, true, 1000);
        c.responder(1, true, 900);
        c.responder(1, false, 1100);
        c.originator(1, false, 300);
        c.originator(1, false, 250);
        c.originator(2, true, 400);
        let done = c.complete();
        assert_eq!(done.len(), 1);
        assert_eq!(
            done[&1],
            Exchange {
                t1: 20,
                t2: 900,
                t3: 1100,
                t4: 250
            }
        );
    }
}
