//! `[copy] max_rows_per_second`, honoured across all workers at chunk granularity: a worker
//! waits before a chunk until the rows admitted so far fit the rate.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// A shared rate limit; a rate of 0 admits everything at once.
pub struct Throttle {
    rate: u64,
    admitted: Mutex<(Instant, u64)>,
}

impl Throttle {
    /// A limit of `rate` rows per second (0 = unlimited).
    pub fn new(rate: u64) -> Self {
        Self { rate, admitted: Mutex::new((Instant::now(), 0)) }
    }

    /// Waits until `rows` more rows fit the rate.
    pub async fn admit(&self, rows: u64) {
        if self.rate == 0 {
            return;
        }
        let due = {
            let Ok(mut a) = self.admitted.lock() else {
                return;
            };
            // The first chunk goes at once; each later one waits for the time the earlier ones buy.
            let due = a.0 + Duration::from_secs_f64(a.1 as f64 / self.rate as f64);
            a.1 += rows;
            due
        };
        tokio::time::sleep_until(due.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spaces_chunks_by_rate() {
        let t = Throttle::new(1000);
        let start = Instant::now();
        for _ in 0..3 {
            t.admit(100).await;
        }
        // 3 chunks of 100 rows at 1000 rows/s: the third may start at 200 ms.
        let e = start.elapsed();
        assert!(e >= Duration::from_millis(190) && e < Duration::from_millis(600), "{e:?}");
    }
}
