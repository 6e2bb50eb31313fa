//! Finished spans, encoded as OTLP and shipped over NATS in batches.
//!
//! Both the worker SDK (its CONSUMER `process` span per task) and the commander (its PRODUCER
//! `send` span per dispatch) record spans here. They are published as OTLP protobuf
//! `ExportTraceServiceRequest`s on `<prefix>.telemetry.<pool>.<worker>` with
//! `Fleet-Kind: otlp-traces`, which is what the commander's telemetry ingest reads and what
//! any OTLP tooling can decode. Telemetry is the first thing shed under pressure: the queue
//! is bounded and what does not fit is counted, never blocks the task path.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::protocol::{headers, kinds};
use crate::trace::{SpanId, TraceId};

/// OTLP span kinds we emit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Internal,
    Producer,
    Consumer,
    Client,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
}

impl From<&str> for AttrValue {
    fn from(v: &str) -> Self {
        AttrValue::Str(v.to_string())
    }
}
impl From<String> for AttrValue {
    fn from(v: String) -> Self {
        AttrValue::Str(v)
    }
}
impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        AttrValue::Int(v)
    }
}
impl From<u32> for AttrValue {
    fn from(v: u32) -> Self {
        AttrValue::Int(i64::from(v))
    }
}
impl From<f64> for AttrValue {
    fn from(v: f64) -> Self {
        AttrValue::Double(v)
    }
}
impl From<bool> for AttrValue {
    fn from(v: bool) -> Self {
        AttrValue::Bool(v)
    }
}

/// A finished (or finishing) span.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub name: String,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(String, AttrValue)>,
    /// `Some(message)` marks the span as failed.
    pub error: Option<String>,
}

impl SpanRecord {
    pub fn new(
        name: impl Into<String>,
        kind: SpanKind,
        trace_id: TraceId,
        span_id: SpanId,
    ) -> Self {
        let now = SystemTime::now();
        Self {
            trace_id,
            span_id,
            parent_span_id: None,
            name: name.into(),
            kind,
            start: now,
            end: now,
            attributes: Vec::new(),
            error: None,
        }
    }

    pub fn attr(&mut self, key: &str, value: impl Into<AttrValue>) -> &mut Self {
        self.attributes.push((key.to_string(), value.into()));
        self
    }

    pub fn finish(&mut self) {
        self.end = SystemTime::now();
    }

    /// The span as OTLP, moving its strings rather than copying them: the exporter owns
    /// each record once it is queued.
    fn into_proto(self) -> Span {
        Span {
            trace_id: self.trace_id.0.to_vec(),
            span_id: self.span_id.0.to_vec(),
            parent_span_id: self
                .parent_span_id
                .map(|p| p.0.to_vec())
                .unwrap_or_default(),
            kind: match self.kind {
                SpanKind::Internal => span::SpanKind::Internal,
                SpanKind::Producer => span::SpanKind::Producer,
                SpanKind::Consumer => span::SpanKind::Consumer,
                SpanKind::Client => span::SpanKind::Client,
            } as i32,
            start_time_unix_nano: unix_nanos(self.start),
            end_time_unix_nano: unix_nanos(self.end),
            name: self.name,
            attributes: self.attributes.into_iter().map(|(k, v)| kv(k, v)).collect(),
            status: Some(match self.error {
                None => Status {
                    code: status::StatusCode::Ok as i32,
                    message: String::new(),
                },
                Some(m) => Status {
                    code: status::StatusCode::Error as i32,
                    message: m,
                },
            }),
            ..Default::default()
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn kv(key: String, value: AttrValue) -> KeyValue {
    let value = match value {
        AttrValue::Str(s) => any_value::Value::StringValue(s),
        AttrValue::Int(i) => any_value::Value::IntValue(i),
        AttrValue::Double(d) => any_value::Value::DoubleValue(d),
        AttrValue::Bool(b) => any_value::Value::BoolValue(b),
    };
    KeyValue {
        key,
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// Encodes spans as one OTLP `ExportTraceServiceRequest` under the given resource.
pub fn encode_otlp(resource: &[(String, AttrValue)], spans: &[SpanRecord]) -> Vec<u8> {
    encode_owned(resource, spans.iter().cloned())
}

/// [`encode_otlp`] of spans the caller gives up (the exporter's batch, drained).
fn encode_owned(
    resource: &[(String, AttrValue)],
    spans: impl Iterator<Item = SpanRecord>,
) -> Vec<u8> {
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: resource
                    .iter()
                    .map(|(k, v)| kv(k.clone(), v.clone()))
                    .collect(),
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "fleet-worker".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans: spans.map(SpanRecord::into_proto).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    };
    req.encode_to_vec()
}

/// Counters of the exporter, readable at any time.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Spans accepted into the queue.
    pub queued: AtomicU64,
    /// Spans published.
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full (telemetry is shed first).
    pub dropped: AtomicU64,
    /// Batches that failed to publish.
    pub failed_batches: AtomicU64,
}

/// Batches spans and publishes them over core NATS. Cloneable; dropping every clone and
/// calling [`SpanExporter::shutdown`] flushes what is queued.
#[derive(Clone, Debug)]
pub struct SpanExporter {
    tx: mpsc::Sender<SpanRecord>,
    stats: Arc<ExportStats>,
}

/// Exporter limits.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// Spans held before new ones are dropped.
    pub queue_capacity: usize,
    /// Spans per published batch.
    pub max_batch: usize,
    /// A partial batch is published after this long.
    pub flush_interval: Duration,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 8192,
            max_batch: 512,
            flush_interval: Duration::from_millis(200),
        }
    }
}

impl SpanExporter {
    /// Starts the exporter task publishing to `subject` with the given resource attributes.
    pub fn start(
        client: async_nats::Client,
        subject: String,
        resource: Vec<(String, AttrValue)>,
        config: ExportConfig,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let stats = Arc::new(ExportStats::default());
        let task = tokio::spawn(run_exporter(
            client,
            subject,
            resource,
            config,
            rx,
            stats.clone(),
        ));
        (Self { tx, stats }, task)
    }

    /// Queues a span; never waits. A full queue drops the span and counts it.
    pub fn record(&self, span: SpanRecord) {
        match self.tx.try_send(span) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn stats(&self) -> &ExportStats {
        &self.stats
    }
}

async fn run_exporter(
    client: async_nats::Client,
    subject: String,
    resource: Vec<(String, AttrValue)>,
    config: ExportConfig,
    mut rx: mpsc::Receiver<SpanRecord>,
    stats: Arc<ExportStats>,
) {
    let mut batch = Vec::with_capacity(config.max_batch);
    let mut tick = tokio::time::interval(config.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            got = rx.recv() => match got {
                Some(span) => {
                    batch.push(span);
                    if batch.len() >= config.max_batch {
                        publish_batch(&client, &subject, &resource, &mut batch, &stats).await;
                    }
                }
                None => {
                    // Every sender is gone: flush what is left and stop.
                    if !batch.is_empty() {
                        publish_batch(&client, &subject, &resource, &mut batch, &stats).await;
                    }
                    let _ = client.flush().await;
                    return;
                }
            },
            _ = tick.tick() => {
                if !batch.is_empty() {
                    publish_batch(&client, &subject, &resource, &mut batch, &stats).await;
                }
            }
        }
    }
}

async fn publish_batch(
    client: &async_nats::Client,
    subject: &str,
    resource: &[(String, AttrValue)],
    batch: &mut Vec<SpanRecord>,
    stats: &ExportStats,
) {
    let n = batch.len() as u64;
    let payload = Bytes::from(encode_owned(resource, batch.drain(..)));
    let mut headers = HeaderMap::new();
    headers.insert(headers::KIND, kinds::OTLP_TRACES);
    headers.insert(headers::CONTENT_TYPE, "application/x-protobuf");
    match client
        .publish_with_headers(subject.to_string(), headers, payload)
        .await
    {
        Ok(()) => {
            stats.exported.fetch_add(n, Ordering::Relaxed);
        }
        Err(e) => {
            stats.failed_batches.fetch_add(1, Ordering::Relaxed);
            stats.dropped.fetch_add(n, Ordering::Relaxed);
            tracing::warn!(error = %e, spans = n, "span batch not published");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_ids_parent_kind_and_attributes() {
        let trace = TraceId::random();
        let mut s = SpanRecord::new(
            "process fleet.work.code",
            SpanKind::Consumer,
            trace,
            SpanId::random(),
        );
        let parent = SpanId::random();
        s.parent_span_id = Some(parent);
        s.attr("messaging.system", "nats")
            .attr("fleet.attempt", 1u32);
        s.error = Some("boom".into());
        let bytes = encode_otlp(&[("service.name".into(), "w".into())], &[s]);
        let req = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        let span = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.trace_id, trace.0.to_vec());
        assert_eq!(span.parent_span_id, parent.0.to_vec());
        assert_eq!(span.kind, span::SpanKind::Consumer as i32);
        assert_eq!(span.attributes.len(), 2);
        assert_eq!(
            span.status.as_ref().unwrap().code,
            status::StatusCode::Error as i32
        );
    }
}
