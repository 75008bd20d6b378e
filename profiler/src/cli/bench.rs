//! `profiler bench paper`: the study's matrix on every type this kernel can build.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Args, Subcommand};

use super::output::{output, JsonOut};
use crate::{
    bench::{self, BenchArgs},
    kernel::doctor,
    lab::{Network, Placement},
    report::{self, html, schema::CellStatus},
};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The study's matrix: network types x placements x {request/response and stream at
    /// 64 B..64 KiB, all-to-all with 2 and 4 processes per pod}; then findings 1-7 judged.
    Paper(PaperCli),
}

#[derive(Args)]
pub struct PaperCli {
    /// Fewer sizes and exchanges: under 3 minutes instead of under 20.
    #[arg(long)]
    quick: bool,
    /// Network types; one this kernel cannot build is skipped with the reason. Each is a lab
    /// topology, with `+iptables` or `+nftables` for a Service in front of the server (bridge,
    /// flannel-vxlan; its all-to-all cells are skipped: one pod serves behind a Service).
    #[arg(
        long,
        value_name = "NETWORK",
        value_delimiter = ',',
        default_value = "host,bridge,flannel-vxlan,macvlan,ipvlan-l2,ovs-vlan,ovs-vxlan"
    )]
    types: Vec<Network>,
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

pub async fn run(command: BenchCommand, quiet: bool) -> Result<ExitCode> {
    match command {
        BenchCommand::Paper(cli) => paper(cli, quiet).await,
    }
}

async fn paper(cli: PaperCli, quiet: bool) -> Result<ExitCode> {
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
