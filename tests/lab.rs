//! Lab topologies against the real kernel (needs root): what `up` reports must be what netlink
//! sees, traffic must flow pod-a -> pod-b, and `down` or a failed `up` must leave nothing.
//! Every test holds LOCK (labs and namespace names are machine-global) and cleans up through
//! Drop guards, so a failed assertion does not leak namespaces into the next test.
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, UdpSocket};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result};
use futures::TryStreamExt as _;
use profiler::lab::{self, Lab, Topology};
use profiler::netns;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo};

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
struct LabGuard(&'static str);

impl Drop for LabGuard {
    fn drop(&mut self) {
        // "no lab named X is up" is the expected outcome when the test already took it down.
        let _ = runtime().block_on(lab::down(self.0));
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
    /// IFLA_LINK: for a veth, the peer's ifindex (in the peer's namespace).
    link: Option<u32>,
    master: Option<u32>,
    addrs: Vec<String>,
}

/// All links of netns `ns` (None: the test's own) by name, read through a netlink socket
/// opened inside it.
async fn links_in(ns: Option<&str>) -> Result<HashMap<String, Link>> {
    let rt = tokio::runtime::Handle::current();
    let (conn, handle, _) = netns::run_in(ns, || {
        let _rt = rt.enter();
        Ok(rtnetlink::new_connection()?)
    })?;
    let conn = tokio::spawn(conn);
    let mut addrs: HashMap<u32, Vec<String>> = HashMap::new();
    let mut dump = handle.address().get().execute();
    while let Some(msg) = dump.try_next().await? {
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
    while let Some(msg) = dump.try_next().await? {
        let mut name = String::new();
        let mut link = Link {
            index: msg.header.index,
            kind: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            link: None,
            master: None,
            addrs: addrs.remove(&msg.header.index).unwrap_or_default(),
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = n,
                LinkAttribute::Link(i) => link.link = Some(i),
                LinkAttribute::Controller(i) => link.master = Some(i),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(match kind {
                                InfoKind::Veth => "veth".into(),
                                InfoKind::Bridge => "bridge".into(),
                                other => format!("{other:?}"),
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        links.insert(name, link);
    }
    conn.abort();
    Ok(links)
}

/// Every interface the Lab names exists in its namespace with that ifindex, kind, addresses,
/// peer and master; everything is up, lo included; ifindexes are unique across the lab and
/// the test's own namespace.
async fn check_against_netlink(lab: &Lab) -> Result<()> {
    let mut seen: HashSet<u32> = links_in(None).await?.values().map(|l| l.index).collect();
    for ns in &lab.namespaces {
        let links = links_in(Some(ns)).await?;
        assert!(
            links.get("lo").is_some_and(|lo| lo.up),
            "lo is not up in {ns}"
        );
        for iface in lab.interfaces.iter().filter(|i| &i.netns == ns) {
            let link = links
                .get(&iface.ifname)
                .with_context(|| format!("{} missing in {ns}", iface.ifname))?;
            assert_eq!(link.index, iface.ifindex, "{iface:?}");
            assert_eq!(link.kind.as_deref(), Some(iface.kind.as_str()), "{iface:?}");
            assert!(link.up, "{iface:?} is down");
            let mut addrs = link.addrs.clone();
            addrs.sort();
            assert_eq!(addrs, iface.addrs, "{iface:?}");
            assert_eq!(
                link.link,
                iface.peer.as_ref().map(|p| p.ifindex),
                "{iface:?}"
            );
            let master = iface.master.as_ref().map(|m| links.get(m).map(|l| l.index));
            assert_eq!(link.master, master.flatten(), "{iface:?}");
            assert!(
                seen.insert(iface.ifindex),
                "ifindex {} is not unique",
                iface.ifindex
            );
        }
    }
    for crossing in &lab.path {
        for end in [&crossing.tx, &crossing.rx] {
            let iface = lab
                .interfaces
                .iter()
                .find(|i| i.netns == end.netns && i.ifname == end.ifname);
            assert_eq!(iface.map(|i| i.ifindex), Some(end.ifindex), "{end:?}");
        }
    }
    Ok(())
}

/// A UDP datagram from the client's address reaches the server, and the reply comes back.
/// Bounded retries: the first datagram waits for ARP, which may take a moment.
fn check_udp(lab: &Lab) -> Result<()> {
    let (client, server) = (&lab.client, &lab.server);
    let bind = |ns: &str, addr| {
        netns::run_in(Some(ns), || {
            let sock = UdpSocket::bind((addr, 0))?;
            sock.set_read_timeout(Some(Duration::from_millis(300)))?;
            Ok(sock)
        })
    };
    let (tx, rx) = (
        bind(&client.netns, client.addr)?,
        bind(&server.netns, server.addr)?,
    );
    let mut buf = [0u8; 64];
    for _ in 0..10 {
        tx.send_to(b"ping", rx.local_addr()?)?;
        if let Ok((n, from)) = rx.recv_from(&mut buf) {
            assert_eq!((&buf[..n], from), (&b"ping"[..], tx.local_addr()?));
            rx.send_to(b"pong", from)?;
            let (n, _) = tx.recv_from(&mut buf).context("no reply from the server")?;
            assert_eq!(&buf[..n], b"pong");
            return Ok(());
        }
    }
    anyhow::bail!("no datagram from {} reached {}", client.addr, server.addr)
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

fn full_cycle(
    topology: Topology,
    namespaces: &[&str],
    ifaces: &[(&str, &str, &str)],
) -> Result<()> {
    let _serial = serial();
    let rt = runtime();
    let name = topology.name();
    let _guard = LabGuard(name);
    let lab = rt.block_on(lab::up(topology))?;

    assert_eq!((lab.name.as_str(), lab.topology), (name, topology));
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
        .map(|i| (i.netns.as_str(), i.ifname.as_str(), i.addrs.join(",")))
        .collect();
    let want: Vec<_> = ifaces
        .iter()
        .map(|&(ns, ifname, addrs)| (ns, ifname, addrs.to_string()))
        .collect();
    assert_eq!(got, want);
    rt.block_on(check_against_netlink(&lab))?;
    check_udp(&lab)?;

    let stored = lab::get(name)?.context("no state after up")?;
    assert_eq!(serde_json::to_value(&stored)?, serde_json::to_value(&lab)?);
    assert!(lab::list()?.iter().any(|l| l.name == name));

    let again = rt.block_on(lab::up(topology)).map(|_| ()).unwrap_err();
    assert_eq!(
        again.to_string(),
        format!("lab {name} is already up (profiler lab down {name})")
    );

    rt.block_on(lab::down(name))?;
    assert_gone(name, &lab.namespaces);
    assert!(lab::get(name)?.is_none());
    Ok(())
}

#[test]
fn veth_lab_up_traffic_down() -> Result<()> {
    full_cycle(
        Topology::Veth,
        &["prof-veth-pod-a", "prof-veth-pod-b"],
        &[
            ("prof-veth-pod-a", "eth0", "198.18.0.1/24"),
            ("prof-veth-pod-b", "eth0", "198.18.0.2/24"),
        ],
    )
}

#[test]
fn bridge_lab_up_traffic_down() -> Result<()> {
    full_cycle(
        Topology::Bridge,
        &["prof-bridge-pod-a", "prof-bridge-pod-b", "prof-bridge-host"],
        &[
            ("prof-bridge-pod-a", "eth0", "198.18.0.1/24"),
            ("prof-bridge-host", "veth-a", ""),
            ("prof-bridge-pod-b", "eth0", "198.18.0.2/24"),
            ("prof-bridge-host", "veth-b", ""),
            ("prof-bridge-host", "br0", "198.18.0.254/24"),
        ],
    )
}

#[test]
fn bridge_lab_path_goes_through_the_host() -> Result<()> {
    let _serial = serial();
    let rt = runtime();
    let _guard = LabGuard("bridge");
    let lab = rt.block_on(lab::up(Topology::Bridge))?;
    let hops: Vec<_> = lab
        .path
        .iter()
        .map(|c| {
            (
                c.tx.ifname.as_str(),
                c.rx.netns.as_str(),
                c.rx.ifname.as_str(),
            )
        })
        .collect();
    assert_eq!(
        hops,
        [
            ("eth0", "prof-bridge-host", "veth-a"),
            ("veth-b", "prof-bridge-pod-b", "eth0")
        ]
    );
    assert_eq!(lab.path[0].tx.netns, lab.client.netns);
    assert_eq!(lab.client.addr.to_string(), "198.18.0.1");
    assert_eq!(lab.server.addr.to_string(), "198.18.0.2");
    let ports = lab
        .interfaces
        .iter()
        .filter(|i| i.master.as_deref() == Some("br0"))
        .count();
    assert_eq!(ports, 2);
    Ok(())
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
fn up_refuses_a_foreign_namespace_and_leaves_it_alone() -> Result<()> {
    let _serial = serial();
    let rt = runtime();
    let _foreign = NsGuard("prof-bridge-host");
    let _guard = LabGuard("bridge");
    netns::add("prof-bridge-host")?;
    let err = rt
        .block_on(lab::up(Topology::Bridge))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "lab bridge is already up (profiler lab down bridge)"
    );
    assert!(netns::exists("prof-bridge-host"));
    assert!(!netns::exists("prof-bridge-pod-a") && !netns::exists("prof-bridge-pod-b"));
    Ok(())
}

/// `up` fails at its very last step (a directory squats the state file's temporary name), after
/// every namespace and device exists: all of them must be gone again, root-namespace veths too.
#[test]
fn failed_up_removes_everything_it_made() -> Result<()> {
    let _serial = serial();
    let rt = runtime();
    let _guard = LabGuard("bridge");
    let squat = Path::new(lab::STATE_DIR).join("bridge.json.tmp");
    std::fs::create_dir_all(&squat)?;
    let root_before = rt.block_on(link_names_here())?;
    let result = rt.block_on(lab::up(Topology::Bridge));
    std::fs::remove_dir(&squat)?;
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
    assert_eq!(rt.block_on(link_names_here())?, root_before);
    Ok(())
}

/// Names of the links in the test's own namespace, sorted.
async fn link_names_here() -> Result<Vec<String>> {
    let mut names: Vec<String> = links_in(None).await?.into_keys().collect();
    names.sort();
    Ok(names)
}

#[test]
fn run_in_switches_namespace_and_inode_matches() -> Result<()> {
    let _serial = serial();
    let _ns = NsGuard("prof-test-runin");
    netns::add("prof-test-runin")?;
    let err = netns::add("prof-test-runin").unwrap_err();
    assert_eq!(
        err.to_string(),
        "network namespace prof-test-runin already exists"
    );
    let inside = netns::run_in(Some("prof-test-runin"), netns::current_inode)?;
    assert_eq!(inside, netns::inode("prof-test-runin")?);
    assert_ne!(inside, netns::current_inode()?);
    assert_eq!(
        netns::run_in(None, netns::current_inode)?,
        netns::current_inode()?
    );
    netns::delete("prof-test-runin")?;
    assert!(!netns::exists("prof-test-runin"));
    netns::delete("prof-test-runin")?;
    let err = netns::run_in(Some("prof-test-runin"), || Ok(())).unwrap_err();
    assert_eq!(err.to_string(), "unknown network namespace prof-test-runin");
    Ok(())
}
