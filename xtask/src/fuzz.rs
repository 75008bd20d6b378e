//! `cargo xtask fuzz [--cases N] [-- HARNESS_ARGS]`: the property tests (`prop_*`: the eBPF
//! packet parser in tests/parse.rs, the filter compiler, the ring-buffer decoders) with many more
//! cases than `cargo test` runs (PROPTEST_CASES), each run from new random seeds. A failure
//! prints the minimal failing input proptest shrank it to.
use crate::cmd::{self, step};
use anyhow::Result;
use std::process::Command;
use std::time::Instant;

pub fn run(cases: u32, harness_args: &[String]) -> Result<()> {
    let mut test = Command::new("cargo");
    test.args([
        "test",
        "--release",
        "--package",
        "profiler",
        "--lib",
        "--test",
        "parse",
        "--",
    ]);
    if harness_args.is_empty() {
        test.arg("prop_");
    } else {
        test.args(harness_args);
    }
    test.env("PROPTEST_CASES", cases.to_string());
    // The property tests run no eBPF: unless told otherwise, the object is not built (so no
    // bpf-linker or nightly is needed, nor root).
    if std::env::var_os("AYA_BUILD_SKIP").is_none() {
        test.env("AYA_BUILD_SKIP", "1");
    }
    step(format!("PROPTEST_CASES={cases} {}", cmd::describe(&test)));
    let start = Instant::now();
    let result = cmd::run(&mut test);
    let took = start.elapsed().as_secs_f64();
    match &result {
        Ok(()) => println!("fuzz: {cases} cases per property test, {took:.0} s: no failure"),
        Err(_) => println!(
            "fuzz: {cases} cases per property test, {took:.0} s: FAILED (minimal failing input above)"
        ),
    }
    result
}
