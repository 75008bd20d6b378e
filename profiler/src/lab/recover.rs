//! `lab down --all`: takes down every lab the profiler knows (state files) and every leftover it
//! recognises as its own without one: namespaces named `prof-*`, temporary `pf<pid>x<n>` devices
//! in this namespace whose process is gone, OVS directories (and their daemons) under
//! /run/profiler/ovs, and stale lock files. A lab in use by a live command (its lock is held)
//! is left alone and reported.

use std::path::Path;

use anyhow::Result;

use super::{
    down, dpdk, lab_name, nested, netns, nl::Nl, node, ovs, owner::Lock, setup::TEMP_PREFIX, state,
    Placement, Topology,
};

/// What `down_all` did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// One line per thing removed.
    pub removed: Vec<String>,
    /// One line per lab left alone because a live command uses it.
    pub in_use: Vec<String>,
    /// One line per thing that could not be removed, with why.
    pub failed: Vec<String>,
}

pub async fn down_all() -> Result<Recovery> {
    let mut r = Recovery::default();
    for name in state::names()? {
        match Lock::try_acquire(&name)? {
            Err(holder) => r.in_use.push(format!("lab {name}: in use by {holder}")),
            Ok(_lock) => match down(&name).await {
                Ok(()) => r.removed.push(format!("lab {name}")),
                Err(e) => r.failed.push(format!("lab {name}: {e:#}")),
            },
        }
    }
    leftover_ovs(&mut r)?;
    leftover_dpdk(&mut r)?;
    leftover_guests(&mut r)?;
    leftover_node(&mut r)?;
    leftover_namespaces(&mut r)?;
    leftover_devices(&mut r).await;
    stale_locks(&mut r)?;
    Ok(r)
}

/// Every lab name the topologies can make, longest first (so "bridge-xhost" wins over
/// "bridge" as the lab of "prof-bridge-xhost-pod-a").
fn lab_names() -> Vec<String> {
    let mut names: Vec<String> = Topology::ALL
        .into_iter()
        .flat_map(|t| [Placement::SameHost, Placement::CrossHost].map(|p| lab_name(t, p)))
        .collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    names
}

/// The lab `item` (a namespace "prof-LAB-ROLE" without the "prof-", or an OVS directory
/// "LAB-ROLE") belongs to, when it is one the topologies make.
fn lab_of(item: &str) -> Option<String> {
    lab_names().into_iter().find(|lab| {
        item.strip_prefix(lab.as_str())
            .is_some_and(|r| r.starts_with('-'))
    })
}

/// Whether a live command uses the lab of `item`: then its parts are not leftovers.
fn in_use(item: &str, r: &mut Recovery) -> Result<bool> {
    let Some(lab) = lab_of(item) else {
        return Ok(false);
    };
    Ok(match Lock::held(&lab)? {
        Some(holder) => {
            let line = format!("lab {lab}: in use by {holder}");
            if !r.in_use.contains(&line) {
                r.in_use.push(line);
            }
            true
        }
        None => false,
    })
}

fn leftover_ovs(r: &mut Recovery) -> Result<()> {
    for dir in entries(Path::new(ovs::RUN_DIR))? {
        if in_use(&dir, r)? {
            continue;
        }
        match ovs::stop(&Path::new(ovs::RUN_DIR).join(&dir)) {
            Ok(()) => r
                .removed
                .push(format!("OVS daemons and directory {}/{dir}", ovs::RUN_DIR)),
            Err(e) => r.failed.push(format!("{}/{dir}: {e:#}", ovs::RUN_DIR)),
        }
    }
    Ok(())
}

fn leftover_dpdk(r: &mut Recovery) -> Result<()> {
    for dir in entries(Path::new(dpdk::RUN_DIR))? {
        if in_use(&dir, r)? {
            continue;
        }
        match dpdk::stop(&Path::new(dpdk::RUN_DIR).join(&dir)) {
            Ok(()) => r.removed.push(format!(
                "{} and directory {}/{dir}",
                dpdk::PROGRAM,
                dpdk::RUN_DIR
            )),
            Err(e) => r.failed.push(format!("{}/{dir}: {e:#}", dpdk::RUN_DIR)),
        }
    }
    Ok(())
}

/// Guests of nested labs (QEMU process groups) whose lab has no state: before the namespaces,
/// since QEMU holds its tap.
fn leftover_guests(r: &mut Recovery) -> Result<()> {
    for dir in entries(Path::new(nested::RUN_DIR))? {
        if in_use(&dir, r)? {
            continue;
        }
        match nested::stop(&Path::new(nested::RUN_DIR).join(&dir)) {
            Ok(()) => r.removed.push(format!(
                "QEMU guest and directory {}/{dir}",
                nested::RUN_DIR
            )),
            Err(e) => r.failed.push(format!("{}/{dir}: {e:#}", nested::RUN_DIR)),
        }
    }
    Ok(())
}

/// Node labs without state (a build that was killed): their record says what they made.
fn leftover_node(r: &mut Recovery) -> Result<()> {
    for name in entries(Path::new(node::RUN_DIR))? {
        if let Some(holder) = Lock::held(&name)? {
            r.in_use.push(format!("lab {name}: in use by {holder}"));
            continue;
        }
        match node::remove(&name) {
            Ok(()) => r.removed.push(format!(
                "node lab {name}: its pods, containerd and directory {}/{name}",
                node::RUN_DIR
            )),
            Err(e) => r.failed.push(format!("{}/{name}: {e:#}", node::RUN_DIR)),
        }
    }
    Ok(())
}

fn leftover_namespaces(r: &mut Recovery) -> Result<()> {
    for ns in entries(Path::new(netns::NETNS_DIR))? {
        let Some(rest) = ns.strip_prefix(super::spec::NETNS_PREFIX) else {
            continue;
        };
        if in_use(rest, r)? {
            continue;
        }
        match netns::delete(&ns) {
            Ok(()) => r.removed.push(format!("network namespace {ns}")),
            Err(e) => r.failed.push(format!("network namespace {ns}: {e:#}")),
        }
    }
    Ok(())
}

/// Temporary devices of a lab being built live in this namespace until they are moved; one
/// whose process is gone was left by a crash.
async fn leftover_devices(r: &mut Recovery) {
    let links = match Nl::open(None) {
        Ok(nl) => match nl.links().await {
            Ok(links) => links
                .into_iter()
                .map(|l| (l.index, l.name))
                .collect::<Vec<(u32, String)>>(),
            Err(e) => {
                r.failed
                    .push(format!("listing this namespace's devices: {e:#}"));
                return;
            }
        },
        Err(e) => {
            r.failed.push(format!("netlink: {e:#}"));
            return;
        }
    };
    let Ok(nl) = Nl::open(None) else { return };
    for (index, name) in links {
        let Some(pid) = temp_device_pid(&name) else {
            continue;
        };
        if any_process_with_pid_mod(pid) {
            continue;
        }
        match nl.delete(index).await {
            Ok(()) => r.removed.push(format!("temporary device {name}")),
            Err(e) => r.failed.push(format!("temporary device {name}: {e:#}")),
        }
    }
}

/// The pid (mod 100000) in a temporary device's name "pf<pid>x<n>".
pub fn temp_device_pid(name: &str) -> Option<u32> {
    let (pid, n) = name.strip_prefix(TEMP_PREFIX)?.split_once('x')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(n))
        .then(|| pid.parse().ok())
        .flatten()
}

/// Whether a process whose pid is `pid` mod 100000 runs (the name keeps only that much).
fn any_process_with_pid_mod(pid: u32) -> bool {
    (pid..4_194_304)
        .step_by(100_000)
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
}

/// Lock files that no process holds (a SIGKILLed command leaves its file, not its lock).
fn stale_locks(r: &mut Recovery) -> Result<()> {
    for file in entries(Path::new(super::owner::LOCK_DIR))? {
        if let Some(lab) = file.strip_suffix(".lock") {
            if Lock::held(lab)?.is_none() {
                r.removed
                    .push(format!("stale lock {}/{file}", super::owner::LOCK_DIR));
            }
        }
    }
    Ok(())
}

fn entries(dir: &Path) -> Result<Vec<String>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => Ok(rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(anyhow::anyhow!("cannot list {}: {e}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_matched_to_their_lab() {
        assert_eq!(
            lab_of("bridge-xhost-pod-a").as_deref(),
            Some("bridge-xhost")
        );
        assert_eq!(lab_of("bridge-pod-a").as_deref(), Some("bridge"));
        assert_eq!(
            lab_of("ovs-vlan-xhost-host-a").as_deref(),
            Some("ovs-vlan-xhost")
        );
        assert_eq!(lab_of("mine"), None);
    }

    #[test]
    fn temporary_device_names() {
        assert_eq!(temp_device_pid("pf1234x0"), Some(1234));
        assert_eq!(temp_device_pid("pf1234"), None);
        assert_eq!(temp_device_pid("pfaxb"), None);
        assert_eq!(temp_device_pid("eth0"), None);
        assert!(any_process_with_pid_mod(std::process::id() % 100_000));
    }
}
