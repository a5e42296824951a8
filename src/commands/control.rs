//! `migrate control`: live control of a running migration, stored on green (see
//! [`crate::control`]).

use super::Outcome;
use crate::{
    error::{Error, Result},
    plan::Plan,
    state::State,
};

/// What `migrate control` sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlAction {
    /// Pause the copy and the follower.
    Pause,
    /// Undo `Pause`.
    Resume,
    /// Copy at most this many rows per second.
    Throttle(u64),
    /// Back to the plan's rate.
    Unthrottle,
    /// `cutover` waits before it starts.
    Postpone,
    /// Undo `Postpone`.
    Unpostpone,
    /// Change nothing; print what is set.
    Show,
}

/// Applies `action` to the control stored on green and prints what is now set.
pub async fn run(plan: &Plan, action: ControlAction) -> Result<Outcome> {
    let green = plan.green.connect().await?;
    let state = State::new(&plan.name);
    if state.phase(&green).await?.is_none() {
        return Err(Error::NoState { plan: plan.name.clone() });
    }
    let patch = match action {
        ControlAction::Pause => serde_json::json!({ "paused": true }),
        ControlAction::Resume => serde_json::json!({ "paused": false }),
        ControlAction::Throttle(0) => {
            return Err(Error::Usage("throttle takes a rate above 0 rows per second; `unthrottle` removes it".into()))
        }
        ControlAction::Throttle(r) => serde_json::json!({ "rows_per_second": r }),
        ControlAction::Unthrottle => serde_json::json!({ "rows_per_second": 0 }),
        ControlAction::Postpone => serde_json::json!({ "postponed": true }),
        ControlAction::Unpostpone => serde_json::json!({ "postponed": false }),
        // Reads only (state an older version made has no control: nothing is set).
        ControlAction::Show => serde_json::Value::Null,
    };
    let c = if patch.is_null() {
        state.control(&green).await.unwrap_or_default()
    } else {
        // The control column may be new to this state (added by `ensure`, which changes nothing
        // else).
        state.ensure(&green, &plan.name).await?;
        let c = state.update_control(&green, &patch).await?;
        tracing::info!(?action, "live control set");
        c
    };
    println!(
        "paused {}  copy rate {}  cutover postponed {}",
        if c.paused { "yes" } else { "no" },
        if c.rows_per_second == 0 { "as the plan says".to_string() } else { format!("{} rows/s", c.rows_per_second) },
        if c.postponed { "yes" } else { "no" }
    );
    Ok(Outcome::Ok)
}
