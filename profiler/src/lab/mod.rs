//! Lab topologies: network namespaces wired like container networks, built through netlink,
//! for the profiler to measure. One lab per topology and placement at a time, named after them.
//! Cross-host labs model two hosts as two namespaces, host-a and host-b, joined by a veth
//! pair "wire0" (198.19.0.1/24 - 198.19.0.2/24).
//!
//! Addresses are in 198.18.0.0/15 on our own devices only; traffic never leaves the lab.
use std::net::Ipv4Addr;

use anyhow::{bail, Result};

use crate::netns;

pub mod discover;
mod nl;
mod setup;
mod spec;
mod state;

pub use state::STATE_DIR;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
#[clap(rename_all = "kebab-case")]
pub enum Topology {
    Veth,
    Bridge,
    /// No container network: client and server are the two hosts (cross-host only).
    Host,
    /// CNI bridge per host, hosts joined by flannel's VXLAN device flannel.1.
    FlannelVxlan,
    Macvlan,
    Vlan,
}

impl Topology {
    pub const ALL: [Topology; 6] = [
        Topology::Veth,
        Topology::Bridge,
        Topology::Host,
        Topology::FlannelVxlan,
        Topology::Macvlan,
        Topology::Vlan,
    ];

    /// The topology's name (the lab's name when same-host).
    pub fn name(self) -> &'static str {
        match self {
            Topology::Veth => "veth",
            Topology::Bridge => "bridge",
            Topology::Host => "host",
            Topology::FlannelVxlan => "flannel-vxlan",
            Topology::Macvlan => "macvlan",
            Topology::Vlan => "vlan",
        }
    }
}

/// Where the two pods run: one host namespace, or two joined by a wire.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
#[clap(rename_all = "kebab-case")]
pub enum Placement {
    #[default]
    SameHost,
    CrossHost,
}

#[derive(Clone, Debug, Default)]
pub struct LabOptions {
    pub placement: Placement,
    /// MTU of the pods' interfaces (and the overlay device); None: the topology's default
    /// (flannel: 1450 inside, 1500 wire).
    pub mtu: Option<u32>,
}

const CROSS_HOST_SUFFIX: &str = "-xhost";

/// The lab's name: the topology's, with "-xhost" when cross-host ("bridge-xhost"); its
/// namespaces are prof-NAME-ROLE.
pub fn lab_name(topology: Topology, placement: Placement) -> String {
    match placement {
        Placement::SameHost => topology.name().to_string(),
        Placement::CrossHost => format!("{}{CROSS_HOST_SUFFIX}", topology.name()),
    }
}

fn parse_lab_name(name: &str) -> Option<(Topology, Placement)> {
    let (base, placement) = match name.strip_suffix(CROSS_HOST_SUFFIX) {
        Some(base) => (base, Placement::CrossHost),
        None => (name, Placement::SameHost),
    };
    Topology::ALL
        .into_iter()
        .find(|t| t.name() == base)
        .map(|t| (t, placement))
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Lab {
    /// lab_name(topology, placement), e.g. "bridge" or "flannel-vxlan-xhost".
    pub name: String,
    pub topology: Topology,
    /// Default (same-host) in state files written before placements existed.
    #[serde(default)]
    pub placement: Placement,
    /// The --mtu the lab was made with (None: the topology's default).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Full netns names, e.g. "prof-bridge-pod-a".
    pub namespaces: Vec<String>,
    pub interfaces: Vec<LabIface>,
    /// pod-a (host-a for `host`)
    pub client: Endpoint,
    /// pod-b (host-b for `host`)
    pub server: Endpoint,
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
    /// "veth" | "bridge" | "vxlan" | "macvlan" | "vlan"
    pub kind: String,
    /// CIDR
    pub addrs: Vec<String>,
    /// veth: the other end.
    pub peer: Option<IfRef>,
    /// Bridge port: the bridge's name (same namespace).
    pub master: Option<String>,
    /// macvlan/vlan/vxlan: the lower device's name ("wire0"), in the namespace the device was
    /// created in (the host's).
    #[serde(default)]
    pub link: Option<String>,
    /// 0 in state files written before MTUs were recorded.
    #[serde(default)]
    pub mtu: u32,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    pub netns: String,
    pub ifname: String,
    pub addr: Ipv4Addr,
}

/// Builds the lab of `topology` as `options` say. An unsupported combination fails before
/// anything is created; on a later failure, everything created so far is removed again.
pub async fn up(topology: Topology, options: &LabOptions) -> Result<Lab> {
    if options.mtu.is_some_and(|m| !(576..=9000).contains(&m)) {
        bail!("--mtu must be between 576 and 9000");
    }
    let spec = spec::Spec::of(topology, options.placement, options.mtu)?;
    let name = lab_name(topology, options.placement);
    let mut namespaces = spec.roles.iter().map(|role| spec::netns_name(&name, role));
    if state::path(&name).exists() || namespaces.any(|ns| netns::exists(&ns)) {
        bail!("lab {name} is already up (profiler lab down {name})");
    }
    let mut undo = setup::Undo::default();
    let built = match setup::build(&name, topology, options, &spec, &mut undo).await {
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
    let Some((topology, placement)) = parse_lab_name(name) else {
        bail!("no lab named {name} is up");
    };
    let namespaces: Vec<String> = match spec::Spec::of(topology, placement, None) {
        Ok(spec) => spec
            .roles
            .iter()
            .map(|role| spec::netns_name(name, role))
            .collect(),
        Err(_) => bail!("no lab named {name} is up"),
    };
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
        Lab {
            name: "veth".into(),
            topology: Topology::Veth,
            placement: Placement::SameHost,
            mtu: None,
            namespaces: vec!["prof-veth-pod-a".into(), "prof-veth-pod-b".into()],
            interfaces: vec![LabIface {
                netns: "prof-veth-pod-a".into(),
                ifname: "eth0".into(),
                ifindex: 7,
                kind: "veth".into(),
                addrs: vec!["198.18.0.1/24".into()],
                peer: Some(IfRef {
                    netns: "prof-veth-pod-b".into(),
                    ifname: "eth0".into(),
                    ifindex: 8,
                }),
                master: None,
                link: None,
                mtu: 1500,
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
        }
    }

    #[test]
    fn state_json_round_trips() -> Result<()> {
        let lab = sample();
        let json = serde_json::to_string(&lab)?;
        assert!(json.contains(r#""topology":"veth""#), "{json}");
        assert!(json.contains(r#""placement":"same-host""#), "{json}");
        let back: Lab = serde_json::from_str(&json)?;
        assert_eq!(serde_json::to_string(&back)?, json);
        Ok(())
    }

    #[test]
    fn lab_names_round_trip() {
        for t in Topology::ALL {
            for p in [Placement::SameHost, Placement::CrossHost] {
                assert_eq!(parse_lab_name(&lab_name(t, p)), Some((t, p)));
            }
        }
        assert_eq!(
            lab_name(Topology::Bridge, Placement::CrossHost),
            "bridge-xhost"
        );
        assert_eq!(Topology::FlannelVxlan.name(), "flannel-vxlan");
        assert_eq!(parse_lab_name("nope"), None);
    }

    #[test]
    fn cli_and_serde_names_agree() {
        use clap::ValueEnum as _;
        for t in Topology::ALL {
            let cli = t.to_possible_value().expect("not skipped");
            assert_eq!(cli.get_name(), t.name());
            assert_eq!(serde_json::to_value(t).unwrap(), t.name());
        }
        assert_eq!(
            serde_json::to_value(Placement::CrossHost).unwrap(),
            "cross-host"
        );
    }
}
