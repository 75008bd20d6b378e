//! Named network namespaces, compatible with `ip netns`: a namespace is kept alive by a bind
//! mount of its nsfs file onto /run/netns/NAME, so `ip netns exec NAME` works on ours and we
//! can join theirs.
use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _, Result};
use nix::errno::Errno;

use crate::error::bad_input;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::statfs::{fstatfs, statfs, NSFS_MAGIC};

pub const NETNS_DIR: &str = "/run/netns";

/// Creates network namespace `name`, like `ip netns add`.
pub fn add(name: &str) -> Result<()> {
    let path = path_of(name)?;
    std::fs::create_dir_all(NETNS_DIR).with_context(|| format!("cannot create {NETNS_DIR}"))?;
    make_dir_shared()?;
    // create_new is the O_EXCL that makes two concurrent adds of one name fail cleanly.
    match File::options().write(true).create_new(true).open(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("network namespace {name} already exists")
        }
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
    let created =
        bind_new_netns(&path).with_context(|| format!("cannot create network namespace {name}"));
    if created.is_err() {
        // Best effort: the error being returned says more than a failed removal would.
        let _ = std::fs::remove_file(&path);
    }
    created
}

/// Removes network namespace `name`; its devices go when its last user leaves it.
pub fn delete(name: &str) -> Result<()> {
    let path = path_of(name)?;
    match umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (a leftover file); ENOENT: already gone.
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot unmount network namespace {name}"))
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// Whether anything is at the namespace's path: a namespace, or a file `add` or `delete` was
/// interrupted on (which `delete` removes too).
pub fn exists(name: &str) -> bool {
    path_of(name).is_ok_and(|p| p.exists())
}

/// Whether a namespace is at the path now. `add` creates /run/netns/NAME before it mounts the
/// namespace there, and `delete` unmounts it before it removes the file: in between the path
/// is a plain file of /run, whose inode is no namespace's.
pub fn mounted(name: &str) -> bool {
    path_of(name).is_ok_and(|p| is_namespace(&p))
}

fn is_namespace(path: &std::path::Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == NSFS_MAGIC)
}

/// The namespace's inode number, the kernel's `net->ns.inum` that BPF programs see.
pub fn inode(name: &str) -> Result<u32> {
    let path = path_of(name)?;
    // One open file for both questions: the path may be mounted or unmounted in between.
    let file = File::open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad_input(format!("unknown network namespace {name}")),
        _ => anyhow!("cannot open {}: {e}", path.display()),
    })?;
    let on_nsfs = fstatfs(&file).is_ok_and(|fs| fs.filesystem_type() == NSFS_MAGIC);
    if !on_nsfs {
        bail!(
            "network namespace {name} is being made or removed ({} is not mounted)",
            path.display()
        );
    }
    let meta = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?;
    ino_u32(meta.ino(), &path.display().to_string())
}

/// The calling thread's namespace inode. thread-self, not self: /proc/self is the thread group
/// leader, whose namespace differs from ours inside `run_in`.
pub fn current_inode() -> Result<u32> {
    const PATH: &str = "/proc/thread-self/ns/net";
    let meta = std::fs::metadata(PATH).with_context(|| format!("cannot stat {PATH}"))?;
    ino_u32(meta.ino(), PATH)
}

/// Runs `f` on a fresh thread that has joined netns `name` (None: stay in the caller's
/// namespace). Sockets created inside stay in that namespace.
///
/// A thread of its own, because setns changes only the calling thread and we must never leave
/// a runtime or caller thread in a foreign namespace. Blocks until `f` returns.
pub fn run_in<T: Send>(name: Option<&str>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let ns = name.map(|n| open(n).map(|file| (n, file))).transpose()?;
    std::thread::scope(|s| {
        s.spawn(move || {
            if let Some((n, file)) = ns {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("cannot join network namespace {n}"))?;
            }
            f()
        })
        .join()
        .map_err(|_| {
            anyhow!(
                "the thread running in network namespace {} panicked",
                name.unwrap_or("(current)")
            )
        })?
    })
}

/// Opens the namespace file of `name` (usable with setns or IFLA_NET_NS_FD).
pub fn open(name: &str) -> Result<File> {
    let path = path_of(name)?;
    File::open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad_input(format!("unknown network namespace {name}")),
        _ => anyhow!("cannot open {}: {e}", path.display()),
    })
}

/// A name in NETNS_DIR, or an absolute path of a namespace file (/proc/PID/ns/net, a bind
/// mount), which a name cannot be.
fn path_of(name: &str) -> Result<PathBuf> {
    if name.starts_with('/') {
        return Ok(PathBuf::from(name));
    }
    // iproute2's rule: a name must stay one file inside NETNS_DIR.
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        bail!("invalid network namespace name {name:?}");
    }
    Ok(PathBuf::from(NETNS_DIR).join(name))
}

/// Makes NETNS_DIR a shared mount point, as iproute2 does, so namespace mounts made later
/// propagate to other mount namespaces (e.g. one that `ip netns exec` creates).
pub(super) fn make_dir_shared() -> Result<()> {
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => return Ok(()),
        // EINVAL: not a mount point yet; bind it onto itself and retry.
        Err(Errno::EINVAL) => {}
        Err(e) => return Err(e).with_context(|| format!("cannot make {NETNS_DIR} a shared mount")),
    }
    mount(
        Some(NETNS_DIR),
        NETNS_DIR,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("cannot bind-mount {NETNS_DIR} onto itself"))?;
    shared().with_context(|| format!("cannot make {NETNS_DIR} a shared mount"))
}

/// Unshares a new netns on a dedicated thread (the process and its other threads stay where
/// they are) and pins it by bind-mounting that thread's nsfs file onto `path`.
fn bind_new_netns(path: &std::path::Path) -> Result<()> {
    std::thread::scope(|s| {
        s.spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET) failed")?;
            // thread-self, not self: /proc/self is the thread group leader, still in the old netns.
            mount(
                Some("/proc/thread-self/ns/net"),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| {
                format!(
                    "cannot bind-mount the new namespace onto {}",
                    path.display()
                )
            })
        })
        .join()
        .map_err(|_| anyhow!("the thread creating a network namespace panicked"))?
    })
}

fn ino_u32(ino: u64, what: &str) -> Result<u32> {
    u32::try_from(ino).with_context(|| format!("inode {ino} of {what} does not fit in 32 bits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_names_that_escape_the_directory() {
        for bad in ["", ".", "..", "a/b"] {
            assert!(path_of(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            path_of("pod-a").ok(),
            Some(PathBuf::from("/run/netns/pod-a"))
        );
    }

    #[test]
    fn unknown_namespace_is_named_in_the_error() {
        let err = inode("prof-no-such-ns")
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert_eq!(err, "unknown network namespace prof-no-such-ns");
        assert!(!exists("prof-no-such-ns"));
    }

    /// The file `add` makes before it mounts a namespace there (and `delete` leaves until it
    /// removes it) has an inode too, a plain file's: taken for a namespace's, a pod's hops were
    /// keyed under it and named after no device (issue 32's churn test, once in CI).
    #[test]
    fn a_file_where_no_namespace_is_mounted_has_no_namespace_inode() {
        let plain = std::env::temp_dir().join(format!("prof-unmounted-{}", std::process::id()));
        File::create(&plain).expect("a plain file");
        let name = plain.to_str().expect("a UTF-8 path");
        let err = inode(name).map(|_| ()).unwrap_err().to_string();
        let _ = std::fs::remove_file(&plain);
        assert!(err.contains("is being made or removed"), "{err}");
        assert!(!mounted(name));
        let own = "/proc/thread-self/ns/net";
        assert!(mounted(own));
        assert_eq!(inode(own).ok(), current_inode().ok());
    }
}
