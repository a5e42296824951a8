//! Following bulk writes: a million-row transaction (updates, deletes, inserts and key changes
//! in one) and then a burst of small transactions, for both capture methods, in bounded memory;
//! and several apply workers under key changes that move keys between their shares. Each
//! proves green equal to transform(blue) with an independent query.

use std::time::{Duration, Instant};

use crate::support::{fingerprint, run, Custom};

const BLUE: &str = "CREATE TABLE acct (id int PRIMARY KEY, bal int NOT NULL, note text NOT NULL);";
const GREEN: &str = "CREATE TABLE acct (id bigint PRIMARY KEY, bal bigint NOT NULL, note text NOT NULL);";
const ENTRY: &str = "[[table]]\nsource = \"public.acct\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\n\
                     bal = \"bal::bigint * 10\"\nnote = \"upper(note)\"\n";
const TRANSFORM: &str = "SELECT id::bigint, bal::bigint * 10, upper(note) FROM acct";
const TARGET: &str = "SELECT id, bal, note FROM acct";

fn assert_same(c: &Custom) {
    assert_eq!(fingerprint(&c.blue, TRANSFORM), fingerprint(&c.green, TARGET), "green differs from transform(blue)");
}

/// Peak resident memory (VmHWM) of a running process, in MB.
fn peak_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:")?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

/// `copy --no-follow` in the background; returns its exit status and the largest peak memory
/// seen while it ran.
fn catch_up_measured(c: &Custom, plan: &std::path::Path) -> (std::process::ExitStatus, f64, String) {
    let mut child = c.spawn(&["copy", plan.to_str().unwrap(), "--no-follow"], &[]);
    let started = Instant::now();
    let mut peak = 0f64;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if let Some(mb) = peak_mb(child.id()) {
            peak = peak.max(mb);
        }
        assert!(started.elapsed() < Duration::from_secs(600), "copy --no-follow did not end within 600 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (status, peak, stderr)
}

fn million_row_transaction(method: &str) {
    let c = Custom::new(
        &format!("{BLUE} INSERT INTO acct SELECT g, g % 1000, 'n' || g FROM generate_series(1, 1000000) g;"),
        GREEN,
    );
    let plan = c.plan(method, "", ENTRY);
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");

    // One transaction: every row updated, some deleted, some inserted, some keys changed.
    c.blue.psql(
        "BEGIN;
         UPDATE acct SET bal = bal + 1;
         DELETE FROM acct WHERE id % 97 = 0;
         UPDATE acct SET id = id + 2000000, note = note || '-moved' WHERE id % 1009 = 1;
         INSERT INTO acct SELECT g, 7, 'new' || g FROM generate_series(3000001, 3020000) g;
         COMMIT;",
    );
    let started = Instant::now();
    let (status, peak, stderr) = catch_up_measured(&c, &plan);
    assert!(status.success(), "copy --no-follow after the big transaction: {status}\n{stderr}");
    eprintln!(
        "{method}: a 1M-row transaction followed in {:.1} s, peak memory {peak:.0} MB",
        started.elapsed().as_secs_f64()
    );
    assert!(peak > 0.0 && peak < 300.0, "peak memory {peak:.0} MB following a 1M-row transaction");
    assert_same(&c);

    // Then a burst of small transactions (one row each), with a delete and a key change among them.
    c.blue.psql(
        "DO $$ BEGIN
           FOR i IN 1..20000 LOOP
             UPDATE acct SET bal = bal + 5 WHERE id = i * 37;
             IF i % 100 = 0 THEN DELETE FROM acct WHERE id = i * 41; END IF;
             IF i % 250 = 0 THEN UPDATE acct SET id = -id WHERE id = i * 43; END IF;
             COMMIT;
           END LOOP;
         END $$;",
    );
    let (status, _, stderr) = catch_up_measured(&c, &plan);
    assert!(status.success(), "copy --no-follow after the burst: {status}\n{stderr}");
    assert_same(&c);
}

/// Bulk writes to two tables while both are still being copied: their keys wait in `pending`,
/// more than a batch of each, until each copy is done (the first table's are applied while the
/// second still copies). Apply reads them entry by entry and takes the oldest of both. Green
/// ends equal to transform(blue).
fn backlogs_of_two_tables_made_during_the_copy(method: &str) {
    let c = Custom::new(
        &format!(
            "{BLUE} CREATE TABLE acct2 (id int PRIMARY KEY, bal int NOT NULL, note text NOT NULL); \
             INSERT INTO acct SELECT g, g, 'n' || g FROM generate_series(1, 30000) g; \
             INSERT INTO acct2 SELECT g, g, 'm' || g FROM generate_series(1, 30000) g;"
        ),
        &format!("{GREEN} CREATE TABLE acct2 (id bigint PRIMARY KEY, bal bigint NOT NULL, note text NOT NULL);"),
    );
    let entries = format!("{ENTRY}{}", ENTRY.replace("public.acct", "public.acct2"));
    // 60,000 rows at 4,000 a second, one table after the other.
    let plan = c.plan(method, "workers = 1\nchunk_rows = 2000\nmax_rows_per_second = 4000", &entries);
    let mut copy = c.spawn(&["copy", plan.to_str().unwrap()], &[]);
    let started = Instant::now();
    while c.green.psql(&c.sql("SELECT to_regclass('bluegreen_custom.chunks') IS NOT NULL")) != "t"
        || c.green.psql(&c.sql("SELECT count(*) > 0 FROM bluegreen_custom.chunks WHERE done")) != "t"
    {
        assert!(started.elapsed() < Duration::from_secs(60), "no chunk was copied");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each statement its own transaction: updates of every row, deletes, inserts, key changes.
    c.blue.psql(
        "UPDATE acct SET bal = bal + 1; UPDATE acct2 SET bal = bal + 1; \
         DELETE FROM acct WHERE id % 10 = 0; UPDATE acct2 SET id = id + 100000 WHERE id % 7 = 0; \
         INSERT INTO acct SELECT g, g, 'new' FROM generate_series(50001, 52000) g; \
         UPDATE acct2 SET note = 'late' WHERE id % 3 = 0",
    );
    // The backlogs: more than a batch (10,000 keys) of both tables pending at once.
    let started = Instant::now();
    while c.green.psql(&c.sql(
        "SELECT count(*) FILTER (WHERE tbl LIKE '%acct') > 10000 AND count(*) FILTER (WHERE tbl LIKE '%acct2') > 10000 \
         FROM bluegreen_custom.pending",
    )) != "t"
    {
        assert!(
            started.elapsed() < Duration::from_secs(30)
                && c.green.psql(&c.sql("SELECT state->>'phase' FROM bluegreen_custom.migration")) == "copying",
            "both tables' backlogs were never pending at once"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let same = || {
        fingerprint(&c.blue, TRANSFORM) == fingerprint(&c.green, TARGET)
            && fingerprint(&c.blue, &TRANSFORM.replace("acct", "acct2"))
                == fingerprint(&c.green, &TARGET.replace("acct", "acct2"))
    };
    let started = Instant::now();
    while !same() {
        assert!(started.elapsed() < Duration::from_secs(120), "green did not come equal to transform(blue)");
        std::thread::sleep(Duration::from_millis(500));
    }
    crate::capture::sigint_and_wait(&mut copy);
    assert_eq!(c.green.psql(&c.sql("SELECT count(*) FROM bluegreen_custom.pending")), "0");
    assert_same(&c);
    assert_eq!(
        c.green.psql("SELECT count(*) FROM acct2 WHERE id > 100000"),
        c.blue.psql("SELECT count(*) FROM acct2 WHERE id > 100000")
    );
}

#[test]
fn backlogs_of_two_tables_made_during_the_copy_drain_logical() {
    backlogs_of_two_tables_made_during_the_copy("logical");
}

#[test]
fn backlogs_of_two_tables_made_during_the_copy_drain_trigger() {
    backlogs_of_two_tables_made_during_the_copy("trigger");
}

#[test]
fn a_million_row_transaction_and_a_burst_follow_in_bounded_memory_logical() {
    million_row_transaction("logical");
}

#[test]
fn a_million_row_transaction_and_a_burst_follow_in_bounded_memory_trigger() {
    million_row_transaction("trigger");
}

/// Four shares while blue moves keys: a key changed leaves one share and enters another, chains
/// of changes cross shares, values change under moved keys. With logical capture the shares are
/// capture's direct-apply sessions (and the workers take what was pending); with trigger
/// capture they are the apply workers' shares of pending. Green ends equal to transform(blue).
fn keys_moving_between_shares(method: &str) {
    let c =
        Custom::new(&format!("{BLUE} INSERT INTO acct SELECT g, g, 'n' || g FROM generate_series(1, 20000) g;"), GREEN);
    let plan = c.plan(method, "", &format!("apply_workers = 4\n{ENTRY}"));
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    let mut follower = c.spawn(&["copy", plan.to_str().unwrap()], &[]);
    c.wait_phase("following");
    // Each round moves a key (old and new hash to different shares most of the time), moves it
    // again, changes the value under it, and frees its old key for a new row.
    c.blue.psql(
        "DO $$ BEGIN
           FOR i IN 1..3000 LOOP
             UPDATE acct SET id = id + 100000 WHERE id = i;
             UPDATE acct SET bal = bal + 1 WHERE id = i + 100000;
             IF i % 3 = 0 THEN UPDATE acct SET id = id + 100000 WHERE id = i + 100000; END IF;
             INSERT INTO acct VALUES (i, -i, 'reused' || i);
             IF i % 7 = 0 THEN DELETE FROM acct WHERE id = i + 5000; END IF;
             COMMIT;
           END LOOP;
         END $$;",
    );
    // Status: the apply rate is the current one (nothing applied for the last seconds: 0, not
    // a lifetime average), and the lag is given in time as well as in bytes.
    let status = || -> serde_json::Value {
        let r = run(&mut c.migrate(&["status", plan.to_str().unwrap(), "--format", "json"]));
        serde_json::from_str(&r.stdout).unwrap()
    };
    // Applied keys, not pending ones, show the follower got to the writes (logical capture
    // applies them directly; they never show as pending). Neither proves it caught up: the
    // rate coming to 0 below and the comparison at the end do.
    let started = Instant::now();
    let mut st = status();
    while !(st["capture"]["pending_keys"] == 0 && st["capture"]["applied_keys"].as_i64().is_some_and(|n| n > 3000)) {
        assert!(started.elapsed() < Duration::from_secs(120), "the follower did not catch up: {st}");
        std::thread::sleep(Duration::from_millis(200));
        st = status();
    }
    // The rate comes to 0 once the last key applied is more than its window old. A lifetime
    // average never would.
    let started = Instant::now();
    while st["capture"]["apply_keys_per_second"].as_f64() != Some(0.0) {
        assert!(started.elapsed() < Duration::from_secs(60), "the apply rate never came to 0: {st}");
        std::thread::sleep(Duration::from_millis(500));
        st = status();
    }
    // Other tests' WAL on the shared blue cluster moves the lag between two reads: it must come
    // under the bound, not be under it at one instant.
    let started = Instant::now();
    while !st["capture"]["lag_seconds"].as_f64().is_some_and(|s| s < 3.0) && started.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(500));
        st = status();
    }
    assert!(st["capture"]["applied_keys"].as_i64().is_some_and(|n| n > 3000), "{st}");
    assert!(st["capture"]["lag_seconds"].as_f64().is_some_and(|s| s < 3.0), "{st}");
    let _ = std::process::Command::new("kill").args(["-INT", &follower.id().to_string()]).status();
    let st = follower.wait().unwrap();
    assert!(st.success(), "follower: {st}");
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    assert_same(&c);
    assert_eq!(c.green.psql("SELECT count(*) FROM acct WHERE note LIKE 'REUSED%'"), "3000");
}

#[test]
fn apply_shares_stay_correct_when_keys_move_between_them_logical() {
    keys_moving_between_shares("logical");
}

#[test]
fn apply_shares_stay_correct_when_keys_move_between_them_trigger() {
    keys_moving_between_shares("trigger");
}

/// A unique value moved on blue from one key to another (the row deleted, a new row inserted
/// with its email) lands in two shares: the new row's share may come first and meet the old
/// row on green's unique index. It must not stop following.
fn unique_value_moving_between_keys(method: &str) {
    let schema = "CREATE TABLE u (id int PRIMARY KEY, email text NOT NULL UNIQUE);";
    let c = Custom::new(&format!("{schema} INSERT INTO u SELECT g, 'e' || g FROM generate_series(1, 4000) g;"), schema);
    let plan = c.plan(
        method,
        "",
        "apply_workers = 4\n[[table]]\nsource = \"public.u\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\nemail = \"email\"\n",
    );
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    // One transaction moving every email to a new key, then several small ones doing it again.
    c.blue.psql(
        "BEGIN; CREATE TEMP TABLE m AS SELECT id, email FROM u; DELETE FROM u;
         INSERT INTO u SELECT id + 10000, email FROM m; COMMIT;",
    );
    c.blue.psql(
        "DO $$ BEGIN
           FOR i IN 1..1000 LOOP
             DELETE FROM u WHERE id = i + 10000;
             INSERT INTO u VALUES (i + 20000, 'e' || i);
             COMMIT;
           END LOOP;
         END $$;",
    );
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(fingerprint(&c.blue, "SELECT id, email FROM u"), fingerprint(&c.green, "SELECT id, email FROM u"));
}

#[test]
fn a_unique_value_moving_between_keys_does_not_stop_following_logical() {
    unique_value_moving_between_keys("logical");
}

#[test]
fn a_unique_value_moving_between_keys_does_not_stop_following_trigger() {
    unique_value_moving_between_keys("trigger");
}

/// A rerun of `copy` while another session reads the state (a follower, `status`, a cutover's
/// preflight) does not wait on it: state of an earlier version gets its columns only when they
/// are missing. `ADD COLUMN IF NOT EXISTS` took an exclusive lock even when the column existed
/// and waited behind every reader (and once deadlocked with the follower's sessions).
#[test]
fn a_rerun_does_not_wait_for_readers_of_the_state() {
    let c =
        Custom::new(&format!("{BLUE} INSERT INTO acct SELECT g, g, 'n' || g FROM generate_series(1, 100) g;"), GREEN);
    let plan = c.plan("logical", "", ENTRY);
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    let reader = c
        .green
        .cluster
        .psql_cmd(&c.green.name)
        .args(["-c", &c.sql("BEGIN; SELECT count(*) FROM bluegreen_custom.migration, bluegreen_custom.tables, bluegreen_custom.pending; \
             SELECT pg_sleep(30); COMMIT;")])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let reader = Guard(reader);
    std::thread::sleep(Duration::from_millis(500));
    c.blue.psql("UPDATE acct SET bal = bal + 1 WHERE id < 10");
    let started = Instant::now();
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(15), "the rerun waited {:?} for a reader", started.elapsed());
    assert_same(&c);
    drop(reader);
}

/// Kills the child when dropped (a failed assertion must not leave it holding its lock).
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Keys applied are recorded for the cutover to re-verify only once a verify has started:
/// before that the first verify covers them, and recording them was half of a burst's apply
/// time (applied straight from logical capture) and a third of green's time in draining a
/// backlog from `pending` (trigger capture's way). After a verify started, every applied key is
/// recorded.
fn applied_keys_recorded_once_a_verify_started(method: &str) {
    let c =
        Custom::new(&format!("{BLUE} INSERT INTO acct SELECT g, g, 'n' || g FROM generate_series(1, 5000) g;"), GREEN);
    let plan = c.plan(method, "", ENTRY);
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    let follower = Guard(c.spawn(&["copy", plan.to_str().unwrap()], &[]));
    c.wait_phase("following");
    let applied = |changed: i64| {
        let started = Instant::now();
        while c.green.psql("SELECT count(*) FROM acct WHERE bal = 10 * (id + 1000000)") != changed.to_string() {
            assert!(started.elapsed() < Duration::from_secs(60), "the follower did not apply the updates");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Recorded in the touched log first, moved into `touched` by an idle follower.
    let touched = || {
        c.green.psql(&c.sql(
            "SELECT count(*) FROM (SELECT key FROM bluegreen_custom.touched UNION SELECT key FROM bluegreen_custom.touched_log) k",
        ))
    };

    c.blue.psql("UPDATE acct SET bal = id + 1000000 WHERE id <= 1000");
    applied(1000);
    assert_eq!(touched(), "0", "keys applied before any verify were recorded");

    let r = run(&mut c.migrate(&["verify", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    c.blue.psql("UPDATE acct SET bal = id + 1000000 WHERE id BETWEEN 2001 AND 2500");
    applied(1500);
    assert_eq!(touched(), "500", "keys applied after a verify started must be recorded");
    let started = Instant::now();
    while c.green.psql(&c.sql("SELECT count(*) FROM bluegreen_custom.touched_log")) != "0" {
        assert!(started.elapsed() < Duration::from_secs(30), "the idle follower did not compact the touched log");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.green.psql(&c.sql("SELECT count(*) FROM bluegreen_custom.touched")), "500");
    drop(follower);

    // State verified by a version that did not mark when verify started (the column is added
    // empty on upgrade): the verify it did record still turns recording on.
    c.green.psql(&c.sql("UPDATE bluegreen_custom.migration SET verify_started_at = NULL"));
    let follower = Guard(c.spawn(&["copy", plan.to_str().unwrap()], &[]));
    c.blue.psql("UPDATE acct SET bal = id + 1000000 WHERE id BETWEEN 3001 AND 3100");
    applied(1600);
    assert_eq!(touched(), "600", "keys applied after an older version's verify must be recorded");
    drop(follower);
    assert_same(&c);

    // A table copied again needs a new verify before a cutover: its verified buckets go.
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow", "--recopy", "public.acct"]));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(c.green.psql(&c.sql("SELECT count(*) FROM bluegreen_custom.verified")), "0");
    assert_same(&c);
}

#[test]
fn applied_keys_are_recorded_for_the_cutover_only_once_a_verify_started_logical() {
    applied_keys_recorded_once_a_verify_started("logical");
}

#[test]
fn applied_keys_are_recorded_for_the_cutover_only_once_a_verify_started_trigger() {
    applied_keys_recorded_once_a_verify_started("trigger");
}

/// A cutover that stopped half-way cannot be finished or undone by a follower whose plan has no
/// `[cutover.pgbouncer]`: it stops, saying what to do, instead of reporting "recovering" while
/// PgBouncer may still hold the application paused.
#[test]
fn a_half_way_cutover_without_pgbouncer_settings_stops_the_follower_with_what_to_do() {
    let c =
        Custom::new(&format!("{BLUE} INSERT INTO acct SELECT g, g, 'n' || g FROM generate_series(1, 100) g;"), GREEN);
    let plan = c.plan("logical", "", ENTRY);
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    c.green.psql(
        &c.sql("UPDATE bluegreen_custom.migration SET state = '{\"phase\": \"cutting-over\", \"step\": \"pause\"}'"),
    );
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("no [cutover.pgbouncer] section to recover it with"), "{r:?}");
}

/// One blue transaction moves a unique value from one row to another, both rows kept
/// (`a.email = 'new'; b.email = <a's old>`), so both keys arrive in one apply batch. Written row
/// by row in key order, the receiving row came first and met the giving row's old value on
/// green; the batch failed the same way on every retry and following stalled (found by the
/// short-snapshot test's writer). Each transaction moves a value from a later key to an earlier
/// one, on a table with room on every page (the new versions stay in place).
fn unique_value_moving_between_kept_rows(method: &str) {
    let schema = "CREATE TABLE u (id int PRIMARY KEY, email text NOT NULL UNIQUE) WITH (fillfactor = 50);";
    let c = Custom::new(&format!("{schema} INSERT INTO u SELECT g, 'e' || g FROM generate_series(1, 4000) g;"), schema);
    let plan = c.plan(method, "", "[[table]]\nsource = \"public.u\"\nkey = [\"id\"]\n");
    let p = plan.to_str().unwrap();
    let mut copy = c.spawn(&["copy", p], &[]);
    c.wait_phase("following");
    for i in 1..=20 {
        let (giver, taker) = (4000 - i * 100, i);
        c.blue.psql(&format!(
            "BEGIN; UPDATE u SET email = 'moved-{i}' WHERE id = {giver}; \
             UPDATE u SET email = 'e{giver}' WHERE id = {taker}; COMMIT;"
        ));
    }
    let started = std::time::Instant::now();
    while fingerprint(&c.blue, "SELECT id, email FROM u") != fingerprint(&c.green, "SELECT id, email FROM u") {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "following stalled on a unique value moved between kept rows"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    crate::capture::sigint_and_wait(&mut copy);
}

#[test]
fn a_unique_value_moving_between_kept_rows_in_one_transaction_is_applied_logical() {
    unique_value_moving_between_kept_rows("logical");
}

#[test]
fn a_unique_value_moving_between_kept_rows_in_one_transaction_is_applied_trigger() {
    unique_value_moving_between_kept_rows("trigger");
}
