//! The ebpf-redirect lab's datapath, as Cilium's: no bridge; a tc program (`tc_redirect`, in
//! the eBPF object) on each pod's host-side veth hands what the pod sends straight to the
//! destination pod's eth0 with `bpf_redirect_peer`, its MACs rewritten as a router's would be,
//! or, for a pod of the other host, out of wire0 with `bpf_redirect_neigh`; the same program on
//! wire0's ingress hands what arrives to its pod.
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
use profiler_common::{Endpoint, RedirectTarget, ServiceKey};

use super::{
    netns,
    nl::Nl,
    service::{Mode, Service},
    spec::{netns_name, Spec},
};
use crate::object::ebpf_object;

/// The program and its table in the eBPF object.
pub(super) const PROGRAM: &str = "tc_redirect";
const TABLE: &str = "REDIRECT_TO";
const SERVICES: &str = "SERVICES";
/// Its clsact filter's priority: after the profile's own filters on kernels without tcx
/// (40000 and up), which must stamp the packet before it leaves the device.
const PRIORITY: u16 = 60_000;

/// A pod as the redirect sees it.
struct Pod {
    role: &'static str,
    dev: &'static str,
    addr: Ipv4Addr,
    mac: [u8; 6],
    /// Its host-side veth's ifindex and MAC in the host namespace.
    veth_index: u32,
    veth_mac: [u8; 6],
}

/// Wires the pods whose host-side veths are in `host`: a permanent neighbour in each pod for
/// every other pod of the host and for its gateway, at its own veth's MAC (no ARP crosses a
/// redirect: the program forwards IPv4 only, as Cilium answers ARP itself), the table filled
/// (this host's pods by peer, other hosts' by neighbour out of the device routed to them),
/// the program on the ingress of each of the host's redirect ports. With an `ebpf` Service,
/// the program translates its ports too.
pub(super) async fn install(
    lab: &str,
    spec: &Spec,
    host: &'static str,
    service: Option<&Service>,
) -> Result<()> {
    let host_ns = netns_name(lab, host);
    let pods = pods(lab, spec, host).await?;
    for p in &pods {
        let nl = Nl::open(Some(&netns_name(lab, p.role)))?;
        let dev = nl.index(p.dev).await?;
        let gateways = (spec.routes.iter())
            .filter(|r| r.role == p.role)
            .map(|r| r.via);
        let others = pods.iter().filter(|q| q.role != p.role).map(|q| q.addr);
        for addr in others.chain(gateways) {
            nl.add_neigh(dev, addr, p.veth_mac).await?;
        }
    }
    let mut ebpf = EbpfLoader::new()
        .load(ebpf_object()?)
        .context("loading the eBPF object into the kernel")?;
    let mut table: HashMap<_, u32, RedirectTarget> = HashMap::try_from(
        ebpf.map_mut(TABLE)
            .context("no REDIRECT_TO table in the object")?,
    )?;
    let targets = local_targets(&pods).chain(remote_targets(lab, spec, host).await?);
    for (addr, to) in targets {
        table.insert(u32::from_ne_bytes(addr.octets()), to, 0)?;
    }
    if let Some(svc) = service.filter(|s| s.mode == Mode::Ebpf) {
        let mut services: HashMap<_, ServiceKey, Endpoint> = HashMap::try_from(
            ebpf.map_mut(SERVICES)
                .context("no SERVICES table in the object")?,
        )?;
        let (vip, backend) = (
            endpoint(svc.cluster_ip, svc.port),
            endpoint(svc.backend, svc.port),
        );
        for proto in [libc::IPPROTO_UDP, libc::IPPROTO_TCP] {
            let key = ServiceKey {
                vip,
                proto: proto as u8,
                ..ServiceKey::default()
            };
            services.insert(key, backend, 0)?;
        }
    }
    let program: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .context("no tc_redirect program in the object")?
        .try_into()?;
    program
        .load()
        .context("loading tc_redirect (bpf_redirect_peer needs kernel 5.10 or later)")?;
    netns::run_in(Some(&host_ns), || {
        for port in spec.redirect_ports(host) {
            // Err: the qdisc was there already (a profile attached before tcx).
            let _ = qdisc_add_clsact(port);
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: PRIORITY,
                ..Default::default()
            });
            let id = program
                .attach_with_options(port, TcAttachType::Ingress, options)
                .with_context(|| format!("attaching {PROGRAM} to {port} in {host_ns}"))?;
            // The filter outlives this process, and so the link must not detach it on drop.
            std::mem::forget(program.take_link(id)?);
        }
        Ok(())
    })
}

/// This host's pods: into their eth0, by the peer of their veth.
fn local_targets(pods: &[Pod]) -> impl Iterator<Item = (Ipv4Addr, RedirectTarget)> + '_ {
    pods.iter().map(|q| {
        let to = RedirectTarget {
            ifindex: q.veth_index,
            dst_mac: q.mac,
            src_mac: q.veth_mac,
            neigh: 0,
        };
        (q.addr, to)
    })
}

/// Other hosts' pods: out of the device `host` routes their subnet through, by neighbour.
async fn remote_targets(
    lab: &str,
    spec: &Spec,
    host: &str,
) -> Result<Vec<(Ipv4Addr, RedirectTarget)>> {
    let nl = Nl::open(Some(&netns_name(lab, host)))?;
    let mut targets = Vec::new();
    for [pod, _] in spec.redirected_pods().filter(|[_, v]| v.at.0 != host) {
        let Some((addr, _)) = pod.addr else { continue };
        let route = (spec.routes.iter())
            .filter(|r| r.role == host)
            .find(|r| r.dst.is_some_and(|(net, len)| in_subnet(addr, net, len)))
            .with_context(|| format!("{host} has no route to {addr} ({})", pod.at.0))?;
        let to = RedirectTarget {
            ifindex: nl.index(route.dev).await?,
            neigh: 1,
            ..RedirectTarget::default()
        };
        targets.push((addr, to));
    }
    Ok(targets)
}

/// An address and port as the packet carries them.
fn endpoint(addr: Ipv4Addr, port: u16) -> Endpoint {
    Endpoint {
        addr: u32::from_ne_bytes(addr.octets()),
        port: port.to_be(),
        _pad: 0,
    }
}

fn in_subnet(addr: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(addr) & mask == u32::from(net) & mask
}

/// The pods paired with a veth in `host`, with their addresses and MACs.
async fn pods(lab: &str, spec: &Spec, host: &'static str) -> Result<Vec<Pod>> {
    let nl_host = Nl::open(Some(&netns_name(lab, host)))?;
    let mut pods = Vec::new();
    for [pod, veth] in spec.redirected_pods().filter(|[_, v]| v.at.0 == host) {
        let Some((addr, _)) = pod.addr else { continue };
        let nl = Nl::open(Some(&netns_name(lab, pod.at.0)))?;
        let (_, mac) = nl.index_mac(pod.at.1).await?;
        let (veth_index, veth_mac) = nl_host.index_mac(veth.at.1).await?;
        pods.push(Pod {
            role: pod.at.0,
            dev: pod.at.1,
            addr,
            mac,
            veth_index,
            veth_mac,
        });
    }
    Ok(pods)
}
