//! Following back: after a switch that opened a way back, the `copy` process carries every
//! write the application makes on green to blue, round after round, until a rollback puts
//! traffic on blue again (forward following then resumes) or `finish` closes the way back.
//! Rounds hold the follow gate shared, as forward rounds do: `rollback` takes it exclusively to
//! stand this follower aside. A rollback that died half-way is finished or undone from here.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::{
    error::{Error, Result},
    plan::{Plan, ResolvedPlan},
    retry::{connection_lost, retry_later, Backoff},
    shutdown::Shutdown,
    state::{Phase, State},
    way_back::{self, apply as back},
};

/// Why following back stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackStop {
    /// SIGINT/SIGTERM.
    Signal,
    /// A rollback put traffic on blue: follow forward again.
    RolledBack,
    /// The way back was closed (`finish`, `cleanup`) or never opened.
    Closed,
}

/// How often progress is written to state.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Idle wait between rounds when nothing happened.
const IDLE: Duration = Duration::from_millis(50);
/// How often blue's sequences are set past green's while following back.
const SEQUENCES_EVERY: Duration = Duration::from_secs(10);

/// What a round may do, read with the gate.
enum Gate {
    Go,
    /// A rollback holds the gate.
    Wait,
    /// No one holds it, but the phase says something else than "switched".
    Free(Option<Phase>),
}

/// Carries green's writes to blue until a rollback, `finish`, or a signal.
pub async fn run(plan: &Plan, resolved: &ResolvedPlan, shutdown: &Shutdown) -> Result<BackStop> {
    let state = State::new(&plan.name);
    let mut sides = Sides::connect(plan).await?;
    let mut backoff = Backoff::default();
    let mut last_report = Instant::now() - REPORT_EVERY;
    let mut last_sequences = Instant::now() - SEQUENCES_EVERY;
    let mut applied: i64 = way_back::window(&state, &sides.green).await?.map(|w| w.applied).unwrap_or(0);
    if let Some(start) = way_back::window(&state, &sides.green).await?.and_then(|w| w.start_xid) {
        way_back::prune(&state, &sides.green, start).await?;
    }
    info!("following back: green's writes are carried to blue until `migrate rollback` or `migrate finish`");
    loop {
        if shutdown.is_triggered() {
            return Ok(BackStop::Signal);
        }
        let round = round(plan, resolved, &state, &mut sides).await;
        match round {
            Ok(Step::Stop(stop)) => return Ok(stop),
            Ok(Step::Did(n)) => {
                backoff.reset();
                applied += n as i64;
                if last_sequences.elapsed() >= SEQUENCES_EVERY {
                    last_sequences = Instant::now();
                    // Blue takes no writes in the window, but whatever writes it after a
                    // rollback (or around one) must not hand out ids green gave out.
                    let set = way_back::carry_sequences(resolved, &sides.blue, &sides.green, plan.cutover.sequence_gap)
                        .await?;
                    for s in set {
                        info!(sequence = %s.sequence, set = s.set, "blue's sequence set past green's");
                    }
                }
                if last_report.elapsed() >= REPORT_EVERY {
                    last_report = Instant::now();
                    let patch = serde_json::json!({ "applied": applied, "error": null });
                    way_back::update(&state, &sides.green, patch, &["seen_at"]).await?;
                }
                if n == 0 {
                    tokio::time::sleep(IDLE).await;
                }
            }
            Err(e) if retry_later(&e) => {
                let lost = connection_lost(&e);
                backoff.wait(e, shutdown, "following back").await?;
                if lost {
                    match Sides::connect(plan).await {
                        Ok(s) => sides = s,
                        Err(e) => warn!(error = %e, "following back: reconnect failed"),
                    }
                }
            }
            Err(e) => {
                // Stored for `status` and the rollback's preflight: green's writes are no longer
                // carried back, and nobody may think they are.
                let patch = serde_json::json!({ "error": e.to_string() });
                if let Err(e2) = way_back::update(&state, &sides.green, patch, &[]).await {
                    warn!(error = %e2, "could not record the way back's failure on green");
                }
                return Err(e);
            }
        }
    }
}

enum Step {
    Did(usize),
    Stop(BackStop),
}

struct Sides {
    green: tokio_postgres::Client,
    blue: tokio_postgres::Client,
}

impl Sides {
    async fn connect(plan: &Plan) -> Result<Sides> {
        let (green, blue) = tokio::try_join!(plan.green.connect(), plan.blue.connect())?;
        back::prepare_blue(&blue).await?;
        Ok(Sides { green, blue })
    }
}

/// One round under the gate.
async fn round(plan: &Plan, resolved: &ResolvedPlan, state: &State, sides: &mut Sides) -> Result<Step> {
    match enter(state, &sides.green).await? {
        Gate::Wait => Ok(Step::Did(0)),
        Gate::Free(Some(Phase::RollingBack { step })) => {
            warn!(step = %step, "a rollback stopped half-way; recovering it");
            crate::cutover::rollback::recover_abandoned(plan, resolved).await?;
            Ok(Step::Did(0))
        }
        Gate::Free(Some(Phase::Following { .. })) => {
            info!("rolled back: traffic is on blue; following forward again");
            Ok(Step::Stop(BackStop::RolledBack))
        }
        Gate::Free(_) => Ok(Step::Stop(BackStop::Closed)),
        Gate::Go => {
            let r = async {
                let Some(w) = way_back::window(state, &sides.green).await?.filter(|w| w.open) else {
                    return Ok(Step::Stop(BackStop::Closed));
                };
                let start = w.start_xid.ok_or(Error::Internal("an open way back without its start"))?;
                let written = back::round(state, &resolved.tables, &mut sides.green, &mut sides.blue, start).await?;
                Ok(Step::Did(back::count(&written)))
            }
            .await;
            leave(state, &sides.green).await;
            if matches!(r, Ok(Step::Stop(BackStop::Closed))) {
                info!("the way back was closed; following back stops");
            }
            r
        }
    }
}

/// Tries the gate shared and reads the phase; only `switched` lets a round go.
async fn enter(state: &State, green: &tokio_postgres::Client) -> Result<Gate> {
    let row = green
        .query_one(
            &format!(
                "SELECT pg_try_advisory_lock_shared(hashtext($1)), (SELECT state FROM {} WHERE id = 1)",
                state.table("migration")
            ),
            &[&state.gate_key()],
        )
        .await
        .map_err(Error::db("green: taking the follow gate"))?;
    let phase: Option<Phase> = row.get::<_, Option<serde_json::Value>>(1).and_then(|v| serde_json::from_value(v).ok());
    if !row.get::<_, bool>(0) {
        return Ok(Gate::Wait);
    }
    if phase == Some(Phase::Switched) {
        return Ok(Gate::Go);
    }
    leave(state, green).await;
    Ok(Gate::Free(phase))
}

async fn leave(state: &State, green: &tokio_postgres::Client) {
    state.leave_gate(green).await;
}

/// Finishes or undoes a rollback that died, unless one is running: a `copy` started in phase
/// `rolling-back` does this before anything else (the way back may be closed already, when the
/// rollback died after closing it).
pub async fn recover(plan: &Plan, resolved: &ResolvedPlan) -> Result<()> {
    crate::cutover::rollback::recover_abandoned(plan, resolved).await
}
