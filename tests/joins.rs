//! Several sources per target row: the OAuth fixture's four v1 flow tables merged by joins into
//! one v2 flow row per login (a joined table two hops away, a non-unique join with a pick), and
//! the login split into a second table. A writer changes every joined table (inserts, deletes,
//! join-column updates, rows leaving and entering the join, cascading key changes, a pick
//! winner replaced or tied, a transaction committing late) through copy, a SIGKILL, follow and a
//! PgBouncer cutover, for both capture methods; green is proved equal to transform(blue) by an
//! independent query, and green's foreign keys hold.

use std::{path::PathBuf, time::Duration};

use crate::{
    capture::{caught_up, wait_for},
    support::{fingerprint, replace_once, root, run, writer::Writer, Oauth},
};

/// The flows plan, as this scenario's plan (its name and state schema), with `method`.
fn flows_plan(s: &Oauth, method: &str, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(root().join("plans/oauth-flows.toml")).unwrap();
    let text = replace_once(&text, "name = \"oauth-flows\"", "name = \"oauth-v2\"");
    let text = replace_once(&text, "chunk_rows = 50000", "chunk_rows = 300");
    let text = replace_once(&text, "method = \"auto\"", &format!("method = \"{method}\""));
    s.write_plan(&format!("{text}\n{extra}"))
}

/// Blue's flows as v2 has them, written by hand: the latest consent of each login by
/// `DISTINCT ON`, ties to the smaller challenge.
const BLUE_FLOWS: &str = "SELECT l.challenge, '5b2a6a2e-5b1c-4b6e-9a40-2f7e4f1d0c11'::uuid, \
      array_remove(string_to_array(coalesce(l.requested_scope, ''), ' '), ''), l.subject, l.client_id, \
      l.requested_at AT TIME ZONE 'UTC', coalesce(lh.remember, false), NULLIF(lh.error, '{}'), \
      lh.handled_at AT TIME ZONE 'UTC', c.challenge, array_remove(string_to_array(c.requested_scope, ' '), ''), \
      array_remove(string_to_array(ch.granted_scope, ' '), ''), ch.remember, NULLIF(ch.error, '{}'), \
      ch.handled_at AT TIME ZONE 'UTC', \
      CASE WHEN ch.challenge IS NOT NULL THEN 6 WHEN c.challenge IS NOT NULL THEN 4 WHEN lh.challenge IS NOT NULL THEN 2 ELSE 1 END \
    FROM hydra_oauth2_authentication_request l \
    LEFT JOIN hydra_oauth2_authentication_request_handled lh ON lh.challenge = l.challenge \
    LEFT JOIN (SELECT DISTINCT ON (login_challenge) * FROM hydra_oauth2_consent_request \
               WHERE login_challenge IS NOT NULL ORDER BY login_challenge, requested_at DESC, challenge) c \
      ON c.login_challenge = l.challenge \
    LEFT JOIN hydra_oauth2_consent_request_handled ch ON ch.challenge = c.challenge";
const GREEN_FLOWS: &str = "SELECT login_challenge, nid, requested_scope, subject, client_id, requested_at, \
      login_remember, login_error, login_handled_at, consent_challenge_id, consent_requested_scope, \
      consent_granted_scope, consent_remember, consent_error, consent_handled_at, state FROM hydra_oauth2_flow";
const BLUE_CONTEXT: &str =
    "SELECT challenge, request_url, coalesce(context, '{}')::jsonb FROM hydra_oauth2_authentication_request";
const GREEN_CONTEXT: &str = "SELECT login_challenge, request_url, context FROM hydra_oauth2_flow_context";

/// The rows of `query` on blue and on green that the other side lacks (a few of each).
fn difference(s: &Oauth, blue: &str, green: &str) -> String {
    let rows = |db: &crate::support::TestDb, q: &str| -> std::collections::BTreeSet<String> {
        db.psql(&format!("SELECT r::text FROM ({q}) r")).lines().map(str::to_string).collect()
    };
    let (b, g) = (rows(&s.blue, blue), rows(&s.green, green));
    let only_blue: Vec<&String> = b.difference(&g).take(5).collect();
    let only_green: Vec<&String> = g.difference(&b).take(5).collect();
    format!("only on blue: {only_blue:#?}\nonly on green: {only_green:#?}")
}

fn assert_flows_equal(s: &Oauth, when: &str) {
    if fingerprint(&s.blue, BLUE_FLOWS) != fingerprint(&s.green, GREEN_FLOWS) {
        panic!("flows differ {when}\n{}", difference(s, BLUE_FLOWS, GREEN_FLOWS));
    }
    assert_eq!(fingerprint(&s.blue, BLUE_CONTEXT), fingerprint(&s.green, GREEN_CONTEXT), "flow contexts {when}");
    let orphans = s.green.psql(
        "SELECT count(*) FROM hydra_oauth2_flow_context x \
         WHERE NOT EXISTS (SELECT 1 FROM hydra_oauth2_flow f WHERE f.login_challenge = x.login_challenge)",
    );
    assert_eq!(orphans, "0", "flow contexts without their flow {when}");
}

fn merged_table_under_writes(method: &str) {
    let s = Oauth::new(20_000);
    if method == "logical" {
        // Consents link to logins by a column outside their key: plan asks for this.
        s.blue.psql("ALTER TABLE hydra_oauth2_consent_request REPLICA IDENTITY FULL");
    }
    let (bouncer, section) = s.bouncer();
    let plan = flows_plan(&s, method, &section);
    let p = plan.to_str().unwrap();
    let r = run(&mut s.migrate(&["plan", p]));
    assert_eq!(r.code, 0, "{r:?}");

    let writer = Writer::flows(s.blue.url(), Duration::from_millis(2));
    // Killed after a chunk commits, then resumed: the copy goes on under the writes.
    let r = run(s.migrate(&["copy", p, "--no-follow"]).env("MIGRATE_FAULT", "copy.chunk-done"));
    assert_eq!(r.code, 137, "the fault point was not reached\n{r:?}");
    let r = run(&mut s.migrate(&["copy", p, "--no-follow"]));
    assert_eq!(r.code, 0, "rerun after the crash\n{r:?}");
    // Killed while following, right after storing (logical) or applying (trigger) keys.
    let point = if method == "logical" { "capture.stored" } else { "apply.committed" };
    let mut killed = s.background(&["copy", p]).env("MIGRATE_FAULT", point).spawn().unwrap();
    let code = killed.wait().unwrap().code();
    assert_eq!(code, Some(137), "the follower was not killed at {point}");
    let mut copy = s.spawn(&["copy", p]);
    writer.run_for(Duration::from_secs(4), 500, Duration::from_secs(120));
    let ops = writer.stop();
    assert!(ops > 500, "the writer made only {ops} writes");
    // The writer's later picks can move or delete every consent it made the latest or tied,
    // re-key or delete every login it re-keyed, and turn every login error back: one more of
    // each, so the checks below never depend on them. The tie is on another login, with a
    // consent later than any: the smaller key wins it.
    s.blue.psql(
        "INSERT INTO hydra_oauth2_consent_request (challenge, login_challenge, subject, client_id, requested_scope, requested_at) \
         SELECT 'wc-final', challenge, 'wuser', 'client-000004', 'openid final', now() AT TIME ZONE 'UTC' + interval '2 days' \
         FROM hydra_oauth2_authentication_request ORDER BY challenge LIMIT 1; \
         INSERT INTO hydra_oauth2_consent_request (challenge, login_challenge, subject, client_id, requested_scope, requested_at) \
         SELECT 'zz-final', challenge, 'wuser', 'client-000004', 'openid final', now() AT TIME ZONE 'UTC' + interval '3 days' \
         FROM hydra_oauth2_authentication_request ORDER BY challenge LIMIT 1 OFFSET 1; \
         INSERT INTO hydra_oauth2_consent_request (challenge, login_challenge, subject, client_id, requested_scope, requested_at) \
         SELECT 'a-tie-final', login_challenge, subject, client_id, 'tie', requested_at FROM hydra_oauth2_consent_request \
         WHERE challenge = 'zz-final'; \
         UPDATE hydra_oauth2_authentication_request SET challenge = challenge || '-kfinal' WHERE challenge = \
         (SELECT max(challenge) FROM hydra_oauth2_authentication_request WHERE challenge LIKE 'login-%'); \
         UPDATE hydra_oauth2_authentication_request_handled SET error = '{\"e\": 0}' \
         WHERE challenge = (SELECT max(challenge) FROM hydra_oauth2_authentication_request_handled)",
    );
    // A status the follower reported before the last writes would say it caught up.
    std::thread::sleep(Duration::from_secs(2));
    wait_for(&s, &plan, &mut copy, Duration::from_secs(120), "the follower to catch up", caught_up);
    assert_flows_equal(&s, "while following");
    // The writes reached the merged rows through every joined table.
    for (what, sql) in [
        ("new logins", "SELECT count(*) > 0 FROM hydra_oauth2_flow WHERE login_challenge LIKE 'wl-%'"),
        ("new latest consents", "SELECT count(*) > 0 FROM hydra_oauth2_flow WHERE consent_challenge_id LIKE 'wc-%'"),
        ("ties won by the key", "SELECT count(*) > 0 FROM hydra_oauth2_flow WHERE consent_challenge_id LIKE 'a-tie-%'"),
        ("re-keyed logins", "SELECT count(*) > 0 FROM hydra_oauth2_flow WHERE login_challenge LIKE '%-k%'"),
        ("login errors", "SELECT count(*) > 0 FROM hydra_oauth2_flow WHERE login_error LIKE '{\"e\"%'"),
        (
            "late transactions",
            "SELECT count(*) > 0 FROM hydra_oauth2_flow WHERE login_challenge LIKE 'late-%' AND state = 6",
        ),
    ] {
        assert_eq!(s.green.psql(sql), "t", "{what} did not reach green");
    }
    let r = run(&mut s.migrate(&["verify", p]));
    assert_eq!(r.code, 0, "{r:?}");

    // A write after verify, to each joined table, goes through the cutover's catch-up.
    s.blue.psql(
        "UPDATE hydra_oauth2_consent_request_handled SET granted_scope = 'after verify' \
           WHERE challenge = (SELECT consent_challenge_id FROM (SELECT DISTINCT ON (login_challenge) login_challenge, challenge AS consent_challenge_id \
             FROM hydra_oauth2_consent_request WHERE login_challenge IS NOT NULL ORDER BY login_challenge, requested_at DESC, challenge) w \
             JOIN hydra_oauth2_consent_request_handled h ON h.challenge = w.consent_challenge_id LIMIT 1)",
    );
    // The writer's random picks may have deleted or re-keyed any fixed login (login-7 once):
    // the handled login deleted here is picked after it stopped, and was handled on green.
    let handled =
        s.blue.psql("SELECT challenge FROM hydra_oauth2_authentication_request_handled ORDER BY challenge LIMIT 1");
    assert_eq!(
        s.green.psql(&format!(
            "SELECT login_handled_at IS NOT NULL FROM hydra_oauth2_flow WHERE login_challenge = '{handled}'"
        )),
        "t",
        "{handled} was not handled on green before the delete"
    );
    s.blue.psql(&format!("DELETE FROM hydra_oauth2_authentication_request_handled WHERE challenge = '{handled}'"));
    let r = run(&mut s.migrate(&["cutover", p]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("switched"), "{r:?}");
    let st = copy.wait().unwrap();
    assert!(st.success(), "the follower after the switch: {st}");
    assert!(std::fs::read_to_string(&bouncer.databases_file).unwrap().contains(&s.green.name));
    assert_flows_equal(&s, "after the cutover");
    assert_eq!(
        s.green.psql("SELECT count(*) FROM hydra_oauth2_flow WHERE consent_granted_scope = '{after,verify}'"),
        "1"
    );
    // The handled login deleted: its columns are gone from its flow. (Its state follows
    // whichever consent the writer's random picks left it, 4 or 6; the flows compare equal.)
    assert_eq!(
        s.green.psql(&format!(
            "SELECT login_handled_at IS NULL AND NOT login_remember FROM hydra_oauth2_flow WHERE login_challenge = '{handled}'"
        )),
        "t",
        "{handled}'s flow after its handled row was deleted"
    );
}

#[test]
fn merged_table_under_writes_logical() {
    merged_table_under_writes("logical");
}

#[test]
fn merged_table_under_writes_trigger() {
    merged_table_under_writes("trigger");
}

/// What `plan` says about joins: the proof per join, what blue needs for logical capture, a
/// join left open to several rows, and an expression reading a table that is not joined.
#[test]
fn plan_proves_each_join_and_names_what_it_cannot() {
    let s = Oauth::new(2_000);
    let plan = flows_plan(&s, "logical", "");
    let p = plan.to_str().unwrap();
    let r = run(&mut s.migrate(&["plan", p]));
    assert_eq!(r.code, 1, "logical capture needs the consent's link column in its replica identity: {r:?}");
    assert!(r.stdout.contains("hydra_oauth2_consent_request") && r.stdout.contains("REPLICA IDENTITY FULL"), "{r:?}");
    assert!(!r.stdout.contains("consent_request_handled: its replica identity"), "{r:?}");
    // Trigger capture records old rows itself.
    let r = run(&mut s.migrate(&["plan", flows_plan(&s, "trigger", "").to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("at most one row: unique (challenge) = on"), "{r:?}");
    assert!(r.stdout.contains("one row chosen: ORDER BY c.requested_at DESC, ties broken by (challenge)"), "{r:?}");
    s.blue.psql("ALTER TABLE hydra_oauth2_consent_request REPLICA IDENTITY FULL");
    let r = run(&mut s.migrate(&["plan", p]));
    assert_eq!(r.code, 0, "{r:?}");
    // A few rows as green would receive them, to see what the expressions make of real data
    // (v1's '{}' for "no error" arrives as NULL).
    let r = run(&mut s.migrate(&["plan", p, "--rows", "3"]));
    assert_eq!(r.code, 0, "{r:?}");
    let shown = r.stdout.split("rows as green would receive them").nth(1).unwrap_or_default();
    assert!(
        shown.contains("public.hydra_oauth2_flow: 3 row(s)")
            && shown.contains("public.hydra_oauth2_flow_context: 3 row(s)"),
        "{r:?}"
    );
    assert_eq!(shown.matches("nid                      5b2a6a2e-5b1c-4b6e-9a40-2f7e4f1d0c11").count(), 3, "{r:?}");
    assert!(shown.contains("login_error              NULL") && !shown.contains("login_error              {}"), "{r:?}");
    let json = run(&mut s.migrate(&["plan", p, "--rows", "2", "--format", "json"]));
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["sample_rows"][0]["rows"].as_array().map(Vec::len), Some(2), "{json:?}");

    // Without the pick, nothing says which of a login's consents wins.
    let text = std::fs::read_to_string(&plan).unwrap();
    let open = s.write_plan(&replace_once(&text, "pick = \"c.requested_at DESC\"\n", ""));
    let r = run(&mut s.migrate(&["plan", open.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("join c (public.hydra_oauth2_consent_request) on (login_challenge) can match several rows"),
        "{r:?}"
    );
    assert!(r.stdout.contains("pick ="), "{r:?}");

    // A subquery over a table that is not joined: its writes would never reach green.
    let hidden = s.write_plan(&replace_once(
        &text,
        "consent_remember = \"ch.remember\"",
        "consent_remember = \"(SELECT bool_or(s.remember) FROM public.hydra_oauth2_consent_session s WHERE s.subject = l.subject)\"",
    ));
    let r = run(&mut s.migrate(&["plan", hidden.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("reads public.hydra_oauth2_consent_session in a subquery: its changes are not captured"),
        "{r:?}"
    );
    // A subquery over a joined table reads rows the join does not link: not traced either.
    let sibling = s.write_plan(&replace_once(
        &text,
        "consent_remember = \"ch.remember\"",
        "consent_remember = \"(SELECT bool_or(o.remember) FROM public.hydra_oauth2_consent_request_handled o WHERE o.granted_scope = ch.granted_scope)\"",
    ));
    let r = run(&mut s.migrate(&["plan", sibling.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("reads public.hydra_oauth2_consent_request_handled in a subquery: rows other than those"),
        "{r:?}"
    );
    // An unqualified name the joined table has too would mean its own column inside the pick.
    let shadowed = s.write_plan(&replace_once(
        &text,
        "on = { login_challenge = \"l.challenge\" }",
        "on = { login_challenge = \"requested_scope\" }",
    ));
    let r = run(&mut s.migrate(&["plan", shadowed.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains(
            "`on` expression `requested_scope` of join c names something public.hydra_oauth2_consent_request has too"
        ),
        "{r:?}"
    );
    // The entry that did not resolve says nothing about its source's columns through the other.
    assert!(!r.stdout.contains("reaches no target column"), "{r:?}");
}

/// A joined table rewritten on blue (`ALTER COLUMN … TYPE … USING`): no row change follows,
/// under trigger capture only the catalog tells. Following stops, naming the joined table, and
/// a rerun does not resume past it; TRUNCATE of a joined table stops following too.
#[test]
fn a_joined_table_changed_behind_capture_stops_following() {
    let s = Oauth::new(2_000);
    let plan = flows_plan(&s, "trigger", "");
    let p = plan.to_str().unwrap();
    let r = run(&mut s.migrate(&["copy", p, "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    s.blue.psql(
        "ALTER TABLE hydra_oauth2_consent_request_handled ALTER COLUMN granted_scope TYPE varchar(500) \
         USING upper(granted_scope)",
    );
    let r = run(&mut s.migrate(&["copy", p, "--no-follow"]));
    assert_eq!(r.code, 3, "following went on over a rewritten joined table:\n{r:?}");
    assert!(
        r.stderr.contains("joined table: the columns of public.hydra_oauth2_consent_request_handled changed on blue"),
        "{r:?}"
    );
    let r = run(&mut s.migrate(&["copy", p, "--no-follow"]));
    assert_eq!(r.code, 2, "{r:?}");

    let s = Oauth::new(2_000);
    s.blue.psql("ALTER TABLE hydra_oauth2_consent_request REPLICA IDENTITY FULL");
    let plan = flows_plan(&s, "logical", "");
    let p = plan.to_str().unwrap();
    let r = run(&mut s.migrate(&["copy", p, "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    s.blue.psql("TRUNCATE hydra_oauth2_consent_request_handled");
    let r = run(&mut s.migrate(&["copy", p, "--no-follow"]));
    assert_ne!(r.code, 0, "following went on over a truncated joined table:\n{r:?}");
    assert!(r.stderr.contains("hydra_oauth2_consent_request_handled"), "{r:?}");
}

/// Blue changes while each apply holds what it re-read and has not committed it on green (every
/// apply stalls 200 ms there): writes in that window, to every joined table, must still reach
/// green, for both capture methods.
#[test]
fn writes_between_a_reread_and_its_commit_reach_green() {
    for method in ["logical", "trigger"] {
        let s = Oauth::new(5_000);
        s.blue.psql("ALTER TABLE hydra_oauth2_consent_request REPLICA IDENTITY FULL");
        let plan = flows_plan(&s, method, "");
        let p = plan.to_str().unwrap();
        let r = run(&mut s.migrate(&["copy", p, "--no-follow"]));
        assert_eq!(r.code, 0, "{r:?}");
        let mut copy = s.background(&["copy", p]).env("MIGRATE_FAULT", "apply.reread:sleep=200").spawn().unwrap();
        let writer = Writer::flows(s.blue.url(), Duration::from_millis(1));
        writer.run_for(Duration::from_secs(6), 1000, Duration::from_secs(120));
        let ops = writer.stop();
        assert!(ops > 1000, "the writer made only {ops} writes");
        std::thread::sleep(Duration::from_secs(2));
        wait_for(&s, &plan, &mut copy, Duration::from_secs(120), "the follower to catch up", caught_up);
        assert_flows_equal(&s, &format!("with re-reads held open ({method})"));
        let _ = std::process::Command::new("kill").args(["-INT", &copy.id().to_string()]).status();
        assert!(copy.wait().unwrap().success());
    }
}
