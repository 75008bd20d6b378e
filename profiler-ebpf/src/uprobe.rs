//! User probes as hops (`profiler run --uprobe BINARY:SYMBOL[@LABEL]`): a userspace datapath's
//! function that holds a frame. Convention: the first argument points to the frame's bytes
//! from its Ethernet header on, the second is the frame's length. The tag is found as the
//! device hooks find it, reading user memory; the probe's index in the run's list is the
//! attach cookie, and rides in the event's ifindex.

use aya_ebpf::{
    helpers::{bpf_get_attach_cookie, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::uprobe,
    programs::ProbeContext,
    EbpfContext,
};
use profiler_common::HOOK_UPROBE;

use crate::{
    global, parse,
    run::{emit, PORT, RUN_ID},
};

/// Frames longer than this are not user frames (a wrong argument convention).
const MAX_FRAME: usize = 65_536 + 64;

/// A frame in the probed process's memory.
struct UserFrame {
    data: u64,
    len: usize,
}

impl parse::Packet for UserFrame {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        if offset + N > self.len {
            return None;
        }
        let at = (self.data as usize + offset) as *const [u8; N];
        unsafe { bpf_probe_read_user(at) }.ok()
    }

    fn reaches_paged(&self) -> bool {
        // The whole frame is one buffer: nothing lies out of reach.
        true
    }

    fn has_paged_payload(&self, _offset: usize) -> bool {
        false
    }
}

#[uprobe]
pub fn up_hop(ctx: ProbeContext) -> u32 {
    let ts = unsafe { bpf_ktime_get_ns() };
    let (Some(data), Some(len)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return 0;
    };
    let len = len as usize;
    if data == 0 || len > MAX_FRAME {
        return 0;
    }
    let frame = UserFrame { data, len };
    if let Some(found) = parse::find_tag(&frame, global(&PORT), global(&RUN_ID)) {
        let probe = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
        emit(HOOK_UPROBE, &found, probe, 0, len as u32, 0, ts);
    }
    0
}
