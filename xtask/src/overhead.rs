//! `cargo xtask overhead`: what `profiler attach` costs the traffic it watches, against the
//! physical floor measured in the same run. On the bridge and flannel-vxlan labs, TCP stream
//! throughput and TCP request/response p50 with nothing attached, with empty programs at the
//! tracepoints attach uses (the floor: what the kernel charges for calling any program there),
//! with attach in its modes, and with a bpftrace script on the same tracepoints; interleaved
//! round by round so the machine's drift hits all alike. Then, with bpf_stats on, each
//! watcher's kernel cost per invocation; and the tagged run's own share of the bridge path.
//! Every goal of the project's overhead issue is printed as met or not met.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::cmd::{self, step};

const ROUNDS: usize = 4;
const STREAM_SECONDS: &str = "2";
const RR_COUNT: &str = "5000";
const PORT: u16 = 5201;
/// The bpftrace script the comparison runs (relative to the workspace root).
const BPFTRACE_SCRIPT: &str = "xtask/bpftrace/attach.bt";
const TRACEFS: &str = "/sys/kernel/tracing";

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

/// What watches the traffic in a round.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Watcher {
    Nothing,
    Floor,
    Summary,
    Sampled,
    Events,
    /// attach with a filter no packet passes: every invocation is a packet not followed.
    Unfollowed,
    Bpftrace,
}

impl Watcher {
    /// The rows of the throughput and latency table, in the order each round runs them.
    const ROUNDS: [Watcher; 6] = [
        Watcher::Nothing,
        Watcher::Floor,
        Watcher::Summary,
        Watcher::Sampled,
        Watcher::Events,
        Watcher::Bpftrace,
    ];
    /// The watchers whose kernel cost per invocation is measured.
    const COSTED: [Watcher; 4] = [
        Watcher::Floor,
        Watcher::Unfollowed,
        Watcher::Summary,
        Watcher::Bpftrace,
    ];

    fn label(self) -> &'static str {
        match self {
            Watcher::Nothing => "nothing attached",
            Watcher::Floor => "floor: empty programs",
            Watcher::Summary => "attach, summary mode",
            Watcher::Sampled => "summary, --sample 100",
            Watcher::Events => "attach, events mode",
            Watcher::Unfollowed => "attach, nothing followed",
            Watcher::Bpftrace => "bpftrace script",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Watcher::Nothing => "nothing",
            Watcher::Floor => "floor",
            Watcher::Summary => "summary",
            Watcher::Sampled => "sampled",
            Watcher::Events => "events",
            Watcher::Unfollowed => "unfollowed",
            Watcher::Bpftrace => "bpftrace",
        }
    }

    /// Starts watching the path's two ends, once the watcher says it is attached.
    fn start(self, profiler: &Path, ends: &Ends) -> Result<Option<Child>> {
        let attach = |extra: &[&str]| -> Command {
            let mut c = Command::new(profiler);
            c.args(["attach", "--netns", &ends.client, "--netns", &ends.server])
                .args(extra);
            c
        };
        let (mut command, ready) = match self {
            Watcher::Nothing => return Ok(None),
            Watcher::Floor => (
                {
                    let mut c = Command::new(profiler);
                    c.arg("floor");
                    c
                },
                "following",
            ),
            Watcher::Summary => (attach(&[]), "following"),
            Watcher::Sampled => (attach(&["--sample", "100"]), "following"),
            Watcher::Events => (attach(&["--mode", "events"]), "following"),
            // The traffic is TCP on PORT: no packet passes this.
            Watcher::Unfollowed => (attach(&["--filter", "udp port 9"]), "following"),
            Watcher::Bpftrace => (
                {
                    let mut c = Command::new("bpftrace");
                    c.arg(BPFTRACE_SCRIPT);
                    c
                },
                "Attaching",
            ),
        };
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.label()))?;
        started(child, ready)
            .with_context(|| format!("{} did not start", self.label()))
            .map(Some)
    }
}

/// `child` once it printed a line with `ready` (on stderr for profiler, stdout for bpftrace);
/// the rest of its piped output is drained so that it never blocks on a full pipe.
fn started(mut child: Child, ready: &'static str) -> Result<Child> {
    let (tx, rx) = mpsc::channel();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if line.contains(ready) {
                    let _ = tx.send(());
                }
            }
        });
    }
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("no {ready:?} within 60 s");
    }
    Ok(child)
}

/// SIGINT (each watcher ends cleanly on it), then its exit. bpftrace sometimes misses a SIGINT
/// that arrives while it is busy (seen with 0.17 under load): the signal is sent again, and the
/// last resort is SIGKILL, which fails the measurement.
fn stop(mut child: Child, what: Watcher) -> Result<()> {
    let pid = child.id().to_string();
    for _ in 0..3 {
        cmd::run(Command::new("kill").args(["-INT", &pid]))?;
        for _ in 0..100 {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("{} exited with {status}", what.label());
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("{} did not end on SIGINT", what.label())
}

/// The ends of a lab's path: client namespace, server namespace and address.
struct Ends {
    client: String,
    server: String,
    addr: String,
}

pub fn run(profiler: &Path, json_out: Option<&Path>) -> Result<()> {
    let xtask = std::env::current_exe().context("finding the xtask binary")?;
    let mounted = mount_tracefs()?;
    let result = measure(profiler, &xtask);
    if mounted {
        let _ = Command::new("umount").arg(TRACEFS).status();
    }
    let (text, value) = result?;
    println!("{text}");
    if let Some(path) = json_out {
        std::fs::write(path, serde_json::to_string_pretty(&value)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// bpftrace finds tracepoints through tracefs; mounted here if it is not (and unmounted after).
fn mount_tracefs() -> Result<bool> {
    if Path::new(TRACEFS).join("events").exists() {
        return Ok(false);
    }
    step(format!("mounting tracefs on {TRACEFS} for bpftrace"));
    cmd::run(Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS]))?;
    Ok(true)
}

fn measure(profiler: &Path, xtask: &Path) -> Result<(String, Value)> {
    let mut text = String::new();
    let mut labs = Vec::new();
    for lab in LABS {
        step(format!("profiler lab up {}", lab.up.join(" ")));
        cmd::run(Command::new(profiler).args(["lab", "up"]).args(lab.up))?;
        let result = measure_lab(profiler, xtask, lab);
        step(format!("profiler lab down {}", lab.name));
        cmd::run(Command::new(profiler).args(["lab", "down", lab.name]))?;
        let (t, v) = result?;
        text += &t;
        labs.push(v);
    }
    Ok((
        text,
        json!({ "schema": "profiler.overhead.v1", "labs": labs }),
    ))
}

fn measure_lab(profiler: &Path, xtask: &Path, lab: &LabCase) -> Result<(String, Value)> {
    let ends = ends(profiler, lab.name)?;
    let server = Command::new("ip")
        .args(["netns", "exec", &ends.server])
        .arg(xtask)
        .args(["net-peer", "serve", &ends.addr])
        .spawn()
        .context("starting the TCP server")?;
    let result = rounds(profiler, xtask, &ends).and_then(|samples| {
        let costs = costs(profiler, xtask, &ends)?;
        Ok((samples, costs))
    });
    let _ = peer(xtask, &ends, &["quit"]);
    let _ = wait_quietly(server);
    let (samples, costs) = result?;
    let (tagged, pipeline) = if lab.name == "bridge" {
        let pipeline = events_pipeline(profiler, xtask, &ends)?;
        (Some(tagged_share(profiler)?), Some(pipeline))
    } else {
        (None, None)
    };
    let (mut text, mut value) = report(lab.name, &samples, &costs, tagged);
    if let Some(steps) = pipeline {
        text += &pipeline_report(&steps, &mut value);
    }
    Ok((text, value))
}

/// (watcher, Gbit/s, RR p50 us) of every round.
type Samples = Vec<(Watcher, f64, f64)>;

fn rounds(profiler: &Path, xtask: &Path, ends: &Ends) -> Result<Samples> {
    let mut samples = Vec::new();
    for round in 1..=ROUNDS {
        for w in Watcher::ROUNDS {
            step(format!("round {round}/{ROUNDS}: {}", w.label()));
            let child = w.start(profiler, ends)?;
            let measured = stream_and_rr(xtask, ends);
            if let Some(c) = child {
                stop(c, w)?;
            }
            let (gbps, p50) = measured?;
            samples.push((w, gbps, p50));
        }
    }
    Ok(samples)
}

/// Offered UDP rates (datagrams a second) of the events pipeline's ladder, each for
/// PIPELINE_SECONDS.
const PIPELINE_PPS: [u64; 5] = [25_000, 50_000, 100_000, 200_000, 400_000];
const PIPELINE_SECONDS: f64 = 3.0;
/// Sending threads: one saturates its CPU with the path's kernel work at ~95 k datagrams/s,
/// long before the reader.
const PIPELINE_SENDERS: u64 = 2;
/// The events pipeline's goal: hop events a second drained with nothing lost.
const PIPELINE_GOAL: f64 = 2e6;

/// One step of the ladder: datagrams sent, hop events read, events lost.
struct PipelineStep {
    pps: u64,
    sent: u64,
    read: u64,
    lost: u64,
}

/// `attach --mode events` (journey lines to /dev/null: formatting them is part of the cost)
/// under paced UDP, rate after rate: what userspace drains, and what it loses.
fn events_pipeline(profiler: &Path, xtask: &Path, ends: &Ends) -> Result<Vec<PipelineStep>> {
    let report =
        std::env::temp_dir().join(format!("profiler-pipeline-{}.json", std::process::id()));
    let steps = PIPELINE_PPS
        .iter()
        .map(|&pps| pipeline_step(profiler, xtask, ends, &report, pps))
        .collect();
    // Also when a step failed after attach wrote its report.
    let _ = std::fs::remove_file(&report);
    steps
}

fn pipeline_step(
    profiler: &Path,
    xtask: &Path,
    ends: &Ends,
    report: &Path,
    pps: u64,
) -> Result<PipelineStep> {
    step(format!("events pipeline: {pps} datagrams/s"));
    let mut attach = Command::new(profiler);
    attach
        .args(["attach", "--netns", &ends.client, "--netns", &ends.server])
        .args(["--mode", "events", "--json"])
        .arg(report)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = started(attach.spawn().context("starting attach")?, "following")?;
    let sent = peer(
        xtask,
        ends,
        &[
            "udp",
            "--pps",
            &pps.to_string(),
            "--seconds",
            &PIPELINE_SECONDS.to_string(),
            "--threads",
            &PIPELINE_SENDERS.to_string(),
        ],
    );
    stop(child, Watcher::Events)?;
    let json: Value = serde_json::from_str(&std::fs::read_to_string(report)?)
        .context("reading attach's report")?;
    Ok(PipelineStep {
        pps,
        sent: number(&sent?)? as u64,
        read: json["events_read"]
            .as_u64()
            .context("attach's report has no events_read")?,
        lost: json["lost_events"].as_u64().unwrap_or(0),
    })
}

fn pipeline_report(steps: &[PipelineStep], value: &mut Value) -> String {
    let mut out = format!(
        "events pipeline (attach --mode events under paced 64 B UDP from {PIPELINE_SENDERS} sockets, {PIPELINE_SECONDS} s a step):\n  {:>12} {:>12} {:>14} {:>10}\n",
        "offered/s", "sent/s", "events read/s", "lost"
    );
    let rate = |n: u64| n as f64 / PIPELINE_SECONDS;
    for s in steps {
        out += &format!(
            "  {:>12} {:>12.0} {:>14.0} {:>10}\n",
            s.pps,
            rate(s.sent),
            rate(s.read),
            s.lost
        );
    }
    let best = steps
        .iter()
        .filter(|s| s.lost == 0)
        .map(|s| rate(s.read))
        .fold(0.0, f64::max);
    let mut goals = Vec::new();
    goal_at_least(
        &mut out,
        &mut goals,
        "events drained with 0 lost, per second (the largest step)".into(),
        best,
        PIPELINE_GOAL,
    );
    value["events_pipeline"] = json!({
        "seconds_per_step": PIPELINE_SECONDS,
        "steps": steps.iter().map(|s| json!({"offered_pps": s.pps, "sent": s.sent, "events_read": s.read, "lost": s.lost})).collect::<Vec<_>>(),
        "largest_lossless_events_per_s": best,
    });
    if let Some(g) = value["goals"].as_array_mut() {
        g.extend(goals);
    }
    out
}

/// Per watcher, its programs' (name, runs, ns per run) over one stream and one
/// request/response run with bpf_stats on (they add two clock reads per run, so the
/// throughput rounds run without them).
type Costs = Vec<(Watcher, Vec<(String, u64, f64)>)>;

fn costs(profiler: &Path, xtask: &Path, ends: &Ends) -> Result<Costs> {
    let before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .unwrap_or_else(|_| "0".into());
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").context("enabling bpf_stats")?;
    let result = Watcher::COSTED
        .into_iter()
        .map(|w| {
            step(format!("kernel cost per invocation: {}", w.label()));
            let child = w.start(profiler, ends)?.expect("a costed watcher attaches");
            let pid = child.id();
            let measured = stream_and_rr(xtask, ends);
            let programs = programs_of(pid);
            stop(child, w)?;
            measured?;
            Ok((w, programs?))
        })
        .collect();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", before.trim());
    result
}

/// The programs process `pid` holds (the prog_id of its BPF program fds, in /proc/PID/fdinfo),
/// with their run counts and time from bpftool's JSON.
fn programs_of(pid: u32) -> Result<Vec<(String, u64, f64)>> {
    let ids = prog_ids(pid)?;
    let out = cmd::output(Command::new("bpftool").args(["prog", "show", "-j"]))?;
    let progs: Value = serde_json::from_str(&out).context("reading bpftool prog show -j")?;
    let mut found: Vec<(String, u64, f64)> = progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .filter_map(|p| {
            let runs = p["run_cnt"].as_u64()?;
            let ns = p["run_time_ns"].as_u64()?;
            (runs > 0).then(|| {
                (
                    p["name"].as_str().unwrap_or("?").to_string(),
                    runs,
                    ns as f64 / runs as f64,
                )
            })
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

/// The ids of the BPF programs whose fds process `pid` holds.
fn prog_ids(pid: u32) -> Result<Vec<u64>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))?;
    Ok(entries
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect())
}

/// The tagged run's own programs as a share of the bridge path's end-to-end mean.
fn tagged_share(profiler: &Path) -> Result<f64> {
    step("tagged run: profiler run --lab bridge --count 2000 (its own programs' share)");
    let out = cmd::output(Command::new(profiler).args([
        "run", "--lab", "bridge", "--count", "2000", "--quiet", "--json", "-",
    ]))?;
    let r: Value = serde_json::from_str(&out).context("reading the run's JSON")?;
    let request = r["directions"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["direction"] == "request"))
        .context("the run has no request direction")?;
    let own = request["profiler_programs"]["mean_ns"]
        .as_f64()
        .unwrap_or(0.0);
    let e2e = request["end_to_end"]["mean_ns"].as_f64().unwrap_or(1.0);
    Ok(own / e2e)
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

/// One watcher's medians: throughput loss (fraction of the unwatched throughput) and added RR
/// p50 (us), with the raw medians.
#[derive(Clone, Copy)]
struct Cost {
    gbps: f64,
    p50: f64,
    loss: f64,
    added: f64,
}

fn medians(samples: &Samples) -> Vec<(Watcher, Cost)> {
    let of = |w: Watcher, f: fn(&(Watcher, f64, f64)) -> f64| {
        median(samples.iter().filter(|s| s.0 == w).map(f).collect())
    };
    let (base_gbps, base_p50) = (of(Watcher::Nothing, |s| s.1), of(Watcher::Nothing, |s| s.2));
    Watcher::ROUNDS
        .into_iter()
        .map(|w| {
            let (gbps, p50) = (of(w, |s| s.1), of(w, |s| s.2));
            let cost = Cost {
                gbps,
                p50,
                loss: 1.0 - gbps / base_gbps,
                added: p50 - base_p50,
            };
            (w, cost)
        })
        .collect()
}

/// `x` as a multiple of `floor`, for the table ("-" where the floor is not above noise).
fn times(x: f64, floor: f64) -> String {
    if floor > 1e-9 {
        format!("{:.2}x", x / floor)
    } else {
        "-".into()
    }
}

/// The spread (max - min) of the unwatched rounds: throughput as a fraction of their median,
/// RR p50 in us. A watcher's cost below it is not told apart from the machine's drift.
fn noise(samples: &Samples) -> Cost {
    let spread = |f: fn(&(Watcher, f64, f64)) -> f64| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|s| s.0 == Watcher::Nothing)
            .map(f)
            .collect();
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        (hi - lo, median(v))
    };
    let ((gbps, base), (p50, _)) = (spread(|s| s.1), spread(|s| s.2));
    Cost {
        gbps,
        p50,
        loss: gbps / base,
        added: p50,
    }
}

/// A goal relative to the floor: met when `value <= factor * floor`; not judged when the
/// floor's own cost is within the run's noise (the bound would be noise, or negative).
fn floor_goal(
    out: &mut String,
    goals: &mut Vec<Value>,
    what: String,
    value: f64,
    factor: f64,
    floor: f64,
    noise: f64,
) {
    if floor > noise {
        return goal(out, goals, what, value, factor * floor);
    }
    *out += &format!(
        "  {:<72} {:>8.3} <= {:<8.3} not judged: the floor's {floor:.3} is within the noise\n",
        what,
        value,
        factor * floor,
    );
    goals.push(
        json!({ "goal": what, "value": value, "bound": factor * floor, "met": null,
        "not_judged": "the floor's cost is within the unwatched rounds' spread", "noise": noise }),
    );
}

/// A goal's line: met when `value <= bound`.
fn goal(out: &mut String, goals: &mut Vec<Value>, what: String, value: f64, bound: f64) {
    verdict(out, goals, what, (value, "<=", bound), value <= bound);
}

/// A goal's line: met when `value >= bound`.
fn goal_at_least(out: &mut String, goals: &mut Vec<Value>, what: String, value: f64, bound: f64) {
    verdict(out, goals, what, (value, ">=", bound), value >= bound);
}

fn verdict(
    out: &mut String,
    goals: &mut Vec<Value>,
    what: String,
    (value, op, bound): (f64, &str, f64),
    met: bool,
) {
    *out += &format!(
        "  {:<72} {:>8.3} {op} {:<8.3} {}\n",
        what,
        value,
        bound,
        if met { "met" } else { "NOT met" }
    );
    goals.push(json!({ "goal": what, "value": value, "op": op, "bound": bound, "met": met }));
}

fn report(lab: &str, samples: &Samples, costs: &Costs, tagged: Option<f64>) -> (String, Value) {
    let m = medians(samples);
    let get = |w: Watcher| {
        m.iter()
            .find(|(x, _)| *x == w)
            .map(|(_, c)| *c)
            .expect("measured")
    };
    let floor = get(Watcher::Floor);
    let mut out = format!(
        "\n{lab}: TCP stream throughput and TCP request/response p50, medians of {ROUNDS} interleaved rounds\n{:<26} {:>8} {:>8} {:>9} {:>10} {:>9} {:>9}\n",
        "", "Gbit/s", "loss", "vs floor", "RR p50 us", "added us", "vs floor"
    );
    for (w, c) in &m {
        out += &format!(
            "{:<26} {:>8.2} {:>7.1}% {:>9} {:>10.1} {:>+9.1} {:>9}\n",
            w.label(),
            c.gbps,
            c.loss * 100.0,
            times(c.loss, floor.loss),
            c.p50,
            c.added,
            times(c.added, floor.added)
        );
    }
    let mut goals = Vec::new();
    out += "goals (relative to the floor measured above):\n";
    let noise = noise(samples);
    out += &format!(
        "  (the unwatched rounds' own spread: {:.1}% throughput, {:.1} us RR p50; a floor within it cannot be a bound)\n",
        noise.loss * 100.0,
        noise.added
    );
    for (w, factor) in [(Watcher::Summary, 1.5), (Watcher::Sampled, 1.2)] {
        let c = get(w);
        let what = |m: &str| format!("{}: {m} / floor's", w.label());
        floor_goal(
            &mut out,
            &mut goals,
            what("throughput loss"),
            c.loss,
            factor,
            floor.loss,
            noise.loss,
        );
        floor_goal(
            &mut out,
            &mut goals,
            what("added RR p50 (us)"),
            c.added,
            factor,
            floor.added,
            noise.added,
        );
    }
    let bpftrace = get(Watcher::Bpftrace);
    for w in [Watcher::Summary, Watcher::Sampled] {
        let c = get(w);
        goal(
            &mut out,
            &mut goals,
            format!("{}: throughput loss, below bpftrace's", w.label()),
            c.loss,
            bpftrace.loss,
        );
        goal(
            &mut out,
            &mut goals,
            format!("{}: added RR p50 (us), below bpftrace's", w.label()),
            c.added,
            bpftrace.added,
        );
    }
    out += &per_invocation(costs, &mut goals);
    if let Some(share) = tagged {
        out += "tagged run (profiler run --lab bridge --count 2000):\n";
        goal(
            &mut out,
            &mut goals,
            "the run's own programs, share of the end-to-end mean".into(),
            share,
            0.05,
        );
    }
    let value = json!({
        "lab": lab,
        "rounds": ROUNDS,
        "watchers": m.iter().map(|(w, c)| json!({
            "watcher": w.key(), "label": w.label(), "gbps": c.gbps, "loss": c.loss,
            "rr_p50_us": c.p50, "added_us": c.added,
        })).collect::<Vec<_>>(),
        "per_invocation": costs.iter().map(|(w, progs)| json!({
            "watcher": w.key(),
            "programs": progs.iter().map(|(n, runs, ns)| json!({"program": n, "runs": runs, "ns_per_run": ns})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "tagged_own_share": tagged,
        "goals": goals,
    });
    (out, value)
}

/// Each watcher's programs with their cost per invocation, and the per-invocation goals:
/// attach's programs against the empty program at the same tracepoint.
/// Whether bpftool's `name` is program `full`: the kernel keeps 15 bytes of a name, which
/// bpftool shows where the program has no BTF to tell the rest.
fn same_program(name: &str, full: &str) -> bool {
    name == full || (name.len() == 15 && full.starts_with(name))
}

fn per_invocation(costs: &Costs, goals: &mut Vec<Value>) -> String {
    let mut out = String::from("kernel cost per program invocation (bpf_stats):\n");
    for (w, progs) in costs {
        out += &format!("  {}:\n", w.label());
        for (name, runs, ns) in progs {
            out += &format!("    {name:<34} {runs:>10} runs {ns:>8.1} ns/run\n");
        }
    }
    let floor_of = |tp: &str| {
        costs
            .iter()
            .find(|(w, _)| *w == Watcher::Floor)
            .and_then(|(_, p)| {
                p.iter()
                    .find(|(n, _, _)| same_program(n, &format!("floor_{tp}")))
            })
            .map(|(_, _, ns)| *ns)
    };
    for (w, factor, what) in [
        (Watcher::Unfollowed, 1.5, "a packet not followed"),
        (
            Watcher::Summary,
            3.0,
            "a followed packet (every packet followed)",
        ),
    ] {
        let Some((_, progs)) = costs.iter().find(|(x, _)| *x == w) else {
            continue;
        };
        for (name, _, ns) in progs {
            // ftp_X (tp_btf) and fraw_X (raw_tp) serve tracepoint X; the floor is floor_X.
            let tp = name
                .strip_prefix("ftp_")
                .or_else(|| name.strip_prefix("fraw_"))
                .unwrap_or(name);
            if let Some(empty) = floor_of(tp) {
                goal(
                    &mut out,
                    goals,
                    format!("{what}: {name} ns / empty program's"),
                    *ns,
                    factor * empty,
                );
            }
        }
    }
    out
}
