//! Handover: the application changes version with the database. A v1 writer (v1 SQL, blue's
//! schema) uses PgBouncer entry `app`; a v2 writer (v2 SQL, green's schema) uses `app_v2`,
//! paused until the switch. An `in_pause` hook flips which one receives traffic. The v1 writer
//! never stops (a stray old pod): after the switch its statements must fail cleanly, and green's
//! statement log must never show one of them.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::support::{blue_cluster, fingerprint, green_cluster, run, Bouncer, Custom};

const BLUE: &str = "CREATE TABLE tokens (id bigserial PRIMARY KEY, token text NOT NULL UNIQUE, \
                    revoked boolean NOT NULL DEFAULT false); \
                    INSERT INTO tokens (token, revoked) SELECT 'seed-' || g, g % 7 = 0 FROM generate_series(1, 2000) g;";
const GREEN: &str = "CREATE TABLE tokens (id bigserial PRIMARY KEY, token text NOT NULL UNIQUE, \
                     state text NOT NULL CHECK (state IN ('active', 'revoked')));";

/// What one writer saw.
#[derive(Debug, Default)]
struct Seen {
    /// Tokens whose statement was acknowledged, with the statement kind.
    acked: Vec<(String, &'static str)>,
    /// Failed statements: SQLSTATE (when the server or PgBouncer sent one) and message.
    errors: Vec<(Option<String>, String)>,
}

/// A writer through PgBouncer entry `db`, writing while `go()` holds, reconnecting after errors.
fn writer(
    port: u16,
    db: &str,
    stop: Arc<AtomicBool>,
    go: impl Fn() -> bool + Send + 'static,
    statement: impl Fn(u64) -> (String, &'static str, String) + Send + 'static,
) -> JoinHandle<Seen> {
    let url = format!("host=127.0.0.1 port={port} dbname={db} user=postgres connect_timeout=3");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut seen = Seen::default();
        let mut client: Option<tokio_postgres::Client> = None;
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            if !go() {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                match rt.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls)) {
                    Ok((c, conn)) => {
                        rt.spawn(conn);
                        client = Some(c);
                    }
                    Err(e) => {
                        seen.errors.push((e.code().map(|c| c.code().to_string()), e.to_string()));
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                }
            }
            n += 1;
            let (token, kind, sql) = statement(n);
            let c = client.as_ref().unwrap();
            match rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), c.simple_query(&sql)).await }) {
                Ok(Ok(_)) => seen.acked.push((token, kind)),
                Ok(Err(e)) => {
                    let detail = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
                    seen.errors.push((e.code().map(|c| c.code().to_string()), detail));
                    client = None;
                }
                Err(_) => {
                    seen.errors.push((None, "no answer within 60 s".into()));
                    client = None;
                }
            }
            std::thread::sleep(Duration::from_millis(4));
        }
        seen
    })
}

fn admin(b: &Bouncer, sql: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&b.admin_url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.simple_query(sql).await.unwrap_or_else(|e| panic!("admin `{sql}`: {e}"));
    });
}

/// A PgBouncer with `app` → blue and `app_v2` → green.
fn two_entries(c: &Custom) -> Bouncer {
    let bouncer = Bouncer::start(
        "transaction",
        &format!("host=127.0.0.1 port={} dbname={} user=postgres", c.blue.cluster.port, c.blue.name),
    );
    let mut dbs = std::fs::read_to_string(&bouncer.databases_file).unwrap();
    dbs.push_str(&format!(
        "app_v2 = host=127.0.0.1 port={} dbname={} user=postgres\n",
        c.green.cluster.port, c.green.name
    ));
    std::fs::write(&bouncer.databases_file, dbs).unwrap();
    admin(&bouncer, "RELOAD");
    bouncer
}

fn flag(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default().trim().to_string()
}

/// The plan with `mode = "handover"` and the given `[[cutover.hook]]` tables.
fn plan(c: &Custom, b: &Bouncer, hooks: &str) -> PathBuf {
    let tables = format!(
        "[[table]]\nsource = \"public.tokens\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\ntoken = \"token\"\n\
         state = \"CASE WHEN revoked THEN 'revoked' ELSE 'active' END\"\n\
         [cutover]\n[cutover.pgbouncer]\nmode = \"handover\"\nadmin_url = \"{}\"\ndatabase = \"app\"\n\
         v2_database = \"app_v2\"\npause_timeout = \"4s\"\n{hooks}",
        b.admin_url()
    );
    c.plan("auto", "", &tables)
}

fn log_len(cluster_log: &Path) -> u64 {
    std::fs::metadata(cluster_log).map(|m| m.len()).unwrap_or(0)
}

fn log_since(cluster_log: &Path, from: u64) -> String {
    let bytes = std::fs::read(cluster_log).unwrap();
    String::from_utf8_lossy(&bytes[from as usize..]).into_owned()
}

#[test]
fn handover_switches_application_versions_and_no_v1_statement_reaches_green() {
    let c = Custom::new(BLUE, GREEN);
    // Every statement either database runs is logged from here on: the proof that no v1
    // statement ran on green (and, on blue, that the log does show them).
    for (cluster, db) in [(blue_cluster(), &c.blue.name), (green_cluster(), &c.green.name)] {
        cluster.psql("postgres", &format!("ALTER DATABASE {db} SET log_statement = 'all'"));
    }
    let (blue_log, green_log) = (blue_cluster().dir.join("log"), green_cluster().dir.join("log"));
    let (blue_from, green_from) = (log_len(&blue_log), log_len(&green_log));
    let tag = c.green.name.clone();

    let bouncer = two_entries(&c);
    admin(&bouncer, "PAUSE app_v2");

    let dir = tempfile::tempdir().unwrap();
    let active = dir.path().join("active");
    std::fs::write(&active, "v1").unwrap();
    let done = dir.path().join("done");
    let flip = format!("echo v2 > {}", active.display());
    let back = format!(
        "[[cutover.hook]]\nat = \"on_abort\"\nrun = \"echo v1 > {} && echo rolled back by $MIGRATE_PLAN\"\n",
        active.display()
    );

    // The v1 application: never stops on its own, like a pod that was not scaled down.
    let stop = Arc::new(AtomicBool::new(false));
    let v1_tag = tag.clone();
    let v1 = writer(
        bouncer.port,
        "app",
        stop.clone(),
        || true,
        move |n| {
            if n % 5 == 0 && n > 5 {
                let t = format!("v1-{}", n - 3);
                let sql = format!("UPDATE tokens SET revoked = true WHERE token = '{t}' /* v1 {v1_tag} */");
                (t, "update", sql)
            } else {
                let t = format!("v1-{n}");
                let sql = format!("INSERT INTO tokens (token, revoked) VALUES ('{t}', false) /* v1 {v1_tag} */");
                (t, "insert", sql)
            }
        },
    );
    let active2 = active.clone();
    let v2_tag = tag.clone();
    let v2 = writer(
        bouncer.port,
        "app_v2",
        stop.clone(),
        move || flag(&active2) == "v2",
        move |n| {
            let t = format!("v2-{n}");
            let sql = format!("INSERT INTO tokens (token, state) VALUES ('{t}', 'active') /* v2 {v2_tag} */");
            (t, "insert", sql)
        },
    );

    let first = plan(&c, &bouncer, "");
    let mut copy = c.spawn(&["copy", first.to_str().unwrap()], &[]);
    c.wait_phase("following");
    std::thread::sleep(Duration::from_secs(1));
    let r = run(&mut c.migrate(&["verify", first.to_str().unwrap()]));
    assert_eq!(r.code, 0, "verify: {r:?}");

    // 1. An in_pause hook that flips the traffic and then hangs: killed at its timeout, the
    //    cutover aborts to blue, the on_abort hook flips the traffic back.
    let hanging = plan(
        &c,
        &bouncer,
        &format!("[[cutover.hook]]\nat = \"in_pause\"\nrun = \"{flip} && sleep 30\"\ntimeout = \"1s\"\n{back}"),
    );
    let r = run(&mut c.migrate(&["cutover", "--dry-run", hanging.to_str().unwrap()]));
    assert_eq!(r.code, 0, "dry run: {r:?}");
    for shown in ["handover", "app_v2", "in_pause", "on_abort", "sleep 30"] {
        assert!(r.stdout.contains(shown), "dry run does not show {shown}:\n{}", r.stdout);
    }
    let r = run(&mut c.migrate(&["plan", hanging.to_str().unwrap()]));
    assert!(r.stdout.contains("handover") && r.stdout.contains("in_pause"), "plan output: {r:?}");
    let started = Instant::now();
    let r = run(&mut c.migrate(&["cutover", hanging.to_str().unwrap()]));
    assert_ne!(r.code, 0, "a hanging hook must abort the cutover: {r:?}");
    assert!(r.stdout.contains("cutover aborted") && r.stdout.contains("killed after"), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(25), "the hook was not killed in time");
    assert_eq!(flag(&active), "v1", "the on_abort hook did not flip the traffic back");
    assert_v1_flows(&c);

    // 2. An in_pause hook that fails: the same.
    let failing = plan(
        &c,
        &bouncer,
        &format!("[[cutover.hook]]\nat = \"in_pause\"\nrun = \"{flip} && echo no load balancer >&2 && exit 4\"\ntimeout = \"1s\"\n{back}"),
    );
    let r = run(&mut c.migrate(&["cutover", failing.to_str().unwrap()]));
    assert_ne!(r.code, 0, "a failing hook must abort the cutover: {r:?}");
    assert!(r.stdout.contains("exit 4") && r.stdout.contains("no load balancer"), "{r:?}");
    assert_eq!(flag(&active), "v1");
    assert_v1_flows(&c);

    // 3. The real one.
    let good = plan(
        &c,
        &bouncer,
        &format!(
            "[[cutover.hook]]\nat = \"in_pause\"\nrun = \"{flip}\"\ntimeout = \"1s\"\n\
             [[cutover.hook]]\nat = \"after_switch\"\nrun = \"echo $MIGRATE_OUTCOME $MIGRATE_V2_DATABASE > {}\"\n{back}",
            done.display()
        ),
    );
    let r = run(&mut c.migrate(&["cutover", good.to_str().unwrap()]));
    eprintln!("{}", r.stdout);
    assert_eq!(r.code, 0, "cutover: {r:?}");
    assert!(r.stdout.contains("hook in_pause") && r.stdout.contains("resume v2 entry"), "{r:?}");
    assert_eq!(flag(&done), "switched app_v2", "after_switch hook environment");
    let st = copy_exit(&mut copy);
    assert!(st.success(), "copy after the switch: {st}");
    // Enough v2 writes for the count below, however slow the machine.
    let started = Instant::now();
    while c.green.psql("SELECT count(*) FROM tokens WHERE token LIKE 'v2-%'").parse::<u64>().unwrap() <= 30
        && started.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::SeqCst);
    let (v1, v2) = (v1.join().unwrap(), v2.join().unwrap());

    // Every acknowledged write is on green: v1's through the migration, v2's directly.
    let green_tokens: std::collections::HashSet<String> =
        c.green.psql("SELECT token FROM tokens").lines().map(str::to_string).collect();
    let inserted =
        |s: &Seen| s.acked.iter().filter(|(_, k)| *k == "insert").map(|(t, _)| t.clone()).collect::<Vec<_>>();
    let (v1_ins, v2_ins) = (inserted(&v1), inserted(&v2));
    assert!(
        v1_ins.len() > 50 && v2_ins.len() > 20,
        "writers too slow: v1 {} v2 {} ({:?})",
        v1_ins.len(),
        v2_ins.len(),
        v2.errors
    );
    for t in v1_ins.iter().chain(&v2_ins) {
        assert!(green_tokens.contains(t), "acknowledged write {t} is not on green");
    }
    assert!(v2.errors.is_empty(), "the v2 application saw errors: {:?}", v2.errors);
    // Green holds transform(blue) for everything v1 wrote: blue got no write after the switch.
    assert_eq!(
        fingerprint(&c.blue, "SELECT id, token, CASE WHEN revoked THEN 'revoked' ELSE 'active' END FROM tokens"),
        fingerprint(&c.green, "SELECT id, token, state FROM tokens WHERE token NOT LIKE 'v2-%'"),
    );
    // The stray v1 writer kept trying after the switch and got clean errors only: never a
    // schema error (which would mean it reached green) and never a success (on blue, lost).
    assert!(!v1.errors.is_empty(), "the v1 writer never saw an error after the switch");
    for (code, message) in &v1.errors {
        let schema = code.as_deref().is_some_and(|c| c.starts_with("42") || c.starts_with("23") || c.starts_with("22"));
        assert!(!schema, "a v1 statement ran against a schema: {code:?} {message}");
    }
    let blue_after = c.blue.psql("SELECT count(*) FROM tokens WHERE token LIKE 'v1-%'");
    let v1_on_green = c.green.psql("SELECT count(*) FROM tokens WHERE token LIKE 'v1-%'");
    assert_eq!(blue_after, v1_on_green, "v1 rows on blue that green does not have");

    // The statement logs: v1 statements on blue (the log works), none on green.
    let v1_mark = format!("/* v1 {tag} */");
    assert!(log_since(&blue_log, blue_from).contains(&v1_mark), "blue's log shows no v1 statement");
    let green_text = log_since(&green_log, green_from);
    assert!(green_text.contains(&format!("/* v2 {tag} */")), "green's log shows no v2 statement");
    let on_green: Vec<&str> = green_text.lines().filter(|l| l.contains(&v1_mark)).collect();
    assert!(
        on_green.is_empty(),
        "{} v1 statement(s) ran on green: {:?}",
        on_green.len(),
        &on_green[..on_green.len().min(3)]
    );

    let st = run(&mut c.migrate(&["status", good.to_str().unwrap(), "--format", "json"]));
    let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(st["phase"], "switched", "{st}");
    for (cluster, db) in [(blue_cluster(), &c.blue.name), (green_cluster(), &c.green.name)] {
        cluster.psql("postgres", &format!("ALTER DATABASE {db} RESET log_statement"));
    }
    bouncer.stop();
}

/// Blue still takes v1 writes after an aborted cutover.
fn assert_v1_flows(c: &Custom) {
    let count = || c.blue.psql("SELECT count(*) FROM tokens WHERE token LIKE 'v1-%'").parse::<u64>().unwrap();
    let (before, started) = (count(), Instant::now());
    while count() <= before + 5 {
        assert!(started.elapsed() < Duration::from_secs(5), "the v1 application is stalled after an aborted cutover");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn copy_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    crate::support::wait_exit(child, Duration::from_secs(60))
}

/// The final check in the pause proves green's foreign keys for the rows changed since the full
/// check: blue has no foreign key, green does, and a `before_pause` hook writes on blue (after
/// the full check, before PAUSE) first a token of a client that does not exist, then deletes a
/// client that tokens still reference. Both cutovers abort to blue; once blue is fixed the
/// third one switches.
#[test]
fn final_check_in_the_pause_proves_foreign_keys() {
    let c = Custom::new(
        "CREATE TABLE clients (id int PRIMARY KEY, name text); CREATE TABLE tokens (id int PRIMARY KEY, client_id int); \
         INSERT INTO clients SELECT g, 'c' || g FROM generate_series(1, 10) g; \
         INSERT INTO tokens SELECT g, 1 + g % 10 FROM generate_series(1, 100) g;",
        "CREATE TABLE clients (id int PRIMARY KEY, name text); \
         CREATE TABLE tokens (id int PRIMARY KEY, client_id int REFERENCES clients (id)); \
         CREATE INDEX ON tokens (client_id);",
    );
    let bouncer = Bouncer::start(
        "transaction",
        &format!("host=127.0.0.1 port={} dbname={} user=postgres", blue_cluster().port, c.blue.name),
    );
    let blue_psql = |sql: &str| {
        format!(
            "{} -X -q -h 127.0.0.1 -p {} -U postgres -d {} -c \\\"{sql}\\\"",
            blue_cluster().bindir.join("psql").display(),
            blue_cluster().port,
            c.blue.name
        )
    };
    let plan = |hook: &str| {
        let tables = format!(
            "[[table]]\nsource = \"public.clients\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\nname = \"name\"\n\
             [[table]]\nsource = \"public.tokens\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\nclient_id = \"client_id\"\n\
             [cutover]\n[cutover.pgbouncer]\nadmin_url = \"{}\"\ndatabase = \"app\"\ndatabases_file = \"{}\"\n\
             green_dsn = \"host=127.0.0.1 port={} dbname={} user=postgres\"\npause_timeout = \"4s\"\n{hook}",
            bouncer.admin_url(),
            bouncer.databases_file.display(),
            green_cluster().port,
            c.green.name
        );
        c.plan("auto", "", &tables)
    };
    let first = plan("");
    let mut copy = c.spawn(&["copy", first.to_str().unwrap()], &[]);
    c.wait_phase("following");
    let r = run(&mut c.migrate(&["verify", first.to_str().unwrap()]));
    assert_eq!(r.code, 0, "verify: {r:?}");

    let hook = |sql: &str| format!("[[cutover.hook]]\nat = \"before_pause\"\nrun = \"{}\"\n", blue_psql(sql));
    let orphan_child = plan(&hook("INSERT INTO tokens VALUES (1000, 999)"));
    let r = run(&mut c.migrate(&["cutover", orphan_child.to_str().unwrap()]));
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("foreign keys would not hold") && r.stdout.contains("(1000)"),
        "the orphan token was not caught in the pause: {r:?}"
    );
    assert!(r.stdout.contains("cutover aborted"), "{r:?}");

    c.blue.psql("DELETE FROM tokens WHERE id = 1000");
    let orphaned_by_parent = plan(&hook("DELETE FROM clients WHERE id = 3"));
    let r = run(&mut c.migrate(&["cutover", orphaned_by_parent.to_str().unwrap()]));
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("foreign keys would not hold") && r.stdout.contains("tokens"),
        "the deleted parent was not caught in the pause: {r:?}"
    );

    c.blue.psql("DELETE FROM tokens WHERE client_id = 3");
    let r = run(&mut c.migrate(&["cutover", first.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    let st = copy_exit(&mut copy);
    assert!(st.success(), "copy after the switch: {st}");
    let orphans = c
        .green
        .psql("SELECT count(*) FROM tokens t WHERE NOT EXISTS (SELECT 1 FROM clients c WHERE c.id = t.client_id)");
    assert_eq!(orphans, "0");
    assert_eq!(fingerprint(&c.blue, "SELECT * FROM tokens"), fingerprint(&c.green, "SELECT * FROM tokens"));
    bouncer.stop();
}

fn show_databases(b: &Bouncer, name: &str) -> (bool, bool) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&b.admin_url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        for m in c.simple_query("SHOW DATABASES").await.unwrap() {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                if r.get("name") == Some(name) {
                    return (r.get("paused") == Some("1"), r.get("disabled") == Some("1"));
                }
            }
        }
        panic!("no entry {name}");
    })
}

fn wait_phase_of(c: &Custom, plan: &Path, phase: &str) {
    let started = Instant::now();
    loop {
        let r = run(&mut c.migrate(&["status", plan.to_str().unwrap(), "--format", "json"]));
        let st: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        if st["phase"] == phase {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "phase did not become {phase}: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A handover cutover killed just before the v2 entry resumes is rolled back by the running
/// follower (v1 enabled and resumed, v2 still paused); one killed just after is finished by it
/// (v1 disabled, phase switched), and nothing v1 acknowledged is lost.
#[test]
fn handover_killed_half_way_is_recovered_by_the_follower() {
    let c = Custom::new(BLUE, GREEN);
    let bouncer = two_entries(&c);
    let stop = Arc::new(AtomicBool::new(false));
    let v1 = writer(
        bouncer.port,
        "app",
        stop.clone(),
        || true,
        |n| {
            let t = format!("v1-{n}");
            let sql = format!("INSERT INTO tokens (token, revoked) VALUES ('{t}', false)");
            (t, "insert", sql)
        },
    );
    let p = plan(&c, &bouncer, "");
    let mut copy = c.spawn(&["copy", p.to_str().unwrap()], &[]);
    c.wait_phase("following");
    let r = run(&mut c.migrate(&["verify", p.to_str().unwrap()]));
    assert_eq!(r.code, 0, "verify: {r:?}");

    let r = run(c.migrate(&["cutover", p.to_str().unwrap()]).env("MIGRATE_FAULT", "cutover.v1-held"));
    assert_eq!(r.code, 137, "{r:?}");
    wait_phase_of(&c, &p, "aborted");
    assert_eq!(show_databases(&bouncer, "app"), (false, false), "v1 entry not resumed and enabled");
    assert!(show_databases(&bouncer, "app_v2").0, "v2 entry resumed by a roll back");
    assert_v1_flows(&c);

    std::thread::sleep(Duration::from_secs(1));
    let r = run(&mut c.migrate(&["verify", p.to_str().unwrap()]));
    assert_eq!(r.code, 0, "verify: {r:?}");
    let r = run(c.migrate(&["cutover", p.to_str().unwrap()]).env("MIGRATE_FAULT", "cutover.v2-resumed"));
    assert_eq!(r.code, 137, "{r:?}");
    wait_phase_of(&c, &p, "switched");
    let st = copy_exit(&mut copy);
    assert!(st.success(), "copy after the recovered switch: {st}");
    assert!(!show_databases(&bouncer, "app_v2").0, "v2 entry still paused");
    assert!(show_databases(&bouncer, "app").1, "v1 entry not disabled");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let v1 = v1.join().unwrap();
    let green: std::collections::HashSet<String> =
        c.green.psql("SELECT token FROM tokens").lines().map(str::to_string).collect();
    for (t, _) in &v1.acked {
        assert!(green.contains(t), "acknowledged v1 write {t} is not on green");
    }
    assert!(!v1.errors.is_empty(), "v1 kept succeeding after the switch");
    bouncer.stop();
}

/// The way back in handover mode: after the switch the v2 application writes on green (inserts
/// and revocations of its own tokens); `migrate rollback` pauses the v2 entry, drains, and hands
/// traffic back to the v1 entry, while `[[rollback.hook]]`s flip which version receives the
/// requests. Every acknowledged write of either version is on blue in v1's form, and following
/// resumes so green catches up with what v1 writes afterwards.
#[test]
fn handover_rolls_back_to_the_v1_entry_with_nothing_lost() {
    // Green of its own: the rollback's drain waits for the oldest transaction in green's whole
    // cluster (Known limits), which other tests' copies into the shared one can hold past the
    // pause.
    let c = Custom::on((blue_cluster(), crate::support::Cluster::own("hrgreen", &[])), BLUE, GREEN);
    let bouncer = two_entries(&c);
    admin(&bouncer, "PAUSE app_v2");
    let dir = tempfile::tempdir().unwrap();
    let active = dir.path().join("active");
    std::fs::write(&active, "v1").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (a1, a2) = (active.clone(), active.clone());
    let v1 = writer(
        bouncer.port,
        "app",
        stop.clone(),
        move || flag(&a1) == "v1",
        |n| {
            let t = format!("v1-{n}");
            (t.clone(), "insert", format!("INSERT INTO tokens (token, revoked) VALUES ('{t}', false)"))
        },
    );
    let v2 = writer(
        bouncer.port,
        "app_v2",
        stop.clone(),
        move || flag(&a2) == "v2",
        |n| {
            if n % 3 == 0 {
                let t = format!("v2-{}", n - 2);
                (t.clone(), "revoke", format!("UPDATE tokens SET state = 'revoked' WHERE token = '{t}'"))
            } else {
                let t = format!("v2-{n}");
                (t.clone(), "insert", format!("INSERT INTO tokens (token, state) VALUES ('{t}', 'active')"))
            }
        },
    );
    let tables = format!(
        "[[table]]\nsource = \"public.tokens\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\ntoken = \"token\"\n\
         state = \"CASE WHEN revoked THEN 'revoked' ELSE 'active' END\"\n[table.reverse]\nrevoked = \"state = 'revoked'\"\n\
         [cutover]\nway_back = true\n[cutover.pgbouncer]\nmode = \"handover\"\nadmin_url = \"{}\"\ndatabase = \"app\"\n\
         v2_database = \"app_v2\"\npause_timeout = \"4s\"\n\
         [[cutover.hook]]\nat = \"in_pause\"\nrun = \"echo v2 > {a}\"\ntimeout = \"1s\"\n\
         [[rollback.hook]]\nat = \"in_pause\"\nrun = \"echo v1 > {a} && echo $MIGRATE_DIRECTION\"\ntimeout = \"1s\"\n",
        bouncer.admin_url(),
        a = active.display()
    );
    let plan = c.plan("auto", "", &tables);
    let p = plan.to_str().unwrap();
    let mut copy = c.spawn(&["copy", p], &[]);
    c.wait_phase("following");
    std::thread::sleep(Duration::from_secs(1));
    let r = run(&mut c.migrate(&["verify", p]));
    assert_eq!(r.code, 0, "verify: {r:?}");
    let r = run(&mut c.migrate(&["cutover", p]));
    assert_eq!(r.code, 0, "cutover: {r:?}");
    assert_eq!(flag(&active), "v2");
    std::thread::sleep(Duration::from_secs(3));
    let r = run(&mut c.migrate(&["rollback", p]));
    eprintln!("{}", r.stdout);
    assert_eq!(r.code, 0, "rollback: {r:?}");
    assert!(r.stdout.contains("resume v1 entry") && r.stdout.contains("hook in_pause"), "{r:?}");
    assert!(r.stdout.contains("rolled back: the v1 entry `app` (blue) takes traffic"), "{r:?}");
    assert_eq!(flag(&active), "v1");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let (v1, v2) = (v1.join().unwrap(), v2.join().unwrap());
    // A statement queued in the entry a switch leaves is dropped by its KILL (`database
    // removed`), at most once per writer per switch; nothing else fails.
    for (who, seen) in [("v1", &v1), ("v2", &v2)] {
        assert!(seen.errors.len() <= 1, "the {who} application saw errors: {:?}", seen.errors);
        for (code, message) in &seen.errors {
            assert!(
                code.as_deref() == Some("08P01") && message.contains("database removed"),
                "{who}: {code:?} {message}"
            );
        }
    }
    let blue: std::collections::HashMap<String, String> = c
        .blue
        .psql("SELECT token || '|' || revoked FROM tokens")
        .lines()
        .filter_map(|l| l.split_once('|').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect();
    let v2_ins: Vec<&String> = v2.acked.iter().filter(|(_, k)| *k == "insert").map(|(t, _)| t).collect();
    assert!(v2_ins.len() > 20, "too few v2 writes: {}", v2_ins.len());
    for (t, _) in v1.acked.iter().chain(&v2.acked) {
        assert!(blue.contains_key(t), "acknowledged write {t} is not on blue");
    }
    for (t, kind) in &v2.acked {
        if *kind == "revoke" && blue.contains_key(t) {
            assert_eq!(blue[t], "true", "a revocation made on green is not on blue: {t}");
        }
    }
    // Following resumed: green catches up with v1's writes after the rollback.
    let started = Instant::now();
    let q_blue = "SELECT id, token, CASE WHEN revoked THEN 'revoked' ELSE 'active' END FROM tokens";
    let q_green = "SELECT id, token, state FROM tokens";
    while fingerprint(&c.blue, q_blue) != fingerprint(&c.green, q_green) {
        assert!(started.elapsed() < Duration::from_secs(30), "green did not catch up with blue after the rollback");
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = run(&mut c.migrate(&["finish", p]));
    assert_eq!(r.code, 1, "nothing to finish after a rollback: {r:?}");
    crate::capture::sigint_and_wait(&mut copy);
}

/// A handover rollback killed before the v1 entry resumes is undone by the running reverse
/// follower (v2 enabled and resumed, v1 disabled again, phase switched, way back open); one
/// killed just after the v1 entry resumed is finished by it (v2 disabled, phase following) and
/// every write the v2 application made on green is on blue.
#[test]
fn handover_rollback_killed_is_recovered_by_the_follower() {
    // Green of its own, as in `handover_rolls_back_to_the_v1_entry_with_nothing_lost`.
    let c = Custom::on((blue_cluster(), crate::support::Cluster::own("hkgreen", &[])), BLUE, GREEN);
    let bouncer = two_entries(&c);
    admin(&bouncer, "PAUSE app_v2");
    let tables = format!(
        "[[table]]\nsource = \"public.tokens\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\ntoken = \"token\"\n\
         state = \"CASE WHEN revoked THEN 'revoked' ELSE 'active' END\"\n[table.reverse]\nrevoked = \"state = 'revoked'\"\n\
         [cutover]\nway_back = true\n[cutover.pgbouncer]\nmode = \"handover\"\nadmin_url = \"{}\"\ndatabase = \"app\"\n\
         v2_database = \"app_v2\"\npause_timeout = \"4s\"\n",
        bouncer.admin_url()
    );
    let plan = c.plan("auto", "", &tables);
    let p = plan.to_str().unwrap();
    let mut copy = c.spawn(&["copy", p], &[]);
    c.wait_phase("following");
    std::thread::sleep(Duration::from_secs(1));
    let r = run(&mut c.migrate(&["verify", p]));
    assert_eq!(r.code, 0, "verify: {r:?}");
    let r = run(&mut c.migrate(&["cutover", p]));
    assert_eq!(r.code, 0, "cutover: {r:?}");
    let v2_url = format!("host=127.0.0.1 port={} dbname=app_v2 user=postgres", bouncer.port);
    let write_v2 = |n: u32| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (cl, conn) = tokio_postgres::connect(&v2_url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            cl.simple_query(&format!("INSERT INTO tokens (token, state) VALUES ('crash-v2-{n}', 'revoked')"))
                .await
                .unwrap();
        })
    };
    for (i, point) in
        ["rollback.caught-up", "rollback.paused", "rollback.drained", "rollback.before-repoint"].iter().enumerate()
    {
        write_v2(i as u32);
        let r = run(c.migrate(&["rollback", p]).env("MIGRATE_FAULT", point));
        assert_eq!(r.code, 137, "{point}: {r:?}");
        wait_phase_of(&c, &plan, "switched");
        assert_eq!(show_databases(&bouncer, "app_v2"), (false, false), "{point}: v2 must serve again");
        assert!(show_databases(&bouncer, "app").1, "{point}: v1 must be disabled again");
    }
    write_v2(99);
    let r = run(c.migrate(&["rollback", p]).env("MIGRATE_FAULT", "rollback.reloaded"));
    assert_eq!(r.code, 137, "{r:?}");
    wait_phase_of(&c, &plan, "following");
    assert_eq!(show_databases(&bouncer, "app"), (false, false), "v1 must serve");
    assert!(show_databases(&bouncer, "app_v2").1, "v2 must be disabled");
    let on_blue = c.blue.psql("SELECT count(*) FROM tokens WHERE token LIKE 'crash-v2-%' AND revoked");
    assert_eq!(on_blue, "5", "writes made on green are missing on blue");
    crate::capture::sigint_and_wait(&mut copy);
}
