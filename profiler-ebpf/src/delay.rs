//! Ground-truth delay injector: a tc program that holds matching packets for a known time, so
//! that tests (and users' what-if experiments) can check which segment of the path grows.
//!
//! Not part of the profiler's own hooks: userspace (`profiler::inject`) loads it as a separate
//! instance of this object with DELAY_NS / DELAY_PORT set, and attaches it first in the tcx chain.
//! It parses headers on its own (`ctx.load`), independently of `parse.rs`.

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC, helpers::bpf_ktime_get_ns, helpers::generated::bpf_loop,
    macros::classifier, programs::TcContext,
};

/// How long to hold each matching packet, in nanoseconds; set by the loader.
#[unsafe(no_mangle)]
static DELAY_NS: u64 = 0;

/// UDP/TCP port (host order) whose packets are held, as source or destination; 0 holds every
/// packet, whatever it carries. Set by the loader.
#[unsafe(no_mangle)]
static DELAY_PORT: u16 = 0;

/// Upper bound on clock checks per packet (about 50 ms at the cost of one helper call each), so
/// that a wrong DELAY_NS cannot hold a CPU for long.
const MAX_SPINS: u32 = 1 << 20;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

#[repr(C)]
struct Wait {
    start: u64,
    delay: u64,
}

/// bpf_loop callback: 1 stops the loop once the clock has advanced by the delay.
extern "C" fn spin(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let w = ctx as *const Wait;
    let (start, delay) = unsafe { ((*w).start, (*w).delay) };
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(start) >= delay {
        1
    } else {
        0
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Whether the packet is IPv4/IPv6 UDP or TCP with `port` as source or destination port.
#[inline(always)]
fn matches(ctx: &TcContext, port: u16) -> Option<bool> {
    let mut off = 12usize;
    let mut ethertype = be16(ctx.load::<[u8; 2]>(off).ok()?);
    off += 2;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        // One tag: TCI, then the inner ethertype.
        ethertype = be16(ctx.load::<[u8; 2]>(off + 2).ok()?);
        off += 4;
    }
    let (proto, l4) = match ethertype {
        ETH_P_IP => {
            let ip: [u8; 20] = ctx.load(off).ok()?;
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            // Non-first fragments carry no ports.
            if ihl < 20 || be16([ip[6], ip[7]]) & 0x1fff != 0 {
                return Some(false);
            }
            (ip[9], off + ihl)
        }
        ETH_P_IPV6 => {
            let nexthdr: u8 = ctx.load(off + 6).ok()?;
            (nexthdr, off + 40)
        }
        _ => return Some(false),
    };
    if proto != IPPROTO_UDP && proto != IPPROTO_TCP {
        return Some(false);
    }
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    Some(be16([ports[0], ports[1]]) == port || be16([ports[2], ports[3]]) == port)
}

#[classifier]
pub fn tc_delay(ctx: TcContext) -> i32 {
    let start = unsafe { bpf_ktime_get_ns() };
    let delay = unsafe { core::ptr::read_volatile(&DELAY_NS) };
    let port = unsafe { core::ptr::read_volatile(&DELAY_PORT) };
    if delay != 0 && (port == 0 || matches(&ctx, port) == Some(true)) {
        let mut w = Wait { start, delay };
        unsafe {
            bpf_loop(
                MAX_SPINS,
                spin as *mut core::ffi::c_void,
                &mut w as *mut Wait as *mut core::ffi::c_void,
                0,
            );
        }
    }
    // TC_ACT_UNSPEC (TCX_NEXT): never decide the packet's fate, let the next program run.
    TC_ACT_UNSPEC
}
