//! The eBPF object built by profiler/build.rs: the programs of both modes, the delay injector
//! and the ebpf-redirect lab's datapath. A leaf, so that any layer may load from it.

use anyhow::{bail, Result};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// The eBPF object, or why this binary has none.
pub fn ebpf_object() -> Result<&'static [u8]> {
    if EBPF_OBJECT.is_empty() {
        bail!("this profiler binary was built without its eBPF object (AYA_BUILD_SKIP); build it with `cargo xtask build`");
    }
    Ok(EBPF_OBJECT)
}
