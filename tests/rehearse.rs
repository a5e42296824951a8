//! `migrate rehearse` as a CI job runs it: the fixture plan passes end to end from schema files
//! (JUnit report with passing cases); a wrong expression fails at `plan`, the JUnit failure
//! naming the column; a transform that reads a table through a function (invisible to capture)
//! loses rows under the rehearsal's writer and verify catches it; the example workflow's
//! command runs as written.

use std::{path::Path, process::Command};

use crate::support::{root, run};

fn rehearse(dir: &Path, args: &[&str]) -> crate::support::Run {
    let mut c = assert_cmd::Command::cargo_bin("migrate").unwrap();
    c.current_dir(dir).env_remove("BLUE_URL").env_remove("GREEN_URL").env("MIGRATE_LOG", "warn").args(args);
    c.timeout(std::time::Duration::from_secs(300));
    run(&mut c)
}

/// `rehearse PLAN` over the fixture's schemas, then `extra`.
fn fixture<'a>(plan: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "rehearse",
        plan,
        "--blue-schema",
        "fixtures/oauth/blue.sql",
        "--green-schema",
        "fixtures/oauth/green.sql",
    ];
    args.extend_from_slice(extra);
    args
}

/// The repository's plan and fixture, in a directory of their own (the report lands there).
fn checkout() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "plans/oauth-v1-to-v2.toml",
        "fixtures/oauth/blue.sql",
        "fixtures/oauth/green.sql",
        "fixtures/oauth/generate.sql",
    ] {
        let to = dir.path().join(f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(root().join(f), to).unwrap();
    }
    dir
}

#[test]
fn the_fixture_plan_rehearses_green_and_a_wrong_expression_fails_at_plan() {
    let dir = checkout();
    let d = dir.path();
    let started = std::time::Instant::now();
    let r = rehearse(d, &fixture("plans/oauth-v1-to-v2.toml", &["--rows", "2000", "--report", "report.xml"]));
    assert_eq!(r.code, 0, "{r:?}");
    eprintln!("rehearsal with generated rows: {:?}\n{}", started.elapsed(), r.stdout);
    for step in ["servers", "load schemas", "blue data", "plan", "copy", "writer", "verify", "cutover"] {
        assert!(r.stdout.lines().any(|l| l.starts_with(&format!("ok   {step} ("))), "{step}: {r:?}");
    }
    assert!(r.stdout.contains("ok   verify public.oauth2_access_tokens"), "{r:?}");
    assert!(r.stdout.lines().last().is_some_and(|l| l.starts_with("rehearsal passed in ")), "{r:?}");
    assert!(!r.stdout.contains('\x1b'), "ANSI escapes: {r:?}");
    let xml = std::fs::read_to_string(d.join("report.xml")).unwrap();
    assert!(xml.starts_with("<?xml") && xml.contains("failures=\"0\"") && !xml.contains("<failure"), "{xml}");
    assert_eq!(xml.matches("<testcase ").count(), r.stdout.lines().count() - 1, "{xml}");
    let json = rehearse(d, &fixture("plans/oauth-v1-to-v2.toml", &["--rows", "500", "--format", "json"]));
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("{e}: {json:?}"));
    assert_eq!(v["passed"], true, "{json:?}");

    // A wrong expression: the plan step fails, naming the column, and nothing runs after it.
    let plan = std::fs::read_to_string(d.join("plans/oauth-v1-to-v2.toml")).unwrap();
    let broken = plan.replacen("token_lifespan = \"", "token_lifespan = \"no_such_column + ", 1);
    assert_ne!(broken, plan);
    std::fs::write(d.join("plans/broken.toml"), broken).unwrap();
    let r = rehearse(d, &fixture("plans/broken.toml", &["--rows", "200", "--report", "broken.xml"]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("FAIL plan"), "{r:?}");
    assert!(!r.stdout.contains(" copy ("), "{r:?}");
    let xml = std::fs::read_to_string(d.join("broken.xml")).unwrap();
    assert!(xml.contains("<failure") && xml.contains("public.oauth2_clients.token_lifespan"), "{xml}");
    assert!(xml.contains("no_such_column"), "{xml}");
}

/// A filter that reads another table through a function (`plan` cannot see inside it): the
/// writer flips rows of that table, rows leave and enter the filter without a write capture
/// sees, and the rehearsal's verify names the table.
#[test]
fn a_transform_that_loses_rows_under_writes_fails_at_verify() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("blue.sql"),
        "CREATE TABLE clients (id int PRIMARY KEY, active boolean NOT NULL);
         CREATE TABLE tokens (id int PRIMARY KEY, client_id int NOT NULL REFERENCES clients, scope text);
         CREATE FUNCTION client_active(int) RETURNS boolean STABLE LANGUAGE sql
           AS 'SELECT active FROM clients WHERE id = $1';",
    )
    .unwrap();
    std::fs::write(
        d.join("green.sql"),
        "CREATE TABLE tokens (id int PRIMARY KEY, client_id int NOT NULL, scope text);",
    )
    .unwrap();
    std::fs::write(
        d.join("plan.toml"),
        "name = \"lossy\"\n[blue]\nurl = \"${BLUE_URL}\"\n[green]\nurl = \"${GREEN_URL}\"\n\
         [[table]]\nsource = \"public.tokens\"\nkey = [\"id\"]\nfilter = \"client_active(client_id)\"\n",
    )
    .unwrap();
    let r = rehearse(
        d,
        &[
            "rehearse",
            "plan.toml",
            "--blue-schema",
            "blue.sql",
            "--green-schema",
            "green.sql",
            "--rows",
            "300",
            "--writer-rate",
            "400",
            "--report",
            "r.xml",
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("ok   plan (") && r.stdout.contains("FAIL verify public.tokens"), "{r:?}");
    let xml = std::fs::read_to_string(d.join("r.xml")).unwrap();
    assert!(xml.contains("<failure") && xml.contains("public.tokens key ("), "{xml}");
}

/// The example CI workflow's `migrate rehearse` command, run as written from a checkout.
#[test]
fn the_example_workflow_command_runs() {
    let workflow = std::fs::read_to_string(root().join("docs/ci/github-actions.yml")).unwrap();
    let line = workflow
        .lines()
        .find_map(|l| l.trim().strip_prefix("run: ").filter(|c| c.starts_with("migrate rehearse")))
        .expect("the workflow runs `migrate rehearse`");
    let dir = checkout();
    let bin = assert_cmd::cargo::cargo_bin("migrate");
    let path = format!("{}:{}", bin.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("sh").args(["-c", line]).current_dir(dir.path()).env("PATH", path).output().unwrap();
    assert!(
        out.status.success(),
        "{line}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let xml = std::fs::read_to_string(dir.path().join("rehearsal.xml")).unwrap();
    assert!(xml.contains("<testcase ") && !xml.contains("<failure"), "{xml}");
}

/// A blue schema as `pg_dump --schema-only` writes it, owned by and granted to roles the
/// throwaway server does not have: they are made (NOLOGIN) before it loads.
#[test]
fn a_pg_dump_schema_with_its_roles_rehearses() {
    let db = crate::support::TestDb::create(crate::support::blue_cluster(), "dumped", None);
    db.psql(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rehearse_owner') THEN CREATE ROLE rehearse_owner; END IF;
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'Rehearse Reader') THEN CREATE ROLE \"Rehearse Reader\"; END IF;
         END $$;
         CREATE TABLE accounts (id bigint PRIMARY KEY, email text NOT NULL UNIQUE, created timestamptz NOT NULL);
         ALTER TABLE accounts OWNER TO rehearse_owner;
         GRANT SELECT ON accounts TO \"Rehearse Reader\";",
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dump = Command::new(bluegreen::sandbox::bindir().unwrap().join("pg_dump"))
        .args(["--schema-only", "-h", "127.0.0.1", "-U", "postgres", "-p"])
        .arg(db.cluster.port.to_string())
        .arg(&db.name)
        .output()
        .unwrap();
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let text = String::from_utf8(dump.stdout).unwrap();
    assert!(text.contains("OWNER TO rehearse_owner") && text.contains("\"Rehearse Reader\""), "{text}");
    std::fs::write(d.join("blue.sql"), text).unwrap();
    std::fs::write(
        d.join("green.sql"),
        "CREATE TABLE accounts (id bigint PRIMARY KEY, email text NOT NULL, created timestamptz);",
    )
    .unwrap();
    std::fs::write(
        d.join("plan.toml"),
        "name = \"dumped\"\n[blue]\nurl = \"${BLUE_URL}\"\n[green]\nurl = \"${GREEN_URL}\"\n\
         [[table]]\nsource = \"public.accounts\"\nkey = [\"id\"]\n",
    )
    .unwrap();
    let r = rehearse(
        d,
        &["rehearse", "plan.toml", "--blue-schema", "blue.sql", "--green-schema", "green.sql", "--rows", "300"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("ok   verify public.accounts"), "{r:?}");
}
