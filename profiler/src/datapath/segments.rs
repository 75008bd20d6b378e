//! How the time between two consecutive hops is named, after what the packet crosses there.

use profiler_common::HookId;

use super::hooks::{label, Point};

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
}

/// Names the segment between two consecutive hops after what the packet crosses there.
/// The rules, in order: application ends; the return of a (nested) transmit, which is not
/// packet movement; tunnel entry and exit; then the stages of one device and of the link, bridge
/// and routing between devices.
pub fn segment_name(e: &SegmentEnds) -> String {
    use HookId::*;
    use Point::*;
    let same_if = e.from_if == e.to_if && e.from_ns == e.to_ns;
    // Interfaces of the same name on both sides (eth0 -> eth0) are told apart by namespace.
    let (a, b) = if e.from_if == e.to_if && !same_if {
        (
            format!("{} ({})", e.from_if, e.from_ns),
            format!("{} ({})", e.to_if, e.to_ns),
        )
    } else {
        (e.from_if.to_string(), e.to_if.to_string())
    };
    let bridge = match (e.from_master, e.to_master) {
        (Some(x), Some(y)) if x == y && e.from_ns == e.to_ns => Some(x),
        _ => None,
    };
    match (e.from, e.to) {
        (AppSend, _) => format!("socket and stack ({})", e.from_ns),
        (_, AppRecv) => format!("stack and socket ({})", e.to_ns),
        (Hook(NetDevStartXmit), Hook(NetDevXmit)) if same_if => format!("driver xmit {a}"),
        (_, Hook(NetDevXmit)) => format!("xmit return {b}"),
        (Hook(NetDevXmit), Hook(NetifReceiveSkb)) => format!("backlog queue {b}"),
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
        // Without tc hooks (follow mode): the backlog between netif_rx and the receive, and
        // bridging or routing from a device's receive to another's queue.
        (Hook(NetifRx), Hook(NetifReceiveSkb)) if same_if => format!("backlog {b}"),
        (Hook(NetifReceiveSkb), Hook(NetDevQueue)) => match bridge {
            Some(br) => format!("bridge {br} ({a} -> {b})"),
            None => format!("forward {a} -> {b} ({})", e.from_ns),
        },
        (Hook(NetifReceiveSkb), Hook(NetifReceiveSkb)) if e.from_master == Some(e.to_if) => {
            format!("bridge {b} ({a} -> host stack)")
        }
        (Hook(NapiGroReceiveEntry), Hook(NetifReceiveSkb)) if same_if => format!("gro {b}"),
        (Hook(NetifReceiveSkb), Hook(TcIngress)) if same_if => format!("receive to ingress {b}"),
        (Hook(TcIngress), Hook(TcEgress)) => match bridge {
            Some(br) => format!("bridge {br} ({a} -> {b})"),
            None => format!("forward {a} -> {b} ({})", e.from_ns),
        },
        // A bridge delivering to its own device (the host stack routes on from there), and a
        // bridge device transmitting through one of its ports.
        (Hook(TcIngress), Hook(NetifReceiveSkb)) if e.from_master == Some(e.to_if) => {
            format!("bridge {b} ({a} -> host stack)")
        }
        (Hook(NetDevStartXmit), Hook(TcEgress)) if e.to_master == Some(e.from_if) => {
            format!("bridge {a} (-> port {b})")
        }
        // Stages within one device: from one hook to the next.
        (f, t) if same_if => format!("{} -> {} {a}", label(f), label(t)),
        (f, t) => format!("{} {a} -> {} {b}", label(f), label(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_bridge_and_veth_segments() {
        let ends = |from, to, from_if, to_if, bridge, peers| {
            segment_name(&SegmentEnds {
                from,
                to,
                from_if,
                to_if,
                from_ns: "host",
                to_ns: "host",
                from_master: bridge,
                to_master: bridge,
                from_kind: "veth",
                to_kind: "veth",
                from_link: None,
                to_link: None,
                peers,
                encap: None,
            })
        };
        let ing = Point::Hook(HookId::TcIngress);
        let eg = Point::Hook(HookId::TcEgress);
        assert_eq!(
            ends(&ing, &eg, "veth-a", "veth-b", Some("br0"), false),
            "bridge br0 (veth-a -> veth-b)"
        );
        assert_eq!(
            ends(&ing, &eg, "veth-a", "veth-b", None, false),
            "forward veth-a -> veth-b (host)"
        );
        let sx = Point::Hook(HookId::NetDevStartXmit);
        let rx = Point::Hook(HookId::NetifRx);
        assert_eq!(
            ends(&sx, &rx, "eth0", "veth-a", None, true),
            "veth eth0 -> veth-a"
        );
    }
}
