//! Splitting a table into chunks of about `chunk_rows` rows by heap block range (`ctid`).
//!
//! Block ranges are read with a TID range scan: sequential, the same per-row cost as one big
//! seq scan, whatever the key looks like (a key-range chunk over a random text key costs 1.2-1.4x
//! through the index here, see docs/performance.md). Chunks of one run read its exported
//! snapshots, each row version at most once (see `snapshots`); the first chunk has no lower
//! and the last no upper bound, so pages added after planning are read too.
//!
//! A partitioned source has no heap of its own: each leaf partition is split the same way, and
//! its chunks read that leaf (under the parent's name, so expressions that name the table
//! still work).

use tokio_postgres::Client;

use crate::{
    error::{Error, Result},
    plan::ResolvedTable,
};

/// One block range `[first_block, end_block)`; `None` is unbounded.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// Chunk number within its table, from 0.
    pub number: i32,
    /// First heap block (inclusive).
    pub first_block: Option<i64>,
    /// End heap block (exclusive).
    pub end_block: Option<i64>,
    /// The leaf partition read (quoted, qualified), for a partitioned source.
    pub part: Option<String>,
    /// How many chunks after `number` this range also covers: a worker claims several
    /// consecutive chunks at once as one range (`[copy] target_chunk_time`).
    pub following: i32,
}

/// What chunk planning learned about the source table.
pub struct ChunkPlan {
    /// The chunks, covering every block.
    pub chunks: Vec<Chunk>,
    /// The heap's file node (for a partitioned source, a hash of every leaf's): a rewrite
    /// (VACUUM FULL, CLUSTER, pg_repack) changes it and moves rows without any change being
    /// captured, so a resumed copy must start the table over. So does a partition attached or
    /// detached.
    pub filenode: i64,
}

/// The relations holding the rows of `$1`: the table itself, or a partitioned table's leaves
/// (`pg_partition_tree` lists nothing for a table that is not partitioned).
const LEAVES: &str = "(SELECT t.relid FROM pg_catalog.pg_partition_tree($1::text::regclass) t \
     WHERE t.isleaf AND (SELECT relkind FROM pg_catalog.pg_class WHERE oid = $1::text::regclass) = 'p' \
     UNION ALL SELECT $1::text::regclass \
     WHERE (SELECT relkind FROM pg_catalog.pg_class WHERE oid = $1::text::regclass) <> 'p')";

/// The relations holding the source's rows: the table itself, or each leaf partition (quoted,
/// qualified), with blocks and estimated rows.
async fn heaps(blue: &Client, table: &ResolvedTable) -> Result<Vec<(Option<String>, i64, f64)>> {
    let rows = blue
        .query(
            &format!(
                "SELECT CASE WHEN p.relid = $1::text::regclass THEN NULL \
                         ELSE format('%I.%I', n.nspname, c.relname) END, \
                    (pg_relation_size(p.relid) / current_setting('block_size')::int8)::int8, c.reltuples::float8 \
             FROM {LEAVES} p \
             JOIN pg_catalog.pg_class c ON c.oid = p.relid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             ORDER BY c.oid"
            ),
            &[&table.source.quoted()],
        )
        .await
        .map_err(Error::db(format!("blue: size of {}", table.source)))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
}

/// The source's heap signature (see [`ChunkPlan::filenode`]).
pub async fn heap_signature(blue: &Client, table: &ResolvedTable) -> Result<i64> {
    let row = blue
        .query_one(
            &format!(
                "SELECT CASE WHEN count(*) = 1 AND bool_and(p.relid = $1::text::regclass) \
                         THEN max(pg_relation_filenode(p.relid))::int8 \
                         ELSE hashtextextended(string_agg(p.relid::oid::text || ':' || \
                              coalesce(pg_relation_filenode(p.relid)::text, ''), ',' ORDER BY p.relid::oid), 0) END \
             FROM {LEAVES} p"
            ),
            &[&table.source.quoted()],
        )
        .await
        .map_err(Error::db(format!("blue: reading the file node of {}", table.source)))?;
    row.get::<_, Option<i64>>(0).ok_or_else(|| Error::NoHeap { table: table.source.to_string() })
}

/// Plans the chunks of one table from blue's current size: chunks of about `chunk_rows` over
/// its heap, or over each leaf partition's, numbered through.
pub async fn plan_chunks(blue: &Client, table: &ResolvedTable, chunk_rows: u64) -> Result<ChunkPlan> {
    let heaps = heaps(blue, table).await?;
    let filenode = heap_signature(blue, table).await?;
    let mut chunks = Vec::new();
    for (part, blocks, reltuples) in heaps {
        let rows = match part {
            None => table.estimate.rows,
            // A leaf never analyzed says -1: estimate from its size.
            Some(_) if reltuples < 0.0 => (blocks as u64) * 50,
            Some(_) => reltuples as u64,
        };
        let n = rows.max(1).div_ceil(chunk_rows.max(1)) as i64;
        for mut c in split(blocks, n) {
            c.number = chunks.len() as i32;
            c.part = part.clone();
            chunks.push(c);
        }
    }
    Ok(ChunkPlan { chunks, filenode })
}

/// `n` consecutive block ranges over `blocks` blocks, open at both ends.
pub fn split(blocks: i64, n: i64) -> Vec<Chunk> {
    let n = n.clamp(1, blocks.max(1));
    let per = (blocks + n - 1) / n.max(1);
    (0..n)
        .map(|i| Chunk {
            number: i as i32,
            first_block: (i > 0).then_some(i * per),
            end_block: (i < n - 1).then_some((i + 1) * per),
            part: None,
            following: 0,
        })
        .collect()
}

/// The condition selecting the chunk's rows of the table SQL names `table` (quoted; joined
/// tables have a `ctid` too).
pub fn condition(chunk: &Chunk, table: &str) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(b) = chunk.first_block {
        parts.push(format!("{table}.ctid >= '({b},0)'::tid"));
    }
    if let Some(b) = chunk.end_block {
        parts.push(format!("{table}.ctid < '({b},0)'::tid"));
    }
    (!parts.is_empty()).then(|| parts.join(" AND "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_every_block_once() {
        let chunks = split(1000, 3);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0].first_block, None);
        assert_eq!(chunks[0].end_block, Some(334));
        assert_eq!(chunks[1].first_block, Some(334));
        assert_eq!(chunks[2].first_block, Some(668));
        assert_eq!(chunks[2].end_block, None);
        assert_eq!(split(0, 5).len(), 1);
        assert_eq!(split(2, 5).len(), 2);
        assert_eq!(condition(&chunks[1], "t").unwrap(), "t.ctid >= '(334,0)'::tid AND t.ctid < '(668,0)'::tid");
        assert_eq!(condition(&split(0, 1)[0], "t"), None);
    }
}
