//! A concurrent writer on blue's OAuth schema: inserts (some with TOASTed values), updates that
//! leave TOASTed values unchanged, key changes, deletes, rows moving into and out of the plan's
//! filter, composite-key changes, a transaction held open across many others (commits late), and
//! updates to the unplanned log table without a key. Every statement must succeed: the
//! application's writes never fail because of capture.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

/// A running writer; `stop()` joins it and returns how many operations succeeded.
pub struct Writer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<u64, String>>>,
}

/// Picks an existing access-token signature at random through the primary key index.
const PICK: &str =
    "(SELECT signature FROM hydra_oauth2_access WHERE signature >= md5(random()::text) ORDER BY signature LIMIT 1)";

fn statement(n: u64) -> String {
    let big = if n.is_multiple_of(7) { "repeat('toast ', 4000)" } else { "'small'" };
    match n % 14 {
        0 => format!(
            "INSERT INTO hydra_oauth2_access (signature, request_id, requested_at, client_id, scope, granted_scope, form_data, \
             session_data, subject, active, requested_audience) \
             VALUES ('w-{n}', 'req-w-{n}', now() AT TIME ZONE 'UTC', (SELECT id FROM hydra_client ORDER BY pk LIMIT 1 OFFSET {n} % 10), \
             'openid  offline', 'openid', 'f', json_build_object('n', {n}, 'blob', {big}, 'who', 'Zoë 東京')::text, 'sübject-{n}', true, 'a||b')"
        ),
        1 => format!("UPDATE hydra_oauth2_access SET scope = coalesce(scope, '') || ' s{n}' WHERE signature = {PICK}"),
        // Leaves session_data (often TOASTed) unchanged: pgoutput sends it as 'unchanged'.
        2 => format!("UPDATE hydra_oauth2_access SET active = NOT active WHERE signature = {PICK}"),
        // Key change.
        3 => format!("UPDATE hydra_oauth2_access SET signature = signature || '-k{n}' WHERE signature = {PICK}"),
        4 => format!("DELETE FROM hydra_oauth2_access WHERE signature = {PICK}"),
        // Into the filter (an expired token renewed) and out of it.
        5 => "UPDATE hydra_oauth2_access SET requested_at = now() AT TIME ZONE 'UTC' WHERE signature = \
              (SELECT signature FROM hydra_oauth2_access WHERE requested_at < now() - interval '91 days' ORDER BY signature LIMIT 1)"
            .to_string(),
        6 => format!("UPDATE hydra_oauth2_access SET requested_at = now() - interval '200 days' WHERE signature = {PICK}"),
        7 => format!("UPDATE hydra_client SET metadata = '{{\"w\": {n}}}', updated_at = now() WHERE pk = 1 + {n} % 10"),
        8 => format!(
            "INSERT INTO hydra_client (id, client_name, client_secret, redirect_uris, grant_types, scope, metadata, token_lifespan, created_at) \
             VALUES ('wc-{n}', 'writer ✓ {n}', 's', 'https://a https://b', 'code', 'openid', NULL, {n}.5, now())"
        ),
        // Composite key change and insert.
        9 => format!(
            "UPDATE hydra_oauth2_consent_session SET subject = subject || '-m{n}' WHERE (subject, client_id) = \
             (SELECT subject, client_id FROM hydra_oauth2_consent_session WHERE subject >= md5(random()::text) ORDER BY subject LIMIT 1)"
        ),
        10 => format!(
            "INSERT INTO hydra_oauth2_consent_session (subject, client_id, granted_scope, remember, handled_at, session_id_token) \
             VALUES ('ws-{n}', 'client-000001', 'openid', NULL, now(), '{{\"x\": {n}}}')"
        ),
        11 => format!("INSERT INTO hydra_oauth2_revocation (request_id, revoked_at, reason) VALUES ('rv-{n}', now(), 'writer')"),
        12 => "DELETE FROM hydra_oauth2_revocation WHERE request_id = (SELECT request_id FROM hydra_oauth2_revocation ORDER BY request_id LIMIT 1)".to_string(),
        // Not in the plan, no key: must keep working.
        _ => format!("UPDATE hydra_oauth2_log SET detail = 'w{n}' WHERE ctid = (SELECT ctid FROM hydra_oauth2_log LIMIT 1)"),
    }
}

impl Writer {
    /// Starts writing to `url` with a pause of `pause` between statements.
    pub fn start(url: String, pause: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let (s, o) = (stop.clone(), ops.clone());
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                let (late, conn2) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
                tokio::spawn(conn2);
                // A statement blocked this long means something (our DDL?) stalls the application.
                for c in [&client, &late] {
                    c.batch_execute("SET statement_timeout = '15s'").await.map_err(|e| e.to_string())?;
                }
                // Writers started one after another in a test must not reuse each other's keys.
                static BASE: AtomicU64 = AtomicU64::new(0);
                let mut n = BASE.fetch_add(1_000_000, Ordering::SeqCst);
                let mut late_open = false;
                while !s.load(Ordering::SeqCst) {
                    n += 1;
                    // Every 40 statements a transaction begins on the second session, writes, and
                    // stays open for 25 more statements of the first: it commits late.
                    if n.is_multiple_of(40) && !late_open {
                        late.batch_execute(&format!(
                            "BEGIN; \
                             INSERT INTO hydra_oauth2_access (signature, request_id, requested_at, client_id, session_data, active) \
                             VALUES ('late-{n}', 'req-late-{n}', now() AT TIME ZONE 'UTC', 'client-000002', '{{\"late\": true}}', true); \
                             UPDATE hydra_oauth2_access SET scope = 'late' WHERE signature = 'late-{n}'; \
                             INSERT INTO hydra_oauth2_revocation (request_id, revoked_at, reason) VALUES ('late-{n}', now(), 'late')"
                        ))
                            .await
                            .map_err(|e| format!("late tx: {e}"))?;
                        late_open = true;
                    } else if n % 40 == 25 && late_open {
                        late.batch_execute("COMMIT").await.map_err(|e| format!("late commit: {e}"))?;
                        late_open = false;
                    }
                    let sql = statement(n);
                    client.batch_execute(&sql).await.map_err(|e| format!("writer statement failed: {e}\n{sql}"))?;
                    o.fetch_add(1, Ordering::SeqCst);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
                if late_open {
                    late.batch_execute("COMMIT").await.map_err(|e| format!("late commit: {e}"))?;
                }
                Ok(o.load(Ordering::SeqCst))
            })
        });
        Writer { stop, handle: Some(handle) }
    }

    /// Stops and joins; panics if any statement failed.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let h = self.handle.take().unwrap();
        h.join().expect("writer thread panicked").unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
