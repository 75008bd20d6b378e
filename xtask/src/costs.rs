//! `cargo xtask costs`: the eBPF programs' kernel cost per invocation (bpf_stats), for the run's
//! own tagged packets and for everything else, on the bridge lab.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::cmd::{self, step};

const TAGGED: &[&str] = &["--count", "5000"];
/// A slow tagged run that keeps the programs attached while a ping flood (untagged for the
/// programs) crosses the same path: the tagged packets are a few percent of the invocations.
const UNTAGGED: &[&str] = &["--count", "400", "--rate", "100"];
const FLOOD: &[&str] = &[
    "netns",
    "exec",
    "prof-bridge-pod-a",
    "ping",
    "-f",
    "-q",
    "-w",
    "7",
    "198.18.0.2",
];

pub fn run(profiler: &Path) -> Result<()> {
    step("profiler lab up bridge");
    cmd::run(Command::new(profiler).args(["lab", "up", "bridge"]))?;
    let result = measure(profiler);
    step("profiler lab down bridge");
    cmd::run(Command::new(profiler).args(["lab", "down", "bridge"]))?;
    let (tagged, untagged) = result?;
    println!("\nkernel cost per invocation, ns (profiler run --stats on the bridge lab)");
    println!(
        "{:<26} {:>12} {:>14} {:>12} {:>14}",
        "program", "tagged", "(invocations)", "untagged", "(invocations)"
    );
    for (prog, (t_ns, t_runs)) in &tagged {
        let (u_ns, u_runs) = untagged.get(prog).copied().unwrap_or((0.0, 0));
        println!("{prog:<26} {t_ns:>12.1} {t_runs:>14} {u_ns:>12.1} {u_runs:>14}");
    }
    Ok(())
}

type Costs = BTreeMap<String, (f64, u64)>;

fn measure(profiler: &Path) -> Result<(Costs, Costs)> {
    step(format!(
        "tagged: profiler run --lab bridge --stats {}",
        TAGGED.join(" ")
    ));
    let tagged = costs(profiler, TAGGED)?;
    step(format!(
        "untagged: ip {} alongside profiler run --stats {}",
        FLOOD.join(" "),
        UNTAGGED.join(" ")
    ));
    let mut flood = Command::new("ip")
        .args(FLOOD)
        .stdout(Stdio::null())
        .spawn()
        .context("starting the ping flood")?;
    let untagged = costs(profiler, UNTAGGED);
    let _ = flood.wait();
    Ok((tagged, untagged?))
}

fn costs(profiler: &Path, args: &[&str]) -> Result<Costs> {
    let mut run = Command::new(profiler);
    run.args(["run", "--lab", "bridge", "--stats", "--json", "-"])
        .args(args);
    let out = cmd::output(&mut run)?;
    let report: Value = serde_json::from_str(&out).context("reading the run's JSON report")?;
    let costs = report["program_costs"]
        .as_array()
        .context("the report has no program_costs")?;
    Ok(costs
        .iter()
        .filter(|c| c["run_count"].as_u64().unwrap_or(0) > 0)
        .map(|c| {
            let name = c["program"].as_str().unwrap_or("?").to_string();
            (
                name,
                (
                    c["ns_per_run"].as_f64().unwrap_or(0.0),
                    c["run_count"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect())
}
