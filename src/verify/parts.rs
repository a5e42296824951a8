//! Verify's summaries in parts. Each side's heap is cut into block ranges; a part's summary is
//! (rows, sum of row hashes) per key bucket, and sums add: parts read by different sessions,
//! processes or machines, at different moments, add up to the table's summary, as one scan's
//! would. Every part of a side is read under one snapshot the leader exported for the run
//! (`SET TRANSACTION SNAPSHOT`, which works from any machine while the leader's transaction
//! lives): each side is read as of one moment, as one statement would, so buckets differ only
//! by what green had not applied at that moment, not by writes made while parts were read.
//!
//! With migration state on green, parts are rows of green's `verify_parts`, claimed with
//! `FOR UPDATE SKIP LOCKED` in the transaction that stores their summary (see
//! [`crate::state::State::claim_verify_part`]): `migrate verify --join` on other machines takes
//! parts beside the leader, and a worker that dies frees its part by dying. Without state the
//! parts are a queue in memory.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicI32, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use tokio_postgres::{Client, GenericClient};
use tracing::info;

pub use crate::state::PartSummary;
use crate::{
    error::{Error, Result},
    pg::{export_snapshot, literal},
    plan::{Plan, ResolvedPlan},
    shutdown::Shutdown,
    state::{Leases, NewPart, Sessions, State},
};

use super::{portable_hash, session, Queries, SUMMARY_SETTINGS};

/// Blocks per part (128 MB of heap with 8 kB blocks): big enough that a claim costs nothing
/// against the read, small enough that several machines share a table.
const PART_BLOCKS: i64 = 16_384;
/// Parts a side of a table of at least [`SPLIT_BLOCKS`] is cut into at least, so a smaller
/// table still spreads over a machine's sessions.
const MIN_PARTS: i64 = 4;
const SPLIT_BLOCKS: i64 = 64;
/// A joined verify worker's role in `workers`.
const JOINED: &str = "verify joined";

/// Sessions (each a blue and a green connection) reading parts in one process: blue's part runs
/// the transform, green's the plain read; three keep both servers busy.
const LANES: usize = 3;

/// Summed summaries by (entry id, side).
pub type Summaries = HashMap<(String, &'static str), PartSummary>;

/// Where parts come from and where their summaries go.
enum Board<'a> {
    /// Green's `verify_parts`: the leader's run (`Some`) or any run (a joined worker).
    Shared { state: &'a State, run: Option<String>, worker: String },
    /// One process, no state: a queue in memory; summaries and seconds per table.
    Local { queue: Mutex<VecDeque<NewPart>>, sums: &'a Mutex<Summaries>, seconds: &'a Mutex<HashMap<String, f64>> },
}

/// Each side's summary of every table, summed over its parts, and the seconds each table's
/// parts took to read (summed over the sessions that read them).
pub struct Summed {
    /// By (entry id, side).
    pub sums: Summaries,
    /// By entry id.
    pub seconds: HashMap<String, f64>,
}

/// What the lanes of one process share.
struct Lanes<'a> {
    plan: &'a Plan,
    board: Board<'a>,
    queries: &'a [Queries<'a>],
    /// Fingerprints this process computed, by (entry id, buckets).
    shapes: tokio::sync::Mutex<HashMap<(String, i64), String>>,
    /// Parts in hand (`entry:side:part`), for `status`.
    busy: Mutex<BTreeSet<String>>,
    checked: AtomicI32,
    /// A run whose leader is gone was dropped.
    dropped: AtomicBool,
    /// A joined worker's record of its sessions, ended by the leader if its lease expires.
    sessions: Option<Sessions>,
    shutdown: &'a Shutdown,
}

/// The leader: exports a snapshot of each side, plans the parts of `tables`, reads them with
/// its lanes (beside any joined workers), and returns each side's summed summary. With state,
/// the caller holds the plan's verify lock.
pub(super) async fn lead(
    plan: &Plan,
    state: Option<&State>,
    (blue, green): (&Client, &Client),
    tables: &[Queries<'_>],
    shutdown: &Shutdown,
) -> Result<Summed> {
    // Held until every part is read: the snapshots live as long as their transactions.
    let (blue_snap, green_snap) = tokio::try_join!(plan.blue.connect(), plan.green.connect())?;
    let snapshots = (
        export_snapshot(&blue_snap, "blue: verify snapshot").await?,
        export_snapshot(&green_snap, "green: verify snapshot").await?,
    );
    let mut planned = Vec::new();
    for q in tables {
        planned.extend(plan_table(blue, green, q, &snapshots).await?);
    }
    let Some(state) = state else {
        let (sums, seconds) = (Mutex::default(), Mutex::default());
        let board = Board::Local { queue: Mutex::new(planned.into()), sums: &sums, seconds: &seconds };
        Lanes::new(plan, board, tables, shutdown).run().await?;
        let seconds = seconds.into_inner().unwrap_or_default();
        return Ok(Summed { sums: sums.into_inner().unwrap_or_default(), seconds });
    };
    let run = crate::state::worker_id();
    state.plan_verify_parts(green, &run, &planned).await?;
    let result = async {
        let board = Board::Shared { state, run: Some(run.clone()), worker: run.clone() };
        Lanes::new(plan, board, tables, shutdown).run_reported("verify leader").await?;
        let mut summed = Summed { sums: Summaries::new(), seconds: HashMap::new() };
        for q in tables {
            let id = q.t.id.as_str().to_string();
            for side in ["blue", "green"] {
                summed.sums.insert((id.clone(), side), state.verify_summary(green, &run, &id, side).await?);
            }
            summed.seconds.insert(id.clone(), state.verify_part_seconds(green, &run, &id).await?);
        }
        Ok(summed)
    }
    .await;
    if result.is_err() {
        // Joined workers stop reading a run that cannot finish.
        let _ = state.abandon_verify_run(green, &run).await;
    }
    result
}

/// `migrate verify --join`: waits for a leader's run, reads parts of it until none is left, and
/// returns how many this process read.
pub async fn join(plan: &Plan, resolved: &ResolvedPlan, shutdown: &Shutdown) -> Result<i32> {
    let (blue, green) = tokio::try_join!(plan.blue.connect(), plan.green.connect())?;
    let state = State::new(&plan.name);
    if !state.exists(&green).await? {
        return Err(Error::NoState { plan: plan.name.clone() });
    }
    let hashing = portable_hash(&blue, &green).await?;
    let mut queries = Vec::new();
    for t in &resolved.tables {
        queries.push(Queries::new(hashing, &green, t).await);
    }
    let worker = crate::state::worker_id();
    let board = Board::Shared { state: &state, run: None, worker: worker.clone() };
    let mut lanes = Lanes::new(plan, board, &queries, shutdown);
    lanes.sessions = Some(Sessions::new(state.clone(), worker, &plan.green, plan.copy.worker_lease).await?);
    // Until a run ends that a leader finished: a run dropped (its leader died) is not the
    // verify this worker was started for.
    loop {
        let started = Instant::now();
        let mut said = Instant::now();
        while state.verify_parts_left(&green, None).await? == 0 {
            if shutdown.is_triggered() {
                return Err(Error::Interrupted { during: "while waiting for a verify to join".into() });
            }
            if said.elapsed() >= Duration::from_secs(30) {
                info!(waited = started.elapsed().as_secs(), "waiting for a `migrate verify` of this plan to join");
                said = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        lanes.run_reported(JOINED).await?;
        if !lanes.dropped.swap(false, Ordering::Relaxed) {
            return Ok(lanes.checked.load(Ordering::Relaxed));
        }
    }
}

/// The parts of one table: each side's heap in ranges of [`PART_BLOCKS`], the last open-ended
/// (rows in blocks added since are read too).
async fn plan_table(
    blue: &Client,
    green: &Client,
    q: &Queries<'_>,
    snapshots: &(String, String),
) -> Result<Vec<NewPart>> {
    let n = q.buckets();
    let shape = shape(green, q, n).await?;
    let mut parts = Vec::new();
    for (side, client, relation) in [("blue", blue, q.t.source.quoted()), ("green", green, q.t.target.quoted())] {
        // A partitioned table's ranges apply to each leaf: cut by the largest (the tree of a
        // plain table is empty).
        let blocks: i64 = client
            .query_one(
                "SELECT greatest(pg_relation_size($1::text::regclass), \
                   (SELECT max(pg_relation_size(relid)) FROM pg_partition_tree($1::text::regclass) WHERE isleaf))::int8 \
                   / current_setting('block_size')::int8",
                &[&relation],
            )
            .await
            .map_err(Error::db(format!("{side}: size of {relation}")))?
            .get(0);
        let count = ((blocks + PART_BLOCKS - 1) / PART_BLOCKS).max(if blocks >= SPLIT_BLOCKS { MIN_PARTS } else { 1 });
        let per = blocks / count + 1;
        for i in 0..count {
            parts.push(NewPart {
                table: q.t.id.as_str().to_string(),
                side,
                number: i as i32,
                first_block: i * per,
                end_block: (i + 1 < count).then_some((i + 1) * per),
                buckets: n,
                shape: shape.clone(),
                snapshot: if side == "blue" { snapshots.0.clone() } else { snapshots.1.clone() },
            });
        }
    }
    Ok(parts)
}

/// The summary query of one part.
fn part_sql(q: &Queries<'_>, part: &NewPart) -> String {
    let range = |ctid: &str| {
        let mut c = vec![format!("{ctid} >= '({},0)'::tid", part.first_block)];
        c.extend(part.end_block.map(|e| format!("{ctid} < '({e},0)'::tid")));
        c.join(" AND ")
    };
    let src = if part.side == "blue" {
        q.t.source_select(Some(&range(&format!("{}.ctid", q.t.qualifier()))))
    } else {
        format!("SELECT {} FROM {} WHERE {}", q.t.target_column_list(), q.t.target.quoted(), range("ctid"))
    };
    q.summary(&src, part.buckets)
}

/// A fingerprint of the queries a table's parts run (both sides, whole table): equal between
/// the leader and a worker only when both would sum the same thing.
async fn shape(green: &impl GenericClient, q: &Queries<'_>, n: i64) -> Result<String> {
    let whole = |side| NewPart {
        table: String::new(),
        side,
        number: 0,
        first_block: 0,
        end_block: None,
        buckets: n,
        shape: String::new(),
        snapshot: String::new(),
    };
    let text = format!("{}\n{}", part_sql(q, &whole("blue")), part_sql(q, &whole("green")));
    Ok(green.query_one("SELECT md5($1)", &[&text]).await.map_err(Error::db("green: fingerprinting verify"))?.get(0))
}

/// One part's summary, read on its side under the run's snapshot of that side; `None` when
/// the snapshot is gone (the leader that exported it ended).
async fn summarise(q: &Queries<'_>, part: &NewPart, blue: &Client, green: &Client) -> Result<Option<PartSummary>> {
    let (client, side, name) =
        if part.side == "blue" { (blue, "blue", &q.t.source) } else { (green, "green", &q.t.target) };
    let import = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; {SUMMARY_SETTINGS}",
        literal(&part.snapshot)
    );
    match client.batch_execute(&import).await {
        Ok(()) => {}
        // 22023: no such snapshot (its transaction ended).
        Err(e) if e.code().is_some_and(|c| c.code() == "22023") => {
            let _ = client.batch_execute("ROLLBACK").await;
            return Ok(None);
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(Error::db(format!("{side}: importing the verify snapshot"))(e));
        }
    }
    let rows = client.query(&part_sql(q, part), &[]).await;
    let _ = client.batch_execute("COMMIT").await;
    let rows = rows.map_err(Error::db(format!("{side}: checksumming {name}")))?;
    let mut out = PartSummary::new();
    for r in &rows {
        let sum: String = r.get(2);
        let sum =
            sum.parse::<i128>().map_err(|_| Error::Checksum { side, table: name.to_string(), value: sum.clone() })?;
        out.insert(r.get(0), (r.get(1), sum));
    }
    Ok(Some(out))
}

impl<'a> Lanes<'a> {
    fn new(plan: &'a Plan, board: Board<'a>, queries: &'a [Queries<'a>], shutdown: &'a Shutdown) -> Self {
        Lanes {
            plan,
            board,
            queries,
            shapes: Default::default(),
            busy: Default::default(),
            checked: AtomicI32::new(0),
            dropped: AtomicBool::new(false),
            sessions: None,
            shutdown,
        }
    }

    /// Records `c`, a session on `side`, under a joined worker's lease; its entry goes to
    /// `entries`.
    async fn under_lease(&self, side: &str, c: &Client, entries: &mut Vec<String>) -> Result<()> {
        if let Some(s) = &self.sessions {
            entries.push(s.add(side, c).await?);
        }
        Ok(())
    }

    /// Runs every lane to the end.
    async fn run(&self) -> Result<()> {
        futures_util::future::try_join_all((0..LANES).map(|_| self.lane())).await?;
        Ok(())
    }

    /// [`Lanes::run`], listed in `workers` (with its parts in hand) for `status` while it runs,
    /// and as a joined worker's lease: the leader ends the sessions of one silent for
    /// `[copy] worker_lease`, and one that finds its lease expired stops.
    async fn run_reported(&self, role: &'static str) -> Result<()> {
        let Board::Shared { state, worker, .. } = &self.board else { return self.run().await };
        let lease = self.plan.copy.worker_lease;
        let joined = role == JOINED;
        let green = self.plan.green.connect().await?;
        // Recorded before its lanes' sessions are (under its lease); a joined worker that
        // cannot be recorded cannot be leased, and does not read. The leader's record is for
        // people: without it the check goes on.
        match state.worker_seen(&green, worker, role, &[], 0).await {
            Ok(true) => {}
            Ok(false) if joined => return Err(Error::LeaseExpired { worker: worker.clone(), lease }),
            Err(e) if joined => return Err(e),
            Ok(false) | Err(_) => tracing::debug!("green: verify leader not recorded"),
        }
        let beat = async {
            let held = || {
                let busy = self.busy.lock().map(|b| b.iter().cloned().collect()).unwrap_or_default();
                (busy, self.checked.load(Ordering::Relaxed))
            };
            state.beat(&self.plan.green, worker, role, joined.then_some(lease), held).await;
            Err(Error::LeaseExpired { worker: worker.clone(), lease })
        };
        // The leader watches its joined workers' leases while its parts are read.
        let watch = async {
            if joined {
                std::future::pending::<()>().await;
            }
            Leases::new(JOINED, lease).watch((*state).clone(), self.plan.green.clone(), self.plan.blue.clone()).await;
        };
        let mut result = tokio::select! {
            r = self.run() => r,
            r = beat => r,
            () = watch => Err(Error::Internal("the lease watch ended")),
        };
        // An expired worker's record stays, for `status`.
        if matches!(result, Err(Error::LeaseExpired { .. })) {
            return result;
        }
        let green = if green.is_closed() { self.plan.green.connect().await.ok() } else { Some(green) };
        // Stopped by Ctrl-C, its sessions were closed as they should be.
        let failed = result.is_err() && !matches!(result, Err(Error::Interrupted { .. }));
        match &green {
            // Its sessions may have been ended under it: what they failed with says less than
            // this.
            Some(g) if joined && state.worker_parting(g, worker, failed).await => {
                result = Err(Error::LeaseExpired { worker: worker.clone(), lease });
            }
            Some(_) if joined => {}
            Some(g) => {
                let _ = state.worker_gone(g, worker).await;
            }
            None => {}
        }
        result
    }

    /// One lane: a blue and a green session reading parts until none is left (and, with
    /// state, a green session holding the claim meanwhile).
    async fn lane(&self) -> Result<()> {
        let mut entries = Vec::new();
        let done = self.lane_sessions(&mut entries).await;
        // Closed cleanly, they come off the worker's record: behind a session pooler their
        // server processes may serve someone else next.
        if let (Ok(()), Some(s)) = (&done, &self.sessions) {
            for entry in &entries {
                s.remove(entry).await;
            }
        }
        done
    }

    /// [`Lanes::lane`] on sessions of its own, each recorded in `entries` under a joined
    /// worker's lease (and closed when this returns).
    async fn lane_sessions(&self, entries: &mut Vec<String>) -> Result<()> {
        let (blue, green) = tokio::try_join!(self.plan.blue.connect(), self.plan.green.connect())?;
        self.under_lease("blue", &blue, entries).await?;
        self.under_lease("green", &green, entries).await?;
        session(&blue).await.map_err(Error::db("blue: verify session"))?;
        session(&green).await.map_err(Error::db("green: verify session"))?;
        match &self.board {
            Board::Local { queue, sums, seconds } => loop {
                self.stop_if_asked()?;
                let Some(part) = queue.lock().ok().and_then(|mut q| q.pop_front()) else { return Ok(()) };
                let q = self.queries_of(&part.table)?;
                let started = Instant::now();
                let summary = summarise(q, &part, &blue, &green).await?.ok_or_else(lost_snapshot)?;
                if let Ok(mut sums) = sums.lock() {
                    let into = sums.entry((part.table.clone(), part.side)).or_default();
                    for (b, (c, s)) in summary {
                        let e = into.entry(b).or_default();
                        (e.0, e.1) = (e.0 + c, e.1 + s);
                    }
                }
                if let Ok(mut seconds) = seconds.lock() {
                    *seconds.entry(part.table.clone()).or_default() += started.elapsed().as_secs_f64();
                }
            },
            Board::Shared { state, run, worker } => {
                self.shared_lane((&blue, &green), state, run.as_deref(), worker, entries).await
            }
        }
    }

    /// [`Lanes::lane`] on green's `verify_parts`: claim, read, store, commit.
    async fn shared_lane(
        &self,
        (blue, green): (&Client, &Client),
        state: &State,
        run: Option<&str>,
        worker: &str,
        entries: &mut Vec<String>,
    ) -> Result<()> {
        let mut claims = self.plan.green.connect().await?;
        self.under_lease("green", &claims, entries).await?;
        session(&claims).await.map_err(Error::db("green: verify session"))?;
        let mut said = Instant::now();
        loop {
            self.stop_if_asked()?;
            let tx = claims.transaction().await.map_err(Error::db("green: begin"))?;
            let Some(claim) = state.claim_verify_part(&tx, run).await? else {
                drop(tx);
                // Parts left are in other sessions' hands (here or on other machines) and
                // come free if those die.
                if state.verify_parts_left(&claims, run).await? == 0 {
                    return Ok(());
                }
                if said.elapsed() >= Duration::from_secs(30) {
                    info!("every verify part left is held by another worker; waiting for them");
                    said = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let p = &claim.part;
            let q = self.queries_of(&p.table)?;
            if self.shape_of(&tx, q, p.buckets).await? != p.shape {
                return Err(Error::Usage(format!(
                    "verify of {}: this process's plan differs from the leader's (its query for the table is not \
                     the leader's); run the same plan file with the same `migrate`",
                    q.t.target
                )));
            }
            let name = format!("{}:{}:{}", p.table, p.side, p.number);
            self.busy.lock().map(|mut b| b.insert(name.clone())).ok();
            let started = Instant::now();
            let summary = summarise(q, p, blue, green).await;
            crate::fault::point("verify.part-read").await;
            self.busy.lock().map(|mut b| b.remove(&name)).ok();
            match summary? {
                Some(s) => state.verify_part_done(&tx, &claim, worker, &s, started.elapsed().as_secs_f64()).await?,
                // A joined worker met a run whose leader is gone: nobody will finish it.
                None if run.is_none() => {
                    drop(tx);
                    tracing::warn!(run = %claim.run, "a verify run whose leader is gone; its parts are dropped");
                    state.abandon_verify_run(&claims, &claim.run).await?;
                    self.dropped.store(true, Ordering::Relaxed);
                    continue;
                }
                None => return Err(lost_snapshot()),
            }
            tx.commit().await.map_err(Error::db("green: storing a verify part"))?;
            self.checked.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(part = %name, seconds = started.elapsed().as_secs_f64(), "verify part read");
        }
    }

    fn stop_if_asked(&self) -> Result<()> {
        if self.shutdown.is_triggered() {
            return Err(Error::Interrupted { during: "while reading verify parts".into() });
        }
        Ok(())
    }

    fn queries_of(&self, id: &str) -> Result<&Queries<'a>> {
        self.queries.iter().find(|q| q.t.id.as_str() == id).ok_or_else(|| {
            Error::Usage(format!(
                "the verify being joined reads entry {id}, which this plan file does not have; join with the leader's plan"
            ))
        })
    }

    async fn shape_of(&self, green: &impl GenericClient, q: &Queries<'_>, n: i64) -> Result<String> {
        let key = (q.t.id.as_str().to_string(), n);
        let mut shapes = self.shapes.lock().await;
        if let Some(s) = shapes.get(&key) {
            return Ok(s.clone());
        }
        let s = shape(green, q, n).await?;
        shapes.insert(key, s.clone());
        Ok(s)
    }
}

/// A part's snapshot could not be imported: the transaction that exported it ended.
fn lost_snapshot() -> Error {
    Error::Interrupted { during: "verify: the run's snapshot ended with its leader's session".into() }
}
