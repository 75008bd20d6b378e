//! Across nodes: this node and others follow their packets as attach does, each reporting
//! those that cross its wire-facing devices. The others are a nested lab's guests
//! (`attach --lab NAME`: through their agents' serial channels, the guest's tap here and its
//! eth0 there as the wire) or real nodes (`attach --peer NAME=ADDR --tls DIR`: through their
//! agents' TCP side under mutual TLS, each node's --wire devices). A packet that left one node
//! is paired with the one that entered the other by what it carries on the wire
//! (cluster/join.rs), the two clocks are related from the pairs of both directions
//! (cluster/clock.rs), and each packet's time on the wire is given on this node's clock with
//! its bound. Nothing is tagged and no clock is assumed in sync.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    attach, filter,
    link::{link, Seen},
    live,
    packets::{self, Journeys},
    stitch, wire, AttachArgs, Control,
};
use crate::{
    cluster::tls::Identity,
    kernel::programs::FollowConfig,
    lab::{
        self,
        discover::ROOT,
        nested::{self, Talk},
    },
    pods,
    report::schema::{AttachReport, HookSet, JourneyLine, SightingLine, Streamed},
    signal::{self, interruptible},
};

/// The agent's requests: `{"attach": AttachRequest}`, answered once following, and
/// `{"stop_attach": {}}`, answered with the report (run/agent/guest.rs).
pub const ATTACH: &str = "attach";
pub const STOP: &str = "stop_attach";

/// How long a node may take to load and attach its programs (6.1 under TCG verifies slowly).
const FOLLOWING_WITHIN: Duration = Duration::from_secs(900);
/// How long a node may take to answer once stopped.
const REPORT_WITHIN: Duration = Duration::from_secs(300);
/// A guest's attach that its host never stops ends after this, or at the next attach asked.
const GUEST_MAX: Duration = Duration::from_secs(86_400);
/// The NIC a lab's guest has toward its host.
const GUEST_NIC: &str = "eth0";

/// What a host asks of another node's agent: attach with these targets until told to stop.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachRequest {
    /// Pod patterns, [NAMESPACE/]NAME, resolved on that node.
    #[serde(default)]
    pub pods: Vec<String>,
    /// Namespaces as that node names them.
    pub netns: Vec<String>,
    pub wire: Vec<String>,
    pub filter: String,
    pub sample: u32,
    pub max_gap_ms: u64,
    pub max_in_flight: u32,
    pub hooks: HookSet,
    /// Send each sighting as it is read, a JSON line on the channel, instead of all of them
    /// with the report: the agent's memory stays bounded however long it follows. A peer's
    /// held connection carries them; a lab's guest's serial channel is let go meanwhile.
    #[serde(default)]
    pub stream: bool,
    /// `--mode events` on the host: a streaming node also sends its journeys as they end, so
    /// that each paired packet's journeys join across the nodes (packets.rs).
    #[serde(default)]
    pub events: bool,
}

/// A line of a streaming agent: a sighting while it follows, or its answer.
#[derive(Deserialize)]
#[serde(untagged)]
enum PeerLine {
    Sighting(SightingLine),
    Journey(JourneyLine),
    Answer(AttachAnswer),
}

/// Sightings a node's agent sent as it read them.
#[derive(Default)]
struct Received {
    /// Shared with the live join (live.rs), which reads it while the channel is read.
    seen: Arc<Mutex<Seen>>,
    /// Its journeys, where it sends them (`events`).
    journeys: Journeys,
    /// Every sighting received, kept or not, and its bytes.
    count: u64,
    bytes: u64,
    /// Past the bound (wire.rs's, for each direction), counted and not kept.
    not_kept: u64,
    before_stop: u64,
    following: Option<Instant>,
    done: Option<Instant>,
    /// What ended the channel while the host followed, or an answer that came then.
    early: Option<Result<AttachAnswer>>,
}

impl Received {
    /// The channel's next answer; the sightings before it are kept.
    async fn answer(&mut self, talk: &mut Talk, within: Duration) -> Result<AttachAnswer> {
        loop {
            let line = talk.line(within).await?;
            let parsed = serde_json::from_str(&line)
                .with_context(|| format!("the agent of {}: unreadable answer", talk.node()))?;
            match parsed {
                PeerLine::Sighting(s) => self.keep(&s, line.len() + 1),
                PeerLine::Journey(j) => self.journeys.add(j),
                PeerLine::Answer(a) => return Ok(a),
            }
        }
    }

    fn keep(&mut self, line: &SightingLine, bytes: usize) {
        self.count += 1;
        self.bytes += bytes as u64;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= 2 * wire::KEPT {
            self.not_kept += 1;
        } else {
            seen.add(line);
        }
    }

    /// What the node sent while following, if it streamed.
    fn streamed(&self) -> Option<Streamed> {
        let (Some(from), Some(to)) = (self.following, self.done) else {
            return None;
        };
        Some(Streamed {
            lines: self.count,
            bytes: self.bytes,
            seconds: to.duration_since(from).as_secs_f64(),
            lines_before_stop: self.before_stop,
        })
    }
}

/// The agent's answers: that it follows, then its report with every sighting.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachAnswer {
    Following,
    Done {
        report: Box<AttachReport>,
        sightings: Vec<SightingLine>,
    },
    Failed(String),
}

/// `--peer NAME=ADDR[,pod=P][,netns=N][,wire=W]`: a node whose agent listens at ADDR under
/// the certificate of NAME. Without targets of its own it follows this node's --pod patterns;
/// without wire devices of its own, this node's --wire names.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub name: String,
    pub addr: SocketAddr,
    pub pods: Vec<String>,
    pub netns: Vec<String>,
    pub wire: Vec<String>,
}

impl std::str::FromStr for PeerSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "give NAME=ADDR[,pod=P][,netns=N][,wire=W] (e.g. node-b=10.0.0.2:7411)";
        let mut parts = s.split(',');
        let (name, addr) = parts
            .next()
            .and_then(|p| p.split_once('='))
            .ok_or_else(|| format!("--peer {s:?}: {usage}"))?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
        {
            return Err(format!(
                "--peer {s:?}: {name:?} is not a node's name: {usage}"
            ));
        }
        let addr = addr
            .parse()
            .map_err(|_| format!("--peer {s:?}: {addr:?} is not an address: {usage}"))?;
        let mut peer = PeerSpec {
            name: name.to_string(),
            addr,
            pods: Vec::new(),
            netns: Vec::new(),
            wire: Vec::new(),
        };
        for part in parts {
            let Some((key, value)) = part.split_once('=') else {
                return Err(format!("--peer {s:?}: {part:?}: {usage}"));
            };
            let into = match key {
                "pod" => &mut peer.pods,
                "netns" => &mut peer.netns,
                "wire" => &mut peer.wire,
                _ => return Err(format!("--peer {s:?}: {part:?}: {usage}")),
            };
            if value.is_empty() {
                return Err(format!("--peer {s:?}: {part:?} is empty: {usage}"));
            }
            if key == "pod" {
                value.parse::<pods::Pattern>()?;
            }
            into.push(value.to_string());
        }
        Ok(peer)
    }
}

/// Another node's attach as its agent runs it, driven by `control`; `node` names it.
pub fn guest_args(r: AttachRequest, node: &str, control: Control) -> Result<AttachArgs> {
    let pods = r
        .pods
        .iter()
        .map(|p| p.parse().map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    Ok(AttachArgs {
        node: Some(node.to_string()),
        pods,
        pod_sources: pods::Sources {
            cri_socket: None,
            cni_cache: None,
        },
        netns: r.netns,
        ifaces: Vec::new(),
        cgroups: Vec::new(),
        follow: FollowConfig {
            sample: r.sample,
            max_gap_ns: r.max_gap_ms * 1_000_000,
            stream: r.events,
            filter: filter::compile(&r.filter)?,
            max_in_flight: r.max_in_flight,
            by_cgroup: false,
            wire: !r.wire.is_empty(),
        },
        filter: r.filter,
        wire: r.wire,
        sightings: None,
        keep_sightings: true,
        live: None,
        journeys: None,
        keep_journeys: None,
        traces: None,
        duration: Some(GUEST_MAX),
        prometheus: None,
        stats: false,
        hooks: r.hooks,
        quiet: true,
        command: Vec::new(),
        control: Some(control),
    })
}

/// A node attaching with this one, and the channel to its agent.
struct Far<'a> {
    name: String,
    /// A lab's guest: its serial channel is opened for each request and let go after, so that
    /// `lab exec` can drive traffic there meanwhile. Otherwise (a peer) the TCP connection is
    /// held while it attaches: its end stops the peer's attach.
    guest: Option<InLab<'a>>,
    talk: Option<Talk>,
    received: Received,
}

/// Where a lab's guest is: its lab, and its tap on this node (the only wire of this node
/// toward it; toward a peer, every wire is).
struct InLab<'a> {
    lab: &'a str,
    tap: String,
}

impl Far<'_> {
    async fn talk(&mut self) -> Result<&mut Talk> {
        if let Some(g) = &self.guest {
            // QEMU serves the serial channel to one client: the old one goes first (a start
            // interrupted by a signal still holds it), or the new one's sync is never read.
            self.talk = None;
            self.talk = Some(Talk::open(g.lab, &self.name).await?);
        }
        self.talk
            .as_mut()
            .with_context(|| format!("no channel to {}", self.name))
    }

    /// Asks it to attach as `request` says; its answer once it follows.
    async fn start(&mut self, request: &AttachRequest) -> Result<AttachAnswer> {
        self.talk().await?.send(ATTACH, request).await?;
        let talk = self.talk.as_mut().context("no channel")?;
        let answer = self.received.answer(talk, FOLLOWING_WITHIN).await;
        self.received.following = Some(Instant::now());
        self.let_go();
        answer
    }

    /// A streaming node's sightings as they come while this node follows: never ends, dropped
    /// when this node's attach ends (the channel reads lines whole across drops). The end of
    /// the channel, or an answer, is kept for `stop`.
    async fn collect(&mut self) {
        if let Some(talk) = self.talk.as_mut().filter(|_| self.guest.is_none()) {
            self.received.early = Some(self.received.answer(talk, GUEST_MAX).await);
        }
        std::future::pending().await
    }

    /// Asks it to stop attaching; its report, after the sightings it had still to send. A
    /// `following` read first is the answer to a start this node stopped waiting for (a
    /// signal came): the next one is the stop's.
    async fn stop(&mut self) -> Result<AttachAnswer> {
        if let Some(early) = self.received.early.take() {
            return early;
        }
        self.talk()
            .await?
            .send(STOP, &serde_json::json!({}))
            .await?;
        let talk = self.talk.as_mut().context("no channel")?;
        self.received.before_stop = self.received.count;
        let mut answer = self.received.answer(talk, REPORT_WITHIN).await;
        if matches!(answer, Ok(AttachAnswer::Following)) {
            answer = self.received.answer(talk, REPORT_WITHIN).await;
        }
        self.received.done = Some(Instant::now());
        self.let_go();
        answer
    }

    fn let_go(&mut self) {
        if self.guest.is_some() {
            self.talk = None;
        }
    }

    /// The sightings of this node that cross toward it.
    fn ours<'l>(&self, lines: &'l [SightingLine]) -> impl Iterator<Item = &'l SightingLine> {
        let tap = self.guest.as_ref().map(|g| g.tap.clone());
        lines
            .iter()
            .filter(move |l| tap.is_none() || l.ifname == tap)
    }
}

/// `attach --lab NAME`: attaches in each guest of the lab and here. This node's targets are
/// the lab's namespaces (with those given), its wire the guests' taps.
pub async fn lab(args: &mut AttachArgs, name: &str) -> Result<AttachReport> {
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        bail!("--lab {name:?}: not a lab's name (profiler lab list shows them)");
    }
    let lab = lab::get(name)?.with_context(|| format!("no lab {name} is up"))?;
    if lab.guests.is_empty() {
        bail!("lab {name} has no guests: --lab joins the nodes of a nested lab (bmp2vmp, vmp2vmp)");
    }
    let on_host = |ns: &String| {
        lab.guests
            .iter()
            .all(|g| nested::in_guest(&g.name, ns).is_none())
    };
    for ns in lab.namespaces.iter().filter(|ns| on_host(ns)) {
        if !args.netns.contains(ns) {
            args.netns.push(ns.clone());
        }
    }
    for g in &lab.guests {
        args.wire.push(format!("{}:{}", tap_netns(&lab, g)?, g.tap));
    }
    let fars = lab
        .guests
        .iter()
        .map(|g| {
            let far = Far {
                name: g.name.clone(),
                guest: Some(InLab {
                    lab: name,
                    tap: g.tap.clone(),
                }),
                talk: None,
                received: Received::default(),
            };
            (far, guest_request(args, g))
        })
        .collect();
    together(args, fars).await
}

/// `attach --peer NAME=ADDR ... --tls DIR`: attaches on each peer through its agent and here,
/// this node speaking as `args.node` of the cluster whose certificates are in `tls`.
pub async fn peers(args: &mut AttachArgs, peers: &[PeerSpec], tls: &Path) -> Result<AttachReport> {
    let me = args.node.clone().unwrap_or_else(super::node_name);
    let identity = Identity::load(tls, &me)?;
    let mut fars = Vec::new();
    for p in peers {
        let far = Far {
            name: p.name.clone(),
            guest: None,
            talk: Some(Talk::tls(&p.name, p.addr, &identity).await?),
            received: Received::default(),
        };
        fars.push((far, peer_request(args, p)));
    }
    args.node = Some(me);
    together(args, fars).await
}

/// The other nodes attach first, then this one until the duration, a signal or the workload
/// ends it; then the others are stopped and each one's wire with this node joined.
async fn together(
    args: &mut AttachArgs,
    mut fars: Vec<(Far<'_>, AttachRequest)>,
) -> Result<AttachReport> {
    args.follow.wire = true;
    args.keep_sightings = true;
    // A signal while the others load their programs stops those asked (a peer would stop
    // when its connection ends; a lab's guest only when told).
    let mut asked = 0;
    if let Err(e) = interruptible(start_all(&mut fars, &mut asked)).await {
        if signal::is_interruption(&e) {
            stop_interrupted(&mut fars[..asked], &e).await;
        }
        return Err(e);
    }
    if !args.quiet {
        let names: Vec<&str> = fars.iter().map(|(f, _)| f.name.as_str()).collect();
        eprintln!("attach: following in {}", names.join(", "));
    }
    // The peers' sightings are read as they come while this node follows (and joined as they
    // come for /metrics); the others are stopped whether or not this node's attach succeeded.
    let joining = live_join(args, &fars);
    // With events, this node's journeys are kept too, to join each paired packet's.
    let events = fars.iter().any(|(_, r)| r.events);
    let (keep, mut kept) = tokio::sync::mpsc::unbounded_channel();
    if events {
        args.keep_journeys = Some(keep);
    }
    let here = {
        let collecting = async {
            futures::future::join_all(fars.iter_mut().map(|(f, _)| f.collect())).await;
            std::future::pending::<std::convert::Infallible>().await
        };
        tokio::select! {
            here = attach(args) => here,
            never = collecting => match never {},
            never = joining => match never {},
        }
    };
    let answers = stop_all(&mut fars).await;
    let (mut report, lines) = here?;
    let mut mine = Journeys::default();
    while let Ok(j) = kept.try_recv() {
        mine.add(j);
    }
    for ((far, _), answer) in fars.iter_mut().zip(answers) {
        let name = far.name.as_str();
        let (mut peer, sightings) = match answer.with_context(|| format!("attach in {name}"))? {
            AttachAnswer::Done { report, sightings } => (report, sightings),
            AttachAnswer::Failed(e) => bail!("attach in {name}: {e}"),
            AttachAnswer::Following => bail!("attach in {name}: no report"),
        };
        peer.node = name.to_string();
        if let Some(w) = peer.wire.as_mut() {
            w.not_sent += far.received.not_kept;
        }
        let mut theirs =
            std::mem::take(&mut *far.received.seen.lock().unwrap_or_else(|e| e.into_inner()));
        sightings.iter().for_each(|l| theirs.add(l));
        let ours = Seen::of(far.ours(&lines));
        let (mut link, timed) = link((&report.node, ours), (name, theirs));
        link.streamed = far.received.streamed();
        let ends = [(&report, &*peer), (&*peer, &report)];
        let theirs = &far.received.journeys;
        let journeys = [(&mine, theirs), (theirs, &mine)];
        for (i, (d, (from, to))) in link.directions.iter_mut().zip(ends).enumerate() {
            d.paths = stitch::paths(d, from, to);
            if events {
                let pairs = &timed.directions[i];
                // This node is the one the packets of direction 0 left.
                let traces = args.traces.as_mut().map(|t| (t, i == 0));
                (d.packet_paths, d.unjoined) =
                    packets::ways(pairs, &timed.hops, (from, to), journeys[i], traces);
            }
        }
        report.links.push(link);
        report.peers.push(*peer);
    }
    Ok(report)
}

/// With --prometheus, the links joined as the peers' sightings come (live.rs); a lab's
/// guests send theirs at the end only, so they have none.
fn live_join(
    args: &mut AttachArgs,
    fars: &[(Far<'_>, AttachRequest)],
) -> impl std::future::Future<Output = std::convert::Infallible> + use<> {
    let streaming = fars.iter().all(|(f, _)| f.guest.is_none());
    let peers: Vec<live::Peer> = fars
        .iter()
        .map(|(f, _)| live::Peer::new(&f.name, f.received.seen.clone()))
        .collect();
    let me = args.node.clone().unwrap_or_else(super::node_name);
    let joined = (args.prometheus.is_some() && streaming).then(|| {
        let (feed, lines, links) = live::feed();
        args.live = Some(feed);
        (lines, links)
    });
    async move {
        match joined {
            Some((lines, links)) => live::run(&me, peers, lines, links).await,
            None => std::future::pending().await,
        }
    }
}

/// Asks each node to attach, in turn, until all follow; `asked` counts those asked so far.
/// If one fails, those already following are stopped.
async fn start_all(fars: &mut [(Far<'_>, AttachRequest)], asked: &mut usize) -> Result<()> {
    for i in 0..fars.len() {
        *asked = i + 1;
        let (far, request) = &mut fars[i];
        let why = match far.start(request).await {
            Ok(AttachAnswer::Following) => continue,
            Ok(AttachAnswer::Failed(e)) => e,
            Ok(AttachAnswer::Done { .. }) => "ended before following".to_string(),
            Err(e) => format!("{e:#}"),
        };
        let name = far.name.clone();
        // Their answers say nothing more.
        let _ = stop_all(&mut fars[..i]).await;
        bail!("attach in {name}: {why}")
    }
    Ok(())
}

/// After a signal while they loaded: each node asked is told to stop, and says whether it did;
/// another signal leaves them.
async fn stop_interrupted(fars: &mut [(Far<'_>, AttachRequest)], e: &anyhow::Error) {
    let names: Vec<&str> = fars.iter().map(|(f, _)| f.name.as_str()).collect();
    eprintln!(
        "attach: {e}; stopping the attach in {} (again to leave it)",
        names.join(", ")
    );
    let Ok(answers) = interruptible(async { Ok(stop_all(fars).await) }).await else {
        return;
    };
    for ((far, _), answer) in fars.iter().zip(answers) {
        match answer {
            Ok(AttachAnswer::Done { .. }) => eprintln!("attach: stopped in {}", far.name),
            Ok(AttachAnswer::Failed(why)) => eprintln!("attach in {}: {why}", far.name),
            Ok(AttachAnswer::Following) => eprintln!("attach in {}: no report", far.name),
            Err(why) => eprintln!("attach in {}: {why:#}", far.name),
        }
    }
}

/// Asks every node to stop attaching; each one's answer.
async fn stop_all(fars: &mut [(Far<'_>, AttachRequest)]) -> Vec<Result<AttachAnswer>> {
    let mut answers = Vec::new();
    for (far, _) in fars {
        answers.push(far.stop().await);
    }
    answers
}

fn guest_request(args: &AttachArgs, g: &nested::Guest) -> AttachRequest {
    let netns = g
        .namespaces
        .iter()
        .map(|(ns, _)| ns.clone())
        .filter(|ns| ns != ROOT)
        .collect();
    request(args, Vec::new(), netns, vec![GUEST_NIC.to_string()], false)
}

/// A peer follows its own targets if its --peer names any, else this node's --pod patterns;
/// its own wire devices, else this node's names.
fn peer_request(args: &AttachArgs, p: &PeerSpec) -> AttachRequest {
    let own = !p.pods.is_empty() || !p.netns.is_empty();
    let pods = if own {
        p.pods.clone()
    } else {
        args.pods.iter().map(|p| p.to_string()).collect()
    };
    let wire = if p.wire.is_empty() {
        args.wire.clone()
    } else {
        p.wire.clone()
    };
    request(args, pods, p.netns.clone(), wire, true)
}

fn request(
    args: &AttachArgs,
    pods: Vec<String>,
    netns: Vec<String>,
    wire: Vec<String>,
    stream: bool,
) -> AttachRequest {
    AttachRequest {
        pods,
        netns,
        wire,
        filter: args.filter.clone(),
        sample: args.follow.sample,
        max_gap_ms: args.follow.max_gap_ns / 1_000_000,
        max_in_flight: args.follow.max_in_flight,
        hooks: args.hooks,
        stream,
        // A lab's guests send their sightings at the end, not their journeys.
        events: stream && args.follow.stream,
    }
}

/// The host namespace the guest's tap is in.
fn tap_netns(lab: &lab::Lab, g: &nested::Guest) -> Result<String> {
    lab.interfaces
        .iter()
        .find(|i| i.ifname == g.tap && nested::in_guest(&g.name, &i.netns).is_none())
        .map(|i| i.netns.clone())
        .with_context(|| format!("lab {}: no tap {} on the host", lab.name, g.tap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_names_its_own_targets_and_wire() {
        let p: PeerSpec = "node-b=10.0.0.2:7411,pod=shop/web-*,netns=ns1,wire=ns1:eth0,wire=eth1"
            .parse()
            .unwrap();
        assert_eq!((p.name.as_str(), p.addr.port()), ("node-b", 7411));
        assert_eq!(
            (p.pods, p.netns),
            (vec!["shop/web-*".to_string()], vec!["ns1".to_string()])
        );
        assert_eq!(p.wire, ["ns1:eth0", "eth1"]);
        for bad in [
            "node-b",
            "=1.2.3.4:1",
            "b=1.2.3.4:1,pod=",
            "b=1.2.3.4:1,pod=[",
            "a b=1.2.3.4:1",
        ] {
            assert!(bad.parse::<PeerSpec>().is_err(), "{bad} taken");
        }
    }
}
