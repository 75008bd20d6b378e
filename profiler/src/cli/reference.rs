//! `profiler reference DIR` (hidden): the command reference, man pages and shell completions
//! generated from the clap definitions, so that none of them can drift from `--help`.
//! `cargo xtask docs` writes them (docs/reference.md is kept in the repository, and
//! tests/reference.rs fails when it is stale).

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Args, CommandFactory as _};
use clap_complete::Shell;

use super::Cli;

#[derive(Args)]
pub struct ReferenceCli {
    /// Where to write reference.md, man/ (one page per command) and completions/.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

pub fn run(args: &ReferenceCli) -> Result<ExitCode> {
    let dir = &args.dir;
    let (man, completions) = (dir.join("man"), dir.join("completions"));
    for d in [dir, &man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let markdown = clap_markdown::help_markdown_command_custom(
        &Cli::command(),
        &clap_markdown::MarkdownOptions::new()
            .title("Command reference".into())
            .show_footer(false),
    );
    let reference = dir.join("reference.md");
    std::fs::write(&reference, markdown)
        .with_context(|| format!("cannot write {}", reference.display()))?;
    clap_mangen::generate_to(Cli::command(), &man).context("writing the man pages")?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "profiler", &completions)
            .with_context(|| format!("writing the {shell} completions"))?;
    }
    eprintln!(
        "reference: {}, man pages in {}, completions in {}",
        reference.display(),
        man.display(),
        completions.display()
    );
    Ok(ExitCode::SUCCESS)
}
