//! One waterfall per way across two nodes. Each node follows its own part of a packet's way, and
//! a link's crossing says where paired packets left one node and entered the other (across.rs):
//! the leaving node's path through the first hop gives the way up to it, the entering node's
//! path through the second the way on, and the crossing the wire between.

use super::link::hop_on;
use crate::report::schema::{
    AttachReport, LinkDirection, PathAcross, SegmentAcross, SegmentSummary, WireCrossing,
};

/// The way across for each crossing of `d`; `from` and `to` are its nodes' reports.
pub(super) fn paths(d: &LinkDirection, from: &AttachReport, to: &AttachReport) -> Vec<PathAcross> {
    d.crossings.iter().map(|c| path(c, from, to)).collect()
}

fn path(c: &WireCrossing, from: &AttachReport, to: &AttachReport) -> PathAcross {
    let (left, entered) = (hop_on(&c.from, &from.node), hop_on(&c.to, &to.node));
    let within = |node: &str, s: &SegmentSummary| SegmentAcross {
        from_node: node.to_string(),
        to_node: node.to_string(),
        name: s.name.clone(),
        from: s.from.clone(),
        to: s.to.clone(),
        packets: s.count,
        p50_ns: s.p50_ns,
        p90_ns: s.p90_ns,
        p99_ns: s.p99_ns,
        bound_ns: 0,
    };
    let wire = SegmentAcross {
        from_node: from.node.clone(),
        to_node: to.node.clone(),
        name: "wire".to_string(),
        from: left.to_string(),
        to: entered.to_string(),
        packets: c.packets,
        p50_ns: c.p50_ns as f64,
        p90_ns: c.p90_ns as f64,
        p99_ns: c.p99_ns as f64,
        bound_ns: c.bound_ns,
    };
    let before = busiest(from, left, Part::UpTo).iter();
    let after = busiest(to, entered, Part::From).iter();
    PathAcross {
        segments: (before.map(|s| within(&from.node, s)))
            .chain([wire])
            .chain(after.map(|s| within(&to.node, s)))
            .collect(),
    }
}

enum Part {
    UpTo,
    From,
}

/// The segments up to `hop`, or from it on, of the path of `r` through it that most packets
/// crossed there; none where no path goes through it.
fn busiest<'r>(r: &'r AttachReport, hop: &str, part: Part) -> &'r [SegmentSummary] {
    let through = r.paths.iter().filter_map(|p| {
        let i = p.hops.iter().position(|h| h == hop)?;
        let (segments, at) = match part {
            Part::UpTo => (p.segments.get(..i)?, i.checked_sub(1)),
            Part::From => (p.segments.get(i..)?, Some(i)),
        };
        let crossed = at.and_then(|k| p.segments.get(k)).map_or(0, |s| s.count);
        Some((crossed, segments))
    });
    through
        .max_by_key(|(crossed, _)| *crossed)
        .map_or(&[], |(_, s)| s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::schema::AttachPath;

    fn segment(from: &str, to: &str, count: u64, p50_us: f64) -> SegmentSummary {
        SegmentSummary {
            name: format!("{from}..{to}"),
            from: from.into(),
            to: to.into(),
            count,
            p50_ns: p50_us * 1e3,
            ..Default::default()
        }
    }

    /// A path through `hops`, each segment crossed by `count` packets, 1 us each.
    fn path(hops: &[&str], count: u64) -> AttachPath {
        AttachPath {
            packets: count,
            hops: hops.iter().map(|h| h.to_string()).collect(),
            segments: hops
                .windows(2)
                .map(|w| segment(w[0], w[1], count, 1.0))
                .collect(),
        }
    }

    fn report(node: &str, paths: Vec<AttachPath>) -> AttachReport {
        let r: AttachReport = serde_json::from_value(serde_json::json!({
            "schema": "profiler.attach.v1", "kernel": "6.1", "node": node, "targets": [],
            "filter": "", "sample": 1, "mode": "summary", "duration_s": 1.0, "segments": [],
            "journeys": {"started": 0, "consumed": 0, "dropped": 0, "ended_unseen": 0,
            "unfinished": 0, "reheaded": 0}, "lost_events": 0, "hook_set": "stable",
            "hooks": []
        }))
        .expect("a minimal attach report");
        AttachReport { paths, ..r }
    }

    fn crossing(from: &str, to: &str) -> WireCrossing {
        WireCrossing {
            from: from.into(),
            to: to.into(),
            packets: 90,
            p50_ns: 20_000,
            p90_ns: 30_000,
            p99_ns: 40_000,
            max_ns: 50_000,
            bound_ns: 4_000,
        }
    }

    fn names(p: &PathAcross) -> Vec<String> {
        (p.segments.iter())
            .map(|s| format!("{}>{} {}", s.from_node, s.to_node, s.name))
            .collect()
    }

    #[test]
    fn the_busiest_path_up_to_the_wire_then_the_wire_then_the_busiest_path_on() {
        let a = report(
            "a",
            vec![
                // Through the leaving hop, but crossed there by fewer packets.
                path(&["queue pod", "xmit wire0", "free"], 10),
                path(&["send", "queue pod", "xmit wire0", "free"], 100),
                path(&["send", "elsewhere"], 1000),
            ],
        );
        let b = report(
            "b",
            vec![
                path(&["rx wire0", "rx pod", "socket"], 95),
                path(&["rx lo", "rx wire0"], 500),
            ],
        );
        let p = path_of(&a, &b, "a: xmit wire0", "b: rx wire0");
        assert_eq!(
            names(&p),
            [
                "a>a send..queue pod",
                "a>a queue pod..xmit wire0",
                "a>b wire",
                "b>b rx wire0..rx pod",
                "b>b rx pod..socket",
            ]
        );
        let wire = &p.segments[2];
        assert_eq!(
            (wire.from.as_str(), wire.to.as_str()),
            ("xmit wire0", "rx wire0")
        );
        assert_eq!(
            (wire.packets, wire.p50_ns, wire.bound_ns),
            (90, 20_000.0, 4_000)
        );
        assert_eq!(p.segments[0].packets, 100);
        assert_eq!(p.segments[3].packets, 95);
    }

    #[test]
    fn a_node_with_no_path_through_its_hop_adds_nothing_and_ends_add_nothing() {
        let a = report("a", vec![path(&["xmit wire0", "free"], 5)]);
        let b = report("b", vec![path(&["rx other", "rx wire0"], 5)]);
        let p = path_of(&a, &b, "a: xmit wire0", "b: rx wire0");
        assert_eq!(names(&p), ["a>b wire"]);
        let none = report("b", vec![]);
        assert_eq!(
            names(&path_of(&a, &none, "a: xmit wire0", "b: rx wire0")),
            ["a>b wire"]
        );
    }

    fn path_of(a: &AttachReport, b: &AttachReport, from: &str, to: &str) -> PathAcross {
        let d = LinkDirection {
            from_node: a.node.clone(),
            to_node: b.node.clone(),
            crossings: vec![crossing(from, to)],
            ..Default::default()
        };
        let mut all = paths(&d, a, b);
        assert_eq!(all.len(), 1);
        all.remove(0)
    }
}
