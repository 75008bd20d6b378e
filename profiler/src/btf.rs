//! What the programs need to know about the running kernel, read from its BTF: struct member
//! offsets (Rust eBPF has no CO-RE, so none are compiled in), drop reason names, and which
//! tracepoints have BTF for tp_btf.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context as _, Result};
use btf_rs::{Btf, Type};
use profiler_common::{KernelOffsets, NO_OFFSET};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

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

    /// enum skb_drop_reason, value to name (SKB_DROP_REASON_ prefix removed, lower case).
    pub fn drop_reasons(&self) -> HashMap<u32, String> {
        let Ok(types) = self.btf.resolve_types_by_name("skb_drop_reason") else {
            return HashMap::new();
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
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs against the running kernel's BTF: offsets must be found and plausible.
    #[test]
    fn finds_offsets_on_this_kernel() {
        let Ok(btf) = KernelBtf::load() else { return };
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
        assert!(btf.drop_reasons().values().any(|n| n == "not_specified"));
    }
}
