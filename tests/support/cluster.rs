//! Throwaway PostgreSQL clusters and PgBouncer instances for the tests: the library's sandbox,
//! plus a watchdog process that removes everything when the test process ends, however it ends
//! (panics and aborts included). A test that cannot get what it needs fails loudly here.

use std::{
    ops::Deref,
    path::Path,
    process::{Command, Stdio},
};

use bluegreen::sandbox::{LocalBouncer, LocalCluster};

/// Starts a watchdog that kills `pidfile`'s process and removes `dir` once this test process is
/// gone.
pub fn watchdog(pidfile: &Path, dir: &Path) {
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; \
         pid=$(head -n 1 '{pf}' 2>/dev/null); [ -n \"$pid\" ] && kill -QUIT $pid 2>/dev/null; \
         sleep 1; [ -n \"$pid\" ] && kill -KILL $pid 2>/dev/null; rm -rf '{dir}'",
        me = std::process::id(),
        pf = pidfile.display(),
        dir = dir.display()
    );
    // Deliberately detached: it must outlive this process to clean up after it.
    #[allow(clippy::zombie_processes)]
    let _watchdog = Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the cluster watchdog");
}

/// One running cluster, removed when the test process ends.
pub struct Cluster(LocalCluster);

impl Deref for Cluster {
    type Target = LocalCluster;
    fn deref(&self) -> &LocalCluster {
        &self.0
    }
}

impl Cluster {
    /// A cluster of one test's own, alive until the test binary ends (tests hold `&'static`
    /// clusters, as the shared ones are).
    pub fn own(name: &str, extra: &[&str]) -> &'static Cluster {
        Box::leak(Box::new(Cluster::start(name, extra)))
    }

    /// initdb + start a cluster (`wal_level=logical`, `fsync=off`) with `extra` settings.
    pub fn start(name: &str, extra: &[&str]) -> Cluster {
        let c = LocalCluster::start(name, extra).unwrap_or_else(|e| panic!("cannot start cluster {name}: {e}"));
        watchdog(&c.pidfile(), &c.dir);
        Cluster(c)
    }

    /// Runs SQL through psql, panicking with psql's output on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.0.psql(db, sql).unwrap_or_else(|e| panic!("{e}\nSQL: {sql}"))
    }

    /// Makes every commit that writes WAL wait for a synchronous standby that never comes
    /// (`synchronous_standby_names = 'nobody'`), or, with `false`, stop waiting.
    pub fn stall_commits(&self, stalled: bool) {
        // (ALTER SYSTEM may not run in the one transaction a multi-statement string is.)
        match stalled {
            true => self.psql("postgres", "ALTER SYSTEM SET synchronous_standby_names = 'nobody'"),
            false => self.psql("postgres", "ALTER SYSTEM RESET synchronous_standby_names"),
        };
        self.psql("postgres", "SELECT pg_reload_conf()");
    }

    /// Runs a SQL file through psql with `-v` variables.
    pub fn psql_file(&self, db: &str, file: &Path, vars: &[(&str, &str)]) {
        self.0.psql_file(db, file, vars).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A running PgBouncer, removed when the test process ends.
pub struct Bouncer(LocalBouncer);

impl Deref for Bouncer {
    type Target = LocalBouncer;
    fn deref(&self) -> &LocalBouncer {
        &self.0
    }
}

impl Bouncer {
    /// Starts PgBouncer with `pool_mode`, serving database `app` → `target_dsn`.
    pub fn start(pool_mode: &str, target_dsn: &str) -> Bouncer {
        let b = LocalBouncer::start(pool_mode, target_dsn).unwrap_or_else(|e| panic!("{e}"));
        watchdog(&b.pidfile(), &b.dir);
        Bouncer(b)
    }
}
