//! The physical floor: empty programs at the tracepoints `profiler attach` uses, so that a
//! benchmark measures what the kernel charges for calling any program there (`cargo xtask
//! overhead` compares attach with these, in the same run).

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

macro_rules! empty_tracepoint {
    ($name:ident, $tp:literal) => {
        #[btf_tracepoint(function = $tp)]
        pub fn $name(_ctx: BtfTracePointContext) -> i32 {
            0
        }
    };
}

empty_tracepoint!(floor_net_dev_queue, "net_dev_queue");
empty_tracepoint!(floor_net_dev_start_xmit, "net_dev_start_xmit");
empty_tracepoint!(floor_netif_rx, "netif_rx");
empty_tracepoint!(floor_napi_gro_receive_entry, "napi_gro_receive_entry");
empty_tracepoint!(floor_netif_receive_skb, "netif_receive_skb");
empty_tracepoint!(floor_kfree_skb, "kfree_skb");
empty_tracepoint!(floor_consume_skb, "consume_skb");
