//! A stored trace as the API serves it: its spans depth-first (children by start time),
//! each with its depth, its children's ids, its GenAI fields, tokens and cost, and what its
//! subtree adds up to, so a waterfall can be drawn and collapsed without recomputing.
//! Flat on purpose: a chain of thousands of spans is a long list, not a deep recursion.

use std::collections::{BTreeMap, HashMap};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use serde::Serialize;

use super::store::{Stored, TraceSummary, hex};
use crate::domain::{Operation, TokenUsage};
use crate::ingest::normalise;
use crate::registry::Registry;

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Subtree {
    pub spans: u64,
    /// From the subtree's first start to its last end.
    pub duration_ms: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EventView {
    pub name: String,
    pub time_unix_nano: u64,
    pub attributes: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SpanView {
    pub span_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    pub depth: usize,
    pub children: Vec<String>,
    pub name: String,
    /// `internal`, `server`, `client`, `producer`, `consumer` or `unspecified`.
    pub kind: &'static str,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// From the trace's first span start.
    pub offset_ms: f64,
    pub duration_ms: f64,
    /// `unset`, `ok` or `error`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    pub worker: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub operation: Operation,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenUsage>,
    /// LLM calls at the registry's prices; 0 for other spans.
    pub cost_usd: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    pub attributes: BTreeMap<String, serde_json::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventView>,
    pub subtree: Subtree,
}

/// A task the trace ran, with where its record and its routing decision are.
#[derive(Clone, Debug, Serialize)]
pub struct TaskLink {
    pub task_id: String,
    pub task: String,
    pub decision: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TraceView {
    #[serde(flatten)]
    pub summary: TraceSummary,
    pub tasks: Vec<TaskLink>,
    /// Depth-first, roots (spans whose parent is not in the trace) by start time.
    pub span_tree: Vec<SpanView>,
}

fn kind(k: i32) -> &'static str {
    match k {
        1 => "internal",
        2 => "server",
        3 => "client",
        4 => "producer",
        5 => "consumer",
        _ => "unspecified",
    }
}

fn status(code: i32) -> &'static str {
    match code {
        1 => "ok",
        2 => "error",
        _ => "unset",
    }
}

/// An attribute value as JSON (nesting is bounded by ingest's decode limits).
pub fn json_of(v: &AnyValue) -> serde_json::Value {
    use serde_json::Value as J;
    match &v.value {
        Some(any_value::Value::StringValue(s)) => J::String(s.clone()),
        Some(any_value::Value::BoolValue(b)) => J::Bool(*b),
        Some(any_value::Value::IntValue(i)) => J::from(*i),
        Some(any_value::Value::DoubleValue(d)) => {
            serde_json::Number::from_f64(*d).map_or(J::Null, J::Number)
        }
        Some(any_value::Value::ArrayValue(a)) => J::Array(a.values.iter().map(json_of).collect()),
        Some(any_value::Value::KvlistValue(l)) => J::Object(
            l.values
                .iter()
                .map(|kv| (kv.key.clone(), kv.value.as_ref().map_or(J::Null, json_of)))
                .collect(),
        ),
        Some(any_value::Value::BytesValue(b)) => J::String(hex(b)),
        // A string-table index (OTLP profiles): no table here to read it from.
        Some(any_value::Value::StringValueStrindex(i)) => J::from(*i),
        None => J::Null,
    }
}

fn attrs(list: &[KeyValue]) -> BTreeMap<String, serde_json::Value> {
    list.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map_or(serde_json::Value::Null, json_of),
            )
        })
        .collect()
}

/// Builds the view of a stored trace, pricing LLM calls with `registry`.
pub fn view(stored: Stored, registry: &Registry) -> TraceView {
    let request = ExportTraceServiceRequest {
        resource_spans: stored.resource_spans,
    };
    let (events, _) = normalise::spans(&request);
    let mut views: Vec<SpanView> = Vec::with_capacity(events.len());
    let mut ev = events.into_iter();
    for rs in &request.resource_spans {
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                if span.trace_id.len() != 16 || span.span_id.len() != 8 {
                    continue;
                }
                let Some(e) = ev.next() else { break };
                let cost = match (&e.usage, &e.model) {
                    (Some(u), Some(m)) if e.operation.is_billed() => {
                        registry.lookup(m).map_or(0.0, |x| x.cost(u))
                    }
                    _ => 0.0,
                };
                let (start, end) = (e.start_ns, e.end_ns);
                views.push(SpanView {
                    span_id: hex(&span.span_id),
                    parent_span_id: e.parent_span_id.map(|p| hex(&p)),
                    depth: 0,
                    children: Vec::new(),
                    name: span.name.clone(),
                    kind: kind(span.kind),
                    start_unix_nano: start,
                    end_unix_nano: end,
                    offset_ms: 0.0,
                    duration_ms: end.saturating_sub(start) as f64 / 1e6,
                    status: status(span.status.as_ref().map_or(0, |s| s.code)),
                    status_message: span
                        .status
                        .as_ref()
                        .filter(|s| !s.message.is_empty())
                        .map(|s| s.message.clone()),
                    worker: e.identity.worker_id.clone(),
                    pool: e.identity.pool.clone(),
                    service: e.identity.service.clone(),
                    operation: e.operation,
                    provider: e.provider,
                    model: e.model,
                    tool: e.tool,
                    tokens: e.usage,
                    cost_usd: cost,
                    task_id: e.task_id,
                    attributes: attrs(&span.attributes),
                    events: span
                        .events
                        .iter()
                        .map(|x| EventView {
                            name: x.name.clone(),
                            time_unix_nano: x.time_unix_nano,
                            attributes: attrs(&x.attributes),
                        })
                        .collect(),
                    subtree: Subtree::default(),
                });
            }
        }
    }
    let tasks = stored
        .summary
        .task_ids
        .iter()
        .map(|t| TaskLink {
            task_id: t.clone(),
            task: format!("/v1/tasks/{t}"),
            decision: format!("/v1/decisions/{t}"),
        })
        .collect();
    TraceView {
        summary: stored.summary,
        tasks,
        span_tree: depth_first(views),
    }
}

/// Orders spans depth-first with depths, children and subtree sums (iteratively).
fn depth_first(mut views: Vec<SpanView>) -> Vec<SpanView> {
    let first = views.iter().map(|v| v.start_unix_nano).min().unwrap_or(0);
    let index: HashMap<String, usize> = views
        .iter()
        .enumerate()
        .map(|(i, v)| (v.span_id.clone(), i))
        .collect();
    let mut kids: Vec<Vec<usize>> = vec![Vec::new(); views.len()];
    let mut roots = Vec::new();
    for (i, v) in views.iter().enumerate() {
        match v.parent_span_id.as_ref().and_then(|p| index.get(p)) {
            Some(&p) if p != i => kids[p].push(i),
            _ => roots.push(i),
        }
    }
    let by_start = |list: &mut Vec<usize>, views: &[SpanView]| {
        list.sort_by_key(|&i| (views[i].start_unix_nano, i));
    };
    by_start(&mut roots, &views);
    for k in &mut kids {
        by_start(k, &views);
    }
    // Pre-order walk with an explicit stack; a span seen twice (a cycle of parents) is
    // not walked again.
    let mut order = Vec::with_capacity(views.len());
    let mut seen = vec![false; views.len()];
    let mut stack: Vec<(usize, usize)> = roots.iter().rev().map(|&r| (r, 0)).collect();
    while let Some((i, depth)) = stack.pop() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        views[i].depth = depth;
        order.push(i);
        for &c in kids[i].iter().rev() {
            stack.push((c, depth + 1));
        }
    }
    // Spans only reachable through a cycle: shown as roots.
    order.extend(
        seen.iter()
            .enumerate()
            .filter(|(_, s)| !**s)
            .map(|(i, _)| i),
    );
    // Subtree sums, children before parents (reverse pre-order).
    let mut sums: Vec<(Subtree, u64, u64)> = views
        .iter()
        .map(|v| {
            let t = v.tokens.unwrap_or_default();
            (
                Subtree {
                    spans: 1,
                    duration_ms: 0.0,
                    input_tokens: if v.operation.is_billed() { t.input } else { 0 },
                    output_tokens: if v.operation.is_billed() { t.output } else { 0 },
                    cost_usd: v.cost_usd,
                },
                v.start_unix_nano,
                v.end_unix_nano,
            )
        })
        .collect();
    for &i in order.iter().rev() {
        for &c in &kids[i] {
            if c == i {
                continue;
            }
            let (child, cs, ce) = sums[c].clone();
            let s = &mut sums[i];
            s.0.spans += child.spans;
            s.0.input_tokens += child.input_tokens;
            s.0.output_tokens += child.output_tokens;
            s.0.cost_usd += child.cost_usd;
            s.1 = s.1.min(cs);
            s.2 = s.2.max(ce);
        }
    }
    let ids: Vec<String> = views.iter().map(|v| v.span_id.clone()).collect();
    for (i, v) in views.iter_mut().enumerate() {
        v.children = kids[i].iter().map(|&c| ids[c].clone()).collect();
        let (mut s, a, b) = sums[i].clone();
        s.duration_ms = b.saturating_sub(a) as f64 / 1e6;
        v.subtree = s;
        v.offset_ms = v.start_unix_nano.saturating_sub(first) as f64 / 1e6;
    }
    let mut slots: Vec<Option<SpanView>> = views.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}
