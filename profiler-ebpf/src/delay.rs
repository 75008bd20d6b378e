//! Ground-truth delay injector: a tc program that holds matching packets for a known time, so
//! that tests (and users' what-if experiments) can check which segment of the path grows.
//!
//! Not part of the profiler's own hooks: userspace (`profiler::kernel::delay`) loads it as a separate
//! instance of this object with DELAY_NS / DELAY_PORT set, and attaches it first in the tcx chain.
//! It matches packets by port with `parse::ports_match`, the profiler's own header walk.

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

#[classifier]
pub fn tc_delay(ctx: TcContext) -> i32 {
    let start = unsafe { bpf_ktime_get_ns() };
    let delay = unsafe { core::ptr::read_volatile(&DELAY_NS) };
    let port = unsafe { core::ptr::read_volatile(&DELAY_PORT) };
    if delay != 0 && (port == 0 || crate::parse::ports_match(&ctx, port)) {
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
