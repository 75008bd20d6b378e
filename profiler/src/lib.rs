//! eBPF datapath profiler for container networks: kernel probes timestamp the profiler's own
//! tagged packets at every hop of a path (`run`), or follow real packets by their buffers
//! (`attach`), and the time between hops is attributed to the segment the packet crossed there.
//!
//! The two modes, and the layers they share:
//! - [`run`]: tagged traffic, journeys rebuilt from events, `compare`.
//! - [`attach`]: following real traffic, the filter compiler, in-kernel histograms, metrics.
//! - [`kernel`]: BTF, kallsyms, loading and attaching the eBPF programs, ring buffers, doctor,
//!   the delay injector.
//! - [`datapath`]: the hook table and the rules that name segments, as data.
//! - [`lab`]: network namespaces, the built-in topologies, and what a run targets.
//! - [`report`]: the report schema, and its renderings (table, JSON, HTML).
//! - [`signal`]: SIGINT/SIGTERM for every command.
// Set up by the CLI (main.rs) for the log records of the library's modules.
use env_logger as _;
// Only the integration tests use it (tests/report.rs parses the HTML page).
#[cfg(test)]
use roxmltree as _;

pub mod attach;
pub mod datapath;
pub mod kernel;
pub mod lab;
pub mod report;
pub mod run;
pub mod signal;
