//! The ebpf-redirect lab, Cilium's datapath: no bridge, nothing addressed for the pods in the
//! host namespace; a tc program of the lab's own on each pod's host-side veth hands what the
//! pod sends to the other pod's eth0 with `bpf_redirect_peer`, or across hosts out of wire0
//! with `bpf_redirect_neigh`, where the same program on wire0's ingress hands it to the pod.
//! Pods reach each other through it alone; a run names each redirect as its own segment and
//! never meets the other veth, its backlog or the host stack's forwarding; the program goes
//! with the lab, also after a SIGKILL of the process that held it (it holds nothing: the
//! filter lives in the kernel).
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

mod common;

use std::process::Command;

use common::{
    assert_clean_of,
    attach::{crossing, report, tmp, udp_echo, Attach},
    direction, lab_up, loaded_named, run_json,
};
use profiler::report::schema::{RunReport, Status};

const LAB: &str = "ebpf-redirect";
const HOST: &str = "prof-ebpf-redirect-host";
const PROGRAM: &str = "tc_redirect";
/// The cross-host lab's name.
const XHOST: &str = "ebpf-redirect-xhost";

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

/// The filters on the ingress of device `dev` of namespace `netns`, as `tc` lists them.
fn ingress_filters(netns: &str, dev: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns", "exec", netns, "tc", "filter", "show", "dev", dev, "ingress",
        ])
        .output()
        .expect("running tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One redirect a run must show: its segment's name and the devices at both ends.
struct Step {
    name: String,
    from: &'static str,
    to: &'static str,
}

/// In each direction of a run of `count` exchanges, every packet whole, each step a segment
/// of its own from one hook to the next (the first from a tc ingress), and no hop on the
/// devices the redirects skip, nor any bridge, backlog of the receiving pod or forward.
fn assert_redirected(r: &RunReport, count: u64, dirs: [(&str, Vec<Step>, &[&str]); 2]) {
    assert_eq!(u64::from(r.traffic.completed), count);
    for (dir, steps, skipped) in dirs {
        let d = direction(r, dir);
        assert_eq!(
            (d.complete_packets, d.incomplete_packets),
            (count, 0),
            "{dir}"
        );
        let hops: Vec<&str> = d.hops.iter().map(|h| h.name.as_str()).collect();
        let names = d.segment_names();
        println!("{dir}: {names:?}");
        for step in steps {
            let s = (d.segments.iter())
                .find(|s| s.name == step.name)
                .unwrap_or_else(|| panic!("{dir}: no {:?} in {names:?}", step.name));
            let (a, b) = (&d.hops[s.from], &d.hops[s.to]);
            assert_eq!(
                (a.hook.as_str(), a.ifname.as_deref()),
                ("tc:ingress", Some(step.from)),
                "{dir}: {hops:?}"
            );
            assert_eq!(b.ifname.as_deref(), Some(step.to), "{dir}: {hops:?}");
            assert_eq!(s.to, s.from + 1, "{dir}: {hops:?}");
            assert!(
                s.stats.samples >= count,
                "{dir}: {}: {:?}",
                step.name,
                s.stats
            );
        }
        for dev in skipped {
            assert!(
                !d.hops.iter().any(|h| h.ifname.as_deref() == Some(*dev)),
                "{dir}: crossed {dev}: {hops:?}"
            );
        }
        assert!(
            !names.iter().any(|n| n.contains("bridge")
                || n.starts_with("backlog queue eth0")
                || n.starts_with("forward")),
            "{dir}: {names:?}"
        );
    }
}

/// Waits for the kernel to free the lab's programs after `lab down` returns (it frees a
/// namespace, then its filters and their program, in its cleanup work and after an RCU grace
/// period), then checks that nothing of lab `lab` is left.
fn assert_gone(lab: &str, before: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while redirect_programs() > before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(redirect_programs(), before, "tc_redirect left loaded");
    assert_clean_of(lab);
}

#[test]
fn ebpf_redirect_hands_packets_to_the_pod_past_the_bridge_backlog_and_host_stack() {
    let before = redirect_programs();
    let lab = lab_up(&[LAB]);
    for veth in ["veth-a", "veth-b"] {
        let filters = ingress_filters(HOST, veth);
        assert!(filters.contains(PROGRAM), "{veth}: {filters}");
    }
    let r = run_json(&["--lab", LAB, "--count", "300"]);
    let peer = |name: &str, from| Step {
        name: name.to_string(),
        from,
        to: "eth0",
    };
    // Past the other pod's veth: no hop there, no backlog, no bridge.
    assert_redirected(
        &r,
        300,
        [
            (
                "request",
                vec![peer("eBPF redirect peer veth-a -> eth0 (pod-b)", "veth-a")],
                &["veth-b"],
            ),
            (
                "response",
                vec![peer("eBPF redirect peer veth-b -> eth0 (pod-a)", "veth-b")],
                &["veth-a"],
            ),
        ],
    );
    assert!(redirect_programs() > before, "tc_redirect is not loaded");
    drop(lab);
    assert_gone(LAB, before);
}

/// Across hosts, as Cilium's eBPF host routing: the program on the sending pod's veth sends
/// the packet out of wire0 with `bpf_redirect_neigh` (the host stack does not forward: the
/// lab turns forwarding off), and the one on the other host's wire0 hands it to the pod's
/// eth0 with `bpf_redirect_peer`. Neither host meets the receiving pod's veth.
#[test]
fn ebpf_redirect_across_hosts_sends_by_neighbour_and_receives_by_peer() {
    let before = redirect_programs();
    let lab = lab_up(&[LAB, "--placement", "cross-host"]);
    for (host, dev) in [
        ("host-a", "veth-a"),
        ("host-a", "wire0"),
        ("host-b", "veth-b"),
        ("host-b", "wire0"),
    ] {
        let filters = ingress_filters(&format!("prof-{XHOST}-{host}"), dev);
        assert!(filters.contains(PROGRAM), "{host} {dev}: {filters}");
    }
    for host in ["host-a", "host-b"] {
        let forwarding = Command::new("ip")
            .args(["netns", "exec", &format!("prof-{XHOST}-{host}")])
            .args(["sysctl", "-n", "net.ipv4.ip_forward"])
            .output()
            .expect("sysctl");
        let forwarding = String::from_utf8_lossy(&forwarding.stdout);
        assert_eq!(forwarding.trim(), "0", "{host} forwards");
    }
    let r = run_json(&["--lab", LAB, "--placement", "cross-host", "--count", "300"]);
    let steps = |from, host, to_pod| {
        vec![
            Step {
                name: format!("eBPF redirect neigh {from} -> wire0 ({host})"),
                from,
                to: "wire0",
            },
            Step {
                name: format!("eBPF redirect peer wire0 -> eth0 ({to_pod})"),
                from: "wire0",
                to: "eth0",
            },
        ]
    };
    assert_redirected(
        &r,
        300,
        [
            ("request", steps("veth-a", "host-a", "pod-b"), &["veth-b"]),
            ("response", steps("veth-b", "host-b", "pod-a"), &["veth-a"]),
        ],
    );
    drop(lab);
    assert_gone(XHOST, before);
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

/// attach on the cross-host lab, with UDP of the test's own: it finds the datapath's program
/// on the pods' host-side veths (not one of the profiler's), puts its follow program on the
/// pods' eth0 ingress, where a peer redirect delivers without a device's receive, and names
/// both redirects of each direction as a run does.
#[test]
fn attach_names_the_redirects_of_an_ebpf_datapath() {
    const PORT: u16 = 7457;
    let ns = |role: &str| format!("prof-{XHOST}-{role}");
    let before = redirect_programs();
    let lab = lab_up(&[LAB, "--placement", "cross-host"]);
    let (pod_a, pod_b) = (ns("pod-a"), ns("pod-b"));
    let json = tmp("redirect.json");
    let attach = Attach::start(&[
        "--netns",
        &pod_a,
        "--netns",
        &pod_b,
        "--json",
        json.to_str().unwrap(),
    ]);
    let period = std::time::Duration::from_millis(5);
    udp_echo((&pod_a, &pod_b), "198.18.2.1", PORT, 100, 64, period);
    attach.stop();
    drop(lab);
    // The next test counts the lab's programs from zero again.
    assert_gone(XHOST, before);
    let r = report(&json);
    for pod in [&pod_a, &pod_b] {
        let name = format!("tc:ingress@eth0/{pod}");
        let h = r
            .hook(&name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", r.hooks));
        assert_eq!(h.status, Status::Attached, "{h:?}");
    }
    for (from, host, to_pod) in [("veth-a", "host-a", "pod-b"), ("veth-b", "host-b", "pod-a")] {
        for segment in [
            format!("eBPF redirect neigh {from} -> wire0 ({})", ns(host)),
            format!("eBPF redirect peer wire0 -> eth0 ({})", ns(to_pod)),
        ] {
            let n = crossing(&r, &segment);
            assert_eq!(n, 100, "{segment}: {n} packets; paths: {:?}", r.paths);
        }
    }
}

/// attach started before the pods exist, following them by name as they come: the rescan that
/// finds them also finds the datapath's program on their veths and puts attach's own on their
/// eth0, so pods born behind an eBPF datapath get their redirects named as the others do.
#[test]
fn attach_follows_pods_born_behind_an_ebpf_datapath() {
    const PORT: u16 = 7458;
    let ns = |role: &str| format!("prof-{XHOST}-{role}");
    let before = redirect_programs();
    let json = tmp("redirect-later.json");
    let pattern = format!("prof-{XHOST}-pod-*");
    let attach = Attach::start(&["--pod", &pattern, "--json", json.to_str().unwrap()]);
    let lab = lab_up(&[LAB, "--placement", "cross-host"]);
    // Followed within 2 s of the network being ready (tests/attach.rs), with a margin.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (pod_a, pod_b) = (ns("pod-a"), ns("pod-b"));
    let period = std::time::Duration::from_millis(5);
    udp_echo((&pod_a, &pod_b), "198.18.2.1", PORT, 100, 64, period);
    let (_, err) = attach.stop();
    drop(lab);
    assert_gone(XHOST, before);
    let r = report(&json);
    for pod in [&pod_a, &pod_b] {
        assert!(
            err.contains(&format!("attach: following pod {pod}")),
            "{err}"
        );
        let name = format!("tc:ingress@eth0/{pod}");
        let h = r
            .hook(&name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", r.hooks));
        assert_eq!(h.status, Status::Attached, "{h:?}");
    }
    for to_pod in [&pod_a, &pod_b] {
        let segment = format!("eBPF redirect peer wire0 -> eth0 ({to_pod})");
        let n = crossing(&r, &segment);
        assert_eq!(n, 100, "{segment}: {n} packets; paths: {:?}", r.paths);
    }
}

/// The hosts of a lab hold no NAT rule and forward nothing: a Service there is the program's.
fn assert_no_kube_proxy(lab: &str, hosts: &[&str]) {
    for host in hosts {
        let ns = format!("prof-{lab}-{host}");
        let out = |cmd: &[&str]| {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns])
                .args(cmd)
                .output()
                .expect("ip netns exec");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert_eq!(out(&["sysctl", "-n", "net.ipv4.ip_forward"]), "0", "{ns}");
        let nat = out(&["iptables-save", "-t", "nat"]) + &out(&["nft", "list", "ruleset"]);
        assert!(
            !nat.contains("KUBE") && !nat.contains("kube-proxy"),
            "{ns}: {nat}"
        );
    }
}

/// A Service on the eBPF datapath, as Cilium's kube-proxy replacement: the program on the
/// client's veth gives a packet to the ClusterIP its backend as destination before the
/// redirect, and the one where the reply enters the client's host gives it the ClusterIP back.
/// No netfilter rule and no forwarding in the hosts; UDP and TCP exchanges through the
/// ClusterIP complete, their journeys whole, the translation inside the redirects' segments.
#[test]
fn an_ebpf_service_translates_in_the_datapath_at_both_placements() {
    let before = redirect_programs();
    for placement in ["same-host", "cross-host"] {
        let (name, hosts): (&str, &[&str]) = match placement {
            "same-host" => (LAB, &["host"]),
            _ => (XHOST, &["host-a", "host-b"]),
        };
        let up = [LAB, "--placement", placement, "--service", "ebpf"];
        let lab = lab_up(&up);
        assert_no_kube_proxy(name, hosts);
        for proto in ["udp", "tcp"] {
            let run = [
                "--lab",
                LAB,
                "--placement",
                placement,
                "--count",
                "200",
                "--proto",
                proto,
            ];
            let r = run_json(&run);
            let via = r.service.as_deref().unwrap_or_default();
            assert!(
                via.starts_with("Service (ebpf) 198.18.250.10:8080 -> "),
                "{placement} {proto}: {via:?}"
            );
            let peer = |from, pod: &str| Step {
                name: format!("eBPF redirect peer {from} -> eth0 ({pod})"),
                from,
                to: "eth0",
            };
            let neigh = |from, host: &str| Step {
                name: format!("eBPF redirect neigh {from} -> wire0 ({host})"),
                from,
                to: "wire0",
            };
            let dirs = match placement {
                "same-host" => [
                    ("request", vec![peer("veth-a", "pod-b")], &["veth-b"][..]),
                    ("response", vec![peer("veth-b", "pod-a")], &["veth-a"][..]),
                ],
                _ => [
                    (
                        "request",
                        vec![neigh("veth-a", "host-a"), peer("wire0", "pod-b")],
                        &["veth-b"][..],
                    ),
                    (
                        "response",
                        vec![neigh("veth-b", "host-b"), peer("wire0", "pod-a")],
                        &["veth-a"][..],
                    ),
                ],
            };
            assert_redirected(&r, 200, dirs);
        }
        drop(lab);
        assert_gone(name, before);
    }
}
