//! `attach --peer ... --prometheus ADDR`: the links between this node and its peers on
//! /metrics while they follow, not only in the report at the end. Every [`EVERY`] the last
//! `LINKS_WINDOW_NS` (metrics.rs) of each node's sightings are joined as the report's are
//! (link.rs), and /metrics serves the result: each crossing's time on the wire with source and
//! destination node labels, and the clocks' offset. The report's own join, at the end, is
//! over every sighting kept.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::{
    link::{link, Seen},
    metrics::{Links, LINKS_WINDOW_NS as WINDOW_NS},
};
use crate::report::schema::SightingLine;

/// How often the links are joined again.
const EVERY: Duration = Duration::from_secs(5);
/// At most this many of a node's latest sightings each way are joined (the cost of a join).
const MOST: usize = 1 << 17;

/// What attach hands the live join: this node's sightings as it reads them, and where the
/// links go for /metrics.
pub struct Feed {
    pub lines: UnboundedSender<SightingLine>,
    pub links: Links,
}

/// A peer of the join: its name, the sightings it sent (shared with the task that reads its
/// channel), and this node's toward it.
pub struct Peer {
    pub name: String,
    pub theirs: Arc<Mutex<Seen>>,
    ours: Seen,
}

impl Peer {
    pub fn new(name: &str, theirs: Arc<Mutex<Seen>>) -> Peer {
        Peer {
            name: name.to_string(),
            theirs,
            ours: Seen::default(),
        }
    }
}

/// The join's end of the feed: a [`Feed`] for attach, and this end for [`run`].
pub fn feed() -> (Feed, UnboundedReceiver<SightingLine>, Links) {
    let (lines, rx) = tokio::sync::mpsc::unbounded_channel();
    let links = Links::default();
    let feed = Feed {
        lines,
        links: links.clone(),
    };
    (feed, rx, links)
}

/// Joins this node (`me`) with each peer every [`EVERY`] until dropped.
pub async fn run(
    me: &str,
    mut peers: Vec<Peer>,
    mut lines: UnboundedReceiver<SightingLine>,
    links: Links,
) -> std::convert::Infallible {
    let mut tick = tokio::time::interval(EVERY);
    // A join slower than EVERY delays the next one rather than bunching them.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        while let Ok(line) = lines.try_recv() {
            for p in peers.iter_mut() {
                p.ours.add(&line);
            }
        }
        let windows: Vec<_> = peers
            .iter_mut()
            .map(|p| {
                p.ours.forget_before(WINDOW_NS, MOST);
                let theirs = p.theirs.lock().unwrap_or_else(|e| e.into_inner());
                let theirs = theirs.recent(WINDOW_NS, MOST);
                (p.name.clone(), p.ours.clone(), theirs)
            })
            .collect();
        // A join at the bound takes about half a second: off the task that drains the rings.
        let me = me.to_string();
        let joining = tokio::task::spawn_blocking(move || {
            (windows.into_iter())
                .map(|(name, ours, theirs)| link((&me, ours), (&name, theirs)).0)
                .collect()
        });
        if let Ok(joined) = joining.await {
            *links.write().unwrap_or_else(|e| e.into_inner()) = joined;
        }
    }
}
