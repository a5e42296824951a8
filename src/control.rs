//! Live control of a running `copy` (and its follower): pause and resume, a rows-per-second
//! throttle for the copy, and a postponed cutover, set by `migrate control` and stored on green
//! (`migration.control`), so that whoever can reach green can steer, from any machine; and
//! throttling of the copy on blue's health (`[copy] max_blue_active_sessions`,
//! `max_blue_replica_lag`, `max_blue_commit_latency`). A refresher reads both every second.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio_postgres::{error::SqlState, CancelToken, Client};

use crate::{
    error::{Error, Result},
    plan::Plan,
    shutdown::{AbortOnDrop, Shutdown},
    state::{Control, State},
};

/// How often the control row and blue's health are read.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The control in force in this process, refreshed from green.
#[derive(Default)]
pub struct Live {
    paused: AtomicBool,
    rate: AtomicU64,
    /// Why blue's health holds the copy, if it does.
    held: Mutex<Option<String>>,
}

impl Live {
    /// Whether the follower's capture waits (apply goes on with the keys already captured).
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// The copy rate in force: `migrate control throttle`'s, else the plan's (`plan_rate`, 0 =
    /// unlimited).
    pub fn rate(&self, plan_rate: u64) -> u64 {
        match self.rate.load(Ordering::Relaxed) {
            0 => plan_rate,
            r => r,
        }
    }

    /// Why a copy worker must wait now: paused, or blue's health.
    pub fn copy_hold(&self) -> Option<String> {
        if self.paused() {
            return Some("paused by `migrate control PLAN pause`".into());
        }
        self.held.lock().ok().and_then(|h| h.clone())
    }

    /// Waits while the copy is held, logging each new reason once. Returns early on `stop`.
    pub async fn wait_copy(&self, stop: &Shutdown) {
        let mut said: Option<String> = None;
        while let Some(why) = self.copy_hold() {
            if stop.is_triggered() {
                return;
            }
            if said.as_deref() != Some(why.as_str()) {
                tracing::info!("copy waits: {why}");
                said = Some(why);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if said.is_some() {
            tracing::info!("copy goes on");
        }
    }

    /// Puts `c` in force in this process.
    pub(crate) fn set(&self, c: &Control) {
        self.paused.store(c.paused, Ordering::Relaxed);
        self.rate.store(c.rows_per_second, Ordering::Relaxed);
    }
}

/// A health check that does not answer within this holds the copy (a commit waiting on a
/// synchronous standby that is gone answers never).
const HEALTH_WAIT: Duration = Duration::from_secs(5);

/// The refresher's tasks (see [`start`]); dropping it ends them.
pub struct Refresher {
    live: Arc<Live>,
    _control: AbortOnDrop,
    health: Option<AbortOnDrop>,
    commits: Option<Arc<CommitTimer>>,
}

impl Refresher {
    /// Ends the health checks, which hold only the copy: once it is done, blue is asked nothing
    /// more (no timing commit, no load query) while the follower runs.
    pub fn copy_done(&mut self) {
        self.health = None;
        if let Some(timer) = self.commits.take() {
            timer.stop();
        }
        if let Ok(mut h) = self.live.held.lock() {
            *h = None;
        }
    }
}

impl Drop for Refresher {
    fn drop(&mut self) {
        if let Some(timer) = &self.commits {
            timer.stop();
        }
    }
}

/// Reads the control row and blue's health once (a copy restarted while paused, or while blue
/// is busy, must not copy a chunk first), then starts the refresher: every [`REFRESH`] it reads
/// the control row from green and, in a task of its own (a stuck check must not stop the
/// control), blue's health when the plan sets limits.
pub async fn start(plan: &Plan, live: Arc<Live>) -> Refresher {
    if let Ok(green) = plan.green.connect().await {
        if let Ok(c) = State::new(&plan.name).control(&green).await {
            live.set(&c);
        }
    }
    let mut commits = None;
    let health = match health_limits(plan) {
        true => {
            let mut health = Health::new(plan);
            commits = health.commits.clone();
            if let Some(timer) = &health.commits {
                timer.first(HEALTH_WAIT).await;
            }
            health.check(plan, &live).await;
            let (plan, live) = (plan.clone(), Arc::clone(&live));
            Some(AbortOnDrop(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(REFRESH).await;
                    health.check(&plan, &live).await;
                }
            })))
        }
        false => None,
    };
    let control = AbortOnDrop(read_control(plan.clone(), Arc::clone(&live)));
    Refresher { live, _control: control, health, commits }
}

fn health_limits(plan: &Plan) -> bool {
    plan.copy.limits_blue_load() || plan.copy.times_blue_commits()
}

/// What the health checks keep between rounds.
struct Health {
    /// The session that reads blue's load (`None` without session or lag limits; dropped after
    /// a failure so that the next check starts clean).
    blue: Option<Client>,
    /// Times blue's commits, with `max_blue_commit_latency` (the refresher holds it too).
    commits: Option<Arc<CommitTimer>>,
}

impl Health {
    fn new(plan: &Plan) -> Self {
        let commits = plan.copy.times_blue_commits().then(|| Arc::new(CommitTimer::start(plan)));
        Self { blue: None, commits }
    }

    /// One health check. A check that fails or does not answer holds the copy, and says why.
    async fn check(&mut self, plan: &Plan, live: &Live) {
        let mut why = None;
        if plan.copy.limits_blue_load() {
            if self.blue.as_ref().is_none_or(Client::is_closed) {
                self.blue = plan.blue.connect().await.ok();
            }
            why = match self.blue.as_ref() {
                None => Some("blue does not answer the health check".to_string()),
                Some(b) => match tokio::time::timeout(HEALTH_WAIT, blue_load(plan, b)).await {
                    Ok(Ok(why)) => why,
                    Ok(Err(e)) => {
                        self.blue = None;
                        Some(format!("blue's health check failed: {e}"))
                    }
                    Err(_) => {
                        self.blue = None;
                        Some(format!("blue's health check did not answer within {} s", HEALTH_WAIT.as_secs()))
                    }
                },
            };
        }
        if why.is_none() {
            why = self.commits.as_ref().and_then(|c| c.judge(plan.copy.max_blue_commit_latency));
        }
        if let Ok(mut h) = live.held.lock() {
            *h = why;
        }
    }
}

/// The refresher's control reader (see [`start`]): a failed or unanswered read keeps the last
/// setting in force.
fn read_control(plan: Plan, live: Arc<Live>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let state = State::new(&plan.name);
        let mut green: Option<Client> = None;
        let mut failing = false;
        loop {
            if green.as_ref().is_none_or(Client::is_closed) {
                green = plan.green.connect().await.ok();
            }
            let read = match &green {
                Some(g) => tokio::time::timeout(HEALTH_WAIT, state.control(g)).await.ok().and_then(|r| r.ok()),
                None => None,
            };
            match read {
                Some(c) => {
                    live.set(&c);
                    failing = false;
                }
                None => {
                    // The last control read stays in force; say once that it may be stale.
                    if !failing {
                        tracing::warn!("cannot read `migrate control` from green; the last setting stays in force");
                    }
                    failing = true;
                    green = None;
                }
            }
            tokio::time::sleep(REFRESH).await;
        }
    })
}

/// Why blue is too busy for the copy to go on, by its sessions and its standbys' lag; `None`
/// when it is not.
async fn blue_load(plan: &Plan, blue: &Client) -> Result<Option<String>> {
    let row = blue
        .query_one(
            // Other client sessions running a statement (ours are named `migrate`), and the
            // replay lag of blue's standbys (NULL without pg_monitor rights: not throttled).
            "SELECT (SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE state = 'active' \
                       AND backend_type = 'client backend' AND pid <> pg_backend_pid() \
                       AND application_name NOT LIKE 'migrate%')::int8, \
                    (SELECT extract(epoch FROM max(replay_lag))::float8 FROM pg_catalog.pg_stat_replication)",
            &[],
        )
        .await
        .map_err(Error::db("blue: reading its load"))?;
    let (active, lag): (i64, Option<f64>) = (row.get(0), row.get(1));
    let max_active = plan.copy.max_blue_active_sessions;
    if max_active > 0 && active > max_active as i64 {
        return Ok(Some(format!(
            "{active} active sessions on blue, more than max_blue_active_sessions = {max_active}"
        )));
    }
    let max_lag = plan.copy.max_blue_replica_lag;
    if let Some(l) = lag.filter(|l| !max_lag.is_zero() && *l > max_lag.as_secs_f64()) {
        return Ok(Some(format!(
            "blue's standbys replay {l:.1} s behind, more than max_blue_replica_lag = {} s",
            max_lag.as_secs_f64()
        )));
    }
    Ok(None)
}

/// A commit that writes WAL, and so waits for its flush and for synchronous standbys as the
/// application's commits do: a transactional logical message (pgoutput ignores it unless asked).
/// A commit that only takes an id writes no WAL before its commit record, and PostgreSQL
/// commits it asynchronously.
const COMMIT_PROBE: &str = "BEGIN; SELECT pg_logical_emit_message(true, 'bluegreen', 'commit latency'); COMMIT";

/// The probe when blue refuses the logical message (its `EXECUTE` revoked): a round trip and
/// an id, said once in the log.
const ROUND_TRIP_PROBE: &str = "BEGIN; SELECT txid_current(); COMMIT";

/// Times commits on blue for `max_blue_commit_latency`, one at a time, in a task of its own:
/// a commit waiting on a synchronous standby that is gone waits as long as the standby is gone,
/// and starting another each second would pile up sessions waiting on blue.
struct CommitTimer {
    timing: Arc<Mutex<Timing>>,
    blue: crate::pg::ConnInfo,
    task: AbortOnDrop,
}

#[derive(Default)]
struct Timing {
    /// When the commit in flight started, and how to cancel it, if one is.
    since: Option<(Instant, CancelToken)>,
    /// How long the last commit took, or why it failed; `None` before the first answer.
    last: Option<std::result::Result<Duration, String>>,
    /// Set by [`CommitTimer::stop`]: no commit starts after it.
    stopped: bool,
}

impl CommitTimer {
    fn start(plan: &Plan) -> Self {
        let timing = Arc::new(Mutex::new(Timing::default()));
        let task = AbortOnDrop(tokio::spawn(time_commits(plan.clone(), Arc::clone(&timing))));
        Self { timing, blue: plan.blue.clone(), task }
    }

    /// Waits up to `wait` for the first commit's answer.
    async fn first(&self, wait: Duration) {
        let started = Instant::now();
        while started.elapsed() < wait && self.timing.lock().is_ok_and(|t| t.last.is_none()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Why commits on blue are too slow for `max`; `None` when they are not. The reasons name
    /// no figure: each new reason is logged by every copy worker.
    fn judge(&self, max: Duration) -> Option<String> {
        let t = self.timing.lock().ok()?;
        let max_ms = max.as_secs_f64() * 1000.0;
        if t.since.as_ref().is_some_and(|(s, _)| s.elapsed() > max) {
            return Some(format!(
                "a commit on blue has not answered for longer than max_blue_commit_latency = {max_ms:.1} ms"
            ));
        }
        match &t.last {
            Some(Ok(took)) if *took > max => {
                Some(format!("a commit on blue took longer than max_blue_commit_latency = {max_ms:.1} ms"))
            }
            Some(Err(e)) => Some(format!("cannot time a commit on blue: {e}")),
            _ => None,
        }
    }

    /// Stops timing, and cancels a commit left waiting: on a synchronous standby it outlives
    /// its session (the server notices the client gone only when the wait ends) and holds
    /// blue's horizon. Called where the refresher ends, not left to the task's end: an aborted
    /// task is dropped later, maybe as the process exits, too late to send the request (which
    /// the process waits for, [`crate::pg::cancels_sent`]).
    fn stop(&self) {
        self.task.0.abort();
        let waiting = self.timing.lock().ok().and_then(|mut t| {
            t.stopped = true;
            t.since.take()
        });
        if let (Some((_, token)), Ok(_)) = (waiting, tokio::runtime::Handle::try_current()) {
            self.blue.cancel_later(token);
        }
    }
}

impl Drop for CommitTimer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The timer's loop: a commit, its time kept in `timing`, then a pause of [`REFRESH`]. A commit
/// that waits longer than `[copy] snapshot_max_age` (60 s when 0) is cancelled: it holds blue's
/// horizon as a snapshot does. PostgreSQL then ends the wait with a warning (the commit stays,
/// local only) and the next one starts.
async fn time_commits(plan: Plan, timing: Arc<Mutex<Timing>>) {
    let set = |f: &mut dyn FnMut(&mut Timing)| {
        if let Ok(mut t) = timing.lock() {
            f(&mut t)
        }
    };
    let bound = match plan.copy.snapshot_max_age {
        a if a.is_zero() => crate::plan::DEFAULT_SNAPSHOT_MAX_AGE,
        a => a,
    };
    let mut blue: Option<Client> = None;
    let mut probe = COMMIT_PROBE;
    loop {
        if blue.as_ref().is_none_or(Client::is_closed) {
            blue = match plan.blue.connect().await {
                Ok(b) => Some(b),
                Err(e) => {
                    let e = e.to_string();
                    set(&mut |t| t.last = Some(Err(e.clone())));
                    None
                }
            };
        }
        let (mut pause, mut drop_session) = (REFRESH, false);
        if let Some(b) = &blue {
            let started = Instant::now();
            let mut stopped = false;
            set(&mut |t| match t.stopped {
                true => stopped = true,
                false => t.since = Some((started, b.cancel_token())),
            });
            if stopped {
                return;
            }
            let commit = b.batch_execute(probe);
            tokio::pin!(commit);
            let (answer, cancelled) = match tokio::time::timeout(bound, &mut commit).await {
                Ok(answer) => (Some(answer), false),
                Err(_) => {
                    tracing::info!("a commit on blue has waited {bound:?} ([copy] snapshot_max_age); cancelling it");
                    plan.blue.cancel(&b.cancel_token()).await;
                    (tokio::time::timeout(HEALTH_WAIT, &mut commit).await.ok(), true)
                }
            };
            let took = started.elapsed();
            tracing::debug!(took_ms = took.as_secs_f64() * 1000.0, "a commit on blue, timed");
            match answer {
                // A cancelled wait for a standby answers as a commit; it holds the copy whatever
                // the limit (which may exceed the bound).
                Some(Ok(())) if cancelled => {
                    let e = format!("a commit waited {bound:?} ([copy] snapshot_max_age) and was cancelled");
                    set(&mut |t| (t.since, t.last) = (None, Some(Err(e.clone()))));
                }
                Some(Ok(())) => set(&mut |t| (t.since, t.last) = (None, Some(Ok(took)))),
                Some(Err(e))
                    if probe == COMMIT_PROBE
                        && [SqlState::INSUFFICIENT_PRIVILEGE, SqlState::UNDEFINED_FUNCTION]
                            .iter()
                            .any(|c| e.code() == Some(c)) =>
                {
                    tracing::warn!(
                        error = %crate::error::pg_message(&e),
                        "cannot write a logical message on blue: max_blue_commit_latency times a commit that waits \
                         for neither WAL flush nor synchronous standbys"
                    );
                    let _ = b.batch_execute("ROLLBACK").await;
                    probe = ROUND_TRIP_PROBE;
                    set(&mut |t| t.since = None);
                    continue;
                }
                Some(Err(e)) => {
                    let e = crate::error::pg_message(&e);
                    set(&mut |t| (t.since, t.last) = (None, Some(Err(e.clone()))));
                    drop_session = true;
                    // A blue that refuses every commit (in recovery after a failover) is not
                    // asked each second.
                    pause = HEALTH_WAIT;
                }
                None => {
                    let e = format!("a commit did not answer within {bound:?}, nor its cancel within {HEALTH_WAIT:?}");
                    set(&mut |t| (t.since, t.last) = (None, Some(Err(e.clone()))));
                    drop_session = true;
                }
            }
        }
        if drop_session {
            blue = None;
        }
        tokio::time::sleep(pause).await;
    }
}
