//! The way back after a switch (issue 15, first part): each source column's reverse mapping,
//! derived from the forward one where it undoes itself or declared in `[table.reverse]`, shown
//! by `plan`, and proved on blue's rows by `verify --reverse`, which names the key and column
//! of every row that would not come back unchanged.

use crate::support::{run, Custom};

const BLUE: &str = "CREATE TABLE accounts (id int PRIMARY KEY, email text NOT NULL, created timestamp NOT NULL,
      scope text, balance int NOT NULL, legacy text);
    INSERT INTO accounts SELECT g, 'u' || g || '@x', '2026-01-01'::timestamp + g * interval '1 hour',
      CASE WHEN g = 7 THEN 'openid  offline' ELSE 'openid offline' END, g * 2, 'old ' || g
    FROM generate_series(1, 500) g;";
const GREEN: &str = "CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL, created_at timestamptz NOT NULL,
      scopes text[], balance_x3 int NOT NULL);";

fn entry(balance: &str, reverse: &str, drop: &str) -> String {
    format!(
        "[[table]]\nsource = \"public.accounts\"\ntarget = \"public.users\"\nkey = [\"id\"]\ndrop = [{drop}]\n\
         [table.columns]\nid = \"id\"\nemail = \"email\"\ncreated_at = \"created AT TIME ZONE 'UTC'\"\n\
         scopes = \"array_remove(string_to_array(scope, ' '), '')\"\nbalance_x3 = \"{balance}\"\n\
         [table.reverse]\n{reverse}\n"
    )
}

#[test]
fn the_way_back_is_derived_declared_and_proved_on_blues_rows() {
    let c = Custom::new(BLUE, GREEN);
    // Exact: balance doubled on green and halved back; scope not carried back (nullable).
    let exact = c.plan("trigger", "workers = 1", &entry("balance * 3", "balance = \"balance_x3 / 3\"", "\"legacy\""));
    let p = exact.to_str().unwrap();
    let r = run(&mut c.migrate(&["plan", p]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains(
            "reverse   id <- \"id\"::integer; email <- \"email\"::text; created <- (\"created_at\" AT TIME ZONE 'UTC')::timestamp without time zone; scope not carried back; balance <- balance_x3 / 3 (declared); legacy not carried back"
        ),
        "{r:?}"
    );
    assert!(r.stdout.contains("ok    way back on blue's rows: 1 table(s) come back unchanged"), "{r:?}");
    let r = run(&mut c.migrate(&["verify", p, "--reverse"]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("reverse public.users: every row comes back (4 column(s) carried back)"), "{r:?}");

    // Lossy: integer division that truncates, and a scope list that loses a doubled space.
    let lossy = c.plan(
        "trigger",
        "workers = 1",
        &entry(
            "balance * 3 / 4",
            "balance = \"balance_x3 * 4 / 3\"\nscope = \"array_to_string(scopes, ' ')\"",
            "\"legacy\"",
        ),
    );
    let p = lossy.to_str().unwrap();
    let r = run(&mut c.migrate(&["plan", p]));
    assert_eq!(r.code, 0, "a lossy way back does not stop the forward migration: {r:?}");
    assert!(
        r.stdout.contains("FAIL  way back on blue's rows") && r.stdout.contains("would change: public.users: key ("),
        "{r:?}"
    );
    let r = run(&mut c.migrate(&["verify", p, "--reverse"]));
    assert_eq!(r.code, 1, "{r:?}");
    // balance 2 → 6 / 4 = 1 → 4 / 3 = 1: not 2; the row with a doubled space in its scope.
    assert!(r.stdout.contains("key (1) column balance: blue `2` comes back `1`"), "{r:?}");
    assert!(r.stdout.contains("key (7) column scope: blue `openid  offline` comes back `openid offline`"), "{r:?}");
    let r = run(&mut c.migrate(&["verify", p, "--reverse", "--table", "nope"]));
    assert_eq!(r.code, 2, "a --table naming no entry: {r:?}");
    let json = run(&mut c.migrate(&["verify", p, "--reverse", "--format", "json"]));
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["way_back"], false, "{json:?}");

    // A NOT NULL column green does not carry: no way back, said why.
    let none = c.plan(
        "trigger",
        "workers = 1",
        &entry("balance", "", "\"legacy\", \"email\"").replace("email = \"email\"\n", "email = \"'x' || id\"\n"),
    );
    let p = none.to_str().unwrap();
    let r = run(&mut c.migrate(&["verify", p, "--reverse"]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("reverse public.users: no way back: public.accounts.email is NOT NULL without a default"),
        "{r:?}"
    );
    // A reverse expression over something green does not have is a plan problem.
    let bad = c.plan("trigger", "workers = 1", &entry("balance", "balance = \"no_such_column\"", "\"legacy\""));
    let r = run(&mut c.migrate(&["plan", bad.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("reverse expression `no_such_column` is not valid over a green row"), "{r:?}");
}
