//! Proof that green's foreign keys between planned tables hold. Apply writes with
//! `session_replication_role = replica`, so nothing else checks the rows it wrote. A child row
//! whose key columns are all set must find its parent (MATCH SIMPLE).
//!
//! Preflight and the switch check every row (outside the pause). Inside the pause only rows
//! that can have changed since are checked: children whose key was applied since, children of
//! parents whose key was applied since (a parent deleted or moved), and the rows found orphaned
//! by the full check (apply writes a child a moment before its parent, one transaction per
//! table). Nothing in the pause scans a whole table, unless a foreign key references columns
//! other than its parent's key.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use crate::{
    apply::Applied,
    error::{Error, Result},
    plan::{key_condition, key_condition_via, ResolvedPlan, ResolvedTable},
};

/// Orphan rows named per foreign key in messages.
const SHOWN: usize = 3;
/// Orphans the full check in the switch remembers per foreign key to look at again in the
/// pause; more than this is not a race with apply but a broken green.
const SUSPECTS: i64 = 10_000;

/// One foreign key between planned tables on green.
struct ForeignKey {
    name: String,
    /// Child and parent, as `regclass` prints them.
    child: String,
    parent: String,
    /// Child columns and the parent columns they reference, quoted, in constraint order.
    cols: Vec<String>,
    refs: Vec<String>,
    /// The plan entries writing the child and the parent.
    child_entry: usize,
    parent_entry: usize,
}

/// Every foreign key between planned tables, read once.
pub(super) struct ForeignKeys {
    fks: Vec<ForeignKey>,
    /// Child rows (green key text) found orphaned by the last full check, per foreign key.
    suspects: BTreeMap<usize, Vec<Vec<String>>>,
}

impl ForeignKeys {
    /// Reads the foreign keys whose child and parent are both plan targets.
    pub(super) async fn load(resolved: &ResolvedPlan, green: &Client) -> Result<Self> {
        let targets: Vec<String> = resolved.tables.iter().map(|t| t.target.quoted()).collect();
        let rows = green
            .query(
                "WITH t AS (SELECT n - 1 AS i, x::regclass AS rel FROM unnest($1::text[]) WITH ORDINALITY u(x, n)) \
                 SELECT c.conname::text, c.conrelid::regclass::text, c.confrelid::regclass::text, \
                        ARRAY(SELECT quote_ident(a.attname) FROM unnest(c.conkey) WITH ORDINALITY k(n, o) \
                              JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o), \
                        ARRAY(SELECT quote_ident(a.attname) FROM unnest(c.confkey) WITH ORDINALITY k(n, o) \
                              JOIN pg_catalog.pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o), \
                        (SELECT min(i) FROM t WHERE t.rel = c.conrelid)::int4, \
                        (SELECT min(i) FROM t WHERE t.rel = c.confrelid)::int4 \
                 FROM pg_catalog.pg_constraint c \
                 WHERE c.contype = 'f' AND c.conrelid IN (SELECT rel FROM t) AND c.confrelid IN (SELECT rel FROM t) \
                 ORDER BY 1",
                &[&targets],
            )
            .await
            .map_err(Error::db("green: reading foreign keys"))?;
        let fks = rows
            .iter()
            .map(|r| ForeignKey {
                name: r.get(0),
                child: r.get(1),
                parent: r.get(2),
                cols: r.get(3),
                refs: r.get(4),
                child_entry: r.get::<_, i32>(5) as usize,
                parent_entry: r.get::<_, i32>(6) as usize,
            })
            .collect();
        Ok(Self { fks, suspects: BTreeMap::new() })
    }

    /// Checks every row. Returns whether all hold and a line for the report; the orphans found
    /// are remembered for [`ForeignKeys::check_changed`].
    pub(super) async fn check_all(&mut self, resolved: &ResolvedPlan, green: &Client) -> Result<(bool, String)> {
        self.suspects.clear();
        let mut broken = Vec::new();
        for (i, fk) in self.fks.iter().enumerate() {
            let orphans = orphans(green, fk, &resolved.tables[fk.child_entry], None, SUSPECTS).await?;
            if !orphans.is_empty() {
                broken.push(fk.describe(&orphans, orphans.len() as i64 >= SUSPECTS));
                self.suspects.insert(i, orphans);
            }
        }
        Ok(if broken.is_empty() {
            (true, format!("{} hold", self.fks.len()))
        } else {
            (false, format!("{}; find out why (`migrate verify`), fix green, run cutover again", broken.join("; ")))
        })
    }

    /// Checks the rows that may have changed since the last [`ForeignKeys::check_all`]: the
    /// orphans it found and the rows of `applied` keys (children) or referencing them
    /// (parents). Returns one line per broken foreign key.
    pub(super) async fn check_changed(
        &self,
        resolved: &ResolvedPlan,
        green: &Client,
        applied: &Applied,
    ) -> Result<Vec<String>> {
        let keys_of = |entry: usize| applied.get(&resolved.tables[entry].id).filter(|k| !k.is_empty());
        let mut broken = Vec::new();
        for (i, fk) in self.fks.iter().enumerate() {
            let child = &resolved.tables[fk.child_entry];
            let parent = &resolved.tables[fk.parent_entry];
            let mut conditions = Vec::new();
            if let Some(rows) = self.suspects.get(&i) {
                let cols: Vec<String> =
                    child.key.iter().map(|k| format!("ch.{}", crate::pg::ident(&k.target))).collect();
                let types: Vec<String> = child.key.iter().map(|k| k.target_type.clone()).collect();
                conditions.push(Some(key_condition(&cols, &types, rows)));
            }
            if let Some(keys) = keys_of(fk.child_entry) {
                conditions.push(Some(applied_condition(child, &child_key_columns(child), keys)));
            }
            if let Some(keys) = keys_of(fk.parent_entry) {
                // A parent key applied may be gone or moved: its children must still find one.
                conditions.push(fk.children_by_parent_key(parent).map(|cols| applied_condition(parent, &cols, keys)));
            }
            if conditions.is_empty() {
                continue;
            }
            // `None`: the foreign key references other columns than the parent's key, so the
            // children of a changed parent cannot be found by its key; every row is checked.
            let condition = match conditions.into_iter().collect::<Option<Vec<String>>>() {
                Some(c) => Some(c.iter().map(|c| format!("({c})")).collect::<Vec<_>>().join(" OR ")),
                None => None,
            };
            let orphans = orphans(green, fk, child, condition.as_deref(), SHOWN as i64).await?;
            if !orphans.is_empty() {
                broken.push(fk.describe(&orphans, orphans.len() >= SHOWN));
            }
        }
        Ok(broken)
    }
}

impl ForeignKey {
    fn describe(&self, orphans: &[Vec<String>], at_least: bool) -> String {
        let shown: Vec<String> = orphans.iter().take(SHOWN).map(|k| format!("({})", k.join(", "))).collect();
        format!(
            "{}: {}{} row(s) of {} without their row in {} (key {})",
            self.name,
            if at_least { "at least " } else { "" },
            orphans.len(),
            self.child,
            self.parent,
            shown.join(", ")
        )
    }

    /// The child's columns (as `ch.col`) referencing the parent's key, in the key's order, when
    /// the foreign key references exactly the parent's key columns.
    fn children_by_parent_key(&self, parent: &ResolvedTable) -> Option<Vec<String>> {
        if parent.key.len() != self.refs.len() {
            return None;
        }
        parent
            .key
            .iter()
            .map(|k| {
                let at = self.refs.iter().position(|r| *r == crate::pg::ident(&k.target))?;
                Some(format!("ch.{}", self.cols[at]))
            })
            .collect()
    }
}

/// The child's key columns as `ch.col`.
fn child_key_columns(t: &ResolvedTable) -> Vec<String> {
    t.key.iter().map(|k| format!("ch.{}", crate::pg::ident(&k.target))).collect()
}

/// `columns` match one of `keys` of entry `t` (blue's text form, read as apply reads it).
fn applied_condition(t: &ResolvedTable, columns: &[String], keys: &[Vec<String>]) -> String {
    let through: Vec<String> =
        t.key.iter().map(|k| if k.via_source_type { &k.source_type } else { &k.target_type }.clone()).collect();
    let types: Vec<String> = t.key.iter().map(|k| k.target_type.clone()).collect();
    key_condition_via(columns, &through, &types, keys)
}

/// Child rows (their key on green, as text) matching `condition` whose parent is missing.
async fn orphans(
    green: &Client,
    fk: &ForeignKey,
    child: &ResolvedTable,
    condition: Option<&str>,
    limit: i64,
) -> Result<Vec<Vec<String>>> {
    let set = fk.cols.iter().map(|c| format!("ch.{c} IS NOT NULL")).collect::<Vec<_>>().join(" AND ");
    let matches =
        fk.cols.iter().zip(&fk.refs).map(|(c, r)| format!("p.{r} = ch.{c}")).collect::<Vec<_>>().join(" AND ");
    let key = child_key_columns(child).iter().map(|c| format!("{c}::text")).collect::<Vec<_>>().join(", ");
    let also = condition.map(|c| format!(" AND ({c})")).unwrap_or_default();
    let sql = format!(
        "SELECT ARRAY[{key}] FROM {} ch WHERE {set}{also} \
         AND NOT EXISTS (SELECT 1 FROM {} p WHERE {matches}) LIMIT {limit}",
        fk.child, fk.parent
    );
    let rows = green.query(&sql, &[]).await.map_err(Error::db(format!("green: checking foreign key {}", fk.name)))?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, Vec<Option<String>>>(0).into_iter().map(Option::unwrap_or_default).collect())
        .collect())
}
