//! Stage 2: capture. Every committed write on blue to a planned table becomes a key event
//! (table, key) stored durably in green's pending table (or, for the follower's logical
//! capture of a copied entry, applied at once), then the position reached is stored; only then
//! is blue told (slot advanced, change rows deleted). A crash at any instant loses no
//! change: at worst a key is stored twice, and apply is idempotent.
//!
//! Two sources: a logical slot with pgoutput read through the SQL interface (`peek` then
//! `advance`, no replication-protocol client needed), or row triggers into a change table on
//! blue where logical decoding is not available.

pub mod drift;
pub mod logical;
pub mod pgoutput;
mod trace;
mod trigger;

use tokio_postgres::Client;

use crate::{
    error::{Error, Result},
    pg::Lsn,
    plan::{CaptureMethod, Plan, ResolvedPlan},
    state::State,
};

/// Changes asked for per poll (the peek returns whole transactions, so one poll can hold more;
/// they are handed on in chunks of `logical::STORE_CHUNK`).
pub const POLL_CHANGES: i32 = 20_000;

pub use crate::state::KeyEvent;

/// Where "caught up" is, for `--no-follow`.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// A blue WAL position.
    Lsn(Lsn),
    /// A transaction id horizon (trigger capture): every transaction below it is done; and
    /// blue's WAL position when it was taken, which every change before it lies at or below.
    Xid(i64, Lsn),
}

impl Target {
    /// The WAL position every change committed before the target lies at or below: green holds
    /// everything up to the target once capture reached it and no key stored for a change at
    /// or below this position is pending.
    pub fn lsn(&self) -> Lsn {
        match *self {
            Target::Lsn(l) | Target::Xid(_, l) => l,
        }
    }
}

/// The configured capture, ready to poll.
pub enum Capture {
    /// Logical slot (boxed: it carries its sessions and their settings).
    Logical(Box<logical::Logical>),
    /// Triggers and a change table.
    Trigger(Box<trigger::Trigger>),
}

/// Names of what capture creates on blue.
pub fn object_name(plan: &str) -> String {
    crate::state::slot_name(plan)
}

impl Capture {
    /// Sets up capture on blue (idempotent: an existing slot, publication or trigger set of this
    /// plan is reused) and returns it. Must run before the copy takes its snapshot.
    pub async fn setup(plan: &Plan, resolved: &ResolvedPlan, blue: Client) -> Result<Capture> {
        match resolved.capture.method {
            CaptureMethod::Trigger => {
                Ok(Capture::Trigger(Box::new(trigger::Trigger::setup(plan, resolved, blue).await?)))
            }
            _ => Ok(Capture::Logical(Box::new(logical::Logical::setup(plan, resolved, blue).await?))),
        }
    }

    /// Opens the capture that `copy` set up, changing nothing on blue: the slot if there is one,
    /// else the change table.
    pub async fn open(plan: &Plan, resolved: &ResolvedPlan, blue: Client) -> Result<Capture> {
        let check = plan.blue.connect().await?;
        if let Some(l) = logical::Logical::open(plan, resolved, blue).await? {
            return Ok(Capture::Logical(Box::new(l)));
        }
        match trigger::Trigger::open(plan, resolved, check).await? {
            Some(t) => Ok(Capture::Trigger(Box::new(t))),
            None => Err(Error::NoCapture { plan: plan.name.clone() }),
        }
    }

    /// Reads what blue committed since the last poll, stores the keys in green's pending table
    /// with the new position, then confirms to blue. Returns how many events were stored.
    pub async fn poll(&mut self, green: &mut Client, state: &State) -> Result<usize> {
        match self {
            Capture::Logical(c) => c.poll(green, state).await,
            Capture::Trigger(c) => c.poll(green, state).await,
        }
    }

    /// Whether the last poll stopped at its cap ([`POLL_CHANGES`]), with more waiting on blue:
    /// the next should not wait.
    pub fn full(&self) -> bool {
        match self {
            Capture::Logical(c) => c.full(),
            Capture::Trigger(c) => c.full(),
        }
    }

    /// The point everything committed on blue so far lies before.
    pub async fn target(&self) -> Result<Target> {
        match self {
            Capture::Logical(c) => c.committed_lsn().await.map(Target::Lsn),
            Capture::Trigger(c) => {
                // The insert position (not the write position, which lags it): a change row
                // records the insert position when it was written, so every change of a
                // transaction committed by now lies at or below this.
                let lsn = crate::pg::insert_lsn(&c.blue).await?;
                c.xid_horizon().await.map(|x| Target::Xid(x, lsn))
            }
        }
    }

    /// Whether every change before `target` has been stored on green.
    pub async fn reached(&self, target: Target) -> Result<bool> {
        match (self, target) {
            (Capture::Logical(c), Target::Lsn(l)) => Ok(c.captured_lsn() >= l),
            (Capture::Trigger(c), Target::Xid(x, _)) => c.reached(x).await,
            _ => Err(Error::Internal("capture target of the wrong kind")),
        }
    }

    /// Blue's current WAL position and the oldest position not yet captured, as bytes.
    pub async fn positions(&self) -> Result<(Lsn, Lsn)> {
        match self {
            Capture::Logical(c) => Ok((c.current_lsn().await?, c.captured_lsn())),
            Capture::Trigger(c) => c.positions().await,
        }
    }

    /// Lets logical capture apply the keys of copied entries itself (the follower's capture).
    pub fn apply_directly(&mut self) {
        if let Capture::Logical(c) = self {
            c.direct = true;
        }
    }

    /// Keys capture has applied itself so far.
    pub fn applied_directly(&self) -> u64 {
        match self {
            Capture::Logical(c) => c.applied_directly,
            Capture::Trigger(_) => 0,
        }
    }

    /// What logical capture's rounds touch as they move (trigger capture's rounds are short).
    pub fn progress(&self) -> std::sync::Arc<crate::retry::Progress> {
        match self {
            Capture::Logical(c) => std::sync::Arc::clone(&c.progress),
            Capture::Trigger(_) => std::sync::Arc::new(crate::retry::Progress::default()),
        }
    }

    /// Replaces the blue connection after it was lost; the old one.
    pub fn reconnected(&mut self, blue: Client) -> Client {
        match self {
            Capture::Logical(c) => {
                c.reset_sessions();
                std::mem::replace(&mut c.blue, blue)
            }
            Capture::Trigger(c) => std::mem::replace(&mut c.blue, blue),
        }
    }
}

/// What capture holds on blue: WAL retained by the slot, rows waiting in the change table.
pub async fn blue_retention(plan: &Plan, blue: &Client) -> Result<serde_json::Value> {
    let name = crate::state::slot_name(&plan.name);
    let slot = blue
        .query_opt(
            "SELECT (pg_current_wal_lsn() - restart_lsn)::int8, active FROM pg_catalog.pg_replication_slots \
             WHERE slot_name = $1",
            &[&name],
        )
        .await
        .map_err(Error::db("blue: reading the replication slot"))?;
    let changes = format!("{}.changes", crate::pg::ident(&crate::state::schema_name(&plan.name)));
    let change_rows: Option<i64> = blue
        .query_one(
            "SELECT CASE WHEN to_regclass($1) IS NULL THEN NULL ELSE pg_total_relation_size($1)::int8 END",
            &[&changes],
        )
        .await
        .map_err(Error::db("blue: reading the change table"))?
        .get(0);
    let retained = slot.as_ref().and_then(|r| r.get::<_, Option<i64>>(0)).unwrap_or(0).max(change_rows.unwrap_or(0));
    let warning = (retained as u64 > plan.warn_retained_bytes).then(|| {
        format!(
            "capture holds {} on blue (slot or change table {name}); if no `migrate copy` of this plan is running \
             and none will be, run `migrate cleanup {}` before blue's disk fills",
            crate::plan::render_size(retained as u64),
            plan.path.display()
        )
    });
    Ok(serde_json::json!({
        "slot": slot.is_some(),
        "slot_active": slot.as_ref().map(|r| r.get::<_, bool>(1)),
        "retained_bytes": retained,
        "warning": warning,
    }))
}

/// The error that stops following when a planned table was truncated on blue: a TRUNCATE is no
/// row change, so green would silently keep the rows.
pub fn truncated(tables: &[String]) -> Error {
    Error::Truncated { tables: tables.to_vec() }
}

/// Removes everything capture made on blue: slot, publication, triggers, change table, schema.
pub async fn remove(plan: &Plan, blue: &Client) -> Result<()> {
    // A cutover with `fence_blue` made new sessions on blue read-only; ours must still drop
    // what we made.
    blue.batch_execute("SET default_transaction_read_only = off").await.map_err(Error::db("blue: cleanup session"))?;
    logical::drop_objects(blue, &plan.name).await?;
    trigger::drop_objects(blue, plan).await
}
