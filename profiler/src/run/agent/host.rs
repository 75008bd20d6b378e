//! The host's side: finding a guest's agent and speaking to it for a run.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context as _, Result};

use tokio::io::AsyncWriteExt as _;

use super::{Answer, Client, Done, Request, Start};

use crate::{
    cluster::{
        channel::{self, Reader, Writer, MAX_ANSWER},
        tls::Identity,
    },
    lab::{
        names::NODE_SEP,
        nested::{Inventory, SetupAnswer, SetupRequest},
        target::{AgentAt, GuestEnd},
    },
    report::schema::{HookSet, HookStatus},
};

/// The agent's programs load under TCG in minutes on 6.1 with deep hooks.
const START_TIMEOUT: Duration = Duration::from_secs(900);
const STOP_TIMEOUT: Duration = Duration::from_secs(300);
/// A guest's setup runs a few `ip` commands; over TCP it only lists the namespaces.
const SETUP_TIMEOUT: Duration = Duration::from_secs(300);

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
