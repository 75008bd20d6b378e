//! eBPF datapath profiler for container networks.
pub mod netns;
