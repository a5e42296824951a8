//! The SQL text the stages run that is generated from the resolved plan: key conditions over
//! literal key values (COPY takes no bind parameters). The transforming SELECT itself is
//! [`super::ResolvedTable::source_select`].

use crate::pg::literal;

/// `(k1, k2) IN (SELECT * FROM unnest(ARRAY[..]::t1[], ARRAY[..]::t2[]))`, or `k = ANY(..)` for
/// one column, with the key values as literals (COPY takes no parameters).
pub fn key_condition(columns: &[String], types: &[String], keys: &[Vec<String>]) -> String {
    let arrays: Vec<String> = (0..columns.len())
        .map(|c| {
            let vals: Vec<String> = keys.iter().map(|k| literal(k.get(c).map(String::as_str).unwrap_or(""))).collect();
            format!("ARRAY[{}]::{}[]", vals.join(", "), types[c])
        })
        .collect();
    if columns.len() == 1 {
        format!("{} = ANY({})", columns[0], arrays[0])
    } else {
        format!("({}) IN (SELECT * FROM unnest({}))", columns.join(", "), arrays.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_conditions() {
        let one = key_condition(&["\"id\"".into()], &["bigint".into()], &[vec!["1".into()], vec!["2".into()]]);
        assert_eq!(one, "\"id\" = ANY(ARRAY['1', '2']::bigint[])");
        let two = key_condition(
            &["\"a\"".into(), "\"b\"".into()],
            &["text".into(), "text".into()],
            &[vec!["x'y".into(), "z".into()]],
        );
        assert_eq!(two, "(\"a\", \"b\") IN (SELECT * FROM unnest(ARRAY['x''y']::text[], ARRAY['z']::text[]))");
    }
}
