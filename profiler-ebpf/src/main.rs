//! Kernel half of the profiler, in its two modes:
//! - run mode (`run.rs`, `profiler run`): the profiler's own tagged packets, timestamped at every
//!   device hook, one event per hop; every program finds the payload tag the same way
//!   (`parse::find_tag`) and leaves after a few instructions for packets that are not the run's;
//! - attach mode (`attach.rs`, `profiler attach`): real traffic, each packet followed by its
//!   buffer, latency kept per segment in the kernel.
//!
//! This root holds what both share: the kernel's struct offsets, which come from the loader (read
//! from the running kernel's BTF), because Rust eBPF gets no CO-RE relocations; the counters; the
//! device tracepoints' shape. The hooks beyond the device tracepoints (func: kernel functions,
//! netfilter, redirect, uprobe) serve one mode or both, as their own docs say.
#![no_std]
#![no_main]

mod attach;
mod delay;
mod floor;
mod func;
mod netfilter;
mod parse;
mod redirect;
mod run;
mod skb;
mod uprobe;

use aya_ebpf::{macros::map, maps::PerCpuArray};
use profiler_common::{KernelOffsets, COUNTER_COUNT};

use crate::skb::KernelMem;

/// Offsets of kernel struct members, set by the loader with `EbpfLoader::set_global`.
#[unsafe(no_mangle)]
pub(crate) static OFFSETS: KernelOffsets = KernelOffsets {
    skb_head: 0,
    skb_data: 0,
    skb_len: 0,
    skb_data_len: 0,
    skb_end: 0,
    skb_mac_header: 0,
    skb_network_header: 0,
    skb_protocol: 0,
    skb_dev: 0,
    dev_ifindex: 0,
    dev_nd_net: 0,
    net_ns_inum: 0,
    skb_sk: 0,
    sk_cgroup: 0,
    cgroup_kn: 0,
    kn_id: 0,
};

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[inline(always)]
pub(crate) fn global<T: Copy>(v: &T) -> T {
    // Volatile: the loader rewrites these after compilation, so they must not be const-folded.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}

/// The device a device tracepoint fired for: its `struct net_device *` argument `dev_arg` if it
/// has one, else the skb's (argument 0).
#[inline(always)]
pub(crate) fn hook_device<M: KernelMem>(args: *const u64, dev_arg: Option<usize>) -> *const u8 {
    match dev_arg {
        Some(i) => (unsafe { *args.add(i) }) as *const u8,
        None => skb::dev::<M>(unsafe { *args } as *const u8),
    }
}

/// Each device tracepoint twice: tp_btf (preferred; loads kernel structs directly) and raw_tp
/// (fallback where tp_btf is refused; reads them through bpf_probe_read_kernel). Both contexts
/// are the tracepoint's arguments as an array of u64.
macro_rules! device_tracepoint {
    ($btf:ident, $raw:ident, $tp:literal, $handler:ident $(, $arg:expr)*) => {
        #[::aya_ebpf::macros::btf_tracepoint(function = $tp)]
        pub fn $btf(ctx: ::aya_ebpf::programs::BtfTracePointContext) -> i32 {
            let args = ::aya_ebpf::EbpfContext::as_ptr(&ctx) as *const u64;
            $handler::<$crate::skb::Direct>(args $(, $arg)*);
            0
        }

        #[::aya_ebpf::macros::raw_tracepoint(tracepoint = $tp)]
        pub fn $raw(ctx: ::aya_ebpf::programs::RawTracePointContext) -> i32 {
            let args = ::aya_ebpf::EbpfContext::as_ptr(&ctx) as *const u64;
            $handler::<$crate::skb::Probed>(args $(, $arg)*);
            0
        }
    };
}
pub(crate) use device_tracepoint;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: bpf_probe_read_kernel is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
