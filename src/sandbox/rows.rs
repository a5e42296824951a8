//! Rows for a rehearsal on a schema the tool has never seen: N generated rows per table that
//! respect each column's type, NULLability, unique keys (values derive from the row number) and
//! foreign keys (a child row points at a parent row generated the same way), and a steady
//! writer that inserts, updates and deletes such rows through PgBouncer.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio_postgres::Client;

use crate::{
    error::{pg_message, Error, Result},
    pg::{ident, QualifiedName},
};

/// How one column is filled.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    /// SQL giving the value of row `{g}` (the row number, bigint; `{g}` stands for it).
    expr: String,
    /// Part of a unique key, a foreign key or NOT NULL: never NULL.
    required: bool,
    /// May be changed by the writer (not a key, not a foreign key).
    changeable: bool,
}

/// How the rows of one table are made.
#[derive(Debug, Clone)]
pub struct TableRows {
    /// The table.
    pub table: QualifiedName,
    columns: Vec<Column>,
    /// Another generated table references it: the writer does not delete its rows (a cascade
    /// would take most of the data within seconds).
    referenced: bool,
}

impl TableRows {
    /// The SELECT list making row `var`.
    fn select(&self, var: &str) -> String {
        self.columns
            .iter()
            .map(|c| {
                let e = c.expr.replace("{g}", var);
                if c.required {
                    e
                } else {
                    format!("CASE WHEN {var} % 7 = 0 THEN NULL ELSE {e} END")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn column_list(&self) -> String {
        self.columns.iter().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ")
    }

    /// `INSERT` of rows `from..=to`.
    fn insert(&self, from: u64, to: u64) -> String {
        format!(
            "INSERT INTO {} ({}) SELECT {} FROM generate_series({from}::int8, {to}::int8) AS bg_g",
            self.table.quoted(),
            self.column_list(),
            self.select("bg_g")
        )
    }
}

/// A value of type `ty` (`format_type`) and category `cat` (`typcategory`) for row `{g}`.
fn value(ty: &str, cat: &str, base: &str, enum_type: bool) -> String {
    let base = base.replace(['\'', '{', '}'], "");
    let g = "{g}";
    match (cat, ty) {
        (_, "boolean") => format!("({g} % 2 = 0)"),
        (_, "uuid") => format!("md5({g}::text)::uuid"),
        (_, "json" | "jsonb") => format!("json_build_object('g', {g})::{ty}"),
        (_, "bytea") => format!("decode(md5({g}::text), 'hex')"),
        (_, "smallint") => format!("({g} % 32000)::smallint"),
        ("N", _) => format!("{g}::{ty}"),
        // Recent (a plan's filter often keeps recent rows), one second apart.
        ("D", _) => format!("(date_trunc('second', now()) - {g} * interval '1 second')::{ty}"),
        ("T", _) => format!("({g} * interval '1 second')::{ty}"),
        ("I", _) => format!("('10.' || ({g} / 65536) % 256 || '.' || ({g} / 256) % 256 || '.' || {g} % 256)::inet"),
        ("A", _) => format!("('{{' || {g} || '}}')::{ty}"),
        _ if enum_type => {
            format!("(enum_range(NULL::{ty}))[1 + ({g} % array_length(enum_range(NULL::{ty}), 1))::int]")
        }
        // A JSON string: text columns often hold JSON documents, which the plan then casts.
        ("S", _) => format!("('\"{base}-' || {g} || '\"')::{ty}"),
        _ => format!("{g}::text::{ty}"),
    }
}

/// The generators of `tables` and of every table they reference by foreign key, parents first.
pub async fn plan_rows(client: &Client, tables: &[QualifiedName]) -> Result<Vec<TableRows>> {
    // Parents reached by foreign keys are generated too (a child row needs its parent).
    let mut all: Vec<QualifiedName> = Vec::new();
    let mut todo: Vec<QualifiedName> = tables.to_vec();
    let mut parents: HashMap<String, Vec<String>> = HashMap::new();
    while let Some(t) = todo.pop() {
        if all.contains(&t) {
            continue;
        }
        let refs = client
            .query(
                "SELECT DISTINCT n.nspname::text, p.relname::text FROM pg_catalog.pg_constraint c \
                 JOIN pg_catalog.pg_class p ON p.oid = c.confrelid JOIN pg_catalog.pg_namespace n ON n.oid = p.relnamespace \
                 WHERE c.contype = 'f' AND c.conrelid = $1::text::regclass AND c.confrelid <> c.conrelid",
                &[&t.quoted()],
            )
            .await
            .map_err(Error::db(format!("blue: reading the foreign keys of {t}")))?;
        let ps: Vec<QualifiedName> = refs.iter().map(|r| QualifiedName { schema: r.get(0), name: r.get(1) }).collect();
        parents.insert(t.to_string(), ps.iter().map(|p| p.to_string()).collect());
        todo.extend(ps);
        all.push(t);
    }
    // Parents first.
    let mut ordered: Vec<QualifiedName> = Vec::new();
    let mut done: HashSet<String> = HashSet::new();
    while ordered.len() < all.len() {
        let before = ordered.len();
        for t in &all {
            let key = t.to_string();
            if !done.contains(&key) && parents[&key].iter().all(|p| done.contains(p) || *p == key) {
                done.insert(key);
                ordered.push(t.clone());
            }
        }
        if ordered.len() == before {
            // A cycle of foreign keys: the rest in any order (the load may then fail, named).
            ordered.extend(all.iter().filter(|t| !done.contains(&t.to_string())).cloned());
            break;
        }
    }
    let mut out: Vec<TableRows> = Vec::new();
    for t in ordered {
        let mut rows = table_rows(client, &t, &out).await?;
        rows.referenced = parents.iter().any(|(child, ps)| *child != t.to_string() && ps.contains(&t.to_string()));
        out.push(rows);
    }
    Ok(out)
}

async fn table_rows(client: &Client, t: &QualifiedName, parents: &[TableRows]) -> Result<TableRows> {
    let cols = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), ty.typcategory::text, ty.typtype = 'e', \
                    a.attnotnull, a.attidentity <> '' OR (a.atthasdef AND pg_get_expr(d.adbin, d.adrelid) LIKE 'nextval(%'), \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = a.attrelid AND i.indisunique \
                              AND a.attnum = ANY(i.indkey::int2[])), \
                    (SELECT format('%s|%s|%s', pn.nspname, pc.relname, pa.attname) FROM pg_catalog.pg_constraint c \
                       JOIN pg_catalog.pg_class pc ON pc.oid = c.confrelid JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace \
                       JOIN pg_catalog.pg_attribute pa ON pa.attrelid = c.confrelid \
                        AND pa.attnum = c.confkey[array_position(c.conkey, a.attnum)] \
                      WHERE c.contype = 'f' AND c.conrelid = a.attrelid AND a.attnum = ANY(c.conkey) LIMIT 1) \
             FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid \
             LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&t.quoted()],
        )
        .await
        .map_err(Error::db(format!("blue: reading the columns of {t}")))?;
    let mut columns = Vec::new();
    for r in cols {
        let (name, ty, cat, is_enum): (String, String, String, bool) = (r.get(0), r.get(1), r.get(2), r.get(3));
        let (not_null, serial, unique): (bool, bool, bool) = (r.get(4), r.get(5), r.get(6));
        let fk: Option<String> = r.get(7);
        if serial {
            // Its default gives it; a foreign key onto it finds the same numbers (1..N).
            continue;
        }
        // A foreign key column takes the parent's value for a parent row that exists.
        let parent = fk.as_deref().and_then(|f| {
            let mut it = f.splitn(3, '|');
            let (s, n, c) = (it.next()?, it.next()?, it.next()?);
            let p = parents.iter().find(|p| p.table.schema == s && p.table.name == n)?;
            // A parent row that exists: row `((g - 1) % N) + 1` of it (`__rows__` is N, set
            // at load time); a serial parent key numbers its rows 1..N.
            let row = "((({g} - 1) % __rows__) + 1)";
            Some(match p.columns.iter().find(|pc| pc.name == c) {
                Some(pc) => format!("({})", pc.expr.replace("{g}", row)),
                None => row.to_string(),
            })
        });
        let expr = match parent {
            Some(p) => p,
            None => value(&ty, &cat, &name, is_enum),
        };
        columns.push(Column {
            name,
            expr,
            required: not_null || unique || fk.is_some(),
            changeable: !unique && fk.is_none(),
        });
    }
    Ok(TableRows { table: t.clone(), columns, referenced: false })
}

/// Inserts `rows` generated rows into each table (parents first), in one transaction.
pub async fn load(client: &Client, tables: &[TableRows], rows: u64) -> Result<()> {
    client.batch_execute("BEGIN").await.map_err(Error::db("blue: generating rows"))?;
    for t in tables {
        let sql = t.insert(1, rows).replace("__rows__", &rows.to_string());
        if let Err(e) = client.batch_execute(&sql).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(Error::Rehearsal(format!(
                "generating rows for {} failed: {}; give the data instead (--blue-data FILE)",
                t.table,
                pg_message(&e)
            )));
        }
    }
    client.batch_execute("COMMIT; ANALYZE").await.map_err(Error::db("blue: generating rows"))
}

/// What the writer did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct WriterReport {
    /// Statements that changed a row.
    pub writes: u64,
    /// Statements the schema refused (a foreign, unique, check or NOT NULL constraint): the
    /// writer knows nothing of the application's rules.
    pub refused: u64,
    /// Statements that failed otherwise (the first few messages).
    pub failed: Vec<String>,
}

/// A steady writer over the generated tables.
pub struct Writer {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<WriterReport>,
    /// Statements so far.
    pub done: Arc<AtomicU64>,
}

impl Writer {
    /// Writes `rate` statements per second to `client` (through PgBouncer: simple queries
    /// only), over `tables`, whose generated rows are numbered 1..=`rows`: inserts of new rows,
    /// updates of a changeable column, deletes.
    pub fn start(client: Client, tables: Vec<TableRows>, rows: u64, rate: u32) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (s, d) = (Arc::clone(&stop), Arc::clone(&done));
        let handle = tokio::spawn(async move {
            let mut report = WriterReport::default();
            let mut n: u64 = 0;
            let pause = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
            while !s.load(Ordering::Relaxed) && !tables.is_empty() {
                n += 1;
                let t = &tables[(n as usize / 3) % tables.len()];
                let fresh = rows * 10 + n;
                let pick = format!("(SELECT ctid FROM {} ORDER BY random() LIMIT 1)", t.table.quoted());
                let op = if t.referenced && n % 3 == 2 { 1 } else { n % 3 };
                let sql = match op {
                    0 => t.insert(fresh, fresh),
                    1 => match t.columns.iter().filter(|c| c.changeable).nth((n as usize / 7) % 3) {
                        Some(c) => format!(
                            "UPDATE {} SET {} = {} FROM (SELECT {fresh}::int8 AS bg_g) AS bg_w WHERE ctid = {pick}",
                            t.table.quoted(),
                            ident(&c.name),
                            c.expr.replace("{g}", "bg_w.bg_g")
                        ),
                        None => t.insert(fresh, fresh),
                    },
                    _ => format!("DELETE FROM {} WHERE ctid = {pick}", t.table.quoted()),
                }
                .replace("__rows__", &rows.to_string());
                match client.simple_query(&sql).await {
                    Ok(_) => report.writes += 1,
                    // Constraints (23…) and values out of a type's range (22…): the schema's
                    // rules, which the writer does not know.
                    Err(e) if e.code().is_some_and(|c| c.code().starts_with("23") || c.code().starts_with("22")) => {
                        report.refused += 1
                    }
                    Err(e) => {
                        if report.failed.len() < 5 {
                            report.failed.push(format!("{}: {}", t.table, pg_message(&e)));
                        }
                        if client.is_closed() {
                            break;
                        }
                    }
                }
                d.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(pause).await;
            }
            report
        });
        Writer { stop, handle, done }
    }

    /// Stops and returns what it did.
    pub async fn stop(self) -> WriterReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.unwrap_or_default()
    }
}
