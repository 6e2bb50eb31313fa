//! Spans grouped by trace until the trace is complete, bounded in bytes.
//!
//! A trace is complete once its root has arrived (a span without a parent, or the root of
//! a task run, whose parent lives in the producer or the commander) and `decision_wait`
//! has passed for late children; or once it has been held `max_lifetime`, whatever came.
//! Spans are exported when they end, so children usually come first and the root last.
//! When the held bytes pass the budget the oldest traces are decided early, on what is
//! known, and counted. Pure: the caller passes the time.
//!
//! A commander's own spans (its dispatch span, its classifier calls) ride along: each
//! joins its trace's held spans, or waits, bounded, for the trace's first span to come;
//! it never makes a trace complete or counts in its decision (held apart, in
//! `Pending::commander`, from the spans the decision reads).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;

use crate::domain::SpanFacts;

/// The resource and scope a span was sent under, shared by the spans of one export.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Origin {
    pub resource: Option<Resource>,
    pub resource_schema_url: String,
    pub scope: Option<InstrumentationScope>,
    pub scope_schema_url: String,
}

/// One span held, with where it came from and what the normaliser read of it. The span
/// is held encoded: its decoded strings go back to the allocator at once (and stay hot in
/// its caches for the next export) instead of piling up for the decision wait, and the
/// bytes held are exact. Only kept traces are decoded again.
#[derive(Debug)]
pub struct Held {
    pub origin: Arc<Origin>,
    /// The span, OTLP protobuf.
    pub span: Vec<u8>,
    /// The span's name, for a trace's root.
    pub root_name: Option<String>,
    pub facts: SpanFacts,
}

/// One valid span of an export, as its protobuf bytes.
#[derive(Debug)]
pub struct Encoded {
    pub origin: Arc<Origin>,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub bytes: Vec<u8>,
    /// The name of a span that may be a root (no parent, or a CONSUMER span).
    pub name: Option<String>,
    pub parent_span_id: Option<[u8; 8]>,
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Encoded {
    /// A commander's own span, held with only its ids and times as facts.
    fn into_commander(self) -> Held {
        let facts = SpanFacts {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent_span_id: self.parent_span_id,
            start_ns: self.start_ns,
            end_ns: self.end_ns,
            error: false,
            operation: crate::domain::Operation::None,
            task_root: false,
            usage: None,
            model: None,
            task_id: None,
            task_type: None,
            identity: Arc::default(),
        };
        Held {
            origin: self.origin,
            span: self.bytes,
            root_name: None,
            facts,
        }
    }
}

const SPAN_KIND_CONSUMER: i32 = 5;

/// The valid spans of an export (a trace id of 16 bytes and a span id of 8, not all zero:
/// exactly those the normaliser reads), in order, each as the protobuf bytes it came as,
/// with the resource and scope it came with. The export is read shallowly: prost decodes
/// the resources and scopes, takes each span as the bytes it is, and reads of a span only
/// its ids, kind and name; attributes and events are skipped by length, never decoded.
/// `None` when `body` is not an export (ingest decoded it already: never).
pub fn spans_of(body: &bytes::Bytes) -> Option<Vec<Encoded>> {
    let export = shallow::Export::decode(body.clone()).ok()?;
    let mut out = Vec::new();
    for rs in export.resource_spans {
        for ss in rs.scope_spans {
            let origin = Arc::new(Origin {
                resource: rs.resource.clone(),
                resource_schema_url: rs.schema_url.clone(),
                scope: ss.scope,
                scope_schema_url: ss.schema_url,
            });
            for bytes in ss.spans {
                let head = shallow::SpanHead::decode(bytes.clone()).ok()?;
                let (Some(trace_id), Some(span_id)) =
                    (valid16(&head.trace_id), valid8(&head.span_id))
                else {
                    continue;
                };
                let maybe_root = head.parent_span_id.is_empty() || head.kind == SPAN_KIND_CONSUMER;
                out.push(Encoded {
                    origin: origin.clone(),
                    trace_id,
                    span_id,
                    bytes: bytes.to_vec(),
                    name: maybe_root.then(|| String::from_utf8_lossy(&head.name).into_owned()),
                    parent_span_id: valid8(&head.parent_span_id),
                    start_ns: head.start_time_unix_nano,
                    end_ns: head.end_time_unix_nano,
                });
            }
        }
    }
    Some(out)
}

/// The OTLP trace export's messages as far as the keeper reads them before a decision.
/// Field numbers are OTLP's (`opentelemetry/proto/trace/v1/trace.proto`,
/// `collector/trace/v1/trace_service.proto`); a span is a length-delimited field, so it
/// reads as `bytes` without being decoded, and fields not named here are skipped.
mod shallow {
    use bytes::Bytes;
    use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
    use opentelemetry_proto::tonic::resource::v1::Resource;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Export {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
        #[prost(string, tag = "3")]
        pub schema_url: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(bytes = "bytes", repeated, tag = "2")]
        pub spans: Vec<Bytes>,
        #[prost(string, tag = "3")]
        pub schema_url: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SpanHead {
        #[prost(bytes = "bytes", tag = "1")]
        pub trace_id: Bytes,
        #[prost(bytes = "bytes", tag = "2")]
        pub span_id: Bytes,
        #[prost(bytes = "bytes", tag = "4")]
        pub parent_span_id: Bytes,
        /// A string on the wire; read as bytes so that only a root's is checked and copied.
        #[prost(bytes = "bytes", tag = "5")]
        pub name: Bytes,
        #[prost(int32, tag = "6")]
        pub kind: i32,
        #[prost(fixed64, tag = "7")]
        pub start_time_unix_nano: u64,
        #[prost(fixed64, tag = "8")]
        pub end_time_unix_nano: u64,
    }
}

impl Held {
    /// The span, decoded (`None` only if the bytes were not ours: never).
    pub fn decode(&self) -> Option<Span> {
        Span::decode(self.span.as_slice()).ok()
    }
}

/// A trace being assembled.
#[derive(Debug)]
pub struct Pending {
    pub trace_id: [u8; 16],
    /// The run's spans: what the decision reads.
    pub spans: Vec<Held>,
    /// The commander's own spans of the trace: kept with it, never read to decide it.
    pub commander: Vec<Held>,
    pub bytes: usize,
    pub first_ms: u64,
    /// When its root arrived.
    pub root_ms: Option<u64>,
}

/// Why a trace left the assembler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Root arrived and the decision wait passed.
    Complete,
    /// Held for the maximum lifetime without its root.
    Lifetime,
    /// Pushed out by the byte budget (the oldest go first).
    Evicted,
}

impl Ending {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Lifetime => "lifetime",
            Self::Evicted => "evicted",
        }
    }
}

/// Spans of a trace that was already decided, arriving late.
#[derive(Debug)]
pub struct Late {
    pub trace_id: [u8; 16],
    pub kept: bool,
    pub spans: Vec<Held>,
    /// The commander's own, as in [`Pending::commander`].
    pub commander: Vec<Held>,
}

impl Late {
    /// Spans in all.
    pub fn spans_in_all(&self) -> usize {
        self.spans.len() + self.commander.len()
    }
}

/// The assembler's bounds.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub decision_wait_ms: u64,
    pub max_lifetime_ms: u64,
    pub max_bytes: usize,
    /// Decided traces remembered, so late spans follow their trace's decision.
    pub remember: usize,
    /// Bytes of commander spans waiting for their trace's first span, at most.
    pub commander_bytes: usize,
}

/// What `add` found.
#[derive(Debug, Default)]
pub struct Added {
    pub late: Vec<Late>,
}

#[derive(Debug)]
pub struct Assembler {
    bounds: Bounds,
    pending: HashMap<[u8; 16], Pending>,
    /// Arrival order, for the lifetime and the budget (an entry may be stale: checked
    /// against `pending` when popped).
    by_first: VecDeque<(u64, [u8; 16])>,
    /// Root arrival order, for the decision wait.
    by_root: VecDeque<(u64, [u8; 16])>,
    bytes: usize,
    decided: HashMap<[u8; 16], bool>,
    decided_order: VecDeque<[u8; 16]>,
    /// Commander spans whose trace has no span held yet, by trace.
    waiting: HashMap<[u8; 16], Waiting>,
    /// Arrival order of `waiting` (an entry may be stale, as in `by_first`).
    waiting_order: VecDeque<(u64, [u8; 16])>,
    waiting_bytes: usize,
    /// Commander spans that left without meeting their trace, since the last `unmatched`.
    unmatched: u64,
}

/// Commander spans of one trace waiting for its first other span.
#[derive(Debug)]
struct Waiting {
    first_ms: u64,
    spans: Vec<Held>,
    bytes: usize,
}

/// What one span holds of the budget: the struct and its place in the map, besides what
/// it encodes to.
fn held_size(h: &Held) -> usize {
    h.span.len() + 160
}

fn valid16(b: &[u8]) -> Option<[u8; 16]> {
    let a: [u8; 16] = b.try_into().ok()?;
    (a != [0; 16]).then_some(a)
}

fn valid8(b: &[u8]) -> Option<[u8; 8]> {
    let a: [u8; 8] = b.try_into().ok()?;
    (a != [0; 8]).then_some(a)
}

impl Assembler {
    pub fn new(bounds: Bounds) -> Self {
        Self {
            bounds,
            pending: HashMap::new(),
            by_first: VecDeque::new(),
            by_root: VecDeque::new(),
            bytes: 0,
            decided: HashMap::new(),
            decided_order: VecDeque::new(),
            waiting: HashMap::new(),
            waiting_order: VecDeque::new(),
            waiting_bytes: 0,
            unmatched: 0,
        }
    }

    /// Commander spans that left without meeting their trace since the last call: their
    /// trace's spans never came within the lifetime, or the budget pushed them out.
    pub fn unmatched(&mut self) -> u64 {
        std::mem::take(&mut self.unmatched)
    }

    /// Takes a commander's own spans: each joins its trace if that is held, follows its
    /// decision if it was decided (`Added::late`), else waits for the trace's first span
    /// (the oldest waiting leave, unmatched, past `Bounds::commander_bytes`).
    pub fn add_commander(&mut self, spans: Vec<Encoded>, now_ms: u64) -> Added {
        let mut late: HashMap<[u8; 16], Late> = HashMap::new();
        for e in spans {
            let trace_id = e.trace_id;
            let Some(held) = self.follow_decision(&mut late, trace_id, e.into_commander(), true)
            else {
                continue;
            };
            if let Some(p) = self.pending.get_mut(&trace_id) {
                let size = held_size(&held);
                p.commander.push(held);
                p.bytes += size;
                self.bytes += size;
            } else {
                let size = held_size(&held);
                let w = self.waiting.entry(trace_id).or_insert_with(|| {
                    self.waiting_order.push_back((now_ms, trace_id));
                    Waiting {
                        first_ms: now_ms,
                        spans: Vec::new(),
                        bytes: 0,
                    }
                });
                w.spans.push(held);
                w.bytes += size;
                self.waiting_bytes += size;
            }
        }
        self.expire_waiting(now_ms);
        Added {
            late: late.into_values().collect(),
        }
    }

    /// Waiting commander spans older than the lifetime leave, then the oldest while they
    /// hold more than their budget.
    fn expire_waiting(&mut self, now_ms: u64) {
        let life = self.bounds.max_lifetime_ms;
        while let Some(&(at, id)) = self.waiting_order.front() {
            if at.saturating_add(life) > now_ms && self.waiting_bytes <= self.bounds.commander_bytes
            {
                break;
            }
            self.waiting_order.pop_front();
            if self.waiting.get(&id).is_some_and(|w| w.first_ms == at)
                && let Some(w) = self.waiting.remove(&id)
            {
                self.waiting_bytes = self.waiting_bytes.saturating_sub(w.bytes);
                self.unmatched += w.spans.len() as u64;
            }
        }
    }

    /// Bytes held (each span's encoded length plus a fixed overhead).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn traces(&self) -> usize {
        self.pending.len()
    }

    /// Takes one export: its valid spans (`spans_of`), and the facts the
    /// normaliser read of them (same spans, same order).
    pub fn add(&mut self, spans: Vec<Encoded>, facts: Vec<SpanFacts>, now_ms: u64) -> Added {
        let mut added = Added::default();
        let mut late: HashMap<[u8; 16], Late> = HashMap::new();
        for (e, f) in spans.into_iter().zip(facts) {
            // Both lists hold exactly the valid spans in order; a mismatch is not ours.
            if e.span_id != f.span_id {
                continue;
            }
            let trace_id = e.trace_id;
            let held = Held {
                origin: e.origin,
                span: e.bytes,
                root_name: e.name,
                facts: f,
            };
            if let Some(held) = self.follow_decision(&mut late, trace_id, held, false) {
                self.hold(trace_id, held, now_ms);
            }
        }
        added.late = late.into_values().collect();
        added
    }

    /// A span of a trace already decided goes to `late` (with the commander's own when
    /// `commander`), to follow the decision; `held` comes back when its trace is not
    /// decided.
    fn follow_decision(
        &self,
        late: &mut HashMap<[u8; 16], Late>,
        trace_id: [u8; 16],
        held: Held,
        commander: bool,
    ) -> Option<Held> {
        let Some(kept) = self.decided.get(&trace_id) else {
            return Some(held);
        };
        let l = late.entry(trace_id).or_insert_with(|| Late {
            trace_id,
            kept: *kept,
            spans: Vec::new(),
            commander: Vec::new(),
        });
        match commander {
            true => l.commander.push(held),
            false => l.spans.push(held),
        }
        None
    }

    fn hold(&mut self, trace_id: [u8; 16], held: Held, now_ms: u64) {
        let size = held_size(&held);
        let is_root = held.facts.task_root || held.facts.parent_span_id.is_none();
        let waited = match self.pending.contains_key(&trace_id) {
            true => None,
            false => self.waiting.remove(&trace_id),
        };
        let p = self.pending.entry(trace_id).or_insert_with(|| {
            self.by_first.push_back((now_ms, trace_id));
            Pending {
                trace_id,
                spans: Vec::new(),
                commander: Vec::new(),
                bytes: 0,
                first_ms: now_ms,
                root_ms: None,
            }
        });
        if let Some(w) = waited {
            self.waiting_bytes = self.waiting_bytes.saturating_sub(w.bytes);
            p.commander.extend(w.spans);
            p.bytes += w.bytes;
            self.bytes += w.bytes;
        }
        p.spans.push(held);
        p.bytes += size;
        self.bytes += size;
        if is_root && p.root_ms.is_none() {
            p.root_ms = Some(now_ms);
            self.by_root.push_back((now_ms, trace_id));
        }
    }

    /// Traces due at `now_ms`: complete ones past the decision wait, old ones past their
    /// lifetime, then the oldest while the budget is passed.
    pub fn due(&mut self, now_ms: u64) -> Vec<(Pending, Ending)> {
        self.expire_waiting(now_ms);
        let mut out = Vec::new();
        let wait = self.bounds.decision_wait_ms;
        while let Some(&(at, id)) = self.by_root.front() {
            if at.saturating_add(wait) > now_ms {
                break;
            }
            self.by_root.pop_front();
            if self.pending.get(&id).is_some_and(|p| p.root_ms == Some(at))
                && let Some(p) = self.take(&id)
            {
                out.push((p, Ending::Complete));
            }
        }
        let life = self.bounds.max_lifetime_ms;
        while let Some(&(at, id)) = self.by_first.front() {
            let over_budget = self.bytes > self.bounds.max_bytes;
            if at.saturating_add(life) > now_ms && !over_budget {
                break;
            }
            self.by_first.pop_front();
            if self.pending.get(&id).is_some_and(|p| p.first_ms == at)
                && let Some(p) = self.take(&id)
            {
                let why = if at.saturating_add(life) <= now_ms {
                    Ending::Lifetime
                } else {
                    Ending::Evicted
                };
                out.push((p, why));
            }
        }
        out
    }

    /// Everything held, for shutdown.
    pub fn drain(&mut self) -> Vec<Pending> {
        self.by_first.clear();
        self.by_root.clear();
        self.waiting_order.clear();
        self.waiting_bytes = 0;
        let waited: usize = self.waiting.drain().map(|(_, w)| w.spans.len()).sum();
        self.unmatched += waited as u64;
        self.bytes = 0;
        self.pending.drain().map(|(_, p)| p).collect()
    }

    fn take(&mut self, id: &[u8; 16]) -> Option<Pending> {
        let p = self.pending.remove(id)?;
        self.bytes = self.bytes.saturating_sub(p.bytes);
        Some(p)
    }

    /// Remembers a decision, so spans arriving later follow it.
    pub fn decided(&mut self, trace_id: [u8; 16], kept: bool) {
        if self.decided.insert(trace_id, kept).is_none() {
            self.decided_order.push_back(trace_id);
        }
        while self.decided_order.len() > self.bounds.remember {
            if let Some(old) = self.decided_order.pop_front() {
                self.decided.remove(&old);
            }
        }
    }
}

/// Spans back into OTLP's shape, grouped by the resource and scope they came with.
pub fn to_resource_spans(spans: Vec<Held>) -> Vec<ResourceSpans> {
    let mut out: Vec<(Arc<Origin>, Vec<Span>)> = Vec::new();
    for h in spans {
        let Some(span) = h.decode() else { continue };
        match out
            .iter_mut()
            .find(|(o, _)| Arc::ptr_eq(o, &h.origin) || **o == *h.origin)
        {
            Some((_, v)) => v.push(span),
            None => out.push((h.origin, vec![span])),
        }
    }
    out.into_iter()
        .map(|(o, spans)| {
            let o = Arc::unwrap_or_clone(o);
            ResourceSpans {
                resource: o.resource,
                scope_spans: vec![ScopeSpans {
                    scope: o.scope,
                    spans,
                    schema_url: o.scope_schema_url,
                }],
                schema_url: o.resource_schema_url,
            }
        })
        .collect()
}
