//! `profiler bench paper`: the study's three experiments (request/response latency, stream
//! throughput, all-to-all rounds) on every network type this kernel can build, at both
//! placements, each cell a full run report; then the study's findings judged on the figures
//! ([`findings`]).

pub mod findings;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use indicatif::ProgressBar;

use crate::{
    kernel,
    lab::{self, target::RunTarget, Lab, LabOptions, Network, Placement, Topology},
    progress,
    report::{
        self,
        schema::{
            BenchCell, BenchReport, CellResult, CellStatus, HookSet, Proto, RunReport, Skipped,
            TrafficKind, BENCH_SCHEMA,
        },
    },
    run::{self, ensure_lab, profile, RunArgs},
    signal::{interruptible, is_interruption},
};

/// How much of each experiment a bench runs.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Message sizes of rr and stream: 64 B to 64 KiB (65507 B, the largest UDP payload).
    pub sizes: &'static [usize],
    pub rr_count: u32,
    pub stream_duration: Duration,
    /// Processes per pod of the all-to-all cells (the study's 2 then 4).
    pub procs: &'static [u32],
    /// Pods per host of every lab (the all-to-all's; rr and stream use the first two).
    pub pods: u32,
    pub rounds: u32,
}

/// The whole matrix: about N minutes on this 2-core machine (BENCHMARKS.md says how long).
pub const FULL: Plan = Plan {
    sizes: &[64, 1024, 8192, 16384, 65507],
    rr_count: 2000,
    stream_duration: Duration::from_secs(3),
    procs: &[2, 4],
    // The study's 8 pods per node.
    pods: 8,
    rounds: 20,
};

/// `--quick`: the sizes the findings need (small, and above the study's 8 KB), fewer exchanges,
/// pods and rounds.
pub const QUICK: Plan = Plan {
    sizes: &[64, 16384],
    rr_count: 300,
    stream_duration: Duration::from_secs(1),
    procs: &[2, 4],
    pods: 4,
    rounds: 5,
};

/// The message size of the all-to-all cells, as in the study's Table 3.
const ALLTOALL_SIZE: usize = 16384;

pub struct BenchArgs {
    /// Network types: a topology, with a Service in front of its server or not.
    pub types: Vec<Network>,
    pub placements: Vec<Placement>,
    pub quick: bool,
    pub quiet: bool,
    /// The command line, for the report's head.
    pub command: String,
}

/// One cell to run: the experiment and its parameters.
#[derive(Clone, Copy, Debug)]
struct CellSpec {
    experiment: TrafficKind,
    proto: Proto,
    size: usize,
    procs: Option<u32>,
}

impl Plan {
    fn cells(&self) -> Vec<CellSpec> {
        let sized = |experiment, proto| {
            self.sizes.iter().map(move |&size| CellSpec {
                experiment,
                proto,
                size,
                procs: None,
            })
        };
        // The study's latency is sockperf's UDP; its throughput iperf's TCP.
        sized(TrafficKind::Rr, Proto::Udp)
            .chain(sized(TrafficKind::Stream, Proto::Tcp))
            .chain(self.procs.iter().map(|&p| CellSpec {
                experiment: TrafficKind::Alltoall,
                proto: Proto::Tcp,
                size: ALLTOALL_SIZE,
                procs: Some(p),
            }))
            .collect()
    }
}

/// The labs of the matrix: each type at each placement it has (host and flannel-vxlan are
/// cross-host only), in the order given.
pub fn labs(types: &[Network], placements: &[Placement]) -> Vec<(Network, Placement)> {
    types
        .iter()
        .flat_map(|&t| placements.iter().map(move |&p| (t, p)))
        .filter(|&(t, placement)| lab::check(t.topology, &lab_options(t, placement)).is_ok())
        .collect()
}

fn lab_options(network: Network, placement: Placement) -> LabOptions {
    LabOptions {
        placement,
        service: network.service,
        ..LabOptions::default()
    }
}

/// Runs the matrix: each lab is brought up (or skipped with the reason if this kernel cannot
/// build it), its cells run one after the other, and it is taken down again.
pub async fn paper(args: &BenchArgs) -> Result<BenchReport> {
    let started = Instant::now();
    let load_start = load();
    let plan = if args.quick { QUICK } else { FULL };
    let labs = labs(&args.types, &args.placements);
    if labs.is_empty() {
        bail!("no type of --types has a placement of --placement");
    }
    let specs = plan.cells();
    let bar = progress::bar((labs.len() * specs.len()) as u64, "cells", args.quiet);
    let mut cells = Vec::new();
    let mut skipped = Vec::new();
    for &(network, placement) in &labs {
        let topology = network.topology;
        let mut options = LabOptions {
            pods: Some(plan.pods),
            ..lab_options(network, placement)
        };
        // A topology without more pods, or a Service (one server pod behind it), still runs rr
        // and stream on its two.
        let no_pods = match network.service {
            Some(_) => run::check_service_traffic(TrafficKind::Alltoall)
                .err()
                .map(|e| format!("{e:#}")),
            None => lab::check(topology, &options)
                .err()
                .map(|e| format!("{e:#}")),
        };
        if no_pods.is_some() {
            options.pods = None;
        }
        let used = match interruptible(ensure_lab(topology, &options, "bench")).await {
            Ok(used) => used,
            Err(e) if lab::CannotBuild::is(&e) => {
                let reason = format!("{e:#}");
                say(
                    &bar,
                    &format!("skipping {}: {reason}", lab::lab_name(topology, placement)),
                );
                skipped.push(Skipped {
                    topology: lab::lab_name(topology, placement),
                    reason,
                });
                bar.inc(specs.len() as u64);
                continue;
            }
            Err(e) => return Err(e),
        };
        let ran = run_cells(
            &plan,
            &specs,
            &used.lab,
            no_pods.as_deref(),
            &bar,
            &mut cells,
        );
        let ran = interruptible(ran).await;
        used.release(false).await?;
        ran?;
    }
    bar.finish_and_clear();
    // The study's findings are about its types, without Services.
    let plain: Vec<Topology> = (args.types.iter())
        .filter(|t| t.service.is_none())
        .map(|t| t.topology)
        .collect();
    let findings = findings::judge(&cells, &skipped, &plain, &args.placements);
    Ok(BenchReport {
        schema: BENCH_SCHEMA.into(),
        command: args.command.clone(),
        quick: args.quick,
        kernel: kernel::release(),
        machine: machine(),
        commit: commit(),
        elapsed_s: started.elapsed().as_secs_f64(),
        load_start,
        load_end: load(),
        skipped,
        cells,
        findings,
    })
}

/// A line for people above the progress bar (or alone when there is none).
fn say(bar: &ProgressBar, line: &str) {
    bar.suspend(|| eprintln!("{line}"));
}

async fn run_cells(
    plan: &Plan,
    specs: &[CellSpec],
    lab: &Lab,
    no_pods: Option<&str>,
    bar: &ProgressBar,
    cells: &mut Vec<BenchCell>,
) -> Result<()> {
    for spec in specs {
        bar.set_message(format!(
            "{} {:?} {} B",
            lab.name, spec.experiment, spec.size
        ));
        let started = Instant::now();
        let outcome = match no_pods {
            Some(why) if spec.experiment == TrafficKind::Alltoall => {
                Ok(Outcome::Skipped(why.to_string()))
            }
            _ => run_cell(plan, spec, lab).await,
        };
        let cell = cell(spec, lab, plan, outcome, started.elapsed().as_secs_f64())?;
        say(bar, &report::bench::cell_line(&cell));
        cells.push(cell);
        bar.inc(1);
    }
    Ok(())
}

/// What became of a cell that did not fail.
enum Outcome {
    Ran(CellResult, Box<RunReport>),
    Skipped(String),
}

async fn run_cell(plan: &Plan, spec: &CellSpec, lab: &Lab) -> Result<Outcome> {
    let alltoall = spec.experiment == TrafficKind::Alltoall;
    let args = RunArgs {
        lab: lab.topology,
        proto: spec.proto,
        size: spec.size,
        count: if alltoall { plan.rounds } else { plan.rr_count },
        rate: None,
        port: None,
        stats: false,
        quiet: true,
        // The study's hosts had no deep hooks to offer either; every cell alike.
        hooks: HookSet::Stable,
        // A round of 8 pods x 4 processes across hosts takes about a second here.
        timeout: Duration::from_secs(if alltoall { 20 } else { 1 }),
        traffic: spec.experiment,
        duration: plan.stream_duration,
        tag_every: None,
        pods: plan.pods,
        procs: spec.procs.unwrap_or(run::DEFAULT_PROCS),
        uprobes: Vec::new(),
    };
    let report = profile(&args, &RunTarget::lab(lab)).await?;
    let result = match spec.experiment {
        TrafficKind::Rr => direction_result(&report, "request"),
        TrafficKind::Stream => stream_result(&report),
        TrafficKind::Alltoall => alltoall_result(&report),
    };
    Ok(Outcome::Ran(result, Box::new(report)))
}

/// The one-way latency of a direction's tagged messages, end to end.
fn direction_result(r: &RunReport, direction: &str) -> CellResult {
    let d = r.direction(direction);
    CellResult {
        p50_ns: d.map(|d| d.end_to_end.p50_ns),
        p99_ns: d.map(|d| d.end_to_end.p99_ns),
        ..CellResult::default()
    }
}

/// The stream's throughput (with nothing attached, as the study's iperf saw its paths), and
/// its tagged messages' latency.
fn stream_result(r: &RunReport) -> CellResult {
    CellResult {
        gbit_per_s: r
            .stream
            .as_ref()
            .map(|s| s.unprofiled_gbit_per_s.unwrap_or(s.gbit_per_s)),
        messages_per_s: r.stream.as_ref().map(|s| s.messages_per_s),
        ..direction_result(r, "stream")
    }
}

fn alltoall_result(r: &RunReport) -> CellResult {
    CellResult {
        round_p50_ms: r.alltoall.as_ref().map(|a| a.round_p50_ms),
        round_p99_ms: r.alltoall.as_ref().map(|a| a.round_p99_ms),
        ..CellResult::default()
    }
}

/// The cell as reported; an interruption is passed on, any other error fails the cell alone.
fn cell(
    spec: &CellSpec,
    lab: &Lab,
    plan: &Plan,
    outcome: Result<Outcome>,
    elapsed_s: f64,
) -> Result<BenchCell> {
    let (status, reason, result, run) = match outcome {
        Ok(Outcome::Ran(result, run)) => (CellStatus::Ok, None, result, Some(*run)),
        Ok(Outcome::Skipped(why)) => (CellStatus::Skipped, Some(why), CellResult::default(), None),
        Err(e) if is_interruption(&e) => return Err(e),
        Err(e) => (
            CellStatus::Failed,
            Some(format!("{e:#}")),
            CellResult::default(),
            None,
        ),
    };
    Ok(BenchCell {
        lab: Network::label(lab),
        topology: Network::of(lab).to_string(),
        placement: lab.placement,
        experiment: spec.experiment,
        proto: spec.proto,
        size: spec.size,
        count: match spec.experiment {
            TrafficKind::Rr => plan.rr_count,
            TrafficKind::Stream => 0,
            TrafficKind::Alltoall => plan.rounds,
        },
        duration_s: (spec.experiment == TrafficKind::Stream)
            .then_some(plan.stream_duration.as_secs_f64()),
        pods: spec.procs.map(|_| plan.pods),
        procs: spec.procs,
        status,
        reason,
        elapsed_s,
        result,
        run,
    })
}

/// "2 x Intel Xeon ..., 7.8 GiB": what the figures were measured on.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    format!("{cpus} x {model}, {:.1} GiB", kib / (1024.0 * 1024.0))
}

/// The 1-minute load average (0 if /proc/loadavg cannot be read).
fn load() -> f64 {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0)
}

/// The commit of the checkout the bench runs in, if it runs in one.
fn commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|c| !c.is_empty())
}
