//! A plan entry's stable identity in state.

use serde::Serialize;

use crate::pg::QualifiedName;

/// A plan entry's identity in state (pending and touched keys, chunks, table states, capture
/// triggers): its target table, plus its source when several entries write that target (and a
/// hash of its filter when they also share the source). Never its position in the file, so
/// reordering `[[table]]` entries can never send keys to the wrong table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TableId(String);

impl TableId {
    /// Ids for entries `(source, target, filter)`, in the same order.
    pub fn assign<'a>(
        entries: impl IntoIterator<Item = (&'a QualifiedName, &'a QualifiedName, Option<&'a str>)>,
    ) -> Vec<TableId> {
        let entries: Vec<_> = entries.into_iter().collect();
        let writing = |target: &QualifiedName| entries.iter().filter(|e| e.1 == target).count();
        let from = |target: &QualifiedName, source: &QualifiedName| {
            entries.iter().filter(|e| e.1 == target && e.0 == source).count()
        };
        entries
            .iter()
            .map(|&(source, target, filter)| {
                if writing(target) == 1 {
                    TableId(target.to_string())
                } else if from(target, source) == 1 {
                    TableId(format!("{target}<-{source}"))
                } else {
                    TableId(format!("{target}<-{source}?{}", &stable_hash(filter.unwrap_or(""))[..8]))
                }
            })
            .collect()
    }

    /// An id as stored in state.
    pub fn from_stored(id: String) -> TableId {
        TableId(id)
    }

    /// The id's text, as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A short name derived from the id alone, for objects whose names are length-limited
    /// (trigger functions on blue).
    pub fn short(&self) -> String {
        short_name(&self.0)
    }
}

impl std::fmt::Display for TableId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A 12-character name derived from `text` alone, for objects on blue whose names are
/// length-limited (trigger functions named by their source table).
pub fn short_name(text: &str) -> String {
    stable_hash(text)[..12].to_string()
}

/// FNV-1a, 64 bits, as hex: stable across builds and Rust versions (std's hasher is not
/// promised to be), because names made from it are stored on blue.
fn stable_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> QualifiedName {
        let (schema, name) = s.split_once('.').unwrap();
        QualifiedName { schema: schema.into(), name: name.into() }
    }

    #[test]
    fn ids_do_not_depend_on_position() {
        let (a, b, c, t) = (q("public.a"), q("public.b"), q("public.c"), q("public.t"));
        let forward = TableId::assign([(&a, &t, Some("x > 0")), (&b, &q("public.u"), None), (&a, &t, Some("x <= 0"))]);
        let reversed = TableId::assign([(&a, &t, Some("x <= 0")), (&b, &q("public.u"), None), (&a, &t, Some("x > 0"))]);
        assert_eq!(forward[0], reversed[2]);
        assert_eq!(forward[2], reversed[0]);
        assert_eq!(forward[1].as_str(), "public.u", "a target written by one entry is known by its name");
        assert_ne!(forward[0], forward[2]);
        let shared = TableId::assign([(&a, &t, None), (&c, &t, None)]);
        assert_eq!(shared[0].as_str(), "public.t<-public.a");
        assert_eq!(shared[0].short().len(), 12);
        assert_ne!(shared[0].short(), shared[1].short());
    }
}
