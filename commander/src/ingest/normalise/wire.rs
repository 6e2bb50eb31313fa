//! A trace export as the ingest path reads it: a borrowed view of the protobuf body,
//! keeping only what the normaliser reads (resource and span attributes, ids, times,
//! kind, status), every string a `&str` into the body.
//!
//! Why not the generated types: decoding into them allocates and copies every attribute
//! key and string value (an LLM span carries a dozen, and the message content besides),
//! and the normaliser keeps a handful. `Bytes` fields instead of `String` cost a shared
//! reference count per field, which measured slower still. Reading the wire format here
//! costs no allocation per string at all.
//!
//! What is accepted does not change: the whole message is read as prost reads it (every
//! field of the OTLP trace schema type-checked, every string checked for UTF-8, unknown
//! fields and groups skipped, the same recursion limit), down to the fields that are not
//! kept. `tests/fuzz.rs` checks that against prost on mutated bodies.

/// `ExportTraceServiceRequest`, as far as the normaliser reads it.
#[derive(Debug, Default)]
pub struct TraceRequest<'a> {
    pub resource_spans: Vec<ResourceSpans<'a>>,
}

#[derive(Debug, Default)]
pub struct ResourceSpans<'a> {
    /// `resource.attributes` (empty when there is no resource).
    pub resource: Vec<KeyValue<'a>>,
    pub scope_spans: Vec<ScopeSpans<'a>>,
}

#[derive(Debug, Default)]
pub struct ScopeSpans<'a> {
    pub spans: Vec<Span<'a>>,
}

#[derive(Debug, Default)]
pub struct Span<'a> {
    pub trace_id: &'a [u8],
    pub span_id: &'a [u8],
    pub parent_span_id: &'a [u8],
    pub name: &'a str,
    /// `SpanKind`.
    pub kind: i32,
    pub start_time_unix_nano: u64,
    pub end_time_unix_nano: u64,
    pub attributes: Vec<KeyValue<'a>>,
    /// `status.code` (0, unset, when there is no status).
    pub status_code: i32,
}

#[derive(Debug, Default)]
pub struct KeyValue<'a> {
    pub key: &'a str,
    pub value: Option<Value<'a>>,
}

/// An attribute value; arrays, maps and bytes are read (and checked) but not kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
    Other,
}

/// Why a body is not a trace export, with the field where reading stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to decode Protobuf message: {at}: {why}")]
pub struct WireError {
    pub at: &'static str,
    pub why: &'static str,
}

/// prost's default recursion limit: as deep as the generated types nest.
const RECURSION_LIMIT: u32 = 100;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

impl<'a> TraceRequest<'a> {
    /// Reads `body` as prost decodes `ExportTraceServiceRequest`.
    pub fn parse(body: &'a [u8]) -> Result<Self, WireError> {
        let mut req = TraceRequest::default();
        let mut r = Reader::new(body, RECURSION_LIMIT, "ExportTraceServiceRequest");
        while let Some((field, wire)) = r.key()? {
            match field {
                1 => req
                    .resource_spans
                    .push(r.message(wire, "resource_spans", resource_spans)?),
                _ => r.skip(wire, field)?,
            }
        }
        Ok(req)
    }

    /// Spans in the export, valid or not.
    pub fn span_count(&self) -> u64 {
        self.resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len() as u64)
            .sum()
    }
}

/// A message's bytes, read field by field; `depth` is the recursion budget left.
struct Reader<'a> {
    buf: &'a [u8],
    depth: u32,
    /// The message being read, for errors.
    at: &'static str,
}

fn err(at: &'static str, why: &'static str) -> WireError {
    WireError { at, why }
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], depth: u32, at: &'static str) -> Self {
        Self { buf, depth, at }
    }

    fn fail<T>(&self, why: &'static str) -> Result<T, WireError> {
        Err(err(self.at, why))
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let Some((&b, rest)) = self.buf.split_first() else {
                return self.fail("buffer underflow");
            };
            self.buf = rest;
            // The tenth byte may only carry the top bit of 64.
            if i == 9 && b > 1 {
                return self.fail("invalid varint");
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        self.fail("invalid varint")
    }

    /// The next field's number and wire type; `None` at the end of the message.
    fn key(&mut self) -> Result<Option<(u32, u8)>, WireError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let Ok(key) = u32::try_from(key) else {
            return self.fail("invalid key value");
        };
        let wire = (key & 7) as u8;
        if wire > FIXED32 {
            return self.fail("invalid wire type value");
        }
        let field = key >> 3;
        if field == 0 {
            return self.fail("invalid tag value: 0");
        }
        Ok(Some((field, wire)))
    }

    fn expect(&self, wire: u8, want: u8) -> Result<(), WireError> {
        if wire == want {
            Ok(())
        } else {
            self.fail("invalid wire type")
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return self.fail("buffer underflow");
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn len_delimited(&mut self) -> Result<&'a [u8], WireError> {
        let len = self.varint()?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.take(len)
    }

    fn bytes(&mut self, wire: u8) -> Result<&'a [u8], WireError> {
        self.expect(wire, LEN)?;
        self.len_delimited()
    }

    fn string(&mut self, wire: u8) -> Result<&'a str, WireError> {
        let b = self.bytes(wire)?;
        std::str::from_utf8(b)
            .or_else(|_| self.fail("invalid string value: data is not UTF-8 encoded"))
    }

    fn uint(&mut self, wire: u8) -> Result<u64, WireError> {
        self.expect(wire, VARINT)?;
        self.varint()
    }

    fn fixed64(&mut self, wire: u8) -> Result<u64, WireError> {
        self.expect(wire, FIXED64)?;
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn fixed32(&mut self, wire: u8) -> Result<u32, WireError> {
        self.expect(wire, FIXED32)?;
        let b = self.take(4)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        Ok(u32::from_le_bytes(a))
    }

    /// A nested message, read by `read` one recursion level down.
    fn message<T>(
        &mut self,
        wire: u8,
        at: &'static str,
        read: impl FnOnce(&mut Reader<'a>) -> Result<T, WireError>,
    ) -> Result<T, WireError> {
        self.expect(wire, LEN)?;
        if self.depth == 0 {
            return self.fail("recursion limit reached");
        }
        let body = self.len_delimited()?;
        read(&mut Reader::new(body, self.depth - 1, at))
    }

    /// A field the schema does not have, skipped as prost skips it.
    fn skip(&mut self, wire: u8, field: u32) -> Result<(), WireError> {
        // prost skips nothing, not even a varint, once the recursion limit is reached.
        if self.depth == 0 {
            return self.fail("recursion limit reached");
        }
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            FIXED32 => self.take(4).map(drop),
            LEN => self.len_delimited().map(drop),
            START_GROUP => {
                self.depth -= 1;
                loop {
                    let Some((inner, w)) = self.key()? else {
                        return self.fail("buffer underflow");
                    };
                    if w == END_GROUP {
                        if inner != field {
                            return self.fail("unexpected end group tag");
                        }
                        break;
                    }
                    self.skip(w, inner)?;
                }
                self.depth += 1;
                Ok(())
            }
            _ => self.fail("unexpected end group tag"),
        }
    }
}

fn resource_spans<'a>(r: &mut Reader<'a>) -> Result<ResourceSpans<'a>, WireError> {
    let mut rs = ResourceSpans::default();
    while let Some((field, wire)) = r.key()? {
        match field {
            // A repeated occurrence merges into the first, as prost merges it.
            1 => r.message(wire, "Resource", |r| resource(r, &mut rs.resource))?,
            2 => rs
                .scope_spans
                .push(r.message(wire, "ScopeSpans", scope_spans)?),
            3 => {
                r.string(wire)?;
            }
            _ => r.skip(wire, field)?,
        }
    }
    Ok(rs)
}

fn resource<'a>(r: &mut Reader<'a>, attributes: &mut Vec<KeyValue<'a>>) -> Result<(), WireError> {
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => attributes.push(r.message(wire, "KeyValue", key_value)?),
            2 => {
                r.uint(wire)?;
            }
            3 => r.message(wire, "EntityRef", entity_ref)?,
            _ => r.skip(wire, field)?,
        }
    }
    Ok(())
}

fn entity_ref(r: &mut Reader<'_>) -> Result<(), WireError> {
    while let Some((field, wire)) = r.key()? {
        match field {
            1..=4 => {
                r.string(wire)?;
            }
            _ => r.skip(wire, field)?,
        }
    }
    Ok(())
}

fn scope_spans<'a>(r: &mut Reader<'a>) -> Result<ScopeSpans<'a>, WireError> {
    let mut ss = ScopeSpans::default();
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => r.message(wire, "InstrumentationScope", scope)?,
            2 => ss.spans.push(r.message(wire, "Span", span)?),
            3 => {
                r.string(wire)?;
            }
            _ => r.skip(wire, field)?,
        }
    }
    Ok(ss)
}

fn scope(r: &mut Reader<'_>) -> Result<(), WireError> {
    while let Some((field, wire)) = r.key()? {
        match field {
            1 | 2 => {
                r.string(wire)?;
            }
            3 => {
                r.message(wire, "KeyValue", key_value)?;
            }
            4 => {
                r.uint(wire)?;
            }
            _ => r.skip(wire, field)?,
        }
    }
    Ok(())
}

fn span<'a>(r: &mut Reader<'a>) -> Result<Span<'a>, WireError> {
    let mut s = Span::default();
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => s.trace_id = r.bytes(wire)?,
            2 => s.span_id = r.bytes(wire)?,
            3 => {
                r.string(wire)?;
            }
            4 => s.parent_span_id = r.bytes(wire)?,
            5 => s.name = r.string(wire)?,
            // int32 and enumerations keep the low 32 bits, as prost does.
            6 => s.kind = r.uint(wire)? as i32,
            7 => s.start_time_unix_nano = r.fixed64(wire)?,
            8 => s.end_time_unix_nano = r.fixed64(wire)?,
            9 => s.attributes.push(r.message(wire, "KeyValue", key_value)?),
            10 | 12 | 14 => {
                r.uint(wire)?;
            }
            11 => r.message(wire, "Event", event)?,
            13 => r.message(wire, "Link", link)?,
            15 => {
                if let Some(code) = r.message(wire, "Status", status)? {
                    s.status_code = code;
                }
            }
            16 => {
                r.fixed32(wire)?;
            }
            _ => r.skip(wire, field)?,
        }
    }
    Ok(s)
}

fn event(r: &mut Reader<'_>) -> Result<(), WireError> {
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => {
                r.fixed64(wire)?;
            }
            2 => {
                r.string(wire)?;
            }
            3 => {
                r.message(wire, "KeyValue", key_value)?;
            }
            4 => {
                r.uint(wire)?;
            }
            _ => r.skip(wire, field)?,
        }
    }
    Ok(())
}

fn link(r: &mut Reader<'_>) -> Result<(), WireError> {
    while let Some((field, wire)) = r.key()? {
        match field {
            1 | 2 => {
                r.bytes(wire)?;
            }
            3 => {
                r.string(wire)?;
            }
            4 => {
                r.message(wire, "KeyValue", key_value)?;
            }
            5 => {
                r.uint(wire)?;
            }
            6 => {
                r.fixed32(wire)?;
            }
            _ => r.skip(wire, field)?,
        }
    }
    Ok(())
}

/// The status code, if the message sets one (a later status merges into an earlier one).
fn status(r: &mut Reader<'_>) -> Result<Option<i32>, WireError> {
    let mut code = None;
    while let Some((field, wire)) = r.key()? {
        match field {
            2 => {
                r.string(wire)?;
            }
            3 => code = Some(r.uint(wire)? as i32),
            _ => r.skip(wire, field)?,
        }
    }
    Ok(code)
}

fn key_value<'a>(r: &mut Reader<'a>) -> Result<KeyValue<'a>, WireError> {
    let mut kv = KeyValue::default();
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => kv.key = r.string(wire)?,
            2 => {
                // A repeated value merges: a new kind of value replaces the old one.
                if let Some(v) = r.message(wire, "AnyValue", any_value)? {
                    kv.value = Some(v);
                }
            }
            3 => {
                r.uint(wire)?;
            }
            _ => r.skip(wire, field)?,
        }
    }
    Ok(kv)
}

fn any_value<'a>(r: &mut Reader<'a>) -> Result<Option<Value<'a>>, WireError> {
    let mut v = None;
    while let Some((field, wire)) = r.key()? {
        v = Some(match field {
            1 => Value::Str(r.string(wire)?),
            2 => Value::Bool(r.uint(wire)? != 0),
            3 => Value::Int(r.uint(wire)? as i64),
            4 => Value::Double(f64::from_bits(r.fixed64(wire)?)),
            5 => {
                r.message(wire, "ArrayValue", array_value)?;
                Value::Other
            }
            6 => {
                r.message(wire, "KeyValueList", key_value_list)?;
                Value::Other
            }
            7 => {
                r.bytes(wire)?;
                Value::Other
            }
            8 => {
                r.uint(wire)?;
                Value::Other
            }
            _ => {
                r.skip(wire, field)?;
                continue;
            }
        });
    }
    Ok(v)
}

fn array_value(r: &mut Reader<'_>) -> Result<(), WireError> {
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => {
                r.message(wire, "AnyValue", any_value)?;
            }
            _ => r.skip(wire, field)?,
        }
    }
    Ok(())
}

fn key_value_list(r: &mut Reader<'_>) -> Result<(), WireError> {
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => {
                r.message(wire, "KeyValue", key_value)?;
            }
            _ => r.skip(wire, field)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::trace::v1 as trace;
    use prost::Message;

    fn export(span: trace::Span) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![trace::ResourceSpans {
                scope_spans: vec![trace::ScopeSpans {
                    spans: vec![span],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn export_with_event_name(name: &[u8]) -> Vec<u8> {
        let marker = "EVENT_NAME_MARKER";
        let req = export(trace::Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "chat".into(),
            events: vec![trace::span::Event {
                name: marker.into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let mut body = req.encode_to_vec();
        // Same length, so the framing stays valid.
        assert_eq!(name.len(), marker.len());
        let at = body
            .windows(marker.len())
            .position(|w| w == marker.as_bytes())
            .unwrap();
        body[at..at + name.len()].copy_from_slice(name);
        body
    }

    #[test]
    fn a_string_that_is_not_utf8_is_refused_wherever_it_is_as_prost_refuses_it() {
        let good = export_with_event_name(b"another_event_ok!");
        assert!(ExportTraceServiceRequest::decode(good.as_slice()).is_ok());
        assert!(TraceRequest::parse(&good).is_ok());

        // In an event: a field ingest does not keep, read all the same.
        let bad = export_with_event_name(b"\xff\xfe not utf-8 \xc3\x28!!");
        assert!(ExportTraceServiceRequest::decode(bad.as_slice()).is_err());
        let err = TraceRequest::parse(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to decode Protobuf message: Event: invalid string value: data is not UTF-8 encoded"
        );
    }

    #[test]
    fn what_is_kept_borrows_from_the_body() {
        let req = export(trace::Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            parent_span_id: vec![3; 8],
            name: "chat gpt-4o".into(),
            kind: 3,
            start_time_unix_nano: 10,
            end_time_unix_nano: 20,
            status: Some(trace::Status {
                code: 2,
                message: "boom".into(),
            }),
            attributes: vec![
                KeyValue {
                    key: "gen_ai.request.model".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue("gpt-4o".into())),
                    }),
                    ..Default::default()
                },
                KeyValue {
                    key: "n".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::IntValue(-7)),
                    }),
                    ..Default::default()
                },
                KeyValue {
                    key: "list".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::ArrayValue(ArrayValue::default())),
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        let body = req.encode_to_vec();
        let read = TraceRequest::parse(&body).unwrap();
        let span = &read.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.trace_id, &[1; 16][..]);
        assert_eq!(span.parent_span_id, &[3; 8][..]);
        assert_eq!(
            (span.name, span.kind, span.status_code),
            ("chat gpt-4o", 3, 2)
        );
        assert_eq!(
            (span.start_time_unix_nano, span.end_time_unix_nano),
            (10, 20)
        );
        let values: Vec<_> = span
            .attributes
            .iter()
            .map(|kv| (kv.key, kv.value))
            .collect();
        assert_eq!(
            values,
            [
                ("gen_ai.request.model", Some(Value::Str("gpt-4o"))),
                ("n", Some(Value::Int(-7))),
                ("list", Some(Value::Other)),
            ]
        );
        assert!(body.as_ptr_range().contains(&span.name.as_ptr()));
    }

    #[test]
    fn a_wire_type_mismatch_is_an_error_in_both() {
        // Span.kind (field 6) sent length-delimited instead of as a varint.
        let span = [0x32, 0x01, 0x00];
        let scope = [&[0x12, span.len() as u8][..], &span].concat();
        let resource = [&[0x12, scope.len() as u8][..], &scope].concat();
        let body = [&[0x0a, resource.len() as u8][..], &resource].concat();
        assert!(ExportTraceServiceRequest::decode(body.as_slice()).is_err());
        // As docs/telemetry.md quotes it.
        assert_eq!(
            TraceRequest::parse(&body).unwrap_err().to_string(),
            "failed to decode Protobuf message: Span: invalid wire type"
        );
    }

    #[test]
    fn unknown_fields_and_groups_are_skipped_as_prost_skips_them() {
        let mut body = export(trace::Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            ..Default::default()
        })
        .encode_to_vec();
        // Field 9 as a group holding a varint field, then field 10 as fixed32.
        body.extend_from_slice(&[0x4b, 0x08, 0x01, 0x4c, 0x55, 1, 2, 3, 4]);
        assert!(ExportTraceServiceRequest::decode(body.as_slice()).is_ok());
        assert_eq!(TraceRequest::parse(&body).unwrap().resource_spans.len(), 1);
        // An end-group tag that does not match its start.
        body.extend_from_slice(&[0x4b, 0x54]);
        assert!(ExportTraceServiceRequest::decode(body.as_slice()).is_err());
        assert!(TraceRequest::parse(&body).is_err());
    }

    #[test]
    fn nesting_stops_where_prost_stops() {
        let deep = |depth: usize| {
            let mut v = AnyValue {
                value: Some(any_value::Value::IntValue(1)),
            };
            for _ in 0..depth {
                v = AnyValue {
                    value: Some(any_value::Value::ArrayValue(ArrayValue { values: vec![v] })),
                };
            }
            export(trace::Span {
                attributes: vec![KeyValue {
                    key: "deep".into(),
                    value: Some(v),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .encode_to_vec()
        };
        let mut refused = 0;
        let depths = [40, 44, 45, 46, 47, 48, 49, 50, 120];
        for depth in depths {
            let body = deep(depth);
            let prost = ExportTraceServiceRequest::decode(body.as_slice()).is_ok();
            assert_eq!(TraceRequest::parse(&body).is_ok(), prost, "depth {depth}");
            refused += usize::from(!prost);
        }
        // The limit (each array is two levels) is inside the range tried.
        assert!(
            refused > 1 && refused < depths.len() - 1,
            "{refused} refused"
        );
    }
}
