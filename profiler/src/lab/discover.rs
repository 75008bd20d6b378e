//! Interfaces of paths the profiler did not build, read from netlink: those of the caller's own
//! namespace (where a node's host-side veths live) and of every named namespace (/run/netns).

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use aya::programs::{SchedClassifier, TcAttachType};

use super::netns;
use super::{names::PodName, nl::Nl, IfRef, LabIface};
use crate::pods::Pod;

/// How the caller's own network namespace is named in hops and reports.
pub const ROOT: &str = "(root)";

/// The namespace argument for `netns::run_in` and friends: None for the caller's own.
pub fn ns_arg(ns: &str) -> Option<&str> {
    (ns != ROOT).then_some(ns)
}

pub fn inode(ns: &str) -> Result<u32> {
    match ns_arg(ns) {
        Some(n) => netns::inode(n),
        None => netns::current_inode(),
    }
}

/// A named namespace deleted since it was listed: on a node pods (and other tools'
/// namespaces) come and go while a command starts, which is no error.
pub fn gone(ns: &str) -> bool {
    ns_arg(ns).is_some_and(|n| !netns::mounted(n))
}

/// Every namespace to look in: the caller's and the named ones. The caller's is left out when
/// it is a named one (`ip netns exec NS profiler ...`), so that each namespace has one name.
pub fn namespaces() -> Result<Vec<String>> {
    let mut named: Vec<String> = match std::fs::read_dir(netns::NETNS_DIR) {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    named.sort();
    let own = netns::current_inode()?;
    let is_own = |n: &String| netns::inode(n).is_ok_and(|i| i == own);
    let root = (!named.iter().any(is_own)).then(|| ROOT.to_string());
    Ok(root.into_iter().chain(named).collect())
}

/// The interfaces of `namespaces`, with veth peers matched across namespaces (each end's
/// IFLA_LINK is the other's ifindex), and masters and lower devices by name.
pub async fn interfaces(namespaces: &[String]) -> Result<Vec<LabIface>> {
    let mut rows = Vec::new();
    for ns in namespaces {
        let nl = match Nl::open(ns_arg(ns)) {
            Ok(nl) => nl,
            // Deleted since it was listed: no interfaces left to read.
            Err(_) if gone(ns) => continue,
            Err(e) => return Err(e),
        };
        let links = nl
            .links()
            .await
            .with_context(|| format!("reading the interfaces of {ns}"))?;
        let stacked_elsewhere = links
            .iter()
            .any(|r| r.kind != "veth" && r.link_nsid.is_some());
        let ids = match stacked_elsewhere {
            true => namespace_ids(&nl, ns, namespaces).await,
            false => HashMap::new(),
        };
        for r in links {
            let program = match r.kind == "veth" {
                true => datapath_program(&nl, ns, &r.name, r.index).await,
                false => None,
            };
            let lower_ns = r.link_nsid.and_then(|id| ids.get(&id).cloned());
            rows.push((ns.clone(), r, program, lower_ns));
        }
    }
    let by_index: HashMap<(&str, u32), &str> = rows
        .iter()
        .map(|(ns, r, _, _)| ((ns.as_str(), r.index), r.name.as_str()))
        .collect();
    let name_of = |ns: &str, i: Option<u32>| {
        i.and_then(|i| by_index.get(&(ns, i)))
            .map(|n| n.to_string())
    };
    let ifaces = rows
        .iter()
        .filter(|(_, r, _, _)| r.name != "lo")
        .map(|(ns, r, program, lower_ns)| {
            let peer = (r.kind == "veth")
                .then(|| {
                    rows.iter().find(|(pns, p, _, _)| {
                        p.kind == "veth"
                            && Some(p.index) == r.link
                            && p.link == Some(r.index)
                            && (pns != ns || r.link_nsid.is_none())
                    })
                })
                .flatten()
                .map(|(pns, p, _, _)| IfRef {
                    netns: pns.clone(),
                    ifname: p.name.clone(),
                    ifindex: p.index,
                });
            LabIface {
                netns: ns.clone(),
                ifname: r.name.clone(),
                ifindex: r.index,
                kind: r.kind.clone(),
                addrs: r.addrs.clone(),
                peer,
                master: name_of(ns, r.master),
                // A stacked device's lower device, also in another namespace (a pod's macvlan
                // on its host's NIC), named where it is.
                link: match (r.kind == "veth", r.link_nsid) {
                    (true, _) => None,
                    (false, None) => name_of(ns, r.link),
                    (false, Some(_)) => lower_ns.as_deref().and_then(|l| name_of(l, r.link)),
                },
                mtu: r.mtu,
                // A packet socket's process is not in netlink's view of a device.
                userspace: None,
                tc_program: program.clone(),
            }
        })
        .collect();
    Ok(ifaces)
}

/// The other namespaces of `namespaces` by the ids namespace `own` (of `nl`) has for them:
/// what its devices' IFLA_LINK_NETNSID say. One without an id there is left out.
async fn namespace_ids(nl: &Nl, own: &str, namespaces: &[String]) -> HashMap<i32, String> {
    let mut ids = HashMap::new();
    for other in namespaces.iter().filter(|o| *o != own) {
        let file = match ns_arg(other) {
            Some(name) => netns::open(name),
            None => std::fs::File::open("/proc/thread-self/ns/net").map_err(Into::into),
        };
        let Ok(file) = file else { continue };
        if let Ok(Some(id)) = nl.nsid_of(&file).await {
            ids.insert(id, other.clone());
        }
    }
    ids
}

/// The profiler's own programs at a tc ingress: its hooks and its delay injector.
const OWN_TC_PROGRAMS: &[&str] = &["tc_ingress", "ftc_ingress", "tc_delay"];

/// The program of an eBPF datapath at veth `name`'s tc ingress (Cilium's cil_from_container,
/// the ebpf-redirect lab's tc_redirect), as a tc filter or a tcx link: what may redirect the
/// packets its pod sends past the host stack.
async fn datapath_program(nl: &Nl, ns: &str, name: &str, index: u32) -> Option<String> {
    let mut names = nl.ingress_bpf_filters(index).await.unwrap_or_default();
    // Before tcx (6.6) the query fails: the filters were all there is.
    let tcx = netns::run_in(ns_arg(ns), || {
        Ok(SchedClassifier::query_tcx(name, TcAttachType::Ingress)?)
    });
    if let Ok((_, programs)) = tcx {
        names.extend(
            programs
                .iter()
                .filter_map(|p| Some(p.name_as_str()?.to_string())),
        );
    }
    names
        .into_iter()
        .find(|n| !OWN_TC_PROGRAMS.contains(&n.as_str()))
}

/// The node's namespaces, and each listed pod's under the name it has among them (a pod's
/// runtime gives a path, /var/run/netns/cni-...; `ip netns` names it cni-...). Pods whose
/// namespace is gone since they were listed are left out.
pub fn pod_names(listed: &[Pod], namespaces: &mut Vec<String>) -> Vec<(PodName, u32)> {
    let inodes: Vec<(String, Option<u32>)> = namespaces
        .iter()
        .map(|n| (n.clone(), inode(n).ok()))
        .collect();
    let mut named = Vec::new();
    for pod in listed {
        let Ok(inode) = netns::inode(&pod.netns) else {
            continue;
        };
        let netns = match inodes.iter().find(|(_, i)| *i == Some(inode)) {
            Some((n, _)) => n.clone(),
            None => {
                namespaces.push(pod.netns.clone());
                pod.netns.clone()
            }
        };
        let name = PodName {
            netns,
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            qualified: pod.qualified(),
        };
        named.push((name, inode));
    }
    named
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A namespace listed and then deleted before it is read (another tool's, a pod's) is
    /// skipped: attach on a busy node must not fail because a pod went away meanwhile.
    #[tokio::test]
    async fn a_namespace_gone_since_listed_is_skipped() {
        let gone = format!("prof-gone-{}", std::process::id());
        let namespaces = [ROOT.to_string(), gone.clone()];
        let found = interfaces(&namespaces).await.expect("reading interfaces");
        assert!(
            found.iter().all(|i| i.netns == ROOT),
            "{gone} has interfaces"
        );
    }
}
