//! `cargo xtask vm` and `cargo xtask vm-test`: a stock Debian kernel (bookworm's 6.1 or
//! bookworm-backports' 6.12) booted by virtme-ng under QEMU's TCG, with the host's root as the
//! guest's (read-only, writable overlays on /etc, /usr, /var, /tmp). This machine's /dev/kvm
//! cannot run a stock kernel, hence --disable-kvm (shared/kernel-lab.md).
//!
//! What the guest needs is installed idempotently and cached in CACHE/vm/; each step checks
//! first and prints one line, so a second run only checks.
use crate::cmd::{self, quiet, step};
use crate::setup;
use crate::vm_cache;
use anyhow::{bail, Context as _, Result};
use clap::ValueEnum;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;

const VIRTME_NG_VERSION: &str = "1.42";
/// Guest memory for vm-test; enough for the labs, and TCG gains nothing from more.
const TEST_MEMORY: &str = "2G";
/// The VM suite's NICs: the sriov lab's VFs, and a driver the curated hooks do not list.
const TEST_NIC: Option<Nic> = Some(Nic::Igb);
/// The VM suite takes 10-15 minutes under TCG: a test that hangs is stopped well inside CI's
/// 90 minutes, and says so, instead of hanging `cargo xtask test`.
const TEST_TIMEOUT_MINUTES: u32 = 45;
/// Modules the labs and tests use, loaded before the command so a missing one shows up as one
/// line up front rather than as a test failure deep inside a lab.
const GUEST_MODULES: &str = "veth bridge vxlan macvlan macvtap ipvlan geneve ip_gre gre \
     openvswitch sch_netem sch_htb cls_u32 act_mirred 8021q ifb tun";
/// Debian packages for the VM from bookworm: udev and busybox-static for virtme-ng's init and
/// initramfs, kmod for modules, python3-venv for virtme-ng's venv, the rest for the labs.
const PACKAGES: [&str; 9] = [
    "kmod",
    "udev",
    "busybox-static",
    "python3-venv",
    "openvswitch-switch",
    "iproute2",
    "iputils-ping",
    "ethtool",
    "bpftool",
];
/// From bookworm-backports: bookworm's QEMU 7.2 conflicts with the preinstalled qemu-utils 10.
const QEMU_PACKAGE: &str = "qemu-system-x86";
const BACKPORTS: &str = "bookworm-backports";

/// An emulated NIC the guest can have besides virtme-ng's own devices.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Nic {
    /// Two Intel 82576 (QEMU's `igb`, SR-IOV capable, 7 VFs each) on one QEMU hub, each behind
    /// a PCIe root port: the PFs are joined as by a switch, and the VFs of one PF are switched
    /// by that NIC (the `sriov` lab).
    Igb,
}

impl Nic {
    /// QEMU options for the NICs. PCIe root ports need a PCI machine: vng's microvm has none.
    fn qemu_opts(self) -> String {
        match self {
            Nic::Igb => (0..2)
                .map(|i| {
                    let n = i + 1;
                    format!(
                        "-device pcie-root-port,id=rp{i},slot={n},chassis={n} \
                         -netdev hubport,id=igb{i},hubid=0 -device igb,bus=rp{i},netdev=igb{i}"
                    )
                })
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    /// The guest's drivers for the NIC (the PF's and the VFs').
    fn modules(self) -> &'static str {
        match self {
            Nic::Igb => "igb igbvf",
        }
    }
}

/// A Debian kernel series the VM can boot.
#[derive(Clone, Copy, ValueEnum)]
pub enum Series {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
}

impl Series {
    fn name(self) -> &'static str {
        match self {
            Series::V6_1 => "6.1",
            Series::V6_12 => "6.12",
        }
    }

    /// The suite whose linux-image-amd64 depends on this series' image.
    fn suite(self) -> &'static str {
        match self {
            Series::V6_1 => "bookworm",
            Series::V6_12 => BACKPORTS,
        }
    }
}

impl fmt::Display for Series {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `cargo xtask vm`: runs `command` as root in a guest on `series`, in the workspace root;
/// returns its exit status.
pub fn run(
    series: Series,
    memory: &str,
    nic: Option<Nic>,
    verbose: bool,
    command: &[String],
) -> Result<u8> {
    require_root("vm")?;
    let vm = provision(series).context("vm")?;
    let script = guest_script(&vm.release, nic, &[], command);
    let boot_opts = Boot {
        memory,
        nic,
        verbose,
    };
    boot(&vm, &boot_opts, Stdio::inherit(), &script).context("vm")
}

/// `cargo xtask vm-test`: setup, build, then the `vm` test target's ignored tests in one guest
/// on `series`; returns the harness's exit status.
pub fn test(series: Series, harness_args: &[String]) -> Result<u8> {
    require_root("vm-test")?;
    setup::run()?;
    let exe = build_tests().context("vm-test")?;
    run_tests(series, &exe, harness_args).context("vm-test")
}

/// The VM tests CI runs: one of each kind (the verifier and every deep hook, an OVS flow miss,
/// an OVS overlay, ipvlan, the eBPF redirect, a Service, recovery after a kill, SR-IOV), so that
/// CI stays within its 60 minutes. The whole suite (27 tests, 25 minutes on 6.1 under TCG
/// here) runs outside CI: `cargo xtask vm-test --kernel 6.1`, or `PROFILER_VM_SUITE=full`.
const SMOKE: [&str; 9] = [
    "boots_the_requested_kernel",
    "deep::every_deep_hook_passes_the_verifier_and_attaches",
    "deep::ovs_upcall_shows_as_its_own_path",
    "labs::ovs_vxlan_cross_host",
    "labs::ipvlan_l3_cross_host",
    "labs::ebpf_redirect_same_host",
    "labs::service_with_or_without_netfilter_links",
    "recovery::tc_filters_of_a_killed_run_are_removed_by_lab_down_all",
    "sriov::sriov_cross_host_crosses_the_wire",
];

/// Which VM tests `cargo xtask test` runs.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Suite {
    Full,
    Smoke,
}

impl Suite {
    /// $PROFILER_VM_SUITE (`full` or `smoke`); by default the smoke subset under CI=true, else
    /// the whole suite.
    pub fn from_env() -> Result<Suite> {
        match std::env::var("PROFILER_VM_SUITE").as_deref() {
            Ok("full") => Ok(Suite::Full),
            Ok("smoke") => Ok(Suite::Smoke),
            Ok(other) => bail!("PROFILER_VM_SUITE: {other:?} is neither full nor smoke"),
            Err(_) if std::env::var("CI").as_deref() == Ok("true") => Ok(Suite::Smoke),
            Err(_) => Ok(Suite::Full),
        }
    }
}

/// The harness arguments that pick the smoke subset, after checking that each of its names is
/// a test of `exe` (a renamed test must not drop out of CI unseen).
fn smoke_args(exe: &Path) -> Result<Vec<String>> {
    let list = cmd::output(Command::new(exe).args(["--list", "--ignored"]))?;
    let tests: Vec<&str> = list
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .collect();
    let missing: Vec<&str> = SMOKE
        .iter()
        .copied()
        .filter(|t| !tests.contains(t))
        .collect();
    if !missing.is_empty() {
        bail!("the VM smoke subset names tests that tests/vm.rs lacks: {missing:?}");
    }
    println!(
        "VM tests: the smoke subset, {} of {} (the whole suite: PROFILER_VM_SUITE=full, or \
         cargo xtask vm-test --kernel 6.1)",
        SMOKE.len(),
        tests.len()
    );
    let mut args = vec!["--exact".to_string()];
    args.extend(SMOKE.iter().map(|t| t.to_string()));
    Ok(args)
}

/// The `vm` test target's ignored tests (all, or the smoke subset) in a guest on each of
/// `kernels`, for `cargo xtask test` (which has run setup already). Fails if any run fails.
pub fn test_kernels(kernels: &[Series], suite: Suite, harness_args: &[String]) -> Result<()> {
    let exe = build_tests().context("VM tests")?;
    let harness_args = match suite {
        Suite::Smoke if harness_args.is_empty() => smoke_args(&exe)?,
        _ => harness_args.to_vec(),
    };
    let mut failed = Vec::new();
    for &series in kernels {
        let status = run_tests(series, &exe, &harness_args)
            .with_context(|| format!("VM tests on kernel {series}"))?;
        if status != 0 {
            failed.push(format!("{series} (exit status {status})"));
        }
    }
    if !failed.is_empty() {
        bail!("VM tests failed on kernel {}", failed.join(", "));
    }
    Ok(())
}

fn require_root(task: &str) -> Result<()> {
    cmd::require_root(task, "installs Debian packages and kernel modules")
}

/// Builds the profiler and the `vm` test target; returns the test executable.
fn build_tests() -> Result<PathBuf> {
    crate::build()?;
    let mut build = Command::new("cargo");
    build.args([
        "test",
        "--release",
        "--package",
        "profiler",
        "--test",
        "vm",
        "--no-run",
        "--message-format=json",
    ]);
    step(cmd::describe(&build));
    test_executable(&cmd::output(&mut build)?)
}

/// The `vm` test executable named in cargo's JSON messages.
fn test_executable(messages: &str) -> Result<PathBuf> {
    for line in messages.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "vm" {
            if let Some(exe) = msg["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    bail!("cargo built no executable for the test target `vm`")
}

fn run_tests(series: Series, exe: &Path, harness_args: &[String]) -> Result<u8> {
    let vm = provision(series)?;
    let mut command = vec![
        "timeout".into(),
        "--kill-after=60".into(),
        format!("{}m", TEST_TIMEOUT_MINUTES),
        exe.to_string_lossy().into_owned(),
        "--ignored".into(),
        "--test-threads=1".into(),
    ];
    command.extend_from_slice(harness_args);
    step(format_args!(
        "VM tests on kernel {}: {}",
        vm.release,
        command.join(" ")
    ));
    let script = guest_script(&vm.release, TEST_NIC, &[("RUST_BACKTRACE", "1")], &command);
    let boot_opts = Boot {
        memory: TEST_MEMORY,
        nic: TEST_NIC,
        verbose: false,
    };
    // The tests read no input, and a terminal on stdin must not be QEMU's.
    let status = boot(&vm, &boot_opts, Stdio::null(), &script)?;
    if status == 124 {
        eprintln!(
            "vm: the tests did not finish within {TEST_TIMEOUT_MINUTES} minutes and were stopped"
        );
    }
    Ok(status)
}

/// What booting a guest needs, all in place.
pub struct Vm {
    /// The kernel release, e.g. 6.1.0-50-amd64.
    release: String,
    vmlinuz: PathBuf,
    vng: PathBuf,
}

/// Everything a guest on `series` needs; also for the nested labs' tests, before they run.
pub fn provision(series: Series) -> Result<Vm> {
    let dir = vm_cache::vm_dir(&setup::cache_dir()?);
    let mut apt = Apt::new(&dir);
    packages(&mut apt)?;
    let (release, vmlinuz) = kernel(&mut apt, &dir, series)?;
    let vng = virtme_ng(&dir)?;
    Ok(Vm {
        release,
        vmlinuz,
        vng,
    })
}

/// How a guest is booted.
struct Boot<'a> {
    memory: &'a str,
    nic: Option<Nic>,
    /// Show the guest kernel's console.
    verbose: bool,
}

/// Boots the guest and runs `script` in it; returns the script's exit status, which vng
/// propagates (255 if the guest died before reporting one). The guest's stdin is `stdin`.
fn boot(vm: &Vm, opts: &Boot, stdin: Stdio, script: &str) -> Result<u8> {
    // virtme-ng puts the script in the kernel's command line, which x86 cuts at 2048 bytes
    // (a cut script leaves the guest's shell waiting for the rest): the guest reads it from a
    // file instead, through its view of this machine's /tmp.
    let file = std::env::temp_dir().join(format!("profiler-vm-{}.sh", std::process::id()));
    fs::write(&file, script).with_context(|| format!("writing {}", file.display()))?;
    let status = boot_script(vm, opts, stdin, &format!("sh {}", file.display()));
    let _ = fs::remove_file(&file);
    status
}

fn boot_script(vm: &Vm, opts: &Boot, stdin: Stdio, script: &str) -> Result<u8> {
    let memory = opts.memory;
    let mut vng = Command::new(&vm.vng);
    // vng runs the venv's virtme-run by name.
    let venv_bin = vm.vng.parent().context("vng has no directory")?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        std::iter::once(venv_bin.to_path_buf()).chain(std::env::split_paths(&path)),
    )
    .context("building PATH")?;
    vng.env("PATH", path)
        .args(["--disable-kvm", "--memory", memory, "--cpus", "2", "--run"])
        .arg(&vm.vmlinuz)
        .arg("--cwd")
        .arg(crate::workspace_root())
        .args(["--exec", script]);
    if opts.verbose {
        vng.arg("--verbose");
    }
    if let Some(nic) = opts.nic {
        // `=`: an option value that starts with `-` would be taken for an option.
        vng.arg("--disable-microvm")
            .arg(format!("--qemu-opts={}", nic.qemu_opts()));
    }
    step(format_args!(
        "booting {} under QEMU TCG with virtme-ng ({memory}, 2 CPUs)",
        vm.release
    ));
    let status =
        run_piped(vng.stdin(stdin)).with_context(|| format!("running {}", vm.vng.display()))?;
    let Some(code) = status.code() else {
        bail!("vng was killed ({status})");
    };
    if code == 255 {
        eprintln!(
            "vm: exit status 255: if the command did not exit with it, the guest died first \
             (kernel panic, out of memory); --verbose shows the guest's console"
        );
    }
    Ok(u8::try_from(code).unwrap_or(u8::MAX))
}

/// Runs `cmd` with its stdout and stderr piped through this process's. QEMU opens the guest's
/// output as files (/proc/self/fd/1, 2) and would truncate and overwrite a log that stdout is
/// redirected to; pipes keep what was printed before.
fn run_piped(cmd: &mut Command) -> std::io::Result<ExitStatus> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let out = child
        .stdout
        .take()
        .map(|o| thread::spawn(move || forward(o, io::stdout())));
    let err = child
        .stderr
        .take()
        .map(|e| thread::spawn(move || forward(e, io::stderr())));
    let status = child.wait()?;
    for copier in out.into_iter().chain(err) {
        copier
            .join()
            .expect("copying the guest's output panicked")?;
    }
    Ok(status)
}

/// Copies `from` to `to` as it comes, partial lines included (a test's name shows while it runs).
fn forward(mut from: impl Read, mut to: impl Write) -> io::Result<()> {
    let mut buf = [0; 8192];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                to.write_all(&buf[..n])?;
                to.flush()?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The guest's shell script: modules (the NIC's drivers too), the filesystems the profiler and
/// the labs use, then `command` with `env` and PROFILER_VM_KERNEL (the release the host asked
/// for).
fn guest_script(
    release: &str,
    nic: Option<Nic>,
    env: &[(&str, &str)],
    command: &[String],
) -> String {
    let modules = match nic {
        Some(nic) => format!("{GUEST_MODULES} {}", nic.modules()),
        None => GUEST_MODULES.to_string(),
    };
    let mut exports = format!("export PROFILER_VM_KERNEL={}\n", shell_quote(release));
    for (name, value) in env {
        exports.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }
    let command: Vec<String> = command.iter().map(|a| shell_quote(a)).collect();
    format!(
        "missing=
modprobe -q -a {modules}
for m in {modules}; do [ -d /sys/module/$m ] || missing=\"$missing $m\"; done
[ -z \"$missing\" ] || echo \"vm: kernel $(uname -r) could not load:$missing\" >&2
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug
mkdir -p /run/netns
{exports}exec {}
",
        command.join(" ")
    )
}

/// `s` as one POSIX shell word.
fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// apt-get and apt-cache on a private source list (bookworm and bookworm-backports from the
/// system's Debian mirror) and private package lists: the system's apt sources stay untouched.
/// The lists are fetched at most once per run, and only when something needs them.
struct Apt {
    dir: PathBuf,
    updated: bool,
}

impl Apt {
    fn new(vm_dir: &Path) -> Apt {
        Apt {
            dir: vm_dir.join("apt"),
            updated: false,
        }
    }

    /// `prog` (apt-get or apt-cache) with the private sources, lists fetched first.
    fn command(&mut self, prog: &str) -> Result<Command> {
        if !self.updated {
            self.update()?;
        }
        Ok(self.raw_command(prog))
    }

    fn raw_command(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        let opt = |name: &str, value: &Path| format!("{name}={}", value.display());
        c.arg("-o")
            .arg(opt("Dir::Etc::SourceList", &self.dir.join("sources.list")))
            .args(["-o", "Dir::Etc::SourceParts=/nonexistent"])
            .arg("-o")
            .arg(opt("Dir::State::Lists", &self.dir.join("lists")))
            // The system's binary caches describe the system's lists, not these.
            .args([
                "-o",
                "Dir::Cache::pkgcache=",
                "-o",
                "Dir::Cache::srcpkgcache=",
            ])
            // The cache is root's: apt's sandbox user could not write the lists there.
            .args(["-o", "APT::Sandbox::User=root"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    fn update(&mut self) -> Result<()> {
        let mirror = debian_mirror();
        step(format_args!(
            "apt lists for bookworm and {BACKPORTS} from {mirror}: fetching into {}",
            self.dir.display()
        ));
        let lists = self.dir.join("lists/partial");
        fs::create_dir_all(&lists).with_context(|| format!("creating {}", lists.display()))?;
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let sources: String = ["bookworm", BACKPORTS]
            .iter()
            .map(|suite| format!("deb [signed-by={keyring}] {mirror} {suite} main\n"))
            .collect();
        let list = self.dir.join("sources.list");
        fs::write(&list, sources).with_context(|| format!("writing {}", list.display()))?;
        cmd::run(
            self.raw_command("apt-get")
                .args(["-qq", "--error-on=any", "update"]),
        )
        .context("fetching the apt lists")?;
        self.updated = true;
        Ok(())
    }
}

/// The Debian mirror the system's apt sources use for bookworm, else deb.debian.org.
fn debian_mirror() -> String {
    let mut texts = Vec::new();
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "sources") {
                texts.extend(fs::read_to_string(entry.path()).ok());
            }
        }
    }
    texts.extend(fs::read_to_string("/etc/apt/sources.list").ok());
    texts
        .iter()
        .find_map(|t| bookworm_uri(t))
        .unwrap_or_else(|| "http://deb.debian.org/debian".into())
}

/// The URI of the first `deb` source for suite bookworm in an apt sources text, either
/// one-line style (`deb [opts] URI SUITE COMPONENTS`) or deb822 style (paragraphs of fields).
fn bookworm_uri(text: &str) -> Option<String> {
    let mut uris = None;
    let mut suites = false;
    let mut deb = true;
    // A trailing blank line ends the last deb822 paragraph.
    for line in text.lines().chain([""]) {
        let line = line.trim();
        if line.is_empty() {
            if let (Some(u), true, true) = (uris.take(), suites, deb) {
                return Some(u);
            }
            (suites, deb) = (false, true);
        } else if let Some(words) = line.strip_prefix("deb ") {
            let words = strip_options(words);
            let mut words = words.split_whitespace();
            if let (Some(uri), Some("bookworm")) = (words.next(), words.next()) {
                return Some(uri.to_string());
            }
        } else if let Some((field, value)) = line.split_once(':') {
            let mut values = value.split_whitespace();
            match field.to_ascii_lowercase().as_str() {
                "uris" => uris = values.next().map(str::to_string),
                "suites" => suites = values.any(|s| s == "bookworm"),
                "types" => deb = values.any(|t| t == "deb"),
                _ => {}
            }
        }
    }
    None
}

/// A one-line source's words after `deb`, without its `[options]`.
fn strip_options(words: &str) -> &str {
    let words = words.trim_start();
    match words.strip_prefix('[').and_then(|w| w.split_once(']')) {
        Some((_, rest)) => rest,
        None => words,
    }
}

/// Whether `pkg` is installed; for bpftool, whether its binary is (older releases ship it in
/// another package, which `cargo xtask setup` may have installed).
fn installed(pkg: &str) -> bool {
    (pkg == "bpftool" && Path::new("/usr/sbin/bpftool").exists()) || setup::dpkg_installed(pkg)
}

/// QEMU from bookworm-backports and PACKAGES from bookworm, those not installed yet.
fn packages(apt: &mut Apt) -> Result<()> {
    let missing: Vec<&str> = std::iter::once(QEMU_PACKAGE)
        .chain(PACKAGES)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        step(format_args!(
            "Debian packages for the VM ({QEMU_PACKAGE}, {}): already installed",
            PACKAGES.join(", ")
        ));
        return Ok(());
    }
    step(format_args!(
        "Debian packages for the VM: installing {}",
        missing.join(", ")
    ));
    let _no_services = NoServices::new()?;
    let install = ["install", "-y", "--no-install-recommends"];
    if missing.contains(&QEMU_PACKAGE) {
        cmd::run(
            apt.command("apt-get")?
                .args(install)
                .args(["-t", BACKPORTS, QEMU_PACKAGE]),
        )
        .with_context(|| format!("installing {QEMU_PACKAGE} from {BACKPORTS}"))?;
    }
    let rest: Vec<&str> = missing.into_iter().filter(|p| *p != QEMU_PACKAGE).collect();
    if !rest.is_empty() {
        cmd::run(apt.command("apt-get")?.args(install).args(&rest))
            .with_context(|| format!("installing {}", rest.join(", ")))?;
    }
    Ok(())
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// A policy-rc.d that forbids starting services while it lives, unless the system has its own:
/// openvswitch-switch would otherwise start OVS's daemons on the host, which has no systemd and
/// no openvswitch module.
struct NoServices {
    created: bool,
}

impl NoServices {
    fn new() -> Result<NoServices> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(NoServices { created: false });
        }
        // 101: action forbidden by policy.
        fs::write(POLICY_RC_D, "#!/bin/sh\nexit 101\n")
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt as _;
                fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755))
            })
            .with_context(|| format!("writing {POLICY_RC_D}"))?;
        Ok(NoServices { created: true })
    }
}

impl Drop for NoServices {
    fn drop(&mut self) {
        if self.created {
            if let Err(e) = fs::remove_file(POLICY_RC_D) {
                eprintln!("vm: removing {POLICY_RC_D}: {e}");
            }
        }
    }
}

/// The series' kernel: vmlinuz in CACHE/vm/kernel-SERIES/, modules in /usr/lib/modules/.
/// Returns its release and its vmlinuz.
fn kernel(apt: &mut Apt, dir: &Path, series: Series) -> Result<(String, PathBuf)> {
    let kdir = vm_cache::kernel_dir(dir, series.name());
    let vmlinuz = vm_cache::vmlinuz(&kdir);
    // Written last, so its presence means the kernel was installed completely once.
    let release_file = vm_cache::release_file(&kdir);
    if let Ok(release) = fs::read_to_string(&release_file) {
        let release = release.trim().to_string();
        if vmlinuz.exists() && modules_dir(&release).join("modules.dep").exists() {
            step(format_args!(
                "kernel {series}: {release} already installed ({})",
                vmlinuz.display()
            ));
            return Ok((release, vmlinuz));
        }
    }
    let deb = match cached_deb(&kdir)? {
        Some(deb) => deb,
        None => download_kernel(apt, &kdir, series)?,
    };
    let release =
        install_kernel(&kdir, &deb).with_context(|| format!("installing {}", deb.display()))?;
    fs::write(&release_file, format!("{release}\n"))
        .with_context(|| format!("writing {}", release_file.display()))?;
    Ok((release, vmlinuz))
}

fn modules_dir(release: &str) -> PathBuf {
    Path::new("/usr/lib/modules").join(release)
}

/// The kernel package downloaded by an earlier run, if any.
fn cached_deb(kdir: &Path) -> Result<Option<PathBuf>> {
    let Ok(entries) = fs::read_dir(kdir) else {
        return Ok(None);
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Downloads the image package that the series' suite's linux-image-amd64 depends on.
fn download_kernel(apt: &mut Apt, kdir: &Path, series: Series) -> Result<PathBuf> {
    let name = kernel_package(apt, series)?;
    step(format_args!(
        "kernel {series}: downloading {name} ({}) into {}",
        series.suite(),
        kdir.display()
    ));
    fs::create_dir_all(kdir).with_context(|| format!("creating {}", kdir.display()))?;
    cmd::run(
        apt.command("apt-get")?
            .args(["-qq", "download", &name])
            .current_dir(kdir),
    )
    .with_context(|| format!("downloading {name}"))?;
    cached_deb(kdir)?.with_context(|| format!("apt-get downloaded no {name} package"))
}

/// linux-image-6.1.0-NN-amd64 (bookworm) or linux-image-6.12.NN+debNN-amd64 (backports).
fn kernel_package(apt: &mut Apt, series: Series) -> Result<String> {
    let suite = series.suite();
    let madison = cmd::output(
        apt.command("apt-cache")?
            .args(["madison", "linux-image-amd64"]),
    )?;
    // "linux-image-amd64 | 6.1.176-1 | http://deb.debian.org/debian bookworm/main amd64 Packages"
    let version = madison
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split('|').map(str::trim).collect();
            let from_suite = cols.get(2)?.split_whitespace().nth(1)? == format!("{suite}/main");
            from_suite.then(|| cols[1].to_string())
        })
        .with_context(|| format!("{suite} has no linux-image-amd64"))?;
    let show = cmd::output(
        apt.command("apt-cache")?
            .args(["show", &format!("linux-image-amd64={version}")]),
    )?;
    let prefix = format!("linux-image-{series}.");
    show.lines()
        .filter_map(|l| l.strip_prefix("Depends:"))
        .flat_map(|deps| deps.split(','))
        .filter_map(|dep| dep.split_whitespace().next())
        .find(|name| name.starts_with(&prefix))
        .map(str::to_string)
        .with_context(|| {
            format!("linux-image-amd64 {version} ({suite}) depends on no {prefix}* package")
        })
}

/// Unpacks the kernel package: vmlinuz into the cache, its modules into /usr/lib/modules/
/// (where virtme-ng and the guest's modprobe look), then depmod. Returns the release.
fn install_kernel(kdir: &Path, deb: &Path) -> Result<String> {
    let root = kdir.join("unpacked");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    cmd::run(Command::new("dpkg").arg("-x").arg(deb).arg(&root))?;
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.is_dir())
        .context("the package has no lib/modules")?;
    let release = only_entry(&modules)?;
    step(format_args!(
        "kernel {release}: vmlinuz into {}, modules into {}, depmod",
        kdir.display(),
        modules_dir(&release).display()
    ));
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    fs::copy(&vmlinuz, vm_cache::vmlinuz(kdir))
        .with_context(|| format!("copying {}", vmlinuz.display()))?;
    let installed = modules_dir(&release);
    if installed.exists() {
        fs::remove_dir_all(&installed)
            .with_context(|| format!("removing {}", installed.display()))?;
    }
    fs::create_dir_all("/usr/lib/modules").context("creating /usr/lib/modules")?;
    // A rename when the cache is on the same filesystem; the modules are hundreds of MB.
    if fs::rename(modules.join(&release), &installed).is_err() {
        cmd::run(
            Command::new("cp")
                .arg("-a")
                .arg(modules.join(&release))
                .arg(&installed),
        )?;
    }
    cmd::run(Command::new("depmod").arg(&release))?;
    fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    Ok(release)
}

/// The name of the single entry in `dir`.
fn only_entry(dir: &Path) -> Result<String> {
    let names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one kernel in {}, found {names:?}", dir.display()),
    }
}

/// virtme-ng from PyPI in a venv in CACHE/vm/virtme-ng; returns its `vng`.
fn virtme_ng(dir: &Path) -> Result<PathBuf> {
    let venv = vm_cache::virtme_ng_dir(dir);
    let vng = vm_cache::vng_in(dir);
    let wanted = format!("virtme-ng {VIRTME_NG_VERSION}");
    if quiet(Command::new(&vng).arg("--version")).is_some_and(|v| v.trim() == wanted) {
        step(format_args!(
            "{wanted}: already installed ({})",
            vng.display()
        ));
        return Ok(vng);
    }
    step(format_args!("{wanted}: installing into {}", venv.display()));
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    // Debian's python3 (python3-venv), not whatever python3 is first on PATH.
    cmd::run(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&venv),
    )?;
    cmd::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
    )
    .with_context(|| format!("installing {wanted} from PyPI"))?;
    Ok(vng)
}

#[cfg(test)]
mod tests {
    use super::{bookworm_uri, shell_quote, test_executable};

    #[test]
    fn finds_the_bookworm_mirror() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian-security\n\
                      Suites: bookworm-security\n\n\
                      Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n\
                      Types: deb\n# a comment\nURIs: http://mirror.example/debian\n\
                      Suites: bookworm bookworm-updates\nComponents: main\n";
        assert_eq!(
            bookworm_uri(deb822).as_deref(),
            Some("http://mirror.example/debian")
        );
        let one_line = "deb-src http://src.example/debian bookworm main\n\
                        deb [arch=amd64 signed-by=/k.gpg] http://ftp.example/debian bookworm main\n";
        assert_eq!(
            bookworm_uri(one_line).as_deref(),
            Some("http://ftp.example/debian")
        );
        assert_eq!(bookworm_uri("deb http://x/debian trixie main\n"), None);
    }

    #[test]
    fn quotes_shell_words() {
        assert_eq!(shell_quote("--test-threads=1"), "--test-threads=1");
        assert_eq!(shell_quote("exit 3"), "'exit 3'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn finds_the_test_executable() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"profiler","kind":["bin"]},"executable":"/t/profiler"}
{"reason":"compiler-artifact","target":{"name":"vm","kind":["test"]},"executable":"/t/deps/vm-0123"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            test_executable(messages).unwrap().to_str(),
            Some("/t/deps/vm-0123")
        );
        assert!(test_executable("").is_err());
    }
}
