//! The dpdk lab: two pods whose host-side veth ends are ports of dpdk-testpmd (io forwarding,
//! af_packet), a userspace datapath. The lab comes up and goes down leaving no testpmd, no
//! namespace, no device and no DPDK runtime directory; tagged UDP and TCP runs profile
//! completely, with the time in testpmd as one named segment that the report flags as
//! userspace; a run that made the lab stops testpmd, also on SIGTERM. With a forwarder of its
//! own in testpmd's place (built with symbols, tests/bin/userspace_fwd.rs), user probes on its
//! receive, forward and send functions split that segment in order.
//! (The ground truth across testpmd is in ground_truth.rs, with the other labs'.)
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use profiler::report::schema::{DirectionReport, SegmentReport};
use serde_json::Value;

mod common;
use common::{assert_clean_of, direction, lab_up, profiler, run_json, BIN};

const LAB: &str = "dpdk";
const TESTPMD: &str = "/usr/bin/dpdk-testpmd";
const RUN_DIR: &str = "/run/profiler/dpdk/dpdk-host";
const RUNTIME_DIR: &str = "/var/run/dpdk/profiler-dpdk";
const REQUEST_SEGMENT: &str = "userspace datapath dpdk-testpmd veth-a -> veth-b";
const RESPONSE_SEGMENT: &str = "userspace datapath dpdk-testpmd veth-b -> veth-a";

/// Whether testpmd is installed; says why the test skips when not (`cargo xtask test`
/// installs it).
fn have_testpmd() -> bool {
    let have = Path::new(TESTPMD).exists();
    if !have {
        common::skip::skip(
            &format!("{TESTPMD} is not installed (apt-get install dpdk-dev)"),
            None,
        );
    }
    have
}

/// The testpmd the lab's state records: (pid, start time).
fn recorded_testpmd() -> (u32, u64) {
    recorded_testpmd_or_forwarder(TESTPMD)
}

/// The forwarder (`program`) the lab's state records: (pid, start time).
fn recorded_testpmd_or_forwarder(program: &str) -> (u32, u64) {
    let path = Path::new(profiler::lab::STATE_DIR).join(format!("{LAB}.json"));
    let state: Value = serde_json::from_slice(&std::fs::read(&path).expect("the dpdk lab's state"))
        .expect("state JSON");
    let f = &state["forwarder"];
    assert_eq!(f["program"], program, "{state}");
    assert_eq!(
        f["ports"],
        serde_json::json!(["veth-a", "veth-b"]),
        "{state}"
    );
    (
        f["pid"].as_u64().expect("pid") as u32,
        f["start_time"].as_u64().expect("start time"),
    )
}

/// Whether that process (not a later one with its pid) still runs; a zombie has exited.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s[s.rfind(')')? + 1..].to_string();
            after.split_whitespace().next().map(|st| st != "Z")
        })
        .unwrap_or(false)
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Nothing of the lab remains: no testpmd of ours, its directories, namespaces, state.
fn assert_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !running(pid),
        "testpmd (pid {pid}, {}) still runs",
        comm(pid)
    );
    for dir in [RUN_DIR, RUNTIME_DIR] {
        assert!(!Path::new(dir).exists(), "{dir} left behind");
    }
    assert_clean_of(LAB);
}

#[test]
fn lab_up_runs_testpmd_and_lab_down_leaves_nothing() {
    if !have_testpmd() {
        return;
    }
    let guard = lab_up(&[LAB]);
    let (pid, _) = recorded_testpmd();
    assert!(running(pid), "testpmd (pid {pid}) is not running");
    assert_eq!(comm(pid), "dpdk-testpmd");
    assert!(
        Path::new(RUNTIME_DIR).exists(),
        "testpmd has no runtime dir"
    );
    // Forwarding works both ways: ping from pod-a to pod-b and back through testpmd.
    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            "prof-dpdk-pod-a",
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
        ])
        .args(["-W", "2", "198.18.0.2"])
        .output()
        .expect("running ping");
    assert!(
        ping.status.success(),
        "ping through testpmd: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let out = profiler(&["lab", "down", LAB]);
    assert!(
        out.status.success(),
        "lab down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(guard);
    assert_gone(pid);
}

/// Profiles `proto` across testpmd: no event lost, at least 95% of the exchanges complete in
/// both directions, and testpmd's time is one segment, flagged userspace, between the last
/// hop on the receiving port and the first on the sending one.
fn profile_across_testpmd(proto: &str) {
    let r = run_json(&[
        "--lab",
        LAB,
        "--proto",
        proto,
        "--count",
        "1000",
        "--rate",
        "2000",
        "--keep-lab",
    ]);
    assert_eq!(r.events.lost, 0, "{proto}: lost events");
    let completed = u64::from(r.traffic.completed);
    assert_eq!(completed, 1000, "{proto}: exchanges completed");
    for (name, segment, from, to) in [
        ("request", REQUEST_SEGMENT, "veth-a", "veth-b"),
        ("response", RESPONSE_SEGMENT, "veth-b", "veth-a"),
    ] {
        let dir = direction(&r, name);
        let complete = dir.complete_packets;
        assert!(
            complete * 100 >= completed * 95,
            "{proto} {name}: {complete} of {completed} journeys complete"
        );
        let segs = &dir.segments;
        let userspace: Vec<&SegmentReport> = segs.iter().filter(|s| s.userspace).collect();
        assert_eq!(
            userspace.len(),
            1,
            "{proto} {name}: one userspace segment expected in {segs:?}"
        );
        let s = userspace[0];
        assert_eq!(s.name, segment, "{proto} {name}");
        let hops = dir.hop_sequence();
        let (a, b) = (s.from, s.to);
        assert_eq!(hops[a].1, Some(from), "{proto} {name}: {hops:?}");
        assert_eq!(hops[b].1, Some(to), "{proto} {name}: {hops:?}");
        // The last hop on the receiving port, the first on the sending one.
        assert!(
            hops[a + 1..].iter().all(|h| h.1 != Some(from)),
            "{proto} {name}: a hop on {from} after the userspace segment: {hops:?}"
        );
        assert!(
            hops[..b].iter().all(|h| h.1 != Some(to)),
            "{proto} {name}: a hop on {to} before the userspace segment: {hops:?}"
        );
        let mean = s.stats.mean_ns;
        println!("{proto} {name}: {segment}: mean {:.1} us", mean / 1000.0);
        assert!(mean > 0.0, "{proto} {name}: empty userspace segment");
    }
}

#[test]
fn udp_and_tcp_profile_completely_across_testpmd() {
    if !have_testpmd() {
        return;
    }
    let guard = lab_up(&[LAB]);
    let (pid, _) = recorded_testpmd();
    profile_across_testpmd("udp");
    profile_across_testpmd("tcp");
    drop(guard);
    assert_gone(pid);
}

#[test]
fn a_run_that_made_the_lab_stops_testpmd_also_on_sigterm() {
    if !have_testpmd() {
        return;
    }
    // Made and removed by the run itself.
    let r = run_json(&["--lab", LAB, "--count", "200"]);
    assert_eq!(r.traffic.completed, 200);
    assert!(
        !Path::new(profiler::lab::STATE_DIR)
            .join(format!("{LAB}.json"))
            .exists(),
        "the run left its lab up"
    );
    assert!(!Path::new(RUN_DIR).exists(), "{RUN_DIR} left by the run");
    // SIGTERM while the run that made the lab is under way.
    let child = Command::new(BIN)
        .args([
            "run", "--lab", LAB, "--count", "100000", "--rate", "1000", "--quiet",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting a long run");
    let deadline = Instant::now() + Duration::from_secs(60);
    let state = Path::new(profiler::lab::STATE_DIR).join(format!("{LAB}.json"));
    while !state.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(state.exists(), "the run did not bring the lab up");
    let (pid, _) = recorded_testpmd();
    // Let it attach and send for a moment.
    std::thread::sleep(Duration::from_secs(3));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM to the run");
    let out = child.wait_with_output().expect("waiting for the run");
    assert!(
        !out.status.success(),
        "a run ended by SIGTERM exits non-zero"
    );
    assert_gone(pid);
}

/// The test forwarder (tests/bin/userspace_fwd.rs), built with symbols.
const FORWARDER: &str = env!("CARGO_BIN_EXE_userspace-fwd");

/// The userspace segments of a direction: (name, mean ns), in path order.
fn userspace_segments(dir: &DirectionReport) -> Vec<(&str, f64)> {
    (dir.segments.iter())
        .filter(|s| s.userspace)
        .map(|s| (s.name.as_str(), s.stats.mean_ns))
        .collect()
}

#[test]
fn uprobe_hops_split_the_userspace_segment_in_order() {
    let guard = lab_up(&[LAB, "--forwarder", FORWARDER]);
    let (pid, _) = recorded_testpmd_or_forwarder(FORWARDER);
    let run = [
        "--lab",
        LAB,
        "--count",
        "1000",
        "--rate",
        "2000",
        "--keep-lab",
    ];
    let without = run_json(&run);
    let probes = [
        "fwd_receive@receive",
        "fwd_forward@forward",
        "fwd_send@send",
    ]
    .map(|p| format!("{FORWARDER}:{p}"));
    let mut args: Vec<&str> = run.to_vec();
    for p in &probes {
        args.extend(["--uprobe", p.as_str()]);
    }
    let with = run_json(&args);
    for r in [&without, &with] {
        assert_eq!(r.events.lost, 0, "lost events");
        assert_eq!(r.traffic.completed, 1000);
    }
    for (name, from, to) in [
        ("request", "veth-a", "veth-b"),
        ("response", "veth-b", "veth-a"),
    ] {
        let (base, split) = (direction(&without, name), direction(&with, name));
        for d in [base, split] {
            let complete = d.complete_packets;
            assert!(
                complete >= 950,
                "{name}: {complete} of 1000 journeys complete"
            );
        }
        let whole = userspace_segments(base);
        assert_eq!(
            whole.iter().map(|s| s.0).collect::<Vec<_>>(),
            [format!("userspace datapath userspace-fwd {from} -> {to}")],
            "{name} without probes"
        );
        let parts = userspace_segments(split);
        let names: Vec<&str> = parts.iter().map(|s| s.0).collect();
        let want = [
            format!("userspace {from} -> uprobe:receive"),
            "userspace uprobe:receive -> uprobe:forward".to_string(),
            "userspace uprobe:forward -> uprobe:send".to_string(),
            format!("userspace uprobe:send -> {to}"),
        ];
        assert_eq!(names, want, "{name} with probes");
        // The probes' hops sit, in order, between the two ports' hops.
        let hops: Vec<&str> = split.hop_sequence().into_iter().map(|h| h.0).collect();
        let at = hops
            .iter()
            .position(|h| *h == "uprobe:receive")
            .unwrap_or_else(|| panic!("{name}: no uprobe:receive hop in {hops:?}"));
        assert_eq!(
            hops[at..at + 3],
            ["uprobe:receive", "uprobe:forward", "uprobe:send"],
            "{name}: {hops:?}"
        );
        let sum: f64 = parts.iter().map(|s| s.1).sum();
        let alone = whole[0].1;
        // What the three probes add (their traps; the programs' own time is already apart).
        let per_probe = (sum - alone) / 3.0;
        println!(
            "{name}: userspace segment {:.1} us alone, {:.1} us as the sum of its {} parts: {:+.1} us per probe{}",
            alone / 1000.0,
            sum / 1000.0,
            parts.len(),
            per_probe / 1000.0,
            if (sum - alone).abs() <= 0.1 * alone {
                " (within 10%)"
            } else {
                " (the probe cost)"
            }
        );
        assert!(
            sum > 0.0 && parts.iter().all(|s| s.1 > 0.0),
            "{name}: a userspace part is empty: {parts:?}"
        );
    }
    drop(guard);
    assert_gone(pid);
}
