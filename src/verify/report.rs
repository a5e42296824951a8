//! `migrate verify` output: a summary table per table, then every persisting difference by key
//! and column; or the same as JSON.

use std::fmt::Write;

use super::{Kind, Report};

/// Text report.
pub fn render_text(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "verify {} ({:.1}s)", r.plan, r.seconds);
    // The first column is as wide as the longest name, so long names never push the numbers.
    let w = r.tables.iter().map(|t| t.table.chars().count()).max().unwrap_or(0).max("table".len());
    let _ = writeln!(
        o,
        "  {:<w$} {:>8} {:>10} {:>10} {:>9} {:>11} {:>7}",
        "table", "buckets", "rows blue", "rows green", "matched", "differences", "time"
    );
    for t in &r.tables {
        if let Some(n) = t.changed_keys {
            let _ = writeln!(
                o,
                "  {:<w$} {n} key(s) changed since its last clean verify checked: {} difference(s) {:>6.1}s",
                t.table, t.differences_total, t.seconds
            );
            continue;
        }
        let _ = writeln!(
            o,
            "  {:<w$} {:>8} {:>10} {:>10} {:>9} {:>11} {:>6.1}s",
            t.table,
            t.buckets,
            t.rows_blue,
            t.rows_green,
            t.buckets - t.buckets_differing,
            t.differences_total,
            t.seconds
        );
    }
    for t in r.tables.iter().filter(|t| t.differences_total > 0) {
        let _ = writeln!(
            o,
            "\n{}: {} difference(s){}",
            t.table,
            t.differences_total,
            if t.differences_total > t.differences.len() {
                format!(", first {} shown", t.differences.len())
            } else {
                String::new()
            }
        );
        for d in &t.differences {
            let key = d.key.join(", ");
            match d.kind {
                Kind::MissingOnGreen => {
                    let _ = writeln!(o, "  key ({key}): missing on green");
                }
                Kind::ExtraOnGreen => {
                    let _ = writeln!(o, "  key ({key}): extra on green (not on blue, or filtered out)");
                }
                Kind::Differs => {
                    for (col, b, g) in &d.columns {
                        let show = |v: &Option<String>| {
                            v.as_deref().map(|s| format!("{s:?}")).unwrap_or_else(|| "NULL".into())
                        };
                        let _ = writeln!(o, "  key ({key}): column {col} differs: blue {} green {}", show(b), show(g));
                    }
                }
            }
        }
    }
    let _ = writeln!(o, "\n{}", if r.equal { "green equals transform(blue)" } else { "DIFFERENCES FOUND" });
    o
}

/// JSON report.
pub fn render_json(r: &Report) -> String {
    serde_json::to_string_pretty(r).unwrap_or_default() + "\n"
}
