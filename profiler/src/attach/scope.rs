//! Where journeys start: the devices of the target namespaces and interfaces, and the cgroups
//! whose sockets' packets are followed; and the names of the node's devices.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};
use profiler_common::{
    device_key, slot_hash, HookId, HopPoint, SegmentKey, SCOPE_PROBES, SCOPE_SLOTS,
};

use super::AttachArgs;
use crate::{
    datapath::{
        path::{self, Attached, Inodes},
        HopKey, Point,
    },
    error::BadInput,
    kernel::btf::DropReasons,
    lab::{
        discover::{self, ROOT},
        netns,
        target::Devices,
        IfRef, LabIface,
    },
    pods,
    report::schema::Hop,
};

/// The devices and cgroups of the targets: where journeys start.
pub struct Scope {
    pub labels: Vec<String>,
    pub points: Vec<[u32; 2]>,
    /// The wire-facing devices (`--wire`), also in `points`: a packet entering starts there.
    pub wire: Vec<[u32; 2]>,
    pub cgroups: Vec<u64>,
    pub devices: Devices,
    /// Where its pods were read.
    pub source: pods::Source,
    /// Where a Service may translate its packets: the root namespace, the targets', and those
    /// of their veths' other ends (a pod's host).
    pub nat_namespaces: Vec<String>,
    /// The scope's interfaces (namespace, name) that an eBPF datapath may hand packets to with
    /// `bpf_redirect_peer` (`redirected`).
    pub redirected: Vec<(String, String)>,
}

/// A cgroup v2 directory's id: the kernel's kernfs node id, which is its inode number.
fn cgroup_id(path: &std::path::Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let fs = nix::sys::statfs::statfs(path)
        .map_err(|e| anyhow::anyhow!("cannot read cgroup {}: {e}", path.display()))?;
    if fs.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        bail!(
            "{} is not a cgroup v2 directory (mounted as cgroup2, e.g. /sys/fs/cgroup)",
            path.display()
        );
    }
    Ok(std::fs::metadata(path)?.ino())
}

/// A --netns argument as the netns module takes it: a name, or the path of a namespace file.
fn netns_ref(arg: &str) -> Result<String> {
    let ns = if arg.bytes().all(|b| b.is_ascii_digit()) {
        format!("/proc/{arg}/ns/net")
    } else {
        arg.to_string()
    };
    if netns::mounted(&ns) {
        return Ok(ns);
    }
    // There but unreadable (no permission, a process's namespace): say so, not "unknown".
    match netns::inode(&ns) {
        Err(e) if !e.is::<BadInput>() => bail!("--netns {arg}: {e}"),
        _ => Err(crate::error::bad_input(format!(
            "unknown network namespace {arg}"
        ))),
    }
}

/// A --wire argument, [NETNS:]IFACE: the namespace as the netns module takes it (this one
/// without), and the interface.
fn wire_device(arg: &str) -> Result<(String, &str)> {
    match arg.rsplit_once(':') {
        Some((ns, name)) if !name.is_empty() => Ok((netns_ref(ns)?, name)),
        Some(_) => bail!("--wire {arg}: give [NETNS:]IFACE"),
        None => Ok((ROOT.to_string(), arg)),
    }
}

/// Resolves the targets. At start (`strict`) an unknown target fails; later (a refresh while
/// attached) targets that went away are left out.
pub async fn scope(args: &AttachArgs, strict: bool) -> Result<Scope> {
    if args.netns.is_empty()
        && args.ifaces.is_empty()
        && args.wire.is_empty()
        && args.cgroups.is_empty()
        && args.pods.is_empty()
    {
        bail!("nothing to attach to: give --pod, --netns, --iface, --wire or --cgroup");
    }
    let cgroups = args
        .cgroups
        .iter()
        .map(|p| cgroup_id(p))
        .collect::<Result<Vec<_>>>()?;
    let targets: Vec<String> = args
        .netns
        .iter()
        .map(|a| netns_ref(a))
        .filter(|t| strict || t.is_ok())
        .collect::<Result<_>>()?;
    let listing = args.pod_sources.list().await?;
    if strict && !args.quiet {
        for notice in &listing.notices {
            eprintln!("attach: {notice}");
        }
    }
    let wire: Vec<(String, &str)> = args
        .wire
        .iter()
        .map(|w| wire_device(w))
        .filter(|w| strict || w.is_ok())
        .collect::<Result<_>>()?;
    let mut namespaces = discover::namespaces()?;
    for t in targets.iter().chain(wire.iter().map(|(ns, _)| ns)) {
        if !namespaces.contains(t) {
            namespaces.push(t.clone());
        }
    }
    let named = discover::pod_names(&listing.pods, &mut namespaces);
    let selected = if strict {
        pods::select(&listing.pods, &args.pods, &listing.source)?
    } else {
        pods::select_present(&listing.pods, &args.pods)
    };
    let interfaces = discover::interfaces(&namespaces).await?;
    let mut points = Vec::new();
    let mut labels = Vec::new();
    let mut scoped = vec![ROOT.to_string()];
    scoped.extend(targets.iter().cloned());
    scoped.extend(wire.iter().map(|(ns, _)| ns.clone()));
    for t in &targets {
        let inode = discover::inode(t)?;
        points.extend(
            interfaces
                .iter()
                .filter(|i| &i.netns == t)
                .map(|i| [inode, i.ifindex]),
        );
        labels.push(format!("netns {t}"));
    }
    for pod in selected {
        let Some((name, inode)) = named.iter().find(|(n, _)| pod.qualified() == n.qualified) else {
            continue;
        };
        points.extend(
            interfaces
                .iter()
                .filter(|i| i.netns == name.netns)
                .map(|i| [*inode, i.ifindex]),
        );
        labels.push(format!("pod {}", name.qualified));
        scoped.push(name.netns.clone());
    }
    labels.extend(args.pods.iter().map(|p| format!("--pod {p}")));
    let root = discover::inode(ROOT)?;
    for name in &args.ifaces {
        let Some(i) = interfaces
            .iter()
            .find(|i| i.netns == ROOT && &i.ifname == name)
        else {
            bail!("unknown interface {name}");
        };
        points.push([root, i.ifindex]);
        labels.push(format!("iface {name}"));
    }
    let mut wire_points = Vec::new();
    for (arg, (ns, name)) in args.wire.iter().zip(&wire) {
        let Some(i) = interfaces
            .iter()
            .find(|i| &i.netns == ns && i.ifname == *name)
        else {
            if strict {
                bail!("--wire {arg}: no interface {name} there");
            }
            continue;
        };
        let point = [discover::inode(ns)?, i.ifindex];
        points.push(point);
        wire_points.push(point);
        labels.push(format!("wire {arg}"));
    }
    labels.extend(
        args.cgroups
            .iter()
            .map(|p| format!("cgroup {}", p.display())),
    );
    // Pods may come later; other targets must have devices now.
    if strict && points.is_empty() && cgroups.is_empty() && args.pods.is_empty() {
        bail!("the targets have no network devices to attach to");
    }
    let nat_namespaces = nat_namespaces(scoped, &interfaces);
    let redirected = redirected(&points, &interfaces);
    // Only the runtime and the CNI cache say more of a namespace than its name.
    let pods = match &listing.source {
        pods::Source::NetnsNames => Vec::new(),
        _ => named.into_iter().map(|(n, _)| n).collect(),
    };
    Ok(Scope {
        labels,
        points,
        wire: wire_points,
        cgroups,
        devices: Devices {
            name: "node".into(),
            namespaces,
            interfaces,
            pods,
        },
        source: listing.source,
        nat_namespaces,
        redirected,
    })
}

/// The interfaces among `points` whose veth's other end holds an eBPF datapath's program at
/// its tc ingress: a packet that program redirects to the peer arrives without a device's
/// receive (`__netif_receive_skb_core` goes round again), so no tracepoint sees it come in.
fn redirected(points: &[[u32; 2]], interfaces: &[LabIface]) -> Vec<(String, String)> {
    let runs_datapath = |p: &IfRef| {
        (interfaces.iter())
            .any(|q| q.netns == p.netns && q.ifindex == p.ifindex && q.tc_program.is_some())
    };
    let in_points = |i: &LabIface| {
        discover::inode(&i.netns).is_ok_and(|inode| points.contains(&[inode, i.ifindex]))
    };
    (interfaces.iter())
        .filter(|i| i.peer.as_ref().is_some_and(runs_datapath) && in_points(i))
        .map(|i| (i.netns.clone(), i.ifname.clone()))
        .collect()
}

/// `scoped` and the namespaces of the other ends of their veths, each once.
fn nat_namespaces(mut scoped: Vec<String>, interfaces: &[LabIface]) -> Vec<String> {
    let peers = (interfaces.iter())
        .filter(|i| scoped.contains(&i.netns))
        .filter_map(|i| Some(i.peer.as_ref()?.netns.clone()))
        .collect::<Vec<_>>();
    scoped.extend(peers);
    let mut seen = HashSet::new();
    scoped.retain(|ns| seen.insert(ns.clone()));
    scoped
}

/// What changes when pods come or go, cheap to read every second: the namespaces under
/// /run/netns, the runtime's ready sandboxes (a pod's network is ready before its sandbox
/// is) or the CNI cache's results, and the node's own devices (where a CNI plugin makes a
/// pod's devices and the host ends of its veths stay). A scope is resolved again only when it changes. Taken before
/// the listing it stands for: a pod ready in between then shows as a change at the next look.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<String>);

impl Fingerprint {
    pub async fn of(sources: &pods::Sources, source: &pods::Source) -> Fingerprint {
        let mut names = pods::netns_names();
        names.extend(sources.ids(source).await);
        names.extend(host_devices());
        names.sort();
        Fingerprint(names)
    }
}

/// The names of this namespace's devices, as sysfs lists them.
fn host_devices() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| format!("dev {}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default()
}

/// Where each device of the scope goes in the kernel's direct-mapped scope table, as the
/// programs look for it: from its key's hash, in the first free of SCOPE_PROBES slots.
pub fn slots(points: &[[u32; 2]]) -> Result<Vec<(u32, u64)>> {
    let mut table = vec![0u64; SCOPE_SLOTS as usize];
    let mut placed = Vec::new();
    for &[netns, ifindex] in points {
        let key = device_key(netns, ifindex);
        let first = slot_hash(key);
        let free = (0..SCOPE_PROBES)
            .map(|i| (first + i) & (SCOPE_SLOTS - 1))
            .find(|&s| table[s as usize] == 0 || table[s as usize] == key);
        let Some(s) = free else {
            bail!(
                "too many devices in scope ({}): the scope table has {SCOPE_SLOTS} slots; \
                 attach to fewer namespaces or interfaces",
                points.len()
            );
        };
        if table[s as usize] == 0 {
            table[s as usize] = key;
            placed.push((s, key));
        }
    }
    Ok(placed)
}

/// Namespaces (by inode) and devices (namespace inode, ifindex) that went away.
#[derive(Default)]
pub struct Departures {
    pub netns: HashSet<u32>,
    pub devices: HashSet<(u32, u32)>,
}

impl Departures {
    pub fn is_empty(&self) -> bool {
        self.netns.is_empty() && self.devices.is_empty()
    }

    pub fn has(&self, p: &HopPoint) -> bool {
        self.netns.contains(&p.netns) || self.devices.contains(&(p.netns, p.ifindex))
    }
}

/// Names hops and segments after the node's devices.
pub struct Namer {
    devices: Devices,
    inodes: Inodes,
    attached: Attached,
    /// Each hop point met so far, with its identity and description.
    hops: HashMap<HopPoint, (HopKey, Hop)>,
    pub drop_reasons: DropReasons,
}

impl Namer {
    pub fn new(devices: Devices, attached: Attached, drop_reasons: DropReasons) -> Result<Self> {
        Ok(Namer {
            inodes: Inodes::of(&devices)?,
            devices,
            attached,
            hops: HashMap::new(),
            drop_reasons,
        })
    }

    /// The inodes of `devices`' namespaces, for `departures` and `update`. A namespace deleted
    /// between its listing and this look keeps the inode it had (its hops are keyed by it), unless
    /// a namespace there now has it: the kernel gives a new namespace a deleted one's inode.
    pub fn inodes_of(&self, devices: &Devices) -> Result<Inodes> {
        let mut inodes = Inodes::of(devices)?;
        for ns in &devices.namespaces {
            let known = self.inodes.get(ns);
            if inodes.get(ns) == 0 && known != 0 && !inodes.has(known) {
                inodes.insert(ns.clone(), known);
            }
        }
        Ok(inodes)
    }

    /// The node's devices changed (pods came or went): hops are named after `devices` (whose
    /// namespaces' inodes are `inodes`) from now on. Hops named before are forgotten: a new
    /// namespace may have a departed one's inode.
    pub fn update(&mut self, devices: Devices, inodes: Inodes) {
        self.inodes = inodes;
        self.devices = devices;
        self.hops.clear();
    }

    /// A pod whose sandbox is stopping is no longer listed while its namespace still exists:
    /// its namespace keeps the pod's name until it goes, so its segments are retired under it.
    pub fn keep_pod_names(&self, devices: &mut Devices) {
        for pod in &self.devices.pods {
            if devices.namespaces.contains(&pod.netns) && devices.pod_in(&pod.netns).is_none() {
                devices.pods.push(pod.clone());
            }
        }
    }

    /// What `devices` (whose namespaces' inodes are `inodes`) no longer has of the devices hops
    /// are named after now. A departed namespace whose inode a namespace there now was given
    /// departs device by device: the newcomer's devices have other ifindexes, its hops stay.
    pub fn departures(&self, devices: &Devices, inodes: &Inodes) -> Departures {
        let mut gone = Departures::default();
        for ns in &self.devices.namespaces {
            let inode = self.inodes.get(ns);
            let left = !devices.namespaces.contains(ns);
            if left && !inodes.has(inode) {
                gone.netns.insert(inode);
                continue;
            }
            let was = self.devices.interfaces.iter().filter(|i| &i.netns == ns);
            for i in was {
                let kept = !left
                    && devices
                        .interfaces
                        .iter()
                        .any(|n| n.netns == i.netns && n.ifindex == i.ifindex);
                if !kept {
                    gone.devices.insert((inode, i.ifindex));
                }
            }
        }
        gone
    }

    fn described(&mut self, p: &HopPoint) -> &(HopKey, Hop) {
        self.hops.entry(*p).or_insert_with(|| {
            let key = HopKey {
                point: Point::Hook(HookId::from_u8(p.hook).unwrap_or(HookId::NetDevQueue)),
                netns: p.netns,
                ifindex: p.ifindex,
            };
            let hop = path::describe(
                std::slice::from_ref(&key),
                &[p.flags],
                &self.devices,
                &self.inodes,
                &self.attached,
            )
            .remove(0);
            (key, hop)
        })
    }

    pub fn hop(&mut self, p: &HopPoint) -> &Hop {
        &self.described(p).1
    }

    /// The segment's name and its two hops.
    pub fn segment(&mut self, k: &SegmentKey) -> (String, Hop, Hop) {
        let (ka, a) = self.described(&k.from).clone();
        let (kb, b) = self.described(&k.to).clone();
        let name = path::segment_names(&[ka, kb], &[a.clone(), b.clone()], &self.devices).remove(0);
        (name, a, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The programs' lookup (profiler-ebpf/src/attach.rs, device_in_scope), on the table.
    fn found(table: &[u64], netns: u32, ifindex: u32) -> bool {
        let key = device_key(netns, ifindex);
        let first = slot_hash(key);
        for i in 0..SCOPE_PROBES {
            match table[((first + i) & (SCOPE_SLOTS - 1)) as usize] {
                k if k == key => return true,
                0 => return false,
                _ => {}
            }
        }
        false
    }

    #[test]
    fn every_device_in_scope_is_found_and_no_other() {
        // A node's worth of devices: 40 namespaces of 8 devices, and the root's 100.
        let points: Vec<[u32; 2]> = (0..40u32)
            .flat_map(|ns| (1..=8).map(move |i| [0xf000_0000 + ns, i]))
            .chain((1..=100).map(|i| [0xefff_ffff, i]))
            .collect();
        let mut table = vec![0u64; SCOPE_SLOTS as usize];
        for (slot, key) in slots(&points).expect("placing 420 devices") {
            table[slot as usize] = key;
        }
        for &[ns, i] in &points {
            assert!(found(&table, ns, i), "device {i} of netns {ns} not found");
        }
        for i in 9..100 {
            assert!(
                !found(&table, 0xf000_0000, i),
                "device {i} found but not in scope"
            );
        }
    }

    #[test]
    fn a_scope_larger_than_the_table_is_refused() {
        let points: Vec<[u32; 2]> = (1..=SCOPE_SLOTS + 1).map(|i| [1, i]).collect();
        let err = slots(&points).expect_err("more devices than slots");
        assert!(err.to_string().contains("too many devices"), "{err}");
    }
}
