//! Verify's parts on several machines: a verify run splits each table's heap on each side into
//! block ranges (`verify_parts`), and every session of `migrate verify` (the leader) and of
//! `migrate verify --join` (joined workers) claims one with `FOR UPDATE SKIP LOCKED` in the
//! transaction that stores its summary. A worker that dies frees its part by dying (green ends
//! its transaction), and another session reads the part again. One run at a time per plan: the
//! leader holds an advisory lock for it and removes earlier runs' parts when it starts.

use std::collections::HashMap;

use tokio_postgres::GenericClient;

use super::State;
use crate::error::{Error, Result};

/// A part to read, as the leader plans it.
#[derive(Debug, Clone)]
pub struct NewPart {
    /// The entry (its [`super::TableId`] text).
    pub table: String,
    /// `blue` or `green`.
    pub side: &'static str,
    /// Part number within the table's side.
    pub number: i32,
    /// First heap block (inclusive).
    pub first_block: i64,
    /// End heap block (exclusive); `None` for the last part, which reads to the table's end
    /// (blocks added since planning included).
    pub end_block: Option<i64>,
    /// Buckets the summary is taken over.
    pub buckets: i64,
    /// Fingerprint of the leader's summary query: a worker whose own differs (another plan
    /// file, another `migrate`) refuses the part instead of summing something else.
    pub shape: String,
    /// The side's snapshot the leader exported for the run: every part of a side is read as
    /// of one moment, the same for every process.
    pub snapshot: String,
}

/// A part claimed in an open green transaction.
#[derive(Debug, Clone)]
pub struct PartClaim {
    /// The verify run (the leader's worker id).
    pub run: String,
    /// The part, as planned.
    pub part: NewPart,
}

/// One part's summary: bucket → (rows, sum of row hashes).
pub type PartSummary = HashMap<i64, (i64, i128)>;

const PARTS: &str = "verify_parts";

impl State {
    /// Tries to take the plan's verify lock on this session (held until it ends or
    /// [`State::end_verify_run`]): one verify run at a time, so a run's parts are its own.
    /// `false` while another verify holds it.
    pub async fn try_begin_verify_run(&self, green: &impl GenericClient) -> Result<bool> {
        let key = format!("bluegreen verify {}", self.plan);
        Ok(green
            .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
            .await
            .map_err(Error::db("green: taking the verify lock"))?
            .get(0))
    }

    /// Releases [`State::try_begin_verify_run`]'s lock.
    pub async fn end_verify_run(&self, green: &impl GenericClient) {
        let key = format!("bluegreen verify {}", self.plan);
        let _ = green.execute("SELECT pg_advisory_unlock(hashtext($1))", &[&key]).await;
    }

    /// Replaces every earlier run's parts with `parts` of `run`, in one statement: joined
    /// workers see all of a run's parts at once or none. Creates the table for state written
    /// before it existed.
    pub async fn plan_verify_parts(&self, green: &impl GenericClient, run: &str, parts: &[NewPart]) -> Result<()> {
        let t = self.table(PARTS);
        green
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                     run text NOT NULL, tbl text NOT NULL, side text NOT NULL, part int NOT NULL,
                     first_block bigint NOT NULL, end_block bigint, buckets bigint NOT NULL, shape text NOT NULL,
                     snapshot text NOT NULL,
                     done boolean NOT NULL DEFAULT false, stored int NOT NULL DEFAULT 0, worker text,
                     rows bigint, seconds float8,
                     bucket_ids bigint[], counts bigint[], sums numeric[], finished_at timestamptz,
                     PRIMARY KEY (run, tbl, side, part));
                 {leases}",
                leases = self.add_columns(super::LEASE_COLUMNS)
            ))
            .await
            .map_err(Error::db("green: creating verify parts"))?;
        // The DELETE sees the table as it was before the statement: it removes earlier runs
        // only.
        let insert = format!(
            "WITH earlier AS (DELETE FROM {t}) \
             INSERT INTO {t} (run, tbl, side, part, first_block, end_block, buckets, shape, snapshot) \
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int[], $5::int8[], $6::int8[], $7::int8[], $8::text[], $9::text[])"
        );
        let col = |f: fn(&NewPart) -> String| parts.iter().map(f).collect::<Vec<_>>();
        let numbers: Vec<i32> = parts.iter().map(|p| p.number).collect();
        let firsts: Vec<i64> = parts.iter().map(|p| p.first_block).collect();
        let ends: Vec<Option<i64>> = parts.iter().map(|p| p.end_block).collect();
        let buckets: Vec<i64> = parts.iter().map(|p| p.buckets).collect();
        green
            .execute(
                &insert,
                &[
                    &run,
                    &col(|p| p.table.clone()),
                    &col(|p| p.side.to_string()),
                    &numbers,
                    &firsts,
                    &ends,
                    &buckets,
                    &col(|p| p.shape.clone()),
                    &col(|p| p.snapshot.clone()),
                ],
            )
            .await
            .map_err(Error::db("green: planning verify parts"))?;
        Ok(())
    }

    /// Claims a part not done (of `run`, or of any run for a joined worker), skipping parts
    /// other transactions hold; in `tx`, which then stores its summary. By part number, blue's
    /// first within a number: the sides alternate, so blue's transform (CPU) and green's plain
    /// reads (disk) overlap instead of queueing one after the other (at 100M rows, all of
    /// blue's parts first made verify 1.3x slower than one scan per side).
    pub async fn claim_verify_part(&self, tx: &impl GenericClient, run: Option<&str>) -> Result<Option<PartClaim>> {
        if !self.has_verify_parts(tx).await? {
            return Ok(None);
        }
        let row = tx
            .query_opt(
                &format!(
                    "SELECT run, tbl, side, part, first_block, end_block, buckets, shape, snapshot FROM {} \
                     WHERE NOT done AND ($1::text IS NULL OR run = $1) \
                     ORDER BY part, side = 'blue' DESC, tbl LIMIT 1 FOR UPDATE SKIP LOCKED",
                    self.table(PARTS)
                ),
                &[&run],
            )
            .await
            .map_err(Error::db("green: claiming a verify part"))?;
        Ok(row.map(|r| PartClaim {
            run: r.get(0),
            part: NewPart {
                table: r.get(1),
                side: if r.get::<_, String>(2) == "blue" { "blue" } else { "green" },
                number: r.get(3),
                first_block: r.get(4),
                end_block: r.get(5),
                buckets: r.get(6),
                shape: r.get(7),
                snapshot: r.get(8),
            },
        }))
    }

    /// Stores a claimed part's summary and marks it done, in the claiming transaction.
    pub async fn verify_part_done(
        &self,
        tx: &impl GenericClient,
        claim: &PartClaim,
        worker: &str,
        summary: &PartSummary,
        seconds: f64,
    ) -> Result<()> {
        let ids: Vec<i64> = summary.keys().copied().collect();
        let counts: Vec<i64> = ids.iter().map(|b| summary[b].0).collect();
        let sums: Vec<String> = ids.iter().map(|b| summary[b].1.to_string()).collect();
        let rows: i64 = counts.iter().sum();
        let p = &claim.part;
        let n = tx
            .execute(
                &format!(
                    "UPDATE {} SET done = true, stored = stored + 1, worker = $5, rows = $6, seconds = $7, bucket_ids = $8, counts = $9, \
                       sums = $10::text[]::numeric[], finished_at = now() \
                     WHERE run = $1 AND tbl = $2 AND side = $3 AND part = $4",
                    self.table(PARTS)
                ),
                &[&claim.run, &p.table, &p.side, &p.number, &worker, &rows, &seconds, &ids, &counts, &sums],
            )
            .await
            .map_err(Error::db("green: storing a verify part"))?;
        if n != 1 {
            return Err(Error::Interrupted { during: format!("verify run {} was replaced by another", claim.run) });
        }
        Ok(())
    }

    /// Parts not done: of `run`, or of any run.
    pub async fn verify_parts_left(&self, green: &impl GenericClient, run: Option<&str>) -> Result<i64> {
        if !self.has_verify_parts(green).await? {
            return Ok(0);
        }
        Ok(green
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} WHERE NOT done AND ($1::text IS NULL OR run = $1)",
                    self.table(PARTS)
                ),
                &[&run],
            )
            .await
            .map_err(Error::db("green: counting verify parts left"))?
            .get(0))
    }

    /// Seconds the parts of one table took to read in `run`, summed over every session.
    pub async fn verify_part_seconds(&self, green: &impl GenericClient, run: &str, table: &str) -> Result<f64> {
        Ok(green
            .query_one(
                &format!(
                    "SELECT coalesce(sum(seconds), 0)::float8 FROM {} WHERE run = $1 AND tbl = $2",
                    self.table(PARTS)
                ),
                &[&run, &table],
            )
            .await
            .map_err(Error::db("green: reading verify parts"))?
            .get(0))
    }

    /// Removes the parts of `run` not read yet: its leader is gone (its snapshots with it), or
    /// failed.
    pub async fn abandon_verify_run(&self, green: &impl GenericClient, run: &str) -> Result<()> {
        if !self.has_verify_parts(green).await? {
            return Ok(());
        }
        green
            .execute(&format!("DELETE FROM {} WHERE run = $1 AND NOT done", self.table(PARTS)), &[&run])
            .await
            .map_err(Error::db("green: removing an abandoned verify run"))?;
        Ok(())
    }

    /// The summed summary of one table's side over every part of `run`.
    pub async fn verify_summary(
        &self,
        green: &impl GenericClient,
        run: &str,
        table: &str,
        side: &str,
    ) -> Result<PartSummary> {
        let rows = green
            .query(
                &format!(
                    "SELECT u.b, sum(u.c)::int8, sum(u.s)::text FROM {} p, unnest(p.bucket_ids, p.counts, p.sums) AS u(b, c, s) \
                     WHERE p.run = $1 AND p.tbl = $2 AND p.side = $3 AND p.done GROUP BY u.b",
                    self.table(PARTS)
                ),
                &[&run, &table, &side],
            )
            .await
            .map_err(Error::db("green: reading verify parts"))?;
        rows.iter()
            .map(|r| {
                let sum: String = r.get(2);
                let sum = sum.parse::<i128>().map_err(|e| Error::StateDecode {
                    what: format!("verify part sum of {table} ({side})"),
                    value: sum.clone(),
                    reason: e.to_string(),
                })?;
                Ok((r.get(0), (r.get(1), sum)))
            })
            .collect()
    }

    async fn has_verify_parts(&self, green: &impl GenericClient) -> Result<bool> {
        Ok(green
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.table(PARTS)])
            .await
            .map_err(Error::db("green: looking for verify parts"))?
            .get(0))
    }
}
