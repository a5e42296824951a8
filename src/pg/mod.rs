//! Everything that talks PostgreSQL in general: connections, quoting, catalog queries.

pub mod catalog;
pub mod conn;
pub mod quote;

pub use conn::{ConnError, ConnInfo, Side};
pub use quote::{ident, literal, QualifiedName};
