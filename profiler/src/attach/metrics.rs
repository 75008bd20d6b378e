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

use crate::report::schema::{AttachDrop, HookStatus, JourneyCounts, SegmentSummary, Status};

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

/// Serves /metrics until the task is aborted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    snapshot: Arc<RwLock<Snapshot>>,
) -> Result<()> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
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
}
