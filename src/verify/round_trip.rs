//! `verify --reverse`: proves on blue that each entry's rows come back from green's form
//! through the reverse mapping (reverse(forward(row)) equals the row on every carried column),
//! naming the key and column where they do not: what a way back after the switch would lose.

use crate::{
    error::{Error, Result},
    plan::{round_trip_sql, Plan, ResolvedPlan},
};

/// Differences shown per table.
const SHOWN: u64 = 100;

/// One entry's round trip.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundTrip {
    /// Target table.
    pub table: String,
    /// Why no way back exists for it, when none does.
    pub impossible: Option<String>,
    /// Columns carried back.
    pub carried: usize,
    /// At most 100 rows that would not come back unchanged.
    pub differences: Vec<Lost>,
}

/// A row that would not come back unchanged: key, column, blue's value, the value that comes back.
pub type Lost = (Vec<String>, String, Option<String>, Option<String>);

/// Runs the round trip over every entry (or the one `only` names), reading blue only.
pub async fn run(plan: &Plan, resolved: &ResolvedPlan, only: Option<&str>) -> Result<Vec<RoundTrip>> {
    let blue = plan.blue.connect().await?;
    blue.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(Error::db("blue: beginning the round trip"))?;
    let mut out = Vec::new();
    let names: Vec<String> = only.map(|o| vec![o.to_string()]).unwrap_or_default();
    if let Some(o) = only {
        if !resolved.tables.iter().any(|t| t.named_by_any(&names)) {
            return Err(Error::NoSuchTable { flag: "--table", name: o.to_string() });
        }
    }
    for t in resolved.tables.iter().filter(|t| only.is_none() || t.named_by_any(&names)) {
        let carried = t.reverse.columns.iter().filter(|c| t.reverse.expr(&c.column).is_some()).count();
        let mut differences = Vec::new();
        if t.reverse.impossible.is_none() {
            if let Some(sql) = round_trip_sql(t, None, SHOWN) {
                for r in blue.query(&sql, &[]).await.map_err(Error::db(format!("blue: round trip of {}", t.source)))? {
                    differences.push((r.get(0), r.get(1), r.get(2), r.get(3)));
                }
            }
        }
        out.push(RoundTrip {
            table: t.target.to_string(),
            impossible: t.reverse.impossible.clone(),
            carried,
            differences,
        });
    }
    let _ = blue.batch_execute("ROLLBACK").await;
    Ok(out)
}

/// The text report; the second value says whether every entry has a way back that loses nothing.
pub fn render_text(trips: &[RoundTrip]) -> (String, bool) {
    let mut o = String::new();
    let mut ok = true;
    for t in trips {
        match (&t.impossible, t.differences.is_empty()) {
            (Some(why), _) => {
                ok = false;
                o.push_str(&format!("reverse {}: no way back: {why}\n", t.table));
            }
            (None, true) => o.push_str(&format!(
                "reverse {}: every row comes back ({} column(s) carried back)\n",
                t.table, t.carried
            )),
            (None, false) => {
                ok = false;
                let more = if t.differences.len() as u64 >= SHOWN { " (the first 100)" } else { "" };
                o.push_str(&format!("reverse {}: {} difference(s){more}\n", t.table, t.differences.len()));
                for (key, col, blue, back) in &t.differences {
                    o.push_str(&format!(
                        "  key ({}) column {col}: blue {} comes back {}\n",
                        key.join(", "),
                        show(blue),
                        show(back)
                    ));
                }
            }
        }
    }
    o.push_str(if ok {
        "every table comes back from green's form unchanged\n"
    } else {
        "the way back would lose or change what is named above\n"
    });
    (o, ok)
}

fn show(v: &Option<String>) -> String {
    match v {
        Some(s) => format!("`{s}`"),
        None => "NULL".into(),
    }
}
