//! `profiler agent`: the profiler's half inside a guest on a nested path. It attaches the
//! guest's probes for the host's run (its own kernel, its own BTF: deep hooks where the guest
//! has kprobes), runs the UDP server in the guest's pod, and hands its events and the server's
//! stamps to the host run at the end, which puts them on the host's timeline (crossing.rs).
//!
//! The channel is a byte stream of JSON lines, one request from the host and one answer from
//! the agent at a time: a virtio-serial port in a lab (`--serial NAME`: QEMU's
//! `-device virtserialport,name=NAME` with a Unix-socket chardev on the host, the channel
//! qemu-guest-agent uses, so real VMs have it too; this machine has no vsock), or TCP on a real
//! node (`--listen ADDR`, `profiler run --agent ADDR`) under mutual TLS (cluster/tls.rs): a
//! lab hands its guests their identity on the serial channel, a node reads it from files.
//! Each end reads lines of a bounded size, an agent serves one host at a time and refuses
//! the others in one line.
//!
//! This file is the protocol both ends speak; the guest's side is guest.rs, the host's
//! host.rs, and merge.rs puts what a guest hands over on the host's timeline.

mod guest;
mod host;
mod merge;

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use profiler_common::HookId;
use serde::{Deserialize, Serialize};

use super::record::WireEvent;
use crate::{
    attach::across::AttachRequest,
    kernel::btf::DropReasons,
    lab::nested::{ExecRequest, SetupRequest},
    report::schema::{HookSet, HookStatus, Proto},
};

pub use guest::{serve, Listen, Security};
pub use host::{guest_node, guest_of, Remote};
pub use merge::{merge, GuestPart, Merged};

/// What the host asks.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// A lab's on the serial channel: `ip` commands that build the guest's side and the
    /// guest's identity for its TCP side; over TCP, an empty one. Answered with a
    /// [`SetupAnswer`].
    Setup(SetupRequest),
    /// `profiler lab exec` (serial channel only): a command in one of the guest's namespaces.
    Exec(ExecRequest),
    /// `profiler attach --lab` or `--peer`: attach here, answered once following; on the
    /// serial channel the host may go and come back (to run `lab exec` meanwhile), over TCP
    /// its connection's end stops it; StopAttach ends it with the report.
    Attach(AttachRequest),
    /// Ends the attach and answers with its report and sightings.
    StopAttach {},
    /// Answered at once with the same word (`{"sync": WORD}`): on the serial channel, where a
    /// host that went away mid-request leaves its answer to the next, the host reads past what
    /// was left to this echo before it asks.
    Sync(String),
    Start(Start),
    /// Runs the client in the guest's pod (answered with [`Answer::Client`] once it is done).
    Client(Client),
    Stop {
        run_id: u32,
    },
}

/// A run's part in the guest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Start {
    pub run_id: u32,
    pub port: u16,
    pub hooks: HookSet,
    /// The server's namespace as the guest names it ("(root)" for its own), when the server
    /// is in this guest.
    pub server_ns: Option<String>,
    pub server_addr: Ipv4Addr,
    pub size: usize,
    /// The server's protocol (UDP from hosts that did not say).
    #[serde(default)]
    pub proto: Proto,
}

/// The request/response client of a run whose client pod is in the guest (vmp2vmp).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Client {
    pub run_id: u32,
    /// The client's namespace as the guest names it.
    pub client_ns: String,
    pub server_addr: Ipv4Addr,
    pub port: u16,
    pub size: usize,
    pub count: u32,
    pub rate: Option<f64>,
    pub timeout: Duration,
    /// Untagged exchanges first (run id 0), so neighbour resolution is not measured.
    pub warm_up: u32,
    #[serde(default)]
    pub proto: Proto,
}

impl Client {
    /// At most how long the client takes: its pace, a timeout per exchange, and slack.
    fn within(&self) -> Duration {
        let paced = self.rate.map_or(0.0, |r| f64::from(self.count) / r);
        let waits = self.timeout * (self.count + self.warm_up);
        Duration::from_secs_f64(paced) + waits + Duration::from_secs(60)
    }
}

/// What the agent answers to Start and Stop; each names its run, so an answer left in the
/// channel by a host run that died is skipped by the next one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Ready {
        run_id: u32,
        hook_set: HookSet,
        hooks: Vec<HookStatus>,
    },
    Done(Done),
    /// The client's stamps, on the guest's clock: (seq, request sent, response received).
    Client {
        run_id: u32,
        stamps: Vec<(u32, u64, u64)>,
    },
    Error {
        run_id: u32,
        error: String,
    },
}

/// The guest's events (as [`WireEvent`]s) and the server's (seq, received, sent) stamps, on
/// the guest's clock.
#[derive(Debug, Serialize, Deserialize)]
pub struct Done {
    pub run_id: u32,
    pub events: Vec<WireEvent>,
    pub stamps: Vec<(u32, u64, u64)>,
    pub lost: u64,
    pub unreadable: u64,
    /// The names of the reasons its drops carry, by its kernel's numbers (the host's differ
    /// between kernel versions).
    #[serde(default)]
    pub drop_reasons: Vec<(u32, String)>,
}

impl Done {
    /// Its drops' reasons in the host's numbering (`host`), by name; a reason the host's
    /// kernel does not name keeps its number.
    pub fn renumber_drops(&mut self, host: &DropReasons) {
        let names: HashMap<u32, &str> = self
            .drop_reasons
            .iter()
            .map(|(n, name)| (*n, name.as_str()))
            .collect();
        for e in &mut self.events {
            if e.7 == HookId::KfreeSkb as u8 {
                e.6 = names.get(&e.6).and_then(|n| host.value(n)).unwrap_or(e.6);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::nested;

    #[test]
    fn the_labs_setup_request_is_understood() {
        let cmds = vec!["link set eth0 up".to_string()];
        let request = SetupRequest {
            commands: cmds.clone(),
            tls: None,
        };
        let lab = serde_json::json!({ nested::SETUP: request }).to_string();
        assert!(matches!(serde_json::from_str(&lab), Ok(Request::Setup(r)) if r.commands == cmds));
    }
}
