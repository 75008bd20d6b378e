//! tc programs before tcx (kernels older than 6.6) hang off a clsact qdisc as netlink filters,
//! which outlive the process that attached them. So each such attachment is recorded in a file
//! of the process's own (`/run/profiler/tc/PID-USER.json`, USER: `hops` for the profile's
//! programs, `delay` for a delay injector's) until it is detached, and `lab down --all`
//! removes what a process that is gone (SIGKILL) left: its filters, found by program name, and
//! the clsact qdiscs it added. With tcx the links die with the process and nothing is recorded.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use aya::programs::TcAttachType;
use serde::{Deserialize, Serialize};

use crate::lab::{self, netns, Owner};

pub const TC_DIR: &str = "/run/profiler/tc";

/// The programs attached as tc filters, by name.
const PROGRAMS: [(&str, TcAttachType); 4] = [
    ("tc_ingress", TcAttachType::Ingress),
    ("tc_egress", TcAttachType::Egress),
    ("tc_delay", TcAttachType::Ingress),
    ("tc_delay", TcAttachType::Egress),
];

/// Who in a process recorded its devices: the profile's hop programs, or a delay injector.
pub const HOPS: &str = "hops";
pub const DELAY: &str = "delay";

/// One device with the profiler's tc filters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub netns: Option<String>,
    pub ifname: String,
    /// The clsact qdisc was added by the profiler (so it goes too).
    pub clsact_added: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    owner: Owner,
    devices: Vec<Device>,
}

/// The index of `ifname` in the calling thread's namespace, which is `ns` (None: this
/// process's), or an error naming both.
pub fn ifindex(ifname: &str, ns: Option<&str>) -> Result<u32> {
    nix::net::if_::if_nametoindex(ifname).map_err(|e| {
        anyhow::anyhow!(
            "unknown interface {ifname}{}: {e}",
            ns.map(|n| format!(" in netns {n}")).unwrap_or_default()
        )
    })
}

fn path(user: &str) -> PathBuf {
    Path::new(TC_DIR).join(format!("{}-{user}.json", std::process::id()))
}

/// Records the devices of this process's `user` ([`HOPS`], [`DELAY`]), through a temporary
/// file and a rename.
pub fn record(user: &str, devices: &[Device]) -> Result<()> {
    std::fs::create_dir_all(TC_DIR).with_context(|| format!("cannot create {TC_DIR}"))?;
    let record = Record {
        owner: Owner::me("tc"),
        devices: devices.to_vec(),
    };
    let (file, tmp) = (path(user), path(user).with_extension("json.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&record)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &file).with_context(|| format!("cannot write {}", file.display()))
}

/// The devices of this process's `user` were all cleaned up.
pub fn forget(user: &str) {
    let _ = std::fs::remove_file(path(user));
}

/// Removes the clsact qdisc the profiler added to `d` (its filters go with it).
pub fn remove_clsact(d: &Device) -> Result<()> {
    lab::remove_clsact(d.netns.as_deref(), &d.ifname)
}

/// Removes what processes that are gone left on their devices; one line per thing removed,
/// and the failures.
pub fn recover() -> Result<(Vec<String>, Vec<String>)> {
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    let entries = match std::fs::read_dir(TC_DIR) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((removed, failed)),
        Err(e) => return Err(e).with_context(|| format!("cannot list {TC_DIR}")),
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let file = entry.path();
        let record: Option<Record> = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if record.as_ref().is_some_and(|r| r.owner.alive()) {
            continue;
        }
        for d in record.map(|r| r.devices).unwrap_or_default() {
            match remove_left(&d) {
                Ok(false) => {}
                Ok(true) => removed.push(format!(
                    "tc filters on {}{}",
                    d.ifname,
                    d.netns
                        .as_ref()
                        .map(|n| format!(" in {n}"))
                        .unwrap_or_default()
                )),
                Err(e) => failed.push(format!("tc filters on {}: {e:#}", d.ifname)),
            }
        }
        let _ = std::fs::remove_file(&file);
    }
    Ok((removed, failed))
}

/// The clsact qdisc if the profiler added it, else the profiler's filters by name; whether
/// anything was there to remove (a device that is gone took them with it).
fn remove_left(d: &Device) -> Result<bool> {
    if d.netns.as_deref().is_some_and(|ns| !netns::mounted(ns)) {
        return Ok(false);
    }
    let exists = netns::run_in(d.netns.as_deref(), || {
        Ok(nix::net::if_::if_nametoindex(d.ifname.as_str()).is_ok())
    })?;
    if !exists {
        return Ok(false);
    }
    if d.clsact_added {
        remove_clsact(d)?;
        return Ok(true);
    }
    netns::run_in(d.netns.as_deref(), || {
        // NotFound: this one was not attached, or already detached.
        Ok(PROGRAMS
            .iter()
            .filter(|(name, kind)| {
                aya::programs::tc::qdisc_detach_program(&d.ifname, *kind, name).is_ok()
            })
            .count()
            > 0)
    })
}
