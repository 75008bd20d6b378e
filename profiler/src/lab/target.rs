//! What a run profiles: a lab, or the path between two namespaces the profiler did not build.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use anyhow::{bail, Result};

use crate::{cluster::tls::Identity, pods};

use super::{
    discover::{self, ROOT},
    names::{node_of, PodName, HOST_NODE},
    nested::{self, Guest},
    netns,
    service::Service,
    Endpoint, Lab, LabIface, Pod,
};

/// The devices hops are named after.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Devices {
    pub name: String,
    /// Every namespace whose devices may carry the path (hops are named from these).
    pub namespaces: Vec<String>,
    pub interfaces: Vec<LabIface>,
    /// The namespaces that are pods of a container runtime (attach --pod), by netns name.
    pub pods: Vec<PodName>,
}

impl Devices {
    /// The pod whose namespace `netns` is.
    pub fn pod_in(&self, netns: &str) -> Option<&PodName> {
        self.pods.iter().find(|p| p.netns == netns)
    }

    /// The pod a device belongs to: its namespace's, or for a host-side veth, its peer's.
    pub fn pod_of(&self, iface: &LabIface) -> Option<&PodName> {
        self.pod_in(&iface.netns)
            .or_else(|| iface.peer.as_ref().and_then(|p| self.pod_in(&p.netns)))
    }
}

/// The path a run profiles: the devices its hops are named after, its two ends, and where the
/// tc programs attach.
pub struct RunTarget {
    pub devices: Devices,
    pub client: Endpoint,
    pub server: Endpoint,
    /// The devices the tc programs attach to.
    pub attach: Vec<TcPoint>,
    /// Every pod, client and server first (all-to-all's processes run in them).
    pub pods: Vec<Pod>,
    /// Nested paths: the guests whose agents attach inside them and run the server.
    pub guests: Vec<GuestEnd>,
    /// The Service in front of the server: the client sends to its ClusterIP and port.
    pub service: Option<Service>,
}

/// A guest on the path, as a run needs it: its node name, its namespaces (with their inodes
/// in its kernel: its events carry those), and where its agent listens.
#[derive(Clone)]
pub struct GuestEnd {
    pub name: String,
    pub namespaces: Vec<(String, u32)>,
    pub agent: AgentAt,
}

#[derive(Clone)]
pub enum AgentAt {
    /// A lab's guest: QEMU's Unix socket for its virtio-serial port.
    Socket(PathBuf),
    /// A VM the profiler did not make (`profiler run --agent`), under TLS as this identity
    /// (None: in the clear).
    Tcp(SocketAddr, Option<Identity>),
}

impl fmt::Display for AgentAt {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            AgentAt::Socket(p) => write!(f, "{}", p.display()),
            AgentAt::Tcp(a, _) => write!(f, "{a}"),
        }
    }
}

impl From<&Guest> for GuestEnd {
    fn from(g: &Guest) -> GuestEnd {
        GuestEnd {
            name: g.name.clone(),
            namespaces: g.namespaces.clone(),
            agent: AgentAt::Socket(g.socket.clone()),
        }
    }
}

/// A device the tc programs attach to, at egress and, unless `ingress` is false, at ingress.
pub struct TcPoint {
    pub netns: String,
    pub ifname: String,
    pub ingress: bool,
}

impl RunTarget {
    pub fn lab(lab: &Lab) -> RunTarget {
        RunTarget {
            devices: Devices {
                pods: Vec::new(),
                name: lab.name.clone(),
                namespaces: lab.namespaces.clone(),
                interfaces: lab.interfaces.clone(),
            },
            client: lab.client.clone(),
            server: lab.server.clone(),
            pods: lab.pods.clone(),
            guests: lab.guests.iter().map(GuestEnd::from).collect(),
            service: lab.service.clone(),
            // A userspace datapath's port: its packet socket copies the frame before tc
            // ingress, so a tc:ingress hop there would run alongside the datapath (and the
            // copy may reach the other port first), not before it.
            // A guest's devices are attached to by its agent.
            attach: lab
                .interfaces
                .iter()
                .filter(|i| node_of(&i.netns) == HOST_NODE)
                .map(|i| TcPoint {
                    netns: i.netns.clone(),
                    ifname: i.ifname.clone(),
                    ingress: i.userspace.is_none(),
                })
                .collect(),
        }
    }

    /// The path from namespace `from` to `addr` in namespace `to`, from netlink state: the
    /// devices of every namespace name its hops; tc attaches in the two end namespaces, on their
    /// veth peers, and on the other ports of those peers' bridges. With `agent`, `to` is a
    /// namespace of a VM ("vm1:pod-b", "vm1:(root)") whose agent listens there: its devices
    /// come from the agent, which attaches inside the VM for the run; tc attaches on this
    /// machine's taps too. `guest`: that VM, as its agent described it.
    pub async fn path(
        from: &str,
        to: &str,
        addr: Ipv4Addr,
        guest: Option<(GuestEnd, nested::Inventory)>,
    ) -> Result<RunTarget> {
        let ends: &[&str] = if guest.is_some() {
            &[from]
        } else {
            &[from, to]
        };
        for &ns in ends {
            if ns != ROOT && !netns::mounted(ns) {
                return Err(crate::error::bad_input(format!(
                    "unknown network namespace {ns}"
                )));
            }
        }
        let mut namespaces = discover::namespaces()?;
        let mut interfaces = discover::interfaces(&namespaces).await?;
        let mut points = attach_points(&interfaces, ends);
        if let Some((g, inv)) = &guest {
            // The taps a VM's NIC may be on: tc there sees the packet leave toward the VM.
            points.extend(
                interfaces
                    .iter()
                    .filter(|i| i.kind == "tun")
                    .map(|i| (i.netns.clone(), i.ifname.clone())),
            );
            points.sort();
            points.dedup();
            interfaces.extend(
                inv.interfaces
                    .iter()
                    .cloned()
                    .map(|i| nested::rename(&g.name, i)),
            );
            namespaces.extend(
                inv.namespaces
                    .iter()
                    .map(|(n, _)| nested::guest_ns(&g.name, n)),
            );
        }
        let Some(server_if) = interfaces.iter().find(|i| {
            i.netns == to
                && i.addrs
                    .iter()
                    .any(|a| a.split('/').next() == Some(&addr.to_string()))
        }) else {
            bail!("{addr} is not an address of network namespace {to}");
        };
        let server = Endpoint {
            netns: to.to_string(),
            ifname: server_if.ifname.clone(),
            addr,
        };
        let client = Endpoint {
            netns: from.to_string(),
            ifname: String::new(),
            addr: Ipv4Addr::UNSPECIFIED,
        };
        let attach = points
            .into_iter()
            .map(|(netns, ifname)| TcPoint {
                netns,
                ifname,
                ingress: true,
            })
            .collect();
        Ok(RunTarget {
            devices: Devices {
                pods: Vec::new(),
                name: format!("{from} -> {to}"),
                namespaces,
                interfaces,
            },
            client,
            server,
            attach,
            pods: Vec::new(),
            guests: guest.into_iter().map(|(g, _)| g).collect(),
            service: None,
        })
    }
}

/// `run --from POD --to POD`: the path between two pods of the node's container runtime,
/// its hops named after the pods; the server listens on `to`'s address.
pub async fn between_pods(from: &str, to: &str, sources: &pods::Sources) -> Result<RunTarget> {
    let listing = sources.list().await?;
    for notice in &listing.notices {
        eprintln!("run: {notice}");
    }
    let mut namespaces = discover::namespaces()?;
    let named = discover::pod_names(&listing.pods, &mut namespaces);
    let end = |arg: &str| -> Result<(&PodName, Option<Ipv4Addr>)> {
        let pattern: pods::Pattern = arg.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        let found = pods::select(
            &listing.pods,
            std::slice::from_ref(&pattern),
            &listing.source,
        )?;
        let [pod] = found[..] else {
            bail!("{arg} names {} pods: give NAMESPACE/NAME", found.len());
        };
        let Some((name, _)) = named.iter().find(|(n, _)| n.qualified == pod.qualified()) else {
            bail!("pod {arg}: its network namespace {} is gone", pod.netns);
        };
        Ok((name, pod.ip))
    };
    let (client, _) = end(from)?;
    let (server, ip) = end(to)?;
    let Some(addr) = ip else {
        bail!("pod {to}: {} does not say its address", listing.source);
    };
    let mut target = RunTarget::path(&client.netns, &server.netns, addr, None).await?;
    target.devices.name = format!("{} -> {}", client.qualified, server.qualified);
    target.devices.pods = named.into_iter().map(|(n, _)| n).collect();
    Ok(target)
}

fn attach_points(ifaces: &[LabIface], ends: &[&str]) -> Vec<(String, String)> {
    let at_ends: Vec<&LabIface> = ifaces
        .iter()
        .filter(|i| ends.contains(&i.netns.as_str()))
        .collect();
    let peers: Vec<&LabIface> = at_ends
        .iter()
        .filter_map(|i| i.peer.as_ref())
        .filter_map(|p| {
            ifaces
                .iter()
                .find(|j| j.netns == p.netns && j.ifname == p.ifname)
        })
        .collect();
    let bridge_ports = ifaces.iter().filter(|j| {
        peers
            .iter()
            .any(|p| p.master.is_some() && p.master == j.master && p.netns == j.netns)
    });
    let mut points: Vec<(String, String)> = at_ends
        .into_iter()
        .chain(peers.iter().copied())
        .chain(bridge_ports)
        .map(|i| (i.netns.clone(), i.ifname.clone()))
        .collect();
    points.sort();
    points.dedup();
    points
}
