//! `profiler run`: bring the lab up if needed, attach, drive tagged traffic, attribute, report.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use profiler_common::{Event, COUNTER_LOST, COUNTER_UNREADABLE, DIR_REQUEST, DIR_RESPONSE};
use tokio::sync::oneshot;

use crate::{
    btf::KernelBtf,
    collect,
    datapath::{HookSet, Mode},
    doctor,
    hooks::{ProbeConfig, Probes},
    journey::{self, Attribution, HopKey, Stats},
    lab::{self, discover, Lab, LabOptions, Topology},
    path::{self, Attached, Hop, Inodes},
    report::{
        DirectionReport, DropReport, EventsReport, MissingHop, OtherPath, RunReport, SegmentReport,
        TrafficReport, RUN_SCHEMA,
    },
    target::{Devices, Target},
    traffic::{self, Endpoints, Proto, Spec},
};

/// Paths other than the most common one shown per direction.
const MAX_OTHER_PATHS: usize = 3;

#[derive(Clone, Debug)]
pub struct RunArgs {
    pub lab: Topology,
    pub proto: Proto,
    pub size: usize,
    pub count: u32,
    pub rate: Option<f64>,
    pub port: u16,
    pub stats: bool,
    pub hooks: HookSet,
    pub timeout: Duration,
}

/// Waits this long after the last exchange for the ring buffer to deliver its last events.
const DRAIN: Duration = Duration::from_millis(200);
/// Untagged exchanges before the measured ones, so neighbour resolution is not measured.
const WARMUP: u32 = 3;

impl RunArgs {
    pub fn spec(&self, run_id: u32) -> Spec {
        Spec {
            proto: self.proto,
            size: self.size,
            count: self.count,
            rate: self.rate,
            run_id,
            port: self.port,
            timeout: self.timeout,
        }
    }
}

/// Profiles the target (a lab that is up, or a discovered path) and returns the report.
pub async fn profile(args: &RunArgs, lab: &Target) -> Result<RunReport> {
    let run_id = rand_run_id();
    let spec = args.spec(run_id);
    spec.validate()?;
    let ends = Endpoints {
        client_ns: discover::ns_arg(&lab.client.netns).map(str::to_string),
        server_ns: discover::ns_arg(&lab.server.netns).map(str::to_string),
        server_addr: lab.server.addr,
    };
    warm_up(&spec, &ends).await?;

    let btf = KernelBtf::load()?;
    let mut probes = Probes::load(
        &btf,
        &ProbeConfig {
            run_id,
            port: args.port,
            ..Default::default()
        },
    )?;
    let hook_set = probes.attach_set(&btf, Mode::Tagged, args.hooks)?;
    for (ns, ifname) in &lab.attach {
        probes.attach_tc(discover::ns_arg(ns), ifname);
    }
    // Held for the run: the kernel counts each program's run time while this fd is open.
    let _stats = if args.stats {
        Some(aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling bpf_stats")?)
    } else {
        None
    };

    let (stop_tx, stop_rx) = oneshot::channel();
    let collector = tokio::spawn(collect::collect(probes.take_events()?, stop_rx));
    let progress = Arc::new(AtomicU32::new(0));
    let reporter = tokio::spawn(report_progress(progress.clone(), spec.count));
    let outcome = traffic::run(&spec, &ends, progress).await;
    reporter.abort();
    tokio::time::sleep(DRAIN).await;
    let _ = stop_tx.send(());
    let events = collector.await.context("the event collector stopped")??;
    let outcome = outcome?;
    let counters = probes.counters()?;
    let costs = args.stats.then(|| probes.costs());

    let inodes = Inodes::of(&lab.devices)?;
    let attached = Attached::from_probes(&probes);
    let tc_netns: HashMap<_, _> = probes
        .tc
        .iter()
        .map(|a| ((a.hook, a.ifindex), a.netns_inode))
        .collect();
    let app_netns = [inodes.get(&lab.client.netns), inodes.get(&lab.server.netns)];
    let sorted = journey::observations(&events, &outcome.stamps, app_netns, &tc_netns);
    let mut directions = Vec::new();
    let mut incomplete = 0;
    for (dir, name) in [(DIR_REQUEST, "request"), (DIR_RESPONSE, "response")] {
        let paths = journey::paths(&sorted.observations, dir);
        let keys = paths.first().map(|(k, _)| k.clone()).unwrap_or_default();
        let describe = |keys: &[HopKey]| {
            let flags = journey::hop_flags(&sorted.observations, dir, keys);
            path::describe(keys, &flags, &lab.devices, &inodes, &attached)
        };
        let attribution = journey::attribute(&sorted.observations, dir, &keys);
        incomplete += attribution.incomplete;
        let mut report = direction_report(name, describe(&keys), attribution, &lab.devices);
        report.other_paths = paths
            .iter()
            .skip(1)
            .take(MAX_OTHER_PATHS)
            .map(|(keys, packets)| {
                let hops = describe(keys);
                let a = journey::attribute(&sorted.observations, dir, keys);
                OtherPath {
                    packets: *packets,
                    segments: segment_reports(&hops, a.segments, &lab.devices),
                    hops,
                    end_to_end: a.end_to_end,
                }
            })
            .collect();
        directions.push(report);
    }
    Ok(RunReport {
        schema: RUN_SCHEMA,
        kernel: doctor::kernel_release(),
        topology: lab.devices.name.clone(),
        traffic: TrafficReport {
            proto: args.proto,
            size: args.size,
            count: args.count,
            completed: outcome.completed,
        },
        directions,
        events: EventsReport {
            received: events.len() as u64,
            lost: counters[COUNTER_LOST as usize],
            incomplete_packets: incomplete,
            unreadable: counters[COUNTER_UNREADABLE as usize],
            fragments: sorted.fragments,
            drops: drop_report(&sorted.drops, lab, &btf),
        },
        hook_set,
        hooks: probes.statuses.clone(),
        program_costs: costs,
    })
}

fn direction_report(
    name: &'static str,
    hops: Vec<Hop>,
    a: Attribution,
    lab: &Devices,
) -> DirectionReport {
    let segments = segment_reports(&hops, a.segments, lab);
    DirectionReport {
        direction: name,
        hops,
        segments,
        profiler_programs: a.probes,
        end_to_end: a.end_to_end,
        complete_packets: a.complete,
        incomplete_packets: a.incomplete,
        missing_hops: a
            .missing
            .into_iter()
            .map(|(hop, packets)| MissingHop { hop, packets })
            .collect(),
        other_paths: Vec::new(),
    }
}

fn segment_reports(hops: &[Hop], stats: Vec<Stats>, lab: &Devices) -> Vec<SegmentReport> {
    path::segment_names(hops, lab)
        .into_iter()
        .zip(stats)
        .enumerate()
        .map(|(i, (name, stats))| SegmentReport {
            name,
            from: i,
            to: i + 1,
            stats,
        })
        .collect()
}

fn drop_report(drops: &[Event], lab: &Target, btf: &KernelBtf) -> Vec<DropReport> {
    let reasons = btf.drop_reasons();
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for d in drops {
        let reason = reasons
            .get(&d.drop_reason)
            .cloned()
            .unwrap_or_else(|| d.drop_reason.to_string());
        let ifname = lab
            .devices
            .interfaces
            .iter()
            .find(|i| i.ifindex == d.ifindex)
            .map_or(format!("ifindex {}", d.ifindex), |i| i.ifname.clone());
        *counts.entry((reason, ifname)).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|((reason, ifname), packets)| DropReport {
            reason,
            ifname,
            packets,
        })
        .collect()
}

async fn warm_up(spec: &Spec, ends: &Endpoints) -> Result<()> {
    // Run id 0 is never the measured run's, so the kernel ignores these.
    let warm = Spec {
        count: WARMUP,
        run_id: 0,
        rate: None,
        ..spec.clone()
    };
    traffic::run(&warm, ends, Arc::new(AtomicU32::new(0)))
        .await
        .context("warming up the path")?;
    Ok(())
}

/// Progress on stderr once a second for long runs.
async fn report_progress(done: Arc<AtomicU32>, total: u32) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        eprintln!("  {} / {} exchanges", done.load(Ordering::Relaxed), total);
    }
}

fn rand_run_id() -> u32 {
    // Nonzero and different per run; uniqueness across concurrent runs is all that matters.
    let t = traffic::now_ns();
    ((t ^ (t >> 32) ^ std::process::id() as u64) as u32) | 1
}

/// Brings the lab up if it is not, and says whether this call did (so it must take it down).
pub async fn ensure_lab(topology: Topology, options: &LabOptions) -> Result<(Lab, bool)> {
    let name = lab::lab_name(topology, options.placement);
    match lab::get(&name)? {
        Some(lab) if options.mtu.is_some() && options.mtu != lab.mtu => {
            anyhow::bail!(
                "lab {name} is already up with another MTU ({}); take it down first (profiler lab down {name})",
                lab.mtu.map_or("the topology's default".to_string(), |m| m.to_string())
            )
        }
        Some(lab) => Ok((lab, false)),
        None => {
            eprintln!("bringing up lab {name}");
            Ok((lab::up(topology, options).await?, true))
        }
    }
}
