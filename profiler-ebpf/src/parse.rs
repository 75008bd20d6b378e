//! Finds the profiler's tag in a packet: Ethernet, up to two 802.1Q/802.1ad tags, IPv4 or IPv6,
//! then UDP or TCP. Shared by every program; only the way bytes are read differs ([`Packet`]).

use aya_ebpf::{macros::map, maps::LruHashMap};
use profiler_common::{Tag, COUNTER_UNREADABLE, FLAG_VLAN, TAG_LEN, TAG_MAGIC};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Reads bytes of a packet, at offsets counted from the start of its Ethernet header.
pub trait Packet {
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
    /// Whether `read` reaches paged (non-linear) data.
    fn reaches_paged(&self) -> bool;
    /// Whether bytes from `offset` on lie in paged data.
    fn has_paged_payload(&self, offset: usize) -> bool;
}

/// A tag found in a packet, with how the packet carried it. Also the value of the IN_XMIT map.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Found {
    pub tag: Tag,
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// A TCP segment's identity along the path: addresses (IPv4 in the first 4 bytes), ports, seq.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpSeg {
    saddr: [u8; 16],
    daddr: [u8; 16],
    ports: [u8; 4],
    seq: [u8; 4],
}

/// Tags of TCP segments, recorded by the hooks that can read paged payload (tc) for the
/// tracepoints that cannot: TCP keeps its payload in page fragments, out of a tracepoint's reach.
#[map]
static TCP_TAGS: LruHashMap<TcpSeg, Found> = LruHashMap::with_max_entries(8192, 0);

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// What the IP header says about the packet's L4 part.
struct L4 {
    proto: u8,
    offset: usize,
    /// Bytes of L4 header and payload; 0 when the IP header does not say (IPv4 BIG TCP).
    len: usize,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

/// The L4 part of an IPv4/IPv6 packet, or None for anything but a first fragment.
#[inline(always)]
fn l4<P: Packet>(p: &P, ethertype: u16, off: usize) -> Option<L4> {
    let (mut saddr, mut daddr) = ([0u8; 16], [0u8; 16]);
    match ethertype {
        ETH_P_IP => {
            let ip: [u8; 20] = p.read(off)?;
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            // Non-first fragments have no L4 header; the first one carries the tag.
            if ihl < 20 || be16([ip[6], ip[7]]) & 0x1fff != 0 {
                return None;
            }
            saddr[..4].copy_from_slice(&ip[12..16]);
            daddr[..4].copy_from_slice(&ip[16..20]);
            let len = (be16([ip[2], ip[3]]) as usize).saturating_sub(ihl);
            Some(L4 {
                proto: ip[9],
                offset: off + ihl,
                len,
                saddr,
                daddr,
            })
        }
        ETH_P_IPV6 => {
            let ip: [u8; 40] = p.read(off)?;
            saddr.copy_from_slice(&ip[8..24]);
            daddr.copy_from_slice(&ip[24..40]);
            Some(L4 {
                proto: ip[6],
                offset: off + 40,
                len: be16([ip[4], ip[5]]) as usize,
                saddr,
                daddr,
            })
        }
        _ => None,
    }
}

#[inline(always)]
fn read_tag<P: Packet>(p: &P, offset: usize, run_id: u32) -> Option<Tag> {
    let raw: [u8; TAG_LEN] = p.read(offset)?;
    let tag = Tag::from_bytes(&raw);
    (tag.magic == TAG_MAGIC && tag.run_id == run_id).then_some(tag)
}

/// The run's tag in this packet, if it carries one. `port` (0: any) filters before the payload
/// is read, so that other traffic costs a few header reads.
#[inline(always)]
pub fn find_tag<P: Packet>(p: &P, port: u16, run_id: u32) -> Option<Found> {
    let eth: [u8; ETH_HLEN] = p.read(0)?;
    let mut ethertype = be16([eth[12], eth[13]]);
    let mut off = ETH_HLEN;
    let mut flags = 0;
    for _ in 0..2 {
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let vlan: [u8; 4] = p.read(off)?;
            ethertype = be16([vlan[2], vlan[3]]);
            off += 4;
            flags |= FLAG_VLAN;
        }
    }
    let l4 = l4(p, ethertype, off)?;
    let l4off = l4.offset;
    let ports: [u8; 4] = p.read(l4off)?;
    if port != 0 && be16([ports[0], ports[1]]) != port && be16([ports[2], ports[3]]) != port {
        return None;
    }
    match l4.proto {
        IPPROTO_UDP => {
            let tag = read_tag(p, l4off + 8, run_id)?;
            Some(Found {
                tag,
                flags,
                _pad: [0; 3],
            })
        }
        IPPROTO_TCP => {
            let hdr: [u8; 13] = p.read(l4off)?;
            let doff = ((hdr[12] >> 4) as usize) * 4;
            // A bare ACK carries the seq of the next data byte: it must not match that data's tag.
            if l4.len != 0 && l4.len <= doff {
                return None;
            }
            let seg = TcpSeg {
                saddr: l4.saddr,
                daddr: l4.daddr,
                ports,
                seq: [hdr[4], hdr[5], hdr[6], hdr[7]],
            };
            tcp_tag(p, l4off + doff, &seg, run_id, flags)
        }
        _ => None,
    }
}

#[inline(always)]
fn tcp_tag<P: Packet>(
    p: &P,
    payload: usize,
    seg: &TcpSeg,
    run_id: u32,
    flags: u8,
) -> Option<Found> {
    if let Some(tag) = read_tag(p, payload, run_id) {
        let found = Found {
            tag,
            flags,
            _pad: [0; 3],
        };
        let _ = TCP_TAGS.insert(seg, &found, 0);
        return Some(found);
    }
    if !p.reaches_paged() {
        if let Some(found) = unsafe { TCP_TAGS.get(seg) } {
            return Some(*found);
        }
        // Segments that continue a message (no tag at their start) are counted here too.
        if p.has_paged_payload(payload) {
            crate::count(COUNTER_UNREADABLE);
        }
    }
    None
}

impl Packet for aya_ebpf::programs::TcContext {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        // bpf_skb_load_bytes: reaches paged data too, so TCP payloads are found here directly.
        self.load::<[u8; N]>(offset).ok()
    }

    fn reaches_paged(&self) -> bool {
        true
    }

    fn has_paged_payload(&self, _offset: usize) -> bool {
        false
    }
}
