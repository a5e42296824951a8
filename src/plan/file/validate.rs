//! Validation of a parsed plan file: every section checked, every problem collected with its
//! line and key path, `${VAR}` substituted from the environment.

use std::time::Duration;

use indexmap::IndexMap;
use toml::Spanned;

use super::*;

/// Checks a parsed file section by section, collecting every problem with its line and key.
pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    pub(super) problems: Vec<PlanProblem>,
    pub(super) name: String,
}

impl Validator<'_> {
    fn line(&self, span: std::ops::Range<usize>) -> Line {
        line_col(self.text, span.start).0
    }

    fn problem(&mut self, line: Line, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(PlanProblem { line, field: field.into(), message: message.into() });
    }

    pub(super) fn name(&mut self, raw: &Spanned<String>) {
        let name = raw.get_ref();
        if name.is_empty() || name.len() > 40 || !name.chars().all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-')) {
            self.problem(
                self.line(raw.span()),
                "name",
                format!("`{name}` must be 1-40 characters of a-z, 0-9, _ and -"),
            );
        }
    }

    /// `${VAR}` substituted, or a problem naming the variable.
    fn interpolated(&mut self, field: &str, value: &Spanned<String>) -> Option<String> {
        match interpolate(value.get_ref(), self.env) {
            Ok(v) => Some(v),
            Err(var) => {
                self.problem(self.line(value.span()), field, format!("environment variable `{var}` is not set"));
                None
            }
        }
    }

    pub(super) fn conn(&mut self, side: Side, field: &str, value: &Spanned<String>) -> Option<ConnInfo> {
        let url = self.interpolated(field, value)?;
        match ConnInfo::parse(side, &url) {
            Ok(c) => Some(c.with_application_name(&format!("migrate/{}", self.name))),
            Err(e) => {
                self.problem(self.line(value.span()), field, e.to_string());
                None
            }
        }
    }

    pub(super) fn cutover(&mut self, raw: Option<RawCutover>) -> CutoverSettings {
        let mut cutover = CutoverSettings {
            sequence_gap: DEFAULT_SEQUENCE_GAP,
            max_lag_bytes: DEFAULT_MAX_LAG_BYTES,
            ..Default::default()
        };
        let Some(c) = raw else { return cutover };
        cutover.fence_blue = c.fence_blue.unwrap_or(false);
        cutover.sequence_gap = c.sequence_gap.unwrap_or(DEFAULT_SEQUENCE_GAP);
        cutover.max_lag_bytes = c.max_lag_bytes.unwrap_or(DEFAULT_MAX_LAG_BYTES);
        if let Some(pb) = c.pgbouncer {
            let admin = self.conn(Side::Pgbouncer, "cutover.pgbouncer.admin_url", &pb.admin_url);
            let green_dsn = self.interpolated("cutover.pgbouncer.green_dsn", &pb.green_dsn);
            let pause_timeout = match &pb.pause_timeout {
                None => Some(DEFAULT_PAUSE_TIMEOUT),
                Some(s) => match parse_duration(s.get_ref()) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        self.problem(self.line(s.span()), "cutover.pgbouncer.pause_timeout", e);
                        None
                    }
                },
            };
            if let (Some(admin), Some(green_dsn), Some(pause_timeout)) = (admin, green_dsn, pause_timeout) {
                cutover.pgbouncer = Some(PgbouncerSettings {
                    admin,
                    database: pb.database,
                    databases_file: pb.databases_file,
                    green_dsn,
                    pause_timeout,
                });
            }
        }
        cutover
    }

    pub(super) fn stall_timeout(&mut self, raw: &Option<Spanned<String>>) -> Duration {
        let Some(v) = raw else { return DEFAULT_STALL_TIMEOUT };
        match parse_duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.problem(self.line(v.span()), "capture.stall_timeout", "must be more than 0");
                DEFAULT_STALL_TIMEOUT
            }
            Err(e) => {
                self.problem(self.line(v.span()), "capture.stall_timeout", e);
                DEFAULT_STALL_TIMEOUT
            }
        }
    }

    fn positive(&mut self, v: &Option<Spanned<i64>>, field: &str, default: i64) -> i64 {
        match v {
            None => default,
            Some(s) if *s.get_ref() > 0 => *s.get_ref(),
            Some(s) => {
                self.problem(self.line(s.span()), field, "must be a positive number");
                default
            }
        }
    }

    pub(super) fn copy(&mut self, raw: &RawCopy) -> CopySettings {
        let workers = self.positive(&raw.workers, "copy.workers", default_workers() as i64) as usize;
        let chunk_rows = self.positive(&raw.chunk_rows, "copy.chunk_rows", DEFAULT_CHUNK_ROWS as i64) as u64;
        let max_rows_per_second = match &raw.max_rows_per_second {
            Some(s) if *s.get_ref() < 0 => {
                self.problem(self.line(s.span()), "copy.max_rows_per_second", "must be 0 (unlimited) or positive");
                0
            }
            Some(s) => *s.get_ref() as u64,
            None => 0,
        };
        CopySettings {
            workers,
            chunk_rows,
            defer_indexes: raw.defer_indexes.unwrap_or(DEFAULT_DEFER_INDEXES),
            max_rows_per_second,
        }
    }

    pub(super) fn tables(&mut self, raw: Vec<RawTable>) -> Vec<TableEntry> {
        if raw.is_empty() {
            self.problem(1, "table", "the plan has no [[table]] entries");
        }
        raw.into_iter().enumerate().filter_map(|(i, t)| self.table(i + 1, t)).collect()
    }

    fn qualified(&mut self, field: String, value: &Spanned<String>) -> Option<QualifiedName> {
        QualifiedName::parse(value.get_ref()).map_err(|e| self.problem(self.line(value.span()), field, e)).ok()
    }

    fn table(&mut self, index: usize, t: RawTable) -> Option<TableEntry> {
        let field = format!("table[{index}]");
        let source_line = self.line(t.source.span());
        let source = self.qualified(format!("{field}.source"), &t.source);
        let (target, target_line) = match &t.target {
            Some(s) => (self.qualified(format!("{field}.target"), s), self.line(s.span())),
            None => (source.clone(), source_line),
        };
        let key_line = self.line(t.key.span());
        let key = t.key.get_ref().clone();
        if key.is_empty() {
            self.problem(key_line, format!("{field}.key"), "key must name at least one source column");
        }
        if t.columns.is_empty() {
            self.problem(
                source_line,
                format!("{field}.columns"),
                "no columns mapped; add [table.columns] with target = \"expression\"",
            );
        }
        let mut columns = IndexMap::new();
        for (col, expr) in t.columns {
            let line = self.line(expr.span());
            if expr.get_ref().trim().is_empty() {
                self.problem(line, format!("{field}.columns.{col}"), "empty expression");
            }
            columns.insert(col, (expr.get_ref().clone(), line));
        }
        let filter = t.filter.map(|f| (f.get_ref().clone(), self.line(f.span())));
        Some(TableEntry {
            index,
            source: source?,
            source_line,
            target: target?,
            target_line,
            key,
            key_line,
            filter,
            columns,
        })
    }
}

/// Replaces `${VAR}` with the variable's value; returns the first missing variable's name.
fn interpolate(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let var = &after[..end];
        out.push_str(&env(var).ok_or_else(|| var.to_string())?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// 1-based line and column of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, column)
}
