//! Correctness holes found adversarially, each test named for what broke: rows lost to a heap
//! rewrite during a resumed copy, key changes to equal-comparing values, keys mapped to another
//! type, float keys rounded by a writer's session, verify confused by a column named `r` or by
//! enums. Each proves green equal to transform(blue) with an independent query.

use std::{
    io::{BufRead, BufReader},
    time::{Duration, Instant},
};

use crate::support::{fingerprint, run, Custom};

fn copy_no_follow(c: &Custom, plan: &std::path::Path) {
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
}

/// Reads `child`'s stderr in a thread: the receiver gets a message when a line matches `seen`;
/// the thread returns all of it once the child ends.
pub(crate) fn watch_stderr(
    child: &mut std::process::Child,
    seen: impl Fn(&str) -> bool + Send + 'static,
) -> (std::sync::mpsc::Receiver<()>, std::thread::JoinHandle<String>) {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if seen(&line) {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    (rx, reader)
}

fn assert_same(c: &Custom, blue: &str, green: &str) {
    assert_eq!(
        fingerprint(&c.blue, blue),
        fingerprint(&c.green, green),
        "green differs from transform(blue)\nblue:  {blue}\ngreen: {green}"
    );
}

const CITEXT: &str = "CREATE EXTENSION IF NOT EXISTS citext;
    CREATE TABLE users (email citext PRIMARY KEY, n int NOT NULL);
    CREATE TABLE amounts (v numeric PRIMARY KEY, note text);";

fn equal_comparing_key_change(method: &str) {
    let c = Custom::new(
        &format!(
            "{CITEXT}
             INSERT INTO users VALUES ('alice@example.com', 1), ('bob@x', 2), ('dave@z', 3);
             INSERT INTO amounts VALUES (1.0, 'one'), (2.5, 'two and a half');"
        ),
        CITEXT,
    );
    let plan = c.plan(
        method,
        "workers = 1",
        "[[table]]\nsource = \"public.users\"\nkey = [\"email\"]\n[table.columns]\nemail = \"email\"\nn = \"n\"\n\
         [[table]]\nsource = \"public.amounts\"\nkey = [\"v\"]\n[table.columns]\nv = \"v\"\nnote = \"note\"\n",
    );
    copy_no_follow(&c, &plan);
    c.blue.psql(
        "UPDATE users SET email = 'ALICE@EXAMPLE.COM' WHERE email = 'alice@example.com';
         UPDATE amounts SET v = 1.00 WHERE v = 1.0;",
    );
    copy_no_follow(&c, &plan);
    // Compared as text: the independent check sees the case and the scale.
    assert_same(&c, "SELECT email::text, n FROM users", "SELECT email::text, n FROM users");
    assert_same(&c, "SELECT v::text, note FROM amounts", "SELECT v::text, note FROM amounts");
    let r = run(&mut c.migrate(&["verify", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    // A green tamper that compares equal is a difference too.
    c.green.psql("UPDATE users SET email = 'DAVE@Z' WHERE email = 'dave@z'");
    let r = run(&mut c.migrate(&["verify", plan.to_str().unwrap()]));
    assert_eq!(r.code, 1, "verify missed a key whose text changed on green:\n{r:?}");
    assert!(r.stdout.contains("dave@z") || r.stdout.contains("DAVE@Z"), "{r:?}");
}

#[test]
fn key_change_to_an_equal_comparing_value_reaches_green_logical() {
    equal_comparing_key_change("logical");
}

#[test]
fn key_change_to_an_equal_comparing_value_reaches_green_trigger() {
    equal_comparing_key_change("trigger");
}

fn float_key_onto_numeric(method: &str) {
    let c = Custom::new(
        "CREATE TABLE f (k float8 PRIMARY KEY, n int);
         INSERT INTO f VALUES (0.1, 1), (1.0/3, 2), (0.3, 3), (2.0/3, 4);",
        "CREATE TABLE f (k numeric PRIMARY KEY, n int);",
    );
    let plan = c.plan(
        method,
        "workers = 1",
        "[[table]]\nsource = \"public.f\"\nkey = [\"k\"]\n[table.columns]\nk = \"k\"\nn = \"n\"\n",
    );
    copy_no_follow(&c, &plan);
    c.blue.psql(
        "DELETE FROM f WHERE k = 1.0/3;
         UPDATE f SET k = 0.7 WHERE k = 0.3;
         UPDATE f SET n = 40 WHERE k = 2.0/3;",
    );
    copy_no_follow(&c, &plan);
    // Copy's transform casts the value: the independent query does the same.
    assert_same(&c, "SELECT k::numeric, n FROM f", "SELECT k, n FROM f");
}

#[test]
fn float_key_mapped_to_numeric_keeps_one_row_per_key_logical() {
    float_key_onto_numeric("logical");
}

#[test]
fn float_key_mapped_to_numeric_keeps_one_row_per_key_trigger() {
    float_key_onto_numeric("trigger");
}

#[test]
fn trigger_capture_keeps_float_keys_written_with_extra_float_digits_0() {
    let schema = "CREATE TABLE g (k float8 PRIMARY KEY, n int NOT NULL);";
    let c = Custom::new(&format!("{schema} INSERT INTO g SELECT i / 7.0, i FROM generate_series(1, 7) i;"), schema);
    let plan = c.plan(
        "trigger",
        "workers = 1",
        "[[table]]\nsource = \"public.g\"\nkey = [\"k\"]\n[table.columns]\nk = \"k\"\nn = \"n\"\n",
    );
    copy_no_follow(&c, &plan);
    // The application's session rounds floats in its text output.
    c.blue.psql("SET extra_float_digits = 0; UPDATE g SET n = n * 100;");
    copy_no_follow(&c, &plan);
    assert_same(&c, "SELECT k, n FROM g", "SELECT k, n FROM g");
    assert_eq!(c.green.psql("SELECT count(*) FROM g WHERE n >= 100"), "7");
}

#[test]
fn a_column_named_r_and_enum_columns_verify_without_false_alarms_or_misses() {
    // Green gets an extra type first, so the enum's OIDs differ between the clusters.
    let tables = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        CREATE TABLE withjson (id int PRIMARY KEY, r int, doc json);
        CREATE TABLE withenum (id int PRIMARY KEY, r int, m mood, ms mood[]);";
    let c = Custom::new(
        &format!(
            "{tables}
             INSERT INTO withjson SELECT i, i % 3, json_build_object('i', i) FROM generate_series(1, 1000) i;
             INSERT INTO withenum SELECT i, i % 3, (ARRAY['sad', 'ok', 'happy'])[1 + i % 3]::mood,
                    ARRAY['ok', 'happy']::mood[] FROM generate_series(1, 1000) i;"
        ),
        &format!("CREATE TYPE other AS ENUM ('x'); {tables}"),
    );
    let entries = "[[table]]\nsource = \"public.withjson\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\nr = \"r\"\ndoc = \"doc\"\n\
                   [[table]]\nsource = \"public.withenum\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\nr = \"r\"\nm = \"m\"\nms = \"ms\"\n";
    let plan = c.plan("logical", "workers = 1", entries);
    copy_no_follow(&c, &plan);
    let r = run(&mut c.migrate(&["verify", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "false differences:\n{r:?}");
    c.green.psql(
        "UPDATE withjson SET doc = '{\"tampered\": true}' WHERE id = 7;
         UPDATE withenum SET m = CASE WHEN m = 'happy' THEN 'sad' ELSE 'happy' END::mood WHERE id = 9;",
    );
    let r = run(&mut c.migrate(&["verify", plan.to_str().unwrap(), "--format", "json"]));
    assert_eq!(r.code, 1, "tampering missed:\n{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let keys = |table: &str| -> Vec<String> {
        v["tables"].as_array().unwrap().iter().find(|t| t["table"] == table).unwrap()["differences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["key"][0].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(keys("public.withjson"), vec!["7"], "{}", r.stdout);
    assert_eq!(keys("public.withenum"), vec!["9"], "{}", r.stdout);
}

#[test]
fn heap_rewrite_during_a_resumed_copy_loses_no_rows() {
    let schema = "CREATE TABLE big (id int PRIMARY KEY, pad text NOT NULL);";
    let c = Custom::new(
        &format!("{schema} INSERT INTO big SELECT i, repeat('x', 200) FROM generate_series(1, 30000) i; ANALYZE big;"),
        schema,
    );
    let plan = c.plan(
        "logical",
        "workers = 1\nchunk_rows = 3000\nmax_rows_per_second = 6000",
        "[[table]]\nsource = \"public.big\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\npad = \"pad\"\n",
    );
    // Run 1 copies a few chunks and is killed.
    let mut child = c.spawn(&["copy", plan.to_str().unwrap(), "--no-follow"], &[]);
    let started = Instant::now();
    loop {
        let has = c.green.psql(&c.sql("SELECT to_regclass('bluegreen_custom.chunks') IS NOT NULL")) == "t";
        let done: i64 = if has {
            c.green.psql(&c.sql("SELECT count(*) FROM bluegreen_custom.chunks WHERE done")).parse().unwrap()
        } else {
            0
        };
        if done >= 3 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "run 1 did not copy 3 chunks");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done_until: i64 =
        c.green.psql(&c.sql("SELECT max(end_block) FROM bluegreen_custom.chunks WHERE done")).parse().unwrap();
    assert!(
        c.green.psql(&c.sql("SELECT count(*) FROM bluegreen_custom.chunks WHERE NOT done")) != "0",
        "run 1 finished before it was killed"
    );
    // Rows of the copied chunks go on blue; a rewrite would move later rows into those blocks.
    c.blue.psql(&format!("DELETE FROM big WHERE ctid < '({done_until},0)'::tid"));
    // Run 2 stalls right after exporting its snapshot; VACUUM FULL rewrites the table then.
    let mut child = c.spawn(
        &["copy", plan.to_str().unwrap(), "--no-follow"],
        &[("MIGRATE_FAULT", "copy.snapshot-exported:sleep=3000"), ("MIGRATE_LOG", "info")],
    );
    let (rx, reader) = watch_stderr(&mut child, |line| line.contains("stalling at copy.snapshot-exported"));
    rx.recv_timeout(Duration::from_secs(60)).expect("run 2 never reached its snapshot");
    let blue = c.blue.url();
    let vacuum = std::thread::spawn(move || vacuum_full(&blue, "big"));
    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    vacuum.join().unwrap();
    assert!(status.success(), "run 2 failed:\n{log}");
    assert_same(&c, "SELECT id, pad FROM big", "SELECT id, pad FROM big");
    let r = run(&mut c.migrate(&["verify", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
}

/// VACUUM FULL on blue from another session (it waits for the copy's locks when it must).
fn vacuum_full(url: &str, table: &str) {
    let out = std::process::Command::new("psql")
        .args([url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", &format!("VACUUM FULL {table}")])
        .output()
        .expect("psql");
    assert!(out.status.success(), "VACUUM FULL failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn prepared_transaction_is_named(method: &str) {
    let schema = "CREATE TABLE p (id int PRIMARY KEY, v text);";
    let c = Custom::new(&format!("{schema} INSERT INTO p SELECT i, 'v' || i FROM generate_series(1, 100) i;"), schema);
    let gid = format!("bg_2pc_{}", c.blue.name);
    c.blue.psql(&format!("BEGIN; INSERT INTO p VALUES (1000, 'prepared'); PREPARE TRANSACTION '{gid}';"));
    let plan = c.plan(
        method,
        "workers = 1",
        "[[table]]\nsource = \"public.p\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\nv = \"v\"\n",
    );
    let mut child = c.spawn(&["copy", plan.to_str().unwrap(), "--no-follow"], &[]);
    let needle = format!("prepared transaction '{gid}'");
    let (rx, reader) =
        watch_stderr(&mut child, move |line| line.contains(&needle) && line.contains("ROLLBACK PREPARED"));
    let named = rx.recv_timeout(Duration::from_secs(30));
    c.blue.psql(&format!("ROLLBACK PREPARED '{gid}'"));
    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    assert!(named.is_ok(), "the prepared transaction capture waited for was never named:\n{log}");
    assert!(status.success(), "{log}");
    assert_same(&c, "SELECT id, v FROM p", "SELECT id, v FROM p");
}

#[test]
fn a_prepared_transaction_blocking_capture_setup_is_named_logical() {
    prepared_transaction_is_named("logical");
}

#[test]
fn a_prepared_transaction_blocking_capture_setup_is_named_trigger() {
    prepared_transaction_is_named("trigger");
}

#[test]
fn a_transform_that_fails_on_real_rows_is_found_by_plan() {
    let c = Custom::new(
        "CREATE TABLE ev (id int PRIMARY KEY, happened text NOT NULL);
         INSERT INTO ev VALUES (1, '05/06/2024'), (2, '25/12/2024'), (3, '01/02/2024');",
        "CREATE TABLE ev (id int PRIMARY KEY, happened timestamp NOT NULL);",
    );
    let entry = |expr: &str| {
        format!(
            "[[table]]\nsource = \"public.ev\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\nhappened = \"{expr}\"\n"
        )
    };
    let plan = c.plan("logical", "workers = 1", &entry("happened::timestamp"));
    let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("table[1].columns.happened")
            && r.stdout.contains("the transform fails on blue's rows of public.ev"),
        "{r:?}"
    );
    assert!(r.stdout.contains("25/12/2024"), "the failing value is not shown:\n{r:?}");
    // Said so when it passes.
    let plan = c.plan("logical", "workers = 1", &entry("to_timestamp(happened, 'DD/MM/YYYY')::timestamp"));
    let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("every expression ran over 3 row(s) sampled from 1 table(s)"), "{r:?}");
}

/// `plan` (and every `copy`, `verify` and `cutover`, which resolve the plan) samples a large
/// table by blocks: it reads about a thousand of them, not a third of the table, and its rows
/// come from the whole table. The row sample it replaced stopped at its `LIMIT` a third of the
/// way in: blocks read grew with the table (3.4 s of a 100M-row table), and a value only the
/// end of the table holds was never tried. About 40,000 blocks here (fillfactor 10; no
/// autovacuum, whose pass would count as reads), bad values in the last tenth.
#[test]
fn plan_samples_a_large_table_by_blocks_from_end_to_end() {
    let c = Custom::new(
        "CREATE TABLE ev (id int PRIMARY KEY, happened text NOT NULL, pad text)
           WITH (fillfactor = 10, autovacuum_enabled = off);
         INSERT INTO ev SELECT g, CASE WHEN g > 108000 THEN '25/12/2024' ELSE '05/06/2024' END, repeat('x', 150)
           FROM generate_series(1, 120000) g;",
        "CREATE TABLE ev (id int PRIMARY KEY, happened timestamp NOT NULL, pad text);",
    );
    c.blue.psql("ANALYZE ev");
    let blocks: i64 = c.blue.psql("SELECT pg_relation_size('ev') / 8192").parse().unwrap();
    assert!(blocks > 25_000, "{blocks} blocks");
    // Blocks of `ev` read so far, once the count stopped moving above `floor`: a session's
    // statistics reach the shared counts as its backend exits, just after `migrate` did.
    let read = |floor: i64| -> i64 {
        let q = "SELECT heap_blks_read + heap_blks_hit FROM pg_statio_user_tables WHERE relname = 'ev'";
        let started = std::time::Instant::now();
        let mut last = -1;
        loop {
            let now: i64 = c.blue.psql(q).parse().unwrap();
            if now > floor && now == last {
                return now;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "block reads of ev did not settle: {now}");
            last = now;
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let entry = |expr: &str| {
        format!(
            "[[table]]\nsource = \"public.ev\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\nhappened = \"{expr}\"\npad = \"pad\"\n"
        )
    };
    let before = read(-1);
    let plan = c.plan("logical", "workers = 1", &entry("happened::timestamp"));
    let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("table[1].columns.happened") && r.stdout.contains("25/12/2024"),
        "a value only the table's last tenth holds was not tried:\n{r:?}"
    );
    let plan = c.plan("logical", "workers = 1", &entry("to_timestamp(happened, 'DD/MM/YYYY')::timestamp"));
    let mid = read(before);
    let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    // About a thousand rows, from about a thousand blocks.
    let after = read(mid);
    let rows: u64 = r
        .stdout
        .split("every expression ran over ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no sample line:\n{r:?}"));
    assert!((300..=1000).contains(&rows), "{rows} rows sampled:\n{r:?}");
    assert!(after - mid < 3_000, "a sound plan read {} of {blocks} blocks (before: {})", after - mid, mid - before);
}

fn drift_entry() -> &'static str {
    "[[table]]\nsource = \"public.t\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\nn = \"n\"\n"
}

fn alter_type_stops_following(method: &str) {
    let schema = "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL);";
    let c = Custom::new(&format!("{schema} INSERT INTO t SELECT i, i FROM generate_series(1, 1000) i;"), schema);
    let plan = c.plan(method, "workers = 1", drift_entry());
    copy_no_follow(&c, &plan);
    // No row change follows: only the catalog tells.
    c.blue.psql("ALTER TABLE t ALTER COLUMN n TYPE bigint USING n * 10");
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 3, "following went on over a rewritten table:\n{r:?}");
    assert!(r.stderr.contains("columns of public.t changed on blue") && r.stderr.contains("--recopy"), "{r:?}");
    // Status says so; a plain rerun does not resume past it.
    let st = run(&mut c.migrate(&["status", plan.to_str().unwrap()]));
    assert!(
        st.stdout.contains("STOPPED: the columns of public.t changed on blue")
            && st.stdout.contains("--recopy public.t"),
        "{st:?}"
    );
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("following stopped because tables changed on blue: public.t:"), "{r:?}");
    // The operator says how: copy it again.
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow", "--recopy", "public.t"]));
    assert_eq!(r.code, 0, "{r:?}");
    assert_same(&c, "SELECT id, n FROM t", "SELECT id, n FROM t");
    assert_eq!(c.green.psql("SELECT max(n) FROM t"), "10000");
}

#[test]
fn alter_column_type_using_stops_following_until_recopy_logical() {
    alter_type_stops_following("logical");
}

#[test]
fn alter_column_type_using_stops_following_until_recopy_trigger() {
    alter_type_stops_following("trigger");
}

fn rename_stops_following(method: &str) {
    let schema = "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL);";
    let c = Custom::new(&format!("{schema} INSERT INTO t SELECT i, i FROM generate_series(1, 1000) i;"), schema);
    let plan = c.plan(method, "workers = 1", drift_entry());
    let mut child = c.spawn(&["copy", plan.to_str().unwrap()], &[]);
    c.wait_phase("following");
    c.blue.psql("ALTER TABLE t RENAME TO t_old; UPDATE t_old SET n = n + 1 WHERE id <= 10;");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            panic!("following went on over a renamed table");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("public.t was renamed on blue to public.t_old"), "{err}");
}

#[test]
fn a_planned_table_renamed_on_blue_stops_following_logical() {
    rename_stops_following("logical");
}

#[test]
fn a_planned_table_renamed_on_blue_stops_following_trigger() {
    rename_stops_following("trigger");
}

#[test]
fn a_latin1_blue_verifies_against_a_utf8_green() {
    let schema = "CREATE TABLE people (k text PRIMARY KEY, name text NOT NULL, n int);";
    // Blue in LATIN1 (a database of its own encoding), green in UTF8 as usual.
    let latin1 = format!("latin1_{}", std::process::id());
    crate::support::blue_cluster().psql(
        "postgres",
        &format!("CREATE DATABASE {latin1} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"),
    );
    let c = Custom {
        blue: crate::support::TestDb { cluster: crate::support::blue_cluster(), name: latin1 },
        green: crate::support::TestDb::create(crate::support::green_cluster(), "cgreen", None),
        dir: tempfile::tempdir().unwrap(),
    };
    // Non-ASCII by code point (chr), not by the bytes of this source file: psql's client
    // encoding here is not UTF8, and LATIN1 would store UTF8 bytes as two characters each.
    c.blue.psql(&format!(
        "{schema} INSERT INTO people VALUES ('caf' || chr(233), 'Zo' || chr(235), 1), \
           ('na' || chr(239) || 've', chr(197) || 'ngstr' || chr(246) || 'm', 2), ('plain', 'plain', 3), \
           (chr(223), 'Stra' || chr(223) || 'e', 4);"
    ));
    c.green.psql(schema);
    let plan = c.plan(
        "logical",
        "workers = 1",
        "[[table]]\nsource = \"public.people\"\nkey = [\"k\"]\n[table.columns]\nk = \"k\"\nname = \"name\"\nn = \"n\"\n",
    );
    copy_no_follow(&c, &plan);
    // Compared as UTF8 bytes on both sides: the same text is stored in other bytes on blue.
    let utf8 = |db: &crate::support::TestDb| {
        db.psql(
            "SELECT count(*) || ':' || md5(string_agg(convert_to(r::text, 'UTF8'), '\\x0a'::bytea \
             ORDER BY convert_to(r::text, 'UTF8'))) FROM (SELECT k, name, n FROM people) r",
        )
    };
    assert_eq!(utf8(&c.blue), utf8(&c.green), "green differs from blue");
    let r = run(&mut c.migrate(&["verify", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "false differences across encodings:\n{r:?}");
    // A change on green, and a row whose key blue's encoding cannot even hold.
    c.green.psql(
        "UPDATE people SET name = 'Zoe' WHERE k = 'caf' || chr(233); \
         INSERT INTO people VALUES (chr(10003) || ' only on green', 'x', 5);",
    );
    assert_eq!(c.green.psql("SELECT count(*) FROM people WHERE name = 'Zoe'"), "1");
    let r = run(&mut c.migrate(&["verify", plan.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("key (café): column name differs"), "{r:?}");
    assert!(r.stdout.contains("key (✓ only on green): extra on green"), "{r:?}");
}

#[test]
fn a_column_renamed_on_blue_is_copied_again_with_the_updated_plan() {
    let schema = "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL);";
    let c = Custom::new(&format!("{schema} INSERT INTO t SELECT i, i FROM generate_series(1, 500) i;"), schema);
    let plan = c.plan("logical", "workers = 1", drift_entry());
    copy_no_follow(&c, &plan);
    c.blue.psql("ALTER TABLE t RENAME COLUMN n TO m; UPDATE t SET m = m + 1000 WHERE id <= 5;");
    // The old plan no longer resolves: refused before anything runs.
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("column \"n\" does not exist"), "{r:?}");
    // The plan follows blue's new column; the entry is copied again with it.
    let updated = c.plan(
        "logical",
        "workers = 1",
        "[[table]]\nsource = \"public.t\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\nn = \"m\"\n",
    );
    let r = run(&mut c.migrate(&["copy", updated.to_str().unwrap(), "--no-follow", "--recopy", "t"]));
    assert_eq!(r.code, 0, "{r:?}");
    assert_same(&c, "SELECT id, m FROM t", "SELECT id, n FROM t");
    c.blue.psql("UPDATE t SET m = -1 WHERE id = 7");
    copy_no_follow(&c, &updated);
    assert_same(&c, "SELECT id, m FROM t", "SELECT id, n FROM t");
}

/// Inserts a parent and its child in one transaction on blue, and deletes an old pair, until
/// stopped; returns how many pairs it wrote.
fn pair_writer(url: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            // Many pairs per transaction: apply then writes a batch of children a while before
            // the batch of their parents (rows arrive by table and key, not in blue's order).
            let mut n: u64 = 100_000;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (first, last) = (n + 1, n + 10);
                n = last;
                client
                    .batch_execute(&format!(
                        "BEGIN; INSERT INTO parent SELECT i, 'p' || i FROM generate_series({first}, {last}) i; \
                         INSERT INTO child SELECT i, i, 'c' || i FROM generate_series({first}, {last}) i; \
                         DELETE FROM child WHERE id BETWEEN {old_first} AND {old_last}; \
                         DELETE FROM parent WHERE id BETWEEN {old_first} AND {old_last}; COMMIT;",
                        old_first = first - 500,
                        old_last = last - 500
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            n - 100_000
        })
    })
}

#[test]
fn foreign_key_validation_racing_apply_does_not_fail_the_copy() {
    // The child table is the larger, so its copy finishes first and apply writes children of
    // new parents while the parent table is still copying: when the parent table is done and
    // the foreign key is validated, apply has not written those parents yet.
    let schema = "CREATE TABLE parent (id int PRIMARY KEY, v text NOT NULL);
        CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parent (id), v text NOT NULL);";
    let entries = "[[table]]\nsource = \"public.parent\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\nv = \"v\"\n\
                   [[table]]\nsource = \"public.child\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\nparent_id = \"parent_id\"\nv = \"v\"\n";
    for round in 0..2 {
        let c = Custom::new(
            &format!(
                "{schema} INSERT INTO parent SELECT i, 'p' || i FROM generate_series(1, 20000) i;
                 INSERT INTO child SELECT i, i, repeat('c', 300) FROM generate_series(1, 20000) i; ANALYZE;"
            ),
            schema,
        );
        let plan = c.plan(
            "logical",
            "workers = 1\nchunk_rows = 2000\ndefer_indexes = true\nmax_rows_per_second = 15000",
            entries,
        );
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = pair_writer(c.blue.url(), stop.clone());
        let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let pairs = writer.join().unwrap();
        assert_eq!(
            r.code, 0,
            "round {round}: copy failed on a race that resolves itself ({pairs} pairs written):\n{r:?}"
        );
        copy_no_follow(&c, &plan);
        assert_same(&c, "SELECT id, v FROM parent", "SELECT id, v FROM parent");
        assert_same(&c, "SELECT id, parent_id, v FROM child", "SELECT id, parent_id, v FROM child");
        assert_eq!(
            c.green.psql(
                "SELECT bool_and(convalidated) FROM pg_constraint WHERE contype = 'f' AND conrelid = 'child'::regclass"
            ),
            "t"
        );
        assert!(pairs > 50, "the writer hardly wrote: {pairs}");
    }
}
