//! `profiler compare`: several network types side by side, like the study's comparison, but with
//! the segments that make each type differ from the host baseline measured instead of argued.

use std::collections::HashMap;

use anyhow::{bail, Result};

use super::{ensure_lab, profile, RunArgs};
use crate::{
    lab::{self, target::RunTarget, Lab, LabOptions, Net2, Network, Placement},
    report::schema::{
        CompareReport, CompareRow, Contributor, DirectionReport, RunReport, Skipped, COMPARE_SCHEMA,
    },
    signal::interruptible,
};

/// How many segments to name per type: the largest contributors to its difference.
const TOP: usize = 4;
const PROGRAMS: &str = "(the profiler's own programs)";

/// Which paths of each type's lab are profiled: its placement, and its pods' interfaces (eth0,
/// and net1 on a second network of type `net2`).
pub struct Paths {
    pub placement: Placement,
    pub net2: Option<Net2>,
    pub ifaces: Vec<String>,
}

/// Profiles every (type, interface, size); the first type's first interface is the baseline. A type whose lab this machine
/// cannot build (lab::CannotBuild) is skipped with the reason, except the baseline, without
/// which nothing compares; any other failure stops the comparison.
pub async fn compare(
    types: &[Network],
    sizes: &[usize],
    paths: &Paths,
    base: &RunArgs,
) -> Result<CompareReport> {
    let placement = paths.placement;
    if types.is_empty() || sizes.is_empty() {
        bail!("--lab and --sizes need at least one value each");
    }
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    for (i, &t) in types.iter().enumerate() {
        let options = LabOptions {
            placement,
            service: t.service,
            net2: paths.net2,
            ..LabOptions::default()
        };
        // Ctrl-C while a lab comes up: `up` removes what it made.
        let used = match interruptible(ensure_lab(t.topology, &options, "compare")).await {
            Ok(used) => used,
            Err(e) if i > 0 && lab::CannotBuild::is(&e) => {
                eprintln!("skipping {t}: {e:#}");
                skipped.push(Skipped {
                    topology: lab::lab_name(t.topology, placement),
                    reason: format!("{e:#}"),
                });
                continue;
            }
            Err(e) if i == 0 => return Err(e.context("the baseline lab")),
            Err(e) => return Err(e),
        };
        // Ctrl-C while profiling: the lab this compare made still goes.
        let result = interruptible(async {
            for iface in &paths.ifaces {
                profile_sizes(t, sizes, base, &used.lab.over(iface)?, &mut runs).await?;
            }
            anyhow::Ok(())
        })
        .await;
        used.release(false).await?;
        result?;
    }
    let summary = summarize(&runs);
    Ok(CompareReport {
        made: None,
        schema: COMPARE_SCHEMA.into(),
        placement,
        summary,
        skipped,
        runs,
    })
}

/// Profiles `lab` at each size, adding the reports to `runs`, each named after the lab and its
/// Service (`bridge+iptables`: the same lab with a Service is another row).
async fn profile_sizes(
    network: Network,
    sizes: &[usize],
    base: &RunArgs,
    lab: &Lab,
    runs: &mut Vec<RunReport>,
) -> Result<()> {
    for &size in sizes {
        eprintln!("== {} at {size} B", Network::label(lab));
        let args = RunArgs {
            lab: network.topology,
            size,
            ..base.clone()
        };
        let report = profile(&args, &RunTarget::lab(lab)).await?;
        runs.push(RunReport {
            topology: Network::label(lab),
            ..report
        });
    }
    Ok(())
}

fn named<'a>(r: &'a RunReport, direction: &str) -> Option<&'a DirectionReport> {
    r.directions
        .iter()
        .find(|d| d.direction.starts_with(direction))
}

fn request(r: &RunReport) -> Option<&DirectionReport> {
    named(r, "request")
}

/// Rows in run order; each type's contributors against the first type at the same size.
pub fn summarize(runs: &[RunReport]) -> Vec<CompareRow> {
    let baseline_topology = runs.first().map(|r| r.topology.clone());
    let baseline: HashMap<usize, &RunReport> = runs
        .iter()
        .filter(|r| Some(&r.topology) == baseline_topology.as_ref())
        .map(|r| (r.traffic.size, r))
        .collect();
    runs.iter()
        .filter_map(|r| {
            let req = request(r)?;
            let difference = baseline
                .get(&r.traffic.size)
                .filter(|b| b.topology != r.topology)
                .and_then(|b| difference(r, b, "request"));
            Some(CompareRow {
                topology: r.topology.clone(),
                size: r.traffic.size,
                p50_ns: req.end_to_end.p50_ns,
                p99_ns: req.end_to_end.p99_ns,
                mean_ns: req.end_to_end.mean_ns,
                delta_ns: difference.as_ref().map(|d| d.0),
                contributors: difference.map(|d| d.1).unwrap_or_default(),
            })
        })
        .collect()
}

/// How much longer `run`'s tagged packets of `direction` take than `base`'s (mean, ns), and the
/// segments that account for it, largest first; None if either has no such direction. The
/// direction is the first whose name starts with `direction`: "request", "stream", or an
/// all-to-all path kind ("cross host", named "cross host (pod-a -> pod-b)").
pub fn difference(
    run: &RunReport,
    base: &RunReport,
    direction: &str,
) -> Option<(f64, Vec<Contributor>)> {
    let (ours, theirs) = (named(run, direction)?, named(base, direction)?);
    let delta = ours.end_to_end.mean_ns - theirs.end_to_end.mean_ns;
    Some((delta, contributors(ours, theirs, delta)))
}

/// What a segment is compared by: its name, except the first and last (the sending and
/// receiving application's stack), which are named after different namespaces in each type.
fn role(d: &DirectionReport, i: usize) -> &str {
    match i {
        0 => "sender: socket and stack",
        _ if i + 1 == d.segments.len() => "receiver: stack and socket",
        _ => &d.segments[i].name,
    }
}

/// Every segment of either path, by role: one only the baseline has (the bridge a macvlan path
/// does without) counts as all of its time removed.
fn contributors(run: &DirectionReport, base: &DirectionReport, total: f64) -> Vec<Contributor> {
    // The profiler's own programs too: a longer path runs more of them.
    let means = |d: &DirectionReport| -> Vec<(String, f64)> {
        (0..d.segments.len())
            .map(|i| (role(d, i).to_string(), d.segments[i].stats.mean_ns))
            .chain([(PROGRAMS.to_string(), d.profiler_programs.mean_ns)])
            .collect()
    };
    let (ours, theirs) = (means(run), means(base));
    let mean_in =
        |list: &[(String, f64)], role: &str| list.iter().find(|(r, _)| r == role).map(|&(_, m)| m);
    let removed = theirs.iter().filter(|(r, _)| mean_in(&ours, r).is_none());
    let mut c: Vec<Contributor> = ours
        .iter()
        .map(|(r, m)| (r, m - mean_in(&theirs, r).unwrap_or(0.0)))
        .chain(removed.map(|(r, m)| (r, -m)))
        .map(|(r, delta)| Contributor {
            segment: r.clone(),
            delta_ns: delta,
            percent: if total.abs() > f64::EPSILON {
                delta / total * 100.0
            } else {
                0.0
            },
        })
        .collect();
    // The segments that push the way the total goes first: the slowest for a type slower than
    // the baseline, the fastest for one that is faster.
    let toward = if total < 0.0 { -1.0 } else { 1.0 };
    // What did not change makes no difference.
    c.retain(|x| x.delta_ns.abs() >= 1.0);
    c.sort_by(|a, b| (toward * b.delta_ns).total_cmp(&(toward * a.delta_ns)));
    c.truncate(TOP);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::schema::{
        EventsReport, HookSet, Proto, SegmentReport, Stats, TrafficReport, RUN_SCHEMA,
    };

    fn stats(mean_ns: f64) -> Stats {
        Stats {
            samples: 1,
            mean_ns,
            p50_ns: mean_ns as u64,
            p90_ns: 0,
            p99_ns: 0,
            max_ns: 0,
        }
    }

    fn run(topology: &str, segments: &[(&str, f64)]) -> RunReport {
        let segments: Vec<SegmentReport> = segments
            .iter()
            .enumerate()
            .map(|(i, (name, mean))| SegmentReport {
                name: name.to_string(),
                from: i,
                to: i + 1,
                userspace: false,
                estimated: false,
                stats: stats(*mean),
            })
            .collect();
        let total = segments.iter().map(|s| s.stats.mean_ns).sum();
        RunReport {
            schema: RUN_SCHEMA.into(),
            made: None,
            kernel: "test".into(),
            topology: topology.into(),
            service: None,
            hook_set: HookSet::Stable,
            traffic: TrafficReport {
                proto: Proto::Udp,
                size: 64,
                count: 1,
                completed: 1,
            },
            directions: vec![DirectionReport {
                direction: "request".into(),
                hops: Vec::new(),
                segments,
                profiler_programs: stats(0.0),
                end_to_end: stats(total),
                complete_packets: 1,
                incomplete_packets: 0,
                missing_hops: Vec::new(),
                other_paths: Vec::new(),
            }],
            events: EventsReport {
                received: 0,
                lost: 0,
                incomplete_packets: 0,
                unreadable: 0,
                fragments: 0,
                drops: Vec::new(),
            },
            hooks: Vec::new(),
            program_costs: None,
            stream: None,
            alltoall: None,
            crossings: Vec::new(),
        }
    }

    #[test]
    fn differences_are_attributed_by_segment_and_role() {
        let host = run(
            "host",
            &[
                ("socket and stack (host-a)", 2000.0),
                ("veth wire0", 500.0),
                ("stack and socket (host-b)", 8000.0),
            ],
        );
        let bridge = run(
            "bridge",
            &[
                ("socket and stack (pod-a)", 2500.0),
                ("bridge cni0", 1500.0),
                ("veth wire0", 500.0),
                ("stack and socket (pod-b)", 8000.0),
            ],
        );
        let rows = summarize(&[host, bridge]);
        assert_eq!(rows[0].delta_ns, None, "the first type is the baseline");
        assert_eq!(rows[1].delta_ns, Some(2000.0));
        let c = &rows[1].contributors;
        // The bridge is new (all of it counts), the sender's stack grew by 500 ns, and the
        // receiver's stack, named after another namespace, is matched by role: no change, so
        // it is not listed (unmatched, it would count 8 us as new).
        assert_eq!(
            (c[0].segment.as_str(), c[0].delta_ns, c[0].percent),
            ("bridge cni0", 1500.0, 75.0)
        );
        assert_eq!(
            (c[1].segment.as_str(), c[1].delta_ns),
            ("sender: socket and stack", 500.0)
        );
        assert_eq!(c.len(), 2, "{c:?}");
    }

    #[test]
    fn a_type_faster_than_the_baseline_lists_what_makes_it_faster() {
        let base = run(
            "bridge",
            &[
                ("socket and stack (pod-a)", 2000.0),
                ("bridge cni0", 1500.0),
                ("stack and socket (pod-b)", 8000.0),
            ],
        );
        let macvlan = run(
            "macvlan",
            &[
                ("socket and stack (pod-a)", 2000.0),
                ("macvlan eth0 -> wire0", 500.0),
                ("stack and socket (pod-b)", 7000.0),
            ],
        );
        let rows = summarize(&[base, macvlan]);
        assert_eq!(rows[1].delta_ns, Some(-2000.0));
        let c = &rows[1].contributors;
        // The bridge macvlan does without is the largest saving, then the receiver's stack;
        // the macvlan hop itself costs time and comes last.
        assert_eq!(
            (c[0].segment.as_str(), c[0].delta_ns, c[0].percent),
            ("bridge cni0", -1500.0, 75.0)
        );
        assert_eq!(
            (c[1].segment.as_str(), c[1].delta_ns, c[1].percent),
            ("receiver: stack and socket", -1000.0, 50.0)
        );
        let last = c.last().unwrap();
        assert_eq!(
            (last.segment.as_str(), last.delta_ns, last.percent),
            ("macvlan eth0 -> wire0", 500.0, -25.0)
        );
    }
}
