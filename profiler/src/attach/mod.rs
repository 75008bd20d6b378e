//! `profiler attach`: per-hop latency of real traffic on a live node, without generating any.
//!
//! The kernel follows each packet that enters through a device in scope by its buffer and keeps
//! per-segment histograms (profiler-ebpf's `follow`); this side resolves the targets to devices,
//! reads the histograms, names the segments after the devices, and reports them: a table, JSON,
//! Prometheus metrics, and in `--mode events` one JSON line per journey.

pub mod across;
pub mod events;
pub mod filter;
pub mod histograms;
mod link;
mod live;
pub mod metrics;
pub mod otlp;
mod packets;
pub mod scope;
pub mod services;
mod stitch;
pub mod wire;
pub mod workload;

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, RingBuf};

use crate::{
    datapath::{path::Attached, Mode},
    kernel::{
        self,
        btf::KernelBtf,
        programs::{FollowConfig, LoadConfig, Programs},
        ring::DRAIN_EVERY,
    },
    lab::discover,
    progress,
    report::schema::{AttachReport, HookSet, JourneyLine, SightingLine, ATTACH_SCHEMA},
    signal,
};
use events::OpenJourneys;
use histograms::{journey_counts, read_drops, read_segments, read_segments_and_paths, Histograms};
use scope::{scope, Fingerprint, Namer};
use services::Services;

/// How often the Prometheus snapshot is refreshed from the kernel's histograms.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// How often the node is looked at for pods that came or went (a cheap look: a directory and
/// one CRI call; the scope is resolved again only when they changed).
const RESCAN_EVERY: Duration = Duration::from_millis(500);
/// After the node changed, how many more looks resolve the scope whatever the fingerprint says:
/// a CNI plugin creates a pod's devices after its namespace and renames them (a temporary name,
/// then eth0), which changes no namespace name nor pod id, so one look would keep half-made
/// devices and their first names.
const SETTLE_LOOKS: u32 = 4;

pub struct AttachArgs {
    /// Pods by [NAMESPACE/]NAME pattern, followed as they come and go.
    pub pods: Vec<crate::pods::Pattern>,
    /// Where pods are looked up: the CRI runtime, the CNI cache, /run/netns.
    pub pod_sources: crate::pods::Sources,
    /// Network namespaces: names (ip netns), paths of namespace files, or process ids.
    pub netns: Vec<String>,
    /// This node's name in the report and its sightings (None: the host name).
    pub node: Option<String>,
    /// Interfaces of the caller's namespace.
    pub ifaces: Vec<String>,
    /// Cgroup (v2) directories whose sockets' packets start journeys.
    pub cgroups: Vec<std::path::PathBuf>,
    /// Wire-facing devices, [NETNS:]IFACE: packets crossing them are reported with what they
    /// carry on the wire.
    pub wire: Vec<String>,
    /// Where each of those sightings is written as a JSON line, if anywhere.
    pub sightings: Option<Box<dyn std::io::Write + Send + Sync>>,
    /// Whether the sightings are kept as lines for the caller (`attach` returns them).
    pub keep_sightings: bool,
    /// Where the sightings go as they are read for the links on /metrics (`--peer` with
    /// `--prometheus`; set by across.rs).
    pub live: Option<live::Feed>,
    /// `--mode events`: where the journey lines are written (None: stdout), and where they are
    /// also sent, for a join with other nodes' journeys (set by across.rs).
    pub journeys: Option<Box<dyn std::io::Write + Send + Sync>>,
    pub keep_journeys: Option<tokio::sync::mpsc::UnboundedSender<JourneyLine>>,
    /// `--otlp`: the packets joined across nodes, one in N, as traces (filled by across.rs).
    pub traces: Option<otlp::Traces>,
    pub filter: String,
    pub follow: FollowConfig,
    pub duration: Option<Duration>,
    pub prometheus: Option<SocketAddr>,
    /// Measure each program's kernel cost (bpf_stats) while attached.
    pub stats: bool,
    pub hooks: HookSet,
    /// No progress on stderr.
    pub quiet: bool,
    /// A workload to run once everything is attached, followed until it exits (empty: none).
    pub command: Vec<String>,
    /// For a caller that drives the attach (a guest's agent, for its host): told when it
    /// follows, and stops it.
    pub control: Option<Control>,
}

/// See [`AttachArgs::control`].
pub struct Control {
    pub following: tokio::sync::oneshot::Sender<()>,
    pub stop: tokio::sync::oneshot::Receiver<()>,
}

/// Attaches, follows until the duration ends or SIGINT/SIGTERM arrives, and reports, with the
/// sightings kept (`keep_sightings`). Whatever it attached is detached when it returns: every
/// attachment is a link owned by this process.
pub async fn attach(args: &mut AttachArgs) -> Result<(AttachReport, Vec<SightingLine>)> {
    let filter_text = args.filter.trim().to_string();
    let scope = scope(args, true).await?;
    let services = through_services(args, &scope.nat_namespaces);
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
        return Err(kernel::MissingHook(
            "--cgroup: this kernel's sockets carry no cgroup (no sock.sk_cgrp_data in its BTF)"
                .into(),
        )
        .into());
    }
    let mut programs = Programs::load(
        &btf,
        &LoadConfig {
            follow: args.follow,
            ..Default::default()
        },
    )?;
    let hook_set = programs.attach_set(&btf, Mode::Attach, args.hooks)?;
    if !services.is_empty() {
        let nat: Vec<Option<&str>> = (Services::namespaces(&services).into_iter())
            .map(discover::ns_arg)
            .collect();
        programs.attach_netfilter(Mode::Attach, &nat);
    }
    let mut redirected = Vec::new();
    follow_redirects(&mut programs, &mut redirected, scope.redirected);
    let _stats = kernel::stats_while(args.stats)?;
    let slots = write_scope(&mut programs, &[], &scope.points)?;
    write_table(&mut programs, "WIRE", &scope::slots(&scope.wire)?)?;
    {
        let mut map: BpfHashMap<_, u64, u8> = BpfHashMap::try_from(programs.map_mut("CGROUPS")?)?;
        for id in &scope.cgroups {
            map.insert(id, 1, 0).context("filling the cgroup map")?;
        }
    }
    let mut tracked = Tracked {
        current: scope.labels.clone(),
        labels: scope.labels,
        // None yet: the first look resolves the scope again, with its fingerprint taken
        // before its listing.
        fingerprint: Fingerprint::default(),
        settling: 0,
        source: scope.source,
        slots,
        histograms: Histograms::default(),
        redirected,
    };
    let mut namer = Namer::new(
        scope.devices,
        Attached::from_statuses(&programs.statuses),
        btf.drop_reasons(),
    )?;
    let node = args.node.clone().unwrap_or_else(node_name);
    // The snapshot /metrics serves exists only with --prometheus.
    let snapshot = listener
        .as_ref()
        .map(|_| Arc::new(RwLock::new(metrics::Snapshot::default())));
    let (live_lines, links) = match args.live.take() {
        Some(f) => (Some(f.lines), f.links),
        None => (None, metrics::Links::default()),
    };
    let server = listener
        .zip(snapshot.clone())
        .map(|(l, snap)| tokio::spawn(metrics::serve(l, snap, links)));
    let mut ring = if args.follow.stream {
        Some(programs.take_ring("HOP_EVENTS")?)
    } else {
        None
    };
    let mut wire = if scope.wire.is_empty() {
        None
    } else {
        Some(Wire {
            ring: programs.take_ring("WIRE_EVENTS")?,
            sightings: wire::Sightings::new(
                &node,
                args.sightings.take(),
                args.keep_sightings,
                live_lines,
            ),
        })
    };
    let started = Instant::now();
    let mut child = workload::spawn(&args.command)?;
    let mut state = State {
        programs: &mut programs,
        node: &node,
        snapshot: snapshot.as_deref(),
        tracked: &mut tracked,
        wire: wire.as_mut(),
    };
    let (ended, events_read) =
        follow_loop(args, &mut state, &mut namer, ring.as_mut(), child.as_mut()).await?;
    let command = match child {
        Some(c) => Some(workload::finish(c, &args.command, ended).await?),
        None => None,
    };
    if let Some(s) = server {
        s.abort();
    }
    let (segments, paths, rare_paths) =
        read_segments_and_paths(&mut programs, &mut namer, &mut tracked.histograms)?;
    let (journeys, lost) = journey_counts(&programs)?;
    let drops = read_drops(&programs, &mut namer)?;
    let (wire, sightings) = match wire {
        Some(w) => {
            let (summary, lines) = w.sightings.summary(args.wire.clone(), &mut namer);
            (Some(summary), lines)
        }
        None => (None, Vec::new()),
    };
    let report = AttachReport {
        made: None,
        schema: ATTACH_SCHEMA.into(),
        kernel: kernel::release(),
        node,
        targets: tracked.labels,
        services: Services::lines(&services),
        filter: filter_text,
        sample: args.follow.sample.max(1),
        mode: if args.follow.stream {
            "events"
        } else {
            "summary"
        }
        .into(),
        duration_s: started.elapsed().as_secs_f64(),
        segments,
        paths,
        rare_paths,
        journeys,
        drops,
        lost_events: lost,
        events_read,
        hook_set,
        hooks: programs.statuses.clone(),
        program_costs: args.stats.then(|| programs.costs()),
        command,
        wire,
        peers: Vec::new(),
        links: Vec::new(),
    };
    Ok((report, sightings))
}

/// The Services translated where the scope's packets meet a NAT; the filter made to match a
/// host's packets on both sides of their NAT.
fn through_services(args: &mut AttachArgs, namespaces: &[String]) -> Vec<Services> {
    let (found, notices) = services::read(namespaces);
    for notice in notices.iter().filter(|_| !args.quiet) {
        eprintln!("attach: {notice}");
    }
    let aliases = Services::aliases(&found);
    if !aliases.is_empty() && !args.filter.trim().is_empty() {
        match filter::compile_through(&args.filter, &aliases) {
            Ok(f) => args.follow.filter = f,
            Err(e) if !args.quiet => eprintln!(
                "attach: the filter stays as written, on one side of the Services' NAT: {e:#}"
            ),
            Err(_) => {}
        }
    }
    found
}

/// What the follow loop reads and where it publishes.
struct State<'a> {
    programs: &'a mut Programs,
    node: &'a str,
    /// /metrics' snapshot, with --prometheus.
    snapshot: Option<&'a RwLock<metrics::Snapshot>>,
    tracked: &'a mut Tracked,
    wire: Option<&'a mut Wire>,
}

/// `--wire`: the kernel's ring of sightings, and what was read from it.
struct Wire {
    ring: RingBuf<MapData>,
    sightings: wire::Sightings,
}

impl Wire {
    fn drain(&mut self, namer: &mut Namer) -> Result<()> {
        self.sightings.drain(&mut self.ring, namer)
    }
}

/// The scope as it changes while attached: pods that come and go.
struct Tracked {
    /// Every target followed at some time, for the report.
    labels: Vec<String>,
    /// The targets of the scope now.
    current: Vec<String>,
    fingerprint: Fingerprint,
    /// Looks left that resolve the scope even if the fingerprint did not change.
    settling: u32,
    source: crate::pods::Source,
    /// The scope table's filled slots.
    slots: Vec<(u32, u64)>,
    histograms: Histograms,
    /// The interfaces behind an eBPF datapath with attach's tc program, as (netns, ifname).
    redirected: Vec<(String, String)>,
}

/// Puts attach's tc program on the ingress of each interface of `now` that an eBPF datapath
/// delivers to by peer redirect and that is not in `done` yet (a pod born behind it), and
/// records it there.
fn follow_redirects(
    programs: &mut Programs,
    done: &mut Vec<(String, String)>,
    now: Vec<(String, String)>,
) {
    for r in now {
        if !done.contains(&r) {
            programs.attach_tc(Mode::Attach, discover::ns_arg(&r.0), &r.1, true);
            done.push(r);
        }
    }
}

/// Fills the kernel's scope table for `points`, given the slots filled before: the new keys
/// first, then the slots no longer used cleared, so a device in both scopes is never missed.
fn write_scope(
    programs: &mut Programs,
    before: &[(u32, u64)],
    points: &[[u32; 2]],
) -> Result<Vec<(u32, u64)>> {
    let after = scope::slots(points)?;
    let new: Vec<_> = after
        .iter()
        .filter(|s| !before.contains(s))
        .copied()
        .collect();
    write_table(programs, "SCOPE", &new)?;
    let mut map: Array<_, u64> = Array::try_from(programs.map_mut("SCOPE")?)?;
    for &(slot, _) in before
        .iter()
        .filter(|(s, _)| !after.iter().any(|(a, _)| a == s))
    {
        map.set(slot, 0, 0).context("clearing the scope map")?;
    }
    Ok(after)
}

/// Puts device keys in their slots of a direct-mapped table (SCOPE, WIRE).
fn write_table(programs: &mut Programs, name: &str, slots: &[(u32, u64)]) -> Result<()> {
    let mut map: Array<_, u64> = Array::try_from(programs.map_mut(name)?)?;
    for &(slot, key) in slots {
        map.set(slot, key, 0)
            .with_context(|| format!("filling the {name} map"))?;
    }
    Ok(())
}

/// Looks at the node again if its pods or namespaces changed, or changed lately: new pods'
/// devices join the scope, departed ones' leave it and their segments are retired.
async fn rescan(args: &AttachArgs, state: &mut State<'_>, namer: &mut Namer) -> Result<()> {
    let fingerprint = Fingerprint::of(&args.pod_sources, &state.tracked.source).await;
    let tracked = &mut state.tracked;
    if fingerprint != tracked.fingerprint {
        tracked.settling = SETTLE_LOOKS;
    } else if tracked.settling == 0 {
        return Ok(());
    } else {
        tracked.settling -= 1;
    }
    let mut new = scope(args, false).await?;
    namer.keep_pod_names(&mut new.devices);
    let inodes = namer.inodes_of(&new.devices)?;
    let gone = namer.departures(&new.devices, &inodes);
    if !gone.is_empty() {
        state
            .tracked
            .histograms
            .retire(state.programs, namer, |p| gone.has(p))?;
    }
    state.tracked.slots = write_scope(state.programs, &state.tracked.slots, &new.points)?;
    follow_redirects(
        state.programs,
        &mut state.tracked.redirected,
        new.redirected,
    );
    if !args.quiet {
        say_changes(&state.tracked.current, &new.labels);
    }
    state.tracked.current.clone_from(&new.labels);
    namer.update(new.devices, inodes);
    state.tracked.fingerprint = fingerprint;
    state.tracked.source = new.source;
    for label in new.labels {
        if !state.tracked.labels.contains(&label) {
            state.tracked.labels.push(label);
        }
    }
    Ok(())
}

/// "attach: + pod shop/web-3", "attach: - pod shop/web-2" on stderr.
fn say_changes(before: &[String], after: &[String]) {
    let pods = |l: &[String]| -> Vec<String> {
        l.iter()
            .filter(|l| l.starts_with("pod "))
            .cloned()
            .collect()
    };
    let (before, after) = (pods(before), pods(after));
    for l in after.iter().filter(|l| !before.contains(l)) {
        eprintln!("attach: following {l}");
    }
    for l in before.iter().filter(|l| !after.contains(l)) {
        eprintln!("attach: {l} went away; its segments are kept for the report");
    }
}

/// Follows until the duration ends, a signal arrives or the workload exits, and says which;
/// with the ring (events mode), how many hop events it read.
async fn follow_loop(
    args: &mut AttachArgs,
    state: &mut State<'_>,
    namer: &mut Namer,
    mut ring: Option<&mut RingBuf<MapData>>,
    mut child: Option<&mut tokio::process::Child>,
) -> Result<(workload::Ended, Option<u64>)> {
    let mut signals = signal::Signals::install()?;
    let (following, mut stop) = match args.control.take() {
        Some(c) => (Some(c.following), Some(c.stop)),
        None => (None, None),
    };
    let asked = async {
        match stop.as_mut() {
            // A dropped sender asks too: whoever drove the attach is gone.
            Some(s) => {
                let _ = s.await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(asked);
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
    let mut look = tokio::time::interval(RESCAN_EVERY);
    // One notice per distinct failure to look at the node again, not one per look.
    let mut last_failure = String::new();
    let mut journeys = OpenJourneys::new(
        args.follow.max_gap_ns,
        args.journeys.take(),
        args.keep_journeys.take(),
    );
    let begun = Instant::now();
    let progress = match args.duration {
        Some(d) => progress::bar(d.as_secs().max(1), "s", args.quiet),
        None => progress::spinner(args.quiet),
    };
    if !args.quiet {
        let until = if child.is_some() {
            "until the command exits or Ctrl-C"
        } else {
            "stop with Ctrl-C"
        };
        eprintln!("attach: following; {until}");
    }
    if let Some(f) = following {
        let _ = f.send(());
    }
    let ended = loop {
        tokio::select! {
            _ = &mut deadline => break workload::Ended::Duration,
            _ = &mut asked => break workload::Ended::Asked,
            name = signals.recv() => break workload::Ended::Signal(name),
            status = workload::wait(child.as_deref_mut()) => break workload::Ended::Exited(status?),
            _ = drain.tick(), if ring.is_some() || state.wire.is_some() => {
                if let Some(r) = ring.as_deref_mut() {
                    journeys.drain(r, namer)?;
                }
                if let Some(w) = state.wire.as_deref_mut() {
                    w.drain(namer)?;
                }
            }
            _ = look.tick() => {
                if let Err(e) = rescan(args, state, namer).await {
                    let text = format!("{e:#}");
                    if text != last_failure && !args.quiet {
                        eprintln!("attach: cannot look for pods that came or went: {text}");
                    }
                    last_failure = text;
                }
            }
            _ = snap.tick() => {
                let (counts, lost) = journey_counts(state.programs)?;
                progress.set_position(begun.elapsed().as_secs());
                progress.set_message(format!(
                    "{} journeys started, {lost} events lost",
                    counts.started
                ));
                // Drained every tick, /metrics or not: the kernel's tables hold one tick's
                // segments.
                state.tracked.histograms.drain(state.programs)?;
                if let Some(snapshot) = state.snapshot {
                    let segments = read_segments(namer, &state.tracked.histograms);
                    let drops = read_drops(state.programs, namer)?;
                    *snapshot.write().unwrap_or_else(|e| e.into_inner()) = metrics::Snapshot {
                        node: state.node.to_string(),
                        segments,
                        journeys: counts,
                        drops,
                        lost_events: lost,
                        hooks: state.programs.statuses.clone(),
                    };
                }
            }
        }
    };
    if let Some(w) = state.wire.as_deref_mut() {
        w.drain(namer)?;
    }
    let Some(r) = ring else {
        return Ok((ended, None));
    };
    journeys.drain(r, namer)?;
    journeys.flush_all(namer)?;
    Ok((ended, Some(journeys.read)))
}

pub(crate) fn node_name() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.nodename().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}
