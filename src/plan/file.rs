//! The plan file as written: TOML structs with source spans, `${VAR}` interpolation, and the
//! file-level checks that need no database. Produces a [`Plan`]; nothing downstream sees TOML.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use indexmap::IndexMap;
use serde::Deserialize;
use toml::Spanned;

use crate::{
    error::{Error, PlanProblem},
    pg::{ConnInfo, QualifiedName, Side},
};

mod constants;
mod validate;
use validate::{line_col, Validator};

/// Default number of parallel copy workers when the plan gives none: the core count.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}
/// Default rows per copy chunk.
pub const DEFAULT_CHUNK_ROWS: u64 = 50_000;
/// The copy takes a new snapshot of blue this often (`[copy] snapshot_max_age`), so no copy
/// snapshot holds back blue's vacuum horizon for longer than this plus one claim of chunks.
pub const DEFAULT_SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(60);
/// A copy worker claims as many consecutive chunks as it copies in about this long
/// (`[copy] target_chunk_time`): each claim costs a few milliseconds (claim, snapshot, checks,
/// commits), 5 ms a 50,000-row chunk at 100M rows.
pub const DEFAULT_TARGET_CHUNK_TIME: Duration = Duration::from_secs(1);
/// A joined copy worker that writes no heartbeat to green for this long (`[copy] worker_lease`)
/// is cut off by the leader: its sessions on green and blue are ended, so its chunks come free
/// and its snapshots stop holding blue's horizon. A frozen or cut-off host otherwise keeps them
/// until green's TCP keepalives give up, hours with the server's defaults.
pub const DEFAULT_WORKER_LEASE: Duration = Duration::from_secs(60);
/// The shortest `[copy] worker_lease`: workers write a heartbeat each second, a green busy with
/// the copy can delay one by a few, and a joined worker stops by itself once it renewed nothing
/// for a lease, each heartbeat given half of it: two slow ones in a row at 10 s.
pub const MIN_WORKER_LEASE: Duration = Duration::from_secs(10);
/// Indexes are deferred by default: bulk COPY into an indexed table was 2.4x slower here.
pub const DEFAULT_DEFER_INDEXES: bool = true;
/// Each target is analyzed once its copy ends: autovacuum alone left green's targets without
/// planner statistics for minutes at 100M rows, and never analyzes a partitioned parent.
pub const DEFAULT_ANALYZE: bool = true;
/// How long `PAUSE` may take before cutover gives up and resumes on blue.
pub const DEFAULT_PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Lag (bytes of blue WAL not yet applied) above which cutover refuses to start.
pub const DEFAULT_MAX_LAG_BYTES: u64 = 16 * 1024 * 1024;
/// Apply sessions when the plan names none: two kept up with twice the keys of one on this
/// project's 2-core machine; more mostly contend for the same target rows' indexes.
pub const DEFAULT_APPLY_WORKERS: usize = 2;
/// A hook without a `timeout` is killed after this (an `in_pause` hook must set a smaller one).
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// How far past blue's value green sequences are set at cutover.
pub const DEFAULT_SEQUENCE_GAP: i64 = 1000;
/// `status` warns when our slot holds back more of blue's WAL than this (an orphaned slot
/// fills blue's disk).
/// A capture or apply round without an answer for this long counts as a lost connection.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// `status` warns when our slot holds back more of blue's WAL than this.
pub const DEFAULT_WARN_RETAINED_BYTES: u64 = 1024 * 1024 * 1024;
/// `maintenance_work_mem` for rebuilding deferred indexes: ADD PRIMARY KEY and CREATE INDEX ran
/// several times faster here than with the server default (64MB).
pub const DEFAULT_INDEX_BUILD_MEMORY: &str = "512MB";
/// `max_parallel_maintenance_workers` for those rebuilds (server default: 2).
pub const DEFAULT_INDEX_BUILD_WORKERS: i64 = 4;
/// How long installing or removing capture triggers waits for its table lock per attempt: while
/// it waits, every new write to the table queues behind it.
pub const DEFAULT_DDL_LOCK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the cutover waits for the follower to stand aside.
pub const DEFAULT_CUTOVER_LOCK_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at that lock before giving up.
pub const DEFAULT_DDL_ATTEMPTS: u32 = 30;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    name: Spanned<String>,
    blue: RawEndpoint,
    green: RawEndpoint,
    #[serde(default)]
    copy: RawCopy,
    #[serde(default)]
    capture: RawCapture,
    #[serde(default)]
    constants: IndexMap<String, Spanned<String>>,
    #[serde(default, rename = "table")]
    tables: Vec<RawTable>,
    cutover: Option<RawCutover>,
    rollback: Option<RawRollback>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollback {
    #[serde(default, rename = "hook")]
    hooks: Vec<RawHook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    url: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCopy {
    workers: Option<Spanned<i64>>,
    chunk_rows: Option<Spanned<i64>>,
    defer_indexes: Option<bool>,
    analyze: Option<bool>,
    max_rows_per_second: Option<Spanned<i64>>,
    index_build_memory: Option<Spanned<String>>,
    index_build_workers: Option<Spanned<i64>>,
    max_blue_active_sessions: Option<Spanned<i64>>,
    max_blue_replica_lag: Option<Spanned<String>>,
    max_connections_blue: Option<Spanned<i64>>,
    max_connections_green: Option<Spanned<i64>>,
    max_blue_commit_latency: Option<Spanned<String>>,
    snapshot_max_age: Option<Spanned<String>>,
    target_chunk_time: Option<Spanned<String>>,
    worker_lease: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapture {
    method: Option<CaptureMethod>,
    warn_retained_bytes: Option<u64>,
    stall_timeout: Option<Spanned<String>>,
    apply_workers: Option<Spanned<usize>>,
    ddl_lock_timeout: Option<Spanned<String>>,
    ddl_attempts: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    source: Spanned<String>,
    target: Option<Spanned<String>>,
    key: Spanned<Vec<String>>,
    filter: Option<Spanned<String>>,
    drop: Option<Spanned<Vec<String>>>,
    alias: Option<Spanned<String>>,
    #[serde(default, rename = "join")]
    joins: Vec<RawJoin>,
    #[serde(default)]
    columns: IndexMap<String, Spanned<String>>,
    #[serde(default)]
    reverse: IndexMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJoin {
    alias: Spanned<String>,
    table: Spanned<String>,
    on: Spanned<IndexMap<String, String>>,
    kind: Option<Spanned<String>>,
    pick: Option<Spanned<String>>,
    also: Option<Spanned<String>>,
    write_back: Option<Spanned<bool>>,
    present: Option<Spanned<String>>,
    #[serde(default)]
    reverse: IndexMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCutover {
    pgbouncer: Option<RawPgbouncer>,
    fence_blue: Option<bool>,
    way_back: Option<bool>,
    sequence_gap: Option<i64>,
    max_lag_bytes: Option<u64>,
    lock_timeout: Option<Spanned<String>>,
    #[serde(default, rename = "hook")]
    hooks: Vec<RawHook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPgbouncer {
    admin_url: Spanned<String>,
    database: Spanned<String>,
    mode: Option<Spanned<String>>,
    databases_file: Option<Spanned<PathBuf>>,
    green_dsn: Option<Spanned<String>>,
    v2_database: Option<Spanned<String>>,
    v1_after_switch: Option<Spanned<String>>,
    pause_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    at: Spanned<String>,
    run: Spanned<String>,
    timeout: Option<Spanned<String>>,
}

/// How changes on blue are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMethod {
    /// A logical replication slot with pgoutput.
    Logical,
    /// Row triggers writing keys into a change table on blue.
    Trigger,
    /// Logical where blue's `wal_level` and privileges allow it, else triggers.
    #[default]
    Auto,
}

/// A line in the plan file, for messages.
pub type Line = usize;

/// A validated plan file: typed values with their line numbers, no TOML left.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Path the plan was read from.
    pub path: PathBuf,
    /// Names the slot, publication, state schema; `[a-z0-9_-]+`.
    pub name: String,
    /// Blue (source) connection.
    pub blue: ConnInfo,
    /// Green (target) connection.
    pub green: ConnInfo,
    /// `[copy]` with defaults applied.
    pub copy: CopySettings,
    /// `[capture] method`.
    pub capture: CaptureMethod,
    /// `[capture] warn_retained_bytes`: `status` warns above this much WAL held by the slot.
    pub warn_retained_bytes: u64,
    /// `[capture] stall_timeout`: a following round with no answer for this long reconnects.
    pub stall_timeout: Duration,
    /// `[capture] apply_workers`: apply sessions on green, each taking the pending keys of its
    /// share of the key hashes.
    pub apply_workers: usize,
    /// `[capture] ddl_lock_timeout` and `ddl_attempts`: the lock wait per attempt, and the
    /// attempts, for installing or removing capture triggers on blue.
    pub ddl_lock: (Duration, u32),
    /// `[constants]`: name → value (`${VAR}` substituted), in file order. Expressions and
    /// filters reference them as `:name`, already replaced by quoted literals in `tables`.
    pub constants: IndexMap<String, String>,
    /// `[[table]]` entries in file order.
    pub tables: Vec<TableEntry>,
    /// `[cutover]`, if present.
    pub cutover: CutoverSettings,
}

/// `[copy]` settings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopySettings {
    /// Parallel chunk workers.
    pub workers: usize,
    /// Target rows per chunk.
    pub chunk_rows: u64,
    /// Drop secondary indexes and constraints before the load, rebuild after.
    pub defer_indexes: bool,
    /// `ANALYZE` each target on green once its rows are copied and its indexes rebuilt, so the
    /// application's first queries on green are planned with statistics.
    pub analyze: bool,
    /// Throttle across all workers; 0 means unlimited.
    pub max_rows_per_second: u64,
    /// `maintenance_work_mem` for index rebuilds on green (validated: digits and a unit).
    pub index_build_memory: String,
    /// `max_parallel_maintenance_workers` for index rebuilds on green.
    pub index_build_workers: u32,
    /// The copy waits while blue has more active client sessions than this (0: no limit).
    pub max_blue_active_sessions: u64,
    /// The copy waits while blue's standbys replay further behind than this (0: no limit).
    #[serde(with = "duration_secs")]
    pub max_blue_replica_lag: Duration,
    /// The copy waits while a commit on blue takes longer than this (0: no limit).
    #[serde(with = "duration_secs")]
    pub max_blue_commit_latency: Duration,
    /// `plan` refuses settings under which a `copy` would hold more sessions on blue than this
    /// (0: no cap).
    pub max_connections_blue: u64,
    /// The same for green.
    pub max_connections_green: u64,
    /// How long one snapshot of blue serves the copy before a new one replaces it (0: one
    /// snapshot for the whole run, holding blue's vacuum horizon until it ends).
    #[serde(with = "duration_secs")]
    pub snapshot_max_age: Duration,
    /// How long one claim of consecutive chunks should take: a worker that copies chunks faster
    /// claims several at once, so each claim's fixed cost is paid once per about this long
    /// (0: one chunk a claim). Not while a row rate is in force.
    #[serde(with = "duration_secs")]
    pub target_chunk_time: Duration,
    /// How long a joined worker may go without a heartbeat before the leader ends its sessions
    /// and its chunks go to others.
    #[serde(with = "duration_secs")]
    pub worker_lease: Duration,
}

/// Durations in JSON as seconds (`plan --format json`).
mod duration_secs {
    /// Seconds, fractional.
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// One `[[table]]` entry.
#[derive(Debug, Clone)]
pub struct TableEntry {
    /// Position in the file, 1-based as users count (`table[1]`).
    pub index: usize,
    /// Source relation on blue.
    pub source: QualifiedName,
    /// Line of `source`.
    pub source_line: Line,
    /// Target relation on green.
    pub target: QualifiedName,
    /// Line of `target` (or of `source` when target is implied).
    pub target_line: Line,
    /// Key columns on the source.
    pub key: Vec<String>,
    /// Line of `key`.
    pub key_line: Line,
    /// Optional filter over the source row.
    pub filter: Option<(String, Line)>,
    /// Target column → (expression over the source row, line), in file order; `:name`
    /// constants replaced by their quoted literals.
    pub columns: IndexMap<String, (String, Line)>,
    /// Target columns set to a constant (`:name` or one quoted literal, optionally cast): they
    /// may complete green's key beyond the columns the source key maps to.
    pub constant_columns: Vec<String>,
    /// `drop`: source columns that on purpose reach no target column, with its line.
    pub drop: (Vec<String>, Line),
    /// Target columns mapped by default from the same-named source column (filled in when the
    /// plan is resolved; `columns` then holds them too).
    pub same_name: Vec<String>,
    /// The name expressions use for the driving (source) table: `alias`, else the table's name.
    pub alias: Option<String>,
    /// Tables joined to each driving row, in order (`[[table.join]]`).
    pub joins: Vec<JoinEntry>,
    /// `[table.reverse]`: source column → (expression over the green row, line), for a way back.
    pub reverse: IndexMap<String, (String, Line)>,
}

/// One `[[table.join]]`: a table joined to each driving row, at most one row of it per row.
#[derive(Debug, Clone)]
pub struct JoinEntry {
    /// The name expressions use for it.
    pub alias: String,
    /// The joined table on blue.
    pub table: QualifiedName,
    /// Line of `alias`.
    pub line: Line,
    /// `on`: joined column = expression over the driving table and earlier joins, in order.
    pub on: Vec<(String, String)>,
    /// `kind = "inner"`: a driving row without a match makes no target row.
    pub inner: bool,
    /// `pick`: the ORDER BY that chooses one row where several match.
    pub pick: Option<String>,
    /// `also`: a further condition on the joined row.
    pub also: Option<String>,
    /// `write_back = true`: the joined row is part of the target row, so the way back writes it
    /// (and deletes it with the row); otherwise it is a lookup the way back leaves alone.
    pub write_back: bool,
    /// `present`: when a green row has this joined row (expression over the green row).
    pub present: Option<(String, Line)>,
    /// `[table.join.reverse]`: joined column → (expression over the green row, line).
    pub reverse: IndexMap<String, (String, Line)>,
}

impl TableEntry {
    /// The field path used in messages, e.g. `table[2]`.
    pub fn path(&self) -> String {
        format!("table[{}]", self.index)
    }
}

impl CopySettings {
    /// Whether the copy waits on blue's load (`max_blue_active_sessions`, `max_blue_replica_lag`):
    /// a session of its own reads it.
    pub fn limits_blue_load(&self) -> bool {
        self.max_blue_active_sessions > 0 || !self.max_blue_replica_lag.is_zero()
    }

    /// Whether the copy waits on blue's commit time (`max_blue_commit_latency`): a session of
    /// its own times a commit.
    pub fn times_blue_commits(&self) -> bool {
        !self.max_blue_commit_latency.is_zero()
    }

    /// The session settings for index builds on green (`index_build_memory`,
    /// `index_build_workers`): more memory and parallel workers make CREATE INDEX and ADD
    /// PRIMARY KEY several times faster than the server defaults (64 MB, 2 workers).
    pub fn index_build_sql(&self) -> String {
        format!(
            "SET maintenance_work_mem = {}; SET max_parallel_maintenance_workers = {}",
            crate::pg::literal(&self.index_build_memory),
            self.index_build_workers
        )
    }
}

/// `[cutover]` settings.
#[derive(Debug, Clone, Default)]
pub struct CutoverSettings {
    /// `[cutover.pgbouncer]`.
    pub pgbouncer: Option<PgbouncerSettings>,
    /// Make blue read-only after the switch.
    pub fence_blue: bool,
    /// Open a way back at the switch: capture on green, carried to blue by the running `copy`,
    /// so `migrate rollback` can switch back with nothing lost.
    pub way_back: bool,
    /// Green sequences are set this far past blue's value.
    pub sequence_gap: i64,
    /// Preflight refuses when capture lag exceeds this.
    pub max_lag_bytes: u64,
    /// `[[cutover.hook]]`, in file order.
    pub hooks: Vec<Hook>,
    /// How long the cutover waits for the follower to stand aside (the follow gate on green)
    /// before it gives up, traffic untouched.
    pub lock_timeout: Duration,
    /// `[[rollback.hook]]`, in file order: the same points, run by `migrate rollback`.
    pub rollback_hooks: Vec<Hook>,
}

/// `[cutover.pgbouncer]`.
#[derive(Debug, Clone)]
pub struct PgbouncerSettings {
    /// Admin console connection.
    pub admin: ConnInfo,
    /// The database entry the application uses (in `handover` mode: the v1 application's,
    /// pointing at blue).
    pub database: String,
    /// How traffic moves to green.
    pub mode: SwitchMode,
    /// Budget for `PAUSE` and everything done while traffic is paused.
    pub pause_timeout: Duration,
}

/// How the cutover moves traffic to green.
#[derive(Debug, Clone)]
pub enum SwitchMode {
    /// One entry, repointed at green: right when the application's SQL works on both schemas.
    Repoint {
        /// The `%include`d file holding the entry's line.
        databases_file: PathBuf,
        /// What the entry points at after the switch (libpq key=value form); may hold a password.
        green_dsn: String,
    },
    /// The application changes version with the database: the v1 application uses `database`
    /// (blue), the v2 application `v2_database` (green, paused until the switch). Nothing is
    /// rewritten; the switch resumes the v2 entry and never lets a v1 statement reach green.
    Handover {
        /// The v2 application's entry, pointing at green.
        v2_database: String,
        /// What becomes of the v1 entry after the switch.
        v1_after_switch: V1AfterSwitch,
    },
}

impl PgbouncerSettings {
    /// The mode and its entries, as `plan` and `cutover --dry-run` show them.
    pub fn describe(&self) -> String {
        match &self.mode {
            SwitchMode::Repoint { databases_file, .. } => format!(
                "repoint: entry `{}` is rewritten in {} from blue to green (the application's SQL must work on both)",
                self.database,
                databases_file.display()
            ),
            SwitchMode::Handover { v2_database, v1_after_switch } => format!(
                "handover: v1 entry `{}` (blue) is paused, then {}; v2 entry `{v2_database}` (green) stays paused \
                 until the switch resumes it",
                self.database,
                match v1_after_switch {
                    V1AfterSwitch::Disable => "disabled and its clients dropped with an error",
                    V1AfterSwitch::Pause => "left paused (its clients wait until query_wait_timeout fails them)",
                }
            ),
        }
    }
}

impl Hook {
    /// `in_pause `cmd` (at most 1s)`.
    pub fn describe(&self) -> String {
        format!("{} `{}` (at most {:?})", self.at.name(), self.run, self.timeout)
    }
}

impl SwitchMode {
    /// `repoint` or `handover`, as written in the plan.
    pub fn name(&self) -> &'static str {
        match self {
            SwitchMode::Repoint { .. } => "repoint",
            SwitchMode::Handover { .. } => "handover",
        }
    }
}

/// The v1 entry after a handover. Either way its clients get an error, never blue (whose writes
/// nobody follows any more) and never green.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1AfterSwitch {
    /// `DISABLE` then `KILL`: new and queued clients get an error at once.
    Disable,
    /// Stays paused: clients queue until PgBouncer's `query_wait_timeout` fails them.
    Pause,
}

/// Where in the cutover a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookPoint {
    /// After the catch-up, just before PAUSE; failing aborts (traffic stays on blue).
    BeforePause,
    /// In the pause, after the drain, the final check and sequences, before traffic moves;
    /// failing or overrunning aborts back to blue.
    InPause,
    /// Once traffic is on green; a failure is reported, nothing is rolled back.
    AfterSwitch,
    /// After a cutover rolled back to blue (e.g. to undo what an `in_pause` hook flipped).
    OnAbort,
}

impl HookPoint {
    /// The name used in the plan and in `MIGRATE_HOOK`.
    pub fn name(self) -> &'static str {
        match self {
            HookPoint::BeforePause => "before_pause",
            HookPoint::InPause => "in_pause",
            HookPoint::AfterSwitch => "after_switch",
            HookPoint::OnAbort => "on_abort",
        }
    }

    fn parse(s: &str) -> Option<HookPoint> {
        [HookPoint::BeforePause, HookPoint::InPause, HookPoint::AfterSwitch, HookPoint::OnAbort]
            .into_iter()
            .find(|p| p.name() == s)
    }
}

/// A `[[cutover.hook]]`: a shell command run at a named point of the cutover.
#[derive(Debug, Clone)]
pub struct Hook {
    /// When it runs.
    pub at: HookPoint,
    /// The command, run with `sh -c`.
    pub run: String,
    /// Killed (with its process group) and counted as failed past this.
    pub timeout: Duration,
    /// Line of its `at` in the plan.
    pub line: Line,
}

impl Plan {
    /// This plan as a joined worker (`copy --join`, `verify --join`) uses it: data it sends to
    /// blue must be acknowledged within `[copy] worker_lease` (unless blue's URL sets
    /// `tcp_user_timeout`). A worker cut off from blue alone keeps its lease on green; this is
    /// how it notices, in about a lease, that its sessions there are gone. Green is left as
    /// given: a green that stops reading a chunk's COPY for a while (a slow disk) is no lost
    /// host, and being cut off from green is what the lease itself notices.
    pub fn joined_worker(&self) -> Plan {
        let mut plan = self.clone();
        plan.blue.bound_unacknowledged(plan.copy.worker_lease);
        plan
    }

    /// Reads and validates a plan file. Errors name the file and line; all file-level problems
    /// are reported at once.
    pub fn load(path: &Path) -> Result<Plan, Error> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::PlanRead { path: path.to_path_buf(), source })?;
        Self::parse(path, &text, &|k| std::env::var(k).ok())
    }

    /// Parses plan text; `env` looks up `${VAR}` references.
    pub fn parse(path: &Path, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Plan, Error> {
        let raw: RawPlan = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
            Error::PlanParse { path: path.to_path_buf(), line, column, message: e.message().trim().to_string() }
        })?;
        let mut v = Validator { text, env, problems: Vec::new(), name: raw.name.get_ref().clone() };
        v.name(&raw.name);
        let blue = v.conn(Side::Blue, "blue.url", &raw.blue.url);
        let green = v.conn(Side::Green, "green.url", &raw.green.url);
        let mut cutover = v.cutover(raw.cutover);
        cutover.rollback_hooks = match raw.rollback {
            Some(r) => r.hooks.iter().enumerate().filter_map(|(i, h)| v.hook("rollback.hook", i + 1, h)).collect(),
            None => Vec::new(),
        };
        let stall_timeout = v.stall_timeout(&raw.capture.stall_timeout);
        let apply_workers = match &raw.capture.apply_workers {
            None => DEFAULT_APPLY_WORKERS,
            Some(n) if (1..=16).contains(n.get_ref()) => *n.get_ref(),
            Some(n) => {
                let line = validate::line_col(text, n.span().start).0;
                v.problems.push(PlanProblem {
                    line,
                    field: "capture.apply_workers".into(),
                    message: format!("{} is out of range: 1 to 16", n.get_ref()),
                });
                DEFAULT_APPLY_WORKERS
            }
        };
        let copy = v.copy(&raw.copy);
        let ddl_lock = v.ddl_lock(&raw.capture);
        let constants = v.constants(raw.constants);
        let tables = v.tables(raw.tables, &constants);
        match (blue, green) {
            (Some(blue), Some(green)) if v.problems.is_empty() => Ok(Plan {
                path: path.to_path_buf(),
                name: v.name,
                blue,
                green,
                copy,
                capture: raw.capture.method.unwrap_or_default(),
                warn_retained_bytes: raw.capture.warn_retained_bytes.unwrap_or(DEFAULT_WARN_RETAINED_BYTES),
                stall_timeout,
                apply_workers,
                ddl_lock,
                constants,
                tables,
                cutover,
            }),
            _ => Err(Error::PlanInvalid { path: path.to_path_buf(), problems: v.problems }),
        }
    }
}

/// Parses `250ms`, `2s`, `1m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{text}` is not a duration like 500ms, 2s or 1m"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" | "min" => n * 60.0,
        _ => return Err(format!("`{text}` is not a duration like 500ms, 2s or 1m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{text}` is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "BLUE_URL" => Some("postgres://u:topsecret@localhost:5432/blue".into()),
            "GREEN_URL" => Some("host=localhost dbname=green".into()),
            _ => None,
        }
    }

    const MINIMAL: &str = r#"
name = "t1"
[blue]
url = "${BLUE_URL}"
[green]
url = "${GREEN_URL}"
[[table]]
source = "a"
key = ["id"]
[table.columns]
id = "id"
"#;

    #[test]
    fn reference_parses_as_plan() {
        let text = include_str!("../../plans/reference.toml");
        let env = |k: &str| Some(format!("postgres://localhost/{k}"));
        let plan = Plan::parse(Path::new("plans/reference.toml"), text, &env).expect("reference.toml parses");
        assert!(plan.cutover.pgbouncer.is_some());
        assert!(!plan.tables.is_empty());
    }

    #[test]
    fn split_example_parses_as_plan() {
        let text = include_str!("../../plans/split-and-constants.toml");
        let env = |k: &str| {
            Some(if k == "GREEN_NID" {
                "5b2a6a2e-5b1c-4b6e-9a40-2f7e4f1d0c11".into()
            } else {
                format!("postgres://localhost/{k}")
            })
        };
        let plan = Plan::parse(Path::new("plans/split-and-constants.toml"), text, &env).expect("the example parses");
        assert_eq!(plan.tables[0].columns["nid"].0, "'5b2a6a2e-5b1c-4b6e-9a40-2f7e4f1d0c11'");
        assert_eq!(plan.tables[0].constant_columns, vec!["nid".to_string()]);
        assert_eq!(plan.tables[0].source, plan.tables[1].source);
    }

    fn problems(extra: &str) -> Vec<(usize, String, String)> {
        match Plan::parse(Path::new("p.toml"), &format!("{MINIMAL}{extra}"), &env) {
            Err(Error::PlanInvalid { problems, .. }) => {
                problems.into_iter().map(|p| (p.line, p.field, p.message)).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn worker_lease_has_a_floor() {
        let plan = Plan::parse(Path::new("p.toml"), MINIMAL, &env).unwrap();
        assert_eq!(plan.copy.worker_lease, DEFAULT_WORKER_LEASE);
        let plan =
            Plan::parse(Path::new("p.toml"), &format!("{MINIMAL}[copy]\nworker_lease = \"15s\"\n"), &env).unwrap();
        assert_eq!(plan.copy.worker_lease, Duration::from_secs(15));
        let p = problems("[copy]\nworker_lease = \"9s\"\n");
        assert!(p.iter().any(|(_, f, m)| f == "copy.worker_lease" && m.contains("at least 10s")), "{p:?}");
        let p = problems("[copy]\nworker_lease = \"later\"\n");
        assert!(p.iter().any(|(_, f, m)| f == "copy.worker_lease" && m.contains("not a duration")), "{p:?}");
    }

    #[test]
    fn index_build_and_lock_knobs() {
        let plan = Plan::parse(Path::new("p.toml"), MINIMAL, &env).unwrap();
        assert_eq!(
            plan.copy.index_build_sql(),
            "SET maintenance_work_mem = '512MB'; SET max_parallel_maintenance_workers = 4"
        );
        assert_eq!(plan.ddl_lock, (DEFAULT_DDL_LOCK_TIMEOUT, DEFAULT_DDL_ATTEMPTS));
        let knobs = "[copy]\nindex_build_memory = \"2GB\"\nindex_build_workers = 0\n\
                     [capture]\nddl_lock_timeout = \"250ms\"\nddl_attempts = 5\n";
        let plan = Plan::parse(Path::new("p.toml"), &format!("{MINIMAL}{knobs}"), &env).unwrap();
        assert_eq!(
            plan.copy.index_build_sql(),
            "SET maintenance_work_mem = '2GB'; SET max_parallel_maintenance_workers = 0"
        );
        assert_eq!(plan.ddl_lock, (Duration::from_millis(250), 5));
        let p = problems("[copy]\nindex_build_memory = \"1GB'; DROP TABLE x; --\"\nindex_build_workers = 99\n");
        assert!(
            p.iter().any(|(_, f, m)| f == "copy.index_build_memory" && m.contains("not an amount of memory")),
            "{p:?}"
        );
        assert!(p.iter().any(|(_, f, _)| f == "copy.index_build_workers"), "{p:?}");
        let p = problems("[capture]\nddl_lock_timeout = \"0s\"\nstall_timeout = \"soon\"\n");
        assert!(p.iter().any(|(_, f, m)| f == "capture.ddl_lock_timeout" && m == "must be more than 0"), "{p:?}");
        assert!(p.iter().any(|(_, f, m)| f == "capture.stall_timeout" && m.contains("not a duration")), "{p:?}");
        assert_eq!(plan.cutover.lock_timeout, DEFAULT_CUTOVER_LOCK_TIMEOUT);
        let plan =
            Plan::parse(Path::new("p.toml"), &format!("{MINIMAL}[cutover]\nlock_timeout = \"5s\"\n"), &env).unwrap();
        assert_eq!(plan.cutover.lock_timeout, Duration::from_secs(5));
        let p = problems(
            "[cutover]\nlock_timeout = \"0s\"\n[copy]\nmax_blue_active_sessions = -1\nmax_blue_replica_lag = \"x\"\n",
        );
        assert!(p.iter().any(|(_, f, m)| f == "cutover.lock_timeout" && m == "must be more than 0"), "{p:?}");
        assert!(p.iter().any(|(_, f, m)| f == "copy.max_blue_active_sessions" && m.contains("0 (no limit)")), "{p:?}");
        assert!(p.iter().any(|(_, f, _)| f == "copy.max_blue_replica_lag"), "{p:?}");
    }

    #[test]
    fn cutover_modes_and_hooks() {
        let admin =
            "[cutover.pgbouncer]\nadmin_url = \"postgres://pgbouncer@localhost:6432/pgbouncer\"\ndatabase = \"app\"\n";
        let handover = format!(
            "[cutover]\n{admin}mode = \"handover\"\nv2_database = \"app_v2\"\npause_timeout = \"3s\"\n\
             [[cutover.hook]]\nat = \"in_pause\"\nrun = \"true\"\ntimeout = \"1s\"\n\
             [[cutover.hook]]\nat = \"after_switch\"\nrun = \"echo done\"\n"
        );
        let plan = Plan::parse(Path::new("p.toml"), &format!("{MINIMAL}{handover}"), &env).unwrap();
        let pb = plan.cutover.pgbouncer.unwrap();
        assert!(matches!(
            pb.mode,
            SwitchMode::Handover { ref v2_database, v1_after_switch: V1AfterSwitch::Disable } if v2_database == "app_v2"
        ));
        assert_eq!(plan.cutover.hooks.len(), 2);
        assert_eq!(plan.cutover.hooks[1].timeout, DEFAULT_HOOK_TIMEOUT);

        // Each mode names what it lacks, with the line of `mode` (line 16 of the file).
        let p = problems(&format!("[cutover]\n{admin}mode = \"handover\"\n"));
        assert!(p.iter().any(|(l, f, _)| *l == 16 && f == "cutover.pgbouncer.v2_database"), "{p:?}");
        let p = problems(&format!("[cutover]\n{admin}databases_file = \"/x\"\n"));
        assert!(p.iter().any(|(_, f, m)| f == "cutover.pgbouncer.green_dsn" && m.contains("repoint")), "{p:?}");
        let p = problems(&format!("[cutover]\n{admin}mode = \"swap\"\n"));
        assert!(p.iter().any(|(_, f, m)| f == "cutover.pgbouncer.mode" && m.contains("swap")), "{p:?}");
        let p = problems(&format!(
            "[cutover]\n{admin}mode = \"handover\"\nv2_database = \"app_v2\"\ngreen_dsn = \"host=x\"\n"
        ));
        assert!(p.iter().any(|(_, f, m)| f == "cutover.pgbouncer.green_dsn" && m.contains("not used")), "{p:?}");

        // Hooks: an unknown point, an empty command, and in_pause hooks that cannot fit the pause.
        let p = problems("[cutover]\n[[cutover.hook]]\nat = \"during\"\nrun = \"x\"\n");
        assert!(p.iter().any(|(l, f, _)| *l == 14 && f == "cutover.hook[1].at"), "{p:?}");
        let p = problems("[cutover]\n[[cutover.hook]]\nat = \"in_pause\"\nrun = \" \"\ntimeout = \"1s\"\n");
        assert!(p.iter().any(|(_, f, _)| f == "cutover.hook[1].run"), "{p:?}");
        let p = problems(&format!(
            "[cutover]\n{admin}mode = \"handover\"\nv2_database = \"app_v2\"\n\
             [[cutover.hook]]\nat = \"in_pause\"\nrun = \"x\"\ntimeout = \"1500ms\"\n\
             [[cutover.hook]]\nat = \"in_pause\"\nrun = \"y\"\ntimeout = \"1s\"\n"
        ));
        assert!(p.iter().any(|(_, _, m)| m.contains("pause_timeout")), "{p:?}");
    }

    #[test]
    fn minimal_plan_gets_defaults() {
        let plan = Plan::parse(Path::new("p.toml"), MINIMAL, &env).unwrap();
        assert_eq!(plan.copy.chunk_rows, DEFAULT_CHUNK_ROWS);
        assert_eq!(plan.tables[0].target.to_string(), "public.a");
        assert_eq!(plan.capture, CaptureMethod::Auto);
    }

    #[test]
    fn unknown_key_names_line() {
        let text = MINIMAL.replace("key = [\"id\"]", "key = [\"id\"]\nfliter = \"x\"");
        let err = Plan::parse(Path::new("p.toml"), &text, &env).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("p.toml:10:1") && msg.contains("fliter"), "{msg}");
    }

    #[test]
    fn missing_env_var_is_named() {
        let text = MINIMAL.replace("GREEN_URL", "NOPE_URL");
        let msg = Plan::parse(Path::new("p.toml"), &text, &env).unwrap_err().to_string();
        assert!(msg.contains("NOPE_URL") && msg.contains("green.url") && msg.contains(":6"), "{msg}");
    }

    #[test]
    fn bad_values_all_reported() {
        let text = MINIMAL.replace("t1", "Bad Name") + "[copy]\nworkers = 0\n";
        let msg = Plan::parse(Path::new("p.toml"), &text, &env).unwrap_err().to_string();
        assert!(msg.contains("name") && msg.contains("copy.workers"), "{msg}");
        assert!(!msg.contains("topsecret"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("2 parsecs").is_err());
        assert!(parse_duration("99999999999999999999999999999999m").is_err());
    }

    /// A small deterministic generator (xorshift64*), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    const TOKENS: &[&str] = &[
        "\"",
        "'",
        "[",
        "]",
        "[[table]]",
        "{",
        "}",
        "=",
        ",",
        "\n",
        "#",
        "${",
        "${NOPE}",
        "${BLUE_URL}",
        "}",
        "0",
        "-1",
        "1e400",
        "99999999999999999999999",
        "true",
        "\"\"",
        "é",
        "東京",
        "\u{0}",
        "\\",
        "\"\"\"",
        "key = []",
        "columns = 5",
        "[table.columns]",
        "[cutover.pgbouncer]",
        "pause_timeout = \"1e9m\"",
        "workers = 0",
        "name = \"\"",
        "source = \"a.b.c\"",
        "target = \"\\\"x\"",
        "filter = \"\"",
        "url = \"postgres://u:pw@\"",
    ];

    /// Mutates the reference plan at random (deletions, insertions of syntax and odd values,
    /// duplicated and swapped lines): parsing never panics, and every error says where (file and
    /// line) and what.
    #[test]
    fn fuzzed_plans_never_panic_and_errors_say_where() {
        let base = include_str!("../../plans/reference.toml");
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let env = |k: &str| match k {
            "BLUE_HOST" => Some("localhost".to_string()),
            "NOPE" => None,
            _ => Some("postgres://u:topsecret@localhost/db".to_string()),
        };
        assert!(Plan::parse(Path::new("fuzz.toml"), base, &env).is_ok());
        let mut errors = 0;
        for case in 0..4000 {
            let mut lines: Vec<String> = base.lines().map(str::to_string).collect();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(lines.len());
                match rng.below(6) {
                    0 => {
                        lines.remove(i);
                    }
                    1 => {
                        let l = lines[i].clone();
                        lines.insert(rng.below(lines.len()), l);
                    }
                    2 => {
                        let j = rng.below(lines.len());
                        lines.swap(i, j);
                    }
                    3 => {
                        let chars: Vec<char> = lines[i].chars().collect();
                        let at = rng.below(chars.len() + 1);
                        let token = TOKENS[rng.below(TOKENS.len())];
                        lines[i] =
                            chars[..at].iter().collect::<String>() + token + &chars[at..].iter().collect::<String>();
                    }
                    4 => {
                        let chars: Vec<char> = lines[i].chars().collect();
                        let at = rng.below(chars.len() + 1);
                        let end = (at + rng.below(8)).min(chars.len());
                        lines[i] = chars[..at].iter().chain(&chars[end..]).collect();
                    }
                    _ => {
                        if let Some((k, _)) = lines[i].clone().split_once('=') {
                            lines[i] = format!("{k}= {}", TOKENS[rng.below(TOKENS.len())]);
                        }
                    }
                }
            }
            let text = lines.join("\n");
            let parsed = std::panic::catch_unwind(|| Plan::parse(Path::new("fuzz.toml"), &text, &env));
            let Ok(result) = parsed else { panic!("case {case}: parse panicked on:\n{text}") };
            if let Err(e) = result {
                errors += 1;
                let msg = e.to_string();
                let line = msg
                    .strip_prefix("fuzz.toml:")
                    .and_then(|r| r.split(':').next())
                    .and_then(|n| n.parse::<usize>().ok());
                assert!(line.is_some(), "case {case}: error without file and line: {msg}\n{text}");
                assert!(msg.len() > "fuzz.toml:1:".len() + 5, "case {case}: error says nothing: {msg}");
                assert!(!msg.contains("topsecret"), "case {case}: error shows a password: {msg}");
            }
        }
        assert!(errors > 1000, "mutations rarely broke the plan ({errors} errors): the fuzzer is not biting");
        assert!(errors < 3900, "almost every case failed ({errors}): the fuzzer only tests one error");
    }
}
