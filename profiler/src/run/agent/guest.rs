//! The agent's side, in the guest: it listens, serves one host at a time, attaches for its
//! runs and attaches, runs their server or client, and hands back what it collected.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use profiler_common::{Event, HookId, COUNTER_LOST, COUNTER_UNREADABLE, DIR_REQUEST};

use tokio::{
    io::AsyncWriteExt as _,
    net::TcpStream,
    sync::{mpsc, oneshot, watch, Semaphore},
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;

use super::{Answer, Client, Done, Request, Start};
use crate::run::{
    record::to_wire,
    rr::{self, ServerLog},
    traffic::{Endpoints, Proto},
};
use crate::{
    attach::{
        self,
        across::{self, AttachAnswer, AttachRequest},
    },
    cluster::{
        channel::{self, Reader, Writer},
        tls::{self, Identity},
    },
    datapath::Mode,
    kernel::{
        btf::KernelBtf,
        doctor,
        programs::{LoadConfig, Programs},
        ring,
    },
    lab::{
        discover,
        nested::{self, ExecAnswer, ExecRequest, Inventory, SetupAnswer, SetupRequest},
    },
    report::schema::{AttachReport, SightingLine},
};

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
    let spec = |run_id, count, rate| rr::Spec {
        proto: c.proto,
        size: c.size,
        count,
        rate,
        run_id,
        port: c.port,
        timeout: c.timeout,
    };
    let ends = Endpoints {
        client_ns: discover::ns_arg(&c.client_ns).map(str::to_string),
        server_ns: None,
        server_addr: c.server_addr,
        dest_addr: c.server_addr,
        remote_server: true,
    };
    let progress = std::sync::Arc::default();
    let run = async {
        rr::run(&spec(0, c.warm_up, None), &ends, std::sync::Arc::default())
            .await
            .context("warming up the path")?;
        rr::run(&spec(c.run_id, c.count, c.rate), &ends, progress).await
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
fn client_stamps(out: &rr::Outcome) -> Vec<(u32, u64, u64)> {
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
    let hook_set = programs.attach_set(&btf, Mode::Run, s.hooks)?;
    let inv = inventory().await?;
    for i in &inv.interfaces {
        programs.attach_tc(Mode::Run, discover::ns_arg(&i.netns), &i.ifname, true);
    }
    let (stop, stop_rx) = oneshot::channel();
    let collector = tokio::spawn(ring::collect(programs.take_events()?, stop_rx));
    let log = ServerLog::default();
    let run_id = s.run_id;
    // The warm-up exchanges carry run id 0: answered, not logged.
    let accept = move |id| match id {
        0 => Some(false),
        id if id == run_id => Some(true),
        _ => None,
    };
    let server = match &s.server_ns {
        Some(ns) => {
            let (ns, addr) = (
                discover::ns_arg(ns),
                SocketAddr::from((s.server_addr, s.port)),
            );
            Some(match s.proto {
                Proto::Udp => {
                    let socket = rr::udp_server(ns, addr)?;
                    tokio::spawn(rr::serve_udp(socket, s.size, log.clone(), accept))
                }
                Proto::Tcp => {
                    let listener = rr::tcp_server(ns, addr)?;
                    tokio::spawn(rr::serve_tcp(listener, s.size, log.clone(), accept))
                }
            })
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
