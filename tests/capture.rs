//! Capture and apply against real clusters, with a concurrent writer on blue during the copy and
//! after it, for both capture methods: once the writer stops and lag is 0, green equals
//! transform(blue) by an independent fingerprint.

use std::{
    process::Child,
    time::{Duration, Instant},
};

use crate::support::{replace_once, run, writer::Writer, Oauth};

pub(crate) fn spawn_copy(s: &Oauth, plan: &std::path::Path, extra: &[&str]) -> Child {
    let mut args = vec!["copy", plan.to_str().unwrap()];
    args.extend_from_slice(extra);
    s.spawn(&args)
}

pub(crate) fn status(s: &Oauth, plan: &std::path::Path) -> serde_json::Value {
    let r = run(&mut s.migrate(&["status", plan.to_str().unwrap(), "--format", "json"]));
    assert_eq!(r.code, 0, "{r:?}");
    serde_json::from_str(&r.stdout).unwrap()
}

/// Waits until `pred(status)` holds, failing with the last status after `limit`.
pub(crate) fn wait_for(
    s: &Oauth,
    plan: &std::path::Path,
    child: &mut Child,
    limit: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) {
    let started = Instant::now();
    loop {
        let st = status(s, plan);
        if pred(&st) {
            return;
        }
        if let Some(code) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            panic!("migrate copy exited ({code}) while waiting for {what}:\n{err}");
        }
        assert!(started.elapsed() < limit, "timed out waiting for {what}; last status: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub(crate) fn caught_up(st: &serde_json::Value) -> bool {
    st["phase"] == "following"
        && st["capture"]["lag_bytes"] == 0
        && st["capture"]["pending_keys"] == 0
        && st["capture"]["follower_seen_seconds_ago"].as_f64().is_some_and(|s| s < 1.0)
}

/// Sends SIGINT, waits for exit 0 and returns what the process wrote to stderr.
pub(crate) fn sigint_and_wait(child: &mut Child) -> String {
    let ok = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success();
    assert!(ok);
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            assert!(status.success(), "copy did not exit 0 on SIGINT: {status}\n{err}");
            return err;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "copy did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn plan_for(s: &Oauth, method: &str) -> std::path::PathBuf {
    let text = replace_once(
        &Oauth::plan_text(),
        "workers = 2\nchunk_rows = 50000",
        "workers = 2\nchunk_rows = 1000\nmax_rows_per_second = 6000",
    );
    let text = replace_once(&text, "method = \"auto\"", &format!("method = \"{method}\""));
    s.write_plan(&text)
}

/// Writer during the copy and after it; green converges.
fn writes_during_and_after_copy(method: &str) {
    let s = Oauth::new(20_000);
    let plan = plan_for(&s, method);
    let mut child = spawn_copy(&s, &plan, &[]);
    // The writer starts once capture exists (the state schema appears after setup).
    let writer = {
        let started = Instant::now();
        while s.green.psql(&s.sql("SELECT to_regclass('bluegreen_oauth_v2.chunks') IS NOT NULL")) != "t" {
            assert!(started.elapsed() < Duration::from_secs(30), "copy never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        Writer::start(s.blue.url(), Duration::from_millis(2))
    };
    wait_for(&s, &plan, &mut child, Duration::from_secs(120), "the copy to finish", |st| st["phase"] == "following");
    // Keep writing while following.
    writer.run_for(Duration::from_secs(2), 200, Duration::from_secs(60));
    let ops = writer.stop();
    assert!(ops > 200, "writer did too little: {ops}");
    std::thread::sleep(Duration::from_millis(1500));
    wait_for(&s, &plan, &mut child, Duration::from_secs(60), "lag 0", caught_up);
    sigint_and_wait(&mut child);
    s.assert_green_equals_blue();
    // The late-committing transactions made it.
    assert!(
        s.green.psql("SELECT count(*) FROM oauth2_access_tokens WHERE signature LIKE 'late-%'").parse::<i64>().unwrap()
            > 0
    );
    // Something was really applied, not only copied.
    let applied: i64 = s.green.psql(&s.sql("SELECT applied_keys FROM bluegreen_oauth_v2.migration")).parse().unwrap();
    assert!(applied > 50, "applied only {applied} keys");
}

#[test]
fn logical_capture_converges_under_writes() {
    writes_during_and_after_copy("logical");
}

#[test]
fn trigger_capture_converges_under_writes() {
    writes_during_and_after_copy("trigger");
}

/// SIGKILL of the follower while the writer runs, then restart: nothing lost.
fn killed_follower_converges(method: &str) {
    let s = Oauth::new(5_000);
    let plan = plan_for(&s, method);
    let mut child = spawn_copy(&s, &plan, &[]);
    wait_for(&s, &plan, &mut child, Duration::from_secs(60), "following", |st| st["phase"] == "following");
    let writer = Writer::start(s.blue.url(), Duration::from_millis(2));
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let mut child = spawn_copy(&s, &plan, &[]);
    writer.run_for(Duration::from_secs(2), 100, Duration::from_secs(60));
    let ops = writer.stop();
    assert!(ops > 100, "writer did too little: {ops}");
    std::thread::sleep(Duration::from_millis(1500));
    wait_for(&s, &plan, &mut child, Duration::from_secs(60), "lag 0 after restart", caught_up);
    sigint_and_wait(&mut child);
    s.assert_green_equals_blue();
}

#[test]
fn logical_follower_killed_and_restarted_loses_nothing() {
    killed_follower_converges("logical");
}

#[test]
fn trigger_follower_killed_and_restarted_loses_nothing() {
    killed_follower_converges("trigger");
}

#[test]
fn no_follow_exits_once_green_has_what_blue_committed() {
    let s = Oauth::new(5_000);
    // About 6,800 rows at 2,000 a second: the copy runs for seconds after its first chunk.
    let plan = s.write_plan(&replace_once(
        &Oauth::plan_text(),
        "workers = 2\nchunk_rows = 50000",
        "workers = 2\nchunk_rows = 1000\nmax_rows_per_second = 2000",
    ));
    let writer = Writer::start(s.blue.url(), Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(300));
    // The writer keeps going while the copy runs, and stops once a chunk is done: before the
    // copy's end (a writer stopped after it would leave green short, and prove nothing).
    let mut child = spawn_copy(&s, &plan, &["--no-follow"]);
    let started = Instant::now();
    let chunk_done = || {
        s.green.psql(&s.sql("SELECT to_regclass('bluegreen_oauth_v2.chunks') IS NOT NULL")) == "t"
            && s.green.psql(&s.sql("SELECT coalesce(bool_or(done), false) FROM bluegreen_oauth_v2.chunks")) == "t"
    };
    while !chunk_done() {
        assert!(started.elapsed() < Duration::from_secs(60), "no chunk was copied");
        assert!(child.try_wait().unwrap().is_none(), "the copy ended before a chunk was seen");
        std::thread::sleep(Duration::from_millis(20));
    }
    writer.stop();
    // Still copying, so `--no-follow`'s target (blue's position when the copy ends) lies after
    // every write.
    assert_eq!(
        s.green.psql(&s.sql("SELECT state->>'phase' FROM bluegreen_oauth_v2.migration")),
        "copying",
        "the copy ended before the writer stopped"
    );
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "--no-follow did not exit");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    s.assert_green_equals_blue();
}

#[test]
fn truncate_on_blue_stops_following_with_a_clear_error() {
    let s = Oauth::new(2_000);
    let plan = plan_for(&s, "logical");
    let mut child = spawn_copy(&s, &plan, &[]);
    wait_for(&s, &plan, &mut child, Duration::from_secs(60), "following", |st| st["phase"] == "following");
    s.blue.psql("TRUNCATE hydra_oauth2_revocation");
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "following went on after TRUNCATE");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("TRUNCATE of public.hydra_oauth2_revocation"), "{err}");
}

#[test]
fn cleanup_removes_everything_from_blue_and_green() {
    let s = Oauth::new(2_000);
    let plan = plan_for(&s, "trigger");
    let r = run(&mut s.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    // An application role with rights on its table only still writes: capture never makes the
    // application's writes fail (regression: the trigger once needed rights on our schema).
    let role = format!("app_{}", s.blue.name);
    s.blue.psql(&format!(
        "CREATE ROLE {role}; GRANT SELECT, INSERT, UPDATE, DELETE ON hydra_oauth2_revocation TO {role}; \
         SET ROLE {role}; INSERT INTO hydra_oauth2_revocation VALUES ('by-app-role', now(), 'x'); \
         UPDATE hydra_oauth2_revocation SET reason = 'y' WHERE request_id = 'by-app-role'; RESET ROLE"
    ));
    assert_eq!(s.blue.psql(&s.sql("SELECT count(*) > 0 FROM bluegreen_oauth_v2.changes")), "t");
    let logical = s.write_plan(&Oauth::plan_text());
    // A logical setup too, so both kinds of objects exist.
    s.green.psql(&s.sql("DROP SCHEMA bluegreen_oauth_v2 CASCADE; TRUNCATE oauth2_clients, oauth2_access_tokens, oauth2_refresh_tokens, oauth2_consent_sessions, oauth2_revocations, jwk_sets, app_events"));
    let r = run(&mut s.migrate(&["copy", logical.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    // An orphaned slot: status warns (threshold 1 byte here) and names the command that fixes it.
    let warn = s.write_plan(&replace_once(
        &Oauth::plan_text(),
        "method = \"auto\"",
        "method = \"auto\"\nwarn_retained_bytes = 1",
    ));
    s.blue.psql("UPDATE hydra_oauth2_revocation SET reason = 'wal' WHERE request_id = 'by-app-role'");
    let st = run(&mut s.migrate(&["status", warn.to_str().unwrap()]));
    assert_eq!(st.code, 0, "{st:?}");
    assert!(st.stdout.contains("WARNING: capture holds") && st.stdout.contains("migrate cleanup"), "{st:?}");
    let st = run(&mut s.migrate(&["status", logical.to_str().unwrap(), "--format", "json"]));
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert!(v["blue"]["retained_bytes"].as_i64().unwrap() > 0 && v["blue"]["warning"].is_null(), "{v}");
    let r = run(&mut s.migrate(&["cleanup", logical.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    let db = &s.blue.name;
    assert_eq!(s.blue.psql(&format!("SELECT count(*) FROM pg_replication_slots WHERE database = '{db}'")), "0");
    assert_eq!(s.blue.psql("SELECT count(*) FROM pg_publication"), "0");
    assert_eq!(s.blue.psql("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'bluegreen%'"), "0");
    assert_eq!(s.blue.psql("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bluegreen%'"), "0");
    assert_eq!(s.green.psql("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bluegreen%'"), "0");
    s.blue.psql(&format!("DROP OWNED BY {role}; DROP ROLE {role}"));
    // Blue keeps working: the tables are the application's, untouched.
    s.blue.psql("UPDATE hydra_oauth2_access SET active = active WHERE signature = (SELECT min(signature) FROM hydra_oauth2_access)");
}

#[test]
fn cleanup_refuses_while_copy_runs() {
    let s = Oauth::new(2_000);
    let plan = plan_for(&s, "logical");
    let mut copy = spawn_copy(&s, &plan, &[]);
    wait_for(&s, &plan, &mut copy, Duration::from_secs(60), "following", |st| st["phase"] == "following");
    let r = run(&mut s.migrate(&["cleanup", plan.to_str().unwrap()]));
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("--force") && r.stderr.contains("is running"), "{r:?}");
    let slots = s.blue.psql(&format!("SELECT count(*) FROM pg_replication_slots WHERE database = '{}'", s.blue.name));
    assert_eq!(slots, "1", "cleanup removed the slot of a running copy");
    sigint_and_wait(&mut copy);
    let r = run(&mut s.migrate(&["cleanup", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
}

/// `[capture] ddl_lock_timeout` and `ddl_attempts` bound how long trigger installation waits
/// behind a transaction holding the table (the application's writes queue behind the wait).
#[test]
fn trigger_install_lock_wait_follows_the_plan_knobs() {
    let c = crate::support::Custom::new(
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10);",
        "CREATE TABLE t (id bigint PRIMARY KEY);",
    );
    let mut holder = c
        .blue
        .cluster
        .psql_cmd(&c.blue.name)
        .args(["-c", "BEGIN; LOCK TABLE t IN ROW EXCLUSIVE MODE; SELECT pg_sleep(300); COMMIT;"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The lock is held before the copy starts (not assumed after a fixed sleep).
    let held = "SELECT count(*) FROM pg_locks WHERE relation = 't'::regclass AND mode = 'RowExclusiveLock' \
                AND granted AND pid <> pg_backend_pid()";
    let started = std::time::Instant::now();
    while c.blue.psql(held) != "1" {
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "the holder never took its lock");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let plan = c.plan(
        "trigger",
        "",
        "ddl_lock_timeout = \"100ms\"\nddl_attempts = 2\n[[table]]\nsource = \"public.t\"\nkey = [\"id\"]\n\
         [table.columns]\nid = \"id\"\n",
    );
    let started = std::time::Instant::now();
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    let took = started.elapsed();
    // Killing psql leaves its backend sleeping: end the backend.
    c.blue.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE '%pg_sleep(300)%' AND pid <> pg_backend_pid()");
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("table lock not granted in 2 attempts"), "{r:?}");
    // Far under the holder's 300 s (a loaded machine starts `migrate` slowly).
    assert!(took < std::time::Duration::from_secs(60), "gave up after {took:?}, not after two short waits");
}
