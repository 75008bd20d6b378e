//! `attach --peer ... --mode events --otlp URL`: packets joined across nodes (packets.rs), one
//! in N, as OpenTelemetry traces over OTLP/gRPC: a trace per packet, under a span for the whole
//! packet a span per segment, the wire between the nodes one of them. Times are this node's
//! clock: a peer's hops are placed through the packet's pair at the wire, so no clock needs to
//! be in sync; the monotonic clock is moved to the wall clock once, at export.

use std::{
    borrow::Cow,
    time::{Duration, SystemTime},
};

use anyhow::{anyhow, Context, Result};
use opentelemetry::{
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    InstrumentationScope, KeyValue,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    trace::{SpanData, SpanExporter},
    Resource,
};

/// One segment of a packet's way, on this node's monotonic clock.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The node it starts on, and ends on (another only for the wire).
    pub from_node: String,
    pub to_node: String,
    pub name: String,
    /// Its hops.
    pub from: String,
    pub to: String,
    pub start_ns: u64,
    pub end_ns: u64,
    /// The wire's clock bound (0 within a node).
    pub bound_ns: u64,
}

/// A packet's way across nodes, its steps in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub steps: Vec<Step>,
}

/// The traces of one joined packet in `every`, counted as the packets are joined.
pub struct Traces {
    every: u64,
    joined: u64,
    pub kept: Vec<Trace>,
}

impl Traces {
    pub fn new(every: u32) -> Self {
        Traces {
            every: every.max(1).into(),
            joined: 0,
            kept: Vec::new(),
        }
    }

    /// How many joined packets were offered.
    pub fn joined(&self) -> u64 {
        self.joined
    }

    /// A joined packet: its trace is made (by `make`) and kept if it is the one in N.
    pub fn offer(&mut self, make: impl FnOnce() -> Trace) {
        if self.joined.is_multiple_of(self.every) {
            self.kept.push(make());
        }
        self.joined += 1;
    }
}

/// Where the traces go and which packets: `attach --otlp URL --otlp-sample N`.
#[derive(Clone, Debug)]
pub struct Otlp {
    pub endpoint: String,
    pub every: u32,
}

/// Sends the traces to the OTLP/gRPC endpoint, in batches; returns how many spans.
pub async fn export(otlp: &Otlp, node: &str, traces: &[Trace]) -> Result<usize> {
    let fail = || format!("OTLP export to {}", otlp.endpoint);
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&otlp.endpoint)
        .with_timeout(Duration::from_secs(10))
        .build()
        .with_context(fail)?;
    exporter.set_resource(
        &Resource::builder_empty()
            .with_service_name("profiler")
            .with_attributes([KeyValue::new("host.name", node.to_string())])
            .build(),
    );
    let spans = spans(traces, wall_offset_ns(), SystemTime::now());
    for batch in spans.chunks(BATCH) {
        exporter
            .export(batch.to_vec())
            .await
            .map_err(|e| anyhow!("{e}"))
            .with_context(fail)?;
    }
    Ok(spans.len())
}

/// Spans per OTLP request: well under gRPC's 4 MiB default message size.
const BATCH: usize = 512;

/// The wall clock minus the monotonic clock (which the kernel's timestamps are on), now.
fn wall_offset_ns() -> i128 {
    use nix::time::{clock_gettime, ClockId};
    let ns = |c| {
        clock_gettime(c).map_or(0, |t| {
            i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
        })
    };
    ns(ClockId::CLOCK_REALTIME) - ns(ClockId::CLOCK_MONOTONIC)
}

/// Each trace's spans: the packet's, then a child per step. Trace ids are unique to this
/// export (its wall time, then the trace's number); span ids to their trace.
fn spans(traces: &[Trace], wall_offset: i128, now: SystemTime) -> Vec<SpanData> {
    let run = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let wall = |ns: u64| {
        let at = (i128::from(ns) + wall_offset).max(0) as u64;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(at)
    };
    let scope = InstrumentationScope::builder("profiler")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let mut out = Vec::new();
    for (i, t) in traces.iter().enumerate() {
        let (Some(first), Some(last)) = (t.steps.first(), t.steps.last()) else {
            continue;
        };
        let trace_id = TraceId::from((u128::from(run) << 64) | (i as u128 + 1));
        let span = |k: u64, parent: u64, name: String, start: u64, end: u64, attributes| SpanData {
            span_context: SpanContext::new(
                trace_id,
                SpanId::from(k),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::from(parent),
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Owned(name),
            start_time: wall(start),
            end_time: wall(end),
            attributes,
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: scope.clone(),
        };
        let whole = format!(
            "packet {}: {} -> {}: {}",
            first.from_node, first.from, last.to_node, last.to
        );
        let nodes = vec![
            KeyValue::new("profiler.from_node", first.from_node.clone()),
            KeyValue::new("profiler.to_node", last.to_node.clone()),
        ];
        out.push(span(1, 0, whole, first.start_ns, last.end_ns, nodes));
        for (k, s) in t.steps.iter().enumerate() {
            out.push(span(
                k as u64 + 2,
                1,
                s.name.clone(),
                s.start_ns,
                s.end_ns,
                attributes(s),
            ));
        }
    }
    out
}

fn attributes(s: &Step) -> Vec<KeyValue> {
    let mut a = vec![
        KeyValue::new("profiler.node", s.from_node.clone()),
        KeyValue::new("profiler.from", s.from.clone()),
        KeyValue::new("profiler.to", s.to.clone()),
    ];
    if s.from_node != s.to_node {
        a.extend([
            KeyValue::new("profiler.to_node", s.to_node.clone()),
            KeyValue::new("profiler.clock_bound_ns", s.bound_ns as i64),
        ]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(node: &str, to_node: &str, name: &str, start_ns: u64, end_ns: u64) -> Step {
        Step {
            from_node: node.into(),
            to_node: to_node.into(),
            name: name.into(),
            from: format!("{name} from"),
            to: format!("{name} to"),
            start_ns,
            end_ns,
            bound_ns: if node == to_node { 0 } else { 3_000 },
        }
    }

    #[test]
    fn one_in_n_packets_is_traced() {
        let mut traces = Traces::new(3);
        for i in 0..7 {
            traces.offer(|| Trace {
                steps: vec![step("a", "a", &i.to_string(), 0, 1)],
            });
        }
        let names: Vec<&str> = (traces.kept.iter())
            .map(|t| t.steps[0].name.as_str())
            .collect();
        assert_eq!(names, ["0", "3", "6"]);
    }

    /// A packet's spans: one for it all, from its first step's start to its last's end, and a
    /// child per step at the step's times moved to the wall clock; the wire's says its nodes.
    #[test]
    fn a_packet_is_a_span_with_a_child_per_step() {
        let t = Trace {
            steps: vec![
                step("a", "a", "qdisc", 1_000, 4_000),
                step("a", "b", "wire", 4_000, 50_000),
                step("b", "b", "bridge", 50_000, 52_000),
            ],
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let spans = spans(&[t.clone(), t], 10_000_000, now);
        assert_eq!(spans.len(), 8);
        let at = |ns: u64| SystemTime::UNIX_EPOCH + Duration::from_nanos(ns + 10_000_000);
        let (whole, wire) = (&spans[0], &spans[2]);
        assert_eq!(whole.parent_span_id, SpanId::INVALID);
        assert_eq!((whole.start_time, whole.end_time), (at(1_000), at(52_000)));
        assert_eq!(whole.name, "packet a: qdisc from -> b: bridge to");
        assert_eq!((wire.start_time, wire.end_time), (at(4_000), at(50_000)));
        assert_eq!(wire.parent_span_id, whole.span_context.span_id());
        assert_eq!(wire.span_context.trace_id(), whole.span_context.trace_id());
        assert!(wire
            .attributes
            .contains(&KeyValue::new("profiler.to_node", "b")));
        assert!(wire
            .attributes
            .contains(&KeyValue::new("profiler.clock_bound_ns", 3_000i64)));
        assert_ne!(
            spans[4].span_context.trace_id(),
            whole.span_context.trace_id(),
            "a trace per packet"
        );
    }
}
