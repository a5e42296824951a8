//! Schema drift on blue: a planned table renamed, moved, dropped, rewritten (`ALTER COLUMN …
//! TYPE … USING`, `VACUUM FULL`, `CLUSTER`) or given other columns after its copy began. None
//! of these is a row change, so capture alone would follow on while green silently drifts.
//! Each table's shape is recorded when its copy begins and compared with blue's catalog before
//! every few capture rounds; a difference stops following and is stored, so a rerun refuses to
//! resume until the operator says how (`migrate copy --recopy TABLE`, or start over).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::{
    error::{Error, Result},
    plan::ResolvedTable,
};

/// What a source table is on blue: identity, heap and columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    /// pg_class OID: survives renames.
    pub oid: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// Heap file node: changes when the table is rewritten.
    pub filenode: i64,
    /// Columns (name, type OID), generated ones left out.
    pub columns: Vec<(String, u32)>,
}

const SHAPES: &str = "SELECT c.oid, n.nspname::text, c.relname::text, coalesce(pg_relation_filenode(c.oid), 0)::int8, \
       coalesce((SELECT array_agg(a.attname::text || ':' || a.atttypid::text ORDER BY a.attnum) \
                 FROM pg_catalog.pg_attribute a \
                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''), '{}') \
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace";

fn shape_of(r: &tokio_postgres::Row) -> Shape {
    let cols: Vec<String> = r.get(4);
    Shape {
        oid: r.get(0),
        schema: r.get(1),
        name: r.get(2),
        filenode: r.get(3),
        columns: cols
            .iter()
            .filter_map(|c| c.rsplit_once(':').and_then(|(n, t)| Some((n.to_string(), t.parse().ok()?))))
            .collect(),
    }
}

/// `t`'s source table as blue has it now.
pub async fn shape(blue: &Client, t: &ResolvedTable) -> Result<Shape> {
    let row = blue
        .query_one(&format!("{SHAPES} WHERE c.oid = $1::text::regclass"), &[&t.source.quoted()])
        .await
        .map_err(Error::db(format!("blue: reading the shape of {}", t.source)))?;
    Ok(shape_of(&row))
}

/// Compares recorded shapes (by OID) with blue's catalog; the first table that drifted, with
/// what happened to it.
pub async fn drifted(blue: &Client, recorded: &[(String, Shape)]) -> Result<Option<(String, String)>> {
    if recorded.is_empty() {
        return Ok(None);
    }
    let oids: Vec<u32> = recorded.iter().map(|(_, s)| s.oid).collect();
    let now: HashMap<u32, Shape> = blue
        .query(&format!("{SHAPES} WHERE c.oid = ANY($1)"), &[&oids])
        .await
        .map_err(Error::db("blue: reading the shape of the planned tables"))?
        .iter()
        .map(|r| {
            let s = shape_of(r);
            (s.oid, s)
        })
        .collect();
    for (id, was) in recorded {
        if let Some(what) = difference(was, now.get(&was.oid)) {
            return Ok(Some((id.clone(), what)));
        }
    }
    Ok(None)
}

/// What changed between two shapes of one table, in words; `None` when nothing did.
pub fn difference(was: &Shape, now: Option<&Shape>) -> Option<String> {
    let table = format!("{}.{}", was.schema, was.name);
    let Some(now) = now else { return Some(format!("{table} was dropped on blue")) };
    if (now.schema.as_str(), now.name.as_str()) != (was.schema.as_str(), was.name.as_str()) {
        return Some(format!("{table} was renamed on blue to {}.{}", now.schema, now.name));
    }
    if now.columns != was.columns {
        let show = |c: &[(String, u32)]| c.iter().map(|(n, t)| format!("{n} ({t})")).collect::<Vec<_>>().join(", ");
        return Some(format!(
            "the columns of {table} changed on blue (name and type OID were [{}], are now [{}])",
            show(&was.columns),
            show(&now.columns)
        ));
    }
    if now.filenode != was.filenode {
        return Some(format!(
            "{table} was rewritten on blue (ALTER TABLE … USING, VACUUM FULL or CLUSTER): its rows may have \
             changed without a row change to capture"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            oid: 1,
            schema: "public".into(),
            name: "t".into(),
            filenode: 10,
            columns: vec![("id".into(), 23), ("v".into(), 25)],
        }
    }

    #[test]
    fn every_kind_of_drift_is_named() {
        let was = shape();
        assert_eq!(difference(&was, Some(&was)), None);
        assert!(difference(&was, None).unwrap().contains("dropped"));
        let renamed = Shape { name: "t2".into(), ..shape() };
        assert!(difference(&was, Some(&renamed)).unwrap().contains("renamed on blue to public.t2"));
        let retyped = Shape { columns: vec![("id".into(), 20), ("v".into(), 25)], filenode: 11, ..shape() };
        assert!(difference(&was, Some(&retyped)).unwrap().contains("columns of public.t changed"));
        let rewritten = Shape { filenode: 11, ..shape() };
        assert!(difference(&was, Some(&rewritten)).unwrap().contains("rewritten"));
    }
}
