//! Plan entries are known by name, not by position: a plan edited while a migration follows
//! (entries reordered, added, removed) carries on with every key reaching the right table, and
//! an entry whose copied rows it would redefine is refused with exit 2, naming it.

use std::time::{Duration, Instant};

use crate::support::{replace_once, run, writer::Writer, Oauth};

/// The plan's `[[table]]` entries, each with its text, in file order; and the text before them.
fn split_entries(text: &str) -> (String, Vec<String>) {
    let mut parts = text.split("\n[[table]]\n");
    let head = parts.next().unwrap().to_string();
    let entries: Vec<String> = parts.map(|p| format!("\n[[table]]\n{p}")).collect();
    assert_eq!(entries.len(), 7, "the OAuth plan has 7 entries");
    (head, entries)
}

fn entry<'a>(entries: &'a [String], target: &str) -> &'a String {
    entries
        .iter()
        .find(|e| e.contains(&format!("target = \"{target}\"")))
        .unwrap_or_else(|| panic!("no entry {target}"))
}

/// One write to every planned table, so every entry has keys to route.
fn write_every_table(s: &Oauth, n: u32) {
    s.blue.psql(&format!(
        "UPDATE hydra_client SET client_name = 'touched {n}' WHERE pk = 1 + {n} % 5;
         UPDATE hydra_oauth2_access SET active = NOT active WHERE signature IN (SELECT signature FROM hydra_oauth2_access ORDER BY signature LIMIT 3 OFFSET {n});
         UPDATE hydra_oauth2_refresh SET subject = 'moved {n}' WHERE signature IN (SELECT signature FROM hydra_oauth2_refresh ORDER BY signature LIMIT 3 OFFSET {n});
         DELETE FROM hydra_oauth2_refresh WHERE signature = (SELECT signature FROM hydra_oauth2_refresh ORDER BY signature DESC LIMIT 1);
         UPDATE hydra_oauth2_consent_session SET granted_scope = 'openid e{n}' WHERE (subject, client_id) IN (SELECT subject, client_id FROM hydra_oauth2_consent_session ORDER BY 1, 2 LIMIT 2 OFFSET {n});
         INSERT INTO hydra_oauth2_revocation (request_id, revoked_at, reason) VALUES ('entries-{n}', now(), 'entries test');
         INSERT INTO hydra_jwk_set (sid, kid, keydata) VALUES ('sid-{n}', 'kid-{n}', 'key {n}');
         INSERT INTO app_events (kind, payload) VALUES ('entries', 'entries {n}');"
    ));
}

/// Copies with `method`, follows, then: restarts with the entries reversed and `app_events`
/// added (it was missing from the first plan), under writes to every table; then restarts with
/// `oauth2_revocations` removed. Green must equal transform(blue) for every table planned.
fn reordered_added_and_removed(method: &str) {
    let s = Oauth::new(5_000);
    let text = replace_once(&Oauth::plan_text(), "method = \"auto\"", &format!("method = \"{method}\""));
    let text = replace_once(&text, "workers = 2\nchunk_rows = 50000", "workers = 2\nchunk_rows = 2000");
    let (head, entries) = split_entries(&text);
    let events = entry(&entries, "public.app_events").clone();
    let first: String = entries.iter().filter(|e| **e != events).cloned().collect();
    let plan1 = s.write_plan(&format!("{head}{first}"));
    let mut child = s.spawn(&["copy", plan1.to_str().unwrap()]);
    s.wait_phase("following");
    let writer = Writer::start(s.blue.url(), Duration::from_millis(2));
    for n in 0..3 {
        write_every_table(&s, n);
    }
    std::thread::sleep(Duration::from_millis(700));
    // Killed with keys captured and not yet applied, most likely; trigger capture also leaves
    // its per-entry trigger functions on blue.
    child.kill().unwrap();
    child.wait().unwrap();

    let mut reversed: Vec<String> = entries.clone();
    reversed.reverse();
    let plan2 = s.write_plan(&format!("{head}{}", reversed.concat()));
    let mut child = s.spawn(&["copy", plan2.to_str().unwrap()]);
    // The phase was `following` already: wait for the added entry to be copied.
    let started = Instant::now();
    while s.green.psql(&s.sql("SELECT state FROM bluegreen_oauth_v2.tables WHERE tbl = 'public.app_events'")) != "done"
    {
        assert!(started.elapsed() < Duration::from_secs(90), "the entry added to a following plan was not copied");
        std::thread::sleep(Duration::from_millis(100));
    }
    s.wait_phase("following");
    for n in 3..6 {
        write_every_table(&s, n);
    }
    writer.stop();
    child.kill().unwrap();
    child.wait().unwrap();
    let r = run(&mut s.migrate(&["copy", plan2.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    s.assert_green_equals_blue();

    // Removed: its capture goes from blue and its state from green; the others carry on.
    let revocations = entry(&entries, "public.oauth2_revocations");
    let fewer: String = reversed.iter().filter(|e| *e != revocations).cloned().collect();
    let plan3 = s.write_plan(&format!("{head}{fewer}"));
    let r = run(&mut s.migrate(&["copy", plan3.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    let left = s.green.psql(&s.sql(
        "SELECT (SELECT count(*) FROM bluegreen_oauth_v2.tables WHERE tbl = 'public.oauth2_revocations') \
              + (SELECT count(*) FROM bluegreen_oauth_v2.chunks WHERE tbl = 'public.oauth2_revocations')",
    ));
    assert_eq!(left, "0", "state of the removed entry is still on green");
    let captured = if method == "trigger" {
        s.blue.psql(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'hydra_oauth2_revocation'::regclass AND NOT tgisinternal",
        )
    } else {
        s.blue.psql(&s.sql(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'bluegreen_oauth_v2' AND tablename = 'hydra_oauth2_revocation'",
        ))
    };
    assert_eq!(captured, "0", "capture of the removed entry is still on blue ({method})");
    write_every_table(&s, 9);
    let r = run(&mut s.migrate(&["copy", plan3.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    for (b, g) in crate::support::OAUTH_PAIRS.iter().filter(|(_, g)| !g.contains("oauth2_revocations")) {
        assert_eq!(crate::support::fingerprint(&s.blue, b), crate::support::fingerprint(&s.green, g), "{g}");
    }
}

#[test]
fn reordered_added_and_removed_entries_route_keys_by_name_trigger() {
    reordered_added_and_removed("trigger");
}

#[test]
fn reordered_added_and_removed_entries_route_keys_by_name_logical() {
    reordered_added_and_removed("logical");
}

#[test]
fn changed_expression_of_a_copied_entry_is_refused() {
    let s = Oauth::new(2_000);
    let plan = s.write_plan(&Oauth::plan_text());
    let r = run(&mut s.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    let changed = s.write_plan(&replace_once(
        &Oauth::plan_text(),
        "revoked_at = \"revoked_at AT TIME ZONE 'UTC'\"\nreason = \"reason\"",
        "revoked_at = \"revoked_at AT TIME ZONE 'UTC'\"\nreason = \"upper(reason)\"",
    ));
    for command in ["copy", "verify", "cutover"] {
        let r = run(&mut s.migrate(&[command, changed.to_str().unwrap()]));
        assert_eq!(r.code, 2, "{command}: {r:?}");
        assert!(
            r.stderr.contains(
                "table[5] (public.hydra_oauth2_revocation -> public.oauth2_revocations) changed since `copy` began"
            ) && r.stderr.contains("column reason was `reason` and is now `upper(reason)`"),
            "{command}: the refusal does not name the entry and the change:\n{r:?}"
        );
    }
    // A filter too; and nothing was touched: the unchanged plan still verifies equal.
    let refiltered = s.write_plan(&replace_once(&Oauth::plan_text(), "interval '90 days'", "interval '30 days'"));
    let r = run(&mut s.migrate(&["copy", refiltered.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("table[2] (public.hydra_oauth2_access -> public.oauth2_access_tokens) changed"), "{r:?}");
    assert!(r.stderr.contains("filter was") && r.stderr.contains("30 days"), "{r:?}");
    let r = run(&mut s.migrate(&["verify", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
}
