//! Recovery after anything: a run killed with SIGKILL, a `lab up` killed midway, a compare
//! interrupted, and runs that cannot break each other (one lab, one run at a time; runs on
//! different labs at once). Real labs and real eBPF, as root.
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{assert_clean_of, profiler, BIN};

/// `profiler ARGS` in the background, its output collected.
fn spawn(args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the profiler")
}

fn state(lab: &str) -> std::path::PathBuf {
    Path::new(profiler::lab::STATE_DIR).join(format!("{lab}.json"))
}

/// Waits until `what` holds, or fails naming it.
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig)
        .expect("signalling our own child");
}

fn stderr_of(child: Child) -> (std::process::ExitStatus, String) {
    let out = child.wait_with_output().expect("waiting for the profiler");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A run on lab `lab` that lasts a while (paced), killed with SIGKILL once traffic flows.
fn kill_a_run(lab: &str) -> u32 {
    let child = spawn(&[
        "run", "--lab", lab, "--count", "100000", "--rate", "200", "--quiet",
    ]);
    let pid = child.id();
    wait_for("the run's lab", Duration::from_secs(60), || {
        state(lab).exists()
    });
    std::thread::sleep(Duration::from_secs(2));
    signal(&child, nix::sys::signal::Signal::SIGKILL);
    let (status, _) = stderr_of(child);
    assert!(!status.success(), "the run was killed");
    pid
}

/// Devices named like a lab's temporary ones ("pf<pid>x<n>") in this namespace.
fn temporary_devices() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| profiler::lab::recover::temp_device_pid(n).is_some())
        .collect()
}

#[test]
fn a_killed_run_leaves_a_lab_that_lab_down_all_removes() {
    let pid = kill_a_run("veth");
    let list = profiler(&["lab", "list"]);
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains(&format!("LEFT BEHIND by profiler run (pid {pid}")),
        "lab list should say the lab was left behind: {listed}"
    );
    let down = profiler(&["lab", "down", "--all"]);
    let said = String::from_utf8_lossy(&down.stdout);
    assert!(
        down.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(said.contains("removed lab veth"), "{said}");
    assert_clean_of("veth");
    // Nothing is left for a second pass.
    let again = profiler(&["lab", "down", "--all"]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing of the profiler's was left"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
}

#[test]
fn the_next_run_removes_a_lab_a_killed_run_left() {
    let pid = kill_a_run("veth");
    let out = profiler(&["run", "--lab", "veth", "--count", "50", "--quiet"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "lab veth was made by profiler run (pid {pid}), which ended without removing it"
        )),
        "the run should say it removed the abandoned lab: {err}"
    );
    assert_clean_of("veth");
}

#[test]
fn a_killed_lab_up_leaves_parts_that_lab_down_all_removes() {
    // Killed at several points of the build: whatever exists then must go.
    for after_ms in [30, 120, 400] {
        let child = spawn(&["lab", "up", "flannel-vxlan", "--placement", "cross-host"]);
        std::thread::sleep(Duration::from_millis(after_ms));
        signal(&child, nix::sys::signal::Signal::SIGKILL);
        let _ = stderr_of(child);
        let down = profiler(&["lab", "down", "--all"]);
        assert!(
            down.status.success(),
            "after {after_ms} ms: {}{}",
            String::from_utf8_lossy(&down.stdout),
            String::from_utf8_lossy(&down.stderr)
        );
        assert_clean_of("flannel-vxlan-xhost");
        let temp = temporary_devices();
        assert!(
            temp.is_empty(),
            "after {after_ms} ms, temporary devices left: {temp:?}"
        );
    }
}

#[test]
fn a_second_run_on_a_lab_in_use_is_refused_and_the_first_is_unharmed() {
    let first = spawn(&[
        "run", "--lab", "bridge", "--count", "1500", "--rate", "300", "--quiet",
    ]);
    wait_for("the first run's lab", Duration::from_secs(60), || {
        state("bridge").exists()
    });
    let second = profiler(&["run", "--lab", "bridge", "--count", "10", "--quiet"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(
        second.status.code(),
        Some(profiler::cli::exit::BUSY.into()),
        "the second run must not share the lab, and says it is busy: {err}"
    );
    assert!(
        err.contains(&format!("lab bridge is in use by pid {}", first.id())),
        "the refusal names the first run: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let down = profiler(&["lab", "down", "bridge"]);
    assert!(
        !down.status.success(),
        "lab down must not take the lab from under a run"
    );
    let (status, err) = stderr_of(first);
    assert!(status.success(), "the first run: {err}");
    assert_clean_of("bridge");
}

#[test]
fn runs_on_different_labs_at_once_both_complete() {
    let a = spawn(&[
        "run", "--lab", "veth", "--count", "800", "--json", "-", "--quiet",
    ]);
    let b = spawn(&[
        "run", "--lab", "bridge", "--count", "800", "--json", "-", "--quiet",
    ]);
    for (name, child) in [("veth", a), ("bridge", b)] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        common::assert_complete(&common::run_report_of(&out.stdout), 800, name);
    }
    assert_clean_of("");
}

#[test]
fn an_interrupted_compare_removes_the_lab_it_made() {
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        let child = spawn(&[
            "compare",
            "--lab",
            "host,bridge",
            "--sizes",
            "64",
            "--count",
            "100000",
            "--rate",
            "200",
            "--quiet",
        ]);
        wait_for("compare's first lab", Duration::from_secs(60), || {
            state("host-xhost").exists()
        });
        std::thread::sleep(Duration::from_secs(1));
        signal(&child, sig);
        let (status, err) = stderr_of(child);
        assert!(
            !status.success(),
            "{sig}: an interrupted compare reports no comparison"
        );
        assert!(
            err.contains(&format!("interrupted by {sig}")),
            "{sig}: {err}"
        );
        assert_clean_of("host-xhost");
    }
}
