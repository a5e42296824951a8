//! PgBouncer's `%include`d databases file: find one database's line and rewrite only it,
//! atomically (write a temporary file beside it, then rename).

use std::{io::Write, path::Path};

/// The byte range of the line defining `database` (`name = connstr`), if any.
pub fn find_entry(text: &str, database: &str) -> Option<std::ops::Range<usize>> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let trimmed = line.trim_start();
        if trimmed.starts_with(';') || trimmed.starts_with('#') || trimmed.starts_with('[') {
            continue;
        }
        if let Some((name, _)) = trimmed.split_once('=') {
            let name = name.trim().trim_matches('"');
            if name == database {
                let end = start + line.trim_end_matches(['\n', '\r']).len();
                return Some(start..end);
            }
        }
    }
    None
}

/// Replaces the line of `database` with `database = dsn`, atomically. Returns the old line so an
/// abort can put it back.
pub fn rewrite(path: &Path, database: &str, dsn: &str) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let range = find_entry(&text, database).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no line for database `{database}` in {}", path.display()),
        )
    })?;
    let old = text[range.clone()].to_string();
    let mut new = String::with_capacity(text.len() + dsn.len());
    new.push_str(&text[..range.start]);
    new.push_str(&format!("{database} = {dsn}"));
    new.push_str(&text[range.end..]);
    let tmp = path.with_extension("migrate-tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(new.as_bytes())?;
        f.sync_all()?;
    }
    // Keep the original file's permissions so PgBouncer can still read it.
    if let Ok(meta) = std::fs::metadata(path) {
        std::fs::set_permissions(&tmp, meta.permissions())?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_rewrites_only_that_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db.ini");
        std::fs::write(&p, "; comment app = x\nother = host=a\napp = host=blue dbname=app\nlast = host=c\n").unwrap();
        let old = rewrite(&p, "app", "host=green dbname=app").unwrap();
        assert_eq!(old, "app = host=blue dbname=app");
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text, "; comment app = x\nother = host=a\napp = host=green dbname=app\nlast = host=c\n");
        assert!(rewrite(&p, "nope", "x").is_err());
    }
}
