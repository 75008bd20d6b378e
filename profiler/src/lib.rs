//! eBPF datapath profiler for container networks.
pub mod lab;
pub mod netns;
