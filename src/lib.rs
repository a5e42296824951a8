//! bluegreen: move a live PostgreSQL application from a blue database (old schema) to a green one
//! (new schema) with zero downtime. See DESIGN.md for the pipeline:
//! plan → copy → capture → apply → verify → cutover, with state kept on green.

#![warn(missing_docs)]

pub mod apply;
pub mod capture;
pub mod copy;
pub mod cutover;
pub mod demo;
pub mod error;
pub mod fault;
pub mod follow;
pub mod pg;
pub mod plan;
pub mod sandbox;
pub mod state;
pub mod verify;

use std::path::Path;

use tokio_postgres::Client;

pub use error::{Error, Result};
use plan::{render_json, render_text, Plan, ResolvedPlan};

/// Output format of the reporting commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Human-readable.
    #[default]
    Text,
    /// JSON, stable shape.
    Json,
}

/// The commands of the `migrate` binary, already parsed.
#[derive(Debug, Clone)]
pub enum Command {
    /// Dry run: resolve and check.
    Plan {
        /// Output format.
        format: Format,
        /// Check the file only.
        offline: bool,
    },
    /// Copy, then follow.
    Copy {
        /// Exit once the copy is done and green has caught up.
        no_follow: bool,
    },
    /// Show progress from state on green.
    Status {
        /// Output format.
        format: Format,
    },
    /// Compare both sides by checksums.
    Verify {
        /// Output format.
        format: Format,
        /// Only this table (source or target name).
        table: Option<String>,
    },
    /// Switch PgBouncer to green.
    Cutover {
        /// Preflight only.
        dry_run: bool,
    },
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
pub async fn run(path: &Path, command: Command, shutdown: copy::Shutdown) -> Result<Outcome> {
    let plan = Plan::load(path)?;
    match command {
        Command::Plan { format, offline } => run_plan(&plan, format, offline).await,
        Command::Copy { no_follow } => {
            let (blue, green) = connect_both(&plan).await?;
            // Lock before reading catalogs: a running copy drops and rebuilds green's indexes,
            // and catalog functions read those rows without a snapshot ("cache lookup failed").
            copy::lock_plan(&green, &plan.name, "copy").await?;
            let resolved = resolve_sound(&plan, &blue, &green).await?;
            copy::run(&plan, &resolved, green, shutdown, no_follow).await?;
            Ok(Outcome::Ok)
        }
        Command::Verify { format, table } => {
            let (blue, green) = connect_both(&plan).await?;
            let resolved = resolve_sound(&plan, &blue, &green).await?;
            drop((blue, green));
            let report = verify::run(&plan, &resolved, table.as_deref()).await?;
            print!(
                "{}",
                match format {
                    Format::Text => verify::render_text(&report),
                    Format::Json => verify::render_json(&report),
                }
            );
            Ok(if report.equal { Outcome::Ok } else { Outcome::Problems })
        }
        Command::Cutover { dry_run } => {
            let (blue, green) = connect_both(&plan).await?;
            let resolved = resolve_sound(&plan, &blue, &green).await?;
            drop((blue, green));
            cutover::run(&plan, &resolved, dry_run, shutdown).await
        }
        Command::Cleanup { force } => {
            cleanup(&plan, force).await?;
            Ok(Outcome::Ok)
        }
        Command::Status { format } => {
            let green = plan.green.connect().await?;
            // Blue is optional here: status must work while blue is down.
            let blue = match plan.blue.connect().await {
                Ok(blue) => match state::blue_retention(&plan, &blue).await {
                    Ok(v) => Some(v),
                    Err(e) => Some(serde_json::json!({ "error": e.to_string() })),
                },
                Err(e) => Some(serde_json::json!({ "error": e.to_string() })),
            };
            if let Some(w) = blue.as_ref().and_then(|b| b["warning"].as_str()) {
                tracing::warn!("{w}");
            }
            print!("{}", state::status_report(&plan, &green, blue, format).await?);
            Ok(Outcome::Ok)
        }
    }
}

async fn run_plan(plan: &Plan, format: Format, offline: bool) -> Result<Outcome> {
    let resolved = if offline {
        None
    } else {
        match connect_both(plan).await {
            Ok((blue, green)) => Some(plan::resolve(plan, &blue, &green).await?),
            Err(e @ Error::Connect(_)) => {
                eprintln!("error: {e}");
                return Ok(Outcome::Problems);
            }
            Err(e) => return Err(e),
        }
    };
    let out = match format {
        Format::Text => render_text(plan, resolved.as_ref()),
        Format::Json => render_json(plan, resolved.as_ref()),
    };
    print!("{out}");
    Ok(match resolved {
        Some(r) if !r.problems.is_empty() => Outcome::Problems,
        _ => Outcome::Ok,
    })
}

/// `migrate cleanup`: slot, publication, triggers and our schema on blue; state on green.
async fn cleanup(plan: &Plan, force: bool) -> Result<()> {
    let (blue, green) = connect_both(plan).await?;
    if let Err(e) = copy::lock_plan(&green, &plan.name, "copy").await {
        if !force {
            return Err(Error::Runtime(format!("{e}; stop it first, or pass --force to remove its objects anyway")));
        }
        tracing::warn!("a copy of this plan is running; removing its objects anyway (--force)");
    }
    capture::remove(plan, &blue).await?;
    let schema = pg::ident(&state::schema_name(&plan.name));
    green
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .map_err(Error::db("green: dropping migration state"))?;
    println!(
        "removed from blue: replication slot and publication {slot}, capture triggers, schema {slot}\nremoved from green: schema {slot}",
        slot = state::slot_name(&plan.name)
    );
    Ok(())
}

/// Connects to blue and green at once, so an unreachable side is reported within one timeout.
pub async fn connect_both(plan: &Plan) -> Result<(Client, Client)> {
    let (blue, green) = tokio::join!(plan.blue.connect(), plan.green.connect());
    Ok((blue?, green?))
}

/// Resolves the plan and refuses to go on when it has problems.
pub async fn resolve_sound(plan: &Plan, blue: &Client, green: &Client) -> Result<ResolvedPlan> {
    let resolved = plan::resolve(plan, blue, green).await?;
    if !resolved.problems.is_empty() {
        for p in &resolved.problems {
            tracing::error!(field = %p.field, table = ?p.table, column = ?p.column, "{}", p.message);
        }
        return Err(Error::Unresolved { count: resolved.problems.len() });
    }
    Ok(resolved)
}
