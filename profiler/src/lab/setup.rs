//! Turns a Spec into namespaces and devices, and remembers what it made so a failure midway
//! can take it all back.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, Result};

use super::nl::Nl;
use super::spec::{netns_name, Place, Spec, PREFIX_LEN};
use super::{Crossing, Endpoint, IfRef, Lab, LabIface, Topology};
use crate::netns;

/// What `up` has created so far.
#[derive(Default)]
pub(super) struct Undo {
    namespaces: Vec<String>,
    /// Temporary devices in the caller's namespace (veth pairs, the ifindex-reserving bridge);
    /// once moved or deleted they are gone from there.
    root_links: Vec<String>,
}

impl Undo {
    /// Best effort: runs while the error that caused it is on its way to the caller, so
    /// failures here are only logged.
    pub async fn run(self) {
        if !self.root_links.is_empty() {
            match Nl::open(None) {
                Ok(nl) => {
                    for name in &self.root_links {
                        // Deleting one end of a veth pair deletes both.
                        if let Ok(index) = nl.index(name).await {
                            if let Err(e) = nl.delete(index).await {
                                log::warn!("{e:#}");
                            }
                        }
                    }
                }
                Err(e) => log::warn!("{e:#}"),
            }
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = netns::delete(ns) {
                log::warn!("{e:#}");
            }
        }
    }
}

pub(super) async fn build(topology: Topology, spec: &Spec, undo: &mut Undo) -> Result<Lab> {
    let lab = topology.name();
    for role in spec.roles {
        let ns = netns_name(lab, role);
        netns::add(&ns)?;
        undo.namespaces.push(ns);
    }
    let temp = create_pairs(lab, spec, undo).await?;
    let bridge_index = match spec.bridge {
        Some(_) => Some(reserve_ifindex(undo).await?),
        None => None,
    };
    for role in spec.roles {
        configure(lab, role, spec, &temp, bridge_index).await?;
    }
    describe(topology, spec).await
}

/// Creates every veth pair in the caller's namespace and moves its ends to their namespaces.
/// Creating them all in one namespace gives every lab device a distinct ifindex, and a moved
/// device keeps its ifindex, so an ifindex alone names a lab device in the eBPF data.
/// Returns the temporary names, pair by pair.
async fn create_pairs(lab: &str, spec: &Spec, undo: &mut Undo) -> Result<Vec<[String; 2]>> {
    let root = Nl::open(None)?;
    let mut temp = Vec::new();
    for pair in &spec.pairs {
        let names = [temp_name(), temp_name()];
        root.add_veth(&names[0], &names[1]).await?;
        undo.root_links.push(names[0].clone());
        for (end, name) in pair.iter().zip(&names) {
            let index = root.index(name).await?;
            root.move_to(index, &netns_name(lab, end.at.0)).await?;
        }
        temp.push(names);
    }
    Ok(temp)
}

/// An ifindex for the bridge that no device of the caller's namespace has. A bridge cannot
/// change namespace, so it is created in its own with an explicit ifindex: one taken from a
/// throwaway bridge here, which the kernel will not hand out again (it allocates ifindexes
/// upwards, wrapping only at 2^31).
async fn reserve_ifindex(undo: &mut Undo) -> Result<u32> {
    let root = Nl::open(None)?;
    let name = temp_name();
    let index = root.add_bridge(&name, 0).await?;
    undo.root_links.push(name);
    root.delete(index).await?;
    Ok(index)
}

/// Unique in the caller's namespace while this process lives, and within IFNAMSIZ.
fn temp_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 1_000_000;
    format!("pf{}x{n}", std::process::id() % 100_000)
}

/// Inside namespace `role`: lo up, the bridge if it lives here (with `bridge_index`), then each veth end renamed,
/// enslaved, addressed and brought up.
async fn configure(
    lab: &str,
    role: &str,
    spec: &Spec,
    temp: &[[String; 2]],
    bridge_index: Option<u32>,
) -> Result<()> {
    let nl = Nl::open(Some(&netns_name(lab, role)))?;
    nl.up(nl.index("lo").await?).await?;
    if let Some(bridge) = spec.bridge.as_ref().filter(|b| b.at.0 == role) {
        let index = nl
            .add_bridge(bridge.at.1, bridge_index.unwrap_or(0))
            .await?;
        nl.add_addr(index, bridge.addr, PREFIX_LEN).await?;
    }
    let ends = spec.pairs.iter().flatten().zip(temp.iter().flatten());
    for (end, name) in ends.filter(|(end, _)| end.at.0 == role) {
        let index = nl.index(name).await?;
        nl.rename(index, end.at.1).await?;
        if let Some(master) = end.master {
            nl.set_master(index, nl.index(master).await?).await?;
        }
        if let Some(addr) = end.addr {
            nl.add_addr(index, addr, PREFIX_LEN).await?;
        }
        nl.up(index).await?;
    }
    Ok(())
}

/// The Lab record, with each device's final ifindex read back inside its namespace.
async fn describe(topology: Topology, spec: &Spec) -> Result<Lab> {
    let lab = topology.name();
    let refs = if_refs(lab, spec).await?;
    let get = |at: Place| {
        refs.get(&at)
            .cloned()
            .with_context(|| format!("lab {lab} has no interface {} in {}", at.1, at.0))
    };
    let mut interfaces = Vec::new();
    for [a, b] in &spec.pairs {
        for (end, peer) in [(a, b), (b, a)] {
            let r = get(end.at)?;
            let addrs = end
                .addr
                .iter()
                .map(|ip| format!("{ip}/{PREFIX_LEN}"))
                .collect();
            let master = end.master.map(str::to_string);
            interfaces.push(LabIface {
                netns: r.netns,
                ifname: r.ifname,
                ifindex: r.ifindex,
                kind: "veth".into(),
                addrs,
                peer: Some(get(peer.at)?),
                master,
            });
        }
    }
    if let Some(bridge) = &spec.bridge {
        let r = get(bridge.at)?;
        let addrs = vec![format!("{}/{PREFIX_LEN}", bridge.addr)];
        interfaces.push(LabIface {
            netns: r.netns,
            ifname: r.ifname,
            ifindex: r.ifindex,
            kind: "bridge".into(),
            addrs,
            peer: None,
            master: None,
        });
    }
    let endpoint = |at: Place| -> Result<Endpoint> {
        let addr = spec
            .addr_of(at)
            .with_context(|| format!("lab {lab} has no address on {} in {}", at.1, at.0))?;
        Ok(Endpoint {
            netns: netns_name(lab, at.0),
            ifname: at.1.to_string(),
            addr,
        })
    };
    let path = spec
        .path
        .iter()
        .map(|(tx, rx)| {
            Ok(Crossing {
                tx: get(*tx)?,
                rx: get(*rx)?,
                link: "veth".into(),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Lab {
        name: lab.to_string(),
        topology,
        namespaces: spec
            .roles
            .iter()
            .map(|role| netns_name(lab, role))
            .collect(),
        interfaces,
        client: endpoint(spec.client)?,
        server: endpoint(spec.server)?,
        path,
    })
}

async fn if_refs(lab: &str, spec: &Spec) -> Result<HashMap<Place, IfRef>> {
    let places: Vec<Place> = spec
        .ends()
        .map(|e| e.at)
        .chain(spec.bridge.as_ref().map(|b| b.at))
        .collect();
    let mut refs = HashMap::new();
    for role in spec.roles {
        let netns = netns_name(lab, role);
        let nl = Nl::open(Some(&netns))?;
        for &at in places.iter().filter(|at| at.0 == *role) {
            let ifindex = nl.index(at.1).await?;
            refs.insert(
                at,
                IfRef {
                    netns: netns.clone(),
                    ifname: at.1.to_string(),
                    ifindex,
                },
            );
        }
    }
    Ok(refs)
}
