//! `profiler doctor`: what this kernel and these privileges allow, found by trying.

use anyhow::{bail, Result};
use aya::programs::ProgramType;

use super::{
    btf::{KernelBtf, VMLINUX_BTF},
    programs::{LoadConfig, Programs},
};
use crate::{
    datapath::Mode,
    report::schema::{
        Check, CheckStatus, DoctorReport, HookSet, HookStatus, Status, DOCTOR_SCHEMA,
    },
};

/// Capabilities the profiler needs: loading programs (CAP_BPF), tracing (CAP_PERFMON), tc and
/// namespaces (CAP_NET_ADMIN, CAP_SYS_ADMIN for setns). Root has them all.
const CAPS: &[(u32, &str)] = &[
    (39, "CAP_BPF"),
    (38, "CAP_PERFMON"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
];

/// The effective capabilities this process lacks.
pub fn missing_capabilities() -> Vec<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    CAPS.iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

/// Fails with one sentence when the process cannot load programs or manage namespaces.
pub fn require_privileges() -> Result<()> {
    require(&CAPS.iter().map(|(_, n)| *n).collect::<Vec<_>>())
}

/// What `profiler attach` needs: it attaches no tc program and creates no device, so no
/// CAP_NET_ADMIN; CAP_SYS_ADMIN joins the pods' namespaces to read their devices and enables
/// bpf_stats for --stats.
pub const ATTACH_CAPS: &[&str] = &["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"];

/// Fails with one sentence unless the process has every capability of `needed`.
pub fn require(needed: &[&str]) -> Result<()> {
    let missing: Vec<&str> = missing_capabilities()
        .into_iter()
        .filter(|c| needed.contains(c))
        .collect();
    if !missing.is_empty() {
        bail!(
            "this needs root or {}; this process lacks {}",
            needed.join(", "),
            missing.join(", ")
        );
    }
    Ok(())
}

fn check(name: &str, result: Result<(), String>) -> Check {
    match result {
        Ok(()) => Check {
            name: name.into(),
            status: CheckStatus::Ok,
            reason: None,
        },
        Err(reason) => Check {
            name: name.into(),
            status: CheckStatus::Unavailable,
            reason: Some(reason),
        },
    }
}

/// Program types, each probed by loading a minimal program of that type.
fn program_types() -> Vec<Check> {
    let kprobe_pmu = super::has_kprobes();
    [
        ("tracepoint", ProgramType::TracePoint),
        ("raw_tracepoint", ProgramType::RawTracePoint),
        ("tc (sched_cls)", ProgramType::SchedClassifier),
        ("xdp", ProgramType::Xdp),
        ("fentry/fexit (tracing)", ProgramType::Tracing),
        ("kprobe", ProgramType::KProbe),
    ]
    .into_iter()
    .map(|(name, t)| {
        let loaded = match aya::sys::is_program_supported(t) {
            Ok(true) => Ok(()),
            Ok(false) => Err("the kernel refused a minimal program of this type".to_string()),
            Err(e) => Err(format!("probe failed: {e}")),
        };
        let result = match loaded {
            Ok(()) if t == ProgramType::KProbe && !kprobe_pmu => Err(
                "programs load but there is no kprobe PMU to attach to (CONFIG_KPROBES off)".into(),
            ),
            other => other,
        };
        check(name, result)
    })
    .collect()
}

pub fn run() -> DoctorReport {
    let missing = missing_capabilities();
    let privileges = check(
        "privileges",
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("missing {}", missing.join(", ")))
        },
    );
    let btf = KernelBtf::load();
    let btf_check = check(
        VMLINUX_BTF,
        btf.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")),
    );
    // The real device hooks, loaded and attached with this kernel's offsets, then detached.
    let hooks_of = |mode| match &btf {
        Ok(btf) if missing.is_empty() => match Programs::load(btf, &LoadConfig::default()) {
            Ok(mut programs) => match programs.attach_tracepoints(btf, mode) {
                Ok(()) => {
                    programs.attach_deep(btf, mode);
                    programs.statuses.clone()
                }
                Err(e) => vec![failed_hook("tracepoints", &e)],
            },
            Err(e) => vec![failed_hook("load", &e)],
        },
        _ => Vec::new(),
    };
    let (hooks, follow_hooks) = (hooks_of(Mode::Run), hooks_of(Mode::Attach));
    DoctorReport {
        schema: DOCTOR_SCHEMA.into(),
        kernel: super::release(),
        privileges,
        btf: btf_check,
        program_types: program_types(),
        hooks,
        follow_hooks,
    }
}

fn failed_hook(name: &str, e: &anyhow::Error) -> HookStatus {
    HookStatus {
        name: name.into(),
        kind: "load".into(),
        status: Status::Failed,
        reason: Some(format!("{e:#}")),
        set: HookSet::Stable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both DaemonSets (attach's, and the agent's, which runs attach for its host) grant
    /// exactly what attach checks for.
    #[test]
    fn the_daemonsets_grant_attachs_capabilities() {
        let want: Vec<String> = ATTACH_CAPS
            .iter()
            .map(|c| format!("\"{}\"", c.trim_start_matches("CAP_")))
            .collect();
        for manifest in [
            include_str!("../../../deploy/daemonset.yaml"),
            include_str!("../../../deploy/agent-daemonset.yaml"),
        ] {
            let added = manifest
                .lines()
                .find_map(|l| l.trim().strip_prefix("add: "))
                .expect("a capabilities add: line");
            assert_eq!(added, format!("[{}]", want.join(", ")));
        }
    }
}
