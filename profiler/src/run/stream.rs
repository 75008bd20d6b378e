//! A one-way stream from the client to the server, UDP or TCP, of fixed-size messages, with one
//! message in `tag_every` tagged: throughput is measured at the receiver, and the tagged
//! messages, stamped by both ends like ping-pong's, give the per-hop latency under load.
//!
//! Blocking sockets on threads of their own, one send or receive call per message (as iperf3
//! does), so the stream runs as fast as a plain sender would. The sender is pinned to the first
//! CPU and the receiver to the second (as `iperf3 -A 0,1`): left to the scheduler, the
//! receiver is often woken onto the sender's CPU (a socket's wakeup is a sync one), which
//! halves the stream on two CPUs, run by run at random.
//! Untagged messages are filled with 0xa5 bytes, which never read as the tag's magic.
//!
//! TCP has no message boundaries, but the kernel finds a tag only at the start of a segment's
//! payload. So the message before a tagged one is written with MSG_EOR: the kernel then
//! appends no later write to its buffer, and the tagged message starts a buffer of its own,
//! which TSO/GSO may split but never starts elsewhere. The receiver knows where the tagged
//! messages start in the byte stream (every `tag_every`-th message) and stamps the read that
//! completes a tag.

use std::{
    io::{ErrorKind, Read as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::{
    sched::{sched_setaffinity, CpuSet},
    sys::socket::{send, MsgFlags},
    unistd::Pid,
};
use profiler_common::{Tag, DIR_REQUEST, TAG_LEN, TAG_MAGIC};

use super::traffic::{Endpoints, Proto, Stamp, MAX_SIZE, MAX_UDP_SIZE, MIN_SIZE};
use crate::{kernel::monotonic_ns, lab::netns, report::schema::StreamResult};

/// Default `--tag-every`: at a million messages per second, a thousand tagged ones, about 15000
/// events a second on a bridge path, far below what the ring buffer drains.
pub const DEFAULT_TAG_EVERY: u32 = 1000;
/// The receiver gives up this long after the last message.
const IDLE: Duration = Duration::from_millis(500);
const FILLER: u8 = 0xa5;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StreamSpec {
    pub proto: Proto,
    pub size: usize,
    pub duration: Duration,
    /// 0: nothing tagged.
    pub tag_every: u32,
    pub run_id: u32,
    pub port: u16,
}

impl StreamSpec {
    pub fn validate(&self) -> Result<()> {
        let max = match self.proto {
            Proto::Udp => MAX_UDP_SIZE,
            Proto::Tcp => MAX_SIZE,
        };
        if !(MIN_SIZE..=max).contains(&self.size) {
            bail!(
                "--size of a {:?} stream must be between {MIN_SIZE} and {max} bytes, got {}",
                self.proto,
                self.size
            );
        }
        Ok(())
    }

    fn tagged(&self, message: u64) -> Option<u32> {
        let every = u64::from(self.tag_every);
        (every != 0 && message % every == every - 1).then(|| (message / every) as u32)
    }
}

/// What the receiver counted, and both ends' stamps of the tagged messages.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct StreamOutcome {
    pub sent: u64,
    pub received: u64,
    pub bytes: u64,
    /// First to last byte received.
    pub elapsed: Duration,
    /// The sender's time, from its first message to its last.
    pub send_elapsed: Duration,
    pub stamps: Vec<Stamp>,
}

impl StreamOutcome {
    pub fn result(&self, spec: &StreamSpec) -> StreamResult {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        StreamResult {
            proto: spec.proto,
            size: spec.size,
            duration_s: self.elapsed.as_secs_f64(),
            bytes: self.bytes,
            messages: self.received,
            gbit_per_s: self.bytes as f64 * 8.0 / secs / 1e9,
            sent_gbit_per_s: (self.sent * spec.size as u64) as f64 * 8.0
                / self.send_elapsed.as_secs_f64().max(1e-9)
                / 1e9,
            messages_per_s: self.received as f64 / secs,
            lost_messages: (spec.proto == Proto::Udp)
                .then(|| self.sent.saturating_sub(self.received)),
            tag_every: spec.tag_every,
            tagged: self.stamps.len() as u64,
            unprofiled_gbit_per_s: None,
            unprofiled_sent_gbit_per_s: None,
        }
    }
}

/// Receiver-side counts and stamps (seq, received at).
#[derive(Default)]
struct Received {
    messages: u64,
    bytes: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    stamps: Vec<(u32, u64)>,
}

impl Received {
    fn count(&mut self, bytes: usize, at: Instant) {
        self.bytes += bytes as u64;
        self.first.get_or_insert(at);
        self.last = Some(at);
    }
}

/// Runs the stream for `spec.duration`.
pub async fn run(spec: &StreamSpec, ends: &Endpoints) -> Result<StreamOutcome> {
    spec.validate()?;
    let (spec, ends) = (spec.clone(), ends.clone());
    // A thread of its own, not the runtime's blocking pool: it is pinned to a CPU.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(match spec.proto {
            Proto::Udp => run_udp(&spec, &ends),
            Proto::Tcp => run_tcp(&spec, &ends),
        });
    });
    rx.await.context("the stream's thread panicked")?
}

/// What the sender did: messages sent, the tagged ones' stamps (seq, sent at), time spent.
struct Sent {
    sent: u64,
    sends: Vec<(u32, u64)>,
    elapsed: Duration,
}

/// Joins the sender's stamps with the receiver's.
fn outcome(
    Sent {
        sent,
        sends,
        elapsed: send_elapsed,
    }: Sent,
    rx: Received,
) -> StreamOutcome {
    let recv: std::collections::HashMap<u32, u64> = rx.stamps.into_iter().collect();
    let stamps = sends
        .into_iter()
        .filter_map(|(seq, send_ns)| {
            recv.get(&seq).map(|&recv_ns| Stamp {
                seq,
                direction: DIR_REQUEST,
                send_ns,
                recv_ns,
            })
        })
        .collect();
    StreamOutcome {
        sent,
        received: rx.messages,
        bytes: rx.bytes,
        send_elapsed,
        elapsed: match (rx.first, rx.last) {
            (Some(f), Some(l)) => l - f,
            _ => Duration::ZERO,
        },
        stamps,
    }
}

fn message(size: usize) -> Vec<u8> {
    vec![FILLER; size]
}

fn put_tag(buf: &mut [u8], run_id: u32, seq: u32) {
    let tag = Tag {
        magic: TAG_MAGIC,
        run_id,
        seq,
        direction: DIR_REQUEST,
    };
    buf[..TAG_LEN].copy_from_slice(&tag.to_bytes());
}

fn read_tag(buf: &[u8], run_id: u32) -> Option<u32> {
    let raw: &[u8; TAG_LEN] = buf.get(..TAG_LEN)?.try_into().ok()?;
    let tag = Tag::from_bytes(raw);
    (tag.magic == TAG_MAGIC && tag.run_id == run_id).then_some(tag.seq)
}

fn run_udp(spec: &StreamSpec, ends: &Endpoints) -> Result<StreamOutcome> {
    let server_addr = SocketAddr::from((ends.server_addr, spec.port));
    let server = netns::run_in(ends.server_ns.as_deref(), || {
        let s = UdpSocket::bind(server_addr)
            .with_context(|| format!("binding the UDP receiver to {server_addr}"))?;
        s.set_read_timeout(Some(IDLE))?;
        Ok(s)
    })?;
    let client = netns::run_in(ends.client_ns.as_deref(), || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("binding the UDP sender")?;
        let dest = SocketAddr::from((ends.dest_addr, spec.port));
        s.connect(dest)
            .with_context(|| format!("connecting the UDP sender to {dest}"))?;
        Ok(s)
    })?;
    let done = Arc::new(AtomicBool::new(false));
    let run_id = spec.run_id;
    let receiver = {
        let done = done.clone();
        std::thread::spawn(move || {
            pin(RECEIVER_CPU);
            receive_udp(&server, run_id, &done)
        })
    };
    pin(SENDER_CPU);
    let sent = send_for(spec, |buf, _| match client.send(buf) {
        Ok(_) => Ok(true),
        // The device queue is full: the datagram was not sent, as iperf3 counts it.
        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(false),
        Err(e) => Err(e).context("sending a UDP datagram"),
    })?;
    done.store(true, Ordering::Relaxed);
    let rx = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the UDP receiver panicked"))??;
    Ok(outcome(sent, rx))
}

fn receive_udp(socket: &UdpSocket, run_id: u32, done: &AtomicBool) -> Result<Received> {
    let mut rx = Received::default();
    let mut buf = vec![0u8; MAX_SIZE];
    let mut ready = [libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    loop {
        // Waits for each datagram as iperf3's receiver does (select, then one read): a receiver
        // that empties the socket faster sleeps more often, and every wakeup costs the sending
        // CPU, which also carries each datagram up to this socket (veth's backlog is the
        // sender's), so the stream measured something slower than the path (0.87 of iperf3's
        // throughput on 6.18.44-fc-v1272).
        if unsafe { libc::poll(ready.as_mut_ptr(), 1, IDLE.as_millis() as i32) } == 0 {
            if done.load(Ordering::Relaxed) {
                return Ok(rx);
            }
            continue;
        }
        match socket.recv(&mut buf) {
            Ok(n) => {
                let now = Instant::now();
                if let Some(seq) = read_tag(&buf[..n], run_id) {
                    rx.stamps.push((seq, monotonic_ns()));
                }
                rx.messages += 1;
                rx.count(n, now);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if done.load(Ordering::Relaxed) {
                    return Ok(rx);
                }
            }
            Err(e) => return Err(e).context("receiving a UDP datagram"),
        }
    }
}

fn run_tcp(spec: &StreamSpec, ends: &Endpoints) -> Result<StreamOutcome> {
    let server_addr = SocketAddr::from((ends.server_addr, spec.port));
    let listener = netns::run_in(ends.server_ns.as_deref(), || {
        TcpListener::bind(server_addr)
            .with_context(|| format!("binding the TCP receiver to {server_addr}"))
    })?;
    let receiver = {
        let spec = spec.clone();
        std::thread::spawn(move || -> Result<Received> {
            pin(RECEIVER_CPU);
            let (conn, _) = listener.accept().context("accepting the stream")?;
            receive_tcp(conn, &spec)
        })
    };
    let client = netns::run_in(ends.client_ns.as_deref(), || {
        let dest = SocketAddr::from((ends.dest_addr, spec.port));
        TcpStream::connect_timeout(&dest, Duration::from_secs(5))
            .with_context(|| format!("connecting to the TCP receiver at {dest}"))
    })?;
    pin(SENDER_CPU);
    let sent = send_for(spec, |buf, sent| {
        // The message before a tagged one ends a buffer, so that the tagged one starts one.
        let flags = match spec.tagged(sent + 1) {
            Some(_) => MsgFlags::MSG_EOR,
            None => MsgFlags::empty(),
        };
        send_all(&client, buf, flags).map(|()| true)
    })?;
    drop(client);
    let rx = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the TCP receiver panicked"))??;
    Ok(outcome(sent, rx))
}

/// Sends messages of the spec's size until its duration is over, tagging the ones it follows.
/// `send` gets the message and how many were sent before it, and says whether it left (a full
/// UDP device queue refuses one).
fn send_for(spec: &StreamSpec, mut send: impl FnMut(&[u8], u64) -> Result<bool>) -> Result<Sent> {
    let mut buf = message(spec.size);
    let mut sends = Vec::new();
    let mut sent = 0u64;
    let begun = Instant::now();
    let end = begun + spec.duration;
    while Instant::now() < end {
        let seq = spec.tagged(sent);
        if let Some(seq) = seq {
            put_tag(&mut buf, spec.run_id, seq);
            sends.push((seq, monotonic_ns()));
        }
        if send(&buf, sent)? {
            sent += 1;
        } else if seq.is_some() {
            sends.pop();
        }
        if seq.is_some() {
            buf[..TAG_LEN].fill(FILLER);
        }
    }
    Ok(Sent {
        sent,
        sends,
        elapsed: begun.elapsed(),
    })
}

const SENDER_CPU: usize = 0;
const RECEIVER_CPU: usize = 1;

/// Pins the calling thread to `cpu` (modulo the CPUs there are). Best effort: a thread that
/// stays unpinned still streams.
fn pin(cpu: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut set = CpuSet::new();
    if set.set(cpu % cpus).is_ok() {
        let _ = sched_setaffinity(Pid::from_raw(0), &set);
    }
}

/// The whole of `buf`, each call with `flags`.
pub(super) fn send_all(conn: &TcpStream, mut buf: &[u8], flags: MsgFlags) -> Result<()> {
    while !buf.is_empty() {
        match send(conn.as_raw_fd(), buf, flags) {
            Ok(n) => buf = &buf[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e).context("writing to the TCP stream"),
        }
    }
    Ok(())
}

fn receive_tcp(mut conn: TcpStream, spec: &StreamSpec) -> Result<Received> {
    conn.set_read_timeout(Some(IDLE * 4))?;
    let mut rx = Received::default();
    let mut scan = TagScanner::new(spec);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the TCP stream"),
        };
        let now = Instant::now();
        rx.count(n, now);
        scan.feed(&buf[..n], monotonic_ns, &mut rx.stamps);
    }
    rx.messages = rx.bytes / spec.size as u64;
    Ok(rx)
}

/// Finds the tagged messages in a TCP byte stream, read in chunks of any size: they start at
/// known offsets, and a tag may straddle two reads.
struct TagScanner {
    run_id: u32,
    /// Bytes between two tagged messages' starts (0: none tagged).
    stride: u64,
    /// Stream offset of the next tagged message.
    next: u64,
    /// Stream offset of the next chunk.
    offset: u64,
    pending: Vec<u8>,
}

impl TagScanner {
    fn new(spec: &StreamSpec) -> TagScanner {
        let stride = u64::from(spec.tag_every) * spec.size as u64;
        TagScanner {
            run_id: spec.run_id,
            stride,
            next: stride.saturating_sub(spec.size as u64),
            offset: 0,
            pending: Vec::with_capacity(TAG_LEN),
        }
    }

    /// Stamps, with `now()`, each tag this chunk completes.
    fn feed(&mut self, chunk: &[u8], now: impl Fn() -> u64, stamps: &mut Vec<(u32, u64)>) {
        let end = self.offset + chunk.len() as u64;
        while self.stride != 0 && self.next < end {
            let from = (self.next + self.pending.len() as u64).max(self.offset);
            let to = (self.next + TAG_LEN as u64).min(end);
            let at = |o: u64| (o - self.offset) as usize;
            self.pending.extend_from_slice(&chunk[at(from)..at(to)]);
            if self.pending.len() < TAG_LEN {
                break;
            }
            if let Some(seq) = read_tag(&self.pending, self.run_id) {
                stamps.push((seq, now()));
            }
            self.pending.clear();
            self.next += self.stride;
        }
        self.offset = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: usize, tag_every: u32) -> StreamSpec {
        StreamSpec {
            proto: Proto::Tcp,
            size,
            duration: Duration::from_millis(300),
            tag_every,
            run_id: 5,
            port: 0,
        }
    }

    /// The byte stream the sender writes: `n` messages, every `tag_every`-th tagged.
    fn stream_of(spec: &StreamSpec, n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            let mut m = message(spec.size);
            if let Some(seq) = spec.tagged(i) {
                put_tag(&mut m, spec.run_id, seq);
            }
            out.extend(m);
        }
        out
    }

    #[test]
    fn tags_are_found_however_the_stream_is_cut() {
        for (size, every, chunk) in [(64, 3, 1), (64, 3, 7), (100, 1, 33), (1400, 5, 4096)] {
            let spec = spec(size, every);
            let bytes = stream_of(&spec, 40);
            let mut scan = TagScanner::new(&spec);
            let mut stamps = Vec::new();
            for c in bytes.chunks(chunk) {
                scan.feed(c, || 1, &mut stamps);
            }
            let seqs: Vec<u32> = stamps.iter().map(|s| s.0).collect();
            let expected: Vec<u32> = (0..40).filter_map(|i| spec.tagged(i)).collect();
            assert_eq!(seqs, expected, "size {size}, every {every}, chunk {chunk}");
        }
    }

    #[test]
    fn untagged_payload_never_reads_as_a_tag() {
        assert_eq!(read_tag(&message(64), 5), None);
        let s = spec(64, 0);
        assert_eq!(s.tagged(0), None);
        let mut stamps = Vec::new();
        TagScanner::new(&s).feed(&stream_of(&s, 10), || 1, &mut stamps);
        assert!(stamps.is_empty());
    }

    /// Both ends over loopback in this namespace: messages arrive, tags are stamped at both
    /// ends in order.
    #[tokio::test]
    async fn streams_on_loopback() {
        for (proto, port) in [(Proto::Udp, 47_011), (Proto::Tcp, 47_012)] {
            let spec = StreamSpec {
                proto,
                port,
                ..spec(1000, 50)
            };
            let ends = Endpoints::loopback();
            let out = run(&spec, &ends).await.expect("stream");
            assert!(out.received > 100, "{proto:?}: {out:?}");
            assert!(!out.stamps.is_empty(), "{proto:?}: no tagged message");
            assert!(out.stamps.iter().all(|s| s.recv_ns > s.send_ns));
            let r = out.result(&spec);
            assert!(r.gbit_per_s > 0.0 && r.tagged > 0, "{r:?}");
        }
    }
}
