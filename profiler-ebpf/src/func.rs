//! The deep hooks: kprobes on datapath functions and raw tracepoints of modules (OVS).
//!
//! One kprobe program serves every function: the loader maps each function's address to where
//! its packet is (`FUNCS`, read from the function's BTF), so no argument position is compiled
//! in and a kernel whose function gained or lost an argument still works. The packet is then
//! handled exactly as at a device tracepoint.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_get_func_ip, bpf_probe_read_kernel},
    macros::{kprobe, map, raw_tracepoint},
    maps::{HashMap, ProgramArray},
    programs::{ProbeContext, RawTracePointContext},
    EbpfContext,
};
use profiler_common::{FuncHook, HookId, NO_ARG};

use crate::{
    attach::{decide_in, on_hop, on_undecided},
    run::on_device,
    skb::Probed,
};

/// Which program handles the packet: run mode's, attach mode's cheap one, or attach mode's
/// decision program (tail-called by the cheap one, see attach.rs's `follow_tracepoint!`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Run,
    Attach,
    Decide,
}

/// Function address (kprobes) or hook id (module tracepoints) to where the packet is.
#[map]
static FUNCS: HashMap<u64, FuncHook> = HashMap::with_max_entries(256, 0);

/// The skb and device of a hook as a device tracepoint's handlers take them: `[skb, dev]`,
/// and the index of the device in it (None: the skb's own).
#[inline(always)]
fn packet(func: &FuncHook, arg: impl Fn(u8) -> Option<u64>) -> Option<([u64; 2], Option<usize>)> {
    let mut skb = arg(func.skb_arg)?;
    if func.skb_deref != 0 {
        skb = unsafe { bpf_probe_read_kernel(skb as *const u64) }.ok()?;
    }
    if skb == 0 {
        return None;
    }
    match func.dev_arg {
        NO_ARG => Some(([skb, 0], None)),
        i => Some(([skb, arg(i)?], Some(1))),
    }
}

/// True when attach mode's cheap program must tail-call the decision program.
#[inline(always)]
fn handle(func: &FuncHook, args: [u64; 2], dev_arg: Option<usize>, role: Role) -> bool {
    match role {
        Role::Run => on_device::<Probed>(args.as_ptr(), func.hook, dev_arg),
        Role::Attach => return on_hop::<Probed>(args.as_ptr(), func.hook, dev_arg),
        Role::Decide => on_undecided::<Probed>(args.as_ptr(), func.hook, dev_arg),
    }
    false
}

#[inline(always)]
fn on_function(ctx: &ProbeContext, role: Role) -> bool {
    let ip = unsafe { bpf_get_func_ip(ctx.as_ptr()) };
    let Some(func) = (unsafe { FUNCS.get(&ip) }) else {
        return false;
    };
    let regs = ctx.as_ptr() as *const pt_regs;
    // x86-64 passes the first six arguments in these registers.
    let r = unsafe {
        [
            read_volatile(&(*regs).rdi),
            read_volatile(&(*regs).rsi),
            read_volatile(&(*regs).rdx),
            read_volatile(&(*regs).rcx),
            read_volatile(&(*regs).r8),
            read_volatile(&(*regs).r9),
        ]
    };
    packet(func, |i| pick(&r, i)).is_some_and(|(args, dev_arg)| handle(func, args, dev_arg, role))
}

/// `values[i]` without an indexed load: the verifier refuses context reads at a variable
/// offset, so every value is read at its constant offset first and one is chosen here.
#[inline(always)]
fn pick<const N: usize>(values: &[u64; N], i: u8) -> Option<u64> {
    let mut found = None;
    for (k, v) in values.iter().enumerate() {
        if k == i as usize {
            found = Some(*v);
        }
    }
    found
}

/// fkp_func's decision program (`Role::Decide`), in slot 0.
#[map]
static DKP_FUNC: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[kprobe]
pub fn kp_func(ctx: ProbeContext) -> u32 {
    on_function(&ctx, Role::Run);
    0
}

#[kprobe]
pub fn fkp_func(ctx: ProbeContext) -> u32 {
    if on_function(&ctx, Role::Attach) {
        decide_in(&DKP_FUNC, &ctx);
    }
    0
}

#[kprobe]
pub fn dkp_func(ctx: ProbeContext) -> u32 {
    on_function(&ctx, Role::Decide);
    0
}

/// Arguments read from a module tracepoint: both OVS tracepoints have at least four, and
/// reading past a tracepoint's last argument would make the kernel refuse the attachment.
const TP_ARGS: usize = 4;

#[inline(always)]
fn on_module_tracepoint(ctx: &RawTracePointContext, hook: HookId, role: Role) -> bool {
    let Some(func) = (unsafe { FUNCS.get(&(hook as u64)) }) else {
        return false;
    };
    let raw = ctx.as_ptr() as *const u64;
    let a: [u64; TP_ARGS] = core::array::from_fn(|k| unsafe { read_volatile(raw.add(k)) });
    packet(func, |i| pick(&a, i)).is_some_and(|(args, dev_arg)| handle(func, args, dev_arg, role))
}

/// A module tracepoint's tagged program, follow program and its decision program (tail-called
/// through `$deciders`, as at the device tracepoints).
macro_rules! module_tracepoint {
    ($tagged:ident, $follow:ident, $decide:ident, $deciders:ident, $tp:literal, $hook:expr) => {
        #[map]
        static $deciders: ProgramArray = ProgramArray::with_max_entries(1, 0);

        #[raw_tracepoint(tracepoint = $tp)]
        pub fn $tagged(ctx: RawTracePointContext) -> i32 {
            on_module_tracepoint(&ctx, $hook, Role::Run);
            0
        }

        #[raw_tracepoint(tracepoint = $tp)]
        pub fn $follow(ctx: RawTracePointContext) -> i32 {
            if on_module_tracepoint(&ctx, $hook, Role::Attach) {
                decide_in(&$deciders, &ctx);
            }
            0
        }

        #[raw_tracepoint(tracepoint = $tp)]
        pub fn $decide(ctx: RawTracePointContext) -> i32 {
            on_module_tracepoint(&ctx, $hook, Role::Decide);
            0
        }
    };
}

module_tracepoint!(
    raw_ovs_dp_upcall,
    fraw_ovs_dp_upcall,
    draw_ovs_dp_upcall,
    DRAW_OVS_DP_UPCALL,
    "ovs_dp_upcall",
    HookId::OvsDpUpcall
);
module_tracepoint!(
    raw_ovs_do_execute_action,
    fraw_ovs_do_execute_action,
    draw_ovs_do_execute_action,
    DRAW_OVS_DO_EXECUTE_ACTION,
    "ovs_do_execute_action",
    HookId::OvsDoExecuteAction
);
