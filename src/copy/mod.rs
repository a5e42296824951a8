//! Stage 1: copy. Each table is split into key ranges; each range streams as raw COPY from blue
//! (through the resolved transforming SELECT) straight into COPY on green, never decoded here.
//! A chunk's rows and its `done` mark commit in one green transaction, so a killed run redoes
//! exactly the chunks that did not commit: nothing is copied twice, nothing is missed.

mod chunk;
mod indexes;
mod progress;
mod shutdown;
mod throttle;

pub use chunk::{condition, Chunk};
pub use shutdown::Shutdown;

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Instant,
};

use futures_util::{SinkExt, TryStreamExt};
use tokio::task::JoinSet;
use tokio_postgres::Client;
use tracing::{info, warn};

use crate::{
    error::{pg_message, Error, Result},
    pg::{catalog::DeferredObject, ident},
    plan::{Plan, ResolvedPlan, ResolvedTable},
    state::{Phase, State, TableState},
};
use progress::Progress;
use throttle::Throttle;

/// Advisory lock key namespace for "a copy of this plan is running".
const LOCK_NAMESPACE: &str = "bluegreen.copy:";

/// What remains to do for one table.
enum Job {
    /// Copy one chunk.
    Chunk { table: usize, chunk: Chunk },
    /// All chunks are done but indexes are not rebuilt yet (a run died in between).
    Rebuild { table: usize },
}

/// Shared between the workers.
struct Shared {
    plan: Plan,
    tables: Vec<ResolvedTable>,
    state: State,
    jobs: Mutex<VecDeque<Job>>,
    /// Unfinished chunks per table; the worker that finishes the last one rebuilds indexes.
    remaining: Mutex<Vec<usize>>,
    deferred: Vec<Vec<DeferredObject>>,
    progress: Arc<Progress>,
    throttle: Throttle,
    shutdown: Shutdown,
}

/// Takes the plan's advisory lock on `green` for the life of that session; fails with
/// [`Error::Busy`] when another process holds it.
pub async fn lock_plan(green: &Client, plan: &str, command: &str) -> Result<()> {
    let key = format!("{LOCK_NAMESPACE}{plan}");
    let got: bool = green
        .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
        .await
        .map_err(Error::db("green: taking the plan lock"))?
        .get(0);
    if got {
        Ok(())
    } else {
        Err(Error::Busy {
            plan: plan.to_string(),
            command: command.to_string(),
        })
    }
}

/// Copies every table (resuming from state) and rebuilds deferred objects. Returns when all
/// tables are done, or early (state saved) when `shutdown` fires.
pub async fn copy_tables(
    plan: &Plan,
    resolved: &ResolvedPlan,
    green: &mut Client,
    shutdown: &Shutdown,
) -> Result<bool> {
    let state = State::new(&plan.name);
    state.ensure(green, &plan.name).await?;
    match state.phase(green).await? {
        Some(Phase::Planned) | Some(Phase::Copying) | None => {
            state.set_phase(green, &Phase::Copying).await?
        }
        Some(p) => {
            info!(phase = p.name(), "copy already finished");
            return Ok(true);
        }
    }
    let blue = plan.blue.connect().await?;
    let mut per_table: Vec<Vec<Chunk>> = Vec::new();
    let mut deferred = Vec::new();
    let mut states = Vec::new();
    let mut copied = Vec::new();
    for t in &resolved.tables {
        let (st, chunks, defs, rows) = prepare_table(plan, &state, &blue, green, t).await?;
        states.push(st);
        per_table.push(chunks);
        deferred.push(defs);
        copied.push(rows);
    }
    let jobs = schedule(resolved, &states, &per_table);
    let remaining: Vec<usize> = per_table.iter().map(Vec::len).collect();
    let progress = Progress::new(
        resolved
            .tables
            .iter()
            .zip(&copied)
            .map(|(t, c)| (t.target.to_string(), t.estimate.rows, *c))
            .collect(),
    );
    let logger = progress.spawn_logger();
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        tables: resolved.tables.clone(),
        state: state.clone(),
        jobs: Mutex::new(jobs),
        remaining: Mutex::new(remaining),
        deferred,
        progress: Arc::clone(&progress),
        throttle: Throttle::new(plan.copy.max_rows_per_second),
        shutdown: shutdown.clone(),
    });
    let started = Instant::now();
    let workers = plan.copy.workers.max(1);
    let mut set = JoinSet::new();
    for w in 0..workers {
        let shared = Arc::clone(&shared);
        set.spawn(async move { worker(w, shared).await });
    }
    let mut first_error = None;
    while let Some(res) = set.join_next().await {
        let res = res.unwrap_or_else(|e| Err(Error::Runtime(format!("copy worker panicked: {e}"))));
        if let Err(e) = res {
            if first_error.is_none() {
                // Stop the other workers at their next chunk; their committed chunks stay.
                shutdown.trigger();
                first_error = Some(e);
            }
        }
    }
    if let Some(l) = logger {
        l.abort();
    }
    progress.finish();
    if let Some(e) = first_error {
        return Err(e);
    }
    if shutdown.is_triggered() {
        info!("copy stopped; rerun `migrate copy` to resume");
        return Ok(false);
    }
    let all: Vec<DeferredObject> = shared.deferred.iter().flatten().cloned().collect();
    indexes::rebuild_foreign_keys(green, &all).await?;
    info!(
        seconds = started.elapsed().as_secs_f64(),
        tables = resolved.tables.len(),
        "copy finished"
    );
    Ok(true)
}

/// Loads or creates the chunks of one table. On first sight, records the chunks and the deferred
/// objects and drops those objects, all in one green transaction.
async fn prepare_table(
    plan: &Plan,
    state: &State,
    blue: &Client,
    green: &mut Client,
    t: &ResolvedTable,
) -> Result<(TableState, Vec<Chunk>, Vec<DeferredObject>, u64)> {
    let target = t.target.to_string();
    let chunks_table = state.table("chunks");
    if let Some((st, defs)) = state.table_state(green, &target).await? {
        if st != TableState::Pending {
            let rows = green
                .query(&format!("SELECT chunk, lower, upper, done, COALESCE(rows, 0) FROM {chunks_table} WHERE target = $1 ORDER BY chunk"), &[&target])
                .await
                .map_err(Error::db(format!("green: reading chunks of {target}")))?;
            let copied: i64 = rows
                .iter()
                .filter(|r| r.get::<_, bool>(3))
                .map(|r| r.get::<_, i64>(4))
                .sum();
            let pending = rows
                .iter()
                .filter(|r| !r.get::<_, bool>(3))
                .map(|r| Chunk {
                    number: r.get(0),
                    lower: r.get(1),
                    upper: r.get(2),
                })
                .collect();
            return Ok((st, pending, defs, copied as u64));
        }
    }
    let chunks = chunk::plan_chunks(blue, t, plan.copy.chunk_rows).await?;
    let defs = if plan.copy.defer_indexes {
        t.deferred.clone()
    } else {
        Vec::new()
    };
    let tx = green
        .transaction()
        .await
        .map_err(Error::db("green: begin"))?;
    for c in &chunks {
        tx.execute(
            &format!("INSERT INTO {chunks_table} (target, chunk, lower, upper) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"),
            &[&target, &c.number, &c.lower, &c.upper],
        )
        .await
        .map_err(Error::db(format!("green: recording chunks of {target}")))?;
    }
    indexes::drop_all(&tx, &defs).await?;
    state
        .set_table_state(
            &tx,
            &target,
            TableState::Loading,
            t.estimate.rows,
            Some(&defs),
        )
        .await?;
    tx.commit()
        .await
        .map_err(Error::db(format!("green: recording chunks of {target}")))?;
    info!(table = %target, chunks = chunks.len(), deferred = defs.len(), "table planned");
    Ok((TableState::Loading, chunks, defs, 0))
}

/// Orders the work: tables whose rebuild was interrupted first; then chunks round-robin across
/// tables, largest table first in each round, so small tables finish early and big ones keep every
/// worker busy to the end.
fn schedule(
    resolved: &ResolvedPlan,
    states: &[TableState],
    per_table: &[Vec<Chunk>],
) -> VecDeque<Job> {
    let mut jobs = VecDeque::new();
    for (i, chunks) in per_table.iter().enumerate() {
        if chunks.is_empty() && states[i] != TableState::Done {
            jobs.push_back(Job::Rebuild { table: i });
        }
    }
    let mut order: Vec<usize> = (0..per_table.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(resolved.tables[i].estimate.bytes));
    let rounds = per_table.iter().map(Vec::len).max().unwrap_or(0);
    for r in 0..rounds {
        for &i in &order {
            if let Some(c) = per_table[i].get(r) {
                jobs.push_back(Job::Chunk {
                    table: i,
                    chunk: c.clone(),
                });
            }
        }
    }
    jobs
}

async fn worker(id: usize, shared: Arc<Shared>) -> Result<()> {
    if shared.jobs.lock().map(|j| j.is_empty()).unwrap_or(true) {
        return Ok(());
    }
    let blue = shared.plan.blue.connect().await?;
    let green = shared.plan.green.connect().await?;
    // Chunk state commits with the chunk's rows; losing the last commits in a crash only means
    // redoing those chunks, so waiting for the WAL flush buys nothing.
    green
        .batch_execute("SET synchronous_commit = off")
        .await
        .map_err(Error::db("green: session setup"))?;
    // Foreign keys on green are enforced by triggers; with indexes kept (defer_indexes = false)
    // chunks of a referencing table may land before the rows they reference. `replica` skips
    // those triggers, as logical replication's apply does. It needs superuser; without it the
    // plan must order tables parent-first or defer indexes.
    if let Err(e) = green
        .batch_execute("SET session_replication_role = replica")
        .await
    {
        tracing::debug!(error = %pg_message(&e), "green: session_replication_role not settable");
    }
    let mut green = green;
    let blue = blue;
    loop {
        if shared.shutdown.is_triggered() {
            return Ok(());
        }
        let job = shared.jobs.lock().ok().and_then(|mut j| j.pop_front());
        let Some(job) = job else { return Ok(()) };
        match job {
            Job::Rebuild { table } => rebuild(&shared, &green, table).await?,
            Job::Chunk { table, chunk } => {
                let t = &shared.tables[table];
                shared.throttle.admit(shared.plan.copy.chunk_rows).await;
                let started = Instant::now();
                let (rows, bytes) = copy_chunk(&shared, &blue, &mut green, t, &chunk).await?;
                tracing::debug!(worker = id, table = %t.target, chunk = chunk.number, rows, bytes, seconds = started.elapsed().as_secs_f64(), "chunk copied");
                shared.progress.chunk_done(table, rows, bytes);
                let last = shared.remaining.lock().map(|mut r| {
                    r[table] -= 1;
                    r[table] == 0
                });
                if last.unwrap_or(false) {
                    rebuild(&shared, &green, table).await?;
                }
            }
        }
    }
}

/// Streams one chunk blue → green and marks it done in the same green transaction.
async fn copy_chunk(
    shared: &Shared,
    blue: &Client,
    green: &mut Client,
    t: &ResolvedTable,
    chunk: &Chunk,
) -> Result<(u64, u64)> {
    let cols: Vec<String> = t.key.iter().map(|k| ident(&k.source)).collect();
    let types: Vec<String> = t.key.iter().map(|k| k.source_type.clone()).collect();
    let cond = condition(chunk, &cols, &types);
    let format = if t.binary_copy {
        " (FORMAT binary)"
    } else {
        ""
    };
    let out_sql = format!(
        "COPY ({}) TO STDOUT{format}",
        t.source_select(cond.as_deref())
    );
    let in_sql = format!(
        "COPY {} ({}) FROM STDIN{format}",
        t.target.quoted(),
        t.target_column_list()
    );
    let fail = |stage: &str, e: tokio_postgres::Error| Error::ChunkFailed {
        table: t.target.to_string(),
        chunk: chunk.number as i64,
        message: format!("{stage}: {}", pg_message(&e)),
    };
    let started = Instant::now();
    let tx = green
        .transaction()
        .await
        .map_err(|e| fail("green begin", e))?;
    let sink = tx
        .copy_in(&in_sql)
        .await
        .map_err(|e| fail("green COPY FROM", e))?;
    let stream = blue
        .copy_out(&out_sql)
        .await
        .map_err(|e| fail("blue COPY TO", e))?;
    let mut bytes = 0u64;
    let mut stream = Box::pin(stream.inspect_ok(|b| bytes += b.len() as u64));
    let mut sink = Box::pin(sink);
    sink.send_all(&mut stream)
        .await
        .map_err(|e| fail("streaming", e))?;
    drop(stream);
    let rows = sink
        .as_mut()
        .finish()
        .await
        .map_err(|e| fail("green COPY FROM", e))?;
    tx.execute(
        &format!("UPDATE {} SET done = true, rows = $3, bytes = $4, seconds = $5, finished_at = now() WHERE target = $1 AND chunk = $2", shared.state.table("chunks")),
        &[&t.target.to_string(), &chunk.number, &(rows as i64), &(bytes as i64), &started.elapsed().as_secs_f64()],
    )
    .await
    .map_err(|e| fail("green state", e))?;
    tx.commit().await.map_err(|e| fail("green commit", e))?;
    Ok((rows, bytes))
}

async fn rebuild(shared: &Shared, green: &Client, table: usize) -> Result<()> {
    let t = &shared.tables[table];
    let target = t.target.to_string();
    shared
        .state
        .set_table_state(green, &target, TableState::Indexing, t.estimate.rows, None)
        .await?;
    let started = Instant::now();
    indexes::rebuild_keys_and_indexes(green, &target, &shared.deferred[table]).await?;
    // ANALYZE so the planner knows the freshly loaded table before apply and verify query it.
    if let Err(e) = green
        .batch_execute(&format!("ANALYZE {}", t.target.quoted()))
        .await
    {
        warn!(table = %target, error = %pg_message(&e), "ANALYZE failed");
    }
    shared
        .state
        .set_table_state(green, &target, TableState::Done, t.estimate.rows, None)
        .await?;
    shared.progress.table_done(
        table,
        &format!(
            "copied; indexes rebuilt in {:.1}s",
            started.elapsed().as_secs_f64()
        ),
    );
    Ok(())
}

/// `migrate copy`: takes the plan lock, copies every table, then (unless `no_follow`) follows.
pub async fn run(
    plan: &Plan,
    resolved: &ResolvedPlan,
    mut green: Client,
    shutdown: Shutdown,
    no_follow: bool,
) -> Result<()> {
    lock_plan(&green, &plan.name, "copy").await?;
    let finished = copy_tables(plan, resolved, &mut green, &shutdown).await?;
    if !finished || no_follow {
        return Ok(());
    }
    Err(Error::Runtime("following blue after the copy needs change capture, which this build does not have yet; use --no-follow".into()))
}
