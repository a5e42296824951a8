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
    let Sampled { from, thin } = sampled(blue, t).await?;
    let filter = t.sample_where(thin.as_deref());
    let run = |list: String| {
        format!("SELECT count(*)::int8, sum(length(s::text)) FROM (SELECT {list} FROM {from}{filter} LIMIT {SAMPLE_ROWS}) s")
    };
    // The filter first, alone: a failure there is the filter's.
    if let Some(f) = &t.filter {
        let sql = format!("SELECT count(*)::int8 FROM (SELECT 1 FROM {from}{filter} LIMIT {SAMPLE_ROWS}) s");
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

/// Blocks of the driving table a sample reads, about (8 MB of 8 kB blocks), whatever its size.
const SAMPLE_BLOCKS: f64 = 1000.0;

/// A sample's FROM clause, and the condition that thins the rows of its blocks.
struct Sampled {
    from: String,
    thin: Option<String>,
}

/// The entry's FROM clause with the driving table sampled by blocks, and a condition keeping
/// about one row in `k` of them, so that about [`SAMPLE_ROWS`] rows come from about
/// [`SAMPLE_BLOCKS`] blocks spread over the whole table.
///
/// Blocks (`SYSTEM`), not rows (`BERNOULLI`): a row sample visits every block until its `LIMIT`
/// is met, which was a third of the table (3x the rows it needed, in physical order) in every
/// `copy`, `verify` and `cutover`: 1.6 s on a 100M-row table (15 GB heap) warm, more from disk,
/// and past the 30 s statement limit (a false "transform fails") on larger or colder ones. A
/// block sample reads its blocks only, and thinning them instead of stopping at the `LIMIT`
/// keeps rows from the end of the table in the sample, which the row sample never reached.
async fn sampled(blue: &Client, t: &ResolvedTable) -> Result<Sampled> {
    let rows = t.estimate.rows.max(1) as f64;
    // Bounded in time like the sample itself (its relation lock waits behind an ACCESS
    // EXCLUSIVE one); when it cannot be read, the estimate's bytes (indexes included: fewer
    // blocks sampled, not more) stand in.
    let size = format!(
        "SELECT (coalesce(nullif(pg_relation_size({rel}::regclass), 0), \
           (SELECT sum(pg_relation_size(relid)) FROM pg_partition_tree({rel}::regclass) WHERE isleaf), 0) \
           / current_setting('block_size')::int8)::float8",
        rel = crate::pg::literal(&t.source.quoted())
    );
    let blocks = match read_only_rows(blue, &size).await? {
        Ok(r) => r.first().map_or(0.0, |r| r.get::<_, f64>(0)),
        Err(_) => t.estimate.bytes as f64 / 8192.0,
    };
    let (percent, k) = sampling(rows, blocks);
    let joins: String = t.joins.iter().map(super::ResolvedJoin::render).collect();
    let item = match &t.alias {
        Some(a) => format!("{} AS {}", t.source.quoted(), ident(a)),
        None => t.source.quoted(),
    };
    Ok(Sampled {
        from: format!("{item} TABLESAMPLE SYSTEM ({percent}) REPEATABLE (7){joins}"),
        thin: (k > 1).then(|| format!("hashtext({}.ctid::text) % {k} = 0", t.qualifier())),
    })
}

/// The percentage of blocks to sample and `k` (keep one row in `k`) for a table of `rows` rows
/// in `blocks` blocks (estimates): between half of [`SAMPLE_ROWS`] and all of it expected, so
/// that the `LIMIT` rarely stops the scan before the table's end.
fn sampling(rows: f64, blocks: f64) -> (f64, u64) {
    // Up to SAMPLE_ROWS rows are read whole, as before, unless they are spread over so many
    // blocks (a bloated queue table, or statistics from before a bulk load) that reading them
    // all would not be cheap.
    let whole = blocks <= SAMPLE_BLOCKS || (rows <= SAMPLE_ROWS as f64 && blocks <= 10.0 * SAMPLE_BLOCKS);
    let percent = if whole { 100.0 } else { SAMPLE_BLOCKS * 100.0 / blocks };
    let in_sampled = rows * percent / 100.0;
    (percent, (in_sampled / SAMPLE_ROWS as f64).ceil().max(1.0) as u64)
}

impl ResolvedTable {
    /// ` WHERE …` of a sample: the entry's filter and the thinning condition, either or both.
    fn sample_where(&self, thin: Option<&str>) -> String {
        let parts: Vec<String> = self.filter.iter().map(|f| format!("({f})")).chain(thin.map(str::to_string)).collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", parts.join(" AND "))
        }
    }
}

/// One transformed row: (target column, value as text), in target order.
pub type Row = Vec<(String, Option<String>)>;

/// Up to `n` rows of `t` as green would receive them (from a sample of blue's rows, the filter
/// applied), each as (target column, value as text); in a read-only transaction.
pub async fn rows(blue: &Client, t: &ResolvedTable, n: usize) -> Result<Vec<Row>> {
    let Sampled { from, thin } = sampled(blue, t).await?;
    let filter = t.sample_where(thin.as_deref());
    let sql = format!("SELECT {} FROM {from}{filter} LIMIT {n}", t.select_list());
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

#[cfg(test)]
mod tests {
    use super::sampling;

    #[test]
    fn samples_about_a_thousand_blocks_and_rows_whatever_the_size() {
        // Small: every block (the LIMIT takes the first thousand rows, about one in k).
        assert_eq!(sampling(500.0, 10.0), (100.0, 1));
        assert_eq!(sampling(50_000.0, 800.0), (100.0, 50));
        assert_eq!(sampling(1_500.0, 800.0), (100.0, 2));
        // 100M rows in 1.82M blocks: 0.055 % of the blocks, one row in 55 of theirs.
        let (percent, k) = sampling(100_000_000.0, 1_818_944.0);
        assert!((percent - 0.054977).abs() < 1e-4 && k == 55, "{percent} {k}");
        // Few rows in many blocks (bloat): all of them up to 10,000 blocks, sampled beyond.
        assert_eq!(sampling(500.0, 2_000.0), (100.0, 1));
        assert_eq!(sampling(500.0, 2_000_000.0), (0.05, 1));
        // Wide rows (one a block): no thinning.
        assert_eq!(sampling(3_000_000.0, 3_000_000.0).1, 1);
    }
}
