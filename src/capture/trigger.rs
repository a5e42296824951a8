//! Trigger capture, for blue servers without logical decoding: per-table row triggers write each
//! changed key into a change table in our schema on blue. The reader takes only rows written by
//! transactions older than every running one (below the snapshot's xmin, the PgQ approach), so a
//! transaction that commits late is never skipped: ids are not commit-ordered, xids below xmin are
//! settled.

use tokio_postgres::Client;
use tracing::info;

use super::{trace::Link, KeyEvent, POLL_CHANGES};
use crate::{
    error::{Error, Result},
    pg::{ident, literal, Lsn, QualifiedName},
    plan::{KeyText, Plan, ResolvedPlan, ResolvedTable},
    state::{schema_name, short_name, State},
};

/// Triggers and the change table on blue.
pub struct Trigger {
    /// Connection to blue (replaced after a reconnect).
    pub blue: Client,
    schema: String,
    tables: Vec<ResolvedTable>,
    /// The last round stopped at its cap ([`POLL_CHANGES`] rows): more is waiting.
    full: bool,
}

impl Trigger {
    /// Creates the schema, change table, and per-table trigger functions and triggers (idempotent).
    pub async fn setup(plan: &Plan, resolved: &ResolvedPlan, blue: Client) -> Result<Self> {
        let schema = ident(&schema_name(&plan.name));
        blue.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.changes (
                 id bigserial PRIMARY KEY, tbl text NOT NULL, key text[],
                 truncated boolean NOT NULL DEFAULT false,
                 xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
                 lsn pg_lsn NOT NULL DEFAULT pg_current_wal_insert_lsn());"
        ))
        .await
        .map_err(Error::db("blue: creating the change table"))?;
        let raw = schema_name(&plan.name);
        let tbl_type: Option<String> = blue
            .query_one(
                "SELECT data_type FROM information_schema.columns \
                 WHERE table_schema = $1 AND table_name = 'changes' AND column_name = 'tbl'",
                &[&raw],
            )
            .await
            .map_err(Error::db("blue: reading the change table"))?
            .get(0);
        if tbl_type.as_deref() != Some("text") {
            return Err(Error::StateLayout { schema: format!("{raw} (on blue)"), found: 1, wanted: 2 });
        }
        drop_stale_triggers(&blue, &raw, resolved, plan.ddl_lock).await?;
        for (source, roles) in by_table(&resolved.tables) {
            let source = &source;
            // The functions are replaced every time (no table lock needed): an older install's
            // body is brought up to date, and entries added or removed over the same source are
            // in it. The triggers that call them are made once, or again when they call other
            // functions (an install from before one function per source table).
            blue.batch_execute(&functions_sql(&schema, source, &roles))
                .await
                .map_err(Error::db(format!("blue: creating capture functions for {source}")))?;
            let (func, tfunc) = function_names(&schema, source);
            let present: i64 = blue
                .query_one(
                    "SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = $1::text::regclass \
                       AND ((tgname = $2 AND tgfoid = to_regproc($4)::oid) OR (tgname = $3 AND tgfoid = to_regproc($5)::oid))",
                    &[&source.quoted(), &format!("{raw}_capture"), &format!("{raw}_truncate"), &func, &tfunc],
                )
                .await
                .map_err(Error::db(format!("blue: looking for capture triggers on {source}")))?
                .get(0);
            if present == 2 {
                continue;
            }
            ddl_with_lock_timeout(
                &blue,
                &triggers_sql(&schema, source),
                &format!("capture triggers on {source}"),
                plan.ddl_lock,
            )
            .await?;
        }
        info!(tables = resolved.tables.len(), "capture triggers installed");
        Ok(Self { blue, schema, tables: resolved.tables.clone(), full: false })
    }

    /// The change table `copy` created; `None` when there is none.
    pub async fn open(plan: &Plan, resolved: &ResolvedPlan, blue: Client) -> Result<Option<Self>> {
        let schema = ident(&schema_name(&plan.name));
        let exists: bool = blue
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&format!("{schema}.changes")])
            .await
            .map_err(Error::db("blue: looking for the change table"))?
            .get(0);
        Ok(exists.then(|| Self { blue, schema, tables: resolved.tables.clone(), full: false }))
    }

    /// Whether the last round stopped at its cap, with more waiting on blue.
    pub fn full(&self) -> bool {
        self.full
    }

    /// One capture round; see [`super::Capture::poll`].
    pub async fn poll(&mut self, green: &mut Client, state: &State) -> Result<usize> {
        let rows = self
            .blue
            .query(
                &format!(
                    "SELECT id, tbl, key, truncated, (lsn - '0/0')::int8 FROM {}.changes \
                     WHERE xid < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY id LIMIT $1",
                    self.schema
                ),
                &[&(POLL_CHANGES as i64)],
            )
            .await
            .map_err(Error::db("blue: reading the change table"))?;
        self.full = rows.len() >= POLL_CHANGES as usize;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut events = Vec::with_capacity(rows.len());
        let mut links = Vec::new();
        for r in &rows {
            let tag: String = r.get(1);
            let (id, alias) = match tag.split_once(LINK_TAG) {
                Some((id, alias)) => (id, Some(alias)),
                None => (tag.as_str(), None),
            };
            let entry = self.tables.iter().position(|t| t.id.as_str() == id);
            let join = match (entry, alias) {
                (Some(e), Some(a)) => self.tables[e].joins.iter().position(|j| j.alias == a).map(Some),
                (_, None) => Some(None),
                (None, Some(_)) => None,
            };
            if r.get::<_, bool>(3) {
                let names: Vec<String> = match (entry, join) {
                    (Some(e), Some(Some(j))) => vec![self.tables[e].joins[j].table.to_string()],
                    (Some(e), _) => vec![self.tables[e].source.to_string()],
                    _ => Vec::new(),
                };
                return Err(super::truncated(&names));
            }
            ids.push(r.get::<_, i64>(0));
            let key: Vec<String> = r.try_get(2).map_err(|e| Error::Decode {
                what: format!("change {}", r.get::<_, i64>(0)),
                message: format!("unusable key: {e}"),
            })?;
            let lsn = Lsn(r.get(4));
            // A change of an entry (or join) the plan no longer has is dropped with the others.
            match (entry, join) {
                (Some(e), Some(None)) => events.push(KeyEvent { table: self.tables[e].id.clone(), key, lsn }),
                (Some(entry), Some(Some(join))) => links.push(Link { entry, join, values: key, lsn }),
                _ => {}
            }
        }
        // The rows are below blue's xmin: every write they record is visible to this read.
        events.extend(super::trace::resolve(&self.blue, &self.tables, links, KeyText::Json).await?);
        let tx = green.transaction().await.map_err(Error::db("green: begin"))?;
        // Durable before blue forgets the changes, whatever the session's setting (the
        // cutover's apply session turns synchronous_commit off).
        tx.batch_execute("SET LOCAL synchronous_commit = on").await.map_err(Error::db("green: begin"))?;
        state.store_keys(&tx, &events).await?;
        tx.commit().await.map_err(Error::db("green: storing captured keys"))?;
        // Only now that green holds them may blue forget them.
        self.blue
            .execute(&format!("DELETE FROM {}.changes WHERE id = ANY($1)", self.schema), &[&ids])
            .await
            .map_err(Error::db("blue: removing captured changes"))?;
        Ok(events.len())
    }

    /// The xid below which every transaction that exists now lies.
    pub async fn xid_horizon(&self) -> Result<i64> {
        Ok(self
            .blue
            .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8", &[])
            .await
            .map_err(Error::db("blue: reading the transaction horizon"))?
            .get(0))
    }

    /// Whether every transaction below `xid` has finished and its changes were read.
    pub async fn reached(&self, xid: i64) -> Result<bool> {
        Ok(self
            .blue
            .query_one(
                &format!(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8 >= $1 \
                     AND NOT EXISTS (SELECT 1 FROM {}.changes WHERE xid::text::int8 < $1)",
                    self.schema
                ),
                &[&xid],
            )
            .await
            .map_err(Error::db("blue: reading the change table"))?
            .get(0))
    }

    /// Blue's current WAL position and the position of the oldest change not yet read.
    pub async fn positions(&self) -> Result<(Lsn, Lsn)> {
        let row = self
            .blue
            .query_one(
                &format!(
                    "SELECT (pg_current_wal_lsn() - '0/0')::int8, \
                     (coalesce((SELECT min(lsn) FROM {}.changes), pg_current_wal_lsn()) - '0/0')::int8",
                    self.schema
                ),
                &[],
            )
            .await
            .map_err(Error::db("blue: reading the WAL position"))?;
        Ok((row.get(0), row.get(1)))
    }
}

/// Runs DDL on blue in one transaction with a short `lock_timeout`, retrying on lock timeouts
/// (`lock`: the wait per attempt and the attempts, `[capture] ddl_lock_timeout` and
/// `ddl_attempts`). CREATE TRIGGER needs a lock that conflicts with writes; while it waits,
/// every new write to the table queues behind it, so the wait must be short or the application
/// stalls behind one long transaction.
async fn ddl_with_lock_timeout(blue: &Client, sql: &str, what: &str, lock: (std::time::Duration, u32)) -> Result<()> {
    let (timeout, attempts) = lock;
    let ms = timeout.as_millis();
    let mut wait = std::time::Duration::from_millis(200);
    for attempt in 1..=attempts {
        let res = blue.batch_execute(&format!("BEGIN; SET LOCAL lock_timeout = '{ms}ms'; {sql}; COMMIT")).await;
        match res {
            Ok(()) => return Ok(()),
            Err(e) if e.code().is_some_and(|c| c.code() == "55P03") => {
                let _ = blue.batch_execute("ROLLBACK").await;
                let open = crate::pg::catalog::open_transactions(blue).await.unwrap_or_default();
                tracing::warn!(
                    attempt,
                    what,
                    "lock not granted within {ms} ms; retrying. Open on blue: {}",
                    if open.is_empty() { "no long transaction seen".to_string() } else { open.join("; ") }
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => {
                let _ = blue.batch_execute("ROLLBACK").await;
                return Err(Error::Db { context: format!("blue: creating {what}"), source: e });
            }
        }
    }
    Err(Error::LockNotGranted { what: what.to_string(), attempts })
}

/// Removes our triggers from tables the plan no longer captures (an entry removed from the plan):
/// their changes would only pile up in the change table.
async fn drop_stale_triggers(
    blue: &Client,
    raw: &str,
    resolved: &ResolvedPlan,
    lock: (std::time::Duration, u32),
) -> Result<()> {
    let stale: Vec<String> = blue
        .query(
            // Not the clones a partitioned table's triggers have on its partitions: they go with it.
            "SELECT DISTINCT tgrelid::regclass::text FROM pg_catalog.pg_trigger WHERE tgname IN ($1, $2) AND tgparentid = 0",
            &[&format!("{raw}_capture"), &format!("{raw}_truncate")],
        )
        .await
        .map_err(Error::db("blue: looking for capture triggers"))?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    let planned: Vec<String> = by_table(&resolved.tables).iter().map(|(t, _)| t.quoted()).collect();
    for rel in stale {
        let still: bool = blue
            .query_one("SELECT $1::text::regclass = ANY($2::text[]::regclass[])", &[&rel, &planned])
            .await
            .map_err(Error::db("blue: looking for capture triggers"))?
            .get(0);
        if still {
            continue;
        }
        let sql = format!(
            "DROP TRIGGER IF EXISTS {} ON {rel}; DROP TRIGGER IF EXISTS {} ON {rel}",
            ident(&format!("{raw}_capture")),
            ident(&format!("{raw}_truncate")),
        );
        ddl_with_lock_timeout(blue, &sql, &format!("removing capture triggers from {rel} (no longer planned)"), lock)
            .await?;
        info!(table = %rel, "capture triggers removed: the plan no longer has this table");
    }
    Ok(())
}

/// Separates an entry's id from a join's alias in the change table's `tbl` (a unit separator:
/// in no id or alias).
const LINK_TAG: char = '\u{1f}';

/// What a table's trigger records for one entry reading it.
struct TriggerRole {
    /// `tbl` of its change rows: the entry's id, then the join's alias for a joined table.
    tag: String,
    /// The columns recorded: the entry's key, or the join's link columns.
    columns: Vec<String>,
    /// A joined table: rows whose link values hold a NULL join nothing and are not recorded.
    link: bool,
}

/// Every table capture reads (sources and joined tables), in plan order, with what its one
/// trigger records for each entry that reads it.
fn by_table(tables: &[ResolvedTable]) -> Vec<(QualifiedName, Vec<TriggerRole>)> {
    let mut groups: Vec<(QualifiedName, Vec<TriggerRole>)> = Vec::new();
    let mut add = |table: &QualifiedName, role: TriggerRole| match groups.iter_mut().find(|g| &g.0 == table) {
        Some(g) => g.1.push(role),
        None => groups.push((table.clone(), vec![role])),
    };
    for t in tables {
        let columns = t.key.iter().map(|k| k.source.clone()).collect();
        add(&t.source, TriggerRole { tag: t.id.as_str().to_string(), columns, link: false });
        for j in &t.joins {
            let tag = format!("{}{LINK_TAG}{}", t.id.as_str(), j.alias);
            add(&j.table, TriggerRole { tag, columns: j.link_columns(), link: true });
        }
    }
    groups
}

/// The trigger functions of one table, recording a change row for each of `roles` (every entry
/// that reads it), named by the table. Keys are taken with `to_jsonb(...) #>> '{}'`, whose text
/// form does not depend on the writing session's DateStyle.
/// The functions run as their owner (SECURITY DEFINER, fixed search_path) so the application's
/// roles need no rights on our schema: their writes must never fail because of capture. They pin
/// `extra_float_digits = 3` (a writer's session with 0 would record a float key rounded to 15
/// digits, a key that does not exist), `IntervalStyle = 'postgres'` and `TimeZone = 'UTC'` (a
/// timestamptz key recorded in each writer's zone would name one row by several texts). An old
/// row is recorded when its recorded text differs from the new row's, not when the type's
/// equality says so: `Foo` and `foo` are equal as citext but may join other rows as text.
fn functions_sql(schema: &str, table: &QualifiedName, roles: &[TriggerRole]) -> String {
    let mut rows = String::new();
    let mut truncated = String::new();
    for role in roles {
        // The text the trace query and apply read back (`KeyText::Json`).
        let keys = |rec: &str| {
            role.columns
                .iter()
                .map(|c| KeyText::Json.render(&format!("{rec}.{}", ident(c))))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let tuple =
            |rec: &str| role.columns.iter().map(|c| format!("{rec}.{}", ident(c))).collect::<Vec<_>>().join(", ");
        let texts = |rec: &str| format!("ROW({})", keys(rec));
        let some = |rec: &str| if role.link { format!(" AND ROW({}) IS NOT NULL", tuple(rec)) } else { String::new() };
        let i = literal(&role.tag);
        rows.push_str(&format!(
            "
           IF TG_OP <> 'DELETE'{new_some} THEN
             INSERT INTO {schema}.changes (tbl, key) VALUES ({i}, ARRAY[{new_keys}]);
           END IF;
           IF (TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND {old_texts} IS DISTINCT FROM {new_texts})){old_some} THEN
             INSERT INTO {schema}.changes (tbl, key) VALUES ({i}, ARRAY[{old_keys}]);
           END IF;",
            new_keys = keys("NEW"),
            old_keys = keys("OLD"),
            old_texts = texts("OLD"),
            new_texts = texts("NEW"),
            new_some = some("NEW"),
            old_some = some("OLD"),
        ));
        truncated.push_str(&format!("\n           INSERT INTO {schema}.changes (tbl, truncated) VALUES ({i}, true);"));
    }
    let (func, tfunc) = function_names(schema, table);
    // The bodies hold names from blue (key columns, the entry's id): the dollar quote's tag is
    // one that none of them contains, so no name can end the body early.
    let tag = (0..)
        .map(|n| if n == 0 { "$bg$".to_string() } else { format!("$bg{n}$") })
        .find(|t| !rows.contains(t.as_str()) && !truncated.contains(t.as_str()))
        .unwrap_or_default();
    format!(
        "CREATE OR REPLACE FUNCTION {func}() RETURNS trigger LANGUAGE plpgsql
           SECURITY DEFINER SET search_path = pg_catalog, pg_temp
           SET extra_float_digits = 3 SET IntervalStyle = 'postgres' SET TimeZone = 'UTC' AS {tag}
         BEGIN{rows}
           RETURN NULL;
         END {tag};
         CREATE OR REPLACE FUNCTION {tfunc}() RETURNS trigger LANGUAGE plpgsql
           SECURITY DEFINER SET search_path = pg_catalog, pg_temp
           SET extra_float_digits = 3 SET IntervalStyle = 'postgres' SET TimeZone = 'UTC' AS {tag}
         BEGIN{truncated}
           RETURN NULL;
         END {tag};"
    )
}

/// The two capture functions of a source table, named by it.
fn function_names(schema: &str, source: &QualifiedName) -> (String, String) {
    let short = short_name(&source.to_string());
    (
        format!("{schema}.{}", ident(&format!("capture_src_{short}"))),
        format!("{schema}.{}", ident(&format!("truncated_src_{short}"))),
    )
}

/// The triggers on `source` that call its functions (they take a lock that waits for the
/// table's writers). Dropped and made in one transaction: no write goes unrecorded between.
fn triggers_sql(schema: &str, source: &QualifiedName) -> String {
    let (func, tfunc) = function_names(schema, source);
    let name = ident(&format!("{}_capture", schema_name_of(schema)));
    let tname = ident(&format!("{}_truncate", schema_name_of(schema)));
    let src = source.quoted();
    format!(
        "DROP TRIGGER IF EXISTS {name} ON {src};
         DROP TRIGGER IF EXISTS {tname} ON {src};
         CREATE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE ON {src} FOR EACH ROW EXECUTE FUNCTION {func}();
         CREATE TRIGGER {tname} AFTER TRUNCATE ON {src} FOR EACH STATEMENT EXECUTE FUNCTION {tfunc}();
         COMMENT ON TRIGGER {name} ON {src} IS {comment};",
        comment = literal("bluegreen capture: remove with `migrate cleanup`"),
    )
}

/// The unquoted schema name back from its quoted form.
fn schema_name_of(quoted: &str) -> String {
    quoted.trim_matches('"').replace("\"\"", "\"")
}

/// Drops the triggers, functions, change table and schema (cleanup).
pub async fn drop_objects(blue: &Client, plan: &Plan) -> Result<()> {
    let raw = schema_name(&plan.name);
    let schema = ident(&raw);
    let tables: Vec<&QualifiedName> =
        plan.tables.iter().flat_map(|t| std::iter::once(&t.source).chain(t.joins.iter().map(|j| &j.table))).collect();
    for src in tables {
        let exists: bool = blue
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&src.quoted()])
            .await
            .map_err(Error::db("blue: looking for a source table"))?
            .get(0);
        if exists {
            // As installing them: a short lock wait, retried, so the application's writes never
            // queue long behind cleanup.
            let sql = format!(
                "DROP TRIGGER IF EXISTS {} ON {q}; DROP TRIGGER IF EXISTS {} ON {q}",
                ident(&format!("{raw}_capture")),
                ident(&format!("{raw}_truncate")),
                q = src.quoted()
            );
            ddl_with_lock_timeout(blue, &sql, &format!("removing capture triggers from {src}"), plan.ddl_lock).await?;
        }
    }
    blue.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .map_err(Error::db("blue: dropping our schema"))?;
    Ok(())
}
