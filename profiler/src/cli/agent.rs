//! `profiler agent`: inside a VM on a nested path (or on another node), the far side of a host
//! run; and the cluster's certificates for its TCP side.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;

use crate::{
    cluster::tls::{self, Identity},
    kernel::doctor,
    run::agent::{self, Security},
};

#[derive(clap::Args)]
pub struct AgentCli {
    /// Listen on the virtio-serial port of this name (/dev/virtio-ports/NAME; QEMU:
    /// -device virtserialport,name=NAME,chardev=... with a socket chardev on the host).
    #[arg(long, value_name = "NAME", required_unless_present_any = ["listen", "init_certs"])]
    serial: Option<String>,
    /// Listen on this TCP address (too): what `profiler run --agent` connects to, under mutual
    /// TLS (--tls or --tls-from-host) unless --insecure.
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// The cluster's certificates: DIR/ca.pem, DIR/NODE.pem, DIR/NODE.key (NODE: --node).
    /// Hosts without a certificate of that CA are refused.
    #[arg(long, value_name = "DIR", requires = "listen")]
    tls: Option<PathBuf>,
    /// As --tls, with the identity the lab hands over on the serial port (a lab's guests);
    /// hosts are refused until then.
    #[arg(long, requires_all = ["listen", "serial"], conflicts_with = "tls")]
    tls_from_host: bool,
    /// Serve anyone who reaches --listen, in the clear: only on a private network.
    #[arg(long, requires = "listen", conflicts_with_all = ["tls", "tls_from_host"])]
    insecure: bool,
    /// This node's name in hops and namespaces ("vm1" makes "vm1:pod-b"), and in its
    /// certificate.
    #[arg(long, default_value = "vm1")]
    node: String,
    /// Make a cluster CA and a certificate and key per node of --names in DIR, then exit: copy
    /// ca.pem and NODE.pem/NODE.key to each node (ca.key stays here).
    #[arg(long, value_name = "DIR", requires = "names", conflicts_with_all = ["serial", "listen"])]
    init_certs: Option<PathBuf>,
    /// The nodes to certify: "host" (where `profiler run` runs) and each agent's --node.
    #[arg(long, value_name = "NODE,...", value_delimiter = ',')]
    names: Vec<String>,
}

pub async fn run(cli: AgentCli) -> Result<ExitCode> {
    if let Some(dir) = &cli.init_certs {
        for path in tls::init_dir(dir, &cli.names)? {
            println!("{}", path.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    // What every request needs; a tagged run's (tc programs, devices) is asked for by its own.
    doctor::require(doctor::ATTACH_CAPS)?;
    let tcp = match cli.listen {
        Some(addr) => Some((addr, security(&cli)?)),
        None => None,
    };
    let listen = agent::Listen {
        serial: cli.serial,
        tcp,
    };
    agent::serve(listen, &cli.node).await?;
    Ok(ExitCode::SUCCESS)
}

fn security(cli: &AgentCli) -> Result<Security> {
    Ok(match &cli.tls {
        Some(dir) => Security::Tls(Identity::load(dir, &cli.node)?),
        None if cli.tls_from_host => Security::TlsFromHost,
        None if cli.insecure => Security::Insecure,
        None => {
            return Err(crate::error::bad_input(format!(
                "--listen needs --tls DIR (the cluster's certificates: `profiler agent \
                 --init-certs DIR --names host,{}`) or --insecure",
                cli.node
            )))
        }
    })
}
