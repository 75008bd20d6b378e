//! `cargo xtask test`: all tests in release mode, one at a time, as root, then a leak check.
use crate::cmd::{self, step};
use crate::setup;
use crate::vm;
use anyhow::{anyhow, bail, Result};
use clap::ValueEnum as _;
use std::process::Command;

/// Name prefixes of the project's eBPF programs (as the kernel truncates them, 15 chars).
const PROG_PREFIXES: [&str; 8] = ["tp_", "raw_", "ftp_", "fraw_", "kp_", "fkp_", "tc_", "prof"];
/// Prefix of the network namespaces the labs and tests create.
const NETNS_PREFIX: &str = "prof-";

pub fn run(args: &[String]) -> Result<()> {
    cmd::require_root("test", "runs eBPF and network-namespace tests")?;
    let vm_kernels = vm_kernels()?;
    setup::run()?;
    step("leak check before the tests");
    leak_check("before the tests (left by an earlier run, or in use by a running profiler): remove them first")?;

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
        // Every test target, no doc-tests: the crates have none, and an empty doc-test run
        // would be the last thing cargo prints.
        "--tests",
    ])
    .args(cargo_args)
    .args(["--", "--test-threads=1"])
    .args(harness_args);
    step(cmd::describe(&test));
    let tests = cmd::run(&mut test);

    // Check for leaks even when tests failed: a failing test is the likeliest to leak.
    step("leak check after the tests");
    let leaks = leak_check("left behind by the tests");

    // The tests that need a stock kernel (kprobes, fentry, the openvswitch datapath, ...),
    // in one guest per kernel; they run even when host tests failed, to report everything.
    let vm_tests = if vm_kernels.is_empty() {
        println!("VM tests: skipped (PROFILER_VM_KERNELS is empty)");
        Ok(())
    } else {
        vm::test_kernels(&vm_kernels, harness_args)
    };
    tests.and(leaks).and(vm_tests)
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

fn leak_check(whose: &str) -> Result<()> {
    let mut leaks = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(NETNS_PREFIX) {
                leaks.push(format!("network namespace {name} (ip netns delete {name})"));
            }
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
    if leaks.is_empty() {
        println!("no leftover network namespaces or BPF programs");
        return Ok(());
    }
    for leak in &leaks {
        eprintln!("leak: {leak}");
    }
    bail!(
        "{} leftover network namespace(s) or BPF program(s) {whose}",
        leaks.len()
    )
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
    fn finds_names_in_bpftool_json() {
        let json = r#"[{"id":7,"type":"tracepoint","name":"tp_net_dev_xmit","tag":"ab"},
                       {"id":9,"type":"sched_cls", "name" : "tc_ingress","pids":[{"pid":1,"comm":"x"}]}]"#;
        assert_eq!(
            json_strings(json, "name"),
            ["tp_net_dev_xmit", "tc_ingress"]
        );
        assert!(json_strings("[]", "name").is_empty());
    }
}
