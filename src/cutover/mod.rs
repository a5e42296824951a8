//! Stage 5: cutover through PgBouncer.
//!
//! Preflight, then: stand the follower aside (cutover takes the follow gate), catch up and
//! re-verify the keys changed since the last verify while traffic still flows, `PAUSE db`
//! (bounded by `pause_timeout`), capture and apply up to blue's position, re-verify what the
//! drain applied, carry sequences, rewrite the database's line, `RELOAD`, `RESUME`. Nothing in
//! the pause scales with the table sizes: only with the writes since the catch-up.
//!
//! Every failure before `RELOAD` rolls back to blue (`RESUME`, phase `aborted`, following goes
//! on). The step reached is stored on green before each step that matters for recovery, so a
//! cutover killed half-way is finished or rolled back by the next `cutover` or by the running
//! follower: PgBouncer is never left paused.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::pgbouncer::{databases_file, plain_name, Bouncer, Paused};

use crate::{
    apply,
    capture::Capture,
    error::{pg_message, Error, Result},
    pg::{ident, ConnInfo, Side},
    plan::{Check, PgbouncerSettings, Plan, ResolvedPlan},
    shutdown::Shutdown,
    state::{CutoverStep, Phase, State},
    verify::KeyCheck,
};

/// Catching up before the pause may take this long; beyond it the follower is too far behind.
const CATCH_UP_BUDGET: Duration = Duration::from_secs(120);
/// Waiting for the cutover lock (held briefly by a follower recovering a dead cutover).
const CUTOVER_LOCK_WAIT: &str = "5s";
/// Waiting for a follower round to finish before it stands aside.
const GATE_WAIT: &str = "30s";
/// Keys compared per query in the re-verify.
const CHECK_KEYS: usize = 5_000;
/// Keys named when the final check finds differences.
const SHOW_KEYS: usize = 5;

fn cutover_lock_key(plan: &str) -> String {
    format!("bluegreen.cutover:{plan}")
}

fn settings(plan: &Plan) -> Result<&PgbouncerSettings> {
    plan.cutover.pgbouncer.as_ref().ok_or_else(|| {
        // Where the section belongs: under `[cutover]` when the plan has one, else at the end.
        let text = std::fs::read_to_string(&plan.path).unwrap_or_default();
        let cutover = text.lines().position(|l| l.trim_start().starts_with("[cutover]"));
        let (line, place) = match cutover {
            Some(i) => (i + 1, "below [cutover]"),
            None => (text.lines().count() + 1, "at the end of the plan"),
        };
        Error::PlanInvalid {
            path: plan.path.clone(),
            problems: vec![crate::error::PlanProblem {
                line,
                field: "cutover.pgbouncer".into(),
                message: format!(
                    "cutover needs a [cutover.pgbouncer] section (admin_url, database, databases_file, \
                     green_dsn); add it {place}"
                ),
            }],
        }
    })
}

async fn try_lock(green: &Client, key: &str) -> Result<bool> {
    Ok(green
        .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
        .await
        .map_err(Error::db("green: taking the cutover lock"))?
        .get(0))
}

/// `migrate cutover`: preflight, then (unless `dry_run`) the switch.
pub async fn run(plan: &Plan, resolved: &ResolvedPlan, dry_run: bool, shutdown: Shutdown) -> Result<Report> {
    let pb = settings(plan)?;
    let (blue, green) = tokio::try_join!(plan.blue.connect(), plan.green.connect())?;
    // A follower finishing a recovery holds the lock for a moment: wait briefly, not forever.
    green
        .batch_execute(&format!("SET lock_timeout = '{CUTOVER_LOCK_WAIT}'"))
        .await
        .map_err(Error::db("green: cutover session"))?;
    match green.execute("SELECT pg_advisory_lock(hashtext($1))", &[&cutover_lock_key(&plan.name)]).await {
        Ok(_) => {}
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
            return Err(Error::Busy { plan: plan.name.clone(), command: "cutover".into() })
        }
        Err(e) => return Err(Error::db("green: taking the cutover lock")(e)),
    }
    let state = State::new(&plan.name);
    if !state.exists(&green).await? {
        return Ok(Report::ended(Ended::NoState));
    }
    state.ensure(&green, &plan.name).await?;
    if let Some(Phase::CuttingOver { step }) = state.phase(&green).await? {
        warn!(step = %step, "an earlier cutover stopped half-way; recovering it first");
        recover(pb, &green, &state, step).await?;
    }
    if state.phase(&green).await? == Some(Phase::Switched) {
        return Ok(Report::ended(Ended::AlreadySwitched { database: pb.database.clone() }));
    }
    let checks = preflight(plan, pb, resolved, &blue, &green, &state).await?;
    let failed = checks.iter().filter(|c| !c.ok).count();
    let ended = if failed > 0 {
        Some(Ended::ChecksFailed { failed })
    } else if dry_run {
        Some(Ended::DryRunPassed)
    } else {
        None
    };
    if let Some(ended) = ended {
        return Ok(Report { checks, ..Report::ended(ended) });
    }
    let mut switch = Switch::new(plan, pb, resolved, blue, green, state).await?;
    let span = tracing::info_span!("cutover", plan = %plan.name, database = %pb.database);
    let result = tracing::Instrument::instrument(switch.execute(&shutdown), span).await;
    let mut report = switch.finish(result).await?;
    report.checks = checks;
    Ok(report)
}

/// How a cutover ended, when it did not fail.
#[derive(Debug, Clone)]
pub enum Ended {
    /// No migration state on green: not attempted.
    NoState,
    /// An earlier cutover switched already.
    AlreadySwitched {
        /// The PgBouncer database.
        database: String,
    },
    /// Preflight found problems: not attempted, traffic stays on blue.
    ChecksFailed {
        /// How many checks failed.
        failed: usize,
    },
    /// `--dry-run`: every check passed, nothing changed.
    DryRunPassed,
    /// Traffic is on green.
    Switched {
        /// The PgBouncer database.
        database: String,
    },
    /// Rolled back: traffic stays on blue, following continues.
    Aborted {
        /// Why.
        reason: String,
    },
}

/// What `cutover` did, for the command layer to print.
#[derive(Debug, Clone)]
pub struct Report {
    /// Preflight checks, in order (empty when preflight did not run).
    pub checks: Vec<Check>,
    /// How it ended.
    pub ended: Ended,
    /// Each step with its milliseconds.
    pub timeline: Vec<(String, f64)>,
    /// Sequences set on green: `sequence`, `blue`, `set`.
    pub sequences: Vec<serde_json::Value>,
    /// PAUSE sent to RESUME done, when traffic was paused.
    pub paused_ms: Option<f64>,
}

impl Report {
    fn ended(ended: Ended) -> Report {
        Report { checks: Vec::new(), ended, timeline: Vec::new(), sequences: Vec::new(), paused_ms: None }
    }

    /// Whether the command succeeded: switched, already switched, or a clean dry run.
    pub fn ok(&self) -> bool {
        matches!(self.ended, Ended::AlreadySwitched { .. } | Ended::DryRunPassed | Ended::Switched { .. })
    }
}

/// Finishes or rolls back a cutover that stopped at `step` (its process died).
async fn recover(pb: &PgbouncerSettings, green: &Client, state: &State, step: CutoverStep) -> Result<()> {
    let mut bouncer = Bouncer::connect(&pb.admin, &pb.database).await?;
    let green_line = format!("{} = {}", pb.database, pb.green_dsn);
    let repointed = step.green_may_be_live()
        && std::fs::read_to_string(&pb.databases_file)
            .ok()
            .and_then(|text| databases_file::find_entry(&text, &pb.database).map(|r| text[r].trim() == green_line))
            .unwrap_or(false);
    if repointed {
        // Everything before the repoint (drain, final check, sequences) had completed.
        bouncer.reload().await?;
        bouncer.resume().await?;
        state.set_phase(green, &Phase::Switched).await?;
        info!(step = %step, "the interrupted cutover was finished: traffic is on green");
    } else {
        bouncer.resume().await?;
        let reason = format!("a cutover stopped at step `{step}`; rolled back, traffic stays on blue");
        state.set_phase(green, &Phase::Aborted { reason }).await?;
        info!(step = %step, "the interrupted cutover was rolled back: traffic stays on blue");
    }
    Ok(())
}

/// Recovers a cutover whose process died, unless a cutover is running. Called by the follower.
pub async fn recover_abandoned(plan: &Plan) -> Result<()> {
    let Ok(pb) = settings(plan) else { return Ok(()) };
    let green = plan.green.connect().await?;
    if !try_lock(&green, &cutover_lock_key(&plan.name)).await? {
        return Ok(());
    }
    let state = State::new(&plan.name);
    let result = match state.phase(&green).await? {
        Some(Phase::CuttingOver { step }) => recover(pb, &green, &state, step).await,
        _ => Ok(()),
    };
    // Released now, not when the server notices the closed session: a cutover may be waiting.
    let _ = green.execute("SELECT pg_advisory_unlock(hashtext($1))", &[&cutover_lock_key(&plan.name)]).await;
    result
}

/// Every check that must hold before PAUSE.
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
    let following = matches!(phase, Some(Phase::Following { .. }) | Some(Phase::Aborted { .. }));
    check(
        "copy finished",
        following,
        match &phase {
            Some(p) if following => format!("phase {}", p.name()),
            Some(p) => format!("phase {}: wait until `migrate copy` reports following", p.name()),
            None => "no state".into(),
        },
    );
    let view = state.follower_view(green).await?;
    let follower = view.follower_active;
    check(
        "follower",
        true,
        if follower { "running".into() } else { "not running: cutover catches up by itself (slower)".into() },
    );
    match Capture::open(plan, resolved, plan.blue.connect().await?).await {
        Ok(c) => check(
            "capture on blue",
            true,
            match c {
                Capture::Logical(_) => "replication slot".into(),
                Capture::Trigger(_) => "change table".into(),
            },
        ),
        Err(e) => check("capture on blue", false, e.to_string()),
    }
    let blue_lsn = crate::pg::current_lsn(blue).await?;
    let oldest = [view.capture_lsn, view.oldest_pending].into_iter().flatten().min();
    let lag = oldest.map(|o| (blue_lsn - o).max(0) as u64);
    check(
        "capture lag",
        lag.is_some_and(|l| l <= plan.cutover.max_lag_bytes),
        match lag {
            Some(l) => format!(
                "{} behind blue, {} keys pending (bound: {}){}",
                crate::plan::render_size(l),
                view.pending,
                crate::plan::render_size(plan.cutover.max_lag_bytes),
                if l > plan.cutover.max_lag_bytes && !follower {
                    "; no follower is running, so it only grows: start `migrate copy`"
                } else {
                    ""
                }
            ),
            None => "unknown: capture has not stored a position yet".into(),
        },
    );
    let (verify_equal, verify_at, bad) = (view.verify_equal, view.verify_at.clone(), view.bad_buckets);
    let unverified: Vec<String> =
        resolved.tables.iter().filter(|t| !view.verified.contains(&t.id)).map(|t| t.target.to_string()).collect();
    check(
        "last verify clean",
        verify_equal && bad == 0 && unverified.is_empty(),
        match (&verify_at, unverified.is_empty()) {
            (None, _) => "never verified: run `migrate verify` first".into(),
            (Some(_), false) => format!("not verified: {}; run `migrate verify`", unverified.join(", ")),
            (Some(at), true) if verify_equal && bad == 0 => format!("equal at {at}"),
            (Some(at), true) => format!("differences at {at}: fix them and run `migrate verify` again"),
        },
    );
    let touched = view.touched;
    check("keys changed since that verify", true, format!("{touched} (re-verified during the cutover)"));

    check(
        "pgbouncer database name",
        plain_name(&pb.database),
        if plain_name(&pb.database) {
            pb.database.clone()
        } else {
            format!("`{}`: the admin console takes only letters, digits and _", pb.database)
        },
    );
    match pb.admin.connect_raw().await {
        Ok(admin) => {
            check("pgbouncer admin console", true, pb.admin.to_string());
            match crate::plan::prereq::pool_mode(&admin, &pb.database).await {
                Ok(Some(mode)) => check(
                    "pgbouncer pool_mode",
                    mode != "session",
                    if mode == "session" {
                        "session: PAUSE would wait for every client to disconnect; use transaction".into()
                    } else {
                        mode
                    },
                ),
                Ok(None) => check("pgbouncer pool_mode", false, format!("no database `{}` in PgBouncer", pb.database)),
                Err(e) => check("pgbouncer pool_mode", false, pg_message(&e)),
            }
        }
        Err(e) => check("pgbouncer admin console", false, e.to_string()),
    }
    check(
        "pgbouncer databases_file",
        databases_file_ok(pb).is_ok(),
        match databases_file_ok(pb) {
            Ok(()) => format!("{} holds `{}` and is writable", pb.databases_file.display(), pb.database),
            Err(e) => e,
        },
    );
    let (ok, detail) = same_green(plan, pb, green).await;
    check("green through green_dsn", ok, detail);
    let sequences: usize = resolved.tables.iter().map(|t| t.sequences.len()).sum();
    check("sequences to carry", true, sequences.to_string());
    Ok(checks)
}

/// The databases file holds the entry and its directory takes the atomic rename.
fn databases_file_ok(pb: &PgbouncerSettings) -> std::result::Result<(), String> {
    let path = &pb.databases_file;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if databases_file::find_entry(&text, &pb.database).is_none() {
        return Err(format!("{} has no line for `{}`", path.display(), pb.database));
    }
    let probe = path.with_extension("migrate-probe");
    std::fs::write(&probe, b"").map_err(|e| format!("cannot write beside {}: {e}", path.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Connects through `green_dsn` (with the green URL's credentials where it names none) and
/// checks that it reaches the same server and database as the plan's green.
async fn same_green(plan: &Plan, pb: &PgbouncerSettings, green: &Client) -> (bool, String) {
    let info = match ConnInfo::parse(Side::Green, &pb.green_dsn) {
        Ok(i) => i.with_credentials_of(&plan.green),
        Err(e) => return (false, format!("green_dsn: {e}")),
    };
    const WHO: &str = "SELECT system_identifier::text || '/' || current_database() FROM pg_control_system()";
    let direct = match green.query_one(WHO, &[]).await {
        Ok(r) => r.get::<_, String>(0),
        Err(e) => return (false, pg_message(&e)),
    };
    let client = match info.connect_raw().await {
        Ok(c) => c,
        Err(e) => return (false, format!("green_dsn {info}: {e}")),
    };
    match client.query_one(WHO, &[]).await {
        Ok(r) if r.get::<_, String>(0) == direct => (true, format!("{info} is the plan's green database")),
        Ok(_) => (false, format!("{info} is not the plan's green database (other server or database)")),
        Err(e) => (false, pg_message(&e)),
    }
}

/// One cutover in progress.
struct Switch<'a> {
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
    bouncer: Bouncer,
    check: KeyCheck,
    started: Instant,
    timeline: Vec<(String, f64)>,
    /// When PAUSE was sent: clients queue from then until RESUME.
    paused: Option<Instant>,
    /// Milliseconds from sending PAUSE to RESUME done.
    paused_ms: Option<f64>,
    /// The databases file line replaced, until RELOAD made the switch final.
    old_line: Option<String>,
    /// RELOAD pointed PgBouncer at green: from here on there is no way back to blue.
    committed: bool,
    sequences: Vec<serde_json::Value>,
}

impl<'a> Switch<'a> {
    async fn new(
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
            check,
            started: Instant::now(),
            timeline: Vec::new(),
            paused: None,
            paused_ms: None,
            old_line: None,
            committed: false,
            sequences: Vec::new(),
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

    async fn execute(&mut self, shutdown: &Shutdown) -> Result<()> {
        let t = Instant::now();
        self.green
            .batch_execute(&format!("SET lock_timeout = '{GATE_WAIT}'"))
            .await
            .map_err(Error::db("green: cutover session"))?;
        self.green
            .execute("SELECT pg_advisory_lock(hashtext($1))", &[&self.state.gate_key()])
            .await
            .map_err(Error::db("green: standing the follower aside (follow gate)"))?;
        self.record_step(CutoverStep::CatchUp).await?;
        self.mark("follower stood aside", t);

        let t = Instant::now();
        let deadline = Instant::now() + CATCH_UP_BUDGET;
        bounded(CATCH_UP_BUDGET, "catching up before the pause", self.catch_up(deadline, shutdown, "catching up"))
            .await?;
        self.mark("catch-up", t);
        let t = Instant::now();
        let differing = bounded(CATCH_UP_BUDGET, "re-verify before the pause", self.check_touched(false)).await?.len();
        info!(differing, "keys changed since the last verify checked; differing ones are checked again in the pause");
        self.mark("re-verify before pause", t);
        fault("cutover.caught-up", shutdown).await;
        interrupted(shutdown)?;

        self.record_step(CutoverStep::Pause).await?;
        let t = Instant::now();
        self.paused = Some(t);
        match self.bouncer.pause(self.pb.pause_timeout, shutdown).await? {
            Paused::Yes => {}
            Paused::TimedOut => {
                return Err(Error::Runtime(format!(
                    "PAUSE {} did not complete within {:?}: a transaction on blue kept a server connection busy",
                    self.pb.database, self.pb.pause_timeout
                )))
            }
            Paused::Interrupted => return Err(Error::Runtime("interrupted while pausing".into())),
        }
        self.mark("pause", t);
        fault("cutover.paused", shutdown).await;

        // Inside the pause, every step together must fit the same budget as PAUSE itself; a
        // server that stops answering counts as an overrun, not a hang with clients queued.
        let budget = self.pb.pause_timeout;
        bounded(budget, "the work in the pause", self.in_pause(Instant::now() + budget, shutdown)).await?;
        interrupted(shutdown)?;

        self.record_step(CutoverStep::Repoint).await?;
        fault("cutover.before-repoint", shutdown).await;
        let t = Instant::now();
        let old = databases_file::rewrite(&self.pb.databases_file, &self.pb.database, &self.pb.green_dsn)
            .map_err(|e| Error::Runtime(format!("rewriting {}: {e}", self.pb.databases_file.display())))?;
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

        self.state.set_phase(&self.green, &Phase::Switched).await?;
        self.save_record("switched").await?;
        if self.plan.cutover.fence_blue {
            self.fence_blue().await;
        }
        Ok(())
    }

    /// Drain, final check and sequences, while clients wait.
    async fn in_pause(&mut self, deadline: Instant, shutdown: &Shutdown) -> Result<()> {
        let t = Instant::now();
        self.catch_up(deadline, shutdown, "draining in the pause").await?;
        self.mark("drain", t);
        fault("cutover.drained", shutdown).await;
        let t = Instant::now();
        self.final_check().await?;
        self.mark("verify", t);
        let t = Instant::now();
        self.carry_sequences().await?;
        self.mark("sequences", t);
        Ok(())
    }

    /// Captures and applies until green holds everything blue committed when called.
    async fn catch_up(&mut self, deadline: Instant, shutdown: &Shutdown, what: &str) -> Result<()> {
        let target = self.capture.target().await?;
        let all: Vec<crate::state::TableId> = self.resolved.tables.iter().map(|t| t.id.clone()).collect();
        loop {
            let stored = self.capture.poll(&mut self.work, &self.state).await?;
            let applied =
                apply::apply_batch(&self.blue, &mut self.work, &self.state, &self.resolved.tables, &all).await?;
            if stored == 0 && applied == 0 && self.capture.reached(target).await? {
                return Ok(());
            }
            interrupted(shutdown)?;
            if Instant::now() > deadline {
                return Err(Error::Runtime(format!("{what}: green did not catch up with blue in time")));
            }
        }
    }

    /// Compares the keys changed since the last verify on both sides and forgets the equal
    /// ones. Returns the (table, key) pairs that differ.
    async fn check_touched(&mut self, final_check: bool) -> Result<Vec<(String, Vec<String>)>> {
        let mut differing = Vec::new();
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
        Err(Error::Runtime(format!(
            "{} row(s) differ between blue and green after the drain, e.g. {}; run `migrate verify` for details",
            differing.len(),
            shown.join(", ")
        )))
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
                self.sequences.push(serde_json::json!({"sequence": s.green_sequence, "blue": blue_value, "set": set}));
            }
        }
        Ok(())
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

    async fn save_record(&self, outcome: &str) -> Result<()> {
        let record = serde_json::json!({
            "outcome": outcome,
            "database": self.pb.database,
            "paused_ms": self.paused_ms,
            "total_ms": self.started.elapsed().as_secs_f64() * 1000.0,
            "steps": self.timeline.iter().map(|(s, ms)| serde_json::json!({"step": s, "ms": ms})).collect::<Vec<_>>(),
            "sequences": self.sequences,
        });
        self.state.set_cutover(&self.green, &record).await
    }

    fn report(&self, ended: Ended) -> Report {
        Report {
            checks: Vec::new(),
            ended,
            timeline: self.timeline.clone(),
            sequences: self.sequences.clone(),
            paused_ms: self.paused_ms,
        }
    }

    /// Turns the outcome of `execute` into the command's outcome, rolling back when needed.
    async fn finish(mut self, result: Result<()>) -> Result<Report> {
        match result {
            Ok(()) => Ok(self.report(Ended::Switched { database: self.pb.database.clone() })),
            Err(e) if self.committed => Err(Error::Runtime(format!(
                "PgBouncer already points at green, but: {e}; run `RESUME {}` on the admin console if clients wait",
                self.pb.database
            ))),
            Err(e) => match self.roll_back(&e.to_string()).await {
                Ok(()) => Ok(self.report(Ended::Aborted { reason: e.to_string() })),
                Err(e2) => Err(Error::Runtime(format!(
                    "cutover failed: {e}; rolling back failed too: {e2}; check that PgBouncer database `{}` \
                     is resumed and points at blue",
                    self.pb.database
                ))),
            },
        }
    }

    async fn roll_back(&mut self, reason: &str) -> Result<()> {
        let t = Instant::now();
        if let Some(old) = self.old_line.take() {
            let value = old.split_once('=').map(|(_, v)| v.trim().to_string()).unwrap_or_default();
            databases_file::rewrite(&self.pb.databases_file, &self.pb.database, &value)
                .map_err(|e| Error::Runtime(format!("restoring {}: {e}", self.pb.databases_file.display())))?;
            self.bouncer.reload().await?;
        }
        self.bouncer.resume().await?;
        self.paused = None;
        self.mark("roll back", t);
        // Clients flow again; recording the outcome must not hang on a stalled green.
        let record = async {
            self.state.set_phase(&self.green, &Phase::Aborted { reason: reason.to_string() }).await?;
            self.save_record("aborted").await
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
async fn fault(name: &str, shutdown: &Shutdown) {
    tokio::select! {
        _ = crate::fault::point(name) => {}
        _ = shutdown.wait() => {}
    }
}

fn interrupted(shutdown: &Shutdown) -> Result<()> {
    if shutdown.is_triggered() {
        return Err(Error::Runtime("interrupted (SIGINT/SIGTERM)".into()));
    }
    Ok(())
}
