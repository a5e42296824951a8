//! The copy's rate in rows per second, honoured across all workers at chunk granularity: a
//! worker waits before a chunk until the rows admitted so far fit the rate. The rate is read at
//! each chunk ([`crate::control::Live::rate`]: `migrate control throttle`, else `[copy]
//! max_rows_per_second`), so a change takes effect at the next chunk.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::control::Live;

/// A shared rate limit; a rate of 0 admits everything at once.
pub struct Throttle {
    plan_rate: u64,
    live: Arc<Live>,
    /// When the next chunk may start, and the rate that time was booked at.
    next: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// A limit of `plan_rate` rows per second (0 = unlimited) unless `live` sets another.
    pub fn new(plan_rate: u64, live: Arc<Live>) -> Self {
        Self { plan_rate, live, next: Mutex::new((None, 0)) }
    }

    /// Waits until `rows` more rows fit the rate in force.
    pub async fn admit(&self, rows: u64) {
        let rate = self.live.rate(self.plan_rate);
        let due = {
            let Ok(mut next) = self.next.lock() else { return };
            let now = Instant::now();
            if rate == 0 {
                *next = (None, 0);
                return;
            }
            // The first chunk goes at once; each later one waits for the time the earlier ones
            // buy. A new rate starts afresh: time booked at a very low one is not waited out.
            let booked = if next.1 == rate { next.0 } else { None };
            let due = booked.filter(|n| *n > now).unwrap_or(now);
            *next = (Some(due + Duration::from_secs_f64(rows as f64 / rate as f64)), rate);
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
        let t = Throttle::new(1000, Arc::default());
        let start = Instant::now();
        for _ in 0..3 {
            t.admit(100).await;
        }
        // 3 chunks of 100 rows at 1000 rows/s: the third may start at 200 ms.
        let e = start.elapsed();
        assert!(e >= Duration::from_millis(190) && e < Duration::from_millis(600), "{e:?}");
    }
}
