//! Describes the hops of an observed path after the devices of the lab they are on, and names
//! the segments between them.

use std::collections::HashMap;

use anyhow::Result;
use profiler_common::{HookId, FLAG_ENCAP, TUNNEL_GENEVE, TUNNEL_GRE, TUNNEL_SHIFT, TUNNEL_VXLAN};

use super::{
    hooks::{self, HopKey, Point, HOOK_TABLE},
    segments::{segment, Named, SegmentEnds},
};
use crate::{
    lab::{discover, target::Devices, LabIface},
    report::schema::{HookStatus, Hop, Status, HOST_NODE},
};

pub use crate::lab::target::node_of;

/// Which program type serves each attached tracepoint ("tp_btf" or "raw_tp"), and the user
/// probes' hop names ("uprobe:LABEL") by index.
pub struct Attached(HashMap<HookId, String>, Vec<String>);

impl Attached {
    pub fn from_statuses(statuses: &[HookStatus]) -> Attached {
        let types = HOOK_TABLE
            .iter()
            .filter_map(|spec| {
                let st = statuses.iter().find(|s| s.name == spec.label)?;
                (st.status == Status::Attached).then(|| (spec.id, st.kind.clone()))
            })
            .collect();
        let uprobes = statuses
            .iter()
            .filter(|s| s.kind == "uprobe")
            .map(|s| s.name.clone())
            .collect();
        Attached(types, uprobes)
    }

    /// A user probe's hop name.
    fn uprobe(&self, index: u32) -> String {
        self.1
            .get(index as usize)
            .cloned()
            .unwrap_or_else(|| format!("uprobe:{index}"))
    }

    /// The hook's reported name: "tp_btf:net_dev_queue", "tc:egress", "app:send".
    fn hook_name(&self, point: &Point) -> String {
        match point {
            Point::Hook(id) => match self.0.get(id) {
                Some(kind) => format!("{kind}:{}", hooks::label(point)),
                None => hooks::label(point).to_string(),
            },
            Point::Uprobe(i) => self.uprobe(*i),
            _ => hooks::label(point).to_string(),
        }
    }
}

/// Namespace inodes of the lab, resolved once, both ways.
#[derive(Default)]
pub struct Inodes(HashMap<String, u32>);

impl Inodes {
    pub fn of(lab: &Devices) -> Result<Inodes> {
        let map = lab
            .namespaces
            .iter()
            .filter_map(|n| match discover::inode(n) {
                Ok(i) => Some(Ok((n.clone(), i))),
                Err(_) if discover::gone(n) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_>>()?;
        Ok(Inodes(map))
    }

    /// A namespace the host cannot resolve (a guest's), by the id its hops are keyed with.
    pub fn insert(&mut self, ns: String, id: u32) {
        self.0.insert(ns, id);
    }

    pub fn get(&self, ns: &str) -> u32 {
        self.0.get(ns).copied().unwrap_or(0)
    }

    fn name(&self, inode: u32) -> Option<&str> {
        self.0
            .iter()
            .find(|(_, &i)| i == inode)
            .map(|(n, _)| n.as_str())
    }
}

fn tunnel_name(flags: u8) -> Option<&'static str> {
    match flags >> TUNNEL_SHIFT {
        TUNNEL_VXLAN => Some("vxlan"),
        TUNNEL_GENEVE => Some("geneve"),
        TUNNEL_GRE => Some("gre"),
        _ => None,
    }
}

/// Describes each hop of `path`; `flags` are what each hop saw (see journey::hop_flags).
/// A hop on a device the lab does not know is still reported, by ifindex and namespace.
pub fn describe(
    path: &[HopKey],
    flags: &[u8],
    lab: &Devices,
    inodes: &Inodes,
    attached: &Attached,
) -> Vec<Hop> {
    path.iter()
        .zip(flags)
        .enumerate()
        .map(|(index, (key, &flags))| {
            if let Point::Uprobe(i) = key.point {
                return uprobe_hop(index, attached.uprobe(i));
            }
            let netns = inodes
                .name(key.netns)
                .map_or_else(|| format!("netns {}", key.netns), str::to_string);
            let iface = lab
                .interfaces
                .iter()
                .find(|i| i.netns == netns && i.ifindex == key.ifindex);
            let label = hooks::label(&key.point);
            let (ifname, kind) = match (&key.point, iface) {
                (Point::AppSend | Point::AppRecv, _) => (None, "app".to_string()),
                (_, Some(i)) => (Some(i.ifname.clone()), i.kind.clone()),
                (_, None) => (Some(format!("ifindex {}", key.ifindex)), "nic".to_string()),
            };
            let at = ifname.as_deref().map_or(String::new(), |i| format!(" {i}"));
            Hop {
                index,
                node: node_of(&netns).to_string(),
                name: format!("{label}{at} {}", parenthesized(&netns)),
                ifname,
                netns: Some(netns),
                kind,
                hook: attached.hook_name(&key.point),
                encapsulated: flags & FLAG_ENCAP != 0,
                tunnel: tunnel_name(flags).map(str::to_string),
            }
        })
        .collect()
}

/// A user probe's hop: in a process, on no device.
fn uprobe_hop(index: usize, name: String) -> Hop {
    Hop {
        index,
        name: name.clone(),
        ifname: None,
        netns: None,
        kind: "uprobe".into(),
        hook: name,
        encapsulated: false,
        tunnel: None,
        node: HOST_NODE.to_string(),
    }
}

/// Names each segment between consecutive hops after what it crosses; `keys` are the hops'
/// identities, in the same order.
pub fn segment_names(keys: &[HopKey], hops: &[Hop], lab: &Devices) -> Vec<String> {
    segments(keys, hops, lab)
        .into_iter()
        .map(|n| n.name)
        .collect()
}

/// Each segment between consecutive hops: its name, and whether it spans userspace.
pub fn segments(keys: &[HopKey], hops: &[Hop], lab: &Devices) -> Vec<Named> {
    let iface = |h: &Hop| -> Option<&LabIface> {
        lab.interfaces
            .iter()
            .find(|i| Some(&i.netns) == h.netns.as_ref() && Some(&i.ifname) == h.ifname.as_ref())
    };
    hops.windows(2)
        .zip(keys.windows(2))
        .map(|(w, k)| {
            let (a, b) = (&w[0], &w[1]);
            let (ia, ib) = (iface(a), iface(b));
            let peer_of = |x: Option<&LabIface>, y: &Hop| {
                x.and_then(|i| i.peer.as_ref()).is_some_and(|p| {
                    Some(&p.ifname) == y.ifname.as_ref() && Some(&p.netns) == y.netns.as_ref()
                })
            };
            segment(&SegmentEnds {
                from: &k[0].point,
                to: &k[1].point,
                // A user probe's "interface" is its hop name.
                from_if: place(a),
                to_if: place(b),
                from_ns: short_ns(a.netns.as_deref(), lab),
                to_ns: short_ns(b.netns.as_deref(), lab),
                from_master: ia.and_then(|i| i.master.as_deref()),
                to_master: ib.and_then(|i| i.master.as_deref()),
                from_kind: &a.kind,
                to_kind: &b.kind,
                from_link: ia.and_then(|i| i.link.as_deref()),
                to_link: ib.and_then(|i| i.link.as_deref()),
                peers: peer_of(ia, b) || peer_of(ib, a),
                encap: match (a.encapsulated, b.encapsulated) {
                    (false, true) => Some((true, b.tunnel.as_deref().unwrap_or("tunnel"))),
                    (true, false) => Some((false, a.tunnel.as_deref().unwrap_or("tunnel"))),
                    _ => None,
                },
                from_userspace: ia.and_then(|i| i.userspace.as_deref()),
                to_userspace: ib.and_then(|i| i.userspace.as_deref()),
            })
        })
        .collect()
}

/// The device a hop is on, or a user probe's name.
fn place(h: &Hop) -> &str {
    match h.kind.as_str() {
        "uprobe" => &h.hook,
        _ => h.ifname.as_deref().unwrap_or(""),
    }
}

/// "(ns)" for a namespace name; "(root)" already is.
fn parenthesized(ns: &str) -> String {
    if ns.starts_with('(') && ns.ends_with(')') {
        ns.to_string()
    } else {
        format!("({ns})")
    }
}

/// "prof-bridge-pod-a" reads as "pod-a" in segment names; the full name is in the hops.
fn short_ns<'a>(ns: Option<&'a str>, lab: &Devices) -> &'a str {
    let ns = ns.unwrap_or("");
    ns.strip_prefix("prof-")
        .and_then(|rest| rest.strip_prefix(lab.name.as_str()))
        .and_then(|r| r.strip_prefix('-'))
        .unwrap_or(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_kind_from_flags() {
        assert_eq!(
            tunnel_name(FLAG_ENCAP | TUNNEL_VXLAN << TUNNEL_SHIFT),
            Some("vxlan")
        );
        assert_eq!(tunnel_name(0), None);
    }

    #[test]
    fn the_root_namespace_is_not_parenthesized_twice() {
        assert_eq!(parenthesized(discover::ROOT), "(root)");
        assert_eq!(parenthesized("prof-bridge-pod-a"), "(prof-bridge-pod-a)");
    }
    /// A namespace deleted since the devices were read has no inode to resolve: skipped.
    #[test]
    fn a_namespace_gone_since_read_has_no_inode() {
        let gone = format!("prof-gone-{}", std::process::id());
        let devices = Devices {
            name: "node".into(),
            namespaces: vec![discover::ROOT.into(), gone.clone()],
            interfaces: Vec::new(),
        };
        let inodes = Inodes::of(&devices).expect("resolving inodes");
        assert_ne!(inodes.get(discover::ROOT), 0);
        assert_eq!(inodes.get(&gone), 0);
    }
}
