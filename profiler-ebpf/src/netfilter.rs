//! Programs at netfilter's IPv4 hooks on both sides of the NAT (BPF netfilter links), so that
//! a Service's DNAT, and the un-DNAT of its replies, is a segment of its own.
//!
//! Their context is `struct bpf_nf_ctx { const struct nf_hook_state *state; struct sk_buff
//! *skb; }`. aya 0.14 has no netfilter program type: they sit in the "classifier" section only
//! so that its object parser takes them, and the loader (profiler::kernel::netfilter) loads them
//! itself as BPF_PROG_TYPE_NETFILTER. They never decide a packet's fate: NF_ACCEPT.
//!
//! Each hook has a tagged program (nf_X, `run`) and a follow one (fnf_X, `attach`). The follow
//! one reads the packet in the same program when it must (no tail call: the loader would have
//! to fill a program array of netfilter programs itself), which the verifiers that have
//! netfilter links (6.4 and later) take in one pass.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel, macros::classifier, programs::TcContext, EbpfContext,
};
use profiler_common::HookId;

use crate::{
    attach::{on_hop, on_undecided},
    run::on_device,
    skb::Probed,
};

const NF_ACCEPT: i32 = 1;

/// bpf_nf_ctx.skb, read as a plain address as the raw tracepoints get theirs.
#[inline(always)]
fn nf_skb(ctx: &TcContext) -> Option<u64> {
    unsafe { bpf_probe_read_kernel((ctx.as_ptr() as *const u64).add(1)) }.ok()
}

#[inline(always)]
fn on_netfilter(ctx: &TcContext, hook: HookId) -> i32 {
    if let Some(skb) = nf_skb(ctx) {
        on_device::<Probed>(&skb as *const u64, hook as u8, None);
    }
    NF_ACCEPT
}

#[inline(always)]
fn follow_netfilter(ctx: &TcContext, hook: HookId) -> i32 {
    if let Some(skb) = nf_skb(ctx) {
        let args = &skb as *const u64;
        if on_hop::<Probed>(args, hook as u8, None) {
            on_undecided::<Probed>(args, hook as u8, None);
        }
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

#[classifier]
pub fn fnf_pre_nat_before(ctx: TcContext) -> i32 {
    follow_netfilter(&ctx, HookId::NfPreNatBefore)
}

#[classifier]
pub fn fnf_pre_nat_after(ctx: TcContext) -> i32 {
    follow_netfilter(&ctx, HookId::NfPreNatAfter)
}

#[classifier]
pub fn fnf_post_nat_before(ctx: TcContext) -> i32 {
    follow_netfilter(&ctx, HookId::NfPostNatBefore)
}

#[classifier]
pub fn fnf_post_nat_after(ctx: TcContext) -> i32 {
    follow_netfilter(&ctx, HookId::NfPostNatAfter)
}
