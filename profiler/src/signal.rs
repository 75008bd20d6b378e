//! SIGINT and SIGTERM, for every command: work is dropped when one arrives (which detaches every
//! BPF link it holds) and the caller's cleanup still runs.

use anyhow::{bail, Context as _, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// The two signals that end a command cleanly.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn install() -> Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Waits for either signal and names it.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// The error `interruptible` returns when a signal came first.
pub fn is_interruption(e: &anyhow::Error) -> bool {
    e.to_string().starts_with(INTERRUPTED)
}

const INTERRUPTED: &str = "interrupted by";

/// Waits for SIGINT or SIGTERM (for commands that hold something until stopped).
pub async fn until_interrupted() -> Result<()> {
    Signals::install()?.recv().await;
    Ok(())
}

/// Runs `fut` unless SIGINT or SIGTERM arrives first; then it is dropped and an error says which.
pub async fn interruptible<T>(fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let mut signals = Signals::install()?;
    tokio::select! {
        r = fut => r,
        name = signals.recv() => bail!("{INTERRUPTED} {name}"),
    }
}
