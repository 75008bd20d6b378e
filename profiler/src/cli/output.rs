//! Where a command's report goes: JSON to a file checked before any work and written
//! atomically, or to stdout, and the table for people.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

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
            return Err(crate::error::bad_input(format!(
                "{flag} {}: directory {} does not exist",
                arg.display(),
                dir.display()
            )));
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

    /// A stream of lines (`attach --sightings`): the file is written as they come, not
    /// renamed at the end, so a reader may follow it.
    pub fn writer(&self) -> Result<Box<dyn std::io::Write + Send + Sync>> {
        Ok(match self {
            JsonOut::Stdout => Box::new(std::io::stdout()),
            JsonOut::File(path) => Box::new(
                std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?,
            ),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

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
