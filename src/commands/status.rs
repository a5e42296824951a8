//! `migrate status`: phase, per-table progress, capture lag, last verify and last cutover, read
//! from the state on green; what capture holds on blue when blue answers.

use super::{Format, Outcome};
use crate::{
    error::Result,
    plan::Plan,
    shutdown::Shutdown,
    state::{State, StatusView},
};

/// Runs `status` and prints its report.
pub async fn run(plan: &Plan, format: Format) -> Result<Outcome> {
    print!("{}", snapshot(plan, format, false).await?);
    Ok(Outcome::Ok)
}

/// `status --watch`: the report again every `every` seconds until Ctrl-C; on a terminal in
/// place (the screen cleared first), else one after the other (JSON: one object per line). A
/// failed read is shown and retried.
pub async fn watch(plan: &Plan, format: Format, every: f64, shutdown: Shutdown) -> Result<Outcome> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stdout().is_terminal();
    let every = watch_period(every);
    loop {
        let text = match snapshot(plan, format, true).await {
            Ok(t) => t,
            // On stderr in JSON: stdout stays one object per line.
            Err(e) if format == Format::Json => {
                eprintln!("status: error: {e}");
                String::new()
            }
            Err(e) => format!("status: error: {e}\n"),
        };
        let stamp = if format == Format::Text {
            format!("(every {:.1} s, Ctrl-C ends)\n", every.as_secs_f64())
        } else {
            String::new()
        };
        if tty {
            print!("\x1b[H\x1b[2J{text}{stamp}");
        } else {
            print!("{text}");
        }
        let _ = std::io::stdout().flush();
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return Ok(Outcome::Ok),
        }
    }
}

/// `--watch SECONDS` as a period: 0.2 s to an hour, 2 s for what is no number (`nan`, `inf`).
fn watch_period(seconds: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(if seconds.is_finite() { seconds.clamp(0.2, 3600.0) } else { 2.0 })
}

/// One status report as printed (`compact`: JSON on one line).
async fn snapshot(plan: &Plan, format: Format, compact: bool) -> Result<String> {
    let green = plan.green.connect().await?;
    // Blue is optional here: status must work while blue is down.
    let blue = match plan.blue.connect().await {
        Ok(blue) => match crate::capture::blue_retention(plan, &blue).await {
            Ok(v) => v,
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        },
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    if let Some(w) = blue["warning"].as_str() {
        tracing::warn!("{w}");
    }
    let report = report(plan, &green, blue).await?;
    Ok(match format {
        Format::Json if compact => serde_json::to_string(&report).unwrap_or_default() + "\n",
        Format::Json => serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
        Format::Text => render_text(&report),
    })
}

/// The status report as JSON (the documented shape of `status --format json`).
pub async fn report(plan: &Plan, green: &tokio_postgres::Client, blue: serde_json::Value) -> Result<serde_json::Value> {
    let state = State::new(&plan.name);
    state.check_layout(green).await?;
    let phase = state.phase(green).await?;
    let (tables, view, drift) = match phase {
        // A switched migration whose state `cleanup` retired keeps only its migration row.
        Some(_) if !state.exists(green).await? => (Vec::new(), Some(state.status_view(green).await?), Vec::new()),
        Some(_) => {
            (state.table_progress(green).await?, Some(state.status_view(green).await?), state.drifted(green).await?)
        }
        None => (Vec::new(), None, Vec::new()),
    };
    let drift: Vec<serde_json::Value> =
        drift.iter().map(|(id, what)| serde_json::json!({ "table": id.as_str(), "what": what })).collect();
    let tables: Vec<serde_json::Value> = tables
        .iter()
        .map(|t| {
            serde_json::json!({
                "table": t.id.as_str(),
                "state": t.state,
                "rows_estimated": t.rows_estimated,
                "rows_copied": t.rows_copied,
                "chunks_done": t.chunks_done,
                "chunks": t.chunks,
            })
        })
        .collect();
    let capture = match &view {
        Some(v) => capture_json(v),
        None => serde_json::json!({ "lag_bytes": null }),
    };
    let view = view.unwrap_or_default();
    // Absent from state an older version made until a `copy` or `control` adds it.
    let control = match phase {
        Some(_) => state.control(green).await.ok().map(|c| serde_json::to_value(c).unwrap_or_default()),
        None => None,
    };
    let way_back = match phase {
        Some(_) => way_back_json(&state, green).await,
        None => serde_json::Value::Null,
    };
    let workers = match phase {
        Some(_) => serde_json::to_value(state.workers(green).await?).unwrap_or_default(),
        None => serde_json::json!([]),
    };
    Ok(serde_json::json!({
        "workers": workers,
        "way_back": way_back,
        "control": control,
        "plan": plan.name,
        "phase": phase.as_ref().map(|p| p.name()).unwrap_or("planned"),
        "detail": phase,
        "has_state": phase.is_some(),
        "tables": tables,
        "last_verify": view.last_verify,
        "cutover": view.cutover,
        "cleaned_up_at": view.cleaned_up_at,
        "last_error": view.last_error,
        "drift": drift,
        "capture": capture,
        "blue": blue,
    }))
}

/// The way back: whether it is open, what is not yet on blue, what green holds for it, the last
/// rollback. `null` when no cutover opened one (or state predates it).
async fn way_back_json(state: &State, green: &tokio_postgres::Client) -> serde_json::Value {
    let Ok(Some(w)) = crate::way_back::window(state, green).await else { return serde_json::Value::Null };
    let (backlog, lag) = match (w.open, w.start_xid) {
        (true, Some(start)) => (
            crate::way_back::backlog(state, green, start).await.ok(),
            crate::way_back::lag_bytes(state, green, start).await.ok(),
        ),
        _ => (None, None),
    };
    let seen: Option<f64> = green
        .query_one(
            &format!(
                "SELECT extract(epoch FROM now() - (way_back->>'seen_at')::timestamptz)::float8 FROM {} WHERE id = 1",
                state.table("migration")
            ),
            &[],
        )
        .await
        .ok()
        .and_then(|r| r.get(0));
    // What the open window costs on green: its change table (the slot's WAL on blue is under `blue`).
    let held: Option<i64> = green
        .query_one(
            "SELECT CASE WHEN to_regclass($1) IS NULL THEN NULL ELSE pg_total_relation_size($1)::int8 END",
            &[&state.table("changes_back")],
        )
        .await
        .ok()
        .and_then(|r| r.get(0));
    let mut v = serde_json::to_value(&w).unwrap_or_default();
    v["green_retained_bytes"] = serde_json::json!(held);
    v["pending_changes"] = serde_json::json!(backlog);
    v["lag_bytes"] = serde_json::json!(lag);
    v["follower_seen_seconds_ago"] = serde_json::json!(seen);
    v["direction"] = serde_json::json!(if w.open { "back" } else { "forward" });
    v
}

fn capture_json(v: &StatusView) -> serde_json::Value {
    serde_json::json!({
        "lag_bytes": v.lag_bytes,
        "lag_seconds": v.lag_seconds,
        "pending_keys": v.pending_keys,
        "applied_keys": v.applied_keys,
        "apply_keys_per_second": v.apply_rate,
        "follower_seen_seconds_ago": v.follower_seen_seconds_ago,
        "last_verify": v.last_verify,
        "cutover": v.cutover,
    })
}

/// The text form: one line per table, aligned however long the names are.
pub fn render_text(value: &serde_json::Value) -> String {
    let mut o =
        format!("plan {}  phase {}\n", value["plan"].as_str().unwrap_or(""), value["phase"].as_str().unwrap_or(""));
    if value["has_state"] != serde_json::Value::Bool(true) {
        o.push_str("  no state on green yet: `migrate copy` has not run\n");
    }
    if let Some(e) = value["last_error"].as_object() {
        o.push_str(&format!(
            "  FAILED: `{}` exited at {}: {}\n",
            e.get("command").and_then(|v| v.as_str()).unwrap_or("?"),
            e.get("at").and_then(|v| v.as_str()).unwrap_or("?"),
            e.get("error").and_then(|v| v.as_str()).unwrap_or("?")
        ));
    }
    let c = &value["control"];
    let mut held = Vec::new();
    if c["paused"] == true {
        held.push("PAUSED (copy and following)".to_string());
    }
    if let Some(r) = c["rows_per_second"].as_u64().filter(|r| *r > 0) {
        held.push(format!("copy throttled to {r} rows/s"));
    }
    if c["postponed"] == true {
        held.push("cutover POSTPONED".to_string());
    }
    if !held.is_empty() {
        o.push_str(&format!("  control: {} (`migrate control` changes it)\n", held.join("; ")));
    }
    let tables = value["tables"].as_array().cloned().unwrap_or_default();
    let w = tables.iter().map(|t| t["table"].as_str().unwrap_or("").chars().count()).max().unwrap_or(0);
    for t in &tables {
        o.push_str(&format!(
            "  {:<w$} {:<9} {:>12} / ~{:<12} rows  {}/{} chunks\n",
            t["table"].as_str().unwrap_or(""),
            t["state"].as_str().unwrap_or(""),
            t["rows_copied"],
            t["rows_estimated"],
            t["chunks_done"],
            t["chunks"]
        ));
    }
    for w in value["workers"].as_array().cloned().unwrap_or_default() {
        let chunks: Vec<&str> =
            w["chunks"].as_array().map(|c| c.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
        let role = w["role"].as_str().unwrap_or("");
        // Verify's processes list parts (`entry:side:part`) where copy's list chunks.
        let (done, doing) =
            if role.starts_with("verify") { ("part(s) read", "reading") } else { ("chunk(s) copied", "copying") };
        o.push_str(&format!(
            "  worker {} ({role}) on {}: {} {done}, {}, seen {:.0}s ago{}\n",
            w["id"].as_str().unwrap_or(""),
            w["host"].as_str().unwrap_or(""),
            w["copied"],
            if chunks.is_empty() { "idle".to_string() } else { format!("{doing} {}", chunks.join(", ")) },
            w["seen_ago"].as_f64().unwrap_or(0.0),
            if w["expired"].as_bool() == Some(true) {
                "; lease expired: its sessions were ended, and what it held went to other workers"
            } else {
                ""
            }
        ));
    }
    let c = &value["capture"];
    if !c["lag_bytes"].is_null() {
        o.push_str(&format!(
            "  capture lag {} bytes{}, {} keys pending, {} applied ({:.0}/s now), follower seen {:.0}s ago\n",
            c["lag_bytes"],
            c["lag_seconds"].as_f64().map(|s| format!(" (about {s:.0} s behind)")).unwrap_or_default(),
            c["pending_keys"],
            c["applied_keys"],
            c["apply_keys_per_second"].as_f64().unwrap_or(0.0),
            c["follower_seen_seconds_ago"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    if let Some(c) = value["cutover"].as_object() {
        o.push_str(&format!(
            "  last cutover: {}, traffic paused {:.1} ms, {:.0} ms in all\n",
            c.get("outcome").and_then(|v| v.as_str()).unwrap_or("?"),
            c.get("paused_ms").and_then(|v| v.as_f64()).unwrap_or(f64::NAN),
            c.get("total_ms").and_then(|v| v.as_f64()).unwrap_or(f64::NAN)
        ));
    }
    let w = &value["way_back"];
    if w["open"] == true {
        o.push_str(&format!(
            "  way back OPEN since {}: {} change(s) on green not yet on blue ({} bytes of green WAL behind), {} key(s) written back, follower seen {}\n",
            w["opened_at"].as_str().unwrap_or("?"),
            w["pending_changes"],
            w["lag_bytes"],
            w["applied"],
            w["follower_seen_seconds_ago"].as_f64().map(|s| format!("{s:.0}s ago")).unwrap_or_else(|| "never".into())
        ));
        if w["follower_seen_seconds_ago"].as_f64().is_none_or(|s| s > 5.0) {
            o.push_str("  WARNING: green's writes are not being carried to blue: run `migrate copy PLAN`\n");
        }
        if let Some(e) = w["error"].as_str() {
            o.push_str(&format!("  STOPPED: the way back failed: {e}\n"));
        }
        o.push_str(&format!(
            "  the way back keeps capture on blue and green ({} in green's change table); end it with `migrate finish PLAN` once you will not roll back\n",
            crate::plan::render_size(w["green_retained_bytes"].as_u64().unwrap_or(0))
        ));
    } else if let Some(by) = w["closed_by"].as_str() {
        o.push_str(&format!("  way back closed ({by}) at {}\n", w["closed_at"].as_str().unwrap_or("?")));
    }
    if let Some(r) = w["last_rollback"].as_object() {
        o.push_str(&format!(
            "  last rollback: {}{}\n",
            r.get("outcome").and_then(|v| v.as_str()).unwrap_or("?"),
            r.get("paused_ms")
                .and_then(|v| v.as_f64())
                .map(|p| format!(", traffic paused {p:.1} ms"))
                .unwrap_or_default()
        ));
    }
    for d in value["drift"].as_array().into_iter().flatten() {
        o.push_str(&format!(
            "  STOPPED: {}: resume with `migrate copy PLAN --recopy {}`\n",
            d["what"].as_str().unwrap_or(""),
            d["table"].as_str().unwrap_or("")
        ));
    }
    if let Some(at) = value["cleaned_up_at"].as_str() {
        o.push_str(&format!("  cleaned up at {at}: migrate's objects on blue and its state on green are gone\n"));
    }
    if let Some(w) = value["blue"]["warning"].as_str() {
        o.push_str(&format!("  WARNING: {w}\n"));
    }
    if let Some(v) = value["last_verify"].as_object() {
        o.push_str(&format!(
            "  last verify {}: {}\n",
            v.get("at").and_then(|a| a.as_str()).unwrap_or("?"),
            if v.get("equal").and_then(|e| e.as_bool()).unwrap_or(false) { "equal" } else { "DIFFERENCES" }
        ));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_periods_are_bounded() {
        assert_eq!(watch_period(f64::NAN), std::time::Duration::from_secs(2));
        assert_eq!(watch_period(f64::INFINITY), std::time::Duration::from_secs(2));
        assert_eq!(watch_period(0.0), std::time::Duration::from_millis(200));
        assert_eq!(watch_period(1.5), std::time::Duration::from_millis(1500));
    }
}
