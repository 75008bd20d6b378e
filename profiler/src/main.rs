//! The `profiler` command: parses the command line and runs the command (src/cli/ has one
//! module per command).
// The CLI reaches the package's other dependencies through the library, where the lint applies.
#![allow(unused_crate_dependencies)]

use std::process::ExitCode;

use clap::Parser as _;
use profiler::cli::{dispatch, Cli};

fn main() -> ExitCode {
    env_logger::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print as clap prints them; bad input gets one line.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{}", first_paragraph(&e.render().to_string()));
            return ExitCode::from(profiler::cli::exit::BAD_INPUT);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(anyhow::anyhow!("starting the async runtime: {e}")),
    };
    match runtime.block_on(dispatch(cli.command, cli.quiet)) {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

/// clap's message up to its first blank line, on one line.
fn first_paragraph(message: &str) -> String {
    message
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line, and the status that says what kind of failure it was.
fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::from(profiler::cli::exit::of(&e))
}
