//! End-to-end runs of the `profiler` binary on the labs other than tests/run.rs's bridge:
//! flannel-vxlan cross-host (with and without an MTU that does not fit the wire), host and
//! bridge (host-gw) cross-host, macvlan on one host and across two. Every run must give one
//! complete journey per exchange in both directions, whose segments add up to the end-to-end
//! time, and leave nothing behind.
//!
//! Labs are machine-global by name, so the tests of this file take turns (LOCK).
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

mod common;

use std::sync::{Mutex, MutexGuard};

use common::{assert_clean_of, assert_complete, direction, run_json};
use profiler::report::schema::{DirectionReport, Hop, RunReport};

static LOCK: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const COUNT: u64 = 500;

/// Profiles `args` on lab `lab` (which must not be up already: the run brings it up with the
/// options given, and takes it down), checks the run is complete and clean, returns the report.
fn profile(lab: &str, args: &[&str], ctx: &str) -> RunReport {
    assert!(
        !profiler::lab::netns::exists(&format!("prof-{lab}-pod-a"))
            && !profiler::lab::netns::exists(&format!("prof-{lab}-host-a")),
        "{ctx}: lab {lab} is already up; the run would not make it with its own options"
    );
    let count = COUNT.to_string();
    let mut all = args.to_vec();
    all.extend_from_slice(&["--count", &count]);
    let r = run_json(&all);
    assert_complete(&r, COUNT, ctx);
    assert_clean_of(lab);
    r
}

/// Whether hop `h` is on device `ifname` in namespace `netns`.
fn on(h: &Hop, ifname: &str, netns: &str) -> bool {
    h.ifname.as_deref() == Some(ifname) && h.netns.as_deref() == Some(netns)
}

/// The flannel-vxlan crossing of one direction, from host `src` to host `dst`: the inner packet
/// leaves through src's flannel.1 (tc egress, not encapsulated), the VXLAN packet leaves
/// src's wire0 and enters dst's wire0 (encapsulated, vxlan), and the decapsulated packet is
/// received on dst's flannel.1 (GRO cells' NAPI, or the backlog). In this order, with anything
/// in between.
fn assert_vxlan_crossing(dir: &DirectionReport, src: &str, dst: &str, ctx: &str) {
    let lab = "prof-flannel-vxlan-xhost";
    let (src, dst) = (format!("{lab}-{src}"), format!("{lab}-{dst}"));
    type Want<'a> = (&'a str, Box<dyn Fn(&Hop) -> bool + 'a>);
    let wanted: [Want; 4] = [
        (
            "tc:egress flannel.1 (src), inner",
            Box::new(|h: &Hop| {
                h.hook == "tc:egress" && on(h, "flannel.1", &src) && !h.encapsulated
            }),
        ),
        (
            "tc:egress wire0 (src), vxlan",
            Box::new(|h: &Hop| {
                h.hook == "tc:egress"
                    && on(h, "wire0", &src)
                    && h.encapsulated
                    && h.tunnel.as_deref() == Some("vxlan")
            }),
        ),
        (
            "tc:ingress wire0 (dst), vxlan",
            Box::new(|h: &Hop| {
                h.hook == "tc:ingress"
                    && on(h, "wire0", &dst)
                    && h.encapsulated
                    && h.tunnel.as_deref() == Some("vxlan")
            }),
        ),
        (
            "napi_gro_receive_entry or netif_receive_skb flannel.1 (dst), inner",
            Box::new(|h: &Hop| {
                (h.hook.ends_with(":napi_gro_receive_entry")
                    || h.hook.ends_with(":netif_receive_skb"))
                    && on(h, "flannel.1", &dst)
                    && !h.encapsulated
            }),
        ),
    ];
    let hops = &dir.hops;
    let mut at = 0;
    for (what, matches) in &wanted {
        let found = hops[at..].iter().position(matches);
        let Some(i) = found else {
            panic!("{ctx}: no {what} after hop {at}");
        };
        at += i + 1;
    }
    // Hops outside the tunnel are never marked encapsulated; hops inside it always say which.
    for h in hops {
        assert_eq!(
            h.encapsulated,
            h.ifname.as_deref() == Some("wire0"),
            "{ctx}: {} {:?} in {:?}: encapsulated",
            h.hook,
            h.ifname,
            h.netns
        );
        assert_eq!(
            h.tunnel.is_some(),
            h.encapsulated,
            "{ctx}: {} tunnel",
            h.hook
        );
    }
}

fn assert_vxlan_segments(r: &RunReport, ctx: &str) {
    for name in ["request", "response"] {
        let names = direction(r, name).segment_names();
        for want in [
            "vxlan encap flannel.1 -> wire0",
            "vxlan decap wire0 -> flannel.1",
        ] {
            assert!(
                names.contains(&want),
                "{ctx} {name}: no {want:?} in {names:?}"
            );
        }
    }
}

fn flannel(proto: &str, size: &str) {
    let _serial = serial();
    let ctx = format!("flannel-vxlan {proto} {size}");
    let r = profile(
        "flannel-vxlan-xhost",
        &[
            "--lab",
            "flannel-vxlan",
            "--placement",
            "cross-host",
            "--proto",
            proto,
            "--size",
            size,
        ],
        &ctx,
    );
    assert_vxlan_crossing(direction(&r, "request"), "host-a", "host-b", &ctx);
    assert_vxlan_crossing(direction(&r, "response"), "host-b", "host-a", &ctx);
    assert_vxlan_segments(&r, &ctx);
    // 64 B and 1400 B payloads fit flannel's 1450: nothing is fragmented.
    assert_eq!(r.events.fragments, 0, "{ctx}: fragments");
}

#[test]
fn flannel_vxlan_udp_64() {
    flannel("udp", "64");
}

#[test]
fn flannel_vxlan_tcp_1400() {
    flannel("tcp", "1400");
}

/// The hook hops of a direction (its hops but app:send and app:recv).
fn hook_hops(dir: &DirectionReport) -> u64 {
    (dir.hops.iter())
        .filter(|h| !h.hook.starts_with("app:"))
        .count() as u64
}

/// UDP 1470 B: an inner IP packet of 1498 bytes (1470 + 8 UDP + 20 IP), which fits a 1500 pod
/// MTU, and a 1548-byte VXLAN packet (+ 14 inner Ethernet + 8 VXLAN + 8 UDP + 20 IP).
const FRAGMENTING_SIZE: &str = "1470";

/// `--mtu 1500`: the pods send the 1498-byte packet whole, and the VXLAN packet (1548 bytes)
/// does not fit the 1500-byte wire. The kernel fragments the outer packet (VXLAN does not set
/// DF) and host-b reassembles it before decapsulation. The first outer fragment carries the tag
/// and is the journey's hop; the second crosses only the wire0 hops, 7 of them per direction
/// (host-a side: tc egress, net_dev_queue, net_dev_start_xmit, net_dev_xmit; host-b side:
/// netif_rx, netif_receive_skb, tc ingress), and is counted in events.fragments.
#[test]
fn flannel_vxlan_mtu_1500_fragments_the_outer_packets() {
    let _serial = serial();
    let ctx = "flannel-vxlan --mtu 1500 udp 1470";
    let r = profile(
        "flannel-vxlan-xhost",
        &[
            "--lab",
            "flannel-vxlan",
            "--placement",
            "cross-host",
            "--mtu",
            "1500",
            "--proto",
            "udp",
            "--size",
            FRAGMENTING_SIZE,
        ],
        ctx,
    );
    assert_vxlan_crossing(direction(&r, "request"), "host-a", "host-b", ctx);
    assert_vxlan_crossing(direction(&r, "response"), "host-b", "host-a", ctx);
    assert_vxlan_segments(&r, ctx);
    let fragments = r.events.fragments;
    assert!(fragments > 0, "{ctx}: no fragments");
    assert_eq!(fragments, COUNT * 2 * 7, "{ctx}: fragment events");
}

/// The same datagram with flannel's own MTU (1450 inside): the inner packet (1498 bytes) does
/// not fit pod-a's eth0, so pod-a fragments it itself, and every fragment (at most 1450 bytes,
/// 1500 with VXLAN) fits the wire. The later fragment then crosses every device the first one
/// does: one fragment event per hook hop, both directions, and pod-b reassembles (in its
/// "stack and socket" segment). Nothing is fragmented on the wire.
#[test]
fn flannel_vxlan_default_mtu_fragments_at_the_pod() {
    let _serial = serial();
    let ctx = "flannel-vxlan udp 1470";
    let r = profile(
        "flannel-vxlan-xhost",
        &[
            "--lab",
            "flannel-vxlan",
            "--placement",
            "cross-host",
            "--proto",
            "udp",
            "--size",
            FRAGMENTING_SIZE,
        ],
        ctx,
    );
    assert_vxlan_crossing(direction(&r, "request"), "host-a", "host-b", ctx);
    assert_vxlan_crossing(direction(&r, "response"), "host-b", "host-a", ctx);
    let per_exchange = hook_hops(direction(&r, "request")) + hook_hops(direction(&r, "response"));
    assert_eq!(
        r.events.fragments,
        COUNT * per_exchange,
        "{ctx}: fragment events"
    );
}

/// The baseline: no container network, the client in host-a and the server in host-b.
#[test]
fn host_cross_host_udp_64() {
    let _serial = serial();
    let ctx = "host udp 64";
    let r = profile(
        "host-xhost",
        &[
            "--lab",
            "host",
            "--placement",
            "cross-host",
            "--proto",
            "udp",
            "--size",
            "64",
        ],
        ctx,
    );
    for name in ["request", "response"] {
        assert!(
            direction(&r, name).hops.iter().all(|h| !h.encapsulated),
            "{ctx} {name}: encapsulated hop"
        );
    }
}

/// cni0 per host, host-gw routes over the wire: the pods' packets cross the bridges unencapsulated.
#[test]
fn bridge_cross_host_udp_64() {
    let _serial = serial();
    let ctx = "bridge cross-host udp 64";
    let r = profile(
        "bridge-xhost",
        &[
            "--lab",
            "bridge",
            "--placement",
            "cross-host",
            "--proto",
            "udp",
            "--size",
            "64",
        ],
        ctx,
    );
    for name in ["request", "response"] {
        let dir = direction(&r, name);
        let names = dir.segment_names();
        assert!(
            names.iter().any(|n| n.starts_with("bridge cni0")),
            "{ctx} {name}: no bridge cni0 segment in {names:?}"
        );
        assert!(dir.hops.iter().all(|h| !h.encapsulated), "{ctx} {name}");
    }
}

/// Pods whose eth0 is a macvlan (mode bridge) of host-a's wire0, same host: macvlan delivers
/// between siblings of one lower device itself, so the packets never cross the wire to the
/// peer namespace.
#[test]
fn macvlan_same_host_udp_64() {
    let _serial = serial();
    let ctx = "macvlan same-host udp 64";
    let r = profile(
        "macvlan",
        &[
            "--lab",
            "macvlan",
            "--placement",
            "same-host",
            "--proto",
            "udp",
            "--size",
            "64",
        ],
        ctx,
    );
    for name in ["request", "response"] {
        let hops = &direction(&r, name).hops;
        assert!(hops.iter().all(|h| !h.encapsulated), "{ctx} {name}");
        assert!(
            (hops.iter()).all(|h| h.netns.as_deref() != Some("prof-macvlan-wire-peer")),
            "{ctx} {name}: a hop in wire-peer"
        );
    }
}

/// macvlan children of each host's wire0: the packets leave host-a's wire0 and enter host-b's.
#[test]
fn macvlan_cross_host_udp_64() {
    let _serial = serial();
    let ctx = "macvlan cross-host udp 64";
    let r = profile(
        "macvlan-xhost",
        &[
            "--lab",
            "macvlan",
            "--placement",
            "cross-host",
            "--proto",
            "udp",
            "--size",
            "64",
        ],
        ctx,
    );
    for (name, src, dst) in [
        ("request", "host-a", "host-b"),
        ("response", "host-b", "host-a"),
    ] {
        let hops = &direction(&r, name).hops;
        assert!(hops.iter().all(|h| !h.encapsulated), "{ctx} {name}");
        for (host, hook) in [(src, "tc:egress"), (dst, "tc:ingress")] {
            let netns = format!("prof-macvlan-xhost-{host}");
            assert!(
                hops.iter()
                    .any(|h| h.hook == hook && on(h, "wire0", &netns)),
                "{ctx} {name}: no {hook} wire0 in {host}"
            );
        }
    }
}

/// A lab that is already up keeps its MTU: a run asking for another one must refuse in one line
/// rather than profile the wrong path, and leave the lab as it found it.
#[test]
fn run_with_another_mtu_than_the_lab_is_refused() {
    let _serial = serial();
    let lab = ["--lab", "flannel-vxlan", "--placement", "cross-host"];
    let up = common::profiler(&["lab", "up", "flannel-vxlan", "--placement", "cross-host"]);
    assert!(up.status.success(), "lab up: {up:?}");
    let mut args = vec!["run"];
    args.extend_from_slice(&lab);
    args.extend_from_slice(&["--mtu", "1500", "--count", "10"]);
    let out = common::profiler(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    let still_up = profiler::lab::netns::exists("prof-flannel-vxlan-xhost-host-a");
    let down = common::profiler(&["lab", "down", "flannel-vxlan-xhost"]);
    assert!(!out.status.success(), "a run with --mtu 1500 succeeded");
    assert!(err.contains("already up with another MTU"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(still_up, "the refused run took the lab down");
    assert!(down.status.success(), "lab down: {down:?}");
    assert_clean_of("flannel-vxlan-xhost");
}

/// `profiler compare`: the host baseline and macvlan measured side by side, and vlan either
/// measured too or, on a kernel without 8021q (this one), skipped with the reason rather than
/// aborting the comparison. Every run inside is complete; the labs it made are gone afterwards.
#[test]
fn compare_host_macvlan_and_vlan() {
    let _serial = serial();
    let out = common::profiler(&[
        "compare",
        "--lab",
        "host,macvlan,vlan",
        "--placement",
        "cross-host",
        "--sizes",
        "64",
        "--count",
        "200",
        "--json",
        "-",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "profiler compare: {err}");
    let c = common::compare_report_of(&out.stdout);
    let row = |t: &str| c.summary.iter().find(|r| r.topology == t);
    let base = row("host-xhost").expect("a host row");
    assert!(base.delta_ns.is_none(), "the baseline has a delta");
    let macvlan = row("macvlan-xhost").expect("a macvlan row");
    let delta = macvlan.delta_ns.expect("macvlan's delta");
    let contributors = &macvlan.contributors;
    assert!(
        !contributors.is_empty(),
        "no contributors to macvlan's delta"
    );
    for s in contributors {
        let share = s.delta_ns / delta * 100.0;
        assert!(
            (s.percent - share).abs() < 0.01,
            "a contributor's percent is not its share of {delta} ns: {s:?}"
        );
    }
    match (row("vlan-xhost"), c.skipped.as_slice()) {
        (Some(_), []) => {}
        (None, [s]) => {
            assert_eq!(s.topology, "vlan-xhost");
            assert!(s.reason.contains("8021q"), "{s:?}");
            assert!(
                err.contains("skipping vlan"),
                "the skip is not on stderr: {err}"
            );
        }
        other => panic!("vlan neither measured nor skipped once: {other:?}"),
    }
    for r in &c.runs {
        assert_complete(r, 200, &r.topology);
    }
    for lab in ["host-xhost", "macvlan-xhost", "vlan-xhost"] {
        assert_clean_of(lab);
    }
}
