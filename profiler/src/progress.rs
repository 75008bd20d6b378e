//! Progress of long work on stderr, for people: a bar with rate and ETA, or a spinner, where
//! stderr is a terminal and `--quiet` is off; nothing for logs and pipes.

use std::io::IsTerminal as _;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};

/// Progress of long work on stderr: a bar with rate and ETA where stderr is a terminal and
/// `quiet` is off, nothing otherwise (logs and pipes get no redrawn lines).
pub fn bar(total: u64, unit: &str, quiet: bool) -> ProgressBar {
    if !shown(quiet) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
        .with_finish(ProgressFinish::AndClear);
    let template = format!("{{bar:30}} {{pos}}/{{len}} {unit} ({{per_sec}}, ETA {{eta}}) {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

/// Progress is for people: on a terminal, unless --quiet.
fn shown(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

/// Work of unknown length on stderr: a spinner with a message, under the same rules.
pub fn spinner(quiet: bool) -> ProgressBar {
    if !shown(quiet) {
        return ProgressBar::hidden();
    }
    ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        .with_finish(ProgressFinish::AndClear)
}
