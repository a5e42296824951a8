//! Shared test support: clusters started once per test binary, per-test databases, the OAuth
//! scenario, and an independent fingerprint of green versus transform(blue).

pub mod cluster;
pub mod host;
pub mod writer;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

pub use bluegreen::sandbox::app;
pub use cluster::{Bouncer, Cluster};

/// Blue: `wal_level=logical`.
pub fn blue_cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    // Prepared transactions allowed: the 2PC tests prepare one before capture starts.
    C.get_or_init(|| Cluster::start("blue", &["max_prepared_transactions=10"]))
}

/// Green: a second cluster, as in production.
pub fn green_cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| Cluster::start("green", &[]))
}

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A database that is dropped when the test ends.
pub struct TestDb {
    /// Cluster it lives on.
    pub cluster: &'static Cluster,
    /// Database name.
    pub name: String,
}

impl TestDb {
    /// Creates a uniquely named database, optionally from a template.
    pub fn create(cluster: &'static Cluster, prefix: &str, template: Option<&str>) -> TestDb {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("{prefix}_{}", N.fetch_add(1, Ordering::SeqCst));
        let tpl = template.map(|t| format!(" TEMPLATE {t}")).unwrap_or_default();
        // CREATE DATABASE ... TEMPLATE needs the template to have no other sessions; serialize.
        static LOCK: Mutex<()> = Mutex::new(());
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        cluster.psql("postgres", &format!("CREATE DATABASE {name}{tpl}"));
        TestDb { cluster, name }
    }

    /// URL of this database.
    pub fn url(&self) -> String {
        self.cluster.url(&self.name)
    }

    /// Runs SQL here.
    pub fn psql(&self, sql: &str) -> String {
        self.cluster.psql(&self.name, sql)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // A database with a logical slot cannot be dropped; slots also pin WAL on the shared
        // cluster. Terminate users first so the slot is not active.
        let sql = format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid(); \
             SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{db}'; \
             DROP DATABASE IF EXISTS {db} WITH (FORCE);",
            db = self.name
        );
        let _ = std::process::Command::new(self.cluster.bindir.join("psql"))
            .args(["-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.cluster.port.to_string())
            .args(["-d", "postgres", "-c"])
            .arg(sql)
            .output();
    }
}

/// A template database on `cluster` built once by `build`.
fn template(cluster: &'static Cluster, name: &str, build: impl FnOnce(&Cluster, &str)) -> String {
    static MADE: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let key = format!("{}:{name}", cluster.port);
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    if !made.contains(&key) {
        cluster.psql("postgres", &format!("CREATE DATABASE {name}"));
        build(cluster, name);
        made.push(key);
    }
    name.to_string()
}

/// The OAuth fixture: blue v1 with data, green v2 empty, and the plan pointing at them.
pub struct Oauth {
    /// Blue database (v1 schema, generated rows).
    pub blue: TestDb,
    /// Green database (v2 schema, empty).
    pub green: TestDb,
    /// Working directory for plan files.
    pub dir: tempfile::TempDir,
}

impl Oauth {
    /// A fresh scenario with `rows` access tokens on blue.
    pub fn new(rows: u32) -> Oauth {
        Oauth::on(blue_cluster(), green_cluster(), rows)
    }

    /// A fresh scenario on the given clusters.
    pub fn on(blue: &'static Cluster, green: &'static Cluster, rows: u32) -> Oauth {
        let blue_tpl = template(blue, &format!("tpl_oauth_blue_{rows}"), |c, db| {
            c.psql_file(db, &root().join("fixtures/oauth/blue.sql"), &[]);
            c.psql_file(db, &root().join("fixtures/oauth/generate.sql"), &[("rows", &rows.to_string())]);
            c.psql(db, "ANALYZE");
        });
        let green_tpl = template(green, "tpl_oauth_green", |c, db| {
            c.psql_file(db, &root().join("fixtures/oauth/green.sql"), &[]);
        });
        Oauth {
            blue: TestDb::create(blue, "blue", Some(&blue_tpl)),
            green: TestDb::create(green, "green", Some(&green_tpl)),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The repository's OAuth plan text.
    pub fn plan_text() -> String {
        std::fs::read_to_string(root().join("plans/oauth-v1-to-v2.toml")).unwrap()
    }

    /// The plan name this scenario uses: unique per scenario, because replication slots are
    /// per cluster and tests share clusters.
    pub fn name(&self) -> String {
        format!("oauth-{}", self.green.name.replace('_', "-"))
    }

    /// Rewrites `bluegreen_oauth_v2` in `sql` to this scenario's state schema.
    pub fn sql(&self, sql: &str) -> String {
        sql.replace("bluegreen_oauth_v2", &format!("bluegreen_{}", self.name().replace('-', "_")))
    }

    /// Writes `text` as a plan file in the scenario directory (with this scenario's plan name)
    /// and returns its path.
    pub fn write_plan(&self, text: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = self.dir.path().join(format!("plan{}.toml", N.fetch_add(1, Ordering::SeqCst)));
        std::fs::write(&p, text.replace("name = \"oauth-v2\"", &format!("name = \"{}\"", self.name()))).unwrap();
        p
    }

    /// `migrate ARGS` to start in the background: stdout discarded, stderr captured for failure
    /// messages (warnings and errors only, so the unread pipe never fills).
    pub fn background(&self, args: &[&str]) -> std::process::Command {
        background(&self.blue, &self.green, args)
    }

    /// Starts `migrate ARGS` in the background (see [`Oauth::background`]).
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        self.background(args).spawn().expect("start migrate")
    }

    /// `migrate ARGS` with BLUE_URL and GREEN_URL pointing at this scenario.
    pub fn migrate(&self, args: &[&str]) -> assert_cmd::Command {
        migrate(&self.blue, &self.green, args)
    }

    /// Waits (up to 90 s) until this scenario's migration is in `phase`.
    pub fn wait_phase(&self, phase: &str) {
        wait_phase(&self.green, &self.sql("bluegreen_oauth_v2"), phase);
    }
}

/// `migrate ARGS` with BLUE_URL and GREEN_URL pointing at `blue` and `green`.
fn migrate(blue: &TestDb, green: &TestDb, args: &[&str]) -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("migrate").unwrap();
    c.env("BLUE_URL", blue.url()).env("GREEN_URL", green.url()).env("MIGRATE_LOG", "info").args(args);
    c.timeout(std::time::Duration::from_secs(300));
    c
}

/// `migrate ARGS` to start in the background against `blue` and `green`: stdout discarded,
/// stderr captured (warnings and errors only, so an unread pipe never fills).
fn background(blue: &TestDb, green: &TestDb, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("migrate"));
    c.env("BLUE_URL", blue.url())
        .env("GREEN_URL", green.url())
        .env("MIGRATE_LOG", "warn")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    c
}

/// Waits (up to 90 s) until the migration whose state is in `schema` on `green` is in `phase`.
fn wait_phase(green: &TestDb, schema: &str, phase: &str) {
    let started = std::time::Instant::now();
    loop {
        let ready = green.psql(&format!("SELECT to_regclass('{schema}.migration') IS NOT NULL")) == "t"
            && green.psql(&format!("SELECT state->>'phase' FROM {schema}.migration")) == phase;
        if ready {
            return;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(90), "the migration did not reach {phase}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `text` with the first occurrence of `from` replaced by `to`, for edits of fixture text.
/// Panics, naming `from`, when `text` does not contain it: a fixture edit that no longer
/// applies must fail the test instead of silently testing the unedited fixture.
#[track_caller]
pub fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "fixture edit does not apply: `{from}` not found in the text");
    text.replacen(from, to, 1)
}

/// Output of a finished command, for assertions with context.
pub struct Run {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs a command and captures everything.
pub fn run(cmd: &mut assert_cmd::Command) -> Run {
    let out = cmd.output().expect("run migrate");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// A writer on blue's `items (id, grp, payload)` of `rows` rows, every 20 ms until stopped:
/// inserts, updates that move rows (TOASTed payloads), updates of a range, deletes and key
/// changes. For the tests that spread one copy or one verify over several processes.
pub struct ItemsWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl ItemsWriter {
    /// Starts writing to `blue`.
    pub fn start(blue: &TestDb, rows: u64) -> ItemsWriter {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cluster, name, flag) = (blue.cluster, blue.name.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut n = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                cluster.psql(
                    &name,
                    &format!(
                        "INSERT INTO items VALUES ({new}, 1, 'new');
                         UPDATE items SET payload = repeat(md5(id::text), 200) WHERE id % 1000 = {m};
                         UPDATE items SET grp = grp + 1 WHERE id BETWEEN {a} AND {a} + 50;
                         DELETE FROM items WHERE id = {d};
                         UPDATE items SET id = id + 10000000 WHERE id = {k};",
                        new = 1_000_000 + n,
                        m = n % 1000,
                        a = (n * 397) % rows,
                        d = (n * 131) % rows,
                        k = (n * 173) % rows + 1
                    ),
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        ItemsWriter { stop, handle }
    }

    /// Stops and joins.
    pub fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap();
    }
}

/// Kills the background `migrate` `child` and panics with `message` and what it wrote to stderr.
pub fn panic_with_stderr(child: &mut std::process::Child, message: &str) -> ! {
    let _ = child.kill();
    let mut err = String::new();
    if let Some(stderr) = child.stderr.as_mut() {
        std::io::Read::read_to_string(stderr, &mut err).ok();
    }
    panic!("{message}: {err}");
}

/// Waits (up to 60 s) until the background `migrate` `child` lists something in hand in
/// `<state>.workers` (a chunk, or a verify part): its worker id and the first thing it holds.
pub fn first_in_hand(green: &TestDb, state: &str, child: &mut std::process::Child) -> (String, String) {
    let started = std::time::Instant::now();
    loop {
        let row = green.psql(&format!(
            "SELECT id || ' ' || chunks[1] FROM {state}.workers WHERE pid = {} AND cardinality(chunks) > 0",
            child.id()
        ));
        if let Some((id, held)) = row.trim().split_once(' ') {
            return (id.to_string(), held.to_string());
        }
        if started.elapsed() > std::time::Duration::from_secs(60) {
            panic_with_stderr(child, "the worker never held anything");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A background `migrate` frozen with SIGSTOP: to green and blue, a host frozen or cut off
/// behind sessions the servers keep open (its kernel still answers TCP keepalives). Killed when
/// dropped, so a failing test leaves no stopped process behind.
#[allow(dead_code)]
pub struct Frozen(u32);

#[allow(dead_code)]
impl Frozen {
    /// Stops `child`.
    pub fn freeze(child: &std::process::Child) -> Self {
        let frozen = Frozen(child.id());
        frozen.signal("-STOP");
        frozen
    }

    /// Lets it run again; not killed when dropped after this (its pid may be reaped and reused).
    pub fn thaw(self) {
        self.signal("-CONT");
        std::mem::forget(self);
    }

    fn signal(&self, name: &str) {
        let sent = std::process::Command::new("kill").args([name, &self.0.to_string()]).status().unwrap();
        assert!(sent.success(), "kill {name} {}", self.0);
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// How many of the sessions worker `id` recorded in `<state>.workers` (`blue:…`, `green:…`) are
/// open on blue and on green, found by process id and start time in `pg_stat_activity`. (0, 0)
/// also when it recorded none: assert them open first.
#[allow(dead_code)]
pub fn recorded_sessions_open(blue: &TestDb, green: &TestDb, state: &str, id: &str) -> (i64, i64) {
    let sessions = green.psql(&format!("SELECT array_to_string(sessions, ' ') FROM {state}.workers WHERE id = '{id}'"));
    let open = |db: &TestDb, side: &str| -> i64 {
        let tags: Vec<&str> = sessions.split(' ').filter_map(|s| s.strip_prefix(side)).collect();
        db.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity a \
             WHERE format('%s:%s', a.pid, (extract(epoch FROM a.backend_start) * 1000000)::bigint) = ANY('{{{}}}')",
            tags.join(",")
        ))
        .parse()
        .unwrap()
    };
    (open(blue, "blue:"), open(green, "green:"))
}

/// Waits (up to 30 s) for `child` to exit: its exit code and stderr.
#[allow(dead_code)]
pub fn exit_of(child: &mut std::process::Child) -> (Option<i32>, String) {
    exit_of_within(child, Duration::from_secs(30))
}

/// Waits (up to `within`) for `child` to exit: its exit code and stderr.
#[allow(dead_code)]
pub fn exit_of_within(child: &mut std::process::Child, within: Duration) -> (Option<i32>, String) {
    let started = std::time::Instant::now();
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if started.elapsed() > within {
            panic_with_stderr(child, "it did not exit");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut err = String::new();
    if let Some(stderr) = child.stderr.as_mut() {
        std::io::Read::read_to_string(stderr, &mut err).ok();
    }
    (code, err)
}

/// An order-independent fingerprint of a query's rows (count + md5 of the sorted text rows),
/// computed by the server.
#[allow(dead_code)]
pub fn fingerprint(db: &TestDb, query: &str) -> String {
    db.psql(&format!(
        "SELECT count(*) || ':' || coalesce(md5(string_agg(fp_row::text, E'\\n' ORDER BY fp_row::text COLLATE \"C\")), '-') FROM ({query}) fp_row"
    ))
}

/// Whether `green_query` on `green` comes to hold what `blue_query` does on `blue` (their
/// [`fingerprint`]s) within `within`, looking every 200 ms.
#[allow(dead_code)]
pub fn converges(blue: (&TestDb, &str), green: (&TestDb, &str), within: std::time::Duration) -> bool {
    let started = std::time::Instant::now();
    while fingerprint(blue.0, blue.1) != fingerprint(green.0, green.1) {
        if started.elapsed() > within {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    true
}

/// For each migrated OAuth table: an independent SQL transform over blue, and the same columns
/// read from green. Written by hand from the fixture's intent, not generated by the tool.
pub const OAUTH_PAIRS: &[(&str, &str)] = &[
    (
        "SELECT pk, '5b2a6a2e-5b1c-4b6e-9a40-2f7e4f1d0c11'::uuid AS nid, id, client_name, client_secret, \
         array_remove(string_to_array(redirect_uris, ' '), '') AS r, array_remove(string_to_array(grant_types, ' '), '') AS g, \
         array_remove(string_to_array(scope, ' '), '') AS s, coalesce(metadata, '{}')::jsonb AS m, token_lifespan, \
         created_at AT TIME ZONE 'UTC' AS c, updated_at AT TIME ZONE 'UTC' AS u FROM hydra_client",
        "SELECT pk, nid, id, name, secret, redirect_uris, grant_types, scope, metadata, token_lifespan, created_at, updated_at FROM oauth2_clients",
    ),
    (
        "SELECT signature, '5b2a6a2e-5b1c-4b6e-9a40-2f7e4f1d0c11'::uuid AS nid, request_id, requested_at AT TIME ZONE 'UTC' AS ra, client_id, \
         array_remove(string_to_array(scope, ' '), '') AS s, array_remove(string_to_array(granted_scope, ' '), '') AS gs, \
         session_data::jsonb AS sd, subject, active, array_remove(string_to_array(requested_audience, '|'), '') AS aud \
         FROM hydra_oauth2_access WHERE requested_at > (now() AT TIME ZONE 'UTC') - interval '90 days'",
        "SELECT signature, nid, request_id, requested_at, client_id, scopes, granted_scopes, session_data, subject, active, requested_audience FROM oauth2_access_tokens",
    ),
    (
        "SELECT signature, '5b2a6a2e-5b1c-4b6e-9a40-2f7e4f1d0c11'::uuid AS nid, request_id, requested_at AT TIME ZONE 'UTC' AS ra, client_id, \
         array_remove(string_to_array(scope, ' '), '') AS s, array_remove(string_to_array(granted_scope, ' '), '') AS gs, \
         session_data::jsonb AS sd, subject, active, array_remove(string_to_array(requested_audience, '|'), '') AS aud \
         FROM hydra_oauth2_refresh WHERE requested_at > (now() AT TIME ZONE 'UTC') - interval '90 days'",
        "SELECT signature, nid, request_id, requested_at, client_id, scopes, granted_scopes, session_data, subject, active, requested_audience FROM oauth2_refresh_tokens",
    ),
    (
        "SELECT subject, client_id, '5b2a6a2e-5b1c-4b6e-9a40-2f7e4f1d0c11'::uuid AS nid, array_remove(string_to_array(granted_scope, ' '), '') AS gs, \
         coalesce(remember, false) AS r, handled_at AT TIME ZONE 'UTC' AS h, session_id_token::jsonb AS t FROM hydra_oauth2_consent_session",
        "SELECT subject, client_id, nid, granted_scopes, remember, handled_at, session_id_token FROM oauth2_consent_sessions",
    ),
    (
        "SELECT request_id, revoked_at AT TIME ZONE 'UTC' AS r, reason FROM hydra_oauth2_revocation",
        "SELECT request_id, revoked_at, reason FROM oauth2_revocations",
    ),
    ("SELECT id, at, kind, payload FROM app_events", "SELECT id, at, kind, payload FROM app_events"),
    (
        "SELECT sid, kid, '5b2a6a2e-5b1c-4b6e-9a40-2f7e4f1d0c11'::uuid AS nid, keydata FROM hydra_jwk_set",
        "SELECT sid, kid, nid, keydata FROM jwk_sets",
    ),
];

impl Oauth {
    /// A PgBouncer (transaction pooling) serving `app` → this scenario's blue, and the
    /// `[cutover.pgbouncer]` section of a plan that switches it to green.
    #[allow(dead_code)]
    pub fn bouncer(&self) -> (Bouncer, String) {
        let blue_dsn =
            format!("host=127.0.0.1 port={} dbname={} user=postgres", self.blue.cluster.port, self.blue.name);
        let b = Bouncer::start("transaction", &blue_dsn);
        let section = format!(
            "[cutover.pgbouncer]\nadmin_url = \"{}\"\ndatabase = \"app\"\ndatabases_file = \"{}\"\n\
             green_dsn = \"host=127.0.0.1 port={} dbname={} user=postgres\"\npause_timeout = \"2s\"\n",
            b.admin_url(),
            b.databases_file.display(),
            self.green.cluster.port,
            self.green.name
        );
        (b, section)
    }

    /// Asserts green equals transform(blue) for every table, by independent fingerprints.
    pub fn assert_green_equals_blue(&self) {
        for (b, g) in OAUTH_PAIRS {
            let fb = fingerprint(&self.blue, b);
            let fg = fingerprint(&self.green, g);
            assert_eq!(fb, fg, "green differs from transform(blue)\nblue:  {b}\ngreen: {g}");
        }
    }

    /// The plan with `[copy]` settings replaced.
    pub fn plan_with_copy(&self, copy: &str) -> PathBuf {
        let text = Oauth::plan_text().replace("workers = 2\nchunk_rows = 50000\ndefer_indexes = true", copy);
        assert!(text.contains(copy), "plan [copy] section not found");
        self.write_plan(&text)
    }
}

/// A scenario built from SQL: blue and green databases made by the given scripts, and plans
/// over them. For the shapes the OAuth fixture does not have (odd key types, enums, encodings).
pub struct Custom {
    /// Blue database.
    pub blue: TestDb,
    /// Green database.
    pub green: TestDb,
    /// Working directory for plan files.
    pub dir: tempfile::TempDir,
}

impl Custom {
    /// Blue and green made by `blue_sql` and `green_sql`.
    pub fn new(blue_sql: &str, green_sql: &str) -> Custom {
        Custom::on((blue_cluster(), green_cluster()), blue_sql, green_sql)
    }

    /// [`Custom::new`] on the given clusters.
    pub fn on((blue, green): (&'static Cluster, &'static Cluster), blue_sql: &str, green_sql: &str) -> Custom {
        let c = Custom {
            blue: TestDb::create(blue, "cblue", None),
            green: TestDb::create(green, "cgreen", None),
            dir: tempfile::tempdir().unwrap(),
        };
        c.blue.psql(blue_sql);
        c.green.psql(green_sql);
        c
    }

    /// The plan name: unique per scenario (slots are per cluster).
    pub fn name(&self) -> String {
        format!("c-{}", self.green.name.replace('_', "-"))
    }

    /// Rewrites `bluegreen_custom` in `sql` to this scenario's state schema.
    pub fn sql(&self, sql: &str) -> String {
        sql.replace("bluegreen_custom", &format!("bluegreen_{}", self.name().replace('-', "_")))
    }

    /// Writes a plan with capture `method` and the given `[[table]]` entries.
    pub fn plan(&self, method: &str, copy: &str, tables: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = self.dir.path().join(format!("plan{}.toml", N.fetch_add(1, Ordering::SeqCst)));
        let text = format!(
            "name = \"{}\"\n[blue]\nurl = \"${{BLUE_URL}}\"\n[green]\nurl = \"${{GREEN_URL}}\"\n\
             [copy]\n{copy}\n[capture]\nmethod = \"{method}\"\n{tables}\n",
            self.name()
        );
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `migrate ARGS` against this scenario.
    pub fn migrate(&self, args: &[&str]) -> assert_cmd::Command {
        migrate(&self.blue, &self.green, args)
    }

    /// Waits (up to 90 s) until this scenario's migration is in `phase`.
    pub fn wait_phase(&self, phase: &str) {
        wait_phase(&self.green, &self.sql("bluegreen_custom"), phase);
    }

    /// A scenario on a blue cluster of its own, `name` (`synchronous_commit=on`, for tests that
    /// stall its commits: [`Cluster::stall_commits`]), holding `items` of `rows` rows, with a
    /// trigger-capture plan for it: `copy` settings, and `capture` lines before its table.
    pub fn items_on_own_blue(name: &str, rows: u32, copy: &str, capture: &str) -> (&'static Cluster, Custom, PathBuf) {
        let blue = Cluster::own(name, &["synchronous_commit=on"]);
        let c = Custom::on(
            (blue, green_cluster()),
            &format!(
                "CREATE TABLE items (id bigint PRIMARY KEY, grp int NOT NULL, payload text);
                 INSERT INTO items SELECT g, g % 97, md5(g::text) FROM generate_series(1, {rows}) g;"
            ),
            "CREATE TABLE items (id bigint PRIMARY KEY, grp int NOT NULL, payload text);",
        );
        let plan = c.plan("trigger", copy, &format!("{capture}[[table]]\nsource = \"public.items\"\nkey = [\"id\"]\n"));
        (blue, c, plan)
    }

    /// Waits (up to 90 s) for green's `items` to equal blue's (the table of the tests that write
    /// with [`ItemsWriter`]); panics when it does not.
    pub fn assert_items_converge(&self) {
        let query = "SELECT id, grp, payload FROM items";
        assert!(
            converges((&self.blue, query), (&self.green, query), Duration::from_secs(90)),
            "green did not converge to blue"
        );
    }

    /// `migrate ARGS` in the background, stderr captured.
    pub fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
        let mut c = background(&self.blue, &self.green, args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.spawn().expect("start migrate")
    }
}

/// The application keeps writing: more than 5 more acknowledgements within 5 s (a loaded
/// machine is slow; a PgBouncer left paused never gives them, one resumed late not in time).
pub fn assert_flowing(app: &app::App) {
    let (n, started) = (app.acked(), Instant::now());
    while app.acked() <= n + 5 {
        assert!(started.elapsed() < Duration::from_secs(5), "the application is stalled (PgBouncer left paused?)");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for `child` (a `migrate copy` expected to end by itself) to exit, at most `within`.
pub fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(started.elapsed() < within, "migrate copy did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
