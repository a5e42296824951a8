//! Copy workers on several machines: each `migrate copy` (the leader) and `migrate copy --join`
//! (a joined worker) claims chunks from green's `chunks` table. A claim is a row lock taken with
//! `FOR UPDATE SKIP LOCKED` in the very transaction that writes the chunk's rows and marks it
//! done: a worker that dies (killed, host lost, connection cut) rolls back its rows and frees
//! its claim in one step, when green ends its session, and another worker copies the chunk.
//! PostgreSQL is the coordinator; nothing is copied twice into the committed result.
//!
//! `workers` lists each process with a heartbeat and the chunks it holds, for `status`.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::{Client, GenericClient};

use super::{State, TableId};
use crate::{
    error::{Error, Result},
    pg::ConnInfo,
};

/// A chunk claimed in an open green transaction.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The entry.
    pub table: TableId,
    /// Chunk number.
    pub number: i32,
    /// First heap block (inclusive).
    pub first_block: Option<i64>,
    /// End heap block (exclusive).
    pub end_block: Option<i64>,
    /// The leaf partition read, for a partitioned source.
    pub part: Option<String>,
}

/// A copy process, as `status` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerRecord {
    /// Unique per process: `host:pid:start`.
    pub id: String,
    /// `leader` or `joined`.
    pub role: String,
    /// Host name.
    pub host: String,
    /// Chunks it is copying now (`entry:chunk`).
    pub chunks: Vec<String>,
    /// Chunks it has copied.
    pub copied: i32,
    /// Seconds since its last heartbeat.
    pub seen_ago: f64,
    /// Its lease expired: the leader ended its sessions (see [`Leases`]).
    pub expired: bool,
}

/// A joined worker whose lease the leader ended.
#[derive(Debug, Clone)]
struct Expired {
    /// Its id (`host:pid:start`).
    pub id: String,
    /// Chunks it held when last seen.
    pub chunks: Vec<String>,
    /// Its recorded sessions (`green:…`, `blue:…`; see [`session_tag`]).
    pub sessions: Vec<String>,
    /// Seconds from its last heartbeat to the mark: under a lease when it marked itself.
    pub silent: f64,
}

impl State {
    /// Claims the next chunk not done of the entries in `tables` whose copy is loading, skipping
    /// chunks other transactions hold; in `tx`, which then writes its rows. Chunk number first,
    /// larger tables first within a number: small tables finish early, big ones keep every
    /// worker busy to the end.
    pub async fn claim_chunk(&self, tx: &impl GenericClient, tables: &[&str]) -> Result<Option<Claim>> {
        let row = tx
            .query_opt(
                &format!(
                    "SELECT c.tbl, c.chunk, c.first_block, c.end_block, c.part FROM {c} c JOIN {t} t USING (tbl) \
                     WHERE NOT c.done AND t.state = 'loading' AND c.tbl = ANY($1) \
                     ORDER BY c.chunk, t.rows_estimated DESC, c.tbl LIMIT 1 FOR UPDATE OF c SKIP LOCKED",
                    c = self.table("chunks"),
                    t = self.table("tables")
                ),
                &[&tables],
            )
            .await
            .map_err(Error::db("green: claiming a chunk"))?;
        Ok(row.map(|r| Claim {
            table: TableId::from_stored(r.get(0)),
            number: r.get(1),
            first_block: r.get(2),
            end_block: r.get(3),
            part: r.get(4),
        }))
    }

    /// Claims, in `tx` beside `first`, the chunks that follow it in the same heap (up to
    /// `more`), not done and not held by another transaction, and returns the unbroken run
    /// directly after `first`: one block range with it.
    pub async fn claim_following(&self, tx: &impl GenericClient, first: &Claim, more: i32) -> Result<Vec<Claim>> {
        const FAILED: &str = "green: claiming the chunks that follow one";
        if more <= 0 {
            return Ok(Vec::new());
        }
        // Locks taken after a savepoint end when it is rolled back to: chunks past a gap
        // (another worker holds the one before them) are let go at once, not held unread for
        // the whole claim.
        tx.batch_execute("SAVEPOINT bluegreen_following").await.map_err(Error::db(FAILED))?;
        let (run, locked) = self.lock_run(tx, first, more).await.map_err(Error::db(FAILED))?;
        if locked == run.len() {
            return Ok(run);
        }
        tx.batch_execute("ROLLBACK TO SAVEPOINT bluegreen_following").await.map_err(Error::db(FAILED))?;
        // Another worker may take one of them in between: then the rest stay locked, unread,
        // until this claim ends (another worker copies them after).
        Ok(self.lock_run(tx, first, run.len() as i32).await.map_err(Error::db(FAILED))?.0)
    }

    /// Locks the chunks not done among the `more` after `first`, skipping those another
    /// transaction holds: the unbroken run directly after `first`, and how many it locked.
    async fn lock_run(
        &self,
        tx: &impl GenericClient,
        first: &Claim,
        more: i32,
    ) -> std::result::Result<(Vec<Claim>, usize), tokio_postgres::Error> {
        if more <= 0 {
            return Ok((Vec::new(), 0));
        }
        let rows = tx
            .query(
                &format!(
                    "SELECT chunk, first_block, end_block, part FROM {} \
                     WHERE tbl = $1 AND chunk > $2 AND chunk <= $2 + $3 AND NOT done AND part IS NOT DISTINCT FROM $4 \
                     ORDER BY chunk FOR UPDATE SKIP LOCKED",
                    self.table("chunks")
                ),
                &[&first.table.as_str(), &first.number, &more, &first.part],
            )
            .await?;
        let mut run: Vec<Claim> = Vec::new();
        for r in &rows {
            let number: i32 = r.get(0);
            let first_block: Option<i64> = r.get(1);
            let last = run.last().unwrap_or(first);
            if number != last.number + 1 || first_block != last.end_block {
                break;
            }
            run.push(Claim { table: first.table.clone(), number, first_block, end_block: r.get(2), part: r.get(3) });
        }
        Ok((run, rows.len()))
    }

    /// Whether green's state has the columns a leader of this version adds (`chunks.copied_with`,
    /// `workers.expired_at`): a joined worker newer than its leader would fail on every chunk it
    /// copies, and could not hold a lease.
    pub async fn chunks_current(&self, green: &impl GenericClient) -> Result<bool> {
        Ok(green
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute \
                  WHERE attrelid = to_regclass($1) AND attname = 'copied_with' AND NOT attisdropped) \
                  AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute \
                  WHERE attrelid = to_regclass($2) AND attname = 'expired_at' AND NOT attisdropped)",
                &[&self.table("chunks"), &self.table("workers")],
            )
            .await
            .map_err(Error::db("green: reading the state layout"))?
            .get(0))
    }

    /// Entries among `tables` still loading with every chunk done: their indexes are next.
    pub async fn loaded(&self, green: &impl GenericClient, tables: &[&str]) -> Result<Vec<String>> {
        Ok(green
            .query(
                &format!(
                    "SELECT t.tbl FROM {t} t WHERE t.tbl = ANY($1) AND t.state IN ('loading', 'indexing') \
                       AND NOT EXISTS (SELECT 1 FROM {c} c WHERE c.tbl = t.tbl AND NOT c.done)",
                    c = self.table("chunks"),
                    t = self.table("tables")
                ),
                &[&tables],
            )
            .await
            .map_err(Error::db("green: reading finished tables"))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Chunks not done of entries whose copy is loading (claimed or not).
    pub async fn chunks_left(&self, green: &impl GenericClient) -> Result<i64> {
        Ok(green
            .query_one(
                &format!(
                    "SELECT count(*) FROM {c} c JOIN {t} t USING (tbl) WHERE NOT c.done AND t.state = 'loading'",
                    c = self.table("chunks"),
                    t = self.table("tables")
                ),
                &[],
            )
            .await
            .map_err(Error::db("green: counting chunks left"))?
            .get(0))
    }

    /// Whether a chunk of `id` was copied by a worker other than `worker`: under a snapshot of
    /// its own, so the table was read under several.
    pub async fn copied_by_others(&self, green: &impl GenericClient, id: &TableId, worker: &str) -> Result<bool> {
        Ok(green
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {} WHERE tbl = $1 AND done AND worker IS DISTINCT FROM $2)",
                    self.table("chunks")
                ),
                &[&id.as_str(), &worker],
            )
            .await
            .map_err(Error::db(format!("green: reading who copied {id}")))?
            .get(0))
    }

    /// Whether every chunk of `id` was read leaving out the rows of transactions at or above
    /// `floor` (see `copy::snapshots`): then none holds a row twice.
    pub async fn chunks_below_floor(&self, green: &impl GenericClient, id: &TableId, floor: i64) -> Result<bool> {
        Ok(green
            .query_one(
                &format!(
                    "SELECT NOT EXISTS (SELECT 1 FROM {} WHERE tbl = $1 AND xid_floor IS DISTINCT FROM $2)",
                    self.table("chunks")
                ),
                &[&id.as_str(), &floor],
            )
            .await
            .map_err(Error::db(format!("green: reading how {id} was read")))?
            .get(0))
    }

    /// Records this process as a copy worker (or refreshes it): its chunks in hand and how many
    /// it has copied. `false` when its lease has expired (the leader ended its sessions): the
    /// record is then left as the leader marked it.
    pub async fn worker_seen(
        &self,
        green: &impl GenericClient,
        id: &str,
        role: &str,
        chunks: &[String],
        copied: i32,
    ) -> Result<bool> {
        let (host, pid) = host_and_pid();
        let refreshed = green
            .execute(
                &format!(
                    "INSERT INTO {} AS w (id, role, host, pid, chunks, copied) VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (id) DO UPDATE SET chunks = EXCLUDED.chunks, copied = EXCLUDED.copied, seen_at = now() \
                     WHERE w.expired_at IS NULL",
                    self.table("workers")
                ),
                &[&id, &role, &host, &pid, &chunks, &copied],
            )
            .await
            .map_err(Error::db("green: recording a copy worker"))?;
        Ok(refreshed == 1)
    }

    /// Refreshes the record of joined worker `id` (recorded before it starts): `false` when its
    /// lease has expired or the record is gone. It never adds one: a refresh that green
    /// commits after the worker removed its record on its way out (the heartbeat is aborted,
    /// not its statement already sent) must not bring it back, for the leader to find later as
    /// an expired lease.
    async fn worker_renewed(
        &self,
        green: &impl GenericClient,
        id: &str,
        chunks: &[String],
        copied: i32,
    ) -> Result<bool> {
        let refreshed = green
            .execute(
                &format!(
                    "UPDATE {} SET chunks = $2, copied = $3, seen_at = now() WHERE id = $1 AND expired_at IS NULL",
                    self.table("workers")
                ),
                &[&id, &chunks, &copied],
            )
            .await
            .map_err(Error::db("green: recording a copy worker"))?;
        Ok(refreshed == 1)
    }

    /// Writes worker `id`'s record every second (a joined worker's, under a `lease`, is only
    /// refreshed: see `worker_renewed`), its hands as `held` says (things in hand, and how many
    /// done), on a session of its own that is opened again when closed, until its
    /// lease is found expired: then returns. A failed write does not stop it (a worker silent
    /// for its lease is cut off by the leader). A worker under a `lease` (joined) gives each
    /// connect and write half the lease, and returns too once it renewed nothing for the lease
    /// and green took no new session at its last try: the leader is ending its sessions, and
    /// one cut off from green would otherwise wait on a dead connection until TCP gives up
    /// (12–15 minutes). A green that takes sessions but stalls their commits (a synchronous
    /// standby gone) stops no one: the leader does not judge then either.
    pub async fn beat(
        &self,
        green_info: &ConnInfo,
        id: &str,
        role: &str,
        lease: Option<Duration>,
        held: impl Fn() -> (Vec<String>, i32),
    ) {
        let mut green: Option<Client> = None;
        let mut renewed = Instant::now();
        // Whether green took a new session at the last try.
        let mut reachable = true;
        // Half a lease: a slow green's commit gets its time, and a dead session is found with
        // time left to renew on a new one. The leader's own record waits as it always did.
        let wait = lease.map(|l| l / 2);
        loop {
            if green.as_ref().is_none_or(|g| g.is_closed()) {
                green = within(wait, green_info.connect()).await.and_then(|c| c.ok());
                reachable = green.is_some();
            }
            if let Some(g) = &green {
                let (hands, done) = held();
                let written = async {
                    match lease {
                        Some(_) => self.worker_renewed(g, id, &hands, done).await,
                        None => self.worker_seen(g, id, role, &hands, done).await,
                    }
                };
                match within(wait, written).await {
                    Some(Ok(true)) => (renewed, reachable) = (Instant::now(), true),
                    Some(Ok(false)) => {
                        tracing::warn!(worker = %id, "this worker's lease expired; stopping");
                        return;
                    }
                    Some(Err(e)) => tracing::debug!(error = %e, role, "green: heartbeat not recorded"),
                    // Unanswered: a dead session, or a green whose commits stall. A new session
                    // tells which. The old one is kept while green answers: its write waits in
                    // line there, and a new one would wait beside it, a backend more each time.
                    None => {
                        reachable = within(wait, green_info.connect()).await.is_some_and(|c| c.is_ok());
                        tracing::debug!(role, reachable, "green: no answer to a heartbeat within {wait:?}");
                        if !reachable {
                            green = None;
                        }
                    }
                }
            }
            if let Some(lease) = lease.filter(|l| renewed.elapsed() >= *l && !reachable) {
                tracing::warn!(
                    worker = %id,
                    silent_s = renewed.elapsed().as_secs(),
                    "this worker could not renew its lease on green for `[copy] worker_lease` ({lease:?}); stopping"
                );
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Adds a session of worker `id` (a [`session_tag`], prefixed with its side) to its record,
    /// before the session claims or reads anything: the leader ends it if the lease expires.
    /// `false` when the lease has expired or the record is gone.
    async fn worker_session(&self, green: &impl GenericClient, id: &str, session: &str) -> Result<bool> {
        let added = green
            .execute(
                &format!(
                    "UPDATE {} SET sessions = array_append(sessions, $2) WHERE id = $1 AND expired_at IS NULL",
                    self.table("workers")
                ),
                &[&id, &session],
            )
            .await
            .map_err(Error::db("green: recording a worker's session"))?;
        Ok(added == 1)
    }

    /// Marks as expired every worker of `role` not seen for `lease` (only with `judge`), and
    /// returns them with those marked before whose sessions were not ended yet (by this leader
    /// or one before it, or by the worker itself on its way out): the caller ends their
    /// sessions. The mark comes first, so one that wakes up cannot renew its record.
    async fn expire_workers(
        &self,
        green: &impl GenericClient,
        role: &str,
        lease: Duration,
        judge: bool,
    ) -> Result<Vec<Expired>> {
        Ok(green
            .query(
                &format!(
                    "UPDATE {} SET expired_at = coalesce(expired_at, now()) \
                     WHERE role = $2 AND ended_at IS NULL \
                       AND (expired_at IS NOT NULL OR ($3 AND seen_at < now() - make_interval(secs => $1))) \
                     RETURNING id, chunks, sessions, extract(epoch FROM expired_at - seen_at)::float8",
                    self.table("workers")
                ),
                &[&lease.as_secs_f64(), &role, &judge],
            )
            .await
            .map_err(Error::db("green: expiring workers' leases"))?
            .iter()
            .map(|r| Expired { id: r.get(0), chunks: r.get(1), sessions: r.get(2), silent: r.get(3) })
            .collect())
    }

    /// Records that worker `id`'s sessions were ended (or cannot be by this role).
    async fn lease_ended(&self, green: &impl GenericClient, id: &str) -> Result<()> {
        green
            .execute(&format!("UPDATE {} SET ended_at = now() WHERE id = $1", self.table("workers")), &[&id])
            .await
            .map_err(Error::db("green: recording an expired worker's sessions ended"))?;
        Ok(())
    }

    /// Whether worker `id`'s lease expired.
    pub async fn worker_expired(&self, green: &impl GenericClient, id: &str) -> Result<bool> {
        Ok(green
            .query_opt(&format!("SELECT expired_at IS NOT NULL FROM {} WHERE id = $1", self.table("workers")), &[&id])
            .await
            .map_err(Error::db("green: reading a copy worker's lease"))?
            .is_some_and(|r| r.get(0)))
    }

    /// Removes this process from the worker list (it exits).
    pub async fn worker_gone(&self, green: &impl GenericClient, id: &str) -> Result<()> {
        green
            .execute(&format!("DELETE FROM {} WHERE id = $1", self.table("workers")), &[&id])
            .await
            .map_err(Error::db("green: removing a copy worker"))?;
        Ok(())
    }

    /// A joined worker's way out, each question to green waited for at most [`PARTING_WAIT`]:
    /// whether its lease had expired (what it failed with then says less than that). If not,
    /// its record is removed after a clean end; after one that `failed` it is marked expired
    /// instead, so that the leader ends any session it left open (one cut off from blue leaves
    /// them there, holding blue's horizon). Unanswered, the record stays for the leader's
    /// watch to expire.
    pub async fn worker_parting(&self, green: &Client, id: &str, failed: bool) -> bool {
        let wait = Some(PARTING_WAIT);
        if !failed {
            let _ = within(wait, self.worker_gone(green, id)).await;
            return false;
        }
        if let Some(Ok(true)) = within(wait, self.worker_expired(green, id)).await {
            return true;
        }
        let mark =
            format!("UPDATE {} SET expired_at = now() WHERE id = $1 AND expired_at IS NULL", self.table("workers"));
        if !matches!(within(wait, green.execute(&mark, &[&id])).await, Some(Ok(_))) {
            tracing::debug!(worker = %id, "green: could not hand this worker's sessions to the leader");
        }
        false
    }

    /// Copy workers seen in the last minute, leader first (none when the table does not exist:
    /// state written before it).
    pub async fn workers(&self, green: &impl GenericClient) -> Result<Vec<WorkerRecord>> {
        let exists: bool = green
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.table("workers")])
            .await
            .map_err(Error::db("green: reading copy workers"))?
            .get(0);
        if !exists {
            return Ok(Vec::new());
        }
        Ok(green
            .query(
                &format!(
                    // `expired_at` through the row's JSON: state an older `migrate` wrote lacks it
                    // until the next `copy` adds it.
                    "SELECT id, role, host, chunks, copied, extract(epoch FROM now() - seen_at)::float8, expired IS NOT NULL \
                     FROM (SELECT w.*, (to_jsonb(w) ->> 'expired_at')::timestamptz AS expired FROM {} w) w \
                     WHERE (seen_at > now() - interval '1 minute' OR expired > now() - interval '10 minutes') \
                       AND role <> '{PROBE_ROLE}' \
                     ORDER BY role = 'leader' DESC, started_at",
                    self.table("workers")
                ),
                &[],
            )
            .await
            .map_err(Error::db("green: reading copy workers"))?
            .iter()
            .map(|r| WorkerRecord {
                id: r.get(0),
                role: r.get(1),
                host: r.get(2),
                chunks: r.get(3),
                copied: r.get(4),
                seen_ago: r.get(5),
                expired: r.get(6),
            })
            .collect())
    }
}

/// A joined worker's record of its own sessions in green's `workers` (`green:tag`, `blue:tag`;
/// see [`session_tag`]), each written before that session reads or claims anything: if the
/// worker's lease expires, the leader ends exactly these.
pub struct Sessions {
    state: State,
    worker: String,
    /// A session of its own on green, opened again if it was closed (`idle_session_timeout`).
    green: tokio::sync::Mutex<Client>,
    green_info: ConnInfo,
    lease: Duration,
    /// A session it closed without its server's answer (one cut off from blue): it stays on
    /// the record, for the leader to end.
    left_open: std::sync::atomic::AtomicBool,
}

impl Sessions {
    /// The book of worker `worker` (its record written already), kept on a session of its own
    /// on green, under the plan's `lease`.
    pub async fn new(state: State, worker: String, green_info: &ConnInfo, lease: Duration) -> Result<Self> {
        let green = tokio::sync::Mutex::new(green_info.connect().await?);
        Ok(Self {
            state,
            worker,
            green,
            green_info: green_info.clone(),
            lease,
            left_open: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Records `c`, a session on `side` (`blue` or `green`), and returns its entry (for
    /// [`Sessions::remove`]). Fails with [`Error::LeaseExpired`] once the lease has ended, or
    /// when the record is gone: a session the leader could not end must not read or claim.
    pub async fn add(&self, side: &str, c: &Client) -> Result<String> {
        let tag = session_tag(c).await.map_err(Error::db(format!("{side}: naming a worker's session")))?;
        let entry = format!("{side}:{tag}");
        let green = self.green().await?;
        if !self.state.worker_session(&*green, &self.worker, &entry).await? {
            return Err(Error::LeaseExpired { worker: self.worker.clone(), lease: self.lease });
        }
        Ok(entry)
    }

    /// Takes a session closed by this worker off its record: behind a session pooler the server
    /// process it names may serve someone else next.
    pub async fn remove(&self, entry: &str) {
        let sql =
            format!("UPDATE {} SET sessions = array_remove(sessions, $2) WHERE id = $1", self.state.table("workers"));
        let removed = match self.green().await {
            Ok(green) => green.execute(&sql, &[&self.worker, &entry]).await.map_err(Error::db("green")),
            Err(e) => Err(e),
        };
        if let Err(e) = removed {
            tracing::debug!(error = %e, "green: taking a closed session off a worker's record");
        }
    }

    /// Notes a session this worker dropped without its server confirming the end (its COMMIT
    /// unanswered): kept on the record, which the worker hands to the leader on its way out.
    pub fn left_open(&self) {
        self.left_open.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a session was dropped without its server confirming the end.
    pub fn any_left_open(&self) -> bool {
        self.left_open.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn green(&self) -> Result<tokio::sync::MutexGuard<'_, Client>> {
        let mut green = self.green.lock().await;
        if green.is_closed() {
            *green = self.green_info.connect().await?;
        }
        Ok(green)
    }
}

/// The leader's side of its joined workers' leases: a joined worker of `role` silent for
/// `lease` (a host frozen or cut off, whose sessions green and blue still keep open, for hours
/// with the servers' TCP keepalive defaults) has its sessions on both servers ended. That rolls
/// back its claim in hand (another worker takes it) and lets go of its snapshots. The leader
/// does so only once its own commits on green have gone through promptly for a whole lease: a
/// green that stalled (or a leader cut off from it) kept the others' heartbeats out too.
pub struct Leases {
    role: &'static str,
    lease: Duration,
    through_since: Instant,
}

/// `fut`'s output, or `None` when it took longer than `wait` (if any).
async fn within<T>(wait: Option<Duration>, fut: impl std::future::Future<Output = T>) -> Option<T> {
    match wait {
        Some(w) => tokio::time::timeout(w, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// How long a joined worker on its way out waits for each answer from green: one cut off from
/// it would otherwise wait until TCP gives up.
const PARTING_WAIT: Duration = Duration::from_secs(5);

/// The role of the lease watch's probe row in `workers` (no worker: `status` leaves it out).
const PROBE_ROLE: &str = "lease watch";

/// A probe commit slower than this counts as a stall of green: the others' heartbeats may have
/// waited as long, so their silence says nothing for a lease after it.
const PROBE_SLOW: Duration = Duration::from_secs(1);
/// Probes failing in a row before the watch says that it cannot judge.
const PROBES_FAILED_WARN: u32 = 30;

impl Leases {
    /// Leases of joined workers of `role`.
    pub fn new(role: &'static str, lease: Duration) -> Self {
        Self { role, lease, through_since: Instant::now() }
    }

    /// Watches the leases until dropped (the caller aborts it): once a second a commit on green
    /// that takes a transaction id (so it waits for the WAL flush and synchronous standbys, as
    /// a heartbeat's does), then ends the leases of workers silent for a lease.
    pub async fn watch(mut self, state: State, green_info: ConnInfo, blue_info: ConnInfo) {
        let mut green: Option<Client> = None;
        let mut failed = 0u32;
        loop {
            if green.as_ref().is_none_or(|g| g.is_closed()) {
                green = green_info.connect().await.ok();
            }
            let started = Instant::now();
            // A row of its own written: a commit that wrote WAL waits for its flush and for
            // synchronous standbys, as a heartbeat's does (one that only took a transaction id
            // writes none, and waits for neither).
            let probe = match &green {
                Some(g) => {
                    state.worker_seen(g, &format!("{PROBE_ROLE}: {}", self.role), PROBE_ROLE, &[], 0).await.map(|_| ())
                }
                None => Err(Error::Internal("no green session")),
            };
            match probe {
                Err(e) => {
                    // A session left in a failed transaction would fail every probe after.
                    green = None;
                    self.through_since = Instant::now();
                    failed += 1;
                    if failed == PROBES_FAILED_WARN {
                        tracing::warn!(error = %e, "green: the joined workers' lease watch cannot commit; no lease ends meanwhile");
                    }
                }
                Ok(()) if started.elapsed() > PROBE_SLOW => {
                    failed = 0;
                    self.through_since = Instant::now();
                }
                Ok(()) => {
                    failed = 0;
                    // Silence is judged only after a lease of prompt commits; a worker that
                    // marked itself on its way out is taken at once.
                    let judge = self.through_since.elapsed() >= self.lease;
                    if let Some(g) = &green {
                        if let Err(e) = self.end_expired(&state, g, &blue_info, judge).await {
                            tracing::warn!(error = %e, "could not end the sessions of a joined worker whose lease expired");
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Marks the workers silent for a lease expired and ends their sessions. A worker whose
    /// sessions could not be ended (a server did not answer) stays marked and unended, and is
    /// tried again next time, by this leader or the next; one the leader may not end
    /// (privileges) is named and left.
    async fn end_expired(&self, state: &State, green: &Client, blue_info: &ConnInfo, judge: bool) -> Result<()> {
        let expired = state.expire_workers(green, self.role, self.lease, judge).await?;
        // Opened only while ending some, and after green's are ended: not one more session on
        // blue for the whole run, and a blue that does not answer keeps no claim on green.
        let mut blue: Option<Client> = None;
        let mut failed = None;
        for worker in expired {
            let on = |side: &str| -> Vec<String> {
                worker.sessions.iter().filter_map(|s| s.strip_prefix(side)).map(str::to_string).collect()
            };
            // Each side apart: one that refuses (privileges) does not keep the other's open.
            let on_green =
                end_side(green, &on("green:")).await.map_err(Error::db("green: ending an expired worker's sessions"));
            let blue_tags = on("blue:");
            if blue.is_none() && !blue_tags.is_empty() {
                match blue_info.connect().await {
                    Ok(b) => blue = Some(b),
                    Err(e) => failed = Some(e.into()),
                }
            }
            let on_blue = match &blue {
                _ if blue_tags.is_empty() => Ok(SideEnd::Ended { ended: 0, unseen: 0 }),
                Some(b) => {
                    end_side(b, &blue_tags).await.map_err(Error::db("blue: ending an expired worker's sessions"))
                }
                None => Err(Error::Internal("blue did not answer")),
            };
            let (on_green, on_blue) = match (on_green, on_blue) {
                (Ok(g), Ok(b)) => (g, b),
                // Marked and not ended: tried again next time, by this leader or the next.
                (Err(e), _) | (_, Err(e)) => {
                    failed.get_or_insert(e);
                    continue;
                }
            };
            let mut ended = [0, 0];
            for (i, (side, end)) in [("green", &on_green), ("blue", &on_blue)].into_iter().enumerate() {
                match end {
                    SideEnd::Ended { ended: n, unseen } => {
                        ended[i] = *n;
                        if *unseen > 0 {
                            tracing::warn!(
                                worker = %worker.id,
                                side,
                                sessions = unseen,
                                "a joined worker's lease expired, but this role cannot see when its sessions began \
                                 (run every worker as one role, or grant pg_read_all_stats and pg_signal_backend): \
                                 what it holds waits for the servers to drop those sessions"
                            );
                        }
                    }
                    SideEnd::Refused(why) => tracing::warn!(
                        worker = %worker.id,
                        side,
                        error = %why,
                        "a joined worker's lease expired, but this role may not end its sessions (run every worker \
                         as one role, or grant pg_signal_backend): what it holds waits for the servers to drop \
                         those sessions"
                    ),
                }
            }
            let why = if worker.silent < self.lease.as_secs_f64() {
                // Marked by itself on its way out after a failure (`State::worker_parting`).
                "a joined worker stopped on an error and handed its record to the leader"
            } else {
                "a joined worker wrote no heartbeat for longer than its lease (`[copy] worker_lease`)"
            };
            tracing::warn!(
                worker = %worker.id,
                silent_seconds = format!("{:.0}", worker.silent),
                holding = %worker.chunks.join(","),
                recorded_sessions = worker.sessions.len(),
                green_sessions_ended = ended[0],
                blue_sessions_ended = ended[1],
                "{why}: its sessions still open were ended, and what it held goes to other workers"
            );
            state.lease_ended(green, &worker.id).await?;
        }
        failed.map_or(Ok(()), Err)
    }
}

/// What ending a worker's sessions on one server did.
enum SideEnd {
    /// Ended `ended`; `unseen` of its processes this role sees without a start time.
    Ended { ended: i64, unseen: i64 },
    /// This role may not end them: the server's message.
    Refused(String),
}

/// Ends, on one server, the sessions among `tags`. An error is one to try again.
async fn end_side(c: &Client, tags: &[String]) -> std::result::Result<SideEnd, tokio_postgres::Error> {
    match end_sessions(c, tags).await {
        Ok(ended) => Ok(SideEnd::Ended { ended, unseen: unseen_sessions(c, tags).await.unwrap_or(0) }),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            Ok(SideEnd::Refused(crate::error::pg_message(&e)))
        }
        Err(e) => Err(e),
    }
}

/// Names the session `c` is: its server process id and start time in microseconds
/// (`pid:start`). A process id alone can be reused by another session once this one ends.
async fn session_tag(c: &impl GenericClient) -> std::result::Result<String, tokio_postgres::Error> {
    Ok(c.query_one(
        &format!("SELECT {SESSION_TAG} FROM pg_catalog.pg_stat_activity a WHERE a.pid = pg_backend_pid()"),
        &[],
    )
    .await?
    .get(0))
}

/// A session's tag in `pg_stat_activity` (alias `a`).
const SESSION_TAG: &str = "format('%s:%s', a.pid, (extract(epoch FROM a.backend_start) * 1000000)::bigint)";

/// Ends the sessions among `tags` ([`session_tag`]s) still open on the server `c` reaches;
/// returns how many it ended. Ending a session of another role needs `pg_signal_backend`.
async fn end_sessions(c: &impl GenericClient, tags: &[String]) -> std::result::Result<i64, tokio_postgres::Error> {
    if tags.is_empty() {
        return Ok(0);
    }
    Ok(c.query_one(
        &format!(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(a.pid)) FROM pg_catalog.pg_stat_activity a \
             WHERE a.pid <> pg_backend_pid() AND {SESSION_TAG} = ANY($1)"
        ),
        &[&tags],
    )
    .await?
    .get(0))
}

/// How many of the server processes `tags` name by pid this role sees without a start time
/// (another role's, without `pg_read_all_stats`): their tags cannot match.
async fn unseen_sessions(c: &impl GenericClient, tags: &[String]) -> std::result::Result<i64, tokio_postgres::Error> {
    let pids: Vec<i32> = tags.iter().filter_map(|t| t.split(':').next()?.parse().ok()).collect();
    if pids.is_empty() {
        return Ok(0);
    }
    Ok(c.query_one(
        "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE pid = ANY($1) AND backend_start IS NULL",
        &[&pids],
    )
    .await?
    .get(0))
}

/// This machine's name and this process's id.
fn host_and_pid() -> (String, i32) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into());
    (host, std::process::id() as i32)
}

/// A worker id unique to this process: `host:pid:unix-ms`.
pub fn worker_id() -> String {
    let (host, pid) = host_and_pid();
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("{host}:{pid}:{ms}")
}
