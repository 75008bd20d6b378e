//! `cargo xtask test`: all tests in release mode, one at a time, as root, then a leak check.
use crate::cmd::{self, step};
use crate::setup;
use crate::vm;
use anyhow::{anyhow, bail, Result};
use clap::ValueEnum as _;
use std::process::Command;

/// Name prefixes of the project's eBPF programs (as the kernel truncates them, 15 chars).
const PROG_PREFIXES: [&str; 16] = [
    "tp_", "raw_", "ftp_", "fraw_", "dtp_", "draw_", "kp_", "fkp_", "dkp_", "tc_", "ftc_", "prof",
    "floor_", "up_", "nf_", "fnf_",
];
/// The --file-prefix of the dpdk lab's testpmd (profiler's lab/dpdk.rs): its command line
/// and its DPDK runtime directory carry it.
const DPDK_PREFIX: &str = "--file-prefix=profiler-";
const DPDK_RUNTIME: &str = "/var/run/dpdk";
/// The node lab's (profiler's lab/node.rs): its containerd's directories, whose socket its
/// containerd and shims name in their command lines; its CNI network's cache and address
/// files; its pods' cgroup; its bridge and macvlan parent (a veth pair).
const NODE_DIR: &str = "/run/profiler/node/";
const NODE_NETWORK: &str = "prof-node";
const NODE_CGROUP: &str = "prof-node-pods";
const NODE_DEVICES: [&str; 3] = ["prof-cni0", "prof-node-mv0", "prof-node-mv1"];
/// Prefix of the network namespaces the labs and tests create.
const NETNS_PREFIX: &str = "prof-";
/// What the profiler keeps under /run/profiler while a lab is up or a command uses one: lab
/// state files, OVS daemons' and testpmd's directories, lock files, tc filters recorded
/// before tcx.
const RUN_DIRS: [&str; 7] = [
    "/run/profiler/vm",
    "/run/profiler/node",
    "/run/profiler/labs",
    "/run/profiler/ovs",
    "/run/profiler/dpdk",
    "/run/profiler/locks",
    "/run/profiler/tc",
];

pub fn run(args: &[String]) -> Result<()> {
    cmd::require_root("test", "runs eBPF and network-namespace tests")?;
    let vm_kernels = vm_kernels()?;
    let vm_suite = vm::Suite::from_env()?;
    setup::run()?;
    setup::test_packages()?;
    // The nested labs' tests (tests/nested.rs) boot guests on this kernel.
    vm::provision(vm::Series::V6_1)?;
    lint()?;
    step("leak check before the tests");
    clean_start()?;

    // `cargo xtask test -- CARGO_ARGS -- HARNESS_ARGS`
    let (cargo_args, harness_args) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let mut test = Command::new("cargo");
    test.args([
        "test",
        "--workspace",
        "--exclude",
        "profiler-ebpf",
        "--release",
        // Every target runs even when one fails, so one run reports every failure.
        "--no-fail-fast",
    ]);
    // Every test target, no doc-tests (the crates have none, and an empty doc-test run would be
    // the last thing cargo prints), unless the caller picked targets (`-- --test cli`).
    if !picks_targets(cargo_args) {
        test.arg("--tests");
    }
    test.args(cargo_args)
        .args(["--", "--test-threads=1"])
        .args(harness_args);
    // Where the tests record what they skipped (tests/common/skip.rs), listed at the end.
    let skips = crate::target_dir().join("skipped-tests.tsv");
    let _ = std::fs::remove_file(&skips);
    test.env("PROFILER_SKIPS", &skips);
    step(cmd::describe(&test));
    let tests = cmd::run(&mut test);

    // Check for leaks even when tests failed: a failing test is the likeliest to leak.
    step("leak check after the tests");
    let leaks = leak_check("left behind by the tests");

    // The tests that need a stock kernel (kprobes, fentry, the openvswitch datapath, ...),
    // in one guest per kernel; they run even when host tests failed, to report everything.
    let vm_picked = cargo_args.windows(2).any(|w| w == ["--test", "vm"])
        || cargo_args.iter().any(|a| a == "--test=vm");
    let vm_tests = if vm_kernels.is_empty() {
        println!("VM tests: skipped (PROFILER_VM_KERNELS is empty)");
        Ok(())
    } else if picks_targets(cargo_args) && !vm_picked {
        println!("VM tests: not asked for (the targets picked: {cargo_args:?})");
        Ok(())
    } else {
        vm::test_kernels(&vm_kernels, vm_suite, harness_args)
            .and_then(|()| leak_check("left behind by the VM tests (QEMU)"))
    };
    list_skips(&skips);
    tests.and(leaks).and(vm_tests)
}

/// The host tests that did not run, and why: a skip passes in libtest's count, so it is said
/// here, last, where it cannot be missed.
fn list_skips(file: &std::path::Path) {
    let lines = std::fs::read_to_string(file).unwrap_or_default();
    let skipped: Vec<Vec<&str>> = lines.lines().map(|l| l.splitn(3, '\t').collect()).collect();
    if skipped.is_empty() {
        println!("skipped: no host test");
        return;
    }
    println!(
        "skipped: {} host test{} (passed in the counts above, not run):",
        skipped.len(),
        if skipped.len() == 1 { "" } else { "s" }
    );
    for s in skipped {
        println!(
            "  {} ({}): {}",
            s[0],
            s.get(1).unwrap_or(&"?"),
            s.get(2).unwrap_or(&"?")
        );
    }
}

/// Clippy on every target, warnings as errors: the workspace lints (unused_crate_dependencies
/// among them) stay clean. The eBPF crate is linted as aya-build compiles it.
fn lint() -> Result<()> {
    let mut clippy = Command::new("cargo");
    clippy.args([
        "clippy",
        "--workspace",
        "--exclude",
        "profiler-ebpf",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    step(cmd::describe(&clippy));
    cmd::run(&mut clippy)
}

/// The kernels for the VM tests: $PROFILER_VM_KERNELS (series separated by spaces, empty for
/// none), else 6.1 alone, which keeps CI short.
fn vm_kernels() -> Result<Vec<vm::Series>> {
    let Ok(list) = std::env::var("PROFILER_VM_KERNELS") else {
        return Ok(vec![vm::Series::V6_1]);
    };
    list.split_whitespace()
        .map(|s| {
            vm::Series::from_str(s, false).map_err(|_| {
                anyhow!("PROFILER_VM_KERNELS: no kernel series {s:?} (known: 6.1, 6.12)")
            })
        })
        .collect()
}

/// Starts from a clean machine. Leftovers of a run that no longer runs (a SIGKILL cannot be
/// cleaned up after) are removed the documented way, `profiler lab down --all`, and the
/// check is made again; leftovers a running profiler may be using stop the tests.
fn clean_start() -> Result<()> {
    let found = leaks()?;
    if found.is_empty() {
        nothing_left();
        return Ok(());
    }
    for leak in &found {
        eprintln!("leftover: {leak}");
    }
    let running = running_profilers();
    if !running.is_empty() {
        bail!(
            "{} leftover(s) before the tests, and the profiler runs as pid(s) {}: they may be its; \
             remove them once it ends (profiler lab down --all)",
            found.len(),
            running.join(", ")
        );
    }
    println!(
        "no profiler runs: these are a dead run's; removing them with `profiler lab down --all`"
    );
    let profiler = crate::build()?;
    cmd::run(Command::new(profiler).args(["lab", "down", "--all"]))?;
    leak_check("before the tests, still there after `profiler lab down --all`: remove them first")
}

/// Whether cargo's arguments pick test targets themselves (`--test NAME`, `--lib`, ...).
fn picks_targets(cargo_args: &[String]) -> bool {
    const PICKS: [&str; 4] = ["--test", "--lib", "--bins", "--bin"];
    cargo_args.iter().any(|a| {
        PICKS
            .iter()
            .any(|p| a == p || a.starts_with(&format!("{p}=")))
    })
}

/// The pids of running profilers and test binaries (of any clone), but this process's.
fn running_profilers() -> Vec<String> {
    let me = std::process::id();
    processes()
        .into_iter()
        .filter(|(pid, name)| {
            let exe = cmdline(*pid).into_iter().next().unwrap_or_default();
            *pid != me && (name == "profiler" || exe.contains("/target/release/deps/"))
        })
        .map(|(pid, name)| format!("{pid} ({name})"))
        .collect()
}

fn leak_check(whose: &str) -> Result<()> {
    let leaks = leaks()?;
    if leaks.is_empty() {
        nothing_left();
        return Ok(());
    }
    for leak in &leaks {
        eprintln!("leak: {leak}");
    }
    bail!("{} leftover(s) {whose}", leaks.len())
}

fn nothing_left() {
    println!("nothing left: no lab namespaces, state, OVS daemons, testpmd, node lab containerd or CNI files, lock files, BPF programs, temporary devices, clsact qdiscs or QEMU processes");
}

/// Everything the project could have left on this machine, each with how to remove it.
fn leaks() -> Result<Vec<String>> {
    let mut leaks = Vec::new();
    for name in entries("/run/netns") {
        if name.starts_with(NETNS_PREFIX) {
            leaks.push(format!("network namespace {name} (ip netns delete {name})"));
        }
    }
    for dir in RUN_DIRS {
        for name in entries(dir) {
            leaks.push(format!("{dir}/{name} (profiler lab down --all)"));
        }
    }
    let progs = cmd::output(Command::new("bpftool").args(["prog", "show", "-j"]))?;
    for name in json_strings(&progs, "name") {
        if PROG_PREFIXES.iter().any(|p| name.starts_with(p)) {
            leaks.push(format!(
                "BPF program {name} (bpftool prog show name {name})"
            ));
        }
    }
    let links = cmd::output(Command::new("ip").args(["-o", "link", "show"]))?;
    for name in temporary_devices(&links) {
        leaks.push(format!(
            "temporary device {name} in the root namespace (profiler lab down --all)"
        ));
    }
    let qdiscs = cmd::output(Command::new("tc").args(["qdisc", "show"]))?;
    for line in qdiscs.lines().filter(|l| l.starts_with("qdisc clsact")) {
        leaks.push(format!(
            "{line} in the root namespace (tc qdisc del dev DEV clsact)"
        ));
    }
    for (pid, name) in processes() {
        if name.starts_with("qemu-system")
            || name.starts_with("ovs-vswitchd")
            || name.starts_with("ovsdb-server")
        {
            leaks.push(format!("process {pid} ({name})"));
        }
        if name.starts_with("dpdk-testpmd")
            && cmdline(pid).iter().any(|a| a.starts_with(DPDK_PREFIX))
        {
            leaks.push(format!(
                "process {pid} ({name}, the dpdk lab's; profiler lab down --all)"
            ));
        }
    }
    leaks.extend(node_leaks(&links));
    for name in entries(DPDK_RUNTIME) {
        if name.starts_with(&DPDK_PREFIX["--file-prefix=".len()..]) {
            leaks.push(format!("DPDK runtime directory {DPDK_RUNTIME}/{name}"));
        }
    }
    Ok(leaks)
}

/// What the node lab could leave: its containerd and shims, CNI cache and address files, devices.
fn node_leaks(ip_o_link: &str) -> Vec<String> {
    let mut leaks = Vec::new();
    for (pid, name) in processes() {
        if cmdline(pid).iter().any(|a| a.contains(NODE_DIR)) {
            leaks.push(format!(
                "process {pid} ({name}, the node lab's; profiler lab down --all)"
            ));
        }
    }
    for name in entries("/var/lib/cni/results") {
        if name.starts_with(&format!("{NODE_NETWORK}-")) {
            leaks.push(format!("CNI cache file /var/lib/cni/results/{name}"));
        }
    }
    if std::path::Path::new("/var/lib/cni/networks")
        .join(NODE_NETWORK)
        .exists()
    {
        leaks.push(format!(
            "CNI addresses /var/lib/cni/networks/{NODE_NETWORK}"
        ));
    }
    for hierarchy in entries("/sys/fs/cgroup") {
        let cgroup = format!("/sys/fs/cgroup/{hierarchy}/{NODE_CGROUP}");
        if std::path::Path::new(&cgroup).exists() {
            leaks.push(format!("cgroup {cgroup}, the node lab's pods'"));
        }
    }
    let devices = ip_o_link
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name));
    for name in devices.filter(|n| NODE_DEVICES.contains(n)) {
        leaks.push(format!(
            "device {name}, the node lab's (profiler lab down --all)"
        ));
    }
    leaks
}

/// The names in `dir` (none if it does not exist).
fn entries(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The labs' temporary devices ("pf<pid>x<n>", see profiler's lab/setup.rs) in `ip -o link`.
fn temporary_devices(ip_o_link: &str) -> Vec<String> {
    ip_o_link
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name))
        .filter(|name| {
            name.strip_prefix("pf")
                .and_then(|rest| rest.split_once('x'))
                .is_some_and(|(pid, n)| {
                    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
                    digits(pid) && digits(n)
                })
        })
        .map(str::to_string)
        .collect()
}

/// Every process: pid and command name.
fn processes() -> Vec<(u32, String)> {
    entries("/proc")
        .into_iter()
        .filter_map(|pid| {
            let pid: u32 = pid.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            Some((pid, comm.trim().to_string()))
        })
        .collect()
}

/// The arguments of process `pid` (none if it is gone).
fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The string values of every `"key": "..."` in a JSON text (enough for bpftool's output,
/// without a JSON dependency).
fn json_strings<'a>(json: &'a str, key: &str) -> Vec<&'a str> {
    let needle = format!("\"{key}\"");
    let mut found = Vec::new();
    let mut rest = json;
    while let Some(i) = rest.find(&needle) {
        rest = rest[i + needle.len()..].trim_start();
        let Some(after_colon) = rest.strip_prefix(':') else {
            continue;
        };
        let Some(value) = after_colon.trim_start().strip_prefix('"') else {
            continue;
        };
        // Program names are plain identifiers; stop at the first quote.
        if let Some(end) = value.find('"') {
            found.push(&value[..end]);
            rest = &value[end + 1..];
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::json_strings;

    #[test]
    fn finds_temporary_devices_in_ip_link_output() {
        let out = "1: lo: <LOOPBACK,UP> mtu 65536 qdisc noqueue\n\
                   7: pf123x0@pf123x1: <BROADCAST> mtu 1500\n\
                   9: pfx: <BROADCAST> mtu 1500\n\
                   10: eth0: <UP> mtu 1500\n";
        assert_eq!(super::temporary_devices(out), ["pf123x0"]);
    }

    #[test]
    fn finds_names_in_bpftool_json() {
        let json = r#"[{"id":7,"type":"tracepoint","name":"tp_net_dev_xmit","tag":"ab"},
                       {"id":9,"type":"sched_cls", "name" : "tc_ingress","pids":[{"pid":1,"comm":"x"}]}]"#;
        assert_eq!(
            json_strings(json, "name"),
            ["tp_net_dev_xmit", "tc_ingress"]
        );
        assert!(json_strings("[]", "name").is_empty());
    }

    #[test]
    fn a_test_target_named_is_run_alone() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(super::picks_targets(&args(&["--test", "cli"])));
        assert!(super::picks_targets(&args(&["--test=cli"])));
        assert!(super::picks_targets(&args(&["-p", "profiler", "--lib"])));
        assert!(!super::picks_targets(&args(&[])));
        assert!(!super::picks_targets(&args(&[
            "-p", "profiler", "--no-run"
        ])));
    }
}
