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
use opentelemetry_proto::tonic::trace::v1::{span, status};
use tokio::sync::{Notify, mpsc};
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
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The OTLP span kind's number.
fn kind_number(kind: SpanKind) -> i32 {
    let kind = match kind {
        SpanKind::Internal => span::SpanKind::Internal,
        SpanKind::Producer => span::SpanKind::Producer,
        SpanKind::Consumer => span::SpanKind::Consumer,
        SpanKind::Client => span::SpanKind::Client,
    };
    kind as i32
}

/// Encodes spans as one OTLP `ExportTraceServiceRequest` under the given resource.
///
/// Written straight from the records, byte for byte what prost writes for the same
/// request built from `opentelemetry-proto`'s types (a test holds the two together): the
/// commander exports a span per dispatch, and building that tree first (a `Vec` per id,
/// a `KeyValue` and `AnyValue` per attribute, all freed again) cost more than the
/// encoding itself. One allocation per batch: the output, sized exactly.
pub fn encode_otlp(resource: &[(String, AttrValue)], spans: &[SpanRecord]) -> Vec<u8> {
    wire::request(resource, spans)
}

/// Protobuf encoding of the OTLP messages the exporter writes. Field numbers and order are
/// `opentelemetry-proto`'s (the order prost writes fields in is their declaration order);
/// proto3 leaves out empty strings and bytes and zero numbers, but not a oneof's value or
/// a message field that is set.
mod wire {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

    use super::{AttrValue, SpanRecord, kind_number, status, unix_nanos};

    /// A length-delimited field of `len` bytes, whole.
    fn delimited_len(tag: u32, len: usize) -> usize {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }

    fn put_head(tag: u32, len: usize, buf: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(len as u64, buf);
    }

    /// A proto3 `string` or `bytes` field: left out when empty.
    fn bytes_len(tag: u32, b: &[u8]) -> usize {
        if b.is_empty() {
            0
        } else {
            delimited_len(tag, b.len())
        }
    }

    fn put_bytes(tag: u32, b: &[u8], buf: &mut Vec<u8>) {
        if !b.is_empty() {
            put_head(tag, b.len(), buf);
            buf.extend_from_slice(b);
        }
    }

    /// A proto3 enum or `uint32`/`int64` field: left out when zero.
    fn varint_len(tag: u32, v: u64) -> usize {
        if v == 0 {
            0
        } else {
            key_len(tag) + encoded_len_varint(v)
        }
    }

    fn put_varint(tag: u32, v: u64, buf: &mut Vec<u8>) {
        if v != 0 {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(v, buf);
        }
    }

    /// A proto3 `fixed64` field: left out when zero.
    fn fixed64_len(tag: u32, v: u64) -> usize {
        if v == 0 { 0 } else { key_len(tag) + 8 }
    }

    fn put_fixed64(tag: u32, v: u64, buf: &mut Vec<u8>) {
        if v != 0 {
            encode_key(tag, WireType::SixtyFourBit, buf);
            buf.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// `AnyValue`: its oneof's value is written whatever it is.
    fn any_value_len(v: &AttrValue) -> usize {
        match v {
            AttrValue::Str(s) => delimited_len(1, s.len()),
            AttrValue::Bool(_) => key_len(2) + 1,
            AttrValue::Int(i) => key_len(3) + encoded_len_varint(*i as u64),
            AttrValue::Double(_) => key_len(4) + 8,
        }
    }

    fn put_any_value(v: &AttrValue, buf: &mut Vec<u8>) {
        match v {
            AttrValue::Str(s) => {
                put_head(1, s.len(), buf);
                buf.extend_from_slice(s.as_bytes());
            }
            AttrValue::Bool(b) => {
                encode_key(2, WireType::Varint, buf);
                buf.push(u8::from(*b));
            }
            AttrValue::Int(i) => {
                encode_key(3, WireType::Varint, buf);
                // int64 is the two's-complement bits as a varint (ten bytes when negative).
                encode_varint(*i as u64, buf);
            }
            AttrValue::Double(d) => {
                encode_key(4, WireType::SixtyFourBit, buf);
                buf.extend_from_slice(&d.to_le_bytes());
            }
        }
    }

    /// `KeyValue { key = 1, value = 2 }`.
    fn key_value_len(k: &str, v: &AttrValue) -> usize {
        bytes_len(1, k.as_bytes()) + delimited_len(2, any_value_len(v))
    }

    fn put_key_value(tag: u32, k: &str, v: &AttrValue, buf: &mut Vec<u8>) {
        put_head(tag, key_value_len(k, v), buf);
        put_bytes(1, k.as_bytes(), buf);
        put_head(2, any_value_len(v), buf);
        put_any_value(v, buf);
    }

    fn attributes_len(tag: u32, attrs: &[(String, AttrValue)]) -> usize {
        attrs
            .iter()
            .map(|(k, v)| delimited_len(tag, key_value_len(k, v)))
            .sum()
    }

    /// `Status { message = 2, code = 3 }`: `Ok`, or `Error` with the message.
    fn status_of(s: &SpanRecord) -> (&[u8], u64) {
        match &s.error {
            None => (&[], status::StatusCode::Ok as u64),
            Some(m) => (m.as_bytes(), status::StatusCode::Error as u64),
        }
    }

    fn status_len(s: &SpanRecord) -> usize {
        let (message, code) = status_of(s);
        bytes_len(2, message) + varint_len(3, code)
    }

    /// `Span`, fields in prost's order: trace id, span id, parent, name, kind, start, end,
    /// attributes, status.
    fn span_len(s: &SpanRecord) -> usize {
        bytes_len(1, &s.trace_id.0)
            + bytes_len(2, &s.span_id.0)
            + s.parent_span_id.map_or(0, |p| bytes_len(4, &p.0))
            + bytes_len(5, s.name.as_bytes())
            + varint_len(6, kind_number(s.kind) as u64)
            + fixed64_len(7, unix_nanos(s.start))
            + fixed64_len(8, unix_nanos(s.end))
            + attributes_len(9, &s.attributes)
            + delimited_len(15, status_len(s))
    }

    fn put_span(s: &SpanRecord, len: usize, buf: &mut Vec<u8>) {
        put_head(2, len, buf);
        put_bytes(1, &s.trace_id.0, buf);
        put_bytes(2, &s.span_id.0, buf);
        if let Some(p) = s.parent_span_id {
            put_bytes(4, &p.0, buf);
        }
        put_bytes(5, s.name.as_bytes(), buf);
        put_varint(6, kind_number(s.kind) as u64, buf);
        put_fixed64(7, unix_nanos(s.start), buf);
        put_fixed64(8, unix_nanos(s.end), buf);
        for (k, v) in &s.attributes {
            put_key_value(9, k, v, buf);
        }
        put_head(15, status_len(s), buf);
        let (message, code) = status_of(s);
        put_bytes(2, message, buf);
        put_varint(3, code, buf);
    }

    /// `InstrumentationScope { name = 1, version = 2 }`.
    const SCOPE_NAME: &str = "fleet-worker";
    const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");

    fn scope_len() -> usize {
        bytes_len(1, SCOPE_NAME.as_bytes()) + bytes_len(2, SCOPE_VERSION.as_bytes())
    }

    /// `ExportTraceServiceRequest { resource_spans = 1 }` with one `ResourceSpans {
    /// resource = 1, scope_spans = 2 }`, which holds one `ScopeSpans { scope = 1, spans = 2
    /// }`.
    pub(super) fn request(resource: &[(String, AttrValue)], spans: &[SpanRecord]) -> Vec<u8> {
        let span_lens: Vec<usize> = spans.iter().map(span_len).collect();
        let scope_spans_len = delimited_len(1, scope_len())
            + span_lens
                .iter()
                .map(|&l| delimited_len(2, l))
                .sum::<usize>();
        let resource_len = attributes_len(1, resource);
        let resource_spans_len = delimited_len(1, resource_len) + delimited_len(2, scope_spans_len);
        let total = delimited_len(1, resource_spans_len);
        let mut buf = Vec::with_capacity(total);
        put_head(1, resource_spans_len, &mut buf);
        put_head(1, resource_len, &mut buf);
        for (k, v) in resource {
            put_key_value(1, k, v, &mut buf);
        }
        put_head(2, scope_spans_len, &mut buf);
        put_head(1, scope_len(), &mut buf);
        put_bytes(1, SCOPE_NAME.as_bytes(), &mut buf);
        put_bytes(2, SCOPE_VERSION.as_bytes(), &mut buf);
        for (s, &len) in spans.iter().zip(&span_lens) {
            put_span(s, len, &mut buf);
        }
        debug_assert_eq!(
            buf.len(),
            total,
            "the lengths worked out are the bytes written"
        );
        buf
    }
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

/// Batches spans and publishes them over core NATS. Cloneable. The exporter stops, after
/// publishing what is queued, when [`SpanExporter::shutdown`] is called on any clone or
/// when every clone is gone; spans recorded after that are dropped and counted.
#[derive(Clone, Debug)]
pub struct SpanExporter {
    tx: mpsc::Sender<SpanRecord>,
    stats: Arc<ExportStats>,
    // A clone kept by a long-lived holder (a handler's background task, a hook) would keep
    // the exporter running for good if only the last drop stopped it.
    stop: Arc<Notify>,
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

/// Sees every batch an exporter publishes, as the OTLP protobuf export it publishes and
/// the number of spans in it, just before it is published (whether or not the publish
/// then succeeds). Called on the exporter's task: it must not block.
pub type ExportTap = Box<dyn Fn(&Bytes, u64) + Send + Sync>;

/// Where the exporter's batches go.
struct Sink {
    client: async_nats::Client,
    subject: String,
    resource: Vec<(String, AttrValue)>,
    tap: Option<ExportTap>,
}

impl SpanExporter {
    /// Starts the exporter task publishing to `subject` with the given resource attributes.
    pub fn start(
        client: async_nats::Client,
        subject: String,
        resource: Vec<(String, AttrValue)>,
        config: ExportConfig,
    ) -> (Self, JoinHandle<()>) {
        Self::start_tapped(client, subject, resource, config, None)
    }

    /// [`SpanExporter::start`], with every batch also handed to `tap` (the commander keeps
    /// its own spans beside the traces they belong to this way, without reading them back
    /// from NATS).
    pub fn start_tapped(
        client: async_nats::Client,
        subject: String,
        resource: Vec<(String, AttrValue)>,
        config: ExportConfig,
        tap: Option<ExportTap>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let stats = Arc::new(ExportStats::default());
        let stop = Arc::new(Notify::new());
        let sink = Sink {
            client,
            subject,
            resource,
            tap,
        };
        let task = tokio::spawn(run_exporter(
            sink,
            config,
            (rx, stop.clone()),
            stats.clone(),
        ));
        (Self { tx, stats, stop }, task)
    }

    /// Publishes what is queued, flushes the connection and stops the exporter (its task
    /// handle then completes), whatever clones are still held.
    pub fn shutdown(&self) {
        // notify_one keeps the wake-up if the exporter is busy publishing right now.
        self.stop.notify_one();
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
    sink: Sink,
    config: ExportConfig,
    (mut rx, stop): (mpsc::Receiver<SpanRecord>, Arc<Notify>),
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
                        publish_batch(&sink, &mut batch, &stats).await;
                    }
                }
                // Every sender is gone.
                None => break,
            },
            _ = tick.tick() => {
                if !batch.is_empty() {
                    publish_batch(&sink, &mut batch, &stats).await;
                }
            }
            () = stop.notified() => {
                // Closed, the channel still hands out what was queued, then None.
                rx.close();
                break;
            }
        }
    }
    while let Some(span) = rx.recv().await {
        batch.push(span);
        if batch.len() >= config.max_batch {
            publish_batch(&sink, &mut batch, &stats).await;
        }
    }
    if !batch.is_empty() {
        publish_batch(&sink, &mut batch, &stats).await;
    }
    let _ = sink.client.flush().await;
}

async fn publish_batch(sink: &Sink, batch: &mut Vec<SpanRecord>, stats: &ExportStats) {
    let n = batch.len() as u64;
    let payload = Bytes::from(encode_otlp(&sink.resource, batch));
    batch.clear();
    if let Some(tap) = &sink.tap {
        tap(&payload, n);
    }
    let mut headers = HeaderMap::new();
    headers.insert(headers::KIND, kinds::OTLP_TRACES);
    headers.insert(headers::CONTENT_TYPE, "application/x-protobuf");
    match sink
        .client
        .publish_with_headers(sink.subject.clone(), headers, payload)
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
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{
        AnyValue, InstrumentationScope, KeyValue, any_value,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
    use prost::Message;

    use super::*;

    /// The request built from `opentelemetry-proto`'s types and encoded by prost: what
    /// [`encode_otlp`] wrote until December 2026, and must still write, byte for byte.
    fn via_prost(resource: &[(String, AttrValue)], spans: &[SpanRecord]) -> Vec<u8> {
        fn kv(key: &str, value: &AttrValue) -> KeyValue {
            let value = match value.clone() {
                AttrValue::Str(s) => any_value::Value::StringValue(s),
                AttrValue::Int(i) => any_value::Value::IntValue(i),
                AttrValue::Double(d) => any_value::Value::DoubleValue(d),
                AttrValue::Bool(b) => any_value::Value::BoolValue(b),
            };
            KeyValue {
                key: key.to_string(),
                value: Some(AnyValue { value: Some(value) }),
                ..Default::default()
            }
        }
        let span = |s: &SpanRecord| Span {
            trace_id: s.trace_id.0.to_vec(),
            span_id: s.span_id.0.to_vec(),
            parent_span_id: s.parent_span_id.map(|p| p.0.to_vec()).unwrap_or_default(),
            kind: kind_number(s.kind),
            start_time_unix_nano: unix_nanos(s.start),
            end_time_unix_nano: unix_nanos(s.end),
            name: s.name.clone(),
            attributes: s.attributes.iter().map(|(k, v)| kv(k, v)).collect(),
            status: Some(match &s.error {
                None => Status {
                    code: status::StatusCode::Ok as i32,
                    message: String::new(),
                },
                Some(m) => Status {
                    code: status::StatusCode::Error as i32,
                    message: m.clone(),
                },
            }),
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: resource.iter().map(|(k, v)| kv(k, v)).collect(),
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "fleet-worker".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: spans.iter().map(span).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
        .encode_to_vec()
    }

    /// Spans with every shape of field: each kind, with and without a parent, failed with
    /// and without a message, empty and long strings, negative, zero and large numbers,
    /// times at and before the epoch.
    fn assorted_spans() -> Vec<SpanRecord> {
        let kinds = [
            SpanKind::Internal,
            SpanKind::Producer,
            SpanKind::Consumer,
            SpanKind::Client,
        ];
        let mut out = Vec::new();
        for (n, kind) in kinds.into_iter().enumerate() {
            let mut s = SpanRecord::new(
                if n == 0 {
                    String::new()
                } else {
                    "x".repeat(n * 100)
                },
                kind,
                TraceId([n as u8; 16]),
                SpanId([n as u8 + 1; 8]),
            );
            if n % 2 == 1 {
                s.parent_span_id = Some(SpanId([0xAB; 8]));
            }
            match n {
                0 => {
                    s.start = UNIX_EPOCH;
                    s.end = UNIX_EPOCH - Duration::from_secs(1);
                }
                1 => s.error = Some(String::new()),
                2 => s.error = Some("é boom ✓".into()),
                _ => {}
            }
            s.attr("s", "value")
                .attr("empty", "")
                .attr("", "no key")
                .attr("neg", AttrValue::Int(-1))
                .attr("zero", AttrValue::Int(0))
                .attr("max", AttrValue::Int(i64::MAX))
                .attr("min", AttrValue::Int(i64::MIN))
                .attr("d", 0.25)
                .attr("dz", 0.0)
                .attr("nan", f64::NAN)
                .attr("t", true)
                .attr("f", false)
                .attr("long", "y".repeat(300));
            out.push(s);
        }
        out
    }

    #[test]
    fn the_request_is_what_prost_writes_for_the_same_spans_byte_for_byte() {
        let resource: Vec<(String, AttrValue)> = vec![
            ("service.name".into(), "w".into()),
            ("service.instance.id".into(), AttrValue::Int(7)),
            ("".into(), "".into()),
        ];
        let spans = assorted_spans();
        for n in 0..=spans.len() {
            assert_eq!(
                encode_otlp(&resource, &spans[..n]),
                via_prost(&resource, &spans[..n]),
                "{n} spans"
            );
        }
        assert_eq!(encode_otlp(&[], &spans), via_prost(&[], &spans));
        // And it reads back as the spans it was given.
        let req =
            ExportTraceServiceRequest::decode(encode_otlp(&resource, &spans).as_slice()).unwrap();
        let got = &req.resource_spans[0].scope_spans[0].spans;
        assert_eq!(got.len(), spans.len());
        assert_eq!(got[2].status.as_ref().unwrap().message, "é boom ✓");
        assert_eq!(got[3].attributes.len(), 13);
    }

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
