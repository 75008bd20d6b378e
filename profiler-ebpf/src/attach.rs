//! Attach mode (`profiler attach`): real, untagged traffic, each packet followed by its data
//! buffer (skb->head) from the first hop in scope, latency kept per segment in the kernel.
//!
//! A journey starts where a packet that passes the filter and the sampling meets a device in
//! scope. Every later hook finds it by its buffer; a buffer reallocated under the same skb
//! (pskb_expand_head: encapsulation headroom, skb_cow) is found through the skb pointer. Buffers
//! are recycled, so each hop checks the packet's fingerprint (IP id, length, TCP seq of the
//! innermost headers: what NAT and encapsulation leave alone) before extending a journey.

use aya_ebpf::{
    bindings::{BPF_RB_NO_WAKEUP, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, classifier, map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext, TcContext},
    EbpfContext,
};
use profiler_common::{
    device_key, hist_bucket, path_hash, segment_slot, slot_hash, DropKey, Filter, FilterTerm,
    Histogram, HookId, HopEvent, HopPoint, SegmentKey, SightingEvent, WireFlow, COUNTER_ABANDONED,
    COUNTER_CONSUMED, COUNTER_DROPPED, COUNTER_GROUP, COUNTER_LOST, COUNTER_REHEADED,
    COUNTER_STARTED, DROP_KEYS, END_CONSUMED, END_DROPPED, FIELD_ADDR, FIELD_DST_ADDR,
    FIELD_DST_PORT, FIELD_FAMILY, FIELD_PORT, FIELD_PROTO, FIELD_SRC_ADDR, FIELD_SRC_PORT,
    FILTER_CLAUSES, FILTER_TERMS, HIST_BUCKETS, HIST_PROBES, HIST_SLOTS, SCOPE_PROBES, SCOPE_SLOTS,
    WIRE_ENTERING, WIRE_LEAVING,
};

use crate::{
    count, device_tracepoint, global,
    parse::{self, Flow, Flows, Packet as _},
    skb::{self, Direct, KernelMem, KernelSkb, Probed},
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

/// Devices where journeys may start, by `device_key`, direct-mapped with linear probing (the
/// loader places each within SCOPE_PROBES slots of its hash): an array lookup is inlined by the
/// verifier, where a hash map lookup is a helper call paid by every packet of the node.
#[map]
static SCOPE: Array<u64> = Array::with_max_entries(SCOPE_SLOTS, 0);

/// Cgroups (v2 ids) whose sockets' packets start journeys; looked at only when BY_CGROUP is set.
#[map]
static CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(64, 0);

/// Journeys ended in a drop, by last hop and reason: what the kernel says of why.
#[map]
static DROPS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::with_max_entries(DROP_KEYS, 0);

#[unsafe(no_mangle)]
static BY_CGROUP: u8 = 0;

/// Wire-facing devices (`attach --wire`), laid out as SCOPE: where a followed packet leaves the
/// node or enters it, reported to WIRE_EVENTS with what it carries on the wire.
#[map]
static WIRE: Array<u64> = Array::with_max_entries(SCOPE_SLOTS, 0);

/// Whether WIRE holds any device: without, no hop looks it up.
#[unsafe(no_mangle)]
static WIRE_ON: u8 = 0;

#[map]
static WIRE_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 21, 0);

#[inline(always)]
fn device_in_scope(key: u64) -> bool {
    in_table(&SCOPE, key)
}

#[inline(always)]
fn in_table(table: &Array<u64>, key: u64) -> bool {
    let first = slot_hash(key);
    for i in 0..SCOPE_PROBES {
        match table.get((first + i) & (SCOPE_SLOTS - 1)) {
            Some(&k) if k == key => return true,
            Some(&0) | None => return false,
            Some(_) => {}
        }
    }
    false
}

/// Whether a packet not yet followed may start a journey here: a device in scope, or sent by a
/// socket of a cgroup in scope.
#[inline(always)]
fn in_scope<M: KernelMem>(dev: u64, skb: u64) -> bool {
    device_in_scope(dev)
        || global(&BY_CGROUP) != 0
            && unsafe { CGROUPS.get(&skb::cgroup_id::<M>(skb as *const u8)) }.is_some()
}

/// A slot's state: empty, a journey followed, or a packet seen and not followed (filtered out
/// or not sampled), so that its later hops need not read it again.
const EMPTY: u8 = 0;
const FOLLOWED: u8 = 1;
const PASSED: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Flight {
    /// The buffer the slot is for (its key).
    head: u64,
    skb: u64,
    first_head: u64,
    first_ts: u64,
    last_ts: u64,
    fingerprint: u64,
    /// The last hop; for a PASSED packet, the hop where it was passed over.
    last: HopPoint,
    /// path_hash of every hop so far, `last` included.
    path: u32,
    state: u8,
    _pad: [u8; 3],
}

/// Journeys in flight, direct-mapped by buffer: slot_hash(head) masked to the table's size (a
/// power of two, `--max-in-flight`), checked against the stored head. Array lookups are inlined
/// by the verifier; a collision replaces the older journey and counts it (COUNTER_ABANDONED).
#[map]
static FLIGHTS: Array<Flight> = Array::with_max_entries(65536, 0);

/// Where the journey of a skb whose buffer was reallocated is: [skb, its journey's head],
/// direct-mapped by skb.
#[map]
static BY_SKB: Array<[u64; 2]> = Array::with_max_entries(65536, 0);

/// FLIGHTS' and BY_SKB's size minus one, set by the loader.
#[unsafe(no_mangle)]
static FLIGHT_MASK: u32 = 65535;

#[inline(always)]
fn slot<T>(map: &Array<T>, key: u64) -> Option<*mut T> {
    map.get_ptr_mut(slot_hash(key) & global(&FLIGHT_MASK))
}

/// Two tables of HIST_SLOTS: the programs fill the one HIST_EPOCH's low bit names, while
/// userspace drains the other into its own totals and empties it (after a grace period, so no
/// program still writes there): a segment nobody crosses any more gives its slot back.
#[map]
static HISTOGRAMS: PerCpuArray<Histogram> = PerCpuArray::with_max_entries(2 * HIST_SLOTS, 0);

#[map]
static HIST_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// Which of HISTOGRAMS' slots a CPU has claimed since the table was last drained: userspace
/// reads only those, so draining costs the segments crossed, not slots times CPUs.
#[map]
static HIST_USED: Array<u32> = Array::with_max_entries(2 * HIST_SLOTS, 0);

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
    n <= 1 || slot_hash(fingerprint) % n == 0
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
    let first = segment_slot(&key);
    let table = HIST_EPOCH.get(0).map_or(0, |e| *e & 1) * HIST_SLOTS;
    for i in 0..HIST_PROBES {
        let index = table + ((first + i) & (HIST_SLOTS - 1));
        let Some(h) = HISTOGRAMS.get_ptr_mut(index) else {
            break;
        };
        let h = unsafe { &mut *h };
        if h.count == 0 {
            h.key = key;
            if let Some(used) = HIST_USED.get_ptr_mut(index) {
                unsafe { *used = 1 };
            }
        }
        if h.key == key {
            h.count += 1;
            h.sum_ns += ns;
            // The volatile read keeps the mask that proves the index in bounds to the verifier.
            let i = unsafe { core::ptr::read_volatile(&hist_bucket(ns)) } & (HIST_BUCKETS - 1);
            h.buckets[i] += 1;
            return;
        }
    }
    // The segment's slots are taken by others: its sample is lost, and counted.
    count(COUNTER_LOST);
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

/// The slot of this skb's buffer if it holds an entry for it, or, if the buffer was
/// reallocated, the slot of the journey found through the skb; and the head that slot is for.
/// Null when there is none (an Option of the pair would leave bytes uninitialised, which the
/// verifier refuses to copy).
#[inline(always)]
fn flight_of(head: u64, skb: u64) -> (*mut Flight, u64) {
    if let Some(f) = slot(&FLIGHTS, head) {
        if unsafe { (*f).head } == head && unsafe { (*f).state } != EMPTY {
            return (f, head);
        }
    }
    let Some(by) = slot(&BY_SKB, skb) else {
        return (core::ptr::null_mut(), 0);
    };
    let [s, old] = unsafe { *by };
    if s != skb || old == 0 {
        return (core::ptr::null_mut(), 0);
    }
    match slot(&FLIGHTS, old) {
        Some(f) if unsafe { (*f).head == old && (*f).state == FOLLOWED } => (f, old),
        _ => (core::ptr::null_mut(), 0),
    }
}

/// The packet of a hook: its skb, buffer, skb number and device key.
#[inline(always)]
fn hop_packet<M: KernelMem>(args: *const u64, dev_arg: Option<usize>) -> (u64, u64, u64, u64) {
    let skb_ptr = unsafe { *args };
    let head = skb::head::<M>(skb_ptr as *const u8);
    let (ifindex, netns) = skb::dev_identity::<M>(crate::hook_device::<M>(args, dev_arg));
    (
        skb_ptr,
        head,
        M::number(skb_ptr),
        device_key(netns, ifindex),
    )
}

/// A device hook in attach mode, the cheap half (its own program); `dev_arg` as in
/// `on_device`. A packet nobody follows costs a few loads and inlined array lookups: no helper
/// call, no clock read, no packet read. True when the packet must be read to decide: the
/// caller then tail-calls its hook's decision program (`on_undecided`), so that the verifier
/// checks the packet parse in a program of its own, not behind every branch of this one (6.1
/// under TCG did not finish verifying the two in one program).
#[inline(always)]
pub fn on_hop<M: KernelMem>(args: *const u64, hook: u8, dev_arg: Option<usize>) -> bool {
    let (skb_ptr, head, skb_id, dev) = hop_packet::<M>(args, dev_arg);
    !settled(head, skb_id, dev, hook, skb::len::<M>(skb_ptr as *const u8))
}

/// The decision program of a hook, tail-called by its `on_hop` program with the same
/// arguments: the packet read at the first hop in scope (or to check a journey's buffer).
/// Nothing computed before the read is kept across it (the packet's identity is read again
/// after): every value that may differ by branch (a failed read's 0, a scope test) would make
/// the verifier walk the parse once more per combination (6.1 under TCG took minutes each).
#[inline(always)]
pub fn on_undecided<M: KernelMem>(args: *const u64, hook: u8, dev_arg: Option<usize>) {
    if !worth_reading::<M>(args, dev_arg) {
        return;
    }
    // A followed packet's segment ends before the read.
    let ts = unsafe { bpf_ktime_get_ns() };
    let skb = KernelSkb::<M>::new(unsafe { *args } as *const u8);
    if !skb.readable() {
        return;
    }
    let Some(flows) = parse_flows(&skb) else {
        return;
    };
    let (skb_ptr, head, skb_id, dev) = hop_packet::<M>(args, dev_arg);
    let hop = Hop {
        ts,
        skb_ptr,
        head,
        skb_id,
        dev,
        len: skb::len::<M>(skb_ptr as *const u8),
        hook,
    };
    // Here, not in `decide`: its frame, the filter's and the filter's callee's would pass the
    // 512 bytes a chain of calls may take (6.18: 104 + 184 + 328 + 24).
    // The group bit of the destination MAC: multicast and broadcast frames start no journey.
    let group = skb.read::<1>(0).is_some_and(|b| b[0] & 1 == 1);
    if group {
        count(COUNTER_GROUP);
    }
    let wanted = !group
        && (filter_matches(&flows.outer) || (flows.has_inner && filter_matches(&flows.inner)));
    decide::<M>(flows, &hop, wanted);
}

/// A hop being decided, passed by reference: BPF functions take five arguments at most.
struct Hop {
    ts: u64,
    skb_ptr: u64,
    head: u64,
    skb_id: u64,
    dev: u64,
    len: u32,
    hook: u8,
}

/// Whether the packet is on a journey or may start one here.
#[inline(always)]
fn worth_reading<M: KernelMem>(args: *const u64, dev_arg: Option<usize>) -> bool {
    let (skb_ptr, head, skb_id, dev) = hop_packet::<M>(args, dev_arg);
    followed(head, skb_id) || in_scope::<M>(dev, skb_ptr)
}

/// The hop of a packet whose fate is known without reading it: the next stage of a journey
/// (extended) or of a packet passed over, or a packet on no journey at a device out of scope.
/// False when the packet must be read.
#[inline(always)]
fn settled(head: u64, skb: u64, dev: u64, hook: u8, len: u32) -> bool {
    let here = point(dev, hook, 0);
    let Some(f) = slot(&FLIGHTS, head) else {
        return false;
    };
    let f = unsafe { &mut *f };
    if f.head != head || f.state == EMPTY {
        // On no journey, unless its buffer was reallocated under a followed skb.
        return !device_in_scope(dev) && global(&BY_CGROUP) == 0 && !rehomed(skb);
    }
    let next = next_stage(&f.last, f.skb, skb, hook, dev);
    if f.state == PASSED {
        if f.skb == skb && (next || !device_in_scope(dev)) {
            // Kept along devices out of scope too, so the next in scope may be its next stage.
            f.last = here;
            return true;
        }
        return !device_in_scope(dev) && global(&BY_CGROUP) == 0;
    }
    let ts = unsafe { bpf_ktime_get_ns() };
    if !next || ts.wrapping_sub(f.last_ts) >= global(&MAX_GAP_NS) {
        return false;
    }
    if crossing(Some(&f.last), dev, hook) != 0 {
        // Its wire identity must be read.
        return false;
    }
    // The encapsulation does not change between these stages.
    extend(f, point(dev, hook, f.last.flags), ts, skb, len);
    f.last_ts = unsafe { bpf_ktime_get_ns() };
    true
}

/// Whether this skb's packet is on a journey.
#[inline(always)]
fn followed(head: u64, skb: u64) -> bool {
    let (f, _) = flight_of(head, skb);
    !f.is_null() && unsafe { (*f).state } == FOLLOWED
}

/// Whether a followed journey's buffer was reallocated under this skb.
#[inline(always)]
fn rehomed(skb: u64) -> bool {
    slot(&BY_SKB, skb).is_some_and(|by| unsafe { (*by)[0] == skb && (*by)[1] != 0 })
}

#[inline(always)]
fn point(dev: u64, hook: u8, flags: u8) -> HopPoint {
    HopPoint {
        ifindex: dev as u32,
        netns: (dev >> 32) as u32,
        hook,
        flags,
        _pad: [0; 2],
    }
}

/// The packet read: a followed journey checked against its fingerprint (and moved to a new
/// buffer), or a journey started or the packet passed over, as the filter (`wanted`) and
/// sampling say. Not
/// inlined: its frame (two journeys) beside the caller's and the parse's would pass the 512
/// bytes 6.1 allows a chain of calls (the kprobe's registers take room in the caller).
#[inline(never)]
fn decide<M: KernelMem>(flows: &Flows, hop: &Hop, wanted: bool) {
    let &Hop {
        ts,
        skb_ptr,
        head,
        skb_id,
        dev,
        len,
        hook,
    } = hop;
    let (flight, key) = flight_of(head, skb_id);
    let followed = !flight.is_null() && unsafe { (*flight).state } == FOLLOWED;
    let fp = fingerprint(flows.innermost());
    let here = point(dev, hook, flows.flags);
    if followed {
        let f = unsafe { &mut *flight };
        if f.fingerprint == fp && ts.wrapping_sub(f.last_ts) < global(&MAX_GAP_NS) {
            let crossing = crossing(Some(&f.last), dev, hook);
            extend(f, here, ts, skb_id, len);
            if crossing != 0 {
                sight::<M>(flows, f, skb_ptr, crossing);
            }
            if key != head {
                let mut moved = *f;
                moved.head = head;
                f.state = EMPTY;
                start(&moved, skb_id);
                count(COUNTER_REHEADED);
            } else {
                f.last_ts = unsafe { bpf_ktime_get_ns() };
            }
            return;
        }
        // The buffer carries another packet now: the journey ended where no hook saw it.
        f.state = EMPTY;
        count(COUNTER_ABANDONED);
        if !in_scope::<M>(dev, skb_ptr) {
            return;
        }
    }
    let follow = wanted && sampled(fp);
    let ts = if follow {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let f = Flight {
        head,
        skb: skb_id,
        first_head: head,
        first_ts: ts,
        last_ts: ts,
        fingerprint: fp,
        last: here,
        path: path_hash(0, &here),
        state: if follow { FOLLOWED } else { PASSED },
        _pad: [0; 3],
    };
    if start(&f, skb_id) && follow {
        count(COUNTER_STARTED);
        stream(&f, ts, &here, len, 0);
        let crossing = crossing(None, dev, hook);
        if crossing != 0 {
            sight::<M>(flows, &f, skb_ptr, crossing);
        }
    }
}

/// Whether a followed packet crosses the wire at this hop, after `last` (None: its first):
/// WIRE_LEAVING at a wire-facing device's transmit, WIRE_ENTERING at its first receive hook
/// (the later ones on the same device are the same arrival); 0 elsewhere.
#[inline(always)]
fn crossing(last: Option<&HopPoint>, dev: u64, hook: u8) -> u8 {
    if global(&WIRE_ON) == 0 {
        return 0;
    }
    let is = |h: HookId| hook == h as u8;
    let direction = if is(HookId::NetDevStartXmit) {
        WIRE_LEAVING
    } else if is(HookId::NapiGroReceiveEntry) || is(HookId::NetifRx) || is(HookId::NetifReceiveSkb)
    {
        match last {
            Some(l) if device_key(l.netns, l.ifindex) == dev => return 0,
            _ => WIRE_ENTERING,
        }
    } else {
        return 0;
    };
    if in_table(&WIRE, dev) {
        direction
    } else {
        0
    }
}

/// Reports a followed packet crossing the wire at its last hop, with what it carries on the
/// wire. A packet leaving is stamped when the work here is done, one entering when it was met,
/// as segments are: the crossing holds none of the profiler's own time at its ends. Not
/// inlined: its frame beside decide's stays within the 512 bytes of a chain.
#[inline(never)]
fn sight<M: KernelMem>(flows: &Flows, f: &Flight, skb_ptr: u64, direction: u8) {
    let Some(mut slot) = WIRE_EVENTS.reserve::<SightingEvent>(0) else {
        count(COUNTER_LOST);
        return;
    };
    let inner = flows.innermost();
    let payload = parse::payload_hash(&KernelSkb::<M>::new(skb_ptr as *const u8), inner);
    let ts_ns = if direction == WIRE_LEAVING {
        unsafe { bpf_ktime_get_ns() }
    } else {
        f.last_ts
    };
    slot.write(SightingEvent {
        ts_ns,
        journey_head: f.first_head,
        journey_start_ns: f.first_ts,
        point: f.last,
        outer: parse::wire_flow(&flows.outer),
        inner: if flows.has_inner {
            parse::wire_flow(&flows.inner)
        } else {
            WireFlow::default()
        },
        tcp_seq: inner.seq,
        payload,
        direction,
        has_inner: flows.has_inner as u8,
        _pad: [0; 6],
    });
    slot.submit(BPF_RB_NO_WAKEUP as u64);
}

/// Puts `f` in its buffer's slot (a journey there before it ends unseen, and is counted), with
/// the way back from its skb for a followed one; the next segment starts when this program is
/// done: its own cost belongs to no segment of the datapath.
#[inline(never)]
fn start(f: &Flight, skb: u64) -> bool {
    let Some(at) = slot(&FLIGHTS, f.head) else {
        return false;
    };
    let at = unsafe { &mut *at };
    if at.state == FOLLOWED && at.head != f.head {
        count(COUNTER_ABANDONED);
    }
    *at = *f;
    if f.state == FOLLOWED {
        if let Some(by) = slot(&BY_SKB, skb) {
            unsafe { *by = [skb, f.head] };
        }
        at.last_ts = unsafe { bpf_ktime_get_ns() };
    }
    true
}

/// The next stage of the same skb where no other packet can begin (followed journeys and
/// packets passed over trust it instead of reading the packet again): from tc egress to the
/// device's queue (tagged runs only), from a device's queue to its driver, from a driver to the
/// backlog of its veth peer (inside the same xmit call), from the backlog or GRO to the
/// receive, from a receive to a tc ingress (attach's only where a peer redirect delivers); and
/// across a NAT, between the tagged programs around it (PRE_ROUTING's before and
/// after, from there to POST_ROUTING's before when the bridge forwards it straight on, and
/// POST_ROUTING's before and after). The NAT rewrites addresses and ports, which a TCP tag is
/// remembered by, not the payload. A packet dropped in between ends at kfree_skb.
#[inline(always)]
pub(crate) fn next_stage(last: &HopPoint, last_skb: u64, skb: u64, hook: u8, dev: u64) -> bool {
    let same_device = device_key(last.netns, last.ifindex) == dev;
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
    } else if is(HookId::TcIngress) {
        // A device's receive to its tc ingress, or to its veth peer's after a peer redirect
        // (the receive goes round again with the new device).
        was(HookId::NetifReceiveSkb)
    } else if is(HookId::NfPreNatAfter) {
        same_device && was(HookId::NfPreNatBefore)
    } else if is(HookId::NfPostNatBefore) {
        was(HookId::NfPreNatAfter)
    } else if is(HookId::NfPostNatAfter) {
        same_device && was(HookId::NfPostNatBefore)
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

/// Where a buffer is freed: consume_skb (after use) or kfree_skb (a drop, `reason_arg`). This
/// runs for every buffer the node frees, so a buffer nobody follows costs one inlined lookup.
#[inline(always)]
pub fn on_free<M: KernelMem>(args: *const u64, reason_arg: Option<usize>) {
    let skb_ptr = unsafe { *args };
    let head = skb::head::<M>(skb_ptr as *const u8);
    let skb_id = M::number(skb_ptr);
    let Some(at) = slot(&FLIGHTS, head) else {
        return;
    };
    let at = unsafe { &mut *at };
    // A clone may share the buffer with a packet still on its way: only its own skb ends it.
    if at.head != head || at.skb != skb_id || at.state == EMPTY {
        return;
    }
    if at.state == PASSED {
        at.state = EMPTY;
        return;
    }
    let ts = unsafe { bpf_ktime_get_ns() };
    let f = *at;
    at.state = EMPTY;
    forget_skb(skb_id, head);
    if ts.wrapping_sub(f.last_ts) >= global(&MAX_GAP_NS) {
        count(COUNTER_ABANDONED);
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
    count(counter);
    if reason_arg.is_some() {
        let (ethertype, ip_proto) = skb::protocols::<M>(skb_ptr as *const u8);
        count_drop(&DropKey {
            last: f.last,
            reason,
            ethertype,
            ip_proto,
            _pad: 0,
        });
    }
}

/// Takes back the way from a freed skb to its journey: the skb's memory is soon another
/// packet's, and the buffer's slot another journey's, which that packet must not be taken for
/// (it would end it, or move it, and its drop would go uncounted).
#[inline(always)]
fn forget_skb(skb: u64, head: u64) {
    if let Some(by) = slot(&BY_SKB, skb) {
        let by = unsafe { &mut *by };
        if by[0] == skb && by[1] == head {
            by[1] = 0;
        }
    }
}

#[inline(always)]
fn count_drop(key: &DropKey) {
    match DROPS.get_ptr_mut(key) {
        Some(n) => unsafe { *n += 1 },
        // A full map keeps the drop in COUNTER_DROPPED only.
        None => {
            let _ = DROPS.insert(key, &1, 0);
        }
    }
}

/// Attach mode's device tracepoints: for each, a cheap program (`on_hop`, attached) that
/// tail-calls a decision program of the same hook (`on_undecided`, in slot 0 of its own program
/// array, filled by the loader) for a packet it must read. Tail calls between tracing programs
/// need the same program type and, for tp_btf, the same attach target: one array per program.
macro_rules! follow_tracepoint {
    ($btf:ident, $raw:ident, $dbtf:ident, $draw:ident, $mbtf:ident, $mraw:ident,
     $tp:literal, $hook:expr, $dev:expr) => {
        #[map]
        static $mbtf: ProgramArray = ProgramArray::with_max_entries(1, 0);
        #[map]
        static $mraw: ProgramArray = ProgramArray::with_max_entries(1, 0);

        #[btf_tracepoint(function = $tp)]
        pub fn $btf(ctx: BtfTracePointContext) -> i32 {
            if on_hop::<Direct>(ctx.as_ptr() as *const u64, $hook, $dev) {
                decide_in(&$mbtf, &ctx);
            }
            0
        }

        #[btf_tracepoint(function = $tp)]
        pub fn $dbtf(ctx: BtfTracePointContext) -> i32 {
            on_undecided::<Direct>(ctx.as_ptr() as *const u64, $hook, $dev);
            0
        }

        #[raw_tracepoint(tracepoint = $tp)]
        pub fn $raw(ctx: RawTracePointContext) -> i32 {
            if on_hop::<Probed>(ctx.as_ptr() as *const u64, $hook, $dev) {
                decide_in(&$mraw, &ctx);
            }
            0
        }

        #[raw_tracepoint(tracepoint = $tp)]
        pub fn $draw(ctx: RawTracePointContext) -> i32 {
            on_undecided::<Probed>(ctx.as_ptr() as *const u64, $hook, $dev);
            0
        }
    };
}

/// Tail-calls the decision program in `deciders`; returns only if it could not (an empty slot),
/// and the hop is then lost, and counted.
#[inline(always)]
pub(crate) fn decide_in<C: EbpfContext>(deciders: &ProgramArray, ctx: &C) {
    unsafe { deciders.tail_call(ctx, 0) };
    count(COUNTER_LOST);
}

// Attach mode: the same tracepoints for untagged traffic, and the frees that end a journey.
// net_dev_xmit is left out: it is the return of a transmit, not packet movement.
follow_tracepoint!(
    ftp_net_dev_queue,
    fraw_net_dev_queue,
    dtp_net_dev_queue,
    draw_net_dev_queue,
    DTP_NET_DEV_QUEUE,
    DRAW_NET_DEV_QUEUE,
    "net_dev_queue",
    HookId::NetDevQueue as u8,
    None
);
follow_tracepoint!(
    ftp_net_dev_start_xmit,
    fraw_net_dev_start_xmit,
    dtp_net_dev_start_xmit,
    draw_net_dev_start_xmit,
    DTP_NET_DEV_START_XMIT,
    DRAW_NET_DEV_START_XMIT,
    "net_dev_start_xmit",
    HookId::NetDevStartXmit as u8,
    Some(1)
);
follow_tracepoint!(
    ftp_netif_receive_skb,
    fraw_netif_receive_skb,
    dtp_netif_receive_skb,
    draw_netif_receive_skb,
    DTP_NETIF_RECEIVE_SKB,
    DRAW_NETIF_RECEIVE_SKB,
    "netif_receive_skb",
    HookId::NetifReceiveSkb as u8,
    None
);
follow_tracepoint!(
    ftp_netif_rx,
    fraw_netif_rx,
    dtp_netif_rx,
    draw_netif_rx,
    DTP_NETIF_RX,
    DRAW_NETIF_RX,
    "netif_rx",
    HookId::NetifRx as u8,
    None
);
follow_tracepoint!(
    ftp_napi_gro_receive_entry,
    fraw_napi_gro_receive_entry,
    dtp_napi_gro_receive_entry,
    draw_napi_gro_receive_entry,
    DTP_NAPI_GRO_RECEIVE_ENTRY,
    DRAW_NAPI_GRO_RECEIVE_ENTRY,
    "napi_gro_receive_entry",
    HookId::NapiGroReceiveEntry as u8,
    None
);
// kfree_skb(skb, location, reason), consume_skb(skb, location)
device_tracepoint!(ftp_kfree_skb, fraw_kfree_skb, "kfree_skb", on_free, Some(2));
device_tracepoint!(
    ftp_consume_skb,
    fraw_consume_skb,
    "consume_skb",
    on_free,
    None
);

/// Attach mode at a pod's tc ingress, where an eBPF datapath's `bpf_redirect_peer` delivers
/// without another netif_receive_skb: the context is the kernel's sk_buff, the buffer a
/// followed packet is known by, so a followed packet gets its hop here. It decides no packet:
/// every packet reaching it passed a device's receive before, where its journey was decided.
#[classifier]
pub fn ftc_ingress(ctx: TcContext) -> i32 {
    // The verifier allows no arithmetic on the context pointer (the journey's slot is a hash
    // of the buffer's address): read back from the stack, its value is a plain number.
    let ctx_ptr = ctx.skb.skb as u64;
    if let Ok(skb) = unsafe { bpf_probe_read_kernel(&ctx_ptr as *const u64) } {
        on_hop::<Probed>(&skb as *const u64, HookId::TcIngress as u8, None);
    }
    TC_ACT_UNSPEC
}
