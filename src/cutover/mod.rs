//! Stage 5: cutover through PgBouncer.

pub mod databases_file;
