//! Fault injection for the crash tests. `MIGRATE_FAULT=<point>` ends the process abruptly at
//! that point, as SIGKILL would (no cleanup, no RESUME, nothing flushed); `<point>:sleep`
//! stalls there for up to a minute, so a test can signal the process at a known step, and
//! `<point>:sleep=MS` for that many milliseconds, so a test can act inside a window. Unset in
//! production, where each point costs one environment lookup.

use std::time::Duration;

/// The environment variable naming the fault.
pub const VAR: &str = "MIGRATE_FAULT";

/// A named point where a fault can be injected.
pub async fn point(name: &str) {
    let Ok(fault) = std::env::var(VAR) else { return };
    if fault == name {
        eprintln!("fault injected: exiting abruptly at {name}");
        std::process::exit(137);
    }
    if fault.strip_suffix(":sleep") == Some(name) {
        eprintln!("fault injected: stalling at {name}");
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    if let Some(ms) = fault.strip_prefix(name).and_then(|r| r.strip_prefix(":sleep=")) {
        eprintln!("fault injected: stalling at {name} for {ms} ms");
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(1000))).await;
    }
}
