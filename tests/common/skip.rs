//! A test that cannot run here says why and is counted, never passed off as run: `skip`
//! records it where `cargo xtask test` lists the skips at the end ($PROFILER_SKIPS), and under
//! CI=true only an [`Absence`] (what this machine's kernel or hardware lacks or has) may skip:
//! anything else (a tool, a guest kernel) is what `cargo xtask test` installs, so its absence
//! there is a fault of the setup and fails the test.

use std::io::Write as _;

/// What may be absent, or present, here without it being a fault of the setup: each with why no
/// install step can change it, and where the case runs instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Absence {
    /// The kernel has no 8021q module (this project's host kernel): vlan devices cannot be made.
    /// The VM lab's 6.1 kernel has it (tests/vm/labs.rs runs the vlan labs).
    Vlan8021q,
    /// The kernel has 8021q: the case of a kernel that cannot build vlan labs cannot be shown.
    /// Hosts without it (this project's) run it.
    Has8021q,
    /// No igb NIC (SR-IOV): a machine's hardware. `cargo xtask vm --nic igb` gives a guest one
    /// (tests/vm/sriov.rs).
    NoIgbNic,
    /// This machine has an igb NIC: the case of a machine without one cannot be shown here.
    HasIgbNic,
}

impl Absence {
    fn key(self) -> &'static str {
        match self {
            Absence::Vlan8021q => "kernel without 8021q",
            Absence::Has8021q => "kernel with 8021q",
            Absence::NoIgbNic => "no igb NIC",
            Absence::HasIgbNic => "an igb NIC",
        }
    }
}

/// Says why this test cannot run here (the caller returns next) and records it. `absence`:
/// the kernel or hardware reason, None for what an install would give (a failure under CI=true).
pub fn skip(why: &str, absence: Option<Absence>) {
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let kind = absence.map_or("not installed", Absence::key);
    eprintln!("skipped ({kind}): {why}");
    if let Ok(path) = std::env::var("PROFILER_SKIPS") {
        let line = format!("{test}\t{kind}\t{}\n", why.replace(['\t', '\n'], " "));
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .unwrap_or_else(|e| panic!("recording the skip in {path}: {e}"));
    }
    assert!(
        absence.is_some() || std::env::var("CI").as_deref() != Ok("true"),
        "{test} cannot run under CI=true, where cargo xtask test installs what tests need: {why}"
    );
}
