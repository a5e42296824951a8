//! A decoder for the parts of the pgoutput protocol (version 1) that capture needs: relations,
//! row changes (only the key columns are kept), truncates, and commit positions.
//! Message layouts: PostgreSQL docs, "Logical Replication Message Formats".

use std::collections::HashMap;

/// One decoded message, reduced to what capture acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Start of a transaction.
    Begin {
        /// The position of the transaction's commit record.
        final_lsn: u64,
        /// The transaction's id (32 bits, as pgoutput sends it).
        xid: u32,
    },
    /// End of a transaction; `end_lsn` is where the next one starts.
    Commit {
        /// LSN just past the commit record.
        end_lsn: u64,
    },
    /// A relation's current shape (sent before its first change in each decoding session).
    Relation(Relation),
    /// A changed row: the key columns' text values of the new row and, when the key changed or
    /// the row was deleted, of the old row.
    Change {
        /// Relation OID.
        relid: u32,
        /// Key values of the row after the change (inserts, updates).
        new: Option<Vec<Option<String>>>,
        /// Key values of the row before the change (deletes, key-changing updates).
        old: Option<Vec<Option<String>>>,
    },
    /// TRUNCATE of these relations.
    Truncate {
        /// Relation OIDs.
        relids: Vec<u32>,
    },
    /// Anything else (origin, type, logical message): ignored.
    Other,
}

/// A relation as pgoutput describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    /// OID on blue.
    pub relid: u32,
    /// Schema.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Columns: name and type OID, in attribute order.
    pub columns: Vec<(String, u32)>,
}

/// A malformed message; carries what was being read.
#[derive(Debug, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(pub String);

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| DecodeError(format!("truncated {what}")))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2, what)?.try_into().unwrap_or_default()))
    }
    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4, what)?.try_into().unwrap_or_default()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8, what)?.try_into().unwrap_or_default()))
    }
    fn cstr(&mut self, what: &str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let nul = rest.iter().position(|&b| b == 0).ok_or_else(|| DecodeError(format!("unterminated {what}")))?;
        let s = String::from_utf8_lossy(&rest[..nul]).into_owned();
        self.pos += nul + 1;
        Ok(s)
    }
}

/// A tuple's column values as text (`None` for NULL and for unchanged TOASTed values).
fn tuple(r: &mut Reader<'_>) -> Result<Vec<Option<String>>, DecodeError> {
    let n = r.u16("tuple column count")?;
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        match r.u8("column kind")? {
            b'n' | b'u' => out.push(None),
            b't' | b'b' => {
                let len = r.u32("column length")? as usize;
                out.push(Some(String::from_utf8_lossy(r.take(len, "column value")?).into_owned()));
            }
            k => return Err(DecodeError(format!("unknown column kind {k}"))),
        }
    }
    Ok(out)
}

/// Decodes one message.
pub fn decode(data: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf: data, pos: 0 };
    Ok(match r.u8("message type")? {
        b'B' => {
            let final_lsn = r.u64("final lsn")?;
            r.u64("commit timestamp")?;
            Message::Begin { final_lsn, xid: r.u32("xid")? }
        }
        b'C' => {
            r.u8("commit flags")?;
            r.u64("commit lsn")?;
            Message::Commit { end_lsn: r.u64("end lsn")? }
        }
        b'R' => {
            let relid = r.u32("relation id")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            r.u8("replica identity")?;
            let n = r.u16("column count")?;
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                r.u8("column flags")?;
                let col = r.cstr("column name")?;
                let ty = r.u32("column type")?;
                r.u32("column typmod")?;
                columns.push((col, ty));
            }
            Message::Relation(Relation { relid, namespace, name, columns })
        }
        b'I' => {
            let relid = r.u32("relation id")?;
            r.u8("new tuple marker")?;
            Message::Change { relid, new: Some(tuple(&mut r)?), old: None }
        }
        b'U' => {
            let relid = r.u32("relation id")?;
            let mut old = None;
            let mut marker = r.u8("tuple marker")?;
            if marker == b'K' || marker == b'O' {
                old = Some(tuple(&mut r)?);
                marker = r.u8("new tuple marker")?;
            }
            if marker != b'N' {
                return Err(DecodeError(format!("update without new tuple (marker {marker})")));
            }
            Message::Change { relid, new: Some(tuple(&mut r)?), old }
        }
        b'D' => {
            let relid = r.u32("relation id")?;
            r.u8("old tuple marker")?;
            Message::Change { relid, new: None, old: Some(tuple(&mut r)?) }
        }
        b'T' => {
            let n = r.u32("relation count")?;
            r.u8("truncate options")?;
            let relids = (0..n).map(|_| r.u32("relation id")).collect::<Result<_, _>>()?;
            Message::Truncate { relids }
        }
        _ => Message::Other,
    })
}

/// Picks the key columns out of a tuple, by the relation's column names.
pub fn key_of(rel: &Relation, key_columns: &[String], values: &[Option<String>]) -> Option<Vec<String>> {
    let index: HashMap<&str, usize> = rel.columns.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
    key_columns.iter().map(|k| index.get(k.as_str()).and_then(|&i| values.get(i).cloned().flatten())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    fn tuple_bytes(out: &mut Vec<u8>, cols: &[Option<&str>]) {
        out.extend_from_slice(&(cols.len() as u16).to_be_bytes());
        for c in cols {
            match c {
                None => out.push(b'n'),
                Some(v) => {
                    out.push(b't');
                    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    out.extend_from_slice(v.as_bytes());
                }
            }
        }
    }

    fn relation() -> Relation {
        Relation {
            relid: 7,
            namespace: "public".into(),
            name: "t".into(),
            columns: vec![("id".into(), 23), ("v".into(), 25)],
        }
    }

    #[test]
    fn decodes_relation_and_changes() {
        let mut m = vec![b'R'];
        m.extend_from_slice(&7u32.to_be_bytes());
        cstr(&mut m, "public");
        cstr(&mut m, "t");
        m.push(b'd');
        m.extend_from_slice(&2u16.to_be_bytes());
        for (name, ty) in [("id", 23u32), ("v", 25)] {
            m.push(1);
            cstr(&mut m, name);
            m.extend_from_slice(&ty.to_be_bytes());
            m.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        assert_eq!(decode(&m).unwrap(), Message::Relation(relation()));

        let mut u = vec![b'U'];
        u.extend_from_slice(&7u32.to_be_bytes());
        u.push(b'K');
        tuple_bytes(&mut u, &[Some("1"), None]);
        u.push(b'N');
        tuple_bytes(&mut u, &[Some("2"), Some("x")]);
        let Message::Change { relid, new, old } = decode(&u).unwrap() else { panic!("not a change") };
        assert_eq!(relid, 7);
        let keys = ["id".to_string()];
        assert_eq!(key_of(&relation(), &keys, &new.unwrap()), Some(vec!["2".to_string()]));
        assert_eq!(key_of(&relation(), &keys, &old.unwrap()), Some(vec!["1".to_string()]));

        let mut c = vec![b'C', 0];
        c.extend_from_slice(&5u64.to_be_bytes());
        c.extend_from_slice(&9u64.to_be_bytes());
        c.extend_from_slice(&0u64.to_be_bytes());
        assert_eq!(decode(&c).unwrap(), Message::Commit { end_lsn: 9 });

        let mut t = vec![b'T'];
        t.extend_from_slice(&1u32.to_be_bytes());
        t.push(0);
        t.extend_from_slice(&7u32.to_be_bytes());
        assert_eq!(decode(&t).unwrap(), Message::Truncate { relids: vec![7] });
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        for data in [&b""[..], b"U", b"U\0\0\0\x07N\0\x02t", b"R\0\0\0\x07pub"] {
            assert!(decode(data).is_err(), "{data:?}");
        }
    }
}
