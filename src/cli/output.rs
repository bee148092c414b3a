//! Output formats shared by the subcommands: a kubectl-style table, JSON or YAML.

use std::io::Write;

use comfy_table::{ContentArrangement, Table, presets::NOTHING};
use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Writes `value` as JSON or YAML; `None` for the table format, which each command renders.
pub fn structured<T: Serialize>(
    format: OutputFormat,
    value: &T,
    out: &mut impl Write,
) -> anyhow::Result<bool> {
    match format {
        OutputFormat::Table => return Ok(false),
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, value)?;
            writeln!(out)?;
        }
        OutputFormat::Yaml => serde_yaml::to_writer(&mut *out, value)?,
    }
    Ok(true)
}

/// A borderless table with upper-case headers, like `kubectl get`.
pub fn table(headers: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    table.set_header(headers.iter().map(|h| h.to_uppercase()));
    for column in table.column_iter_mut() {
        column.set_padding((0, 3));
    }
    table
}

/// Writes a table without the trailing spaces comfy-table pads its last column with.
pub fn write_table(table: &Table, out: &mut impl Write) -> std::io::Result<()> {
    for line in table.lines() {
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// A duration as kubectl prints ages: `42s`, `5m`, `3h12m`, `2d4h`.
pub fn human_duration(millis: u64) -> String {
    let secs = millis / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(999), "0s");
        assert_eq!(human_duration(42_000), "42s");
        assert_eq!(human_duration(5 * 60_000 + 1), "5m");
        assert_eq!(human_duration((3 * 3600 + 12 * 60) * 1000), "3h12m");
        assert_eq!(human_duration((2 * 86_400 + 4 * 3600) * 1000), "2d4h");
    }
}
