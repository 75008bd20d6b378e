//! The command line: one module per command, each with its arguments (clap) and what it does;
//! here the commands' list and the dispatch, with what they share (values parsed within
//! their ranges, reports written where they were asked to go).

mod agent;
mod attach;
mod bench;
mod compare;
mod delay;
mod doctor;
pub mod exit;
mod floor;
mod lab;
pub mod output;
mod reference;
mod report;
mod run;
pub mod values;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "profiler",
    version,
    about = "Per-hop latency of container network paths, measured with eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// No progress bar on stderr (there is none when stderr is not a terminal either).
    #[arg(long, global = true)]
    pub quiet: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Profile a lab path: attach, drive tagged request/response traffic, print the waterfall.
    Run(run::RunCli),
    /// Several network types side by side: latency per type and size, and the segments that
    /// make each differ from the first (the baseline).
    Compare(compare::CompareCli),
    /// Benchmarks: `paper` runs the study's experiments on every network type this kernel can
    /// build and judges its findings.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Follow real traffic on this node (no traffic generated): per-segment latency kept in
    /// the kernel, reported at the end, on /metrics, or per packet.
    Attach(attach::AttachCli),
    /// Built-in lab topologies (network namespaces you can step into with `ip netns exec`).
    Lab {
        #[command(subcommand)]
        command: lab::LabCommand,
    },
    /// Hold matching packets for a fixed time at one tc hook until Ctrl-C (what-if experiments).
    Delay(delay::DelayCli),
    /// What this kernel and these privileges allow: hook types, BTF, capabilities.
    Doctor(doctor::DoctorCli),
    /// Empty programs at attach's tracepoints until Ctrl-C: the physical floor the overhead
    /// benchmark compares attach with.
    #[command(hide = true)]
    Floor,
    /// Inside a VM on a nested path: attach the guest's probes for a host run and send it the
    /// events (started by nested labs in their guests; on a real VM, start it yourself and
    /// point `profiler run --agent` at it).
    Agent(agent::AgentCli),
    /// Re-render a saved JSON report (run, attach, compare, doctor) as its table, as JSON, or as
    /// an HTML page with the waterfalls drawn.
    Report(report::ReportCli),
    /// Write the command reference (Markdown), man pages and shell completions into DIR, from
    /// these very definitions (`cargo xtask docs` runs it).
    #[command(hide = true)]
    Reference(reference::ReferenceCli),
}

/// Runs the command; its exit code, or the error that stopped it.
pub async fn dispatch(command: Command, quiet: bool) -> Result<ExitCode> {
    match command {
        Command::Run(args) => run::run(args, quiet).await,
        Command::Compare(args) => compare::run(args, quiet).await,
        Command::Bench { command } => bench::run(command, quiet).await,
        Command::Attach(args) => attach::run(args, quiet).await,
        Command::Lab { command } => lab::run(command).await,
        Command::Delay(args) => delay::run(args).await,
        Command::Doctor(args) => doctor::run(&args),
        Command::Floor => floor::run().await,
        Command::Agent(args) => agent::run(args).await,
        Command::Report(args) => report::run(&args),
        Command::Reference(args) => reference::run(&args),
    }
}
