//! What the programs need to know about the running kernel, read from its BTF: struct member
//! offsets (Rust eBPF has no CO-RE, so none are compiled in), drop reason names, which
//! tracepoints have BTF for tp_btf, and where a function's packet is among its arguments.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context as _, Result};
use btf_rs::{Btf, Type};
use profiler_common::{FuncHook, HookId, KernelOffsets, NO_ARG, NO_OFFSET};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
const MODULE_BTF_DIR: &str = "/sys/kernel/btf";

pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn load() -> Result<Self> {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            bail!("this kernel has no BTF ({VMLINUX_BTF} is missing; it needs CONFIG_DEBUG_INFO_BTF=y)");
        }
        let btf = Btf::from_file(VMLINUX_BTF).with_context(|| format!("reading {VMLINUX_BTF}"))?;
        Ok(KernelBtf { btf })
    }

    fn named_struct(&self, name: &str) -> Result<btf_rs::Struct> {
        self.btf
            .resolve_types_by_name(name)
            .ok()
            .into_iter()
            .flatten()
            .find_map(|t| match t {
                Type::Struct(s) | Type::Union(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| anyhow!("struct {name} is not in the kernel's BTF"))
    }

    /// Follows typedefs and qualifiers to the struct or union a member is.
    fn member_struct(&self, member: &btf_rs::Member) -> Option<btf_rs::Struct> {
        let mut t = self.btf.resolve_chained_type(member).ok()?;
        loop {
            match t {
                Type::Struct(s) | Type::Union(s) => return Some(s),
                Type::Typedef(ref td) => t = self.btf.resolve_chained_type(td).ok()?,
                Type::Const(ref q) | Type::Volatile(ref q) => {
                    t = self.btf.resolve_chained_type(q).ok()?
                }
                _ => return None,
            }
        }
    }

    /// Bit offset of `name` in `s`, looking into anonymous structs and unions as C does.
    fn find_member(&self, s: &btf_rs::Struct, name: &str) -> Option<(u32, btf_rs::Member)> {
        for m in &s.members {
            let mname = self.btf.resolve_name(m).unwrap_or_default();
            if mname == name {
                return Some((m.bit_offset(), m.clone()));
            }
            if mname.is_empty() {
                if let Some(inner) = self.member_struct(m) {
                    if let Some((off, found)) = self.find_member(&inner, name) {
                        return Some((m.bit_offset() + off, found));
                    }
                }
            }
        }
        None
    }

    /// Byte offset of a member path, e.g. `("net_device", &["nd_net", "net"])`.
    pub fn offset(&self, root: &str, path: &[&str]) -> Result<u32> {
        let mut s = self.named_struct(root)?;
        let mut bits = 0;
        for (i, name) in path.iter().enumerate() {
            let (off, member) = self.find_member(&s, name).ok_or_else(|| {
                anyhow!(
                    "the kernel's struct {root} has no member {}",
                    path[..=i].join(".")
                )
            })?;
            bits += off;
            if i + 1 < path.len() {
                s = self
                    .member_struct(&member)
                    .ok_or_else(|| anyhow!("{root}.{name} is not a struct"))?;
            }
        }
        if bits % 8 != 0 {
            bail!("{root}.{} is a bitfield", path.join("."));
        }
        Ok(bits / 8)
    }

    pub fn kernel_offsets(&self) -> Result<KernelOffsets> {
        let skb = |m: &str| self.offset("sk_buff", &[m]);
        Ok(KernelOffsets {
            skb_head: skb("head")?,
            skb_data: skb("data")?,
            skb_len: skb("len")?,
            skb_data_len: skb("data_len")?,
            skb_end: skb("end")?,
            skb_mac_header: skb("mac_header")?,
            skb_network_header: skb("network_header")?,
            skb_protocol: skb("protocol")?,
            skb_dev: skb("dev")?,
            dev_ifindex: self.offset("net_device", &["ifindex"])?,
            dev_nd_net: self.offset("net_device", &["nd_net", "net"])?,
            net_ns_inum: self.offset("net", &["ns", "inum"])?,
            // Only `attach --cgroup` needs these: a kernel without them still runs the rest.
            skb_sk: skb("sk").unwrap_or(NO_OFFSET),
            sk_cgroup: self
                .offset("sock", &["sk_cgrp_data", "cgroup"])
                .unwrap_or(NO_OFFSET),
            cgroup_kn: self.offset("cgroup", &["kn"]).unwrap_or(NO_OFFSET),
            kn_id: self.offset("kernfs_node", &["id"]).unwrap_or(NO_OFFSET),
        })
    }

    /// Whether tp_btf can attach to this tracepoint: the kernel describes it as btf_trace_NAME.
    pub fn has_btf_tracepoint(&self, name: &str) -> bool {
        self.btf
            .resolve_ids_by_name(&format!("btf_trace_{name}"))
            .is_ok_and(|ids| !ids.is_empty())
    }

    pub fn vmlinux(&self) -> &Btf {
        &self.btf
    }

    /// The BTF of a loaded module, split on vmlinux's.
    pub fn module(&self, module: &str) -> Result<Btf> {
        let path = format!("{MODULE_BTF_DIR}/{module}");
        Btf::from_split_file(&path, &self.btf)
            .map_err(|e| anyhow!("module {module} has no readable BTF ({path}: {e})"))
    }

    /// enum skb_drop_reason, value to name (SKB_DROP_REASON_ prefix removed, lower case).
    pub fn drop_reasons(&self) -> DropReasons {
        let Ok(types) = self.btf.resolve_types_by_name("skb_drop_reason") else {
            return DropReasons::default();
        };
        let mut names = HashMap::new();
        for t in types {
            if let Type::Enum(e) = t {
                for m in &e.members {
                    let name = self.btf.resolve_name(m).unwrap_or_default();
                    let short = name.trim_start_matches("SKB_DROP_REASON_").to_lowercase();
                    names.insert(m.val(), short);
                }
            }
        }
        DropReasons(names)
    }
}

/// The kernel's drop reasons by value.
#[derive(Debug, Default)]
pub struct DropReasons(HashMap<u32, String>);

impl DropReasons {
    /// The reason's name, or its number where this kernel's BTF does not name it.
    pub fn name(&self, reason: u32) -> String {
        self.0
            .get(&reason)
            .cloned()
            .unwrap_or_else(|| reason.to_string())
    }

    pub fn named<'a>(names: impl IntoIterator<Item = (u32, &'a str)>) -> DropReasons {
        DropReasons(names.into_iter().map(|(v, n)| (v, n.to_string())).collect())
    }

    /// Every reason by number, as a run's record keeps them.
    pub fn all(&self) -> std::collections::BTreeMap<u32, String> {
        self.0.iter().map(|(&v, n)| (v, n.clone())).collect()
    }

    /// The number of the reason this kernel names `name` ("not_specified").
    pub fn value(&self, name: &str) -> Option<u32> {
        self.0.iter().find(|(_, n)| *n == name).map(|(v, _)| *v)
    }
}

/// Where function `func`'s packet is: the first `struct sk_buff *` (or `**`) parameter and
/// the first `struct net_device *`, from its prototype in `btf`.
pub fn function_args(btf: &Btf, hook: HookId, func: &str) -> Result<FuncHook> {
    let proto = btf
        .resolve_types_by_name(func)
        .ok()
        .into_iter()
        .flatten()
        .find_map(|t| match t {
            Type::Func(f) => match btf.resolve_chained_type(&f) {
                Ok(Type::FuncProto(p)) => Some(p),
                _ => None,
            },
            _ => None,
        })
        .ok_or_else(|| anyhow!("no BTF prototype for {func}"))?;
    packet_args(btf, hook, &proto.parameters, 0).with_context(|| format!("{func}'s arguments"))
}

/// As `function_args`, for a tracepoint: BTF describes it as `btf_trace_TP`, a pointer to a
/// prototype whose first parameter is the probe's private data, not a tracepoint argument.
pub fn tracepoint_args(btf: &Btf, hook: HookId, tp: &str) -> Result<FuncHook> {
    let name = format!("btf_trace_{tp}");
    let proto = btf
        .resolve_types_by_name(&name)
        .ok()
        .into_iter()
        .flatten()
        .find_map(|t| {
            let Type::Typedef(td) = t else { return None };
            let Ok(Type::Ptr(p)) = btf.resolve_chained_type(&td) else {
                return None;
            };
            match btf.resolve_chained_type(&p) {
                Ok(Type::FuncProto(fp)) => Some(fp),
                _ => None,
            }
        })
        .ok_or_else(|| anyhow!("no BTF for tracepoint {tp} ({name})"))?;
    packet_args(btf, hook, &proto.parameters, 1)
        .with_context(|| format!("tracepoint {tp}'s arguments"))
}

/// The skb and device argument positions among `params[skip..]`.
fn packet_args(
    btf: &Btf,
    hook: HookId,
    params: &[btf_rs::Parameter],
    skip: usize,
) -> Result<FuncHook> {
    let mut found = FuncHook {
        hook: hook as u8,
        skb_arg: NO_ARG,
        skb_deref: 0,
        dev_arg: NO_ARG,
    };
    for (i, p) in params.iter().skip(skip).enumerate() {
        let Ok(t) = btf.resolve_chained_type(p) else {
            continue;
        };
        // Only register-passed arguments can be read: x86-64 passes six.
        let i = i as u8;
        match pointee(btf, t) {
            Some((depth, name)) if name == "sk_buff" && found.skb_arg == NO_ARG && i < 6 => {
                found.skb_arg = i;
                found.skb_deref = (depth == 2) as u8;
            }
            Some((1, name)) if name == "net_device" && found.dev_arg == NO_ARG && i < 6 => {
                found.dev_arg = i
            }
            _ => {}
        }
    }
    if found.skb_arg == NO_ARG {
        bail!("no struct sk_buff argument");
    }
    Ok(found)
}

/// For a pointer (to a pointer) to a named struct: the pointer depth and the struct's name.
fn pointee(btf: &Btf, mut t: Type) -> Option<(u8, String)> {
    let mut depth = 0;
    loop {
        t = match t {
            Type::Ptr(ref p) => {
                depth += 1;
                btf.resolve_chained_type(p).ok()?
            }
            Type::Const(ref q) | Type::Volatile(ref q) | Type::Restrict(ref q) => {
                btf.resolve_chained_type(q).ok()?
            }
            Type::Typedef(ref td) => btf.resolve_chained_type(td).ok()?,
            Type::Struct(ref s) if depth > 0 => return Some((depth, btf.resolve_name(s).ok()?)),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs against the running kernel's BTF: offsets must be found and plausible.
    #[test]
    fn finds_offsets_on_this_kernel() {
        let btf = match KernelBtf::load() {
            Ok(btf) => btf,
            Err(e) => {
                eprintln!("skipped: cannot read this kernel's BTF: {e:#}");
                return;
            }
        };
        let off = btf.kernel_offsets().expect("offsets");
        // sk_buff: the pointers come after the length fields on every kernel since 4.x.
        assert!(off.skb_head > off.skb_len, "{off:?}");
        assert_eq!(
            off.skb_data,
            off.skb_head + 8,
            "head and data are adjacent pointers: {off:?}"
        );
        assert!(btf.offset("sk_buff", &["no_such_member"]).is_err());
        assert!(btf.has_btf_tracepoint("net_dev_queue"));
        assert!(!btf.has_btf_tracepoint("no_such_tracepoint"));
        let reasons = btf.drop_reasons();
        assert!((0..8).any(|v| reasons.name(v) == "not_specified"));
    }

    /// Argument positions from this kernel's prototypes, whatever module they are in here.
    #[test]
    fn finds_packet_arguments_in_prototypes() {
        let kernel = match KernelBtf::load() {
            Ok(kernel) => kernel,
            Err(e) => {
                eprintln!("skipped: cannot read this kernel's BTF: {e:#}");
                return;
            }
        };
        let in_vmlinux = kernel.vmlinux();
        // net_dev_start_xmit(skb, dev): a tracepoint, with its private data first.
        let tp = tracepoint_args(in_vmlinux, HookId::NetDevStartXmit, "net_dev_start_xmit")
            .unwrap_or_else(|e| panic!("arguments of tracepoint net_dev_start_xmit: {e:#}"));
        assert_eq!((tp.skb_arg, tp.skb_deref, tp.dev_arg), (0, 0, 1));
        // __dev_queue_xmit(skb, sb_dev): the second is a net_device too, found as the first.
        let f = function_args(in_vmlinux, HookId::NetDevQueue, "__dev_queue_xmit")
            .unwrap_or_else(|e| panic!("arguments of __dev_queue_xmit: {e:#}"));
        assert_eq!((f.skb_arg, f.skb_deref, f.dev_arg), (0, 0, 1));
        // netif_receive_skb_list_internal has a list head, no skb.
        assert!(function_args(
            in_vmlinux,
            HookId::NetifRx,
            "netif_receive_skb_list_internal"
        )
        .is_err());
        assert!(function_args(in_vmlinux, HookId::NetifRx, "no_such_function").is_err());
    }
}
