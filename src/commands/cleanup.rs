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
        if let (Some(Phase::RollingBack { .. } | Phase::CuttingOver { .. }), false) = (&phase, force) {
            // Recovery needs the state this would drop, and PgBouncer may be paused.
            let command = if matches!(phase, Some(Phase::RollingBack { .. })) { "rollback" } else { "cutover" };
            return Err(Error::Busy { plan: plan.name.clone(), command: command.into() });
        }
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
    let window = match state.exists(&green).await? || phase.is_some() {
        true => crate::way_back::window(&state, &green).await.ok().flatten(),
        false => None,
    };
    if window.as_ref().is_some_and(|w| w.open) {
        close_window(plan, &state, &green).await?;
        println!("the way back is closed: `migrate rollback` is no longer possible");
    }
    crate::way_back::remove(plan, &green).await?;
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

/// Marks the way back closed and waits for the reverse follower to stand aside (it exits at its
/// next round).
async fn close_window(plan: &Plan, state: &State, green: &tokio_postgres::Client) -> Result<()> {
    crate::way_back::update(
        state,
        green,
        serde_json::json!({ "open": false, "closed_by": "finished" }),
        &["closed_at"],
    )
    .await?;
    green
        .batch_execute(&format!("SET lock_timeout = '{}ms'", plan.cutover.lock_timeout.as_millis()))
        .await
        .map_err(Error::db("green: finish session"))?;
    green
        .execute("SELECT pg_advisory_lock(hashtext($1))", &[&state.gate_key()])
        .await
        .map_err(Error::db("green: standing the reverse follower aside (follow gate)"))?;
    green
        .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&state.gate_key()])
        .await
        .map_err(Error::db("green: follow gate"))?;
    Ok(())
}

/// `migrate finish`: ends the way back once the application will not roll back: closes it
/// (the running `copy` exits), removes green's capture and blue's. Blue's data and green's
/// state record stay; `cleanup` removes the rest.
pub async fn finish(plan: &Plan) -> Result<Outcome> {
    let (blue, green) = connect_both(plan).await?;
    let state = State::new(&plan.name);
    let phase = if state.exists(&green).await? { state.phase(&green).await? } else { None };
    let window = match phase {
        Some(_) => crate::way_back::window(&state, &green).await?,
        None => None,
    };
    match (&phase, &window) {
        (Some(Phase::Switched), Some(w)) if w.open || w.closed_by.as_deref() == Some("finished") => {}
        (Some(Phase::Switched), Some(w)) if w.closed_by.is_some() => {
            println!(
                "nothing to finish: the way back was closed ({} at {})",
                w.closed_by.as_deref().unwrap_or("?"),
                w.closed_at.as_deref().unwrap_or("?")
            );
            return Ok(Outcome::Ok);
        }
        (Some(Phase::RollingBack { .. }), _) => {
            return Err(Error::Busy { plan: plan.name.clone(), command: "rollback".into() });
        }
        (Some(p), _) => {
            println!("nothing to finish: phase {} has no way back open (it opens at a cutover with `[cutover] way_back = true`)", p.name());
            return Ok(Outcome::Problems);
        }
        (None, _) => {
            println!("nothing to finish: no migration state on green");
            return Ok(Outcome::Problems);
        }
    }
    crate::cutover::lock(plan, &green, "finish").await?;
    // A rollback may have finished while this waited for the lock.
    if state.phase(&green).await? != Some(Phase::Switched) {
        println!("nothing to finish: a rollback ran meanwhile (phase is no longer switched)");
        return Ok(Outcome::Problems);
    }
    // Closed first: from here no rollback may start, so a removal that fails half-way loses
    // nothing; running `finish` again completes it.
    close_window(plan, &state, &green).await?;
    let saved = crate::way_back::window(&state, &green).await?.and_then(|w| w.blue_line_file);
    crate::way_back::remove(plan, &green).await?;
    if let Some(f) = saved {
        let _ = std::fs::remove_file(f);
    }
    println!("removed from green: the way back's triggers and change table (schema {})", slot_name(&plan.name));
    crate::capture::remove(plan, &blue).await?;
    println!(
        "removed from blue: replication slot and publication {s}, capture triggers, schema {s}",
        s = slot_name(&plan.name)
    );
    println!("the way back is closed: `migrate rollback` is no longer possible; `migrate cleanup` removes the rest of the state");
    Ok(Outcome::Ok)
}
