//! `migrate cleanup`: slot, publication, triggers and our schema on blue; state on green.

use super::{connect_both, Outcome};
use crate::{
    error::{Error, Result},
    plan::Plan,
    state::{slot_name, State},
};

/// Runs `cleanup` and says what it removed.
pub async fn run(plan: &Plan, force: bool) -> Result<Outcome> {
    let (blue, green) = connect_both(plan).await?;
    if let Err(e) = crate::copy::lock_plan(&green, &plan.name, "copy").await {
        if !force {
            return Err(Error::CopyRunning { source: Box::new(e) });
        }
        tracing::warn!("a copy of this plan is running; removing its objects anyway (--force)");
    }
    crate::capture::remove(plan, &blue).await?;
    State::new(&plan.name).drop(&green).await?;
    println!(
        "removed from blue: replication slot and publication {slot}, capture triggers, schema {slot}\nremoved from green: schema {slot}",
        slot = slot_name(&plan.name)
    );
    Ok(Outcome::Ok)
}
