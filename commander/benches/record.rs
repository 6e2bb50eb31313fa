//! The task record's CPU on the task path: what a dispatch writes (a new record, two state
//! changes, encoded) and what a result does to it (decoded, finished, encoded again).
//!
//! `cargo bench -p fleet-commander --bench record` prints criterion's figures. The record
//! has the fields `bench dispatch` gives a dispatched task: pool, model, decision, a trace
//! with a producer's parent span, a budget-free outcome with usage.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark: a failed setup is a failed run"
)]

use std::hint::black_box;
use std::time::Duration;

use criterion::Criterion;
use fleet_commander::store::codec::{decode, encode};
use fleet_commander::store::{TaskRecord, TaskState, TraceInfo};
use fleet_worker::message::{ResultStatus, TaskResult, Timings, Usage, now_rfc3339};

const ID: &str = "bench-8f3a2c71-000000123456";

/// A task as dispatch records it.
fn dispatched() -> TaskRecord {
    let mut r = TaskRecord::new(ID, 123_456);
    r.pool = Some("docs".into());
    r.model = Some("gpt-4o-mini".into());
    r.route_reason = Some("cost_tier: cheapest model of tier simple with room".into());
    r.decision_id = Some("d-bench-8f3a2c71-000000123456-1".into());
    r.decision_at_ms = Some(1_796_472_936_620);
    r.attempt = 1;
    r.trace = Some(TraceInfo {
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        dispatch_span_id: "00f067aa0ba902b7".into(),
        parent_span_id: Some("b7ad6b7169203331".into()),
        invalid_traceparent: None,
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    });
    r.policy_version = Some("3f2a9c".into());
    r.advance(TaskState::Received);
    r.advance(TaskState::Dispatched);
    r
}

fn result() -> TaskResult {
    let mut res = TaskResult::rejected(ID, "x", "x");
    res.status = ResultStatus::Ok;
    res.error = None;
    res.attempt = 1;
    res.worker_id = Some("worker-docs-3".into());
    res.usage = Some(Usage {
        model: Some("gpt-4o-mini".into()),
        input_tokens: 1200,
        output_tokens: 300,
        cost_usd: Some(0.00036),
    });
    res.timings = Timings {
        received_at: Some(now_rfc3339()),
        started_at: Some(now_rfc3339()),
        finished_at: Some(now_rfc3339()),
        duration_ms: Some(12),
    };
    res
}

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    let mut g = c.benchmark_group("task_record");
    g.bench_function("dispatch_build_and_encode", |b| {
        b.iter(|| black_box(encode(&dispatched()).unwrap()))
    });
    let stored = encode(&dispatched()).unwrap();
    let res = result();
    g.bench_function("result_decode_finish_encode", |b| {
        b.iter(|| {
            let mut rec = decode(black_box(&stored)).unwrap();
            rec.finish(&res);
            black_box(encode(&rec).unwrap())
        })
    });
    g.finish();
    c.final_summary();
}
