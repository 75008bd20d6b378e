//! Pods of a real container runtime (the node lab: containerd, runc and the CNI plugins, pods
//! made through CRI as kubelet makes them) named by `attach` and `run`, followed as they come
//! and go, and scraped by a real Prometheus with the project's alert rules and dashboard.
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

mod common;

use std::{
    collections::BTreeSet,
    net::UdpSocket,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use common::{
    assert_clean,
    attach::{report, segment_names, tmp, Attach},
    delay::Delay,
    lab_up, profiler,
    prometheus::{free_port, Prometheus},
    run_report_of, LabGuard,
};
use profiler::{lab::netns::run_in, report::schema::JourneyLine};
use serde_json::Value;

/// The node lab's Kubernetes namespace (profiler's lab/node.rs).
const NAMESPACE: &str = "prof-node";
/// The node lab's pods echo UDP and TCP on this port (profiler's lab/node.rs).
const ECHO_PORT: u16 = 7;

/// A pod of the node lab, as `lab list --json` and the kernel describe it.
struct NodePod {
    name: String,
    netns: String,
    ip: String,
    /// The host side of its veth, in this namespace.
    host_veth: String,
}

struct Node {
    socket: String,
    pods: Vec<NodePod>,
    _down: LabGuard,
}

fn node(pods: u32) -> Node {
    let guard = lab_up(&["node", "--pods", &pods.to_string()]);
    let (socket, pods) = read_node();
    Node {
        socket,
        pods,
        _down: guard,
    }
}

/// The node lab's CRI socket and pods, from `lab list --json`.
fn read_node() -> (String, Vec<NodePod>) {
    let lab = common::lab_info("node");
    let node = lab.node.expect("the node lab's node");
    let pods = (node.pods.into_iter())
        .map(|p| NodePod {
            name: p.name,
            host_veth: common::host_veth(&p.netns),
            ip: p.ip.to_string(),
            netns: p.netns,
        })
        .collect();
    (node.socket.display().to_string(), pods)
}

/// attach names every hop and segment of the pods' traffic after the pods, as the runtime
/// knows them; Prometheus scrapes its /metrics and answers queries by pod; a slowed pod's
/// segment makes the project's slow-segment alert pending; every query of the project's
/// Grafana dashboard returns data.
#[test]
fn attach_names_pods_and_prometheus_queries_them_by_pod() {
    let check = Command::new("promtool")
        .args(["check", "rules", common::prometheus::RULES])
        .output()
        .expect("promtool");
    assert!(
        check.status.success(),
        "promtool check rules: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let node = node(2);
    let (a, b) = (&node.pods[0], &node.pods[1]);
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let json = tmp("pods.json");
    let attach = Attach::start(&[
        "--pod",
        &format!("{NAMESPACE}/pod-*"),
        "--cri-socket",
        &node.socket,
        "--filter",
        &format!("udp and port {ECHO_PORT}"),
        "--prometheus",
        &metrics,
        "--json",
        json.to_str().unwrap(),
    ]);
    let prometheus = Prometheus::start(metrics.parse().unwrap());
    // pod-b's host-side veth holds what the bridge forwards to it: the segment into pod-b.
    let delay = Delay::hold(None, &b.host_veth, "egress", 150, 0);
    let done = AtomicBool::new(false);
    let traffic = std::thread::scope(|s| {
        let t = s.spawn(|| paced_udp(&a.netns, &b.ip, &done));
        let alert = format!(
            "ALERTS{{alertname=\"ProfilerSegmentSlow\", namespace=\"{NAMESPACE}\", pod=\"{}\"}}",
            b.name
        );
        let alerts = prometheus.wait_for(&alert, Duration::from_secs(60));
        for pod in [&a.name, &b.name] {
            let by_pod = format!(
                "profiler_segment_latency_seconds_count{{namespace=\"{NAMESPACE}\", pod=\"{pod}\"}}"
            );
            prometheus.wait_for(&by_pod, Duration::from_secs(10));
        }
        let empty = dashboard_queries()
            .into_iter()
            .filter(|q| prometheus.query(q).is_empty())
            .collect::<Vec<_>>();
        done.store(true, Ordering::Relaxed);
        let answered = t.join().expect("the UDP exchanges");
        (alerts, empty, answered)
    });
    drop(delay);
    let (alerts, empty, answered) = traffic;
    assert!(
        empty.is_empty(),
        "dashboard queries without data: {empty:#?}\n{}",
        prometheus.log()
    );
    assert!(
        alerts.iter().any(
            |a| a["metric"]["alertstate"] == "pending" || a["metric"]["alertstate"] == "firing"
        ),
        "{alerts:?}"
    );
    drop(prometheus);
    attach.stop();
    let r = report(&json);
    let _ = std::fs::remove_file(&json);
    assert!(
        r.journeys.started >= answered,
        "{} answered: {:?}",
        answered,
        r.journeys
    );
    let slowed = format!("[{NAMESPACE}/{}]", b.name);
    let into_b = (r.segments.iter())
        .filter(|s| s.name.ends_with(&slowed))
        .map(|s| (s.name.as_str(), s.p50_ns))
        .collect::<Vec<_>>();
    assert!(
        into_b.iter().any(|(_, p50)| *p50 > 140_000.0),
        "no segment named after {} holds the 150 us: {into_b:?}",
        b.name
    );
    // Events lines carry the pods too (stdout is read only at the end: a few lines).
    let pods_arg = format!("{NAMESPACE}/pod-*");
    let events = Attach::start(&[
        "--pod",
        &pods_arg,
        "--cri-socket",
        &node.socket,
        "--filter",
        "icmp",
        "--mode",
        "events",
    ]);
    common::attach::ping(&a.netns, &b.ip, 5, "0.01");
    let (events, _) = events.stop();
    let line = events.lines().next().expect("an events line");
    let journey: JourneyLine = serde_json::from_str(line).expect("an events line is JSON");
    let pods: BTreeSet<&str> = (journey.hops.iter())
        .filter_map(|h| h.pod.as_deref())
        .collect();
    assert!(
        pods.contains(a.name.as_str()) && pods.contains(b.name.as_str()),
        "{line}"
    );
    drop(node);
    assert_clean();
}

/// UDP requests from `netns` to the node lab's echo server at `server`, one every 2 ms, until
/// `done` (or 120 s: bounded whatever happens); a request unanswered in 1 s is not retried.
/// How many were answered.
fn paced_udp(netns: &str, server: &str, done: &AtomicBool) -> u64 {
    let to: std::net::SocketAddr = format!("{server}:{ECHO_PORT}").parse().unwrap();
    let socket = run_in(Some(netns), || Ok(UdpSocket::bind("0.0.0.0:0")?)).expect("a UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let (start, mut answered, mut buf) = (Instant::now(), 0, [0u8; 128]);
    for i in 0u32.. {
        if done.load(Ordering::Relaxed) || start.elapsed() > Duration::from_secs(120) {
            break;
        }
        if let Some(wait) =
            (start + Duration::from_millis(2) * i).checked_duration_since(Instant::now())
        {
            std::thread::sleep(wait);
        }
        socket.send_to(&[0x55; 64], to).expect("sending a request");
        answered += socket.recv(&mut buf).is_ok() as u64;
    }
    answered
}

/// Every PromQL query of deploy/grafana's dashboard, its variables set to match all.
fn dashboard_queries() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/profiler-dashboard.json"
    );
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard")).expect("JSON");
    dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("a PromQL expr")
                .replace("$__rate_interval", "1m")
                .replace("$node", ".*")
                .replace("$namespace", ".*")
                .replace("$pod", ".*")
        })
        .collect()
}

/// Pods created and deleted one after another while attached, traffic in each: every pod's
/// journeys are counted under its own name, and attach's memory stays bounded.
#[test]
fn pods_that_come_and_go_are_each_counted_under_their_name() {
    const CHURN: usize = 20;
    const PINGS: u32 = 20;
    let node = node(2);
    let server = &node.pods[0];
    let json = tmp("churn.json");
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let series = |name: &str| {
        common::prometheus::http_get(metrics, "/metrics")
            .expect("attach's /metrics")
            .lines()
            .any(|l| l.contains(&format!("pod=\"{name}\"")))
    };
    let attach = Attach::start(&[
        "--pod",
        &format!("{NAMESPACE}/churn-*"),
        "--cri-socket",
        &node.socket,
        "--prometheus",
        &metrics.to_string(),
        "--filter",
        &format!("icmp and dst host {}", server.ip),
        "--json",
        json.to_str().unwrap(),
    ]);
    let pid = attach.child.id();
    let mut rss = Vec::new();
    for i in 0..CHURN {
        let name = format!("churn-{i}");
        let out = profiler(&["lab", "pod", "add", "node", &name]);
        assert!(
            out.status.success(),
            "pod add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (_, pods) = read_node();
        let pod = pods.iter().find(|p| p.name == name).expect("the new pod");
        // Followed within 2 s of its network being ready (the add returns once it is).
        std::thread::sleep(Duration::from_secs(2));
        let sent = Instant::now();
        common::attach::ping(&pod.netns, &server.ip, PINGS, "0.01");
        assert!(sent.elapsed() < Duration::from_secs(5));
        if i < 3 {
            // /metrics is refreshed every second.
            std::thread::sleep(Duration::from_millis(1200));
            assert!(series(&name), "no series of {name} on /metrics");
        }
        let out = profiler(&["lab", "pod", "rm", "node", &name]);
        assert!(
            out.status.success(),
            "pod rm {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        rss.push(common::rss_kib(pid));
    }
    // A departed pod's series expire: gone from /metrics once attach saw it go.
    std::thread::sleep(Duration::from_secs(2));
    let left: Vec<String> = (0..CHURN)
        .map(|i| format!("churn-{i}"))
        .filter(|name| series(name))
        .collect();
    let (_, err) = attach.stop();
    assert!(
        left.is_empty(),
        "series of departed pods on /metrics: {left:?}"
    );
    let r = report(&json);
    let _ = std::fs::remove_file(&json);
    for i in 0..CHURN {
        let name = format!("churn-{i}");
        assert!(
            err.contains(&format!("following pod {NAMESPACE}/{name}")),
            "{name}: {err}"
        );
        assert!(
            err.contains(&format!("pod {NAMESPACE}/{name} went away")),
            "{name}: {err}"
        );
        // Each ping's first segment starts at the pod's eth0 and is the pod's.
        let counted: u64 = (r.segments.iter())
            .filter(|s| s.pod.as_deref() == Some(name.as_str()) && s.from.contains("eth0"))
            .map(|s| s.count)
            .max()
            .unwrap_or(0);
        assert!(
            counted >= u64::from(PINGS) - 1,
            "{name}: {counted} of {PINGS} pings counted: {:?}",
            r.segments
        );
    }
    // Bounded: after the first pods, 20 pods more cost attach under 8 MiB (a retired pod keeps
    // a few named segments: hundreds of bytes each).
    println!("attach's RSS (KiB) after each pod: {rss:?}");
    let grown = rss[CHURN - 1].saturating_sub(rss[2]);
    assert!(
        grown < 8 * 1024,
        "attach grew by {grown} KiB over {} pods: {rss:?}",
        CHURN - 3
    );
    drop(node);
    assert_clean();
}

/// `run --from POD --to POD` between two pods of the runtime: hops named after the pods.
#[test]
fn a_run_between_two_pods_names_them() {
    let node = node(2);
    let (a, b) = (&node.pods[0], &node.pods[1]);
    let from = format!("{NAMESPACE}/{}", a.name);
    let to = format!("{NAMESPACE}/{}", b.name);
    let out = profiler(&[
        "run",
        "--from",
        &from,
        "--to",
        &to,
        "--cri-socket",
        &node.socket,
        "--count",
        "50",
        "--json",
        "-",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = run_report_of(&out.stdout);
    let hops = &common::direction(&r, "request").hops;
    for pod in [&a.name, &b.name] {
        assert!(
            hops.iter()
                .any(|h| h.pod.as_ref() == Some(pod) && h.namespace.as_deref() == Some(NAMESPACE)),
            "no hop of {pod}: {hops:?}"
        );
    }
    assert!(
        hops.iter().any(|h| h.name.contains(&format!("({to})"))),
        "{hops:?}"
    );
    drop(node);
    assert_clean();
}

/// The node lab's bridge address: the pods' gateway (profiler's lab/node.rs).
const GATEWAY: &str = "198.18.100.1";

/// Hook names a person should never have to read in a segment's name.
const RAW_HOOKS: &[&str] = &[
    "net_dev_queue",
    "net_dev_start_xmit",
    "net_dev_xmit",
    "netif_receive_skb",
    "netif_rx",
    "napi_gro",
    "tc:",
];

/// Pod traffic routed through the pods' gateway, as a CNI with a route to the pod subnet via
/// the bridge makes it (a hairpin: up from the bridge to the host, routed, back down through the
/// bridge), next to traffic bridged straight to the gateway: every segment has a name a person
/// reads (no hook pairs, no doubled parentheses), a path's segments that also carry another
/// path's packets say so in the table, and the echo replies, whose journeys start where they
/// enter the pod, form paths of their own.
#[test]
fn a_hairpin_through_the_gateway_is_named_and_shared_segments_are_said() {
    let node = node(2);
    let (a, b) = (&node.pods[0], &node.pods[1]);
    let in_a = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", &a.netns])
            .args(args)
            .output()
            .expect("ip netns exec");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // pod-b through the gateway, and the redirect the host sends about it ignored.
    in_a(&[
        "ip",
        "route",
        "add",
        &format!("{}/32", b.ip),
        "via",
        GATEWAY,
    ]);
    in_a(&["sysctl", "-qw", "net.ipv4.conf.all.accept_redirects=0"]);
    in_a(&["sysctl", "-qw", "net.ipv4.conf.eth0.accept_redirects=0"]);
    let json = tmp("hairpin.json");
    let pod_a = format!("{NAMESPACE}/{}", a.name);
    let attach = Attach::start(&[
        "--pod",
        &pod_a,
        "--cri-socket",
        &node.socket,
        "--filter",
        "icmp",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(
        common::attach::ping(&a.netns, &b.ip, 40, "0.02").len(),
        40,
        "pod-b answers"
    );
    assert_eq!(
        common::attach::ping(&a.netns, GATEWAY, 20, "0.02").len(),
        20,
        "the gateway answers"
    );
    let (table, _) = attach.stop();
    let to_b = format!(
        "bridge prof-cni0 (-> port {}) [{NAMESPACE}/{}]",
        b.host_veth, b.name
    );
    drop(node);
    let r = report(&json);
    let _ = std::fs::remove_file(&json);
    let paths = &r.paths;
    let all: Vec<&str> = (paths.iter())
        .flat_map(|p| segment_names(&p.segments))
        .chain(segment_names(&r.segments))
        .collect();
    let unread: Vec<&str> = all
        .into_iter()
        .filter(|n| n.contains("((") || RAW_HOOKS.iter().any(|h| n.contains(h)))
        .collect();
    assert!(
        unread.is_empty(),
        "segments named after hooks: {unread:?}\n{table}"
    );
    let through = paths
        .iter()
        .find(|p| {
            segment_names(&p.segments)
                .iter()
                .any(|n| n.starts_with("forward prof-cni0 -> prof-cni0"))
        })
        .unwrap_or_else(|| panic!("no path routed back out of prof-cni0:\n{table}"));
    assert!(
        segment_names(&through.segments).contains(&to_b.as_str()),
        "no {to_b:?} on {:?}",
        segment_names(&through.segments)
    );
    // The requests to the gateway and to pod-b share their first segments, up to the bridge.
    let mut said = 0;
    for p in paths {
        let packets = p.packets;
        for s in &p.segments {
            let count = s.count;
            if count > packets {
                let line = format!(
                    "{count} packets, {} of which took another way",
                    count - packets
                );
                assert!(
                    table.contains(&line),
                    "no {line:?} for {:?} in\n{table}",
                    s.name
                );
                said += 1;
            }
        }
    }
    assert!(said >= 2, "no shared segments said:\n{table}");
    // Replies enter pod-a's eth0 from its veth peer (netif_rx): journeys of their own.
    let replies: u64 = paths
        .iter()
        .filter(|p| p.hops[0].starts_with("netif_rx eth0"))
        .map(|p| p.packets)
        .sum();
    assert!(
        replies >= 55,
        "{replies} of 60 replies on paths of their own:\n{table}"
    );
    assert_clean();
}

/// A node of many pods (60 here; 250 in benchmarks/node-scale.sh), all followed: attach follows
/// within 2 s, stays under 128 MiB, loses nothing while one pod pings another, passes over the
/// copies of the multicast frames the bridge floods to every pod (counted and said, not
/// followed: a journey per copy would fill the histograms), and counts the namespaces in its
/// header instead of listing them.
#[test]
fn attach_over_a_node_of_many_pods_is_quick_small_and_loses_nothing() {
    const PODS: u32 = 60;
    let node = node(PODS);
    let (a, b) = (&node.pods[0], &node.pods[PODS as usize - 1]);
    let json = tmp("many.json");
    let begun = Instant::now();
    let attach = Attach::start(&[
        "--pod",
        "*",
        "--cri-socket",
        &node.socket,
        "--json",
        json.to_str().unwrap(),
    ]);
    let ready = begun.elapsed();
    let pings = common::attach::ping(&a.netns, &b.ip, 200, "0.01");
    let rss = common::rss_kib(attach.child.id());
    let (table, _) = attach.stop();
    drop(node);
    let r = report(&json);
    let _ = std::fs::remove_file(&json);
    println!("{PODS} pods: following after {ready:?}, {rss} KiB resident");
    assert!(
        ready < Duration::from_secs(2),
        "attach followed {PODS} pods after {ready:?}"
    );
    assert!(
        rss < 128 * 1024,
        "attach over {PODS} pods: {rss} KiB resident"
    );
    assert_eq!(pings.len(), 200, "pings answered");
    assert!(
        r.journeys.started >= 400,
        "200 pings and their replies: {:?}",
        r.journeys
    );
    let header = table.lines().next().unwrap_or_default();
    assert!(header.contains(&format!("{PODS} namespaces: ")), "{header}");
    assert!(
        header.len() < 300,
        "the header lists the namespaces: {header}"
    );
    // Each pod's IPv6 router solicitations and listener reports, flooded to every other pod.
    let copies = r.journeys.multicast_not_followed;
    assert!(copies >= u64::from(PODS), "{:?}", r.journeys);
    assert!(
        table.contains(&format!(
            "not followed: {copies} copies of multicast or broadcast frames"
        )),
        "{table}"
    );
    assert_clean();
}
