//! Tests that need a stock kernel instead of the host's (kprobes, fentry, the openvswitch
//! datapath, ...). Ignored on the host: `cargo xtask vm-test --kernel 6.1|6.12` runs them as
//! root in a VM booted from that Debian kernel, with PROFILER_VM_KERNEL set to the release it
//! asked for (`cargo xtask test` runs them on 6.1).
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

mod common;
#[path = "vm/deep.rs"]
mod deep;
#[path = "vm/labs.rs"]
mod labs;
#[path = "vm/recovery.rs"]
mod recovery;
#[path = "vm/sriov.rs"]
mod sriov;

#[test]
#[ignore = "runs inside the VM lab: cargo xtask vm-test"]
fn boots_the_requested_kernel() {
    let wanted = std::env::var("PROFILER_VM_KERNEL")
        .expect("PROFILER_VM_KERNEL (set by cargo xtask vm-test)");
    let running = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("reading /proc/sys/kernel/osrelease");
    println!("running kernel {}", running.trim());
    assert_eq!(
        running.trim(),
        wanted,
        "the VM runs another kernel than the one asked for"
    );
}
