//! BPF netfilter links: profiler-ebpf's netfilter.rs programs at netfilter's IPv4 hooks on both
//! sides of the NAT, so that a Service's DNAT (PRE_ROUTING) and its replies' un-DNAT
//! (POST_ROUTING) are segments of their own.
//!
//! aya 0.14 (the newest that builds here) has no netfilter program type. The programs are in
//! the object like the others; this module takes their instructions from the object with
//! aya-obj, points their map references at the maps aya made for the run (so they share the
//! ring buffer, the counters and the globals aya set), and loads and links them with the bpf
//! syscall itself. Closing a link's fd detaches it; the kernel also detaches it when its
//! namespace goes.
use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{bail, Context as _, Result};
use aya::maps::{Map, MapData};
use profiler_common::HookId;

use crate::datapath::{Mode, Via, HOOK_TABLE};

use crate::lab::netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_NETFILTER: u32 = 32;
const BPF_NETFILTER: u32 = 45;
const NFPROTO_IPV4: u32 = 2;

/// union bpf_attr for BPF_PROG_LOAD, as far as used, then zeros.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    rest: [u8; 64],
}

/// union bpf_attr for BPF_LINK_CREATE with its netfilter member, then zeros.
#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    pf: u32,
    hooknum: u32,
    priority: i32,
    nf_flags: u32,
    rest: [u8; 64],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a bpf_attr prefix of the given size, zero beyond what is set.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The table's netfilter hooks: id, program in `mode`, hook number and priority.
fn points(mode: Mode) -> impl Iterator<Item = (HookId, String, u32, i32)> {
    HOOK_TABLE.iter().filter_map(move |h| match h.via {
        Via::Netfilter {
            hooknum, priority, ..
        } => Some((h.id, h.netfilter_program(mode)?, hooknum, priority)),
        _ => None,
    })
}

/// The netfilter programs of one mode, loaded, and the links that hold them at their hooks.
pub struct NfLinks {
    mode: Mode,
    programs: Vec<(HookId, OwnedFd)>,
    links: Vec<OwnedFd>,
}

impl NfLinks {
    /// Loads the programs of the table's netfilter hooks in `mode` from `object`, sharing the
    /// maps of `ebpf` (the same object as aya loaded it).
    pub fn load(object: &[u8], ebpf: &aya::Ebpf, mode: Mode) -> Result<NfLinks> {
        let mut obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
        let parsed = obj.maps.clone();
        let fds: Vec<(&str, i32, &aya_obj::Map)> = ebpf
            .maps()
            .filter_map(|(name, map)| {
                let fd = map_data(map)?.fd().as_fd().as_raw_fd();
                Some((name, fd, parsed.get(name)?))
            })
            .collect();
        let text: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
        obj.relocate_maps(fds.into_iter(), &text)
            .context("pointing the netfilter programs at the run's maps")?;
        obj.relocate_calls(&text)
            .context("linking the netfilter programs' calls")?;
        let mut programs = Vec::new();
        for (id, name, _, _) in points(mode) {
            let prog = (obj.programs.get(&name))
                .with_context(|| format!("no program {name} in the eBPF object"))?;
            let f = &obj.functions[&prog.function_key()];
            programs.push((id, load_one(&name, &f.instructions, &prog.license)?));
        }
        Ok(NfLinks {
            mode,
            programs,
            links: Vec::new(),
        })
    }

    /// Links every program at its hook in namespace `ns` (None: this process's).
    pub fn attach(&mut self, ns: Option<&str>) -> Result<()> {
        for (id, name, hooknum, priority) in points(self.mode) {
            let (_, prog) = (self.programs.iter())
                .find(|(loaded, _)| *loaded == id)
                .context("a netfilter program not loaded")?;
            let prog_fd = prog.as_raw_fd() as u32;
            let link = netns::run_in(ns, || link(prog_fd, hooknum, priority))
                .with_context(|| format!("the kernel refused a netfilter link for {name}"))?;
            self.links.push(link);
        }
        Ok(())
    }
}

/// How many priorities a link tries, each one further from the NAT: BPF programs at one hook
/// cannot share a priority (EBUSY), and another profiler (a run and an attach, two attaches)
/// may hold the first.
const PRIORITIES_TRIED: i32 = 8;

/// A link of program `prog_fd` at `hooknum`, at `priority` or the first free one beyond it,
/// away from nf_nat's (-100 at PRE_ROUTING, 100 at POST_ROUTING), so that the program stays
/// on its side of the NAT.
fn link(prog_fd: u32, hooknum: u32, priority: i32) -> Result<OwnedFd> {
    let mut tried = Vec::new();
    for at in priorities(priority) {
        let mut attr = LinkCreate {
            prog_fd,
            target_fd: 0,
            attach_type: BPF_NETFILTER,
            flags: 0,
            pf: NFPROTO_IPV4,
            hooknum,
            priority: at,
            nf_flags: 0,
            rest: [0; 64],
        };
        match bpf(BPF_LINK_CREATE, &mut attr) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => tried.push(at),
            Err(e) => bail!("hook {hooknum}, priority {at}: {e}"),
        }
    }
    bail!("hook {hooknum}: priorities {tried:?} are all taken by other BPF programs")
}

/// `priority`, then the next ones away from the NAT.
fn priorities(priority: i32) -> impl Iterator<Item = i32> {
    let away = (priority - priority.signum() * 100).signum();
    (0..PRIORITIES_TRIED).map(move |i| priority + i * away)
}

/// The map behind any kind of aya map.
fn map_data(map: &Map) -> Option<&MapData> {
    Some(match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuHashMap(m)
        | Map::PerCpuLruHashMap(m)
        | Map::ProgramArray(m)
        | Map::RingBuf(m)
        | Map::PerfEventArray(m)
        | Map::Queue(m)
        | Map::Stack(m)
        | Map::LpmTrie(m)
        | Map::BloomFilter(m)
        | Map::Unsupported(m) => m,
        _ => return None,
    })
}

/// BPF_PROG_LOAD as a netfilter program; on a refusal, the verifier's last words.
fn load_one(
    name: &str,
    insns: &[aya_obj::generated::bpf_insn],
    license: &CString,
) -> Result<OwnedFd> {
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut log = vec![0u8; 1 << 20];
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_NETFILTER,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: BPF_NETFILTER,
        rest: [0; 64],
    };
    if let Ok(fd) = bpf(BPF_PROG_LOAD, &mut attr) {
        return Ok(fd);
    }
    attr.log_level = 1;
    attr.log_size = log.len() as u32;
    attr.log_buf = log.as_mut_ptr() as u64;
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            let text = String::from_utf8_lossy(&log);
            let tail: Vec<&str> = text.trim_end_matches('\0').lines().rev().take(8).collect();
            if tail.is_empty() {
                // Refused before the verifier ran: the program type is unknown here.
                bail!("the kernel refused netfilter program {name}: {e} (BPF netfilter links came in Linux 6.4)");
            }
            bail!(
                "the kernel refused netfilter program {name}: {e}; verifier: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_priorities_give_way_on_the_programs_side_of_the_nat() {
        let first_three = |p| priorities(p).take(3).collect::<Vec<_>>();
        assert_eq!(first_three(-101), [-101, -102, -103]);
        assert_eq!(first_three(-99), [-99, -98, -97]);
        assert_eq!(first_three(99), [99, 98, 97]);
        assert_eq!(first_three(101), [101, 102, 103]);
        // Every hook's tries stay on its program's side of its NAT, between mangle (-150, 150
        // away) and the next NAT or conntrack.
        for (_, _, _, p) in points(Mode::Attach) {
            let nat = p.signum() * 100;
            for q in priorities(p) {
                assert_eq!((q - nat).signum(), (p - nat).signum(), "{p}: {q}");
                assert!((q - nat).abs() < 50, "{p}: {q}");
            }
        }
    }
}
