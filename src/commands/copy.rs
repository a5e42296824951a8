//! `migrate copy`: capture, copy, follow. Its report is its logs and progress bars.

use super::{connect_both, resolve_sound, Outcome};
use crate::{error::Result, plan::Plan, shutdown::Shutdown};

/// Runs `copy` (and following, unless `no_follow` once caught up).
pub async fn run(
    plan: &Plan,
    no_follow: bool,
    recopy: &[String],
    metrics: Option<&str>,
    shutdown: Shutdown,
) -> Result<Outcome> {
    let server = match metrics {
        Some(addr) => Some(super::metrics::spawn(plan, addr).await?),
        None => None,
    };
    let _server = server.map(crate::shutdown::AbortOnDrop);
    let (blue, green) = connect_both(plan).await?;
    // Lock before reading catalogs: a running copy drops and rebuilds green's indexes, and
    // catalog functions read those rows without a snapshot ("cache lookup failed").
    crate::copy::lock_plan(&green, &plan.name, "copy").await?;
    let (resolved, removed) = resolve_sound(plan, &blue, &green, recopy).await?;
    crate::copy::run(plan, &resolved, &removed, recopy, green, shutdown, no_follow).await?;
    Ok(Outcome::Ok)
}

/// Runs `copy --join`: no plan lock (the leader holds it), no capture, no following.
pub async fn join(plan: &Plan, shutdown: Shutdown) -> Result<Outcome> {
    let (blue, green) = connect_both(plan).await?;
    // The leader drops and rebuilds green's indexes meanwhile; catalog functions read those
    // rows without a snapshot and can fail for a moment ("cache lookup failed"): try again.
    let mut attempt = 0;
    let resolved = loop {
        match resolve_sound(plan, &blue, &green, &[]).await {
            Ok((resolved, _)) => break resolved,
            Err(crate::error::Error::Db { .. }) if attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    };
    // Not under the worker's lease: closed before the worker starts (one left to a blue it then
    // loses would stay open there).
    drop(blue);
    crate::copy::join(plan, &resolved, green, shutdown).await?;
    Ok(Outcome::Ok)
}
