//! A second host for the tests: a network namespace joined to this one by a veth pair. A
//! `migrate` run in it has a network stack of its own and reaches the servers only over that
//! link, which a test can cut: then nothing passes either way (no FIN, no RST, no keepalive
//! answer), as when a switch or a cable between two machines fails. Needs root
//! (`CAP_NET_ADMIN`); without it the test fails loudly.

use std::process::{Command, Stdio};

use super::{Cluster, TestDb};

/// A network namespace with a veth link to this one: the servers are at `10.213.N.1`, the host
/// at `10.213.N.2`. Removed when dropped.
pub struct Host {
    ns: String,
    outer: String,
    net: u32,
}

impl Host {
    /// Makes the namespace and its link (removing ones left by test processes that died).
    pub fn new() -> Host {
        forget_dead_hosts();
        let pid = std::process::id();
        let host = Host { ns: format!("bgh{pid}"), outer: format!("bgo{pid}"), net: pid % 250 + 1 };
        let inner = format!("bgi{pid}");
        let (outer_addr, inner_addr) = (format!("{}/24", host.server_addr()), format!("{}/24", host.addr()));
        ip(&["netns", "add", &host.ns]);
        ip(&["link", "add", &host.outer, "type", "veth", "peer", "name", &inner]);
        ip(&["link", "set", &inner, "netns", &host.ns]);
        ip(&["addr", "add", &outer_addr, "dev", &host.outer]);
        ip(&["link", "set", &host.outer, "up"]);
        ip(&["netns", "exec", &host.ns, "ip", "addr", "add", &inner_addr, "dev", &inner]);
        ip(&["netns", "exec", &host.ns, "ip", "link", "set", &inner, "up"]);
        ip(&["netns", "exec", &host.ns, "ip", "link", "set", "lo", "up"]);
        host
    }

    /// The servers' address as this host reaches them (give it to [`Cluster::own`]'s
    /// `listen_addresses`, then [`Host::admit`] the host).
    pub fn server_addr(&self) -> String {
        format!("10.213.{}.1", self.net)
    }

    /// This host's address, as the servers see it (`pg_stat_activity.client_addr`).
    pub fn addr(&self) -> String {
        format!("10.213.{}.2", self.net)
    }

    /// Lets this host's connections into `cluster` (a `pg_hba.conf` line, reloaded).
    pub fn admit(&self, cluster: &Cluster) {
        let hba = cluster.dir.join("data").join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        text.push_str(&format!("host all all 10.213.{}.0/24 trust\n", self.net));
        std::fs::write(&hba, text).expect("write pg_hba.conf");
        cluster.psql("postgres", "SELECT pg_reload_conf()");
    }

    /// `db`'s URL as reached from this host.
    pub fn url(&self, db: &TestDb) -> String {
        let url = db.url();
        assert!(url.contains("@127.0.0.1:"), "{url}");
        url.replace("@127.0.0.1:", &format!("@{}:", self.server_addr()))
    }

    /// `program` to be run on this host.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Cuts the link on the servers' side: this host's packets stop arriving, and theirs stop
    /// leaving. Connections stay open at both ends; new ones time out.
    pub fn cut(&self) {
        ip(&["link", "set", &self.outer, "down"]);
    }

    /// Puts the link back.
    pub fn heal(&self) {
        ip(&["link", "set", &self.outer, "up"]);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the link, and with it the other end.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).stderr(Stdio::null()).status();
        let _ = Command::new("ip").args(["link", "del", &self.outer]).stderr(Stdio::null()).status();
    }
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
        let Some(pid) = name.strip_prefix("bgh").and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
            let _ = Command::new("ip").args(["link", "del", &format!("bgo{pid}")]).stderr(Stdio::null()).status();
        }
    }
}
