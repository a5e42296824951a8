//! Follow benchmark: starts its own clusters, loads pgbench (TPC-B) on blue, copies it to green,
//! then runs pgbench at full speed against blue while `migrate copy` follows. Prints the TPC-B
//! rate, the apply rate, capture lag over time (is it bounded?), and how long green takes to
//! catch up once the load stops.
//!
//!     cargo run --release --example bench_follow -- [--scale 10] [--seconds 30] [--clients 4] [--method logical|trigger]

#[path = "support/pgbench.rs"]
mod pgbench_plan;

#[path = "../tests/support/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use bluegreen::{copy::Shutdown, Command};
use cluster::Cluster;
use pgbench_plan::{arg, run as pgbench};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MIGRATE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let scale = arg("--scale", "10");
    let seconds: u64 = arg("--seconds", "30").parse()?;
    let clients = arg("--clients", "4");
    let method = arg("--method", "logical");
    let blue = Cluster::start("bf-blue", &["shared_buffers=512MB"]);
    let green = Cluster::start("bf-green", &["shared_buffers=512MB"]);
    blue.psql("postgres", "CREATE DATABASE app");
    green.psql("postgres", "CREATE DATABASE app");
    pgbench(&blue, "app", &["-i", "-q", "-s", &scale]);
    pgbench(&green, "app", &["-i", "-q", "-I", "dtp", "-s", &scale]);
    green.psql("app", "TRUNCATE pgbench_accounts, pgbench_tellers, pgbench_branches");
    let dir = tempfile::tempdir()?;
    let plan = dir.path().join("bench.toml");
    std::fs::write(&plan, pgbench_plan::plan("bench-follow", &method, true))?;
    std::env::set_var("BLUE_URL", blue.url("app"));
    std::env::set_var("GREEN_URL", green.url("app"));

    let shutdown = Shutdown::manual();
    let follower = {
        let (plan, shutdown) = (plan.clone(), shutdown.clone());
        tokio::spawn(async move {
            bluegreen::run(&plan, Command::Copy { no_follow: false, recopy: Vec::new(), metrics: None }, shutdown).await
        })
    };
    let state = "bluegreen_bench_follow";
    let started = Instant::now();
    while green.psql("app", &format!("SELECT to_regclass('{state}.migration') IS NOT NULL")) != "t"
        || green.psql("app", &format!("SELECT state->>'phase' FROM {state}.migration")) != "following"
    {
        anyhow::ensure!(!follower.is_finished(), "migrate copy ended early: {:?}", follower.await);
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "copied scale {scale} in {:.1}s; starting pgbench ({clients} clients, {seconds}s, {method} capture)",
        started.elapsed().as_secs_f64()
    );

    let load = {
        let (c, s) = (clients.clone(), seconds.to_string());
        let bindir = blue.bindir.clone();
        let port = blue.port;
        std::thread::spawn(move || {
            std::process::Command::new(bindir.join("pgbench"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-p",
                    &port.to_string(),
                    "-c",
                    &c,
                    "-j",
                    "2",
                    "-T",
                    &s,
                    "app",
                ])
                .output()
                .expect("run pgbench")
        })
    };
    let mut lags = Vec::new();
    let t0 = Instant::now();
    while !load.is_finished() {
        std::thread::sleep(Duration::from_secs(1));
        let lag: i64 =
            green.psql("app", &format!("SELECT coalesce(lag_bytes, 0) FROM {state}.migration")).parse().unwrap_or(0);
        lags.push((t0.elapsed().as_secs_f64(), lag));
    }
    let out = load.join().expect("pgbench thread");
    let load_end = Instant::now();
    // Blue runs with synchronous_commit = off: pgbench's last commits may not be flushed (nor
    // decodable) yet. A synchronously committed message flushes everything before it.
    let flushed = blue.psql(
        "app",
        "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_logical_emit_message(true, 'bench', 'end') IS NULL; COMMIT; \
         SELECT (pg_current_wal_flush_lsn() - '0/0')::int8",
    );
    let flushed = flushed.lines().last().unwrap_or("0").trim().to_string();
    let report = String::from_utf8_lossy(&out.stdout);
    let tps = report.lines().find(|l| l.starts_with("tps")).unwrap_or("tps = ?").to_string();
    // Caught up: capture has passed the position blue had flushed when the load stopped, and
    // nothing is pending.
    let caught_up = loop {
        let done = green.psql(
            "app",
            &format!("SELECT coalesce(capture_lsn, 0) >= {flushed} AND NOT EXISTS (SELECT 1 FROM {state}.pending) FROM {state}.migration"),
        );
        if done == "t"
            || (method == "trigger"
                && green.psql("app", &format!("SELECT NOT EXISTS (SELECT 1 FROM {state}.pending)")) == "t"
                && blue.psql("app", "SELECT count(*) FROM bluegreen_bench_follow.changes") == "0")
        {
            break load_end.elapsed().as_secs_f64();
        }
        anyhow::ensure!(load_end.elapsed() < Duration::from_secs(300), "green did not catch up in 300 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let applied: f64 = green.psql("app", &format!("SELECT applied_keys FROM {state}.migration")).parse().unwrap_or(0.0);
    shutdown.trigger();
    follower.await??;
    // Same data on both sides?
    let fp = |c: &Cluster| c.psql("app", "SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a");
    let equal = fp(&blue) == fp(&green);
    let half = lags.len() / 2;
    let max_first = lags[..half].iter().map(|l| l.1).max().unwrap_or(0);
    let max_second = lags[half..].iter().map(|l| l.1).max().unwrap_or(0);
    println!("pgbench TPC-B scale {scale}, {clients} clients, {seconds}s, {method} capture");
    println!("load: {tps}");
    println!("keys applied during the run: {applied:.0} ({:.0} keys/s)", applied / seconds as f64);
    println!("capture lag (bytes) per second: {:?}", lags.iter().map(|l| l.1).collect::<Vec<_>>());
    println!(
        "max lag first half {max_first} B, second half {max_second} B ({})",
        if max_second <= max_first * 2 { "bounded" } else { "GROWING" }
    );
    println!("caught up {caught_up:.2}s after the load stopped");
    println!("green pgbench_accounts equal to blue: {equal}");
    let _ = Path::new(".");
    Ok(())
}
