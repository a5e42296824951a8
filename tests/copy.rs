//! `migrate copy` against real clusters.
