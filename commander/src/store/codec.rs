//! The task record on disk.
//!
//! Format 3 (written since the ledger moved into the task log): one version byte (`3`),
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
//! the next update of a record in format 1 or 2 writes it in format 3, and records that
//! are never updated again leave through retention as before (`Store::sweep`).
//!
//! postcard is not self-describing, so the serde attributes the JSON API needs
//! (`skip_serializing_if`, which drops a field) cannot be on the types it encodes: the
//! mirrors below have the record's fields in a fixed order and nothing else. Adding a field
//! is a new format byte with the older formats still decoded: format 3's body is format
//! 2's plus [`Added`], so the next field goes at the end of `Added` under format 4.

use std::borrow::Cow;

use fleet_worker::message::{ErrorInfo, ResultStatus, Usage};
use serde::{Deserialize, Serialize};

use super::{DeferInfo, Outcome, StateChange, TaskRecord, TaskState, TraceInfo};
use crate::domain::{CellKey, Generation, Reservation};

/// The first byte of a format-2 record.
pub const FORMAT_V2: u8 = 2;

/// The first byte of a format-3 record (written now).
pub const FORMAT_V3: u8 = 3;

/// Why stored bytes are not a task record.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty record")]
    Empty,
    #[error("format {0} is not one this commander reads (1 is JSON, 2 and 3 are postcard)")]
    UnknownFormat(u8),
    #[error("format 2 or 3 record does not decode: {0}")]
    Postcard(#[from] postcard::Error),
    #[error("format 3 record has {0} bytes after its end")]
    Trailing(usize),
    #[error("format 1 (JSON) record does not decode: {0}")]
    Json(#[from] serde_json::Error),
}

/// Which format stored bytes are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    V2,
    V3,
}

pub fn format_of(bytes: &[u8]) -> Result<Format, CodecError> {
    match bytes.first() {
        None => Err(CodecError::Empty),
        Some(b'{') => Ok(Format::Json),
        Some(&FORMAT_V2) => Ok(Format::V2),
        Some(&FORMAT_V3) => Ok(Format::V3),
        Some(&other) => Err(CodecError::UnknownFormat(other)),
    }
}

/// Decodes a record in any format this commander reads.
pub fn decode(bytes: &[u8]) -> Result<TaskRecord, CodecError> {
    match format_of(bytes)? {
        Format::Json => Ok(serde_json::from_slice(bytes)?),
        Format::V2 => {
            let body = bytes.get(1..).unwrap_or_default();
            let v: TaskV2<'_> = postcard::from_bytes(body)?;
            Ok(v.into_record(Added::default()))
        }
        Format::V3 => {
            let body = bytes.get(1..).unwrap_or_default();
            let (v, rest): (TaskV2<'_>, _) = postcard::take_from_bytes(body)?;
            let (added, rest): (Added, _) = postcard::take_from_bytes(rest)?;
            if !rest.is_empty() {
                return Err(CodecError::Trailing(rest.len()));
            }
            Ok(v.into_record(added))
        }
    }
}

/// Encodes a record in format 3.
pub fn encode(rec: &TaskRecord) -> Result<Vec<u8>, CodecError> {
    let out = with_v2_body(FORMAT_V3, rec)?;
    Ok(postcard::to_extend(&Added::of(rec), out)?)
}

/// The format byte, then format 2's body: all of format 2, and the start of format 3.
fn with_v2_body(format: u8, rec: &TaskRecord) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(256);
    out.push(format);
    Ok(postcard::to_extend(&TaskV2::of(rec), out)?)
}

/// Encodes a record in format 2 (what commanders before format 3 wrote; for tests that
/// build a store of that layout).
#[cfg(test)]
pub fn encode_v2(rec: &TaskRecord) -> Result<Vec<u8>, CodecError> {
    with_v2_body(FORMAT_V2, rec)
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
            }),
            policy_version: oo(self.policy_version),
            generation: self.generation.map(Cow::into_owned),
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
        });
        r.policy_version = Some("a".repeat(64));
        r.generation = Some(Generation {
            policy: "a".repeat(12),
            rubric: 3,
            registry: 1,
        });
        r.history = vec![
            StateChange {
                state: TaskState::Received,
                at: "2026-12-02T10:00:00.000Z".into(),
            },
            StateChange {
                state: TaskState::Dispatched,
                at: "2026-12-02T10:00:00.002Z".into(),
            },
        ];
        r
    }

    #[test]
    fn format_3_round_trips_every_field_and_is_smaller_than_json() {
        for rec in [full_record("t-1"), TaskRecord::new("bare", 0)] {
            let v3 = encode(&rec).unwrap();
            assert_eq!(v3[0], FORMAT_V3);
            assert_eq!(decode(&v3).unwrap(), rec);
            let json = serde_json::to_vec(&rec).unwrap();
            assert_eq!(format_of(&json).unwrap(), Format::Json);
            assert_eq!(decode(&json).unwrap(), rec, "format 1 still reads");
            println!(
                "{}: format 3 {} bytes, JSON {}",
                rec.id,
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
        assert_eq!(decode(&v2).unwrap(), expected);
        // Format 3 is format 2's body and the added fields, nothing else.
        let v3 = encode(&rec).unwrap();
        assert_eq!(v3[1..v2.len()], v2[1..]);
    }

    #[test]
    fn bytes_that_are_no_record_are_an_error_not_a_panic() {
        assert!(matches!(decode(&[]), Err(CodecError::Empty)));
        assert!(matches!(decode(&[9, 1]), Err(CodecError::UnknownFormat(9))));
        assert!(decode(b"{not json").is_err());
        let v3 = encode(&full_record("t")).unwrap();
        for cut in 1..v3.len() {
            assert!(decode(&v3[..cut]).is_err(), "truncated at {cut}");
        }
        let mut long = v3.clone();
        long.push(0);
        assert!(matches!(decode(&long), Err(CodecError::Trailing(1))));
        // Every one-byte change decodes to something or fails cleanly.
        for i in 1..v3.len() {
            let mut bad = v3.clone();
            bad[i] ^= 0xA5;
            let _ = decode(&bad);
        }
    }
}
