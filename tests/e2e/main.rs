//! End-to-end tests: a real nats-server per test, the real `commander` binary, real
//! workers. One test binary so it links once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code: a failed step is a failed test"
)]

mod alerts;
mod bad_input;
mod browser;
mod common;
mod fields;
mod hostile;
mod interop;
mod kill;
mod newuser;
pub mod operator;
mod outage;
mod policy;
mod routing;
mod spine;
mod startup;
mod telemetry;
mod traces;
