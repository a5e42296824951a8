//! A second host for the tests: a network namespace joined to this one by two veth links, one
//! to blue's server and one to green's. A `migrate` run in it has a network stack of its own and
//! reaches each server only over its link, which a test can cut: then nothing passes either way
//! (no FIN, no RST, no keepalive answer), as when a switch or a cable between two machines
//! fails. Needs root (`CAP_NET_ADMIN`); without it the test fails loudly.

use std::{
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex, OnceLock,
    },
};

use super::{Cluster, Custom, Frozen, TestDb};

/// The two links' networks: blue's server is at `10.213.N.1` and green's at `10.214.N.1`, the
/// host at `.2` on each.
const NETS: [(&str, &str); 2] = [("blue", "10.213"), ("green", "10.214")];

/// A network namespace with a veth link to this one per server. Removed when dropped, with any
/// process still in it.
pub struct Host {
    ns: String,
    /// This side's end of each link, as [`NETS`].
    outer: [String; 2],
    net: u32,
}

impl Host {
    /// Makes the namespace and its links (removing ones left by test processes that died).
    pub fn new() -> Host {
        static N: AtomicU32 = AtomicU32::new(0);
        // Two hosts made at once would find the same subnets free.
        static MAKING: Mutex<()> = Mutex::new(());
        let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
        forget_dead_hosts();
        let (pid, n) = (std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        // Subnets of its own: the first free ones from a start of this process's own.
        let net = (0..250)
            .map(|i| (pid * 8 + n + i) % 250 + 1)
            .find(|net| {
                NETS.iter().all(|(_, prefix)| {
                    let subnet = format!("{prefix}.{net}.0/24");
                    let out = Command::new("ip").args(["-o", "addr", "show", "to", &subnet]).output();
                    out.is_ok_and(|o| o.status.success() && o.stdout.is_empty())
                })
            })
            .expect("free 10.213.N.0/24 and 10.214.N.0/24 subnets");
        // Interface names have at most 15 bytes.
        let name = |kind: &str| format!("{kind}{pid}x{n}");
        let host = Host { ns: name("bgh"), outer: [name("bgb"), name("bgg")], net };
        // Left by an earlier process that had this pid.
        drop(Host { ns: host.ns.clone(), outer: host.outer.clone(), net });
        ip(&["netns", "add", &host.ns]);
        ip(&["netns", "exec", &host.ns, "ip", "link", "set", "lo", "up"]);
        for ((_, prefix), (outer, inner)) in NETS.iter().zip(host.outer.iter().zip([name("bib"), name("big")])) {
            ip(&["link", "add", outer, "type", "veth", "peer", "name", &inner]);
            ip(&["link", "set", &inner, "netns", &host.ns]);
            ip(&["addr", "add", &format!("{prefix}.{net}.1/24"), "dev", outer]);
            ip(&["link", "set", outer, "up"]);
            ip(&["netns", "exec", &host.ns, "ip", "addr", "add", &format!("{prefix}.{net}.2/24"), "dev", &inner]);
            ip(&["netns", "exec", &host.ns, "ip", "link", "set", &inner, "up"]);
        }
        host
    }

    /// A blue and a green database made by `blue_sql` and `green_sql` on clusters this host
    /// reaches.
    pub fn scenario(&self, blue_sql: &str, green_sql: &str) -> Custom {
        Custom::on(clusters(), blue_sql, green_sql)
    }

    /// `migrate ARGS` started in the background on this host against `c`'s databases (stdout
    /// discarded, warnings and errors on a captured stderr).
    pub fn spawn(&self, c: &Custom, args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(assert_cmd::cargo::cargo_bin("migrate"))
            .env("BLUE_URL", self.url(&c.blue, 0))
            .env("GREEN_URL", self.url(&c.green, 1))
            .env("MIGRATE_LOG", "warn")
            .envs(env.iter().copied())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd.spawn().expect("start migrate on a second host")
    }

    /// How many sessions `db`'s server has from this host that match `filter` (SQL on
    /// `pg_stat_activity`).
    pub fn sessions_in(&self, db: &TestDb, filter: &str) -> i64 {
        let addrs: Vec<String> = NETS.iter().map(|(_, prefix)| format!("'{prefix}.{}.2'", self.net)).collect();
        db.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE client_addr IN ({}) AND ({filter})",
            addrs.join(", ")
        ))
        .parse()
        .unwrap()
    }

    /// `db`'s URL as reached from this host over link `link` (an index into [`NETS`]).
    fn url(&self, db: &TestDb, link: usize) -> String {
        let url = db.url();
        assert!(url.contains("@127.0.0.1:"), "{url}");
        url.replace("@127.0.0.1:", &format!("@{}.{}.1:", NETS[link].1, self.net))
    }

    /// Cuts both links on the servers' side: this host's packets stop arriving, and theirs stop
    /// leaving. Connections stay open at both ends; new ones time out.
    pub fn cut(&self) {
        for outer in &self.outer {
            ip(&["link", "set", outer, "down"]);
        }
    }

    /// Cuts the link to blue's server alone: green still answers.
    pub fn cut_blue(&self) {
        ip(&["link", "set", &self.outer[0], "down"]);
    }

    /// Puts the links back.
    pub fn heal(&self) {
        for outer in &self.outer {
            ip(&["link", "set", outer, "up"]);
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // A failing test leaves no process behind in it (one cut off could wait for minutes).
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.ns]).stderr(Stdio::null()).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).stderr(Stdio::null()).status();
            }
        }
        // Deleting the namespace deletes its ends of the links, and with them the other ends.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).stderr(Stdio::null()).status();
        for outer in &self.outer {
            let _ = Command::new("ip").args(["link", "del", outer]).stderr(Stdio::null()).status();
        }
    }
}

/// How a lease test loses its joined worker: cut off on a second host (its links cut), or frozen
/// here (SIGSTOP).
pub struct Loss {
    host: Option<Host>,
    frozen: Option<Frozen>,
}

impl Loss {
    /// The worker runs on a second host, and is lost by cutting both its links.
    pub fn cut_off() -> Loss {
        Loss { host: Some(Host::new()), frozen: None }
    }

    /// The worker runs here, and is lost by freezing it.
    pub fn frozen() -> Loss {
        Loss { host: None, frozen: None }
    }

    /// Blue and green databases made by `blue_sql` and `green_sql`, which the worker reaches.
    pub fn scenario(&self, blue_sql: &str, green_sql: &str) -> Custom {
        match &self.host {
            Some(h) => h.scenario(blue_sql, green_sql),
            None => Custom::new(blue_sql, green_sql),
        }
    }

    /// Starts the worker: `migrate ARGS` in the background against `c`.
    pub fn spawn(&self, c: &Custom, args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
        match &self.host {
            Some(h) => h.spawn(c, args, env),
            None => c.spawn(args, env),
        }
    }

    /// Loses `worker`: cuts its links (after checking that at least `at_least` (blue, green) of
    /// the servers' sessions come from its host), or freezes it.
    pub fn lose(&mut self, c: &Custom, worker: &std::process::Child, at_least: (i64, i64)) {
        match &self.host {
            Some(h) => {
                let from = (h.sessions_in(&c.blue, "true"), h.sessions_in(&c.green, "true"));
                assert!(from.0 >= at_least.0 && from.1 >= at_least.1, "sessions from the second host: {from:?}");
                h.cut();
            }
            None => self.frozen = Some(Frozen::freeze(worker)),
        }
    }

    /// Waits for the lost `worker` (id `id`) to exit 3 naming its lease: a frozen one is woken
    /// (and learns of its lease then); a cut-off one stops by itself, saying it could not renew
    /// its lease, and its links are then put back. Its stderr.
    pub fn exit(&mut self, worker: &mut std::process::Child, id: &str) -> String {
        if let Some(f) = self.frozen.take() {
            f.thaw();
        }
        let (code, err) = super::exit_of(worker);
        assert_eq!(code, Some(3), "{err}");
        assert!(err.contains("worker_lease") && err.contains(id), "{err}");
        if let Some(h) = &self.host {
            assert!(err.contains("could not renew its lease"), "{err}");
            h.heal();
        }
        err
    }
}

/// A blue and a green cluster for the tests with second hosts: listening on every IPv4 address
/// (a host's links are made after they start) and admitting the hosts' networks.
fn clusters() -> (&'static Cluster, &'static Cluster) {
    static C: OnceLock<(Cluster, Cluster)> = OnceLock::new();
    let (blue, green) = C.get_or_init(|| {
        let start = |name: &str| {
            let c = Cluster::start(name, &["listen_addresses=0.0.0.0"]);
            let hba = c.dir.join("data").join("pg_hba.conf");
            let mut text = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
            for (_, prefix) in NETS {
                text.push_str(&format!("host all all {prefix}.0.0/16 trust\n"));
            }
            std::fs::write(&hba, text).expect("write pg_hba.conf");
            c.psql("postgres", "SELECT pg_reload_conf()");
            c
        };
        (start("blue-hosts"), start("green-hosts"))
    });
    (blue, green)
}

/// Runs `ip ARGS`, panicking with what it said.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("cannot run `ip` (iproute2): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed (a second host needs network namespaces: root, CAP_NET_ADMIN, veth): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes namespaces (and links) of test processes that are gone.
fn forget_dead_hosts() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(suffix) = name.strip_prefix("bgh") else { continue };
        let Some(pid) = suffix.split('x').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
            for kind in ["bgb", "bgg"] {
                let _ =
                    Command::new("ip").args(["link", "del", &format!("{kind}{suffix}")]).stderr(Stdio::null()).status();
            }
        }
    }
}
