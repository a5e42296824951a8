//! libpq's conventions for what a connection string leaves out: `PGHOST`, `PGPORT`, `PGUSER`,
//! `PGDATABASE`, `PGPASSWORD`, `PGSSLMODE`, `PGSSLROOTCERT`, and the password file (`PGPASSFILE`,
//! else `~/.pgpass`), and connection service files (`service=`, `PGSERVICE`), as `psql` reads
//! them. What the string says always wins.

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

/// The settings of connection service `name` (`service=` in a string, else `PGSERVICE`), as
/// libpq reads them: the first of the user's file (`PGSERVICEFILE`, else `~/.pg_service.conf`)
/// and the system's (`PGSYSCONFDIR/pg_service.conf`, else Debian's
/// `/etc/postgresql-common/pg_service.conf`) that has a `[name]` section. An error names the
/// service and the files looked in.
pub fn service(env: Env<'_>, name: &str) -> Result<Vec<(String, String)>, String> {
    let user =
        env("PGSERVICEFILE").map(PathBuf::from).or_else(|| env("HOME").map(|h| Path::new(&h).join(".pg_service.conf")));
    let system = env("PGSYSCONFDIR")
        .map(|d| Path::new(&d).join("pg_service.conf"))
        .unwrap_or_else(|| PathBuf::from("/etc/postgresql-common/pg_service.conf"));
    let files: Vec<PathBuf> = user.into_iter().chain(std::iter::once(system)).collect();
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else { continue };
        if let Some(section) = service_section(&text, name) {
            return Ok(section);
        }
    }
    let looked: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    Err(format!("service `{name}` is not in {}", looked.join(" or ")))
}

/// The `key=value` lines of section `[name]` of a service file's `text`.
pub fn service_section(text: &str, name: &str) -> Option<Vec<(String, String)>> {
    let mut found = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if found.is_some() {
                break;
            }
            if header.trim() == name {
                found = Some(Vec::new());
            }
            continue;
        }
        if let (Some(items), Some((k, v))) = (found.as_mut(), line.split_once('=')) {
            let items: &mut Vec<(String, String)> = items;
            items.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    found
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
