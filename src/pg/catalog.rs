//! Catalog queries: what a table looks like on one side. Read once during resolution; later
//! stages work from the resolved plan instead of asking again.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use crate::{
    error::{Error, Result},
    pg::{QualifiedName, Side},
};

/// A column as the catalog describes it.
#[derive(Debug, Clone)]
pub struct ColumnInfo {
    /// Column name.
    pub name: String,
    /// Type OID on this side.
    pub type_oid: u32,
    /// `format_type` text, e.g. `timestamp with time zone` or `numeric(12,3)`.
    pub type_name: String,
    /// `NOT NULL`.
    pub not_null: bool,
    /// Has a default (`DEFAULT`, serial, identity or generated).
    pub has_default: bool,
    /// Generated column: cannot be written.
    pub generated: bool,
    /// Sequence owned by this column (serial or identity), qualified and quoted.
    pub sequence: Option<String>,
    /// Values of this type must be compared by their text: their binary form or hash is
    /// server-specific (enums hash their OID, reg* types are OIDs) or their equality is looser
    /// than identity (extension and domain types such as citext). Types created in the database
    /// (OID 16384 and up), enums, reg* types and arrays of any of them.
    pub hash_by_text: bool,
}

/// A unique index (or primary key) usable as a row identity: not partial, no expressions.
#[derive(Debug, Clone)]
pub struct UniqueKey {
    /// Index name.
    pub name: String,
    /// Key columns in index order.
    pub columns: Vec<String>,
    /// It is the primary key.
    pub primary: bool,
    /// It is the replica identity index.
    pub replica_identity: bool,
    /// Checked at once (not `DEFERRABLE`): only such an index can arbitrate `ON CONFLICT`.
    pub immediate: bool,
}

/// A secondary index or constraint on a target table, with the SQL to recreate it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DeferredObject {
    /// Index or constraint name.
    pub name: String,
    /// `index`, `primary key`, `unique`, `exclusion` or `foreign key`.
    pub kind: String,
    /// Statement that recreates it.
    pub create_sql: String,
    /// Statement that drops it.
    pub drop_sql: String,
    /// The table it belongs to (`regclass` text).
    pub owner: String,
    /// Key columns when it is a primary key, unique constraint or plain unique index.
    #[serde(default)]
    pub unique_columns: Option<Vec<String>>,
}

impl DeferredObject {
    /// Whether it belongs to `table` (owner is `regclass` text read with an empty search path,
    /// so always schema-qualified).
    pub fn owner_is(&self, table: &QualifiedName) -> bool {
        self.owner == table.quoted() || self.owner == format!("{}.{}", table.schema, table.name)
    }
}

/// A table as one side's catalog describes it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// Relation OID.
    pub oid: u32,
    /// Columns in attribute order.
    pub columns: Vec<ColumnInfo>,
    /// Usable unique keys.
    pub unique_keys: Vec<UniqueKey>,
    /// `relreplident`: d(efault), n(othing), f(ull), i(ndex).
    pub replica_identity: char,
    /// Planner's row estimate; negative when never analyzed.
    pub reltuples: f64,
    /// Heap plus TOAST plus indexes, bytes.
    pub total_bytes: i64,
    /// A partitioned table (its rows live in partitions).
    pub partitioned: bool,
    /// A plain table with inheritance children: reading it reads theirs too, but their
    /// changes are neither published nor seen by its triggers under its name.
    pub inherited: bool,
}

impl TableInfo {
    /// Finds a column by exact name.
    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Columns that the replica identity sends for deletes and key-changing updates; `None`
    /// means the whole row (FULL), an empty list means nothing is sent.
    pub fn identity_columns(&self) -> Option<Vec<String>> {
        let pick = |f: &dyn Fn(&UniqueKey) -> bool| {
            self.unique_keys.iter().find(|k| f(k)).map(|k| k.columns.clone()).unwrap_or_default()
        };
        match self.replica_identity {
            'f' => None,
            'i' => Some(pick(&|k| k.replica_identity)),
            'n' => Some(Vec::new()),
            _ => Some(pick(&|k| k.primary)),
        }
    }
}

/// The functions `expr` (an expression over rows of `source`) calls that give another value each
/// time a row is read: volatile ones (`random()`, `gen_random_uuid()`, `clock_timestamp()`,
/// `nextval()`, through operators too), and the clock functions that are only stable (`now()`,
/// `current_timestamp`, ...: fixed within one transaction, but copy, apply and verify each read
/// in their own). Found in the stored query tree of a temporary view of the expression (every
/// function and operator call is there by OID; built-in functions are pinned and so absent from
/// `pg_depend`), made in a transaction rolled back: the catalog knows each function's
/// volatility, whatever its name.
/// `from` is the FROM clause the expression is evaluated over; `source` names it in messages.
pub async fn changing_calls(client: &Client, source: &QualifiedName, from: &str, expr: &str) -> Result<Vec<String>> {
    let ctx = || format!("blue: checking the volatility of an expression over {source}");
    // READ WRITE: a cutover's fence makes blue's new sessions read-only, and the temporary
    // view (rolled back) must still be made, or the check would be skipped.
    client.batch_execute("BEGIN READ WRITE").await.map_err(Error::db(ctx()))?;
    let found = async {
        client
            .batch_execute(&format!("CREATE TEMP VIEW bluegreen_volatility AS SELECT ({expr}) AS v FROM {from}"))
            .await?;
        client
            .query(
                "SELECT DISTINCT p.proname || '()' FROM pg_catalog.pg_rewrite r, \
                   regexp_matches(r.ev_action::text, ':(?:funcid|opfuncid) (\\d+)', 'g') m \
                   JOIN pg_catalog.pg_proc p ON p.oid = m[1]::oid \
                 WHERE r.ev_class = 'pg_temp.bluegreen_volatility'::regclass \
                   AND (p.provolatile = 'v' OR p.proname IN ('now', 'transaction_timestamp', 'statement_timestamp')) \
                 ORDER BY 1",
                &[],
            )
            .await
    }
    .await;
    client.batch_execute("ROLLBACK").await.map_err(Error::db(ctx()))?;
    let mut calls: Vec<String> = match found {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        // The expression prepared fine already; a role without TEMP rights on blue cannot make
        // the view. Say so rather than refuse the plan.
        Err(e) => {
            tracing::warn!(source = %source, error = %crate::error::pg_message(&e), "cannot check an expression for volatile functions");
            Vec::new()
        }
    };
    // The SQL-standard clock keywords are no function calls: nothing depends on them. Looked
    // for outside quotes (a literal 'localtime' or a column "current_date" is no clock).
    let mut unquoted = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    for c in expr.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None => unquoted.push(c),
        }
    }
    let words: Vec<String> =
        unquoted.to_lowercase().split(|c: char| !(c.is_alphanumeric() || c == '_')).map(str::to_string).collect();
    for kw in ["current_timestamp", "current_date", "current_time", "localtimestamp", "localtime"] {
        if words.iter().any(|w| w == kw) {
            calls.push(kw.to_string());
        }
    }
    Ok(calls)
}

/// The tables and views `exprs` read over `from` (in a temporary view, rolled back), by OID and
/// name: what the expressions' subqueries read as well as the FROM clause's own tables. A
/// relation read in a function's body stays invisible. Empty when blue does not let us make
/// the view (already warned about by [`changing_calls`]).
pub async fn relations_read(client: &Client, from: &str, exprs: &[String]) -> Result<Vec<(u32, String)>> {
    let list: Vec<String> = exprs.iter().enumerate().map(|(i, e)| format!("({e}) AS v{i}")).collect();
    let list = if list.is_empty() { "1 AS v".to_string() } else { list.join(", ") };
    client.batch_execute("BEGIN READ WRITE").await.map_err(Error::db("blue: listing what a plan entry reads"))?;
    let found = async {
        client.batch_execute(&format!("CREATE TEMP VIEW bluegreen_reads AS SELECT {list} FROM {from}")).await?;
        client
            .query(
                "SELECT DISTINCT d.refobjid, n.nspname || '.' || c.relname FROM pg_catalog.pg_depend d \
                   JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
                   JOIN pg_catalog.pg_class c ON c.oid = d.refobjid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                   AND r.ev_class = 'pg_temp.bluegreen_reads'::regclass AND d.refobjid <> r.ev_class",
                &[],
            )
            .await
    }
    .await;
    client.batch_execute("ROLLBACK").await.map_err(Error::db("blue: listing what a plan entry reads"))?;
    Ok(match found {
        Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
        // Expressions that do not prepare are reported already; a role without TEMP rights on
        // blue cannot make the view: say so rather than refuse the plan.
        Err(e) => {
            tracing::warn!(error = %crate::error::pg_message(&e), "cannot check what an entry's expressions read");
            Vec::new()
        }
    })
}

/// A row source of one row of NULLs with `table`'s columns and types, that depends on no table
/// (`NULL::rowtype` would depend on the table itself): `(SELECT NULL::int4 AS "id", …)`.
pub async fn placeholder_row(client: &Client, table: &QualifiedName) -> Result<String> {
    let list: Option<String> = client
        .query_one(
            "SELECT string_agg(format('NULL::%s AS %I', format_type(atttypid, atttypmod), attname), ', ' ORDER BY attnum) \
             FROM pg_catalog.pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
            &[&table.quoted()],
        )
        .await
        .map_err(Error::db(format!("blue: reading the columns of {table}")))?
        .get(0);
    Ok(format!("(SELECT {})", list.unwrap_or_else(|| "1".into())))
}

/// The leaf partitions of partitioned table `table`.
pub async fn leaf_partitions(client: &Client, table: &QualifiedName) -> Result<Vec<QualifiedName>> {
    Ok(client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_partition_tree($1::text::regclass) p \
             JOIN pg_catalog.pg_class c ON c.oid = p.relid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE p.isleaf ORDER BY c.oid",
            &[&table.quoted()],
        )
        .await
        .map_err(Error::db(format!("reading the partitions of {table}")))?
        .iter()
        .map(|r| QualifiedName { schema: r.get(0), name: r.get(1) })
        .collect())
}

/// What `table` is when it is not a table: "a view", "a materialized view", ...; `None` when
/// no relation of that name exists.
pub async fn relation_kind(client: &Client, table: &QualifiedName) -> Result<Option<&'static str>> {
    let kind: Option<String> = client
        .query_opt(
            "SELECT c.relkind::text FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(Error::db(format!("reading catalog for {table} (kind)")))?
        .map(|r| r.get(0));
    Ok(kind.map(|k| match k.as_str() {
        "v" => "a view",
        "m" => "a materialized view",
        "f" => "a foreign table",
        "S" => "a sequence",
        "i" | "I" => "an index",
        "c" => "a composite type",
        "t" => "a TOAST table",
        _ => "not a table",
    }))
}

/// Looks a table up; `None` when it does not exist (or is not a table).
pub async fn table_info(client: &Client, side: Side, table: &QualifiedName) -> Result<Option<TableInfo>> {
    with_qualified_names(client, table_info_inner(client, side, table)).await
}

/// Runs catalog reads with `search_path = pg_catalog`, so that `regclass` text,
/// `pg_get_indexdef` and `pg_get_constraintdef` come out schema-qualified and do not depend on
/// the session's search path when replayed later.
async fn with_qualified_names<T>(client: &Client, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    client.batch_execute("SET search_path = pg_catalog").await.map_err(Error::db("setting search_path"))?;
    let out = f.await;
    client.batch_execute("RESET search_path").await.map_err(Error::db("resetting search_path"))?;
    out
}

async fn table_info_inner(client: &Client, side: Side, table: &QualifiedName) -> Result<Option<TableInfo>> {
    let ctx = |what: &str| format!("{side}: reading catalog for {table} ({what})");
    let row = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, c.reltuples::float8, pg_total_relation_size(c.oid), c.relkind = 'p', \
                    c.relkind = 'r' AND c.relhassubclass \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(Error::db(ctx("relation")))?;
    let Some(row) = row else { return Ok(None) };
    let oid: u32 = row.get(0);
    let replident: String = row.get(1);
    // Sequences are found through pg_depend ('a' = serial ownership, 'i' = identity) rather than
    // pg_get_serial_sequence, which needs a re-quoted table name.
    let columns = client
        .query(
            "SELECT a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                    a.atthasdef OR a.attidentity <> '', a.attgenerated <> '', \
                    (SELECT d.objid::regclass::text FROM pg_catalog.pg_depend d \
                       JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
                      WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.refobjid = a.attrelid \
                        AND d.refobjsubid = a.attnum AND d.deptype IN ('a', 'i') LIMIT 1), \
                    (t.oid >= 16384 OR t.typtype = 'e' OR t.typname ~ '^_?reg' \
                     OR coalesce(e.oid >= 16384 OR e.typtype = 'e' OR e.typname ~ '^reg', false)) \
             FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_catalog.pg_type e ON e.oid = t.typelem AND t.typcategory = 'A' \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(Error::db(ctx("columns")))?
        .iter()
        .map(|r| ColumnInfo {
            name: r.get(0),
            type_oid: r.get(1),
            type_name: r.get(2),
            not_null: r.get(3),
            has_default: r.get(4),
            generated: r.get(5),
            sequence: r.get(6),
            hash_by_text: r.get(7),
        })
        .collect();
    let unique_keys = client
        .query(
            "SELECT ic.relname::text, i.indisprimary, i.indisreplident, \
                    array_agg(a.attname::text ORDER BY k.ord), i.indimmediate \
             FROM pg_catalog.pg_index i \
             JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid \
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indpred IS NULL \
               AND i.indexprs IS NULL AND k.ord <= i.indnkeyatts \
             GROUP BY ic.relname, i.indisprimary, i.indisreplident, i.indimmediate \
             ORDER BY i.indisprimary DESC, ic.relname",
            &[&oid],
        )
        .await
        .map_err(Error::db(ctx("unique indexes")))?
        .iter()
        .map(|r| UniqueKey {
            name: r.get(0),
            primary: r.get(1),
            replica_identity: r.get(2),
            columns: r.get(3),
            immediate: r.get(4),
        })
        .collect();
    Ok(Some(TableInfo {
        oid,
        columns,
        unique_keys,
        replica_identity: replident.chars().next().unwrap_or('d'),
        reltuples: row.get(2),
        total_bytes: row.get(3),
        partitioned: row.get(4),
        inherited: row.get(5),
    }))
}

/// `create` run with `space` (an index's tablespace, when not the database's default) as the
/// default tablespace: `pg_get_indexdef` and `pg_get_constraintdef` leave it out, and rebuilt
/// from them alone the index would land in the default one, maybe on another disk. Only a
/// tablespace green's user may create in is named (a Known limit): naming another would fail
/// the rebuild after the whole copy.
fn in_tablespace(create: String, space: Option<String>) -> String {
    match space {
        Some(space) => {
            format!("SET default_tablespace = {}; {create}; SET default_tablespace = DEFAULT", crate::pg::ident(&space))
        }
        None => create,
    }
}

/// A primary key or unique constraint's definition with its index's storage parameters
/// (`options`, e.g. `fillfactor = '70'`), which `pg_get_constraintdef` leaves out: `WITH (…)`
/// goes after the last column list (the key's or `INCLUDE`'s), before `DEFERRABLE`.
fn with_storage(def: String, options: Option<String>) -> String {
    match (options, def.rfind(')')) {
        (Some(options), Some(at)) => format!("{} WITH ({options}){}", &def[..=at], &def[at + 1..]),
        _ => def,
    }
}

/// Secondary indexes and constraints on a target table that a bulk load can drop and rebuild:
/// primary key, unique and exclusion constraints, plain indexes, and foreign keys from or to it.
pub async fn deferrable_objects(client: &Client, table: &QualifiedName, oid: u32) -> Result<Vec<DeferredObject>> {
    with_qualified_names(client, deferrable_objects_inner(client, table, oid)).await
}

async fn deferrable_objects_inner(client: &Client, table: &QualifiedName, oid: u32) -> Result<Vec<DeferredObject>> {
    let ctx = format!("green: reading indexes and constraints of {table}");
    let mut out = Vec::new();
    // Foreign keys first (both directions): a referenced unique key cannot be dropped before them.
    let rows = client
        .query(
            "SELECT con.conname::text, con.contype::text, pg_get_constraintdef(con.oid), \
                    con.conrelid::regclass::text, \
                    CASE WHEN con.contype IN ('p', 'u') THEN \
                      (SELECT array_agg(a.attname::text ORDER BY k.ord) \
                         FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord) \
                         JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum) END, \
                    CASE WHEN con.contype IN ('p', 'u', 'x') THEN \
                      (SELECT t.spcname::text FROM pg_catalog.pg_class ic \
                         JOIN pg_catalog.pg_tablespace t ON t.oid = ic.reltablespace WHERE ic.oid = con.conindid \
                          AND pg_catalog.has_tablespace_privilege(t.oid, 'CREATE')) END, \
                    CASE WHEN con.contype IN ('p', 'u') THEN \
                      (SELECT string_agg(pg_catalog.quote_ident(split_part(o, '=', 1)) || ' = ' || \
                                         pg_catalog.quote_literal(substr(o, strpos(o, '=') + 1)), ', ' ORDER BY n) \
                         FROM pg_catalog.pg_class ic, unnest(ic.reloptions) WITH ORDINALITY AS r(o, n) \
                        WHERE ic.oid = con.conindid) END \
             FROM pg_catalog.pg_constraint con \
             WHERE (con.conrelid = $1 AND con.contype IN ('p', 'u', 'x', 'f')) \
                OR (con.confrelid = $1 AND con.contype = 'f' AND con.conrelid <> $1) \
             ORDER BY con.contype <> 'f', con.conname",
            &[&oid],
        )
        .await
        .map_err(Error::db(ctx.clone()))?;
    for r in rows {
        let name: String = r.get(0);
        let kind = match r.get::<_, String>(1).as_str() {
            "p" => "primary key",
            "u" => "unique",
            "x" => "exclusion",
            _ => "foreign key",
        };
        let def = with_storage(r.get(2), r.get(6));
        let owner: String = r.get(3);
        let qn = crate::pg::ident(&name);
        out.push(DeferredObject {
            create_sql: in_tablespace(format!("ALTER TABLE {owner} ADD CONSTRAINT {qn} {def}"), r.get(5)),
            drop_sql: format!("ALTER TABLE {owner} DROP CONSTRAINT IF EXISTS {qn}"),
            owner,
            unique_columns: r.get(4),
            name,
            kind: kind.to_string(),
        });
    }
    let rows = client
        .query(
            "SELECT ic.relname::text, pg_get_indexdef(i.indexrelid), ic.oid::regclass::text, i.indrelid::regclass::text, \
                    CASE WHEN i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL THEN \
                      (SELECT array_agg(a.attname::text ORDER BY k.ord) \
                         FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                         JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                        WHERE k.ord <= i.indnkeyatts) END, \
                    (SELECT t.spcname::text FROM pg_catalog.pg_tablespace t WHERE t.oid = ic.reltablespace \
                        AND pg_catalog.has_tablespace_privilege(t.oid, 'CREATE')) \
             FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid \
             WHERE i.indrelid = $1 AND NOT EXISTS ( \
                 SELECT 1 FROM pg_catalog.pg_constraint c WHERE c.conindid = i.indexrelid \
                    AND c.conrelid = i.indrelid AND c.contype IN ('p', 'u', 'x')) \
             ORDER BY ic.relname",
            &[&oid],
        )
        .await
        .map_err(Error::db(ctx))?;
    for r in rows {
        let qualified: String = r.get(2);
        // A partitioned table's index reads `CREATE INDEX … ON ONLY t`: replayed so, it would
        // stay invalid, on the parent alone. Without ONLY it is built on every partition.
        let create = r.get::<_, String>(1).replacen(" ON ONLY ", " ON ", 1);
        out.push(DeferredObject {
            name: r.get(0),
            kind: "index".into(),
            create_sql: in_tablespace(create, r.get(5)),
            drop_sql: format!("DROP INDEX IF EXISTS {qualified}"),
            owner: r.get(3),
            unique_columns: r.get(4),
        });
    }
    Ok(out)
}

/// Enough of `pg_type` and `pg_cast` to decide whether an expression's type may be assigned to
/// a column's type, as an INSERT would allow.
pub struct TypeRules {
    types: HashMap<u32, TypeRow>,
    casts: HashSet<(u32, u32)>,
}

struct TypeRow {
    category: char,
    element: u32,
    base: u32,
}

/// The `unknown` pseudo-type of untyped literals.
const UNKNOWN_OID: u32 = 705;

impl TypeRules {
    /// Loads the rules from one server (blue: that is where the cast runs).
    pub async fn load(client: &Client, side: Side) -> Result<Self> {
        let ctx = format!("{side}: reading pg_type and pg_cast");
        let types = client
            .query("SELECT oid, typcategory::text, typelem, typbasetype FROM pg_catalog.pg_type", &[])
            .await
            .map_err(Error::db(ctx.clone()))?
            .iter()
            .map(|r| {
                let cat: String = r.get(1);
                (r.get(0), TypeRow { category: cat.chars().next().unwrap_or('X'), element: r.get(2), base: r.get(3) })
            })
            .collect();
        let casts = client
            .query("SELECT castsource, casttarget FROM pg_catalog.pg_cast WHERE castcontext IN ('i', 'a')", &[])
            .await
            .map_err(Error::db(ctx))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        Ok(Self { types, casts })
    }

    /// Whether a value of type `from` may be stored in a column of type `to` without an explicit
    /// cast (same type, implicit or assignment cast, domains and arrays thereof, any type to a
    /// string type).
    pub fn assignable(&self, from: u32, to: u32) -> bool {
        self.assignable_depth(from, to, 0)
    }

    fn assignable_depth(&self, from: u32, to: u32, depth: u8) -> bool {
        if from == to || from == UNKNOWN_OID || self.casts.contains(&(from, to)) {
            return true;
        }
        if depth > 8 {
            return false;
        }
        let (Some(f), Some(t)) = (self.types.get(&from), self.types.get(&to)) else {
            return false;
        };
        if t.category == 'S' && f.category != 'A' {
            return true;
        }
        if f.base != 0 && self.assignable_depth(f.base, to, depth + 1) {
            return true;
        }
        if t.base != 0 && self.assignable_depth(from, t.base, depth + 1) {
            return true;
        }
        f.category == 'A'
            && t.category == 'A'
            && f.element != 0
            && t.element != 0
            && self.assignable_depth(f.element, t.element, depth + 1)
    }
}

/// Transactions on this server that a lock or a new replication slot may be waiting for, each
/// described with how to end it: prepared (2PC) transactions first, then transactions open for
/// more than a few seconds.
pub async fn open_transactions(client: &Client) -> Result<Vec<String>> {
    Ok(client
        .query(
            "SELECT format('prepared transaction %L in database %s, prepared %s ago by %s: end it with \
                            COMMIT PREPARED %L or ROLLBACK PREPARED %L', \
                           gid, database, date_trunc('second', now() - prepared), owner, gid, gid) \
             FROM pg_catalog.pg_prepared_xacts \
             UNION ALL \
             SELECT format('transaction of process %s (%s, application %L, %s) open for %s: end it, or \
                            pg_terminate_backend(%s)', \
                           pid, usename, application_name, state, date_trunc('second', now() - xact_start), pid) \
             FROM pg_catalog.pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND backend_xid IS NOT NULL AND xact_start < now() - interval '5 seconds'",
            &[],
        )
        .await
        .map_err(Error::db("reading open transactions"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::with_storage;

    #[test]
    fn storage_parameters_go_after_the_column_lists_and_before_deferrable() {
        let opts = || Some("fillfactor = '70'".to_string());
        assert_eq!(with_storage("PRIMARY KEY (id)".into(), opts()), "PRIMARY KEY (id) WITH (fillfactor = '70')");
        assert_eq!(
            with_storage("UNIQUE (a, \"b)\") INCLUDE (c) DEFERRABLE INITIALLY DEFERRED".into(), opts()),
            "UNIQUE (a, \"b)\") INCLUDE (c) WITH (fillfactor = '70') DEFERRABLE INITIALLY DEFERRED"
        );
        assert_eq!(with_storage("UNIQUE (a)".into(), None), "UNIQUE (a)");
    }
}
