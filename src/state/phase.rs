//! The stored enums: the migration's phase, the cutover's step, and each table's copy state.
//! Each variant says who sets it and what may come next; [`Phase::may_become`] is that story as
//! code, and `State::set_phase` refuses any other transition.

use serde::{Deserialize, Serialize};

/// A step of the cutover, recorded in [`Phase::CuttingOver`] before it starts so that a
/// follower finding a dead cutover knows whether traffic may already be on green.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CutoverStep {
    /// Set by `cutover` after preflight: catching up and re-verifying while traffic flows.
    /// Next: `Pause`, or an abort.
    CatchUp,
    /// Set by `cutover` before PgBouncer's PAUSE: draining, the final check and sequences run in
    /// the pause. Next: `Repoint`, or an abort (RESUME on blue).
    Pause,
    /// Set by `cutover` just before the databases file is rewritten: from here traffic may be on
    /// green, and blue's rows must never be written to green again. Next: `Switched`.
    Repoint,
}

impl CutoverStep {
    /// The step's stored name.
    pub fn name(self) -> &'static str {
        match self {
            CutoverStep::CatchUp => "catch-up",
            CutoverStep::Pause => "pause",
            CutoverStep::Repoint => "repoint",
        }
    }

    /// Whether traffic may be on green once a cutover reached this step.
    pub fn green_may_be_live(self) -> bool {
        self == CutoverStep::Repoint
    }
}

impl std::fmt::Display for CutoverStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The migration's phase, stored as JSON in `<schema>.migration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// Set by `copy` when it creates the state; next: `Copying`.
    Planned,
    /// Set by `copy` before the first chunk (and again when a table was added to a plan that
    /// was following); next: `Following` once every table is done.
    Copying,
    /// Set by `copy` when all tables are copied and indexed; green follows blue from here.
    /// `lsn` is the capture position reached, when known. Next: `CuttingOver`, or `Copying`
    /// when the plan gained a table.
    Following {
        /// Last capture position applied.
        lsn: Option<String>,
    },
    /// Set by `cutover` while it switches; `step` is the step reached. Next: `Switched`, or
    /// `Aborted` (by the cutover, or by a follower recovering a dead one).
    CuttingOver {
        /// Step reached.
        step: CutoverStep,
    },
    /// Set by `cutover` after RESUME on green. Final, unless the cutover opened a way back:
    /// then `RollingBack` (by `migrate rollback`).
    Switched,
    /// Set by `rollback` while it switches back; `step` is the step reached (the cutover's steps,
    /// mirrored: from `Repoint` traffic may be on blue). Next: `Following` once traffic is on
    /// blue, or `Switched` when it gave up (traffic stays on green, the way back stays open).
    RollingBack {
        /// Step reached.
        step: CutoverStep,
    },
    /// Set by `cutover` when it gave up and left traffic on blue (also when it failed before
    /// its first recorded step); following goes on. Next:
    /// `CuttingOver` (another attempt), or `Copying` when the plan gained a table.
    Aborted {
        /// Why.
        reason: String,
    },
}

impl Phase {
    /// Whether traffic may already be on green: after this, nothing may copy blue's rows over
    /// green's any more.
    pub fn green_is_live(&self) -> bool {
        match self {
            // Until a rollback has finished, green may take writes, and forward apply would
            // overwrite them with blue's rows.
            Phase::Switched | Phase::RollingBack { .. } => true,
            Phase::CuttingOver { step } => step.green_may_be_live(),
            _ => false,
        }
    }

    /// The name used in `status` (`copying`, `following`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Planned => "planned",
            Phase::Copying => "copying",
            Phase::Following { .. } => "following",
            Phase::CuttingOver { .. } => "cutting-over",
            Phase::Switched => "switched",
            Phase::RollingBack { .. } => "rolling-back",
            Phase::Aborted { .. } => "aborted",
        }
    }

    /// Names of the phases `next` may be entered from (setting a phase again is always allowed,
    /// so a resumed command can repeat its last write).
    pub fn predecessors(next: &Phase) -> &'static [&'static str] {
        match next {
            Phase::Planned => &["planned"],
            Phase::Copying => &["planned", "copying", "following", "aborted"],
            // From `rolling-back`: a rollback put traffic back on blue.
            Phase::Following { .. } => &["copying", "following", "rolling-back"],
            Phase::CuttingOver { .. } => &["following", "aborted", "cutting-over"],
            // From `rolling-back`: a rollback that gave up before traffic moved.
            Phase::Switched => &["cutting-over", "switched", "rolling-back"],
            Phase::RollingBack { .. } => &["switched", "rolling-back"],
            // From `following` too: a cutover that failed before its first recorded step.
            Phase::Aborted { .. } => &["following", "cutting-over", "aborted"],
        }
    }

    /// Whether the stored phase `self` may become `next`.
    pub fn may_become(&self, next: &Phase) -> bool {
        Phase::predecessors(next).contains(&self.name())
    }
}

/// One plan entry's copy state, stored in `<schema>.tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TableState {
    /// Nothing done yet. Next: `Loading`, set in the same transaction that records the chunks
    /// and drops the deferred indexes.
    Pending,
    /// Chunks are being copied; deferred objects are dropped. Next: `Indexing`.
    Loading,
    /// Every chunk is done; indexes are being rebuilt. Next: `Done`.
    Indexing,
    /// Copied and indexed; apply may write to it. Final.
    Done,
}

impl TableState {
    /// The stored name.
    pub fn name(self) -> &'static str {
        match self {
            TableState::Pending => "pending",
            TableState::Loading => "loading",
            TableState::Indexing => "indexing",
            TableState::Done => "done",
        }
    }

    /// The state a stored name stands for.
    pub fn from_name(name: &str) -> Option<TableState> {
        [TableState::Pending, TableState::Loading, TableState::Indexing, TableState::Done]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_their_story() {
        let following = Phase::Following { lsn: None };
        let cutting = Phase::CuttingOver { step: CutoverStep::Pause };
        let aborted = Phase::Aborted { reason: "x".into() };
        assert!(Phase::Planned.may_become(&Phase::Copying));
        assert!(Phase::Copying.may_become(&following));
        assert!(following.may_become(&cutting));
        assert!(cutting.may_become(&Phase::Switched));
        assert!(cutting.may_become(&aborted));
        assert!(aborted.may_become(&cutting));
        assert!(following.may_become(&Phase::Copying), "a table added to a following plan is copied");
        // Refused: skipping the copy, leaving the final phase, switching without a cutover.
        assert!(!Phase::Planned.may_become(&following));
        assert!(!Phase::Switched.may_become(&following));
        assert!(!Phase::Switched.may_become(&Phase::Copying));
        assert!(!following.may_become(&Phase::Switched));
        assert!(!Phase::Copying.may_become(&cutting));
        // The way back: switched, rolling back, following again (or back to switched).
        let rolling = Phase::RollingBack { step: CutoverStep::Repoint };
        assert!(Phase::Switched.may_become(&rolling));
        assert!(rolling.may_become(&following));
        assert!(rolling.may_become(&Phase::Switched));
        assert!(rolling.green_is_live(), "forward apply waits until a rollback is done");
        assert!(!following.may_become(&rolling));
        assert!(!rolling.may_become(&Phase::Copying));
    }

    #[test]
    fn stored_names_round_trip() {
        for s in [TableState::Pending, TableState::Loading, TableState::Indexing, TableState::Done] {
            assert_eq!(TableState::from_name(s.name()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(s.name()));
        }
        assert_eq!(TableState::from_name("copied"), None);
        for step in [CutoverStep::CatchUp, CutoverStep::Pause, CutoverStep::Repoint] {
            let v = serde_json::to_value(Phase::CuttingOver { step }).unwrap();
            assert_eq!(v["step"], step.name());
            assert_eq!(serde_json::from_value::<Phase>(v).unwrap(), Phase::CuttingOver { step });
        }
        // What older versions stored still reads.
        let old: Phase = serde_json::from_str(r#"{"phase":"cutting-over","step":"repoint"}"#).unwrap();
        assert!(old.green_is_live());
    }
}
