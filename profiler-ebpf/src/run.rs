//! Run mode (`profiler run`): timestamps the profiler's own tagged packets at every device hook
//! and at tc, one event per hop in the EVENTS ring. The loader sets RUN_ID and PORT.

use aya_ebpf::{
    bindings::{BPF_RB_NO_WAKEUP, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, PerCpuArray, RingBuf},
    programs::TcContext,
};
use profiler_common::{
    device_key, slot_hash, Event, HookId, HopPoint, Tag, COUNTER_LOST, TAG_MAGIC,
};

use crate::{
    attach, count, device_tracepoint, global, hook_device,
    parse::{self, Found},
    skb::{self, Direct, KernelMem, KernelSkb, Probed},
};

/// The run whose tags are reported; other runs' tags are ignored like untagged packets.
#[unsafe(no_mangle)]
pub(crate) static RUN_ID: u32 = 0;

/// UDP/TCP port (host order) the run's traffic uses; 0 looks for tags on every port.
/// A cheap first filter so that most packets never have their payload read.
#[unsafe(no_mangle)]
pub(crate) static PORT: u16 = 0;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Tagged skbs between net_dev_start_xmit and net_dev_xmit, per CPU: the driver may free or hand
/// off the skb during xmit, so net_dev_xmit is matched by pointer instead of re-reading the
/// packet. Both tracepoints run in one call with bottom halves off, so the pair never changes CPU;
/// stacked devices (vxlan over a NIC) nest, hence a small stack.
#[map]
static IN_XMIT: PerCpuArray<XmitStack> = PerCpuArray::with_max_entries(1, 0);

const XMIT_DEPTH: usize = 4;

#[repr(C)]
pub struct XmitStack {
    depth: u32,
    skbs: [u64; XMIT_DEPTH],
    found: [Found; XMIT_DEPTH],
}

#[inline(always)]
pub(crate) fn emit(
    hook: u8,
    found: &Found,
    ifindex: u32,
    netns: u32,
    len: u32,
    drop_reason: u32,
    ts_ns: u64,
) {
    // Written in place in the ring, without a wakeup: waking the reader on every event cost
    // more than the rest of a program; userspace drains the ring on a timer instead.
    let Some(mut slot) = EVENTS.reserve::<Event>(0) else {
        count(COUNTER_LOST);
        return;
    };
    slot.write(Event {
        ts_ns,
        seq: found.tag.seq,
        direction: found.tag.direction,
        ifindex,
        netns,
        len,
        drop_reason,
        hook,
        flags: found.flags,
        _pad: [0; 2],
        // Stamped last: all but the submit is the profiler's own time, not the datapath's.
        cost_ns: unsafe { bpf_ktime_get_ns() }.wrapping_sub(ts_ns) as u32,
    });
    slot.submit(BPF_RB_NO_WAKEUP as u64);
}

/// Common body of the device tracepoints: all of them have the skb as argument 0.
/// `dev_arg` is the index of an explicit `struct net_device *` argument, if the tracepoint has one.
#[inline(always)]
pub(crate) fn on_device<M: KernelMem>(args: *const u64, hook: u8, dev_arg: Option<usize>) {
    let ts = unsafe { bpf_ktime_get_ns() };
    let skb_ptr = unsafe { *args };
    let (ifindex, netns) = skb::dev_identity::<M>(hook_device::<M>(args, dev_arg));
    let id = M::number(skb_ptr);
    let skb = KernelSkb::<M>::new(skb_ptr as *const u8);
    let found = match passed_over(id, hook, ifindex, netns) {
        READ_IT => {
            let found = parse::find_tag(&skb, global(&PORT), global(&RUN_ID));
            remember(id, hook, ifindex, netns, pack(&found));
            found
        }
        seen => unpack(seen),
    };
    let Some(found) = found else {
        return;
    };
    if hook == HookId::NetDevStartXmit as u8 {
        push_xmit(skb_ptr, &found);
    }
    emit(hook, &found, ifindex, netns, skb.len(), 0, ts);
}

/// A packet the tagged programs read, the last hop they saw it at, and what they found in it
/// (`pack`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Seen {
    skb: u64,
    last: HopPoint,
    found: u64,
}

/// Run mode: packets by skb, direct-mapped, so that their next stages (the rule attach mode
/// trusts too: attach::next_stage) skip the packet read. A stream's untagged messages and the
/// node's other traffic then cost a read per device, not per hook; a tagged packet is read
/// once per device instead of at each of its hooks.
const SEEN_SLOTS: u32 = 4096;
#[map]
static SEEN: Array<Seen> = Array::with_max_entries(SEEN_SLOTS, 0);

/// What a read found, as one scalar: the table's functions are not inlined, and a pointer to
/// a tag on the caller's stack would make the verifier tell apart every way the parse can end
/// (4x the instructions it walks). READ_IT: nothing known; UNTAGGED; else TAGGED with the
/// seq (bits 0-31), direction (32-39) and flags (40-47).
const READ_IT: u64 = 0;
const UNTAGGED: u64 = 1 << 62;
const TAGGED: u64 = 1 << 63;

#[inline(always)]
fn pack(found: &Option<Found>) -> u64 {
    match found {
        Some(f) => {
            TAGGED
                | f.tag.seq as u64
                | ((f.tag.direction as u64 & 0xff) << 32)
                | ((f.flags as u64) << 40)
        }
        None => UNTAGGED,
    }
}

#[inline(always)]
fn unpack(v: u64) -> Option<Found> {
    (v & TAGGED != 0).then(|| Found {
        tag: Tag {
            magic: TAG_MAGIC,
            run_id: global(&RUN_ID),
            seq: v as u32,
            direction: (v >> 32) as u8 as u32,
        },
        flags: (v >> 40) as u8,
        _pad: [0; 3],
    })
}

/// What a read of this packet at its previous stage found (`pack`), READ_IT if this hook is
/// not the next stage of a packet read before. Not inlined, like `remember`: the verifier then
/// walks the packet parse once, not once per state of the table's slot.
#[inline(never)]
fn passed_over(id: u64, hook: u8, ifindex: u32, netns: u32) -> u64 {
    let Some(seen) = SEEN.get_ptr_mut(slot_hash(id) & (SEEN_SLOTS - 1)) else {
        return READ_IT;
    };
    let seen = unsafe { &mut *seen };
    if !attach::next_stage(&seen.last, seen.skb, id, hook, device_key(netns, ifindex)) {
        return READ_IT;
    }
    seen.last = HopPoint {
        ifindex,
        netns,
        hook,
        flags: 0,
        _pad: [0; 2],
    };
    seen.found
}

/// Records what the read of the packet found here: the slot is overwritten, so the entry of a
/// packet before it in a recycled skb cannot meet this one.
#[inline(never)]
fn remember(id: u64, hook: u8, ifindex: u32, netns: u32, found: u64) {
    if let Some(slot) = SEEN.get_ptr_mut(slot_hash(id) & (SEEN_SLOTS - 1)) {
        let last = HopPoint {
            ifindex,
            netns,
            hook,
            flags: 0,
            _pad: [0; 2],
        };
        unsafe {
            *slot = Seen {
                skb: id,
                last,
                found,
            }
        };
    }
}

#[inline(always)]
fn push_xmit(skb: u64, found: &Found) {
    let Some(stack) = IN_XMIT.get_ptr_mut(0) else {
        return;
    };
    let stack = unsafe { &mut *stack };
    let d = stack.depth as usize;
    if d < XMIT_DEPTH {
        stack.skbs[d] = skb;
        stack.found[d] = *found;
        stack.depth += 1;
    }
}

/// The tag of `skb` if it is the innermost transmit in progress on this CPU.
#[inline(always)]
fn pop_xmit(skb: u64) -> Option<Found> {
    let stack = unsafe { &mut *IN_XMIT.get_ptr_mut(0)? };
    let d = (stack.depth as usize).checked_sub(1)?;
    if d >= XMIT_DEPTH || stack.skbs[d] != skb {
        return None;
    }
    stack.depth -= 1;
    Some(stack.found[d])
}

#[inline(always)]
fn on_xmit_done<M: KernelMem>(args: *const u64) {
    // The lookup is a few instructions: no need to stamp before it.
    let Some(found) = pop_xmit(unsafe { *args }) else {
        return;
    };
    let ts = unsafe { bpf_ktime_get_ns() };
    // net_dev_xmit(skb, rc, dev, skb_len): the device and length come from the arguments.
    let dev = (unsafe { *args.add(2) }) as *const u8;
    let len = (unsafe { *args.add(3) }) as u32;
    let (ifindex, netns) = skb::dev_identity::<M>(dev);
    emit(HookId::NetDevXmit as u8, &found, ifindex, netns, len, 0, ts);
}

#[inline(always)]
fn on_drop<M: KernelMem>(args: *const u64) {
    let ts = unsafe { bpf_ktime_get_ns() };
    let skb = KernelSkb::<M>::new(unsafe { *args } as *const u8);
    let Some(found) = parse::find_tag(&skb, global(&PORT), global(&RUN_ID)) else {
        return;
    };
    // kfree_skb(skb, location, reason, ...)
    let reason = (unsafe { *args.add(2) }) as u32;
    let (ifindex, netns) = skb::dev_identity::<M>(skb.dev());
    emit(
        HookId::KfreeSkb as u8,
        &found,
        ifindex,
        netns,
        skb.len(),
        reason,
        ts,
    );
}

device_tracepoint!(
    tp_net_dev_queue,
    raw_net_dev_queue,
    "net_dev_queue",
    on_device,
    HookId::NetDevQueue as u8,
    None
);
// net_dev_start_xmit(skb, dev)
device_tracepoint!(
    tp_net_dev_start_xmit,
    raw_net_dev_start_xmit,
    "net_dev_start_xmit",
    on_device,
    HookId::NetDevStartXmit as u8,
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
    HookId::NetifReceiveSkb as u8,
    None
);
device_tracepoint!(
    tp_netif_rx,
    raw_netif_rx,
    "netif_rx",
    on_device,
    HookId::NetifRx as u8,
    None
);
device_tracepoint!(
    tp_napi_gro_receive_entry,
    raw_napi_gro_receive_entry,
    "napi_gro_receive_entry",
    on_device,
    HookId::NapiGroReceiveEntry as u8,
    None
);
device_tracepoint!(tp_kfree_skb, raw_kfree_skb, "kfree_skb", on_drop);

#[inline(always)]
fn on_tc(ctx: &TcContext, hook: HookId) -> i32 {
    let ts = unsafe { bpf_ktime_get_ns() };
    // Two tunnels deep at tc only: the host's VXLAN around a VM's overlay, on the host's
    // underlay devices (their tracepoints see one level: see parse::find_tag).
    let found = parse::find_tag_two_levels(ctx, global(&PORT), global(&RUN_ID));
    // The device's queue comes next in the same call: what this cheap read of the packet
    // found spares that tracepoint's read (through the kernel's pointers) of every packet.
    let egress = hook == HookId::TcEgress;
    if found.is_none() && !egress {
        return TC_ACT_UNSPEC;
    }
    // __sk_buff has no namespace, but the context is the kernel's sk_buff: its device's
    // namespace is read as the tracepoints read it (two ifindexes may be alike in two
    // namespaces, as every pod's eth0 is).
    let skb = ctx.skb.skb as *const u8;
    let (ifindex, netns) = skb::dev_identity::<Probed>(skb::dev::<Probed>(skb));
    if egress {
        let id = Direct::number(skb as u64);
        remember(id, hook as u8, ifindex, netns, pack(&found));
    }
    if let Some(found) = found {
        linearize_headers(ctx);
        emit(hook as u8, &found, ifindex, netns, ctx.len(), 0, ts);
    }
    // TC_ACT_UNSPEC (TCX_NEXT): never decide the packet's fate, let the next program run.
    TC_ACT_UNSPEC
}

/// Below this many linear bytes even the IPv4 header is paged: never so in a packet the
/// stack built, but a packet socket's transmit ring (a userspace datapath such as DPDK's
/// af_packet port) hands the kernel the Ethernet header alone in the linear part.
const PAGED_HEADERS: usize = 14 + 20;
/// Enough for the headers and the tag of a tagged UDP or TCP packet.
const PULL: u32 = 128;

/// The tracepoints after this hook read only the linear part: for a tagged packet whose
/// headers are paged, pull its first bytes into it (a copy of at most PULL bytes, counted in
/// this program's own time, not in a segment).
#[inline(always)]
fn linearize_headers(ctx: &TcContext) {
    if ctx.data_end() - ctx.data() < PAGED_HEADERS {
        let _ = ctx.pull_data(ctx.len().min(PULL));
    }
}

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    on_tc(&ctx, HookId::TcIngress)
}

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    on_tc(&ctx, HookId::TcEgress)
}
