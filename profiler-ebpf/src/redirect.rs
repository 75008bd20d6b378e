//! The `ebpf-redirect` lab's datapath, as Cilium's: a tc program on each pod's host-side veth
//! (its ingress: what the pod sends) and on the host's device towards other hosts looks the
//! destination address up. A pod of this host gets the frame in its eth0 with
//! `bpf_redirect_peer`, past the bridge, the backlog and the host stack, its MACs rewritten as
//! a router would; a pod of another host is reached with `bpf_redirect_neigh` out of the
//! device towards it, past the host stack's forwarding.
//!
//! Not one of the profiler's hooks: the lab (`profiler::lab::redirect`) loads it, fills
//! REDIRECT_TO and leaves it attached as a clsact filter for the lab's life.

use core::ptr::null_mut;

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::generated::{bpf_redirect_neigh, bpf_redirect_peer},
    macros::classifier,
    macros::map,
    maps::HashMap,
    programs::TcContext,
};
use profiler_common::{RedirectTarget, REDIRECT_TARGETS};

/// Destination IPv4 address (as in the packet) -> where it goes.
#[map]
static REDIRECT_TO: HashMap<u32, RedirectTarget> = HashMap::with_max_entries(REDIRECT_TARGETS, 0);

const ETH_P_IP: u16 = 0x0800;
/// The IPv4 destination's offset in an Ethernet frame.
const DST_ADDR: usize = 14 + 16;

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
    let dst: u32 = ctx.load(DST_ADDR).ok()?;
    let to = *unsafe { REDIRECT_TO.get(&dst) }?;
    if to.neigh != 0 {
        return Some(unsafe { bpf_redirect_neigh(to.ifindex, null_mut(), 0, 0) } as i32);
    }
    ctx.store(0, &to.dst_mac, 0).ok()?;
    ctx.store(6, &to.src_mac, 0).ok()?;
    Some(unsafe { bpf_redirect_peer(to.ifindex, 0) } as i32)
}
