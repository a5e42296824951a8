//! `migrate plan`: the resolved mapping, prerequisites and steps, or the file checks alone.

use super::{connect_both, Format, Outcome};
use crate::{
    error::{Error, Result},
    plan::{render_json, render_text, Plan},
};

/// Runs `plan` and prints its report. An unreachable side is a found problem (exit 1), named.
pub async fn run(plan: &Plan, format: Format, offline: bool) -> Result<Outcome> {
    let resolved = if offline {
        None
    } else {
        match connect_both(plan).await {
            Ok((blue, green)) => Some(crate::plan::resolve(plan, &blue, &green).await?),
            Err(e @ Error::Connect(_)) => {
                eprintln!("error: {e}");
                return Ok(Outcome::Problems);
            }
            Err(e) => return Err(e),
        }
    };
    let out = match format {
        Format::Text => render_text(plan, resolved.as_ref()),
        Format::Json => render_json(plan, resolved.as_ref()),
    };
    print!("{out}");
    Ok(match resolved {
        Some(r) if !r.problems.is_empty() => Outcome::Problems,
        _ => Outcome::Ok,
    })
}
