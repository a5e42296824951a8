//! What we persist on green, so that every command resumes from state instead of guessing: the
//! migration's phase, each plan entry's copy state with its deferred indexes and definition,
//! every copy chunk, the captured keys waiting to be applied, the keys applied since the last
//! verify, and which verify buckets were clean at which blue position. The schema is
//! `bluegreen_<plan>`; our objects on blue use the same name.
//!
//! Every statement on these tables is in this module, and what it stores is typed: a stored
//! value that does not decode is an error naming it, never a silent default. Plan entries are
//! known by their [`TableId`], never by position.

mod gate;
mod id;
mod keys;
mod migration;
mod parts;
mod phase;
mod record;
mod tables;
mod workers;

pub use gate::{Gate, GATE_NAMESPACE};
pub use id::{short_name, TableId};
pub use keys::{KeyEvent, COMPACT_ROWS};
pub use migration::{Control, FollowerReport, FollowerView, StatusView};
pub use parts::{NewPart, PartClaim, PartSummary};
pub use phase::{CutoverStep, Phase, TableState};
pub use record::{CutoverOutcome, CutoverRecord, HookRecord, SequenceSet, StepTime};
pub use tables::{ChunkRecord, TableProgress, TableRecord};
pub use workers::{worker_id, Claim, Leases, Sessions, WorkerRecord};

use tokio_postgres::{Client, GenericClient};

use crate::{
    error::{Error, Result},
    pg::{ident, literal},
};

/// The schema on green that holds this plan's state; also the name of our schema on blue.
pub fn schema_name(plan: &str) -> String {
    format!("bluegreen_{}", plan.replace('-', "_"))
}

/// Replication slot and publication name on blue (slot names allow only `[a-z0-9_]`).
pub fn slot_name(plan: &str) -> String {
    schema_name(plan)
}

/// The state layout this build reads and writes. Version 1 named plan entries by position
/// (`pending.tbl int`); from 2 on they are named by [`TableId`].
const LAYOUT: i32 = 2;

/// Handle to this plan's state on green.
#[derive(Debug, Clone)]
pub struct State {
    schema: String,
    raw: String,
    plan: String,
}

/// The columns of joined workers' leases (see `workers::Leases`): added by `copy` and by a
/// verify run, so a `verify` on state an older `copy` wrote can lease its joined workers.
const LEASE_COLUMNS: &[(&str, &str, &str)] = &[
    ("workers", "sessions", "text[] NOT NULL DEFAULT '{}'"),
    ("workers", "expired_at", "timestamptz"),
    ("workers", "ended_at", "timestamptz"),
];

impl State {
    /// The state of `plan` (nothing is created until [`State::ensure`]).
    pub fn new(plan: &str) -> Self {
        let raw = schema_name(plan);
        Self { schema: ident(&raw), raw, plan: plan.to_string() }
    }

    /// The plan's name.
    pub fn plan_name(&self) -> &str {
        &self.plan
    }

    /// The state schema, quoted.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// A table of the state schema, quoted.
    pub fn table(&self, name: &str) -> String {
        format!("{}.{}", self.schema, ident(name))
    }

    /// Statements adding columns that state of an earlier version lacks. Only when missing:
    /// `ADD COLUMN IF NOT EXISTS` takes an exclusive lock even when the column exists, and with
    /// the follower's sessions reading these tables that lock deadlocked.
    fn add_columns(&self, columns: &[(&str, &str, &str)]) -> String {
        columns
            .iter()
            .map(|(table, column, ty)| {
                format!(
                    "DO $add$ BEGIN IF to_regclass('{t}') IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute \
                       WHERE attrelid = to_regclass('{t}') AND attname = {c} AND NOT attisdropped) \
                     THEN ALTER TABLE {t} ADD COLUMN {ci} {ty}; END IF; END $add$;",
                    t = self.table(table).replace('\'', "''"),
                    c = literal(column),
                    ci = ident(column),
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Creates the schema and tables if missing; refuses state written by an older layout.
    pub async fn ensure(&self, green: &Client, plan: &str) -> Result<()> {
        let s = &self.schema;
        let sql = format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.migration (
                 id int PRIMARY KEY CHECK (id = 1), plan text NOT NULL, state jsonb NOT NULL,
                 copy_epoch int NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now(),
                 capture_lsn bigint, blue_lsn bigint, lag_bytes bigint, pending_keys bigint,
                 applied_keys bigint NOT NULL DEFAULT 0, apply_rate float8, follower_seen_at timestamptz,
                 last_verify jsonb, last_verify_at timestamptz, cutover jsonb, layout int NOT NULL DEFAULT {LAYOUT});
             CREATE TABLE IF NOT EXISTS {s}.verified (
                 tbl text NOT NULL, buckets int NOT NULL, bucket int NOT NULL, lsn bigint NOT NULL,
                 ok boolean NOT NULL, verified_at timestamptz NOT NULL, PRIMARY KEY (tbl, bucket));
             CREATE SEQUENCE IF NOT EXISTS {s}.pending_seq;
             CREATE TABLE IF NOT EXISTS {s}.pending (
                 tbl text NOT NULL, key text[] NOT NULL, seq bigint NOT NULL, lsn bigint, first_lsn bigint,
                 PRIMARY KEY (tbl, key));
             CREATE UNIQUE INDEX IF NOT EXISTS pending_seq ON {s}.pending (seq);
             CREATE INDEX IF NOT EXISTS pending_tbl_seq ON {s}.pending (tbl, seq);
             CREATE TABLE IF NOT EXISTS {s}.tables (
                 tbl text PRIMARY KEY, target text NOT NULL, state text NOT NULL,
                 rows_estimated bigint NOT NULL DEFAULT 0, deferred jsonb NOT NULL DEFAULT '[]',
                 definition jsonb, source_filenode bigint, source_shape jsonb, drift text,
                 updated_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS {s}.chunks (
                 tbl text NOT NULL, chunk int NOT NULL, first_block bigint, end_block bigint,
                 done boolean NOT NULL DEFAULT false, epoch int, rows bigint, bytes bigint, seconds float8,
                 finished_at timestamptz, PRIMARY KEY (tbl, chunk));
             CREATE TABLE IF NOT EXISTS {s}.touched (
                 tbl text NOT NULL, key text[] NOT NULL, lsn bigint NOT NULL, PRIMARY KEY (tbl, key));
             CREATE TABLE IF NOT EXISTS {s}.workers (
                 id text PRIMARY KEY, role text NOT NULL, host text NOT NULL, pid int NOT NULL,
                 chunks text[] NOT NULL DEFAULT '{{}}', copied int NOT NULL DEFAULT 0,
                 started_at timestamptz NOT NULL DEFAULT now(), seen_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS {s}.touched_log (tbl text NOT NULL, key text[] NOT NULL, lsn bigint NOT NULL);
             {added}
             {leases}
             INSERT INTO {s}.migration (id, plan, state) VALUES (1, {plan}, '{{\"phase\":\"planned\"}}')
             ON CONFLICT (id) DO NOTHING;",
            plan = literal(plan),
            added = self.add_columns(&[
                ("tables", "source_shape", "jsonb"),
                ("tables", "drift", "text"),
                ("pending", "first_lsn", "bigint"),
                ("migration", "lag_seconds", "float8"),
                ("migration", "verify_started_at", "timestamptz"),
                ("chunks", "part", "text"),
                ("chunks", "worker", "text"),
                ("migration", "last_error", "jsonb"),
                ("migration", "control", "jsonb"),
                ("migration", "way_back", "jsonb"),
                ("migration", "copy_xid_floor", "bigint"),
                ("chunks", "xid_floor", "bigint"),
                ("chunks", "copied_with", "int"),
            ]),
            leases = self.add_columns(LEASE_COLUMNS),
        );
        self.check_layout(green).await?;
        green.batch_execute(&sql).await.map_err(Error::db("green: creating migration state"))
    }

    /// Refuses state an older `migrate` wrote: it names plan entries by position, and reading
    /// it as ids would send keys to the wrong table.
    pub async fn check_layout(&self, green: &impl GenericClient) -> Result<()> {
        let row = green
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL, \
                        (SELECT data_type FROM information_schema.columns \
                          WHERE table_schema = $2 AND table_name = 'pending' AND column_name = 'tbl')",
                &[&self.table("migration"), &self.raw],
            )
            .await
            .map_err(Error::db("green: reading the state layout"))?;
        let (exists, tbl_type): (bool, Option<String>) = (row.get(0), row.get(1));
        // No pending table at all: a switched migration that `cleanup` retired.
        if exists && tbl_type.as_deref().is_some_and(|t| t != "text") {
            return Err(Error::StateLayout { schema: self.raw.clone(), found: 1, wanted: LAYOUT });
        }
        Ok(())
    }

    /// Whether this plan has state on green.
    pub async fn exists(&self, green: &impl GenericClient) -> Result<bool> {
        Ok(green
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.table("tables")])
            .await
            .map_err(Error::db("green: looking for migration state"))?
            .get(0))
    }

    /// Removes everything but the `migration` row of a switched migration, and records when:
    /// `status` still says that it switched, when, and that it was cleaned up.
    pub async fn retire(&self, green: &Client) -> Result<()> {
        let s = &self.schema;
        green
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {s}.tables, {s}.chunks, {s}.pending, {s}.touched, {s}.touched_log, {s}.verified, {s}.workers, {s}.verify_parts;
                 DROP SEQUENCE IF EXISTS {s}.pending_seq;
                 ALTER TABLE {s}.migration ADD COLUMN IF NOT EXISTS cleaned_up_at timestamptz;
                 UPDATE {s}.migration SET cleaned_up_at = now(), updated_at = now() WHERE id = 1;"
            ))
            .await
            .map_err(Error::db("green: retiring migration state"))
    }

    /// Removes this plan's state (cleanup).
    pub async fn drop(&self, green: &Client) -> Result<()> {
        green
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await
            .map_err(Error::db("green: dropping migration state"))
    }
}

/// Decodes a stored JSON value, naming what it was when it does not decode.
fn decode<T: serde::de::DeserializeOwned>(what: &str, value: serde_json::Value) -> Result<T> {
    serde_json::from_value(value.clone()).map_err(|e| Error::StateDecode {
        what: what.to_string(),
        value: value.to_string(),
        reason: e.to_string(),
    })
}
