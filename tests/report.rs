//! `profiler report`: every saved report re-renders to exactly the table the command that made
//! it printed (fixtures written by the commands themselves, under tests/fixtures), as JSON that
//! reads back the same, and as an HTML page that is well-formed with one waterfall per direction.
//! Needs no privileges and no eBPF.
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use profiler::report::schema::{AttachReport, PathAcross, RunReport};
use serde::de::DeserializeOwned;

const BIN: &str = env!("CARGO_BIN_EXE_profiler");

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// The report saved at `path`, read through its schema.
fn saved<T: DeserializeOwned>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `profiler report ARGS`, which must succeed: its stdout.
fn report(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("report")
        .args(args)
        .output()
        .expect("running the profiler binary");
    assert!(
        out.status.success(),
        "profiler report {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

const KINDS: [&str; 6] = [
    "run",
    "run-tcp-stats",
    "compare",
    "attach",
    "attach-peer",
    "doctor",
];

#[test]
fn every_saved_report_renders_the_table_its_command_printed() {
    for kind in KINDS {
        let json = fixture(&format!("{kind}.json"));
        let printed = std::fs::read_to_string(fixture(&format!("{kind}.txt")))
            .unwrap_or_else(|e| panic!("fixture {kind}.txt: {e}"));
        let rendered = report(&[json.to_str().unwrap()]);
        assert_eq!(rendered, printed, "{kind}: the re-rendered table differs");
    }
}

/// Runs' saved events (`run --save-events`, under tests/fixtures) attribute again to the table
/// the run printed.
#[test]
fn saved_events_attribute_to_the_table_their_run_printed() {
    for kind in ["bridge", "flannel-vxlan", "alltoall", "bmp2vmp"] {
        let events = fixture(&format!("events-{kind}.json"));
        let printed = std::fs::read_to_string(fixture(&format!("events-{kind}.txt")))
            .unwrap_or_else(|e| panic!("fixture events-{kind}.txt: {e}"));
        let rendered = report(&["--events", events.to_str().unwrap()]);
        assert_eq!(rendered, printed, "{kind}: the attributed table differs");
    }
}

#[test]
fn json_reads_back_the_same() {
    for kind in KINDS {
        let json = fixture(&format!("{kind}.json"));
        let original: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let again: serde_json::Value =
            serde_json::from_str(&report(&[json.to_str().unwrap(), "--format", "json"]))
                .unwrap_or_else(|e| panic!("{kind}: --format json is not JSON: {e}"));
        assert_eq!(again, original, "{kind}: fields were lost or renamed");
    }
}

#[test]
fn html_is_well_formed_with_one_waterfall_per_direction() {
    let json = fixture("run.json");
    let page = report(&[json.to_str().unwrap(), "--format", "html"]);
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(&page, options)
        .unwrap_or_else(|e| panic!("the page is not well-formed: {e}\n{page}"));
    let svgs: Vec<_> = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "svg")
        .collect();
    assert_eq!(svgs.len(), 2, "one SVG per direction (request, response)");
    // One bar per segment and one for end to end, in each.
    let run: RunReport = saved(&json);
    for (svg, dir) in svgs.iter().zip(&run.directions) {
        let bars = svg
            .descendants()
            .filter(|n| n.tag_name().name() == "rect")
            .count();
        assert_eq!(bars, dir.segments.len() + 1, "{}", dir.direction);
    }
}

/// An attach report across two nodes: one waterfall per path of each node and one per way
/// across, each with a bar per segment and one for the sum; the wire drawn in its own colour.
#[test]
fn attach_html_draws_each_path_and_each_way_across() {
    let json = fixture("attach-peer.json");
    let page = report(&[json.to_str().unwrap(), "--format", "html"]);
    let doc = roxmltree::Document::parse_with_options(
        &page,
        roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("the page is not well-formed: {e}\n{page}"));
    let a: AttachReport = saved(&json);
    let nodes = std::iter::once(&a).chain(&a.peers);
    let mut want: Vec<usize> = nodes
        .flat_map(|n| &n.paths)
        .map(|p| p.segments.len() + 1)
        .collect();
    let ways: Vec<&PathAcross> = (a.links.iter())
        .flat_map(|l| &l.directions)
        .flat_map(|d| &d.paths)
        .collect();
    assert!(!ways.is_empty(), "the fixture has ways across");
    want.extend(ways.iter().map(|p| p.segments.len() + 1));
    let svgs: Vec<_> = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "svg")
        .collect();
    let bars: Vec<usize> = svgs
        .iter()
        .map(|svg| {
            svg.descendants()
                .filter(|n| n.tag_name().name() == "rect")
                .count()
        })
        .collect();
    assert_eq!(bars, want, "bars per waterfall");
    // The wire, once per way across, in the wire's colour, named by both nodes.
    let wires: Vec<_> = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "rect" && n.attribute("fill") == Some("#e45756"))
        .collect();
    assert_eq!(wires.len(), ways.len(), "{page}");
    assert!(page.contains("node-a -&gt; node-b: wire"), "{page}");
    assert!(page.contains("node-b -&gt; node-a: wire"), "{page}");
}

#[test]
fn what_is_not_a_report_is_refused_in_one_line() {
    let dir = std::env::temp_dir().join(format!("profiler-report-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text, want) in [
        ("not-json.json", "hello", "not a profiler report"),
        (
            "other.json",
            r#"{"schema": "something.else"}"#,
            "not a profiler report",
        ),
        (
            "future.json",
            r#"{"schema": "profiler.run.v2"}"#,
            "another version",
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .args(["report", path.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        assert!(err.contains(want), "{name}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: {err}");
    }
    let missing = Command::new(BIN)
        .args(["report", "/nonexistent/report.json"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--events` takes what `run --save-events` wrote: a report in its place is refused in one
/// line that says what to pass, and so are a missing file, no file at all, and events given
/// as a report.
#[test]
fn what_is_not_a_run_s_events_is_refused_in_one_line() {
    let (run, events) = (fixture("run.json"), fixture("events-bridge.json"));
    for (args, want) in [
        (
            vec!["--events", run.to_str().unwrap()],
            "a report, not a run's events",
        ),
        (vec!["--events", "/nonexistent/events.json"], "cannot read"),
        (vec![], "required"),
        (
            vec![events.to_str().unwrap()],
            "a run's events, not a report: `profiler report --events FILE`",
        ),
    ] {
        let out = Command::new(BIN)
            .arg("report")
            .args(&args)
            .output()
            .expect("running the profiler binary");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(if args.is_empty() { 2 } else { 1 }),
            "{args:?}: {err}"
        );
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
