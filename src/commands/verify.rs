//! `migrate verify`: the per-table summary and every persisting difference.

use super::{connect_both, resolve_sound, Format, Outcome};
use crate::{error::Result, plan::Plan, shutdown::Shutdown};

/// Runs `verify` and prints its report; `Problems` when anything differs.
pub async fn run(
    plan: &Plan,
    format: Format,
    table: Option<&str>,
    reverse: bool,
    changed: bool,
    shutdown: Shutdown,
) -> Result<Outcome> {
    let (blue, green) = connect_both(plan).await?;
    let (resolved, _) = resolve_sound(plan, &blue, &green, &[]).await?;
    drop((blue, green));
    if reverse {
        let trips = crate::verify::round_trip::run(plan, &resolved, table).await?;
        let (text, ok) = crate::verify::round_trip::render_text(&trips);
        match format {
            Format::Text => print!("{text}"),
            Format::Json => println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "way_back": ok, "tables": trips }))
                    .unwrap_or_default()
            ),
        }
        return Ok(if ok { Outcome::Ok } else { Outcome::Problems });
    }
    let report = crate::verify::run(plan, &resolved, table, changed, &shutdown).await?;
    print!(
        "{}",
        match format {
            Format::Text => crate::verify::render_text(&report),
            Format::Json => crate::verify::render_json(&report),
        }
    );
    Ok(if report.equal { Outcome::Ok } else { Outcome::Problems })
}

/// Runs `verify --join`: reads parts of a running verify's tables; the leader reports.
pub async fn join(plan: &Plan, shutdown: Shutdown) -> Result<Outcome> {
    let (blue, green) = connect_both(plan).await?;
    let (resolved, _) = resolve_sound(plan, &blue, &green, &[]).await?;
    drop((blue, green));
    let read = crate::verify::join(plan, &resolved, &shutdown).await?;
    println!("read {read} verify part(s); the leader's `migrate verify` reports the result");
    Ok(Outcome::Ok)
}
