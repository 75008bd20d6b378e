//! Nested labs: pods inside QEMU guests (the study's BMP2VMP and VMP2VMP). The host side is network
//! namespaces as in every lab: `host` holds the outer network (bridge br0, 198.19.0.1/24) with
//! the guest's NIC, a tap device whose other end is QEMU's virtio-net, and this machine's own
//! pod network (cni0 198.18.0.1/24 with pod-a). The guest is one of the VM lab's Debian kernels
//! booted by virtme-ng under TCG, with this machine's root (so its profiler binary) shared
//! read-only; its script builds the guest's pod network (cni0 198.18.1.1/24 with pod-b, its NIC
//! eth0 198.19.0.2/24) and starts `profiler agent`, which talks to the host over a virtio-serial
//! port (QEMU's end is a Unix socket in the lab's directory).
//!
//! The two pod networks are joined as the inner network says: `bridge` routes each pod subnet
//! via the other node's outer address (flannel host-gw), `flannel-vxlan` through a flannel.1
//! VXLAN device on each node over the outer network.
//!
//! VMP2VMP has no pod on the host: guests vm1 (pod-a, 198.18.1.0/24, outer 198.19.0.2) and vm2
//! (pod-b, 198.18.2.0/24, outer 198.19.0.3). Same-host both taps are ports of `host`'s br0;
//! cross-host vm1's tap is a port of br0 in `host-a` and vm2's of br0 in `host-b`, the two
//! bridges joined by a veth `wire0` (one L2 outer network across two host namespaces).
//!
//! QEMU runs in a process group of its own (vng, virtme-run, qemu), recorded by its leader's pid
//! and start time in RUN_DIR/LAB-GUEST, so that `lab down`, a run's end, Ctrl-C during `lab up`
//! and `lab down --all` after a crash all stop it.
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;

use crate::cluster::{
    channel::{self, Reader, Writer, MAX_ANSWER},
    tls::{self, Identity},
};

use super::{
    discover, dpdk,
    names::{HOST_NODE, NODE_SEP},
    netns, owner,
    spec::netns_name,
    vm_cache as vm, Endpoint, Lab, LabIface, LabOptions, Placement, Pod, Topology,
};

/// Each guest's files (pid record, QEMU's socket for the agent, console log): RUN_DIR/LAB-GUEST.
pub const RUN_DIR: &str = "/run/profiler/vm";
/// QEMU's -name (and the guest's hostname) is QEMU_NAME_PREFIX + "LAB-GUEST": the leak check
/// looks for it.
pub const QEMU_NAME_PREFIX: &str = "profiler-";
/// The virtio-serial port the agent listens on: /dev/virtio-ports/NAME in the guest.
pub const AGENT_PORT: &str = "profiler";
/// The lab's request on the agent's channel, as JSON: `{"setup": SetupRequest}`; the agent
/// runs its commands and answers with a [`SetupAnswer`].
pub const SETUP: &str = "setup";
/// In each guest's directory: the host's identity in the lab's cluster, for `profiler run
/// --agent ADDR --tls RUN_DIR/LAB-GUEST/tls`.
pub const TLS_DIR: &str = "tls";
/// The TCP port lab guests' agents listen on beside their serial port (so that `profiler run
/// --agent` can be tried on a lab).
pub const AGENT_TCP_PORT: u16 = 7450;
/// Every guest a nested lab may run (bmp2vmp: vm1; vmp2vmp: both).
const GUESTS: [&str; 2] = ["vm1", "vm2"];
const GUEST_MEMORY: &str = "1G";
/// One vCPU: under TCG each vCPU's clock drifts from the others' (enough to reorder a packet's
/// guest hops and to make an exchange's crossing sum negative), and the host's two cores are
/// shared anyway.
const GUEST_CPUS: &str = "1";
/// Booting under TCG on a busy machine, then loading nothing yet: a minute or two.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const OUTER_HOST: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// Cross-host, the second host namespace's bridge.
const OUTER_HOST_B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 254);
/// `--outer vxlan`: the hosts' addresses on wire0, under their VXLAN.
const WIRE: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 19, 1, 1), Ipv4Addr::new(198, 19, 1, 2)];
/// Pod subnets: 198.18.0.0/24 on the host, 198.18.N.0/24 in guest vmN; the node's bridge is
/// .1, its pod .2.
const POD_NET_HOST: u8 = 0;
const FLANNEL_MTU: u32 = 1450;
/// `--inner vlan`: the pods' VLAN, and the third byte of their subnet.
const VLAN_ID: u16 = 100;
const VXLAN_PORT: u16 = 8472;

/// The container network inside the VM (and on the bare-metal node).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[clap(rename_all = "kebab-case")]
pub enum Inner {
    /// cni0 per node, pod subnets routed via the nodes' outer addresses (flannel host-gw).
    #[default]
    Bridge,
    /// cni0 per node, joined by flannel.1 (VXLAN) over the outer network.
    FlannelVxlan,
    /// Each pod's eth0 is a VLAN (id 100) child of its guest's NIC, the pods on one subnet
    /// 198.18.100.0/24 (vmp2vmp: the bare-metal node would need 8021q).
    Vlan,
}

/// The network the VM's NIC sits on, on the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[clap(rename_all = "kebab-case")]
pub enum Outer {
    /// The tap is a port of the host's bridge br0, which has the host's outer address
    /// (cross-host, the two hosts' bridges are joined by the veth wire0).
    #[default]
    Bridge,
    /// Cross-host: the two hosts' bridges are joined by a VXLAN device vxlan0 (VNI 2, port
    /// 4789) over the routed wire0, so the guests' frames are encapsulated again on the host.
    Vxlan,
    /// A VLAN on the hosts' bridges: not built, this machine's kernel has no 8021q and no
    /// bridge VLAN filtering to check it on (the guests' has: --inner vlan).
    Vlan,
}

/// How the guest's virtio-net NIC is served on the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[clap(rename_all = "kebab-case")]
pub enum Nic {
    /// QEMU's own virtio-net backend on a tap device tap-vmN, a port of the host's br0.
    #[default]
    Tap,
    /// A vhost-user port of dpdk-testpmd, which runs in the host namespace (as OVS-DPDK and
    /// VPP serve their VMs): the guest's rings are in memory it shares with testpmd, which
    /// forwards between them and a packet socket on vhu-vmN, a veth whose peer br-vmN is the
    /// port of br0. The NIC offers no checksum offload. Same host only.
    VhostUser,
}

impl Nic {
    pub fn name(self) -> &'static str {
        match self {
            Nic::Tap => "tap",
            Nic::VhostUser => "vhost-user",
        }
    }

    /// The NIC's host end of guest vmN: QEMU's tap, or the veth testpmd's packet socket is on.
    fn host_end(self, n: u8) -> String {
        match self {
            Nic::Tap => format!("tap-vm{n}"),
            Nic::VhostUser => format!("vhu-vm{n}"),
        }
    }
}

/// The name of testpmd's host namespace role and directory for a vhost-user lab.
const SWITCH_ROLE: &str = "host";

/// A guest a lab runs, as its state records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guest {
    /// Its node name in hops and namespaces ("vm1:pod-b").
    pub name: String,
    /// The leader of its process group (vng, then virtme-run and qemu).
    pub pid: u32,
    /// Clock ticks since boot, as for a lab's owner.
    pub start_time: u64,
    /// Its kernel release.
    pub kernel: String,
    /// Its NIC's host end, in the lab's host namespace: QEMU's tap, or (vhost-user) the veth
    /// testpmd's packet socket is on.
    pub tap: String,
    #[serde(default)]
    pub nic: Nic,
    /// The host end of the agent's channel (QEMU's Unix socket).
    pub socket: PathBuf,
    pub inner: Inner,
    pub outer: Outer,
    /// Its namespaces as it names them ("(root)", "pod-b"), with their inodes in its kernel:
    /// its events carry those.
    #[serde(default)]
    pub namespaces: Vec<(String, u32)>,
}

impl Guest {
    fn alive(&self) -> bool {
        owner::start_time(self.pid) == Some(self.start_time)
    }
}

/// What the agent reports of its guest: its kernel and devices.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Inventory {
    pub release: String,
    /// Named namespaces and the root ("(root)"), with their inodes.
    pub namespaces: Vec<(String, u32)>,
    pub interfaces: Vec<LabIface>,
}

/// A guest's namespace as the host names it: "vm1:pod-b", "vm1:(root)".
pub fn guest_ns(node: &str, ns: &str) -> String {
    format!("{node}{NODE_SEP}{ns}")
}

/// The guest's own name of a namespace the host names `ns`, if it is the guest's.
pub fn in_guest<'a>(node: &str, ns: &'a str) -> Option<&'a str> {
    ns.strip_prefix(node)?.strip_prefix(NODE_SEP)
}

pub(super) fn dir(lab: &str, guest: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{lab}-{guest}"))
}

/// Every host namespace a nested lab may have, by role.
const ROLES: [&str; 4] = ["host", "pod-a", "host-a", "host-b"];

/// Fails in one line when the options do not fit a nested lab.
pub(super) fn check(topology: Topology, options: &LabOptions) -> Result<()> {
    if topology == Topology::Bmp2vmp && options.placement != Placement::SameHost {
        let why = "bmp2vmp: the bare-metal pod is on the VM's host: --placement same-host only";
        return Err(super::CannotBuild::Placement(why.into()).into());
    }
    if topology == Topology::Bmp2vmp && options.inner == Some(Inner::Vlan) {
        bail!("bmp2vmp: --inner vlan needs 8021q on the bare-metal node, which this machine's kernel has not (vmp2vmp has it in both guests)");
    }
    match options.outer.unwrap_or_default() {
        Outer::Bridge => {}
        Outer::Vxlan if topology == Topology::Vmp2vmp && options.placement == Placement::CrossHost => {}
        Outer::Vxlan => bail!("--outer vxlan joins two host namespaces: vmp2vmp --placement cross-host only"),
        Outer::Vlan => bail!("--outer vlan is not built: this machine's kernel has no 8021q and no bridge VLAN filtering to build and check it on"),
    }
    if options.pods.is_some() || options.forwarder.is_some() {
        bail!("{}: --pods and --forwarder do not apply", topology.name());
    }
    if options.nic == Some(Nic::VhostUser) {
        if options.placement == Placement::CrossHost {
            bail!("--nic vhost-user: same-host only (cross-host would run a testpmd per host namespace, each busy-polling one of this machine's two cores)");
        }
        super::dpdk::check()?;
    }
    vm::kernel(options.guest_kernel.as_deref())?;
    Ok(())
}

/// Whether any part of nested lab `name` exists.
pub(super) fn leftovers(name: &str) -> bool {
    ROLES.iter().any(|r| netns::exists(&netns_name(name, r)))
        || GUESTS.iter().any(|g| dir(name, g).exists())
        || dpdk::dir(name, SWITCH_ROLE).exists()
}

/// Removes what a build made so far unless disarmed: the guest first (QEMU holds the tap).
struct Undo {
    name: Option<String>,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            if let Err(e) = remove(&name) {
                log::warn!("{e:#}");
            }
        }
    }
}

/// Stops the guests and removes the namespaces and directories of nested lab `name`.
pub(super) fn remove(name: &str) -> Result<()> {
    let mut result = Ok(());
    for g in GUESTS {
        result = result.and(stop(&dir(name, g)));
    }
    result = result.and(dpdk::stop(&dpdk::dir(name, SWITCH_ROLE)));
    for role in ROLES {
        result = result.and(netns::delete(&netns_name(name, role)));
    }
    result
}

pub(super) async fn build(name: &str, topology: Topology, options: &LabOptions) -> Result<Lab> {
    let (release, vmlinuz) = vm::kernel(options.guest_kernel.as_deref())?;
    let vng = vm::vng()?;
    let inner = options.inner.unwrap_or_default();
    let outer = options.outer.unwrap_or_default();
    let nic = options.nic.unwrap_or_default();
    let mtu = options.mtu;
    let mut undo = Undo {
        name: Some(name.to_string()),
    };
    let layout = Layout::of(name, topology, options.placement, outer, nic);
    for ns in layout.namespaces() {
        netns::add(&ns)?;
    }
    for cmd in host_commands(&layout, inner, mtu) {
        ip(&cmd)?;
    }
    for (ns, _) in &layout.hosts {
        super::setup::enable_forwarding(ns)?;
    }
    let forwarder = match nic {
        Nic::VhostUser => Some(start_switch(name, &layout)?),
        Nic::Tap => None,
    };
    let exe = std::env::current_exe()?;
    // All guests boot at once; each agent is then asked in turn.
    let mut started = Vec::new();
    for g in &layout.guests {
        let script = guest_script(&exe, &g.node.name, &g.mac);
        let guest = start(name, g, nic, &vng, &vmlinuz, &release, &script)?;
        started.push(Guest {
            inner,
            outer,
            ..guest
        });
    }
    let mut identities = lab_identities(&layout)?.into_iter();
    let host = identities.next().context("no host identity")?;
    let mut parts = Vec::new();
    for ((guest, g), tls) in started.into_iter().zip(&layout.guests).zip(identities) {
        // What `profiler run --agent ADDR --tls DIR` takes: the host's side of the lab's CA.
        host.save(&dir(name, &g.node.name).join(TLS_DIR))?;
        let request = SetupRequest {
            commands: setup_commands(&g.node, layout.peer(&g.node), inner, mtu),
            tls: Some(tls),
        };
        let inventory = setup(&guest, request).await?;
        parts.push((guest, inventory));
    }
    let mut lab = assemble(name, topology, options.placement, &layout, inner, parts).await?;
    if let Some(f) = forwarder {
        // Its segments are named after the program, as on the dpdk lab.
        let (ns, ports) = (netns_name(name, SWITCH_ROLE), &layout.guests);
        for i in (lab.interfaces.iter_mut())
            .filter(|i| i.netns == ns && ports.iter().any(|g| g.tap == i.ifname))
        {
            i.userspace = Some(f.name());
        }
        lab.forwarder = Some(f);
    }
    undo.name = None;
    Ok(lab)
}

/// vhost-user: testpmd in the host namespace, each guest's vhost-user port paired with the
/// packet socket on its veth into br0. The bare-metal pod computes its own checksums, as the
/// guests' NICs (no offload) make theirs: testpmd passes frames on as they are.
fn start_switch(lab: &str, layout: &Layout) -> Result<dpdk::Forwarder> {
    let ns = netns_name(lab, SWITCH_ROLE);
    if let Some(pod) = &layout.host_pod {
        dpdk::tx_checksum_off(&pod.pod, "eth0")?;
    }
    let dir = dpdk::dir(lab, SWITCH_ROLE);
    let ports: Vec<dpdk::Port> = (layout.guests.iter())
        .flat_map(|g| {
            [
                dpdk::Port::Vhost {
                    socket: vhost_socket(&dir, &g.node.name),
                },
                dpdk::Port::Device(g.tap.clone()),
            ]
        })
        .collect();
    dpdk::start(lab, &ns, &ports, &dir, None)
}

/// Guest `node`'s vhost-user socket, served by testpmd in `dir`.
fn vhost_socket(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.sock"))
}

/// A CA of the lab's own and an identity for the host (first) and each guest, in order.
fn lab_identities(layout: &Layout) -> Result<Vec<Identity>> {
    let names: Vec<String> = std::iter::once(HOST_NODE.to_string())
        .chain(layout.guests.iter().map(|g| g.node.name.clone()))
        .collect();
    Ok(tls::issue(&names)?.0)
}

/// One node's pod network: where its commands run, its pod, its place on the outer network.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    /// Its node name in hops ("host", "vm1").
    name: String,
    /// Its host namespace; None for a guest, whose agent runs the commands in its root.
    ns: Option<String>,
    /// Its pod's namespace as the node names it.
    pod: String,
    /// Its pod subnet, 198.18.NET.0/24.
    net: u8,
    /// Its device and address on the outer network.
    outer_dev: &'static str,
    outer: Ipv4Addr,
}

impl Node {
    /// A guest's node: vmN with pod subnet N, outer address 198.19.0.N+1.
    fn guest(n: u8, pod: &str) -> Node {
        Node {
            name: GUESTS[n as usize - 1].to_string(),
            ns: None,
            pod: pod.to_string(),
            net: n,
            outer_dev: "eth0",
            outer: Ipv4Addr::new(198, 19, 0, n + 1),
        }
    }

    /// The pod's namespace as the host names it.
    fn pod_netns(&self) -> String {
        match self.ns {
            Some(_) => self.pod.clone(),
            None => guest_ns(&self.name, &self.pod),
        }
    }

    /// Its pod's address: .2 of its subnet, or .NET of the VLAN's.
    fn pod_addr(&self, inner: Inner) -> Ipv4Addr {
        match inner {
            Inner::Vlan => Ipv4Addr::new(198, 18, VLAN_ID as u8, self.net),
            _ => pod_ip(self.net, 2),
        }
    }

    /// Its pod's veth on cni0: veth-a for pod-a.
    fn veth(&self) -> String {
        let pod = self.pod.rsplit('-').next().unwrap_or("a");
        format!("veth-{pod}")
    }
}

/// A guest to boot: its node, its NIC (tap and MAC) and the host namespace of its tap.
#[derive(Clone, Debug)]
struct GuestPlan {
    node: Node,
    tap: String,
    /// The guest NIC's MAC, by which the guest's script finds it (its PCI slot names it).
    mac: String,
    host_ns: String,
}

/// What a nested lab is made of.
struct Layout {
    /// Host namespaces with an outer bridge br0, and its address.
    hosts: Vec<(String, Ipv4Addr)>,
    /// bmp2vmp's bare-metal pod network.
    host_pod: Option<Node>,
    guests: Vec<GuestPlan>,
    /// Cross-host: the veth wire0 joining the two hosts, a port of their bridges (`Bridge`)
    /// or the underlay of a VXLAN vxlan0 that is (`Vxlan`).
    wire: Option<Outer>,
    nic: Nic,
}

impl Layout {
    fn of(name: &str, topology: Topology, placement: Placement, outer: Outer, nic: Nic) -> Layout {
        let ns = |role: &str| netns_name(name, role);
        let guest = |n: u8, pod: &str, host_ns: String| GuestPlan {
            node: Node::guest(n, pod),
            tap: nic.host_end(n),
            mac: format!("52:54:00:c6:12:{n:02x}"),
            host_ns,
        };
        match (topology, placement) {
            (Topology::Vmp2vmp, Placement::CrossHost) => Layout {
                hosts: vec![(ns("host-a"), OUTER_HOST), (ns("host-b"), OUTER_HOST_B)],
                host_pod: None,
                guests: vec![
                    guest(1, "pod-a", ns("host-a")),
                    guest(2, "pod-b", ns("host-b")),
                ],
                wire: Some(outer),
                nic,
            },
            (Topology::Vmp2vmp, _) => Layout {
                hosts: vec![(ns("host"), OUTER_HOST)],
                host_pod: None,
                guests: vec![guest(1, "pod-a", ns("host")), guest(2, "pod-b", ns("host"))],
                wire: None,
                nic,
            },
            _ => Layout {
                hosts: vec![(ns("host"), OUTER_HOST)],
                host_pod: Some(Node {
                    name: "host".into(),
                    ns: Some(ns("host")),
                    pod: ns("pod-a"),
                    net: POD_NET_HOST,
                    outer_dev: "br0",
                    outer: OUTER_HOST,
                }),
                guests: vec![guest(1, "pod-b", ns("host"))],
                wire: None,
                nic,
            },
        }
    }

    /// The host namespaces: the hosts', then the bare-metal pod's.
    fn namespaces(&self) -> Vec<String> {
        let hosts = self.hosts.iter().map(|(ns, _)| ns.clone());
        hosts
            .chain(self.host_pod.iter().map(|n| n.pod.clone()))
            .collect()
    }

    /// The two nodes with a pod: the client's, then the server's.
    fn pod_nodes(&self) -> Vec<&Node> {
        let guests = self.guests.iter().map(|g| &g.node);
        self.host_pod.iter().chain(guests).collect()
    }

    /// The other pod node of `node`.
    fn peer(&self, node: &Node) -> &Node {
        self.pod_nodes()
            .into_iter()
            .find(|n| *n != node)
            .expect("a nested lab has two pod nodes")
    }
}

/// The lab's record: the host's devices as netlink reads them, the guests' as their agents did.
async fn assemble(
    name: &str,
    topology: Topology,
    placement: Placement,
    layout: &Layout,
    inner: Inner,
    parts: Vec<(Guest, Inventory)>,
) -> Result<Lab> {
    let host_ns = layout.namespaces();
    let mut interfaces = discover::interfaces(&host_ns).await?;
    let mut namespaces = host_ns;
    let mut guests = Vec::new();
    for (guest, inv) in parts {
        interfaces.extend(inv.interfaces.into_iter().map(|i| rename(&guest.name, i)));
        namespaces.extend(inv.namespaces.iter().map(|(n, _)| guest_ns(&guest.name, n)));
        guests.push(Guest {
            namespaces: inv.namespaces,
            ..guest
        });
    }
    let pods: Vec<Pod> = layout
        .pod_nodes()
        .into_iter()
        .map(|n| Pod {
            end: Endpoint {
                netns: n.pod_netns(),
                ifname: "eth0".into(),
                addr: n.pod_addr(inner),
            },
            host: n.name.clone(),
        })
        .collect();
    Ok(Lab {
        name: name.to_string(),
        topology,
        placement,
        mtu: None,
        namespaces,
        interfaces,
        client: pods[0].end.clone(),
        server: pods[1].end.clone(),
        pods,
        pods_per_host: None,
        owner: None,
        forwarder: None,
        guests,
        node: None,
        service: None,
        net2: None,
    })
}

/// A guest's interface with its namespaces named as the host names them.
pub fn rename(node: &str, mut i: LabIface) -> LabIface {
    i.netns = guest_ns(node, &i.netns);
    if let Some(p) = &mut i.peer {
        p.netns = guest_ns(node, &p.netns);
    }
    i
}

fn pod_ip(net: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, net, host)
}

/// The MAC of node NET's flannel.1: each node's fdb names the other's.
fn vtep_mac(net: u8) -> String {
    format!("02:c6:12:{:02x}:00:01", net + 1)
}

/// The commands (`ip` arguments) of one node's pod network: cni0 with one pod, and the way to
/// the peer node's pods.
fn node_commands(me: &Node, peer: &Node, inner: Inner, mtu: Option<u32>) -> Vec<String> {
    let n = me
        .ns
        .as_ref()
        .map_or(String::new(), |ns| format!("-n {ns} "));
    let (pod_ns, veth, net) = (&me.pod, me.veth(), me.net);
    let pod_mtu = mtu.unwrap_or(match inner {
        Inner::FlannelVxlan => FLANNEL_MTU,
        _ => 1500,
    });
    if inner == Inner::Vlan {
        return vlan_pod_commands(me, pod_mtu);
    }
    let gw = pod_ip(net, 1);
    let mut c = vec![
        format!("{n}link add cni0 mtu {pod_mtu} type bridge forward_delay 0 stp_state 0"),
        format!("{n}addr add {gw}/24 dev cni0"),
        format!("{n}link set cni0 up"),
        format!("{n}link add {veth} mtu {pod_mtu} type veth peer name eth0 mtu {pod_mtu} netns {pod_ns}"),
        format!("{n}link set {veth} master cni0 up"),
        format!("-n {pod_ns} link set lo up"),
        format!("-n {pod_ns} addr add {}/24 dev eth0", pod_ip(net, 2)),
        format!("-n {pod_ns} link set eth0 up"),
        format!("-n {pod_ns} route add default via {gw}"),
    ];
    let other_net = format!("198.18.{}.0/24", peer.net);
    let (outer_dev, local, remote) = (me.outer_dev, me.outer, peer.outer);
    // Bridge: flannel host-gw; else flannel's VXLAN (VLAN pods returned above).
    if inner == Inner::Bridge {
        c.push(format!(
            "{n}route add {other_net} via {remote} dev {outer_dev}"
        ));
    } else {
        let (mine, theirs) = (vtep_mac(net), vtep_mac(peer.net));
        let vtep = format!("198.18.{}.0", peer.net);
        c.extend([
            format!("{n}link add flannel.1 address {mine} mtu {FLANNEL_MTU} type vxlan id 1 local {local} dev {outer_dev} dstport {VXLAN_PORT} nolearning"),
            format!("{n}addr add 198.18.{net}.0/32 dev flannel.1"),
            format!("{n}link set flannel.1 up"),
            format!("{n}neigh add {vtep} lladdr {theirs} dev flannel.1 nud permanent"),
            format!("{n}fdb append {theirs} dev flannel.1 dst {remote} self permanent"),
            format!("{n}route add {other_net} via {vtep} dev flannel.1 onlink"),
        ]);
    }
    c
}

/// A pod whose eth0 is a VLAN child of its node's outer device (made under another name:
/// the kernel checks the name where the command runs, which has its own eth0).
fn vlan_pod_commands(me: &Node, mtu: u32) -> Vec<String> {
    let n = me
        .ns
        .as_ref()
        .map_or(String::new(), |ns| format!("-n {ns} "));
    let (pod, dev) = (&me.pod, me.outer_dev);
    vec![
        format!("{n}link add link {dev} name vlan{VLAN_ID} mtu {mtu} type vlan id {VLAN_ID}"),
        format!("{n}link set vlan{VLAN_ID} netns {pod}"),
        format!("-n {pod} link set vlan{VLAN_ID} name eth0"),
        format!("-n {pod} link set lo up"),
        format!("-n {pod} addr add {}/24 dev eth0", me.pod_addr(Inner::Vlan)),
        format!("-n {pod} link set eth0 up"),
    ]
}

/// The host side: an outer bridge br0 per host namespace with its guests' taps (cross-host the
/// two bridges joined by wire0), and bmp2vmp's bare-metal pod network.
fn host_commands(layout: &Layout, inner: Inner, mtu: Option<u32>) -> Vec<String> {
    let mut c = Vec::new();
    for (host, addr) in &layout.hosts {
        let n = format!("-n {host} ");
        c.extend([
            format!("{n}link add br0 type bridge forward_delay 0 stp_state 0"),
            format!("{n}addr add {addr}/24 dev br0"),
            format!("{n}link set br0 up"),
        ]);
        for g in layout.guests.iter().filter(|g| &g.host_ns == host) {
            c.extend(nic_commands(&n, g, layout.nic));
        }
    }
    if let ([(a, _), (b, _)], Some(outer)) = (&layout.hosts[..], layout.wire) {
        c.push(format!(
            "-n {a} link add wire0 type veth peer name wire0 netns {b}"
        ));
        for (k, (me, them)) in [(a, WIRE[1]), (b, WIRE[0])].into_iter().enumerate() {
            let n = format!("-n {me} ");
            match outer {
                Outer::Vxlan => c.extend([
                    format!("{n}addr add {}/24 dev wire0", WIRE[k]),
                    format!("{n}link set wire0 up"),
                    format!("{n}link add vxlan0 type vxlan id 2 local {} remote {them} dev wire0 dstport 4789", WIRE[k]),
                    format!("{n}link set vxlan0 master br0 up"),
                ]),
                _ => c.push(format!("{n}link set wire0 master br0 up")),
            }
        }
    }
    if let Some(node) = &layout.host_pod {
        c.extend(node_commands(node, layout.peer(node), inner, mtu));
    }
    c
}

/// A guest NIC's host end on br0: QEMU's tap, or the veth pair between testpmd's packet socket
/// (vhu-vmN) and br0 (br-vmN).
fn nic_commands(n: &str, g: &GuestPlan, nic: Nic) -> Vec<String> {
    let end = &g.tap;
    match nic {
        Nic::Tap => vec![
            format!("{n}tuntap add dev {end} mode tap"),
            format!("{n}link set {end} master br0 up"),
        ],
        Nic::VhostUser => {
            let port = format!("br-{}", g.node.name);
            vec![
                format!("{n}link add {port} type veth peer name {end}"),
                format!("{n}link set {port} master br0 up"),
                format!("{n}link set {end} up"),
            ]
        }
    }
}

/// Runs `ip ARGS` ("bridge" for fdb entries; "tc ARGS" is tc's, for qdiscs such as a test's
/// netem in the guest), failing with its error in one line.
pub fn ip(args: &str) -> Result<()> {
    let words: Vec<&str> = args.split_whitespace().collect();
    let (prog, words) = match (words.first(), words.iter().position(|w| *w == "fdb")) {
        (Some(&"tc"), _) => ("tc", words[1..].to_vec()),
        (_, Some(_)) => ("bridge", words),
        _ => ("ip", words),
    };
    let out = Command::new(prog)
        .args(&words)
        .output()
        .with_context(|| format!("cannot run {prog}"))?;
    if !out.status.success() {
        bail!(
            "{prog} {args}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The guest's shell script, kept short (virtme-ng passes it on the kernel's command line, at
/// most 2 KiB on 6.1): modules and filesystems the profiler needs, the NIC (found by its MAC)
/// renamed eth0, then the agent, which builds the rest when the lab asks (`setup_commands`).
fn guest_script(profiler: &Path, node: &str, mac: &str) -> String {
    format!(
        "modprobe -q -a virtio_net virtio_console veth bridge vxlan 8021q sch_netem\n\
         mount -t bpf bpf /sys/fs/bpf; mount -t tracefs tracefs /sys/kernel/tracing\n\
         mkdir -p /run/netns; sysctl -qw net.ipv4.ip_forward=1\n\
         for d in /sys/class/net/*; do [ $(cat $d/address) = {mac} ] && ip link set ${{d##*/}} name eth0; done\n\
         exec {} agent --serial {AGENT_PORT} --listen 0.0.0.0:{} --tls-from-host --node {node}\n",
        profiler.display(),
        AGENT_TCP_PORT
    )
}

/// A guest's side, run by its agent: eth0 on the outer network, its pod network.
fn setup_commands(node: &Node, peer: &Node, inner: Inner, mtu: Option<u32>) -> Vec<String> {
    let mut c = vec![
        format!("addr add {}/24 dev eth0", node.outer),
        "link set eth0 up".to_string(),
        format!("netns add {}", node.pod),
    ];
    c.extend(node_commands(node, peer, inner, mtu));
    c
}

/// What the lab asks of a guest's agent on its serial channel (the one only the VM's host can
/// write to): the `ip` commands that build the guest's side and, for its TCP side, the guest's
/// identity in the lab's own cluster (one CA per lab).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SetupRequest {
    pub commands: Vec<String>,
    #[serde(default)]
    pub tls: Option<Identity>,
}

/// `profiler lab exec`'s request on a guest's serial channel, as JSON `{"exec": ExecRequest}`:
/// a command the profiler did not generate, run in one of the guest's namespaces.
pub const EXEC: &str = "exec";

#[derive(Debug, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The guest's own name of the namespace ("pod-b", "(root)").
    pub netns: String,
    pub argv: Vec<String>,
    pub timeout_s: u64,
}

/// What the command did: its exit status (128 + the signal that ended it) and its output,
/// as text (bytes that are not UTF-8 replaced).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecAnswer {
    Ran {
        status: i32,
        stdout: String,
        stderr: String,
    },
    Failed(String),
}

/// Runs `request` in guest `node` of lab `lab` through its agent's serial channel.
pub async fn exec(lab: &str, node: &str, request: &ExecRequest) -> Result<ExecAnswer> {
    let within = Duration::from_secs(request.timeout_s + 30);
    ask(lab, node, EXEC, request, within).await
}

/// Asks guest `node`'s agent on its serial channel, and reads its one-line answer within
/// `within`.
pub async fn ask<Q: Serialize, A: serde::de::DeserializeOwned>(
    lab: &str,
    node: &str,
    kind: &str,
    request: &Q,
    within: Duration,
) -> Result<A> {
    let mut talk = Talk::open(lab, node).await?;
    talk.send(kind, request).await?;
    talk.answer(within).await
}

/// How long an agent may take to echo a sync (`Talk::sync`): an earlier host's request may
/// still run, the longest an attach's loading under TCG (attach/across.rs gives it 900 s).
const SYNC_WITHIN: Duration = Duration::from_secs(900);

/// A conversation with an agent: requests as JSON `{kind: request}`, answers a line each (of
/// at most [`MAX_ANSWER`] bytes). On a guest's serial channel (`open`) or, for a node's agent,
/// over TCP under the cluster's TLS (`tls`).
pub struct Talk {
    node: String,
    lines: Reader,
    write: Writer,
}

impl Talk {
    pub async fn open(lab: &str, node: &str) -> Result<Talk> {
        let socket = dir(lab, node).join("agent.sock");
        if !socket.exists() {
            bail!("lab {lab} has no guest {node} (no {})", socket.display());
        }
        let stream = tokio::net::UnixStream::connect(&socket)
            .await
            .with_context(|| format!("cannot reach the agent of {node} (a run may hold it)"))?;
        let (read, write) = stream.into_split();
        let mut talk = Talk::over(node, Box::pin(read), Box::pin(write));
        talk.sync().await?;
        Ok(talk)
    }

    /// Reads past what an earlier host left on the serial channel (the answer to a `lab exec`
    /// whose host was interrupted, which would otherwise be taken for the next request's):
    /// asks for a word of its own and skips to its echo. The agent answers in order, so the
    /// echo waits for a request of the earlier host that still runs.
    async fn sync(&mut self) -> Result<()> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let word = format!("{}-{nanos}", std::process::id());
        self.send("sync", &word).await?;
        let echo = serde_json::json!({ "sync": word }).to_string();
        let mut skipped = 0;
        loop {
            let line = self
                .line(SYNC_WITHIN)
                .await
                .with_context(|| format!("{} is still busy with an earlier request", self.node))?;
            if line == echo {
                break;
            }
            skipped += 1;
        }
        if skipped > 0 {
            log::info!(
                "{}: skipped {skipped} answer(s) left by an earlier host",
                self.node
            );
        }
        Ok(())
    }

    /// The agent of node `node` at `addr`, whose certificate must be for `node`, spoken to as
    /// `identity`.
    pub async fn tls(node: &str, addr: SocketAddr, identity: &Identity) -> Result<Talk> {
        let (read, write) = channel::dial(node, addr, Some(identity)).await?;
        Ok(Talk::over(node, read, write))
    }

    fn over(node: &str, read: channel::Read, write: Writer) -> Talk {
        Talk {
            node: node.to_string(),
            lines: Reader::new(read, MAX_ANSWER),
            write,
        }
    }

    pub async fn send<Q: Serialize>(&mut self, kind: &str, request: &Q) -> Result<()> {
        let line = serde_json::json!({ kind: request }).to_string() + "\n";
        self.write.write_all(line.as_bytes()).await?;
        Ok(self.write.flush().await?)
    }

    pub async fn answer<A: serde::de::DeserializeOwned>(&mut self, within: Duration) -> Result<A> {
        let answer = self.line(within).await?;
        serde_json::from_str(&answer)
            .with_context(|| format!("the agent of {}: unreadable answer", self.node))
    }

    /// The next line the agent sends. Cancel-safe: a line partly read is completed next time.
    pub async fn line(&mut self, within: Duration) -> Result<String> {
        let node = &self.node;
        tokio::time::timeout(within, self.lines.next_line())
            .await
            .map_err(|_| anyhow::anyhow!("the agent of {node} did not answer within {within:?}"))?
            .with_context(|| format!("the agent of {node}"))?
            .with_context(|| format!("the agent of {node} closed its channel"))
    }

    pub fn node(&self) -> &str {
        &self.node
    }
}

/// The agent's answer to the lab's setup request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetupAnswer {
    Inventory(Inventory),
    Failed(String),
}

/// QEMU's options for the guest's NIC. vhost-user: testpmd reads and writes the rings in the
/// guest's memory, so that memory is a shared memfd (no hugepages needed); no checksum
/// offload (csum, guest_csum off), as on the dpdk lab's pods: testpmd would pass a frame whose
/// checksum is left to the NIC on as it is.
fn nic_opts(lab: &str, plan: &GuestPlan, nic: Nic) -> String {
    let (tap, mac) = (&plan.tap, &plan.mac);
    match nic {
        Nic::Tap => format!(
            "-netdev tap,id=t0,ifname={tap},script=no,downscript=no \
             -device virtio-net-pci,netdev=t0,mac={mac}"
        ),
        Nic::VhostUser => format!(
            "-object memory-backend-memfd,id=mem,size={GUEST_MEMORY},share=on \
             -numa node,memdev=mem \
             -chardev socket,id=vhu,path={} \
             -netdev vhost-user,id=t0,chardev=vhu \
             -device virtio-net-pci,netdev=t0,mac={mac},csum=off,guest_csum=off",
            vhost_socket(&dpdk::dir(lab, SWITCH_ROLE), &plan.node.name).display()
        ),
    }
}

/// Boots a guest in its host namespace, its NIC as `nic` says, its agent's port a Unix socket
/// in its directory; returns once its process group is recorded (the agent answers later).
fn start(
    lab: &str,
    plan: &GuestPlan,
    nic: Nic,
    vng: &Path,
    vmlinuz: &Path,
    release: &str,
    script: &str,
) -> Result<Guest> {
    let (name, tap) = (&plan.node.name, &plan.tap);
    let gdir = &dir(lab, name);
    std::fs::create_dir_all(gdir).with_context(|| format!("cannot create {}", gdir.display()))?;
    let socket = gdir.join("agent.sock");
    let log_path = gdir.join("console.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let qemu_opts = format!(
        "{} \
         -device virtio-serial-pci \
         -chardev socket,id=agent,path={},server=on,wait=off \
         -device virtserialport,chardev=agent,name={AGENT_PORT}",
        nic_opts(lab, plan, nic),
        socket.display()
    );
    let venv_bin = vng.parent().context("vng has no directory")?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        std::iter::once(venv_bin.to_path_buf()).chain(std::env::split_paths(&path)),
    )?;
    let child = Command::new("ip")
        .args(["netns", "exec", &plan.host_ns])
        .arg(vng)
        .args([
            "--disable-kvm",
            "--verbose",
            "--memory",
            GUEST_MEMORY,
            "--cpus",
            GUEST_CPUS,
        ])
        .arg("--name")
        .arg(format!("{QEMU_NAME_PREFIX}{lab}-{name}"))
        .arg("--run")
        .arg(vmlinuz)
        .args(["--cwd", "/"])
        .arg(format!("--qemu-opts={qemu_opts}"))
        .args(["--exec", script])
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot run {}", vng.display()))?;
    let pid = child.id();
    // Reaped by `stop` (or init, once this process has exited).
    std::mem::forget(child);
    let guest = Guest {
        name: name.clone(),
        pid,
        start_time: owner::start_time(pid).unwrap_or(0),
        kernel: release.to_string(),
        tap: tap.clone(),
        nic,
        socket,
        inner: Inner::default(),
        outer: Outer::default(),
        namespaces: Vec::new(),
    };
    std::fs::write(gdir.join("pid"), serde_json::to_vec(&guest)?)
        .context("cannot record the guest's pid")?;
    Ok(guest)
}

/// Waits for the guest's agent, has it run the request's commands (and take its identity) and
/// asks for its inventory. Fails with the end of the console log if the guest stops first.
async fn setup(guest: &Guest, request: SetupRequest) -> Result<Inventory> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let log = guest.socket.with_file_name("console.log");
    let failed = |what: &str| {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        anyhow::anyhow!(
            "guest {}: {what}: {}",
            guest.name,
            lines[lines.len().saturating_sub(3)..].join(" / ")
        )
    };
    let stream = loop {
        if !guest.alive() {
            return Err(failed("QEMU exited"));
        }
        if Instant::now() > deadline {
            return Err(failed("no socket from QEMU"));
        }
        match tokio::net::UnixStream::connect(&guest.socket).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let (read, mut write) = stream.into_split();
    let request = serde_json::json!({ SETUP: request }).to_string() + "\n";
    write.write_all(request.as_bytes()).await?;
    let mut lines = Reader::new(Box::pin(read), MAX_ANSWER);
    let left = deadline.saturating_duration_since(Instant::now());
    let alive = async {
        while guest.alive() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let line = tokio::select! {
        l = tokio::time::timeout(left, lines.next_line()) => l,
        () = alive => return Err(failed("the guest stopped before its agent answered")),
    };
    match line {
        Ok(Ok(Some(line))) => match serde_json::from_str(&line) {
            Ok(SetupAnswer::Inventory(inv)) => Ok(inv),
            Ok(SetupAnswer::Failed(e)) => bail!("guest {}: {e}", guest.name),
            Err(e) => bail!("guest {}: unreadable answer {line:?}: {e}", guest.name),
        },
        Ok(Ok(None)) => Err(failed("QEMU closed the agent's channel")),
        Ok(Err(e)) => Err(e).context("reading the agent's answer"),
        Err(_) => Err(failed("its agent did not answer within 10 minutes")),
    }
}

/// The guest recorded in `dir`, if any.
fn recorded(dir: &Path) -> Option<Guest> {
    serde_json::from_slice(&std::fs::read(dir.join("pid")).ok()?).ok()
}

/// Stops the guest recorded in `dir` (its whole process group: SIGTERM, then SIGKILL) and
/// removes `dir`. Works on whatever part exists.
pub(super) fn stop(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if let Some(g) = recorded(dir) {
        stop_group(&g)?;
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))
}

fn stop_group(g: &Guest) -> Result<()> {
    let group = Pid::from_raw(-(g.pid as i32));
    // Only a group whose leader is the recorded process: its pid may have been reused.
    let ours = g.alive();
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        if !ours || kill(group, None).is_err() {
            break;
        }
        let _ = kill(group, signal);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while kill(group, None).is_ok() && Instant::now() < deadline {
            reap(g.pid);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    reap(g.pid);
    if ours && kill(group, None).is_ok() && g.alive() {
        bail!(
            "guest {} (QEMU, process group {}) did not exit",
            g.name,
            g.pid
        );
    }
    Ok(())
}

fn reap(pid: u32) {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_namespaces_round_trip() {
        let ns = guest_ns("vm1", "pod-b");
        assert_eq!(ns, "vm1:pod-b");
        assert_eq!(in_guest("vm1", &ns), Some("pod-b"));
        assert_eq!(in_guest("vm1", "prof-bmp2vmp-host"), None);
        assert_eq!(super::super::names::node_of(&ns), "vm1");
        assert_eq!(super::super::names::node_of("prof-bmp2vmp-host"), "host");
    }

    fn guest_commands(layout: &Layout, k: usize, inner: Inner) -> String {
        let node = &layout.guests[k].node;
        setup_commands(node, layout.peer(node), inner, None).join("\n")
    }

    #[test]
    fn flannel_nodes_point_at_each_other() {
        let layout = Layout::of(
            "bmp2vmp",
            Topology::Bmp2vmp,
            Placement::SameHost,
            Outer::Bridge,
            Nic::Tap,
        );
        let host = host_commands(&layout, Inner::FlannelVxlan, None).join("\n");
        assert!(host.contains("local 198.19.0.1 dev br0"), "{host}");
        assert!(host.contains(
            "-n prof-bmp2vmp-host fdb append 02:c6:12:02:00:01 dev flannel.1 dst 198.19.0.2"
        ));
        let guest = guest_commands(&layout, 0, Inner::FlannelVxlan);
        assert!(guest.contains("local 198.19.0.2 dev eth0"), "{guest}");
        assert!(guest.contains("fdb append 02:c6:12:01:00:01 dev flannel.1 dst 198.19.0.1"));
        assert!(guest.contains("route add 198.18.0.0/24 via 198.18.0.0 dev flannel.1 onlink"));
        assert!(guest.contains("netns add pod-b"), "{guest}");
        let script = guest_script(Path::new("/p"), "vm1", "52:54:00:c6:12:01");
        assert!(script.contains(
            "exec /p agent --serial profiler --listen 0.0.0.0:7450 --tls-from-host --node vm1"
        ));
        // virtme-ng puts it on the kernel command line, base64: 2 KiB in all on 6.1.
        assert!(script.len() < 600, "{} bytes", script.len());
    }

    /// vhost-user: no tap; each guest's NIC is a testpmd port paired with a packet socket on
    /// vhu-vmN, whose veth peer br-vmN is br0's port; QEMU shares the guest's memory.
    #[test]
    fn vhost_user_guests_reach_br0_through_testpmd() {
        let layout = Layout::of(
            "vmp2vmp",
            Topology::Vmp2vmp,
            Placement::SameHost,
            Outer::Bridge,
            Nic::VhostUser,
        );
        let host = host_commands(&layout, Inner::Bridge, None).join("\n");
        assert!(!host.contains("tuntap"), "{host}");
        for n in [1, 2] {
            assert!(
                host.contains(&format!(
                    "-n prof-vmp2vmp-host link add br-vm{n} type veth peer name vhu-vm{n}"
                )),
                "{host}"
            );
            assert!(
                host.contains(&format!("link set br-vm{n} master br0 up")),
                "{host}"
            );
        }
        let opts = nic_opts("vmp2vmp", &layout.guests[1], Nic::VhostUser);
        for want in [
            "memory-backend-memfd,id=mem,size=1G,share=on",
            "path=/run/profiler/dpdk/vmp2vmp-host/vm2.sock",
            "-netdev vhost-user,id=t0,chardev=vhu",
            "mac=52:54:00:c6:12:02,csum=off,guest_csum=off",
        ] {
            assert!(opts.contains(want), "{want}: {opts}");
        }
        let tap = nic_opts("vmp2vmp", &layout.guests[1], Nic::Tap);
        assert!(tap.contains("-netdev tap,id=t0,ifname=vhu-vm2"), "{tap}");
    }

    /// VMP2VMP cross-host: each tap on its own host's bridge, the bridges joined by wire0, and
    /// the guests' pod networks pointing at each other (no pod on the host).
    #[test]
    fn vmp2vmp_cross_host_joins_two_hosts_by_the_wire() {
        let layout = Layout::of(
            "vmp2vmp-xhost",
            Topology::Vmp2vmp,
            Placement::CrossHost,
            Outer::Bridge,
            Nic::Tap,
        );
        assert_eq!(
            layout.namespaces(),
            ["prof-vmp2vmp-xhost-host-a", "prof-vmp2vmp-xhost-host-b"]
        );
        let host = host_commands(&layout, Inner::FlannelVxlan, None);
        for cmd in [
            "-n prof-vmp2vmp-xhost-host-a tuntap add dev tap-vm1 mode tap",
            "-n prof-vmp2vmp-xhost-host-b link set tap-vm2 master br0 up",
            "-n prof-vmp2vmp-xhost-host-a link add wire0 type veth peer name wire0 netns prof-vmp2vmp-xhost-host-b",
            "-n prof-vmp2vmp-xhost-host-b link set wire0 master br0 up",
        ] {
            assert!(host.iter().any(|c| c == cmd), "{cmd}: {host:#?}");
        }
        assert!(!host.iter().any(|c| c.contains("cni0")), "{host:#?}");
        let vm1 = guest_commands(&layout, 0, Inner::FlannelVxlan);
        assert!(vm1.contains("veth-a mtu 1450 type veth peer name eth0 mtu 1450 netns pod-a"));
        assert!(vm1.contains("fdb append 02:c6:12:03:00:01 dev flannel.1 dst 198.19.0.3"));
        assert!(vm1.contains("route add 198.18.2.0/24 via 198.18.2.0 dev flannel.1 onlink"));
        let vm2 = guest_commands(&layout, 1, Inner::Bridge);
        assert!(vm2.contains("addr add 198.19.0.3/24 dev eth0"), "{vm2}");
        assert!(
            vm2.contains("route add 198.18.1.0/24 via 198.19.0.2 dev eth0"),
            "{vm2}"
        );
        assert_eq!(layout.guests[1].mac, "52:54:00:c6:12:02");
        let same = Layout::of(
            "vmp2vmp",
            Topology::Vmp2vmp,
            Placement::SameHost,
            Outer::Bridge,
            Nic::Tap,
        );
        let host = host_commands(&same, Inner::Bridge, None).join("\n");
        assert!(host.contains("-n prof-vmp2vmp-host link set tap-vm2 master br0 up"));
        assert!(!host.contains("wire0"), "{host}");
    }

    /// `--outer vxlan`: wire0 is routed between the hosts and carries vxlan0, the bridges'
    /// port, so a flannel packet from a guest is encapsulated a second time on the host.
    #[test]
    fn outer_vxlan_bridges_the_hosts_over_a_vxlan_on_the_wire() {
        let layout = Layout::of(
            "vmp2vmp-xhost",
            Topology::Vmp2vmp,
            Placement::CrossHost,
            Outer::Vxlan,
            Nic::Tap,
        );
        let host = host_commands(&layout, Inner::FlannelVxlan, None);
        for cmd in [
            "-n prof-vmp2vmp-xhost-host-a addr add 198.19.1.1/24 dev wire0",
            "-n prof-vmp2vmp-xhost-host-a link add vxlan0 type vxlan id 2 local 198.19.1.1 remote 198.19.1.2 dev wire0 dstport 4789",
            "-n prof-vmp2vmp-xhost-host-b link add vxlan0 type vxlan id 2 local 198.19.1.2 remote 198.19.1.1 dev wire0 dstport 4789",
            "-n prof-vmp2vmp-xhost-host-b link set vxlan0 master br0 up",
        ] {
            assert!(host.iter().any(|c| c == cmd), "{cmd}: {host:#?}");
        }
        assert!(
            !host.iter().any(|c| c.contains("wire0 master")),
            "{host:#?}"
        );
        let options = |topology, placement, outer| {
            let o = LabOptions {
                placement,
                outer: Some(outer),
                guest_kernel: Some("/nonexistent".into()),
                ..LabOptions::default()
            };
            check(topology, &o).map_err(|e| e.to_string())
        };
        let same = options(Topology::Vmp2vmp, Placement::SameHost, Outer::Vxlan);
        assert!(same.unwrap_err().contains("cross-host only"));
        let vlan = options(Topology::Vmp2vmp, Placement::CrossHost, Outer::Vlan);
        assert!(vlan.unwrap_err().contains("no 8021q"));
    }

    /// `--inner vlan`: each guest's pod on a VLAN child of its eth0, one subnet for both; not
    /// on bmp2vmp, whose bare-metal node has no 8021q here.
    #[test]
    fn inner_vlan_puts_each_pod_on_a_vlan_of_its_guest_nic() {
        let layout = Layout::of(
            "vmp2vmp",
            Topology::Vmp2vmp,
            Placement::SameHost,
            Outer::Bridge,
            Nic::Tap,
        );
        let vm2 = guest_commands(&layout, 1, Inner::Vlan);
        assert_eq!(
            vm2,
            "addr add 198.19.0.3/24 dev eth0\nlink set eth0 up\nnetns add pod-b\n\
             link add link eth0 name vlan100 mtu 1500 type vlan id 100\n\
             link set vlan100 netns pod-b\n-n pod-b link set vlan100 name eth0\n\
             -n pod-b link set lo up\n-n pod-b addr add 198.18.100.2/24 dev eth0\n\
             -n pod-b link set eth0 up"
        );
        assert_eq!(
            layout.guests[0].node.pod_addr(Inner::Vlan),
            Ipv4Addr::new(198, 18, 100, 1)
        );
        let bmp = LabOptions {
            inner: Some(Inner::Vlan),
            ..LabOptions::default()
        };
        let err = check(Topology::Bmp2vmp, &bmp).unwrap_err().to_string();
        assert!(err.contains("8021q"), "{err}");
    }
}
