//! Datapath knowledge, kept as data in one place: which hooks exist and what program serves each,
//! in which order a packet meets them when it crosses a link, and how the time between two
//! consecutive hops is named.

use profiler_common::HookId;

/// What the programs look for: the profiler's tagged traffic (`run`), or real traffic
/// followed by its buffers (`attach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Tagged,
    Follow,
}

impl Mode {
    /// Programs are named by mode: X in tagged runs, fX to follow.
    fn program_prefix(self) -> &'static str {
        match self {
            Mode::Tagged => "",
            Mode::Follow => "f",
        }
    }
}

/// How a hook is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// A device tracepoint: tp_btf program preferred, raw_tp program where tp_btf is refused.
    Tracepoint { tp: &'static str },
    /// A tc program on each interface of the path.
    Tc { prog: &'static str, ingress: bool },
    /// A kernel function, by kprobe (program kp_func, or fkp_func to follow). `module` is where
    /// the function lives when it is not built in (Debian builds every one of these as a module).
    Function {
        func: &'static str,
        module: &'static str,
    },
    /// A tracepoint defined by a module, by raw_tp (programs raw_X and fraw_X): tp_btf would need
    /// the module's BTF object, which the loader cannot pass.
    ModuleTracepoint {
        tp: &'static str,
        module: &'static str,
    },
}

/// Which hooks a run attaches: the stable ABI (tracepoints, tc) or, besides them, the deep
/// hooks on the datapath's own functions, which exist only where the kernel has kprobes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HookSet {
    Stable,
    Deep,
}

#[derive(Clone, Copy, Debug)]
pub struct HookSpec {
    pub id: HookId,
    pub attach: Attach,
    /// Short name used in hop and segment names.
    pub label: &'static str,
    /// The modes with a program for this hook.
    pub modes: &'static [Mode],
    /// The datapath the hook belongs to ("core" for the device hooks every path crosses).
    pub datapath: &'static str,
}

impl HookSpec {
    /// The tp_btf and raw_tp programs of a tracepoint hook in `mode`, named by convention
    /// (profiler-ebpf's `device_tracepoint!`): tp_X/raw_X tagged, ftp_X/fraw_X follow.
    pub fn tracepoint_programs(&self, mode: Mode) -> Option<(String, String)> {
        let Attach::Tracepoint { tp } = self.attach else {
            return None;
        };
        let prefix = mode.program_prefix();
        self.modes
            .contains(&mode)
            .then(|| (format!("{prefix}tp_{tp}"), format!("{prefix}raw_{tp}")))
    }
}

impl HookSpec {
    pub fn set(&self) -> HookSet {
        match self.attach {
            Attach::Tracepoint { .. } | Attach::Tc { .. } => HookSet::Stable,
            Attach::Function { .. } | Attach::ModuleTracepoint { .. } => HookSet::Deep,
        }
    }

    /// The program serving a deep hook in `mode`.
    pub fn deep_program(&self, mode: Mode) -> Option<String> {
        let prefix = mode.program_prefix();
        match self.attach {
            Attach::Function { .. } => Some(format!("{prefix}kp_func")),
            Attach::ModuleTracepoint { tp, .. } => Some(format!("{prefix}raw_{tp}")),
            _ => None,
        }
    }

    /// Every program that serves this hook, in any mode.
    pub fn programs(&self) -> Vec<String> {
        match self.attach {
            Attach::Tc { prog, .. } => vec![prog.to_string()],
            Attach::Function { .. } | Attach::ModuleTracepoint { .. } => {
                [Mode::Tagged, Mode::Follow]
                    .into_iter()
                    .filter_map(|m| self.deep_program(m))
                    .collect()
            }
            Attach::Tracepoint { .. } => [Mode::Tagged, Mode::Follow]
                .into_iter()
                .filter_map(|m| self.tracepoint_programs(m))
                .flat_map(|(btf, raw)| [btf, raw])
                .collect(),
        }
    }
}

const BOTH: &[Mode] = &[Mode::Tagged, Mode::Follow];
const TAGGED: &[Mode] = &[Mode::Tagged];
const FOLLOW: &[Mode] = &[Mode::Follow];

const fn tp(id: HookId, tp: &'static str, modes: &'static [Mode]) -> HookSpec {
    HookSpec {
        id,
        attach: Attach::Tracepoint { tp },
        label: tp,
        modes,
        datapath: "core",
    }
}

/// A function hook of `datapath`, labelled by the function's name.
const fn func(
    id: HookId,
    datapath: &'static str,
    module: &'static str,
    func: &'static str,
) -> HookSpec {
    HookSpec {
        id,
        attach: Attach::Function { func, module },
        label: func,
        modes: BOTH,
        datapath,
    }
}

const fn module_tp(
    id: HookId,
    datapath: &'static str,
    module: &'static str,
    tp: &'static str,
) -> HookSpec {
    HookSpec {
        id,
        attach: Attach::ModuleTracepoint { tp, module },
        label: tp,
        modes: BOTH,
        datapath,
    }
}

pub const HOOKS: &[HookSpec] = &[
    tp(HookId::NetDevQueue, "net_dev_queue", BOTH),
    tp(HookId::NetDevStartXmit, "net_dev_start_xmit", BOTH),
    // The return of a transmit: tagged runs show it; a followed packet may be gone by then.
    tp(HookId::NetDevXmit, "net_dev_xmit", TAGGED),
    tp(HookId::NetifRx, "netif_rx", BOTH),
    tp(HookId::NapiGroReceiveEntry, "napi_gro_receive_entry", BOTH),
    tp(HookId::NetifReceiveSkb, "netif_receive_skb", BOTH),
    tp(HookId::KfreeSkb, "kfree_skb", BOTH),
    // Where a followed packet's buffer is freed after use: its journey ends.
    tp(HookId::ConsumeSkb, "consume_skb", FOLLOW),
    // tc reads packets through __sk_buff, which hides the buffer a followed packet is known by.
    HookSpec {
        id: HookId::TcEgress,
        attach: Attach::Tc {
            prog: "tc_egress",
            ingress: false,
        },
        label: "tc:egress",
        modes: TAGGED,
        datapath: "core",
    },
    HookSpec {
        id: HookId::TcIngress,
        attach: Attach::Tc {
            prog: "tc_ingress",
            ingress: true,
        },
        label: "tc:ingress",
        modes: TAGGED,
        datapath: "core",
    },
    // The deep set: what each datapath does with the packet, in the order a packet meets it.
    // Receive paths that build the skb inside the driver (tun_get_user, virtio-net's
    // receive_buf) have no packet to read at entry: the stable receive hooks see them.
    func(HookId::VethXmit, "veth", "veth", "veth_xmit"),
    func(HookId::BrHandleFrame, "bridge", "bridge", "br_handle_frame"),
    func(HookId::BrForward, "bridge", "bridge", "br_forward"),
    func(HookId::BrDevXmit, "bridge", "bridge", "br_dev_xmit"),
    func(HookId::VxlanXmit, "vxlan", "vxlan", "vxlan_xmit"),
    func(HookId::VxlanXmitOne, "vxlan", "vxlan", "vxlan_xmit_one"),
    func(
        HookId::UdpTunnelXmitSkb,
        "vxlan",
        "udp_tunnel",
        "udp_tunnel_xmit_skb",
    ),
    func(HookId::VxlanRcv, "vxlan", "vxlan", "vxlan_rcv"),
    func(HookId::GeneveXmit, "geneve", "geneve", "geneve_xmit"),
    func(
        HookId::GeneveRcv,
        "geneve",
        "geneve",
        "geneve_udp_encap_recv",
    ),
    func(HookId::GreXmit, "gre", "ip_gre", "ipgre_xmit"),
    func(HookId::GretapXmit, "gre", "ip_gre", "gre_tap_xmit"),
    func(HookId::GreRcv, "gre", "ip_gre", "gre_rcv"),
    func(
        HookId::OvsVportReceive,
        "ovs",
        "openvswitch",
        "ovs_vport_receive",
    ),
    func(
        HookId::OvsDpProcessPacket,
        "ovs",
        "openvswitch",
        "ovs_dp_process_packet",
    ),
    // A flow-table miss: the packet goes up to ovs-vswitchd, which sends it back to be executed.
    module_tp(HookId::OvsDpUpcall, "ovs", "openvswitch", "ovs_dp_upcall"),
    func(
        HookId::OvsExecuteActions,
        "ovs",
        "openvswitch",
        "ovs_execute_actions",
    ),
    module_tp(
        HookId::OvsDoExecuteAction,
        "ovs",
        "openvswitch",
        "ovs_do_execute_action",
    ),
    func(HookId::OvsVportSend, "ovs", "openvswitch", "ovs_vport_send"),
    func(
        HookId::MacvlanStartXmit,
        "macvlan",
        "macvlan",
        "macvlan_start_xmit",
    ),
    func(
        HookId::MacvlanHandleFrame,
        "macvlan",
        "macvlan",
        "macvlan_handle_frame",
    ),
    func(
        HookId::IpvlanQueueXmit,
        "ipvlan",
        "ipvlan",
        "ipvlan_queue_xmit",
    ),
    func(
        HookId::IpvlanHandleFrame,
        "ipvlan",
        "ipvlan",
        "ipvlan_handle_frame",
    ),
    func(
        HookId::IpvlanProcessOutbound,
        "ipvlan",
        "ipvlan",
        "ipvlan_process_outbound",
    ),
    func(HookId::TunNetXmit, "tun", "tun", "tun_net_xmit"),
    // Drivers name their transmit alike: the label says whose it is.
    HookSpec {
        label: "virtnet:start_xmit",
        ..func(
            HookId::VirtnetStartXmit,
            "virtio-net",
            "virtio_net",
            "start_xmit",
        )
    },
];

pub fn hook(id: HookId) -> &'static HookSpec {
    HOOKS
        .iter()
        .find(|h| h.id == id)
        .expect("every HookId has a HookSpec")
}

/// Where on the path a hop is: an application timestamp or a hook on a device.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Point {
    AppSend,
    AppRecv,
    Hook(HookId),
}

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

pub fn label(p: &Point) -> &'static str {
    match p {
        Point::AppSend => "app:send",
        Point::AppRecv => "app:recv",
        Point::Hook(id) => hook(*id).label,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_id_has_one_spec() {
        for id in HookId::all() {
            assert_eq!(HOOKS.iter().filter(|h| h.id == id).count(), 1, "{id:?}");
        }
    }

    #[test]
    fn every_program_named_here_is_in_the_ebpf_object() {
        use object::{Object as _, ObjectSymbol as _};
        let obj = object::File::parse(crate::hooks::EBPF_OBJECT).expect("the eBPF object");
        let symbols: Vec<&str> = obj.symbols().filter_map(|s| s.name().ok()).collect();
        for spec in HOOKS {
            for prog in spec.programs() {
                assert!(
                    symbols.contains(&prog.as_str()),
                    "{prog} is not in the object"
                );
            }
        }
    }

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
