//! WAL positions: blue's current and flush positions as bytes from 0/0 (how state stores them),
//! and the commit point that verify and cutover wait for capture to pass.

use bytes::BytesMut;
use tokio_postgres::{
    types::{FromSql, IsNull, ToSql, Type},
    Client,
};

use crate::error::{pg_message, Error, Result};

/// A position in blue's WAL, as bytes from `0/0`: what state stores (`bigint`) and compares.
/// Shown the way PostgreSQL shows an LSN (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub i64);

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.0 as u64;
        write!(f, "{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF)
    }
}

impl Lsn {
    /// Bytes from `b` to `self`, never negative.
    pub fn bytes_after(self, b: Lsn) -> u64 {
        (self.0 - b.0).max(0) as u64
    }
}

impl ToSql for Lsn {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.0.to_sql(ty, out)
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as ToSql>::accepts(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

impl<'a> FromSql<'a> for Lsn {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        i64::from_sql(ty, raw).map(Lsn)
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as FromSql>::accepts(ty)
    }
}

/// Blue's current WAL write position, as bytes from 0/0.
pub async fn current_lsn(client: &Client) -> Result<Lsn> {
    position(client, "pg_current_wal_lsn").await
}

/// Blue's current WAL insert position (ahead of the write position), as bytes from 0/0.
pub async fn insert_lsn(client: &Client) -> Result<Lsn> {
    position(client, "pg_current_wal_insert_lsn").await
}

/// Blue's WAL flush position: decoding reads only up to it.
pub async fn flush_lsn(client: &Client) -> Result<Lsn> {
    position(client, "pg_current_wal_flush_lsn").await
}

/// One of the `pg_current_wal_*_lsn` functions, as bytes from 0/0.
async fn position(client: &Client, function: &str) -> Result<Lsn> {
    Ok(client
        .query_one(&format!("SELECT ({function}() - '0/0')::int8"), &[])
        .await
        .map_err(Error::db("blue: reading the WAL position"))?
        .get(0))
}

/// A blue WAL position that every transaction committed so far lies before, and that decoding
/// can reach. Under `synchronous_commit = off` a commit is visible before its WAL is flushed,
/// and decoding reads only flushed WAL; so commit a tiny transaction with synchronous_commit on
/// (a transactional logical message, which pgoutput ignores unless asked), which flushes every
/// earlier record, and return the flush position after it.
pub async fn commit_point(blue: &Client) -> Result<Lsn> {
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
    }
    flush_lsn(blue).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_as_postgres_shows_it() {
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(10).bytes_after(Lsn(4)), 6);
        assert_eq!(Lsn(4).bytes_after(Lsn(10)), 0);
    }
}
