//! Throwaway PostgreSQL clusters and PgBouncer instances for the tests, started from the system
//! binaries once per test binary. A watchdog process removes everything when the test process
//! ends, however it ends (panics and aborts included).

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

/// One running cluster.
pub struct Cluster {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Server binaries directory.
    pub bindir: PathBuf,
    /// Data directory (also the socket directory).
    #[allow(dead_code)]
    pub dir: PathBuf,
}

/// Finds the PostgreSQL server binaries, or panics with how to install them.
pub fn bindir() -> PathBuf {
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
    candidates.into_iter().find(|d| d.join("initdb").exists() && d.join("postgres").exists()).unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, postgres, pg_ctl) not found via pg_config --bindir or \
             /usr/lib/postgresql/*/bin. Install them: apt-get install -y postgresql-15"
        )
    })
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Runs a server binary, as the `postgres` user when we are root (initdb, postgres and pgbouncer
/// refuse to run as root).
pub fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    // Ports from the kernel's ephemeral range; bind and release. Two clusters asking at once get
    // different ports because the listener is held until the port is recorded.
    static USED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let p = l.local_addr().unwrap().port();
        let mut used = USED.lock().unwrap();
        if !used.contains(&p) {
            used.push(p);
            return p;
        }
    }
}

/// A fresh temporary directory owned by the server user.
pub fn server_dir(prefix: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "bluegreen-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status().unwrap().success();
        assert!(
            ok,
            "chown {} to postgres failed: does the postgres user exist? (apt-get install -y postgresql-15)",
            dir.display()
        );
    }
    dir
}

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

impl Cluster {
    /// initdb + start a cluster with `wal_level` (normally `logical`) and `fsync=off`.
    pub fn start(name: &str, wal_level: &str, extra: &[&str]) -> Cluster {
        let bindir = bindir();
        let dir = server_dir(name);
        let data = dir.join("data");
        let out = as_server_user(&bindir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let mut opts = format!(
            "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c wal_level={wal_level} \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 \
             -c max_replication_slots=20 -c max_wal_senders=20 -c shared_buffers=256MB -c max_wal_size=4GB",
            dir.display()
        );
        for e in extra {
            opts.push_str(&format!(" -c {e}"));
        }
        watchdog(&data.join("postmaster.pid"), &dir);
        let out = as_server_user(&bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-w", "-t", "60", "-o", &opts, "start"])
            .stdout(Stdio::null())
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        Cluster { port, bindir, dir }
    }

    /// URL of a database on this cluster as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable", self.port)
    }

    /// Runs SQL through psql (ON_ERROR_STOP), panicking with psql's output on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self.psql_cmd(db).args(["-c", sql]).output().expect("run psql");
        assert!(out.status.success(), "psql failed on {db}: {}\nSQL: {sql}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs a SQL file through psql with `-v` variables.
    pub fn psql_file(&self, db: &str, file: &Path, vars: &[(&str, &str)]) {
        let mut c = self.psql_cmd(db);
        for (k, v) in vars {
            c.arg("-v").arg(format!("{k}={v}"));
        }
        let out = c.arg("-f").arg(file).output().expect("run psql");
        assert!(out.status.success(), "psql -f {} failed: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    }

    fn psql_cmd(&self, db: &str) -> Command {
        let mut c = Command::new(self.bindir.join("psql"));
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db);
        c
    }
}

/// A running PgBouncer in front of `clusters`.
pub struct Bouncer {
    /// Listen port.
    pub port: u16,
    /// The `%include`d databases file.
    pub databases_file: PathBuf,
    /// Working directory.
    #[allow(dead_code)]
    pub dir: PathBuf,
}

impl Bouncer {
    /// Starts PgBouncer with `pool_mode`, serving database `app` → `target_dsn`.
    pub fn start(pool_mode: &str, target_dsn: &str) -> Bouncer {
        let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("pgbouncer not found; install it: apt-get install -y pgbouncer"));
        let dir = server_dir("pgbouncer");
        let port = free_port();
        let databases_file = dir.join("databases.ini");
        std::fs::write(&databases_file, format!("[databases]\napp = {target_dsn}\n")).unwrap();
        let ini = format!(
            "%include {db}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir = {d}\n\
             auth_type = any\nadmin_users = postgres\npool_mode = {pool_mode}\nignore_startup_parameters = extra_float_digits,options\n\
             logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\nmax_client_conn = 500\ndefault_pool_size = 20\n",
            db = databases_file.display(),
            d = dir.display()
        );
        let ini_path = dir.join("pgbouncer.ini");
        std::fs::write(&ini_path, ini).unwrap();
        Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status().ok();
        watchdog(&dir.join("pgbouncer.pid"), &dir);
        let out = as_server_user(&bin).arg("-d").arg(&ini_path).output().expect("run pgbouncer");
        assert!(out.status.success(), "pgbouncer failed to start: {}", String::from_utf8_lossy(&out.stderr));
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Bouncer { port, databases_file, dir };
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "pgbouncer did not listen on {port}: {}",
            std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
        );
    }

    /// Admin console URL.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/pgbouncer?sslmode=disable", self.port)
    }
}
