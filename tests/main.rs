//! One integration test binary: clusters are started once and shared by every test module;
//! each test makes (and drops) its own databases.

mod support;

mod capture;
mod control;
mod copy;
mod correctness;
mod crash;
mod cutover;
mod docs;
mod entries;
mod follow;
mod handover;
mod identifiers;
mod joins;
mod plan;
mod rehearse;
mod reverse;
mod rollback;
mod security;
mod shapes;
mod verify;
