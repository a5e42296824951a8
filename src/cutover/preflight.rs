//! Every check that must hold before PAUSE (also `cutover --dry-run`): the migration's state on
//! green, capture on blue, lag, the last verify, PgBouncer, the databases file, and that
//! `green_dsn` reaches the plan's green database.

use tokio_postgres::Client;

use crate::{
    capture::Capture,
    error::{pg_message, Result},
    pg::{ConnInfo, Side},
    pgbouncer::{databases_file, plain_name},
    plan::{Check, PgbouncerSettings, Plan, ResolvedPlan},
    state::{Phase, State},
};

/// Every check that must hold before PAUSE, in the order they are shown.
pub(super) async fn preflight(
    plan: &Plan,
    pb: &PgbouncerSettings,
    resolved: &ResolvedPlan,
    blue: &Client,
    green: &Client,
    state: &State,
) -> Result<Vec<Check>> {
    let mut checks = migration_checks(plan, resolved, blue, green, state).await?;
    checks.extend(pgbouncer_checks(plan, pb, green).await);
    let sequences: usize = resolved.tables.iter().map(|t| t.sequences.len()).sum();
    checks.push(Check { name: "sequences to carry".into(), ok: true, detail: sequences.to_string() });
    Ok(checks)
}

/// The migration side: copy finished, follower, capture on blue, lag, the last verify.
async fn migration_checks(
    plan: &Plan,
    resolved: &ResolvedPlan,
    blue: &Client,
    green: &Client,
    state: &State,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String| checks.push(Check { name: name.into(), ok, detail });

    let phase = state.phase(green).await?;
    let following = matches!(phase, Some(Phase::Following { .. }) | Some(Phase::Aborted { .. }));
    check(
        "copy finished",
        following,
        match &phase {
            Some(p) if following => format!("phase {}", p.name()),
            Some(p) => format!("phase {}: wait until `migrate copy` reports following", p.name()),
            None => "no state".into(),
        },
    );
    let view = state.follower_view(green).await?;
    let follower = view.follower_active;
    check(
        "follower",
        true,
        if follower { "running".into() } else { "not running: cutover catches up by itself (slower)".into() },
    );
    match Capture::open(plan, resolved, plan.blue.connect().await?).await {
        Ok(c) => check(
            "capture on blue",
            true,
            match c {
                Capture::Logical(_) => "replication slot".into(),
                Capture::Trigger(_) => "change table".into(),
            },
        ),
        Err(e) => check("capture on blue", false, e.to_string()),
    }
    let blue_lsn = crate::pg::current_lsn(blue).await?;
    let oldest = [view.capture_lsn, view.oldest_pending].into_iter().flatten().min();
    let lag = oldest.map(|o| blue_lsn.bytes_after(o));
    check(
        "capture lag",
        lag.is_some_and(|l| l <= plan.cutover.max_lag_bytes),
        match lag {
            Some(l) => format!(
                "{} behind blue, {} keys pending (bound: {}){}",
                crate::plan::render_size(l),
                view.pending,
                crate::plan::render_size(plan.cutover.max_lag_bytes),
                if l > plan.cutover.max_lag_bytes && !follower {
                    "; no follower is running, so it only grows: start `migrate copy`"
                } else {
                    ""
                }
            ),
            None => "unknown: capture has not stored a position yet".into(),
        },
    );
    let (verify_equal, verify_at, bad) = (view.verify_equal, view.verify_at.clone(), view.bad_buckets);
    let unverified: Vec<String> =
        resolved.tables.iter().filter(|t| !view.verified.contains(&t.id)).map(|t| t.target.to_string()).collect();
    check(
        "last verify clean",
        verify_equal && bad == 0 && unverified.is_empty(),
        match (&verify_at, unverified.is_empty()) {
            (None, _) => "never verified: run `migrate verify` first".into(),
            (Some(_), false) => format!("not verified: {}; run `migrate verify`", unverified.join(", ")),
            (Some(at), true) if verify_equal && bad == 0 => format!("equal at {at}"),
            (Some(at), true) => format!("differences at {at}: fix them and run `migrate verify` again"),
        },
    );
    let touched = view.touched;
    check("keys changed since that verify", true, format!("{touched} (re-verified during the cutover)"));
    let (mut ok, mut detail) = foreign_keys_hold(resolved, green).await?;
    if !ok && follower {
        // Apply writes a child a moment before its parent (one transaction per table): look
        // again once it has passed what blue has committed now.
        let lsn = crate::pg::commit_point(blue).await?;
        crate::retry::wait_until(std::time::Duration::from_secs(10), || state.applied_through(green, lsn)).await?;
        (ok, detail) = foreign_keys_hold(resolved, green).await?;
    }
    check("foreign keys between planned tables", ok, detail);
    Ok(checks)
}

/// Rows (at most this many per foreign key) without the row they reference are named.
const ORPHANS_SHOWN: i64 = 3;

/// Proves green's foreign keys between planned tables hold: apply writes with
/// `session_replication_role = replica`, so nothing else checks the rows it wrote. A child row
/// whose key columns are all set must find its parent (MATCH SIMPLE).
async fn foreign_keys_hold(resolved: &ResolvedPlan, green: &Client) -> Result<(bool, String)> {
    let targets: Vec<String> = resolved.tables.iter().map(|t| t.target.quoted()).collect();
    let fks = green
        .query(
            "SELECT c.conname::text, c.conrelid::regclass::text, c.confrelid::regclass::text, \
                    ARRAY(SELECT quote_ident(a.attname) FROM unnest(c.conkey) WITH ORDINALITY k(n, o) \
                          JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o), \
                    ARRAY(SELECT quote_ident(a.attname) FROM unnest(c.confkey) WITH ORDINALITY k(n, o) \
                          JOIN pg_catalog.pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o) \
             FROM pg_catalog.pg_constraint c \
             WHERE c.contype = 'f' AND c.conrelid = ANY($1::text[]::regclass[]) AND c.confrelid = ANY($1::text[]::regclass[]) \
             ORDER BY 1",
            &[&targets],
        )
        .await
        .map_err(crate::error::Error::db("green: reading foreign keys"))?;
    let mut broken = Vec::new();
    for fk in &fks {
        let (name, child, parent): (String, String, String) = (fk.get(0), fk.get(1), fk.get(2));
        let (cols, refs): (Vec<String>, Vec<String>) = (fk.get(3), fk.get(4));
        let set = cols.iter().map(|c| format!("ch.{c} IS NOT NULL")).collect::<Vec<_>>().join(" AND ");
        let matches = cols.iter().zip(&refs).map(|(c, r)| format!("p.{r} = ch.{c}")).collect::<Vec<_>>().join(" AND ");
        let orphans: i64 = green
            .query_one(
                &format!(
                    "SELECT count(*) FROM (SELECT 1 FROM {child} ch WHERE {set} \
                     AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE {matches}) LIMIT {ORPHANS_SHOWN}) o"
                ),
                &[],
            )
            .await
            .map_err(crate::error::Error::db(format!("green: checking foreign key {name}")))?
            .get(0);
        if orphans > 0 {
            let at_least = if orphans >= ORPHANS_SHOWN { "at least " } else { "" };
            broken.push(format!("{name}: {at_least}{orphans} row(s) of {child} without their row in {parent}"));
        }
    }
    Ok(if broken.is_empty() {
        (true, format!("{} hold", fks.len()))
    } else {
        (false, format!("{}; find out why (`migrate verify`), fix green, run cutover again", broken.join("; ")))
    })
}

/// The PgBouncer side: name, admin console, pool mode, databases file, and `green_dsn`.
async fn pgbouncer_checks(plan: &Plan, pb: &PgbouncerSettings, green: &Client) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String| checks.push(Check { name: name.into(), ok, detail });

    check(
        "pgbouncer database name",
        plain_name(&pb.database),
        if plain_name(&pb.database) {
            pb.database.clone()
        } else {
            format!("`{}`: the admin console takes only letters, digits and _", pb.database)
        },
    );
    match pb.admin.connect_raw().await {
        Ok(admin) => {
            check("pgbouncer admin console", true, pb.admin.to_string());
            match crate::plan::prereq::pool_mode(&admin, &pb.database).await {
                Ok(Some(mode)) => check(
                    "pgbouncer pool_mode",
                    mode != "session",
                    if mode == "session" {
                        "session: PAUSE would wait for every client to disconnect; use transaction".into()
                    } else {
                        mode
                    },
                ),
                Ok(None) => check("pgbouncer pool_mode", false, format!("no database `{}` in PgBouncer", pb.database)),
                Err(e) => check("pgbouncer pool_mode", false, pg_message(&e)),
            }
        }
        Err(e) => check("pgbouncer admin console", false, e.to_string()),
    }
    check(
        "pgbouncer databases_file",
        databases_file_ok(pb).is_ok(),
        match databases_file_ok(pb) {
            Ok(()) => format!("{} holds `{}` and is writable", pb.databases_file.display(), pb.database),
            Err(e) => e,
        },
    );
    let (ok, detail) = same_green(plan, pb, green).await;
    check("green through green_dsn", ok, detail);
    checks
}

/// The databases file holds the entry and its directory takes the atomic rename.
fn databases_file_ok(pb: &PgbouncerSettings) -> std::result::Result<(), String> {
    let path = &pb.databases_file;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if databases_file::find_entry(&text, &pb.database).is_none() {
        return Err(format!("{} has no line for `{}`", path.display(), pb.database));
    }
    let probe = path.with_extension("migrate-probe");
    std::fs::write(&probe, b"").map_err(|e| format!("cannot write beside {}: {e}", path.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Connects through `green_dsn` (with the green URL's credentials where it names none) and
/// checks that it reaches the same server and database as the plan's green.
async fn same_green(plan: &Plan, pb: &PgbouncerSettings, green: &Client) -> (bool, String) {
    let info = match ConnInfo::parse(Side::Green, &pb.green_dsn) {
        Ok(i) => i.with_credentials_of(&plan.green),
        Err(e) => return (false, format!("green_dsn: {e}")),
    };
    const WHO: &str = "SELECT system_identifier::text || '/' || current_database() FROM pg_control_system()";
    let direct = match green.query_one(WHO, &[]).await {
        Ok(r) => r.get::<_, String>(0),
        Err(e) => return (false, pg_message(&e)),
    };
    let client = match info.connect_raw().await {
        Ok(c) => c,
        Err(e) => return (false, format!("green_dsn {info}: {e}")),
    };
    match client.query_one(WHO, &[]).await {
        Ok(r) if r.get::<_, String>(0) == direct => (true, format!("{info} is the plan's green database")),
        Ok(_) => (false, format!("{info} is not the plan's green database (other server or database)")),
        Err(e) => (false, pg_message(&e)),
    }
}
