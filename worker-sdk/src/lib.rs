//! `fleet-worker`: the fleet commander's wire contract, and the Rust [`Worker`] and
//! [`Producer`] that speak it.
//!
//! Any language can join the fleet from `docs/protocol.md` alone; this crate is the
//! reference implementation of that document. The modules:
//!
//! - [`protocol`]: subjects, streams, consumers and header names;
//! - [`message`]: the JSON messages (task, result, heartbeat);
//! - [`control`]: the commands a worker obeys (pause, resume, drain, throttle, cancel);
//! - [`trace`]: W3C `traceparent` / `tracestate` / `baggage`;
//! - [`span`]: spans as OTLP, batched over NATS;
//! - [`telemetry`]: GenAI spans for the LLM and tool calls a handler makes;
//! - [`worker`] and [`producer`].

pub mod control;
pub mod message;
pub mod producer;
pub mod protocol;
pub mod span;
pub mod telemetry;
pub mod trace;
pub mod worker;

pub use message::{ErrorInfo, Heartbeat, ResultStatus, Task, TaskResult, Usage};
pub use producer::{
    Producer, ProducerError, ResultInbox, StoredResult, SubmitOptions, SubmitReceipt,
};
pub use protocol::Subjects;
pub use telemetry::{LlmCall, TaskTelemetry, ToolCall};
pub use trace::{Baggage, SpanId, TraceId, TraceParent};
pub use worker::{
    HandlerResult, TaskContext, TaskFailure, TaskOutput, Worker, WorkerConfig, WorkerHandle,
};
