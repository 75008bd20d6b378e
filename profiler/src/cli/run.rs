//! `profiler run`: one path profiled with tagged traffic, a lab's or any namespaces'.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Result;
use clap::Args;

use super::{
    lab::LabOpts,
    output::{output, JsonOut},
    values::{duration_within, number_within},
};
use crate::{
    cluster::tls::Identity,
    error::bad_input,
    kernel::{doctor, uprobe::UprobeSpec},
    lab::{self, names::HOST_NODE, target::RunTarget, LabOptions, Topology},
    pods,
    report::{
        schema::{HookSet, Made, Proto, RunReport, TrafficKind},
        table,
    },
    run::{self, record::Collected, RunArgs},
    signal::interruptible,
};

/// How `run --agent` speaks to the agent: as the host of the cluster in `tls`, or in the clear
/// when asked to.
fn agent_identity(tls: Option<&Path>, insecure: bool) -> Result<Option<Identity>> {
    match tls {
        Some(dir) => Ok(Some(Identity::load(dir, HOST_NODE)?)),
        None if insecure => Ok(None),
        None => Err(bad_input(
            "--agent needs --tls DIR (the cluster's certificates: `profiler agent --init-certs`) \
             or --insecure",
        )),
    }
}

#[derive(Args, Clone)]
pub struct TrafficOpts {
    #[arg(long, value_enum, default_value = "udp")]
    proto: Proto,
    /// Request/response exchanges.
    #[arg(long, default_value_t = 1000)]
    count: u32,
    /// Requests per second, 0.1 to 1000000 (default: next request as soon as the response
    /// arrives).
    #[arg(long, value_parser = |s: &str| number_within(s, 0.1, 1e6))]
    rate: Option<f64>,
    /// Server port of the tagged traffic (default: one of 20000-59999 chosen by the run).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// How long to wait for a response before counting it lost: 1, 1s, 200ms (up to 1h).
    #[arg(long, default_value = "1s", value_parser = |s: &str| duration_within(s, Duration::from_millis(1), Duration::from_secs(3600)))]
    timeout: Duration,
    /// Report each eBPF program's kernel cost per invocation (enables bpf_stats for the run).
    #[arg(long)]
    stats: bool,
    /// Hooks to attach: stable (tracepoints, tc) or deep (also the datapath's kernel
    /// functions: veth, bridge, vxlan, OVS, ...; falls back to stable with a notice where the
    /// kernel has no kprobes).
    #[arg(long, value_enum, default_value = "deep")]
    hooks: HookSet,
}

impl TrafficOpts {
    pub fn run_args(&self, lab: Topology, size: usize, quiet: bool) -> Result<RunArgs> {
        let args = RunArgs {
            lab,
            proto: self.proto,
            size,
            count: self.count,
            rate: self.rate,
            port: self.port,
            stats: self.stats,
            hooks: self.hooks,
            timeout: self.timeout,
            quiet,
            uprobes: Vec::new(),
            traffic: TrafficKind::Rr,
            duration: run::DEFAULT_STREAM,
            tag_every: None,
            pods: run::DEFAULT_PODS,
            procs: run::DEFAULT_PROCS,
        };
        args.spec(0).validate()?;
        Ok(args)
    }
}

#[derive(Args)]
pub struct RunCli {
    /// Lab topology to profile; brought up (and removed afterwards) if it is not up.
    #[arg(long, value_enum, default_value = "bridge", conflicts_with = "from")]
    lab: Topology,
    /// Profile an existing path instead of a lab: the client runs in this network namespace
    /// ("(root)": this process's own).
    #[arg(
        long,
        requires = "to",
        value_name = "NETNS",
        conflicts_with_all = ["placement", "mtu", "keep_lab"]
    )]
    from: Option<String>,
    /// ... and the server listens on IP in this namespace. Or --from POD --to POD: two pods of
    /// the node's container runtime, [NAMESPACE/]NAME each (a --to without ":IP" is a pod);
    /// the server listens on the pod's address.
    #[arg(long, requires = "from", value_name = "NETNS:IP")]
    to: Option<String>,
    /// The container runtime's CRI socket, for pods in --from and --to (default: containerd's,
    /// then CRI-O's).
    #[arg(long, requires = "from", value_name = "PATH")]
    cri_socket: Option<PathBuf>,
    /// The server is in a VM whose `profiler agent --listen` is at this address: --to names
    /// its namespace as NODE:NETNS:IP (NODE: the VM's name in the report, e.g.
    /// vm1:pod-b:10.0.0.2, vm1:(root):10.0.0.2); the agent attaches inside the VM and runs the
    /// server there.
    #[arg(long, requires = "from", value_name = "IP:PORT")]
    agent: Option<std::net::SocketAddr>,
    /// The cluster's certificates for --agent: DIR/ca.pem, DIR/host.pem and DIR/host.key (made
    /// by `profiler agent --init-certs DIR --names host,vm1`; a lab's guest:
    /// /run/profiler/vm/LAB-GUEST/tls).
    #[arg(long, requires = "agent", value_name = "DIR")]
    tls: Option<PathBuf>,
    /// Speak to --agent in the clear: an agent started with --insecure, on a private network.
    #[arg(long, requires = "agent", conflicts_with = "tls")]
    insecure: bool,
    #[command(flatten)]
    lab_opts: LabOpts,
    /// The pods' interface the traffic goes over: eth0 (the lab's network), or net1 (its
    /// second network: a lab made with --net2).
    #[arg(long, default_value = "eth0", value_parser = ["eth0", "net1"], conflicts_with = "from")]
    iface: String,
    /// Payload bytes per request and per response, per stream or all-to-all message (16 to
    /// 65536; default 64, stream 1400, alltoall 16384).
    #[arg(long)]
    size: Option<usize>,
    #[command(flatten)]
    traffic: TrafficOpts,
    /// rr: request/response ping-pong; stream: a one-way stream with tagged messages inside;
    /// alltoall: in rounds, every process of every pod sends one message to every other.
    #[arg(long = "traffic", value_enum, default_value = "rr")]
    kind: TrafficKind,
    /// How long a stream runs: 5, 5s, 500ms, 1m (up to 1h).
    #[arg(long, default_value = "5s", value_parser = |s: &str| duration_within(s, Duration::from_millis(100), Duration::from_secs(3600)))]
    duration: Duration,
    /// stream: tag one message in N (default 1000); alltoall: every message of one round in
    /// N (default 10); 0 tags nothing.
    #[arg(long)]
    tag_every: Option<u32>,
    /// alltoall: processes (each with its own sockets) per pod, 1 to 8.
    #[arg(long, default_value_t = run::DEFAULT_PROCS, value_parser = clap::value_parser!(u32).range(1..=8))]
    procs: u32,
    /// Write the profiler.run.v1 JSON report to FILE ("-" for stdout instead of the table).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also write what the run collected (every node's hop events, the devices and
    /// namespaces, the traffic's stamps) to FILE: `profiler report --events FILE` attributes it
    /// again, without root.
    #[arg(long, value_name = "FILE")]
    save_events: Option<PathBuf>,
    /// Exit 0 even if the kernel lost events.
    #[arg(long)]
    allow_loss: bool,
    /// Leave a lab this run brought up in place afterwards.
    #[arg(long)]
    keep_lab: bool,
    /// A user function that holds a frame, as a hop `uprobe:LABEL` (default label: SYMBOL):
    /// its first argument points to the frame (Ethernet header on), the second is its length.
    /// Repeatable.
    #[arg(long, value_name = "BINARY:SYMBOL[@LABEL]")]
    uprobe: Vec<UprobeSpec>,
}

pub async fn run(cli: RunCli, quiet: bool) -> Result<ExitCode> {
    // Bad input is refused before any work: the report's file, then the run's values.
    let json = cli.json.as_deref().map(JsonOut::checked).transpose()?;
    let save_events = match cli.save_events.as_deref() {
        Some(f) if f.as_os_str() == "-" => {
            return Err(bad_input(
                "--save-events takes a file, not \"-\" (stdout holds the report)",
            ))
        }
        f => f
            .map(|f| JsonOut::checked_as("--save-events", f))
            .transpose()?,
    };
    let size = cli.size.unwrap_or(run::default_size(cli.kind));
    let mut args = RunArgs {
        traffic: cli.kind,
        duration: cli.duration,
        tag_every: cli.tag_every,
        pods: cli.lab_opts.pods.unwrap_or(run::DEFAULT_PODS),
        procs: cli.procs,
        ..cli.traffic.run_args(cli.lab, size, quiet)?
    };
    args.uprobes = cli.uprobe.clone();
    // A --to without an address (NETNS:IP) names a pod, and so does --from then.
    let pods = cli
        .from
        .as_deref()
        .zip(cli.to.as_deref())
        .filter(|(_, to)| cli.agent.is_none() && !to.contains(':'));
    let to = match pods {
        Some(_) => None,
        None => cli.to.as_deref().map(parse_to).transpose()?,
    };
    if cli.from.is_some() && cli.kind == TrafficKind::Alltoall {
        return Err(bad_input(
            "--traffic alltoall runs between a lab's pods: use --lab, not --from/--to",
        ));
    }
    if cli.lab_opts.service.is_some() {
        run::check_service_traffic(cli.kind)?;
    }
    args.validate()?;
    let options = LabOptions {
        // All-to-all needs its pods; other traffic uses the lab's first two.
        pods: (cli.kind == TrafficKind::Alltoall)
            .then_some(args.pods)
            .or(cli.lab_opts.pods),
        ..cli.lab_opts.options(cli.lab)
    };
    if cli.from.is_none() {
        lab::check(cli.lab, &options)?;
        net1_available(&cli.iface, cli.lab, &options)?;
    }
    doctor::require_privileges()?;
    let result = match (&cli.from, to) {
        _ if pods.is_some() => {
            let (from, to) = pods.unwrap_or_default();
            let sources = pods::Sources {
                cri_socket: cli.cri_socket.clone(),
                cni_cache: None,
            };
            let target = interruptible(lab::target::between_pods(from, to, &sources)).await?;
            interruptible(run::collect(&args, &target)).await
        }
        (Some(from), Some((to_ns, addr))) => {
            let guest = match cli.agent {
                Some(at) => {
                    let guest = run::agent::guest_node(to_ns)?;
                    let identity = agent_identity(cli.tls.as_deref(), cli.insecure)?;
                    Some(interruptible(run::agent::guest_of(guest, at, identity)).await?)
                }
                None => None,
            };
            let target = interruptible(RunTarget::path(from, to_ns, addr, guest)).await?;
            interruptible(run::collect(&args, &target)).await
        }
        _ => {
            let used = interruptible(run::ensure_lab(args.lab, &options, "run")).await?;
            // Whatever happens next (error, Ctrl-C, SIGTERM), a lab this run created is removed.
            let result = match used.lab.over(&cli.iface) {
                Ok(lab) => interruptible(run::collect(&args, &RunTarget::lab(&lab))).await,
                Err(e) => Err(e),
            };
            used.release(cli.keep_lab).await?;
            result
        }
    };
    let collected = Collected {
        made: Some(Made::here()),
        ..result?
    };
    if let Some(file) = &save_events {
        file.write_text(&collected.to_json()?)?;
    }
    let mut report = run::attribute(&collected);
    if cli.from.is_none() {
        report.topology = lab::path_name(&report.topology, &cli.iface);
    }
    output(json.as_ref(), &report, &table::run(&report))?;
    if let Some(nothing) = nothing_done(&report) {
        eprintln!("error: {nothing}");
        return Ok(ExitCode::FAILURE);
    }
    if report.events.lost > 0 && !cli.allow_loss {
        eprintln!(
            "error: the kernel lost {} events; rerun with a lower --rate or pass --allow-loss",
            report.events.lost
        );
        return Ok(ExitCode::from(super::exit::LOST_EVENTS));
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses `--iface net1` on a lab that will not have it, before a lab is made for nothing:
/// one this run would bring up without --net2.
fn net1_available(iface: &str, topology: Topology, options: &LabOptions) -> Result<()> {
    let name = lab::lab_name(topology, options.placement);
    if iface == lab::NET2_IFNAME && options.net2.is_none() && lab::get(&name)?.is_none() {
        return Err(bad_input(format!(
            "--iface net1: lab {name} is not up; pass --net2 TYPE to bring it up with a second network"
        )));
    }
    Ok(())
}

/// Why a run did nothing, if it did nothing: no exchange, no stream message, no round.
fn nothing_done(report: &RunReport) -> Option<&'static str> {
    match (&report.stream, &report.alltoall) {
        (Some(s), _) => (s.messages == 0).then_some("no stream message arrived at the receiver"),
        (_, Some(a)) => (a.completed_rounds == 0).then_some("no all-to-all round completed"),
        _ => (report.traffic.completed == 0).then_some(
            "no exchange completed: the server never answered within --timeout (is it reachable from the client's namespace?)",
        ),
    }
}

/// "NETNS:IP" of --to.
fn parse_to(to: &str) -> Result<(&str, std::net::Ipv4Addr)> {
    let (ns, ip) = to
        .rsplit_once(':')
        .filter(|(ns, _)| !ns.is_empty())
        .ok_or_else(|| bad_input(format!("--to takes NETNS:IP, got {to:?}")))?;
    let addr = ip
        .parse()
        .map_err(|_| bad_input(format!("--to {to}: {ip:?} is not an IPv4 address")))?;
    Ok((ns, addr))
}
