//! The `ebpf-redirect` lab's datapath, as Cilium's: a tc program on each pod's host-side veth
//! (its ingress: what the pod sends) and on the host's device towards other hosts looks the
//! destination address up. A pod of this host gets the frame in its eth0 with
//! `bpf_redirect_peer`, past the bridge, the backlog and the host stack, its MACs rewritten as
//! a router would; a pod of another host is reached with `bpf_redirect_neigh` out of the
//! device towards it, past the host stack's forwarding.
//!
//! With a Service (`--service ebpf`) it also translates, as Cilium's kube-proxy replacement
//! does in the same program: a packet to a Service port gets its backend as destination before
//! the lookup, the connection remembered; a reply of a remembered connection gets the
//! Service's address back as source. kube-proxy's netfilter rules would never see these
//! packets: the redirects skip the host stack.
//!
//! Not one of the profiler's hooks: the lab (`profiler::lab::redirect`) loads it, fills
//! REDIRECT_TO (and SERVICES) and leaves it attached as a clsact filter for the lab's life.

use core::ptr::null_mut;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_UNSPEC},
    helpers::generated::{bpf_redirect_neigh, bpf_redirect_peer},
    macros::classifier,
    macros::map,
    maps::{HashMap, LruHashMap},
    programs::TcContext,
};
use profiler_common::{
    Endpoint, NatKey, RedirectTarget, ServiceKey, NAT_CONNECTIONS, REDIRECT_TARGETS, SERVICE_PORTS,
};

/// Destination IPv4 address (as in the packet) -> where it goes.
#[map]
static REDIRECT_TO: HashMap<u32, RedirectTarget> = HashMap::with_max_entries(REDIRECT_TARGETS, 0);
/// Service port -> its backend (the lab's Service has one endpoint).
#[map]
static SERVICES: HashMap<ServiceKey, Endpoint> = HashMap::with_max_entries(SERVICE_PORTS, 0);
/// Connections translated by this host -> the Service endpoint their replies come from.
#[map]
static NAT: LruHashMap<NatKey, Endpoint> = LruHashMap::with_max_entries(NAT_CONNECTIONS, 0);

const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Offsets in an Ethernet frame: the IPv4 header and its fields, and the transport header of
/// a packet without IP options (the translation leaves packets with options alone).
const IP: usize = 14;
const IP_CSUM: usize = IP + 10;
const SRC_ADDR: usize = IP + 12;
const DST_ADDR: usize = IP + 16;
const L4: usize = IP + 20;

#[classifier]
pub fn tc_redirect(mut ctx: TcContext) -> i32 {
    redirect(&mut ctx).unwrap_or(TC_ACT_UNSPEC)
}

/// The redirect's verdict, or None for a packet the table has no pod for (left to the host:
/// ARP, and what is for the host itself).
fn redirect(ctx: &mut TcContext) -> Option<i32> {
    let proto: u16 = ctx.load(12).ok()?;
    if u16::from_be(proto) != ETH_P_IP {
        return None;
    }
    let dst = translate(ctx, ctx.load(DST_ADDR).ok()?);
    let to = *unsafe { REDIRECT_TO.get(&dst) }?;
    if to.neigh != 0 {
        return Some(unsafe { bpf_redirect_neigh(to.ifindex, null_mut(), 0, 0) } as i32);
    }
    ctx.store(0, &to.dst_mac, 0).ok()?;
    ctx.store(6, &to.src_mac, 0).ok()?;
    Some(unsafe { bpf_redirect_peer(to.ifindex, 0) } as i32)
}

/// The Service translation before the lookup; returns the destination after it.
fn translate(ctx: &mut TcContext, dst: u32) -> u32 {
    let Some((proto, from, to)) = transport(ctx, dst) else {
        return dst;
    };
    let service = ServiceKey {
        vip: to,
        proto,
        _pad: [0; 3],
    };
    if let Some(&backend) = unsafe { SERVICES.get(&service) } {
        if rewrite(ctx, proto, (DST_ADDR, L4 + 2), to, backend).is_none() {
            return dst;
        }
        let conn = NatKey {
            client: from,
            backend,
            proto,
            _pad: [0; 3],
        };
        let _ = NAT.insert(&conn, &to, 0);
        return backend.addr;
    }
    // A reply comes from the backend and goes to the client.
    let reply = NatKey {
        client: to,
        backend: from,
        proto,
        _pad: [0; 3],
    };
    if let Some(&vip) = unsafe { NAT.get(&reply) } {
        let _ = rewrite(ctx, proto, (SRC_ADDR, L4), from, vip);
    }
    dst
}

/// A UDP or TCP packet's protocol, source and destination endpoints (None for anything else,
/// for IP options and for fragments).
fn transport(ctx: &TcContext, dst: u32) -> Option<(u8, Endpoint, Endpoint)> {
    let version_ihl: u8 = ctx.load(IP).ok()?;
    let frag: u16 = ctx.load(IP + 6).ok()?;
    let proto: u8 = ctx.load(IP + 9).ok()?;
    if version_ihl != 0x45 || u16::from_be(frag) & 0x3fff != 0 {
        return None;
    }
    if proto != IPPROTO_UDP && proto != IPPROTO_TCP {
        return None;
    }
    let src = Endpoint {
        addr: ctx.load(SRC_ADDR).ok()?,
        port: ctx.load(L4).ok()?,
        _pad: 0,
    };
    let dst = Endpoint {
        addr: dst,
        port: ctx.load(L4 + 2).ok()?,
        _pad: 0,
    };
    Some((proto, src, dst))
}

/// Replaces endpoint `from` by `to` at (address, port) offsets `at`, with the IPv4 and the
/// transport checksums updated (a UDP checksum of 0, none, stays 0).
fn rewrite(
    ctx: &mut TcContext,
    proto: u8,
    at: (usize, usize),
    from: Endpoint,
    to: Endpoint,
) -> Option<()> {
    let (csum, zero) = match proto {
        IPPROTO_UDP => (L4 + 6, u64::from(BPF_F_MARK_MANGLED_0)),
        _ => (L4 + 16, 0),
    };
    let (old_addr, new_addr) = (u64::from(from.addr), u64::from(to.addr));
    let pseudo = u64::from(BPF_F_PSEUDO_HDR);
    ctx.l4_csum_replace(csum, old_addr, new_addr, pseudo | zero | 4)
        .ok()?;
    (ctx.l4_csum_replace(csum, u64::from(from.port), u64::from(to.port), zero | 2)).ok()?;
    ctx.l3_csum_replace(IP_CSUM, old_addr, new_addr, 4).ok()?;
    ctx.store(at.0, &to.addr, 0).ok()?;
    ctx.store(at.1, &to.port, 0).ok()
}
