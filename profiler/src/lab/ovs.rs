//! Open vSwitch for the OVS labs, without systemd: kernel datapaths are per network namespace,
//! so each host namespace runs its own ovsdb-server and ovs-vswitchd (started inside it with
//! `ip netns exec`), with database, sockets, pidfiles and logs in a directory of their own.
//! `stop` takes all of it away again.
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::spec::{OvsBridge, OvsPortKind};
use super::Lacks;

/// Each lab host's OVS directory is RUN_DIR/LAB-ROLE.
pub(super) const RUN_DIR: &str = "/run/profiler/ovs";
const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";
/// What the labs run, and the Debian package that has it.
const PROGRAMS: [(&str, &str); 5] = [
    ("ovsdb-tool", "openvswitch-switch"),
    ("ovsdb-server", "openvswitch-switch"),
    ("ovs-vsctl", "openvswitch-switch"),
    ("ovs-vswitchd", "openvswitch-switch"),
    ("ip", "iproute2"),
];
/// In the order they stop: ovs-vswitchd needs the database until it exits.
const DAEMONS: [&str; 2] = ["ovs-vswitchd", "ovsdb-server"];
/// ovs-vsctl waits for ovs-vswitchd to apply a change; under TCG that can take a while.
const VSCTL_TIMEOUT: &str = "--timeout=60";
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn dir(lab: &str, role: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{lab}-{role}"))
}

/// What this machine lacks for OVS, if anything: the kernel datapath first (the reason a
/// lab cannot run here at all), then the programs.
pub(super) fn check() -> Result<()> {
    if !genl_family_exists("ovs_datapath")? {
        bail!(Lacks::Module("openvswitch"));
    }
    for (program, package) in PROGRAMS {
        if find(program).is_none() {
            bail!(Lacks::Program(program, package));
        }
    }
    if !Path::new(SCHEMA).exists() {
        bail!(Lacks::Program(SCHEMA, "openvswitch-common"));
    }
    Ok(())
}

/// Whether the kernel has generic netlink family `name`. Asking for it loads the module that
/// registers it, as ovs-vswitchd's own lookup would.
fn genl_family_exists(name: &str) -> Result<bool> {
    use nix::sys::socket::{recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol};
    const GENL_ID_CTRL: u16 = 0x10;
    const CTRL_CMD_GETFAMILY: u8 = 3;
    const CTRL_ATTR_FAMILY_NAME: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    let mut attr = name.as_bytes().to_vec();
    attr.push(0);
    let attr_len = 4 + attr.len();
    attr.resize(attr.len().next_multiple_of(4), 0);
    let len = 16 + 4 + 4 + attr.len();
    let mut msg = Vec::with_capacity(len);
    // nlmsghdr, genlmsghdr, then the family name attribute.
    msg.extend((len as u32).to_ne_bytes());
    msg.extend(GENL_ID_CTRL.to_ne_bytes());
    msg.extend(NLM_F_REQUEST.to_ne_bytes());
    msg.extend([0u8; 8]);
    msg.extend([CTRL_CMD_GETFAMILY, 1, 0, 0]);
    msg.extend((attr_len as u16).to_ne_bytes());
    msg.extend(CTRL_ATTR_FAMILY_NAME.to_ne_bytes());
    msg.extend(attr);
    let sock = socket(
        AddressFamily::Netlink,
        nix::sys::socket::SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkGeneric,
    )
    .context("cannot open a generic netlink socket")?;
    send(sock.as_raw_fd(), &msg, MsgFlags::empty()).context("cannot ask generic netlink")?;
    // The reply is the family (with its operations, hence the size) or an error.
    let mut reply = vec![0u8; 16384];
    let n = recv(sock.as_raw_fd(), &mut reply, MsgFlags::empty())
        .context("no answer from generic netlink")?;
    if n >= 6 && u16::from_ne_bytes([reply[4], reply[5]]) != NLMSG_ERROR {
        return Ok(true);
    }
    if n < 20 {
        bail!("a short answer from generic netlink ({n} bytes)");
    }
    match -i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]) {
        libc::ENOENT => Ok(false),
        errno => Err(std::io::Error::from_raw_os_error(errno))
            .with_context(|| format!("cannot look up generic netlink family {name}")),
    }
}

/// The program's path: on PATH, or in the sbin directories root's PATH may lack.
fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file());
    found
}

/// Creates `dir` with a fresh database, then starts ovsdb-server and ovs-vswitchd inside
/// network namespace `ns`.
pub(super) fn start(ns: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let db = dir.join("conf.db");
    let db_arg = db.to_string_lossy();
    run(dir, "ovsdb-tool", &["create", &db_arg, SCHEMA])?;
    let remote = format!("--remote=punix:{}", dir.join("db.sock").display());
    daemon(dir, ns, "ovsdb-server", &[&db_arg, &remote])?;
    vsctl(dir, &["--no-wait", "init"])?;
    daemon(dir, ns, "ovs-vswitchd", &[&db_socket(dir)])
}

/// Adds the bridge and its ports in one ovs-vsctl transaction, which returns once
/// ovs-vswitchd has applied it (or says which port it could not add).
pub(super) fn add_bridge(dir: &Path, bridge: &OvsBridge) -> Result<()> {
    let mut args: Vec<String> = vec!["--".into(), "add-br".into(), bridge.name.into()];
    for port in &bridge.ports {
        let name = port.name.as_str();
        args.extend(["--", "add-port", bridge.name, name].map(String::from));
        match port.kind {
            OvsPortKind::Access(tag) => args.push(format!("tag={tag}")),
            OvsPortKind::Trunk(tag) => args.push(format!("trunks={tag}")),
            OvsPortKind::Tunnel {
                encap,
                local,
                remote,
                key,
                tag,
            } => {
                args.push(format!("tag={tag}"));
                args.extend(["--", "set", "interface", name].map(String::from));
                args.extend([
                    format!("type={}", encap.ovs_type()),
                    format!("options:local_ip={local}"),
                    format!("options:remote_ip={remote}"),
                    format!("options:key={key}"),
                ]);
            }
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    vsctl(dir, &args).map(drop)
}

/// Deletes the bridges (ovs-vswitchd deletes their ports and, with the last one, the kernel
/// datapath), stops the daemons and removes `dir`. Works on whatever part of it exists; each
/// step is tried whatever the others did, and the first failure is returned.
pub(super) fn stop(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let running = DAEMONS.iter().all(|d| pid(dir, d).is_some());
    let mut result = if running { delete_bridges(dir) } else { Ok(()) };
    for daemon in DAEMONS {
        result = result.and(stop_daemon(dir, daemon));
    }
    result.and(
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display())),
    )
}

fn delete_bridges(dir: &Path) -> Result<()> {
    for bridge in vsctl(dir, &["list-br"])?.lines() {
        vsctl(dir, &["--if-exists", "del-br", bridge])?;
    }
    Ok(())
}

/// SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT; returns once it is gone.
fn stop_daemon(dir: &Path, name: &str) -> Result<()> {
    let Some(pid) = pid(dir, name) else {
        return Ok(());
    };
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        // ESRCH: it exited meanwhile.
        let _ = kill(pid, signal);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while alive(pid, name) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !alive(pid, name) {
            return Ok(());
        }
    }
    bail!("{name} (pid {pid}) of {} did not exit", dir.display())
}

/// The daemon's pid from its pidfile, if that process is still running.
fn pid(dir: &Path, name: &str) -> Option<Pid> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.pid"))).ok()?;
    let pid = Pid::from_raw(text.trim().parse().ok()?);
    alive(pid, name).then_some(pid)
}

/// Whether `pid` is a running (not zombie) process named `name`: a pid from a stale pidfile
/// may have been reused by another process.
fn alive(pid: Pid, name: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE ...": COMM may contain spaces and parentheses.
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let state = stat[close + 1..].trim_start().chars().next();
    &stat[open + 1..close] == name && !matches!(state, Some('Z' | 'X'))
}

fn db_socket(dir: &Path) -> String {
    format!("unix:{}", dir.join("db.sock").display())
}

/// ovs-vsctl on the lab host's database; its standard output.
fn vsctl(dir: &Path, args: &[&str]) -> Result<String> {
    let db = format!("--db={}", db_socket(dir));
    let mut all = vec![db.as_str(), VSCTL_TIMEOUT];
    all.extend_from_slice(args);
    run(dir, "ovs-vsctl", &all)
}

/// Every OVS program of the lab host finds its files in `dir`. Each runs in a process group
/// of its own: a Ctrl-C at the terminal reaches only the profiler, whose undo then stops the
/// daemons, rather than killing one while it starts (and leaving its detached child).
fn command(dir: &Path, program: &str) -> Command {
    let mut cmd = Command::new(find(program).unwrap_or_else(|| program.into()));
    for var in ["OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR"] {
        cmd.env(var, dir);
    }
    cmd.stdin(Stdio::null()).process_group(0);
    cmd
}

/// Runs `program` to completion; its standard output, or its standard error as the error.
fn run(dir: &Path, program: &str, args: &[&str]) -> Result<String> {
    let out = command(dir, program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("{program} {}: {}", args.join(" "), err.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts daemon `name` inside `ns` with `--detach`, which returns once it is ready. Its
/// standard error goes to a file: a pipe would stay open in the daemon until it detaches.
fn daemon(dir: &Path, ns: &str, name: &str, args: &[&str]) -> Result<()> {
    let path = find(name).with_context(|| format!("{name} is not installed"))?;
    let file = |ext: &str| dir.join(format!("{name}.{ext}"));
    let stderr_path = file("stderr");
    let stderr = File::create(&stderr_path)
        .with_context(|| format!("cannot create {}", stderr_path.display()))?;
    let status = command(dir, "ip")
        .args(["netns", "exec", ns])
        .arg(path)
        .args(args)
        .arg(format!("--pidfile={}", file("pid").display()))
        .arg(format!("--unixctl={}", file("ctl").display()))
        .arg(format!("--log-file={}", file("log").display()))
        .arg("--detach")
        .stdout(Stdio::null())
        .stderr(stderr)
        .status()
        .with_context(|| format!("cannot run {name} in {ns}"))?;
    if !status.success() {
        let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        bail!("{name} did not start in {ns} ({status}): {}", err.trim());
    }
    Ok(())
}
