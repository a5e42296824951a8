//! `migrate verify`: the per-table summary and every persisting difference.

use super::{connect_both, resolve_sound, Format, Outcome};
use crate::{error::Result, plan::Plan};

/// Runs `verify` and prints its report; `Problems` when anything differs.
pub async fn run(plan: &Plan, format: Format, table: Option<&str>) -> Result<Outcome> {
    let (blue, green) = connect_both(plan).await?;
    let (resolved, _) = resolve_sound(plan, &blue, &green, &[]).await?;
    drop((blue, green));
    let report = crate::verify::run(plan, &resolved, table).await?;
    print!(
        "{}",
        match format {
            Format::Text => crate::verify::render_text(&report),
            Format::Json => crate::verify::render_json(&report),
        }
    );
    Ok(if report.equal { Outcome::Ok } else { Outcome::Problems })
}
