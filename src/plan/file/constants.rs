//! Plan constants: `[constants] nid = "${GREEN_NID}"`, used in column expressions and filters as
//! `:nid` (as psql variables are), always rendered as a quoted literal, so a value can never
//! become SQL.

use indexmap::IndexMap;

use crate::pg::literal;

/// Whether `name` may name a constant: what `:name` can reference.
pub(super) fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `expr` with every `:name` outside quotes replaced by the constant's quoted literal. A `:name`
/// counts only where it starts a term (not `::type`, not the `1:n` of an array slice). Returns
/// the first name that is no constant.
pub(super) fn substitute(expr: &str, constants: &IndexMap<String, String>) -> Result<String, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if let Some(q) = quote {
            out.push(c);
            if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match c {
            '\'' | '"' => {
                quote = Some(c);
                out.push(c);
                i += 1;
            }
            ':' if chars.get(i + 1) == Some(&':') => {
                out.push_str("::");
                i += 2;
            }
            ':' if starts_term(&chars, i) => {
                let end = (i + 1..chars.len()).find(|&j| !(chars[j].is_ascii_alphanumeric() || chars[j] == '_'));
                let name: String = chars[i + 1..end.unwrap_or(chars.len())].iter().collect();
                let value = constants.get(&name).ok_or_else(|| name.clone())?;
                out.push_str(&literal(value));
                i = end.unwrap_or(chars.len());
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// Whether the `:` at `i` begins a `:name` reference: a name follows, and no name, number or
/// closing bracket precedes it.
fn starts_term(chars: &[char], i: usize) -> bool {
    let next = chars.get(i + 1).is_some_and(|c| c.is_ascii_alphabetic() || *c == '_');
    let prev = i.checked_sub(1).map(|p| chars[p]);
    next && !prev.is_some_and(|p| p.is_ascii_alphanumeric() || p == '_' || p == ']' || p == ')' || p == ':')
}

/// Whether an expression as written is a constant: `:name` or one quoted literal, optionally
/// followed by a cast (`:nid`, `'5b2a…'::uuid`). Such a column may complete green's key.
pub(super) fn is_constant(expr: &str) -> bool {
    let e = expr.trim();
    // The first `::` outside quotes ends the value; what follows is one type name.
    let mut quoted = false;
    let mut split = None;
    for (i, c) in e.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            ':' if !quoted && e[i..].starts_with("::") => {
                split = Some(i);
                break;
            }
            _ => {}
        }
    }
    let value = match split {
        Some(at) => {
            let cast = e[at + 2..].trim();
            if cast.is_empty() || cast.contains(['\'', ':']) {
                return false;
            }
            e[..at].trim()
        }
        None => e,
    };
    if let Some(name) = value.strip_prefix(':') {
        return valid_name(name);
    }
    value.len() >= 2
        && value.starts_with('\'')
        && value.ends_with('\'')
        && !value[1..value.len() - 1].replace("''", "").contains('\'')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consts() -> IndexMap<String, String> {
        [("nid".to_string(), "5b2a".to_string()), ("who".to_string(), "O'Brien".to_string())].into_iter().collect()
    }

    #[test]
    fn references_become_quoted_literals() {
        let c = consts();
        assert_eq!(substitute(":nid", &c).unwrap(), "'5b2a'");
        assert_eq!(substitute("coalesce(x, :who)", &c).unwrap(), "coalesce(x, 'O''Brien')");
        assert_eq!(substitute(":nid::uuid", &c).unwrap(), "'5b2a'::uuid");
        assert_eq!(substitute("x::text || ':nid' || \":nid\"", &c).unwrap(), "x::text || ':nid' || \":nid\"");
        assert_eq!(substitute("arr[1:n]", &c).unwrap(), "arr[1:n]");
        assert_eq!(substitute(":nope", &c).unwrap_err(), "nope");
    }

    #[test]
    fn constants_as_written() {
        assert!(is_constant(":nid"));
        assert!(is_constant(" :nid::uuid "));
        assert!(is_constant("'5b2a6a2e-5b1c-4b6e-9a40-2f7e4f1d0c11'::uuid"));
        assert!(is_constant("'it''s'"));
        assert!(is_constant("'x'::character varying(10)"));
        assert!(!is_constant("id"));
        assert!(!is_constant(":nid || id"));
        assert!(!is_constant("'a' || 'b'"));
        assert!(!is_constant("x::uuid"));
    }
}
