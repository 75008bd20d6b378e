//! How the time between two consecutive hops is named, after what the packet crosses there.

use profiler_common::HookId::{self, *};

use super::hooks::{
    label,
    Point::{self, *},
};
use crate::lab::names::{node_of, parenthesized};

/// What a segment name needs to know about the two hops around it.
pub struct SegmentEnds<'a> {
    pub from: &'a Point,
    pub to: &'a Point,
    pub from_if: &'a str,
    pub to_if: &'a str,
    pub from_ns: &'a str,
    pub to_ns: &'a str,
    /// The bridges the interfaces are ports of, if any.
    pub from_master: Option<&'a str>,
    pub to_master: Option<&'a str>,
    /// Device kinds ("veth", "macvlan", ...) and the lower devices of stacked ones.
    pub from_kind: &'a str,
    pub to_kind: &'a str,
    pub from_link: Option<&'a str>,
    pub to_link: Option<&'a str>,
    /// Whether `to_if` is the link peer of `from_if` (a veth pair's other end).
    pub peers: bool,
    /// The packet enters (true) or leaves (false) a tunnel between the two hops, and which.
    pub encap: Option<(bool, &'a str)>,
    /// The userspace datapaths the interfaces are ports of ("dpdk-testpmd"), if any.
    pub from_userspace: Option<&'a str>,
    pub to_userspace: Option<&'a str>,
    /// The eBPF datapath's tc program on `from_if`'s ingress ("tc_redirect"), if any.
    pub from_tc_program: Option<&'a str>,
}

/// A segment's name, and whether the packet spends it in a userspace process (no kernel hook
/// can split it; user probes can).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    pub name: String,
    pub userspace: bool,
    /// Between two kernels: estimated, not measured on one clock.
    pub estimated: bool,
}

/// Names the segment between two consecutive hops after what the packet crosses there: the
/// first of [`RULES`] that matches.
pub fn segment_name(e: &SegmentEnds) -> String {
    segment(e).name
}

/// The segment's name and whether it spans userspace.
pub fn segment(e: &SegmentEnds) -> Named {
    let c = Ctx::new(e);
    let rule = rule_for(e, &c);
    let name = (rule.names)(e, &c);
    // RUST_LOG=trace says which rule named each segment.
    log::trace!("segment {name:?}: rule {:?}", rule.name);
    Named {
        name,
        userspace: matches!(
            rule.name,
            USERSPACE_RULE | USER_PROBE_RULE | USERSPACE_CROSSING_RULE
        ),
        estimated: matches!(rule.name, CROSSING_RULE | USERSPACE_CROSSING_RULE),
    }
}

/// The rule of segments spent in a userspace datapath.
const USERSPACE_RULE: &str = "userspace datapath";
/// The rule of segments between two kernels.
const CROSSING_RULE: &str = "crossing";
/// The rule of segments between two kernels through a userspace datapath (a guest's
/// vhost-user NIC): in the process, and estimated.
const USERSPACE_CROSSING_RULE: &str = "userspace datapath crossing";
/// The rule of segments that start or end at a user probe: in the process too.
const USER_PROBE_RULE: &str = "user probe";

/// The name of the rule that names `e`, so that tests see which one fired.
#[cfg(test)]
pub(crate) fn matching_rule(e: &SegmentEnds) -> &'static str {
    rule_for(e, &Ctx::new(e)).name
}

fn rule_for(e: &SegmentEnds, c: &Ctx) -> &'static Rule {
    RULES
        .iter()
        .find(|r| (r.matches)(e, c))
        .expect("the last rule matches every segment")
}

/// What several rules need, worked out once per segment.
struct Ctx<'a> {
    /// Both hops are on one device.
    same_if: bool,
    /// The display names of the two devices (with the namespace when the names are equal).
    a: String,
    b: String,
    /// The bridge both devices are ports of, in one namespace.
    bridge: Option<&'a str>,
}

impl<'a> Ctx<'a> {
    fn new(e: &SegmentEnds<'a>) -> Self {
        let same_if = e.from_if == e.to_if && e.from_ns == e.to_ns;
        // Interfaces of the same name on both sides (eth0 -> eth0) are told apart by namespace.
        let (a, b) = if e.from_if == e.to_if && !same_if {
            (
                format!("{} {}", e.from_if, parenthesized(e.from_ns)),
                format!("{} {}", e.to_if, parenthesized(e.to_ns)),
            )
        } else {
            (e.from_if.to_string(), e.to_if.to_string())
        };
        let bridge = match (e.from_master, e.to_master) {
            (Some(x), Some(y)) if x == y && e.from_ns == e.to_ns => Some(x),
            _ => None,
        };
        Ctx {
            same_if,
            a,
            b,
            bridge,
        }
    }
}

/// One way of naming a segment: `names` names the segments `matches` accepts.
struct Rule {
    /// What the rule names; tests check which rule fired by it.
    name: &'static str,
    matches: fn(&SegmentEnds, &Ctx) -> bool,
    names: fn(&SegmentEnds, &Ctx) -> String,
}

/// Tried in order; the first that matches names the segment. Order matters because the rules
/// overlap and earlier ones are more specific: the application ends first; then the return of a
/// (nested) transmit, which is not packet movement, whatever else lies between the hops; then
/// tunnel entry and exit; stacked devices; and last the stages of one device and the links,
/// bridges and routing between devices, down to a catch-all that names the two hooks.
const RULES: &[Rule] = &[
    // The sending application's socket and its namespace's stack, down to the first hook.
    Rule {
        name: "socket and stack",
        matches: |e, _| *e.from == AppSend,
        names: |e, _| format!("socket and stack {}", parenthesized(e.from_ns)),
    },
    // From the last hook up through the stack to the receiving socket.
    Rule {
        name: "stack and socket",
        matches: |e, _| *e.to == AppRecv,
        names: |e, _| format!("stack and socket {}", parenthesized(e.to_ns)),
    },
    // A user probe (`run --uprobe`) on either side: the packet is in a userspace process, between
    // the kernel hook or probe before and the probe or kernel hook after; a probe's "interface"
    // is its hop name.
    Rule {
        name: USER_PROBE_RULE,
        matches: |e, _| matches!(e.from, Uprobe(_)) || matches!(e.to, Uprobe(_)),
        names: |e, _| format!("userspace {} -> {}", e.from_if, e.to_if),
    },
    // From one kernel to another through a userspace datapath that serves the guest's NIC
    // (testpmd's vhost-user port): in the process, no QEMU, estimated from both clocks.
    Rule {
        name: USERSPACE_CROSSING_RULE,
        matches: |e, _| {
            node_of(e.from_ns) != node_of(e.to_ns) && e.from_userspace.or(e.to_userspace).is_some()
        },
        names: |e, _| {
            format!(
                "userspace datapath {} {} ({}) -> {} ({})",
                e.from_userspace.or(e.to_userspace).unwrap_or_default(),
                e.from_if,
                node_of(e.from_ns),
                e.to_if,
                node_of(e.to_ns)
            )
        },
    },
    // A userspace datapath (DPDK's testpmd, a vswitch) took the packet from one of its ports
    // through a packet socket and sent a copy out of another: from the last hook that saw it
    // on the way in to the first that saw the copy, it was in the process.
    Rule {
        name: USERSPACE_RULE,
        matches: |e, c| {
            !c.same_if && e.from_userspace.is_some() && e.from_userspace == e.to_userspace
        },
        names: |e, c| {
            let datapath = e.from_userspace.unwrap_or_default();
            format!("userspace datapath {datapath} {} -> {}", c.a, c.b)
        },
    },
    // From one kernel to another (host tap -> guest virtio-net, and back): the hypervisor's
    // part, whose time is estimated from both clocks (run/crossing.rs).
    Rule {
        name: CROSSING_RULE,
        matches: |e, _| node_of(e.from_ns) != node_of(e.to_ns),
        names: |e, _| {
            format!(
                "crossing {} ({}) -> {} ({})",
                e.from_if,
                node_of(e.from_ns),
                e.to_if,
                node_of(e.to_ns)
            )
        },
    },
    // One device's driver transmit, from its start to its return.
    Rule {
        name: "driver xmit",
        matches: |e, c| c.same_if && from_to(e, NetDevStartXmit, NetDevXmit),
        names: |_, c| format!("driver xmit {}", c.a),
    },
    // Any other segment ending at a transmit's return: the time is spent unwinding a nested
    // transmit (inside a lower device's xmit), not moving the packet.
    Rule {
        name: "xmit return",
        matches: |e, _| at(e.to, NetDevXmit),
        names: |_, c| format!("xmit return {}", c.b),
    },
    // The transmit (veth's) left the packet in the peer's backlog, where the receive took it
    // from after the transmit returned.
    Rule {
        name: "backlog queue",
        matches: |e, _| from_to(e, NetDevXmit, NetifReceiveSkb),
        names: |_, c| format!("backlog queue {}", c.b),
    },
    // Two VFs of one SR-IOV NIC: the NIC's own switch took the frame from one VF's transmit
    // ring to the other's receive ring (under QEMU, software emulating that switch).
    Rule {
        name: "NIC switch",
        matches: |e, _| {
            from_to(e, NetDevXmit, NapiGroReceiveEntry)
                && e.from_kind == e.to_kind
                && e.from_link.is_some()
                && e.from_link == e.to_link
                && vf_nic(e.from_kind).is_some()
        },
        names: |e, c| {
            let nic = vf_nic(e.from_kind).unwrap_or_default();
            format!("NIC switch {} -> {} ({nic})", c.a, c.b)
        },
    },
    // A transmit and the next device's NAPI receive: the wire (or virtual link) between them.
    Rule {
        name: "wire",
        matches: |e, _| from_to(e, NetDevXmit, NapiGroReceiveEntry),
        names: |_, c| format!("wire {} -> {}", c.a, c.b),
    },
    // A transmit that returned before the next device started its own: the packet waited in
    // that device's qdisc, dequeued later (netem, shaping).
    Rule {
        name: "qdisc after return",
        matches: |e, c| !c.same_if && from_to(e, NetDevXmit, NetDevStartXmit),
        names: |_, c| format!("qdisc {}", c.b),
    },
    // The packet enters or leaves a tunnel between the hops.
    Rule {
        name: "tunnel",
        matches: |e, _| e.encap.is_some(),
        names: tunnel,
    },
    // A tunnel device's transmit straight to POST_ROUTING of the device its outer packet
    // leaves by (a Service's NAT hooks): the tunnel wrapped it. The hop's depth cannot say so:
    // at POST_ROUTING the outer packet has no link header yet, so its headers are not read.
    Rule {
        name: "tunnel to postrouting",
        matches: |e, c| {
            !c.same_if
                && from_to(e, NetDevStartXmit, NfPostNatBefore)
                && TUNNEL_KINDS.contains(&e.from_kind)
        },
        names: |e, c| format!("{} encap {} -> {}", e.from_kind, c.a, c.b),
    },
    // Stacked devices (macvlan, vlan): the child hands over to its lower device (macvlan's
    // bridge mode too: it forwards to the lower device, whose rx handler finds the sibling).
    Rule {
        name: "stacked to lower",
        matches: |e, _| {
            at(e.from, NetDevStartXmit)
                && at_any(e.to, &[TcEgress, NetDevQueue, NetifRx])
                && e.from_link == Some(e.to_if)
        },
        names: |e, c| format!("{} {} -> {}", e.from_kind, c.a, c.b),
    },
    // The lower device's rx handler hands the packet to the stacked child.
    Rule {
        name: "lower to stacked",
        matches: |e, _| {
            at_any(e.to, &[TcIngress, NetifReceiveSkb, NetifRx]) && e.to_link == Some(e.from_if)
        },
        names: |e, c| format!("{} {} -> {}", e.to_kind, c.a, c.b),
    },
    // One device's tc egress to its qdisc enqueue.
    Rule {
        name: "egress to queue",
        matches: |e, c| c.same_if && from_to(e, TcEgress, NetDevQueue),
        names: |_, c| format!("egress to queue {}", c.a),
    },
    // One device's qdisc, from enqueue to the driver's transmit.
    Rule {
        name: "qdisc",
        matches: |e, c| c.same_if && from_to(e, NetDevQueue, NetDevStartXmit),
        names: |_, c| format!("qdisc {}", c.a),
    },
    // The driver's transmit (veth_xmit with the deep hooks) handing to the peer's backlog.
    Rule {
        name: "veth peer handover",
        matches: |e, _| e.peers && at(e.to, NetifRx),
        names: |_, c| format!("veth {} -> {}", c.a, c.b),
    },
    // OVS: a flow-table miss goes up to ovs-vswitchd, which installs the flow and sends the
    // packet back down to be executed.
    Rule {
        name: "ovs upcall",
        matches: |e, _| at(e.from, OvsDpUpcall),
        names: |_, _| "ovs upcall (ovs-vswitchd and back)".to_string(),
    },
    // OVS sending out of one of its ports to the next device.
    Rule {
        name: "ovs output",
        matches: |e, c| !c.same_if && at(e.from, OvsVportSend),
        names: |_, c| format!("ovs output {} -> {}", c.a, c.b),
    },
    // A bridge forwarding from one port to another (deep hooks).
    Rule {
        name: "bridge forward",
        matches: |e, c| !c.same_if && at(e.from, BrForward),
        names: |_, c| match c.bridge {
            Some(br) => format!("bridge {br} forward ({} -> {})", c.a, c.b),
            None => format!("bridge forward {} -> {}", c.a, c.b),
        },
    },
    // Without tc hooks (attach mode): the backlog between netif_rx and the receive.
    Rule {
        name: "backlog",
        matches: |e, c| c.same_if && from_to(e, NetifRx, NetifReceiveSkb),
        names: |_, c| format!("backlog {}", c.b),
    },
    // From the tc ingress (or receive) of an eBPF datapath's port to another device's egress
    // or queue, no hook between: its program sent the packet out with bpf_redirect_neigh (as
    // Cilium's host routing does towards other nodes), past the host stack's forwarding.
    Rule {
        name: "eBPF redirect neigh",
        matches: |e, c| {
            !c.same_if
                && e.from_tc_program.is_some()
                && at_any(e.from, &[TcIngress, NetifReceiveSkb])
                && at_any(e.to, &[TcEgress, NetDevQueue])
        },
        names: |e, c| {
            format!(
                "eBPF redirect neigh {} -> {} {}",
                c.a,
                c.b,
                parenthesized(e.from_ns)
            )
        },
    },
    // Without tc hooks: bridging or routing from one device's receive to another's queue.
    Rule {
        name: "receive to queue",
        matches: |e, _| from_to(e, NetifReceiveSkb, NetDevQueue),
        names: bridge_or_forward,
    },
    // Without tc hooks: a bridge delivering to its own device, for the host stack.
    Rule {
        name: "receive to bridge device",
        matches: |e, _| {
            from_to(e, NetifReceiveSkb, NetifReceiveSkb) && e.from_master == Some(e.to_if)
        },
        names: to_host_stack,
    },
    // One device's GRO, from the NAPI receive to the stack's receive.
    Rule {
        name: "gro",
        matches: |e, c| c.same_if && from_to(e, NapiGroReceiveEntry, NetifReceiveSkb),
        names: |_, c| format!("gro {}", c.b),
    },
    // One device's receive to its tc ingress.
    Rule {
        name: "receive to ingress",
        matches: |e, c| c.same_if && from_to(e, NetifReceiveSkb, TcIngress),
        names: |_, c| format!("receive to ingress {}", c.b),
    },
    // From one device's tc ingress (or, without tc hooks there, its receive) straight to
    // another's tc ingress, no hook between: a tc program redirected the packet to a veth's
    // peer (bpf_redirect_peer, as Cilium's datapath does), which the kernel takes in the same
    // receive, past the bridge, backlog and host stack.
    Rule {
        name: "eBPF redirect peer",
        matches: |e, c| {
            !c.same_if && at_any(e.from, &[TcIngress, NetifReceiveSkb]) && at(e.to, TcIngress)
        },
        names: |e, c| {
            format!(
                "eBPF redirect peer {} -> {} {}",
                c.a,
                e.to_if,
                parenthesized(e.to_ns)
            )
        },
    },
    // Netfilter's NAT between the programs just before and just after it: a Service's DNAT at
    // PRE_ROUTING, its replies' un-DNAT at POST_ROUTING.
    Rule {
        name: "nat",
        matches: |e, c| {
            c.same_if
                && (from_to(e, NfPreNatBefore, NfPreNatAfter)
                    || from_to(e, NfPostNatBefore, NfPostNatAfter))
        },
        names: |e, c| {
            format!(
                "nat {} {} {}",
                nf_hook(e.from),
                c.a,
                parenthesized(e.from_ns)
            )
        },
    },
    // Up to the NAT at PRE_ROUTING (conntrack on the way): from a bridge port, whose frames
    // the bridge hands to netfilter's IPv4 hooks itself (br_netfilter), or a device's receive.
    Rule {
        name: "to prerouting",
        matches: |e, _| at(e.to, NfPreNatBefore),
        names: |e, c| match (e.from_master == Some(e.to_if), c.same_if) {
            (true, _) => format!("bridge {} ({} -> prerouting)", c.b, c.a),
            (false, true) => format!("receive to prerouting {}", c.a),
            (false, false) => format!("{} -> prerouting {}", c.a, c.b),
        },
    },
    // After the NAT at PRE_ROUTING, to the next device: bridged on to a port of the bridge it
    // came in on (br_netfilter, when the new destination is behind the same bridge), or routed.
    Rule {
        name: "from prerouting",
        matches: |e, c| !c.same_if && at(e.from, NfPreNatAfter),
        names: |e, c| match e.to_master == Some(e.from_if) {
            true => format!("bridge {} (prerouting -> {})", c.a, c.b),
            false => format!("forward {} -> {} {}", c.a, c.b, parenthesized(e.from_ns)),
        },
    },
    // After the NAT, on the same device: to its egress or queue. At PRE_ROUTING that is a
    // bridge whose DNATed frame br_netfilter sends out of the bridge device again, through the
    // neighbour's output, when the new destination's link header is not cached.
    Rule {
        name: "from nat to egress",
        matches: |e, c| {
            c.same_if
                && at_any(e.from, &[NfPreNatAfter, NfPostNatAfter])
                && at_any(e.to, &[TcEgress, NetDevQueue])
        },
        names: |e, c| format!("{} to egress {}", nf_hook(e.from), c.a),
    },
    // A bridge whose DNATed frame is for a destination routed elsewhere: br_netfilter hands it
    // to the bridge device, for the host stack to route.
    Rule {
        name: "from prerouting to host stack",
        matches: |e, c| c.same_if && from_to(e, NfPreNatAfter, NetifReceiveSkb),
        names: |_, c| format!("bridge {} (prerouting -> host stack)", c.a),
    },
    // With tc hooks: bridging or routing from one device's ingress to another's egress.
    Rule {
        name: "ingress to egress",
        matches: |e, _| at(e.from, TcIngress) && at_any(e.to, &[TcEgress, NfPostNatBefore]),
        names: bridge_or_forward,
    },
    // A bridge delivering to its own device (the host stack routes on from there).
    Rule {
        name: "ingress to bridge device",
        matches: |e, _| from_to(e, TcIngress, NetifReceiveSkb) && e.from_master == Some(e.to_if),
        names: to_host_stack,
    },
    // A bridge device transmitting through one of its ports (to its egress hook, or without tc
    // hooks to its queue): the host stack sent through the bridge.
    Rule {
        name: "bridge to port",
        matches: |e, _| {
            at(e.from, NetDevStartXmit)
                && at_any(e.to, &[TcEgress, NetDevQueue, NfPostNatBefore])
                && e.to_master == Some(e.from_if)
        },
        names: |_, c| format!("bridge {} (-> port {})", c.a, c.b),
    },
    // Stages within one device: from one hook to the next.
    Rule {
        name: "device stage",
        matches: |_, c| c.same_if,
        names: |e, c| format!("{} -> {} {}", label(e.from), label(e.to), c.a),
    },
    // Anything else between two devices, named after both hooks.
    Rule {
        name: "between devices",
        matches: |_, _| true,
        names: |e, c| format!("{} {} -> {} {}", label(e.from), c.a, label(e.to), c.b),
    },
];

/// SR-IOV VF drivers (a VF's device kind) and the driver of their NIC, whose switch joins
/// the VFs of one PF.
const VF_DRIVERS: &[(&str, &str)] = &[("igbvf", "igb"), ("ixgbevf", "ixgbe")];

/// The NIC of a VF of device kind `kind`.
fn vf_nic(kind: &str) -> Option<&'static str> {
    VF_DRIVERS
        .iter()
        .find(|(vf, _)| *vf == kind)
        .map(|(_, nic)| *nic)
}

/// Whether `p` is the hook `id`.
fn at(p: &Point, id: HookId) -> bool {
    *p == Hook(id)
}

/// The kinds of tunnel devices, as netlink reports them.
const TUNNEL_KINDS: &[&str] = &["vxlan", "geneve", "gretap", "gre"];

fn at_any(p: &Point, ids: &[HookId]) -> bool {
    ids.iter().any(|&id| at(p, id))
}

/// Whether the segment runs from hook `from` to hook `to`.
fn from_to(e: &SegmentEnds, from: HookId, to: HookId) -> bool {
    at(e.from, from) && at(e.to, to)
}

fn tunnel(e: &SegmentEnds, c: &Ctx) -> String {
    let (enter, tunnel) = e.encap.unwrap_or_default();
    let way = if enter { "encap" } else { "decap" };
    format!("{tunnel} {way} {} -> {}", c.a, c.b)
}

/// Between ports of one bridge the packet was bridged; otherwise it was routed.
fn bridge_or_forward(e: &SegmentEnds, c: &Ctx) -> String {
    match c.bridge {
        Some(br) => format!("bridge {br} ({} -> {})", c.a, c.b),
        None => format!("forward {} -> {} {}", c.a, c.b, parenthesized(e.from_ns)),
    }
}

/// The netfilter hook a NAT program is at.
fn nf_hook(p: &Point) -> &'static str {
    match p {
        Hook(NfPostNatBefore | NfPostNatAfter) => "postrouting",
        _ => "prerouting",
    }
}

fn to_host_stack(_: &SegmentEnds, c: &Ctx) -> String {
    format!("bridge {} ({} -> host stack)", c.b, c.a)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The old guarded `match` the table replaced, kept to check the table against.
    fn reference(e: &SegmentEnds) -> String {
        use HookId::*;
        use Point::*;
        let same_if = e.from_if == e.to_if && e.from_ns == e.to_ns;
        // Interfaces of the same name on both sides (eth0 -> eth0) are told apart by namespace.
        let (a, b) = if e.from_if == e.to_if && !same_if {
            (
                format!("{} {}", e.from_if, parenthesized(e.from_ns)),
                format!("{} {}", e.to_if, parenthesized(e.to_ns)),
            )
        } else {
            (e.from_if.to_string(), e.to_if.to_string())
        };
        let bridge = match (e.from_master, e.to_master) {
            (Some(x), Some(y)) if x == y && e.from_ns == e.to_ns => Some(x),
            _ => None,
        };
        let from_ns = parenthesized(e.from_ns);
        match (e.from, e.to) {
            (AppSend, _) => format!("socket and stack {from_ns}"),
            (_, AppRecv) => format!("stack and socket {}", parenthesized(e.to_ns)),
            (Uprobe(_), _) | (_, Uprobe(_)) => format!("userspace {} -> {}", e.from_if, e.to_if),
            _ if node_of(e.from_ns) != node_of(e.to_ns)
                && e.from_userspace.or(e.to_userspace).is_some() =>
            {
                format!(
                    "userspace datapath {} {} ({}) -> {} ({})",
                    e.from_userspace.or(e.to_userspace).unwrap_or_default(),
                    e.from_if,
                    node_of(e.from_ns),
                    e.to_if,
                    node_of(e.to_ns)
                )
            }
            _ if !same_if && e.from_userspace.is_some() && e.from_userspace == e.to_userspace => {
                format!(
                    "userspace datapath {} {a} -> {b}",
                    e.from_userspace.unwrap_or_default()
                )
            }
            _ if node_of(e.from_ns) != node_of(e.to_ns) => {
                format!(
                    "crossing {} ({}) -> {} ({})",
                    e.from_if,
                    node_of(e.from_ns),
                    e.to_if,
                    node_of(e.to_ns)
                )
            }
            (Hook(NetDevStartXmit), Hook(NetDevXmit)) if same_if => format!("driver xmit {a}"),
            (_, Hook(NetDevXmit)) => format!("xmit return {b}"),
            (Hook(NetDevXmit), Hook(NetifReceiveSkb)) => format!("backlog queue {b}"),
            (Hook(NetDevXmit), Hook(NapiGroReceiveEntry))
                if (e.from_kind, e.to_kind) == ("igbvf", "igbvf")
                    && e.from_link.is_some()
                    && e.from_link == e.to_link =>
            {
                format!("NIC switch {a} -> {b} (igb)")
            }
            (Hook(NetDevXmit), Hook(NapiGroReceiveEntry)) => format!("wire {a} -> {b}"),
            // A transmit that returned before the next device started its own: the packet waited
            // in that device's qdisc, dequeued later (netem, shaping).
            (Hook(NetDevXmit), Hook(NetDevStartXmit)) if !same_if => format!("qdisc {b}"),
            _ if e.encap.is_some() => {
                let (enter, tunnel) = e.encap.unwrap_or_default();
                format!(
                    "{tunnel} {} {a} -> {b}",
                    if enter { "encap" } else { "decap" }
                )
            }
            (Hook(NetDevStartXmit), Hook(NfPostNatBefore))
                if !same_if && TUNNEL_KINDS.contains(&e.from_kind) =>
            {
                format!("{} encap {a} -> {b}", e.from_kind)
            }
            // Stacked devices (macvlan, vlan): the child hands over to its lower device (macvlan's
            // bridge mode too: it forwards to the lower device, whose rx handler finds the sibling),
            // and the lower device's rx handler to the child.
            (Hook(NetDevStartXmit), Hook(TcEgress) | Hook(NetDevQueue) | Hook(NetifRx))
                if e.from_link == Some(e.to_if) =>
            {
                format!("{} {a} -> {b}", e.from_kind)
            }
            (_, Hook(TcIngress) | Hook(NetifReceiveSkb) | Hook(NetifRx))
                if e.to_link == Some(e.from_if) =>
            {
                format!("{} {a} -> {b}", e.to_kind)
            }
            (Hook(TcEgress), Hook(NetDevQueue)) if same_if => format!("egress to queue {a}"),
            (Hook(NetDevQueue), Hook(NetDevStartXmit)) if same_if => format!("qdisc {a}"),
            // The driver's transmit (veth_xmit with the deep hooks) handing to the peer's backlog.
            (_, Hook(NetifRx)) if e.peers => format!("veth {a} -> {b}"),
            // OVS: a flow-table miss goes up to ovs-vswitchd, which installs the flow and sends the
            // packet back down to be executed.
            (Hook(OvsDpUpcall), _) => "ovs upcall (ovs-vswitchd and back)".to_string(),
            (Hook(OvsVportSend), _) if !same_if => format!("ovs output {a} -> {b}"),
            (Hook(BrForward), _) if !same_if => match bridge {
                Some(br) => format!("bridge {br} forward ({a} -> {b})"),
                None => format!("bridge forward {a} -> {b}"),
            },
            // Without tc hooks (attach mode): the backlog between netif_rx and the receive, and
            // bridging or routing from a device's receive to another's queue.
            (Hook(NetifRx), Hook(NetifReceiveSkb)) if same_if => format!("backlog {b}"),
            (Hook(TcIngress) | Hook(NetifReceiveSkb), Hook(TcEgress) | Hook(NetDevQueue))
                if !same_if && e.from_tc_program.is_some() =>
            {
                format!("eBPF redirect neigh {a} -> {b} {from_ns}")
            }
            (Hook(NetifReceiveSkb), Hook(NetDevQueue)) => match bridge {
                Some(br) => format!("bridge {br} ({a} -> {b})"),
                None => format!("forward {a} -> {b} {from_ns}"),
            },
            (Hook(NetifReceiveSkb), Hook(NetifReceiveSkb)) if e.from_master == Some(e.to_if) => {
                format!("bridge {b} ({a} -> host stack)")
            }
            (Hook(NapiGroReceiveEntry), Hook(NetifReceiveSkb)) if same_if => format!("gro {b}"),
            (Hook(NetifReceiveSkb), Hook(TcIngress)) if same_if => {
                format!("receive to ingress {b}")
            }
            (Hook(TcIngress) | Hook(NetifReceiveSkb), Hook(TcIngress)) if !same_if => {
                format!(
                    "eBPF redirect peer {a} -> {} {}",
                    e.to_if,
                    parenthesized(e.to_ns)
                )
            }
            (Hook(NfPreNatBefore), Hook(NfPreNatAfter)) if same_if => {
                format!("nat prerouting {a} {from_ns}")
            }
            (Hook(NfPostNatBefore), Hook(NfPostNatAfter)) if same_if => {
                format!("nat postrouting {a} {from_ns}")
            }
            (_, Hook(NfPreNatBefore)) if e.from_master == Some(e.to_if) => {
                format!("bridge {b} ({a} -> prerouting)")
            }
            (_, Hook(NfPreNatBefore)) if same_if => format!("receive to prerouting {a}"),
            (_, Hook(NfPreNatBefore)) => format!("{a} -> prerouting {b}"),
            (Hook(NfPreNatAfter), _) if !same_if && e.to_master == Some(e.from_if) => {
                format!("bridge {a} (prerouting -> {b})")
            }
            (Hook(NfPreNatAfter), _) if !same_if => format!("forward {a} -> {b} {from_ns}"),
            (Hook(NfPreNatAfter), Hook(TcEgress) | Hook(NetDevQueue)) if same_if => {
                format!("prerouting to egress {a}")
            }
            (Hook(NfPostNatAfter), Hook(TcEgress) | Hook(NetDevQueue)) if same_if => {
                format!("postrouting to egress {a}")
            }
            (Hook(NfPreNatAfter), Hook(NetifReceiveSkb)) if same_if => {
                format!("bridge {a} (prerouting -> host stack)")
            }
            (Hook(TcIngress), Hook(TcEgress) | Hook(NfPostNatBefore)) => match bridge {
                Some(br) => format!("bridge {br} ({a} -> {b})"),
                None => format!("forward {a} -> {b} {from_ns}"),
            },
            // A bridge delivering to its own device (the host stack routes on from there), and a
            // bridge device transmitting through one of its ports.
            (Hook(TcIngress), Hook(NetifReceiveSkb)) if e.from_master == Some(e.to_if) => {
                format!("bridge {b} ({a} -> host stack)")
            }
            (Hook(NetDevStartXmit), Hook(TcEgress) | Hook(NetDevQueue) | Hook(NfPostNatBefore))
                if e.to_master == Some(e.from_if) =>
            {
                format!("bridge {a} (-> port {b})")
            }
            // Stages within one device: from one hook to the next.
            (f, t) if same_if => format!("{} -> {} {a}", label(f), label(t)),
            (f, t) => format!("{} {a} -> {} {b}", label(f), label(t)),
        }
    }

    #[test]
    fn table_names_like_the_old_match() {
        use HookId::*;
        use Point::*;
        let points = [
            AppSend,
            AppRecv,
            Uprobe(0),
            Hook(NetDevQueue),
            Hook(NetDevStartXmit),
            Hook(NetDevXmit),
            Hook(NetifReceiveSkb),
            Hook(NetifRx),
            Hook(NapiGroReceiveEntry),
            Hook(TcIngress),
            Hook(TcEgress),
            Hook(OvsDpUpcall),
            Hook(OvsVportSend),
            Hook(BrForward),
            Hook(KfreeSkb),
            Hook(VethXmit),
            Hook(VxlanRcv),
            Hook(NfPreNatBefore),
            Hook(NfPreNatAfter),
            Hook(NfPostNatBefore),
            Hook(NfPostNatAfter),
        ];
        // Names chosen so that a master or link can be the other end ("br0" is also a bridge).
        let ifs = [
            ("eth0", "eth0"),
            ("eth0", "br0"),
            ("br0", "eth0"),
            ("veth-a", "veth-b"),
        ];
        let masters = [None, Some("br0"), Some("br1")];
        let encaps = [None, Some((true, "vxlan")), Some((false, "geneve"))];
        let mut n = 0;
        let mut fired = std::collections::BTreeSet::new();
        for from in &points {
            for to in &points {
                for ((from_if, to_if), (from_kind, to_kind)) in ifs.into_iter().flat_map(|i| {
                    [
                        (i, ("macvlan", "vlan")),
                        (i, ("igbvf", "igbvf")),
                        (i, ("vxlan", "veth")),
                    ]
                }) {
                    for to_ns in ["host", "ns1", "vm1:pod-b"] {
                        for from_master in masters {
                            for to_master in masters {
                                for from_link in [None, Some(to_if), Some("lower0")] {
                                    for to_link in [None, Some(from_if), Some("lower0")] {
                                        for peers in [false, true] {
                                            for (encap, userspace, tc_program) in
                                                encaps.iter().flat_map(|&x| {
                                                    [
                                                        (x, None, None),
                                                        (x, Some("dp"), None),
                                                        (x, None, Some("tc_redirect")),
                                                    ]
                                                })
                                            {
                                                let e = SegmentEnds {
                                                    from,
                                                    to,
                                                    from_if,
                                                    to_if,
                                                    from_ns: "host",
                                                    to_ns,
                                                    from_master,
                                                    to_master,
                                                    from_kind,
                                                    to_kind,
                                                    from_link,
                                                    to_link,
                                                    peers,
                                                    encap,
                                                    from_userspace: userspace,
                                                    to_userspace: userspace,
                                                    from_tc_program: tc_program,
                                                };
                                                assert_eq!(segment_name(&e), reference(&e));
                                                fired.insert(matching_rule(&e));
                                                n += 1;
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(n > 100_000);
        // Every rule can fire: none is shadowed by the rules before it.
        for r in RULES {
            assert!(fired.contains(r.name), "rule {:?} never fired", r.name);
        }
    }

    /// Two veth ends in one namespace, with nothing else known: rules override what they need.
    fn ends<'a>(from: &'a Point, to: &'a Point) -> SegmentEnds<'a> {
        SegmentEnds {
            from,
            to,
            from_if: "veth-a",
            to_if: "veth-b",
            from_ns: "host",
            to_ns: "host",
            from_master: None,
            to_master: None,
            from_kind: "veth",
            to_kind: "veth",
            from_link: None,
            to_link: None,
            peers: false,
            encap: None,
            from_userspace: None,
            to_userspace: None,
            from_tc_program: None,
        }
    }

    /// Per rule, a segment it names and the name: a changed name, or an earlier rule taking
    /// over after a reordering, fails here.
    #[test]
    fn each_rule_names_its_segment() {
        let one = |e: SegmentEnds<'static>| SegmentEnds {
            to_if: e.from_if,
            ..e
        };
        let bridged = |e: SegmentEnds<'static>| SegmentEnds {
            from_master: Some("br0"),
            to_master: Some("br0"),
            ..e
        };
        let cases = [
            (
                "socket and stack",
                ends(&AppSend, &Hook(TcEgress)),
                "socket and stack (host)",
            ),
            (
                "stack and socket",
                ends(&Hook(TcIngress), &AppRecv),
                "stack and socket (host)",
            ),
            (
                USER_PROBE_RULE,
                SegmentEnds {
                    to_if: "uprobe:receive",
                    ..ends(&Hook(TcIngress), &Uprobe(0))
                },
                "userspace veth-a -> uprobe:receive",
            ),
            (
                USERSPACE_RULE,
                SegmentEnds {
                    from_userspace: Some("dpdk-testpmd"),
                    to_userspace: Some("dpdk-testpmd"),
                    ..ends(&Hook(TcIngress), &Hook(TcEgress))
                },
                "userspace datapath dpdk-testpmd veth-a -> veth-b",
            ),
            (
                CROSSING_RULE,
                SegmentEnds {
                    from_if: "tap-vm1",
                    to_if: "eth0",
                    to_ns: "vm1:(root)",
                    ..ends(&Hook(NetDevXmit), &Hook(NapiGroReceiveEntry))
                },
                "crossing tap-vm1 (host) -> eth0 (vm1)",
            ),
            (
                USERSPACE_CROSSING_RULE,
                SegmentEnds {
                    from_if: "vhu-vm1",
                    to_if: "eth0",
                    to_ns: "vm1:(root)",
                    from_userspace: Some("dpdk-testpmd"),
                    ..ends(&Hook(NetifReceiveSkb), &Hook(NapiGroReceiveEntry))
                },
                "userspace datapath dpdk-testpmd vhu-vm1 (host) -> eth0 (vm1)",
            ),
            (
                "driver xmit",
                one(ends(&Hook(NetDevStartXmit), &Hook(NetDevXmit))),
                "driver xmit veth-a",
            ),
            (
                "xmit return",
                SegmentEnds {
                    encap: Some((true, "vxlan")),
                    ..ends(&Hook(NetDevXmit), &Hook(NetDevXmit))
                },
                "xmit return veth-b",
            ),
            (
                "backlog queue",
                ends(&Hook(NetDevXmit), &Hook(NetifReceiveSkb)),
                "backlog queue veth-b",
            ),
            (
                "wire",
                SegmentEnds {
                    from_if: "eth0",
                    to_if: "eth0",
                    to_ns: "host-b",
                    ..ends(&Hook(NetDevXmit), &Hook(NapiGroReceiveEntry))
                },
                "wire eth0 (host) -> eth0 (host-b)",
            ),
            (
                "NIC switch",
                SegmentEnds {
                    from_if: "eth0",
                    to_if: "eth0",
                    from_ns: "pod-a",
                    to_ns: "pod-b",
                    from_kind: "igbvf",
                    to_kind: "igbvf",
                    from_link: Some("enp1s0"),
                    to_link: Some("enp1s0"),
                    ..ends(&Hook(NetDevXmit), &Hook(NapiGroReceiveEntry))
                },
                "NIC switch eth0 (pod-a) -> eth0 (pod-b) (igb)",
            ),
            (
                "wire",
                SegmentEnds {
                    from_if: "eth0",
                    to_if: "eth0",
                    from_ns: "pod-a",
                    to_ns: "pod-b",
                    from_kind: "igbvf",
                    to_kind: "igbvf",
                    from_link: Some("enp1s0"),
                    to_link: Some("enp2s0"),
                    ..ends(&Hook(NetDevXmit), &Hook(NapiGroReceiveEntry))
                },
                "wire eth0 (pod-a) -> eth0 (pod-b)",
            ),
            (
                "qdisc after return",
                ends(&Hook(NetDevXmit), &Hook(NetDevStartXmit)),
                "qdisc veth-b",
            ),
            (
                "tunnel",
                SegmentEnds {
                    from_if: "flannel.1",
                    to_if: "wire0",
                    encap: Some((true, "vxlan")),
                    ..ends(&Hook(NetDevStartXmit), &Hook(NetDevQueue))
                },
                "vxlan encap flannel.1 -> wire0",
            ),
            (
                "tunnel",
                SegmentEnds {
                    from_if: "wire0",
                    to_if: "genev_sys",
                    encap: Some((false, "geneve")),
                    ..ends(&Hook(NetifReceiveSkb), &Hook(NetifReceiveSkb))
                },
                "geneve decap wire0 -> genev_sys",
            ),
            (
                "tunnel to postrouting",
                SegmentEnds {
                    from_if: "flannel.1",
                    to_if: "wire0",
                    from_kind: "vxlan",
                    from_link: Some("wire0"),
                    ..ends(&Hook(NetDevStartXmit), &Hook(NfPostNatBefore))
                },
                "vxlan encap flannel.1 -> wire0",
            ),
            (
                "stacked to lower",
                SegmentEnds {
                    from_if: "macvlan0",
                    to_if: "eth0",
                    from_kind: "macvlan",
                    from_link: Some("eth0"),
                    ..ends(&Hook(NetDevStartXmit), &Hook(NetDevQueue))
                },
                "macvlan macvlan0 -> eth0",
            ),
            (
                "lower to stacked",
                SegmentEnds {
                    from_if: "eth0",
                    to_if: "eth0.10",
                    to_kind: "vlan",
                    to_link: Some("eth0"),
                    ..ends(&Hook(NetifReceiveSkb), &Hook(NetifReceiveSkb))
                },
                "vlan eth0 -> eth0.10",
            ),
            (
                "egress to queue",
                one(ends(&Hook(TcEgress), &Hook(NetDevQueue))),
                "egress to queue veth-a",
            ),
            (
                "qdisc",
                one(ends(&Hook(NetDevQueue), &Hook(NetDevStartXmit))),
                "qdisc veth-a",
            ),
            (
                "veth peer handover",
                SegmentEnds {
                    from_if: "eth0",
                    peers: true,
                    ..ends(&Hook(NetDevStartXmit), &Hook(NetifRx))
                },
                "veth eth0 -> veth-b",
            ),
            (
                "ovs upcall",
                ends(&Hook(OvsDpUpcall), &Hook(OvsExecuteActions)),
                "ovs upcall (ovs-vswitchd and back)",
            ),
            (
                "ovs output",
                ends(&Hook(OvsVportSend), &Hook(NetDevStartXmit)),
                "ovs output veth-a -> veth-b",
            ),
            (
                "bridge forward",
                bridged(ends(&Hook(BrForward), &Hook(NetDevStartXmit))),
                "bridge br0 forward (veth-a -> veth-b)",
            ),
            (
                "bridge forward",
                ends(&Hook(BrForward), &Hook(NetDevStartXmit)),
                "bridge forward veth-a -> veth-b",
            ),
            (
                "backlog",
                one(ends(&Hook(NetifRx), &Hook(NetifReceiveSkb))),
                "backlog veth-a",
            ),
            (
                "receive to queue",
                bridged(ends(&Hook(NetifReceiveSkb), &Hook(NetDevQueue))),
                "bridge br0 (veth-a -> veth-b)",
            ),
            (
                "receive to queue",
                SegmentEnds {
                    from_if: "cni0",
                    to_if: "flannel.1",
                    ..ends(&Hook(NetifReceiveSkb), &Hook(NetDevQueue))
                },
                "forward cni0 -> flannel.1 (host)",
            ),
            (
                "receive to bridge device",
                SegmentEnds {
                    to_if: "cni0",
                    from_master: Some("cni0"),
                    ..ends(&Hook(NetifReceiveSkb), &Hook(NetifReceiveSkb))
                },
                "bridge cni0 (veth-a -> host stack)",
            ),
            (
                "gro",
                one(ends(&Hook(NapiGroReceiveEntry), &Hook(NetifReceiveSkb))),
                "gro veth-a",
            ),
            (
                "receive to ingress",
                one(ends(&Hook(NetifReceiveSkb), &Hook(TcIngress))),
                "receive to ingress veth-a",
            ),
            (
                "eBPF redirect peer",
                SegmentEnds {
                    to_if: "eth0",
                    to_ns: "pod-b",
                    ..ends(&Hook(TcIngress), &Hook(TcIngress))
                },
                "eBPF redirect peer veth-a -> eth0 (pod-b)",
            ),
            (
                "eBPF redirect neigh",
                SegmentEnds {
                    to_if: "wire0",
                    from_tc_program: Some("tc_redirect"),
                    ..ends(&Hook(TcIngress), &Hook(TcEgress))
                },
                "eBPF redirect neigh veth-a -> wire0 (host)",
            ),
            (
                "to prerouting",
                SegmentEnds {
                    to_if: "br0",
                    from_master: Some("br0"),
                    ..ends(&Hook(TcIngress), &Hook(NfPreNatBefore))
                },
                "bridge br0 (veth-a -> prerouting)",
            ),
            (
                "nat",
                SegmentEnds {
                    from_if: "br0",
                    to_if: "br0",
                    ..ends(&Hook(NfPreNatBefore), &Hook(NfPreNatAfter))
                },
                "nat prerouting br0 (host)",
            ),
            (
                "from prerouting",
                SegmentEnds {
                    from_if: "br0",
                    to_master: Some("br0"),
                    ..ends(&Hook(NfPreNatAfter), &Hook(NfPostNatBefore))
                },
                "bridge br0 (prerouting -> veth-b)",
            ),
            (
                "from prerouting",
                SegmentEnds {
                    from_if: "cni0",
                    to_if: "flannel.1",
                    ..ends(&Hook(NfPreNatAfter), &Hook(NfPostNatBefore))
                },
                "forward cni0 -> flannel.1 (host)",
            ),
            (
                "nat",
                one(ends(&Hook(NfPostNatBefore), &Hook(NfPostNatAfter))),
                "nat postrouting veth-a (host)",
            ),
            (
                "from nat to egress",
                one(ends(&Hook(NfPostNatAfter), &Hook(TcEgress))),
                "postrouting to egress veth-a",
            ),
            (
                "from nat to egress",
                one(ends(&Hook(NfPreNatAfter), &Hook(TcEgress))),
                "prerouting to egress veth-a",
            ),
            (
                "from prerouting to host stack",
                one(ends(&Hook(NfPreNatAfter), &Hook(NetifReceiveSkb))),
                "bridge veth-a (prerouting -> host stack)",
            ),
            (
                "ingress to egress",
                bridged(ends(&Hook(TcIngress), &Hook(TcEgress))),
                "bridge br0 (veth-a -> veth-b)",
            ),
            (
                "ingress to egress",
                ends(&Hook(TcIngress), &Hook(TcEgress)),
                "forward veth-a -> veth-b (host)",
            ),
            (
                "ingress to egress",
                SegmentEnds {
                    from_if: "cni0",
                    to_if: "flannel.1",
                    ..ends(&Hook(TcIngress), &Hook(NfPostNatBefore))
                },
                "forward cni0 -> flannel.1 (host)",
            ),
            (
                "ingress to bridge device",
                SegmentEnds {
                    to_if: "cni0",
                    from_master: Some("cni0"),
                    ..ends(&Hook(TcIngress), &Hook(NetifReceiveSkb))
                },
                "bridge cni0 (veth-a -> host stack)",
            ),
            (
                "bridge to port",
                SegmentEnds {
                    from_if: "br0",
                    to_master: Some("br0"),
                    ..ends(&Hook(NetDevStartXmit), &Hook(TcEgress))
                },
                "bridge br0 (-> port veth-b)",
            ),
            // Without tc hooks (attach on a node): from the bridge device to the port's queue.
            (
                "bridge to port",
                SegmentEnds {
                    from_if: "br0",
                    to_master: Some("br0"),
                    ..ends(&Hook(NetDevStartXmit), &Hook(NetDevQueue))
                },
                "bridge br0 (-> port veth-b)",
            ),
            // Routed back out of the device it came in by (a hairpin through a gateway), in the
            // root namespace, which is parenthesized already.
            (
                "receive to queue",
                SegmentEnds {
                    from_ns: "(root)",
                    to_ns: "(root)",
                    to_if: "veth-a",
                    ..ends(&Hook(NetifReceiveSkb), &Hook(NetDevQueue))
                },
                "forward veth-a -> veth-a (root)",
            ),
            (
                "device stage",
                one(ends(&Hook(TcIngress), &Hook(NetDevQueue))),
                "tc:ingress -> net_dev_queue veth-a",
            ),
            (
                "between devices",
                ends(&Hook(TcEgress), &Hook(TcIngress)),
                "tc:egress veth-a -> tc:ingress veth-b",
            ),
        ];
        for (rule, e, name) in &cases {
            assert_eq!((matching_rule(e), segment_name(e).as_str()), (*rule, *name));
            assert_eq!(
                segment(e).userspace,
                matches!(
                    *rule,
                    USERSPACE_RULE | USER_PROBE_RULE | USERSPACE_CROSSING_RULE
                ),
                "{name}"
            );
        }
        for r in RULES {
            assert!(
                cases.iter().any(|c| c.0 == r.name),
                "no case for rule {:?}",
                r.name
            );
        }
    }
}
