//! `profiler floor` (hidden): empty programs at attach's tracepoints until Ctrl-C, the
//! reference the overhead benchmark measures attach against.

use std::process::ExitCode;

use anyhow::Result;

use crate::{
    kernel::{btf::KernelBtf, doctor, programs::Programs},
    signal::until_interrupted,
};

pub async fn run() -> Result<ExitCode> {
    doctor::require(doctor::ATTACH_CAPS)?;
    let btf = KernelBtf::load()?;
    let mut programs = Programs::load(&btf, &Default::default())?;
    let attached = programs.attach_floor()?;
    for s in programs.statuses.iter().filter(|s| s.reason.is_some()) {
        eprintln!("{}: {}", s.name, s.reason.as_deref().unwrap_or(""));
    }
    eprintln!("floor: {attached} empty programs attached; following until Ctrl-C");
    until_interrupted().await?;
    Ok(ExitCode::SUCCESS)
}
