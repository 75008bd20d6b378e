//! End-to-end runs of the `profiler` binary as root on the real kernel: the bridge lab, real eBPF
//! programs, real tagged traffic. Each run is checked against an independently written-down hop
//! order, and everything the run created must be gone afterwards.
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{assert_clean, doctor_report, ip, profiler, run_report_of, BIN, BRIDGE_REQUEST};
use profiler::report::schema::{HookSet, HookStatus, Made, Status};

fn expected(dir: &str) -> Vec<(&'static str, Option<&'static str>)> {
    BRIDGE_REQUEST
        .iter()
        .map(|&(hook, ifname)| match (dir, ifname) {
            // Same path backwards: pod-b's eth0 to veth-b, the bridge, veth-a to pod-a's eth0.
            ("response", Some("veth-a")) => (hook, Some("veth-b")),
            ("response", Some("veth-b")) => (hook, Some("veth-a")),
            _ => (hook, ifname),
        })
        .collect()
}

/// The report records the command line that wrote it and the build: the crate's version and
/// the checkout's commit.
fn assert_made_by(made: Option<&Made>, args: &[&str]) {
    let made = made.expect("the report says what made it");
    let command = &made.command;
    assert!(command.len() > args.len(), "{made:?}");
    assert_eq!(command[1..=args.len()], *args, "{made:?}");
    let head = Command::new("git")
        .args(["rev-parse", "--short=7", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git");
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    let version = &made.version;
    assert!(
        version.starts_with(env!("CARGO_PKG_VERSION")) && version.contains(&head),
        "the build's version and commit {head}: {made:?}"
    );
}

fn check_run(proto: &str, size: usize) {
    let size_arg = size.to_string();
    let out = profiler(&[
        "run", "--lab", "bridge", "--proto", proto, "--size", &size_arg, "--count", "1000",
        "--json", "-",
    ]);
    assert!(
        out.status.success(),
        "{proto} {size}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = run_report_of(&out.stdout);
    assert_made_by(
        r.made.as_ref(),
        &["run", "--lab", "bridge", "--proto", proto],
    );
    assert_eq!(r.events.lost, 0, "{proto} {size}: lost events");
    let completed = u64::from(r.traffic.completed);
    assert_eq!(completed, 1000, "{proto} {size}: exchanges completed");
    for dir in &r.directions {
        let ctx = format!("{proto} {size} {}", dir.direction);
        assert_eq!(
            dir.hop_sequence(),
            expected(&dir.direction),
            "{ctx}: hop sequence"
        );
        // Every completed exchange gave a complete journey through every hop, in order.
        assert_eq!(dir.complete_packets, completed, "{ctx}");
        assert_eq!(dir.incomplete_packets, 0, "{ctx}");
        assert_eq!(dir.segments.len(), BRIDGE_REQUEST.len() - 1, "{ctx}");
        assert!(
            dir.adds_up(0.01),
            "{ctx}: segments vs end to end {:?}",
            dir.end_to_end
        );
        assert!(
            dir.segments.iter().all(|s| s.stats.samples == completed),
            "{ctx}: samples"
        );
        assert!(
            dir.segments
                .iter()
                .any(|s| s.name.starts_with("bridge br0")),
            "{ctx}: bridge segment"
        );
    }
    assert_clean();
}

#[test]
fn udp_64() {
    check_run("udp", 64);
}

#[test]
fn udp_1400() {
    check_run("udp", 1400);
}

/// 16 KiB over a 1500-byte MTU: IP fragments; the first carries the tag and is the one followed.
#[test]
fn udp_16k() {
    check_run("udp", 16384);
}

#[test]
fn tcp_64() {
    check_run("tcp", 64);
}

#[test]
fn tcp_1400() {
    check_run("tcp", 1400);
}

/// TCP keeps 16 KiB in page fragments: tc reads the tag, the tracepoints find it by (flow, seq).
#[test]
fn tcp_16k() {
    check_run("tcp", 16384);
}

/// The deep hooks (kernel functions) among a list of hook statuses.
fn deep_hooks(hooks: &[HookStatus]) -> Vec<&HookStatus> {
    hooks.iter().filter(|h| h.set == HookSet::Deep).collect()
}

/// The deep hooks need kprobes, which this machine's kernel lacks (CONFIG_KPROBES off): a run
/// asking for them says so, uses the stable set, and reports every deep hook with why it did not
/// attach; the run itself is whole. On a kernel with kprobes the deep set must be in effect.
#[test]
fn deep_hooks_fall_back_to_the_stable_set_with_reasons() {
    let out = profiler(&[
        "run", "--lab", "bridge", "--count", "20", "--hooks", "deep", "--json", "-",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r = run_report_of(&out.stdout);
    assert_eq!(r.traffic.completed, 20, "{stderr}");
    let deep = deep_hooks(&r.hooks);
    assert!(deep.len() >= 20, "{} deep hooks reported", deep.len());
    if std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists() {
        println!("this kernel has kprobes: checking that the deep set is in effect");
        assert_eq!(r.hook_set, HookSet::Deep, "kprobes are there: {stderr}");
    } else {
        println!("this kernel has no kprobes: checking the fallback to the stable set");
        assert_eq!(r.hook_set, HookSet::Stable);
        assert!(
            stderr.contains("no deep hook attached") && stderr.contains("using the stable hooks"),
            "no fallback notice: {stderr}"
        );
        for h in deep {
            let reason = h.reason.as_deref().unwrap_or("");
            assert_eq!(h.status, Status::Unavailable, "{h:?}");
            if h.kind == "kprobe" {
                assert!(reason.contains("no kprobes"), "{h:?}");
            } else {
                assert!(!reason.is_empty(), "{h:?}");
            }
        }
    }
    assert_clean();
}

/// `doctor` lists every deep hook in both modes, each attached or with why not.
#[test]
fn doctor_lists_every_deep_hook_with_why() {
    let d = doctor_report();
    for (list, hooks) in [("hooks", &d.hooks), ("follow_hooks", &d.follow_hooks)] {
        let deep = deep_hooks(hooks);
        assert!(deep.len() >= 20, "{list}: {} deep hooks", deep.len());
        for h in deep {
            let why = h.reason.as_deref().unwrap_or("");
            assert!(
                h.status == Status::Attached || !why.is_empty(),
                "{list}: {h:?}"
            );
        }
    }
    assert_clean();
}

#[test]
fn bad_input_is_one_clear_line_and_nonzero() {
    for (args, needle) in [
        (&["run", "--size", "8"][..], "--size must be between"),
        (
            &["run", "--proto", "udp", "--size", "65536"][..],
            "UDP payload is at most",
        ),
        (&["run", "--count", "0"][..], "--count must be at least 1"),
        (&["lab", "down", "nosuch"][..], "no lab named nosuch is up"),
        // Checked before the agent is asked anything.
        (
            &[
                "run",
                "--from",
                "(root)",
                "--to",
                "pod-b:198.18.1.2",
                "--agent",
                "198.19.0.2:7450",
            ][..],
            "--to names the VM's namespace as NODE:NETNS:IP",
        ),
    ] {
        let out = profiler(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    assert_clean();
}

/// SIGTERM and SIGINT in the middle of a run: everything is detached and the lab removed.
#[test]
fn signals_during_a_run_leave_nothing_behind() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let child = Command::new(BIN)
            .args([
                "run", "--lab", "bridge", "--count", "100000", "--rate", "1000",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        // Wait until the traffic runs (progress lines appear once a second).
        std::thread::sleep(Duration::from_millis(2500));
        unsafe { libc::kill(child.id() as i32, signal) };
        let started = Instant::now();
        let out = child.wait_with_output().expect("wait");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "teardown took too long"
        );
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("interrupted by SIG"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_clean();
    }
}

/// A path the profiler did not build: the bridge lab's namespaces profiled with --from/--to
/// must show the same hops as the lab run, found from netlink state alone (pods' veths, their
/// peers in the host namespace, the bridge's ports).
#[test]
fn existing_path_between_namespaces() {
    let up = profiler(&["lab", "up", "bridge"]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let out = profiler(&[
        "run",
        "--from",
        "prof-bridge-pod-a",
        "--to",
        "prof-bridge-pod-b:198.18.0.2",
        "--count",
        "500",
        "--json",
        "-",
    ]);
    let down = profiler(&["lab", "down", "bridge"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let r = run_report_of(&out.stdout);
    for dir in &r.directions {
        let name = &dir.direction;
        assert_eq!(dir.hop_sequence(), expected(name), "{name}");
        assert_eq!(dir.complete_packets, 500, "{name}");
        let segments = dir.segment_names();
        assert!(
            segments.iter().any(|s| s.starts_with("bridge br0")),
            "{name}: {segments:?}"
        );
    }
    assert_clean();
}

/// A node as container runtimes build it, with plain `ip`: two pod namespaces, each with an
/// `eth0` of the same ifindex, whose veth peers are ports of a bridge in this namespace.
/// Removed on drop (the pods' namespaces take their veths, and the peers, with them).
struct RuntimeNode;

impl RuntimeNode {
    const PODS: [(&'static str, &'static str, &'static str); 2] = [
        ("prof-rt-c1", "vethrtc1", "198.18.240.1/24"),
        ("prof-rt-c2", "vethrtc2", "198.18.240.2/24"),
    ];
    const BRIDGE: &'static str = "brrt0";

    fn new() -> RuntimeNode {
        let node = RuntimeNode;
        ip(&["link", "add", Self::BRIDGE, "type", "bridge"]);
        ip(&["link", "set", Self::BRIDGE, "up"]);
        for (ns, peer, addr) in Self::PODS {
            ip(&["netns", "add", ns]);
            // The same ifindex in both pods, as every pod's eth0 usually has.
            ip(&[
                "-n", ns, "link", "add", "eth0", "index", "5", "type", "veth", "peer", "name",
                peer, "netns", "1",
            ]);
            ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["link", "set", peer, "master", Self::BRIDGE, "up"]);
        }
        node
    }
}

impl Drop for RuntimeNode {
    fn drop(&mut self) {
        for (ns, _, _) in Self::PODS {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "delete", Self::BRIDGE])
            .status();
    }
}

/// Two pods' eth0 share an ifindex: every hop, tc's included, must still be named after the
/// right device, because each event carries its device's namespace.
#[test]
fn pods_with_the_same_ifindex_are_told_apart() {
    let node = RuntimeNode::new();
    let out = profiler(&[
        "run",
        "--from",
        "prof-rt-c1",
        "--to",
        "prof-rt-c2:198.18.240.2",
        "--count",
        "300",
        "--json",
        "-",
        "--quiet",
    ]);
    drop(node);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = run_report_of(&out.stdout);
    for (dir, sender, receiver) in [
        ("request", "prof-rt-c1", "prof-rt-c2"),
        ("response", "prof-rt-c2", "prof-rt-c1"),
    ] {
        let d = r
            .direction(dir)
            .unwrap_or_else(|| panic!("no {dir} direction"));
        assert_eq!(d.complete_packets, 300, "{dir}");
        let segments = d.segment_names();
        assert_eq!(segments[1], "egress to queue eth0", "{dir}: {segments:?}");
        let last_device = segments[segments.len() - 2];
        assert_eq!(
            last_device, "receive to ingress eth0",
            "{dir}: {segments:?}"
        );
        assert!(
            segments
                .iter()
                .any(|s| *s == "bridge brrt0 (vethrtc1 -> vethrtc2)"
                    || *s == "bridge brrt0 (vethrtc2 -> vethrtc1)"),
            "{dir}: {segments:?}"
        );
        // Every hop on an eth0 is in the pod it belongs to: the sender's first, then the
        // receiver's.
        let pods: Vec<&str> = d
            .hops
            .iter()
            .filter(|h| h.ifname.as_deref() == Some("eth0"))
            .map(|h| h.netns.as_deref().expect("a device hop's namespace"))
            .collect();
        let switch = pods
            .iter()
            .position(|p| *p == receiver)
            .expect("receiver hops");
        assert!(
            pods[..switch].iter().all(|p| *p == sender)
                && pods[switch..].iter().all(|p| *p == receiver),
            "{dir}: eth0 hops by namespace: {pods:?}"
        );
        // No hop is named "((root))".
        for h in &d.hops {
            assert!(!h.name.contains("(("), "{}", h.name);
        }
    }
    assert_clean();
}

/// Collect, then attribute: a run's saved events give, through `profiler report --events` as
/// an unprivileged user, the table it printed and its JSON report byte for byte, for each kind
/// of traffic.
#[test]
fn saved_events_attribute_again_without_root_to_the_same_report() {
    let dir = std::env::temp_dir().join(format!("profiler-events-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    // Readable by the unprivileged user that attributes them, with a copy of the binary (the
    // checkout may be closed to others).
    Command::new("chmod")
        .args(["755", dir.to_str().unwrap()])
        .status()
        .expect("chmod");
    let bin = dir.join("profiler");
    std::fs::copy(BIN, &bin).expect("a copy of the binary");
    let kinds: [(&str, &[&str]); 3] = [
        ("rr", &["--count", "200"]),
        ("stream", &["--duration", "1s"]),
        ("alltoall", &["--count", "10", "--pods", "2"]),
    ];
    for (kind, extra) in kinds {
        let file = |name: &str| {
            dir.join(format!("{kind}-{name}"))
                .to_str()
                .unwrap()
                .to_string()
        };
        let (events, json) = (file("events.json"), file("run.json"));
        let mut args = vec!["run", "--lab", "bridge", "--traffic", kind, "--quiet"];
        args.extend(extra);
        args.extend(["--json", &json, "--save-events", &events]);
        let run = profiler(&args);
        assert!(
            run.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let again = |format: &str| {
            let out = Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&bin)
                .args(["report", "--events", &events, "--format", format])
                .output()
                .expect("setpriv");
            assert!(
                out.status.success(),
                "{kind}: report --events as nobody: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        };
        let table = String::from_utf8(again("table")).expect("UTF-8");
        assert!(table.contains("segment"), "{kind}: {table}");
        assert_eq!(
            table,
            String::from_utf8_lossy(&run.stdout),
            "{kind}: the table"
        );
        let saved = std::fs::read(&json).expect("the run's report");
        assert!(
            again("json") == saved,
            "{kind}: the JSON report differs from the run's {json}"
        );
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
    assert_clean();
}
