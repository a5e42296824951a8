//! Pools of sessions for work many tasks share (apply's re-reads from blue, verify's sessions):
//! deadpool-postgres hands out a session, checks on its return that it is still open, and
//! replaces a broken one on the next checkout, so callers never reconnect by hand. Sessions that
//! hold a snapshot, a lock, a COPY or session settings of their own stay dedicated
//! ([`ConnInfo::connect`]).

use std::time::Duration;

use deadpool_postgres::{
    HookError, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, Timeouts,
};
use tokio_postgres::config::SslMode as PgSslMode;

use super::conn::{ConnInfo, SslMode, CONNECT_TIMEOUT, SESSION_SETTINGS};
use crate::error::ConnError;

/// A pool of sessions to one side, each with the pinned session settings.
#[derive(Clone)]
pub struct SidePool {
    info: ConnInfo,
    pool: Pool,
}

impl std::fmt::Debug for SidePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SidePool({})", self.info)
    }
}

impl SidePool {
    /// A pool of at most `size` sessions to `info`'s side. Nothing connects until the first
    /// [`SidePool::get`].
    pub fn new(info: &ConnInfo, size: usize) -> Result<SidePool, ConnError> {
        let tls = info.tls_connector().map_err(|reason| ConnError::Tls { side: info.side, reason })?;
        let mut config = info.config().clone();
        // One connector for every mode: with `disable` the driver never starts TLS.
        config.ssl_mode(match info.ssl_mode() {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        // `Fast`: a session is reused unless its connection closed; a query on a half-dead one
        // fails once, is classified transient by the caller, and the session is not reused.
        let manager = Manager::from_config(config, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(size.max(1))
            .runtime(Runtime::Tokio1)
            // connect_timeout bounds each TCP attempt; this bounds TLS and authentication too.
            .timeouts(Timeouts {
                wait: Some(Duration::from_secs(300)),
                create: Some(CONNECT_TIMEOUT + Duration::from_secs(3)),
                recycle: Some(Duration::from_secs(5)),
            })
            .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
                Box::pin(async move { client.batch_execute(SESSION_SETTINGS).await.map_err(HookError::Backend) })
            }))
            .build()
            .map_err(|e| ConnError::Tls { side: info.side, reason: e.to_string() })?;
        Ok(SidePool { info: info.clone(), pool })
    }

    /// A session from the pool (a new one when none is idle, or the idle one was broken).
    pub async fn get(&self) -> Result<Object, ConnError> {
        let (side, target) = (self.info.side, self.info.to_string());
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(source) | PoolError::PostCreateHook(HookError::Backend(source)) => {
                ConnError::Connect { side, target, source }
            }
            PoolError::Timeout(_) => {
                ConnError::Timeout { side, target, waited: CONNECT_TIMEOUT + Duration::from_secs(3) }
            }
            other => ConnError::Tls { side, reason: other.to_string() },
        })
    }
}
