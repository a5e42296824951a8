//! Stage 2: capture. Every committed write on blue to a planned table becomes a key event
//! (table, key) stored durably in green's pending table together with the position reached;
//! only then is blue told (slot advanced, change rows deleted). A crash at any instant loses no
//! change: at worst a key is stored twice, and apply is idempotent.
//!
//! Two sources: a logical slot with pgoutput read through the SQL interface (`peek` then
//! `advance`, no replication-protocol client needed), or row triggers into a change table on
//! blue where logical decoding is not available.

pub mod logical;
pub mod pgoutput;
mod trigger;

use tokio_postgres::Client;

use crate::{
    error::{Error, Result},
    plan::{CaptureMethod, Plan, ResolvedPlan},
    state::State,
};

/// Keys read per poll; bounds one green transaction.
pub const POLL_CHANGES: i32 = 20_000;

/// A key event: table index in the resolved plan, key values in text form, and the blue WAL
/// position of the change (for lag).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyEvent {
    /// Index into `ResolvedPlan::tables`.
    pub table: usize,
    /// Key column values, text form.
    pub key: Vec<String>,
    /// Blue LSN of the change, as bytes from 0/0.
    pub lsn: i64,
}

/// Where "caught up" is, for `--no-follow`.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// A blue WAL position.
    Lsn(i64),
    /// A transaction id horizon (trigger capture): every transaction below it is done.
    Xid(i64),
}

/// The configured capture, ready to poll.
pub enum Capture {
    /// Logical slot.
    Logical(logical::Logical),
    /// Triggers and a change table.
    Trigger(trigger::Trigger),
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
            CaptureMethod::Trigger => Ok(Capture::Trigger(trigger::Trigger::setup(plan, resolved, blue).await?)),
            _ => Ok(Capture::Logical(logical::Logical::setup(plan, resolved, blue).await?)),
        }
    }

    /// Opens the capture that `copy` set up, changing nothing on blue: the slot if there is one,
    /// else the change table.
    pub async fn open(plan: &Plan, resolved: &ResolvedPlan, blue: Client) -> Result<Capture> {
        let check = plan.blue.connect().await?;
        if let Some(l) = logical::Logical::open(plan, resolved, blue).await? {
            return Ok(Capture::Logical(l));
        }
        match trigger::Trigger::open(plan, resolved, check).await? {
            Some(t) => Ok(Capture::Trigger(t)),
            None => Err(Error::Runtime(format!(
                "blue has no capture of plan `{}` (no slot, no change table): run `migrate copy` first",
                plan.name
            ))),
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

    /// The point everything committed on blue so far lies before.
    pub async fn target(&self) -> Result<Target> {
        match self {
            Capture::Logical(c) => c.committed_lsn().await.map(Target::Lsn),
            Capture::Trigger(c) => c.xid_horizon().await.map(Target::Xid),
        }
    }

    /// Whether every change before `target` has been stored on green.
    pub async fn reached(&self, target: Target) -> Result<bool> {
        match (self, target) {
            (Capture::Logical(c), Target::Lsn(l)) => Ok(c.captured_lsn() >= l),
            (Capture::Trigger(c), Target::Xid(x)) => c.reached(x).await,
            _ => Err(Error::Runtime("capture target of the wrong kind".into())),
        }
    }

    /// Blue's current WAL position and the oldest position not yet captured, as bytes.
    pub async fn positions(&self) -> Result<(i64, i64)> {
        match self {
            Capture::Logical(c) => Ok((c.current_lsn().await?, c.captured_lsn())),
            Capture::Trigger(c) => c.positions().await,
        }
    }

    /// Replaces the blue connection after it was lost.
    pub fn reconnected(&mut self, blue: Client) {
        match self {
            Capture::Logical(c) => c.blue = blue,
            Capture::Trigger(c) => c.blue = blue,
        }
    }
}

/// The error that stops following when a planned table was truncated on blue: a TRUNCATE is no
/// row change, so green would silently keep the rows.
pub fn truncated(tables: &[String]) -> Error {
    let what = if tables.is_empty() { "a planned table".to_string() } else { tables.join(", ") };
    Error::Runtime(format!(
        "TRUNCATE of {what} on blue: following stopped so green does not drift; \
         start the migration over (`migrate cleanup`, empty the green tables, `migrate copy`)"
    ))
}

/// Removes everything capture made on blue: slot, publication, triggers, change table, schema.
pub async fn remove(plan: &Plan, blue: &Client) -> Result<()> {
    // A cutover with `fence_blue` made new sessions on blue read-only; ours must still drop
    // what we made.
    blue.batch_execute("SET default_transaction_read_only = off").await.map_err(Error::db("blue: cleanup session"))?;
    logical::drop_objects(blue, &plan.name).await?;
    trigger::drop_objects(blue, plan).await
}

/// Stores key events in pending (newest position wins; a fresh `seq` marks the key as changed
/// again, so an apply that read the older entry will not delete this one).
pub async fn store(tx: &tokio_postgres::Transaction<'_>, state: &State, events: &[KeyEvent]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    // One row per key: ON CONFLICT cannot touch the same row twice in one statement.
    let mut latest: std::collections::HashMap<(usize, &[String]), i64> = std::collections::HashMap::new();
    for e in events {
        let l = latest.entry((e.table, e.key.as_slice())).or_insert(e.lsn);
        *l = (*l).max(e.lsn);
    }
    let events: Vec<KeyEvent> =
        latest.into_iter().map(|((table, key), lsn)| KeyEvent { table, key: key.to_vec(), lsn }).collect();
    let tables: Vec<i32> = events.iter().map(|e| e.table as i32).collect();
    // Keys travel as one text per event (a JSON array) because arrays of arrays do not unnest.
    let keys: Vec<String> = events.iter().map(|e| serde_json::to_string(&e.key).unwrap_or_default()).collect();
    let lsns: Vec<i64> = events.iter().map(|e| e.lsn).collect();
    tx.execute(
        &format!(
            "INSERT INTO {pending} (tbl, key, seq, lsn) \
             SELECT t, ARRAY(SELECT jsonb_array_elements_text(k::jsonb)), nextval('{seq}'), l \
             FROM unnest($1::int[], $2::text[], $3::int8[]) AS e(t, k, l) \
             ON CONFLICT (tbl, key) DO UPDATE SET seq = EXCLUDED.seq, lsn = EXCLUDED.lsn",
            pending = state.table("pending"),
            seq = state.table("pending_seq").replace('\'', "''"),
        ),
        &[&tables, &keys, &lsns],
    )
    .await
    .map_err(Error::db("green: storing captured keys"))?;
    Ok(())
}
