//! Schemas as real upgrades change them: one source table feeding several targets (a table
//! split in two), under concurrent writes, for both capture methods; green proved equal to
//! transform(blue) with independent queries.

use std::time::{Duration, Instant};

use crate::support::{fingerprint, run, Custom};

/// Blue's `users` is split on green into `accounts` (login data) and `profiles` (the rest).
const BLUE: &str = "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL, name text, bio text);
    INSERT INTO users SELECT g, 'User' || g || '@Example.com', 'name ' || g,
      CASE WHEN g % 50 = 0 THEN repeat('long bio ', 3000) ELSE 'bio ' || g END
    FROM generate_series(1, 20000) g;";
const GREEN: &str = "CREATE TABLE accounts (id bigint PRIMARY KEY, email text NOT NULL UNIQUE);
    CREATE TABLE profiles (user_id bigint PRIMARY KEY, name text, bio text);";
const SPLIT: &str = "[[table]]\nsource = \"public.users\"\ntarget = \"public.accounts\"\nkey = [\"id\"]\n\
    [table.columns]\nid = \"id\"\nemail = \"lower(email)\"\n\n\
    [[table]]\nsource = \"public.users\"\ntarget = \"public.profiles\"\nkey = [\"id\"]\n\
    [table.columns]\nuser_id = \"id\"\nname = \"upper(name)\"\nbio = \"bio\"\n";

/// Inserts, updates (one side's columns, the other's, TOASTed values left unchanged and
/// rewritten), key changes and deletes, each in its own transaction.
const WRITES: &str = "DO $$ BEGIN
    FOR i IN 1..2500 LOOP
      CASE i % 6
        WHEN 0 THEN INSERT INTO users VALUES (100000 + i, 'New' || i || '@Example.com', 'new ' || i,
                                               CASE WHEN i % 12 = 0 THEN repeat('new bio ', 3000) END);
        WHEN 1 THEN UPDATE users SET email = 'Moved' || i || '@Example.com' WHERE id = i * 7;
        WHEN 2 THEN UPDATE users SET name = 'renamed ' || i WHERE id = i * 7 + 1;
        WHEN 3 THEN UPDATE users SET id = id + 200000 WHERE id = i * 7 + 2;
        WHEN 4 THEN DELETE FROM users WHERE id = i * 7 + 3;
        ELSE UPDATE users SET bio = CASE WHEN i % 4 = 1 THEN repeat('rewritten ', 3000) ELSE NULL END
             WHERE id = (i / 50) * 50 + 50;
      END CASE;
      COMMIT;
    END LOOP;
  END $$;";

/// Green equals transform(blue) for each (blue query, green query, what) by an independent
/// query on each side.
fn assert_transformed(c: &Custom, pairs: &[(&str, &str, &str)]) {
    for (blue, green, what) in pairs {
        assert_eq!(fingerprint(&c.blue, blue), fingerprint(&c.green, green), "{what} differs from transform(blue)");
    }
}

/// Runs `writes` on blue while `copy` copies and starts following; returns the follower once
/// the writes are done and it follows.
fn copy_under_writes(c: &Custom, plan: &std::path::Path, writes: &str) -> std::process::Child {
    let mut writer = c.blue.cluster.psql_cmd(&c.blue.name).args(["-c", writes]).spawn().unwrap();
    let follower = c.spawn(&["copy", plan.to_str().unwrap()], &[]);
    let started = Instant::now();
    while writer.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(300), "the writer did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(writer.wait().unwrap().success(), "every write on blue must succeed");
    c.wait_phase("following");
    follower
}

/// Stops the follower (SIGINT) and catches up with `copy --no-follow` (with `env`).
fn stop_and_catch_up(c: &Custom, plan: &std::path::Path, mut follower: std::process::Child, env: &[(&str, &str)]) {
    let _ = std::process::Command::new("kill").args(["-INT", &follower.id().to_string()]).status();
    assert!(follower.wait().unwrap().success());
    let mut cmd = c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let r = run(&mut cmd);
    assert_eq!(r.code, 0, "{r:?}");
}

fn one_source_two_targets(method: &str) {
    let c = Custom::new(BLUE, GREEN);
    let plan = c.plan(method, "chunk_rows = 2000", SPLIT);
    let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "a plan reading one source into two targets is sound: {r:?}");

    // Writes run through the copy and the follow.
    let follower = copy_under_writes(&c, &plan, WRITES);
    stop_and_catch_up(&c, &plan, follower, &[]);
    assert_transformed(
        &c,
        &[
            ("SELECT id::bigint, lower(email) FROM users", "SELECT id, email FROM accounts", "accounts"),
            ("SELECT id::bigint, upper(name), bio FROM users", "SELECT user_id, name, bio FROM profiles", "profiles"),
        ],
    );
    // The writes reached both targets: one changed on each side, a key change, a delete.
    assert_eq!(c.green.psql("SELECT count(*) FROM accounts WHERE email LIKE 'moved%'"), "417");
    assert_eq!(c.green.psql("SELECT count(*) FROM profiles WHERE name LIKE 'RENAMED%'"), "417");
    assert_eq!(c.green.psql("SELECT count(*) FROM profiles WHERE user_id > 200000"), "417");
    let r = run(&mut c.migrate(&["verify", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn one_source_feeds_two_targets_under_writes_logical() {
    one_source_two_targets("logical");
}

#[test]
fn one_source_feeds_two_targets_under_writes_trigger() {
    one_source_two_targets("trigger");
}

/// A view (or anything else that is not a table) as a source is refused naming the source, why,
/// and what to do; a missing source is named as the source too (it was reported under the
/// target's name).
#[test]
fn a_view_or_missing_source_is_named_as_the_source() {
    let c = Custom::new(
        "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL); \
         CREATE VIEW active_users AS SELECT id, email FROM users;",
        "CREATE TABLE accounts (id bigint PRIMARY KEY, email text NOT NULL);",
    );
    let entry = |source: &str| {
        format!(
            "[[table]]\nsource = \"{source}\"\ntarget = \"public.accounts\"\nkey = [\"id\"]\n\
             [table.columns]\nid = \"id\"\nemail = \"email\"\n"
        )
    };
    let plan = c.plan("logical", "", &entry("public.active_users"));
    let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains(
            "table[1].source [public.active_users]: source public.active_users is a view on blue, not a table"
        ),
        "{r:?}"
    );
    assert!(r.stdout.contains("capture follows tables"), "{r:?}");
    let plan = c.plan("logical", "", &entry("public.userz"));
    let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("table[1].source [public.userz]: source table public.userz does not exist on blue"),
        "{r:?}"
    );
    assert!(!r.stdout.contains("[public.accounts]"), "the target is not what is missing: {r:?}");
}

/// Expressions whose value changes from one read to the next (volatile functions, the clock)
/// are plan problems naming the column: copy, re-reads and verify would never agree. A value
/// derived from the row passes.
#[test]
fn volatile_expressions_are_named_by_plan() {
    let c = Custom::new(
        "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL); INSERT INTO items VALUES (1, 'a'); \
         CREATE SEQUENCE counter; \
         CREATE FUNCTION tag(text) RETURNS text LANGUAGE sql AS $$ SELECT 'tag:' || $1 $$;",
        "CREATE TABLE items (id bigint PRIMARY KEY, uid uuid NOT NULL, name text NOT NULL, seen timestamptz, n bigint);",
    );
    let entry = |uid: &str, name: &str, seen: &str, n: &str| {
        format!(
            "[[table]]\nsource = \"public.items\"\ntarget = \"public.items\"\nkey = [\"id\"]\n[table.columns]\nid = \"id\"\n\
             uid = \"{uid}\"\nname = \"{name}\"\nseen = \"{seen}\"\nn = \"{n}\"\n"
        )
    };
    let plan = c.plan(
        "logical",
        "",
        &entry("gen_random_uuid()", "name || random()::text", "clock_timestamp()", "nextval('counter')"),
    );
    let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    for (column, call) in
        [("uid", "gen_random_uuid()"), ("name", "random()"), ("seen", "clock_timestamp()"), ("n", "nextval()")]
    {
        let line = r.stdout.lines().find(|l| l.contains(&format!("table[1].columns.{column} "))).unwrap_or_default();
        assert!(line.contains(call) && line.contains("changes from one read to the next"), "{column}: {r:?}");
    }
    assert!(r.stdout.contains("md5(<key column>::text)::uuid"), "{r:?}");

    // The clock, as a function or a keyword, and a function of the user's left VOLATILE.
    let plan = c.plan(
        "logical",
        "",
        &entry("md5(id::text)::uuid", "tag(name)", "now()", "extract(epoch from current_timestamp)::bigint"),
    );
    let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(!r.stdout.contains("table[1].columns.uid "), "a UUID derived from the key is deterministic: {r:?}");
    assert!(r.stdout.contains("table[1].columns.name ") && r.stdout.contains("tag()"), "{r:?}");
    assert!(r.stdout.contains("declare it IMMUTABLE"), "{r:?}");
    assert!(r.stdout.contains("table[1].columns.seen ") && r.stdout.contains("now()"), "{r:?}");
    assert!(r.stdout.contains("table[1].columns.n ") && r.stdout.contains("current_timestamp"), "{r:?}");

    // Deterministic everywhere: sound.
    c.blue.psql("ALTER FUNCTION tag(text) IMMUTABLE");
    let plan = c.plan("logical", "", &entry("md5(id::text)::uuid", "tag(name)", "NULL::timestamptz", "id * 2"));
    let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
}

/// A tenant id added to green's primary key, set by a plan constant from the environment:
/// `plan` accepts the key (the rest of it maps onto blue's key), and copy and follow under
/// writes (updates, key changes, deletes) upsert on the whole green key.
fn constant_key_column(method: &str) {
    let nid = "5b2a6a2e-5b1c-4b6e-9a40-2f7e4f1d0c11";
    let c = Custom::new(
        "CREATE TABLE tok (sig text PRIMARY KEY, v int NOT NULL); \
         INSERT INTO tok SELECT 's' || g, g FROM generate_series(1, 5000) g;",
        "CREATE TABLE tok (nid uuid NOT NULL, sig text NOT NULL, v int NOT NULL, PRIMARY KEY (nid, sig));",
    );
    let tables =
        "[constants]\nnid = \"${SHAPES_NID}\"\nbump = \"5\"\n\n[[table]]\nsource = \"public.tok\"\nkey = [\"sig\"]\n\
                  [table.columns]\nnid = \":nid\"\nsig = \"sig\"\nv = \"v + :bump::int\"\n";
    let plan = c.plan(method, "", tables);
    let r = run(c.migrate(&["plan", plan.to_str().unwrap()]).env("SHAPES_NID", nid));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("key       sig -> sig (text), nid (constant)"), "{r:?}");
    assert!(r.stdout.contains(&format!("'{nid}'")), "the constant is shown as the literal it becomes: {r:?}");

    let follower = c.spawn(&["copy", plan.to_str().unwrap()], &[("SHAPES_NID", nid)]);
    c.wait_phase("following");
    c.blue.psql(
        "DO $$ BEGIN
           FOR i IN 1..600 LOOP
             CASE i % 3
               WHEN 0 THEN UPDATE tok SET v = v + 1000 WHERE sig = 's' || i;
               WHEN 1 THEN UPDATE tok SET sig = sig || '-moved' WHERE sig = 's' || i;
               ELSE DELETE FROM tok WHERE sig = 's' || i;
             END CASE;
             INSERT INTO tok VALUES ('new' || i, -i);
             COMMIT;
           END LOOP;
         END $$;",
    );
    stop_and_catch_up(&c, &plan, follower, &[("SHAPES_NID", nid)]);
    assert_transformed(
        &c,
        &[(&format!("SELECT '{nid}'::uuid, sig, v + 5 FROM tok"), "SELECT nid, sig, v FROM tok", "tok")],
    );
    assert_eq!(c.green.psql("SELECT count(*) FROM tok WHERE sig LIKE '%-moved'"), "200");
    let r = run(c.migrate(&["verify", plan.to_str().unwrap()]).env("SHAPES_NID", nid));
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn a_constant_key_column_from_the_environment_logical() {
    constant_key_column("logical");
}

#[test]
fn a_constant_key_column_from_the_environment_trigger() {
    constant_key_column("trigger");
}

/// Constants that are not there are named: an unknown `:name`, and an unset variable.
#[test]
fn unknown_constants_and_unset_variables_are_named() {
    let c =
        Custom::new("CREATE TABLE tok (sig text PRIMARY KEY);", "CREATE TABLE tok (nid uuid, sig text PRIMARY KEY);");
    let plan = c.plan(
        "logical",
        "",
        "[constants]\nnid = \"${SHAPES_UNSET_NID}\"\n\n[[table]]\nsource = \"public.tok\"\nkey = [\"sig\"]\n\
         [table.columns]\nnid = \":tenant\"\nsig = \"sig\"\n",
    );
    let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("constants.nid: environment variable `SHAPES_UNSET_NID` is not set"), "{r:?}");
    assert!(r.stderr.contains("table[1].columns.nid: `:tenant` is no constant of the plan"), "{r:?}");
}

/// A partitioned source (copied leaf by leaf, its changes captured under the parent's entry,
/// a partition created while following included) and a partitioned target (rows routed by
/// green, moving between partitions when their partition key changes), under writes.
fn partitioned_tables(method: &str) {
    let c = Custom::new(
        "CREATE TABLE ev (id int NOT NULL, at date NOT NULL, v text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE ev_2024 PARTITION OF ev FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         CREATE TABLE ev_2025 PARTITION OF ev FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         INSERT INTO ev SELECT g, date '2024-01-01' + (g % 700), 'v' || g FROM generate_series(1, 20000) g;
         CREATE TABLE log (id int PRIMARY KEY, kind int NOT NULL, msg text);
         ALTER TABLE log REPLICA IDENTITY FULL;
         INSERT INTO log SELECT g, g % 4, 'm' || g FROM generate_series(1, 10000) g;",
        "CREATE TABLE ev (id bigint NOT NULL, at date NOT NULL, v text, PRIMARY KEY (id, at));
         CREATE TABLE log (id bigint NOT NULL, kind int NOT NULL, msg text, PRIMARY KEY (id, kind)) PARTITION BY LIST (kind);
         CREATE TABLE log_0 PARTITION OF log FOR VALUES IN (0);
         CREATE TABLE log_1 PARTITION OF log FOR VALUES IN (1);
         CREATE TABLE log_rest PARTITION OF log DEFAULT;
         CREATE INDEX log_msg ON log (msg);",
    );
    let tables = "[[table]]\nsource = \"public.ev\"\nkey = [\"id\", \"at\"]\n[table.columns]\nid = \"id\"\nat = \"at\"\nv = \"v\"\n\n\
                  [[table]]\nsource = \"public.log\"\nkey = [\"id\", \"kind\"]\n[table.columns]\nid = \"id\"\nkind = \"kind\"\nmsg = \"upper(msg)\"\n";
    let plan = c.plan(method, "chunk_rows = 3000", tables);
    if method == "logical" {
        // Changes are decoded in the partitions: each one's replica identity must carry the key.
        c.blue.psql("ALTER TABLE ev_2025 REPLICA IDENTITY NOTHING");
        let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
        assert_eq!(r.code, 1, "{r:?}");
        assert!(r.stdout.contains("table[1].key [public.ev_2025]: replica identity of blue public.ev_2025"), "{r:?}");
        c.blue.psql("ALTER TABLE ev_2025 REPLICA IDENTITY DEFAULT");
    }
    let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    let writes = "DO $$ BEGIN
        FOR i IN 1..1500 LOOP
          CASE i % 5
            WHEN 0 THEN INSERT INTO ev VALUES (100000 + i, date '2024-06-01' + (i % 400), 'new');
            WHEN 1 THEN UPDATE ev SET v = 'changed ' || i WHERE id = i * 9;
            WHEN 2 THEN UPDATE ev SET at = at + 365 WHERE id = i * 9 + 1 AND at < date '2025-01-01';
            WHEN 3 THEN DELETE FROM ev WHERE id = i * 9 + 2;
            ELSE UPDATE log SET kind = (kind + 1) % 4, msg = 'moved ' || i WHERE id = i * 5;
          END CASE;
          IF i % 7 = 0 THEN DELETE FROM log WHERE id = i * 5 + 1; END IF;
          COMMIT;
        END LOOP;
      END $$;";
    let follower = copy_under_writes(&c, &plan, writes);
    // A partition created while following: its rows are captured under the parent's entry.
    // Created and written at once: every row in it is younger than the partition.
    c.blue.psql("CREATE TABLE ev_2026 PARTITION OF ev FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')");
    c.blue.psql("INSERT INTO ev SELECT g, date '2026-03-01', 'late' FROM generate_series(200001, 200500) g");
    c.blue.psql("UPDATE ev SET at = date '2026-05-05' WHERE id BETWEEN 1000 AND 1100 AND at < date '2025-01-01'");
    stop_and_catch_up(&c, &plan, follower, &[]);
    assert_transformed(
        &c,
        &[
            ("SELECT id::bigint, at, v FROM ev", "SELECT id, at, v FROM ev", "ev"),
            ("SELECT id::bigint, kind, upper(msg) FROM log", "SELECT id, kind, msg FROM log", "log"),
        ],
    );
    assert_eq!(c.green.psql("SELECT count(*) FROM ev WHERE v = 'late'"), "500");
    // Green routed each row to its partition, and the deferred index is back on every one.
    assert_eq!(c.green.psql("SELECT count(*) FROM ONLY log_0 WHERE kind <> 0"), "0");
    assert_eq!(
        c.green.psql("SELECT count(*) FROM pg_indexes WHERE tablename IN ('log_0', 'log_1', 'log_rest') AND indexdef LIKE '%(msg)%'"),
        "3"
    );
    // The copy analyzed both targets (`last_analyze` is set by ANALYZE only, not autovacuum),
    // the partitioned one with its parent's inherited statistics, which autovacuum never gathers.
    assert_eq!(
        c.green.psql("SELECT count(*) FROM pg_stat_user_tables WHERE relname = 'ev' AND last_analyze IS NOT NULL"),
        "1"
    );
    assert_eq!(c.green.psql("SELECT count(*) > 0 FROM pg_stats WHERE tablename = 'log' AND inherited"), "t");
    let r = run(&mut c.migrate(&["verify", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");

    // Rows that arrive without a row change stop following, named: a table attached holding
    // rows, and a partition truncated.
    c.blue.psql(
        "CREATE TABLE ev_2027 (id int NOT NULL, at date NOT NULL, v text); \
         INSERT INTO ev_2027 SELECT g, date '2027-02-02', 'attached' FROM generate_series(1, 10) g; \
         ALTER TABLE ev ATTACH PARTITION ev_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')",
    );
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("partition public.ev_2027 of public.ev was attached on blue holding rows"), "{r:?}");
}

#[test]
fn partitioned_source_and_target_under_writes_logical() {
    partitioned_tables("logical");
}

#[test]
fn partitioned_source_and_target_under_writes_trigger() {
    partitioned_tables("trigger");
}

/// Two blue tables (one per tenant) merged into one green table keyed by (tenant, id): a row
/// deleted from one tenant's table leaves the other tenant's row with the same id on green.
#[test]
fn a_delete_in_one_tenant_keeps_the_other_tenants_row() {
    let c = Custom::new(
        "CREATE TABLE a_users (id int PRIMARY KEY, name text); CREATE TABLE b_users (id int PRIMARY KEY, name text);
         INSERT INTO a_users SELECT g, 'a' || g FROM generate_series(1, 100) g;
         INSERT INTO b_users SELECT g, 'b' || g FROM generate_series(1, 100) g;",
        "CREATE TABLE users (tenant text NOT NULL, id bigint NOT NULL, name text, PRIMARY KEY (tenant, id));",
    );
    let entry = |tenant: &str| {
        format!(
            "[[table]]\nsource = \"public.{tenant}_users\"\ntarget = \"public.users\"\nkey = [\"id\"]\nfilter = \"id > 0\"\n\
             [table.columns]\ntenant = \"'{tenant}'\"\nid = \"id\"\nname = \"name\"\n"
        )
    };
    let plan = c.plan("logical", "", &format!("{}\n{}", entry("a"), entry("b")));
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    c.blue.psql("DELETE FROM a_users WHERE id <= 10; UPDATE b_users SET name = 'renamed' WHERE id = 20");
    let r = run(&mut c.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(c.green.psql("SELECT count(*) FROM users WHERE tenant = 'a'"), "90");
    assert_eq!(c.green.psql("SELECT count(*) FROM users WHERE tenant = 'b'"), "100", "tenant b's rows went too");
    assert_eq!(c.green.psql("SELECT name FROM users WHERE tenant = 'b' AND id = 20"), "renamed");
}

/// Same-named columns map by default: an entry without [table.columns] copies and follows every
/// column. A source column that reaches no target column is a problem naming it, until `drop`
/// says it is left behind.
#[test]
fn same_named_columns_map_by_default_and_a_forgotten_column_is_named() {
    let c = Custom::new(
        "CREATE TABLE people (id int PRIMARY KEY, email text NOT NULL, nickname text, created_at timestamptz NOT NULL);
         INSERT INTO people SELECT g, 'p' || g || '@x', CASE WHEN g % 3 = 0 THEN 'nick' || g END, now() - g * interval '1 day'
         FROM generate_series(1, 500) g;",
        "CREATE TABLE people (id bigint PRIMARY KEY, email text NOT NULL, nickname text,
                              created_at timestamptz NOT NULL DEFAULT now(), migrated_at timestamptz DEFAULT now());
         CREATE TABLE slim (id bigint PRIMARY KEY, email text NOT NULL);",
    );
    let plan = c.plan("logical", "", "[[table]]\nsource = \"public.people\"\nkey = [\"id\"]\n");
    let r = run(&mut c.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("<- same name   [integer]") && r.stdout.contains("<- default"), "{r:?}");
    let follower = c.spawn(&["copy", plan.to_str().unwrap()], &[]);
    c.wait_phase("following");
    c.blue.psql("UPDATE people SET nickname = 'changed' WHERE id <= 10; DELETE FROM people WHERE id > 490");
    stop_and_catch_up(&c, &plan, follower, &[]);
    assert_transformed(
        &c,
        &[(
            "SELECT id::bigint, email, nickname, created_at FROM people",
            "SELECT id, email, nickname, created_at FROM people",
            "people",
        )],
    );

    // A target without some source columns: each one left behind is named, then silenced by drop.
    let c2 = Custom::new(
        "CREATE TABLE people (id int PRIMARY KEY, email text NOT NULL, nickname text, created_at timestamptz);",
        "CREATE TABLE people (id bigint PRIMARY KEY, email text NOT NULL);",
    );
    let plan = c2.plan("logical", "", "[[table]]\nsource = \"public.people\"\nkey = [\"id\"]\n");
    let r = run(&mut c2.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("source column public.people.nickname reaches no target column"), "{r:?}");
    assert!(r.stdout.contains("source column public.people.created_at reaches no target column"), "{r:?}");
    assert!(r.stdout.contains("drop = [\"nickname\"]"), "the fix names drop: {r:?}");
    let plan = c2.plan(
        "logical",
        "",
        "[[table]]\nsource = \"public.people\"\nkey = [\"id\"]\ndrop = [\"nickname\", \"created_at\"]\n",
    );
    let r = run(&mut c2.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{r:?}");
    let plan = c2.plan(
        "logical",
        "",
        "[[table]]\nsource = \"public.people\"\nkey = [\"id\"]\ndrop = [\"nickname\", \"creatd_at\"]\n",
    );
    let r = run(&mut c2.migrate(&["plan", plan.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("table[1].drop") && r.stdout.contains("`creatd_at` is not a column of public.people"),
        "{r:?}"
    );
}
