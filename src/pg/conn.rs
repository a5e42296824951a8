//! Connections to blue and green: parsing URLs and key=value DSNs, TLS modes, connect timeouts,
//! pinned session settings, and a `Display` that never shows a password.

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::{config::SslMode as PgSslMode, Client, Config, NoTls};
use tracing::warn;

pub use crate::error::{ConnError, Side};

/// How long a TCP connect plus startup may take before the side counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// libpq's `sslmode`, including the two verifying modes tokio-postgres does not parse itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, without verifying the certificate (libpq's default).
    Prefer,
    /// TLS required, certificate not verified.
    Require,
    /// TLS required, certificate chain verified against `sslrootcert`.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" | "allow" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(format!("unknown sslmode `{other}`")),
        })
    }
}

/// A parsed connection string for one side. `Display` shows it with the password left out.
#[derive(Clone)]
pub struct ConnInfo {
    /// Which side this connects to.
    pub side: Side,
    config: Config,
    ssl_mode: SslMode,
    /// `sslmode` was in the string (libpq's `PGSSLMODE` applies only when it was not).
    ssl_mode_given: bool,
    ssl_root_cert: Option<PathBuf>,
    /// Client certificate and its key (`sslcert`, `sslkey`), for servers that ask for one.
    ssl_cert: Option<PathBuf>,
    ssl_key: Option<PathBuf>,
    /// `service=`: settings from a connection service file fill what the string leaves out.
    service: Option<String>,
    /// `tcp_user_timeout` was in the string (0 included: the system's default).
    tcp_user_timeout_given: bool,
}

/// The parameters libpq takes that tokio-postgres does not, or reads otherwise.
#[derive(Default)]
struct SslParams {
    mode: Option<SslMode>,
    root: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    service: Option<String>,
    /// `tcp_user_timeout`: milliseconds to libpq, seconds to tokio-postgres.
    tcp_user_timeout_ms: Option<u64>,
    /// `keepalives_idle` (seconds), which our own default would otherwise replace.
    keepalives_idle_s: Option<u64>,
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnInfo({self})")
    }
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use tokio_postgres::config::Host;
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let user = self.config.get_user().unwrap_or("");
        let db = self.config.get_dbname().unwrap_or("");
        let at = if user.is_empty() { String::new() } else { format!("{user}@") };
        write!(f, "postgres://{at}{host}:{port}/{db}")
    }
}

impl ConnInfo {
    /// Parses a `postgres://` URL or a `key=value` DSN. `sslmode`, `sslrootcert`, `sslcert` and
    /// `sslkey` are taken out and handled here because tokio-postgres knows only
    /// disable/prefer/require and no certificate files.
    pub fn parse(side: Side, text: &str) -> Result<Self, ConnError> {
        let invalid = |reason: String| ConnError::Invalid { side, reason };
        let (rest, ssl) = take_ssl_params(text).map_err(invalid)?;
        // The driver's parse errors may quote the offending value, which could be a password;
        // keep only the kind of failure.
        let mut config = Config::from_str(&rest).map_err(|e| {
            let msg = e.to_string();
            let reason = if msg.contains("password") { "malformed password".to_string() } else { msg };
            invalid(reason)
        })?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.keepalives(true);
        // A peer lost without a word (a host cut off) is noticed after this much silence plus
        // the probes; the string's own value, if any, as libpq takes it (0: our default).
        config.keepalives_idle(Duration::from_secs(ssl.keepalives_idle_s.filter(|s| *s > 0).unwrap_or(30)));
        match ssl.tcp_user_timeout_ms {
            // Written in seconds, as the driver alone read it: a retransmission would end it.
            Some(ms @ 1..1000) => {
                return Err(invalid(format!(
                    "tcp_user_timeout is in milliseconds, as libpq reads it: {ms} ms would not outlast one \
                     retransmission (for {ms} s write {ms}000)"
                )))
            }
            Some(ms) if ms > 0 => {
                config.tcp_user_timeout(Duration::from_millis(ms));
            }
            _ => {}
        }
        if config.get_application_name().is_none() {
            config.application_name("migrate");
        }
        Ok(Self {
            side,
            config,
            ssl_mode_given: ssl.mode.is_some(),
            ssl_mode: ssl.mode.unwrap_or(SslMode::Prefer),
            ssl_root_cert: ssl.root,
            ssl_cert: ssl.cert,
            ssl_key: ssl.key,
            service: ssl.service,
            tcp_user_timeout_given: ssl.tcp_user_timeout_ms.is_some(),
        })
    }

    /// Fills in what the string leaves out the way libpq (and so `psql`) does: `PGHOST`,
    /// `PGPORT`, `PGUSER` (else the login name), `PGDATABASE`, `PGSSLMODE`, `PGSSLROOTCERT`,
    /// and the password from `PGPASSWORD` or the password file (`PGPASSFILE`, else
    /// `~/.pgpass`). A bad `PGPORT` or `PGSSLMODE` is named; the password never is.
    pub fn with_libpq_defaults(mut self, env: super::libpq::Env<'_>) -> Result<Self, ConnError> {
        let side = self.side;
        let invalid = |reason: String| ConnError::Invalid { side, reason };
        // A service's settings come next after the string's own, before the environment's.
        if let Some(name) = self.service.clone().or_else(|| env("PGSERVICE").filter(|s| !s.is_empty())) {
            let section = super::libpq::service(env, &name).map_err(invalid)?;
            self.apply_service(&section).map_err(|e| invalid(format!("service `{name}`: {e}")))?;
        }
        if self.config.get_hosts().is_empty() {
            if let Some(h) = env("PGHOST").filter(|h| !h.is_empty()) {
                if h.starts_with('/') {
                    self.config.host_path(&h);
                } else {
                    self.config.host(&h);
                }
            }
        }
        if self.config.get_ports().is_empty() {
            if let Some(p) = env("PGPORT").filter(|p| !p.is_empty()) {
                let port = p.parse::<u16>().map_err(|_| invalid(format!("PGPORT `{p}` is not a port number")))?;
                self.config.port(port);
            }
        }
        if self.config.get_user().is_none() {
            if let Some(u) = env("PGUSER").or_else(|| env("USER")).filter(|u| !u.is_empty()) {
                self.config.user(&u);
            }
        }
        if self.config.get_dbname().is_none() {
            if let Some(d) = env("PGDATABASE").filter(|d| !d.is_empty()) {
                self.config.dbname(&d);
            }
        }
        if !self.ssl_mode_given {
            if let Some(m) = env("PGSSLMODE").filter(|m| !m.is_empty()) {
                self.ssl_mode = m.parse().map_err(|e: String| invalid(format!("PGSSLMODE: {e}")))?;
            }
        }
        if self.ssl_root_cert.is_none() {
            self.ssl_root_cert = env("PGSSLROOTCERT").filter(|c| !c.is_empty()).map(PathBuf::from);
        }
        // A client certificate as libpq finds one: the string, PGSSLCERT/PGSSLKEY, else
        // ~/.postgresql/postgresql.crt and .key when they exist.
        let home = env("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".postgresql"));
        if self.ssl_cert.is_none() {
            self.ssl_cert = env("PGSSLCERT")
                .filter(|c| !c.is_empty())
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join("postgresql.crt")).filter(|p| p.exists()));
        }
        if self.ssl_key.is_none() {
            self.ssl_key = env("PGSSLKEY")
                .filter(|c| !c.is_empty())
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join("postgresql.key")).filter(|p| p.exists()));
        }
        if self.config.get_password().is_none() {
            let password = env("PGPASSWORD").or_else(|| {
                let text = super::libpq::read_passfile(&super::libpq::passfile(env)?)?;
                use tokio_postgres::config::Host;
                let host = match self.config.get_hosts().first() {
                    Some(Host::Tcp(h)) => h.clone(),
                    Some(Host::Unix(p)) => p.display().to_string(),
                    None => "localhost".into(),
                };
                let port = self.config.get_ports().first().copied().unwrap_or(5432);
                let user = self.config.get_user()?.to_string();
                let db = self.config.get_dbname().map(str::to_string).unwrap_or_else(|| user.clone());
                super::libpq::password_for(&text, &host, port, &db, &user)
            });
            if let Some(p) = password {
                self.config.password(p);
            }
        }
        Ok(self)
    }

    /// Fills what the string leaves out from a service file's section.
    fn apply_service(&mut self, section: &[(String, String)]) -> Result<(), String> {
        for (k, v) in section {
            match k.as_str() {
                "host" if self.config.get_hosts().is_empty() => {
                    if v.starts_with('/') {
                        self.config.host_path(v);
                    } else {
                        self.config.host(v);
                    }
                }
                "port" if self.config.get_ports().is_empty() => {
                    self.config.port(v.parse::<u16>().map_err(|_| format!("port `{v}` is not a port number"))?);
                }
                "dbname" if self.config.get_dbname().is_none() => {
                    self.config.dbname(v);
                }
                "user" if self.config.get_user().is_none() => {
                    self.config.user(v);
                }
                "password" if self.config.get_password().is_none() => {
                    self.config.password(v);
                }
                "application_name" if self.config.get_application_name() == Some("migrate") => {
                    self.config.application_name(v);
                }
                "sslmode" if !self.ssl_mode_given => {
                    self.ssl_mode = v.parse()?;
                    self.ssl_mode_given = true;
                }
                "sslrootcert" if self.ssl_root_cert.is_none() => self.ssl_root_cert = Some(PathBuf::from(v)),
                "sslcert" if self.ssl_cert.is_none() => self.ssl_cert = Some(PathBuf::from(v)),
                "sslkey" if self.ssl_key.is_none() => self.ssl_key = Some(PathBuf::from(v)),
                "host" | "port" | "dbname" | "user" | "password" | "application_name" | "sslmode" | "sslrootcert"
                | "sslcert" | "sslkey" => {}
                // The string's own keys win; a key tokio-postgres does not know is named.
                other => return Err(format!("`{other}` is not supported in a service here")),
            }
        }
        Ok(())
    }

    /// Sets `application_name` (we use `migrate/<plan>` so DBAs can see who is connected).
    pub fn with_application_name(mut self, name: &str) -> Self {
        self.config.application_name(name);
        self
    }

    /// Takes the user and password of `other` where this string names none: PgBouncer entries
    /// usually leave them to the connecting client.
    pub fn with_credentials_of(mut self, other: &ConnInfo) -> Self {
        if self.config.get_user().is_none() {
            if let Some(u) = other.config.get_user() {
                self.config.user(u);
            }
        }
        if self.config.get_password().is_none() {
            if let Some(p) = other.config.get_password() {
                self.config.password(p);
            }
        }
        self
    }

    /// The database name, for messages and for PgBouncer entries.
    pub fn dbname(&self) -> Option<&str> {
        self.config.get_dbname()
    }

    /// The `sslmode` in force.
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// Gives data sent on these connections `limit` to be acknowledged by the server's host
    /// before the connection is dropped (`tcp_user_timeout`), and probes an idle one every
    /// tenth of it (keepalives, after the first 30 s), unless the string set them: a server
    /// lost without a word is then noticed in about `limit` (plus 30 s when idle), not in TCP's
    /// 12–15 minutes. A live server's host acknowledges and answers however busy its backend.
    pub fn bound_unacknowledged(&mut self, limit: Duration) {
        if !self.tcp_user_timeout_given {
            self.config.tcp_user_timeout(limit);
        }
        if self.config.get_keepalives_interval().is_none() {
            self.config.keepalives_interval((limit / 10).max(Duration::from_secs(1)));
        }
    }

    /// The driver config, for callers that need to hand it on (e.g. to a replication client).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Opens a connection with pinned session settings. The connection is driven by a spawned
    /// task that logs when it dies; the returned client errors from then on.
    pub async fn connect(&self) -> Result<Client, ConnError> {
        let client = self.connect_raw().await?;
        client.batch_execute(SESSION_SETTINGS).await.map_err(|source| ConnError::Connect {
            side: self.side,
            target: self.to_string(),
            source,
        })?;
        Ok(client)
    }

    /// Opens a connection without session settings, for PgBouncer's admin console, which
    /// accepts only its own SHOW/PAUSE/RESUME commands.
    pub async fn connect_raw(&self) -> Result<Client, ConnError> {
        let side = self.side;
        let target = self.to_string();
        // connect_timeout covers each TCP attempt; this bounds TLS and authentication too.
        let waited = CONNECT_TIMEOUT + Duration::from_secs(3);
        let fut = async {
            match self.ssl_mode {
                SslMode::Disable => {
                    let mut cfg = self.config.clone();
                    cfg.ssl_mode(PgSslMode::Disable);
                    let (client, conn) = cfg.connect(NoTls).await?;
                    spawn_driver(side, conn);
                    Ok(client)
                }
                mode => {
                    let tls = self.tls_connector().map_err(ConnectFailure::Tls)?;
                    let mut cfg = self.config.clone();
                    cfg.ssl_mode(if mode == SslMode::Prefer { PgSslMode::Prefer } else { PgSslMode::Require });
                    let (client, conn) = cfg.connect(tls).await?;
                    spawn_driver(side, conn);
                    Ok(client)
                }
            }
        };
        match tokio::time::timeout(waited, fut).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(ConnectFailure::Pg(source))) => Err(ConnError::Connect { side, target, source }),
            Ok(Err(ConnectFailure::Tls(reason))) => Err(ConnError::Tls { side, reason }),
            Err(_) => Err(ConnError::Timeout { side, target, waited }),
        }
    }

    /// Asks the server to cancel what the session of `token` runs (PostgreSQL's cancel request,
    /// on a connection of its own, with this string's TLS), within a connect's time. Best
    /// effort: `false` when the request could not be sent.
    pub async fn cancel(&self, token: &tokio_postgres::CancelToken) -> bool {
        let sent = async {
            match self.ssl_mode {
                SslMode::Disable => token.cancel_query(NoTls).await.is_ok(),
                _ => match self.tls_connector() {
                    Ok(tls) => token.cancel_query(tls).await.is_ok(),
                    Err(_) => false,
                },
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(3), sent).await.unwrap_or(false)
    }

    /// Gives up sessions `old` of this string's server: cancels what each still runs there (in
    /// the background, see [`ConnInfo::cancel_later`]) and closes it. A round given up as
    /// stalled may have left a statement running, and closing alone does not end it: a commit
    /// waiting for a synchronous standby that is gone waits on (PostgreSQL notices the client
    /// gone only when the wait ends), and one more would be left at each stall.
    pub fn abandon(&self, old: impl IntoIterator<Item = Client>) {
        for c in old {
            self.cancel_later(c.cancel_token());
        }
    }

    /// Sends a cancel for the session of `token` in the background; the process waits for it
    /// before it exits ([`cancels_sent`]). Needs the runtime.
    pub fn cancel_later(&self, token: tokio_postgres::CancelToken) {
        let info = self.clone();
        let sending = tokio::spawn(async move {
            info.cancel(&token).await;
        });
        if let Ok(mut pending) = CANCELS.lock() {
            pending.retain(|s| !s.is_finished());
            pending.push(sending);
        }
    }

    /// The TLS connector for this string's `sslmode` and `sslrootcert`.
    pub(super) fn tls_connector(&self) -> Result<MakeTlsConnector, String> {
        let tls_err = |e: openssl::error::ErrorStack| e.to_string();
        let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(tls_err)?;
        match self.ssl_mode {
            SslMode::VerifyCa | SslMode::VerifyFull => {
                builder.set_verify(SslVerifyMode::PEER);
                match &self.ssl_root_cert {
                    Some(path) => {
                        builder.set_ca_file(path).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?
                    }
                    None => builder.set_default_verify_paths().map_err(tls_err)?,
                }
            }
            _ => builder.set_verify(SslVerifyMode::NONE),
        }
        if let Some(cert) = &self.ssl_cert {
            builder.set_certificate_chain_file(cert).map_err(|e| format!("sslcert {}: {e}", cert.display()))?;
            let key = self.ssl_key.clone().unwrap_or_else(|| cert.with_extension("key"));
            builder
                .set_private_key_file(&key, openssl::ssl::SslFiletype::PEM)
                .map_err(|e| format!("sslkey {}: {e}", key.display()))?;
        }
        let mut connector = MakeTlsConnector::new(builder.build());
        let verify_host = self.ssl_mode == SslMode::VerifyFull;
        connector.set_callback(move |config, _domain| {
            config.set_verify_hostname(verify_host);
            Ok(())
        });
        Ok(connector)
    }
}

enum ConnectFailure {
    Pg(tokio_postgres::Error),
    Tls(String),
}

impl From<tokio_postgres::Error> for ConnectFailure {
    fn from(e: tokio_postgres::Error) -> Self {
        ConnectFailure::Pg(e)
    }
}

/// Cancel requests on their way ([`ConnInfo::cancel_later`]).
static CANCELS: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>> = std::sync::Mutex::new(Vec::new());

/// Waits up to `wait` for the cancel requests still on their way: a command that returns right
/// after giving up a session (its timer dropped on the way out) would otherwise exit before
/// the request leaves, and the statement would wait on.
pub async fn cancels_sent(wait: Duration) {
    let pending = CANCELS.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default();
    let _ = tokio::time::timeout(wait, async {
        for sending in pending {
            let _ = sending.await;
        }
    })
    .await;
}

/// Session settings pinned on every blue and green session, so that the same value renders as
/// the same text on both sides (verify hashes text) and timestamps without zone are read as UTC.
pub const SESSION_SETTINGS: &str = "SET TimeZone = 'UTC'; \
     SET DateStyle = 'ISO, MDY'; \
     SET IntervalStyle = 'postgres'; \
     SET extra_float_digits = 3; \
     SET bytea_output = 'hex'; \
     SET standard_conforming_strings = on; \
     SET client_min_messages = warning";

fn spawn_driver<S, T>(side: Side, conn: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            warn!(side = %side, error = %error, "database connection lost");
        }
    });
}

/// Removes `sslmode`, `sslrootcert`, `sslcert` and `sslkey` from a URL query or a key=value DSN.
fn take_ssl_params(text: &str) -> Result<(String, SslParams), String> {
    let mut p = SslParams::default();
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => p.mode = Some(value.parse::<SslMode>()?),
            "sslrootcert" => p.root = Some(PathBuf::from(value)),
            "sslcert" => p.cert = Some(PathBuf::from(value)),
            "sslkey" => p.key = Some(PathBuf::from(value)),
            "service" => p.service = Some(value.to_string()),
            "tcp_user_timeout" => p.tcp_user_timeout_ms = Some(whole(key, value, "milliseconds")?),
            "keepalives_idle" => p.keepalives_idle_s = Some(whole(key, value, "seconds")?),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let text = text.trim();
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        let Some((base, query)) = text.split_once('?') else {
            return Ok((text.to_string(), SslParams::default()));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(k, &percent_decode(v))? {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
        Ok((rest, p))
    } else {
        let mut kept = Vec::new();
        for token in split_kv(text)? {
            let (k, v) = token.split_once('=').ok_or_else(|| "expected key=value".to_string())?;
            if !take(k.trim(), v.trim().trim_matches('\''))? {
                kept.push(token);
            }
        }
        Ok((kept.join(" "), p))
    }
}

/// A whole number of `unit` for connection parameter `key`.
fn whole(key: &str, value: &str, unit: &str) -> Result<u64, String> {
    value.trim().parse::<u64>().map_err(|_| format!("{key}: expected a whole number of {unit}, got `{value}`"))
}

/// Splits a key=value DSN on spaces outside single quotes.
fn split_kv(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '\'' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    // `key = value` with spaces around `=` is legal in libpq; glue such tokens back together.
    let mut glued: Vec<String> = Vec::new();
    for t in out {
        match glued.last_mut() {
            Some(last) if last.ends_with('=') || t.starts_with('=') => last.push_str(&t),
            _ => glued.push(t),
        }
    }
    Ok(glued)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_redacts_password() {
        let c = ConnInfo::parse(Side::Blue, "postgres://app:s3cret@db.example:6543/app?sslmode=require").unwrap();
        let shown = c.to_string();
        assert_eq!(shown, "postgres://app@db.example:6543/app");
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(c.ssl_mode, SslMode::Require);
    }

    #[test]
    fn kv_dsn_with_verify_full() {
        let c = ConnInfo::parse(
            Side::Green,
            "host=green.db port=5433 dbname=app password='p w' sslmode=verify-full sslrootcert=/tmp/ca.pem",
        )
        .unwrap();
        assert_eq!(c.ssl_mode, SslMode::VerifyFull);
        assert_eq!(c.ssl_root_cert.as_deref(), Some(std::path::Path::new("/tmp/ca.pem")));
        assert_eq!(c.to_string(), "postgres://green.db:5433/app");
    }

    #[test]
    fn bad_sslmode_is_named_without_password() {
        let err = ConnInfo::parse(Side::Blue, "postgres://u:hunter2@h/d?sslmode=maybe").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("blue") && msg.contains("sslmode"), "{msg}");
        assert!(!msg.contains("hunter2"));
    }

    #[test]
    fn tcp_settings_are_read_as_libpq_reads_them() {
        let url = "postgres://u@h/d?tcp_user_timeout=2500&keepalives_idle=7&keepalives_interval=2&keepalives_retries=3";
        let dsn = "host=h dbname=d tcp_user_timeout=2500 keepalives_idle=7 keepalives_interval=2 keepalives_retries=3";
        for text in [url, dsn] {
            let c = ConnInfo::parse(Side::Blue, text).unwrap();
            assert_eq!(c.config.get_tcp_user_timeout(), Some(&Duration::from_millis(2500)), "{text}");
            assert_eq!(c.config.get_keepalives_idle(), Duration::from_secs(7), "{text}");
            assert_eq!(c.config.get_keepalives_interval(), Some(Duration::from_secs(2)), "{text}");
            assert_eq!(c.config.get_keepalives_retries(), Some(3), "{text}");
        }
        let c = ConnInfo::parse(Side::Blue, "postgres://u@h/d").unwrap();
        assert_eq!((c.config.get_tcp_user_timeout(), c.config.get_keepalives_idle()), (None, Duration::from_secs(30)));
        let err = ConnInfo::parse(Side::Blue, "postgres://u@h/d?tcp_user_timeout=3s").unwrap_err().to_string();
        assert!(err.contains("tcp_user_timeout") && err.contains("milliseconds"), "{err}");
        let err = ConnInfo::parse(Side::Blue, "postgres://u@h/d?tcp_user_timeout=30").unwrap_err().to_string();
        assert!(err.contains("30000"), "{err}");
        // A bound for joined workers fills in only what the string left out (0: the system's).
        let mut c = ConnInfo::parse(Side::Blue, "postgres://u@h/d?tcp_user_timeout=0").unwrap();
        c.bound_unacknowledged(Duration::from_secs(60));
        assert_eq!(
            (c.config.get_tcp_user_timeout(), c.config.get_keepalives_interval()),
            (None, Some(Duration::from_secs(6)))
        );
        let mut c = ConnInfo::parse(Side::Blue, "postgres://u@h/d").unwrap();
        c.bound_unacknowledged(Duration::from_secs(60));
        assert_eq!(c.config.get_tcp_user_timeout(), Some(&Duration::from_secs(60)));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("%2Ftmp%2Fca.pem"), "/tmp/ca.pem");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
