//! `migrate cutover`: preflight, then the switch; prints the checks, the timeline and how it
//! ended.

use std::{fmt::Write as _, io::Write as _};

use super::{connect_both, resolve_sound, Outcome};
use crate::{
    cutover::{Ended, Report},
    error::Result,
    plan::{Check, Plan},
    shutdown::Shutdown,
};

/// Runs `cutover` (or only its preflight) and prints its report; with `back`, `rollback`.
pub async fn run(plan: &Plan, dry_run: bool, back: bool, shutdown: Shutdown) -> Result<Outcome> {
    let (blue, green) = connect_both(plan).await?;
    let (resolved, _) = resolve_sound(plan, &blue, &green, &[]).await?;
    drop((blue, green));
    // Preflight is shown before anything is switched; the rest once the switch ended, however.
    let mut show_checks = |checks: &[Check]| {
        print!("{}", render_checks(checks));
        let _ = std::io::stdout().flush();
    };
    let report = if back {
        crate::cutover::rollback::run(plan, &resolved, dry_run, shutdown, &mut show_checks).await?
    } else {
        crate::cutover::run(plan, &resolved, dry_run, shutdown, &mut show_checks).await?
    };
    print!("{}", render_text(&report, back));
    if let Some(e) = report.error {
        return Err(e);
    }
    Ok(if report.ok() { Outcome::Ok } else { Outcome::Problems })
}

/// The preflight checks.
pub fn render_checks(checks: &[Check]) -> String {
    let mut o = String::from("preflight:\n");
    for c in checks {
        let _ = writeln!(o, "  [{}] {}: {}", if c.ok { "ok" } else { "FAIL" }, c.name, c.detail);
    }
    o
}

/// The text report after preflight: timeline, how it ended.
pub fn render_text(r: &Report, back: bool) -> String {
    let mut o = String::new();
    if r.error.is_some() {
        let _ = writeln!(o, "timeline up to the failure:");
        for (step, ms) in &r.timeline {
            let _ = writeln!(o, "  {step:<26} {ms:>9.1} ms");
        }
        o.push_str(&render_hooks(&r.hooks));
        return o;
    }
    if matches!(r.ended, Ended::Switched { .. } | Ended::Aborted { .. } | Ended::RolledBack { .. }) {
        let _ = writeln!(o, "timeline:");
        for (step, ms) in &r.timeline {
            let _ = writeln!(o, "  {step:<26} {ms:>9.1} ms");
        }
        for s in &r.sequences {
            let _ = writeln!(o, "  sequence {} set to {}", s.sequence, s.set);
        }
        o.push_str(&render_hooks(&r.hooks));
        if let Some(p) = r.paused_ms {
            let _ = writeln!(o, "traffic paused for {p:.1} ms (PAUSE sent to RESUME done)");
        }
    }
    let (what, from, to) = if back { ("rollback", "green", "blue") } else { ("cutover", "blue", "green") };
    let _ = match &r.ended {
        Ended::NoState => writeln!(o, "{what} not attempted: no migration state on green; run `migrate copy` first"),
        Ended::Postponed => writeln!(o, "{what} not attempted: interrupted while postponed; traffic stays on {to}"),
        Ended::AlreadySwitched { traffic } => writeln!(o, "already switched: {traffic}"),
        Ended::ChecksFailed { failed } => {
            writeln!(o, "{what} not attempted: {failed} check(s) failed; traffic stays on {from}")
        }
        Ended::DryRunPassed => writeln!(o, "dry run: every check passed; nothing was changed"),
        Ended::Switched { traffic } => writeln!(o, "switched: {traffic}"),
        Ended::Aborted { reason } if back => writeln!(
            o,
            "rollback aborted: {reason}\ntraffic stays on green; the way back stays open and `migrate copy` carries green's writes to blue"
        ),
        Ended::Aborted { reason } => {
            writeln!(o, "cutover aborted: {reason}\ntraffic stays on blue; following continues")
        }
        Ended::RolledBack { traffic } => writeln!(o, "rolled back: {traffic}"),
    };
    o
}

/// Each hook run: point, command, how it ended, and the last line it printed.
fn render_hooks(hooks: &[crate::state::HookRecord]) -> String {
    let mut o = String::new();
    for h in hooks {
        let how = match (&h.note, h.exit) {
            (Some(note), _) => note.clone(),
            (None, Some(code)) => format!("exit {code}"),
            (None, None) => "no exit code".into(),
        };
        let last = h.output.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        let _ = writeln!(
            o,
            "  hook {} `{}`: {} ({how}, {:.1} ms){}",
            h.at,
            h.run,
            if h.ok { "ok" } else { "FAILED" },
            h.ms,
            if last.is_empty() { String::new() } else { format!(": {last}") }
        );
    }
    o
}
