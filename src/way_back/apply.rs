//! Reverse apply: green's captured keys, re-read from green, staged on blue and written to each
//! entry's source through the reverse mapping (delete what green no longer has, upsert the rest
//! where it differs), then forgotten on green. Blue commits first: a crash before green forgets
//! the keys re-applies them, which writes nothing (the upsert only touches rows that differ).

use std::collections::BTreeMap;

use futures_util::{SinkExt, TryStreamExt};
use tokio_postgres::{Client, Transaction};

use super::{changes, touched};
use crate::{
    error::{pg_message, Error, Result},
    pg::ident,
    pg::QualifiedName,
    plan::{key_condition, key_rows_via, reverse_expr, ResolvedTable, ReverseColumn, ReverseJoin},
    state::State,
};

/// Change rows read per round.
pub const ROUND_CHANGES: i64 = 5_000;

/// Sets up a session on blue that writes green's rows back: blue's own triggers (foreign keys
/// included) off for these writes as forward apply does on green, the fence of a cutover with
/// `fence_blue` lifted for this session, and commits durable (green forgets keys only after).
pub async fn prepare_blue(blue: &Client) -> Result<()> {
    blue.batch_execute("SET default_transaction_read_only = off; SET synchronous_commit = on")
        .await
        .map_err(Error::db("blue: way back session"))?;
    if let Err(e) = blue.batch_execute("SET session_replication_role = replica").await {
        tracing::warn!(error = %pg_message(&e), "blue: cannot disable triggers for the way back (needs superuser); blue's triggers fire for rows written back");
    }
    Ok(())
}

/// Keys written back by one round, by entry id.
pub type Written = BTreeMap<String, Vec<Vec<String>>>;

/// One round: reads up to [`ROUND_CHANGES`] settled change rows at or past `start`, writes their
/// keys to blue, records them as written back and forgets the rows. Returns the keys written.
pub async fn round(
    state: &State,
    tables: &[ResolvedTable],
    green: &mut Client,
    blue: &mut Client,
    start: i64,
) -> Result<Written> {
    let rows = green
        .query(
            &format!(
                "SELECT id, tbl, key, truncated FROM {} WHERE xid::text::int8 >= $1 \
                   AND xid < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY id LIMIT $2",
                changes(state)
            ),
            &[&start, &ROUND_CHANGES],
        )
        .await
        .map_err(Error::db("green: reading the way back's changes"))?;
    if rows.is_empty() {
        return Ok(Written::new());
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut by_entry: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    for r in &rows {
        let tbl: String = r.get(1);
        if r.get::<_, bool>(3) {
            let target = tables.iter().find(|t| t.id.as_str() == tbl).map(|t| t.target.to_string()).unwrap_or(tbl);
            return Err(Error::Truncated { tables: vec![format!("{target} (on green)")] });
        }
        if !tables.iter().any(|t| t.id.as_str() == tbl) {
            // Dropping it would lose a write the rollback then never checks.
            return Err(Error::Decode {
                what: format!("change {} on green", r.get::<_, i64>(0)),
                message: format!(
                    "it belongs to plan entry `{tbl}`, which the plan no longer has: put the entry back while the way back is open"
                ),
            });
        }
        ids.push(r.get::<_, i64>(0));
        let key: Vec<String> = r.get(2);
        let keys = by_entry.entry(tbl).or_default();
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    // Plan order: parents before children, as the plan lists them for the copy.
    for t in tables {
        let Some(keys) = by_entry.get(t.id.as_str()) else { continue };
        let tx = blue.transaction().await.map_err(Error::db("blue: begin"))?;
        stage(green, &tx, t, keys).await?;
        write(&tx, t, keys).await?;
        tx.commit().await.map_err(|e| fail(t, "commit", e))?;
    }
    crate::fault::point("back.applied").await;
    let tx = green.transaction().await.map_err(Error::db("green: begin"))?;
    for (tbl, keys) in &by_entry {
        // Keys travel as one JSON array of arrays (text[][] has no ragged rows, and binds poorly).
        let json = serde_json::to_string(keys).unwrap_or_default();
        tx.execute(
            &format!(
                "INSERT INTO {} (tbl, key) SELECT $1, ARRAY(SELECT jsonb_array_elements_text(k)) \
                 FROM jsonb_array_elements($2::text::jsonb) k ON CONFLICT DO NOTHING",
                touched(state)
            ),
            &[tbl, &json],
        )
        .await
        .map_err(Error::db("green: recording the keys written back"))?;
    }
    tx.execute(&format!("DELETE FROM {} WHERE id = ANY($1)", changes(state)), &[&ids])
        .await
        .map_err(Error::db("green: forgetting the way back's changes"))?;
    tx.commit().await.map_err(Error::db("green: forgetting the way back's changes"))?;
    Ok(by_entry)
}

/// How many keys `written` holds.
pub fn count(written: &Written) -> usize {
    written.values().map(Vec::len).sum()
}

fn fail(t: &ResolvedTable, what: &str, e: tokio_postgres::Error) -> Error {
    Error::Db { context: format!("blue: way back to {}: {what}", t.source), source: e }
}

/// The staging table on blue: green's mapped columns in green's types (each exists on blue:
/// copy casts to them there).
fn stage_name(t: &ResolvedTable) -> String {
    ident(&format!("bluegreen_back_{}", t.id.short()))
}

/// Re-reads `keys` of `t` from green into the staging table on blue, in `tx`.
async fn stage(green: &Client, tx: &Transaction<'_>, t: &ResolvedTable, keys: &[Vec<String>]) -> Result<()> {
    let stage = stage_name(t);
    let defs: Vec<String> = t.mapped().map(|c| format!("{} {}", ident(&c.name), c.target_type)).collect();
    tx.batch_execute(&format!("CREATE TEMP TABLE IF NOT EXISTS {stage} ({}) ON COMMIT DELETE ROWS", defs.join(", ")))
        .await
        .map_err(|e| fail(t, "staging table", e))?;
    let cols = t.target_column_list();
    let format = if t.binary_copy { " (FORMAT binary)" } else { "" };
    let sink = tx
        .copy_in(&format!("COPY {stage} ({cols}) FROM STDIN{format}"))
        .await
        .map_err(|e| fail(t, "COPY into staging", e))?;
    let stream = green
        .copy_out(&format!("COPY ({}) TO STDOUT{format}", green_select(t, keys)))
        .await
        .map_err(|e| Error::Db { context: format!("green: re-reading keys of {}", t.target), source: e })?;
    let mut stream = Box::pin(stream.map_err(|e| e));
    let mut sink = Box::pin(sink);
    sink.send_all(&mut stream).await.map_err(|e| fail(t, "re-reading keys from green", e))?;
    drop(stream);
    sink.as_mut().finish().await.map_err(|e| fail(t, "COPY into staging", e))?;
    Ok(())
}

/// The entry's rows of `keys` on green (only its own: a constant key column names its rows).
fn green_select(t: &ResolvedTable, keys: &[Vec<String>]) -> String {
    let cols: Vec<String> = t.key.iter().map(|k| ident(&k.target)).collect();
    let types: Vec<String> = t.key.iter().map(|k| k.target_type.clone()).collect();
    let mut conds = vec![key_condition(&cols, &types, keys)];
    for c in &t.constant_key {
        if let Some(col) = t.columns.iter().find(|r| &r.name == c) {
            if let Some(expr) = col.expr.as_deref() {
                conds.push(format!("{} = ({expr})::{}", ident(c), col.target_type));
            }
        }
    }
    format!("SELECT {} FROM {} WHERE {}", t.target_column_list(), t.target.quoted(), conds.join(" AND "))
}

/// Blue's key columns and the staged rows' keys in blue's types (key columns are carried
/// verbatim: a target key column cast to the source type).
fn key_parts(t: &ResolvedTable) -> (Vec<String>, Vec<String>, Vec<String>, Vec<String>) {
    let src: Vec<String> = t.key.iter().map(|k| ident(&k.source)).collect();
    let src_types: Vec<String> = t.key.iter().map(|k| k.source_type.clone()).collect();
    let tgt_types: Vec<String> = t.key.iter().map(|k| k.target_type.clone()).collect();
    let staged: Vec<String> = t.key.iter().map(|k| format!("g.{}::{}", ident(&k.target), k.source_type)).collect();
    (src, src_types, tgt_types, staged)
}

/// The carried columns of one blue table and their values from a staged green row `g`.
fn carried_of(columns: &[ReverseColumn]) -> (Vec<String>, Vec<String>) {
    columns
        .iter()
        .filter_map(|c| Some((ident(&c.column), format!("({})::{}", reverse_expr(columns, &c.column)?, c.type_name))))
        .unzip()
}

/// The carried source columns and their values from a staged green row `g`.
fn carried(t: &ResolvedTable) -> (Vec<String>, Vec<String>) {
    carried_of(&t.reverse.columns)
}

/// `j`'s carried columns, its key's values, and its key columns, from a staged green row `g`.
fn joined(j: &ReverseJoin) -> (Vec<String>, Vec<String>, Vec<String>, Vec<String>) {
    let (cols, values) = carried_of(&j.columns);
    let key: Vec<String> = j.key.iter().map(|k| ident(k)).collect();
    let key_values: Vec<String> =
        key.iter().map(|k| values[cols.iter().position(|c| c == k).unwrap_or(0)].clone()).collect();
    (cols, values, key, key_values)
}

/// Blue's rows of the driving keys `keys` as the forward plan joins them (its FROM clause): a
/// WHERE clause over it.
fn driving_rows(t: &ResolvedTable, keys: &[Vec<String>]) -> String {
    let (_, src_types, tgt_types, _) = key_parts(t);
    let names: Vec<String> = (0..t.key.len()).map(|i| format!("bg_k{i}")).collect();
    let qualified: Vec<String> = t.key.iter().map(|k| t.qualified(&k.source)).collect();
    format!("({}) IN (SELECT * FROM {})", qualified.join(", "), key_rows_via("x", &names, &tgt_types, &src_types, keys))
}

/// Inserts the staged rows (those matching `only`) into `table` through `values`, updating the
/// row on `key` where its text differs; an identity column GENERATED ALWAYS is never updated.
async fn upsert(
    tx: &Transaction<'_>,
    t: &ResolvedTable,
    table: &QualifiedName,
    (cols, values): (&[String], &[String]),
    key: &[String],
    only: &str,
) -> Result<()> {
    // Key columns are set too (a key changed on green to a value that compares equal, citext
    // `alice` -> `ALICE`, must reach blue's text), except an identity column GENERATED ALWAYS,
    // which no update may set (`problems` refuses such a column outside the key).
    let always: Vec<String> = tx
        .query(
            "SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid = $1::text::regclass \
               AND attidentity = 'a' AND NOT attisdropped",
            &[&table.quoted()],
        )
        .await
        .map_err(|e| fail(t, "reading identity columns", e))?
        .iter()
        .map(|r| ident(&r.get::<_, String>(0)))
        .collect();
    let set: Vec<String> = cols.iter().filter(|c| !always.contains(c)).map(|c| format!("{c} = EXCLUDED.{c}")).collect();
    let old: Vec<String> = cols.iter().map(|c| format!("s.{c}")).collect();
    let new: Vec<String> = cols.iter().map(|c| format!("EXCLUDED.{c}")).collect();
    let action = if set.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!(
            "DO UPDATE SET {} WHERE ROW({})::text IS DISTINCT FROM ROW({})::text",
            set.join(", "),
            old.join(", "),
            new.join(", ")
        )
    };
    tx.execute(
        &format!(
            "INSERT INTO {table} AS s ({cols}) OVERRIDING SYSTEM VALUE SELECT {values} FROM {stage} g WHERE {only} \
             ON CONFLICT ({keys}) {action}",
            table = table.quoted(),
            cols = cols.join(", "),
            values = values.join(", "),
            stage = stage_name(t),
            keys = key.join(", "),
        ),
        &[],
    )
    .await
    .map_err(|e| fail(t, &format!("writing rows back to {table}"), e))?;
    Ok(())
}

/// Deletes from blue the keys green no longer has, then upserts the staged rows through the
/// reverse mapping where they differ from blue's (by text: `json` and `point` compare too). A
/// joined table written back loses the rows the driving rows join on blue that green's rows no
/// longer give (before the driving rows go: they are what finds them), and gains or updates
/// the rows green's give (after the driving rows are written).
async fn write(tx: &Transaction<'_>, t: &ResolvedTable, keys: &[Vec<String>]) -> Result<()> {
    let stage = stage_name(t);
    // Last join first: a later join may be found through an earlier one's rows.
    for j in t.reverse.joins.iter().rev() {
        let (_, _, key, key_values) = joined(j);
        let a = ident(&j.alias);
        let current: Vec<String> = key.iter().map(|k| format!("{a}.{k}")).collect();
        let names: Vec<String> = (0..key.len()).map(|i| format!("bg_j{i}")).collect();
        let matches: Vec<String> = key.iter().zip(&names).map(|(k, n)| format!("s.{k} = x.{n}")).collect();
        tx.execute(
            &format!(
                "DELETE FROM {table} s USING (SELECT {current} FROM {from} WHERE {rows} AND {a}.ctid IS NOT NULL \
                   EXCEPT SELECT {key_values} FROM {stage} g WHERE ({present})) x ({names}) WHERE {m}",
                table = j.table.quoted(),
                current = current.join(", "),
                from = t.from_through(&j.alias),
                rows = driving_rows(t, keys),
                key_values = key_values.join(", "),
                present = j.present,
                names = names.join(", "),
                m = matches.join(" AND "),
            ),
            &[],
        )
        .await
        .map_err(|e| fail(t, &format!("deleting rows of {} green no longer has", j.table), e))?;
    }
    let (src, src_types, tgt_types, staged) = key_parts(t);
    let names: Vec<String> = (0..src.len()).map(|i| format!("bg_k{i}")).collect();
    let source = t.source.quoted();
    let matches: Vec<String> = src.iter().zip(&names).map(|(s, n)| format!("s.{s} = k.{n}")).collect();
    tx.execute(
        &format!(
            "DELETE FROM {source} s USING (SELECT {n} FROM {rows} EXCEPT SELECT {staged} FROM {stage} g) k WHERE {m}",
            n = names.join(", "),
            rows = key_rows_via("x", &names, &tgt_types, &src_types, keys),
            staged = staged.join(", "),
            m = matches.join(" AND "),
        ),
        &[],
    )
    .await
    .map_err(|e| fail(t, "deleting keys gone from green", e))?;
    let (cols, values) = carried(t);
    upsert(tx, t, &t.source, (&cols, &values), &src, "true").await?;
    for j in &t.reverse.joins {
        let (cols, values, key, _) = joined(j);
        upsert(tx, t, &j.table, (&cols, &values), &key, &format!("({})", j.present)).await?;
    }
    Ok(())
}

/// The keys of `t` among `keys` where blue's carried columns differ from reverse(green's row),
/// or one side has the row and the other not. Stages green's rows on blue in a transaction it
/// rolls back.
pub async fn differing(
    green: &Client,
    blue: &mut Client,
    t: &ResolvedTable,
    keys: &[Vec<String>],
) -> Result<Vec<Vec<String>>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let tx = blue.transaction().await.map_err(Error::db("blue: begin"))?;
    stage(green, &tx, t, keys).await?;
    let (src, src_types, tgt_types, staged) = key_parts(t);
    let names: Vec<String> = (0..src.len()).map(|i| format!("bg_k{i}")).collect();
    let (cols, values) = carried(t);
    let blue_keys: Vec<String> = src.iter().zip(&names).map(|(s, n)| format!("s.{s} AS {n}")).collect();
    let staged_keys: Vec<String> = staged.iter().zip(&names).map(|(s, n)| format!("{s} AS {n}")).collect();
    let blue_cols: Vec<String> = cols.iter().map(|c| format!("s.{c}")).collect();
    let out: Vec<String> = names.iter().map(|n| format!("{n}::text")).collect();
    let sql = format!(
        "SELECT ARRAY[{out}] FROM (SELECT {staged_keys}, ROW({values})::text AS r FROM {stage} g) b \
         FULL JOIN (SELECT {blue_keys}, ROW({blue_cols})::text AS r FROM {source} s \
                    WHERE ({src}) IN (SELECT * FROM {rows})) a USING ({n}) \
         WHERE a.r IS DISTINCT FROM b.r",
        out = out.join(", "),
        staged_keys = staged_keys.join(", "),
        values = values.join(", "),
        stage = stage_name(t),
        blue_keys = blue_keys.join(", "),
        blue_cols = blue_cols.join(", "),
        source = t.source.quoted(),
        src = src.join(", "),
        rows = key_rows_via("x", &names, &tgt_types, &src_types, keys),
        n = names.join(", "),
    );
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut add = |rows: Vec<tokio_postgres::Row>| {
        for r in rows {
            let k: Vec<String> = r.get(0);
            if !out.contains(&k) {
                out.push(k);
            }
        }
    };
    add(tx.query(&sql, &[]).await.map_err(|e| fail(t, "checking rows written back", e))?);
    // Each joined table written back: the row green's gives (where present) against the row the
    // driving row joins on blue.
    for j in &t.reverse.joins {
        let (_, values, _, _) = joined(j);
        let a = ident(&j.alias);
        let blue_cols: Vec<String> = j
            .columns
            .iter()
            .filter(|c| j.expr(&c.column).is_some())
            .map(|c| format!("{a}.{}", ident(&c.column)))
            .collect();
        let driving: Vec<String> =
            t.key.iter().zip(&names).map(|(k, n)| format!("{} AS {n}", t.qualified(&k.source))).collect();
        let sql = format!(
            "SELECT ARRAY[{out}] FROM (SELECT {staged_keys}, ROW({values})::text AS r FROM {stage} g WHERE ({present})) b \
             FULL JOIN (SELECT {driving}, ROW({blue_cols})::text AS r FROM {from} WHERE {rows} AND {a}.ctid IS NOT NULL) a \
             USING ({n}) WHERE a.r IS DISTINCT FROM b.r",
            out = names.iter().map(|n| format!("{n}::text")).collect::<Vec<_>>().join(", "),
            staged_keys = staged_keys.join(", "),
            values = values.join(", "),
            stage = stage_name(t),
            present = j.present,
            driving = driving.join(", "),
            blue_cols = blue_cols.join(", "),
            from = t.from_through(&j.alias),
            rows = driving_rows(t, keys),
            n = names.join(", "),
        );
        add(tx
            .query(&sql, &[])
            .await
            .map_err(|e| fail(t, &format!("checking rows of {} written back", j.table), e))?);
    }
    let _ = tx.rollback().await;
    Ok(out)
}
