//! eBPF datapath profiler for container networks: kernel probes timestamp the profiler's own
//! tagged packets at every hop of a path (`run`), or follow real packets by their buffers
//! (`attach`), and the time between hops is attributed to the segment the packet crossed there.
//!
//! The two modes, and the layers they share:
//! - [`run`]: tagged traffic, journeys rebuilt from events, `compare`.
//! - [`attach`]: following real traffic, the filter compiler, in-kernel histograms, metrics.
//! - [`bench`]: the study's experiments as a matrix of runs, and its findings judged.
//! - [`cluster`]: what a journey across nodes needs: two nodes' clocks related, with bounds, from
//!   the packets crossing between them.
//! - [`kernel`]: BTF, kallsyms, loading and attaching the eBPF programs, ring buffers, doctor,
//!   the delay injector.
//! - [`datapath`]: the hook table and the rules that name segments, as data.
//! - [`lab`]: network namespaces, the built-in topologies, and what a run targets.
//! - [`object`]: the eBPF object, which the kernel layer and the ebpf-redirect lab load from.
//! - [`pods`]: which namespace is which pod, from the container runtime (CRI), the CNI cache
//!   or /run/netns.
//! - [`report`]: the report schema, and its renderings (table, JSON, HTML).
//! - [`cli`]: the command line, one module per command (its arguments and what it does), and
//!   what they share: bounded values, reports written atomically.
//! - [`progress`], [`signal`]: what the modes share with the people running them: progress
//!   bars, SIGINT/SIGTERM.
// Set up by the command (main.rs) for the log records of the library's modules.
use env_logger as _;
// Only the integration tests use these (tests/report.rs parses the HTML page, tests/bench.rs
// decodes a screenshot of bench's page, tests/attach.rs receives OTLP traces).
#[cfg(test)]
use opentelemetry_proto as _;
#[cfg(test)]
use png as _;
#[cfg(test)]
use roxmltree as _;

pub mod attach;
pub mod bench;
pub mod cli;
pub mod cluster;
pub mod datapath;
pub mod error;
pub mod kernel;
pub mod lab;
pub mod object;
pub mod pods;
pub mod progress;
pub mod report;
pub mod run;
pub mod signal;

/// The library's property tests: `cases`, or $PROPTEST_CASES (`cargo xtask fuzz`); no
/// regression files in the source tree.
#[cfg(test)]
pub(crate) fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    }
}

#[cfg(test)]
mod layering {
    //! The folders are layers: none may import another that imports it back, directly or not.

    use std::collections::{BTreeMap, BTreeSet};

    /// The top-level modules each module of src/ names through `crate::`, tests included.
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph = BTreeMap::new();
        for entry in std::fs::read_dir(&src).expect("src/") {
            let path = entry.expect("an entry of src/").path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if name == "lib" || name == "main" {
                continue;
            }
            let mut text = String::new();
            read_all(&path, &mut text);
            let used: BTreeSet<String> = crate_paths(&text)
                .into_iter()
                .filter(|m| *m != name)
                .collect();
            graph.insert(name, used);
        }
        graph
    }

    fn read_all(path: &std::path::Path, out: &mut String) {
        if path.is_dir() {
            for entry in std::fs::read_dir(path).expect("a module folder") {
                read_all(&entry.expect("an entry").path(), out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            *out += &std::fs::read_to_string(path).expect("a source file");
        }
    }

    /// The first segment of every `crate::` path, `use crate::{a, b::c}` included.
    fn crate_paths(text: &str) -> Vec<String> {
        paths_after(text, "crate::")
    }

    /// The first segment of every path that starts with `prefix`, grouped ones included.
    fn paths_after(text: &str, prefix: &str) -> Vec<String> {
        let mut found = Vec::new();
        for (i, _) in text.match_indices(prefix) {
            // `crate::` must not be the tail of a longer path (`foo::crate::`, `xsuper::`).
            let before = text[..i].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            // `super::super::x` in a file's test module is the folder's `x`.
            let mut rest = &text[i + prefix.len()..];
            while let Some(r) = rest.strip_prefix("super::") {
                rest = r;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let mut depth = 1;
                let mut item_start = true;
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 1 => break,
                        '}' => depth -= 1,
                        ',' if depth == 1 => item_start = true,
                        c if item_start && depth == 1 && (c.is_alphabetic() || c == '_') => {
                            found.push(ident(&group[j..]));
                            item_start = false;
                        }
                        _ => {}
                    }
                }
            } else {
                found.push(ident(rest));
            }
        }
        found
    }

    fn ident(s: &str) -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    }

    #[test]
    fn reads_grouped_imports() {
        let text = "use crate::{\n    a::{b, c},\n    d,\n};\nlet x = crate::e::f();";
        assert_eq!(crate_paths(text), ["a", "d", "e"]);
        let text = "use super::{x::Y, z};\nsuper::super::w::v(); other::super::q";
        assert_eq!(paths_after(text, "super::"), ["x", "z", "w"]);
    }

    /// For each folder of src/, the sibling files each of its files (mod.rs aside: it is the
    /// folder's face) names through `super::` or `crate::FOLDER::`.
    fn sibling_imports() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut folders = BTreeMap::new();
        for entry in std::fs::read_dir(&src).expect("src/") {
            let dir = entry.expect("an entry of src/").path();
            if !dir.is_dir() {
                continue;
            }
            let folder = dir.file_name().unwrap().to_string_lossy().into_owned();
            let files: BTreeMap<String, String> = std::fs::read_dir(&dir)
                .expect("a module folder")
                .map(|e| e.expect("an entry").path())
                .filter(|p| p.extension().is_some_and(|e| e == "rs"))
                .map(|p| {
                    let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
                    (stem, std::fs::read_to_string(&p).expect("a source file"))
                })
                .filter(|(stem, _)| stem != "mod")
                .collect();
            let mut graph = BTreeMap::new();
            for (stem, text) in &files {
                let mut named = paths_after(text, "super::");
                named.extend(paths_after(text, &format!("crate::{folder}::")));
                let siblings = named
                    .into_iter()
                    .filter(|n| n != stem && files.contains_key(n))
                    .collect();
                graph.insert(stem.clone(), siblings);
            }
            folders.insert(folder, graph);
        }
        folders
    }

    /// The modules of `graph` that reach themselves through others, with the way back.
    fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
        let mut found = Vec::new();
        for start in graph.keys() {
            let mut seen = BTreeSet::new();
            let mut todo: Vec<&String> = graph[start].iter().collect();
            while let Some(m) = todo.pop() {
                if m == start {
                    found.push(format!("{start} (through {seen:?})"));
                    break;
                }
                if seen.insert(m.clone()) {
                    todo.extend(graph.get(m).into_iter().flatten());
                }
            }
        }
        found
    }

    #[test]
    fn no_file_imports_itself_through_a_sibling() {
        let folders = sibling_imports();
        assert!(folders.len() >= 6, "{folders:?}");
        let circles: Vec<String> = folders
            .iter()
            .flat_map(|(folder, graph)| {
                circles(graph)
                    .into_iter()
                    .map(move |c| format!("{folder}/{c}"))
            })
            .collect();
        assert!(
            circles.is_empty(),
            "files importing themselves back: {circles:#?}"
        );
    }

    #[test]
    fn no_module_imports_itself_through_another() {
        let graph = imports();
        assert!(graph.len() >= 6, "{graph:?}");
        for start in graph.keys() {
            // Every module reachable from `start`; reaching `start` again is a circle.
            let mut seen = BTreeSet::new();
            let mut todo: Vec<&String> = graph[start].iter().collect();
            while let Some(m) = todo.pop() {
                assert!(
                    m != start,
                    "{start} imports itself through {seen:?}: {graph:#?}"
                );
                if seen.insert(m.clone()) {
                    todo.extend(graph.get(m).into_iter().flatten());
                }
            }
        }
    }
}
