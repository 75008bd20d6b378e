//! `profiler agent`: the profiler's half inside a guest on a nested path. It attaches the
//! guest's probes for the host's run (its own kernel, its own BTF: deep hooks where the guest
//! has kprobes), runs the UDP server in the guest's pod, and hands its events and the server's
//! stamps to the host run at the end, which puts them on the host's timeline (crossing.rs).
//!
//! The channel is a byte stream of JSON lines, one request from the host and one answer from
//! the agent at a time: a virtio-serial port in a lab (`--serial NAME`: QEMU's
//! `-device virtserialport,name=NAME` with a Unix-socket chardev on the host, the channel
//! qemu-guest-agent uses, so real VMs have it too; this machine has no vsock), or TCP on a real
//! node (`--listen ADDR`, `profiler run --agent ADDR`) under mutual TLS (cluster/tls.rs): a
//! lab hands its guests their identity on the serial channel, a node reads it from files.
//! Each end reads lines of a bounded size, an agent serves one host at a time and refuses
//! the others in one line.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use profiler_common::{Event, HookId, COUNTER_LOST, COUNTER_UNREADABLE, DIR_REQUEST};
use serde::{Deserialize, Serialize};
use tokio::{
    io::AsyncWriteExt as _,
    net::TcpStream,
    sync::{mpsc, oneshot, watch, Semaphore},
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;

use super::{
    crossing::{self, Collect, Estimate},
    record::{from_wire, to_wire, WireEvent},
    traffic::{self, ServerLog},
};
use crate::{
    attach::{
        self,
        across::{self, AttachAnswer, AttachRequest},
    },
    cluster::{
        channel::{self, Reader, Writer, MAX_ANSWER},
        tls::{self, Identity},
    },
    datapath::{path::Inodes, Mode},
    kernel::{
        btf::{DropReasons, KernelBtf},
        doctor,
        programs::{LoadConfig, Programs},
        ring,
    },
    lab::{
        discover,
        names::NODE_SEP,
        nested::{self, ExecAnswer, ExecRequest, Inventory, SetupAnswer, SetupRequest},
        target::{AgentAt, GuestEnd},
    },
    report::schema::{AttachReport, CrossingReport, HookSet, HookStatus, SightingLine},
};

/// The agent's programs load under TCG in minutes on 6.1 with deep hooks.
const START_TIMEOUT: Duration = Duration::from_secs(900);
const STOP_TIMEOUT: Duration = Duration::from_secs(300);
/// A guest's setup runs a few `ip` commands; over TCP it only lists the namespaces.
const SETUP_TIMEOUT: Duration = Duration::from_secs(300);
/// A host's requests are small (a run's settings); a longer line is refused, not buffered.
const MAX_REQUEST: usize = 1 << 20;
/// A streaming attach's sightings waiting to be sent, at most: past it (a host that reads too
/// slowly) they are counted, not sent.
const MAX_WAITING: usize = 64 << 20;
/// Hosts refused at once while one is served (each gets its one-line answer); past that a
/// connection is closed unanswered.
const MAX_REFUSING: usize = 8;
/// As the run's: the ring buffer's last events, after the last exchange.
const DRAIN: Duration = Duration::from_millis(500);

/// What the host asks.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// A lab's on the serial channel: `ip` commands that build the guest's side and the
    /// guest's identity for its TCP side; over TCP, an empty one. Answered with a
    /// [`SetupAnswer`].
    Setup(SetupRequest),
    /// `profiler lab exec` (serial channel only): a command in one of the guest's namespaces.
    Exec(ExecRequest),
    /// `profiler attach --lab` or `--peer`: attach here, answered once following; on the
    /// serial channel the host may go and come back (to run `lab exec` meanwhile), over TCP
    /// its connection's end stops it; StopAttach ends it with the report.
    Attach(AttachRequest),
    /// Ends the attach and answers with its report and sightings.
    StopAttach {},
    /// Answered at once with the same word (`{"sync": WORD}`): on the serial channel, where a
    /// host that went away mid-request leaves its answer to the next, the host reads past what
    /// was left to this echo before it asks.
    Sync(String),
    Start(Start),
    /// Runs the client in the guest's pod (answered with [`Answer::Client`] once it is done).
    Client(Client),
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
    /// The server's namespace as the guest names it ("(root)" for its own), when the server
    /// is in this guest.
    pub server_ns: Option<String>,
    pub server_addr: Ipv4Addr,
    pub size: usize,
}

/// The request/response client of a run whose client pod is in the guest (vmp2vmp).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Client {
    pub run_id: u32,
    /// The client's namespace as the guest names it.
    pub client_ns: String,
    pub server_addr: Ipv4Addr,
    pub port: u16,
    pub size: usize,
    pub count: u32,
    pub rate: Option<f64>,
    pub timeout: Duration,
    /// Untagged exchanges first (run id 0), so neighbour resolution is not measured.
    pub warm_up: u32,
}

impl Client {
    /// At most how long the client takes: its pace, a timeout per exchange, and slack.
    fn within(&self) -> Duration {
        let paced = self.rate.map_or(0.0, |r| f64::from(self.count) / r);
        let waits = self.timeout * (self.count + self.warm_up);
        Duration::from_secs_f64(paced) + waits + Duration::from_secs(60)
    }
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
    /// The client's stamps, on the guest's clock: (seq, request sent, response received).
    Client {
        run_id: u32,
        stamps: Vec<(u32, u64, u64)>,
    },
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
    /// The names of the reasons its drops carry, by its kernel's numbers (the host's differ
    /// between kernel versions).
    #[serde(default)]
    pub drop_reasons: Vec<(u32, String)>,
}

impl Done {
    /// Its drops' reasons in the host's numbering (`host`), by name; a reason the host's
    /// kernel does not name keeps its number.
    pub fn renumber_drops(&mut self, host: &DropReasons) {
        let names: HashMap<u32, &str> = self
            .drop_reasons
            .iter()
            .map(|(n, name)| (*n, name.as_str()))
            .collect();
        for e in &mut self.events {
            if e.7 == HookId::KfreeSkb as u8 {
                e.6 = names.get(&e.6).and_then(|n| host.value(n)).unwrap_or(e.6);
            }
        }
    }
}

/// Where the agent listens: a virtio-serial port by name, a TCP address, or both.
pub struct Listen {
    pub serial: Option<String>,
    pub tcp: Option<(SocketAddr, Security)>,
}

/// Who may speak to the agent's TCP side.
pub enum Security {
    /// Hosts with a certificate of the identity's cluster.
    Tls(Identity),
    /// As `Tls`, once the lab has handed the identity over on the serial channel; until then
    /// every host is refused.
    TlsFromHost,
    /// Anyone who reaches the address (a lab's private network).
    Insecure,
}

/// The TCP side's TLS once known: None before a lab hands it over, or under `Insecure`.
type Acceptor = watch::Receiver<Option<TlsAcceptor>>;

/// `profiler agent`: serves host runs until killed.
pub async fn serve(listen: Listen, node: &str) -> Result<()> {
    let (tls_tx, tls_rx) = watch::channel(None);
    let mut insecure = false;
    if let Some((_, security)) = &listen.tcp {
        match security {
            Security::Tls(id) => {
                tls_tx.send_replace(Some(id.acceptor()?));
            }
            Security::TlsFromHost => {}
            Security::Insecure => insecure = true,
        }
    }
    let serial = async {
        match &listen.serial {
            Some(name) => serve_serial(name, node, &tls_tx).await,
            None => std::future::pending().await,
        }
    };
    let tcp = async {
        match listen.tcp {
            Some((addr, _)) => serve_tcp(addr, node, tls_rx, insecure).await,
            None => std::future::pending().await,
        }
    };
    // An attach it served has taken SIGINT and SIGTERM from their default (tokio keeps a
    // handler once installed), so the agent ends on them itself; what it attached is
    // detached as its tasks are dropped.
    tokio::select! {
        served = async { tokio::try_join!(serial, tcp) } => served.map(|_| ()),
        _ = crate::signal::until_interrupted() => {
            eprintln!("agent {node}: stopped");
            Ok(())
        }
    }
}

async fn serve_serial(
    name: &str,
    node: &str,
    tls: &watch::Sender<Option<TlsAcceptor>>,
) -> Result<()> {
    let path = serial_port(name)?;
    let file = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let write = file.try_clone().await?;
    eprintln!("agent {node}: listening on {}", path.display());
    session(
        Reader::new(Box::pin(file), MAX_REQUEST),
        Box::pin(write),
        node,
        Channel::Serial(tls),
    )
    .await
}

/// One host at a time: while a host is served, the others are refused in one line.
async fn serve_tcp(addr: SocketAddr, node: &str, tls: Acceptor, insecure: bool) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let how = if insecure { "without TLS" } else { "under TLS" };
    eprintln!("agent {node}: listening on {addr} ({how})");
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    loop {
        let (conn, peer) = listener.accept().await?;
        let (r, w) = match open(conn, &tls, insecure).await {
            Ok(halves) => halves,
            Err(e) => {
                eprintln!("agent {node}: refused {peer}: {e:#}");
                continue;
            }
        };
        eprintln!("agent {node}: host {peer} connected");
        let served = session(Reader::new(r, MAX_REQUEST), w, node, Channel::Tcp);
        tokio::pin!(served);
        loop {
            tokio::select! {
                end = &mut served => {
                    if let Err(e) = end {
                        eprintln!("agent {node}: {e:#}");
                    }
                    eprintln!("agent {node}: host {peer} gone");
                    break;
                }
                other = listener.accept() => {
                    let (conn, other) = other?;
                    let Ok(permit) = refusing.clone().try_acquire_owned() else {
                        continue;
                    };
                    let (tls, node) = (tls.clone(), node.to_string());
                    tokio::spawn(async move {
                        refuse_busy(conn, &tls, insecure, &node, other, &peer).await;
                        drop(permit);
                    });
                }
            }
        }
    }
}

/// The channel's two halves once the host is authenticated (or at once without TLS).
async fn open(conn: TcpStream, tls: &Acceptor, insecure: bool) -> Result<(channel::Read, Writer)> {
    if insecure {
        let (r, w) = conn.into_split();
        return Ok((Box::pin(r), Box::pin(w)));
    }
    let Some(acceptor) = tls.borrow().clone() else {
        bail!("no certificate yet: the lab has not handed this agent its identity");
    };
    let (r, w) = tokio::io::split(tls::accept(&acceptor, conn).await?);
    Ok((Box::pin(r), Box::pin(w)))
}

/// Tells a host that another is being served, once it is authenticated, and closes.
async fn refuse_busy(
    conn: TcpStream,
    tls: &Acceptor,
    insecure: bool,
    node: &str,
    peer: SocketAddr,
    serving: &SocketAddr,
) {
    let busy = format!("busy: serving host {serving}; try again when its run has ended");
    let answer = serde_json::to_string(&SetupAnswer::Failed(busy)).unwrap_or_default() + "\n";
    match open(conn, tls, insecure).await {
        Ok((_, mut w)) => {
            let _ = w.write_all(answer.as_bytes()).await;
            let _ = w.shutdown().await;
            eprintln!("agent {node}: refused {peer}: busy with {serving}");
        }
        Err(e) => eprintln!("agent {node}: refused {peer}: {e:#}"),
    }
}

/// The channel a session runs on.
#[derive(Clone, Copy)]
enum Channel<'a> {
    /// A virtio-serial port: only the VM's host can write to it; it reads end of file while
    /// no host is connected, which is not an end. The lab's identity for the TCP side comes
    /// here.
    Serial(&'a watch::Sender<Option<TlsAcceptor>>),
    /// Anyone who reaches the address: it may ask for the inventory, not run setup commands.
    Tcp,
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
    server: Option<JoinHandle<()>>,
    log: ServerLog,
}

/// Answers requests until the channel ends.
async fn session(
    mut lines: Reader,
    mut write: Writer,
    node: &str,
    channel: Channel<'_>,
) -> Result<()> {
    let mut running: Option<Running> = None;
    let mut attaching: Option<Attaching> = None;
    loop {
        // A streaming attach's sightings go out as they come, between requests.
        let next = tokio::select! {
            line = lines.next_line() => line?,
            Some(batch) = outgoing(&mut attaching) => {
                write.write_all(&batch).await?;
                write.flush().await?;
                continue;
            }
        };
        let line = match next {
            Some(l) => l,
            None if matches!(channel, Channel::Serial(_)) => {
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
            Request::Setup(request) => serde_json::to_string(&match run_setup(request, channel) {
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
            Request::Client(c) => serde_json::to_string(&run_client(&c).await)?,
            Request::Sync(word) => serde_json::json!({ "sync": word }).to_string(),
            Request::Exec(e) => serde_json::to_string(&match channel {
                Channel::Serial(_) => run_exec(&e).await,
                Channel::Tcp => {
                    ExecAnswer::Failed("commands are taken on the serial channel only".into())
                }
            })?,
            Request::Attach(a) => {
                // One at a time: an attach whose host never stopped it ends here.
                attaching = None;
                // Over TCP the host holds the connection while it attaches: its end (the
                // session's) drops `attaching`, which stops the attach.
                let answer = match start_attach(a, node).await {
                    Ok(a) => {
                        attaching = Some(a);
                        AttachAnswer::Following
                    }
                    Err(e) => AttachAnswer::Failed(format!("{e:#}")),
                };
                serde_json::to_string(&answer)?
            }
            Request::StopAttach {} => serde_json::to_string(&match attaching.take() {
                Some(a) => a.stop(&mut write).await?,
                None => AttachAnswer::Failed("no attach in progress".into()),
            })?,
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

fn run_setup(request: SetupRequest, channel: Channel<'_>) -> Result<()> {
    match channel {
        Channel::Tcp if !request.commands.is_empty() || request.tls.is_some() => {
            bail!(
                "setup commands and identities are taken on the serial channel only, not over TCP"
            )
        }
        Channel::Serial(tls) => {
            if let Some(id) = &request.tls {
                tls.send_replace(Some(id.acceptor()?));
            }
        }
        Channel::Tcp => {}
    }
    if !request.commands.is_empty() {
        doctor::require_privileges()?;
    }
    request.commands.iter().try_for_each(|c| nested::ip(c))
}

/// `attach --lab` or `--peer`'s part here, following in a task of its own while the agent
/// serves on.
struct Attaching {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(AttachReport, Vec<SightingLine>)>>,
    /// A streaming attach's sightings on their way to the host.
    outbox: Option<Outgoing>,
}

impl Attaching {
    /// Stops it; its answer once the sightings it had still to send are written.
    async fn stop(mut self, write: &mut Writer) -> Result<AttachAnswer> {
        let _ = self.stop.send(());
        let ended = self.task.await;
        let mut not_sent = 0;
        if let Some(out) = &mut self.outbox {
            while let Ok(batch) = out.batches.try_recv() {
                write.write_all(&batch).await?;
            }
            not_sent = out.not_sent.load(Ordering::Relaxed);
        }
        Ok(match ended {
            Ok(Ok((mut report, sightings))) => {
                if let Some(w) = report.wire.as_mut() {
                    w.not_sent = not_sent;
                }
                AttachAnswer::Done {
                    report: Box::new(report),
                    sightings,
                }
            }
            Ok(Err(e)) => AttachAnswer::Failed(format!("{e:#}")),
            Err(e) => AttachAnswer::Failed(format!("the attach task: {e}")),
        })
    }
}

/// The next batch of sightings a streaming attach has for the host; pending without one.
async fn outgoing(attaching: &mut Option<Attaching>) -> Option<Vec<u8>> {
    let out = attaching.as_mut().and_then(|a| a.outbox.as_mut())?;
    let batch = out.batches.recv().await?;
    out.waiting.fetch_sub(batch.len(), Ordering::Relaxed);
    Some(batch)
}

/// The agent's end of a streaming attach's sightings.
struct Outgoing {
    batches: mpsc::UnboundedReceiver<Vec<u8>>,
    waiting: Arc<AtomicUsize>,
    not_sent: Arc<AtomicU64>,
}

/// The attach's end: `--sightings`' JSON lines (and with `events` the journeys'), sent as a
/// batch at each flush (after each drain of the ring), at most MAX_WAITING bytes waiting; the
/// lines of a batch past it are counted, not sent.
struct Outbox {
    batch: Vec<u8>,
    batches: mpsc::UnboundedSender<Vec<u8>>,
    waiting: Arc<AtomicUsize>,
    not_sent: Arc<AtomicU64>,
}

fn outbox() -> (Outbox, Outgoing) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (waiting, not_sent) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicU64::new(0)));
    let outbox = Outbox {
        batch: Vec::new(),
        batches: tx,
        waiting: waiting.clone(),
        not_sent: not_sent.clone(),
    };
    let outgoing = Outgoing {
        batches: rx,
        waiting,
        not_sent,
    };
    (outbox, outgoing)
}

impl Outbox {
    /// Another writer onto the same channel, under the same bound.
    fn another(&self) -> Outbox {
        Outbox {
            batch: Vec::new(),
            batches: self.batches.clone(),
            waiting: self.waiting.clone(),
            not_sent: self.not_sent.clone(),
        }
    }
}

impl std::io::Write for Outbox {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.batch.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let lines = batch.iter().filter(|&&b| b == b'\n').count() as u64;
        let room = self.waiting.load(Ordering::Relaxed) + batch.len() <= MAX_WAITING;
        let len = batch.len();
        if room && self.batches.send(batch).is_ok() {
            self.waiting.fetch_add(len, Ordering::Relaxed);
        } else {
            self.not_sent.fetch_add(lines, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Attaches as asked; returns once it follows, or its error.
async fn start_attach(request: AttachRequest, node: &str) -> Result<Attaching> {
    let (tell, followed) = oneshot::channel();
    let (stop, stopped) = oneshot::channel();
    let (stream, events) = (request.stream, request.events);
    let mut args = across::guest_args(
        request,
        node,
        attach::Control {
            following: tell,
            stop: stopped,
        },
    )?;
    let outbox = stream.then(|| {
        let (lines, outgoing) = outbox();
        if events {
            // Journey lines on the same channel, whole lines in batches of their own.
            args.journeys = Some(Box::new(lines.another()));
        }
        args.sightings = Some(Box::new(lines));
        args.keep_sightings = false;
        outgoing
    });
    let task = tokio::spawn(async move { attach::attach(&mut args).await });
    if followed.await.is_err() {
        // It ended before following: its error says why.
        task.await??;
        bail!("the attach ended before following");
    }
    Ok(Attaching { stop, task, outbox })
}

/// Runs `lab exec`'s command in the guest's namespace, killed past its timeout.
async fn run_exec(e: &ExecRequest) -> ExecAnswer {
    let Some((prog, args)) = e.argv.split_first() else {
        return ExecAnswer::Failed("no command".into());
    };
    let mut cmd = if e.netns == discover::ROOT {
        tokio::process::Command::new(prog)
    } else {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &e.netns, prog]);
        c
    };
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let within = Duration::from_secs(e.timeout_s);
    match tokio::time::timeout(within, cmd.output()).await {
        Err(_) => ExecAnswer::Failed(format!("{prog} did not end within {within:?}: killed")),
        Ok(Err(err)) => ExecAnswer::Failed(format!("cannot run {prog}: {err}")),
        Ok(Ok(out)) => ExecAnswer::Ran {
            status: exit_code(&out.status),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
    }
}

/// A shell's view of how a process ended: its code, or 128 + the signal that ended it.
fn exit_code(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
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

/// Runs the client as `c` says: a warm-up, then the run's exchanges.
async fn run_client(c: &Client) -> Answer {
    let spec = |run_id, count, rate| traffic::Spec {
        proto: traffic::Proto::Udp,
        size: c.size,
        count,
        rate,
        run_id,
        port: c.port,
        timeout: c.timeout,
    };
    let ends = traffic::Endpoints {
        client_ns: discover::ns_arg(&c.client_ns).map(str::to_string),
        server_ns: None,
        server_addr: c.server_addr,
        dest_addr: c.server_addr,
        remote_server: true,
    };
    let progress = std::sync::Arc::default();
    let run = async {
        traffic::run(&spec(0, c.warm_up, None), &ends, std::sync::Arc::default())
            .await
            .context("warming up the path")?;
        traffic::run(&spec(c.run_id, c.count, c.rate), &ends, progress).await
    };
    match run.await {
        Ok(out) => Answer::Client {
            run_id: c.run_id,
            stamps: client_stamps(&out),
        },
        Err(e) => Answer::Error {
            run_id: c.run_id,
            error: format!("{e:#}"),
        },
    }
}

/// The client's half of an outcome: (seq, request sent, response received).
fn client_stamps(out: &traffic::Outcome) -> Vec<(u32, u64, u64)> {
    let mut by_seq: std::collections::BTreeMap<u32, (u64, u64)> = Default::default();
    for s in &out.stamps {
        let e = by_seq.entry(s.seq).or_default();
        match s.direction {
            DIR_REQUEST => e.0 = s.send_ns,
            _ => e.1 = s.recv_ns,
        }
    }
    by_seq
        .into_iter()
        .map(|(seq, (a, b))| (seq, a, b))
        .collect()
}

/// Loads and attaches the guest's programs for the run (tc on every device of the guest) and
/// starts its server.
async fn start(s: &Start) -> Result<(Running, Answer)> {
    // A tagged run attaches tc programs: more than an agent serving attach needs.
    doctor::require_privileges()?;
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
        programs.attach_tc(Mode::Tagged, discover::ns_arg(&i.netns), &i.ifname, true);
    }
    let (stop, stop_rx) = oneshot::channel();
    let collector = tokio::spawn(ring::collect(programs.take_events()?, stop_rx));
    let log = ServerLog::default();
    let run_id = s.run_id;
    let server = match &s.server_ns {
        Some(ns) => {
            let addr = SocketAddr::from((s.server_addr, s.port));
            let socket = traffic::udp_server(discover::ns_arg(ns), addr)?;
            // The warm-up exchanges carry run id 0: answered, not logged.
            Some(tokio::spawn(traffic::serve_udp(
                socket,
                s.size,
                log.clone(),
                move |id| match id {
                    0 => Some(false),
                    id if id == run_id => Some(true),
                    _ => None,
                },
            )))
        }
        None => None,
    };
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
    if let Some(server) = r.server {
        server.abort();
    }
    let counters = r.programs.counters()?;
    let stamps = r.log.lock().expect("server log lock").clone();
    let reasons = KernelBtf::load()?.drop_reasons();
    let mut drop_reasons: Vec<(u32, String)> = events
        .iter()
        .filter(|e| e.hook == HookId::KfreeSkb as u8)
        .map(|e| (e.drop_reason, reasons.name(e.drop_reason)))
        .collect();
    drop_reasons.sort();
    drop_reasons.dedup();
    Ok(Answer::Done(Done {
        run_id: r.run_id,
        events: events.iter().map(to_wire).collect(),
        stamps,
        lost: counters[COUNTER_LOST as usize],
        unreadable: counters[COUNTER_UNREADABLE as usize],
        drop_reasons,
    }))
}

/// The VM and its namespace that `to` ("vm1:pod-b") names.
pub fn guest_node(to: &str) -> Result<(&str, &str)> {
    match to.split_once(NODE_SEP) {
        Some((n, ns)) if !n.is_empty() && !ns.is_empty() => Ok((n, ns)),
        _ => bail!("with --agent, --to names the VM's namespace as NODE:NETNS:IP (vm1:pod-b:IP, vm1:(root):IP)"),
    }
}

/// VM `node` with its namespace `ns` (as [`guest_node`] reads them), with the inventory its
/// agent at `at` sends (`profiler run --agent`), spoken to under TLS as `identity` (None: in
/// the clear).
pub async fn guest_of(
    (node, ns): (&str, &str),
    at: SocketAddr,
    identity: Option<Identity>,
) -> Result<(GuestEnd, Inventory)> {
    let mut g = GuestEnd {
        name: node.to_string(),
        namespaces: Vec::new(),
        agent: AgentAt::Tcp(at, identity),
    };
    let inv = Remote::connect(&g)
        .await?
        .setup(SetupRequest::default())
        .await?;
    if !inv.namespaces.iter().any(|(n, _)| n == ns) {
        let names: Vec<&str> = inv.namespaces.iter().map(|(n, _)| n.as_str()).collect();
        bail!(
            "the VM at {at} has no namespace {ns} (it has {})",
            names.join(", ")
        );
    }
    g.namespaces = inv.namespaces.clone();
    Ok((g, inv))
}

/// The host's end of an agent's channel.
pub struct Remote {
    pub node: String,
    lines: Reader,
    write: Writer,
}

impl Remote {
    /// The agent of a guest on the run's path.
    pub async fn connect(g: &GuestEnd) -> Result<Remote> {
        let cannot = || format!("cannot reach the agent of {} at {}", g.name, g.agent);
        match &g.agent {
            AgentAt::Socket(path) => {
                let (r, w) = tokio::net::UnixStream::connect(path)
                    .await
                    .with_context(cannot)?
                    .into_split();
                Ok(Remote::over(&g.name, Box::pin(r), Box::pin(w)))
            }
            AgentAt::Tcp(addr, identity) => {
                let (r, w) = channel::dial(&g.name, *addr, identity.as_ref()).await?;
                Ok(Remote::over(&g.name, r, w))
            }
        }
    }

    fn over(node: &str, r: channel::Read, w: Writer) -> Remote {
        Remote {
            node: node.to_string(),
            lines: Reader::new(r, MAX_ANSWER),
            write: w,
        }
    }

    /// Has the agent run a lab's `commands` (none over TCP) and answer with its guest's
    /// inventory.
    pub async fn setup(&mut self, request: SetupRequest) -> Result<Inventory> {
        self.send(&Request::Setup(request)).await?;
        match self.answer(SETUP_TIMEOUT).await? {
            SetupAnswer::Inventory(inv) => Ok(inv),
            SetupAnswer::Failed(e) => bail!("agent {}: {e}", self.node),
        }
    }

    /// The agent's next line, read as `A`.
    async fn answer<A: serde::de::DeserializeOwned>(&mut self, within: Duration) -> Result<A> {
        let node = self.node.clone();
        let line = tokio::time::timeout(within, self.lines.next_line())
            .await
            .with_context(|| format!("the agent of {node} did not answer within {within:?}"))??;
        let Some(line) = line else {
            bail!("the agent of {node} closed its channel");
        };
        match serde_json::from_str(&line) {
            Ok(a) => Ok(a),
            // A TLS record (an alert or a handshake): the agent takes only its cluster's hosts.
            Err(_) if line.starts_with(['\u{15}', '\u{16}']) => {
                bail!("the agent of {node} speaks TLS: connect with --tls DIR (its cluster's certificates)")
            }
            Err(e) => bail!("agent {node}: unreadable answer {line:?}: {e}"),
        }
    }

    async fn send(&mut self, req: &Request) -> Result<()> {
        let line = serde_json::to_string(req)? + "\n";
        self.write.write_all(line.as_bytes()).await?;
        Ok(self.write.flush().await?)
    }

    /// Sends `req` and waits for the answer about run `run_id`.
    async fn ask(&mut self, req: &Request, run_id: u32, within: Duration) -> Result<Answer> {
        self.send(req).await?;
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

    /// Runs the client in the guest; returns its (seq, sent, received) stamps, one per
    /// completed exchange, on the guest's clock.
    pub async fn client(&mut self, c: Client) -> Result<Vec<(u32, u64, u64)>> {
        let (run_id, within) = (c.run_id, c.within());
        match self.ask(&Request::Client(c), run_id, within).await? {
            Answer::Client { stamps, .. } => Ok(stamps),
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
        Answer::Ready { run_id, .. }
        | Answer::Client { run_id, .. }
        | Answer::Error { run_id, .. } => *run_id,
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

/// Whether `e` is on the side where its packet leaves the kernel toward the other (the request
/// on the exchange's originator, the response on its responder).
fn leaving(e: &Event, originator: bool) -> bool {
    (e.direction == DIR_REQUEST) == originator
}

/// A transmit's return: the end of a (nested) transmit's unwinding, not packet movement. Under
/// TCG the guest's comes after QEMU has handed the packet to the host, which may already have
/// delivered it.
fn unwinding(e: &Event) -> bool {
    e.hook == HookId::NetDevXmit as u8
}

/// One guest's part of a run, as its agent handed it over.
pub struct GuestPart<'a> {
    pub node: &'a str,
    /// Its place among the run's guests (its namespaces' ids depend on it).
    pub index: u32,
    pub done: Done,
    /// Its namespaces with their inodes in its kernel.
    pub namespaces: &'a [(String, u32)],
    /// Its client's (seq, sent, received) stamps when its pod sent the requests: it is then
    /// the exchanges' originator (t1, t4 on its side), else the responder.
    pub client: Option<Vec<(u32, u64, u64)>>,
}

/// A guest's part on the host's timeline.
pub struct Merged {
    pub events: Vec<Event>,
    /// Its client's stamps, if it ran the client.
    pub client: Vec<(u32, u64, u64)>,
    /// Its server's (seq, received, sent) stamps, if it ran the server.
    pub server: Vec<(u32, u64, u64)>,
    pub report: CrossingReport,
}

/// Puts a guest's events and stamps on the host's timeline: estimates the guest clock per
/// exchange (crossing.rs) from the host's events (`host_events`, the host's alone) and client
/// stamps (`host_client`, when the host ran the client) and the guest's. Drops from
/// `host_events` the returns of transmits that handed a packet to the guest.
pub fn merge(
    part: GuestPart,
    host_events: &mut Vec<Event>,
    host_client: &[traffic::Stamp],
    inodes: &mut Inodes,
) -> Merged {
    let guest_side = part.client.is_some();
    let host_side = !guest_side;
    let mut c = Collect::default();
    let mut add = |originator: bool, seq, request, ts| match originator {
        true => c.originator(seq, request, ts),
        false => c.responder(seq, request, ts),
    };
    let hops = |e: &&Event, originator| !(leaving(e, originator) && unwinding(e));
    for e in host_events.iter().filter(|e| hops(e, host_side)) {
        add(host_side, e.seq, e.direction == DIR_REQUEST, e.ts_ns);
    }
    for s in host_client {
        let request = s.direction == DIR_REQUEST;
        add(
            true,
            s.seq,
            request,
            if request { s.send_ns } else { s.recv_ns },
        );
    }
    let mut guest: Vec<Event> = part.done.events.iter().map(from_wire).collect();
    for e in guest.iter().filter(|e| hops(e, guest_side)) {
        add(guest_side, e.seq, e.direction == DIR_REQUEST, e.ts_ns);
    }
    for &(seq, recv, send) in &part.done.stamps {
        add(false, seq, true, recv);
        add(false, seq, false, send);
    }
    for &(seq, sent, recv) in part.client.iter().flatten() {
        add(true, seq, true, sent);
        add(true, seq, false, recv);
    }
    let exchanges = c.complete();
    // The returns of the transmits that handed the packet over, once it was in the other
    // kernel: not where the packet is.
    let handed_over = |e: &Event, originator: bool| {
        let last = |x: &crossing::Exchange| if originator { x.t1 } else { x.t3 };
        leaving(e, originator)
            && unwinding(e)
            && exchanges.get(&e.seq).is_some_and(|x| e.ts_ns > last(x))
    };
    host_events.retain(|e| !handed_over(e, host_side));
    guest.retain(|e| !handed_over(e, guest_side));
    let est = Estimate::of(part.node, &exchanges, guest_side);
    let names: Vec<String> = part.namespaces.iter().map(|(n, _)| n.clone()).collect();
    let ids = guest_ids(part.node, part.index, &names, inodes);
    let by_inode: HashMap<u32, u32> = part
        .namespaces
        .iter()
        .zip(ids)
        .map(|((_, inode), id)| (*inode, id))
        .collect();
    let on_host = |stamps: &[(u32, u64, u64)]| -> Vec<(u32, u64, u64)> {
        let at = |seq, ts| est.to_host(seq, ts);
        stamps
            .iter()
            .map(|&(s, a, b)| (s, at(s, a), at(s, b)))
            .collect()
    };
    Merged {
        events: guest
            .into_iter()
            .map(|e| Event {
                ts_ns: est.to_host(e.seq, e.ts_ns),
                netns: by_inode.get(&e.netns).copied().unwrap_or(0),
                ..e
            })
            .collect(),
        client: on_host(part.client.as_deref().unwrap_or_default()),
        server: on_host(&part.done.stamps),
        report: est.report,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_labs_setup_request_is_understood() {
        let cmds = vec!["link set eth0 up".to_string()];
        let request = SetupRequest {
            commands: cmds.clone(),
            tls: None,
        };
        let lab = serde_json::json!({ nested::SETUP: request }).to_string();
        assert!(matches!(serde_json::from_str(&lab), Ok(Request::Setup(r)) if r.commands == cmds));
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
            drop_reasons: Vec::new(),
        };
        let mut inodes = Inodes::default();
        let part = GuestPart {
            node: "vm1",
            index: 0,
            done,
            namespaces: &[],
            client: None,
        };
        let merged = merge(part, &mut events, &[], &mut inodes);
        let report = merged.report;
        events.extend(merged.events);
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

    fn done(events: &[Event], stamps: Vec<(u32, u64, u64)>) -> Done {
        Done {
            run_id: 1,
            events: events.iter().map(to_wire).collect(),
            stamps,
            lost: 0,
            unreadable: 0,
            drop_reasons: Vec::new(),
        }
    }

    /// VMP2VMP: vm1 (clock 10^6 ahead) sends the request through the host to vm2 (clock
    /// 2 * 10^6 ahead), each crossing taking 200 ns both ways. vm1 is the originator of its
    /// exchanges with the host, the host of its with vm2: both guests' events, the client's
    /// and the server's stamps land at their true host times.
    #[test]
    fn two_guests_each_side_of_the_host_land_on_its_timeline() {
        use profiler_common::DIR_RESPONSE;
        use HookId::*;
        let (vm1, vm2) = (1_000_000, 2_000_000);
        let mut events = vec![
            ev(1, DIR_REQUEST, NetifReceiveSkb, 1200),
            ev(1, DIR_REQUEST, NetDevStartXmit, 1300),
            ev(1, DIR_RESPONSE, NetifReceiveSkb, 2000),
            ev(1, DIR_RESPONSE, NetDevStartXmit, 2100),
        ];
        let first = done(
            &[
                ev(1, DIR_REQUEST, NetDevStartXmit, vm1 + 1000),
                ev(1, DIR_RESPONSE, NapiGroReceiveEntry, vm1 + 2300),
            ],
            Vec::new(),
        );
        let second = done(
            &[
                ev(1, DIR_REQUEST, NapiGroReceiveEntry, vm2 + 1500),
                ev(1, DIR_RESPONSE, NetDevStartXmit, vm2 + 1800),
            ],
            vec![(1, vm2 + 1600, vm2 + 1700)],
        );
        let mut inodes = Inodes::default();
        let one = merge(
            GuestPart {
                node: "vm1",
                index: 0,
                done: first,
                namespaces: &[],
                client: Some(vec![(1, vm1 + 900, vm1 + 2400)]),
            },
            &mut events,
            &[],
            &mut inodes,
        );
        let two = merge(
            GuestPart {
                node: "vm2",
                index: 1,
                done: second,
                namespaces: &[],
                client: None,
            },
            &mut events,
            &[],
            &mut inodes,
        );
        assert_eq!(one.report.offset_ns, vm1 as i64);
        assert_eq!(two.report.offset_ns, vm2 as i64);
        assert_eq!(one.client, [(1, 900, 2400)]);
        assert_eq!(two.server, [(1, 1600, 1700)]);
        events.extend(one.events.into_iter().chain(two.events));
        let mut ts: Vec<u64> = events.iter().map(|e| e.ts_ns).collect();
        ts.sort_unstable();
        assert_eq!(ts, [1000, 1200, 1300, 1500, 1800, 2000, 2100, 2300]);
    }

    /// A 6.1 guest's "not_specified" (1) is the host's 2 on 6.18: renumbered by name; a
    /// reason the host does not name, and events that are no drops, keep their numbers.
    #[test]
    fn guest_drop_reasons_are_renumbered_by_name() {
        let drop = |reason| Event {
            hook: HookId::KfreeSkb as u8,
            drop_reason: reason,
            ..Event::default()
        };
        let other = Event {
            hook: HookId::NetifRx as u8,
            drop_reason: 1,
            ..Event::default()
        };
        let mut d = done(&[drop(1), drop(40), other], Vec::new());
        d.drop_reasons = vec![(1, "not_specified".into()), (40, "guest_only".into())];
        let host = DropReasons::named([(2, "not_specified"), (1, "consumed")]);
        d.renumber_drops(&host);
        let reasons: Vec<u32> = d.events.iter().map(|e| e.6).collect();
        assert_eq!(reasons, [2, 40, 1]);
    }
}
