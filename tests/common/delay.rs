//! `profiler delay` at one device's tc hook, held for as long as the guard lives.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
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

/// `profiler delay` in a nested lab's guest, in its root namespace (its 6.1 kernel has no
/// tcx: the hold is the clsact filter of priority 1), until dropped. Started through `lab exec`
/// and left running, so the guest's serial channel is free for `attach --lab` meanwhile; its
/// output goes to a file in the guest, and it is stopped by its pid (SIGTERM).
pub struct GuestDelay {
    lab: String,
    guest: String,
    pid: u32,
}

/// Where a guest's `profiler delay` writes (the guest's own /tmp).
const GUEST_DELAY_LOG: &str = "/tmp/profiler-delay.log";

/// How long a guest's `profiler delay` may take to load and attach under TCG.
const GUEST_DELAY_LOADS: Duration = Duration::from_secs(300);

impl GuestDelay {
    /// Holds every packet `delay_us` at `direction` of `iface` in `guest` of `lab`, once its
    /// `profiler delay` says so and its filter is on the device.
    pub fn hold(lab: &str, guest: &str, iface: &str, direction: &str, delay_us: u64) -> GuestDelay {
        let start = format!(
            "{BIN} delay --iface {iface} --direction {direction} --delay-us {delay_us} \
             > {GUEST_DELAY_LOG} 2>&1 & echo $!"
        );
        let out = in_guest(lab, guest, &start);
        let pid = out
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no pid: {out}"));
        // The guard first: a failed wait below still stops the process.
        let delay = GuestDelay {
            lab: lab.into(),
            guest: guest.into(),
            pid,
        };
        let since = Instant::now();
        while !delay.log().starts_with("holding") {
            assert!(
                delay.runs() && since.elapsed() < GUEST_DELAY_LOADS,
                "profiler delay in {guest} did not attach: {}",
                delay.log()
            );
            std::thread::sleep(Duration::from_secs(2));
        }
        let filters = in_guest(
            lab,
            guest,
            &format!("tc filter show dev {iface} {direction}"),
        );
        assert!(
            filters.contains("pref 1 ") && filters.contains("tc_delay"),
            "no tc_delay of priority 1 at {guest}'s {iface} {direction}: {filters}"
        );
        delay
    }

    fn log(&self) -> String {
        in_guest(&self.lab, &self.guest, &format!("cat {GUEST_DELAY_LOG}"))
    }

    fn runs(&self) -> bool {
        let pid = self.pid;
        in_guest(
            &self.lab,
            &self.guest,
            &format!("kill -0 {pid} 2>/dev/null && echo runs; true"),
        )
        .contains("runs")
    }
}

impl Drop for GuestDelay {
    fn drop(&mut self) {
        // SIGTERM: a shell's background job ignores SIGINT.
        in_guest(
            &self.lab,
            &self.guest,
            &format!("kill -TERM {} 2>/dev/null; true", self.pid),
        );
        let since = Instant::now();
        while self.runs() && since.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_secs(1));
        }
        if !std::thread::panicking() {
            let log = self.log();
            assert!(
                !self.runs() && log.contains("detached"),
                "profiler delay in {} did not detach: {log}",
                self.guest
            );
        }
    }
}

/// A shell command's stdout in `guest`'s root namespace (`lab exec`), which must succeed.
fn in_guest(lab: &str, guest: &str, command: &str) -> String {
    let out = super::profiler(&[
        "lab",
        "exec",
        lab,
        &format!("{guest}:(root)"),
        "--",
        "sh",
        "-c",
        command,
    ]);
    assert!(
        out.status.success(),
        "lab exec {guest}: {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
