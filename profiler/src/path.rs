//! The hops a packet is predicted to meet on a lab path, in order, given which hooks attached.

use std::collections::{HashMap, HashSet};

use anyhow::Result;
use profiler_common::{HookId, DIR_REQUEST};
use serde::Serialize;

use crate::{
    datapath::{self, Point, SegmentEnds, Side},
    hooks::{HookStatus, Probes, Status},
    journey::HopKey,
    lab::{Endpoint, IfRef, Lab},
    netns,
};

/// A hop of the predicted path, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct Hop {
    pub index: usize,
    pub name: String,
    pub ifname: Option<String>,
    pub netns: Option<String>,
    pub kind: String,
    pub hook: String,
    #[serde(skip)]
    pub key: HopKey,
}

/// Which hooks are in place: tracepoints by hook (with the program type that attached), tc by
/// (hook, namespace, interface).
pub struct Attached {
    tracepoints: HashMap<HookId, String>,
    tc: HashSet<(HookId, Option<String>, String)>,
}

impl Attached {
    pub fn from_probes(probes: &Probes) -> Attached {
        let tracepoints = datapath::HOOKS
            .iter()
            .filter_map(|spec| {
                let st: &HookStatus = probes.statuses.iter().find(|s| s.name == spec.label)?;
                (st.status == Status::Attached).then(|| (spec.id, st.kind.clone()))
            })
            .collect();
        let tc = probes
            .tc
            .iter()
            .map(|a| (a.hook, a.netns.clone(), a.ifname.clone()))
            .collect();
        Attached { tracepoints, tc }
    }

    /// The hook's reported name ("tp_btf:net_dev_queue", "tc:egress") if it observes `at`.
    fn observes(&self, id: HookId, at: &IfRef) -> Option<String> {
        if let Some(kind) = self.tracepoints.get(&id) {
            return Some(format!("{kind}:{}", datapath::hook(id).label));
        }
        self.tc
            .contains(&(id, Some(at.netns.clone()), at.ifname.clone()))
            .then(|| datapath::hook(id).label.to_string())
    }
}

/// Namespace inodes of the lab, resolved once.
pub struct Inodes(HashMap<String, u32>);

impl Inodes {
    pub fn of(lab: &Lab) -> Result<Inodes> {
        let map = lab
            .namespaces
            .iter()
            .map(|n| Ok((n.clone(), netns::inode(n)?)))
            .collect::<Result<_>>()?;
        Ok(Inodes(map))
    }

    pub fn get(&self, ns: &str) -> u32 {
        self.0.get(ns).copied().unwrap_or(0)
    }
}

/// Predicts the hops of one direction of the lab's client/server exchange.
pub fn predict(lab: &Lab, direction: u32, attached: &Attached, inodes: &Inodes) -> Vec<Hop> {
    let request = direction == DIR_REQUEST;
    // Lab.path (predicted crossings) is gone: the path is to be inferred from observed events.
    // Until then, the veth crossings are derived from the lab's interfaces (veth peers and
    // bridge ports); other devices (vxlan, macvlan, vlan) yield no device hops here.
    let (from, to) = if request {
        (&lab.client, &lab.server)
    } else {
        (&lab.server, &lab.client)
    };
    let mut hops = vec![app_hop(Point::AppSend, &from.netns, inodes)];
    let crossings = veth_crossings(lab, from, to);
    for (tx, rx, link) in &crossings {
        for (side, id) in datapath::link_sequence(link) {
            let at = match side {
                Side::Tx => tx,
                Side::Rx => rx,
            };
            if let Some(hook) = attached.observes(*id, at) {
                hops.push(device_hop(*id, at, hook, lab, inodes));
            }
        }
    }
    hops.push(app_hop(Point::AppRecv, &to.netns, inodes));
    for (i, h) in hops.iter_mut().enumerate() {
        h.index = i;
    }
    hops
}

/// The veth pairs a packet crosses from `from` to `to`: follow veth peers, through a bridge
/// to the port whose peer is in `to`'s namespace. Stops at anything else.
fn veth_crossings(lab: &Lab, from: &Endpoint, to: &Endpoint) -> Vec<(IfRef, IfRef, &'static str)> {
    let find = |ns: &str, name: &str| {
        lab.interfaces
            .iter()
            .find(|i| i.netns == ns && i.ifname == name)
    };
    let mut crossings = Vec::new();
    let mut cur = find(&from.netns, &from.ifname);
    while let Some(i) = cur.filter(|_| crossings.len() < 8) {
        let Some(peer) = i.peer.as_ref().filter(|_| i.kind == "veth") else {
            break;
        };
        let tx = IfRef {
            netns: i.netns.clone(),
            ifname: i.ifname.clone(),
            ifindex: i.ifindex,
        };
        crossings.push((tx, peer.clone(), "veth"));
        if peer.netns == to.netns {
            break;
        }
        let master = find(&peer.netns, &peer.ifname).and_then(|p| p.master.as_ref());
        cur = master.and_then(|m| {
            lab.interfaces.iter().find(|q| {
                q.netns == peer.netns
                    && q.master.as_ref() == Some(m)
                    && q.peer.as_ref().is_some_and(|qp| qp.netns == to.netns)
            })
        });
    }
    crossings
}

fn app_hop(point: Point, ns: &str, inodes: &Inodes) -> Hop {
    let label = datapath::label(&point);
    Hop {
        index: 0,
        name: format!("{label} ({ns})"),
        ifname: None,
        netns: Some(ns.to_string()),
        kind: "app".into(),
        hook: label.into(),
        key: HopKey {
            point,
            netns: inodes.get(ns),
            ifindex: 0,
        },
    }
}

fn device_hop(id: HookId, at: &IfRef, hook: String, lab: &Lab, inodes: &Inodes) -> Hop {
    let kind = lab
        .interfaces
        .iter()
        .find(|i| i.netns == at.netns && i.ifname == at.ifname)
        .map_or("nic".to_string(), |i| i.kind.clone());
    Hop {
        index: 0,
        name: format!("{} {} ({})", datapath::hook(id).label, at.ifname, at.netns),
        ifname: Some(at.ifname.clone()),
        netns: Some(at.netns.clone()),
        kind,
        hook,
        key: HopKey {
            point: Point::Hook(id),
            netns: inodes.get(&at.netns),
            ifindex: at.ifindex,
        },
    }
}

/// Names each segment between consecutive hops after what it crosses.
pub fn segment_names(hops: &[Hop], lab: &Lab) -> Vec<String> {
    let iface = |h: &Hop| {
        lab.interfaces
            .iter()
            .find(|i| Some(&i.netns) == h.netns.as_ref() && Some(&i.ifname) == h.ifname.as_ref())
    };
    hops.windows(2)
        .map(|w| {
            let (a, b) = (&w[0], &w[1]);
            let (ia, ib) = (iface(a), iface(b));
            let bridge = match (
                ia.and_then(|i| i.master.as_deref()),
                ib.and_then(|i| i.master.as_deref()),
            ) {
                (Some(x), Some(y)) if x == y && a.netns == b.netns => Some(x),
                _ => None,
            };
            let peers = ia.and_then(|i| i.peer.as_ref()).is_some_and(|p| {
                Some(&p.ifname) == b.ifname.as_ref() && Some(&p.netns) == b.netns.as_ref()
            }) || ib.and_then(|i| i.peer.as_ref()).is_some_and(|p| {
                Some(&p.ifname) == a.ifname.as_ref() && Some(&p.netns) == a.netns.as_ref()
            });
            datapath::segment_name(&SegmentEnds {
                from: &a.key.point,
                to: &b.key.point,
                from_if: a.ifname.as_deref().unwrap_or(""),
                to_if: b.ifname.as_deref().unwrap_or(""),
                from_ns: short_ns(a.netns.as_deref()),
                to_ns: short_ns(b.netns.as_deref()),
                bridge,
                peers,
            })
        })
        .collect()
}

/// "prof-bridge-pod-a" reads as "pod-a" in segment names; the full name is in the hops.
fn short_ns(ns: Option<&str>) -> &str {
    let ns = ns.unwrap_or("");
    ns.strip_prefix("prof-")
        .and_then(|rest| rest.split_once('-'))
        .map_or(ns, |(_, tail)| tail)
}
