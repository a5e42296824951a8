//! Captured keys waiting to be applied (`pending`), keys applied since the last verify
//! (`touched`), and verify buckets found clean at a blue position (`verified`).

use std::collections::BTreeMap;

use tokio_postgres::GenericClient;

use super::{State, TableId};
use crate::{
    error::{Error, Result},
    pg::Lsn,
};

/// Touched-log rows moved into `touched` per statement: about a tenth of a second of work, so
/// an idle follower's compaction never holds capture up for long.
pub const COMPACT_ROWS: i64 = 20_000;

/// A key event: which plan entry, its key values in text form, and the blue WAL position of the
/// change (for lag).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyEvent {
    /// The plan entry.
    pub table: TableId,
    /// Key column values, text form.
    pub key: Vec<String>,
    /// Blue LSN of the change.
    pub lsn: Lsn,
}

/// Keys travel as one text per key (a JSON array) because arrays of arrays do not unnest.
fn json_keys<'a>(keys: impl Iterator<Item = &'a Vec<String>>) -> Vec<String> {
    keys.map(|k| serde_json::to_string(k).unwrap_or_default()).collect()
}

/// Each (entry, key) once, with its newest position, in (entry, key) order.
fn latest(events: &[KeyEvent]) -> BTreeMap<(&TableId, &[String]), Lsn> {
    let mut latest: BTreeMap<(&TableId, &[String]), Lsn> = BTreeMap::new();
    for e in events {
        let l = latest.entry((&e.table, e.key.as_slice())).or_insert(e.lsn);
        *l = (*l).max(e.lsn);
    }
    latest
}

impl State {
    /// Stores key events in pending (newest position wins; a fresh `seq` marks the key as
    /// changed again, so an apply that read the older entry will not delete this one).
    pub async fn store_keys(&self, green: &impl GenericClient, events: &[KeyEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        // One row per key: ON CONFLICT cannot touch the same row twice in one statement.
        // In (entry, key) order, the order apply locks them in too: two transactions locking the
        // same pending rows in the same order cannot deadlock.
        let latest = latest(events);
        let mut tables = Vec::with_capacity(latest.len());
        let mut keys = Vec::with_capacity(latest.len());
        let mut lsns = Vec::with_capacity(latest.len());
        for ((table, key), lsn) in latest {
            tables.push(table.as_str());
            keys.push(serde_json::to_string(key).unwrap_or_default());
            lsns.push(lsn.0);
        }
        green
            .execute(
                &format!(
                    "INSERT INTO {pending} (tbl, key, seq, lsn, first_lsn) \
                     SELECT t, ARRAY(SELECT jsonb_array_elements_text(k::jsonb)), nextval('{seq}'), l, l \
                     FROM unnest($1::text[], $2::text[], $3::int8[]) WITH ORDINALITY AS e(t, k, l, o) ORDER BY o \
                     ON CONFLICT (tbl, key) DO UPDATE SET seq = EXCLUDED.seq, lsn = EXCLUDED.lsn, \
                       first_lsn = least(coalesce({pending}.first_lsn, {pending}.lsn), EXCLUDED.first_lsn)",
                    pending = self.table("pending"),
                    seq = self.table("pending_seq").replace('\'', "''"),
                ),
                &[&tables, &keys, &lsns],
            )
            .await
            .map_err(Error::db("green: storing captured keys"))?;
        Ok(())
    }

    /// Stores the keys of entry `id` held in `temp` (a temporary table with a `key text[]`
    /// column, in `green`'s session) in pending at position `lsn`, as [`Self::store_keys`]
    /// does, but never moving a key's position back (capture may have stored a later one
    /// since `lsn` was read). Returns how many. In byte order (collation C), as `store_keys` sorts them.
    pub async fn store_keys_from(&self, green: &impl GenericClient, id: &TableId, temp: &str, lsn: Lsn) -> Result<u64> {
        green
            .execute(
                &format!(
                    "INSERT INTO {pending} (tbl, key, seq, lsn, first_lsn) \
                     SELECT $1, k.key, nextval('{seq}'), $2, $2 FROM (SELECT DISTINCT key FROM {temp}) k \
                     ORDER BY k.key COLLATE \"C\" \
                     ON CONFLICT (tbl, key) DO UPDATE SET seq = EXCLUDED.seq, \
                       lsn = greatest({pending}.lsn, EXCLUDED.lsn), \
                       first_lsn = least(coalesce({pending}.first_lsn, {pending}.lsn), EXCLUDED.first_lsn)",
                    pending = self.table("pending"),
                    seq = self.table("pending_seq").replace('\'', "''"),
                ),
                &[&id.as_str(), &lsn],
            )
            .await
            .map_err(Error::db(format!("green: storing keys of {id} left out of the copy")))
    }

    /// The oldest `limit` pending keys of the `ready` entries in share `part` (index, count)
    /// of the key hashes: (entry, key, seq). Apply workers each take their own share, so no
    /// two apply one key at once.
    ///
    /// Read entry by entry through `pending_tbl_seq`, each in seq order up to `limit`, merged
    /// here. Plans that read all of an entry's pending keys and sort them cost a full read of
    /// pending per batch once a bulk write on blue left a backlog there (490–540 ms a batch
    /// at 1–3M keys, so a drain's time grew with the square of the backlog), and the planner
    /// chose them: it knows nothing of the share's hash, and nothing at all of a `pending`
    /// that autovacuum has not analyzed yet (a backlog made and drained within a minute). So
    /// those plans are turned off for this read, leaving the index walk, which stops at the
    /// batch's end (8–10 ms). One statement over all entries cannot walk it in seq order:
    /// the seq index alone would walk past the keys of entries still being copied.
    pub async fn pending_batch(
        &self,
        green: &mut tokio_postgres::Client,
        ready: &[TableId],
        limit: i64,
        part: (usize, usize),
    ) -> Result<Vec<(TableId, Vec<String>, i64)>> {
        let (index, count) = (part.0 as i32, part.1.max(1) as i32);
        let sql = format!(
            "SELECT key, seq FROM {} WHERE tbl = $1 AND mod(hashtext(key::text) & 2147483647, $3) = $4 \
             ORDER BY seq LIMIT $2",
            self.table("pending")
        );
        let failed = |e| Error::db("green: reading pending keys")(e);
        // A transaction object: dropped unfinished (apply's stall timeout), it rolls back, so
        // the session never carries these settings, or a read-only transaction, into apply's
        // writes.
        let tx = green.build_transaction().read_only(true).start().await.map_err(failed)?;
        // Only plans that walk an index in order are left; the one chosen costs what it
        // would anyway, so it is not JIT-compiled for the disabled ones' cost.
        tx.batch_execute(
            "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off",
        )
        .await
        .map_err(failed)?;
        // Only the entries with keys pending are read (most rounds of an idle follower find
        // none): found by a walk over the distinct `tbl`s, an index probe each.
        let present: Vec<String> = tx
            .query(
                &format!(
                    "WITH RECURSIVE t(tbl) AS ( \
                       SELECT min(tbl) FROM {p} \
                       UNION ALL SELECT (SELECT min(tbl) FROM {p} WHERE tbl > t.tbl) FROM t WHERE t.tbl IS NOT NULL) \
                     SELECT tbl FROM t WHERE tbl IS NOT NULL",
                    p = self.table("pending")
                ),
                &[],
            )
            .await
            .map_err(failed)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let reads = ready.iter().filter(|id| present.iter().any(|p| p == id.as_str())).map(|id| async {
            let rows = tx.query(&sql, &[&id.as_str(), &limit, &count, &index]).await?;
            Ok::<_, tokio_postgres::Error>(rows.iter().map(|r| (id.clone(), r.get(0), r.get(1))).collect::<Vec<_>>())
        });
        let read = futures_util::future::try_join_all(reads).await.map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        let mut keys: Vec<(TableId, Vec<String>, i64)> = read.concat();
        keys.sort_unstable_by_key(|k| k.2);
        keys.truncate(limit.max(0) as usize);
        Ok(keys)
    }

    /// Removes the applied entries `seqs` from pending (a key captured again meanwhile has a new
    /// seq and stays) and, with `record`, remembers them as touched (in the log; see
    /// [`Self::compact_touched`]), so cutover re-verifies exactly the keys changed since the
    /// last verify. In apply's transaction.
    pub async fn finish_batch(&self, green: &impl GenericClient, seqs: &[i64], record: bool) -> Result<()> {
        // Locked first in (entry, key) order, the order capture's upsert takes them in: the two
        // never deadlock. Then deleted by `seq` through its index: a join against the locked
        // rows made the planner scan all of pending (a million rows after a burst: 80% of the
        // apply time).
        green
            .execute(
                &format!(
                    "SELECT 1 FROM {} WHERE seq = ANY($1) ORDER BY tbl COLLATE \"C\", key COLLATE \"C\" FOR UPDATE",
                    self.table("pending")
                ),
                &[&seqs],
            )
            .await
            .map_err(Error::db("green: locking applied keys"))?;
        let delete = format!("DELETE FROM {} WHERE seq = ANY($1)", self.table("pending"));
        green
            .execute(
                &if record {
                    format!(
                        "WITH done AS ({delete} RETURNING tbl, key, coalesce(lsn, 0) AS lsn) \
                         INSERT INTO {} (tbl, key, lsn) SELECT tbl, key, lsn FROM done",
                        self.table("touched_log"),
                    )
                } else {
                    delete
                },
                &[&seqs],
            )
            .await
            .map_err(Error::db("green: clearing pending keys"))?;
        Ok(())
    }

    /// Locks the pending rows of `keys` of entry `id` (in the order capture and apply lock
    /// them) and returns the keys that are pending.
    pub async fn lock_pending(
        &self,
        green: &impl GenericClient,
        id: &TableId,
        keys: &[Vec<String>],
    ) -> Result<std::collections::HashSet<Vec<String>>> {
        // Only capture adds pending rows, and this is capture: with none of the entry's rows
        // visible (apply's uncommitted deletes still are), none can appear or be in flight.
        let any: bool = green
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {} WHERE tbl = $1)", self.table("pending")),
                &[&id.as_str()],
            )
            .await
            .map_err(Error::db("green: locking pending keys"))?
            .get(0);
        if !any {
            return Ok(Default::default());
        }
        Ok(green
            .query(
                &format!(
                    "SELECT key FROM {} WHERE tbl = $1 AND key IN \
                       (SELECT ARRAY(SELECT jsonb_array_elements_text(k::jsonb)) FROM unnest($2::text[]) k) \
                     ORDER BY tbl COLLATE \"C\", key COLLATE \"C\" FOR UPDATE",
                    self.table("pending")
                ),
                &[&id.as_str(), &json_keys(keys.iter())],
            )
            .await
            .map_err(Error::db("green: locking pending keys"))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Records keys applied straight from capture as touched (cutover re-verifies them), in the
    /// log: an append without an index costs a tenth of an upsert into `touched`, which was half
    /// of a burst's apply time.
    pub async fn record_touched(&self, green: &impl GenericClient, events: &[KeyEvent]) -> Result<()> {
        let latest = latest(events);
        let tables: Vec<&str> = latest.keys().map(|(t, _)| t.as_str()).collect();
        let keys: Vec<String> = latest.keys().map(|(_, k)| serde_json::to_string(k).unwrap_or_default()).collect();
        let lsns: Vec<i64> = latest.values().map(|l| l.0).collect();
        green
            .execute(
                &format!(
                    "INSERT INTO {} (tbl, key, lsn) \
                     SELECT t, ARRAY(SELECT jsonb_array_elements_text(k::jsonb)), l \
                     FROM unnest($1::text[], $2::text[], $3::int8[]) AS e(t, k, l)",
                    self.table("touched_log"),
                ),
                &[&tables, &keys, &lsns],
            )
            .await
            .map_err(Error::db("green: recording applied keys"))?;
        Ok(())
    }

    /// Moves up to `limit` rows of the touched log into `touched`, one row per key (the largest
    /// position). Returns how many log rows were moved. The follower runs it when idle (and,
    /// under load that never lets it idle, once the log has grown); whoever reads `touched`
    /// runs it to the end first. Keys are upserted in (entry, key) order, so two of these at
    /// once (the log rows each takes are its own) cannot deadlock.
    pub async fn compact_touched(&self, green: &impl GenericClient, limit: i64) -> Result<u64> {
        green
            .execute(
                &format!(
                    "WITH moved AS (DELETE FROM {log} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {log} LIMIT $1)) \
                                    RETURNING tbl, key, lsn) \
                     INSERT INTO {touched} (tbl, key, lsn) \
                     SELECT tbl, key, max(lsn) FROM moved GROUP BY tbl, key ORDER BY tbl COLLATE \"C\", key COLLATE \"C\" \
                     ON CONFLICT (tbl, key) DO UPDATE SET lsn = greatest({touched}.lsn, EXCLUDED.lsn)",
                    log = self.table("touched_log"),
                    touched = self.table("touched"),
                ),
                &[&limit],
            )
            .await
            .map_err(Error::db("green: compacting applied keys"))
    }

    /// Moves all of the touched log into `touched`, in one statement (one scan of the log).
    pub async fn compact_all_touched(&self, green: &impl GenericClient) -> Result<u64> {
        green
            .execute(
                &format!(
                    "WITH moved AS (DELETE FROM {log} RETURNING tbl, key, lsn) \
                     INSERT INTO {touched} (tbl, key, lsn) \
                     SELECT tbl, key, max(lsn) FROM moved GROUP BY tbl, key ORDER BY tbl COLLATE \"C\", key COLLATE \"C\" \
                     ON CONFLICT (tbl, key) DO UPDATE SET lsn = greatest({touched}.lsn, EXCLUDED.lsn)",
                    log = self.table("touched_log"),
                    touched = self.table("touched"),
                ),
                &[],
            )
            .await
            .map_err(Error::db("green: compacting applied keys"))
    }

    /// Whether a key is pending for a change at or below blue position `lsn`. A key captured
    /// again keeps the position of its oldest change not yet applied (`first_lsn`), so a key
    /// written again after `lsn` cannot hide an earlier change that green does not have yet.
    pub async fn pending_through(&self, green: &impl GenericClient, lsn: Lsn) -> Result<bool> {
        Ok(green
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {} WHERE coalesce(first_lsn, lsn) <= $1)",
                    self.table("pending")
                ),
                &[&lsn],
            )
            .await
            .map_err(Error::db("green: reading pending keys"))?
            .get(0))
    }

    /// Keys pending.
    pub async fn pending_count(&self, green: &impl GenericClient) -> Result<i64> {
        Ok(green
            .query_one(&format!("SELECT count(*) FROM {}", self.table("pending")), &[])
            .await
            .map_err(Error::db("green: counting pending keys"))?
            .get(0))
    }

    /// Whether capture has passed `lsn` and no key captured at or before it is pending.
    pub async fn applied_through(&self, green: &impl GenericClient, lsn: Lsn) -> Result<bool> {
        Ok(green
            .query_one(
                &format!(
                    "SELECT coalesce(capture_lsn >= $1, false) \
                       AND NOT EXISTS (SELECT 1 FROM {} WHERE coalesce(first_lsn, lsn) <= $1) \
                     FROM {} WHERE id = 1",
                    self.table("pending"),
                    self.table("migration")
                ),
                &[&lsn],
            )
            .await
            .map_err(Error::db("green: reading apply progress"))?
            .get(0))
    }

    /// Keys of `id` applied since the last verify that are in `touched` (the caller moves the
    /// log in first: [`Self::compact_all_touched`]).
    pub async fn touched_keys(&self, green: &impl GenericClient, id: &TableId) -> Result<Vec<Vec<String>>> {
        Ok(green
            .query(&format!("SELECT key FROM {} WHERE tbl = $1", self.table("touched")), &[&id.as_str()])
            .await
            .map_err(Error::db("green: reading changed keys"))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Forgets touched keys found equal.
    pub async fn forget_touched(&self, green: &impl GenericClient, id: &TableId, keys: &[Vec<String>]) -> Result<()> {
        let keys = json_keys(keys.iter());
        green
            .execute(
                &format!(
                    "DELETE FROM {} WHERE tbl = $1 AND key IN \
                     (SELECT ARRAY(SELECT jsonb_array_elements_text(k::jsonb)) FROM unnest($2::text[]) k)",
                    self.table("touched")
                ),
                &[&id.as_str(), &keys],
            )
            .await
            .map_err(Error::db("green: forgetting verified keys"))?;
        Ok(())
    }

    /// Forgets touched keys found equal by a check at blue position `lsn`, unless applied again
    /// after it (a follower runs meanwhile).
    pub async fn forget_touched_through(
        &self,
        green: &impl GenericClient,
        id: &TableId,
        keys: &[Vec<String>],
        lsn: Lsn,
    ) -> Result<()> {
        let keys = json_keys(keys.iter());
        green
            .execute(
                &format!(
                    "DELETE FROM {} WHERE tbl = $1 AND lsn <= $3 AND key IN \
                     (SELECT ARRAY(SELECT jsonb_array_elements_text(k::jsonb)) FROM unnest($2::text[]) k)",
                    self.table("touched")
                ),
                &[&id.as_str(), &keys, &lsn],
            )
            .await
            .map_err(Error::db("green: forgetting verified keys"))?;
        Ok(())
    }

    /// Whether the last verify of `id` found every bucket clean.
    pub async fn verified_clean(&self, green: &impl GenericClient, id: &TableId) -> Result<bool> {
        Ok(green
            .query_one(
                &format!("SELECT count(*) > 0 AND bool_and(ok) FROM {} WHERE tbl = $1", self.table("verified")),
                &[&id.as_str()],
            )
            .await
            .map_err(Error::db("green: reading the last verify"))?
            .get::<_, Option<bool>>(0)
            .unwrap_or(false))
    }

    /// Records which buckets of `id` verified clean at blue position `lsn`, so a later check
    /// (cutover) looks again only at what changed since; when all were clean, the keys applied
    /// before `lsn` are forgotten as touched (this verify saw them).
    pub async fn record_verified(&self, green: &impl GenericClient, id: &TableId, lsn: Lsn, ok: &[bool]) -> Result<()> {
        let n = ok.len() as i32;
        let buckets: Vec<i32> = (0..n).collect();
        green
            .execute(
                &format!(
                    "INSERT INTO {v} (tbl, buckets, bucket, lsn, ok, verified_at) \
                     SELECT $1, $2, b, $3, o, now() FROM unnest($4::int[], $5::bool[]) AS x(b, o) \
                     ON CONFLICT (tbl, bucket) DO UPDATE SET buckets = EXCLUDED.buckets, lsn = EXCLUDED.lsn, \
                       ok = EXCLUDED.ok, verified_at = EXCLUDED.verified_at",
                    v = self.table("verified")
                ),
                &[&id.as_str(), &n, &lsn, &buckets, &ok],
            )
            .await
            .map_err(Error::db("green: recording verified buckets"))?;
        green
            .execute(
                &format!("DELETE FROM {} WHERE tbl = $1 AND bucket >= $2", self.table("verified")),
                &[&id.as_str(), &n],
            )
            .await
            .map_err(Error::db("green: recording verified buckets"))?;
        if ok.iter().all(|o| *o) {
            green
                .execute(
                    // Locked in the order compaction upserts them in: the two cannot deadlock.
                    &format!(
                        "DELETE FROM {t} WHERE (tbl, key) IN (SELECT tbl, key FROM {t} WHERE tbl = $1 AND lsn <= $2 \
                           ORDER BY tbl COLLATE \"C\", key COLLATE \"C\" FOR UPDATE)",
                        t = self.table("touched")
                    ),
                    &[&id.as_str(), &lsn],
                )
                .await
                .map_err(Error::db("green: clearing verified keys"))?;
            green
                .execute(
                    &format!("DELETE FROM {} WHERE tbl = $1 AND lsn <= $2", self.table("touched_log")),
                    &[&id.as_str(), &lsn],
                )
                .await
                .map_err(Error::db("green: clearing verified keys"))?;
        }
        Ok(())
    }
}
