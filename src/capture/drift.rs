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
    /// A partitioned table's leaf partitions: (OID, file node). A partition truncated,
    /// rewritten, detached or dropped changes rows without a row change to capture (pgoutput
    /// sends no truncate of a partition published as its root's), and so does one attached
    /// with rows in it.
    #[serde(default)]
    pub leaves: Vec<(u32, i64)>,
    /// The entry's joined tables, in join order. Compared like the source, except that their
    /// heap may be rewritten (VACUUM FULL changes no value the join reads; a TRUNCATE is
    /// captured).
    #[serde(default)]
    pub joined: Vec<Shape>,
}

const SHAPES: &str = "SELECT c.oid, n.nspname::text, c.relname::text, coalesce(pg_relation_filenode(c.oid), 0)::int8, \
       coalesce((SELECT array_agg(a.attname::text || ':' || a.atttypid::text ORDER BY a.attnum) \
                 FROM pg_catalog.pg_attribute a \
                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''), '{}'), \
       coalesce((SELECT array_agg(p.relid::oid::text || ':' || coalesce(pg_relation_filenode(p.relid), 0)::text \
                                  ORDER BY p.relid::oid) \
                 FROM pg_catalog.pg_partition_tree(c.oid) p WHERE p.isleaf AND c.relkind = 'p'), '{}') \
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace";

fn shape_of(r: &tokio_postgres::Row) -> Shape {
    let cols: Vec<String> = r.get(4);
    let leaves: Vec<String> = r.get(5);
    Shape {
        oid: r.get(0),
        schema: r.get(1),
        name: r.get(2),
        filenode: r.get(3),
        columns: cols
            .iter()
            .filter_map(|c| c.rsplit_once(':').and_then(|(n, t)| Some((n.to_string(), t.parse().ok()?))))
            .collect(),
        leaves: leaves
            .iter()
            .filter_map(|l| l.split_once(':').and_then(|(o, f)| Some((o.parse().ok()?, f.parse().ok()?))))
            .collect(),
        joined: Vec::new(),
    }
}

/// `t`'s source table as blue has it now.
pub async fn shape(blue: &Client, t: &ResolvedTable) -> Result<Shape> {
    let read = |table: &crate::pg::QualifiedName| {
        let q = table.quoted();
        let ctx = format!("blue: reading the shape of {table}");
        async move {
            let row = blue
                .query_one(&format!("{SHAPES} WHERE c.oid = $1::text::regclass"), &[&q])
                .await
                .map_err(Error::db(ctx))?;
            Ok::<Shape, Error>(shape_of(&row))
        }
    };
    let mut shape = read(&t.source).await?;
    for j in &t.joins {
        shape.joined.push(read(&j.table).await?);
    }
    Ok(shape)
}

/// Compares recorded shapes (by OID) with blue's catalog: the first table that drifted, with
/// what happened to it. A partition that appeared since is accepted when every row in it was
/// written after it joined the partitioned table (a partition created while following: those
/// writes were captured as the partitioned table's) and returned in `accepted` (entry, shape
/// now) for the caller to record; one attached holding older rows is drift.
pub async fn drifted(
    blue: &Client,
    recorded: &[(String, Shape)],
    accepted: &mut Vec<(String, Shape)>,
) -> Result<Option<(String, String)>> {
    if recorded.is_empty() {
        return Ok(None);
    }
    let oids: Vec<u32> =
        recorded.iter().flat_map(|(_, s)| std::iter::once(s.oid).chain(s.joined.iter().map(|j| j.oid))).collect();
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
        for j in &was.joined {
            // Its heap's file node aside (see `Shape::joined`).
            let now = now.get(&j.oid).map(|n| Shape { filenode: j.filenode, ..n.clone() });
            if let Some(what) = difference(j, now.as_ref()) {
                return Ok(Some((id.clone(), format!("joined table: {what}"))));
            }
        }
        let Some(now) = now.get(&was.oid) else { continue };
        let new: Vec<u32> = now.leaves.iter().map(|l| l.0).filter(|o| !was.leaves.iter().any(|w| w.0 == *o)).collect();
        if new.is_empty() {
            continue;
        }
        for oid in new {
            let name: String = blue
                .query_one(
                    "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c \
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
                    &[&oid],
                )
                .await
                .map_err(Error::db("blue: looking at a new partition"))?
                .get(0);
            // A row version written before the partition joined the tree (its pg_inherits row,
            // or an ancestor's) was never published: the table was attached holding rows.
            // Versions written since were captured as the partitioned table's. A frozen xmin
            // counts as old, and so does a row of the attaching transaction itself (it may
            // have been written before the ATTACH in it).
            let old_rows: bool = blue
                .query_one(
                    &format!(
                        "SELECT EXISTS (SELECT 1 FROM ONLY {name} r WHERE age(r.xmin) >= \
                           (SELECT min(age(i.xmin)) FROM pg_catalog.pg_inherits i \
                             WHERE i.inhrelid = $1 OR i.inhrelid IN (SELECT relid FROM pg_catalog.pg_partition_ancestors($1::oid::regclass))))"
                    ),
                    &[&oid],
                )
                .await
                .map_err(Error::db(format!("blue: looking at new partition {name}")))?
                .get(0);
            if old_rows {
                return Ok(Some((
                    id.clone(),
                    format!(
                        "partition {name} of {}.{} was attached on blue holding rows written before it joined: \
                         no change carried them",
                        was.schema, was.name
                    ),
                )));
            }
        }
        accepted.push((id.clone(), Shape { joined: was.joined.clone(), ..now.clone() }));
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
    if let Some((oid, _)) = was.leaves.iter().find(|(o, _)| !now.leaves.iter().any(|(n, _)| n == o)) {
        return Some(format!(
            "partition {oid} (OID) of {table} was detached or dropped on blue: its rows left {table} without a \
             row change to capture"
        ));
    }
    if let Some((oid, _)) = was.leaves.iter().find(|w| now.leaves.iter().any(|n| n.0 == w.0 && n.1 != w.1)) {
        return Some(format!(
            "partition {oid} (OID) of {table} was truncated or rewritten on blue: its rows changed without a row \
             change to capture"
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
            leaves: vec![(100, 1000), (101, 1001)],
            joined: Vec::new(),
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
        let detached = Shape { leaves: vec![(100, 1000)], ..shape() };
        assert!(difference(&was, Some(&detached)).unwrap().contains("partition 101 (OID) of public.t was detached"));
        let truncated = Shape { leaves: vec![(100, 1000), (101, 1002)], ..shape() };
        assert!(difference(&was, Some(&truncated)).unwrap().contains("truncated or rewritten"));
        let added = Shape { leaves: vec![(100, 1000), (101, 1001), (102, 1003)], ..shape() };
        assert_eq!(difference(&was, Some(&added)), None, "a new partition is judged by its rows, on blue");
    }
}
