//! PgBouncer's admin console: PAUSE with a deadline, RESUME that always gets through, RELOAD.
//! The console speaks only the simple query protocol.

use std::time::Duration;

use tokio_postgres::Client;

use crate::{
    error::{pg_message, Error, Result},
    pg::ConnInfo,
    shutdown::Shutdown,
};

/// How PAUSE ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paused {
    /// Every server connection of the database is idle; clients queue.
    Yes,
    /// A server connection stayed busy (a long transaction) past the deadline.
    TimedOut,
    /// SIGINT/SIGTERM arrived while waiting.
    Interrupted,
}

/// A session on the admin console.
pub struct Bouncer {
    info: ConnInfo,
    database: String,
    admin: Client,
}

impl Bouncer {
    /// Connects to the admin console at `admin`, to act on PgBouncer database `database`.
    pub async fn connect(admin: &ConnInfo, database: &str) -> Result<Self> {
        Ok(Self { info: admin.clone(), database: database.to_string(), admin: admin.connect_raw().await? })
    }

    /// The database name as an admin-console argument. Preflight only lets plain names through.
    fn db(&self) -> &str {
        &self.database
    }

    /// The PgBouncer database this acts on.
    pub fn database(&self) -> &str {
        &self.database
    }

    async fn command(&self, sql: &str) -> Result<()> {
        self.admin.simple_query(sql).await.map(|_| ()).map_err(|e| Error::Pgbouncer {
            command: sql.to_string(),
            message: pg_message(&e),
            by_hand: false,
        })
    }

    /// `PAUSE db`, waiting at most `timeout`. On timeout or interruption the console session is
    /// stuck waiting for PAUSE, so it is replaced; the caller then sends RESUME.
    pub async fn pause(&mut self, timeout: Duration, shutdown: &Shutdown) -> Result<Paused> {
        let sql = format!("PAUSE {}", self.db());
        let outcome = tokio::select! {
            r = tokio::time::timeout(timeout, self.admin.simple_query(&sql)) => match r {
                Ok(Ok(_)) => return Ok(Paused::Yes),
                Ok(Err(e)) => {
                    return Err(Error::Pgbouncer { command: sql, message: pg_message(&e), by_hand: false })
                }
                Err(_) => Paused::TimedOut,
            },
            _ = shutdown.wait() => Paused::Interrupted,
        };
        self.admin = self.info.connect_raw().await?;
        Ok(outcome)
    }

    /// `RESUME db`, tolerating a database that is not paused (so it is safe on every exit path),
    /// retried on a fresh console session if the current one is broken.
    pub async fn resume(&mut self) -> Result<()> {
        let sql = format!("RESUME {}", self.db());
        let mut last = None;
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                match self.info.connect_raw().await {
                    Ok(c) => self.admin = c,
                    Err(e) => {
                        last = Some(e.to_string());
                        continue;
                    }
                }
            }
            match self.admin.simple_query(&sql).await {
                Ok(_) => return Ok(()),
                Err(e) if pg_message(&e).contains("not paused") => return Ok(()),
                Err(e) => last = Some(pg_message(&e)),
            }
        }
        Err(Error::Pgbouncer { command: sql, message: last.unwrap_or_default(), by_hand: true })
    }

    /// `RELOAD`: PgBouncer re-reads its configuration, including the databases file.
    pub async fn reload(&self) -> Result<()> {
        self.command("RELOAD").await
    }

    /// `DISABLE db`: new client connections are refused.
    pub async fn disable(&self) -> Result<()> {
        self.command(&format!("DISABLE {}", self.db())).await
    }

    /// `ENABLE db`, undoing DISABLE.
    pub async fn enable(&self) -> Result<()> {
        self.command(&format!("ENABLE {}", self.db())).await
    }

    /// `KILL db`: every client and server connection of the database is dropped at once (its
    /// clients get an error); it then stays paused until RESUME.
    pub async fn kill(&self) -> Result<()> {
        self.command(&format!("KILL {}", self.db())).await
    }

    /// The entry as PgBouncer has it now (SHOW DATABASES), if it has one.
    pub async fn entry(&self) -> Result<Option<Entry>> {
        let rows = self.admin.simple_query("SHOW DATABASES").await.map_err(|e| Error::Pgbouncer {
            command: "SHOW DATABASES".into(),
            message: pg_message(&e),
            by_hand: false,
        })?;
        for m in rows {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                if r.get("name") == Some(self.db()) {
                    let get = |k: &str| r.get(k).unwrap_or("").to_string();
                    return Ok(Some(Entry {
                        host: get("host"),
                        port: get("port"),
                        database: get("database"),
                        paused: get("paused") == "1",
                        disabled: get("disabled") == "1",
                    }));
                }
            }
        }
        Ok(None)
    }

    /// A setting's current value (SHOW CONFIG).
    pub async fn config(&self, key: &str) -> Result<Option<String>> {
        let rows = self.admin.simple_query("SHOW CONFIG").await.map_err(|e| Error::Pgbouncer {
            command: "SHOW CONFIG".into(),
            message: pg_message(&e),
            by_hand: false,
        })?;
        Ok(rows.into_iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("key") == Some(key) => {
                r.get("value").map(str::to_string)
            }
            _ => None,
        }))
    }

    /// `SET key = 'value'` on the running PgBouncer (until its next RELOAD or restart).
    pub async fn set(&self, key: &str, value: &str) -> Result<()> {
        self.command(&format!("SET {key} = '{}'", value.replace('\'', ""))).await
    }

    /// Client connections of the database waiting for a server (SHOW POOLS `cl_waiting`).
    pub async fn waiting(&self) -> Result<u64> {
        self.pool_counts(&["cl_waiting"]).await
    }

    /// Client connections of the database that are using or waiting for a server (SHOW POOLS).
    pub async fn clients(&self) -> Result<u64> {
        self.pool_counts(&["cl_active", "cl_waiting"]).await
    }

    async fn pool_counts(&self, columns: &[&str]) -> Result<u64> {
        let rows = self.admin.simple_query("SHOW POOLS").await.map_err(|e| Error::Pgbouncer {
            command: "SHOW POOLS".into(),
            message: pg_message(&e),
            by_hand: false,
        })?;
        let mut n = 0;
        for m in rows {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                if r.get("database") == Some(self.db()) {
                    for k in columns {
                        n += r.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                    }
                }
            }
        }
        Ok(n)
    }
}

/// A database entry as PgBouncer has it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Server host it connects to.
    pub host: String,
    /// Server port.
    pub port: String,
    /// Database name on the server.
    pub database: String,
    /// Paused (PAUSE/KILL without RESUME since).
    pub paused: bool,
    /// Disabled (DISABLE without ENABLE since).
    pub disabled: bool,
}

/// Whether `name` can be passed to the admin console as it is.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}
