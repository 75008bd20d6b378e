//! Lab topologies: network namespaces wired like container networks, built through netlink,
//! for the profiler to measure. One lab per topology at a time, named after it.
//!
//! Addresses are in 198.18.0.0/24 on our own devices only; traffic never leaves the lab.
use std::net::Ipv4Addr;

use anyhow::{bail, Result};

use crate::netns;

mod nl;
mod setup;
mod spec;
mod state;

pub use state::STATE_DIR;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    Veth,
    Bridge,
}

impl Topology {
    /// The name of this topology's lab.
    pub fn name(self) -> &'static str {
        match self {
            Topology::Veth => "veth",
            Topology::Bridge => "bridge",
        }
    }

    fn from_name(name: &str) -> Option<Topology> {
        [Topology::Veth, Topology::Bridge]
            .into_iter()
            .find(|t| t.name() == name)
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Lab {
    /// "veth" or "bridge" (one lab per topology at a time).
    pub name: String,
    pub topology: Topology,
    /// Full netns names, e.g. "prof-bridge-pod-a".
    pub namespaces: Vec<String>,
    pub interfaces: Vec<LabIface>,
    /// pod-a
    pub client: Endpoint,
    /// pod-b
    pub server: Endpoint,
    /// Device crossings of the request direction (client -> server), in order. The response
    /// crosses them in reverse with tx/rx swapped.
    pub path: Vec<Crossing>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IfRef {
    pub netns: String,
    pub ifname: String,
    pub ifindex: u32,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LabIface {
    pub netns: String,
    pub ifname: String,
    pub ifindex: u32,
    /// "veth" | "bridge"
    pub kind: String,
    /// CIDR
    pub addrs: Vec<String>,
    pub peer: Option<IfRef>,
    pub master: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    pub netns: String,
    pub ifname: String,
    pub addr: Ipv4Addr,
}

/// One hop across a link: the packet leaves `tx` and arrives on `rx` (a veth pair's two ends).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Crossing {
    pub tx: IfRef,
    pub rx: IfRef,
    /// "veth"
    pub link: String,
}

/// Builds the lab of `topology`. On failure, everything created so far is removed again.
pub async fn up(topology: Topology) -> Result<Lab> {
    let name = topology.name();
    let spec = spec::Spec::of(topology);
    let namespaces = spec.roles.iter().map(|role| spec::netns_name(name, role));
    if state::path(name).exists() || namespaces.into_iter().any(|ns| netns::exists(&ns)) {
        bail!("lab {name} is already up (profiler lab down {name})");
    }
    let mut undo = setup::Undo::default();
    let built = match setup::build(topology, &spec, &mut undo).await {
        Ok(lab) => state::save(&lab).map(|()| lab),
        Err(e) => Err(e),
    };
    if built.is_err() {
        undo.run().await;
    }
    built
}

/// Removes the lab's namespaces (and with them its devices) and its state file. Works on
/// whatever part of a lab exists, e.g. after a crash.
pub async fn down(name: &str) -> Result<()> {
    let Some(topology) = Topology::from_name(name) else {
        bail!("no lab named {name} is up");
    };
    let spec = spec::Spec::of(topology);
    let namespaces: Vec<String> = spec
        .roles
        .iter()
        .map(|role| spec::netns_name(name, role))
        .collect();
    if !state::path(name).exists() && !namespaces.iter().any(|ns| netns::exists(ns)) {
        bail!("no lab named {name} is up");
    }
    for ns in &namespaces {
        netns::delete(ns)?;
    }
    state::remove(name)
}

/// The labs that are up, from their state files.
pub fn list() -> Result<Vec<Lab>> {
    let mut labs = Vec::new();
    for name in state::names()? {
        labs.extend(state::load(&name)?);
    }
    Ok(labs)
}

pub fn get(name: &str) -> Result<Option<Lab>> {
    state::load(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Lab {
        let r = |netns: &str, ifname: &str, ifindex| IfRef {
            netns: netns.into(),
            ifname: ifname.into(),
            ifindex,
        };
        Lab {
            name: "veth".into(),
            topology: Topology::Veth,
            namespaces: vec!["prof-veth-pod-a".into(), "prof-veth-pod-b".into()],
            interfaces: vec![LabIface {
                netns: "prof-veth-pod-a".into(),
                ifname: "eth0".into(),
                ifindex: 7,
                kind: "veth".into(),
                addrs: vec!["198.18.0.1/24".into()],
                peer: Some(r("prof-veth-pod-b", "eth0", 8)),
                master: None,
            }],
            client: Endpoint {
                netns: "prof-veth-pod-a".into(),
                ifname: "eth0".into(),
                addr: Ipv4Addr::new(198, 18, 0, 1),
            },
            server: Endpoint {
                netns: "prof-veth-pod-b".into(),
                ifname: "eth0".into(),
                addr: Ipv4Addr::new(198, 18, 0, 2),
            },
            path: vec![Crossing {
                tx: r("prof-veth-pod-a", "eth0", 7),
                rx: r("prof-veth-pod-b", "eth0", 8),
                link: "veth".into(),
            }],
        }
    }

    #[test]
    fn state_json_round_trips() -> Result<()> {
        let lab = sample();
        let json = serde_json::to_string(&lab)?;
        assert!(json.contains(r#""topology":"veth""#), "{json}");
        let back: Lab = serde_json::from_str(&json)?;
        assert_eq!(serde_json::to_string(&back)?, json);
        assert_eq!(
            back.path[0].rx,
            lab.interfaces[0].peer.clone().expect("sample has a peer")
        );
        Ok(())
    }

    #[test]
    fn lab_names_are_topology_names() {
        for t in [Topology::Veth, Topology::Bridge] {
            assert_eq!(Topology::from_name(t.name()), Some(t));
        }
        assert_eq!(Topology::from_name("nope"), None);
    }
}
