//! A `profiler agent` process for a test, and the cluster's certificates it needs.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{ip, BIN};

/// The agent's process (and the namespace it was started in, if the test made one for it),
/// ended and removed however the test ends.
pub struct Agent {
    /// None once `stop` has reaped it.
    child: Option<Child>,
    log: PathBuf,
    netns: Option<String>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // Ours, by pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Agent {
    /// `profiler agent --listen ADDR ARGS`, in a new namespace NETNS (its loopback up) if
    /// given, once it listens; its stderr in DIR/agent.log.
    pub fn start(dir: &Path, netns: Option<&str>, addr: &str, args: &[&str]) -> Agent {
        let cmd = match netns {
            Some(ns) => {
                ip(&["netns", "add", ns]);
                ip(&["-n", ns, "link", "set", "lo", "up"]);
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        Agent::spawn(cmd, dir, netns, addr, args)
    }

    /// An agent on this node's namespace without the capabilities `dropped` (setpriv's
    /// --bounding-set names: "net_admin,..."): what a node's service manager may grant it.
    pub fn start_without(dir: &Path, dropped: &str, addr: &str, args: &[&str]) -> Agent {
        let mut cmd = Command::new("setpriv");
        cmd.args([&format!("--bounding-set=-{dropped}"), BIN]);
        Agent::spawn(cmd, dir, None, addr, args)
    }

    fn spawn(
        mut cmd: Command,
        dir: &Path,
        netns: Option<&str>,
        addr: &str,
        args: &[&str],
    ) -> Agent {
        let log = dir.join("agent.log");
        let child = cmd
            .args(["agent", "--listen", addr])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("the agent's log"))
            .spawn()
            .expect("starting the agent");
        let agent = Agent {
            child: Some(child),
            log,
            netns: netns.map(str::to_string),
        };
        agent.wait_for("listening on", 1);
        agent
    }

    /// SIGTERM, as a node's service manager ends it: it must exit at once, and cleanly.
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("a running agent");
        // Ours, by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("the agent's status") {
                break status;
            }
            if Instant::now() > deadline {
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                let _ = child.wait();
                panic!("the agent ignored SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "the agent exited with {status}: {}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the agent's log has `n` lines containing `what`.
    pub fn wait_for(&self, what: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log().matches(what).count() < n {
            assert!(
                Instant::now() < deadline,
                "agent never said {what:?} {n} times: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `profiler agent --init-certs ROOT/NAME --names NODES`: a cluster's CA and certificates.
pub fn certs(root: &Path, name: &str, nodes: &str) -> PathBuf {
    let dir = root.join(name);
    let out = Command::new(BIN)
        .args(["agent", "--init-certs"])
        .arg(&dir)
        .args(["--names", nodes])
        .output()
        .expect("profiler agent --init-certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    for node in std::iter::once("ca").chain(nodes.split(',')) {
        let file = format!("{node}.pem");
        assert!(listed.contains(&file), "{file} not listed: {listed}");
    }
    dir
}

/// A scratch directory (certificates, logs), removed however the test ends.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("profiler-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
