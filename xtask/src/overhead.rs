//! `cargo xtask overhead`: what `profiler attach` costs the traffic it watches. On the bridge and
//! flannel-vxlan labs, TCP stream throughput and TCP request/response p50 with no profiler, with
//! attach in summary mode and in events mode, interleaved round by round so that the machine's
//! drift hits all three alike; then each program's kernel cost from one attach with bpf_stats.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::cmd::{self, step};

const ROUNDS: usize = 5;
const STREAM_SECONDS: &str = "2";
const RR_COUNT: &str = "5000";
const PORT: u16 = 5201;

struct LabCase {
    up: &'static [&'static str],
    name: &'static str,
}

const LABS: &[LabCase] = &[
    LabCase {
        up: &["bridge"],
        name: "bridge",
    },
    LabCase {
        up: &["flannel-vxlan", "--placement", "cross-host"],
        name: "flannel-vxlan-xhost",
    },
];

#[derive(Clone, Copy, PartialEq)]
enum Profiler {
    None,
    Summary,
    Sampled,
    Events,
}

impl Profiler {
    const ALL: [Profiler; 4] = [
        Profiler::None,
        Profiler::Summary,
        Profiler::Sampled,
        Profiler::Events,
    ];

    fn label(self) -> &'static str {
        match self {
            Profiler::None => "no profiler",
            Profiler::Summary => "attach, summary mode",
            Profiler::Sampled => "summary, --sample 100",
            Profiler::Events => "attach, events mode",
        }
    }

    /// attach's arguments besides the targets; None: no attach.
    fn args(self) -> Option<&'static [&'static str]> {
        match self {
            Profiler::None => None,
            Profiler::Summary => Some(&[]),
            Profiler::Sampled => Some(&["--sample", "100"]),
            Profiler::Events => Some(&["--mode", "events"]),
        }
    }
}

/// The ends of a lab's path: client namespace, server namespace and address.
struct Ends {
    client: String,
    server: String,
    addr: String,
}

pub fn run(profiler: &Path) -> Result<()> {
    let xtask = std::env::current_exe().context("finding the xtask binary")?;
    let mut report = String::new();
    for lab in LABS {
        step(format!("profiler lab up {}", lab.up.join(" ")));
        cmd::run(Command::new(profiler).args(["lab", "up"]).args(lab.up))?;
        let result = measure_lab(profiler, &xtask, lab);
        step(format!("profiler lab down {}", lab.name));
        cmd::run(Command::new(profiler).args(["lab", "down", lab.name]))?;
        report += &result?;
    }
    println!("{report}");
    Ok(())
}

fn measure_lab(profiler: &Path, xtask: &Path, lab: &LabCase) -> Result<String> {
    let ends = ends(profiler, lab.name)?;
    let server = Command::new("ip")
        .args(["netns", "exec", &ends.server])
        .arg(xtask)
        .args(["net-peer", "serve", &ends.addr])
        .spawn()
        .context("starting the TCP server")?;
    let result = rounds(profiler, xtask, &ends);
    let _ = peer(xtask, &ends, &["quit"]);
    let _ = wait_quietly(server);
    let (samples, costs) = result?;
    Ok(summary(lab.name, &samples, &costs))
}

type Samples = Vec<(Profiler, f64, f64)>;

fn rounds(profiler: &Path, xtask: &Path, ends: &Ends) -> Result<(Samples, String)> {
    let mut samples = Vec::new();
    for round in 1..=ROUNDS {
        for p in Profiler::ALL {
            step(format!("round {round}/{ROUNDS}: {}", p.label()));
            let attach = match p.args() {
                None => None,
                Some(args) => Some(start_attach(profiler, ends, args)?),
            };
            let measured = stream_and_rr(xtask, ends);
            if let Some(a) = attach {
                stop_attach(a)?;
            }
            let (gbps, p50) = measured?;
            samples.push((p, gbps, p50));
        }
    }
    step("per-program kernel cost: attach --stats over one stream and one request/response run");
    let attach = start_attach(profiler, ends, &["--stats"])?;
    let measured = stream_and_rr(xtask, ends);
    let table = stop_attach(attach)?;
    measured?;
    let costs = table
        .split_once("kernel cost per program invocation")
        .map(|(_, c)| format!("kernel cost per program invocation{c}"))
        .unwrap_or_default();
    Ok((samples, costs))
}

fn stream_and_rr(xtask: &Path, ends: &Ends) -> Result<(f64, f64)> {
    let gbps = number(&peer(
        xtask,
        ends,
        &["stream", "--seconds", STREAM_SECONDS],
    )?)?;
    let p50 = number(&peer(xtask, ends, &["rr", "--count", RR_COUNT])?)?;
    Ok((gbps, p50))
}

fn number(s: &str) -> Result<f64> {
    s.trim()
        .parse()
        .with_context(|| format!("the traffic peer printed {s:?}"))
}

fn peer(xtask: &Path, ends: &Ends, args: &[&str]) -> Result<String> {
    let (verb, rest) = args.split_first().expect("a verb");
    cmd::output(
        Command::new("ip")
            .args(["netns", "exec", &ends.client])
            .arg(xtask)
            .args(["net-peer", verb, &ends.addr])
            .args(rest),
    )
}

fn ends(profiler: &Path, lab: &str) -> Result<Ends> {
    let list = cmd::output(Command::new(profiler).args(["lab", "list", "--json"]))?;
    let labs: Value = serde_json::from_str(&list).context("reading profiler lab list --json")?;
    let lab = labs
        .as_array()
        .and_then(|l| l.iter().find(|x| x["name"] == lab))
        .with_context(|| format!("lab {lab} is not listed"))?;
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    Ok(Ends {
        client: s(&lab["client"]["netns"]),
        server: s(&lab["server"]["netns"]),
        addr: format!("{}:{PORT}", s(&lab["server"]["addr"])),
    })
}

/// `profiler attach` on both ends' namespaces, once it reports that it follows.
fn start_attach(profiler: &Path, ends: &Ends, extra: &[&str]) -> Result<Child> {
    let mut child = Command::new(profiler)
        .args(["attach", "--netns", &ends.client, "--netns", &ends.server])
        .args(extra)
        .stdout(if extra.contains(&"events") {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stderr(Stdio::piped())
        .spawn()
        .context("starting profiler attach")?;
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("following") {
                let _ = tx.send(());
            } else {
                eprintln!("{line}");
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = child.kill();
        bail!("profiler attach did not start");
    }
    Ok(child)
}

/// SIGINT, then the report attach printed on stdout (empty in events mode).
fn stop_attach(child: Child) -> Result<String> {
    cmd::run(Command::new("kill").args(["-INT", &child.id().to_string()]))?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("profiler attach exited with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_quietly(mut child: Child) -> Result<()> {
    for _ in 0..50 {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill()?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn summary(lab: &str, samples: &Samples, costs: &str) -> String {
    let of = |p: Profiler, f: fn(&(Profiler, f64, f64)) -> f64| {
        median(samples.iter().filter(|s| s.0 == p).map(f).collect())
    };
    let (base_gbps, base_p50) = (of(Profiler::None, |s| s.1), of(Profiler::None, |s| s.2));
    let mut out = format!(
        "\n{lab}: TCP stream throughput and TCP request/response p50, medians of {ROUNDS} interleaved rounds\n{:<24} {:>10} {:>8} {:>12} {:>10}\n",
        "", "Gbit/s", "ratio", "RR p50 us", "added us"
    );
    for p in Profiler::ALL {
        let (gbps, p50) = (of(p, |s| s.1), of(p, |s| s.2));
        out += &format!(
            "{:<24} {gbps:>10.2} {:>7.1}% {p50:>12.1} {:>+10.1}\n",
            p.label(),
            gbps / base_gbps * 100.0,
            p50 - base_p50
        );
    }
    let (gbps, p50) = (
        of(Profiler::Summary, |s| s.1),
        of(Profiler::Summary, |s| s.2),
    );
    let met = gbps / base_gbps >= 0.97 && p50 - base_p50 < 2.0;
    out += &format!(
        "summary mode goal, every packet followed (>= 97% throughput, < 2 us added p50): {}\n{costs}",
        if met { "met" } else { "NOT met" }
    );
    out
}
