//! Stage 3: apply. Takes pending keys in batches (deduplicated by the pending table's key),
//! re-reads those keys from blue through the resolved transforming SELECT, and in one green
//! transaction upserts the rows found, deletes the keys not found (or filtered out), and removes
//! the batch from pending. Keys of tables still being copied wait.
//!
//! Re-reading by key makes apply idempotent and order-free: applying a key twice, or a stale
//! event after a newer one, gives the same result as applying it once at the end.

use std::collections::BTreeMap;

use futures_util::{SinkExt, TryStreamExt};
use tokio_postgres::Client;
use tracing::Instrument;

use crate::{
    error::{pg_message, Error, Result},
    pg::ident,
    plan::{key_condition, key_rows_via, ResolvedTable},
    state::{State, TableId},
};

/// Keys applied per green transaction.
pub const BATCH_KEYS: i64 = 10_000;

/// Sets up an apply session on green: foreign-key and cascade triggers off (as in logical
/// replication's apply; rows arrive in key order, not in the application's order), and the
/// commit need not wait for the WAL flush because pending is only cleared in the same commit.
pub async fn prepare_green(green: &Client) -> Result<()> {
    green.batch_execute("SET synchronous_commit = off").await.map_err(Error::db("green: apply session"))?;
    if let Err(e) = green.batch_execute("SET session_replication_role = replica").await {
        tracing::warn!(error = %pg_message(&e), "green: cannot disable foreign-key triggers for apply (needs superuser); a key applied before the row it references will fail");
    }
    Ok(())
}

/// Keys applied by one batch, by entry, in blue's text form.
pub type Applied = BTreeMap<TableId, Vec<Vec<String>>>;

/// Applies one batch of pending keys of the `ready` tables. Returns the keys applied (the
/// cutover re-checks foreign keys for exactly those rows).
///
/// `verify_started` is whether a verify has ever started (then every key applied is recorded
/// as touched); while false it is read again after the batch's keys are, and stays true once
/// it is. A batch read before any verify started holds only changes made before, which the
/// first verify's comparison covers ([`State::mark_verify_started`]): recording them, and
/// moving the log into `touched`, took a third of green's time in draining a backlog. A
/// change made later is captured again under a new seq, so it stays pending and is recorded
/// when applied.
pub async fn apply_batch(
    blue: &Client,
    green: &mut Client,
    state: &State,
    tables: &[ResolvedTable],
    ready: &[TableId],
    part: (usize, usize),
    verify_started: &mut bool,
) -> Result<Applied> {
    let mut applied = Applied::new();
    if ready.is_empty() {
        return Ok(applied);
    }
    let mut by_table: BTreeMap<TableId, (Vec<Vec<String>>, Vec<i64>)> = BTreeMap::new();
    for (id, key, seq) in state.pending_batch(green, ready, BATCH_KEYS, part).await? {
        let e = by_table.entry(id).or_default();
        e.0.push(key);
        e.1.push(seq);
    }
    if !*verify_started && !by_table.is_empty() {
        *verify_started = state.verify_started(&*green).await?;
    }
    let record = *verify_started;
    for (id, (keys, seqs)) in by_table {
        let Some(t) = tables.iter().find(|t| t.id == id) else { continue };
        let span = tracing::info_span!("apply", table = %t.target, keys = keys.len());
        apply_table(blue, green, state, t, &keys, &seqs, record).instrument(span).await?;
        crate::fault::point("apply.committed").await;
        applied.insert(id, keys);
    }
    Ok(applied)
}

async fn apply_table(
    blue: &Client,
    green: &mut Client,
    state: &State,
    t: &ResolvedTable,
    keys: &[Vec<String>],
    seqs: &[i64],
    record: bool,
) -> Result<()> {
    let tx = green.transaction().await.map_err(|e| fail(t, "begin", e))?;
    if let Err(e) = write_rows(blue, &tx, t, keys, true).await {
        drop(tx);
        return Err(delete_first(blue, green, t, keys, e).await);
    }
    // Only the entries read for this batch: a key captured again meanwhile has a new seq and stays.
    state.finish_batch(&tx, seqs, record).await?;
    tx.commit().await.map_err(|e| fail(t, "commit", e))?;
    Ok(())
}

/// After an [`crate::retry::order_conflict`] (an upsert met a row another session is about to
/// delete or change), commits this batch's deletes of keys gone from blue on their own, then
/// every key of the batch that can be written, in small groups (each under a savepoint, one key
/// at a time where a group fails): two sessions each holding the other's delete, or each
/// holding a row the other's batch is waiting for, then both get through on the retry. Writing
/// a key as blue has it now is right whenever it happens; the keys stay pending, so the retry
/// applies them all again. Returns `e` to retry.
async fn delete_first(blue: &Client, green: &mut Client, t: &ResolvedTable, keys: &[Vec<String>], e: Error) -> Error {
    if !crate::retry::order_conflict(&e) {
        return e;
    }
    let deleted = async {
        let tx = green.transaction().await.map_err(|e| fail(t, "begin", e))?;
        write_rows(blue, &tx, t, keys, false).await?;
        tx.commit().await.map_err(|e| fail(t, "commit", e))
    };
    if let Err(d) = deleted.await {
        tracing::warn!(error = %d, "deleting keys gone from blue ahead of a retry failed");
    }
    let written = async {
        let tx = green.transaction().await.map_err(|e| fail(t, "begin", e))?;
        for group in keys.chunks(GROUP_KEYS) {
            if write_saved(blue, &tx, t, group).await? {
                continue;
            }
            for key in group {
                write_saved(blue, &tx, t, std::slice::from_ref(key)).await?;
            }
        }
        tx.commit().await.map_err(|e| fail(t, "commit", e))
    };
    if let Err(w) = written.await {
        tracing::warn!(error = %w, "writing the keys that can be written ahead of a retry failed");
    }
    e
}

/// Keys written together by [`delete_first`] before trying them one by one.
const GROUP_KEYS: usize = 50;

/// Writes `keys` under a savepoint; `false` (rolled back to it) on an order conflict.
async fn write_saved(
    blue: &Client,
    tx: &tokio_postgres::Transaction<'_>,
    t: &ResolvedTable,
    keys: &[Vec<String>],
) -> Result<bool> {
    tx.batch_execute("SAVEPOINT bluegreen_keys").await.map_err(|e| fail(t, "savepoint", e))?;
    match write_rows(blue, tx, t, keys, true).await {
        Ok(()) => Ok(true),
        Err(e) if crate::retry::order_conflict(&e) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT bluegreen_keys").await.map_err(|e| fail(t, "savepoint", e))?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Applies keys straight from capture, without storing them in pending first (the pending
/// insert, read, lock and delete were most of apply's cost for bulk writes). A key that is
/// pending already (an apply may hold an older read of it) is stored in pending instead, with
/// a new seq, as capture always did: the apply holding the older read then leaves it pending.
/// Locking the pending rows first waits for such an apply to commit. With `record`, the keys
/// applied are recorded as touched. Returns how many keys were applied here.
pub async fn apply_direct(
    blue: &Client,
    green: &mut Client,
    state: &State,
    t: &ResolvedTable,
    events: &[crate::state::KeyEvent],
    record: bool,
) -> Result<usize> {
    let tx = green.transaction().await.map_err(|e| fail(t, "begin", e))?;
    let keys: Vec<Vec<String>> = events.iter().map(|e| e.key.clone()).collect();
    let busy = state.lock_pending(&tx, &t.id, &keys).await?;
    let (later, now): (Vec<_>, Vec<_>) = events.iter().cloned().partition(|e| busy.contains(&e.key));
    state.store_keys(&tx, &later).await?;
    let keys: Vec<Vec<String>> = now.iter().map(|e| e.key.clone()).collect();
    if !keys.is_empty() {
        if let Err(e) = write_rows(blue, &tx, t, &keys, true).await {
            drop(tx);
            return Err(delete_first(blue, green, t, &keys, e).await);
        }
        if record {
            state.record_touched(&tx, &now).await?;
        }
    }
    tx.commit().await.map_err(|e| fail(t, "commit", e))?;
    Ok(now.len())
}

fn fail(t: &ResolvedTable, what: &str, e: tokio_postgres::Error) -> Error {
    Error::Db { context: format!("green: apply to {}: {what}", t.target), source: e }
}

/// Re-reads `keys` from blue through the transform into a staging table, deletes the keys gone
/// from blue, and (with `upsert`) upserts the rest, in `tx`.
async fn write_rows(
    blue: &Client,
    tx: &tokio_postgres::Transaction<'_>,
    t: &ResolvedTable,
    keys: &[Vec<String>],
    upsert: bool,
) -> Result<()> {
    let src_cols: Vec<String> = t.key.iter().map(|k| t.qualified(&k.source)).collect();
    let src_types: Vec<String> = t.key.iter().map(|k| k.source_type.clone()).collect();
    let tgt_cols: Vec<String> = t.key.iter().map(|k| ident(&k.target)).collect();
    let tgt_types: Vec<String> = t.key.iter().map(|k| k.target_type.clone()).collect();
    let through: Vec<String> =
        t.key.iter().map(|k| if k.via_source_type { &k.source_type } else { &k.target_type }.clone()).collect();
    let format = if t.binary_copy { " (FORMAT binary)" } else { "" };
    let cols = t.target_column_list();
    let stage = ident(&format!("bluegreen_apply_{}", t.id.short()));
    let target = t.target.quoted();

    // Emptied first: several writes may share one transaction (see `delete_first`).
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS SELECT {cols} FROM {target} WITH NO DATA; \
         DELETE FROM {stage}"
    ))
    .await
    .map_err(|e| fail(t, "staging table", e))?;
    let sink = tx
        .copy_in(&format!("COPY {stage} ({cols}) FROM STDIN{format}"))
        .await
        .map_err(|e| fail(t, "COPY into staging", e))?;
    let select = t.source_select(Some(&key_condition(&src_cols, &src_types, keys)));
    let stream = blue
        .copy_out(&format!("COPY ({select}) TO STDOUT{format}"))
        .await
        .map_err(|e| Error::Db { context: format!("blue: re-reading keys of {}", t.source), source: e })?;
    let mut stream = Box::pin(stream.map_err(|e| e));
    let mut sink = Box::pin(sink);
    sink.send_all(&mut stream).await.map_err(|e| fail(t, "re-reading keys from blue", e))?;
    drop(stream);
    sink.as_mut().finish().await.map_err(|e| fail(t, "COPY into staging", e))?;
    // Between the re-read and green's commit: blue may change again here (the tests widen it).
    crate::fault::point("apply.reread").await;

    let key_list = tgt_cols.join(", ");
    // Only this entry's rows: where green's key holds a constant (a tenant id), another entry
    // may write the same mapped key with another constant.
    let constants = t.constant_key.iter().filter_map(|c| {
        let col = t.columns.iter().find(|r| &r.name == c)?;
        Some(format!("t.{} = ({})::{}", ident(c), col.expr.as_deref()?, col.target_type))
    });
    let matches_gone =
        tgt_cols.iter().map(|c| format!("g.{c} = t.{c}")).chain(constants).collect::<Vec<_>>().join(" AND ");
    // Keys gone from blue (deleted, filtered out, or changed away) go from green. Only the
    // keys not re-read are looked up in the target: an update burst has none, and probing the
    // target's key index for every key of the batch was a third of apply's time.
    tx.execute(
        &format!(
            "DELETE FROM {target} t USING (SELECT {key_list} FROM {} EXCEPT SELECT {key_list} FROM {stage}) g \
             WHERE {matches_gone}",
            key_rows_via("k", &tgt_cols, &through, &tgt_types, keys)
        ),
        &[],
    )
    .await
    .map_err(|e| fail(t, "deleting keys gone from blue", e))?;
    if !upsert {
        return Ok(());
    }
    // Key columns are written too: a key changed on blue to a value that compares equal
    // (citext `alice` -> `ALICE`, numeric `1.0` -> `1.00`) conflicts with the old row, whose key
    // text must become the new one.
    let updates: Vec<String> = t.mapped().map(|c| format!("{q} = EXCLUDED.{q}", q = ident(&c.name))).collect();
    // The green unique key: the mapped key columns, plus any the plan sets to a constant.
    let conflict: Vec<String> = tgt_cols.iter().cloned().chain(t.constant_key.iter().map(|c| ident(c))).collect();
    let on_conflict = format!("ON CONFLICT ({}) DO UPDATE SET {}", conflict.join(", "), updates.join(", "));
    let upsert = format!("INSERT INTO {target} ({cols}) SELECT {cols} FROM {stage} {on_conflict}");
    // Row by row, an upsert can meet a unique value another row of the same batch gives up:
    // one blue transaction moved it (`a.code = 'new'; b.code = <a's old>`), and b came first.
    // Retrying the batch would fail the same way forever. Then the batch's changed rows are
    // deleted first and written again, inside the same transaction: only with foreign-key and
    // cascade triggers off (`replica`), where a delete cannot cascade to rows nobody re-reads.
    tx.batch_execute("SAVEPOINT bluegreen_upsert").await.map_err(|e| fail(t, "savepoint", e))?;
    match tx.execute(&upsert, &[]).await {
        Ok(_) => Ok(()),
        Err(e) if e.code().is_some_and(|c| c.code() == "23505") => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT bluegreen_upsert").await.map_err(|e| fail(t, "savepoint", e))?;
            let replica: bool = tx
                .query_one("SELECT current_setting('session_replication_role') = 'replica'", &[])
                .await
                .map_err(|e| fail(t, "reading session_replication_role", e))?
                .get(0);
            // Nor where green has columns the plan fills by default: written again, a row
            // would get new values there (an identity, `now()`).
            if !replica || t.columns.iter().any(|c| c.expr.is_none()) {
                return Err(fail(t, "upserting rows", e));
            }
            let matches: Vec<String> = conflict.iter().map(|c| format!("t.{c} = s.{c}")).collect();
            let old_row: Vec<String> = t.mapped().map(|c| format!("t.{}", ident(&c.name))).collect();
            let new_row: Vec<String> = t.mapped().map(|c| format!("s.{}", ident(&c.name))).collect();
            tx.execute(
                &format!(
                    "DELETE FROM {target} t USING {stage} s WHERE {} AND ROW({})::text IS DISTINCT FROM ROW({})::text",
                    matches.join(" AND "),
                    old_row.join(", "),
                    new_row.join(", ")
                ),
                &[],
            )
            .await
            .map_err(|e| fail(t, "deleting changed rows before writing them again", e))?;
            tx.execute(&upsert, &[]).await.map_err(|e| fail(t, "upserting rows", e))?;
            Ok(())
        }
        Err(e) => Err(fail(t, "upserting rows", e)),
    }
}
