//! `migrate cleanup`: slot, publication, triggers and our schema on blue; state on green. A
//! copy that did not finish left green's indexes and constraints dropped: they are rebuilt
//! first, and cleanup refuses (listing them) when they cannot be. A switched migration keeps
//! its migration row, so `status` still tells that it switched and was cleaned up.

use super::{connect_both, Outcome};
use crate::{
    error::{Error, Result},
    plan::Plan,
    state::{slot_name, Phase, State},
};

/// Runs `cleanup` and says what it restored and removed.
pub async fn run(plan: &Plan, force: bool) -> Result<Outcome> {
    let (blue, green) = connect_both(plan).await?;
    if let Err(e) = crate::copy::lock_plan(&green, &plan.name, "copy").await {
        if !force {
            return Err(Error::CopyRunning { source: Box::new(e) });
        }
        tracing::warn!("a copy of this plan is running; removing its objects anyway (--force)");
    }
    let state = State::new(&plan.name);
    let mut restored = Vec::new();
    let mut phase = None;
    if state.exists(&green).await? {
        phase = state.phase(&green).await?;
        // A switched migration's green is the application's now: nothing of ours to restore.
        let (done, failed) = if phase == Some(Phase::Switched) {
            (Vec::new(), Vec::new())
        } else {
            crate::copy::restore_deferred(&green, &state, &plan.copy).await?
        };
        restored = done;
        if !failed.is_empty() && !force {
            return Err(Error::CleanupRefused { objects: failed });
        }
        for f in &failed {
            tracing::warn!("not restored (--force): {f}");
        }
    } else if state.phase(&green).await? == Some(Phase::Switched) {
        phase = Some(Phase::Switched);
    }
    crate::capture::remove(plan, &blue).await?;
    let slot = slot_name(&plan.name);
    for r in &restored {
        println!("restored on green: {r}");
    }
    println!("removed from blue: replication slot and publication {slot}, capture triggers, schema {slot}");
    if phase == Some(Phase::Switched) {
        state.retire(&green).await?;
        println!("removed from green: the state of schema {slot}, but for the record that it switched");
    } else {
        state.drop(&green).await?;
        println!("removed from green: schema {slot}");
    }
    Ok(Outcome::Ok)
}
