//! What each topology is made of, as plain data; build.rs turns it into devices.
use std::net::Ipv4Addr;

use super::Topology;

/// Every lab address is in 198.18.0.0/24 (RFC 2544 benchmarking range), on our own devices.
pub(super) const PREFIX_LEN: u8 = 24;
const POD_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const POD_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

/// An interface by namespace role ("pod-a") and final name.
pub(super) type Place = (&'static str, &'static str);

/// One end of a veth pair.
pub(super) struct End {
    pub at: Place,
    pub addr: Option<Ipv4Addr>,
    pub master: Option<&'static str>,
}

pub(super) struct Bridge {
    pub at: Place,
    pub addr: Ipv4Addr,
}

pub(super) struct Spec {
    /// Namespace roles; the full name is `prof-LAB-ROLE`.
    pub roles: &'static [&'static str],
    pub pairs: Vec<[End; 2]>,
    pub bridge: Option<Bridge>,
    pub client: Place,
    pub server: Place,
    /// Request-direction crossings as (tx, rx).
    pub path: Vec<(Place, Place)>,
}

impl Spec {
    pub fn of(topology: Topology) -> Spec {
        match topology {
            Topology::Veth => veth(),
            Topology::Bridge => bridge(),
        }
    }

    pub fn ends(&self) -> impl Iterator<Item = &End> {
        self.pairs.iter().flatten()
    }

    /// The address configured on the veth end at `at`, if any.
    pub fn addr_of(&self, at: Place) -> Option<Ipv4Addr> {
        self.ends().find(|e| e.at == at).and_then(|e| e.addr)
    }
}

pub(super) fn netns_name(lab: &str, role: &str) -> String {
    format!("prof-{lab}-{role}")
}

fn pod(role: &'static str, addr: Ipv4Addr) -> End {
    End {
        at: (role, "eth0"),
        addr: Some(addr),
        master: None,
    }
}

fn port(name: &'static str) -> End {
    End {
        at: ("host", name),
        addr: None,
        master: Some("br0"),
    }
}

fn veth() -> Spec {
    Spec {
        roles: &["pod-a", "pod-b"],
        pairs: vec![[pod("pod-a", POD_A), pod("pod-b", POD_B)]],
        bridge: None,
        client: ("pod-a", "eth0"),
        server: ("pod-b", "eth0"),
        path: vec![(("pod-a", "eth0"), ("pod-b", "eth0"))],
    }
}

/// docker0 style: each pod's eth0 is paired with a port of a bridge in the host namespace.
fn bridge() -> Spec {
    Spec {
        roles: &["pod-a", "pod-b", "host"],
        pairs: vec![
            [pod("pod-a", POD_A), port("veth-a")],
            [pod("pod-b", POD_B), port("veth-b")],
        ],
        bridge: Some(Bridge {
            at: ("host", "br0"),
            addr: GATEWAY,
        }),
        client: ("pod-a", "eth0"),
        server: ("pod-b", "eth0"),
        path: vec![
            (("pod-a", "eth0"), ("host", "veth-a")),
            (("host", "veth-b"), ("pod-b", "eth0")),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every place a spec names must be a device the spec creates, in a namespace it creates.
    #[test]
    fn specs_are_self_consistent() {
        for topology in [Topology::Veth, Topology::Bridge] {
            let spec = Spec::of(topology);
            let bridge = spec.bridge.as_ref().map(|b| b.at);
            let known = |at: Place| spec.ends().any(|e| e.at == at) || bridge == Some(at);
            for at in spec.ends().map(|e| e.at).chain(bridge) {
                assert!(spec.roles.contains(&at.0), "{topology:?}: {at:?}");
            }
            for (tx, rx) in &spec.path {
                assert!(known(*tx) && known(*rx), "{topology:?}: {tx:?} -> {rx:?}");
            }
            assert!(spec.addr_of(spec.client).is_some() && spec.addr_of(spec.server).is_some());
        }
    }
}
