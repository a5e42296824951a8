//! `[[cutover.hook]]`: shell commands run at named points of the cutover (flip a load balancer,
//! scale the v1 deployment to zero). Each runs with `sh -c` in its own process group, with
//! variables describing the migration in its environment (never a password), and is killed with
//! its whole group once its time (or what is left of the pause) is up. Its output is kept for the
//! cutover record.

use std::{
    os::unix::process::CommandExt as _,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::io::AsyncReadExt;
use tracing::{info, warn};

use crate::{
    error::{Error, Result},
    plan::{Hook, HookPoint},
    shutdown::Shutdown,
    state::HookRecord,
};

/// A hook in the pause is killed this long before the pause budget ends.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);
/// Output kept per hook (the end of it).
const OUTPUT_KEPT: usize = 4096;

/// The environment every hook of one cutover gets, besides its point and time budget.
pub(super) type HookEnv = Vec<(&'static str, String)>;

/// The variables every hook of one switch gets (`direction`: `cutover` or `rollback`).
pub(super) fn env(plan: &crate::plan::Plan, pb: &crate::plan::PgbouncerSettings, direction: &str) -> HookEnv {
    let mut env: HookEnv = vec![
        ("MIGRATE_PLAN", plan.name.clone()),
        ("MIGRATE_DIRECTION", direction.to_string()),
        ("MIGRATE_MODE", pb.mode.name().to_string()),
        ("MIGRATE_DATABASE", pb.database.clone()),
        ("MIGRATE_BLUE", plan.blue.to_string()),
        ("MIGRATE_GREEN", plan.green.to_string()),
        ("MIGRATE_PAUSE_TIMEOUT_MS", pb.pause_timeout.as_millis().to_string()),
    ];
    if let crate::plan::SwitchMode::Handover { v2_database, .. } = &pb.mode {
        env.push(("MIGRATE_V2_DATABASE", v2_database.clone()));
    }
    env
}

/// The hooks at `at` with `MIGRATE_OUTCOME` set for the end points (`done`: what a finished
/// switch is called); `None` when there is none at `at`.
pub(super) async fn run_point(
    hooks: &[Hook],
    at: HookPoint,
    env: &HookEnv,
    done: &str,
    deadline: Option<Instant>,
    shutdown: &Shutdown,
    records: &mut Vec<HookRecord>,
) -> Option<Result<()>> {
    if !hooks.iter().any(|h| h.at == at) {
        return None;
    }
    let mut env = env.clone();
    match at {
        HookPoint::AfterSwitch => env.push(("MIGRATE_OUTCOME", done.to_string())),
        HookPoint::OnAbort => env.push(("MIGRATE_OUTCOME", "aborted".into())),
        _ => {}
    }
    Some(run(hooks, at, &env, deadline, shutdown, records).await)
}

/// Runs the hooks at `at`, in plan order, each within its timeout and before `deadline`. Stops
/// at the first failure and returns it; every run is appended to `records`.
pub(super) async fn run(
    hooks: &[Hook],
    at: HookPoint,
    env: &HookEnv,
    deadline: Option<Instant>,
    shutdown: &Shutdown,
    records: &mut Vec<HookRecord>,
) -> Result<()> {
    for hook in hooks.iter().filter(|h| h.at == at) {
        // Inside the pause the hook must be killed (and recorded) before the pause budget itself
        // runs out, or the abort would name the budget and lose the hook's record.
        let budget = match deadline {
            Some(d) => hook.timeout.min(d.saturating_duration_since(Instant::now()).saturating_sub(DEADLINE_MARGIN)),
            None => hook.timeout,
        };
        let record = run_one(hook, budget, env, shutdown).await;
        let failed = (!record.ok).then(|| Error::HookFailed {
            at: at.name(),
            run: record.run.clone(),
            why: record.note.clone().unwrap_or_else(|| format!("exit {}", record.exit.unwrap_or(-1))),
            output: last_line(&record.output),
        });
        if record.ok {
            info!(hook = at.name(), run = %hook.run, ms = format!("{:.1}", record.ms), "hook done");
        } else {
            warn!(hook = at.name(), run = %hook.run, exit = ?record.exit, note = ?record.note, "hook failed");
        }
        records.push(record);
        if let Some(e) = failed {
            return Err(e);
        }
    }
    Ok(())
}

async fn run_one(hook: &Hook, budget: Duration, env: &HookEnv, shutdown: &Shutdown) -> HookRecord {
    let started = Instant::now();
    let mut record = HookRecord {
        at: hook.at.name().to_string(),
        run: hook.run.clone(),
        exit: None,
        ok: false,
        ms: 0.0,
        note: None,
        output: String::new(),
    };
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&hook.run)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("MIGRATE_HOOK", hook.at.name())
        .env("MIGRATE_HOOK_TIMEOUT_MS", budget.as_millis().to_string())
        // Its own group, so a timeout kills what it started too (sh -c forks).
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = match tokio::process::Command::from(cmd).kill_on_drop(true).spawn() {
        Ok(c) => c,
        Err(e) => {
            record.note = Some(format!("could not start sh: {e}"));
            return record;
        }
    };
    let pid = child.id();
    // If this future is dropped (the cutover gave up around it), the whole group still goes.
    let mut guard = GroupGuard(pid);
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let read_out = tokio::spawn(async move { read_all(out.as_mut()).await });
    let read_err = tokio::spawn(async move { read_all(err.as_mut()).await });
    let status = tokio::select! {
        r = tokio::time::timeout(budget, child.wait()) => match r {
            Ok(Ok(st)) => Some(st),
            Ok(Err(e)) => {
                record.note = Some(format!("waiting for it failed: {e}"));
                None
            }
            Err(_) => {
                record.note = Some(format!("killed after {budget:?} (its time ran out)"));
                None
            }
        },
        _ = shutdown.wait() => {
            record.note = Some("killed: migrate was interrupted (SIGINT/SIGTERM)".into());
            None
        }
    };
    if status.is_none() {
        if let Some(pid) = guard.0.take() {
            kill_group(pid);
        }
        let _ = child.wait().await;
    }
    guard.0 = None;
    // A background process it left holding the pipes must not hold the cutover.
    let grace = Duration::from_millis(200);
    let stdout = tokio::time::timeout(grace, read_out).await.ok().and_then(|r| r.ok()).unwrap_or_default();
    let stderr = tokio::time::timeout(grace, read_err).await.ok().and_then(|r| r.ok()).unwrap_or_default();
    record.output = tail(&format!("{}{}", String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr)));
    record.exit = status.and_then(|s| s.code());
    record.ok = status.is_some_and(|s| s.success());
    if status.is_some_and(|s| s.code().is_none()) {
        record.note = Some("killed by a signal".into());
    }
    record.ms = started.elapsed().as_secs_f64() * 1000.0;
    record
}

async fn read_all(pipe: Option<&mut (impl tokio::io::AsyncRead + Unpin)>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(p) = pipe {
        let _ = p.read_to_end(&mut buf).await;
    }
    buf
}

/// Kills the hook's process group when dropped while armed.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            kill_group(pid);
        }
    }
}

/// SIGKILL to the hook's whole process group.
fn kill_group(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The last [`OUTPUT_KEPT`] bytes, cut at a character boundary.
fn tail(s: &str) -> String {
    if s.len() <= OUTPUT_KEPT {
        return s.to_string();
    }
    let mut start = s.len() - OUTPUT_KEPT;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

fn last_line(output: &str) -> String {
    output.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}
