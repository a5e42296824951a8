//! The commands of `migrate`, one file each: the top layer, and the only code that writes a
//! command's report to stdout. Each loads the plan, connects, runs its stage and prints what the
//! stage returned; logs go to stderr through tracing.

mod cleanup;
mod control;
mod copy;
mod cutover;
pub mod demo;
mod metrics;
mod plan;
pub mod rehearse;
pub mod status;
mod verify;

use std::path::Path;

use tokio_postgres::Client;

use crate::{
    error::{Error, Result},
    plan::{Plan, ResolvedPlan},
    shutdown::Shutdown,
};

/// Output format of the reporting commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Human-readable.
    #[default]
    Text,
    /// JSON, stable shape.
    Json,
}

pub use control::ControlAction;
pub use rehearse::Rehearsal;

/// The commands of the `migrate` binary, already parsed.
#[derive(Debug, Clone)]
pub enum Command {
    /// Dry run: resolve and check.
    Plan {
        /// Output format.
        format: Format,
        /// Check the file only.
        offline: bool,
        /// Transformed rows of each table to show (`--rows`).
        rows: usize,
    },
    /// `migrate copy --join`: claim and copy chunks beside a running `migrate copy`.
    Join,
    /// Copy, then follow.
    Copy {
        /// Exit once the copy is done and green has caught up.
        no_follow: bool,
        /// Entries to empty on green and copy again (source or target names).
        recopy: Vec<String>,
        /// Serve Prometheus metrics on this address (`host:port`).
        metrics: Option<String>,
    },
    /// Show progress from state on green.
    Status {
        /// Output format.
        format: Format,
        /// Print again every so many seconds.
        watch: Option<f64>,
    },
    /// Set live control on green.
    Control {
        /// What to set.
        action: ControlAction,
    },

    /// Compare both sides by checksums.
    Verify {
        /// Output format.
        format: Format,
        /// Only this table (source or target name).
        table: Option<String>,
        /// The round trip of the reverse mapping instead.
        reverse: bool,
        /// Only the keys changed since each table's last clean verify.
        changed: bool,
    },
    /// `migrate verify --join`: read parts of a running `migrate verify`'s tables beside it.
    VerifyJoin,
    /// Switch PgBouncer to green.
    Cutover {
        /// Preflight only.
        dry_run: bool,
    },
    /// Switch PgBouncer back to blue through the way back.
    Rollback {
        /// Preflight only.
        dry_run: bool,
    },
    /// End the way back: remove capture from green and blue.
    Finish,
    /// Remove everything the tool made on blue and its state on green.
    Cleanup {
        /// Even while a `copy` of this plan holds the plan lock.
        force: bool,
    },
}

/// How a command ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything as expected: exit 0.
    Ok,
    /// The command found problems or differences: exit 1.
    Problems,
}

/// Runs one command to completion. `shutdown` resolves on SIGINT/SIGTERM; long-running stages
/// stop at a safe point when it does.
pub async fn run(path: &Path, command: Command, shutdown: Shutdown) -> Result<Outcome> {
    let plan = Plan::load(path)?;
    match command {
        Command::Plan { format, offline, rows } => plan::run(&plan, format, offline, rows).await,
        // A joined worker's failure is its own: the leader's state says nothing of it.
        Command::Join => copy::join(&plan.joined_worker(), shutdown).await,
        Command::Copy { no_follow, recopy, metrics } => {
            let copied = copy::run(&plan, no_follow, &recopy, metrics.as_deref(), shutdown).await;
            if let Err(e) = &copied {
                record_failure(&plan, "copy", e).await;
            }
            copied
        }
        Command::Verify { format, table, reverse, changed } => {
            verify::run(&plan, format, table.as_deref(), reverse, changed, shutdown).await
        }
        Command::VerifyJoin => verify::join(&plan.joined_worker(), shutdown).await,
        Command::Cutover { dry_run } => cutover::run(&plan, dry_run, false, shutdown).await,
        Command::Rollback { dry_run } => cutover::run(&plan, dry_run, true, shutdown).await,
        Command::Finish => cleanup::finish(&plan).await,
        Command::Cleanup { force } => cleanup::run(&plan, force).await,
        Command::Status { format, watch: None } => status::run(&plan, format).await,
        Command::Status { format, watch: Some(every) } => status::watch(&plan, format, every, shutdown).await,
        Command::Control { action } => control::run(&plan, action).await,
    }
}

/// Records a failed run in the state on green, for `status` (best effort: green may be what
/// failed). Plan problems and refusals (exit 1 and 2) are not runs that failed.
async fn record_failure(plan: &Plan, command: &str, e: &crate::error::Error) {
    if e.exit_code() != 3 {
        return;
    }
    let recorded = async {
        let green = plan.green.connect().await?;
        let state = crate::state::State::new(&plan.name);
        if state.phase(&green).await?.is_some() {
            state.record_failure(&green, command, &e.to_string()).await?;
        }
        Ok::<(), crate::error::Error>(())
    };
    if let Err(err) = recorded.await {
        tracing::warn!(error = %err, "could not record the failure on green for `status`");
    }
}

/// Connects to blue and green at once, so an unreachable side is reported within one timeout.
pub async fn connect_both(plan: &Plan) -> Result<(Client, Client)> {
    let (blue, green) = tokio::join!(plan.blue.connect(), plan.green.connect());
    Ok((blue?, green?))
}

/// Resolves the plan and refuses to go on when it has problems, or when it changed an entry
/// whose copy already began. Returns the resolved plan and the ids state knows that the plan no
/// longer has.
pub async fn resolve_sound(
    plan: &Plan,
    blue: &Client,
    green: &Client,
    recopy: &[String],
) -> Result<(ResolvedPlan, Vec<crate::state::TableId>)> {
    let resolved = crate::plan::resolve(plan, blue, green).await?;
    if !resolved.problems.is_empty() {
        for p in &resolved.problems {
            tracing::error!(field = %p.field, table = ?p.table, column = ?p.column, "{}", p.message);
        }
        return Err(Error::Unresolved { count: resolved.problems.len() });
    }
    let state = crate::state::State::new(&plan.name);
    let removed = crate::plan::check_against_state(&resolved, &state, green, recopy).await?;
    Ok((resolved, removed))
}
