//! The topologies only a stock kernel has the modules for (ipvlan, geneve, Open vSwitch): each
//! comes up, carries pod-to-pod traffic over the devices it is made of, gives a complete
//! profile, and goes down leaving no namespace, OVS daemon, OVS directory or state file, also
//! when `up` is interrupted midway or a run made the lab itself. OVS labs joined by wire0 tag
//! the pods' frames on it (ovs-vlan) or not (ovs-flat), as their datapath flows show.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use profiler::report::schema::{AttachReport, HookStatus, Status};

use crate::common::{
    assert_clean_of, assert_complete, assert_in_order, direction, lab_up, profiler, run_json,
    LabGuard,
};

const OVS_DIR: &str = "/run/profiler/ovs";

/// A lab of the VM-only topologies: how to bring it up, and what its traffic must cross.
struct Case {
    topology: &'static str,
    placement: &'static str,
    /// lab_name(topology, placement)
    name: &'static str,
    /// pod-b's address
    server: &'static str,
    /// Devices the request's hops must include (by name, in any namespace).
    crosses: &'static [&'static str],
    /// Deep hooks (kernel functions) the request must meet, in this order.
    functions: &'static [&'static str],
}

/// The OVS kernel datapath's functions a frame meets through one host's br-int.
const OVS_ONE_HOST: &[&str] = &[
    "ovs_vport_receive",
    "ovs_dp_process_packet",
    "ovs_execute_actions",
    "ovs_vport_send",
];

/// Through host-a's br-int, the wire (a veth pair), then host-b's.
const OVS_TWO_HOSTS: &[&str] = &[
    "ovs_vport_receive",
    "ovs_dp_process_packet",
    "ovs_execute_actions",
    "ovs_vport_send",
    "veth_xmit",
    "ovs_vport_receive",
    "ovs_dp_process_packet",
    "ovs_execute_actions",
    "ovs_vport_send",
];

const CASES: &[Case] = &[
    Case {
        topology: "ipvlan-l2",
        placement: "same-host",
        name: "ipvlan-l2",
        server: "198.18.0.2",
        crosses: &["eth0"],
        functions: &["ipvlan_queue_xmit"],
    },
    Case {
        topology: "ipvlan-l2",
        placement: "cross-host",
        name: "ipvlan-l2-xhost",
        server: "198.18.0.2",
        crosses: &["eth0", "wire0"],
        functions: &["ipvlan_queue_xmit", "veth_xmit", "ipvlan_handle_frame"],
    },
    Case {
        topology: "ipvlan-l3",
        placement: "same-host",
        name: "ipvlan-l3",
        server: "198.18.0.2",
        crosses: &["eth0"],
        functions: &["ipvlan_queue_xmit"],
    },
    Case {
        topology: "ipvlan-l3",
        placement: "cross-host",
        name: "ipvlan-l3-xhost",
        server: "198.18.0.2",
        crosses: &["eth0", "wire0"],
        functions: &["ipvlan_queue_xmit", "veth_xmit", "ipvlan_handle_frame"],
    },
    Case {
        topology: "geneve",
        placement: "cross-host",
        name: "geneve-xhost",
        server: "198.18.2.1",
        crosses: &["veth-a", "cni0", "geneve0", "wire0", "veth-b"],
        functions: &[
            "geneve_xmit",
            "udp_tunnel_xmit_skb",
            "veth_xmit",
            "geneve_udp_encap_recv",
        ],
    },
    Case {
        topology: "ovs-vlan",
        placement: "same-host",
        name: "ovs-vlan",
        server: "198.18.0.2",
        crosses: &["veth-a", "veth-b"],
        functions: OVS_ONE_HOST,
    },
    Case {
        topology: "ovs-vlan",
        placement: "cross-host",
        name: "ovs-vlan-xhost",
        server: "198.18.0.2",
        crosses: &["veth-a", "wire0", "veth-b"],
        functions: OVS_TWO_HOSTS,
    },
    // Not a module's: the lab's own tc program, on a kernel before tcx (the profile's filters
    // and the redirect's share each veth's clsact, the redirect last).
    Case {
        topology: "ebpf-redirect",
        placement: "same-host",
        name: "ebpf-redirect",
        server: "198.18.0.2",
        crosses: &["veth-a", "eth0"],
        functions: &["veth_xmit"],
    },
    Case {
        topology: "ovs-flat",
        placement: "same-host",
        name: "ovs-flat",
        server: "198.18.0.2",
        crosses: &["veth-a", "veth-b"],
        functions: OVS_ONE_HOST,
    },
    Case {
        topology: "ovs-flat",
        placement: "cross-host",
        name: "ovs-flat-xhost",
        server: "198.18.0.2",
        crosses: &["veth-a", "wire0", "veth-b"],
        functions: OVS_TWO_HOSTS,
    },
    Case {
        topology: "ovs-vxlan",
        placement: "cross-host",
        name: "ovs-vxlan-xhost",
        server: "198.18.0.2",
        crosses: &["veth-a", "vxlan_sys_4789", "wire0", "veth-b"],
        functions: &[
            "ovs_vport_receive",
            "ovs_dp_process_packet",
            "ovs_execute_actions",
            "ovs_vport_send",
            "vxlan_xmit",
            "udp_tunnel_xmit_skb",
            "veth_xmit",
            "vxlan_rcv",
            "ovs_vport_receive",
            "ovs_dp_process_packet",
            "ovs_execute_actions",
            "ovs_vport_send",
        ],
    },
    Case {
        topology: "ovs-gre",
        placement: "cross-host",
        name: "ovs-gre-xhost",
        server: "198.18.0.2",
        crosses: &["veth-a", "gre_sys", "wire0", "veth-b"],
        functions: &[
            "ovs_vport_receive",
            "ovs_dp_process_packet",
            "ovs_execute_actions",
            "ovs_vport_send",
            "gre_tap_xmit",
            "veth_xmit",
            "gre_rcv",
            "ovs_vport_receive",
            "ovs_dp_process_packet",
            "ovs_execute_actions",
            "ovs_vport_send",
        ],
    },
];

fn case(name: &str) -> &'static Case {
    CASES
        .iter()
        .find(|c| c.name == name)
        .expect("a case of that name")
}

fn lab_down(name: &str) {
    let down = profiler(&["lab", "down", name]);
    assert!(
        down.status.success(),
        "lab down {name}: {}",
        String::from_utf8_lossy(&down.stderr)
    );
}

fn ping(c: &Case) {
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("prof-{}-pod-a", c.name)])
        .args(["ping", "-c", "3", "-i", "0.3", "-W", "5", c.server])
        .output()
        .expect("running ping");
    assert!(
        out.status.success(),
        "{}: ping {}: {}{}",
        c.name,
        c.server,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Processes whose command line names one of the lab's OVS directories.
fn ovs_daemons_of(name: &str) -> Vec<String> {
    let ours = format!("{OVS_DIR}/{name}-");
    std::fs::read_dir("/proc")
        .expect("listing /proc")
        .filter_map(|p| std::fs::read(p.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&ours))
        .collect()
}

/// Nothing of lab `name` is left: namespaces, BPF programs, OVS daemons and directories, state.
pub(crate) fn assert_nothing_left(name: &str) {
    assert_clean_of(name);
    let daemons = ovs_daemons_of(name);
    assert!(daemons.is_empty(), "{name}: OVS daemons left: {daemons:?}");
    let dirs: Vec<_> = std::fs::read_dir(OVS_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|f| f.starts_with(&format!("{name}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(dirs.is_empty(), "{name}: OVS directories left: {dirs:?}");
    let state = Path::new("/run/profiler/labs").join(format!("{name}.json"));
    assert!(!state.exists(), "{name}: {} left", state.display());
}

/// Up, ping, a complete UDP profile whose request crosses the case's devices, down, clean.
fn full_cycle(name: &str) {
    let c = case(name);
    let _guard = lab_up(&[c.topology, "--placement", c.placement]);
    ping(c);
    let r = run_json(&[
        "--lab",
        c.topology,
        "--placement",
        c.placement,
        "--proto",
        "udp",
        "--count",
        "50",
    ]);
    assert_complete(&r, 50, c.name);
    let hops = direction(&r, "request").hop_sequence();
    println!("{}: request hops {hops:?}", c.name);
    for dev in c.crosses {
        assert!(
            hops.iter().any(|(_, ifname)| *ifname == Some(*dev)),
            "{}: the request did not cross {dev}: {hops:?}",
            c.name
        );
    }
    assert_in_order(&hops, c.functions, c.name);
    if let Some(tagged) = tags_on_the_wire(c) {
        // The datapath's flows of host-a for the pods' IPv4, made by the pings (they idle out
        // after 10 s). Not the others: frames flooded to br-int's own port (a trunk of every
        // VLAN) are tagged whatever the uplink.
        ping(c);
        let flows = datapath_flows(c.name, "host-a");
        println!("{}: host-a's datapath flows:\n{flows}", c.name);
        let ipv4: Vec<&str> = flows.lines().filter(|f| f.contains("ipv4(")).collect();
        assert!(!ipv4.is_empty(), "{}: no IPv4 flow: {flows}", c.name);
        assert_eq!(
            ipv4.iter().any(|f| f.contains("push_vlan(vid=100")),
            tagged,
            "{}: the pods' frames to wire0 should be tagged: {tagged}",
            c.name
        );
    }
    lab_down(c.name);
    assert_nothing_left(c.name);
}

/// Whether an OVS lab joined by wire0 tags the pods' frames on it (ovs-vlan: a trunk) or not
/// (ovs-flat: an access port); None where the lab has no such uplink.
fn tags_on_the_wire(c: &Case) -> Option<bool> {
    match (c.topology, c.placement) {
        ("ovs-vlan", "cross-host") => Some(true),
        ("ovs-flat", "cross-host") => Some(false),
        _ => None,
    }
}

/// `ovs-appctl dpctl/dump-flows` of the lab's ovs-vswitchd in `role`.
fn datapath_flows(name: &str, role: &str) -> String {
    let ctl = format!("{OVS_DIR}/{name}-{role}/ovs-vswitchd.ctl");
    let out = Command::new("ovs-appctl")
        .args(["-t", &ctl, "dpctl/dump-flows"])
        .output()
        .expect("running ovs-appctl");
    assert!(
        out.status.success(),
        "ovs-appctl -t {ctl} dpctl/dump-flows: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn ipvlan_l2_same_host() {
    full_cycle("ipvlan-l2");
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn ipvlan_l2_cross_host() {
    full_cycle("ipvlan-l2-xhost");
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn ipvlan_l3_same_host() {
    full_cycle("ipvlan-l3");
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn ipvlan_l3_cross_host() {
    full_cycle("ipvlan-l3-xhost");
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn geneve_cross_host() {
    full_cycle("geneve-xhost");
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn ovs_vlan_same_host() {
    full_cycle("ovs-vlan");
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn ovs_vlan_cross_host() {
    full_cycle("ovs-vlan-xhost");
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn ebpf_redirect_same_host() {
    full_cycle("ebpf-redirect");
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn ovs_flat_same_host() {
    full_cycle("ovs-flat");
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn ovs_flat_cross_host() {
    full_cycle("ovs-flat-xhost");
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn ovs_vxlan_cross_host() {
    full_cycle("ovs-vxlan-xhost");
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn ovs_gre_cross_host() {
    full_cycle("ovs-gre-xhost");
}

/// A Service on a stock kernel: br_netfilter is a module there, which the lab loads (without
/// it no reply would come back through the ClusterIP); BPF netfilter links came in Linux 6.4,
/// so before that the run says in one line that the kernel refused the programs around the
/// NAT and names no NAT segment, and from 6.4 on the NAT is its own segment. Every exchange
/// completes through the ClusterIP either way.
#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn service_with_or_without_netfilter_links() {
    let guard = lab_up(&["bridge", "--service", "iptables"]);
    let r = run_json(&["--lab", "bridge", "--proto", "udp", "--count", "50"]);
    assert_complete(&r, 50, "bridge with a Service");
    let kernel = &r.kernel;
    let mut version = kernel
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let links = (version.next(), version.next()) >= (Some(6), Some(4));
    let nat: Vec<&HookStatus> = (r.hooks.iter()).filter(|h| h.kind == "netfilter").collect();
    println!("{kernel}: {nat:?}");
    assert_eq!(nat.len(), 1, "{nat:?}");
    assert_eq!(
        nat[0].status == Status::Attached,
        links,
        "{kernel}: {nat:?}"
    );
    let names = direction(&r, "request").segment_names();
    assert_eq!(
        names.iter().any(|n| n.starts_with("nat prerouting")),
        links,
        "{kernel}: {names:?}"
    );
    attach_through_the_service(links);
    drop(guard);
    assert_nothing_left("bridge");
}

/// attach on pod-a with a filter on the backend while a run goes through the ClusterIP: the
/// Service is read from the host's rules and the filter takes pod-a's requests before their
/// DNAT, with or without the programs around the NAT (whose links say why not before 6.4).
fn attach_through_the_service(links: bool) {
    let json = std::env::temp_dir().join("vm-service-attach.json");
    let out = profiler(&[
        "attach",
        "--netns",
        "prof-bridge-pod-a",
        "--filter",
        "host 198.18.0.2",
        "--duration",
        "120",
        "--json",
        json.to_str().unwrap(),
        "--",
        crate::common::BIN,
        "run",
        "--lab",
        "bridge",
        "--proto",
        "udp",
        "--count",
        "50",
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "attach: {err}");
    let a: AttachReport =
        serde_json::from_slice(&std::fs::read(&json).expect("attach's JSON")).expect("JSON");
    let _ = std::fs::remove_file(&json);
    let services = &a.services;
    let udp = "198.18.250.10:8080/udp -> 198.18.0.2:8080 (iptables in prof-bridge-host)";
    assert!(
        services.iter().any(|s| s.contains(udp)),
        "no {udp} in {services:?}"
    );
    let nat: Vec<&HookStatus> = (a.hooks.iter()).filter(|h| h.kind == "netfilter").collect();
    assert_eq!(nat.len(), 1, "{nat:?}");
    assert_eq!(nat[0].status == Status::Attached, links, "{nat:?}");
    // The requests' paths from pod-a's eth0 to pod-b's, through the NAT's segment where
    // there are links.
    let to_b: u64 = (a.paths.iter())
        .filter(|p| (p.hops.last()).is_some_and(|h| h.ends_with("(prof-bridge-pod-b)")))
        .filter(|p| {
            let through = (p.segments.iter()).any(|s| s.name.contains("nat prerouting br0"));
            through == links
        })
        .map(|p| p.packets)
        .sum();
    assert!(
        to_b >= 50,
        "{to_b} requests followed to pod-b; paths {:?}",
        a.paths
    );
}

/// A run that brings the OVS lab up itself takes it down again, daemons included.
#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn a_run_removes_the_ovs_lab_it_made() {
    let c = case("ovs-vxlan-xhost");
    let _guard = LabGuard(c.name.to_string());
    let r = run_json(&[
        "--lab",
        c.topology,
        "--placement",
        c.placement,
        "--count",
        "20",
    ]);
    assert_eq!(r.traffic.completed, 20, "{:?}", r.traffic);
    assert_nothing_left(c.name);
}

/// SIGINT while `lab up` starts the OVS daemons: the daemons already started are stopped and
/// everything else made so far is removed.
#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn interrupted_ovs_up_leaves_nothing() {
    let c = case("ovs-vlan-xhost");
    let _guard = LabGuard(c.name.to_string());
    let up = Command::new(crate::common::BIN)
        .args(["lab", "up", c.topology, "--placement", c.placement])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running profiler lab up");
    let started = Path::new(OVS_DIR).join(format!("{}-host-a/ovsdb-server.pid", c.name));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !started.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(started.exists(), "ovsdb-server never started");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT to lab up");
    let out = up.wait_with_output().expect("waiting for lab up");
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        // The signal came after the last await: the lab is up, whole. Down must still clean.
        println!("lab up finished before the signal was seen: {err}");
        lab_down(c.name);
    } else {
        assert!(err.contains("interrupted by SIGINT"), "{err}");
    }
    assert_nothing_left(c.name);
}
