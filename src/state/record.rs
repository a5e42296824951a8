//! The cutover record stored in `migration.cutover`: how the last cutover ended, how long
//! traffic was paused, each step's time and the sequences it set.

use serde::{Deserialize, Serialize};

/// How a cutover that ran its switch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CutoverOutcome {
    /// Traffic is on green.
    Switched,
    /// Rolled back: traffic stays on blue.
    Aborted,
}

/// One step of the switch and its time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTime {
    /// Step name, as printed in the timeline.
    pub step: String,
    /// Milliseconds.
    pub ms: f64,
}

/// A sequence set on green at cutover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceSet {
    /// Green's sequence.
    pub sequence: String,
    /// Blue's value, when the column is copied verbatim from a sequence there.
    pub blue: Option<i64>,
    /// The value set on green.
    pub set: i64,
}

/// The last cutover's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CutoverRecord {
    /// How it ended.
    pub outcome: CutoverOutcome,
    /// The PgBouncer database switched.
    pub database: String,
    /// PAUSE sent to RESUME done, when traffic was paused.
    pub paused_ms: Option<f64>,
    /// Start of the switch to its end.
    pub total_ms: f64,
    /// Each step with its time.
    pub steps: Vec<StepTime>,
    /// Sequences set on green.
    pub sequences: Vec<SequenceSet>,
    /// `repoint` or `handover` (absent in records of earlier versions).
    #[serde(default)]
    pub mode: Option<String>,
    /// Each hook run, in order.
    #[serde(default)]
    pub hooks: Vec<HookRecord>,
}

/// One `[[cutover.hook]]` run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookRecord {
    /// The point it ran at (`before_pause`, `in_pause`, `after_switch`, `on_abort`).
    pub at: String,
    /// The command.
    pub run: String,
    /// Its exit code; `None` when it was killed or could not start.
    pub exit: Option<i32>,
    /// Whether it succeeded (exit 0 within its time).
    pub ok: bool,
    /// Milliseconds it ran.
    pub ms: f64,
    /// Why it failed, when it did not simply exit non-zero (killed after its timeout, could
    /// not start).
    pub note: Option<String>,
    /// The end of its stdout and stderr.
    pub output: String,
}
