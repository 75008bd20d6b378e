//! Recovery on a stock kernel: SIGKILL during `lab up` of an OVS lab (its daemons outlive the
//! profiler), and, before tcx (6.1), the tc filters that netlink attachments (a run's, a
//! delay's) leave on devices the profiler did not make, after a clean exit and after SIGKILL.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{assert_clean_of, ip, profiler, BIN};

fn sigkill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL to our own child");
}

fn down_all() -> String {
    let out = profiler(&["lab", "down", "--all"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "lab down --all: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    said
}

fn wait_for(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILL once ovs-vswitchd of host-a runs: the daemons and the half-built lab stay, and
/// `lab down --all` stops and removes all of it.
#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn a_killed_ovs_lab_up_is_removed_by_lab_down_all() {
    let name = "ovs-vlan-xhost";
    let up = Command::new(BIN)
        .args(["lab", "up", "ovs-vlan", "--placement", "cross-host"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running profiler lab up");
    let started = Path::new("/run/profiler/ovs").join(format!("{name}-host-a/ovs-vswitchd.pid"));
    wait_for("ovs-vswitchd", Duration::from_secs(180), || {
        started.exists()
    });
    sigkill(up.id());
    let _ = up.wait_with_output();
    let said = down_all();
    assert!(said.contains("OVS daemons and directory"), "{said}");
    crate::labs::assert_nothing_left(name);
    assert_clean_of(name);
}

/// Two namespaces the profiler did not make, joined by a veth pair.
struct Pair;

impl Pair {
    // Not prof-*: `lab down --all` removes those namespaces as the labs' leftovers.
    const A: &'static str = "vmtc-a";
    const B: &'static str = "vmtc-b";

    fn new() -> Pair {
        let pair = Pair;
        ip(&["netns", "add", Self::A]);
        ip(&["netns", "add", Self::B]);
        ip(&[
            "-n",
            Self::A,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            Self::B,
        ]);
        for (ns, addr) in [(Self::A, "198.18.230.1/24"), (Self::B, "198.18.230.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// `tc qdisc show` and `tc filter show` of both ends.
    fn tc_state(&self) -> String {
        let mut all = String::new();
        for ns in [Self::A, Self::B] {
            for what in [
                &["qdisc", "show", "dev", "eth0"][..],
                &["filter", "show", "dev", "eth0", "ingress"],
                &["filter", "show", "dev", "eth0", "egress"],
            ] {
                let out = Command::new("ip")
                    .args(["netns", "exec", ns, "tc"])
                    .args(what)
                    .output()
                    .expect("running tc");
                all += &String::from_utf8_lossy(&out.stdout);
            }
        }
        all
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [Self::A, Self::B] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// Where process `pid` records the devices of its `user` (kernel/tc.rs).
fn record_of(pid: u32, user: &str) -> std::path::PathBuf {
    Path::new(profiler::kernel::tc::TC_DIR).join(format!("{pid}-{user}.json"))
}

/// `profiler delay` at B's eth0 ingress, `us` long, until killed.
fn delay_at_b(us: u32) -> std::process::Child {
    Command::new(BIN)
        .args([
            "delay",
            "--netns",
            Pair::B,
            "--iface",
            "eth0",
            "--direction",
            "ingress",
        ])
        .args(["--delay-us", &us.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running profiler delay")
}

/// The shortest of `count` ping round trips from A to B, in ms.
fn min_rtt_ms(count: u32) -> f64 {
    let out = Command::new("ip")
        .args(["netns", "exec", Pair::A, "ping", "-q", "-i", "0.2", "-c"])
        .args([&count.to_string(), "198.18.230.2"])
        .output()
        .expect("running ping");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping: {text}");
    // rtt min/avg/max/mdev = 0.050/0.060/0.070/0.010 ms
    let stats = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .unwrap_or_else(|| panic!("{text}"));
    let values = stats.split('=').nth(1).unwrap_or_else(|| panic!("{text}"));
    values
        .trim()
        .split('/')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{text}"))
}

/// Before tcx (6.1), `profiler delay` hangs its filter off a clsact qdisc with the first
/// priority, before any of the profile's: every ping is held at B's ingress. Ended by SIGTERM it
/// leaves nothing; killed, its filter and qdisc stay until `lab down --all` removes them.
#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn a_delay_before_tcx_holds_first_and_a_killed_one_is_removed_by_lab_down_all() {
    const HOLD_US: u32 = 5_000;
    if has_tcx() {
        println!("this kernel has tcx: the delay's link dies with it (tests/ground_truth.rs)");
        return;
    }
    let pair = Pair::new();
    let base = min_rtt_ms(5);
    for kill in [false, true] {
        let delay = delay_at_b(HOLD_US);
        let recorded = record_of(delay.id(), profiler::kernel::tc::DELAY);
        wait_for("the delay's record", Duration::from_secs(180), || {
            recorded.exists()
        });
        wait_for("the delay's filter", Duration::from_secs(180), || {
            pair.tc_state().contains("tc_delay")
        });
        let state = pair.tc_state();
        assert!(state.contains("pref 1 bpf"), "the first priority: {state}");
        let held = min_rtt_ms(5);
        println!("min round trip {base:.3} ms, {held:.3} ms with {HOLD_US} us at B's ingress");
        let hold_ms = f64::from(HOLD_US) / 1000.0;
        assert!(
            held >= base + hold_ms * 0.9,
            "{held} ms held, {base} ms without"
        );
        let pid = nix::unistd::Pid::from_raw(delay.id() as i32);
        if kill {
            sigkill(delay.id());
            let _ = delay.wait_with_output();
            let left = pair.tc_state();
            assert!(
                left.contains("clsact") && left.contains("tc_delay"),
                "SIGKILL leaves it: {left}"
            );
            let said = down_all();
            assert!(said.contains("tc filters on eth0 in vmtc-b"), "{said}");
        } else {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
                .expect("SIGTERM to our child");
            let out = delay.wait_with_output().expect("profiler delay ends");
            assert!(out.status.success(), "{out:?}");
        }
        let after = pair.tc_state();
        assert!(
            !after.contains("clsact") && !after.contains("tc_"),
            "killed: {kill}: {after}"
        );
        assert!(!recorded.exists(), "killed: {kill}");
    }
    drop(pair);
    assert_clean_of("");
}

fn has_tcx() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 6)
}

/// Before tcx, a run on a path it did not make leaves no filter and no clsact qdisc when it ends;
/// after SIGKILL it leaves both, and `lab down --all` removes them.
#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn tc_filters_of_a_killed_run_are_removed_by_lab_down_all() {
    let pair = Pair::new();
    let to = format!("{}:198.18.230.2", Pair::B);
    let args = [
        "run",
        "--from",
        Pair::A,
        "--to",
        &to,
        "--hooks",
        "stable",
        "--quiet",
    ];
    let clean = Command::new(BIN)
        .args(args)
        .args(["--count", "10"])
        .output()
        .expect("running the profiler");
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    let after = pair.tc_state();
    assert!(
        !after.contains("clsact") && !after.contains("tc_"),
        "after a clean exit: {after}"
    );

    let run = Command::new(BIN)
        .args(args)
        .args(["--count", "100000", "--rate", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running the profiler");
    let recorded = record_of(run.id(), profiler::kernel::tc::HOPS);
    if has_tcx() {
        println!("this kernel has tcx: its links die with the process, nothing is recorded");
        // Long enough under TCG for the programs to be attached and traffic to flow.
        std::thread::sleep(Duration::from_secs(40));
        sigkill(run.id());
        let _ = run.wait_with_output();
        assert!(!recorded.exists());
        let left = pair.tc_state();
        assert!(!left.contains("tc_"), "tcx: {left}");
        return;
    }
    wait_for("the run's tc record", Duration::from_secs(180), || {
        recorded.exists()
    });
    // The record appears with the first device; under TCG the rest take a while.
    wait_for("the filters on both ends", Duration::from_secs(180), || {
        pair.tc_state().matches("tc_ingress").count() >= 2
    });
    sigkill(run.id());
    let _ = run.wait_with_output();
    let left = pair.tc_state();
    assert!(
        left.contains("clsact") && left.contains("tc_ingress"),
        "SIGKILL leaves the filters: {left}"
    );
    let said = down_all();
    assert!(said.contains("tc filters on eth0"), "{said}");
    let after = pair.tc_state();
    assert!(
        !after.contains("clsact") && !after.contains("tc_"),
        "after lab down --all: {after}"
    );
    assert!(!recorded.exists());
    drop(pair);
    assert_clean_of("");
}
