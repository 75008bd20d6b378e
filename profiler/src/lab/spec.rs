//! What each topology is made of, as plain data; setup.rs turns it into devices.
use std::net::Ipv4Addr;

use anyhow::{bail, Result};

use super::{CannotBuild, LabOptions, Placement, Topology};

/// Every lab address is in 198.18.0.0/15 (RFC 2544 benchmarking range), on our own devices.
pub(super) type Cidr = (Ipv4Addr, u8);

const fn ip(c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, c, d)
}
/// The "wire" between two host namespaces: 198.19.0.0/24.
const WIRE_A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const WIRE_B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
/// flannel.1's MAC per host: fixed (locally administered), so routes, neighbours and FDB
/// entries are plain data, as flannel writes them from its subnet leases.
const VTEP_MAC_A: [u8; 6] = [0x02, 0xc6, 0x12, 0x01, 0x00, 0x01];
const VTEP_MAC_B: [u8; 6] = [0x02, 0xc6, 0x12, 0x02, 0x00, 0x01];
/// geneve0's MAC per host, fixed for the same reason.
const GENEVE_MAC_A: [u8; 6] = [0x02, 0xc6, 0x12, 0x01, 0x00, 0x02];
const GENEVE_MAC_B: [u8; 6] = [0x02, 0xc6, 0x12, 0x02, 0x00, 0x02];
const FLANNEL_MTU: u32 = 1450;
/// Outer IPv4, UDP and VXLAN (or Geneve without options) headers and the inner Ethernet header.
const VXLAN_OVERHEAD: u32 = 50;
/// Outer IPv4, GRE with a key and the inner Ethernet header: Neutron's 1458-byte GRE networks.
const GRE_OVERHEAD: u32 = 42;
const WIRE_MTU: u32 = 1500;
/// Kuryr/Neutron's integration bridge, and the local VLAN of the pods' network on it.
const OVS_BRIDGE: &str = "br-int";
const OVS_TAG: u16 = 100;
/// The key (VNI) of the pods' network on OVS tunnels.
const OVS_KEY: u32 = 100;
/// The kernel datapath's own device, master of every OVS port that is a kernel device.
const OVS_DATAPATH: &str = "ovs-system";

/// An interface by namespace role ("pod-a") and final name.
pub(super) type Place = (&'static str, &'static str);

/// One end of a veth pair.
pub(super) struct End {
    pub at: Place,
    pub addr: Option<Cidr>,
    pub master: Option<&'static str>,
    pub mtu: Option<u32>,
}

pub(super) struct Bridge {
    pub at: Place,
    pub addr: Cidr,
    pub mtu: Option<u32>,
}

#[derive(Clone, Copy)]
pub(super) enum ChildKind {
    /// mode bridge
    Macvlan,
    /// 802.1Q with this VLAN id
    Vlan(u16),
    /// ipvlan mode l2: the children share the parent's MAC, frames are switched by IP.
    IpvlanL2,
    /// ipvlan mode l3: no ARP; what is not for a sibling is routed by the parent's namespace.
    IpvlanL3,
}

impl ChildKind {
    /// The kind netlink reports for the device.
    pub fn name(self) -> &'static str {
        match self {
            ChildKind::Macvlan => "macvlan",
            ChildKind::Vlan(_) => "vlan",
            ChildKind::IpvlanL2 | ChildKind::IpvlanL3 => "ipvlan",
        }
    }

    /// The kernel module that provides it.
    pub fn module(self) -> &'static str {
        match self {
            ChildKind::Vlan(_) => "8021q",
            kind => kind.name(),
        }
    }
}

/// A macvlan/vlan/ipvlan device on `parent`, created in the parent's namespace and moved to
/// `at`.
pub(super) struct Child {
    pub kind: ChildKind,
    pub parent: Place,
    pub at: Place,
    pub addr: Cidr,
    pub mtu: Option<u32>,
}

#[derive(Clone, Copy)]
pub(super) enum TunnelKind {
    /// flannel's VTEP: remote VTEPs come from the FDB.
    Vxlan {
        local: Ipv4Addr,
        /// The underlay device, in the same namespace, the VTEP is bound to (flannel binds
        /// it). None: unbound, the outer packets leave wherever the route to the peer says.
        dev: Option<&'static str>,
    },
    /// Point to point to `remote` (Geneve has no FDB); never bound to a lower device.
    Geneve { remote: Ipv4Addr },
}

/// An L2 tunnel device in a host namespace, with a fixed MAC.
pub(super) struct Tunnel {
    pub at: Place,
    pub kind: TunnelKind,
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    pub mac: [u8; 6],
    pub addr: Cidr,
    pub mtu: u32,
}

impl Tunnel {
    /// The kind netlink reports for the device, also the name of its kernel module.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            TunnelKind::Vxlan { .. } => "vxlan",
            TunnelKind::Geneve { .. } => "geneve",
        }
    }

    /// The lower device the tunnel is bound to.
    pub fn dev(&self) -> Option<&'static str> {
        match self.kind {
            TunnelKind::Vxlan { dev, .. } => dev,
            TunnelKind::Geneve { .. } => None,
        }
    }
}

/// An Open vSwitch bridge in host namespace `role`, with its ports. At most one per
/// namespace: each host namespace runs its own ovsdb-server and ovs-vswitchd, since kernel
/// datapaths are per namespace.
pub(super) struct OvsBridge {
    pub role: &'static str,
    pub name: &'static str,
    pub ports: Vec<OvsPort>,
}

pub(super) struct OvsPort {
    pub name: String,
    pub kind: OvsPortKind,
}

#[derive(Clone, Copy)]
pub(super) enum OvsPortKind {
    /// A device of the namespace as an access port of this VLAN: frames leave it untagged.
    Access(u16),
    /// A device of the namespace as a trunk of this VLAN only: frames leave it tagged.
    Trunk(u16),
    /// A tunnel port to `remote`, access port of `tag`: the frame inside is untagged.
    Tunnel {
        encap: OvsTunnel,
        local: Ipv4Addr,
        remote: Ipv4Addr,
        key: u32,
        tag: u16,
    },
}

/// How an OVS lab's br-int reaches the other host.
#[derive(Clone, Copy)]
enum OvsUplink {
    /// wire0 a trunk of the pods' VLAN: frames tagged on the wire (ovs-vlan).
    Vlan,
    /// wire0 an access port of it: frames untagged on the wire (ovs-flat, a FLAT provider
    /// network, whose one network needs no tag to tell it apart).
    Flat,
    /// A tunnel port to the other host's wire address (ovs-vxlan, ovs-gre).
    Tunnel(OvsTunnel),
}

#[derive(Clone, Copy)]
pub(super) enum OvsTunnel {
    Vxlan,
    Gre,
}

impl OvsTunnel {
    /// The Interface type in ovs-vsctl.
    pub fn ovs_type(self) -> &'static str {
        match self {
            OvsTunnel::Vxlan => "vxlan",
            OvsTunnel::Gre => "gre",
        }
    }

    /// The kernel device the datapath creates for ports of this type (one per namespace and
    /// type, shared by its ports), and the kind netlink reports for it.
    pub fn device(self) -> (&'static str, &'static str) {
        match self {
            OvsTunnel::Vxlan => ("vxlan_sys_4789", "vxlan"),
            OvsTunnel::Gre => ("gre_sys", "gretap"),
        }
    }

    /// Neutron's MTU for the pods' networks over this tunnel and a 1500-byte underlay.
    fn pod_mtu(self) -> u32 {
        match self {
            OvsTunnel::Vxlan => WIRE_MTU - VXLAN_OVERHEAD,
            OvsTunnel::Gre => WIRE_MTU - GRE_OVERHEAD,
        }
    }
}

impl OvsBridge {
    /// The devices OVS itself creates in the namespace, with their kinds: the datapath's
    /// device, the bridge's internal port, and the tunnel ports' kernel devices.
    pub fn devices(&self) -> Vec<(&'static str, &'static str)> {
        let mut devices = vec![(OVS_DATAPATH, "openvswitch"), (self.name, "openvswitch")];
        for p in &self.ports {
            if let OvsPortKind::Tunnel { encap, .. } = p.kind {
                if !devices.contains(&encap.device()) {
                    devices.push(encap.device());
                }
            }
        }
        devices
    }

    /// Whether `dev` is a kernel device attached to the datapath (its master is
    /// OVS_DATAPATH), rather than an internal port.
    pub fn has_port_device(&self, dev: &str) -> bool {
        self.ports.iter().any(|p| match p.kind {
            OvsPortKind::Tunnel { encap, .. } => encap.device().0 == dev,
            _ => p.name == dev,
        })
    }
}

/// A userspace datapath in host namespace `role`: a process that takes every frame its
/// `ports` receive through a packet socket and sends it out of the other port.
pub(super) struct Userspace {
    pub role: &'static str,
    /// Its name in segment names, and the program that is it.
    pub name: &'static str,
    pub ports: [&'static str; 2],
    /// The pods' ends of the ports' veth pairs, whose transmit checksum offload is turned off
    /// (see dpdk::tx_checksum_off).
    pub pods: [Place; 2],
}

/// An SR-IOV NIC's physical function (the `nic`-th igb NIC of the machine), moved into host
/// namespace `role`, which owns it as a host owns its NIC.
pub(super) struct Pf {
    pub nic: usize,
    pub role: &'static str,
}

/// Virtual function `vf` of the `nic`-th PF, given to a pod as `at`, with a MAC the PF sets
/// (as an administrator does: the NIC switches frames to a VF by it).
pub(super) struct Vf {
    pub nic: usize,
    pub vf: u32,
    pub at: Place,
    pub addr: Cidr,
    pub mac: [u8; 6],
    pub mtu: Option<u32>,
}

pub(super) struct Route {
    pub role: &'static str,
    /// None: the default route.
    pub dst: Option<Cidr>,
    pub via: Ipv4Addr,
    pub dev: &'static str,
    pub onlink: bool,
}

/// A permanent ARP entry.
pub(super) struct Neigh {
    pub role: &'static str,
    pub dev: &'static str,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

/// A VXLAN forwarding entry: frames for `mac` go to the VTEP `dst`.
pub(super) struct Fdb {
    pub role: &'static str,
    pub dev: &'static str,
    pub mac: [u8; 6],
    pub dst: Ipv4Addr,
}

#[derive(Default)]
pub(super) struct Spec {
    /// Namespace roles; the full name is `prof-LAB-ROLE`.
    pub roles: Vec<&'static str>,
    pub pairs: Vec<[End; 2]>,
    pub bridges: Vec<Bridge>,
    pub children: Vec<Child>,
    pub tunnels: Vec<Tunnel>,
    pub ovs: Vec<OvsBridge>,
    pub routes: Vec<Route>,
    pub neighs: Vec<Neigh>,
    pub fdbs: Vec<Fdb>,
    /// Roles with net.ipv4.ip_forward=1.
    pub forwarding: Vec<&'static str>,
    /// A userspace datapath between devices of a host namespace.
    pub userspace: Option<Userspace>,
    /// The host roles whose pods' veths redirect in eBPF, to each other and towards the other
    /// host (redirect.rs).
    pub redirect: Vec<&'static str>,
    /// SR-IOV NICs and the VFs the pods own.
    pub pfs: Vec<Pf>,
    pub vfs: Vec<Vf>,
    pub client: Place,
    pub server: Place,
    /// Every pod's interface and its host's role, client and server first (a pod of the
    /// `host` topology is the host itself).
    pub pods: Vec<(Place, &'static str)>,
}

/// Pod roles and their veth peers' names: pods beyond the first two are named on from pod-c.
const POD_ROLES: [&str; 26] = [
    "pod-a", "pod-b", "pod-c", "pod-d", "pod-e", "pod-f", "pod-g", "pod-h", "pod-i", "pod-j",
    "pod-k", "pod-l", "pod-m", "pod-n", "pod-o", "pod-p", "pod-q", "pod-r", "pod-s", "pod-t",
    "pod-u", "pod-v", "pod-w", "pod-x", "pod-y", "pod-z",
];
const POD_PEERS: [&str; 26] = [
    "veth-a", "veth-b", "veth-c", "veth-d", "veth-e", "veth-f", "veth-g", "veth-h", "veth-i",
    "veth-j", "veth-k", "veth-l", "veth-m", "veth-n", "veth-o", "veth-p", "veth-q", "veth-r",
    "veth-s", "veth-t", "veth-u", "veth-v", "veth-w", "veth-x", "veth-y", "veth-z",
];
/// Most pods per host: the names above, over two hosts.
pub const MAX_PODS: u32 = 13;
/// Most pods of the node lab: its /24 pod subnet holds 253 beside the gateway; 250 is over
/// twice kubelet's default limit of 110 per node.
pub const NODE_MAX_PODS: u32 = 250;

impl Spec {
    /// The spec of a topology and placement, or why that combination does not exist.
    /// The topology with `pods` pods per host (None: its two pods).
    pub fn with_pods(
        topology: Topology,
        placement: Placement,
        mtu: Option<u32>,
        pods: Option<u32>,
    ) -> Result<Spec> {
        let mut spec = Spec::of(topology, placement, mtu)?;
        if let Some(n) = pods {
            add_pods(&mut spec, topology, placement, mtu, n)?;
        }
        Ok(spec)
    }

    /// The spec of a lab as `options` ask for it (placement, MTU, pods, second network).
    pub fn for_options(topology: Topology, options: &LabOptions) -> Result<Spec> {
        let mut spec = Spec::with_pods(topology, options.placement, options.mtu, options.pods)?;
        if let Some(net2) = options.net2 {
            spec.add_net2(topology, net2)?;
        }
        Ok(spec)
    }

    /// The lab with as many pods as it can have, and a second network where it can: every
    /// namespace a lab of this name may have made, for its removal.
    pub fn widest(topology: Topology, placement: Placement) -> Option<Spec> {
        let mut spec = Spec::with_pods(topology, placement, None, Some(MAX_PODS))
            .or_else(|_| Spec::of(topology, placement, None))
            .ok()?;
        // Every type of net1 adds the same namespaces (macvlan is refused only where the pods'
        // eth0 is a child of wire0 already, and then adds none).
        let _ = spec.add_net2(topology, Net2::Macvlan);
        Some(spec)
    }

    pub fn of(topology: Topology, placement: Placement, mtu: Option<u32>) -> Result<Spec> {
        use Placement::{CrossHost, SameHost};
        let mut spec = match (topology, placement) {
            (Topology::Veth, SameHost) => veth(mtu),
            (Topology::Bridge, SameHost) => bridge(mtu),
            (Topology::Bridge, CrossHost) => cni_cross_host(mtu, Overlay::HostGw),
            (Topology::FlannelVxlan, CrossHost) => cni_cross_host(mtu, Overlay::Vxlan),
            (Topology::Geneve, CrossHost) => cni_cross_host(mtu, Overlay::Geneve),
            (Topology::Host, CrossHost) => host(mtu),
            (Topology::Macvlan, p) => child_lab(ChildKind::Macvlan, p, mtu),
            (Topology::Vlan, CrossHost) => child_lab(ChildKind::Vlan(100), CrossHost, mtu),
            (Topology::IpvlanL2, p) => child_lab(ChildKind::IpvlanL2, p, mtu),
            (Topology::IpvlanL3, p) => child_lab(ChildKind::IpvlanL3, p, mtu),
            (Topology::OvsVlan, p) => ovs_lab(OvsUplink::Vlan, p, mtu),
            (Topology::OvsFlat, p) => ovs_lab(OvsUplink::Flat, p, mtu),
            (Topology::OvsVxlan, CrossHost) => {
                ovs_lab(OvsUplink::Tunnel(OvsTunnel::Vxlan), CrossHost, mtu)
            }
            (Topology::OvsGre, CrossHost) => {
                ovs_lab(OvsUplink::Tunnel(OvsTunnel::Gre), CrossHost, mtu)
            }
            (Topology::Dpdk, SameHost) => dpdk(mtu),
            (Topology::EbpfRedirect, SameHost) => ebpf_redirect(mtu),
            (Topology::EbpfRedirect, CrossHost) => ebpf_redirect_cross_host(mtu),
            (Topology::Sriov, p) => sriov(p, mtu),
            (Topology::Dpdk, CrossHost) => {
                return no_placement("dpdk is same-host (testpmd joins two pods of one host); use --placement same-host")
            }
            (Topology::Veth, CrossHost) => {
                return no_placement("veth connects two namespaces of one host; use --placement same-host")
            }
            (Topology::Host, SameHost) => {
                return no_placement("host needs --placement cross-host (client and server are two hosts)")
            }
            (Topology::FlannelVxlan | Topology::Geneve, SameHost) => {
                return no_placement(&format!(
                    "{} same-host would not cross the tunnel device; use --placement cross-host",
                    topology.name()
                ))
            }
            (Topology::Vlan, SameHost) => return no_placement("vlan needs --placement cross-host"),
            (t @ (Topology::Bmp2vmp | Topology::Vmp2vmp), _) => {
                bail!("{} is a nested lab (lab/nested.rs), not a spec", t.name())
            }
            (Topology::Node, _) => bail!("node is a lab of its own kind (lab/node.rs), not a spec"),
            (Topology::OvsVxlan | Topology::OvsGre, SameHost) => {
                return no_placement(&format!(
                    "{} same-host would not cross the tunnel port (it is ovs-vlan same-host); use --placement cross-host",
                    topology.name()
                ))
            }
        };
        // Which host a pod is on: all on one same-host, the first on host-a cross-host.
        let host_of = |at: Place| match placement {
            SameHost => "host",
            CrossHost if at == spec.client => "host-a",
            CrossHost => "host-b",
        };
        spec.pods = [spec.client, spec.server]
            .into_iter()
            .map(|at| (at, host_of(at)))
            .collect();
        Ok(spec)
    }

    pub fn ends(&self) -> impl Iterator<Item = &End> {
        self.pairs.iter().flatten()
    }

    /// Every place the spec creates a device at, OVS's own devices included.
    pub fn places(&self) -> Vec<Place> {
        let ovs = self
            .ovs
            .iter()
            .flat_map(|b| b.devices().into_iter().map(|(dev, _)| (b.role, dev)));
        self.ends()
            .map(|e| e.at)
            .chain(self.bridges.iter().map(|b| b.at))
            .chain(self.children.iter().map(|c| c.at))
            .chain(self.tunnels.iter().map(|t| t.at))
            .chain(self.vfs.iter().map(|v| v.at))
            .chain(ovs)
            .collect()
    }

    /// The address configured at `at`, if any.
    pub fn addr_of(&self, at: Place) -> Option<Cidr> {
        let ends = self.ends().filter(|e| e.at == at).filter_map(|e| e.addr);
        let bridges = self.bridges.iter().filter(|b| b.at == at).map(|b| b.addr);
        let children = self.children.iter().filter(|c| c.at == at).map(|c| c.addr);
        let tunnels = self.tunnels.iter().filter(|t| t.at == at).map(|t| t.addr);
        let vfs = self.vfs.iter().filter(|v| v.at == at).map(|v| v.addr);
        ends.chain(bridges)
            .chain(children)
            .chain(tunnels)
            .chain(vfs)
            .next()
    }

    /// The master netlink reports for the device at `at`: its bridge's, or the OVS
    /// datapath's for a kernel device that is an OVS port.
    /// The devices of host `role` whose ingress holds the ebpf-redirect program: its pods'
    /// host-side veths, and the devices it routes other hosts' pods through.
    pub fn redirect_ports(&self, role: &str) -> Vec<&'static str> {
        if !self.redirect.contains(&role) {
            return Vec::new();
        }
        let veths = (self.redirected_pods())
            .filter(|[_, veth]| veth.at.0 == role)
            .map(|[_, veth]| veth.at.1);
        let uplinks = (self.routes.iter())
            .filter(|r| r.role == role && r.dst.is_some())
            .map(|r| r.dev);
        let mut ports: Vec<&'static str> = veths.chain(uplinks).collect();
        ports.dedup();
        ports
    }

    /// The pods an ebpf-redirect program reaches, each with its host-side veth: an addressed
    /// end paired with an unaddressed one in a redirecting host.
    pub fn redirected_pods(&self) -> impl Iterator<Item = &[End; 2]> {
        self.pairs.iter().filter(|[pod, veth]| {
            pod.addr.is_some() && veth.addr.is_none() && self.redirect.contains(&veth.at.0)
        })
    }

    pub fn master_of(&self, at: Place) -> Option<&'static str> {
        let bridge = self.ends().find(|e| e.at == at).and_then(|e| e.master);
        let ovs = self
            .ovs
            .iter()
            .any(|b| b.role == at.0 && b.has_port_device(at.1));
        bridge.or(ovs.then_some(OVS_DATAPATH))
    }
}

/// What every lab namespace's name starts with.
pub(super) const NETNS_PREFIX: &str = "prof-";

pub(super) fn netns_name(lab: &str, role: &str) -> String {
    format!("{NETNS_PREFIX}{lab}-{role}")
}

/// A placement the topology has not: a lab that cannot be built as asked (compare and bench
/// skip it), not an error of the caller's.
fn no_placement<T>(why: &str) -> Result<T> {
    Err(CannotBuild::Placement(why.to_string()).into())
}

fn pod(role: &'static str, addr: Ipv4Addr, mtu: Option<u32>) -> End {
    End {
        at: (role, "eth0"),
        addr: Some((addr, 24)),
        master: None,
        mtu,
    }
}

fn port(role: &'static str, name: &'static str, master: &'static str, mtu: Option<u32>) -> End {
    End {
        at: (role, name),
        addr: None,
        master: Some(master),
        mtu,
    }
}

/// host-a wire0 <-> `b_role` wire0, with MTU `mtu` (None: Ethernet's, WIRE_MTU).
fn wire(b_role: &'static str, mtu: Option<u32>) -> [End; 2] {
    [
        End {
            at: ("host-a", "wire0"),
            addr: Some((WIRE_A, 24)),
            master: None,
            mtu,
        },
        End {
            at: (b_role, "wire0"),
            addr: Some((WIRE_B, 24)),
            master: None,
            mtu,
        },
    ]
}

fn veth(mtu: Option<u32>) -> Spec {
    Spec {
        roles: vec!["pod-a", "pod-b"],
        pairs: vec![[pod("pod-a", ip(0, 1), mtu), pod("pod-b", ip(0, 2), mtu)]],
        client: ("pod-a", "eth0"),
        server: ("pod-b", "eth0"),
        ..Spec::default()
    }
}

/// docker0 style: each pod's eth0 is paired with a port of a bridge in the host namespace.
fn bridge(mtu: Option<u32>) -> Spec {
    Spec {
        roles: vec!["pod-a", "pod-b", "host"],
        pairs: vec![
            [
                pod("pod-a", ip(0, 1), mtu),
                port("host", "veth-a", "br0", mtu),
            ],
            [
                pod("pod-b", ip(0, 2), mtu),
                port("host", "veth-b", "br0", mtu),
            ],
        ],
        bridges: vec![Bridge {
            at: ("host", "br0"),
            addr: (ip(0, 254), 24),
            mtu,
        }],
        client: ("pod-a", "eth0"),
        server: ("pod-b", "eth0"),
        ..Spec::default()
    }
}

/// Two pods of one host, each eth0 paired with a host-side veth that is neither bridged nor
/// addressed: what joins them is the topology's own (a tc program, a userspace datapath).
fn unbridged_pods(mtu: Option<u32>) -> Spec {
    Spec {
        roles: vec!["pod-a", "pod-b", "host"],
        pairs: vec![
            [
                pod("pod-a", ip(0, 1), mtu),
                port_of_nothing("host", "veth-a", mtu),
            ],
            [
                pod("pod-b", ip(0, 2), mtu),
                port_of_nothing("host", "veth-b", mtu),
            ],
        ],
        client: ("pod-a", "eth0"),
        server: ("pod-b", "eth0"),
        ..Spec::default()
    }
}

/// Cilium's datapath between two pods of one host: no bridge and no address on the host-side
/// veths; a tc program on each redirects what its pod sends to the other pod (redirect.rs).
fn ebpf_redirect(mtu: Option<u32>) -> Spec {
    Spec {
        redirect: vec!["host"],
        ..unbridged_pods(mtu)
    }
}

/// Cilium's native routing with eBPF host routing between two hosts: host-gw's addressing and
/// routes, without cni0. A pod's default route is a gateway that exists only as a neighbour
/// (Cilium's cilium_host address), at its veth's MAC; the tc program on that veth sends what
/// is for the other host's pods out of wire0 (`bpf_redirect_neigh`), and the one on wire0's
/// ingress hands it to the pod (`bpf_redirect_peer`).
fn ebpf_redirect_cross_host(mtu: Option<u32>) -> Spec {
    let mut spec = cni_cross_host(mtu, Overlay::HostGw);
    spec.bridges.clear();
    for [_, veth] in spec.pairs.iter_mut() {
        veth.master = None;
    }
    for route in spec.routes.iter_mut().filter(|r| r.dst.is_none()) {
        route.onlink = true;
    }
    // Nothing is forwarded by the hosts' stacks: the programs move every pod's packet.
    spec.forwarding.clear();
    spec.redirect = vec!["host-a", "host-b"];
    spec
}

/// Like `bridge`, with dpdk-testpmd in place of the bridge: the host-side veth ends are
/// unbridged and unaddressed ports of the userspace datapath.
fn dpdk(mtu: Option<u32>) -> Spec {
    Spec {
        userspace: Some(Userspace {
            role: "host",
            name: super::dpdk::PROGRAM,
            ports: ["veth-a", "veth-b"],
            pods: [("pod-a", "eth0"), ("pod-b", "eth0")],
        }),
        ..unbridged_pods(mtu)
    }
}

/// Each pod owns a VF of an SR-IOV NIC: same-host, two VFs of one PF, switched by the NIC
/// itself; cross-host, a VF of each host's PF, the two NICs joined by a wire (QEMU's hub).
fn sriov(placement: Placement, mtu: Option<u32>) -> Spec {
    let cross = placement == Placement::CrossHost;
    let (pfs, b_nic, b_vf) = if cross {
        (
            vec![
                Pf {
                    nic: 0,
                    role: "host-a",
                },
                Pf {
                    nic: 1,
                    role: "host-b",
                },
            ],
            1,
            0,
        )
    } else {
        (
            vec![Pf {
                nic: 0,
                role: "host",
            }],
            0,
            1,
        )
    };
    let vf = |nic, vf, role, d: u8| Vf {
        nic,
        vf,
        at: (role, "eth0"),
        addr: (ip(0, d), 24),
        mac: [0x02, 0xc6, 0x12, 0x0f, 0x00, d],
        mtu,
    };
    let mut roles = vec!["pod-a", "pod-b"];
    roles.extend(pfs.iter().map(|p| p.role));
    Spec {
        roles,
        pfs,
        vfs: vec![vf(0, 0, "pod-a", 1), vf(b_nic, b_vf, "pod-b", 2)],
        client: ("pod-a", "eth0"),
        server: ("pod-b", "eth0"),
        ..Spec::default()
    }
}

/// A veth end without address or master.
fn port_of_nothing(role: &'static str, name: &'static str, mtu: Option<u32>) -> End {
    End {
        at: (role, name),
        addr: None,
        master: None,
        mtu,
    }
}

/// The baseline: client in host-a, server in host-b, over the wire, no container network.
fn host(mtu: Option<u32>) -> Spec {
    Spec {
        roles: vec!["host-a", "host-b"],
        pairs: vec![wire("host-b", mtu)],
        client: ("host-a", "wire0"),
        server: ("host-b", "wire0"),
        ..Spec::default()
    }
}

/// How cni_cross_host joins the two hosts' pod subnets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Overlay {
    /// flannel host-gw: routes over the wire.
    HostGw,
    /// flannel's VXLAN device flannel.1, with its routes, neighbours and FDB entries.
    Vxlan,
    /// A Geneve device geneve0 per host, point to point to the other host's wire address
    /// (port 6081), routed like flannel.1 (route via the peer's device address, onlink, and
    /// a permanent neighbour for it); Geneve needs no FDB.
    Geneve,
}

/// Two hosts with a CNI bridge cni0 each (pod subnets 198.18.1.0/24 and 198.18.2.0/24),
/// joined by `overlay`.
fn cni_cross_host(mtu: Option<u32>, overlay: Overlay) -> Spec {
    let pod_mtu = match overlay {
        Overlay::HostGw => mtu,
        Overlay::Vxlan | Overlay::Geneve => Some(mtu.unwrap_or(FLANNEL_MTU)),
    };
    let mut spec = Spec {
        roles: vec!["pod-a", "pod-b", "host-a", "host-b"],
        pairs: vec![
            // The underlay's MTU is not the overlay's to choose: always Ethernet's 1500, so
            // that `--mtu 1500` on flannel-vxlan reproduces the mismatch flannel's 1450 avoids
            // (1500 + 50 bytes of VXLAN on a 1500 wire: the outer packets are fragmented).
            wire("host-b", None),
            [
                pod("pod-a", ip(1, 1), pod_mtu),
                port("host-a", "veth-a", "cni0", pod_mtu),
            ],
            [
                pod("pod-b", ip(2, 1), pod_mtu),
                port("host-b", "veth-b", "cni0", pod_mtu),
            ],
        ],
        bridges: vec![
            Bridge {
                at: ("host-a", "cni0"),
                addr: (ip(1, 254), 24),
                mtu: pod_mtu,
            },
            Bridge {
                at: ("host-b", "cni0"),
                addr: (ip(2, 254), 24),
                mtu: pod_mtu,
            },
        ],
        forwarding: vec!["host-a", "host-b"],
        client: ("pod-a", "eth0"),
        server: ("pod-b", "eth0"),
        ..Spec::default()
    };
    for (pod, gw) in [("pod-a", ip(1, 254)), ("pod-b", ip(2, 254))] {
        spec.routes.push(Route {
            role: pod,
            dst: None,
            via: gw,
            dev: "eth0",
            onlink: false,
        });
    }
    for (i, host) in CNI_HOSTS.iter().enumerate() {
        let peer = &CNI_HOSTS[1 - i];
        match overlay {
            Overlay::HostGw => spec.routes.push(Route {
                role: host.role,
                dst: Some((peer.net(), 24)),
                via: peer.wire,
                dev: "wire0",
                onlink: false,
            }),
            Overlay::Vxlan | Overlay::Geneve => add_overlay(
                &mut spec,
                overlay,
                host,
                peer,
                pod_mtu.unwrap_or(FLANNEL_MTU),
            ),
        }
    }
    spec
}

/// One host of cni_cross_host.
struct CniHost {
    role: &'static str,
    wire: Ipv4Addr,
    vtep_mac: [u8; 6],
    geneve_mac: [u8; 6],
    /// The pod subnet is 198.18.SUBNET.0/24.
    subnet: u8,
}

impl CniHost {
    fn net(&self) -> Ipv4Addr {
        ip(self.subnet, 0)
    }
}

const CNI_HOSTS: [CniHost; 2] = [
    CniHost {
        role: "host-a",
        wire: WIRE_A,
        vtep_mac: VTEP_MAC_A,
        geneve_mac: GENEVE_MAC_A,
        subnet: 1,
    },
    CniHost {
        role: "host-b",
        wire: WIRE_B,
        vtep_mac: VTEP_MAC_B,
        geneve_mac: GENEVE_MAC_B,
        subnet: 2,
    },
];

/// `host`'s tunnel device, addressed SUBNET.0/32 as flannel addresses flannel.1, and the
/// route to `peer`'s pods through it: via the peer device's address, onlink, with a
/// permanent neighbour entry for that address (and for VXLAN an FDB entry to the peer VTEP).
fn add_overlay(spec: &mut Spec, overlay: Overlay, host: &CniHost, peer: &CniHost, mtu: u32) {
    let (dev, kind, port, mac, peer_mac) = match overlay {
        Overlay::Geneve => (
            "geneve0",
            TunnelKind::Geneve { remote: peer.wire },
            6081,
            host.geneve_mac,
            peer.geneve_mac,
        ),
        _ => {
            let kind = TunnelKind::Vxlan {
                local: host.wire,
                // The kernel refuses a VXLAN MTU above its lower device's MTU minus the
                // overhead (vxlan_change_mtu: EINVAL), so a VTEP bound to wire0, as flannel
                // binds it, can never show the mismatch. An --mtu that does not fit the wire
                // gets an unbound VTEP (as Cilium's is): its 1550-byte outer packets are
                // routed to wire0 and fragmented there (no DF on VXLAN by default), and host-b
                // reassembles them. Geneve sets no DF either and is never bound.
                dev: (mtu + VXLAN_OVERHEAD <= WIRE_MTU).then_some("wire0"),
            };
            spec.fdbs.push(Fdb {
                role: host.role,
                dev: "flannel.1",
                mac: peer.vtep_mac,
                dst: peer.wire,
            });
            ("flannel.1", kind, 8472, host.vtep_mac, peer.vtep_mac)
        }
    };
    spec.tunnels.push(Tunnel {
        at: (host.role, dev),
        kind,
        vni: 1,
        port,
        mac,
        addr: (host.net(), 32),
        mtu,
    });
    spec.routes.push(Route {
        role: host.role,
        dst: Some((peer.net(), 24)),
        via: peer.net(),
        dev,
        onlink: true,
    });
    spec.neighs.push(Neigh {
        role: host.role,
        dev,
        ip: peer.net(),
        mac: peer_mac,
    });
}

/// The namespace holding the other end of a same-host lab's wire0 (the macvlan/ipvlan labs',
/// and any lab net1 adds a wire0 to).
const WIRE_PEER: &str = "wire-peer";

/// Pods whose eth0 is a macvlan/vlan/ipvlan child of a host's wire0, in one 198.18.0.0/24.
/// Same host: both on host-a's wire0, whose veth peer sits in namespace wire-peer.
/// ipvlan l3 cross-host: the pods' packets are routed by their parent's namespace, so each
/// host routes the other host's pod over the wire (ipvlan l3 children do no ARP, and their
/// connected /24 reaches the other pod through the parent).
fn child_lab(kind: ChildKind, placement: Placement, mtu: Option<u32>) -> Spec {
    let (b_role, b_host) = match placement {
        Placement::SameHost => (WIRE_PEER, "host-a"),
        Placement::CrossHost => ("host-b", "host-b"),
    };
    let child = |host: &'static str, pod: &'static str, addr| Child {
        kind,
        parent: (host, "wire0"),
        at: (pod, "eth0"),
        addr: (addr, 24),
        mtu,
    };
    let mut spec = Spec {
        roles: vec!["pod-a", "pod-b", "host-a", b_role],
        // The pods' devices are children of the wire: it must carry their MTU when larger.
        pairs: vec![wire(b_role, mtu.filter(|&m| m > 1500))],
        children: vec![
            child("host-a", "pod-a", ip(0, 1)),
            child(b_host, "pod-b", ip(0, 2)),
        ],
        client: ("pod-a", "eth0"),
        server: ("pod-b", "eth0"),
        ..Spec::default()
    };
    if matches!(kind, ChildKind::IpvlanL3) && placement == Placement::CrossHost {
        for (role, peer_pod, peer_wire) in [("host-a", 2, WIRE_B), ("host-b", 1, WIRE_A)] {
            spec.routes.push(Route {
                role,
                dst: Some((ip(0, peer_pod), 32)),
                via: peer_wire,
                dev: "wire0",
                onlink: false,
            });
        }
    }
    spec
}

/// Adds pods up to `n` per host: pod-c on, alternating between the hosts cross-host, wired
/// as the topology wires its first two. Topologies whose pods are wired one by one (routes per
/// pod, OVS ports) have their two pods only.
fn add_pods(
    spec: &mut Spec,
    topology: Topology,
    placement: Placement,
    mtu: Option<u32>,
    n: u32,
) -> Result<()> {
    if !(2..=MAX_PODS).contains(&n) {
        return Err(crate::error::bad_input(format!(
            "--pods must be between 2 and {MAX_PODS}, got {n}"
        )));
    }
    let hosts = match placement {
        Placement::SameHost => 1,
        Placement::CrossHost => 2,
    };
    let total = (n * hosts) as usize;
    let first = spec.pods.len();
    for k in first..total {
        let (role, peer) = (POD_ROLES[k], POD_PEERS[k]);
        let on_b = placement == Placement::CrossHost && k % 2 == 1;
        // The k-th pod's place on its host: 0 for pod-a and pod-b, 1 for pod-c and pod-d...
        let slot = if hosts == 2 { k / 2 } else { k } as u8;
        let host = spec.pods[usize::from(on_b)].1;
        match (topology, placement) {
            (Topology::Bridge, Placement::SameHost) => {
                spec.pairs.push([pod(role, ip(0, slot + 1), mtu), port("host", peer, "br0", mtu)]);
            }
            (Topology::EbpfRedirect, Placement::SameHost) => {
                spec.pairs.push([pod(role, ip(0, slot + 1), mtu), port_of_nothing("host", peer, mtu)]);
            }
            (Topology::EbpfRedirect, Placement::CrossHost) => {
                let h = &CNI_HOSTS[usize::from(on_b)];
                spec.pairs.push([pod(role, ip(h.subnet, slot + 1), mtu), port_of_nothing(h.role, peer, mtu)]);
                spec.routes.push(Route {
                    role,
                    dst: None,
                    via: ip(h.subnet, 254),
                    dev: "eth0",
                    onlink: true,
                });
            }
            (Topology::Bridge | Topology::FlannelVxlan | Topology::Geneve, Placement::CrossHost) => {
                let h = &CNI_HOSTS[usize::from(on_b)];
                let pod_mtu = spec.pairs[1 + usize::from(on_b)][0].mtu;
                spec.pairs.push([
                    pod(role, ip(h.subnet, slot + 1), pod_mtu),
                    port(h.role, peer, "cni0", pod_mtu),
                ]);
                spec.routes.push(Route {
                    role,
                    dst: None,
                    via: ip(h.subnet, 254),
                    dev: "eth0",
                    onlink: false,
                });
            }
            (Topology::Macvlan, _) => {
                let parent = spec.children[usize::from(on_b)].parent;
                spec.children.push(Child {
                    kind: ChildKind::Macvlan,
                    parent,
                    at: (role, "eth0"),
                    addr: (ip(0, k as u8 + 1), 24),
                    mtu,
                });
            }
            // Host networking: every pod of a host is the host itself.
            (Topology::Host, _) => {
                spec.pods.push((spec.pods[usize::from(on_b)].0, host));
                continue;
            }
            _ => bail!(
                "--pods is not supported by {} (bridge, flannel-vxlan, geneve, macvlan, ebpf-redirect and host have it)",
                topology.name()
            ),
        }
        spec.roles.push(role);
        spec.pods.push(((role, "eth0"), host));
    }
    Ok(())
}

/// A pod's second network (`--net2`), as Multus's macvlan, ipvlan and vlan plugins and Kuryr's
/// Multi-VIF give one: each pod's `net1`, a child of its host's wire0, in 198.18.200.0/24.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
#[clap(rename_all = "kebab-case")]
pub enum Net2 {
    Macvlan,
    /// ipvlan mode l2 (the VM lab: this machine's kernel has no ipvlan).
    IpvlanL2,
    /// 802.1Q, VLAN 200 (the VM lab: this machine's kernel has no 8021q).
    Vlan,
}

/// The second network's interface in every pod.
pub const NET2_IFNAME: &str = "net1";
/// The second network's subnet, 198.18.NET2_SUBNET.0/24, and its VLAN id as `--net2 vlan`.
const NET2_SUBNET: u8 = 200;
const NET2_VLAN: u16 = 200;

impl Net2 {
    /// As `--net2` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Net2::Macvlan => "macvlan",
            Net2::IpvlanL2 => "ipvlan-l2",
            Net2::Vlan => "vlan",
        }
    }

    fn kind(self) -> ChildKind {
        match self {
            Net2::Macvlan => ChildKind::Macvlan,
            Net2::IpvlanL2 => ChildKind::IpvlanL2,
            Net2::Vlan => ChildKind::Vlan(NET2_VLAN),
        }
    }
}

/// Whether the kernel lets both be children of one device: macvlan and ipvlan each take the
/// lower device's one rx_handler (as a bridge or OVS port does); 802.1Q does not.
fn share_a_parent(a: ChildKind, b: ChildKind) -> bool {
    matches!(a, ChildKind::Vlan(_)) || matches!(b, ChildKind::Vlan(_))
}

impl Spec {
    /// Gives every pod `net1` on a second network of type `net2`: a child of its host's wire0,
    /// or, on a same-host lab without one, of a wire0 added to the host (its other end in
    /// namespace wire-peer, as the same-host macvlan lab has it). net1 keeps its wire's MTU.
    pub fn add_net2(&mut self, topology: Topology, net2: Net2) -> Result<()> {
        let refuse =
            |why: String| crate::error::bad_input(format!("--net2 on {}: {why}", topology.name()));
        let kind = net2.kind();
        if let Some(eth0) = self.children.first().map(|c| c.kind) {
            if eth0.name() == kind.name() {
                return Err(refuse(format!(
                    "its pods' eth0 is {} already; net1 is a network of another type",
                    kind.name()
                )));
            }
            if !share_a_parent(eth0, kind) {
                return Err(refuse(format!(
                    "net1 would share wire0 with eth0's {}, and a device has one rx_handler \
                     (macvlan, ipvlan, bridge, OVS)",
                    eth0.name()
                )));
            }
        }
        let hosts: std::collections::HashSet<_> = self.pods.iter().map(|(_, h)| h).collect();
        if matches!(kind, ChildKind::Vlan(_)) && hosts.len() < self.pods.len() {
            return Err(refuse(
                "802.1Q gives a parent one device per VLAN, and pods share their host's wire0: \
                 --net2 vlan needs one pod per host (--placement cross-host)"
                    .into(),
            ));
        }
        if self.pods.iter().any(|(at, _)| at.1 != "eth0") {
            return Err(refuse(
                "its pods are the hosts, with no interface of their own".into(),
            ));
        }
        for (k, (pod, host)) in self.pods.clone().into_iter().enumerate() {
            let parent = (self.net2_parent(pod, host)).map_err(|why| refuse(why.into()))?;
            self.children.push(Child {
                kind,
                parent,
                at: (pod.0, NET2_IFNAME),
                addr: (ip(NET2_SUBNET, k as u8 + 1), 24),
                mtu: None,
            });
        }
        Ok(())
    }

    /// The device net1 of `pod` (on host role `host`) is a child of, adding a wire to a
    /// same-host lab's host if it has none; or why there can be none.
    fn net2_parent(&mut self, pod: Place, host: &'static str) -> Result<Place, &'static str> {
        // Pods whose eth0 is a child already (macvlan, ipvlan, vlan labs): the same wire0.
        let eth0 = self.children.iter().find(|c| c.at == pod).map(|c| c.parent);
        let wire = (host, "wire0");
        let parent = match eth0 {
            Some(parent) => parent,
            None if self.ends().any(|e| e.at == wire) => wire,
            // Same host: one wire0 for every pod (cross-host, each host has its own already).
            None if host == "host" && self.roles.contains(&host) => {
                self.roles.push(WIRE_PEER);
                self.pairs.push([
                    port_of_nothing(host, "wire0", None),
                    port_of_nothing(WIRE_PEER, "wire0", None),
                ]);
                wire
            }
            None => return Err("its pods have no host with a wire0 for net1"),
        };
        match self.master_of(parent) {
            Some(_) => Err(
                "its hosts' wire0 is a port of their switch (OVS), and a device has one rx_handler",
            ),
            None => Ok(parent),
        }
    }
}

/// Kuryr/Neutron's wiring: each pod's eth0 is paired with an access port (the network's
/// local VLAN, OVS_TAG) of its host's integration bridge br-int, one L2 198.18.0.0/24.
/// Same host: one br-int in namespace host. Cross-host, br-int reaches the other host
/// through wire0 as a trunk port of that VLAN (ovs-vlan: frames tagged on the wire), as an
/// access port of it (ovs-flat: untagged, as Neutron's FLAT provider network, whose flows strip
/// the local VLAN on the way to the physical bridge), or through a tunnel port to the other
/// host's wire address with a fixed key (ovs-vxlan, ovs-gre: wire0 belongs to the host's
/// stack, addressed there). Simplification: Neutron
/// splits tunnels off into br-tun, joined to br-int by patch ports, with flows that swap the
/// local VLAN for the tunnel key; here br-int's tunnel port is an access port of the VLAN
/// with that key. The kernel datapath executes the same: patch ports exist only in
/// ovs-vswitchd, which compiles both bridges' flows into one datapath flow.
fn ovs_lab(uplink: OvsUplink, placement: Placement, mtu: Option<u32>) -> Spec {
    let tunnel = match uplink {
        OvsUplink::Tunnel(t) => Some(t),
        OvsUplink::Vlan | OvsUplink::Flat => None,
    };
    let pod_mtu = match tunnel {
        Some(t) => Some(mtu.unwrap_or(t.pod_mtu())),
        None => mtu,
    };
    let (roles, hosts) = match placement {
        Placement::SameHost => (vec!["pod-a", "pod-b", "host"], ["host", "host"]),
        Placement::CrossHost => (
            vec!["pod-a", "pod-b", "host-a", "host-b"],
            ["host-a", "host-b"],
        ),
    };
    let host_end = |role, name| End {
        at: (role, name),
        addr: None,
        master: None,
        mtu: pod_mtu,
    };
    let mut spec = Spec {
        roles,
        pairs: vec![
            [
                pod("pod-a", ip(0, 1), pod_mtu),
                host_end(hosts[0], "veth-a"),
            ],
            [
                pod("pod-b", ip(0, 2), pod_mtu),
                host_end(hosts[1], "veth-b"),
            ],
        ],
        client: ("pod-a", "eth0"),
        server: ("pod-b", "eth0"),
        ..Spec::default()
    };
    let access = |name: &str| OvsPort {
        name: name.to_string(),
        kind: OvsPortKind::Access(OVS_TAG),
    };
    if placement == Placement::SameHost {
        spec.ovs.push(OvsBridge {
            role: "host",
            name: OVS_BRIDGE,
            ports: vec![access("veth-a"), access("veth-b")],
        });
        return spec;
    }
    let mut wire = wire("host-b", None);
    if tunnel.is_none() {
        // An OVS port: its frames never reach the host's stack, which needs no address there.
        // It carries the pods' frames, plus their tag, so it must carry their MTU when larger.
        for end in &mut wire {
            end.addr = None;
            end.mtu = mtu.filter(|&m| m > WIRE_MTU);
        }
    }
    spec.pairs.insert(0, wire);
    for (role, veth, local, remote) in [
        ("host-a", "veth-a", WIRE_A, WIRE_B),
        ("host-b", "veth-b", WIRE_B, WIRE_A),
    ] {
        let uplink = match uplink {
            OvsUplink::Vlan => OvsPort {
                name: "wire0".into(),
                kind: OvsPortKind::Trunk(OVS_TAG),
            },
            OvsUplink::Flat => access("wire0"),
            // Named as Neutron names tunnel ports: type and the remote address in hex.
            OvsUplink::Tunnel(encap) => OvsPort {
                name: format!("{}-{:08x}", encap.ovs_type(), u32::from(remote)),
                kind: OvsPortKind::Tunnel {
                    encap,
                    local,
                    remote,
                    key: OVS_KEY,
                    tag: OVS_TAG,
                },
            },
        };
        spec.ovs.push(OvsBridge {
            role,
            name: OVS_BRIDGE,
            ports: vec![access(veth), uplink],
        });
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_spec() -> Vec<(Topology, Placement, Spec)> {
        let mut specs = Vec::new();
        for topology in Topology::ALL {
            for placement in [Placement::SameHost, Placement::CrossHost] {
                if let Ok(spec) = Spec::of(topology, placement, None) {
                    specs.push((topology, placement, spec));
                }
                if let Ok(spec) = Spec::with_pods(topology, placement, None, Some(5)) {
                    assert_eq!(spec.pods.len(), 5 * (placement as usize + 1));
                    specs.push((topology, placement, spec));
                }
                for net2 in [Net2::Macvlan, Net2::IpvlanL2, Net2::Vlan] {
                    let Ok(mut spec) = Spec::of(topology, placement, None) else {
                        continue;
                    };
                    if spec.add_net2(topology, net2).is_ok() {
                        specs.push((topology, placement, spec));
                    }
                }
            }
        }
        specs
    }

    /// Every place a spec names must be a device the spec creates, in a namespace it creates.
    #[test]
    fn specs_are_self_consistent() {
        for (topology, placement, spec) in every_spec() {
            let ctx = format!("{topology:?} {placement:?}");
            let places = spec.places();
            for at in &places {
                assert!(spec.roles.contains(&at.0), "{ctx}: {at:?}");
            }
            let unique: std::collections::HashSet<_> = places.iter().collect();
            assert_eq!(unique.len(), places.len(), "{ctx}");
            for c in &spec.children {
                assert!(places.contains(&c.parent), "{ctx}");
            }
            for r in &spec.routes {
                assert!(places.contains(&(r.role, r.dev)), "{ctx}");
            }
            if let Some(u) = &spec.userspace {
                let ports = u.ports.iter().map(|p| (u.role, *p));
                for at in ports.chain(u.pods) {
                    assert!(places.contains(&at), "{ctx}: {at:?}");
                }
            }
            for t in &spec.tunnels {
                if let Some(dev) = t.dev() {
                    assert!(places.contains(&(t.at.0, dev)), "{ctx}");
                }
            }
            let ovs_roles: std::collections::HashSet<_> = spec.ovs.iter().map(|b| b.role).collect();
            assert_eq!(
                ovs_roles.len(),
                spec.ovs.len(),
                "{ctx}: one OVS per namespace"
            );
            for b in &spec.ovs {
                for p in &b.ports {
                    if !matches!(p.kind, OvsPortKind::Tunnel { .. }) {
                        let at = (b.role, p.name.as_str());
                        assert!(places.iter().any(|&(r, n)| (r, n) == at), "{ctx}: {at:?}");
                        // OVS takes every frame of its ports: an address there is unreachable.
                        let mut ends = spec.ends().filter(|e| (e.at.0, e.at.1) == at);
                        assert!(ends.all(|e| e.addr.is_none()), "{ctx}: {at:?}");
                    }
                }
            }
            assert!(spec.addr_of(spec.client).is_some() && spec.addr_of(spec.server).is_some());
        }
    }

    /// Pods in 198.18.0.0/16, wires in 198.19.0.0/24: every address a spec configures or
    /// sends to.
    #[test]
    fn every_address_is_in_the_benchmarking_range() {
        let in_range = |a: Ipv4Addr| {
            let o = a.octets();
            o[..2] == [198, 18] || o[..3] == [198, 19, 0]
        };
        for (topology, placement, spec) in every_spec() {
            let mut addrs: Vec<Ipv4Addr> = spec
                .places()
                .into_iter()
                .filter_map(|at| spec.addr_of(at).map(|(a, _)| a))
                .collect();
            addrs.extend(
                spec.routes
                    .iter()
                    .flat_map(|r| [Some(r.via), r.dst.map(|d| d.0)])
                    .flatten(),
            );
            addrs.extend(spec.neighs.iter().map(|n| n.ip));
            addrs.extend(spec.fdbs.iter().map(|f| f.dst));
            for t in &spec.tunnels {
                addrs.push(match t.kind {
                    TunnelKind::Vxlan { local, .. } => local,
                    TunnelKind::Geneve { remote } => remote,
                });
            }
            for p in spec.ovs.iter().flat_map(|b| &b.ports) {
                if let OvsPortKind::Tunnel { local, remote, .. } = p.kind {
                    addrs.extend([local, remote]);
                }
            }
            for a in addrs {
                assert!(in_range(a), "{topology:?} {placement:?}: {a}");
            }
        }
    }

    /// Tunnel endpoints are the wire's addresses, each host pointing at the other.
    #[test]
    fn tunnels_join_the_two_wire_addresses() {
        for (topology, _, spec) in every_spec() {
            for t in &spec.tunnels {
                let (local, remote) = if t.at.0 == "host-a" {
                    (WIRE_A, WIRE_B)
                } else {
                    (WIRE_B, WIRE_A)
                };
                match t.kind {
                    TunnelKind::Vxlan { local: l, .. } => assert_eq!(l, local, "{topology:?}"),
                    TunnelKind::Geneve { remote: r } => assert_eq!(r, remote, "{topology:?}"),
                }
            }
            for b in &spec.ovs {
                for p in &b.ports {
                    if let OvsPortKind::Tunnel { local, remote, .. } = p.kind {
                        let want = if b.role == "host-a" {
                            (WIRE_A, WIRE_B)
                        } else {
                            (WIRE_B, WIRE_A)
                        };
                        assert_eq!((local, remote), want, "{topology:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn ovs_labs_are_wired_as_neutron_wires_them() {
        let spec = Spec::of(Topology::OvsVxlan, Placement::CrossHost, None).unwrap();
        let b = &spec.ovs[0];
        assert_eq!((b.role, b.name), ("host-a", "br-int"));
        assert_eq!(b.ports[1].name, "vxlan-c6130002");
        assert_eq!(
            b.devices(),
            [
                ("ovs-system", "openvswitch"),
                ("br-int", "openvswitch"),
                ("vxlan_sys_4789", "vxlan")
            ]
        );
        assert_eq!(spec.master_of(("host-a", "veth-a")), Some("ovs-system"));
        assert_eq!(
            spec.master_of(("host-a", "vxlan_sys_4789")),
            Some("ovs-system")
        );
        assert_eq!(spec.master_of(("host-a", "br-int")), None);
        assert_eq!(spec.addr_of(("host-a", "wire0")), Some((WIRE_A, 24)));
        assert_eq!(spec.ends().next().unwrap().at, ("host-a", "wire0"));
        // Neutron's MTUs: 1500 less the tunnel's overhead.
        assert_eq!(
            spec.ends().find(|e| e.at.0 == "pod-a").unwrap().mtu,
            Some(1450)
        );
        let gre = Spec::of(Topology::OvsGre, Placement::CrossHost, None).unwrap();
        assert_eq!(
            gre.ends().find(|e| e.at.0 == "pod-a").unwrap().mtu,
            Some(1458)
        );
        assert_eq!(gre.ovs[1].ports[1].name, "gre-c6130001");
        let vlan = Spec::of(Topology::OvsVlan, Placement::CrossHost, None).unwrap();
        assert!(matches!(vlan.ovs[0].ports[1].kind, OvsPortKind::Trunk(100)));
        assert_eq!(vlan.addr_of(("host-a", "wire0")), None);
        assert_eq!(vlan.master_of(("host-b", "wire0")), Some("ovs-system"));
        let same = Spec::of(Topology::OvsVlan, Placement::SameHost, None).unwrap();
        assert_eq!(same.ovs.len(), 1);
        assert_eq!(same.ovs[0].ports.len(), 2);
        // FLAT: the same wiring, the uplink untagged.
        let flat = Spec::of(Topology::OvsFlat, Placement::CrossHost, None).unwrap();
        for b in &flat.ovs {
            assert_eq!(b.ports[1].name, "wire0");
            assert!(matches!(b.ports[1].kind, OvsPortKind::Access(100)));
        }
        assert_eq!(flat.addr_of(("host-a", "wire0")), None);
        let same_flat = Spec::of(Topology::OvsFlat, Placement::SameHost, None).unwrap();
        assert_eq!(same_flat.ovs[0].ports.len(), 2);
    }

    #[test]
    fn ebpf_redirect_ports_are_the_pods_veths_and_the_uplink() {
        let same = Spec::of(Topology::EbpfRedirect, Placement::SameHost, None).unwrap();
        assert_eq!(same.redirect_ports("host"), ["veth-a", "veth-b"]);
        let cross = Spec::with_pods(Topology::EbpfRedirect, Placement::CrossHost, None, Some(2));
        let cross = cross.unwrap();
        assert_eq!(
            cross.redirect_ports("host-a"),
            ["veth-a", "veth-c", "wire0"]
        );
        assert_eq!(
            cross.redirect_ports("host-b"),
            ["veth-b", "veth-d", "wire0"]
        );
        assert!(cross.redirect_ports("pod-a").is_empty());
        // No bridge and no forwarding: the programs alone join the pods.
        assert!(cross.bridges.is_empty() && cross.forwarding.is_empty());
        let bridge = Spec::of(Topology::Bridge, Placement::CrossHost, None).unwrap();
        assert!(bridge.redirect_ports("host-a").is_empty());
    }

    /// net1 is a child of the wire0 of each pod's host, in its own subnet, the pods' eth0
    /// untouched; a same-host lab gets a wire0 of its own, whose peer namespace goes with it.
    #[test]
    fn a_second_network_hangs_from_each_hosts_wire0() {
        let options = |net2, placement| LabOptions {
            net2: Some(net2),
            placement,
            ..LabOptions::default()
        };
        let xhost = options(Net2::Macvlan, Placement::CrossHost);
        let spec = Spec::for_options(Topology::FlannelVxlan, &xhost).unwrap();
        let net1: Vec<_> = spec.children.iter().map(|c| (c.at, c.parent)).collect();
        assert_eq!(
            net1,
            [
                (("pod-a", "net1"), ("host-a", "wire0")),
                (("pod-b", "net1"), ("host-b", "wire0"))
            ]
        );
        assert_eq!(spec.addr_of(("pod-b", "net1")), Some((ip(200, 2), 24)));
        assert_eq!(spec.addr_of(("pod-b", "eth0")), Some((ip(2, 1), 24)));
        assert_eq!(spec.client, ("pod-a", "eth0"));
        let same = options(Net2::Macvlan, Placement::SameHost);
        let bridge = Spec::for_options(Topology::Bridge, &same).unwrap();
        assert!(bridge.roles.contains(&"wire-peer"));
        assert!(bridge.ends().any(|e| e.at == ("host", "wire0")));
        let widest = Spec::widest(Topology::Bridge, Placement::SameHost).unwrap();
        assert!(widest.roles.contains(&"wire-peer"), "lab down must find it");
        // macvlan eth0 on wire0: vlan may share it, ipvlan may not (one rx_handler).
        let vlan = options(Net2::Vlan, Placement::CrossHost);
        let on_macvlan = Spec::for_options(Topology::Macvlan, &vlan).unwrap();
        assert_eq!(on_macvlan.children[2].parent, ("host-a", "wire0"));
        for (topology, net2, placement, why) in [
            (
                Topology::Macvlan,
                Net2::Macvlan,
                Placement::CrossHost,
                "eth0 is macvlan already",
            ),
            (
                Topology::Macvlan,
                Net2::IpvlanL2,
                Placement::CrossHost,
                "one rx_handler",
            ),
            (
                Topology::OvsVlan,
                Net2::Macvlan,
                Placement::CrossHost,
                "port of their switch",
            ),
            (
                Topology::Bridge,
                Net2::Vlan,
                Placement::SameHost,
                "one pod per host",
            ),
            (
                Topology::Host,
                Net2::Macvlan,
                Placement::CrossHost,
                "pods are the hosts",
            ),
            (
                Topology::Veth,
                Net2::Macvlan,
                Placement::SameHost,
                "no host with a wire0",
            ),
        ] {
            let e = Spec::for_options(topology, &options(net2, placement));
            let e = e.map(|_| ()).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("--net2 on {}: ", topology.name())),
                "{e}"
            );
            assert!(e.contains(why), "{topology:?} {net2:?}: {e}");
        }
    }

    #[test]
    fn unsupported_placements_say_why() {
        for (t, p) in [
            (Topology::OvsVxlan, Placement::SameHost),
            (Topology::OvsGre, Placement::SameHost),
            (Topology::Geneve, Placement::SameHost),
        ] {
            let e = Spec::of(t, p, None).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains("use --placement cross-host"), "{e}");
            assert!(e.starts_with(t.name()), "{e}");
        }
    }
}
