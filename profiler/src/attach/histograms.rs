//! The kernel's per-segment histograms, read, named after the node's devices, and summarized.

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use aya::maps::PerCpuHashMap;
use profiler_common::{
    hist_bucket_range, SegmentKey, COUNTER_ABANDONED, COUNTER_CONSUMED, COUNTER_DROPPED,
    COUNTER_LOST, COUNTER_REHEADED, COUNTER_STARTED, HIST_BUCKETS,
};

use super::scope::Namer;
use crate::{
    kernel::programs::Programs,
    report::schema::{Hop, JourneyCounts, SegmentSummary},
};

/// The kernel's histograms, named.
pub fn read_segments(programs: &Programs, namer: &mut Namer) -> Result<Vec<SegmentSummary>> {
    let map: PerCpuHashMap<_, SegmentKey, profiler_common::Histogram> =
        PerCpuHashMap::try_from(programs.map("HISTOGRAMS")?)?;
    let mut segments = Vec::new();
    for entry in map.iter() {
        let (key, per_cpu) = entry.context("reading the segment histograms")?;
        let mut buckets = vec![0u64; HIST_BUCKETS];
        let (mut count, mut sum) = (0, 0);
        for h in per_cpu.iter() {
            count += h.count;
            sum += h.sum_ns;
            buckets.iter_mut().zip(h.buckets).for_each(|(a, b)| *a += b);
        }
        let (name, from, to) = namer.segment(&key);
        segments.push(summarize(name, from.name, &to, buckets, count, sum));
    }
    disambiguate(&mut segments);
    segments.sort_by(|a, b| b.count.cmp(&a.count).then(a.name.cmp(&b.name)));
    Ok(segments)
}

/// What became of the journeys, and the events the kernel could not record.
pub fn journey_counts(programs: &Programs) -> Result<(JourneyCounts, u64)> {
    let c = programs.counters()?;
    let at = |i: u32| c[i as usize];
    let ended = at(COUNTER_CONSUMED) + at(COUNTER_DROPPED) + at(COUNTER_ABANDONED);
    let counts = JourneyCounts {
        started: at(COUNTER_STARTED),
        consumed: at(COUNTER_CONSUMED),
        dropped: at(COUNTER_DROPPED),
        ended_unseen: at(COUNTER_ABANDONED),
        reheaded: at(COUNTER_REHEADED),
        unfinished: at(COUNTER_STARTED).saturating_sub(ended),
    };
    Ok((counts, at(COUNTER_LOST)))
}

/// Segments of one name in several namespaces (every pod's "backlog eth0") get the namespace
/// they end in appended.
fn disambiguate(segments: &mut [SegmentSummary]) {
    let mut namespaces: HashMap<String, Vec<String>> = HashMap::new();
    for s in segments.iter() {
        let seen = namespaces.entry(s.name.clone()).or_default();
        if !seen.contains(&s.netns) {
            seen.push(s.netns.clone());
        }
    }
    for s in segments.iter_mut() {
        if namespaces[&s.name].len() > 1 {
            s.name = format!("{} ({})", s.name, s.netns);
        }
    }
}

fn summarize(
    name: String,
    from: String,
    to: &Hop,
    buckets: Vec<u64>,
    count: u64,
    sum_ns: u64,
) -> SegmentSummary {
    let q = |q: f64| quantile(&buckets, count, q);
    SegmentSummary {
        name,
        from,
        to: to.name.clone(),
        netns: to.netns.clone().unwrap_or_default(),
        ifname: to.ifname.clone().unwrap_or_default(),
        count,
        mean_ns: if count == 0 {
            0.0
        } else {
            sum_ns as f64 / count as f64
        },
        p50_ns: q(0.5),
        p90_ns: q(0.9),
        p99_ns: q(0.99),
        buckets,
        sum_ns,
    }
}

/// The value below which a fraction `q` of the samples lie: the middle of the bucket holding
/// the sample of that rank (buckets are at most 1/16 of their value wide).
pub fn quantile(buckets: &[u64], count: u64, q: f64) -> f64 {
    if count == 0 {
        return 0.0;
    }
    let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
    let mut seen = 0;
    for (i, &n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            let (low, width) = hist_bucket_range(i);
            return low as f64 + (width as f64 - 1.0) / 2.0;
        }
    }
    0.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use profiler_common::hist_bucket;

    #[test]
    fn quantiles_come_from_the_bucket_of_the_rank() {
        let mut buckets = vec![0u64; HIST_BUCKETS];
        for v in [1000u64, 1000, 1000, 5000] {
            buckets[hist_bucket(v)] += 1;
        }
        let p50 = quantile(&buckets, 4, 0.5);
        assert!((p50 - 1000.0).abs() <= 1000.0 / 16.0, "{p50}");
        let p99 = quantile(&buckets, 4, 0.99);
        assert!((p99 - 5000.0).abs() <= 5000.0 / 16.0, "{p99}");
        assert_eq!(quantile(&buckets, 0, 0.5), 0.0);
    }
}
