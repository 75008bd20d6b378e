//! `profiler compare`: network types side by side, and the segments that make them differ.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::Args;

use super::{
    output::{output, JsonOut},
    run::TrafficOpts,
};
use crate::{
    error::bad_input,
    kernel::doctor,
    lab::{Net2, Network, Placement, Topology, NET2_IFNAME},
    report::{
        schema::{CompareReport, Made},
        table,
    },
    run::compare,
};

#[derive(Args)]
pub struct CompareCli {
    /// Network types to compare, the first being the baseline: lab topologies (as `run --lab`
    /// takes them), each with `+iptables` or `+nftables` for a Service in front of the server
    /// (bridge, flannel-vxlan): `--lab bridge,bridge+iptables` is what the Service costs.
    #[arg(
        long,
        value_name = "NETWORK",
        value_delimiter = ',',
        default_value = "host,bridge,flannel-vxlan,macvlan,ipvlan-l2,ovs-vlan,ovs-vxlan,ovs-gre"
    )]
    lab: Vec<Network>,
    #[arg(long, value_enum, default_value = "cross-host")]
    placement: Placement,
    /// A second network in every lab: each pod's net1, a TYPE child of its host's wire0 (as
    /// `lab up --net2`); `--iface eth0,net1` then compares the same pods over both.
    #[arg(long, value_enum, value_name = "TYPE")]
    net2: Option<Net2>,
    /// The pods' interfaces to profile in each lab, in order (net1: a lab with --net2).
    #[arg(long, value_delimiter = ',', default_value = "eth0", value_parser = ["eth0", "net1"])]
    iface: Vec<String>,
    /// Payload sizes, bytes.
    #[arg(long, value_delimiter = ',', default_value = "64,1400,16384")]
    sizes: Vec<usize>,
    #[command(flatten)]
    traffic: TrafficOpts,
    /// Write the profiler.compare.v1 JSON to FILE ("-" for stdout instead of the table).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

pub async fn run(cli: CompareCli, quiet: bool) -> Result<ExitCode> {
    let json = cli.json.as_deref().map(JsonOut::checked).transpose()?;
    for &size in &cli.sizes {
        cli.traffic.run_args(Topology::Bridge, size, quiet)?;
    }
    let base = cli.traffic.run_args(
        Topology::Bridge,
        cli.sizes.first().copied().unwrap_or(64),
        quiet,
    )?;
    if cli.iface.iter().any(|i| i == NET2_IFNAME) && cli.net2.is_none() {
        return Err(bad_input(
            "--iface net1 needs --net2 TYPE (the second network's type)",
        ));
    }
    doctor::require_privileges()?;
    // compare handles SIGINT/SIGTERM itself, so that the lab it made goes too.
    let paths = compare::Paths {
        placement: cli.placement,
        net2: cli.net2,
        ifaces: cli.iface,
    };
    let result = compare::compare(&cli.lab, &cli.sizes, &paths, &base).await?;
    let result = CompareReport {
        made: Some(Made::here()),
        ..result
    };
    output(json.as_ref(), &result, &table::compare(&result))?;
    if cli.lab.len() > 1 && result.skipped.len() == cli.lab.len() - 1 {
        eprintln!("error: every type but the baseline was skipped: nothing was compared");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
