//! `--prometheus ADDR`: /metrics from the latest snapshot of the kernel's histograms.

use std::sync::{Arc, RwLock};

use anyhow::Result;
use axum::{extract::State, routing::get, Router};
use profiler_common::hist_bucket_range;
use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};

use super::link::hop_on;
use crate::report::schema::{
    AttachDrop, HookStatus, JourneyCounts, LinkDirection, NodeLink, SegmentSummary, Status,
    WireCrossing,
};

/// Upper bounds of the exported buckets, in seconds: 1 us to 1 s, 1-2-5 steps.
const BOUNDS: [f64; 19] = [
    1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1,
    2e-1, 5e-1, 1.0,
];

#[derive(Debug, Default)]
pub struct Snapshot {
    pub node: String,
    pub segments: Vec<SegmentSummary>,
    pub journeys: JourneyCounts,
    pub drops: Vec<AttachDrop>,
    pub lost_events: u64,
    pub hooks: Vec<HookStatus>,
}

#[derive(Debug)]
struct SnapshotCollector(Arc<RwLock<Snapshot>>);

/// How far back each node's sightings are joined for the links on /metrics (live.rs), on its
/// own clock: longer than a usual scrape interval, so each scrape sees the traffic since the
/// one before.
pub const LINKS_WINDOW_NS: u64 = 30_000_000_000;

/// The links between this node and its peers over the live join's window (live.rs); none
/// without --peer.
pub type Links = Arc<RwLock<Vec<NodeLink>>>;

#[derive(Debug)]
struct LinksCollector(Links);

/// The kernel's log-linear buckets regrouped under BOUNDS (a bucket counts under the first
/// bound its upper edge does not exceed), the rest under +Inf.
fn exported_buckets(buckets: &[u64]) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = BOUNDS.iter().map(|&b| (b, 0)).collect();
    out.push((f64::INFINITY, 0));
    for (i, &n) in buckets.iter().enumerate().filter(|(_, &n)| n > 0) {
        let (low, width) = hist_bucket_range(i);
        let upper = (low + width) as f64 / 1e9;
        let slot = BOUNDS
            .iter()
            .position(|&b| upper <= b)
            .unwrap_or(BOUNDS.len());
        out[slot].1 += n;
    }
    out
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let snap = self.0.read().unwrap_or_else(|e| e.into_inner());
        let mut family = encoder.encode_descriptor(
            "profiler_segment_latency_seconds",
            "Latency of a datapath segment between two consecutive hooks of followed packets",
            None,
            MetricType::Histogram,
        )?;
        for s in &snap.segments {
            let labels = [
                ("node", snap.node.as_str()),
                ("namespace", s.namespace.as_deref().unwrap_or("")),
                ("pod", s.pod.as_deref().unwrap_or("")),
                ("netns", s.netns.as_str()),
                ("interface", s.ifname.as_str()),
                ("segment", s.name.as_str()),
            ];
            family
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(
                    s.sum_ns as f64 / 1e9,
                    s.count,
                    &exported_buckets(&s.buckets),
                    None,
                )?;
        }
        let j = &snap.journeys;
        let mut journeys = encoder.encode_descriptor(
            "profiler_journeys",
            "Followed packets by what became of them",
            None,
            MetricType::Counter,
        )?;
        for (outcome, n) in [
            ("started", j.started),
            ("consumed", j.consumed),
            ("dropped", j.dropped),
            ("ended_unseen", j.ended_unseen),
            ("unfinished", j.unfinished),
            ("reheaded", j.reheaded),
        ] {
            ConstCounter::new(n).encode(journeys.encode_family(&[("outcome", outcome)])?)?;
        }
        let mut drops = encoder.encode_descriptor(
            "profiler_drops",
            "Followed packets the kernel dropped, by its reason, what they were and the last hop",
            None,
            MetricType::Counter,
        )?;
        for d in &snap.drops {
            let labels = [
                ("node", snap.node.as_str()),
                ("namespace", d.namespace.as_deref().unwrap_or("")),
                ("pod", d.pod.as_deref().unwrap_or("")),
                ("after", d.after.as_str()),
                ("reason", d.reason.as_str()),
                ("protocol", d.protocol.as_str()),
            ];
            ConstCounter::new(d.packets).encode(drops.encode_family(&labels)?)?;
        }
        let multicast = ConstCounter::new(j.multicast_not_followed);
        multicast.encode(encoder.encode_descriptor(
            "profiler_multicast_not_followed",
            "Copies of multicast and broadcast frames met in scope, which start no journey",
            None,
            multicast.metric_type(),
        )?)?;
        let lost = ConstCounter::new(snap.lost_events);
        lost.encode(encoder.encode_descriptor(
            "profiler_lost_events",
            "Events or histogram samples the kernel could not record",
            None,
            lost.metric_type(),
        )?)?;
        let mut hooks = encoder.encode_descriptor(
            "profiler_hook_attached",
            "1 if the hook is attached, 0 if it could not be",
            None,
            MetricType::Gauge,
        )?;
        for h in &snap.hooks {
            let up = ConstGauge::new((h.status == Status::Attached) as i64);
            up.encode(
                hooks.encode_family(&[("hook", h.name.as_str()), ("type", h.kind.as_str())])?,
            )?;
        }
        Ok(())
    }
}

impl Collector for LinksCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let links = self.0.read().unwrap_or_else(|e| e.into_inner());
        let window = format!(
            "over the last {} s of sightings",
            LINKS_WINDOW_NS / 1_000_000_000
        );
        let help = |what: &str| format!("{what} {window}");
        let mut times = encoder.encode_descriptor(
            "profiler_wire_crossing_seconds",
            &help(
                "Time on the wire between two nodes' devices, on this node's clock, by quantile,",
            ),
            None,
            MetricType::Gauge,
        )?;
        for (d, c) in links.iter().flat_map(crossings) {
            for (q, ns) in [("0.5", c.p50_ns), ("0.9", c.p90_ns), ("0.99", c.p99_ns)] {
                let labels = crossing_labels(d, c);
                ConstGauge::new(ns as f64 / 1e9).encode(
                    times.encode_family(&[labels.as_slice(), &[("quantile", q)]].concat())?,
                )?;
            }
        }
        let mut packets = encoder.encode_descriptor(
            "profiler_wire_crossing_packets",
            &help("Packets paired between two nodes' devices"),
            None,
            MetricType::Gauge,
        )?;
        for (d, c) in links.iter().flat_map(crossings) {
            ConstGauge::new(c.packets as i64)
                .encode(packets.encode_family(&crossing_labels(d, c))?)?;
        }
        let mut bounds = encoder.encode_descriptor(
            "profiler_wire_crossing_bound_seconds",
            &help("The median packet's bound on its time on the wire (the clocks' uncertainty)"),
            None,
            MetricType::Gauge,
        )?;
        for (d, c) in links.iter().flat_map(crossings) {
            ConstGauge::new(c.bound_ns as f64 / 1e9)
                .encode(bounds.encode_family(&crossing_labels(d, c))?)?;
        }
        let mut clocks = encoder.encode_descriptor(
            "profiler_clock_offset_seconds",
            &help("Node B's clock minus node A's lies between the low and the high edge"),
            None,
            MetricType::Gauge,
        )?;
        for l in links.iter() {
            let Some(c) = &l.clock else { continue };
            for (edge, ns) in [("low", c.offset_ns.0), ("high", c.offset_ns.1)] {
                let labels = [
                    ("node_a", l.a.as_str()),
                    ("node_b", l.b.as_str()),
                    ("edge", edge),
                ];
                ConstGauge::new(ns as f64 / 1e9).encode(clocks.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

fn crossings(l: &NodeLink) -> impl Iterator<Item = (&LinkDirection, &WireCrossing)> {
    l.directions
        .iter()
        .flat_map(|d| d.crossings.iter().map(move |c| (d, c)))
}

/// A crossing's hops are named "NODE: HOP"; the node is a label of its own.
fn crossing_labels<'a>(d: &'a LinkDirection, c: &'a WireCrossing) -> Vec<(&'a str, &'a str)> {
    vec![
        ("source_node", d.from_node.as_str()),
        ("destination_node", d.to_node.as_str()),
        ("from", hop_on(&c.from, &d.from_node)),
        ("to", hop_on(&c.to, &d.to_node)),
    ]
}

/// Serves /metrics until the task is aborted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    snapshot: Arc<RwLock<Snapshot>>,
    links: Links,
) -> Result<()> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    registry.register_collector(Box::new(LinksCollector(links)));
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(registry));
    axum::serve(listener, app).await?;
    Ok(())
}

async fn metrics(State(registry): State<Arc<Registry>>) -> (axum::http::HeaderMap, String) {
    let mut body = String::new();
    let _ = encode(&mut body, &registry);
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    (headers, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use profiler_common::{hist_bucket, HIST_BUCKETS};

    #[test]
    fn kernel_buckets_regroup_under_the_exported_bounds() {
        let mut b = vec![0u64; HIST_BUCKETS];
        b[hist_bucket(1_500)] += 2; // 1.5 us: under 2 us
        b[hist_bucket(30_000)] += 1; // 30 us: under 50 us
        b[hist_bucket(5_000_000_000)] += 1; // 5 s: +Inf
        let out = exported_buckets(&b);
        let at = |bound: f64| out.iter().find(|(x, _)| *x == bound).map(|&(_, n)| n);
        assert_eq!(at(2e-6), Some(2));
        assert_eq!(at(5e-5), Some(1));
        assert_eq!(at(f64::INFINITY), Some(1));
        assert_eq!(out.iter().map(|&(_, n)| n).sum::<u64>(), 4);
    }

    /// A link's crossings on /metrics, the node in labels of its own, and the clocks' bound.
    #[test]
    fn links_are_served_with_their_nodes() {
        let crossing = WireCrossing {
            from: "a: xmit eth0".into(),
            to: "b: rx eth0".into(),
            packets: 7,
            p50_ns: 40_000,
            p90_ns: 50_000,
            p99_ns: 60_000,
            max_ns: 70_000,
            bound_ns: 5_000,
        };
        let link = NodeLink {
            a: "a".into(),
            b: "b".into(),
            clock: Some(crate::report::schema::ClockBounds {
                at_ns: 0,
                offset_ns: (-2_000, 3_000),
                drift_ppm: (0.0, 0.0),
                over_ns: None,
            }),
            unfit: None,
            directions: vec![LinkDirection {
                from_node: "a".into(),
                to_node: "b".into(),
                crossings: vec![crossing],
                ..LinkDirection::default()
            }],
            streamed: None,
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(LinksCollector(Arc::new(RwLock::new(vec![link])))));
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        let labels = r#"{source_node="a",destination_node="b",from="xmit eth0",to="rx eth0""#;
        for line in [
            format!("profiler_wire_crossing_packets{labels}}} 7"),
            format!("profiler_wire_crossing_seconds{labels},quantile=\"0.5\"}} 0.00004"),
            format!("profiler_wire_crossing_bound_seconds{labels}}} 0.000005"),
            r#"profiler_clock_offset_seconds{node_a="a",node_b="b",edge="high"} 0.000003"#.into(),
        ] {
            assert!(text.contains(&line), "no {line} in\n{text}");
        }
    }
}
