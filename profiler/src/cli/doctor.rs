//! `profiler doctor`: what this kernel and these privileges allow.

use std::process::ExitCode;

use anyhow::Result;

use crate::{kernel::doctor, report::table};

#[derive(clap::Args)]
pub struct DoctorCli {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(cli: &DoctorCli) -> Result<ExitCode> {
    let d = doctor::run();
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print!("{}", table::doctor(&d));
    }
    Ok(ExitCode::SUCCESS)
}
