//! What a run collected, as a file: `run --save-events FILE` writes it and `profiler report
//! --events FILE` attributes it again, without root and without the lab. It holds the hop
//! events of every node (a guest's on its own clock, as its agent handed them over), the devices and
//! namespaces hops are named after, the traffic's stamps and what the kernel said of its hooks:
//! everything attribution (attribute.rs) reads, nothing it computes.

use std::{collections::BTreeMap, path::Path};

use anyhow::{anyhow, bail, Result};
use profiler_common::Event;
use serde::{Deserialize, Serialize};

use super::{agent::GuestPart, Driven};
use crate::{
    lab::target::Devices,
    report::{
        self,
        schema::{HookSet, HookStatus, Made, ProgramCost, Proto, StreamResult},
    },
};

pub const EVENTS_SCHEMA: &str = "profiler.events.v1";

/// An event as (ts_ns, seq, direction, ifindex, netns, len, drop_reason, hook, flags, cost_ns).
pub type WireEvent = (u64, u32, u32, u32, u32, u32, u32, u8, u8, u32);

pub fn to_wire(e: &Event) -> WireEvent {
    (
        e.ts_ns,
        e.seq,
        e.direction,
        e.ifindex,
        e.netns,
        e.len,
        e.drop_reason,
        e.hook,
        e.flags,
        e.cost_ns,
    )
}

pub fn from_wire(w: &WireEvent) -> Event {
    Event {
        ts_ns: w.0,
        seq: w.1,
        direction: w.2,
        ifindex: w.3,
        netns: w.4,
        len: w.5,
        drop_reason: w.6,
        hook: w.7,
        flags: w.8,
        _pad: [0; 2],
        cost_ns: w.9,
    }
}

/// One run's collection.
#[derive(Serialize, Deserialize)]
pub struct Collected {
    pub schema: String,
    pub made: Option<Made>,
    pub kernel: String,
    pub devices: Devices,
    /// The namespaces of the traffic's ends, and of every pod (all-to-all's processes).
    pub client_netns: String,
    pub server_netns: String,
    pub pod_netns: Vec<String>,
    /// Each host namespace's inode, the id its hops carry.
    pub inodes: BTreeMap<String, u32>,
    /// The host kernel's drop reasons by number (a guest's drops are renumbered to these).
    pub drop_reasons: BTreeMap<u32, String>,
    pub service: Option<String>,
    /// The traffic as asked for: its protocol, message size and count.
    pub proto: Proto,
    pub size: usize,
    pub count: u32,
    pub driven: Driven,
    /// A stream's throughput before the programs were loaded.
    pub unprofiled: Option<StreamResult>,
    /// The host's hop events (a guest's are in its part).
    pub events: Vec<WireEvent>,
    pub lost: u64,
    pub unreadable: u64,
    pub hook_set: HookSet,
    /// The host's hooks, then the guests' (named "NODE HOOK").
    pub hooks: Vec<HookStatus>,
    /// How many of `hooks` are the host's: hop names come from those.
    pub host_hooks: usize,
    pub program_costs: Option<Vec<ProgramCost>>,
    /// A nested run's guests' parts, on their own clocks: attribution puts them on the host's.
    pub guests: Vec<GuestPart>,
}

impl Collected {
    /// Writes it as one line of JSON (the events are most of it).
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)? + "\n")
    }

    /// Reads a saved collection; anything else is refused in one line.
    pub fn read(path: &Path) -> Result<Collected> {
        report::read_with(path, Collected::parse)
    }

    pub fn parse(text: &str) -> Result<Collected> {
        let (value, schema) = report::schema_of(text, "a run's events")?;
        match schema.as_str() {
            EVENTS_SCHEMA => {}
            other if other.starts_with("profiler.events.") => {
                bail!("schema {other} is not one this profiler reads ({EVENTS_SCHEMA})")
            }
            other => bail!(
                "schema {other} is a report, not a run's events (`run --save-events FILE` writes those)"
            ),
        }
        serde_json::from_value(value).map_err(|e| anyhow!("{EVENTS_SCHEMA}: {e}"))
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.iter().map(from_wire).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_survives_the_wire() {
        let e = Event {
            ts_ns: 1 << 40,
            seq: 7,
            direction: 1,
            ifindex: 12,
            netns: 4026531840,
            len: 98,
            drop_reason: 2,
            hook: 5,
            flags: 3,
            _pad: [0; 2],
            cost_ns: 411,
        };
        let json = serde_json::to_string(&to_wire(&e)).expect("JSON");
        let back: WireEvent = serde_json::from_str(&json).expect("a wire event");
        assert_eq!(from_wire(&back), e);
    }

    #[test]
    fn what_is_not_a_run_s_events_is_refused_in_one_line() {
        for (text, says) in [
            ("{", "not JSON"),
            ("{}", "no \"schema\""),
            (
                r#"{"schema":"profiler.run.v1"}"#,
                "a report, not a run's events",
            ),
            (
                r#"{"schema":"profiler.events.v9"}"#,
                "not one this profiler reads",
            ),
            (r#"{"schema":"profiler.events.v1"}"#, "missing field"),
        ] {
            let e = Collected::parse(text).err().map(|e| format!("{e:#}"));
            let e = e.unwrap_or_else(|| panic!("{text} was read as events"));
            assert!(e.contains(says) && !e.contains('\n'), "{text}: {e}");
        }
    }
}
