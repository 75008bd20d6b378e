//! Where `cargo xtask vm` keeps the VM lab's kernels and virtme-ng, in one place: xtask
//! provisions into this layout and the nested labs find their guests' kernels in it (xtask
//! includes this file by path; it needs nothing but std and anyhow).
//!
//! CACHE/vm/kernel-SERIES/{vmlinuz,release} (release written last: the kernel is complete),
//! CACHE/vm/virtme-ng/bin/vng.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The series `cargo xtask vm --kernel` provisions, newest first: a nested lab's guest runs
/// the newest one that is cached unless told otherwise.
pub const SERIES: [&str; 2] = ["6.12", "6.1"];

/// $PROFILER_CACHE_DIR, else $XDG_CACHE_HOME/profiler, else $HOME/.cache/profiler.
pub fn cache_dir() -> Result<PathBuf> {
    let nonempty = |var| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = nonempty("PROFILER_CACHE_DIR") {
        return Ok(dir);
    }
    if let Some(dir) = nonempty("XDG_CACHE_HOME") {
        return Ok(dir.join("profiler"));
    }
    match nonempty("HOME") {
        Some(home) => Ok(home.join(".cache/profiler")),
        None => bail!("cannot choose a cache directory: set PROFILER_CACHE_DIR or HOME"),
    }
}

pub fn vm_dir(cache: &Path) -> PathBuf {
    cache.join("vm")
}

pub fn kernel_dir(vm_dir: &Path, series: &str) -> PathBuf {
    vm_dir.join(format!("kernel-{series}"))
}

pub fn vmlinuz(kernel_dir: &Path) -> PathBuf {
    kernel_dir.join("vmlinuz")
}

/// Holds the kernel's release; written last, once the kernel is installed completely.
pub fn release_file(kernel_dir: &Path) -> PathBuf {
    kernel_dir.join("release")
}

pub fn virtme_ng_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("virtme-ng")
}

pub fn vng_in(vm_dir: &Path) -> PathBuf {
    virtme_ng_dir(vm_dir).join("bin/vng")
}

/// The release and vmlinuz of a cached series, if it was installed completely.
pub fn cached(series: &str) -> Result<Option<(String, PathBuf)>> {
    let kdir = kernel_dir(&vm_dir(&cache_dir()?), series);
    let (Ok(release), vmlinuz) = (std::fs::read_to_string(release_file(&kdir)), vmlinuz(&kdir))
    else {
        return Ok(None);
    };
    Ok(vmlinuz
        .exists()
        .then(|| (release.trim().to_string(), vmlinuz)))
}

/// The guest kernel for `choice` (a series, or the path of a bzImage; None: the newest cached
/// series): its release (for a path, the file's name) and its image. One line saying which
/// `cargo xtask` command provisions it when it is not cached.
pub fn kernel(choice: Option<&str>) -> Result<(String, PathBuf)> {
    let provision = |s: &str| format!("cargo xtask vm --kernel {s} -- true");
    match choice {
        None => {
            for s in SERIES {
                if let Some(k) = cached(s)? {
                    return Ok(k);
                }
            }
            bail!("no VM kernel is provisioned: run {}", provision(SERIES[1]))
        }
        Some(s) if SERIES.contains(&s) => match cached(s)? {
            Some(k) => Ok(k),
            None => bail!("kernel {s} is not provisioned: run {}", provision(s)),
        },
        Some(path) => {
            let p = Path::new(path);
            if !p.is_file() {
                bail!(
                    "--guest-kernel {path}: neither {} nor a kernel image",
                    SERIES.join(" nor ")
                );
            }
            let name = p.file_name().map_or(path.into(), |n| n.to_string_lossy());
            Ok((name.into_owned(), p.to_path_buf()))
        }
    }
}

/// virtme-ng's vng, or one line saying how to install it.
pub fn vng() -> Result<PathBuf> {
    let vng = vng_in(&vm_dir(&cache_dir()?));
    if !vng.is_file() {
        bail!(
            "virtme-ng is not installed ({}): run cargo xtask vm --kernel 6.1 -- true",
            vng.display()
        );
    }
    Ok(vng)
}
