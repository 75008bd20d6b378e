//! `--mode events`: hops grouped into journeys, each printed as one JSON line when it ends.

use std::{
    collections::HashMap,
    io::{BufWriter, Write},
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use profiler_common::{HopEvent, END_CONSUMED, END_DROPPED};
use tokio::sync::mpsc::UnboundedSender;

use super::{packets, scope::Namer};
use crate::{
    kernel::{monotonic_ns, ring},
    report::schema::{journey_name, HopLine, JourneyLine},
};

/// The journeys whose end has not been seen yet, by (first buffer, start time).
pub struct OpenJourneys {
    open: HashMap<(u64, u64), Vec<HopEvent>>,
    max_gap_ns: u64,
    last_flush: Instant,
    /// Hop events read from the ring so far.
    pub read: u64,
    /// Journey lines, written out once per drain: stdout alone would make a write per line.
    out: Lines,
}

/// Where journey lines go: a writer (stdout, an agent's channel to its host), and the first
/// KEPT lines themselves to whoever joins them with other nodes' (across.rs), which keeps no
/// more: the channel's memory stays bounded however long attach follows.
struct Lines {
    out: BufWriter<Box<dyn Write + Send + Sync>>,
    keep: Option<UnboundedSender<JourneyLine>>,
    kept: usize,
}

impl OpenJourneys {
    /// `out`: where the lines are written (None: stdout); `keep`: where they are also sent.
    pub fn new(
        max_gap_ns: u64,
        out: Option<Box<dyn Write + Send + Sync>>,
        keep: Option<UnboundedSender<JourneyLine>>,
    ) -> Self {
        let out = out.unwrap_or_else(|| Box::new(std::io::stdout()));
        OpenJourneys {
            open: HashMap::new(),
            max_gap_ns,
            last_flush: Instant::now(),
            read: 0,
            out: Lines {
                out: BufWriter::with_capacity(1 << 16, out),
                keep,
                kept: 0,
            },
        }
    }

    pub fn drain(&mut self, ring: &mut RingBuf<MapData>, namer: &mut Namer) -> Result<()> {
        while let Some(item) = ring.next() {
            let Some(ev) = ring::decode::<HopEvent>(&item) else {
                continue;
            };
            self.read += 1;
            let id = (ev.journey_head, ev.journey_start_ns);
            let hops = self.open.entry(id).or_default();
            hops.push(ev);
            if ev.end != 0 {
                let hops = self.open.remove(&id).unwrap_or_default();
                let end = if ev.end == END_CONSUMED {
                    "consumed"
                } else {
                    "dropped"
                };
                print_journey(&mut self.out, id, &hops, end, namer)?;
            }
        }
        if self.last_flush.elapsed() >= Duration::from_nanos(self.max_gap_ns) {
            self.last_flush = Instant::now();
            self.flush_idle(namer)?;
        }
        self.out.out.flush()?;
        Ok(())
    }

    /// Journeys whose last hop is older than the gap limit cannot go on: print them.
    fn flush_idle(&mut self, namer: &mut Namer) -> Result<()> {
        let now = monotonic_ns();
        let idle: Vec<_> = self
            .open
            .iter()
            .filter(|(_, h)| {
                h.last()
                    .is_some_and(|e| now.saturating_sub(e.ts_ns) > self.max_gap_ns)
            })
            .map(|(k, _)| *k)
            .collect();
        for id in idle {
            let hops = self.open.remove(&id).unwrap_or_default();
            print_journey(&mut self.out, id, &hops, "unseen", namer)?;
        }
        Ok(())
    }

    pub fn flush_all(&mut self, namer: &mut Namer) -> Result<()> {
        for (id, hops) in std::mem::take(&mut self.open) {
            print_journey(&mut self.out, id, &hops, "in-flight", namer)?;
        }
        self.out.out.flush()?;
        Ok(())
    }
}

fn print_journey(
    out: &mut Lines,
    id: (u64, u64),
    hops: &[HopEvent],
    end: &str,
    namer: &mut Namer,
) -> Result<()> {
    let start = id.1;
    let last = hops.last();
    let line = JourneyLine {
        journey: journey_name(id.0, id.1),
        start_ns: start,
        end: end.into(),
        drop_reason: last
            .filter(|e| e.end == END_DROPPED)
            .map(|e| namer.drop_reasons.name(e.drop_reason)),
        hops: hops
            .iter()
            .map(|e| {
                let hop = namer.hop(&e.point);
                HopLine {
                    hop: hop.name.clone(),
                    at_ns: e.ts_ns.saturating_sub(start),
                    len: e.len,
                    pod: hop.pod.clone(),
                    namespace: hop.namespace.clone(),
                }
            })
            .collect(),
    };
    serde_json::to_writer(&mut out.out, &line)?;
    writeln!(out.out)?;
    if let Some(keep) = out.keep.as_ref().filter(|_| out.kept < packets::KEPT) {
        out.kept += 1;
        // A join that has ended (the attach is ending) needs no more.
        let _ = keep.send(line);
    }
    Ok(())
}
