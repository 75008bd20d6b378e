//! Two nodes' clocks reconciled from the traffic between them, with no NTP or PTP assumed.
//!
//! Node B's clock reads θ(t) = a + b·t more than node A's at A's time t (b is the drift). A
//! packet that leaves A at `sent` (A's clock) and reaches B at `received` (B's clock) took some
//! time ≥ 0, so θ(sent) ≤ received − sent; a packet from B to A gives θ(received) ≥ sent −
//! received. Both bounds are exact under the linear model (with the true drift the packet's time
//! in flight only loosens them), and no direction is assumed as fast as the other. The lines
//! θ that satisfy every bound of a stretch of time (and |b| ≤ [`MAX_DRIFT`]) form a convex
//! polygon in (a, b); the offset at any time lies between the lowest and highest of those lines
//! there, which is the bound reported beside it, and the estimate is its middle. Only the
//! packets nearest the bounds matter (NTP's minimum-delay filter, as convex hulls), so a
//! stretch keeps a handful of points however many packets cross.
//!
//! Over a long stretch a real clock is not linear (temperature, a TCG guest's ticks): fits are
//! made over a horizon around each second, and a horizon with no consistent line is halved.

use std::collections::BTreeMap;

/// Drifts beyond this are refused: quartz clocks are specified within ±100 ppm, and a fit must
/// be bounded when all packets of a stretch cross at once.
pub const MAX_DRIFT: f64 = 1e-3;
/// The stretch of time whose packets are reduced together.
const WINDOW_NS: u64 = 1_000_000_000;
/// Points a window keeps before it reduces them to their hull again.
const REDUCE_AT: usize = 64;

/// Two nodes' clocks: what the packets crossing between them bound.
#[derive(Default)]
pub struct Clocks {
    /// A's time and B's offset at the first packet: the origin of all points, so that the
    /// arithmetic is on small numbers (two nodes' clocks may be hours apart).
    origin: Option<(u64, i128)>,
    windows: BTreeMap<u64, Window>,
}

/// One second's packets, reduced to those that can bound a line.
#[derive(Default, Clone)]
struct Window {
    /// θ(t) ≤ y: packets from A to B.
    below: Vec<Point>,
    /// θ(t) ≥ y: packets from B to A.
    above: Vec<Point>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Point {
    t: f64,
    y: f64,
}

/// Why two clocks could not be related over a stretch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unfit {
    /// Packets crossed one way only: the offset is bounded on one side.
    OneWay,
    /// No line within [`MAX_DRIFT`] satisfies every bound, even over the shortest horizon: a
    /// clock step, or packets joined wrongly.
    Inconsistent,
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unfit::OneWay => "packets crossed one way only: the offset is bounded on one side",
            Unfit::Inconsistent => {
                "no offset and drift fit every packet (a clock that stepped, or packets paired wrongly)"
            }
        })
    }
}

impl Clocks {
    /// A packet left A at `sent` (A's clock) and reached B at `received` (B's).
    pub fn a_to_b(&mut self, sent: u64, received: u64) {
        let p = self.point(sent, received as i128 - sent as i128);
        let w = self.window(sent);
        w.below.push(p);
        w.reduce();
    }

    /// A packet left B at `sent` (B's clock) and reached A at `received` (A's).
    pub fn b_to_a(&mut self, sent: u64, received: u64) {
        let p = self.point(received, sent as i128 - received as i128);
        let w = self.window(received);
        w.above.push(p);
        w.reduce();
    }

    fn point(&mut self, t: u64, y: i128) -> Point {
        let (t0, y0) = *self.origin.get_or_insert((t, y));
        Point {
            t: (t as i128 - t0 as i128) as f64,
            y: (y - y0) as f64,
        }
    }

    fn window(&mut self, t: u64) -> &mut Window {
        self.windows.entry(t / WINDOW_NS).or_default()
    }

    /// The lines consistent with every packet between `from` and `to` (A's clock).
    pub fn fit(&self, from: u64, to: u64) -> Result<Fit, Unfit> {
        let (t0, y0) = self.origin.ok_or(Unfit::OneWay)?;
        let mut all = Window::default();
        for w in self.windows.range(from / WINDOW_NS..=to / WINDOW_NS) {
            all.below.extend(&w.1.below);
            all.above.extend(&w.1.above);
        }
        if all.below.is_empty() || all.above.is_empty() {
            return Err(Unfit::OneWay);
        }
        let vertices = feasible_vertices(&lower_hull(all.below), &upper_hull(all.above));
        if vertices.is_empty() {
            return Err(Unfit::Inconsistent);
        }
        Ok(Fit {
            t0,
            y0,
            vertices,
            span: to - from,
        })
    }

    /// A fit for each second that packets crossed, over `horizon` around it (halved until the
    /// packets agree on a line): the clocks tracked over time.
    pub fn track(&self, horizon: u64) -> Timeline {
        let mut fits = BTreeMap::new();
        for &w in self.windows.keys() {
            let mid = w * WINDOW_NS + WINDOW_NS / 2;
            let mut h = horizon.max(WINDOW_NS);
            let fit = loop {
                let fit = self.fit(mid.saturating_sub(h / 2), mid + h / 2);
                if fit != Err(Unfit::Inconsistent) || h <= WINDOW_NS {
                    break fit;
                }
                h /= 2;
            };
            fits.insert(w, fit);
        }
        Timeline { fits }
    }
}

impl Window {
    /// Keeps the points that can still bound a line once there are many.
    fn reduce(&mut self) {
        if self.below.len() >= REDUCE_AT {
            self.below = lower_hull(std::mem::take(&mut self.below));
        }
        if self.above.len() >= REDUCE_AT {
            self.above = upper_hull(std::mem::take(&mut self.above));
        }
    }
}

/// The points a line lying below all of `points` can touch (Andrew's monotone chain).
fn lower_hull(mut points: Vec<Point>) -> Vec<Point> {
    points.sort_by(|p, q| p.t.total_cmp(&q.t).then(p.y.total_cmp(&q.y)));
    // Of points at one time only the lowest bounds a line from above.
    points.dedup_by(|q, p| q.t == p.t);
    let mut hull: Vec<Point> = Vec::with_capacity(points.len());
    for p in points {
        while hull.len() >= 2 && !turns_left(hull[hull.len() - 2], hull[hull.len() - 1], p) {
            hull.pop();
        }
        hull.push(p);
    }
    hull
}

/// The points a line lying above all of `points` can touch.
fn upper_hull(points: Vec<Point>) -> Vec<Point> {
    let flip = |p: Point| Point { t: p.t, y: -p.y };
    lower_hull(points.into_iter().map(flip).collect())
        .into_iter()
        .map(flip)
        .collect()
}

fn turns_left(o: Point, p: Point, q: Point) -> bool {
    (p.t - o.t) * (q.y - o.y) - (p.y - o.y) * (q.t - o.t) > 0.0
}

/// A half-plane α·a + β·b ≤ γ of lines θ(t) = a + b·t.
#[derive(Clone, Copy)]
struct Bound {
    alpha: f64,
    beta: f64,
    gamma: f64,
}

/// The corners (a, b) of the polygon of lines below every point of `below`, above every point
/// of `above`, and within [`MAX_DRIFT`]: empty when there is no such line. Both sides are hulls
/// of a few points each, so trying every pair of edges is cheap and has no special cases.
fn feasible_vertices(below: &[Point], above: &[Point]) -> Vec<(f64, f64)> {
    let mut bounds: Vec<Bound> = below
        .iter()
        .map(|p| Bound {
            alpha: 1.0,
            beta: p.t,
            gamma: p.y,
        })
        .chain(above.iter().map(|p| Bound {
            alpha: -1.0,
            beta: -p.t,
            gamma: -p.y,
        }))
        .collect();
    bounds.push(Bound {
        alpha: 0.0,
        beta: 1.0,
        gamma: MAX_DRIFT,
    });
    bounds.push(Bound {
        alpha: 0.0,
        beta: -1.0,
        gamma: MAX_DRIFT,
    });
    let mut vertices = Vec::new();
    for (i, p) in bounds.iter().enumerate() {
        for q in &bounds[i + 1..] {
            let det = p.alpha * q.beta - p.beta * q.alpha;
            if det.abs() < 1e-12 {
                continue;
            }
            let a = (p.gamma * q.beta - p.beta * q.gamma) / det;
            let b = (p.alpha * q.gamma - p.gamma * q.alpha) / det;
            // A thousandth of a nanosecond of rounding is not a violation.
            if bounds
                .iter()
                .all(|c| c.alpha * a + c.beta * b <= c.gamma + 1e-3)
            {
                vertices.push((a, b));
            }
        }
    }
    vertices
}

/// The lines two clocks can be related by over a stretch: their offset and drift, bounded.
#[derive(Clone, Debug, PartialEq)]
pub struct Fit {
    t0: u64,
    y0: i128,
    vertices: Vec<(f64, f64)>,
    span: u64,
}

/// A value known to lie within `lo..=hi`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bounded<T> {
    pub lo: T,
    pub hi: T,
}

impl Bounded<i64> {
    /// The middle of the bound, the value reported.
    pub fn estimate(&self) -> i64 {
        self.lo + (self.hi - self.lo) / 2
    }

    /// How far the value can be from the estimate.
    pub fn uncertainty(&self) -> u64 {
        (self.hi - self.estimate()).unsigned_abs()
    }

    pub fn contains(&self, v: i64) -> bool {
        (self.lo..=self.hi).contains(&v)
    }
}

impl Fit {
    /// How long a stretch of A's time the packets that made it came from: a whole run, or a
    /// shorter horizon where no line fit the run.
    pub fn span(&self) -> u64 {
        self.span
    }

    /// B's clock minus A's at A's time `t`, in nanoseconds.
    pub fn offset_at(&self, t: u64) -> Bounded<i64> {
        let x = (t as i128 - self.t0 as i128) as f64;
        let (lo, hi) = self.extremes(|a, b| a + b * x);
        Bounded {
            lo: (self.y0 + lo.floor() as i128) as i64,
            hi: (self.y0 + hi.ceil() as i128) as i64,
        }
    }

    /// B's clock rate minus A's (1e-6 is 1 ppm).
    pub fn drift(&self) -> Bounded<f64> {
        let (lo, hi) = self.extremes(|_, b| b);
        Bounded { lo, hi }
    }

    /// A's time of B's reading `t`: B's time less the offset at that moment.
    pub fn to_a(&self, t: u64) -> Bounded<i64> {
        // t less the offset at the origin is A's time to within how far the offset moved since
        // (microseconds to milliseconds); the offset there is A's time to within its bound, and
        // the offset moves by at most MAX_DRIFT times that between the guess and the moment.
        let rough = (t as i128 - self.y0).max(0) as u64;
        let guess = (t as i128 - self.offset_at(rough).estimate() as i128).max(0) as u64;
        let off = self.offset_at(guess);
        let slack = ((off.uncertainty() + 1) as f64 * MAX_DRIFT).ceil() as i64;
        Bounded {
            lo: (t as i128 - off.hi as i128) as i64 - slack,
            hi: (t as i128 - off.lo as i128) as i64 + slack,
        }
    }

    fn extremes(&self, f: impl Fn(f64, f64) -> f64) -> (f64, f64) {
        self.vertices
            .iter()
            .map(|&(a, b)| f(a, b))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            })
    }
}

/// Two clocks' fits second by second.
pub struct Timeline {
    fits: BTreeMap<u64, Result<Fit, Unfit>>,
}

impl Timeline {
    /// The fit of the second nearest A's time `t` that has one.
    pub fn at(&self, t: u64) -> Result<&Fit, Unfit> {
        let w = t / WINDOW_NS;
        let before = nearest_fit(self.fits.range(..=w).rev(), w);
        let after = nearest_fit(self.fits.range(w + 1..), w);
        match (before, after) {
            (Some(b), Some(a)) => Ok(if a.0 < b.0 { a.1 } else { b.1 }),
            (Some((_, f)), None) | (None, Some((_, f))) => Ok(f),
            (None, None) if self.fits.values().any(|f| f == &Err(Unfit::Inconsistent)) => {
                Err(Unfit::Inconsistent)
            }
            (None, None) => Err(Unfit::OneWay),
        }
    }
}

/// The first fit of `fits` (seconds walked away from `w`), with its distance from `w`.
fn nearest_fit<'a>(
    fits: impl Iterator<Item = (&'a u64, &'a Result<Fit, Unfit>)>,
    w: u64,
) -> Option<(u64, &'a Fit)> {
    fits.filter_map(|(k, f)| Some((k.abs_diff(w), f.as_ref().ok()?)))
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECOND: u64 = 1_000_000_000;
    /// A node's clock starts far from the other's, as a guest's monotonic clock does.
    const B_START: i128 = 3_600 * SECOND as i128;

    /// Node B's clock at A's time `t`, `offset` ns ahead at t = 0 and drifting by `drift`.
    fn b_clock(t: u64, offset: i64, drift: f64) -> u64 {
        (B_START + t as i128 + offset as i128 + (t as f64 * drift) as i128) as u64
    }

    /// A pseudo-random time in flight: `base` plus an exponential tail of mean `mean` (ns).
    fn flight(seed: &mut u64, base: u64, mean: f64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let u = (*seed >> 11) as f64 / (1u64 << 53) as f64;
        base + (-(1.0 - u).ln() * mean) as u64
    }

    /// Two-way traffic for `secs` seconds, `rate` packets a second each way: A to B takes
    /// `ab_base` ns at least, B to A `ba_base` (the directions need not be alike).
    fn traffic(
        secs: u64,
        rate: u64,
        offset: i64,
        drift: impl Fn(u64) -> f64,
        (ab_base, ba_base): (u64, u64),
        seed: u64,
    ) -> Clocks {
        let mut seed = seed | 1;
        let mut clocks = Clocks::default();
        let step = SECOND / rate;
        let mut t = 1_000;
        while t < secs * SECOND {
            let d = flight(&mut seed, ab_base, 40_000.0);
            clocks.a_to_b(t, b_clock(t + d, offset, drift(t + d)));
            let sent = t + step / 2;
            let d = flight(&mut seed, ba_base, 40_000.0);
            clocks.b_to_a(b_clock(sent, offset, drift(sent)), sent + d);
            t += step;
        }
        clocks
    }

    fn truth(t: u64, offset: i64, drift: f64) -> i64 {
        (b_clock(t, offset, drift) as i128 - t as i128) as i64
    }

    #[test]
    fn known_offsets_and_drifts_are_recovered_within_the_bound() {
        for offset in [-5_000_000, 0, 5_000_000] {
            for drift in [-100e-6, 0.0, 100e-6] {
                let clocks = traffic(60, 100, offset, |_| drift, (20_000, 60_000), 7);
                let fit = clocks.fit(0, 60 * SECOND).expect("a fit");
                for t in (0..=60).map(|s| s * SECOND) {
                    let off = fit.offset_at(t);
                    let want = truth(t, offset, drift);
                    assert!(
                        off.contains(want),
                        "{offset} {drift}: {want} not in {off:?}"
                    );
                    // Bounded by the fastest crossings: 20 + 60 us, with some room.
                    assert!(off.hi - off.lo < 100_000, "too loose: {off:?}");
                }
                let d = fit.drift();
                assert!(d.lo <= drift && drift <= d.hi, "{drift} not in {d:?}");
                assert!(d.hi - d.lo < 5e-6, "drift too loose: {d:?}");
            }
        }
    }

    #[test]
    fn a_b_reading_goes_back_to_a_within_the_bound() {
        let (offset, drift) = (5_000_000, -100e-6);
        let fit = traffic(20, 200, offset, |_| drift, (30_000, 30_000), 3)
            .fit(0, 20 * SECOND)
            .unwrap();
        for t in [SECOND, 7 * SECOND, 19 * SECOND] {
            let on_a = fit.to_a(b_clock(t, offset, drift));
            assert!(on_a.contains(t as i64), "{t} not in {on_a:?}");
            assert!(on_a.uncertainty() < 50_000, "{on_a:?}");
        }
    }

    #[test]
    fn one_way_traffic_cannot_be_reconciled() {
        let mut clocks = Clocks::default();
        for t in 0..100u64 {
            clocks.a_to_b(t * 10_000_000, b_clock(t * 10_000_000 + 50_000, 0, 0.0));
        }
        assert_eq!(clocks.fit(0, SECOND), Err(Unfit::OneWay));
        assert_eq!(Clocks::default().fit(0, SECOND), Err(Unfit::OneWay));
    }

    #[test]
    fn a_clock_step_is_inconsistent_not_averaged() {
        let mut clocks = traffic(2, 100, 0, |_| 0.0, (20_000, 20_000), 5);
        // B's clock jumps back 1 ms: its packets now seem to arrive before they left.
        let t = 2 * SECOND + 100;
        clocks.a_to_b(t, b_clock(t + 20_000, -1_000_000, 0.0));
        assert_eq!(clocks.fit(0, 3 * SECOND), Err(Unfit::Inconsistent));
    }

    /// The drift turns from +100 to -100 ppm at 30 s: one line cannot hold the minute, so the
    /// tracked fits shorten their horizon there, and every second's bound still holds the truth.
    #[test]
    fn a_drift_that_changes_is_tracked() {
        let knee = 30 * SECOND;
        let offset_at = |t: u64| -> i64 {
            let up = t.min(knee) as f64 * 100e-6;
            let down = t.saturating_sub(knee) as f64 * 100e-6;
            (up - down) as i64
        };
        let mut seed = 11u64;
        let mut clocks = Clocks::default();
        let b = |t: u64| (B_START + t as i128 + offset_at(t) as i128) as u64;
        for i in 0..6_000u64 {
            let t = i * 10_000_000 + 1_000;
            let d = flight(&mut seed, 20_000, 40_000.0);
            clocks.a_to_b(t, b(t + d));
            let d = flight(&mut seed, 20_000, 40_000.0);
            clocks.b_to_a(b(t + 5_000_000), t + 5_000_000 + d);
        }
        assert_eq!(clocks.fit(0, 60 * SECOND), Err(Unfit::Inconsistent));
        let timeline = clocks.track(8 * SECOND);
        // Around the knee no line holds 8 s: those fits say they came from less.
        let at_knee = timeline.at(knee).expect("a fit at the knee").span();
        assert!(at_knee < 8 * SECOND, "the knee's fit spans {at_knee} ns");
        for t in (0..60).map(|s| s * SECOND + SECOND / 2) {
            let off = timeline.at(t).expect("a fit").offset_at(t);
            let want = (B_START + offset_at(t) as i128) as i64;
            assert!(off.contains(want), "at {t}: {want} not in {off:?}");
            assert!(off.uncertainty() < 100_000, "at {t}: {off:?}");
        }
    }

    proptest! {
        #![proptest_config(crate::proptest_config(64))]

        /// Any offset within ±5 ms, drift within ±100 ppm, and times in flight: the truth is
        /// always within the reported bounds.
        #[test]
        fn prop_the_truth_is_within_the_bound(
            offset in -5_000_000i64..5_000_000,
            ppm in -100.0f64..100.0,
            ab in 1_000u64..500_000,
            ba in 1_000u64..500_000,
            seed in any::<u64>(),
        ) {
            let drift = ppm * 1e-6;
            let clocks = traffic(10, 50, offset, |_| drift, (ab, ba), seed);
            let fit = clocks.fit(0, 10 * SECOND).unwrap();
            for t in (0..=10).map(|s| s * SECOND) {
                let off = fit.offset_at(t);
                prop_assert!(off.contains(truth(t, offset, drift)), "{:?}", off);
            }
            let d = fit.drift();
            prop_assert!(d.lo <= drift && drift <= d.hi, "{:?}", d);
        }
    }
}
