//! PgBouncer, as cutover and the demo drive it: the admin console (PAUSE with a deadline, RESUME,
//! RELOAD, settings) and the `%include`d databases file whose one line a switch rewrites.

mod admin;
pub mod databases_file;

pub use admin::{plain_name, Bouncer, Entry, Paused};
