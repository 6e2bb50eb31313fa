//! OTLP attribute values, as the simulated agents and the benchmarks write them.

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, Status, status};

/// A span of a simulated run: its trace, its id and its parent's (none: a root), its name
/// and kind, when it ran (ms), its attributes, and whether it failed.
pub struct SpanOf<'a> {
    pub trace: &'a [u8],
    pub id: u64,
    pub parent: Option<u64>,
    pub name: &'a str,
    pub kind: i32,
    pub start_ms: u64,
    pub end_ms: u64,
    pub attributes: Vec<KeyValue>,
    pub failed: bool,
}

impl SpanOf<'_> {
    pub fn build(self) -> Span {
        Span {
            trace_id: self.trace.to_vec(),
            span_id: self.id.to_be_bytes().to_vec(),
            parent_span_id: self
                .parent
                .map(|p| p.to_be_bytes().to_vec())
                .unwrap_or_default(),
            name: self.name.to_string(),
            kind: self.kind,
            start_time_unix_nano: self.start_ms * 1_000_000,
            end_time_unix_nano: self.end_ms * 1_000_000,
            attributes: self.attributes,
            status: self.failed.then(|| Status {
                code: status::StatusCode::Error as i32,
                message: "failed".into(),
            }),
            ..Default::default()
        }
    }
}

/// A string attribute.
pub fn s(k: &str, v: impl Into<String>) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

/// An integer attribute.
pub fn i(k: &str, v: i64) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(v)),
        }),
        ..Default::default()
    }
}
