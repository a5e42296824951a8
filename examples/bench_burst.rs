//! Burst benchmark: one transaction updating every row of `pgbench_accounts` (scale 10: 1M rows)
//! on blue, followed by PostgreSQL's own logical replication (publication + subscription) and by
//! `migrate copy`, measured in the same run on the same clusters (each on its own pair of
//! databases, one after the other, so they do not share the CPU). Prints both times, the ratio,
//! and the peak memory of the `migrate` process; then `migrate verify` and the same burst again
//! (from then on every key applied is recorded for the cutover).
//!
//!     cargo build --release && cargo run --release --example bench_burst -- [--scale 10] [--method logical|trigger]
//!
//! With `--during-copy` it measures instead a burst made while the table is still being copied
//! (the copy held to about `--copy-seconds`, default 20, by a row rate): its keys wait in
//! `pending` until the copy is done and are then drained by the apply workers. Prints the
//! keys pending when the copy finished, the time from then until green had everything, the
//! drain rate, and, as its floor, the same burst made again once following (applied straight
//! from capture) in the same run.

#[path = "support/pgbench.rs"]
mod pgbench_plan;

#[path = "../tests/support/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use std::time::{Duration, Instant};

use cluster::Cluster;
use pgbench_plan::{arg, run as pgbench};

/// The burst: every account updated in one transaction; returns the commit's end position.
fn burst(blue: &Cluster, db: &str) -> i64 {
    // Flushed at commit (the clusters run with synchronous_commit = off): the flush position
    // read next then lies past the commit.
    blue.psql(db, "SET synchronous_commit = on; UPDATE pgbench_accounts SET abalance = abalance + 1");
    blue.psql(db, "SELECT (pg_current_wal_flush_lsn() - '0/0')::int8").parse().unwrap()
}

fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> f64 {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what} did not finish within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed().as_secs_f64()
}

/// Peak resident memory (VmHWM) of a process, in MB.
fn peak_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:")?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The benchmark plan's state schema on green.
const STATE: &str = "bluegreen_bench_burst";

/// `migrate copy PLAN` against the `ours` databases, in the background.
fn start_copy(
    migrate: &std::path::Path,
    plan: &std::path::Path,
    blue: &Cluster,
    green: &Cluster,
) -> std::process::Child {
    std::process::Command::new(migrate)
        .args(["copy", plan.to_str().unwrap()])
        .env("BLUE_URL", blue.url("ours"))
        .env("GREEN_URL", green.url("ours"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start migrate copy")
}

/// Green has every change up to blue position `lsn`: capture passed it and nothing is
/// pending (with trigger capture also: blue's change table empty and the balances, whose
/// sum was `sum` on blue, add up on green).
fn caught_up(blue: &Cluster, green: &Cluster, method: &str, lsn: i64, sum: &str) -> bool {
    green.psql(
        "ours",
        &format!(
            "SELECT coalesce(capture_lsn, 0) >= {lsn} AND NOT EXISTS (SELECT 1 FROM {STATE}.pending) FROM {STATE}.migration"
        ),
    ) == "t"
        && (method != "trigger"
            || (blue.psql("ours", &format!("SELECT count(*) FROM {STATE}.changes")) == "0"
                && green.psql("ours", "SELECT sum(abalance) FROM pgbench_accounts") == sum))
}

fn main() {
    let scale = arg("--scale", "10");
    let method = arg("--method", "logical");
    let migrate = std::env::current_exe().unwrap().parent().unwrap().join("../migrate");
    assert!(migrate.exists(), "build the binary first: cargo build --release ({})", migrate.display());
    let blue = Cluster::start("bb-blue", &["shared_buffers=512MB"]);
    let green = Cluster::start("bb-green", &["shared_buffers=512MB", "max_logical_replication_workers=8"]);
    if std::env::args().any(|a| a == "--during-copy") {
        return during_copy(&blue, &green, &migrate, &scale, &method);
    }
    for db in ["native", "ours"] {
        blue.psql("postgres", &format!("CREATE DATABASE {db}"));
        green.psql("postgres", &format!("CREATE DATABASE {db}"));
        pgbench(&blue, db, &["-i", "-q", "-s", &scale]);
        pgbench(&green, db, &["-i", "-q", "-I", "dtp", "-s", &scale]);
        green.psql(db, "TRUNCATE pgbench_accounts, pgbench_tellers, pgbench_branches, pgbench_history");
    }
    let rows: i64 = blue.psql("ours", "SELECT count(*) FROM pgbench_accounts").parse().unwrap();

    // Native: publication + subscription, initial sync, then the burst.
    blue.psql("native", "CREATE PUBLICATION p FOR TABLE pgbench_accounts");
    green.psql(
        "native",
        &format!(
            "CREATE SUBSCRIPTION s CONNECTION 'host=127.0.0.1 port={} dbname=native user=postgres' PUBLICATION p",
            blue.port
        ),
    );
    wait("the subscription's initial sync", Duration::from_secs(600), || {
        green.psql("native", "SELECT bool_and(srsubstate = 'r') FROM pg_subscription_rel") == "t"
    });
    // Done when green has every updated row (every balance was 0, each is now 1): the slot's
    // confirmed position is no proof, a subscriber confirms positions it has only received.
    let native_burst = |balance: i64| {
        burst(&blue, "native");
        wait("native replication of the burst", Duration::from_secs(600), || {
            std::thread::sleep(Duration::from_millis(100));
            green.psql("native", &format!("SELECT count(*) FROM pgbench_accounts WHERE abalance = {balance}"))
                == rows.to_string()
        })
    };
    let native = native_burst(1);
    // The second burst meets a table the first one left with a dead version of every row; ours
    // runs it after a verify, so it is compared with native's second burst.
    let native_again = native_burst(2);
    green.psql("native", "ALTER SUBSCRIPTION s DISABLE");

    // Ours: copy, follow, then the same burst.
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("bench.toml");
    std::fs::write(&plan, pgbench_plan::plan("bench-burst", &method, false)).unwrap();
    let mut child = start_copy(&migrate, &plan, &blue, &green);
    let state = STATE;
    wait("copy", Duration::from_secs(600), || {
        green.psql("ours", &format!("SELECT to_regclass('{state}.migration') IS NOT NULL")) == "t"
            && green.psql("ours", &format!("SELECT state->>'phase' FROM {state}.migration")) == "following"
    });
    std::thread::sleep(Duration::from_secs(2));
    let before_mb = peak_mb(child.id());
    let follow = |what: &str| {
        let lsn = burst(&blue, "ours");
        let sum = blue.psql("ours", "SELECT sum(abalance) FROM pgbench_accounts");
        wait(what, Duration::from_secs(900), || caught_up(&blue, &green, &method, lsn, &sum))
    };
    let ours = follow("migrate's following of the burst");
    // Once a verify has started, every key applied is also recorded for the cutover to
    // re-verify: the same burst again, after a verify.
    let verified = std::process::Command::new(&migrate)
        .args(["verify", plan.to_str().unwrap()])
        .env("BLUE_URL", blue.url("ours"))
        .env("GREEN_URL", green.url("ours"))
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run migrate verify");
    assert!(verified.success(), "migrate verify found differences before the second burst");
    let after_verify = follow("migrate's following of the burst after a verify");
    let peak = peak_mb(child.id());
    let _ = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let _ = child.wait();
    let fp = |c: &Cluster| c.psql("ours", "SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a");
    let equal = fp(&blue) == fp(&green);
    println!("burst: UPDATE of {rows} rows in one transaction, {method} capture");
    println!("native logical replication: {native:.1} s");
    println!("migrate copy following:     {ours:.1} s  ({:.0} rows/s)", rows as f64 / ours);
    println!("ratio: {:.2}x native", ours / native);
    println!(
        "a second burst, after a verify (keys recorded as touched): native {native_again:.1} s, migrate {after_verify:.1} s, {:.2}x native",
        after_verify / native_again
    );
    println!("migrate peak memory: {peak:.0} MB (before the burst {before_mb:.0} MB)");
    println!("green equal to blue after the burst: {equal}");
}

/// A burst while the table is being copied: its keys wait in `pending` for the copy's end, and
/// are drained after it.
fn during_copy(blue: &Cluster, green: &Cluster, migrate: &std::path::Path, scale: &str, method: &str) {
    let copy_seconds: i64 = arg("--copy-seconds", "20").parse().unwrap();
    blue.psql("postgres", "CREATE DATABASE ours");
    green.psql("postgres", "CREATE DATABASE ours");
    pgbench(blue, "ours", &["-i", "-q", "-s", scale]);
    pgbench(green, "ours", &["-i", "-q", "-I", "dtp", "-s", scale]);
    green.psql("ours", "TRUNCATE pgbench_accounts, pgbench_tellers, pgbench_branches, pgbench_history");
    let rows: i64 = blue.psql("ours", "SELECT count(*) FROM pgbench_accounts").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("bench.toml");
    let text = format!(
        "{}[copy]\nmax_rows_per_second = {}\n",
        pgbench_plan::plan("bench-burst", method, false),
        (rows / copy_seconds).max(1)
    );
    std::fs::write(&plan, text).unwrap();
    let mut child = start_copy(migrate, &plan, blue, green);
    let state = STATE;
    let phase = || {
        if green.psql("ours", &format!("SELECT to_regclass('{state}.chunks') IS NOT NULL")) != "t" {
            return String::new();
        }
        green.psql("ours", &format!("SELECT state->>'phase' FROM {state}.migration"))
    };
    wait("the copy's first chunk", Duration::from_secs(600), || {
        !phase().is_empty() && green.psql("ours", &format!("SELECT count(*) > 0 FROM {state}.chunks WHERE done")) == "t"
    });
    let started = Instant::now();
    let lsn = burst(blue, "ours");
    let burst_seconds = started.elapsed().as_secs_f64();
    let sum = blue.psql("ours", "SELECT sum(abalance) FROM pgbench_accounts");
    assert_ne!(phase(), "following", "the copy ended before the burst did: raise --copy-seconds");
    wait("the copy", Duration::from_secs(900), || {
        std::thread::sleep(Duration::from_millis(100));
        phase() == "following"
    });
    let pending: i64 = green.psql("ours", &format!("SELECT count(*) FROM {state}.pending")).parse().unwrap();
    let drained = wait("the drain", Duration::from_secs(1800), || {
        std::thread::sleep(Duration::from_millis(100));
        caught_up(blue, green, method, lsn, &sum)
    });
    // The floor: the same burst once following.
    let lsn = burst(blue, "ours");
    let sum = blue.psql("ours", "SELECT sum(abalance) FROM pgbench_accounts");
    let following = wait("the same burst while following", Duration::from_secs(1800), || {
        std::thread::sleep(Duration::from_millis(100));
        caught_up(blue, green, method, lsn, &sum)
    });
    let peak = peak_mb(child.id());
    let _ = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let _ = child.wait();
    let fp = |c: &Cluster| c.psql("ours", "SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a");
    let equal = fp(blue) == fp(green);
    println!(
        "burst during the copy: UPDATE of {rows} rows in one transaction ({burst_seconds:.1} s), {method} capture"
    );
    println!("keys pending when the copy finished: {pending}");
    println!("drained in {drained:.1} s after the copy finished ({:.0} keys/s)", pending as f64 / drained);
    println!(
        "the same burst while following: {following:.1} s ({:.0} rows/s); the drain took {:.2}x as long a key",
        rows as f64 / following,
        (drained / pending as f64) / (following / rows as f64)
    );
    println!("migrate peak memory: {peak:.0} MB");
    println!("green equal to blue: {equal}");
    assert!(equal, "green differs from blue");
}
