//! `profiler delay` at one device's tc hook, held for as long as the guard lives.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::{Child, ChildStdout, Command, Stdio},
};

use aya::programs::{tc::TcAttachType, SchedClassifier};
use profiler::lab::netns::run_in;

use super::BIN;

/// `profiler delay` holding packets at a hook, until dropped: SIGINT, and it must say it
/// detached, and be. Its stdout stays open: a closed pipe would end it at its next line.
pub struct Delay {
    child: Child,
    stdout: BufReader<ChildStdout>,
    netns: Option<String>,
    iface: String,
    direction: String,
}

impl Delay {
    /// Holds `delay_us` the UDP/TCP packets of `port` (0: every packet) at `direction` of
    /// `iface` in `netns` (None: this process's), once `profiler delay` says so and its
    /// program is attached.
    pub fn hold(
        netns: Option<&str>,
        iface: &str,
        direction: &str,
        delay_us: u64,
        port: u16,
    ) -> Delay {
        let mut child = Command::new(BIN)
            .arg("delay")
            .args(netns.map(|ns| ["--netns", ns]).into_iter().flatten())
            .args(["--iface", iface])
            .args([
                "--direction",
                direction,
                "--delay-us",
                &delay_us.to_string(),
            ])
            .args(["--port", &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning profiler delay");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("profiler delay's output");
        if !line.starts_with("holding") {
            let out = child.wait_with_output().expect("wait");
            panic!(
                "profiler delay did not attach: {line}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The guard first: a failed check below still stops the process.
        let delay = Delay {
            child,
            stdout,
            netns: netns.map(str::to_string),
            iface: iface.to_string(),
            direction: direction.to_string(),
        };
        let tc = tcx_programs(netns, iface, direction);
        assert!(
            tc.contains(&"tc_delay".into()),
            "no tc_delay attached: {tc:?}"
        );
        delay
    }
}

/// The names of the programs attached by tcx at a device's hook.
fn tcx_programs(netns: Option<&str>, iface: &str, direction: &str) -> Vec<String> {
    let hook = match direction {
        "egress" => TcAttachType::Egress,
        _ => TcAttachType::Ingress,
    };
    run_in(netns, || {
        let (_, programs) = SchedClassifier::query_tcx(iface, hook)?;
        Ok(programs
            .iter()
            .filter_map(|p| p.name_as_str().map(str::to_string))
            .collect())
    })
    .expect("listing the tcx programs")
}

impl Drop for Delay {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let mut rest = String::new();
        let _ = self.stdout.read_to_string(&mut rest);
        let status = self.child.wait().expect("wait for profiler delay");
        if !std::thread::panicking() {
            assert!(
                status.success() && rest.contains("detached"),
                "profiler delay did not detach ({status}): {rest}"
            );
            let tc = tcx_programs(self.netns.as_deref(), &self.iface, &self.direction);
            assert!(
                !tc.contains(&"tc_delay".into()),
                "tc_delay still attached: {tc:?}"
            );
        }
    }
}
