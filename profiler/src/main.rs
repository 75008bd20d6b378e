//! The `profiler` command line.
// The CLI reaches the package's other dependencies through the library, where the lint applies.
#![allow(unused_crate_dependencies)]

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use profiler::{
    attach,
    bench::{self, BenchArgs},
    cli::{duration_within, number_within, output, JsonOut},
    kernel::{doctor, inject, programs::FollowConfig},
    lab::{self, target::RunTarget, LabOptions, Lock, Placement, Topology},
    report::{
        self, html,
        schema::{CellStatus, HookSet, Proto, TrafficKind},
        table, Format, Report,
    },
    run::{self, compare, RunArgs},
    signal::{interruptible, until_interrupted},
};

#[derive(Parser)]
#[command(
    name = "profiler",
    version,
    about = "Per-hop latency of container network paths, measured with eBPF"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// No progress bar on stderr (there is none when stderr is not a terminal either).
    #[arg(long, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Profile a lab path: attach, drive tagged request/response traffic, print the waterfall.
    Run(RunCli),
    /// Several network types side by side: latency per type and size, and the segments that
    /// make each differ from the first (the baseline).
    Compare(CompareCli),
    /// Benchmarks: `paper` runs the study's experiments on every network type this kernel can
    /// build and judges its findings.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Follow real traffic on this node (no traffic generated): per-segment latency kept in
    /// the kernel, reported at the end, on /metrics, or per packet.
    Attach(AttachCli),
    /// Built-in lab topologies (network namespaces you can step into with `ip netns exec`).
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Hold matching packets for a fixed time at one tc hook until Ctrl-C (what-if experiments).
    Delay(DelayCli),
    /// What this kernel and these privileges allow: hook types, BTF, capabilities.
    Doctor {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Empty programs at attach's tracepoints until Ctrl-C: the physical floor the overhead
    /// benchmark compares attach with.
    #[command(hide = true)]
    Floor,
    /// Inside a VM on a nested path: attach the guest's probes for a host run and send it the
    /// events (started by nested labs in their guests; on a real VM, start it yourself and
    /// point `profiler run --agent` at it).
    Agent(AgentCli),
    /// Re-render a saved JSON report (run, attach, compare, doctor) as its table, as JSON, or as
    /// an HTML page with the waterfalls drawn.
    Report {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Parser)]
struct AgentCli {
    /// Listen on the virtio-serial port of this name (/dev/virtio-ports/NAME; QEMU:
    /// -device virtserialport,name=NAME,chardev=... with a socket chardev on the host).
    #[arg(long, value_name = "NAME", required_unless_present = "listen")]
    serial: Option<String>,
    /// Listen on this TCP address (too): what `profiler run --agent` connects to. Anyone who
    /// reaches it can attach programs for a run: bind a management address only.
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// This node's name in hops and namespaces ("vm1" makes "vm1:pod-b").
    #[arg(long, default_value = "vm1")]
    node: String,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The study's matrix: network types x placements x {request/response and stream at
    /// 64 B..64 KiB, all-to-all with 2 and 4 processes per pod}; then findings 1-7 judged.
    Paper(PaperCli),
}

#[derive(Parser)]
struct PaperCli {
    /// Fewer sizes and exchanges: under 3 minutes instead of under 20.
    #[arg(long)]
    quick: bool,
    /// Network types; one this kernel cannot build is skipped with the reason.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "host,bridge,flannel-vxlan,macvlan,ipvlan-l2,ovs-vlan,ovs-vxlan"
    )]
    types: Vec<Topology>,
    /// Placements; each type runs at those it has.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "same-host,cross-host"
    )]
    placement: Vec<Placement>,
    /// Write the profiler.bench.v1 JSON to FILE ("-" for stdout instead of the table).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the HTML page (charts, all-to-all table, findings) to FILE.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Write the results as Markdown (BENCHMARKS.md) to FILE.
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
}

#[derive(Parser)]
struct AttachCli {
    /// Pod whose devices start journeys: [NAMESPACE/]NAME (without NAMESPACE, in any), each part
    /// a glob (`web-*`, `shop/*`). Pods matching later are followed as they come, and forgotten
    /// when they go. Read from the node's container runtime (CRI), else the CNI cache, else the
    /// names under /run/netns. Repeatable.
    #[arg(long, value_name = "[NAMESPACE/]NAME")]
    pod: Vec<profiler::pods::Pattern>,
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
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464) at /metrics.
    #[arg(long)]
    prometheus: Option<std::net::SocketAddr>,
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

#[derive(Subcommand)]
enum LabCommand {
    /// Create a lab topology.
    Up {
        topology: Topology,
        #[command(flatten)]
        options: LabOpts,
        /// A forwarder to run in place of dpdk-testpmd (dpdk lab): started as `PATH PORT_A
        /// PORT_B` in the host namespace, it prints `Press enter to exit` once it forwards.
        #[arg(long, value_name = "PATH")]
        forwarder: Option<PathBuf>,
    },
    /// Remove a lab and everything it created; with --all, every lab and every leftover the
    /// profiler recognises as its own (after a crash or a SIGKILL).
    Down {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// The labs that are up, with their namespaces, interfaces and addresses.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add or remove a pod of a node lab that is up (through CRI, as kubelet does).
    Pod {
        #[command(subcommand)]
        command: PodCommand,
    },
}

#[derive(Subcommand)]
enum PodCommand {
    /// Create pod NAME (sandbox and echo container); prints its netns and IP.
    Add {
        /// The node lab ("node").
        lab: String,
        name: String,
        /// Its Kubernetes namespace.
        #[arg(long, default_value = lab::node::POD_NAMESPACE)]
        namespace: String,
    },
    /// Stop and remove pod NAME.
    Rm {
        lab: String,
        name: String,
        #[arg(long, default_value = lab::node::POD_NAMESPACE)]
        namespace: String,
    },
}

#[derive(Parser)]
struct DelayCli {
    /// Network namespace of the interface (default: the current one).
    #[arg(long)]
    netns: Option<String>,
    #[arg(long)]
    iface: String,
    #[arg(long, value_enum)]
    direction: inject::Direction,
    /// Microseconds to hold each matching packet (busy-waiting in the packet's path).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=inject::MAX_DELAY.as_micros() as u64))]
    delay_us: u64,
    /// Only UDP/TCP packets with this source or destination port (0: every packet).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

#[derive(Args, Clone)]
struct LabOpts {
    /// Both pods on one host, or on two hosts joined by a wire (default: same-host where the
    /// topology has it).
    #[arg(long, value_enum)]
    placement: Option<Placement>,
    /// MTU of the pods' interfaces (and the overlay device); default: the topology's.
    #[arg(long, value_parser = clap::value_parser!(u32).range(576..=9000))]
    mtu: Option<u32>,
    /// Pods per host, 2 to 13; node: 2 to 250 (default: the topology's two pods, one per host
    /// cross-host; run --traffic alltoall: 8).
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=lab::NODE_MAX_PODS as i64))]
    pods: Option<u32>,
    /// Nested labs (bmp2vmp, vmp2vmp): the container network inside the VMs (default bridge).
    #[arg(long, value_enum)]
    inner: Option<lab::nested::Inner>,
    /// Nested labs: the network the VM's NIC sits on, on the host (default bridge).
    #[arg(long, value_enum)]
    outer: Option<lab::nested::Outer>,
    /// Nested labs: the guest's kernel, 6.1, 6.12 (provisioned by `cargo xtask vm --kernel
    /// SERIES`) or the path of a kernel image (default: the newest provisioned).
    #[arg(long, value_name = "6.1|6.12|PATH")]
    guest_kernel: Option<String>,
    /// The node lab: the CNI plugin that wires its pods (default bridge).
    #[arg(long, value_enum)]
    cni: Option<lab::node::Cni>,
}

impl LabOpts {
    fn options(&self, topology: Topology) -> LabOptions {
        LabOptions {
            placement: self
                .placement
                .unwrap_or_else(|| topology.default_placement()),
            mtu: self.mtu,
            forwarder: None,
            pods: self.pods,
            inner: self.inner,
            outer: self.outer,
            guest_kernel: self.guest_kernel.clone(),
            cni: self.cni,
        }
    }
}

/// The longest `attach --duration` (30 days; for longer, leave it out: until Ctrl-C).
const MAX_ATTACH: Duration = Duration::from_secs(30 * 86_400);

#[derive(Args, Clone)]
struct TrafficOpts {
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
    fn run_args(&self, lab: Topology, size: usize, quiet: bool) -> Result<RunArgs> {
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

#[derive(Parser)]
struct RunCli {
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
    #[command(flatten)]
    lab_opts: LabOpts,
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
    uprobe: Vec<profiler::kernel::uprobe::UprobeSpec>,
}

#[derive(Parser)]
struct CompareCli {
    /// Network types to compare, the first being the baseline.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "host,bridge,flannel-vxlan,macvlan,ipvlan-l2,ovs-vlan,ovs-vxlan,ovs-gre"
    )]
    lab: Vec<Topology>,
    #[arg(long, value_enum, default_value = "cross-host")]
    placement: Placement,
    /// Payload sizes, bytes.
    #[arg(long, value_delimiter = ',', default_value = "64,1400,16384")]
    sizes: Vec<usize>,
    #[command(flatten)]
    traffic: TrafficOpts,
    /// Write the profiler.compare.v1 JSON to FILE ("-" for stdout instead of the table).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    env_logger::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print as clap prints them; bad input gets one line.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{}", first_paragraph(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(anyhow::anyhow!("starting the async runtime: {e}")),
    };
    match runtime.block_on(dispatch(cli.command, cli.quiet)) {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

/// clap's message up to its first blank line, on one line.
fn first_paragraph(message: &str) -> String {
    message
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::FAILURE
}

async fn dispatch(command: Command, quiet: bool) -> Result<ExitCode> {
    match command {
        Command::Run(args) => run_command(args, quiet).await,
        Command::Compare(args) => compare_command(args, quiet).await,
        Command::Attach(args) => attach_command(args, quiet).await,
        Command::Bench {
            command: BenchCommand::Paper(args),
        } => paper_command(args, quiet).await,
        Command::Lab { command } => {
            doctor::require_privileges()?;
            lab_command(command).await
        }
        Command::Agent(args) => {
            doctor::require_privileges()?;
            let listen = run::agent::Listen {
                serial: args.serial,
                tcp: args.listen,
            };
            run::agent::serve(listen, &args.node)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Delay(args) => {
            doctor::require_privileges()?;
            delay_command(args).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Doctor { json } => {
            let d = doctor::run();
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print!("{}", table::doctor(&d));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Floor => {
            doctor::require(doctor::ATTACH_CAPS)?;
            floor_command().await.map(|()| ExitCode::SUCCESS)
        }
        Command::Report { file, format } => {
            print!("{}", Report::read(&file)?.render(format)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn lab_command(command: LabCommand) -> Result<ExitCode> {
    match command {
        LabCommand::Up {
            topology,
            options,
            forwarder,
        } => {
            let options = LabOptions {
                forwarder,
                ..options.options(topology)
            };
            lab::check(topology, &options)?;
            let _lock = Lock::acquire(&lab::lab_name(topology, options.placement))?;
            let lab = interruptible(lab::up(topology, &options)).await?;
            println!(
                "lab {} is up: namespaces {}",
                lab.name,
                lab.namespaces.join(", ")
            );
        }
        LabCommand::Down { all: true, .. } => return down_all().await,
        LabCommand::Down { name, .. } => {
            let name = name.unwrap_or_default();
            let _lock = Lock::acquire(&name)?;
            lab::down(&name).await?;
            println!("lab {name} is down");
        }
        LabCommand::Pod { command } => pod_command(command).await?,
        LabCommand::List { json } => {
            let labs = lab::list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&labs)?);
            } else {
                print_labs(&labs);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn pod_command(command: PodCommand) -> Result<()> {
    let (PodCommand::Add { lab, .. } | PodCommand::Rm { lab, .. }) = &command;
    let node = lab::lab_name(Topology::Node, Placement::SameHost);
    if *lab != node {
        anyhow::bail!("lab {lab:?}: pods are added to and removed from the node lab ({node})");
    }
    match command {
        PodCommand::Add {
            lab,
            name,
            namespace,
        } => {
            let _lock = Lock::acquire(&lab)?;
            let pod = interruptible(lab::node::pod_add(&lab, &name, &namespace)).await?;
            println!("pod {namespace}/{name}: netns {} ip {}", pod.netns, pod.ip);
        }
        PodCommand::Rm {
            lab,
            name,
            namespace,
        } => {
            let _lock = Lock::acquire(&lab)?;
            let pod = lab::node::pod_rm(&lab, &name, &namespace).await?;
            println!("pod {namespace}/{name} removed (netns {})", pod.netns);
        }
    }
    Ok(())
}

/// `lab down --all`: says what it removed, what it left because a live command uses it, and
/// fails if anything could not be removed.
async fn down_all() -> Result<ExitCode> {
    // tc filters first: they may be on devices of namespaces that go next.
    let (tc_removed, tc_failed) = profiler::kernel::tc::recover()?;
    let mut r = lab::recover::down_all().await?;
    r.removed.splice(0..0, tc_removed);
    r.failed.splice(0..0, tc_failed);
    for line in &r.removed {
        println!("removed {line}");
    }
    for line in &r.in_use {
        println!("left {line}");
    }
    for line in &r.failed {
        eprintln!("error: could not remove {line}");
    }
    if r.removed.is_empty() && r.in_use.is_empty() && r.failed.is_empty() {
        println!("nothing of the profiler's was left");
    }
    Ok(if r.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn delay_command(cli: DelayCli) -> Result<()> {
    let spec = inject::DelaySpec {
        netns: cli.netns,
        ifname: cli.iface,
        direction: cli.direction,
        delay: Duration::from_micros(cli.delay_us),
        port: cli.port,
    };
    let mut injector = inject::DelayInjector::attach(spec)?;
    let s = injector.spec();
    println!(
        "holding {} packets {} us at {} {}{}; Ctrl-C to stop",
        if s.port == 0 {
            "all".to_string()
        } else {
            format!("port {}", s.port)
        },
        cli.delay_us,
        s.direction,
        s.ifname,
        s.netns
            .as_deref()
            .map(|n| format!(" in netns {n}"))
            .unwrap_or_default()
    );
    let held = until_interrupted().await;
    // Detached whatever the wait returned.
    injector.detach()?;
    held?;
    println!("detached");
    Ok(())
}

async fn floor_command() -> Result<()> {
    let btf = profiler::kernel::btf::KernelBtf::load()?;
    let mut programs = profiler::kernel::programs::Programs::load(&btf, &Default::default())?;
    let attached = programs.attach_floor()?;
    for s in programs.statuses.iter().filter(|s| s.reason.is_some()) {
        eprintln!("{}: {}", s.name, s.reason.as_deref().unwrap_or(""));
    }
    eprintln!("floor: {attached} empty programs attached; following until Ctrl-C");
    until_interrupted().await
}

fn print_labs(labs: &[lab::Lab]) {
    if labs.is_empty() {
        println!("no lab is up");
    }
    for lab in labs {
        println!(
            "{} ({}, {:?}){}",
            lab.name,
            lab.topology.name(),
            lab.placement,
            owner_note(lab.owner.as_ref())
        );
        for g in &lab.guests {
            println!(
                "  guest {}: QEMU (process group {}), kernel {}, NIC {} (tap), agent {} and TCP port {}",
                g.name,
                g.pid,
                g.kernel,
                g.tap,
                g.socket.display(),
                lab::nested::AGENT_TCP_PORT
            );
        }
        if let Some(node) = &lab.node {
            println!(
                "  containerd pid {}, CRI socket {}, CNI {:?}",
                node.containerd,
                node.socket.display(),
                node.cni
            );
            for p in &node.pods {
                println!(
                    "  pod {}/{}: netns {} ip {} sandbox {}",
                    p.namespace, p.name, p.netns, p.ip, p.sandbox
                );
            }
        }
        for i in &lab.interfaces {
            let mut extra = format!(" mtu {}", i.mtu);
            if let Some(m) = &i.master {
                extra += &format!(" master {m}");
            }
            if let Some(l) = &i.link {
                extra += &format!(" link {l}");
            }
            println!(
                "  {:<22} {:<8} {:<7} ifindex {:<4} {}{}",
                i.netns,
                i.ifname,
                i.kind,
                i.ifindex,
                i.addrs.join(" "),
                extra
            );
        }
    }
}

/// Who made a lab, and whether it was left behind.
fn owner_note(owner: Option<&lab::Owner>) -> String {
    match owner {
        None => String::new(),
        Some(o) if o.alive() => format!(": in use by profiler {} (pid {})", o.command, o.pid),
        Some(o) => format!(
            ": LEFT BEHIND by profiler {} (pid {}, gone); the next run on it or `profiler lab down --all` removes it",
            o.command, o.pid
        ),
    }
}

async fn run_command(cli: RunCli, quiet: bool) -> Result<ExitCode> {
    // Bad input is refused before any work: the report's file, then the run's values.
    let json = cli.json.as_deref().map(JsonOut::checked).transpose()?;
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
        anyhow::bail!("--traffic alltoall runs between a lab's pods: use --lab, not --from/--to");
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
    }
    doctor::require_privileges()?;
    let result = match (&cli.from, to) {
        _ if pods.is_some() => {
            let (from, to) = pods.unwrap_or_default();
            let sources = profiler::pods::Sources {
                cri_socket: cli.cri_socket.clone(),
                cni_cache: None,
            };
            let target = interruptible(lab::target::between_pods(from, to, &sources)).await?;
            interruptible(run::profile(&args, &target)).await
        }
        (Some(from), Some((to_ns, addr))) => {
            let guest = match cli.agent {
                Some(at) => Some(interruptible(run::agent::guest_of(to_ns, at)).await?),
                None => None,
            };
            let target = interruptible(RunTarget::path(from, to_ns, addr, guest)).await?;
            interruptible(run::profile(&args, &target)).await
        }
        _ => {
            let used = interruptible(run::ensure_lab(args.lab, &options, "run")).await?;
            // Whatever happens next (error, Ctrl-C, SIGTERM), a lab this run created is removed.
            let result = interruptible(run::profile(&args, &RunTarget::lab(&used.lab))).await;
            used.release(cli.keep_lab).await?;
            result
        }
    };
    let report = result?;
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
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

async fn compare_command(cli: CompareCli, quiet: bool) -> Result<ExitCode> {
    let json = cli.json.as_deref().map(JsonOut::checked).transpose()?;
    for &size in &cli.sizes {
        cli.traffic.run_args(Topology::Bridge, size, quiet)?;
    }
    let base = cli.traffic.run_args(
        Topology::Bridge,
        cli.sizes.first().copied().unwrap_or(64),
        quiet,
    )?;
    doctor::require_privileges()?;
    // compare handles SIGINT/SIGTERM itself, so that the lab it made goes too.
    let result = compare::compare(&cli.lab, &cli.sizes, cli.placement, &base).await?;
    output(json.as_ref(), &result, &table::compare(&result))?;
    if cli.lab.len() > 1 && result.skipped.len() == cli.lab.len() - 1 {
        eprintln!("error: every type but the baseline was skipped: nothing was compared");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn paper_command(cli: PaperCli, quiet: bool) -> Result<ExitCode> {
    // Every output file is checked before any work: the matrix takes minutes.
    let json = cli.json.as_deref().map(JsonOut::checked).transpose()?;
    let checked =
        |flag, path: Option<PathBuf>| path.map(|p| JsonOut::checked_as(flag, &p)).transpose();
    let html = checked("--html", cli.html)?;
    let markdown = checked("--markdown", cli.markdown)?;
    doctor::require_privileges()?;
    let args = BenchArgs {
        types: cli.types,
        placements: cli.placement,
        quick: cli.quick,
        quiet,
        // As people type it: `profiler`, whatever path it was run by.
        command: std::iter::once("profiler".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
    };
    // bench handles SIGINT/SIGTERM itself, so that the lab it made goes too.
    let report = bench::paper(&args).await?;
    if let Some(out) = &html {
        out.write_text(&html::bench_page(&report))?;
    }
    if let Some(out) = &markdown {
        out.write_text(&report::bench::markdown(&report))?;
    }
    output(json.as_ref(), &report, &report::bench::table(&report))?;
    eprintln!("bench paper: {:.0} s", report.elapsed_s);
    let failed = report
        .cells
        .iter()
        .filter(|c| c.status == CellStatus::Failed)
        .count();
    if failed > 0 {
        eprintln!("error: {failed} cell(s) failed (their errors are in the report)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn attach_command(cli: AttachCli, quiet: bool) -> Result<ExitCode> {
    // Bad input is refused before anything is attached.
    let json = cli.json.as_deref().map(JsonOut::checked).transpose()?;
    let events = matches!(cli.mode, AttachMode::Events);
    if events && matches!(json, Some(JsonOut::Stdout)) {
        anyhow::bail!("--mode events prints its journeys on stdout: give --json a file, not -");
    }
    let filter = attach::filter::compile(&cli.filter)?;
    let view = if cli.drops {
        table::drops
    } else {
        table::attach
    };
    let verbose = cli.verbose;
    doctor::require(doctor::ATTACH_CAPS)?;
    let args = attach::AttachArgs {
        pods: cli.pod,
        pod_sources: profiler::pods::Sources {
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
        },
        cgroups: cli.cgroup,
        duration: cli.duration,
        prometheus: cli.prometheus,
        stats: cli.stats,
        hooks: cli.hooks,
        quiet,
        command: cli.command,
    };
    let report = attach::attach(&args).await?;
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
    // Profiling succeeded: the workload's status is the command's.
    Ok(report.command.as_ref().map_or(ExitCode::SUCCESS, |c| {
        ExitCode::from(attach::workload::exit_code(c))
    }))
}

/// Why a run did nothing, if it did nothing: no exchange, no stream message, no round.
fn nothing_done(report: &profiler::report::schema::RunReport) -> Option<&'static str> {
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
        .ok_or_else(|| anyhow::anyhow!("--to takes NETNS:IP, got {to:?}"))?;
    let addr = ip
        .parse()
        .map_err(|_| anyhow::anyhow!("--to {to}: {ip:?} is not an IPv4 address"))?;
    Ok((ns, addr))
}
