//! The node lab against a real containerd, runc and the CNI plugins (needs root and Debian's
//! containerd, runc, containernetworking-plugins, busybox-static, gcc): pods made through CRI
//! answer UDP and TCP from each other, `lab pod add`/`rm` work, a run profiles the lab, and
//! `lab down`, an interrupted `lab up` and `lab down --all` after a SIGKILL leave nothing of
//! the lab's: no containerd, shim or pod process, no cni-* namespace, no CNI cache or address
//! file, no bridge, no cgroup, no mount, ip_forward as it was.
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{assert_complete, lab_info, profiler, run_json, BIN};
use nix::sys::signal::Signal;
use profiler::lab::{node, Lab};

const LAB: &str = "node";
const LAB_DIR: &str = "/run/profiler/node/node";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

static LOCK: Mutex<()> = Mutex::new(());

/// The lab is machine-global: one test at a time.
fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether this machine can run the node lab; if not, says why (the test then passes as skipped).
fn runnable() -> bool {
    let missing: Vec<&str> = [
        "/usr/bin/containerd",
        "/usr/sbin/runc",
        "/usr/lib/cni/bridge",
        "/bin/busybox",
        "/usr/bin/cc",
    ]
    .into_iter()
    .filter(|p| !Path::new(p).exists())
    .collect();
    if !nix::unistd::geteuid().is_root() || !missing.is_empty() {
        common::skip::skip(&format!("the node lab needs root and {missing:?}"), None);
        return false;
    }
    true
}

/// What the machine had before the test, to tell the lab's leftovers from the rest.
struct Before {
    ip_forward: String,
    netns: BTreeSet<String>,
    /// Every containerd's shims' sockets and runc's default state, shared with the lab's.
    shared: BTreeSet<String>,
    run_containerd: bool,
}

impl Before {
    fn now() -> Before {
        Before {
            ip_forward: std::fs::read_to_string(IP_FORWARD).expect("ip_forward"),
            netns: cni_namespaces(),
            shared: shared_files(),
            run_containerd: Path::new("/run/containerd").exists(),
        }
    }
}

fn shared_files() -> BTreeSet<String> {
    ["/run/containerd/s", "/run/containerd/runc/k8s.io"]
        .into_iter()
        .flat_map(|dir| {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .filter_map(move |e| {
                    Some(format!("{dir}/{}", e.ok()?.file_name().into_string().ok()?))
                })
        })
        .collect()
}

/// Takes the lab down when the test ends, whatever happened (`lab down node` also removes a
/// build's leftovers), so a failed test leaves nothing for the next.
struct Guard;

impl Drop for Guard {
    fn drop(&mut self) {
        if Path::new(LAB_DIR).exists() || state().exists() {
            let _ = profiler(&["lab", "down", LAB]);
        }
    }
}

fn state() -> std::path::PathBuf {
    Path::new(profiler::lab::STATE_DIR).join(format!("{LAB}.json"))
}

fn cni_namespaces() -> BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("cni-"))
                .collect()
        })
        .unwrap_or_default()
}

fn ok(args: &[&str]) -> String {
    let out = profiler(args);
    assert!(
        out.status.success(),
        "profiler {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lab's pods from its state: (namespace/name, netns, ip).
fn pods(lab: &Lab) -> Vec<(String, String, String)> {
    (lab.node.as_ref().expect("the node lab's node").pods.iter())
        .map(|p| {
            (
                format!("{}/{}", p.namespace, p.name),
                p.netns.clone(),
                p.ip.to_string(),
            )
        })
        .collect()
}

/// The ready sandboxes' (namespace/name) as the lab's containerd lists them over CRI.
fn cri_pods() -> BTreeSet<String> {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async {
        let socket = Path::new(LAB_DIR).join("containerd.sock");
        let mut client = profiler::pods::cri::connect(&socket)
            .await
            .expect("CRI socket");
        profiler::pods::cri::pods(&mut client, &socket)
            .await
            .expect("CRI ListPodSandbox")
            .into_iter()
            .map(|p| p.qualified())
            .collect()
    })
}

/// `proto` ("udp" or "tcp") to `ip`'s echo port from namespace `from`: what came back.
fn echo(from: &str, ip: &str, proto: &str) -> String {
    assert!(
        ip.starts_with("198.18."),
        "traffic only to the lab's addresses: {ip}"
    );
    let script = format!(
        "exec 3<>/dev/{proto}/{ip}/{port}; printf hello-{proto} >&3; timeout 2 dd bs=64 count=1 <&3 2>/dev/null",
        port = node::ECHO_PORT
    );
    let out = Command::new("timeout")
        .args(["5", "ip", "netns", "exec", from, "bash", "-c", &script])
        .output()
        .expect("running ip netns exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_echoes(from: &str, ip: &str, ctx: &str) {
    for proto in ["udp", "tcp"] {
        assert_eq!(
            echo(from, ip, proto),
            format!("hello-{proto}"),
            "{ctx}: {proto} echo of {ip} from {from}"
        );
    }
}

/// Nothing of the lab's is left: the leak check of xtask's, and what only the test knows.
fn assert_clean(before: &Before) {
    let mut leaks = Vec::new();
    for pid in node::processes_naming("/run/profiler/node/") {
        leaks.push(format!("process {pid} naming the lab's directory"));
    }
    for pid in node::processes_naming("/bin/echo-server") {
        leaks.push(format!("echo server {pid}"));
    }
    let new_netns: Vec<_> = cni_namespaces()
        .difference(&before.netns)
        .cloned()
        .collect();
    if !new_netns.is_empty() {
        leaks.push(format!("namespaces {new_netns:?}"));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for m in mounts.lines().filter(|l| l.contains("/run/profiler/node")) {
        leaks.push(format!("mount {m}"));
    }
    let results: Vec<_> = std::fs::read_dir("/var/lib/cni/results")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("{}-", node::NETWORK)))
                .collect()
        })
        .unwrap_or_default();
    if !results.is_empty() {
        leaks.push(format!("CNI cache files {results:?}"));
    }
    let networks = Path::new("/var/lib/cni/networks").join(node::NETWORK);
    for path in [
        networks.as_path(),
        Path::new(LAB_DIR),
        &state(),
        &Path::new("/sys/class/net").join(node::BRIDGE),
        &Path::new("/sys/class/net").join(node::MACVLAN_PARENT),
    ] {
        if path.exists() {
            leaks.push(format!("{}", path.display()));
        }
    }
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .expect("cgroups")
        .flatten()
    {
        let cgroup = hierarchy.path().join(node::CGROUP_PARENT);
        if cgroup.exists() {
            leaks.push(format!("cgroup {}", cgroup.display()));
        }
    }
    let shared: Vec<_> = shared_files().difference(&before.shared).cloned().collect();
    if !shared.is_empty() {
        leaks.push(format!("files {shared:?}"));
    }
    if !before.run_containerd && Path::new("/run/containerd").exists() {
        leaks.push("/run/containerd, which the lab's containerd made".to_string());
    }
    let ip_forward = std::fs::read_to_string(IP_FORWARD).expect("ip_forward");
    if ip_forward != before.ip_forward {
        leaks.push(format!(
            "ip_forward {} (was {})",
            ip_forward.trim(),
            before.ip_forward.trim()
        ));
    }
    assert!(leaks.is_empty(), "the node lab left: {leaks:#?}");
}

fn spawn(args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the profiler")
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig)
        .expect("signalling our own child");
}

/// Once the build has made a pod (its CNI cache file exists), more are coming.
fn a_pod_is_made() -> bool {
    std::fs::read_dir("/var/lib/cni/results").is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with(node::NETWORK)))
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn pods_made_through_cri_echo_each_other_and_come_and_go() {
    let _serial = serial();
    if !runnable() {
        return;
    }
    let before = Before::now();
    let _guard = Guard;
    let started = Instant::now();
    ok(&["lab", "up", "node", "--pods", "3"]);
    eprintln!("lab up node --pods 3: {:?}", started.elapsed());
    let lab = lab_info(LAB);
    let made = pods(&lab);
    let names: Vec<&str> = made.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(
        names,
        ["prof-node/pod-0", "prof-node/pod-1", "prof-node/pod-2"]
    );
    assert_eq!(cri_pods(), names.iter().map(|n| n.to_string()).collect());
    assert_eq!(lab.client.netns, made[0].1);
    assert_eq!(lab.server.addr.to_string(), made[1].2);
    for (i, (name, _, ip)) in made.iter().enumerate() {
        let (_, from, _) = &made[(i + 1) % made.len()];
        assert!(
            Path::new("/run/netns").join(&made[i].1).exists(),
            "{name}'s netns"
        );
        assert_echoes(from, ip, name);
    }
    let listed = ok(&["lab", "list"]);
    for (name, netns, ip) in &made {
        assert!(
            listed.contains(&format!("pod {name}: netns {netns} ip {ip}")),
            "{listed}"
        );
    }

    let started = Instant::now();
    let added = ok(&["lab", "pod", "add", "node", "web", "--namespace", "shop"]);
    let took = started.elapsed();
    eprintln!("lab pod add: {took:?}");
    assert!(took < Duration::from_secs(2), "lab pod add took {took:?}");
    let lab = lab_info(LAB);
    let web = pods(&lab)
        .into_iter()
        .find(|p| p.0 == "shop/web")
        .expect("the added pod");
    assert!(added.contains(&web.1) && added.contains(&web.2), "{added}");
    assert!(cri_pods().contains("shop/web"));
    assert_echoes(&made[0].1, &web.2, "the added pod");
    assert!(
        lab.namespaces.contains(&web.1),
        "the added pod's namespace is the lab's"
    );

    let started = Instant::now();
    ok(&["lab", "pod", "rm", "node", "web", "--namespace", "shop"]);
    let took = started.elapsed();
    eprintln!("lab pod rm: {took:?}");
    assert!(took < Duration::from_secs(2), "lab pod rm took {took:?}");
    assert!(!cri_pods().contains("shop/web"));
    assert!(
        !Path::new("/run/netns").join(&web.1).exists(),
        "the removed pod's netns"
    );
    assert!(pods(&lab_info(LAB)).iter().all(|p| p.0 != "shop/web"));

    let started = Instant::now();
    ok(&["lab", "down", "node"]);
    eprintln!("lab down: {:?}", started.elapsed());
    assert_clean(&before);
}

#[test]
fn a_run_profiles_udp_between_two_pods() {
    let _serial = serial();
    if !runnable() {
        return;
    }
    let before = Before::now();
    let _guard = Guard;
    ok(&["lab", "up", "node"]);
    let r = run_json(&["--lab", "node", "--count", "200", "--quiet"]);
    assert_complete(&r, 200, "run --lab node");
    ok(&["lab", "down", "node"]);
    assert_clean(&before);
}

#[test]
fn ptp_and_macvlan_pods_echo_each_other() {
    let _serial = serial();
    if !runnable() {
        return;
    }
    for cni in ["ptp", "macvlan"] {
        let before = Before::now();
        let _guard = Guard;
        ok(&["lab", "up", "node", "--cni", cni]);
        let made = pods(&lab_info(LAB));
        assert_echoes(&made[0].1, &made[1].2, cni);
        assert_echoes(&made[1].1, &made[0].2, cni);
        ok(&["lab", "down", "node"]);
        assert_clean(&before);
    }
}

#[test]
fn an_interrupted_up_leaves_nothing() {
    let _serial = serial();
    if !runnable() {
        return;
    }
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let before = Before::now();
        let _guard = Guard;
        let child = spawn(&["lab", "up", "node", "--pods", "13"]);
        wait_for("the first pod", Duration::from_secs(60), a_pod_is_made);
        signal(&child, sig);
        let out = child.wait_with_output().expect("waiting for lab up");
        assert!(!out.status.success(), "{sig}: lab up was interrupted");
        assert!(
            stderr(&out).contains(&format!("interrupted by {sig}")),
            "{sig}: {}",
            stderr(&out)
        );
        assert_clean(&before);
    }
}

#[test]
fn down_all_recovers_from_a_sigkill() {
    let _serial = serial();
    if !runnable() {
        return;
    }
    // A run that made the lab (its owner), then a `lab up` midway.
    let before = Before::now();
    let _guard = Guard;
    let run = spawn(&[
        "run", "--lab", "node", "--count", "100000", "--rate", "200", "--quiet",
    ]);
    wait_for("the run's lab", Duration::from_secs(60), || {
        state().exists()
    });
    std::thread::sleep(Duration::from_secs(1));
    signal(&run, Signal::SIGKILL);
    let _ = run.wait_with_output();
    assert!(state().exists(), "a SIGKILLed owner leaves its lab");
    ok(&["lab", "down", "--all"]);
    assert_clean(&before);

    let up = spawn(&["lab", "up", "node", "--pods", "13"]);
    wait_for("the first pod", Duration::from_secs(60), a_pod_is_made);
    signal(&up, Signal::SIGKILL);
    let _ = up.wait_with_output();
    assert!(
        Path::new(LAB_DIR).exists(),
        "a SIGKILLed build leaves its parts"
    );
    let out = ok(&["lab", "down", "--all"]);
    assert!(out.contains("node lab node"), "{out}");
    assert_clean(&before);
}

#[test]
fn bad_input_is_refused_in_one_line() {
    let _serial = serial();
    if !runnable() {
        return;
    }
    for args in [
        &["lab", "up", "node", "--pods", "0"][..],
        &["lab", "up", "node", "--cni", "calico"],
        &["lab", "up", "node", "--placement", "cross-host"],
        &["lab", "up", "bridge", "--cni", "ptp"],
        &["lab", "pod", "add", "node", "web"],
        &["lab", "pod", "add", "node", "Web/1"],
        &["lab", "pod", "add", "../bridge", "web"],
        &["lab", "pod", "add", "node", "web", "--namespace", ""],
        &["lab", "pod", "rm", "node", "web"],
    ] {
        let out = profiler(args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    assert!(!Path::new(LAB_DIR).exists(), "a refused up made nothing");
}

/// Another node lab's bridge (one in another mount namespace shares this network namespace):
/// `lab up` refuses, and its undo does not remove what is not its own.
#[test]
fn another_node_labs_bridge_is_left_alone() {
    let _serial = serial();
    if !runnable() {
        return;
    }
    common::ip(&["link", "add", node::BRIDGE, "type", "bridge"]);
    let out = profiler(&["lab", "up", "node"]);
    let bridge = Path::new("/sys/class/net").join(node::BRIDGE);
    let kept = bridge.exists();
    common::ip(&["link", "del", node::BRIDGE]);
    assert!(
        !out.status.success(),
        "lab up beside another node lab's bridge"
    );
    assert!(
        stderr(&out).contains("another node lab"),
        "{}",
        stderr(&out)
    );
    assert!(kept, "the other lab's bridge was removed");
    assert!(!Path::new(LAB_DIR).exists(), "a refused up made nothing");
}
