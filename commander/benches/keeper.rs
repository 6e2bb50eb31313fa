//! What the trace keeper's assembly costs per task run, and what the commander's own
//! dispatch span adds to it: a batch of 512 runs (one worker export of their process
//! spans, as the SDK writes it) assembled and decided, without and with one commander
//! export of their 512 dispatch spans (as the commander's exporter writes them, with the
//! attributes `bench dispatch` gives them).
//!
//! `cargo bench -p fleet-commander --bench keeper` prints criterion's figures; the
//! difference between the two, over 512, is the commander span's cost on the keeper's
//! thread.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark: a failed setup is a failed run"
)]

use std::hint::black_box;
use std::time::Duration;

use criterion::Criterion;
use fleet_commander::ingest::TraceBatch;
use fleet_commander::traces::assemble::{Assembler, Bounds, spans_of};
use fleet_worker::span::{AttrValue, SpanKind, SpanRecord, encode_otlp};
use fleet_worker::trace::{SpanId, TraceId};

const RUNS: u64 = 512;

fn ids(n: u64) -> (TraceId, SpanId, SpanId) {
    let mut t = [0x4b; 16];
    t[8..].copy_from_slice(&n.to_be_bytes());
    (
        TraceId(t),
        SpanId((n << 8 | 1).to_be_bytes()),
        SpanId((n << 8 | 2).to_be_bytes()),
    )
}

fn resource(service: &str) -> Vec<(String, AttrValue)> {
    vec![
        ("service.name".into(), service.into()),
        ("service.instance.id".into(), "bench-1".into()),
    ]
}

/// The commander's dispatch spans of the runs, encoded as its exporter publishes them.
fn dispatch_export() -> bytes::Bytes {
    let spans: Vec<SpanRecord> = (0..RUNS)
        .map(|n| {
            let (trace, dispatch, _) = ids(n);
            let mut s =
                SpanRecord::new("send fleet.work.docs", SpanKind::Producer, trace, dispatch);
            s.attr("messaging.system", "nats")
                .attr("messaging.operation.type", "send")
                .attr("messaging.operation.name", "send")
                .attr("messaging.destination.name", "fleet.work.docs")
                .attr("fleet.task.id", format!("bench-task-{n:012}"))
                .attr("fleet.attempt", 1i64)
                .attr("fleet.pool", "docs")
                .attr("fleet.decision.id", format!("dec-{n:016x}"))
                .attr("fleet.route.rule", "cost_tier")
                .attr("fleet.task.type", "summarisation")
                .attr("fleet.task.tier", "simple")
                .attr("fleet.classification.source", "llm")
                .attr("fleet.decision.candidates", 4i64)
                .attr("gen_ai.request.model", "gpt-4o-mini")
                .attr("fleet.intake.sequence", n as i64)
                .attr("fleet.decision.est_cost_usd", 0.00015)
                .attr("team", "search");
            s
        })
        .collect();
    encode_otlp(&resource("fleet-commander"), &spans).into()
}

/// The worker's process spans of the runs, children of the dispatch spans.
fn run_export() -> bytes::Bytes {
    let spans: Vec<SpanRecord> = (0..RUNS)
        .map(|n| {
            let (trace, dispatch, process) = ids(n);
            let mut s = SpanRecord::new(
                "process fleet.work.docs",
                SpanKind::Consumer,
                trace,
                process,
            );
            s.parent_span_id = Some(dispatch);
            s.attr("messaging.system", "nats")
                .attr("messaging.operation.type", "process")
                .attr("messaging.destination.name", "fleet.work.docs")
                .attr("fleet.task.id", format!("bench-task-{n:012}"))
                .attr("fleet.attempt", 1i64)
                .attr("fleet.pool", "docs")
                .attr("fleet.worker.id", "docs-1")
                .attr("team", "search");
            s
        })
        .collect();
    encode_otlp(&resource("fleet-worker"), &spans).into()
}

fn bounds() -> Bounds {
    Bounds {
        decision_wait_ms: 2_000,
        max_lifetime_ms: 300_000,
        max_bytes: 64 << 20,
        remember: 100_000,
        commander_bytes: 16 << 20,
    }
}

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let runs = run_export();
    let facts = TraceBatch::read(runs.clone()).unwrap().facts;
    let dispatches = dispatch_export();
    let mut g = c.benchmark_group("keeper_assembly_512_runs");
    g.bench_function("worker_spans", |b| {
        b.iter(|| {
            let mut a = Assembler::new(bounds());
            a.add(spans_of(&runs).unwrap(), facts.clone(), 1_000);
            black_box(a.due(10_000).len())
        })
    });
    g.bench_function("worker_and_dispatch_spans", |b| {
        b.iter(|| {
            let mut a = Assembler::new(bounds());
            a.add_commander(spans_of(&dispatches).unwrap(), 1_000);
            a.add(spans_of(&runs).unwrap(), facts.clone(), 1_000);
            black_box(a.due(10_000).len())
        })
    });
    g.finish();
    c.final_summary();
}
