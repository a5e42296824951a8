//! Following: capture and apply run side by side, each with its own connections, during the copy
//! and after it, until a shutdown signal, a finished cutover, or (for `--no-follow`) until green
//! holds everything blue had committed when the copy finished. Lost connections are retried with
//! bounded backoff; capture resumes from the position stored on green.

pub mod back;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tokio_postgres::Client;
use tracing::{info, warn};

use crate::{
    apply,
    capture::{Capture, Target},
    error::{Error, Result},
    pg::{Lsn, SidePool},
    plan::{Plan, ResolvedTable},
    retry::{connection_lost, retry_later, Backoff},
    shutdown::Shutdown,
    state::{Gate, Phase, State},
};

/// How often lag and progress are written to state (for `status`) and the phase is checked.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// The pending count (a scan of all of pending) is read again only once this many times its own
/// cost has passed (in every report while it is cheap): with millions of keys pending (a burst
/// during the copy, trigger capture) counting every second took a quarter of the reporting
/// apply worker's time. The report's other numbers and the heartbeat are written every time.
const COUNT_COST_SHARE: u32 = 20;
/// The pending count is read at least this often, whatever it costs.
const COUNT_EVERY_AT_LEAST: Duration = Duration::from_secs(30);
/// Blue positions kept for the lag in time: an hour of reports. Further behind, the lag in
/// time is unknown (`null`), the lag in bytes still shown.
const POSITIONS_KEPT: usize = 3600;
/// The apply rate `status` shows is measured over this much recent time.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Compares blue's catalog with the shapes recorded when each copy began; a drift is stored on
/// green (so no rerun resumes past it) and returned as the error that stops following.
async fn drift(state: &State, green: &Client, blue: &Client) -> Result<Option<Error>> {
    let recorded: Vec<(String, crate::capture::drift::Shape)> = state
        .source_shapes(green)
        .await?
        .into_iter()
        .filter_map(|(id, v)| Some((id.as_str().to_string(), serde_json::from_value(v).ok()?)))
        .collect();
    let mut accepted = Vec::new();
    let found = crate::capture::drift::drifted(blue, &recorded, &mut accepted).await?;
    // Partitions created (empty) since: part of the table from now on.
    for (id, shape) in accepted {
        let shape = serde_json::to_value(shape).unwrap_or_default();
        state.set_source_shape(green, &crate::state::TableId::from_stored(id), &shape).await?;
    }
    let Some((id, what)) = found else { return Ok(None) };
    state.mark_drifted(green, &crate::state::TableId::from_stored(id.clone()), &what).await?;
    Ok(Some(Error::Drift { table: id, what }))
}

/// How often blue's catalog is compared with the recorded table shapes.
const SHAPE_CHECK_EVERY: Duration = Duration::from_secs(2);
/// How often a paused follower looks whether it may go on.
const PAUSED_WAIT: Duration = Duration::from_millis(200);
/// Idle wait between polls when nothing happened.
const IDLE: Duration = Duration::from_millis(50);
/// How often capture polls blue, and an idle apply worker looks for keys, while tables are
/// being copied. A capture round that read all blue had committed waits until [`IDLE`] (this,
/// while copying) has passed since it began; one cut at its cap goes on at once. A round costs
/// about ten round trips whatever it carries, and a logical one decodes blue's WAL from the
/// slot's restart position (up to a checkpoint or 15 s back): under a trickle of writes,
/// rounds back to back caught a key or two each and, with idle apply rounds every 50 ms, took
/// a tenth of a core from the copy. Keys captured meanwhile wait in pending for their table's
/// copy to end anyway; only tables already done see them later.
const COPYING_ROUND: Duration = Duration::from_secs(1);

/// Sleeps `d`; wakes early when `stop` fires or a catch-up is wanted (`--no-follow` after the
/// copy: it should not wait out a second of copy pacing). Callers catching up do not pause.
async fn pause(d: Duration, stop: &Shutdown, catch_up: &watch::Receiver<bool>) {
    if d.is_zero() {
        return;
    }
    let mut wanted = catch_up.clone();
    let caught = async {
        // A sender gone (the copy ended early) never wakes it: that must not spin the loops.
        if wanted.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        () = stop.wait() => {}
        () = caught => {}
    }
}
/// Keys applied since the touched log was last found empty beyond which the follower compacts
/// it even while busy (see [`crate::state::State::compact_touched`]).
const COMPACT_BACKLOG: u64 = 2_000_000;

/// Set by capture once it has stored every change up to the `--no-follow` target: the blue
/// position apply must then have passed.
type Reached = Arc<Mutex<Option<Lsn>>>;

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

/// The follower: a capture side and `[capture] apply_workers` apply sides.
pub struct Follower {
    capture: CaptureSide,
    apply: Vec<ApplySide>,
    /// `migrate control PLAN pause` stops capture and apply rounds until `resume`.
    live: Arc<crate::control::Live>,
}

struct CaptureSide {
    plan: Plan,
    state: State,
    capture: Capture,
    green: Client,
    /// A second blue session for catalog checks.
    blue: Client,
    /// When blue's catalog was last compared with the recorded shapes.
    shapes_checked: Option<Instant>,
    tables: Vec<ResolvedTable>,
    /// Keys applied by the follower (capture applies copied entries' keys itself).
    applied: Arc<AtomicU64>,
    /// What capture had applied itself at the last count.
    applied_by_capture: u64,
    /// Keys applied (as counted in `applied`) when the touched log was last compacted, about;
    /// `None` before the first compaction (the log may hold an earlier run's keys).
    compacted: Option<u64>,
    /// The last compaction moved nothing.
    log_empty: bool,
}

struct ApplySide {
    plan: Plan,
    state: State,
    tables: Vec<ResolvedTable>,
    /// Re-reads from blue: a pooled session, replaced by the pool when it breaks.
    blue: SidePool,
    green: Client,
    /// This worker's share of the key hashes: (index, count).
    part: (usize, usize),
    /// Keys applied by every worker of this follower.
    applied: Arc<AtomicU64>,
    /// Recent (time, applied) samples, for the current rate.
    samples: std::collections::VecDeque<(Instant, u64)>,
    /// Blue's position once a report, for the lag in time.
    positions: std::collections::VecDeque<(Instant, Lsn)>,
    /// A verify has started: from then on every key applied is recorded ([`apply::apply_batch`]).
    verify_started: bool,
    /// When the pending count is next read ([`COUNT_COST_SHARE`]).
    count_due: Instant,
    /// The oldest position not yet on green at the last count.
    counted_oldest: Option<Lsn>,
    /// The last round applied nothing.
    idle: bool,
    /// How long to wait before the next round (outside its stall timeout).
    rest: Duration,
}

impl Follower {
    /// A follower over an already set-up capture.
    pub async fn new(
        plan: &Plan,
        tables: &[ResolvedTable],
        mut capture: Capture,
        live: Arc<crate::control::Live>,
    ) -> Result<Self> {
        capture.apply_directly();
        let applied_by_capture = capture.applied_directly();
        let state = State::new(&plan.name);
        let workers = plan.apply_workers.max(1);
        let applied = Arc::new(AtomicU64::new(0));
        let mut apply = Vec::with_capacity(workers);
        for index in 0..workers {
            let green = plan.green.connect().await?;
            apply::prepare_green(&green).await?;
            apply.push(ApplySide {
                plan: plan.clone(),
                state: state.clone(),
                tables: tables.to_vec(),
                blue: SidePool::new(&plan.blue, 1)?,
                green,
                part: (index, workers),
                applied: Arc::clone(&applied),
                samples: std::collections::VecDeque::new(),
                positions: std::collections::VecDeque::new(),
                verify_started: false,
                count_due: Instant::now(),
                counted_oldest: None,
                idle: false,
                rest: Duration::ZERO,
            });
        }
        Ok(Self {
            capture: CaptureSide {
                plan: plan.clone(),
                state: state.clone(),
                capture,
                green: plan.green.connect().await?,
                blue: plan.blue.connect().await?,
                shapes_checked: None,
                tables: tables.to_vec(),
                applied: Arc::clone(&applied),
                applied_by_capture,
                compacted: None,
                log_empty: false,
            },
            apply,
            live,
        })
    }

    /// Runs until stopped. `catch_up` turns true when the caller wants to stop once green has
    /// everything blue committed up to that moment.
    pub async fn run(self, shutdown: Shutdown, catch_up: watch::Receiver<bool>) -> Result<Stop> {
        let reached: Reached = Arc::new(Mutex::new(None));
        let capture_stop = Shutdown::manual();
        let live = self.live;
        let mut capture_task = tokio::spawn(capture_loop(
            self.capture,
            capture_stop.clone(),
            catch_up.clone(),
            Arc::clone(&reached),
            Arc::clone(&live),
        ));
        let mut apply = self.apply;
        // The first worker to stop (signal, switch, caught up, or an error) stops them all; one
        // dropped mid-batch leaves its green transaction to roll back, and apply is idempotent.
        let workers = futures_util::future::select_all(
            apply.iter_mut().map(|w| Box::pin(w.run(&shutdown, &catch_up, &reached, &live))),
        );
        let result = tokio::select! {
            (r, _, _) = workers => r,
            r = &mut capture_task => {
                let r = r.unwrap_or_else(|e| Err(Error::TaskPanicked { task: "capture", message: e.to_string() }));
                // Capture stops only with an error or when told; either way apply stops too.
                return r.map(|()| Stop::Signal);
            }
        };
        capture_stop.trigger();
        let captured =
            capture_task.await.unwrap_or_else(|e| Err(Error::TaskPanicked { task: "capture", message: e.to_string() }));
        let stop = result?;
        captured?;
        Ok(stop)
    }
}

async fn capture_loop(
    mut side: CaptureSide,
    stop: Shutdown,
    catch_up: watch::Receiver<bool>,
    reached: Reached,
    live: Arc<crate::control::Live>,
) -> Result<()> {
    let mut target: Option<Target> = None;
    let mut backoff = Backoff::default();
    loop {
        if stop.is_triggered() {
            return Ok(());
        }
        if live.paused() {
            // Blue keeps the changes meanwhile (slot or change table).
            tokio::time::sleep(PAUSED_WAIT).await;
            continue;
        }
        let wants = *catch_up.borrow();
        let waited = side.plan.stall_timeout;
        // A round streaming a large transaction takes long; it counts as stalled only once it
        // stops moving.
        let progress = side.capture.progress();
        let began = Instant::now();
        match crate::retry::unless_stalled(side.round(wants, &mut target, &reached), &progress, waited, "capture").await
        {
            Ok(round) => {
                backoff.reset();
                if wants {
                    // Catching up: at once after a round that found something.
                    if round.stored == 0 {
                        tokio::time::sleep(IDLE).await;
                    }
                } else if !round.more {
                    let pace = if round.copying { COPYING_ROUND } else { IDLE };
                    pause(pace.saturating_sub(began.elapsed()), &stop, &catch_up).await;
                }
            }
            Err(e) if retry_later(&e) => {
                let lost = connection_lost(&e);
                backoff.wait(e, &stop, "capture").await?;
                if !lost {
                    continue;
                }
                if let Err(e) = side.reconnect().await {
                    warn!(error = %e, "capture: reconnect failed");
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// What one capture round did.
struct CaptureRound {
    /// Keys stored.
    stored: usize,
    /// It stopped at its cap: more is waiting on blue.
    more: bool,
    /// Tables are being copied (the phase is `copying`).
    copying: bool,
}

impl CaptureSide {
    /// One capture poll, unless a cutover has stood the follower aside.
    async fn round(
        &mut self,
        catch_up: bool,
        target: &mut Option<Target>,
        reached: &Mutex<Option<Lsn>>,
    ) -> Result<CaptureRound> {
        let copying = match self.state.enter_gate(&self.green).await? {
            (Gate::Go, phase) => matches!(phase, Some(Phase::Copying)),
            (Gate::Wait | Gate::Live, _) => return Ok(CaptureRound { stored: 0, more: false, copying: false }),
        };
        let mut r = self.poll(catch_up, target, reached).await;
        if let Ok(stored) = r {
            r = self.compact(stored == 0).await.map(|()| stored);
        }
        self.state.leave_gate(&self.green).await;
        let more = self.capture.full();
        r.map(|stored| CaptureRound { stored, more, copying })
    }

    /// Moves a share of the touched log into `touched` when idle, or when the log has grown
    /// past [`COMPACT_BACKLOG`] keys under load that never lets the follower idle. Under the
    /// gate: a cutover reading `touched` has stood the follower aside.
    async fn compact(&mut self, idle: bool) -> Result<()> {
        let applied = self.applied.load(Ordering::Relaxed);
        let since = self.compacted.map(|c| applied.saturating_sub(c));
        // Idle with nothing applied since the log was found empty: it still is (only apply
        // appends to it), and looking would scan its heap every round.
        if since == Some(0) && self.log_empty {
            return Ok(());
        }
        if !idle && since.is_some_and(|n| n < COMPACT_BACKLOG) {
            return Ok(());
        }
        let moved = self.state.compact_touched(&self.green, crate::state::COMPACT_ROWS).await?;
        self.log_empty = (moved as i64) < crate::state::COMPACT_ROWS;
        self.compacted = Some(if self.log_empty { applied } else { self.compacted.unwrap_or(0) + moved });
        Ok(())
    }

    /// Compares blue's catalog with the shapes recorded when each copy began, every
    /// [`SHAPE_CHECK_EVERY`]; a drift is stored (so no rerun resumes past it) and stops following.
    async fn check_shapes(&mut self) -> Result<()> {
        if self.shapes_checked.is_some_and(|t| t.elapsed() < SHAPE_CHECK_EVERY) {
            return Ok(());
        }
        if let Some(e) = drift(&self.state, &self.green, &self.blue).await? {
            return Err(e);
        }
        self.shapes_checked = Some(Instant::now());
        Ok(())
    }

    /// One capture poll; records positions; notes when the catch-up target is reached.
    async fn poll(
        &mut self,
        catch_up: bool,
        target: &mut Option<Target>,
        reached: &Mutex<Option<Lsn>>,
    ) -> Result<usize> {
        self.check_shapes().await?;
        let polled = self.capture.poll(&mut self.green, &self.state).await;
        let by_capture = self.capture.applied_directly();
        self.applied.fetch_add(by_capture - self.applied_by_capture, Ordering::Relaxed);
        self.applied_by_capture = by_capture;
        let stored = match polled {
            Err(Error::SchemaChanged { table, was, now }) => {
                // Seen by decoding before the catalog check: stored the same way.
                let e = Error::SchemaChanged { table: table.clone(), was, now };
                for t in self.tables_by_source(&table) {
                    self.state.mark_drifted(&self.green, &t, &e.to_string()).await?;
                }
                return Err(e);
            }
            r => r?,
        };
        let (current, frontier) = self.capture.positions().await?;
        self.state.record_positions(&self.green, current, frontier).await?;
        if catch_up {
            let t = match *target {
                Some(t) => t,
                None => {
                    let t = self.capture.target().await?;
                    info!(target = ?t, "catching up to what blue has committed, then stopping");
                    *target.insert(t)
                }
            };
            if self.capture.reached(t).await? {
                *reached.lock().unwrap_or_else(|e| e.into_inner()) = Some(t.lsn());
            }
        }
        Ok(stored)
    }

    /// The entries reading source `name` (qualified, as capture names it).
    fn tables_by_source(&self, name: &str) -> Vec<crate::state::TableId> {
        self.tables.iter().filter(|t| t.source.to_string() == name).map(|t| t.id.clone()).collect()
    }

    async fn reconnect(&mut self) -> Result<()> {
        // All new sessions first: a failed connect leaves the old ones as they were.
        let (blue, capture_blue, green) =
            (self.plan.blue.connect().await?, self.plan.blue.connect().await?, self.plan.green.connect().await?);
        let capture_blue = self.capture.reconnected(capture_blue);
        let blue = std::mem::replace(&mut self.blue, blue);
        self.plan.blue.abandon([capture_blue, blue]);
        self.plan.green.abandon([std::mem::replace(&mut self.green, green)]);
        info!("capture reconnected to blue and green; resuming from the stored position");
        Ok(())
    }
}

impl ApplySide {
    async fn run(
        &mut self,
        shutdown: &Shutdown,
        catch_up: &watch::Receiver<bool>,
        reached: &Mutex<Option<Lsn>>,
        live: &crate::control::Live,
    ) -> Result<Stop> {
        let mut last_report = Instant::now() - REPORT_EVERY;
        let mut backoff = Backoff::default();
        let mut paused = false;
        loop {
            if shutdown.is_triggered() {
                self.report(true).await.ok();
                return Ok(Stop::Signal);
            }
            // A pause holds capture (blue keeps the changes); apply goes on with the keys
            // already captured and keeps watching the cutover gate (a cutover that died
            // half-way is recovered from here, paused or not).
            if self.part.0 == 0 && live.paused() != paused {
                paused = !paused;
                if paused {
                    info!("following paused by `migrate control PLAN pause`: nothing new is captured; blue keeps the changes meanwhile");
                } else {
                    info!("following resumed");
                }
            }
            let wants = *catch_up.borrow();
            let waited = self.plan.stall_timeout;
            let round = tokio::time::timeout(waited, self.round(&mut last_report, wants, reached)).await;
            match round.unwrap_or_else(|_| Err(Error::Stalled { what: "apply".into(), waited })) {
                Ok(Some(stop)) => return Ok(stop),
                Ok(None) => {
                    backoff.reset();
                    // Outside the stall timeout, which a second of copy pacing could exceed.
                    let rest = std::mem::take(&mut self.rest);
                    if wants {
                        tokio::time::sleep(rest).await;
                    } else {
                        pause(rest, shutdown, catch_up).await;
                    }
                }
                Err(e) if retry_later(&e) => {
                    let lost = connection_lost(&e);
                    backoff.wait(e, shutdown, "apply").await?;
                    if !lost {
                        continue;
                    }
                    if let Err(e) = self.reconnect().await {
                        warn!(error = %e, "apply: reconnect failed");
                    }
                }
                Err(e) => return Err(self.explain(e).await),
            }
        }
    }

    /// One apply round, unless a cutover has stood the follower aside; stops once green is live.
    /// A cutover that died half-way (its phase is still `cutting-over` but nobody holds the
    /// gate) is finished or rolled back from here, so PgBouncer is never left paused.
    async fn round(
        &mut self,
        last_report: &mut Instant,
        catch_up: bool,
        reached: &Mutex<Option<Lsn>>,
    ) -> Result<Option<Stop>> {
        let (gate, phase) = self.state.enter_gate(&self.green).await?;
        let copying = matches!(phase, Some(Phase::Copying));
        if let Some(Phase::CuttingOver { step }) = &phase {
            if gate != Gate::Wait {
                if gate == Gate::Go {
                    self.state.leave_gate(&self.green).await;
                }
                if self.plan.cutover.pgbouncer.is_none() {
                    // This follower's plan cannot reach PgBouncer: saying "recovering" every
                    // round while nothing happens would hide a paused entry.
                    return Err(Error::CutoverUnrecoverable { step: step.to_string() });
                }
                warn!(step = %step, "a cutover stopped half-way; recovering it");
                crate::cutover::recover_abandoned(&self.plan).await?;
                return Ok(None);
            }
        }
        match gate {
            Gate::Go => {}
            Gate::Wait => {
                self.rest = IDLE;
                return Ok(None);
            }
            Gate::Live => {
                info!("cutover finished; following stops");
                return Ok(Some(Stop::Switched));
            }
        }
        let r = self.apply_round(last_report, catch_up, reached).await;
        self.state.leave_gate(&self.green).await;
        // Idle outside the gate, so a cutover never waits for a sleeping follower.
        if matches!(r, Ok(None)) && self.idle {
            self.rest = if copying { COPYING_ROUND } else { IDLE };
        }
        r
    }

    /// One apply batch (plus, every second, a progress report); `Some` when following should stop.
    async fn apply_round(
        &mut self,
        last_report: &mut Instant,
        catch_up: bool,
        reached: &Mutex<Option<Lsn>>,
    ) -> Result<Option<Stop>> {
        let ready = self.ready_tables().await?;
        let blue = self.blue.get().await?;
        let applied: usize = apply::apply_batch(
            &blue,
            &mut self.green,
            &self.state,
            &self.tables,
            &ready,
            self.part,
            &mut self.verify_started,
        )
        .await?
        .values()
        .map(Vec::len)
        .sum();
        self.applied.fetch_add(applied as u64, Ordering::Relaxed);
        // One worker reports for all.
        if self.part.0 == 0 && last_report.elapsed() >= REPORT_EVERY {
            *last_report = Instant::now();
            self.report(false).await?;
        }
        // Keys of changes after the target (the application goes on writing) do not keep
        // `--no-follow` from ending.
        let target = *reached.lock().unwrap_or_else(|e| e.into_inner());
        if let (true, true, Some(target)) = (catch_up, ready.len() == self.tables.len(), target) {
            if !self.state.pending_through(&self.green, target).await? {
                self.report(true).await?;
                return Ok(Some(Stop::CaughtUp));
            }
        }
        self.idle = applied == 0;
        Ok(None)
    }

    /// An error that stops apply is explained by a drift of blue's schema when there is one
    /// (apply may meet a renamed table before capture's next catalog check does).
    async fn explain(&self, e: Error) -> Error {
        let Ok(blue) = self.blue.get().await else { return e };
        match drift(&self.state, &self.green, &blue).await {
            Ok(Some(drift)) => drift,
            _ => e,
        }
    }

    /// Entries whose copy is done: only their keys may be applied.
    async fn ready_tables(&self) -> Result<Vec<crate::state::TableId>> {
        let done = self.state.done_tables(&self.green).await?;
        Ok(self.tables.iter().filter(|t| done.contains(&t.id)).map(|t| t.id.clone()).collect())
    }

    /// Writes lag, pending count (when due, or `count`) and the current apply rate (over the
    /// last [`RATE_WINDOW`]) to state.
    async fn report(&mut self, count: bool) -> Result<()> {
        let now = Instant::now();
        let applied = self.applied.load(Ordering::Relaxed);
        self.samples.push_back((now, applied));
        while self.samples.len() > 2 && self.samples.front().is_some_and(|(t, _)| now - *t > RATE_WINDOW) {
            self.samples.pop_front();
        }
        let rate = match self.samples.front() {
            Some((t, n)) if now - *t >= Duration::from_millis(500) => (applied - n) as f64 / (now - *t).as_secs_f64(),
            _ => 0.0,
        };
        let count = count || now >= self.count_due;
        let report = self.state.report_follower(&self.green, applied as i64, rate, count, self.counted_oldest).await?;
        if count {
            self.counted_oldest = report.oldest;
            // Reports come once a REPORT_EVERY anyway: a cheap count is read in each.
            self.count_due = now + (now.elapsed() * COUNT_COST_SHARE).min(COUNT_EVERY_AT_LEAST);
        }
        let (blue, oldest) = (report.blue, report.oldest);
        // Blue's position over time: the oldest change green lacks was made after the last
        // sample at or below it.
        let lag = match (blue, oldest) {
            (Some(blue), Some(oldest)) => {
                self.positions.push_back((now, blue));
                while self.positions.len() > POSITIONS_KEPT {
                    self.positions.pop_front();
                }
                if oldest >= blue {
                    Some(0.0)
                } else {
                    self.positions.iter().rev().find(|(_, l)| *l <= oldest).map(|(t, _)| (now - *t).as_secs_f64())
                }
            }
            _ => None,
        };
        self.state.report_lag_seconds(&self.green, lag).await
    }

    async fn reconnect(&mut self) -> Result<()> {
        let green = std::mem::replace(&mut self.green, self.plan.green.connect().await?);
        self.plan.green.abandon([green]);
        apply::prepare_green(&self.green).await?;
        info!("apply reconnected to green (blue sessions come from a pool that replaces broken ones)");
        Ok(())
    }
}
