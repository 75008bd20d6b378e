//! Every report the profiler writes, as one schema: `profiler.run.v1`, `profiler.attach.v1`
//! (and its events-mode lines), `profiler.compare.v1`, `profiler.bench.v1` and
//! `profiler.doctor.v1`. Each type
//! serializes to the JSON the commands have always written (fields are added, never renamed)
//! and reads back, so a saved report can be re-rendered (`profiler report`).
//!
//! This module depends on nothing else of the profiler's but the lab's placement: every layer
//! that produces a report fills these types, and the renderers read nothing else.

use serde::{Deserialize, Serialize};

use crate::lab::{names::HOST_NODE, Placement};

pub const RUN_SCHEMA: &str = "profiler.run.v1";
pub const ATTACH_SCHEMA: &str = "profiler.attach.v1";
pub const COMPARE_SCHEMA: &str = "profiler.compare.v1";
pub const DOCTOR_SCHEMA: &str = "profiler.doctor.v1";
pub const BENCH_SCHEMA: &str = "profiler.bench.v1";

/// The schemas `profiler report` reads.
pub const SCHEMAS: [&str; 5] = [
    RUN_SCHEMA,
    ATTACH_SCHEMA,
    COMPARE_SCHEMA,
    BENCH_SCHEMA,
    DOCTOR_SCHEMA,
];

/// Which hooks a run attaches: the stable ABI (tracepoints, tc) or, besides them, the deep
/// hooks on the datapath's own functions, which exist only where the kernel has kprobes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookSet {
    Stable,
    Deep,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Udp,
    Tcp,
}

/// The traffic a run drives: request/response ping-pong (the default), a one-way stream with
/// tagged messages inside it, or the MPI_Alltoall pattern between the processes of N pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficKind {
    #[default]
    Rr,
    Stream,
    Alltoall,
}

/// What became of one hook when the programs were attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Attached,
    Unavailable,
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HookStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub status: Status,
    pub reason: Option<String>,
    pub set: HookSet,
}

/// Per-program kernel cost while stats were enabled.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgramCost {
    pub program: String,
    pub run_count: u64,
    pub run_time_ns: u64,
    pub ns_per_run: f64,
    /// Instructions the verifier walked to load it (kernels from 5.16): what makes a program
    /// slow to load, on old kernels and under emulation most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_insns: Option<u32>,
}

// ---- profiler.run.v1 ----

#[derive(Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub schema: String,
    /// The command line and build that wrote it (absent from reports written before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub made: Option<Made>,
    pub kernel: String,
    pub topology: String,
    /// The Service the client sent to (a lab made with --service): its mode, ClusterIP:port
    /// and the pod it is DNATed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub traffic: TrafficReport,
    pub directions: Vec<DirectionReport>,
    pub events: EventsReport,
    /// The hooks in effect: deep, or stable where no deep hook could attach.
    pub hook_set: HookSet,
    pub hooks: Vec<HookStatus>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub program_costs: Option<Vec<ProgramCost>>,
    /// `--traffic stream`: the stream's throughput; `directions` holds the tagged messages'
    /// one direction ("stream").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamResult>,
    /// `--traffic alltoall`: round latency; `directions` holds one waterfall per path kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alltoall: Option<AlltoallResult>,
    /// Nested paths: how each guest's clock was related to the host's, and the crossing
    /// segments estimated from it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crossings: Vec<CrossingReport>,
}

impl RunReport {
    /// The direction named `name` ("request", "response", "stream", an all-to-all path kind).
    pub fn direction(&self, name: &str) -> Option<&DirectionReport> {
        self.directions.iter().find(|d| d.direction == name)
    }

    /// What became of hook `name`.
    pub fn hook(&self, name: &str) -> Option<&HookStatus> {
        hook_named(&self.hooks, name)
    }
}

fn hook_named<'a>(hooks: &'a [HookStatus], name: &str) -> Option<&'a HookStatus> {
    hooks.iter().find(|h| h.name == name)
}

/// What wrote a report: the command line and the profiler's build.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Made {
    pub command: Vec<String>,
    /// The crate's version, and the commit it was built from where it was built in a checkout
    /// (`git describe --always --dirty`).
    pub version: String,
}

impl Made {
    /// This process's command line and build.
    pub fn here() -> Made {
        let commit = env!("PROFILER_COMMIT");
        let version = match commit {
            "" => env!("CARGO_PKG_VERSION").to_string(),
            c => format!("{} ({c})", env!("CARGO_PKG_VERSION")),
        };
        Made {
            command: std::env::args().collect(),
            version,
        }
    }
}

/// A guest kernel on the path: its clock's offset from the host's and the crossings' sum, from
/// request/response exchanges (run/crossing.rs says how).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CrossingReport {
    /// The guest's node name.
    pub node: String,
    pub method: String,
    /// Exchanges both kernels saw both ways.
    pub exchanges: u64,
    /// The guest clock minus the host clock (median over the exchanges).
    pub offset_ns: i64,
    /// The exchanges' offsets at the 10th and 90th percentile.
    pub offset_p10_p90_ns: (i64, i64),
    /// How fast the offset changed over the run.
    pub drift_ppm: f64,
    /// Both crossings' time per exchange, (t4 - t1) - (t3 - t2): measured, not estimated.
    pub crossing_sum: Stats,
    /// What every exchange together bounds, no direction assumed as fast as the other
    /// (cluster/clock.rs); absent from reports written before it, or where the exchanges did
    /// not agree on a line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds: Option<ClockBounds>,
}

/// The guest clock minus the host's, and its drift, as bounds that hold whatever the crossings'
/// asymmetry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClockBounds {
    /// Host time at the middle of the exchanges, where `offset_ns` holds.
    pub at_ns: u64,
    /// The offset lies within these.
    pub offset_ns: (i64, i64),
    pub drift_ppm: (f64, f64),
    /// How long a stretch of exchanges made the bounds: the run's, or a shorter horizon around
    /// its middle where no line fit the whole run (absent from reports written before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_ns: Option<u64>,
}

impl ClockBounds {
    /// What `fit` (B's clock minus A's) bounds at `at` (A's clock).
    pub fn of(fit: &crate::cluster::clock::Fit, at: u64) -> ClockBounds {
        let (offset, drift) = (fit.offset_at(at), fit.drift());
        ClockBounds {
            at_ns: at,
            offset_ns: (offset.lo, offset.hi),
            drift_ppm: (drift.lo * 1e6, drift.hi * 1e6),
            over_ns: Some(fit.span()),
        }
    }
}

/// A one-way stream's throughput, measured at the receiver, and its tagged messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamResult {
    pub proto: Proto,
    /// Bytes per message (per write, per UDP datagram).
    pub size: usize,
    pub duration_s: f64,
    /// Payload received.
    pub bytes: u64,
    pub messages: u64,
    /// Payload bits per second received.
    pub gbit_per_s: f64,
    /// Payload bits per second the sender wrote (UDP: what it offered, lost messages too).
    #[serde(default)]
    pub sent_gbit_per_s: f64,
    pub messages_per_s: f64,
    /// UDP: messages sent that never arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_messages: Option<u64>,
    /// One message in this many is tagged (0: none).
    pub tag_every: u32,
    /// Tagged messages that arrived.
    pub tagged: u64,
    /// The same stream run first, untagged, with none of the profiler's programs attached:
    /// the path's throughput as iperf3 would see it (the profiled figures above include what
    /// the programs cost at every hop). Received and sent Gbit/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unprofiled_gbit_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unprofiled_sent_gbit_per_s: Option<f64>,
}

/// MPI_Alltoall over TCP: every round, every process sends one message to every other and
/// waits for all of its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AlltoallResult {
    /// Pods per host, and processes per pod.
    pub pods: u32,
    pub procs: u32,
    pub size: usize,
    pub rounds: u32,
    pub completed_rounds: u32,
    /// A round: from the first process starting it to the last one having all its messages.
    pub round_p50_ms: f64,
    pub round_p99_ms: f64,
    /// One round in this many is tagged (every message of it).
    pub tag_every: u32,
    pub path_kinds: Vec<PathKindResult>,
}

/// The pairs of processes whose messages take one kind of path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathKindResult {
    /// "same pod" (loopback), "same host" (pod to pod), "cross host".
    pub kind: String,
    /// Ordered pod pairs of this kind.
    pub pod_pairs: u32,
    /// Tagged messages received.
    pub tagged: u64,
    /// Tagged messages whose journey matched their pod pair's path hop for hop.
    pub attributed: u64,
    /// Pod pairs none of whose tagged messages was attributed.
    pub unattributed_pairs: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TrafficReport {
    pub proto: Proto,
    pub size: usize,
    pub count: u32,
    pub completed: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DirectionReport {
    /// "request" or "response".
    pub direction: String,
    pub hops: Vec<Hop>,
    pub segments: Vec<SegmentReport>,
    /// The profiler's own programs' time per packet on this path, left out of the segments.
    pub profiler_programs: Stats,
    pub end_to_end: Stats,
    pub complete_packets: u64,
    pub incomplete_packets: u64,
    /// For incomplete packets: how many missed each hop.
    pub missing_hops: Vec<MissingHop>,
    /// The other hop sequences packets took (the first of an OVS flow, up to ovs-vswitchd),
    /// most common first.
    pub other_paths: Vec<OtherPath>,
}

impl DirectionReport {
    /// The segments' names, in path order.
    pub fn segment_names(&self) -> Vec<&str> {
        self.segments.iter().map(|s| s.name.as_str()).collect()
    }

    /// Each hop's hook and device, in path order.
    pub fn hop_sequence(&self) -> Vec<(&str, Option<&str>)> {
        hop_sequence(&self.hops)
    }

    /// Whether the segments and the profiler's own programs add up to the end-to-end mean,
    /// within `share` of it.
    pub fn adds_up(&self, share: f64) -> bool {
        let sum: f64 = self.segments.iter().map(|s| s.stats.mean_ns).sum::<f64>()
            + self.profiler_programs.mean_ns;
        let e2e = self.end_to_end.mean_ns;
        e2e > 0.0 && ((sum - e2e) / e2e).abs() < share
    }
}

/// A hop of the path, as reported.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hop {
    pub index: usize,
    pub name: String,
    pub ifname: Option<String>,
    pub netns: Option<String>,
    pub kind: String,
    pub hook: String,
    /// The hop saw the packet inside a tunnel (the tag was found in the inner packet).
    pub encapsulated: bool,
    /// Inside how many tunnels: 1, or 2 where a VM's overlay packet is encapsulated again by
    /// the host. Left out when 0; reports written before it have `encapsulated` only (see
    /// [`Hop::depth`]).
    #[serde(skip_serializing_if = "is_zero", default)]
    pub encap_depth: u8,
    /// vxlan, geneve or gre when encapsulated (the outer tunnel of two).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tunnel: Option<String>,
    /// The kernel the hop is in: "host", or a guest's name on a nested path.
    #[serde(default = "host_node")]
    pub node: String,
    /// The container runtime's pod the device belongs to (its namespace's, or for a host-side
    /// veth its peer's), where attach knows pods.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pod: Option<String>,
    /// The pod's Kubernetes namespace.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub namespace: Option<String>,
}

impl Hop {
    /// How many tunnels the hop saw the packet inside, also in reports without `encap_depth`.
    pub fn depth(&self) -> u8 {
        self.encap_depth.max(self.encapsulated as u8)
    }
}

/// The node of hops in reports written before nested paths.
pub fn host_node() -> String {
    HOST_NODE.to_string()
}

/// Latency statistics of one segment or of the whole journey.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub samples: u64,
    pub mean_ns: f64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OtherPath {
    pub packets: u64,
    pub hops: Vec<Hop>,
    pub segments: Vec<SegmentReport>,
    pub end_to_end: Stats,
}

impl OtherPath {
    /// Each hop's hook and device, in path order.
    pub fn hop_sequence(&self) -> Vec<(&str, Option<&str>)> {
        hop_sequence(&self.hops)
    }
}

fn hop_sequence(hops: &[Hop]) -> Vec<(&str, Option<&str>)> {
    (hops.iter())
        .map(|h| (h.hook.as_str(), h.ifname.as_deref()))
        .collect()
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SegmentReport {
    pub name: String,
    /// Hop indices.
    pub from: usize,
    pub to: usize,
    /// The packet spent this segment in a userspace datapath: no kernel hook splits it.
    /// Left out when false, so reports written before read back unchanged.
    #[serde(default, skip_serializing_if = "is_false")]
    pub userspace: bool,
    /// The segment crosses between two kernels: its time is estimated from both clocks (see
    /// `crossings`), not measured on one.
    #[serde(default, skip_serializing_if = "is_false")]
    pub estimated: bool,
    #[serde(flatten)]
    pub stats: Stats,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MissingHop {
    pub hop: usize,
    pub packets: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EventsReport {
    pub received: u64,
    /// Events the kernel could not hand over (ring buffer full).
    pub lost: u64,
    pub incomplete_packets: u64,
    /// TCP segments whose tag no hook could read (counted in the kernel).
    pub unreadable: u64,
    /// Events of later IPv4 fragments of tagged datagrams (the first fragment is the hop).
    pub fragments: u64,
    pub drops: Vec<DropReport>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct DropReport {
    pub reason: String,
    pub ifname: String,
    pub packets: u64,
}

// ---- profiler.attach.v1 ----

#[derive(Debug, Serialize, Deserialize)]
pub struct AttachReport {
    pub schema: String,
    /// The command line and build that wrote it (absent from reports written before, and
    /// from a peer's: its agent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub made: Option<Made>,
    pub kernel: String,
    pub node: String,
    pub targets: Vec<String>,
    /// The Services translated where the targets' packets meet a NAT, as read from
    /// kube-proxy's rules: "VIP:PORT/PROTO -> BACKEND, ... (MODE in NETNS)".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    pub filter: String,
    pub sample: u32,
    /// "summary" or "events".
    pub mode: String,
    pub duration_s: f64,
    pub segments: Vec<SegmentSummary>,
    /// The hop sequences followed packets took, most taken first, each with its segments in
    /// order (the waterfall); paths taken by few packets are only counted, in `rare_paths`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<AttachPath>,
    #[serde(default, skip_serializing_if = "RarePaths::is_none")]
    pub rare_paths: RarePaths,
    pub journeys: JourneyCounts,
    /// The journeys that ended in a drop, by the last hop that saw them and the kernel's drop
    /// reason, most first (left out when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drops: Vec<AttachDrop>,
    pub lost_events: u64,
    /// `--mode events`: the hop events read from the kernel (with `lost_events`, the events
    /// pipeline's rate and loss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_read: Option<u64>,
    /// The hooks in effect: deep, or stable where no deep hook could attach.
    pub hook_set: HookSet,
    pub hooks: Vec<HookStatus>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub program_costs: Option<Vec<ProgramCost>>,
    /// `attach -- COMMAND`: the workload profiled until it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandOutcome>,
    /// `attach --wire`: followed packets where they crossed the node's wire-facing devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire: Option<WireSummary>,
    /// `attach --lab`: the other nodes' reports (a lab's guests), each as its own attach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<AttachReport>,
    /// `attach --lab`: the wire between this node and each peer, both ways, on this node's clock.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<NodeLink>,
}

impl AttachReport {
    /// What became of hook `name`.
    pub fn hook(&self, name: &str) -> Option<&HookStatus> {
        hook_named(&self.hooks, name)
    }

    /// Segment `name` of the summary.
    pub fn segment(&self, name: &str) -> Option<&SegmentSummary> {
        self.segments.iter().find(|s| s.name == name)
    }
}

/// The wire between two nodes: packets that left one and entered the other, paired by what they
/// carry, and the two clocks related from the pairs of both directions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeLink {
    pub a: String,
    pub b: String,
    /// B's clock minus A's, bounded (absent where the pairs could not relate them: `unfit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<ClockBounds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unfit: Option<String>,
    /// A to B, then B to A.
    pub directions: Vec<LinkDirection>,
    /// What B's agent sent while it followed (a peer's sightings come as they are read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streamed: Option<Streamed>,
}

/// A peer's sightings sent to this node while both followed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Streamed {
    /// Sightings, and their bytes as JSON lines.
    pub lines: u64,
    pub bytes: u64,
    /// From the peer's `following` to its report.
    pub seconds: f64,
    /// Of those, received before this node asked the peer to stop.
    pub lines_before_stop: u64,
}

/// One direction of a link.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkDirection {
    pub from_node: String,
    pub to_node: String,
    /// Per pair of hops, most packets first; times on A's clock, each within `bound_ns`.
    pub crossings: Vec<WireCrossing>,
    /// Sightings whose identity more than one packet had on either side: never paired.
    pub ambiguous: u64,
    /// Seen leaving and never entering (dropped between, not followed there, or past the end).
    pub unmatched_leaving: u64,
    /// Seen entering and never leaving.
    pub unmatched_entering: u64,
    /// Pairs at a time no clock fit covers: paired, not timed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub untimed: u64,
    /// Per crossing, the way across both nodes as one waterfall.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathAcross>,
    /// `--mode events`: the ways across packet by packet, each paired packet's own journeys on
    /// both nodes joined at the wire, grouped by the hops they took (most packets first);
    /// every segment of a way counts the same packets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packet_paths: Vec<PathAcross>,
    /// Of the timed pairs, those whose journey on either node was not kept (past the bound) or
    /// did not show the hop it crossed at: not in `packet_paths`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unjoined: u64,
}

/// A way across two nodes: the leaving node's most taken path up to the hop a crossing left
/// at, the wire, and the entering node's most taken path from the hop it entered at. Each node
/// counts its own segments (the wire: the packets paired), so the parts are medians of
/// different packets, joined where the packets were paired.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PathAcross {
    pub segments: Vec<SegmentAcross>,
}

/// A segment of a way across nodes: within one node, or the wire between two.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SegmentAcross {
    /// The node of each end: different on the wire only.
    pub from_node: String,
    pub to_node: String,
    /// As the node's report names it; "wire" between nodes.
    pub name: String,
    pub from: String,
    pub to: String,
    pub packets: u64,
    pub p50_ns: f64,
    pub p90_ns: f64,
    pub p99_ns: f64,
    /// The wire's: half the width of its median packet's clock bound (0 within a node).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bound_ns: u64,
}

/// `attach --wire`: the followed packets seen leaving and entering the node's wire-facing
/// devices, and those seen leaving one and entering another of the same node (one clock).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WireSummary {
    /// The wire-facing devices, as the report names hops.
    pub devices: Vec<String>,
    pub leaving: u64,
    pub entering: u64,
    /// Per pair of devices, most packets first.
    pub crossings: Vec<WireCrossing>,
    /// Sightings whose wire identity more than one packet had on either side: never paired.
    pub ambiguous: u64,
    /// Sightings past the memory bound, counted and not kept.
    pub not_kept: u64,
    /// Sightings not sent to the node joining them: more waited to be sent than the bound
    /// allows (that node read too slowly), or more arrived there than it keeps. With `--mode
    /// events` the journey lines share the bound, and those not sent count here too.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub not_sent: u64,
}

/// Packets paired by their wire identity: seen leaving `from` and entering `to`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WireCrossing {
    pub from: String,
    pub to: String,
    pub packets: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    /// Across two clocks: half the width of the median packet's bound (0 on one clock).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bound_ns: u64,
}

/// `attach --sightings`: one line per followed packet at a wire-facing device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SightingLine {
    pub node: String,
    /// "leaving" or "entering".
    pub direction: String,
    pub hop: String,
    /// The device's namespace and name, where the node knows them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// On the node's own clock (CLOCK_MONOTONIC), nanoseconds.
    pub ts_ns: u64,
    /// The journey, as `--mode events` names it.
    pub journey: String,
    pub id: crate::cluster::join::WireId,
}

/// The workload `attach -- COMMAND` ran, and how it ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutcome {
    pub argv: Vec<String>,
    /// Its exit status; None when a signal ended it.
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
}

/// One segment's latency: two consecutive hops of followed packets.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SegmentSummary {
    pub name: String,
    pub from: String,
    pub to: String,
    /// Where the segment ends: the namespace and interface of its second hop.
    pub netns: String,
    pub ifname: String,
    pub count: u64,
    pub mean_ns: f64,
    pub p50_ns: f64,
    pub p90_ns: f64,
    pub p99_ns: f64,
    /// The pod the segment ends at (or starts from), where attach knows pods.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pod: Option<String>,
    /// That pod's Kubernetes namespace.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub namespace: Option<String>,
    /// The kernel's histogram (for /metrics); not in the JSON.
    #[serde(skip)]
    pub buckets: Vec<u64>,
    #[serde(skip)]
    pub sum_ns: u64,
}

/// One way through the node, and the journeys that took it to its end.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachPath {
    /// Journeys whose last segment was this path's last.
    pub packets: u64,
    pub hops: Vec<String>,
    /// From hop k to hop k+1; each counts every journey that crossed it on this way, those that
    /// went on further included.
    pub segments: Vec<SegmentSummary>,
}

/// The paths too rarely taken to show whole.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RarePaths {
    pub paths: usize,
    pub packets: u64,
}

impl RarePaths {
    fn is_none(&self) -> bool {
        self.paths == 0
    }
}

/// What became of the journeys: nothing is lost silently.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct JourneyCounts {
    pub started: u64,
    /// Ended where the buffer was freed after use (consume_skb).
    pub consumed: u64,
    /// Ended in a drop (kfree_skb).
    pub dropped: u64,
    /// Their buffer was later seen carrying another packet: freed where no hook saw it (TCP
    /// receive frees without a tracepoint), so they ended at their last hop.
    pub ended_unseen: u64,
    /// Kept across a reallocated buffer.
    pub reheaded: u64,
    /// No end seen: still in flight, past the gap limit, or evicted from the in-flight map.
    pub unfinished: u64,
    /// Not journeys: copies of multicast and broadcast frames met in scope, which start none
    /// (a bridge floods them to every port). Left out when there were none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub multicast_not_followed: u64,
}

/// Journeys that ended in a drop after the same hop, for the same reason.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AttachDrop {
    /// The kernel's drop reason (its BTF's name, lowercase: "no_socket").
    pub reason: String,
    /// What the packets were: "ipv4/udp", "ipv6/icmpv6", "arp" (reports before it: empty).
    #[serde(default)]
    pub protocol: String,
    /// What drops of this reason and protocol usually are, where they are a known harmless kind.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hint: Option<String>,
    /// The last hop that saw the packets.
    pub after: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub namespace: Option<String>,
    pub packets: u64,
}

/// `attach --mode events`: one line per journey, printed when it ends.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JourneyLine {
    /// See [`journey_name`].
    pub journey: String,
    pub start_ns: u64,
    /// consumed, dropped, or unseen (no hook saw the buffer freed within the gap limit), or
    /// in-flight when the profiler stopped first.
    pub end: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub drop_reason: Option<String>,
    pub hops: Vec<HopLine>,
}

/// A journey's name in JSON lines (`--mode events`, `--sightings`): its first buffer's address
/// in hex and its first timestamp, unique on its node.
pub fn journey_name(head: u64, start_ns: u64) -> String {
    format!("{head:x}-{start_ns}")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HopLine {
    pub hop: String,
    /// Nanoseconds since the journey's first hop.
    pub at_ns: u64,
    pub len: u32,
    /// The hop's pod and its namespace, where attach knows pods.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub namespace: Option<String>,
}

// ---- profiler.compare.v1 ----

#[derive(Debug, Serialize, Deserialize)]
pub struct CompareReport {
    pub schema: String,
    /// The command line and build that wrote it (absent from reports written before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub made: Option<Made>,
    pub placement: Placement,
    pub summary: Vec<CompareRow>,
    /// Types whose lab this kernel cannot build (vlan without 8021q, ...), with the reason.
    pub skipped: Vec<Skipped>,
    pub runs: Vec<RunReport>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Skipped {
    pub topology: String,
    pub reason: String,
}

/// One type at one size: its request latency and what makes it differ from the baseline.
#[derive(Debug, Serialize, Deserialize)]
pub struct CompareRow {
    pub topology: String,
    pub size: usize,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub mean_ns: f64,
    /// Mean request latency minus the baseline's at the same size (None for the baseline).
    pub delta_ns: Option<f64>,
    pub contributors: Vec<Contributor>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Contributor {
    pub segment: String,
    /// This segment's mean minus the same-named baseline segment's (all of it if the baseline
    /// has none).
    pub delta_ns: f64,
    /// Share of the type's total difference.
    pub percent: f64,
}

// ---- profiler.bench.v1 ----

/// `profiler bench paper`: the study's matrix run on this machine, and its findings judged.
#[derive(Debug, Serialize, Deserialize)]
pub struct BenchReport {
    pub schema: String,
    /// The command line that made the report.
    pub command: String,
    pub quick: bool,
    pub kernel: String,
    /// CPUs, their model and the memory of the machine it ran on.
    pub machine: String,
    /// The commit of the checkout it ran in (`git describe --always --dirty`), if any.
    pub commit: Option<String>,
    pub elapsed_s: f64,
    /// The 1-minute load average when the bench started and when it ended: above 0 on an idle
    /// machine's count of CPUs, other work shared the machine.
    pub load_start: f64,
    pub load_end: f64,
    /// Labs this kernel cannot build, with the reason.
    pub skipped: Vec<Skipped>,
    pub cells: Vec<BenchCell>,
    pub findings: Vec<Finding>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CellStatus {
    Ok,
    /// Not run, and why (an all-to-all on a topology that has no more than two pods).
    Skipped,
    /// Run, and failed: the error.
    Failed,
}

/// One point of the matrix: a lab, an experiment and its parameters.
#[derive(Debug, Serialize, Deserialize)]
pub struct BenchCell {
    /// The lab's name: topology, with -xhost when cross-host.
    pub lab: String,
    pub topology: String,
    pub placement: Placement,
    /// The study's three experiments: rr (sockperf), stream (iperf), alltoall (MPI_Alltoall).
    pub experiment: TrafficKind,
    pub proto: Proto,
    /// Payload bytes per message.
    pub size: usize,
    /// rr: exchanges; alltoall: rounds; stream: 0 (it runs for `duration_s`).
    pub count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    /// alltoall: pods per host and processes per pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub procs: Option<u32>,
    pub status: CellStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub elapsed_s: f64,
    pub result: CellResult,
    /// The cell's full run report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunReport>,
}

/// A cell's figures; each experiment fills its own.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gbit_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_s: Option<f64>,
    /// rr: one-way request latency (end to end); stream: the tagged messages' latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_p99_ms: Option<f64>,
}

/// One of the study's findings, judged on this machine.
#[derive(Debug, Serialize, Deserialize)]
pub struct Finding {
    /// 1 to 7, as numbered in the study.
    pub number: u8,
    /// What the study says.
    pub claim: String,
    /// What was tested of it here.
    pub test: String,
    /// Whether it holds here; None when it could not be tested, and `why`.
    pub holds: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// The figures that decide it.
    pub numbers: Vec<FindingNumber>,
    /// Per compared pair: the segments that account for the difference.
    pub segments: Vec<SegmentDifference>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FindingNumber {
    pub lab: String,
    pub size: usize,
    /// What was measured: "gbit_per_s", "p50_us", "round_p50_ms".
    pub metric: String,
    pub value: f64,
}

/// The segments that make `lab` differ from `versus` (compare's attribution).
#[derive(Debug, Serialize, Deserialize)]
pub struct SegmentDifference {
    pub lab: String,
    pub versus: String,
    pub size: usize,
    pub experiment: TrafficKind,
    /// Mean latency of `lab` minus that of `versus`.
    pub delta_ns: f64,
    pub contributors: Vec<Contributor>,
}

// ---- profiler.doctor.v1 ----

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Ok,
    Unavailable,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub status: CheckStatus,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DoctorReport {
    pub schema: String,
    pub kernel: String,
    pub privileges: Check,
    pub btf: Check,
    pub program_types: Vec<Check>,
    /// `profiler run`'s hooks (tagged traffic).
    pub hooks: Vec<HookStatus>,
    /// `profiler attach`'s hooks (real traffic followed by its buffers).
    pub follow_hooks: Vec<HookStatus>,
}
