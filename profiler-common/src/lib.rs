//! Types shared by the eBPF programs and userspace.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes it, userspace reads it byte for
//! byte, so field order and sizes are the wire format between the two halves.
#![no_std]

/// First bytes of every payload the profiler's traffic runner sends.
pub const TAG_MAGIC: u32 = 0x5052_4f46; // "PROF"

/// The tag at the start of a tagged payload. All fields are big-endian on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    pub magic: u32,
    /// Distinguishes concurrent runs; the kernel only reports tags of the configured run.
    pub run_id: u32,
    pub seq: u32,
    /// [`DIR_REQUEST`] or [`DIR_RESPONSE`].
    pub direction: u32,
}

pub const TAG_LEN: usize = core::mem::size_of::<Tag>();
pub const DIR_REQUEST: u32 = 0;
pub const DIR_RESPONSE: u32 = 1;

impl Tag {
    pub fn to_bytes(&self) -> [u8; TAG_LEN] {
        let mut b = [0u8; TAG_LEN];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..8].copy_from_slice(&self.run_id.to_be_bytes());
        b[8..12].copy_from_slice(&self.seq.to_be_bytes());
        b[12..16].copy_from_slice(&self.direction.to_be_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; TAG_LEN]) -> Self {
        let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Tag {
            magic: word(0),
            run_id: word(4),
            seq: word(8),
            direction: word(12),
        }
    }
}

/// Where an event was taken. The numeric values are part of the event format.
/// 0-9 are the stable hooks (tracepoints, tc); the rest are kernel functions and module
/// tracepoints of one datapath each (the deep set), attached where the kernel has them.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookId {
    NetDevQueue = 0,
    NetDevStartXmit = 1,
    NetDevXmit = 2,
    NetifReceiveSkb = 3,
    NetifRx = 4,
    NapiGroReceiveEntry = 5,
    KfreeSkb = 6,
    TcIngress = 7,
    TcEgress = 8,
    /// Attach mode only: the buffer freed after use, where a journey ends.
    ConsumeSkb = 9,
    VethXmit = 10,
    BrHandleFrame = 11,
    BrForward = 12,
    BrDevXmit = 13,
    VxlanXmit = 14,
    VxlanXmitOne = 15,
    UdpTunnelXmitSkb = 16,
    VxlanRcv = 17,
    GeneveXmit = 18,
    GeneveRcv = 19,
    GreXmit = 20,
    GretapXmit = 21,
    GreRcv = 22,
    OvsVportReceive = 23,
    OvsDpProcessPacket = 24,
    OvsDpUpcall = 25,
    OvsExecuteActions = 26,
    OvsDoExecuteAction = 27,
    OvsVportSend = 28,
    MacvlanStartXmit = 29,
    MacvlanHandleFrame = 30,
    IpvlanQueueXmit = 31,
    IpvlanHandleFrame = 32,
    IpvlanProcessOutbound = 33,
    TunNetXmit = 34,
    VirtnetStartXmit = 35,
    /// The transmit function of a NIC the table does not list, found from its netdev_ops.
    DriverXmit = 36,
    /// Netfilter's IPv4 PRE_ROUTING just before and just after the NAT's destination step
    /// (priorities -101 and -99 around NF_IP_PRI_NAT_DST), and POST_ROUTING around its source
    /// step (99 and 101 around NF_IP_PRI_NAT_SRC): BPF netfilter links.
    NfPreNatBefore = 37,
    NfPreNatAfter = 38,
    NfPostNatBefore = 39,
    NfPostNatAfter = 40,
}

impl HookId {
    pub const COUNT: usize = 41;

    pub fn from_u8(v: u8) -> Option<HookId> {
        if (v as usize) < Self::COUNT {
            // SAFETY: repr(u8) with every value below COUNT a variant (checked by a test).
            Some(unsafe { core::mem::transmute::<u8, HookId>(v) })
        } else {
            None
        }
    }

    pub fn all() -> impl Iterator<Item = HookId> {
        (0..Self::COUNT as u8).filter_map(HookId::from_u8)
    }
}

/// `Event::hook` of a user probe (`run --uprobe`), outside HookId's kernel hooks; the event's
/// ifindex is then the probe's index in the run's list.
pub const HOOK_UPROBE: u8 = 0xfe;

/// Where a function hook finds its packet, per kernel function (the loader fills the `FUNCS`
/// map from the function's BTF): keyed by the function's address for kprobes, by the hook id for
/// module tracepoints.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FuncHook {
    pub hook: u8,
    /// Index of the `struct sk_buff *` argument.
    pub skb_arg: u8,
    /// 1: the argument is a `struct sk_buff **` (rx handlers).
    pub skb_deref: u8,
    /// Index of a `struct net_device *` argument, or [`NO_ARG`]: the skb's device then.
    pub dev_arg: u8,
}

pub const NO_ARG: u8 = 0xff;

/// `Event::flags`: the tag was found inside an encapsulated (inner) packet.
pub const FLAG_ENCAP: u8 = 1;
/// `Event::flags`: the packet carried an 802.1Q tag.
pub const FLAG_VLAN: u8 = 2;
/// `Event::flags`: a later IPv4 fragment of a tagged datagram (recognised by its IP id).
pub const FLAG_FRAGMENT: u8 = 4;
/// `Event::flags`, with FLAG_ENCAP: the tag was inside two tunnels (a VM's overlay carried by
/// the host's). The tunnel kind is then the outer one's.
pub const FLAG_ENCAP2: u8 = 8;

/// How many tunnels `flags` say the tag was inside: 0, 1 or 2.
pub const fn encap_depth(flags: u8) -> u8 {
    (flags & FLAG_ENCAP) + ((flags & FLAG_ENCAP2) >> 3)
}

/// FLAG_ENCAP and FLAG_ENCAP2 for `depth` tunnels (2 at most).
pub const fn depth_flags(depth: u8) -> u8 {
    match depth {
        0 => 0,
        1 => FLAG_ENCAP,
        _ => FLAG_ENCAP | FLAG_ENCAP2,
    }
}
/// `Event::flags >> TUNNEL_SHIFT`: which tunnel the packet was inside (0: none), the outermost
/// of two.
pub const TUNNEL_SHIFT: u8 = 4;
pub const TUNNEL_VXLAN: u8 = 1;
pub const TUNNEL_GENEVE: u8 = 2;
pub const TUNNEL_GRE: u8 = 3;
/// UDP destination ports recognised as VXLAN: IANA's and flannel's (the loader may add one).
pub const VXLAN_PORTS: [u16; 2] = [4789, 8472];

/// One observation of a tagged packet at one hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// bpf_ktime_get_ns(): CLOCK_MONOTONIC.
    pub ts_ns: u64,
    pub seq: u32,
    pub direction: u32,
    pub ifindex: u32,
    /// Inode number of the device's network namespace (0 where the hook cannot tell).
    pub netns: u32,
    /// skb->len at the hook.
    pub len: u32,
    /// skb_drop_reason for [`HookId::KfreeSkb`], 0 otherwise.
    pub drop_reason: u32,
    pub hook: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Nanoseconds the program ran before it submitted this event (from `ts_ns` on): the
    /// profiler's own time, which the next segment does not include.
    pub cost_ns: u32,
}

/// Kernel struct member offsets the programs need, read from the running kernel's BTF by the
/// loader: Rust eBPF gets no CO-RE relocations, so nothing here is compiled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub skb_head: u32,
    pub skb_data: u32,
    pub skb_len: u32,
    pub skb_data_len: u32,
    pub skb_end: u32,
    pub skb_mac_header: u32,
    pub skb_network_header: u32,
    pub skb_protocol: u32,
    pub skb_dev: u32,
    pub dev_ifindex: u32,
    /// net_device.nd_net.net: the struct net pointer.
    pub dev_nd_net: u32,
    /// net.ns.inum
    pub net_ns_inum: u32,
    /// The socket's cgroup (v2) id: sk_buff.sk, sock.sk_cgrp_data.cgroup, cgroup.kn,
    /// kernfs_node.id; [`NO_OFFSET`] where the kernel has no socket cgroup data.
    pub skb_sk: u32,
    pub sk_cgroup: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
}

/// A member this kernel does not have.
pub const NO_OFFSET: u32 = u32::MAX;

/// Per-CPU counters, indexed by these constants in the `COUNTERS` map.
pub const COUNTER_LOST: u32 = 0;
/// TCP segments of the run's port whose tag lay in paged data a tracepoint cannot read, and
/// that no earlier hook (tc) had recorded: they are missing from journeys, so they are counted.
pub const COUNTER_UNREADABLE: u32 = 1;

/// Attach mode (`profiler attach`): counters after the run-mode ones in `COUNTERS`.
/// Journeys begun at a device in scope whose packet passed the filter and the sampling.
pub const COUNTER_STARTED: u32 = 2;
/// Journeys that ended where the kernel freed the buffer after use (consume_skb).
pub const COUNTER_CONSUMED: u32 = 3;
/// Journeys that ended in a drop (kfree_skb).
pub const COUNTER_DROPPED: u32 = 4;
/// Journeys whose end no hook saw: their buffer carried another packet (freed where no hook saw
/// it, then reused), their last hop was older than the gap limit, or another journey took their
/// slot of the direct-mapped in-flight table.
pub const COUNTER_ABANDONED: u32 = 5;
/// Journeys kept across a reallocated buffer (the skb found under a new head).
pub const COUNTER_REHEADED: u32 = 6;
/// Copies of multicast and broadcast frames met at a device in scope and passed over: a bridge
/// floods them to every port, and a journey per copy would fill the histograms with a path per
/// port (250 pods' IPv6 router solicitations and listener reports alone overflow them).
pub const COUNTER_GROUP: u32 = 7;
pub const COUNTER_COUNT: u32 = 8;

/// The slot of a direct-mapped table (attach mode's in-flight journeys, scope) for a key such
/// as a pointer: Fibonacci hashing, so that aligned pointers and consecutive values spread
/// over every slot. The caller masks it to the table's power-of-two size.
#[inline(always)]
pub fn slot_hash(key: u64) -> u32 {
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
}

/// The key of a device in attach mode's scope table: [netns inode, ifindex] as one word.
#[inline(always)]
pub fn device_key(netns: u32, ifindex: u32) -> u64 {
    (netns as u64) << 32 | ifindex as u64
}

/// Entries of the scope table (a power of two) and how many consecutive slots a key may be
/// placed in (linear probing, unrolled in the programs).
pub const SCOPE_SLOTS: u32 = 2048;
pub const SCOPE_PROBES: u32 = 4;

/// A hop as the kernel keys it in attach mode.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HopPoint {
    pub ifindex: u32,
    pub netns: u32,
    pub hook: u8,
    /// Event flags: how the hop saw the packet (FLAG_ENCAP, tunnel kind, FLAG_VLAN).
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// A segment: two consecutive hops of one packet's journey, and the path that led to the
/// first of them ([`path_hash`] of every hop up to `from`). Journeys that took different ways
/// to the same two hops keep histograms apart, so userspace can show each path whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentKey {
    pub from: HopPoint,
    pub to: HopPoint,
    pub path: u32,
}

/// Attach mode: journeys that ended in a drop, by the last hop that saw them, the kernel's
/// drop reason and what was dropped (`DROPS`, per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropKey {
    pub last: HopPoint,
    pub reason: u32,
    /// skb->protocol: the EtherType, in network byte order as the kernel keeps it.
    pub ethertype: u16,
    /// The IP protocol (IPv4) or first next header (IPv6) at the network header; 0 otherwise.
    pub ip_proto: u8,
    pub _pad: u8,
}

/// Distinct (hop, reason, protocol) keys counted at most; more are counted in COUNTER_DROPPED
/// only.
pub const DROP_KEYS: u32 = 1024;

/// The path of a journey extended by hop `p`: a hash of its hops in order (start from 0).
#[inline(always)]
pub fn path_hash(path: u32, p: &HopPoint) -> u32 {
    let hop = (p.ifindex as u64)
        ^ ((p.netns as u64) << 32)
        ^ ((p.hook as u64) << 24)
        ^ ((p.flags as u64) << 16);
    let mixed = ((path as u64) << 32 | path as u64) ^ hop;
    // Fibonacci hashing: every input bit reaches the high half.
    (mixed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
}

/// The first slot of a segment in the histogram table (masked by the caller).
#[inline(always)]
pub fn segment_slot(key: &SegmentKey) -> u32 {
    path_hash(path_hash(key.path, &key.from), &key.to)
}

/// Log-linear histogram buckets: values below [`HIST_SUB`] ns exactly, then [`HIST_SUB`]
/// buckets per power of two (about 6% wide), up to 2^35 ns.
pub const HIST_SUB_BITS: u32 = 4;
pub const HIST_SUB: u64 = 1 << HIST_SUB_BITS;
pub const HIST_BUCKETS: usize = 512;

/// Slots of each of the kernel's two per-CPU histogram tables (a power of two: the one being
/// filled, the one being drained), and how many consecutive slots a segment may take (linear
/// probing, unrolled). A table holds the segments crossed between two drains (a second).
/// With 4 probes, 100 segments in a second found all of theirs taken one time in ten (random
/// keys, 2000 trials), which the churn test met in CI; with 8, one in two thousand, and 150 one
/// in fifty. A probe past the first costs only the segments that collide.
pub const HIST_SLOTS: u32 = 512;
pub const HIST_PROBES: u32 = 8;

/// One segment's latency histogram, per CPU, in a slot of the kernel's direct-mapped table (a
/// per-CPU array: no hash map lookup on the hot path). A slot with count 0 is free; a CPU
/// may place a segment in another slot than the next CPU does, so readers merge by key.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Histogram {
    pub key: SegmentKey,
    pub _pad: u32,
    pub count: u64,
    pub sum_ns: u64,
    pub buckets: [u64; HIST_BUCKETS],
}

/// The bucket of a value in nanoseconds.
#[inline(always)]
pub fn hist_bucket(ns: u64) -> usize {
    if ns < HIST_SUB {
        return ns as usize;
    }
    let msb = 63 - ns.leading_zeros();
    let sub = (ns >> (msb - HIST_SUB_BITS)) & (HIST_SUB - 1);
    let i = ((msb - HIST_SUB_BITS + 1) as usize) * HIST_SUB as usize + sub as usize;
    if i < HIST_BUCKETS {
        i
    } else {
        HIST_BUCKETS - 1
    }
}

/// The smallest value of a bucket, and its width.
pub fn hist_bucket_range(i: usize) -> (u64, u64) {
    let sub = HIST_SUB as usize;
    if i < sub {
        return (i as u64, 1);
    }
    let shift = (i / sub - 1) as u32;
    let low = ((sub + i % sub) as u64) << shift;
    (low, 1 << shift)
}

/// One hop of a followed packet, streamed in `--mode events`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HopEvent {
    pub ts_ns: u64,
    /// The journey: its first buffer address and first timestamp identify it.
    pub journey_head: u64,
    pub journey_start_ns: u64,
    pub point: HopPoint,
    pub len: u32,
    /// skb_drop_reason when `end` is [`END_DROPPED`].
    pub drop_reason: u32,
    /// 0 while the journey goes on; [`END_CONSUMED`] or [`END_DROPPED`] when it ends here.
    pub end: u8,
    pub _pad: [u8; 7],
}

/// One set of IP and transport headers as both ends of a wire read them: IPv4 addresses as
/// numbers (an IPv6 address folded to the xor of its four words); the ports are the transport
/// header's first four bytes (ICMP's type, code and checksum).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireFlow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub ip_id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// A followed packet at a wire-facing device (`attach --wire`), leaving the node or entering
/// it, with what it carries on the wire: how another node's sighting of it is recognised.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SightingEvent {
    pub ts_ns: u64,
    /// The journey, as in [`HopEvent`].
    pub journey_head: u64,
    pub journey_start_ns: u64,
    pub point: HopPoint,
    pub outer: WireFlow,
    /// The packet inside a tunnel, if `has_inner`.
    pub inner: WireFlow,
    /// The innermost TCP sequence number (0 for other protocols).
    pub tcp_seq: u32,
    /// A hash of the innermost UDP or ICMP payload's first 8 bytes (0 for TCP, whose sequence
    /// says more, and where they cannot be read).
    pub payload: u32,
    /// [`WIRE_LEAVING`] or [`WIRE_ENTERING`].
    pub direction: u8,
    pub has_inner: u8,
    pub _pad: [u8; 6],
}

pub const WIRE_LEAVING: u8 = 1;
pub const WIRE_ENTERING: u8 = 2;

pub const END_CONSUMED: u8 = 1;
pub const END_DROPPED: u8 = 2;

/// A packet filter in disjunctive normal form: a packet matches when all terms of any clause
/// hold, on its outer headers or on those inside a tunnel. No clause matches everything.
pub const FILTER_CLAUSES: usize = 6;
pub const FILTER_TERMS: usize = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterTerm {
    /// One of the `FIELD_*` constants.
    pub field: u8,
    pub negate: u8,
    /// Prefix length for address fields (32 or 128 for a host).
    pub prefix: u8,
    /// 4 or 6 for address fields: the family the address belongs to.
    pub family: u8,
    /// The port (host order) or protocol number.
    pub value: u32,
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterClause {
    pub terms: [FilterTerm; FILTER_TERMS],
    pub len: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub clauses: [FilterClause; FILTER_CLAUSES],
    pub len: u32,
}

pub const FIELD_PROTO: u8 = 1;
/// `value` 4 or 6.
pub const FIELD_FAMILY: u8 = 2;
pub const FIELD_SRC_ADDR: u8 = 3;
pub const FIELD_DST_ADDR: u8 = 4;
pub const FIELD_ADDR: u8 = 5;
pub const FIELD_SRC_PORT: u8 = 6;
pub const FIELD_DST_PORT: u8 = 7;
pub const FIELD_PORT: u8 = 8;

/// Where the `ebpf-redirect` lab's tc program sends a pod's packet, keyed by the destination
/// IPv4 address as it is in the packet. A pod of this host: its host-side veth (the packet
/// enters its peer, the pod's eth0, with `bpf_redirect_peer`) and the MACs the frame gets on
/// the way, as a router's would (the pod's, and the veth's as source). A pod of another host
/// (`neigh` 1): the device towards that host, out of which `bpf_redirect_neigh` sends it after
/// the kernel's route and neighbour lookups (the MACs are then the neighbour's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectTarget {
    pub ifindex: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub neigh: u32,
}

/// Most pods the `ebpf-redirect` lab's table holds.
pub const REDIRECT_TARGETS: u32 = 64;

/// An IPv4 address and port as a packet carries them (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// A Service port the `ebpf-redirect` lab's program translates, as Cilium's kube-proxy
/// replacement does: its virtual address and port, and the IP protocol (17 UDP, 6 TCP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceKey {
    pub vip: Endpoint,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// A connection the program translated: the client's and the backend's endpoints, the key its
/// replies are found by, to be given the Service's address back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatKey {
    pub client: Endpoint,
    pub backend: Endpoint,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Most Service ports, and translated connections, the lab's tables hold.
pub const SERVICE_PORTS: u32 = 16;
pub const NAT_CONNECTIONS: u32 = 65_536;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::HopPoint {}
    unsafe impl aya::Pod for super::SegmentKey {}
    unsafe impl aya::Pod for super::DropKey {}
    unsafe impl aya::Pod for super::Histogram {}
    unsafe impl aya::Pod for super::HopEvent {}
    unsafe impl aya::Pod for super::SightingEvent {}
    unsafe impl aya::Pod for super::Filter {}
    unsafe impl aya::Pod for super::FuncHook {}
    unsafe impl aya::Pod for super::RedirectTarget {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::ServiceKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_ids_are_dense() {
        let ids: [u8; HookId::COUNT] = core::array::from_fn(|i| i as u8);
        for v in ids {
            assert_eq!(HookId::from_u8(v).map(|h| h as u8), Some(v));
        }
        assert_eq!(HookId::from_u8(HookId::NfPostNatAfter as u8 + 1), None);
        assert_eq!(HookId::NfPostNatAfter as usize + 1, HookId::COUNT);
    }

    #[test]
    fn every_value_falls_in_its_buckets_range() {
        for v in (0..5000u64).chain([1 << 20, (1 << 20) + 12345, 999_999_999]) {
            let (low, width) = hist_bucket_range(hist_bucket(v));
            assert!(low <= v && v < low + width, "{v}: [{low}, +{width})");
            assert!(width * 16 <= low.max(16), "{v}: bucket too wide");
        }
        assert_eq!(hist_bucket(u64::MAX), HIST_BUCKETS - 1);
    }

    #[test]
    fn encapsulation_depth_round_trips_through_the_flags() {
        for depth in 0..=2 {
            let flags = depth_flags(depth) | FLAG_VLAN | FLAG_FRAGMENT | TUNNEL_GRE << TUNNEL_SHIFT;
            assert_eq!(encap_depth(flags), depth, "flags {flags:#x}");
        }
        assert_eq!(depth_flags(3), depth_flags(2));
    }
}
