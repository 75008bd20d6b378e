//! SR-IOV NICs for the sriov lab: a PF's virtual functions made through sysfs, each given a MAC
//! by the PF before its driver binds, then handed to a pod.
//!
//! The order matters on igb (and QEMU's emulation of it): the NIC switches a VF's frame to
//! another VF only when the destination MAC is in the PF's receive-address table for that VF's
//! pool. The PF writes the MAC it was given (`ip link set PF vf N mac M`) there, but a VF driver
//! already bound keeps the random MAC it made up, which no table entry matches: its unicast
//! frames then leave by the wire, and the other VF never sees them. So VFs are created with
//! driver probing off, given their MACs, and only then bound.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use super::spec::Spec;
use super::Lacks;

/// The PF's driver (QEMU's `igb` device, Intel 82576) and its VFs' driver.
pub(super) const PF_DRIVER: &str = "igb";
pub(super) const VF_DRIVER: &str = "igbvf";
const DRIVERS: &str = "/sys/bus/pci/drivers";
const PROBE: &str = "/sys/bus/pci/drivers_probe";
/// The CPU that takes the VFs' interrupts.
const IRQ_CPU: &str = "0";
/// How long a bound VF takes to show its network device, and a NIC its carrier (TCG is slow).
pub(super) const WAIT: Duration = Duration::from_secs(30);

/// Fails with what the machine lacks unless it has the SR-IOV NICs `spec` needs, without VFs.
pub(super) fn check(spec: &Spec) -> Result<()> {
    let Some(wanted) = spec.pfs.iter().map(|p| p.nic + 1).max() else {
        return Ok(());
    };
    let free = pf_devices()
        .iter()
        .take(wanted)
        .filter(|d| num_vfs(d).is_ok_and(|n| n == 0))
        .count();
    if free < wanted {
        bail!(Lacks::Nics(wanted, PF_DRIVER));
    }
    Ok(())
}

/// The PCI devices bound to the PF driver that can have VFs, in bus order.
fn pf_devices() -> Vec<PathBuf> {
    let mut devices: Vec<PathBuf> = std::fs::read_dir(Path::new(DRIVERS).join(PF_DRIVER))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("sriov_totalvfs").exists())
        .collect();
    devices.sort();
    devices
}

/// The `nic`-th SR-IOV NIC's PCI device.
pub(super) fn pf_device(nic: usize) -> Result<PathBuf> {
    pf_devices()
        .into_iter()
        .nth(nic)
        .ok_or_else(|| anyhow!(Lacks::Nics(nic + 1, PF_DRIVER)))
}

fn num_vfs(dev: &Path) -> Result<u32> {
    let path = dev.join("sriov_numvfs");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: {text:?}", path.display()))
}

fn write(dev: &Path, file: &str, value: &str) -> Result<()> {
    let path = dev.join(file);
    std::fs::write(&path, value).with_context(|| format!("writing {value} to {}", path.display()))
}

/// The network device of PCI device `dev` as this process's namespace sees it, name and
/// ifindex, waiting up to WAIT for a driver that is still binding. (udev may rename a new
/// device at any time: its ifindex is what stays.)
pub(super) fn net_device(dev: &Path) -> Result<(String, u32)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let found = std::fs::read_dir(dev.join("net"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .and_then(|e| {
                let index = std::fs::read_to_string(e.path().join("ifindex")).ok()?;
                let name = e.file_name().to_string_lossy().into_owned();
                Some((name, index.trim().parse().ok()?))
            });
        match found {
            Some(found) => return Ok(found),
            None if Instant::now() > deadline => {
                bail!("{} has no network device", dev.display())
            }
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Creates `n` VFs of the PF at `dev`, no driver bound to them yet.
pub(super) fn create_vfs(dev: &Path, n: u32) -> Result<()> {
    write(dev, "sriov_drivers_autoprobe", "0")?;
    write(dev, "sriov_numvfs", &n.to_string())
}

/// Binds VF `vf` of the PF at `dev` to its driver; returns its PCI device.
pub(super) fn bind_vf(dev: &Path, vf: u32) -> Result<PathBuf> {
    write(dev, "sriov_drivers_autoprobe", "1")?;
    let link = dev.join(format!("virtfn{vf}"));
    let vf_dev = std::fs::canonicalize(&link)
        .with_context(|| format!("{} has no VF {vf}", dev.display()))?;
    let bdf = vf_dev
        .file_name()
        .context("a VF's PCI address")?
        .to_string_lossy()
        .into_owned();
    std::fs::write(PROBE, &bdf).with_context(|| format!("binding VF {bdf} ({PROBE})"))?;
    let driver = std::fs::read_link(vf_dev.join("driver"))
        .with_context(|| format!("VF {bdf} is bound to no driver (is {VF_DRIVER} loaded?)"))?;
    if !driver.ends_with(VF_DRIVER) {
        bail!("VF {bdf} is bound to {}, not {VF_DRIVER}", driver.display());
    }
    Ok(vf_dev)
}

/// Sends every interrupt of the VF at `vf_dev` to CPU `IRQ_CPU`. QEMU's igb switches a frame
/// inside the sender's doorbell write and raises the receiving VF's interrupt at once: on
/// another CPU, the receive can then run before the sender's transmit has returned, which a
/// NIC's DMA never allows. On the sender's CPU, the receive waits (softirqs are off during a
/// transmit) for the transmit to return, as on hardware: a sender on IRQ_CPU (`taskset -c 0`)
/// sees every hop in order.
pub(super) fn pin_irqs(vf_dev: &Path) -> Result<()> {
    let irqs = std::fs::read_dir(vf_dev.join("msi_irqs"))
        .with_context(|| format!("{} has no MSI interrupts", vf_dev.display()))?;
    for irq in irqs.flatten() {
        let path = Path::new("/proc/irq")
            .join(irq.file_name())
            .join("smp_affinity_list");
        std::fs::write(&path, IRQ_CPU).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Removes the VFs of the `nic`-th SR-IOV NIC (wherever they are) and restores driver probing.
pub(super) fn release(nic: usize) -> Result<()> {
    let dev = pf_device(nic)?;
    release_device(&dev)
}

pub(super) fn release_device(dev: &Path) -> Result<()> {
    if num_vfs(dev)? != 0 {
        write(dev, "sriov_numvfs", "0")?;
    }
    write(dev, "sriov_drivers_autoprobe", "1")
}
