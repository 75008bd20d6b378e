//! `profiler report FILE`: a saved JSON report rendered again.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;

use crate::report::{Format, Report};

#[derive(clap::Args)]
pub struct ReportCli {
    file: PathBuf,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

pub fn run(cli: &ReportCli) -> Result<ExitCode> {
    print!("{}", Report::read(&cli.file)?.render(cli.format)?);
    Ok(ExitCode::SUCCESS)
}
