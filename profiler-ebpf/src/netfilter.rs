//! Programs at netfilter's IPv4 hooks on both sides of the NAT (BPF netfilter links), so that
//! a Service's DNAT, and the un-DNAT of its replies, is a segment of its own.
//!
//! Their context is `struct bpf_nf_ctx { const struct nf_hook_state *state; struct sk_buff
//! *skb; }`. aya 0.14 has no netfilter program type: they sit in the "classifier" section only
//! so that its object parser takes them, and the loader (profiler::kernel::netfilter) loads them
//! itself as BPF_PROG_TYPE_NETFILTER. They never decide a packet's fate: NF_ACCEPT.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel, macros::classifier, programs::TcContext, EbpfContext,
};
use profiler_common::HookId;

use crate::{on_device, skb::Probed};

const NF_ACCEPT: i32 = 1;

#[inline(always)]
fn on_netfilter(ctx: &TcContext, hook: HookId) -> i32 {
    // bpf_nf_ctx.skb, read as a plain address as the raw tracepoints get theirs.
    let skb = unsafe { bpf_probe_read_kernel((ctx.as_ptr() as *const u64).add(1)) };
    if let Ok(skb) = skb {
        on_device::<Probed>(&skb as *const u64, hook as u8, None);
    }
    NF_ACCEPT
}

#[classifier]
pub fn nf_pre_nat_before(ctx: TcContext) -> i32 {
    on_netfilter(&ctx, HookId::NfPreNatBefore)
}

#[classifier]
pub fn nf_pre_nat_after(ctx: TcContext) -> i32 {
    on_netfilter(&ctx, HookId::NfPreNatAfter)
}

#[classifier]
pub fn nf_post_nat_before(ctx: TcContext) -> i32 {
    on_netfilter(&ctx, HookId::NfPostNatBefore)
}

#[classifier]
pub fn nf_post_nat_after(ctx: TcContext) -> i32 {
    on_netfilter(&ctx, HookId::NfPostNatAfter)
}
