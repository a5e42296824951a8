//! Identifiers with quotes, spaces, capitals, dots and non-ASCII letters, on both sides, end to
//! end: plan, copy under concurrent writes (including key changes), follow, verify; for both
//! capture methods.

use std::time::Duration;

use crate::support::{blue_cluster, fingerprint, green_cluster, replace_once, run, TestDb};

const BLUE: &str = r#"
CREATE SCHEMA "Ünïcode ""Schema""";
CREATE TABLE "Ünïcode ""Schema"""."Order.Items" (
    "Item ID" bigserial PRIMARY KEY, "Qty" int NOT NULL, "naïve text" text, "東京" jsonb, "UPPER" text);
INSERT INTO "Ünïcode ""Schema"""."Order.Items" ("Qty", "naïve text", "東京", "UPPER")
SELECT i, 'zoë ' || i || repeat(' ✓', i % 5), jsonb_build_object('k', i, 'ключ', 'значение'), CASE WHEN i % 3 = 0 THEN NULL ELSE 'U' || i END
FROM generate_series(1, 3000) i;
"#;

const GREEN: &str = r#"
CREATE SCHEMA "Grün Schema";
CREATE TABLE "Grün Schema"."Line ""Items""" (
    "ID" bigint PRIMARY KEY, "Quantity" bigint NOT NULL, "Note, long" text, "Data" jsonb, "Upper Case" text,
    "With ""quote""" text DEFAULT 'd');
CREATE INDEX "Idx ""weird"" ✓" ON "Grün Schema"."Line ""Items""" ("Quantity");
"#;

const PLAN: &str = r#"
name = "NAME"
[blue]
url = "${BLUE_URL}"
[green]
url = "${GREEN_URL}"
[capture]
method = "METHOD"
[copy]
chunk_rows = 500

[[table]]
source = '"Ünïcode ""Schema"""."Order.Items"'
target = '"Grün Schema"."Line ""Items"""'
key = ["Item ID"]
[table.columns]
"ID" = '"Item ID"'
"Quantity" = '"Qty" * 2'
"Note, long" = 'upper("naïve text")'
"Data" = '"東京"'
"Upper Case" = '"UPPER"'
"#;

fn writes(url: &str, n: u64) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let t = r#""Ünïcode ""Schema"""."Order.Items""#;
        for i in 0..n {
            let sql = match i % 5 {
                0 => format!(
                    r#"INSERT INTO {t} ("Qty", "naïve text", "東京") VALUES ({i}, 'new ✓ {i}', '{{"n": {i}}}')"#
                ),
                1 => format!(r#"UPDATE {t} SET "naïve text" = 'upd {i}' WHERE "Item ID" = 1 + {i} % 3000"#),
                2 => format!(r#"UPDATE {t} SET "Item ID" = "Item ID" + 1000000 WHERE "Item ID" = 2 + {i} % 2900"#),
                3 => format!(r#"DELETE FROM {t} WHERE "Item ID" = 3 + {i} % 2800"#),
                _ => format!(
                    r#"UPDATE {t} SET "東京" = '{{"x": "{i}"}}', "UPPER" = NULL WHERE "Item ID" = 4 + {i} % 2700"#
                ),
            };
            c.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
}

fn end_to_end(method: &str) {
    let blue = TestDb::create(blue_cluster(), "idblue", None);
    let green = TestDb::create(green_cluster(), "idgreen", None);
    blue.psql(BLUE);
    green.psql(GREEN);
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.toml");
    let name = format!("ids-{}", green.name.replace('_', "-"));
    std::fs::write(&plan, replace_once(&replace_once(PLAN, "NAME", &name), "METHOD", method)).unwrap();
    let migrate = |args: &[&str]| {
        let mut c = assert_cmd::Command::cargo_bin("migrate").unwrap();
        c.env("BLUE_URL", blue.url()).env("GREEN_URL", green.url()).args(args).timeout(Duration::from_secs(120));
        run(&mut c)
    };
    let p = plan.to_str().unwrap();
    let r = migrate(&["plan", p]);
    assert_eq!(r.code, 0, "{r:?}");
    // The mapping names both tables as parsed (quotes, spaces, dots and capitals kept), the key
    // pairs the columns across the rename, and green's index comes back as quoted SQL.
    for expected in [
        r#"table[1] Ünïcode "Schema".Order.Items -> Grün Schema.Line "Items""#,
        "key       Item ID -> ID (bigint)\n",
        r#"CREATE INDEX "Idx ""weird"" ✓" ON "Grün Schema"."Line ""Items""" USING btree ("Quantity")"#,
    ] {
        assert!(r.stdout.contains(expected), "missing `{expected}` in:\n{r:?}");
    }
    let url = blue.url();
    let writer = std::thread::spawn(move || writes(&url, 600));
    let r = migrate(&["copy", p, "--no-follow"]);
    assert_eq!(r.code, 0, "{r:?}");
    writer.join().unwrap();
    let r = migrate(&["copy", p, "--no-follow"]);
    assert_eq!(r.code, 0, "{r:?}");
    let b = fingerprint(
        &blue,
        r#"SELECT "Item ID", "Qty" * 2, upper("naïve text"), "東京", "UPPER", 'd' FROM "Ünïcode ""Schema"""."Order.Items""#,
    );
    let g = fingerprint(
        &green,
        r#"SELECT "ID", "Quantity", "Note, long", "Data", "Upper Case", "With ""quote""" FROM "Grün Schema"."Line ""Items""""#,
    );
    assert_eq!(b, g, "green differs from transform(blue)");
    assert!(b.split(':').next().unwrap().parse::<i64>().unwrap() > 2500, "too few rows compared: {b}");
    let r = migrate(&["verify", p]);
    assert_eq!(r.code, 0, "{r:?}");
    let index = green.psql(r#"SELECT count(*) FROM pg_indexes WHERE indexname = 'Idx "weird" ✓'"#);
    assert_eq!(index, "1", "the deferred index was not rebuilt under its name");
    let r = migrate(&["cleanup", p]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn unicode_and_quoted_identifiers_with_logical_capture() {
    end_to_end("logical");
}

#[test]
fn unicode_and_quoted_identifiers_with_trigger_capture() {
    end_to_end("trigger");
}
