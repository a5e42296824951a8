//! Verify's summaries in parts. Each side's heap is cut into block ranges; a part's summary is
//! (rows, sum of row hashes) per key bucket, and sums add: parts read by different sessions,
//! processes or machines, at different moments, add up to the table's summary, as one scan's
//! would (verify compares sides that change while it reads anyway, and rechecks what differs).
//!
//! With migration state on green, parts are rows of green's `verify_parts`, claimed with
//! `FOR UPDATE SKIP LOCKED` in the transaction that stores their summary (see
//! [`crate::state::State::claim_verify_part`]): `migrate verify --join` on other machines takes
//! parts beside the leader, and a worker that dies frees its part by dying. Without state the
//! parts are a queue in memory.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::{
        atomic::{AtomicI32, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use tokio_postgres::{Client, GenericClient};
use tracing::info;

pub use crate::state::PartSummary;
use crate::{
    error::{Error, Result},
    plan::{Plan, ResolvedPlan},
    state::{NewPart, State},
};

use super::{no_sort, portable_hash, Queries};

/// Blocks per part (128 MB of heap with 8 kB blocks): big enough that a claim costs nothing
/// against the read, small enough that several machines share a table.
const PART_BLOCKS: i64 = 16_384;
/// Parts a side of a table of at least [`SPLIT_BLOCKS`] is cut into at least, so a smaller
/// table still spreads over a machine's sessions.
const MIN_PARTS: i64 = 4;
const SPLIT_BLOCKS: i64 = 64;
/// Sessions (each a blue and a green connection) reading parts in one process: blue's part runs
/// the transform, green's the plain read; three keep both servers busy.
const LANES: usize = 3;

/// Summed summaries by (entry id, side).
pub type Summaries = HashMap<(String, &'static str), PartSummary>;

/// Where parts come from and where their summaries go.
enum Board<'a> {
    /// Green's `verify_parts`: the leader's run (`Some`) or any run (a joined worker).
    Shared { state: &'a State, run: Option<String>, worker: String },
    /// One process, no state: a queue in memory.
    Local { queue: Mutex<VecDeque<NewPart>>, sums: &'a Mutex<Summaries> },
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
}

/// The leader: plans the parts of `tables`, reads them with its lanes (beside any joined
/// workers), and returns each side's summed summary.
pub(super) async fn lead(
    plan: &Plan,
    state: Option<&State>,
    blue: &Client,
    green: &Client,
    tables: &[Queries<'_>],
) -> Result<Summaries> {
    let mut planned = Vec::new();
    for q in tables {
        planned.extend(plan_table(blue, green, q).await?);
    }
    let Some(state) = state else {
        let sums = Mutex::default();
        Lanes::new(plan, Board::Local { queue: Mutex::new(planned.into()), sums: &sums }, tables).run().await?;
        return Ok(sums.into_inner().unwrap_or_default());
    };
    state.begin_verify_run(green).await?;
    let run = crate::state::worker_id();
    let result = async {
        state.plan_verify_parts(green, &run, &planned).await?;
        let board = Board::Shared { state, run: Some(run.clone()), worker: run.clone() };
        Lanes::new(plan, board, tables).run_reported("verify leader").await?;
        let mut sums = Summaries::new();
        for q in tables {
            for side in ["blue", "green"] {
                let id = q.t.id.as_str().to_string();
                sums.insert((id.clone(), side), state.verify_summary(green, &run, &id, side).await?);
            }
        }
        Ok(sums)
    }
    .await;
    state.end_verify_run(green).await;
    result
}

/// `migrate verify --join`: waits for a leader's run, reads parts of it until none is left, and
/// returns how many this process read.
pub async fn join(plan: &Plan, resolved: &ResolvedPlan, shutdown: &crate::shutdown::Shutdown) -> Result<i32> {
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
    let board = Board::Shared { state: &state, run: None, worker: crate::state::worker_id() };
    let lanes = Lanes::new(plan, board, &queries);
    lanes.run_reported("verify joined").await?;
    Ok(lanes.checked.load(Ordering::Relaxed))
}

/// The parts of one table: each side's heap in ranges of [`PART_BLOCKS`], the last open-ended
/// (rows in blocks added since are read too).
async fn plan_table(blue: &Client, green: &Client, q: &Queries<'_>) -> Result<Vec<NewPart>> {
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
    };
    let text = format!("{}\n{}", part_sql(q, &whole("blue")), part_sql(q, &whole("green")));
    Ok(green.query_one("SELECT md5($1)", &[&text]).await.map_err(Error::db("green: fingerprinting verify"))?.get(0))
}

/// One part's summary, read on its side.
async fn summarise(q: &Queries<'_>, part: &NewPart, blue: &Client, green: &impl GenericClient) -> Result<PartSummary> {
    let sql = part_sql(q, part);
    let rows = if part.side == "blue" {
        blue.query(&sql, &[]).await.map_err(Error::db(format!("blue: checksumming {}", q.t.source)))?
    } else {
        green.query(&sql, &[]).await.map_err(Error::db(format!("green: checksumming {}", q.t.target)))?
    };
    let mut out = PartSummary::new();
    for r in &rows {
        let sum: String = r.get(2);
        out.insert(r.get(0), (r.get(1), sum.parse::<i128>().unwrap_or_default()));
    }
    Ok(out)
}

impl<'a> Lanes<'a> {
    fn new(plan: &'a Plan, board: Board<'a>, queries: &'a [Queries<'a>]) -> Self {
        Lanes { plan, board, queries, shapes: Default::default(), busy: Default::default(), checked: AtomicI32::new(0) }
    }

    /// Runs every lane to the end.
    async fn run(&self) -> Result<()> {
        futures_util::future::try_join_all((0..LANES).map(|_| self.lane())).await?;
        Ok(())
    }

    /// [`Lanes::run`], listed in `workers` (with its parts in hand) for `status` while it runs.
    async fn run_reported(&self, role: &str) -> Result<()> {
        let Board::Shared { state, worker, .. } = &self.board else { return self.run().await };
        let beat = async {
            let Ok(green) = self.plan.green.connect().await else { return std::future::pending().await };
            loop {
                let busy: Vec<String> = self.busy.lock().map(|b| b.iter().cloned().collect()).unwrap_or_default();
                let checked = self.checked.load(Ordering::Relaxed);
                // The list is for people; a state without it (written by an older `migrate`) or a
                // failed write does not stop the check.
                if let Err(e) = state.worker_seen(&green, worker, role, &busy, checked).await {
                    tracing::debug!(error = %e, "green: verify heartbeat not recorded");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        let result = tokio::select! {
            r = self.run() => r,
            never = beat => never,
        };
        if let Ok(green) = self.plan.green.connect().await {
            let _ = state.worker_gone(&green, worker).await;
        }
        result
    }

    /// One lane: a blue and a green session reading parts until none is left.
    async fn lane(&self) -> Result<()> {
        let (blue, mut green) = tokio::try_join!(self.plan.blue.connect(), self.plan.green.connect())?;
        no_sort(&blue).await.map_err(Error::db("blue: verify session"))?;
        no_sort(&green).await.map_err(Error::db("green: verify session"))?;
        let mut said = Instant::now();
        loop {
            match &self.board {
                Board::Local { queue, sums } => {
                    let Some(part) = queue.lock().ok().and_then(|mut q| q.pop_front()) else { return Ok(()) };
                    let summary = summarise(self.queries_of(&part.table)?, &part, &blue, &green).await?;
                    if let Ok(mut sums) = sums.lock() {
                        let into = sums.entry((part.table.clone(), part.side)).or_default();
                        for (b, (c, s)) in summary {
                            let e = into.entry(b).or_default();
                            (e.0, e.1) = (e.0 + c, e.1 + s);
                        }
                    }
                }
                Board::Shared { state, run, worker } => {
                    let tx = green.transaction().await.map_err(Error::db("green: begin"))?;
                    let Some(claim) = state.claim_verify_part(&tx, run.as_deref()).await? else {
                        drop(tx);
                        // Parts left are in other sessions' hands (here or on other machines)
                        // and come free if those die.
                        if state.verify_parts_left(&green, run.as_deref()).await? == 0 {
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
                            "verify of {}: this process's plan or servers differ from the leader's (its query for the \
                             table is not the leader's); run the same plan file with the same `migrate`",
                            q.t.target
                        )));
                    }
                    let name = format!("{}:{}:{}", p.table, p.side, p.number);
                    self.busy.lock().map(|mut b| b.insert(name.clone())).ok();
                    let started = Instant::now();
                    let summary = summarise(q, p, &blue, &tx).await;
                    crate::fault::point("verify.part-read").await;
                    let stored = match summary {
                        Ok(s) => state.verify_part_done(&tx, &claim, worker, &s, started.elapsed().as_secs_f64()).await,
                        Err(e) => Err(e),
                    };
                    self.busy.lock().map(|mut b| b.remove(&name)).ok();
                    stored?;
                    tx.commit().await.map_err(Error::db("green: storing a verify part"))?;
                    self.checked.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(part = %name, seconds = started.elapsed().as_secs_f64(), "verify part read");
                }
            }
        }
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
