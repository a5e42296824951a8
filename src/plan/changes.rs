//! A plan edited after `copy` began: what state recorded of each entry against what the plan
//! says now. Entries reordered or added carry on; entries removed are reported so their capture
//! and state can go; an entry already copied whose rows would now be defined differently (key,
//! expressions, filter, source) is refused, naming the entry and what changed.

use tokio_postgres::GenericClient;

use super::ResolvedPlan;
use crate::{
    error::{Error, Result},
    state::{State, TableId, TableState},
};

/// Checks the resolved plan against what state recorded; returns the ids state knows that the
/// plan no longer has. Nothing is changed. Entries named in `recopy` (to be emptied and copied
/// again) may have changed.
pub async fn check_against_state(
    resolved: &ResolvedPlan,
    state: &State,
    green: &impl GenericClient,
    recopy: &[String],
) -> Result<Vec<TableId>> {
    if !state.exists(green).await? {
        return Ok(Vec::new());
    }
    state.check_layout(green).await?;
    let recorded = state.recorded_tables(green).await?;
    for t in &resolved.tables {
        if t.named_by_any(recopy) {
            continue;
        }
        let Some(r) = recorded.iter().find(|r| r.id == t.id) else { continue };
        if r.state == TableState::Pending {
            continue;
        }
        let Some(stored) = &r.definition else { continue };
        let changes = t.changes_from(stored);
        if !changes.is_empty() {
            return Err(Error::PlanChanged {
                path: resolved.path.clone(),
                line: t.line,
                entry: format!("table[{}] ({} -> {})", t.index, t.source, t.target),
                state: r.state.name().to_string(),
                changes,
            });
        }
    }
    let removed: Vec<_> = recorded.iter().filter(|r| !resolved.tables.iter().any(|t| t.id == r.id)).collect();
    // An entry whose id changed because another entry now writes its target would look removed
    // and added; its rows are on green already. Refused, naming both.
    for r in &removed {
        if let Some(t) =
            resolved.tables.iter().find(|t| t.target.to_string() == r.target && !recorded.iter().any(|x| x.id == t.id))
        {
            return Err(Error::PlanChanged {
                path: resolved.path.clone(),
                line: t.line,
                entry: format!("table[{}] ({} -> {})", t.index, t.source, t.target),
                state: r.state.name().to_string(),
                changes: vec![format!(
                    "it is now known as `{}`, but state knows `{}` for {}: entries for a target already copied cannot \
                     be added or split",
                    t.id, r.id, r.target
                )],
            });
        }
    }
    Ok(removed.into_iter().map(|r| r.id.clone()).collect())
}
