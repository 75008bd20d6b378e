//! The agent's TCP side on a real socket: mutual TLS under the cluster's CA, refusals in one
//! line at both ends, one host at a time. The agent runs in a namespace of the test's own and
//! listens on its loopback, so nothing leaves it.
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

mod common;

use std::{
    io::Read as _,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{
    agent::{certs, Agent, Scratch},
    assert_clean, BIN,
};

const NETNS: &str = "prof-agent-tls";
const ADDR: &str = "127.0.0.1:7450";

/// `profiler run` toward the agent, from inside NETNS, as a host would: the namespace it asks
/// for does not exist, so a run that got through TLS ends with the agent's inventory.
fn run_toward_agent(security: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", NETNS, BIN, "run", "--from", "(root)"])
        .args(["--to", "vm1:no-such-ns:10.0.0.2", "--agent", ADDR])
        .args(security)
        .output()
        .expect("running the profiler")
}

/// Fails in one line of stderr containing `want`.
fn one_line_error(out: &Output, want: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "succeeded: {err}");
    assert!(err.contains(want), "wanted {want:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// openssl's TLS client toward the agent (a client that is not the profiler), its standard
/// input kept open so that it holds its session.
fn openssl_client(args: &[&str]) -> Child {
    Command::new("ip")
        .args([
            "netns", "exec", NETNS, "openssl", "s_client", "-quiet", "-tls1_3",
        ])
        .args(["-connect", ADDR])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client")
}

#[test]
fn the_agents_tcp_side_takes_only_its_clusters_hosts_one_at_a_time() {
    let scratch = Scratch::new("agent");
    let root = scratch.0.clone();
    let ours = certs(&root, "ours", "host,vm1");
    let theirs = certs(&root, "theirs", "host,vm1");
    let tls = ours.to_str().unwrap();

    // Listening in the clear must be asked for.
    let out = Command::new(BIN)
        .args(["agent", "--listen", ADDR])
        .output()
        .unwrap();
    one_line_error(&out, "--listen needs --tls DIR");
    assert_eq!(
        out.status.code(),
        Some(profiler::cli::exit::BAD_INPUT.into())
    );
    // And so must speaking in the clear.
    let out = Command::new(BIN)
        .args([
            "run",
            "--from",
            "(root)",
            "--to",
            "vm1:pod-b:10.0.0.2",
            "--agent",
            ADDR,
        ])
        .output()
        .unwrap();
    one_line_error(&out, "--agent needs --tls DIR");
    assert_eq!(
        out.status.code(),
        Some(profiler::cli::exit::BAD_INPUT.into())
    );

    let agent = Agent::start(&root, Some(NETNS), ADDR, &["--tls", tls, "--node", "vm1"]);

    // A host of the cluster: through TLS to the agent's inventory.
    let err = one_line_error(
        &run_toward_agent(&["--tls", tls]),
        "has no namespace no-such-ns",
    );
    println!("our host: {err}");
    agent.wait_for("connected", 1);

    // Another cluster's host: refused at both ends.
    let err = one_line_error(
        &run_toward_agent(&["--tls", theirs.to_str().unwrap()]),
        "UnknownIssuer",
    );
    println!("another cluster's host: {err}");
    agent.wait_for("refused", 1);

    // A host that speaks in the clear: the agent refuses it, with a TLS alert it recognises.
    let err = one_line_error(
        &run_toward_agent(&["--insecure"]),
        "speaks TLS: connect with --tls DIR",
    );
    println!("a host in the clear: {err}");
    agent.wait_for("refused", 2);

    // A TLS client without a certificate.
    let mut anonymous = openssl_client(&["-CAfile", &format!("{tls}/ca.pem")]);
    agent.wait_for("refused", 3);
    drop(anonymous.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(20);
    while anonymous.try_wait().expect("openssl").is_none() {
        if Instant::now() > deadline {
            // Ours, by pid.
            unsafe { libc::kill(anonymous.id() as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut said = String::new();
    anonymous
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    println!("openssl without a certificate: {}", said.trim());
    assert!(said.contains("alert"), "openssl: {said}");

    // One host at a time: while openssl holds a session with our host's certificate, a run is
    // told the agent is busy, and once it has gone the next is served.
    let mut holder = openssl_client(&[
        "-CAfile",
        &format!("{tls}/ca.pem"),
        "-cert",
        &format!("{tls}/host.pem"),
        "-key",
        &format!("{tls}/host.key"),
        "-verify_hostname",
        "vm1",
    ]);
    agent.wait_for("connected", 2);
    let err = one_line_error(&run_toward_agent(&["--tls", tls]), "busy: serving host");
    println!("while another host is served: {err}");
    // Ours, by pid.
    unsafe { libc::kill(holder.id() as i32, libc::SIGTERM) };
    let _ = holder.wait();
    agent.wait_for("gone", 2);
    one_line_error(
        &run_toward_agent(&["--tls", tls]),
        "has no namespace no-such-ns",
    );

    let log = agent.log();
    println!("agent:\n{log}");
    for line in log.lines().filter(|l| l.contains("refused")) {
        assert!(line.starts_with("agent vm1: refused 127.0.0.1:"), "{line}");
    }
    agent.stop();
    drop(scratch);
    assert!(!root.exists());
    assert!(!Path::new("/run/netns").join(NETNS).exists());
    assert_clean();
}
