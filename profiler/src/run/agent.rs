//! `profiler agent`: the profiler's half inside a guest on a nested path. It attaches the
//! guest's probes for the host's run (its own kernel, its own BTF: deep hooks where the guest
//! has kprobes), runs the UDP server in the guest's pod, and hands its events and the server's
//! stamps to the host run at the end, which puts them on the host's timeline (crossing.rs).
//!
//! The channel is a byte stream of JSON lines, one request from the host and one answer from
//! the agent at a time: a virtio-serial port in a lab (`--serial NAME`: QEMU's
//! `-device virtserialport,name=NAME` with a Unix-socket chardev on the host, the channel
//! qemu-guest-agent uses, so real VMs have it too; this machine has no vsock), or TCP on a real
//! node (`--listen ADDR`, `profiler run --agent ADDR`).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use profiler_common::{Event, HookId, COUNTER_LOST, COUNTER_UNREADABLE, DIR_REQUEST};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader, Lines},
    sync::oneshot,
    task::JoinHandle,
};

use super::{
    crossing::{self, Collect, Estimate},
    traffic::{self, ServerLog},
};
use crate::{
    datapath::{path::Inodes, Mode},
    kernel::{
        btf::KernelBtf,
        programs::{LoadConfig, Programs},
        ring,
    },
    lab::{
        discover,
        nested::{self, Guest, Inventory, SetupAnswer},
    },
    report::schema::{CrossingReport, HookSet, HookStatus},
};

/// The agent's programs load under TCG in minutes on 6.1 with deep hooks.
const START_TIMEOUT: Duration = Duration::from_secs(900);
const STOP_TIMEOUT: Duration = Duration::from_secs(300);
/// As the run's: the ring buffer's last events, after the last exchange.
const DRAIN: Duration = Duration::from_millis(500);

/// What the host asks.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// A lab's: `ip` commands that build the guest's side; answered with a [`SetupAnswer`].
    Setup(Vec<String>),
    Start(Start),
    Stop {
        run_id: u32,
    },
}

/// A run's part in the guest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Start {
    pub run_id: u32,
    pub port: u16,
    pub hooks: HookSet,
    /// The server's namespace as the guest names it ("(root)" for its own).
    pub server_ns: String,
    pub server_addr: Ipv4Addr,
    pub size: usize,
}

/// What the agent answers to Start and Stop; each names its run, so an answer left in the
/// channel by a host run that died is skipped by the next one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Ready {
        run_id: u32,
        hook_set: HookSet,
        hooks: Vec<HookStatus>,
    },
    Done(Done),
    Error {
        run_id: u32,
        error: String,
    },
}

/// The guest's events (as [`WireEvent`]s) and the server's (seq, received, sent) stamps, on
/// the guest's clock.
#[derive(Debug, Serialize, Deserialize)]
pub struct Done {
    pub run_id: u32,
    pub events: Vec<WireEvent>,
    pub stamps: Vec<(u32, u64, u64)>,
    pub lost: u64,
    pub unreadable: u64,
}

/// An event as (ts_ns, seq, direction, ifindex, netns, len, drop_reason, hook, flags, cost_ns).
pub type WireEvent = (u64, u32, u32, u32, u32, u32, u32, u8, u8, u32);

fn to_wire(e: &Event) -> WireEvent {
    (
        e.ts_ns,
        e.seq,
        e.direction,
        e.ifindex,
        e.netns,
        e.len,
        e.drop_reason,
        e.hook,
        e.flags,
        e.cost_ns,
    )
}

fn from_wire(w: &WireEvent) -> Event {
    Event {
        ts_ns: w.0,
        seq: w.1,
        direction: w.2,
        ifindex: w.3,
        netns: w.4,
        len: w.5,
        drop_reason: w.6,
        hook: w.7,
        flags: w.8,
        _pad: [0; 2],
        cost_ns: w.9,
    }
}

type Reader = Lines<BufReader<Pin<Box<dyn AsyncRead + Send>>>>;
type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// Where the agent listens.
pub enum Listen {
    /// A virtio-serial port by name.
    Serial(String),
    Tcp(SocketAddr),
}

/// `profiler agent`: serves host runs until killed.
pub async fn serve(listen: Listen, node: &str) -> Result<()> {
    match listen {
        Listen::Serial(name) => {
            let path = serial_port(&name)?;
            let file = tokio::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .await
                .with_context(|| format!("cannot open {}", path.display()))?;
            let write = file.try_clone().await?;
            eprintln!("agent {node}: listening on {}", path.display());
            session(
                BufReader::new(Box::pin(file) as Pin<Box<dyn AsyncRead + Send>>).lines(),
                Box::pin(write),
                node,
                true,
            )
            .await
        }
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            eprintln!("agent {node}: listening on {addr}");
            loop {
                let (conn, peer) = listener.accept().await?;
                eprintln!("agent {node}: host {peer} connected");
                let (r, w) = conn.into_split();
                let r: Pin<Box<dyn AsyncRead + Send>> = Box::pin(r);
                if let Err(e) = session(BufReader::new(r).lines(), Box::pin(w), node, false).await {
                    eprintln!("agent {node}: {e:#}");
                }
            }
        }
    }
}

/// /dev/vportNpM of the virtio-serial port named `name` (udev's /dev/virtio-ports/NAME link
/// may be missing in a minimal guest).
fn serial_port(name: &str) -> Result<PathBuf> {
    let dir = std::path::Path::new("/sys/class/virtio-ports");
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {} (no virtio-serial device?)", dir.display()))?
    {
        let entry = entry?;
        if std::fs::read_to_string(entry.path().join("name")).is_ok_and(|n| n.trim() == name) {
            return Ok(PathBuf::from("/dev").join(entry.file_name()));
        }
    }
    bail!("no virtio-serial port named {name}")
}

/// One run in progress in the guest.
struct Running {
    run_id: u32,
    programs: Programs,
    stop: oneshot::Sender<()>,
    collector: JoinHandle<Result<Vec<Event>>>,
    server: JoinHandle<()>,
    log: ServerLog,
}

/// Answers requests until the channel ends. `serial`: a virtio-serial port reads end of file
/// while no host is connected, which is not an end.
async fn session(mut lines: Reader, mut write: Writer, node: &str, serial: bool) -> Result<()> {
    let mut running: Option<Running> = None;
    loop {
        let line = match lines.next_line().await? {
            Some(l) => l,
            None if serial => {
                // The host went away: a run it did not stop ends here, its programs detached.
                running = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            None => return Ok(()),
        };
        let request: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("agent {node}: unreadable request {line:?}: {e}");
                continue;
            }
        };
        let answer = match request {
            Request::Setup(commands) => serde_json::to_string(&match run_setup(&commands) {
                Ok(()) => SetupAnswer::Inventory(inventory().await?),
                Err(e) => SetupAnswer::Failed(format!("{e:#}")),
            })?,
            Request::Start(s) => {
                // A run whose host went away without stopping it.
                running = None;
                let run_id = s.run_id;
                match start(&s).await {
                    Ok((r, answer)) => {
                        running = Some(r);
                        serde_json::to_string(&answer)?
                    }
                    Err(e) => serde_json::to_string(&Answer::Error {
                        run_id,
                        error: format!("{e:#}"),
                    })?,
                }
            }
            Request::Stop { run_id } => {
                let answer = match running.take().filter(|r| r.run_id == run_id) {
                    Some(r) => finish(r).await.unwrap_or_else(|e| Answer::Error {
                        run_id,
                        error: format!("{e:#}"),
                    }),
                    None => Answer::Error {
                        run_id,
                        error: "no such run in progress".into(),
                    },
                };
                serde_json::to_string(&answer)?
            }
        };
        write.write_all(answer.as_bytes()).await?;
        write.write_all(b"\n").await?;
        write.flush().await?;
    }
}

fn run_setup(commands: &[String]) -> Result<()> {
    commands.iter().try_for_each(|c| nested::ip(c))
}

/// The guest's kernel, namespaces (with inodes) and devices.
async fn inventory() -> Result<Inventory> {
    let names = discover::namespaces()?;
    let namespaces = names
        .iter()
        .map(|n| Ok((n.clone(), discover::inode(n)?)))
        .collect::<Result<_>>()?;
    Ok(Inventory {
        release: crate::kernel::release(),
        namespaces,
        interfaces: discover::interfaces(&names).await?,
    })
}

/// Loads and attaches the guest's programs for the run (tc on every device of the guest) and
/// starts its server.
async fn start(s: &Start) -> Result<(Running, Answer)> {
    let btf = KernelBtf::load()?;
    let mut programs = Programs::load(
        &btf,
        &LoadConfig {
            run_id: s.run_id,
            port: s.port,
            ..Default::default()
        },
    )?;
    let hook_set = programs.attach_set(&btf, Mode::Tagged, s.hooks)?;
    let inv = inventory().await?;
    for i in &inv.interfaces {
        programs.attach_tc(discover::ns_arg(&i.netns), &i.ifname, true);
    }
    let (stop, stop_rx) = oneshot::channel();
    let collector = tokio::spawn(ring::collect(programs.take_events()?, stop_rx));
    let socket = traffic::udp_server(
        discover::ns_arg(&s.server_ns),
        SocketAddr::from((s.server_addr, s.port)),
    )?;
    let log = ServerLog::default();
    let run_id = s.run_id;
    // The host's warm-up exchanges carry run id 0: answered, not logged.
    let server = tokio::spawn(traffic::serve_udp(
        socket,
        s.size,
        log.clone(),
        move |id| match id {
            0 => Some(false),
            id if id == run_id => Some(true),
            _ => None,
        },
    ));
    let answer = Answer::Ready {
        run_id,
        hook_set,
        hooks: programs.statuses.clone(),
    };
    let running = Running {
        run_id,
        programs,
        stop,
        collector,
        server,
        log,
    };
    Ok((running, answer))
}

async fn finish(r: Running) -> Result<Answer> {
    tokio::time::sleep(DRAIN).await;
    let _ = r.stop.send(());
    let events = r.collector.await.context("the event collector stopped")??;
    r.server.abort();
    let counters = r.programs.counters()?;
    let stamps = r.log.lock().expect("server log lock").clone();
    Ok(Answer::Done(Done {
        run_id: r.run_id,
        events: events.iter().map(to_wire).collect(),
        stamps,
        lost: counters[COUNTER_LOST as usize],
        unreadable: counters[COUNTER_UNREADABLE as usize],
    }))
}

/// The host's end of an agent's channel.
pub struct Remote {
    pub node: String,
    lines: Reader,
    write: Writer,
}

impl Remote {
    /// The agent of a lab's guest, through QEMU's socket.
    pub async fn guest(g: &Guest) -> Result<Remote> {
        let s = tokio::net::UnixStream::connect(&g.socket)
            .await
            .with_context(|| format!("cannot reach the agent of guest {}", g.name))?;
        let (r, w) = s.into_split();
        Ok(Remote::over(&g.name, Box::pin(r), Box::pin(w)))
    }

    fn over(node: &str, r: Pin<Box<dyn AsyncRead + Send>>, w: Writer) -> Remote {
        Remote {
            node: node.to_string(),
            lines: BufReader::new(r).lines(),
            write: w,
        }
    }

    /// Sends `req` and waits for the answer about run `run_id`.
    async fn ask(&mut self, req: &Request, run_id: u32, within: Duration) -> Result<Answer> {
        let line = serde_json::to_string(req)? + "\n";
        self.write.write_all(line.as_bytes()).await?;
        self.write.flush().await?;
        let node = self.node.clone();
        let answer = async {
            loop {
                let Some(line) = self.lines.next_line().await? else {
                    bail!("the agent of {node} closed its channel");
                };
                // Anything else is left over from an earlier run.
                if let Ok(a) = serde_json::from_str::<Answer>(&line) {
                    if answer_run(&a) == run_id {
                        return Ok(a);
                    }
                }
            }
        };
        tokio::time::timeout(within, answer)
            .await
            .with_context(|| format!("the agent of {node} did not answer within {within:?}"))?
    }

    /// Starts the run's part in the guest; returns the guest's hooks.
    pub async fn start(&mut self, s: Start) -> Result<(HookSet, Vec<HookStatus>)> {
        let run_id = s.run_id;
        match self.ask(&Request::Start(s), run_id, START_TIMEOUT).await? {
            Answer::Ready {
                hook_set, hooks, ..
            } => Ok((hook_set, hooks)),
            Answer::Error { error, .. } => bail!("agent {}: {error}", self.node),
            a => bail!("agent {}: unexpected answer {a:?}", self.node),
        }
    }

    pub async fn stop(&mut self, run_id: u32) -> Result<Done> {
        match self
            .ask(&Request::Stop { run_id }, run_id, STOP_TIMEOUT)
            .await?
        {
            Answer::Done(d) => Ok(d),
            Answer::Error { error, .. } => bail!("agent {}: {error}", self.node),
            a => bail!("agent {}: unexpected answer {a:?}", self.node),
        }
    }
}

fn answer_run(a: &Answer) -> u32 {
    match a {
        Answer::Ready { run_id, .. } | Answer::Error { run_id, .. } => *run_id,
        Answer::Done(d) => d.run_id,
    }
}

/// The guest's namespaces as the run keys hops: ids that no host namespace inode can be
/// (inodes are above 2^28), one range per guest, inserted into `inodes` by their host names.
fn guest_ids(node: &str, index: u32, namespaces: &[String], ids: &mut Inodes) -> Vec<u32> {
    namespaces
        .iter()
        .enumerate()
        .map(|(k, ns)| {
            let id = ((index + 1) << 16) + k as u32 + 1;
            ids.insert(nested::guest_ns(node, ns), id);
            id
        })
        .collect()
}

/// Whether `e` is on the side where its packet leaves the kernel (`host`: the host's, toward
/// the guest): the request on the host, the response in the guest.
fn leaving(e: &Event, host: bool) -> bool {
    (e.direction == DIR_REQUEST) == host
}

/// A transmit's return: the end of a (nested) transmit's unwinding, not packet movement. Under
/// TCG the guest's comes after QEMU has handed the packet to the host, which may already have
/// delivered it.
fn unwinding(e: &Event) -> bool {
    e.hook == HookId::NetDevXmit as u8
}

/// Puts a guest's events and the server's stamps on the host's timeline: estimates the guest
/// clock per exchange (crossing.rs) from the host's events and client stamps and the guest's,
/// moves the guest's events into `events` and completes `stamps`. Returns how the clocks were
/// related.
pub fn merge(
    node: &str,
    index: u32,
    done: Done,
    guest_namespaces: &[(String, u32)],
    events: &mut Vec<Event>,
    stamps: &mut traffic::Outcome,
    inodes: &mut Inodes,
) -> CrossingReport {
    let mut c = Collect::default();
    for e in events
        .iter()
        .filter(|e| !(leaving(e, true) && unwinding(e)))
    {
        c.host(e.seq, e.direction == DIR_REQUEST, e.ts_ns);
    }
    for s in &stamps.stamps {
        let ts = if s.direction == DIR_REQUEST {
            s.send_ns
        } else {
            s.recv_ns
        };
        c.host(s.seq, s.direction == DIR_REQUEST, ts);
    }
    let mut guest: Vec<Event> = done.events.iter().map(from_wire).collect();
    for e in guest
        .iter()
        .filter(|e| !(leaving(e, false) && unwinding(e)))
    {
        c.guest(e.seq, e.direction == DIR_REQUEST, e.ts_ns);
    }
    for &(seq, recv, send) in &done.stamps {
        c.guest(seq, true, recv);
        c.guest(seq, false, send);
    }
    let exchanges = c.complete();
    // The returns of the transmits that handed the packet over, once it was in the other
    // kernel: not where the packet is.
    let handed_over = |e: &Event, host: bool| {
        let last = |x: &crossing::Exchange| if host { x.t1 } else { x.t3 };
        leaving(e, host) && unwinding(e) && exchanges.get(&e.seq).is_some_and(|x| e.ts_ns > last(x))
    };
    events.retain(|e| !handed_over(e, true));
    guest.retain(|e| !handed_over(e, false));
    let est = Estimate::of(node, &exchanges);
    let names: Vec<String> = guest_namespaces.iter().map(|(n, _)| n.clone()).collect();
    let ids = guest_ids(node, index, &names, inodes);
    let by_inode: HashMap<u32, u32> = guest_namespaces
        .iter()
        .zip(ids)
        .map(|((_, inode), id)| (*inode, id))
        .collect();
    events.extend(guest.into_iter().map(|e| Event {
        ts_ns: est.to_host(e.seq, e.ts_ns),
        netns: by_inode.get(&e.netns).copied().unwrap_or(0),
        ..e
    }));
    let on_host: Vec<(u32, u64, u64)> = done
        .stamps
        .iter()
        .map(|&(seq, recv, send)| (seq, est.to_host(seq, recv), est.to_host(seq, send)))
        .collect();
    traffic::apply_server_log(stamps, &on_host);
    est.report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_labs_setup_request_is_understood() {
        let cmds = vec!["link set eth0 up".to_string()];
        let lab = serde_json::json!({ nested::SETUP: cmds.clone() }).to_string();
        assert!(matches!(serde_json::from_str(&lab), Ok(Request::Setup(c)) if c == cmds));
    }

    fn ev(seq: u32, direction: u32, hook: HookId, ts_ns: u64) -> Event {
        Event {
            ts_ns,
            seq,
            direction,
            hook: hook as u8,
            ..Event::default()
        }
    }

    /// The host hands the request over at 1000 and unwinds until 1500 (a late return); the
    /// guest (clock 10^6 ahead) has it at 1_001_200 and hands the response over at 1_001_400,
    /// unwinding until 1_002_000, after the host got it at 1800. The returns after the hand-over
    /// are left out, and each crossing gets half of (1800 - 1000) - (1400 - 1200) = 600.
    #[test]
    fn transmit_returns_after_the_hand_over_are_no_hops() {
        use profiler_common::DIR_RESPONSE;
        use HookId::*;
        let mut events = vec![
            ev(1, DIR_REQUEST, NetDevStartXmit, 1000),
            ev(1, DIR_REQUEST, NetDevXmit, 1500),
            ev(1, DIR_RESPONSE, NetifReceiveSkb, 1800),
            ev(1, DIR_RESPONSE, NetDevXmit, 1900),
        ];
        let done = Done {
            run_id: 1,
            events: [
                ev(1, DIR_REQUEST, NapiGroReceiveEntry, 1_001_200),
                ev(1, DIR_RESPONSE, NetDevStartXmit, 1_001_400),
                ev(1, DIR_RESPONSE, NetDevXmit, 1_002_000),
            ]
            .iter()
            .map(to_wire)
            .collect(),
            stamps: Vec::new(),
            lost: 0,
            unreadable: 0,
        };
        let mut outcome = traffic::Outcome::default();
        let mut inodes = Inodes::default();
        let report = merge("vm1", 0, done, &[], &mut events, &mut outcome, &mut inodes);
        let mut ts: Vec<(u32, u8, u64)> = events
            .iter()
            .map(|e| (e.direction, e.hook, e.ts_ns))
            .collect();
        ts.sort_by_key(|t| t.2);
        assert_eq!(
            ts,
            [
                (DIR_REQUEST, NetDevStartXmit as u8, 1000),
                (DIR_REQUEST, NapiGroReceiveEntry as u8, 1300),
                (DIR_RESPONSE, NetDevStartXmit as u8, 1500),
                (DIR_RESPONSE, NetifReceiveSkb as u8, 1800),
                (DIR_RESPONSE, NetDevXmit as u8, 1900),
            ]
        );
        assert_eq!(report.offset_ns, 1_000_000 - 100);
        assert_eq!(report.crossing_sum.mean_ns, 600.0);
    }

    #[test]
    fn events_cross_the_wire_unchanged() {
        let e = Event {
            ts_ns: 1 << 40,
            seq: 7,
            direction: 1,
            ifindex: 3,
            netns: 4026531840,
            len: 98,
            drop_reason: 0,
            hook: 4,
            flags: 0x21,
            _pad: [0; 2],
            cost_ns: 512,
        };
        let json = serde_json::to_string(&to_wire(&e)).unwrap();
        let back: WireEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(from_wire(&back), e);
    }
}
