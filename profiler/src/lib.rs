//! eBPF datapath profiler for container networks: kernel probes timestamp the profiler's own
//! tagged packets at every hop of a path, and the time between hops is attributed to the
//! segment the packet crossed there.
//!
//! - [`datapath`]: hooks, link kinds and segment names, as data.
//! - [`btf`], [`kfunc`], [`hooks`]: kernel offsets, function hook targets, and attaching the
//!   eBPF programs.
//! - [`inject`]: ground-truth delay injection at a tc hook.
//! - [`lab`], [`netns`]: the built-in topologies.
//! - [`traffic`]: tagged request/response traffic.
//! - [`collect`], [`journey`], [`path`]: events to journeys to per-segment latency.
//! - [`report`], [`run`], [`compare`], [`doctor`]: what the CLI prints.
pub mod attach;
pub mod btf;
pub mod collect;
pub mod compare;
pub mod datapath;
pub mod doctor;
pub mod filter;
pub mod hooks;
pub mod inject;
pub mod journey;
pub mod kfunc;
pub mod lab;
pub mod metrics;
pub mod netns;
pub mod path;
pub mod report;
pub mod run;
pub mod target;
pub mod traffic;
