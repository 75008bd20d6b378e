//! The node lab: a Kubernetes-like node driven through its container runtime's CRI API exactly
//! as kubelet drives it. The lab runs a containerd of its own (root, state and socket under
//! RUN_DIR/LAB, started by pid in a session of its own), imports a pause and an echo image it
//! builds locally (no registry is reachable), and creates pods with RunPodSandbox,
//! CreateContainer and StartContainer. The CNI plugins, not the profiler, make the pods'
//! namespaces (/run/netns/cni-*), devices and addresses, as on a real node.
//!
//! Everything the lab makes is recorded in RUN_DIR/LAB/record.json as soon as it exists, so that
//! `lab down`, a failed or interrupted `lab up` and `lab down --all` after a SIGKILL all undo it.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig,
    ListPodSandboxRequest, PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::pods::cri;

use super::{
    discover, netns, owner, vm_cache, CannotBuild, Endpoint, Lab, LabOptions, Lacks, Placement,
    Pod, Topology,
};

/// Each node lab's directory: containerd's config, root, state, socket and log, the CNI
/// config, the record of what the lab made.
pub const RUN_DIR: &str = "/run/profiler/node";
/// The CNI network's name: its cache files are /var/lib/cni/results/NETWORK-*, its addresses
/// /var/lib/cni/networks/NETWORK.
pub const NETWORK: &str = "prof-node";
/// The Kubernetes namespace of the lab's pods unless told otherwise.
pub const POD_NAMESPACE: &str = "prof-node";
/// The bridge of `--cni bridge`, and the parent of `--cni macvlan`'s pods: one end of a veth
/// pair (this kernel has no dummy devices), whose other end is MACVLAN_PARENT_PEER.
pub const BRIDGE: &str = "prof-cni0";
pub const MACVLAN_PARENT: &str = "prof-node-mv0";
const MACVLAN_PARENT_PEER: &str = "prof-node-mv1";
/// The cgroup (in every hierarchy) under which containerd puts the pods.
pub const CGROUP_PARENT: &str = "prof-node-pods";
/// The port on which every pod's echo server answers UDP and TCP.
pub const ECHO_PORT: u16 = 7;
/// What the CRI calls the images (`ctr import` adds the registry's name).
const PAUSE_IMAGE: &str = "docker.io/local/pause:1";
const ECHO_IMAGE: &str = "docker.io/local/echo:1";
/// containerd's CRI namespace, where kubelet's images and containers live.
const CTR_NAMESPACE: &str = "k8s.io";
/// Bumped when the images change, so that cached archives are rebuilt.
const IMAGES_VERSION: u32 = 1;
const ECHO_SOURCE: &str = include_str!("node/echo.c");
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// StopPodSandbox runs CNI DEL and waits for the pod's processes: more than a query.
const CRI_TIMEOUT: Duration = Duration::from_secs(20);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
const SETTLE_STEP: Duration = Duration::from_millis(150);
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const CNI_RESULTS: &str = "/var/lib/cni/results";
const CNI_NETWORKS: &str = "/var/lib/cni/networks";
/// Where every containerd 1.6's shims put their sockets, whatever its state directory:
/// SHIM_DIR/sha256(ADDRESS/NAMESPACE/ID) in hex.
const SHIM_DIR: &str = "/run/containerd/s";

/// The CNI plugin that wires the pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[clap(rename_all = "kebab-case")]
pub enum Cni {
    /// Pods' veths on bridge prof-cni0 (198.18.100.1/24), as flannel and kubenet do.
    #[default]
    Bridge,
    /// A veth per pod routed by the host (no bridge), as Calico does.
    Ptp,
    /// Pods on macvlan children (mode bridge) of the lab's device prof-node-mv0.
    Macvlan,
}

impl Cni {
    fn name(self) -> &'static str {
        match self {
            Cni::Bridge => "bridge",
            Cni::Ptp => "ptp",
            Cni::Macvlan => "macvlan",
        }
    }

    /// The pod subnet, one per plugin so a lab's leftovers never look like another's.
    fn subnet(self) -> &'static str {
        match self {
            Cni::Bridge => "198.18.100.0/24",
            Cni::Ptp => "198.18.101.0/24",
            Cni::Macvlan => "198.18.102.0/24",
        }
    }
}

/// What a node lab runs and made: enough to undo it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Node {
    pub cni: Cni,
    /// containerd, started by the lab; with its start time, so a reused pid is never ended.
    pub containerd: u32,
    pub containerd_start_time: u64,
    /// containerd's CRI socket.
    pub socket: PathBuf,
    pub dir: PathBuf,
    /// net.ipv4.ip_forward before the lab ("0" or "1"): the CNI plugins set it.
    pub ip_forward: String,
    /// Whether the lab's containerd made SHIM_DIR's /run/containerd (no containerd had run
    /// here): then the lab removes it once empty.
    #[serde(default)]
    pub made_run_containerd: bool,
    /// The sockets in SHIM_DIR before the lab started: a new one that nothing listens on at
    /// teardown was left by a shim of the lab's (another runtime's shims would be listening).
    #[serde(default)]
    pub shim_sockets_before: Vec<String>,
    pub pods: Vec<NodePod>,
}

/// A pod the lab made through CRI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub sandbox: String,
    /// Its network namespace as `ip netns` names it, "cni-<uuid>".
    pub netns: String,
    pub ip: std::net::Ipv4Addr,
}

pub(super) fn dir(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(name)
}

fn record_path(dir: &Path) -> PathBuf {
    dir.join("record.json")
}

fn save_record(node: &Node) -> Result<()> {
    let path = record_path(&node.dir);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(node)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
}

fn load_record(dir: &Path) -> Option<Node> {
    serde_json::from_slice(&std::fs::read(record_path(dir)).ok()?).ok()
}

/// Fails in one line if a node lab cannot be made as `options` say, before anything is made.
pub(super) fn check(options: &LabOptions) -> Result<()> {
    if options.placement != Placement::SameHost {
        let why = "node is one host: --placement cross-host is not supported";
        return Err(CannotBuild::Placement(why.into()).into());
    }
    if options.mtu.is_some() || options.forwarder.is_some() {
        bail!("--mtu and --forwarder are not supported by node (its CNI plugins choose)");
    }
    super::nested_only(options)?;
    if options
        .pods
        .is_some_and(|n| !(2..=super::NODE_MAX_PODS).contains(&n))
    {
        return Err(crate::error::bad_input(format!(
            "--pods must be between 2 and {}",
            super::NODE_MAX_PODS
        )));
    }
    programs(options.cni.unwrap_or_default()).map_err(|lacks| {
        CannotBuild::Lacks {
            topology: "node",
            lacks,
        }
        .into()
    })
}

/// The programs and files the lab uses, and the Debian packages that have them.
fn programs(cni: Cni) -> std::result::Result<(), Lacks> {
    let plugin = |p: &'static str| (p, "containernetworking-plugins");
    let needed = [
        ("/usr/bin/containerd", "containerd"),
        ("/usr/bin/ctr", "containerd"),
        ("/usr/bin/containerd-shim-runc-v2", "containerd"),
        ("/usr/sbin/runc", "runc"),
        ("/bin/busybox", "busybox-static"),
        ("/usr/bin/cc", "gcc"),
        ("/usr/lib/x86_64-linux-gnu/libc.a", "libc6-dev"),
        plugin("/usr/lib/cni/host-local"),
        plugin("/usr/lib/cni/loopback"),
    ];
    let cni_plugin = match cni {
        Cni::Bridge => "/usr/lib/cni/bridge",
        Cni::Ptp => "/usr/lib/cni/ptp",
        Cni::Macvlan => "/usr/lib/cni/macvlan",
    };
    for (file, package) in needed.into_iter().chain([plugin(cni_plugin)]) {
        if !Path::new(file).exists() {
            return Err(Lacks::Program(file, package));
        }
    }
    // Debian's `busybox` package has a dynamic /bin/busybox, useless in an image of its own.
    if !is_static("/bin/busybox") {
        return Err(Lacks::Program("a static /bin/busybox", "busybox-static"));
    }
    Ok(())
}

fn is_static(path: &str) -> bool {
    use object::Object as _;
    std::fs::read(path).is_ok_and(|data| {
        object::File::parse(&*data).is_ok_and(|f| f.section_by_name(".interp").is_none())
    })
}

/// Whether any part of node lab `name` exists (its directory).
pub(super) fn leftovers(name: &str) -> bool {
    dir(name).exists()
}

/// Removes what a build made so far unless disarmed.
struct Undo {
    name: Option<String>,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            if let Err(e) = remove(&name) {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

pub(super) async fn build(name: &str, options: &LabOptions) -> Result<Lab> {
    let cni = options.cni.unwrap_or_default();
    let count = options.pods.unwrap_or(2);
    let (pause, echo) = images().context("building the node lab's images")?;
    // Before anything is made, so that the undo never removes another's.
    if let Some(other) = machine_wide_parts() {
        bail!("{other} exists: another node lab is up on this machine (in another mount namespace?) or left it; `profiler lab down node` there");
    }
    let dir = dir(name);
    let mut undo = Undo {
        name: Some(name.to_string()),
    };
    std::fs::create_dir_all(dir.join("cni"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let ip_forward = std::fs::read_to_string(IP_FORWARD)
        .with_context(|| format!("cannot read {IP_FORWARD}"))?
        .trim()
        .to_string();
    // Recorded before anything else exists: the undo of a killed build needs ip_forward.
    let mut node = Node {
        cni,
        containerd: 0,
        containerd_start_time: 0,
        socket: dir.join("containerd.sock"),
        dir: dir.clone(),
        ip_forward,
        made_run_containerd: !Path::new("/run/containerd").exists(),
        shim_sockets_before: shim_sockets(),
        pods: Vec::new(),
    };
    save_record(&node)?;
    // containerd mounts the pods' namespaces on /run/netns/cni-*: were /run/netns not a mount
    // point yet, a later `ip netns add` would bind it over them, and they could not be removed.
    std::fs::create_dir_all(netns::NETNS_DIR)?;
    netns::make_dir_shared()?;
    if cni == Cni::Macvlan {
        ip(&format!(
            "link add {MACVLAN_PARENT} type veth peer name {MACVLAN_PARENT_PEER}"
        ))?;
        ip(&format!("link set {MACVLAN_PARENT} up"))?;
        ip(&format!("link set {MACVLAN_PARENT_PEER} up"))?;
    }
    std::fs::write(dir.join("cni/10-prof-node.conflist"), cni_config(cni))?;
    std::fs::write(dir.join("config.toml"), containerd_config(&dir))?;
    node.containerd = start_containerd(&dir)?;
    node.containerd_start_time = owner::start_time(node.containerd).unwrap_or(0);
    save_record(&node)?;
    let mut client = wait_for(&node).await?;
    for archive in [&pause, &echo] {
        import(&node.socket, archive)?;
    }
    for i in 0..count {
        add_pod(&mut client, &mut node, &format!("pod-{i}"), POD_NAMESPACE).await?;
    }
    let lab = assemble(name, node).await?;
    undo.name = None;
    Ok(lab)
}

/// What every node lab makes outside its directory and /run/netns, shared by all mount
/// namespaces: its devices and its pods' cgroup.
fn machine_wide_parts() -> Option<String> {
    let devices =
        [BRIDGE, MACVLAN_PARENT, MACVLAN_PARENT_PEER].map(|d| Path::new("/sys/class/net").join(d));
    let cgroups = cgroup_roots();
    devices
        .iter()
        .chain(&cgroups)
        .find(|p| p.exists())
        .map(|p| p.display().to_string())
}

/// The lab as the rest of the profiler sees it: pod-0 the client, pod-1 the server.
async fn assemble(name: &str, node: Node) -> Result<Lab> {
    let end = |p: &NodePod| Endpoint {
        netns: p.netns.clone(),
        ifname: "eth0".to_string(),
        addr: p.ip,
    };
    let (Some(client), Some(server)) = (node.pods.first(), node.pods.get(1)) else {
        bail!("a node lab needs two pods");
    };
    let pods: Vec<String> = node.pods.iter().map(|p| p.netns.clone()).collect();
    // The node's own namespace first: its bridge and the pods' veth peers name hops too.
    let namespaces = std::iter::once(discover::ROOT.to_string())
        .chain(pods.iter().cloned())
        .collect();
    Ok(Lab {
        name: name.to_string(),
        topology: Topology::Node,
        placement: Placement::SameHost,
        mtu: None,
        interfaces: interfaces(&pods).await?,
        client: end(client),
        server: end(server),
        pods_per_host: Some(node.pods.len() as u32),
        pods: node
            .pods
            .iter()
            .map(|p| Pod {
                end: end(p),
                host: "host".to_string(),
            })
            .collect(),
        namespaces,
        owner: None,
        forwarder: None,
        guests: Vec::new(),
        node: Some(node),
        service: None,
        net2: None,
    })
}

/// The interfaces of the pods' namespaces `pods` and, in this namespace, the lab's bridge or
/// parent and the pods' veth peers (not the rest of the host's devices).
async fn interfaces(pods: &[String]) -> Result<Vec<super::LabIface>> {
    let all: Vec<String> = std::iter::once(discover::ROOT.to_string())
        .chain(pods.iter().cloned())
        .collect();
    Ok(discover::interfaces(&all)
        .await?
        .into_iter()
        .filter(|i| {
            i.netns != discover::ROOT
                || i.ifname == BRIDGE
                || i.ifname == MACVLAN_PARENT
                || i.peer.as_ref().is_some_and(|p| pods.contains(&p.netns))
        })
        .collect())
}

fn cni_config(cni: Cni) -> String {
    let ipam = serde_json::json!({
        "type": "host-local",
        "ranges": [[{"subnet": cni.subnet()}]],
    });
    let plugin = match cni {
        Cni::Bridge => serde_json::json!({
            "type": cni.name(), "bridge": BRIDGE, "isGateway": true, "ipMasq": false, "ipam": ipam,
        }),
        Cni::Ptp => serde_json::json!({"type": cni.name(), "ipMasq": false, "ipam": ipam}),
        Cni::Macvlan => serde_json::json!({
            "type": cni.name(), "master": MACVLAN_PARENT, "mode": "bridge", "ipam": ipam,
        }),
    };
    serde_json::json!({"cniVersion": "0.4.0", "name": NETWORK, "plugins": [plugin]}).to_string()
}

/// containerd's config: everything under `dir`, its CRI plugin with the lab's images and CNI.
fn containerd_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This process lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj otherwise.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  # runc's state beside containerd's, not in runc's default root, shared by every containerd.
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
    max_conf_num = 1
"#
    )
}

/// Starts containerd in a session of its own (a Ctrl-C at the terminal is for the profiler,
/// which then stops it by pid), logging to `dir`/containerd.log.
fn start_containerd(dir: &Path) -> Result<u32> {
    let log = std::fs::File::create(dir.join("containerd.log"))?;
    let mut cmd = Command::new("containerd");
    cmd.arg("--config")
        .arg(dir.join("config.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(Into::into));
    }
    let child = cmd.spawn().context("cannot run containerd")?;
    let pid = child.id();
    // Reaped by `stop_containerd` (or init, once this process has exited).
    std::mem::forget(child);
    Ok(pid)
}

/// A CRI client once containerd answers Version, or an error with its log's tail.
async fn wait_for(node: &Node) -> Result<cri::Client> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let answer = match client(&node.socket).await {
            Ok(mut c) => c
                .version(VersionRequest::default())
                .await
                .map(|_| c)
                .map_err(|s| anyhow!("{}", s.message())),
            Err(e) => Err(e),
        };
        let why = match answer {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        let exited = !alive(node);
        if exited || Instant::now() > deadline {
            let state = if exited { "exited" } else { "did not answer" };
            bail!(
                "containerd (pid {}) {state} within {}s ({why:#}); its log ends: {}",
                node.containerd,
                START_TIMEOUT.as_secs(),
                log_tail(&node.dir)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A CRI client whose calls may take as long as CNI ADD and DEL do.
async fn client(socket: &Path) -> Result<cri::Client> {
    Ok(cri::Client::new(cri::channel(socket, CRI_TIMEOUT).await?))
}

fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

fn alive(node: &Node) -> bool {
    node.containerd != 0 && owner::start_time(node.containerd) == Some(node.containerd_start_time)
}

fn import(socket: &Path, archive: &Path) -> Result<()> {
    let out = Command::new("ctr")
        .arg("-a")
        .arg(socket)
        .args(["-n", CTR_NAMESPACE, "images", "import"])
        .arg(archive)
        .output()
        .context("cannot run ctr")?;
    if !out.status.success() {
        bail!(
            "ctr images import {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Creates pod `name` in `namespace` (sandbox, then its echo container) and records it.
async fn add_pod(
    client: &mut cri::Client,
    node: &mut Node,
    name: &str,
    namespace: &str,
) -> Result<NodePod> {
    let uid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")?
        .trim()
        .to_string();
    let config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.clone(),
            namespace: namespace.to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        labels: HashMap::from([("app".to_string(), "echo".to_string())]),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: format!("/{CGROUP_PARENT}/pod{uid}"),
            ..Default::default()
        }),
        ..Default::default()
    };
    let sandbox = client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .map_err(|s| anyhow!("CRI RunPodSandbox {namespace}/{name}: {}", s.message()))?
        .into_inner()
        .pod_sandbox_id;
    let (netns, ip) = sandbox_network(client, &node.socket, &sandbox).await?;
    let pod = NodePod {
        name: name.to_string(),
        namespace: namespace.to_string(),
        uid,
        sandbox: sandbox.clone(),
        netns,
        ip,
    };
    node.pods.push(pod.clone());
    save_record(node)?;
    start_echo(client, &sandbox, config)
        .await
        .with_context(|| format!("starting pod {namespace}/{name}'s echo server"))?;
    Ok(pod)
}

/// The sandbox's network namespace (its name in /run/netns) and address, as the pods module
/// reads them from the runtime.
async fn sandbox_network(
    client: &mut cri::Client,
    socket: &Path,
    sandbox: &str,
) -> Result<(String, std::net::Ipv4Addr)> {
    let pods = cri::pods(client, socket).await?;
    let pod = pods
        .iter()
        .find(|p| p.sandbox == sandbox)
        .with_context(|| {
            format!("pod sandbox {sandbox} is not ready or has no network namespace")
        })?;
    let netns = Path::new(&pod.netns)
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("pod sandbox {sandbox}: network namespace {}", pod.netns))?;
    let ip = pod
        .ip
        .with_context(|| format!("pod sandbox {sandbox} has no IPv4 address"))?;
    Ok((netns.to_string(), ip))
}

async fn start_echo(
    client: &mut cri::Client,
    sandbox: &str,
    config: PodSandboxConfig,
) -> Result<()> {
    let container = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "echo".to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: ECHO_IMAGE.to_string(),
            ..Default::default()
        }),
        command: vec!["/bin/echo-server".to_string(), ECHO_PORT.to_string()],
        labels: HashMap::from([("app".to_string(), "echo".to_string())]),
        ..Default::default()
    };
    let id = client
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sandbox.to_string(),
            config: Some(container),
            sandbox_config: Some(config),
        })
        .await
        .map_err(|s| anyhow!("CRI CreateContainer: {}", s.message()))?
        .into_inner()
        .container_id;
    client
        .start_container(StartContainerRequest { container_id: id })
        .await
        .map_err(|s| anyhow!("CRI StartContainer: {}", s.message()))?;
    Ok(())
}

/// Refuses what Kubernetes refuses: a pod name that is not a DNS-1123 subdomain, a namespace
/// that is not a DNS-1123 label.
pub fn check_names(pod: &str, namespace: &str) -> Result<()> {
    let label = |s: &str| {
        (1..=63).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    if pod.len() > 253 || !pod.split('.').all(label) {
        bail!(
            "pod name {pod:?} is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')"
        );
    }
    if !label(namespace) {
        bail!("namespace {namespace:?} is not a DNS-1123 label (lowercase letters, digits and '-', up to 63)");
    }
    Ok(())
}

/// `lab pod add`: a pod more in node lab `name`, which is up; its state is updated.
pub async fn pod_add(name: &str, pod: &str, namespace: &str) -> Result<NodePod> {
    check_names(pod, namespace)?;
    let (lab, mut node) = node_lab(name)?;
    if node
        .pods
        .iter()
        .any(|p| p.name == pod && p.namespace == namespace)
    {
        bail!("lab {name} already has pod {namespace}/{pod}");
    }
    let mut client = client(&node.socket).await?;
    let made = add_pod(&mut client, &mut node, pod, namespace).await;
    // Saved also after a failure: a sandbox made before it is recorded, for `lab down`.
    let saved = refresh(lab, node).await;
    let made = made?;
    saved?;
    Ok(made)
}

/// `lab pod rm`: stops and removes a pod of node lab `name` (not its client or server).
pub async fn pod_rm(name: &str, pod: &str, namespace: &str) -> Result<NodePod> {
    let (lab, mut node) = node_lab(name)?;
    let Some(i) = node
        .pods
        .iter()
        .position(|p| p.name == pod && p.namespace == namespace)
    else {
        bail!("lab {name} has no pod {namespace}/{pod}");
    };
    if i < 2 {
        bail!("pod {namespace}/{pod} is lab {name}'s client or server: lab down {name} removes it");
    }
    let mut client = client(&node.socket).await?;
    remove_sandbox(&mut client, &node.pods[i].sandbox).await?;
    let gone = node.pods.remove(i);
    refresh(lab, node).await?;
    Ok(gone)
}

fn node_lab(name: &str) -> Result<(Lab, Node)> {
    let lab = super::state::load(name)?.with_context(|| format!("no lab named {name} is up"))?;
    let node = lab
        .node
        .clone()
        .with_context(|| format!("lab {name} is not a node lab (profiler lab up node)"))?;
    Ok((lab, node))
}

/// Records `node` and saves the lab with its pods and interfaces as they are now.
async fn refresh(lab: Lab, node: Node) -> Result<()> {
    save_record(&node)?;
    let fresh = assemble(&lab.name, node).await?;
    super::state::save(&Lab {
        owner: lab.owner,
        ..fresh
    })
}

async fn remove_sandbox(client: &mut cri::Client, sandbox: &str) -> Result<()> {
    let id = sandbox.to_string();
    client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .map_err(|s| anyhow!("CRI StopPodSandbox {id}: {}", s.message()))?;
    client
        .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
        .await
        .map_err(|s| anyhow!("CRI RemovePodSandbox {sandbox}: {}", s.message()))?;
    Ok(())
}

/// Removes everything of node lab `name` that exists: its pods (through CRI while containerd
/// runs, so that CNI DEL frees their devices and addresses), containerd and its shims, their
/// mounts, the pods' namespaces, cgroups, CNI files and devices, its directory; restores
/// ip_forward. Callable where nothing can be awaited (Drop); each step is tried whatever the
/// others did, and the first failure is reported.
pub(super) fn remove(name: &str) -> Result<()> {
    let dir = dir(name);
    let record = load_record(&dir).or_else(|| {
        super::state::load(name)
            .ok()
            .flatten()
            .and_then(|lab| lab.node)
    });
    let mut result = Ok(());
    if let Some(node) = &record {
        if alive(node) {
            result = result.and(in_runtime(stop_all_pods(node.socket.clone())));
        }
        result = result.and(stop_containerd(node));
    }
    result = result.and(kill_shims(&dir));
    if let Some(node) = &record {
        result = result.and(remove_dead_shim_sockets(&node.shim_sockets_before));
    }
    result = result.and(kill_cgroup_processes());
    result = result.and(unmount_under(&dir));
    // Recorded pods', and those whose CNI ADD was done when containerd died.
    let recorded = record.iter().flat_map(|n| &n.pods).map(|p| p.netns.clone());
    for ns in recorded.chain(cached_namespaces()) {
        if netns::exists(&ns) {
            result = result.and(netns::delete(&ns));
        }
    }
    result = result.and(remove_cgroups());
    let sandboxes: Vec<String> = record
        .iter()
        .flat_map(|n| &n.pods)
        .map(|p| p.sandbox.clone())
        .collect();
    result = result.and(remove_cni_files(&sandboxes));
    for device in [BRIDGE, MACVLAN_PARENT] {
        if Path::new("/sys/class/net").join(device).exists() {
            result = result.and(ip(&format!("link del {device}")));
        }
    }
    if record.as_ref().is_some_and(|n| n.made_run_containerd) {
        remove_run_containerd();
    }
    if let Some(node) = &record {
        result = result.and(
            std::fs::write(IP_FORWARD, &node.ip_forward)
                .with_context(|| format!("cannot restore {IP_FORWARD}")),
        );
    }
    if dir.exists() {
        result = result.and(
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove {}", dir.display())),
        );
    }
    result
}

/// Runs `fut` on a thread and runtime of its own (callers may be in Drop, or in a runtime).
fn in_runtime(fut: impl std::future::Future<Output = Result<()>> + Send + 'static) -> Result<()> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(fut)
    })
    .join()
    .map_err(|_| anyhow!("a CRI thread panicked"))?
}

/// Every sandbox of the lab's own containerd is the lab's: also one made but not yet recorded.
/// A RunPodSandbox cut short by a signal goes on in containerd: its sandbox is listed once it
/// is made, its namespace removed if it fails. So sandboxes are removed until none is listed
/// and no cni-* namespace came or went for a while.
async fn stop_all_pods(socket: PathBuf) -> Result<()> {
    let mut client = client(&socket).await?;
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let (mut quiet, mut result) = (0, Ok(()));
    while quiet < 2 && Instant::now() < deadline {
        let namespaces = cni_namespaces();
        let items = client
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await
            .map_err(|s| anyhow!("CRI ListPodSandbox: {}", s.message()))?
            .into_inner()
            .items;
        for sandbox in &items {
            result = result.and(remove_sandbox(&mut client, &sandbox.id).await);
        }
        tokio::time::sleep(SETTLE_STEP).await;
        let settled = items.is_empty() && cni_namespaces() == namespaces;
        quiet = if settled { quiet + 1 } else { 0 };
    }
    result
}

fn cni_namespaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(netns::NETNS_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("cni-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn stop_containerd(node: &Node) -> Result<()> {
    if !alive(node) {
        return Ok(());
    }
    let pid = Pid::from_raw(node.containerd as i32);
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        let _ = kill(pid, signal);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while alive(node) && Instant::now() < deadline {
            reap(pid);
            std::thread::sleep(Duration::from_millis(20));
        }
        if !alive(node) {
            return Ok(());
        }
    }
    bail!("containerd (pid {}) did not exit", node.containerd)
}

fn reap(pid: Pid) {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
}

/// The processes whose command line names `needle` (our socket: only our containerd's shims).
pub fn processes_naming(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|&b| b == 0)
                    .any(|arg| String::from_utf8_lossy(arg).contains(needle))
            })
        })
        .collect()
}

/// Shims left by a containerd that died: they name its socket (-address) in their command
/// line. Killed, they leave their sockets in SHIM_DIR, which go too.
fn kill_shims(dir: &Path) -> Result<()> {
    let socket = dir.join("containerd.sock").to_string_lossy().into_owned();
    let shims = processes_naming(&socket);
    let ids: Vec<String> = shims.iter().filter_map(|&pid| shim_id(pid)).collect();
    kill_all(&shims, "containerd-shim-runc-v2")?;
    for id in ids {
        let hash = sha256_hex(format!("{socket}/{CTR_NAMESPACE}/{id}").as_bytes())?;
        let path = Path::new(SHIM_DIR).join(hash);
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// The names in SHIM_DIR.
fn shim_sockets() -> Vec<String> {
    std::fs::read_dir(SHIM_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Sockets that appeared in SHIM_DIR since the lab started and that no process listens on
/// (/proc/net/unix lists every bound path): a shim started for a RunPodSandbox cut short by a
/// signal may end on its own, before `kill_shims` sees it, and leave its socket.
fn remove_dead_shim_sockets(before: &[String]) -> Result<()> {
    let bound = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    for name in shim_sockets() {
        let path = Path::new(SHIM_DIR).join(&name);
        let listening = bound.lines().any(|l| l.ends_with(&*path.to_string_lossy()));
        if !before.contains(&name) && !listening {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// The `-id` argument of shim `pid`.
fn shim_id(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let at = args.iter().position(|a| a == "-id")?;
    args.get(at + 1).cloned()
}

/// /run/containerd, if the lab's containerd made it, once nothing is left in it.
fn remove_run_containerd() {
    for dir in [
        SHIM_DIR,
        "/run/containerd/runc/k8s.io",
        "/run/containerd/runc",
        "/run/containerd",
    ] {
        // Not empty: another containerd uses it since.
        let _ = std::fs::remove_dir(dir);
    }
}

/// The pods' processes (pause, echo) left by shims that died: they are in the lab's cgroup.
fn kill_cgroup_processes() -> Result<()> {
    let mut pids = Vec::new();
    for dir in cgroup_dirs() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.parse::<u32>().ok()));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    kill_all(&pids, "pod process")
}

fn kill_all(pids: &[u32], what: &str) -> Result<()> {
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if pids
            .iter()
            .all(|p| !Path::new(&format!("/proc/{p}")).exists())
        {
            return Ok(());
        }
        pids.iter().for_each(|&p| reap(Pid::from_raw(p as i32)));
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{what}es {pids:?} did not exit")
}

/// The lab's cgroup in every hierarchy (whether it exists or not).
fn cgroup_roots() -> Vec<PathBuf> {
    let hierarchies = std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten();
    let mut roots: Vec<PathBuf> = hierarchies
        .filter_map(|e| e.ok().map(|e| e.path().join(CGROUP_PARENT)))
        .collect();
    // cgroup v2 alone: the hierarchy is /sys/fs/cgroup itself.
    roots.push(Path::new("/sys/fs/cgroup").join(CGROUP_PARENT));
    roots
}

/// The lab's cgroup directories in every hierarchy, deepest first.
fn cgroup_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for root in cgroup_roots().into_iter().filter(|r| r.is_dir()) {
        walk(&root, &mut dirs);
    }
    dirs
}

/// `dir` and its subdirectories, children before parents.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

fn remove_cgroups() -> Result<()> {
    for dir in cgroup_dirs() {
        std::fs::remove_dir(&dir)
            .with_context(|| format!("cannot remove cgroup {}", dir.display()))?;
    }
    Ok(())
}

/// containerd's mounts (snapshots, sandboxes' shm, its root) under `dir`, deepest first.
fn unmount_under(dir: &Path) -> Result<()> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("cannot unmount {p}"))?;
    }
    Ok(())
}

/// The CNI cache and address files of the lab's network (left when containerd died first).
fn remove_cni_files(sandboxes: &[String]) -> Result<()> {
    let networks = Path::new(CNI_NETWORKS).join(NETWORK);
    if networks.exists() {
        std::fs::remove_dir_all(&networks)
            .with_context(|| format!("cannot remove {}", networks.display()))?;
    }
    for file in cni_result_files(sandboxes) {
        std::fs::remove_file(&file).with_context(|| format!("cannot remove {}", file.display()))?;
    }
    Ok(())
}

/// The CNI cache files of the lab's pods: /var/lib/cni/results/prof-node-SANDBOX-eth0 and the
/// loopback network's cni-loopback-SANDBOX-lo of `sandboxes` and of any sandbox with the former.
fn cni_result_files(sandboxes: &[String]) -> Vec<PathBuf> {
    let names: Vec<String> = std::fs::read_dir(CNI_RESULTS)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut ids: Vec<&str> = names.iter().filter_map(|n| sandbox_of_result(n)).collect();
    ids.extend(sandboxes.iter().map(String::as_str));
    names
        .iter()
        .filter(|n| {
            sandbox_of_result(n).is_some()
                || n.strip_prefix("cni-loopback-")
                    .and_then(|r| r.strip_suffix("-lo"))
                    .is_some_and(|id| ids.contains(&id))
        })
        .map(|n| Path::new(CNI_RESULTS).join(n))
        .collect()
}

/// The pods' namespaces named in the CNI cache files of the lab's network (the result's
/// interface with a "sandbox", /var/run/netns/cni-*).
fn cached_namespaces() -> Vec<String> {
    let names = cni_result_files(&[]).into_iter().filter_map(|file| {
        let cache: serde_json::Value = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
        let interfaces = cache.pointer("/result/interfaces")?.as_array()?.clone();
        interfaces.iter().find_map(|i| {
            let path = Path::new(i.get("sandbox")?.as_str()?);
            let name = path.file_name()?.to_str()?;
            let in_netns_dir = path.parent().is_some_and(|d| {
                d == Path::new(netns::NETNS_DIR) || d == Path::new("/var/run/netns")
            });
            (in_netns_dir && name.starts_with("cni-")).then(|| name.to_string())
        })
    });
    names.collect()
}

/// The sandbox of a cache file of the lab's network, "prof-node-SANDBOX-eth0".
fn sandbox_of_result(name: &str) -> Option<&str> {
    name.strip_prefix(NETWORK)?
        .strip_prefix('-')?
        .strip_suffix("-eth0")
}

fn ip(args: &str) -> Result<()> {
    super::nested::ip(args)
}

/// The pause and echo images as OCI archives, built once into the cache (busybox-static and
/// the echo server compiled static).
fn images() -> Result<(PathBuf, PathBuf)> {
    let cache = vm_cache::cache_dir()?.join(format!("node-images/v{IMAGES_VERSION}"));
    let (pause, echo) = (cache.join("pause.tar"), cache.join("echo.tar"));
    if pause.exists() && echo.exists() {
        return Ok((pause, echo));
    }
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("cannot create {}", cache.display()))?;
    let work = cache.join(format!("build-{}", std::process::id()));
    let built = build_images(&work, &pause, &echo);
    let _ = std::fs::remove_dir_all(&work);
    built.map(|()| (pause, echo))
}

fn build_images(work: &Path, pause: &Path, echo: &Path) -> Result<()> {
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).context("copying /bin/busybox")?;
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh"))?;
    let source = work.join("echo.c");
    std::fs::write(&source, ECHO_SOURCE)?;
    run(Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(rootfs.join("bin/echo-server"))
        .arg(&source))?;
    // Sleep as PID 1: StopPodSandbox ends it with SIGKILL.
    let pause_cmd = ["/bin/busybox", "sleep", "2147483647"];
    oci_archive(work, &rootfs, PAUSE_IMAGE, &pause_cmd, pause)?;
    oci_archive(work, &rootfs, ECHO_IMAGE, &["/bin/echo-server"], echo)
}

/// Writes an OCI image archive of `rootfs` (one uncompressed layer) named `image`, atomically.
fn oci_archive(work: &Path, rootfs: &Path, image: &str, cmd: &[&str], dest: &Path) -> Result<()> {
    let layout = work.join("oci");
    let _ = std::fs::remove_dir_all(&layout);
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let layer = work.join("layer.tar");
    run(Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(rootfs)
        .args(["-cf"])
        .arg(&layer)
        .arg("."))?;
    let (layer_digest, layer_size) = blob(&blobs, &std::fs::read(&layer)?)?;
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": cmd},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = blob(&blobs, config.to_string().as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = blob(&blobs, manifest.to_string().as_bytes())?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest_size,
                       "annotations": {"io.containerd.image.name": image}}],
    });
    std::fs::write(layout.join("index.json"), index.to_string())?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let tmp = dest.with_extension("tar.tmp");
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tmp)
        .args(["oci-layout", "index.json", "blobs"]))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("cannot write {}", dest.display()))
}

/// Stores `data` as a blob; its digest ("sha256:...") and size.
fn blob(blobs: &Path, data: &[u8]) -> Result<(String, usize)> {
    let hex = sha256_hex(data)?;
    std::fs::write(blobs.join(&hex), data)?;
    Ok((format!("sha256:{hex}"), data.len()))
}

fn sha256_hex(data: &[u8]) -> Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run sha256sum")?;
    child
        .stdin
        .take()
        .context("sha256sum's stdin")?
        .write_all(data)?;
    let out = child.wait_with_output()?;
    let hex = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .filter(|h| h.len() == 64)
        .context("sha256sum gave no digest")?
        .to_string();
    Ok(hex)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_configs_use_the_labs_names_and_addresses() {
        for cni in [Cni::Bridge, Cni::Ptp, Cni::Macvlan] {
            let v: serde_json::Value = serde_json::from_str(&cni_config(cni)).expect("JSON");
            assert_eq!(v["name"], NETWORK);
            let plugin = &v["plugins"][0];
            assert_eq!(plugin["type"], cni.name());
            let subnet = plugin["ipam"]["ranges"][0][0]["subnet"]
                .as_str()
                .expect("subnet");
            assert!(subnet.starts_with("198.18."), "{subnet}");
        }
        assert!(cni_config(Cni::Bridge).contains(BRIDGE));
        assert!(cni_config(Cni::Macvlan).contains(MACVLAN_PARENT));
    }

    #[test]
    fn names_are_checked_as_kubernetes_does() {
        assert!(check_names("pod-0", "prof-node").is_ok());
        assert!(check_names("web.v2", "shop").is_ok());
        for (pod, ns) in [
            ("", "a"),
            ("a/b", "a"),
            ("A", "a"),
            ("-a", "a"),
            ("a", ""),
            ("a", "x.y"),
        ] {
            assert!(check_names(pod, ns).is_err(), "{pod:?} {ns:?}");
        }
    }

    #[test]
    fn containerd_keeps_to_the_labs_directory() {
        let config = containerd_config(Path::new("/run/profiler/node/node"));
        assert!(config.contains("restrict_oom_score_adj = true"));
        // Every path it is given.
        for line in config.lines().filter(|l| l.contains("= \"/")) {
            assert!(
                line.contains("/run/profiler/node/node") || line.contains("/usr/lib/cni"),
                "{line}"
            );
        }
    }
}
