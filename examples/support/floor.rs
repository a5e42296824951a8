//! The raw floor the copy benchmarks measure against: the plan's own transforming COPY of its
//! first entry piped in one stream into the bare target, then the same indexes.

use std::{path::Path, time::Instant};

use bluegreen::plan::{resolve, Plan};
use futures_util::{SinkExt, TryStreamExt};

/// One stream of the plan's transforming COPY into the bare target, then the same indexes.
pub async fn raw_floor(plan_path: &Path) -> anyhow::Result<f64> {
    let plan = Plan::load(plan_path)?;
    let blue = plan.blue.connect().await?;
    let green = plan.green.connect().await?;
    let resolved = resolve(&plan, &blue, &green).await?;
    let t = &resolved.tables[0];
    for d in t
        .deferred
        .iter()
        .filter(|d| d.kind == "foreign key")
        .chain(t.deferred.iter().filter(|d| d.kind != "foreign key"))
    {
        green.batch_execute(&d.drop_sql).await?;
    }
    let started = Instant::now();
    let sink = green
        .copy_in(&format!("COPY {} ({}) FROM STDIN (FORMAT binary)", t.target.quoted(), t.target_column_list()))
        .await?;
    let stream = blue.copy_out(&format!("COPY ({}) TO STDOUT (FORMAT binary)", t.source_select(None))).await?;
    let mut stream = Box::pin(stream);
    let mut sink = Box::pin(sink);
    sink.send_all(&mut stream.as_mut().map_err(|e| e)).await?;
    sink.as_mut().finish().await?;
    let copied = started.elapsed().as_secs_f64();
    green.batch_execute(&plan.copy.index_build_sql()).await?;
    let mut order: Vec<_> = t.deferred.iter().filter(|d| d.kind != "foreign key").collect();
    order.sort_by_key(|d| d.kind != "primary key");
    let mut each = Vec::new();
    for d in order {
        let t = Instant::now();
        green.batch_execute(&d.create_sql).await?;
        each.push(format!("{} {:.2}s", d.name, t.elapsed().as_secs_f64()));
    }
    eprintln!(
        "  floor: copy {copied:.2}s, indexes {:.2}s ({})",
        started.elapsed().as_secs_f64() - copied,
        each.join(", ")
    );
    Ok(started.elapsed().as_secs_f64())
}
