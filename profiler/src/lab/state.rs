//! One JSON file per running lab, so later commands (profile, down, list) know what `up` made.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::Lab;

pub const STATE_DIR: &str = "/run/profiler/labs";

pub(super) fn path(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{name}.json"))
}

/// Writes through a temporary file and a rename, so a reader never sees half a lab.
pub(super) fn save(lab: &Lab) -> Result<()> {
    std::fs::create_dir_all(STATE_DIR).with_context(|| format!("cannot create {STATE_DIR}"))?;
    let json = serde_json::to_vec_pretty(lab).context("cannot serialize the lab state")?;
    let (tmp, dest) = (
        Path::new(STATE_DIR).join(format!("{}.json.tmp", lab.name)),
        path(&lab.name),
    );
    std::fs::write(&tmp, json).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))
}

pub(super) fn load(name: &str) -> Result<Option<Lab>> {
    let file = path(name);
    match std::fs::read(&file) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("corrupt lab state {}", file.display()))
            .map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", file.display())),
    }
}

/// Names of the labs that have a state file.
pub(super) fn names() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(STATE_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {STATE_DIR}")),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {STATE_DIR}"))?;
        let file = entry.file_name();
        if let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".json")) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

pub(super) fn remove(name: &str) -> Result<()> {
    let file = path(name);
    match std::fs::remove_file(&file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", file.display()))
        }
        _ => Ok(()),
    }
}
