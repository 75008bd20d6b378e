//! What each topology is made of, as plain data; setup.rs turns it into devices.
use std::net::Ipv4Addr;

use anyhow::{bail, Result};

use super::{Placement, Topology};

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
const FLANNEL_MTU: u32 = 1450;
const VXLAN_OVERHEAD: u32 = 50;
const WIRE_MTU: u32 = 1500;

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
}

/// A macvlan/vlan device on `parent`, created in the parent's namespace and moved to `at`.
pub(super) struct Child {
    pub kind: ChildKind,
    pub parent: Place,
    pub at: Place,
    pub addr: Cidr,
    pub mtu: Option<u32>,
}

pub(super) struct Vxlan {
    pub at: Place,
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
    /// The underlay device, in the same namespace, the VTEP is bound to (flannel binds it).
    /// None: unbound, the outer packets leave wherever the route to the peer VTEP says.
    pub dev: Option<&'static str>,
    pub mac: [u8; 6],
    pub addr: Cidr,
    pub mtu: u32,
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
    pub vxlans: Vec<Vxlan>,
    pub routes: Vec<Route>,
    pub neighs: Vec<Neigh>,
    pub fdbs: Vec<Fdb>,
    /// Roles with net.ipv4.ip_forward=1.
    pub forwarding: Vec<&'static str>,
    pub client: Place,
    pub server: Place,
}

impl Spec {
    /// The spec of a topology and placement, or why that combination does not exist.
    pub fn of(topology: Topology, placement: Placement, mtu: Option<u32>) -> Result<Spec> {
        use Placement::{CrossHost, SameHost};
        Ok(match (topology, placement) {
            (Topology::Veth, SameHost) => veth(mtu),
            (Topology::Bridge, SameHost) => bridge(mtu),
            (Topology::Bridge, CrossHost) => cni_cross_host(mtu, false),
            (Topology::FlannelVxlan, CrossHost) => cni_cross_host(mtu, true),
            (Topology::Host, CrossHost) => host(mtu),
            (Topology::Macvlan, p) => child_lab(ChildKind::Macvlan, p, mtu),
            (Topology::Vlan, CrossHost) => child_lab(ChildKind::Vlan(100), CrossHost, mtu),
            (Topology::Veth, CrossHost) => {
                bail!("veth connects two namespaces of one host; use --placement same-host")
            }
            (Topology::Host, SameHost) => {
                bail!("host needs --placement cross-host (client and server are two hosts)")
            }
            (Topology::FlannelVxlan, SameHost) => bail!(
                "flannel-vxlan same-host would not cross the vxlan device; use --placement cross-host"
            ),
            (Topology::Vlan, SameHost) => bail!("vlan needs --placement cross-host"),
        })
    }

    pub fn ends(&self) -> impl Iterator<Item = &End> {
        self.pairs.iter().flatten()
    }

    /// Every place the spec creates a device at.
    pub fn places(&self) -> Vec<Place> {
        self.ends()
            .map(|e| e.at)
            .chain(self.bridges.iter().map(|b| b.at))
            .chain(self.children.iter().map(|c| c.at))
            .chain(self.vxlans.iter().map(|v| v.at))
            .collect()
    }

    /// The address configured at `at`, if any.
    pub fn addr_of(&self, at: Place) -> Option<Cidr> {
        let ends = self.ends().filter(|e| e.at == at).filter_map(|e| e.addr);
        let bridges = self.bridges.iter().filter(|b| b.at == at).map(|b| b.addr);
        let children = self.children.iter().filter(|c| c.at == at).map(|c| c.addr);
        let vxlans = self.vxlans.iter().filter(|v| v.at == at).map(|v| v.addr);
        ends.chain(bridges).chain(children).chain(vxlans).next()
    }
}

pub(super) fn netns_name(lab: &str, role: &str) -> String {
    format!("prof-{lab}-{role}")
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

/// Two hosts with a CNI bridge cni0 each (pod subnets 198.18.1.0/24 and 198.18.2.0/24),
/// joined either by host-gw routes over the wire or, `vxlan`, by flannel's flannel.1 devices.
fn cni_cross_host(mtu: Option<u32>, vxlan: bool) -> Spec {
    let pod_mtu = if vxlan {
        Some(mtu.unwrap_or(FLANNEL_MTU))
    } else {
        mtu
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
    let hosts = [
        ("host-a", WIRE_A, VTEP_MAC_A, 1u8),
        ("host-b", WIRE_B, VTEP_MAC_B, 2u8),
    ];
    for (i, &(role, wire_ip, mac, subnet)) in hosts.iter().enumerate() {
        let (_, peer_wire, peer_mac, peer_subnet) = hosts[1 - i];
        let peer_net = ip(peer_subnet, 0);
        if !vxlan {
            spec.routes.push(Route {
                role,
                dst: Some((peer_net, 24)),
                via: peer_wire,
                dev: "wire0",
                onlink: false,
            });
            continue;
        }
        let vtep_mtu = pod_mtu.unwrap_or(FLANNEL_MTU);
        spec.vxlans.push(Vxlan {
            at: (role, "flannel.1"),
            vni: 1,
            port: 8472,
            local: wire_ip,
            // The kernel refuses a VXLAN MTU above its lower device's MTU minus the overhead
            // (vxlan_change_mtu: EINVAL), so a VTEP bound to wire0, as flannel binds it, can
            // never show the mismatch. An --mtu that does not fit the wire gets an unbound
            // VTEP (as Cilium's is): its 1550-byte outer packets are routed to wire0 and
            // fragmented there (no DF on VXLAN by default), and host-b reassembles them.
            dev: (vtep_mtu + VXLAN_OVERHEAD <= WIRE_MTU).then_some("wire0"),
            mac,
            addr: (ip(subnet, 0), 32),
            mtu: vtep_mtu,
        });
        spec.routes.push(Route {
            role,
            dst: Some((peer_net, 24)),
            via: peer_net,
            dev: "flannel.1",
            onlink: true,
        });
        spec.neighs.push(Neigh {
            role,
            dev: "flannel.1",
            ip: peer_net,
            mac: peer_mac,
        });
        spec.fdbs.push(Fdb {
            role,
            dev: "flannel.1",
            mac: peer_mac,
            dst: peer_wire,
        });
    }
    spec
}

/// Pods whose eth0 is a macvlan/vlan child of a host's wire0, in one L2 198.18.0.0/24.
/// Same host: both on host-a's wire0, whose veth peer sits in namespace wire-peer.
fn child_lab(kind: ChildKind, placement: Placement, mtu: Option<u32>) -> Spec {
    let (b_role, b_host) = match placement {
        Placement::SameHost => ("wire-peer", "host-a"),
        Placement::CrossHost => ("host-b", "host-b"),
    };
    let child = |host: &'static str, pod: &'static str, addr| Child {
        kind,
        parent: (host, "wire0"),
        at: (pod, "eth0"),
        addr: (addr, 24),
        mtu,
    };
    Spec {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every place a spec names must be a device the spec creates, in a namespace it creates.
    #[test]
    fn specs_are_self_consistent() {
        for topology in Topology::ALL {
            for placement in [Placement::SameHost, Placement::CrossHost] {
                let Ok(spec) = Spec::of(topology, placement, None) else {
                    continue;
                };
                let places = spec.places();
                for at in &places {
                    assert!(spec.roles.contains(&at.0), "{topology:?}: {at:?}");
                }
                let unique: std::collections::HashSet<_> = places.iter().collect();
                assert_eq!(unique.len(), places.len(), "{topology:?}");
                for c in &spec.children {
                    assert!(places.contains(&c.parent), "{topology:?}");
                }
                for r in &spec.routes {
                    assert!(places.contains(&(r.role, r.dev)), "{topology:?}");
                }
                assert!(spec.addr_of(spec.client).is_some() && spec.addr_of(spec.server).is_some());
            }
        }
    }

    #[test]
    fn every_address_is_in_the_benchmarking_range() {
        for topology in Topology::ALL {
            for placement in [Placement::SameHost, Placement::CrossHost] {
                let Ok(spec) = Spec::of(topology, placement, None) else {
                    continue;
                };
                for at in spec.places() {
                    if let Some((a, _)) = spec.addr_of(at) {
                        assert_eq!(a.octets()[..2], [198, a.octets()[1]]);
                        assert!(matches!(a.octets()[1], 18 | 19), "{a}");
                    }
                }
            }
        }
    }
}
