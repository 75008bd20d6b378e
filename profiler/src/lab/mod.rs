//! Lab topologies: network namespaces wired like container networks, built through netlink,
//! for the profiler to measure. One lab per topology and placement at a time, named after them.
//! Cross-host labs model two hosts as two namespaces, host-a and host-b, joined by a veth
//! pair "wire0" (198.19.0.1/24 - 198.19.0.2/24).
//!
//! Addresses are in 198.18.0.0/15 on our own devices only; traffic never leaves the lab.
//! ipvlan, geneve and the OVS topologies need kernel modules this project's 6.18 kernel lacks:
//! there `up` fails up front or midway with one line, and removes what it made.
use std::net::Ipv4Addr;

use anyhow::{bail, Result};

pub mod discover;
pub mod dpdk;
pub mod names;
pub mod nested;
pub mod netns;
mod nl;
pub mod node;
mod ovs;
pub mod owner;
pub mod recover;
mod redirect;
pub mod service;
mod setup;
mod spec;
mod sriov;
mod state;
pub mod target;
pub mod vm_cache;

pub use owner::{Busy, Lock, Owner};
pub use spec::{Net2, MAX_PODS, NET2_IFNAME, NODE_MAX_PODS};
pub use state::STATE_DIR;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
#[clap(rename_all = "kebab-case")]
pub enum Topology {
    Veth,
    Bridge,
    /// No container network: client and server are the two hosts (cross-host only).
    Host,
    /// CNI bridge per host, hosts joined by flannel's VXLAN device flannel.1.
    FlannelVxlan,
    /// Like flannel-vxlan, the hosts joined by a Geneve device geneve0 (cross-host only).
    Geneve,
    Macvlan,
    Vlan,
    /// Pods on ipvlan children (mode l2) of a host's wire0.
    IpvlanL2,
    /// Pods on ipvlan children (mode l3) of a host's wire0, routed by the host.
    IpvlanL3,
    /// Kuryr/Neutron: pods on access ports of OVS br-int, hosts joined by a VLAN trunk.
    OvsVlan,
    /// Neutron's FLAT provider network: as ovs-vlan, the hosts joined untagged (the uplink an
    /// access port of the pods' local VLAN, which OVS strips on the way out).
    OvsFlat,
    /// Kuryr/Neutron: br-int with a VXLAN tunnel port to the other host (cross-host only).
    OvsVxlan,
    /// Kuryr/Neutron: br-int with a GRE tunnel port to the other host (cross-host only).
    OvsGre,
    /// The pods' veth peers are ports of dpdk-testpmd (af_packet), a userspace datapath
    /// (same-host only).
    Dpdk,
    /// Cilium-style: no bridge; a tc program on each pod's host-side veth redirects what it
    /// sends to the destination pod's eth0 (bpf_redirect_peer), or across hosts out of wire0
    /// (bpf_redirect_neigh), where the one on wire0's ingress hands it to the pod.
    EbpfRedirect,
    /// Each pod owns a virtual function of an SR-IOV NIC (igb; the VM lab's `--nic igb`).
    Sriov,
    /// Nested: a pod on this machine and a pod in a QEMU guest (--inner, --outer, --nic).
    Bmp2vmp,
    /// Nested: a pod in each of two QEMU guests (--inner, --outer, --nic, --placement).
    Vmp2vmp,
    /// A Kubernetes-like node: pods made through CRI by a containerd of the lab's own, wired
    /// by the CNI plugins (--cni).
    Node,
}

impl Topology {
    pub const ALL: [Topology; 19] = [
        Topology::Veth,
        Topology::Bridge,
        Topology::Host,
        Topology::FlannelVxlan,
        Topology::Geneve,
        Topology::Macvlan,
        Topology::Vlan,
        Topology::IpvlanL2,
        Topology::IpvlanL3,
        Topology::OvsVlan,
        Topology::OvsFlat,
        Topology::OvsVxlan,
        Topology::OvsGre,
        Topology::Dpdk,
        Topology::EbpfRedirect,
        Topology::Sriov,
        Topology::Bmp2vmp,
        Topology::Vmp2vmp,
        Topology::Node,
    ];

    /// The topology's name (the lab's name when same-host).
    pub fn name(self) -> &'static str {
        match self {
            Topology::Veth => "veth",
            Topology::Bridge => "bridge",
            Topology::Host => "host",
            Topology::FlannelVxlan => "flannel-vxlan",
            Topology::Geneve => "geneve",
            Topology::Macvlan => "macvlan",
            Topology::Vlan => "vlan",
            Topology::IpvlanL2 => "ipvlan-l2",
            Topology::IpvlanL3 => "ipvlan-l3",
            Topology::OvsVlan => "ovs-vlan",
            Topology::OvsFlat => "ovs-flat",
            Topology::OvsVxlan => "ovs-vxlan",
            Topology::OvsGre => "ovs-gre",
            Topology::Dpdk => "dpdk",
            Topology::EbpfRedirect => "ebpf-redirect",
            Topology::Sriov => "sriov",
            Topology::Bmp2vmp => "bmp2vmp",
            Topology::Vmp2vmp => "vmp2vmp",
            Topology::Node => "node",
        }
    }

    /// Whether its pods are in guests (a lab of its own kind: nested.rs).
    pub fn nested(self) -> bool {
        matches!(self, Topology::Bmp2vmp | Topology::Vmp2vmp)
    }
}

/// Something a lab needs that this machine lacks, found before or while building it.
#[derive(Debug)]
pub enum Lacks {
    /// A kernel module, by name.
    Module(&'static str),
    /// A program (or file), and the Debian package that has it.
    Program(&'static str, &'static str),
    /// This many SR-IOV NICs of this driver, without VFs.
    Nics(usize, &'static str),
}

impl std::fmt::Display for Lacks {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Lacks::Module(m) => write!(
                f,
                "the {m} kernel module, which this kernel lacks (run it in the VM lab: cargo xtask vm)"
            ),
            Lacks::Program(p, package) => {
                write!(f, "{p}, which is not installed (apt-get install {package})")
            }
            Lacks::Nics(n, driver) => {
                let nics = match n {
                    1 => "an SR-IOV NIC".to_string(),
                    n => format!("{n} SR-IOV NICs"),
                };
                write!(
                    f,
                    "{nics} ({driver}) without VFs, which this machine lacks (the VM lab has two: cargo xtask vm --nic igb)"
                )
            }
        }
    }
}

impl std::error::Error for Lacks {}

/// A lab this machine cannot build, or not as asked: what `compare` and `bench` skip a lab
/// for, with this as the reason. Any other failure of a lab is an error, not a skip.
#[derive(Debug, thiserror::Error)]
pub enum CannotBuild {
    /// The machine lacks something the lab needs (a kernel module, a program, hardware).
    #[error("{topology} needs {lacks}")]
    Lacks {
        topology: &'static str,
        lacks: Lacks,
    },
    /// The topology has no such placement.
    #[error("{0}")]
    Placement(String),
}

impl CannotBuild {
    /// Whether `e` says the lab cannot be built here, at any layer of its context.
    pub fn is(e: &anyhow::Error) -> bool {
        e.chain().any(|c| c.is::<CannotBuild>())
    }
}

/// `lab up` of a lab that is up already (or whose parts are left): the lab is someone's; the
/// command exits as for a busy lab (cli/exit.rs).
#[derive(Debug, thiserror::Error)]
#[error("lab {lab} is already up (profiler lab down {lab})")]
pub struct AlreadyUp {
    pub lab: String,
}

/// `e` as one line naming what `topology` needs, if that is why it failed.
fn explain(topology: Topology, e: anyhow::Error) -> anyhow::Error {
    // downcast finds it as the root error or as the context of any layer.
    match e.downcast::<Lacks>() {
        Ok(lacks) => CannotBuild::Lacks {
            topology: topology.name(),
            lacks,
        }
        .into(),
        Err(e) => e,
    }
}

/// Where the two pods run: one host namespace, or two joined by a wire.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
#[clap(rename_all = "kebab-case")]
pub enum Placement {
    #[default]
    SameHost,
    CrossHost,
}

impl Placement {
    /// As people say it: "same host", "cross host".
    pub fn words(self) -> &'static str {
        match self {
            Placement::SameHost => "same host",
            Placement::CrossHost => "cross host",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct LabOptions {
    pub placement: Placement,
    /// MTU of the pods' interfaces (and the overlay device); None: the topology's default
    /// (flannel: 1450 inside, 1500 wire).
    pub mtu: Option<u32>,
    /// A program to run in place of the topology's userspace datapath (dpdk: testpmd).
    pub forwarder: Option<std::path::PathBuf>,
    /// Pods per host (each end's host); None: the topology's two pods (one per host
    /// cross-host).
    pub pods: Option<u32>,
    /// Nested labs: the container network in the guest, the network its NIC is on, and its
    /// kernel (a series or an image; None: the newest cached).
    pub inner: Option<nested::Inner>,
    pub outer: Option<nested::Outer>,
    pub guest_kernel: Option<String>,
    /// Nested labs: how the guests' NICs are served on the host (None: QEMU on a tap).
    pub nic: Option<nested::Nic>,
    /// The node lab: the CNI plugin that wires its pods (None: bridge).
    pub cni: Option<node::Cni>,
    /// A Service in front of the server pod, in this kube-proxy mode (None: no Service).
    pub service: Option<service::Mode>,
    /// A second network: each pod's net1, of this type (None: eth0 only).
    pub net2: Option<Net2>,
}

/// A network type as `compare` and `bench` take it: a topology, with a Service in front of its
/// server or not: `bridge`, `bridge+iptables`, `flannel-vxlan+nftables`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    pub topology: Topology,
    pub service: Option<service::Mode>,
}

impl Network {
    /// The network of a lab that is up.
    pub fn of(lab: &Lab) -> Network {
        Network {
            topology: lab.topology,
            service: lab.service.as_ref().map(|s| s.mode),
        }
    }

    /// What a row of `compare` or `bench` is called: the lab's name (`bridge`,
    /// `flannel-vxlan-xhost`), its Service's mode after a `+`, and `/net1` when its pods are
    /// reached on their second network.
    pub fn label(lab: &Lab) -> String {
        let mut label = lab.path_name();
        if let Some(s) = &lab.service {
            label += &format!("+{}", s.mode.name());
        }
        label
    }
}

impl From<Topology> for Network {
    fn from(topology: Topology) -> Network {
        Network {
            topology,
            service: None,
        }
    }
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Network, String> {
        use clap::ValueEnum as _;
        let (topology, mode) = match s.split_once('+') {
            Some((t, m)) => (t, Some(m)),
            None => (s, None),
        };
        let topology = Topology::from_str(topology, false).map_err(|_| {
            let all: Vec<&str> = Topology::value_variants()
                .iter()
                .map(|t| t.name())
                .collect();
            format!("no topology {topology:?} (one of {})", all.join(", "))
        })?;
        let service =
            (mode.map(|m| service::Mode::from_str(m, false)).transpose()).map_err(|_| {
                format!(
                    "a Service is +iptables, +nftables or +ebpf, not +{}",
                    mode.unwrap_or("")
                )
            })?;
        match service.and_then(|m| service::refused(topology, m)) {
            Some(why) => Err(why.to_string()),
            None => Ok(Network { topology, service }),
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.topology.name())?;
        match self.service {
            Some(mode) => write!(f, "+{}", mode.name()),
            None => Ok(()),
        }
    }
}

const CROSS_HOST_SUFFIX: &str = "-xhost";

impl Topology {
    /// The placement used when none is given: same-host where the topology has it.
    pub fn default_placement(self) -> Placement {
        if self.nested()
            || self == Topology::Node
            || spec::Spec::of(self, Placement::SameHost, None).is_ok()
        {
            Placement::SameHost
        } else {
            Placement::CrossHost
        }
    }
}

/// The lab's name: the topology's, with "-xhost" when cross-host ("bridge-xhost"); its
/// namespaces are prof-NAME-ROLE.
pub fn lab_name(topology: Topology, placement: Placement) -> String {
    match placement {
        Placement::SameHost => topology.name().to_string(),
        Placement::CrossHost => format!("{}{CROSS_HOST_SUFFIX}", topology.name()),
    }
}

fn parse_lab_name(name: &str) -> Option<(Topology, Placement)> {
    let (base, placement) = match name.strip_suffix(CROSS_HOST_SUFFIX) {
        Some(base) => (base, Placement::CrossHost),
        None => (name, Placement::SameHost),
    };
    Topology::ALL
        .into_iter()
        .find(|t| t.name() == base)
        .map(|t| (t, placement))
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Lab {
    /// lab_name(topology, placement), e.g. "bridge" or "flannel-vxlan-xhost".
    pub name: String,
    pub topology: Topology,
    /// Default (same-host) in state files written before placements existed.
    #[serde(default)]
    pub placement: Placement,
    /// The --mtu the lab was made with (None: the topology's default).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Full netns names, e.g. "prof-bridge-pod-a".
    pub namespaces: Vec<String>,
    pub interfaces: Vec<LabIface>,
    /// pod-a (host-a for `host`)
    pub client: Endpoint,
    /// pod-b (host-b for `host`)
    pub server: Endpoint,
    /// The --pods the lab was made with (None: its two pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods_per_host: Option<u32>,
    /// Every pod, client and server first (empty in state files written before pods were
    /// listed: those are client and server).
    #[serde(default)]
    pub pods: Vec<Pod>,
    /// The run that made the lab and removes it when it ends; None: made by `lab up`, kept
    /// until `lab down`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// The userspace datapath process the lab runs (dpdk: testpmd), stopped by its pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarder: Option<dpdk::Forwarder>,
    /// Nested labs: the QEMU guests it runs, stopped by their process groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guests: Vec<nested::Guest>,
    /// The node lab: its containerd, CNI plugin and pods, as made through CRI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<node::Node>,
    /// The Service in front of the server: clients send to its ClusterIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<service::Service>,
    /// The --net2 the lab was made with: its pods' net1 is on a network of this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net2: Option<Net2>,
}

impl Lab {
    /// How reports name the lab's path: see [`path_name`].
    pub fn path_name(&self) -> String {
        path_name(&self.name, &self.client.ifname)
    }

    /// The lab with its pods reached on `iface`: net1 of a lab made with --net2, or as it is
    /// for eth0 (the host lab's "pods" are its hosts' wire0). Fails in one line if its pods have
    /// no net1.
    pub fn over(&self, iface: &str) -> Result<Lab> {
        if iface != NET2_IFNAME {
            return Ok(self.clone());
        }
        if let Some(svc) = &self.service {
            return Err(crate::error::bad_input(format!(
                "--iface {iface}: lab {}'s {svc} is in front of its pods' {}",
                self.name, self.server.ifname
            )));
        }
        let on = |end: &Endpoint| -> Result<Endpoint> {
            let addr = (self.interfaces.iter())
                .find(|i| i.netns == end.netns && i.ifname == iface)
                .and_then(|i| i.addrs.first())
                .and_then(|cidr| cidr.split('/').next()?.parse().ok())
                .ok_or_else(|| {
                    crate::error::bad_input(format!(
                        "--iface {iface}: lab {name}'s pods have no {iface} (bring it up with \
                         --net2 TYPE: profiler lab down {name}, then up again)",
                        name = self.name
                    ))
                })?;
            Ok(Endpoint {
                ifname: iface.to_string(),
                addr,
                ..end.clone()
            })
        };
        let pods = (self.pods.iter())
            .map(|p| {
                Ok(Pod {
                    end: on(&p.end)?,
                    host: p.host.clone(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Lab {
            client: on(&self.client)?,
            server: on(&self.server)?,
            pods,
            ..self.clone()
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IfRef {
    pub netns: String,
    pub ifname: String,
    pub ifindex: u32,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LabIface {
    pub netns: String,
    pub ifname: String,
    pub ifindex: u32,
    /// What netlink reports: "veth" | "bridge" | "vxlan" | "geneve" | "macvlan" | "vlan" |
    /// "ipvlan" | "openvswitch" (the OVS datapath's device and bridges' internal ports) |
    /// "gretap" (OVS's GRE device)
    pub kind: String,
    /// CIDR
    pub addrs: Vec<String>,
    /// veth: the other end.
    pub peer: Option<IfRef>,
    /// Bridge port: the bridge's name (same namespace); OVS port: the datapath's device,
    /// "ovs-system".
    pub master: Option<String>,
    /// macvlan/vlan/ipvlan/vxlan: the lower device's name ("wire0"), in the namespace the
    /// device was created in (the host's).
    #[serde(default)]
    pub link: Option<String>,
    /// 0 in state files written before MTUs were recorded.
    #[serde(default)]
    pub mtu: u32,
    /// A port of a userspace datapath (a packet socket takes what it receives, and the
    /// process sends it out of another port): the datapath's name, "dpdk-testpmd".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userspace: Option<String>,
    /// A port of an eBPF datapath: the tc program on its ingress that redirects what it
    /// receives, "tc_redirect" (the ebpf-redirect lab's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tc_program: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    pub netns: String,
    pub ifname: String,
    pub addr: Ipv4Addr,
}

/// A pod of a lab and the host it is on.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Pod {
    #[serde(flatten)]
    pub end: Endpoint,
    /// The host's role: "host" same-host, "host-a" or "host-b" cross-host.
    pub host: String,
}

/// Builds the lab of `topology` as `options` say. An unsupported combination fails before
/// anything is created; on a later failure, or if the returned future is dropped (Ctrl-C),
/// everything created so far is removed again.
/// Fails in one line if `topology` cannot be built as `options` say (placement, MTU), before
/// anything is made.
pub fn check(topology: Topology, options: &LabOptions) -> Result<()> {
    if options.mtu.is_some_and(|m| !(576..=9000).contains(&m)) {
        return Err(crate::error::bad_input(
            "--mtu must be between 576 and 9000",
        ));
    }
    if let Some(why) = options.service.and_then(|m| service::refused(topology, m)) {
        return Err(crate::error::bad_input(format!(
            "--service on {}: {why}",
            topology.name()
        )));
    }
    if options.net2.is_some() && (topology == Topology::Node || topology.nested()) {
        return Err(crate::error::bad_input(format!(
            "--net2 is for the labs the profiler wires itself, not {}",
            topology.name()
        )));
    }
    if topology == Topology::Node {
        return node::check(options);
    }
    if options.cni.is_some() {
        bail!("--cni is for the node lab");
    }
    if topology.nested() {
        return nested::check(topology, options);
    }
    nested_only(options)?;
    let spec = spec::Spec::for_options(topology, options)?;
    if let Some(f) = &options.forwarder {
        if spec.userspace.is_none() {
            bail!("--forwarder: {} has no userspace datapath", topology.name());
        }
        if !f.is_file() {
            bail!("--forwarder: no file {}", f.display());
        }
    }
    Ok(())
}

/// How reports name the path of lab `lab` over its pods' `iface`: the lab's name, with "/net1"
/// over their second network ([`Lab::over`]).
pub fn path_name(lab: &str, iface: &str) -> String {
    match iface {
        NET2_IFNAME => format!("{lab}/{NET2_IFNAME}"),
        _ => lab.to_string(),
    }
}

/// Fails in one line when options only nested labs take are given to another.
pub(super) fn nested_only(options: &LabOptions) -> Result<()> {
    if options.inner.is_some()
        || options.outer.is_some()
        || options.guest_kernel.is_some()
        || options.nic.is_some()
    {
        bail!("--inner, --outer, --nic and --guest-kernel are for nested labs (bmp2vmp, vmp2vmp)");
    }
    Ok(())
}

pub async fn up(topology: Topology, options: &LabOptions) -> Result<Lab> {
    build(topology, options, None).await
}

/// Like `up`, for a lab that `owner` (a run) removes when it ends: if the owner dies first, the
/// next run, `lab list` and `lab down --all` know the lab was left behind.
pub async fn up_owned(topology: Topology, options: &LabOptions, owner: Owner) -> Result<Lab> {
    build(topology, options, Some(owner)).await
}

async fn build(topology: Topology, options: &LabOptions, owner: Option<Owner>) -> Result<Lab> {
    check(topology, options)?;
    if topology == Topology::Node {
        return build_node(options, owner).await;
    }
    if topology.nested() {
        let name = lab_name(topology, options.placement);
        if state::path(&name).exists() || nested::leftovers(&name) {
            return Err(AlreadyUp { lab: name }.into());
        }
        let lab = nested::build(&name, topology, options).await?;
        let lab = Lab { owner, ..lab };
        if let Err(e) = state::save(&lab) {
            let _ = nested::remove(&name);
            return Err(e);
        }
        return Ok(lab);
    }
    let mut spec = spec::Spec::for_options(topology, options)?;
    if let Some(mode) = options.service {
        service::prepare(&mut spec, mode);
    }
    let name = lab_name(topology, options.placement);
    if leftovers(&name, &spec) {
        return Err(AlreadyUp { lab: name }.into());
    }
    if !spec.ovs.is_empty() {
        ovs::check().map_err(|e| explain(topology, e))?;
    }
    if spec.userspace.is_some() && options.forwarder.is_none() {
        dpdk::check().map_err(|e| explain(topology, e))?;
    }
    sriov::check(&spec).map_err(|e| explain(topology, e))?;
    let mut undo = setup::Undo::default();
    let built = setup::build(&name, topology, options, &spec, &mut undo).await;
    let lab = built
        .map(|lab| Lab { owner, ..lab })
        .and_then(|lab| state::save(&lab).map(|()| lab))
        .map_err(|e| explain(topology, e))?;
    undo.disarm();
    Ok(lab)
}

/// The node lab: its parts are recorded in its directory as they are made.
async fn build_node(options: &LabOptions, owner: Option<Owner>) -> Result<Lab> {
    let name = lab_name(Topology::Node, Placement::SameHost);
    if state::path(&name).exists() || node::leftovers(&name) {
        return Err(AlreadyUp { lab: name }.into());
    }
    let lab = node::build(&name, options).await?;
    let lab = Lab { owner, ..lab };
    if let Err(e) = state::save(&lab) {
        let _ = node::remove(&name);
        return Err(e);
    }
    Ok(lab)
}

/// Whether any part of lab `name` exists without its state file (a build that was killed).
pub fn has_parts(name: &str) -> bool {
    if parse_lab_name(name) == Some((Topology::Node, Placement::SameHost)) {
        return node::leftovers(name);
    }
    if parse_lab_name(name).is_some_and(|(t, _)| t.nested()) {
        return nested::leftovers(name);
    }
    parse_lab_name(name)
        .and_then(|(t, p)| spec::Spec::widest(t, p))
        .is_some_and(|spec| leftovers(name, &spec))
}

/// The lab becomes one that `lab up` made: it stays when the command that made it ends.
pub fn disown(name: &str) -> Result<()> {
    match state::load(name)? {
        Some(lab) => state::save(&Lab { owner: None, ..lab }),
        None => bail!("no lab named {name} is up"),
    }
}

/// Whether anything of lab `name` exists: its state, a namespace, an OVS directory.
fn leftovers(name: &str, spec: &spec::Spec) -> bool {
    let namespaces = spec.roles.iter().map(|role| spec::netns_name(name, role));
    state::path(name).exists()
        || namespaces.into_iter().any(|ns| netns::exists(&ns))
        || spec.ovs.iter().any(|b| ovs::dir(name, b.role).exists())
        || spec
            .userspace
            .as_ref()
            .is_some_and(|u| dpdk::dir(name, u.role).exists())
}

/// Stops the lab's OVS daemons and userspace datapath, removes its namespaces (and with them its devices) and its
/// state file. Works on whatever part of a lab exists, e.g. after a crash.
pub async fn down(name: &str) -> Result<()> {
    if parse_lab_name(name) == Some((Topology::Node, Placement::SameHost)) {
        if !state::path(name).exists() && !node::leftovers(name) {
            bail!("no lab named {name} is up");
        }
        return node::remove(name).and(state::remove(name));
    }
    if parse_lab_name(name).is_some_and(|(t, _)| t.nested()) {
        if !state::path(name).exists() && !nested::leftovers(name) {
            bail!("no lab named {name} is up");
        }
        return nested::remove(name).and(state::remove(name));
    }
    let spec = parse_lab_name(name).and_then(|(t, p)| spec::Spec::widest(t, p));
    let Some(spec) = spec.filter(|spec| leftovers(name, spec)) else {
        bail!("no lab named {name} is up");
    };
    // Each step is tried whatever the others did; the first failure is reported.
    let mut result = Ok(());
    for b in &spec.ovs {
        result = result.and(ovs::stop(&ovs::dir(name, b.role)));
    }
    // Before the namespaces: a process in one keeps it, and its devices, alive.
    if let Some(u) = &spec.userspace {
        result = result.and(dpdk::stop(&dpdk::dir(name, u.role)));
    }
    // Before the namespaces: the VFs go, and the PFs then return to the root namespace.
    for pf in &spec.pfs {
        result = result.and(sriov::release(pf.nic));
    }
    for role in &spec.roles {
        result = result.and(netns::delete(&spec::netns_name(name, role)));
    }
    result.and(state::remove(name))
}

/// Deletes the clsact qdisc of `ifname` in namespace `ns` (None: this one), and with it every
/// tc filter on the device; callable where nothing can be awaited.
pub fn remove_clsact(ns: Option<&str>, ifname: &str) -> Result<()> {
    let ifname = ifname.to_string();
    nl::blocking(ns.map(str::to_string), |nl| async move {
        let index = nl.index(&ifname).await?;
        nl.del_clsact(index).await
    })
}

/// The labs that are up, from their state files.
pub fn list() -> Result<Vec<Lab>> {
    let mut labs = Vec::new();
    for name in state::names()? {
        labs.extend(state::load(&name)?);
    }
    Ok(labs)
}

pub fn get(name: &str) -> Result<Option<Lab>> {
    state::load(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_are_topologies_with_or_without_a_service() {
        for text in [
            "bridge",
            "bridge+iptables",
            "flannel-vxlan+nftables",
            "ebpf-redirect",
        ] {
            let n: Network = text.parse().unwrap();
            assert_eq!(n.to_string(), text);
        }
        let n: Network = "bridge+nftables".parse().unwrap();
        assert_eq!(n.service, Some(service::Mode::Nftables));
        for (text, why) in [
            ("bridged", "no topology \"bridged\" (one of veth, bridge, "),
            (
                "bridge+ipvs",
                "a Service is +iptables, +nftables or +ebpf, not +ipvs",
            ),
            ("macvlan+iptables", "macvlan pods cannot reach"),
        ] {
            let e = text.parse::<Network>().unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    fn sample() -> Lab {
        Lab {
            name: "veth".into(),
            topology: Topology::Veth,
            placement: Placement::SameHost,
            mtu: None,
            namespaces: vec!["prof-veth-pod-a".into(), "prof-veth-pod-b".into()],
            interfaces: vec![LabIface {
                netns: "prof-veth-pod-a".into(),
                ifname: "eth0".into(),
                ifindex: 7,
                kind: "veth".into(),
                addrs: vec!["198.18.0.1/24".into()],
                peer: Some(IfRef {
                    netns: "prof-veth-pod-b".into(),
                    ifname: "eth0".into(),
                    ifindex: 8,
                }),
                master: None,
                link: None,
                mtu: 1500,
                userspace: None,
                tc_program: None,
            }],
            client: Endpoint {
                netns: "prof-veth-pod-a".into(),
                ifname: "eth0".into(),
                addr: Ipv4Addr::new(198, 18, 0, 1),
            },
            server: Endpoint {
                netns: "prof-veth-pod-b".into(),
                ifname: "eth0".into(),
                addr: Ipv4Addr::new(198, 18, 0, 2),
            },
            pods_per_host: None,
            pods: Vec::new(),
            owner: None,
            forwarder: None,
            guests: Vec::new(),
            node: None,
            service: None,
            net2: None,
        }
    }

    #[test]
    fn state_json_round_trips() {
        let lab = sample();
        let json = serde_json::to_string(&lab).expect("serializing the sample lab");
        assert!(json.contains(r#""topology":"veth""#), "{json}");
        assert!(json.contains(r#""placement":"same-host""#), "{json}");
        let back: Lab = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("reading back the lab's own JSON {json}: {e}"));
        assert_eq!(
            serde_json::to_string(&back).expect("serializing the lab read back"),
            json
        );
    }

    #[test]
    fn lab_names_round_trip() {
        for t in Topology::ALL {
            for p in [Placement::SameHost, Placement::CrossHost] {
                assert_eq!(parse_lab_name(&lab_name(t, p)), Some((t, p)));
            }
        }
        assert_eq!(
            lab_name(Topology::Bridge, Placement::CrossHost),
            "bridge-xhost"
        );
        assert_eq!(Topology::FlannelVxlan.name(), "flannel-vxlan");
        assert_eq!(parse_lab_name("nope"), None);
    }

    #[test]
    fn cli_and_serde_names_agree() {
        use clap::ValueEnum as _;
        for t in Topology::ALL {
            let cli = t.to_possible_value().expect("not skipped");
            assert_eq!(cli.get_name(), t.name());
            assert_eq!(serde_json::to_value(t).unwrap(), t.name());
        }
        assert_eq!(
            serde_json::to_value(Placement::CrossHost).unwrap(),
            "cross-host"
        );
    }

    /// What compare and bench skip a lab for: a placement the topology has not, or something
    /// this machine lacks; bad input and any other failure are not it.
    #[test]
    fn a_lab_that_cannot_be_built_here_says_so_by_its_type() {
        let at = |placement| LabOptions {
            placement,
            ..LabOptions::default()
        };
        let no_placement = check(Topology::Vlan, &at(Placement::SameHost)).unwrap_err();
        assert!(CannotBuild::is(&no_placement), "{no_placement:#}");
        let bad_mtu = LabOptions {
            mtu: Some(100),
            ..LabOptions::default()
        };
        let bad = check(Topology::Bridge, &bad_mtu).unwrap_err();
        assert!(!CannotBuild::is(&bad), "{bad:#}");
        let lacking = anyhow::Error::new(Lacks::Module("openvswitch")).context("adding br-int");
        let lacking = explain(Topology::OvsVlan, lacking);
        assert!(CannotBuild::is(&lacking));
        assert!(
            format!("{lacking:#}").starts_with("ovs-vlan needs the openvswitch kernel module"),
            "{lacking:#}"
        );
        let other = explain(Topology::OvsVlan, anyhow::anyhow!("RTNETLINK: File exists"));
        assert!(!CannotBuild::is(&other), "a setup failure is not a skip");
    }
}
