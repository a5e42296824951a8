//! Short snapshots. A copy of hundreds of millions of rows takes hours; one snapshot held that
//! long holds blue's vacuum horizon (`backend_xmin`) for all of them, and dead rows pile up in
//! every table of the database. Instead, an exporting transaction is replaced every
//! `[copy] snapshot_max_age`: each chunk imports the newest snapshot in a transaction of its
//! own, and an exporter ends a moment (half a second) after a newer one was published. No
//! snapshot of ours is then older than that age, plus a second, plus one claim (of one or more
//! chunks, see `worker`).
//!
//! Chunks of one table read under different snapshots can see a row twice (an update moved it
//! from a block range already read into one read later) or not at all (moved the other way).
//!
//! **The transaction floor.** The run's floor is the `xmin` of a snapshot taken just before the
//! run plans its chunks and exports its first snapshot: every transaction below it had ended
//! before any chunk began. Each chunk leaves out the row versions
//! written by transactions at or above the floor and stores their keys in pending, in the green
//! transaction that commits the chunk; apply writes those rows from blue once the table is done.
//! The versions a chunk copies were then all written by transactions that ended before every
//! snapshot of the run, so for each key every snapshot sees the same one of them, or none (a later
//! transaction removed it): each lives in one block range and is copied once at most. A row no
//! chunk saw (an update moved it into a range read earlier) was written after that range's
//! snapshot, so capture has its key. A chunk tells those versions by `age(xmin)`: the inserting transaction's distance
//! from the current one, a 32-bit difference that aliases a few rows older than 2^32 transactions
//! into the window (their keys are stored too, and apply writes them the same way).
//!
//! A chunk whose snapshot is below the floor (never under one run) reads every row, and so do a
//! resumed run's chunks of an earlier floor: before such a table's indexes are rebuilt, its rows
//! of every pending key are removed (see `forget_changed` in the worker), a full scan of the table.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::{
    error::{Error, Result},
    pg::Lsn,
    plan::Plan,
    shutdown::Shutdown,
};

/// How long an exporter stays open after a newer snapshot was published: a worker reads the
/// snapshot's name right before importing it, so a moment is enough.
const GRACE: Duration = Duration::from_millis(500);

/// The newest exported snapshot: its generation (0 for the run's first) and name.
pub(super) struct Snapshots {
    current: Mutex<(u64, String)>,
}

impl Snapshots {
    pub(super) fn new(first: String) -> Snapshots {
        Snapshots { current: Mutex::new((0, first)) }
    }

    /// The generation and name of the newest snapshot.
    pub(super) fn current(&self) -> (u64, String) {
        self.current.lock().map(|c| c.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }

    fn publish(&self, name: String) -> u64 {
        let mut c = self.current.lock().unwrap_or_else(|e| e.into_inner());
        c.0 += 1;
        c.1 = name;
        c.0
    }
}

/// Opens a transaction on `blue` and exports its snapshot (see [`crate::pg::export_snapshot`]).
pub(super) async fn export(blue: &Client) -> Result<String> {
    crate::pg::export_snapshot(blue, "blue: copy snapshot").await
}

/// The `xmin` of a snapshot taken now (outside a transaction: a fresh one), as a full
/// transaction id: the run's transaction floor.
pub(super) async fn snapshot_xmin(blue: &Client) -> Result<i64> {
    Ok(blue
        .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8", &[])
        .await
        .map_err(Error::db("blue: reading the copy snapshot's horizon"))?
        .get(0))
}

/// In a chunk's transaction: how many transactions back from the current one the floor lies
/// (`age` of the floor), when every transaction below the floor had ended before the chunk's
/// snapshot, and blue's position now (where the keys the chunk leaves out are stored). The
/// chunk leaves out rows whose `age(xmin)` lies in `0..=span`.
pub(super) async fn window(blue: &Client, floor: i64) -> Result<Option<(i32, Lsn)>> {
    let row = blue
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8 >= $1, \
                    age(($1 % 4294967296)::text::xid), (pg_current_wal_insert_lsn() - '0/0')::int8",
            &[&floor],
        )
        .await
        .map_err(Error::db("blue: reading the chunk snapshot's horizon"))?;
    let (above, span): (bool, i32) = (row.get(0), row.get(1));
    Ok((above && span >= 0).then_some((span, Lsn(row.get(2)))))
}

/// Replaces the exported snapshot every `[copy] snapshot_max_age` until `stop`, then ends every
/// exporter. `first` holds the run's first snapshot. With an age of 0 the first one serves the
/// whole run. A failure to make a new one is logged and the current one kept (the copy goes on;
/// only blue's horizon is held longer).
pub(super) async fn rotate(
    plan: Plan,
    snapshots: Arc<Snapshots>,
    first: (Client, Option<String>),
    stop: Shutdown,
    sessions: Option<Arc<crate::state::Sessions>>,
) {
    let age = plan.copy.snapshot_max_age;
    // Each exporter with its entry in a joined worker's record of sessions.
    let mut held = VecDeque::from([first]);
    if age.is_zero() {
        // One snapshot for the run: its exporter stays until the workers are done.
        stop.wait().await;
    }
    while !age.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(age) => {}
            _ = stop.wait() => break,
        }
        let made = async {
            let blue = plan.blue.connect().await?;
            let entry = match &sessions {
                Some(s) => Some(s.add("blue", &blue).await?),
                None => None,
            };
            let name = export(&blue).await?;
            Ok::<_, Error>((blue, entry, name))
        };
        match made.await {
            Ok((blue, entry, name)) => {
                let generation = snapshots.publish(name);
                held.push_back((blue, entry));
                tracing::debug!(generation, "new copy snapshot");
            }
            Err(e) => {
                warn!(error = %e, "could not take a new copy snapshot; the current one serves on");
                continue;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(GRACE) => {}
            _ = stop.wait() => break,
        }
        while held.len() > 1 {
            if let Some((old, entry)) = held.pop_front() {
                let ended = old.batch_execute("COMMIT").await.is_ok();
                drop(old);
                // Unanswered (blue lost), it may still hold blue's horizon there: it stays on
                // the record for the leader to end.
                match (&sessions, entry) {
                    (Some(s), Some(entry)) if ended => s.remove(&entry).await,
                    (Some(s), _) if !ended => s.left_open(),
                    _ => {}
                }
            }
        }
    }
    for (c, _) in held {
        if c.batch_execute("COMMIT").await.is_err() {
            if let Some(s) = &sessions {
                s.left_open();
            }
        }
    }
    if !age.is_zero() {
        info!(generations = snapshots.current().0 + 1, "copy snapshots ended");
    }
}

/// Begins a chunk's transaction on `blue` with the newest snapshot; returns its generation.
/// A snapshot whose exporter just ended is replaced by the next newest.
pub(super) async fn begin(snapshots: &Snapshots, blue: &Client) -> Result<u64> {
    let mut tries = 0;
    loop {
        let (generation, name) = snapshots.current();
        let sql = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            crate::pg::literal(&name)
        );
        match blue.batch_execute(&sql).await {
            Ok(()) => return Ok(generation),
            Err(e) => {
                let _ = blue.batch_execute("ROLLBACK").await;
                tries += 1;
                // 22023 "invalid snapshot identifier", 55000 "could not import the requested
                // snapshot": its exporter is gone, or going.
                if tries >= 5 || e.code().is_none_or(|c| !matches!(c.code(), "22023" | "55000")) {
                    return Err(Error::db("blue: importing the copy snapshot")(e));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
