//! Driving `profiler attach` (attach.rs, attach_ground_truth.rs): the process, the labs it
//! watches, its report, and traffic of the tests' own that it follows.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use profiler::{
    lab::{netns::run_in, Lab},
    report::schema::{
        AttachReport, LinkDirection, SegmentSummary, Status, WireCrossing, ATTACH_SCHEMA,
    },
};
use serde_json::Value;

use super::{LabGuard, BIN};

/// A running `profiler attach`, started once it reports that it follows.
pub struct Attach {
    pub child: Child,
    pub stderr: JoinHandle<String>,
}

impl Attach {
    pub fn start(args: &[&str]) -> Attach {
        Attach::start_within(args, Duration::from_secs(30))
    }

    /// As `start`, waiting up to `wait` for this node to follow (`--lab`: after its guests).
    pub fn start_within(args: &[&str], wait: Duration) -> Attach {
        let mut child = Command::new(BIN)
            .arg("attach")
            .args(args)
            // A safety net: a test that panics before stopping it leaves it running this long.
            .args(["--duration", "120"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning profiler attach");
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.starts_with("attach: following;") {
                    let _ = tx.send(());
                }
                all += &line;
                all.push('\n');
            }
            all
        });
        let started = rx.recv_timeout(wait);
        let a = Attach { child, stderr };
        if started.is_err() {
            let (_, err) = a.stop();
            panic!("profiler attach {args:?} did not start: {err}");
        }
        a
    }

    /// SIGINT, the usual way to end an attach: it reports and exits 0.
    pub fn stop(mut self) -> (String, String) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let status = self.child.wait().expect("wait");
        let err = self.stderr.join().unwrap();
        assert!(status.success(), "attach exited with {status}: {err}");
        (out, err)
    }
}

/// A lab that is up, as `profiler lab list` describes it, taken down when the test ends.
pub struct LabUp {
    pub info: Lab,
    _down: LabGuard,
}

pub fn lab_up(args: &[&str]) -> LabUp {
    let guard = super::lab_up(args);
    LabUp {
        info: super::lab_info(&guard.0),
        _down: guard,
    }
}

/// The `profiler.attach.v1` report attach wrote, which lost no event.
pub fn report(json_path: &std::path::Path) -> AttachReport {
    let text = std::fs::read_to_string(json_path).expect("the attach report");
    let r: AttachReport = serde_json::from_str(&text).expect("profiler.attach.v1 JSON");
    assert_eq!(r.schema, ATTACH_SCHEMA);
    assert_eq!(r.lost_events, 0, "events lost: {:?}", r.journeys);
    // raw_tp is the fallback for kernels without tp_btf: on a kernel with BTF, a stable hook
    // attached as raw_tp means the verifier refused the tp_btf program (each load then costs a
    // helper call), which no other check would notice.
    if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        const STABLE: [&str; 7] = [
            "net_dev_queue",
            "net_dev_start_xmit",
            "netif_rx",
            "napi_gro_receive_entry",
            "netif_receive_skb",
            "kfree_skb",
            "consume_skb",
        ];
        for h in &r.hooks {
            let stable = STABLE.contains(&h.name.as_str());
            if stable && h.status == Status::Attached && h.kind == "raw_tp" {
                panic!("{} attached as raw_tp: {:?}", h.name, h.reason);
            }
        }
    }
    r
}

/// The names of attach segments `segments`, in order.
pub fn segment_names(segments: &[SegmentSummary]) -> Vec<&str> {
    segments.iter().map(|s| s.name.as_str()).collect()
}

pub fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "profiler-attach-test-{}-{name}",
        std::process::id()
    ))
}

/// `count` pings from `netns` to `to`, `interval` seconds apart: each reply's round trip.
pub fn ping(netns: &str, to: &str, count: u32, interval: &str) -> Vec<Duration> {
    let n = count.to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ping", "-c", &n, "-i", interval, to])
        .output()
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping: {text}");
    // "64 bytes from ...: icmp_seq=1 ttl=64 time=0.045 ms"
    text.lines()
        .filter_map(|l| l.split("time=").nth(1)?.strip_suffix(" ms")?.parse().ok())
        .map(|ms: f64| Duration::from_secs_f64(ms / 1000.0))
        .collect()
}

/// Waits until `slot` (one exchange every `period`, from `start`); no wait for a zero period.
fn pace(start: Instant, period: Duration, slot: u32) {
    let at = start + period * slot;
    if let Some(wait) = at.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
}

/// `count` exchanges, one every `period`: each one's round trip.
fn round_trips(count: u32, period: Duration, mut exchange: impl FnMut()) -> Vec<Duration> {
    let start = Instant::now();
    (0..count)
        .map(|i| {
            pace(start, period, i);
            let sent = Instant::now();
            exchange();
            sent.elapsed()
        })
        .collect()
}

/// UDP request/response traffic of the test's own, untagged: `count` exchanges of `size` bytes
/// from `client_ns` to `server`:`port` in `server_ns`, one every `period`. Each round trip.
pub fn udp_echo(
    pods: (&str, &str),
    server: &str,
    port: u16,
    count: u32,
    size: usize,
    period: Duration,
) -> Vec<Duration> {
    udp_echo_via(pods, (server, server), port, count, size, period)
}

/// `udp_echo` to `server` through address `via` (a Service's, which a NAT sends on to it).
pub fn udp_echo_via(
    (client_ns, server_ns): (&str, &str),
    (server, via): (&str, &str),
    port: u16,
    count: u32,
    size: usize,
    period: Duration,
) -> Vec<Duration> {
    let bound: SocketAddr = format!("{server}:{port}").parse().unwrap();
    let addr: SocketAddr = format!("{via}:{port}").parse().unwrap();
    let srv = run_in(Some(server_ns), || Ok(UdpSocket::bind(bound)?)).unwrap();
    let cli = run_in(Some(client_ns), || Ok(UdpSocket::bind("0.0.0.0:0")?)).unwrap();
    srv.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    cli.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut served = 0;
        while served < count {
            match srv.recv_from(&mut buf) {
                Ok((n, from)) => {
                    srv.send_to(&buf[..n], from).unwrap();
                    served += 1;
                }
                Err(_) => break,
            }
        }
    });
    let payload = vec![0x55u8; size];
    let mut buf = [0u8; 2048];
    let rtts = round_trips(count, period, || {
        cli.send_to(&payload, addr).unwrap();
        cli.recv(&mut buf).expect("the echo's response");
    });
    echo.join().unwrap();
    rtts
}

/// The same over one TCP connection (TCP_NODELAY): `count` requests of `size` bytes, each
/// echoed whole before the next, one every `period`. Each round trip.
pub fn tcp_echo(
    pods: (&str, &str),
    server: &str,
    port: u16,
    count: u32,
    size: usize,
    period: Duration,
) -> Vec<Duration> {
    tcp_echo_via(pods, (server, server), port, count, size, period)
}

/// `tcp_echo` to `server` through address `via`, as `udp_echo_via`.
pub fn tcp_echo_via(
    (client_ns, server_ns): (&str, &str),
    (server, via): (&str, &str),
    port: u16,
    count: u32,
    size: usize,
    period: Duration,
) -> Vec<Duration> {
    let bound: SocketAddr = format!("{server}:{port}").parse().unwrap();
    let addr: SocketAddr = format!("{via}:{port}").parse().unwrap();
    let listener = run_in(Some(server_ns), || Ok(TcpListener::bind(bound)?)).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accepting the client");
        conn.set_nodelay(true).unwrap();
        let mut buf = vec![0u8; size];
        for _ in 0..count {
            conn.read_exact(&mut buf).expect("a request");
            conn.write_all(&buf).expect("the response");
        }
    });
    let mut cli = run_in(Some(client_ns), || {
        Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(2))?)
    })
    .expect("connecting to the echo server");
    cli.set_nodelay(true).unwrap();
    cli.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let payload = vec![0x55u8; size];
    let mut buf = vec![0u8; size];
    let rtts = round_trips(count, period, || {
        cli.write_all(&payload).unwrap();
        cli.read_exact(&mut buf).expect("the echo's response");
    });
    drop(cli);
    echo.join().unwrap();
    rtts
}

/// Sends one UDP datagram `times` times, byte for byte, from `from`'s eth0 to `to`'s (their
/// addresses `addrs`) through a packet socket: packets alike in everything on the wire, as a
/// duplicated frame is. A socket bound in `to` takes them, so no ICMP answer adds traffic.
pub fn identical_datagrams((from, to): (&str, &str), addrs: [[u8; 4]; 2], port: u16, times: usize) {
    let mac = |ns: &str| -> [u8; 6] {
        let out = Command::new("ip")
            .args(["-n", ns, "-j", "link", "show", "eth0"])
            .output()
            .expect("ip link");
        let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j link");
        let text = v[0]["address"]
            .as_str()
            .expect("eth0's address")
            .to_string();
        let b: Vec<u8> = text
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        b.try_into().expect("a MAC address")
    };
    let (src_mac, dst_mac) = (mac(from), mac(to));
    let payload = *b"one datagram, many times";
    let udp_len = 8 + payload.len();
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + udp_len) as u16).to_be_bytes());
    ip.extend([0, 0, 0x40, 0, 64, 17, 0, 0]); // IP ID 0, DF, TTL 64, UDP
    ip.extend(addrs[0]);
    ip.extend(addrs[1]);
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
        .sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!((sum & 0xffff) + (sum >> 16)) as u16).to_be_bytes());
    let mut frame = dst_mac.to_vec();
    frame.extend(src_mac);
    frame.extend(0x0800u16.to_be_bytes());
    frame.extend(ip);
    frame.extend(7461u16.to_be_bytes());
    frame.extend(port.to_be_bytes());
    frame.extend((udp_len as u16).to_be_bytes());
    frame.extend([0, 0]); // no checksum
    frame.extend(payload);
    let addr: SocketAddr = format!("{}:{port}", std::net::Ipv4Addr::from(addrs[1]))
        .parse()
        .unwrap();
    let sink = run_in(Some(to), || Ok(UdpSocket::bind(addr)?)).unwrap();
    run_in(Some(from), || {
        // SAFETY: a packet socket sending a frame we own, closed before returning.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "a packet socket: {}",
                std::io::Error::last_os_error()
            );
            let mut to: libc::sockaddr_ll = std::mem::zeroed();
            to.sll_family = libc::AF_PACKET as u16;
            to.sll_ifindex = libc::if_nametoindex(c"eth0".as_ptr()) as i32;
            to.sll_halen = 6;
            to.sll_addr[..6].copy_from_slice(&dst_mac);
            for _ in 0..times {
                let sent = libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(
                    sent,
                    frame.len() as isize,
                    "{}",
                    std::io::Error::last_os_error()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            libc::close(fd);
        }
        Ok(())
    })
    .unwrap();
    let mut buf = [0u8; 64];
    sink.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    for _ in 0..times {
        sink.recv(&mut buf).expect("each copy delivered");
    }
}

/// The way across drawn for crossing `c` of link direction `d`: the leaving node's segments up to
/// the wire, the wire counting the crossing's packets, the entering node's segments on, each
/// side adding at least one, all one chain of hops.
pub fn assert_way_across(d: &LinkDirection, c: &WireCrossing) {
    let way = (d.paths.iter())
        .find(|p| {
            (p.segments.iter())
                .any(|s| s.name == "wire" && c.from.ends_with(&s.from) && c.to.ends_with(&s.to))
        })
        .unwrap_or_else(|| panic!("no way across for {c:?}: {d:?}"));
    let wire = way.segments.iter().position(|s| s.name == "wire").unwrap();
    assert!(
        0 < wire && wire + 1 < way.segments.len(),
        "each node adds its part: {way:?}"
    );
    assert_eq!(way.segments[wire].packets, c.packets, "{way:?}");
    for (k, s) in way.segments.iter().enumerate() {
        let nodes = match k.cmp(&wire) {
            std::cmp::Ordering::Less => (&d.from_node, &d.from_node),
            std::cmp::Ordering::Equal => (&d.from_node, &d.to_node),
            std::cmp::Ordering::Greater => (&d.to_node, &d.to_node),
        };
        assert_eq!((&s.from_node, &s.to_node), nodes, "{way:?}");
        assert!(s.packets > 0 && s.p50_ns > 0.0, "{way:?}");
    }
    for w in way.segments.windows(2) {
        assert_eq!(w[0].to, w[1].from, "one chain of hops: {way:?}");
    }
}

/// The packets of the paths in attach report `r` that cross segment `name`.
pub fn crossing(r: &AttachReport, name: &str) -> u64 {
    (r.paths.iter())
        .filter(|p| p.segments.iter().any(|s| s.name == name))
        .map(|p| p.packets)
        .sum()
}
