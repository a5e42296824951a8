//! The only places SQL text is built from user input: identifiers and literals.
//!
//! Everything else that assembles SQL goes through these two functions, so quoting bugs have one
//! home. Literals are needed because COPY takes no bind parameters.

/// Quotes an identifier the way `quote_ident` does, always adding double quotes so that case,
/// spaces, unicode and reserved words survive.
pub fn ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Quotes a string literal as an escape-free standard-conforming literal (`'it''s'`).
///
/// Relies on `standard_conforming_strings = on` (the default since 9.1), which every session we
/// open pins, so backslashes are not special.
pub fn literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// A schema-qualified relation name as written in a plan (`schema.table` or `table`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct QualifiedName {
    /// Schema; `public` when the plan gives none.
    pub schema: String,
    /// Relation name.
    pub name: String,
}

impl QualifiedName {
    /// Parses `schema.table`, `table`, or either part double-quoted (`"My Schema"."Tbl.x"`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts = split_dotted(text)?;
        match parts.as_slice() {
            [name] => Ok(Self { schema: "public".into(), name: name.clone() }),
            [schema, name] => Ok(Self { schema: schema.clone(), name: name.clone() }),
            _ => Err(format!("`{text}` is not `schema.table`")),
        }
    }

    /// The quoted form for SQL: `"schema"."name"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }
}

impl std::fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Splits a dotted name, honouring double quotes; unquoted parts are folded to lower case as
/// PostgreSQL does.
fn split_dotted(text: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = text.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(format!("unterminated quote in `{text}`")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.extend(c.to_lowercase());
                chars.next();
            }
            part = part.trim().to_string();
        }
        if part.is_empty() {
            return Err(format!("empty name part in `{text}`"));
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => continue,
            Some(c) => return Err(format!("unexpected `{c}` in `{text}`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers_and_literals() {
        assert_eq!(ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal(r"a\b"), r"'a\b'");
    }

    #[test]
    fn parses_qualified_names() {
        let q = QualifiedName::parse("Public.Hydra").unwrap();
        assert_eq!((q.schema.as_str(), q.name.as_str()), ("public", "hydra"));
        let q = QualifiedName::parse(r#""My Schema"."a.""b""#).unwrap();
        assert_eq!((q.schema.as_str(), q.name.as_str()), ("My Schema", r#"a."b"#));
        assert_eq!(QualifiedName::parse("t").unwrap().schema, "public");
        assert!(QualifiedName::parse("a.b.c").is_err());
        assert!(QualifiedName::parse("a.").is_err());
    }
}
