//! The hook table: every place in the kernel where a program observes packets, how it is
//! attached, which program serves it in each mode, and the short label hops are named with.

use profiler_common::HookId;

use crate::report::schema::HookSet;

/// Which of the two modes the programs serve: `run` looks for the profiler's tagged traffic,
/// `attach` follows real traffic by its buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Run,
    Attach,
}

impl Mode {
    /// Programs are named by mode: X for `run`, fX for `attach` (which follows packets).
    fn program_prefix(self) -> &'static str {
        match self {
            Mode::Run => "",
            Mode::Attach => "f",
        }
    }
}

/// How a hook is attached: via a tracepoint, a tc program, a kernel function...
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
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
    /// The transmit function of each NIC the table does not list by name, found on the running
    /// kernel from the device's `netdev_ops->ndo_start_xmit`, by kprobe as `Function`.
    DriverXmit,
    /// A tracepoint defined by a module, by raw_tp (programs raw_X and fraw_X): tp_btf would need
    /// the module's BTF object, which the loader cannot pass.
    ModuleTracepoint {
        tp: &'static str,
        module: &'static str,
    },
    /// A program at netfilter's IPv4 hook `hooknum` with `priority`, by BPF netfilter link
    /// (kernel/netfilter.rs), in the namespaces that translate a Service.
    Netfilter {
        prog: &'static str,
        hooknum: u32,
        priority: i32,
    },
}

#[derive(Clone, Copy, Debug)]
pub struct HookDef {
    pub id: HookId,
    pub via: Via,
    /// Short name used in hop and segment names.
    pub label: &'static str,
    /// The modes with a program for this hook.
    pub modes: &'static [Mode],
}

impl HookDef {
    /// The tp_btf and raw_tp programs of a tracepoint hook in `mode`, named by convention
    /// (profiler-ebpf's `device_tracepoint!`): tp_X/raw_X tagged, ftp_X/fraw_X follow.
    pub fn tracepoint_programs(&self, mode: Mode) -> Option<(String, String)> {
        let Via::Tracepoint { tp } = self.via else {
            return None;
        };
        let prefix = mode.program_prefix();
        self.modes
            .contains(&mode)
            .then(|| (format!("{prefix}tp_{tp}"), format!("{prefix}raw_{tp}")))
    }
}

/// The decision program that follow program `prog` tail-calls, and its program array (slot
/// 0), named by convention (profiler-ebpf's `follow_tracepoint!` and `module_tracepoint!`): fX
/// calls dX through the array DX. None for a program without one.
pub fn decision_program(prog: &str) -> Option<(String, String)> {
    let rest = ["ftp_", "fraw_", "fkp_"]
        .iter()
        .find_map(|p| prog.strip_prefix(p).map(|rest| (&p[1..], rest)));
    let (kind, rest) = rest?;
    let name = format!("d{kind}{rest}");
    let array = name.to_uppercase();
    Some((name, array))
}

impl HookDef {
    pub fn set(&self) -> HookSet {
        match self.via {
            Via::Tracepoint { .. } | Via::Tc { .. } | Via::Netfilter { .. } => HookSet::Stable,
            Via::Function { .. } | Via::DriverXmit | Via::ModuleTracepoint { .. } => HookSet::Deep,
        }
    }

    /// The program at a netfilter hook in `mode`: nf_X tagged, fnf_X follow (profiler-ebpf's
    /// netfilter.rs).
    pub fn netfilter_program(&self, mode: Mode) -> Option<String> {
        let Via::Netfilter { prog, .. } = self.via else {
            return None;
        };
        Some(format!("{}{prog}", mode.program_prefix()))
    }

    /// The program at a tc hook in `mode`: tc_X tagged, ftc_X follow.
    pub fn tc_program(&self, mode: Mode) -> Option<String> {
        let Via::Tc { prog, .. } = self.via else {
            return None;
        };
        (self.modes.contains(&mode)).then(|| format!("{}{prog}", mode.program_prefix()))
    }

    /// The program serving a deep hook in `mode`.
    pub fn deep_program(&self, mode: Mode) -> Option<String> {
        let prefix = mode.program_prefix();
        match self.via {
            Via::Function { .. } | Via::DriverXmit => Some(format!("{prefix}kp_func")),
            Via::ModuleTracepoint { tp, .. } => Some(format!("{prefix}raw_{tp}")),
            _ => None,
        }
    }

    /// The empty program at a tracepoint attach uses (profiler-ebpf's floor.rs): what calling
    /// any program there costs, for the overhead benchmark.
    pub fn floor_program(&self) -> Option<String> {
        let Via::Tracepoint { tp } = self.via else {
            return None;
        };
        self.modes
            .contains(&Mode::Attach)
            .then(|| format!("floor_{tp}"))
    }

    /// Every program that serves this hook, in any mode.
    pub fn programs(&self) -> Vec<String> {
        match self.via {
            Via::Tc { .. } => [Mode::Run, Mode::Attach]
                .into_iter()
                .filter_map(|m| self.tc_program(m))
                .collect(),
            Via::Netfilter { .. } => [Mode::Run, Mode::Attach]
                .into_iter()
                .filter_map(|m| self.netfilter_program(m))
                .collect(),
            Via::Function { .. } | Via::DriverXmit | Via::ModuleTracepoint { .. } => {
                [Mode::Run, Mode::Attach]
                    .into_iter()
                    .filter_map(|m| self.deep_program(m))
                    .collect()
            }
            Via::Tracepoint { .. } => [Mode::Run, Mode::Attach]
                .into_iter()
                .filter_map(|m| self.tracepoint_programs(m))
                .flat_map(|(btf, raw)| [btf, raw])
                .chain(self.floor_program())
                .collect(),
        }
    }
}

const BOTH: &[Mode] = &[Mode::Run, Mode::Attach];
const TAGGED: &[Mode] = &[Mode::Run];
const FOLLOW: &[Mode] = &[Mode::Attach];

const fn tp(id: HookId, tp: &'static str, modes: &'static [Mode]) -> HookDef {
    HookDef {
        id,
        via: Via::Tracepoint { tp },
        label: tp,
        modes,
    }
}

/// netfilter's hook numbers (enum nf_inet_hooks).
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_POST_ROUTING: u32 = 4;

const fn nat(
    id: HookId,
    prog: &'static str,
    hooknum: u32,
    priority: i32,
    label: &'static str,
) -> HookDef {
    HookDef {
        id,
        via: Via::Netfilter {
            prog,
            hooknum,
            priority,
        },
        label,
        modes: BOTH,
    }
}

/// A function hook, labelled by the function's name.
const fn func(id: HookId, module: &'static str, func: &'static str) -> HookDef {
    HookDef {
        id,
        via: Via::Function { func, module },
        label: func,
        modes: BOTH,
    }
}

const fn module_tp(id: HookId, module: &'static str, tp: &'static str) -> HookDef {
    HookDef {
        id,
        via: Via::ModuleTracepoint { tp, module },
        label: tp,
        modes: BOTH,
    }
}

pub const HOOK_TABLE: &[HookDef] = &[
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
    // tc hooks: run mode reads the tag through __sk_buff; attach mode uses tc ingress only
    // where nothing else sees a packet arrive (a peer redirect), since every tc program is one
    // more on the device for every packet.
    HookDef {
        id: HookId::TcEgress,
        via: Via::Tc {
            prog: "tc_egress",
            ingress: false,
        },
        label: "tc:egress",
        modes: TAGGED,
    },
    HookDef {
        id: HookId::TcIngress,
        via: Via::Tc {
            prog: "tc_ingress",
            ingress: true,
        },
        label: "tc:ingress",
        // Attach mode: only where an eBPF datapath's tc program redirects to a pod's peer
        // (attach/scope.rs), which no tracepoint sees.
        modes: BOTH,
    },
    // Around the NAT of a Service (nf_nat's NF_IP_PRI_NAT_DST -100 at PRE_ROUTING, where a
    // Service's DNAT runs, and NF_IP_PRI_NAT_SRC 100 at POST_ROUTING, where its replies' is
    // undone), one priority before and one after.
    nat(
        HookId::NfPreNatBefore,
        "nf_pre_nat_before",
        NF_INET_PRE_ROUTING,
        -101,
        "nf:prerouting:-101",
    ),
    nat(
        HookId::NfPreNatAfter,
        "nf_pre_nat_after",
        NF_INET_PRE_ROUTING,
        -99,
        "nf:prerouting:-99",
    ),
    nat(
        HookId::NfPostNatBefore,
        "nf_post_nat_before",
        NF_INET_POST_ROUTING,
        99,
        "nf:postrouting:99",
    ),
    nat(
        HookId::NfPostNatAfter,
        "nf_post_nat_after",
        NF_INET_POST_ROUTING,
        101,
        "nf:postrouting:101",
    ),
    // The deep set: what each datapath does with the packet, in the order a packet meets it.
    // Receive paths that build the skb inside the driver (tun_get_user, virtio-net's
    // receive_buf) have no packet to read at entry: the stable receive hooks see them.
    func(HookId::VethXmit, "veth", "veth_xmit"),
    func(HookId::BrHandleFrame, "bridge", "br_handle_frame"),
    func(HookId::BrForward, "bridge", "br_forward"),
    func(HookId::BrDevXmit, "bridge", "br_dev_xmit"),
    func(HookId::VxlanXmit, "vxlan", "vxlan_xmit"),
    func(HookId::VxlanXmitOne, "vxlan", "vxlan_xmit_one"),
    func(
        HookId::UdpTunnelXmitSkb,
        "udp_tunnel",
        "udp_tunnel_xmit_skb",
    ),
    func(HookId::VxlanRcv, "vxlan", "vxlan_rcv"),
    func(HookId::GeneveXmit, "geneve", "geneve_xmit"),
    func(HookId::GeneveRcv, "geneve", "geneve_udp_encap_recv"),
    func(HookId::GreXmit, "ip_gre", "ipgre_xmit"),
    func(HookId::GretapXmit, "ip_gre", "gre_tap_xmit"),
    func(HookId::GreRcv, "ip_gre", "gre_rcv"),
    func(HookId::OvsVportReceive, "openvswitch", "ovs_vport_receive"),
    func(
        HookId::OvsDpProcessPacket,
        "openvswitch",
        "ovs_dp_process_packet",
    ),
    // A flow-table miss: the packet goes up to ovs-vswitchd, which sends it back to be executed.
    module_tp(HookId::OvsDpUpcall, "openvswitch", "ovs_dp_upcall"),
    func(
        HookId::OvsExecuteActions,
        "openvswitch",
        "ovs_execute_actions",
    ),
    module_tp(
        HookId::OvsDoExecuteAction,
        "openvswitch",
        "ovs_do_execute_action",
    ),
    func(HookId::OvsVportSend, "openvswitch", "ovs_vport_send"),
    func(HookId::MacvlanStartXmit, "macvlan", "macvlan_start_xmit"),
    func(
        HookId::MacvlanHandleFrame,
        "macvlan",
        "macvlan_handle_frame",
    ),
    func(HookId::IpvlanQueueXmit, "ipvlan", "ipvlan_queue_xmit"),
    func(HookId::IpvlanHandleFrame, "ipvlan", "ipvlan_handle_frame"),
    func(
        HookId::IpvlanProcessOutbound,
        "ipvlan",
        "ipvlan_process_outbound",
    ),
    func(HookId::TunNetXmit, "tun", "tun_net_xmit"),
    // Drivers name their transmit alike: the label says whose it is.
    HookDef {
        label: "virtnet:start_xmit",
        ..func(HookId::VirtnetStartXmit, "virtio_net", "start_xmit")
    },
    // Any other NIC's transmit (igb_xmit_frame, igbvf_xmit_frame, e1000_xmit_frame, ...): the
    // hop is on the device, so the label need not say whose it is.
    HookDef {
        id: HookId::DriverXmit,
        via: Via::DriverXmit,
        label: "driver:xmit",
        modes: BOTH,
    },
];

pub fn hook(id: HookId) -> &'static HookDef {
    HOOK_TABLE
        .iter()
        .find(|h| h.id == id)
        .expect("every HookId has a HookDef")
}

/// Where on the path a hop is: an application timestamp or a hook on a device.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Point {
    AppSend,
    AppRecv,
    Hook(HookId),
    /// A user probe (`run --uprobe`), by its index in the run's list.
    Uprobe(u32),
}

/// A hop's identity: what observed the packet, on which device of which namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HopKey {
    pub point: Point,
    /// Network namespace inode.
    pub netns: u32,
    /// 0 for application hops.
    pub ifindex: u32,
}

pub fn label(p: &Point) -> &'static str {
    match p {
        Point::AppSend => "app:send",
        Point::AppRecv => "app:recv",
        Point::Hook(id) => hook(*id).label,
        Point::Uprobe(_) => "uprobe",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_id_has_one_spec() {
        for id in HookId::all() {
            assert_eq!(
                HOOK_TABLE.iter().filter(|h| h.id == id).count(),
                1,
                "{id:?}"
            );
        }
    }
}
