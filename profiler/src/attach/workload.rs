//! `attach -- COMMAND`: the workload, started once everything is attached and followed until
//! it exits. When attach ends first (a signal, --duration, an error), the workload gets the
//! same signal (SIGTERM for --duration) by its pid, then SIGKILL if it has not exited within a
//! grace period: attach leaves no process of its own behind.

use std::{os::unix::process::ExitStatusExt as _, process::ExitStatus, time::Duration};

use anyhow::{Context as _, Result};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::process::{Child, Command};

use crate::report::schema::CommandOutcome;

/// How long a workload has to exit after its signal before it is killed.
const GRACE: Duration = Duration::from_secs(5);

/// Why following stopped.
pub enum Ended {
    Duration,
    /// SIGINT or SIGTERM, by name.
    Signal(&'static str),
    Exited(ExitStatus),
    /// The one who started the attach asked it to stop (a host, of its guest's).
    Asked,
}

/// Starts `argv` (None when empty), with this process's namespace, stdio and environment.
pub fn spawn(argv: &[String]) -> Result<Option<Child>> {
    let Some((program, args)) = argv.split_first() else {
        return Ok(None);
    };
    let mut command = Command::new(program);
    command
        .args(args)
        // Dropped on an error path: killed rather than left running.
        .kill_on_drop(true);
    // The signals attach passes on end the workload as they would by default, even where
    // attach was started ignoring them (a background job of a script ignores SIGINT).
    // SAFETY: signal(2) is async-signal-safe, as pre_exec's closure must be.
    unsafe {
        command.pre_exec(|| {
            for s in [libc::SIGINT, libc::SIGTERM] {
                libc::signal(s, libc::SIG_DFL);
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    Ok(Some(child))
}

/// The workload's exit; pending forever when there is none, so a select branch never fires.
pub async fn wait(child: Option<&mut Child>) -> Result<ExitStatus> {
    match child {
        Some(c) => c.wait().await.context("waiting for the command"),
        None => std::future::pending().await,
    }
}

/// The workload's outcome: as it exited, or ended with the signal that ended attach.
pub async fn finish(mut child: Child, argv: &[String], ended: Ended) -> Result<CommandOutcome> {
    let status = match ended {
        Ended::Exited(status) => status,
        Ended::Signal(name) => stop(&mut child, signal_of(name)).await?,
        Ended::Duration | Ended::Asked => stop(&mut child, Signal::SIGTERM).await?,
    };
    Ok(CommandOutcome {
        argv: argv.to_vec(),
        exit_code: status.code(),
        signal: status.signal(),
    })
}

fn signal_of(name: &str) -> Signal {
    match name {
        "SIGINT" => Signal::SIGINT,
        _ => Signal::SIGTERM,
    }
}

/// Sends `signal` to the workload by pid, then SIGKILL after the grace period.
async fn stop(child: &mut Child, signal: Signal) -> Result<ExitStatus> {
    if let Some(pid) = child.id() {
        // It may have exited meanwhile: then there is nothing to signal.
        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), signal);
    }
    match tokio::time::timeout(GRACE, child.wait()).await {
        Ok(status) => status.context("waiting for the command"),
        Err(_) => {
            child.kill().await.context("killing the command")?;
            child.wait().await.context("waiting for the command")
        }
    }
}

/// The exit status attach passes on: the command's, or 128 + the signal that ended it.
pub fn exit_code(outcome: &CommandOutcome) -> u8 {
    match (outcome.exit_code, outcome.signal) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.saturating_add(sig as u8),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn a_workload_exits_with_its_status_or_is_stopped() {
        let a = argv(&["sh", "-c", "exit 7"]);
        let mut c = spawn(&a).expect("spawn").expect("a child");
        let status = wait(Some(&mut c)).await.expect("wait");
        let out = finish(c, &a, Ended::Exited(status)).await.expect("finish");
        assert_eq!((out.exit_code, exit_code(&out)), (Some(7), 7));

        let a = argv(&["sleep", "30"]);
        let c = spawn(&a).expect("spawn").expect("a child");
        let out = finish(c, &a, Ended::Signal("SIGINT"))
            .await
            .expect("finish");
        assert_eq!(out.signal, Some(libc::SIGINT));
        assert_eq!(exit_code(&out), 128 + libc::SIGINT as u8);

        assert!(spawn(&[]).expect("nothing to run").is_none());
        let e = spawn(&argv(&["/nonexistent/workload"])).expect_err("no such program");
        assert!(format!("{e:#}").contains("cannot run"), "{e:#}");
    }
}
