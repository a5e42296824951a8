//! The follow gate: an advisory lock on green that follower rounds hold shared and cutover holds
//! exclusively. Taking it stands the follower aside; a cutover that dies releases it with its
//! session. It lives with the state because a follower reads the phase in the same round trip.

use tokio_postgres::GenericClient;

use super::{decode, Phase, State};
use crate::error::{Error, Result};

/// Advisory lock key namespace of the follow gate.
pub const GATE_NAMESPACE: &str = "bluegreen.follow:";

/// What a follower round may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Holds the shared gate: go ahead, then [`State::leave_gate`].
    Go,
    /// A cutover holds the gate.
    Wait,
    /// Traffic may be on green: never write blue's rows to it again.
    Live,
}

impl State {
    /// The gate's lock key for this plan.
    pub fn gate_key(&self) -> String {
        format!("{GATE_NAMESPACE}{}", self.plan_name())
    }

    /// Tries the gate shared and reads the phase in one round trip.
    pub async fn enter_gate(&self, green: &impl GenericClient) -> Result<(Gate, Option<Phase>)> {
        let key = self.gate_key();
        let row = green
            .query_one(
                &format!(
                    "SELECT pg_try_advisory_lock_shared(hashtext($1)), (SELECT state FROM {} WHERE id = 1)",
                    self.table("migration")
                ),
                &[&key],
            )
            .await
            .map_err(Error::db("green: taking the follow gate"))?;
        let phase: Option<Phase> =
            row.get::<_, Option<serde_json::Value>>(1).map(|v| decode("the migration phase", v)).transpose()?;
        if !row.get::<_, bool>(0) {
            return Ok((Gate::Wait, phase));
        }
        if phase.as_ref().is_some_and(Phase::green_is_live) {
            self.leave_gate(green).await;
            return Ok((Gate::Live, phase));
        }
        Ok((Gate::Go, phase))
    }

    /// Releases the shared gate. A failure means the session is gone, and the lock with it.
    pub async fn leave_gate(&self, green: &impl GenericClient) {
        let _ = green.execute("SELECT pg_advisory_unlock_shared(hashtext($1))", &[&self.gate_key()]).await;
    }
}
