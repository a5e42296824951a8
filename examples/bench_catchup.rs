//! Cutover under pgbench: at each rate, pgbench inserts through PgBouncer into a planned table
//! (`app_events`) while `migrate cutover` runs. Prints whether it switched, the first catch-up,
//! the rounds before the pause, the pause, the longest transaction pgbench saw during the
//! cutover, and the floor: the longest transaction during the bare mechanics of a switch (PAUSE,
//! RELOAD, RESUME by hand) at the same rate, in the same run. Then failed and lost transactions.
//!
//! `cargo run --release --example bench_catchup [rows] [rates...]` (a rate of 0: unthrottled)

use std::{
    path::Path,
    process::{Command as Process, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bluegreen::{
    demo::{hand_switch, start_sandbox, wait_following},
    sandbox::bindir,
    shutdown::Shutdown,
    Command, Error, Outcome, Result,
};

fn now_us() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros()
}

/// Longest latency (ms) of pgbench transactions that ended in `[from, to]` (epoch µs), from its
/// per-transaction logs in `dir`: `client tx latency_us script end_s end_us [lag]`.
fn longest_between(dir: &Path, from: u128, to: u128) -> f64 {
    let mut longest = 0u128;
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        if !f.file_name().to_string_lossy().starts_with("tx.") {
            continue;
        }
        for l in std::fs::read_to_string(f.path()).unwrap_or_default().lines() {
            let v: Vec<u128> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            if v.len() >= 6 {
                let end = v[4] * 1_000_000 + v[5];
                if (from..=to).contains(&end) {
                    longest = longest.max(v[2]);
                }
            }
        }
    }
    longest as f64 / 1000.0
}

async fn one(rows: u32, rate: u32) -> Result<String> {
    let (sandbox, dir, plan_path) = start_sandbox(rows).await?;
    let bouncer = sandbox.bouncer.as_ref().ok_or(Error::Internal("no PgBouncer"))?;
    let shutdown = Shutdown::manual();
    let copy_stop = Shutdown::manual();
    let copying = {
        let (p, stop) = (plan_path.clone(), copy_stop.clone());
        tokio::spawn(async move {
            bluegreen::run(&p, Command::Copy { no_follow: false, recopy: Vec::new(), metrics: None }, stop).await
        })
    };
    let plan = bluegreen::plan::Plan::load(&plan_path)?;
    wait_following(&plan, &shutdown).await?;
    bluegreen::run(
        &plan_path,
        Command::Verify { format: bluegreen::Format::Text, table: None, reverse: false, changed: false },
        shutdown.clone(),
    )
    .await?;

    let logs = dir.join("pgbench");
    std::fs::create_dir_all(&logs).map_err(|source| Error::File { what: "creating", path: logs.clone(), source })?;
    std::fs::write(
        logs.join("insert.sql"),
        "INSERT INTO app_events (kind, payload) VALUES ('pgbench', :client_id || '-' || random()::text);\n",
    )
    .map_err(|source| Error::File { what: "writing", path: logs.clone(), source })?;
    let mut cmd = Process::new(bindir()?.join("pgbench"));
    cmd.current_dir(&logs)
        .args(["-n", "-M", "simple", "-c", "4", "-j", "2", "-h", "127.0.0.1", "-U", "postgres", "-l"])
        .args(["-p", &bouncer.port.to_string(), "-T", "40", "-f", "insert.sql", "--log-prefix=tx", "app"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if rate > 0 {
        cmd.args(["-R", &rate.to_string()]);
    }
    let bench = cmd.spawn().map_err(|source| Error::File { what: "running pgbench in", path: logs.clone(), source })?;
    tokio::time::sleep(Duration::from_secs(5)).await;

    let from = now_us();
    let outcome = bluegreen::run(&plan_path, Command::Cutover { dry_run: false }, shutdown.clone()).await?;
    let to = now_us();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stall = longest_between(&logs, from, now_us());
    let record: serde_json::Value = {
        let green = plan.green.connect().await?;
        let row = green
            .query_one("SELECT cutover FROM bluegreen_demo.migration", &[])
            .await
            .map_err(Error::db("green: reading the cutover record"))?;
        row.get::<_, Option<serde_json::Value>>(0).unwrap_or_default()
    };
    let steps: Vec<(String, f64)> = record["steps"]
        .as_array()
        .map(|a| {
            a.iter().map(|s| (s["step"].as_str().unwrap_or("").to_string(), s["ms"].as_f64().unwrap_or(0.0))).collect()
        })
        .unwrap_or_default();
    let first_catch_up = steps.iter().find(|(s, _)| s == "catch-up").map(|s| s.1).unwrap_or(f64::NAN);
    let rounds = steps.iter().filter(|(s, _)| s.starts_with("catch-up")).count();
    let paused = record["paused_ms"].as_f64();

    // The floor: the same mechanics by hand, same rate, nothing to drain or check.
    let floor_from = now_us();
    let green_dsn = format!("host=127.0.0.1 port={} dbname=app user=postgres", sandbox.green.port);
    if outcome == Outcome::Ok {
        hand_switch(&bouncer.admin_url(), &bouncer.databases_file, &green_dsn).await?;
    } else {
        let blue_dsn = format!("host=127.0.0.1 port={} dbname=app user=postgres", sandbox.blue.port);
        hand_switch(&bouncer.admin_url(), &bouncer.databases_file, &blue_dsn).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let floor = longest_between(&logs, floor_from, now_us());
    let _ = to;

    let out = bench.wait_with_output().map_err(|source| Error::File {
        what: "waiting for pgbench in",
        path: logs.clone(),
        source,
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix)?.split_whitespace().next()?.split('/').next()?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let (processed, failed, tps) =
        (field("number of transactions actually processed:"), field("number of failed transactions:"), field("tps ="));
    copy_stop.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(15), copying).await;
    let lost = if outcome == Outcome::Ok {
        let green = plan.green.connect().await?;
        let n: i64 = green
            .query_one("SELECT count(*) FROM app_events WHERE kind = 'pgbench'", &[])
            .await
            .map_err(Error::db("green: counting pgbench rows"))?
            .get(0);
        format!("{}", processed as i64 - n)
    } else {
        "-".into()
    };
    let _ = std::fs::remove_dir_all(&dir);
    drop(sandbox);
    Ok(format!(
        "{:>11}  {tps:>7.0} tps  {:<8}  first catch-up {first_catch_up:>7.0} ms  rounds {rounds}  paused {:>6}  \
         stall {stall:>6.0} ms  floor {floor:>5.0} ms  ratio {:>5.1}x  failed {failed}  lost {lost}",
        if rate == 0 { "unthrottled".to_string() } else { format!("-R {rate}") },
        if outcome == Outcome::Ok { "switched" } else { "aborted" },
        paused.map(|p| format!("{p:.0} ms")).unwrap_or_else(|| "-".into()),
        stall / floor.max(0.1),
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rows: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let mut rates: Vec<u32> = args.iter().skip(2).filter_map(|a| a.parse().ok()).collect();
    if rates.is_empty() {
        rates = vec![300, 1000, 2000, 4000, 8000, 0];
    }
    let mut lines = Vec::new();
    for rate in rates {
        let line = one(rows, rate).await?;
        eprintln!("{line}");
        lines.push(line);
    }
    println!("\ncutover under pgbench ({rows} access tokens, PgBouncer transaction pooling, 4 clients)");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
