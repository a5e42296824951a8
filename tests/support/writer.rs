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
    ops: Arc<AtomicU64>,
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

/// The OAuth writer's transaction that commits late: new rows only (nothing the other session
/// waits for).
fn late_token(n: u64) -> String {
    format!(
        "BEGIN; \
         INSERT INTO hydra_oauth2_access (signature, request_id, requested_at, client_id, session_data, active) \
         VALUES ('late-{n}', 'req-late-{n}', now() AT TIME ZONE 'UTC', 'client-000002', '{{\"late\": true}}', true); \
         UPDATE hydra_oauth2_access SET scope = 'late' WHERE signature = 'late-{n}'; \
         INSERT INTO hydra_oauth2_revocation (request_id, revoked_at, reason) VALUES ('late-{n}', now(), 'late')"
    )
}

/// A login of the flow tables picked at random (through the primary key index).
const LOGIN: &str = "(SELECT challenge FROM hydra_oauth2_authentication_request \
     WHERE challenge >= 'login-' || floor(random() * 2500)::int ORDER BY challenge LIMIT 1)";
/// A consent request picked at random.
const CONSENT: &str = "(SELECT challenge FROM hydra_oauth2_consent_request \
     WHERE challenge >= 'consent-' || floor(random() * 2500)::int ORDER BY challenge LIMIT 1)";
/// A handled consent picked at random.
const HANDLED: &str = "(SELECT challenge FROM hydra_oauth2_consent_request_handled \
     WHERE challenge >= 'consent-' || floor(random() * 2500)::int ORDER BY challenge LIMIT 1)";

/// Writes to every table of the merged flow (login request, login handled, consent request,
/// consent handled): inserts, deletes (with cascades), join-column updates (consents moving
/// between logins, leaving and entering the join, handled rows re-keyed), a consent that wins
/// the latest-consent pick or ties it, key changes that cascade, unused columns.
fn flow_statement(n: u64) -> String {
    match n % 17 {
        0 => format!(
            "INSERT INTO hydra_oauth2_authentication_request (challenge, requested_scope, subject, client_id, request_url, context, requested_at) \
             VALUES ('wl-{n}', 'openid w', 'wuser-{n}', 'client-000003', 'https://w/{n}', '{{\"w\": {n}}}', now() AT TIME ZONE 'UTC')"
        ),
        1 => "INSERT INTO hydra_oauth2_authentication_request_handled (challenge, subject, remember, error, handled_at) \
              SELECT l.challenge, l.subject, true, '{}', now() FROM hydra_oauth2_authentication_request l \
              WHERE l.challenge >= 'login-' || floor(random() * 2500)::int \
                AND NOT EXISTS (SELECT 1 FROM hydra_oauth2_authentication_request_handled h WHERE h.challenge = l.challenge) \
              ORDER BY l.challenge LIMIT 1"
            .to_string(),
        2 => format!(
            "UPDATE hydra_oauth2_authentication_request_handled SET error = CASE WHEN error = '{{}}' THEN '{{\"e\": {n}}}' ELSE '{{}}' END \
             WHERE challenge = {LOGIN}"
        ),
        3 => format!("DELETE FROM hydra_oauth2_authentication_request_handled WHERE challenge = {LOGIN}"),
        // A new latest consent: it wins the pick.
        4 => format!(
            "INSERT INTO hydra_oauth2_consent_request (challenge, login_challenge, subject, client_id, requested_scope, requested_at) \
             VALUES ('wc-{n}', {LOGIN}, 'wuser', 'client-000004', 'openid w{n}', now() AT TIME ZONE 'UTC' + interval '1 day')"
        ),
        // A consent tying another one's requested_at: the key breaks the tie.
        5 => format!(
            "INSERT INTO hydra_oauth2_consent_request (challenge, login_challenge, subject, client_id, requested_scope, requested_at) \
             SELECT 'a-tie-{n}', login_challenge, subject, client_id, 'tie', requested_at FROM hydra_oauth2_consent_request \
             WHERE challenge = {CONSENT} AND login_challenge IS NOT NULL"
        ),
        6 => format!("UPDATE hydra_oauth2_consent_request SET login_challenge = {LOGIN} WHERE challenge = {CONSENT}"),
        7 => format!("UPDATE hydra_oauth2_consent_request SET login_challenge = NULL WHERE challenge = {CONSENT}"),
        8 => format!("DELETE FROM hydra_oauth2_consent_request WHERE challenge = {CONSENT}"),
        9 => "INSERT INTO hydra_oauth2_consent_request_handled (challenge, granted_scope, remember, error, handled_at) \
              SELECT c.challenge, 'openid', true, '{}', now() FROM hydra_oauth2_consent_request c \
              WHERE c.challenge >= 'consent-' || floor(random() * 2500)::int \
                AND NOT EXISTS (SELECT 1 FROM hydra_oauth2_consent_request_handled h WHERE h.challenge = c.challenge) \
              ORDER BY c.challenge LIMIT 1"
            .to_string(),
        10 => format!("UPDATE hydra_oauth2_consent_request_handled SET granted_scope = 'openid w{n}' WHERE challenge = {HANDLED}"),
        // A handled row moved to another consent (its join column is its key).
        11 => format!(
            "UPDATE hydra_oauth2_consent_request_handled h SET challenge = x.challenge \
             FROM (SELECT c.challenge FROM hydra_oauth2_consent_request c \
                   WHERE c.challenge >= 'consent-' || floor(random() * 2500)::int \
                     AND NOT EXISTS (SELECT 1 FROM hydra_oauth2_consent_request_handled o WHERE o.challenge = c.challenge) \
                   ORDER BY c.challenge LIMIT 1) x \
             WHERE h.challenge = {HANDLED}"
        ),
        // Key changes that cascade to the joined rows.
        12 => format!("UPDATE hydra_oauth2_consent_request SET challenge = challenge || '-k{n}' WHERE challenge = {CONSENT}"),
        13 => format!("UPDATE hydra_oauth2_authentication_request SET challenge = challenge || '-k{n}' WHERE challenge = {LOGIN}"),
        // Cascades: the handled row goes, consents lose their login.
        14 => format!("DELETE FROM hydra_oauth2_authentication_request WHERE challenge = {LOGIN}"),
        // The latest consent changes; an unused column of a joined table changes.
        15 => format!(
            "UPDATE hydra_oauth2_consent_request SET requested_at = requested_at + interval '2 days' WHERE challenge = {CONSENT}"
        ),
        _ => format!(
            "UPDATE hydra_oauth2_authentication_request_handled SET acr = 'w{n}' WHERE challenge = {LOGIN}; \
             UPDATE hydra_oauth2_authentication_request SET subject = 'moved-{n}' WHERE challenge = {LOGIN}"
        ),
    }
}

/// The flow writer's transaction that commits late: a login with its handled row, consent and
/// handled consent, all new (nothing the other session waits for).
fn late_flow(n: u64) -> String {
    format!(
        "BEGIN; \
         INSERT INTO hydra_oauth2_authentication_request (challenge, subject, client_id, request_url, requested_at) \
         VALUES ('late-{n}', 'late', 'client-000005', 'https://late', now() AT TIME ZONE 'UTC'); \
         INSERT INTO hydra_oauth2_authentication_request_handled (challenge, subject, handled_at) VALUES ('late-{n}', 'late', now()); \
         INSERT INTO hydra_oauth2_consent_request (challenge, login_challenge, subject, client_id, requested_at) \
         VALUES ('late-c-{n}', 'late-{n}', 'late', 'client-000005', now()); \
         INSERT INTO hydra_oauth2_consent_request_handled (challenge, granted_scope, handled_at) VALUES ('late-c-{n}', 'openid late', now())"
    )
}

impl Writer {
    /// Starts writing to `url` with a pause of `pause` between statements.
    pub fn start(url: String, pause: Duration) -> Writer {
        Writer::with(url, pause, statement, late_token)
    }

    /// Starts writing to the flow tables (the merged table's driving and joined tables).
    #[allow(dead_code)]
    pub fn flows(url: String, pause: Duration) -> Writer {
        Writer::with(url, pause, flow_statement, late_flow)
    }

    fn with(url: String, pause: Duration, statement: fn(u64) -> String, late_tx: fn(u64) -> String) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let (s, o) = (stop.clone(), ops.clone());
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let (client, conn) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                let (late, conn2) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
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
                        late.batch_execute(&late_tx(n)).await.map_err(|e| format!("late tx: {e}"))?;
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
        Writer { stop, ops, handle: Some(handle) }
    }

    /// Lets the writer run for at least `min`, and on until it has made more than `ops` writes,
    /// for at most `max`: a loaded machine writes slower, and the caller's count assertion
    /// should be about the writer doing enough, not about the machine's speed.
    pub fn run_for(&self, min: Duration, ops: u64, max: Duration) {
        let started = std::time::Instant::now();
        std::thread::sleep(min);
        while self.ops.load(Ordering::SeqCst) <= ops && started.elapsed() < max && !self.handle_finished() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A writer whose statement failed has ended: waiting for more writes is pointless.
    fn handle_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
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
