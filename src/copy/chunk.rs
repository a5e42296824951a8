//! Splitting a table into key ranges of about `chunk_rows` rows, and the SQL condition for one.
//!
//! Bounds are key values in their text form, cast back with the key's type, so one mechanism
//! serves integer, text, uuid and composite keys. The first chunk has no lower bound and the last
//! no upper bound, so rows inserted outside the range seen at planning are never missed.

use tokio_postgres::Client;

use crate::{
    error::{Error, Result},
    pg::{ident, literal},
    plan::ResolvedTable,
};

/// One key range `[lower, upper)`; `None` is unbounded.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// Chunk number within its table, from 0.
    pub number: i32,
    /// Inclusive lower bound (text form of each key column).
    pub lower: Option<Vec<String>>,
    /// Exclusive upper bound.
    pub upper: Option<Vec<String>>,
}

/// How many sampled keys per chunk boundary: more gives evener chunks.
const SAMPLE_PER_CHUNK: u64 = 50;

/// Plans the chunks of one table from blue.
pub async fn plan_chunks(
    blue: &Client,
    table: &ResolvedTable,
    chunk_rows: u64,
) -> Result<Vec<Chunk>> {
    let rows = table.estimate.rows.max(1);
    let n = rows.div_ceil(chunk_rows.max(1));
    let bounds = if n <= 1 {
        Vec::new()
    } else if table.key.len() == 1 && table.key[0].integer {
        integer_bounds(blue, table, n).await?
    } else {
        sampled_bounds(blue, table, n).await?
    };
    Ok(from_bounds(bounds))
}

/// Turns sorted, distinct boundaries into consecutive chunks covering the whole key space.
pub fn from_bounds(bounds: Vec<Vec<String>>) -> Vec<Chunk> {
    let mut chunks = Vec::with_capacity(bounds.len() + 1);
    let mut lower = None;
    for (i, b) in bounds.into_iter().enumerate() {
        chunks.push(Chunk {
            number: i as i32,
            lower: lower.take(),
            upper: Some(b.clone()),
        });
        lower = Some(b);
    }
    chunks.push(Chunk {
        number: chunks.len() as i32,
        lower,
        upper: None,
    });
    chunks
}

async fn integer_bounds(blue: &Client, table: &ResolvedTable, n: u64) -> Result<Vec<Vec<String>>> {
    let k = ident(&table.key[0].source);
    let sql = format!(
        "SELECT min({k})::int8, max({k})::int8 FROM {}",
        table.source.quoted()
    );
    let row = blue
        .query_one(&sql, &[])
        .await
        .map_err(Error::db(format!("blue: key range of {}", table.source)))?;
    let (Some(min), Some(max)) = (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1))
    else {
        return Ok(Vec::new());
    };
    let span = (max as i128 - min as i128 + 1).max(1);
    let step = (span / n as i128).max(1);
    let mut out = Vec::new();
    let mut b = min as i128 + step;
    while b <= max as i128 {
        out.push(vec![b.to_string()]);
        b += step;
    }
    Ok(out)
}

async fn sampled_bounds(blue: &Client, table: &ResolvedTable, n: u64) -> Result<Vec<Vec<String>>> {
    let rows = table.estimate.rows.max(1);
    let want = n * SAMPLE_PER_CHUNK;
    let pct = (100.0 * want as f64 / rows as f64).clamp(0.001, 100.0);
    let cols = table
        .key
        .iter()
        .map(|k| format!("{}::text", ident(&k.source)))
        .collect::<Vec<_>>()
        .join(", ");
    let order = table.source_key_list();
    // SYSTEM sampling reads only the sampled pages; the sample is sorted by the key's own
    // ordering (blue's collation), the same ordering the range conditions use.
    let sql = format!(
        "SELECT {cols} FROM {} TABLESAMPLE SYSTEM ({pct}) REPEATABLE (42) ORDER BY {order}",
        table.source.quoted()
    );
    let sample = blue.query(&sql, &[]).await.map_err(Error::db(format!(
        "blue: sampling keys of {}",
        table.source
    )))?;
    let keys: Vec<Vec<String>> = sample
        .iter()
        .map(|r| {
            (0..table.key.len())
                .map(|i| r.get::<_, String>(i))
                .collect()
        })
        .collect();
    let per = (keys.len() as u64 / n).max(1) as usize;
    let mut out: Vec<Vec<String>> = Vec::new();
    for k in keys.into_iter().skip(per).step_by(per) {
        if out.last() != Some(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

/// The SQL condition selecting the chunk's rows by the given (quoted) key columns and types.
pub fn condition(chunk: &Chunk, columns: &[String], types: &[String]) -> Option<String> {
    let tuple = |vals: &[String]| {
        let lits: Vec<String> = vals
            .iter()
            .zip(types)
            .map(|(v, t)| format!("{}::{t}", literal(v)))
            .collect();
        format!("({})", lits.join(", "))
    };
    let cols = format!("({})", columns.join(", "));
    let mut parts = Vec::new();
    if let Some(l) = &chunk.lower {
        parts.push(format!("{cols} >= {}", tuple(l)));
    }
    if let Some(u) = &chunk.upper {
        parts.push(format!("{cols} < {}", tuple(u)));
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join(" AND "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_cover_everything() {
        let chunks = from_bounds(vec![vec!["10".into()], vec!["20".into()]]);
        assert_eq!(chunks.len(), 3);
        assert!(chunks[0].lower.is_none() && chunks[2].upper.is_none());
        assert_eq!(chunks[1].lower, chunks[0].upper);
        assert_eq!(chunks[2].lower, chunks[1].upper);
        assert_eq!(from_bounds(Vec::new()).len(), 1);
    }

    #[test]
    fn composite_condition_quotes_literals() {
        let c = Chunk {
            number: 1,
            lower: Some(vec!["o'k".into(), "1".into()]),
            upper: None,
        };
        let cond = condition(
            &c,
            &["\"a\"".into(), "\"b\"".into()],
            &["text".into(), "bigint".into()],
        )
        .unwrap();
        assert_eq!(cond, "(\"a\", \"b\") >= ('o''k'::text, '1'::bigint)");
    }
}
