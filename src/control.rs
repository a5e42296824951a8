//! Live control of a running `copy` (and its follower): pause and resume, a rows-per-second
//! throttle for the copy, and a postponed cutover, set by `migrate control` and stored on green
//! (`migration.control`), so that whoever can reach green can steer, from any machine; and
//! throttling of the copy on blue's health (`[copy] max_blue_active_sessions`,
//! `max_blue_replica_lag`). A refresher reads both every second.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio_postgres::Client;

use crate::{
    error::{Error, Result},
    plan::Plan,
    shutdown::Shutdown,
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

/// Reads the control row once (before the copy starts: a copy restarted while paused must not
/// copy a chunk first) and the health once when the plan sets limits.
pub async fn refresh_once(plan: &Plan, live: &Live) {
    if let Ok(green) = plan.green.connect().await {
        if let Ok(c) = State::new(&plan.name).control(&green).await {
            live.set(&c);
        }
    }
    if health_limits(plan) {
        let mut blue = None;
        check_health(plan, live, &mut blue).await;
    }
}

fn health_limits(plan: &Plan) -> bool {
    plan.copy.max_blue_active_sessions > 0
        || !plan.copy.max_blue_replica_lag.is_zero()
        || !plan.copy.max_blue_commit_latency.is_zero()
}

/// One health check on `blue` (connected when needed, dropped after a failure so the next
/// check starts clean). A check that fails or does not answer holds the copy, and says why.
async fn check_health(plan: &Plan, live: &Live, blue: &mut Option<Client>) {
    if blue.as_ref().is_none_or(Client::is_closed) {
        *blue = plan.blue.connect().await.ok();
    }
    let why = match blue.as_ref() {
        None => Some("blue does not answer the health check".to_string()),
        Some(b) => match tokio::time::timeout(HEALTH_WAIT, blue_health(plan, b)).await {
            Ok(Ok(why)) => why,
            Ok(Err(e)) => {
                *blue = None;
                Some(format!("blue's health check failed: {e}"))
            }
            Err(_) => {
                *blue = None;
                Some(format!("blue's health check did not answer within {} s", HEALTH_WAIT.as_secs()))
            }
        },
    };
    if let Ok(mut h) = live.held.lock() {
        *h = why;
    }
}

/// Starts the refresher: every [`REFRESH`] it reads the control row from green and, in a task
/// of its own (a stuck check must not stop the control), blue's health when the plan sets
/// limits. The tasks end with the returned handle's.
pub fn spawn(plan: &Plan, live: Arc<Live>) -> tokio::task::JoinHandle<()> {
    let plan = plan.clone();
    tokio::spawn(async move {
        let health = health_limits(&plan).then(|| {
            let (plan, live) = (plan.clone(), Arc::clone(&live));
            crate::shutdown::AbortOnDrop(tokio::spawn(async move {
                let mut blue = None;
                loop {
                    check_health(&plan, &live, &mut blue).await;
                    tokio::time::sleep(REFRESH).await;
                }
            }))
        });
        let _health = health;
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

/// Why blue is too busy for the copy to go on, by the plan's limits; `None` when it is not.
pub async fn blue_health(plan: &Plan, blue: &Client) -> Result<Option<String>> {
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
    let max_commit = plan.copy.max_blue_commit_latency;
    if !max_commit.is_zero() {
        // A transaction that takes an id commits a WAL record and waits for its flush (and
        // synchronous standbys), as the application's commits do; no table is written.
        let started = std::time::Instant::now();
        // txid_current(): blue may be older than PostgreSQL 13.
        blue.batch_execute("BEGIN; SELECT txid_current(); COMMIT").await.map_err(Error::db("blue: timing a commit"))?;
        let took = started.elapsed();
        if took > max_commit {
            return Ok(Some(format!(
                "a commit on blue took {:.1} ms, more than max_blue_commit_latency = {:.1} ms",
                took.as_secs_f64() * 1000.0,
                max_commit.as_secs_f64() * 1000.0
            )));
        }
    }
    Ok(None)
}
