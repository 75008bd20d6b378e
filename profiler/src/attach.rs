//! `profiler attach`: per-hop latency of real traffic on a live node, without generating any.
//!
//! The kernel follows each packet that enters through a device in scope by its buffer and keeps
//! per-segment histograms (profiler-ebpf's `follow`); this side resolves the targets to devices,
//! reads the histograms, names the segments after the devices, and reports them: a table, JSON,
//! Prometheus metrics, and in `--mode events` one JSON line per journey.

use std::{
    collections::HashMap,
    io::Write as _,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap, RingBuf};
use profiler_common::{
    hist_bucket_range, HookId, HopEvent, HopPoint, SegmentKey, COUNTER_ABANDONED, COUNTER_CONSUMED,
    COUNTER_DROPPED, COUNTER_LOST, COUNTER_REHEADED, COUNTER_STARTED, END_CONSUMED, END_DROPPED,
    HIST_BUCKETS,
};
use serde::Serialize;

use crate::{
    btf::KernelBtf,
    datapath::{HookSet, Mode, Point},
    doctor,
    hooks::{FollowConfig, HookStatus, ProbeConfig, Probes, ProgramCost},
    journey::HopKey,
    lab::discover::{self, ROOT},
    metrics, netns,
    path::{self, Attached, Hop, Inodes},
    target::Devices,
};

pub const ATTACH_SCHEMA: &str = "profiler.attach.v1";
const DRAIN_EVERY: Duration = Duration::from_millis(5);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How often the Prometheus snapshot is refreshed from the kernel's histograms.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);

pub struct AttachArgs {
    /// Network namespaces: names (ip netns), paths of namespace files, or process ids.
    pub netns: Vec<String>,
    /// Interfaces of the caller's namespace.
    pub ifaces: Vec<String>,
    /// Cgroup (v2) directories whose sockets' packets start journeys.
    pub cgroups: Vec<std::path::PathBuf>,
    pub filter: String,
    pub follow: FollowConfig,
    pub duration: Option<Duration>,
    pub prometheus: Option<SocketAddr>,
    /// Measure each program's kernel cost (bpf_stats) while attached.
    pub stats: bool,
    pub hooks: HookSet,
}

#[derive(Debug, Serialize)]
pub struct AttachReport {
    pub schema: &'static str,
    pub kernel: String,
    pub node: String,
    pub targets: Vec<String>,
    pub filter: String,
    pub sample: u32,
    pub mode: &'static str,
    pub duration_s: f64,
    pub segments: Vec<SegmentSummary>,
    pub journeys: JourneyCounts,
    pub lost_events: u64,
    /// The hooks in effect: deep, or stable where no deep hook could attach.
    pub hook_set: HookSet,
    pub hooks: Vec<HookStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub program_costs: Option<Vec<ProgramCost>>,
}

/// One segment's latency: two consecutive hops of followed packets.
#[derive(Clone, Debug, Serialize)]
pub struct SegmentSummary {
    pub name: String,
    pub from: String,
    pub to: String,
    /// Where the segment ends: the namespace and interface of its second hop.
    pub netns: String,
    pub ifname: String,
    pub count: u64,
    pub mean_ns: f64,
    pub p50_ns: f64,
    pub p90_ns: f64,
    pub p99_ns: f64,
    #[serde(skip)]
    pub buckets: Vec<u64>,
    #[serde(skip)]
    pub sum_ns: u64,
}

/// What became of the journeys: nothing is lost silently.
#[derive(Clone, Debug, Default, Serialize)]
pub struct JourneyCounts {
    pub started: u64,
    /// Ended where the buffer was freed after use (consume_skb).
    pub consumed: u64,
    /// Ended in a drop (kfree_skb).
    pub dropped: u64,
    /// Their buffer was later seen carrying another packet: freed where no hook saw it (TCP
    /// receive frees without a tracepoint), so they ended at their last hop.
    pub ended_unseen: u64,
    /// Kept across a reallocated buffer.
    pub reheaded: u64,
    /// No end seen: still in flight, past the gap limit, or evicted from the in-flight map.
    pub unfinished: u64,
}

/// The devices and cgroups of the targets: where journeys start.
struct Scope {
    labels: Vec<String>,
    points: Vec<[u32; 2]>,
    cgroups: Vec<u64>,
    devices: Devices,
}

/// A cgroup v2 directory's id: the kernel's kernfs node id, which is its inode number.
fn cgroup_id(path: &std::path::Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let fs = nix::sys::statfs::statfs(path)
        .map_err(|e| anyhow::anyhow!("cannot read cgroup {}: {e}", path.display()))?;
    if fs.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        bail!(
            "{} is not a cgroup v2 directory (mounted as cgroup2, e.g. /sys/fs/cgroup)",
            path.display()
        );
    }
    Ok(std::fs::metadata(path)?.ino())
}

/// A --netns argument as the netns module takes it: a name, or the path of a namespace file.
fn netns_ref(arg: &str) -> Result<String> {
    let ns = if arg.bytes().all(|b| b.is_ascii_digit()) {
        format!("/proc/{arg}/ns/net")
    } else {
        arg.to_string()
    };
    if !netns::exists(&ns) {
        bail!("unknown network namespace {arg}");
    }
    Ok(ns)
}

async fn scope(args: &AttachArgs) -> Result<Scope> {
    if args.netns.is_empty() && args.ifaces.is_empty() && args.cgroups.is_empty() {
        bail!("nothing to attach to: give --netns, --iface or --cgroup");
    }
    let cgroups = args
        .cgroups
        .iter()
        .map(|p| cgroup_id(p))
        .collect::<Result<Vec<_>>>()?;
    let targets: Vec<String> = args
        .netns
        .iter()
        .map(|a| netns_ref(a))
        .collect::<Result<_>>()?;
    let mut namespaces = discover::namespaces()?;
    for t in &targets {
        if !namespaces.contains(t) {
            namespaces.push(t.clone());
        }
    }
    let interfaces = discover::interfaces(&namespaces).await?;
    let mut points = Vec::new();
    let mut labels = Vec::new();
    for t in &targets {
        let inode = discover::inode(t)?;
        points.extend(
            interfaces
                .iter()
                .filter(|i| &i.netns == t)
                .map(|i| [inode, i.ifindex]),
        );
        labels.push(format!("netns {t}"));
    }
    let root = discover::inode(ROOT)?;
    for name in &args.ifaces {
        let Some(i) = interfaces
            .iter()
            .find(|i| i.netns == ROOT && &i.ifname == name)
        else {
            bail!("unknown interface {name}");
        };
        points.push([root, i.ifindex]);
        labels.push(format!("iface {name}"));
    }
    labels.extend(
        args.cgroups
            .iter()
            .map(|p| format!("cgroup {}", p.display())),
    );
    if points.is_empty() && cgroups.is_empty() {
        bail!("the targets have no network devices to attach to");
    }
    Ok(Scope {
        labels,
        points,
        cgroups,
        devices: Devices {
            name: "node".into(),
            namespaces,
            interfaces,
        },
    })
}

/// Names hops and segments after the node's devices.
struct Namer {
    devices: Devices,
    inodes: Inodes,
    attached: Attached,
    hops: HashMap<HopPoint, Hop>,
    drop_reasons: HashMap<u32, String>,
}

impl Namer {
    fn hop(&mut self, p: &HopPoint) -> &Hop {
        self.hops.entry(*p).or_insert_with(|| {
            let key = HopKey {
                point: Point::Hook(HookId::from_u8(p.hook).unwrap_or(HookId::NetDevQueue)),
                netns: p.netns,
                ifindex: p.ifindex,
            };
            path::describe(
                &[key],
                &[p.flags],
                &self.devices,
                &self.inodes,
                &self.attached,
            )
            .remove(0)
        })
    }

    /// The segment's name and its two hops.
    fn segment(&mut self, k: &SegmentKey) -> (String, Hop, Hop) {
        let (a, b) = (self.hop(&k.from).clone(), self.hop(&k.to).clone());
        let name = path::segment_names(&[a.clone(), b.clone()], &self.devices).remove(0);
        (name, a, b)
    }
}

/// Attaches, follows until the duration ends or SIGINT/SIGTERM arrives, and reports. Whatever
/// it attached is detached when it returns: every attachment is a link owned by this process.
pub async fn attach(args: &AttachArgs) -> Result<AttachReport> {
    let filter_text = args.filter.trim().to_string();
    let scope = scope(args).await?;
    let listener = match args.prometheus {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for --prometheus"))?,
        ),
        None => None,
    };
    let btf = KernelBtf::load()?;
    if !scope.cgroups.is_empty() && btf.kernel_offsets()?.sk_cgroup == profiler_common::NO_OFFSET {
        bail!("--cgroup: this kernel's sockets carry no cgroup (no sock.sk_cgrp_data in its BTF)");
    }
    let mut probes = Probes::load(
        &btf,
        &ProbeConfig {
            follow: args.follow,
            ..Default::default()
        },
    )?;
    let hook_set = probes.attach_set(&btf, Mode::Follow, args.hooks)?;
    let _stats = if args.stats {
        Some(aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling bpf_stats")?)
    } else {
        None
    };
    {
        let mut map: BpfHashMap<_, [u32; 2], u8> = BpfHashMap::try_from(probes.map_mut("SCOPE")?)?;
        for p in &scope.points {
            map.insert(p, 1, 0).context("filling the scope map")?;
        }
        let mut map: BpfHashMap<_, u64, u8> = BpfHashMap::try_from(probes.map_mut("CGROUPS")?)?;
        for id in &scope.cgroups {
            map.insert(id, 1, 0).context("filling the cgroup map")?;
        }
    }
    let mut namer = Namer {
        inodes: Inodes::of(&scope.devices)?,
        attached: Attached::from_probes(&probes),
        devices: scope.devices,
        hops: HashMap::new(),
        drop_reasons: btf.drop_reasons(),
    };
    let node = node_name();
    // The snapshot /metrics serves exists only with --prometheus.
    let snapshot = listener
        .as_ref()
        .map(|_| Arc::new(RwLock::new(metrics::Snapshot::default())));
    let server = listener
        .zip(snapshot.clone())
        .map(|(l, snap)| tokio::spawn(metrics::serve(l, snap)));
    let mut ring = if args.follow.stream {
        Some(probes.take_ring("HOP_EVENTS")?)
    } else {
        None
    };
    let started = Instant::now();
    let state = State {
        probes: &probes,
        node: &node,
        snapshot: snapshot.as_deref(),
    };
    follow_loop(args, &state, &mut namer, ring.as_mut()).await?;
    if let Some(s) = server {
        s.abort();
    }
    let segments = read_segments(&probes, &mut namer)?;
    let (journeys, lost) = journey_counts(&probes)?;
    Ok(AttachReport {
        schema: ATTACH_SCHEMA,
        kernel: doctor::kernel_release(),
        node,
        targets: scope.labels,
        filter: filter_text,
        sample: args.follow.sample.max(1),
        mode: if args.follow.stream {
            "events"
        } else {
            "summary"
        },
        duration_s: started.elapsed().as_secs_f64(),
        segments,
        journeys,
        lost_events: lost,
        hook_set,
        hooks: probes.statuses.clone(),
        program_costs: args.stats.then(|| probes.costs()),
    })
}

/// What the follow loop reads and where it publishes.
struct State<'a> {
    probes: &'a Probes,
    node: &'a str,
    /// /metrics' snapshot, with --prometheus.
    snapshot: Option<&'a RwLock<metrics::Snapshot>>,
}

async fn follow_loop(
    args: &AttachArgs,
    state: &State<'_>,
    namer: &mut Namer,
    mut ring: Option<&mut RingBuf<MapData>>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let until = args.duration.map(|d| tokio::time::Instant::now() + d);
    let deadline = async {
        match until {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    let mut snap = tokio::time::interval(SNAPSHOT_EVERY);
    let mut journeys = Journeys::new(args.follow.max_gap_ns);
    let begun = Instant::now();
    let mut last_progress = Instant::now();
    eprintln!("attach: following; stop with Ctrl-C");
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = drain.tick(), if ring.is_some() => {
                if let Some(r) = ring.as_deref_mut() {
                    journeys.drain(r, namer)?;
                }
            }
            _ = snap.tick() => {
                let (counts, lost) = journey_counts(state.probes)?;
                if last_progress.elapsed() >= PROGRESS_EVERY {
                    last_progress = Instant::now();
                    eprintln!(
                        "attach: {:.0} s, {} journeys started, {lost} events lost",
                        begun.elapsed().as_secs_f64(),
                        counts.started,
                    );
                }
                if let Some(snapshot) = state.snapshot {
                    let segments = read_segments(state.probes, namer)?;
                    *snapshot.write().unwrap_or_else(|e| e.into_inner()) = metrics::Snapshot {
                        node: state.node.to_string(),
                        segments,
                        journeys: counts,
                        lost_events: lost,
                        hooks: state.probes.statuses.clone(),
                    };
                }
            }
        }
    }
    if let Some(r) = ring {
        journeys.drain(r, namer)?;
        journeys.flush_all(namer)?;
    }
    Ok(())
}

/// The kernel's histograms, named.
fn read_segments(probes: &Probes, namer: &mut Namer) -> Result<Vec<SegmentSummary>> {
    let map: PerCpuHashMap<_, SegmentKey, profiler_common::Histogram> =
        PerCpuHashMap::try_from(probes.map("HISTOGRAMS")?)?;
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
fn journey_counts(probes: &Probes) -> Result<(JourneyCounts, u64)> {
    let c = probes.counters()?;
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

fn node_name() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.nodename().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// `--mode events`: hops grouped into journeys, each printed as one JSON line when it ends.
struct Journeys {
    open: HashMap<(u64, u64), Vec<HopEvent>>,
    max_gap_ns: u64,
    last_flush: Instant,
}

#[derive(Serialize)]
struct JourneyLine<'a> {
    journey: String,
    start_ns: u64,
    /// consumed, dropped, or unseen (no hook saw the buffer freed within the gap limit), or
    /// in-flight when the profiler stopped first.
    end: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    drop_reason: Option<String>,
    hops: Vec<HopLine>,
}

#[derive(Serialize)]
struct HopLine {
    hop: String,
    /// Nanoseconds since the journey's first hop.
    at_ns: u64,
    len: u32,
}

impl Journeys {
    fn new(max_gap_ns: u64) -> Self {
        Journeys {
            open: HashMap::new(),
            max_gap_ns,
            last_flush: Instant::now(),
        }
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>, namer: &mut Namer) -> Result<()> {
        while let Some(item) = ring.next() {
            let Some(ev) = crate::collect::decode::<HopEvent>(&item) else {
                continue;
            };
            let id = (ev.journey_head, ev.journey_start_ns);
            let hops = self.open.entry(id).or_default();
            hops.push(ev);
            if ev.end != 0 {
                let hops = self.open.remove(&id).unwrap_or_default();
                let end = if ev.end == END_CONSUMED {
                    "consumed"
                } else {
                    "dropped"
                };
                print_journey(id, &hops, end, namer)?;
            }
        }
        if self.last_flush.elapsed() >= Duration::from_nanos(self.max_gap_ns) {
            self.last_flush = Instant::now();
            self.flush_idle(namer)?;
        }
        Ok(())
    }

    /// Journeys whose last hop is older than the gap limit cannot go on: print them.
    fn flush_idle(&mut self, namer: &mut Namer) -> Result<()> {
        let now = monotonic_ns();
        let idle: Vec<_> = self
            .open
            .iter()
            .filter(|(_, h)| {
                h.last()
                    .is_some_and(|e| now.saturating_sub(e.ts_ns) > self.max_gap_ns)
            })
            .map(|(k, _)| *k)
            .collect();
        for id in idle {
            let hops = self.open.remove(&id).unwrap_or_default();
            print_journey(id, &hops, "unseen", namer)?;
        }
        Ok(())
    }

    fn flush_all(&mut self, namer: &mut Namer) -> Result<()> {
        for (id, hops) in std::mem::take(&mut self.open) {
            print_journey(id, &hops, "in-flight", namer)?;
        }
        Ok(())
    }
}

fn print_journey(id: (u64, u64), hops: &[HopEvent], end: &str, namer: &mut Namer) -> Result<()> {
    let start = id.1;
    let last = hops.last();
    let line = JourneyLine {
        journey: format!("{:x}-{}", id.0, id.1),
        start_ns: start,
        end,
        drop_reason: last.filter(|e| e.end == END_DROPPED).map(|e| {
            namer
                .drop_reasons
                .get(&e.drop_reason)
                .cloned()
                .unwrap_or_else(|| e.drop_reason.to_string())
        }),
        hops: hops
            .iter()
            .map(|e| HopLine {
                hop: namer.hop(&e.point).name.clone(),
                at_ns: e.ts_ns.saturating_sub(start),
                len: e.len,
            })
            .collect(),
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &line)?;
    writeln!(out)?;
    Ok(())
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

pub fn render(r: &AttachReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "attach on {} ({}) for {:.1} s, filter {:?}, 1 packet in {} followed, {} mode",
        r.node,
        r.targets.join(", "),
        r.duration_s,
        r.filter,
        r.sample,
        r.mode
    );
    let _ = writeln!(
        out,
        "{:<56} {:>9} {:>9} {:>9} {:>9}",
        "segment", "packets", "p50 us", "p90 us", "p99 us"
    );
    for s in &r.segments {
        let _ = writeln!(
            out,
            "{:<56} {:>9} {:>9.1} {:>9.1} {:>9.1}",
            s.name,
            s.count,
            s.p50_ns / 1e3,
            s.p90_ns / 1e3,
            s.p99_ns / 1e3
        );
    }
    let j = &r.journeys;
    let _ = writeln!(
        out,
        "journeys: {} started, {} consumed, {} dropped, {} ended unseen, {} unfinished, {} kept across a reallocated buffer; {} events lost",
        j.started, j.consumed, j.dropped, j.ended_unseen, j.unfinished, j.reheaded, r.lost_events
    );
    out += &crate::report::render_hooks(&r.hooks);
    if let Some(costs) = &r.program_costs {
        out += &crate::report::render_costs(costs);
    }
    out
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
