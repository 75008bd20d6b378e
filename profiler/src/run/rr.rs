//! Request/response ping-pong in the style of sockperf, UDP or TCP, between a client and a
//! server each in its own network namespace: each request and its response carry the
//! exchange's tag, and both ends stamp their sends and receives.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use profiler_common::{Tag, DIR_REQUEST, DIR_RESPONSE, TAG_LEN, TAG_MAGIC};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};

use super::traffic::{Endpoints, Proto, Stamp, MAX_SIZE, MAX_UDP_SIZE, MIN_SIZE};
use crate::{kernel::monotonic_ns, lab::netns};

/// A ping-pong run: what is sent, how many times, how fast.
#[derive(Clone, Debug)]
pub struct Spec {
    pub proto: Proto,
    pub size: usize,
    pub count: u32,
    /// Requests per second; None sends the next request as soon as the response arrives.
    pub rate: Option<f64>,
    pub run_id: u32,
    pub port: u16,
    /// How long to wait for a response before counting the request as lost.
    pub timeout: Duration,
}

impl Spec {
    pub fn validate(&self) -> Result<()> {
        if !(MIN_SIZE..=MAX_SIZE).contains(&self.size) {
            return Err(crate::error::bad_input(format!(
                "--size must be between {MIN_SIZE} and {MAX_SIZE} bytes, got {}",
                self.size
            )));
        }
        if self.proto == Proto::Udp && self.size > MAX_UDP_SIZE {
            return Err(crate::error::bad_input(format!(
                "a UDP payload is at most {MAX_UDP_SIZE} bytes over IPv4, got --size {}",
                self.size
            )));
        }
        if self.count == 0 {
            return Err(crate::error::bad_input("--count must be at least 1"));
        }
        if self.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            return Err(crate::error::bad_input(
                "--rate must be a positive number of requests per second",
            ));
        }
        Ok(())
    }
}

/// Both ends' stamps of every exchange, and how many completed.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub stamps: Vec<Stamp>,
    /// Exchanges whose response arrived.
    pub completed: u32,
}
fn payload(size: usize, run_id: u32, seq: u32, direction: u32) -> Vec<u8> {
    let mut buf = vec![0xa5; size];
    buf[..TAG_LEN].copy_from_slice(
        &Tag {
            magic: TAG_MAGIC,
            run_id,
            seq,
            direction,
        }
        .to_bytes(),
    );
    buf
}

fn read_tag(buf: &[u8]) -> Option<Tag> {
    let raw: &[u8; TAG_LEN] = buf.get(..TAG_LEN)?.try_into().ok()?;
    Some(Tag::from_bytes(raw)).filter(|t| t.magic == TAG_MAGIC)
}

/// Server-side stamps: half of each exchange's timestamps come from the server.
pub type ServerLog = Arc<Mutex<Vec<(u32, u64, u64)>>>;

/// Runs `spec.count` exchanges; `progress` counts completed ones as they happen.
pub async fn run(spec: &Spec, ends: &Endpoints, progress: Arc<AtomicU32>) -> Result<Outcome> {
    spec.validate()?;
    let server_log = ServerLog::default();
    let mut outcome = match spec.proto {
        Proto::Udp => run_udp(spec, ends, server_log.clone(), &progress).await?,
        Proto::Tcp => run_tcp(spec, ends, server_log.clone(), &progress).await?,
    };
    if !ends.remote_server {
        let log = server_log.lock().expect("server log lock").clone();
        apply_server_log(&mut outcome, &log);
    }
    Ok(outcome)
}

/// Completes the stamps with the server's (seq, request received, response sent), and keeps
/// only the exchanges with all four.
pub fn apply_server_log(outcome: &mut Outcome, server_log: &[(u32, u64, u64)]) {
    let log: HashMap<u32, (u64, u64)> = server_log
        .iter()
        .map(|&(seq, recv, send)| (seq, (recv, send)))
        .collect();
    for stamp in &mut outcome.stamps {
        if let Some(&(recv_ns, send_ns)) = log.get(&stamp.seq) {
            match stamp.direction {
                DIR_REQUEST => stamp.recv_ns = recv_ns,
                _ => stamp.send_ns = send_ns,
            }
        }
    }
    outcome.stamps.retain(|s| s.send_ns != 0 && s.recv_ns != 0);
}

/// The client's half of an outcome from its (seq, request sent, response received) stamps,
/// one per completed exchange (a client that ran elsewhere: a guest's agent).
pub fn client_outcome(stamps: &[(u32, u64, u64)]) -> Outcome {
    let mut out = Outcome::default();
    for &(seq, sent, recv) in stamps {
        record(&mut out, seq, sent, recv);
    }
    out
}

async fn pace(spec: &Spec, started: tokio::time::Instant, i: u32) {
    if let Some(rate) = spec.rate {
        tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / rate)).await;
    }
}

/// Records a completed exchange: the client's half of both directions.
fn record(out: &mut Outcome, seq: u32, req_sent: u64, resp_recv: u64) {
    out.stamps.push(Stamp {
        seq,
        direction: DIR_REQUEST,
        send_ns: req_sent,
        recv_ns: 0,
    });
    out.stamps.push(Stamp {
        seq,
        direction: DIR_RESPONSE,
        send_ns: 0,
        recv_ns: resp_recv,
    });
    out.completed += 1;
}

async fn run_udp(
    spec: &Spec,
    ends: &Endpoints,
    log: ServerLog,
    progress: &AtomicU32,
) -> Result<Outcome> {
    let dest = SocketAddr::from((ends.dest_addr, spec.port));
    let server_task = match ends.remote_server {
        true => None,
        false => Some(spawn_udp_server(spec, ends, log)?),
    };
    let client = netns::run_in(ends.client_ns.as_deref(), || {
        let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .context("binding the UDP client")?;
        s.connect(dest)
            .with_context(|| format!("connecting the UDP client to {dest}"))?;
        Ok(s)
    })?;
    let client = UdpSocket::from_std(nonblocking_udp(client)?)?;
    let (size, run_id) = (spec.size, spec.run_id);
    let mut out = Outcome::default();
    let mut buf = vec![0u8; MAX_SIZE];
    let started = tokio::time::Instant::now();
    for seq in 0..spec.count {
        pace(spec, started, seq).await;
        let req = payload(size, run_id, seq, DIR_REQUEST);
        let sent = monotonic_ns();
        client.send(&req).await.context("sending a UDP request")?;
        let deadline = tokio::time::Instant::now() + spec.timeout;
        // Late responses to earlier requests are skipped; a lost one just times out.
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, client.recv(&mut buf)).await {
            let recv = monotonic_ns();
            if read_tag(&buf[..n]).is_some_and(|t| t.seq == seq && t.run_id == run_id) {
                record(&mut out, seq, sent, recv);
                progress.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    if let Some(t) = server_task {
        t.abort();
    }
    Ok(out)
}

/// The UDP echo server of `spec`, bound in the server's namespace, answering until aborted.
fn spawn_udp_server(
    spec: &Spec,
    ends: &Endpoints,
    log: ServerLog,
) -> Result<tokio::task::JoinHandle<()>> {
    let addr = SocketAddr::from((ends.server_addr, spec.port));
    let server = udp_server(ends.server_ns.as_deref(), addr)?;
    let (size, run_id) = (spec.size, spec.run_id);
    Ok(tokio::spawn(serve_udp(server, size, log, move |id| {
        (id == run_id).then_some(true)
    })))
}

/// A nonblocking UDP socket bound to `addr` in namespace `ns`.
pub fn udp_server(ns: Option<&str>, addr: SocketAddr) -> Result<UdpSocket> {
    let server = netns::run_in(ns, || {
        std::net::UdpSocket::bind(addr).with_context(|| format!("binding the UDP server to {addr}"))
    })?;
    Ok(UdpSocket::from_std(nonblocking_udp(server)?)?)
}

/// Answers every tagged request whose run id `accept` takes (Some(log it)) with a `size`-byte
/// response of the same run id, and logs (seq, received, sent) of those it says to.
pub async fn serve_udp(
    server: UdpSocket,
    size: usize,
    log: ServerLog,
    accept: impl Fn(u32) -> Option<bool>,
) {
    let mut buf = vec![0u8; MAX_SIZE];
    loop {
        let Ok((n, peer)) = server.recv_from(&mut buf).await else {
            return;
        };
        let Some(resp) = answer(&buf[..n], size, &log, &accept) else {
            continue;
        };
        if server.send_to(&resp, peer).await.is_err() {
            return;
        }
    }
}

/// The `size`-byte response to a request just received, if it is tagged and `accept` takes its
/// run id; logs (seq, received, sent) when `accept` says so, before the response is sent (the
/// client may stop the server as soon as it lands).
fn answer(
    request: &[u8],
    size: usize,
    log: &ServerLog,
    accept: impl Fn(u32) -> Option<bool>,
) -> Option<Vec<u8>> {
    let recv_ns = monotonic_ns();
    let tag = read_tag(request)?;
    let logged = accept(tag.run_id)?;
    let resp = payload(size, tag.run_id, tag.seq, DIR_RESPONSE);
    if logged {
        let send_ns = monotonic_ns();
        (log.lock().expect("server log lock")).push((tag.seq, recv_ns, send_ns));
    }
    Some(resp)
}

fn nonblocking_udp(s: std::net::UdpSocket) -> Result<std::net::UdpSocket> {
    s.set_nonblocking(true)?;
    Ok(s)
}

async fn run_tcp(
    spec: &Spec,
    ends: &Endpoints,
    log: ServerLog,
    progress: &AtomicU32,
) -> Result<Outcome> {
    let server_task = match ends.remote_server {
        true => None,
        false => {
            let addr = SocketAddr::from((ends.server_addr, spec.port));
            let listener = tcp_server(ends.server_ns.as_deref(), addr)?;
            let run_id = spec.run_id;
            Some(tokio::spawn(serve_tcp(
                listener,
                spec.size,
                log,
                move |id| (id == run_id).then_some(true),
            )))
        }
    };
    let dest = SocketAddr::from((ends.dest_addr, spec.port));
    let client = netns::run_in(ends.client_ns.as_deref(), || {
        let s = std::net::TcpStream::connect_timeout(&dest, Duration::from_secs(5))
            .with_context(|| format!("connecting to the TCP server at {dest}"))?;
        s.set_nonblocking(true)?;
        Ok(s)
    })?;
    let mut client = TcpStream::from_std(client)?;
    client.set_nodelay(true)?;
    let (size, run_id) = (spec.size, spec.run_id);
    let mut out = Outcome::default();
    let mut buf = vec![0u8; size];
    let started = tokio::time::Instant::now();
    for seq in 0..spec.count {
        pace(spec, started, seq).await;
        let req = payload(size, run_id, seq, DIR_REQUEST);
        let sent = monotonic_ns();
        client
            .write_all(&req)
            .await
            .context("sending a TCP request")?;
        tokio::time::timeout(spec.timeout, client.read_exact(&mut buf))
            .await
            .context("the TCP server did not answer in time")?
            .context("reading a TCP response")?;
        let recv = monotonic_ns();
        record(&mut out, seq, sent, recv);
        progress.fetch_add(1, Ordering::Relaxed);
    }
    drop(client);
    if let Some(t) = server_task {
        t.abort();
    }
    Ok(out)
}

/// A nonblocking TCP listener bound to `addr` in namespace `ns`.
pub fn tcp_server(ns: Option<&str>, addr: SocketAddr) -> Result<TcpListener> {
    let listener = netns::run_in(ns, || {
        let l = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding the TCP server to {addr}"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })?;
    Ok(TcpListener::from_std(listener)?)
}

/// Serves one connection after the other (a warm-up's, then the run's), as [`serve_udp`]
/// answers datagrams: every `size`-byte tagged request whose run id `accept` takes is answered
/// with a response of the same run id, and logged when it says so.
pub async fn serve_tcp(
    listener: TcpListener,
    size: usize,
    log: ServerLog,
    accept: impl Fn(u32) -> Option<bool>,
) {
    while let Ok((mut conn, _)) = listener.accept().await {
        let _ = conn.set_nodelay(true);
        let mut buf = vec![0u8; size];
        while conn.read_exact(&mut buf).await.is_ok() {
            let Some(resp) = answer(&buf, size, &log, &accept) else {
                break;
            };
            if conn.write_all(&resp).await.is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_carries_a_readable_tag() {
        let p = payload(64, 7, 42, DIR_RESPONSE);
        assert_eq!(p.len(), 64);
        assert_eq!(
            read_tag(&p),
            Some(Tag {
                magic: TAG_MAGIC,
                run_id: 7,
                seq: 42,
                direction: DIR_RESPONSE
            })
        );
        assert_eq!(read_tag(&p[..8]), None);
        assert_eq!(read_tag(&[0u8; 32]), None);
    }

    #[test]
    fn rejects_bad_specs() {
        let ok = Spec {
            proto: Proto::Udp,
            size: 64,
            count: 1,
            rate: None,
            run_id: 1,
            port: 1,
            timeout: Duration::from_secs(1),
        };
        assert!(ok.validate().is_ok());
        assert!(Spec {
            size: 8,
            ..ok.clone()
        }
        .validate()
        .is_err());
        assert!(
            Spec {
                size: MAX_SIZE,
                ..ok.clone()
            }
            .validate()
            .is_err(),
            "too big for UDP"
        );
        assert!(Spec {
            size: MAX_SIZE,
            proto: Proto::Tcp,
            ..ok.clone()
        }
        .validate()
        .is_ok());
        assert!(Spec {
            count: 0,
            ..ok.clone()
        }
        .validate()
        .is_err());
        assert!(Spec {
            rate: Some(-1.0),
            ..ok
        }
        .validate()
        .is_err());
    }

    /// Both ends in this process's namespace over loopback: the stamps come back complete.
    #[tokio::test]
    async fn udp_and_tcp_ping_pong_on_loopback() {
        for (proto, port) in [(Proto::Udp, 47_001), (Proto::Tcp, 47_002)] {
            let spec = Spec {
                proto,
                size: 1400,
                count: 20,
                rate: None,
                run_id: 9,
                port,
                timeout: Duration::from_secs(2),
            };
            let ends = Endpoints::loopback();
            let progress = Arc::new(AtomicU32::new(0));
            let out = run(&spec, &ends, progress.clone()).await.expect("run");
            assert_eq!(out.completed, 20, "{proto:?}");
            assert_eq!(progress.load(Ordering::Relaxed), 20);
            assert_eq!(out.stamps.len(), 40);
            assert!(
                out.stamps.iter().all(|s| s.recv_ns > s.send_ns),
                "{proto:?}: {:?}",
                out.stamps[0]
            );
        }
    }
}
