//! End-to-end tests: a real nats-server per test, the real `commander` binary, real
//! workers. One test binary so it links once.

mod bad_input;
mod common;
mod kill;
mod spine;
mod startup;
