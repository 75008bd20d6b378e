//! Follow mode (`profiler attach`): real, untagged traffic, each packet followed by its data
//! buffer (skb->head) from the first hop in scope, latency kept per segment in the kernel.
//!
//! A journey starts where a packet that passes the filter and the sampling meets a device in
//! scope. Every later hook finds it by its buffer; a buffer reallocated under the same skb
//! (pskb_expand_head: encapsulation headroom, skb_cow) is found through the skb pointer. Buffers
//! are recycled, so each hop checks the packet's fingerprint (IP id, length, TCP seq of the
//! innermost headers: what NAT and encapsulation leave alone) before extending a journey.

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use profiler_common::{
    hist_bucket, path_hash, Filter, FilterTerm, Histogram, HookId, HopEvent, HopPoint, SegmentKey,
    COUNTER_ABANDONED, COUNTER_CONSUMED, COUNTER_DROPPED, COUNTER_LOST, COUNTER_REHEADED,
    COUNTER_STARTED, END_CONSUMED, END_DROPPED, FIELD_ADDR, FIELD_DST_ADDR, FIELD_DST_PORT,
    FIELD_FAMILY, FIELD_PORT, FIELD_PROTO, FIELD_SRC_ADDR, FIELD_SRC_PORT, FILTER_CLAUSES,
    FILTER_TERMS, HIST_BUCKETS,
};

use crate::{
    count, global,
    parse::{self, Flow, Flows},
    skb::{self, KernelMem, KernelSkb},
};

/// Follow one packet in SAMPLE (1: all), chosen by its fingerprint so that every hook agrees.
#[unsafe(no_mangle)]
static SAMPLE: u32 = 1;

/// A hop later than this after the previous one does not extend a journey.
#[unsafe(no_mangle)]
static MAX_GAP_NS: u64 = 1_000_000_000;

/// Whether hops are streamed to HOP_EVENTS (`--mode events`) besides the histograms.
#[unsafe(no_mangle)]
static STREAM: u8 = 0;

#[unsafe(no_mangle)]
static FILTER: Filter = Filter {
    clauses: [profiler_common::FilterClause {
        terms: [FilterTerm {
            field: 0,
            negate: 0,
            prefix: 0,
            family: 0,
            value: 0,
            addr: [0; 16],
        }; FILTER_TERMS],
        len: 0,
    }; FILTER_CLAUSES],
    len: 0,
};

/// Devices where journeys may start, as [netns inode, ifindex].
#[map]
static SCOPE: HashMap<[u32; 2], u8> = HashMap::with_max_entries(1024, 0);

/// Cgroups (v2 ids) whose sockets' packets start journeys; looked at only when BY_CGROUP is set.
#[map]
static CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(64, 0);

#[unsafe(no_mangle)]
static BY_CGROUP: u8 = 0;

/// Whether a packet not yet followed may start a journey here: a device in scope, or sent by a
/// socket of a cgroup in scope.
#[inline(always)]
fn in_scope<M: KernelMem>(netns: u32, ifindex: u32, skb: u64) -> bool {
    if unsafe { SCOPE.get(&[netns, ifindex]) }.is_some() {
        return true;
    }
    global(&BY_CGROUP) != 0
        && unsafe { CGROUPS.get(&skb::cgroup_id::<M>(skb as *const u8)) }.is_some()
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Flight {
    skb: u64,
    first_head: u64,
    first_ts: u64,
    last_ts: u64,
    fingerprint: u64,
    last: HopPoint,
    /// path_hash of every hop so far, `last` included.
    path: u32,
}

/// Journeys in flight by buffer; the loader sizes it (`--max-in-flight`), LRU keeps it bounded.
/// Per-CPU LRU lists: inserting takes no lock shared by all CPUs.
#[map]
static FLIGHTS: LruHashMap<u64, Flight> = LruHashMap::with_max_entries(65536, BPF_F_NO_COMMON_LRU);

/// The buffer each followed skb had last, to find a journey whose buffer was reallocated.
#[map]
static BY_SKB: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, BPF_F_NO_COMMON_LRU);

#[map]
static HISTOGRAMS: PerCpuHashMap<SegmentKey, Histogram> = PerCpuHashMap::with_max_entries(1024, 0);

/// An all-zero histogram to insert from: a Histogram does not fit on the BPF stack.
#[map]
static ZERO: PerCpuArray<Histogram> = PerCpuArray::with_max_entries(1, 0);

#[map]
static HOP_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

#[inline(always)]
fn fingerprint(f: &Flow) -> u64 {
    ((f.seq as u64) << 32) ^ ((f.ip_id as u64) << 16) ^ (f.l4_len as u64) ^ ((f.proto as u64) << 56)
}

#[inline(always)]
fn sampled(fingerprint: u64) -> bool {
    let n = global(&SAMPLE);
    // Fibonacci hashing spreads consecutive IP ids and sequence numbers evenly.
    n <= 1 || (fingerprint.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % n as u64 == 0
}

/// FILTER is read member by member (a copy of a term per clause would not fit on the stack),
/// and volatile: the loader sets it after compilation.
#[inline(always)]
fn addr_in(addr: &[u8; 16], t: &FilterTerm) -> bool {
    let prefix = global(&t.prefix);
    let full = (prefix / 8) as usize;
    let rest = prefix % 8;
    for i in 0..16 {
        let want = global(&t.addr[i]);
        if i < full {
            if addr[i] != want {
                return false;
            }
        } else if i == full && rest != 0 {
            let mask = 0xffu8 << (8 - rest);
            return addr[i] & mask == want & mask;
        }
    }
    true
}

#[inline(always)]
fn term_holds(f: &Flow, t: &FilterTerm) -> bool {
    let value = global(&t.value);
    let family = global(&t.family);
    let addr = |a: &[u8; 16]| f.family == family && addr_in(a, t);
    let port = |p: u16| p as u32 == value && (f.proto == 6 || f.proto == 17);
    let holds = match global(&t.field) {
        FIELD_PROTO => f.proto as u32 == value,
        FIELD_FAMILY => f.family as u32 == value,
        FIELD_SRC_ADDR => addr(&f.saddr),
        FIELD_DST_ADDR => addr(&f.daddr),
        FIELD_ADDR => addr(&f.saddr) || addr(&f.daddr),
        FIELD_SRC_PORT => port(f.sport),
        FIELD_DST_PORT => port(f.dport),
        FIELD_PORT => port(f.sport) || port(f.dport),
        _ => false,
    };
    holds != (global(&t.negate) != 0)
}

// Not inlined: helpers with their own stack frames keep each program under 512 bytes.
#[inline(never)]
fn filter_matches(f: &Flow) -> bool {
    let filter = &FILTER;
    let n = global(&filter.len) as usize;
    if n == 0 {
        return true;
    }
    for c in 0..FILTER_CLAUSES {
        if c >= n {
            break;
        }
        let clause = &filter.clauses[c];
        let terms = global(&clause.len) as usize;
        let mut all = true;
        for t in 0..FILTER_TERMS {
            if t < terms && !term_holds(f, &clause.terms[t]) {
                all = false;
            }
        }
        if all {
            return true;
        }
    }
    false
}

#[inline(never)]
fn record(from: HopPoint, to: HopPoint, path: u32, ns: u64) {
    let key = SegmentKey { from, to, path };
    let mut h = HISTOGRAMS.get_ptr_mut(&key);
    if h.is_none() {
        let Some(zero) = ZERO.get_ptr(0) else { return };
        let _ = HISTOGRAMS.insert(&key, unsafe { &*zero }, BPF_NOEXIST as u64);
        h = HISTOGRAMS.get_ptr_mut(&key);
    }
    let Some(h) = h else {
        // The histogram map is full: the segment's sample is lost, and counted.
        count(COUNTER_LOST);
        return;
    };
    let h = unsafe { &mut *h };
    h.count += 1;
    h.sum_ns += ns;
    // The volatile read keeps the mask that proves the index in bounds to the verifier.
    let i = unsafe { core::ptr::read_volatile(&hist_bucket(ns)) } & (HIST_BUCKETS - 1);
    h.buckets[i] += 1;
}

/// `ending`: the END_* value in the high 32 bits, the drop reason in the low ones (BPF
/// functions take five arguments at most).
#[inline(never)]
fn stream(f: &Flight, ts_ns: u64, point: &HopPoint, len: u32, ending: u64) {
    if global(&STREAM) == 0 {
        return;
    }
    // Written in place in the ring: no copy on the stack.
    let Some(mut slot) = HOP_EVENTS.reserve::<HopEvent>(0) else {
        count(COUNTER_LOST);
        return;
    };
    slot.write(HopEvent {
        ts_ns,
        journey_head: f.first_head,
        journey_start_ns: f.first_ts,
        point: *point,
        len,
        drop_reason: ending as u32,
        end: (ending >> 32) as u8,
        _pad: [0; 7],
    });
    slot.submit(BPF_RB_NO_WAKEUP as u64);
}

/// The parsed headers, per CPU: two sets of addresses do not fit on the stack beside the rest.
#[map]
static FLOWS: PerCpuArray<Flows> = PerCpuArray::with_max_entries(1, 0);

#[inline(never)]
fn parse_flows<M: KernelMem>(skb: &KernelSkb<M>) -> Option<&'static Flows> {
    let out = unsafe { &mut *FLOWS.get_ptr_mut(0)? };
    parse::flows(skb, out)?;
    Some(out)
}

/// The journey of this skb, by its buffer or, if the buffer was reallocated, by the skb; and
/// the buffer it is keyed by. Null when there is none (an Option of the pair would leave bytes
/// uninitialised, which the verifier refuses to copy).
#[inline(always)]
fn flight_of(head: u64, skb: u64) -> (*mut Flight, u64) {
    if let Some(f) = FLIGHTS.get_ptr_mut(&head) {
        return (f, head);
    }
    match unsafe { BY_SKB.get(&skb) } {
        Some(&old) => (
            FLIGHTS.get_ptr_mut(&old).unwrap_or(core::ptr::null_mut()),
            old,
        ),
        None => (core::ptr::null_mut(), 0),
    }
}

/// A device hook in follow mode; `dev_arg` as in `on_device`.
#[inline(always)]
pub fn on_hop<M: KernelMem>(args: *const u64, hook: u8, dev_arg: Option<usize>) {
    let ts = unsafe { bpf_ktime_get_ns() };
    let skb_ptr = unsafe { *args };
    let head = skb::head::<M>(skb_ptr as *const u8);
    let (flight, key) = flight_of(head, skb_ptr);
    let (ifindex, netns) = skb::dev_identity::<M>(crate::hook_device::<M>(args, dev_arg));
    if flight.is_null() && !in_scope::<M>(netns, ifindex, skb_ptr) {
        return;
    }
    if !flight.is_null() && key == head {
        let f = unsafe { &mut *flight };
        if continues(f, skb_ptr, hook, ifindex, netns, ts) {
            // The encapsulation does not change between these stages.
            let point = HopPoint {
                ifindex,
                netns,
                hook,
                flags: f.last.flags,
                _pad: [0; 2],
            };
            extend(f, point, ts, skb_ptr, skb::len::<M>(skb_ptr as *const u8));
            f.last_ts = unsafe { bpf_ktime_get_ns() };
            return;
        }
    }
    let skb = KernelSkb::<M>::new(skb_ptr as *const u8);
    let Some(flows) = parse_flows(&skb) else {
        return;
    };
    let fp = fingerprint(flows.innermost());
    let point = HopPoint {
        ifindex,
        netns,
        hook,
        flags: flows.flags,
        _pad: [0; 2],
    };
    if !flight.is_null() {
        let f = unsafe { &mut *flight };
        if f.fingerprint == fp && ts.wrapping_sub(f.last_ts) < global(&MAX_GAP_NS) {
            extend(f, point, ts, skb_ptr, skb.len());
            if key != head {
                let _ = FLIGHTS.insert(&head, f, 0);
                let _ = FLIGHTS.remove(&key);
                let _ = BY_SKB.insert(&skb_ptr, &head, 0);
                count(COUNTER_REHEADED);
                restamp(head);
            } else {
                f.last_ts = unsafe { bpf_ktime_get_ns() };
            }
            return;
        }
        // The buffer carries another packet now: the journey ended where no hook saw it.
        let _ = FLIGHTS.remove(&key);
        count(COUNTER_ABANDONED);
        if !in_scope::<M>(netns, ifindex, skb_ptr) {
            return;
        }
    }
    let matches = filter_matches(&flows.outer) || (flows.has_inner && filter_matches(&flows.inner));
    if !matches || !sampled(fp) {
        return;
    }
    let f = Flight {
        skb: skb_ptr,
        first_head: head,
        first_ts: ts,
        last_ts: ts,
        fingerprint: fp,
        last: point,
        path: path_hash(0, &point),
    };
    if FLIGHTS.insert(&head, &f, 0).is_ok() {
        let _ = BY_SKB.insert(&skb_ptr, &head, 0);
        count(COUNTER_STARTED);
        stream(&f, ts, &point, skb.len(), 0);
        restamp(head);
    }
}

/// The next segment starts when this program is done: its own cost (more where a journey
/// starts: two map inserts) belongs to no segment of the datapath.
#[inline(always)]
fn restamp(head: u64) {
    if let Some(f) = FLIGHTS.get_ptr_mut(&head) {
        unsafe { (*f).last_ts = bpf_ktime_get_ns() };
    }
}

/// The next stage for the same skb and buffer where no other packet can begin: from a device's
/// queue to its driver, from a driver to the backlog of its veth peer (inside the same xmit
/// call), from the backlog or GRO to the receive. A packet dropped in between ends its journey at
/// kfree_skb, so the packet is not read again there.
#[inline(always)]
fn continues(f: &Flight, skb: u64, hook: u8, ifindex: u32, netns: u32, ts: u64) -> bool {
    next_stage(&f.last, f.skb, skb, hook, ifindex, netns)
        && ts.wrapping_sub(f.last_ts) < global(&MAX_GAP_NS)
}

/// The next stage of the same skb where no other packet can begin (the rule `continues`
/// applies to a followed journey): from tc egress to the device's queue, from the queue to its driver, from a driver to the
/// backlog of its veth peer, from the backlog or GRO to the receive. Tagged mode uses it to
/// skip reading again a packet it read without a tag.
#[inline(always)]
pub(crate) fn next_stage(
    last: &HopPoint,
    last_skb: u64,
    skb: u64,
    hook: u8,
    ifindex: u32,
    netns: u32,
) -> bool {
    let same_device = last.ifindex == ifindex && last.netns == netns;
    let is = |h: HookId| hook == h as u8;
    let was = |h: HookId| last.hook == h as u8;
    let next = if is(HookId::NetDevQueue) {
        // Only tagged runs see tc egress, which runs in the same dev_queue_xmit call.
        same_device && was(HookId::TcEgress)
    } else if is(HookId::NetDevStartXmit) {
        same_device && was(HookId::NetDevQueue)
    } else if is(HookId::NetifRx) {
        was(HookId::NetDevStartXmit)
    } else if is(HookId::NetifReceiveSkb) {
        same_device && (was(HookId::NetifRx) || was(HookId::NapiGroReceiveEntry))
    } else {
        false
    };
    next && last_skb == skb
}

/// Adds the segment from the journey's last hop to `point`.
#[inline(always)]
fn extend(f: &mut Flight, point: HopPoint, ts: u64, skb: u64, len: u32) {
    record(f.last, point, f.path, ts - f.last_ts);
    f.path = path_hash(f.path, &point);
    f.last = point;
    f.last_ts = ts;
    // The skb that carries the packet now (a clone, after a copy) is the one whose free ends
    // the journey.
    f.skb = skb;
    stream(f, ts, &point, len, 0);
}

/// Where a buffer is freed: consume_skb (after use) or kfree_skb (a drop, `reason_arg`).
#[inline(always)]
pub fn on_free<M: KernelMem>(args: *const u64, reason_arg: Option<usize>) {
    let skb_ptr = unsafe { *args };
    let head = skb::head::<M>(skb_ptr as *const u8);
    // Every buffer the node frees comes here: one nobody follows costs a lookup, no clock read.
    let Some(f) = FLIGHTS.get_ptr_mut(&head) else {
        return;
    };
    let f = unsafe { *f };
    // A clone may share the buffer with a packet still on its way: only its own skb ends it.
    if f.skb != skb_ptr {
        return;
    }
    let ts = unsafe { bpf_ktime_get_ns() };
    if ts.wrapping_sub(f.last_ts) >= global(&MAX_GAP_NS) {
        return;
    }
    let (end, counter, reason) = match reason_arg {
        Some(i) => (
            END_DROPPED,
            COUNTER_DROPPED,
            (unsafe { *args.add(i) }) as u32,
        ),
        None => (END_CONSUMED, COUNTER_CONSUMED, 0),
    };
    let point = HopPoint {
        hook: if reason_arg.is_some() {
            HookId::KfreeSkb
        } else {
            HookId::ConsumeSkb
        } as u8,
        ..f.last
    };
    stream(&f, ts, &point, 0, (end as u64) << 32 | reason as u64);
    let _ = FLIGHTS.remove(&head);
    let _ = BY_SKB.remove(&skb_ptr);
    count(counter);
}
