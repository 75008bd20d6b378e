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
}

impl HookId {
    pub const ALL: [HookId; 9] = [
        HookId::NetDevQueue,
        HookId::NetDevStartXmit,
        HookId::NetDevXmit,
        HookId::NetifReceiveSkb,
        HookId::NetifRx,
        HookId::NapiGroReceiveEntry,
        HookId::KfreeSkb,
        HookId::TcIngress,
        HookId::TcEgress,
    ];

    pub fn from_u8(v: u8) -> Option<HookId> {
        HookId::ALL.get(v as usize).copied()
    }
}

/// `Event::flags`: the tag was found inside an encapsulated (inner) packet.
pub const FLAG_ENCAP: u8 = 1;
/// `Event::flags`: the packet carried an 802.1Q tag.
pub const FLAG_VLAN: u8 = 2;
/// `Event::flags`: a later IPv4 fragment of a tagged datagram (recognised by its IP id).
pub const FLAG_FRAGMENT: u8 = 4;
/// `Event::flags >> TUNNEL_SHIFT`: which tunnel the packet was inside (0: none).
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
    pub _pad: [u8; 6],
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
    pub skb_dev: u32,
    pub dev_ifindex: u32,
    /// net_device.nd_net.net: the struct net pointer.
    pub dev_nd_net: u32,
    /// net.ns.inum
    pub net_ns_inum: u32,
}

/// Per-CPU counters, indexed by these constants in the `COUNTERS` map.
pub const COUNTER_LOST: u32 = 0;
/// TCP segments of the run's port whose tag lay in paged data a tracepoint cannot read, and
/// that no earlier hook (tc) had recorded: they are missing from journeys, so they are counted.
pub const COUNTER_UNREADABLE: u32 = 1;
pub const COUNTER_COUNT: u32 = 2;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::KernelOffsets {}
}
