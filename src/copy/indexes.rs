//! Deferred indexes and constraints: dropped before a table's bulk load, rebuilt after its last
//! chunk. Definitions are recorded in state in the same transaction that drops them, so a crash
//! in between loses none; rebuilding is idempotent so a crash during it is simply redone.

use tokio_postgres::Client;
use tracing::info;

use crate::{
    error::{Error, Result},
    pg::catalog::DeferredObject,
};

/// Drops the objects (foreign keys first, so referenced keys can go) inside the caller's
/// transaction.
pub async fn drop_all(tx: &tokio_postgres::Transaction<'_>, objects: &[DeferredObject]) -> Result<()> {
    let mut ordered: Vec<&DeferredObject> = objects.iter().collect();
    ordered.sort_by_key(|o| o.kind != "foreign key");
    for o in ordered {
        tx.batch_execute(&o.drop_sql).await.map_err(Error::db(format!("green: dropping {} {}", o.kind, o.name)))?;
    }
    Ok(())
}

/// Rebuilds the table's own indexes and unique/primary/exclusion constraints (not foreign keys,
/// which wait until every table has its keys). Skips what already exists.
pub async fn rebuild_keys_and_indexes(
    green: &Client,
    table: &str,
    objects: &[DeferredObject],
    copy: &crate::plan::CopySettings,
) -> Result<()> {
    green.batch_execute(&copy.index_build_sql()).await.map_err(Error::db("green: index build settings"))?;
    // Entries writing one target each rebuild its objects when their copy ends, maybe at the
    // same moment: one at a time, so the second finds them made instead of failing on
    // "multiple primary keys".
    let lock = format!("bluegreen rebuild {table}");
    green
        .execute("SELECT pg_advisory_lock(hashtext($1))", &[&lock])
        .await
        .map_err(Error::db(format!("green: waiting to rebuild the indexes of {table}")))?;
    let built = rebuild_locked(green, table, objects).await;
    let _ = green.execute("SELECT pg_advisory_unlock(hashtext($1))", &[&lock]).await;
    built
}

async fn rebuild_locked(green: &Client, table: &str, objects: &[DeferredObject]) -> Result<()> {
    // Primary and unique keys first: apply needs them for ON CONFLICT.
    let mut ordered: Vec<&DeferredObject> = objects.iter().filter(|o| o.kind != "foreign key").collect();
    ordered.sort_by_key(|o| match o.kind.as_str() {
        "primary key" => 0,
        "unique" => 1,
        _ => 2,
    });
    for o in ordered {
        if exists(green, o).await? {
            continue;
        }
        let started = std::time::Instant::now();
        green
            .batch_execute(&o.create_sql)
            .await
            .map_err(Error::db(format!("green: rebuilding {} {} on {table}", o.kind, o.name)))?;
        info!(table, object = %o.name, kind = %o.kind, seconds = started.elapsed().as_secs_f64(), "rebuilt");
    }
    Ok(())
}

/// How long validating a foreign key is retried while apply catches up.
const VALIDATE_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Adds foreign keys as NOT VALID (no scan, brief lock), then validates them (a scan that does
/// not block writes). Apply writes with foreign keys off and rows arrive by key, not in the
/// application's order: a child can land a moment before its parent. A validation that fails
/// on a missing row is retried (bounded, logged) until apply has caught up; only a violation
/// that outlasts the wait fails the copy.
pub async fn rebuild_foreign_keys(green: &Client, objects: &[DeferredObject]) -> Result<()> {
    rebuild_foreign_keys_within(green, objects, VALIDATE_WAIT).await
}

/// [`rebuild_foreign_keys`], retrying a validation for at most `wait` (zero: once).
pub async fn rebuild_foreign_keys_within(
    green: &Client,
    objects: &[DeferredObject],
    wait: std::time::Duration,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for o in objects.iter().filter(|o| o.kind == "foreign key") {
        if !seen.insert(o.create_sql.clone()) {
            continue;
        }
        if !exists(green, o).await? {
            green
                .batch_execute(&format!("{} NOT VALID", o.create_sql))
                .await
                .map_err(Error::db(format!("green: adding foreign key {}", o.name)))?;
        }
        validate(green, o, wait).await?;
        info!(constraint = %o.name, "foreign key validated");
    }
    Ok(())
}

async fn validate(green: &Client, o: &DeferredObject, within: std::time::Duration) -> Result<()> {
    let sql = format!("ALTER TABLE {} VALIDATE CONSTRAINT {}", o.owner, crate::pg::ident(&o.name));
    let started = std::time::Instant::now();
    let mut wait = std::time::Duration::from_millis(250);
    for attempt in 1.. {
        match green.batch_execute(&sql).await {
            Ok(()) => return Ok(()),
            Err(e) if e.code().is_some_and(|c| c.code() == "23503") && started.elapsed() < within => {
                tracing::warn!(
                    constraint = %o.name,
                    attempt,
                    error = %crate::error::pg_message(&e),
                    "foreign key not valid yet (apply writes rows by key, a child may land before its parent); retrying"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(10));
            }
            Err(e) => return Err(Error::db(format!("green: validating foreign key {}", o.name))(e)),
        }
    }
    Ok(())
}

async fn exists(green: &Client, o: &DeferredObject) -> Result<bool> {
    let sql = if o.kind == "index" {
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid \
          WHERE c.relname = $1 AND i.indrelid = to_regclass($2))"
    } else {
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint WHERE conname = $1 AND conrelid = to_regclass($2))"
    };
    Ok(green.query_one(sql, &[&o.name, &o.owner]).await.map_err(Error::db("green: checking rebuilt objects"))?.get(0))
}
