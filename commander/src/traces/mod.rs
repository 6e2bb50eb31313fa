//! Traces worth keeping: spans assembled per trace, tail-sampled by the policy's
//! `[sampling]`, redacted by its `[[redaction]]` and `[privacy]`, stored in sled with a
//! byte budget and a retention time, and exported over OTLP (docs/traces.md).
//!
//! Ingest hands every accepted trace export to the keeper over a bounded queue
//! (`ingest::TraceTap`), with what its normaliser read of the spans, when the live state
//! took its events; the keeper is one task that
//! owns the assembler and decides, redacts, stores and offers to the exporters. Nothing
//! here is on the task path, and nothing waits on an exporter.

pub mod assemble;
pub mod export;
pub mod flags;
pub mod redact;
pub mod sample;
pub mod store;
pub mod tree;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};

use self::assemble::{Assembler, Bounds, Ending, Held, Pending};
use self::export::Exporter;
use self::flags::Flags;
use self::redact::Redactor;
use self::sample::{Sentinels, Shape, TypeFigures, Why};
use self::store::{TraceStore, TraceSummary};
use crate::config::TracesConfig;
use crate::domain::Clock;
use crate::fleet::FleetHandle;
use crate::fleet::view::FleetSnapshot;
use crate::ingest::TraceBatch;
use crate::policy::{Live, PolicyEngine};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndingLabels {
    pub ending: &'static str,
    /// `kept` or `dropped`.
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhyLabels {
    pub why: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpanLabels {
    /// `held`, `late_kept`, `late_dropped`, `shed` (the keeper's queue was full),
    /// `undecodable` (an export, never expected).
    pub outcome: &'static str,
}

/// The keeper's counters (`fleet_traces_*`, `fleet_trace_*`).
#[derive(Debug, Default)]
pub struct TraceCounters {
    pub spans: Family<SpanLabels, Counter>,
    pub decided: Family<EndingLabels, Counter>,
    pub kept: Family<WhyLabels, Counter>,
    pub redactions: Family<RuleLabels, Counter>,
    pub stored_bytes: Gauge,
    pub stored_traces: Gauge,
    pub buffer_bytes: Gauge,
    pub buffer_traces: Gauge,
    pub store_errors: Counter,
    pub export: Arc<export::ExportCounters>,
}

impl TraceCounters {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "trace_spans",
            "Spans that reached the trace keeper, by outcome",
            self.spans.clone(),
        );
        r.register(
            "traces_decided",
            "Traces decided, by how they ended assembling and whether they were kept",
            self.decided.clone(),
        );
        r.register(
            "traces_kept",
            "Kept traces by reason (a trace kept for several counts under each)",
            self.kept.clone(),
        );
        r.register(
            "trace_redactions",
            "Attribute values redacted or removed, by rule",
            self.redactions.clone(),
        );
        r.register(
            "trace_store_bytes",
            "Bytes of kept traces on disk",
            self.stored_bytes.clone(),
        );
        r.register(
            "trace_store_traces",
            "Kept traces on disk",
            self.stored_traces.clone(),
        );
        r.register(
            "trace_buffer_bytes",
            "Bytes of spans held while their traces assemble",
            self.buffer_bytes.clone(),
        );
        r.register(
            "trace_buffer_traces",
            "Traces assembling",
            self.buffer_traces.clone(),
        );
        r.register(
            "trace_store_errors",
            "Kept traces the store could not write",
            self.store_errors.clone(),
        );
        self.export.register(r);
    }

    fn span(&self, outcome: &'static str, n: u64) {
        self.spans.get_or_create(&SpanLabels { outcome }).inc_by(n);
    }
}

/// What the task path, the detector and the API hold of the trace keeper.
#[derive(Clone, Debug, Default)]
pub struct Traces {
    /// The kept traces; `None` when `[traces] enabled = false`.
    pub store: Option<TraceStore>,
    pub flags: Flags,
}

/// What the keeper reads and where it writes.
#[derive(Debug)]
pub struct Wiring {
    pub config: TracesConfig,
    pub store: TraceStore,
    pub engine: Arc<PolicyEngine>,
    pub flags: Flags,
    pub exporters: Vec<Exporter>,
    pub counters: Arc<TraceCounters>,
    pub clock: Arc<dyn Clock>,
    /// Spans ingest could not queue (`ingest::TraceTap::shed_spans`).
    pub shed: Arc<std::sync::atomic::AtomicU64>,
    /// Whether this replica leads, and so exports what it keeps (`detect::lead`): every
    /// replica keeps the same traces, and each endpoint should get them once.
    pub leading: crate::domain::Leading,
}

fn bounds(c: &TracesConfig) -> Bounds {
    Bounds {
        decision_wait_ms: c.decision_wait_ms,
        max_lifetime_ms: c.max_trace_s.saturating_mul(1000),
        max_bytes: c.buffer_bytes,
        remember: c.remember_traces,
        // A commander's spans wait for their trace's first worker span: a queue wait and
        // the run's first LLM call or tool, a small share of what assembling holds.
        commander_bytes: c.buffer_bytes / 4,
    }
}

/// The keeper: owns the assembler; decides, redacts, stores and exports.
#[derive(Debug)]
pub struct Keeper {
    w: Arc<Wiring>,
    assembler: Assembler,
    sentinels: Sentinels,
    /// The redactor of the policy (by its sha256) and salt it was built from.
    redactor: Option<(String, Option<Vec<u8>>, Redactor)>,
    shed_seen: u64,
    /// Whether this replica led at the last tick: kept traces are exported then, and held
    /// back in `standby` otherwise.
    exporting: bool,
    standby: export::Standby,
    /// Traces the standby holds at most: as many as the largest endpoint queue.
    standby_max: usize,
    /// How long before the old leader was last heard a trace it kept may be unsent
    /// ([`export::LEADER_LAG`] and the slowest endpoint's `batch_delay_ms`).
    leader_lag: std::time::Duration,
}

impl Keeper {
    pub fn new(w: Arc<Wiring>) -> Self {
        Self {
            assembler: Assembler::new(bounds(&w.config)),
            sentinels: Sentinels::default(),
            redactor: None,
            shed_seen: 0,
            exporting: w.leading.now(),
            standby: export::Standby::default(),
            standby_max: w.exporters.iter().map(|x| x.capacity()).max().unwrap_or(0),
            leader_lag: export::LEADER_LAG
                + (w.exporters.iter().map(|x| x.batch_delay()).max()).unwrap_or_default(),
            w,
        }
    }

    /// Takes one export: each valid span's bytes (read shallowly: it passed the decode
    /// limits and the full decode in ingest) with the facts ingest's normaliser read of it.
    pub fn add(&mut self, batch: TraceBatch) {
        let now_ms = self.w.clock.now_ms();
        let Some(spans) = assemble::spans_of(&batch.body) else {
            self.w.counters.span("undecodable", 1);
            return;
        };
        let (n, added, outcome) = if batch.commander {
            let n = spans.len() as u64;
            (n, self.assembler.add_commander(spans, now_ms), "commander")
        } else {
            let n = batch.facts.len() as u64;
            (n, self.assembler.add(spans, batch.facts, now_ms), "held")
        };
        let late: u64 = added.late.iter().map(|l| l.spans_in_all() as u64).sum();
        self.w.counters.span(outcome, n.saturating_sub(late));
        self.late(added.late, now_ms);
    }

    /// Spans of traces already decided follow the decision.
    fn late(&mut self, late: Vec<assemble::Late>, now_ms: u64) {
        if late.is_empty() {
            return;
        }
        let live = self.w.engine.live();
        for l in late {
            if !l.kept {
                self.w
                    .counters
                    .span("late_dropped", l.spans_in_all() as u64);
                continue;
            }
            self.w.counters.span("late_kept", l.spans_in_all() as u64);
            let pending = Pending {
                trace_id: l.trace_id,
                bytes: 0,
                first_ms: now_ms,
                root_ms: None,
                spans: l.spans,
                commander: l.commander,
            };
            let shape = self.shape(&pending, &live);
            // Late spans keep the reasons their trace was kept for (the store merges them).
            self.keep(pending, shape, Vec::new(), Ending::Complete, &live, now_ms);
        }
    }

    /// Decides every trace that is due; `snapshot` gives the task types' figures.
    pub fn tick(&mut self, snapshot: &FleetSnapshot) {
        self.follow_the_lead(std::time::Instant::now());
        let now_ms = self.w.clock.now_ms();
        let shed = self.w.shed.load(std::sync::atomic::Ordering::Relaxed);
        if shed > self.shed_seen {
            self.w.counters.span("shed", shed - self.shed_seen);
            self.shed_seen = shed;
        }
        let due = self.assembler.due(now_ms);
        self.count_unmatched();
        if !due.is_empty() {
            let live = self.w.engine.live();
            let figures: Vec<(&str, TypeFigures)> = snapshot
                .fleet
                .task_types
                .iter()
                .map(|t| {
                    (
                        t.task_type.as_str(),
                        TypeFigures {
                            runs: t.tasks,
                            p99_cost_usd: t.cost_usd.p99,
                            p99_duration_ms: t.duration_ms.p99,
                            mean_cost_usd: t.cost_usd.mean,
                        },
                    )
                })
                .collect();
            for (p, ending) in due {
                self.decide(p, ending, &live, &figures, now_ms);
            }
        }
        let c = &self.w.counters;
        c.buffer_bytes.set(self.assembler.bytes() as i64);
        c.buffer_traces.set(self.assembler.traces() as i64);
    }

    fn decide(
        &mut self,
        p: Pending,
        ending: Ending,
        live: &Live,
        figures: &[(&str, TypeFigures)],
        now_ms: u64,
    ) {
        let shape = self.shape(&p, live);
        let f = shape
            .task_type
            .as_deref()
            .and_then(|t| figures.iter().find(|(n, _)| *n == t).map(|(_, f)| f));
        let why = sample::decide(
            &shape,
            f,
            &live.policy.sampling,
            &mut self.sentinels,
            now_ms,
        );
        let kept = !why.is_empty();
        self.assembler.decided(p.trace_id, kept);
        self.w
            .counters
            .decided
            .get_or_create(&EndingLabels {
                ending: ending.as_str(),
                decision: if kept { "kept" } else { "dropped" },
            })
            .inc();
        if kept {
            for w in &why {
                self.w
                    .counters
                    .kept
                    .get_or_create(&WhyLabels { why: w.as_str() })
                    .inc();
            }
            self.keep(p, shape, why, ending, live, now_ms);
        }
    }

    /// What the sampler reads of a trace.
    fn shape(&self, p: &Pending, live: &Live) -> Shape {
        let mut s = Shape {
            trace_id: p.trace_id,
            ..Default::default()
        };
        let (mut start, mut end) = (u64::MAX, 0u64);
        let mut run: Option<(u64, u64)> = None;
        let mut workers = BTreeSet::new();
        let mut tasks = BTreeSet::new();
        for h in &p.spans {
            let f = &h.facts;
            s.error |= f.error;
            start = start.min(f.start_ns);
            end = end.max(f.end_ns);
            if f.task_root {
                s.has_run = true;
                run.get_or_insert((f.start_ns, f.end_ns));
            }
            if s.task_type.is_none() {
                s.task_type.clone_from(&f.task_type);
            }
            if s.pool.is_none() {
                s.pool.clone_from(&f.identity.pool);
            }
            workers.insert(f.identity.worker_id.as_str());
            if let Some(t) = &f.task_id {
                tasks.insert(t.as_str());
            }
            s.cost_usd += span_cost(f, live);
        }
        let (a, b) = run.unwrap_or((start, end));
        s.duration_ms = b.saturating_sub(a) as f64 / 1e6;
        let v = self.w.flags.verdict(
            workers.into_iter(),
            tasks.into_iter(),
            start / 1_000_000,
            end / 1_000_000,
        );
        s.task_failed = v.task_failed;
        s.flagged_by = v.flagged_by;
        let rules = &live.policy.sampling.rule;
        if !rules.is_empty() {
            s.rule_rate = rule_rate(&p.spans, rules);
        }
        s
    }

    /// Redacts, stores and exports a kept trace.
    fn keep(
        &mut self,
        p: Pending,
        shape: Shape,
        why: Vec<Why>,
        ending: Ending,
        live: &Live,
        now_ms: u64,
    ) {
        let mut summary = summarise(&p, &shape, why, ending, now_ms);
        let mut spans = p.spans;
        spans.extend(p.commander);
        let mut rs = assemble::to_resource_spans(spans);
        let mut counts = redact::Counts::new();
        self.redactor(live).apply(&mut rs, &mut counts);
        for (rule, n) in counts {
            summary.redactions += n;
            self.w
                .counters
                .redactions
                .get_or_create(&RuleLabels { rule })
                .inc_by(n);
        }
        let spans = summary.spans;
        let rs = Arc::new(rs);
        if let Err(e) = self
            .w
            .store
            .put(&p.trace_id, &mut summary, rs.as_ref().clone())
        {
            self.w.counters.store_errors.inc();
            tracing::warn!(error = %e, trace_id = %summary.trace_id, "kept trace not stored");
        }
        self.export(rs, spans);
    }

    /// Offers a kept trace to every endpoint while this replica leads; holds it back
    /// otherwise (the leader exports it; `follow_the_lead`).
    fn export(&mut self, trace: export::Batch, spans: u64) {
        if self.w.exporters.is_empty() {
            return;
        }
        if self.exporting {
            self.offer(trace, spans);
        } else {
            let now = std::time::Instant::now();
            self.standby.hold(now, trace, spans, self.standby_max);
        }
    }

    fn offer(&self, trace: export::Batch, spans: u64) {
        for x in &self.w.exporters {
            x.offer(trace.clone(), spans);
        }
    }

    /// Reads whether this replica leads: one that has just taken the lead exports what it
    /// held back first, from a little before it last heard the old leader on (what the old
    /// leader may not have sent); one that does not lets go of what it held back longer
    /// than [`export::STANDBY_FOR`].
    fn follow_the_lead(&mut self, now: std::time::Instant) {
        let leading = self.w.leading.now();
        if leading && !self.exporting {
            let from =
                (self.w.leading.other_last_heard()).and_then(|h| h.checked_sub(self.leader_lag));
            let held = self.standby.take(now, from);
            if !held.is_empty() {
                tracing::info!(
                    traces = held.len(),
                    "exporting the traces kept while another replica led"
                );
            }
            for (trace, spans) in held {
                self.offer(trace, spans);
            }
        } else if !leading {
            self.standby.expire(now);
        }
        self.exporting = leading;
    }

    fn redactor(&mut self, live: &Live) -> &Redactor {
        let salt = live
            .policy
            .privacy
            .hash_salt_env
            .as_ref()
            .and_then(|v| std::env::var(v).ok())
            .map(String::into_bytes);
        let stale = self
            .redactor
            .as_ref()
            .is_some_and(|(sha, s, _)| *sha != live.policy.sha256 || *s != salt);
        if stale {
            self.redactor = None;
        }
        let (_, _, r) = self.redactor.get_or_insert_with(|| {
            let r = Redactor::new(&live.policy, salt.clone());
            (live.policy.sha256.clone(), salt, r)
        });
        r
    }

    fn count_unmatched(&mut self) {
        let unmatched = self.assembler.unmatched();
        if unmatched > 0 {
            self.w.counters.span("commander_unmatched", unmatched);
        }
    }

    /// Everything still assembling is decided (at shutdown).
    pub fn flush(&mut self) {
        let now_ms = self.w.clock.now_ms();
        let live = self.w.engine.live();
        for p in self.assembler.drain() {
            self.decide(p, Ending::Lifetime, &live, &[], now_ms);
        }
        self.count_unmatched();
    }

    /// Old traces out, then the oldest while over the byte budget.
    pub fn prune(&self) {
        let c = &self.w.config;
        let cutoff = self
            .w
            .clock
            .now_ms()
            .saturating_sub(c.retention_hours.saturating_mul(3_600_000));
        loop {
            match self.w.store.prune(cutoff, c.store_bytes, 10_000) {
                Ok(10_000) => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "trace retention sweep failed");
                    break;
                }
            }
        }
        self.w
            .counters
            .stored_bytes
            .set(self.w.store.bytes() as i64);
        self.w.counters.stored_traces.set(self.w.store.len() as i64);
    }
}

/// USD of one span at the prices in force (LLM calls with usage only).
fn span_cost(f: &crate::domain::SpanFacts, live: &Live) -> f64 {
    match (&f.usage, &f.model) {
        (Some(u), Some(m)) => live.registry.lookup(m).map_or(0.0, |e| e.cost(u)),
        _ => 0.0,
    }
}

/// The highest rate of the `[sampling] rule`s whose attribute the trace carries with
/// that value (span or resource attributes).
fn rule_rate(spans: &[Held], rules: &[crate::policy::schema::SamplingRule]) -> Option<f64> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let mut best: Option<f64> = None;
    let mut consider = |attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue]| {
        for kv in attrs {
            let Some(Value::StringValue(v)) = kv.value.as_ref().and_then(|v| v.value.as_ref())
            else {
                continue;
            };
            for r in rules {
                if r.attribute == kv.key && r.value == *v {
                    best = Some(best.map_or(r.rate, |b| b.max(r.rate)));
                }
            }
        }
    };
    for h in spans {
        if let Some(span) = h.decode() {
            consider(&span.attributes);
        }
        if let Some(res) = &h.origin.resource {
            consider(&res.attributes);
        }
    }
    best
}

fn summarise(
    p: &Pending,
    shape: &Shape,
    why: Vec<Why>,
    ending: Ending,
    now_ms: u64,
) -> TraceSummary {
    const MAX: usize = 16;
    let mut s = TraceSummary {
        trace_id: store::hex(&p.trace_id),
        kept_at_ms: now_ms,
        why,
        flagged_by: shape.flagged_by.clone(),
        ending: ending.as_str().to_string(),
        status: if shape.error || shape.task_failed {
            "error".into()
        } else {
            "ok".into()
        },
        duration_ms: shape.duration_ms,
        spans: (p.spans.len() + p.commander.len()) as u64,
        cost_usd: shape.cost_usd,
        task_type: shape.task_type.clone(),
        ..Default::default()
    };
    // A commander's span (its dispatch, its classifier calls) starts the trace; the rest
    // of the summary is the run's, as the sampler read it.
    let mut start = (p.commander.iter())
        .map(|h| h.facts.start_ns)
        .min()
        .unwrap_or(u64::MAX);
    let add = |list: &mut Vec<String>, v: &str| {
        if list.len() < MAX && !list.iter().any(|x| x == v) {
            list.push(v.to_string());
        }
    };
    for h in &p.spans {
        let f = &h.facts;
        start = start.min(f.start_ns);
        if let Some(u) = &f.usage
            && f.operation.is_billed()
        {
            s.input_tokens += u.input;
            s.output_tokens += u.output;
        }
        add(&mut s.workers, &f.identity.worker_id);
        if let Some(pool) = &f.identity.pool {
            add(&mut s.pools, pool);
        }
        if let Some(t) = &f.task_id {
            add(&mut s.task_ids, t);
        }
        if let Some(m) = &f.model {
            add(&mut s.models, m);
        }
        if s.root_name.is_none() {
            s.root_name.clone_from(&h.root_name);
        }
    }
    s.start_unix_ms = if start == u64::MAX {
        0
    } else {
        start / 1_000_000
    };
    s
}

/// Runs the keeper until `stop`: exports in, decisions every 100 ms (reading the task
/// types' figures from `fleet`'s snapshot), retention every
/// minute; at shutdown everything assembling is decided.
pub async fn run(
    w: Arc<Wiring>,
    fleet: FleetHandle,
    mut rx: mpsc::Receiver<TraceBatch>,
    mut stop: watch::Receiver<bool>,
) {
    let mut keeper = Keeper::new(w);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            b = rx.recv() => match b {
                Some(b) => keeper.add(b),
                None => break,
            },
            _ = tick.tick() => keeper.tick(&fleet.snapshot()),
            _ = sweep.tick() => keeper.prune(),
            _ = stop.changed() => break,
        }
    }
    while let Ok(b) = rx.try_recv() {
        keeper.add(b);
    }
    keeper.flush();
    keeper.prune();
}

#[cfg(test)]
mod tests;
