//! Bad input is refused in one line, with a non-zero exit, before any work: no lab comes up,
//! nothing is attached. Run as root, so that privileges are not what refuses it.
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

mod common;

use common::{assert_clean, ip, profiler};
use profiler::cli::exit;

/// `profiler ARGS` must fail as bad input (exit status 2) in one line containing `want`, and
/// leave nothing behind.
fn refused(args: &[&str], want: &str) {
    refused_as(args, want, exit::BAD_INPUT);
}

/// `profiler ARGS` must fail with exit status `status`, in one line containing `want`.
fn refused_as(args: &[&str], want: &str, status: u8) {
    let out = profiler(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(status.into()), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: one line, got {err}"
    );
    assert!(
        out.stdout.is_empty(),
        "{args:?} printed {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn out_of_range_values_are_refused() {
    refused(&["run", "--port", "0"], "--port");
    refused(&["run", "--mtu", "100"], "--mtu");
    refused(&["run", "--mtu", "100000"], "--mtu");
    refused(&["run", "--timeout", "1e20"], "out of range");
    refused(&["run", "--timeout", "soon"], "is not a duration");
    refused(&["run", "--rate", "1e-20"], "out of range");
    refused(&["run", "--rate", "NaN"], "out of range");
    refused(&["run", "--size", "8"], "--size");
    refused(&["run", "--count", "0"], "--count");
    refused(
        &["attach", "--netns", "x", "--duration", "1e20"],
        "out of range",
    );
    refused(&["attach", "--netns", "x", "--duration=-1"], "--duration");
    refused(&["compare", "--timeout", "0"], "out of range");
    assert_clean();
}

#[test]
fn malformed_and_conflicting_paths_are_refused() {
    // Without an address, --to names a pod (and --from too).
    refused(&["run", "--from", "a", "--to", "b"], "unknown pod a");
    refused(
        &["run", "--from", "a", "--to", ":198.18.0.1"],
        "--to takes NETNS:IP",
    );
    refused(
        &["run", "--from", "a", "--to", "b:300.1.1.1"],
        "is not an IPv4 address",
    );
    refused(&["run", "--to", "b:198.18.0.1"], "--from");
    for flag in [
        ["--placement", "cross-host"],
        ["--mtu", "1400"],
        ["--keep-lab", ""],
    ] {
        let mut args = vec!["run", "--from", "a", "--to", "b:198.18.0.1"];
        args.extend(flag.iter().filter(|f| !f.is_empty()));
        refused(&args, "cannot be used with");
    }
    refused(
        &["run", "--from", "no-such-ns", "--to", "b:198.18.0.1"],
        "unknown network namespace",
    );
    let otlp = ["attach", "--netns", "x", "--otlp"];
    refused(&[&otlp[..], &["collector:4317"]].concat(), "is not an http");
    refused(
        &[&otlp[..], &["http://127.0.0.1:4317"]].concat(),
        "add --mode events",
    );
    refused(
        &[&otlp[..], &["http://127.0.0.1:4317", "--mode", "events"]].concat(),
        "add --peer",
    );
    assert_clean();
}

#[test]
fn a_placement_the_topology_does_not_have_is_refused_before_the_lab() {
    let cannot = exit::CANNOT_BUILD;
    refused_as(
        &["run", "--lab", "flannel-vxlan", "--placement", "same-host"],
        "cross-host",
        cannot,
    );
    refused_as(
        &["run", "--lab", "veth", "--placement", "cross-host"],
        "same-host",
        cannot,
    );
    refused_as(
        &["lab", "up", "host", "--placement", "same-host"],
        "cross-host",
        cannot,
    );
    assert_clean();
}

#[test]
fn a_report_file_that_cannot_be_written_is_refused_before_the_lab() {
    refused(
        &["run", "--json", "/nonexistent-dir/run.json"],
        "does not exist",
    );
    refused(
        &["compare", "--json", "/nonexistent-dir/c.json"],
        "does not exist",
    );
    refused(
        &[
            "attach",
            "--netns",
            "x",
            "--json",
            "/nonexistent-dir/a.json",
        ],
        "does not exist",
    );
    assert_clean();
}

#[test]
fn a_topology_with_one_placement_uses_it_without_being_told() {
    // host has only cross-host: no --placement needed.
    let out = profiler(&["run", "--lab", "host", "--count", "20", "--quiet"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("on host-xhost"));
    assert_clean();
}

/// Two namespaces built with plain `ip`, each with a veth pair of its own and an address, not
/// joined: the client's requests find no one. Removed on drop.
struct Islands;

impl Islands {
    const A: &'static str = "prof-cli-a";
    const B: &'static str = "prof-cli-b";

    fn new() -> Islands {
        let guard = Islands;
        for (ns, addr) in [(Self::A, "198.18.250.2/24"), (Self::B, "198.18.250.1/24")] {
            ip(&["netns", "add", ns]);
            ip(&[
                "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
            ]);
            ip(&["-n", ns, "addr", "add", addr, "dev", "v0"]);
            ip(&["-n", ns, "link", "set", "v0", "up"]);
            ip(&["-n", ns, "link", "set", "v1", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        guard
    }
}

impl Drop for Islands {
    fn drop(&mut self) {
        for ns in [Self::A, Self::B] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", ns])
                .status();
        }
    }
}

/// A hook the user asked for that cannot attach here fails the run with its own status
/// (`kernel::MissingHook`), in one line, before any traffic, and leaves nothing attached.
#[test]
fn a_uprobe_that_cannot_attach_fails_as_a_missing_hook() {
    let islands = Islands::new();
    let to = format!("{}:198.18.250.1", Islands::B);
    refused_as(
        &[
            "run",
            "--from",
            Islands::A,
            "--to",
            &to,
            "--count",
            "1",
            "--quiet",
            // The stable hooks: a kernel without kprobes would add a note about deep ones.
            "--hooks",
            "stable",
            "--uprobe",
            "/bin/true:profiler_no_such_symbol",
        ],
        "cannot attach --uprobe /bin/true:profiler_no_such_symbol",
        exit::MISSING_HOOK,
    );
    drop(islands);
    assert_clean();
}

#[test]
fn a_run_in_which_no_exchange_completed_fails() {
    let islands = Islands::new();
    let out = profiler(&[
        "run",
        "--from",
        Islands::A,
        "--to",
        &format!("{}:198.18.250.1", Islands::B),
        "--count",
        "3",
        "--timeout",
        "100ms",
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a run with nothing completed must fail: {err}"
    );
    assert!(err.contains("no exchange completed"), "{err}");
    drop(islands);
    assert_clean();
}

/// A comparison whose every type but the baseline was skipped compared nothing: it says so and
/// fails. vlan needs 8021q, which this machine's kernel lacks.
#[test]
fn a_compare_that_skipped_every_type_fails() {
    let out = profiler(&[
        "compare",
        "--lab",
        "host,vlan",
        "--sizes",
        "64",
        "--count",
        "20",
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("skipping vlan") {
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("every type but the baseline was skipped"),
            "{err}"
        );
    } else {
        common::skip::skip(
            "this kernel can build the vlan lab, so compare did not skip it",
            Some(common::skip::Absence::Has8021q),
        );
    }
    assert_clean();
}

/// Progress is a bar on a terminal, and nothing when stderr is not one or with --quiet.
#[test]
fn progress_shows_on_a_terminal_only() {
    let bin = common::BIN;
    let run = format!("{bin} run --lab veth --count 3000 --rate 1000");
    // `script` gives the command a pseudo-terminal and copies what it printed.
    let on_terminal = std::process::Command::new("script")
        .args(["-qec", &run, "/dev/null"])
        .output()
        .expect("running script (util-linux)");
    let shown = String::from_utf8_lossy(&on_terminal.stdout);
    assert!(on_terminal.status.success(), "{shown}");
    assert!(
        shown.contains("/3000 exchanges"),
        "no progress bar on a terminal: {shown}"
    );
    let quiet = std::process::Command::new("script")
        .args(["-qec", &format!("{run} --quiet"), "/dev/null"])
        .output()
        .expect("running script (util-linux)");
    let shown = String::from_utf8_lossy(&quiet.stdout);
    assert!(
        !shown.contains("exchanges ("),
        "a bar despite --quiet: {shown}"
    );
    let piped = profiler(&["run", "--lab", "veth", "--count", "300"]);
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(!err.contains("exchanges ("), "a bar on a pipe: {err}");
    assert_clean();
}
