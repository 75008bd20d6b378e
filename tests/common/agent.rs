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
        let mut cmd = match netns {
            Some(ns) => {
                ip(&["netns", "add", ns]);
                ip(&["-n", ns, "link", "set", "lo", "up"]);
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["agent", "--listen", addr]).args(args);
        Agent::spawn(cmd, dir, netns)
    }

    /// The agent as deploy/agent-daemonset.yaml runs it on node NODE at address IP: its
    /// command line (the downward API's variables given, its Secret's mount at `tls`) with
    /// the capabilities it adds and no other, on this node's namespace; listening at
    /// `listen` (returned), the manifest's address.
    pub fn as_deployed(dir: &Path, node: &str, ip: &str, tls: &Path) -> (Agent, String) {
        let manifest = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent-daemonset.yaml"),
        )
        .expect("deploy/agent-daemonset.yaml");
        let deployed = Deployed::read(&manifest);
        let args: Vec<String> = (deployed.args.iter())
            .map(|a| {
                a.replace("$(NODE_NAME)", node)
                    .replace("$(NODE_IP)", ip)
                    .replace(&deployed.tls_mount, tls.to_str().unwrap())
            })
            .collect();
        let listen = args
            .iter()
            .skip_while(|a| *a != "--listen")
            .nth(1)
            .expect("the manifest's agent has --listen")
            .clone();
        let mut cmd = Command::new("setpriv");
        cmd.args([&format!("--bounding-set=-all,{}", deployed.caps), BIN]);
        cmd.args(&args);
        (Agent::spawn(cmd, dir, None), listen)
    }

    fn spawn(mut cmd: Command, dir: &Path, netns: Option<&str>) -> Agent {
        let log = dir.join("agent.log");
        let child = cmd
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

/// What deploy/agent-daemonset.yaml says of its container, read line by line (the manifest
/// keeps one item per line).
struct Deployed {
    args: Vec<String>,
    /// setpriv's names of the capabilities it adds: "+bpf,+perfmon,...".
    caps: String,
    /// Where its TLS Secret is mounted.
    tls_mount: String,
}

impl Deployed {
    fn read(manifest: &str) -> Deployed {
        let lines: Vec<&str> = manifest.lines().collect();
        let at = |key: &str| {
            (lines.iter())
                .position(|l| l.trim() == key)
                .unwrap_or_else(|| panic!("no {key} in the manifest"))
        };
        let indent = |l: &str| l.len() - l.trim_start().len();
        let start = at("args:");
        let args = lines[start + 1..]
            .iter()
            .take_while(|l| indent(l) > indent(lines[start]))
            .map(|l| l.trim().trim_start_matches("- ").to_string())
            .collect();
        let caps = (lines.iter())
            .find_map(|l| l.trim().strip_prefix("add: "))
            .expect("a capabilities add: line")
            .trim_matches(['[', ']'])
            .split(", ")
            .map(|c| format!("+{}", c.trim_matches('"').to_lowercase()))
            .collect::<Vec<_>>()
            .join(",");
        let tls_mount = lines[at("- name: tls") + 1]
            .trim()
            .strip_prefix("mountPath: ")
            .expect("the tls volume's mountPath after its name")
            .to_string();
        Deployed {
            args,
            caps,
            tls_mount,
        }
    }
}
