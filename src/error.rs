//! The library's error type. Each variant carries what an operator needs to act; exit codes are
//! decided here, in one place.

use std::path::PathBuf;

use crate::pg::ConnError;

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
    /// Any other runtime failure with its context.
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    /// The process exit code for this error: 2 for plan and usage errors, 3 for runtime failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::PlanRead { .. } | Error::PlanParse { .. } | Error::PlanInvalid { .. } | Error::Unresolved { .. } => {
                2
            }
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
