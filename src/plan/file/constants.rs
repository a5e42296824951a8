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

/// `expr` with every `:name` outside quotes and comments replaced by the constant's quoted
/// literal. A `:name` counts only where it starts a term (not `::type`, not the `1:n` of an
/// array slice). Quotes are SQL's: `'…'` (with `E'…'` backslash escapes), `"…"`,
/// `$tag$…$tag$`; comments `--` to the end of the line and `/* … */`. Returns the first name
/// that is no constant.
pub(super) fn substitute(expr: &str, constants: &IndexMap<String, String>) -> Result<String, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::with_capacity(expr.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let skip = match c {
            '\'' => {
                let escapes = i > 0 && matches!(chars[i - 1], 'E' | 'e') && !word_char_before(&chars, i - 1);
                quoted_end(&chars, i, escapes)
            }
            '"' => chars[i + 1..].iter().position(|&d| d == '"').map_or(chars.len(), |p| i + p + 2),
            '$' => dollar_end(&chars, i).unwrap_or(i + 1),
            '-' if chars.get(i + 1) == Some(&'-') => {
                chars[i..].iter().position(|&d| d == '\n').map_or(chars.len(), |p| i + p + 1)
            }
            '/' if chars.get(i + 1) == Some(&'*') => (i + 2..chars.len().saturating_sub(1))
                .find(|&j| chars[j] == '*' && chars[j + 1] == '/')
                .map_or(chars.len(), |j| j + 2),
            ':' if chars.get(i + 1) == Some(&':') => i + 2,
            ':' if starts_term(&chars, i) => {
                let end = (i + 1..chars.len())
                    .find(|&j| !(chars[j].is_ascii_alphanumeric() || chars[j] == '_'))
                    .unwrap_or(chars.len());
                let name: String = chars[i + 1..end].iter().collect();
                let value = constants.get(&name).ok_or_else(|| name.clone())?;
                out.push_str(&literal(value));
                i = end;
                continue;
            }
            _ => i + 1,
        };
        out.extend(&chars[i..skip.min(chars.len())]);
        i = skip.min(chars.len()).max(i + 1);
    }
    Ok(out)
}

/// Whether the character before `i` continues a name (so `E` at `i` is not a string prefix).
fn word_char_before(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// The index after the `'…'` string starting at `start` (`''` inside it is a quote; with
/// `escapes`, so is `\'`).
fn quoted_end(chars: &[char], start: usize, escapes: bool) -> usize {
    let mut j = start + 1;
    while j < chars.len() {
        match chars[j] {
            '\\' if escapes => j += 2,
            '\'' if chars.get(j + 1) == Some(&'\'') => j += 2,
            '\'' => return j + 1,
            _ => j += 1,
        }
    }
    chars.len()
}

/// The index after the dollar-quoted string starting at `start` (`$tag$ … $tag$`), or `None`
/// when no dollar quote starts there (a `$1` parameter).
fn dollar_end(chars: &[char], start: usize) -> Option<usize> {
    let close = chars[start + 1..].iter().position(|&c| c == '$')? + start + 1;
    let tag: String = chars[start..=close].iter().collect();
    if !tag[1..tag.len() - 1].chars().all(|c| c.is_alphanumeric() || c == '_')
        || tag[1..].starts_with(|c: char| c.is_ascii_digit())
        || word_char_before(chars, start)
    {
        return None;
    }
    let body: String = chars[close + 1..].iter().collect();
    Some(body.find(&tag).map_or(chars.len(), |p| close + 1 + body[..p].chars().count() + tag.chars().count()))
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
            if !type_name(cast) {
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

/// Whether `text` reads as a type name: words (quoted or not, dotted), an optional modifier
/// list of numbers, and array brackets (`uuid`, `character varying(10)`, `public."My Type"[]`).
fn type_name(text: &str) -> bool {
    let t = text.trim();
    let base = t.trim_end_matches("[]").trim_end();
    let base = match base.split_once('(') {
        Some((name, rest)) => {
            let Some(args) = rest.strip_suffix(')') else { return false };
            if !args.chars().all(|c| c.is_ascii_digit() || c == ',' || c == ' ') {
                return false;
            }
            name
        }
        None => base,
    };
    !base.trim().is_empty()
        && base.chars().all(|c| c.is_alphanumeric() || matches!(c, '_' | ' ' | '.' | '"'))
        && base.matches('"').count() % 2 == 0
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
        // Other quotes and comments are left alone.
        assert_eq!(substitute("$$:nid$$ || $t$ :nid $t$ || :nid", &c).unwrap(), "$$:nid$$ || $t$ :nid $t$ || '5b2a'");
        assert_eq!(substitute("E'it\\'s :nid' || :nid", &c).unwrap(), "E'it\\'s :nid' || '5b2a'");
        assert_eq!(substitute("x -- :nid\n+ :nid /* :nid */", &c).unwrap(), "x -- :nid\n+ '5b2a' /* :nid */");
        assert_eq!(substitute("f($1) || :nid", &c).unwrap(), "f($1) || '5b2a'");
        assert_eq!(
            substitute("data->>'k' || data #> '{a}' || :who", &c).unwrap(),
            "data->>'k' || data #> '{a}' || 'O''Brien'"
        );
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
        assert!(!is_constant("'x'::text || name"), "a cast followed by more expression is no constant");
        assert!(is_constant("'x'::public.\"My Type\"[]"));
    }
}
