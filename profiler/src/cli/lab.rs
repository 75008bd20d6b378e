//! `profiler lab`: the built-in topologies up, down, listed, and a node lab's pods.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::{
    kernel::{doctor, tc},
    lab::{self, LabOptions, Lock, Placement, Topology},
    signal::interruptible,
};

#[derive(Subcommand)]
pub enum LabCommand {
    /// Create a lab topology.
    Up {
        topology: Topology,
        #[command(flatten)]
        options: LabOpts,
        /// A forwarder to run in place of dpdk-testpmd (dpdk lab): started as `PATH PORT_A
        /// PORT_B` in the host namespace, it prints `Press enter to exit` once it forwards.
        #[arg(long, value_name = "PATH")]
        forwarder: Option<PathBuf>,
    },
    /// Remove a lab and everything it created; with --all, every lab and every leftover the
    /// profiler recognises as its own (after a crash or a SIGKILL).
    Down {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// The labs that are up, with their namespaces, interfaces and addresses.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Run COMMAND in a namespace of a nested lab's guest (NODE:NETNS: vm1:pod-b, vm1:(root))
    /// through its agent, as traffic the profiler did not generate; its output and exit status
    /// come back.
    Exec {
        lab: String,
        #[arg(value_name = "NODE:NETNS")]
        target: String,
        /// How long the command may run before the agent kills it.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Add or remove a pod of a node lab that is up (through CRI, as kubelet does).
    Pod {
        #[command(subcommand)]
        command: PodCommand,
    },
}

#[derive(Subcommand)]
pub enum PodCommand {
    /// Create pod NAME (sandbox and echo container); prints its netns and IP.
    Add {
        /// The node lab ("node").
        lab: String,
        name: String,
        /// Its Kubernetes namespace.
        #[arg(long, default_value = lab::node::POD_NAMESPACE)]
        namespace: String,
    },
    /// Stop and remove pod NAME.
    Rm {
        lab: String,
        name: String,
        #[arg(long, default_value = lab::node::POD_NAMESPACE)]
        namespace: String,
    },
}

#[derive(Args, Clone)]
pub struct LabOpts {
    /// Both pods on one host, or on two hosts joined by a wire (default: same-host where the
    /// topology has it).
    #[arg(long, value_enum)]
    pub placement: Option<Placement>,
    /// MTU of the pods' interfaces (and the overlay device); default: the topology's.
    #[arg(long, value_parser = clap::value_parser!(u32).range(576..=9000))]
    mtu: Option<u32>,
    /// Pods per host, 2 to 13; node: 2 to 250 (default: the topology's two pods, one per host
    /// cross-host; run --traffic alltoall: 8).
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=lab::NODE_MAX_PODS as i64))]
    pub pods: Option<u32>,
    /// Nested labs (bmp2vmp, vmp2vmp): the container network inside the VMs (default bridge).
    #[arg(long, value_enum)]
    inner: Option<lab::nested::Inner>,
    /// Nested labs: the network the VM's NIC sits on, on the host (default bridge).
    #[arg(long, value_enum)]
    outer: Option<lab::nested::Outer>,
    /// Nested labs: how the guests' NICs are served on the host: QEMU on a tap (default), or
    /// vhost-user ports of dpdk-testpmd (same-host).
    #[arg(long, value_enum)]
    nic: Option<lab::nested::Nic>,
    /// Nested labs: the guest's kernel, 6.1, 6.12 (provisioned by `cargo xtask vm --kernel
    /// SERIES`) or the path of a kernel image (default: the newest provisioned).
    #[arg(long, value_name = "6.1|6.12|PATH")]
    guest_kernel: Option<String>,
    /// The node lab: the CNI plugin that wires its pods (default bridge).
    #[arg(long, value_enum)]
    cni: Option<lab::node::Cni>,
    /// A Kubernetes Service in front of the server pod: clients send to its ClusterIP
    /// (198.18.250.10:8080), translated to the pod by kube-proxy's iptables or nftables rules
    /// on every host (bridge, flannel-vxlan), or by the eBPF datapath's program (ebpf-redirect).
    #[arg(long, value_enum)]
    pub service: Option<lab::service::Mode>,
    /// A second network, as Multus and Kuryr's Multi-VIF give pods: each pod's net1, a TYPE
    /// child of its host's wire0, in 198.18.200.0/24 (`run --iface net1` profiles it).
    #[arg(long, value_enum, value_name = "TYPE")]
    pub net2: Option<lab::Net2>,
}

impl LabOpts {
    pub fn options(&self, topology: Topology) -> LabOptions {
        LabOptions {
            placement: self
                .placement
                .unwrap_or_else(|| topology.default_placement()),
            mtu: self.mtu,
            forwarder: None,
            pods: self.pods,
            inner: self.inner,
            outer: self.outer,
            nic: self.nic,
            guest_kernel: self.guest_kernel.clone(),
            cni: self.cni,
            service: self.service,
            net2: self.net2,
        }
    }
}

pub async fn run(command: LabCommand) -> Result<ExitCode> {
    doctor::require_privileges()?;
    match command {
        LabCommand::Up {
            topology,
            options,
            forwarder,
        } => {
            let options = LabOptions {
                forwarder,
                ..options.options(topology)
            };
            lab::check(topology, &options)?;
            let _lock = Lock::acquire(&lab::lab_name(topology, options.placement))?;
            let lab = interruptible(lab::up(topology, &options)).await?;
            println!(
                "lab {} is up: namespaces {}",
                lab.name,
                lab.namespaces.join(", ")
            );
            if let Some(svc) = &lab.service {
                println!("{svc}");
            }
        }
        LabCommand::Down { all: true, .. } => return down_all().await,
        LabCommand::Down { name, .. } => {
            let name = name.unwrap_or_default();
            let _lock = Lock::acquire(&name)?;
            lab::down(&name).await?;
            println!("lab {name} is down");
        }
        LabCommand::Pod { command } => pod(command).await?,
        LabCommand::Exec {
            lab,
            target,
            timeout,
            command,
        } => return exec(&lab, &target, timeout, command).await,
        LabCommand::List { json } => {
            let labs = lab::list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&labs)?);
            } else {
                print_labs(&labs);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `lab exec`: the command's output on ours, its exit status as ours.
async fn exec(
    lab: &str,
    target: &str,
    timeout: std::time::Duration,
    argv: Vec<String>,
) -> Result<ExitCode> {
    let Some((node, netns)) = target
        .split_once(lab::names::NODE_SEP)
        .filter(|(n, ns)| !n.is_empty() && !ns.is_empty())
    else {
        return Err(crate::error::bad_input(
            "lab exec takes a guest's namespace as NODE:NETNS (vm1:pod-b, vm1:(root))",
        ));
    };
    let request = lab::nested::ExecRequest {
        netns: netns.to_string(),
        argv,
        timeout_s: timeout.as_secs().max(1),
    };
    match interruptible(lab::nested::exec(lab, node, &request)).await? {
        lab::nested::ExecAnswer::Ran {
            status,
            stdout,
            stderr,
        } => {
            print!("{stdout}");
            eprint!("{stderr}");
            Ok(ExitCode::from(status.clamp(0, 255) as u8))
        }
        lab::nested::ExecAnswer::Failed(e) => anyhow::bail!("{node}: {e}"),
    }
}

async fn pod(command: PodCommand) -> Result<()> {
    let (PodCommand::Add { lab, .. } | PodCommand::Rm { lab, .. }) = &command;
    let node = lab::lab_name(Topology::Node, Placement::SameHost);
    if *lab != node {
        return Err(crate::error::bad_input(format!(
            "lab {lab:?}: pods are added to and removed from the node lab ({node})"
        )));
    }
    match command {
        PodCommand::Add {
            lab,
            name,
            namespace,
        } => {
            let _lock = Lock::acquire(&lab)?;
            let pod = interruptible(lab::node::pod_add(&lab, &name, &namespace)).await?;
            println!("pod {namespace}/{name}: netns {} ip {}", pod.netns, pod.ip);
        }
        PodCommand::Rm {
            lab,
            name,
            namespace,
        } => {
            let _lock = Lock::acquire(&lab)?;
            let pod = lab::node::pod_rm(&lab, &name, &namespace).await?;
            println!("pod {namespace}/{name} removed (netns {})", pod.netns);
        }
    }
    Ok(())
}

/// `lab down --all`: says what it removed, what it left because a live command uses it, and
/// fails if anything could not be removed.
async fn down_all() -> Result<ExitCode> {
    // tc filters first: they may be on devices of namespaces that go next.
    let (tc_removed, tc_failed) = tc::recover()?;
    let mut r = lab::recover::down_all().await?;
    r.removed.splice(0..0, tc_removed);
    r.failed.splice(0..0, tc_failed);
    for line in &r.removed {
        println!("removed {line}");
    }
    for line in &r.in_use {
        println!("left {line}");
    }
    for line in &r.failed {
        eprintln!("error: could not remove {line}");
    }
    if r.removed.is_empty() && r.in_use.is_empty() && r.failed.is_empty() {
        println!("nothing of the profiler's was left");
    }
    Ok(if r.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_labs(labs: &[lab::Lab]) {
    if labs.is_empty() {
        println!("no lab is up");
    }
    for lab in labs {
        println!(
            "{} ({}, {:?}){}",
            lab.name,
            lab.topology.name(),
            lab.placement,
            owner_note(lab.owner.as_ref())
        );
        if let Some(svc) = &lab.service {
            println!("  {svc}");
        }
        for g in &lab.guests {
            println!(
                "  guest {}: QEMU (process group {}), kernel {}, NIC {} ({}), agent {} and TCP port {}",
                g.name,
                g.pid,
                g.kernel,
                g.tap,
                g.nic.name(),
                g.socket.display(),
                lab::nested::AGENT_TCP_PORT
            );
        }
        if let Some(node) = &lab.node {
            println!(
                "  containerd pid {}, CRI socket {}, CNI {:?}",
                node.containerd,
                node.socket.display(),
                node.cni
            );
            for p in &node.pods {
                println!(
                    "  pod {}/{}: netns {} ip {} sandbox {}",
                    p.namespace, p.name, p.netns, p.ip, p.sandbox
                );
            }
        }
        for i in &lab.interfaces {
            let mut extra = format!(" mtu {}", i.mtu);
            if let Some(m) = &i.master {
                extra += &format!(" master {m}");
            }
            if let Some(l) = &i.link {
                extra += &format!(" link {l}");
            }
            println!(
                "  {:<22} {:<8} {:<7} ifindex {:<4} {}{}",
                i.netns,
                i.ifname,
                i.kind,
                i.ifindex,
                i.addrs.join(" "),
                extra
            );
        }
    }
}

/// Who made a lab, and whether it was left behind.
fn owner_note(owner: Option<&lab::Owner>) -> String {
    match owner {
        None => String::new(),
        Some(o) if o.alive() => format!(": in use by profiler {} (pid {})", o.command, o.pid),
        Some(o) => format!(
            ": LEFT BEHIND by profiler {} (pid {}, gone); the next run on it or `profiler lab down --all` removes it",
            o.command, o.pid
        ),
    }
}
