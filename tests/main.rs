//! One integration test binary: clusters are started once and shared by every test module;
//! each test makes (and drops) its own databases.

mod support;

mod copy;
mod plan;
