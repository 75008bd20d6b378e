//! TCP traffic for the overhead benchmark, run inside lab namespaces (`ip netns exec NS xtask
//! net-peer ...`): a server, a bulk stream that reports its throughput, and a request/response
//! loop that reports its latency. Plain std sockets, so nothing outside the workspace is needed.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// Bytes of one request or response.
const RR_SIZE: usize = 64;
const STREAM_CHUNK: usize = 128 * 1024;

/// Serves connections one after the other: the first byte says what the client wants.
pub fn serve(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
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

/// Asks the server to exit.
pub fn quit(addr: SocketAddr) -> Result<()> {
    connect(addr, b'Q').map(drop)
}
