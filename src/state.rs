//! What we persist on green, so that every command resumes from state instead of guessing:
//! the migration phase, each table's state with its deferred indexes, and every copy chunk.
//! The schema is `bluegreen_<plan>`; our objects on blue use the same name.

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, GenericClient};

use crate::{
    error::{Error, Result},
    pg::{catalog::DeferredObject, ident},
    plan::Plan,
    Format,
};

/// The schema on green that holds this plan's state; also the name of our schema on blue.
pub fn schema_name(plan: &str) -> String {
    format!("bluegreen_{}", plan.replace('-', "_"))
}

/// Replication slot and publication name on blue (slot names allow only `[a-z0-9_]`).
pub fn slot_name(plan: &str) -> String {
    schema_name(plan)
}

/// The migration's phase, stored as JSON in `<schema>.migration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// Set by `copy` when it creates the state; next: `Copying`.
    Planned,
    /// Set by `copy` before the first chunk; next: `Following` once every table is done.
    Copying,
    /// Set by `copy` when all tables are copied and indexed; green follows blue from here.
    /// `lsn` is the capture position reached, when known.
    Following {
        /// Last capture position applied.
        lsn: Option<String>,
    },
    /// Set by `cutover` while it switches; `step` is the step reached.
    CuttingOver {
        /// Step name.
        step: String,
    },
    /// Set by `cutover` after RESUME on green. Final.
    Switched,
    /// Set by `cutover` when it gave up and left traffic on blue; next: `Following`.
    Aborted {
        /// Why.
        reason: String,
    },
}

impl Phase {
    /// Whether traffic may already be on green: after this, nothing may copy blue's rows over
    /// green's any more.
    pub fn green_is_live(&self) -> bool {
        match self {
            Phase::Switched => true,
            Phase::CuttingOver { step } => crate::cutover::green_may_be_live(step),
            _ => false,
        }
    }

    /// The name used in `status` (`copying`, `following`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Planned => "planned",
            Phase::Copying => "copying",
            Phase::Following { .. } => "following",
            Phase::CuttingOver { .. } => "cutting-over",
            Phase::Switched => "switched",
            Phase::Aborted { .. } => "aborted",
        }
    }
}

/// One target table's copy state, stored in `<schema>.tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TableState {
    /// Nothing done yet. Next: `Loading`, set in the same transaction that records the chunks
    /// and drops the deferred indexes.
    Pending,
    /// Chunks are being copied; deferred objects are dropped. Next: `Indexing`.
    Loading,
    /// Every chunk is done; indexes are being rebuilt. Next: `Done`.
    Indexing,
    /// Copied and indexed; apply may write to it.
    Done,
}

/// Handle to this plan's state on green.
#[derive(Debug, Clone)]
pub struct State {
    schema: String,
}

impl State {
    /// The state of `plan` (nothing is created until [`State::ensure`]).
    pub fn new(plan: &str) -> Self {
        Self { schema: ident(&schema_name(plan)) }
    }

    /// A table of the state schema, quoted.
    pub fn table(&self, name: &str) -> String {
        format!("{}.{}", self.schema, ident(name))
    }

    /// Creates the schema and tables if missing.
    pub async fn ensure(&self, green: &Client, plan: &str) -> Result<()> {
        let s = &self.schema;
        let sql = format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.migration (
                 id int PRIMARY KEY CHECK (id = 1), plan text NOT NULL, state jsonb NOT NULL,
                 copy_epoch int NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now(),
                 capture_lsn bigint, blue_lsn bigint, lag_bytes bigint, pending_keys bigint,
                 applied_keys bigint NOT NULL DEFAULT 0, apply_rate float8, follower_seen_at timestamptz,
                 last_verify jsonb, last_verify_at timestamptz);
             CREATE TABLE IF NOT EXISTS {s}.verified (
                 target text NOT NULL, buckets int NOT NULL, bucket int NOT NULL, lsn bigint NOT NULL,
                 ok boolean NOT NULL, verified_at timestamptz NOT NULL, PRIMARY KEY (target, bucket));
             CREATE SEQUENCE IF NOT EXISTS {s}.pending_seq;
             CREATE TABLE IF NOT EXISTS {s}.pending (
                 tbl int NOT NULL, key text[] NOT NULL, seq bigint NOT NULL, lsn bigint,
                 PRIMARY KEY (tbl, key));
             CREATE UNIQUE INDEX IF NOT EXISTS pending_seq ON {s}.pending (seq);
             CREATE TABLE IF NOT EXISTS {s}.tables (
                 target text PRIMARY KEY, state text NOT NULL, rows_estimated bigint NOT NULL DEFAULT 0,
                 deferred jsonb NOT NULL DEFAULT '[]', source_filenode bigint,
                 updated_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS {s}.chunks (
                 target text NOT NULL, chunk int NOT NULL, first_block bigint, end_block bigint,
                 done boolean NOT NULL DEFAULT false, epoch int, rows bigint, bytes bigint, seconds float8,
                 finished_at timestamptz, PRIMARY KEY (target, chunk));
             CREATE TABLE IF NOT EXISTS {s}.touched (
                 tbl int NOT NULL, key text[] NOT NULL, lsn bigint NOT NULL, PRIMARY KEY (tbl, key));
             ALTER TABLE {s}.migration ADD COLUMN IF NOT EXISTS cutover jsonb;
             INSERT INTO {s}.migration (id, plan, state) VALUES (1, {plan}, '{{\"phase\":\"planned\"}}')
             ON CONFLICT (id) DO NOTHING;",
            plan = crate::pg::literal(plan),
        );
        green.batch_execute(&sql).await.map_err(Error::db("green: creating migration state"))
    }

    /// Whether this plan has state on green.
    pub async fn exists(&self, green: &impl GenericClient) -> Result<bool> {
        Ok(green
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.table("tables")])
            .await
            .map_err(Error::db("green: looking for migration state"))?
            .get(0))
    }

    /// Reads the phase; `None` when there is no state yet.
    pub async fn phase(&self, green: &impl GenericClient) -> Result<Option<Phase>> {
        let exists: bool = green
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.table("migration")])
            .await
            .map_err(Error::db("green: reading migration state"))?
            .get(0);
        if !exists {
            return Ok(None);
        }
        let row = green
            .query_opt(&format!("SELECT state FROM {} WHERE id = 1", self.table("migration")), &[])
            .await
            .map_err(Error::db("green: reading migration state"))?;
        Ok(row.and_then(|r| serde_json::from_value(r.get(0)).ok()))
    }

    /// Stores the phase.
    pub async fn set_phase(&self, green: &impl GenericClient, phase: &Phase) -> Result<()> {
        let value = serde_json::to_value(phase).map_err(|e| Error::Runtime(e.to_string()))?;
        green
            .execute(
                &format!("UPDATE {} SET state = $1, updated_at = now() WHERE id = 1", self.table("migration")),
                &[&value],
            )
            .await
            .map_err(Error::db("green: saving migration phase"))?;
        Ok(())
    }

    /// Starts a new copy run and returns its number. Chunks record the run that copied them: rows
    /// copied under different snapshots may overlap and are de-duplicated before keys are built.
    pub async fn next_epoch(&self, green: &impl GenericClient) -> Result<i32> {
        Ok(green
            .query_one(
                &format!(
                    "UPDATE {} SET copy_epoch = copy_epoch + 1 WHERE id = 1 RETURNING copy_epoch",
                    self.table("migration")
                ),
                &[],
            )
            .await
            .map_err(Error::db("green: starting a copy run"))?
            .get(0))
    }

    /// Stores the cutover record (step timeline, the databases_file line it replaced).
    pub async fn set_cutover(&self, green: &impl GenericClient, record: &serde_json::Value) -> Result<()> {
        green
            .execute(
                &format!("UPDATE {} SET cutover = $1, updated_at = now() WHERE id = 1", self.table("migration")),
                &[record],
            )
            .await
            .map_err(Error::db("green: saving the cutover record"))?;
        Ok(())
    }

    /// Reads the cutover record, if any.
    pub async fn cutover(&self, green: &impl GenericClient) -> Result<Option<serde_json::Value>> {
        Ok(green
            .query_opt(&format!("SELECT cutover FROM {} WHERE id = 1", self.table("migration")), &[])
            .await
            .map_err(Error::db("green: reading the cutover record"))?
            .and_then(|r| r.get(0)))
    }

    /// Reads a table's state and its recorded deferred objects.
    pub async fn table_state(
        &self,
        green: &impl GenericClient,
        target: &str,
    ) -> Result<Option<(TableState, Vec<DeferredObject>)>> {
        let row = green
            .query_opt(&format!("SELECT state, deferred FROM {} WHERE target = $1", self.table("tables")), &[&target])
            .await
            .map_err(Error::db(format!("green: reading state of {target}")))?;
        Ok(row.map(|r| {
            let state = serde_json::from_value(serde_json::Value::String(r.get(0))).unwrap_or(TableState::Pending);
            let deferred = serde_json::from_value(r.get(1)).unwrap_or_default();
            (state, deferred)
        }))
    }

    /// Stores a table's state (and, when given, its deferred objects).
    pub async fn set_table_state(
        &self,
        green: &impl GenericClient,
        target: &str,
        state: TableState,
        rows_estimated: u64,
        deferred: Option<&[DeferredObject]>,
    ) -> Result<()> {
        let state_text = serde_json::to_value(state).map_err(|e| Error::Runtime(e.to_string()))?;
        let state_text = state_text.as_str().unwrap_or("pending").to_string();
        let deferred = deferred.map(|d| serde_json::to_value(d).unwrap_or_default());
        green
            .execute(
                &format!(
                    "INSERT INTO {} (target, state, rows_estimated, deferred) VALUES ($1, $2, $3, COALESCE($4, '[]'::jsonb)) \
                     ON CONFLICT (target) DO UPDATE SET state = EXCLUDED.state, updated_at = now(), \
                       deferred = COALESCE($4, {}.deferred)",
                    self.table("tables"),
                    self.table("tables"),
                ),
                &[&target, &state_text, &(rows_estimated as i64), &deferred],
            )
            .await
            .map_err(Error::db(format!("green: saving state of {target}")))?;
        Ok(())
    }
}

/// What capture holds on blue: WAL retained by the slot, rows waiting in the change table.
pub async fn blue_retention(plan: &Plan, blue: &Client) -> Result<serde_json::Value> {
    let name = slot_name(&plan.name);
    let slot = blue
        .query_opt(
            "SELECT (pg_current_wal_lsn() - restart_lsn)::int8, active FROM pg_catalog.pg_replication_slots \
             WHERE slot_name = $1",
            &[&name],
        )
        .await
        .map_err(Error::db("blue: reading the replication slot"))?;
    let changes = format!("{}.changes", ident(&schema_name(&plan.name)));
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

/// `migrate status`: phase and per-table progress from the state on green; `blue` adds what
/// capture holds on blue (with a warning above the plan's threshold).
pub async fn status_report(
    plan: &Plan,
    green: &Client,
    blue: Option<serde_json::Value>,
    format: Format,
) -> Result<String> {
    let state = State::new(&plan.name);
    let phase = state.phase(green).await?;
    let mut tables = Vec::new();
    if phase.is_some() {
        let rows = green
            .query(
                &format!(
                    "SELECT t.target, t.state, t.rows_estimated, \
                            COALESCE(sum(c.rows) FILTER (WHERE c.done), 0)::int8, \
                            count(c.chunk) FILTER (WHERE c.done), count(c.chunk) \
                     FROM {} t LEFT JOIN {} c ON c.target = t.target GROUP BY 1, 2, 3 ORDER BY 1",
                    state.table("tables"),
                    state.table("chunks")
                ),
                &[],
            )
            .await
            .map_err(Error::db("green: reading table progress"))?;
        for r in rows {
            tables.push(serde_json::json!({
                "table": r.get::<_, String>(0),
                "state": r.get::<_, String>(1),
                "rows_estimated": r.get::<_, i64>(2),
                "rows_copied": r.get::<_, i64>(3),
                "chunks_done": r.get::<_, i64>(4),
                "chunks": r.get::<_, i64>(5),
            }));
        }
    }
    let capture = if phase.is_some() {
        let r = green
            .query_one(
                &format!(
                    "SELECT lag_bytes, pending_keys, applied_keys, apply_rate, \
                            extract(epoch FROM now() - follower_seen_at)::float8, \
                            last_verify || jsonb_build_object('at', last_verify_at), \
                            to_jsonb(m) -> 'cutover' FROM {} m WHERE id = 1",
                    state.table("migration")
                ),
                &[],
            )
            .await
            .map_err(Error::db("green: reading capture progress"))?;
        serde_json::json!({
            "lag_bytes": r.get::<_, Option<i64>>(0),
            "pending_keys": r.get::<_, Option<i64>>(1),
            "applied_keys": r.get::<_, i64>(2),
            "apply_keys_per_second": r.get::<_, Option<f64>>(3),
            "follower_seen_seconds_ago": r.get::<_, Option<f64>>(4),
            "last_verify": r.get::<_, Option<serde_json::Value>>(5),
            // Read through to_jsonb so a state made before the column existed still reads.
            "cutover": r.get::<_, Option<serde_json::Value>>(6),
        })
    } else {
        serde_json::json!({ "lag_bytes": null })
    };
    let phase_name = phase.as_ref().map(Phase::name).unwrap_or("planned");
    let value = serde_json::json!({
        "plan": plan.name,
        "phase": phase_name,
        "detail": phase,
        "tables": tables,
        "last_verify": capture.get("last_verify").cloned().unwrap_or(serde_json::Value::Null),
        "cutover": capture.get("cutover").cloned().unwrap_or(serde_json::Value::Null),
        "capture": capture,
        "blue": blue.clone().unwrap_or(serde_json::Value::Null),
    });
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(&value).unwrap_or_default() + "\n",
        Format::Text => {
            let mut o = format!("plan {}  phase {}\n", plan.name, phase_name);
            if phase.is_none() {
                o.push_str("  no state on green yet: `migrate copy` has not run\n");
            }
            for t in &tables {
                o.push_str(&format!(
                    "  {:<40} {:<9} {:>12} / ~{:<12} rows  {}/{} chunks\n",
                    t["table"].as_str().unwrap_or(""),
                    t["state"].as_str().unwrap_or(""),
                    t["rows_copied"],
                    t["rows_estimated"],
                    t["chunks_done"],
                    t["chunks"]
                ));
            }
            let c = &value["capture"];
            if !c["lag_bytes"].is_null() {
                o.push_str(&format!(
                    "  capture lag {} bytes, {} keys pending, {} applied ({:.0}/s), follower seen {:.0}s ago\n",
                    c["lag_bytes"],
                    c["pending_keys"],
                    c["applied_keys"],
                    c["apply_keys_per_second"].as_f64().unwrap_or(0.0),
                    c["follower_seen_seconds_ago"].as_f64().unwrap_or(f64::NAN)
                ));
            }
            if let Some(c) = value["cutover"].as_object() {
                o.push_str(&format!(
                    "  last cutover: {}, traffic paused {:.1} ms, {:.0} ms in all\n",
                    c.get("outcome").and_then(|v| v.as_str()).unwrap_or("?"),
                    c.get("paused_ms").and_then(|v| v.as_f64()).unwrap_or(f64::NAN),
                    c.get("total_ms").and_then(|v| v.as_f64()).unwrap_or(f64::NAN)
                ));
            }
            if let Some(w) = value["blue"]["warning"].as_str() {
                o.push_str(&format!("  WARNING: {w}\n"));
            }
            if let Some(v) = value["last_verify"].as_object() {
                o.push_str(&format!(
                    "  last verify {}: {}\n",
                    v.get("at").and_then(|a| a.as_str()).unwrap_or("?"),
                    if v.get("equal").and_then(|e| e.as_bool()).unwrap_or(false) { "equal" } else { "DIFFERENCES" }
                ));
            }
            o
        }
    })
}
