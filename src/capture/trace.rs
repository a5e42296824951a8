//! Tracing a write to a joined table to the driving keys whose target rows it changes.
//!
//! Capture records, for each write to a joined table, the values of its link columns (the
//! joined table's `on` columns) in the row after the write and, where they changed or the row
//! went, in the row before it. Once the write is visible on blue, each set of values is turned
//! into the driving keys that join a row with those values *now* ([`crate::plan::trace_sql`]):
//! through the new values, the rows the written row joins after the write; through the old
//! values, the rows it joined before. A driving row whose path to the written row went through
//! another row that has changed since is found through that row's own write, traced the same
//! way; the driving keys then go on as any captured key (apply re-reads each through the
//! entry's join). See "Why green ends up equal" in docs/architecture.md.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use super::KeyEvent;
use crate::{
    error::{Error, Result},
    pg::Lsn,
    plan::{trace_sql, KeyText, ResolvedTable},
};

/// Link values of a written row of join `join` of entry `entry` (indexes into the plan's
/// tables and that entry's joins), at the position of its commit.
#[derive(Debug, Clone)]
pub struct Link {
    /// Entry index.
    pub entry: usize,
    /// Join index within the entry.
    pub join: usize,
    /// The joined table's `on` columns, as text.
    pub values: Vec<String>,
    /// Where the write committed.
    pub lsn: Lsn,
}

/// Link values per traced query: bounds the statement's size in a burst.
const TRACE_BATCH: usize = 10_000;

/// Turns `links` into driving key events, reading blue through `blue` (where every write the
/// links come from is visible). Each key carries the latest position among the links of its
/// batch: a later position only makes the cutover wait for it longer.
pub async fn resolve(
    blue: &Client,
    tables: &[ResolvedTable],
    links: Vec<Link>,
    text: KeyText,
) -> Result<Vec<KeyEvent>> {
    let mut groups: BTreeMap<(usize, usize), BTreeMap<Vec<String>, Lsn>> = BTreeMap::new();
    for l in links {
        let lsn = groups.entry((l.entry, l.join)).or_default().entry(l.values).or_insert(l.lsn);
        *lsn = (*lsn).max(l.lsn);
    }
    let mut out = Vec::new();
    for ((entry, join), values) in groups {
        let t = &tables[entry];
        let values: Vec<(Vec<String>, Lsn)> = values.into_iter().collect();
        for batch in values.chunks(TRACE_BATCH) {
            let lsn = batch.iter().map(|(_, l)| *l).max().unwrap_or_default();
            let links: Vec<Vec<String>> = batch.iter().map(|(v, _)| v.clone()).collect();
            let sql = trace_sql(t, join, &links, text);
            // The simple protocol returns every value in text format: the output function's
            // text, as capture renders keys.
            let rows = blue.simple_query(&sql).await.map_err(Error::db(format!(
                "blue: tracing changes of {} to rows of {}",
                t.joins[join].table, t.source
            )))?;
            for r in rows {
                let tokio_postgres::SimpleQueryMessage::Row(r) = r else { continue };
                // Key columns are NOT NULL (the key is unique on blue).
                let key: Option<Vec<String>> = (0..t.key.len()).map(|i| r.get(i).map(str::to_string)).collect();
                if let Some(key) = key {
                    out.push(KeyEvent { table: t.id.clone(), key, lsn });
                }
            }
        }
    }
    Ok(out)
}
