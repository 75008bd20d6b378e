//! Builds profiler-ebpf for the BPF target (with the nightly, through aya-build) and leaves the
//! object in OUT_DIR for `include_bytes_aligned!`. With AYA_BUILD_SKIP=1 an empty object is left
//! instead, and the loader says so at run time.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    commit();
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("profiler");
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        std::fs::write(&out, b"").context("writing the empty eBPF object")?;
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../profiler-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "profiler-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// PROFILER_COMMIT: the commit the binary is built from (`git describe --always --dirty`;
/// empty outside a checkout), which reports record. Built again when a commit, a checkout or
/// an add changes the repository (an edit not added yet does not).
fn commit() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let commit = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=PROFILER_COMMIT={commit}");
    for file in [".git/HEAD", ".git/index", ".git/refs", ".git/packed-refs"] {
        let path = std::path::Path::new(root).join(file);
        // A path that does not exist would make cargo run this script at every build.
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
