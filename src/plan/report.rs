//! `migrate plan` output: text for a pull-request review, JSON with the same content in a stable
//! shape (documented in docs/plan-reference.md).

use std::fmt::Write;

use super::{file::Plan, ResolvedPlan};

/// Renders a resolved plan (or, with `resolved = None`, the offline view of the file) as text.
pub fn render_text(plan: &Plan, resolved: Option<&ResolvedPlan>) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "plan {} ({})", plan.name, plan.path.display());
    let _ = writeln!(o, "  blue   {}", plan.blue);
    let _ = writeln!(o, "  green  {}", plan.green);
    let c = &plan.copy;
    let _ = writeln!(
        o,
        "  copy   {} worker(s), chunks of {} rows{}, indexes {}{}{}",
        c.workers,
        c.chunk_rows,
        if c.target_chunk_time.is_zero() {
            String::new()
        } else {
            format!(" (claimed {:?} at a time)", c.target_chunk_time)
        },
        if c.defer_indexes { "deferred" } else { "kept" },
        if c.analyze { "" } else { ", not analyzed" },
        if c.max_rows_per_second > 0 { format!(", at most {} rows/s", c.max_rows_per_second) } else { String::new() }
    );
    o.push_str(&cutover_text(plan));
    let Some(r) = resolved else {
        let _ = writeln!(o, "  (offline: the file is valid; catalogs, types and prerequisites were not checked)\n");
        for t in &plan.tables {
            let _ = writeln!(o, "table[{}] {} -> {}", t.index, t.source, t.target);
            let _ = writeln!(o, "  key     {}", t.key.join(", "));
            if let Some((f, _)) = &t.filter {
                let _ = writeln!(o, "  filter  {f}");
            }
            for (col, (expr, _)) in &t.columns {
                let _ = writeln!(o, "    {col:<24} <- {expr}");
            }
            o.push('\n');
        }
        return o;
    };
    let _ = writeln!(o, "  capture {:?}: {}\n", r.capture.method, r.capture.reason);
    for t in &r.tables {
        let _ = writeln!(o, "table[{}] {} -> {}", t.index, t.source, t.target);
        let key: Vec<String> = t
            .key
            .iter()
            .map(|k| format!("{} -> {} ({})", k.source, k.target, k.source_type))
            .chain(t.constant_key.iter().map(|c| format!("{c} (constant)")))
            .collect();
        let _ = writeln!(o, "  key       {}", key.join(", "));
        let _ = writeln!(o, "  filter    {}", t.filter.as_deref().unwrap_or("(none)"));
        if let Some(a) = &t.alias {
            let _ = writeln!(o, "  alias     {a}");
        }
        for j in &t.joins {
            let on: Vec<String> = j.on.iter().map(|o| format!("{}.{} = {}", j.alias, o.column, o.expr)).collect();
            let kind = if j.inner { "inner" } else { "left" };
            let _ = writeln!(o, "  join      {} {} ({kind}) on {}", j.alias, j.table, on.join(" AND "));
            let _ = writeln!(o, "            {}", j.proof);
            // How a write to it reaches the target: by the written row's link values, before
            // and after the write.
            let _ = writeln!(
                o,
                "            a write to {} re-reads the rows of {} joined to its old and new ({})",
                j.table,
                t.source,
                j.link_columns().join(", ")
            );
        }
        match &t.reverse.impossible {
            Some(why) => {
                let _ = writeln!(o, "  reverse   no way back: {why}");
            }
            None => {
                let parts = |columns: &[super::ReverseColumn]| -> String {
                    columns
                        .iter()
                        .map(|c| match &c.how {
                            super::ReverseHow::Derived(e) => format!("{} <- {e}", c.column),
                            super::ReverseHow::Declared(e) => format!("{} <- {e} (declared)", c.column),
                            super::ReverseHow::NotCarried => format!("{} not carried back", c.column),
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                let _ = writeln!(o, "  reverse   {}", parts(&t.reverse.columns));
                for j in &t.reverse.joins {
                    let _ = writeln!(
                        o,
                        "            join {} ({}) written back where {}, upserted on ({}): {}",
                        j.alias,
                        j.table,
                        j.present,
                        j.key.join(", "),
                        parts(&j.columns)
                    );
                }
            }
        }
        for l in &t.reverse.lookup_only {
            let _ = writeln!(
                o,
                "            {l}, a lookup join the way back does not write: green's changes to it stay on green"
            );
        }
        let _ = writeln!(o, "  estimate  ~{} rows, {}", t.estimate.rows, human_bytes(t.estimate.bytes));
        let _ = writeln!(o, "  columns");
        let width = t.columns.iter().map(|c| c.name.len()).max().unwrap_or(0).max(12);
        for col in &t.columns {
            let from = match (&col.expr, &col.expr_type) {
                (Some(_), Some(ty)) if col.same_name && ty != &col.target_type => format!("same name   [{ty}]"),
                (Some(_), _) if col.same_name => "same name".into(),
                (Some(e), Some(ty)) if ty != &col.target_type => format!("{e}   [{ty}]"),
                (Some(e), _) => e.clone(),
                (None, _) => "default".into(),
            };
            let _ = writeln!(o, "    {:<width$}  {:<28} <- {from}", col.name, col.target_type);
        }
        if !t.deferred.is_empty() {
            let _ = writeln!(o, "  deferred");
            for d in &t.deferred {
                let _ = writeln!(o, "    {} {}: {}", d.kind, d.name, d.create_sql);
            }
        }
        for s in &t.sequences {
            let from = s
                .blue_sequence
                .as_deref()
                .map(|b| format!("blue {b}"))
                .unwrap_or_else(|| format!("max({}) on green", s.column));
            let _ = writeln!(o, "  sequence  {} ({}) <- {from}", s.green_sequence, s.column);
        }
        o.push('\n');
    }
    let _ = writeln!(o, "checks");
    for c in &r.checks {
        let _ = writeln!(o, "  {}  {}: {}", if c.ok { "ok  " } else { "FAIL" }, c.name, c.detail);
    }
    let _ = writeln!(o, "\nsteps");
    for (i, s) in r.steps().iter().enumerate() {
        let _ = writeln!(o, "  {}. {s}", i + 1);
    }
    let total: u64 = r.tables.iter().map(|t| t.estimate.bytes).sum();
    let _ = writeln!(o, "\nestimate  {} on blue, copy about {:.0} s", human_bytes(total), r.estimated_seconds.ceil());
    if r.problems.is_empty() {
        let _ = writeln!(o, "\nplan is sound");
    } else {
        let _ = writeln!(o, "\n{} problem(s):", r.problems.len());
        for p in &r.problems {
            o.push_str(&problem_line(plan, p));
        }
    }
    o
}

/// The cutover's mode, entries and hooks.
fn cutover_text(plan: &Plan) -> String {
    let mut o = String::new();
    match &plan.cutover.pgbouncer {
        Some(pb) => {
            let _ = writeln!(o, "  cutover {}", pb.describe());
        }
        None => {
            let _ = writeln!(o, "  cutover (no [cutover.pgbouncer] section: `cutover` cannot run)");
        }
    }
    for h in &plan.cutover.hooks {
        let _ = writeln!(o, "    hook {}", h.describe());
    }
    o
}

/// The cutover section as JSON.
fn cutover_json(plan: &Plan) -> serde_json::Value {
    let pb = plan.cutover.pgbouncer.as_ref();
    serde_json::json!({
        "mode": pb.map(|p| p.mode.name()),
        "database": pb.map(|p| &p.database),
        "v2_database": pb.and_then(|p| match &p.mode {
            super::SwitchMode::Handover { v2_database, .. } => Some(v2_database),
            super::SwitchMode::Repoint { .. } => None,
        }),
        "described": pb.map(|p| p.describe()),
        "hooks": plan.cutover.hooks.iter().map(|h| serde_json::json!({
            "at": h.at.name(),
            "run": h.run,
            "timeout_ms": h.timeout.as_millis() as u64,
        })).collect::<Vec<_>>(),
    })
}

fn problem_line(plan: &Plan, p: &super::Problem) -> String {
    let loc = match p.line {
        Some(l) => format!("{}:{l}: ", plan.path.display()),
        None => format!("{}: ", plan.path.display()),
    };
    let what = match (&p.table, &p.column) {
        (Some(t), Some(c)) => format!(" [{t}.{c}]"),
        (Some(t), None) => format!(" [{t}]"),
        _ => String::new(),
    };
    let mut s = format!("  {loc}{}{what}: {}\n", p.field, p.message);
    if let Some(fix) = &p.fix {
        s.push_str(&format!("      fix: {fix}\n"));
    }
    s
}

/// Renders the same content as JSON (`offline: true` with the file's tables when unresolved).
pub fn render_json(plan: &Plan, resolved: Option<&ResolvedPlan>) -> String {
    let value = match resolved {
        Some(r) => serde_json::json!({
            "plan": plan.path.display().to_string(),
            "offline": false,
            "sound": r.problems.is_empty(),
            "name": r.name,
            "blue": r.blue,
            "green": r.green,
            "copy": r.copy,
            "cutover": cutover_json(plan),
            "capture": r.capture,
            "tables": r.tables,
            "checks": r.checks,
            "steps": r.steps(),
            "estimated_seconds": r.estimated_seconds,
            "problems": r.problems,
        }),
        None => serde_json::json!({
            "plan": plan.path.display().to_string(),
            "offline": true,
            "sound": true,
            "name": plan.name,
            "blue": plan.blue.to_string(),
            "green": plan.green.to_string(),
            "copy": plan.copy,
            "cutover": cutover_json(plan),
            "tables": plan.tables.iter().map(|t| serde_json::json!({
                "index": t.index,
                "source": t.source,
                "target": t.target,
                "key": t.key,
                "filter": t.filter.as_ref().map(|(f, _)| f),
                "columns": t.columns.iter().map(|(c, (e, _))| (c.clone(), e.clone())).collect::<indexmap::IndexMap<_, _>>(),
            })).collect::<Vec<_>>(),
            "problems": [],
        }),
    };
    serde_json::to_string_pretty(&value).unwrap_or_default() + "\n"
}

/// `1.5 MB` style sizes.
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}
