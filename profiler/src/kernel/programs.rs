//! Loads the eBPF object with this kernel's offsets and attaches its programs: device
//! tracepoints (tp_btf, else raw_tp) everywhere, tc programs on the interfaces of the path,
//! and with the deep set, kprobes on the datapath's functions and raw_tp on module tracepoints.
//! Every attachment is a BPF link owned by this process, so an exiting process leaves none behind;
//! a hook that cannot be attached is recorded with the reason, never fatal on its own.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{
        tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions},
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
        BtfTracePoint, KProbe, RawTracePoint, SchedClassifier, TcAttachType, UProbe,
    },
    Ebpf, EbpfLoader,
};
use profiler_common::{Filter, FuncHook, HookId, COUNTER_COUNT};

use super::{
    btf::KernelBtf,
    kfunc::{ResolvedHook, Resolver},
    netfilter::NfLinks,
    nics, tc,
    uprobe::UprobeSpec,
    MissingHook,
};
use crate::{
    datapath::{decision_program, HookDef, Mode, Via, HOOK_TABLE},
    lab::netns,
    object::ebpf_object,
    report::schema::{HookSet, HookStatus, ProgramCost, Status},
};

/// The first netlink priority the tc programs take before tcx (one each after it).
const NETLINK_PRIORITY: u16 = 40_000;

/// A tc attachment, kept to detach it in its namespace.
#[derive(Debug)]
pub struct TcAttachment {
    pub hook: HookId,
    /// The program attached: tc_X, or ftc_X to follow.
    prog: String,
    pub netns: Option<String>,
    pub ifname: String,
    link: SchedClassifierLinkId,
}

/// The loaded eBPF object and every link it holds: dropping it detaches everything.
pub struct Programs {
    ebpf: Ebpf,
    /// Every hook tried, with what became of it.
    pub statuses: Vec<HookStatus>,
    pub tc: Vec<TcAttachment>,
    /// Before tcx: the devices with tc filters, recorded until they are detached.
    tc_devices: Vec<tc::Device>,
    /// The programs around the NAT and their links (closing them detaches).
    netfilter: Option<NfLinks>,
}

/// What the programs are told at load time.
#[derive(Default)]
pub struct LoadConfig {
    pub run_id: u32,
    /// Port the run's traffic uses (0: look for tags on every port).
    pub port: u16,
    pub follow: FollowConfig,
}

/// Attach mode's settings (`profiler attach`), compiled into the programs at load time.
#[derive(Clone, Copy)]
pub struct FollowConfig {
    /// Follow one packet in `sample`.
    pub sample: u32,
    /// A hop later than this after the previous one starts no segment.
    pub max_gap_ns: u64,
    /// Stream every hop (`--mode events`) besides keeping histograms.
    pub stream: bool,
    pub filter: Filter,
    /// Entries of the direct-mapped in-flight table: the memory bound (rounded up to a power
    /// of two).
    pub max_in_flight: u32,
    /// Whether journeys may start by the sending socket's cgroup (`--cgroup`).
    pub by_cgroup: bool,
    /// Whether packets crossing wire-facing devices are reported (`--wire`).
    pub wire: bool,
}

impl Default for FollowConfig {
    fn default() -> Self {
        FollowConfig {
            sample: 1,
            max_gap_ns: 1_000_000_000,
            stream: false,
            filter: Filter::default(),
            max_in_flight: 65536,
            by_cgroup: false,
            wire: false,
        }
    }
}

impl Programs {
    pub fn load(btf: &KernelBtf, config: &LoadConfig) -> Result<Self> {
        let object = ebpf_object()?;
        let offsets = btf
            .kernel_offsets()
            .context("finding kernel struct offsets in BTF")?;
        let follow = &config.follow;
        let flights = follow.max_in_flight.next_power_of_two();
        let ebpf = EbpfLoader::new()
            .override_global("OFFSETS", &offsets, true)
            .override_global("RUN_ID", &config.run_id, true)
            .override_global("PORT", &config.port, true)
            .override_global("SAMPLE", &follow.sample.max(1), true)
            .override_global("MAX_GAP_NS", &follow.max_gap_ns, true)
            .override_global("STREAM", &(follow.stream as u8), true)
            .override_global("FILTER", &follow.filter, true)
            .override_global("BY_CGROUP", &(follow.by_cgroup as u8), true)
            .override_global("WIRE_ON", &(follow.wire as u8), true)
            .override_global("FLIGHT_MASK", &(flights - 1), true)
            .map_max_entries("FLIGHTS", flights)
            .map_max_entries("BY_SKB", flights)
            .load(object)
            .context("loading the eBPF object into the kernel")?;
        Ok(Programs {
            ebpf,
            statuses: Vec::new(),
            tc: Vec::new(),
            tc_devices: Vec::new(),
            netfilter: None,
        })
    }

    /// Attaches every device tracepoint of `mode`, recording what attached and why the rest
    /// did not.
    pub fn attach_tracepoints(&mut self, kernel_btf: &KernelBtf, mode: Mode) -> Result<()> {
        let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF for tp_btf")?;
        for spec in HOOK_TABLE {
            if let (Via::Tracepoint { tp }, Some((btf_prog, raw_prog))) =
                (spec.via, spec.tracepoint_programs(mode))
            {
                let status = self.attach_tracepoint(tp, &btf_prog, &raw_prog, &btf, kernel_btf);
                self.statuses.push(status);
            }
        }
        Ok(())
    }

    /// Attaches the empty programs at attach's tracepoints (the benchmark's floor); returns how
    /// many attached.
    pub fn attach_floor(&mut self) -> Result<usize> {
        let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF for tp_btf")?;
        let mut attached = 0;
        for spec in HOOK_TABLE {
            if let (Via::Tracepoint { tp }, Some(prog)) = (spec.via, spec.floor_program()) {
                let st = match self.attach_btf(&prog, tp, &btf) {
                    Ok(()) => {
                        attached += 1;
                        status(&prog, "tp_btf", Status::Attached, None)
                    }
                    Err(e) => status(&prog, "tp_btf", Status::Failed, Some(format!("{e:#}"))),
                };
                self.statuses.push(st);
            }
        }
        Ok(attached)
    }

    /// Attaches the hooks of `set` in `mode`, and returns the set in effect: the deep set falls
    /// back to the stable one, with a notice, where none of its hooks can attach.
    pub fn attach_set(&mut self, btf: &KernelBtf, mode: Mode, set: HookSet) -> Result<HookSet> {
        self.attach_tracepoints(btf, mode)?;
        if set == HookSet::Stable {
            return Ok(HookSet::Stable);
        }
        let before = self.statuses.len();
        self.attach_deep(btf, mode);
        let deep = &self.statuses[before..];
        if deep.iter().any(|s| s.status == Status::Attached) {
            return Ok(HookSet::Deep);
        }
        let why = deep
            .iter()
            .filter_map(|s| s.reason.as_deref())
            .next()
            .unwrap_or("no deep hook applies");
        eprintln!("note: no deep hook attached on this kernel ({why}); using the stable hooks");
        Ok(HookSet::Stable)
    }

    /// Attaches every deep hook of `mode` this kernel has; the others are recorded with why.
    pub fn attach_deep(&mut self, btf: &KernelBtf, mode: Mode) {
        let kprobes = super::has_kprobes();
        let mut resolver = Resolver::new(btf);
        for spec in HOOK_TABLE.iter().filter(|h| h.set() == HookSet::Deep) {
            let Some(prog) = spec.deep_program(mode) else {
                continue;
            };
            if spec.via == Via::DriverXmit && kprobes {
                self.attach_driver_xmits(btf, &mut resolver, spec, &prog);
                continue;
            }
            let is_function = matches!(spec.via, Via::Function { .. } | Via::DriverXmit);
            let kind = if is_function { "kprobe" } else { "raw_tp" };
            let result = if is_function && !kprobes {
                Err(anyhow!("this kernel has no kprobes (CONFIG_KPROBES off)"))
            } else {
                resolver
                    .resolve(spec)
                    .and_then(|target| self.attach_target(&prog, is_function, &target))
            };
            let st = match result {
                Ok(()) => status(spec.label, kind, Status::Attached, None),
                Err(e) => status(
                    spec.label,
                    kind,
                    Status::Unavailable,
                    Some(format!("{e:#}")),
                ),
            };
            self.statuses.push(HookStatus {
                set: HookSet::Deep,
                ..st
            });
        }
    }

    /// The driver transmit hook on each NIC's `ndo_start_xmit` that the table does not list by
    /// name: one status per function, naming it, its module and its NICs.
    fn attach_driver_xmits(
        &mut self,
        btf: &KernelBtf,
        resolver: &mut Resolver,
        spec: &HookDef,
        prog: &str,
    ) {
        let unavailable = |name: String, e: anyhow::Error| HookStatus {
            set: HookSet::Deep,
            ..status(&name, "kprobe", Status::Unavailable, Some(format!("{e:#}")))
        };
        let nics = match nics::nics(btf) {
            Ok(nics) if nics.is_empty() => Err(anyhow!("no NIC (a device on a bus) here")),
            found => found,
        };
        let nics = match nics {
            Ok(nics) => nics,
            Err(e) => return self.statuses.push(unavailable(spec.label.to_string(), e)),
        };
        let mut by_xmit: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for nic in nics {
            by_xmit.entry(nic.xmit).or_default().push(nic.name);
        }
        for (addr, names) in by_xmit {
            let names = names.join(", ");
            let st = match resolver.resolve_at(spec, addr) {
                Ok((func, module, _)) if curated(&func, module.as_deref()) => continue,
                Ok((func, module, target)) => {
                    let module = module.map(|m| format!(" [{m}]")).unwrap_or_default();
                    let name = format!("{} {func}{module} ({names})", spec.label);
                    match self.attach_target(prog, true, &target) {
                        Ok(()) => HookStatus {
                            set: HookSet::Deep,
                            ..status(&name, "kprobe", Status::Attached, None)
                        },
                        Err(e) => unavailable(name, e),
                    }
                }
                Err(e) => unavailable(format!("{} at {addr:#x} ({names})", spec.label), e),
            };
            self.statuses.push(st);
        }
    }

    fn attach_target(
        &mut self,
        prog: &str,
        is_function: bool,
        target: &ResolvedHook,
    ) -> Result<()> {
        let attached = if is_function {
            self.load_decider(prog, |p| Ok(<&mut KProbe>::try_from(p)?.load()?))?;
            let p: &mut KProbe = self.program(prog)?.try_into()?;
            if p.fd().is_err() {
                p.load()?;
            }
            p.attach(&target.attach_to, 0).map(drop)
        } else {
            self.load_decider(prog, |p| Ok(<&mut RawTracePoint>::try_from(p)?.load()?))?;
            let p: &mut RawTracePoint = self.program(prog)?.try_into()?;
            p.load()?;
            p.attach(&target.attach_to).map(drop)
        };
        attached.map_err(|e| anyhow!("attaching to {}: {e}", target.attach_to))?;
        // The program ignores the function until the map has it: nothing to undo on failure.
        let mut funcs: BpfHashMap<_, u64, FuncHook> = BpfHashMap::try_from(self.map_mut("FUNCS")?)?;
        funcs.insert(target.key, target.args, 0)?;
        Ok(())
    }

    fn attach_tracepoint(
        &mut self,
        tp: &str,
        btf_prog: &str,
        raw_prog: &str,
        btf: &aya::Btf,
        kernel_btf: &KernelBtf,
    ) -> HookStatus {
        let mut reasons = Vec::new();
        if kernel_btf.has_btf_tracepoint(tp) {
            match self.attach_btf(btf_prog, tp, btf) {
                Ok(()) => return status(tp, "tp_btf", Status::Attached, None),
                Err(e) => reasons.push(format!("tp_btf: {e:#}")),
            }
        } else {
            reasons.push("tp_btf: no BTF for this tracepoint".to_string());
        }
        match self.attach_raw(raw_prog, tp) {
            Ok(()) => status(tp, "raw_tp", Status::Attached, Some(reasons.join("; "))),
            Err(e) => {
                reasons.push(format!("raw_tp: {e:#}"));
                let missing = !std::path::Path::new("/sys/kernel/tracing/events/net").exists();
                let st = if missing {
                    Status::Unavailable
                } else {
                    Status::Failed
                };
                status(tp, "raw_tp", st, Some(reasons.join("; ")))
            }
        }
    }

    fn attach_btf(&mut self, prog: &str, tp: &str, btf: &aya::Btf) -> Result<()> {
        self.load_decider(prog, |p| {
            Ok(<&mut BtfTracePoint>::try_from(p)?.load(tp, btf)?)
        })?;
        let p: &mut BtfTracePoint = self.program(prog)?.try_into()?;
        p.load(tp, btf)?;
        p.attach()?;
        Ok(())
    }

    fn attach_raw(&mut self, prog: &str, tp: &str) -> Result<()> {
        self.load_decider(prog, |p| Ok(<&mut RawTracePoint>::try_from(p)?.load()?))?;
        let p: &mut RawTracePoint = self.program(prog)?.try_into()?;
        p.load()?;
        p.attach(tp)?;
        Ok(())
    }

    /// Loads the decision program that follow program `prog` tail-calls (`load`: as `prog`
    /// itself is loaded, same type and target) into slot 0 of its program array, before
    /// `prog` is attached: a packet it must read is never met with an empty slot.
    fn load_decider(
        &mut self,
        prog: &str,
        load: impl FnOnce(&mut aya::programs::Program) -> Result<()>,
    ) -> Result<()> {
        // The frees' programs read no packet: they have none.
        let Some((name, array)) = decision_program(prog) else {
            return Ok(());
        };
        let Some(p) = self.ebpf.program_mut(&name) else {
            return Ok(());
        };
        if p.fd().is_err() {
            load(p).with_context(|| format!("loading {name}"))?;
        }
        let fd = p.fd()?.try_clone()?;
        let mut deciders = ProgramArray::try_from(self.map_mut(&array)?)?;
        deciders
            .set(0, &fd, 0)
            .with_context(|| format!("putting {name} in {array}"))?;
        Ok(())
    }

    fn program(&mut self, name: &str) -> Result<&mut aya::programs::Program> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} is missing from the eBPF object"))
    }

    /// Links the programs around the NAT in each of `namespaces` (None: this one), where a
    /// Service is translated. Where the kernel refuses, the statuses say why and the NAT stays
    /// inside the segment around it.
    pub fn attach_netfilter(&mut self, mode: Mode, namespaces: &[Option<&str>]) {
        let mut links = match ebpf_object().and_then(|o| NfLinks::load(o, &self.ebpf, mode)) {
            Ok(links) => links,
            Err(e) => {
                let why = Some(format!("{e:#}"));
                return self
                    .statuses
                    .push(status(NAT_HOOKS, "netfilter", Status::Failed, why));
            }
        };
        for ns in namespaces {
            let name = format!(
                "{NAT_HOOKS}{}",
                ns.map(|n| format!(" in {n}")).unwrap_or_default()
            );
            let st = match links.attach(*ns) {
                Ok(()) => status(&name, "netfilter", Status::Attached, None),
                Err(e) => status(&name, "netfilter", Status::Failed, Some(format!("{e:#}"))),
            };
            self.statuses.push(st);
        }
        self.netfilter = Some(links);
    }

    /// Attaches the tc programs of `mode` to `ifname` in namespace `ns` (None: this one): at
    /// egress, and at ingress if `at_ingress`.
    pub fn attach_tc(&mut self, mode: Mode, ns: Option<&str>, ifname: &str, at_ingress: bool) {
        for spec in HOOK_TABLE {
            if let (Via::Tc { ingress, .. }, Some(prog)) = (spec.via, spec.tc_program(mode)) {
                if ingress && !at_ingress {
                    continue;
                }
                let name = format!(
                    "{}@{}{}",
                    spec.label,
                    ifname,
                    ns.map(|n| format!("/{n}")).unwrap_or_default()
                );
                let st = match self.attach_tc_one(spec, &prog, ingress, ns, ifname) {
                    Ok(att) => {
                        self.tc.push(att);
                        status(&name, "tc", Status::Attached, None)
                    }
                    Err(e) => status(&name, "tc", Status::Failed, Some(format!("{e:#}"))),
                };
                self.statuses.push(st);
            }
        }
    }

    fn attach_tc_one(
        &mut self,
        spec: &HookDef,
        prog: &str,
        ingress: bool,
        ns: Option<&str>,
        ifname: &str,
    ) -> Result<TcAttachment> {
        let priority = NETLINK_PRIORITY + self.tc.len() as u16;
        let p: &mut SchedClassifier = self.program(prog)?.try_into()?;
        if p.fd().is_err() {
            p.load()?;
        }
        let kind = if ingress {
            TcAttachType::Ingress
        } else {
            TcAttachType::Egress
        };
        let tcx = super::has_tcx();
        // Before tcx, aya tells netlink links apart by ifindex, attach type and priority: a
        // priority of each attachment's own keeps alike ifindexes of two namespaces apart.
        let options = NlOptions {
            priority,
            ..Default::default()
        };
        // Interface names and tc links resolve in the calling thread's namespace.
        let (attached, clsact_added) = netns::run_in(ns, || {
            tc::ifindex(ifname, ns)?;
            if tcx {
                return Ok((p.attach(ifname, kind), false));
            }
            // Before tcx, tc programs hang off a clsact qdisc (Err: it was there already).
            let added = aya::programs::tc::qdisc_add_clsact(ifname).is_ok();
            let options = TcAttachOptions::Netlink(options);
            Ok((p.attach_with_options(ifname, kind, options), added))
        })?;
        if !tcx {
            // Recorded whether or not the program attached: the qdisc may be new.
            self.remember_tc_device(ns, ifname, clsact_added)?;
        }
        let link = attached?;
        Ok(TcAttachment {
            hook: spec.id,
            prog: prog.to_string(),
            netns: ns.map(str::to_string),
            ifname: ifname.to_string(),
            link,
        })
    }

    /// Before tcx, filters outlive the process: the device is recorded until detach_tc.
    fn remember_tc_device(
        &mut self,
        ns: Option<&str>,
        ifname: &str,
        clsact_added: bool,
    ) -> Result<()> {
        let known = self
            .tc_devices
            .iter_mut()
            .find(|d| d.netns.as_deref() == ns && d.ifname == ifname);
        match known {
            Some(d) => d.clsact_added |= clsact_added,
            None => self.tc_devices.push(tc::Device {
                netns: ns.map(str::to_string),
                ifname: ifname.to_string(),
                clsact_added,
            }),
        }
        tc::record(tc::HOPS, &self.tc_devices)
    }

    /// Attaches `up_hop` at every user probe, the probe's index as its cookie. A probe that
    /// cannot attach (no such symbol) fails the run: the user asked for that hop.
    pub fn attach_uprobes(&mut self, probes: &[UprobeSpec]) -> Result<()> {
        if probes.is_empty() {
            return Ok(());
        }
        let p: &mut UProbe = self
            .ebpf
            .program_mut("up_hop")
            .context("program up_hop is missing from the eBPF object")?
            .try_into()?;
        p.load()?;
        for (i, probe) in probes.iter().enumerate() {
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::Symbol(&probe.symbol),
                cookie: Some(i as u64),
            };
            p.attach(point, &probe.binary, UProbeScope::AllProcesses)
                .map_err(|e| {
                    // The kernel also refuses some first instructions (lock-prefixed ones) once a
                    // process runs the binary.
                    MissingHook(format!(
                        "cannot attach --uprobe {}:{}: {e} (no such symbol, or an instruction the kernel cannot probe)",
                        probe.binary.display(),
                        probe.symbol
                    ))
                })?;
            self.statuses.push(HookStatus {
                name: probe.hop_name(),
                kind: "uprobe".into(),
                status: Status::Attached,
                reason: None,
                set: HookSet::Stable,
            });
        }
        Ok(())
    }

    /// Detaches the tc programs inside their namespaces (netlink-based tc links detach by name),
    /// and removes the clsact qdiscs that were added for them.
    pub fn detach_tc(&mut self) {
        for att in std::mem::take(&mut self.tc) {
            let Ok(p) = self.program(&att.prog) else {
                continue;
            };
            let Ok(p): Result<&mut SchedClassifier, _> = p.try_into() else {
                continue;
            };
            let _ = netns::run_in(att.netns.as_deref(), || Ok(p.detach(att.link)?));
        }
        if self.tc_devices.is_empty() {
            return;
        }
        for d in std::mem::take(&mut self.tc_devices) {
            if d.clsact_added {
                if let Err(e) = tc::remove_clsact(&d) {
                    log::warn!("{e:#}");
                }
            }
        }
        tc::forget(tc::HOPS);
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        self.take_ring("EVENTS")
    }

    pub fn take_ring(&mut self, name: &str) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or_else(|| anyhow!("map {name} is missing"))?;
        Ok(RingBuf::try_from(map)?)
    }

    pub fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} is missing"))
    }

    pub fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} is missing"))
    }

    /// Per-CPU counters summed over CPUs, indexed by the COUNTER_* constants.
    pub fn counters(&self) -> Result<[u64; COUNTER_COUNT as usize]> {
        let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map("COUNTERS")?)?;
        let mut out = [0; COUNTER_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = arr.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    /// Kernel cost of each loaded program (meaningful while `aya::sys::enable_stats` is held).
    pub fn costs(&self) -> Vec<ProgramCost> {
        let mut costs: Vec<_> = self
            .ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                let run_count = info.run_count();
                let run_time_ns = info.run_time().as_nanos() as u64;
                let ns_per_run = if run_count == 0 {
                    0.0
                } else {
                    run_time_ns as f64 / run_count as f64
                };
                Some(ProgramCost {
                    program: name.to_string(),
                    run_count,
                    run_time_ns,
                    ns_per_run,
                    verified_insns: info.verified_instruction_count(),
                })
            })
            .collect();
        costs.sort_by(|a, b| a.program.cmp(&b.program));
        costs
    }
}

impl Drop for Programs {
    fn drop(&mut self) {
        self.detach_tc();
    }
}

/// Whether the table lists `func` of `module` as a hook of its own (virtio-net's start_xmit).
fn curated(func: &str, module: Option<&str>) -> bool {
    HOOK_TABLE.iter().any(|h| match h.via {
        Via::Function { func: f, module: m } => f == func && module.is_none_or(|x| x == m),
        _ => false,
    })
}

/// The netfilter programs around the NAT, as one hook in the statuses.
const NAT_HOOKS: &str = "nat hooks";

fn status(name: &str, kind: &str, status: Status, reason: Option<String>) -> HookStatus {
    let reason = reason.filter(|r| !r.is_empty());
    HookStatus {
        name: name.to_string(),
        kind: kind.to_string(),
        status,
        reason,
        set: HookSet::Stable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hook table names programs by convention; each must exist.
    #[test]
    fn every_program_named_here_is_in_the_ebpf_object() {
        use object::{Object as _, ObjectSymbol as _};
        let obj =
            object::File::parse(ebpf_object().expect("the eBPF object")).expect("an ELF object");
        let symbols: Vec<&str> = obj.symbols().filter_map(|s| s.name().ok()).collect();
        for spec in HOOK_TABLE {
            for prog in spec.programs() {
                assert!(
                    symbols.contains(&prog.as_str()),
                    "{prog} is not in the object"
                );
            }
        }
    }

    /// Every follow program of a hook that reads packets tail-calls a decision program, which
    /// the loader finds by convention; only the frees have none.
    #[test]
    fn every_follow_hop_program_has_its_decision_program() {
        use object::{Object as _, ObjectSymbol as _};
        let obj =
            object::File::parse(ebpf_object().expect("the eBPF object")).expect("an ELF object");
        let symbols: Vec<&str> = obj.symbols().filter_map(|s| s.name().ok()).collect();
        let frees = [HookId::KfreeSkb, HookId::ConsumeSkb];
        for spec in HOOK_TABLE.iter().filter(|h| !frees.contains(&h.id)) {
            for prog in spec.programs() {
                let Some((decider, array)) = decision_program(&prog) else {
                    continue;
                };
                for name in [&decider, &array] {
                    assert!(
                        symbols.contains(&name.as_str()),
                        "{name} (for {prog}) is not in the object"
                    );
                }
            }
        }
    }
}
