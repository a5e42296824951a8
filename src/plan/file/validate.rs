//! Validation of a parsed plan file: every section checked, every problem collected with its
//! line and key path, `${VAR}` substituted from the environment.

use std::time::Duration;

use indexmap::IndexMap;
use toml::Spanned;

use super::{constants, *};

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
        // An empty variable in a connection string is a mistake (an unexported variable in a
        // script), not a request for every default: `postgres://localhost:5432/` is not what
        // was meant.
        if let Some(var) =
            referenced_vars(value.get_ref()).into_iter().find(|v| (self.env)(v).is_some_and(|x| x.is_empty()))
        {
            self.problem(self.line(value.span()), field, format!("environment variable `{var}` is empty"));
            return None;
        }
        // libpq's variables come from the process environment, like psql's.
        let process = |k: &str| std::env::var(k).ok();
        match ConnInfo::parse(side, &url).and_then(|c| c.with_libpq_defaults(&process)) {
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
            lock_timeout: DEFAULT_CUTOVER_LOCK_TIMEOUT,
            ..Default::default()
        };
        let Some(c) = raw else { return cutover };
        cutover.lock_timeout =
            self.positive_duration(&c.lock_timeout, "cutover.lock_timeout", DEFAULT_CUTOVER_LOCK_TIMEOUT);
        cutover.fence_blue = c.fence_blue.unwrap_or(false);
        cutover.sequence_gap = c.sequence_gap.unwrap_or(DEFAULT_SEQUENCE_GAP);
        cutover.max_lag_bytes = c.max_lag_bytes.unwrap_or(DEFAULT_MAX_LAG_BYTES);
        if let Some(pb) = c.pgbouncer {
            cutover.pgbouncer = self.pgbouncer(pb);
        }
        cutover.way_back = c.way_back.unwrap_or(false);
        cutover.hooks = c.hooks.iter().enumerate().filter_map(|(i, h)| self.hook("cutover.hook", i + 1, h)).collect();
        let budget = cutover.pgbouncer.as_ref().map(|pb| pb.pause_timeout).unwrap_or(DEFAULT_PAUSE_TIMEOUT);
        let in_pause: Vec<&Hook> = cutover.hooks.iter().filter(|h| h.at == HookPoint::InPause).collect();
        let total: Duration = in_pause.iter().map(|h| h.timeout).sum();
        if let Some(first) = in_pause.first() {
            // The drain and the final check need part of the budget too.
            if total >= budget {
                self.problem(
                    first.line,
                    "cutover.hook.timeout",
                    format!(
                        "the in_pause hooks may take {total:?} together, but everything in the pause must fit \
                         pause_timeout ({budget:?}); give each a smaller `timeout` or raise pause_timeout"
                    ),
                );
            }
        }
        cutover
    }

    fn pgbouncer(&mut self, pb: RawPgbouncer) -> Option<PgbouncerSettings> {
        const F: &str = "cutover.pgbouncer";
        let admin = self.conn(Side::Pgbouncer, "cutover.pgbouncer.admin_url", &pb.admin_url);
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
        let database = pb.database.get_ref().clone();
        let mode_name = pb.mode.as_ref().map(|m| m.get_ref().as_str()).unwrap_or("repoint");
        let mode_line = pb.mode.as_ref().map(|m| self.line(m.span())).unwrap_or(self.line(pb.database.span()));
        let mode = match mode_name {
            "repoint" => {
                if let Some(v) = &pb.v2_database {
                    self.problem(self.line(v.span()), format!("{F}.v2_database"), "only used with mode = \"handover\"");
                }
                if let Some(v) = &pb.v1_after_switch {
                    self.problem(
                        self.line(v.span()),
                        format!("{F}.v1_after_switch"),
                        "only used with mode = \"handover\"",
                    );
                }
                let missing = |what: &str| format!("mode = \"repoint\" needs `{what}`");
                let file = match &pb.databases_file {
                    Some(f) => Some(f.get_ref().clone()),
                    None => {
                        self.problem(mode_line, format!("{F}.databases_file"), missing("databases_file"));
                        None
                    }
                };
                let dsn = match &pb.green_dsn {
                    Some(d) => self.interpolated("cutover.pgbouncer.green_dsn", d),
                    None => {
                        self.problem(mode_line, format!("{F}.green_dsn"), missing("green_dsn"));
                        None
                    }
                };
                file.zip(dsn).map(|(databases_file, green_dsn)| SwitchMode::Repoint { databases_file, green_dsn })
            }
            "handover" => {
                for (field, line) in [
                    ("databases_file", pb.databases_file.as_ref().map(|f| f.span())),
                    ("green_dsn", pb.green_dsn.as_ref().map(|d| d.span())),
                ] {
                    if let Some(span) = line {
                        self.problem(
                            self.line(span),
                            format!("{F}.{field}"),
                            "not used with mode = \"handover\" (the v2 entry already points at green)",
                        );
                    }
                }
                let v1_after_switch = match pb.v1_after_switch.as_ref().map(|v| (v.get_ref().as_str(), v.span())) {
                    None | Some(("disable", _)) => Some(V1AfterSwitch::Disable),
                    Some(("pause", _)) => Some(V1AfterSwitch::Pause),
                    Some((other, span)) => {
                        self.problem(
                            self.line(span),
                            format!("{F}.v1_after_switch"),
                            format!("`{other}`: expected \"disable\" or \"pause\""),
                        );
                        None
                    }
                };
                let v2 = match &pb.v2_database {
                    Some(v) if v.get_ref() == &database => {
                        self.problem(
                            self.line(v.span()),
                            format!("{F}.v2_database"),
                            "must differ from `database` (the v1 entry)",
                        );
                        None
                    }
                    Some(v) => Some(v.get_ref().clone()),
                    None => {
                        self.problem(mode_line, format!("{F}.v2_database"), "mode = \"handover\" needs `v2_database`, the v2 application's PgBouncer entry (pointing at green)");
                        None
                    }
                };
                v2.zip(v1_after_switch)
                    .map(|(v2_database, v1_after_switch)| SwitchMode::Handover { v2_database, v1_after_switch })
            }
            other => {
                self.problem(
                    mode_line,
                    format!("{F}.mode"),
                    format!("`{other}`: expected \"repoint\" or \"handover\""),
                );
                None
            }
        };
        Some(PgbouncerSettings { admin: admin?, database, mode: mode?, pause_timeout: pause_timeout? })
    }

    pub(super) fn hook(&mut self, section: &str, n: usize, raw: &RawHook) -> Option<Hook> {
        let field = format!("{section}[{n}]");
        let line = self.line(raw.at.span());
        let at = HookPoint::parse(raw.at.get_ref());
        if at.is_none() {
            self.problem(
                line,
                format!("{field}.at"),
                format!("`{}`: expected before_pause, in_pause, after_switch or on_abort", raw.at.get_ref()),
            );
        }
        if raw.run.get_ref().trim().is_empty() {
            self.problem(self.line(raw.run.span()), format!("{field}.run"), "is empty");
        }
        let timeout = match &raw.timeout {
            None => Some(DEFAULT_HOOK_TIMEOUT),
            Some(t) => match parse_duration(t.get_ref()) {
                Ok(d) if !d.is_zero() => Some(d),
                Ok(_) => {
                    self.problem(self.line(t.span()), format!("{field}.timeout"), "must be more than 0");
                    None
                }
                Err(e) => {
                    self.problem(self.line(t.span()), format!("{field}.timeout"), e);
                    None
                }
            },
        };
        Some(Hook { at: at?, run: raw.run.get_ref().clone(), timeout: timeout?, line })
    }

    pub(super) fn stall_timeout(&mut self, raw: &Option<Spanned<String>>) -> Duration {
        self.positive_duration(raw, "capture.stall_timeout", DEFAULT_STALL_TIMEOUT)
    }

    /// A duration more than 0, or a problem on `field` (and `default`).
    fn positive_duration(&mut self, raw: &Option<Spanned<String>>, field: &str, default: Duration) -> Duration {
        let Some(v) = raw else { return default };
        match parse_duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.problem(self.line(v.span()), field, "must be more than 0");
                default
            }
            Err(e) => {
                self.problem(self.line(v.span()), field, e);
                default
            }
        }
    }

    /// A duration limit where 0 (the default) means none, or a problem on `field`.
    fn duration_limit(&mut self, v: &Option<Spanned<String>>, field: &str) -> Duration {
        self.duration(v, field, Duration::ZERO)
    }

    /// A duration, `default` when absent, or a problem on `field`.
    fn duration(&mut self, v: &Option<Spanned<String>>, field: &str, default: Duration) -> Duration {
        match v {
            None => default,
            Some(v) => parse_duration(v.get_ref()).unwrap_or_else(|e| {
                self.problem(self.line(v.span()), field, e);
                default
            }),
        }
    }

    /// A limit where 0 (the default) means none, or a problem on `field`.
    fn limit(&mut self, v: &Option<Spanned<i64>>, field: &str) -> u64 {
        match v {
            Some(s) if *s.get_ref() < 0 => {
                self.problem(self.line(s.span()), field, "must be 0 (no limit) or positive");
                0
            }
            Some(s) => *s.get_ref() as u64,
            None => 0,
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
        let max_rows_per_second = self.limit(&raw.max_rows_per_second, "copy.max_rows_per_second");
        let index_build_memory = match &raw.index_build_memory {
            None => DEFAULT_INDEX_BUILD_MEMORY.to_string(),
            Some(m) if memory_setting(m.get_ref()) => m.get_ref().trim().to_string(),
            Some(m) => {
                self.problem(
                    self.line(m.span()),
                    "copy.index_build_memory",
                    format!("`{}` is not an amount of memory like 512MB or 2GB", m.get_ref()),
                );
                DEFAULT_INDEX_BUILD_MEMORY.to_string()
            }
        };
        let index_build_workers = match &raw.index_build_workers {
            None => DEFAULT_INDEX_BUILD_WORKERS,
            Some(n) if (0..=64).contains(n.get_ref()) => *n.get_ref(),
            Some(n) => {
                self.problem(self.line(n.span()), "copy.index_build_workers", "must be 0 to 64");
                DEFAULT_INDEX_BUILD_WORKERS
            }
        } as u32;
        let max_blue_active_sessions = self.limit(&raw.max_blue_active_sessions, "copy.max_blue_active_sessions");
        let max_connections_blue = self.limit(&raw.max_connections_blue, "copy.max_connections_blue");
        let max_connections_green = self.limit(&raw.max_connections_green, "copy.max_connections_green");
        let max_blue_replica_lag = self.duration_limit(&raw.max_blue_replica_lag, "copy.max_blue_replica_lag");
        let max_blue_commit_latency = self.duration_limit(&raw.max_blue_commit_latency, "copy.max_blue_commit_latency");
        let snapshot_max_age = self.duration(&raw.snapshot_max_age, "copy.snapshot_max_age", DEFAULT_SNAPSHOT_MAX_AGE);
        let target_chunk_time =
            self.duration(&raw.target_chunk_time, "copy.target_chunk_time", DEFAULT_TARGET_CHUNK_TIME);
        let worker_lease = match &raw.worker_lease {
            Some(v) if parse_duration(v.get_ref()).is_ok_and(|d| d < MIN_WORKER_LEASE) => {
                self.problem(
                    self.line(v.span()),
                    "copy.worker_lease",
                    format!("must be at least {}s: workers write a heartbeat each second", MIN_WORKER_LEASE.as_secs()),
                );
                DEFAULT_WORKER_LEASE
            }
            _ => self.duration(&raw.worker_lease, "copy.worker_lease", DEFAULT_WORKER_LEASE),
        };
        CopySettings {
            snapshot_max_age,
            target_chunk_time,
            worker_lease,
            workers,
            chunk_rows,
            defer_indexes: raw.defer_indexes.unwrap_or(DEFAULT_DEFER_INDEXES),
            analyze: raw.analyze.unwrap_or(DEFAULT_ANALYZE),
            max_rows_per_second,
            index_build_memory,
            index_build_workers,
            max_blue_active_sessions,
            max_blue_replica_lag,
            max_connections_blue,
            max_connections_green,
            max_blue_commit_latency,
        }
    }

    /// `[capture] ddl_lock_timeout` and `ddl_attempts`.
    pub(super) fn ddl_lock(&mut self, raw: &RawCapture) -> (Duration, u32) {
        let timeout =
            self.positive_duration(&raw.ddl_lock_timeout, "capture.ddl_lock_timeout", DEFAULT_DDL_LOCK_TIMEOUT);
        let attempts = self.positive(&raw.ddl_attempts, "capture.ddl_attempts", i64::from(DEFAULT_DDL_ATTEMPTS));
        (timeout, attempts.min(10_000) as u32)
    }

    /// `[constants]`: names usable as `:name`, values with `${VAR}` substituted.
    pub(super) fn constants(&mut self, raw: IndexMap<String, Spanned<String>>) -> IndexMap<String, String> {
        let mut out = IndexMap::new();
        for (name, value) in raw {
            let field = format!("constants.{name}");
            if !constants::valid_name(&name) {
                self.problem(
                    self.line(value.span()),
                    &field,
                    format!("`{name}` cannot be referenced as `:{name}`: use letters, digits and _, not first a digit"),
                );
                continue;
            }
            if let Some(v) = self.interpolated(&field, &value) {
                out.insert(name, v);
            }
        }
        out
    }

    pub(super) fn tables(&mut self, raw: Vec<RawTable>, constants: &IndexMap<String, String>) -> Vec<TableEntry> {
        if raw.is_empty() {
            self.problem(1, "table", "the plan has no [[table]] entries");
        }
        raw.into_iter().enumerate().filter_map(|(i, t)| self.table(i + 1, t, constants)).collect()
    }

    /// `expr` with `:name` constants substituted, or a problem naming the unknown one.
    fn with_constants(&mut self, line: Line, field: &str, expr: &str, constants: &IndexMap<String, String>) -> String {
        match constants::substitute(expr, constants) {
            Ok(e) => e,
            Err(name) => {
                self.problem(
                    line,
                    field,
                    format!("`:{name}` is no constant of the plan; define it under [constants] (`{name} = \"...\"`)"),
                );
                expr.to_string()
            }
        }
    }

    /// Whether `name` can be an alias written unquoted in expressions (a lower-case identifier).
    fn alias_name(&mut self, line: Line, field: &str, name: &str) -> bool {
        let ok = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            self.problem(
                line,
                field,
                format!("alias `{name}` must be a lower-case name (letters, digits, _), as expressions write it"),
            );
        }
        ok
    }

    /// A `reverse` table: column → (expression over the green row, line).
    fn reverse(
        &mut self,
        field: &str,
        raw: &IndexMap<String, Spanned<String>>,
        constants: &IndexMap<String, String>,
    ) -> IndexMap<String, (String, Line)> {
        let mut out = IndexMap::new();
        for (col, expr) in raw {
            let line = self.line(expr.span());
            let path = format!("{field}.{col}");
            if expr.get_ref().trim().is_empty() {
                self.problem(line, &path, "empty expression");
            }
            out.insert(col.clone(), (self.with_constants(line, &path, expr.get_ref(), constants), line));
        }
        out
    }

    fn join(&mut self, field: &str, j: &RawJoin, constants: &IndexMap<String, String>) -> Option<JoinEntry> {
        let line = self.line(j.alias.span());
        let alias_ok = self.alias_name(line, &format!("{field}.alias"), j.alias.get_ref());
        let table = self.qualified(format!("{field}.table"), &j.table);
        let on_line = self.line(j.on.span());
        if j.on.get_ref().is_empty() {
            self.problem(on_line, format!("{field}.on"), "`on` must name at least one column of the joined table");
        }
        let on: Vec<(String, String)> =
            j.on.get_ref()
                .iter()
                .map(|(c, e)| (c.clone(), self.with_constants(on_line, &format!("{field}.on.{c}"), e, constants)))
                .collect();
        let inner = match j.kind.as_ref().map(|k| k.get_ref().as_str()) {
            None | Some("left") => false,
            Some("inner") => true,
            Some(other) => {
                let l = self.line(j.kind.as_ref().map(|k| k.span()).unwrap_or_default());
                self.problem(l, format!("{field}.kind"), format!("kind `{other}` is not `left` or `inner`"));
                false
            }
        };
        let text = |v: &Option<Spanned<String>>, name: &str, me: &mut Self| {
            v.as_ref().map(|x| me.with_constants(me.line(x.span()), &format!("{field}.{name}"), x.get_ref(), constants))
        };
        let pick = text(&j.pick, "pick", self);
        let also = text(&j.also, "also", self);
        let write_back = j.write_back.as_ref().is_some_and(|w| *w.get_ref());
        let present = j.present.as_ref().map(|x| {
            let l = self.line(x.span());
            (self.with_constants(l, &format!("{field}.present"), x.get_ref(), constants), l)
        });
        let reverse = self.reverse(&format!("{field}.reverse"), &j.reverse, constants);
        if !write_back {
            let stray = present
                .as_ref()
                .map(|(_, l)| (*l, "present"))
                .or(reverse.values().next().map(|(_, l)| (*l, "reverse")));
            if let Some((l, what)) = stray {
                self.problem(
                    l,
                    format!("{field}.{what}"),
                    format!(
                        "`{what}` is for a join the way back writes: set write_back = true on join {}",
                        j.alias.get_ref()
                    ),
                );
            }
        }
        Some(JoinEntry {
            alias: alias_ok.then(|| j.alias.get_ref().clone())?,
            table: table?,
            line,
            on,
            inner,
            pick,
            also,
            write_back,
            present,
            reverse,
        })
    }

    fn qualified(&mut self, field: String, value: &Spanned<String>) -> Option<QualifiedName> {
        QualifiedName::parse(value.get_ref()).map_err(|e| self.problem(self.line(value.span()), field, e)).ok()
    }

    fn table(&mut self, index: usize, t: RawTable, constants: &IndexMap<String, String>) -> Option<TableEntry> {
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
        let mut columns = IndexMap::new();
        let mut constant_columns = Vec::new();
        for (col, expr) in t.columns {
            let line = self.line(expr.span());
            let path = format!("{field}.columns.{col}");
            if expr.get_ref().trim().is_empty() {
                self.problem(line, &path, "empty expression");
            }
            if constants::is_constant(expr.get_ref()) {
                constant_columns.push(col.clone());
            }
            let e = self.with_constants(line, &path, expr.get_ref(), constants);
            columns.insert(col, (e, line));
        }
        let drop = match &t.drop {
            Some(d) => (d.get_ref().clone(), self.line(d.span())),
            None => (Vec::new(), source_line),
        };
        let filter = t.filter.map(|f| {
            let line = self.line(f.span());
            (self.with_constants(line, &format!("{field}.filter"), f.get_ref(), constants), line)
        });
        let alias = t.alias.as_ref().and_then(|a| {
            self.alias_name(self.line(a.span()), &format!("{field}.alias"), a.get_ref()).then(|| a.get_ref().clone())
        });
        let mut joins = Vec::new();
        for (n, j) in t.joins.iter().enumerate() {
            if let Some(j) = self.join(&format!("{field}.join[{}]", n + 1), j, constants) {
                let taken = alias.as_deref().unwrap_or_else(|| source.as_ref().map_or("", |s| s.name.as_str()));
                if j.alias == taken || joins.iter().any(|o: &JoinEntry| o.alias == j.alias) {
                    self.problem(
                        j.line,
                        format!("{field}.join[{}].alias", n + 1),
                        format!("alias `{}` is used twice in this entry; each table needs its own", j.alias),
                    );
                }
                joins.push(j);
            }
        }
        let reverse = self.reverse(&format!("{field}.reverse"), &t.reverse, constants);
        Some(TableEntry {
            index,
            alias,
            joins,
            reverse,
            source: source?,
            source_line,
            target: target?,
            target_line,
            key,
            key_line,
            filter,
            columns,
            constant_columns,
            drop,
            same_name: Vec::new(),
        })
    }
}

/// Whether `text` is a memory amount PostgreSQL takes: digits, optionally a unit.
fn memory_setting(text: &str) -> bool {
    let t = text.trim();
    let digits = t.chars().take_while(char::is_ascii_digit).count();
    digits > 0 && matches!(t[digits..].trim(), "" | "kB" | "MB" | "GB" | "TB")
}

/// The names of the `${VAR}` references in `text`.
fn referenced_vars(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else { break };
        out.push(after[..end].to_string());
        rest = &after[end + 1..];
    }
    out
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
