//! Everything that talks PostgreSQL in general: connections, quoting, catalog queries, WAL
//! positions.

pub mod catalog;
pub mod conn;
pub mod libpq;
pub mod lsn;
pub mod pool;
pub mod quote;

pub use conn::{cancels_sent, ConnError, ConnInfo, Side};
pub use lsn::{commit_point, current_lsn, flush_lsn, insert_lsn, Lsn};
pub use pool::SidePool;
pub use quote::{ident, literal, QualifiedName};

use crate::error::{Error, Result};

/// Opens a read-only repeatable-read transaction on `client` and exports its snapshot, for
/// other sessions (here or on other machines) to read as it saw the database. Held idle while
/// they read: a server-wide `idle_in_transaction_session_timeout` must not end it. `what`
/// names it in errors (`blue: … copy snapshot`).
pub async fn export_snapshot(client: &tokio_postgres::Client, what: &str) -> Result<String> {
    client
        .batch_execute("SET idle_in_transaction_session_timeout = 0; BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(Error::db(format!("{what}: beginning")))?;
    Ok(client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(Error::db(format!("{what}: exporting")))?
        .get(0))
}

/// `ANALYZE` of a copied target, so green's planner has statistics before the application
/// arrives (a partitioned target: its partitions and the parent's inherited statistics).
/// `lock_timeout`: give up rather than queue longer behind another holder of the table.
pub async fn analyze(
    green: &tokio_postgres::Client,
    target: &QualifiedName,
    lock_timeout: Option<std::time::Duration>,
) -> Result<()> {
    let started = std::time::Instant::now();
    let sql = match lock_timeout {
        Some(t) => {
            format!("BEGIN; SET LOCAL lock_timeout = '{}ms'; ANALYZE {}; COMMIT", t.as_millis(), target.quoted())
        }
        None => format!("ANALYZE {}", target.quoted()),
    };
    if let Err(e) = green.batch_execute(&sql).await {
        let _ = green.batch_execute("ROLLBACK").await;
        return Err(Error::db(format!("green: analyzing {target}"))(e));
    }
    tracing::info!(table = %target, seconds = started.elapsed().as_secs_f64(), "analyzed");
    Ok(())
}
