//! Stage 1: copy. Each table is split into heap block ranges; each range streams as raw COPY from
//! blue (through the resolved transforming SELECT) straight into COPY on green, never decoded
//! here. Each chunk reads the newest of the run's exported snapshots (see `snapshots`: its
//! transaction floor keeps every row copied once). A chunk's rows and its `done` mark commit in
//! one green transaction, so a killed run redoes exactly the chunks that did not commit.

mod chunk;
mod indexes;
mod progress;
mod snapshots;
mod throttle;
mod worker;

pub use crate::shutdown::Shutdown;
pub use chunk::{condition, Chunk};

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::task::JoinSet;
use tokio_postgres::Client;
use tracing::{info, warn};

use crate::{
    capture::Capture,
    error::{Error, Result},
    follow::{Follower, Stop},
    pg::catalog::DeferredObject,
    plan::{Plan, ResolvedPlan, ResolvedTable},
    state::{ChunkRecord, Leases, Phase, Sessions, State, TableId, TableState},
};
use progress::Progress;
use throttle::Throttle;
use worker::worker;

/// Advisory lock key namespace for "a copy of this plan is running".
const LOCK_NAMESPACE: &str = "bluegreen.copy:";

/// Shared between the workers of this process.
struct Shared {
    plan: Plan,
    tables: Vec<ResolvedTable>,
    state: State,
    /// This process among the copy workers (`state::worker_id`): recorded on every chunk it
    /// copies.
    worker_id: String,
    /// A joined worker (`copy --join`): it claims and copies chunks only; the leader plans them,
    /// rebuilds indexes and follows.
    joined: bool,
    /// The entries whose chunks this process claims (their ids).
    claimable: Vec<String>,
    /// Per table (leader): copied and indexed, or being indexed by one of this process's workers.
    finished: Mutex<Vec<bool>>,
    rebuilding: Mutex<Vec<bool>>,
    /// Chunks in hand (`entry:chunk`) and chunks copied, for the heartbeat.
    busy: Mutex<std::collections::BTreeSet<String>>,
    copied: std::sync::atomic::AtomicI32,
    /// Fires when the leader ended this joined worker's lease (its heartbeat found the mark).
    expired: Shutdown,
    /// A joined worker's record of its sessions (the leader's are never ended).
    sessions: Option<Arc<Sessions>>,
    deferred: Vec<Vec<DeferredObject>>,
    /// Per table: some chunks were copied under an earlier run's snapshot.
    resumed: Vec<bool>,
    /// Per table: blue's file node when this run planned its chunks.
    filenodes: Vec<i64>,
    /// The newest exported blue snapshot: each chunk reads the one newest when it begins.
    snapshots: Arc<snapshots::Snapshots>,
    /// Per table: the generation of the first snapshot a chunk of it read in this run, and
    /// whether another chunk read another (rows may then be read twice or not at all).
    generations: Mutex<Vec<(Option<u64>, bool)>>,
    /// This run's number, recorded on each chunk.
    epoch: i32,
    /// This run's transaction floor (see `snapshots`), when its snapshots rotate; a joined
    /// worker's is the one the leader recorded on green when it joined.
    floor: Option<i64>,
    /// How capture writes keys: the keys a chunk leaves out go to pending the same way. (A
    /// joined worker resolving `auto` otherwise than the leader writes another text for some
    /// types: the key is then pending twice, and apply reads it twice.)
    key_text: crate::plan::KeyText,
    progress: Arc<Progress>,
    throttle: Throttle,
    /// Live control: pause, throttle, blue's health.
    live: Arc<crate::control::Live>,
    shutdown: Shutdown,
}

/// What `prepare_table` found or made for one table.
struct Prepared {
    state: TableState,
    /// Blue's file node when the chunks were planned: block ranges are positions in it.
    filenode: i64,
    deferred: Vec<DeferredObject>,
    rows_copied: u64,
    resumed: bool,
}

/// Takes the plan's advisory lock on `green` for the life of that session; fails with
/// [`Error::Busy`] when another process holds it.
pub async fn lock_plan(green: &Client, plan: &str, command: &str) -> Result<()> {
    let key = format!("{LOCK_NAMESPACE}{plan}");
    // A `copy` killed a moment ago holds the lock until green notices its session is gone:
    // try for a few seconds before calling the plan busy.
    let got = crate::retry::wait_until(PLAN_LOCK_WAIT, || async {
        Ok(green
            .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
            .await
            .map_err(Error::db("green: taking the plan lock"))?
            .get(0))
    })
    .await?;
    if got {
        Ok(())
    } else {
        Err(Error::Busy { plan: plan.to_string(), command: command.to_string() })
    }
}

/// How long a command waits for the plan lock of a `copy` that may have just died.
const PLAN_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Copies every table (resuming from state) and rebuilds deferred objects. Returns `true` when
/// all tables are done, `false` when `shutdown` fired first (state saved). A run that finds a
/// planned table rewritten on blue (VACUUM FULL, CLUSTER, ALTER TABLE) after it planned the
/// chunks stops, and the next run copies that table again from scratch.
pub async fn copy_tables(
    plan: &Plan,
    resolved: &ResolvedPlan,
    green: &mut Client,
    shutdown: &Shutdown,
    live: &Arc<crate::control::Live>,
) -> Result<bool> {
    let state = State::new(&plan.name);
    state.ensure(green, &plan.name).await?;
    if !begin_copy(&state, green, resolved).await? {
        return Ok(true);
    }
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        match copy_run(plan, resolved, &state, green, shutdown, live).await {
            Err(Error::TableRewritten { table }) if attempts + 1 < REWRITE_ATTEMPTS => {
                attempts += 1;
                warn!(table = %table, "rewritten on blue after its chunks were planned; copying it again");
            }
            Err(e) => return Err(e),
            Ok(false) => {
                info!("copy stopped; rerun `migrate copy` to resume");
                return Ok(false);
            }
            Ok(true) => break,
        }
    }
    info!(seconds = started.elapsed().as_secs_f64(), tables = resolved.tables.len(), "copy finished");
    Ok(true)
}

/// Runs that may find a table rewritten before the copy gives up.
const REWRITE_ATTEMPTS: u32 = 5;

/// One copy run: plan what is left, export one snapshot, run the workers, validate foreign keys.
/// `false` when `shutdown` fired.
async fn copy_run(
    plan: &Plan,
    resolved: &ResolvedPlan,
    state: &State,
    green: &mut Client,
    shutdown: &Shutdown,
    live: &Arc<crate::control::Live>,
) -> Result<bool> {
    let epoch = state.next_epoch(green).await?;
    let blue = plan.blue.connect().await?;
    // The run's transaction floor (see `snapshots`): the xmin of a snapshot taken after capture
    // began and before the run's first, so every chunk's is at or above it. Recorded once the
    // first snapshot is exported (below): a joined worker waits for it before taking snapshots
    // of its own, which are then all later than the chunks' planning.
    let floor = if plan.copy.snapshot_max_age.is_zero() {
        // One snapshot: no row can be read twice.
        None
    } else {
        Some(snapshots::snapshot_xmin(&blue).await?)
    };
    let mut prepared = Vec::new();
    for t in &resolved.tables {
        prepared.push(prepare_table(plan, state, &blue, green, t).await?);
    }
    // The run's first snapshot, taken after capture began and after the chunks were planned on
    // blue's heaps (a chunk compares its heap with the planned one, so a rewrite before this
    // snapshot would go unseen): whatever changes after it is captured. A new one replaces it
    // every `[copy] snapshot_max_age` (see `snapshots`).
    let first = snapshots::export(&blue).await?;
    if let Some(floor) = floor {
        state.set_copy_floor(green, floor).await?;
    }
    crate::fault::point("copy.snapshot-exported").await;
    let snapshots = Arc::new(snapshots::Snapshots::new(first));
    let rotation_stop = Shutdown::manual();
    let rotator = tokio::spawn(snapshots::rotate(
        plan.clone(),
        Arc::clone(&snapshots),
        (blue, None),
        rotation_stop.clone(),
        None,
    ));
    let progress = Progress::new(
        resolved
            .tables
            .iter()
            .zip(&prepared)
            .map(|(t, p)| (t.target.to_string(), t.estimate.rows, p.rows_copied))
            .collect(),
    );
    let logger = progress.spawn_logger();
    // The workers stop on the first error of this run without stopping the command: the
    // caller may run again.
    let (run_stop, relay) = run_stop(shutdown);
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        tables: resolved.tables.clone(),
        state: state.clone(),
        worker_id: crate::state::worker_id(),
        joined: false,
        claimable: resolved
            .tables
            .iter()
            .zip(&prepared)
            .filter(|(_, p)| p.state != TableState::Done)
            .map(|(t, _)| t.id.as_str().to_string())
            .collect(),
        finished: Mutex::new(prepared.iter().map(|p| p.state == TableState::Done).collect()),
        rebuilding: Mutex::new(vec![false; prepared.len()]),
        busy: Mutex::default(),
        copied: Default::default(),
        expired: Shutdown::manual(),
        sessions: None,
        resumed: prepared.iter().map(|p| p.resumed).collect(),
        filenodes: prepared.iter().map(|p| p.filenode).collect(),
        generations: Mutex::new(vec![(None, false); prepared.len()]),
        deferred: prepared.into_iter().map(|p| p.deferred).collect(),
        snapshots,
        epoch,
        floor,
        key_text: key_text(resolved),
        progress: Arc::clone(&progress),
        throttle: Throttle::new(plan.copy.max_rows_per_second, Arc::clone(live)),
        live: Arc::clone(live),
        shutdown: run_stop.clone(),
    });
    let heartbeat = tokio::spawn(heartbeat(Arc::clone(&shared), "leader"));
    let first_error = run_workers(&shared, plan.copy.workers.max(1), &run_stop).await;
    heartbeat.abort();
    let _ = state.worker_gone(green, &shared.worker_id).await;
    relay.abort();
    if let Some(l) = logger {
        l.abort();
    }
    rotation_stop.trigger();
    let _ = rotator.await;
    progress.finish();
    if let Some(e) = first_error {
        return Err(e);
    }
    if shutdown.is_triggered() {
        return Ok(false);
    }
    let all: Vec<DeferredObject> = shared.deferred.iter().flatten().cloned().collect();
    indexes::rebuild_foreign_keys(green, &all).await?;
    Ok(true)
}

/// Refuses to resume while an entry's source drifted on blue, unless the operator named it in
/// `recopy`: then its green table is emptied and it is copied again (capture goes on).
async fn refuse_drifted(state: &State, green: &Client, resolved: &ResolvedPlan, recopy: &[String]) -> Result<()> {
    for name in recopy {
        let Some(t) = resolved.tables.iter().find(|t| t.named_by_any(std::slice::from_ref(name))) else {
            return Err(Error::NoSuchTable { flag: "--recopy", name: name.clone() });
        };
        // Its rows go now; with foreign keys off (replica), as apply writes, so tables that
        // reference it keep theirs until it is back.
        green
            .batch_execute(&format!(
                "BEGIN; SET LOCAL session_replication_role = replica; DELETE FROM {}",
                t.target.quoted()
            ))
            .await
            .map_err(Error::db(format!("green: emptying {} to copy it again", t.target)))?;
        state.restart_table(green, &t.id).await?;
        green.batch_execute("COMMIT").await.map_err(Error::db("green: commit"))?;
        info!(table = %t.id, "emptied on green; it is copied again");
    }
    let drifted = state.drifted(green).await?;
    if drifted.is_empty() {
        return Ok(());
    }
    Err(Error::Drifted { tables: drifted.into_iter().map(|(id, what)| format!("{id}: {what}")).collect() })
}

/// For `cleanup` of a copy that did not finish: rebuilds the indexes and constraints it dropped
/// and has not rebuilt (every entry not `done`), and adds and validates the foreign keys it
/// recorded. Returns what it restored, and what it could not (each with the statement that
/// restores it and why it failed).
pub async fn restore_deferred(
    green: &Client,
    state: &State,
    copy: &crate::plan::CopySettings,
) -> Result<(Vec<String>, Vec<String>)> {
    let (mut restored, mut failed) = (Vec::new(), Vec::new());
    let mut foreign = Vec::new();
    for r in state.recorded_tables(green).await? {
        let Some((st, defs)) = state.table_state(green, &r.id).await? else { continue };
        // Foreign keys come back only at the end of a copy, so a done table's may be missing too.
        foreign.extend(defs.iter().filter(|d| d.kind == "foreign key").cloned());
        if st == TableState::Done {
            continue;
        }
        for d in defs.iter().filter(|d| d.kind != "foreign key") {
            match indexes::rebuild_keys_and_indexes(green, &r.target, std::slice::from_ref(d), copy).await {
                Ok(()) => restored.push(format!("{} {} on {}", d.kind, d.name, r.target)),
                Err(e) => failed.push(format!("{} {} on {} ({e}): {}", d.kind, d.name, r.target, d.create_sql)),
            }
        }
    }
    // No follower runs now: a foreign key that does not validate at once will not; it stays
    // NOT VALID (new writes are checked) and is listed.
    let mut seen = std::collections::HashSet::new();
    foreign.retain(|d| seen.insert(d.create_sql.clone()));
    for d in &foreign {
        match indexes::rebuild_foreign_keys_within(green, std::slice::from_ref(d), std::time::Duration::ZERO).await {
            Ok(()) => restored.push(format!("foreign key {} on {}", d.name, d.owner)),
            Err(e) => failed.push(format!(
                "foreign key {} on {} ({e}): fix the rows, then `{} NOT VALID` if it is missing and \
                 `ALTER TABLE {} VALIDATE CONSTRAINT {}`",
                d.name,
                d.owner,
                d.create_sql,
                d.owner,
                crate::pg::ident(&d.name)
            )),
        }
    }
    Ok((restored, failed))
}

/// Moves the migration to `copying` when there is something to copy: everything (a first or
/// resumed copy), or entries added to a plan that was following. `false` when the copy is done.
async fn begin_copy(state: &State, green: &Client, resolved: &ResolvedPlan) -> Result<bool> {
    match state.phase(green).await? {
        Some(Phase::Planned) | Some(Phase::Copying) | None => state.set_phase(green, &Phase::Copying).await?,
        Some(p @ (Phase::Following { .. } | Phase::Aborted { .. })) => {
            // A table added to the plan since the copy finished is copied now, under a new
            // snapshot taken after its capture began; the others are left as they are.
            let done = state.done_tables(green).await?;
            let added: Vec<&TableId> = resolved.tables.iter().map(|t| &t.id).filter(|id| !done.contains(id)).collect();
            if added.is_empty() {
                info!(phase = p.name(), "copy already finished");
                return Ok(false);
            }
            info!(tables = ?added, "the plan has entries not copied yet; copying them");
            state.set_phase(green, &Phase::Copying).await?;
        }
        Some(p) => {
            info!(phase = p.name(), "copy already finished");
            return Ok(false);
        }
    }
    Ok(true)
}

/// A stop for one run's workers, triggered by `outer` too (the task relaying it is returned):
/// the first worker error stops the run, not the command.
fn run_stop(outer: &Shutdown) -> (Shutdown, tokio::task::JoinHandle<()>) {
    let stop = Shutdown::manual();
    let relay = {
        let (outer, stop) = (outer.clone(), stop.clone());
        tokio::spawn(async move {
            outer.wait().await;
            stop.trigger();
        })
    };
    (stop, relay)
}

/// Every second, records this process in green's `workers` (its chunks in hand, chunks copied)
/// for `status` and as its lease, on a connection of its own. A joined worker that finds its
/// lease expired (the leader ended its sessions: `state::Leases`) stops.
async fn heartbeat(shared: Arc<Shared>, role: &'static str) {
    let held = || {
        let chunks = shared.busy.lock().map(|b| b.iter().cloned().collect()).unwrap_or_default();
        (chunks, shared.copied.load(std::sync::atomic::Ordering::Relaxed))
    };
    let lease = shared.joined.then_some(shared.plan.copy.worker_lease);
    shared.state.beat(&shared.plan.green, &shared.worker_id, role, lease, held).await;
    shared.expired.trigger();
    shared.shutdown.trigger();
}

/// `migrate copy --join`: a worker on another machine. Waits for the leader (`migrate copy`) to
/// plan the chunks, then claims and copies chunks beside it (each under snapshots of its own,
/// taken after the leader's capture began) until none is left; the leader rebuilds indexes and
/// follows. A joined worker that dies loses only its uncommitted chunks, which others redo.
pub async fn join(plan: &Plan, resolved: &ResolvedPlan, green: Client, shutdown: Shutdown) -> Result<()> {
    if plan.copy.snapshot_max_age.is_zero() {
        return Err(Error::Usage(
            "a joined worker reads under snapshots of its own, and `[copy] snapshot_max_age = \"0s\"` asks for one \
             snapshot per run: set an age (default 60s) to spread the copy over machines"
                .into(),
        ));
    }
    let state = State::new(&plan.name);
    let mut waited = Instant::now();
    let floor = loop {
        // The leader creates the state (two processes creating one schema at once collide).
        let phase = if state.exists(&green).await? { state.phase(&green).await? } else { None };
        match phase {
            // Snapshots of its own must be above the leader's floor: taken once it is recorded.
            Some(Phase::Copying) => {
                if let Some(floor) = state.copy_floor(&green).await? {
                    break floor;
                }
            }
            None | Some(Phase::Planned) => {}
            Some(p) => {
                info!(phase = p.name(), "the copy is not running; nothing to join");
                return Ok(());
            }
        }
        if shutdown.is_triggered() {
            return Ok(());
        }
        if waited.elapsed() >= std::time::Duration::from_secs(10) {
            info!("waiting for `migrate copy` (the leader) to plan the chunks");
            waited = Instant::now();
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    if !state.chunks_current(&green).await? {
        return Err(Error::Usage(
            "the leader (`migrate copy`) runs an older migrate than this joined worker (green's state has no \
             chunks.copied_with or workers.expired_at column): run the same migrate version on every machine"
                .into(),
        ));
    }
    let epoch = state.epoch(&green).await?;
    // Recorded before any session of its own reads or claims: its lease covers them all.
    let worker_id = crate::state::worker_id();
    state.worker_seen(&green, &worker_id, "joined", &[], 0).await?;
    // Kept fresh until its heartbeat proper starts: a slow start (connects, blue's health) is
    // not silence.
    let mut early = {
        let (plan, state, id) = (plan.clone(), state.clone(), worker_id.clone());
        crate::shutdown::AbortOnDrop(tokio::spawn(async move {
            state.beat(&plan.green, &id, "joined", Some(plan.copy.worker_lease), || (Vec::new(), 0)).await
        }))
    };
    let live = Arc::new(crate::control::Live::default());
    let start = async {
        let sessions =
            Arc::new(Sessions::new(state.clone(), worker_id.clone(), &plan.green, plan.copy.worker_lease).await?);
        let blue = plan.blue.connect().await?;
        let entry = sessions.add("blue", &blue).await?;
        let first = snapshots::export(&blue).await?;
        let refresher = crate::control::start(plan, Arc::clone(&live)).await;
        Ok::<_, Error>((sessions, blue, entry, first, refresher))
    };
    // Cut off from green while it starts, it stops as it would later (what it waits on may
    // never answer).
    let (sessions, blue, entry, first, _refresher) = tokio::select! {
        biased;
        _ = &mut early.0 => {
            return Err(Error::LeaseExpired { worker: worker_id.clone(), lease: plan.copy.worker_lease });
        }
        started = start => started?,
    };
    let snapshots = Arc::new(snapshots::Snapshots::new(first));
    let rotation_stop = Shutdown::manual();
    let rotator = tokio::spawn(snapshots::rotate(
        plan.clone(),
        Arc::clone(&snapshots),
        (blue, Some(entry)),
        rotation_stop.clone(),
        Some(Arc::clone(&sessions)),
    ));
    let (run_stop, relay) = run_stop(&shutdown);
    let n = resolved.tables.len();
    let progress = Progress::new(resolved.tables.iter().map(|t| (t.target.to_string(), t.estimate.rows, 0)).collect());
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        tables: resolved.tables.clone(),
        state: state.clone(),
        worker_id,
        joined: true,
        claimable: resolved.tables.iter().map(|t| t.id.as_str().to_string()).collect(),
        finished: Mutex::new(vec![false; n]),
        rebuilding: Mutex::new(vec![false; n]),
        busy: Mutex::default(),
        copied: Default::default(),
        expired: Shutdown::manual(),
        sessions: Some(Arc::clone(&sessions)),
        // Read under snapshots of its own: as if resumed (staged where keys are in place).
        resumed: vec![true; n],
        filenodes: Vec::new(),
        generations: Mutex::new(vec![(None, true); n]),
        deferred: vec![Vec::new(); n],
        snapshots,
        epoch,
        floor: Some(floor),
        key_text: key_text(resolved),
        progress: Arc::clone(&progress),
        throttle: Throttle::new(plan.copy.max_rows_per_second, Arc::clone(&live)),
        live,
        shutdown: run_stop.clone(),
    });
    info!(worker = %shared.worker_id, "joined the copy; claiming chunks");
    let heartbeat = tokio::spawn(heartbeat(Arc::clone(&shared), "joined"));
    drop(early);
    let first_error = tokio::select! {
        e = run_workers(&shared, plan.copy.workers.max(1), &run_stop) => e,
        // Its lease is lost: its sessions are (being) ended by the leader, and what its
        // workers hold is dropped uncommitted.
        _ = shared.expired.wait() => None,
    };
    relay.abort();
    rotation_stop.trigger();
    // Its exporters are the leader's to end once it lost its lease, or when blue does not
    // answer their COMMITs (one cut off from blue would wait here until TCP gives up). The
    // heartbeat goes on meanwhile: silent for a lease, it would be judged for that instead.
    let lost = shared.expired.is_triggered();
    let rotator_wait = if lost { std::time::Duration::ZERO } else { std::time::Duration::from_secs(10) };
    let mut rotator = rotator;
    if tokio::time::timeout(rotator_wait, &mut rotator).await.is_err() {
        rotator.abort();
        sessions.left_open();
    }
    heartbeat.abort();
    // Its sessions may have been ended under it: what they failed with says less than this.
    // (Its first session, idle since the start, may have been closed meanwhile.)
    let failed = first_error.is_some() || sessions.any_left_open();
    let green = if green.is_closed() {
        tokio::time::timeout(std::time::Duration::from_secs(8), plan.green.connect()).await.ok().and_then(|c| c.ok())
    } else {
        Some(green)
    };
    let expired = lost
        || match &green {
            Some(g) => state.worker_parting(g, &shared.worker_id, failed).await,
            None => false,
        };
    progress.finish();
    if expired {
        return Err(Error::LeaseExpired { worker: shared.worker_id.clone(), lease: plan.copy.worker_lease });
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    info!(
        chunks = shared.copied.load(std::sync::atomic::Ordering::Relaxed),
        "joined worker done: no chunk left to copy"
    );
    Ok(())
}

/// How the plan's capture writes keys as text.
fn key_text(resolved: &ResolvedPlan) -> crate::plan::KeyText {
    match resolved.capture.method {
        crate::plan::CaptureMethod::Trigger => crate::plan::KeyText::Json,
        _ => crate::plan::KeyText::Output,
    }
}

/// Runs `n` workers claiming chunks; the first error stops the others at their next chunk
/// (their committed chunks stay) and is returned.
async fn run_workers(shared: &Arc<Shared>, n: usize, shutdown: &Shutdown) -> Option<Error> {
    let mut set = JoinSet::new();
    for w in 0..n {
        let shared = Arc::clone(shared);
        set.spawn(async move { worker(w, shared).await });
    }
    let mut first_error = None;
    while let Some(res) = set.join_next().await {
        let res = res.unwrap_or_else(|e| Err(Error::TaskPanicked { task: "copy worker", message: e.to_string() }));
        if let Err(e) = res {
            if first_error.is_none() {
                shutdown.trigger();
                first_error = Some(e);
            }
        }
    }
    first_error
}

/// Loads or creates the chunks of one table. On first sight, records the chunks and the deferred
/// objects and drops those objects, all in one green transaction. A table whose blue heap was
/// rewritten since (VACUUM FULL, CLUSTER) starts over: its block ranges no longer mean anything.
async fn prepare_table(
    plan: &Plan,
    state: &State,
    blue: &Client,
    green: &mut Client,
    t: &ResolvedTable,
) -> Result<Prepared> {
    let planned = chunk::plan_chunks(blue, t, plan.copy.chunk_rows).await?;
    if let Some((st, defs)) = state.table_state(green, &t.id).await? {
        let recorded = state.source_filenode(green, &t.id).await?;
        let rewritten = recorded.is_some_and(|f| f != planned.filenode);
        if st == TableState::Done || (st != TableState::Pending && !rewritten) {
            return load_chunks(green, state, &t.id, st, defs, planned.filenode).await;
        }
        if rewritten {
            warn!(table = %t.source, "blue heap was rewritten (VACUUM FULL, CLUSTER?) since the copy began; copying the table again");
            let tx = green.transaction().await.map_err(Error::db("green: begin"))?;
            tx.batch_execute(&format!("TRUNCATE {}", t.target.quoted()))
                .await
                .map_err(Error::db(format!("green: emptying {}", t.target)))?;
            state.reset_chunks(&tx, &t.id).await?;
            tx.commit().await.map_err(Error::db("green: resetting chunks"))?;
        }
    }
    let defs = if plan.copy.defer_indexes { t.deferred.clone() } else { Vec::new() };
    // What the source is now: following stops if blue changes it behind capture's back.
    let shape = serde_json::to_value(crate::capture::drift::shape(blue, t).await?).unwrap_or_default();
    let records: Vec<ChunkRecord> = planned
        .chunks
        .iter()
        .map(|c| ChunkRecord {
            number: c.number,
            first_block: c.first_block,
            end_block: c.end_block,
            part: c.part.clone(),
            done: false,
            rows: 0,
        })
        .collect();
    let tx = green.transaction().await.map_err(Error::db("green: begin"))?;
    state.add_chunks(&tx, &t.id, &records).await?;
    indexes::drop_all(&tx, &defs).await?;
    state
        .begin_table(
            &tx,
            &t.id,
            &t.target.to_string(),
            t.estimate.rows,
            &defs,
            &t.definition(),
            planned.filenode,
            &shape,
        )
        .await?;
    tx.commit().await.map_err(Error::db(format!("green: recording chunks of {}", t.target)))?;
    info!(table = %t.id, chunks = planned.chunks.len(), deferred = defs.len(), "table planned");
    Ok(Prepared {
        state: TableState::Loading,
        filenode: planned.filenode,
        deferred: defs,
        rows_copied: 0,
        resumed: false,
    })
}

/// Reads the unfinished chunks a previous run recorded.
async fn load_chunks(
    green: &Client,
    state: &State,
    id: &TableId,
    st: TableState,
    deferred: Vec<DeferredObject>,
    filenode: i64,
) -> Result<Prepared> {
    let chunks = state.chunks(green, id).await?;
    let rows_copied: i64 = chunks.iter().filter(|c| c.done).map(|c| c.rows).sum();
    // Chunks of an earlier run read its snapshots.
    let resumed = chunks.iter().any(|c| c.done);
    Ok(Prepared { state: st, filenode, deferred, rows_copied: rows_copied as u64, resumed })
}

/// `migrate copy`: takes the plan lock, sets up capture on blue, copies every table while the
/// follower applies changes to finished tables, then follows until a signal, a finished
/// cutover, or (with `no_follow`) until green holds what blue had committed when the copy ended.
pub async fn run(
    plan: &Plan,
    resolved: &ResolvedPlan,
    removed: &[TableId],
    recopy: &[String],
    mut green: Client,
    shutdown: Shutdown,
    no_follow: bool,
) -> Result<()> {
    lock_plan(&green, &plan.name, "copy").await?;
    let state = State::new(&plan.name);
    state.ensure(&green, &plan.name).await?;
    // Joined workers' leases, for as long as this leader runs (copy and following): one frozen
    // after its last chunk would otherwise hold its snapshots on blue through the following.
    let _leases = crate::shutdown::AbortOnDrop(tokio::spawn(Leases::new("joined", plan.copy.worker_lease).watch(
        state.clone(),
        plan.green.clone(),
        plan.blue.clone(),
    )));
    state.clear_failure(&green).await?;
    let mut removed = removed;
    loop {
        let mut phase = state.phase(&green).await?;
        if matches!(phase, Some(Phase::RollingBack { .. })) {
            crate::follow::back::recover(plan, resolved).await?;
            phase = state.phase(&green).await?;
        }
        if matches!(phase, Some(Phase::Switched) | Some(Phase::RollingBack { .. })) {
            // Traffic is on green: carry its writes back while a way back is open.
            if !crate::way_back::window(&state, &green).await?.is_some_and(|w| w.open) {
                info!("this migration is switched already; nothing to copy or follow");
                return Ok(());
            }
            match crate::follow::back::run(plan, resolved, &shutdown).await? {
                crate::follow::back::BackStop::RolledBack => continue,
                _ => return Ok(()),
            }
        }
        match forward(plan, resolved, removed, recopy, &mut green, &state, shutdown.clone(), no_follow).await? {
            // A finished cutover: a way back may have opened.
            Some(Stop::Switched) => removed = &[],
            _ => return Ok(()),
        }
    }
}

/// Capture, copy and follow blue until a signal, a switch, or `--no-follow`'s catch-up.
/// Returns why following stopped (`None` when it never started).
#[allow(clippy::too_many_arguments)]
async fn forward(
    plan: &Plan,
    resolved: &ResolvedPlan,
    removed: &[TableId],
    recopy: &[String],
    green: &mut Client,
    state: &State,
    shutdown: Shutdown,
    no_follow: bool,
) -> Result<Option<Stop>> {
    refuse_drifted(state, green, resolved, recopy).await?;
    if !removed.is_empty() {
        // Capture setup below drops their triggers or publication membership on blue.
        state.forget_tables(green, removed).await?;
        info!(tables = ?removed, "entries no longer in the plan: their capture and state are removed, their green rows stay");
    }
    // Capture starts before the copy's snapshot: every change the copy might miss is captured.
    let capture = Capture::setup(plan, resolved, plan.blue.connect().await?).await?;
    // `migrate control` and blue's health, read every second while this runs.
    let live = Arc::new(crate::control::Live::default());
    let mut refresher = crate::control::start(plan, Arc::clone(&live)).await;
    let follower = Follower::new(plan, &resolved.tables, capture, Arc::clone(&live)).await?;
    let (catch_up_tx, catch_up_rx) = tokio::sync::watch::channel(false);
    let follow_stop = Shutdown::manual();
    let mut following = tokio::spawn(follower.run(follow_stop.clone(), catch_up_rx));
    let copied = tokio::select! {
        r = copy_tables(plan, resolved, green, &shutdown, &live) => r,
        r = &mut following => {
            // The follower ended during the copy: that is a failure (or a signal).
            shutdown.trigger();
            let r = r.unwrap_or_else(|e| Err(Error::TaskPanicked { task: "follower", message: e.to_string() }));
            return r.and_then(|stop| match stop {
                Stop::Signal => Ok(None),
                other => Err(Error::FollowerStopped { how: format!("{other:?}") }),
            });
        }
    };
    let finished = match copied {
        Ok(f) => f,
        Err(e) => {
            follow_stop.trigger();
            let _ = following.await;
            return Err(e);
        }
    };
    if !finished {
        follow_stop.trigger();
        let _ = following.await;
        return Ok(None);
    }
    if !matches!(
        state.phase(green).await?,
        Some(Phase::Following { .. }) | Some(Phase::CuttingOver { .. }) | Some(Phase::Aborted { .. })
    ) {
        state.set_phase(green, &Phase::Following { lsn: None }).await?;
    }
    refresher.copy_done();
    info!("copy done; following blue");
    if no_follow {
        let _ = catch_up_tx.send(true);
    }
    // Relay the user's signal to the follower, which stops at a safe point.
    let relay = {
        let shutdown = shutdown.clone();
        let follow_stop = follow_stop.clone();
        tokio::spawn(async move {
            shutdown.wait().await;
            follow_stop.trigger();
        })
    };
    let stop =
        following.await.unwrap_or_else(|e| Err(Error::TaskPanicked { task: "follower", message: e.to_string() }));
    relay.abort();
    let stop = stop?;
    info!(reason = ?stop, "following stopped");
    Ok(Some(stop))
}
