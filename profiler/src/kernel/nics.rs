//! The transmit function of every NIC, read from the running kernel itself: each network
//! namespace's devices (`net_namespace_list`, each net's `dev_base_head`) and, for a device
//! with a parent (a NIC on a bus, not a software device), `netdev_ops->ndo_start_xmit`. The
//! reads go through /proc/kcore at offsets from BTF; kallsyms names the function. So any
//! driver's transmit can be hooked, not only those the hook table lists.

use std::{fs::File, os::unix::fs::FileExt as _};

use anyhow::{anyhow, bail, Context as _, Result};
use object::{read::elf::ElfFile64, Object as _, ObjectSegment as _, ReadCache};

use super::btf::KernelBtf;

const KCORE: &str = "/proc/kcore";
const KALLSYMS: &str = "/proc/kallsyms";
/// The list of every network namespace, a `struct list_head` in vmlinux.
const NAMESPACES: &str = "net_namespace_list";
/// A bound on every list walked: the lists change under the reader, which holds no lock.
const MAX_ENTRIES: usize = 100_000;
/// IFNAMSIZ.
const NAME_LEN: usize = 16;

/// A NIC and its driver's transmit function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    /// Network namespace inode.
    pub netns: u32,
    pub name: String,
    /// The address of its `ndo_start_xmit`.
    pub xmit: u64,
}

/// Kernel memory through /proc/kcore: its ELF program headers map virtual addresses to file
/// offsets.
struct Kcore {
    file: File,
    /// (virtual address, size, file offset) of each loadable segment.
    segments: Vec<(u64, u64, u64)>,
}

impl Kcore {
    fn open() -> Result<Kcore> {
        let file = File::open(KCORE).with_context(|| format!("opening {KCORE}"))?;
        let cache = ReadCache::new(&file);
        let elf = ElfFile64::<object::Endianness, _>::parse(&cache)
            .map_err(|e| anyhow!("{KCORE} is not an ELF core: {e}"))?;
        let segments = elf
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (s.address(), size, offset)
            })
            .collect();
        drop(elf);
        drop(cache);
        Ok(Kcore { file, segments })
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        let (start, _, offset) = self
            .segments
            .iter()
            .find(|(start, size, _)| addr >= *start && addr + len <= start + size)
            .ok_or_else(|| anyhow!("{addr:#x} is in no segment of {KCORE}"))?;
        self.file
            .read_exact_at(buf, offset + (addr - start))
            .with_context(|| format!("reading {len} bytes at {addr:#x} from {KCORE}"))
    }

    fn u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }

    fn u32(&self, addr: u64) -> Result<u32> {
        let mut b = [0; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_ne_bytes(b))
    }
}

/// Offsets of what the walk reads.
struct Offsets {
    net_list: u64,
    net_inum: u64,
    net_devices: u64,
    dev_list: u64,
    dev_name: u64,
    dev_parent: u64,
    dev_ops: u64,
    ops_xmit: u64,
}

impl Offsets {
    fn of(btf: &KernelBtf) -> Result<Offsets> {
        let off = |root: &str, path: &[&str]| btf.offset(root, path).map(u64::from);
        Ok(Offsets {
            net_list: off("net", &["list"])?,
            net_inum: off("net", &["ns", "inum"])?,
            net_devices: off("net", &["dev_base_head"])?,
            dev_list: off("net_device", &["dev_list"])?,
            dev_name: off("net_device", &["name"])?,
            dev_parent: off("net_device", &["dev", "parent"])?,
            dev_ops: off("net_device", &["netdev_ops"])?,
            ops_xmit: off("net_device_ops", &["ndo_start_xmit"])?,
        })
    }
}

/// Every NIC of every network namespace, with its transmit function.
pub fn nics(btf: &KernelBtf) -> Result<Vec<Nic>> {
    let off = Offsets::of(btf)?;
    let kcore = Kcore::open()?;
    let head = data_symbol(NAMESPACES)?;
    let mut nics = Vec::new();
    for net in list(&kcore, head, off.net_list)? {
        let netns = kcore.u32(net + off.net_inum)?;
        for dev in list(&kcore, net + off.net_devices, off.dev_list)? {
            if kcore.u64(dev + off.dev_parent)? == 0 {
                continue;
            }
            let ops = kcore.u64(dev + off.dev_ops)?;
            let xmit = kcore.u64(ops + off.ops_xmit)?;
            let mut name = [0; NAME_LEN];
            kcore.read(dev + off.dev_name, &mut name)?;
            let len = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
            nics.push(Nic {
                netns,
                name: String::from_utf8_lossy(&name[..len]).into_owned(),
                xmit,
            });
        }
    }
    Ok(nics)
}

/// The structs on the kernel list at `head`, whose `list_head` member is at `member`.
fn list(kcore: &Kcore, head: u64, member: u64) -> Result<Vec<u64>> {
    let mut entries = Vec::new();
    let mut at = kcore.u64(head)?;
    while at != head {
        if entries.len() == MAX_ENTRIES {
            bail!("the list at {head:#x} did not end within {MAX_ENTRIES} entries");
        }
        entries.push(at - member);
        at = kcore.u64(at)?;
    }
    Ok(entries)
}

/// The address of a vmlinux symbol of any type.
fn data_symbol(name: &str) -> Result<u64> {
    let text = std::fs::read_to_string(KALLSYMS).with_context(|| format!("reading {KALLSYMS}"))?;
    let addr = text
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (addr, _, sym) = (f.next()?, f.next()?, f.next()?);
            (sym == name && f.next().is_none()).then(|| u64::from_str_radix(addr, 16).ok())?
        })
        .ok_or_else(|| anyhow!("{name} is not in {KALLSYMS}"))?;
    if addr == 0 {
        bail!("{KALLSYMS} hides addresses (kernel.kptr_restrict): run as root");
    }
    Ok(addr)
}
