//! Deferred indexes and constraints: dropped before a table's bulk load, rebuilt after its last
//! chunk. Definitions are recorded in state in the same transaction that drops them, so a crash
//! in between loses none; rebuilding is idempotent so a crash during it is simply redone.

use tokio_postgres::Client;
use tracing::info;

use crate::{
    error::{Error, Result},
    pg::catalog::DeferredObject,
};

/// Settings for index builds on green: more memory and parallel workers make CREATE INDEX and
/// ADD PRIMARY KEY several times faster than the defaults (64 MB, 2 workers).
pub const BUILD_SETTINGS: &str = "SET maintenance_work_mem = '512MB'; SET max_parallel_maintenance_workers = 4";

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
pub async fn rebuild_keys_and_indexes(green: &Client, table: &str, objects: &[DeferredObject]) -> Result<()> {
    green.batch_execute(BUILD_SETTINGS).await.map_err(Error::db("green: index build settings"))?;
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

/// Adds foreign keys as NOT VALID (no scan, brief lock), then validates them (a scan that does
/// not block writes).
pub async fn rebuild_foreign_keys(green: &Client, objects: &[DeferredObject]) -> Result<()> {
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
        green
            .batch_execute(&format!("ALTER TABLE {} VALIDATE CONSTRAINT {}", o.owner, crate::pg::ident(&o.name)))
            .await
            .map_err(Error::db(format!("green: validating foreign key {}", o.name)))?;
        info!(constraint = %o.name, "foreign key validated");
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
