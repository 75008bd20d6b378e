//! What every kind of tagged traffic shares (ping-pong in rr.rs, streams, all-to-all): the
//! payload sizes a tag fits in, the two ends' namespaces and addresses, and the application's
//! stamps. Every payload starts with a tag (magic, run id, sequence, direction) and the
//! traffic stamps each send and receive with CLOCK_MONOTONIC, the clock bpf_ktime_get_ns reads,
//! so the application is the first and last hop.

use std::net::Ipv4Addr;

use profiler_common::TAG_LEN;

pub use crate::report::schema::Proto;

pub const MIN_SIZE: usize = TAG_LEN;
pub const MAX_SIZE: usize = 64 * 1024;
/// Largest UDP payload over IPv4.
pub const MAX_UDP_SIZE: usize = 65_507;

/// Where the two ends run and what the client sends to.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub client_ns: Option<String>,
    pub server_ns: Option<String>,
    pub server_addr: Ipv4Addr,
    /// What the client sends to: the server's address, or a Service's ClusterIP that the path
    /// translates to it.
    pub dest_addr: Ipv4Addr,
    /// The server runs elsewhere (a guest's agent), which keeps the server's stamps: the
    /// outcome has the client's half only.
    pub remote_server: bool,
}

#[cfg(test)]
impl Endpoints {
    /// Both ends in this process's namespace, over loopback.
    pub fn loopback() -> Endpoints {
        Endpoints {
            client_ns: None,
            server_ns: None,
            server_addr: Ipv4Addr::LOCALHOST,
            dest_addr: Ipv4Addr::LOCALHOST,
            remote_server: false,
        }
    }
}

/// Application timestamps of one direction of one exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    pub seq: u32,
    pub direction: u32,
    pub send_ns: u64,
    pub recv_ns: u64,
}
