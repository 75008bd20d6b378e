//! Turns a Spec into namespaces and devices, and remembers what it made so a failure midway
//! can take it all back.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, Result};

use super::dpdk;
use super::netns;
use super::nl::{self, Nl};
use super::ovs;
use super::redirect;
use super::service;
use super::spec::{netns_name, Child, Pf, Place, Spec, Tunnel, TunnelKind, Userspace};
use super::sriov;
use super::{Endpoint, IfRef, Lab, LabIface, LabOptions, Lacks, Pod, Topology};

/// net.ipv4.ip_forward=1 in namespace `ns`.
pub(super) fn enable_forwarding(ns: &str) -> Result<()> {
    netns::run_in(Some(ns), || {
        const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
        std::fs::write(PATH, "1").with_context(|| format!("cannot write {PATH}"))
    })
    .with_context(|| format!("cannot enable IPv4 forwarding in {ns}"))
}

/// What `up` has created so far. Dropped before `disarm` (an error, or the `up` future
/// dropped on Ctrl-C), it removes all of it.
#[derive(Default)]
pub(super) struct Undo {
    namespaces: Vec<String>,
    /// Temporary devices in the caller's namespace (veth pairs, the ifindex-reserving bridges);
    /// once moved or deleted they are gone from there.
    root_links: Vec<String>,
    /// OVS directories whose daemons may be running.
    ovs: Vec<PathBuf>,
    /// The userspace datapath's directory, whose process may be running.
    dpdk: Option<PathBuf>,
    /// SR-IOV PFs (PCI devices) whose VFs were created.
    pfs: Vec<PathBuf>,
}

impl Undo {
    /// The lab is up: keep it.
    pub fn disarm(mut self) {
        self.namespaces.clear();
        self.root_links.clear();
        self.ovs.clear();
        self.dpdk = None;
        self.pfs.clear();
    }
}

impl Drop for Undo {
    /// Best effort: runs while the error that caused it is on its way to the caller, so
    /// failures here are only logged. The daemons go first: a process in a namespace keeps
    /// it, and its devices, alive.
    fn drop(&mut self) {
        for dir in self.ovs.iter().rev() {
            if let Err(e) = ovs::stop(dir) {
                log::warn!("{e:#}");
            }
        }
        if let Some(dir) = &self.dpdk {
            if let Err(e) = dpdk::stop(dir) {
                log::warn!("{e:#}");
            }
        }
        if !self.root_links.is_empty() {
            delete_root_links(std::mem::take(&mut self.root_links));
        }
        for dev in &self.pfs {
            if let Err(e) = sriov::release_device(dev) {
                log::warn!("{e:#}");
            }
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = netns::delete(ns) {
                log::warn!("{e:#}");
            }
        }
    }
}

/// Deletes `names` from the caller's namespace (Drop cannot await).
fn delete_root_links(names: Vec<String>) {
    let deleted = nl::blocking(None, |nl| async move {
        for name in &names {
            // Deleting one end of a veth pair deletes both.
            if let Ok(index) = nl.index(name).await {
                if let Err(e) = nl.delete(index).await {
                    log::warn!("{e:#}");
                }
            }
        }
        Ok(())
    });
    if let Err(e) = deleted {
        log::warn!("deleting the lab's temporary devices: {e:#}");
    }
}

pub(super) async fn build(
    lab: &str,
    topology: Topology,
    options: &LabOptions,
    spec: &Spec,
    undo: &mut Undo,
) -> Result<Lab> {
    for role in &spec.roles {
        let ns = netns_name(lab, role);
        netns::add(&ns)?;
        undo.namespaces.push(ns);
    }
    let temp = create_pairs(lab, spec, undo).await?;
    // Devices made inside a lab namespace (bridges, tunnels, macvlan/vlan/ipvlan children) get
    // an ifindex reserved here, so ifindexes stay unique across the lab. OVS picks its own
    // devices' ifindexes, in their namespace: unique there only.
    let wanted = spec.bridges.len() + spec.tunnels.len() + spec.children.len();
    let mut reserved = reserve_ifindexes(wanted, undo).await?.into_iter();
    let mut next = move || reserved.next().context("ran out of reserved ifindexes");
    for role in &spec.roles {
        configure(lab, role, spec, &temp, &mut next).await?;
    }
    for child in &spec.children {
        add_child(lab, child, next()?).await?;
    }
    let mut pf_names = HashMap::new();
    for pf in &spec.pfs {
        pf_names.insert(pf.nic, add_vfs(lab, spec, pf, undo).await?);
    }
    for tunnel in &spec.tunnels {
        add_tunnel(lab, tunnel, next()?).await?;
    }
    for route in &spec.routes {
        let nl = Nl::open(Some(&netns_name(lab, route.role)))?;
        let dev = nl.index(route.dev).await?;
        nl.add_route(route.dst, route.via, dev, route.onlink)
            .await?;
    }
    for n in &spec.neighs {
        let nl = Nl::open(Some(&netns_name(lab, n.role)))?;
        nl.add_neigh(nl.index(n.dev).await?, n.ip, n.mac).await?;
    }
    for f in &spec.fdbs {
        let nl = Nl::open(Some(&netns_name(lab, f.role)))?;
        nl.add_fdb(nl.index(f.dev).await?, f.mac, f.dst).await?;
    }
    for role in &spec.forwarding {
        enable_forwarding(&netns_name(lab, role))?;
    }
    let service = match options.service {
        Some(mode) => Some(service::install(lab, spec, mode)?),
        None => None,
    };
    for &host in &spec.redirect {
        redirect::install(lab, spec, host, service.as_ref()).await?;
    }
    for bridge in &spec.ovs {
        let dir = ovs::dir(lab, bridge.role);
        undo.ovs.push(dir.clone());
        ovs::start(&netns_name(lab, bridge.role), &dir)?;
        ovs::add_bridge(&dir, bridge)?;
    }
    let forwarder = match &spec.userspace {
        Some(u) => Some(start_userspace(lab, u, options, undo)?),
        None => None,
    };
    let mut described = describe(lab, topology, options, spec).await?;
    // A VF's hops are named after its PF (the NIC that switches it).
    for vf in &spec.vfs {
        let ns = netns_name(lab, vf.at.0);
        for i in described
            .interfaces
            .iter_mut()
            .filter(|i| i.netns == ns && i.ifname == vf.at.1)
        {
            i.link = pf_names.get(&vf.nic).cloned();
        }
    }
    if let Some(f) = &forwarder {
        // Segments are named after the program that forwards.
        for i in described
            .interfaces
            .iter_mut()
            .filter(|i| i.userspace.is_some())
        {
            i.userspace = Some(f.name());
        }
    }
    Ok(Lab {
        forwarder,
        service,
        ..described
    })
}

/// Prepares the pods for the userspace datapath and starts it.
fn start_userspace(
    lab: &str,
    u: &Userspace,
    options: &LabOptions,
    undo: &mut Undo,
) -> Result<dpdk::Forwarder> {
    for (role, ifname) in u.pods {
        dpdk::tx_checksum_off(&netns_name(lab, role), ifname)?;
    }
    let dir = dpdk::dir(lab, u.role);
    undo.dpdk = Some(dir.clone());
    let ports = u.ports.map(|d| dpdk::Port::Device(d.into()));
    dpdk::start(
        lab,
        &netns_name(lab, u.role),
        &ports,
        &dir,
        options.forwarder.as_deref(),
    )
}

/// Creates a macvlan/vlan/ipvlan child of its parent in the parent's namespace, moves it to
/// its pod (it stays linked to the parent, and keeps its ifindex), then names, addresses and
/// brings it up there.
async fn add_child(lab: &str, child: &Child, index: u32) -> Result<()> {
    let host = Nl::open(Some(&netns_name(lab, child.parent.0)))?;
    let parent = host.index(child.parent.1).await?;
    let name = temp_name();
    let index = host
        .add_child(&name, parent, child.kind, index, child.mtu)
        .await
        .map_err(|e| lacking(e, child.kind.module()))?;
    let pod_ns = netns_name(lab, child.at.0);
    if child.at.0 != child.parent.0 {
        host.move_to(index, &pod_ns).await?;
    }
    let pod = Nl::open(Some(&pod_ns))?;
    let index = pod.index(&name).await?;
    pod.rename(index, child.at.1).await?;
    pod.add_addr(index, child.addr.0, child.addr.1).await?;
    pod.up(index).await
}

/// Moves SR-IOV PF `pf` into its host namespace and brings it up, creates its VFs of the
/// spec, gives each its MAC, binds its driver, and hands it to its pod (renamed, addressed,
/// up). Returns the PF's name.
async fn add_vfs(lab: &str, spec: &Spec, pf: &Pf, undo: &mut Undo) -> Result<String> {
    let dev = sriov::pf_device(pf.nic)?;
    let (name, index) = sriov::net_device(&dev)?;
    let root = Nl::open(None)?;
    let host = Nl::open(Some(&netns_name(lab, pf.role)))?;
    root.move_to(index, &netns_name(lab, pf.role)).await?;
    // A moved device keeps its ifindex unless the namespace has it already (ip_gre's gre0,
    // gretap0 and erspan0 are in every namespace): look it up again.
    let index = host.index(&name).await?;
    // The PF must be up for its VFs to be: the NIC switches nothing while it is down.
    host.up(index).await?;
    wait_carrier(&host, index, &name).await?;
    let vfs: Vec<_> = spec.vfs.iter().filter(|v| v.nic == pf.nic).collect();
    undo.pfs.push(dev.clone());
    sriov::create_vfs(&dev, vfs.len() as u32)?;
    for vf in &vfs {
        host.set_vf_mac(index, vf.vf, vf.mac).await?;
    }
    for vf in vfs {
        let vf_dev = sriov::bind_vf(&dev, vf.vf)?;
        let (vf_name, vf_index) = sriov::net_device(&vf_dev)?;
        let pod_ns = netns_name(lab, vf.at.0);
        root.move_to(vf_index, &pod_ns).await?;
        // The pod's own devices (lo, ip_gre's) are the first few ifindexes, which a VF made
        // after every device of the root namespace does not have: it keeps its own.
        let pod = Nl::open(Some(&pod_ns))?;
        pod.rename(vf_index, vf.at.1).await?;
        if let Some(mtu) = vf.mtu {
            pod.set_mtu(vf_index, mtu).await?;
        }
        pod.add_addr(vf_index, vf.addr.0, vf.addr.1).await?;
        pod.up(vf_index).await?;
        // The driver requests its interrupts when the device opens.
        sriov::pin_irqs(&vf_dev)?;
        wait_carrier(&pod, vf_index, &vf_name).await?;
    }
    Ok(name)
}

/// Waits up to sriov::WAIT for interface `index` (`name`) to have carrier.
async fn wait_carrier(nl: &Nl, index: u32, name: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + sriov::WAIT;
    while !nl.carrier(index).await? {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{name} has no carrier after {:?}", sriov::WAIT);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Creates a tunnel device in its host namespace, addressed and up.
async fn add_tunnel(lab: &str, t: &Tunnel, index: u32) -> Result<()> {
    let nl = Nl::open(Some(&netns_name(lab, t.at.0)))?;
    let (name, mac) = (t.at.1, t.mac);
    let created = match t.kind {
        TunnelKind::Vxlan { local, dev } => {
            let dev = match dev {
                Some(dev) => Some(nl.index(dev).await?),
                None => None,
            };
            nl.add_vxlan(name, t.vni, t.port, local, dev, mac, t.mtu, index)
                .await
        }
        TunnelKind::Geneve { remote } => {
            nl.add_geneve(name, t.vni, t.port, remote, mac, t.mtu, index)
                .await
        }
    };
    let index = created.map_err(|e| lacking(e, t.kind_name()))?;
    nl.add_addr(index, t.addr.0, t.addr.1).await?;
    nl.up(index).await
}

/// `e`, or what it means when the kernel does not know the kind of device asked for
/// (EOPNOTSUPP): this kernel lacks `module`.
fn lacking(e: anyhow::Error, module: &'static str) -> anyhow::Error {
    let unknown_kind = e.chain().any(|c| {
        c.downcast_ref::<rtnetlink::Error>()
            .is_some_and(|e| match e {
                rtnetlink::Error::NetlinkError(m) => m.raw_code() == -libc::EOPNOTSUPP,
                _ => false,
            })
    });
    if unknown_kind {
        e.context(Lacks::Module(module))
    } else {
        e
    }
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

/// `n` ifindexes that no device of the caller's namespace has, for devices created inside
/// lab namespaces (a bridge cannot change namespace; vxlans and children are made next to
/// their lower device). Each is taken from a throwaway bridge here, which the kernel will not
/// hand out again (it allocates ifindexes upwards, wrapping only at 2^31).
async fn reserve_ifindexes(n: usize, undo: &mut Undo) -> Result<Vec<u32>> {
    let root = Nl::open(None)?;
    let mut indexes = Vec::new();
    for _ in 0..n {
        let name = temp_name();
        let index = root.add_bridge(&name, 0, None).await?;
        undo.root_links.push(name);
        root.delete(index).await?;
        indexes.push(index);
    }
    Ok(indexes)
}

/// The prefix of temporary device names: "pf", the creating process's pid (mod 100000), "x",
/// a counter.
pub(super) const TEMP_PREFIX: &str = "pf";

/// Unique in the caller's namespace while this process lives, and within IFNAMSIZ.
fn temp_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 1_000_000;
    format!("{TEMP_PREFIX}{}x{n}", std::process::id() % 100_000)
}

/// Inside namespace `role`: lo up, the bridges that live here (with reserved ifindexes), then
/// each veth end renamed, sized, enslaved, addressed and brought up.
async fn configure(
    lab: &str,
    role: &str,
    spec: &Spec,
    temp: &[[String; 2]],
    next_index: &mut impl FnMut() -> Result<u32>,
) -> Result<()> {
    let nl = Nl::open(Some(&netns_name(lab, role)))?;
    nl.up(nl.index("lo").await?).await?;
    for bridge in spec.bridges.iter().filter(|b| b.at.0 == role) {
        let index = nl
            .add_bridge(bridge.at.1, next_index()?, bridge.mtu)
            .await?;
        nl.add_addr(index, bridge.addr.0, bridge.addr.1).await?;
        nl.up(index).await?;
    }
    let ends = spec.pairs.iter().flatten().zip(temp.iter().flatten());
    for (end, name) in ends.filter(|(end, _)| end.at.0 == role) {
        let index = nl.index(name).await?;
        nl.rename(index, end.at.1).await?;
        if let Some(mtu) = end.mtu {
            nl.set_mtu(index, mtu).await?;
        }
        if let Some(master) = end.master {
            nl.set_master(index, nl.index(master).await?).await?;
        }
        if let Some((addr, len)) = end.addr {
            nl.add_addr(index, addr, len).await?;
        }
        nl.up(index).await?;
    }
    Ok(())
}

/// The Lab record, with each device's final ifindex and MTU read back inside its namespace.
async fn describe(lab: &str, topology: Topology, options: &LabOptions, spec: &Spec) -> Result<Lab> {
    let refs = if_refs(lab, spec).await?;
    let get = |at: Place| {
        refs.get(&at)
            .cloned()
            .with_context(|| format!("lab {lab} has no interface {} in {}", at.1, at.0))
    };
    let addrs = |at: Place| -> Vec<String> {
        spec.addr_of(at)
            .iter()
            .map(|(ip, len)| format!("{ip}/{len}"))
            .collect()
    };
    let iface = |at: Place, kind: &str| -> Result<LabIface> {
        let (r, mtu) = get(at)?;
        Ok(LabIface {
            netns: r.netns,
            ifname: r.ifname,
            ifindex: r.ifindex,
            kind: kind.into(),
            addrs: addrs(at),
            peer: None,
            master: spec.master_of(at).map(str::to_string),
            link: None,
            mtu,
            userspace: spec
                .userspace
                .as_ref()
                .filter(|u| u.role == at.0 && u.ports.contains(&at.1))
                .map(|u| u.name.to_string()),
            tc_program: (spec.redirect_ports(at.0).contains(&at.1))
                .then(|| redirect::PROGRAM.to_string()),
        })
    };
    let mut interfaces = Vec::new();
    for [a, b] in &spec.pairs {
        for (end, peer) in [(a, b), (b, a)] {
            let mut i = iface(end.at, "veth")?;
            i.peer = Some(get(peer.at)?.0);
            interfaces.push(i);
        }
    }
    for bridge in &spec.bridges {
        interfaces.push(iface(bridge.at, "bridge")?);
    }
    for child in &spec.children {
        let mut i = iface(child.at, child.kind.name())?;
        i.link = Some(child.parent.1.to_string());
        interfaces.push(i);
    }
    for tunnel in &spec.tunnels {
        let mut i = iface(tunnel.at, tunnel.kind_name())?;
        i.link = tunnel.dev().map(str::to_string);
        interfaces.push(i);
    }
    for bridge in &spec.ovs {
        for (dev, kind) in bridge.devices() {
            interfaces.push(iface((bridge.role, dev), kind)?);
        }
    }
    for vf in &spec.vfs {
        interfaces.push(iface(vf.at, sriov::VF_DRIVER)?);
    }
    let endpoint = |at: Place| -> Result<Endpoint> {
        let (addr, _) = spec
            .addr_of(at)
            .with_context(|| format!("lab {lab} has no address on {} in {}", at.1, at.0))?;
        Ok(Endpoint {
            netns: netns_name(lab, at.0),
            ifname: at.1.to_string(),
            addr,
        })
    };
    Ok(Lab {
        name: lab.to_string(),
        topology,
        placement: options.placement,
        mtu: options.mtu,
        namespaces: spec
            .roles
            .iter()
            .map(|role| netns_name(lab, role))
            .collect(),
        interfaces,
        client: endpoint(spec.client)?,
        server: endpoint(spec.server)?,
        pods_per_host: options.pods,
        pods: spec
            .pods
            .iter()
            .map(|&(at, host)| {
                endpoint(at).map(|end| Pod {
                    end,
                    host: host.to_string(),
                })
            })
            .collect::<Result<_>>()?,
        owner: None,
        forwarder: None,
        guests: Vec::new(),
        node: None,
        service: None,
        net2: options.net2,
    })
}

/// Every device of the spec by place, with its MTU.
async fn if_refs(lab: &str, spec: &Spec) -> Result<HashMap<Place, (IfRef, u32)>> {
    let places = spec.places();
    let mut refs = HashMap::new();
    for role in &spec.roles {
        let netns = netns_name(lab, role);
        let nl = Nl::open(Some(&netns))?;
        for &at in places.iter().filter(|at| at.0 == *role) {
            let (ifindex, mtu) = nl.index_mtu(at.1).await?;
            let r = IfRef {
                netns: netns.clone(),
                ifname: at.1.to_string(),
                ifindex,
            };
            refs.insert(at, (r, mtu));
        }
    }
    Ok(refs)
}
