//! The ebpf-redirect lab, Cilium's datapath between two pods of one host: no bridge, nothing
//! addressed in the host namespace; a tc program of the lab's own on each pod's host-side veth
//! hands what the pod sends to the other pod's eth0 with `bpf_redirect_peer`. Pods reach each
//! other through it alone; a run names the redirect as its own segment and never meets the
//! other veth, its backlog or the host stack; the program goes with the lab, also after a
//! SIGKILL of the process that held it (it holds nothing: the filter lives in the kernel).
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

mod common;

use std::process::Command;

use common::{assert_clean_of, lab_up, loaded_named, run_json};
use profiler::report::schema::RunReport;

const LAB: &str = "ebpf-redirect";
const HOST: &str = "prof-ebpf-redirect-host";
const PROGRAM: &str = "tc_redirect";

/// The lab's programs loaded in the kernel.
fn redirect_programs() -> usize {
    loaded_named(&[PROGRAM.to_string()]).len()
}

/// pod-a pings pod-b `count` times: whether every ping was answered, and ping's output.
fn ping_b(count: &str) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", "prof-ebpf-redirect-pod-a"])
        .args(["ping", "-c", count, "-i", "0.2", "-W", "1", "198.18.0.2"])
        .output()
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), text)
}

/// The filters on a host-side veth's ingress, as `tc` lists them.
fn ingress_filters(veth: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns", "exec", HOST, "tc", "filter", "show", "dev", veth, "ingress",
        ])
        .output()
        .expect("running tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn ebpf_redirect_hands_packets_to_the_pod_past_the_bridge_backlog_and_host_stack() {
    let before = redirect_programs();
    let lab = lab_up(&[LAB]);
    for veth in ["veth-a", "veth-b"] {
        let filters = ingress_filters(veth);
        assert!(filters.contains(PROGRAM), "{veth}: {filters}");
    }
    let r: RunReport =
        serde_json::from_value(run_json(&["--lab", LAB, "--count", "300"])).expect("a run report");
    assert_eq!(r.traffic.completed, 300);
    for (dir, from, to_pod, skipped) in [
        ("request", "veth-a", "pod-b", "veth-b"),
        ("response", "veth-b", "pod-a", "veth-a"),
    ] {
        let d = (r.directions.iter())
            .find(|d| d.direction == dir)
            .unwrap_or_else(|| panic!("no {dir}"));
        assert_eq!(
            (d.complete_packets, d.incomplete_packets),
            (300, 0),
            "{dir}"
        );
        let hops: Vec<String> = d.hops.iter().map(|h| h.name.clone()).collect();
        let names: Vec<&str> = d.segments.iter().map(|s| s.name.as_str()).collect();
        println!("{dir}: {names:?}");
        // One segment from the veth's tc ingress to the pod's: the redirect.
        let want = format!("eBPF redirect peer {from} -> eth0 ({to_pod})");
        let s = (d.segments.iter())
            .find(|s| s.name == want)
            .unwrap_or_else(|| panic!("{dir}: no {want:?} in {names:?}"));
        let (a, b) = (&d.hops[s.from], &d.hops[s.to]);
        assert_eq!(
            (a.hook.as_str(), a.ifname.as_deref()),
            ("tc:ingress", Some(from)),
            "{dir}: {hops:?}"
        );
        assert_eq!(
            (b.hook.as_str(), b.ifname.as_deref()),
            ("tc:ingress", Some("eth0")),
            "{dir}: {hops:?}"
        );
        assert_eq!(s.to, s.from + 1, "{dir}: {hops:?}");
        assert!(s.stats.samples >= 300, "{dir}: {want}: {:?}", s.stats);
        // Past the other pod's veth: no hop there, no backlog, no bridge.
        assert!(
            !d.hops.iter().any(|h| h.ifname.as_deref() == Some(skipped)),
            "{dir}: crossed {skipped}: {hops:?}"
        );
        assert!(
            !names
                .iter()
                .any(|n| n.contains("bridge") || n.starts_with("backlog queue eth0")),
            "{dir}: {names:?}"
        );
    }
    assert!(redirect_programs() > before, "tc_redirect is not loaded");
    drop(lab);
    // The kernel frees a namespace, then its filters and their program, after `lab down`
    // returns (in its cleanup work and after an RCU grace period).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while redirect_programs() > before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(redirect_programs(), before, "tc_redirect left loaded");
    assert_clean_of(LAB);
}

/// Pods reach each other through the redirect alone: the lab sets no address in the host
/// namespace, and the neighbour each pod has for the other is its own veth's MAC.
#[test]
fn ebpf_redirect_pods_ping_through_the_program_alone() {
    let lab = lab_up(&[LAB]);
    let out = Command::new("ip")
        .args(["netns", "exec", HOST, "ip", "-4", "-o", "addr", "show"])
        .output()
        .expect("ip addr");
    let addrs = String::from_utf8_lossy(&out.stdout);
    assert!(
        addrs.lines().all(|l| l.contains(" lo ")),
        "addresses in the host namespace: {addrs}"
    );
    let (answered, out) = ping_b("3");
    assert!(answered, "{out}");
    // Without the program, nothing joins them.
    let del = Command::new("ip")
        .args([
            "netns", "exec", HOST, "tc", "filter", "del", "dev", "veth-a", "ingress",
        ])
        .status()
        .expect("tc filter del");
    assert!(del.success());
    let (answered, out) = ping_b("2");
    assert!(!answered, "pinged without the redirect: {out}");
    drop(lab);
    assert_clean_of(LAB);
}
