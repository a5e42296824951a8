//! Every check that must hold before PAUSE (also `cutover --dry-run`): the migration's state on
//! green, capture on blue, lag, the last verify, PgBouncer, the databases file, and that
//! `green_dsn` reaches the plan's green database.

use tokio_postgres::Client;

use crate::{
    capture::Capture,
    error::{pg_message, Result},
    pg::{ConnInfo, Side},
    pgbouncer::{databases_file, plain_name, Bouncer},
    plan::{Check, PgbouncerSettings, Plan, ResolvedPlan, SwitchMode},
    state::{Phase, State},
};

/// How long the lag check waits for a running follower to close a gap over the bound.
const LAG_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Every check that must hold before PAUSE, in the order they are shown.
/// `dry_run`: change nothing (a real cutover analyzes targets that have no statistics yet).
pub(super) async fn preflight(
    plan: &Plan,
    pb: &PgbouncerSettings,
    resolved: &ResolvedPlan,
    blue: &Client,
    green: &Client,
    state: &State,
    dry_run: bool,
) -> Result<Vec<Check>> {
    let mut checks = migration_checks(plan, resolved, blue, green, state).await?;
    // Not while the copy still runs (an ANALYZE would queue behind its index builds), nor
    // when the cutover will not start anyway.
    let analyze_now = !dry_run && checks.iter().all(|c| c.ok);
    checks.push(statistics_check(plan, resolved, green, analyze_now).await?);
    checks.extend(pgbouncer_checks(plan, pb, blue, green).await);
    let sequences: usize = resolved.tables.iter().map(|t| t.sequences.len()).sum();
    checks.push(Check { name: "sequences to carry".into(), ok: true, detail: sequences.to_string() });
    if plan.cutover.way_back {
        let problems = crate::way_back::problems(resolved, blue).await?;
        checks.push(Check {
            name: "way back".into(),
            ok: problems.is_empty(),
            detail: if problems.is_empty() {
                format!(
                    "{} table(s) carried back to blue after the switch while `migrate copy` runs; `migrate rollback` switches back",
                    resolved.tables.len()
                )
            } else {
                format!("[cutover] way_back = true, but: {}", problems.join("; "))
            },
        });
        if problems.is_empty() {
            // A way back that would change rows is found now, before the switch.
            checks.push(crate::way_back::round_trip_check(resolved, blue).await?);
        }
    }
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
    let bound = plan.cutover.max_lag_bytes;
    let lag_of = |v: &crate::state::FollowerView| {
        let oldest = [v.capture_lsn, v.oldest_pending].into_iter().flatten().min();
        oldest.map(|o| blue_lsn.bytes_after(o))
    };
    let (mut lag, mut pending) = (lag_of(&view), view.pending);
    let started = std::time::Instant::now();
    // Lag is a moment's number: a burst of WAL (another database's bulk load, an unplanned
    // table) puts blue ahead of what the follower stored a moment ago. A running follower
    // that comes within the bound of where blue was at this check in a few seconds is not
    // behind (the cutover's own catch-up bounds the rest).
    while follower && lag.is_some_and(|l| l > bound) && started.elapsed() < LAG_GRACE {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let v = state.follower_view(green).await?;
        (lag, pending) = (lag_of(&v), v.pending);
    }
    let waited = started.elapsed().as_secs_f64();
    check(
        "capture lag",
        lag.is_some_and(|l| l <= bound),
        match lag {
            Some(l) => format!(
                "{} behind blue, {pending} keys pending (bound: {}){}",
                crate::plan::render_size(l),
                crate::plan::render_size(bound),
                match (l > bound, follower) {
                    (true, false) => "; no follower is running, so it only grows: start `migrate copy`".into(),
                    (true, true) => format!(
                        "; the follower did not come within the bound of blue's position at this check in {waited:.0}s"
                    ),
                    (false, _) if waited >= 0.2 =>
                        format!("; within the bound of blue's position at this check after {waited:.1}s"),
                    (false, _) => String::new(),
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
    let mut fks = super::foreign_keys::ForeignKeys::load(resolved, green).await?;
    let (mut ok, mut detail) = fks.check_all(resolved, green).await?;
    if !ok && follower {
        // Apply writes a child a moment before its parent (one transaction per table): look
        // again once it has passed what blue has committed now.
        let lsn = crate::pg::commit_point(blue).await?;
        crate::retry::wait_until(std::time::Duration::from_secs(10), || state.applied_through(green, lsn)).await?;
        (ok, detail) = fks.check_all(resolved, green).await?;
    }
    check("foreign keys between planned tables", ok, detail);
    Ok(checks)
}

/// How long the cutover's `ANALYZE` of a target waits for a lock (another ANALYZE, a manual
/// VACUUM) before the check fails instead.
const ANALYZE_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Every target holding rows has planner statistics. A target filled while following after
/// an empty copy (a new table the application starts writing) has none, and autovacuum
/// takes up to a minute and more to notice: with `[copy] analyze` (the default) the cutover
/// analyzes such targets itself, before anything is paused, when `analyze_now` (otherwise it
/// only says it would); without, they are refused, named with the statement to run.
async fn statistics_check(plan: &Plan, resolved: &ResolvedPlan, green: &Client, analyze_now: bool) -> Result<Check> {
    let name = "planner statistics on green";
    let (targets, blind) = without_statistics(resolved, green).await?;
    let list = |ts: &[&crate::pg::QualifiedName]| ts.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ");
    let check = |ok: bool, detail: String| Check { name: name.into(), ok, detail };
    if blind.is_empty() {
        return Ok(check(true, format!("{targets} target(s), each one holding rows has them")));
    }
    if !plan.copy.analyze {
        return Ok(check(
            false,
            format!(
                "none for {} (`[copy] analyze = false`); the application's queries there would be planned without statistics: run `ANALYZE {}` on green",
                list(&blind),
                blind.iter().map(|t| t.quoted()).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    if !analyze_now {
        return Ok(check(true, format!("none yet for {}: the cutover analyzes them before its pause", list(&blind))));
    }
    let started = std::time::Instant::now();
    for t in &blind {
        if let Err(e) = crate::pg::analyze(green, t, Some(ANALYZE_LOCK_TIMEOUT)).await {
            return Ok(check(false, format!("none for {t}, and analyzing it failed: {e}")));
        }
    }
    let (_, still) = without_statistics(resolved, green).await?;
    if !still.is_empty() {
        return Ok(check(false, format!("none for {} even after ANALYZE", list(&still))));
    }
    Ok(check(true, format!("analyzed now ({:.1}s): {}", started.elapsed().as_secs_f64(), list(&blind))))
}

/// The planned targets that hold rows but have no planner statistics on green (never
/// analyzed: `[copy] analyze = false`, copied by a build that did not analyze, or empty when
/// analyzed and filled since), and how many targets there are. Statistics are `pg_stats` rows
/// (a partitioned parent's are its inherited ones); a table whose every column is set to
/// gather none (`SET STATISTICS 0`) needs none. A known last (auto)analyze time does not
/// count: an analyze of an empty table sets it and stores nothing.
async fn without_statistics<'a>(
    resolved: &'a ResolvedPlan,
    green: &Client,
) -> Result<(usize, Vec<&'a crate::pg::QualifiedName>)> {
    let mut targets: Vec<&crate::pg::QualifiedName> = resolved.tables.iter().map(|t| &t.target).collect();
    targets.sort_by_key(|t| t.to_string());
    targets.dedup();
    let mut blind = Vec::new();
    for t in &targets {
        let row = green
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stats WHERE schemaname = $1 AND tablename = $2)
                     OR NOT EXISTS (SELECT 1 FROM pg_attribute a
                                     WHERE a.attrelid = format('%I.%I', $1::text, $2::text)::regclass
                                       AND a.attnum > 0 AND NOT a.attisdropped AND a.attstattarget <> 0)",
                &[&t.schema, &t.name],
            )
            .await
            .map_err(crate::error::Error::db(format!("green: statistics of {t}")))?;
        if row.get::<_, bool>(0) {
            continue;
        }
        let rows = green
            .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {})", t.quoted()), &[])
            .await
            .map_err(crate::error::Error::db(format!("green: rows of {t}")))?;
        if rows.get::<_, bool>(0) {
            blind.push(*t);
        }
    }
    Ok((targets.len(), blind))
}

/// The PgBouncer side: mode and hooks, names, admin console, pool modes, the entries'
/// servers, and the databases file (repoint) or the v2 entry (handover).
async fn pgbouncer_checks(plan: &Plan, pb: &PgbouncerSettings, blue: &Client, green: &Client) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String| checks.push(Check { name: name.into(), ok, detail });

    check("cutover mode", true, pb.describe());
    if !plan.cutover.hooks.is_empty() {
        let hooks: Vec<String> = plan.cutover.hooks.iter().map(|h| h.describe()).collect();
        check("hooks", true, hooks.join("; "));
    }
    let mut names = vec![pb.database.as_str()];
    if let SwitchMode::Handover { v2_database, .. } = &pb.mode {
        names.push(v2_database);
    }
    for name in &names {
        check(
            "pgbouncer database name",
            plain_name(name),
            if plain_name(name) {
                name.to_string()
            } else {
                format!("`{name}`: the admin console takes only letters, digits and _")
            },
        );
    }
    let admin = match pb.admin.connect_raw().await {
        Ok(admin) => {
            check("pgbouncer admin console", true, pb.admin.to_string());
            admin
        }
        Err(e) => {
            check("pgbouncer admin console", false, e.to_string());
            return checks;
        }
    };
    for name in &names {
        match crate::plan::prereq::pool_mode(&admin, name).await {
            Ok(Some(mode)) => check(
                &format!("pgbouncer pool_mode of {name}"),
                mode != "session",
                if mode == "session" {
                    "session: PAUSE would wait for every client to disconnect; use transaction".into()
                } else {
                    mode
                },
            ),
            Ok(None) => {
                check(&format!("pgbouncer pool_mode of {name}"), false, format!("no database `{name}` in PgBouncer"))
            }
            Err(e) => check(&format!("pgbouncer pool_mode of {name}"), false, pg_message(&e)),
        }
    }
    let (ok, detail) = entry_reaches(&pb.admin, &pb.database, &plan.blue, blue).await;
    check(&format!("pgbouncer {} reaches blue", pb.database), ok, detail);
    match &pb.mode {
        SwitchMode::Repoint { databases_file, green_dsn } => {
            let file = databases_file_ok(databases_file, &pb.database);
            check(
                "pgbouncer databases_file",
                file.is_ok(),
                match file {
                    Ok(()) => format!("{} holds `{}` and is writable", databases_file.display(), pb.database),
                    Err(e) => e,
                },
            );
            let (ok, detail) = match ConnInfo::parse(Side::Green, green_dsn) {
                Ok(i) => same_server(&i.with_credentials_of(&plan.green), green, "green_dsn", "green").await,
                Err(e) => (false, format!("green_dsn: {e}")),
            };
            check("green through green_dsn", ok, detail);
        }
        SwitchMode::Handover { v2_database, .. } => {
            let (ok, detail) = entry_reaches(&pb.admin, v2_database, &plan.green, green).await;
            check(&format!("pgbouncer {v2_database} reaches green"), ok, detail);
            let (ok, detail) = v2_held(&pb.admin, v2_database).await;
            check(&format!("pgbouncer {v2_database} receives no traffic yet"), ok, detail);
        }
    }
    checks
}

/// The databases file holds the entry and its directory takes the atomic rename.
fn databases_file_ok(path: &std::path::Path, database: &str) -> std::result::Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if databases_file::find_entry(&text, database).is_none() {
        return Err(format!("{} has no line for `{database}`", path.display()));
    }
    let probe = path.with_extension("migrate-probe");
    std::fs::write(&probe, b"").map_err(|e| format!("cannot write beside {}: {e}", path.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Whether PgBouncer's entry `name` connects to the same server and database as `side`
/// (reached directly through `direct`): its host, port and database from SHOW DATABASES, with
/// the plan's credentials for that side.
async fn entry_reaches(admin: &ConnInfo, name: &str, side: &ConnInfo, direct: &Client) -> (bool, String) {
    let entry = match Bouncer::connect(admin, name).await {
        Ok(b) => b.entry().await,
        Err(e) => Err(e),
    };
    let e = match entry {
        Ok(Some(e)) => e,
        Ok(None) => return (false, format!("no database `{name}` in PgBouncer")),
        Err(e) => return (false, e.to_string()),
    };
    let mut dsn = format!("dbname='{}'", e.database.replace('\\', "\\\\").replace('\'', "\\'"));
    if !e.host.is_empty() {
        dsn.push_str(&format!(" host='{}'", e.host));
    }
    if !e.port.is_empty() {
        dsn.push_str(&format!(" port={}", e.port));
    }
    match ConnInfo::parse(side.side, &dsn) {
        Ok(i) => {
            same_server(&i.with_credentials_of(side), direct, &format!("entry `{name}`"), &side.side.to_string()).await
        }
        Err(err) => (false, format!("entry `{name}` ({dsn}): {err}")),
    }
}

/// Handover: the v2 entry must not have served green before the switch: paused or disabled
/// (the cutover pauses it first), or without clients.
async fn v2_held(admin: &ConnInfo, name: &str) -> (bool, String) {
    let b = match Bouncer::connect(admin, name).await {
        Ok(b) => b,
        Err(e) => return (false, e.to_string()),
    };
    match (b.entry().await, b.clients().await) {
        (Ok(Some(e)), _) if e.paused => (true, "paused".into()),
        (Ok(Some(e)), Ok(0)) if e.disabled => (true, "disabled, no clients; the cutover pauses it first".into()),
        (Ok(Some(_)), Ok(0)) => (true, "no clients; the cutover pauses it first".into()),
        (Ok(Some(_)), Ok(n)) => (
            false,
            format!(
                "{n} client(s) are using it and it is not paused: the v2 application may have written to green; \
                 `PAUSE {name}` (or stop the v2 application), then `migrate verify` and cutover again"
            ),
        ),
        (Ok(None), _) => (false, format!("no database `{name}` in PgBouncer")),
        (Err(e), _) | (_, Err(e)) => (false, e.to_string()),
    }
}

/// Connects through `info` and checks that it reaches the same server and database as `direct`.
async fn same_server(info: &ConnInfo, direct: &Client, what: &str, side: &str) -> (bool, String) {
    const WHO: &str = "SELECT system_identifier::text || '/' || current_database() FROM pg_control_system()";
    let direct = match direct.query_one(WHO, &[]).await {
        Ok(r) => r.get::<_, String>(0),
        Err(e) => return (false, pg_message(&e)),
    };
    let client = match info.connect_raw().await {
        Ok(c) => c,
        Err(e) => return (false, format!("{what} {info}: {e}")),
    };
    match client.query_one(WHO, &[]).await {
        Ok(r) if r.get::<_, String>(0) == direct => (true, format!("{what} {info} is the plan's {side} database")),
        Ok(_) => (false, format!("{what} {info} is not the plan's {side} database (other server or database)")),
        Err(e) => (false, pg_message(&e)),
    }
}
