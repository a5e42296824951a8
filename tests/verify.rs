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
    let changed_key = s.blue.psql("SELECT min(request_id) FROM hydra_oauth2_revocation");
    // Damaged only once applied: the follower would otherwise write the change over the damage.
    let reason = |table: &str| format!("SELECT reason FROM {table} WHERE request_id = '{changed_key}'");
    assert!(
        crate::support::converges(
            (&s.blue, &reason("hydra_oauth2_revocation")),
            (&s.green, &reason("oauth2_revocations")),
            Duration::from_secs(60)
        ),
        "the change of {changed_key} never reached green"
    );
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

const PARTS_BLUE: &str = "CREATE TABLE items (id bigint PRIMARY KEY, grp int NOT NULL, payload text);
    INSERT INTO items SELECT g, g % 97, repeat(md5(g::text), 3) FROM generate_series(1, 150000) g;";
const PARTS_GREEN: &str = "CREATE TABLE items (id bigint PRIMARY KEY, grp int NOT NULL, payload text);";

/// A joined verify worker that freezes holding a part (SIGSTOP: a host frozen or cut off behind
/// sessions the servers keep open) loses its lease after `[copy] worker_lease`: the leader ends
/// its sessions on both servers (which held the run's snapshots and the claim), reads the part
/// itself, and the verify ends "equal" while blue takes writes and a follower applies them.
/// Woken up, the worker exits 3 naming the lease, and none of the run's parts is its. Without
/// the lease the leader waits for the frozen part for ever.
#[test]
fn a_frozen_joined_verify_worker_loses_its_lease_and_its_part() {
    joined_verify_worker_lost_holding_a_part(crate::support::host::Loss::frozen());
}

/// A joined verify worker on a host of its own (a network namespace) loses its link while it
/// holds a part: the leader ends its sessions and reads the part, as above, and the worker,
/// which could renew its lease for `[copy] worker_lease`, stops by itself (exit 3) while still
/// cut off, instead of waiting on dead connections until TCP gives up.
#[test]
fn a_joined_verify_worker_on_a_host_cut_off_stops_by_itself_and_loses_its_part() {
    joined_verify_worker_lost_holding_a_part(crate::support::host::Loss::cut_off());
}

/// A verify leader and a joined worker read parts while the copy follows a writer; the
/// worker, holding a part, is lost: cut off on a second host, or frozen, as `loss` says.
fn joined_verify_worker_lost_holding_a_part(mut loss: crate::support::host::Loss) {
    let c = loss.scenario(PARTS_BLUE, PARTS_GREEN);
    let plan = c.plan(
        "trigger",
        "workers = 2\nworker_lease = \"10s\"",
        "[[table]]\nsource = \"public.items\"\nkey = [\"id\"]\n",
    );
    let p = plan.to_str().unwrap();
    let mut copy = c.spawn(&["copy", p], &[]);
    c.wait_phase("following");
    let writer = crate::support::ItemsWriter::start(&c.blue, 150_000);
    let state = c.sql("bluegreen_custom");
    let (args, fault) = (["verify", p, "--join"], [("MIGRATE_FAULT", "verify.part-read:sleep")]);
    let mut lost = loss.spawn(&c, &args, &fault);
    // The leader slowed per part, so that the joined worker takes one before it has them all.
    let leader = {
        let mut cmd = c.migrate(&["verify", p]);
        cmd.env("MIGRATE_FAULT", "verify.part-read:sleep=2000");
        std::thread::spawn(move || run(&mut cmd))
    };
    let (lost_id, held) = crate::support::first_in_hand(&c.green, &state, &mut lost);
    let (on_blue, on_green) = crate::support::recorded_sessions_open(&c.blue, &c.green, &state, &lost_id);
    assert!(on_blue >= 1 && on_green >= 2, "its sessions open: {on_blue} on blue, {on_green} on green");
    loss.lose(&c, &lost, (1, 2));
    let r = leader.join().unwrap();
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("green equals transform(blue)"), "{r:?}");
    assert!(r.stderr.contains("wrote no heartbeat for longer than its lease"), "{r:?}");
    let open = crate::support::recorded_sessions_open(&c.blue, &c.green, &state, &lost_id);
    assert_eq!(open, (0, 0), "its sessions (blue, green) outlived its lease");
    loss.exit(&mut lost, &lost_id);

    let parts = |q: &str| c.green.psql(&format!("SELECT {q} FROM {state}.verify_parts"));
    assert_eq!(parts("count(*) || ' ' || count(*) FILTER (WHERE done AND stored = 1)"), "8 8");
    assert_eq!(parts(&format!("count(*) FILTER (WHERE worker = '{lost_id}')")), "0");
    let mut held_parts = held.rsplitn(3, ':');
    let (number, side, tbl) = (held_parts.next().unwrap(), held_parts.next().unwrap(), held_parts.next().unwrap());
    let redone = c.green.psql(&format!(
        "SELECT worker FROM {state}.verify_parts WHERE tbl = '{tbl}' AND side = '{side}' AND part = {number} AND done"
    ));
    assert!(!redone.is_empty() && redone != lost_id, "part {held} was not read by another worker: {redone}");
    writer.stop();
    c.assert_items_converge();
    crate::capture::sigint_and_wait(&mut copy);
}

/// One verify spread over three processes: the leader and two joined workers (`verify --join`)
/// claim parts of both sides' heaps from green while blue takes inserts, updates that move rows
/// (TOASTed payloads), deletes and key changes, and a follower applies them. One joined worker
/// is killed holding a part it has read but not stored; its claim comes free and another
/// process reads that part. Every part is stored once, the verdict is "equal" (and green is, by
/// an independent fingerprint), and a row tampered on green afterwards is named by a verify
/// spread the same way.
#[test]
fn one_verify_spread_over_joined_workers_survives_a_killed_worker() {
    let c = crate::support::Custom::new(PARTS_BLUE, PARTS_GREEN);
    let plan = c.plan("trigger", "workers = 2", "[[table]]\nsource = \"public.items\"\nkey = [\"id\"]\n");
    let p = plan.to_str().unwrap();
    let mut copy = c.spawn(&["copy", p], &[]);
    c.wait_phase("following");
    let writer = crate::support::ItemsWriter::start(&c.blue, 150_000);
    let state = c.sql("bluegreen_custom");
    let mut doomed = c.spawn(&["verify", p, "--join"], &[("MIGRATE_FAULT", "verify.part-read:sleep")]);
    // Both slowed per part, so that no process takes every part before the doomed one has one.
    let joined = c.spawn(&["verify", p, "--join"], &[("MIGRATE_FAULT", "verify.part-read:sleep=300")]);
    let leader = {
        let mut cmd = c.migrate(&["verify", p]);
        cmd.env("MIGRATE_FAULT", "verify.part-read:sleep=1500");
        std::thread::spawn(move || run(&mut cmd))
    };
    let (doomed_id, held) = crate::support::first_in_hand(&c.green, &state, &mut doomed);
    let st = run(&mut c.migrate(&["status", p]));
    assert!(
        st.stdout.contains(&format!("worker {doomed_id} (verify joined)"))
            && st.stdout.contains(&format!("reading {held}")),
        "{st:?}"
    );
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let r = leader.join().unwrap();
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("green equals transform(blue)"), "{r:?}");
    assert!(exited(joined).success(), "the joined worker failed");

    let parts = |q: &str| c.green.psql(&format!("SELECT {q} FROM {state}.verify_parts"));
    // Four parts a side (the table is over 64 blocks), each stored once, none by the dead worker.
    assert_eq!(parts("count(*) || ' ' || count(*) FILTER (WHERE done AND stored = 1)"), "8 8");
    assert_eq!(parts(&format!("count(*) FILTER (WHERE worker = '{doomed_id}')")), "0");
    let mut held_parts = held.rsplitn(3, ':');
    let (number, side, tbl) = (held_parts.next().unwrap(), held_parts.next().unwrap(), held_parts.next().unwrap());
    let redone = c.green.psql(&format!(
        "SELECT worker FROM {state}.verify_parts WHERE tbl = '{tbl}' AND side = '{side}' AND part = {number} AND done"
    ));
    assert!(!redone.is_empty() && redone != doomed_id, "part {held} was not read by another worker: {redone}");
    let workers: i64 = parts("count(DISTINCT worker)").parse().unwrap();
    assert!(workers >= 2, "only {workers} process(es) read parts");
    // Each side's parts counted every row the table had (give or take the writes during the read).
    let rows: Vec<i64> = c
        .green
        .psql(&format!(
            "SELECT string_agg(s::text, ' ') FROM (SELECT sum(rows) s FROM {state}.verify_parts GROUP BY side) x"
        ))
        .split(' ')
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(rows.len() == 2 && rows.iter().all(|r| (145_000..160_000).contains(r)), "{rows:?}");

    writer.stop();
    let query = "SELECT id, grp, payload FROM items";
    let started = std::time::Instant::now();
    while crate::support::fingerprint(&c.blue, query) != crate::support::fingerprint(&c.green, query) {
        assert!(started.elapsed() < Duration::from_secs(90), "green did not converge to blue");
        std::thread::sleep(Duration::from_millis(500));
    }
    // A row changed on green behind the follower's back is found by the same spread verify,
    // in the one bucket that holds it: the parts' summaries add up to each side's exactly.
    c.green.psql("UPDATE items SET payload = 'tampered' WHERE id = 4242");
    let joined = c.spawn(&["verify", p, "--join"], &[]);
    let r = run(c.migrate(&["verify", p, "--format", "json"]).env("MIGRATE_FAULT", "verify.part-read:sleep=500"));
    assert_eq!(r.code, 1, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let t = &v["tables"][0];
    assert_eq!(t["differences_total"], 1, "{v}");
    assert_eq!(t["differences"][0]["key"][0], "4242", "{v}");
    assert_eq!(t["differences"][0]["columns"][0][0], "payload", "{v}");
    assert_eq!(t["buckets_differing"], 1, "{v}");
    let count: i64 = c.blue.psql("SELECT count(*) FROM items").parse().unwrap();
    assert_eq!((t["rows_blue"].as_i64(), t["rows_green"].as_i64()), (Some(count), Some(count)), "{v}");
    assert!(exited(joined).success(), "the second joined worker failed");
    let by: i64 = c.green.psql(&format!("SELECT count(DISTINCT worker) FROM {state}.verify_parts")).parse().unwrap();
    assert!(by >= 2, "only {by} process(es) read the second run's parts");
    crate::capture::sigint_and_wait(&mut copy);
}

/// Waits (up to 90 s) for a background `migrate` to exit.
fn exited(mut child: std::process::Child) -> std::process::ExitStatus {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > Duration::from_secs(90) {
            crate::support::panic_with_stderr(&mut child, "a joined worker did not exit");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A verify leader killed mid-run (SIGKILL-like: no cleanup) takes its snapshots with it. A
/// joined worker that meets its run cannot import them: it drops the run's unread parts (one
/// nobody could finish) instead of reading stale parts, and waits for the next verify, which
/// it joins, and the next verify's verdict is right.
#[test]
fn a_joined_verify_worker_drops_a_dead_leaders_run_and_joins_the_next() {
    let c = crate::support::Custom::new(PARTS_BLUE, PARTS_GREEN);
    let plan = c.plan("trigger", "workers = 2", "[[table]]\nsource = \"public.items\"\nkey = [\"id\"]\n");
    let p = plan.to_str().unwrap();
    let r = run(&mut c.migrate(&["copy", p, "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    let state = c.sql("bluegreen_custom");
    let joined = c.spawn(&["verify", p, "--join"], &[]);
    // The leader dies right after reading its first part, before storing it.
    let dead = run(c.migrate(&["verify", p]).env("MIGRATE_FAULT", "verify.part-read"));
    assert_eq!(dead.code, 137, "{dead:?}");
    let started = std::time::Instant::now();
    while c.green.psql(&format!("SELECT count(*) FROM {state}.verify_parts WHERE NOT done")) != "0" {
        assert!(started.elapsed() < Duration::from_secs(30), "the dead leader's parts were not dropped");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut joined = joined;
    assert!(joined.try_wait().unwrap().is_none(), "the joined worker exited with the dead run");
    c.green.psql("UPDATE items SET grp = -1 WHERE id = 77");
    let r = run(c.migrate(&["verify", p, "--format", "json"]).env("MIGRATE_FAULT", "verify.part-read:sleep=300"));
    assert_eq!(r.code, 1, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["tables"][0]["differences_total"], 1, "{v}");
    assert_eq!(v["tables"][0]["differences"][0]["key"][0], "77", "{v}");
    let status = exited(joined);
    assert!(status.success(), "the joined worker failed");
    let parts =
        c.green.psql(&format!("SELECT count(*) || ' ' || count(DISTINCT worker) FROM {state}.verify_parts WHERE done"));
    assert_eq!(parts.split(' ').next(), Some("8"), "{parts}");
    assert_ne!(parts.split(' ').nth(1), Some("1"), "the joined worker read none of the next run: {parts}");
}

/// Some values' typed hash is a small constant whatever the seed (an empty array is 1, an
/// empty jsonb its seed, numeric zero its seed minus one, float zero its seed). Rows hashed
/// column by column must still tell them from NULLs, and from each other in other columns:
/// each row here differs between the sides only by such values moving between columns or
/// turning NULL.
#[test]
fn values_with_constant_typed_hashes_do_not_cancel_out() {
    const ROWS: &str = "CREATE TABLE items (id int PRIMARY KEY, j jsonb, n numeric, a text[], b text[], f float8);";
    let c = crate::support::Custom::new(
        &format!(
            "{ROWS} INSERT INTO items VALUES (1, '{{}}', 0, '{{}}', '{{}}', NULL), (2, NULL, NULL, '{{}}', NULL, NULL), \
             (3, '{{}}', NULL, NULL, NULL, NULL), (4, '[]', 1, '{{x}}', '{{}}', 0), (5, '{{}}', 0, '{{}}', '{{}}', 0)"
        ),
        ROWS,
    );
    let plan = c.plan("trigger", "workers = 1", "[[table]]\nsource = \"public.items\"\nkey = [\"id\"]\n");
    let p = plan.to_str().unwrap();
    let r = run(&mut c.migrate(&["copy", p, "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    // Each of rows 1-3 keeps its hash under a per-column XOR with small seeds: j's and n's
    // constants cancel, an empty array hashes 1 in any column.
    c.green.psql(
        "UPDATE items SET j = NULL, n = NULL, a = NULL, b = NULL WHERE id = 1; \
         UPDATE items SET a = NULL, b = '{}' WHERE id = 2; UPDATE items SET j = NULL, n = 0 WHERE id = 3;",
    );
    let r = run(&mut c.migrate(&["verify", p]));
    assert_eq!(r.code, 1, "{r:?}");
    for differing in ["1", "2", "3"] {
        assert!(r.stdout.contains(&format!("key ({differing}): ")), "row {differing} not named: {r:?}");
    }
    assert!(!r.stdout.contains("key (4)") && !r.stdout.contains("key (5)"), "{r:?}");
}

/// Differences the types' own hashes cannot see, or see only in one column: two numeric
/// columns scaled alike (numeric hashes its digits XOR its weight), zero and NaN swapped, a
/// sign flipped (numeric's hash has no sign), a number's sign inside jsonb and `{}` for `[]`;
/// and, in another table, a string's case under a nondeterministic collation on green (whose
/// hash ignores case; blue's column has none, so every row hashed differently before). The
/// last row of each table is equal.
#[test]
fn scaled_numbers_signs_json_shapes_and_case_are_differences() {
    let c = crate::support::Custom::new(
        "CREATE TABLE items (id int PRIMARY KEY, m numeric, p numeric, js jsonb);
         INSERT INTO items VALUES (1, 1.5, 2.5, '{\"a\": 5}'), (2, 0, 'NaN', '{}'), (3, -7, 3, '[1]'),
           (4, 1, 1, '{\"a\": 5}'), (5, 1, 1, '{}'), (6, 1, 1, '{\"b\": [1, 2.5]}');
         CREATE TABLE names (id int PRIMARY KEY, t text);
         INSERT INTO names VALUES (1, 'Alice'), (2, 'Mixed');",
        "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         CREATE TABLE items (id int PRIMARY KEY, m numeric, p numeric, js jsonb);
         CREATE TABLE names (id int PRIMARY KEY, t text COLLATE ci);",
    );
    let plan = c.plan(
        "trigger",
        "workers = 1",
        "[[table]]\nsource = \"public.items\"\nkey = [\"id\"]\n[[table]]\nsource = \"public.names\"\nkey = [\"id\"]\n",
    );
    let p = plan.to_str().unwrap();
    let r = run(&mut c.migrate(&["copy", p, "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    c.green.psql(
        "UPDATE items SET m = 15000, p = 25000 WHERE id = 1; UPDATE items SET m = 'NaN', p = 0 WHERE id = 2;
         UPDATE items SET m = 7 WHERE id = 3; UPDATE items SET js = '{\"a\": -5}' WHERE id = 4;
         UPDATE items SET js = '[]' WHERE id = 5; UPDATE names SET t = 'alice' WHERE id = 1;",
    );
    let r = run(&mut c.migrate(&["verify", p]));
    assert_eq!(r.code, 1, "{r:?}");
    for differing in 1..=5 {
        assert!(r.stdout.contains(&format!("key ({differing}): column")), "row {differing} not named: {r:?}");
    }
    // Only the rows that differ are counted, in each table.
    assert!(r.stdout.contains("public.items: 5 difference(s)"), "{r:?}");
    assert!(r.stdout.contains("public.names: 1 difference(s)"), "{r:?}");
}

/// Verify's bookkeeping on green (claiming parts, storing their summaries, the run's rows) is
/// small queries; none may be compiled by the JIT with inlining and optimization. They were:
/// `enable_sort = off`, which the summaries need, was set for every verify session, and the
/// planner's disable cost it adds to any plan that still sorts (a claim's `ORDER BY … LIMIT 1`)
/// is above every JIT threshold: 100 ms of CPU a claim against half a millisecond to run it.
/// Counted by green's `pg_stat_statements` (its own cluster: the module loads at start).
#[test]
fn verify_bookkeeping_is_not_jit_compiled() {
    let green = crate::support::cluster::Cluster::own(
        "green-statements",
        &["shared_preload_libraries=pg_stat_statements", "pg_stat_statements.track=all"],
    );
    let s = Oauth::on(crate::support::blue_cluster(), green, 5_000);
    s.green.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
    assert_eq!(s.green.psql("SELECT pg_jit_available()"), "t", "this test needs PostgreSQL's JIT (llvmjit)");
    let plan = s.plan_with_copy("workers = 2\nchunk_rows = 2000\ndefer_indexes = true");
    let r = run(&mut s.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    s.green.psql("SELECT pg_stat_statements_reset()");
    let r = run(&mut s.migrate(&["verify", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    let stats = |filter: &str| {
        s.green.psql(&format!(
            "SELECT count(*) || ' ' || coalesce(sum(calls), 0) || ' ' || coalesce(sum(jit_inlining_count), 0) \
             FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND {filter}"
        ))
    };
    // The claims ran (one a part, and one more a session that finds none left)...
    let claims = stats("query LIKE '%verify_parts%SKIP LOCKED%'");
    let calls: i64 = claims.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(calls >= 8, "claims: {claims}");
    // ...and neither they nor any other query but the summaries were inlined by the JIT.
    assert!(claims.ends_with(" 0"), "claims JIT-compiled with inlining (statements, calls, inlined): {claims}");
    let others = stats("query NOT LIKE 'SELECT abs(%'");
    assert!(others.ends_with(" 0"), "bookkeeping JIT-compiled with inlining (statements, calls, inlined): {others}");
}
