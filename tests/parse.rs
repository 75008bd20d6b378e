//! The eBPF programs' packet parser (profiler-ebpf/src/parse.rs), compiled for the host as it is
//! and run on byte slices: every encapsulation built byte by byte, truncations, the tags
//! remembered for later fragments and for TCP payloads a tracepoint cannot read, and property
//! tests on arbitrary and mutated packets against a small reference parser written here from the
//! protocol layouts. `cargo xtask fuzz` runs the property tests (`prop_*`) with more cases.
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

#[path = "../profiler-ebpf/src/parse.rs"]
mod parse;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use parse::{
    find_tag_in, find_tag_one_level, flows, payload_hash, ports_match, wire_flow, Flow, Flows,
    Found, FragKey, Packet, TagMemory, TcpSeg,
};
use profiler_common::{
    depth_flags, Tag, DIR_REQUEST, FLAG_ENCAP, FLAG_ENCAP2, FLAG_FRAGMENT, FLAG_VLAN, TAG_LEN,
    TAG_MAGIC, TUNNEL_GENEVE, TUNNEL_GRE, TUNNEL_SHIFT, TUNNEL_VXLAN, VXLAN_PORTS,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

const RUN: u32 = 0x0bad_cafe;
const GENEVE_PORT: u16 = 6081;
/// Bytes a tracepoint reads at once from the packet's start (profiler-ebpf/src/skb.rs).
const HEAD: usize = 128;
/// No read of the parser starts this far in: its deepest header (two VLAN tags, IPv6, two
/// Geneve tunnels with every option word, the inner IPv4 with options, TCP with options) ends
/// well before.
const MAX_OFFSET: usize = 1024;
/// Reads of one call, at most: the parser has no loop but the VLAN tags of each frame.
const MAX_READS: usize = 32;

// ---------------------------------------------------------------------------------------------
// The two ways the programs read a packet, and the maps, on the host.

/// Every read a packet saw: (offset, length).
#[derive(Default)]
struct Reads(RefCell<Vec<(usize, usize)>>);

impl Reads {
    fn log(&self, offset: usize, n: usize) {
        self.0.borrow_mut().push((offset, n));
    }

    /// Offsets of the reads of a whole tag: no header read is TAG_LEN long.
    fn tag_reads(&self) -> Vec<usize> {
        let reads = self.0.borrow();
        reads
            .iter()
            .filter(|r| r.1 == TAG_LEN)
            .map(|r| r.0)
            .collect()
    }

    fn check_bounded(&self, what: &str) {
        let reads = self.0.borrow();
        assert!(
            reads.len() <= MAX_READS,
            "{what}: {} reads ({reads:?})",
            reads.len()
        );
        assert!(
            reads.iter().all(|&(at, _)| at < MAX_OFFSET),
            "{what}: a read past {MAX_OFFSET}: {reads:?}"
        );
    }
}

/// A packet as tc reads it (bpf_skb_load_bytes): every byte of it, nothing past its end.
struct Wire<'a> {
    bytes: &'a [u8],
    reads: Reads,
}

impl<'a> Wire<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Wire {
            bytes,
            reads: Reads::default(),
        }
    }
}

impl Packet for Wire<'_> {
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.reads.log(offset, N);
        let bytes = self.bytes.get(offset..offset.checked_add(N)?)?;
        Some(bytes.try_into().expect("a slice of N bytes"))
    }

    fn reaches_paged(&self) -> bool {
        true
    }

    fn has_paged_payload(&self, _offset: usize) -> bool {
        false
    }
}

/// A packet as the tracepoints read it (profiler-ebpf/src/skb.rs): the first HEAD bytes from
/// the packet's start in one read, whatever follows its linear part included (the buffer's
/// tailroom, `garbage` here); past them, the linear part only; the rest is paged.
struct Skb<'a> {
    head: [u8; HEAD],
    bytes: &'a [u8],
    linear: usize,
    reads: Reads,
}

impl<'a> Skb<'a> {
    fn new(bytes: &'a [u8], linear: usize, garbage: u8) -> Self {
        let linear = linear.min(bytes.len());
        let mut head = [garbage; HEAD];
        let n = linear.min(HEAD);
        head[..n].copy_from_slice(&bytes[..n]);
        Skb {
            head,
            bytes,
            linear,
            reads: Reads::default(),
        }
    }
}

impl Packet for Skb<'_> {
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.reads.log(offset, N);
        let end = offset.checked_add(N)?;
        let bytes = if end <= HEAD {
            &self.head[offset..end]
        } else if end <= self.linear {
            &self.bytes[offset..end]
        } else {
            return None;
        };
        Some(bytes.try_into().expect("a slice of N bytes"))
    }

    fn reaches_paged(&self) -> bool {
        false
    }

    fn has_paged_payload(&self, offset: usize) -> bool {
        self.bytes.len() > self.linear && offset >= self.linear
    }
}

/// TCP_TAGS, FRAG_TAGS and the unreadable counter, without eviction.
#[derive(Default)]
struct Memory {
    tcp: RefCell<HashMap<TcpSeg, Found>>,
    frag: RefCell<HashMap<FragKey, Found>>,
    unreadable: Cell<u32>,
}

impl TagMemory for Memory {
    fn tcp_tag(&self, seg: &TcpSeg) -> Option<Found> {
        self.tcp.borrow().get(seg).copied()
    }

    fn remember_tcp_tag(&self, seg: &TcpSeg, found: &Found) {
        self.tcp.borrow_mut().insert(*seg, *found);
    }

    fn frag_tag(&self, key: &FragKey) -> Option<Found> {
        self.frag.borrow().get(key).copied()
    }

    fn remember_frag_tag(&self, key: &FragKey, found: &Found) {
        self.frag.borrow_mut().insert(*key, *found);
    }

    fn count_unreadable(&self) {
        self.unreadable.set(self.unreadable.get() + 1);
    }
}

/// The run's tag as tc finds it in `bytes`, any port, nothing remembered.
fn find(bytes: &[u8]) -> Option<Found> {
    find_tag_in(&Wire::new(bytes), &Memory::default(), 0, RUN)
}

fn found(seq: u32, flags: u8) -> Option<Found> {
    Some(Found {
        tag: tag(seq),
        flags,
        _pad: [0; 3],
    })
}

fn tag(seq: u32) -> Tag {
    Tag {
        magic: TAG_MAGIC,
        run_id: RUN,
        seq,
        direction: DIR_REQUEST,
    }
}

fn zero_flow() -> Flow {
    Flow {
        family: 0,
        proto: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: 0,
        dport: 0,
        ip_id: 0,
        l4_len: 0,
        seq: 0,
        l4_off: 0,
    }
}

fn parse_flows<P: Packet>(p: &P) -> Option<Flows> {
    let mut out = Flows {
        outer: zero_flow(),
        inner: zero_flow(),
        has_inner: false,
        flags: 0,
    };
    flows(p, &mut out).map(|()| out)
}

// ---------------------------------------------------------------------------------------------
// Packets, byte by byte.

const MAC: [u8; 12] = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
const INNER_V4: [[u8; 4]; 2] = [[10, 244, 0, 5], [10, 244, 1, 7]];
const OUTER_V4: [[u8; 4]; 2] = [[192, 168, 50, 1], [192, 168, 50, 2]];
const INNER_V6: [[u8; 16]; 2] = [v6(0xfd00, 5), v6(0xfd00, 7)];
const OUTER_V6: [[u8; 16]; 2] = [v6(0x2001, 1), v6(0x2001, 2)];
const OUTER_SPORT: u16 = 51234;
const INNER_ID: u16 = 0x1234;
const OUTER_ID: u16 = 0x4321;
/// The host's tunnel around a VM's (IPv4).
const HOST_V4: [[u8; 4]; 2] = [[172, 16, 0, 1], [172, 16, 0, 2]];
const HOST_ID: u16 = 0x5678;
/// What follows the tag in a tagged payload.
const TRAILER: &[u8] = b"payload!";

const fn v6(prefix: u16, host: u8) -> [u8; 16] {
    let mut a = [0; 16];
    a[0] = (prefix >> 8) as u8;
    a[1] = prefix as u8;
    a[15] = host;
    a
}

fn eth(tpids: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = MAC.to_vec();
    for (i, tpid) in tpids.iter().enumerate() {
        f.extend(tpid.to_be_bytes());
        f.extend((100 + i as u16).to_be_bytes()); // TCI: VLAN 100, 101
    }
    f.extend(ethertype.to_be_bytes());
    f.extend(payload);
    f
}

/// An IPv4 header: `frag` is the flags/fragment-offset field, `options` its option words.
fn ipv4(
    proto: u8,
    addrs: [[u8; 4]; 2],
    id: u16,
    frag: u16,
    options: u8,
    payload: &[u8],
) -> Vec<u8> {
    let ihl = 5 + options as usize;
    let total = ihl * 4 + payload.len();
    let mut h = vec![0x40 | ihl as u8, 0];
    h.extend((total as u16).to_be_bytes());
    h.extend(id.to_be_bytes());
    h.extend(frag.to_be_bytes());
    h.extend([64, proto, 0, 0]);
    h.extend(addrs[0]);
    h.extend(addrs[1]);
    h.extend(std::iter::repeat_n(1u8, options as usize * 4)); // NOP options
    h.extend(payload);
    h
}

fn ipv6(next: u8, addrs: [[u8; 16]; 2], payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend((payload.len() as u16).to_be_bytes());
    h.extend([next, 64]);
    h.extend(addrs[0]);
    h.extend(addrs[1]);
    h.extend(payload);
    h
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = sport.to_be_bytes().to_vec();
    h.extend(dport.to_be_bytes());
    h.extend((8 + payload.len() as u16).to_be_bytes());
    h.extend([0, 0]);
    h.extend(payload);
    h
}

fn tcp(sport: u16, dport: u16, seq: u32, options: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = sport.to_be_bytes().to_vec();
    h.extend(dport.to_be_bytes());
    h.extend(seq.to_be_bytes());
    h.extend(1u32.to_be_bytes()); // ack
    h.extend([(5 + options) << 4, 0x18]); // data offset; PSH|ACK
    h.extend([0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent pointer
    h.extend(std::iter::repeat_n(1u8, options as usize * 4));
    h.extend(payload);
    h
}

fn vxlan(frame: &[u8]) -> Vec<u8> {
    let mut h = vec![0x08, 0, 0, 0, 0, 0, 42, 0];
    h.extend(frame);
    h
}

/// A Geneve header with `words` 4-byte words of options (at most 63), then the frame.
fn geneve(words: u8, frame: &[u8]) -> Vec<u8> {
    let mut h = vec![words & 0x3f, 0, 0x65, 0x58, 0, 0, 42, 0];
    let mut left = words as usize;
    while left > 0 {
        // An option: class, type, length (5 bits, in words, after its own header word).
        let len = left.min(32);
        h.extend([0x01, 0x02, 0x80, (len - 1) as u8]);
        h.extend(std::iter::repeat_n(0xaa, (len - 1) * 4));
        left -= len;
    }
    h.extend(frame);
    h
}

/// A GRE header with the optional checksum, key and sequence number words.
fn gre(csum: bool, key: bool, seq: bool, proto: u16, inner: &[u8]) -> Vec<u8> {
    let mut h = vec![(csum as u8) << 7 | (key as u8) << 5 | (seq as u8) << 4, 0];
    h.extend(proto.to_be_bytes());
    if csum {
        h.extend([0xcc, 0xcc, 0, 0]);
    }
    if key {
        h.extend(42u32.to_be_bytes());
    }
    if seq {
        h.extend(7u32.to_be_bytes());
    }
    h.extend(inner);
    h
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Tunnel {
    Vxlan(u16),
    /// Option words.
    Geneve(u8),
    Gre {
        csum: bool,
        key: bool,
        seq: bool,
        /// GRETAP (an Ethernet frame inside), else IP directly.
        teb: bool,
    },
}

/// GRE carrying IP, without optional words.
const PLAIN_GRE: Tunnel = Tunnel::Gre {
    csum: false,
    key: false,
    seq: false,
    teb: false,
};

impl Tunnel {
    fn carries_ethernet(self) -> bool {
        !matches!(self, Tunnel::Gre { teb: false, .. })
    }

    fn kind(self) -> u8 {
        match self {
            Tunnel::Vxlan(_) => TUNNEL_VXLAN,
            Tunnel::Geneve(_) => TUNNEL_GENEVE,
            Tunnel::Gre { .. } => TUNNEL_GRE,
        }
    }
}

/// Which piece of an IPv4 datagram a packet carries.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Piece {
    Whole,
    /// The first fragment (more fragments follow): L4 header and tag.
    First,
    /// A later fragment: neither L4 header nor tag.
    Later,
}

impl Piece {
    fn frag_field(self) -> u16 {
        match self {
            Piece::Whole => 0,
            Piece::First => 0x2000,
            Piece::Later => 3, // offset 24 bytes, the last fragment
        }
    }
}

/// A tagged packet: the outer frame, an optional tunnel, the innermost IP and L4 headers.
#[derive(Clone, Debug)]
struct Spec {
    /// TPIDs of the outer frame's VLAN tags.
    vlans: Vec<u16>,
    v6: bool,
    tunnel: Option<Tunnel>,
    /// Of the inner frame, for the tunnels that carry Ethernet.
    inner_vlans: Vec<u16>,
    inner_v6: bool,
    tcp: bool,
    sport: u16,
    dport: u16,
    seq: u32,
    /// Option words of the innermost IPv4 header and of the TCP header.
    ip_options: u8,
    tcp_options: u8,
    /// Of the innermost IPv4 datagram, and of the outer one of a tunnel.
    piece: Piece,
    outer_piece: Piece,
    /// A second tunnel around the whole packet (a VM's packet encapsulated again on the host),
    /// over IPv4 without VLAN tags, and which piece of its datagram this is.
    host: Option<Tunnel>,
    host_piece: Piece,
}

impl Spec {
    fn plain(v6: bool, tcp: bool) -> Spec {
        Spec {
            vlans: vec![],
            v6,
            tunnel: None,
            inner_vlans: vec![],
            inner_v6: false,
            tcp,
            sport: 40000,
            dport: 9000,
            seq: 77,
            ip_options: 0,
            tcp_options: 0,
            piece: Piece::Whole,
            outer_piece: Piece::Whole,
            host: None,
            host_piece: Piece::Whole,
        }
    }

    fn tunneled(tunnel: Tunnel, inner_v6: bool, tcp: bool) -> Spec {
        Spec {
            tunnel: Some(tunnel),
            inner_v6,
            ..Spec::plain(false, tcp)
        }
    }

    fn innermost_v6(&self) -> bool {
        if self.tunnel.is_some() {
            self.inner_v6
        } else {
            self.v6
        }
    }

    /// The flags the parser reports for the packet.
    fn flags(&self) -> u8 {
        let mut flags = 0;
        let inner_tagged =
            self.tunnel.is_some_and(Tunnel::carries_ethernet) && !self.inner_vlans.is_empty();
        if !self.vlans.is_empty() || inner_tagged {
            flags |= FLAG_VLAN;
        }
        let depth = self.tunnel.is_some() as u8 + self.host.is_some() as u8;
        // The kind is the outermost tunnel's.
        if let Some(t) = self.host.or(self.tunnel) {
            flags |= depth_flags(depth) | t.kind() << TUNNEL_SHIFT;
        }
        flags
    }
}

struct Built {
    bytes: Vec<u8>,
    /// Where the tag starts; None for a later fragment, which has none.
    tag_at: Option<usize>,
}

/// An IP header of either family around `payload` (fragments and options are IPv4's only).
fn ip(
    v6: bool,
    proto: u8,
    inner: bool,
    id: u16,
    piece: Piece,
    options: u8,
    payload: &[u8],
) -> (u16, Vec<u8>) {
    if v6 {
        let addrs = if inner { INNER_V6 } else { OUTER_V6 };
        (0x86dd, ipv6(proto, addrs, payload))
    } else {
        let addrs = if inner { INNER_V4 } else { OUTER_V4 };
        (
            0x0800,
            ipv4(proto, addrs, id, piece.frag_field(), options, payload),
        )
    }
}

/// A tunnel's L4 part (protocol, bytes) around an IP packet, or the Ethernet `frame` of it.
fn wrap(t: Tunnel, ip_et: u16, ip_packet: &[u8], frame: &[u8]) -> (u8, Vec<u8>) {
    match t {
        Tunnel::Vxlan(port) => (17, udp(OUTER_SPORT, port, &vxlan(frame))),
        Tunnel::Geneve(words) => (17, udp(OUTER_SPORT, GENEVE_PORT, &geneve(words, frame))),
        Tunnel::Gre {
            csum,
            key,
            seq,
            teb,
        } => {
            let gre = if teb {
                gre(csum, key, seq, 0x6558, frame)
            } else {
                gre(csum, key, seq, ip_et, ip_packet)
            };
            (47, gre)
        }
    }
}

fn build(s: &Spec) -> Built {
    let mut payload = tag(s.seq).to_bytes().to_vec();
    payload.extend(TRAILER);
    let (proto, l4) = if s.tcp {
        (
            6,
            tcp(s.sport, s.dport, 1000 + s.seq, s.tcp_options, &payload),
        )
    } else {
        (17, udp(s.sport, s.dport, &payload))
    };
    let innermost_later = s.piece == Piece::Later && !s.innermost_v6();
    let l4 = if innermost_later { vec![0x55; 40] } else { l4 };
    let (ip_et, ip_packet) = ip(
        s.innermost_v6(),
        proto,
        true,
        INNER_ID,
        s.piece,
        s.ip_options,
        &l4,
    );
    let mut later = innermost_later;
    let (et, l3) = match s.tunnel {
        None => (ip_et, ip_packet),
        Some(t) => {
            let frame = eth(&s.inner_vlans, ip_et, &ip_packet);
            let (proto, l4) = wrap(t, ip_et, &ip_packet, &frame);
            let outer_later = s.outer_piece == Piece::Later && !s.v6;
            later |= outer_later;
            let l4 = if outer_later { vec![0x66; 48] } else { l4 };
            ip(s.v6, proto, false, OUTER_ID, s.outer_piece, 0, &l4)
        }
    };
    let (et, l3) = match s.host {
        None => (et, l3),
        Some(t) => {
            let (proto, l4) = wrap(t, et, &l3, &eth(&[], et, &l3));
            let host_later = s.host_piece == Piece::Later;
            later |= host_later;
            let l4 = if host_later { vec![0x77; 56] } else { l4 };
            let frag = s.host_piece.frag_field();
            (0x0800, ipv4(proto, HOST_V4, HOST_ID, frag, 0, &l4))
        }
    };
    let bytes = eth(&s.vlans, et, &l3);
    let tag_at = (!later).then(|| bytes.len() - payload.len());
    Built { bytes, tag_at }
}

// ---------------------------------------------------------------------------------------------
// The reference parser: the protocol layouts read in order, one header after the other.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// The tag, if the packet carries the run's, is at `at`.
    TagAt {
        at: usize,
        flags: u8,
        /// Outermost protocol and first 4 bytes of L4 (ports).
        outer: (u8, u16, u16),
        /// What `flows` (one tunnel level) reports: whether there is an inner packet, the
        /// flags, the protocol and ports of the innermost packet it reaches.
        flows: (bool, u8, (u8, u16, u16)),
    },
    /// No tag: not IP over Ethernet, not UDP or TCP, a bare ACK, another port, or cut short.
    NoTag,
    /// Not judged here: later fragments (their tag is remembered from the first), IPv6
    /// extension headers, headers the kernel itself refuses (wrong IP version, TCP data offset
    /// below 5, an IPv4 total length shorter than its header, GRE routing or version 1), Geneve
    /// carrying no Ethernet.
    Unknown,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn has(b: &[u8], at: usize, n: usize) -> Option<()> {
    (b.len() >= at + n).then_some(())
}

/// Ethernet at `at`, then at most two VLAN tags: (ethertype, start of L3, tagged).
fn ref_ethernet(b: &[u8], at: usize) -> Option<(u16, usize, bool)> {
    let mut ethertype = u16_at(b, at + 12)?;
    let mut next = at + 14;
    let mut tags = 0;
    while (ethertype == 0x8100 || ethertype == 0x88a8) && tags < 2 {
        has(b, next, 4)?; // TCI, then the next ethertype
        ethertype = u16_at(b, next + 2)?;
        next += 4;
        tags += 1;
    }
    Some((ethertype, next, tags > 0))
}

enum RefL3 {
    Ip {
        proto: u8,
        l4: usize,
        /// Bytes after the IP header, where the header says (not IPv4 with total length 0,
        /// not an IPv6 jumbogram).
        payload: Option<usize>,
    },
    NotIp,
    Unknown,
}

fn ref_ip(b: &[u8], ethertype: u16, at: usize) -> Option<RefL3> {
    match ethertype {
        0x0800 => {
            has(b, at, 20)?;
            let ihl = (b[at] & 0x0f) as usize * 4;
            let total = u16_at(b, at + 2)? as usize;
            let frag_offset = u16_at(b, at + 6)? & 0x1fff;
            if ihl < 20 {
                return Some(RefL3::NotIp);
            }
            if b[at] >> 4 != 4 || (total != 0 && total <= ihl) || frag_offset != 0 {
                return Some(RefL3::Unknown);
            }
            Some(RefL3::Ip {
                proto: b[at + 9],
                l4: at + ihl,
                payload: (total != 0).then(|| total - ihl),
            })
        }
        0x86dd => {
            has(b, at, 40)?;
            let next = b[at + 6];
            // Hop-by-hop, routing, fragment, destination options, AH, ESP, mobility.
            if b[at] >> 4 != 6 || [0, 43, 44, 60, 51, 50, 135].contains(&next) {
                return Some(RefL3::Unknown);
            }
            let len = u16_at(b, at + 4)? as usize;
            Some(RefL3::Ip {
                proto: next,
                l4: at + 40,
                payload: (len != 0).then_some(len),
            })
        }
        _ => Some(RefL3::NotIp),
    }
}

/// Where the tag of a packet (Ethernet from byte 0) is, for `port` (0: any).
fn reference(b: &[u8], port: u16) -> Expect {
    walk(b, port).unwrap_or(Expect::NoTag)
}

/// A step of the reference: None, the packet ends before it; Err, the verdict on the packet.
type Step<T> = Option<Result<T, Expect>>;
/// A tunnel's kind, where its inner packet starts, and that packet's ethertype if it is not
/// an Ethernet frame.
type TunnelAt = (u8, usize, Option<u16>);

/// An IP packet's L3 verdict, or its protocol, L4 offset and payload length.
fn ref_l3(b: &[u8], ethertype: u16, at: usize) -> Step<(u8, usize, Option<usize>)> {
    Some(match ref_ip(b, ethertype, at)? {
        RefL3::Ip { proto, l4, payload } => Ok((proto, l4, payload)),
        RefL3::NotIp => Err(Expect::NoTag),
        RefL3::Unknown => Err(Expect::Unknown),
    })
}

/// The tunnel `proto` at `l4` is (4 bytes there); Ok(None): no tunnel.
fn ref_tunnel(b: &[u8], proto: u8, l4: usize) -> Step<Option<TunnelAt>> {
    let dport = u16_at(b, l4 + 2)?;
    Some(Ok(match proto {
        17 if dport == GENEVE_PORT => {
            let geneve = l4 + 8;
            let first = *b.get(geneve)?;
            if first >> 6 != 0 || u16_at(b, geneve + 2)? != 0x6558 {
                return Some(Err(Expect::Unknown));
            }
            let options = (first & 0x3f) as usize * 4;
            Some((TUNNEL_GENEVE, geneve + 8 + options, None))
        }
        17 if VXLAN_PORTS.contains(&dport) => Some((TUNNEL_VXLAN, l4 + 8 + 8, None)),
        47 => {
            let (c, r, k, s) = (b[l4] & 0x80, b[l4] & 0x40, b[l4] & 0x20, b[l4] & 0x10);
            if r != 0 || b[l4 + 1] & 7 != 0 {
                return Some(Err(Expect::Unknown));
            }
            let words = [c, k, s].iter().filter(|&&bit| bit != 0).count();
            let inner = l4 + 4 + 4 * words;
            match u16_at(b, l4 + 2)? {
                0x6558 => Some((TUNNEL_GRE, inner, None)),
                et @ (0x0800 | 0x86dd) => Some((TUNNEL_GRE, inner, Some(et))),
                _ => return Some(Err(Expect::NoTag)),
            }
        }
        _ => None,
    }))
}

/// None: the packet ends before the tag.
fn walk(b: &[u8], port: u16) -> Option<Expect> {
    let (ethertype, l3, vlan) = ref_ethernet(b, 0)?;
    let mut flags = if vlan { FLAG_VLAN } else { 0 };
    let (mut proto, mut l4, mut payload) = match ref_l3(b, ethertype, l3)? {
        Ok(l) => l,
        Err(e) => return Some(e),
    };
    if ![6, 17, 47].contains(&proto) {
        return Some(Expect::NoTag);
    }
    let outer_proto = proto;
    has(b, l4, 4)?;
    let outer_ports = (u16_at(b, l4)?, u16_at(b, l4 + 2)?);

    // Up to two tunnels, each: where its inner packet starts, and whether that is a frame.
    let (mut depth, mut kind, mut flows) = (0, 0, None);
    while depth < 2 && [17, 47].contains(&proto) {
        has(b, l4, 4)?;
        let (k, inner, ethertype) = match ref_tunnel(b, proto, l4)? {
            Ok(Some(t)) => t,
            Ok(None) => break,
            Err(e) => return Some(e),
        };
        if depth == 0 {
            kind = k << TUNNEL_SHIFT;
        }
        depth += 1;
        let (ethertype, l3) = match ethertype {
            Some(et) => (et, inner),
            None => {
                let (et, l3, vlan) = ref_ethernet(b, inner)?;
                if vlan {
                    flags |= FLAG_VLAN;
                }
                (et, l3)
            }
        };
        (proto, l4, payload) = match ref_l3(b, ethertype, l3)? {
            Ok(l) => l,
            Err(e) => return Some(e),
        };
        if depth == 1 {
            // flows stops here: the ports, if there, of the packet inside the first tunnel.
            let ports = (u16_at(b, l4).unwrap_or(0), u16_at(b, l4 + 2).unwrap_or(0));
            flows = Some((true, flags | FLAG_ENCAP | kind, (proto, ports.0, ports.1)));
        }
    }
    flags |= depth_flags(depth) | kind;

    if proto != 6 && proto != 17 {
        return Some(Expect::NoTag);
    }
    let (sport, dport) = (u16_at(b, l4)?, u16_at(b, l4 + 2)?);
    if port != 0 && sport != port && dport != port {
        return Some(Expect::NoTag);
    }
    let header = if proto == 17 {
        8
    } else {
        let doff = (*b.get(l4 + 12)? >> 4) as usize * 4;
        if doff < 20 {
            return Some(Expect::Unknown);
        }
        // A segment without payload (a bare ACK) carries no tag.
        if payload.is_some_and(|len| len <= doff) {
            return Some(Expect::NoTag);
        }
        doff
    };
    Some(Expect::TagAt {
        at: l4 + header,
        flags,
        outer: (outer_proto, outer_ports.0, outer_ports.1),
        flows: flows.unwrap_or((false, flags, (proto, sport, dport))),
    })
}

/// The run's tag in `b` at `at`, if it is there.
fn tag_at(b: &[u8], at: usize) -> Option<Tag> {
    let raw: [u8; TAG_LEN] = b.get(at..at + TAG_LEN)?.try_into().ok()?;
    let tag = Tag::from_bytes(&raw);
    (tag.magic == TAG_MAGIC && tag.run_id == RUN).then_some(tag)
}

/// Runs every entry point on `b` (as tc reads it, with nothing remembered) and checks them
/// against the reference where it judges the packet.
fn check_against_reference(b: &[u8], port: u16) {
    let wire = Wire::new(b);
    let got = find_tag_in(&wire, &Memory::default(), port, RUN);
    wire.reads.check_bounded("find_tag");
    let flows_wire = Wire::new(b);
    let flows = parse_flows(&flows_wire);
    flows_wire.reads.check_bounded("flows");
    // flows gives the outer headers of every packet whose Ethernet and IP headers are there,
    // whatever follows them.
    let outer_ip = ref_ethernet(b, 0).is_some_and(|(ethertype, l3, _)| match ethertype {
        0x0800 => b.len() >= l3 + 20 && b[l3] & 0x0f >= 5,
        0x86dd => b.len() >= l3 + 40,
        _ => false,
    });
    assert_eq!(flows.is_some(), outer_ip, "flows of {b:02x?}");
    match reference(b, port) {
        Expect::TagAt {
            at,
            flags,
            outer,
            flows: want_flows,
        } => {
            let want = tag_at(b, at).map(|tag| Found {
                tag,
                flags,
                _pad: [0; 3],
            });
            assert_eq!(got, want, "the tag at {at} of {b:02x?} (port {port})");
            if want.is_some() {
                assert_eq!(wire.reads.tag_reads(), vec![at], "tag reads of {b:02x?}");
            }
            let f = flows.unwrap_or_else(|| panic!("flows of {b:02x?}"));
            let i = f.innermost();
            let o = &f.outer;
            assert_eq!((o.proto, o.sport, o.dport), outer, "outermost of {b:02x?}");
            assert_eq!(
                (f.has_inner, f.flags, (i.proto, i.sport, i.dport)),
                want_flows,
                "flows of {b:02x?}"
            );
            let has_ports = outer.0 == 6 || outer.0 == 17;
            assert_eq!(ports_match(&Wire::new(b), outer.1), has_ports, "{b:02x?}");
            assert_eq!(ports_match(&Wire::new(b), outer.2), has_ports, "{b:02x?}");
        }
        Expect::NoTag => assert_eq!(got, None, "no tag in {b:02x?} (port {port})"),
        Expect::Unknown => {}
    }
}

// ---------------------------------------------------------------------------------------------
// One test per encapsulation.

/// Finds the tag of `s` where the builder put it, with the flags the spec implies, and nowhere
/// in any shorter prefix of the packet (every header truncated).
fn assert_found(s: &Spec) {
    let built = build(s);
    let at = built.tag_at.expect("a packet with a tag");
    let wire = Wire::new(&built.bytes);
    let got = find_tag_in(&wire, &Memory::default(), 0, RUN);
    assert_eq!(got, found(s.seq, s.flags()), "{s:?}: {:02x?}", built.bytes);
    assert_eq!(wire.reads.tag_reads(), vec![at], "{s:?}");
    assert_eq!(at + TAG_LEN + TRAILER.len(), built.bytes.len());
    for len in 0..at + TAG_LEN {
        assert_eq!(find(&built.bytes[..len]), None, "{s:?} cut at {len}");
    }
    check_against_reference(&built.bytes, 0);
}

#[test]
fn udp_and_tcp_over_ipv4_and_ipv6() {
    for v6 in [false, true] {
        for tcp in [false, true] {
            assert_found(&Spec::plain(v6, tcp));
            assert_found(&Spec {
                ip_options: 10,
                tcp_options: 10,
                ..Spec::plain(v6, tcp)
            });
        }
    }
    // UDP: the tag right after the 8-byte header, after 14 + 20 bytes of Ethernet and IPv4.
    assert_eq!(build(&Spec::plain(false, false)).tag_at, Some(14 + 20 + 8));
    assert_eq!(build(&Spec::plain(true, true)).tag_at, Some(14 + 40 + 20));
}

#[test]
fn one_and_two_vlan_tags() {
    for vlans in [
        vec![0x8100],
        vec![0x88a8],
        vec![0x88a8, 0x8100],
        vec![0x8100, 0x8100],
    ] {
        for v6 in [false, true] {
            let s = Spec {
                vlans: vlans.clone(),
                ..Spec::plain(v6, true)
            };
            assert_eq!(s.flags(), FLAG_VLAN);
            assert_found(&s);
        }
    }
    // A third tag is not skipped.
    let s = Spec {
        vlans: vec![0x88a8, 0x8100, 0x8100],
        ..Spec::plain(false, false)
    };
    assert_eq!(find(&build(&s).bytes), None);
}

#[test]
fn vxlan_on_4789_and_8472() {
    for port in VXLAN_PORTS {
        for (inner_v6, tcp, inner_vlans) in [(false, false, vec![]), (true, true, vec![0x8100])] {
            let s = Spec {
                inner_vlans,
                vlans: vec![0x8100],
                ..Spec::tunneled(Tunnel::Vxlan(port), inner_v6, tcp)
            };
            assert_eq!(
                s.flags(),
                FLAG_ENCAP | FLAG_VLAN | TUNNEL_VXLAN << TUNNEL_SHIFT
            );
            assert_found(&s);
            assert_found(&Spec { v6: true, ..s });
        }
    }
    // VXLAN on another UDP port is a UDP payload like any other: no tag at its start.
    let mut b = build(&Spec::tunneled(Tunnel::Vxlan(4789), false, false)).bytes;
    b[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&4790u16.to_be_bytes());
    assert_eq!(find(&b), None);
}

#[test]
fn geneve_with_options() {
    for words in [0, 1, 2, 5, 31, 32, 63] {
        for (inner_v6, tcp) in [(false, false), (true, true), (false, true)] {
            let s = Spec::tunneled(Tunnel::Geneve(words), inner_v6, tcp);
            assert_eq!(s.flags(), FLAG_ENCAP | TUNNEL_GENEVE << TUNNEL_SHIFT);
            assert_found(&s);
            assert_found(&Spec {
                v6: true,
                inner_vlans: vec![0x8100],
                ..s
            });
        }
    }
    // The options are skipped by their length: 8 bytes of UDP, 8 of Geneve, 20 of options.
    let b = build(&Spec::tunneled(Tunnel::Geneve(5), false, false));
    assert_eq!(b.tag_at, Some(14 + 20 + 8 + 8 + 20 + 14 + 20 + 8));
}

#[test]
fn gre_and_gretap_with_optional_words() {
    for bits in 0..16u8 {
        let (csum, key, seq, teb) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, bits & 8 != 0);
        for (v6, inner_v6, tcp) in [
            (false, false, false),
            (true, false, true),
            (false, true, true),
        ] {
            let s = Spec {
                v6,
                inner_vlans: if teb { vec![0x8100] } else { vec![] },
                ..Spec::tunneled(
                    Tunnel::Gre {
                        csum,
                        key,
                        seq,
                        teb,
                    },
                    inner_v6,
                    tcp,
                )
            };
            let vlan = if teb { FLAG_VLAN } else { 0 };
            assert_eq!(s.flags(), FLAG_ENCAP | TUNNEL_GRE << TUNNEL_SHIFT | vlan);
            assert_found(&s);
        }
    }
    // GRE carrying something else (here ARP) is no tunnel the parser enters.
    let mut b = build(&Spec::tunneled(PLAIN_GRE, false, false)).bytes;
    b[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(find(&b), None);
}

#[test]
fn ipv4_fragments_first_and_later() {
    let memory = Memory::default();
    let tc = |b: &[u8]| find_tag_in(&Wire::new(b), &memory, 0, RUN);
    for tcp in [false, true] {
        let first = Spec {
            piece: Piece::First,
            seq: 5 + tcp as u32,
            ..Spec::plain(false, tcp)
        };
        let later = build(&Spec {
            piece: Piece::Later,
            ..first.clone()
        });
        assert_eq!(later.tag_at, None);
        // A later fragment before its first: nothing known, nothing found.
        assert_eq!(tc(&later.bytes), None);
        assert_eq!(tc(&build(&first).bytes), found(first.seq, 0));
        assert_eq!(tc(&later.bytes), found(first.seq, FLAG_FRAGMENT));
        // Another datagram's later fragment (another IP id) is not this one.
        let mut other = later.bytes.clone();
        other[14 + 4] ^= 1;
        assert_eq!(tc(&other), None);
    }
    assert_eq!(memory.frag.borrow().len(), 2);

    // Inside a tunnel: the inner datagram's fragments.
    let memory = Memory::default();
    let tc = |b: &[u8]| find_tag_in(&Wire::new(b), &memory, 0, RUN);
    let first = Spec {
        piece: Piece::First,
        seq: 9,
        vlans: vec![0x8100],
        ..Spec::tunneled(Tunnel::Vxlan(4789), false, false)
    };
    let later = Spec {
        piece: Piece::Later,
        vlans: vec![],
        ..first.clone()
    };
    assert_eq!(tc(&build(&first).bytes), found(9, first.flags()));
    assert_eq!(
        tc(&build(&later).bytes),
        found(9, first.flags() | FLAG_FRAGMENT),
        "the first fragment's flags, and this one's"
    );

    // An overlay whose MTU does not fit the underlay: the outer datagram is fragmented, its
    // later fragments carry neither the tunnel header nor the tag.
    for tunnel in [
        Tunnel::Vxlan(8472),
        Tunnel::Geneve(2),
        Tunnel::Gre {
            csum: true,
            key: true,
            seq: false,
            teb: true,
        },
    ] {
        let first = Spec {
            outer_piece: Piece::First,
            seq: 11,
            ..Spec::tunneled(tunnel, true, false)
        };
        let later = build(&Spec {
            outer_piece: Piece::Later,
            ..first.clone()
        });
        let memory = Memory::default();
        let tc = |b: &[u8]| find_tag_in(&Wire::new(b), &memory, 0, RUN);
        assert_eq!(tc(&later.bytes), None);
        assert_found(&first);
        assert_eq!(tc(&build(&first).bytes), found(11, first.flags()));
        assert_eq!(tc(&later.bytes), found(11, first.flags() | FLAG_FRAGMENT));
    }
}

/// A VM's overlay packet encapsulated again by the host: the tag two tunnels deep, any tunnel
/// inside any other, with FLAG_ENCAP2 and the outer tunnel's kind.
#[test]
fn two_tunnels_deep() {
    let tunnels = [
        Tunnel::Vxlan(8472),
        Tunnel::Vxlan(4789),
        Tunnel::Geneve(3),
        PLAIN_GRE,
        Tunnel::Gre {
            csum: true,
            key: true,
            seq: true,
            teb: true,
        },
    ];
    for vm in tunnels {
        for host in tunnels {
            for (inner_v6, tcp) in [(false, false), (true, true)] {
                let s = Spec {
                    host: Some(host),
                    vlans: vec![0x8100],
                    ..Spec::tunneled(vm, inner_v6, tcp)
                };
                let want = FLAG_ENCAP | FLAG_ENCAP2 | FLAG_VLAN | host.kind() << TUNNEL_SHIFT;
                assert_eq!(s.flags(), want, "{s:?}");
                assert_found(&s);
            }
        }
    }
    // Through one tunnel only (the function hooks' programs): two deep is not entered, one is.
    let one_level = |s: &Spec| {
        let b = build(s).bytes;
        find_tag_one_level(&Wire::new(&b), &Memory::default(), 0, RUN)
    };
    let vm = Spec::tunneled(Tunnel::Vxlan(8472), false, false);
    assert_eq!(one_level(&vm), found(vm.seq, vm.flags()));
    let deep = Spec {
        host: Some(Tunnel::Vxlan(4789)),
        ..vm
    };
    assert_eq!(one_level(&deep), None);
    // The host's tunnel around a packet of no overlay: one tunnel.
    let s = Spec {
        host: Some(Tunnel::Geneve(0)),
        ..Spec::plain(false, true)
    };
    assert_eq!(s.flags(), FLAG_ENCAP | TUNNEL_GENEVE << TUNNEL_SHIFT);
    assert_found(&s);
    // VXLAN to flannel's port 8 bytes into UDP, 14 + 20 + 8 + 8 bytes per level.
    let b = build(&Spec {
        host: Some(Tunnel::Vxlan(4789)),
        ..Spec::tunneled(Tunnel::Vxlan(8472), false, false)
    });
    assert_eq!(b.tag_at, Some(2 * (14 + 20 + 8 + 8) + 14 + 20 + 8));
}

/// Fragments of a packet two tunnels deep find their tag through what their first fragment
/// left: the host's datagram fragmented, the VM's inside it, each seen inside the host's
/// tunnel or without it (on the VM's tap, before the host encapsulates).
#[test]
fn fragments_two_tunnels_deep() {
    let vm = Spec {
        seq: 21,
        ..Spec::tunneled(Tunnel::Vxlan(8472), false, false)
    };
    let host = |s: &Spec| Spec {
        host: Some(Tunnel::Geneve(1)),
        ..s.clone()
    };
    let piece = |s: &Spec, outer_piece| Spec {
        outer_piece,
        ..s.clone()
    };
    let deep = host(&vm);
    // The host's datagram fragmented: its later fragments carry no tunnel header.
    let memory = Memory::default();
    let tc = |b: &[u8]| find_tag_in(&Wire::new(b), &memory, 0, RUN);
    let first = Spec {
        host_piece: Piece::First,
        ..deep.clone()
    };
    let later = Spec {
        host_piece: Piece::Later,
        ..deep.clone()
    };
    assert_eq!(tc(&build(&later).bytes), None);
    assert_eq!(tc(&build(&first).bytes), found(21, deep.flags()));
    assert_eq!(
        tc(&build(&later).bytes),
        found(21, deep.flags() | FLAG_FRAGMENT)
    );

    // The VM's datagram fragmented (its overlay MTU too large), each fragment encapsulated by
    // the host: the first fragment seen on the tap (one tunnel) or inside the host's (two), the
    // later ones either way; each time with the depth where it is seen.
    for first_inside_host in [false, true] {
        let memory = Memory::default();
        let tc = |b: &[u8]| find_tag_in(&Wire::new(b), &memory, 0, RUN);
        let first = piece(&vm, Piece::First);
        let first = if first_inside_host {
            host(&first)
        } else {
            first
        };
        assert_eq!(tc(&build(&first).bytes), found(21, first.flags()));
        let later = piece(&vm, Piece::Later);
        assert_eq!(
            tc(&build(&later).bytes),
            found(21, vm.flags() | FLAG_FRAGMENT)
        );
        let later = host(&later);
        assert_eq!(
            tc(&build(&later).bytes),
            found(21, deep.flags() | FLAG_FRAGMENT),
            "first fragment inside the host's tunnel: {first_inside_host}"
        );
    }

    // The innermost datagram fragmented, two tunnels deep.
    let memory = Memory::default();
    let tc = |b: &[u8]| find_tag_in(&Wire::new(b), &memory, 0, RUN);
    let first = Spec {
        piece: Piece::First,
        ..deep.clone()
    };
    assert_eq!(tc(&build(&first).bytes), found(21, deep.flags()));
    let later = Spec {
        piece: Piece::Later,
        ..deep.clone()
    };
    assert_eq!(
        tc(&build(&later).bytes),
        found(21, deep.flags() | FLAG_FRAGMENT)
    );
}

#[test]
fn truncated_headers_find_nothing() {
    // assert_found cuts every packet at every length; here the cuts inside each header.
    let b = build(&Spec::tunneled(Tunnel::Geneve(3), false, true)).bytes;
    for len in [
        0, 1, 12, 13, 14, 20, 33, 34, 41, 42, 49, 50, 61, 62, 75, 76, 89, 90,
    ] {
        let cut = &b[..len];
        assert_eq!(find(cut), None, "cut at {len}");
        assert!(
            !ports_match(&Wire::new(cut), 6081) || len >= 14 + 20 + 4,
            "cut at {len}"
        );
        check_against_reference(cut, 0);
    }
    // A frame too short for its Ethernet header, or for IPv4's 20 bytes.
    assert_eq!(find(&[0; 13]), None);
    assert!(parse_flows(&Wire::new(&eth(&[], 0x0800, &[0x45; 19]))).is_none());
}

#[test]
fn tcp_tags_are_remembered_for_tracepoints_that_cannot_read_the_payload() {
    let s = Spec {
        vlans: vec![0x8100],
        ..Spec::plain(false, true)
    };
    let b = build(&s);
    let payload = b.tag_at.unwrap();
    let memory = Memory::default();
    // A tracepoint first: the payload is paged, nothing remembered, the segment counted.
    let skb = Skb::new(&b.bytes, payload, 0);
    assert_eq!(find_tag_in(&skb, &memory, 0, RUN), None);
    assert_eq!(memory.unreadable.get(), 1);
    // tc reads it, and remembers it for the hooks after.
    assert_eq!(
        find_tag_in(&Wire::new(&b.bytes), &memory, 0, RUN),
        found(s.seq, FLAG_VLAN)
    );
    // The segment again, seen by a tracepoint without its VLAN tag (it was popped).
    let untagged = build(&Spec::plain(false, true));
    let skb = Skb::new(&untagged.bytes, untagged.tag_at.unwrap(), 0);
    assert_eq!(
        find_tag_in(&skb, &memory, 0, RUN),
        found(s.seq, 0),
        "this hop's own flags"
    );
    assert_eq!(memory.unreadable.get(), 1);
    // A tracepoint that reaches the whole payload in the linear part reads it directly.
    let skb = Skb::new(&untagged.bytes, untagged.bytes.len(), 0);
    assert_eq!(
        find_tag_in(&skb, &Memory::default(), 0, RUN),
        found(s.seq, 0)
    );

    // A bare ACK carries the seq of the next data byte, the tagged segment's: not its tag.
    let mut ack = untagged.bytes[..untagged.tag_at.unwrap()].to_vec();
    ack[14 + 2..14 + 4].copy_from_slice(&40u16.to_be_bytes()); // IPv4 total length: 20 + 20
    assert_eq!(find_tag_in(&Wire::new(&ack), &memory, 0, RUN), None);
    assert_eq!(
        find_tag_in(&Skb::new(&ack, ack.len(), 0), &memory, 0, RUN),
        None
    );
}

#[test]
fn port_run_id_and_magic_select_the_tag() {
    let s = Spec::tunneled(Tunnel::Vxlan(4789), false, false);
    let b = build(&s).bytes;
    let with = |port: u16, run_id: u32| {
        let wire = Wire::new(&b);
        let got = find_tag_in(&wire, &Memory::default(), port, run_id);
        (got, wire.reads.tag_reads().len())
    };
    // The innermost ports filter, not the tunnel's.
    assert_eq!(with(s.dport, RUN), (found(s.seq, s.flags()), 1));
    assert_eq!(with(s.sport, RUN), (found(s.seq, s.flags()), 1));
    assert_eq!(
        with(4789, RUN),
        (None, 0),
        "the payload is not read for other ports"
    );
    assert_eq!(with(0, RUN ^ 1), (None, 1), "another run's tag");
    let mut other = b.clone();
    let at = build(&s).tag_at.unwrap();
    other[at] ^= 0x80;
    assert_eq!(find(&other), None, "no magic");
}

#[test]
fn flows_report_outer_and_inner_headers() {
    let s = Spec {
        vlans: vec![0x88a8],
        ..Spec::tunneled(Tunnel::Vxlan(4789), true, true)
    };
    let f = parse_flows(&Wire::new(&build(&s).bytes)).expect("flows");
    assert!(f.has_inner);
    assert_eq!(f.flags, s.flags());
    let o = &f.outer;
    assert_eq!(
        (o.family, o.proto, o.sport, o.dport),
        (4, 17, OUTER_SPORT, 4789)
    );
    assert_eq!(
        (&o.saddr[..4], &o.daddr[..4]),
        (&OUTER_V4[0][..], &OUTER_V4[1][..])
    );
    assert_eq!((o.ip_id, o.seq), (OUTER_ID, 0));
    let udp_len = 8 + 8 + 14 + 40 + 20 + TAG_LEN + TRAILER.len();
    assert_eq!(o.l4_len as usize, udp_len);
    let i = f.innermost();
    assert_eq!(
        (i.family, i.proto, i.sport, i.dport),
        (6, 6, s.sport, s.dport)
    );
    assert_eq!((i.saddr, i.daddr), (INNER_V6[0], INNER_V6[1]));
    assert_eq!(
        (i.ip_id, i.seq, i.l4_len as usize),
        (0, 1000 + s.seq, 20 + TAG_LEN + TRAILER.len())
    );

    let plain = parse_flows(&Wire::new(&build(&Spec::plain(false, false)).bytes)).expect("flows");
    assert!(!plain.has_inner);
    assert_eq!(plain.innermost().ip_id, INNER_ID);
    assert_eq!(plain.innermost().sport, 40000);

    // A short datagram to a tunnel's port, or a tunnel header cut short: the outer headers.
    for dport in [4789, 8472, GENEVE_PORT] {
        let short = eth(
            &[],
            0x0800,
            &ipv4(17, OUTER_V4, 1, 0, 0, &udp(53, dport, b"hi")),
        );
        let f = parse_flows(&Wire::new(&short)).expect("the outer headers");
        assert!(!f.has_inner);
        assert_eq!((f.outer.sport, f.outer.dport), (53, dport));
        assert_eq!(f.innermost().dport, dport);
    }

    // A later fragment: addresses and IP id, no ports.
    let later = build(&Spec {
        piece: Piece::Later,
        ..Spec::plain(false, false)
    });
    let f = parse_flows(&Wire::new(&later.bytes)).expect("flows");
    assert_eq!(
        (f.outer.sport, f.outer.dport, f.outer.ip_id),
        (0, 0, INNER_ID)
    );
}

/// What two nodes compare to recognise one packet: the same on both ends of a wire, and
/// different for datagrams alike but for their payload.
#[test]
fn wire_identity_reads_numbers_and_tells_datagrams_apart_by_their_payload() {
    let datagram = |payload: &[u8]| {
        let f = eth(
            &[],
            0x0800,
            &ipv4(17, OUTER_V4, 0, 0x4000, 0, &udp(53, 5353, payload)),
        );
        let flows = parse_flows(&Wire::new(&f)).expect("flows");
        let w = wire_flow(flows.innermost());
        (w, payload_hash(&Wire::new(&f), flows.innermost()))
    };
    let (w, a) = datagram(b"req 1 of many");
    assert_eq!(
        (w.saddr, w.daddr, w.sport, w.dport, w.ip_id, w.proto),
        (0xc0a8_3201, 0xc0a8_3202, 53, 5353, 0, 17)
    );
    let (_, same) = datagram(b"req 1 of many");
    let (_, other) = datagram(b"req 2 of many");
    assert_eq!(a, same, "a datagram hashes alike wherever it is read");
    assert_ne!(
        a, other,
        "datagrams alike but for their payload must differ"
    );
    assert_ne!(a, 0);
    // Only the first 8 bytes count: datagrams that differ later are alike (and ambiguous).
    assert_eq!(a, datagram(b"req 1 of more").1);
    // Fewer than 8 bytes after the header: nothing to hash.
    assert_eq!(datagram(b"short").1, 0);

    // TCP: the sequence number tells segments apart, the payload is not read.
    let seg = eth(
        &[],
        0x0800,
        &ipv4(
            6,
            OUTER_V4,
            7,
            0,
            0,
            &tcp(80, 4000, 99, 0, b"GET / HTTP/1.1"),
        ),
    );
    let flows = parse_flows(&Wire::new(&seg)).expect("flows");
    assert_eq!(payload_hash(&Wire::new(&seg), flows.innermost()), 0);
    assert_eq!(flows.innermost().seq, 99);

    // IPv6 addresses fold to the xor of their words.
    let v6 = eth(&[], 0x86dd, &ipv6(17, INNER_V6, &udp(1, 2, b"0123456789")));
    let flows = parse_flows(&Wire::new(&v6)).expect("flows");
    assert_eq!(wire_flow(flows.innermost()).saddr, (0xfd00 << 16) ^ 5);
}

#[test]
fn ports_match_looks_at_the_outermost_ports() {
    let plain = build(&Spec::plain(true, false)).bytes;
    assert!(ports_match(&Wire::new(&plain), 9000));
    assert!(ports_match(&Wire::new(&plain), 40000));
    assert!(!ports_match(&Wire::new(&plain), 9001));
    let vxlan = build(&Spec::tunneled(Tunnel::Vxlan(8472), false, true)).bytes;
    assert!(ports_match(&Wire::new(&vxlan), 8472));
    assert!(!ports_match(&Wire::new(&vxlan), 9000));
    let later = build(&Spec {
        piece: Piece::Later,
        ..Spec::plain(false, false)
    });
    assert!(
        !ports_match(&Wire::new(&later.bytes), 0),
        "no ports in a later fragment"
    );
    let gre = build(&Spec::tunneled(PLAIN_GRE, false, false));
    assert!(
        !ports_match(&Wire::new(&gre.bytes), 9000),
        "GRE has no ports"
    );
}

// ---------------------------------------------------------------------------------------------
// Property tests.

/// `cases` per property test, or $PROPTEST_CASES (`cargo xtask fuzz`); no regression files.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn spec() -> impl Strategy<Value = Spec> {
    let tpid = || prop_oneof![Just(0x8100u16), Just(0x88a8)];
    let tunnel = prop_oneof![
        2 => Just(None),
        1 => prop::sample::select(VXLAN_PORTS.to_vec()).prop_map(|p| Some(Tunnel::Vxlan(p))),
        1 => (0u8..64).prop_map(|w| Some(Tunnel::Geneve(w))),
        1 => any::<[bool; 4]>().prop_map(|[csum, key, seq, teb]| Some(Tunnel::Gre { csum, key, seq, teb })),
    ];
    let host = prop_oneof![
        3 => Just(None),
        1 => prop::sample::select(VXLAN_PORTS.to_vec()).prop_map(|p| Some(Tunnel::Vxlan(p))),
        1 => (0u8..64).prop_map(|w| Some(Tunnel::Geneve(w))),
        1 => any::<[bool; 4]>().prop_map(|[csum, key, seq, teb]| Some(Tunnel::Gre { csum, key, seq, teb })),
    ];
    let piece =
        || prop_oneof![6 => Just(Piece::Whole), 1 => Just(Piece::First), 1 => Just(Piece::Later)];
    (
        (
            vec(tpid(), 0..=2),
            any::<bool>(),
            tunnel,
            vec(tpid(), 0..=2),
            any::<bool>(),
        ),
        (any::<bool>(), any::<u16>(), any::<u16>(), any::<u32>()),
        (0u8..=10, 0u8..=10, piece(), piece()),
        (host, piece()),
    )
        .prop_map(
            |(
                (vlans, v6, tunnel, inner_vlans, inner_v6),
                (tcp, sport, mut dport, seq),
                (ip_options, tcp_options, piece, outer_piece),
                (host, host_piece),
            )| {
                // Plain UDP to a tunnel's port is that tunnel to the parser, up to two deep.
                let deepest = tunnel.is_some() && host.is_some();
                if !deepest && !tcp && [4789, 8472, GENEVE_PORT].contains(&dport) {
                    dport = 9;
                }
                Spec {
                    vlans,
                    v6,
                    tunnel,
                    inner_vlans,
                    inner_v6,
                    tcp,
                    sport,
                    dport,
                    seq,
                    ip_options,
                    tcp_options,
                    piece,
                    outer_piece,
                    host,
                    host_piece,
                }
            },
        )
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    /// A byte set to a value the parser branches on.
    Set(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

/// Ethertype, protocol, port, flag and length bytes.
const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x06, 0x08, 0x11, 0x12, 0x14, 0x17, 0x18, 0x20, 0x21, 0x2f, 0x3a, 0x40, 0x45, 0x4f,
    0x50, 0x58, 0x60, 0x65, 0x81, 0x86, 0x88, 0xa8, 0xb5, 0xc1, 0xdd, 0xf0, 0xff,
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), prop::sample::select(INTERESTING)).prop_map(|(i, x)| Mutation::Set(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        (any::<usize>(), vec(any::<u8>(), 1..9)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1..9usize).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

fn mutate(b: &mut Vec<u8>, m: &Mutation) {
    let len = b.len();
    match m {
        Mutation::Flip(i, x) if len > 0 => b[i % len] ^= x,
        Mutation::Set(i, x) if len > 0 => b[i % len] = *x,
        Mutation::Truncate(n) => b.truncate(n % (len + 1)),
        Mutation::Extend(more) => b.extend(more),
        Mutation::Insert(i, more) => {
            let at = i % (len + 1);
            b.splice(at..at, more.iter().copied());
        }
        Mutation::Remove(i, n) if len > 0 => {
            let at = i % len;
            b.drain(at..(at + n).min(len));
        }
        _ => {}
    }
}

fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (spec(), vec(mutation(), 1..6)).prop_map(|(s, ms)| {
        let mut b = build(&s).bytes;
        for m in &ms {
            mutate(&mut b, m);
        }
        b
    })
}

/// Any port, or one the packet may carry.
fn port() -> impl Strategy<Value = u16> {
    prop_oneof![3 => Just(0u16), 1 => Just(9000u16), 1 => Just(40000u16), 1 => any::<u16>()]
}

/// Every entry point in both ways of reading, none may panic or read without bound.
fn check_no_panic(b: &[u8], port: u16, linear: usize, garbage: u8, memory: &Memory) {
    let skb = Skb::new(b, linear, garbage);
    let _ = find_tag_in(&skb, memory, port, RUN);
    skb.reads.check_bounded("find_tag (tracepoint)");
    let skb = Skb::new(b, linear, garbage);
    let _ = parse_flows(&skb);
    let _ = ports_match(&skb, port);
    skb.reads
        .check_bounded("flows and ports_match (tracepoint)");
    let wire = Wire::new(b);
    let _ = find_tag_in(&wire, memory, port, RUN);
    let _ = ports_match(&wire, port);
    wire.reads.check_bounded("find_tag and ports_match");
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn prop_arbitrary_bytes(b in vec(any::<u8>(), 0..300), port in port(), linear in 0..300usize, garbage: u8) {
        check_no_panic(&b, port, linear, garbage, &Memory::default());
        check_against_reference(&b, port);
    }

    #[test]
    fn prop_built_packets_are_found_where_built(s in spec()) {
        let built = build(&s);
        let got = find(&built.bytes);
        match built.tag_at {
            Some(at) => {
                prop_assert_eq!(got, found(s.seq, s.flags()));
                let expect = reference(&built.bytes, 0);
                let Expect::TagAt { at: want, flags, .. } = expect else {
                    panic!("reference: {expect:?} for {s:?}")
                };
                prop_assert_eq!((want, flags), (at, s.flags()));
            }
            None => {
                prop_assert_eq!(got, None);
                prop_assert_eq!(reference(&built.bytes, 0), Expect::Unknown);
            }
        }
        check_against_reference(&built.bytes, s.dport);
    }

    #[test]
    fn prop_mutated_packets_agree_with_the_reference(b in mutated(), port in port(), linear in 0..400usize, garbage: u8) {
        check_no_panic(&b, port, linear, garbage, &Memory::default());
        check_against_reference(&b, port);
    }

    /// With a linear part that covers the packet and the first HEAD bytes, a tracepoint sees
    /// what tc sees.
    #[test]
    fn prop_tracepoint_and_tc_agree_on_linear_packets(mut b in mutated(), port in port(), pad: u8, garbage: u8) {
        if b.len() < HEAD {
            b.resize(HEAD, pad);
        }
        let tc = find_tag_in(&Wire::new(&b), &Memory::default(), port, RUN);
        let tp = find_tag_in(&Skb::new(&b, b.len(), garbage), &Memory::default(), port, RUN);
        prop_assert_eq!(tc, tp);
    }

    /// Packets one after the other through the same maps, read either way: every tag reported
    /// is in one of the packets seen so far.
    #[test]
    fn prop_remembered_tags_come_from_earlier_packets(
        packets in vec((mutated(), any::<bool>(), 0..400usize), 1..12),
        garbage: u8,
    ) {
        let memory = Memory::default();
        let mut seen: Vec<&[u8]> = Vec::new();
        for (b, by_tc, linear) in &packets {
            seen.push(b);
            let got = if *by_tc {
                find_tag_in(&Wire::new(b), &memory, 0, RUN)
            } else {
                find_tag_in(&Skb::new(b, *linear, garbage), &memory, 0, RUN)
            };
            if let Some(f) = got {
                let raw = f.tag.to_bytes();
                let carried = seen.iter().any(|p| p.windows(TAG_LEN).any(|w| w == raw));
                // A tracepoint's first HEAD bytes may come from the buffer's tailroom.
                let from_garbage = raw.contains(&garbage);
                prop_assert!(carried || from_garbage, "{f:?} in none of {packets:02x?}");
            }
            check_no_panic(b, 0, *linear, garbage, &memory);
        }
    }
}
