//! Services as kube-proxy writes them: `lab up --service iptables|nftables` puts a ClusterIP
//! in front of pod-b in every host namespace of the lab (KUBE-SERVICES / KUBE-SVC-* /
//! KUBE-SEP-* in iptables mode, the `ip kube-proxy` table in nftables mode). A run sends to the
//! ClusterIP, which no interface has: every exchange that completes went through the DNAT and
//! back through conntrack's un-NAT, and its tags were followed on both sides of the NAT. The
//! rules go with the lab's namespaces.
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

mod common;

use std::process::Command;

use std::time::Duration;

use common::{
    assert_clean_of, assert_complete,
    attach::{crossing, report, tcp_echo_via, tmp, udp_echo_via, Attach},
    lab_up, profiler, run_json,
};
use profiler::{
    lab::service::{CLUSTER_IP, PORT},
    report::schema::{HookStatus, RunReport, Status},
};

const COUNT: &str = "200";

/// `COMMAND` in namespace `ns`, which must succeed: its stdout.
fn in_ns(ns: &str, command: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(command)
        .output()
        .expect("running ip netns exec");
    assert!(
        out.status.success(),
        "{command:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Packets the iptables-mode endpoint chain of `proto` DNATed in `ns`.
fn dnat_packets(ns: &str, proto: &str) -> u64 {
    let chain = format!("KUBE-SEP-PROFILER-ECHO-{}", proto.to_uppercase());
    let listing = in_ns(
        ns,
        &["iptables", "-t", "nat", "-L", &chain, "-n", "-v", "-x"],
    );
    (listing.lines())
        .find(|l| l.contains("DNAT"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no DNAT rule counted in {chain}:\n{listing}"))
}

/// No interface of the lab holds the ClusterIP: only the NAT answers there.
fn assert_virtual(lab: &str) {
    let lab = common::lab_info(lab);
    let ip = format!("{CLUSTER_IP}/");
    for i in &lab.interfaces {
        assert!(
            !i.addrs.iter().any(|a| a.starts_with(&ip)),
            "{} has the ClusterIP: {:?}",
            i.ifname,
            i.addrs
        );
    }
    let service = lab.service.expect("the lab's Service");
    assert_eq!(service.cluster_ip, CLUSTER_IP);
}

/// The segment `name` of direction `dir`, which must be there, between the hooks `hooks`.
fn assert_segment(r: &RunReport, dir: &str, name: &str, hooks: (&str, &str)) {
    let d = common::direction(r, dir);
    let s = (d.segments.iter())
        .find(|s| s.name == name)
        .unwrap_or_else(|| {
            let nat: Vec<&HookStatus> =
                (r.hooks.iter()).filter(|h| h.kind == "netfilter").collect();
            let names = d.segment_names();
            panic!("{dir}: no segment {name:?} in {names:?}; netfilter hooks: {nat:?}")
        });
    let hop = |index: usize| d.hops[index].hook.as_str();
    assert_eq!((hop(s.from), hop(s.to)), hooks, "{dir}: {name}");
}

/// UDP and TCP request/response through the ClusterIP: every exchange completes and both
/// directions' journeys are whole (the tags are found on both sides of the NAT); the NAT is a
/// segment of its own in each direction, `nat` (request's DNAT, response's un-DNAT), timed by
/// the netfilter programs linked in every host namespace.
fn runs_through(lab: &str, extra: &[&str], nat: [&str; 2], hosts: &[&str]) {
    for proto in ["udp", "tcp"] {
        let mut args = vec![
            "--lab", lab, "--count", COUNT, "--rate", "500", "--proto", proto,
        ];
        args.extend_from_slice(extra);
        let r = run_json(&args);
        assert_complete(&r, COUNT.parse().unwrap(), &format!("{lab} {proto}"));
        assert_segment(
            &r,
            "request",
            nat[0],
            ("nf:prerouting:-101", "nf:prerouting:-99"),
        );
        assert_segment(
            &r,
            "response",
            nat[1],
            ("nf:postrouting:99", "nf:postrouting:101"),
        );
        for ns in hosts {
            let name = format!("nat hooks in {ns}");
            let h = r
                .hook(&name)
                .unwrap_or_else(|| panic!("no {name} in {:?}", r.hooks));
            assert_eq!(h.status, Status::Attached, "{h:?}");
        }
        let via = r.service.as_deref().unwrap_or_default();
        assert!(
            via.contains(&format!("{CLUSTER_IP}:{PORT} -> ")),
            "{lab} {proto}: the report's service: {via:?}"
        );
    }
}

#[test]
fn iptables_service_on_the_bridge_lab() {
    const HOST: &str = "prof-bridge-host";
    let guard = lab_up(&["bridge", "--service", "iptables"]);
    let rules = in_ns(HOST, &["iptables", "-t", "nat", "-S"]);
    for rule in [
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A KUBE-SERVICES -d 198.18.250.10/32 -p udp",
        "-j DNAT --to-destination 198.18.0.2:8080",
    ] {
        assert!(rules.contains(rule), "no {rule} in\n{rules}");
    }
    assert_virtual("bridge");
    let before = (dnat_packets(HOST, "udp"), dnat_packets(HOST, "tcp"));
    runs_through(
        "bridge",
        &[],
        ["nat prerouting br0 (host)", "nat postrouting veth-a (host)"],
        &[HOST],
    );
    // Each UDP exchange and TCP connection is a new conntrack entry only once: the first
    // packet of each flow is DNATed by the rule, the rest by conntrack.
    let after = (dnat_packets(HOST, "udp"), dnat_packets(HOST, "tcp"));
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "the endpoint chains DNATed nothing: {before:?} -> {after:?}"
    );
    drop(guard);
    assert_clean_of("bridge");
}

#[test]
fn nftables_service_across_hosts_on_flannel_vxlan() {
    const LAB: &str = "flannel-vxlan-xhost";
    let guard = lab_up(&[
        "flannel-vxlan",
        "--placement",
        "cross-host",
        "--service",
        "nftables",
    ]);
    // kube-proxy runs on every node: both hosts have the table.
    for host in ["host-a", "host-b"] {
        let table = in_ns(
            &format!("prof-{LAB}-{host}"),
            &["nft", "list", "table", "ip", "kube-proxy"],
        );
        for line in [
            "198.18.250.10 . udp . 8080 : goto service-profiler-echo-udp",
            "meta l4proto udp dnat to 198.18.2.1:8080",
        ] {
            assert!(table.contains(line), "{host}: no {line} in\n{table}");
        }
    }
    assert_virtual(LAB);
    runs_through(
        "flannel-vxlan",
        &["--placement", "cross-host"],
        [
            "nat prerouting cni0 (host-a)",
            "nat postrouting cni0 (host-a)",
        ],
        &[&format!("prof-{LAB}-host-a"), &format!("prof-{LAB}-host-b")],
    );
    drop(guard);
    assert_clean_of(LAB);
}

/// attach through a Service, with UDP and TCP of the test's own to the ClusterIP: kube-proxy's
/// rules are read in the host namespace (where the pods' veths end), so that a filter on the
/// backend takes the requests before their DNAT, one on the ClusterIP the replies before
/// their un-DNAT, and the NAT is a segment of its own in both directions (the follow programs
/// linked around it). Without reading the rules, pod-a's requests to the ClusterIP would not
/// match `host BACKEND` at its eth0, where their journeys start.
#[test]
fn attach_sees_through_the_service() {
    const HOST: &str = "prof-bridge-host";
    let pods = ("prof-bridge-pod-a", "prof-bridge-pod-b");
    for mode in ["iptables", "nftables"] {
        let guard = lab_up(&["bridge", "--service", mode]);
        let backend = guard_backend();
        let (by_backend, by_vip) = (tmp("svc-backend.json"), tmp("svc-vip.json"));
        let a = Attach::start(&[
            "--netns",
            pods.0,
            "--filter",
            &format!("host {backend}"),
            "--json",
            by_backend.to_str().unwrap(),
        ]);
        let b = Attach::start(&[
            "--netns",
            HOST,
            "--filter",
            &format!("host {CLUSTER_IP}"),
            "--json",
            by_vip.to_str().unwrap(),
        ]);
        let route = (backend.as_str(), &*CLUSTER_IP.to_string());
        let period = Duration::from_millis(5);
        udp_echo_via(pods, route, PORT, 100, 64, period);
        tcp_echo_via(pods, route, PORT, 100, 64, period);
        a.stop();
        b.stop();
        drop(guard);
        assert_clean_of("bridge");
        let (a, b) = (report(&by_backend), report(&by_vip));
        let udp = format!("{CLUSTER_IP}:{PORT}/udp -> {backend}:{PORT} ({mode} in {HOST})");
        for r in [&a, &b] {
            let services = &r.services;
            assert!(
                services.iter().any(|s| s.contains(&udp)),
                "{mode}: no {udp} in {services:?}"
            );
            let name = format!("nat hooks in {HOST}");
            let h = r
                .hook(&name)
                .unwrap_or_else(|| panic!("{mode}: no {name} in {:?}", r.hooks));
            assert_eq!(h.status, Status::Attached, "{h:?}");
        }
        // 100 datagrams and 100 TCP requests each way, and TCP's own segments.
        for (r, segment, what) in [
            (
                &a,
                "nat prerouting br0 (prof-bridge-host)",
                "requests by the backend",
            ),
            (
                &b,
                "nat prerouting br0 (prof-bridge-host)",
                "requests by the ClusterIP",
            ),
            (
                &b,
                "nat postrouting veth-a (prof-bridge-host)",
                "replies by the ClusterIP",
            ),
        ] {
            let n = crossing(r, segment);
            assert!(
                n >= 200,
                "{mode}: {what}: {n} packets crossed {segment:?}; paths {:?}",
                r.paths
            );
        }
        let _ = std::fs::remove_file(by_backend);
        let _ = std::fs::remove_file(by_vip);
    }
}

/// The bridge lab's server address, as `lab list` says.
fn guard_backend() -> String {
    let lab = common::lab_info("bridge");
    (lab.service.expect("the Service's backend").backend).to_string()
}

/// `compare` takes a Service as a network of its own: `bridge,bridge+iptables` profiles the
/// bridge lab without and then with kube-proxy's rules, a row each; the Service's run goes
/// through the ClusterIP with the NAT as a segment of its own, and compare takes its labs down.
#[test]
fn compare_takes_a_service_as_a_network_of_its_own() {
    let out = profiler(&[
        "compare",
        "--lab",
        "bridge,bridge+iptables",
        "--placement",
        "same-host",
        "--sizes",
        "64",
        "--count",
        "200",
        "--rate",
        "500",
        "--json",
        "-",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "compare failed: {err}");
    let c = common::compare_report_of(&out.stdout);
    let rows: Vec<&str> = c.summary.iter().map(|r| r.topology.as_str()).collect();
    assert_eq!(rows, ["bridge", "bridge+iptables"], "{:?}", c.summary);
    let runs = &c.runs;
    assert_eq!(runs[0].service, None);
    let via = runs[1].service.as_deref().unwrap_or_default();
    assert!(via.contains(&format!("{CLUSTER_IP}:{PORT}")), "{via:?}");
    assert_complete(&runs[1], COUNT.parse().unwrap(), "bridge+iptables");
    assert_segment(
        &runs[1],
        "request",
        "nat prerouting br0 (host)",
        ("nf:prerouting:-101", "nf:prerouting:-99"),
    );
    assert_clean_of("bridge");
}

/// What cannot go through a Service says so in one line and exits non-zero.
#[test]
fn what_a_service_cannot_do_is_one_line() {
    let out = profiler(&["lab", "up", "macvlan", "--service", "iptables"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--service on macvlan: macvlan pods cannot reach") && err.lines().count() == 1,
        "{err}"
    );
    assert_clean_of("macvlan");
    for (args, want) in [
        (
            ["compare", "--lab", "bridge,macvlan+iptables"],
            "macvlan pods cannot reach",
        ),
        (
            ["bench", "paper", "--types=bridge+ipvs"],
            "a Service is +iptables, +nftables or +ebpf, not +ipvs",
        ),
        (
            ["compare", "--lab", "ebpf-redirect+iptables"],
            "kube-proxy's rules would never see the pods' packets",
        ),
        (
            ["compare", "--lab", "bridge+ebpf"],
            "--service ebpf is the ebpf-redirect lab's own translation",
        ),
    ] {
        let out = profiler(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(want) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    let out = profiler(&[
        "run",
        "--lab",
        "bridge",
        "--service",
        "iptables",
        "--traffic",
        "alltoall",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--traffic alltoall goes from pod to pod") && err.lines().count() == 1,
        "{err}"
    );
    let guard = lab_up(&["bridge", "--service", "nftables"]);
    for (args, want) in [
        (
            vec!["--port", "9000"],
            "--port 9000: the lab's Service forwards port 8080 only",
        ),
        (
            vec!["--service", "iptables"],
            "lab bridge is already up with Service (nftables)",
        ),
    ] {
        let mut all = vec!["run", "--lab", "bridge", "--count", "10"];
        all.extend_from_slice(&args);
        let out = profiler(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    drop(guard);
    assert_clean_of("bridge");
}
