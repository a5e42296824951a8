//! `migrate rehearse`: a plan proved end to end with no database to provision, for CI. Starts
//! throwaway blue, green and PgBouncer (the demo's sandbox), loads the given schemas and data
//! (or generated rows), points the plan at them (everything else as written), then runs plan,
//! copy under a steady writer through PgBouncer, verify and cutover, timing each step; the
//! report is text, JSON, and JUnit XML for CI systems.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{Format, Outcome};
use crate::{
    error::{Error, Result},
    pg::QualifiedName,
    plan::Plan,
    sandbox::{rows, LocalBouncer, LocalCluster},
    shutdown::Shutdown,
};

/// What `migrate rehearse` was asked.
#[derive(Debug, Clone)]
pub struct Rehearsal {
    /// Blue's schema (plain SQL or `pg_dump --schema-only`).
    pub blue_schema: PathBuf,
    /// Green's schema.
    pub green_schema: PathBuf,
    /// Blue's data (SQL); generated rows when absent.
    pub blue_data: Option<PathBuf>,
    /// Rows generated per table.
    pub rows: u64,
    /// Writer statements per second through PgBouncer while copying and following.
    pub writer_rate: u32,
    /// JUnit XML report file.
    pub report: Option<PathBuf>,
    /// Output format on stdout.
    pub format: Format,
}

/// One step of the rehearsal (a JUnit test case).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Step {
    /// Test-case name, e.g. `plan` or `verify public.t`.
    pub name: String,
    /// Passed.
    pub ok: bool,
    /// Seconds taken.
    pub seconds: f64,
    /// One line on what happened.
    pub detail: String,
    /// Why it failed (table, column and key where known), one item per finding.
    pub failures: Vec<String>,
}

/// The servers of one rehearsal; dropping it stops them.
struct Servers {
    blue: LocalCluster,
    green: LocalCluster,
    bouncer: LocalBouncer,
    dir: PathBuf,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.bouncer.stop();
        self.blue.stop();
        self.green.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cluster stopped when dropped unless taken.
struct Stopping(Option<LocalCluster>);

impl Stopping {
    fn get(&self) -> Result<&LocalCluster> {
        self.0.as_ref().ok_or(Error::Internal("a rehearsal cluster taken twice"))
    }

    fn take(mut self) -> Result<LocalCluster> {
        self.0.take().ok_or(Error::Internal("a rehearsal cluster taken twice"))
    }
}

impl Drop for Stopping {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.stop();
        }
    }
}

/// Runs the rehearsal of the plan at `path`.
pub async fn run(path: &Path, r: &Rehearsal, shutdown: Shutdown) -> Result<Outcome> {
    crate::sandbox::check_prerequisites()?;
    let text = std::fs::read_to_string(path).map_err(|source| Error::File {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    for f in [Some(&r.blue_schema), Some(&r.green_schema), r.blue_data.as_ref()].into_iter().flatten() {
        if !f.is_file() {
            return Err(Error::Usage(format!("{}: no such file", f.display())));
        }
    }
    let mut steps: Vec<Step> = Vec::new();
    let started = Instant::now();
    let outcome = rehearse(&text, r, &shutdown, &mut steps).await;
    let ok = outcome.is_ok() && steps.iter().all(|s| s.ok);
    if let Err(e) = &outcome {
        steps.push(Step {
            name: "rehearsal".into(),
            ok: false,
            seconds: 0.0,
            detail: e.to_string(),
            failures: vec![e.to_string()],
        });
    }
    let total = started.elapsed().as_secs_f64();
    if let Some(file) = &r.report {
        std::fs::write(file, junit(path, &steps, total)).map_err(|source| Error::File {
            what: "writing",
            path: file.clone(),
            source,
        })?;
    }
    match r.format {
        Format::Text => {
            for s in &steps {
                println!("{} {} ({:.1} s): {}", if s.ok { "ok  " } else { "FAIL" }, s.name, s.seconds, s.detail);
                for f in &s.failures {
                    println!("       {f}");
                }
            }
            println!("rehearsal {} in {total:.1} s", if ok { "passed" } else { "FAILED" });
        }
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "passed": ok, "seconds": total, "steps": steps }))
                .unwrap_or_default()
        ),
    }
    match outcome {
        // The rehearsal itself could not go on (a server, a load, a step's own failure, not a
        // finding): exit 3, its report saying where it stopped.
        Err(e) => Err(e),
        Ok(()) if ok => Ok(Outcome::Ok),
        Ok(()) => Ok(Outcome::Problems),
    }
}

/// Times `f` as step `name`.
async fn step<T>(
    steps: &mut Vec<Step>,
    name: &str,
    f: impl std::future::Future<Output = Result<(bool, String, Vec<String>, T)>>,
) -> Result<(bool, T)> {
    let started = Instant::now();
    let (ok, detail, failures, out) = f.await?;
    steps.push(Step { name: name.into(), ok, seconds: started.elapsed().as_secs_f64(), detail, failures });
    Ok((ok, out))
}

async fn rehearse(text: &str, r: &Rehearsal, shutdown: &Shutdown, steps: &mut Vec<Step>) -> Result<()> {
    let (_, servers) = step(steps, "servers", async {
        // Each one stopped again if a later one fails to start.
        let blue = Stopping(Some(LocalCluster::start("rehearse-blue", &[])?));
        let green = Stopping(Some(LocalCluster::start("rehearse-green", &[])?));
        let (b, g) = (blue.get()?, green.get()?);
        b.psql("postgres", "CREATE DATABASE app")?;
        g.psql("postgres", "CREATE DATABASE app")?;
        let bouncer =
            LocalBouncer::start("transaction", &format!("host=127.0.0.1 port={} dbname=app user=postgres", b.port))?;
        let (blue, green) = (blue.take()?, green.take()?);
        let dir = crate::sandbox::server_dir("rehearse")?;
        let detail = format!("blue on port {}, green on {}, PgBouncer on {}", blue.port, green.port, bouncer.port);
        Ok((true, detail, Vec::new(), Servers { blue, green, bouncer, dir }))
    })
    .await?;
    let load = |cluster: &LocalCluster, file: &Path| {
        // A `pg_dump` names the roles that own and may use each object; the throwaway server
        // has none of them.
        let text = std::fs::read_to_string(file).map_err(|source| Error::File {
            what: "reading",
            path: file.to_path_buf(),
            source,
        })?;
        for role in roles_named(&text) {
            let sql = format!(
                "DO $bg$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {}) THEN CREATE ROLE {} NOLOGIN; \
                 END IF; END $bg$",
                crate::pg::literal(&role),
                crate::pg::ident(&role)
            );
            cluster.psql("app", &sql)?;
        }
        cluster.psql_file("app", file, &[]).map_err(|e| Error::Rehearsal(format!("loading {}: {e}", file.display())))
    };
    step(steps, "load schemas", async {
        load(&servers.blue, &r.blue_schema)?;
        load(&servers.green, &r.green_schema)?;
        Ok((true, format!("blue {}, green {}", r.blue_schema.display(), r.green_schema.display()), Vec::new(), ()))
    })
    .await?;
    // The plan as written, pointed at the throwaway servers.
    let plan_path = servers.dir.join("plan.toml");
    let rewritten = point_plan(text, &servers)?;
    std::fs::write(&plan_path, rewritten).map_err(|source| Error::File {
        what: "writing",
        path: plan_path.clone(),
        source,
    })?;
    let plan = Plan::load(&plan_path)?;
    let blue = plan.blue.connect().await?;
    let green = plan.green.connect().await?;
    let mut tables: Vec<QualifiedName> = Vec::new();
    for t in &plan.tables {
        for q in std::iter::once(&t.source).chain(t.joins.iter().map(|j| &j.table)) {
            if !tables.contains(q) {
                tables.push(q.clone());
            }
        }
    }
    let (_, generators) = step(steps, "blue data", async {
        let gens = rows::plan_rows(&blue, &tables).await.unwrap_or_default();
        match &r.blue_data {
            Some(f) => {
                load(&servers.blue, f)?;
                servers.blue.psql("app", "ANALYZE")?;
                Ok((true, format!("loaded {}", f.display()), Vec::new(), gens))
            }
            None => {
                rows::load(&blue, &gens, r.rows).await?;
                Ok((true, format!("{} generated rows in each of {} table(s)", r.rows, gens.len()), Vec::new(), gens))
            }
        }
    })
    .await?;

    let (sound, resolved) = step(steps, "plan", async {
        let resolved = crate::plan::resolve(&plan, &blue, &green).await?;
        let failures: Vec<String> = resolved
            .problems
            .iter()
            .map(|p| {
                let at = match (&p.table, &p.column) {
                    (Some(t), Some(c)) => format!(" [{t}.{c}]"),
                    (Some(t), None) => format!(" [{t}]"),
                    _ => String::new(),
                };
                format!("{}{at}: {}", p.field, p.message)
            })
            .collect();
        let detail = if failures.is_empty() {
            format!("sound: {} table(s), capture {:?}", resolved.tables.len(), resolved.capture.method)
        } else {
            format!("{} problem(s)", failures.len())
        };
        Ok((failures.is_empty(), detail, failures, resolved))
    })
    .await?;
    if !sound {
        return Ok(());
    }

    // The application's writes go through PgBouncer, as in production.
    let app = crate::pg::ConnInfo::parse(
        crate::pg::Side::Pgbouncer,
        &format!("host=127.0.0.1 port={} dbname=app user=postgres", servers.bouncer.port),
    )?
    .connect_raw()
    .await?;
    let writer = rows::Writer::start(app, generators, r.rows, r.writer_rate);
    let copy_stop = Shutdown::manual();
    let copying = {
        let (p, stop) = (plan_path.clone(), copy_stop.clone());
        tokio::spawn(async move {
            crate::run(&p, crate::Command::Copy { no_follow: false, recopy: Vec::new(), metrics: None }, stop).await
        })
    };
    let relay = {
        let (outer, stop) = (shutdown.clone(), copy_stop.clone());
        tokio::spawn(async move {
            outer.wait().await;
            stop.trigger();
        })
    };
    let mut copying = copying;
    let (copied, ()) = step(steps, "copy", async {
        // A copy that fails is said at once, with its error (not after the wait's 10 minutes).
        let waited = tokio::select! {
            r = super::demo::wait_following(&plan, shutdown) => r,
            r = &mut copying => Err(match r {
                Ok(Ok(_)) => Error::Rehearsal("copy ended before following".into()),
                Ok(Err(e)) => e,
                Err(e) => Error::TaskPanicked { task: "copy", message: e.to_string() },
            }),
        };
        match waited {
            Ok(()) => Ok((true, "copied; green follows blue".to_string(), Vec::new(), ())),
            Err(e) => Ok((false, e.to_string(), vec![e.to_string()], ())),
        }
    })
    .await?;
    // Writes go on through a verify of a moving blue, then stop so the cutover's application
    // (v1 statements) does not write to green's schema.
    let writes = writer.done.clone();
    if copied {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let w = writer.stop().await;
    step(steps, "writer", async {
        let detail = format!(
            "{} statement(s) through PgBouncer: {} changed a row, {} refused by the schema",
            writes.load(std::sync::atomic::Ordering::Relaxed),
            w.writes,
            w.refused
        );
        Ok((w.failed.is_empty() && w.writes > 0, detail, w.failed.clone(), ()))
    })
    .await?;
    if copied {
        super::demo::wait_following(&plan, shutdown).await?;
        // Caught up with the last writes: what verify compares is what blue committed.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (equal, report) = step(steps, "verify", async {
            let report = crate::verify::run(&plan, &resolved, None, false, shutdown).await?;
            let rows: i64 = report.tables.iter().map(|t| t.rows_blue).sum();
            let differing = report.tables.iter().filter(|t| t.differences_total > 0).count();
            let failures = if report.equal { Vec::new() } else { vec![format!("{differing} table(s) differ")] };
            let detail = format!("{} table(s), {rows} row(s) compared", report.tables.len());
            Ok((report.equal, detail, failures, report))
        })
        .await?;
        // One case per table, each difference named by table, key and column.
        for t in &report.tables {
            let failures: Vec<String> = t
                .differences
                .iter()
                .map(|d| {
                    let cols: Vec<String> = d
                        .columns
                        .iter()
                        .map(|(c, b, g)| {
                            format!(
                                "{c}: blue {} green {}",
                                b.as_deref().unwrap_or("NULL"),
                                g.as_deref().unwrap_or("NULL")
                            )
                        })
                        .collect();
                    format!("{} key ({}) {:?} {}", t.table, d.key.join(", "), d.kind, cols.join("; "))
                })
                .collect();
            steps.push(Step {
                name: format!("verify {}", t.table),
                ok: t.differences_total == 0,
                seconds: t.seconds,
                detail: format!(
                    "{} row(s) on blue, {} on green, {} difference(s)",
                    t.rows_blue, t.rows_green, t.differences_total
                ),
                failures,
            });
        }
        if equal {
            step(steps, "cutover", async {
                let mut quiet = |_: &[crate::plan::Check]| {};
                let report = crate::cutover::run(&plan, &resolved, false, shutdown.clone(), &mut quiet).await?;
                let paused = report.paused_ms.map(|ms| format!(", traffic paused {ms:.1} ms")).unwrap_or_default();
                Ok(match (&report.error, report.ok()) {
                    (None, true) => (true, format!("switched through PgBouncer{paused}"), Vec::new(), ()),
                    (Some(e), _) => (false, e.to_string(), vec![e.to_string()], ()),
                    (None, false) => {
                        let why = format!("{:?}", report.ended);
                        (false, format!("not switched: {why}"), vec![why], ())
                    }
                })
            })
            .await?;
        }
    }
    copy_stop.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(15), copying).await;
    relay.abort();
    Ok(())
}

/// `text` (the plan as written) with blue, green and `[cutover.pgbouncer]` pointing at the
/// throwaway servers.
fn point_plan(text: &str, s: &Servers) -> Result<String> {
    let mut doc: toml::Table =
        text.parse().map_err(|e: toml::de::Error| Error::Rehearsal(format!("the plan is not TOML: {e}")))?;
    let url = |c: &LocalCluster| {
        let mut t = toml::Table::new();
        t.insert("url".into(), toml::Value::String(c.url("app")));
        toml::Value::Table(t)
    };
    doc.insert("blue".into(), url(&s.blue));
    doc.insert("green".into(), url(&s.green));
    let cutover = doc.entry("cutover").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(c) = cutover {
        let mut pb = toml::Table::new();
        pb.insert("admin_url".into(), toml::Value::String(s.bouncer.admin_url()));
        pb.insert("database".into(), toml::Value::String("app".into()));
        pb.insert("databases_file".into(), toml::Value::String(s.bouncer.databases_file.display().to_string()));
        pb.insert(
            "green_dsn".into(),
            toml::Value::String(format!("host=127.0.0.1 port={} dbname=app user=postgres", s.green.port)),
        );
        c.insert("pgbouncer".into(), toml::Value::Table(pb));
        // Hooks run the user's commands against production; not in a rehearsal.
        c.remove("hook");
    }
    toml::to_string(&doc).map_err(|e| Error::Rehearsal(format!("rewriting the plan: {e}")))
}

/// The steps as JUnit XML: one test case per step.
fn junit(plan: &Path, steps: &[Step], total: f64) -> String {
    // XML 1.0 allows no control characters but tab and newlines (row values may hold them).
    let esc = |s: &str| {
        s.chars()
            .map(|c| if c.is_control() && !matches!(c, '\t' | '\n' | '\r') { '?' } else { c })
            .collect::<String>()
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
            .replace('\'', "&apos;")
    };
    let failures = steps.iter().filter(|s| !s.ok).count();
    let mut o = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let name = esc(&plan.display().to_string());
    let _ = writeln!(
        o,
        "<testsuites name=\"migrate rehearse\" tests=\"{}\" failures=\"{failures}\" time=\"{total:.3}\">",
        steps.len()
    );
    let _ = writeln!(
        o,
        "  <testsuite name=\"{name}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" time=\"{total:.3}\">",
        steps.len()
    );
    for s in steps {
        let _ = write!(o, "    <testcase classname=\"rehearse\" name=\"{}\" time=\"{:.3}\"", esc(&s.name), s.seconds);
        if s.ok {
            let _ = writeln!(o, ">\n      <system-out>{}</system-out>\n    </testcase>", esc(&s.detail));
        } else {
            let _ = writeln!(
                o,
                ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                esc(&s.detail),
                esc(&s.failures.join("\n"))
            );
        }
    }
    o.push_str("  </testsuite>\n</testsuites>\n");
    o
}

/// Roles a schema file (a `pg_dump`) names in `OWNER TO` and `GRANT … TO`, unquoted or quoted.
fn roles_named(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        let upper = line.to_ascii_uppercase();
        let at = match (upper.find(" OWNER TO "), upper.starts_with("GRANT ")) {
            (Some(i), _) => i + " OWNER TO ".len(),
            (None, true) => match upper.rfind(" TO ") {
                Some(i) => i + " TO ".len(),
                None => continue,
            },
            _ => continue,
        };
        for part in line[at..].trim_end_matches(';').split(',') {
            let p = part.trim().split(" WITH ").next().unwrap_or("").trim();
            let name = match p.strip_prefix('"').and_then(|q| q.strip_suffix('"')) {
                Some(q) => q.replace("\"\"", "\""),
                None => p.to_lowercase(),
            };
            let reserved = ["public", "current_user", "session_user", "current_role", ""];
            if !reserved.contains(&name.as_str()) && !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_escapes_markup_and_drops_control_characters() {
        let steps = vec![Step {
            name: "verify public.t".into(),
            ok: false,
            seconds: 0.5,
            detail: "1 difference(s)".into(),
            failures: vec!["public.t key (<a&b>) Differs v: blue \u{1b}[31m\"x\" green 'y'".into()],
        }];
        let xml = junit(Path::new("p.toml"), &steps, 1.0);
        assert!(xml.contains("failures=\"1\""), "{xml}");
        assert!(xml.contains("key (&lt;a&amp;b&gt;) Differs v: blue ?[31m&quot;x&quot; green &apos;y&apos;"), "{xml}");
        assert!(!xml.contains('\u{1b}'), "{xml}");
    }

    #[test]
    fn roles_a_dump_names() {
        let dump =
            "ALTER TABLE public.t OWNER TO app_owner;\nGRANT SELECT ON TABLE public.t TO \"Read Only\", reporting;\n\
                    GRANT ALL ON SCHEMA public TO PUBLIC;\nALTER SEQUENCE s OWNER TO app_owner;";
        assert_eq!(roles_named(dump), vec!["app_owner", "Read Only", "reporting"]);
        // Upper-cased by Unicode rules, `ſſ` is two bytes shorter: offsets taken from it would cut
        // the role name.
        assert_eq!(roles_named("ALTER TABLE public.\"ſſé\" OWNER TO owner_ſ;"), vec!["owner_ſ"]);
    }
}
