//! `cargo xtask setup`: everything the build and the tests need, installed idempotently.
//! Each step checks first and prints one line; a second run only checks.
use crate::cmd::{self, quiet, step};
use anyhow::{bail, Context as _, Result};
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Runs all setup steps, then puts bpf-linker on PATH for the child commands of this process.
pub fn run() -> Result<()> {
    debian_packages()?;
    nightly()?;
    clippy()?;
    let linker_bin = bpf_linker(&cache_dir()?)?;
    let path = env::var_os("PATH").unwrap_or_default();
    let path = env::join_paths(std::iter::once(linker_bin).chain(env::split_paths(&path)))
        .context("building PATH")?;
    // Single-threaded at this point; every child (cargo, aya-build) inherits it.
    env::set_var("PATH", path);
    Ok(())
}

/// $PROFILER_CACHE_DIR, else $XDG_CACHE_HOME/profiler, else $HOME/.cache/profiler.
pub fn cache_dir() -> Result<PathBuf> {
    crate::vm_cache::cache_dir()
}

pub fn dpkg_installed(pkg: &str) -> bool {
    quiet(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.trim() == "install ok installed")
}

fn apt_has_candidate(pkg: &str) -> bool {
    quiet(Command::new("apt-cache").args(["show", "--no-all-versions", pkg]))
        .is_some_and(|s| !s.trim().is_empty())
}

fn apt_get(args: &[&str]) -> Result<()> {
    cmd::run(
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Installs Debian package `pkg` if it is not (for the tasks that need it).
pub fn debian_package(pkg: &str) -> Result<()> {
    if dpkg_installed(pkg) {
        step(format_args!("Debian package {pkg}: already installed"));
        return Ok(());
    }
    step(format_args!("Debian package {pkg}: installing"));
    apt_get(&["update"])?;
    apt_get(&["install", "-y", "--no-install-recommends", pkg])
}

/// Debian's package with dpdk-testpmd, the userspace datapath of the dpdk lab (`dpdk` itself
/// has only scripts). The lab says the same when it is missing.
pub const DPDK_PACKAGE: &str = "dpdk-dev";

/// What the tests need besides the build's packages: dpdk-testpmd for tests/dpdk.rs, iperf3
/// (the stream tests' reference, and the workload of `attach -- COMMAND`'s test), chromium
/// (the bench test loads bench's HTML page in it, headless), and the node lab's runtime
/// (tests/node.rs): containerd, runc, the CNI plugins, busybox-static (its images), gcc and
/// libc6-dev (its static echo server) and iptables (what CNI plugins may use); prometheus (its
/// server and promtool: tests/pods.rs scrapes attach and checks deploy's rules and dashboard);
/// nftables (nft: tests/service.rs's Services in kube-proxy's nftables mode).
pub fn test_packages() -> Result<()> {
    const NODE_PACKAGES: [&str; 7] = [
        "containerd",
        "runc",
        "containernetworking-plugins",
        "busybox-static",
        "gcc",
        "libc6-dev",
        "iptables",
    ];
    // openssl: tests/agent.rs speaks to the agent with a TLS client that is not the profiler.
    for pkg in [
        DPDK_PACKAGE,
        "iperf3",
        "chromium",
        "prometheus",
        "openssl",
        "nftables",
    ]
    .into_iter()
    .chain(NODE_PACKAGES)
    {
        debian_package(pkg)?;
    }
    Ok(())
}

/// iproute2 (`ip netns`, for users and tests), bpftool (the tests' leak check), iputils-ping
/// (the benchmark's untagged background traffic) and protobuf-compiler (k8s-cri's build
/// generates the CRI client with protoc).
fn debian_packages() -> Result<()> {
    const PLAIN: [&str; 3] = ["iproute2", "iputils-ping", "protobuf-compiler"];
    let have_bpftool = dpkg_installed("bpftool") || Path::new("/usr/sbin/bpftool").exists();
    let mut missing: Vec<&str> = PLAIN.into_iter().filter(|p| !dpkg_installed(p)).collect();
    if !have_bpftool {
        missing.push("bpftool");
    }
    if missing.is_empty() {
        step(
            "Debian packages iproute2, bpftool, iputils-ping, protobuf-compiler: already installed",
        );
        return Ok(());
    }
    step(format_args!(
        "Debian packages: installing {}",
        missing.join(", ")
    ));
    if !cmd::is_root() {
        bail!(
            "Debian packages {} are missing and installing them needs root",
            missing.join(", ")
        );
    }
    apt_get(&["update"])?;
    let mut install: Vec<String> = missing.iter().map(|p| p.to_string()).collect();
    if !have_bpftool && !apt_has_candidate("bpftool") {
        // Older Debian releases ship bpftool in another package: ask apt which one.
        let found =
            cmd::output(Command::new("apt-cache").args(["search", "--names-only", "bpftool"]))?;
        let Some(pkg) = found
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .next()
        else {
            bail!("no Debian package provides bpftool here (`apt-cache search bpftool` found nothing)");
        };
        install.retain(|p| p != "bpftool");
        install.push(pkg.to_string());
    }
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(install.iter().map(String::as_str));
    apt_get(&args)?;
    if !Path::new("/usr/sbin/bpftool").exists()
        && quiet(Command::new("bpftool").arg("version")).is_none()
    {
        bail!(
            "installed {} but bpftool is still not available",
            install.join(", ")
        );
    }
    Ok(())
}

fn nightly_output(args: &[&str]) -> Result<String> {
    cmd::output(
        Command::new("rustup")
            .args(["run", "nightly", "rustc"])
            .args(args),
    )
}

/// Clippy for the workspace's toolchain: `cargo xtask test` lints with it.
fn clippy() -> Result<()> {
    if quiet(Command::new("cargo").args(["clippy", "--version"])).is_some() {
        step("clippy: already installed");
        return Ok(());
    }
    step("clippy: adding the component");
    cmd::run(Command::new("rustup").args(["component", "add", "clippy"]))
}

/// The `nightly` toolchain (aya-build builds the eBPF crate with it) and its rust-src.
fn nightly() -> Result<()> {
    if quiet(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])).is_none() {
        bail!(
            "the rustup toolchain `nightly` is missing or broken (`rustup run nightly rustc --version` failed); \
             the eBPF crate needs it: install it with `rustup toolchain install nightly`"
        );
    }
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        step("nightly toolchain with rust-src: already installed");
        return Ok(());
    }
    step("nightly toolchain: adding rust-src");
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

/// bpf-linker built against the nightly's own libLLVM, cached in CACHE/bpf-linker.
/// Returns the directory holding the binary.
fn bpf_linker(cache: &Path) -> Result<PathBuf> {
    let root = cache.join("bpf-linker");
    let bin_dir = root.join("bin");
    let linker = bin_dir.join("bpf-linker");
    if let Some(v) = quiet(Command::new(&linker).arg("--version")) {
        step(format_args!(
            "{}: already built ({})",
            linker.display(),
            v.trim()
        ));
        return Ok(bin_dir);
    }
    step(format_args!(
        "building bpf-linker {BPF_LINKER_VERSION} into {} against the nightly's libLLVM (a few minutes, once)",
        root.display()
    ));
    let (lib, major) = nightly_llvm()?;
    // llvm-sys looks for lib/libLLVM.so under LLVM_PREFIX; the binary's RUNPATH points at this
    // directory and finds the full soname there, so it must stay in the cache, not in /tmp.
    let prefix = cache.join("llvm");
    let lib_dir = prefix.join("lib");
    std::fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    let soname = lib.file_name().context("libLLVM path has no file name")?;
    for name in [Path::new("libLLVM.so"), Path::new(soname)] {
        symlink(&lib, &lib_dir.join(name))?;
    }
    let mut install = Command::new("cargo");
    install
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &prefix)
        // Build in a temporary directory, not in this workspace's target directory.
        .env_remove("CARGO_TARGET_DIR");
    cmd::run(&mut install)?;
    match quiet(Command::new(&linker).arg("--version")) {
        Some(_) => Ok(bin_dir),
        None => bail!(
            "{} was installed but `bpf-linker --version` fails",
            linker.display()
        ),
    }
}

/// The nightly's shared libLLVM (SYSROOT/lib/libLLVM.so.22.1-rust-...-nightly) and its LLVM major.
fn nightly_llvm() -> Result<(PathBuf, String)> {
    let verbose = nightly_output(&["-vV"])?;
    let major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .filter(|m| !m.is_empty() && m.chars().all(|c| c.is_ascii_digit()))
        .context("`rustup run nightly rustc -vV` shows no LLVM version")?
        .to_string();
    let sysroot = PathBuf::from(nightly_output(&["--print", "sysroot"])?.trim());
    let lib_dir = sysroot.join("lib");
    let entries =
        std::fs::read_dir(&lib_dir).with_context(|| format!("reading {}", lib_dir.display()))?;
    for entry in entries {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("libLLVM") && name.contains("-rust-") {
            return Ok((lib_dir.join(&*name), major));
        }
    }
    bail!(
        "the nightly toolchain ships no shared libLLVM in {}",
        lib_dir.display()
    )
}

/// Makes `link` a symlink to `target`, replacing whatever was there.
fn symlink(target: &Path, link: &Path) -> Result<()> {
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(link).with_context(|| format!("removing {}", link.display()))?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}
