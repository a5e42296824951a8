//! Copy progress: indicatif bars on a terminal, a log line every few seconds elsewhere.

use std::{
    io::IsTerminal,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tracing::info;

/// Counters shared by the copy workers.
pub struct Progress {
    tables: Vec<TableProgress>,
    started: Instant,
    bars: Option<(MultiProgress, ProgressBar)>,
}

struct TableProgress {
    name: String,
    estimated: u64,
    rows: AtomicU64,
    bytes: AtomicU64,
    bar: Option<ProgressBar>,
}

/// How often the non-terminal log line is written.
const LOG_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    /// Progress for tables `(name, estimated rows, rows already copied)`.
    pub fn new(tables: Vec<(String, u64, u64)>) -> Arc<Self> {
        let total: u64 = tables.iter().map(|t| t.1.max(t.2)).sum();
        let done: u64 = tables.iter().map(|t| t.2).sum();
        let bars = std::io::stderr().is_terminal().then(|| {
            // The process's one bar set: log lines lift it while they print.
            let mp = crate::output::bars().clone();
            let overall = mp.add(ProgressBar::new(total));
            overall.set_style(
                ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} rows {per_sec} ETA {eta} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            overall.set_prefix("all tables");
            overall.set_position(done);
            (mp, overall)
        });
        let tables = tables
            .into_iter()
            .map(|(name, estimated, copied)| {
                let bar = bars.as_ref().map(|(mp, _)| {
                    let b = mp.add(ProgressBar::new(estimated.max(copied)));
                    b.set_style(
                        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} rows {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    b.set_prefix(short(&name));
                    b.set_position(copied);
                    b
                });
                TableProgress { name, estimated, rows: AtomicU64::new(copied), bytes: AtomicU64::new(0), bar }
            })
            .collect();
        Arc::new(Self { tables, started: Instant::now(), bars })
    }

    /// Records a finished chunk of table `i`.
    pub fn chunk_done(&self, i: usize, rows: u64, bytes: u64) {
        let t = &self.tables[i];
        t.rows.fetch_add(rows, Ordering::Relaxed);
        t.bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(b) = &t.bar {
            b.inc(rows);
            b.set_message(crate::plan::render_size(t.bytes.load(Ordering::Relaxed)));
        }
        if let Some((_, overall)) = &self.bars {
            overall.inc(rows);
        }
    }

    /// Marks table `i` as fully copied (and indexed).
    pub fn table_done(&self, i: usize, what: &str) {
        let t = &self.tables[i];
        info!(table = %t.name, rows = t.rows.load(Ordering::Relaxed), "{what}");
        if let Some(b) = &t.bar {
            b.finish_with_message(what.to_string());
        }
    }

    /// Writes a progress log line every few seconds while there is no terminal, until dropped.
    pub fn spawn_logger(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        if self.bars.is_some() {
            return None;
        }
        let me = Arc::clone(self);
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOG_EVERY).await;
                me.log_line();
            }
        }))
    }

    fn log_line(&self) {
        let rows: u64 = self.tables.iter().map(|t| t.rows.load(Ordering::Relaxed)).sum();
        let bytes: u64 = self.tables.iter().map(|t| t.bytes.load(Ordering::Relaxed)).sum();
        let estimated: u64 = self.tables.iter().map(|t| t.estimated).sum();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = rows as f64 / secs;
        let eta = if rate > 0.0 { (estimated.saturating_sub(rows)) as f64 / rate } else { 0.0 };
        info!(
            rows,
            rows_estimated = estimated,
            rows_per_second = rate as u64,
            bytes_per_second = (bytes as f64 / secs) as u64,
            eta_seconds = eta as u64,
            "copy progress"
        );
    }

    /// Final summary line.
    pub fn finish(&self) {
        if let Some((_, overall)) = &self.bars {
            overall.finish_with_message("done");
        }
        self.log_line();
    }
}

fn short(name: &str) -> String {
    let n = name.rsplit('.').next().unwrap_or(name);
    if n.chars().count() > 12 {
        n.chars().take(11).collect::<String>() + "…"
    } else {
        n.to_string()
    }
}
