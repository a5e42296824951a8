//! Scale benchmark: starts its own blue, green and PgBouncer, generates `--rows` rows on blue
//! server-side (`generate_series`), and measures in one run:
//! - the raw floor: the plan's transforming COPY piped in one stream into an index-less green
//!   table, then the same indexes;
//! - `migrate copy` (the release binary) under a steady writer on blue, and its ratio to the
//!   floor; blue's oldest snapshot of ours (seconds) and the table's dead rows during the copy;
//!   `migrate`'s peak memory (VmHWM);
//! - catch-up after the writer stops; `verify` and its ratio to the copy; `verify --changed`;
//! - a cutover through PgBouncer under an application writer, and its longest stall.
//!
//! ```text
//! cargo build --release && cargo run --release --example bench_scale -- --rows 10000000 [--rate 200] [--snapshot-age 60]
//!   [--payload-md5s 2] [--max-wal-gb 8] [--workers 2] [--chunk-rows 50000] [--copy-log FILE]
//!   [--green-autovacuum on|off] [--hold FILE]
//! ```
//!
//! `--hold FILE`: after the verifies, print both clusters' URLs and the plan's path, create
//! FILE and wait until it is removed before the cutover (to look at the data or time queries
//! on the live clusters).

#[path = "../tests/support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "support/floor.rs"]
mod floor;

use std::{
    path::Path,
    process::{Child, Command},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use cluster::{Bouncer, Cluster};
use floor::raw_floor;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

const BLUE: &str = "CREATE TABLE tokens (id bigint PRIMARY KEY, signature text NOT NULL, client_id int NOT NULL,
    scope text, requested_at timestamp NOT NULL, active boolean NOT NULL, payload text);
  CREATE TABLE app_events (id bigserial PRIMARY KEY, kind text, payload text NOT NULL);";
const GREEN: &str =
    "CREATE TABLE tokens (id bigint PRIMARY KEY, signature text NOT NULL UNIQUE, client_id int NOT NULL,
    scopes text[], requested_at timestamptz NOT NULL, active boolean NOT NULL, payload text);
  CREATE INDEX ON tokens (client_id);
  CREATE TABLE app_events (id bigserial PRIMARY KEY, kind text, payload text NOT NULL);";

fn plan_text(age: u64, (workers, chunk_rows): (u64, u64), bouncer: &Bouncer, green_port: u16) -> String {
    format!(
        "name = \"scale\"\n[blue]\nurl = \"${{BLUE_URL}}\"\n[green]\nurl = \"${{GREEN_URL}}\"\n\
         [copy]\nworkers = {workers}\nchunk_rows = {chunk_rows}\nsnapshot_max_age = \"{age}s\"\n[capture]\nmethod = \"logical\"\n\
         [[table]]\nsource = \"public.tokens\"\nkey = [\"id\"]\n[table.columns]\n\
         scopes = \"array_remove(string_to_array(scope, ' '), '')\"\nrequested_at = \"requested_at AT TIME ZONE 'UTC'\"\n\
         [[table]]\nsource = \"public.app_events\"\nkey = [\"id\"]\n\
         [cutover.pgbouncer]\nadmin_url = \"{}\"\ndatabase = \"app\"\ndatabases_file = \"{}\"\n\
         green_dsn = \"host=127.0.0.1 port={green_port} dbname=tool user=postgres\"\npause_timeout = \"5s\"\n",
        bouncer.admin_url(),
        bouncer.databases_file.display()
    )
}

/// The release binary, as an SRE runs it.
fn migrate(args: &[&str]) -> Command {
    let mut c = Command::new("target/release/migrate");
    c.args(args).env("MIGRATE_LOG", "warn");
    c
}

/// Peak resident memory of `pid` so far (VmHWM), in MiB.
fn peak_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn status(plan: &Path) -> serde_json::Value {
    let out = migrate(&["status", plan.to_str().unwrap_or_default(), "--format", "json"]).output().expect("status");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// A writer on blue at `rate` statements a second: non-HOT updates (a longer payload), inserts,
/// deletes, until `stop`.
fn writer(
    url: String,
    rows: u64,
    rate: u64,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("writer connects");
            tokio::spawn(conn);
            let mut n = 0u64;
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                n += 1;
                let id = 1 + (n * 2_654_435_761) % rows;
                let sql = match n % 4 {
                    0 => format!(
                        "INSERT INTO tokens VALUES ({}, md5('w{n}'), 1, 'openid', now(), true, 'new')",
                        rows + n
                    ),
                    3 => format!("DELETE FROM tokens WHERE id = {id}"),
                    _ => format!("UPDATE tokens SET payload = payload || '-{n}', active = NOT active WHERE id = {id}"),
                };
                if c.simple_query(&sql).await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo run --example` builds the example, not the `migrate` binary it runs: without this
    // a stale binary from an earlier build is what gets measured.
    let built = Command::new("cargo").args(["build", "--release", "--bin", "migrate"]).status()?;
    anyhow::ensure!(built.success(), "cargo build --release --bin migrate failed");
    let rows = arg::<u64>("--rows", 10_000_000);
    let rate = arg::<u64>("--rate", 200);
    let age = arg::<u64>("--snapshot-age", 60);
    // Narrower rows and less WAL let 100M rows fit a smaller disk (blue, green and WAL at once).
    let payload = arg::<u64>("--payload-md5s", 2);
    let wal = format!("max_wal_size={}GB", arg::<u64>("--max-wal-gb", 8));
    let settings = ["shared_buffers=2GB", wal.as_str(), "max_parallel_workers_per_gather=0"];
    let blue = Cluster::start("scale-blue", &settings);
    // `--green-autovacuum off`: to see what autovacuum on green's growing table costs the copy
    // and the verify after it (the floor's table is never vacuumed).
    let autovacuum = format!("autovacuum={}", arg("--green-autovacuum", "on".to_string()));
    let green = Cluster::start("scale-green", &[&settings[..], &[autovacuum.as_str()]].concat());
    blue.psql("postgres", "CREATE DATABASE blue");
    blue.psql("blue", BLUE);
    let t = Instant::now();
    blue.psql(
        "blue",
        &format!(
            "INSERT INTO tokens SELECT g, md5(g::text), (g % 1000)::int, 'openid  offline s' || (g % 7), \
               '2026-01-01'::timestamp + g * interval '1 second', g % 3 <> 0, repeat(md5(g::text), {payload}) \
             FROM generate_series(1, {rows}) g; \
             CREATE UNIQUE INDEX ON tokens (signature);"
        ),
    );
    blue.psql("blue", "VACUUM ANALYZE tokens");
    let generated = t.elapsed().as_secs_f64();
    let size = blue.psql("blue", "SELECT pg_size_pretty(pg_total_relation_size('tokens'))");
    eprintln!("generated {rows} rows in {generated:.1}s ({size})");
    green.psql("postgres", "CREATE DATABASE floor");
    green.psql("floor", GREEN);
    green.psql("postgres", "CREATE DATABASE tool");
    green.psql("tool", GREEN);
    let bouncer =
        Bouncer::start("transaction", &format!("host=127.0.0.1 port={} dbname=blue user=postgres", blue.port));
    let dir = tempfile::tempdir()?;
    let plan_path = dir.path().join("scale.toml");
    std::fs::write(
        &plan_path,
        plan_text(age, (arg::<u64>("--workers", 2), arg::<u64>("--chunk-rows", 50_000)), &bouncer, green.port),
    )?;
    std::env::set_var("BLUE_URL", blue.url("blue"));

    // 1. The floor.
    std::env::set_var("GREEN_URL", green.url("floor"));
    let floor = raw_floor(&plan_path).await?;
    green.psql("postgres", "DROP DATABASE floor");

    // 2. migrate copy under a writer.
    std::env::set_var("GREEN_URL", green.url("tool"));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let w = writer(blue.url("blue"), rows, rate, Arc::clone(&stop), Arc::clone(&writes));
    let dead_before: i64 =
        blue.psql("blue", "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'tokens'").trim().parse()?;
    let started = Instant::now();
    let mut copy = migrate(&["copy", plan_path.to_str().unwrap_or_default()]);
    // `--copy-log FILE`: the copy's own log at info (chunks, removals, index rebuilds with their
    // seconds), to see where its time goes.
    let args: Vec<String> = std::env::args().collect();
    if let Some(log) = args.iter().position(|a| a == "--copy-log").and_then(|i| args.get(i + 1)) {
        copy.env("MIGRATE_LOG", "info").stderr(std::fs::File::create(log)?);
    }
    let mut copy: Child = copy.spawn()?;
    let (mut oldest, mut peak, mut oldest_any) = (0.0f64, 0.0f64, 0.0f64);
    let ours = "SELECT coalesce(max(extract(epoch FROM now() - xact_start)) FILTER (WHERE application_name LIKE 'migrate/%'), 0)::float8, \
                coalesce(max(age(backend_xmin)), 0) FROM pg_stat_activity WHERE datname = 'blue' AND backend_xmin IS NOT NULL";
    // Sampled once a second over two held sessions: a `migrate status` and two psql processes a
    // second (as before) cost the two cores a few percent the floor does not pay.
    let (b, conn) = tokio_postgres::connect(&blue.url("blue"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let (g, conn) = tokio_postgres::connect(&green.url("tool"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let phase = "SELECT state->>'phase' FROM bluegreen_scale.migration WHERE to_regclass('bluegreen_scale.migration') IS NOT NULL";
    // Samples (about one a second) that saw autovacuum working on green's target: the floor's table (one
    // transaction, then locked by its index builds) is never vacuumed, `migrate`'s may be,
    // during the copy or the verify after it.
    let vacuumed = Arc::new(AtomicU64::new(0));
    let (v, conn) = tokio_postgres::connect(&green.url("tool"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let counter = Arc::clone(&vacuumed);
    tokio::spawn(async move {
        let q = "SELECT count(*) FROM pg_stat_progress_vacuum WHERE datname = 'tool' AND relid = to_regclass('public.tokens')";
        loop {
            match v.query_one(q, &[]).await {
                Ok(row) if row.get::<_, i64>(0) > 0 => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => break eprintln!("autovacuum sampling stopped: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let copy_seconds = loop {
        let row = b.query_one(ours, &[]).await?;
        oldest = oldest.max(row.get::<_, f64>(0));
        oldest_any = oldest_any.max(row.get::<_, i32>(1) as f64);
        peak = peak.max(peak_mib(copy.id()).unwrap_or(0.0));
        // The state table appears during the copy's start: until then the query fails.
        let now: Option<String> = g.query_opt(phase, &[]).await.ok().flatten().and_then(|r| r.get(0));
        if now.as_deref() == Some("following") {
            break started.elapsed().as_secs_f64();
        }
        anyhow::ensure!(copy.try_wait()?.is_none(), "migrate copy exited: {}", status(&plan_path));
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let dead_after: i64 =
        blue.psql("blue", "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'tokens'").trim().parse()?;
    let vacuums =
        blue.psql("blue", "SELECT autovacuum_count + vacuum_count FROM pg_stat_user_tables WHERE relname = 'tokens'");
    eprintln!("copy {copy_seconds:.1}s (floor {floor:.1}s), oldest snapshot of ours {oldest:.1}s");
    let vacuum_in_copy = vacuumed.load(Ordering::Relaxed);

    // 3. Following: ten more seconds of writes, then the catch-up once they stop.
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::SeqCst);
    w.join().ok();
    let t = Instant::now();
    let catch_up = loop {
        let st = status(&plan_path);
        peak = peak.max(peak_mib(copy.id()).unwrap_or(0.0));
        let lag = st["capture"]["lag_bytes"].as_i64().unwrap_or(i64::MAX);
        if st["capture"]["pending_keys"] == 0 && lag < 1 << 20 {
            break t.elapsed().as_secs_f64();
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(600), "no catch-up in 10 minutes: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // 4. Verify, twice.
    let p = plan_path.to_str().unwrap_or_default();
    let t = Instant::now();
    let vacuum_before_verify = vacuumed.load(Ordering::Relaxed);
    let v = migrate(&["verify", p]).output()?;
    let verify = t.elapsed().as_secs_f64();
    let vacuum_in_verify = vacuumed.load(Ordering::Relaxed) - vacuum_before_verify;
    anyhow::ensure!(
        v.status.success(),
        "verify ({}): {}{}",
        v.status,
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&v.stdout));
    let t = Instant::now();
    let v = migrate(&["verify", p, "--changed"]).output()?;
    let verify_again = t.elapsed().as_secs_f64();
    anyhow::ensure!(v.status.success(), "second verify: {}", String::from_utf8_lossy(&v.stdout));

    if let Some(hold) = args.iter().position(|a| a == "--hold").and_then(|i| args.get(i + 1)) {
        eprintln!("HOLD blue={} green={} plan={}", blue.url("blue"), green.url("tool"), p);
        std::fs::write(hold, "")?;
        while Path::new(hold).exists() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    // 5. Cutover through PgBouncer under an application writer.
    let app = bluegreen::sandbox::app::App::start(
        format!("host=127.0.0.1 port={} dbname=app user=postgres", bouncer.port),
        200,
        "scale",
    );
    app.set_mapped(false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    app.reset_stall();
    let c = migrate(&["cutover", p]).output()?;
    anyhow::ensure!(c.status.success(), "cutover: {}", String::from_utf8_lossy(&c.stdout));
    tokio::time::sleep(Duration::from_millis(500)).await;
    peak = peak.max(peak_mib(copy.id()).unwrap_or(0.0));
    let report = app.stop();
    anyhow::ensure!(
        report.failures.is_empty(),
        "the application saw failures: {:?}",
        &report.failures[..report.failures.len().min(3)]
    );
    let _ = copy.wait();

    println!(
        "rows={rows} ({size} on blue), generated in {generated:.0} s; writer {rate}/s during the copy ({} writes)",
        writes.load(Ordering::Relaxed)
    );
    println!("raw floor (one COPY stream, index-less, then the same indexes): {floor:.1} s");
    println!(
        "migrate copy (indexes included, under the writer):            {copy_seconds:.1} s = {:.3}x the floor",
        copy_seconds / floor
    );
    println!("oldest snapshot of ours on blue during the copy: {oldest:.1} s (snapshot_max_age {age} s); oldest xmin age on blue: {oldest_any:.0} transactions");
    println!(
        "dead rows in blue's table: {dead_before} before, {dead_after} after the copy; vacuums of it: {}",
        vacuums.trim()
    );
    println!("catch-up after the writer stopped: {catch_up:.1} s");
    println!(
        "autovacuum seen on green's table in {vacuum_in_copy} samples (about one a second) during the copy, {vacuum_in_verify} during verify"
    );
    println!(
        "verify: {verify:.1} s = {:.2}x the copy; `verify --changed` right after: {verify_again:.1} s",
        verify / copy_seconds
    );
    println!("cutover: longest client-observed stall {:.1} ms", report.max_stall.as_secs_f64() * 1000.0);
    println!("migrate copy's peak memory (VmHWM): {peak:.0} MiB");
    Ok(())
}
