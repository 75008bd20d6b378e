//! User probes as hops (`profiler run --uprobe BINARY:SYMBOL[@LABEL]`): a function of a
//! userspace datapath that holds a frame, probed by profiler-ebpf's `up_hop`. Argument
//! convention: the first argument points to the frame from its Ethernet header on, the second
//! is its length (as a forwarder's receive or send function takes it). The probe's index in
//! the list is its attach cookie, which the event carries back.

use std::path::PathBuf;

use anyhow::{bail, Result};

/// One `--uprobe`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UprobeSpec {
    pub binary: PathBuf,
    pub symbol: String,
    /// The hop is named `uprobe:LABEL` (default: the symbol).
    pub label: String,
}

impl std::str::FromStr for UprobeSpec {
    type Err = anyhow::Error;

    /// BINARY:SYMBOL[@LABEL]; the binary must exist (the symbol is looked up when attaching).
    fn from_str(s: &str) -> Result<Self> {
        let (target, label) = match s.rsplit_once('@') {
            Some((t, l)) => (t, Some(l)),
            None => (s, None),
        };
        let Some((binary, symbol)) = target.rsplit_once(':') else {
            bail!("--uprobe {s}: expected BINARY:SYMBOL[@LABEL]");
        };
        if binary.is_empty() || symbol.is_empty() || label.is_some_and(str::is_empty) {
            bail!("--uprobe {s}: expected BINARY:SYMBOL[@LABEL]");
        }
        let binary = PathBuf::from(binary);
        if !binary.is_file() {
            bail!("--uprobe {s}: no file {}", binary.display());
        }
        Ok(UprobeSpec {
            binary,
            symbol: symbol.to_string(),
            label: label.unwrap_or(symbol).to_string(),
        })
    }
}

impl UprobeSpec {
    /// The hop's name.
    pub fn hop_name(&self) -> String {
        format!("uprobe:{}", self.label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_symbol_and_label() {
        let p: UprobeSpec = "/bin/sh:main@start".parse().expect("a valid --uprobe");
        assert_eq!(p.binary, PathBuf::from("/bin/sh"));
        assert_eq!((p.symbol.as_str(), p.label.as_str()), ("main", "start"));
        let p: UprobeSpec = "/bin/sh:main".parse().expect("no label");
        assert_eq!(p.hop_name(), "uprobe:main");
    }

    #[test]
    fn refuses_malformed_ones_in_one_line() {
        for bad in [
            "/bin/sh",
            "/bin/sh:",
            ":main",
            "/bin/sh:main@",
            "/no/such:f",
        ] {
            let e = bad.parse::<UprobeSpec>().expect_err(bad).to_string();
            assert!(
                e.starts_with("--uprobe ") && !e.contains('\n'),
                "{bad}: {e}"
            );
        }
    }
}
