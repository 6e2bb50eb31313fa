//! What one OTLP request may expand to, checked before it is decoded.
//!
//! A protobuf body of empty messages costs two bytes a message on the wire and a whole
//! struct (80–250 bytes) once decoded: a few megabytes under the size limit decode to
//! hundreds. So every body is walked first, without allocating, along the OTLP schema:
//! it counts the messages (items), the nesting of attribute values and an estimate of the
//! decoded size (each message's struct size, string and byte lengths, packed numbers). A
//! body over any limit is refused with RESOURCE_EXHAUSTED / 413, never decoded. OTLP/JSON
//! gets the same treatment from a structural scan (objects, values, string bytes, depth).
//!
//! The estimate is a lower bound of what prost allocates (a `Vec` may hold spare
//! capacity), which is why the decoded limit sits well under what the machine can afford.

use std::mem::size_of;

use opentelemetry_proto::tonic::common::v1 as common;
use opentelemetry_proto::tonic::logs::v1 as logs;
use opentelemetry_proto::tonic::metrics::v1 as metrics;
use opentelemetry_proto::tonic::resource::v1 as resource;
use opentelemetry_proto::tonic::trace::v1 as trace;

pub use crate::domain::DecodeLimits;

/// Which limit a request broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("request has more than {limit} items (spans, attributes, data points …)")]
    Items { limit: usize },
    #[error("attribute values are nested deeper than {limit} levels")]
    Depth { limit: usize },
    #[error("request would take more than {limit} bytes once decoded")]
    Decoded { limit: usize },
    /// The body is not protobuf at all (truncated, a bad wire type): the decoder would
    /// refuse it too, with the same meaning.
    #[error("{0}")]
    Malformed(String),
}

/// The signal a body carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
    Logs,
}

/// What a checked body will cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub items: usize,
    pub decoded_bytes: usize,
    pub depth: usize,
}

/// OTLP message types, for the walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ty {
    TraceRequest,
    MetricsRequest,
    LogsRequest,
    Resource,
    EntityRef,
    Scope,
    KeyValue,
    AnyValue,
    ArrayValue,
    KeyValueList,
    ResourceSpans,
    ScopeSpans,
    Span,
    Event,
    Link,
    Status,
    ResourceMetrics,
    ScopeMetrics,
    Metric,
    Gauge,
    Sum,
    Histogram,
    ExpHistogram,
    Summary,
    NumberPoint,
    HistogramPoint,
    ExpHistogramPoint,
    Buckets,
    SummaryPoint,
    Quantile,
    Exemplar,
    ResourceLogs,
    ScopeLogs,
    LogRecord,
}

/// What a field holds, as far as memory goes.
#[derive(Clone, Copy, Debug)]
enum Field {
    Msg(Ty),
    /// A string or bytes: its length.
    Bytes,
    /// Packed varints (8 bytes each decoded).
    PackedVarint,
    /// Packed fixed64 / double (8 bytes each).
    Packed64,
    /// A scalar in place, or a field prost skips.
    Other,
}

impl Ty {
    /// The struct a message decodes to (what a `Vec` of them holds per element).
    fn size(self) -> usize {
        match self {
            Ty::TraceRequest | Ty::MetricsRequest | Ty::LogsRequest => 24,
            Ty::Resource => size_of::<resource::Resource>(),
            Ty::EntityRef => size_of::<common::EntityRef>(),
            Ty::Scope => size_of::<common::InstrumentationScope>(),
            Ty::KeyValue => size_of::<common::KeyValue>(),
            // Inside a KeyValue or an ArrayValue's Vec; counted there and here alike.
            Ty::AnyValue => size_of::<common::AnyValue>(),
            Ty::ArrayValue => size_of::<common::ArrayValue>(),
            Ty::KeyValueList => size_of::<common::KeyValueList>(),
            Ty::ResourceSpans => size_of::<trace::ResourceSpans>(),
            Ty::ScopeSpans => size_of::<trace::ScopeSpans>(),
            Ty::Span => size_of::<trace::Span>(),
            Ty::Event => size_of::<trace::span::Event>(),
            Ty::Link => size_of::<trace::span::Link>(),
            Ty::Status => size_of::<trace::Status>(),
            Ty::ResourceMetrics => size_of::<metrics::ResourceMetrics>(),
            Ty::ScopeMetrics => size_of::<metrics::ScopeMetrics>(),
            Ty::Metric => size_of::<metrics::Metric>(),
            Ty::Gauge => size_of::<metrics::Gauge>(),
            Ty::Sum => size_of::<metrics::Sum>(),
            Ty::Histogram => size_of::<metrics::Histogram>(),
            Ty::ExpHistogram => size_of::<metrics::ExponentialHistogram>(),
            Ty::Summary => size_of::<metrics::Summary>(),
            Ty::NumberPoint => size_of::<metrics::NumberDataPoint>(),
            Ty::HistogramPoint => size_of::<metrics::HistogramDataPoint>(),
            Ty::ExpHistogramPoint => size_of::<metrics::ExponentialHistogramDataPoint>(),
            Ty::Buckets => size_of::<metrics::exponential_histogram_data_point::Buckets>(),
            Ty::SummaryPoint => size_of::<metrics::SummaryDataPoint>(),
            Ty::Quantile => size_of::<metrics::summary_data_point::ValueAtQuantile>(),
            Ty::Exemplar => size_of::<metrics::Exemplar>(),
            Ty::ResourceLogs => size_of::<logs::ResourceLogs>(),
            Ty::ScopeLogs => size_of::<logs::ScopeLogs>(),
            Ty::LogRecord => size_of::<logs::LogRecord>(),
        }
    }

    /// Attribute values nest; every other message has a fixed place in the tree.
    fn nests(self) -> bool {
        matches!(self, Ty::ArrayValue | Ty::KeyValueList)
    }

    /// The OTLP schema (opentelemetry-proto v1), field by field.
    fn field(self, n: u64) -> Field {
        use Field::*;
        match (self, n) {
            (Ty::TraceRequest, 1) => Msg(Ty::ResourceSpans),
            (Ty::MetricsRequest, 1) => Msg(Ty::ResourceMetrics),
            (Ty::LogsRequest, 1) => Msg(Ty::ResourceLogs),
            (Ty::Resource, 1) => Msg(Ty::KeyValue),
            (Ty::Resource, 3) => Msg(Ty::EntityRef),
            (Ty::EntityRef, 1..=4) => Bytes,
            (Ty::Scope, 1 | 2) => Bytes,
            (Ty::Scope, 3) => Msg(Ty::KeyValue),
            (Ty::KeyValue, 1) => Bytes,
            (Ty::KeyValue, 2) => Msg(Ty::AnyValue),
            (Ty::AnyValue, 1 | 7) => Bytes,
            (Ty::AnyValue, 5) => Msg(Ty::ArrayValue),
            (Ty::AnyValue, 6) => Msg(Ty::KeyValueList),
            (Ty::ArrayValue, 1) => Msg(Ty::AnyValue),
            (Ty::KeyValueList, 1) => Msg(Ty::KeyValue),
            (Ty::ResourceSpans, 1) => Msg(Ty::Resource),
            (Ty::ResourceSpans, 2) => Msg(Ty::ScopeSpans),
            (Ty::ResourceSpans, 3) => Bytes,
            (Ty::ScopeSpans, 1) => Msg(Ty::Scope),
            (Ty::ScopeSpans, 2) => Msg(Ty::Span),
            (Ty::ScopeSpans, 3) => Bytes,
            (Ty::Span, 1..=5) => Bytes,
            (Ty::Span, 9) => Msg(Ty::KeyValue),
            (Ty::Span, 11) => Msg(Ty::Event),
            (Ty::Span, 13) => Msg(Ty::Link),
            (Ty::Span, 15) => Msg(Ty::Status),
            (Ty::Event, 2) => Bytes,
            (Ty::Event, 3) => Msg(Ty::KeyValue),
            (Ty::Link, 1..=3) => Bytes,
            (Ty::Link, 4) => Msg(Ty::KeyValue),
            (Ty::Status, 2) => Bytes,
            (Ty::ResourceMetrics, 1) => Msg(Ty::Resource),
            (Ty::ResourceMetrics, 2) => Msg(Ty::ScopeMetrics),
            (Ty::ResourceMetrics, 3) => Bytes,
            (Ty::ScopeMetrics, 1) => Msg(Ty::Scope),
            (Ty::ScopeMetrics, 2) => Msg(Ty::Metric),
            (Ty::ScopeMetrics, 3) => Bytes,
            (Ty::Metric, 1..=3) => Bytes,
            (Ty::Metric, 5) => Msg(Ty::Gauge),
            (Ty::Metric, 7) => Msg(Ty::Sum),
            (Ty::Metric, 9) => Msg(Ty::Histogram),
            (Ty::Metric, 10) => Msg(Ty::ExpHistogram),
            (Ty::Metric, 11) => Msg(Ty::Summary),
            (Ty::Metric, 12) => Msg(Ty::KeyValue),
            (Ty::Gauge | Ty::Sum, 1) => Msg(Ty::NumberPoint),
            (Ty::Histogram, 1) => Msg(Ty::HistogramPoint),
            (Ty::ExpHistogram, 1) => Msg(Ty::ExpHistogramPoint),
            (Ty::Summary, 1) => Msg(Ty::SummaryPoint),
            (Ty::NumberPoint, 7) => Msg(Ty::KeyValue),
            (Ty::NumberPoint, 5) => Msg(Ty::Exemplar),
            (Ty::HistogramPoint, 9) => Msg(Ty::KeyValue),
            (Ty::HistogramPoint, 6 | 7) => Packed64,
            (Ty::HistogramPoint, 8) => Msg(Ty::Exemplar),
            (Ty::ExpHistogramPoint, 1) => Msg(Ty::KeyValue),
            (Ty::ExpHistogramPoint, 8 | 9) => Msg(Ty::Buckets),
            (Ty::ExpHistogramPoint, 11) => Msg(Ty::Exemplar),
            (Ty::Buckets, 2) => PackedVarint,
            (Ty::SummaryPoint, 7) => Msg(Ty::KeyValue),
            (Ty::SummaryPoint, 6) => Msg(Ty::Quantile),
            (Ty::Exemplar, 7) => Msg(Ty::KeyValue),
            (Ty::Exemplar, 4 | 5) => Bytes,
            (Ty::ResourceLogs, 1) => Msg(Ty::Resource),
            (Ty::ResourceLogs, 2) => Msg(Ty::ScopeLogs),
            (Ty::ResourceLogs, 3) => Bytes,
            (Ty::ScopeLogs, 1) => Msg(Ty::Scope),
            (Ty::ScopeLogs, 2) => Msg(Ty::LogRecord),
            (Ty::ScopeLogs, 3) => Bytes,
            (Ty::LogRecord, 3 | 9 | 10 | 12) => Bytes,
            (Ty::LogRecord, 5) => Msg(Ty::AnyValue),
            (Ty::LogRecord, 6) => Msg(Ty::KeyValue),
            _ => Other,
        }
    }
}

struct Walk {
    limits: DecodeLimits,
    cost: Cost,
}

impl Walk {
    fn add_item(&mut self, ty: Ty) -> Result<(), LimitError> {
        self.cost.items += 1;
        if self.cost.items > self.limits.max_items {
            return Err(LimitError::Items {
                limit: self.limits.max_items,
            });
        }
        self.add_bytes(ty.size())
    }

    fn add_bytes(&mut self, n: usize) -> Result<(), LimitError> {
        self.cost.decoded_bytes = self.cost.decoded_bytes.saturating_add(n);
        if self.cost.decoded_bytes > self.limits.max_decoded_bytes {
            return Err(LimitError::Decoded {
                limit: self.limits.max_decoded_bytes,
            });
        }
        Ok(())
    }

    /// Walks one message's fields; `depth` counts nested attribute values.
    fn message(&mut self, ty: Ty, mut buf: &[u8], depth: usize) -> Result<(), LimitError> {
        while !buf.is_empty() {
            let key = varint(&mut buf)?;
            let (field, wire) = (key >> 3, key & 7);
            match wire {
                0 => {
                    varint(&mut buf)?;
                }
                1 => buf = skip(buf, 8)?,
                5 => buf = skip(buf, 4)?,
                2 => {
                    let len = usize::try_from(varint(&mut buf)?)
                        .map_err(|_| malformed("length does not fit in memory"))?;
                    let body = buf.get(..len).ok_or_else(|| malformed("truncated field"))?;
                    buf = buf.get(len..).unwrap_or_default();
                    match ty.field(field) {
                        Field::Msg(child) => {
                            let depth = depth + usize::from(child.nests());
                            if depth > self.limits.max_depth {
                                return Err(LimitError::Depth {
                                    limit: self.limits.max_depth,
                                });
                            }
                            self.cost.depth = self.cost.depth.max(depth);
                            self.add_item(child)?;
                            self.message(child, body, depth)?;
                        }
                        Field::Bytes => self.add_bytes(len)?,
                        Field::PackedVarint => {
                            let n = body.iter().filter(|b| **b < 0x80).count();
                            self.add_bytes(n.saturating_mul(8))?;
                        }
                        Field::Packed64 => self.add_bytes(len)?,
                        Field::Other => {}
                    }
                }
                _ => return Err(malformed("unsupported wire type (groups are not OTLP)")),
            }
        }
        Ok(())
    }
}

fn malformed(why: &str) -> LimitError {
    LimitError::Malformed(format!("not a valid protobuf message: {why}"))
}

fn skip(buf: &[u8], n: usize) -> Result<&[u8], LimitError> {
    buf.get(n..).ok_or_else(|| malformed("truncated field"))
}

fn varint(buf: &mut &[u8]) -> Result<u64, LimitError> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let (&b, rest) = buf
            .split_first()
            .ok_or_else(|| malformed("truncated varint"))?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(malformed("varint longer than 10 bytes"))
}

/// Checks a protobuf export request of `signal` against `limits` without decoding it.
pub fn check_protobuf(
    signal: Signal,
    body: &[u8],
    limits: DecodeLimits,
) -> Result<Cost, LimitError> {
    let ty = match signal {
        Signal::Traces => Ty::TraceRequest,
        Signal::Metrics => Ty::MetricsRequest,
        Signal::Logs => Ty::LogsRequest,
    };
    let mut w = Walk {
        limits,
        cost: Cost::default(),
    };
    w.add_item(ty)?;
    w.message(ty, body, 0)?;
    Ok(w.cost)
}

/// Objects in OTLP/JSON cost at most a span's struct each (the largest common message).
fn json_object_cost() -> usize {
    size_of::<trace::Span>()
}

/// Checks an OTLP/JSON body against `limits` with a structural scan: every object is an
/// item costing at most a span's struct, every scalar 8 bytes, every string its length;
/// nesting is bounded at the OTLP tree's own depth plus two levels per nested value.
pub fn check_json(body: &[u8], limits: DecodeLimits) -> Result<Cost, LimitError> {
    // Request → resourceSpans → scopeSpans → spans → attributes → value: about six fixed
    // levels of objects and arrays each; a nested value adds an object and an array.
    let max_depth = 16 + 2 * limits.max_depth;
    let mut w = Walk {
        limits,
        cost: Cost::default(),
    };
    let mut depth = 0usize;
    let mut i = 0usize;
    let mut in_value = false;
    while let Some(&c) = body.get(i) {
        match c {
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(LimitError::Depth {
                        limit: limits.max_depth,
                    });
                }
                w.cost.depth = w.cost.depth.max(depth);
                if c == b'{' {
                    w.cost.items += 1;
                    if w.cost.items > limits.max_items {
                        return Err(LimitError::Items {
                            limit: limits.max_items,
                        });
                    }
                    w.add_bytes(json_object_cost())?;
                }
                in_value = false;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                in_value = false;
            }
            b'"' => {
                // A string: skip to its closing quote, escapes included.
                let start = i;
                i += 1;
                while let Some(&s) = body.get(i) {
                    match s {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                w.add_bytes(i.saturating_sub(start))?;
                in_value = false;
            }
            b' ' | b'\n' | b'\r' | b'\t' | b',' | b':' => in_value = false,
            _ => {
                // The first byte of a number, true, false or null.
                if !in_value {
                    w.add_bytes(8)?;
                    in_value = true;
                }
            }
        }
        i += 1;
    }
    Ok(w.cost)
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;

    use super::*;

    fn limits() -> DecodeLimits {
        DecodeLimits::default()
    }

    /// `{"resourceSpans":[{}, {}, …]}` in protobuf: two bytes a message.
    fn empty_resource_spans(n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 * n);
        for _ in 0..n {
            out.extend_from_slice(&[0x0a, 0x00]);
        }
        out
    }

    #[test]
    fn empty_messages_are_counted_at_their_decoded_size() {
        let body = empty_resource_spans(1000);
        let cost = check_protobuf(Signal::Traces, &body, limits()).unwrap();
        assert_eq!(cost.items, 1001);
        assert!(cost.decoded_bytes >= 1000 * size_of::<trace::ResourceSpans>());
        // And the estimate is what prost really takes for the elements.
        let decoded = ExportTraceServiceRequest::decode(&body[..]).unwrap();
        assert_eq!(decoded.resource_spans.len(), 1000);
    }

    #[test]
    fn the_amplification_body_is_refused_before_decoding() {
        // 8 MB of empty messages: 4 million items, ~400 MB once decoded.
        let body = empty_resource_spans(4_000_000);
        let err = check_protobuf(Signal::Traces, &body, limits()).unwrap_err();
        assert_eq!(err, LimitError::Items { limit: 1_000_000 });
        let small = DecodeLimits {
            max_items: usize::MAX,
            max_decoded_bytes: 1 << 20,
            ..limits()
        };
        assert!(matches!(
            check_protobuf(Signal::Traces, &body, small),
            Err(LimitError::Decoded { .. })
        ));
    }

    fn nested(depth: usize) -> AnyValue {
        let mut v = AnyValue {
            value: Some(any_value::Value::StringValue("x".into())),
        };
        for _ in 0..depth {
            v = AnyValue {
                value: Some(any_value::Value::ArrayValue(ArrayValue { values: vec![v] })),
            };
        }
        v
    }

    fn span_with(value: AnyValue) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        name: "chat".into(),
                        attributes: vec![KeyValue {
                            key: "k".into(),
                            value: Some(value),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn nesting_of_attribute_values_is_bounded() {
        let ok = span_with(nested(16)).encode_to_vec();
        let cost = check_protobuf(Signal::Traces, &ok, limits()).unwrap();
        assert_eq!(cost.depth, 16);
        let deep = span_with(nested(17)).encode_to_vec();
        assert_eq!(
            check_protobuf(Signal::Traces, &deep, limits()).unwrap_err(),
            LimitError::Depth { limit: 16 }
        );
    }

    #[test]
    fn a_real_span_passes_and_counts_its_strings() {
        let body = span_with(AnyValue {
            value: Some(any_value::Value::StringValue("y".repeat(1000))),
        })
        .encode_to_vec();
        let cost = check_protobuf(Signal::Traces, &body, limits()).unwrap();
        // request, resource spans, scope spans, span, key value, any value
        assert_eq!(cost.items, 6);
        assert!(cost.decoded_bytes > 1000);
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for body in [
            &[0x0a, 0xff][..],
            &[0x0a][..],
            &[0xff; 11][..],
            &[0x0b, 0x00][..],
            &[0x0a, 0x05, 0x0a, 0x10][..],
        ] {
            assert!(
                matches!(
                    check_protobuf(Signal::Traces, body, limits()),
                    Err(LimitError::Malformed(_))
                ),
                "{body:?}"
            );
        }
    }

    #[test]
    fn json_scan_counts_objects_and_depth() {
        let mut body = String::from(r#"{"resourceSpans":["#);
        for i in 0..2000 {
            if i > 0 {
                body.push(',');
            }
            body.push_str("{}");
        }
        body.push_str("]}");
        let cost = check_json(body.as_bytes(), limits()).unwrap();
        assert_eq!(cost.items, 2001);
        let tight = DecodeLimits {
            max_items: 100,
            ..limits()
        };
        assert_eq!(
            check_json(body.as_bytes(), tight).unwrap_err(),
            LimitError::Items { limit: 100 }
        );
        let deep = "[".repeat(100);
        assert!(matches!(
            check_json(deep.as_bytes(), limits()),
            Err(LimitError::Depth { .. })
        ));
        // Braces inside strings are text, not structure.
        let s = r#"{"a":"{{{{[[[[\"}}}"}"#;
        assert_eq!(check_json(s.as_bytes(), limits()).unwrap().items, 1);
    }
}
