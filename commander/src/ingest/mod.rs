//! Telemetry in: OTLP over gRPC and HTTP, OTLP and heartbeats over NATS.
//!
//! Every transport decodes and normalises in its own task (so that work spreads over the
//! runtime), then offers the events to the fleet state owner without waiting. A full
//! queue refuses the export (RESOURCE_EXHAUSTED with RetryInfo / 429 with Retry-After) and
//! counts what was dropped: telemetry is shed, the task path never waits on it.

pub mod limits;
pub mod nats;
pub mod normalise;
pub mod otlp;
pub mod relay;

use std::sync::Arc;

use fleet_worker::message::Heartbeat;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;

use crate::fleet::{FleetHandle, Ingest, OfferError};
use crate::metrics::Metrics;

/// Why an export was not taken. Mapped to gRPC codes and HTTP statuses in `otlp.rs`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IngestError {
    #[error("telemetry queue is full; retry after {0} s")]
    Overloaded(u64),
    #[error("the commander is shutting down")]
    Stopped,
    #[error("cannot decode the request: {0}")]
    Decode(String),
    /// Decoded, but says what no worker can (a heartbeat's `max_in_flight` past the
    /// protocol's limit): dropped, as it would skew routing.
    #[error("{0}")]
    Invalid(String),
    #[error("request is larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    /// Over a decode limit (items, nesting, decoded bytes): refused before decoding.
    #[error("{0}")]
    Limit(limits::LimitError),
    /// Reading the export failed in a way validation did not foresee (a caught panic,
    /// counted in `fleet_task_panics_total{task="ingest"}`); nothing of it was kept.
    #[error("internal error while reading the export")]
    Internal,
    #[error("unsupported content type {0:?}: use application/x-protobuf or application/json")]
    UnsupportedMediaType(String),
    #[error("unsupported content encoding {0:?}: use gzip or none")]
    UnsupportedEncoding(String),
}

impl From<limits::LimitError> for IngestError {
    fn from(e: limits::LimitError) -> Self {
        match e {
            // Not protobuf at all: bad data, like any other decode error.
            limits::LimitError::Malformed(why) => IngestError::Decode(why),
            over => IngestError::Limit(over),
        }
    }
}

/// Seconds a refused client should wait.
pub const RETRY_AFTER_S: u64 = 1;

/// What an accepted export reports back (OTLP `partial_success`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    pub rejected: u64,
    pub message: String,
}

/// The shared front half of every transport.
#[derive(Clone, Debug)]
pub struct Ingestor {
    pub fleet: FleetHandle,
    pub metrics: Arc<Metrics>,
    /// What one request may expand to; checked before decoding on every transport.
    pub limits: limits::DecodeLimits,
    /// Catches and counts a panic while an export is read.
    pub supervisor: crate::supervise::Supervisor,
    /// The trace keeper's queue (`crate::traces`), when traces are kept.
    pub traces: Option<TraceTap>,
    /// Where OTLP exports go on to the other replicas (`relay.rs`; none in tests and
    /// benchmarks).
    pub relay: Option<relay::Relay>,
}

/// One trace export for the trace keeper: its protobuf bytes, shared with the receiver
/// (no copy), already through the decode limits, and what the normaliser read of its
/// valid spans. The keeper takes each span's bytes from the export without decoding it
/// again, so the ingest path pays a copy of each span's ids and a few short strings, a
/// reference count and a queue slot.
#[derive(Debug)]
pub struct TraceBatch {
    pub body: bytes::Bytes,
    /// The export's valid spans as the live state read them, in order.
    pub facts: Vec<crate::domain::SpanFacts>,
    /// A commander replica's own spans (dispatch, classifier calls): they join the trace
    /// they belong to when the keeper keeps it, but never make or decide one, and the live
    /// state never reads them (`facts` is empty).
    pub commander: bool,
    /// Its share of the queue's byte budget, given back when the batch is dropped.
    _queued: Option<QueuedBytes>,
}

impl TraceBatch {
    /// A batch outside any queue (tests, benchmarks): `facts` as
    /// `crate::domain::SpanFacts::of` makes them from the export's events.
    pub fn new(body: bytes::Bytes, facts: Vec<crate::domain::SpanFacts>) -> Self {
        Self {
            body,
            facts,
            commander: false,
            _queued: None,
        }
    }

    /// A commander's own export (`commander`).
    pub fn commander(body: bytes::Bytes) -> Self {
        Self {
            commander: true,
            ..Self::new(body, Vec::new())
        }
    }

    /// A batch of an export read here (tests, benchmarks, where the live state's reading
    /// is not at hand). `None` when `body` is not an export.
    pub fn read(body: bytes::Bytes) -> Option<Self> {
        let req = normalise::wire::TraceRequest::parse(&body).ok()?;
        let (events, _) = normalise::span_events(&req);
        let facts = events.iter().map(crate::domain::SpanFacts::of).collect();
        Some(Self::new(body, facts))
    }

    /// Bytes it holds against the queue's budget: the export and the facts' structs (their
    /// few short strings are left out: ids and names, small beside the export they came from).
    fn size(&self) -> usize {
        self.body.len() + self.facts.len() * std::mem::size_of::<crate::domain::SpanFacts>()
    }
}

#[derive(Debug)]
struct QueuedBytes {
    queued: Arc<std::sync::atomic::AtomicUsize>,
    n: usize,
}

impl Drop for QueuedBytes {
    fn drop(&mut self) {
        self.queued
            .fetch_sub(self.n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The bounded queue into the trace keeper, in exports and in bytes. Ingest never waits
/// on it: when it is full the export still feeds the live state and only its spans' trace
/// keeping is shed, counted in `shed_spans`.
#[derive(Clone, Debug)]
pub struct TraceTap {
    pub tx: tokio::sync::mpsc::Sender<TraceBatch>,
    pub shed_spans: Arc<std::sync::atomic::AtomicU64>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    max_bytes: usize,
}

impl TraceTap {
    /// A tap and the keeper's end of it, holding at most `batches` exports and
    /// `max_bytes` of their bodies.
    pub fn new(
        batches: usize,
        max_bytes: usize,
    ) -> (Self, tokio::sync::mpsc::Receiver<TraceBatch>) {
        let (tx, rx) = tokio::sync::mpsc::channel(batches.max(1));
        let tap = Self {
            tx,
            shed_spans: Arc::default(),
            queued: Arc::default(),
            max_bytes,
        };
        (tap, rx)
    }

    /// A place in the queue; `None` (its `spans` counted as shed) when it is full.
    fn reserve(&self, spans: u64) -> Option<tokio::sync::mpsc::Permit<'_, TraceBatch>> {
        match self.tx.try_reserve() {
            Ok(p) => Some(p),
            Err(_) => {
                self.shed(spans);
                None
            }
        }
    }

    fn shed(&self, spans: u64) {
        self.shed_spans
            .fetch_add(spans, std::sync::atomic::Ordering::Relaxed);
    }

    /// A commander's own export, for the keeper to keep beside its trace; shed (counted)
    /// when the queue is full, as any other export's keeping is. Never waits.
    pub fn offer_commander(&self, body: bytes::Bytes, spans: u64) {
        let Some(permit) = self.reserve(spans) else {
            return;
        };
        if let Some(batch) = self.admit(TraceBatch::commander(body), spans) {
            permit.send(batch);
        }
    }

    /// `batch` holding its bytes of the budget; `None` (shed, counted) past it.
    fn admit(&self, mut batch: TraceBatch, spans: u64) -> Option<TraceBatch> {
        use std::sync::atomic::Ordering::Relaxed;
        let n = batch.size();
        let before = self.queued.fetch_add(n, Relaxed);
        let queued = QueuedBytes {
            queued: self.queued.clone(),
            n,
        };
        if before.saturating_add(n) > self.max_bytes {
            drop(queued);
            self.shed(spans);
            return None;
        }
        batch._queued = Some(queued);
        Some(batch)
    }
}

impl Ingestor {
    /// Runs `f` (normalisation), catching a panic: one export must never take down the
    /// receiver that reads everybody's telemetry.
    fn guarded<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(r) => Some(r),
            Err(payload) => {
                self.supervisor.caught("ingest", payload.as_ref());
                None
            }
        }
    }

    fn offer(
        &self,
        transport: &'static str,
        signal: &'static str,
        n: u64,
        ev: Ingest,
    ) -> Result<(), IngestError> {
        match self.fleet.offer(ev) {
            Ok(()) => {
                self.metrics.telemetry(transport, signal, "accepted", n);
                Ok(())
            }
            Err(OfferError::Full) => {
                self.metrics.telemetry(transport, signal, "dropped", n);
                Err(IngestError::Overloaded(RETRY_AFTER_S))
            }
            Err(OfferError::Closed) => {
                self.metrics.telemetry(transport, signal, "dropped", n);
                Err(IngestError::Stopped)
            }
        }
    }

    /// One trace export: its protobuf body (OTLP/JSON is encoded to protobuf first),
    /// through the decode limits. It is read here, in the form that borrows its strings
    /// (`normalise::wire`), and the body goes on to the trace keeper as it is.
    pub fn traces(
        &self,
        transport: &'static str,
        body: bytes::Bytes,
    ) -> Result<Accepted, IngestError> {
        let req = match normalise::wire::TraceRequest::parse(&body) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.telemetry(transport, "traces", "rejected", 1);
                return Err(IngestError::Decode(e.to_string()));
            }
        };
        let received = req.span_count();
        self.metrics
            .telemetry(transport, "traces", "received", received);
        let keep = self
            .traces
            .as_ref()
            .and_then(|t| t.reserve(received))
            .map(|permit| (permit, body.clone()));
        let Some((events, rejected)) = self.guarded(|| normalise::span_events(&req)) else {
            self.metrics
                .telemetry(transport, "traces", "rejected", received);
            return Err(IngestError::Internal);
        };
        self.metrics
            .telemetry(transport, "traces", "rejected", rejected.count);
        if !events.is_empty() {
            let n = events.len() as u64;
            let keep = keep.map(|(permit, body)| {
                let facts = events.iter().map(crate::domain::SpanFacts::of).collect();
                (permit, TraceBatch::new(body, facts))
            });
            self.offer(transport, "traces", n, Ingest::Spans(events))?;
            // Only an export the live state took goes on to the keeper: a refused one is
            // sent again by its client.
            if let Some((permit, batch)) = keep
                && let Some(tap) = &self.traces
                && let Some(batch) = tap.admit(batch, received)
            {
                permit.send(batch);
            }
        }
        Ok(Accepted {
            rejected: rejected.count,
            message: rejected.message(),
        })
    }

    /// Another commander replica's own spans (its export on
    /// `<prefix>.telemetry._commander.<instance>`): through the decode limits, then to the
    /// trace keeper only (`TraceBatch::commander`); the live state never reads them. Off
    /// when trace keeping is.
    pub fn commander_spans(&self, body: bytes::Bytes) -> Result<(), IngestError> {
        let Some(tap) = &self.traces else {
            return Ok(());
        };
        limits::check_protobuf(limits::Signal::Traces, &body, self.limits)?;
        let req = normalise::wire::TraceRequest::parse(&body)
            .map_err(|e| IngestError::Decode(e.to_string()))?;
        let spans = req.span_count();
        tap.offer_commander(body, spans);
        Ok(())
    }

    pub fn metrics(
        &self,
        transport: &'static str,
        req: ExportMetricsServiceRequest,
    ) -> Result<Accepted, IngestError> {
        let Some((points, total, rejected)) = self.guarded(|| normalise::metrics(req)) else {
            self.metrics.telemetry(transport, "metrics", "rejected", 1);
            return Err(IngestError::Internal);
        };
        self.metrics
            .telemetry(transport, "metrics", "received", total);
        self.metrics
            .telemetry(transport, "metrics", "rejected", rejected.count);
        let used = points.len() as u64;
        // Non-GenAI points are accepted and not kept: the commander is not a metrics store.
        self.metrics.telemetry(
            transport,
            "metrics",
            "accepted",
            total.saturating_sub(used + rejected.count),
        );
        if !points.is_empty() {
            self.offer(transport, "metrics", used, Ingest::Metrics(points))?;
        }
        Ok(Accepted {
            rejected: rejected.count,
            message: rejected.message(),
        })
    }

    /// Logs are counted and acknowledged; no signal the fleet state uses travels in them
    /// yet (GenAI content events are opt-in and not stored).
    pub fn logs(
        &self,
        transport: &'static str,
        req: &ExportLogsServiceRequest,
    ) -> Result<Accepted, IngestError> {
        let n: u64 = req
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .map(|s| s.log_records.len() as u64)
            .sum();
        self.metrics.telemetry(transport, "logs", "received", n);
        self.metrics.telemetry(transport, "logs", "accepted", n);
        Ok(Accepted::default())
    }

    pub fn heartbeat(&self, transport: &'static str, hb: Heartbeat) -> Result<(), IngestError> {
        self.metrics
            .telemetry(transport, "heartbeats", "received", 1);
        if let Some(problem) = crate::fleet::heartbeat_problem(&hb) {
            self.fleet.counters.heartbeats_invalid.inc();
            self.metrics
                .telemetry(transport, "heartbeats", "rejected", 1);
            return Err(IngestError::Invalid(format!(
                "heartbeat dropped: {problem}"
            )));
        }
        self.offer(transport, "heartbeats", 1, Ingest::Heartbeat(Box::new(hb)))
    }
}
