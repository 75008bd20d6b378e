//! Who made a lab and who uses it now. A lab made by a run (or a compare) records that process
//! (pid and start time, so a reused pid is not taken for it); a lab made by `lab up` has no
//! owner and stays until `lab down`. While a command uses a lab it holds the lab's lock (an
//! flock, which the kernel releases when the process dies, even by SIGKILL), so a second
//! command never builds, reuses or tears down a lab under the first.

use std::{
    fs::File,
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// Where the locks are: one file per lab, holding the pid and command of the process in it.
pub const LOCK_DIR: &str = "/run/profiler/locks";

/// The process that made a lab and takes it down when it ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    /// The process's start time (clock ticks since boot, /proc/PID/stat): with the pid, it
    /// names one process even after the pid is reused.
    pub start_time: u64,
    /// "run" or "compare".
    pub command: String,
}

impl Owner {
    /// This process, as the owner of a lab it makes for `command`.
    pub fn me(command: &str) -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            start_time: start_time(pid).unwrap_or(0),
            command: command.to_string(),
        }
    }

    /// Whether the process is still running (the same process, not one that reused its pid).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }
}

/// Field 22 of /proc/PID/stat; None when there is no such process.
pub(super) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The lab is in use by another command (the process that holds its lock).
#[derive(Debug, thiserror::Error)]
#[error("lab {lab} is in use by {holder}; wait for it to end, or use another lab")]
pub struct Busy {
    pub lab: String,
    pub holder: String,
}

/// A lab's lock, held while a command uses the lab; released (and its file removed) on drop.
#[derive(Debug)]
pub struct Lock {
    /// Held for its drop, which unlocks.
    _file: Flock<File>,
    path: PathBuf,
}

impl Lock {
    /// Takes lab `name`'s lock, or fails in one line naming the process that holds it.
    pub fn acquire(name: &str) -> Result<Lock> {
        match Lock::try_acquire(name)? {
            Ok(lock) => Ok(lock),
            Err(holder) => Err(Busy {
                lab: name.to_string(),
                holder,
            }
            .into()),
        }
    }

    /// The lock, or who holds it.
    pub fn try_acquire(name: &str) -> Result<Result<Lock, String>> {
        std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("cannot create {LOCK_DIR}"))?;
        let path = Path::new(LOCK_DIR).join(format!("{name}.lock"));
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(f) => f,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(Err(holder(&path))),
                Err((_, e)) => bail!("cannot lock {}: {e}", path.display()),
            };
            // The holder before us may have removed the file after we opened it: then our lock
            // is on a file nobody else will open, so start again.
            let same = std::fs::metadata(&path)
                .is_ok_and(|m| file.metadata().is_ok_and(|f| f.ino() == m.ino()));
            if !same {
                continue;
            }
            file.set_len(0)?;
            let me = std::env::args().take(2).collect::<Vec<_>>().join(" ");
            write!(file, "pid {} ({me})", std::process::id())?;
            return Ok(Ok(Lock { _file: file, path }));
        }
    }

    /// Whether a command holds lab `name`'s lock now.
    pub fn held(name: &str) -> Result<Option<String>> {
        Ok(Lock::try_acquire(name)?.err())
    }
}

/// What the lock file says of its holder.
fn holder(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => "another profiler process".to_string(),
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Removed while still locked (the lock goes with `_file`, dropped after this), so a
        // process that opens it next gets a new file.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_made_up_one_is_not() {
        let me = Owner::me("run");
        assert!(me.alive(), "{me:?}");
        let reused = Owner {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(
            !reused.alive(),
            "a pid with another start time is another process"
        );
        let gone = Owner {
            pid: u32::MAX - 1,
            ..me
        };
        assert!(!gone.alive());
    }
}
