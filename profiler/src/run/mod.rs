//! `profiler run`: bring the lab up if needed, attach, drive tagged traffic and collect what it
//! recorded ([`record`]), then attribute it ([`attribute`]). The run mode's own pieces live
//! here: the traffic (ping-pong [`rr`], [`stream`], [`alltoall`], what they share
//! [`traffic`]), journeys rebuilt from events ([`journey`]), the guest agent of nested paths
//! ([`agent`], [`crossing`]) and `profiler compare` ([`compare`]), which is runs side by side.

pub mod agent;
pub mod alltoall;
mod attribute;
pub mod compare;
pub mod crossing;
pub mod journey;
pub mod record;
pub mod rr;
pub mod stream;
pub mod traffic;

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use profiler_common::{COUNTER_LOST, COUNTER_UNREADABLE, DIR_REQUEST, DIR_RESPONSE};
use tokio::sync::oneshot;

use crate::{
    datapath::{path::Inodes, Mode},
    kernel::{
        self,
        btf::KernelBtf,
        programs::{LoadConfig, Programs},
        ring,
        uprobe::UprobeSpec,
    },
    lab::{self, discover, target::RunTarget, Lab, LabOptions, Lock, Owner, Pod, Topology},
    progress,
    report::schema::{HookSet, HookStatus, RunReport, StreamResult, TrafficKind},
};
use alltoall::AlltoallSpec;
pub use attribute::attribute;
use record::Collected;
use rr::Spec;
use stream::StreamSpec;
use traffic::{Endpoints, Proto};

#[derive(Clone, Debug)]
pub struct RunArgs {
    pub lab: Topology,
    pub proto: Proto,
    pub size: usize,
    pub count: u32,
    pub rate: Option<f64>,
    /// Server port of the tagged traffic; None: one chosen from the run id, so that runs on
    /// different labs at once do not share one.
    pub port: Option<u16>,
    pub stats: bool,
    /// No progress bar.
    pub quiet: bool,
    pub hooks: HookSet,
    pub timeout: Duration,
    /// User probes to add as hops (`--uprobe`).
    pub uprobes: Vec<UprobeSpec>,
    pub traffic: TrafficKind,
    /// How long a stream runs.
    pub duration: Duration,
    /// stream: one message in N is tagged; alltoall: one round in N (every message of it).
    /// None: the traffic's default; Some(0): nothing tagged.
    pub tag_every: Option<u32>,
    /// alltoall: pods per host, processes per pod.
    pub pods: u32,
    pub procs: u32,
}

pub const DEFAULT_STREAM: Duration = Duration::from_secs(5);
pub const DEFAULT_PODS: u32 = 8;
pub const DEFAULT_PROCS: u32 = 2;

/// `--size` when none is given: 64 B ping-pong (sockperf's), 1400 B stream datagrams (one
/// per packet at the usual MTU), 16 KiB all-to-all messages (the study's).
pub fn default_size(kind: TrafficKind) -> usize {
    match kind {
        TrafficKind::Rr => 64,
        TrafficKind::Stream => 1400,
        TrafficKind::Alltoall => 16 * 1024,
    }
}

/// Waits this long after the last exchange for the ring buffer to deliver its last events.
const DRAIN: Duration = Duration::from_millis(200);
/// Untagged exchanges before the measured ones, so neighbour resolution is not measured.
const WARMUP: u32 = 3;

impl RunArgs {
    pub fn spec(&self, run_id: u32) -> Spec {
        Spec {
            proto: self.proto,
            size: self.size,
            count: self.count,
            rate: self.rate,
            run_id,
            port: self.port.unwrap_or_else(|| port_of(run_id)),
            timeout: self.timeout,
        }
    }
}

/// What the traffic did: its stamps, and what each kind measures besides.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Driven {
    Rr(rr::Outcome),
    Stream(StreamSpec, stream::StreamOutcome),
    Alltoall(AlltoallSpec, alltoall::AlltoallOutcome),
}

impl Driven {
    /// Exchanges completed (rr), tagged messages received (stream).
    fn completed(&self) -> u32 {
        match self {
            Driven::Rr(o) => o.completed,
            Driven::Stream(_, o) => o.stamps.len() as u32,
            Driven::Alltoall(_, o) => o.rounds.len() as u32,
        }
    }

    fn stamps(&self) -> &[traffic::Stamp] {
        match self {
            Driven::Rr(o) => &o.stamps,
            Driven::Stream(_, o) => &o.stamps,
            Driven::Alltoall(_, o) => &o.stamps,
        }
    }

    /// The directions reported: tag direction and name.
    fn directions(&self) -> Vec<(u32, String)> {
        match self {
            Driven::Rr(_) => vec![
                (DIR_REQUEST, "request".into()),
                (DIR_RESPONSE, "response".into()),
            ],
            Driven::Stream(..) => vec![(DIR_REQUEST, "stream".into())],
            // One per path kind, chosen once the journeys are known.
            Driven::Alltoall(..) => Vec::new(),
        }
    }
}

impl RunArgs {
    fn stream_spec(&self, run_id: u32, port: u16) -> StreamSpec {
        StreamSpec {
            proto: self.proto,
            size: self.size,
            duration: self.duration,
            tag_every: self.tag_every.unwrap_or(stream::DEFAULT_TAG_EVERY),
            run_id,
            port,
        }
    }

    /// Refuses values the traffic cannot use, before any work.
    pub fn validate(&self) -> Result<()> {
        match self.traffic {
            TrafficKind::Rr => self.spec(0).validate(),
            TrafficKind::Stream => self.stream_spec(0, 1).validate(),
            TrafficKind::Alltoall => self.alltoall_spec(&[], 0, 1).validate_values(),
        }
    }

    fn alltoall_spec(&self, pods: &[Pod], run_id: u32, port: u16) -> AlltoallSpec {
        AlltoallSpec {
            pods: pods
                .iter()
                .map(|p| alltoall::PodEnd {
                    netns: discover::ns_arg(&p.end.netns).map(str::to_string),
                    addr: p.end.addr,
                    host: p.host.clone(),
                })
                .collect(),
            procs: self.procs,
            size: self.size,
            rounds: self.count,
            tag_every: self.tag_every.unwrap_or(alltoall::DEFAULT_TAG_EVERY),
            run_id,
            port,
            timeout: self.timeout,
        }
    }
}

/// A stream's throughput with nothing of the profiler's attached (the same stream, untagged,
/// before the programs load): the profiled run's figures include the programs' cost at every
/// hop, which the path does not have.
async fn unprofiled_stream(
    args: &RunArgs,
    spec: &Spec,
    ends: &Endpoints,
) -> Result<Option<StreamResult>> {
    if args.traffic != TrafficKind::Stream {
        return Ok(None);
    }
    let s = StreamSpec {
        tag_every: 0,
        ..args.stream_spec(spec.run_id, spec.port)
    };
    Ok(Some(stream::run(&s, ends).await?.result(&s)))
}

/// Runs the traffic of `args.traffic`.
async fn drive(
    args: &RunArgs,
    spec: &Spec,
    lab: &RunTarget,
    ends: &Endpoints,
    progress: Arc<AtomicU32>,
) -> Result<Driven> {
    match args.traffic {
        TrafficKind::Rr => Ok(Driven::Rr(rr::run(spec, ends, progress).await?)),
        TrafficKind::Stream => {
            let s = args.stream_spec(spec.run_id, spec.port);
            let ticker = tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            });
            let out = stream::run(&s, ends).await;
            ticker.abort();
            Ok(Driven::Stream(s, out?))
        }
        TrafficKind::Alltoall => {
            let s = args.alltoall_spec(&lab.pods, spec.run_id, spec.port);
            let out = alltoall::run(&s, progress).await?;
            Ok(Driven::Alltoall(s, out))
        }
    }
}

/// The progress bar's length and unit.
fn progress_of(args: &RunArgs) -> (u32, &'static str) {
    match args.traffic {
        TrafficKind::Stream => ((args.duration.as_millis() / 100) as u32, "x 100 ms"),
        TrafficKind::Rr => (args.count, "exchanges"),
        TrafficKind::Alltoall => (args.count, "rounds"),
    }
}

/// Refuses traffic that cannot go through a Service: all-to-all goes from pod to pod.
pub fn check_service_traffic(traffic: TrafficKind) -> Result<()> {
    if traffic == TrafficKind::Alltoall {
        return Err(crate::error::bad_input(
            "--traffic alltoall goes from pod to pod; a lab with --service is profiled with rr or stream",
        ));
    }
    Ok(())
}

/// The port of a run through `svc`: the Service's, which the NAT keeps (the programs find the
/// run's packets by port on both sides of it).
fn through_service(args: &RunArgs, svc: &lab::service::Service) -> Result<u16> {
    check_service_traffic(args.traffic)?;
    match args.port {
        Some(p) if p != svc.port => Err(crate::error::bad_input(format!(
            "--port {p}: the lab's Service forwards port {} only",
            svc.port
        ))),
        _ => Ok(svc.port),
    }
}

/// Profiles the target (a lab that is up, or a discovered path) and returns the report.
pub async fn profile(args: &RunArgs, lab: &RunTarget) -> Result<RunReport> {
    Ok(attribute(&collect(args, lab).await?))
}

/// Drives the tagged traffic through the target with the programs attached, and returns what
/// the kernel and the traffic recorded: the host's events, and each guest's part on its own
/// clock (attribution puts it on the host's timeline).
pub async fn collect(args: &RunArgs, lab: &RunTarget) -> Result<Collected> {
    args.validate()?;
    let run_id = rand_run_id();
    let mut spec = args.spec(run_id);
    if let Some(svc) = &lab.service {
        spec.port = through_service(args, svc)?;
    }
    let ends = Endpoints {
        client_ns: discover::ns_arg(&lab.client.netns).map(str::to_string),
        server_ns: discover::ns_arg(&lab.server.netns).map(str::to_string),
        server_addr: lab.server.addr,
        dest_addr: lab
            .service
            .as_ref()
            .map_or(lab.server.addr, |s| s.cluster_ip),
        remote_server: !lab.guests.is_empty(),
    };
    // A guest's agent attaches there and runs the server, before anything is sent.
    let mut agents = start_agents(args, &spec, lab).await?;
    let client_agent = agents.iter().position(|a| a.client);
    // Before the warm-up, whose server may still hold the port for a moment after it.
    let unprofiled = unprofiled_stream(args, &spec, &ends).await?;
    // A client in a guest warms the path up itself.
    if client_agent.is_none() {
        warm_up(&spec, &ends).await?;
    }

    let btf = KernelBtf::load()?;
    let mut programs = Programs::load(
        &btf,
        &LoadConfig {
            run_id,
            port: spec.port,
            ..Default::default()
        },
    )?;
    let hook_set = programs.attach_set(&btf, Mode::Run, args.hooks)?;
    programs.attach_uprobes(&args.uprobes)?;
    for p in &lab.attach {
        programs.attach_tc(Mode::Run, discover::ns_arg(&p.netns), &p.ifname, p.ingress);
    }
    if let Some(svc) = &lab.service {
        let nat: Vec<Option<&str>> = svc.namespaces.iter().map(|n| discover::ns_arg(n)).collect();
        programs.attach_netfilter(Mode::Run, &nat);
    }
    let _stats = kernel::stats_while(args.stats)?;

    let (stop_tx, stop_rx) = oneshot::channel();
    let collector = tokio::spawn(ring::collect(programs.take_events()?, stop_rx));
    let progress = Arc::new(AtomicU32::new(0));
    let (total, unit) = progress_of(args);
    let reporter = tokio::spawn(report_progress(progress.clone(), total, unit, args.quiet));
    let mut guest_client = None;
    let driven = match client_agent {
        Some(k) => remote_client(args, &spec, lab, &mut agents[k])
            .await
            .map(|stamps| {
                guest_client = Some(stamps);
                Driven::Rr(rr::Outcome::default())
            }),
        None => drive(args, &spec, lab, &ends, progress).await,
    };
    reporter.abort();
    tokio::time::sleep(DRAIN).await;
    let _ = stop_tx.send(());
    let events = collector.await.context("the event collector stopped")??;
    let driven = driven?;
    let mut counters = programs.counters()?;
    let costs = args.stats.then(|| programs.costs());

    let drop_reasons = btf.drop_reasons();
    let mut hooks = programs.statuses.clone();
    let mut guests = Vec::new();
    for a in &mut agents {
        let guest = &lab.guests[a.index];
        let mut done = a.remote.stop(run_id).await?;
        done.renumber_drops(&drop_reasons);
        counters[COUNTER_LOST as usize] += done.lost;
        counters[COUNTER_UNREADABLE as usize] += done.unreadable;
        guests.push(agent::GuestPart {
            node: guest.name.clone(),
            index: a.index as u32,
            done,
            namespaces: guest.namespaces.clone(),
            client: if a.client { guest_client.take() } else { None },
        });
        hooks.extend(a.hooks.drain(..).map(|h| HookStatus {
            name: format!("{} {}", guest.name, h.name),
            ..h
        }));
    }

    Ok(Collected {
        schema: record::EVENTS_SCHEMA.into(),
        made: None,
        kernel: kernel::release(),
        client_netns: lab.client.netns.clone(),
        server_netns: lab.server.netns.clone(),
        pod_netns: lab.pods.iter().map(|p| p.end.netns.clone()).collect(),
        devices: lab.devices.clone(),
        inodes: Inodes::of(&lab.devices)?.all(),
        drop_reasons: drop_reasons.all(),
        service: lab.service.as_ref().map(|s| s.to_string()),
        proto: match args.traffic {
            TrafficKind::Alltoall => Proto::Tcp,
            _ => args.proto,
        },
        size: args.size,
        count: args.count,
        driven,
        unprofiled,
        events: events.iter().map(record::to_wire).collect(),
        lost: counters[COUNTER_LOST as usize],
        unreadable: counters[COUNTER_UNREADABLE as usize],
        hook_set,
        host_hooks: programs.statuses.len(),
        hooks,
        program_costs: costs,
        guests,
    })
}

/// A nested path's guest agent, started for the run.
struct Agent {
    remote: agent::Remote,
    /// The hooks it attached.
    hooks: Vec<HookStatus>,
    /// Its guest's place in the lab's guests.
    index: usize,
    /// Its guest's pod runs the client (vmp2vmp's vm1).
    client: bool,
}

/// The agents of a nested path's guests, each attached for the run, the server's running the
/// server (all at once: attaching takes minutes under TCG).
async fn start_agents(args: &RunArgs, spec: &Spec, lab: &RunTarget) -> Result<Vec<Agent>> {
    if lab.guests.is_empty() {
        return Ok(Vec::new());
    }
    if args.traffic != TrafficKind::Rr {
        anyhow::bail!("a nested path is profiled with --traffic rr only, so far");
    }
    if !lab
        .guests
        .iter()
        .any(|g| lab::nested::in_guest(&g.name, &lab.server.netns).is_some())
    {
        anyhow::bail!(
            "the server {} is in none of the lab's guests",
            lab.server.netns
        );
    }
    let mut agents = Vec::new();
    for (index, guest) in lab.guests.iter().enumerate() {
        agents.push(Agent {
            remote: agent::Remote::connect(guest).await?,
            hooks: Vec::new(),
            index,
            client: lab::nested::in_guest(&guest.name, &lab.client.netns).is_some(),
        });
    }
    let names: Vec<&str> = lab.guests.iter().map(|g| g.name.as_str()).collect();
    let whose = if names.len() == 1 { "its" } else { "their" };
    eprintln!(
        "{}: attaching {whose} programs (TCG: this takes a while)",
        names.join(", ")
    );
    let starts = agents.iter_mut().map(|a| {
        let guest = &lab.guests[a.index];
        let server_ns = lab::nested::in_guest(&guest.name, &lab.server.netns);
        a.remote.start(agent::Start {
            run_id: spec.run_id,
            port: spec.port,
            hooks: args.hooks,
            server_ns: server_ns.map(str::to_string),
            server_addr: lab.server.addr,
            size: spec.size,
            proto: spec.proto,
        })
    });
    let started = futures::future::try_join_all(starts).await?;
    for (a, (_, hooks)) in agents.iter_mut().zip(started) {
        a.hooks = hooks;
    }
    Ok(agents)
}

/// Runs the run's exchanges from the client pod in a guest, through its agent; returns the
/// client's stamps on the guest's clock.
async fn remote_client(
    args: &RunArgs,
    spec: &Spec,
    lab: &RunTarget,
    a: &mut Agent,
) -> Result<Vec<(u32, u64, u64)>> {
    let guest = &lab.guests[a.index];
    let client_ns = lab::nested::in_guest(&guest.name, &lab.client.netns)
        .context("the client is not in this guest")?;
    if !args.quiet {
        eprintln!("guest {}: running the client", guest.name);
    }
    a.remote
        .client(agent::Client {
            run_id: spec.run_id,
            client_ns: client_ns.to_string(),
            server_addr: lab.server.addr,
            port: spec.port,
            size: spec.size,
            count: spec.count,
            rate: spec.rate,
            timeout: spec.timeout,
            warm_up: WARMUP,
            proto: spec.proto,
        })
        .await
}

async fn warm_up(spec: &Spec, ends: &Endpoints) -> Result<()> {
    // Run id 0 is never the measured run's, so the kernel ignores these.
    let warm = Spec {
        count: WARMUP,
        run_id: 0,
        rate: None,
        ..spec.clone()
    };
    rr::run(&warm, ends, Arc::new(AtomicU32::new(0)))
        .await
        .context("warming up the path")?;
    Ok(())
}

/// The exchanges done so far, as a progress bar on stderr.
async fn report_progress(done: Arc<AtomicU32>, total: u32, unit: &str, quiet: bool) {
    let bar = progress::bar(total.into(), unit, quiet);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        bar.set_position(done.load(Ordering::Relaxed).into());
    }
}

/// A port from the dynamic range that is the run's own: runs on different labs at once do not
/// meet on one port (their programs would read each other's packets).
fn port_of(run_id: u32) -> u16 {
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 40_000;
    (FIRST + run_id % COUNT) as u16
}

fn rand_run_id() -> u32 {
    // Nonzero and different per run; uniqueness across concurrent runs is all that matters.
    let t = kernel::monotonic_ns();
    ((t ^ (t >> 32) ^ std::process::id() as u64) as u32) | 1
}

/// A lab a command uses: the lab, whether the command made it (and so removes it), and the
/// lock that keeps other commands off it meanwhile.
pub struct LabUse {
    pub lab: Lab,
    pub created: bool,
    _lock: Lock,
}

impl LabUse {
    /// Ends the use: a lab this command made is removed, or with `keep` left up as if `lab up`
    /// had made it; then the lock goes.
    pub async fn release(self, keep: bool) -> Result<()> {
        if !self.created {
            return Ok(());
        }
        if keep {
            lab::disown(&self.lab.name)
        } else {
            lab::down(&self.lab.name)
                .await
                .context("removing the lab this command made")
        }
    }
}

/// Takes the lab's lock (or fails naming who holds it), then brings the lab up if it is not,
/// owned by `command` of this process. A lab whose owning run died without removing it (or a
/// build that was killed midway) is removed first, with a notice, and built again.
pub async fn ensure_lab(topology: Topology, options: &LabOptions, command: &str) -> Result<LabUse> {
    let name = lab::lab_name(topology, options.placement);
    let lock = Lock::acquire(&name)?;
    let existing = lab::get(&name)?;
    let abandoned = existing
        .as_ref()
        .and_then(|l| l.owner.clone())
        .filter(|o| !o.alive());
    if let Some(o) = &abandoned {
        eprintln!(
            "notice: lab {name} was made by profiler {} (pid {}), which ended without removing it; removing it",
            o.command, o.pid
        );
        lab::down(&name).await?;
    } else if existing.is_none() && lab::has_parts(&name) {
        eprintln!(
            "notice: parts of lab {name} were left by a build that did not finish; removing them"
        );
        lab::down(&name).await?;
    }
    match existing.filter(|_| abandoned.is_none()) {
        Some(lab) if options.mtu.is_some() && options.mtu != lab.mtu => {
            anyhow::bail!(
                "lab {name} is already up with another MTU ({}); take it down first (profiler lab down {name})",
                lab.mtu.map_or("the topology's default".to_string(), |m| m.to_string())
            )
        }
        Some(lab) if options.pods.is_some() && options.pods != lab.pods_per_host => {
            anyhow::bail!(
                "lab {name} is already up with {} pods per host; take it down first (profiler lab down {name})",
                lab.pods_per_host.map_or("its two".to_string(), |n| n.to_string())
            )
        }
        Some(lab) if options.net2.is_some() && options.net2 != lab.net2 => {
            anyhow::bail!(
                "lab {name} is already up {}; take it down first (profiler lab down {name})",
                lab.net2.map_or("without --net2".to_string(), |t| format!(
                    "with --net2 {}",
                    t.name()
                ))
            )
        }
        Some(lab)
            if options.nic.is_some() && lab.guests.iter().any(|g| Some(g.nic) != options.nic) =>
        {
            anyhow::bail!(
                "lab {name} is already up with other guest NICs; take it down first (profiler lab down {name})"
            )
        }
        Some(lab)
            if options.service.is_some()
                && options.service != lab.service.as_ref().map(|s| s.mode) =>
        {
            anyhow::bail!(
                "lab {name} is already up {}; take it down first (profiler lab down {name})",
                lab.service
                    .as_ref()
                    .map_or("without a Service".to_string(), |s| format!("with {s}"))
            )
        }
        Some(lab) => Ok(LabUse {
            lab,
            created: false,
            _lock: lock,
        }),
        None => {
            eprintln!("bringing up lab {name}");
            let lab = lab::up_owned(topology, options, Owner::me(command)).await?;
            Ok(LabUse {
                lab,
                created: true,
                _lock: lock,
            })
        }
    }
}
