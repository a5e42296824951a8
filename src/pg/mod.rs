//! Everything that talks PostgreSQL in general: connections, quoting, catalog queries, WAL
//! positions.

pub mod catalog;
pub mod conn;
pub mod libpq;
pub mod lsn;
pub mod pool;
pub mod quote;

pub use conn::{ConnError, ConnInfo, Side};
pub use lsn::{commit_point, current_lsn, flush_lsn, insert_lsn, Lsn};
pub use pool::SidePool;
pub use quote::{ident, literal, QualifiedName};
