//! The way back after a switch: capture on green, opened by the cutover before traffic reaches
//! green, and the reverse apply that carries every green write to blue through each entry's
//! reverse mapping, so `migrate rollback` can switch back with nothing lost.
//!
//! Capture is row triggers on green's targets into a change table in green's state schema (the
//! PgQ approach of blue's trigger capture: rows are read only once their transaction is below
//! every running one). Everything recorded before the switch's start horizon S (the drain's own
//! writes) is skipped: the application reaches green only after S. Apply re-reads each key from
//! green and writes blue as forward apply writes green, so it is idempotent and order-free.

pub mod apply;

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, GenericClient};

use crate::{
    error::{Error, Result},
    pg::{ident, literal},
    plan::{KeyText, Plan, ResolvedPlan, ResolvedTable},
    state::{short_name, State},
};

/// The way back as stored in `migration.way_back` on green.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Window {
    /// Green's writes are being captured and carried to blue.
    pub open: bool,
    /// Green's transaction horizon S taken in the switch's pause: changes of transactions below
    /// it are the drain's, not the application's.
    pub start_xid: Option<i64>,
    /// The file beside PgBouncer's databases file where the cutover saved the entry's value
    /// before the switch (blue's; it may hold a password, so it is never stored here): the
    /// rollback writes it back.
    pub blue_line_file: Option<String>,
    /// When the cutover opened it.
    pub opened_at: Option<String>,
    /// When it was closed (by a rollback or `finish`), and how.
    pub closed_at: Option<String>,
    /// `rolled-back` or `finished`.
    pub closed_by: Option<String>,
    /// Keys written to blue so far.
    #[serde(default)]
    pub applied: i64,
    /// When the reverse follower last reported.
    pub seen_at: Option<String>,
    /// What stopped the reverse follower, when something did.
    pub error: Option<String>,
    /// The last rollback's record.
    pub last_rollback: Option<serde_json::Value>,
}

/// The change table on green.
fn changes(state: &State) -> String {
    state.table("changes_back")
}

/// Keys written back during the window: the rollback checks exactly these.
fn touched(state: &State) -> String {
    state.table("touched_back")
}

/// Trigger names on green's targets.
fn trigger_names(plan: &str) -> (String, String) {
    let raw = crate::state::schema_name(plan);
    (format!("{raw}_back"), format!("{raw}_back_truncate"))
}

fn function_name(state: &State, t: &ResolvedTable) -> String {
    format!("{}.{}", state.schema(), ident(&format!("back_tgt_{}", short_name(&t.target.to_string()))))
}

/// The stored window, if a cutover ever opened one.
pub async fn window(state: &State, green: &impl GenericClient) -> Result<Option<Window>> {
    let row = green
        .query_opt(&format!("SELECT way_back FROM {} WHERE id = 1", state.table("migration")), &[])
        .await
        .map_err(Error::db("green: reading the way back"))?;
    let Some(v) = row.and_then(|r| r.get::<_, Option<serde_json::Value>>(0)) else { return Ok(None) };
    serde_json::from_value(v.clone()).map(Some).map_err(|e| Error::StateDecode {
        what: "the way back".into(),
        value: v.to_string(),
        reason: e.to_string(),
    })
}

/// Merges `patch` into the stored window, and sets each of `stamps` to green's clock (one
/// statement: concurrent writers never lose a field).
pub async fn update(
    state: &State,
    green: &impl GenericClient,
    patch: serde_json::Value,
    stamps: &[&str],
) -> Result<()> {
    let stamps: Vec<String> = stamps.iter().map(|s| s.to_string()).collect();
    green
        .execute(
            &format!(
                "UPDATE {} SET way_back = coalesce(way_back, '{{}}'::jsonb) || $1::text::jsonb \
                   || coalesce((SELECT jsonb_object_agg(s, to_jsonb(now())) FROM unnest($2::text[]) s), '{{}}'::jsonb) \
                 WHERE id = 1",
                state.table("migration")
            ),
            &[&patch.to_string(), &stamps],
        )
        .await
        .map_err(Error::db("green: recording the way back"))?;
    Ok(())
}

/// Where the entry's databases-file value before the switch is saved: beside the databases file
/// (readable only by its owner), named by the plan.
pub fn blue_line_path(databases_file: &std::path::Path, plan: &str) -> std::path::PathBuf {
    let mut name = databases_file.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".bluegreen-{plan}.blue"));
    databases_file.with_file_name(name)
}

/// Saves `value` (blue's databases-file value) at `path`, mode 0600.
pub fn save_blue_line(path: &std::path::Path, value: &str) -> Result<()> {
    use std::io::Write;
    let write = || -> std::io::Result<()> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(path)?;
        f.write_all(value.as_bytes())?;
        f.sync_all()
    };
    write().map_err(|source| Error::File { what: "writing", path: path.to_path_buf(), source })
}

/// Reads the value [`save_blue_line`] saved.
pub fn read_blue_line(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).map_err(|source| Error::File {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })
}

/// Blue rows per entry the preflights' round trip reads.
const ROUND_TRIP_ROWS: u64 = 10_000;

/// The round trip on a sample of blue's rows (the cutover's and the rollback's preflight):
/// each row that would not come back unchanged is named by table, key and column.
pub async fn round_trip_check(resolved: &ResolvedPlan, blue: &impl GenericClient) -> Result<crate::plan::Check> {
    let mut lost = Vec::new();
    for t in &resolved.tables {
        let Some(sql) = crate::plan::round_trip_sql(t, Some(ROUND_TRIP_ROWS), 3) else { continue };
        for r in blue.query(&sql, &[]).await.map_err(Error::db(format!("blue: round trip of {}", t.source)))? {
            let key: Vec<String> = r.get(0);
            lost.push(format!("{} key ({}) column {}", t.target, key.join(", "), r.get::<_, String>(1)));
        }
    }
    Ok(crate::plan::Check {
        name: "way back proven".into(),
        ok: lost.is_empty(),
        detail: if lost.is_empty() {
            format!("up to {ROUND_TRIP_ROWS} rows per table come back from green's form unchanged")
        } else {
            format!("would change: {} (run `migrate verify --reverse`)", lost.join("; "))
        },
    })
}

/// Why the plan's entries cannot all be carried back, one line per entry: no reverse mapping, a
/// join, a target shared by entries, or no unique index on exactly blue's key for the upsert.
pub async fn problems(resolved: &ResolvedPlan, blue: &impl GenericClient) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for t in &resolved.tables {
        if let Some(why) = &t.reverse.impossible {
            out.push(format!("{}: {why}", t.target));
            continue;
        }
        let writers = |table: &crate::pg::QualifiedName| {
            resolved
                .tables
                .iter()
                .filter(|o| o.reverse.impossible.is_none())
                .filter(|o| o.written_back().iter().any(|(b, _, _)| *b == table))
                .count()
        };
        if let Some((table, _, _)) = t.written_back().into_iter().find(|(b, _, _)| writers(b) > 1) {
            out.push(format!(
                "{}: blue's {table} would be written back by several entries (a split); telling which one owns a row \
                 is not built",
                t.target
            ));
            continue;
        }
        if resolved.tables.iter().filter(|o| o.target == t.target).count() > 1 {
            out.push(format!(
                "{}: written by several entries; telling their rows apart on the way back is not built",
                t.target
            ));
            continue;
        }
        if let Some(k) = t.key.iter().find(|k| t.reverse.expr(&k.source).is_none()) {
            out.push(format!("{}: key column {}.{} is not carried back", t.target, t.source, k.source));
            continue;
        }
        let keys: Vec<String> = t.key.iter().map(|k| k.source.clone()).collect();
        let unique: bool = blue
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = $1::text::regclass \
                   AND i.indisunique AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL \
                   AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_catalog.pg_attribute a \
                        WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)) \
                     = (SELECT array_agg(k ORDER BY k) FROM unnest($2::text[]) k))",
                &[&t.source.quoted(), &keys],
            )
            .await
            .map_err(Error::db(format!("blue: reading the unique indexes of {}", t.source)))?
            .get(0);
        for (table, carried, key) in t.written_back() {
            let always: Vec<String> = blue
                .query(
                    "SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid = $1::text::regclass \
                       AND attidentity = 'a' AND NOT attisdropped AND attname <> ALL($2::text[])",
                    &[&table.quoted(), &key],
                )
                .await
                .map_err(Error::db(format!("blue: reading the identity columns of {table}")))?
                .iter()
                .map(|r| r.get(0))
                .filter(|c: &String| carried.contains(&c.as_str()))
                .collect();
            if !always.is_empty() {
                out.push(format!(
                    "{}: blue's {table} column(s) {} are GENERATED ALWAYS AS IDENTITY and not its key: an update cannot set them",
                    t.target,
                    always.join(", ")
                ));
            }
        }
        if !unique {
            out.push(format!(
                "{}: blue's {} has no unique index on exactly ({}) for the way back's upsert",
                t.target,
                t.source,
                keys.join(", ")
            ));
        }
    }
    Ok(out)
}

/// Creates the change tables and the triggers on every target (idempotent). Run by the cutover
/// before its catch-up, while green's targets have no application writers: nothing slow may
/// enter the pause.
pub async fn install(plan: &Plan, resolved: &ResolvedPlan, green: &Client) -> Result<()> {
    let state = State::new(&plan.name);
    green
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {c} (
                 id bigserial PRIMARY KEY, tbl text NOT NULL, key text[],
                 truncated boolean NOT NULL DEFAULT false,
                 xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
                 lsn pg_lsn NOT NULL DEFAULT pg_current_wal_insert_lsn());
             CREATE TABLE IF NOT EXISTS {t} (tbl text NOT NULL, key text[] NOT NULL, PRIMARY KEY (tbl, key));",
            c = changes(&state),
            t = touched(&state)
        ))
        .await
        .map_err(Error::db("green: creating the way back's change table"))?;
    let (name, tname) = trigger_names(&plan.name);
    for t in &resolved.tables {
        let func = function_name(&state, t);
        let target = t.target.quoted();
        let sql = format!(
            "BEGIN; SET LOCAL lock_timeout = '{ms}ms';
             {function}
             DROP TRIGGER IF EXISTS {n} ON {target};
             DROP TRIGGER IF EXISTS {tn} ON {target};
             CREATE TRIGGER {n} AFTER INSERT OR UPDATE OR DELETE ON {target} FOR EACH ROW EXECUTE FUNCTION {func}();
             CREATE TRIGGER {tn} AFTER TRUNCATE ON {target} FOR EACH STATEMENT EXECUTE FUNCTION {func}();
             COMMIT;",
            ms = plan.cutover.lock_timeout.as_millis(),
            function = function_sql(&state, t, &func),
            n = ident(&name),
            tn = ident(&tname),
        );
        if let Err(e) = green.batch_execute(&sql).await {
            let _ = green.batch_execute("ROLLBACK").await;
            return Err(Error::Db {
                context: format!("green: capture triggers for the way back on {}", t.target),
                source: e,
            });
        }
    }
    Ok(())
}

/// The trigger function of one target: the entry's key, new and old, as text
/// ([`KeyText::Json`], with the settings pinned as blue's capture functions pin them). It runs as
/// its owner, so the v2 application's roles need no rights on our schema.
fn function_sql(state: &State, t: &ResolvedTable, func: &str) -> String {
    let keys = |rec: &str| {
        t.key
            .iter()
            .map(|k| KeyText::Json.render(&format!("{rec}.{}", ident(&k.target))))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let tbl = literal(t.id.as_str());
    let c = changes(state);
    let body = format!(
        "BEGIN
           IF TG_OP = 'TRUNCATE' THEN
             INSERT INTO {c} (tbl, truncated) VALUES ({tbl}, true);
             RETURN NULL;
           END IF;
           IF TG_OP <> 'DELETE' THEN
             INSERT INTO {c} (tbl, key) VALUES ({tbl}, ARRAY[{new}]);
           END IF;
           IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND ROW({old}) IS DISTINCT FROM ROW({new})) THEN
             INSERT INTO {c} (tbl, key) VALUES ({tbl}, ARRAY[{old}]);
           END IF;
           RETURN NULL;
         END",
        new = keys("NEW"),
        old = keys("OLD"),
    );
    let tag = (0..).map(|n| format!("$bg{n}$")).find(|t| !body.contains(t.as_str())).unwrap_or_default();
    format!(
        "CREATE OR REPLACE FUNCTION {func}() RETURNS trigger LANGUAGE plpgsql
           SECURITY DEFINER SET search_path = pg_catalog, pg_temp
           SET extra_float_digits = 3 SET IntervalStyle = 'postgres' SET TimeZone = 'UTC' AS {tag}{body}{tag};"
    )
}

/// Drops the way back's triggers from every table of green that has them, in one transaction
/// under `[cutover] lock_timeout` (all or none: a half-removed way back would miss writes to
/// some tables; a long v2 transaction makes it fail, named, instead of queueing the application).
pub async fn remove_triggers(plan: &Plan, green: &Client) -> Result<()> {
    let (name, tname) = trigger_names(&plan.name);
    let on: Vec<String> = green
        .query(
            "SELECT DISTINCT tgrelid::regclass::text FROM pg_catalog.pg_trigger WHERE tgname IN ($1, $2) AND tgparentid = 0",
            &[&name, &tname],
        )
        .await
        .map_err(Error::db("green: looking for the way back's triggers"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if on.is_empty() {
        return Ok(());
    }
    let mut sql = format!("BEGIN; SET LOCAL lock_timeout = '{}ms';", plan.cutover.lock_timeout.as_millis());
    for rel in &on {
        sql.push_str(&format!(
            " DROP TRIGGER IF EXISTS {n} ON {rel}; DROP TRIGGER IF EXISTS {tn} ON {rel};",
            n = ident(&name),
            tn = ident(&tname)
        ));
    }
    sql.push_str(" COMMIT;");
    if let Err(e) = green.batch_execute(&sql).await {
        let _ = green.batch_execute("ROLLBACK").await;
        return Err(Error::Db {
            context: format!("green: removing the way back's triggers from {}", on.join(", ")),
            source: e,
        });
    }
    Ok(())
}

/// Removes the way back's triggers, functions and tables from green (idempotent: what exists is
/// dropped by name; the triggers first, all in one transaction).
pub async fn remove(plan: &Plan, green: &Client) -> Result<()> {
    let state = State::new(&plan.name);
    remove_triggers(plan, green).await?;
    let schema_exists: bool = green
        .query_one("SELECT to_regnamespace($1) IS NOT NULL", &[&state.schema()])
        .await
        .map_err(Error::db("green: looking for the state schema"))?
        .get(0);
    if !schema_exists {
        return Ok(());
    }
    let functions: Vec<String> = green
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p WHERE p.pronamespace = $1::text::regnamespace \
               AND p.proname LIKE 'back\\_tgt\\_%'",
            &[&state.schema()],
        )
        .await
        .map_err(Error::db("green: looking for the way back's functions"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut sql = format!("DROP TABLE IF EXISTS {}, {};", changes(&state), touched(&state));
    for f in functions {
        sql.push_str(&format!("DROP FUNCTION IF EXISTS {f};"));
    }
    green.batch_execute(&sql).await.map_err(Error::db("green: removing the way back's tables"))
}

/// Marks a window a failed cutover recorded as not open (only one that is open and never
/// carried anything: an earlier rollback's record stays).
pub async fn close_aborted(state: &State, green: &impl GenericClient) -> Result<()> {
    green
        .execute(
            &format!(
                "UPDATE {} SET way_back = way_back || '{{\"open\": false}}'::jsonb \
                 WHERE id = 1 AND way_back IS NOT NULL AND (way_back->>'open')::boolean",
                state.table("migration")
            ),
            &[],
        )
        .await
        .map_err(Error::db("green: closing the way back of an aborted cutover"))?;
    Ok(())
}

/// Forgets change rows below S (the drain's own writes, when apply's session fired the
/// triggers): they are never carried, and every round would scan past them.
pub async fn prune(state: &State, green: &impl GenericClient, start: i64) -> Result<u64> {
    green
        .execute(&format!("DELETE FROM {} WHERE xid::text::int8 < $1", changes(state)), &[&start])
        .await
        .map_err(Error::db("green: pruning the way back's change table"))
}

/// Green's transaction horizon now: every transaction that exists lies below it.
pub async fn horizon(green: &impl GenericClient) -> Result<i64> {
    Ok(green
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8", &[])
        .await
        .map_err(Error::db("green: reading the transaction horizon"))?
        .get(0))
}

/// Whether the way back's objects exist on green (the change table and a trigger per target).
pub async fn installed(plan: &Plan, resolved: &ResolvedPlan, green: &impl GenericClient) -> Result<bool> {
    let state = State::new(&plan.name);
    let (name, _) = trigger_names(&plan.name);
    let targets: Vec<String> = resolved.tables.iter().map(|t| t.target.quoted()).collect();
    Ok(green
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL AND (SELECT count(DISTINCT tgrelid) FROM pg_catalog.pg_trigger \
               WHERE tgname = $2 AND tgparentid = 0 AND tgrelid = ANY(SELECT to_regclass(x) FROM unnest($3::text[]) x)) = $4",
            &[&changes(&state), &name, &targets, &(targets.len() as i64)],
        )
        .await
        .map_err(Error::db("green: looking for the way back's capture"))?
        .get(0))
}

/// Change rows of the application (at or past S) not yet carried to blue.
pub async fn backlog(state: &State, green: &impl GenericClient, start: i64) -> Result<i64> {
    let exists: bool = green
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&changes(state)])
        .await
        .map_err(Error::db("green: looking for the way back's change table"))?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(green
        .query_one(&format!("SELECT count(*) FROM {} WHERE xid::text::int8 >= $1", changes(state)), &[&start])
        .await
        .map_err(Error::db("green: counting the way back's changes"))?
        .get(0))
}

/// Green WAL written since the oldest change not yet on blue (0 when none waits).
pub async fn lag_bytes(state: &State, green: &impl GenericClient, start: i64) -> Result<i64> {
    Ok(green
        .query_one(
            &format!(
                "SELECT coalesce((pg_current_wal_insert_lsn() - min(lsn))::int8, 0) FROM {} WHERE xid::text::int8 >= $1",
                changes(state)
            ),
            &[&start],
        )
        .await
        .map_err(Error::db("green: reading the way back's lag"))?
        .get(0))
}

/// Whether every application change of a transaction below `target` has been carried to blue.
pub async fn reached(state: &State, green: &impl GenericClient, start: i64, target: i64) -> Result<bool> {
    Ok(green
        .query_one(
            &format!(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8 >= $2 \
                 AND NOT EXISTS (SELECT 1 FROM {} WHERE xid::text::int8 >= $1 AND xid::text::int8 < $2)",
                changes(state)
            ),
            &[&start, &target],
        )
        .await
        .map_err(Error::db("green: reading the way back's change table"))?
        .get(0))
}

/// The keys written back during the window, by entry.
pub async fn touched_keys(state: &State, green: &impl GenericClient, t: &ResolvedTable) -> Result<Vec<Vec<String>>> {
    Ok(green
        .query(&format!("SELECT key FROM {} WHERE tbl = $1", touched(state)), &[&t.id.as_str()])
        .await
        .map_err(Error::db("green: reading the keys written back"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Whether the table of keys written back exists (it goes with the way back).
pub async fn has_touched(state: &State, green: &impl GenericClient) -> Result<bool> {
    Ok(green
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&touched(state)])
        .await
        .map_err(Error::db("green: looking for the keys written back"))?
        .get(0))
}

/// Sets each blue sequence owned by a carried column (serial or identity) to at least the larger
/// of the column's `max()` on blue (rows written back included) and the green sequence the plan
/// carried it to, plus `gap`; a sequence already past that is left alone (so calling it again
/// does not move it). The v1 application's next ids must not collide with rows green gave out.
pub async fn carry_sequences(
    resolved: &ResolvedPlan,
    blue: &Client,
    green: &Client,
    gap: i64,
) -> Result<Vec<crate::state::SequenceSet>> {
    let mut out = Vec::new();
    for t in &resolved.tables {
        for (table, carried, _) in t.written_back() {
            for column in carried {
                let owned: Option<String> = blue
                    .query_one("SELECT pg_get_serial_sequence($1, $2)", &[&table.quoted(), &column])
                    .await
                    .map_err(Error::db(format!("blue: the sequence of {table}.{column}")))?
                    .get(0);
                let Some(seq) = owned else { continue };
                let row = blue
                    .query_one(
                        &format!(
                            "SELECT (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {seq}), \
                                (SELECT max({col})::int8 FROM {src})",
                            col = ident(column),
                            src = table.quoted()
                        ),
                        &[],
                    )
                    .await
                    .map_err(Error::db(format!("blue: reading sequence {seq}")))?;
                let (blue_value, largest): (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
                let mut green_value = None;
                // Green's sequences carried from the source's (a joined table's are not carried).
                for s in t.sequences.iter().filter(|s| s.blue_sequence.is_some() && *table == t.source) {
                    green_value = green
                        .query_one(
                            &format!(
                                "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {}",
                                s.green_sequence
                            ),
                            &[],
                        )
                        .await
                        .map_err(Error::db(format!("green: reading sequence {}", s.green_sequence)))?
                        .get::<_, Option<i64>>(0)
                        .max(green_value);
                }
                let Some(wanted) = [largest, green_value].into_iter().flatten().max().map(|v| v + gap) else {
                    continue;
                };
                if blue_value.is_some_and(|b| b >= wanted) {
                    continue;
                }
                let set: i64 = blue
                    .query_one("SELECT setval($1::text::regclass, $2)", &[&seq, &wanted])
                    .await
                    .map_err(Error::db(format!("blue: setting sequence {seq}")))?
                    .get(0);
                out.push(crate::state::SequenceSet { sequence: seq, blue: blue_value, set });
            }
        }
    }
    Ok(out)
}
