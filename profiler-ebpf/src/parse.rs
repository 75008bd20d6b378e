//! Finds the profiler's tag in a packet: Ethernet, up to two 802.1Q/802.1ad tags, IPv4 or IPv6,
//! UDP or TCP, and through up to two levels of encapsulation (VXLAN, Geneve, GRE/GRETAP; `flows`
//! one). Shared by every program; only the way bytes are read differs ([`Packet`]).
//!
//! Everything but the `kernel` part at the end (the maps tags are remembered in, tc's
//! [`Packet`]) is plain Rust over the two traits, free of aya-ebpf and of the rest of this crate:
//! the host tests (tests/parse.rs) include this file as it is and run it on byte slices. There,
//! built with cfg(test), the `kernel` part is left out, and the keys get the derives a hash map
//! needs; the eBPF crate itself is never built as a test.

use profiler_common::{
    depth_flags, Tag, WireFlow, FLAG_ENCAP, FLAG_ENCAP2, FLAG_FRAGMENT, FLAG_VLAN, TAG_LEN,
    TAG_MAGIC, TUNNEL_GENEVE, TUNNEL_GRE, TUNNEL_SHIFT, TUNNEL_VXLAN, VXLAN_PORTS,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// Transparent Ethernet bridging: GRETAP carries a whole Ethernet frame.
const ETH_P_TEB: u16 = 0x6558;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_GRE: u8 = 47;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const VXLAN_HLEN: usize = 8;
const GENEVE_PORT: u16 = 6081;

/// Reads bytes of a packet, at offsets counted from the start of its Ethernet header.
pub trait Packet {
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
    /// Whether `read` reaches paged (non-linear) data.
    fn reaches_paged(&self) -> bool;
    /// Whether bytes from `offset` on lie in paged data.
    fn has_paged_payload(&self, offset: usize) -> bool;
}

/// Where tags are remembered from one packet for the next ones that do not carry them: the
/// kernel's LRU maps (`kernel`), a hash map in the host tests.
pub trait TagMemory {
    /// The tag a hook that reads paged payload found in this TCP segment.
    fn tcp_tag(&self, seg: &TcpSeg) -> Option<Found>;
    fn remember_tcp_tag(&self, seg: &TcpSeg, found: &Found);
    /// The tag the first fragment of this IPv4 datagram carried.
    fn frag_tag(&self, key: &FragKey) -> Option<Found>;
    fn remember_frag_tag(&self, key: &FragKey, found: &Found);
    /// A TCP segment whose payload lies out of reach (paged) and whose tag was not remembered.
    fn count_unreadable(&self);
}

/// A tag found in a packet, with how the packet carried it.
#[repr(C)]
#[derive(Clone, Copy)]
#[cfg_attr(test, derive(Debug, PartialEq, Eq))]
pub struct Found {
    pub tag: Tag,
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// A TCP segment's identity along the path: addresses (IPv4 in the first 4 bytes), ports, seq.
#[repr(C)]
#[derive(Clone, Copy)]
#[cfg_attr(test, derive(Debug, PartialEq, Eq, Hash))]
pub struct TcpSeg {
    saddr: [u8; 16],
    daddr: [u8; 16],
    ports: [u8; 4],
    seq: [u8; 4],
}

/// An IPv4 datagram's identity, shared by all its fragments.
#[repr(C)]
#[derive(Clone, Copy)]
#[cfg_attr(test, derive(Debug, PartialEq, Eq, Hash))]
pub struct FragKey {
    saddr: [u8; 4],
    daddr: [u8; 4],
    id: [u8; 2],
    proto: u8,
    _pad: u8,
}

/// Always 0, but writable (.bss), so the verifier cannot know it: see [`opaque`].
static mut ZERO: usize = 0;

/// `x` (a header offset), as a value the verifier cannot know. The offsets are small constants
/// that differ by path (VLAN tags, tunnel kind); known exactly, they keep the verifier from
/// finding the paths equivalent, and the inner headers were verified once per outer path.
#[inline(always)]
fn opaque(x: usize) -> usize {
    (x + unsafe { core::ptr::read_volatile(&raw const ZERO) }) & 0xffff
}

#[inline(always)]
fn opaque8(x: u8) -> u8 {
    opaque(x as usize) as u8
}

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
    /// IPv4 fragmentation: whether the datagram is fragmented, its IP id, and whether this is a
    /// later fragment (no L4 header).
    fragmented: bool,
    ip_id: u16,
    later_fragment: bool,
}

impl L4 {
    #[inline(always)]
    fn frag_key(&self) -> FragKey {
        let a = |x: &[u8; 16]| [x[0], x[1], x[2], x[3]];
        FragKey {
            saddr: a(&self.saddr),
            daddr: a(&self.daddr),
            id: self.ip_id.to_be_bytes(),
            proto: self.proto,
            _pad: 0,
        }
    }
}

/// Skips Ethernet and VLAN tags from `off`: the ethertype, where the L3 header starts, and
/// FLAG_VLAN if there was a tag.
#[inline(always)]
fn l2<P: Packet>(p: &P, off: usize) -> Option<(u16, usize, u8)> {
    let eth: [u8; 2] = p.read(off + 12)?;
    let mut ethertype = be16(eth);
    let mut off = off + ETH_HLEN;
    let mut flags = 0;
    for _ in 0..2 {
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let vlan: [u8; 4] = p.read(off)?;
            ethertype = be16([vlan[2], vlan[3]]);
            off += 4;
            flags = FLAG_VLAN;
        }
    }
    Some((ethertype, off, flags))
}

#[inline(always)]
fn l3<P: Packet>(p: &P, ethertype: u16, off: usize) -> Option<L4> {
    let (mut saddr, mut daddr) = ([0u8; 16], [0u8; 16]);
    match ethertype {
        ETH_P_IP => {
            let ip: [u8; 20] = p.read(off)?;
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            if ihl < 20 {
                return None;
            }
            let frag_field = be16([ip[6], ip[7]]);
            let (more, frag_offset) = (frag_field & 0x2000 != 0, frag_field & 0x1fff);
            saddr[..4].copy_from_slice(&ip[12..16]);
            daddr[..4].copy_from_slice(&ip[16..20]);
            let len = (be16([ip[2], ip[3]]) as usize).saturating_sub(ihl);
            Some(L4 {
                proto: ip[9],
                offset: off + ihl,
                len,
                saddr,
                daddr,
                fragmented: more || frag_offset != 0,
                ip_id: be16([ip[4], ip[5]]),
                later_fragment: frag_offset != 0,
            })
        }
        ETH_P_IPV6 => {
            let ip: [u8; 40] = p.read(off)?;
            saddr.copy_from_slice(&ip[8..24]);
            daddr.copy_from_slice(&ip[24..40]);
            let len = be16([ip[4], ip[5]]) as usize;
            Some(L4 {
                proto: ip[6],
                offset: off + 40,
                len,
                saddr,
                daddr,
                fragmented: false,
                ip_id: 0,
                later_fragment: false,
            })
        }
        _ => None,
    }
}

/// Whether the packet (its outermost L4 header) is UDP or TCP with `port` as source or
/// destination port: what the delay injector holds.
#[inline(always)]
pub fn ports_match<P: Packet>(p: &P, port: u16) -> bool {
    let Some((ethertype, off, _)) = l2(p, 0) else {
        return false;
    };
    let Some(l4) = l3(p, ethertype, off) else {
        return false;
    };
    if l4.later_fragment || (l4.proto != IPPROTO_UDP && l4.proto != IPPROTO_TCP) {
        return false;
    }
    p.read::<4>(l4.offset).is_some_and(|ports| {
        be16([ports[0], ports[1]]) == port || be16([ports[2], ports[3]]) == port
    })
}

/// What a filter and a packet's fingerprint look at in one set of IP and L4 headers.
#[derive(Clone, Copy)]
pub struct Flow {
    pub family: u8,
    pub proto: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Host order; 0 for later fragments and protocols without ports.
    pub sport: u16,
    pub dport: u16,
    pub ip_id: u16,
    pub l4_len: u16,
    /// TCP sequence number, 0 otherwise.
    pub seq: u32,
    /// Where the transport header starts, from the Ethernet header.
    pub l4_off: u16,
}

/// The outer headers, and those inside a tunnel the parser knows. No Option<Flow>: the
/// verifier refuses copies of its uninitialised bytes.
pub struct Flows {
    pub outer: Flow,
    pub inner: Flow,
    pub has_inner: bool,
    /// FLAG_ENCAP, FLAG_VLAN and the tunnel kind, as in [`Found::flags`].
    pub flags: u8,
}

impl Flows {
    /// The packet's own headers: the inner ones of a tunnel, which encapsulation, NAT of the
    /// outer packet and reallocation leave as they are.
    #[inline(always)]
    pub fn innermost(&self) -> &Flow {
        if self.has_inner {
            &self.inner
        } else {
            &self.outer
        }
    }
}

#[inline(always)]
fn flow<P: Packet>(p: &P, l4: &L4, ethertype: u16) -> Flow {
    let ports: [u8; 4] = if l4.later_fragment {
        [0; 4]
    } else {
        p.read(l4.offset).unwrap_or([0; 4])
    };
    let seq = if l4.proto == IPPROTO_TCP && !l4.later_fragment {
        p.read::<4>(l4.offset + 4).map_or(0, u32::from_be_bytes)
    } else {
        0
    };
    Flow {
        family: if ethertype == ETH_P_IP { 4 } else { 6 },
        proto: l4.proto,
        saddr: l4.saddr,
        daddr: l4.daddr,
        sport: be16([ports[0], ports[1]]),
        dport: be16([ports[2], ports[3]]),
        ip_id: l4.ip_id,
        l4_len: l4.len as u16,
        seq,
        l4_off: l4.offset as u16,
    }
}

/// `f` as another node's kernel reads it off the wire: IPv4 addresses as numbers, an IPv6
/// one folded to the xor of its words (a sighting's identity, not an address to show).
#[inline(always)]
pub fn wire_flow(f: &Flow) -> WireFlow {
    let fold = |a: &[u8; 16]| {
        let w = |i: usize| u32::from_be_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        w(0) ^ w(4) ^ w(8) ^ w(12)
    };
    WireFlow {
        saddr: fold(&f.saddr),
        daddr: fold(&f.daddr),
        sport: f.sport,
        dport: f.dport,
        ip_id: f.ip_id,
        proto: f.proto,
        _pad: 0,
    }
}

/// A hash of the first 8 bytes after a UDP or ICMP header (what tells apart datagrams whose
/// headers are alike: unconnected UDP with DF carries IP ID 0); 0 for TCP, whose sequence
/// number does that, and where the bytes cannot be read.
#[inline(always)]
pub fn payload_hash<P: Packet>(p: &P, f: &Flow) -> u32 {
    let datagram = matches!(f.proto, IPPROTO_UDP | IPPROTO_ICMP | IPPROTO_ICMPV6);
    if !datagram || f.l4_off == 0 {
        return 0;
    }
    // UDP's and ICMP echo's headers are both 8 bytes.
    p.read::<8>(f.l4_off as usize + 8).map_or(0, |b| {
        (u64::from_le_bytes(b).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32
    })
}

/// Outer and (through one tunnel) inner headers of an IP packet, written in place.
#[inline(always)]
pub fn flows<P: Packet>(p: &P, out: &mut Flows) -> Option<()> {
    let (ethertype, off, flags) = l2(p, 0)?;
    let l4 = l3(p, ethertype, off)?;
    out.outer = flow(p, &l4, ethertype);
    out.flags = flags;
    out.has_inner = false;
    if l4.later_fragment {
        return Some(());
    }
    let o = &out.outer;
    let ports = [
        (o.sport >> 8) as u8,
        o.sport as u8,
        (o.dport >> 8) as u8,
        o.dport as u8,
    ];
    if let Some((inner_ethertype, at, kind)) = tunnel(p, &l4, ports) {
        out.flags |= FLAG_ENCAP | (kind << TUNNEL_SHIFT);
        let (et, off) = match inner_ethertype {
            Some(et) => (et, at),
            None => {
                // Like a missing inner IP header: the outer headers stand on their own (a short
                // datagram to a tunnel's port, a tunnel header cut short).
                let Some((et, off, vlan)) = l2(p, at) else {
                    return Some(());
                };
                out.flags |= vlan;
                (et, off)
            }
        };
        if let Some(l4) = l3(p, et, off) {
            out.inner = flow(p, &l4, et);
            out.has_inner = true;
        }
    }
    Some(())
}

#[inline(always)]
fn read_tag<P: Packet>(p: &P, offset: usize, run_id: u32) -> Option<Tag> {
    let raw: [u8; TAG_LEN] = p.read(offset)?;
    let tag = Tag::from_bytes(&raw);
    (tag.magic == TAG_MAGIC && tag.run_id == run_id).then_some(tag)
}

/// Where the inner packet of a tunnel starts, as (ethertype if it has no Ethernet header,
/// offset, tunnel flag), or None when `l4` is not a tunnel the profiler knows.
#[inline(always)]
fn tunnel<P: Packet>(p: &P, l4: &L4, ports: [u8; 4]) -> Option<(Option<u16>, usize, u8)> {
    match l4.proto {
        IPPROTO_UDP => {
            let dport = be16([ports[2], ports[3]]);
            if dport == GENEVE_PORT {
                // Geneve: 8-byte header plus options (length in 4-byte words), then Ethernet.
                let h: [u8; 1] = p.read(l4.offset + 8)?;
                let opts = ((h[0] & 0x3f) as usize) * 4;
                return Some((None, l4.offset + 8 + 8 + opts, TUNNEL_GENEVE));
            }
            let vxlan = dport == VXLAN_PORTS[0] || dport == VXLAN_PORTS[1];
            vxlan.then_some((None, l4.offset + 8 + VXLAN_HLEN, TUNNEL_VXLAN))
        }
        IPPROTO_GRE => {
            let h: [u8; 4] = p.read(l4.offset)?;
            // Optional checksum(+reserved), key and sequence words follow the 4 fixed bytes.
            let words = (h[0] >> 7 & 1) + (h[0] >> 5 & 1) + (h[0] >> 4 & 1);
            let inner = l4.offset + 4 + words as usize * 4;
            match be16([h[2], h[3]]) {
                ETH_P_TEB => Some((None, inner, TUNNEL_GRE)),
                et @ (ETH_P_IP | ETH_P_IPV6) => Some((Some(et), inner, TUNNEL_GRE)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The ports of an L4 header, zeros for a later fragment (it has none).
#[inline(always)]
fn l4_ports<P: Packet>(p: &P, l4: &L4) -> Option<[u8; 4]> {
    if l4.later_fragment {
        Some([0; 4])
    } else {
        p.read(l4.offset)
    }
}

/// Steps into the IP packet inside a tunnel (`tunnel`'s answer): `l4` and `ports` become its
/// own, in place (a copy per level would not fit the 512-byte stack); FLAG_VLAN if an inner
/// frame carried a tag.
#[inline(always)]
fn enter<P: Packet>(
    p: &P,
    l4: &mut L4,
    ports: &mut [u8; 4],
    ethertype: Option<u16>,
    at: usize,
) -> Option<u8> {
    let at = opaque(at);
    let (ethertype, off, vlan) = match ethertype {
        Some(et) => (et, at, 0),
        None => {
            let (et, off, vlan) = l2(p, at)?;
            (et, opaque(off), vlan)
        }
    };
    *l4 = l3(p, ethertype, off)?;
    *ports = l4_ports(p, l4)?;
    Some(vlan)
}

const NO_FRAG: FragKey = FragKey {
    saddr: [0; 4],
    daddr: [0; 4],
    id: [0; 2],
    proto: 0,
    _pad: 0,
};
const TUNNEL_BITS: u8 = 0xff << TUNNEL_SHIFT;

/// `found` as remembered under a datagram's identity: the flags count the tunnels below that
/// datagram (`depth`, the first of them of `kind`), so that a later fragment adds the tunnels
/// it is seen inside, wherever it is seen (a VM's fragment inside the host's VXLAN or not).
#[inline(always)]
fn below(found: &Found, depth: u8, kind: u8) -> Found {
    let kind = if depth > 0 { kind << TUNNEL_SHIFT } else { 0 };
    Found {
        flags: found.flags & FLAG_VLAN | depth_flags(depth) | kind,
        ..*found
    }
}

/// A later fragment's tag from what its first fragment left (`below`), seen with `flags` (the
/// tunnels around the fragment here): the depths add up (2 at most), the kind is the outer
/// tunnel's. Without branches, so that every way here verifies as one.
#[inline(always)]
fn fragment(stored: Found, flags: u8) -> Found {
    let any = flags | stored.flags;
    // 1 + 1 makes two: FLAG_ENCAP2 from both FLAG_ENCAPs.
    let depth =
        any & (FLAG_ENCAP | FLAG_ENCAP2) | ((flags & stored.flags & FLAG_ENCAP) * FLAG_ENCAP2);
    // The kind of the tunnels around the fragment here, if any, else the stored one's.
    let here = 0u8.wrapping_sub(flags & FLAG_ENCAP);
    let kind = (flags & here | stored.flags & !here) & TUNNEL_BITS;
    Found {
        flags: depth | kind | any & FLAG_VLAN | FLAG_FRAGMENT,
        ..stored
    }
}

/// The run's tag in this packet, if it carries one, inside at most two tunnels (a VM's overlay
/// carried by the host's). `port` (0: any) filters on the innermost L4 ports before the payload
/// is read, so that other traffic costs a few header reads. `memory` keeps tags for the packets
/// that do not carry one themselves (later fragments, TCP segments whose payload a tracepoint
/// cannot read).
#[inline(always)]
pub fn find_tag_in<P: Packet, M: TagMemory>(
    p: &P,
    memory: &M,
    port: u16,
    run_id: u32,
) -> Option<Found> {
    // Offsets are hidden from the verifier where the paths join (see `opaque`): a tracepoint
    // program verifies in 33 ms instead of 160 ms on the host, 2-3 s instead of 10 s under TCG.
    let (ethertype, off, mut flags) = l2(p, 0)?;
    let mut l4 = l3(p, ethertype, opaque(off))?;
    let mut ports = l4_ports(p, &l4)?;
    // A fragmented datagram that carries a tunnel (an overlay whose MTU does not fit the
    // underlay): its later fragments carry neither the tunnel header nor the tag, so the first
    // one records the tag under that datagram's identity too, one per tunnel level.
    // Keys and flags, not Options: before 6.5 the verifier refuses reading the stack slot of
    // an Option's payload on the path that left it unset, which the compiler may do.
    let (mut frag0, mut frag1, mut kind1) = (NO_FRAG, NO_FRAG, 0);
    // Which of frag0 (1) and frag1 (2) are set.
    let mut frags = 0;
    if !l4.later_fragment {
        if let Some((inner_ethertype, at, kind)) = tunnel(p, &l4, ports) {
            flags |= FLAG_ENCAP | kind << TUNNEL_SHIFT;
            // Unconditionally: one stack state whether fragmented or not.
            (frag0, frags) = (l4.frag_key(), l4.fragmented as u8);
            flags |= enter(p, &mut l4, &mut ports, inner_ethertype, at)?;
            // Hidden where the paths join, like the offsets: the second level is then verified
            // once, not once per way through the first.
            (flags, frags) = (opaque8(flags), opaque8(frags));
            // The second level: one more bounded step, no loop.
            if !l4.later_fragment {
                if let Some((inner_ethertype, at, kind)) = tunnel(p, &l4, ports) {
                    flags |= FLAG_ENCAP2;
                    (frag1, kind1) = (l4.frag_key(), kind);
                    frags |= (l4.fragmented as u8) << 1;
                    flags |= enter(p, &mut l4, &mut ports, inner_ethertype, at)?;
                }
            }
            (flags, frags) = (opaque8(flags), opaque8(frags));
        }
    }
    if l4.later_fragment {
        let stored = memory.frag_tag(&l4.frag_key())?;
        return Some(fragment(stored, flags));
    }
    if port != 0 && be16([ports[0], ports[1]]) != port && be16([ports[2], ports[3]]) != port {
        return None;
    }
    let found = match l4.proto {
        IPPROTO_UDP => Found {
            tag: read_tag(p, l4.offset + 8, run_id)?,
            flags,
            _pad: [0; 3],
        },
        IPPROTO_TCP => {
            let hdr: [u8; 13] = p.read(l4.offset)?;
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
            tcp_tag(p, memory, l4.offset + doff, &seg, run_id, flags)?
        }
        _ => return None,
    };
    if l4.fragmented {
        // The first fragment: remember the tag for the fragments that follow.
        memory.remember_frag_tag(&l4.frag_key(), &below(&found, 0, 0));
    }
    if frags & 1 != 0 {
        memory.remember_frag_tag(&frag0, &found);
    }
    if frags & 2 != 0 {
        memory.remember_frag_tag(&frag1, &below(&found, 1, kind1));
    }
    Some(found)
}

/// [`find_tag_in`] through one tunnel only, as before the second level: the tracepoints' and
/// probes'. A copy on purpose: with the second level in them, and also with one body shared by
/// both behind a const generic, a `--hooks deep` run on Debian 12's 6.1 did not get its programs
/// loaded in 15-20 minutes (with this copy: 33 s, verified instructions as before).
#[inline(always)]
pub fn find_tag_one_level<P: Packet, M: TagMemory>(
    p: &P,
    memory: &M,
    port: u16,
    run_id: u32,
) -> Option<Found> {
    // Offsets are hidden from the verifier where the paths join (see `opaque`): a tracepoint
    // program verifies in 33 ms instead of 160 ms on the host, 2-3 s instead of 10 s under TCG.
    let (ethertype, off, mut flags) = l2(p, 0)?;
    let off = opaque(off);
    let mut l4 = l3(p, ethertype, off)?;
    let mut ports: [u8; 4] = if l4.later_fragment {
        [0; 4]
    } else {
        p.read(l4.offset)?
    };
    // A fragmented outer packet (an overlay whose MTU does not fit the underlay): its later
    // fragments carry neither the tunnel header nor the tag, so the first one records the tag
    // under the outer datagram's identity too.
    // A key and a flag, not an Option: before 6.5 the verifier refuses reading the stack slot of
    // an Option's payload on the path that left it unset, which the compiler may do.
    let mut outer_frag = FragKey {
        saddr: [0; 4],
        daddr: [0; 4],
        id: [0; 2],
        proto: 0,
        _pad: 0,
    };
    let mut outer_fragmented = false;
    if !l4.later_fragment {
        if let Some((inner_ethertype, inner, kind)) = tunnel(p, &l4, ports) {
            flags |= FLAG_ENCAP | (kind << TUNNEL_SHIFT);
            if l4.fragmented {
                outer_frag = l4.frag_key();
                outer_fragmented = true;
            }
            let inner = opaque(inner);
            let (ethertype, off) = match inner_ethertype {
                Some(et) => (et, inner),
                None => {
                    let (et, off, vlan) = l2(p, inner)?;
                    flags |= vlan;
                    (et, opaque(off))
                }
            };
            l4 = l3(p, ethertype, off)?;
            ports = if l4.later_fragment {
                [0; 4]
            } else {
                p.read(l4.offset)?
            };
        }
    }
    if l4.later_fragment {
        let mut found = memory.frag_tag(&l4.frag_key())?;
        found.flags |= flags | FLAG_FRAGMENT;
        return Some(found);
    }
    if port != 0 && be16([ports[0], ports[1]]) != port && be16([ports[2], ports[3]]) != port {
        return None;
    }
    let found = match l4.proto {
        IPPROTO_UDP => Found {
            tag: read_tag(p, l4.offset + 8, run_id)?,
            flags,
            _pad: [0; 3],
        },
        IPPROTO_TCP => {
            let hdr: [u8; 13] = p.read(l4.offset)?;
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
            tcp_tag(p, memory, l4.offset + doff, &seg, run_id, flags)?
        }
        _ => return None,
    };
    if l4.fragmented {
        // The first fragment: remember the tag for the fragments that follow.
        memory.remember_frag_tag(&l4.frag_key(), &found);
    }
    if outer_fragmented {
        memory.remember_frag_tag(&outer_frag, &found);
    }
    Some(found)
}

#[inline(always)]
fn tcp_tag<P: Packet, M: TagMemory>(
    p: &P,
    memory: &M,
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
        memory.remember_tcp_tag(seg, &found);
        return Some(found);
    }
    if !p.reaches_paged() {
        if let Some(found) = memory.tcp_tag(seg) {
            return Some(Found { flags, ..found });
        }
        // Segments that continue a message (no tag at their start) are counted here too.
        if p.has_paged_payload(payload) {
            memory.count_unreadable();
        }
    }
    None
}

/// The eBPF programs' side: the maps tags are remembered in, and tc's packet access.
#[cfg(not(test))]
mod kernel {
    use aya_ebpf::{macros::map, maps::LruHashMap, programs::TcContext};
    use profiler_common::COUNTER_UNREADABLE;

    use super::{find_tag_in, find_tag_one_level, Found, FragKey, Packet, TagMemory, TcpSeg};

    /// Tags of TCP segments, recorded by the hooks that can read paged payload (tc) for the
    /// tracepoints that cannot: TCP keeps its payload in page fragments, out of a tracepoint's
    /// reach.
    #[map]
    static TCP_TAGS: LruHashMap<TcpSeg, Found> = LruHashMap::with_max_entries(8192, 0);

    /// Tags of fragmented datagrams, recorded at their first fragment so that the other
    /// fragments (no L4 header, no tag) are recognised and counted.
    #[map]
    static FRAG_TAGS: LruHashMap<FragKey, Found> = LruHashMap::with_max_entries(4096, 0);

    /// TCP_TAGS and FRAG_TAGS.
    struct Maps;

    impl TagMemory for Maps {
        #[inline(always)]
        fn tcp_tag(&self, seg: &TcpSeg) -> Option<Found> {
            unsafe { TCP_TAGS.get(seg) }.copied()
        }

        #[inline(always)]
        fn remember_tcp_tag(&self, seg: &TcpSeg, found: &Found) {
            let _ = TCP_TAGS.insert(seg, found, 0);
        }

        #[inline(always)]
        fn frag_tag(&self, key: &FragKey) -> Option<Found> {
            unsafe { FRAG_TAGS.get(key) }.copied()
        }

        #[inline(always)]
        fn remember_frag_tag(&self, key: &FragKey, found: &Found) {
            let _ = FRAG_TAGS.insert(key, found, 0);
        }

        #[inline(always)]
        fn count_unreadable(&self) {
            crate::count(COUNTER_UNREADABLE);
        }
    }

    /// [`find_tag_one_level`] with the kernel's maps: the tracepoints' and probes' (their
    /// programs on Debian 12's 6.1 did not load in minutes with the second level).
    #[inline(always)]
    pub fn find_tag<P: Packet>(p: &P, port: u16, run_id: u32) -> Option<Found> {
        find_tag_one_level(p, &Maps, port, run_id)
    }

    /// [`find_tag_in`] (two tunnels deep) with the kernel's maps: tc's.
    #[inline(always)]
    pub fn find_tag_two_levels<P: Packet>(p: &P, port: u16, run_id: u32) -> Option<Found> {
        find_tag_in(p, &Maps, port, run_id)
    }

    impl Packet for TcContext {
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
}

#[cfg(not(test))]
pub use kernel::{find_tag, find_tag_two_levels};
