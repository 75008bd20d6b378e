//! Traffic for the overhead benchmark, run inside lab namespaces (`ip netns exec NS xtask
//! net-peer ...`): a server, a TCP bulk stream that reports its throughput, a TCP
//! request/response loop that reports its latency, and paced small UDP datagrams (the events
//! pipeline's load). Plain std sockets, so nothing outside the workspace is needed.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// Bytes of one request or response.
const RR_SIZE: usize = 64;
const STREAM_CHUNK: usize = 128 * 1024;

/// Serves connections one after the other: the first byte says what the client wants. UDP
/// datagrams to the same address are read and dropped.
pub fn serve(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let udp = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while udp.recv(&mut buf).is_ok() {}
    });
    for conn in listener.incoming() {
        let mut conn = conn?;
        conn.set_nodelay(true)?;
        let mut mode = [0u8; 1];
        if conn.read_exact(&mut mode).is_err() {
            continue;
        }
        let _ = match mode[0] {
            b'S' => std::io::copy(&mut conn, &mut std::io::sink()).map(drop),
            b'R' => echo(&mut conn),
            b'Q' => return Ok(()),
            _ => Ok(()),
        };
    }
    Ok(())
}

fn echo(conn: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; RR_SIZE];
    loop {
        if conn.read_exact(&mut buf).is_err() {
            return Ok(());
        }
        conn.write_all(&buf)?;
    }
}

fn connect(addr: SocketAddr, mode: u8) -> Result<TcpStream> {
    // The server may still be starting.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut conn = loop {
        match TcpStream::connect(addr) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => bail!("connecting to {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    conn.set_nodelay(true)?;
    conn.write_all(&[mode])?;
    Ok(conn)
}

/// Sends for `seconds` and prints the throughput in Gbit/s.
pub fn stream(addr: SocketAddr, seconds: f64) -> Result<()> {
    let mut conn = connect(addr, b'S')?;
    let chunk = vec![0x5au8; STREAM_CHUNK];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        conn.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!("{:.4}", sent as f64 * 8.0 / elapsed / 1e9);
    Ok(())
}

/// Runs `count` request/response exchanges and prints the p50 latency in microseconds.
pub fn rr(addr: SocketAddr, count: usize) -> Result<()> {
    let mut conn = connect(addr, b'R')?;
    let mut buf = [0u8; RR_SIZE];
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        conn.write_all(&buf)?;
        conn.read_exact(&mut buf)?;
        times.push(t.elapsed().as_nanos() as u64);
    }
    times.sort_unstable();
    println!("{:.3}", times[times.len() / 2] as f64 / 1e3);
    Ok(())
}

/// Sends `pps` datagrams of RR_SIZE bytes a second for `seconds` from `threads` sockets (one
/// sender saturates its CPU with the path's kernel work long before the reader of events does),
/// each paced per millisecond, and prints how many were sent.
pub fn udp(addr: SocketAddr, pps: u64, seconds: f64, threads: u64) -> Result<()> {
    let threads = threads.max(1);
    let sent = std::thread::scope(|s| {
        let senders: Vec<_> = (0..threads)
            .map(|_| s.spawn(move || udp_sender(addr, pps / threads, seconds)))
            .collect();
        senders
            .into_iter()
            .map(|t| t.join().expect("a UDP sender panicked"))
            .sum::<Result<u64>>()
    })?;
    println!("{sent}");
    Ok(())
}

fn udp_sender(addr: SocketAddr, pps: u64, seconds: f64) -> Result<u64> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("binding a UDP socket")?;
    socket
        .connect(addr)
        .with_context(|| format!("connecting to {addr}"))?;
    let buf = [0x5au8; RR_SIZE];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let due = (start.elapsed().as_secs_f64() * pps as f64) as u64;
        if sent >= due {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        // A full socket buffer is the path's limit, not an error of the benchmark.
        if socket.send(&buf).is_ok() {
            sent += 1;
        }
    }
    Ok(sent)
}

/// Asks the server to exit.
pub fn quit(addr: SocketAddr) -> Result<()> {
    connect(addr, b'Q').map(drop)
}
