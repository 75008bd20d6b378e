//! The deep hooks on a stock kernel that has every datapath module: each hook passes the
//! verifier and attaches, each network type shows its datapath's functions in order, and the
//! attribution stays right with them (netem ground truth).

use std::process::Command;

use profiler::report::schema::{HookSet, OtherPath, RunReport, Status};

use crate::common::{assert_clean, assert_in_order, direction, doctor_report, lab_up, run_json};

/// Deep hooks a kernel series lacks because its compiler inlined the function (no symbol).
const INLINED: &[(&str, &[&str])] = &[
    ("6.1.", &["ipvlan_process_outbound"]),
    ("6.12.", &["ipvlan_process_outbound"]),
];

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("kernel release")
        .trim()
        .to_string()
}

fn modprobe(modules: &[&str]) {
    let st = Command::new("modprobe")
        .arg("-a")
        .args(modules)
        .status()
        .expect("modprobe");
    assert!(st.success(), "modprobe {modules:?}");
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn every_deep_hook_passes_the_verifier_and_attaches() {
    modprobe(&[
        "veth",
        "bridge",
        "vxlan",
        "geneve",
        "ip_gre",
        "openvswitch",
        "macvlan",
        "ipvlan",
        "tun",
        "virtio_net",
    ]);
    let release = kernel();
    let inlined: &[&str] = INLINED
        .iter()
        .find(|(series, _)| release.starts_with(series))
        .map_or(&[], |(_, names)| names);
    let d = doctor_report();
    for (list, hooks) in [("hooks", &d.hooks), ("follow_hooks", &d.follow_hooks)] {
        let mut deep = 0;
        for h in hooks {
            let name = h.name.as_str();
            let attached = h.status == Status::Attached;
            deep += usize::from(h.set == HookSet::Deep);
            if inlined.contains(&name) {
                assert!(!attached, "{list}: {name} attached; remove it from INLINED");
                let reason = h.reason.as_deref().unwrap_or("");
                assert!(
                    reason.contains("not in this kernel's symbols"),
                    "{name}: {reason}"
                );
            } else {
                assert!(
                    attached,
                    "{list} on {release}: {name} {:?}: {:?}",
                    h.status, h.reason
                );
            }
        }
        assert!(deep >= 20, "{list}: {deep} deep hooks");
    }
    crate::sriov::assert_driver_xmit_found(&d);
    assert_clean();
}

/// A run with the deep hooks on a lab: the request's hops, which must hold `labels` in order.
fn deep_hops(lab: &[&str], labels: &[&str]) -> RunReport {
    let mut args = lab.to_vec();
    args.extend(["--count", "30", "--hooks", "deep"]);
    let r = run_json(&args);
    assert_eq!(r.hook_set, HookSet::Deep, "{lab:?}");
    let req = direction(&r, "request");
    assert!(req.complete_packets >= 25, "{lab:?}: {req:?}");
    assert_in_order(&req.hop_sequence(), labels, &format!("{lab:?}"));
    r
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn bridge_hops_include_veth_and_bridge_functions() {
    deep_hops(
        &["--lab", "bridge"],
        &["veth_xmit", "br_handle_frame", "br_forward", "veth_xmit"],
    );
    assert_clean();
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn flannel_vxlan_hops_include_the_vxlan_functions() {
    deep_hops(
        &["--lab", "flannel-vxlan", "--placement", "cross-host"],
        &[
            "veth_xmit",
            "br_handle_frame",
            "vxlan_xmit",
            "udp_tunnel_xmit_skb",
            "veth_xmit",
            "vxlan_rcv",
            "br_forward",
        ],
    );
    assert_clean();
}

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn macvlan_hops_include_the_macvlan_functions() {
    deep_hops(
        &["--lab", "macvlan", "--placement", "cross-host"],
        &["macvlan_start_xmit", "veth_xmit", "macvlan_handle_frame"],
    );
    assert_clean();
}

/// The p50 of each request segment, by name.
fn p50s(r: &RunReport) -> Vec<(String, f64)> {
    (direction(r, "request").segments.iter())
        .map(|s| (s.name.clone(), s.stats.p50_ns as f64))
        .collect()
}

/// netem on the underlay under VXLAN: the delay shows in the qdisc segment of the wire, and in
/// no other segment, the ones the vxlan functions bound included. Under TCG segments swing by a
/// millisecond or so, so the delay is large and medians are compared with half of it.
#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn netem_delay_under_vxlan_lands_in_its_segment() {
    const DELAY_MS: f64 = 30.0;
    let lab = lab_up(&["flannel-vxlan", "--placement", "cross-host"]);
    let netem = Command::new("ip")
        .args(["netns", "exec", "prof-flannel-vxlan-xhost-host-a"])
        .args([
            "tc", "qdisc", "add", "dev", "wire0", "root", "netem", "delay",
        ])
        .arg(format!("{DELAY_MS}ms"))
        .status()
        .expect("tc");
    assert!(netem.success(), "tc qdisc add ... netem");
    let r = deep_hops(
        &["--lab", "flannel-vxlan", "--placement", "cross-host"],
        &["vxlan_xmit", "udp_tunnel_xmit_skb", "vxlan_rcv"],
    );
    // Taking the lab down removes the qdisc with the namespace.
    drop(lab);

    let p50_ms = p50s(&r).into_iter().map(|(n, p)| (n, p / 1e6));
    let (delayed, others): (Vec<_>, Vec<_>) = p50_ms.partition(|(n, _)| n == "qdisc wire0");
    assert_eq!(delayed.len(), 1, "one qdisc wire0 segment: {delayed:?}");
    let (_, got) = delayed[0];
    assert!(
        (got - DELAY_MS).abs() < DELAY_MS * 0.2,
        "qdisc wire0: {got} ms"
    );
    for (name, ms) in others {
        assert!(
            ms < DELAY_MS / 2.0,
            "{name}: {ms} ms with {DELAY_MS} ms in qdisc wire0"
        );
    }
    assert_clean();
}

/// The first packet of an OVS flow goes up to ovs-vswitchd (a flow-table miss) and comes back
/// to be executed; the packets after it stay in the kernel. The lab's ovs-vswitchd purges its
/// datapath flows every two seconds during the run, so a few packets miss: the report keeps them
/// apart, as another path with the upcall as a segment, beside the in-kernel path most take.
#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn ovs_upcall_shows_as_its_own_path() {
    let lab = lab_up(&["ovs-vlan"]);
    // The report goes to a file: on a pipe nobody reads until the run ends, a report larger
    // than the pipe's buffer would block the run for ever.
    let report = std::env::temp_dir().join(format!("profiler-upcall-{}.json", std::process::id()));
    let mut run = Command::new(crate::common::BIN)
        .args(["run", "--lab", "ovs-vlan", "--count", "300", "--rate", "25"])
        .args(["--hooks", "deep", "--quiet", "--json"])
        .arg(&report)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("profiler run");
    // revalidator/purge drops flows with their userspace state: unlike deleting the datapath's
    // flows behind ovs-vswitchd's back, the next packet's upcall installs the flow again.
    while run.try_wait().expect("waiting for the run").is_none() {
        std::thread::sleep(std::time::Duration::from_secs(2));
        let _ = Command::new("ovs-appctl")
            .args(["-t", "/run/profiler/ovs/ovs-vlan-host/ovs-vswitchd.ctl"])
            .arg("revalidator/purge")
            .stdout(std::process::Stdio::null())
            .status();
    }
    let status = run.wait().expect("the run's exit");
    assert!(status.success(), "profiler run failed");
    let r: RunReport =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("the run's report"))
            .expect("run JSON");
    let _ = std::fs::remove_file(&report);
    drop(lab);

    let req = direction(&r, "request");
    let fast = req.hop_sequence();
    assert_in_order(
        &fast,
        &[
            "ovs_vport_receive",
            "ovs_dp_process_packet",
            "ovs_execute_actions",
            "ovs_vport_send",
        ],
        "in-kernel path",
    );
    assert!(
        !fast.iter().any(|(h, _)| h.ends_with("ovs_dp_upcall")),
        "the most common path went up to ovs-vswitchd: {fast:?}"
    );
    let upcalled: Vec<&OtherPath> = (req.other_paths.iter())
        .filter(|p| (p.segments.iter()).any(|s| s.name == "ovs upcall (ovs-vswitchd and back)"))
        .collect();
    assert!(
        !upcalled.is_empty(),
        "no path with the upcall: {:?}",
        req.other_paths
    );
    let p = upcalled[0];
    assert!(p.packets >= 1);
    assert_in_order(
        &p.hop_sequence(),
        &[
            "ovs_dp_process_packet",
            "ovs_dp_upcall",
            "ovs_execute_actions",
            "ovs_vport_send",
        ],
        "upcall path",
    );
    assert_clean();
}
