//! The command reference, man pages and shell completions are generated from the CLI's own
//! definitions (`profiler reference DIR`, which `cargo xtask docs` runs): docs/reference.md
//! must be what the code generates now, every command must have its man page, and the bash
//! completion script must parse. Needs no privileges and no eBPF.
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

const BIN: &str = env!("CARGO_BIN_EXE_profiler");

/// A directory of the test's own, removed however the test ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `profiler reference` into a directory named after `test` (tests run side by side).
fn generated(test: &str) -> Scratch {
    let dir = Scratch(
        std::env::temp_dir().join(format!("profiler-reference-{test}-{}", std::process::id())),
    );
    let out = Command::new(BIN)
        .arg("reference")
        .arg(&dir.0)
        .output()
        .expect("running the profiler binary");
    assert!(
        out.status.success(),
        "profiler reference: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

#[test]
fn the_reference_in_docs_is_what_the_code_generates() {
    let dir = generated("docs");
    let now = std::fs::read_to_string(dir.0.join("reference.md")).expect("reference.md written");
    let kept = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference.md");
    let kept = std::fs::read_to_string(&kept).expect("docs/reference.md");
    if kept != now {
        let first = kept
            .lines()
            .zip(now.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(kept.lines().count().min(now.lines().count()));
        panic!(
            "docs/reference.md is stale (first difference at line {}): run `cargo xtask docs`",
            first + 1
        );
    }
    // Hidden commands stay out of it.
    for hidden in ["profiler floor", "profiler reference"] {
        assert!(
            !now.contains(&format!("`{hidden}`")),
            "{hidden} is in the reference"
        );
    }
}

#[test]
fn every_command_has_a_man_page_and_completions_parse() {
    let dir = generated("man");
    let man = dir.0.join("man");
    for page in [
        "profiler.1",
        "profiler-run.1",
        "profiler-attach.1",
        "profiler-lab-up.1",
        "profiler-report.1",
        "profiler-agent.1",
    ] {
        let text =
            std::fs::read_to_string(man.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is not a man page"
        );
    }
    assert!(
        !man.join("profiler-floor.1").exists(),
        "a hidden command has a man page"
    );
    let bash = dir.0.join("completions/profiler.bash");
    let status = Command::new("bash")
        .arg("-n")
        .arg(&bash)
        .status()
        .expect("running bash");
    assert!(status.success(), "{} does not parse", bash.display());
    let text = std::fs::read_to_string(&bash).unwrap();
    assert!(
        text.contains("--peer") && text.contains("--wire"),
        "attach's options are completed"
    );
}
