//! TLS against a cluster with certificates made by the test, and secrets: a password given in
//! the URLs (through the environment) never reaches any output, log or state row.

use std::{path::PathBuf, process::Command, sync::OnceLock};

use crate::support::{green_cluster, run, Bouncer, Cluster, Oauth};

const PASSWORD: &str = "Zq7-s3cret-PASS-9x";

/// A cluster with TLS on (certificate for `localhost` only, signed by a test CA) and a role
/// `migrator` that must log in with a password over TCP.
struct Secure {
    cluster: &'static Cluster,
    ca: PathBuf,
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn secure() -> &'static Secure {
    static S: OnceLock<Secure> = OnceLock::new();
    S.get_or_init(|| {
        let dir = bluegreen::sandbox::server_dir("certs").unwrap();
        openssl(
            &dir,
            &[
                "req",
                "-new",
                "-x509",
                "-days",
                "2",
                "-nodes",
                "-subj",
                "/CN=bluegreen test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
        );
        openssl(
            &dir,
            &["req", "-new", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr"],
        );
        std::fs::write(dir.join("ext"), "subjectAltName=DNS:localhost\n").unwrap();
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext",
                "-out",
                "server.crt",
            ],
        );
        // A client certificate for role `certuser`, signed by the same CA.
        openssl(
            &dir,
            &["req", "-new", "-nodes", "-subj", "/CN=certuser", "-keyout", "client.key", "-out", "client.csr"],
        );
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "client.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                "client.crt",
            ],
        );
        Command::new("chmod").args(["600"]).arg(dir.join("server.key")).status().unwrap();
        Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status().ok();
        let cert = format!("ssl_cert_file={}", dir.join("server.crt").display());
        let key = format!("ssl_key_file={}", dir.join("server.key").display());
        let ca = format!("ssl_ca_file={}", dir.join("ca.crt").display());
        let cluster: &'static Cluster = Cluster::own("tls", &["ssl=on", &cert, &key, &ca]);
        let hba = cluster.dir.join("data/pg_hba.conf");
        let old = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!(
                "host all migrator 127.0.0.1/32 scram-sha-256\nhost all migrator ::1/128 scram-sha-256\n\
                 hostssl all certuser 127.0.0.1/32 cert\nhostssl all certuser ::1/128 cert\n\
                 host all certuser 127.0.0.1/32 reject\nhost all certuser ::1/128 reject\n{old}"
            ),
        )
        .unwrap();
        cluster.psql(
            "postgres",
            &format!(
                "CREATE ROLE migrator SUPERUSER LOGIN PASSWORD '{PASSWORD}'; CREATE ROLE certuser SUPERUSER LOGIN; \
                 SELECT pg_reload_conf()"
            ),
        );
        Secure { cluster, ca: dir.join("ca.crt") }
    })
}

fn plan_run(s: &Oauth, blue_url: &str) -> crate::support::Run {
    let plan = s.write_plan(&Oauth::plan_text());
    run(s.migrate(&["plan", plan.to_str().unwrap()]).env("BLUE_URL", blue_url))
}

#[test]
fn tls_require_and_verify_full_work_and_fail_clearly() {
    let sec = secure();
    let s = Oauth::on(sec.cluster, green_cluster(), 1_000);
    let port = sec.cluster.port;
    let db = &s.blue.name;

    let r = plan_run(&s, &format!("postgres://postgres@127.0.0.1:{port}/{db}?sslmode=require"));
    assert_eq!(r.code, 0, "sslmode=require: {r:?}");
    let ca = sec.ca.display();
    let r = plan_run(&s, &format!("postgres://postgres@localhost:{port}/{db}?sslmode=verify-full&sslrootcert={ca}"));
    assert_eq!(r.code, 0, "sslmode=verify-full: {r:?}");
    let r = plan_run(&s, &format!("postgres://postgres@localhost:{port}/{db}?sslmode=verify-ca&sslrootcert={ca}"));
    assert_eq!(r.code, 0, "sslmode=verify-ca: {r:?}");

    // The certificate names localhost, not 127.0.0.1.
    let r = plan_run(&s, &format!("postgres://postgres@127.0.0.1:{port}/{db}?sslmode=verify-full&sslrootcert={ca}"));
    assert_eq!(r.code, 1, "verify-full against the wrong host name must fail: {r:?}");
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(all.contains("blue") && all.contains("certificate verify failed"), "{r:?}");
    // Without the CA, the certificate cannot be verified either.
    let r = plan_run(&s, &format!("postgres://postgres@localhost:{port}/{db}?sslmode=verify-full"));
    assert_eq!(r.code, 1, "{r:?}");
    // require against a server without TLS (green's cluster has ssl off).
    let plain = format!("{}&sslmode=require", s.green.url().replace("?sslmode=disable", "?application_name=x"));
    let plan = s.write_plan(&Oauth::plan_text());
    let r = run(s.migrate(&["plan", plan.to_str().unwrap()]).env("BLUE_URL", &plain));
    assert_eq!(r.code, 1, "{r:?}");
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(all.contains("blue") && all.to_lowercase().contains("tls"), "{r:?}");
}

/// A server that asks for a client certificate (`cert` authentication): given in the URL
/// (`sslcert`, `sslkey`), or by libpq's `PGSSLCERT`/`PGSSLKEY`; without one the connection is
/// refused, naming blue.
#[test]
fn a_client_certificate_logs_in() {
    let sec = secure();
    let s = Oauth::on(sec.cluster, green_cluster(), 1_000);
    let (port, db) = (sec.cluster.port, &s.blue.name);
    let dir = sec.ca.parent().unwrap();
    let (ca, cert, key) = (sec.ca.display(), dir.join("client.crt"), dir.join("client.key"));
    let base = format!("postgres://certuser@localhost:{port}/{db}?sslmode=verify-full&sslrootcert={ca}");
    let r = plan_run(&s, &format!("{base}&sslcert={}&sslkey={}", cert.display(), key.display()));
    assert_eq!(r.code, 0, "client certificate in the URL: {r:?}");
    let plan = s.write_plan(&Oauth::plan_text());
    let r = run(s
        .migrate(&["plan", plan.to_str().unwrap()])
        .env("BLUE_URL", &base)
        .env("PGSSLCERT", &cert)
        .env("PGSSLKEY", &key));
    assert_eq!(r.code, 0, "client certificate from PGSSLCERT/PGSSLKEY: {r:?}");
    let r = plan_run(&s, &base);
    assert_eq!(r.code, 1, "no client certificate: {r:?}");
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(all.contains("blue") && all.contains("certificate"), "{r:?}");
    // A key that is not there is named.
    let r = plan_run(&s, &format!("{base}&sslcert={}&sslkey=/nonexistent.key", cert.display()));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(format!("{}{}", r.stdout, r.stderr).contains("sslkey /nonexistent.key"), "{r:?}");
}

/// Every command, with the password in both URLs (from the environment, as `${VAR}`), on the
/// success paths and on failures (wrong password, unreachable server): no output, log line or
/// state row carries it.
#[test]
fn passwords_never_leak() {
    let sec = secure();
    let s = Oauth::on(sec.cluster, green_cluster(), 2_000);
    let port = sec.cluster.port;
    let blue_url = format!("postgres://migrator:{PASSWORD}@127.0.0.1:{port}/{}?sslmode=require", s.blue.name);
    let green_url = s.green.url().replace("postgres@", &format!("postgres:{PASSWORD}@"));
    let blue_dsn = format!("host=127.0.0.1 port={port} dbname={} user=migrator password={PASSWORD}", s.blue.name);
    let bouncer = Bouncer::start("transaction", &blue_dsn);
    let admin = bouncer.admin_url().replace("postgres@", &format!("postgres:{PASSWORD}@"));
    let text = format!(
        "{}\n[cutover.pgbouncer]\nadmin_url = \"{admin}\"\ndatabase = \"app\"\ndatabases_file = \"{}\"\n\
         green_dsn = \"host=127.0.0.1 port={} dbname={} user=postgres password={PASSWORD}\"\n",
        Oauth::plan_text(),
        bouncer.databases_file.display(),
        green_cluster().port,
        s.green.name
    );
    let plan = s.write_plan(&text);
    let p = plan.to_str().unwrap();
    let mut outputs = Vec::new();
    let go = |args: &[&str], blue: &str, expect: i32| {
        let r = run(s.migrate(args).env("BLUE_URL", blue).env("GREEN_URL", &green_url).env("MIGRATE_LOG", "debug"));
        assert_eq!(r.code, expect, "{args:?}: {r:?}");
        (args.join(" "), r.stdout, r.stderr)
    };
    outputs.push(go(&["plan", p], &blue_url, 0));
    outputs.push(go(&["plan", p, "--format", "json"], &blue_url, 0));
    outputs.push(go(&["--log-format", "json", "copy", p, "--no-follow"], &blue_url, 0));
    outputs.push(go(&["status", p], &blue_url, 0));
    outputs.push(go(&["status", p, "--format", "json"], &blue_url, 0));
    outputs.push(go(&["verify", p], &blue_url, 0));
    outputs.push(go(&["verify", p, "--format", "json"], &blue_url, 0));
    outputs.push(go(&["cutover", p, "--dry-run"], &blue_url, 0));
    // Failures: a wrong password, a server that is not there.
    let wrong = blue_url.replace(PASSWORD, &format!("{PASSWORD}-wrong"));
    outputs.push(go(&["plan", p], &wrong, 1));
    outputs.push(go(&["copy", p], &wrong, 3));
    let gone = blue_url.replace(&format!(":{port}/"), &format!(":{}/", bluegreen::sandbox::free_port()));
    outputs.push(go(&["plan", p], &gone, 1));
    outputs.push(go(&["verify", p], &gone, 3));
    // Machine logs: every line of the JSON-logged copy is one JSON object with a level.
    let (_, _, json_log) = &outputs[2];
    assert!(json_log.lines().count() > 3, "{json_log}");
    for line in json_log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
    }
    for (args, out, err) in &outputs {
        assert!(
            !out.contains(PASSWORD) && !err.contains(PASSWORD),
            "`migrate {args}` printed the password:\n{out}\n{err}"
        );
    }
    // Nothing stored on either side carries it.
    let schema = format!("bluegreen_{}", s.name().replace('-', "_"));
    let state = s.green.psql(&format!(
        "SELECT string_agg(t::text, E'\\n') FROM (SELECT m::text AS t FROM {schema}.migration m UNION ALL \
         SELECT x::text FROM {schema}.tables x UNION ALL SELECT c::text FROM {schema}.chunks c UNION ALL \
         SELECT v::text FROM {schema}.verified v) q"
    ));
    assert!(state.contains("public."), "state dump looks empty: {state}");
    assert!(!state.contains(PASSWORD), "a state row holds the password");
    let blue_side = s.blue.psql(
        "SELECT coalesce(string_agg(application_name || ' ' || coalesce(query, ''), E'\\n'), '') FROM pg_stat_activity",
    );
    assert!(!blue_side.contains(PASSWORD));
    outputs.push(go(&["cleanup", p], &blue_url, 0));
    let (args, out, err) = outputs.last().unwrap();
    assert!(!out.contains(PASSWORD) && !err.contains(PASSWORD), "`migrate {args}` printed the password");
}

/// libpq's conventions: a URL without a password takes it from `PGPASSWORD`, else from the
/// password file (`PGPASSFILE`), which is ignored when others may read it, as libpq does. An
/// empty variable in a URL is refused, naming it.
#[test]
fn password_from_pgpassword_or_a_password_file_and_empty_urls_refused() {
    let sec = secure();
    let s = Oauth::on(sec.cluster, green_cluster(), 1_000);
    let port = sec.cluster.port;
    let url = format!("postgres://migrator@127.0.0.1:{port}/{}?sslmode=require", s.blue.name);
    let plan = s.write_plan(&Oauth::plan_text());
    let dir = tempfile::tempdir().unwrap();
    let passfile = dir.path().join("pgpass");
    let plan_with = |env: &[(&str, &str)]| {
        let mut cmd = s.migrate(&["plan", plan.to_str().unwrap()]);
        cmd.env("BLUE_URL", &url).env_remove("PGPASSWORD").env("PGPASSFILE", &passfile);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let r = run(&mut cmd);
        assert!(!format!("{}{}", r.stdout, r.stderr).contains(PASSWORD), "the password leaked: {r:?}");
        r
    };

    let r = plan_with(&[]);
    assert_eq!(r.code, 1, "no password anywhere: {r:?}");
    assert!(r.stderr.contains("blue") && r.stderr.contains("password missing"), "{r:?}");
    let r = plan_with(&[("PGPASSWORD", PASSWORD)]);
    assert_eq!(r.code, 0, "PGPASSWORD: {r:?}");

    std::fs::write(&passfile, format!("# test\n127.0.0.1:{port}:{}:migrator:{PASSWORD}\n", s.blue.name)).unwrap();
    Command::new("chmod").arg("600").arg(&passfile).status().unwrap();
    let r = plan_with(&[]);
    assert_eq!(r.code, 0, "password file: {r:?}");
    Command::new("chmod").arg("644").arg(&passfile).status().unwrap();
    let r = plan_with(&[]);
    assert_eq!(r.code, 1, "a password file others may read is ignored: {r:?}");
    assert!(r.stderr.contains("group or world access"), "{r:?}");

    let r = run(s.migrate(&["plan", plan.to_str().unwrap()]).env("BLUE_URL", ""));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("blue.url: environment variable `BLUE_URL` is empty"), "{r:?}");
}

/// A connection service (`service=` or `PGSERVICE`, read from `PGSERVICEFILE`) gives host, port,
/// database, user, password and TLS settings, as for psql; the string's own settings win; an
/// unknown service is named with the files looked in.
#[test]
fn a_connection_service_file_gives_the_settings() {
    let sec = secure();
    let s = Oauth::on(sec.cluster, green_cluster(), 1_000);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pg_service.conf");
    std::fs::write(
        &file,
        format!(
            "# services\n[other]\nhost=nowhere\n\n[blue_svc]\nhost=localhost\nport={}\ndbname={}\nuser=migrator\n\
             password={PASSWORD}\nsslmode=verify-full\nsslrootcert={}\n",
            sec.cluster.port,
            s.blue.name,
            sec.ca.display()
        ),
    )
    .unwrap();
    let plan = s.write_plan(&Oauth::plan_text());
    let plan_with = |url: &str, env: &[(&str, &str)]| {
        let mut cmd = s.migrate(&["plan", plan.to_str().unwrap()]);
        cmd.env("BLUE_URL", url).env("PGSERVICEFILE", &file).env_remove("PGPASSWORD");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let r = run(&mut cmd);
        assert!(!format!("{}{}", r.stdout, r.stderr).contains(PASSWORD), "the password leaked: {r:?}");
        r
    };
    let r = plan_with("service=blue_svc", &[]);
    assert_eq!(r.code, 0, "service= in a DSN: {r:?}");
    assert!(
        r.stdout.contains(&format!("blue   postgres://migrator@localhost:{}/{}", sec.cluster.port, s.blue.name)),
        "{r:?}"
    );
    let r = plan_with("postgres:///?service=blue_svc", &[]);
    assert_eq!(r.code, 0, "service= in a URL: {r:?}");
    let r = plan_with("sslmode=require", &[("PGSERVICE", "blue_svc")]);
    assert_eq!(r.code, 0, "PGSERVICE: {r:?}");
    // The string's own database wins over the service's.
    let r = plan_with("service=blue_svc dbname=no_such_db", &[]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no_such_db"), "{r:?}");
    let r = plan_with("service=nope", &[]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("service `nope` is not in") && r.stderr.contains("pg_service.conf"), "{r:?}");
}
