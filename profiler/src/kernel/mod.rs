//! The kernel side, shared by both modes: what the running kernel offers (BTF offsets, kallsyms,
//! program types), loading and attaching the eBPF programs, draining their ring buffers, and
//! the delay injector used for ground truth.

pub mod btf;
pub mod delay;
pub mod doctor;
pub mod kfunc;
pub mod netfilter;
pub mod nics;
pub mod programs;
pub mod ring;
pub mod tc;
pub mod uprobe;

use anyhow::{Context as _, Result};

/// A hook the command was asked for that this kernel cannot give (a `--uprobe` symbol, the
/// socket field `--cgroup` reads): the command exits with its own status (cli/exit.rs). Hooks a
/// command only prefers are statuses in its report (`unavailable`, `failed`), not errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MissingHook(pub String);

/// Where the kernel offers kprobes (CONFIG_KPROBES): the PMU perf_event_open attaches through.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";

/// The running kernel's release ("6.18.44-...").
pub fn release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Now on CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns: application stamps and kernel
/// events compare directly.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Whether kprobes can be attached (the deep hooks need them).
pub fn has_kprobes() -> bool {
    std::path::Path::new(KPROBE_PMU).exists()
}

/// Whether tc programs attach through tcx links (6.6 and later); before, they hang off a clsact
/// qdisc and are attached through netlink.
pub fn has_tcx() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// With `on`, enables bpf_stats until the returned guard is dropped: the kernel counts each
/// program's run time meanwhile (two clock reads per run, so only when asked).
pub fn stats_while(on: bool) -> Result<Option<std::os::fd::OwnedFd>> {
    on.then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling bpf_stats"))
        .transpose()
}
