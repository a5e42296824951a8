//! Stage 0: the plan. A TOML file becomes a [`Plan`] (file checks only), then, against both
//! catalogs, a [`ResolvedPlan`]: typed column mappings, keys, the SELECT each later stage runs,
//! deferred indexes, sequences and estimates. Every later stage works from the resolved plan.

mod changes;
mod file;
pub mod prereq;
mod report;
mod resolve;
pub mod sample;
mod sql;

pub use changes::check_against_state;
pub use file::{
    parse_duration, CaptureMethod, CopySettings, CutoverSettings, Hook, HookPoint, JoinEntry, PgbouncerSettings, Plan,
    SwitchMode, TableEntry, V1AfterSwitch, DEFAULT_SNAPSHOT_MAX_AGE,
};
pub use report::{human_bytes as render_size, render_json, render_text};
pub use resolve::resolve;
pub use sql::{key_condition, key_condition_via, key_rows_via, round_trip_sql, trace_sql, KeyText};

use serde::Serialize;

use crate::pg::{catalog::DeferredObject, ident, QualifiedName};
pub use crate::state::TableId;

/// A problem found while resolving: it names the table and column, where in the file, and the
/// fix when we know it.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// Key path in the plan, e.g. `table[2].columns.scopes`.
    pub field: String,
    /// Line in the plan file, when the problem comes from a line.
    pub line: Option<usize>,
    /// Table the problem concerns (as written in the plan).
    pub table: Option<String>,
    /// Column the problem concerns.
    pub column: Option<String>,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub fix: Option<String>,
}

/// One target column and where its value comes from.
#[derive(Debug, Clone, Serialize)]
pub struct ResolvedColumn {
    /// Target column name.
    pub name: String,
    /// Target column type (`format_type` on green).
    pub target_type: String,
    /// Expression over the source row; `None` means the column takes its default.
    pub expr: Option<String>,
    /// Type the expression has on blue.
    pub expr_type: Option<String>,
    /// Compared by its text form (see `ColumnInfo::hash_by_text`).
    #[serde(skip)]
    pub hash_by_text: bool,
    /// Mapped by default from the same-named source column (`plan` shows `<- same name`).
    pub same_name: bool,
}

/// A key column on both sides.
#[derive(Debug, Clone, Serialize)]
pub struct KeyColumn {
    /// Column name on blue.
    pub source: String,
    /// Column name on green (the target column mapped verbatim from it).
    pub target: String,
    /// Type name on blue.
    pub source_type: String,
    /// Type name on green.
    pub target_type: String,
    /// The key is a single integer column (chunked arithmetically).
    pub integer: bool,
    /// The types differ and green knows blue's: a captured key's text is read as blue's type
    /// and then cast, as copy's transform did (see `key_condition_via`).
    pub via_source_type: bool,
}

/// A sequence to carry over at cutover.
#[derive(Debug, Clone, Serialize)]
pub struct SequenceMapping {
    /// Target column that owns it.
    pub column: String,
    /// Sequence on green (qualified, quoted).
    pub green_sequence: String,
    /// Sequence on blue behind the source column, when the column is copied verbatim.
    pub blue_sequence: Option<String>,
}

/// One `on` equality of a join: the joined table's column and the expression it equals.
#[derive(Debug, Clone, Serialize)]
pub struct JoinOn {
    /// Column of the joined table.
    pub column: String,
    /// Its type (`format_type` on blue).
    pub type_name: String,
    /// Expression over the driving table and earlier joins.
    pub expr: String,
    /// A generated column: logical decoding never sends it.
    #[serde(skip)]
    pub generated: bool,
}

/// A table joined to each driving row, resolved.
#[derive(Debug, Clone, Serialize)]
pub struct ResolvedJoin {
    /// The name expressions use for it.
    pub alias: String,
    /// The joined table on blue.
    pub table: QualifiedName,
    /// A driving row without a match makes no target row.
    pub inner: bool,
    /// The equalities that link a joined row to the rows before it: its *link columns*. A
    /// change of the joined table is traced to driving rows by their values (see
    /// [`sql::trace_sql`]).
    pub on: Vec<JoinOn>,
    /// ORDER BY choosing one row where several match, ending in the table's unique key.
    pub pick: Option<String>,
    /// A further condition on the joined row.
    pub also: Option<String>,
    /// Why it matches at most one row per driving row (for `plan`).
    pub proof: String,
    /// The joined table's columns (name, type OID) when resolved; capture stops if blue
    /// reports another shape.
    #[serde(skip)]
    pub columns: Vec<(String, u32)>,
}

impl ResolvedJoin {
    /// The join as SQL, after the FROM items before it.
    pub fn render(&self) -> String {
        self.render_from(&self.table.quoted())
    }

    /// [`Self::render`] reading `table` (SQL naming a row source) in place of the joined table.
    pub fn render_from(&self, table: &str) -> String {
        let a = ident(&self.alias);
        let mut conds = self.equalities();
        if let Some(also) = &self.also {
            conds.push(format!("({also})"));
        }
        let kind = if self.inner { "JOIN" } else { "LEFT JOIN" };
        match &self.pick {
            None => format!(" {kind} {table} AS {a} ON {}", conds.join(" AND ")),
            Some(order) => format!(
                " {kind} LATERAL (SELECT * FROM {table} AS {a} WHERE {} ORDER BY {order} LIMIT 1) AS {a} ON true",
                conds.join(" AND ")
            ),
        }
    }

    /// The join with only its `on` equalities: every candidate row, whatever `pick` and `also`
    /// choose (tracing wants a superset). A left join: a row of a table before it with no match
    /// here still leads on where a later `on` does not need this one.
    pub fn render_candidates(&self) -> String {
        format!(" LEFT JOIN {} AS {} ON {}", self.table.quoted(), ident(&self.alias), self.equalities().join(" AND "))
    }

    /// The `on` equalities: `a."col" = (expr)`.
    fn equalities(&self) -> Vec<String> {
        let a = ident(&self.alias);
        self.on.iter().map(|o| format!("{a}.{} = ({})", ident(&o.column), o.expr)).collect()
    }

    /// The link column names.
    pub fn link_columns(&self) -> Vec<String> {
        self.on.iter().map(|o| o.column.clone()).collect()
    }
}

/// How a source column gets its value back from a green row, for a way back after the switch.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "how", content = "expr", rename_all = "snake_case")]
pub enum ReverseHow {
    /// Derived from the forward mapping: the column carried verbatim, renamed, or through a
    /// cast or time-zone shift that undoes itself.
    Derived(String),
    /// Given by `[table.reverse]`.
    Declared(String),
    /// Green does not carry it: rows written on green get its default on blue, updates leave it.
    NotCarried,
}

/// One source column on the way back.
#[derive(Debug, Clone, Serialize)]
pub struct ReverseColumn {
    /// Source column on blue.
    pub column: String,
    /// Its type on blue.
    pub type_name: String,
    /// Where its value comes from.
    pub how: ReverseHow,
}

/// Whether the entry's rows can be written back to blue from green's, and why not.
#[derive(Debug, Clone, Serialize)]
pub struct Reverse {
    /// Every source column, in source order.
    pub columns: Vec<ReverseColumn>,
    /// Why a way back is impossible for this entry; `None` when it is possible.
    pub impossible: Option<String>,
    /// Joined tables written back with the driving row (`write_back = true`), in join order.
    pub joins: Vec<ReverseJoin>,
    /// Target columns whose value comes from a lookup join only (one not written back): a
    /// change green makes to them does not reach blue. `plan` says so.
    pub lookup_only: Vec<String>,
}

/// A joined table the way back writes: each green row that has it (`present`) gives one row of
/// it, upserted on `key`; the rows the driving row joins on blue that green's row no longer
/// gives are deleted.
#[derive(Debug, Clone, Serialize)]
pub struct ReverseJoin {
    /// The join's alias.
    pub alias: String,
    /// The joined table on blue.
    pub table: QualifiedName,
    /// Every column of it, in table order.
    pub columns: Vec<ReverseColumn>,
    /// The unique key the upsert conflicts on: columns all carried back.
    pub key: Vec<String>,
    /// When a green row has this joined row: an expression over the green row.
    pub present: String,
}

/// The expression giving `column` from a green row (`None` when it is not carried).
pub fn reverse_expr<'a>(columns: &'a [ReverseColumn], column: &str) -> Option<&'a str> {
    columns.iter().find(|c| c.column == column).and_then(|c| match &c.how {
        ReverseHow::Derived(e) | ReverseHow::Declared(e) => Some(e.as_str()),
        ReverseHow::NotCarried => None,
    })
}

impl Reverse {
    /// The expression giving source `column` from a green row (`None` when it is not carried).
    pub fn expr(&self, column: &str) -> Option<&str> {
        reverse_expr(&self.columns, column)
    }
}

impl ReverseJoin {
    /// The expression giving `column` of the joined table from a green row.
    pub fn expr(&self, column: &str) -> Option<&str> {
        reverse_expr(&self.columns, column)
    }
}

/// Size estimate from blue's statistics.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Estimate {
    /// Rows (reltuples; exact count when never analyzed and small).
    pub rows: u64,
    /// Bytes (heap, TOAST and indexes).
    pub bytes: u64,
}

/// A table entry resolved against both catalogs.
#[derive(Debug, Clone, Serialize)]
pub struct ResolvedTable {
    /// Stable identity in state.
    pub id: TableId,
    /// 1-based position in the plan (for messages only; state never stores it).
    pub index: usize,
    /// Line of the entry's `source` in the plan file.
    pub line: usize,
    /// Source table on blue.
    pub source: QualifiedName,
    /// Target table on green.
    pub target: QualifiedName,
    /// Every target column, mapped or defaulted, in target order.
    pub columns: Vec<ResolvedColumn>,
    /// Key columns.
    pub key: Vec<KeyColumn>,
    /// Green key columns set to a constant by the plan (a tenant id in every primary key): with
    /// `key`'s target columns they make the unique key apply upserts on. Rows of the entry are
    /// told apart by `key` alone (the constant is the same in each).
    pub constant_key: Vec<String>,
    /// Filter over the source row.
    pub filter: Option<String>,
    /// Indexes and constraints dropped before the bulk load and rebuilt after.
    pub deferred: Vec<DeferredObject>,
    /// Sequences carried at cutover.
    pub sequences: Vec<SequenceMapping>,
    /// Size estimate.
    pub estimate: Estimate,
    /// Binary COPY is safe (no user-defined array or composite types, whose binary form embeds
    /// server-specific OIDs).
    pub binary_copy: bool,
    /// The source table's columns (name, type OID) when the plan was resolved; capture stops if
    /// blue reports another shape.
    #[serde(skip)]
    pub source_columns: Vec<(String, u32)>,
    /// The name expressions use for the source (driving) table when it differs from how the
    /// FROM clause names it: the plan's `alias`, or the table's name once there are joins.
    pub alias: Option<String>,
    /// Tables joined to each driving row, in order.
    pub joins: Vec<ResolvedJoin>,
    /// The way back: each source column from a green row.
    pub reverse: Reverse,
}

impl ResolvedTable {
    /// The blue tables the way back writes for this entry (its source, then each joined table
    /// with `write_back`), each with its carried columns and the key its rows are upserted on.
    pub fn written_back(&self) -> Vec<(&QualifiedName, Vec<&str>, Vec<&str>)> {
        fn carried(columns: &[ReverseColumn]) -> Vec<&str> {
            columns.iter().filter(|c| reverse_expr(columns, &c.column).is_some()).map(|c| c.column.as_str()).collect()
        }
        let mut out =
            vec![(&self.source, carried(&self.reverse.columns), self.key.iter().map(|k| k.source.as_str()).collect())];
        for j in &self.reverse.joins {
            out.push((&j.table, carried(&j.columns), j.key.iter().map(String::as_str).collect()));
        }
        out
    }

    /// Target columns that receive a value, in order.
    pub fn mapped(&self) -> impl Iterator<Item = &ResolvedColumn> {
        self.columns.iter().filter(|c| c.expr.is_some())
    }

    /// The transforming SELECT list: `(expr)::type AS "col", ...`.
    pub fn select_list(&self) -> String {
        self.mapped()
            .map(|c| format!("({})::{} AS {}", c.expr.as_deref().unwrap_or("NULL"), c.target_type, ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Quoted target column list for COPY and INSERT.
    pub fn target_column_list(&self) -> String {
        self.mapped().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ")
    }

    /// The transforming SELECT over blue restricted by `condition` (and the plan's filter).
    pub fn source_select(&self, condition: Option<&str>) -> String {
        self.source_select_from(None, condition)
    }

    /// [`Self::source_select`] reading `part` (one leaf partition of the source, quoted) under
    /// the source's name instead of the source itself.
    pub fn source_select_from(&self, part: Option<&str>, condition: Option<&str>) -> String {
        let mut conds = Vec::new();
        if let Some(c) = condition {
            conds.push(format!("({c})"));
        }
        if let Some(f) = &self.filter {
            conds.push(format!("({f})"));
        }
        let where_ = if conds.is_empty() { String::new() } else { format!(" WHERE {}", conds.join(" AND ")) };
        format!("SELECT {} FROM {}{where_}", self.select_list(), self.from_clause(part))
    }

    /// The FROM clause: the source (or leaf `part` of it) under its alias, then the joins.
    pub fn from_clause(&self, part: Option<&str>) -> String {
        let mut from = match (part, &self.alias) {
            (Some(p), _) => format!("{p} AS {}", self.qualifier()),
            (None, Some(a)) => format!("{} AS {}", self.source.quoted(), ident(a)),
            (None, None) => self.source.quoted(),
        };
        for j in &self.joins {
            from.push_str(&j.render());
        }
        from
    }

    /// The driving table and its joins up to the one named `alias` (the ones after it cannot
    /// narrow which of its rows a driving row joins).
    pub fn from_through(&self, alias: &str) -> String {
        let mut from = match &self.alias {
            Some(a) => format!("{} AS {}", self.source.quoted(), ident(a)),
            None => self.source.quoted(),
        };
        for j in &self.joins {
            from.push_str(&j.render());
            if j.alias == alias {
                break;
            }
        }
        from
    }

    /// How SQL over [`Self::from_clause`] names the driving table (quoted).
    pub fn qualifier(&self) -> String {
        ident(self.alias.as_deref().unwrap_or(&self.source.name))
    }

    /// `column` of the driving table, qualified: unambiguous beside joined tables.
    pub fn qualified(&self, column: &str) -> String {
        format!("{}.{}", self.qualifier(), ident(column))
    }

    /// What defines the rows this entry puts on green: source, key, every column's expression
    /// and the filter. `copy` stores it; a later run whose entry defines other rows for a table
    /// already copied is refused (see [`ResolvedTable::changes_from`]).
    pub fn definition(&self) -> serde_json::Value {
        let columns: serde_json::Map<String, serde_json::Value> =
            self.columns.iter().map(|c| (c.name.clone(), serde_json::json!(c.expr))).collect();
        serde_json::json!({
            "source": self.source.to_string(),
            "key": self.key.iter().map(|k| &k.source).collect::<Vec<_>>(),
            "columns": columns,
            "filter": self.filter,
            "joins": self.joins.iter().map(ResolvedJoin::render).collect::<Vec<_>>(),
        })
    }

    /// What differs between a stored [`ResolvedTable::definition`] and this entry's, one line
    /// per difference; empty when they define the same rows.
    pub fn changes_from(&self, stored: &serde_json::Value) -> Vec<String> {
        let now = self.definition();
        let mut out = Vec::new();
        for field in ["source", "key", "filter", "joins"] {
            // A definition stored before joins existed has none.
            let was = match (field, &stored[field]) {
                ("joins", serde_json::Value::Null) => serde_json::json!([]),
                (_, v) => v.clone(),
            };
            if was != now[field] {
                out.push(format!("{field} was {was} and is now {}", now[field]));
            }
        }
        let (empty, none) = (serde_json::Map::new(), serde_json::Value::Null);
        let before = stored["columns"].as_object().unwrap_or(&empty);
        let after = now["columns"].as_object().unwrap_or(&empty);
        let mut names: Vec<&String> = before.keys().chain(after.keys()).collect();
        names.sort();
        names.dedup();
        for name in names {
            let (b, a) = (before.get(name).unwrap_or(&none), after.get(name).unwrap_or(&none));
            if b != a {
                let show =
                    |v: &serde_json::Value| v.as_str().map(|s| format!("`{s}`")).unwrap_or_else(|| "default".into());
                let why = match self.columns.iter().find(|c| &c.name == name) {
                    // A copy begun before same-named columns mapped by default: say how to keep
                    // what green holds.
                    Some(c) if c.same_name && b.is_null() => format!(
                        " (same-named columns map by default now; to leave {name} to its default as before, \
                         add \"{name}\" to the entry's drop)"
                    ),
                    _ => String::new(),
                };
                out.push(format!("column {name} was {} and is now {}{why}", show(b), show(a)));
            }
        }
        out
    }

    /// Whether one of `names` names this entry: its id, or its source or target, qualified or
    /// not (how `--table` and `--recopy` take tables).
    pub fn named_by_any(&self, names: &[String]) -> bool {
        names.iter().any(|n| {
            *n == self.id.as_str()
                || *n == self.target.to_string()
                || *n == self.source.to_string()
                || *n == self.target.name
                || *n == self.source.name
        })
    }

    /// Quoted key columns on blue: `"a", "b"`.
    pub fn source_key_list(&self) -> String {
        self.key.iter().map(|k| ident(&k.source)).collect::<Vec<_>>().join(", ")
    }

    /// Quoted key columns on green.
    pub fn target_key_list(&self) -> String {
        self.key.iter().map(|k| ident(&k.target)).collect::<Vec<_>>().join(", ")
    }
}

/// How changes on blue will be captured, and why.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureDecision {
    /// The method that will be used.
    pub method: CaptureMethod,
    /// Why (e.g. `wal_level is replica`).
    pub reason: String,
}

/// A prerequisite that was checked, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// The plan resolved against both catalogs.
#[derive(Debug, Clone, Serialize)]
pub struct ResolvedPlan {
    /// Plan name.
    pub name: String,
    /// The plan file.
    pub path: std::path::PathBuf,
    /// Redacted blue target.
    pub blue: String,
    /// Redacted green target.
    pub green: String,
    /// Copy settings in force.
    pub copy: CopySettings,
    /// Capture method and why.
    pub capture: CaptureDecision,
    /// Resolved tables in plan order.
    pub tables: Vec<ResolvedTable>,
    /// Prerequisites checked.
    pub checks: Vec<Check>,
    /// Problems; empty means the plan is sound.
    pub problems: Vec<Problem>,
    /// Estimated copy time in seconds.
    pub estimated_seconds: f64,
}

impl ResolvedPlan {
    /// The ordered steps `copy` and `cutover` will run.
    pub fn steps(&self) -> Vec<String> {
        let n = self.tables.len();
        let deferred: usize = self.tables.iter().map(|t| t.deferred.len()).sum();
        let mut steps = vec![match self.capture.method {
            CaptureMethod::Trigger => {
                format!("capture: install row triggers and a change table on blue for {n} table(s)")
            }
            _ => format!(
                "capture: create publication and logical slot `bluegreen_{}` on blue for {n} table(s)",
                self.name.replace('-', "_")
            ),
        }];
        if self.copy.defer_indexes && deferred > 0 {
            steps.push(format!("copy: record and drop {deferred} index(es)/constraint(s) on green"));
        }
        steps.push(format!(
            "copy: {n} table(s), {} rows estimated, in chunks of {} rows with {} worker(s)",
            self.tables.iter().map(|t| t.estimate.rows).sum::<u64>(),
            self.copy.chunk_rows,
            self.copy.workers
        ));
        if self.copy.defer_indexes && deferred > 0 {
            steps.push("copy: rebuild indexes and constraints per table; foreign keys NOT VALID, then VALIDATE".into());
        }
        steps.push("follow: apply captured keys to green until stopped or switched".into());
        steps.push("verify: checksum every table in key-hash buckets on both sides".into());
        steps.push(
            "cutover: catch up and re-verify in rounds, PAUSE, drain, final check (rows, foreign keys), sequences, \
             in_pause hooks, move traffic as the cutover line says"
                .into(),
        );
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ResolvedTable {
        let col = |name: &str, ty: &str, expr: Option<&str>| ResolvedColumn {
            name: name.into(),
            target_type: ty.into(),
            expr: expr.map(str::to_string),
            expr_type: None,
            hash_by_text: false,
            same_name: false,
        };
        ResolvedTable {
            id: TableId::from_stored("public.tokens".into()),
            index: 2,
            line: 7,
            source: QualifiedName { schema: "public".into(), name: "old tokens".into() },
            target: QualifiedName { schema: "public".into(), name: "tokens".into() },
            columns: vec![
                col("sig", "text", Some("signature")),
                col("scopes", "text[]", Some("string_to_array(scope, ' ')")),
                col("migrated_at", "timestamptz", None),
            ],
            key: vec![KeyColumn {
                source: "signature".into(),
                target: "sig".into(),
                source_type: "text".into(),
                target_type: "text".into(),
                integer: false,
                via_source_type: false,
            }],
            constant_key: Vec::new(),
            filter: Some("active".into()),
            deferred: Vec::new(),
            sequences: Vec::new(),
            estimate: Estimate { rows: 0, bytes: 0 },
            binary_copy: true,
            source_columns: Vec::new(),
            alias: None,
            joins: Vec::new(),
            reverse: Reverse {
                columns: Vec::new(),
                impossible: Some("not resolved".into()),
                joins: Vec::new(),
                lookup_only: Vec::new(),
            },
        }
    }

    #[test]
    fn the_transforming_select_names_every_mapped_column_casts_it_and_filters() {
        let t = table();
        assert_eq!(
            t.source_select(Some("x = 1")),
            "SELECT (signature)::text AS \"sig\", (string_to_array(scope, ' '))::text[] AS \"scopes\" \
             FROM \"public\".\"old tokens\" WHERE (x = 1) AND (active)"
        );
        assert_eq!(t.target_column_list(), "\"sig\", \"scopes\"");
        assert_eq!(t.target_key_list(), "\"sig\"");
    }

    #[test]
    fn a_changed_definition_names_each_change() {
        let t = table();
        let stored = t.definition();
        assert!(t.changes_from(&stored).is_empty());
        let mut changed = t.clone();
        changed.columns[1].expr = Some("ARRAY[scope]".into());
        changed.columns[2].expr = Some("now()".into());
        changed.filter = None;
        assert_eq!(
            changed.changes_from(&stored),
            vec![
                "filter was \"active\" and is now null".to_string(),
                "column migrated_at was default and is now `now()`".to_string(),
                "column scopes was `string_to_array(scope, ' ')` and is now `ARRAY[scope]`".to_string(),
            ]
        );
    }
}
