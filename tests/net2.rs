//! Pods with a second interface (`--net2`, as Multus and Kuryr's Multi-VIF give them): the same
//! pair of pods profiled over eth0 and over net1, by `run`, `compare` and `attach`, each
//! naming the interface's own devices; what cannot be combined refused in one line; nothing
//! left behind.
//!
//! Labs are machine-global by name, so the tests of this file take turns (LOCK).
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

mod common;

use std::{
    collections::BTreeSet,
    sync::{Mutex, MutexGuard},
};

use common::{
    assert_clean_of, assert_complete,
    attach::{lab_up, ping, report, segment_names, tmp, Attach},
    direction, profiler, run_json,
};
use profiler::report::schema::RunReport;

static LOCK: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const COUNT: u64 = 300;
const XHOST: &str = "flannel-vxlan-xhost";

/// The devices the request's hops were on, as "IFNAME (ROLE)".
fn request_devices(r: &RunReport, lab: &str) -> BTreeSet<String> {
    let prefix = format!("prof-{lab}-");
    (direction(r, "request").hops.iter())
        .filter_map(|h| {
            let role = h.netns.as_deref()?.strip_prefix(&prefix)?;
            Some(format!("{} ({role})", h.ifname.as_deref()?))
        })
        .collect()
}

fn set(devices: &[&str]) -> BTreeSet<String> {
    devices.iter().map(|d| d.to_string()).collect()
}

/// flannel-vxlan across two hosts with net1 on macvlan: over eth0 the request crosses cni0 and
/// the VXLAN device; over net1, between the same two pods, it goes from net1 straight to
/// wire0 and from the other host's wire0 to net1, and no hop is on the first network's
/// devices. Each report says which interface it measured.
#[test]
fn the_same_pods_over_both_networks() {
    let _guard = serial();
    let lab = lab_up(&[
        "flannel-vxlan",
        "--placement",
        "cross-host",
        "--net2",
        "macvlan",
    ]);
    let net1 = (lab.info.interfaces.iter())
        .find(|i| i.ifname == "net1" && i.netns.ends_with("-pod-a"))
        .expect("pod-a's net1 in the lab's record");
    assert_eq!(
        (net1.kind.as_str(), net1.link.as_deref()),
        ("macvlan", Some("wire0"))
    );
    assert_eq!(lab.info.net2, Some(profiler::lab::Net2::Macvlan));
    let count = COUNT.to_string();
    let common = [
        "--lab",
        "flannel-vxlan",
        "--placement",
        "cross-host",
        "--count",
        &count,
    ];
    let over = |iface: &str| {
        let mut args = common.to_vec();
        args.extend_from_slice(&["--iface", iface]);
        let r = run_json(&args);
        assert_complete(&r, COUNT, iface);
        r
    };
    let eth0 = over("eth0");
    let net1 = over("net1");
    assert_eq!(eth0.topology, XHOST);
    assert_eq!(net1.topology, format!("{XHOST}/net1"));
    let eth0_devices = request_devices(&eth0, XHOST);
    for d in [
        "eth0 (pod-a)",
        "cni0 (host-a)",
        "flannel.1 (host-a)",
        "flannel.1 (host-b)",
        "eth0 (pod-b)",
    ] {
        assert!(
            eth0_devices.contains(d),
            "over eth0, no hop on {d}: {eth0_devices:?}"
        );
    }
    assert!(
        !eth0_devices.iter().any(|d| d.starts_with("net1")),
        "over eth0, a hop on net1: {eth0_devices:?}"
    );
    assert_eq!(
        request_devices(&net1, XHOST),
        set(&[
            "net1 (pod-a)",
            "wire0 (host-a)",
            "wire0 (host-b)",
            "net1 (pod-b)"
        ]),
        "over net1, the request's devices"
    );
    let names = direction(&net1, "request").segment_names();
    let wire = "veth wire0 (host-a) -> wire0 (host-b)";
    for want in ["macvlan net1 -> wire0", wire, "macvlan wire0 -> net1"] {
        assert!(
            names.contains(&want),
            "over net1, no segment {want}: {names:?}"
        );
    }
    drop(lab);
    assert_clean_of(XHOST);
}

/// `compare --iface eth0,net1`: one row per interface of the same lab, the net1 row explained
/// against eth0's by its own segments; the lab compare made (with the wire0 and wire-peer
/// namespace net1 needs on one host) is gone afterwards.
#[test]
fn compare_puts_both_interfaces_side_by_side() {
    let _guard = serial();
    let count = COUNT.to_string();
    let out = profiler(&[
        "compare",
        "--lab",
        "bridge",
        "--placement",
        "same-host",
        "--net2",
        "macvlan",
        "--iface",
        "eth0,net1",
        "--sizes",
        "64",
        "--count",
        &count,
        "--json",
        "-",
    ]);
    assert!(
        out.status.success(),
        "compare: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = common::compare_report_of(&out.stdout);
    let rows: Vec<&str> = r.summary.iter().map(|row| row.topology.as_str()).collect();
    assert_eq!(rows, ["bridge", "bridge/net1"]);
    let net1 = &r.summary[1];
    assert!(net1.delta_ns.is_some(), "{net1:?}");
    // Beside the segments both paths have (the two stacks, the profiler's programs), the
    // largest contributors must name one path's own devices: eth0's bridge, net1's macvlan.
    let own = |s: &str| {
        ["br0", "veth", "eth0", "net1", "wire0"]
            .iter()
            .any(|d| s.contains(d))
    };
    let named: Vec<&str> = net1
        .contributors
        .iter()
        .map(|c| c.segment.as_str())
        .collect();
    assert!(named.iter().any(|s| own(s)), "{named:?}");
    let names = direction(&r.runs[1], "request").segment_names();
    assert!(
        names.contains(&"macvlan net1 -> wire0"),
        "bridge/net1's run: {names:?}"
    );
    assert_clean_of("bridge");
}

/// attach follows pings from pod-a over both networks of the bridge lab and shows each as its
/// own path, named by the interface it took.
#[test]
fn attach_shows_each_interfaces_path() {
    let _guard = serial();
    let lab = lab_up(&["bridge", "--net2", "macvlan"]);
    let json = tmp("net2.json");
    let attach = Attach::start(&[
        "--netns",
        "prof-bridge-pod-a",
        "--filter",
        "icmp",
        "--json",
        json.to_str().unwrap(),
    ]);
    ping("prof-bridge-pod-a", "198.18.0.2", 100, "0.01");
    ping("prof-bridge-pod-a", "198.18.200.2", 100, "0.01");
    let (table, _) = attach.stop();
    drop(lab);
    let r = report(&json);
    let _ = std::fs::remove_file(&json);
    let path_through = |first: &str| {
        (r.paths.iter())
            .find(|p| p.segments.first().is_some_and(|s| s.name == first))
            .unwrap_or_else(|| panic!("no path starting at {first}: {table}"))
    };
    let eth0 = path_through("qdisc eth0");
    let net1 = path_through("qdisc net1");
    for (path, iface, other) in [(eth0, "eth0", "net1"), (net1, "net1", "eth0")] {
        assert!(
            path.packets >= 95,
            "{} of 100 pings over {iface}",
            path.packets
        );
        let names = segment_names(&path.segments);
        assert!(
            !names.iter().any(|n| n.contains(other)),
            "over {iface}: {names:?}"
        );
    }
    // net1's lower device is in the host's namespace: found by the id pod-a has for it.
    let names = segment_names(&net1.segments);
    assert!(
        names.contains(&"macvlan net1 -> wire0"),
        "over net1: {names:?}"
    );
    assert!(
        !names.iter().any(|n| n.contains("br0")),
        "over net1: {names:?}"
    );
    assert_clean_of("bridge");
}

/// What cannot be combined is refused in one line, exit status 2, before anything is made;
/// `--iface net1` on a lab up without net1 leaves that lab up.
#[test]
fn what_cannot_have_a_second_network_says_why() {
    let _guard = serial();
    let refused = |args: &[&str], why: &str| {
        let out = profiler(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(why) && err.trim().lines().count() == 1,
            "{args:?}: {err}"
        );
    };
    let before_anything: [(&[&str], &str); 7] = [
        (
            &["lab", "up", "macvlan", "--net2", "macvlan"],
            "eth0 is macvlan already",
        ),
        (
            &["lab", "up", "veth", "--net2", "macvlan"],
            "no host with a wire0",
        ),
        (
            &["lab", "up", "bridge", "--net2", "vlan"],
            "--net2 vlan needs one pod per host",
        ),
        (
            &["run", "--lab", "bridge", "--iface", "net1"],
            "pass --net2 TYPE",
        ),
        (
            &["compare", "--lab", "bridge", "--iface", "net1"],
            "--iface net1 needs --net2",
        ),
        (&["lab", "up", "node", "--net2", "macvlan"], "not node"),
        (
            &["lab", "up", "bmp2vmp", "--net2", "macvlan"],
            "not bmp2vmp",
        ),
    ];
    for (args, why) in before_anything {
        refused(args, why);
    }
    assert_clean_of("bridge");
    let _lab = lab_up(&["bridge"]);
    refused(
        &["run", "--lab", "bridge", "--iface", "net1", "--count", "10"],
        "pods have no net1",
    );
    assert!(
        profiler::lab::netns::exists("prof-bridge-pod-a"),
        "the lab went"
    );
}
