//! `migrate demo`: the whole migration on this machine, with nothing but the PostgreSQL server
//! binaries and PgBouncer installed. Starts blue, green and a PgBouncer in temporary
//! directories, loads the OAuth fixture, runs a steady application writer through PgBouncer,
//! runs plan → copy → verify → cutover, prints what the application saw, and removes
//! everything.

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    error::{Error, Result},
    sandbox::{app::App, LocalBouncer, LocalCluster},
    shutdown::Shutdown,
    state::State,
    Command, Format, Outcome,
};

const BLUE_SQL: &str = include_str!("../../fixtures/oauth/blue.sql");
const GREEN_SQL: &str = include_str!("../../fixtures/oauth/green.sql");
const GENERATE_SQL: &str = include_str!("../../fixtures/oauth/generate.sql");
const PLAN: &str = include_str!("../../plans/oauth-v1-to-v2.toml");

/// What the demo (or the benchmark) measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Writes the application got acknowledged.
    pub acknowledged: usize,
    /// Of those, acknowledged after the cutover finished (they went to green).
    pub after_switch: usize,
    /// Statements that failed.
    pub failed: usize,
    /// Acknowledged writes missing on green.
    pub lost: usize,
    /// Longest single statement during the cutover, as the application saw it.
    pub cutover_stall: Duration,
    /// Longest single statement during a bare PAUSE / RELOAD / RESUME done by hand on the same
    /// setup afterwards: the floor no cutover can beat.
    pub floor_stall: Duration,
}

/// Blue, green and a PgBouncer in temporary directories (the demo's, and the benchmarks');
/// dropping it stops them all, however the run ends.
pub struct Sandbox {
    /// Blue, with the OAuth fixture in database `app`.
    pub blue: LocalCluster,
    /// Green, with the v2 schema in database `app`.
    pub green: LocalCluster,
    /// PgBouncer serving `app` → blue.
    pub bouncer: Option<LocalBouncer>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(b) = &self.bouncer {
            b.stop();
        }
        self.blue.stop();
        self.green.stop();
    }
}

fn step(title: &str) {
    println!("\n== {title} ==");
}

/// Starts blue, green and PgBouncer, loads the fixture and writes the plan; returns the
/// sandbox, its working directory and the plan's path.
pub async fn start_sandbox(rows: u32) -> Result<(Sandbox, PathBuf, PathBuf)> {
    start_sandbox_with(rows, false).await
}

/// The entries of the demo plan whose way back is exact (revocations and app_events): the
/// others' v1 values do not all survive v2's form (doubled spaces in lists, JSON spacing,
/// NULL booleans), and a rollback refuses a way back that would change rows.
fn way_back_plan(plan: &str) -> String {
    let mut blocks = plan.split("\n[[table]]\n");
    let header = blocks.next().unwrap_or_default().to_string();
    let kept: Vec<&str> = blocks
        .filter(|b| b.contains("\"public.hydra_oauth2_revocation\"") || b.contains("\"public.app_events\""))
        .collect();
    format!("{header}\n[[table]]\n{}\n[cutover]\nway_back = true\nfence_blue = true\n", kept.join("\n[[table]]\n"))
}

/// [`start_sandbox`]; with `way_back`, the plan is the demo's way-back plan.
async fn start_sandbox_with(rows: u32, way_back: bool) -> Result<(Sandbox, PathBuf, PathBuf)> {
    step("starting blue and green PostgreSQL clusters and a PgBouncer in temporary directories");
    let mut sandbox = Sandbox {
        blue: LocalCluster::start("demo-blue", &[])?,
        green: LocalCluster::start("demo-green", &[])?,
        bouncer: None,
    };
    let dir = crate::sandbox::server_dir("demo")?;
    let file = |name: &str, text: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|source| Error::File { what: "writing", path: p.clone(), source })?;
        Ok(p)
    };
    let (blue_sql, green_sql, generate) =
        (file("blue.sql", BLUE_SQL)?, file("green.sql", GREEN_SQL)?, file("generate.sql", GENERATE_SQL)?);
    sandbox.blue.psql("postgres", "CREATE DATABASE app")?;
    sandbox.green.psql("postgres", "CREATE DATABASE app")?;
    step(&format!("loading the OAuth fixture: blue v1 schema with {rows} access tokens, green v2 schema empty"));
    sandbox.blue.psql_file("app", &blue_sql, &[])?;
    sandbox.blue.psql_file("app", &generate, &[("rows", &rows.to_string())])?;
    sandbox.blue.psql("app", "ANALYZE")?;
    sandbox.green.psql_file("app", &green_sql, &[])?;
    let bouncer = LocalBouncer::start(
        "transaction",
        &format!("host=127.0.0.1 port={} dbname=app user=postgres", sandbox.blue.port),
    )?;
    let base = if way_back { way_back_plan(PLAN) } else { PLAN.to_string() };
    let plan_text = format!(
        "{}\n[cutover.pgbouncer]\nadmin_url = \"{}\"\ndatabase = \"app\"\ndatabases_file = \"{}\"\n\
         green_dsn = \"host=127.0.0.1 port={} dbname=app user=postgres\"\npause_timeout = \"2s\"\n",
        base.replace("name = \"oauth-v2\"", "name = \"demo\"")
            .replace("${BLUE_URL}", &sandbox.blue.url("app"))
            .replace("${GREEN_URL}", &sandbox.green.url("app")),
        bouncer.admin_url(),
        bouncer.databases_file.display(),
        sandbox.green.port,
    );
    sandbox.bouncer = Some(bouncer);
    let plan_path = file("plan.toml", &plan_text)?;
    Ok((sandbox, dir, plan_path))
}

/// Runs the demo with `rows` access tokens on blue and an application writing `rate` times per
/// second. `Ok` carries the measurements; the outcome is `Problems` when a write failed or was
/// lost, or the cutover did not switch.
pub async fn run(rows: u32, rate: u32, shutdown: Shutdown) -> Result<(Outcome, DemoReport)> {
    run_with(rows, rate, false, shutdown).await
}

/// [`run`]; with `rollback`, the way back too: after the cutover the application writes
/// revocations on green, `rollback` switches back, and a second cutover switches again.
pub async fn run_with(rows: u32, rate: u32, rollback: bool, shutdown: Shutdown) -> Result<(Outcome, DemoReport)> {
    crate::sandbox::check_prerequisites()?;
    let (sandbox, dir, plan_path) = start_sandbox_with(rows, rollback).await?;
    let bouncer = sandbox.bouncer.as_ref().ok_or(Error::Internal("the demo sandbox has no PgBouncer"))?;
    let admin = bouncer.admin_url();
    let databases_file = bouncer.databases_file.clone();
    let app_url = format!("host=127.0.0.1 port={} dbname=app user=postgres", bouncer.port);

    step(&format!("application: {rate} writes/s through PgBouncer (database `app` → blue)"));
    let app = App::start(app_url, rate, "demo");
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("{} writes acknowledged so far", app.acked());

    step("migrate plan");
    let outcome =
        crate::run(&plan_path, Command::Plan { format: Format::Text, offline: false, rows: 0 }, shutdown.clone())
            .await?;
    if outcome != Outcome::Ok {
        return Err(Error::Demo("the demo plan has problems".into()));
    }

    step("migrate copy (keeps following in the background)");
    let copy_stop = Shutdown::manual();
    let copying = {
        let (p, stop) = (plan_path.clone(), copy_stop.clone());
        tokio::spawn(async move {
            crate::run(&p, Command::Copy { no_follow: false, recopy: Vec::new(), metrics: None }, stop).await
        })
    };
    let relay = {
        let (shutdown, copy_stop) = (shutdown.clone(), copy_stop.clone());
        tokio::spawn(async move {
            shutdown.wait().await;
            copy_stop.trigger();
        })
    };
    let plan = crate::plan::Plan::load(&plan_path)?;
    wait_following(&plan, &shutdown).await?;
    println!("copied; green follows blue");

    step("migrate verify");
    let verified = crate::run(
        &plan_path,
        Command::Verify { format: Format::Text, table: None, reverse: false, changed: false },
        shutdown.clone(),
    )
    .await?;
    if verified != Outcome::Ok {
        return Err(Error::Demo("verify found differences".into()));
    }

    step("migrate cutover");
    // The application stops using blue's table names; green's differ.
    app.set_mapped(false);
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.reset_stall();
    let switched = crate::run(&plan_path, Command::Cutover { dry_run: false }, shutdown.clone()).await?;
    let switched_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cutover_stall, _) = app.snapshot();
    let way_back = match (rollback, switched) {
        (true, Outcome::Ok) => Some(way_back(&plan, &plan_path, &app, &shutdown).await?),
        _ => None,
    };
    match tokio::time::timeout(Duration::from_secs(15), copying).await {
        Ok(Ok(Ok(_))) => println!("the following `copy` saw the switch and exited by itself"),
        Ok(Ok(Err(e))) => println!("the following `copy` failed: {e}"),
        Ok(Err(e)) => println!("the following `copy` panicked: {e}"),
        Err(_) => {
            copy_stop.trigger();
            println!("the following `copy` did not exit within 15 s of the switch");
        }
    }
    relay.abort();

    // The floor: the same switch by hand, with nothing to drain or check.
    app.reset_stall();
    hand_switch(
        &admin,
        &databases_file,
        &format!("host=127.0.0.1 port={} dbname=app user=postgres", sandbox.green.port),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (floor_stall, _) = app.snapshot();
    let report = app.stop();

    let (result, phase) = measure(&plan, &report, switched_at, cutover_stall, floor_stall).await?;
    let lost_on_blue = match &way_back {
        Some(w) => Some(lost_on_blue(&plan, &report, w.switched_again_at).await?),
        None => None,
    };

    step("result");
    println!("cutover: {} (phase {phase})", if switched == Outcome::Ok { "switched" } else { "NOT switched" });
    println!("writes acknowledged: {} ({} after the switch, on green)", result.acknowledged, result.after_switch);
    println!("failed writes:       {}", result.failed);
    for f in report.failures.iter().take(5) {
        println!("  {f}");
    }
    println!("lost writes:         {} (acknowledged but missing on green)", result.lost);
    println!("longest client-observed stall during the cutover: {:.1} ms", ms(result.cutover_stall));
    if let (Some(w), Some(lost)) = (&way_back, lost_on_blue) {
        println!(
            "way back: {} writes on green (revocations inserted, changed, re-keyed, withdrawn) carried to blue",
            w.v2_writes
        );
        println!("longest client-observed stall during the rollback: {:.1} ms", ms(w.rollback_stall));
        println!("longest client-observed stall during the second cutover: {:.1} ms", ms(w.second_stall));
        println!(
            "lost on the way back: {lost} (acknowledged before the second switch but missing on blue); \
             revocations on blue {} green's in v1 form",
            if w.revocations_equal { "equal" } else { "DIFFER FROM" }
        );
    }
    println!(
        "the same switch by hand (PAUSE, RELOAD, RESUME, nothing else), same setup: {:.1} ms",
        ms(result.floor_stall)
    );
    step("removing the clusters, PgBouncer and temporary files");
    let _ = std::fs::remove_dir_all(&dir);
    drop(sandbox);
    let back_ok = match (&way_back, lost_on_blue) {
        (Some(w), Some(lost)) => lost == 0 && w.revocations_equal && w.ok,
        (None, _) => !rollback,
        _ => false,
    };
    let ok = switched == Outcome::Ok && result.failed == 0 && result.lost == 0 && back_ok;
    Ok((if ok { Outcome::Ok } else { Outcome::Problems }, result))
}

/// What the demo's way back measured.
struct WayBack {
    v2_writes: u64,
    rollback_stall: Duration,
    second_stall: Duration,
    revocations_equal: bool,
    switched_again_at: Instant,
    /// The rollback, the second cutover and `finish` all succeeded.
    ok: bool,
}

/// Writes on green, `rollback`, following blue again, a second `cutover`, `finish`.
async fn way_back(
    plan: &crate::plan::Plan,
    plan_path: &std::path::Path,
    app: &App,
    shutdown: &Shutdown,
) -> Result<WayBack> {
    step("the application writes revocations on green for 3 s; `copy` carries them to blue");
    app.set_v2(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    app.set_v2(false);
    let v2_writes = app.v2_writes();
    crate::run(plan_path, Command::Status { format: Format::Text, watch: None }, shutdown.clone()).await?;
    step("migrate rollback");
    app.reset_stall();
    let rolled = crate::run(plan_path, Command::Rollback { dry_run: false }, shutdown.clone()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rollback_stall, _) = app.snapshot();
    let revocations_equal = revocations_equal(plan).await?;
    step("following blue again; migrate verify, then migrate cutover once more");
    wait_following(plan, shutdown).await?;
    let verified = crate::run(
        plan_path,
        Command::Verify { format: Format::Text, table: None, reverse: false, changed: false },
        shutdown.clone(),
    )
    .await?;
    app.reset_stall();
    let again = crate::run(plan_path, Command::Cutover { dry_run: false }, shutdown.clone()).await?;
    let switched_again_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (second_stall, _) = app.snapshot();
    step("migrate finish (ends the way back; the following `copy` exits)");
    let finished = crate::run(plan_path, Command::Finish, shutdown.clone()).await?;
    let ok = [rolled, verified, again, finished].iter().all(|o| *o == Outcome::Ok);
    Ok(WayBack { v2_writes, rollback_stall, second_stall, revocations_equal, switched_again_at, ok })
}

/// Blue's revocations against green's brought to v1's form by a hand-written query.
async fn revocations_equal(plan: &crate::plan::Plan) -> Result<bool> {
    let (blue, green) = tokio::try_join!(plan.blue.connect(), plan.green.connect())?;
    let b: Vec<String> = blue
        .query(
            "SELECT request_id || '|' || revoked_at::text || '|' || coalesce(reason, '') FROM hydra_oauth2_revocation ORDER BY 1",
            &[],
        )
        .await
        .map_err(Error::db("blue: reading revocations"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let g: Vec<String> = green
        .query(
            "SELECT request_id || '|' || (revoked_at AT TIME ZONE 'UTC')::text || '|' || coalesce(reason, '') \
             FROM oauth2_revocations ORDER BY 1",
            &[],
        )
        .await
        .map_err(Error::db("green: reading revocations"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(b == g)
}

/// Acknowledged inserts before the second switch that blue lacks.
async fn lost_on_blue(
    plan: &crate::plan::Plan,
    report: &crate::sandbox::app::AppReport,
    before: Instant,
) -> Result<usize> {
    let blue = plan.blue.connect().await?;
    let on_blue: HashMap<String, i64> = blue
        .query("SELECT payload, id FROM app_events WHERE kind = 'app'", &[])
        .await
        .map_err(Error::db("blue: reading app_events"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(report.acks.iter().filter(|a| a.at < before && on_blue.get(&a.payload) != Some(&a.id)).count())
}

/// What the application saw and lost, measured on green; and the phase green ended in.
async fn measure(
    plan: &crate::plan::Plan,
    report: &crate::sandbox::app::AppReport,
    switched_at: Instant,
    cutover_stall: Duration,
    floor_stall: Duration,
) -> Result<(DemoReport, &'static str)> {
    let green = plan.green.connect().await?;
    let on_green: HashMap<String, i64> = green
        .query("SELECT payload, id FROM app_events WHERE kind = 'app'", &[])
        .await
        .map_err(Error::db("green: reading app_events"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let lost = report.acks.iter().filter(|a| on_green.get(&a.payload) != Some(&a.id)).count();
    let result = DemoReport {
        acknowledged: report.acks.len(),
        after_switch: report.acks.iter().filter(|a| a.at > switched_at).count(),
        failed: report.failures.len(),
        lost,
        cutover_stall,
        floor_stall,
    };
    let phase = State::new(&plan.name).phase(&green).await?.map(|p| p.name()).unwrap_or("none");
    Ok((result, phase))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits until the copy is done and green follows with little lag.
pub async fn wait_following(plan: &crate::plan::Plan, shutdown: &Shutdown) -> Result<()> {
    let green = plan.green.connect().await?;
    let state = State::new(&plan.name);
    let started = Instant::now();
    loop {
        if shutdown.is_triggered() {
            return Err(Error::Interrupted { during: "while waiting for the copy".into() });
        }
        if state.exists(&green).await? {
            let following = matches!(state.phase(&green).await?, Some(crate::state::Phase::Following { .. }));
            let v = state.status_view(&green).await?;
            let lag_small = v.lag_bytes.is_some_and(|l| (0..1 << 20).contains(&l));
            let seen = v.follower_seen_seconds_ago.is_some_and(|s| s < 2.0);
            if following && lag_small && seen {
                return Ok(());
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(Error::Demo("the copy did not finish within 10 minutes".into()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// PAUSE, rewrite the line (to the same target), RELOAD, RESUME: the bare mechanics of a switch.
pub async fn hand_switch(admin_url: &str, databases_file: &std::path::Path, dsn: &str) -> Result<()> {
    let admin = crate::pg::ConnInfo::parse(crate::pg::Side::Pgbouncer, admin_url)?.connect_raw().await?;
    let run = |sql: &'static str| {
        let admin = &admin;
        async move {
            admin.simple_query(sql).await.map_err(|e| Error::Pgbouncer {
                command: sql.to_string(),
                message: crate::error::pg_message(&e),
                by_hand: false,
            })
        }
    };
    run("PAUSE app").await?;
    crate::pgbouncer::databases_file::rewrite(databases_file, "app", dsn).map_err(|source| Error::File {
        what: "rewriting",
        path: databases_file.to_path_buf(),
        source,
    })?;
    run("RELOAD").await?;
    run("RESUME app").await?;
    Ok(())
}
