//! The study's findings 1-7 (shared/paper.md), each judged on the bench's cells by one rule.
//! The rules are data ([`RULES`]); a finding needs types this machine cannot build, or hardware
//! it does not have, is reported as not testable with why, never guessed.

use crate::{
    lab::{self, LabOptions, Placement, Topology},
    report::schema::{
        BenchCell, CellStatus, Finding, FindingNumber, SegmentDifference, Skipped, TrafficKind,
    },
    run::compare,
};

/// What a cell is judged on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Stream throughput, Gbit/s: higher is better.
    Throughput,
    /// rr one-way request latency, p50: lower is better.
    LatencyP50,
    /// All-to-all round latency, p50, with this many processes per pod: lower is better.
    RoundP50 { procs: u32 },
}

impl Metric {
    fn experiment(self) -> TrafficKind {
        match self {
            Metric::Throughput => TrafficKind::Stream,
            Metric::LatencyP50 => TrafficKind::Rr,
            Metric::RoundP50 { .. } => TrafficKind::Alltoall,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Metric::Throughput => "gbit_per_s",
            Metric::LatencyP50 => "p50_us",
            Metric::RoundP50 { .. } => "round_p50_ms",
        }
    }

    fn value(self, c: &BenchCell) -> Option<f64> {
        match self {
            Metric::Throughput => c.result.gbit_per_s,
            Metric::LatencyP50 => c.result.p50_ns.map(|ns| ns as f64 / 1e3),
            Metric::RoundP50 { procs } if c.procs == Some(procs) => c.result.round_p50_ms,
            Metric::RoundP50 { .. } => None,
        }
    }

    /// Whether `a` is better than `b`.
    fn better(self, a: f64, b: f64) -> bool {
        match self {
            Metric::Throughput => a > b,
            Metric::LatencyP50 | Metric::RoundP50 { .. } => a < b,
        }
    }
}

/// How a finding is judged here.
#[derive(Clone, Copy, Debug)]
pub enum Test {
    /// It needs what no lab of this project can be (hardware, VMs fit for timing): why.
    Untestable(&'static str),
    /// On `metric`, at `placement` and every measured size from `min_size` up, every type of
    /// `better` that ran beats every type of `worse` that ran.
    Beats {
        metric: Metric,
        placement: Placement,
        better: &'static [Topology],
        worse: &'static [Topology],
        min_size: usize,
    },
}

pub struct Rule {
    pub number: u8,
    /// The study's claim, in shared/paper.md's words.
    pub claim: &'static str,
    /// What of it is tested, and how.
    pub test_text: &'static str,
    pub test: Test,
}

const VM_WHY: &str = "pods inside VMs: the VM lab here runs under QEMU's TCG, 10-50x slower than native (shared/kernel-lab.md), so its timings say nothing about VM networking";

/// The findings' rules, in the study's order.
pub const RULES: [Rule; 7] = [
    Rule {
        number: 1,
        // "Same host: ovs-vxlan/gre about 10% more throughput than flannel-vxlan, because
        // flannel's packet crosses the docker bridge and the flannel bridge."
        claim: "Same host: ovs-vxlan/gre about 10% more throughput than flannel-vxlan (flannel's packet crosses the docker bridge and the flannel bridge)",
        test_text: "same-host stream throughput: ovs-vxlan and ovs-gre above flannel-vxlan at every size",
        test: Test::Beats {
            metric: Metric::Throughput,
            placement: Placement::SameHost,
            better: &[Topology::OvsVxlan, Topology::OvsGre],
            worse: &[Topology::FlannelVxlan],
            min_size: 0,
        },
    },
    Rule {
        number: 2,
        // "Same host: macvlan has the highest throughput; ovs-vlan about 20% below it (veth
        // pair overhead); ipvlan L2 the lowest."
        claim: "Same host: macvlan has the highest throughput; ovs-vlan about 20% below it (veth pair overhead); ipvlan L2 the lowest",
        test_text: "same-host stream throughput: macvlan above the veth-based types (bridge, ovs-vlan) and ipvlan-l2 at every size",
        test: Test::Beats {
            metric: Metric::Throughput,
            placement: Placement::SameHost,
            better: &[Topology::Macvlan],
            worse: &[Topology::Bridge, Topology::OvsVlan, Topology::IpvlanL2],
            min_size: 0,
        },
    },
    Rule {
        number: 3,
        // "SR-IOV wins below 16 KB messages, loses above."
        claim: "SR-IOV wins below 16 KB messages, loses above (the NIC's switch runs at link speed, kernel switching is CPU-bound)",
        test_text: "needs an SR-IOV VF in a pod",
        test: Test::Untestable(
            "needs an SR-IOV NIC: this machine has none; the VM lab's emulated igb VFs carry traffic (the sriov lab), but QEMU's switch is software under TCG, so its timings say nothing about a NIC's",
        ),
    },
    Rule {
        number: 4,
        // "UDP latency: macvlan and SR-IOV clearly better than veth-based paths from 8 KB
        // messages up." (Its throughput parts need SR-IOV and OVS.)
        claim: "Different hosts: macvlan beats SR-IOV; flannel-vxlan < ovs-vxlan, ovs-vlan; UDP latency of macvlan and SR-IOV clearly better than veth-based paths from 8 KB up",
        test_text: "cross-host UDP request latency (p50) from 8 KiB up: macvlan below the veth-based types (bridge, flannel-vxlan, ovs-*); the SR-IOV parts are not testable here",
        test: Test::Beats {
            metric: Metric::LatencyP50,
            placement: Placement::CrossHost,
            better: &[Topology::Macvlan],
            worse: &[
                Topology::Bridge,
                Topology::FlannelVxlan,
                Topology::OvsVlan,
                Topology::OvsVxlan,
                Topology::OvsGre,
            ],
            min_size: 8192,
        },
    },
    Rule {
        number: 5,
        // "BMP2VMP: VXLAN inside the VM over VLAN/SR-IOV host networks degrades badly."
        claim: "Bare-metal pod to VM pod: VXLAN inside the VM over VLAN/SR-IOV host networks degrades badly (double encap, MTU mismatch); same-type networks perform well",
        test_text: "needs pods in VMs",
        test: Test::Untestable(VM_WHY),
    },
    Rule {
        number: 6,
        // "VMP2VMP: about 20% below BMP2VMP overall; ... SR-IOV offload about 20-25% better
        // than legacy SR-IOV."
        claim: "VM pod to VM pod: about 20% below bare-metal to VM; VLAN in the VM over SR-IOV with offload reaches bare-metal macvlan levels",
        test_text: "needs pods in VMs and SR-IOV offload",
        test: Test::Untestable(VM_WHY),
    },
    Rule {
        number: 7,
        // "Scaling (MPI_Alltoall, 8 pods per node, 2 then 4 processes per pod, 16 KB
        // messages): VLAN about 10% better than overlay." Table 3 ranks macvlan with the VLAN
        // network (differ-host 14.52 and 14.81 ms against flannel's 16.11), so macvlan stands
        // in for it where vlan and ovs-vlan cannot be built.
        claim: "Scaling (MPI_Alltoall, 8 pods per node, 2 then 4 processes per pod, 16 KB): VLAN about 10% better than overlay",
        test_text: "cross-host all-to-all round latency (p50, 4 processes per pod): the VLAN types (ovs-vlan, vlan, and macvlan, which Table 3 ranks with them) below the overlays (flannel-vxlan, ovs-vxlan, ovs-gre)",
        test: Test::Beats {
            metric: Metric::RoundP50 { procs: 4 },
            placement: Placement::CrossHost,
            better: &[Topology::OvsVlan, Topology::Vlan, Topology::Macvlan],
            worse: &[Topology::FlannelVxlan, Topology::OvsVxlan, Topology::OvsGre],
            min_size: 0,
        },
    },
];

/// Every finding judged on `cells`; what was not run is explained from `skipped` and the
/// types and placements asked for.
pub fn judge(
    cells: &[BenchCell],
    skipped: &[Skipped],
    types: &[Topology],
    placements: &[Placement],
) -> Vec<Finding> {
    let ctx = Context {
        cells,
        skipped,
        types,
        placements,
    };
    RULES.iter().map(|r| ctx.judge(r)).collect()
}

struct Context<'a> {
    cells: &'a [BenchCell],
    skipped: &'a [Skipped],
    types: &'a [Topology],
    placements: &'a [Placement],
}

impl Context<'_> {
    fn judge(&self, rule: &Rule) -> Finding {
        let mut finding = Finding {
            number: rule.number,
            claim: rule.claim.into(),
            test: rule.test_text.into(),
            holds: None,
            why: None,
            numbers: Vec::new(),
            segments: Vec::new(),
        };
        match rule.test {
            Test::Untestable(why) => finding.why = Some(why.into()),
            Test::Beats {
                metric,
                placement,
                better,
                worse,
                min_size,
            } => {
                let better = self.side(metric, placement, better, min_size);
                let worse = self.side(metric, placement, worse, min_size);
                self.compare(&mut finding, metric, &better, &worse);
            }
        }
        finding
    }

    /// The cells of `types` that measured `metric` at `placement`, each type's by size; and for
    /// every type without any, why.
    fn side(
        &self,
        metric: Metric,
        placement: Placement,
        types: &[Topology],
        min_size: usize,
    ) -> Side<'_> {
        let mut side = Side::default();
        for &t in types {
            let name = lab::lab_name(t, placement);
            let ran: Vec<&BenchCell> = self
                .cells
                .iter()
                .filter(|c| c.lab == name && c.status == CellStatus::Ok && c.size >= min_size)
                .filter(|c| c.experiment == metric.experiment() && metric.value(c).is_some())
                .collect();
            if ran.is_empty() {
                side.missing
                    .push(format!("{name}: {}", self.why_not(t, placement, metric)));
            } else {
                side.cells.push(ran);
            }
        }
        side
    }

    /// Why no cell of type `t` at `placement` measured `metric`.
    fn why_not(&self, t: Topology, placement: Placement, metric: Metric) -> String {
        let name = lab::lab_name(t, placement);
        let options = LabOptions {
            placement,
            ..LabOptions::default()
        };
        if let Err(e) = lab::check(t, &options) {
            return format!("no such lab ({e:#})");
        }
        if !self.types.contains(&t) || !self.placements.contains(&placement) {
            return "not in --types/--placement".into();
        }
        if let Some(s) = self.skipped.iter().find(|s| s.topology == name) {
            return s.reason.clone();
        }
        let reasons = self
            .cells
            .iter()
            .filter(|c| c.lab == name && c.experiment == metric.experiment())
            .filter_map(|c| c.reason.as_deref());
        reasons
            .into_iter()
            .next()
            .map_or("no cell measured it".into(), str::to_string)
    }

    fn compare(&self, finding: &mut Finding, metric: Metric, better: &Side, worse: &Side) {
        if better.cells.is_empty() || worse.cells.is_empty() {
            finding.why = Some(format!("not measured here: {}", missing(better, worse)));
            return;
        }
        let mut holds = true;
        for b in better.cells.iter().flatten() {
            for w in worse.cells.iter().flatten().filter(|w| w.size == b.size) {
                let (vb, vw) = (metric.value(b), metric.value(w));
                if let (Some(vb), Some(vw)) = (vb, vw) {
                    holds &= metric.better(vb, vw);
                }
            }
        }
        let all = better.cells.iter().chain(&worse.cells).flatten();
        finding.numbers = all
            .map(|c| FindingNumber {
                lab: c.lab.clone(),
                size: c.size,
                metric: metric.name().into(),
                value: metric.value(c).unwrap_or(f64::NAN),
            })
            .collect();
        finding.segments = differences(better, worse);
        finding.holds = Some(holds);
        if !better.missing.is_empty() || !worse.missing.is_empty() {
            finding.why = Some(format!("judged without {}", missing(better, worse)));
        }
    }
}

#[derive(Default)]
struct Side<'a> {
    /// Per type that ran: its cells, one per size.
    cells: Vec<Vec<&'a BenchCell>>,
    /// Per type that did not: "lab: why".
    missing: Vec<String>,
}

/// The types of either side that did not run, with why.
fn missing(better: &Side, worse: &Side) -> String {
    let all: Vec<&str> = better
        .missing
        .iter()
        .chain(&worse.missing)
        .map(String::as_str)
        .collect();
    all.join("; ")
}

/// For every (better, worse) pair, at the largest size both measured: the segments that make
/// the better one's tagged messages faster (or slower), by compare's attribution.
fn differences(better: &Side, worse: &Side) -> Vec<SegmentDifference> {
    let mut out = Vec::new();
    for b in &better.cells {
        for w in &worse.cells {
            let pair = b
                .iter()
                .rev()
                .find_map(|bc| w.iter().find(|wc| wc.size == bc.size).map(|wc| (bc, wc)));
            let Some((bc, wc)) = pair else { continue };
            let (Some(br), Some(wr)) = (&bc.run, &wc.run) else {
                continue;
            };
            let direction = match bc.experiment {
                TrafficKind::Rr => "request",
                TrafficKind::Stream => "stream",
                // The pod pairs the placement is about.
                TrafficKind::Alltoall => bc.placement.words(),
            };
            if let Some((delta_ns, contributors)) = compare::difference(br, wr, direction) {
                out.push(SegmentDifference {
                    lab: bc.lab.clone(),
                    versus: wc.lab.clone(),
                    size: bc.size,
                    experiment: bc.experiment,
                    delta_ns,
                    contributors,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::schema::{CellResult, Proto};

    fn cell(lab: &str, experiment: TrafficKind, size: usize, result: CellResult) -> BenchCell {
        let placement = if lab.ends_with("-xhost") {
            Placement::CrossHost
        } else {
            Placement::SameHost
        };
        BenchCell {
            lab: lab.into(),
            topology: lab.trim_end_matches("-xhost").into(),
            placement,
            experiment,
            proto: Proto::Tcp,
            size,
            count: 0,
            duration_s: None,
            pods: None,
            procs: None,
            status: CellStatus::Ok,
            reason: None,
            elapsed_s: 1.0,
            result,
            run: None,
        }
    }

    fn gbit(lab: &str, size: usize, g: f64) -> BenchCell {
        let result = CellResult {
            gbit_per_s: Some(g),
            ..CellResult::default()
        };
        cell(lab, TrafficKind::Stream, size, result)
    }

    const TYPES: [Topology; 4] = [
        Topology::Host,
        Topology::Bridge,
        Topology::FlannelVxlan,
        Topology::Macvlan,
    ];
    const BOTH: [Placement; 2] = [Placement::SameHost, Placement::CrossHost];

    fn finding2(cells: &[BenchCell]) -> Finding {
        judge(cells, &[], &TYPES, &BOTH).swap_remove(1)
    }

    #[test]
    fn a_finding_holds_only_if_it_holds_at_every_size() {
        let holds = finding2(&[gbit("bridge", 64, 1.0), gbit("macvlan", 64, 2.0)]);
        assert_eq!(holds.holds, Some(true), "{holds:?}");
        assert_eq!(holds.numbers.len(), 2);
        // The types this kernel cannot build are named, with why.
        assert!(
            holds.why.as_deref().unwrap().contains("ipvlan-l2"),
            "{holds:?}"
        );
        let mixed = finding2(&[
            gbit("bridge", 64, 1.0),
            gbit("macvlan", 64, 2.0),
            gbit("bridge", 16384, 9.0),
            gbit("macvlan", 16384, 8.0),
        ]);
        assert_eq!(mixed.holds, Some(false), "{mixed:?}");
    }

    #[test]
    fn a_finding_without_its_cells_says_why() {
        let mut failed = gbit("macvlan", 64, 0.0);
        failed.status = CellStatus::Failed;
        failed.reason = Some("the stream broke".into());
        let f = finding2(&[gbit("bridge", 64, 1.0), failed]);
        assert_eq!(f.holds, None);
        assert!(
            f.why
                .as_deref()
                .unwrap()
                .contains("macvlan: the stream broke"),
            "{f:?}"
        );
        // Hardware and VM findings are never judged.
        let all = judge(&[], &[], &TYPES, &BOTH);
        for i in [2, 4, 5] {
            assert_eq!(all[i].holds, None);
            assert!(all[i].why.is_some());
        }
    }

    #[test]
    fn lower_is_better_for_latency() {
        let p50 = |lab: &str, us: u64| {
            let result = CellResult {
                p50_ns: Some(us * 1000),
                ..CellResult::default()
            };
            cell(lab, TrafficKind::Rr, 16384, result)
        };
        let cells = [
            p50("macvlan-xhost", 70),
            p50("bridge-xhost", 150),
            p50("flannel-vxlan-xhost", 250),
        ];
        let f = judge(&cells, &[], &TYPES, &BOTH).swap_remove(3);
        assert_eq!(f.holds, Some(true), "{f:?}");
        let slower = [p50("macvlan-xhost", 200), p50("bridge-xhost", 150)];
        let f = judge(&slower, &[], &TYPES, &BOTH).swap_remove(3);
        assert_eq!(f.holds, Some(false), "{f:?}");
    }
}
