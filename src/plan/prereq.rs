//! Prerequisites on blue, green and PgBouncer, each reported with the exact fix.

use tokio_postgres::{Client, SimpleQueryMessage};

use super::{file::Plan, CaptureDecision, CaptureMethod, Check, Problem, ResolvedTable};
use crate::{
    error::{pg_message, Error, Result},
    pg::{catalog, ident, Side},
    state,
};

/// Checks capture, replica identity, green emptiness and PgBouncer; decides the capture method.
pub async fn check(
    plan: &Plan,
    tables: &[ResolvedTable],
    blue: &Client,
    green: &Client,
    problems: &mut Vec<Problem>,
) -> Result<(CaptureDecision, Vec<Check>)> {
    let mut checks = Vec::new();
    let capture = capture_decision(plan, blue, &mut checks, problems).await?;
    if capture.method == CaptureMethod::Logical {
        replica_identity(tables, blue, &mut checks, problems).await?;
    }
    link_columns_capturable(tables, capture.method, problems);
    connections(plan, capture.method, &mut checks, problems);
    green_empty(plan, tables, green, &mut checks, problems).await?;
    if let Some(pb) = &plan.cutover.pgbouncer {
        pgbouncer(pb, &mut checks, problems).await;
    }
    Ok((capture, checks))
}

fn plan_problem(field: &str, message: String, fix: Option<String>) -> Problem {
    Problem { field: field.into(), line: None, table: None, column: None, message, fix }
}

async fn capture_decision(
    plan: &Plan,
    blue: &Client,
    checks: &mut Vec<Check>,
    problems: &mut Vec<Problem>,
) -> Result<CaptureDecision> {
    let slot = state::slot_name(&plan.name);
    let row = blue
        .query_one(
            "SELECT current_setting('wal_level'), \
                    (SELECT rolreplication OR rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user), \
                    (SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_catalog.pg_roles WHERE rolname = 'rds_replication'), \
                    current_setting('max_replication_slots')::int \
                      - (SELECT count(*) FROM pg_catalog.pg_replication_slots WHERE slot_name <> $1)::int, \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1), \
                    (SELECT database::text FROM pg_catalog.pg_replication_slots \
                      WHERE slot_name = $1 AND database IS DISTINCT FROM current_database())",
            &[&slot],
        )
        .await
        .map_err(Error::db("blue: reading wal_level and replication settings"))?;
    let wal_level: String = row.get(0);
    let attribute: bool = row.get::<_, Option<bool>>(1).unwrap_or(false);
    // RDS and Aurora grant replication through membership in `rds_replication`, not the role
    // attribute (which their users cannot hold).
    let rds: bool = row.get::<_, Option<bool>>(2).unwrap_or(false);
    let replication = attribute || rds;
    let free_slots: i32 = row.get(3);
    let has_slot: bool = row.get(4);
    if let Some(other) = row.get::<_, Option<String>>(5) {
        problems.push(plan_problem(
            "name",
            format!("replication slot {slot} on blue belongs to database {other}: another migration on this server uses the plan name `{}`", plan.name),
            Some("give this plan another name, or run `migrate cleanup` for the other migration".into()),
        ));
    }
    checks.push(Check { name: "blue wal_level".into(), ok: wal_level == "logical", detail: wal_level.clone() });
    checks.push(Check {
        name: "blue REPLICATION privilege".into(),
        ok: replication,
        detail: match (attribute, rds) {
            (true, _) => "yes".into(),
            (false, true) => "yes (member of rds_replication)".into(),
            _ => "no".into(),
        },
    });
    checks.push(Check {
        name: "blue free replication slot".into(),
        ok: free_slots > 0 || has_slot,
        detail: if has_slot { format!("slot {slot} exists (resuming)") } else { format!("{free_slots} free") },
    });
    let mut why_not = Vec::new();
    if wal_level != "logical" {
        why_not.push(format!(
            "wal_level is {wal_level} (fix: ALTER SYSTEM SET wal_level = logical; then restart blue; \
                on RDS/Aurora set rds.logical_replication = 1 in the parameter group, on Cloud SQL the flag \
                cloudsql.logical_decoding = on, then reboot)"
        ));
    }
    if !replication {
        why_not.push(
            "the role lacks REPLICATION (fix: ALTER ROLE <migrator> REPLICATION; on RDS/Aurora: GRANT rds_replication \
             TO <migrator>; on Cloud SQL: ALTER USER <migrator> WITH REPLICATION)"
                .to_string(),
        );
    }
    if free_slots <= 0 && !has_slot {
        why_not.push(
            "no free replication slot (fix: raise max_replication_slots and restart blue, or drop an unused slot)"
                .to_string(),
        );
    }
    Ok(match plan.capture {
        CaptureMethod::Trigger => {
            CaptureDecision { method: CaptureMethod::Trigger, reason: "the plan asks for trigger capture".into() }
        }
        CaptureMethod::Logical if !why_not.is_empty() => {
            problems.push(plan_problem(
                "capture.method",
                format!("logical capture is not possible: {}", why_not.join("; ")),
                Some("fix blue as described, or set method = \"trigger\" (or \"auto\")".into()),
            ));
            CaptureDecision { method: CaptureMethod::Logical, reason: "requested, but not possible".into() }
        }
        _ if why_not.is_empty() => CaptureDecision {
            method: CaptureMethod::Logical,
            reason: "wal_level is logical and the role may replicate".into(),
        },
        _ => CaptureDecision {
            method: CaptureMethod::Trigger,
            reason: format!("logical capture is not possible: {}", why_not.join("; ")),
        },
    })
}

async fn replica_identity(
    tables: &[ResolvedTable],
    blue: &Client,
    checks: &mut Vec<Check>,
    problems: &mut Vec<Problem>,
) -> Result<()> {
    for t in tables {
        for (source, info) in heaps(blue, &t.source).await? {
            identity_covers_key(t, &source, &info, checks, problems);
        }
        for (n, j) in t.joins.iter().enumerate() {
            for (table, info) in heaps(blue, &j.table).await? {
                identity_covers_links(t, n, &table, &info, checks, problems);
            }
        }
    }
    Ok(())
}

/// `table` and, when it is partitioned, each leaf partition: a partitioned table's changes are
/// decoded in its partitions, each with its own replica identity. Empty when it is missing.
async fn heaps(
    blue: &Client,
    table: &crate::pg::QualifiedName,
) -> Result<Vec<(crate::pg::QualifiedName, catalog::TableInfo)>> {
    let Some(info) = catalog::table_info(blue, Side::Blue, table).await? else { return Ok(Vec::new()) };
    let partitioned = info.partitioned;
    let mut out = vec![(table.clone(), info)];
    if partitioned {
        for leaf in catalog::leaf_partitions(blue, table).await? {
            if let Some(info) = catalog::table_info(blue, Side::Blue, &leaf).await? {
                out.push((leaf, info));
            }
        }
    }
    Ok(out)
}

/// The sessions a `copy` holds on each side under the plan's settings (runbook 1.10), against
/// `[copy] max_connections_blue` and `max_connections_green`.
fn connections(plan: &Plan, method: CaptureMethod, checks: &mut Vec<Check>, problems: &mut Vec<Problem>) {
    let (workers, apply) = (plan.copy.workers as u64, plan.apply_workers.max(1) as u64);
    // One session reads blue's load, another times its commits (control.rs).
    let health = u64::from(plan.copy.limits_blue_load()) + u64::from(plan.copy.times_blue_commits());
    // Logical capture applies directly from capture: a blue and a green session per apply worker.
    // Green's count includes the copy's heartbeat and the joined workers' lease watch.
    let (blue, green) = match method {
        CaptureMethod::Trigger => (workers + 4 + apply + health, workers + 5 + apply),
        _ => (workers + 5 + 2 * apply + health, workers + 5 + 2 * apply),
    };
    let caps = [(blue, plan.copy.max_connections_blue, "blue"), (green, plan.copy.max_connections_green, "green")];
    let over: Vec<String> = caps
        .iter()
        .filter(|(n, cap, _)| *cap > 0 && n > cap)
        .map(|(n, cap, side)| format!("{n} on {side}, more than max_connections_{side} = {cap}"))
        .collect();
    checks.push(Check {
        name: "sessions a copy holds".into(),
        ok: over.is_empty(),
        detail: format!(
            "up to {blue} on blue and {green} on green ({workers} copy worker(s), {apply} apply worker(s)); one more \
             on each side with --metrics"
        ),
    });
    if !over.is_empty() {
        problems.push(plan_problem(
            "copy.max_connections",
            format!("a copy under these settings would hold {}", over.join(" and ")),
            Some("lower [copy] workers or [capture] apply_workers, or raise the cap".into()),
        ));
    }
}

/// Link columns capture can carry: logical decoding never sends a generated column (its
/// writes could not be traced); a trigger records values as JSON text, which an array or a JSON
/// value does not read back as its type.
fn link_columns_capturable(tables: &[ResolvedTable], method: CaptureMethod, problems: &mut Vec<Problem>) {
    for t in tables {
        for (n, j) in t.joins.iter().enumerate() {
            for o in &j.on {
                let why = match method {
                    CaptureMethod::Trigger
                        if o.type_name.ends_with("[]") || matches!(o.type_name.as_str(), "json" | "jsonb") =>
                    {
                        format!(
                            "is {}, whose values trigger capture records as JSON text that does not read back as \
                             {}",
                            o.type_name, o.type_name
                        )
                    }
                    CaptureMethod::Logical if o.generated => {
                        "is a generated column, which logical decoding never sends: its writes could not be traced"
                            .to_string()
                    }
                    _ => continue,
                };
                problems.push(Problem {
                    field: format!("table[{}].join[{}].on.{}", t.index, n + 1, o.column),
                    line: Some(t.line),
                    table: Some(j.table.to_string()),
                    column: Some(o.column.clone()),
                    message: format!("link column {}.{} of join {} {why}", j.table, o.column, j.alias),
                    fix: Some(match method {
                        CaptureMethod::Trigger => "join on a column of a scalar type (or capture logically)".into(),
                        _ => "join on the column it is generated from, or capture by triggers: [capture] method = \
                              \"trigger\""
                            .into(),
                    }),
                });
            }
        }
    }
}

/// A joined table's replica identity against its link columns (join `n` of entry `t`): a
/// delete, or an update that moves the row to other driving rows, is traced by the old row's
/// link values, which logical decoding sends only for the columns of the replica identity.
fn identity_covers_links(
    t: &ResolvedTable,
    n: usize,
    table: &crate::pg::QualifiedName,
    info: &catalog::TableInfo,
    checks: &mut Vec<Check>,
    problems: &mut Vec<Problem>,
) {
    let links = t.joins[n].link_columns();
    let identity = info.identity_columns();
    let covered = match &identity {
        None => true,
        Some(cols) => !cols.is_empty() && links.iter().all(|l| cols.contains(l)),
    };
    // Named by the link columns too: each entry joining the table by other columns needs its own.
    let name = format!("replica identity of {table} (joined as {} on {})", t.joins[n].alias, links.join(", "));
    if checks.iter().any(|c| c.name == name) {
        return;
    }
    checks.push(Check {
        name,
        ok: covered,
        detail: match &identity {
            None => "full".into(),
            Some(c) if c.is_empty() => "none".into(),
            Some(c) => format!("{} (links: {})", c.join(", "), links.join(", ")),
        },
    });
    if covered {
        return;
    }
    let why = match &identity {
        Some(c) if c.is_empty() => "it has no replica identity: publishing it would make the application's UPDATEs \
                                    and DELETEs of it fail"
            .to_string(),
        _ => format!(
            "its replica identity does not hold the link column(s) ({}): when a row of it is deleted, or moved to \
             another row of {}, logical decoding does not say which row it joined before, and that target row \
             would keep it",
            links.join(", "),
            t.source
        ),
    };
    problems.push(Problem {
        field: format!("table[{}].join[{}]", t.index, n + 1),
        line: None,
        table: Some(table.to_string()),
        column: None,
        message: format!("joined table {table}: {why}"),
        fix: Some(format!(
            "SET lock_timeout = '1s'; ALTER TABLE {} REPLICA IDENTITY FULL;  (brief lock, no rewrite; more WAL \
             per update and delete of it), or capture by triggers: [capture] method = \"trigger\"",
            table.quoted()
        )),
    });
}

/// One table's (or partition's) replica identity against entry `t`'s key.
fn identity_covers_key(
    t: &ResolvedTable,
    source: &crate::pg::QualifiedName,
    info: &catalog::TableInfo,
    checks: &mut Vec<Check>,
    problems: &mut Vec<Problem>,
) {
    {
        let covered = match info.identity_columns() {
            None => true,
            Some(cols) => !cols.is_empty() && t.key.iter().all(|k| cols.contains(&k.source)),
        };
        checks.push(Check {
            name: format!("replica identity of {source}"),
            ok: covered,
            detail: match info.identity_columns() {
                None => "full".into(),
                Some(c) if c.is_empty() => "none".into(),
                Some(c) => c.join(", "),
            },
        });
        if !covered {
            let fix = match info
                .unique_keys
                .iter()
                .find(|u| u.columns.iter().all(|c| t.key.iter().any(|k| &k.source == c)))
            {
                Some(u) => {
                    format!("ALTER TABLE {} REPLICA IDENTITY USING INDEX {};", source.quoted(), ident(&u.name))
                }
                None => format!("ALTER TABLE {} REPLICA IDENTITY FULL;", source.quoted()),
            };
            problems.push(Problem {
                field: format!("table[{}].key", t.index),
                line: None,
                table: Some(source.to_string()),
                column: None,
                message: format!("replica identity of blue {source} does not include the key ({}); deletes and key changes could not be captured, and publishing it would make the application's UPDATEs fail", t.source_key_list()),
                fix: Some(fix),
            });
        }
    }
}

async fn green_empty(
    plan: &Plan,
    tables: &[ResolvedTable],
    green: &Client,
    checks: &mut Vec<Check>,
    problems: &mut Vec<Problem>,
) -> Result<()> {
    let schema = state::schema_name(&plan.name);
    let has_state: bool = green
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)", &[&schema])
        .await
        .map_err(Error::db("green: looking for migration state"))?
        .get(0);
    if has_state {
        checks.push(Check {
            name: "green state".into(),
            ok: true,
            detail: format!("schema {schema} exists: this plan has run before and will resume"),
        });
        return Ok(());
    }
    for t in tables {
        let sql = format!("SELECT EXISTS (SELECT 1 FROM {})", t.target.quoted());
        let nonempty: bool =
            green.query_one(&sql, &[]).await.map_err(Error::db(format!("green: reading {}", t.target)))?.get(0);
        checks.push(Check {
            name: format!("green {} is empty", t.target),
            ok: !nonempty,
            detail: if nonempty { "has rows".into() } else { "empty".into() },
        });
        if nonempty {
            problems.push(Problem {
                field: format!("table[{}].target", t.index),
                line: None,
                table: Some(t.target.to_string()),
                column: None,
                message: format!("green {} already holds rows and no state of plan `{}` exists", t.target, plan.name),
                fix: Some(format!("TRUNCATE {} on green if those rows are disposable", t.target.quoted())),
            });
        }
    }
    Ok(())
}

async fn pgbouncer(pb: &super::PgbouncerSettings, checks: &mut Vec<Check>, problems: &mut Vec<Problem>) {
    let field = "cutover.pgbouncer";
    let client = match pb.admin.connect_raw().await {
        Ok(c) => c,
        Err(e) => {
            checks.push(Check { name: "pgbouncer admin console".into(), ok: false, detail: e.to_string() });
            problems.push(plan_problem(&format!("{field}.admin_url"), e.to_string(), None));
            return;
        }
    };
    checks.push(Check { name: "pgbouncer admin console".into(), ok: true, detail: pb.admin.to_string() });
    // The admin console speaks only the simple query protocol.
    entry_pool_mode(&client, &pb.database, &format!("{field}.database"), None, checks, problems).await;
    match &pb.mode {
        super::SwitchMode::Repoint { databases_file, .. } => match std::fs::read_to_string(databases_file) {
            Ok(text) if crate::pgbouncer::databases_file::find_entry(&text, &pb.database).is_some() => {
                checks.push(Check {
                    name: "pgbouncer databases_file".into(),
                    ok: true,
                    detail: databases_file.display().to_string(),
                })
            }
            Ok(_) => problems.push(plan_problem(
                &format!("{field}.databases_file"),
                format!("{} has no line for database `{}`", databases_file.display(), pb.database),
                None,
            )),
            Err(e) => problems.push(plan_problem(
                &format!("{field}.databases_file"),
                format!("cannot read {}: {e}", databases_file.display()),
                None,
            )),
        },
        super::SwitchMode::Handover { v2_database, .. } => {
            let fix = format!("add `{v2_database} = <green>` to PgBouncer's databases, RELOAD, and PAUSE it");
            entry_pool_mode(&client, v2_database, &format!("{field}.v2_database"), Some(fix), checks, problems).await
        }
    }
}

/// Checks that PgBouncer has entry `name` and that its pool mode lets PAUSE finish; `key` is
/// the plan key naming it, `missing_fix` what to do when it is absent.
async fn entry_pool_mode(
    client: &Client,
    name: &str,
    key: &str,
    missing_fix: Option<String>,
    checks: &mut Vec<Check>,
    problems: &mut Vec<Problem>,
) {
    match pool_mode(client, name).await {
        Ok(Some(mode)) => {
            let ok = mode != "session";
            checks.push(Check { name: format!("pgbouncer pool_mode of {name}"), ok, detail: mode });
            if !ok {
                problems.push(plan_problem(
                    key,
                    format!("PgBouncer database `{name}` uses pool_mode=session; PAUSE would wait for every client to disconnect"),
                    Some("set pool_mode = transaction for that database".into()),
                ));
            }
        }
        Ok(None) => problems.push(plan_problem(key, format!("PgBouncer has no database entry `{name}`"), missing_fix)),
        Err(e) => problems.push(plan_problem(
            "cutover.pgbouncer.admin_url",
            format!("SHOW DATABASES failed: {}", pg_message(&e)),
            None,
        )),
    }
}

/// The effective pool mode of one PgBouncer database (its own, else the global one).
pub async fn pool_mode(client: &Client, database: &str) -> std::result::Result<Option<String>, tokio_postgres::Error> {
    let rows = client.simple_query("SHOW DATABASES").await?;
    let mut found = None;
    for msg in &rows {
        if let SimpleQueryMessage::Row(r) = msg {
            if r.get("name") == Some(database) {
                found = Some(r.get("pool_mode").unwrap_or("").to_string());
            }
        }
    }
    let Some(mode) = found else { return Ok(None) };
    if !mode.is_empty() {
        return Ok(Some(mode));
    }
    for msg in client.simple_query("SHOW CONFIG").await? {
        if let SimpleQueryMessage::Row(r) = msg {
            if r.get("key") == Some("pool_mode") {
                return Ok(r.get("value").map(str::to_string));
            }
        }
    }
    Ok(Some("session".into()))
}
