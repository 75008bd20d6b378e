//! `profiler delay`: hold matching packets at one tc hook until Ctrl-C.

use std::{process::ExitCode, time::Duration};

use anyhow::Result;

use crate::{
    kernel::{delay, doctor},
    signal::until_interrupted,
};

#[derive(clap::Args)]
pub struct DelayCli {
    /// Network namespace of the interface (default: the current one).
    #[arg(long)]
    netns: Option<String>,
    #[arg(long)]
    iface: String,
    #[arg(long, value_enum)]
    direction: delay::Direction,
    /// Microseconds to hold each matching packet (busy-waiting in the packet's path).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=delay::MAX_DELAY.as_micros() as u64))]
    delay_us: u64,
    /// Only UDP/TCP packets with this source or destination port (0: every packet).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

pub async fn run(cli: DelayCli) -> Result<ExitCode> {
    doctor::require_privileges()?;
    let spec = delay::DelaySpec {
        netns: cli.netns,
        ifname: cli.iface,
        direction: cli.direction,
        delay: Duration::from_micros(cli.delay_us),
        port: cli.port,
    };
    let mut hold = delay::Delay::attach(spec)?;
    let s = hold.spec();
    println!(
        "holding {} packets {} us at {} {}{}; Ctrl-C to stop",
        if s.port == 0 {
            "all".to_string()
        } else {
            format!("port {}", s.port)
        },
        cli.delay_us,
        s.direction,
        s.ifname,
        s.netns
            .as_deref()
            .map(|n| format!(" in netns {n}"))
            .unwrap_or_default()
    );
    let held = until_interrupted().await;
    // Detached whatever the wait returned.
    hold.detach()?;
    held?;
    println!("detached");
    Ok(ExitCode::SUCCESS)
}
