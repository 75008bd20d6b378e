//! Describes the hops of an observed path after the devices of the lab they are on, and names
//! the segments between them.

use std::{cmp::Ordering, collections::HashMap};

use anyhow::Result;
use profiler_common::{
    encap_depth, HookId, FLAG_ENCAP, TUNNEL_GENEVE, TUNNEL_GRE, TUNNEL_SHIFT, TUNNEL_VXLAN,
};

use super::{
    hooks::{self, HopKey, Point, HOOK_TABLE},
    segments::{segment, Named, SegmentEnds},
};
use crate::{
    lab::{
        discover,
        names::{node_of, parenthesized, HOST_NODE},
        target::Devices,
        LabIface,
    },
    report::schema::{HookStatus, Hop, Status},
};

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

    /// Every namespace's inode, as a run's record keeps them.
    pub fn all(&self) -> std::collections::BTreeMap<String, u32> {
        self.0.iter().map(|(n, &i)| (n.clone(), i)).collect()
    }

    pub fn from_all(all: &std::collections::BTreeMap<String, u32>) -> Inodes {
        Inodes(all.iter().map(|(n, &i)| (n.clone(), i)).collect())
    }

    /// A namespace the host cannot resolve (a guest's), by the id its hops are keyed with.
    pub fn insert(&mut self, ns: String, id: u32) {
        self.0.insert(ns, id);
    }

    /// Whether a namespace has this inode.
    pub fn has(&self, inode: u32) -> bool {
        self.0.values().any(|&i| i == inode)
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
            // A pod's devices, and the host side of its veth, are named after the pod.
            let pod = iface
                .and_then(|i| lab.pod_of(i))
                .or_else(|| lab.pod_in(&netns));
            let place = match pod {
                Some(p) if p.netns == netns => format!("({})", p.qualified),
                Some(p) => format!(
                    "{}, {})",
                    parenthesized(&netns).trim_end_matches(')'),
                    p.qualified
                ),
                None => parenthesized(&netns),
            };
            Hop {
                index,
                node: node_of(&netns).to_string(),
                name: format!("{label}{at} {place}"),
                pod: pod.map(|p| p.name.clone()),
                namespace: pod.map(|p| p.namespace.clone()).filter(|n| !n.is_empty()),
                ifname,
                netns: Some(netns),
                kind,
                hook: attached.hook_name(&key.point),
                encapsulated: flags & FLAG_ENCAP != 0,
                encap_depth: encap_depth(flags),
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
        encap_depth: 0,
        tunnel: None,
        node: HOST_NODE.to_string(),
        pod: None,
        namespace: None,
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
                encap: encap(a, b),
                from_userspace: ia.and_then(|i| i.userspace.as_deref()),
                to_userspace: ib.and_then(|i| i.userspace.as_deref()),
                from_tc_program: ia.and_then(|i| i.tc_program.as_deref()),
            })
        })
        .collect()
}

/// Whether the segment from `a` to `b` encapsulates (true) or decapsulates the packet, and in
/// which tunnel: the one added (`b`'s outer) or removed (`a`'s outer), from one level to the
/// next (0 -> 1, or 1 -> 2 where the host encapsulates a VM's overlay packet again).
fn encap<'a>(a: &'a Hop, b: &'a Hop) -> Option<(bool, &'a str)> {
    let tunnel = |h: &'a Hop| h.tunnel.as_deref().unwrap_or("tunnel");
    match a.depth().cmp(&b.depth()) {
        Ordering::Less => Some((true, tunnel(b))),
        Ordering::Greater => Some((false, tunnel(a))),
        Ordering::Equal => None,
    }
}

/// The device a hop is on, or a user probe's name.
fn place(h: &Hop) -> &str {
    match h.kind.as_str() {
        "uprobe" => &h.hook,
        _ => h.ifname.as_deref().unwrap_or(""),
    }
}

/// "prof-bridge-pod-a" reads as "pod-a" in segment names, a pod's namespace as the pod
/// ("shop/web-1"); the full name is in the hops.
fn short_ns<'a>(ns: Option<&'a str>, lab: &'a Devices) -> &'a str {
    let ns = ns.unwrap_or("");
    if let Some(pod) = lab.pod_in(ns) {
        return &pod.qualified;
    }
    ns.strip_prefix("prof-")
        .and_then(|rest| rest.strip_prefix(lab.name.as_str()))
        .and_then(|r| r.strip_prefix('-'))
        .unwrap_or(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    use profiler_common::FLAG_ENCAP2;

    #[test]
    fn tunnel_kind_from_flags() {
        assert_eq!(
            tunnel_name(FLAG_ENCAP | TUNNEL_VXLAN << TUNNEL_SHIFT),
            Some("vxlan")
        );
        assert_eq!(tunnel_name(0), None);
    }

    /// Two hosts joined by wire0, each with a vxlan0 over it: a VM's flannel packet (one
    /// tunnel) crosses them inside the host's VXLAN or Geneve (two).
    fn double_encapsulation(host_tunnel: u8) -> Vec<String> {
        let iface = |netns: &str, ifname: &str, ifindex, kind: &str, link: Option<&str>| LabIface {
            netns: netns.into(),
            ifname: ifname.into(),
            ifindex,
            kind: kind.into(),
            addrs: Vec::new(),
            peer: None,
            master: None,
            link: link.map(str::to_string),
            mtu: 1500,
            userspace: None,
            tc_program: None,
        };
        let (a, b) = ("prof-x-host-a", "prof-x-host-b");
        let devices = Devices {
            pods: Vec::new(),
            name: "x".into(),
            namespaces: vec![a.into(), b.into()],
            interfaces: vec![
                iface(a, "vxlan0", 3, "vxlan", Some("wire0")),
                iface(a, "wire0", 2, "veth", None),
                iface(b, "wire0", 2, "veth", None),
                iface(b, "vxlan0", 3, "vxlan", Some("wire0")),
            ],
        };
        let mut inodes = Inodes::default();
        inodes.insert(a.into(), 11);
        inodes.insert(b.into(), 12);
        let vm = FLAG_ENCAP | TUNNEL_VXLAN << TUNNEL_SHIFT;
        let host = FLAG_ENCAP | FLAG_ENCAP2 | host_tunnel << TUNNEL_SHIFT;
        let hop = |id, netns, ifindex| HopKey {
            point: Point::Hook(id),
            netns,
            ifindex,
        };
        let (keys, flags): (Vec<HopKey>, Vec<u8>) = [
            (hop(HookId::NetDevStartXmit, 11, 3), vm),
            (hop(HookId::NetDevQueue, 11, 2), host),
            (hop(HookId::NetDevXmit, 11, 2), host),
            (hop(HookId::NapiGroReceiveEntry, 12, 2), host),
            (hop(HookId::NapiGroReceiveEntry, 12, 3), vm),
        ]
        .into_iter()
        .unzip();
        let attached = Attached(HashMap::new(), Vec::new());
        let hops = describe(&keys, &flags, &devices, &inodes, &attached);
        let depths: Vec<u8> = hops.iter().map(Hop::depth).collect();
        assert_eq!(depths, [1, 2, 2, 2, 1]);
        assert!(hops.iter().all(|h| h.encapsulated));
        segment_names(&keys, &hops, &devices)
    }

    #[test]
    fn the_host_tunnel_around_a_vms_is_named_where_it_is_added_and_removed() {
        let names = double_encapsulation(TUNNEL_VXLAN);
        assert_eq!(names[0], "vxlan encap vxlan0 -> wire0", "{names:?}");
        assert_eq!(names[3], "vxlan decap wire0 -> vxlan0", "{names:?}");
        // Hops at the same depth: no tunnel between them.
        assert!(!names[1..3].iter().any(|n| n.contains("cap ")), "{names:?}");
        // The outer tunnel names the segment, not the VM's inside it.
        let names = double_encapsulation(TUNNEL_GENEVE);
        assert_eq!(names[0], "geneve encap vxlan0 -> wire0", "{names:?}");
        assert_eq!(names[3], "geneve decap wire0 -> vxlan0", "{names:?}");
    }

    /// Reports written before `encap_depth` existed still name their tunnels.
    #[test]
    fn a_hop_without_a_depth_is_one_tunnel_deep_if_encapsulated() {
        let hop: Hop = serde_json::from_value(serde_json::json!({
            "index": 0, "name": "n", "ifname": null, "netns": null, "kind": "veth",
            "hook": "h", "encapsulated": true, "tunnel": "vxlan"
        }))
        .expect("an old hop");
        assert_eq!(hop.depth(), 1);
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
            pods: Vec::new(),
        };
        let inodes = Inodes::of(&devices).expect("resolving inodes");
        assert_ne!(inodes.get(discover::ROOT), 0);
        assert_eq!(inodes.get(&gone), 0);
    }
}
