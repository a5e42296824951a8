//! Resolution: the plan checked against blue's and green's catalogs, every problem collected.

use std::collections::HashMap;

use indexmap::IndexMap;

use tokio_postgres::Client;

use super::{
    file::{Plan, TableEntry},
    prereq, Check, Estimate, KeyColumn, Problem, ResolvedColumn, ResolvedPlan, ResolvedTable, SequenceMapping, TableId,
};
use crate::{
    error::{pg_message, Error, Result},
    pg::{
        catalog::{self, TableInfo, TypeRules, UniqueKey},
        ident, Side,
    },
    state::{State, TableState},
};

/// Bytes per second assumed for the time estimate; measured by `examples/bench_copy.rs` on a
/// 2-core machine (copy including index rebuild), see docs/performance.md.
pub const ESTIMATE_BYTES_PER_SECOND: f64 = 120.0 * 1024.0 * 1024.0;

/// Tables smaller than this are counted exactly when they have never been analyzed.
const EXACT_COUNT_BELOW_BYTES: i64 = 64 * 1024 * 1024;

/// Resolves a plan against both databases. Connection failures are errors (naming the side);
/// everything wrong with the plan itself is collected into `problems`.
pub async fn resolve(plan: &Plan, blue: &Client, green: &Client) -> Result<ResolvedPlan> {
    let rules = TypeRules::load(blue, Side::Blue).await?;
    let state = State::new(&plan.name);
    let state = if state.exists(green).await? { Some(state) } else { None };
    let mut problems = Vec::new();
    let mut tables = Vec::new();
    let ids =
        TableId::assign(plan.tables.iter().map(|e| (&e.source, &e.target, e.filter.as_ref().map(|f| f.0.as_str()))));
    for (entry, id) in plan.tables.iter().zip(ids) {
        if let Some(t) = resolve_table(entry, id, blue, green, &rules, state.as_ref(), &mut problems).await? {
            tables.push(t);
        }
    }
    check_overlaps(plan, &mut problems);
    check_unreached(plan, &tables, &mut problems);
    let (capture, mut checks) = prereq::check(plan, &tables, blue, green, &mut problems).await?;
    checks.push(sample_all(&tables, blue, &mut problems).await?);
    checks.push(round_trip_sample(&tables, blue, &problems).await?);
    let bytes: u64 = tables.iter().map(|t| t.estimate.bytes).sum();
    Ok(ResolvedPlan {
        name: plan.name.clone(),
        path: plan.path.clone(),
        blue: plan.blue.to_string(),
        green: plan.green.to_string(),
        copy: plan.copy.clone(),
        capture,
        tables,
        checks,
        problems,
        estimated_seconds: bytes as f64 / ESTIMATE_BYTES_PER_SECOND,
    })
}

/// Runs every entry's transform over a sample of blue's rows (entries whose columns resolved
/// without problems), and says so.
async fn sample_all(tables: &[ResolvedTable], blue: &Client, problems: &mut Vec<Problem>) -> Result<Check> {
    let mut rows = 0;
    let mut sampled = 0;
    for t in tables {
        let target = t.target.to_string();
        // A sampled expression may have ended the session (pg_terminate_backend in a filter).
        if blue.is_closed() || problems.iter().any(|p| p.table.as_deref() == Some(target.as_str())) {
            continue;
        }
        let before = problems.len();
        rows += super::sample::sample(blue, t, problems).await?;
        sampled += usize::from(problems.len() == before);
    }
    let failed = tables.len() - sampled;
    Ok(Check {
        name: "transform on blue's rows".into(),
        ok: failed == 0,
        detail: format!(
            "every expression ran over {rows} row(s) sampled from {sampled} table(s) (up to {} each){}",
            super::sample::SAMPLE_ROWS,
            if failed > 0 { format!("; {failed} table(s) not sampled or failed") } else { String::new() }
        ),
    })
}

/// The way back over a sample of blue's rows (the first 1000 of each table): which tables have
/// one, and the first rows that would not come back unchanged. A check, not a problem: the way
/// back is optional; `verify --reverse` proves it over every row.
async fn round_trip_sample(tables: &[ResolvedTable], blue: &Client, problems: &[Problem]) -> Result<Check> {
    let mut lossy = Vec::new();
    let mut without = 0;
    let mut exact = 0;
    for t in tables {
        let target = t.target.to_string();
        if blue.is_closed() || problems.iter().any(|p| p.table.as_deref() == Some(target.as_str())) {
            continue;
        }
        if t.reverse.impossible.is_some() {
            without += 1;
            continue;
        }
        let Some(sql) = super::round_trip_sql(t, Some(super::sample::SAMPLE_ROWS), 3) else { continue };
        match super::sample::read_only_rows(blue, &sql).await? {
            Ok(rows) if rows.is_empty() => exact += 1,
            Ok(rows) => {
                let first = &rows[0];
                let key: Vec<String> = first.get(0);
                let (col, b, back): (String, Option<String>, Option<String>) =
                    (first.get(1), first.get(2), first.get(3));
                lossy.push(format!(
                    "{}: key ({}) column {col}: {} comes back {}",
                    t.target,
                    key.join(", "),
                    b.as_deref().unwrap_or("NULL"),
                    back.as_deref().unwrap_or("NULL")
                ));
            }
            Err(e) => lossy.push(format!("{}: {}", t.target, pg_message(&e))),
        }
    }
    Ok(Check {
        name: "way back on blue's rows".into(),
        ok: lossy.is_empty(),
        detail: format!(
            "{exact} table(s) come back unchanged, {without} have no way back{}",
            if lossy.is_empty() { String::new() } else { format!("; would change: {}", lossy.join("; ")) }
        ),
    })
}

/// Collects problems for one table entry; returns the resolved table when both sides exist.
struct Ctx<'a> {
    entry: &'a TableEntry,
    problems: &'a mut Vec<Problem>,
    /// The FROM clause expressions are prepared over: the source under its alias, then the
    /// joins resolved so far.
    from: String,
}

impl Ctx<'_> {
    fn report(&mut self, field: &str, line: usize, column: Option<&str>, message: String, fix: Option<String>) {
        self.problems.push(Problem {
            field: if field.is_empty() { self.entry.path() } else { format!("{}.{field}", self.entry.path()) },
            line: Some(line),
            table: Some(self.entry.target.to_string()),
            column: column.map(str::to_string),
            message,
            fix,
        });
    }
}

/// `entry` with every target column it does not name mapped from the source column of the same
/// name, unless that source column is in `drop` or the target column cannot be written
/// (generated).
fn with_same_names(entry: &TableEntry, src: &TableInfo, tgt: &TableInfo, alias: Option<&str>) -> TableEntry {
    let mut effective = entry.clone();
    for col in tgt.columns.iter().filter(|c| !c.generated && !entry.columns.contains_key(&c.name)) {
        let from_source = src.column(&col.name).is_some_and(|s| !s.generated);
        if from_source && !entry.drop.0.contains(&col.name) {
            // Beside joined tables, the driving table's column (JOINS.md #5: a name that only a
            // joined table has needs an expression).
            let expr = match alias {
                Some(a) => format!("{}.{}", ident(a), ident(&col.name)),
                None => ident(&col.name),
            };
            effective.columns.insert(col.name.clone(), (expr, entry.source_line));
            effective.same_name.push(col.name.clone());
        }
    }
    effective
}

/// Source columns of every entry that reach no target column: not mapped by name, not named in
/// any expression, filter or key of an entry over that source, and not in `drop`. Entries that
/// share a source are taken together (a table split in two). A name counts as used wherever it
/// appears as a word in an expression: a quoted string holding it counts too.
fn check_unreached(plan: &Plan, tables: &[ResolvedTable], problems: &mut Vec<Problem>) {
    for (i, t) in tables.iter().enumerate() {
        if tables[..i].iter().any(|o| o.source == t.source) {
            continue;
        }
        // An entry over this source that did not resolve (its problems are reported) may be
        // the one that uses a column.
        if plan.tables.iter().any(|e| e.source == t.source && !tables.iter().any(|r| r.index == e.index)) {
            continue;
        }
        let siblings: Vec<&ResolvedTable> = tables.iter().filter(|o| o.source == t.source).collect();
        let entries: Vec<&TableEntry> =
            plan.tables.iter().filter(|e| siblings.iter().any(|s| s.index == e.index)).collect();
        // A driving column used only to link a join, or by a join's pick, is used too.
        let joins = siblings.iter().flat_map(|s| {
            s.joins
                .iter()
                .flat_map(|j| j.on.iter().map(|o| o.expr.as_str()).chain(j.pick.as_deref()).chain(j.also.as_deref()))
        });
        let texts: Vec<&str> = siblings
            .iter()
            .flat_map(|s| s.columns.iter().filter_map(|c| c.expr.as_deref()).chain(s.filter.as_deref()))
            .chain(siblings.iter().flat_map(|s| s.key.iter().map(|k| k.source.as_str())))
            .chain(joins)
            .collect();
        for (name, _) in &t.source_columns {
            if entries.iter().any(|e| e.drop.0.contains(name)) || texts.iter().any(|x| mentions(x, name)) {
                continue;
            }
            let first = entries.first().map(|e| (e.path(), e.source_line)).unwrap_or_default();
            problems.push(Problem {
                field: first.0.clone(),
                line: Some(first.1),
                table: Some(t.source.to_string()),
                column: Some(name.clone()),
                message: format!(
                    "source column {}.{name} reaches no target column: its values would be lost",
                    t.source
                ),
                fix: Some(format!(
                    "map it (`<target column> = \"{name}\"` under [table.columns]), or say it is left behind: \
                     drop = [\"{name}\"]"
                )),
            });
        }
    }
    // A `drop` naming no source column is a typo that silences nothing.
    for e in &plan.tables {
        let Some(t) = tables.iter().find(|t| t.index == e.index) else { continue };
        for d in &e.drop.0 {
            if !t.source_columns.iter().any(|(n, _)| n == d) {
                problems.push(Problem {
                    field: format!("{}.drop", e.path()),
                    line: Some(e.drop.1),
                    table: Some(e.source.to_string()),
                    column: Some(d.clone()),
                    message: format!("`{d}` is not a column of {}", e.source),
                    fix: None,
                });
            }
        }
    }
}

/// Whether `expr` names column `name` as a word (unquoted names compare without case).
fn mentions(expr: &str, name: &str) -> bool {
    let word = |c: char| c.is_alphanumeric() || c == '_' || c == '$';
    let (hay, needle) = if name.chars().any(char::is_uppercase) {
        (expr.to_string(), name.to_string())
    } else {
        (expr.to_lowercase(), name.to_string())
    };
    hay.match_indices(&needle).any(|(at, m)| {
        let before = hay[..at].chars().next_back();
        let after = hay[at + m.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

/// Why `name` (the entry's `what`, on `side`) is no table, and what to do.
async fn not_a_table(
    client: &Client,
    what: &str,
    side: &str,
    name: &crate::pg::QualifiedName,
) -> Result<(String, String)> {
    Ok(match catalog::relation_kind(client, name).await? {
        Some(kind) => (
            format!("{what} {name} is {kind} on {side}, not a table"),
            match what {
                "source" => "capture follows tables: name as `source` the table whose rows become the target's rows, \
                             and join the others ([[table.join]]) to build one target row from several tables"
                    .to_string(),
                "joined" => {
                    "capture follows tables: join the tables it reads instead, one [[table.join]] each".to_string()
                }
                _ => "name the table the rows are written to".to_string(),
            },
        ),
        None => (
            format!("{what} table {name} does not exist on {side}"),
            "check the schema and the name (both are case-sensitive as written)".to_string(),
        ),
    })
}

async fn resolve_table(
    entry: &TableEntry,
    id: TableId,
    blue: &Client,
    green: &Client,
    rules: &TypeRules,
    state: Option<&State>,
    problems: &mut Vec<Problem>,
) -> Result<Option<ResolvedTable>> {
    let mut cx = Ctx { entry, problems, from: String::new() };
    let src = catalog::table_info(blue, Side::Blue, &entry.source).await?;
    let mut tgt = catalog::table_info(green, Side::Green, &entry.target).await?;
    let recorded = match (state, tgt.as_mut()) {
        (Some(state), Some(tgt)) => recorded_keys(state, green, &id, entry, tgt).await?,
        _ => None,
    };
    if src.is_none() {
        let (message, fix) = not_a_table(blue, "source", "blue", &entry.source).await?;
        cx.problems.push(Problem {
            field: format!("{}.source", entry.path()),
            line: Some(entry.source_line),
            table: Some(entry.source.to_string()),
            column: None,
            message,
            fix: Some(fix),
        });
    }
    if tgt.is_none() {
        let (message, fix) = not_a_table(green, "target", "green", &entry.target).await?;
        cx.report("target", entry.target_line, None, message, Some(fix));
    }
    let (Some(src), Some(tgt)) = (src, tgt) else {
        return Ok(None);
    };
    if src.inherited {
        cx.report("source", entry.source_line, None, inherited(&entry.source), None);
    }
    // Named in expressions by its alias once there are joins (the default alias is its name).
    let alias = (entry.alias.is_some() || !entry.joins.is_empty())
        .then(|| entry.alias.clone().unwrap_or_else(|| entry.source.name.clone()));
    // From here on, the entry with its same-named columns mapped.
    let effective = with_same_names(entry, &src, &tgt, alias.as_deref());
    let from = match &alias {
        Some(a) => format!("{} AS {}", entry.source.quoted(), ident(a)),
        None => entry.source.quoted(),
    };
    let mut cx = Ctx { entry: &effective, problems: cx.problems, from };
    let entry = &effective;
    let Some(joins) = resolve_joins(&mut cx, blue).await? else {
        return Ok(None);
    };
    if entry.columns.is_empty() {
        cx.report(
            "columns",
            entry.source_line,
            None,
            format!("no columns mapped: no column of {} has a same-named column on {}", entry.target, entry.source),
            Some("add [table.columns] with target = \"expression over the source row\"".into()),
        );
    }

    let columns = resolve_columns(&mut cx, &tgt, blue, rules).await?;
    let (mut key, constant_key) = match resolve_key(&mut cx, &src, &tgt, alias.as_deref()) {
        Some((k, c)) => (Some(k), c),
        None => (None, Vec::new()),
    };
    for k in key.iter_mut().flatten() {
        k.via_source_type = k.source_type != k.target_type
            && green
                .query_one("SELECT to_regtype($1) IS NOT NULL", &[&k.source_type])
                .await
                .map_err(Error::db("green: looking up key types"))?
                .get::<_, bool>(0);
    }
    check_filter(&mut cx, blue).await;
    check_reads(&mut cx, blue, &columns, alias.as_deref(), &joins).await?;
    let reverse = resolve_reverse(&mut cx, blue, &src, &columns, alias.as_deref(), &joins).await?;
    let sequences = sequences(entry, &src, &tgt, alias.as_deref());
    let deferred = match recorded {
        Some(defs) => defs,
        None => catalog::deferrable_objects(green, &entry.target, tgt.oid).await?,
    };
    let estimate = estimate(blue, entry, &src).await?;
    let binary_copy = binary_copy_safe(green, entry, &tgt).await?;
    let table = ResolvedTable {
        id,
        index: entry.index,
        line: entry.source_line,
        source: entry.source.clone(),
        target: entry.target.clone(),
        columns,
        key: key.unwrap_or_default(),
        constant_key,
        filter: entry.filter.as_ref().map(|(f, _)| f.clone()),
        deferred,
        sequences,
        estimate,
        binary_copy,
        source_columns: src.columns.iter().filter(|c| !c.generated).map(|c| (c.name.clone(), c.type_oid)).collect(),
        alias,
        joins,
        reverse,
    };
    // Each join's trace runs on blue as capture will run it (an `on` expression reaching a
    // table some other way than by its alias fails here, not on the first write).
    for (n, j) in table.joins.iter().enumerate() {
        let sql = super::trace_sql(&table, n, &[], super::KeyText::Output);
        if let Err(e) = blue.prepare(&sql).await {
            cx.report(
                &format!("join[{}]", n + 1),
                entry.joins[n].line,
                None,
                format!(
                    "tracing writes of join {} to the rows of {} fails on blue: {}",
                    j.alias,
                    table.source,
                    pg_message(&e)
                ),
                Some("write `on` expressions over earlier tables by their aliases (`c.challenge`)".into()),
            );
        }
    }
    Ok(Some(table))
}

/// While a copy is under way the deferred keys are dropped on green: what state recorded is what
/// the table has, as far as the plan is concerned. Adds the recorded unique keys to `tgt` and
/// returns the recorded objects, for an entry whose copy is loading or indexing.
async fn recorded_keys(
    state: &State,
    green: &Client,
    id: &TableId,
    entry: &TableEntry,
    tgt: &mut TableInfo,
) -> Result<Option<Vec<catalog::DeferredObject>>> {
    let Some((st, defs)) = state.table_state(green, id).await? else { return Ok(None) };
    if !matches!(st, TableState::Loading | TableState::Indexing) {
        return Ok(None);
    }
    for d in &defs {
        if let Some(cols) = &d.unique_columns {
            if d.owner_is(&entry.target) {
                tgt.unique_keys.push(UniqueKey {
                    name: d.name.clone(),
                    columns: cols.clone(),
                    primary: d.kind == "primary key",
                    replica_identity: false,
                    // Recorded keys are green's, never arbiters of the way back's upsert.
                    immediate: true,
                });
            }
        }
    }
    Ok(Some(defs))
}

/// The filter must prepare on blue and be boolean.
async fn check_filter(cx: &mut Ctx<'_>, blue: &Client) {
    let entry = cx.entry;
    let Some((filter, line)) = &entry.filter else { return };
    let sql = format!("SELECT ({filter}) FROM {} LIMIT 0", cx.from);
    match blue.prepare(&sql).await {
        Ok(st) if st.columns()[0].type_() == &tokio_postgres::types::Type::BOOL => {}
        Ok(st) => cx.report(
            "filter",
            *line,
            None,
            format!("filter has type {}, not boolean", st.columns()[0].type_().name()),
            None,
        ),
        Err(e) => cx.report(
            "filter",
            *line,
            None,
            format!("filter is not valid on blue {}: {}", entry.source, pg_message(&e)),
            None,
        ),
    }
}

/// Sequences owned by target columns, with blue's sequence when the column is copied verbatim.
fn sequences(entry: &TableEntry, src: &TableInfo, tgt: &TableInfo, alias: Option<&str>) -> Vec<SequenceMapping> {
    tgt.columns
        .iter()
        .filter_map(|c| {
            let green_sequence = c.sequence.clone()?;
            let expr = entry.columns.get(&c.name).map(|(e, _)| e.trim().to_string());
            let blue_sequence = expr
                .and_then(|e| src.columns.iter().find(|s| verbatim(&e, alias, true, &s.name)))
                .and_then(|s| s.sequence.clone());
            Some(SequenceMapping { column: c.name.clone(), green_sequence, blue_sequence })
        })
        .collect()
}

/// Binary COPY is safe unless the target has user-defined array or composite types, whose
/// binary form embeds server-specific OIDs.
async fn binary_copy_safe(green: &Client, entry: &TableEntry, tgt: &TableInfo) -> Result<bool> {
    Ok(green
        .query_one(
            "SELECT count(*) = 0 FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
               AND t.oid >= 16384 AND t.typcategory IN ('A', 'C')",
            &[&tgt.oid],
        )
        .await
        .map_err(Error::db(format!("green: reading column types of {}", entry.target)))?
        .get(0))
}

async fn resolve_columns(
    cx: &mut Ctx<'_>,
    tgt: &TableInfo,
    blue: &Client,
    rules: &TypeRules,
) -> Result<Vec<ResolvedColumn>> {
    check_named_columns(cx, tgt);
    let entry = cx.entry;
    let mut out = Vec::new();
    for col in &tgt.columns {
        let Some((expr, line)) = entry.columns.get(&col.name) else {
            if col.not_null && !col.has_default {
                cx.report(
                    "columns",
                    entry.source_line,
                    Some(&col.name),
                    format!(
                        "target column {}.{} ({}) is NOT NULL, has no default and is not mapped",
                        entry.target, col.name, col.type_name
                    ),
                    Some(format!("add `{} = \"<expression over {}>\"` to [table.columns]", col.name, entry.source)),
                );
            }
            out.push(ResolvedColumn {
                name: col.name.clone(),
                target_type: col.type_name.clone(),
                expr: None,
                expr_type: None,
                hash_by_text: col.hash_by_text,
                same_name: false,
            });
            continue;
        };
        // A constant is typed by its target: `:nid` into a uuid column is `'…'::uuid` (a quoted
        // literal in a SELECT list would be text).
        let expr = match entry.constant_columns.contains(&col.name) && !expr.contains("::") {
            true => format!("{}::{}", expr.trim(), col.type_name),
            false => expr.clone(),
        };
        let expr_type = expression_type(cx, blue, rules, col, &expr, *line).await?;
        out.push(ResolvedColumn {
            name: col.name.clone(),
            target_type: col.type_name.clone(),
            expr: Some(expr),
            expr_type,
            hash_by_text: col.hash_by_text,
            same_name: entry.same_name.contains(&col.name),
        });
    }
    Ok(out)
}

/// Every column the plan names must exist on green and be writable.
fn check_named_columns(cx: &mut Ctx<'_>, tgt: &TableInfo) {
    let entry = cx.entry;
    for (name, (_, line)) in &entry.columns {
        match tgt.column(name) {
            None => cx.report(
                &format!("columns.{name}"),
                *line,
                Some(name),
                format!("target table {} has no column `{name}`", entry.target),
                None,
            ),
            Some(c) if c.generated => cx.report(
                &format!("columns.{name}"),
                *line,
                Some(name),
                format!("{}.{name} is a generated column and cannot be written", entry.target),
                Some(format!("remove `{name}` from [table.columns]")),
            ),
            Some(_) => {}
        }
    }
}

/// The type `expr` has on blue, when it prepares there; reports an expression that does not
/// prepare or does not assign to the target column's type. The type is shown in the report only
/// when a conversion happens.
async fn expression_type(
    cx: &mut Ctx<'_>,
    blue: &Client,
    rules: &TypeRules,
    col: &catalog::ColumnInfo,
    expr: &str,
    line: usize,
) -> Result<Option<String>> {
    let entry = cx.entry;
    let field = format!("columns.{}", col.name);
    let sql = format!("SELECT ({expr}) FROM {} LIMIT 0", cx.from);
    let st = match blue.prepare(&sql).await {
        Ok(st) => st,
        Err(e) => {
            cx.report(
                &field,
                line,
                Some(&col.name),
                format!("expression `{expr}` is not valid on blue {}: {}", entry.source, pg_message(&e)),
                None,
            );
            return Ok(None);
        }
    };
    let ty = st.columns()[0].type_().clone();
    let row = blue
        .query_one("SELECT to_regtype($1)::oid, format_type($2, NULL)", &[&col.type_name, &ty.oid()])
        .await
        .map_err(Error::db("blue: looking up target types"))?;
    let target_oid: Option<u32> = row.get(0);
    let expr_type: String = row.get(1);
    match target_oid {
        None => cx.report(
            &field,
            line,
            Some(&col.name),
            format!("target type {} does not exist on blue, where the transform runs", col.type_name),
            Some(format!("create the type on blue or map `{}` to an expression of a built-in type", col.name)),
        ),
        Some(oid) if !rules.assignable(ty.oid(), oid) => cx.report(
            &field,
            line,
            Some(&col.name),
            format!("expression `{expr}` has type {expr_type}, but {}.{} is {}", entry.target, col.name, col.type_name),
            Some(format!("convert it explicitly, e.g. `({expr})::{}`, if every value converts", col.type_name)),
        ),
        Some(_) => {}
    }
    let calls = catalog::changing_calls(blue, &entry.source, &cx.from, expr).await?;
    if !calls.is_empty() {
        cx.report(
            &field,
            line,
            Some(&col.name),
            format!(
                "expression `{expr}` calls {}, whose value changes from one read to the next: copy, the \
                 re-read after each write on blue and verify would each compute another value, so \
                 verify never finds {}.{} equal and the cutover cannot pass",
                calls.join(", "),
                entry.target,
                col.name
            ),
            Some(
                "compute the value from the row instead, e.g. a UUID derived from the key: \
                 `md5(<key column>::text)::uuid`; or leave the column to its default on green. A function \
                 of yours that gives the same result for the same row: declare it IMMUTABLE (or STABLE) on blue"
                    .to_string(),
            ),
        );
    }
    Ok(Some(if target_oid == Some(ty.oid()) { col.type_name.clone() } else { expr_type }))
}

/// The entry's key, and the constant columns that complete the green unique key it maps onto.
fn resolve_key(
    cx: &mut Ctx<'_>,
    src: &TableInfo,
    tgt: &TableInfo,
    alias: Option<&str>,
) -> Option<(Vec<KeyColumn>, Vec<String>)> {
    let entry = cx.entry;
    let mut key = Vec::new();
    for k in &entry.key {
        let Some(sc) = src.column(k) else {
            cx.report(
                "key",
                entry.key_line,
                Some(k),
                format!("key column `{k}` does not exist on blue {}", entry.source),
                None,
            );
            continue;
        };
        let target = entry.columns.iter().find(|(_, (e, _))| verbatim(e, alias, true, k)).map(|(t, _)| t.clone());
        let Some(target) = target else {
            cx.report(
                "key",
                entry.key_line,
                Some(k),
                format!("key column `{k}` is not mapped verbatim to any target column of {}", entry.target),
                Some(format!("map a target column to exactly `{k}`")),
            );
            continue;
        };
        let integer = matches!(sc.type_name.as_str(), "integer" | "bigint" | "smallint");
        let target_type = tgt.column(&target).map(|c| c.type_name.clone()).unwrap_or_default();
        key.push(KeyColumn {
            source: k.clone(),
            target,
            source_type: sc.type_name.clone(),
            target_type,
            integer: integer && entry.key.len() == 1,
            via_source_type: false,
        });
    }
    if key.len() != entry.key.len() {
        return None;
    }
    let blue_unique = src
        .unique_keys
        .iter()
        .any(|u| u.columns.iter().all(|c| entry.key.contains(c) && src.column(c).is_some_and(|c| c.not_null)));
    if !blue_unique {
        cx.report(
            "key",
            entry.key_line,
            None,
            format!(
                "key ({}) is not unique on blue {}: no primary key or unique index on NOT NULL columns within it",
                entry.key.join(", "),
                entry.source
            ),
            Some(format!(
                "use the primary key of {} or add a unique index on ({})",
                entry.source,
                entry.key.join(", ")
            )),
        );
    }
    let mut target_set: Vec<&str> = key.iter().map(|k| k.target.as_str()).collect();
    target_set.sort();
    // A unique key made of exactly the mapped columns, or of them plus columns the plan sets to
    // a constant; the smallest such key is the one apply upserts on.
    let constant = |c: &str| entry.constant_columns.iter().any(|k| k == c);
    let green_unique = tgt
        .unique_keys
        .iter()
        .filter(|u| {
            target_set.iter().all(|t| u.columns.iter().any(|c| c == t))
                && u.columns.iter().all(|c| target_set.contains(&c.as_str()) || constant(c))
        })
        .min_by_key(|u| u.columns.len())
        .map(|u| u.columns.iter().filter(|c| !target_set.contains(&c.as_str())).cloned().collect::<Vec<String>>());
    if green_unique.is_none() {
        cx.report(
            "key",
            entry.key_line,
            None,
            format!(
                "key maps to ({}) on green {}, which is not a primary key or unique index there",
                target_set.join(", "),
                entry.target
            ),
            Some(format!(
                "add a unique index on {} ({}) or choose a key that maps onto one (columns the plan sets \
                 to a constant may complete it)",
                entry.target,
                target_set.join(", ")
            )),
        );
    }
    Some((key, green_unique.unwrap_or_default()))
}

/// The way back: each source column from a green row, derived from the forward mapping where it
/// undoes itself (the column verbatim or renamed, a cast, a time-zone shift), else as
/// `[table.reverse]` declares it; the same for each joined table with `write_back = true`; and
/// whether rows written on green can be written to blue.
async fn resolve_reverse(
    cx: &mut Ctx<'_>,
    blue: &Client,
    src: &TableInfo,
    columns: &[ResolvedColumn],
    alias: Option<&str>,
    joins: &[super::ResolvedJoin],
) -> Result<super::Reverse> {
    use super::{ReverseColumn, ReverseHow};
    let entry = cx.entry;
    // A green row, as expressions over it see one: every mapped target column by name.
    let row: Vec<String> = columns
        .iter()
        .filter(|c| c.expr.is_some())
        .map(|c| format!("NULL::{} AS {}", c.target_type, ident(&c.name)))
        .collect();
    let green_row = format!("(SELECT {}) AS g", if row.is_empty() { "1".to_string() } else { row.join(", ") });
    // Whether a declared expression is valid over a green row (as `type`), reported at `field`.
    async fn valid(
        cx: &mut Ctx<'_>,
        blue: &Client,
        green_row: &str,
        (field, line, col): (&str, super::file::Line, &str),
        expr: &str,
        type_name: &str,
    ) {
        let sql = format!("SELECT ({expr})::{type_name} FROM {green_row} LIMIT 0");
        if let Err(e) = blue.prepare(&sql).await {
            cx.report(
                field,
                line,
                Some(col),
                format!("reverse expression `{expr}` is not valid over a green row: {}", pg_message(&e)),
                Some("write it over green's column names, e.g. `array_to_string(scopes, ' ')`".into()),
            );
        }
    }
    let stray = |cx: &mut Ctx<'_>,
                 info: &TableInfo,
                 table: &crate::pg::QualifiedName,
                 field: &str,
                 declared: &IndexMap<String, (String, super::file::Line)>| {
        for (col, (_, line)) in declared {
            if info.column(col).is_none_or(|c| c.generated) {
                cx.report(
                    &format!("{field}.{col}"),
                    *line,
                    Some(col),
                    format!("`{col}` is no writable column of {table}: a reverse table names that table's columns"),
                    None,
                );
            }
        }
    };
    stray(cx, src, &entry.source, "reverse", &entry.reverse);
    let mut out = Vec::new();
    let mut impossible = None;
    for c in src.columns.iter().filter(|c| !c.generated) {
        let how = if let Some((expr, line)) = entry.reverse.get(&c.name) {
            valid(cx, blue, &green_row, (&format!("reverse.{}", c.name), *line, &c.name), expr, &c.type_name).await;
            ReverseHow::Declared(expr.clone())
        } else {
            match derive_reverse(columns, alias, true, &c.name, &c.type_name) {
                Some(e) => ReverseHow::Derived(e),
                None => ReverseHow::NotCarried,
            }
        };
        if matches!(how, ReverseHow::NotCarried) && c.not_null && !c.has_default && impossible.is_none() {
            impossible = Some(format!(
                "{}.{} is NOT NULL without a default and green does not carry it back: declare it under \
                 [table.reverse]",
                entry.source, c.name
            ));
        }
        out.push(ReverseColumn { column: c.name.clone(), type_name: c.type_name.clone(), how });
    }
    let mut back_joins = Vec::new();
    let mut lookups = Vec::new();
    for (n, (je, rj)) in entry.joins.iter().zip(joins).enumerate() {
        if !je.write_back {
            lookups.push(rj);
            continue;
        }
        let field = format!("join[{}].reverse", n + 1);
        let Some(info) = catalog::table_info(blue, Side::Blue, &je.table).await? else { continue };
        stray(cx, &info, &je.table, &field, &je.reverse);
        let mut cols = Vec::new();
        for c in info.columns.iter().filter(|c| !c.generated) {
            // A link column equals an expression over the driving row: when that is one of its
            // columns, it comes back as that column does.
            let linked = rj.on.iter().find(|o| o.column == c.name).and_then(|o| {
                src.columns
                    .iter()
                    .find(|s| verbatim(&o.expr, alias, true, &s.name))
                    .and_then(|s| super::reverse_expr(&out, &s.name))
            });
            let how = if let Some((expr, line)) = je.reverse.get(&c.name) {
                valid(cx, blue, &green_row, (&format!("{field}.{}", c.name), *line, &c.name), expr, &c.type_name).await;
                ReverseHow::Declared(expr.clone())
            } else if let Some(e) = linked {
                ReverseHow::Derived(format!("({e})::{}", c.type_name))
            } else {
                match derive_reverse(columns, Some(&je.alias), false, &c.name, &c.type_name) {
                    Some(e) => ReverseHow::Derived(e),
                    None => ReverseHow::NotCarried,
                }
            };
            if matches!(how, ReverseHow::NotCarried) && c.not_null && !c.has_default && impossible.is_none() {
                impossible = Some(format!(
                    "{}.{} (join {}) is NOT NULL without a default and green does not carry it back: declare it \
                     under [table.join.reverse]",
                    je.table, c.name, je.alias
                ));
            }
            cols.push(ReverseColumn { column: c.name.clone(), type_name: c.type_name.clone(), how });
        }
        let carried = |name: &str| super::reverse_expr(&cols, name).is_some();
        // The primary key first: the key v1's own rows are told apart by. Only a key that can
        // arbitrate the upsert and never holds NULL (a NULL never conflicts: copies pile up).
        let mut keys: Vec<&UniqueKey> = info.unique_keys.iter().collect();
        keys.sort_by_key(|u| !u.primary);
        let key = keys
            .into_iter()
            .filter(|u| u.immediate && u.columns.iter().all(|c| info.column(c).is_some_and(|c| c.not_null)))
            .find(|u| u.columns.iter().all(|c| carried(c)))
            .map(|u| u.columns.clone());
        // One joined row per driving row and one driving row per joined row: every link is a
        // driving column, together holding the entry's key, and comes back. A joined row shared
        // by several driving rows (a customer of many orders) would be deleted with any one of
        // them, and rows linked some other way could come back unlinked.
        let driving_links: Vec<Option<&str>> = rj
            .on
            .iter()
            .map(|o| src.columns.iter().find(|s| verbatim(&o.expr, alias, true, &s.name)).map(|s| s.name.as_str()))
            .collect();
        let one_to_one = driving_links.iter().all(Option::is_some)
            && entry.key.iter().all(|k| driving_links.contains(&Some(k.as_str())))
            && rj.on.iter().all(|o| carried(&o.column));
        // A green row has the joined row when it says so, always for an inner join, else when
        // a NOT NULL column of it that is no link column comes back non-NULL.
        let present = match (&je.present, je.inner) {
            (Some((expr, line)), _) => {
                valid(cx, blue, &green_row, (&format!("join[{}].present", n + 1), *line, "present"), expr, "boolean")
                    .await;
                Some(expr.clone())
            }
            (None, true) => Some("true".to_string()),
            (None, false) => {
                info.columns.iter().filter(|c| c.not_null && !rj.on.iter().any(|o| o.column == c.name)).find_map(|c| {
                    match cols.iter().find(|r| r.column == c.name).map(|r| &r.how) {
                        Some(ReverseHow::Derived(e)) => Some(format!("({e}) IS NOT NULL")),
                        _ => None,
                    }
                })
            }
        };
        let why = if !one_to_one {
            Some(format!(
                "join {} is written back only when it links one row of {} to one driving row: each `on` expression a \
                 column of {} that comes back, together holding its key ({})",
                je.alias,
                je.table,
                entry.source,
                entry.key.join(", ")
            ))
        } else if rj.pick.is_some() {
            Some(format!(
                "join {} picks one of several rows of {}: the rows it does not pick would stay on blue; it can be \
                 a lookup (no write_back) only",
                je.alias, je.table
            ))
        } else if key.is_none() {
            Some(format!(
                "join {}: no unique key of {} comes back whole from green (declare its columns under \
                 [table.join.reverse])",
                je.alias, je.table
            ))
        } else if present.is_none() {
            Some(format!(
                "join {}: nothing tells whether a green row has a row of {}: say when with present = \"…\" (an \
                 expression over the green row)",
                je.alias, je.table
            ))
        } else {
            None
        };
        if let Some(why) = why {
            impossible.get_or_insert(why);
            continue;
        }
        back_joins.push(super::ReverseJoin {
            alias: je.alias.clone(),
            table: je.table.clone(),
            columns: cols,
            key: key.unwrap_or_default(),
            present: present.unwrap_or_default(),
        });
    }
    let lookup_only = columns
        .iter()
        .filter_map(|c| {
            let e = c.expr.as_deref()?;
            let from: Vec<String> = lookups
                .iter()
                .filter(|j| super::sql::refers_to(e, &j.alias))
                .map(|j| format!("{} ({})", j.alias, j.table))
                .collect();
            (!from.is_empty()).then(|| format!("{} reads {}", c.name, from.join(", ")))
        })
        .collect();
    Ok(super::Reverse { columns: out, impossible, joins: back_joins, lookup_only })
}

/// The green-side expression that gives column `col` of the table named `alias` back, when a
/// forward mapping undoes itself: `col` itself (a rename), `col::type` or `(col)::type` (cast
/// back), or `col AT TIME ZONE 'z'` (shifted back). `bare`: the column may be named without
/// its alias (the driving table's). The round-trip check proves it on blue's rows.
fn derive_reverse(
    columns: &[ResolvedColumn],
    alias: Option<&str>,
    bare: bool,
    col: &str,
    blue_type: &str,
) -> Option<String> {
    for c in columns {
        let Some(expr) = c.expr.as_deref() else { continue };
        let e = expr.trim();
        let t = ident(&c.name);
        if verbatim(e, alias, bare, col) {
            return Some(format!("{t}::{blue_type}"));
        }
        if let Some((base, _)) = e.rsplit_once("::") {
            let base = base.trim();
            let base = base.strip_prefix('(').and_then(|b| b.strip_suffix(')')).unwrap_or(base);
            if verbatim(base, alias, bare, col) {
                return Some(format!("{t}::{blue_type}"));
            }
        }
        let upper = e.to_ascii_uppercase();
        if let Some(at) = upper.find(" AT TIME ZONE ") {
            let zone = &e[at + " AT TIME ZONE ".len()..];
            let simple = zone.starts_with('\'') && zone.ends_with('\'') && zone.matches('\'').count() == 2;
            if simple && verbatim(&e[..at], alias, bare, col) {
                return Some(format!("({t} AT TIME ZONE {zone})::{blue_type}"));
            }
        }
    }
    None
}

/// Why a table with inheritance children cannot be read by an entry.
fn inherited(table: &crate::pg::QualifiedName) -> String {
    format!(
        "{table} has inheritance children (it is no partitioned table): reading it reads their rows too, but \
         their changes are neither published nor seen by its triggers under its name; name the tables \
         themselves (e.g. `ONLY`-style: one entry per child)"
    )
}

/// Whether `expr` is exactly column `col`: `col` or `"col"` (when `bare`), or either qualified
/// by `alias`.
fn verbatim(expr: &str, alias: Option<&str>, bare: bool, col: &str) -> bool {
    let e = expr.trim();
    let named = |x: &str| x == col || x == ident(col);
    (bare && named(e))
        || alias.is_some_and(|a| {
            [format!("{a}."), format!("{}.", ident(a))].iter().any(|p| e.strip_prefix(p.as_str()).is_some_and(named))
        })
}

/// Resolves the entry's joins in order, each prepared on blue over the FROM clause before it
/// (so its expressions see only earlier tables), and extends `cx.from` by each. Returns the
/// joins, or `None` when a joined table is missing or a join does not prepare.
async fn resolve_joins(cx: &mut Ctx<'_>, blue: &Client) -> Result<Option<Vec<super::ResolvedJoin>>> {
    let entry = cx.entry;
    let mut out = Vec::new();
    let mut missing = false;
    for (n, j) in entry.joins.iter().enumerate() {
        let field = format!("join[{}]", n + 1);
        let Some(info) = catalog::table_info(blue, Side::Blue, &j.table).await? else {
            let (message, fix) = not_a_table(blue, "joined", "blue", &j.table).await?;
            cx.report(&format!("{field}.table"), j.line, None, message, Some(fix));
            missing = true;
            continue;
        };
        if info.inherited {
            cx.report(&format!("{field}.table"), j.line, None, inherited(&j.table), None);
        }
        let a = ident(&j.alias);
        let mut on = Vec::new();
        let mut bad_on = false;
        for (col, expr) in &j.on {
            // Over the tables before the join only; and naming nothing the joined table has
            // unqualified (inside a pick's subquery such a name would mean the joined row's own
            // column, while tracing reads it from the tables before).
            let before = blue.prepare(&format!("SELECT ({expr}) FROM {} LIMIT 0", cx.from)).await;
            let shadow =
                format!("SELECT ({expr}) FROM {} LEFT JOIN {} AS {a} ON false LIMIT 0", cx.from, j.table.quoted());
            let why = match before {
                Err(e) => Some(format!("is not valid over the tables before this join: {}", pg_message(&e))),
                Ok(_) => blue.prepare(&shadow).await.err().map(|e| {
                    format!(
                        "names something {} has too: {}; qualify it with its table's alias",
                        j.table,
                        pg_message(&e)
                    )
                }),
            };
            if let Some(why) = why {
                cx.report(
                    &format!("{field}.on.{col}"),
                    j.line,
                    Some(col),
                    format!("`on` expression `{expr}` of join {} {why}", j.alias),
                    Some("`on` expressions may use the driving table and earlier joins only".into()),
                );
                bad_on = true;
            }
            match info.column(col) {
                Some(c) => on.push(super::JoinOn {
                    column: col.clone(),
                    type_name: c.type_name.clone(),
                    expr: expr.clone(),
                    generated: c.generated,
                }),
                None => cx.report(
                    &format!("{field}.on.{col}"),
                    j.line,
                    Some(col),
                    format!("joined table {} has no column `{col}`", j.table),
                    None,
                ),
            }
        }
        if bad_on {
            missing = true;
            continue;
        }
        let linked: Vec<&str> = j.on.iter().map(|(c, _)| c.as_str()).collect();
        // `=` never matches NULL, so a unique key whose columns are all linked admits at most
        // one row per row before it; `also` only narrows.
        let unique = info.unique_keys.iter().find(|u| u.columns.iter().all(|c| linked.contains(&c.as_str())));
        // Ties under `pick` are broken by a unique key, so that copy, every re-read and verify
        // choose the same row.
        let tie =
            info.unique_keys.iter().find(|u| u.columns.iter().all(|c| info.column(c).is_some_and(|c| c.not_null)));
        let (pick, proof) = match (&j.pick, unique, tie) {
            (None, Some(u), _) => (None, format!("at most one row: unique ({}) = on", u.columns.join(", "))),
            (Some(p), _, Some(tie)) => {
                let order: Vec<String> = tie.columns.iter().map(|c| format!("{a}.{}", ident(c))).collect();
                (
                    Some(format!("{p}, {}", order.join(", "))),
                    format!("one row chosen: ORDER BY {p}, ties broken by ({})", tie.columns.join(", ")),
                )
            }
            (Some(_), _, None) => {
                cx.report(
                    &format!("{field}.pick"),
                    j.line,
                    None,
                    format!(
                        "{} has no primary key or unique index on NOT NULL columns to break ties of `pick`: \
                         copy, re-reads and verify could each choose another row",
                        j.table
                    ),
                    Some(format!("add a primary key to {}", j.table)),
                );
                (None, String::new())
            }
            (None, None, _) => {
                let keys: Vec<String> =
                    info.unique_keys.iter().map(|u| format!("({})", u.columns.join(", "))).collect();
                cx.report(
                    &format!("{field}.on"),
                    j.line,
                    None,
                    format!(
                        "join {} ({}) on ({}) can match several rows of one driving row: no unique key of it is \
                         within the `on` columns (its unique keys: {})",
                        j.alias,
                        j.table,
                        linked.join(", "),
                        if keys.is_empty() { "none".to_string() } else { keys.join(", ") }
                    ),
                    Some(format!(
                        "say which row wins, e.g. pick = \"{}.<column> DESC\" (ties are broken by the table's key), \
                         or join on a unique key",
                        j.alias
                    )),
                );
                (None, String::new())
            }
        };
        let join = super::ResolvedJoin {
            alias: j.alias.clone(),
            table: j.table.clone(),
            inner: j.inner,
            on,
            pick,
            also: j.also.clone(),
            proof,
            columns: info.columns.iter().filter(|c| !c.generated).map(|c| (c.name.clone(), c.type_oid)).collect(),
        };
        let from = format!("{}{}", cx.from, join.render());
        if let Err(e) = blue.prepare(&format!("SELECT 1 FROM {from} LIMIT 0")).await {
            cx.report(
                &field,
                j.line,
                None,
                format!("join {} is not valid on blue: {}", j.alias, pg_message(&e)),
                Some("`on` expressions may use the driving table and earlier joins only".into()),
            );
            missing = true;
            continue;
        }
        // A pick is an ORDER BY list, checked as one inside a subquery.
        let exprs: Vec<String> =
            j.on.iter()
                .map(|(_, e)| e.clone())
                .chain(j.pick.iter().map(|p| format!("(SELECT 1 ORDER BY {p} LIMIT 1)")))
                .chain(j.also.iter().cloned())
                .collect();
        for e in &exprs {
            let calls = catalog::changing_calls(blue, &entry.source, &from, e).await?;
            if !calls.is_empty() {
                cx.report(
                    &field,
                    j.line,
                    None,
                    format!(
                        "join {} calls {}, whose value changes from one read to the next: copy, re-reads and \
                         verify would join other rows",
                        j.alias,
                        calls.join(", ")
                    ),
                    None,
                );
            }
        }
        cx.from = from;
        out.push(join);
    }
    Ok((!missing).then_some(out))
}

/// The entry's expressions and filter may read the source and joined tables only as the join
/// reads them (their rows on the path): a subquery over any table, these included, reads rows
/// whose changes capture does not trace to this entry's rows. Checked over placeholder rows of
/// each table's type, so that any table left in the view's dependencies is such a read.
async fn check_reads(
    cx: &mut Ctx<'_>,
    blue: &Client,
    columns: &[ResolvedColumn],
    alias: Option<&str>,
    joins: &[super::ResolvedJoin],
) -> Result<()> {
    let entry = cx.entry;
    let exprs: Vec<String> =
        columns.iter().filter_map(|c| c.expr.clone()).chain(entry.filter.as_ref().map(|(f, _)| f.clone())).collect();
    let mut from = format!(
        "{} AS {}",
        catalog::placeholder_row(blue, &entry.source).await?,
        ident(alias.unwrap_or(entry.source.name.as_str()))
    );
    for j in joins {
        from.push_str(&j.render_from(&catalog::placeholder_row(blue, &j.table).await?));
    }
    // A broken expression is reported already: `relations_read` then finds nothing.
    for (_, name) in catalog::relations_read(blue, &from, &exprs).await? {
        let joined = name == entry.source.to_string() || joins.iter().any(|j| j.table.to_string() == name);
        cx.report(
            "columns",
            entry.source_line,
            None,
            format!(
                "an expression or the filter of this entry reads {name} in a subquery: {}",
                if joined {
                    "rows other than those the entry's join links to each row, whose writes are not traced to it"
                } else {
                    "its changes are not captured, so a write to it would never reach green"
                }
            ),
            Some(format!(
                "join it with [[table.join]] (alias, table = \"{name}\", on = {{ <column> = \"<expression>\" }}) and \
                 use the joined row: capture then traces its changes to the rows that read it"
            )),
        );
    }
    Ok(())
}

async fn estimate(blue: &Client, entry: &TableEntry, src: &TableInfo) -> Result<Estimate> {
    // A partitioned table holds nothing itself: its leaves' statistics add up (-1 where a leaf
    // was never analyzed, as for a table).
    let (reltuples, total_bytes) = if src.partitioned {
        let row = blue
            .query_one(
                "SELECT CASE WHEN bool_and(c.reltuples >= 0) THEN sum(c.reltuples)::float8 ELSE -1 END, \
                        coalesce(sum(pg_total_relation_size(p.relid)), 0)::int8 \
                 FROM pg_catalog.pg_partition_tree($1::text::regclass) p JOIN pg_catalog.pg_class c ON c.oid = p.relid \
                 WHERE p.isleaf",
                &[&entry.source.quoted()],
            )
            .await
            .map_err(Error::db(format!("blue: sizing the partitions of {}", entry.source)))?;
        (row.get::<_, Option<f64>>(0).unwrap_or(-1.0), row.get::<_, i64>(1))
    } else {
        (src.reltuples, src.total_bytes)
    };
    let bytes = total_bytes.max(0) as u64;
    let rows = if reltuples >= 0.0 {
        reltuples as u64
    } else if total_bytes < EXACT_COUNT_BELOW_BYTES {
        let n: i64 = blue
            .query_one(&format!("SELECT count(*) FROM {}", entry.source.quoted()), &[])
            .await
            .map_err(Error::db(format!("blue: counting {}", entry.source)))?
            .get(0);
        n as u64
    } else {
        bytes / 200
    };
    Ok(Estimate { rows, bytes })
}

/// Two entries writing one target table must each carry a filter (the operator's statement that
/// they partition the rows); otherwise they would overwrite each other's rows unknowingly.
fn check_overlaps(plan: &Plan, problems: &mut Vec<Problem>) {
    // Entries may share a source (a table split in two, or kept and also summarised): capture
    // turns each change of it into a key of every entry that reads it.
    let mut by_target: HashMap<String, Vec<&TableEntry>> = HashMap::new();
    for t in &plan.tables {
        by_target.entry(t.target.to_string()).or_default().push(t);
    }
    for (target, entries) in by_target {
        if entries.len() > 1 && entries.iter().any(|e| e.filter.is_none()) {
            let paths: Vec<String> = entries.iter().map(|e| e.path()).collect();
            problems.push(Problem {
                field: paths.join(", "),
                line: Some(entries[1].target_line),
                table: Some(target.clone()),
                column: None,
                message: format!(
                    "{} all write {target}; without a filter on each they overwrite each other's rows",
                    paths.join(" and ")
                ),
                fix: Some("merge the entries, or give each a filter so that they partition the source rows".into()),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, expr: &str) -> ResolvedColumn {
        ResolvedColumn {
            name: name.into(),
            target_type: "text".into(),
            expr: Some(expr.into()),
            expr_type: None,
            hash_by_text: false,
            same_name: false,
        }
    }

    #[test]
    fn reverse_mappings_that_undo_themselves() {
        let cols = vec![
            column("user_id", "l.id"),
            column("at", "created AT TIME ZONE 'UTC'"),
            column("n", "(amount)::numeric"),
            column("note", "'ſ' || note"),
        ];
        assert_eq!(derive_reverse(&cols, Some("l"), true, "id", "integer").as_deref(), Some("\"user_id\"::integer"));
        assert_eq!(
            derive_reverse(&cols, None, true, "created", "timestamp without time zone").as_deref(),
            Some("(\"at\" AT TIME ZONE 'UTC')::timestamp without time zone")
        );
        assert_eq!(derive_reverse(&cols, None, true, "amount", "real").as_deref(), Some("\"n\"::real"));
        assert_eq!(derive_reverse(&cols, None, true, "note", "text"), None);
        // A joined table's column is its alias's only: `created` (the driving table's) is not
        // `h.created`, `l.id` is.
        assert_eq!(derive_reverse(&cols, Some("h"), false, "created", "timestamp"), None);
        assert_eq!(derive_reverse(&cols, Some("l"), false, "id", "integer").as_deref(), Some("\"user_id\"::integer"));
        // Upper-cased by Unicode rules, `ſſ` is two bytes shorter: the keyword's offset, taken
        // from it, would miss the zone.
        let shifted = vec![column("at", "\"ſſ\" AT TIME ZONE 'UTC'")];
        assert_eq!(
            derive_reverse(&shifted, None, true, "ſſ", "timestamp").as_deref(),
            Some("(\"at\" AT TIME ZONE 'UTC')::timestamp")
        );
    }
}
