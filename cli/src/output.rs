//! Tables for people, JSON for scripts.

use std::io::Write;

use serde_json::Value;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    #[default]
    Table,
    /// The API's JSON, one document (a list for lists).
    Json,
}

/// A column: its heading and the JSON pointer of its value in each item.
pub type Column = (&'static str, &'static str);

fn cell(item: &Value, pointer: &str) -> String {
    match item.pointer(pointer) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        Some(v) => v.to_string(),
    }
}

/// Prints `items` as a table of `columns` (or as JSON).
pub fn list(
    out: &mut impl Write,
    format: Format,
    items: &[Value],
    columns: &[Column],
) -> std::io::Result<()> {
    if format == Format::Json {
        serde_json::to_writer_pretty(&mut *out, items)?;
        return writeln!(out);
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| columns.iter().map(|(_, p)| cell(item, p)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |out: &mut dyn Write, cells: Vec<String>| -> std::io::Result<()> {
        let last = cells.len().saturating_sub(1);
        let text: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c
                } else {
                    format!("{c:<width$}", width = widths[i])
                }
            })
            .collect();
        writeln!(out, "{}", text.join("  ").trim_end())
    };
    line(out, columns.iter().map(|(h, _)| (*h).to_owned()).collect())?;
    for row in rows {
        line(out, row)?;
    }
    Ok(())
}

/// Prints one item as `field: value` lines (or as JSON).
pub fn item(out: &mut impl Write, format: Format, item: &Value) -> std::io::Result<()> {
    if format == Format::Json {
        serde_json::to_writer_pretty(&mut *out, item)?;
        return writeln!(out);
    }
    match item {
        Value::Object(fields) => {
            let width = fields.keys().map(String::len).max().unwrap_or(0);
            for (k, v) in fields {
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".into(),
                    v => v.to_string(),
                };
                writeln!(out, "{k:<width$}  {text}")?;
            }
            Ok(())
        }
        v => writeln!(out, "{v}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_table_aligns_its_columns_and_marks_missing_values() {
        let items = [
            json!({"name": "alice", "workspace": "research", "x": null}),
            json!({"name": "bo", "workspace": "ops"}),
        ];
        let mut out = Vec::new();
        list(
            &mut out,
            Format::Table,
            &items,
            &[("NAME", "/name"), ("WORKSPACE", "/workspace"), ("X", "/x")],
        )
        .expect("written");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "NAME   WORKSPACE  X\nalice  research   -\nbo     ops        -\n"
        );
    }
}
