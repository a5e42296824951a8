//! A stand-in application for the demo, the benchmark and the tests: a fixed-rate writer
//! through PgBouncer. Each tick inserts
//! into `app_events` (a table in both schemas) and, while `mapped` is on, also updates a mapped
//! blue table. It records every acknowledged insert, every failure, and the longest time a
//! statement took (the stall the application saw). Simple query protocol only: PgBouncer in
//! transaction mode does not keep prepared statements.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// One acknowledged insert.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The payload written (unique).
    pub payload: String,
    /// The id the database gave it.
    pub id: i64,
    /// When the acknowledgement arrived.
    pub at: Instant,
}

/// What the application saw.
#[derive(Debug, Default)]
pub struct AppReport {
    /// Acknowledged inserts.
    pub acks: Vec<Ack>,
    /// Failed statements (message).
    pub failures: Vec<String>,
    /// Longest single statement, from send to answer.
    pub max_stall: Duration,
    /// Mapped-table updates done.
    pub updates: u64,
    /// Writes to green's tables in the v2 form done (revocations inserted, updated, deleted).
    pub v2_writes: u64,
}

/// A running application writer.
pub struct App {
    stop: Arc<AtomicBool>,
    mapped: Arc<AtomicBool>,
    v2: Arc<AtomicBool>,
    report: Arc<Mutex<AppReport>>,
    handle: Option<JoinHandle<()>>,
}

impl App {
    /// Starts writing `rate` ticks per second to `url` (a PgBouncer database), tagging payloads
    /// with `tag`.
    pub fn start(url: String, rate: u32, tag: &str) -> App {
        let stop = Arc::new(AtomicBool::new(false));
        let mapped = Arc::new(AtomicBool::new(true));
        let v2 = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(AppReport::default()));
        let (s, m, v, r, tag) = (stop.clone(), mapped.clone(), v2.clone(), report.clone(), tag.to_string());
        let handle = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    r.lock().unwrap_or_else(|e| e.into_inner()).failures.push(format!("runtime: {e}"));
                    return;
                }
            };
            rt.block_on(async move {
                let client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((client, conn)) => {
                        tokio::spawn(conn);
                        client
                    }
                    Err(e) => {
                        r.lock().unwrap_or_else(|e| e.into_inner()).failures.push(format!("connect: {e}"));
                        return;
                    }
                };
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut n = 0u64;
                while !s.load(Ordering::SeqCst) {
                    tick.tick().await;
                    n += 1;
                    let payload = format!("{tag}-{n}");
                    let sql =
                        format!("INSERT INTO app_events (kind, payload) VALUES ('app', '{payload}') RETURNING id");
                    let sent = Instant::now();
                    let res = client.simple_query(&sql).await;
                    let took = sent.elapsed();
                    {
                        let mut rep = r.lock().unwrap_or_else(|e| e.into_inner());
                        rep.max_stall = rep.max_stall.max(took);
                        match res {
                            Ok(msgs) => {
                                let id = msgs.iter().find_map(|m| match m {
                                    tokio_postgres::SimpleQueryMessage::Row(row) => {
                                        row.get(0).and_then(|v| v.parse().ok())
                                    }
                                    _ => None,
                                });
                                rep.acks.push(Ack { payload, id: id.unwrap_or(-1), at: Instant::now() });
                            }
                            Err(e) => rep.failures.push(format!("insert {payload}: {e}")),
                        }
                    }
                    if v.load(Ordering::SeqCst) {
                        let sql = v2_statement(&tag, n);
                        let sent = Instant::now();
                        let res = client.simple_query(&sql).await;
                        let mut rep = r.lock().unwrap_or_else(|e| e.into_inner());
                        rep.max_stall = rep.max_stall.max(sent.elapsed());
                        match res {
                            Ok(_) => rep.v2_writes += 1,
                            Err(e) => rep.failures.push(format!("v2 write: {e}")),
                        }
                    }
                    if m.load(Ordering::SeqCst) && n.is_multiple_of(3) {
                        let sql = "UPDATE hydra_oauth2_access SET active = NOT active WHERE signature = \
                            (SELECT signature FROM hydra_oauth2_access WHERE signature >= md5(random()::text) \
                             ORDER BY signature LIMIT 1)";
                        let sent = Instant::now();
                        let res = client.simple_query(sql).await;
                        let mut rep = r.lock().unwrap_or_else(|e| e.into_inner());
                        rep.max_stall = rep.max_stall.max(sent.elapsed());
                        match res {
                            Ok(_) => rep.updates += 1,
                            Err(e) => rep.failures.push(format!("update: {e}")),
                        }
                    }
                }
            });
        });
        App { stop, mapped, v2, report, handle: Some(handle) }
    }

    /// Turns the v2 application's writes to green's revocations on or off (inserts, updates,
    /// deletes: what a way back must carry to blue). Only while traffic is on green.
    pub fn set_v2(&self, on: bool) {
        self.v2.store(on, Ordering::SeqCst);
    }

    /// Turns the updates of mapped (blue-named) tables on or off. They must be off before the
    /// switch: green's tables have other names.
    pub fn set_mapped(&self, on: bool) {
        self.mapped.store(on, Ordering::SeqCst);
    }

    /// v2 writes done so far.
    pub fn v2_writes(&self) -> u64 {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).v2_writes
    }

    /// Acknowledged inserts so far.
    pub fn acked(&self) -> usize {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).acks.len()
    }

    /// Resets the longest stall seen so far (to measure one window, such as a cutover).
    pub fn reset_stall(&self) {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).max_stall = Duration::ZERO;
    }

    /// The longest stall so far and the failures so far.
    pub fn snapshot(&self) -> (Duration, usize) {
        let r = self.report.lock().unwrap_or_else(|e| e.into_inner());
        (r.max_stall, r.failures.len())
    }

    /// Stops and returns what the application saw.
    pub fn stop(mut self) -> AppReport {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                self.report.lock().unwrap_or_else(|e| e.into_inner()).failures.push("writer thread panicked".into());
            }
        }
        std::mem::take(&mut *self.report.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The v2 application's write to green's `oauth2_revocations`: a revocation, a changed reason,
/// its key changed, or a revocation withdrawn (a row picked among the first hundred by key).
fn v2_statement(tag: &str, n: u64) -> String {
    let pick =
        "(SELECT request_id FROM oauth2_revocations ORDER BY request_id OFFSET floor(random() * 100)::int LIMIT 1)";
    match n % 4 {
        0 => format!(
            "INSERT INTO oauth2_revocations (request_id, revoked_at, reason) VALUES ('{tag}-v2-{n}', now(), 'revoked on green')"
        ),
        1 => format!("UPDATE oauth2_revocations SET reason = 'changed on green {n}' WHERE request_id = {pick}"),
        // A key change: the old key leaves blue, the new one arrives.
        2 => format!("UPDATE oauth2_revocations SET request_id = request_id || '-k{n}' WHERE request_id = {pick}"),
        _ => format!("DELETE FROM oauth2_revocations WHERE request_id = {pick}"),
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
