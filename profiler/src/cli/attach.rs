//! `profiler attach`: real traffic on this node followed, reported at the end, on /metrics or
//! per packet.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::Args;

use super::{
    output::{output, JsonOut},
    values::{duration_within, otlp_endpoint},
};
use crate::{
    attach,
    error::bad_input,
    kernel::{doctor, programs::FollowConfig},
    pods,
    report::{
        schema::{AttachReport, HookSet, Made},
        table,
    },
};

#[derive(Args)]
pub struct AttachCli {
    /// Pod whose devices start journeys: [NAMESPACE/]NAME (without NAMESPACE, in any), each part
    /// a glob (`web-*`, `shop/*`). Pods matching later are followed as they come, and forgotten
    /// when they go. Read from the node's container runtime (CRI), else the CNI cache, else the
    /// names under /run/netns. Repeatable.
    #[arg(long, value_name = "[NAMESPACE/]NAME")]
    pod: Vec<pods::Pattern>,
    /// The container runtime's CRI socket (default: containerd's, then CRI-O's).
    #[arg(long, value_name = "PATH")]
    cri_socket: Option<PathBuf>,
    /// Network namespace whose devices start journeys: a name (ip netns), the path of a
    /// namespace file, or a process id. Repeatable.
    #[arg(long)]
    netns: Vec<String>,
    /// Interface of this namespace that starts journeys. Repeatable.
    #[arg(long)]
    iface: Vec<String>,
    /// A wire-facing device, [NETNS:]IFACE (without NETNS, in this namespace): followed packets
    /// leaving or entering the node through it are reported with what they carry on the wire
    /// (addresses, ports, IP ID, TCP sequence, a hash of a datagram's first payload bytes), and
    /// packets entering through it start journeys. Packets seen leaving one and entering another
    /// of this node are paired in the report. Repeatable.
    #[arg(long, value_name = "[NETNS:]IFACE")]
    wire: Vec<String>,
    /// Write every packet seen at a --wire device as a JSON line to FILE ("-": stdout): what
    /// other nodes' sightings are joined with.
    #[arg(long, value_name = "FILE", requires = "wire")]
    sightings: Option<PathBuf>,
    /// A nested lab (bmp2vmp, vmp2vmp): attach here and in each of its guests (through their
    /// agents), with the lab's namespaces as targets and the guests' NICs (their taps here) as
    /// the wire, and pair the packets that crossed between the nodes: every node's paths, and
    /// each link's packets on this node's clock, each time with its bound.
    #[arg(long, value_name = "NAME", conflicts_with = "peer")]
    lab: Option<String>,
    /// Another node to attach on too, through its agent (`profiler agent --listen ADDR --tls
    /// DIR --node NAME`): NAME=ADDR[,pod=P][,netns=N][,wire=W]. Without targets of its own it
    /// follows this node's --pod patterns; without wire devices, this node's --wire names.
    /// The packets that crossed between this node and each peer are paired as with --lab. Its
    /// attach ends with this one's (or when this one's connection does). Repeatable.
    #[arg(long, value_name = "NAME=ADDR[,KEY=VALUE...]", requires = "tls")]
    peer: Vec<attach::across::PeerSpec>,
    /// The cluster's certificates for --peer: DIR/ca.pem, DIR/NODE.pem, DIR/NODE.key (NODE:
    /// --node), made by `profiler agent --init-certs DIR --names NODE,PEER,...`.
    #[arg(long, value_name = "DIR", requires = "peer")]
    tls: Option<PathBuf>,
    /// This node's name in the report and, with --peer, in its certificate (default: the host
    /// name).
    #[arg(long)]
    node: Option<String>,
    /// A cgroup (v2) directory: packets sent by its processes' sockets start journeys.
    /// Repeatable.
    #[arg(long)]
    cgroup: Vec<PathBuf>,
    /// pcap-filter-style expression, evaluated in the kernel on the outer and the tunnelled
    /// headers: ip, ip6, tcp, udp, icmp, [src|dst] host|net|port, and, or, not, ( ).
    #[arg(long, default_value = "")]
    filter: String,
    /// Follow one packet in N, chosen at its first hop.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    sample: u32,
    /// summary: histograms in the kernel, nothing per packet; events: also one JSON line per
    /// journey on stdout.
    #[arg(long, value_enum, default_value = "summary")]
    mode: AttachMode,
    /// How long to follow: 30, 30s, 500ms, 2m, 1h (default: until Ctrl-C or SIGTERM).
    #[arg(long, value_parser = |s: &str| duration_within(s, Duration::from_millis(1), MAX_ATTACH))]
    duration: Option<Duration>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464) at /metrics; with --peer,
    /// the wire between the nodes too, joined every 5 s over the last 30 s of sightings.
    #[arg(long)]
    prometheus: Option<std::net::SocketAddr>,
    /// Send the packets joined across nodes (--peer or --lab, --mode events), one in
    /// --otlp-sample, as OpenTelemetry traces to this OTLP/gRPC endpoint
    /// (http://collector:4317) at the end: a trace per packet, a span per segment, the wire
    /// between the nodes one of them, on this node's clock.
    #[arg(long, value_name = "URL", value_parser = otlp_endpoint)]
    otlp: Option<String>,
    /// Trace one joined packet in N with --otlp.
    #[arg(long, default_value_t = 10, value_name = "N", requires = "otlp",
          value_parser = clap::value_parser!(u32).range(1..))]
    otlp_sample: u32,
    /// Packets followed at once at most (the in-flight table's size, rounded up to a power of
    /// two: the memory bound).
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(64..=1 << 22))]
    max_in_flight: u32,
    /// Milliseconds after which a packet's next hop no longer extends its journey.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    max_gap_ms: u64,
    /// Write the report as JSON to FILE ("-": stdout, instead of the table).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Report each eBPF program's kernel cost per invocation (enables bpf_stats meanwhile).
    #[arg(long)]
    stats: bool,
    /// Print the drops instead of the segments: by the kernel's reason, then where (hop, pod)
    /// and what (protocol), the most first (the JSON report is the same; `profiler report
    /// FILE --format drops` shows it again).
    #[arg(long)]
    drops: bool,
    /// List every target in the table's header (beyond 4, it says how many and the first 3;
    /// the JSON report always lists them all).
    #[arg(long)]
    verbose: bool,
    /// Hooks to attach: stable (tracepoints, tc) or deep (also the datapath's kernel
    /// functions: veth, bridge, vxlan, OVS, ...; falls back to stable with a notice where the
    /// kernel has no kprobes).
    #[arg(long, value_enum, default_value = "deep")]
    hooks: HookSet,
    /// A workload to run once attached (`-- iperf3 -c ...`): followed until it exits, and
    /// attach exits with its status; Ctrl-C or SIGTERM stops both.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AttachMode {
    Summary,
    Events,
}

/// The longest `attach --duration` (30 days; for longer, leave it out: until Ctrl-C).
const MAX_ATTACH: Duration = Duration::from_secs(30 * 86_400);

pub async fn run(cli: AttachCli, quiet: bool) -> Result<ExitCode> {
    // Bad input is refused before anything is attached.
    let json = cli.json.as_deref().map(JsonOut::checked).transpose()?;
    let events = matches!(cli.mode, AttachMode::Events);
    if events && matches!(json, Some(JsonOut::Stdout)) {
        return Err(bad_input(
            "--mode events prints its journeys on stdout: give --json a file, not -",
        ));
    }
    let sightings = cli
        .sightings
        .as_deref()
        .map(|f| JsonOut::checked_as("--sightings", f))
        .transpose()?;
    if matches!(sightings, Some(JsonOut::Stdout))
        && (events || matches!(json, Some(JsonOut::Stdout)))
    {
        return Err(bad_input(
            "--sightings -: stdout is taken by --mode events or --json -: give a file",
        ));
    }
    if cli.otlp.is_some() && !events {
        return Err(bad_input(
            "--otlp traces packets joined journey by journey: add --mode events",
        ));
    }
    if cli.otlp.is_some() && cli.peer.is_empty() && cli.lab.is_none() {
        return Err(bad_input(
            "--otlp traces packets across nodes: add --peer NAME=ADDR (or --lab NAME)",
        ));
    }
    let filter = attach::filter::compile(&cli.filter)?;
    let view = if cli.drops {
        table::drops
    } else {
        table::attach
    };
    let verbose = cli.verbose;
    let (lab, peers, tls) = (cli.lab, cli.peer, cli.tls);
    let otlp = (cli.otlp).map(|endpoint| attach::otlp::Otlp {
        endpoint,
        every: cli.otlp_sample,
    });
    doctor::require(doctor::ATTACH_CAPS)?;
    let mut args = attach::AttachArgs {
        node: cli.node,
        pods: cli.pod,
        pod_sources: pods::Sources {
            cri_socket: cli.cri_socket,
            cni_cache: None,
        },
        netns: cli.netns,
        ifaces: cli.iface,
        filter: cli.filter,
        follow: FollowConfig {
            sample: cli.sample,
            max_gap_ns: cli.max_gap_ms * 1_000_000,
            stream: events,
            filter,
            max_in_flight: cli.max_in_flight,
            by_cgroup: !cli.cgroup.is_empty(),
            wire: !cli.wire.is_empty(),
        },
        wire: cli.wire,
        sightings: sightings.map(|s| s.writer()).transpose()?,
        keep_sightings: false,
        live: None,
        journeys: None,
        keep_journeys: None,
        traces: otlp.as_ref().map(|o| attach::otlp::Traces::new(o.every)),
        cgroups: cli.cgroup,
        duration: cli.duration,
        prometheus: cli.prometheus,
        stats: cli.stats,
        hooks: cli.hooks,
        quiet,
        command: cli.command,
        control: None,
    };
    let report = match (&lab, &tls) {
        (Some(name), _) => attach::across::lab(&mut args, name).await?,
        (None, Some(tls)) => attach::across::peers(&mut args, &peers, tls).await?,
        (None, None) => attach::attach(&mut args).await?.0,
    };
    let report = AttachReport {
        made: Some(Made::here()),
        ..report
    };
    let table = view(&report, verbose);
    if events {
        // Events own stdout: the summary goes to stderr, its JSON to the file.
        if let Some(file) = &json {
            file.write(&report)?;
        }
        eprint!("{table}");
    } else {
        output(json.as_ref(), &report, &table)?;
    }
    if let (Some(otlp), Some(traces)) = (&otlp, args.traces.take()) {
        let spans = attach::otlp::export(otlp, &report.node, &traces.kept).await?;
        if !quiet {
            eprintln!(
                "otlp: {} of {} joined packets sent to {} ({spans} spans)",
                traces.kept.len(),
                traces.joined(),
                otlp.endpoint
            );
        }
    }
    // Profiling succeeded: the workload's status is the command's.
    Ok(report.command.as_ref().map_or(ExitCode::SUCCESS, |c| {
        ExitCode::from(attach::workload::exit_code(c))
    }))
}
