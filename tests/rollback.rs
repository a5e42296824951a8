//! The way back (issue 15): a cutover with `[cutover] way_back = true` captures green's writes
//! from before traffic reaches it; the running `copy` carries them to blue through the reverse
//! mapping; `migrate rollback` switches PgBouncer back with nothing lost; following blue resumes
//! and a later cutover succeeds. Checked with independent queries on both sides, through a real
//! PgBouncer, under a fixed-rate application that never stops.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use crate::{
    capture::{spawn_copy, status, wait_for},
    support::{app::App, assert_flowing, blue_cluster, run, wait_exit, Bouncer, Cluster, Oauth},
};

/// The fixture plan's entries whose way back is exact (revocations: a rename of nothing and a
/// time-zone shift; app_events: verbatim with its sequence), a PgBouncer in transaction mode in
/// front of blue, `way_back = true` and blue fenced after the switch.
fn setup(s: &Oauth, capture: &str) -> (Bouncer, PathBuf) {
    let blue_dsn = format!("host=127.0.0.1 port={} dbname={} user=postgres", s.blue.cluster.port, s.blue.name);
    let bouncer = Bouncer::start("transaction", &blue_dsn);
    let text = Oauth::plan_text();
    let mut blocks = text.split("\n[[table]]\n");
    let header = blocks.next().unwrap().replace("method = \"auto\"", &format!("method = \"{capture}\""));
    let entries: Vec<&str> =
        blocks.filter(|b| b.contains("hydra_oauth2_revocation\"") || b.contains("public.app_events\"")).collect();
    assert_eq!(entries.len(), 2);
    let text = format!(
        "{header}\n[[table]]\n{}\n[cutover]\nway_back = true\nfence_blue = true\n[cutover.pgbouncer]\nadmin_url = \"{}\"\n\
         database = \"app\"\ndatabases_file = \"{}\"\ngreen_dsn = \"host=127.0.0.1 port={} dbname={} user=postgres\"\n\
         pause_timeout = \"2s\"\n",
        entries.join("\n[[table]]\n"),
        bouncer.admin_url(),
        bouncer.databases_file.display(),
        s.green.cluster.port,
        s.green.name
    );
    (bouncer, s.write_plan(&text))
}

fn app_url(b: &Bouncer) -> String {
    format!("host=127.0.0.1 port={} dbname=app user=postgres", b.port)
}

fn near(st: &serde_json::Value) -> bool {
    st["phase"] == "following"
        && st["capture"]["lag_bytes"].as_i64().is_some_and(|l| l < 1 << 20)
        && st["capture"]["pending_keys"].as_i64().is_some_and(|p| p < 50)
        && st["capture"]["follower_seen_seconds_ago"].as_f64().is_some_and(|s| s < 2.0)
}

fn following(s: &Oauth, plan: &Path, copy: &mut Child) {
    wait_for(s, plan, copy, Duration::from_secs(120), "copy to finish and catch up", near);
    let r = run(&mut s.migrate(&["verify", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "verify: {r:?}");
}

fn payloads(db: &crate::support::TestDb) -> HashMap<String, i64> {
    db.psql("SELECT payload || '|' || id FROM app_events WHERE kind = 'app'")
        .lines()
        .filter_map(|l| l.split_once('|').map(|(p, id)| (p.to_string(), id.parse().unwrap())))
        .collect()
}

/// Blue's revocations, and green's brought to v1's form by a hand-written query (not the plan's
/// reverse mapping): they must be the same rows.
fn revocations(s: &Oauth) -> (String, String) {
    let blue = s.blue.psql(
        "SELECT string_agg(request_id || '|' || revoked_at::text || '|' || coalesce(reason, '∅'), E'\\n' ORDER BY request_id) \
         FROM hydra_oauth2_revocation",
    );
    let green = s.green.psql(
        "SELECT string_agg(request_id || '|' || (revoked_at AT TIME ZONE 'UTC')::text || '|' || coalesce(reason, '∅'), E'\\n' \
         ORDER BY request_id) FROM oauth2_revocations",
    );
    (blue, green)
}

fn rollback_under_load(capture: &str) {
    // Green of its own: the rollback's drain waits for the oldest transaction in green's whole
    // cluster (Known limits), and other tests' copies into the shared one can hold it past the
    // 2 s pause.
    let green: &'static Cluster = Cluster::own("rbgreen", &[]);
    let s = Oauth::on(blue_cluster(), green, 3_000);
    let (bouncer, plan) = setup(&s, capture);
    let p = plan.to_str().unwrap();
    let app = App::start(app_url(&bouncer), 200, "rb");
    app.set_mapped(false);
    let mut copy = spawn_copy(&s, &plan, &[]);
    following(&s, &plan, &mut copy);

    let dry = run(&mut s.migrate(&["cutover", p, "--dry-run"]));
    assert_eq!(dry.code, 0, "{dry:?}");
    assert!(dry.stdout.contains("[ok] way back: 2 table(s) carried back"), "{dry:?}");
    let r = run(&mut s.migrate(&["cutover", p]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("way back opened"), "{r:?}");
    // The copy does not exit: it follows back now.
    std::thread::sleep(Duration::from_millis(500));
    assert!(copy.try_wait().unwrap().is_none(), "copy exited after a switch that opened a way back");
    let (switched_at, acked_at_switch) = (Instant::now(), app.acked());

    // The v2 application writes revocations on green (inserts, updates, deletes), for at least
    // 4 s and until there are enough writes for the counts below and something was carried
    // back (a loaded machine is slower at each).
    app.set_v2(true);
    std::thread::sleep(Duration::from_secs(4));
    let st = loop {
        let st = status(&s, &plan);
        let carried = st["way_back"]["applied"].as_i64().is_some_and(|a| a > 0)
            && st["way_back"]["follower_seen_seconds_ago"].as_f64().is_some_and(|s| s < 3.0);
        let written = app.v2_writes() > 150 && app.acked() > acked_at_switch + 300;
        if (carried && written) || switched_at.elapsed() > Duration::from_secs(90) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(st["phase"], "switched", "{st}");
    assert_eq!(st["way_back"]["open"], true, "{st}");
    assert!(st["way_back"]["applied"].as_i64().is_some_and(|a| a > 0), "nothing carried back yet: {st}");
    assert!(st["way_back"]["follower_seen_seconds_ago"].as_f64().is_some_and(|s| s < 3.0), "{st}");
    let text = run(&mut s.migrate(&["status", p]));
    assert!(text.stdout.contains("way back OPEN since"), "{text:?}");

    // The application goes back to v1 (its v2 writes stop), then the rollback, under app_events
    // inserts that never stop.
    app.set_v2(false);
    let dry = run(&mut s.migrate(&["rollback", p, "--dry-run"]));
    assert_eq!(dry.code, 0, "{dry:?}");
    assert!(dry.stdout.contains("[ok] reverse follower: running"), "{dry:?}");
    assert!(dry.stdout.contains("[ok] way back proven"), "{dry:?}");
    app.reset_stall();
    let r = run(&mut s.migrate(&["rollback", p]));
    let rolled_back_at = Instant::now();
    assert_eq!(r.code, 0, "{r:?}");
    eprintln!("{}", r.stdout);
    assert!(r.stdout.contains("rolled back: PgBouncer database `app` points at blue"), "{r:?}");
    assert!(r.stdout.contains("traffic paused for"), "{r:?}");
    let line = std::fs::read_to_string(&bouncer.databases_file).unwrap();
    assert!(line.contains(&s.blue.name) && !line.contains(&s.green.name), "databases file: {line}");
    let (stall, failures) = app.snapshot();
    assert_eq!(failures, 0, "the application saw failures during the rollback");
    eprintln!("rollback: longest client-observed stall {stall:?}");
    assert!(stall < Duration::from_millis(1500), "longest stall {stall:?}");

    // Blue takes writes again: the fence is lifted, and ids go on past green's.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(s.blue.psql("SHOW default_transaction_read_only").trim(), "off");
    // Every revocation written on green is on blue in v1's form; withdrawn ones are gone.
    let (b, g) = revocations(&s);
    assert_eq!(b, g, "blue's revocations differ from green's after the rollback");
    assert!(g.contains("-v2-"), "no revocation was written on green");
    let st = status(&s, &plan);
    assert_eq!(st["way_back"]["open"], false, "{st}");
    assert_eq!(st["way_back"]["closed_by"], "rolled-back", "{st}");
    // Nothing of the way back is left on green.
    assert_eq!(s.green.psql("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'bluegreen%back%'"), "0");

    // Following forward resumed by itself: green catches up with blue's writes after the rollback.
    wait_for(&s, &plan, &mut copy, Duration::from_secs(60), "following blue again", near);
    let r = run(&mut s.migrate(&["verify", p]));
    assert_eq!(r.code, 0, "verify after the rollback: {r:?}");
    // Every insert acknowledged before this was written on blue, or carried back to it.
    let second_switch = Instant::now();
    let r = run(&mut s.migrate(&["cutover", p]));
    assert_eq!(r.code, 0, "the second cutover: {r:?}");
    std::thread::sleep(Duration::from_millis(500));
    let report = app.stop();
    assert!(report.failures.is_empty(), "the application saw failures: {:?}", report.failures);
    assert!(report.v2_writes > 100, "too few v2 writes: {}", report.v2_writes);
    // Every acknowledged insert, whichever side took it, is on blue (written there or carried
    // back), up to the second switch; and on green.
    let blue = payloads(&s.blue);
    let green = payloads(&s.green);
    let mut on_green_in_window = 0;
    for a in &report.acks {
        assert_eq!(green.get(&a.payload), Some(&a.id), "acknowledged insert {} missing on green", a.payload);
        if a.at < second_switch {
            assert_eq!(blue.get(&a.payload), Some(&a.id), "acknowledged insert {} missing on blue", a.payload);
        }
        if a.at > switched_at && a.at < rolled_back_at {
            on_green_in_window += 1;
        }
    }
    assert!(on_green_in_window > 200, "too few inserts while traffic was on green: {on_green_in_window}");
    // After the second switch the copy follows back again; `finish` ends the window and it exits.
    let r = run(&mut s.migrate(&["finish", p]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("the way back is closed"), "{r:?}");
    assert!(wait_exit(&mut copy, Duration::from_secs(60)).success());
    let db = &s.blue.name;
    assert_eq!(s.blue.psql(&format!("SELECT count(*) FROM pg_replication_slots WHERE database = '{db}'")), "0");
    assert_eq!(s.green.psql("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'bluegreen%back%'"), "0");
    let r = run(&mut s.migrate(&["rollback", p]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("the way back was closed (finished"), "{r:?}");
}

#[test]
fn rollback_through_pgbouncer_under_load_logical() {
    rollback_under_load("logical");
}

#[test]
fn rollback_through_pgbouncer_under_load_trigger() {
    rollback_under_load("trigger");
}

fn wait_phase(s: &Oauth, plan: &Path, phase: &str, within: Duration) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let st = status(s, plan);
        if st["phase"] == phase {
            return st;
        }
        assert!(started.elapsed() < within, "phase did not become {phase} within {within:?}: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn on(bouncer: &Bouncer, db: &str) -> bool {
    std::fs::read_to_string(&bouncer.databases_file).unwrap().contains(db)
}

fn with_fault(s: &Oauth, args: &[&str], fault: &str) -> crate::support::Run {
    run(s.migrate(args).env("MIGRATE_FAULT", fault))
}

/// The reverse follower killed between blue's commit and green's bookkeeping re-applies the
/// batch; a rollback killed at each step before RELOAD is undone by the reverse follower
/// (traffic stays on green, the way back stays open), one killed after RELOAD is finished by
/// it; without a follower, the next `rollback` recovers a killed one and rolls back by itself.
#[test]
fn rollback_killed_at_each_step_is_recovered() {
    // Green of its own, as in `rollback_under_load`.
    let green: &'static Cluster = Cluster::own("rbkgreen", &[]);
    let s = Oauth::on(blue_cluster(), green, 2_000);
    let (bouncer, plan) = setup(&s, "logical");
    let p = plan.to_str().unwrap();
    let app = App::start(app_url(&bouncer), 200, "rbcrash");
    app.set_mapped(false);
    let mut copy = s.background(&["copy", p]).env("MIGRATE_FAULT", "back.applied").spawn().unwrap();
    following(&s, &plan, &mut copy);
    let r = run(&mut s.migrate(&["cutover", p]));
    assert_eq!(r.code, 0, "{r:?}");
    app.set_v2(true);
    // The first reverse batch: blue committed, green never forgot the keys.
    let st = wait_exit(&mut copy, Duration::from_secs(60));
    assert_eq!(st.code(), Some(137), "the copy should die at back.applied");
    let mut copy = spawn_copy(&s, &plan, &[]);
    std::thread::sleep(Duration::from_secs(2));
    for point in ["rollback.caught-up", "rollback.paused", "rollback.drained", "rollback.before-repoint"] {
        let r = with_fault(&s, &["rollback", p], point);
        assert_eq!(r.code, 137, "{point}: {r:?}");
        let st = wait_phase(&s, &plan, "switched", Duration::from_secs(60));
        assert_eq!(st["way_back"]["open"], true, "{point}: {st}");
        assert!(on(&bouncer, &s.green.name), "{point}: traffic should stay on green");
        assert_flowing(&app);
        assert_eq!(s.blue.psql("SHOW default_transaction_read_only").trim(), "on", "{point}: blue fenced again");
    }
    app.set_v2(false);
    let r = with_fault(&s, &["rollback", p], "rollback.reloaded");
    assert_eq!(r.code, 137, "{r:?}");
    wait_phase(&s, &plan, "following", Duration::from_secs(60));
    assert!(on(&bouncer, &s.blue.name));
    assert_flowing(&app);
    let (b, g) = revocations(&s);
    assert_eq!(b, g, "blue's revocations differ from green's after the recovered rollback");
    assert!(g.contains("-v2-"));

    // Forward again, a second switch, then no follower at all.
    wait_for(&s, &plan, &mut copy, Duration::from_secs(60), "following blue again", near);
    let r = run(&mut s.migrate(&["cutover", p]));
    assert_eq!(r.code, 0, "{r:?}");
    app.set_v2(true);
    std::thread::sleep(Duration::from_secs(2));
    crate::capture::sigint_and_wait(&mut copy);
    std::thread::sleep(Duration::from_secs(1));
    app.set_v2(false);
    let r = with_fault(&s, &["rollback", p], "rollback.paused");
    assert_eq!(r.code, 137, "{r:?}");
    std::thread::sleep(Duration::from_millis(300));
    let n = app.acked();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(app.acked(), n, "PgBouncer should still be paused: nobody recovered it yet");
    let r = run(&mut s.migrate(&["rollback", p]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("recovering") || r.stdout.contains("not running"), "{r:?}");
    assert!(r.stdout.contains("rolled back"), "{r:?}");
    assert!(on(&bouncer, &s.blue.name));
    let (b, g) = revocations(&s);
    assert_eq!(b, g, "blue's revocations differ from green's after a rollback without a follower");
    assert_flowing(&app);
    let report = app.stop();
    assert!(report.failures.is_empty(), "the application saw failures: {:?}", report.failures);
    let blue = payloads(&s.blue);
    for a in &report.acks {
        assert_eq!(blue.get(&a.payload), Some(&a.id), "acknowledged insert {} missing on blue", a.payload);
    }
}

/// A cutover that opened the way back and then failed leaves nothing of it on green.
#[test]
fn cutover_killed_after_opening_the_way_back_leaves_nothing_on_green() {
    let s = Oauth::new(1_000);
    let (bouncer, plan) = setup(&s, "trigger");
    let p = plan.to_str().unwrap();
    let app = App::start(app_url(&bouncer), 100, "rbopen");
    app.set_mapped(false);
    let mut copy = spawn_copy(&s, &plan, &[]);
    following(&s, &plan, &mut copy);
    let r = with_fault(&s, &["cutover", p], "cutover.paused");
    assert_eq!(r.code, 137, "{r:?}");
    let st = wait_phase(&s, &plan, "aborted", Duration::from_secs(60));
    assert!(st["way_back"].is_null() || st["way_back"]["open"] == false, "{st}");
    assert_eq!(s.green.psql("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'bluegreen%back%'"), "0");
    assert_eq!(s.green.psql(&s.sql("SELECT to_regclass('bluegreen_oauth_v2.changes_back') IS NULL")), "t");
    assert!(on(&bouncer, &s.blue.name));
    assert_flowing(&app);
    let r = run(&mut s.migrate(&["rollback", p]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("[FAIL] switched, way back open: phase aborted"), "{r:?}");
    crate::capture::sigint_and_wait(&mut copy);
    assert!(app.stop().failures.is_empty());
}

/// `migrate demo --rollback`: cutover, writes on green, rollback, cutover again; zero failed
/// and zero lost in both directions, each stall printed.
#[test]
fn demo_with_rollback_runs_end_to_end() {
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("migrate"))
        .args(["demo", "--rows", "2000", "--rate", "200", "--rollback"])
        .env_remove("MIGRATE_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo --rollback failed\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for expected in [
        "rolled back: PgBouncer database `app` points at blue",
        "failed writes:       0",
        "lost writes:         0",
        "lost on the way back: 0",
        "revocations on blue equal green's in v1 form",
        "longest client-observed stall during the rollback:",
        "longest client-observed stall during the second cutover:",
    ] {
        assert!(stdout.contains(expected), "missing `{expected}`:\n{stdout}");
    }
}

/// A PgBouncer in front of `c`'s blue and a plan of `entries` with `way_back = true` (capture
/// `method`, one copy worker).
fn with_way_back(c: &crate::support::Custom, method: &str, entries: &str) -> (Bouncer, PathBuf) {
    let blue_dsn = format!("host=127.0.0.1 port={} dbname={} user=postgres", c.blue.cluster.port, c.blue.name);
    let bouncer = Bouncer::start("transaction", &blue_dsn);
    let tables = format!(
        "{entries}[cutover]\nway_back = true\n[cutover.pgbouncer]\nadmin_url = \"{}\"\ndatabase = \"app\"\n\
         databases_file = \"{}\"\ngreen_dsn = \"host=127.0.0.1 port={} dbname={} user=postgres\"\npause_timeout = \"2s\"\n",
        bouncer.admin_url(),
        bouncer.databases_file.display(),
        c.green.cluster.port,
        c.green.name
    );
    let plan = c.plan(method, "workers = 1", &tables);
    (bouncer, plan)
}

const ODD_BLUE: &str = "CREATE TABLE accounts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, email text NOT NULL,
      created timestamp NOT NULL, note text, legacy text DEFAULT 'v1');
    INSERT INTO accounts (email, created, note) SELECT 'u' || g || '@x', '2026-01-01'::timestamp + g * interval '1 hour',
      CASE WHEN g % 3 = 0 THEN NULL ELSE 'note ' || g END FROM generate_series(1, 300) g;
    CREATE TABLE memberships (org text, member int, role text NOT NULL, PRIMARY KEY (org, member));
    INSERT INTO memberships SELECT 'org' || (g % 5), g, 'r' || g FROM generate_series(1, 200) g;";
const ODD_GREEN: &str =
    "CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL, created_at timestamptz NOT NULL, note text);
    CREATE TABLE members (org text, member int, role text NOT NULL, PRIMARY KEY (org, member));";

/// The way back on shapes the fixture lacks: a blue key that is an identity column GENERATED
/// ALWAYS (green's is a plain bigint the v2 application fills), a composite key, a column green
/// does not carry (blue's default fills it), TOASTed values, NULLs, key changes of both kinds,
/// and a green transaction that commits only while the rollback already catches up. Blue's
/// identity sequence ends past every id green gave out.
#[test]
fn way_back_carries_identity_composite_toasted_and_late_writes() {
    // Green of its own, as in `rollback_under_load`.
    let green: &'static Cluster = Cluster::own("wbgreen", &[]);
    let c = crate::support::Custom::on((blue_cluster(), green), ODD_BLUE, ODD_GREEN);
    let (_bouncer, plan) = with_way_back(
        &c,
        "trigger",
        "[[table]]\nsource = \"public.accounts\"\ntarget = \"public.users\"\nkey = [\"id\"]\ndrop = [\"legacy\"]\n\
         [table.columns]\nid = \"id\"\nemail = \"email\"\ncreated_at = \"created AT TIME ZONE 'UTC'\"\nnote = \"note\"\n\
         [[table]]\nsource = \"public.memberships\"\ntarget = \"public.members\"\nkey = [\"org\", \"member\"]\n",
    );
    let p = plan.to_str().unwrap();
    let mut copy = c.spawn(&["copy", p], &[]);
    c.wait_phase("following");
    let r = run(&mut c.migrate(&["verify", p]));
    assert_eq!(r.code, 0, "{r:?}");
    let r = run(&mut c.migrate(&["cutover", p]));
    assert_eq!(r.code, 0, "{r:?}");

    // The v2 application on green.
    c.green.psql(
        "INSERT INTO users VALUES (100000, 'new@x', now(), repeat('toast ', 20000));
         UPDATE users SET note = NULL WHERE id = 5;
         UPDATE users SET email = 'changed@x', note = repeat('big ', 30000) WHERE id = 6;
         UPDATE users SET id = 200000 WHERE id = 7;
         DELETE FROM users WHERE id = 8;
         UPDATE members SET member = member + 1000 WHERE org = 'org1' AND member < 50;
         UPDATE members SET org = 'org9' WHERE org = 'org2' AND member < 30;
         INSERT INTO members VALUES ('new', 1, 'fresh'), ('new', 2, 'x');
         DELETE FROM members WHERE org = 'org3' AND member < 40;",
    );
    // A transaction that commits only after the rollback has begun catching up.
    let late = {
        let (cluster, name) = (c.green.cluster, c.green.name.clone());
        std::thread::spawn(move || {
            cluster.psql(
                &name,
                "BEGIN; INSERT INTO users VALUES (300000, 'late@x', now(), 'late'); \
                 UPDATE members SET role = 'late' WHERE org = 'org4' AND member = 4; SELECT pg_sleep(2); COMMIT;",
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let r = run(&mut c.migrate(&["rollback", p]));
    assert_eq!(r.code, 0, "{r:?}");
    late.join().unwrap();

    let blue_accounts = c.blue.psql(
        "SELECT string_agg(id || '|' || email || '|' || created::text || '|' || coalesce(note, '∅') || '|' || legacy, E'\\n' ORDER BY id) FROM accounts",
    );
    let green_users = c.green.psql(
        "SELECT string_agg(id || '|' || email || '|' || (created_at AT TIME ZONE 'UTC')::text || '|' || coalesce(note, '∅') || '|v1', E'\\n' ORDER BY id) FROM users",
    );
    assert_eq!(blue_accounts, green_users, "accounts on blue differ from users on green");
    assert!(green_users.contains("300000|late@x"), "the late transaction's row is missing");
    let q = "SELECT string_agg(org || '|' || member || '|' || role, E'\\n' ORDER BY org, member) FROM ";
    assert_eq!(c.blue.psql(&format!("{q} memberships")), c.green.psql(&format!("{q} members")));
    assert!(c.blue.psql("SELECT role FROM memberships WHERE org = 'org4' AND member = 4").contains("late"));
    // Blue's identity sequence is past every id green gave out.
    let next: i64 = c
        .blue
        .psql("INSERT INTO accounts (email, created) VALUES ('after@x', now()) RETURNING id")
        .trim()
        .parse()
        .unwrap();
    assert!(next > 300000, "blue's identity gave {next}");
    crate::capture::sigint_and_wait(&mut copy);
}

/// A lossy reverse mapping is found before the switch: the cutover's preflight with `way_back`
/// names the key and column that would change, and switches nothing.
#[test]
fn cutover_with_a_lossy_way_back_names_key_and_column() {
    let c = crate::support::Custom::new(ODD_BLUE, ODD_GREEN);
    let (bouncer, plan) = with_way_back(
        &c,
        "trigger",
        "[[table]]\nsource = \"public.accounts\"\ntarget = \"public.users\"\nkey = [\"id\"]\ndrop = [\"legacy\"]\n\
         [table.columns]\nid = \"id\"\nemail = \"email\"\ncreated_at = \"created AT TIME ZONE 'UTC'\"\nnote = \"note\"\n\
         [table.reverse]\nnote = \"left(note, 3)\"\n\
         [[table]]\nsource = \"public.memberships\"\ntarget = \"public.members\"\nkey = [\"org\", \"member\"]\n",
    );
    let p = plan.to_str().unwrap();
    let r = run(&mut c.migrate(&["plan", p]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("way back (cutover.way_back): every entry (2) can be carried back"), "{r:?}");
    let r = run(&mut c.migrate(&["copy", p, "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    let r = run(&mut c.migrate(&["verify", p]));
    assert_eq!(r.code, 0, "{r:?}");
    let r = run(&mut c.migrate(&["cutover", p]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("[FAIL] way back proven: would change: public.users key (1) column note"), "{r:?}");
    assert!(r.stdout.contains("cutover not attempted"), "{r:?}");
    assert!(std::fs::read_to_string(&bouncer.databases_file).unwrap().contains(&c.blue.name));
}

/// `plan` says what the cutover's preflight will refuse with `way_back = true`: here a blue
/// column that is an identity `GENERATED ALWAYS` outside the key (no update may set it).
#[test]
fn plan_names_what_keeps_the_way_back_closed() {
    let c = crate::support::Custom::new(
        "CREATE TABLE t (id int PRIMARY KEY, n bigint GENERATED ALWAYS AS IDENTITY, v text);",
        "CREATE TABLE t (id int PRIMARY KEY, n bigint, v text);",
    );
    let plan = c.plan(
        "trigger",
        "workers = 1",
        "[[table]]\nsource = \"public.t\"\nkey = [\"id\"]\n[cutover]\nway_back = true\n",
    );
    let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "the forward migration is sound: {r:?}");
    assert!(
        r.stdout.contains("way back (cutover.way_back): the cutover will refuse: public.t: blue's public.t column(s) n are GENERATED ALWAYS AS IDENTITY"),
        "{r:?}"
    );
}

const JOINED_BLUE: &str = "CREATE TABLE clients (id text PRIMARY KEY, name text NOT NULL);
    CREATE TABLE login_request (challenge text PRIMARY KEY, subject text NOT NULL, client_id text NOT NULL REFERENCES clients,
      requested_at timestamp NOT NULL, note text);
    CREATE TABLE login_handled (challenge text PRIMARY KEY REFERENCES login_request ON DELETE CASCADE ON UPDATE CASCADE,
      remember boolean NOT NULL, error text NOT NULL DEFAULT '{}', handled_at timestamp NOT NULL);
    INSERT INTO clients SELECT 'c' || g, 'client ' || g FROM generate_series(1, 5) g;
    INSERT INTO login_request SELECT 'l' || g, 'sub' || g, 'c' || (g % 5 + 1), '2026-01-01'::timestamp + g * interval '1 minute',
      CASE WHEN g % 7 = 0 THEN repeat('toast ', 20000) END FROM generate_series(1, 300) g;
    INSERT INTO login_handled SELECT 'l' || g, g % 2 = 0, CASE WHEN g % 3 = 0 THEN '{\"e\":1}' ELSE '{}' END,
      '2026-01-01'::timestamp + g * interval '1 minute' + interval '5 seconds' FROM generate_series(1, 300) g WHERE g % 4 <> 0;";
const JOINED_GREEN: &str =
    "CREATE TABLE flow (challenge text PRIMARY KEY, subject text NOT NULL, client_id text NOT NULL,
      client_name text, requested_at timestamptz NOT NULL, note text, login_remember boolean NOT NULL, login_error text,
      login_handled_at timestamptz);";

/// Blue's logins with their handled rows, one line per login, as v1 has them.
const BLUE_LOGINS: &str =
    "SELECT string_agg(l.challenge || '|' || l.subject || '|' || l.client_id || '|' || l.requested_at::text \
      || '|' || coalesce(md5(l.note), '∅') || '|' || coalesce(h.remember::text, '∅') || '|' || coalesce(h.error, '∅') \
      || '|' || coalesce(h.handled_at::text, '∅'), E'\\n' ORDER BY l.challenge) \
    FROM login_request l LEFT JOIN login_handled h USING (challenge)";
/// Green's flows converted to the same lines by hand: a flow is handled when it has a time.
const GREEN_LOGINS: &str = "SELECT string_agg(challenge || '|' || subject || '|' || client_id || '|' \
      || (requested_at AT TIME ZONE 'UTC')::text || '|' || coalesce(md5(note), '∅') || '|' \
      || CASE WHEN login_handled_at IS NULL THEN '∅' ELSE login_remember::text END || '|' \
      || CASE WHEN login_handled_at IS NULL THEN '∅' ELSE coalesce(login_error, '{}') END || '|' \
      || coalesce((login_handled_at AT TIME ZONE 'UTC')::text, '∅'), E'\\n' ORDER BY challenge) FROM flow";

/// A target row merged from two blue tables goes back as two: the login and its handled row
/// (`write_back = true`). Rows gain, change and lose their handled row on green, are re-keyed,
/// deleted and inserted with and without one, while the reverse follower runs and while the
/// rollback catches up; blue then holds exactly green's flows split in v1 form, with no handled
/// row left without its login, and the lookup join (clients) untouched.
#[test]
fn way_back_splits_a_joined_row_into_its_tables() {
    // Green of its own, as in `rollback_under_load`.
    let green: &'static Cluster = Cluster::own("wjgreen", &[]);
    let c = crate::support::Custom::on((blue_cluster(), green), JOINED_BLUE, JOINED_GREEN);
    let (_bouncer, plan) = with_way_back(
        &c,
        "logical",
        "[[table]]\nsource = \"public.login_request\"\nalias = \"l\"\ntarget = \"public.flow\"\nkey = [\"challenge\"]\n\
         [[table.join]]\nalias = \"h\"\ntable = \"public.login_handled\"\non = { challenge = \"l.challenge\" }\nwrite_back = true\n\
         [table.join.reverse]\nremember = \"login_remember\"\nerror = \"coalesce(login_error, '{}')\"\n\
         [[table.join]]\nalias = \"c\"\ntable = \"public.clients\"\non = { id = \"l.client_id\" }\n\
         [table.columns]\nrequested_at = \"l.requested_at AT TIME ZONE 'UTC'\"\nlogin_remember = \"coalesce(h.remember, false)\"\n\
         login_error = \"NULLIF(h.error, '{}')\"\nlogin_handled_at = \"h.handled_at AT TIME ZONE 'UTC'\"\nclient_name = \"c.name\"\n",
    );
    let p = plan.to_str().unwrap();
    let r = run(&mut c.migrate(&["plan", p]));
    assert_eq!(r.code, 0, "{r:?}");
    for shown in [
        "way back (cutover.way_back): every entry (1) can be carried back",
        "join h (public.login_handled) written back where ((\"login_handled_at\" AT TIME ZONE 'UTC')::timestamp without time zone) IS NOT NULL, upserted on (challenge)",
        "client_name reads c (public.clients), a lookup join the way back does not write",
    ] {
        assert!(r.stdout.contains(shown), "missing `{shown}`: {r:?}");
    }
    let mut copy = c.spawn(&["copy", p], &[]);
    c.wait_phase("following");
    let r = run(&mut c.migrate(&["verify", p]));
    assert_eq!(r.code, 0, "{r:?}");
    let r = run(&mut c.migrate(&["cutover", p]));
    assert_eq!(r.code, 0, "{r:?}");

    // The v2 application on green, while the reverse follower carries it back.
    c.green.psql(
        "INSERT INTO flow VALUES ('new1', 's', 'c1', 'client 1', now(), NULL, true, NULL, now()),
                                 ('new2', 's', 'c2', 'client 2', now(), 'n', false, NULL, NULL);
         UPDATE flow SET login_handled_at = now(), login_remember = true, login_error = '{\"x\":2}' WHERE challenge = 'l4';
         UPDATE flow SET login_handled_at = NULL, login_remember = false, login_error = NULL WHERE challenge = 'l5';
         UPDATE flow SET login_error = NULL WHERE challenge = 'l6';
         UPDATE flow SET challenge = 'l7-k' WHERE challenge = 'l7';
         UPDATE flow SET note = repeat('big ', 30000), subject = 'changed' WHERE challenge = 'l9';
         DELETE FROM flow WHERE challenge IN ('l10', 'l12');
         UPDATE flow SET client_name = 'renamed' WHERE challenge = 'l11';",
    );
    let writer = {
        let (cluster, name) = (c.green.cluster, c.green.name.clone());
        std::thread::spawn(move || {
            for round in 0..20 {
                cluster.psql(
                    &name,
                    &format!(
                        "UPDATE flow SET login_handled_at = CASE WHEN login_handled_at IS NULL THEN now() END, \
                           login_remember = NOT login_remember WHERE challenge IN ('l{a}', 'l{b}');
                         INSERT INTO flow VALUES ('w{round}', 's', 'c3', NULL, now(), NULL, false, NULL, \
                           CASE WHEN {round} % 2 = 0 THEN now() END);
                         DELETE FROM flow WHERE challenge = 'l{d}';",
                        a = 100 + round,
                        b = 200 + round,
                        d = 250 + round
                    ),
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    writer.join().unwrap();
    // A transaction that commits only after the rollback has begun catching up.
    let late = {
        let (cluster, name) = (c.green.cluster, c.green.name.clone());
        std::thread::spawn(move || {
            cluster.psql(
                &name,
                "BEGIN; UPDATE flow SET login_handled_at = now(), login_error = '{\"late\":1}' WHERE challenge = 'l8';
                 UPDATE flow SET login_handled_at = NULL WHERE challenge = 'l1'; SELECT pg_sleep(2); COMMIT;",
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let r = run(&mut c.migrate(&["rollback", p]));
    assert_eq!(r.code, 0, "{r:?}");
    late.join().unwrap();

    let (blue, green) = (c.blue.psql(BLUE_LOGINS), c.green.psql(GREEN_LOGINS));
    assert_eq!(blue, green, "logins on blue differ from flows on green");
    assert!(green.contains("l8|") && green.contains("{\"late\":1}"), "the late transaction's write is missing");
    assert!(!green.contains("\nl10|") && green.contains("\nl7-k|") && green.contains("\nnew2|"));
    let orphans = c.blue.psql(
        "SELECT count(*) FROM login_handled h WHERE NOT EXISTS (SELECT 1 FROM login_request l WHERE l.challenge = h.challenge)",
    );
    assert_eq!(orphans, "0", "handled rows left without their login");
    assert_eq!(
        c.blue.psql("SELECT string_agg(name, ',' ORDER BY id) FROM clients"),
        "client 1,client 2,client 3,client 4,client 5"
    );
    // Following forward again, green is blue's transform (the lookup's value back too).
    c.wait_phase("following");
    let r = run(&mut c.migrate(&["verify", p]));
    assert_eq!(r.code, 0, "{r:?}");
    crate::capture::sigint_and_wait(&mut copy);
}

/// `plan` proves a joined row's way back on blue's rows and says what keeps one closed: a lossy
/// reverse of a joined column is named by key and `alias.column`; a join that picks one of
/// several rows cannot be written back; `present` on a join the way back does not write is a
/// plan error naming its line.
#[test]
fn plan_proves_a_joined_rows_way_back_and_names_what_it_cannot() {
    let c = crate::support::Custom::new(JOINED_BLUE, JOINED_GREEN);
    let entry = |join: &str| {
        format!(
            "[[table]]\nsource = \"public.login_request\"\nalias = \"l\"\ntarget = \"public.flow\"\nkey = [\"challenge\"]\n\
             [[table.join]]\nalias = \"h\"\ntable = \"public.login_handled\"\non = {{ challenge = \"l.challenge\" }}\n{join}\n\
             [[table.join]]\nalias = \"c\"\ntable = \"public.clients\"\non = {{ id = \"l.client_id\" }}\n\
             [table.columns]\nrequested_at = \"l.requested_at AT TIME ZONE 'UTC'\"\nlogin_remember = \"coalesce(h.remember, false)\"\n\
             login_error = \"NULLIF(h.error, '{{}}')\"\nlogin_handled_at = \"h.handled_at AT TIME ZONE 'UTC'\"\nclient_name = \"c.name\"\n\
             [cutover]\nway_back = true\n"
        )
    };
    // The error column written back as v1's "no error" whatever green holds: lossy where v1 had one.
    let lossy = c.plan(
        "trigger",
        "workers = 1",
        &entry("write_back = true\n[table.join.reverse]\nremember = \"login_remember\"\nerror = \"'{}'\""),
    );
    let r = run(&mut c.migrate(&["plan", lossy.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("column h.error: {\"e\":1} comes back {}"), "{r:?}");

    let picked = c.plan(
        "trigger",
        "workers = 1",
        &entry("pick = \"h.handled_at DESC\"\nwrite_back = true\n[table.join.reverse]\nremember = \"login_remember\"\nerror = \"coalesce(login_error, '{}')\""),
    );
    let r = run(&mut c.migrate(&["plan", picked.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .contains("the cutover will refuse: public.flow: join h picks one of several rows of public.login_handled"),
        "{r:?}"
    );

    // A client row is shared by many logins: written back, deleting one login's would delete it
    // for all.
    let shared = c.plan(
        "trigger",
        "workers = 1",
        &entry("write_back = true\n[table.join.reverse]\nremember = \"login_remember\"\nerror = \"coalesce(login_error, '{}')\"")
            .replace("on = { id = \"l.client_id\" }\n", "on = { id = \"l.client_id\" }\nwrite_back = true\n"),
    );
    let r = run(&mut c.migrate(&["plan", shared.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("join c is written back only when it links one row of public.clients to one driving row"),
        "{r:?}"
    );

    let stray = c.plan("trigger", "workers = 1", &entry("present = \"login_handled_at IS NOT NULL\""));
    let r = run(&mut c.migrate(&["plan", stray.to_str().unwrap()]));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("table[1].join[1].present") && r.stderr.contains("set write_back = true on join h"),
        "{r:?}"
    );
}
