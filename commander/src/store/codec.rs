//! The task record on disk.
//!
//! Format 7 (written now): version byte `7`, then format 6's body (below), then
//! [`Kept`]: the replica that keeps the task's full record (`kept_by`), on the copy a
//! replica keeps of a task another replica ran.
//!
//! Format 6 (written until format 7): version byte `6`, then format 5's body (below), then
//! [`Latest`]: the sequence of the task's dispatch in the work stream (`work_sequence`),
//! which a cancel of a task still waiting for a worker deletes.
//!
//! Format 5 (written until format 6): version byte `5`, then format 4's body (below), then
//! [`Later`]: the turn a throttle gave a task it parked (`deferred.turn`).
//!
//! Format 4 (written until format 5): version byte `4`, then format 3's body (below), then
//! [`Compact`]: the trace and the state history in fewer bytes. A trace whose ids are
//! lowercase hex and whose traceparent is exactly `00-{trace_id}-{dispatch_span_id}-{flags}`
//! (what the commander writes) is kept as the ids' bytes and the flags, not as 119
//! characters of hex; a state change's time that is unix milliseconds in memory (a
//! [`Stamp`]: what the commander stamps, shown as RFC 3339 in milliseconds with `Z`) as that
//! number, not as 24 characters. Anything else is kept as text, exactly: the trace in
//! format 3's body, a time as its string. In
//! format 4 that body's history is always empty. In `bench dispatch` a record the commander
//! writes is about a third smaller than in format 3: 266 bytes for a dispatched task
//! (387 in format 3), 291 for a completed one (430).
//!
//! Format 3 (written until format 4): one version byte (`3`),
//! then the record as [postcard](https://docs.rs/postcard): format 2's body (below),
//! followed by the fields added since, as one more postcard struct (today: the charge a
//! result settled the budget reservation with, `budget.charged_usd`).
//!
//! Format 2 (issue 19): version byte `2`, then the record as postcard: fields in
//! declaration order, integers as varints, strings length-prefixed, `Option` as a one-byte
//! tag. It is about a third of the JSON it replaces and several times cheaper to encode and
//! decode, which matters because every dispatch and every result rewrites the record. It is
//! still read (with no charge).
//!
//! Format 1 (before): the record as JSON, which always starts with `{`. It is still read;
//! the next update of a record in format 1, 2 or 3 writes it in format 4, and records that
//! are never updated again leave through retention as before (`Store::sweep`).
//!
//! postcard is not self-describing, so the serde attributes the JSON API needs
//! (`skip_serializing_if`, which drops a field) cannot be on the types it encodes: the
//! mirrors below have the record's fields in a fixed order and nothing else. Adding a field
//! is a new format byte with the older formats still decoded: format 3's body is format
//! 2's plus [`Added`], format 4's is format 3's plus [`Compact`], format 5's is format 4's
//! plus [`Later`], format 6's is format 5's plus [`Latest`], and format 7's is format 6's
//! plus [`Kept`], so the next field goes at the end of `Kept` under format 8.

use std::borrow::Cow;

use fleet_worker::message::{ErrorInfo, ResultStatus, Usage};
use fleet_worker::trace::{SpanId, TraceId, TraceParent};
use serde::{Deserialize, Serialize};

use super::{DeferInfo, Outcome, Stamp, StateChange, TaskRecord, TaskState, TraceInfo};
use crate::domain::{CellKey, Generation, Reservation};

/// The first byte of a format-2 record.
pub const FORMAT_V2: u8 = 2;

/// The first byte of a format-3 record.
pub const FORMAT_V3: u8 = 3;

/// The first byte of a format-4 record.
pub const FORMAT_V4: u8 = 4;

/// The first byte of a format-5 record.
pub const FORMAT_V5: u8 = 5;

/// The first byte of a format-6 record.
pub const FORMAT_V6: u8 = 6;

/// The first byte of a format-7 record (written now).
pub const FORMAT_V7: u8 = 7;

/// Why stored bytes are not a task record.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty record")]
    Empty,
    #[error("format {0} is not one this commander reads (1 is JSON, 2 to 7 are postcard)")]
    UnknownFormat(u8),
    #[error("format {0} record does not decode: {1}")]
    Postcard(u8, postcard::Error),
    #[error("format {0} record has {1} bytes after its end")]
    Trailing(u8, usize),
    #[error("format 4 record has a state change at {0} ms after 1970, past the year 9999")]
    TimeOutOfRange(u64),
    #[error("format 1 (JSON) record does not decode: {0}")]
    Json(#[from] serde_json::Error),
}

/// Which format stored bytes are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    V2,
    V3,
    V4,
    V5,
    V6,
    V7,
}

pub fn format_of(bytes: &[u8]) -> Result<Format, CodecError> {
    match bytes.first() {
        None => Err(CodecError::Empty),
        Some(b'{') => Ok(Format::Json),
        Some(&FORMAT_V2) => Ok(Format::V2),
        Some(&FORMAT_V3) => Ok(Format::V3),
        Some(&FORMAT_V4) => Ok(Format::V4),
        Some(&FORMAT_V5) => Ok(Format::V5),
        Some(&FORMAT_V6) => Ok(Format::V6),
        Some(&FORMAT_V7) => Ok(Format::V7),
        Some(&other) => Err(CodecError::UnknownFormat(other)),
    }
}

/// Decodes a record in any format this commander reads.
pub fn decode(bytes: &[u8]) -> Result<TaskRecord, CodecError> {
    let format = bytes.first().copied().unwrap_or_default();
    let body = bytes.get(1..).unwrap_or_default();
    let bad = |e| CodecError::Postcard(format, e);
    match format_of(bytes)? {
        Format::Json => Ok(serde_json::from_slice(bytes)?),
        Format::V2 => {
            let v: TaskV2<'_> = postcard::from_bytes(body).map_err(bad)?;
            Ok(v.into_record(Added::default()))
        }
        // Format 4 is format 3 with `Compact` after it, format 5 format 4 with `Later`,
        // format 6 format 5 with `Latest`, format 7 format 6 with `Kept`.
        f @ (Format::V3 | Format::V4 | Format::V5 | Format::V6 | Format::V7) => {
            let (v, rest): (TaskV2<'_>, _) = postcard::take_from_bytes(body).map_err(bad)?;
            let (added, rest): (Added, _) = postcard::take_from_bytes(rest).map_err(bad)?;
            let (compact, rest) = match f {
                Format::V4 | Format::V5 | Format::V6 | Format::V7 => {
                    let (c, rest): (Compact<'_>, _) =
                        postcard::take_from_bytes(rest).map_err(bad)?;
                    (Some(c), rest)
                }
                _ => (None, rest),
            };
            let (later, rest) = match f {
                Format::V5 | Format::V6 | Format::V7 => {
                    let (l, rest): (Later<'_>, _) = postcard::take_from_bytes(rest).map_err(bad)?;
                    (Some(l), rest)
                }
                _ => (None, rest),
            };
            let (latest, rest) = match f {
                Format::V6 | Format::V7 => {
                    let (l, rest): (Latest, _) = postcard::take_from_bytes(rest).map_err(bad)?;
                    (Some(l), rest)
                }
                _ => (None, rest),
            };
            let (kept, rest) = match f {
                Format::V7 => {
                    let (k, rest): (Kept<'_>, _) = postcard::take_from_bytes(rest).map_err(bad)?;
                    (Some(k), rest)
                }
                _ => (None, rest),
            };
            ended(format, rest)?;
            let mut rec = v.into_record(added);
            if let Some(c) = compact {
                c.into_record(&mut rec)?;
            }
            if let Some(l) = later {
                l.into_record(&mut rec);
            }
            if let Some(l) = latest {
                rec.work_sequence = l.work_sequence;
            }
            if let Some(k) = kept {
                rec.kept_by = oo(k.kept_by);
            }
            Ok(rec)
        }
    }
}

/// Nothing may follow a record's last part.
fn ended(format: u8, rest: &[u8]) -> Result<(), CodecError> {
    match rest.len() {
        0 => Ok(()),
        n => Err(CodecError::Trailing(format, n)),
    }
}

/// Encodes a record in format 7.
pub fn encode(rec: &TaskRecord) -> Result<Vec<u8>, CodecError> {
    let out = encode_v6_body(FORMAT_V7, rec)?;
    let kept = Kept {
        kept_by: ob(&rec.kept_by),
    };
    postcard::to_extend(&kept, out).map_err(|e| CodecError::Postcard(FORMAT_V7, e))
}

/// The format byte, then format 6's body: all of format 6, and the start of format 7.
fn encode_v6_body(format: u8, rec: &TaskRecord) -> Result<Vec<u8>, CodecError> {
    let out = encode_v5_body(format, rec)?;
    let latest = Latest {
        work_sequence: rec.work_sequence,
    };
    postcard::to_extend(&latest, out).map_err(|e| CodecError::Postcard(format, e))
}

/// Encodes a record in format 6 (what commanders before format 7 wrote; for tests that
/// build a store of that layout). Who keeps the record is not in it.
#[cfg(test)]
pub fn encode_v6(rec: &TaskRecord) -> Result<Vec<u8>, CodecError> {
    encode_v6_body(FORMAT_V6, rec)
}

/// The format byte, then format 5's body: all of format 5, and the start of format 6.
fn encode_v5_body(format: u8, rec: &TaskRecord) -> Result<Vec<u8>, CodecError> {
    let out = encode_v4_body(format, rec)?;
    postcard::to_extend(&Later::of(rec), out).map_err(|e| CodecError::Postcard(format, e))
}

/// Encodes a record in format 5 (what commanders before format 6 wrote; for tests that
/// build a store of that layout). The work sequence is not in it.
#[cfg(test)]
pub fn encode_v5(rec: &TaskRecord) -> Result<Vec<u8>, CodecError> {
    encode_v5_body(FORMAT_V5, rec)
}

/// The format byte, then format 4's body: all of format 4, and the start of format 5.
fn encode_v4_body(format: u8, rec: &TaskRecord) -> Result<Vec<u8>, CodecError> {
    let compact = Compact::of(rec);
    let mut body = TaskV2::of(rec);
    if compact.trace.is_some() {
        body.trace = None;
    }
    body.history = Cow::Borrowed(&[]);
    let out = with_body(format, &body)?;
    let bad = |e| CodecError::Postcard(format, e);
    let out = postcard::to_extend(&Added::of(rec), out).map_err(bad)?;
    postcard::to_extend(&compact, out).map_err(bad)
}

/// Encodes a record in format 4 (what commanders before format 5 wrote; for tests that
/// build a store of that layout). A throttle's turn is not in it.
#[cfg(test)]
pub fn encode_v4(rec: &TaskRecord) -> Result<Vec<u8>, CodecError> {
    encode_v4_body(FORMAT_V4, rec)
}

/// The format byte, then format 2's body: all of format 2, and the start of formats 3
/// and 4.
fn with_body(format: u8, body: &TaskV2<'_>) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(256);
    out.push(format);
    postcard::to_extend(body, out).map_err(|e| CodecError::Postcard(format, e))
}

/// Encodes a record in format 3 (what commanders before format 4 wrote; for tests that
/// build a store of that layout).
#[cfg(test)]
pub fn encode_v3(rec: &TaskRecord) -> Result<Vec<u8>, CodecError> {
    let out = with_body(FORMAT_V3, &TaskV2::of(rec))?;
    postcard::to_extend(&Added::of(rec), out).map_err(|e| CodecError::Postcard(FORMAT_V3, e))
}

/// Encodes a record in format 2 (what commanders before format 3 wrote; for tests that
/// build a store of that layout).
#[cfg(test)]
pub fn encode_v2(rec: &TaskRecord) -> Result<Vec<u8>, CodecError> {
    with_body(FORMAT_V2, &TaskV2::of(rec))
}

/// The fields format 3 added after format 2's body.
#[derive(Default, Serialize, Deserialize)]
struct Added {
    /// `budget.charged_usd`.
    charged_usd: Option<f64>,
}

impl Added {
    fn of(r: &TaskRecord) -> Self {
        Self {
            charged_usd: r.budget.as_ref().and_then(|b| b.charged_usd),
        }
    }
}

/// The fields format 7 added after format 6's body.
#[derive(Default, Serialize, Deserialize)]
struct Kept<'a> {
    /// `kept_by`: the replica that keeps the task's full record.
    #[serde(borrow)]
    kept_by: Option<Str<'a>>,
}

/// The fields format 6 added after format 5's body.
#[derive(Default, Serialize, Deserialize)]
struct Latest {
    /// `work_sequence`: the task's dispatch in the work stream.
    work_sequence: Option<u64>,
}

/// The fields format 5 added after format 4's body.
#[derive(Default, Serialize, Deserialize)]
struct Later<'a> {
    /// `deferred.turn`: the turn a throttle gave the task it parked.
    turn: Option<TurnV5<'a>>,
}

#[derive(Serialize, Deserialize)]
struct TurnV5<'a> {
    throttle: Str<'a>,
    key: Str<'a>,
    at_ms: u64,
    spec: u64,
}

impl<'a> Later<'a> {
    fn of(r: &'a TaskRecord) -> Self {
        Self {
            turn: r
                .deferred
                .as_ref()
                .and_then(|d| d.turn.as_ref())
                .map(|t| TurnV5 {
                    throttle: b(&t.throttle),
                    key: b(&t.key),
                    at_ms: t.at_ms,
                    spec: t.spec,
                }),
        }
    }

    /// A turn without a deferral to hang on is dropped: format 5 never writes one.
    fn into_record(self, rec: &mut TaskRecord) {
        if let (Some(t), Some(d)) = (self.turn, rec.deferred.as_mut()) {
            d.turn = Some(crate::domain::ThrottleTurn {
                throttle: t.throttle.into_owned(),
                key: t.key.into_owned(),
                at_ms: t.at_ms,
                spec: t.spec,
            });
        }
    }
}

/// What format 4 stores compactly, after format 3's body.
#[derive(Default, Serialize, Deserialize)]
struct Compact<'a> {
    /// The trace, when it has the shape the commander writes; otherwise it is in the
    /// body, as text.
    trace: Option<TraceV4<'a>>,
    /// The state history (the body's is empty).
    history: Vec<ChangeV4<'a>>,
}

/// A trace whose ids are lowercase hex and whose traceparent is exactly
/// `00-{trace_id}-{dispatch_span_id}-{flags}`: the ids as bytes, the traceparent as its
/// flags.
#[derive(Serialize, Deserialize)]
struct TraceV4<'a> {
    trace_id: [u8; 16],
    dispatch_span_id: [u8; 8],
    flags: u8,
    parent_span_id: Option<SpanV4<'a>>,
    invalid_traceparent: Option<Str<'a>>,
}

/// A span id: its bytes when it is lowercase hex, else the text.
#[derive(Serialize, Deserialize)]
enum SpanV4<'a> {
    Bytes([u8; 8]),
    Text(Str<'a>),
}

#[derive(Serialize, Deserialize)]
struct ChangeV4<'a> {
    state: TaskState,
    at: AtV4<'a>,
}

/// When a state change happened: unix milliseconds when the text is what
/// `humantime::format_rfc3339_millis` writes for them, else the text.
#[derive(Serialize, Deserialize)]
enum AtV4<'a> {
    UnixMs(u64),
    Text(Str<'a>),
}

impl<'a> Compact<'a> {
    fn of(r: &'a TaskRecord) -> Self {
        Self {
            trace: r.trace.as_ref().and_then(TraceV4::of),
            history: r
                .history
                .iter()
                .map(|c| ChangeV4 {
                    state: c.state,
                    at: AtV4::of(&c.at),
                })
                .collect(),
        }
    }

    /// Puts the compact fields back into `rec` (decoded from the body before them).
    fn into_record(self, rec: &mut TaskRecord) -> Result<(), CodecError> {
        if let Some(t) = self.trace {
            rec.trace = Some(t.into_info());
        }
        rec.history = self
            .history
            .into_iter()
            .map(|c| {
                Ok(StateChange {
                    state: c.state,
                    at: c.at.into_stamp()?,
                })
            })
            .collect::<Result<_, CodecError>>()?;
        Ok(())
    }
}

impl<'a> TraceV4<'a> {
    /// `None` when `t` does not have the shape that [`TraceV4::into_info`] gives back
    /// byte for byte.
    fn of(t: &'a TraceInfo) -> Option<Self> {
        let tp = t.traceparent.as_str();
        // `parse` checks the ids (lowercase hex, not all zeros), the delimiters and the
        // flags; the rest makes it the one string `into_info` writes back.
        let parsed = TraceParent::parse(tp).ok()?;
        let canonical = tp.len() == 55
            && tp.starts_with("00-")
            && tp.get(3..35) == Some(t.trace_id.as_str())
            && tp.get(36..52) == Some(t.dispatch_span_id.as_str());
        canonical.then(|| Self {
            trace_id: parsed.trace_id.0,
            dispatch_span_id: parsed.span_id.0,
            flags: parsed.flags,
            parent_span_id: t.parent_span_id.as_deref().map(SpanV4::of),
            invalid_traceparent: ob(&t.invalid_traceparent),
        })
    }

    fn into_info(self) -> TraceInfo {
        let trace_id = TraceId(self.trace_id).to_hex();
        let dispatch_span_id = SpanId(self.dispatch_span_id).to_hex();
        // What `TraceParent::to_header` writes, from the hex already made.
        let traceparent = format!("00-{trace_id}-{dispatch_span_id}-{:02x}", self.flags);
        TraceInfo {
            trace_id,
            dispatch_span_id,
            parent_span_id: self.parent_span_id.map(SpanV4::into_text),
            invalid_traceparent: oo(self.invalid_traceparent),
            traceparent,
        }
    }
}

impl<'a> SpanV4<'a> {
    fn of(s: &'a str) -> Self {
        match SpanId::from_hex(s) {
            Ok(id) => Self::Bytes(id.0),
            Err(_) => Self::Text(b(s)),
        }
    }

    fn into_text(self) -> String {
        match self {
            Self::Bytes(id) => SpanId(id).to_hex(),
            Self::Text(s) => owned(s),
        }
    }
}

impl<'a> AtV4<'a> {
    fn of(s: &'a Stamp) -> Self {
        match s.as_unix_ms() {
            Some(ms) => Self::UnixMs(ms),
            None => Self::Text(b(s.as_text().unwrap_or_default())),
        }
    }

    fn into_stamp(self) -> Result<Stamp, CodecError> {
        match self {
            Self::UnixMs(ms) => Stamp::from_unix_ms(ms).ok_or(CodecError::TimeOutOfRange(ms)),
            Self::Text(s) => Ok(Stamp::from_text(&s)),
        }
    }
}

type Str<'a> = Cow<'a, str>;

/// `TaskRecord`'s fields in format 2. Borrowed when encoding, owned when decoding.
#[derive(Serialize, Deserialize)]
struct TaskV2<'a> {
    id: Str<'a>,
    state: TaskState,
    pool: Option<Str<'a>>,
    route_reason: Option<Str<'a>>,
    model: Option<Str<'a>>,
    decision_id: Option<Str<'a>>,
    decision_at_ms: Option<u64>,
    attempt: u32,
    priority: u8,
    intake_sequence: u64,
    intake_stored_ms: Option<u64>,
    reply_to: Option<Str<'a>>,
    trace: Option<TraceV2<'a>>,
    rejection: Option<Cow<'a, ErrorInfo>>,
    outcome: Option<OutcomeV2<'a>>,
    budget: Option<ReservationV2<'a>>,
    deferred: Option<DeferV2<'a>>,
    policy_version: Option<Str<'a>>,
    generation: Option<Cow<'a, Generation>>,
    history: Cow<'a, [StateChange]>,
}

#[derive(Serialize, Deserialize)]
struct TraceV2<'a> {
    trace_id: Str<'a>,
    dispatch_span_id: Str<'a>,
    parent_span_id: Option<Str<'a>>,
    invalid_traceparent: Option<Str<'a>>,
    traceparent: Str<'a>,
}

#[derive(Serialize, Deserialize)]
struct OutcomeV2<'a> {
    status: ResultStatus,
    attempt: u32,
    worker_id: Option<Str<'a>>,
    error: Option<Cow<'a, ErrorInfo>>,
    usage: Option<UsageV2<'a>>,
    duration_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct ReservationV2<'a> {
    cells: Cow<'a, [CellKey]>,
    est_usd: f64,
}

#[derive(Serialize, Deserialize)]
struct UsageV2<'a> {
    model: Option<Str<'a>>,
    input_tokens: u64,
    output_tokens: u64,
    cost_usd: Option<f64>,
}

#[derive(Serialize, Deserialize)]
struct DeferV2<'a> {
    reason: Str<'a>,
    until: Option<Str<'a>>,
    deferred_at: Str<'a>,
    releases: u32,
}

fn b(s: &str) -> Str<'_> {
    Cow::Borrowed(s)
}

fn ob(s: &Option<String>) -> Option<Str<'_>> {
    s.as_deref().map(Cow::Borrowed)
}

fn owned(s: Str<'_>) -> String {
    s.into_owned()
}

fn oo(s: Option<Str<'_>>) -> Option<String> {
    s.map(Cow::into_owned)
}

impl<'a> TaskV2<'a> {
    fn of(r: &'a TaskRecord) -> Self {
        Self {
            id: b(&r.id),
            state: r.state,
            pool: ob(&r.pool),
            route_reason: ob(&r.route_reason),
            model: ob(&r.model),
            decision_id: ob(&r.decision_id),
            decision_at_ms: r.decision_at_ms,
            attempt: r.attempt,
            priority: r.priority,
            intake_sequence: r.intake_sequence,
            intake_stored_ms: r.intake_stored_ms,
            reply_to: ob(&r.reply_to),
            trace: r.trace.as_ref().map(|t| TraceV2 {
                trace_id: b(&t.trace_id),
                dispatch_span_id: b(&t.dispatch_span_id),
                parent_span_id: ob(&t.parent_span_id),
                invalid_traceparent: ob(&t.invalid_traceparent),
                traceparent: b(&t.traceparent),
            }),
            rejection: r.rejection.as_ref().map(Cow::Borrowed),
            outcome: r.outcome.as_ref().map(|o| OutcomeV2 {
                status: o.status,
                attempt: o.attempt,
                worker_id: ob(&o.worker_id),
                error: o.error.as_ref().map(Cow::Borrowed),
                usage: o.usage.as_ref().map(|u| UsageV2 {
                    model: ob(&u.model),
                    input_tokens: u.input_tokens,
                    output_tokens: u.output_tokens,
                    cost_usd: u.cost_usd,
                }),
                duration_ms: o.duration_ms,
            }),
            budget: r.budget.as_ref().map(|b| ReservationV2 {
                cells: Cow::Borrowed(&b.cells),
                est_usd: b.est_usd,
            }),
            deferred: r.deferred.as_ref().map(|d| DeferV2 {
                reason: b(&d.reason),
                until: ob(&d.until),
                deferred_at: b(&d.deferred_at),
                releases: d.releases,
            }),
            policy_version: ob(&r.policy_version),
            generation: r.generation.as_ref().map(Cow::Borrowed),
            history: Cow::Borrowed(&r.history),
        }
    }

    fn into_record(self, added: Added) -> TaskRecord {
        TaskRecord {
            id: owned(self.id),
            state: self.state,
            pool: oo(self.pool),
            route_reason: oo(self.route_reason),
            model: oo(self.model),
            decision_id: oo(self.decision_id),
            decision_at_ms: self.decision_at_ms,
            attempt: self.attempt,
            priority: self.priority,
            intake_sequence: self.intake_sequence,
            intake_stored_ms: self.intake_stored_ms,
            reply_to: oo(self.reply_to),
            work_sequence: None,
            trace: self.trace.map(|t| TraceInfo {
                trace_id: owned(t.trace_id),
                dispatch_span_id: owned(t.dispatch_span_id),
                parent_span_id: oo(t.parent_span_id),
                invalid_traceparent: oo(t.invalid_traceparent),
                traceparent: owned(t.traceparent),
            }),
            rejection: self.rejection.map(Cow::into_owned),
            outcome: self.outcome.map(|o| Outcome {
                status: o.status,
                attempt: o.attempt,
                worker_id: oo(o.worker_id),
                error: o.error.map(Cow::into_owned),
                usage: o.usage.map(|u| Usage {
                    model: oo(u.model),
                    input_tokens: u.input_tokens,
                    output_tokens: u.output_tokens,
                    cost_usd: u.cost_usd,
                }),
                duration_ms: o.duration_ms,
            }),
            budget: self.budget.map(|b| Reservation {
                cells: b.cells.into_owned(),
                est_usd: b.est_usd,
                charged_usd: added.charged_usd,
            }),
            deferred: self.deferred.map(|d| DeferInfo {
                reason: owned(d.reason),
                until: oo(d.until),
                deferred_at: owned(d.deferred_at),
                releases: d.releases,
                turn: None,
            }),
            policy_version: oo(self.policy_version),
            generation: self.generation.map(Cow::into_owned),
            kept_by: None,
            history: self.history.into_owned(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::CellKey;

    /// A record with every optional field set, so a field the mirrors lost would show.
    pub(crate) fn full_record(id: &str) -> TaskRecord {
        let mut r = TaskRecord::new(id, 42);
        r.state = TaskState::Completed;
        r.pool = Some("research".into());
        r.route_reason = Some("cost_tier: cheapest eligible \"mini\" model".into());
        r.model = Some("gpt-4o-mini".into());
        r.decision_id = Some("d-1".into());
        r.decision_at_ms = Some(1_764_000_000_123);
        r.attempt = 2;
        r.priority = 7;
        r.intake_stored_ms = Some(1_764_000_000_000);
        r.reply_to = Some("_INBOX.abc".into());
        r.work_sequence = Some(1_000_000_007);
        r.trace = Some(TraceInfo {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            dispatch_span_id: "00f067aa0ba902b7".into(),
            parent_span_id: Some("b7ad6b7169203331".into()),
            invalid_traceparent: Some("00-zz: not hex".into()),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        });
        r.rejection = Some(ErrorInfo {
            code: "no_route".into(),
            message: "ünïcode ✓".into(),
        });
        r.outcome = Some(Outcome {
            status: ResultStatus::Failed,
            attempt: 2,
            worker_id: Some("w-1".into()),
            error: Some(ErrorInfo {
                code: "tool".into(),
                message: "boom".into(),
            }),
            usage: Some(Usage {
                model: Some("gpt-4o-mini".into()),
                input_tokens: 1200,
                output_tokens: 150,
                cost_usd: Some(0.000_27),
            }),
            duration_ms: Some(930),
        });
        r.budget = Some(Reservation {
            cells: vec![CellKey {
                budget: "daily".into(),
                value: "*".into(),
                bucket: 1_764_000_000_000,
            }],
            est_usd: 0.25,
            charged_usd: Some(0.000_27),
        });
        r.deferred = Some(DeferInfo {
            reason: "budget daily".into(),
            until: Some("2026-12-03T00:00:00.000Z".into()),
            deferred_at: "2026-12-02T10:00:00.000Z".into(),
            releases: 3,
            turn: Some(crate::domain::ThrottleTurn {
                throttle: "noisy-team".into(),
                key: "noisy".into(),
                at_ms: 1_764_670_000_000,
                spec: 0x1234_5678_9abc_def0,
            }),
        });
        r.policy_version = Some("a".repeat(64));
        r.kept_by = Some("00000000000000bb".into());
        r.generation = Some(Generation {
            policy: "a".repeat(12),
            rubric: 3,
            registry: 1,
        });
        r.history = vec![
            StateChange {
                state: TaskState::Received,
                at: Stamp::from_text("2026-12-02T10:00:00.000Z"),
            },
            StateChange {
                state: TaskState::Dispatched,
                at: Stamp::from_text("2026-12-02T10:00:00.002Z"),
            },
        ];
        r
    }

    #[test]
    fn format_7_round_trips_every_field_and_older_formats_still_read() {
        for rec in [full_record("t-1"), TaskRecord::new("bare", 0)] {
            let v7 = encode(&rec).unwrap();
            assert_eq!(v7[0], FORMAT_V7);
            assert_eq!(decode(&v7).unwrap(), rec);
            // Format 6 has every field but who keeps the record.
            let mut before_keepers = rec.clone();
            before_keepers.kept_by = None;
            let v6 = encode_v6(&rec).unwrap();
            assert_eq!(v6[0], FORMAT_V6);
            assert_eq!(decode(&v6).unwrap(), before_keepers, "format 6 still reads");
            assert_eq!(
                v6.len() + 1 + usize::from(rec.kept_by.is_some()) * 17,
                v7.len()
            );
            // Format 5 has neither it nor the work sequence.
            let mut before_sequences = before_keepers.clone();
            before_sequences.work_sequence = None;
            let v5 = encode_v5(&rec).unwrap();
            assert_eq!(v5[0], FORMAT_V5);
            assert_eq!(
                decode(&v5).unwrap(),
                before_sequences,
                "format 5 still reads"
            );
            // Formats 3 and 4 have neither it nor the throttle's turn.
            let mut before_turns = before_sequences.clone();
            if let Some(d) = before_turns.deferred.as_mut() {
                d.turn = None;
            }
            let v4 = encode_v4(&rec).unwrap();
            assert_eq!(v4[0], FORMAT_V4);
            assert_eq!(decode(&v4).unwrap(), before_turns, "format 4 still reads");
            assert!(v4.len() < v5.len());
            let v3 = encode_v3(&rec).unwrap();
            assert_eq!(decode(&v3).unwrap(), before_turns, "format 3 still reads");
            let json = serde_json::to_vec(&rec).unwrap();
            assert_eq!(format_of(&json).unwrap(), Format::Json);
            assert_eq!(decode(&json).unwrap(), rec, "format 1 still reads");
            println!(
                "{}: format 4 {} bytes, format 3 {}, JSON {}",
                rec.id,
                v4.len(),
                v3.len(),
                json.len()
            );
            assert!(
                v3.len() * 10 < json.len() * 7,
                "format 3 {} bytes vs JSON {}",
                v3.len(),
                json.len()
            );
        }
        // The trace and the times the commander writes take their compact form.
        let rec = full_record("t-1");
        let (v4, v3) = (encode_v4(&rec).unwrap(), encode_v3(&rec).unwrap());
        assert!(
            v4.len() + 100 < v3.len(),
            "format 4 {} bytes vs format 3 {}",
            v4.len(),
            v3.len()
        );
    }

    #[test]
    fn a_trace_or_time_the_commander_does_not_write_is_kept_as_it_was() {
        let canonical = full_record("t-3");
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = |trace_id: &str, span: &str, parent: Option<&str>, traceparent: &str| {
            Some(TraceInfo {
                trace_id: trace_id.into(),
                dispatch_span_id: span.into(),
                parent_span_id: parent.map(Into::into),
                invalid_traceparent: None,
                traceparent: traceparent.into(),
            })
        };
        let traces = [
            // Upper-case ids, and a traceparent written with them.
            trace(
                "4BF92F3577B34DA6A3CE929D0E0E4736",
                "00F067AA0BA902B7",
                None,
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            ),
            // A traceparent of another version, or with spaces, or naming other ids.
            trace(
                "4bf92f3577b34da6a3ce929d0e0e4736",
                "00f067aa0ba902b7",
                None,
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            trace(
                "4bf92f3577b34da6a3ce929d0e0e4736",
                "00f067aa0ba902b7",
                None,
                &format!(" {tp}"),
            ),
            trace(
                "4bf92f3577b34da6a3ce929d0e0e4736",
                "b7ad6b7169203331",
                None,
                tp,
            ),
            // Ids that are no ids, an all-zero one, and an odd parent span id.
            trace("t", "s", Some("p"), "not a traceparent"),
            trace(
                "00000000000000000000000000000000",
                "00f067aa0ba902b7",
                None,
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            ),
            trace(
                "4bf92f3577b34da6a3ce929d0e0e4736",
                "00f067aa0ba902b7",
                Some("B7AD6B7169203331"),
                tp,
            ),
            None,
        ];
        let times = [
            "2026-12-02T10:00:00Z",
            "2026-12-02T10:00:00.000000Z",
            "2026-12-02T10:00:00.000+00:00",
            "2026-12-02 10:00:00.000Z",
            "2016-12-31T23:59:60.000Z",
            "1969-12-31T23:59:59.999Z",
            "9999-12-31T23:59:59.999Z",
            "not a time at all, 24 c.",
            "",
        ];
        for (i, t) in traces.into_iter().enumerate() {
            let mut rec = canonical.clone();
            rec.trace = t;
            rec.history = times
                .iter()
                .map(|at| StateChange {
                    state: TaskState::Dispatched,
                    at: Stamp::from_text(at),
                })
                .collect();
            assert_eq!(decode(&encode(&rec).unwrap()).unwrap(), rec, "case {i}");
        }
    }

    #[test]
    fn format_2_still_reads_without_the_charge() {
        let rec = full_record("t-2");
        let v2 = encode_v2(&rec).unwrap();
        assert_eq!(v2[0], FORMAT_V2);
        let mut expected = rec.clone();
        if let Some(b) = expected.budget.as_mut() {
            b.charged_usd = None;
        }
        if let Some(d) = expected.deferred.as_mut() {
            d.turn = None;
        }
        expected.work_sequence = None;
        expected.kept_by = None;
        assert_eq!(decode(&v2).unwrap(), expected);
        // Format 3 is format 2's body and the added fields, nothing else.
        let v3 = encode_v3(&rec).unwrap();
        assert_eq!(v3[1..v2.len()], v2[1..]);
    }

    #[test]
    fn bytes_that_are_no_record_are_an_error_not_a_panic() {
        assert!(matches!(decode(&[]), Err(CodecError::Empty)));
        assert!(matches!(decode(&[9, 1]), Err(CodecError::UnknownFormat(9))));
        assert!(decode(b"{not json").is_err());
        let v7 = encode(&full_record("t")).unwrap();
        for cut in 1..v7.len() {
            assert!(decode(&v7[..cut]).is_err(), "truncated at {cut}");
        }
        let mut long = v7.clone();
        long.push(0);
        assert!(matches!(decode(&long), Err(CodecError::Trailing(7, 1))));
        // A time past what RFC 3339 can write is an error, not a panic in the formatter.
        let mut far = vec![FORMAT_V4];
        far = postcard::to_extend(&TaskV2::of(&TaskRecord::new("far", 0)), far).unwrap();
        far = postcard::to_extend(&Added::default(), far).unwrap();
        for ms in [super::super::stamp::YEAR_10000_S * 1000, u64::MAX] {
            let compact = Compact {
                trace: None,
                history: vec![ChangeV4 {
                    state: TaskState::Received,
                    at: AtV4::UnixMs(ms),
                }],
            };
            let bytes = postcard::to_extend(&compact, far.clone()).unwrap();
            assert!(matches!(decode(&bytes), Err(CodecError::TimeOutOfRange(m)) if m == ms));
        }
        // Every one-byte change decodes to something or fails cleanly.
        for i in 1..v7.len() {
            let mut bad = v7.clone();
            bad[i] ^= 0xA5;
            let _ = decode(&bad);
        }
    }
}
