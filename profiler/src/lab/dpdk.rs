//! dpdk-testpmd as the userspace datapath of the dpdk lab: in io-forward mode, with one
//! af_packet port on each of the host namespace's veth ends, it forwards every frame one port
//! receives out of the other. Started inside the host namespace without hugepages, stopped by
//! its pid (recorded with its start time, so a reused pid is never signalled). Its files (pid
//! record, standard input, log) are in a directory of their own, RUN_DIR/LAB-ROLE, so a lab
//! whose state was never written (a build killed midway) is still found and stopped.
use std::fs::File;
use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{owner, Lacks};

/// Each lab's testpmd directory is RUN_DIR/LAB-ROLE.
pub(super) const RUN_DIR: &str = "/run/profiler/dpdk";
pub const PROGRAM: &str = "dpdk-testpmd";
/// The Debian package that ships PROGRAM (`dpdk` has only scripts).
pub const PACKAGE: &str = "dpdk-dev";
/// Where DPDK keeps each process's runtime files, by --file-prefix (as root).
const DPDK_RUNTIME: &str = "/var/run/dpdk";
/// --file-prefix of the labs' testpmd: "profiler-LAB" (the leak check looks for it).
pub const FILE_PREFIX: &str = "profiler-";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// What testpmd prints once forwarding has started.
const READY_LINE: &str = "Press enter to exit";

/// A running testpmd, as the lab's state records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarder {
    pub program: String,
    pub pid: u32,
    /// Clock ticks since boot (/proc/PID/stat), as for a lab's owner.
    pub start_time: u64,
    pub file_prefix: String,
    /// Its ports, in port order; io forwarding pairs the first with the second, the third
    /// with the fourth.
    pub ports: Vec<Port>,
}

/// One of testpmd's ports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Port {
    /// A packet socket on a device of its namespace.
    Device(String),
    /// A vhost-user port: the Unix socket a guest's virtio-net connects to (QEMU's
    /// `-netdev vhost-user`), its rings in the guest's shared memory.
    Vhost { socket: PathBuf },
}

impl Port {
    /// Its `--vdev`, the `i`th of its kind.
    fn vdev(&self, i: usize) -> String {
        match self {
            Port::Device(dev) => format!("--vdev=net_af_packet{i},iface={dev},qdisc_bypass=0"),
            Port::Vhost { socket } => {
                format!("--vdev=net_vhost{i},iface={},queues=1", socket.display())
            }
        }
    }

    /// What a custom forwarder takes for it.
    fn arg(&self) -> String {
        match self {
            Port::Device(dev) => dev.clone(),
            Port::Vhost { socket } => socket.display().to_string(),
        }
    }
}

impl Forwarder {
    /// The program's file name: the datapath's name in segment names.
    pub fn name(&self) -> String {
        Path::new(&self.program)
            .file_name()
            .map_or(self.program.clone(), |n| n.to_string_lossy().into_owned())
    }

    fn alive(&self) -> bool {
        owner::start_time(self.pid) == Some(self.start_time)
    }
}

pub(super) fn dir(lab: &str, role: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{lab}-{role}"))
}

/// Fails in one line, saying what to install, when testpmd is not there.
pub(super) fn check() -> Result<()> {
    match find() {
        Some(_) => Ok(()),
        None => bail!(Lacks::Program(PROGRAM, PACKAGE)),
    }
}

fn find() -> Option<PathBuf> {
    ["/usr/bin", "/usr/local/bin", "/usr/sbin"]
        .iter()
        .map(|d| Path::new(d).join(PROGRAM))
        .find(|p| p.is_file())
}

/// The command line: no hugepages (the memory is plain, 1 GiB), no PCI, one af_packet port
/// per device and one vhost port per socket (probed, so numbered, in this order), io
/// forwarding on one lcore started at once. qdisc_bypass=0: the PMD's default sends straight
/// to the driver, past the device's qdisc and tc egress, which would hide the egress hooks of
/// the re-injected packet. 8192 mbufs: the default pool does not fit in 1 GiB without
/// hugepages ("Cannot allocate memory").
fn args(prefix: &str, ports: &[Port]) -> Vec<String> {
    let mut args: Vec<String> = ["--no-huge", "-m", "1024", "--no-pci", "-l", "0-1"]
        .map(String::from)
        .into();
    args.push(format!("--file-prefix={prefix}"));
    let (mut devices, mut vhosts) = (0, 0);
    for port in ports {
        let n = match port {
            Port::Device(_) => &mut devices,
            Port::Vhost { .. } => &mut vhosts,
        };
        args.push(port.vdev(*n));
        *n += 1;
    }
    args.push("--".into());
    args.extend(
        [
            "--forward-mode=io",
            "--auto-start",
            "--total-num-mbufs=8192",
        ]
        .map(String::from),
    );
    args
}

/// Starts testpmd inside namespace `ns` on `ports`, with its files in `dir`; returns once it
/// forwards. Without `-i` it forwards until a line arrives on its standard input (it exits on
/// end of file too), so its standard input is a FIFO in `dir` that it holds open for writing
/// itself: nothing ever arrives, and it outlives the command that started it. It runs in a
/// process group of its own, so a Ctrl-C at the terminal reaches only the profiler, whose undo
/// then stops it.
/// `custom`: a program to run instead, as `PATH PORT_A PORT_B`, which behaves like testpmd
/// here (prints READY_LINE once it forwards, exits on a line or end of file on its input).
pub(super) fn start(
    lab: &str,
    ns: &str,
    ports: &[Port],
    dir: &Path,
    custom: Option<&Path>,
) -> Result<Forwarder> {
    let program = match custom {
        Some(p) => p.to_path_buf(),
        None => find().ok_or(Lacks::Program(PROGRAM, PACKAGE))?,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let fifo = dir.join("stdin");
    nix::unistd::mkfifo(
        &fifo,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .with_context(|| format!("cannot create {}", fifo.display()))?;
    // Read and write: opening a FIFO for reading alone waits for a writer.
    let stdin = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .with_context(|| format!("cannot open {}", fifo.display()))?;
    let log_path = dir.join("log");
    let log =
        File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let prefix = format!("{FILE_PREFIX}{lab}");
    // `ip netns exec` enters the namespace and execs stdbuf, which execs testpmd: the pid is
    // testpmd's. Line-buffered, so that its log says when it forwards (it does not flush
    // before waiting on its standard input).
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "stdbuf", "-oL"])
        .arg(&program)
        .args(match custom {
            Some(_) => ports.iter().map(Port::arg).collect(),
            None => args(&prefix, ports),
        })
        .stdin(stdin)
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot run {PROGRAM} in {ns}"))?;
    let pid = child.id();
    let forwarder = Forwarder {
        program: program.to_string_lossy().into_owned(),
        pid,
        start_time: owner::start_time(pid).unwrap_or(0),
        file_prefix: prefix,
        ports: ports.to_vec(),
    };
    // Recorded before waiting, so that a failure from here on stops it.
    let record = serde_json::to_vec(&forwarder)?;
    std::fs::write(dir.join("pid"), record).context("cannot record testpmd's pid")?;
    wait_ready(child, &log_path)?;
    Ok(forwarder)
}

/// Waits for testpmd to say it forwards; if it exits first, fails with the end of its log.
fn wait_ready(mut child: std::process::Child, log: &Path) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let text = read_log(log);
        if text.contains(READY_LINE) {
            // Reaped by `stop` (or init, once this process has exited).
            std::mem::forget(child);
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{PROGRAM} exited ({status}): {}", tail(&text));
        }
        if Instant::now() > deadline {
            bail!(
                "{PROGRAM} did not start forwarding within {READY_TIMEOUT:?}: {}",
                tail(&text)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_log(log: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(log) {
        let _ = f.read_to_string(&mut text);
    }
    text
}

/// The last lines of testpmd's output, on one line.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// Turns off transmit checksum offload (and with it TSO) on `ifname` in namespace `ns`. A
/// packet socket receives what a veth sends as is: with the checksum left for the hardware
/// (CHECKSUM_PARTIAL) and TCP segments of up to 64 KiB. testpmd would re-inject those
/// unchanged, and the receiving pod would drop them for their checksum. With the offload off
/// the pod's stack computes every checksum and segments to the MTU, as a pod behind a DPDK
/// switch's virtual NIC without offloads does. The legacy ioctl, since the ethtool netlink
/// crate only reads features.
pub(super) fn tx_checksum_off(ns: &str, ifname: &str) -> Result<()> {
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let name = ifname.to_string();
    super::netns::run_in(Some(ns), move || {
        let sock = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("cannot open a socket for ethtool")?;
        let mut value = EthtoolValue {
            cmd: ETHTOOL_STXCSUM,
            data: 0,
        };
        // SAFETY: ifreq is plain data; zeroed is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
        use std::os::fd::AsRawFd as _;
        // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points to, both live.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot turn off tx checksum offload on {name}"));
        }
        Ok(())
    })
    .with_context(|| format!("in {ns}"))
}

/// The testpmd recorded in `dir`, if any.
fn recorded(dir: &Path) -> Option<Forwarder> {
    let bytes = std::fs::read(dir.join("pid")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Stops the testpmd recorded in `dir` (SIGTERM, which it handles by closing its ports, then
/// SIGKILL), removes its DPDK runtime directory and `dir`. Works on whatever part exists.
pub(super) fn stop(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let mut result = Ok(());
    if let Some(f) = recorded(dir) {
        result = stop_process(&f);
        let runtime = Path::new(DPDK_RUNTIME).join(&f.file_prefix);
        if runtime.exists() {
            result = result.and(
                std::fs::remove_dir_all(&runtime)
                    .with_context(|| format!("cannot remove {}", runtime.display())),
            );
        }
        // DPDK made its parent; left only if another DPDK process uses it.
        let _ = std::fs::remove_dir(DPDK_RUNTIME);
    }
    result.and(
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display())),
    )
}

fn stop_process(f: &Forwarder) -> Result<()> {
    let pid = Pid::from_raw(f.pid as i32);
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        if !f.alive() {
            break;
        }
        // ESRCH: it exited meanwhile.
        let _ = kill(pid, signal);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while f.alive() && Instant::now() < deadline {
            reap(pid);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    reap(pid);
    if f.alive() {
        bail!("{} (pid {}) did not exit", f.program, f.pid);
    }
    Ok(())
}

/// Collects the exit status when this process started it (`lab up` and the run are one
/// process with it only until they exit); a zombie would look alive.
fn reap(pid: Pid) {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn testpmd_forwards_between_the_ports_through_their_qdiscs() {
        let ports = ["veth-a", "veth-b"].map(|d| Port::Device(d.into()));
        let a = args("profiler-dpdk", &ports);
        let line = a.join(" ");
        assert!(
            line.contains("--vdev=net_af_packet0,iface=veth-a,qdisc_bypass=0 --vdev=net_af_packet1,iface=veth-b,qdisc_bypass=0"),
            "{line}"
        );
        assert!(line.contains("--file-prefix=profiler-dpdk"), "{line}");
        assert!(
            !a.iter().any(|x| x == "-i"),
            "interactive mode reads commands: {line}"
        );
        let sep = a.iter().position(|x| x == "--").expect("EAL and app args");
        assert!(a[sep..].iter().any(|x| x == "--auto-start"), "{line}");
    }

    #[test]
    fn vhost_ports_are_numbered_apart_from_packet_sockets() {
        let ports = [
            Port::Vhost {
                socket: "/run/x/vm1.sock".into(),
            },
            Port::Device("vhu-vm1".into()),
            Port::Vhost {
                socket: "/run/x/vm2.sock".into(),
            },
        ];
        let line = args("p", &ports).join(" ");
        assert!(
            line.contains("--vdev=net_vhost0,iface=/run/x/vm1.sock,queues=1 --vdev=net_af_packet0,iface=vhu-vm1,qdisc_bypass=0 --vdev=net_vhost1,iface=/run/x/vm2.sock"),
            "{line}"
        );
        let recorded: Port =
            serde_json::from_str("\"veth-a\"").expect("a device, as recorded before vhost ports");
        assert_eq!(recorded, Port::Device("veth-a".into()));
    }
}
