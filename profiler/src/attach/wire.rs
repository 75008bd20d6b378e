//! `attach --wire`: followed packets where they leave or enter the node through its wire-facing
//! devices, with what they carry on the wire (profiler-ebpf's `sight`). Packets seen leaving one
//! of them and entering another of the same node are paired by that identity (one clock: their
//! crossing is exact); every sighting can be written as a JSON line (`--sightings`), which is
//! what another node's sightings are joined with.

use std::{
    collections::HashMap,
    io::{BufWriter, Write},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use profiler_common::{device_key, HopPoint, SightingEvent, WireFlow, WIRE_ENTERING, WIRE_LEAVING};
use tokio::sync::mpsc::UnboundedSender;

use super::scope::Namer;
use crate::{
    cluster::join::{self, Flow, Sighting, WireId},
    kernel::ring,
    report::schema::{journey_name, SightingLine, WireCrossing, WireSummary},
};

/// Sightings kept per direction for the report's pairing: the memory bound (about 80 MB; as
/// lines for another node's join, about 300 MB more). Those written out (`--sightings`, a
/// streaming agent's) are not bounded by it.
pub(super) const KEPT: usize = 1 << 20;

pub struct Sightings {
    node: String,
    leaving: Vec<Sighting>,
    entering: Vec<Sighting>,
    /// Every sighting read, leaving and entering, kept or not.
    read: [u64; 2],
    not_kept: u64,
    /// The hop where packets were first seen leaving or entering through each device, to name
    /// the crossings.
    points: HashMap<(u64, u8), HopPoint>,
    lines: Option<BufWriter<Box<dyn Write + Send + Sync>>>,
    kept_lines: Option<Vec<SightingLine>>,
    /// The live join's feed (live.rs), which keeps only its window.
    live: Option<UnboundedSender<SightingLine>>,
}

impl Sightings {
    /// `lines`: where `--sightings` writes a JSON line each; `keep`: whether they are also
    /// kept for the caller (a host joining them with another node's); `live`: whether they
    /// are also sent to the live join.
    pub fn new(
        node: &str,
        lines: Option<Box<dyn Write + Send + Sync>>,
        keep: bool,
        live: Option<UnboundedSender<SightingLine>>,
    ) -> Self {
        Sightings {
            node: node.to_string(),
            leaving: Vec::new(),
            entering: Vec::new(),
            read: [0; 2],
            not_kept: 0,
            points: HashMap::new(),
            lines: lines.map(|w| BufWriter::with_capacity(1 << 16, w)),
            kept_lines: keep.then(Vec::new),
            live,
        }
    }

    pub fn drain(&mut self, ring: &mut RingBuf<MapData>, namer: &mut Namer) -> Result<()> {
        while let Some(item) = ring.next() {
            let Some(ev) = ring::decode::<SightingEvent>(&item) else {
                continue;
            };
            self.take(&ev, namer)?;
        }
        if let Some(out) = &mut self.lines {
            out.flush()?;
        }
        Ok(())
    }

    fn take(&mut self, ev: &SightingEvent, namer: &mut Namer) -> Result<()> {
        let at = device_key(ev.point.netns, ev.point.ifindex);
        self.points.entry((at, ev.direction)).or_insert(ev.point);
        let seen = Sighting {
            id: wire_id(ev),
            ts: ev.ts_ns,
            journey: ev.journey_head ^ ev.journey_start_ns.rotate_left(32),
            at,
        };
        let leaving = ev.direction == WIRE_LEAVING;
        self.read[usize::from(!leaving)] += 1;
        let kept = if leaving {
            &mut self.leaving
        } else {
            &mut self.entering
        };
        // Past the bound a sighting is still written out (a file, a host's stream), not kept.
        let full = kept.len() >= KEPT;
        if full {
            self.not_kept += 1;
        } else {
            kept.push(seen.clone());
        }
        let keeps = !full && self.kept_lines.is_some();
        if self.lines.is_none() && !keeps && self.live.is_none() {
            return Ok(());
        }
        let hop = namer.hop(&ev.point);
        let line = SightingLine {
            node: self.node.clone(),
            direction: if leaving { "leaving" } else { "entering" }.into(),
            hop: hop.name.clone(),
            netns: hop.netns.clone(),
            ifname: hop.ifname.clone(),
            ts_ns: ev.ts_ns,
            journey: journey_name(ev.journey_head, ev.journey_start_ns),
            id: seen.id,
        };
        if let Some(out) = &mut self.lines {
            serde_json::to_writer(&mut *out, &line)?;
            writeln!(out)?;
        }
        // A live join that has ended (the attach is ending) needs no more.
        if let Some(live) = &self.live {
            let _ = live.send(line.clone());
        }
        if let Some(kept) = self.kept_lines.as_mut().filter(|_| !full) {
            kept.push(line);
        }
        Ok(())
    }

    /// The counts, and the packets that left one wire-facing device of this node and entered
    /// another, per pair of devices; and the sightings kept as lines.
    pub fn summary(
        self,
        devices: Vec<String>,
        namer: &mut Namer,
    ) -> (WireSummary, Vec<SightingLine>) {
        let joined = join::join(self.leaving, self.entering);
        let mut by_pair: HashMap<(u64, u64), Vec<u64>> = HashMap::new();
        for p in &joined.pairs {
            by_pair
                .entry((p.left.at, p.entered.at))
                .or_default()
                .push(p.entered.ts.saturating_sub(p.left.ts));
        }
        let mut name = |at: u64, direction: u8| match self.points.get(&(at, direction)) {
            Some(p) => namer.hop(p).name.clone(),
            None => format!("{at:x}"),
        };
        let mut crossings: Vec<WireCrossing> = by_pair
            .into_iter()
            .map(|((from, to), ns)| {
                crossing(name(from, WIRE_LEAVING), name(to, WIRE_ENTERING), ns, 0)
            })
            .collect();
        by_packets(&mut crossings);
        let summary = WireSummary {
            devices,
            leaving: self.read[0],
            entering: self.read[1],
            crossings,
            ambiguous: joined.ambiguous,
            not_kept: self.not_kept,
            not_sent: 0,
        };
        (summary, self.kept_lines.unwrap_or_default())
    }
}

/// A crossing from its packets' times (at least one); `bound_ns`: the median packet's bound.
pub(super) fn crossing(from: String, to: String, mut ns: Vec<u64>, bound_ns: u64) -> WireCrossing {
    ns.sort_unstable();
    let q = |f: f64| ns[((ns.len() - 1) as f64 * f).round() as usize];
    WireCrossing {
        from,
        to,
        packets: ns.len() as u64,
        p50_ns: q(0.5),
        p90_ns: q(0.9),
        p99_ns: q(0.99),
        max_ns: q(1.0),
        bound_ns,
    }
}

/// Most packets first.
pub(super) fn by_packets(crossings: &mut [WireCrossing]) {
    crossings.sort_by(|a, b| b.packets.cmp(&a.packets).then(a.from.cmp(&b.from)));
}

fn flow(f: &WireFlow) -> Flow {
    Flow {
        saddr: f.saddr,
        daddr: f.daddr,
        proto: f.proto,
        sport: f.sport,
        dport: f.dport,
        ip_id: f.ip_id,
    }
}

fn wire_id(ev: &SightingEvent) -> WireId {
    WireId {
        outer: flow(&ev.outer),
        inner: (ev.has_inner != 0).then(|| flow(&ev.inner)),
        tcp_seq: ev.tcp_seq,
        payload: ev.payload,
    }
}
