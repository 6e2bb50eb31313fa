//! fleet commander: runs fleets of LLM agent workers over NATS.
//!
//! See ARCHITECTURE.md for the map. The binary (`main.rs`, `cli.rs`) is thin; `serve`
//! wires the stages together.
//!
//! The library is the commander's insides, not an API for others: its docs are read with
//! `cargo doc --document-private-items -p fleet-commander`, where links to private items
//! resolve.
#![allow(
    rustdoc::private_intra_doc_links,
    reason = "the docs are built with --document-private-items (see above)"
)]

pub mod api;
pub mod broker;
pub mod classify;
pub mod cli;
pub mod config;
pub mod decisions;
pub mod detect;
pub mod domain;
pub mod events;
pub mod fleet;
pub mod hot;
pub mod httpd;
pub mod ingest;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod registry;
pub mod route;
pub mod serve;
pub mod sources;
pub mod store;
pub mod supervise;
pub mod tomlread;
pub mod traces;
