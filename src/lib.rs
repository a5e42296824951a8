//! bluegreen: move a live PostgreSQL application from a blue database (old schema) to a green one
//! (new schema) with zero downtime. See DESIGN.md for the pipeline:
//! plan → copy → capture → apply → verify → cutover, with state kept on green.

#![warn(missing_docs)]

pub mod apply;
pub mod capture;
pub mod commands;
pub mod control;
pub mod copy;
pub mod cutover;
pub mod error;
pub mod fault;
pub mod follow;
pub mod output;
pub mod pg;
pub mod pgbouncer;
pub mod plan;
pub mod retry;
pub mod sandbox;
pub mod shutdown;
pub mod state;
pub mod verify;
pub mod way_back;

pub use commands::{demo, run, Command, ControlAction, Format, Outcome};
pub use error::{Error, Result};
