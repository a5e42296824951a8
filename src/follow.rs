//! Following: the loop that runs capture and apply side by side, during the copy and after it,
//! until a shutdown signal, a finished cutover, or (for `--no-follow`) until green holds
//! everything blue had committed when the copy finished. Lost connections are retried with
//! bounded backoff; capture resumes from the position stored on green.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;
use tracing::{info, warn};

use crate::{
    apply,
    capture::{Capture, Target},
    copy::Shutdown,
    error::{Error, Result},
    plan::{Plan, ResolvedTable},
    state::{Phase, State, TableState},
};

/// How often lag and progress are written to state (for `status`).
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Idle wait between polls when nothing happened.
const IDLE: Duration = Duration::from_millis(100);
/// Reconnect attempts back off up to this delay...
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// ...and give up after this long without a working connection.
const GIVE_UP_AFTER: Duration = Duration::from_secs(300);

/// Why following stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT/SIGTERM: state saved.
    Signal,
    /// A cutover finished: blue is no longer the source.
    Switched,
    /// `--no-follow`: green has what blue had committed when asked.
    CaughtUp,
}

/// The follower: capture plus apply, with their own connections.
pub struct Follower {
    plan: Plan,
    tables: Vec<ResolvedTable>,
    state: State,
    capture: Capture,
    blue: Client,
    green: Client,
    applied: u64,
    started: Instant,
}

impl Follower {
    /// A follower over an already set-up capture.
    pub async fn new(plan: &Plan, tables: &[ResolvedTable], capture: Capture) -> Result<Self> {
        let blue = plan.blue.connect().await?;
        let green = plan.green.connect().await?;
        apply::prepare_green(&green).await?;
        Ok(Self {
            plan: plan.clone(),
            tables: tables.to_vec(),
            state: State::new(&plan.name),
            capture,
            blue,
            green,
            applied: 0,
            started: Instant::now(),
        })
    }

    /// Runs until stopped. `catch_up` turns true when the caller wants to stop once green has
    /// everything blue committed up to that moment.
    pub async fn run(mut self, shutdown: Shutdown, catch_up: watch::Receiver<bool>) -> Result<Stop> {
        let mut target: Option<Target> = None;
        let mut last_report = Instant::now() - REPORT_EVERY;
        let mut failing_since: Option<Instant> = None;
        let mut backoff = Duration::from_millis(250);
        loop {
            if shutdown.is_triggered() {
                self.report().await.ok();
                return Ok(Stop::Signal);
            }
            let wants_catch_up = *catch_up.borrow();
            match self.round(&mut target, &mut last_report, wants_catch_up).await {
                Ok(Some(stop)) => return Ok(stop),
                Ok(None) => {
                    failing_since = None;
                    backoff = Duration::from_millis(250);
                }
                Err(e) if is_transient(&e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > GIVE_UP_AFTER {
                        return Err(e);
                    }
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "following interrupted; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait() => continue,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    if let Err(e) = self.reconnect().await {
                        warn!(error = %e, "reconnect failed");
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One capture poll and one apply batch; `Some` when following should stop.
    async fn round(
        &mut self,
        target: &mut Option<Target>,
        last_report: &mut Instant,
        catch_up: bool,
    ) -> Result<Option<Stop>> {
        let captured = self.capture.poll(&mut self.green, &self.state).await?;
        let ready = self.ready_tables().await?;
        let applied = apply::apply_batch(&self.blue, &mut self.green, &self.state, &self.tables, &ready).await?;
        self.applied += applied as u64;
        if last_report.elapsed() >= REPORT_EVERY {
            *last_report = Instant::now();
            self.report().await?;
            if let Some(Phase::Switched) = self.state.phase(&self.green).await? {
                info!("cutover finished; following stops");
                return Ok(Some(Stop::Switched));
            }
        }
        if catch_up && ready.len() == self.tables.len() {
            let t = match *target {
                Some(t) => t,
                None => {
                    let t = self.capture.target().await?;
                    info!(target = ?t, "catching up to what blue has committed, then stopping");
                    *target = Some(t);
                    t
                }
            };
            if captured == 0 && applied == 0 && self.capture.reached(t).await? && self.pending().await? == 0 {
                self.report().await?;
                return Ok(Some(Stop::CaughtUp));
            }
        }
        if captured == 0 && applied == 0 {
            tokio::time::sleep(IDLE).await;
        }
        Ok(None)
    }

    /// Tables whose copy is done: only their keys may be applied.
    async fn ready_tables(&self) -> Result<Vec<i32>> {
        let rows = self
            .green
            .query(&format!("SELECT target, state FROM {}", self.state.table("tables")), &[])
            .await
            .map_err(Error::db("green: reading table states"))?;
        let done = TableState::Done;
        let done = serde_json::to_value(done).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        Ok(self
            .tables
            .iter()
            .enumerate()
            .filter(|(_, t)| {
                rows.iter().any(|r| r.get::<_, String>(0) == t.target.to_string() && r.get::<_, String>(1) == done)
            })
            .map(|(i, _)| i as i32)
            .collect())
    }

    async fn pending(&self) -> Result<i64> {
        Ok(self
            .green
            .query_one(&format!("SELECT count(*) FROM {}", self.state.table("pending")), &[])
            .await
            .map_err(Error::db("green: counting pending keys"))?
            .get(0))
    }

    /// Writes lag, pending count and apply rate to state.
    async fn report(&mut self) -> Result<()> {
        let (current, frontier) = self.capture.positions().await?;
        let row = self
            .green
            .query_one(&format!("SELECT count(*), min(lsn) FROM {}", self.state.table("pending")), &[])
            .await
            .map_err(Error::db("green: reading pending keys"))?;
        let pending: i64 = row.get(0);
        let oldest = row.get::<_, Option<i64>>(1).map_or(frontier, |p| p.min(frontier));
        let lag = (current - oldest).max(0);
        let rate = self.applied as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        self.green
            .execute(
                &format!(
                    "UPDATE {} SET blue_lsn = $1, lag_bytes = $2, pending_keys = $3, applied_keys = $4, \
                     apply_rate = $5, follower_seen_at = now() WHERE id = 1",
                    self.state.table("migration")
                ),
                &[&current, &lag, &pending, &(self.applied as i64), &rate],
            )
            .await
            .map_err(Error::db("green: saving follower progress"))?;
        Ok(())
    }

    async fn reconnect(&mut self) -> Result<()> {
        self.blue = self.plan.blue.connect().await?;
        self.capture.reconnected(self.plan.blue.connect().await?);
        self.green = self.plan.green.connect().await?;
        apply::prepare_green(&self.green).await?;
        info!("reconnected to blue and green; resuming from the stored position");
        Ok(())
    }
}

/// Errors worth retrying: lost or refused connections, server shutdowns, serialization
/// failures and deadlocks.
pub fn is_transient(e: &Error) -> bool {
    match e {
        Error::Connect(_) => true,
        Error::Db { source, .. } => {
            if source.is_closed() {
                return true;
            }
            match source.code() {
                Some(code) => {
                    let c = code.code();
                    c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03" | "40001" | "40P01")
                }
                None => std::error::Error::source(source).is_some_and(|s| s.is::<std::io::Error>()),
            }
        }
        _ => false,
    }
}
