//! The `migrate` binary: argument parsing, logging, signals, exit codes. All logic is in the
//! library.

use std::{io::IsTerminal, path::PathBuf, process::ExitCode};

use bluegreen::{shutdown::Shutdown, Command, Format, Outcome};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

/// Zero-downtime PostgreSQL blue/green migrations with schema transforms.
#[derive(Parser)]
#[command(name = "migrate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Log format on stderr: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// More log lines on stderr: -v for progress (info), -vv for every step (debug). Without it,
    /// logs are warnings only in front of a terminal (and for `demo`), info when stderr goes to
    /// a file or pipe. MIGRATE_LOG (e.g. `MIGRATE_LOG=debug`) overrides both.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

impl From<OutputFormat> for Format {
    fn from(f: OutputFormat) -> Self {
        match f {
            OutputFormat::Text => Format::Text,
            OutputFormat::Json => Format::Json,
        }
    }
}

#[derive(Args)]
struct PlanArg {
    /// The migration plan (TOML). `${VAR}` in it is read from the environment.
    plan: PathBuf,
}

#[derive(Args)]
struct FormatArg {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    format: OutputFormat,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start here: runs a whole migration on this machine (blue, green and a PgBouncer in temporary
    /// directories, the OAuth fixture, a steady writer through PgBouncer): plan, copy, verify,
    /// cutover; prints what the application saw, then removes everything. Needs only the
    /// PostgreSQL server binaries and pgbouncer installed.
    Demo {
        /// Access tokens generated on blue.
        #[arg(long, default_value_t = 50_000)]
        rows: u32,
        /// Application writes per second through PgBouncer.
        #[arg(long, default_value_t = 300)]
        rate: u32,
        /// Show the way back too: after the cutover the application writes on green, `migrate
        /// rollback` switches back with nothing lost, and a second cutover switches again (the
        /// plan is reduced to the tables whose way back is exact).
        #[arg(long)]
        rollback: bool,
    },
    /// Dry run: check the plan against both databases and print the resolved mapping and steps.
    /// Exit 0 sound, 1 problems found, 2 the plan cannot be read.
    Plan {
        #[command(flatten)]
        plan: PlanArg,
        #[command(flatten)]
        format: FormatArg,
        /// Check the file only; do not connect to any database.
        #[arg(long)]
        offline: bool,
        /// Also show N rows of each table as green would receive them (transformed from a
        /// sample of blue's rows), to see what the expressions make of real data. Shows
        /// blue's data: mind where the output goes.
        #[arg(long, value_name = "N", default_value_t = 0)]
        rows: usize,
    },
    /// Copy every table to green, then keep green in step until Ctrl-C or a finished cutover.
    /// Safe to rerun: resumes where a killed run stopped.
    Copy {
        #[command(flatten)]
        plan: PlanArg,
        /// Exit once the copy is done and green has applied everything blue committed by then.
        #[arg(long)]
        no_follow: bool,
        /// Empty this table on green and copy it again (source or target name; repeatable). The
        /// way to resume after following stopped because the table changed on blue (renamed,
        /// rewritten, columns changed): update the plan first if its columns changed.
        #[arg(long, value_name = "TABLE")]
        recopy: Vec<String>,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9187): rows copied,
        /// chunks, capture lag, pending keys, apply rate, last verify, cutover timings, control.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Join the `migrate copy` of this plan running elsewhere as a worker: claim and copy
        /// chunks beside it (`[copy] workers` of them at a time) until none is left and its copy
        /// is over, then exit.
        /// Run it on other machines to spread a big copy; a joined worker that dies loses only
        /// its chunks in hand, which the others redo.
        #[arg(long, conflicts_with_all = ["no_follow", "recopy", "metrics"])]
        join: bool,
    },
    /// Checksum every table on both sides, bucket by bucket, and name each differing key and
    /// column. Safe beside a following `copy`. Exit 0 equal, 1 differences.
    Verify {
        #[command(flatten)]
        plan: PlanArg,
        #[command(flatten)]
        format: FormatArg,
        /// Verify only this table (source or target name, e.g. public.oauth2_clients).
        #[arg(long)]
        table: Option<String>,
        /// Check the way back instead: that blue's rows come back from green's form through the
        /// reverse mapping (reverse(forward(row)) = row on every carried column). Reads blue only.
        #[arg(long)]
        reverse: bool,
        /// Check only the keys applied since each table's last clean verify (seconds, not a
        /// full scan; tables never verified clean are checked whole). Catches what apply got
        /// wrong, not rows changed on green by anything else: run a full verify for that.
        #[arg(long, conflicts_with = "reverse")]
        changed: bool,
        /// Join the `migrate verify` of this plan running elsewhere (it needs the migration's
        /// state on green): read parts of its tables beside it until none is left, then exit.
        /// Run it on other machines to spread a long verify; a joined worker that dies loses
        /// only its parts in hand, which the others read again. Waits for a verify to start.
        #[arg(long, conflicts_with_all = ["reverse", "changed", "table", "format"])]
        join: bool,
    },
    /// Switch traffic to green through PgBouncer: preflight, PAUSE, drain, final check,
    /// sequences, repoint, RELOAD, RESUME. Exit 0 switched, 1 aborted safely (traffic stays on
    /// blue, following continues), 3 failed.
    Cutover {
        #[command(flatten)]
        plan: PlanArg,
        /// Run the preflight checks only; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Switch traffic back to blue after a cutover with `[cutover] way_back = true`: carry
    /// green's writes to blue, PAUSE, drain, check every key written back, blue's sequences,
    /// write blue's line back, RELOAD, RESUME; following blue resumes. Exit 0 rolled back, 1
    /// aborted safely (traffic stays on green, the way back stays open), 3 failed.
    Rollback {
        #[command(flatten)]
        plan: PlanArg,
        /// Run the preflight checks only; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// End the way back once you will not roll back: remove capture from green (triggers,
    /// change table) and from blue (slot or triggers); the running `copy` exits.
    Finish {
        #[command(flatten)]
        plan: PlanArg,
    },
    /// Remove everything migrate made on blue (slot, publication, triggers, its schema) and its
    /// state on green. Refuses while a `copy` of this plan runs, unless --force.
    Cleanup {
        #[command(flatten)]
        plan: PlanArg,
        /// Remove even while a `copy` of this plan holds the plan lock.
        #[arg(long)]
        force: bool,
    },
    /// Phase, per-table progress and capture lag, read from the state on green. Safe beside `copy`.
    Status {
        #[command(flatten)]
        plan: PlanArg,
        #[command(flatten)]
        format: FormatArg,
        /// Print it again every SECONDS (in place on a terminal) until Ctrl-C.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
    },
    /// Steer a running migration, from any machine that reaches green: pause and resume the copy
    /// and the follower, throttle the copy, postpone a cutover. Stored on green; a running
    /// `copy` or `cutover` follows it within a second.
    Control {
        #[command(flatten)]
        plan: PlanArg,
        #[command(subcommand)]
        action: ControlAction,
    },
    /// Prove a plan end to end with no database to provision (for CI): starts throwaway blue,
    /// green and PgBouncer, loads the schemas and data (or generated rows), points the plan at
    /// them, then runs plan, copy under a steady writer through PgBouncer, verify and cutover.
    /// Exit 0 all passed, 1 a step found a problem, 2 usage, 3 the rehearsal could not run.
    Rehearse {
        #[command(flatten)]
        plan: PlanArg,
        /// Blue's schema: plain SQL or `pg_dump --schema-only` output.
        #[arg(long, value_name = "FILE")]
        blue_schema: PathBuf,
        /// Green's schema.
        #[arg(long, value_name = "FILE")]
        green_schema: PathBuf,
        /// Blue's data (SQL); without it, generated rows (see --rows).
        #[arg(long, value_name = "FILE")]
        blue_data: Option<PathBuf>,
        /// Rows generated per table (and per table they reference).
        #[arg(long, default_value_t = 10_000)]
        rows: u64,
        /// Writer statements per second through PgBouncer while copying and following.
        #[arg(long, default_value_t = 200)]
        writer_rate: u32,
        /// Also write a JUnit XML report here (one test case per step and per table).
        #[arg(long, value_name = "FILE.xml")]
        report: Option<PathBuf>,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Print a shell completion script, e.g. `migrate completions bash >
    /// /etc/bash_completion.d/migrate`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `migrate man > /usr/local/share/man/man1/migrate.1`.
    Man,
}

/// What `migrate control` does.
#[derive(Subcommand)]
enum ControlAction {
    /// Copy workers stop before their next chunk, the follower before its next round (blue
    /// keeps the changes meanwhile).
    Pause,
    /// Undo `pause`.
    Resume,
    /// Copy at most ROWS_PER_SECOND rows per second (in place of `[copy] max_rows_per_second`).
    Throttle {
        /// The rate.
        rows_per_second: u64,
    },
    /// Back to the plan's rate.
    Unthrottle,
    /// `cutover` waits before it starts (a cutover already waiting goes on waiting) until
    /// `unpostpone`.
    Postpone,
    /// Undo `postpone`.
    Unpostpone,
    /// Print what is set.
    Show,
}

impl From<ControlAction> for bluegreen::ControlAction {
    fn from(a: ControlAction) -> Self {
        use bluegreen::ControlAction as C;
        match a {
            ControlAction::Pause => C::Pause,
            ControlAction::Resume => C::Resume,
            ControlAction::Throttle { rows_per_second } => C::Throttle(rows_per_second),
            ControlAction::Unthrottle => C::Unthrottle,
            ControlAction::Postpone => C::Postpone,
            ControlAction::Unpostpone => C::Unpostpone,
            ControlAction::Show => C::Show,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "migrate", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Cmd::Man => {
            return match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: writing the man page: {e}");
                    ExitCode::from(3)
                }
            };
        }
        _ => {}
    }
    let quiet = matches!(cli.command, Cmd::Demo { .. }) || std::io::stderr().is_terminal();
    init_tracing(cli.log_format, cli.verbose, quiet);
    let json = matches!(cli.log_format, LogFormat::Json);
    if let Cmd::Demo { rows, rate, rollback } = cli.command {
        return block_on(json, |shutdown| async move {
            bluegreen::demo::run_with(rows, rate, rollback, shutdown).await.map(|(outcome, _)| outcome)
        });
    }
    // A rehearsal points the plan at servers of its own (its connection variables need not be
    // set) and runs `copy` inside: not dispatched like the commands it runs.
    if let Cmd::Rehearse { plan, blue_schema, green_schema, blue_data, rows, writer_rate, report, format } = cli.command
    {
        let r = bluegreen::commands::Rehearsal {
            blue_schema,
            green_schema,
            blue_data,
            rows,
            writer_rate,
            report,
            format: format.format.into(),
        };
        return block_on(
            json,
            |shutdown| async move { bluegreen::commands::rehearse::run(&plan.plan, &r, shutdown).await },
        );
    }
    let (path, command) = match cli.command {
        Cmd::Demo { .. } | Cmd::Completions { .. } | Cmd::Man | Cmd::Rehearse { .. } => unreachable!("handled above"),
        Cmd::Plan { plan, format, offline, rows } => {
            (plan.plan, Command::Plan { format: format.format.into(), offline, rows })
        }
        Cmd::Copy { plan, join: true, .. } => (plan.plan, Command::Join),
        Cmd::Copy { plan, no_follow, recopy, metrics, join: false } => {
            (plan.plan, Command::Copy { no_follow, recopy, metrics })
        }
        Cmd::Verify { plan, join: true, .. } => (plan.plan, Command::VerifyJoin),
        Cmd::Verify { plan, format, table, reverse, changed, join: false } => {
            (plan.plan, Command::Verify { format: format.format.into(), table, reverse, changed })
        }
        Cmd::Cutover { plan, dry_run } => (plan.plan, Command::Cutover { dry_run }),
        Cmd::Rollback { plan, dry_run } => (plan.plan, Command::Rollback { dry_run }),
        Cmd::Finish { plan } => (plan.plan, Command::Finish),
        Cmd::Cleanup { plan, force } => (plan.plan, Command::Cleanup { force }),
        Cmd::Status { plan, format, watch } => (plan.plan, Command::Status { format: format.format.into(), watch }),
        Cmd::Control { plan, action } => (plan.plan, Command::Control { action: action.into() }),
    };
    block_on(json, |shutdown| async move { bluegreen::run(&path, command, shutdown).await })
}

/// Runs one command on a fresh runtime with signal handling and maps its result to an exit code.
/// With JSON logs the final error is a JSON log line too, so the log stays JSON to its end.
fn block_on<F, Fut>(json: bool, f: F) -> ExitCode
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: std::future::Future<Output = bluegreen::Result<Outcome>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let result = runtime.block_on(async {
        let result = f(Shutdown::on_signals()).await;
        // A session given up on the way out may still run a statement on a server.
        bluegreen::pg::cancels_sent(std::time::Duration::from_secs(3)).await;
        result
    });
    match result {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::Problems) => ExitCode::from(1),
        Err(e) if json => {
            tracing::error!(exit_code = e.exit_code(), error = %e, "migrate failed");
            ExitCode::from(e.exit_code())
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs go to stderr, never stdout (the report). `quiet` (a person watching, or the demo, whose
/// report is the point) defaults to warnings only; a log file or pipe gets info. No ANSI colour
/// unless stderr is a terminal and NO_COLOR is unset.
fn init_tracing(format: LogFormat, verbose: u8, quiet: bool) {
    let default = match verbose {
        0 if quiet => "warn",
        0 | 1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MIGRATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(bluegreen::output::LogWriter)
        .with_ansi(bluegreen::output::stderr_colour());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
