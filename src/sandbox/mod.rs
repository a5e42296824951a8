//! Throwaway PostgreSQL clusters and PgBouncer instances started from the system binaries, in
//! temporary directories on free ports: what `migrate demo` runs on, and what the tests use.
//! initdb, postgres and pgbouncer refuse to run as root, so as root they run as `postgres`.

pub mod app;
pub mod rows;

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::error::{Error, Result};

fn fail(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::Sandbox { what: what.to_string(), detail: detail.to_string() }
}

/// Finds the PostgreSQL server binaries (pg_config --bindir, else the newest
/// /usr/lib/postgresql/*/bin).
pub fn bindir() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut v: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        v.sort();
        v.reverse();
        candidates.extend(v);
    }
    candidates.into_iter().find(|d| d.join("initdb").exists() && d.join("postgres").exists()).ok_or_else(|| {
        Error::NotInstalled {
            missing: "PostgreSQL server binaries (initdb, postgres, pg_ctl; looked in pg_config --bindir and \
                      /usr/lib/postgresql/*/bin)"
                .into(),
            packages: "postgresql-15".into(),
        }
    })
}

/// Finds the pgbouncer binary.
pub fn pgbouncer_bin() -> Result<PathBuf> {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| Error::NotInstalled { missing: "pgbouncer".into(), packages: "pgbouncer".into() })
}

/// Checks, before anything is started, that the server binaries, pgbouncer and (as root) the
/// `postgres` user are there; names everything missing at once with the command that installs it.
pub fn check_prerequisites() -> Result<()> {
    let mut missing = Vec::new();
    let mut packages = Vec::new();
    if bindir().is_err() {
        missing.push("PostgreSQL server binaries (initdb, postgres)");
        packages.push("postgresql-15");
    }
    if pgbouncer_bin().is_err() {
        missing.push("pgbouncer");
        packages.push("pgbouncer");
    }
    if is_root() && !Command::new("id").arg("postgres").output().is_ok_and(|o| o.status.success()) {
        missing.push("the `postgres` user (servers refuse to run as root)");
        packages.push("postgresql-common");
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::NotInstalled { missing: missing.join(", "), packages: packages.join(" ") })
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// A command for a server binary, run as the `postgres` user when we are root.
pub fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A free TCP port on 127.0.0.1, never the same twice in this process.
pub fn free_port() -> u16 {
    static USED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else { continue };
        let Ok(addr) = l.local_addr() else { continue };
        let mut used = USED.lock().unwrap_or_else(|e| e.into_inner());
        if !used.contains(&addr.port()) {
            used.push(addr.port());
            return addr.port();
        }
    }
}

/// A fresh temporary directory owned by the server user.
pub fn server_dir(prefix: &str) -> Result<PathBuf> {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "bluegreen-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| fail(&format!("creating {}", dir.display()), e))?;
    if is_root() {
        let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status().is_ok_and(|s| s.success());
        if !ok {
            return Err(fail(
                &format!("chown {} to postgres", dir.display()),
                "failed: does the postgres user exist? (apt-get install -y postgresql-15)",
            ));
        }
    }
    Ok(dir)
}

/// One running cluster. Dropping it does not stop it; call [`LocalCluster::stop`].
pub struct LocalCluster {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Server binaries directory.
    pub bindir: PathBuf,
    /// Working directory (data directory, socket, log).
    pub dir: PathBuf,
}

impl LocalCluster {
    /// initdb and start a cluster with `wal_level=logical`, `fsync=off` and `extra` settings.
    pub fn start(name: &str, extra: &[&str]) -> Result<LocalCluster> {
        let bindir = bindir()?;
        let dir = server_dir(name)?;
        let data = dir.join("data");
        let out = as_server_user(&bindir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            .output()
            .map_err(|e| fail("running initdb", e))?;
        if !out.status.success() {
            return Err(fail("initdb", String::from_utf8_lossy(&out.stderr)));
        }
        let port = free_port();
        let mut opts = format!(
            "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c wal_level=logical \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 \
             -c max_replication_slots=20 -c max_wal_senders=20 -c shared_buffers=256MB -c max_wal_size=4GB",
            dir.display()
        );
        for e in extra {
            opts.push_str(&format!(" -c {e}"));
        }
        let out = as_server_user(&bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-w", "-t", "60", "-o", &opts, "start"])
            .stdout(Stdio::null())
            .output()
            .map_err(|e| fail("running pg_ctl", e))?;
        if !out.status.success() {
            return Err(fail(
                "pg_ctl start",
                format!(
                    "{}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    std::fs::read_to_string(dir.join("log")).unwrap_or_default()
                ),
            ));
        }
        Ok(LocalCluster { port, bindir, dir })
    }

    /// The postmaster's pid file (for watchdogs).
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("data").join("postmaster.pid")
    }

    /// URL of a database on this cluster as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable", self.port)
    }

    /// A psql command for `db` (ON_ERROR_STOP, unaligned, tuples only).
    pub fn psql_cmd(&self, db: &str) -> Command {
        let mut c = Command::new(self.bindir.join("psql"));
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db);
        c
    }

    /// Runs SQL through psql and returns its output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let out = self.psql_cmd(db).args(["-c", sql]).output().map_err(|e| fail("running psql", e))?;
        if !out.status.success() {
            return Err(fail(&format!("psql on {db}"), String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs a SQL file through psql with `-v` variables.
    pub fn psql_file(&self, db: &str, file: &Path, vars: &[(&str, &str)]) -> Result<()> {
        let mut c = self.psql_cmd(db);
        for (k, v) in vars {
            c.arg("-v").arg(format!("{k}={v}"));
        }
        let out = c.arg("-f").arg(file).output().map_err(|e| fail("running psql", e))?;
        if !out.status.success() {
            return Err(fail(&format!("psql -f {}", file.display()), String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    }

    /// Restarts the cluster (fast shutdown: sessions are cut), with the same settings and port.
    pub fn restart(&self) -> Result<()> {
        let out = as_server_user(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-m", "fast", "-w", "-t", "60", "restart"])
            .stdout(Stdio::null())
            .output()
            .map_err(|e| fail("running pg_ctl", e))?;
        if !out.status.success() {
            return Err(fail("pg_ctl restart", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    }

    /// Stops the cluster (fast shutdown) and removes its directory.
    pub fn stop(&self) {
        let _ = as_server_user(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running PgBouncer serving one database, `app`, from an `%include`d databases file.
pub struct LocalBouncer {
    /// Listen port.
    pub port: u16,
    /// The `%include`d databases file.
    pub databases_file: PathBuf,
    /// Working directory.
    pub dir: PathBuf,
}

impl LocalBouncer {
    /// Starts PgBouncer with `pool_mode`, serving database `app` → `target_dsn`.
    pub fn start(pool_mode: &str, target_dsn: &str) -> Result<LocalBouncer> {
        let bin = pgbouncer_bin()?;
        let dir = server_dir("pgbouncer")?;
        let port = free_port();
        let databases_file = dir.join("databases.ini");
        let write = |p: &Path, text: String| std::fs::write(p, text).map_err(|e| fail(&p.display().to_string(), e));
        write(&databases_file, format!("[databases]\napp = {target_dsn}\n"))?;
        let ini = format!(
            "%include {db}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir = {d}\n\
             auth_type = any\nadmin_users = postgres\npool_mode = {pool_mode}\nignore_startup_parameters = extra_float_digits,options\n\
             logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\nmax_client_conn = 500\ndefault_pool_size = 20\n",
            db = databases_file.display(),
            d = dir.display()
        );
        let ini_path = dir.join("pgbouncer.ini");
        write(&ini_path, ini)?;
        if is_root() {
            let _ = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status();
        }
        let out = as_server_user(&bin).arg("-d").arg(&ini_path).output().map_err(|e| fail("running pgbouncer", e))?;
        if !out.status.success() {
            return Err(fail("pgbouncer failed to start", String::from_utf8_lossy(&out.stderr)));
        }
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(LocalBouncer { port, databases_file, dir });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(fail(
            &format!("pgbouncer did not listen on {port}"),
            std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default(),
        ))
    }

    /// The pid file (for watchdogs).
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("pgbouncer.pid")
    }

    /// Admin console URL.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/pgbouncer?sslmode=disable", self.port)
    }

    /// Stops PgBouncer and removes its directory.
    pub fn stop(&self) {
        if let Some(pid) = std::fs::read_to_string(self.pidfile()).ok().and_then(|p| p.trim().parse::<u32>().ok()) {
            let _ = Command::new("kill").args(["-INT", &pid.to_string()]).stderr(Stdio::null()).status();
            for _ in 0..50 {
                let alive = Command::new("kill").args(["-0", &pid.to_string()]).stderr(Stdio::null()).status();
                if !alive.is_ok_and(|s| s.success()) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
