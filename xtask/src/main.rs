//! Developer tasks for the profiler workspace. The README's quick start is
//! `cargo xtask demo` and `cargo xtask test`; both install what they need first.
mod cmd;
mod costs;
mod fuzz;
mod netpeer;
mod overhead;
mod setup;
mod test;
mod vm;
/// The VM lab's cache layout, shared with the nested labs that find their guests' kernels in it
/// (their lookups are the lab's, unused here).
#[allow(dead_code)]
#[path = "../../profiler/src/lab/vm_cache.rs"]
mod vm_cache;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use cmd::step;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

#[derive(Parser)]
#[command(about = "Developer tasks for the profiler workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (Debian packages, nightly rust-src, bpf-linker).
    Setup,
    /// Setup, then build the profiler (userspace and eBPF) in release mode.
    Build,
    /// Setup, build, then write the command reference (docs/reference.md), and the man pages
    /// and shell completions (into OUT), all generated from the CLI's definitions.
    Docs {
        /// Where the man pages (man/) and completions (completions/) go.
        #[arg(long, default_value = "target/docs")]
        out: PathBuf,
    },
    /// Setup, then run all tests as root and check that nothing leaked.
    Test {
        /// After `--`: arguments for `cargo test`; a second `--` starts the test harness's own.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the property tests (packet parser, filter compiler, ring decoders) with many cases.
    Fuzz {
        /// Cases per property test (`cargo test` runs 1000 or 2000).
        #[arg(long, default_value_t = 100_000)]
        cases: u32,
        /// After `--`: arguments for the test harness (default `prop_`, every property test).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build, then profile UDP through the bridge lab and tear the lab down.
    Demo,
    /// Setup, build, then measure the eBPF programs' kernel cost per invocation for tagged and
    /// untagged packets (`profiler bench` is the study's experiments, a different thing).
    Costs,
    /// Setup, build, then measure what `profiler attach` costs TCP throughput and latency on the
    /// bridge and flannel-vxlan labs, side by side with no profiler.
    Overhead {
        /// Also write everything measured as JSON to FILE.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Run a command as root in a VM on a stock Debian kernel (QEMU TCG, virtme-ng), in the
    /// workspace root, installing what that needs first; exits with the command's status.
    Vm {
        #[arg(long)]
        kernel: vm::Series,
        /// Guest memory, in QEMU's -m syntax.
        #[arg(long, default_value = "2G")]
        memory: String,
        /// Emulated NICs for the guest (`igb`: two SR-IOV capable Intel 82576 on one QEMU
        /// hub, for the `sriov` lab); the guest then boots as a PCI machine, not a microvm.
        #[arg(long)]
        nic: Option<vm::Nic>,
        /// Also show the guest kernel's console (boot messages, panics).
        #[arg(long)]
        verbose: bool,
        /// After `--`: the command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Setup, build, then run the `vm` test target's tests (the ignored ones) in a VM on a stock
    /// Debian kernel; exits with the tests' status.
    VmTest {
        #[arg(long)]
        kernel: vm::Series,
        /// After `--`: arguments for the test harness.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The overhead benchmark's TCP peer, run inside a lab namespace.
    #[command(hide = true)]
    NetPeer {
        #[command(subcommand)]
        role: PeerRole,
    },
}

#[derive(Subcommand)]
enum PeerRole {
    Serve {
        addr: std::net::SocketAddr,
    },
    Stream {
        addr: std::net::SocketAddr,
        #[arg(long)]
        seconds: f64,
    },
    Rr {
        addr: std::net::SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// Paced small UDP datagrams.
    Udp {
        addr: std::net::SocketAddr,
        #[arg(long)]
        pps: u64,
        #[arg(long)]
        seconds: f64,
        /// Sending threads, each with its own socket and an equal share of the rate.
        #[arg(long, default_value_t = 1)]
        threads: u64,
    },
    Quit {
        addr: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // The error chain on one line, without a backtrace even when RUST_BACKTRACE is set.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    std::env::set_current_dir(workspace_root()).context("entering the workspace root")?;
    let done = match cli.task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            let bin = build()?;
            println!("{}", bin.display());
            Ok(())
        }
        Task::Docs { out } => {
            setup::run()?;
            docs(&build()?, &out)
        }
        Task::Test { args } => test::run(&args),
        Task::Fuzz { cases, args } => fuzz::run(cases, &args),
        Task::Demo => demo(),
        Task::Costs => {
            require_root("costs")?;
            setup::run()?;
            costs::run(&build()?)
        }
        Task::Overhead { json } => {
            require_root("overhead")?;
            setup::run()?;
            setup::debian_package("bpftrace")?;
            overhead::run(&build()?, json.as_deref())
        }
        Task::NetPeer { role } => match role {
            PeerRole::Serve { addr } => netpeer::serve(addr),
            PeerRole::Stream { addr, seconds } => netpeer::stream(addr, seconds),
            PeerRole::Rr { addr, count } => netpeer::rr(addr, count),
            PeerRole::Udp {
                addr,
                pps,
                seconds,
                threads,
            } => netpeer::udp(addr, pps, seconds, threads),
            PeerRole::Quit { addr } => netpeer::quit(addr),
        },
        // These exit with the guest command's status.
        Task::Vm {
            kernel,
            memory,
            nic,
            verbose,
            command,
        } => return vm::run(kernel, &memory, nic, verbose, &command).map(ExitCode::from),
        Task::VmTest { kernel, args } => return vm::test(kernel, &args).map(ExitCode::from),
    };
    done.map(|()| ExitCode::SUCCESS)
}

/// `profiler reference OUT`, then its reference.md kept as docs/reference.md.
fn docs(bin: &Path, out: &Path) -> Result<()> {
    step(format!("profiler reference {}", out.display()));
    cmd::run(Command::new(bin).arg("reference").arg(out))?;
    let reference = workspace_root().join("docs/reference.md");
    std::fs::copy(out.join("reference.md"), &reference)
        .with_context(|| format!("copying the reference to {}", reference.display()))?;
    println!(
        "{} written; man pages in {}/man, completions in {}/completions",
        reference.display(),
        out.display(),
        out.display()
    );
    Ok(())
}

fn require_root(task: &str) -> Result<()> {
    cmd::require_root(task, "creates network namespaces and loads eBPF programs")
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
}

/// $CARGO_TARGET_DIR if set, else the workspace's target/.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Builds the profiler in release mode (profiler/build.rs builds the eBPF object) and returns
/// the binary's path.
fn build() -> Result<PathBuf> {
    step("cargo build --release --package profiler");
    cmd::run(Command::new("cargo").args(["build", "--release", "--package", "profiler"]))?;
    Ok(target_dir().join("release/profiler"))
}

fn demo() -> Result<()> {
    require_root("demo")?;
    setup::run()?;
    let profiler = build()?;
    // The run brings the bridge lab up and, having created it, removes it again, also on
    // failure or Ctrl-C.
    step("profiler run --lab bridge --proto udp --size 64 --count 2000");
    cmd::run(Command::new(&profiler).args([
        "run", "--lab", "bridge", "--proto", "udp", "--size", "64", "--count", "2000",
    ]))
}
