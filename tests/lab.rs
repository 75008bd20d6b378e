//! Lab topologies against the real kernel (needs root): what `up` reports must be what netlink
//! sees, traffic must flow pod-a -> pod-b, and `down` or a failed `up` must leave nothing.
//! Every test holds LOCK (labs and namespace names are machine-global) and cleans up through
//! Drop guards, so a failed assertion does not leak namespaces into the next test.
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]
#[path = "common/skip.rs"]
#[allow(dead_code)]
mod skip;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, UdpSocket};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use futures::TryStreamExt as _;
use profiler::lab::netns;
use profiler::lab::{self, Lab, LabOptions, Placement, Topology};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo,
};
use skip::{skip, Absence};

static LOCK: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    // A test that failed while holding the lock has already cleaned up through its guards.
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Takes lab `name` down on drop, whatever state it is in.
struct LabGuard(String);

impl LabGuard {
    fn new(name: impl Into<String>) -> LabGuard {
        LabGuard(name.into())
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        // "no lab named X is up" is the expected outcome when the test already took it down.
        let _ = runtime().block_on(lab::down(&self.0));
    }
}

fn same_host() -> LabOptions {
    LabOptions::default()
}

fn cross_host(mtu: Option<u32>) -> LabOptions {
    LabOptions {
        placement: Placement::CrossHost,
        mtu,
        ..LabOptions::default()
    }
}

/// Deletes a namespace the test made itself on drop.
struct NsGuard(&'static str);

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = netns::delete(self.0);
    }
}

/// A link as netlink reports it inside a namespace.
#[derive(Debug)]
struct Link {
    index: u32,
    kind: Option<String>,
    up: bool,
    /// IFLA_LINK: for a veth, the peer's ifindex (in the peer's namespace); for a
    /// macvlan/vlan, the parent's.
    link: Option<u32>,
    /// IFLA_VXLAN_LINK
    vxlan_link: Option<u32>,
    master: Option<u32>,
    mtu: u32,
    tx_packets: u64,
    addrs: Vec<String>,
}

/// All links of netns `ns` (None: the test's own) by name, read through a netlink socket
/// opened inside it.
async fn links_in(ns: Option<&str>) -> HashMap<String, Link> {
    let where_ = ns.unwrap_or("the test's own namespace");
    let rt = tokio::runtime::Handle::current();
    let (conn, handle, _) = netns::run_in(ns, || {
        let _rt = rt.enter();
        Ok(rtnetlink::new_connection()?)
    })
    .unwrap_or_else(|e| panic!("netlink connection in {where_}: {e:#}"));
    let conn = tokio::spawn(conn);
    let mut addrs: HashMap<u32, Vec<String>> = HashMap::new();
    let mut dump = handle.address().get().execute();
    while let Some(msg) = dump
        .try_next()
        .await
        .unwrap_or_else(|e| panic!("dumping the addresses in {where_}: {e}"))
    {
        for attr in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                addrs
                    .entry(msg.header.index)
                    .or_default()
                    .push(format!("{ip}/{}", msg.header.prefix_len));
            }
        }
    }
    let mut links = HashMap::new();
    let mut dump = handle.link().get().execute();
    while let Some(msg) = dump
        .try_next()
        .await
        .unwrap_or_else(|e| panic!("dumping the links in {where_}: {e}"))
    {
        let mut name = String::new();
        let mut link = Link {
            index: msg.header.index,
            kind: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            link: None,
            vxlan_link: None,
            master: None,
            mtu: 0,
            tx_packets: 0,
            addrs: addrs.remove(&msg.header.index).unwrap_or_default(),
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = n,
                LinkAttribute::Link(i) => link.link = Some(i),
                LinkAttribute::Controller(i) => link.master = Some(i),
                LinkAttribute::Mtu(m) => link.mtu = m,
                LinkAttribute::Stats64(st) => link.tx_packets = st.tx_packets,
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(kind) => {
                                link.kind = Some(match kind {
                                    InfoKind::Veth => "veth".into(),
                                    InfoKind::Bridge => "bridge".into(),
                                    InfoKind::Vxlan => "vxlan".into(),
                                    InfoKind::MacVlan => "macvlan".into(),
                                    InfoKind::Vlan => "vlan".into(),
                                    other => format!("{other:?}"),
                                });
                            }
                            LinkInfo::Data(InfoData::Vxlan(data)) => {
                                for d in data {
                                    if let InfoVxlan::Link(i) = d {
                                        link.vxlan_link = Some(i);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        links.insert(name, link);
    }
    conn.abort();
    links
}

/// Every interface the Lab names exists in its namespace with that ifindex, kind, addresses,
/// peer and master; everything is up, lo included; ifindexes are unique across the lab and
/// the test's own namespace.
async fn check_against_netlink(lab: &Lab) {
    let mut seen: HashSet<u32> = links_in(None).await.values().map(|l| l.index).collect();
    for ns in &lab.namespaces {
        let links = links_in(Some(ns)).await;
        assert!(
            links.get("lo").is_some_and(|lo| lo.up),
            "lo is not up in {ns}"
        );
        for iface in lab.interfaces.iter().filter(|i| &i.netns == ns) {
            let link = links
                .get(&iface.ifname)
                .unwrap_or_else(|| panic!("{} missing in {ns}", iface.ifname));
            assert_eq!(link.index, iface.ifindex, "{iface:?}");
            assert_eq!(link.kind.as_deref(), Some(iface.kind.as_str()), "{iface:?}");
            assert!(link.up, "{iface:?} is down");
            let mut addrs = link.addrs.clone();
            addrs.sort();
            assert_eq!(addrs, iface.addrs, "{iface:?}");
            assert_eq!(link.mtu, iface.mtu, "{iface:?}");
            match iface.kind.as_str() {
                "veth" => assert_eq!(
                    link.link,
                    iface.peer.as_ref().map(|p| p.ifindex),
                    "{iface:?}"
                ),
                "macvlan" | "vlan" => {
                    // The parent lives in a host namespace: a lab interface of that name
                    // with the ifindex netlink reports.
                    let parent = link
                        .link
                        .unwrap_or_else(|| panic!("{iface:?}: child without IFLA_LINK"));
                    let lower = iface
                        .link
                        .as_deref()
                        .unwrap_or_else(|| panic!("{iface:?}: child without link"));
                    assert!(
                        lab.interfaces
                            .iter()
                            .any(|i| i.ifname == lower && i.ifindex == parent && i.netns != *ns),
                        "{iface:?}: parent {parent}"
                    );
                }
                "vxlan" => {
                    // An unbound VTEP (no lower device) has neither.
                    let lower = iface.link.as_deref().map(|l| {
                        links
                            .get(l)
                            .map(|l| l.index)
                            .unwrap_or_else(|| panic!("{iface:?}: no lower device {l} in {ns}"))
                    });
                    assert_eq!(link.vxlan_link, lower, "{iface:?}");
                }
                _ => assert_eq!(link.link, None, "{iface:?}"),
            }
            if iface.kind != "macvlan" && iface.kind != "vlan" && iface.kind != "vxlan" {
                assert_eq!(iface.link, None, "{iface:?}");
            }
            let master = iface.master.as_ref().map(|m| links.get(m).map(|l| l.index));
            assert_eq!(link.master, master.flatten(), "{iface:?}");
            assert!(
                seen.insert(iface.ifindex),
                "ifindex {} is not unique",
                iface.ifindex
            );
        }
    }
}

/// A UDP datagram from the client's address reaches the server, and the reply comes back.
/// Bounded retries: the first datagram waits for ARP, which may take a moment.
fn check_udp(lab: &Lab) {
    check_udp_payload(lab, b"ping")
}

/// `check_udp` with a datagram of `payload` (and the same back).
fn check_udp_payload(lab: &Lab, payload: &[u8]) {
    let (client, server) = (&lab.client, &lab.server);
    let bind = |ns: &str, addr| {
        netns::run_in(Some(ns), || {
            let sock = UdpSocket::bind((addr, 0))?;
            sock.set_read_timeout(Some(Duration::from_millis(300)))?;
            Ok(sock)
        })
        .unwrap_or_else(|e| panic!("binding a UDP socket to {addr} in {ns}: {e:#}"))
    };
    let (tx, rx) = (
        bind(&client.netns, client.addr),
        bind(&server.netns, server.addr),
    );
    let (tx_addr, rx_addr) = (
        tx.local_addr().expect("the client socket's address"),
        rx.local_addr().expect("the server socket's address"),
    );
    let mut buf = vec![0u8; payload.len() + 64];
    for _ in 0..10 {
        tx.send_to(payload, rx_addr)
            .unwrap_or_else(|e| panic!("sending from {tx_addr} to {rx_addr}: {e}"));
        if let Ok((n, from)) = rx.recv_from(&mut buf) {
            assert_eq!((&buf[..n], from), (payload, tx_addr));
            rx.send_to(payload, from)
                .unwrap_or_else(|e| panic!("replying from {rx_addr} to {from}: {e}"));
            let (n, _) = tx
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("no reply from the server {rx_addr}: {e}"));
            assert_eq!(&buf[..n], payload);
            return;
        }
    }
    panic!("no datagram from {} reached {}", client.addr, server.addr)
}

fn assert_gone(name: &str, namespaces: &[String]) {
    for ns in namespaces {
        assert!(
            !Path::new(netns::NETNS_DIR).join(ns).exists(),
            "{ns} is still there"
        );
    }
    assert!(
        !Path::new(lab::STATE_DIR)
            .join(format!("{name}.json"))
            .exists(),
        "state of {name} is still there"
    );
}

/// Packets sent by `dev` in `ns` so far (netlink stats; /sys would show the test's own
/// namespace).
fn tx_packets(ns: &str, dev: &str) -> u64 {
    let links = runtime().block_on(links_in(Some(ns)));
    links
        .get(dev)
        .unwrap_or_else(|| panic!("no {dev} in {ns}"))
        .tx_packets
}

/// Up, check against netlink, UDP both ways, `extra` checks, state, refusal of a second up,
/// down. `ifaces`: (netns, ifname, addrs, mtu) in the Lab's order.
fn full_cycle(
    topology: Topology,
    options: &LabOptions,
    namespaces: &[&str],
    ifaces: &[(&str, &str, &str, u32)],
    extra: impl Fn(&Lab),
) {
    let _serial = serial();
    let rt = runtime();
    let name = lab::lab_name(topology, options.placement);
    // Guards are armed only once the lab is ours: other users of this machine may have a lab
    // of the same name up, and a failed `up` cleans up after itself.
    let lab = rt
        .block_on(lab::up(topology, options))
        .unwrap_or_else(|e| panic!("lab {name} up: {e:#}"));
    let _guard = LabGuard::new(&name);

    assert_eq!((lab.name.as_str(), lab.topology), (name.as_str(), topology));
    assert_eq!((lab.placement, lab.mtu), (options.placement, options.mtu));
    assert_eq!(lab.namespaces, namespaces);
    for ns in namespaces {
        assert!(
            Path::new(netns::NETNS_DIR).join(ns).exists(),
            "{ns} not in {}",
            netns::NETNS_DIR
        );
    }
    let got: Vec<_> = lab
        .interfaces
        .iter()
        .map(|i| {
            (
                i.netns.as_str(),
                i.ifname.as_str(),
                i.addrs.join(","),
                i.mtu,
            )
        })
        .collect();
    let want: Vec<_> = ifaces
        .iter()
        .map(|&(ns, ifname, addrs, mtu)| (ns, ifname, addrs.to_string(), mtu))
        .collect();
    assert_eq!(got, want);
    rt.block_on(check_against_netlink(&lab));
    check_udp(&lab);
    extra(&lab);

    let stored = lab::get(&name)
        .unwrap_or_else(|e| panic!("reading the state of {name}: {e:#}"))
        .unwrap_or_else(|| panic!("no state of {name} after up"));
    assert_eq!(
        serde_json::to_value(&stored).expect("the stored lab as JSON"),
        serde_json::to_value(&lab).expect("the lab `up` returned as JSON")
    );
    assert!(lab::list()
        .unwrap_or_else(|e| panic!("listing the labs: {e:#}"))
        .iter()
        .any(|l| l.name == name));

    let again = rt
        .block_on(lab::up(topology, options))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        again.to_string(),
        format!("lab {name} is already up (profiler lab down {name})")
    );
    assert!(again.is::<lab::AlreadyUp>(), "{again:?}");

    rt.block_on(lab::down(&name))
        .unwrap_or_else(|e| panic!("lab {name} down: {e:#}"));
    assert_gone(&name, &lab.namespaces);
    assert!(lab::get(&name)
        .unwrap_or_else(|e| panic!("reading the state of {name} after down: {e:#}"))
        .is_none());
}

fn no_extra(_: &Lab) {}

/// Another UDP exchange raises `dev`'s tx packet count in `ns`: the traffic crosses it.
fn crosses(lab: &Lab, ns: &str, dev: &str) {
    let before = tx_packets(ns, dev);
    check_udp(lab);
    let after = tx_packets(ns, dev);
    assert!(
        after > before,
        "{dev} in {ns}: tx_packets {before} -> {after}"
    );
}

#[test]
fn veth_lab_up_traffic_down() {
    full_cycle(
        Topology::Veth,
        &same_host(),
        &["prof-veth-pod-a", "prof-veth-pod-b"],
        &[
            ("prof-veth-pod-a", "eth0", "198.18.0.1/24", 1500),
            ("prof-veth-pod-b", "eth0", "198.18.0.2/24", 1500),
        ],
        no_extra,
    )
}

#[test]
fn bridge_lab_up_traffic_down() {
    full_cycle(
        Topology::Bridge,
        &same_host(),
        &["prof-bridge-pod-a", "prof-bridge-pod-b", "prof-bridge-host"],
        &[
            ("prof-bridge-pod-a", "eth0", "198.18.0.1/24", 1500),
            ("prof-bridge-host", "veth-a", "", 1500),
            ("prof-bridge-pod-b", "eth0", "198.18.0.2/24", 1500),
            ("prof-bridge-host", "veth-b", "", 1500),
            ("prof-bridge-host", "br0", "198.18.0.254/24", 1500),
        ],
        no_extra,
    )
}

#[test]
fn host_cross_host_lab_up_traffic_down() {
    full_cycle(
        Topology::Host,
        &cross_host(None),
        &["prof-host-xhost-host-a", "prof-host-xhost-host-b"],
        &[
            ("prof-host-xhost-host-a", "wire0", "198.19.0.1/24", 1500),
            ("prof-host-xhost-host-b", "wire0", "198.19.0.2/24", 1500),
        ],
        |lab| {
            assert_eq!(lab.client.addr.to_string(), "198.19.0.1");
            assert_eq!(lab.server.addr.to_string(), "198.19.0.2");
            crosses(lab, "prof-host-xhost-host-a", "wire0")
        },
    )
}

const BX: &str = "prof-bridge-xhost";

#[test]
fn bridge_cross_host_lab_up_traffic_down() {
    let ns = |role: &str| format!("{BX}-{role}");
    let (pa, pb, ha, hb) = (ns("pod-a"), ns("pod-b"), ns("host-a"), ns("host-b"));
    full_cycle(
        Topology::Bridge,
        &cross_host(None),
        &[&pa, &pb, &ha, &hb],
        &[
            (&ha, "wire0", "198.19.0.1/24", 1500),
            (&hb, "wire0", "198.19.0.2/24", 1500),
            (&pa, "eth0", "198.18.1.1/24", 1500),
            (&ha, "veth-a", "", 1500),
            (&pb, "eth0", "198.18.2.1/24", 1500),
            (&hb, "veth-b", "", 1500),
            (&ha, "cni0", "198.18.1.254/24", 1500),
            (&hb, "cni0", "198.18.2.254/24", 1500),
        ],
        |lab| {
            crosses(lab, &ha, "wire0");
            crosses(lab, &hb, "wire0");
        },
    )
}

const FX: &str = "prof-flannel-vxlan-xhost";

fn flannel_cycle(mtu: Option<u32>, pod_mtu: u32) {
    let ns = |role: &str| format!("{FX}-{role}");
    let (pa, pb, ha, hb) = (ns("pod-a"), ns("pod-b"), ns("host-a"), ns("host-b"));
    // The underlay keeps Ethernet's MTU whatever the pods get.
    let wire = 1500;
    full_cycle(
        Topology::FlannelVxlan,
        &cross_host(mtu),
        &[&pa, &pb, &ha, &hb],
        &[
            (&ha, "wire0", "198.19.0.1/24", wire),
            (&hb, "wire0", "198.19.0.2/24", wire),
            (&pa, "eth0", "198.18.1.1/24", pod_mtu),
            (&ha, "veth-a", "", pod_mtu),
            (&pb, "eth0", "198.18.2.1/24", pod_mtu),
            (&hb, "veth-b", "", pod_mtu),
            (&ha, "cni0", "198.18.1.254/24", pod_mtu),
            (&hb, "cni0", "198.18.2.254/24", pod_mtu),
            (&ha, "flannel.1", "198.18.1.0/32", pod_mtu),
            (&hb, "flannel.1", "198.18.2.0/32", pod_mtu),
        ],
        |lab| {
            let vx = lab
                .interfaces
                .iter()
                .find(|i| i.ifname == "flannel.1")
                .expect("no flannel.1 among the lab's interfaces");
            // Bound to wire0 as flannel binds it, unless the pods' MTU does not fit the wire:
            // the kernel refuses such an MTU on a bound VTEP, so the lab leaves it unbound.
            let bound = (pod_mtu + 50 <= wire).then_some("wire0");
            assert_eq!((vx.kind.as_str(), vx.link.as_deref()), ("vxlan", bound));
            // The request leaves through host-a's flannel.1, the reply through host-b's.
            crosses(lab, &ha, "flannel.1");
            crosses(lab, &hb, "flannel.1");
            crosses(lab, &ha, "wire0");
            // The largest datagram the pods send unfragmented, both ways. With pod MTU 1500 its
            // VXLAN packet (1550 bytes) does not fit the 1500 wire: the kernel fragments the
            // outer packet (vxlan does not set DF) and host-b reassembles it, so it still
            // arrives, as two packets on the wire. (A few unrelated packets, e.g. IPv6
            // neighbour discovery after link up, may cross too: hence the range.)
            let payload = vec![0x5a; pod_mtu as usize - 28];
            let before = tx_packets(&ha, "wire0");
            for _ in 0..10 {
                check_udp_payload(lab, &payload);
            }
            let sent = tx_packets(&ha, "wire0") - before;
            let per_datagram = if pod_mtu + 50 > wire { 2 } else { 1 };
            assert!(
                (10 * per_datagram..10 * per_datagram + 5).contains(&sent),
                "host-a wire0 sent {sent} packets for 10 {pod_mtu}-byte packets"
            );
        },
    )
}

#[test]
fn flannel_vxlan_cross_host_lab_up_traffic_down() {
    flannel_cycle(None, 1450)
}

#[test]
fn flannel_vxlan_mtu_option_sets_the_pods_mtu() {
    flannel_cycle(Some(1400), 1400)
}

/// The mismatch flannel's 1450 avoids: pods at 1500 over a 1500 wire.
#[test]
fn flannel_vxlan_mtu_1500_fragments_the_outer_packets() {
    flannel_cycle(Some(1500), 1500)
}

#[test]
fn macvlan_same_host_lab_up_traffic_down() {
    let ns = |role: &str| format!("prof-macvlan-{role}");
    let (pa, pb, ha, wp) = (ns("pod-a"), ns("pod-b"), ns("host-a"), ns("wire-peer"));
    full_cycle(
        Topology::Macvlan,
        &same_host(),
        &[&pa, &pb, &ha, &wp],
        &[
            (&ha, "wire0", "198.19.0.1/24", 1500),
            (&wp, "wire0", "198.19.0.2/24", 1500),
            (&pa, "eth0", "198.18.0.1/24", 1500),
            (&pb, "eth0", "198.18.0.2/24", 1500),
        ],
        |lab| {
            let kinds: Vec<_> = lab.interfaces.iter().map(|i| i.kind.as_str()).collect();
            assert_eq!(kinds, ["veth", "veth", "macvlan", "macvlan"]);
        },
    )
}

#[test]
fn macvlan_cross_host_lab_up_traffic_down() {
    let ns = |role: &str| format!("prof-macvlan-xhost-{role}");
    let (pa, pb, ha, hb) = (ns("pod-a"), ns("pod-b"), ns("host-a"), ns("host-b"));
    full_cycle(
        Topology::Macvlan,
        &cross_host(Some(1400)),
        &[&pa, &pb, &ha, &hb],
        &[
            (&ha, "wire0", "198.19.0.1/24", 1500),
            (&hb, "wire0", "198.19.0.2/24", 1500),
            (&pa, "eth0", "198.18.0.1/24", 1400),
            (&pb, "eth0", "198.18.0.2/24", 1400),
        ],
        |lab| crosses(lab, &ns("host-a"), "wire0"),
    )
}

#[test]
fn vlan_cross_host_lab_up_traffic_down() {
    let ns = |role: &str| format!("prof-vlan-xhost-{role}");
    let (pa, pb, ha, hb) = (ns("pod-a"), ns("pod-b"), ns("host-a"), ns("host-b"));
    {
        // Kernels without 8021q (like this project's 6.18) refuse vlan devices midway
        // through `up`: then everything made so far must be gone again.
        let _serial = serial();
        match runtime().block_on(lab::up(Topology::Vlan, &cross_host(None))) {
            Err(e) if matches!(e.downcast_ref(), Some(lab::CannotBuild::Lacks { .. })) => {
                assert!(format!("{e:#}").contains("8021q"), "{e:#}");
                assert_gone("vlan-xhost", &[pa, pb, ha, hb]);
                skip(
                    &format!("this kernel cannot make vlan devices: {e:#}"),
                    Some(Absence::Vlan8021q),
                );
                return;
            }
            Err(e) => panic!("lab vlan-xhost up: {e:#}"),
            Ok(_) => {
                let _guard = LabGuard::new("vlan-xhost");
                runtime()
                    .block_on(lab::down("vlan-xhost"))
                    .unwrap_or_else(|e| panic!("lab vlan-xhost down: {e:#}"))
            }
        }
    }
    full_cycle(
        Topology::Vlan,
        &cross_host(None),
        &[&pa, &pb, &ha, &hb],
        &[
            (&ha, "wire0", "198.19.0.1/24", 1500),
            (&hb, "wire0", "198.19.0.2/24", 1500),
            (&pa, "eth0", "198.18.0.1/24", 1500),
            (&pb, "eth0", "198.18.0.2/24", 1500),
        ],
        |lab| {
            let kinds: Vec<_> = lab.interfaces.iter().map(|i| i.kind.as_str()).collect();
            assert_eq!(kinds, ["veth", "veth", "vlan", "vlan"]);
            crosses(lab, &ns("host-a"), "wire0");
        },
    )
}

/// Combinations that do not exist fail with one line, before any namespace is made.
#[test]
fn unsupported_combinations_error_before_creating_anything() {
    let _serial = serial();
    let rt = runtime();
    let cases = [
        (
            Topology::Host,
            same_host(),
            "host needs --placement cross-host",
        ),
        (
            Topology::Veth,
            cross_host(None),
            "veth connects two namespaces",
        ),
        (
            Topology::Vlan,
            same_host(),
            "vlan needs --placement cross-host",
        ),
        (
            Topology::FlannelVxlan,
            same_host(),
            "flannel-vxlan same-host would not cross the tunnel device; use --placement cross-host",
        ),
    ];
    for (topology, options, want) in cases {
        let name = lab::lab_name(topology, options.placement);
        let err = match rt.block_on(lab::up(topology, &options)) {
            Ok(_) => {
                let _guard = LabGuard::new(&name);
                panic!("{name} came up")
            }
            Err(e) => e,
        };
        let msg = format!("{err:#}");
        assert!(msg.starts_with(want) && !msg.contains('\n'), "{msg}");
        assert!(
            lab::CannotBuild::is(&err),
            "a lab that cannot be built so: {msg}"
        );
        let prefix = format!("prof-{name}-");
        let leftovers: Vec<_> = std::fs::read_dir(netns::NETNS_DIR)
            .unwrap_or_else(|e| panic!("reading {}: {e}", netns::NETNS_DIR))
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

#[test]
fn bridge_lab_goes_through_the_host() {
    let _serial = serial();
    let rt = runtime();
    let lab = rt
        .block_on(lab::up(Topology::Bridge, &same_host()))
        .unwrap_or_else(|e| panic!("lab bridge up: {e:#}"));
    let _guard = LabGuard::new("bridge");
    assert_eq!(lab.client.netns, "prof-bridge-pod-a");
    assert_eq!(lab.client.addr.to_string(), "198.18.0.1");
    assert_eq!(lab.server.addr.to_string(), "198.18.0.2");
    let ports = lab
        .interfaces
        .iter()
        .filter(|i| i.master.as_deref() == Some("br0"))
        .count();
    assert_eq!(ports, 2);
}

#[test]
fn down_of_a_lab_that_is_not_up_errors() {
    let _serial = serial();
    let rt = runtime();
    for name in ["nope", "veth"] {
        let err = rt.block_on(lab::down(name)).unwrap_err();
        assert_eq!(err.to_string(), format!("no lab named {name} is up"));
    }
}

/// A namespace of the lab's name that someone else made blocks `up`, and stays untouched.
#[test]
fn up_refuses_a_foreign_namespace_and_leaves_it_alone() {
    let _serial = serial();
    let rt = runtime();
    netns::add("prof-bridge-host")
        .unwrap_or_else(|e| panic!("making the foreign namespace prof-bridge-host: {e:#}"));
    let _foreign = NsGuard("prof-bridge-host");
    let err = match rt.block_on(lab::up(Topology::Bridge, &same_host())) {
        Ok(_) => {
            let _guard = LabGuard::new("bridge");
            panic!("bridge came up")
        }
        Err(e) => e,
    };
    assert_eq!(
        err.to_string(),
        "lab bridge is already up (profiler lab down bridge)"
    );
    assert!(err.is::<lab::AlreadyUp>(), "{err:?}");
    assert!(netns::exists("prof-bridge-host"));
    assert!(!netns::exists("prof-bridge-pod-a") && !netns::exists("prof-bridge-pod-b"));
}

/// `up` fails at its very last step (a directory squats the state file's temporary name), after
/// every namespace and device exists: all of them must be gone again, root-namespace veths too.
#[test]
fn failed_up_removes_everything_it_made() {
    let _serial = serial();
    let rt = runtime();
    let squat = Path::new(lab::STATE_DIR).join("bridge.json.tmp");
    std::fs::create_dir_all(&squat)
        .unwrap_or_else(|e| panic!("making the squatting directory {}: {e}", squat.display()));
    let root_before = rt.block_on(link_names_here());
    let result = rt.block_on(lab::up(Topology::Bridge, &same_host()));
    std::fs::remove_dir(&squat)
        .unwrap_or_else(|e| panic!("removing the squatting directory {}: {e}", squat.display()));
    let _guard = result.is_ok().then(|| LabGuard::new("bridge"));
    let err = result.map(|_| ()).unwrap_err();
    assert!(format!("{err:#}").contains("bridge.json.tmp"), "{err:#}");
    assert_gone(
        "bridge",
        &[
            "prof-bridge-pod-a".into(),
            "prof-bridge-pod-b".into(),
            "prof-bridge-host".into(),
        ],
    );
    assert_eq!(rt.block_on(link_names_here()), root_before);
}

/// Names of the links in the test's own namespace, sorted.
async fn link_names_here() -> Vec<String> {
    let mut names: Vec<String> = links_in(None).await.into_keys().collect();
    names.sort();
    names
}

#[test]
fn run_in_switches_namespace_and_inode_matches() {
    let _serial = serial();
    netns::add("prof-test-runin")
        .unwrap_or_else(|e| panic!("making namespace prof-test-runin: {e:#}"));
    let _ns = NsGuard("prof-test-runin");
    let err = netns::add("prof-test-runin").unwrap_err();
    assert_eq!(
        err.to_string(),
        "network namespace prof-test-runin already exists"
    );
    let here =
        || netns::current_inode().unwrap_or_else(|e| panic!("this namespace's inode: {e:#}"));
    let inside = netns::run_in(Some("prof-test-runin"), netns::current_inode)
        .unwrap_or_else(|e| panic!("the inode seen inside prof-test-runin: {e:#}"));
    assert_eq!(
        inside,
        netns::inode("prof-test-runin")
            .unwrap_or_else(|e| panic!("the inode of prof-test-runin: {e:#}"))
    );
    assert_ne!(inside, here());
    assert_eq!(
        netns::run_in(None, netns::current_inode)
            .unwrap_or_else(|e| panic!("the inode seen through run_in(None): {e:#}")),
        here()
    );
    netns::delete("prof-test-runin")
        .unwrap_or_else(|e| panic!("deleting namespace prof-test-runin: {e:#}"));
    assert!(!netns::exists("prof-test-runin"));
    netns::delete("prof-test-runin")
        .unwrap_or_else(|e| panic!("deleting prof-test-runin a second time: {e:#}"));
    let err = netns::run_in(Some("prof-test-runin"), || Ok(())).unwrap_err();
    assert_eq!(err.to_string(), "unknown network namespace prof-test-runin");
}

/// The topologies that need modules this project's 6.18 kernel lacks (ipvlan, geneve,
/// openvswitch; tests/vm.rs runs them in the VM lab) fail with one line naming the module and
/// leave nothing behind; on a kernel that has the modules they come up and carry traffic.
#[test]
fn vm_lab_topologies_fail_cleanly_without_their_modules() {
    let _serial = serial();
    let cases = [
        (Topology::IpvlanL2, same_host(), "ipvlan"),
        (Topology::IpvlanL3, cross_host(None), "ipvlan"),
        (Topology::Geneve, cross_host(None), "geneve"),
        (Topology::OvsVlan, same_host(), "openvswitch"),
        (Topology::OvsVlan, cross_host(None), "openvswitch"),
        (Topology::OvsFlat, cross_host(None), "openvswitch"),
        (Topology::OvsVxlan, cross_host(None), "openvswitch"),
        (Topology::OvsGre, cross_host(None), "openvswitch"),
    ];
    for (topology, options, module) in cases {
        let name = lab::lab_name(topology, options.placement);
        match runtime().block_on(lab::up(topology, &options)) {
            Ok(lab) => {
                let _guard = LabGuard::new(&name);
                check_udp(&lab);
            }
            Err(e) => {
                assert_eq!(
                    format!("{e:#}"),
                    format!(
                        "{} needs the {module} kernel module, which this kernel lacks (run it in \
                         the VM lab: cargo xtask vm)",
                        topology.name()
                    )
                );
                let left = |dir: &str, prefix: String| -> Vec<String> {
                    std::fs::read_dir(dir)
                        .map(|d| {
                            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                                .filter(|n| n.starts_with(&prefix))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                let namespaces = left(netns::NETNS_DIR, format!("prof-{name}-"));
                assert!(namespaces.is_empty(), "{name}: {namespaces:?} left behind");
                let ovs = left("/run/profiler/ovs", format!("{name}-"));
                assert!(
                    ovs.is_empty(),
                    "{name}: OVS directories {ovs:?} left behind"
                );
                assert!(
                    lab::get(&name)
                        .unwrap_or_else(|e| panic!("reading the state of {name}: {e:#}"))
                        .is_none(),
                    "{name}: state left behind"
                );
            }
        }
    }
}

/// sriov needs SR-IOV NICs (igb), which only the VM lab has (`cargo xtask vm --nic igb`): a
/// machine without them is told so in one line, before anything is made.
#[test]
fn sriov_fails_cleanly_without_an_sriov_nic() {
    let has_igb = std::fs::read_dir("/sys/bus/pci/drivers/igb").is_ok_and(|d| {
        d.flatten()
            .any(|e| e.path().join("sriov_totalvfs").exists())
    });
    if has_igb {
        skip(
            "this machine has an igb NIC (tests/vm/sriov.rs runs the lab)",
            Some(Absence::HasIgbNic),
        );
        return;
    }
    let _serial = serial();
    for (options, wanted) in [
        (same_host(), "an SR-IOV NIC"),
        (cross_host(None), "2 SR-IOV NICs"),
    ] {
        let name = lab::lab_name(Topology::Sriov, options.placement);
        let e = runtime()
            .block_on(lab::up(Topology::Sriov, &options))
            .expect_err("sriov came up without an SR-IOV NIC");
        assert_eq!(
            format!("{e:#}"),
            format!(
                "sriov needs {wanted} (igb) without VFs, which this machine lacks (the VM lab \
                 has two: cargo xtask vm --nic igb)"
            )
        );
        assert!(
            !netns::exists(&format!("prof-{name}-pod-a")),
            "{name}: namespace made"
        );
    }
}
