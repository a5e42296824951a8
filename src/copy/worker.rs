//! One copy worker: it claims chunks from green's `chunks` table (a row lock in the transaction
//! that writes the chunk, so several processes on several machines share the work and a dead
//! one's chunk comes free), streams each blue → green under the newest snapshot and marks it
//! done in the same green transaction. In the leader, the worker that sees a table's last chunk
//! done rebuilds its indexes.

use std::{sync::Arc, time::Instant};

use futures_util::{SinkExt, TryStreamExt};
use tokio_postgres::{Client, GenericClient};
use tracing::{info, warn, Instrument};

use super::{condition, indexes, Chunk, Shared};
use crate::{
    error::{pg_message, Error, Result},
    pg::ident,
    plan::ResolvedTable,
    state::TableState,
};

pub(super) async fn worker(id: usize, shared: Arc<Shared>) -> Result<()> {
    if !shared.joined && shared.finished.lock().map(|f| f.iter().all(|d| *d)).unwrap_or(true) {
        return Ok(());
    }
    let blue = shared.plan.blue.connect().await?;
    let mut green = shared.plan.green.connect().await?;
    let mut entries = Vec::new();
    if let Some(s) = &shared.sessions {
        entries.push(s.add("blue", &blue).await?);
        entries.push(s.add("green", &green).await?);
    }
    let done = copy_chunks(id, &shared, &blue, &mut green).await;
    drop((blue, green));
    // Closed cleanly, they come off its record: behind a session pooler their server processes
    // may serve someone else next, and the leader would end them with a lease that expires
    // later.
    if let (Ok(()), Some(s)) = (&done, &shared.sessions) {
        for entry in &entries {
            s.remove(entry).await;
        }
    }
    done
}

/// A worker's chunks, on its sessions: claimed and copied until none is left (or the run
/// stops).
async fn copy_chunks(id: usize, shared: &Arc<Shared>, blue: &Client, green: &mut Client) -> Result<()> {
    // JIT would compile every chunk's query anew (tens of ms each) for expressions that run a few
    // thousand times; parallel query workers would compete with our own workers.
    blue.batch_execute(
        "SET jit = off; SET max_parallel_workers_per_gather = 0; SET idle_in_transaction_session_timeout = 0",
    )
    .await
    .map_err(Error::db("blue: copy session"))?;
    // Chunk state commits with the chunk's rows; losing the last commits in a crash only means
    // redoing those chunks, so waiting for the WAL flush buys nothing.
    green.batch_execute("SET synchronous_commit = off").await.map_err(Error::db("green: session setup"))?;
    // Foreign keys on green are enforced by triggers; with indexes kept (defer_indexes = false)
    // chunks of a referencing table may land before the rows they reference. `replica` skips
    // those triggers, as logical replication's apply does. It needs superuser; without it the
    // plan must defer indexes or the tables must have no foreign keys between them.
    if let Err(e) = green.batch_execute("SET session_replication_role = replica").await {
        tracing::debug!(error = %pg_message(&e), "green: session_replication_role not settable");
    }
    let mut said = Instant::now();
    // Chunks per claim, per table: each table's rows have a pace of their own.
    let mut sizes = vec![1i32; shared.tables.len()];
    loop {
        if shared.shutdown.is_triggered() {
            return Ok(());
        }
        // Under a row rate a claim is one chunk (see `next_chunk`); without one nothing waits.
        let expected = shared.plan.copy.chunk_rows;
        shared.live.wait_copy(&shared.shutdown).await;
        shared.throttle.admit(expected, &shared.shutdown).await;
        // Paused while waiting for the rate: not this chunk either.
        shared.live.wait_copy(&shared.shutdown).await;
        if shared.shutdown.is_triggered() {
            return Ok(());
        }
        match next_chunk(shared, blue, green, &sizes).await {
            Ok(Some(Copied { table, rows, asked, chunks, seconds })) => {
                shared.throttle.settle(expected, rows);
                // A claim cut short (another worker holds the next chunk, the table ends) still
                // measured the pace.
                sizes[table] = claim_size(shared.plan.copy.target_chunk_time, (asked, chunks), seconds);
                if !shared.joined && shared.state.loaded(green, &[shared.tables[table].id.as_str()]).await?.len() == 1 {
                    take_rebuild(shared, blue, green, table).await?;
                }
                continue;
            }
            Ok(None) => shared.throttle.settle(expected, 0),
            // The leader plans the table again; this worker waits for its new chunks.
            Err(Error::TableRewritten { table }) if shared.joined => {
                shared.throttle.settle(expected, 0);
                tracing::warn!(table = %table, "rewritten on blue; waiting for the leader to plan it again");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        }
        // Nothing to claim now: every chunk left is in another worker's hands (here or on
        // another machine), and comes free if that worker dies.
        if shared.joined {
            // Done once the leader's copy is over: before that, it may still be planning tables
            // (or be restarting after a rewrite).
            if shared.state.chunks_left(green).await? == 0
                && !matches!(shared.state.phase(green).await?, Some(crate::state::Phase::Copying))
            {
                crate::fault::point("copy.joined-done").await;
                return Ok(());
            }
        } else {
            let ids: Vec<&str> = shared.claimable.iter().map(String::as_str).collect();
            let mut rebuilt = false;
            for id in shared.state.loaded(green, &ids).await? {
                if let Some(table) = shared.tables.iter().position(|t| t.id.as_str() == id) {
                    rebuilt |= take_rebuild(shared, blue, green, table).await?;
                }
            }
            if rebuilt {
                continue;
            }
            if shared.finished.lock().map(|f| f.iter().all(|d| *d)).unwrap_or(false) {
                return Ok(());
            }
        }
        if said.elapsed() >= std::time::Duration::from_secs(30) {
            info!(worker = id, "every chunk left is held by another worker; waiting for them");
            said = Instant::now();
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Rebuilds `table`'s indexes unless another worker of this process does or did. `true` when
/// this worker did.
async fn take_rebuild(shared: &Shared, blue: &Client, green: &Client, table: usize) -> Result<bool> {
    let mine = shared.rebuilding.lock().map(|mut r| !std::mem::replace(&mut r[table], true)).unwrap_or(false);
    if !mine {
        return Ok(false);
    }
    rebuild(shared, blue, green, table).await?;
    if let Ok(mut f) = shared.finished.lock() {
        f[table] = true;
    }
    Ok(true)
}

/// Chunks one claim takes at most: rows further on can be much slower to read than those that
/// set the pace (wide, TOASTed, dense after a bloated stretch), and a claim holds its snapshot,
/// its table lock and the worker's attention to pause and throttle until it ends. This bounds
/// that to 16 chunks' time.
const MAX_CLAIM: i32 = 16;

/// How many consecutive chunks a worker's next claim of a table takes: as many as it copies in
/// `target` at the pace of its last claim (`chunks` in `seconds`, of `asked`), at most twice as
/// many as that one asked for or took, and at most [`MAX_CLAIM`]. One with `target` zero.
fn claim_size(target: std::time::Duration, (asked, chunks): (i32, i32), seconds: f64) -> i32 {
    if target.is_zero() || chunks <= 0 {
        return 1;
    }
    let per_chunk = seconds / chunks as f64;
    let fit = if per_chunk > 0.0 { target.as_secs_f64() / per_chunk } else { f64::MAX };
    (fit.floor().min(i32::MAX as f64) as i32).clamp(1, asked.max(chunks).saturating_mul(2).min(MAX_CLAIM))
}

/// What one claim copied.
struct Copied {
    table: usize,
    rows: u64,
    /// Chunks the claim asked for (one under a row rate) and took.
    asked: i32,
    chunks: i32,
    seconds: f64,
}

/// Claims the next chunk (see [`crate::state::State::claim_chunk`]) and, up to its table's
/// claim size in `sizes`, chunks that follow it in the same heap, and copies them as one block
/// range in one transaction; `None` when no chunk can be claimed now. Under a row rate a claim
/// is one chunk: the rate spaces chunks, and claims of several would turn its pace into bursts.
async fn next_chunk(shared: &Shared, blue: &Client, green: &mut Client, sizes: &[i32]) -> Result<Option<Copied>> {
    let started = Instant::now();
    let claimable: Vec<&str> = shared.claimable.iter().map(String::as_str).collect();
    let tx = green.transaction().await.map_err(Error::db("green: begin"))?;
    let Some(claim) = shared.state.claim_chunk(&tx, &claimable).await? else {
        return Ok(None);
    };
    let Some(table) = shared.tables.iter().position(|t| t.id == claim.table) else {
        return Ok(None);
    };
    let size = if shared.throttle.limited() { 1 } else { sizes[table] };
    let following = shared.state.claim_following(&tx, &claim, size - 1).await?;
    let chunk = Chunk {
        number: claim.number,
        first_block: claim.first_block,
        end_block: following.last().map_or(claim.end_block, |c| c.end_block),
        part: claim.part,
        following: following.len() as i32,
    };
    // `status` shows a claim of several as `entry:first-last`.
    let name = match chunk.following {
        0 => format!("{}:{}", claim.table, chunk.number),
        n => format!("{}:{}-{}", claim.table, chunk.number, chunk.number + n),
    };
    if let Ok(mut b) = shared.busy.lock() {
        b.insert(name.clone());
    }
    let result = copy_claimed(shared, blue, tx, table, &chunk).await;
    if let Ok(mut b) = shared.busy.lock() {
        b.remove(&name);
    }
    if result.is_err() {
        // Whatever failed, the chunk's snapshot ends (its claim ended with the green transaction).
        let _ = blue.batch_execute("ROLLBACK").await;
    }
    Ok(Some(Copied {
        table,
        rows: result?,
        asked: size,
        chunks: chunk.following + 1,
        seconds: started.elapsed().as_secs_f64(),
    }))
}

/// Copies a claimed chunk in `tx` under the newest snapshot, in a blue transaction of its own.
async fn copy_claimed(
    shared: &Shared,
    blue: &Client,
    tx: tokio_postgres::Transaction<'_>,
    table: usize,
    chunk: &Chunk,
) -> Result<u64> {
    let started = Instant::now();
    // Each chunk in a transaction of its own, with the newest snapshot: no snapshot of ours
    // outlives `[copy] snapshot_max_age` plus one claim, and none is held while this worker
    // waits (paused, throttled).
    let generation = super::snapshots::begin(&shared.snapshots, blue).await?;
    let mixed = shared.generations.lock().map(|mut g| {
        let (first, mixed) = &mut g[table];
        let first = *first.get_or_insert(generation);
        *mixed |= first != generation;
        *mixed
    });
    let mixed = mixed.unwrap_or(true);
    check_heap(shared, blue, &tx, table).await?;
    let window = window(shared, blue, &shared.tables[table]).await?;
    let span = tracing::info_span!("chunk", table = %shared.tables[table].target, chunk = chunk.number,
        following = chunk.following, first_block = chunk.first_block, end_block = chunk.end_block);
    let (rows, bytes) = copy_chunk(shared, blue, tx, table, chunk, mixed, window).instrument(span).await?;
    blue.batch_execute("COMMIT").await.map_err(Error::db("blue: ending a chunk's snapshot"))?;
    crate::fault::point("copy.chunk-done").await;
    shared.copied.fetch_add(1 + chunk.following, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(worker = %shared.worker_id, table = %shared.tables[table].target, chunk = chunk.number,
        following = chunk.following, rows, bytes,
        seconds = started.elapsed().as_secs_f64(), "chunk copied");
    shared.progress.chunk_done(table, rows, bytes);
    Ok(rows)
}

/// The rows a chunk leaves out (see `snapshots`): the run's floor, the `age(xmin)` up to which
/// a row version is the floor's or newer, and blue's position when the chunk began (its
/// left-out keys' position). `None`: the chunk reads every row.
#[derive(Debug, Clone, Copy)]
struct Window {
    floor: i64,
    span: i32,
    lsn: crate::pg::Lsn,
}

/// The window of the chunk whose blue transaction just began. An entry with joins has none:
/// the floor holds only its driving rows, and a joined column read under two snapshots can
/// put one value on two rows (its table's rows changed during the copy are removed instead).
async fn window(shared: &Shared, blue: &Client, t: &ResolvedTable) -> Result<Option<Window>> {
    let Some(floor) = shared.floor.filter(|_| t.joins.is_empty()) else { return Ok(None) };
    Ok(super::snapshots::window(blue, floor).await?.map(|(span, lsn)| Window { floor, span, lsn }))
}

/// How long a worker waits for its lock on a table it is about to read. A wait means an ACCESS
/// EXCLUSIVE request (VACUUM FULL, CLUSTER, ALTER TABLE) is queued on it behind the locks other
/// workers of this run hold: waiting longer would wait for this run to end, which waits for this
/// worker.
const TABLE_LOCK_WAIT: &str = "10s";

/// Before each chunk, in its transaction: takes the table's lock (held until the chunk ends, so
/// no rewrite can move rows across block ranges while it reads) and checks that the heap is
/// still the one the chunks were planned on. A rewrite in between would make the remaining
/// chunks read some rows twice and others never, unseen by capture.
async fn check_heap(shared: &Shared, blue: &Client, green: &impl GenericClient, table: usize) -> Result<()> {
    let t = &shared.tables[table];
    let rewritten = || Error::TableRewritten { table: t.source.to_string() };
    // Joined tables too: a rewriting ALTER is not MVCC-safe, the run's snapshot would see them
    // empty.
    let tables: Vec<String> =
        std::iter::once(t.source.quoted()).chain(t.joins.iter().map(|j| j.table.quoted())).collect();
    let locked = blue
        .batch_execute(&format!(
            "SET LOCAL lock_timeout = '{TABLE_LOCK_WAIT}'; LOCK TABLE {} IN ACCESS SHARE MODE; SET LOCAL lock_timeout = 0",
            tables.join(", ")
        ))
        .await;
    match locked {
        Ok(()) => {}
        // Queued behind a rewrite: let this run end so the rewrite can happen, then copy again.
        Err(e) if e.code().is_some_and(|c| c.code() == "55P03") => return Err(rewritten()),
        Err(e) => return Err(Error::db(format!("blue: locking {}", t.source))(e)),
    }
    let now = super::chunk::heap_signature(blue, t).await?;
    // A joined worker compares with what the leader recorded when it planned the chunks.
    let planned = match shared.filenodes.get(table) {
        Some(f) => Some(*f),
        None => shared.state.source_filenode(green, &t.id).await?,
    };
    if planned != Some(now) {
        return Err(rewritten());
    }
    Ok(())
}

/// Streams one chunk blue → green and marks it done in the same green transaction.
async fn copy_chunk(
    shared: &Shared,
    blue: &Client,
    tx: tokio_postgres::Transaction<'_>,
    table: usize,
    chunk: &Chunk,
    mixed: bool,
    window: Option<Window>,
) -> Result<(u64, u64)> {
    let t = &shared.tables[table];
    let format = if t.binary_copy { " (FORMAT binary)" } else { "" };
    let q = t.qualifier();
    let newer = window.map(|w| format!("age({q}.xmin) BETWEEN 0 AND {}", w.span));
    let range = condition(chunk, &q);
    let read = [range.clone(), newer.as_ref().map(|n| format!("NOT ({n})"))].into_iter().flatten().collect::<Vec<_>>();
    let out_sql = format!(
        "COPY ({}) TO STDOUT{format}",
        t.source_select_from(chunk.part.as_deref(), (!read.is_empty()).then(|| read.join(" AND ")).as_deref())
    );
    // A chunk of a table read under several snapshots (a resumed run, or snapshots replaced
    // during this one) may hold rows another snapshot already copied; with the keys in place
    // (indexes not deferred) they go through a staging table and ON CONFLICT DO NOTHING.
    // With snapshots replaced during the run, every chunk: one of the first snapshot may still
    // be loading when a later one commits a row it also holds.
    let rotating = !shared.plan.copy.snapshot_max_age.is_zero();
    let staging = (shared.resumed[table] || mixed || rotating) && !shared.plan.copy.defer_indexes;
    let stage = ident(&format!("bluegreen_stage_{}", t.id.short()));
    let into = if staging { stage.clone() } else { t.target.quoted() };
    let in_sql = format!("COPY {into} ({}) FROM STDIN{format}", t.target_column_list());
    let fail = |stage: &str, e: tokio_postgres::Error| Error::ChunkFailed {
        table: t.target.to_string(),
        chunk: chunk.number as i64,
        message: format!("{stage}: {}", pg_message(&e)),
    };
    let started = Instant::now();
    if staging {
        tx.batch_execute(&format!(
            "CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {}) ON COMMIT DELETE ROWS",
            t.target.quoted()
        ))
        .await
        .map_err(|e| fail("green staging", e))?;
    }
    let (mut rows, bytes) = pipe(blue, &tx, &out_sql, &in_sql).await.map_err(|(stage, e)| fail(stage, e))?;
    if staging {
        let cols = t.target_column_list();
        rows = tx
            .execute(
                &format!(
                    "INSERT INTO {} ({cols}) SELECT {cols} FROM {stage} ON CONFLICT DO NOTHING",
                    t.target.quoted()
                ),
                &[],
            )
            .await
            .map_err(|e| fail("green staging", e))?;
    }
    if let (Some(newer), Some(w)) = (&newer, window) {
        let keys = left_out(shared, blue, &tx, t, chunk, range.as_deref(), (newer, w.lsn)).await?;
        tracing::debug!(keys, "rows written above the copy's floor left to apply");
    }
    shared
        .state
        .chunk_done(
            &tx,
            &t.id,
            chunk.number,
            rows,
            bytes,
            started.elapsed().as_secs_f64(),
            (shared.epoch, &shared.worker_id, window.map(|w| w.floor)),
            chunk.following,
        )
        .await?;
    crate::fault::point("copy.chunk-streamed").await;
    tx.commit().await.map_err(|e| fail("green commit", e))?;
    Ok((rows, bytes))
}

/// Streams `out_sql` (a `COPY … TO STDOUT` on blue) into `in_sql` (a `COPY … FROM STDIN` in
/// `tx`), the bytes passed through undecoded. Returns rows and bytes, or the failing stage.
async fn pipe(
    blue: &Client,
    tx: &tokio_postgres::Transaction<'_>,
    out_sql: &str,
    in_sql: &str,
) -> std::result::Result<(u64, u64), (&'static str, tokio_postgres::Error)> {
    let sink = tx.copy_in(in_sql).await.map_err(|e| ("green COPY FROM", e))?;
    let stream = blue.copy_out(out_sql).await.map_err(|e| ("blue COPY TO", e))?;
    let mut bytes = 0u64;
    let mut stream = Box::pin(stream.inspect_ok(|b| bytes += b.len() as u64));
    let mut sink = Box::pin(sink);
    sink.send_all(&mut stream).await.map_err(|e| ("streaming", e))?;
    drop(stream);
    let rows = sink.as_mut().finish().await.map_err(|e| ("green COPY FROM", e))?;
    Ok((rows, bytes))
}

/// Stores in pending, in the chunk's green transaction `tx`, the keys of the rows `newer` left
/// out of its copy (those the plan's filter keeps), read in the chunk's snapshot as capture
/// writes keys, at blue position `lsn`. They stream blue → green through a temporary
/// table: a chunk open at the heap's end may leave out every row appended since the copy began.
/// Returns how many were stored.
async fn left_out(
    shared: &Shared,
    blue: &Client,
    tx: &tokio_postgres::Transaction<'_>,
    t: &ResolvedTable,
    chunk: &Chunk,
    range: Option<&str>,
    (newer, lsn): (&str, crate::pg::Lsn),
) -> Result<u64> {
    let q = t.qualifier();
    let keys: Vec<String> = t.key.iter().map(|k| shared.key_text.sql(&format!("{q}.{}", ident(&k.source)))).collect();
    let mut conds: Vec<String> = range.into_iter().chain([newer]).map(|c| format!("({c})")).collect();
    conds.extend(t.filter.iter().map(|f| format!("({f})")));
    let out_sql = format!(
        "COPY (SELECT ARRAY[{}] FROM {} WHERE {}) TO STDOUT",
        keys.join(", "),
        t.from_clause(chunk.part.as_deref()),
        conds.join(" AND ")
    );
    let failed = |(stage, e): (&str, tokio_postgres::Error)| Error::ChunkFailed {
        table: t.target.to_string(),
        chunk: chunk.number as i64,
        message: format!("keys left out, {stage}: {}", pg_message(&e)),
    };
    tx.batch_execute(&format!("CREATE TEMP TABLE IF NOT EXISTS {LEFT_OUT} (key text[]) ON COMMIT DELETE ROWS"))
        .await
        .map_err(|e| failed(("green", e)))?;
    pipe(blue, tx, &out_sql, &format!("COPY {LEFT_OUT} (key) FROM STDIN")).await.map_err(failed)?;
    shared.state.store_keys_from(tx, &t.id, LEFT_OUT, lsn).await
}

/// The temporary table on green that a chunk's left-out keys pass through.
const LEFT_OUT: &str = "bluegreen_left_out";

async fn rebuild(shared: &Shared, blue: &Client, green: &Client, table: usize) -> Result<()> {
    let t = &shared.tables[table];
    let target = t.target.to_string();
    shared.state.set_table_state(green, &t.id, TableState::Indexing).await?;
    crate::fault::point("copy.rebuild").await;
    let started = Instant::now();
    // Chunks copied by another process (a joined worker, an earlier run) read its snapshots.
    let mixed = shared.generations.lock().map(|g| g[table].1).unwrap_or(true)
        || shared.state.copied_by_others(green, &t.id, &shared.worker_id).await?;
    // Every chunk under this run's floor: no row is there twice, nothing to remove.
    let below = match shared.floor {
        Some(f) => shared.state.chunks_below_floor(green, &t.id, f).await?,
        None => false,
    };
    if (shared.resumed[table] || mixed) && shared.plan.copy.defer_indexes {
        if below {
            info!(table = %t.target, "every chunk left out the rows at or above the copy's floor; nothing to remove");
        } else {
            forget_changed(shared, blue, green, t).await?;
        }
    }
    // A unique key that fails to build now names rows nobody changed during the copy: green's
    // constraint that blue's rows break, reported as it is (no copy is silently dropped).
    indexes::rebuild_keys_and_indexes(green, &target, &shared.deferred[table], &shared.plan.copy).await?;
    let rebuilt = started.elapsed().as_secs_f64();
    // Before `done`: a copy killed in between analyzes on the next run. A failed ANALYZE does
    // not fail hours of copying: it is said, and the cutover's preflight names the target.
    let analyzed = match shared.plan.copy.analyze {
        false => String::new(),
        true => match crate::pg::analyze(green, &t.target, None).await {
            Ok(()) => format!(", analyzed in {:.1}s", started.elapsed().as_secs_f64() - rebuilt),
            Err(e) => {
                warn!(table = %t.target, error = %e, "not analyzed: run ANALYZE on it before the cutover");
                ", not analyzed (see the warning)".to_string()
            }
        },
    };
    shared.state.set_table_state(green, &t.id, TableState::Done).await?;
    shared.progress.table_done(table, &format!("copied; indexes rebuilt in {rebuilt:.1}s{analyzed}"));
    Ok(())
}

/// Removes from green every row of `t` whose key is pending: a table read under several
/// snapshots may hold such a row twice (an update moved it into a block range read later), or
/// an old version whose unique values another row took since; only rows written after capture
/// began can, and those keys are pending (apply waits for the table to be done). First waits
/// until capture has stored every change blue committed so far (every change any chunk's
/// snapshot saw). Apply then writes those keys from blue as they are.
async fn forget_changed(shared: &Shared, blue: &Client, green: &Client, t: &ResolvedTable) -> Result<()> {
    let reach = crate::pg::insert_lsn(blue).await?;
    let started = Instant::now();
    let mut said = Instant::now();
    loop {
        if shared.state.capture_position(green).await?.is_some_and(|c| c >= reach) {
            break;
        }
        if shared.shutdown.is_triggered() {
            return Err(Error::Interrupted { during: format!("while {} waited for capture", t.target) });
        }
        if said.elapsed() >= std::time::Duration::from_secs(10) {
            info!(table = %t.target, waited = started.elapsed().as_secs(), "waiting for capture to pass the copy's last snapshot before rebuilding");
            said = Instant::now();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let keys: Vec<String> = t
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let through = if k.via_source_type { &k.source_type } else { &k.target_type };
            format!("(p.key[{}])::{through}::{}", i + 1, k.target_type)
        })
        .collect();
    // Only this entry's rows where green's key holds a constant another entry shares.
    let constants: Vec<String> = t
        .constant_key
        .iter()
        .filter_map(|c| {
            let col = t.columns.iter().find(|r| &r.name == c)?;
            Some(format!(" AND {} = ({})::{}", ident(c), col.expr.as_deref()?, col.target_type))
        })
        .collect();
    let waited = started.elapsed();
    let pending = shared.state.table("pending");
    let id = crate::pg::literal(t.id.as_str());
    let any: bool = green
        .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {pending} WHERE tbl = {id})"), &[])
        .await
        .map_err(Error::db("green: reading pending keys"))?
        .get(0);
    // The rows are found by a full scan of the target, the one cost of reading a table under
    // several snapshots (about a tenth of a 100M-row copy). CREATE TABLE AS may run it in
    // parallel (with `index_build_workers`, the index builds' share of green), which helps
    // while the table is in memory (10M rows), not when the scan waits on the disk (100M); a
    // DELETE may not, so it then removes the rows it found by their ctid.
    let sql = format!(
        "SET LOCAL max_parallel_workers_per_gather = {workers};
         CREATE TEMP TABLE bluegreen_forget ON COMMIT DROP AS
           SELECT ctid AS row FROM {tbl} WHERE ({cols}) IN (SELECT {keys} FROM {pending} p WHERE p.tbl = {id}){constants};
         DELETE FROM {tbl} WHERE ctid = ANY (ARRAY(SELECT row FROM bluegreen_forget))",
        workers = shared.plan.copy.index_build_workers,
        tbl = t.target.quoted(),
        cols = t.target_key_list(),
        keys = keys.join(", "),
        constants = constants.join(""),
    );
    let removed = if !any {
        0
    } else {
        // One Query message: one implicit transaction (SET LOCAL and ON COMMIT DROP end with it).
        let done = green
            .simple_query(&sql)
            .await
            .map_err(Error::db(format!("green: removing rows changed during the copy from {}", t.target)))?;
        done.iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
                _ => None,
            })
            .last()
            .unwrap_or(0)
    };
    info!(table = %t.target, removed, waited_ms = waited.as_millis() as u64,
        seconds = (started.elapsed() - waited).as_secs_f64(), "rows changed during the copy removed; apply writes them from blue");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{claim_size, MAX_CLAIM};

    #[test]
    fn a_claim_grows_to_the_target_time_at_most_twofold_and_within_the_cap() {
        let second = Duration::from_secs(1);
        // 10 ms a chunk: 100 fit a second, but the last claim took 1, so 2.
        assert_eq!(claim_size(second, (1, 1), 0.010), 2);
        assert_eq!(claim_size(second, (4, 4), 0.040), 8);
        assert_eq!(claim_size(second, (8, 8), 0.080), MAX_CLAIM);
        // Cut short after asking for 8: the pace of the one it took, up to twice 8.
        assert_eq!(claim_size(second, (8, 1), 0.010), MAX_CLAIM);
        assert_eq!(claim_size(second, (4, 1), 0.010), 8);
        // 300 ms a chunk: 3 fit.
        assert_eq!(claim_size(second, (8, 8), 2.4), 3);
        // Slower than the target: one at a time.
        assert_eq!(claim_size(second, (4, 4), 20.0), 1);
        assert_eq!(claim_size(second, (4, 4), 0.0), 8);
        assert_eq!(claim_size(Duration::ZERO, (4, 4), 0.01), 1);
    }
}
