//! `migrate copy` against real clusters: the transformed copy is exact, indexes come back,
//! a SIGKILLed copy resumes without copying anything twice, and a second copy is refused.

use std::time::{Duration, Instant};

use crate::support::{run, Oauth};

#[test]
fn copy_makes_green_equal_transform_of_blue() {
    let s = Oauth::new(20_000);
    // Small chunks so every table with rows spans several chunks and both workers work.
    let plan = s.plan_with_copy("workers = 2\nchunk_rows = 1500\ndefer_indexes = true");
    let r = run(&mut s.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    s.assert_green_equals_blue();
    // Exercised the interesting values (so the fingerprint compared something real).
    let toasted: i64 = s
        .green
        .psql("SELECT count(*) FROM oauth2_access_tokens WHERE pg_column_size(session_data) > 2000")
        .parse()
        .unwrap();
    assert!(toasted > 10, "no TOASTed values copied");
    let unicode: i64 = s.green.psql("SELECT count(*) FROM oauth2_clients WHERE name ~ '[^[:ascii:]]'").parse().unwrap();
    assert!(unicode > 0, "no unicode values copied");
    let expired_on_blue: i64 = s
        .blue
        .psql("SELECT count(*) FROM hydra_oauth2_access WHERE requested_at < now() - interval '90 days'")
        .parse()
        .unwrap();
    assert!(expired_on_blue > 0);
    // Deferred indexes and constraints are back, foreign keys validated.
    let idx = s.green.psql("SELECT string_agg(indexrelid::regclass::text, ',' ORDER BY 1) FROM pg_index WHERE indrelid = 'oauth2_access_tokens'::regclass");
    for name in [
        "oauth2_access_tokens_pkey",
        "oauth2_access_tokens_client_id_idx",
        "oauth2_access_tokens_requested_at_idx",
        "oauth2_access_tokens_subject_idx",
    ] {
        assert!(idx.contains(name), "{name} missing: {idx}");
    }
    // (The flow tables' foreign key belongs to another plan.)
    assert_eq!(
        s.green.psql(
            "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND convalidated \
             AND conrelid <> 'hydra_oauth2_flow_context'::regclass"
        ),
        "2"
    );
    // Several chunks per table, all done.
    let chunks = s.green.psql(&s.sql("SELECT count(*) || '/' || count(*) FILTER (WHERE done) FROM bluegreen_oauth_v2.chunks WHERE tbl = 'public.oauth2_access_tokens'"));
    let (all, done) = chunks.split_once('/').unwrap();
    assert!(all.parse::<i32>().unwrap() >= 10 && all == done, "{chunks}");
    // status reads the same from state.
    let st = run(&mut s.migrate(&["status", plan.to_str().unwrap(), "--format", "json"]));
    assert_eq!(st.code, 0, "{st:?}");
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    let access = v["tables"].as_array().unwrap().iter().find(|t| t["table"] == "public.oauth2_access_tokens").unwrap();
    let green_rows: i64 = s.green.psql("SELECT count(*) FROM oauth2_access_tokens").parse().unwrap();
    assert_eq!(access["rows_copied"].as_i64().unwrap(), green_rows);
    assert!(access["rows_estimated"].as_i64().unwrap() > 0);
}

#[test]
fn copy_without_deferred_indexes_is_equal_too() {
    let s = Oauth::new(5_000);
    let plan = s.plan_with_copy("workers = 1\nchunk_rows = 2000\ndefer_indexes = false");
    let r = run(&mut s.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    // `copy PLAN 2>copy.log`: logs, and not one escape character.
    assert!(r.stderr.contains("INFO") && r.stderr.contains("copy finished"), "{r:?}");
    assert!(!r.stderr.contains('\x1b'), "ANSI escapes in a redirected log:\n{}", r.stderr);
    assert!(r.stdout.is_empty(), "copy's logs reached stdout:\n{}", r.stdout);
    s.assert_green_equals_blue();
}

#[test]
fn sigkilled_copy_resumes_and_copies_nothing_twice() {
    let s = Oauth::new(20_000);
    // Throttled so the kill lands mid-copy.
    let plan = s.plan_with_copy("workers = 2\nchunk_rows = 1000\ndefer_indexes = true\nmax_rows_per_second = 8000");
    let mut child = s.spawn(&["copy", plan.to_str().unwrap(), "--no-follow"]);
    let started = Instant::now();
    loop {
        let has_state = s.green.psql(&s.sql("SELECT to_regclass('bluegreen_oauth_v2.chunks') IS NOT NULL")) == "t";
        let done: i64 = if has_state {
            s.green.psql(&s.sql("SELECT count(*) FROM bluegreen_oauth_v2.chunks WHERE done")).parse().unwrap()
        } else {
            0
        };
        if done >= 5 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "copy made no progress");
        assert!(child.try_wait().unwrap().is_none(), "copy finished before it could be killed; slow it down");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let total: i64 = s.green.psql(&s.sql("SELECT count(*) FROM bluegreen_oauth_v2.chunks")).parse().unwrap();
    let done: i64 = s.green.psql(&s.sql("SELECT count(*) FROM bluegreen_oauth_v2.chunks WHERE done")).parse().unwrap();
    assert!(done < total, "kill came too late: {done}/{total}");
    let killed_at = s.green.psql("SELECT now()");
    let before: String = s.green.psql(&s.sql("SELECT string_agg(tbl || ':' || chunk || ':' || finished_at, ',' ORDER BY tbl, chunk) FROM bluegreen_oauth_v2.chunks WHERE done"));

    let plan2 = s.plan_with_copy("workers = 2\nchunk_rows = 1000\ndefer_indexes = true");
    let r = run(&mut s.migrate(&["copy", plan2.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    // Chunks finished before the kill were not redone: same rows, same finish times.
    let after: String = s.green.psql(&s.sql(&format!(
        "SELECT string_agg(tbl || ':' || chunk || ':' || finished_at, ',' ORDER BY tbl, chunk) \
         FROM bluegreen_oauth_v2.chunks WHERE done AND finished_at <= '{killed_at}'::timestamptz"
    )));
    assert_eq!(before, after, "chunks committed before the kill were copied again");
    let all_done: i64 =
        s.green.psql(&s.sql("SELECT count(*) FROM bluegreen_oauth_v2.chunks WHERE NOT done")).parse().unwrap();
    assert_eq!(all_done, 0);
    s.assert_green_equals_blue();
}

#[test]
fn second_copy_of_the_same_plan_is_refused() {
    let s = Oauth::new(5_000);
    let plan = s.plan_with_copy("workers = 1\nchunk_rows = 500\ndefer_indexes = true\nmax_rows_per_second = 2000");
    let mut first = s.spawn(&["copy", plan.to_str().unwrap(), "--no-follow"]);
    let started = Instant::now();
    while s.green.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == "0" {
        assert!(started.elapsed() < Duration::from_secs(30), "first copy never took its lock");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = run(&mut s.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains(&format!("another `migrate copy` of plan `{}` is running", s.name())), "{r:?}");
    first.kill().unwrap();
    first.wait().unwrap();
}

/// A copy that fails (exit 3) is shown by `status` with its error until the next copy starts,
/// and with `--log-format json` its last stderr line is JSON too.
#[test]
fn status_shows_a_failed_copy_and_json_logs_stay_json() {
    let c = crate::support::Custom::new(
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL); INSERT INTO t SELECT g, g FROM generate_series(1, 100) g; \
         UPDATE t SET v = -1 WHERE id = 50;",
        "CREATE TABLE t (id bigint PRIMARY KEY, v int NOT NULL CONSTRAINT v_positive CHECK (v >= 0));",
    );
    let plan = c.plan(
        "logical",
        "",
        "[[table]]\nsource = \"public.t\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\nv = \"v\"\n",
    );
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow", "--log-format", "json"]));
    assert_eq!(r.code, 3, "{r:?}");
    let last = r.stderr.lines().last().unwrap_or_default();
    let line: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {last}"));
    assert_eq!(line["level"], "ERROR", "{last}");
    assert!(line["fields"]["error"].as_str().is_some_and(|e| e.contains("v_positive")), "{last}");

    let r = run(&mut c.migrate(&["status", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("FAILED: `copy` exited at") && r.stdout.contains("v_positive"), "{r:?}");
    let r = run(&mut c.migrate(&["status", plan.to_str().unwrap(), "--format", "json"]));
    let st: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(st["last_error"]["command"], "copy", "{st}");

    // Fixed, the next copy runs to the end and the failure is gone from status.
    c.green.psql("ALTER TABLE t DROP CONSTRAINT v_positive");
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    let r = run(&mut c.migrate(&["status", plan.to_str().unwrap()]));
    assert!(!r.stdout.contains("FAILED"), "{r:?}");
}
