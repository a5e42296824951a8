//! `migrate verify` against real clusters: equal data passes, each kind of tampering is named by
//! key and column, equal-but-differently-written values pass, and a following copy under a
//! concurrent writer never produces a false difference.

use std::time::Duration;

use crate::support::{run, writer::Writer, Oauth};

fn copied(rows: u32, before_copy: &str) -> (Oauth, std::path::PathBuf) {
    let s = Oauth::new(rows);
    if !before_copy.is_empty() {
        s.blue.psql(before_copy);
    }
    let plan = s.plan_with_copy("workers = 2\nchunk_rows = 2000\ndefer_indexes = true");
    let r = run(&mut s.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    (s, plan)
}

#[test]
fn equal_data_verifies() {
    let (s, plan) = copied(20_000, "");
    let r = run(&mut s.migrate(&["verify", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("green equals transform(blue)"), "{r:?}");
    let j = run(&mut s.migrate(&[
        "verify",
        plan.to_str().unwrap(),
        "--format",
        "json",
        "--table",
        "public.oauth2_access_tokens",
    ]));
    assert_eq!(j.code, 0, "{j:?}");
    // A table the plan does not have is a usage error.
    let nope = run(&mut s.migrate(&["verify", plan.to_str().unwrap(), "--table", "public.nope"]));
    assert_eq!(nope.code, 2, "{nope:?}");
    assert!(nope.stderr.contains("--table public.nope: no such table in the plan"), "{nope:?}");
    let v: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
    assert_eq!(v["equal"], true);
    assert_eq!(v["tables"].as_array().unwrap().len(), 1);
    let t = &v["tables"][0];
    assert!(t["buckets"].as_u64().unwrap() >= 1 && t["rows_blue"] == t["rows_green"], "{t}");
    assert!(t["rows_blue"].as_i64().unwrap() > 10_000, "{t}");
    // status shows the last verify.
    let st = run(&mut s.migrate(&["status", plan.to_str().unwrap(), "--format", "json"]));
    let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(st["last_verify"]["equal"], true, "{st}");
    // Every bucket is recorded clean, with the blue position it was verified at.
    let rec =
        s.green.psql(&s.sql("SELECT bool_and(ok) AND count(*) >= 6 AND min(lsn) > 0 FROM bluegreen_oauth_v2.verified"));
    assert_eq!(rec, "t");
}

#[test]
fn tampering_gets_exactly_the_right_verdict() {
    let (s, plan) = copied(
        5_000,
        "UPDATE hydra_client SET metadata = '{\"a\": 2, \"b\": 1}' WHERE pk = 5; \
         UPDATE hydra_oauth2_access SET subject = NULL WHERE signature = (SELECT min(signature) FROM hydra_oauth2_access \
           WHERE requested_at > now() - interval '30 days')",
    );
    let g = &s.green;
    // Real differences.
    g.psql("UPDATE oauth2_clients SET name = 'tampered' WHERE pk = 3");
    let missing = g.psql("SELECT min(request_id) FROM oauth2_revocations");
    g.psql(&format!("DELETE FROM oauth2_revocations WHERE request_id = '{missing}'"));
    g.psql("INSERT INTO oauth2_revocations VALUES ('extra-1', now(), 'x')");
    let nulled = g.psql("SELECT signature FROM oauth2_access_tokens WHERE subject IS NULL ORDER BY signature LIMIT 1");
    g.psql(&format!("UPDATE oauth2_access_tokens SET subject = '' WHERE signature = '{nulled}'"));
    // Equal values written differently: not differences.
    g.psql("UPDATE oauth2_clients SET metadata = '{\"b\":1,   \"a\":2}'::jsonb WHERE pk = 5");
    let tz = g.psql("SELECT max(request_id) FROM oauth2_revocations WHERE request_id <> 'extra-1'");
    g.psql(&format!(
        "UPDATE oauth2_revocations SET revoked_at = ((revoked_at AT TIME ZONE 'Asia/Tokyo')::text || '+09')::timestamptz WHERE request_id = '{tz}'"
    ));
    // Green columns the plan does not map (defaults) are not compared.
    g.psql("UPDATE oauth2_access_tokens SET migrated_at = now() - interval '1 year'");

    let r = run(&mut s.migrate(&["verify", plan.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    for expected in [
        "key (3): column name differs: blue \"",
        "green \"tampered\"",
        &format!("key ({missing}): missing on green"),
        "key (extra-1): extra on green",
        &format!("key ({nulled}): column subject differs: blue NULL green \"\""),
    ] {
        assert!(r.stdout.contains(expected), "missing `{expected}`:\n{r:?}");
    }
    let j = run(&mut s.migrate(&["verify", plan.to_str().unwrap(), "--format", "json"]));
    let v: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
    let total: u64 = v["tables"].as_array().unwrap().iter().map(|t| t["differences_total"].as_u64().unwrap()).sum();
    assert_eq!(total, 4, "exactly the four real differences: {}", j.stdout);
    let bad = s.green.psql(
        &s.sql("SELECT string_agg(DISTINCT tbl, ',' ORDER BY tbl) FROM bluegreen_oauth_v2.verified WHERE NOT ok"),
    );
    assert_eq!(bad, "public.oauth2_access_tokens,public.oauth2_clients,public.oauth2_revocations");
}

#[test]
fn no_false_differences_under_live_writes() {
    let s = Oauth::new(10_000);
    let plan = s.plan_with_copy("workers = 2\nchunk_rows = 2000\ndefer_indexes = true");
    let mut child = s.spawn(&["copy", plan.to_str().unwrap()]);
    s.wait_phase("following");
    let writer = Writer::start(s.blue.url(), Duration::from_millis(3));
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        let r = run(s.migrate(&["verify", plan.to_str().unwrap()]).env("MIGRATE_LOG", "bluegreen=debug"));
        assert_eq!(r.code, 0, "round {round}: a false difference under live writes:\n{r:?}");
    }
    writer.stop();
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Rechecks are decided from positions: a follower whose progress reports lag (retries after a
/// deadlock or a lost connection kept it silent for ~10 s) still gets its changes rechecked,
/// instead of every change not yet applied being reported as a difference.
#[test]
fn no_false_differences_while_the_follower_report_is_stale() {
    let s = Oauth::new(10_000);
    let plan = s.plan_with_copy("workers = 2\nchunk_rows = 2000\ndefer_indexes = true");
    let mut child = s.spawn(&["copy", plan.to_str().unwrap()]);
    s.wait_phase("following");
    let writer = Writer::start(s.blue.url(), Duration::from_millis(2));
    // Keeps the follower's last report 30 s old, as a follower stuck in retries would leave it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let staler = {
        let (stop, url, sql) = (
            stop.clone(),
            s.green.url(),
            s.sql("UPDATE bluegreen_oauth_v2.migration SET follower_seen_at = now() - interval '30 seconds'"),
        );
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = std::process::Command::new("psql").args([url.as_str(), "-X", "-q", "-c", &sql]).output();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    for round in 0..2 {
        std::thread::sleep(Duration::from_millis(500));
        let r = run(s.migrate(&["verify", plan.to_str().unwrap()]).env("MIGRATE_LOG", "bluegreen=debug"));
        assert_eq!(r.code, 0, "round {round}: a false difference with a stale follower report:\n{r:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    staler.join().unwrap();
    writer.stop();
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `verify --changed`: after a clean verify, only the keys applied since are compared, under
/// live writes without false differences; a changed key that green holds wrong is named; a key
/// nobody changed is not looked at (the full verify finds it); the check forgets what it found
/// equal, so a second one looks at fewer keys.
#[test]
fn verify_changed_checks_only_keys_applied_since_the_last_clean_verify() {
    let s = Oauth::new(10_000);
    let plan = s.plan_with_copy("workers = 2\nchunk_rows = 2000\ndefer_indexes = true");
    let p = plan.to_str().unwrap();
    let mut child = s.spawn(&["copy", p]);
    s.wait_phase("following");
    let r = run(&mut s.migrate(&["verify", p]));
    assert_eq!(r.code, 0, "{r:?}");
    let writer = Writer::start(s.blue.url(), Duration::from_millis(3));
    std::thread::sleep(Duration::from_secs(2));
    let r = run(&mut s.migrate(&["verify", p, "--changed"]));
    assert_eq!(r.code, 0, "a false difference under live writes:\n{r:?}");
    let checked = |out: &str| -> usize {
        out.lines()
            .filter_map(|l| l.split_once(" key(s) changed since its last clean verify checked"))
            .map(|(head, _)| head.split_whitespace().last().unwrap_or("0").parse::<usize>().unwrap_or(0))
            .sum()
    };
    assert!(checked(&r.stdout) > 0, "no changed key was checked: {r:?}");
    writer.stop();
    std::thread::sleep(Duration::from_secs(2));
    let r = run(&mut s.migrate(&["verify", p, "--changed"]));
    assert_eq!(r.code, 0, "{r:?}");
    // Everything found equal is forgotten: nothing is left to check.
    let r = run(&mut s.migrate(&["verify", p, "--changed"]));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(checked(&r.stdout), 0, "equal keys were not forgotten: {r:?}");
    // A revocation changed on blue and applied; then green's copy of it is damaged by hand.
    s.blue.psql("UPDATE hydra_oauth2_revocation SET reason = 'changed' WHERE request_id = (SELECT min(request_id) FROM hydra_oauth2_revocation)");
    std::thread::sleep(Duration::from_secs(2));
    let changed_key = s.blue.psql("SELECT min(request_id) FROM hydra_oauth2_revocation");
    s.green.psql(&format!("UPDATE oauth2_revocations SET reason = 'damaged' WHERE request_id = '{changed_key}'"));
    // And one nobody changed.
    let untouched = s.green.psql("SELECT max(request_id) FROM oauth2_revocations");
    s.green.psql(&format!("UPDATE oauth2_revocations SET reason = 'damaged too' WHERE request_id = '{untouched}'"));
    let r = run(&mut s.migrate(&["verify", p, "--changed"]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains(&format!("key ({changed_key}): column reason differs")), "{r:?}");
    assert!(!r.stdout.contains(&format!("key ({untouched})")), "--changed looked at a key nobody changed: {r:?}");
    assert!((1..=3).contains(&checked(&r.stdout)), "only the changed key should be checked: {r:?}");
    let r = run(&mut s.migrate(&["verify", p]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains(&format!("key ({untouched}): column reason differs")), "{r:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A row green holds with a NULL key (its key is a nullable unique index: rows the v2
/// application wrote) is reported as extra on green; verify does not fail on it.
#[test]
fn a_null_key_on_green_is_reported_not_fatal() {
    let c = crate::support::Custom::new(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 500) g;",
        "CREATE TABLE t (id int UNIQUE, v text);",
    );
    let plan = c.plan("trigger", "workers = 1", "[[table]]\nsource = \"public.t\"\nkey = [\"id\"]\n");
    let p = plan.to_str().unwrap();
    let r = run(&mut c.migrate(&["copy", p, "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    c.green.psql("INSERT INTO t VALUES (NULL, 'v2 row')");
    let r = run(&mut c.migrate(&["verify", p]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("extra on green"), "{r:?}");
}
