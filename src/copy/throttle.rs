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

    /// Waits until `rows` more rows fit the rate in force, in slices: a new rate books the chunk
    /// again (so `unthrottle` after a very low rate is felt at once), and `stop` ends the wait.
    pub async fn admit(&self, rows: u64, stop: &crate::shutdown::Shutdown) {
        loop {
            let rate = self.live.rate(self.plan_rate);
            let due = self.book(rows, rate);
            loop {
                let now = Instant::now();
                if due <= now || stop.is_triggered() {
                    return;
                }
                if self.live.rate(self.plan_rate) != rate {
                    break;
                }
                tokio::time::sleep((due - now).min(Duration::from_millis(200))).await;
            }
        }
    }

    /// Whether a row rate is in force now.
    pub fn limited(&self) -> bool {
        self.live.rate(self.plan_rate) > 0
    }

    /// Corrects the booking once a chunk charged `charged` rows turned out to hold `held`:
    /// later chunks wait for what it really held (a partition's leaves are much smaller than
    /// the estimate, a table with stale statistics much larger).
    pub fn settle(&self, charged: u64, held: u64) {
        let rate = self.live.rate(self.plan_rate);
        let Ok(mut next) = self.next.lock() else { return };
        if rate == 0 || next.1 != rate {
            return;
        }
        if let Some(n) = next.0 {
            let diff = Duration::from_secs_f64(charged.abs_diff(held) as f64 / rate as f64);
            next.0 = Some(if held > charged { n + diff } else { n.checked_sub(diff).unwrap_or(n) });
        }
    }

    /// Books `rows` at `rate`: when they may start.
    fn book(&self, rows: u64, rate: u64) -> Instant {
        let now = Instant::now();
        {
            let Ok(mut next) = self.next.lock() else { return now };
            if rate == 0 {
                *next = (None, 0);
                return now;
            }
            // The first chunk goes at once; each later one waits for the time the earlier ones
            // buy. A new rate starts afresh: time booked at a very low one is not waited out.
            let booked = if next.1 == rate { next.0 } else { None };
            let due = booked.filter(|n| *n > now).unwrap_or(now);
            *next = (Some(due + Duration::from_secs_f64(rows as f64 / rate as f64)), rate);
            due
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spaces_chunks_by_rate() {
        let t = Throttle::new(1000, Arc::default());
        let start = Instant::now();
        let stop = crate::shutdown::Shutdown::manual();
        for _ in 0..3 {
            t.admit(100, &stop).await;
        }
        // 3 chunks of 100 rows at 1000 rows/s: the third may start at 200 ms.
        let e = start.elapsed();
        assert!(e >= Duration::from_millis(190) && e < Duration::from_millis(600), "{e:?}");
    }

    #[tokio::test]
    async fn chunks_are_charged_what_they_held() {
        let t = Throttle::new(1000, Arc::default());
        let stop = crate::shutdown::Shutdown::manual();
        // Charged 500 rows each, held 10: the next chunk need not wait for 490 of them.
        t.admit(500, &stop).await;
        t.settle(500, 10);
        let start = Instant::now();
        t.admit(500, &stop).await;
        assert!(start.elapsed() < Duration::from_millis(100), "{:?}", start.elapsed());
        t.settle(500, 10);
        // Charged 10, held 500: the next one waits for the rest.
        t.admit(10, &stop).await;
        t.settle(10, 500);
        let start = Instant::now();
        t.admit(10, &stop).await;
        assert!(start.elapsed() >= Duration::from_millis(400), "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn a_new_rate_or_a_stop_ends_a_long_wait() {
        let live = Arc::new(Live::default());
        live.set(&crate::state::Control { rows_per_second: 1, ..Default::default() });
        let t = Throttle::new(0, Arc::clone(&live));
        let stop = crate::shutdown::Shutdown::manual();
        t.admit(1000, &stop).await;
        // The next chunk is booked 1000 s out; `unthrottle` (back to the plan's: unlimited).
        let start = Instant::now();
        let (waiting, live2) = (t.admit(1000, &stop), Arc::clone(&live));
        let unthrottle = async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            live2.set(&crate::state::Control::default());
        };
        tokio::join!(waiting, unthrottle);
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
        // At a slow rate again, a stop ends the wait.
        live.set(&crate::state::Control { rows_per_second: 1, ..Default::default() });
        t.admit(1000, &stop).await;
        let start = Instant::now();
        let stopper = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stop.trigger();
        };
        tokio::join!(t.admit(1000, &stop), stopper);
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }
}
