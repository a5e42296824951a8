//! The SQL text the stages run that is generated from the resolved plan: key conditions over
//! literal key values (COPY takes no bind parameters). The transforming SELECT itself is
//! [`super::ResolvedTable::source_select`].

use crate::pg::{ident, literal};

/// `(k1, k2) IN (SELECT * FROM unnest(ARRAY[..]::t1[], ARRAY[..]::t2[]))`, or `k = ANY(..)` for
/// one column, with the key values as literals (COPY takes no parameters).
pub fn key_condition(columns: &[String], types: &[String], keys: &[Vec<String>]) -> String {
    key_condition_via(columns, types, types, keys)
}

/// [`key_condition`] for keys in their text form on blue (`through`, the source types) matched
/// against columns of `types` (the target types): each value is read as the source type, then
/// cast to the target type, exactly as copy's `(column)::target_type` did. Reading the text as
/// the target type directly would give another value where the two disagree (a `float8` key's
/// text read as `numeric` keeps 17 digits; the cast keeps 15).
pub fn key_condition_via(columns: &[String], through: &[String], types: &[String], keys: &[Vec<String>]) -> String {
    let arrays = key_arrays(through, types, keys);
    if columns.len() == 1 {
        format!("{} = ANY({})", columns[0], arrays[0])
    } else {
        format!("({}) IN (SELECT * FROM unnest({}))", columns.join(", "), arrays.join(", "))
    }
}

/// The keys as a row source named `alias` with `columns`, read as in [`key_condition_via`]:
/// `unnest(ARRAY[..]::t1[], ARRAY[..]::t2[]) AS alias (c1, c2)`.
pub fn key_rows_via(
    alias: &str,
    columns: &[String],
    through: &[String],
    types: &[String],
    keys: &[Vec<String>],
) -> String {
    format!("unnest({}) AS {alias} ({})", key_arrays(through, types, keys).join(", "), columns.join(", "))
}

/// How a key is written as text: as each capture method records it, so that keys of one row
/// compare equal whichever way they came (direct apply matches keys by text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyText {
    /// The type's output function, as pgoutput renders values (logical capture): the value
    /// itself, read in text format (a cast to text may differ: `true::text` is `true`, the
    /// output is `t`).
    Output,
    /// `to_jsonb(v) #>> '{}'`, as the capture triggers record keys.
    Json,
}

impl KeyText {
    /// `expr` rendered as text this way.
    pub fn render(self, expr: &str) -> String {
        match self {
            KeyText::Output => expr.to_string(),
            KeyText::Json => format!("to_jsonb({expr}) #>> '{{}}'"),
        }
    }

    /// `expr` as a `text` value written this way, for a result read in any format (`format`'s
    /// `%s` calls the type's output function).
    pub fn sql(self, expr: &str) -> String {
        match self {
            KeyText::Output => format!("format('%s', {expr})"),
            KeyText::Json => self.render(expr),
        }
    }
}

/// The driving keys of `t` whose rows a row of join `join` with link values `links` (the joined
/// table's `on` columns, as text) is, or was, part of: the driving table and the joins before it
/// (every candidate row, whatever `pick`, `also` or the filter choose: a superset is harmless,
/// apply rewrites or deletes what blue says) where the join's `on` expressions equal the values.
/// Used with the values of a changed joined row before and after the change, at a moment the
/// change is visible on blue.
pub fn trace_sql(t: &super::ResolvedTable, join: usize, links: &[Vec<String>], text: KeyText) -> String {
    let j = &t.joins[join];
    let keys: Vec<String> = t.key.iter().map(|k| text.render(&t.qualified(&k.source))).collect();
    let mut from = format!("{} AS {}", t.source.quoted(), t.qualifier());
    // Only the joins the `on` expressions reach, directly or through each other's: an
    // unrelated join would multiply rows (or, as an inner join, drop them).
    let mut texts: Vec<&str> = j.on.iter().map(|o| o.expr.as_str()).collect();
    let mut path = vec![false; join];
    for k in (0..join).rev() {
        if texts.iter().any(|e| refers_to(e, &t.joins[k].alias)) {
            path[k] = true;
            texts.extend(t.joins[k].on.iter().map(|o| o.expr.as_str()));
        }
    }
    for (before, _) in t.joins[..join].iter().zip(&path).filter(|(_, on)| **on) {
        from.push_str(&before.render_candidates());
    }
    let exprs: Vec<String> = j.on.iter().map(|o| format!("({})", o.expr)).collect();
    let types: Vec<String> = j.on.iter().map(|o| o.type_name.clone()).collect();
    format!("SELECT DISTINCT {} FROM {from} WHERE {}", keys.join(", "), key_condition(&exprs, &types, links))
}

/// Whether `expr` names something of `alias` (`alias.` or `"alias".`, as a word; unquoted
/// names fold to lower case, aliases are lower case). A false positive only adds a join.
pub(super) fn refers_to(expr: &str, alias: &str) -> bool {
    let lower = expr.to_lowercase();
    let word = |c: char| c.is_alphanumeric() || c == '_' || c == '$';
    [format!("{alias}."), format!("\"{alias}\".")]
        .iter()
        .any(|pat| lower.match_indices(pat.as_str()).any(|(at, _)| !lower[..at].chars().next_back().is_some_and(word)))
}

/// The rows of `t` on blue (up to `limit`, the filter applied) whose carried columns do not come
/// back through forward then reverse: key texts, column, blue's value and the value that comes
/// back, as text; at most `max` of them. A joined table written back counts too: whether the
/// row has it (`alias (present)`) and each of its carried columns (`alias.column`). `None` when
/// no column is carried back.
pub fn round_trip_sql(t: &super::ResolvedTable, limit: Option<u64>, max: u64) -> Option<String> {
    // (label, blue's value over the FROM clause, the value back over the green row `g`).
    let mut pairs: Vec<(String, String, String)> = t
        .reverse
        .columns
        .iter()
        .filter_map(|c| {
            let e = t.reverse.expr(&c.column)?;
            Some((c.column.clone(), t.qualified(&c.column), format!("(({e})::{})::text", c.type_name)))
        })
        .collect();
    if pairs.is_empty() {
        return None;
    }
    for j in &t.reverse.joins {
        let a = ident(&j.alias);
        let present = &j.present;
        pairs.push((
            format!("{} (present)", j.alias),
            format!("{a}.ctid IS NOT NULL"),
            format!("(({present}) IS TRUE)::text"),
        ));
        for c in &j.columns {
            let Some(e) = j.expr(&c.column) else { continue };
            pairs.push((
                format!("{}.{}", j.alias, c.column),
                format!("{a}.{}", ident(&c.column)),
                format!("CASE WHEN ({present}) THEN (({e})::{})::text END", c.type_name),
            ));
        }
    }
    let keys: Vec<String> =
        t.key.iter().enumerate().map(|(i, k)| format!("{} AS bg_k{i}", t.qualified(&k.source))).collect();
    let blues: Vec<String> = pairs.iter().enumerate().map(|(i, (_, b, _))| format!("{b} AS bg_b{i}")).collect();
    let filter = t.filter.as_ref().map(|f| format!(" WHERE ({f})")).unwrap_or_default();
    let limit = limit.map(|n| format!(" LIMIT {n}")).unwrap_or_default();
    let values: Vec<String> = pairs
        .iter()
        .enumerate()
        .map(|(i, (label, _, back))| format!("({}, g.bg_b{i}::text, {back})", crate::pg::literal(label)))
        .collect();
    let key_out: Vec<String> = (0..t.key.len()).map(|i| format!("g.bg_k{i}::text")).collect();
    Some(format!(
        "SELECT ARRAY[{}], c.col, c.blue, c.back FROM (SELECT {}, {}, {} FROM {}{filter}{limit}) AS g \
         CROSS JOIN LATERAL (VALUES {}) AS c(col, blue, back) WHERE c.blue IS DISTINCT FROM c.back LIMIT {max}",
        key_out.join(", "),
        keys.join(", "),
        blues.join(", "),
        t.select_list(),
        t.from_clause(None),
        values.join(", ")
    ))
}

/// One typed array literal per key column.
fn key_arrays(through: &[String], types: &[String], keys: &[Vec<String>]) -> Vec<String> {
    (0..types.len())
        .map(|c| {
            let vals: Vec<String> = keys.iter().map(|k| literal(k.get(c).map(String::as_str).unwrap_or(""))).collect();
            if through[c] == types[c] {
                format!("ARRAY[{}]::{}[]", vals.join(", "), types[c])
            } else {
                format!("ARRAY[{}]::{}[]::{}[]", vals.join(", "), through[c], types[c])
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_conditions() {
        let one = key_condition(&["\"id\"".into()], &["bigint".into()], &[vec!["1".into()], vec!["2".into()]]);
        assert_eq!(one, "\"id\" = ANY(ARRAY['1', '2']::bigint[])");
        let via = key_condition_via(
            &["\"k\"".into()],
            &["double precision".into()],
            &["numeric".into()],
            &[vec!["0.1".into()]],
        );
        assert_eq!(via, "\"k\" = ANY(ARRAY['0.1']::double precision[]::numeric[])");
        let two = key_condition(
            &["\"a\"".into(), "\"b\"".into()],
            &["text".into(), "text".into()],
            &[vec!["x'y".into(), "z".into()]],
        );
        assert_eq!(two, "(\"a\", \"b\") IN (SELECT * FROM unnest(ARRAY['x''y']::text[], ARRAY['z']::text[]))");
        let rows = key_rows_via(
            "k",
            &["\"a\"".into(), "\"b\"".into()],
            &["text".into(), "double precision".into()],
            &["text".into(), "numeric".into()],
            &[vec!["x".into(), "1".into()]],
        );
        assert_eq!(rows, "unnest(ARRAY['x']::text[], ARRAY['1']::double precision[]::numeric[]) AS k (\"a\", \"b\")");
    }
}
