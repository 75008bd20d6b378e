//! The `profiler` command line.
// The CLI reaches the package's other dependencies through the library, where the lint applies.
#![allow(unused_crate_dependencies)]

use std::{io::Write as _, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use profiler::{
    attach,
    kernel::{doctor, inject, programs::FollowConfig},
    lab::{self, target::RunTarget, LabOptions, Placement, Topology},
    report::{
        schema::{HookSet, Proto},
        table, Format, Report,
    },
    run::{self, compare, RunArgs},
    signal::{interruptible, is_interruption},
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
}

#[derive(Subcommand)]
enum Command {
    /// Profile a lab path: attach, drive tagged request/response traffic, print the waterfall.
    Run(RunCli),
    /// Several network types side by side: latency per type and size, and the segments that
    /// make each differ from the first (the baseline).
    Compare(CompareCli),
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
    /// Re-render a saved JSON report (run, attach, compare, doctor) as its table, as JSON, or as
    /// an HTML page with the waterfalls drawn.
    Report {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Parser)]
struct AttachCli {
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
    /// Seconds to follow (default: until Ctrl-C or SIGTERM).
    #[arg(long)]
    duration: Option<f64>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464) at /metrics.
    #[arg(long)]
    prometheus: Option<std::net::SocketAddr>,
    /// Packets followed at once at most (the in-flight map's size: the memory bound).
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
    /// Hooks to attach: stable (tracepoints, tc) or deep (also the datapath's kernel
    /// functions: veth, bridge, vxlan, OVS, ...; falls back to stable with a notice where the
    /// kernel has no kprobes).
    #[arg(long, value_enum, default_value = "deep")]
    hooks: HookSet,
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
    },
    /// Remove a lab and everything it created.
    Down { name: String },
    /// The labs that are up, with their namespaces, interfaces and addresses.
    List {
        #[arg(long)]
        json: bool,
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
    /// Both pods on one host, or on two hosts joined by a wire.
    #[arg(long, value_enum, default_value = "same-host")]
    placement: Placement,
    /// MTU of the pods' interfaces (and the overlay device); default: the topology's.
    #[arg(long)]
    mtu: Option<u32>,
}

impl LabOpts {
    fn options(&self) -> LabOptions {
        LabOptions {
            placement: self.placement,
            mtu: self.mtu,
        }
    }
}

#[derive(Args, Clone)]
struct TrafficOpts {
    #[arg(long, value_enum, default_value = "udp")]
    proto: Proto,
    /// Request/response exchanges.
    #[arg(long, default_value_t = 1000)]
    count: u32,
    /// Requests per second (default: next request as soon as the response arrives).
    #[arg(long)]
    rate: Option<f64>,
    /// Server port of the tagged traffic.
    #[arg(long, default_value_t = 7373)]
    port: u16,
    /// Seconds to wait for a response before counting it lost.
    #[arg(long, default_value_t = 1.0)]
    timeout: f64,
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
    fn run_args(&self, lab: Topology, size: usize) -> Result<RunArgs> {
        if !(self.timeout > 0.0 && self.timeout.is_finite()) {
            anyhow::bail!("--timeout must be a positive number of seconds");
        }
        let args = RunArgs {
            lab,
            proto: self.proto,
            size,
            count: self.count,
            rate: self.rate,
            port: self.port,
            stats: self.stats,
            hooks: self.hooks,
            timeout: Duration::from_secs_f64(self.timeout),
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
    #[arg(long, requires = "to", value_name = "NETNS")]
    from: Option<String>,
    /// ... and the server listens on IP in this namespace.
    #[arg(long, requires = "from", value_name = "NETNS:IP")]
    to: Option<String>,
    #[command(flatten)]
    lab_opts: LabOpts,
    /// Payload bytes per request and per response (16 to 65536).
    #[arg(long, default_value_t = 64)]
    size: usize,
    #[command(flatten)]
    traffic: TrafficOpts,
    /// Write the profiler.run.v1 JSON report to FILE ("-" for stdout instead of the table).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Exit 0 even if the kernel lost events.
    #[arg(long)]
    allow_loss: bool,
    /// Leave a lab this run brought up in place afterwards.
    #[arg(long)]
    keep_lab: bool,
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
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(anyhow::anyhow!("starting the async runtime: {e}")),
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::FAILURE
}

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run(args) => run_command(args).await,
        Command::Compare(args) => compare_command(args).await,
        Command::Attach(args) => attach_command(args).await,
        Command::Lab { command } => {
            doctor::require_privileges()?;
            lab_command(command).await.map(|()| ExitCode::SUCCESS)
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
        Command::Report { file, format } => {
            print!("{}", Report::read(&file)?.render(format)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn lab_command(command: LabCommand) -> Result<()> {
    match command {
        LabCommand::Up { topology, options } => {
            let lab = interruptible(lab::up(topology, &options.options())).await?;
            println!(
                "lab {} is up: namespaces {}",
                lab.name,
                lab.namespaces.join(", ")
            );
        }
        LabCommand::Down { name } => {
            lab::down(&name).await?;
            println!("lab {name} is down");
        }
        LabCommand::List { json } => {
            let labs = lab::list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&labs)?);
            } else {
                print_labs(&labs);
            }
        }
    }
    Ok(())
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
    // Returns (as an error) on SIGINT/SIGTERM; either way the injector is detached.
    let held = interruptible(std::future::pending::<Result<()>>()).await;
    injector.detach()?;
    match held {
        Err(e) if is_interruption(&e) => {
            println!("detached");
            Ok(())
        }
        other => other,
    }
}

fn print_labs(labs: &[lab::Lab]) {
    if labs.is_empty() {
        println!("no lab is up");
    }
    for lab in labs {
        println!(
            "{} ({}, {:?})",
            lab.name,
            lab.topology.name(),
            lab.placement
        );
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

async fn run_command(cli: RunCli) -> Result<ExitCode> {
    doctor::require_privileges()?;
    let args = cli.traffic.run_args(cli.lab, cli.size)?;
    let result = match (&cli.from, &cli.to) {
        (Some(from), Some(to)) => {
            let (to_ns, addr) = parse_to(to)?;
            let target = interruptible(RunTarget::path(from, to_ns, addr)).await?;
            interruptible(run::profile(&args, &target)).await
        }
        _ => {
            let (lab, created) =
                interruptible(run::ensure_lab(args.lab, &cli.lab_opts.options())).await?;
            // Whatever happens next (error, Ctrl-C, SIGTERM), a lab this run created is removed.
            let result = interruptible(run::profile(&args, &RunTarget::lab(&lab))).await;
            if created && !cli.keep_lab {
                lab::down(&lab.name)
                    .await
                    .context("removing the lab this run created")?;
            }
            result
        }
    };
    let report = result?;
    output(cli.json.as_deref(), &report, table::run(&report))?;
    if report.events.lost > 0 && !cli.allow_loss {
        eprintln!(
            "error: the kernel lost {} events; rerun with a lower --rate or pass --allow-loss",
            report.events.lost
        );
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

async fn compare_command(cli: CompareCli) -> Result<ExitCode> {
    doctor::require_privileges()?;
    for &size in &cli.sizes {
        cli.traffic.run_args(Topology::Bridge, size)?;
    }
    let base = cli
        .traffic
        .run_args(Topology::Bridge, cli.sizes.first().copied().unwrap_or(64))?;
    let result =
        interruptible(compare::compare(&cli.lab, &cli.sizes, cli.placement, &base)).await?;
    output(cli.json.as_deref(), &result, table::compare(&result))?;
    Ok(ExitCode::SUCCESS)
}

async fn attach_command(cli: AttachCli) -> Result<ExitCode> {
    // Bad input is refused before anything is attached.
    let filter = attach::filter::compile(&cli.filter)?;
    let duration = match cli.duration {
        Some(d) if !(d > 0.0 && d.is_finite()) => {
            anyhow::bail!("--duration must be a positive number of seconds, got {d}")
        }
        d => d.map(Duration::from_secs_f64),
    };
    doctor::require(doctor::ATTACH_CAPS)?;
    let args = attach::AttachArgs {
        netns: cli.netns,
        ifaces: cli.iface,
        filter: cli.filter,
        follow: FollowConfig {
            sample: cli.sample,
            max_gap_ns: cli.max_gap_ms * 1_000_000,
            stream: matches!(cli.mode, AttachMode::Events),
            filter,
            max_in_flight: cli.max_in_flight,
            by_cgroup: !cli.cgroup.is_empty(),
        },
        cgroups: cli.cgroup,
        duration,
        prometheus: cli.prometheus,
        stats: cli.stats,
        hooks: cli.hooks,
    };
    let report = attach::attach(&args).await?;
    let table = table::attach(&report);
    match (&cli.json, cli.mode) {
        // Events own stdout: the summary goes to stderr unless it has a file.
        (None, AttachMode::Events) => eprint!("{table}"),
        (json, _) => output(json.as_deref(), &report, table)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// "NETNS:IP" of --to.
fn parse_to(to: &str) -> Result<(&str, std::net::Ipv4Addr)> {
    let (ns, ip) = to
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("--to takes NETNS:IP, got {to}"))?;
    let addr = ip
        .parse()
        .map_err(|_| anyhow::anyhow!("--to: {ip} is not an IPv4 address"))?;
    Ok((ns, addr))
}

/// JSON to FILE (then the table too), JSON alone to stdout for "-", else the table.
fn output(
    json: Option<&std::path::Path>,
    value: &impl serde::Serialize,
    table: String,
) -> Result<()> {
    match json {
        Some(p) if p.as_os_str() == "-" => println!("{}", serde_json::to_string_pretty(value)?),
        Some(p) => {
            let mut f =
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
            serde_json::to_writer_pretty(&mut f, value)?;
            writeln!(f)?;
            print!("{table}");
        }
        None => print!("{table}"),
    }
    Ok(())
}
