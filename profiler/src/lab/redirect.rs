//! The ebpf-redirect lab's datapath, as Cilium's: no bridge; a tc program (`tc_redirect`, in
//! the eBPF object) on each pod's host-side veth hands what the pod sends straight to the
//! destination pod's eth0 with `bpf_redirect_peer`, its MACs rewritten as a router's would be.
//!
//! Loaded by `lab up` and left attached as a clsact filter when it exits: the filter holds the
//! program and the program its table, and they go with the host namespace at `lab down` (or
//! `lab down --all` after a SIGKILL), as its veths do.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use aya::{
    maps::HashMap,
    programs::{
        tc::{qdisc_add_clsact, NlOptions, TcAttachOptions},
        SchedClassifier, TcAttachType,
    },
    EbpfLoader,
};
use profiler_common::RedirectTarget;

use super::{
    netns,
    nl::Nl,
    spec::{netns_name, Spec},
};
use crate::object::ebpf_object;

/// The program and its table in the eBPF object.
const PROGRAM: &str = "tc_redirect";
const TABLE: &str = "REDIRECT_TO";
/// Its clsact filter's priority: after the profile's own filters on kernels without tcx
/// (40000 and up), which must stamp the packet before it leaves the device.
const PRIORITY: u16 = 60_000;

/// A pod as the redirect sees it.
struct Pod {
    role: &'static str,
    dev: &'static str,
    addr: Ipv4Addr,
    mac: [u8; 6],
    /// Its host-side veth: name, ifindex and MAC in the host namespace.
    veth: &'static str,
    veth_index: u32,
    veth_mac: [u8; 6],
}

/// Wires the pods whose host-side veths are in `host`: a permanent neighbour in each pod for
/// every other pod, at its own veth's MAC (no ARP crosses a redirect: the program forwards
/// IPv4 only, as Cilium answers ARP itself), the table filled, the program on each veth's
/// ingress.
pub(super) async fn install(lab: &str, spec: &Spec, host: &'static str) -> Result<()> {
    let host_ns = netns_name(lab, host);
    let pods = pods(lab, spec, host).await?;
    for p in &pods {
        let nl = Nl::open(Some(&netns_name(lab, p.role)))?;
        let dev = nl.index(p.dev).await?;
        for q in pods.iter().filter(|q| q.role != p.role) {
            nl.add_neigh(dev, q.addr, p.veth_mac).await?;
        }
    }
    let mut ebpf = EbpfLoader::new()
        .load(ebpf_object()?)
        .context("loading the eBPF object into the kernel")?;
    let mut table: HashMap<_, u32, RedirectTarget> = HashMap::try_from(
        ebpf.map_mut(TABLE)
            .context("no REDIRECT_TO table in the object")?,
    )?;
    for q in &pods {
        let to = RedirectTarget {
            ifindex: q.veth_index,
            dst_mac: q.mac,
            src_mac: q.veth_mac,
        };
        table.insert(u32::from_ne_bytes(q.addr.octets()), to, 0)?;
    }
    let program: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .context("no tc_redirect program in the object")?
        .try_into()?;
    program
        .load()
        .context("loading tc_redirect (bpf_redirect_peer needs kernel 5.10 or later)")?;
    netns::run_in(Some(&host_ns), || {
        for p in &pods {
            // Err: the qdisc was there already (a profile attached before tcx).
            let _ = qdisc_add_clsact(p.veth);
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: PRIORITY,
                ..Default::default()
            });
            let id = program
                .attach_with_options(p.veth, TcAttachType::Ingress, options)
                .with_context(|| format!("attaching {PROGRAM} to {} in {host_ns}", p.veth))?;
            // The filter outlives this process, and so the link must not detach it on drop.
            std::mem::forget(program.take_link(id)?);
        }
        Ok(())
    })
}

/// The pods paired with a veth in `host`, with their addresses and MACs.
async fn pods(lab: &str, spec: &Spec, host: &'static str) -> Result<Vec<Pod>> {
    let nl_host = Nl::open(Some(&netns_name(lab, host)))?;
    let mut pods = Vec::new();
    for [pod, veth] in &spec.pairs {
        let Some((addr, _)) = pod.addr.filter(|_| veth.at.0 == host) else {
            continue;
        };
        let nl = Nl::open(Some(&netns_name(lab, pod.at.0)))?;
        let (_, mac) = nl.index_mac(pod.at.1).await?;
        let (veth_index, veth_mac) = nl_host.index_mac(veth.at.1).await?;
        pods.push(Pod {
            role: pod.at.0,
            dev: pod.at.1,
            addr,
            mac,
            veth: veth.at.1,
            veth_index,
            veth_mac,
        });
    }
    Ok(pods)
}
