//! `profiler report FILE`: a saved JSON report rendered again; `profiler report --events
//! FILE`: a run's saved events attributed again.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;

use crate::{
    error::bad_input,
    report::{Format, Report},
    run::{self, record::Collected},
};

#[derive(clap::Args)]
pub struct ReportCli {
    /// A report a command wrote with --json.
    #[arg(required_unless_present = "events", conflicts_with = "events")]
    file: Option<PathBuf>,
    /// What `profiler run --save-events FILE` collected: attributed again (journeys, segments,
    /// drops), giving the report that run made.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

pub fn run(cli: &ReportCli) -> Result<ExitCode> {
    let report = match (&cli.events, &cli.file) {
        (Some(events), _) => Report::Run(run::attribute(&Collected::read(events)?)),
        (None, Some(file)) => Report::read(file)?,
        (None, None) => return Err(bad_input("report takes FILE, or --events FILE")),
    };
    print!("{}", report.render(cli.format)?);
    Ok(ExitCode::SUCCESS)
}
