//! The switch itself: stand the follower aside, catch up, check foreign keys and re-verify while
//! traffic flows, `before_pause` hooks, PAUSE, drain, final check, sequences, `in_pause` hooks,
//! then move traffic (repoint: rewrite the line, RELOAD, RESUME; handover: hold the v1 entry,
//! resume the v2 entry); or roll back to blue.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::{info, warn};

use super::{
    foreign_keys::ForeignKeys,
    hooks::{self, HookEnv},
    Ended, Report,
};
use crate::{
    apply::{self, Applied},
    capture::Capture,
    error::{pg_message, Error, Result},
    pg::ident,
    pgbouncer::{databases_file, Bouncer, Paused},
    plan::{HookPoint, PgbouncerSettings, Plan, ResolvedPlan, SwitchMode, V1AfterSwitch},
    shutdown::Shutdown,
    state::{CutoverOutcome, CutoverRecord, CutoverStep, HookRecord, Phase, SequenceSet, State, StepTime},
    verify::KeyCheck,
};

/// Catching up before the pause may take this long; beyond it the follower is too far behind.
const CATCH_UP_BUDGET: Duration = Duration::from_secs(120);
/// PgBouncer's wait before retrying a failed server login, shortened while the v2 entry resumes.
const LOGIN_RETRY: &str = "server_login_retry";
const SWITCH_LOGIN_RETRY: f64 = 0.05;
/// Catch-up rounds before the pause stop once one takes less than this...
const ROUND_SHORT: Duration = Duration::from_millis(300);
/// ...or after this many.
const MAX_ROUNDS: usize = 6;
/// A round longer than this and than the one before: apply is falling behind.
const DIVERGING_MS: f64 = 1000.0;
/// Keys compared per query in the re-verify.
const CHECK_KEYS: usize = 5_000;
/// Keys named when the final check finds differences.
const SHOW_KEYS: usize = 5;

/// One cutover in progress.
pub(super) struct Switch<'a> {
    plan: &'a Plan,
    pb: &'a PgbouncerSettings,
    resolved: &'a ResolvedPlan,
    state: State,
    blue: Client,
    /// Holds the cutover lock and the follow gate; records state.
    green: Client,
    /// Capture and apply.
    work: Client,
    capture: Capture,
    /// The application's entry (in handover mode: the v1 application's).
    bouncer: Bouncer,
    /// Handover mode: the v2 application's entry, held paused until the switch.
    v2: Option<Bouncer>,
    check: KeyCheck,
    fks: ForeignKeys,
    /// Keys applied since the full foreign-key check, re-checked in the pause.
    applied: Option<Applied>,
    hooks: Vec<HookRecord>,
    hook_env: HookEnv,
    /// Handover: the v1 entry was disabled (an abort enables it again).
    v1_disabled: bool,
    started: Instant,
    timeline: Vec<(String, f64)>,
    /// When PAUSE was sent: clients queue from then until RESUME.
    paused: Option<Instant>,
    /// Milliseconds from sending PAUSE to RESUME done.
    paused_ms: Option<f64>,
    /// The databases file line replaced, until RELOAD made the switch final.
    old_line: Option<String>,
    /// Traffic may reach green (RELOAD, or the v2 entry resumed): from here on there is no
    /// way back to blue.
    committed: bool,
    sequences: Vec<SequenceSet>,
    /// The way back's capture was installed on green (an abort removes it).
    way_back_installed: bool,
    /// Green's transaction horizon S, taken in the pause: the way back carries what lies past it.
    way_back_start: Option<i64>,
}

impl<'a> Switch<'a> {
    pub(super) async fn new(
        plan: &'a Plan,
        pb: &'a PgbouncerSettings,
        resolved: &'a ResolvedPlan,
        blue: Client,
        green: Client,
        state: State,
    ) -> Result<Self> {
        let work = plan.green.connect().await?;
        apply::prepare_green(&work).await?;
        let capture = Capture::open(plan, resolved, plan.blue.connect().await?).await?;
        let check = KeyCheck::new(&blue, &green).await?;
        let fks = ForeignKeys::load(resolved, &green).await?;
        let v2 = match &pb.mode {
            SwitchMode::Handover { v2_database, .. } => Some(Bouncer::connect(&pb.admin, v2_database).await?),
            SwitchMode::Repoint { .. } => None,
        };
        let hook_env = hooks::env(plan, pb, "cutover");
        Ok(Self {
            plan,
            pb,
            resolved,
            state,
            blue,
            green,
            work,
            capture,
            bouncer: Bouncer::connect(&pb.admin, &pb.database).await?,
            v2,
            check,
            fks,
            applied: None,
            hooks: Vec::new(),
            hook_env,
            v1_disabled: false,
            started: Instant::now(),
            timeline: Vec::new(),
            paused: None,
            paused_ms: None,
            old_line: None,
            committed: false,
            sequences: Vec::new(),
            way_back_installed: false,
            way_back_start: None,
        })
    }

    fn mark(&mut self, step: &str, since: Instant) {
        let ms = since.elapsed().as_secs_f64() * 1000.0;
        info!(step, ms = format!("{ms:.1}"), "cutover step done");
        self.timeline.push((step.to_string(), ms));
    }

    async fn record_step(&self, step: CutoverStep) -> Result<()> {
        self.state.set_phase(&self.green, &Phase::CuttingOver { step }).await
    }

    pub(super) async fn execute(&mut self, shutdown: &Shutdown) -> Result<()> {
        let t = Instant::now();
        self.green
            .batch_execute(&format!("SET lock_timeout = '{}ms'", self.plan.cutover.lock_timeout.as_millis()))
            .await
            .map_err(Error::db("green: cutover session"))?;
        self.green
            .execute("SELECT pg_advisory_lock(hashtext($1))", &[&self.state.gate_key()])
            .await
            .map_err(Error::db("green: standing the follower aside (follow gate)"))?;
        self.record_step(CutoverStep::CatchUp).await?;
        self.mark("follower stood aside", t);
        self.hold_v2(shutdown).await?;
        if self.plan.cutover.way_back {
            // Before the catch-up: green's targets have no application writers yet, so the
            // trigger DDL waits for nothing, and nothing slow enters the pause.
            let t = Instant::now();
            self.way_back_installed = true;
            bounded(
                Duration::from_secs(30),
                "opening the way back",
                crate::way_back::install(self.plan, self.resolved, &self.green),
            )
            .await?;
            self.mark("way back opened", t);
        }

        self.catch_up_rounds(shutdown).await?;
        fault("cutover.caught-up", shutdown).await;
        interrupted(shutdown)?;
        if self.plan.cutover.hooks.iter().any(|h| h.at == HookPoint::BeforePause) {
            self.run_hooks(HookPoint::BeforePause, None, shutdown).await?;
            interrupted(shutdown)?;
            // Nothing was applied while the hooks ran: catch up once more, or the drain in the
            // pause would hold all of their time's writes.
            let t = Instant::now();
            self.catch_up_before_pause(Instant::now() + CATCH_UP_BUDGET, shutdown).await?;
            self.mark("catch-up after hooks", t);
        }

        self.record_step(CutoverStep::Pause).await?;
        let t = Instant::now();
        self.paused = Some(t);
        super::pause_entry(&mut self.bouncer, self.pb.pause_timeout, shutdown).await?;
        self.mark("pause", t);
        fault("cutover.paused", shutdown).await;

        // Inside the pause, every step together must fit the same budget as PAUSE itself; a
        // server that stops answering counts as an overrun, not a hang with clients queued.
        let budget = self.pb.pause_timeout;
        tokio::time::timeout(budget, self.in_pause(Instant::now() + budget, shutdown))
            .await
            .unwrap_or(Err(Error::PauseBudget { waited: budget }))?;
        interrupted(shutdown)?;

        if let Some(start) = self.way_back_start {
            self.record_window(start).await?;
        }
        self.record_step(CutoverStep::Repoint).await?;
        fault("cutover.before-repoint", shutdown).await;
        match &self.pb.mode {
            SwitchMode::Repoint { databases_file, green_dsn } => {
                self.repoint(databases_file, green_dsn, shutdown).await?
            }
            SwitchMode::Handover { v1_after_switch, .. } => self.hand_over(*v1_after_switch, shutdown).await?,
        }

        self.state.set_phase(&self.green, &Phase::Switched).await?;
        let hooks = self.run_hooks(HookPoint::AfterSwitch, None, shutdown).await;
        self.save_record(CutoverOutcome::Switched).await?;
        if self.plan.cutover.fence_blue {
            self.fence_blue().await;
        }
        hooks
    }

    /// Catches up and re-verifies in rounds while traffic flows: each round only has the writes
    /// made during the one before, so under a steady writer they shrink until one is short, and
    /// the drain in the pause then has only that round's writes. Refuses (before anything is
    /// paused) when the rounds show apply cannot keep up.
    async fn catch_up_rounds(&mut self, shutdown: &Shutdown) -> Result<()> {
        let deadline = Instant::now() + CATCH_UP_BUDGET;
        let mut rounds_ms: Vec<f64> = Vec::new();
        for round in 1..=MAX_ROUNDS {
            let round_started = Instant::now();
            let name = if round == 1 { String::new() } else { format!(" (round {round})") };
            self.catch_up_before_pause(deadline, shutdown).await?;
            self.mark(&format!("catch-up{name}"), round_started);
            if round == 1 {
                let t = Instant::now();
                let (ok, detail) =
                    bounded(CATCH_UP_BUDGET, "checking foreign keys", self.fks.check_all(self.resolved, &self.green))
                        .await?;
                // Orphans now may be a child applied a moment before its parent; the pause
                // looks at them again, with every key applied from here on.
                info!(hold = ok, detail = %detail, "foreign keys between planned tables checked; changed rows are checked again in the pause");
                self.applied = Some(Applied::new());
                self.mark("foreign keys", t);
            }
            let t = Instant::now();
            let differing =
                bounded(CATCH_UP_BUDGET, "re-verify before the pause", self.check_touched(false)).await?.len();
            info!(
                differing,
                round, "keys changed since the last verify checked; differing ones are checked again in the pause"
            );
            self.mark(&format!("re-verify before pause{name}"), t);
            interrupted(shutdown)?;
            if round_started.elapsed() < ROUND_SHORT {
                break;
            }
            rounds_ms.push(round_started.elapsed().as_secs_f64() * 1000.0);
            // Each round holds the writes of the one before: a long round longer than the one
            // before means blue is written faster than apply keeps up, and the drain would not
            // fit the pause. Said now, before any client waits.
            if let [.., before, last] = rounds_ms[..] {
                if last > before && last > DIVERGING_MS {
                    return Err(Error::NotConverging { rounds_ms });
                }
            }
            // Rounds that stay level: the drain holds about one round's writes, which fits when
            // a round takes well within the pause budget.
            let last = Duration::from_secs_f64(rounds_ms.last().copied().unwrap_or_default() / 1000.0);
            if round == MAX_ROUNDS && last * 2 > self.pb.pause_timeout {
                return Err(Error::NotConverging { rounds_ms });
            }
        }
        Ok(())
    }

    /// A catch-up while traffic flows. Its own deadline names a slow catch-up; the outer bound
    /// only catches a server that stopped answering.
    async fn catch_up_before_pause(&mut self, deadline: Instant, shutdown: &Shutdown) -> Result<()> {
        bounded(
            CATCH_UP_BUDGET + Duration::from_secs(30),
            "catching up before the pause",
            self.catch_up(deadline, shutdown, "catching up"),
        )
        .await
    }

    /// Handover mode: makes sure the v2 entry is paused, so no v2 statement reaches green before
    /// the switch (it stays paused if this cutover aborts).
    async fn hold_v2(&mut self, shutdown: &Shutdown) -> Result<()> {
        let Some(v2) = self.v2.as_mut() else { return Ok(()) };
        let t = Instant::now();
        let entry = v2.entry().await?;
        if entry.as_ref().is_some_and(|e| e.paused) {
            return Ok(());
        }
        let database = match &self.pb.mode {
            SwitchMode::Handover { v2_database, .. } => v2_database.clone(),
            SwitchMode::Repoint { .. } => return Ok(()),
        };
        match v2.pause(self.pb.pause_timeout, shutdown).await? {
            Paused::Yes => {}
            Paused::TimedOut => {
                v2.resume().await?;
                return Err(Error::PauseTimedOut { database, waited: self.pb.pause_timeout });
            }
            Paused::Interrupted => return Err(Error::Interrupted { during: "while pausing the v2 entry".into() }),
        }
        self.mark("v2 entry paused", t);
        Ok(())
    }

    /// Repoint mode: rewrite the entry's line to green, RELOAD (the point of no return), RESUME.
    async fn repoint(&mut self, databases_file: &std::path::Path, green_dsn: &str, shutdown: &Shutdown) -> Result<()> {
        let t = Instant::now();
        let old = databases_file::rewrite(databases_file, &self.pb.database, green_dsn)
            .map_err(|source| Error::File { what: "rewriting", path: databases_file.to_path_buf(), source })?;
        self.old_line = Some(old);
        self.mark("repoint", t);
        fault("cutover.repointed", shutdown).await;
        let t = Instant::now();
        self.bouncer.reload().await?;
        self.committed = true;
        self.mark("reload", t);
        fault("cutover.reloaded", shutdown).await;
        let t = Instant::now();
        self.bouncer.resume().await?;
        self.paused_ms = self.paused.take().map(|p| p.elapsed().as_secs_f64() * 1000.0);
        self.mark("resume", t);
        Ok(())
    }

    /// Handover mode: the v1 entry never resumes (v1 statements must not succeed anywhere once
    /// green is live: blue is no longer followed, green has the other schema). Disabled first, so
    /// no new v1 client gets in; then the v2 entry resumes (the point of no return); then the v1
    /// entry's queued clients are dropped with an error.
    async fn hand_over(&mut self, v1_after: V1AfterSwitch, shutdown: &Shutdown) -> Result<()> {
        let t = Instant::now();
        if v1_after == V1AfterSwitch::Disable {
            self.bouncer.disable().await?;
            self.v1_disabled = true;
        }
        self.mark("hold v1 entry", t);
        fault("cutover.v1-held", shutdown).await;
        let t = Instant::now();
        let v2 = self.v2.as_mut().ok_or(Error::Internal("handover without a v2 entry"))?;
        // A client that logged in to the paused v2 entry before its pool ever had a server
        // connection made PgBouncer try one, which the pause closed; PgBouncer then waits
        // `server_login_retry` (15 s by default) before trying again, and those clients with
        // it. Shortened for the moment of the switch, then put back.
        let retry = v2.config(LOGIN_RETRY).await?;
        let shortened = match retry.as_deref().and_then(|r| r.parse::<f64>().ok()) {
            Some(r) if r > SWITCH_LOGIN_RETRY => v2.set(LOGIN_RETRY, &SWITCH_LOGIN_RETRY.to_string()).await.is_ok(),
            _ => false,
        };
        v2.enable().await?;
        // From the first RESUME sent the v2 entry may serve green, even if no answer comes back
        // (a retry on a fresh console session may fail after the first took effect): never roll
        // back to v1 from here.
        self.committed = true;
        v2.resume().await?;
        self.paused_ms = self.paused.take().map(|p| p.elapsed().as_secs_f64() * 1000.0);
        self.mark("resume v2 entry", t);
        fault("cutover.v2-resumed", shutdown).await;
        if v1_after == V1AfterSwitch::Disable {
            let t = Instant::now();
            self.bouncer.kill().await?;
            self.mark("v1 clients dropped", t);
        }
        if let (true, Some(original)) = (shortened, retry) {
            let t = Instant::now();
            let v2 = self.v2.as_ref().ok_or(Error::Internal("handover without a v2 entry"))?;
            let served = async {
                while v2.waiting().await? > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok::<_, Error>(())
            };
            if let Err(e) = bounded(Duration::from_secs(2), "v2 clients getting a server", served).await {
                warn!(error = %e, "v2 clients still wait for a server connection");
            }
            v2.set(LOGIN_RETRY, &original).await?;
            self.mark("v2 clients served", t);
        }
        Ok(())
    }

    /// Runs the hooks at `at` (if any) as one timeline step.
    async fn run_hooks(&mut self, at: HookPoint, deadline: Option<Instant>, shutdown: &Shutdown) -> Result<()> {
        let t = Instant::now();
        let all = &self.plan.cutover.hooks;
        let Some(result) =
            hooks::run_point(all, at, &self.hook_env, "switched", deadline, shutdown, &mut self.hooks).await
        else {
            return Ok(());
        };
        self.mark(&format!("{} hooks", at.name()), t);
        result
    }

    /// Drain, final check, foreign keys, sequences and `in_pause` hooks, while clients wait.
    async fn in_pause(&mut self, deadline: Instant, shutdown: &Shutdown) -> Result<()> {
        let t = Instant::now();
        self.catch_up(deadline, shutdown, "draining in the pause").await?;
        self.mark("drain", t);
        fault("cutover.drained", shutdown).await;
        let t = Instant::now();
        self.final_check().await?;
        self.mark("verify", t);
        let t = Instant::now();
        let none = Applied::new();
        let broken = self.fks.check_changed(self.resolved, &self.green, self.applied.as_ref().unwrap_or(&none)).await?;
        if !broken.is_empty() {
            return Err(Error::OrphanRows { shown: broken });
        }
        self.mark("foreign keys in pause", t);
        let t = Instant::now();
        self.carry_sequences().await?;
        self.mark("sequences", t);
        if self.way_back_installed {
            // S before the hooks: a hook that lets writes reach green must have them carried back.
            self.way_back_start = Some(crate::way_back::horizon(&self.green).await?);
        }
        self.run_hooks(HookPoint::InPause, Some(deadline), shutdown).await
    }

    /// Captures and applies until green holds everything blue committed when called. It chases
    /// that fixed point, not "a round with nothing new" (which never comes while the
    /// application writes): capture until it has passed the point, then apply until no key of
    /// a change at or below it is pending. Keys of later changes are the follower's (before the
    /// pause) or the drain's (in it).
    async fn catch_up(&mut self, deadline: Instant, shutdown: &Shutdown, what: &str) -> Result<()> {
        let target = self.capture.target().await?;
        let all: Vec<crate::state::TableId> = self.resolved.tables.iter().map(|t| t.id.clone()).collect();
        let mut captured = false;
        let mut last_report = Instant::now();
        loop {
            if !captured {
                self.capture.poll(&mut self.work, &self.state).await?;
                captured = self.capture.reached(target).await?;
            }
            if captured && !self.state.pending_through(&self.work, target.lsn()).await? {
                return Ok(());
            }
            let applied = apply::apply_batch(
                &self.blue,
                &mut self.work,
                &self.state,
                &self.resolved.tables,
                &all,
                (0, 1),
                // Always recorded: recording is never wrong, and a cutover comes after a verify.
                &mut true,
            )
            .await?;
            if let Some(since) = self.applied.as_mut() {
                for (id, keys) in applied {
                    since.entry(id).or_default().extend(keys);
                }
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                let pending = self.state.pending_count(&self.work).await?;
                info!(step = what, captured_to_target = captured, pending, "catching up");
            }
            interrupted(shutdown)?;
            if Instant::now() > deadline {
                return Err(Error::CatchUpTimedOut { what: what.to_string() });
            }
        }
    }

    /// Compares the keys changed since the last verify on both sides and forgets the equal
    /// ones. Returns the (table, key) pairs that differ.
    async fn check_touched(&mut self, final_check: bool) -> Result<Vec<(String, Vec<String>)>> {
        let mut differing = Vec::new();
        // The follower stands aside while a cutover runs: nothing else compacts meanwhile.
        self.state.compact_all_touched(&self.green).await?;
        for t in &self.resolved.tables {
            let keys = self.state.touched_keys(&self.green, &t.id).await?;
            for batch in keys.chunks(CHECK_KEYS) {
                let bad = self.check.differing(&self.blue, &self.green, t, batch).await?;
                let equal: Vec<Vec<String>> = batch.iter().filter(|k| !bad.contains(k)).cloned().collect();
                self.state.forget_touched(&self.green, &t.id, &equal).await?;
                differing.extend(bad.into_iter().map(|k| (t.target.to_string(), k)));
            }
        }
        if final_check {
            info!(differing = differing.len(), "final check of changed keys");
        }
        Ok(differing)
    }

    async fn final_check(&mut self) -> Result<()> {
        let differing = self.check_touched(true).await?;
        if differing.is_empty() {
            return Ok(());
        }
        let mut shown = Vec::new();
        for (table, key) in differing.iter().take(SHOW_KEYS) {
            let t = self.resolved.tables.iter().find(|t| t.target.to_string() == *table);
            let how = match t {
                Some(t) => self.check.describe(&self.blue, &self.green, t, std::slice::from_ref(key)).await?,
                None => Vec::new(),
            };
            let detail = how
                .iter()
                .map(|d| match d.kind {
                    crate::verify::Kind::Differs => d
                        .columns
                        .iter()
                        .map(|(c, b, g)| format!("{c}: blue {b:?}, green {g:?}"))
                        .collect::<Vec<_>>()
                        .join("; "),
                    ref k => format!("{k:?}"),
                })
                .collect::<Vec<_>>()
                .join("; ");
            shown.push(format!("{table} {key:?} ({detail})"));
        }
        Err(Error::DrainDiffers { count: differing.len(), shown })
    }

    /// Sets every green sequence behind a mapped column past blue's value (or green's largest
    /// value, when the column is transformed), plus the configured gap.
    async fn carry_sequences(&mut self) -> Result<()> {
        let gap = self.plan.cutover.sequence_gap;
        for t in &self.resolved.tables {
            for s in &t.sequences {
                let blue_value: Option<i64> = match &s.blue_sequence {
                    Some(b) => self
                        .blue
                        .query_one(
                            &format!("SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {b}"),
                            &[],
                        )
                        .await
                        .map_err(Error::db(format!("blue: reading sequence {b}")))?
                        .get(0),
                    None => None,
                };
                let green_max: Option<i64> = self
                    .green
                    .query_one(&format!("SELECT max({})::int8 FROM {}", ident(&s.column), t.target.quoted()), &[])
                    .await
                    .map_err(Error::db(format!("green: largest {}.{}", t.target, s.column)))?
                    .get(0);
                let Some(value) = blue_value.into_iter().chain(green_max).max() else { continue };
                let set: i64 = self
                    .green
                    .query_one("SELECT setval($1::text::regclass, $2)", &[&s.green_sequence, &(value + gap)])
                    .await
                    .map_err(Error::db(format!("green: setting sequence {}", s.green_sequence)))?
                    .get(0);
                self.sequences.push(SequenceSet { sequence: s.green_sequence.clone(), blue: blue_value, set });
            }
        }
        Ok(())
    }

    /// Stores the open window: S, and where blue's databases-file value is saved for a rollback
    /// to write back (beside the databases file: it may hold a password, which never goes into
    /// state).
    async fn record_window(&self, start: i64) -> Result<()> {
        let blue_line_file = match &self.pb.mode {
            SwitchMode::Repoint { databases_file, .. } => {
                let text = std::fs::read_to_string(databases_file).map_err(|source| Error::File {
                    what: "reading",
                    path: databases_file.clone(),
                    source,
                })?;
                let value = databases_file::find_entry(&text, &self.pb.database)
                    .and_then(|r| text[r].split_once('=').map(|(_, v)| v.trim().to_string()))
                    .ok_or(Error::Internal("the databases file lost the entry during the cutover"))?;
                let path = crate::way_back::blue_line_path(databases_file, &self.plan.name);
                crate::way_back::save_blue_line(&path, &value)?;
                Some(path.display().to_string())
            }
            SwitchMode::Handover { .. } => None,
        };
        let window =
            crate::way_back::Window { open: true, start_xid: Some(start), blue_line_file, ..Default::default() };
        let mut patch = serde_json::to_value(&window).unwrap_or_default();
        // The record of an earlier window's rollback stays for `status`.
        if let Some(o) = patch.as_object_mut() {
            o.remove("last_rollback");
        }
        crate::way_back::update(&self.state, &self.green, patch, &["opened_at"]).await
    }

    /// New sessions on blue are read-only from now on: a stray writer fails loudly instead of
    /// writing where nobody reads. Sessions already open are left alone.
    async fn fence_blue(&self) {
        let db = self.plan.blue.dbname().unwrap_or_default().to_string();
        let sql = format!("ALTER DATABASE {} SET default_transaction_read_only = on", ident(&db));
        match self.blue.batch_execute(&sql).await {
            Ok(()) => info!(database = %db, "blue fenced: new sessions are read-only"),
            Err(e) => warn!(error = %pg_message(&e), "could not fence blue (needs database owner)"),
        }
    }

    async fn save_record(&self, outcome: CutoverOutcome) -> Result<()> {
        let record = CutoverRecord {
            outcome,
            database: self.pb.database.clone(),
            paused_ms: self.paused_ms,
            total_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            steps: self.timeline.iter().map(|(step, ms)| StepTime { step: step.clone(), ms: *ms }).collect(),
            sequences: self.sequences.clone(),
            mode: Some(self.pb.mode.name().to_string()),
            hooks: self.hooks.clone(),
        };
        self.state.set_cutover(&self.green, &record).await
    }

    fn report(&self, ended: Ended) -> Report {
        Report {
            error: None,
            ended,
            timeline: self.timeline.clone(),
            sequences: self.sequences.clone(),
            paused_ms: self.paused_ms,
            hooks: self.hooks.clone(),
        }
    }

    /// Turns the outcome of `execute` into the command's outcome, rolling back when needed.
    pub(super) async fn finish(mut self, result: Result<()>) -> Report {
        let database = self.pb.database.clone();
        match result {
            Ok(()) => self.report(Ended::Switched { traffic: super::traffic_on_green(self.pb) }),
            Err(e) if self.committed => {
                let advice = match &self.pb.mode {
                    SwitchMode::Repoint { .. } => {
                        format!("run `RESUME {database}` on PgBouncer's admin console if clients wait")
                    }
                    SwitchMode::Handover { v2_database, .. } => format!(
                        "check on PgBouncer's admin console that `{v2_database}` is resumed (RESUME {v2_database}) \
                         and `{database}` stays paused or disabled"
                    ),
                };
                Report {
                    error: Some(Error::AfterSwitch { advice, source: Box::new(e) }),
                    ..self.report(Ended::Switched { traffic: super::traffic_on_green(self.pb) })
                }
            }
            Err(e) => match self.roll_back(&e.to_string()).await {
                Ok(()) => self.report(Ended::Aborted { reason: e.to_string() }),
                Err(e2) => Report {
                    error: Some(Error::RollbackFailed { database, error: Box::new(e), rollback: Box::new(e2) }),
                    ..self.report(Ended::Aborted { reason: "rolling back failed".into() })
                },
            },
        }
    }

    async fn roll_back(&mut self, reason: &str) -> Result<()> {
        let t = Instant::now();
        if let (Some(old), SwitchMode::Repoint { databases_file, .. }) = (self.old_line.take(), &self.pb.mode) {
            let value = old.split_once('=').map(|(_, v)| v.trim().to_string()).unwrap_or_default();
            databases_file::rewrite(databases_file, &self.pb.database, &value).map_err(|source| Error::File {
                what: "restoring",
                path: databases_file.clone(),
                source,
            })?;
            self.bouncer.reload().await?;
        }
        if self.v1_disabled {
            self.bouncer.enable().await?;
            self.v1_disabled = false;
        }
        self.bouncer.resume().await?;
        self.paused = None;
        self.mark("roll back", t);
        if self.way_back_installed {
            // Traffic stays on blue: green's capture would only pile up rows, and a window
            // recorded before the failure is not open.
            let removed = bounded(Duration::from_secs(10), "removing the way back", async {
                crate::way_back::close_aborted(&self.state, &self.green).await?;
                crate::way_back::remove(self.plan, &self.green).await
            })
            .await;
            if let Err(e) = removed {
                warn!(error = %e, "could not remove the way back's capture from green; the next cutover or `cleanup` removes it");
            }
        }
        // Undoing what an in_pause hook flipped is the on_abort hooks' job; they run with
        // traffic flowing again, and their failure does not change how the cutover ended.
        if let Err(e) = self.run_hooks(HookPoint::OnAbort, None, &Shutdown::manual()).await {
            warn!(error = %e, "an on_abort hook failed");
        }
        // Clients flow again; recording the outcome must not hang on a stalled green.
        let record = async {
            self.state.set_phase(&self.green, &Phase::Aborted { reason: reason.to_string() }).await?;
            self.save_record(CutoverOutcome::Aborted).await
        };
        bounded(Duration::from_secs(10), "recording the abort on green", record).await
    }
}

/// Runs `fut`, giving up after `budget` (a server that stopped answering).
async fn bounded<T>(budget: Duration, what: &str, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(budget, fut)
        .await
        .unwrap_or_else(|_| Err(Error::Stalled { what: what.to_string(), waited: budget }))
}

/// A fault-injection point that a signal can interrupt.
pub(super) async fn fault(name: &str, shutdown: &Shutdown) {
    tokio::select! {
        _ = crate::fault::point(name) => {}
        _ = shutdown.wait() => {}
    }
}

pub(super) fn interrupted(shutdown: &Shutdown) -> Result<()> {
    if shutdown.is_triggered() {
        return Err(Error::Interrupted { during: "(SIGINT/SIGTERM)".into() });
    }
    Ok(())
}
