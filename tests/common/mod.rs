//! Helpers shared by the integration tests that drive the `profiler` binary (run.rs,
//! overlay.rs, ground_truth.rs, attach.rs, ...). Each test crate uses a different subset.
#![allow(dead_code)]

pub mod agent;
pub mod attach;
pub mod delay;
pub mod otlp;
pub mod prometheus;
pub mod skip;
pub mod truth;

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use clap::ValueEnum as _;
use profiler::{
    cli::exit,
    lab::{lab_name, Lab, Placement, Topology},
    report::schema::{self, CompareReport, DirectionReport, DoctorReport, RunReport},
};

pub const BIN: &str = env!("CARGO_BIN_EXE_profiler");

/// How long `lab_up` waits for a lab someone else has up.
const LAB_WAIT: Duration = Duration::from_secs(300);

pub fn profiler(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("running the profiler binary")
}

/// Takes lab NAME down when the test ends, passing or not, if it is still up (its state file is
/// there), so a failing test leaves nothing for the next; a `down` that fails fails a test that
/// was passing.
pub struct LabGuard(pub String);

impl Drop for LabGuard {
    fn drop(&mut self) {
        let state = std::path::Path::new(profiler::lab::STATE_DIR).join(format!("{}.json", self.0));
        if !state.exists() {
            return;
        }
        let out = profiler(&["lab", "down", &self.0]);
        if !std::thread::panicking() {
            assert!(
                out.status.success(),
                "lab down {}: {}",
                self.0,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// `profiler lab up TOPOLOGY [OPTIONS]`, which must succeed, and the guard that takes it down.
/// Labs are shared by name with every checkout on this machine: one that someone else has up is
/// waited for (up to LAB_WAIT), never taken down.
pub fn lab_up(args: &[&str]) -> LabGuard {
    let mut all = vec!["lab", "up"];
    all.extend_from_slice(args);
    let deadline = Instant::now() + LAB_WAIT;
    loop {
        let out = profiler(&all);
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let busy = out.status.code() == Some(exit::BUSY.into());
        assert!(busy && Instant::now() < deadline, "lab up {args:?}: {err}");
        eprintln!("lab up {args:?}: {}; waiting", err.trim());
        std::thread::sleep(Duration::from_secs(5));
    }
    let topology = Topology::from_str(args[0], false).expect("a topology as first argument");
    let placement = if args.windows(2).any(|w| w == ["--placement", "cross-host"]) {
        Placement::CrossHost
    } else {
        Placement::SameHost
    };
    LabGuard(lab_name(topology, placement))
}

/// `ip ARGS`, which must succeed: for tests that build namespaces the way people do, without
/// the lab code.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `profiler doctor --json`, which must succeed, read through its schema.
pub fn doctor_report() -> DoctorReport {
    let out = profiler(&["doctor", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: DoctorReport = serde_json::from_slice(&out.stdout).expect("profiler.doctor.v1 JSON");
    assert_eq!(r.schema, schema::DOCTOR_SCHEMA);
    r
}

/// A `profiler.run.v1` report a command wrote on stdout, read through its schema.
pub fn run_report_of(stdout: &[u8]) -> RunReport {
    let r: RunReport = serde_json::from_slice(stdout).expect("profiler.run.v1 JSON on stdout");
    assert_eq!(r.schema, schema::RUN_SCHEMA);
    r
}

/// The profiler.compare.v1 report `profiler compare --json -` wrote on stdout.
pub fn compare_report_of(stdout: &[u8]) -> CompareReport {
    let r: CompareReport =
        serde_json::from_slice(stdout).expect("profiler.compare.v1 JSON on stdout");
    assert_eq!(r.schema, schema::COMPARE_SCHEMA);
    r
}

/// `profiler run ARGS --json -`, which must exit 0: the profiler.run.v1 report.
pub fn run_json(args: &[&str]) -> RunReport {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--json", "-"]);
    let out = profiler(&all);
    assert!(
        out.status.success(),
        "profiler {}: {}",
        all.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    run_report_of(&out.stdout)
}

/// Every exchange completed, no event lost, and every exchange gave a complete journey in both
/// directions whose segments and the profiler's own programs add up to the end-to-end time
/// (within 1%).
pub fn assert_complete(r: &RunReport, count: u64, ctx: &str) {
    assert_eq!(r.events.lost, 0, "{ctx}: lost events");
    let completed = u64::from(r.traffic.completed);
    assert_eq!(completed, count, "{ctx}: exchanges completed");
    assert_eq!(r.directions.len(), 2, "{ctx}: directions");
    for dir in &r.directions {
        let ctx = format!("{ctx} {}", dir.direction);
        assert_eq!(dir.complete_packets, completed, "{ctx}");
        assert_eq!(dir.incomplete_packets, 0, "{ctx}");
        assert!(
            dir.adds_up(0.01),
            "{ctx}: segments {:?} vs end to end {:?}",
            dir.segments,
            dir.end_to_end
        );
    }
}

/// Direction `name` of run report `r`, which must have it.
pub fn direction<'a>(r: &'a RunReport, name: &str) -> &'a DirectionReport {
    r.direction(name)
        .unwrap_or_else(|| panic!("no {name} direction"))
}

/// `labels` appear in `hops`' hook labels in this order (other hops may come between).
pub fn assert_in_order(hops: &[(&str, Option<&str>)], labels: &[&str], ctx: &str) {
    let mut want = labels.iter().peekable();
    for (hook, _) in hops {
        // Hops are named KIND:LABEL ("kprobe:veth_xmit").
        if want
            .peek()
            .is_some_and(|l| hook.rsplit(':').next() == Some(l))
        {
            want.next();
        }
    }
    let seen: Vec<&str> = hops.iter().map(|(h, _)| *h).collect();
    assert!(
        want.peek().is_none(),
        "{ctx}: expected {labels:?} in order, missing from {:?} on: {seen:?}",
        want.collect::<Vec<_>>()
    );
}

/// Lab `name` as `profiler lab list --json` describes it now.
pub fn lab_info(name: &str) -> Lab {
    let out = profiler(&["lab", "list", "--json"]);
    let labs: Vec<Lab> = serde_json::from_slice(&out.stdout).expect("lab list JSON");
    let names: Vec<String> = labs.iter().map(|l| l.name.clone()).collect();
    labs.into_iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("lab {name} is not listed: {names:?}"))
}

/// Nothing of the project's may remain: no lab namespace, no BPF program of ours. The kernel
/// frees an exited process's programs asynchronously, so they get a moment to go.
pub fn assert_clean() {
    assert_clean_of("");
}

/// `assert_clean`, looking only at the namespaces of lab `lab` (all labs when empty): other
/// checkouts on this machine may have labs of their own up. Programs cannot be told apart by
/// checkout, so none of ours may be loaded.
pub fn assert_clean_of(lab: &str) {
    let prefix = if lab.is_empty() {
        "prof-".to_string()
    } else {
        format!("prof-{lab}-")
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while !our_programs().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let leftover_ns: Vec<_> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftover_ns.is_empty(),
        "namespaces left behind: {leftover_ns:?}"
    );
    let loaded = our_programs();
    assert!(loaded.is_empty(), "BPF programs left loaded: {loaded:?}");
    for dir in [
        profiler::lab::STATE_DIR,
        profiler::lab::owner::LOCK_DIR,
        profiler::kernel::tc::TC_DIR,
    ] {
        let left: Vec<_> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| lab.is_empty() || n.starts_with(&format!("{lab}.")))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "left in {dir}: {left:?}");
    }
}

pub fn our_programs() -> Vec<String> {
    let ours: Vec<String> = profiler::datapath::HOOK_TABLE
        .iter()
        .flat_map(|h| h.programs())
        .collect();
    loaded_named(&ours)
}

/// The loaded BPF programs named one of `names` (the kernel keeps 15 bytes of a name).
pub fn loaded_named(names: &[String]) -> Vec<String> {
    let names: Vec<String> = names.iter().map(|n| n.chars().take(15).collect()).collect();
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok()?.name_as_str().map(str::to_string))
        .filter(|n| names.contains(n))
        .collect()
}

/// The bridge lab's request path, hop by hop: pod-a's socket, its eth0 (veth), the host end
/// veth-a, the bridge forwarding to veth-b, pod-b's eth0, pod-b's socket. veth delivers to the
/// peer's backlog inside ndo_start_xmit, so the peer's netif_rx precedes the sender's net_dev_xmit.
pub const BRIDGE_REQUEST: &[(&str, Option<&str>)] = &[
    ("app:send", None),
    ("tc:egress", Some("eth0")),
    ("tp_btf:net_dev_queue", Some("eth0")),
    ("tp_btf:net_dev_start_xmit", Some("eth0")),
    ("tp_btf:netif_rx", Some("veth-a")),
    ("tp_btf:net_dev_xmit", Some("eth0")),
    ("tp_btf:netif_receive_skb", Some("veth-a")),
    ("tc:ingress", Some("veth-a")),
    ("tc:egress", Some("veth-b")),
    ("tp_btf:net_dev_queue", Some("veth-b")),
    ("tp_btf:net_dev_start_xmit", Some("veth-b")),
    ("tp_btf:netif_rx", Some("eth0")),
    ("tp_btf:net_dev_xmit", Some("veth-b")),
    ("tp_btf:netif_receive_skb", Some("eth0")),
    ("tc:ingress", Some("eth0")),
    ("app:recv", None),
];

/// The host-side peer of eth0 in `netns`: the device whose ifindex eth0's iflink names.
pub fn host_veth(netns: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "cat", "/sys/class/net/eth0/iflink"])
        .output()
        .expect("ip netns exec");
    let index = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let links = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&links.stdout)
        .lines()
        .find_map(|l| {
            let mut parts = l.split(": ");
            (parts.next()? == index).then(|| parts.next())?
        })
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .unwrap_or_else(|| panic!("no device {index} here (eth0's peer in {netns})"))
}

/// The middle value of `v` (of the two middle ones, the upper).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("a process's status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}
