//! MPI_Alltoall over TCP between the processes of a lab's pods: in each round every process
//! sends one message to every other process and waits until it has received one from each,
//! then starts the next round. A process is a set of tokio tasks with sockets of its own: one
//! connection to every other process, made from its pod's namespace to the other pod's address.
//!
//! Each pod address has one listener on the run's port, so the kernel's port filter sees every
//! message; a connection starts with a hello naming its two processes. Every message is
//! written with MSG_EOR, so it starts a buffer of its own and the kernel finds its tag at the
//! start of a segment. A tagged message's tag says its pod pair (direction) and its sequence
//! within the pair: (round, sending process, receiving process).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use nix::sys::socket::{send, MsgFlags};
use profiler_common::{Tag, TAG_LEN, TAG_MAGIC};
use tokio::{
    io::{AsyncReadExt as _, Interest},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinSet,
};

use super::traffic::{Stamp, MAX_SIZE, MIN_SIZE};
use crate::{kernel::monotonic_ns, lab::netns};

/// Default `--tag-every` of all-to-all: every message of one round in 10 (the first round,
/// which also resolves neighbours, is not tagged).
pub const DEFAULT_TAG_EVERY: u32 = 10;
const FILLER: u8 = 0xa5;

/// One pod: where its processes' sockets live.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PodEnd {
    /// None: this process's namespace.
    pub netns: Option<String>,
    pub addr: Ipv4Addr,
    pub host: String,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AlltoallSpec {
    pub pods: Vec<PodEnd>,
    pub procs: u32,
    pub size: usize,
    pub rounds: u32,
    /// 0: nothing tagged.
    pub tag_every: u32,
    pub run_id: u32,
    pub port: u16,
    /// How long a process waits for a round's messages.
    pub timeout: Duration,
}

impl AlltoallSpec {
    pub fn validate(&self) -> Result<()> {
        self.validate_values()?;
        if self.total() < 2 {
            return Err(crate::error::bad_input(
                "all-to-all needs at least two processes",
            ));
        }
        Ok(())
    }

    /// The values given on the command line, before the lab's pods are known.
    pub fn validate_values(&self) -> Result<()> {
        if !(MIN_SIZE..=MAX_SIZE).contains(&self.size) {
            return Err(crate::error::bad_input(format!(
                "--size must be between {MIN_SIZE} and {MAX_SIZE} bytes, got {}",
                self.size
            )));
        }
        if self.rounds == 0 {
            return Err(crate::error::bad_input(
                "--count (rounds) must be at least 1",
            ));
        }
        Ok(())
    }

    /// How many hosts the pods are on.
    pub fn hosts(&self) -> u32 {
        let mut hosts: Vec<&str> = self.pods.iter().map(|p| p.host.as_str()).collect();
        hosts.sort_unstable();
        hosts.dedup();
        hosts.len().max(1) as u32
    }

    /// The kind of path messages from pod `a` to pod `b` take.
    pub fn path_kind(&self, a: u32, b: u32) -> &'static str {
        let (pa, pb) = (&self.pods[a as usize], &self.pods[b as usize]);
        if pa.netns == pb.netns && pa.addr == pb.addr {
            "same pod"
        } else if pa.host == pb.host {
            "same host"
        } else {
            "cross host"
        }
    }

    fn total(&self) -> u32 {
        self.pods.len() as u32 * self.procs
    }

    fn pod_of(&self, proc: u32) -> u32 {
        proc / self.procs
    }

    /// The tag direction of messages from pod `a` to pod `b`.
    pub fn pair(&self, a: u32, b: u32) -> u32 {
        a * self.pods.len() as u32 + b
    }

    /// The (from, to) pods of a tag direction.
    pub fn pods_of(&self, pair: u32) -> (u32, u32) {
        let n = self.pods.len() as u32;
        (pair / n, pair % n)
    }

    fn tagged(&self, round: u32) -> bool {
        self.tag_every != 0 && round % self.tag_every == self.tag_every - 1
    }

    /// A message's sequence within its pod pair.
    fn seq(&self, round: u32, from: u32, to: u32) -> u32 {
        let p = self.procs;
        (round * p + from % p) * p + to % p
    }
}

/// Each round's span (first process starting it to the last one done) and the tagged
/// messages' stamps.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct AlltoallOutcome {
    pub rounds: Vec<Duration>,
    pub stamps: Vec<Stamp>,
}

/// Per round, each process's (start, end) in CLOCK_MONOTONIC ns.
type Spans = Arc<Mutex<HashMap<u32, (u64, u64)>>>;
type Stamps = Arc<Mutex<HashMap<(u32, u32), Stamp>>>;

/// Runs the rounds; `progress` counts the rounds the first process completed.
pub async fn run(spec: &AlltoallSpec, progress: Arc<AtomicU32>) -> Result<AlltoallOutcome> {
    spec.validate()?;
    let spec = Arc::new(spec.clone());
    let stamps = Stamps::default();
    let mut inboxes = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..spec.total() {
        let (tx, rx) = mpsc::unbounded_channel::<u32>();
        senders.push(tx);
        inboxes.push(rx);
    }
    let mut tasks = JoinSet::new();
    let mut listeners: HashMap<(Option<String>, Ipv4Addr), ()> = HashMap::new();
    for pod in &spec.pods {
        if listeners
            .insert((pod.netns.clone(), pod.addr), ())
            .is_some()
        {
            continue;
        }
        let listener = listen(pod, spec.port)?;
        // Every process of the pods at this address hears from every other process.
        let here = spec
            .pods
            .iter()
            .filter(|p| p.netns == pod.netns && p.addr == pod.addr)
            .count();
        let expected = here * spec.procs as usize * (spec.total() as usize - 1);
        tasks.spawn(accept(
            listener,
            expected,
            spec.clone(),
            senders.clone(),
            stamps.clone(),
        ));
    }
    drop(senders);
    let conns = connect_all(&spec).await?;
    let spans: Vec<Spans> = (0..spec.total()).map(|_| Spans::default()).collect();
    let mut procs = JoinSet::new();
    for ((me, out), inbox) in conns.into_iter().enumerate().zip(inboxes) {
        procs.spawn(process(
            me as u32,
            out,
            inbox,
            spec.clone(),
            stamps.clone(),
            spans[me].clone(),
            (me == 0).then(|| progress.clone()),
        ));
    }
    let mut failed = None;
    while let Some(done) = procs.join_next().await {
        if let Err(e) = done.context("a process task panicked").and_then(|r| r) {
            failed.get_or_insert(e);
            procs.abort_all();
        }
    }
    tasks.abort_all();
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(AlltoallOutcome {
        rounds: round_spans(&spans, spec.rounds),
        stamps: complete(stamps),
    })
}

fn listen(pod: &PodEnd, port: u16) -> Result<TcpListener> {
    let addr = SocketAddr::from((pod.addr, port));
    let l = netns::run_in(pod.netns.as_deref(), || {
        let l = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding an all-to-all listener to {addr}"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })?;
    Ok(TcpListener::from_std(l)?)
}

/// Accepts `expected` connections; each says (from, to) and then carries messages to `to`
/// (`from` is for people reading a capture).
async fn accept(
    listener: TcpListener,
    expected: usize,
    spec: Arc<AlltoallSpec>,
    inboxes: Vec<mpsc::UnboundedSender<u32>>,
    stamps: Stamps,
) -> Result<()> {
    let mut readers = JoinSet::new();
    for _ in 0..expected {
        let (mut conn, _) = listener.accept().await?;
        let mut hello = [0u8; 8];
        conn.read_exact(&mut hello).await?;
        let to = u32::from_be_bytes([hello[4], hello[5], hello[6], hello[7]]);
        let inbox = inboxes
            .get(to as usize)
            .context("a hello names no process of this run")?
            .clone();
        readers.spawn(read_messages(conn, spec.clone(), inbox, stamps.clone()));
    }
    while readers.join_next().await.is_some() {}
    Ok(())
}

/// Reads one process's messages to another, hands each round number to `to`, stamps tagged ones.
async fn read_messages(
    mut conn: TcpStream,
    spec: Arc<AlltoallSpec>,
    inbox: mpsc::UnboundedSender<u32>,
    stamps: Stamps,
) {
    let mut buf = vec![0u8; spec.size];
    for round in 0..spec.rounds {
        if conn.read_exact(&mut buf).await.is_err() {
            return;
        }
        let now = monotonic_ns();
        if let Some(tag) = read_tag(&buf, spec.run_id) {
            let mut s = stamps.lock().expect("stamps lock");
            if let Some(stamp) = s.get_mut(&(tag.direction, tag.seq)) {
                stamp.recv_ns = now;
            } else {
                s.insert(
                    (tag.direction, tag.seq),
                    Stamp {
                        seq: tag.seq,
                        direction: tag.direction,
                        send_ns: 0,
                        recv_ns: now,
                    },
                );
            }
        }
        if inbox.send(round).is_err() {
            return;
        }
    }
}

fn read_tag(buf: &[u8], run_id: u32) -> Option<Tag> {
    let raw: &[u8; TAG_LEN] = buf.get(..TAG_LEN)?.try_into().ok()?;
    Some(Tag::from_bytes(raw)).filter(|t| t.magic == TAG_MAGIC && t.run_id == run_id)
}

/// Every process's connections to every other, index = the other process; its own is None.
async fn connect_all(spec: &AlltoallSpec) -> Result<Vec<Vec<Option<TcpStream>>>> {
    let mut all = Vec::new();
    for me in 0..spec.total() {
        let pod = &spec.pods[spec.pod_of(me) as usize];
        let peers: Vec<(u32, SocketAddr)> = (0..spec.total())
            .filter(|&p| p != me)
            .map(|p| {
                (
                    p,
                    SocketAddr::from((spec.pods[spec.pod_of(p) as usize].addr, spec.port)),
                )
            })
            .collect();
        let std_conns = netns::run_in(pod.netns.as_deref(), || {
            peers
                .iter()
                .map(|&(p, addr)| {
                    let c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                        .with_context(|| {
                            format!("connecting to all-to-all process {p} at {addr}")
                        })?;
                    Ok((p, c))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let mut conns: Vec<Option<TcpStream>> = (0..spec.total()).map(|_| None).collect();
        for (p, c) in std_conns {
            c.set_nonblocking(true)?;
            // An MPI library's choice: the tail of a message is not held back for an ACK.
            c.set_nodelay(true)?;
            let c = TcpStream::from_std(c)?;
            let mut hello = [0u8; 8];
            hello[..4].copy_from_slice(&me.to_be_bytes());
            hello[4..].copy_from_slice(&p.to_be_bytes());
            write_message(&c, &hello).await?;
            conns[p as usize] = Some(c);
        }
        all.push(conns);
    }
    Ok(all)
}

/// Writes all of `buf` with MSG_EOR: the next write starts a buffer of its own.
async fn write_message(conn: &TcpStream, mut buf: &[u8]) -> Result<()> {
    let flags = MsgFlags::MSG_EOR | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    while !buf.is_empty() {
        let n = conn
            .async_io(Interest::WRITABLE, || {
                send(conn.as_raw_fd(), buf, flags).map_err(std::io::Error::from)
            })
            .await
            .context("writing an all-to-all message")?;
        buf = &buf[n..];
    }
    Ok(())
}

/// One process: each round, a message to every other process, then all of its own.
async fn process(
    me: u32,
    conns: Vec<Option<TcpStream>>,
    mut inbox: mpsc::UnboundedReceiver<u32>,
    spec: Arc<AlltoallSpec>,
    stamps: Stamps,
    spans: Spans,
    progress: Option<Arc<AtomicU32>>,
) -> Result<()> {
    let others = spec.total() - 1;
    let mut arrived: HashMap<u32, u32> = HashMap::new();
    let mut msg = vec![FILLER; spec.size];
    for round in 0..spec.rounds {
        let start = monotonic_ns();
        for (to, conn) in conns.iter().enumerate() {
            let Some(conn) = conn else { continue };
            let to = to as u32;
            let tagged = spec.tagged(round);
            if tagged {
                let direction = spec.pair(spec.pod_of(me), spec.pod_of(to));
                let seq = spec.seq(round, me, to);
                let tag = Tag {
                    magic: TAG_MAGIC,
                    run_id: spec.run_id,
                    seq,
                    direction,
                };
                msg[..TAG_LEN].copy_from_slice(&tag.to_bytes());
                let send_ns = monotonic_ns();
                stamps
                    .lock()
                    .expect("stamps lock")
                    .entry((direction, seq))
                    .or_insert(Stamp {
                        seq,
                        direction,
                        send_ns: 0,
                        recv_ns: 0,
                    })
                    .send_ns = send_ns;
            }
            write_message(conn, &msg).await?;
            if tagged {
                msg[..TAG_LEN].fill(FILLER);
            }
        }
        while arrived.get(&round).copied().unwrap_or(0) < others {
            let r = tokio::time::timeout(spec.timeout, inbox.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "all-to-all round {round}: process {me} did not get all its messages within --timeout"
                    )
                })?
                .with_context(|| format!("all-to-all round {round}: a connection to process {me} closed"))?;
            *arrived.entry(r).or_default() += 1;
        }
        arrived.remove(&round);
        spans
            .lock()
            .expect("spans lock")
            .insert(round, (start, monotonic_ns()));
        if let Some(p) = &progress {
            p.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Each round's span over all processes, for the rounds every process completed.
fn round_spans(spans: &[Spans], rounds: u32) -> Vec<Duration> {
    let spans: Vec<_> = spans
        .iter()
        .map(|s| s.lock().expect("spans lock").clone())
        .collect();
    (0..rounds)
        .map_while(|r| {
            let all: Option<Vec<(u64, u64)>> = spans.iter().map(|s| s.get(&r).copied()).collect();
            let all = all?;
            let start = all.iter().map(|s| s.0).min()?;
            let end = all.iter().map(|s| s.1).max()?;
            Some(Duration::from_nanos(end - start))
        })
        .collect()
}

/// The tagged messages both ends stamped.
fn complete(stamps: Stamps) -> Vec<Stamp> {
    let s = stamps.lock().expect("stamps lock");
    let mut v: Vec<Stamp> = s
        .values()
        .filter(|s| s.send_ns != 0 && s.recv_ns != 0)
        .copied()
        .collect();
    v.sort_by_key(|s| (s.direction, s.seq));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pods: &[(u8, &str)], procs: u32, rounds: u32, tag_every: u32) -> AlltoallSpec {
        AlltoallSpec {
            pods: pods
                .iter()
                .map(|&(last, host)| PodEnd {
                    netns: None,
                    addr: Ipv4Addr::new(127, 0, 0, last),
                    host: host.into(),
                })
                .collect(),
            procs,
            size: 4096,
            rounds,
            tag_every,
            run_id: 3,
            port: 47_021,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn kinds_pairs_and_sequences() {
        let s = spec(
            &[(1, "host-a"), (2, "host-b"), (3, "host-a"), (3, "host-a")],
            2,
            1,
            1,
        );
        assert_eq!(s.hosts(), 2);
        assert_eq!(s.path_kind(0, 1), "cross host");
        assert_eq!(s.path_kind(0, 2), "same host");
        assert_eq!(
            s.path_kind(2, 3),
            "same pod",
            "host networking shares an address"
        );
        assert_eq!(s.pods_of(s.pair(3, 1)), (3, 1));
        let mut seqs: Vec<u32> = (0..3)
            .flat_map(|r| [(0, 2), (0, 3), (1, 2), (1, 3)].map(|(f, t)| s.seq(r, f, t)))
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), 12, "one sequence per message of a pod pair");
    }

    /// Three pods, one sharing another's address (host networking), over loopback: every round
    /// completes and every message of the tagged rounds is stamped at both ends.
    #[tokio::test]
    async fn rounds_complete_on_loopback() {
        let s = spec(&[(1, "a"), (2, "a"), (2, "a")], 2, 20, 4);
        let progress = Arc::new(AtomicU32::new(0));
        let out = run(&s, progress.clone()).await.expect("all-to-all");
        assert_eq!(out.rounds.len(), 20);
        assert_eq!(progress.load(Ordering::Relaxed), 20);
        // 5 tagged rounds, 6 processes sending to 5 others each.
        assert_eq!(out.stamps.len(), 5 * 6 * 5);
        assert!(out.stamps.iter().all(|s| s.recv_ns > s.send_ns));
    }
}
