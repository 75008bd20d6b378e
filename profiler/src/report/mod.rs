//! Reports: one schema for every command's JSON ([`schema`]), the tables people read
//! ([`table`]) and an HTML page with the waterfalls drawn ([`html`]). Collection is separate
//! from rendering: `profiler report FILE` re-renders a saved report exactly as the command that
//! made it printed it.

pub mod bench;
pub mod charts;
pub mod html;
pub mod schema;
pub mod table;

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use serde::de::DeserializeOwned;

use schema::{
    AttachReport, BenchReport, CompareReport, DoctorReport, RunReport, ATTACH_SCHEMA, BENCH_SCHEMA,
    COMPARE_SCHEMA, DOCTOR_SCHEMA, RUN_SCHEMA, SCHEMAS,
};

/// Any report the profiler writes.
#[derive(Debug)]
pub enum Report {
    Run(RunReport),
    Attach(AttachReport),
    Compare(CompareReport),
    Bench(BenchReport),
    Doctor(DoctorReport),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The table the command printed.
    Table,
    /// The JSON again, as the command wrote it.
    Json,
    /// A self-contained HTML page with the waterfalls drawn.
    Html,
    /// An attach report's drops: by reason, then where and what, the most first.
    Drops,
}

/// Reads the file at `path` and parses it with `parse`; its errors, in one line, say the path.
pub fn read_with<T>(path: &Path, parse: impl FnOnce(&str) -> Result<T>) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&text).map_err(|e| anyhow!("{}: {e:#}", path.display()))
}

/// A saved file's JSON and its "schema" field; if it has none, says it is not `what` ("a
/// profiler report", "a run's events").
pub fn schema_of(text: &str, what: &str) -> Result<(serde_json::Value, String)> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| anyhow!("not {what} (not JSON: {e})"))?;
    let schema = (value
        .get("schema")
        .and_then(|s| s.as_str())
        .map(str::to_string))
    .ok_or_else(|| anyhow!("not {what} (no \"schema\" field)"))?;
    Ok((value, schema))
}

impl Report {
    /// Reads a saved report; a file that is not a profiler report, or of a schema this version
    /// does not know, is refused in one line.
    pub fn read(path: &Path) -> Result<Report> {
        read_with(path, Report::parse)
    }

    pub fn parse(text: &str) -> Result<Report> {
        let (value, schema) = schema_of(text, "a profiler report")?;
        match schema.as_str() {
            RUN_SCHEMA => typed(value, &schema).map(Report::Run),
            ATTACH_SCHEMA => typed(value, &schema).map(Report::Attach),
            COMPARE_SCHEMA => typed(value, &schema).map(Report::Compare),
            BENCH_SCHEMA => typed(value, &schema).map(Report::Bench),
            DOCTOR_SCHEMA => typed(value, &schema).map(Report::Doctor),
            // run/record.rs's: attributed by `report --events`, which needs the run layer.
            events if events.starts_with("profiler.events.") => bail!(
                "schema {events} is a run's events, not a report: `profiler report --events FILE` attributes them"
            ),
            other if other.starts_with("profiler.") => bail!(
                "schema {other} is not one this profiler reads ({}): a report of another version",
                SCHEMAS.join(", ")
            ),
            other => bail!("not a profiler report (schema {other:?})"),
        }
    }

    pub fn render(&self, format: Format) -> Result<String> {
        Ok(match format {
            Format::Table => self.table(),
            Format::Json => self.json()? + "\n",
            Format::Html => html::page(self),
            Format::Drops => match self {
                Report::Attach(r) => table::drops(r, false),
                _ => bail!("--format drops is for the reports of `profiler attach`"),
            },
        })
    }

    /// The table the command that made this report printed.
    pub fn table(&self) -> String {
        match self {
            Report::Run(r) => table::run(r),
            Report::Attach(r) => table::attach(r, false),
            Report::Compare(r) => table::compare(r),
            Report::Bench(r) => bench::table(r),
            Report::Doctor(r) => table::doctor(r),
        }
    }

    pub fn json(&self) -> Result<String> {
        Ok(match self {
            Report::Run(r) => serde_json::to_string_pretty(r)?,
            Report::Attach(r) => serde_json::to_string_pretty(r)?,
            Report::Compare(r) => serde_json::to_string_pretty(r)?,
            Report::Bench(r) => serde_json::to_string_pretty(r)?,
            Report::Doctor(r) => serde_json::to_string_pretty(r)?,
        })
    }
}

fn typed<T: DeserializeOwned>(value: serde_json::Value, schema: &str) -> Result<T> {
    serde_json::from_value(value).map_err(|e| anyhow!("not a valid {schema} report: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_report_in_one_line() {
        for (text, want) in [
            ("hello", "not JSON"),
            ("{}", "no \"schema\" field"),
            (r#"{"schema": "other.v1"}"#, "schema \"other.v1\""),
            (r#"{"schema": "profiler.run.v9"}"#, "another version"),
            (
                r#"{"schema": "profiler.run.v1"}"#,
                "not a valid profiler.run.v1 report",
            ),
        ] {
            let e = format!("{:#}", Report::parse(text).expect_err(text));
            assert!(e.contains(want), "{text}: {e}");
            assert!(!e.contains('\n'), "{text}: {e}");
        }
    }
}
