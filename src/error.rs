//! The library's error type. Each variant carries what an operator needs to act; exit codes are
//! decided here, in one place.

use std::{fmt, path::PathBuf, time::Duration};

/// Which database a connection belongs to; every connection error names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The live database with the old schema.
    Blue,
    /// The new database with the new schema.
    Green,
    /// The PgBouncer admin console.
    Pgbouncer,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Blue => "blue",
            Side::Green => "green",
            Side::Pgbouncer => "pgbouncer",
        })
    }
}

/// Why a connection string could not be used. Never carries the string itself.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The string did not parse; the message names the offending parameter, never its value.
    #[error("{side}: invalid connection string: {reason}")]
    Invalid {
        /// Side whose string is broken.
        side: Side,
        /// What is wrong.
        reason: String,
    },
    /// TCP, TLS or authentication failed.
    #[error("{side} ({target}): cannot connect: {}", pg_message(source))]
    Connect {
        /// Side that could not be reached.
        side: Side,
        /// Redacted connection target.
        target: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Nothing answered within the timeout.
    #[error("{side} ({target}): no answer within {waited:?}")]
    Timeout {
        /// Side that did not answer.
        side: Side,
        /// Redacted connection target.
        target: String,
        /// How long we waited.
        waited: Duration,
    },
    /// TLS could not be set up locally (bad root certificate file, …).
    #[error("{side}: TLS setup failed: {reason}")]
    Tls {
        /// Side being connected.
        side: Side,
        /// What failed.
        reason: String,
    },
}

/// A file-level problem in a plan: where, which key, what is wrong.
#[derive(Debug, Clone)]
pub struct PlanProblem {
    /// 1-based line in the plan file.
    pub line: usize,
    /// Key path such as `table[2].columns.scopes`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Everything that can stop a command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The plan file could not be read.
    #[error("{}: cannot read plan: {source}", path.display())]
    PlanRead {
        /// Plan path.
        path: PathBuf,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax or shape error.
    #[error("{}:{line}:{column}: {message}", path.display())]
    PlanParse {
        /// Plan path.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// The plan parsed but has values that cannot work.
    #[error("{}", render_problems(path, problems))]
    PlanInvalid {
        /// Plan path.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<PlanProblem>,
    },
    /// A database could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnError),
    /// A query failed; `context` says which step and which side.
    #[error("{context}: {}", pg_message(source))]
    Db {
        /// What we were doing, naming side and table.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The resolved plan has problems (only `plan` reports these with exit 1; other commands
    /// refuse to run).
    #[error("the plan has {count} problem(s); run `migrate plan` to see them")]
    Unresolved {
        /// How many.
        count: usize,
    },
    /// Another `migrate` process holds this plan's lock.
    #[error("another `migrate {command}` of plan `{plan}` is running (advisory lock held on green)")]
    Busy {
        /// Plan name.
        plan: String,
        /// The command that could not take the lock.
        command: String,
    },
    /// A joined worker's lease expired: the leader ended its sessions.
    #[error(
        "this joined worker ({worker}) wrote no heartbeat to green for longer than `[copy] worker_lease` ({lease:?}): \
         the leader ends its sessions on green and blue, and what it held and had not committed (a copy chunk, a \
         verify part) goes to other workers; start it again where green answers"
    )]
    LeaseExpired {
        /// Its id.
        worker: String,
        /// The plan's lease.
        lease: std::time::Duration,
    },
    /// A copy chunk failed.
    #[error("{table} chunk {chunk}: {message}")]
    ChunkFailed {
        /// Target table.
        table: String,
        /// Chunk number.
        chunk: i64,
        /// What failed.
        message: String,
    },
    /// A server stopped answering on an open connection.
    #[error("{what}: no answer within {waited:?}; the connection is treated as lost")]
    Stalled {
        /// What was waiting.
        what: String,
        /// How long.
        waited: std::time::Duration,
    },
    /// The plan changed for an entry whose copy already began: its rows on green were made by
    /// the old definition.
    #[error(
        "{}:{line}: {entry} changed since `copy` began (its copy is {state}): {}; restore the entry as it was, \
         or start over for it (`migrate cleanup`, empty its green table, `migrate copy`)",
        path.display(),
        changes.join("; ")
    )]
    PlanChanged {
        /// Plan path.
        path: PathBuf,
        /// Line of the entry.
        line: usize,
        /// The entry, e.g. `table[2] (public.a -> public.b)`.
        entry: String,
        /// Its recorded copy state.
        state: String,
        /// What changed, one item per difference.
        changes: Vec<String>,
    },
    /// State on green was written by a `migrate` with another layout.
    #[error(
        "green: state schema {schema} was written by an older migrate (layout {found}; this one reads {wanted}): \
         finish this migration with the version that began it, or start over with `migrate cleanup`"
    )]
    StateLayout {
        /// The state schema.
        schema: String,
        /// Layout found.
        found: i32,
        /// Layout this build reads.
        wanted: i32,
    },
    /// A value stored in state does not decode.
    #[error("green: stored {what} does not decode ({reason}): {value}")]
    StateDecode {
        /// What the value is.
        what: String,
        /// The value as stored.
        value: String,
        /// Why it does not decode.
        reason: String,
    },
    /// A phase change the migration's story does not allow.
    #[error("green: the migration is {from}; it cannot become {to} from there")]
    PhaseTransition {
        /// Stored phase.
        from: String,
        /// Phase refused.
        to: String,
    },
    /// `--table` or `--recopy` names no entry of the plan.
    #[error("{flag} {name}: no such table in the plan (give a source or target name)")]
    NoSuchTable {
        /// The option, e.g. `--table`.
        flag: &'static str,
        /// The name given.
        name: String,
    },
    /// A spawned task panicked (a bug): the command stops.
    #[error("{task} panicked: {message}")]
    TaskPanicked {
        /// Which task.
        task: &'static str,
        /// The panic.
        message: String,
    },
    /// SIGINT/SIGTERM arrived where stopping means giving up the step.
    #[error("interrupted {during}")]
    Interrupted {
        /// What was going on, e.g. `while pausing`.
        during: String,
    },
    /// A planned table was truncated on blue: a TRUNCATE is no row change, so green would keep
    /// the rows.
    #[error(
        "TRUNCATE of {} on blue: following stopped so green does not drift; \
         start the migration over (`migrate cleanup`, empty the green tables, `migrate copy`)",
        if tables.is_empty() { "a planned table".to_string() } else { tables.join(", ") }
    )]
    Truncated {
        /// Source tables truncated (empty when unknown).
        tables: Vec<String>,
    },
    /// Blue's table no longer has the columns the plan was resolved against.
    #[error(
        "schema of blue {table} changed while following (columns were [{}], are now [{}]); \
         following stopped so green does not drift: update the plan and start over",
        was.join(", "),
        now.join(", ")
    )]
    SchemaChanged {
        /// Source table.
        table: String,
        /// Columns when resolved.
        was: Vec<String>,
        /// Columns now.
        now: Vec<String>,
    },
    /// Green has no state of this plan yet.
    #[error("green has no state of plan `{plan}`: run `migrate copy` first")]
    NoState {
        /// Plan name.
        plan: String,
    },
    /// A command was given an argument it cannot use.
    #[error("{0}")]
    Usage(String),
    /// Blue has no capture of this plan.
    #[error("blue has no capture of plan `{plan}` (no slot, no change table): run `migrate copy` first")]
    NoCapture {
        /// Plan name.
        plan: String,
    },
    /// A checksum a server sent could not be read (verify).
    #[error("{side}: checksum of {table} does not decode: {value}")]
    Checksum {
        /// `blue` or `green`.
        side: &'static str,
        /// The table summed.
        table: String,
        /// What the server sent.
        value: String,
    },
    /// What blue sent could not be decoded.
    #[error("blue: {what}: {message}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// Why it failed.
        message: String,
    },
    /// DDL on blue never got its table lock.
    #[error(
        "blue: creating {what}: table lock not granted in {attempts} attempts; a long-running transaction holds it"
    )]
    LockNotGranted {
        /// The DDL.
        what: String,
        /// Attempts made.
        attempts: u32,
    },
    /// Our replication slot is held by a session.
    #[error("replication slot {slot} is in use by process {pid} on blue")]
    SlotInUse {
        /// Slot name.
        slot: String,
        /// The backend holding it.
        pid: i32,
    },
    /// Decoded transactions stayed invisible to new snapshots on blue.
    #[error("blue: transactions decoded from the slot stayed invisible for {waited:?} (snapshot {snapshot})")]
    NotVisible {
        /// How long we waited.
        waited: Duration,
        /// Blue's last snapshot.
        snapshot: String,
    },
    /// A blue table has no heap of its own to split into block ranges.
    #[error("blue {table} has no heap of its own (partitioned?)")]
    NoHeap {
        /// Source table.
        table: String,
    },
    /// A planned table was rewritten on blue (VACUUM FULL, CLUSTER, ALTER TABLE) after a copy
    /// run planned its chunks, in every run; each next run copies it again.
    #[error(
        "blue {table} was rewritten (VACUUM FULL, CLUSTER, ALTER TABLE) while the copy ran, run after run; \
         rerun `migrate copy` once that stops: it copies the table again"
    )]
    TableRewritten {
        /// Source table.
        table: String,
    },
    /// A planned table changed on blue behind capture's back; following stops.
    #[error("{what}; following stopped so green does not drift: resume with `migrate copy PLAN --recopy {table}` (after updating the plan if its columns changed), or start over")]
    Drift {
        /// The entry.
        table: String,
        /// What happened.
        what: String,
    },
    /// A migration stopped for drift is not resumed until the operator says how.
    #[error("following stopped because tables changed on blue: {}; rerun with `--recopy TABLE` for each (after updating the plan if its columns changed), or start over", tables.join("; "))]
    Drifted {
        /// Each entry with what happened.
        tables: Vec<String>,
    },
    /// Following ended while the copy still needed it.
    #[error("following stopped during the copy: {how}")]
    FollowerStopped {
        /// How it stopped.
        how: String,
    },
    /// Something this machine needs is not installed (demo, sandbox).
    #[error("not installed: {missing}; install with: apt-get install -y {packages} (or run scripts/demo, which does)")]
    NotInstalled {
        /// What is missing.
        missing: String,
        /// The Debian packages that bring it.
        packages: String,
    },
    /// A throwaway server (demo, tests) could not be set up.
    #[error("{what}: {detail}")]
    Sandbox {
        /// What was being done.
        what: String,
        /// What went wrong.
        detail: String,
    },
    /// A file could not be read or written.
    #[error("{}: {what}: {source}", path.display())]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A command on PgBouncer's admin console failed.
    #[error("pgbouncer: `{command}` failed: {message}{}", if *by_hand { "; run it by hand on the admin console" } else { "" })]
    Pgbouncer {
        /// The command.
        command: String,
        /// The error.
        message: String,
        /// Whether the operator must run it by hand now.
        by_hand: bool,
    },
    /// PAUSE did not complete within its budget.
    #[error(
        "PAUSE {database} did not complete within {waited:?}: a transaction kept one of its server connections busy"
    )]
    PauseTimedOut {
        /// PgBouncer database.
        database: String,
        /// The budget.
        waited: Duration,
    },
    /// The work in the pause (drain, final check, sequences, in_pause hooks) overran.
    #[error(
        "the work in the pause did not finish within pause_timeout ({waited:?}); traffic was resumed on blue: \
         raise pause_timeout, or cut over when blue takes fewer writes"
    )]
    PauseBudget {
        /// The budget.
        waited: Duration,
    },
    /// Catch-up rounds before the pause did not get shorter: blue is written faster than apply.
    #[error(
        "green is not catching up with blue: catch-up rounds took {} ms, each holding the writes of the one before; \
         blue takes writes faster than apply keeps up, so the drain would not fit the pause. Nothing was paused; \
         cut over when blue takes fewer writes (docs/performance.md has the rates measured)",
        rounds_ms.iter().map(|m| format!("{m:.0}")).collect::<Vec<_>>().join(", ")
    )]
    NotConverging {
        /// Each round's milliseconds.
        rounds_ms: Vec<f64>,
    },
    /// Green did not catch up within the cutover's budget.
    #[error("{what}: green did not catch up with blue in time")]
    CatchUpTimedOut {
        /// The step.
        what: String,
    },
    /// A cutover stopped half-way and this run's plan has no `[cutover.pgbouncer]` to finish or
    /// undo it with.
    #[error(
        "a cutover stopped half-way (at step {step}), and this plan has no [cutover.pgbouncer] section to \
         recover it with: PgBouncer may still hold the application paused. Run `migrate cutover` with the \
         plan the cutover ran with (it recovers first), or RESUME the entry on PgBouncer's console by hand"
    )]
    CutoverUnrecoverable {
        /// The step recorded.
        step: String,
    },
    /// Rows still differ after the drain.
    #[error("{count} row(s) differ between blue and green after the drain, e.g. {}; run `migrate verify` for details", shown.join(", "))]
    DrainDiffers {
        /// How many keys differ.
        count: usize,
        /// The first few, described.
        shown: Vec<String>,
    },
    /// Green's foreign keys between planned tables would not hold after the switch.
    #[error("green's foreign keys would not hold after the switch: {}; run `migrate verify`", shown.join("; "))]
    OrphanRows {
        /// Each broken foreign key with a few of its rows.
        shown: Vec<String>,
    },
    /// A failure once traffic moved to green (after RELOAD, or after the v2 entry resumed).
    #[error("traffic is on green already, but: {source}; {advice}")]
    AfterSwitch {
        /// What the operator should check or run.
        advice: String,
        /// What failed.
        source: Box<Error>,
    },
    /// A `[[cutover.hook]]` failed or ran out of time.
    #[error("{at} hook `{run}` failed: {why}{}", if output.is_empty() { String::new() } else { format!(" ({output})") })]
    HookFailed {
        /// Its point.
        at: &'static str,
        /// The command.
        run: String,
        /// Exit code, or why it was killed.
        why: String,
        /// The last line it printed.
        output: String,
    },
    /// The cutover failed and so did its roll back.
    #[error(
        "cutover failed: {error}; rolling back failed too: {rollback}; check that PgBouncer database `{database}` \
         is resumed and points at blue"
    )]
    RollbackFailed {
        /// PgBouncer database.
        database: String,
        /// Why the cutover failed.
        error: Box<Error>,
        /// Why the roll back failed.
        rollback: Box<Error>,
    },
    /// `cleanup` could not restore indexes or constraints an unfinished copy dropped.
    #[error(
        "cleanup refused: an unfinished copy left these off green and they could not be restored:\n  {}\n\
         fix what blocks them (or run `migrate copy` to finish), then `migrate cleanup` again; \
         `--force` removes the state anyway and leaves them missing",
        objects.join("\n  ")
    )]
    CleanupRefused {
        /// Each object, why it failed and the statement that restores it.
        objects: Vec<String>,
    },
    /// `cleanup` found a `copy` running.
    #[error("{source}; stop it first, or pass --force to remove its objects anyway")]
    CopyRunning {
        /// The lock refusal.
        source: Box<Error>,
    },
    /// A state the code should never reach (a bug); says where.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The demo's own checks failed.
    #[error("demo: {0}")]
    Demo(String),
    /// A rehearsal could not run (its servers, schemas or data).
    #[error("rehearsal: {0}")]
    Rehearsal(String),
}

impl Error {
    /// The process exit code for this error: 2 for plan and usage errors, 3 for runtime failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::PlanRead { .. }
            | Error::PlanParse { .. }
            | Error::PlanInvalid { .. }
            | Error::Unresolved { .. }
            | Error::PlanChanged { .. }
            | Error::NoSuchTable { .. }
            | Error::NoState { .. }
            | Error::Usage(_)
            | Error::Drifted { .. } => 2,
            _ => 3,
        }
    }

    /// Wraps a driver error with what we were doing.
    pub fn db(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
        let context = context.into();
        move |source| Error::Db { context, source }
    }
}

/// The server's own message (with detail and hint) when there is one, else the driver's.
pub fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut m = db.message().to_string();
            if let Some(d) = db.detail() {
                m.push_str(&format!(" ({d})"));
            }
            if let Some(h) = db.hint() {
                m.push_str(&format!("; hint: {h}"));
            }
            m
        }
        None => {
            let mut m = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                m.push_str(&format!(": {s}"));
                src = s.source();
            }
            m
        }
    }
}

fn render_problems(path: &std::path::Path, problems: &[PlanProblem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("{}:{}: {}: {}", path.display(), p.line, p.field, p.message));
    }
    out
}

/// Result with the library error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
