//! `migrate rollback`: the cutover in reverse, through the way back the cutover opened. Stand
//! the reverse follower aside, carry green's writes to blue in rounds while traffic flows,
//! PAUSE, drain, check every key written back, set blue's sequences ahead of green's, lift the
//! fence, write blue's line back, RELOAD, RESUME. Every failure before RELOAD resumes on green
//! with the way back still open; a rollback that dies is finished or undone by the next
//! `rollback`, `cutover`, or the running `copy`. Afterwards forward following resumes from blue's
//! capture, which was kept through the window, so a later `cutover` can try again.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::{info, warn};

use super::{
    hooks::{self, HookEnv},
    switch::{fault, interrupted},
    Ended, Report,
};
use crate::{
    error::{Error, Result},
    pg::ident,
    pgbouncer::{databases_file, Bouncer},
    plan::{Check, HookPoint, PgbouncerSettings, Plan, ResolvedPlan, SwitchMode},
    shutdown::Shutdown,
    state::{CutoverStep, KeyEvent, Phase, State},
    way_back::{self, apply as back},
};

/// Catching up before the pause may take this long.
const CATCH_UP_BUDGET: Duration = Duration::from_secs(120);
/// Keys compared per query in the checks.
const CHECK_KEYS: usize = 5_000;
/// How recently the reverse follower must have reported to count as running.
const FOLLOWER_SEEN: &str = "5 seconds";

/// `migrate rollback`: preflight, then (unless `dry_run`) the switch back.
pub async fn run(
    plan: &Plan,
    resolved: &ResolvedPlan,
    dry_run: bool,
    shutdown: Shutdown,
    on_preflight: &mut (dyn FnMut(&[Check]) + Send),
) -> Result<Report> {
    let pb = super::settings(plan)?;
    let (blue, green) = tokio::try_join!(plan.blue.connect(), plan.green.connect())?;
    super::lock(plan, &green, "rollback").await?;
    let state = State::new(&plan.name);
    if !state.exists(&green).await? {
        return Ok(Report::ended(Ended::NoState));
    }
    match state.phase(&green).await? {
        Some(Phase::CuttingOver { step }) => super::recover(plan, pb, &green, &state, step).await?,
        Some(Phase::RollingBack { step }) => {
            warn!(step = %step, "an earlier rollback stopped half-way; recovering it first");
            recover(plan, resolved, pb, &green, &state, step).await?
        }
        _ => {}
    }
    let checks = preflight(plan, pb, resolved, &blue, &green, &state).await?;
    on_preflight(&checks);
    let failed = checks.iter().filter(|c| !c.ok).count();
    if failed > 0 {
        return Ok(Report::ended(Ended::ChecksFailed { failed }));
    }
    if dry_run {
        return Ok(Report::ended(Ended::DryRunPassed));
    }
    let window = way_back::window(&state, &green).await?.unwrap_or_default();
    let start = window.start_xid.ok_or(Error::Internal("preflight passed without an open way back"))?;
    let route = match &pb.mode {
        SwitchMode::Repoint { databases_file, .. } => {
            let saved =
                window.blue_line_file.clone().ok_or(Error::Internal("a repoint way back without blue's line"))?;
            Route::Repoint {
                file: databases_file.clone(),
                blue_line: way_back::read_blue_line(std::path::Path::new(&saved))?,
                rewrote: false,
            }
        }
        SwitchMode::Handover { .. } => Route::Handover {
            v1: Box::new(Bouncer::connect(&pb.admin, &pb.database).await?),
            v2_disabled: false,
            v1_enabled: false,
        },
    };
    let mut r = Rollback {
        plan,
        resolved,
        pb,
        state,
        work: plan.green.connect().await?,
        blue,
        green,
        bouncer: Bouncer::connect(&pb.admin, green_entry(pb)).await?,
        route,
        start,
        timeline: Vec::new(),
        paused: None,
        paused_ms: None,
        committed: false,
        sequences: Vec::new(),
        unfenced: false,
        recheck: back::Written::new(),
        hooks: Vec::new(),
        hook_env: hooks::env(plan, pb, "rollback"),
    };
    back::prepare_blue(&r.blue).await?;
    let span = tracing::info_span!("rollback", plan = %plan.name, database = %green_entry(pb));
    let result = tracing::Instrument::instrument(r.execute(&shutdown), span).await;
    Ok(r.finish(result).await)
}

/// The rollback's checks, each `[ok]` or `[FAIL]`.
async fn preflight(
    plan: &Plan,
    pb: &PgbouncerSettings,
    resolved: &ResolvedPlan,
    blue: &Client,
    green: &Client,
    state: &State,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String| checks.push(Check { name: name.into(), ok, detail });
    let phase = state.phase(green).await?;
    let window = way_back::window(state, green).await?;
    let handover = matches!(pb.mode, SwitchMode::Handover { .. });
    let open =
        window.as_ref().is_some_and(|w| w.open && w.start_xid.is_some() && (handover || w.blue_line_file.is_some()));
    check(
        "switched, way back open",
        phase == Some(Phase::Switched) && open,
        match (&phase, &window) {
            (Some(Phase::Switched), Some(w)) if open => format!("opened at {}", w.opened_at.as_deref().unwrap_or("?")),
            (Some(Phase::Switched), Some(w)) if w.closed_by.is_some() => format!(
                "the way back was closed ({} at {}); switching back now needs a new migration",
                w.closed_by.as_deref().unwrap_or("?"),
                w.closed_at.as_deref().unwrap_or("?")
            ),
            (Some(Phase::Switched), _) => {
                "the cutover opened no way back (`[cutover] way_back = true` was not set)".into()
            }
            (Some(p), _) => format!("phase {}: only a switched migration rolls back", p.name()),
            (None, _) => "no state".into(),
        },
    );
    if let SwitchMode::Handover { v2_database, .. } = &pb.mode {
        match Bouncer::connect(&pb.admin, &pb.database).await {
            Ok(v1) => match v1.entry().await? {
                Some(e) => check(
                    "pgbouncer v1 entry",
                    true,
                    format!(
                        "`{}` ({}:{}/{}) is enabled and resumed at the switch back; `{v2_database}` is then disabled",
                        pb.database, e.host, e.port, e.database
                    ),
                ),
                None => check("pgbouncer v1 entry", false, format!("PgBouncer has no entry `{}`", pb.database)),
            },
            Err(e) => check("pgbouncer v1 entry", false, e.to_string()),
        }
    }
    if let Some(saved) = window.as_ref().and_then(|w| w.blue_line_file.as_ref()).filter(|_| open) {
        match way_back::read_blue_line(std::path::Path::new(saved)) {
            Ok(_) => check("blue's line saved", true, format!("{saved} (written back at the switch back)")),
            Err(e) => check("blue's line saved", false, e.to_string()),
        }
    }
    let seen: bool = green
        .query_one(
            &format!(
                "SELECT coalesce(now() - (way_back->>'seen_at')::timestamptz < interval '{FOLLOWER_SEEN}', false) FROM {} WHERE id = 1",
                state.table("migration")
            ),
            &[],
        )
        .await
        .map_err(Error::db("green: reading the reverse follower"))?
        .get(0);
    check(
        "reverse follower",
        true,
        if seen {
            "running".into()
        } else {
            "not running: rollback carries green's writes back by itself (slower)".into()
        },
    );
    let installed = way_back::installed(plan, resolved, green).await?;
    check(
        "capture on green",
        installed,
        if installed {
            "change table and triggers".into()
        } else {
            "missing: green's writes since the switch cannot be carried back".into()
        },
    );
    if let Some(w) = window.as_ref().filter(|_| installed) {
        let backlog = way_back::backlog(state, green, w.start_xid.unwrap_or(i64::MAX)).await?;
        check(
            "way back lag",
            w.error.is_none(),
            match &w.error {
                Some(e) => format!("the reverse follower stopped: {e}"),
                None => format!("{backlog} change(s) not yet on blue, {} key(s) written back so far", w.applied),
            },
        );
    }
    checks.push(way_back::round_trip_check(resolved, blue).await?);
    let mut check = |name: &str, ok: bool, detail: String| checks.push(Check { name: name.into(), ok, detail });
    match crate::capture::Capture::open(plan, resolved, plan.blue.connect().await?).await {
        Ok(_) => check("capture on blue", true, "kept: following resumes after the rollback".into()),
        Err(e) => check("capture on blue", false, format!("{e}: following could not resume after the rollback")),
    }
    match Bouncer::connect(&pb.admin, green_entry(pb)).await {
        Ok(_) => check("pgbouncer admin console", true, "reachable".into()),
        Err(e) => check("pgbouncer admin console", false, e.to_string()),
    }
    check("sequences to carry back", true, "each blue sequence owned by a carried column, set in the pause".into());
    Ok(checks)
}

/// The PgBouncer entry that serves green while the way back is open: the one the rollback
/// pauses (repoint: the application's entry; handover: the v2 application's).
fn green_entry(pb: &PgbouncerSettings) -> &str {
    match &pb.mode {
        SwitchMode::Repoint { .. } => &pb.database,
        SwitchMode::Handover { v2_database, .. } => v2_database,
    }
}

/// How traffic goes back to blue.
enum Route {
    /// Blue's saved line is written back into the databases file, then RELOAD.
    Repoint {
        file: std::path::PathBuf,
        blue_line: String,
        /// The file holds blue's line (an abort before RELOAD writes green's back).
        rewrote: bool,
    },
    /// The v1 entry (blue) is enabled and resumed; the v2 entry is disabled and its queued
    /// clients dropped (v2 statements must not reach blue).
    Handover {
        v1: Box<Bouncer>,
        /// The v2 entry was disabled (an abort enables it again).
        v2_disabled: bool,
        /// The v1 entry was enabled, still paused (an abort disables it again when the
        /// cutover had disabled it).
        v1_enabled: bool,
    },
}

/// One rollback in progress.
struct Rollback<'a> {
    plan: &'a Plan,
    resolved: &'a ResolvedPlan,
    pb: &'a PgbouncerSettings,
    state: State,
    /// Holds the cutover lock and the follow gate; records state.
    green: Client,
    /// Reads green's changes and rows.
    work: Client,
    /// Writes green's rows back.
    blue: Client,
    /// The entry serving green ([`green_entry`]): paused, then resumed (repoint) or dropped
    /// (handover).
    bouncer: Bouncer,
    route: Route,
    start: i64,
    timeline: Vec<(String, f64)>,
    paused: Option<Instant>,
    paused_ms: Option<f64>,
    /// Traffic may be on blue (RELOAD sent, or the v1 entry resumed).
    committed: bool,
    sequences: Vec<crate::state::SequenceSet>,
    /// Blue's fence was lifted (an abort puts it back).
    unfenced: bool,
    /// Keys that differed in the check before the pause: checked again in it.
    recheck: back::Written,
    hooks: Vec<crate::state::HookRecord>,
    hook_env: HookEnv,
}

impl Rollback<'_> {
    fn mark(&mut self, step: &str, since: Instant) {
        let ms = since.elapsed().as_secs_f64() * 1000.0;
        info!(step, ms = format!("{ms:.1}"), "rollback step done");
        self.timeline.push((step.to_string(), ms));
    }

    async fn record_step(&self, step: CutoverStep) -> Result<()> {
        self.state.set_phase(&self.green, &Phase::RollingBack { step }).await
    }

    async fn execute(&mut self, shutdown: &Shutdown) -> Result<()> {
        let t = Instant::now();
        self.green
            .batch_execute(&format!("SET lock_timeout = '{}ms'", self.plan.cutover.lock_timeout.as_millis()))
            .await
            .map_err(Error::db("green: rollback session"))?;
        self.green
            .execute("SELECT pg_advisory_lock(hashtext($1))", &[&self.state.gate_key()])
            .await
            .map_err(Error::db("green: standing the reverse follower aside (follow gate)"))?;
        self.record_step(CutoverStep::CatchUp).await?;
        self.mark("reverse follower stood aside", t);
        let t = Instant::now();
        self.catch_up(Instant::now() + CATCH_UP_BUDGET, shutdown).await?;
        self.mark("catch-up", t);
        let t = Instant::now();
        // Every key of the window, while traffic flows; the pause re-checks only the ones that
        // differ here and the ones its drain writes, so it does not grow with the window.
        for (id, key) in self.check_written(None).await? {
            self.recheck.entry(id).or_default().push(key);
        }
        info!(
            differing = back::count(&self.recheck),
            "keys written back checked; differing ones are checked again in the pause"
        );
        self.mark("check before pause", t);
        fault("rollback.caught-up", shutdown).await;
        interrupted(shutdown)?;
        if self.plan.cutover.rollback_hooks.iter().any(|h| h.at == HookPoint::BeforePause) {
            self.run_hooks(HookPoint::BeforePause, None, shutdown).await?;
            interrupted(shutdown)?;
            let t = Instant::now();
            let written = self.catch_up(Instant::now() + CATCH_UP_BUDGET, shutdown).await?;
            for (id, keys) in written {
                self.recheck.entry(id).or_default().extend(keys);
            }
            self.mark("catch-up after hooks", t);
        }

        self.record_step(CutoverStep::Pause).await?;
        let t = Instant::now();
        self.paused = Some(t);
        super::pause_entry(&mut self.bouncer, self.pb.pause_timeout, shutdown).await?;
        self.mark("pause", t);
        if let Route::Handover { v1, v1_enabled, .. } = &mut self.route {
            // Enabled while still paused: v1 clients the in_pause hooks send over queue for the
            // switch back instead of being refused.
            let t = Instant::now();
            v1.enable().await?;
            *v1_enabled = true;
            self.mark("v1 entry enabled (paused)", t);
        }
        fault("rollback.paused", shutdown).await;
        let budget = self.pb.pause_timeout;
        tokio::time::timeout(budget, self.in_pause(Instant::now() + budget, shutdown))
            .await
            .unwrap_or(Err(Error::PauseBudget { waited: budget }))?;
        interrupted(shutdown)?;

        self.record_step(CutoverStep::Repoint).await?;
        fault("rollback.before-repoint", shutdown).await;
        match &mut self.route {
            Route::Repoint { .. } => self.repoint(shutdown).await?,
            Route::Handover { .. } => self.hand_back(shutdown).await?,
        }
        let t = Instant::now();
        let record = self.record("rolled-back", None);
        finish_on_blue(self.plan, self.resolved, &self.state, &self.green, record).await?;
        self.mark("following blue again", t);
        self.run_hooks(HookPoint::AfterSwitch, None, shutdown).await
    }

    /// Runs the `[[rollback.hook]]`s at `at` (if any) as one timeline step.
    async fn run_hooks(&mut self, at: HookPoint, deadline: Option<Instant>, shutdown: &Shutdown) -> Result<()> {
        let t = Instant::now();
        let all = &self.plan.cutover.rollback_hooks;
        let Some(result) =
            hooks::run_point(all, at, &self.hook_env, "rolled-back", deadline, shutdown, &mut self.hooks).await
        else {
            return Ok(());
        };
        self.mark(&format!("{} hooks", at.name()), t);
        result
    }

    /// Repoint: blue's line back into the databases file, RELOAD (the point of no return), RESUME.
    async fn repoint(&mut self, shutdown: &Shutdown) -> Result<()> {
        let Route::Repoint { file, blue_line, rewrote } = &mut self.route else { return Ok(()) };
        let t = Instant::now();
        databases_file::rewrite(file, &self.pb.database, blue_line).map_err(|source| Error::File {
            what: "rewriting",
            path: file.clone(),
            source,
        })?;
        *rewrote = true;
        self.mark("repoint", t);
        let t = Instant::now();
        // From the first RELOAD sent, traffic may go to blue, whatever the answer.
        self.committed = true;
        self.bouncer.reload().await?;
        self.mark("reload", t);
        fault("rollback.reloaded", shutdown).await;
        let t = Instant::now();
        self.bouncer.resume().await?;
        self.paused_ms = self.paused.take().map(|p| p.elapsed().as_secs_f64() * 1000.0);
        self.mark("resume", t);
        Ok(())
    }

    /// Handover: the v2 entry is disabled (no new v2 client gets in), the v1 entry enabled and
    /// resumed (the point of no return), then the v2 entry's queued clients are dropped with an
    /// error: their v2 statements must not run on blue.
    async fn hand_back(&mut self, shutdown: &Shutdown) -> Result<()> {
        let t = Instant::now();
        self.bouncer.disable().await?;
        if let Route::Handover { v2_disabled, .. } = &mut self.route {
            *v2_disabled = true;
        }
        self.mark("hold v2 entry", t);
        let Route::Handover { v1, .. } = &mut self.route else { return Ok(()) };
        let t = Instant::now();
        v1.enable().await?;
        // From the first RESUME sent the v1 entry may serve blue: never undo from here.
        self.committed = true;
        v1.resume().await?;
        self.paused_ms = self.paused.take().map(|p| p.elapsed().as_secs_f64() * 1000.0);
        self.mark("resume v1 entry", t);
        fault("rollback.reloaded", shutdown).await;
        let t = Instant::now();
        self.bouncer.kill().await?;
        self.mark("v2 clients dropped", t);
        Ok(())
    }

    /// Drain, final check of every key written back, blue's sequences, the fence.
    async fn in_pause(&mut self, deadline: Instant, shutdown: &Shutdown) -> Result<()> {
        let t = Instant::now();
        let drained = self.catch_up(deadline, shutdown).await?;
        self.mark("drain", t);
        fault("rollback.drained", shutdown).await;
        let t = Instant::now();
        let mut recheck = std::mem::take(&mut self.recheck);
        for (id, keys) in drained {
            recheck.entry(id).or_default().extend(keys);
        }
        let differing = self.check_written(Some(&recheck)).await?;
        info!(checked = back::count(&recheck), differing = differing.len(), "final check of the keys written back");
        if !differing.is_empty() {
            let shown = differing.iter().take(5).map(|(t, k)| format!("{t} key ({})", k.join(", "))).collect();
            return Err(Error::DrainDiffers { count: differing.len(), shown });
        }
        self.mark("verify", t);
        let t = Instant::now();
        self.carry_sequences_back().await?;
        self.mark("sequences", t);
        if self.plan.cutover.fence_blue {
            let t = Instant::now();
            set_fence(self.plan, &self.blue, false).await?;
            self.unfenced = true;
            self.mark("fence lifted", t);
        }
        self.run_hooks(HookPoint::InPause, Some(deadline), shutdown).await
    }

    /// Carries green's writes to blue until every transaction that existed when called is on
    /// blue (a fixed point, as the cutover's catch-up chases one). Returns the keys written.
    async fn catch_up(&mut self, deadline: Instant, shutdown: &Shutdown) -> Result<back::Written> {
        let target = way_back::horizon(&self.work).await?;
        let mut all = back::Written::new();
        loop {
            let written =
                back::round(&self.state, &self.resolved.tables, &mut self.work, &mut self.blue, self.start).await?;
            let n = back::count(&written);
            for (id, keys) in written {
                all.entry(id).or_default().extend(keys);
            }
            // Not "a round found nothing": under a steady writer on a quiet green some change
            // always committed since the round began, and that never came.
            if way_back::reached(&self.state, &self.work, self.start, target).await? {
                return Ok(all);
            }
            interrupted(shutdown)?;
            if Instant::now() > deadline {
                return Err(Error::CatchUpTimedOut { what: "carrying green's writes back".into() });
            }
            if n == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Compares keys written back (blue's row against reverse(green's row)): every one in
    /// `touched_back`, or with `only`, just those. Returns the (entry id, key) pairs that differ.
    async fn check_written(&mut self, only: Option<&back::Written>) -> Result<Vec<(String, Vec<String>)>> {
        let mut out = Vec::new();
        for t in &self.resolved.tables {
            let keys = match only {
                Some(w) => w.get(t.id.as_str()).cloned().unwrap_or_default(),
                None => way_back::touched_keys(&self.state, &self.green, t).await?,
            };
            for batch in keys.chunks(CHECK_KEYS) {
                for k in back::differing(&self.work, &mut self.blue, t, batch).await? {
                    out.push((t.id.as_str().to_string(), k));
                }
            }
        }
        Ok(out)
    }

    /// Blue's sequences past green's ([`way_back::carry_sequences`]).
    async fn carry_sequences_back(&mut self) -> Result<()> {
        let set =
            way_back::carry_sequences(self.resolved, &self.blue, &self.green, self.plan.cutover.sequence_gap).await?;
        self.sequences.extend(set);
        Ok(())
    }

    fn record(&self, outcome: &str, reason: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "outcome": outcome,
            "reason": reason,
            "paused_ms": self.paused_ms,
            "steps": self.timeline.iter().map(|(s, ms)| serde_json::json!({"step": s, "ms": ms})).collect::<Vec<_>>(),
            "sequences": self.sequences,
        })
    }

    fn report(&self, ended: Ended) -> Report {
        Report {
            ended,
            error: None,
            timeline: self.timeline.clone(),
            sequences: self.sequences.clone(),
            paused_ms: self.paused_ms,
            hooks: self.hooks.clone(),
        }
    }

    async fn finish(mut self, result: Result<()>) -> Report {
        let traffic = match &self.pb.mode {
            SwitchMode::Repoint { .. } => {
                format!("PgBouncer database `{}` points at blue; following blue again", self.pb.database)
            }
            SwitchMode::Handover { v2_database, .. } => format!(
                "the v1 entry `{}` (blue) takes traffic, the v2 entry `{v2_database}` is disabled; following blue again",
                self.pb.database
            ),
        };
        match result {
            Ok(()) => self.report(Ended::RolledBack { traffic }),
            Err(e) if self.committed => Report {
                error: Some(Error::AfterSwitch {
                    advice: format!(
                        "traffic is on blue already; run `RESUME {}` on PgBouncer's admin console if clients wait, \
                         then `migrate rollback` again to finish the bookkeeping",
                        self.pb.database
                    ),
                    source: Box::new(e),
                }),
                ..self.report(Ended::RolledBack { traffic })
            },
            Err(e) => match self.undo(&e.to_string()).await {
                Ok(()) => self.report(Ended::Aborted { reason: e.to_string() }),
                Err(e2) => Report {
                    error: Some(Error::RollbackFailed {
                        database: self.pb.database.clone(),
                        error: Box::new(e),
                        rollback: Box::new(e2),
                    }),
                    ..self.report(Ended::Aborted { reason: "undoing the rollback failed".into() })
                },
            },
        }
    }

    /// Before RELOAD: green's line back, RESUME, the fence back; the way back stays open.
    async fn undo(&mut self, reason: &str) -> Result<()> {
        let t = Instant::now();
        match &mut self.route {
            Route::Repoint { file, rewrote, .. } => {
                if *rewrote {
                    // RELOAD too: one that failed may still have reached PgBouncer.
                    restore_green_line(self.pb, file)?;
                    self.bouncer.reload().await?;
                }
            }
            Route::Handover { v1, v2_disabled, v1_enabled } => {
                if *v2_disabled {
                    self.bouncer.enable().await?;
                }
                if *v1_enabled {
                    hold_v1(self.pb, v1).await?;
                }
            }
        }
        self.bouncer.resume().await?;
        self.paused = None;
        if self.unfenced {
            set_fence(self.plan, &self.blue, true).await?;
        }
        self.mark("undo", t);
        if let Err(e) = self.run_hooks(HookPoint::OnAbort, None, &Shutdown::manual()).await {
            warn!(error = %e, "an on_abort hook of the rollback failed");
        }
        let record = self.record("aborted", Some(reason));
        self.state.set_phase(&self.green, &Phase::Switched).await?;
        way_back::update(&self.state, &self.green, serde_json::json!({ "last_rollback": record }), &[]).await
    }
}

/// Handover, switching back undone: the v1 entry as the cutover left it (disabled, its queued
/// clients dropped, when `v1_after_switch = "disable"`; paused otherwise).
async fn hold_v1(pb: &PgbouncerSettings, v1: &Bouncer) -> Result<()> {
    if let SwitchMode::Handover { v1_after_switch: crate::plan::V1AfterSwitch::Disable, .. } = &pb.mode {
        v1.disable().await?;
        v1.kill().await?;
    }
    Ok(())
}

/// Writes green's line back into the databases file (repoint mode).
fn restore_green_line(pb: &PgbouncerSettings, file: &std::path::Path) -> Result<()> {
    if let SwitchMode::Repoint { green_dsn, .. } = &pb.mode {
        databases_file::rewrite(file, &pb.database, green_dsn).map_err(|source| Error::File {
            what: "restoring",
            path: file.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// Fences blue (new sessions read-only) or lifts the fence, as `[cutover] fence_blue` set it.
async fn set_fence(plan: &Plan, blue: &Client, on: bool) -> Result<()> {
    let db = ident(plan.blue.dbname().unwrap_or_default());
    // This session may be one the fence made read-only.
    let sql = if on {
        format!("SET default_transaction_read_only = off; ALTER DATABASE {db} SET default_transaction_read_only = on")
    } else {
        format!("ALTER DATABASE {db} RESET default_transaction_read_only")
    };
    blue.batch_execute(&sql).await.map_err(Error::db("blue: the fence (needs database owner)"))
}

/// Traffic is on blue: the keys written back are handed to forward following (blue's trigger
/// capture did not see them: `session_replication_role = replica`; where forward(reverse(g))
/// differs from g, green must be brought back to transform(blue)), the way back is removed
/// from green and closed, and the phase is `following` again. Idempotent: recovery repeats it.
async fn finish_on_blue(
    plan: &Plan,
    resolved: &ResolvedPlan,
    state: &State,
    green: &Client,
    record: serde_json::Value,
) -> Result<()> {
    let blue = plan.blue.connect().await?;
    let lsn = crate::pg::insert_lsn(&blue).await?;
    if way_back::has_touched(state, green).await? {
        for t in &resolved.tables {
            let keys = way_back::touched_keys(state, green, t).await?;
            let events: Vec<KeyEvent> =
                keys.into_iter().map(|key| KeyEvent { table: t.id.clone(), key, lsn }).collect();
            for chunk in events.chunks(10_000) {
                state.store_keys(green, chunk).await?;
            }
        }
    }
    // Writers that bypass PgBouncer may still reach green: stop capturing, carry what was
    // captured since the final check, and only then drop the change table.
    way_back::remove_triggers(plan, green).await?;
    if let Some(start) = way_back::window(state, green).await?.and_then(|w| w.start_xid) {
        let (mut work, mut blue) = (plan.green.connect().await?, plan.blue.connect().await?);
        back::prepare_blue(&blue).await?;
        let waited = Instant::now();
        loop {
            let written = back::round(state, &resolved.tables, &mut work, &mut blue, start).await?;
            if back::count(&written) == 0 && way_back::backlog(state, &work, start).await? == 0 {
                break;
            }
            let events: Vec<KeyEvent> = written
                .into_iter()
                .filter_map(|(id, keys)| Some((resolved.tables.iter().find(|t| t.id.as_str() == id)?.id.clone(), keys)))
                .flat_map(|(id, keys)| keys.into_iter().map(move |key| KeyEvent { table: id.clone(), key, lsn }))
                .collect();
            state.store_keys(green, &events).await?;
            if events.is_empty() {
                // A transaction still open on green holds rows back until it ends.
                if waited.elapsed() > CATCH_UP_BUDGET {
                    return Err(Error::CatchUpTimedOut { what: "carrying green's last writes back".into() });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    way_back::remove(plan, green).await?;
    way_back::update(
        state,
        green,
        serde_json::json!({ "open": false, "closed_by": "rolled-back", "last_rollback": record }),
        &["closed_at"],
    )
    .await?;
    state.set_phase(green, &Phase::Following { lsn: None }).await?;
    // Only now: until the phase says so, recovery reads it to tell where traffic is.
    if let Some(f) = way_back::window(state, green).await?.and_then(|w| w.blue_line_file) {
        let _ = std::fs::remove_file(f);
    }
    info!("rolled back: traffic is on blue, following resumes");
    Ok(())
}

/// Finishes or undoes a rollback that stopped at `step` (its process died).
pub(super) async fn recover(
    plan: &Plan,
    resolved: &ResolvedPlan,
    pb: &PgbouncerSettings,
    green: &Client,
    state: &State,
    step: CutoverStep,
) -> Result<()> {
    let mut entry = Bouncer::connect(&pb.admin, green_entry(pb)).await?;
    let window = way_back::window(state, green).await?.unwrap_or_default();
    let saved = window.blue_line_file.as_deref().and_then(|f| way_back::read_blue_line(std::path::Path::new(f)).ok());
    let on_blue = match (&pb.mode, &saved) {
        _ if step != CutoverStep::Repoint => false,
        (SwitchMode::Repoint { databases_file, .. }, Some(line)) => std::fs::read_to_string(databases_file)
            .ok()
            .and_then(|text| databases_file::find_entry(&text, &pb.database).map(|r| text[r].trim().to_string()))
            .is_some_and(|l| l.split_once('=').is_some_and(|(_, v)| v.trim() == line.trim())),
        // The v1 entry is enabled and resumed only at the point of no return.
        (SwitchMode::Handover { .. }, _) => {
            Bouncer::connect(&pb.admin, &pb.database).await?.entry().await?.is_some_and(|e| !e.paused && !e.disabled)
        }
        _ => false,
    };
    if on_blue {
        // Everything before the switch back (drain, final check, sequences, fence) had completed.
        match &pb.mode {
            SwitchMode::Repoint { .. } => {
                entry.reload().await?;
                entry.resume().await?;
            }
            SwitchMode::Handover { .. } => {
                entry.disable().await?;
                entry.kill().await?;
            }
        }
        let record = serde_json::json!({ "outcome": "rolled-back", "reason": format!("finished by recovery from step `{step}`") });
        finish_on_blue(plan, resolved, state, green, record).await?;
        info!(step = %step, "the interrupted rollback was finished: traffic is on blue");
    } else {
        if matches!(pb.mode, SwitchMode::Handover { .. }) {
            entry.enable().await?;
            hold_v1(pb, &Bouncer::connect(&pb.admin, &pb.database).await?).await?;
        }
        entry.resume().await?;
        if plan.cutover.fence_blue {
            let blue = plan.blue.connect().await?;
            if let Err(e) = set_fence(plan, &blue, true).await {
                warn!(error = %e, "could not fence blue again");
            }
        }
        state.set_phase(green, &Phase::Switched).await?;
        let record = serde_json::json!({ "outcome": "aborted", "reason": format!("a rollback stopped at step `{step}`; traffic stays on green") });
        way_back::update(state, green, serde_json::json!({ "last_rollback": record }), &[]).await?;
        info!(step = %step, "the interrupted rollback was undone: traffic stays on green, the way back stays open");
    }
    Ok(())
}

/// Recovers a rollback whose process died, unless a rollback or cutover is running. Called by
/// the reverse follower.
pub async fn recover_abandoned(plan: &Plan, resolved: &ResolvedPlan) -> Result<()> {
    let Ok(pb) = super::settings(plan) else { return Ok(()) };
    let green = plan.green.connect().await?;
    let key = super::cutover_lock_key(&plan.name);
    if !super::try_lock(&green, &key).await? {
        return Ok(());
    }
    let state = State::new(&plan.name);
    let result = match state.phase(&green).await? {
        Some(Phase::RollingBack { step }) => recover(plan, resolved, pb, &green, &state, step).await,
        _ => Ok(()),
    };
    let _ = green.execute("SELECT pg_advisory_unlock(hashtext($1))", &[&key]).await;
    result
}
