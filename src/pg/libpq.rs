//! libpq's conventions for what a connection string leaves out: `PGHOST`, `PGPORT`, `PGUSER`,
//! `PGDATABASE`, `PGPASSWORD`, `PGSSLMODE`, `PGSSLROOTCERT`, and the password file (`PGPASSFILE`,
//! else `~/.pgpass`), as `psql` reads them. What the string says always wins.

use std::path::{Path, PathBuf};

/// The environment, as a lookup (tests pass their own).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The password file's path: `PGPASSFILE`, else `$HOME/.pgpass`.
pub fn passfile(env: Env<'_>) -> Option<PathBuf> {
    env("PGPASSFILE").map(PathBuf::from).or_else(|| env("HOME").map(|h| Path::new(&h).join(".pgpass")))
}

/// The password for (host, port, database, user) in a password file's `text`: the first line
/// whose fields all match (`*` matches anything; `\:` and `\\` are escapes), as libpq reads it.
/// A socket directory host is matched as `localhost`, as libpq does.
pub fn password_for(text: &str, host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    let host = if host.starts_with('/') { "localhost" } else { host };
    let port = port.to_string();
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_fields(line);
        if fields.len() < 5 {
            continue;
        }
        let matches = |field: &str, value: &str| field == "*" || field == value;
        if matches(&fields[0], host)
            && matches(&fields[1], &port)
            && matches(&fields[2], database)
            && matches(&fields[3], user)
        {
            return Some(fields[4..].join(":"));
        }
    }
    None
}

/// Splits a password file line at unescaped `:`.
fn split_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                let c = if c == '\\' { chars.next().unwrap_or(c) } else { c };
                if let Some(f) = fields.last_mut() {
                    f.push(c);
                }
            }
        }
    }
    fields
}

/// Reads the password file at `path` unless others may read it (libpq ignores it then, and so
/// do we, with a warning).
pub fn read_passfile(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "password file has group or world access; it is ignored (chmod 0600 it)");
            return None;
        }
    }
    std::fs::read_to_string(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_file_lines_match_as_libpq_reads_them() {
        let text = "# comment\n\
                    db.example:5432:app:alice:first\n\
                    *:*:app:bob:pa\\:ss:word\n\
                    localhost:5433:*:*:local\n";
        assert_eq!(password_for(text, "db.example", 5432, "app", "alice").as_deref(), Some("first"));
        assert_eq!(password_for(text, "db.example", 5432, "other", "alice"), None);
        assert_eq!(password_for(text, "anything", 1, "app", "bob").as_deref(), Some("pa:ss:word"));
        assert_eq!(password_for(text, "/var/run/postgresql", 5433, "x", "y").as_deref(), Some("local"));
    }
}
