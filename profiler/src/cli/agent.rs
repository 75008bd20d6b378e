//! `profiler agent`: inside a VM on a nested path, the guest's side of a host run.

use std::process::ExitCode;

use anyhow::Result;

use crate::{kernel::doctor, run::agent};

#[derive(clap::Args)]
pub struct AgentCli {
    /// Listen on the virtio-serial port of this name (/dev/virtio-ports/NAME; QEMU:
    /// -device virtserialport,name=NAME,chardev=... with a socket chardev on the host).
    #[arg(long, value_name = "NAME", required_unless_present = "listen")]
    serial: Option<String>,
    /// Listen on this TCP address (too): what `profiler run --agent` connects to. Anyone who
    /// reaches it can attach programs for a run: bind a management address only.
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// This node's name in hops and namespaces ("vm1" makes "vm1:pod-b").
    #[arg(long, default_value = "vm1")]
    node: String,
}

pub async fn run(cli: AgentCli) -> Result<ExitCode> {
    doctor::require_privileges()?;
    let listen = agent::Listen {
        serial: cli.serial,
        tcp: cli.listen,
    };
    agent::serve(listen, &cli.node).await?;
    Ok(ExitCode::SUCCESS)
}
