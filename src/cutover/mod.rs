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

use tokio_postgres::Client;
use tracing::{info, warn};

mod foreign_keys;
mod hooks;
mod preflight;
pub mod rollback;
mod switch;

use crate::{
    error::{Error, Result},
    pgbouncer::{databases_file, Bouncer},
    plan::{Check, PgbouncerSettings, Plan, ResolvedPlan, SwitchMode, V1AfterSwitch},
    shutdown::Shutdown,
    state::{CutoverStep, Phase, State},
};
use preflight::preflight;
use switch::Switch;

/// Waiting for the cutover lock (held briefly by a follower recovering a dead cutover).
const CUTOVER_LOCK_WAIT: &str = "5s";

fn cutover_lock_key(plan: &str) -> String {
    format!("bluegreen.cutover:{plan}")
}

/// The plan's `[cutover.pgbouncer]`, or a plan error saying where to add it.
pub fn settings(plan: &Plan) -> Result<&PgbouncerSettings> {
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
                    "cutover needs a [cutover.pgbouncer] section (admin_url, database, and databases_file \
                     with green_dsn, or mode = \"handover\" with v2_database); add it {place}"
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

/// `migrate cutover`: preflight, then (unless `dry_run`) the switch. `on_preflight` sees the
/// checks as soon as they are known, before anything is switched. A failure after the switch
/// began comes back in [`Report::error`], with the timeline up to it.
pub async fn run(
    plan: &Plan,
    resolved: &ResolvedPlan,
    dry_run: bool,
    shutdown: Shutdown,
    on_preflight: &mut (dyn FnMut(&[Check]) + Send),
) -> Result<Report> {
    let pb = settings(plan)?;
    let (blue, green) = tokio::try_join!(plan.blue.connect(), plan.green.connect())?;
    lock(plan, &green, "cutover").await?;
    let state = State::new(&plan.name);
    if !state.exists(&green).await? {
        return Ok(Report::ended(Ended::NoState));
    }
    state.ensure(&green, &plan.name).await?;
    match state.phase(&green).await? {
        Some(Phase::CuttingOver { step }) => {
            warn!(step = %step, "an earlier cutover stopped half-way; recovering it first");
            recover(plan, pb, &green, &state, step).await?;
        }
        Some(Phase::RollingBack { step }) => {
            warn!(step = %step, "an earlier rollback stopped half-way; recovering it first");
            rollback::recover(plan, resolved, pb, &green, &state, step).await?;
        }
        _ => {}
    }
    if state.phase(&green).await? == Some(Phase::Switched) {
        return Ok(Report::ended(Ended::AlreadySwitched { traffic: traffic_on_green(pb) }));
    }
    let checks = preflight(plan, pb, resolved, &blue, &green, &state, dry_run).await?;
    on_preflight(&checks);
    let failed = checks.iter().filter(|c| !c.ok).count();
    let ended = if failed > 0 {
        Some(Ended::ChecksFailed { failed })
    } else if dry_run {
        Some(Ended::DryRunPassed)
    } else {
        None
    };
    if let Some(ended) = ended {
        return Ok(Report::ended(ended));
    }
    if !wait_while_postponed(&state, &green, &shutdown).await? {
        return Ok(Report::ended(Ended::Postponed));
    }
    let mut switch = Switch::new(plan, pb, resolved, blue, green, state).await?;
    let span = tracing::info_span!("cutover", plan = %plan.name, database = %pb.database);
    let result = tracing::Instrument::instrument(switch.execute(&shutdown), span).await;
    Ok(switch.finish(result).await)
}

/// Takes the plan's cutover lock on green (a cutover, a rollback and `finish` of one plan never
/// overlap), held until the session ends.
pub async fn lock(plan: &Plan, green: &Client, command: &str) -> Result<()> {
    // A follower finishing a recovery holds the lock for a moment: wait briefly, not forever.
    green
        .batch_execute(&format!("SET lock_timeout = '{CUTOVER_LOCK_WAIT}'"))
        .await
        .map_err(Error::db(format!("green: {command} session")))?;
    match green.execute("SELECT pg_advisory_lock(hashtext($1))", &[&cutover_lock_key(&plan.name)]).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
            Err(Error::Busy { plan: plan.name.clone(), command: command.into() })
        }
        Err(e) => Err(Error::db("green: taking the cutover lock")(e)),
    }
}

/// `PAUSE`s `bouncer`'s entry within `timeout`: one that does not complete in time is answered
/// with RESUME (by [`Bouncer::pause`]) and named; a signal meanwhile ends it.
async fn pause_entry(bouncer: &mut Bouncer, timeout: std::time::Duration, shutdown: &Shutdown) -> Result<()> {
    match bouncer.pause(timeout, shutdown).await? {
        crate::pgbouncer::Paused::Yes => Ok(()),
        crate::pgbouncer::Paused::TimedOut => {
            Err(Error::PauseTimedOut { database: bouncer.database().to_string(), waited: timeout })
        }
        crate::pgbouncer::Paused::Interrupted => Err(Error::Interrupted { during: "while pausing".into() }),
    }
}

/// How often a postponed cutover looks whether it may go on, and says it waits.
const POSTPONED_POLL: std::time::Duration = std::time::Duration::from_millis(500);
const POSTPONED_SAY_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits while `migrate control PLAN postpone` holds (gh-ost's postpone flag): the follower
/// keeps green in step meanwhile. `false` when interrupted while waiting.
async fn wait_while_postponed(state: &State, green: &tokio_postgres::Client, shutdown: &Shutdown) -> Result<bool> {
    let mut said: Option<std::time::Instant> = None;
    while state.control(green).await?.postponed {
        if said.is_none_or(|t| t.elapsed() >= POSTPONED_SAY_EVERY) {
            warn!(
                "cutover postponed by `migrate control PLAN postpone`; waiting for `migrate control PLAN unpostpone`"
            );
            said = Some(std::time::Instant::now());
        }
        tokio::select! {
            _ = tokio::time::sleep(POSTPONED_POLL) => {}
            _ = shutdown.wait() => return Ok(false),
        }
    }
    if said.is_some() {
        tracing::info!("cutover no longer postponed; going on");
    }
    Ok(true)
}

/// How a cutover ended, when it did not fail.
#[derive(Debug, Clone)]
pub enum Ended {
    /// No migration state on green: not attempted.
    NoState,
    /// Interrupted while postponed: not attempted, traffic stays on blue.
    Postponed,
    /// An earlier cutover switched already.
    AlreadySwitched {
        /// Where traffic goes now, in words.
        traffic: String,
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
        /// Where traffic goes now, in words.
        traffic: String,
    },
    /// `rollback` finished: traffic is on blue again, following resumes.
    RolledBack {
        /// Where traffic goes now, in words.
        traffic: String,
    },
    /// Rolled back: traffic stays on blue, following continues (for `rollback`: it gave up,
    /// traffic stays on green and the way back stays open).
    Aborted {
        /// Why.
        reason: String,
    },
}

/// What `cutover` did, for the command layer to print.
#[derive(Debug)]
pub struct Report {
    /// How it ended (when it failed: how far it got).
    pub ended: Ended,
    /// The failure that ended it, when rolling back was not possible or not enough: traffic
    /// may be on green, or PgBouncer may need a hand (exit 3).
    pub error: Option<Error>,
    /// Each step with its milliseconds.
    pub timeline: Vec<(String, f64)>,
    /// Sequences set on green.
    pub sequences: Vec<crate::state::SequenceSet>,
    /// PAUSE sent to RESUME done, when traffic was paused.
    pub paused_ms: Option<f64>,
    /// Each hook run.
    pub hooks: Vec<crate::state::HookRecord>,
}

impl Report {
    fn ended(ended: Ended) -> Report {
        Report { ended, error: None, timeline: Vec::new(), sequences: Vec::new(), paused_ms: None, hooks: Vec::new() }
    }

    /// Whether the command succeeded: switched, already switched, or a clean dry run.
    pub fn ok(&self) -> bool {
        matches!(
            self.ended,
            Ended::AlreadySwitched { .. } | Ended::DryRunPassed | Ended::Switched { .. } | Ended::RolledBack { .. }
        )
    }
}

/// Where traffic goes once switched, for the report.
fn traffic_on_green(pb: &PgbouncerSettings) -> String {
    match &pb.mode {
        SwitchMode::Repoint { .. } => format!("PgBouncer database `{}` points at green", pb.database),
        SwitchMode::Handover { v2_database, v1_after_switch } => format!(
            "the v2 entry `{v2_database}` (green) takes traffic; the v1 entry `{}` {}",
            pb.database,
            match v1_after_switch {
                V1AfterSwitch::Disable => "is disabled",
                V1AfterSwitch::Pause => "stays paused",
            }
        ),
    }
}

/// Finishes or rolls back a cutover that stopped at `step` (its process died).
async fn recover(plan: &Plan, pb: &PgbouncerSettings, green: &Client, state: &State, step: CutoverStep) -> Result<()> {
    let mut bouncer = Bouncer::connect(&pb.admin, &pb.database).await?;
    let finished = match &pb.mode {
        SwitchMode::Repoint { databases_file, green_dsn } => {
            let green_line = format!("{} = {}", pb.database, green_dsn);
            let repointed = step.green_may_be_live()
                && std::fs::read_to_string(databases_file)
                    .ok()
                    .and_then(|text| {
                        databases_file::find_entry(&text, &pb.database).map(|r| text[r].trim() == green_line)
                    })
                    .unwrap_or(false);
            if repointed {
                // Everything before the repoint (drain, final check, sequences) had completed.
                bouncer.reload().await?;
                bouncer.resume().await?;
            } else {
                bouncer.resume().await?;
            }
            repointed
        }
        SwitchMode::Handover { v2_database, v1_after_switch } => {
            let mut v2 = Bouncer::connect(&pb.admin, v2_database).await?;
            // The v2 entry is paused from the cutover's first step until the switch resumes it.
            let resumed = step.green_may_be_live() && v2.entry().await?.is_some_and(|e| !e.paused);
            if resumed {
                v2.enable().await?;
                v2.resume().await?;
                if *v1_after_switch == V1AfterSwitch::Disable {
                    bouncer.disable().await?;
                    bouncer.kill().await?;
                }
            } else {
                bouncer.enable().await?;
                bouncer.resume().await?;
            }
            resumed
        }
    };
    if finished {
        state.set_phase(green, &Phase::Switched).await?;
        info!(step = %step, "the interrupted cutover was finished: traffic is on green");
    } else {
        let closed = async {
            crate::way_back::close_aborted(state, green).await?;
            crate::way_back::remove(plan, green).await
        };
        if let Err(e) = closed.await {
            warn!(error = %e, "could not remove the way back's capture from green; `cleanup` removes it");
        }
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
        Some(Phase::CuttingOver { step }) => recover(plan, pb, &green, &state, step).await,
        _ => Ok(()),
    };
    // Released now, not when the server notices the closed session: a cutover may be waiting.
    let _ = green.execute("SELECT pg_advisory_unlock(hashtext($1))", &[&cutover_lock_key(&plan.name)]).await;
    result
}
