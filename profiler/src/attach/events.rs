//! `--mode events`: hops grouped into journeys, each printed as one JSON line when it ends.

use std::{
    collections::HashMap,
    io::{BufWriter, Stdout, Write},
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use profiler_common::{HopEvent, END_CONSUMED, END_DROPPED};

use super::scope::Namer;
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
    out: BufWriter<Stdout>,
}

impl OpenJourneys {
    pub fn new(max_gap_ns: u64) -> Self {
        OpenJourneys {
            open: HashMap::new(),
            max_gap_ns,
            last_flush: Instant::now(),
            read: 0,
            out: BufWriter::with_capacity(1 << 16, std::io::stdout()),
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
        self.out.flush()?;
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
        self.out.flush()?;
        Ok(())
    }
}

fn print_journey(
    out: &mut impl Write,
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
    serde_json::to_writer(&mut *out, &line)?;
    writeln!(out)?;
    Ok(())
}
