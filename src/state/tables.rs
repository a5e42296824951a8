//! Per plan entry: its copy state, deferred objects, definition and source file node; and its
//! copy chunks.

use tokio_postgres::GenericClient;

use super::{decode, State, TableId, TableState};
use crate::{
    error::{Error, Result},
    pg::catalog::DeferredObject,
};

/// A plan entry as state recorded it.
#[derive(Debug, Clone)]
pub struct TableRecord {
    /// Its id.
    pub id: TableId,
    /// Its target table.
    pub target: String,
    /// Its copy state.
    pub state: TableState,
    /// What defined its rows when its copy began (see `ResolvedTable::definition`).
    pub definition: Option<serde_json::Value>,
}

/// One copy chunk: a heap block range and whether it is done.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkRecord {
    /// Chunk number within its table, from 0.
    pub number: i32,
    /// First heap block (inclusive); `None` is unbounded.
    pub first_block: Option<i64>,
    /// End heap block (exclusive); `None` is unbounded.
    pub end_block: Option<i64>,
    /// The leaf partition it reads, for a partitioned source.
    pub part: Option<String>,
    /// Its rows are on green.
    pub done: bool,
    /// Rows it copied (0 until done).
    pub rows: i64,
}

/// An entry's copy progress, for `status`.
#[derive(Debug, Clone)]
pub struct TableProgress {
    /// Its id.
    pub id: TableId,
    /// Its state's name.
    pub state: String,
    /// Rows estimated when the copy began.
    pub rows_estimated: i64,
    /// Rows in done chunks.
    pub rows_copied: i64,
    /// Chunks done.
    pub chunks_done: i64,
    /// Chunks in all.
    pub chunks: i64,
}

/// A stored table state, or an error naming the entry and the value.
fn stored_state(id: &TableId, name: String) -> Result<TableState> {
    TableState::from_name(&name).ok_or_else(|| Error::StateDecode {
        what: format!("the copy state of {id}"),
        value: name,
        reason: "not a table state".into(),
    })
}

impl State {
    /// Reads an entry's state and its recorded deferred objects.
    pub async fn table_state(
        &self,
        green: &impl GenericClient,
        id: &TableId,
    ) -> Result<Option<(TableState, Vec<DeferredObject>)>> {
        let row = green
            .query_opt(&format!("SELECT state, deferred FROM {} WHERE tbl = $1", self.table("tables")), &[&id.as_str()])
            .await
            .map_err(Error::db(format!("green: reading state of {id}")))?;
        let Some(r) = row else { return Ok(None) };
        let state = stored_state(id, r.get(0))?;
        let deferred = decode(&format!("the deferred objects of {id}"), r.get(1))?;
        Ok(Some((state, deferred)))
    }

    /// Records an entry whose copy begins: its state (`Loading`), target, estimate, deferred
    /// objects, definition and the blue file node its chunks are block ranges of.
    #[allow(clippy::too_many_arguments)]
    pub async fn begin_table(
        &self,
        green: &impl GenericClient,
        id: &TableId,
        target: &str,
        rows_estimated: u64,
        deferred: &[DeferredObject],
        definition: &serde_json::Value,
        filenode: i64,
        shape: &serde_json::Value,
    ) -> Result<()> {
        let deferred = serde_json::to_value(deferred).map_err(|e| Error::StateDecode {
            what: format!("the deferred objects of {id}"),
            value: String::new(),
            reason: e.to_string(),
        })?;
        green
            .execute(
                &format!(
                    "INSERT INTO {t} (tbl, target, state, rows_estimated, deferred, definition, source_filenode, source_shape) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (tbl) DO UPDATE SET target = EXCLUDED.target, state = EXCLUDED.state, \
                       rows_estimated = EXCLUDED.rows_estimated, deferred = EXCLUDED.deferred, \
                       definition = EXCLUDED.definition, source_filenode = EXCLUDED.source_filenode, \
                       source_shape = EXCLUDED.source_shape, drift = NULL, updated_at = now()",
                    t = self.table("tables")
                ),
                &[
                    &id.as_str(),
                    &target,
                    &TableState::Loading.name(),
                    &(rows_estimated as i64),
                    &deferred,
                    definition,
                    &filenode,
                    shape,
                ],
            )
            .await
            .map_err(Error::db(format!("green: saving state of {id}")))?;
        Ok(())
    }

    /// Moves a recorded entry to `state`.
    pub async fn set_table_state(&self, green: &impl GenericClient, id: &TableId, state: TableState) -> Result<()> {
        green
            .execute(
                &format!("UPDATE {} SET state = $2, updated_at = now() WHERE tbl = $1", self.table("tables")),
                &[&id.as_str(), &state.name()],
            )
            .await
            .map_err(Error::db(format!("green: saving state of {id}")))?;
        Ok(())
    }

    /// The blue file node recorded when the entry's chunks were planned.
    pub async fn source_filenode(&self, green: &impl GenericClient, id: &TableId) -> Result<Option<i64>> {
        Ok(green
            .query_opt(&format!("SELECT source_filenode FROM {} WHERE tbl = $1", self.table("tables")), &[&id.as_str()])
            .await
            .map_err(Error::db(format!("green: reading state of {id}")))?
            .and_then(|r| r.get(0)))
    }

    /// Every entry state knows, with its definition.
    pub async fn recorded_tables(&self, green: &impl GenericClient) -> Result<Vec<TableRecord>> {
        let rows = green
            .query(&format!("SELECT tbl, state, definition, target FROM {} ORDER BY tbl", self.table("tables")), &[])
            .await
            .map_err(Error::db("green: reading table states"))?;
        rows.iter()
            .map(|r| {
                let id = TableId::from_stored(r.get(0));
                let state = stored_state(&id, r.get(1))?;
                Ok(TableRecord { id, state, definition: r.get(2), target: r.get(3) })
            })
            .collect()
    }

    /// Replaces an entry's recorded source shape (a partition created since is part of it).
    pub async fn set_source_shape(
        &self,
        green: &impl GenericClient,
        id: &TableId,
        shape: &serde_json::Value,
    ) -> Result<()> {
        green
            .execute(
                &format!("UPDATE {} SET source_shape = $2, updated_at = now() WHERE tbl = $1", self.table("tables")),
                &[&id.as_str(), shape],
            )
            .await
            .map_err(Error::db(format!("green: recording the shape of {id}")))?;
        Ok(())
    }

    /// The shape of each copied entry's source table, recorded when its copy began (an entry
    /// still copying is watched by the copy itself).
    pub async fn source_shapes(&self, green: &impl GenericClient) -> Result<Vec<(TableId, serde_json::Value)>> {
        Ok(green
            .query(
                &format!(
                    "SELECT tbl, source_shape FROM {} WHERE source_shape IS NOT NULL AND state = $1 ORDER BY tbl",
                    self.table("tables")
                ),
                &[&TableState::Done.name()],
            )
            .await
            .map_err(Error::db("green: reading recorded table shapes"))?
            .iter()
            .map(|r| (TableId::from_stored(r.get(0)), r.get(1)))
            .collect())
    }

    /// Records that an entry's source drifted on blue (see `capture::drift`): following stops
    /// and stays stopped until the entry is copied again.
    pub async fn mark_drifted(&self, green: &impl GenericClient, id: &TableId, what: &str) -> Result<()> {
        green
            .execute(
                &format!("UPDATE {} SET drift = $2, updated_at = now() WHERE tbl = $1", self.table("tables")),
                &[&id.as_str(), &what],
            )
            .await
            .map_err(Error::db(format!("green: recording the drift of {id}")))?;
        Ok(())
    }

    /// Entries whose source drifted, with what happened.
    pub async fn drifted(&self, green: &impl GenericClient) -> Result<Vec<(TableId, String)>> {
        Ok(green
            .query(
                &format!("SELECT tbl, drift FROM {} WHERE drift IS NOT NULL ORDER BY tbl", self.table("tables")),
                &[],
            )
            .await
            .map_err(Error::db("green: reading table drift"))?
            .iter()
            .map(|r| (TableId::from_stored(r.get(0)), r.get(1)))
            .collect())
    }

    /// Sends an entry back to the start: not copied, no chunks, no drift. In the transaction
    /// that empties its green table.
    pub async fn restart_table(&self, green: &impl GenericClient, id: &TableId) -> Result<()> {
        green
            .execute(
                &format!(
                    "UPDATE {} SET state = $2, drift = NULL, source_shape = NULL, updated_at = now() WHERE tbl = $1",
                    self.table("tables")
                ),
                &[&id.as_str(), &TableState::Pending.name()],
            )
            .await
            .map_err(Error::db(format!("green: restarting {id}")))?;
        // Its rows are copied again: what verify found of the old ones no longer holds, and
        // the cutover must wait for a verify of the new ones.
        green
            .execute(&format!("DELETE FROM {} WHERE tbl = $1", self.table("verified")), &[&id.as_str()])
            .await
            .map_err(Error::db(format!("green: restarting {id}")))?;
        self.reset_chunks(green, id).await
    }

    /// Entries whose copy is done: only their keys may be applied.
    pub async fn done_tables(&self, green: &impl GenericClient) -> Result<Vec<TableId>> {
        Ok(green
            .query(&format!("SELECT tbl FROM {} WHERE state = $1", self.table("tables")), &[&TableState::Done.name()])
            .await
            .map_err(Error::db("green: reading table states"))?
            .iter()
            .map(|r| TableId::from_stored(r.get(0)))
            .collect())
    }

    /// Forgets entries the plan no longer has: their state, chunks, pending and touched keys
    /// and verified buckets (their rows on green stay).
    pub async fn forget_tables(&self, green: &impl GenericClient, ids: &[TableId]) -> Result<()> {
        let ids: Vec<&str> = ids.iter().map(TableId::as_str).collect();
        for t in ["tables", "chunks", "pending", "touched", "touched_log", "verified"] {
            green
                .execute(&format!("DELETE FROM {} WHERE tbl = ANY($1)", self.table(t)), &[&ids])
                .await
                .map_err(Error::db("green: forgetting removed plan entries"))?;
        }
        Ok(())
    }

    /// Forgets an entry's chunks (its blue heap was rewritten: block ranges mean nothing now).
    pub async fn reset_chunks(&self, green: &impl GenericClient, id: &TableId) -> Result<()> {
        green
            .execute(&format!("DELETE FROM {} WHERE tbl = $1", self.table("chunks")), &[&id.as_str()])
            .await
            .map_err(Error::db(format!("green: resetting chunks of {id}")))?;
        Ok(())
    }

    /// Records an entry's planned chunks (kept when already recorded).
    pub async fn add_chunks(&self, green: &impl GenericClient, id: &TableId, chunks: &[ChunkRecord]) -> Result<()> {
        let numbers: Vec<i32> = chunks.iter().map(|c| c.number).collect();
        let firsts: Vec<Option<i64>> = chunks.iter().map(|c| c.first_block).collect();
        let ends: Vec<Option<i64>> = chunks.iter().map(|c| c.end_block).collect();
        let parts: Vec<Option<&str>> = chunks.iter().map(|c| c.part.as_deref()).collect();
        green
            .execute(
                &format!(
                    "INSERT INTO {} (tbl, chunk, first_block, end_block, part) \
                     SELECT $1, n, f, e, p FROM unnest($2::int[], $3::int8[], $4::int8[], $5::text[]) AS c(n, f, e, p) \
                     ON CONFLICT DO NOTHING",
                    self.table("chunks")
                ),
                &[&id.as_str(), &numbers, &firsts, &ends, &parts],
            )
            .await
            .map_err(Error::db(format!("green: recording chunks of {id}")))?;
        Ok(())
    }

    /// An entry's chunks, in order.
    pub async fn chunks(&self, green: &impl GenericClient, id: &TableId) -> Result<Vec<ChunkRecord>> {
        Ok(green
            .query(
                &format!(
                    "SELECT chunk, first_block, end_block, done, COALESCE(rows, 0), part FROM {} WHERE tbl = $1 ORDER BY chunk",
                    self.table("chunks")
                ),
                &[&id.as_str()],
            )
            .await
            .map_err(Error::db(format!("green: reading chunks of {id}")))?
            .iter()
            .map(|r| ChunkRecord {
                number: r.get(0),
                first_block: r.get(1),
                end_block: r.get(2),
                done: r.get(3),
                rows: r.get(4),
                part: r.get(5),
            })
            .collect())
    }

    /// Marks chunk `chunk` and the `with` chunks after it (copied in one claim, one block range)
    /// done by `worker`; in the transaction that wrote their rows. The rows, bytes and seconds
    /// are counted on `chunk`; the others name it in `copied_with`.
    #[allow(clippy::too_many_arguments)]
    pub async fn chunk_done(
        &self,
        green: &impl GenericClient,
        id: &TableId,
        chunk: i32,
        rows: u64,
        bytes: u64,
        seconds: f64,
        (epoch, worker, floor): (i32, &str, Option<i64>),
        with: i32,
    ) -> Result<()> {
        green
            .execute(
                &format!(
                    "UPDATE {} SET done = true, rows = CASE WHEN chunk = $2 THEN $3::int8 ELSE 0 END, \
                       bytes = CASE WHEN chunk = $2 THEN $4::int8 ELSE 0 END, \
                       seconds = CASE WHEN chunk = $2 THEN $5::float8 ELSE 0 END, \
                       epoch = $6, finished_at = now(), worker = $7, xid_floor = $8, \
                       copied_with = CASE WHEN chunk = $2 THEN NULL ELSE $2 END \
                     WHERE tbl = $1 AND chunk BETWEEN $2 AND $2 + $9::int",
                    self.table("chunks")
                ),
                &[&id.as_str(), &chunk, &(rows as i64), &(bytes as i64), &seconds, &epoch, &worker, &floor, &with],
            )
            .await
            .map_err(Error::db(format!("green: marking chunk {chunk} of {id} done")))?;
        Ok(())
    }

    /// Copy progress of every recorded entry.
    pub async fn table_progress(&self, green: &impl GenericClient) -> Result<Vec<TableProgress>> {
        Ok(green
            .query(
                &format!(
                    "SELECT t.tbl, t.state, t.rows_estimated, \
                            COALESCE(sum(c.rows) FILTER (WHERE c.done), 0)::int8, \
                            count(c.chunk) FILTER (WHERE c.done), count(c.chunk) \
                     FROM {} t LEFT JOIN {} c ON c.tbl = t.tbl GROUP BY 1, 2, 3 ORDER BY 1",
                    self.table("tables"),
                    self.table("chunks")
                ),
                &[],
            )
            .await
            .map_err(Error::db("green: reading table progress"))?
            .iter()
            .map(|r| TableProgress {
                id: TableId::from_stored(r.get(0)),
                state: r.get(1),
                rows_estimated: r.get(2),
                rows_copied: r.get(3),
                chunks_done: r.get(4),
                chunks: r.get(5),
            })
            .collect())
    }
}
