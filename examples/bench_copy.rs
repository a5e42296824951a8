//! Copy benchmark: starts its own blue and green clusters, loads the OAuth fixture, and measures
//! in one run (a) the raw floor — the plan's own transforming `COPY (SELECT …)` piped in one
//! stream into an index-less target, then the same indexes built — and (b) `migrate copy`.
//! Prints both and their ratio.
//!
//!     cargo run --release --example bench_copy -- --rows 1000000 [--workers 2] [--chunk-rows 50000] [--rounds 2]

#[path = "../tests/support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "support/floor.rs"]
mod floor;

use std::{path::Path, time::Instant};

use bluegreen::{copy::Shutdown, Command};
use cluster::Cluster;
use floor::raw_floor;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The fixture plan reduced to the largest table (access tokens).
fn bench_plan(workers: u64, chunk_rows: u64) -> String {
    let text = std::fs::read_to_string("plans/oauth-v1-to-v2.toml").expect("run from the repository root");
    let start = text.find("[[table]]\nsource = \"public.hydra_oauth2_access\"").expect("access table in plan");
    let end = text[start + 9..].find("[[table]]").map(|e| start + 9 + e).unwrap_or(text.len());
    let head = &text[..text.find("[[table]]").unwrap()];
    let head = head
        .replace("workers = 2", &format!("workers = {workers}"))
        .replace("chunk_rows = 50000", &format!("chunk_rows = {chunk_rows}"));
    format!("{head}{}", &text[start..end])
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows = arg("--rows", 1_000_000);
    let workers = arg("--workers", 2);
    let chunk_rows = arg("--chunk-rows", 50_000);
    let rounds = arg("--rounds", 2);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MIGRATE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    eprintln!("starting clusters…");
    let blue =
        Cluster::start("bench-blue", &["shared_buffers=1GB", "max_parallel_workers_per_gather=0", "autovacuum=off"]);
    let green =
        Cluster::start("bench-green", &["shared_buffers=1GB", "max_parallel_workers_per_gather=0", "autovacuum=off"]);
    blue.psql("postgres", "CREATE DATABASE blue");
    blue.psql_file("blue", Path::new("fixtures/oauth/blue.sql"), &[]);
    let t = Instant::now();
    blue.psql_file("blue", Path::new("fixtures/oauth/generate.sql"), &[("rows", &rows.to_string())]);
    blue.psql("blue", "VACUUM ANALYZE");
    eprintln!(
        "generated {rows} access tokens in {:.1}s; table {}",
        t.elapsed().as_secs_f64(),
        blue.psql("blue", "SELECT pg_size_pretty(pg_total_relation_size('hydra_oauth2_access'))")
    );
    green.psql("postgres", "CREATE DATABASE green_tpl");
    green.psql_file("green_tpl", Path::new("fixtures/oauth/green.sql"), &[]);
    // Only the access table is benchmarked; its foreign key to the (uncopied) clients goes.
    green.psql("green_tpl", "ALTER TABLE oauth2_access_tokens DROP CONSTRAINT oauth2_access_tokens_client_id_fkey");

    let dir = tempfile::tempdir()?;
    let plan_path = dir.path().join("bench.toml");
    std::fs::write(&plan_path, bench_plan(workers, chunk_rows))?;
    let mut floors = Vec::new();
    let mut tools = Vec::new();
    let mut verifies = Vec::new();
    for round in 0..rounds {
        let db = format!("green_floor_{round}");
        green.psql("postgres", &format!("CREATE DATABASE {db} TEMPLATE green_tpl"));
        std::env::set_var("BLUE_URL", blue.url("blue"));
        std::env::set_var("GREEN_URL", green.url(&db));
        let floor = raw_floor(&plan_path).await?;
        eprintln!("round {round}: raw floor {floor:.2}s");
        floors.push(floor);

        let db = format!("green_tool_{round}");
        green.psql("postgres", &format!("CREATE DATABASE {db} TEMPLATE green_tpl"));
        std::env::set_var("GREEN_URL", green.url(&db));
        let t = Instant::now();
        bluegreen::run(
            &plan_path,
            Command::Copy { no_follow: true, recopy: Vec::new(), metrics: None },
            Shutdown::manual(),
        )
        .await?;
        let tool = t.elapsed().as_secs_f64();
        let n = green.psql(&db, "SELECT count(*) FROM oauth2_access_tokens");
        eprintln!("round {round}: migrate copy {tool:.2}s ({n} rows)");
        tools.push(tool);
        let t = Instant::now();
        let outcome = bluegreen::run(
            &plan_path,
            Command::Verify { format: bluegreen::Format::Json, table: None, reverse: false, changed: false },
            Shutdown::manual(),
        )
        .await?;
        anyhow::ensure!(outcome == bluegreen::Outcome::Ok, "verify found differences after the copy");
        let verify = t.elapsed().as_secs_f64();
        eprintln!("round {round}: migrate verify {verify:.2}s ({:.2}x the copy)", verify / tool);
        verifies.push(verify / tool);
    }
    let floor = floors.iter().cloned().fold(f64::MAX, f64::min);
    let tool = tools.iter().cloned().fold(f64::MAX, f64::min);
    let mut ratios: Vec<f64> = tools.iter().zip(&floors).map(|(t, f)| t / f).collect();
    ratios.sort_by(|a, b| a.total_cmp(b));
    println!("rows={rows} workers={workers} chunk_rows={chunk_rows}");
    println!("raw floor (one COPY stream into a bare table + same indexes): {floor:.2}s");
    println!("migrate copy (indexes included):                             {tool:.2}s");
    println!(
        "ratio: {:.3}x the raw floor (best of {rounds}); per-round median {:.3}x",
        tool / floor,
        ratios[ratios.len() / 2]
    );
    Ok(())
}
