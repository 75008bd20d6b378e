//! Kernel half of the profiler: timestamps the profiler's tagged packets at every device hook.
//!
//! Every program finds the payload tag the same way (`parse::find_tag`) and leaves after a few
//! instructions for packets that are not the run's. Kernel struct offsets come from the loader
//! (read from the running kernel's BTF), because Rust eBPF gets no CO-RE relocations.
#![no_std]
#![no_main]

mod parse;
mod skb;

use aya_ebpf::{
    bindings::{BPF_RB_NO_WAKEUP, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, classifier, map, raw_tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext, TcContext},
    EbpfContext,
};
use profiler_common::{Event, HookId, KernelOffsets, COUNTER_COUNT, COUNTER_LOST};

use crate::{parse::Found, skb::KernelSkb};

/// Offsets of kernel struct members, set by the loader with `EbpfLoader::set_global`.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    skb_head: 0,
    skb_data: 0,
    skb_len: 0,
    skb_data_len: 0,
    skb_end: 0,
    skb_mac_header: 0,
    skb_network_header: 0,
    skb_dev: 0,
    dev_ifindex: 0,
    dev_nd_net: 0,
    net_ns_inum: 0,
};

/// The run whose tags are reported; other runs' tags are ignored like untagged packets.
#[unsafe(no_mangle)]
static RUN_ID: u32 = 0;

/// UDP/TCP port (host order) the run's traffic uses; 0 looks for tags on every port.
/// A cheap first filter so that most packets never have their payload read.
#[unsafe(no_mangle)]
static PORT: u16 = 0;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Tagged skbs between net_dev_start_xmit and net_dev_xmit: the driver may free or hand off the
/// skb during xmit, so net_dev_xmit is matched by pointer instead of re-reading the packet.
#[map]
static IN_XMIT: LruHashMap<u64, Found> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn global<T: Copy>(v: &T) -> T {
    // Volatile: the loader rewrites these after compilation, so they must not be const-folded.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn emit(
    hook: HookId,
    found: &Found,
    ifindex: u32,
    netns: u32,
    len: u32,
    drop_reason: u32,
    ts_ns: u64,
) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(Event {
                ts_ns,
                seq: found.tag.seq,
                direction: found.tag.direction,
                ifindex,
                netns,
                len,
                drop_reason,
                hook: hook as u8,
                flags: found.flags,
                _pad: [0; 6],
            });
            // No wakeup: waking the reader on every event cost more than the rest of the program;
            // userspace drains the ring on a timer instead.
            entry.submit(BPF_RB_NO_WAKEUP as u64);
        }
        None => count(COUNTER_LOST),
    }
}

/// Common body of the device tracepoints: all of them have the skb as argument 0.
/// `dev_arg` is the index of an explicit `struct net_device *` argument, if the tracepoint has one.
#[inline(always)]
fn on_device(args: *const u64, hook: HookId, dev_arg: Option<usize>) {
    let ts = unsafe { bpf_ktime_get_ns() };
    let off = global(&OFFSETS);
    let skb_ptr = unsafe { *args };
    let skb = KernelSkb::new(skb_ptr as *const u8, &off);
    let Some(found) = parse::find_tag(&skb, global(&PORT), global(&RUN_ID)) else {
        return;
    };
    let dev = match dev_arg {
        Some(i) => (unsafe { *args.add(i) }) as *const u8,
        None => skb.dev(),
    };
    let (ifindex, netns) = skb::dev_identity(dev, &off);
    if hook == HookId::NetDevStartXmit {
        let _ = IN_XMIT.insert(&skb_ptr, &found, 0);
    }
    emit(hook, &found, ifindex, netns, skb.len(), 0, ts);
}

#[inline(always)]
fn on_xmit_done(args: *const u64) {
    let ts = unsafe { bpf_ktime_get_ns() };
    let skb_ptr = unsafe { *args };
    let Some(found) = (unsafe { IN_XMIT.get(&skb_ptr) }).copied() else {
        return;
    };
    let _ = IN_XMIT.remove(&skb_ptr);
    let off = global(&OFFSETS);
    // net_dev_xmit(skb, rc, dev, skb_len): the device and length come from the arguments.
    let dev = (unsafe { *args.add(2) }) as *const u8;
    let len = (unsafe { *args.add(3) }) as u32;
    let (ifindex, netns) = skb::dev_identity(dev, &off);
    emit(HookId::NetDevXmit, &found, ifindex, netns, len, 0, ts);
}

#[inline(always)]
fn on_drop(args: *const u64) {
    let ts = unsafe { bpf_ktime_get_ns() };
    let off = global(&OFFSETS);
    let skb = KernelSkb::new(unsafe { *args } as *const u8, &off);
    let Some(found) = parse::find_tag(&skb, global(&PORT), global(&RUN_ID)) else {
        return;
    };
    // kfree_skb(skb, location, reason, ...)
    let reason = (unsafe { *args.add(2) }) as u32;
    let (ifindex, netns) = skb::dev_identity(skb.dev(), &off);
    emit(
        HookId::KfreeSkb,
        &found,
        ifindex,
        netns,
        skb.len(),
        reason,
        ts,
    );
}

/// Each device tracepoint twice: tp_btf (preferred) and raw_tp (fallback where tp_btf is refused).
/// Both contexts are the tracepoint's arguments as an array of u64.
macro_rules! device_tracepoint {
    ($btf:ident, $raw:ident, $tp:literal, $handler:ident $(, $arg:expr)*) => {
        #[btf_tracepoint(function = $tp)]
        pub fn $btf(ctx: BtfTracePointContext) -> i32 {
            $handler(ctx.as_ptr() as *const u64 $(, $arg)*);
            0
        }

        #[raw_tracepoint(tracepoint = $tp)]
        pub fn $raw(ctx: RawTracePointContext) -> i32 {
            $handler(ctx.as_ptr() as *const u64 $(, $arg)*);
            0
        }
    };
}

device_tracepoint!(
    tp_net_dev_queue,
    raw_net_dev_queue,
    "net_dev_queue",
    on_device,
    HookId::NetDevQueue,
    None
);
// net_dev_start_xmit(skb, dev)
device_tracepoint!(
    tp_net_dev_start_xmit,
    raw_net_dev_start_xmit,
    "net_dev_start_xmit",
    on_device,
    HookId::NetDevStartXmit,
    Some(1)
);
device_tracepoint!(
    tp_net_dev_xmit,
    raw_net_dev_xmit,
    "net_dev_xmit",
    on_xmit_done
);
device_tracepoint!(
    tp_netif_receive_skb,
    raw_netif_receive_skb,
    "netif_receive_skb",
    on_device,
    HookId::NetifReceiveSkb,
    None
);
device_tracepoint!(
    tp_netif_rx,
    raw_netif_rx,
    "netif_rx",
    on_device,
    HookId::NetifRx,
    None
);
device_tracepoint!(
    tp_napi_gro_receive_entry,
    raw_napi_gro_receive_entry,
    "napi_gro_receive_entry",
    on_device,
    HookId::NapiGroReceiveEntry,
    None
);
device_tracepoint!(tp_kfree_skb, raw_kfree_skb, "kfree_skb", on_drop);

#[inline(always)]
fn on_tc(ctx: &TcContext, hook: HookId) -> i32 {
    let ts = unsafe { bpf_ktime_get_ns() };
    if let Some(found) = parse::find_tag(ctx, global(&PORT), global(&RUN_ID)) {
        // tc cannot see the device's namespace: userspace knows it from where it attached.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        emit(hook, &found, ifindex, 0, ctx.len(), 0, ts);
    }
    // TC_ACT_UNSPEC (TCX_NEXT): never decide the packet's fate, let the next program run.
    TC_ACT_UNSPEC
}

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    on_tc(&ctx, HookId::TcIngress)
}

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    on_tc(&ctx, HookId::TcEgress)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: bpf_probe_read_kernel is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
