//! `migrate plan`: the resolved mapping, prerequisites and steps, or the file checks alone.

use super::{connect_both, Format, Outcome};
use crate::{
    error::{Error, Result},
    plan::{render_json, render_text, Plan},
};

/// Runs `plan` and prints its report. An unreachable side is a found problem (exit 1), named.
pub async fn run(plan: &Plan, format: Format, offline: bool, rows: usize) -> Result<Outcome> {
    let mut samples = Vec::new();
    let resolved = if offline {
        None
    } else {
        match connect_both(plan).await {
            Ok((blue, green)) => {
                let mut r = crate::plan::resolve(plan, &blue, &green).await?;
                if plan.cutover.way_back && !blue.is_closed() {
                    // What the cutover's preflight will refuse, said before the copy starts.
                    let problems = crate::way_back::problems(&r, &blue).await?;
                    r.checks.push(crate::plan::Check {
                        name: "way back (cutover.way_back)".into(),
                        ok: problems.is_empty(),
                        detail: if problems.is_empty() {
                            format!("every entry ({}) can be carried back after the switch", r.tables.len())
                        } else {
                            format!("the cutover will refuse: {}", problems.join("; "))
                        },
                    });
                }
                // Only tables whose transform ran clean over the sample.
                for t in r.tables.iter().filter(|_| rows > 0 && !blue.is_closed()) {
                    let target = t.target.to_string();
                    if r.problems.iter().any(|p| p.table.as_deref() == Some(target.as_str())) {
                        continue;
                    }
                    samples.push((t.clone(), crate::plan::sample::rows(&blue, t, rows).await?));
                }
                Some(r)
            }
            Err(e @ Error::Connect(_)) => {
                eprintln!("error: {e}");
                return Ok(Outcome::Problems);
            }
            Err(e) => return Err(e),
        }
    };
    let out = match format {
        Format::Text => render_text(plan, resolved.as_ref()) + &rows_text(&samples),
        Format::Json => {
            let mut v: serde_json::Value =
                serde_json::from_str(&render_json(plan, resolved.as_ref())).unwrap_or_default();
            if !samples.is_empty() {
                v["sample_rows"] = samples
                    .iter()
                    .map(|(t, rows)| {
                        let rows: Vec<serde_json::Map<String, serde_json::Value>> = rows
                            .iter()
                            .map(|r| r.iter().map(|(c, v)| (c.clone(), serde_json::json!(v))).collect())
                            .collect();
                        serde_json::json!({ "table": format!("table[{}]", t.index), "target": t.target.to_string(), "rows": rows })
                    })
                    .collect();
            }
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
        }
    };
    print!("{out}");
    Ok(match resolved {
        Some(r) if !r.problems.is_empty() => Outcome::Problems,
        _ => Outcome::Ok,
    })
}

/// `--rows`: each table's sample rows as green would receive them, one `column  value` line each.
fn rows_text(samples: &[(crate::plan::ResolvedTable, Vec<crate::plan::sample::Row>)]) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    if samples.is_empty() {
        return o;
    }
    let _ = writeln!(o, "\nrows as green would receive them (a sample of blue's rows, transformed)");
    for (t, rows) in samples {
        let _ = writeln!(o, "table[{}] {} -> {}: {} row(s)", t.index, t.source, t.target, rows.len());
        for (n, row) in rows.iter().enumerate() {
            let width = row.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
            let _ = writeln!(o, "  row {}", n + 1);
            for (c, v) in row {
                let _ = writeln!(o, "    {c:<width$}  {}", v.as_deref().unwrap_or("NULL"));
            }
        }
    }
    o
}
