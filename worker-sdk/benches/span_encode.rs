//! The span exporter's encoding: a batch of 512 spans shaped like the commander's dispatch
//! span (16 attributes and two baggage entries), encoded as one OTLP
//! `ExportTraceServiceRequest`, and the batch dropped, as the exporter does (the batch is
//! cloned outside the timing).
//!
//! `cargo bench -p fleet-worker --bench span_encode` prints criterion's time per batch
//! (divide by 512 for a span) for the exporter's whole work, and for its two parts:
//! encoding alone, and dropping the batch alone.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark: a failed setup is a failed run"
)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput};
use fleet_worker::span::{AttrValue, SpanKind, SpanRecord, encode_otlp};
use fleet_worker::trace::{SpanId, TraceId};

const BATCH: usize = 512;

fn dispatch_span(n: usize) -> SpanRecord {
    let mut s = SpanRecord::new(
        "send fleet.work.code",
        SpanKind::Producer,
        TraceId::random(),
        SpanId::random(),
    );
    s.parent_span_id = Some(SpanId::random());
    s.attr("messaging.system", "nats")
        .attr("messaging.operation.type", "send")
        .attr("messaging.operation.name", "send")
        .attr("messaging.destination.name", "fleet.work.code")
        .attr("fleet.task.id", format!("task-{n:08}"))
        .attr("fleet.attempt", 1u32)
        .attr("fleet.pool", "code")
        .attr("fleet.decision.id", format!("dec-{n:016x}"))
        .attr("fleet.route.rule", "cost_tier")
        .attr("fleet.task.type", "code_review")
        .attr("fleet.task.tier", "standard")
        .attr("fleet.classification.source", "cache")
        .attr("fleet.decision.candidates", 3i64)
        .attr("gen_ai.request.model", "gpt-4o-mini")
        .attr("fleet.intake.sequence", n as i64)
        .attr("fleet.decision.est_cost_usd", 0.00042)
        .attr("team", "search")
        .attr("feature", "summaries");
    s.finish();
    s
}

fn main() {
    let resource: Vec<(String, AttrValue)> = vec![
        ("service.name".into(), "fleet-commander".into()),
        ("service.instance.id".into(), "bench".into()),
        ("service.version".into(), "0.1.0".into()),
    ];
    let spans: Vec<SpanRecord> = (0..BATCH).map(dispatch_span).collect();
    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("span_encode");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("512_dispatch_spans", |b| {
        b.iter_batched(
            || spans.clone(),
            |batch| {
                let out = encode_otlp(black_box(&resource), black_box(&batch));
                drop(batch);
                out
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("512_dispatch_spans_encode_only", |b| {
        b.iter(|| encode_otlp(black_box(&resource), black_box(&spans)))
    });
    g.bench_function("512_dispatch_spans_drop_only", |b| {
        b.iter_batched(|| spans.clone(), drop, BatchSize::SmallInput)
    });
    g.finish();
    c.final_summary();
}
