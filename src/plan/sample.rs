//! The transform run over a sample of blue's real rows while planning, so that a value a type
//! cannot take (a DMY date read as MDY, `abc` into an integer) shows at plan time, with its
//! column, instead of failing `copy` half-way.

use tokio_postgres::Client;

use super::{Problem, ResolvedTable};
use crate::{
    error::{pg_message, Error, Result},
    pg::ident,
};

/// Rows of each table the transform runs over (a random sample of larger tables).
pub const SAMPLE_ROWS: u64 = 1000;

/// Runs `t`'s transform over up to [`SAMPLE_ROWS`] of blue's rows, in a read-only transaction.
/// Returns how many rows it read; a failure becomes a problem naming the first column that
/// fails alone (or the entry, when none does).
pub async fn sample(blue: &Client, t: &ResolvedTable, problems: &mut Vec<Problem>) -> Result<u64> {
    // Every value is rendered as text (`length(s::text)`), so no expression can be skipped as
    // an unused output; in a read-only transaction with a time limit.
    let rows = t.estimate.rows.max(1);
    let percent = if rows <= SAMPLE_ROWS { 100.0 } else { (SAMPLE_ROWS as f64 * 300.0 / rows as f64).min(100.0) };
    let from = sampled_from(t, percent);
    let filter = t.filter.as_ref().map(|f| format!(" WHERE ({f})")).unwrap_or_default();
    let run = |list: String| {
        format!("SELECT count(*)::int8, sum(length(s::text)) FROM (SELECT {list} FROM {from}{filter} LIMIT {SAMPLE_ROWS}) s")
    };
    // The filter first, alone: a failure there is the filter's.
    if let Some(f) = &t.filter {
        let sql = format!("SELECT count(*)::int8 FROM (SELECT 1 FROM {from} WHERE ({f}) LIMIT {SAMPLE_ROWS}) s");
        if let Err(e) = read_only(blue, &sql).await? {
            problems.push(Problem {
                field: format!("table[{}].filter", t.index),
                line: Some(t.line),
                table: Some(t.target.to_string()),
                column: None,
                message: format!("filter `{f}` fails on blue's rows of {}: {}", t.source, failure(blue, &e)),
                fix: Some(
                    "make the filter hold for every row blue holds (plan ran it over a sample of real rows)".into(),
                ),
            });
            return Ok(0);
        }
    }
    match read_only(blue, &run(t.select_list())).await? {
        Ok(n) => return Ok(n),
        Err(whole) => {
            for c in t.mapped() {
                let list =
                    format!("({})::{} AS {}", c.expr.as_deref().unwrap_or("NULL"), c.target_type, ident(&c.name));
                if let Err(e) = read_only(blue, &run(list)).await? {
                    problems.push(problem(t, Some(&c.name), &e));
                    return Ok(0);
                }
            }
            problems.push(problem(t, None, &whole));
        }
    }
    Ok(0)
}

/// The entry's FROM clause with the driving table sampled (`percent` of its rows).
fn sampled_from(t: &ResolvedTable, percent: f64) -> String {
    let joins: String = t.joins.iter().map(super::ResolvedJoin::render).collect();
    let item = match &t.alias {
        Some(a) => format!("{} AS {}", t.source.quoted(), ident(a)),
        None => t.source.quoted(),
    };
    format!("{item} TABLESAMPLE BERNOULLI ({percent}) REPEATABLE (7){joins}")
}

/// One transformed row: (target column, value as text), in target order.
pub type Row = Vec<(String, Option<String>)>;

/// Up to `n` rows of `t` as green would receive them (from a sample of blue's rows, the filter
/// applied), each as (target column, value as text); in a read-only transaction.
pub async fn rows(blue: &Client, t: &ResolvedTable, n: usize) -> Result<Vec<Row>> {
    let rows = t.estimate.rows.max(1);
    let percent = if rows <= SAMPLE_ROWS { 100.0 } else { (SAMPLE_ROWS as f64 * 300.0 / rows as f64).min(100.0) };
    let filter = t.filter.as_ref().map(|f| format!(" WHERE ({f})")).unwrap_or_default();
    let sql = format!("SELECT {} FROM {}{filter} LIMIT {n}", t.select_list(), sampled_from(t, percent));
    blue.batch_execute("BEGIN READ ONLY; SET LOCAL statement_timeout = '30s'")
        .await
        .map_err(Error::db("blue: sampling rows"))?;
    let got = blue.simple_query(&sql).await;
    let _ = blue.batch_execute("ROLLBACK").await;
    let got = got.map_err(Error::db(format!("blue: sampling rows of {}", t.source)))?;
    let names: Vec<String> = t.mapped().map(|c| c.name.clone()).collect();
    Ok(got
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some(names.iter().enumerate().map(|(i, c)| (c.clone(), r.get(i).map(str::to_string))).collect())
            }
            _ => None,
        })
        .collect())
}

fn problem(t: &ResolvedTable, column: Option<&str>, e: &tokio_postgres::Error) -> Problem {
    Problem {
        field: match column {
            Some(c) => format!("table[{}].columns.{c}", t.index),
            None => format!("table[{}]", t.index),
        },
        line: Some(t.line),
        table: Some(t.target.to_string()),
        column: column.map(str::to_string),
        message: format!("the transform fails on blue's rows of {}: {}", t.source, pg_message(e)),
        fix: Some("make the expression accept every value blue holds (plan ran it over a sample of real rows)".into()),
    }
}

/// What a failed sample says, with a session the expression itself ended named as such.
fn failure(blue: &Client, e: &tokio_postgres::Error) -> String {
    if blue.is_closed() {
        format!("it ended plan's own session on blue ({})", pg_message(e))
    } else {
        pg_message(e)
    }
}

/// Runs `sql` in a read-only transaction bounded in time: `Ok(Ok(rows))`, or `Ok(Err(e))` when
/// the statement failed (a finding, not a failure of `plan`), including by ending the session.
async fn read_only(blue: &Client, sql: &str) -> Result<std::result::Result<u64, tokio_postgres::Error>> {
    Ok(read_only_rows(blue, sql).await?.map(|rows| rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64)))
}

/// Runs `sql` on blue in a read-only transaction of at most 30 s (rolled back): `Ok(Err(e))`
/// when the statement failed, which is a finding of `plan`, not a failure of it.
pub(super) async fn read_only_rows(
    blue: &Client,
    sql: &str,
) -> Result<std::result::Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>> {
    blue.batch_execute("BEGIN READ ONLY; SET LOCAL statement_timeout = '30s'")
        .await
        .map_err(Error::db("blue: sampling rows"))?;
    let r = blue.query(sql, &[]).await;
    if !blue.is_closed() {
        let _ = blue.batch_execute("ROLLBACK").await;
    }
    Ok(r)
}
