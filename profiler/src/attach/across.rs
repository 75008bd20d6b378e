//! Across nodes (`attach --lab NAME`): this node and each guest of a nested lab follow their
//! packets as attach does, each reporting those that cross its wire-facing device (the guest's
//! tap here, its eth0 there). A packet that left one node is paired with the one that entered
//! the other by what it carries on the wire (cluster/join.rs), the two clocks are related from
//! the pairs of both directions (cluster/clock.rs), and each packet's time on the wire is given
//! on this node's clock with its bound. Nothing is tagged and no clock is assumed in sync.

use std::{collections::HashMap, time::Duration};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{attach, filter, wire, AttachArgs, Control};
use crate::{
    cluster::{
        clock::Fit,
        join::{self, Joined, Pair, Sighting},
    },
    kernel::programs::FollowConfig,
    lab::{self, discover::ROOT, nested},
    pods,
    report::schema::{
        AttachReport, ClockBounds, HookSet, LinkDirection, NodeLink, SightingLine, WireCrossing,
    },
};

/// The agent's requests: `{"attach": AttachRequest}`, answered once following, and
/// `{"stop_attach": {}}`, answered with the report (run/agent.rs).
pub const ATTACH: &str = "attach";
pub const STOP: &str = "stop_attach";

/// How long a guest may take to load and attach its programs (6.1 under TCG verifies slowly).
const FOLLOWING_WITHIN: Duration = Duration::from_secs(900);
/// How long a guest may take to answer once stopped.
const REPORT_WITHIN: Duration = Duration::from_secs(300);
/// Where no line fits the whole attach, the clocks are fitted over this horizon around each
/// packet (cluster/clock.rs `track`).
const CLOCK_HORIZON_NS: u64 = 8_000_000_000;
/// A guest's attach that its host never stops ends after this, or at the next attach asked.
const GUEST_MAX: Duration = Duration::from_secs(86_400);
/// The NIC a lab's guest has toward its host.
const GUEST_NIC: &str = "eth0";

/// What a host asks of a guest's agent: attach with these targets until told to stop.
#[derive(Debug, Serialize, Deserialize)]
pub struct AttachRequest {
    /// Namespaces as the guest names them.
    pub netns: Vec<String>,
    pub wire: Vec<String>,
    pub filter: String,
    pub sample: u32,
    pub max_gap_ms: u64,
    pub max_in_flight: u32,
    pub hooks: HookSet,
}

/// The agent's answers: that it follows, then its report with every sighting.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachAnswer {
    Following,
    Done {
        report: Box<AttachReport>,
        sightings: Vec<SightingLine>,
    },
    Failed(String),
}

/// The guest's attach as its agent runs it, driven by `control`.
pub fn guest_args(r: AttachRequest, control: Control) -> Result<AttachArgs> {
    Ok(AttachArgs {
        pods: Vec::new(),
        pod_sources: pods::Sources {
            cri_socket: None,
            cni_cache: None,
        },
        netns: r.netns,
        ifaces: Vec::new(),
        cgroups: Vec::new(),
        follow: FollowConfig {
            sample: r.sample,
            max_gap_ns: r.max_gap_ms * 1_000_000,
            stream: false,
            filter: filter::compile(&r.filter)?,
            max_in_flight: r.max_in_flight,
            by_cgroup: false,
            wire: !r.wire.is_empty(),
        },
        filter: r.filter,
        wire: r.wire,
        sightings: None,
        keep_sightings: true,
        duration: Some(GUEST_MAX),
        prometheus: None,
        stats: false,
        hooks: r.hooks,
        quiet: true,
        command: Vec::new(),
        control: Some(control),
    })
}

/// `attach --lab NAME`: attaches in each guest of the lab and here, until the duration, a
/// signal or the workload ends this node's attach, then stops the guests and joins. This
/// node's targets are the lab's namespaces (with those given), its wire the guests' taps.
pub async fn lab(args: &mut AttachArgs, name: &str) -> Result<AttachReport> {
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        bail!("--lab {name:?}: not a lab's name (profiler lab list shows them)");
    }
    let lab = lab::get(name)?.with_context(|| format!("no lab {name} is up"))?;
    if lab.guests.is_empty() {
        bail!("lab {name} has no guests: --lab joins the nodes of a nested lab (bmp2vmp, vmp2vmp)");
    }
    let on_host = |ns: &String| {
        lab.guests
            .iter()
            .all(|g| nested::in_guest(&g.name, ns).is_none())
    };
    for ns in lab.namespaces.iter().filter(|ns| on_host(ns)) {
        if !args.netns.contains(ns) {
            args.netns.push(ns.clone());
        }
    }
    for g in &lab.guests {
        args.wire.push(format!("{}:{}", tap_netns(&lab, g)?, g.tap));
    }
    args.follow.wire = true;
    args.keep_sightings = true;
    // Each guest's channel is let go once it follows: `lab exec` drives traffic there meanwhile.
    for g in &lab.guests {
        let request = guest_request(args, g);
        match nested::ask(name, &g.name, ATTACH, &request, FOLLOWING_WITHIN).await? {
            AttachAnswer::Following => {}
            AttachAnswer::Failed(e) => {
                // Those already following are stopped; their answers say nothing more.
                let _ = stop_guests(name, &lab.guests).await;
                bail!("attach in {}: {e}", g.name)
            }
            AttachAnswer::Done { .. } => bail!("attach in {}: ended before following", g.name),
        }
    }
    if !args.quiet {
        let names: Vec<&str> = lab.guests.iter().map(|g| g.name.as_str()).collect();
        eprintln!("attach: following in {}", names.join(", "));
    }
    // The guests are stopped whether or not this node's attach succeeded.
    let here = attach(args).await;
    let mut peers = Vec::new();
    for (g, answer) in lab.guests.iter().zip(stop_guests(name, &lab.guests).await) {
        match answer? {
            AttachAnswer::Done { report, sightings } => peers.push((g, report, sightings)),
            AttachAnswer::Failed(e) => bail!("attach in {}: {e}", g.name),
            AttachAnswer::Following => bail!("attach in {}: no report", g.name),
        }
    }
    let (mut report, lines) = here?;
    for (g, mut peer, sightings) in peers {
        peer.node.clone_from(&g.name);
        let tap: Vec<&SightingLine> = lines
            .iter()
            .filter(|l| l.ifname.as_deref() == Some(g.tap.as_str()))
            .collect();
        let theirs: Vec<&SightingLine> = sightings.iter().collect();
        report
            .links
            .push(link((&report.node, &tap), (&g.name, &theirs)));
        report.peers.push(*peer);
    }
    Ok(report)
}

/// Asks every guest to stop attaching; each one's answer.
async fn stop_guests(lab: &str, guests: &[nested::Guest]) -> Vec<Result<AttachAnswer>> {
    let mut answers = Vec::new();
    for g in guests {
        let stop = serde_json::json!({});
        answers.push(nested::ask(lab, &g.name, STOP, &stop, REPORT_WITHIN).await);
    }
    answers
}

fn guest_request(args: &AttachArgs, g: &nested::Guest) -> AttachRequest {
    AttachRequest {
        netns: g
            .namespaces
            .iter()
            .map(|(ns, _)| ns.clone())
            .filter(|ns| ns != ROOT)
            .collect(),
        wire: vec![GUEST_NIC.to_string()],
        filter: args.filter.clone(),
        sample: args.follow.sample,
        max_gap_ms: args.follow.max_gap_ns / 1_000_000,
        max_in_flight: args.follow.max_in_flight,
        hooks: args.hooks,
    }
}

/// The host namespace the guest's tap is in.
fn tap_netns(lab: &lab::Lab, g: &nested::Guest) -> Result<String> {
    lab.interfaces
        .iter()
        .find(|i| i.ifname == g.tap && nested::in_guest(&g.name, &i.netns).is_none())
        .map(|i| i.netns.clone())
        .with_context(|| format!("lab {}: no tap {} on the host", lab.name, g.tap))
}

/// Sightings of one node, split by direction, their hops numbered in `hops`.
fn split(
    node: &str,
    lines: &[&SightingLine],
    hops: &mut Vec<String>,
) -> (Vec<Sighting>, Vec<Sighting>) {
    let (mut leaving, mut entering) = (Vec::new(), Vec::new());
    for l in lines {
        let hop = format!("{node}: {}", l.hop);
        let at = match hops.iter().position(|h| *h == hop) {
            Some(i) => i,
            None => {
                hops.push(hop);
                hops.len() - 1
            }
        };
        let s = Sighting {
            id: l.id,
            ts: l.ts_ns,
            journey: 0,
            at: at as u64,
        };
        if l.direction == "leaving" {
            leaving.push(s);
        } else {
            entering.push(s);
        }
    }
    (leaving, entering)
}

/// The wire between node A and node B from their sightings: pairs both ways, B's clock related
/// to A's, each pair's time on the wire on A's clock.
fn link(
    (a, a_lines): (&str, &[&SightingLine]),
    (b, b_lines): (&str, &[&SightingLine]),
) -> NodeLink {
    let mut hops = Vec::new();
    let (a_leaving, a_entering) = split(a, a_lines, &mut hops);
    let (b_leaving, b_entering) = split(b, b_lines, &mut hops);
    let (ab, ba) = (
        join::join(a_leaving, b_entering),
        join::join(b_leaving, a_entering),
    );
    let clocks = join::clocks(&ab.pairs, &ba.pairs);
    // A's times of the pairs: when the first left A or entered it, to the last.
    let times = ab
        .pairs
        .iter()
        .map(|p| p.left.ts)
        .chain(ba.pairs.iter().map(|p| p.entered.ts));
    let (from, to) = times.fold((u64::MAX, 0), |(lo, hi), t| (lo.min(t), hi.max(t)));
    let whole = (from <= to).then(|| clocks.fit(from, to));
    // Tracked second by second only where no line fits the whole stretch.
    let timeline = matches!(whole, Some(Err(_))).then(|| clocks.track(CLOCK_HORIZON_NS));
    let fit_at = |t: u64| -> Option<Fit> {
        match (&whole, &timeline) {
            (Some(Ok(fit)), _) => Some(fit.clone()),
            (_, Some(timeline)) => timeline.at(t).ok().cloned(),
            _ => None,
        }
    };
    let mid = from / 2 + to / 2;
    let (clock, unfit) = match (&whole, fit_at(mid)) {
        (_, Some(fit)) => (Some(ClockBounds::of(&fit, mid)), None),
        (None, None) => (None, Some("no packet crossed either way".to_string())),
        (Some(Err(why)), None) => (None, Some(why.to_string())),
        (Some(Ok(_)), None) => unreachable!("a whole fit fits its middle"),
    };
    let directions = vec![
        direction((a, b), &ab, &hops, |p| {
            fit_at(p.left.ts).map(|f| join::on_the_wire(p, &f))
        }),
        direction((b, a), &ba, &hops, |p| {
            fit_at(p.entered.ts).map(|f| join::on_the_wire_back(p, &f))
        }),
    ];
    NodeLink {
        a: a.to_string(),
        b: b.to_string(),
        clock,
        unfit,
        directions,
    }
}

/// One direction's pairs as crossings per pair of hops; `timed` gives a pair's time on the
/// wire and its bound, None where no fit covers it.
fn direction(
    (from, to): (&str, &str),
    joined: &Joined,
    hops: &[String],
    timed: impl Fn(&Pair) -> Option<(i64, u64)>,
) -> LinkDirection {
    let mut by_hops: HashMap<(u64, u64), (Vec<u64>, Vec<u64>)> = HashMap::new();
    let mut untimed = 0;
    for p in &joined.pairs {
        let Some((ns, bound)) = timed(p) else {
            untimed += 1;
            continue;
        };
        let (times, bounds) = by_hops.entry((p.left.at, p.entered.at)).or_default();
        times.push(ns.max(0) as u64);
        bounds.push(bound);
    }
    let mut crossings: Vec<WireCrossing> = by_hops
        .into_iter()
        .map(|((l, e), (times, mut bounds))| {
            bounds.sort_unstable();
            let bound = bounds[bounds.len() / 2];
            wire::crossing(
                hops[l as usize].clone(),
                hops[e as usize].clone(),
                times,
                bound,
            )
        })
        .collect();
    wire::by_packets(&mut crossings);
    LinkDirection {
        from_node: from.to_string(),
        to_node: to.to_string(),
        crossings,
        ambiguous: joined.ambiguous,
        unmatched_leaving: joined.unmatched_leaving,
        unmatched_entering: joined.unmatched_entering,
        untimed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::join::{Flow, WireId};

    fn line(node: &str, direction: &str, hop: &str, ts_ns: u64, n: u16) -> SightingLine {
        SightingLine {
            node: node.into(),
            direction: direction.into(),
            hop: hop.into(),
            netns: None,
            ifname: None,
            ts_ns,
            journey: String::new(),
            id: WireId {
                outer: Flow {
                    saddr: 1,
                    daddr: 2,
                    proto: 1,
                    sport: 0x0800,
                    dport: n,
                    ip_id: n,
                },
                ..WireId::default()
            },
        }
    }

    /// B's clock an hour behind A's and drifting 20 ppm; packets 40-90 us on the wire each way.
    #[test]
    fn a_link_pairs_both_ways_and_bounds_every_packet() {
        let b = |t: u64| ((t as f64) * (1.0 + 20e-6)) as u64 - 3_600_000_000_000;
        let wire = |i: u64| 40_000 + (i * 7_919) % 50_000;
        let start = 4_000_000_000_000;
        let (mut a_lines, mut b_lines) = (Vec::new(), Vec::new());
        for i in 0..500u64 {
            let t = start + i * 10_000_000;
            let n = i as u16;
            a_lines.push(line("host", "leaving", "xmit tap", t, n));
            b_lines.push(line("vm1", "entering", "rx eth0", b(t + wire(i)), n));
            let t = t + 5_000_000;
            b_lines.push(line("vm1", "leaving", "xmit eth0", b(t), 1000 + n));
            a_lines.push(line(
                "host",
                "entering",
                "rx tap",
                t + wire(i + 1),
                1000 + n,
            ));
        }
        // A packet lost on the way, and one the guest saw twice (with the one it was sent as).
        a_lines.push(line(
            "host",
            "leaving",
            "xmit tap",
            start + 6_000_000_000,
            5000,
        ));
        b_lines.push(line("vm1", "entering", "rx eth0", b(start + 10), 7));
        let (a, b_refs): (Vec<&SightingLine>, Vec<&SightingLine>) =
            (a_lines.iter().collect(), b_lines.iter().collect());
        let l = link(("host", &a), ("vm1", &b_refs));
        let clock = l.clock.expect("the clocks related");
        let truth = b(clock.at_ns) as i64 - clock.at_ns as i64;
        assert!(
            clock.offset_ns.0 <= truth && truth <= clock.offset_ns.1,
            "{clock:?} {truth}"
        );
        let (there, back) = (&l.directions[0], &l.directions[1]);
        assert_eq!((there.ambiguous, there.unmatched_leaving), (3, 1));
        assert_eq!((back.ambiguous, back.unmatched_leaving), (0, 0));
        let c = &there.crossings[0];
        assert_eq!(
            (c.from.as_str(), c.to.as_str(), c.packets),
            ("host: xmit tap", "vm1: rx eth0", 499)
        );
        let c = &back.crossings[0];
        assert_eq!(
            (c.from.as_str(), c.to.as_str(), c.packets),
            ("vm1: xmit eth0", "host: rx tap", 500)
        );
        // The median packet's time is the median truth (65 us) within its bound.
        for c in [&there.crossings[0], &back.crossings[0]] {
            assert!(
                c.p50_ns.abs_diff(65_000) <= c.bound_ns && c.bound_ns <= 50_000,
                "{c:?}"
            );
        }
    }

    #[test]
    fn packets_one_way_only_are_paired_and_not_timed() {
        let a: Vec<SightingLine> = (0..10)
            .map(|i| {
                line(
                    "host",
                    "leaving",
                    "xmit tap",
                    1_000 + i * 1_000_000,
                    i as u16,
                )
            })
            .collect();
        let b: Vec<SightingLine> = (0..10)
            .map(|i| {
                line(
                    "vm1",
                    "entering",
                    "rx eth0",
                    50_000 + i * 1_000_000,
                    i as u16,
                )
            })
            .collect();
        let l = link(
            ("host", &a.iter().collect::<Vec<_>>()),
            ("vm1", &b.iter().collect::<Vec<_>>()),
        );
        assert!(l.clock.is_none());
        assert!(l.unfit.expect("why").contains("one way"));
        assert_eq!(l.directions[0].untimed, 10);
        assert!(l.directions[0].crossings.is_empty());
    }
}
