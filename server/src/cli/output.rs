//! Output of the operator CLI: aligned columns for people (`table`), or the REST API's own
//! JSON shapes as JSON or YAML for scripts. Tables are for reading only; scripts parse json.

use std::io::Write;

use clap::ValueEnum;
use serde::Deserialize;
use serde_json::Value;

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Aligned columns, for people.
    Table,
    /// The REST API's JSON.
    Json,
    /// The same as YAML.
    Yaml,
    /// Only the identifiers (agent uids, command ids), one per line: for `$(…)` in scripts.
    Name,
}

/// The identifiers in a REST answer: an object's `uid`, `id` or `command_id`, else those of
/// its `commands` (a fan-out) or `targets` (a plan); every item's for a list.
pub fn names(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a.iter().flat_map(names).collect(),
        Value::Object(m) => {
            for k in ["uid", "id", "command_id"] {
                if let Some(s) = m.get(k).and_then(Value::as_str) {
                    return vec![s.to_string()];
                }
            }
            for k in ["commands", "targets"] {
                if let Some(a) = m.get(k).and_then(Value::as_array) {
                    return a.iter().flat_map(names).collect();
                }
            }
            Vec::new()
        }
        _ => Vec::new(),
    }
}

/// Prints `v` as JSON, YAML or its names (for `table`, callers render their own columns).
pub fn print_data(format: Format, v: &Value) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Name => {
            for n in names(v) {
                writeln!(out, "{n}")?;
            }
            Ok(())
        }
        Format::Yaml => {
            let text = serde_yaml_ng::to_string(v)
                .map_err(|e| std::io::Error::other(format!("YAML: {e}")))?;
            out.write_all(text.as_bytes())
        }
        Format::Json | Format::Table => {
            serde_json::to_writer_pretty(&mut out, v)?;
            out.write_all(b"\n")
        }
    }
}

/// Columns separated by at least two spaces, like `kubectl get`. Cells are single-line.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut tw = tabwriter::TabWriter::new(std::io::stdout().lock()).padding(2);
    writeln!(tw, "{}", headers.join("\t"))?;
    for r in rows {
        let cells: Vec<String> = r.iter().map(|c| one_line(c)).collect();
        writeln!(tw, "{}", cells.join("\t"))?;
    }
    tw.flush()
}

/// `KEY: value` lines for one object.
pub fn print_fields(fields: &[(&str, String)]) -> std::io::Result<()> {
    let mut tw = tabwriter::TabWriter::new(std::io::stdout().lock()).padding(1);
    for (k, v) in fields {
        writeln!(tw, "{k}:\t{}", one_line(v))?;
    }
    tw.flush()
}

fn one_line(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

/// A JSON value as a table cell: strings bare, null as `-`, everything else as compact JSON.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Object(m) if m.is_empty() => "-".into(),
        other => other.to_string(),
    }
}

/// `{"a":"1","b":"2"}` as `a=1,b=2` (labels).
pub fn pairs(v: &Value) -> String {
    match v.as_object() {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.as_str().map_or_else(|| v.to_string(), str::to_string)
                )
            })
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cells_are_compact() {
        assert_eq!(cell(&json!(null)), "-");
        assert_eq!(cell(&json!("x")), "x");
        assert_eq!(cell(&json!(true)), "true");
        assert_eq!(
            pairs(&json!({"env": "prod", "tier": "web"})),
            "env=prod,tier=web"
        );
        assert_eq!(pairs(&json!({})), "-");
        assert_eq!(one_line("a\tb\nc"), "a b c");
    }

    #[test]
    fn names_are_the_identifiers() {
        assert_eq!(names(&json!([{"uid": "a"}, {"uid": "b"}])), ["a", "b"]);
        assert_eq!(
            names(&json!({"command_id": "c", "command": {"id": "c"}})),
            ["c"]
        );
        assert_eq!(
            names(&json!({"batch_id": "b", "commands": [{"agent_uid": "a", "command_id": "c1"}]})),
            ["c1"]
        );
        assert_eq!(
            names(&json!({"dry_run": true, "targets": [{"uid": "u"}]})),
            ["u"]
        );
        assert_eq!(
            names(&json!({"batch": {"id": "b"}, "commands": [{"command_id": "c2"}]})),
            ["c2"]
        );
    }
}
