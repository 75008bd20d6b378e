//! What every command of the CLI (main.rs) shares: values parsed with ranges that cannot panic
//! later, reports written atomically to a place checked before any work, and progress on
//! stderr for people (a bar with rate and ETA; nothing when stderr is not a terminal).

use std::{
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};

/// A duration as people write it: `6` (seconds), `6s`, `500ms`, `2m`, `1h 30m`, within
/// `min..=max`.
pub fn duration_within(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = match s.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 && secs <= max.as_secs_f64() => {
            Duration::from_secs_f64(secs)
        }
        Ok(_) => return Err(range(s, min, max)),
        Err(_) => humantime::parse_duration(s.trim())
            .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 6, 6s, 500ms or 2m"))?,
    };
    if d < min || d > max {
        return Err(range(s, min, max));
    }
    Ok(d)
}

fn range(s: &str, min: Duration, max: Duration) -> String {
    format!(
        "{s:?} is out of range: from {} to {}",
        humantime::format_duration(min),
        humantime::format_duration(max)
    )
}

/// A number within `min..=max` (finite: NaN and infinities are refused).
pub fn number_within(s: &str, min: f64, max: f64) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        Ok(_) => Err(format!("{s} is out of range: from {min} to {max}")),
        Err(_) => Err(format!("{s:?} is not a number")),
    }
}

/// Where a `--json` report goes: stdout ("-") or a file, checked before any work is done.
#[derive(Clone, Debug)]
pub enum JsonOut {
    Stdout,
    File(PathBuf),
}

impl JsonOut {
    /// "-" or a file whose directory exists and is writable (tried by creating a file there).
    pub fn checked(arg: &Path) -> Result<JsonOut> {
        JsonOut::checked_as("--json", arg)
    }

    /// As [`JsonOut::checked`], for the option `flag` (--html, --markdown, ...).
    pub fn checked_as(flag: &str, arg: &Path) -> Result<JsonOut> {
        if arg.as_os_str() == "-" {
            return Ok(JsonOut::Stdout);
        }
        let dir = match arg.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            bail!(
                "{flag} {}: directory {} does not exist",
                arg.display(),
                dir.display()
            );
        }
        let probe = temporary(arg);
        std::fs::File::create(&probe).with_context(|| {
            format!(
                "{flag} {}: cannot write in {}",
                arg.display(),
                dir.display()
            )
        })?;
        let _ = std::fs::remove_file(&probe);
        Ok(JsonOut::File(arg.to_path_buf()))
    }

    /// Writes `value` as pretty JSON; a file through a temporary one and a rename, so a crash
    /// never leaves half a report.
    pub fn write(&self, value: &impl serde::Serialize) -> Result<()> {
        self.write_text(&(serde_json::to_string_pretty(value)? + "\n"))
    }

    /// Writes `text` the same way (HTML, Markdown).
    pub fn write_text(&self, json: &str) -> Result<()> {
        match self {
            JsonOut::Stdout => print!("{json}"),
            JsonOut::File(path) => {
                let tmp = temporary(path);
                std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
                std::fs::rename(&tmp, path)
                    .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
            }
        }
        Ok(())
    }
}

/// A file beside `path` that no other process picks.
fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes the report: JSON to a file (then the table on stdout), JSON alone on stdout for
/// "-", else the table.
pub fn output(json: Option<&JsonOut>, value: &impl serde::Serialize, table: &str) -> Result<()> {
    match json {
        Some(JsonOut::Stdout) => JsonOut::Stdout.write(value),
        Some(file) => {
            file.write(value)?;
            print!("{table}");
            std::io::stdout().flush()?;
            Ok(())
        }
        None => {
            print!("{table}");
            Ok(())
        }
    }
}

/// Progress of long work on stderr: a bar with rate and ETA where stderr is a terminal and
/// `quiet` is off, nothing otherwise (logs and pipes get no redrawn lines).
pub fn progress(total: u64, unit: &str, quiet: bool) -> ProgressBar {
    if !shown(quiet) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
        .with_finish(ProgressFinish::AndClear);
    let template = format!("{{bar:30}} {{pos}}/{{len}} {unit} ({{per_sec}}, ETA {{eta}}) {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

/// Progress is for people: on a terminal, unless --quiet.
fn shown(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

/// Work of unknown length on stderr: a spinner with a message, under the same rules.
pub fn spinner(quiet: bool) -> ProgressBar {
    if !shown(quiet) {
        return ProgressBar::hidden();
    }
    ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        .with_finish(ProgressFinish::AndClear)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn durations_as_people_write_them() {
        let day = Duration::from_secs(86_400);
        let ok = |s: &str| duration_within(s, Duration::from_millis(1), day).expect(s);
        assert_eq!(ok("6"), 6 * S);
        assert_eq!(ok("6s"), 6 * S);
        assert_eq!(ok("0.5"), S / 2);
        assert_eq!(ok("500ms"), S / 2);
        assert_eq!(ok("2m"), 120 * S);
        assert_eq!(ok("1h 30m"), 5400 * S);
        for bad in ["1e20", "-1", "NaN", "inf", "0", "2d", "soon", ""] {
            let e = duration_within(bad, Duration::from_millis(1), day).expect_err(bad);
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn numbers_outside_their_range_are_refused() {
        assert_eq!(number_within("25", 0.1, 1e6), Ok(25.0));
        for bad in ["1e-20", "0", "-3", "1e7", "NaN", "inf", "x"] {
            assert!(number_within(bad, 0.1, 1e6).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_json_path_in_a_missing_directory_is_refused() {
        let e = JsonOut::checked(Path::new("/nonexistent-dir/run.json")).expect_err("refused");
        assert!(format!("{e:#}").contains("does not exist"), "{e:#}");
        assert!(matches!(
            JsonOut::checked(Path::new("-")),
            Ok(JsonOut::Stdout)
        ));
    }

    #[test]
    fn a_report_is_written_whole_and_nothing_else_is_left() {
        let dir = std::env::temp_dir().join(format!("profiler-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let path = dir.join("r.json");
        let out = JsonOut::checked(&path).expect("a writable directory");
        out.write(&serde_json::json!({"a": 1})).expect("written");
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("the file")).expect("JSON");
        assert_eq!(back["a"], 1);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("r.json")]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
