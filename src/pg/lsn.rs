//! WAL positions: blue's current and flush positions as bytes from 0/0 (how state stores them),
//! and the commit point that verify and cutover wait for capture to pass.

use tokio_postgres::Client;

use crate::error::{pg_message, Error, Result};

/// Blue's current WAL write position, as bytes from 0/0.
pub async fn current_lsn(client: &Client) -> Result<i64> {
    Ok(client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[])
        .await
        .map_err(Error::db("blue: reading the WAL position"))?
        .get(0))
}

/// A blue WAL position that every transaction committed so far lies before, and that decoding
/// can reach. Under `synchronous_commit = off` a commit is visible before its WAL is flushed,
/// and decoding reads only flushed WAL; so commit a tiny transaction with synchronous_commit on
/// (a transactional logical message, which pgoutput ignores unless asked), which flushes every
/// earlier record, and return the flush position after it.
pub async fn commit_point(blue: &Client) -> Result<i64> {
    let flushed = blue
        .batch_execute(
            "BEGIN; SET LOCAL synchronous_commit = on; \
             SELECT pg_logical_emit_message(true, 'bluegreen', 'commit point'); COMMIT",
        )
        .await;
    if let Err(e) = flushed {
        let _ = blue.batch_execute("ROLLBACK").await;
        // Without the privilege, wait out the WAL writer (it flushes within 3 x wal_writer_delay).
        tracing::debug!(error = %pg_message(&e), "cannot emit a logical message; waiting for the WAL writer instead");
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
        let flush: i64 = blue
            .query_one("SELECT (pg_current_wal_flush_lsn() - '0/0')::int8", &[])
            .await
            .map_err(Error::db("blue: reading the WAL position"))?
            .get(0);
        return Ok(flush);
    }
    Ok(blue
        .query_one("SELECT (pg_current_wal_flush_lsn() - '0/0')::int8", &[])
        .await
        .map_err(Error::db("blue: reading the WAL position"))?
        .get(0))
}
