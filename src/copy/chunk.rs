//! Splitting a table into chunks of about `chunk_rows` rows by heap block range (`ctid`).
//!
//! Block ranges are read with a TID range scan: sequential, the same per-row cost as one big
//! seq scan, whatever the key looks like (a key-range chunk over a random text key costs 1.2-1.4x
//! through the index here, see docs/performance.md). Every chunk of one run reads the same
//! exported snapshot, so each row version is copied exactly once; the first chunk has no lower
//! and the last no upper bound, so pages added after planning are read too.

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
}

/// What chunk planning learned about the source table.
pub struct ChunkPlan {
    /// The chunks, covering every block.
    pub chunks: Vec<Chunk>,
    /// The heap's file node: a rewrite (VACUUM FULL, CLUSTER, pg_repack) changes it and moves
    /// rows without any change being captured, so a resumed copy must start the table over.
    pub filenode: i64,
}

/// Plans the chunks of one table from blue's current size.
pub async fn plan_chunks(blue: &Client, table: &ResolvedTable, chunk_rows: u64) -> Result<ChunkPlan> {
    let row = blue
        .query_one(
            "SELECT (pg_relation_size(c.oid) / current_setting('block_size')::int8)::int8, pg_relation_filenode(c.oid)::int8 \
             FROM pg_catalog.pg_class c WHERE c.oid = $1::text::regclass",
            &[&table.source.quoted()],
        )
        .await
        .map_err(Error::db(format!("blue: size of {}", table.source)))?;
    let blocks: i64 = row.get(0);
    let n = table.estimate.rows.max(1).div_ceil(chunk_rows.max(1)) as i64;
    let filenode: Option<i64> = row.get(1);
    let filenode = filenode.ok_or_else(|| Error::NoHeap { table: table.source.to_string() })?;
    Ok(ChunkPlan { chunks: split(blocks, n), filenode })
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
        })
        .collect()
}

/// The condition selecting the chunk's rows.
pub fn condition(chunk: &Chunk) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(b) = chunk.first_block {
        parts.push(format!("ctid >= '({b},0)'::tid"));
    }
    if let Some(b) = chunk.end_block {
        parts.push(format!("ctid < '({b},0)'::tid"));
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
        assert_eq!(condition(&chunks[1]).unwrap(), "ctid >= '(334,0)'::tid AND ctid < '(668,0)'::tid");
        assert_eq!(condition(&split(0, 1)[0]), None);
    }
}
