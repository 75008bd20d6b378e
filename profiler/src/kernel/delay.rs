//! Ground-truth delay injection: holds matching packets for a known time at one tc hook.
//!
//! Used to check attribution (a delay injected at a hop must show up in exactly the segment that
//! ends at that hop) and for what-if experiments (`profiler delay`). The injector is a separate
//! instance of the profiler's eBPF object (program `tc_delay`) with its own globals, attached
//! FIRST in the hook's tcx chain, or before tcx (kernels older than 6.6) as the clsact filter
//! of the first priority: with the profiler's tc program on the same hook, the packet is held
//! before the profiler stamps it, so the delay lands in the segment that ends at that hop.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    programs::{
        tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};

use super::tc;
use crate::{lab::netns, object::ebpf_object};

const PROGRAM: &str = "tc_delay";

/// Before tcx: the delay's filter priority, before the profile's (40000 and on); lower runs
/// first.
const PRIORITY: u16 = 1;

/// Longest hold accepted: the program busy-waits in the packet's path (softirq or the sender's
/// syscall), so longer holds are better done with a qdisc (netem).
pub const MAX_DELAY: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// Where and what to delay.
#[derive(Clone, Debug)]
pub struct DelaySpec {
    /// Network namespace of the interface (None: the caller's).
    pub netns: Option<String>,
    pub ifname: String,
    pub direction: Direction,
    pub delay: Duration,
    /// Only UDP/TCP packets with this source or destination port; 0 delays every packet.
    pub port: u16,
}

/// An attached delay; detached when dropped.
pub struct Delay {
    ebpf: Ebpf,
    spec: DelaySpec,
    link: Option<SchedClassifierLinkId>,
    /// Before tcx: the device its filter is on (recorded until detached, tc.rs).
    clsact: Option<tc::Device>,
}

impl Delay {
    pub fn attach(spec: DelaySpec) -> Result<Self> {
        let object = ebpf_object()?;
        if spec.delay.is_zero() || spec.delay > MAX_DELAY {
            return Err(crate::error::bad_input(format!(
                "the delay must be between 1 us and {} us",
                MAX_DELAY.as_micros()
            )));
        }
        let delay_ns = spec.delay.as_nanos() as u64;
        let mut ebpf = EbpfLoader::new()
            .override_global("DELAY_NS", &delay_ns, true)
            .override_global("DELAY_PORT", &spec.port, true)
            .load(object)
            .context("loading the eBPF object into the kernel")?;
        let p = classifier(&mut ebpf)?;
        p.load()
            .with_context(|| format!("loading {PROGRAM} (bpf_loop needs kernel 5.17 or later)"))?;
        let kind = match spec.direction {
            Direction::Ingress => TcAttachType::Ingress,
            Direction::Egress => TcAttachType::Egress,
        };
        let ns = spec.netns.as_deref();
        let ifname = spec.ifname.as_str();
        let tcx = super::has_tcx();
        // Interface names and tc links resolve in the calling thread's namespace.
        let (link, clsact) = netns::run_in(ns, || {
            tc::ifindex(ifname, ns)?;
            if tcx {
                let first = TcAttachOptions::TcxOrder(LinkOrder::first());
                return Ok((p.attach_with_options(ifname, kind, first)?, None));
            }
            // Before tcx, the filter hangs off a clsact qdisc (Err: it was there already), and
            // outlives the process: recorded first, so that `lab down --all` finds it.
            let device = tc::Device {
                netns: ns.map(str::to_string),
                ifname: ifname.to_string(),
                clsact_added: aya::programs::tc::qdisc_add_clsact(ifname).is_ok(),
            };
            tc::record(tc::DELAY, std::slice::from_ref(&device))?;
            let first = TcAttachOptions::Netlink(NlOptions {
                priority: PRIORITY,
                ..Default::default()
            });
            Ok((p.attach_with_options(ifname, kind, first)?, Some(device)))
        })
        .with_context(|| {
            format!(
                "attaching {PROGRAM} to {} {}",
                spec.direction,
                where_(&spec)
            )
        })?;
        Ok(Delay {
            ebpf,
            spec,
            link: Some(link),
            clsact,
        })
    }

    pub fn spec(&self) -> &DelaySpec {
        &self.spec
    }

    /// Detaches inside the interface's namespace (also done on drop).
    pub fn detach(&mut self) -> Result<()> {
        let Some(link) = self.link.take() else {
            return Ok(());
        };
        let p = classifier(&mut self.ebpf)?;
        let detached = netns::run_in(self.spec.netns.as_deref(), || Ok(p.detach(link)?))
            .with_context(|| format!("detaching {PROGRAM} from {}", where_(&self.spec)));
        if let Some(device) = self.clsact.take() {
            if device.clsact_added {
                tc::remove_clsact(&device)?;
            }
            tc::forget(tc::DELAY);
        }
        detached
    }

    /// (run count, total run time in ns) of the program; run time is counted only while
    /// `aya::sys::enable_stats` is held.
    pub fn run_stats(&self) -> Result<(u64, u64)> {
        let p = self
            .ebpf
            .program(PROGRAM)
            .ok_or_else(|| anyhow!("program {PROGRAM} is missing from the eBPF object"))?;
        let info = p.info().context("reading the program's info")?;
        Ok((info.run_count(), info.run_time().as_nanos() as u64))
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}

fn classifier(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    Ok(ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| anyhow!("program {PROGRAM} is missing from the eBPF object"))?
        .try_into()?)
}

fn where_(spec: &DelaySpec) -> String {
    format!(
        "{}{}",
        spec.ifname,
        spec.netns
            .as_deref()
            .map(|n| format!(" in netns {n}"))
            .unwrap_or_default()
    )
}

/// The injector's measured hold per packet.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Calibration {
    pub delay_ns: u64,
    /// Program runs during the burst, every one a held packet.
    pub runs: u64,
    /// bpf_stats run time per run: the hold plus the program's own cost.
    pub ns_per_run: f64,
    pub overhead_ns: f64,
}

/// Measures the real hold time: attaches at egress of `ifname` in `ns`, sends `packets` UDP
/// datagrams to `dst` from inside `ns`, and divides the program's bpf_stats run time by its run
/// count over the burst. Every datagram crosses the hook in the sending thread, so the burst is
/// serialised. Every packet is held (port 0), so that an occasional other packet on the device
/// (a neighbour probe) is one more held packet rather than a short run lowering the mean.
pub fn calibrate(
    ns: Option<&str>,
    ifname: &str,
    dst: SocketAddr,
    delay: Duration,
    packets: u32,
) -> Result<Calibration> {
    let injector = Delay::attach(DelaySpec {
        netns: ns.map(str::to_string),
        ifname: ifname.to_string(),
        direction: Direction::Egress,
        delay,
        port: 0,
    })?;
    let _stats = super::stats_while(true)?;
    let bind: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = netns::run_in(ns, || {
        UdpSocket::bind(bind).context("creating a UDP socket for the calibration")
    })?;
    let payload = [0u8; 64];
    // Warm-up: neighbour resolution, route and socket caches; not counted.
    sock.send_to(&payload, dst)
        .with_context(|| format!("sending to {dst}"))?;
    std::thread::sleep(Duration::from_millis(50));
    let (c0, t0) = injector.run_stats()?;
    for _ in 0..packets {
        sock.send_to(&payload, dst)
            .with_context(|| format!("sending to {dst}"))?;
    }
    let (c1, t1) = injector.run_stats()?;
    let runs = c1 - c0;
    if runs == 0 {
        bail!("{PROGRAM} did not run during the calibration burst");
    }
    let ns_per_run = (t1 - t0) as f64 / runs as f64;
    let delay_ns = delay.as_nanos() as u64;
    Ok(Calibration {
        delay_ns,
        runs,
        ns_per_run,
        overhead_ns: ns_per_run - delay_ns as f64,
    })
}
