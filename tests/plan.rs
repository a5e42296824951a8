//! `migrate plan` against real clusters: the sound fixture plan, each kind of problem, parse
//! errors, unreachable databases, and the PgBouncer prerequisite.

use std::time::{Duration, Instant};

use crate::support::{replace_once, run, Bouncer, Oauth};

#[test]
fn fixture_plan_is_sound_and_shows_the_mapping() {
    let s = Oauth::new(2000);
    let plan = s.write_plan(&Oauth::plan_text());
    let r = run(&mut s.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    for expected in [
        "public.hydra_oauth2_access -> public.oauth2_access_tokens",
        "scopes",
        "<- array_remove(string_to_array(scope, ' '), '')",
        "migrated_at",
        "<- default",
        "primary key oauth2_access_tokens_pkey",
        "sequence  public.oauth2_clients_pk_seq (pk) <- blue public.hydra_client_pk_seq",
        "REFERENCES public.oauth2_clients(id)",
        "<- requested_at AT TIME ZONE 'UTC'\n",
        "key       subject -> subject (text), client_id -> client_id (text)",
        "capture Logical",
        "plan is sound",
    ] {
        assert!(r.stdout.contains(expected), "missing `{expected}` in:\n{r:?}");
    }
    let json = run(&mut s.migrate(&["plan", plan.to_str().unwrap(), "--format", "json"]));
    assert_eq!(json.code, 0, "{json:?}");
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["sound"], true);
    assert_eq!(v["tables"].as_array().unwrap().len(), 7);
    let access = &v["tables"][1];
    assert_eq!(access["target"]["name"], "oauth2_access_tokens");
    assert!(access["estimate"]["rows"].as_u64().unwrap() >= 1500, "{access}");
    let cols = access["columns"].as_array().unwrap();
    let migrated = cols.iter().find(|c| c["name"] == "migrated_at").unwrap();
    assert!(migrated["expr"].is_null());
}

/// Applies `edit` to the fixture plan, runs `migrate plan`, expects exit 1 and every `needles`
/// in the output.
fn expect_problem(s: &Oauth, edit: impl Fn(String) -> String, needles: &[&str]) {
    let plan = s.write_plan(&edit(Oauth::plan_text()));
    let r = run(&mut s.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    for n in needles {
        assert!(r.stdout.contains(n), "missing `{n}` in:\n{r:?}");
    }
}

#[test]
fn each_problem_is_named() {
    let s = Oauth::new(2000);
    // Unknown source column in an expression.
    expect_problem(
        &s,
        |p| replace_once(&p, "secret = \"client_secret\"", "secret = \"client_secrt\""),
        &["table[1].columns.secret", "client_secrt", "does not exist"],
    );
    // Expression of the wrong type: text into jsonb without a cast.
    expect_problem(
        &s,
        |p| {
            replace_once(
                &p,
                "session_id_token = \"session_id_token::jsonb\"",
                "session_id_token = \"session_id_token\"",
            )
        },
        &["table[4].columns.session_id_token", "has type text", "is jsonb", "fix:"],
    );
    // Uncovered NOT NULL target column (nid has no default).
    expect_problem(
        &s,
        |p| {
            replace_once(
                &p,
                "nid = \"'5b2a6a2e-5b1c-4b6e-9a40-2f7e4f1d0c11'::uuid\"   # new NOT NULL",
                "# nid removed # new NOT NULL",
            )
        },
        &["public.oauth2_clients.nid", "NOT NULL, has no default and is not mapped"],
    );
    // Missing table.
    expect_problem(
        &s,
        |p| replace_once(&p, "public.hydra_oauth2_revocation", "public.hydra_oauth2_revocations"),
        &["table[5].source", "hydra_oauth2_revocations does not exist on blue"],
    );
    // Unknown target column.
    expect_problem(
        &s,
        |p| replace_once(&p, "reason = \"reason\"", "reason = \"reason\"\nreasons = \"reason\""),
        &["table[5].columns.reasons", "has no column `reasons`"],
    );
    // Line numbers are named for column problems.
    let text = Oauth::plan_text();
    let line = text.lines().position(|l| l.starts_with("secret = ")).unwrap() + 1;
    expect_problem(
        &s,
        |p| replace_once(&p, "secret = \"client_secret\"", "secret = \"client_secrt\""),
        &[&format!(":{line}: table[1].columns.secret")],
    );
}

#[test]
fn key_not_unique_on_either_side() {
    let s = Oauth::new(2000);
    // Blue: request_id is not unique in hydra_oauth2_access.
    s.green.psql("CREATE UNIQUE INDEX ON oauth2_access_tokens (request_id)");
    expect_problem(
        &s,
        |p| replace_once(&p, "key = [\"signature\"]", "key = [\"request_id\"]"),
        &["table[2].key", "key (request_id) is not unique on blue"],
    );
    // Green: drop the unique key the composite key maps onto.
    s.green.psql("ALTER TABLE oauth2_consent_sessions DROP CONSTRAINT oauth2_consent_sessions_pkey");
    expect_problem(&s, |p| p, &["table[4].key", "not a primary key or unique index there"]);
}

#[test]
fn green_rows_and_replica_identity_are_prerequisites() {
    let s = Oauth::new(2000);
    s.blue.psql("ALTER TABLE hydra_oauth2_revocation REPLICA IDENTITY NOTHING");
    s.green.psql("INSERT INTO oauth2_revocations VALUES ('x', now(), NULL)");
    expect_problem(
        &s,
        |p| p,
        &[
            "replica identity of blue public.hydra_oauth2_revocation does not include the key",
            "REPLICA IDENTITY USING INDEX \"hydra_oauth2_revocation_pkey\"",
            "green public.oauth2_revocations already holds rows",
        ],
    );
}

#[test]
fn toml_errors_exit_2_with_line() {
    let s = Oauth::new(2000);
    let text = replace_once(&Oauth::plan_text(), "chunk_rows = 50000", "chunk_rows = 50000\nchunk_size = 1");
    let line = text.lines().position(|l| l.starts_with("chunk_size")).unwrap() + 1;
    let plan = s.write_plan(&text);
    let r = run(&mut s.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains(&format!("{}:{line}:", plan.display())) && r.stderr.contains("chunk_size"), "{r:?}");

    let plan = s.write_plan("name = \"x\"\n[blue\nurl = 1\n");
    let r = run(&mut s.migrate(&["plan", plan.to_str().unwrap(), "--offline"]));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains(":2:"), "{r:?}");

    let r = run(&mut s.migrate(&["plan", "/nonexistent/plan.toml"]));
    assert_eq!(r.code, 2, "{r:?}");
}

#[test]
fn offline_checks_the_file_alone() {
    let s = Oauth::new(2000);
    let plan = s.write_plan(&Oauth::plan_text());
    let r = run(assert_cmd::Command::cargo_bin("migrate")
        .unwrap()
        .env("BLUE_URL", "postgres://nobody@127.0.0.1:1/x")
        .env("GREEN_URL", "postgres://nobody@127.0.0.1:1/y")
        .args(["plan", plan.to_str().unwrap(), "--offline", "--format", "json"]));
    assert_eq!(r.code, 0, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["offline"], true);
    assert_eq!(v["tables"][0]["columns"]["name"], "client_name");
    // A missing variable is a plan error naming it, even offline.
    let r = run(assert_cmd::Command::cargo_bin("migrate")
        .unwrap()
        .env_remove("BLUE_URL")
        .env("GREEN_URL", "x")
        .args(["plan", plan.to_str().unwrap(), "--offline"]));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("BLUE_URL") && r.stderr.contains("blue.url"), "{r:?}");
}

#[test]
fn unreachable_side_is_named_quickly() {
    let s = Oauth::new(2000);
    let plan = s.write_plan(&Oauth::plan_text());
    // A port nobody listens on: refused at once.
    let started = Instant::now();
    let r = run(s
        .migrate(&["plan", plan.to_str().unwrap()])
        .env("GREEN_URL", "postgres://postgres:hunter2@127.0.0.1:1/green"));
    // `plan` reports an unreachable database as a problem: exit 1 (not 3), naming the side.
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("error: green (postgres://postgres@127.0.0.1:1/green): cannot connect"), "{r:?}");
    assert!(!r.stderr.contains("hunter2") && !r.stdout.contains("hunter2"), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // A host that swallows packets: the connect timeout names blue within seconds (8 s and the
    // process's start on a loaded machine).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let started = Instant::now();
    let r = run(s
        .migrate(&["plan", plan.to_str().unwrap()])
        .env("BLUE_URL", format!("postgres://postgres@127.0.0.1:{port}/blue")));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains(&format!("error: blue (postgres://postgres@127.0.0.1:{port}/blue): ")), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    drop(listener);
}

#[test]
fn pgbouncer_session_pool_mode_is_a_problem() {
    let s = Oauth::new(2000);
    for (mode, ok) in [("session", false), ("transaction", true)] {
        let b = Bouncer::start(mode, &format!("host=127.0.0.1 port={} dbname={}", s.blue.cluster.port, s.blue.name));
        let text = format!(
            "{}\n[cutover.pgbouncer]\nadmin_url = \"{}\"\ndatabase = \"app\"\ndatabases_file = \"{}\"\ngreen_dsn = \"host=127.0.0.1 port={} dbname={}\"\n",
            Oauth::plan_text(), b.admin_url(), b.databases_file.display(), s.green.cluster.port, s.green.name
        );
        let plan = s.write_plan(&text);
        let r = run(&mut s.migrate(&["plan", plan.to_str().unwrap()]));
        if ok {
            assert_eq!(r.code, 0, "{r:?}");
            assert!(r.stdout.contains("pgbouncer pool_mode of app: transaction"), "{r:?}");
        } else {
            assert_eq!(r.code, 1, "{r:?}");
            assert!(r.stdout.contains("pool_mode=session"), "{r:?}");
        }
    }
}

/// Resolution against real catalogs with odd values in every place a plan names something:
/// never a crash (exit 3 or a panic); exit 1 with a problem line naming the field, the table (and
/// column) and what is wrong, or exit 2 with file, line and field for what the file alone rules
/// out; exit 0 only for the one value that makes a sound plan. Nothing on blue is changed by a
/// hostile expression: `plan` runs expressions over sampled rows in a read-only transaction
/// (a filter that ends plan's own session is a problem named on the filter, not a crash).
#[test]
fn odd_values_in_a_plan_are_problems_not_crashes() {
    /// One place in the fixture plan (first occurrence of `from`) and what `plan` must say.
    struct Place {
        from: &'static str,
        /// Replacement; `{}` is the value, escaped for a TOML string.
        to: &'static str,
        /// Texts one problem line on stdout must all contain; `{}` is the value as written.
        problem: &'static [&'static str],
        /// For the empty value: the file-level error (`FIELD: message`), exit 2. `None`: the
        /// empty value reaches the databases and is a problem like the others.
        empty: Option<&'static str>,
        /// The one value that makes a sound plan here, if any.
        sound: Option<&'static str>,
    }
    let places = [
        Place {
            // `scope` is left behind, so `drop` says so (a source column reaching no target
            // column is a problem of its own).
            from: "drop = [\"form_data\"]                 # dropped in v2: a source column left behind must be named\n\
                   [table.columns]\n\
                   signature = \"signature\"\n\
                   nid = \"'5b2a6a2e-5b1c-4b6e-9a40-2f7e4f1d0c11'::uuid\"\n\
                   request_id = \"request_id\"\n\
                   requested_at = \"requested_at AT TIME ZONE 'UTC'\"\n\
                   client_id = \"client_id\"\n\
                   scopes = \"array_remove(string_to_array(scope, ' '), '')\"",
            to: "drop = [\"form_data\", \"scope\"]\n[table.columns]\nsignature = \"signature\"\n\
                 nid = \"'5b2a6a2e-5b1c-4b6e-9a40-2f7e4f1d0c11'::uuid\"\nrequest_id = \"request_id\"\n\
                 requested_at = \"requested_at AT TIME ZONE 'UTC'\"\nclient_id = \"client_id\"\nscopes = \"{}\"",
            problem: &["table[2].columns.scopes [public.oauth2_access_tokens.scopes]: expression `{}` "],
            empty: Some("table[2].columns.scopes: empty expression"),
            // integer[] may be assigned to text[] (element-wise, anything to text).
            sound: Some("ARRAY[1,2]"),
        },
        Place {
            from: "key = [\"signature\"]",
            to: "key = [\"{}\"]",
            problem: &[
                "table[2].key [public.oauth2_access_tokens.{}]: ",
                "key column `{}` does not exist on blue public.hydra_oauth2_access",
            ],
            empty: None,
            sound: None,
        },
        Place {
            from: "source = \"public.hydra_oauth2_refresh\"",
            to: "source = \"{}\"",
            // Named by the source, not the target.
            problem: &["table[3].source [public.", "]: source table public.", " does not exist on blue"],
            empty: Some("table[3].source: empty name part in ``"),
            sound: None,
        },
        Place {
            from: "target = \"public.oauth2_revocations\"",
            to: "target = \"{}\"",
            problem: &["table[5].target [public.", "]: target table public.", " does not exist on green"],
            empty: Some("table[5].target: empty name part in ``"),
            sound: None,
        },
        Place {
            // The key column `subject` is no longer mapped verbatim, whatever the value.
            from: "subject = \"subject\"\nclient_id",
            to: "subject = \"{}\"\nclient_id",
            problem: &[
                "table[4].key [public.oauth2_consent_sessions.subject]: ",
                "key column `subject` is not mapped verbatim to any target column of public.oauth2_consent_sessions",
            ],
            empty: Some("table[4].columns.subject: empty expression"),
            sound: None,
        },
        Place {
            from: "key = [\"request_id\"]",
            to: "filter = \"{}\"\nkey = [\"request_id\"]",
            problem: &["table[5].filter [public.oauth2_revocations]: filter "],
            empty: None,
            // `pg_terminate_backend(pg_backend_pid())` is a boolean, so it prepares; run over
            // sampled rows it ends plan's session: a problem on the filter.
            sound: None,
        },
    ];
    let s = Oauth::new(2000);
    let base = Oauth::plan_text();
    let odd = [
        "nope",
        "\"Nope\"",
        "1/0",
        "(select 1",
        "scope); DROP TABLE hydra_client; --",
        "pg_terminate_backend(pg_backend_pid())",
        "signature::uuid",
        "'x'::int",
        "ARRAY[1,2]",
        "NULL",
        "东京",
        "\\\"",
        "",
    ];
    let mut cases = 0;
    for place in &places {
        for value in odd {
            let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
            let text = replace_once(&base, place.from, &place.to.replace("{}", &escaped));
            let plan = s.write_plan(&text);
            let r = run(&mut s.migrate(&["plan", plan.to_str().unwrap()]));
            cases += 1;
            let what = format!("`{value}` in `{}`", place.to);
            assert!(matches!(r.code, 0..=2), "{what} crashed plan: {r:?}");
            if place.sound == Some(value) {
                assert_eq!(r.code, 0, "{what} makes a sound plan: {r:?}");
                assert!(r.stdout.contains("\nplan is sound\n"), "{what}: {r:?}");
            } else if let (true, Some(error)) = (value.is_empty(), place.empty) {
                assert_eq!(r.code, 2, "{what}: {r:?}");
                let error = format!(": {error}");
                assert!(
                    r.stderr.lines().any(|l| l.contains(".toml:") && l.contains(&error)),
                    "{what}: exit 2 without file, line and `{error}`: {r:?}"
                );
            } else {
                assert_eq!(r.code, 1, "{what}: {r:?}");
                let needles: Vec<String> = place.problem.iter().map(|n| n.replace("{}", value)).collect();
                assert!(
                    r.stdout.lines().any(|l| needles.iter().all(|n| l.contains(n.as_str()))),
                    "{what}: no problem line with all of {needles:?}: {r:?}"
                );
            }
        }
    }
    assert_eq!(cases, 78);
    assert_eq!(s.blue.psql("SELECT count(*) > 0 FROM hydra_client"), "t", "blue was changed by plan");
}

/// Managed PostgreSQL (RDS, Aurora) grants replication through membership in
/// `rds_replication`, not the role attribute: `plan` sees it.
#[test]
fn replication_through_rds_replication_membership_is_seen() {
    let c =
        crate::support::Custom::new("CREATE TABLE t (id int PRIMARY KEY);", "CREATE TABLE t (id bigint PRIMARY KEY);");
    let user = format!("rds_{}", c.blue.name);
    c.blue.psql(&format!(
        "DO $$ BEGIN CREATE ROLE rds_replication; EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
         CREATE ROLE {user} LOGIN NOREPLICATION; GRANT SELECT ON t TO {user};"
    ));
    let plan = c.plan("auto", "", "[[table]]\nsource = \"public.t\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\n");
    let url = c.blue.url().replace("user=postgres", &format!("user={user}")).replace("postgres@", &format!("{user}@"));
    let r = run(c.migrate(&["plan", plan.to_str().unwrap()]).env("BLUE_URL", &url));
    assert!(r.stdout.contains("FAIL  blue REPLICATION privilege: no"), "{r:?}");
    assert!(r.stdout.contains("GRANT rds_replication TO"), "the fix for managed servers is named: {r:?}");
    c.blue.psql(&format!("GRANT rds_replication TO {user}"));
    let r = run(c.migrate(&["plan", plan.to_str().unwrap()]).env("BLUE_URL", &url));
    assert!(r.stdout.contains("ok    blue REPLICATION privilege: yes (member of rds_replication)"), "{r:?}");
    c.blue.psql(&format!("REVOKE SELECT ON t FROM {user}; DROP OWNED BY {user}; DROP ROLE {user}"));
}

/// Shell completions and the man page are generated from the same command line definition.
#[test]
fn completions_and_man_page_come_from_the_command_line() {
    let out = assert_cmd::Command::cargo_bin("migrate").unwrap().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("_migrate()") && text.contains("--recopy") && text.contains("cutover"), "{text}");
    let out = assert_cmd::Command::cargo_bin("migrate").unwrap().arg("man").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(".TH migrate 1") && text.contains("cutover") && text.contains("status"), "{text}");
}
