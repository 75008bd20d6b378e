//! `profiler bench paper --quick` on this machine, with real labs and eBPF: the JSON reads
//! back into the schema with every finding judged or explained, `profiler report` renders the
//! same table and page again, every lab the bench made is gone, and the HTML page loads in a
//! headless browser (Debian's chromium, installed by `cargo xtask setup`) without an error and
//! draws something.
// A test crate sees every dependency of the package; the lint is for the library's.
#![allow(unused_crate_dependencies)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use profiler::report::schema::{BenchReport, CellStatus, TrafficKind, BENCH_SCHEMA};

const BIN: &str = env!("CARGO_BIN_EXE_profiler");

fn profiler(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("running the profiler binary")
}

fn dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("profiler-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir
}

fn netns() -> BTreeSet<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn quick_bench_judges_every_finding_and_draws_a_page_a_browser_shows() {
    let dir = dir();
    let (json, html, md) = (dir.join("b.json"), dir.join("b.html"), dir.join("b.md"));
    let before = netns();
    let out = profiler(&[
        "bench",
        "paper",
        "--quick",
        "--json",
        json.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
        "--markdown",
        md.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench paper --quick: {stderr}");
    let report: BenchReport =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON file"))
            .expect("the JSON reads back as profiler.bench.v1");
    println!("bench paper --quick took {:.0} s", report.elapsed_s);
    assert_eq!(report.schema, BENCH_SCHEMA);
    assert!(report.quick);
    assert!(
        report.elapsed_s < 180.0,
        "--quick must finish in under 3 minutes, took {:.0} s",
        report.elapsed_s
    );

    // Labs the bench made are gone (namespaces of other labs, other tests' meanwhile, are not
    // its own).
    let labs: BTreeSet<String> = report
        .cells
        .iter()
        .map(|c| format!("prof-{}-", c.lab))
        .collect();
    let left: Vec<_> = netns()
        .difference(&before)
        .filter(|ns| labs.iter().any(|l| ns.starts_with(l.as_str())))
        .cloned()
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");

    check_cells(&report);
    check_findings(&report);

    // `profiler report` renders the same table and the same page from the JSON.
    let table = profiler(&["report", json.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&table.stdout),
        String::from_utf8_lossy(&out.stdout)
    );
    let again = profiler(&["report", json.to_str().unwrap(), "--format", "json"]);
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).expect("JSON");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(
        again == original,
        "report --format json lost or renamed fields"
    );
    let page = profiler(&["report", json.to_str().unwrap(), "--format", "html"]);
    let written = std::fs::read_to_string(&html).expect("the HTML file");
    assert!(page.status.success());
    assert_eq!(String::from_utf8_lossy(&page.stdout), written);
    assert!(
        !written.contains("src=") && !written.contains("href="),
        "the page loads nothing from elsewhere"
    );

    let markdown = std::fs::read_to_string(&md).expect("the Markdown file");
    for head in [
        "# Benchmarks",
        "- command: `",
        "- kernel: ",
        "- machine: ",
        "- commit: ",
    ] {
        assert!(
            markdown.contains(head),
            "BENCHMARKS.md lacks {head:?}:\n{markdown}"
        );
    }
    assert_eq!(
        markdown.matches("\n| 1 |").count() + markdown.matches("\n| 7 |").count(),
        2
    );

    browse(&html, &dir);
    std::fs::remove_dir_all(&dir).expect("removing the temporary directory");
}

/// Every lab this kernel builds ran each experiment; every other cell says why not.
fn check_cells(report: &BenchReport) {
    for lab in [
        "host-xhost",
        "bridge",
        "bridge-xhost",
        "flannel-vxlan-xhost",
        "macvlan",
        "macvlan-xhost",
    ] {
        let rr: Vec<_> = (report.cells.iter())
            .filter(|c| c.lab == lab && c.experiment == TrafficKind::Rr)
            .collect();
        assert!(!rr.is_empty(), "{lab}: no rr cell in the report");
        for c in rr {
            assert_eq!(
                c.status,
                CellStatus::Ok,
                "{lab} rr {} B: {:?}",
                c.size,
                c.reason
            );
            assert!(
                c.result.p50_ns.is_some_and(|p| p > 0),
                "{lab}: {:?}",
                c.result
            );
            let run = c.run.as_ref().expect("an rr cell keeps its run report");
            assert_eq!(run.traffic.size, c.size);
            assert!(run.directions[0].segments.len() >= 2, "{lab}: {run:?}");
        }
    }
    for c in &report.cells {
        match c.status {
            CellStatus::Ok => {
                let r = &c.result;
                let measured = match c.experiment {
                    TrafficKind::Rr => r.p50_ns.is_some(),
                    TrafficKind::Stream => r.gbit_per_s.is_some_and(|g| g > 0.0),
                    TrafficKind::Alltoall => r.round_p50_ms.is_some_and(|m| m > 0.0),
                };
                assert!(measured && c.run.is_some(), "{c:?}");
            }
            _ => assert!(
                c.reason.as_deref().is_some_and(|r| !r.is_empty()),
                "a cell not run says why: {} {:?}",
                c.lab,
                c.experiment
            ),
        }
    }
    // The OVS types run where the kernel has openvswitch (the VM lab); elsewhere (this
    // project's host kernel) they are skipped and the reason names the missing module.
    let ovs_skipped = report.skipped.iter().find(|s| s.topology == "ovs-vlan");
    let ovs_measured = report.cells.iter().any(|c| c.lab.starts_with("ovs-vlan"));
    match ovs_skipped {
        Some(s) => assert!(s.reason.contains("openvswitch"), "{s:?}"),
        None => assert!(
            ovs_measured,
            "ovs-vlan neither measured nor skipped: {report:?}"
        ),
    }
}

fn check_findings(report: &BenchReport) {
    let numbers: Vec<u8> = report.findings.iter().map(|f| f.number).collect();
    assert_eq!(numbers, [1, 2, 3, 4, 5, 6, 7]);
    for f in &report.findings {
        match f.holds {
            Some(_) => assert!(!f.numbers.is_empty(), "finding {} has no figures", f.number),
            None => assert!(
                f.why.as_deref().is_some_and(|w| !w.is_empty()),
                "finding {} is neither judged nor explained",
                f.number
            ),
        }
    }
    // Finding 4's latency part runs on what this kernel builds (macvlan, bridge, flannel).
    let f4 = &report.findings[3];
    assert!(f4.holds.is_some(), "finding 4: {:?}", f4.why);
    assert!(
        !f4.segments.is_empty() && f4.segments.iter().all(|d| !d.contributors.is_empty()),
        "finding 4 names the segments behind it: {:?}",
        f4.segments
    );
}

/// Loads the page in headless chromium: no console or loading error, and a screenshot that is
/// not blank.
fn browse(html: &Path, dir: &Path) {
    let shot = dir.join("page.png");
    let out = Command::new("timeout")
        .args([
            "120",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .args([
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1000,3000",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("running chromium (installed by cargo xtask setup)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium: {stderr}");
    // Console messages and failed loads; chromium's own notices (D-Bus, GPU) are not the page's.
    let bad: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            ["CONSOLE", "Uncaught", "net::ERR_", "Failed to load"]
                .iter()
                .any(|p| l.contains(p))
        })
        .collect();
    assert!(bad.is_empty(), "the page logged errors: {bad:#?}");

    let decoder = png::Decoder::new(std::fs::File::open(&shot).expect("the screenshot"));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).expect("the PNG's image");
    let channels = frame.color_type.samples();
    let pixels = &pixels[..frame.buffer_size()];
    let colours: BTreeSet<&[u8]> = pixels.chunks(channels).collect();
    let non_white = pixels
        .chunks(channels)
        .filter(|p| p[..3].iter().any(|&v| v < 240))
        .count();
    let share = non_white as f64 / (pixels.len() / channels) as f64;
    println!(
        "screenshot: {} colours, {:.1}% not white",
        colours.len(),
        share * 100.0
    );
    assert!(
        colours.len() > 8,
        "the screenshot is nearly blank: {} colours",
        colours.len()
    );
    assert!(
        share > 0.02,
        "the screenshot is nearly all white: {:.2}%",
        share * 100.0
    );
}

#[test]
fn bad_input_is_refused_in_one_line_before_any_lab() {
    for (args, want) in [
        (
            &["bench", "paper", "--html", "/nonexistent-dir/p.html"][..],
            "--html /nonexistent-dir/p.html: directory /nonexistent-dir does not exist",
        ),
        (
            &[
                "bench",
                "paper",
                "--types",
                "flannel-vxlan",
                "--placement",
                "same-host",
            ][..],
            "no type of --types has a placement of --placement",
        ),
        (&["bench", "paper", "--types", "nosuch"][..], "nosuch"),
    ] {
        let out = profiler(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
}
