//! The kernel's per-segment histograms, read, named after the node's devices, and summarized.

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, Context as _, Result};
use aya::maps::{Array, PerCpuArray, PerCpuHashMap, PerCpuValues};
use profiler_common::{
    hist_bucket_range, path_hash, DropKey, Histogram, HopPoint, SegmentKey, COUNTER_ABANDONED,
    COUNTER_CONSUMED, COUNTER_DROPPED, COUNTER_GROUP, COUNTER_LOST, COUNTER_REHEADED,
    COUNTER_STARTED, HIST_BUCKETS, HIST_SLOTS,
};

use super::scope::Namer;
use crate::{
    datapath::protocols,
    kernel::programs::Programs,
    report::schema::{AttachDrop, AttachPath, Hop, JourneyCounts, RarePaths, SegmentSummary},
};

/// One of the kernel's histograms: a segment, as reached by one path.
#[derive(Clone)]
struct Raw {
    key: SegmentKey,
    buckets: Vec<u64>,
    count: u64,
    sum: u64,
}

impl Raw {
    fn empty(key: SegmentKey) -> Raw {
        Raw {
            key,
            buckets: vec![0u64; HIST_BUCKETS],
            count: 0,
            sum: 0,
        }
    }

    fn add(&mut self, buckets: &[u64], count: u64, sum: u64) {
        self.count += count;
        self.sum += sum;
        self.buckets
            .iter_mut()
            .zip(buckets)
            .for_each(|(a, b)| *a += b);
    }
}

/// The segments' histograms, drained from the kernel into totals here. The programs fill one
/// of two tables while the other is read and emptied, so a slot is taken only by a segment
/// crossed since the last drain, not by every segment attach ever saw (a departed pod's would
/// keep theirs for good, and a node that churns pods would run out). Departed devices'
/// segments are retired: named while their devices are known, kept for the final report, and
/// left out of /metrics; a new pod whose namespace gets a departed one's inode, and its hops
/// the same keys, starts from nothing.
#[derive(Default)]
pub struct Histograms {
    totals: HashMap<SegmentKey, Raw>,
    epoch: u32,
    pub retired: Vec<SegmentSummary>,
}

impl Histograms {
    /// Moves what the kernel recorded into the totals: the programs are switched to the other
    /// table and, once none can still be writing the old one, it is read and emptied.
    pub fn drain(&mut self, programs: &mut Programs) -> Result<()> {
        let old = self.epoch & 1;
        self.epoch = self.epoch.wrapping_add(1);
        let mut epoch: Array<_, u32> = Array::try_from(programs.map_mut("HIST_EPOCH")?)?;
        epoch
            .set(0, self.epoch, 0)
            .context("switching the histogram tables")?;
        grace_period();
        // The flags are cleared as they are read: no program writes the old table any more.
        let used: Vec<u32> = {
            let mut flags: Array<_, u32> = Array::try_from(programs.map_mut("HIST_USED")?)?;
            let mut used = Vec::new();
            for slot in old * HIST_SLOTS..(old + 1) * HIST_SLOTS {
                if flags.get(&slot, 0).is_ok_and(|u| u != 0) {
                    flags
                        .set(slot, 0, 0)
                        .context("emptying a drained histogram slot")?;
                    used.push(slot);
                }
            }
            used
        };
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        // SAFETY: a Histogram is integers only: all zeroes is an empty slot.
        let empty: Histogram = unsafe { std::mem::zeroed() };
        let mut map: PerCpuArray<_, Histogram> =
            PerCpuArray::try_from(programs.map_mut("HISTOGRAMS")?)?;
        for slot in used {
            let per_cpu = map
                .get(&slot, 0)
                .context("reading the segment histograms")?;
            for h in per_cpu.iter().filter(|h| h.count > 0) {
                self.totals
                    .entry(h.key)
                    .or_insert_with(|| Raw::empty(h.key))
                    .add(&h.buckets, h.count, h.sum_ns);
            }
            let values = PerCpuValues::try_from(vec![empty; cpus])?;
            map.set(slot, values, 0)
                .context("emptying a drained histogram slot")?;
        }
        Ok(())
    }

    /// Retires every segment with a hop that `gone` says went away; returns how many.
    pub fn retire(
        &mut self,
        programs: &mut Programs,
        namer: &mut Namer,
        gone: impl Fn(&HopPoint) -> bool,
    ) -> Result<usize> {
        self.drain(programs)?;
        let leaving: Vec<SegmentKey> = self
            .totals
            .keys()
            .filter(|k| gone(&k.from) || gone(&k.to))
            .copied()
            .collect();
        let leaving: Vec<Raw> = leaving
            .iter()
            .filter_map(|k| self.totals.remove(k))
            .collect();
        let named = segments(&leaving.iter().collect::<Vec<_>>(), namer);
        self.retired.extend(named.iter().cloned());
        Ok(named.len())
    }

    /// The totals of the devices there now, as of the last drain.
    fn live(&self) -> Vec<&Raw> {
        self.totals.values().collect()
    }
}

/// Waits until every program that may have read the old table index has returned: tracing and
/// tc programs run inside RCU read-side sections, and MEMBARRIER_CMD_GLOBAL returns after an
/// RCU grace period (synchronize_rcu). Where it is refused (nohz_full CPUs), a sleep far longer
/// than a program runs.
fn grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    let done = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) } == 0;
    if !done {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The segments of the devices there now (as of the last drain), named, one per segment whatever
/// the paths that reached it.
pub fn read_segments(namer: &mut Namer, histograms: &Histograms) -> Vec<SegmentSummary> {
    segments(&histograms.live(), namer)
}

/// The segments, those retired included, and the paths journeys took through the devices
/// there now.
pub fn read_segments_and_paths(
    programs: &mut Programs,
    namer: &mut Namer,
    histograms: &mut Histograms,
) -> Result<(Vec<SegmentSummary>, Vec<AttachPath>, RarePaths)> {
    histograms.drain(programs)?;
    let raw = histograms.live();
    let (paths, rare) = paths(&raw, namer);
    let mut all = segments(&raw, namer);
    all.extend(histograms.retired.iter().cloned());
    Ok((all, paths, rare))
}

fn segments(raw: &[&Raw], namer: &mut Namer) -> Vec<SegmentSummary> {
    let mut merged: BTreeMap<(HopPoint, HopPoint), Raw> = BTreeMap::new();
    for r in raw {
        merged
            .entry((r.key.from, r.key.to))
            .or_insert_with(|| Raw::empty(SegmentKey { path: 0, ..r.key }))
            .add(&r.buckets, r.count, r.sum);
    }
    let mut segments: Vec<SegmentSummary> = merged.into_values().map(|r| named(r, namer)).collect();
    disambiguate(&mut segments);
    segments.sort_by(|a, b| b.count.cmp(&a.count).then(a.name.cmp(&b.name)));
    segments
}

fn named(r: Raw, namer: &mut Namer) -> SegmentSummary {
    let (name, from, to) = namer.segment(&r.key);
    let mut s = summarize(name, from.name.clone(), &to, r.buckets, r.count, r.sum);
    // The pod whose device the segment ends at, else the one it starts from.
    let pod = if to.pod.is_some() { &to } else { &from };
    s.pod.clone_from(&pod.pod);
    s.namespace.clone_from(&pod.namespace);
    // Named after its pod: on a node, devices' names (veth1a2b3c, eth0) say nothing.
    if let Some(name) = &s.pod {
        s.name = match &s.namespace {
            Some(ns) => format!("{} [{ns}/{name}]", s.name),
            None => format!("{} [{name}]", s.name),
        };
    }
    s
}

/// Paths shown whole: at most this many, each taken by at least MIN_SHARE of the journeys.
const MAX_PATHS: usize = 8;
const MIN_SHARE: f64 = 0.01;

/// The hop sequences journeys took, most taken first. A histogram's key holds the path up to
/// its first hop, so the segments of one path chain up: the next segment of (path p, a -> b)
/// is keyed (path_hash(p, b), b -> ...). Journeys that went no further than a segment are those
/// it counted and its successors did not.
fn paths(raw: &[&Raw], namer: &mut Namer) -> (Vec<AttachPath>, RarePaths) {
    let mut next: HashMap<(u32, HopPoint), Vec<usize>> = HashMap::new();
    for (i, r) in raw.iter().enumerate() {
        next.entry((r.key.path, r.key.from)).or_default().push(i);
    }
    let mut found = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        if r.key.path == path_hash(0, &r.key.from) {
            walk(raw, &next, i, &mut Vec::new(), &mut found);
        }
    }
    found.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let total: u64 = found.iter().map(|(_, n)| n).sum();
    let shown = found
        .iter()
        .take(MAX_PATHS)
        .take_while(|(_, n)| *n as f64 >= MIN_SHARE * total as f64)
        .count();
    let rare = RarePaths {
        paths: found.len() - shown,
        packets: found[shown..].iter().map(|(_, n)| n).sum(),
    };
    let paths = found
        .into_iter()
        .take(shown)
        .map(|(chain, packets)| path_report(raw, &chain, packets, namer))
        .collect();
    (paths, rare)
}

/// Longer chains than this are not followed (a hash collision could make a cycle).
const MAX_HOPS: usize = 64;

fn walk(
    raw: &[&Raw],
    next: &HashMap<(u32, HopPoint), Vec<usize>>,
    i: usize,
    chain: &mut Vec<usize>,
    found: &mut Vec<(Vec<usize>, u64)>,
) {
    chain.push(i);
    let key = raw[i].key;
    let children = next
        .get(&(path_hash(key.path, &key.to), key.to))
        .map(Vec::as_slice)
        .unwrap_or_default();
    let onward: u64 = children.iter().map(|&c| raw[c].count).sum();
    let ended = raw[i].count.saturating_sub(onward);
    if ended > 0 {
        found.push((chain.clone(), ended));
    }
    if chain.len() < MAX_HOPS {
        for &c in children {
            walk(raw, next, c, chain, found);
        }
    }
    chain.pop();
}

fn path_report(raw: &[&Raw], chain: &[usize], packets: u64, namer: &mut Namer) -> AttachPath {
    let first = raw[chain[0]].key.from;
    let mut hops = vec![namer.hop(&first).name.clone()];
    let mut segments = Vec::new();
    for &i in chain {
        let r = raw[i];
        hops.push(namer.hop(&r.key.to).name.clone());
        segments.push(named(r.clone(), namer));
    }
    disambiguate(&mut segments);
    AttachPath {
        packets,
        hops,
        segments,
    }
}

/// The journeys that ended in a drop, by last hop and reason, most first.
pub fn read_drops(programs: &Programs, namer: &mut Namer) -> Result<Vec<AttachDrop>> {
    let map: PerCpuHashMap<_, DropKey, u64> = PerCpuHashMap::try_from(programs.map("DROPS")?)?;
    let mut drops = Vec::new();
    for entry in map.iter() {
        let (key, per_cpu) = entry.context("reading the drop counts")?;
        let reason = namer.drop_reasons.name(key.reason);
        let protocol = protocols::name(key.ethertype, key.ip_proto);
        let hop = namer.hop(&key.last);
        drops.push(AttachDrop {
            hint: protocols::hint(&reason, &protocol).map(str::to_string),
            reason,
            protocol,
            after: hop.name.clone(),
            pod: hop.pod.clone(),
            namespace: hop.namespace.clone(),
            packets: per_cpu.iter().sum(),
        });
    }
    drops.sort_by(|a, b| b.packets.cmp(&a.packets).then(a.after.cmp(&b.after)));
    Ok(drops)
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
        multicast_not_followed: at(COUNTER_GROUP),
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
        pod: None,
        namespace: None,
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
    use crate::{datapath::path::Attached, lab::target::Devices};
    use profiler_common::hist_bucket;

    fn point(ifindex: u32) -> HopPoint {
        HopPoint {
            ifindex,
            netns: 1,
            hook: profiler_common::HookId::NetDevQueue as u8,
            ..Default::default()
        }
    }

    /// The histogram of segment a -> b reached by the path `before` (the hops before b).
    fn raw(before: &[u32], to: u32, count: u64) -> Raw {
        let path = before.iter().fold(0, |h, &i| path_hash(h, &point(i)));
        Raw {
            key: SegmentKey {
                from: point(*before.last().expect("a first hop")),
                to: point(to),
                path,
            },
            buckets: vec![0; HIST_BUCKETS],
            count,
            sum: count * 1000,
        }
    }

    #[test]
    fn segments_chain_into_the_paths_journeys_took() {
        let namer = || {
            let devices = Devices {
                name: "test".into(),
                namespaces: Vec::new(),
                interfaces: Vec::new(),
                pods: Vec::new(),
            };
            Namer::new(devices, Attached::from_statuses(&[]), Default::default()).expect("a namer")
        };
        // 16 journeys cross 1 -> 2; 10 go on to 3, 5 to 4 (then 4 -> 5), 1 ends at 2. Another
        // way reaches 2 -> 3 from 9: its histogram is its own.
        let raw = [
            raw(&[1], 2, 16),
            raw(&[1, 2], 3, 10),
            raw(&[1, 2], 4, 5),
            raw(&[1, 2, 4], 5, 5),
            raw(&[9], 2, 3),
            raw(&[9, 2], 3, 3),
        ];
        let raw: Vec<&Raw> = raw.iter().collect();
        let (paths, rare) = paths(&raw, &mut namer());
        let shape: Vec<(u64, usize)> = paths
            .iter()
            .map(|p| (p.packets, p.segments.len()))
            .collect();
        assert_eq!(shape, [(10, 2), (5, 3), (3, 2), (1, 1)], "{paths:#?}");
        assert_eq!(paths[0].hops.len(), 3);
        assert_eq!(
            paths[1].segments[0].count, 16,
            "a shared first segment counts every journey"
        );
        assert_eq!((rare.paths, rare.packets), (0, 0));
        // The merged view has one segment per (from, to).
        assert_eq!(segments(&raw, &mut namer()).len(), 5);
    }

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
