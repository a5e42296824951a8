//! The one retry policy: which failures are worth another attempt (lost or refused connections,
//! server shutdowns, serialization failures, deadlocks) and a bounded exponential backoff,
//! logged at every attempt.

use std::time::{Duration, Instant};

use tracing::warn;

use crate::{
    error::{Error, Result},
    shutdown::Shutdown,
};

/// Reconnect attempts back off up to this delay...
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// ...and give up after this long without a working connection.
const GIVE_UP_AFTER: Duration = Duration::from_secs(300);

/// Bounded exponential backoff for transient failures.
pub struct Backoff {
    delay: Duration,
    since: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { delay: Duration::from_millis(250), since: None }
    }
}

impl Backoff {
    /// Starts over after a success.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Waits before the next attempt; returns the error when failures have lasted too long.
    pub async fn wait(&mut self, e: Error, stop: &Shutdown, what: &str) -> Result<()> {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() > GIVE_UP_AFTER {
            return Err(e);
        }
        warn!(what, error = %e, retry_in_ms = self.delay.as_millis() as u64, "interrupted; reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(self.delay) => {}
            _ = stop.wait() => {}
        }
        self.delay = (self.delay * 2).min(MAX_BACKOFF);
        Ok(())
    }
}

/// Asks `ready` every 200 ms until it says yes or `within` has passed; whether it said yes.
/// For conditions another session settles soon: a dead `copy`'s lock or slot that its server
/// has not let go of yet, apply passing a position.
pub async fn wait_until<F, Fut>(within: Duration, mut ready: F) -> Result<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let started = Instant::now();
    loop {
        if ready().await? {
            return Ok(true);
        }
        if started.elapsed() > within {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Errors worth retrying: lost or refused connections and server shutdowns (after a reconnect),
/// serialization failures and deadlocks (on the same connection), and an object in use (55006:
/// the slot is still held by the blue session of a `copy` that was just killed, until blue
/// notices it is gone).
pub fn is_transient(e: &Error) -> bool {
    connection_lost(e) || db_code(e).is_some_and(|c| matches!(c, "40001" | "40P01" | "55006"))
}

/// A unique or exclusion violation on green between rows that sessions applying different keys
/// wrote in the wrong order: blue moved a unique value from one key to another (delete one row,
/// insert another with its email), the new row's session came first. It clears once the old
/// key's delete lands, so followers retry it (bounded by the usual 300 s); a violation that does
/// not clear is green's constraint that blue lacks, and is reported then.
pub fn order_conflict(e: &Error) -> bool {
    db_code(e).is_some_and(|c| matches!(c, "23505" | "23P01"))
}

/// What a follower loop retries: transient errors and [`order_conflict`]s.
pub fn retry_later(e: &Error) -> bool {
    is_transient(e) || order_conflict(e)
}

/// The connection is gone or the server is going away: reconnect before retrying.
pub fn connection_lost(e: &Error) -> bool {
    match e {
        Error::Connect(_) | Error::Stalled { .. } => true,
        Error::Db { source, .. } => {
            source.is_closed()
                || match db_code(e) {
                    Some(c) => c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03"),
                    None => std::error::Error::source(source).is_some_and(|s| s.is::<std::io::Error>()),
                }
        }
        _ => false,
    }
}

fn db_code(e: &Error) -> Option<&str> {
    match e {
        Error::Db { source, .. } => source.code().map(|c| c.code()),
        _ => None,
    }
}

/// When a long-running step last made progress: a round that streams a large transaction is
/// slow, not stalled, as long as it keeps moving.
#[derive(Debug)]
pub struct Progress {
    base: std::time::Instant,
    /// Milliseconds after `base` of the last progress.
    last: std::sync::atomic::AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Self { base: std::time::Instant::now(), last: std::sync::atomic::AtomicU64::new(0) }
    }
}

impl Progress {
    /// Notes progress now.
    pub fn touch(&self) {
        self.last.store(self.base.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Time since the last progress.
    pub fn idle(&self) -> Duration {
        self.base.elapsed().saturating_sub(Duration::from_millis(self.last.load(std::sync::atomic::Ordering::Relaxed)))
    }
}

/// Runs `fut`, failing with [`Error::Stalled`] once `progress` has not moved for `waited`.
pub async fn unless_stalled<T>(
    fut: impl std::future::Future<Output = Result<T>>,
    progress: &Progress,
    waited: Duration,
    what: &str,
) -> Result<T> {
    progress.touch();
    tokio::pin!(fut);
    loop {
        tokio::select! {
            r = &mut fut => return r,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if progress.idle() > waited {
                    return Err(Error::Stalled { what: what.to_string(), waited });
                }
            }
        }
    }
}
