//! NICs the hook table does not list, and SR-IOV: the VM suite boots with two emulated igb NICs
//! (`cargo xtask vm --nic igb`, Intel 82576 with SR-IOV).

use std::process::Command;

use profiler::report::schema::{DoctorReport, RunReport, Status};

use crate::common::{direction, lab_up, run_report_of, BIN};
use crate::labs::assert_nothing_left;

const IGB_DRIVER: &str = "/sys/bus/pci/drivers/igb";

/// Whether the guest has an igb NIC; says why not when it has none.
pub fn has_igb() -> bool {
    let found = std::fs::read_dir(IGB_DRIVER)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("0000:"))
        })
        .unwrap_or(false);
    if !found {
        crate::common::skip::skip(
            "no igb NIC in this guest (boot it with cargo xtask vm --nic igb)",
            Some(crate::common::skip::Absence::NoIgbNic),
        );
    }
    found
}

/// In a doctor report `d`: igb's transmit, which the hook table does not name, was found from
/// the PFs' netdev_ops and attached in both modes.
pub fn assert_driver_xmit_found(d: &DoctorReport) {
    if !has_igb() {
        return;
    }
    let pfs: Vec<String> = std::fs::read_dir(IGB_DRIVER)
        .expect("igb's devices")
        .flatten()
        .filter_map(|e| std::fs::read_dir(e.path().join("net")).ok())
        .flat_map(|d| {
            d.flatten()
                .map(|n| n.file_name().to_string_lossy().into_owned())
        })
        .collect();
    assert!(!pfs.is_empty(), "igb has no network devices");
    for (list, hooks) in [("hooks", &d.hooks), ("follow_hooks", &d.follow_hooks)] {
        let xmit = hooks
            .iter()
            .find(|h| h.name.starts_with("driver:xmit igb_xmit_frame [igb]"))
            .unwrap_or_else(|| panic!("{list}: no driver:xmit hook on igb_xmit_frame: {hooks:?}"));
        assert_eq!(xmit.status, Status::Attached, "{list}: {xmit:?}");
        assert_eq!(xmit.kind, "kprobe", "{list}: {xmit:?}");
        let name = &xmit.name;
        for pf in &pfs {
            assert!(
                name.contains(pf.as_str()),
                "{list}: {name} does not name {pf}"
            );
        }
    }
}

/// The SR-IOV PFs' VF counts, by PCI device: all 0 once no lab holds VFs.
fn vf_counts() -> Vec<(String, String)> {
    std::fs::read_dir(IGB_DRIVER)
        .expect("igb's devices")
        .flatten()
        .filter_map(|e| {
            let n = std::fs::read_to_string(e.path().join("sriov_numvfs")).ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                n.trim().to_string(),
            ))
        })
        .collect()
}

/// `profiler run ARGS --json -` on CPU 0, which takes the VFs' interrupts (see the lab's
/// sriov.rs): which must exit 0; the report.
fn pinned_run(args: &[&str]) -> RunReport {
    let out = Command::new("taskset")
        .args(["-c", "0", BIN, "run"])
        .args(args)
        .args(["--json", "-"])
        .output()
        .expect("running taskset -c 0 profiler run");
    assert!(
        out.status.success(),
        "profiler run {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    run_report_of(&out.stdout)
}

/// A run on the sriov lab with `placement`: complete (0 lost, every exchange done, at least
/// 95% of each direction's packets with the whole path), the request sent by pod-a's VF through
/// its driver's transmit (found from netdev_ops) and received by pod-b's VF after `crossing`.
fn profile(placement: &str, proto: &str, crossing: &str) -> RunReport {
    let count = 40;
    let r = pinned_run(&[
        "--lab",
        "sriov",
        "--placement",
        placement,
        "--proto",
        proto,
        "--count",
        &count.to_string(),
        "--rate",
        "20",
        "--hooks",
        "deep",
    ]);
    let ctx = format!("sriov {placement} {proto}");
    assert_eq!(r.events.lost, 0, "{ctx}: lost events");
    assert_eq!(
        u64::from(r.traffic.completed),
        count,
        "{ctx}: {:?}",
        r.traffic
    );
    // Every exchange completed: a drop would be a driver's free after its transmit taken for
    // one (igbvf's, reported by net_tx_action without a reason on 6.1).
    assert!(
        r.events.drops.is_empty(),
        "{ctx}: drops {:?}",
        r.events.drops
    );
    for dir in &r.directions {
        let complete = dir.complete_packets;
        println!(
            "{ctx} {}: {complete} of {count} packets complete",
            dir.direction
        );
        assert!(
            complete * 100 >= count * 95,
            "{ctx} {}: {complete} of {count} packets complete: {:?}",
            dir.direction,
            dir.missing_hops
        );
    }
    let req = direction(&r, "request");
    let hops = req.hop_sequence();
    println!("{ctx}: request hops {hops:?}");
    let names = req.segment_names();
    println!("{ctx}: request segments {names:?}");
    let xmit = hops
        .iter()
        .position(|(h, i)| h.ends_with("driver:xmit") && *i == Some("eth0"))
        .unwrap_or_else(|| panic!("{ctx}: no driver:xmit hop on pod-a's VF: {hops:?}"));
    let switch = names
        .iter()
        .position(|n| n.starts_with(crossing))
        .unwrap_or_else(|| panic!("{ctx}: no segment {crossing:?}: {names:?}"));
    // Segment i lies between hops i and i + 1: the switch comes after the driver's transmit.
    assert!(
        xmit <= switch,
        "{ctx}: {crossing:?} before the driver's transmit: {names:?}"
    );
    r
}

/// The delay netem adds at the sending VF's egress.
const DELAY_MS: f64 = 10.0;

/// `tc ARGS` in namespace `netns`, which must succeed.
fn tc(netns: &str, args: &[&str]) {
    let st = Command::new("ip")
        .args(["netns", "exec", netns, "tc"])
        .args(args)
        .status()
        .expect("running tc");
    assert!(st.success(), "tc {args:?} in {netns}");
}

/// Ground truth: a delay at the sending VF's egress (netem as its root qdisc) lands in the
/// segment that ends where the qdisc
/// lets the packet go, `qdisc eth0` of pod-a, and in no other. Under TCG segments swing by a
/// millisecond or so, so the delay is long and the bounds wide.
fn delay_lands_at_the_vf_egress(name: &str) {
    let netns = format!("prof-{name}-pod-a");
    let delay = format!("{DELAY_MS}ms");
    tc(
        &netns,
        &[
            "qdisc", "add", "dev", "eth0", "root", "netem", "delay", &delay,
        ],
    );
    let r = pinned_run(&[
        "--lab", "sriov", "--proto", "udp", "--count", "15", "--rate", "5", "--hooks", "stable",
    ]);
    tc(&netns, &["qdisc", "del", "dev", "eth0", "root"]);
    let req = direction(&r, "request");
    for s in &req.segments {
        let (seg, ms) = (s.name.as_str(), s.stats.p50_ns as f64 / 1e6);
        println!("{name}: {seg}: p50 {ms:.2} ms with {DELAY_MS} ms at pod-a's eth0 egress");
        if seg == "qdisc eth0" {
            assert!((ms - DELAY_MS).abs() < DELAY_MS * 0.3, "{seg}: {ms} ms");
        } else {
            assert!(
                ms < DELAY_MS / 2.0,
                "{seg}: {ms} ms, the delay was elsewhere"
            );
        }
    }
}

/// Up, UDP and TCP profiles (and on one, the ground truth), down: the VFs are returned and
/// the namespaces gone.
fn cycle(placement: &str, name: &str, crossing: &str, truth: bool) {
    if !has_igb() {
        return;
    }
    {
        let _guard = lab_up(&["sriov", "--placement", placement]);
        for proto in ["udp", "tcp"] {
            profile(placement, proto, crossing);
        }
        if truth {
            delay_lands_at_the_vf_egress(name);
        }
    }
    assert_nothing_left(name);
    let held: Vec<_> = vf_counts().into_iter().filter(|(_, n)| n != "0").collect();
    assert!(held.is_empty(), "{name}: VFs left after lab down: {held:?}");
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn sriov_same_host_switches_in_the_nic() {
    cycle(
        "same-host",
        "sriov",
        "NIC switch eth0 (pod-a) -> eth0 (pod-b) (igb)",
        true,
    );
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn sriov_cross_host_crosses_the_wire() {
    cycle(
        "cross-host",
        "sriov-xhost",
        "wire eth0 (pod-a) -> eth0 (pod-b)",
        false,
    );
}
