//! Whose span is it? A span belongs to the agent of its trace: the nearest ancestor that
//! names one (an `invoke_agent` span with `gen_ai.agent.id`, a span with
//! `fleet.worker.id` …), else its resource. The official OpenAI instrumentation, for one,
//! puts the agent id only on the agent's own `invoke_agent` span, and its `chat` spans
//! carry the process's resource alone: read span by span, one agent would be two workers.
//!
//! Spans arrive when they end, so an agent's root span usually comes last, after its
//! children. A child whose chain of parents is not known yet waits here until an
//! ancestor that names an agent arrives (it is then applied to that agent, before the
//! ancestor itself, so the run ends last) or until `fleet.identity_wait_ms` passes; a
//! process that shows no agent by then waits no more (until it does). While
//! it would wait, a child from a process that has only ever run one top-level agent (its
//! agent spans are all trace roots, of one agent) is attributed to that agent at once, so
//! a running agent shows live; a process that ran several agents, or agents under other
//! spans (an orchestrator's sub-agents), makes its children wait for their real ancestor. Everything here is bounded: traces and spans remembered, spans waiting; what
//! does not fit is applied to its resource at once and counted.
//!
//! Pure: the caller passes the time.

use std::collections::VecDeque;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::domain::{Identity, Operation, SpanEvent};

/// Spans remembered (their parent and agent), over all traces.
const MAX_NODES: usize = 200_000;
/// Spans waiting for an ancestor, over all traces.
const MAX_WAITING: usize = 50_000;
/// Parent links followed to find a span's agent.
const MAX_DEPTH: usize = 64;
/// A trace with no new span for this long is forgotten.
const TRACE_IDLE_MS: u64 = 10 * 60_000;
/// How long a process is remembered as running one agent.
const RESOURCE_AGENT_MS: u64 = 30 * 60_000;
/// How often idle traces and processes are looked for. That walks everything remembered
/// (up to [`MAX_NODES`] traces), so it runs once a minute rather than every tick: done
/// every second it cost 2-4 % of the commander's CPU once 200,000 traces were remembered.
const IDLE_SWEEP_MS: u64 = 60_000;

#[derive(Debug)]
struct Node {
    parent: Option<[u8; 8]>,
    /// The agent this span belongs to, once known.
    agent: Option<Arc<Identity>>,
}

#[derive(Debug, Default)]
struct Trace {
    last_ms: u64,
    nodes: FxHashMap<[u8; 8], Node>,
    /// Spans waiting for an ancestor, with their arrival time.
    waiting: Vec<(SpanEvent, u64)>,
}

/// The agents a process (resource) has run lately.
#[derive(Debug)]
struct ResourceAgents {
    agent: Arc<Identity>,
    /// More than one agent seen: its spans must wait for their ancestors.
    several: bool,
    last_ms: u64,
}

/// Counters of the lineage, for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LineageCounts {
    /// Spans attributed to an ancestor's agent rather than their resource.
    pub inherited: u64,
    /// Spans that waited for an ancestor.
    pub waited: u64,
    /// Waiting spans whose ancestor never came in time (applied to their resource or the
    /// process's one agent).
    pub timed_out: u64,
    /// Spans applied at once because a bound was reached.
    pub overflowed: u64,
}

/// The trace-to-agent bookkeeping of the live state.
#[derive(Debug, Default)]
pub struct Lineage {
    traces: FxHashMap<[u8; 16], Trace>,
    /// Traces in the order first seen, for eviction.
    order: VecDeque<[u8; 16]>,
    nodes: usize,
    waiting: usize,
    /// Traces that had spans waiting when last looked at (a superset: an id whose spans
    /// were all released, or whose trace is gone, leaves at the next tick), so a tick
    /// looks at these alone for spans that waited too long.
    waiting_traces: rustc_hash::FxHashSet<[u8; 16]>,
    /// When idle traces were last looked for.
    swept_ms: u64,
    resources: FxHashMap<String, ResourceAgents>,
    /// Processes whose spans carry token counts.
    span_usage: rustc_hash::FxHashSet<String>,
    /// Processes that showed no agent while one of their spans waited the whole wait:
    /// their spans no longer wait (a plain instrumented service pays the wait once).
    agentless: rustc_hash::FxHashSet<String>,
    pub counts: LineageCounts,
}

/// Children that waited in `trace` and whose ancestry is now known: to their agent, or,
/// when the chain has reached a root that names none, to their resource.
fn release_children(
    trace: &mut Trace,
    waiting_total: &mut usize,
    counts: &mut LineageCounts,
    out: &mut Vec<SpanEvent>,
) {
    let waiting = std::mem::take(&mut trace.waiting);
    for (mut child, at) in waiting {
        match resolve(&trace.nodes, child.parent_span_id) {
            Resolved::Agent(a) => {
                *waiting_total -= 1;
                if let Some(n) = trace.nodes.get_mut(&child.span_id) {
                    n.agent = Some(a.clone());
                }
                counts.inherited += 1;
                child.identity = a;
                out.push(child);
            }
            Resolved::Resource => {
                *waiting_total -= 1;
                out.push(child);
            }
            Resolved::Unknown => trace.waiting.push((child, at)),
        }
    }
}

impl Lineage {
    /// Takes one span; pushes onto `out` every span now ready to apply, with its identity
    /// settled: waiting children it resolved first, then the span itself (unless it waits).
    pub fn admit(&mut self, mut ev: SpanEvent, now_ms: u64, out: &mut Vec<SpanEvent>) {
        // Known as soon as the span arrives, waiting or not: the process's metrics are
        // then the same tokens again.
        if ev.usage.is_some() && ev.operation.is_billed() {
            self.note_span_usage(&ev.resource.worker_id);
        }
        if ev.names_agent {
            self.note_resource_agent(&ev, now_ms);
            if ev.operation == Operation::InvokeAgent {
                // An agent's own span ends its run, whatever its parent is (a sub-agent
                // under an orchestrator is a run of its own worker).
                ev.task_root = true;
            }
        }
        // The common case costs nothing: a span of a process that names its worker, in a
        // trace where no span has needed the lineage, is its resource's as it is.
        if ev.resource_names_worker && !ev.names_agent && !self.traces.contains_key(&ev.trace_id) {
            out.push(ev);
            return;
        }
        self.make_room(out);
        let trace = self.traces.entry(ev.trace_id).or_insert_with(|| {
            self.order.push_back(ev.trace_id);
            Trace::default()
        });
        trace.last_ms = now_ms;
        let agent = if ev.names_agent {
            Some(ev.identity.clone())
        } else {
            match resolve(&trace.nodes, ev.parent_span_id) {
                Resolved::Agent(a) => Some(a),
                Resolved::Resource => None,
                // A resource that names its worker, or a task's root span (its parent is
                // the commander's dispatch span, never sent here), does not wait.
                Resolved::Unknown
                    if ev.resource_names_worker
                        || ev.task_root
                        || self.agentless.contains(&ev.resource.worker_id) =>
                {
                    None
                }
                Resolved::Unknown => {
                    let fallback = self
                        .resources
                        .get(&ev.resource.worker_id)
                        .filter(|r| {
                            !r.several && now_ms.saturating_sub(r.last_ms) < RESOURCE_AGENT_MS
                        })
                        .map(|r| r.agent.clone());
                    match fallback {
                        Some(a) => Some(a),
                        None if self.waiting < MAX_WAITING => {
                            if trace.nodes.len() < MAX_NODES {
                                trace.nodes.insert(
                                    ev.span_id,
                                    Node {
                                        parent: ev.parent_span_id,
                                        agent: None,
                                    },
                                );
                                self.nodes += 1;
                            }
                            self.waiting += 1;
                            self.counts.waited += 1;
                            self.waiting_traces.insert(ev.trace_id);
                            trace.waiting.push((ev, now_ms));
                            return;
                        }
                        None => {
                            self.counts.overflowed += 1;
                            None
                        }
                    }
                }
            }
        };
        let node = Node {
            parent: ev.parent_span_id,
            agent: agent.clone(),
        };
        if trace.nodes.insert(ev.span_id, node).is_none() {
            self.nodes += 1;
        }
        // Children that waited for this span (or an ancestor now known through it) go
        // before it, so a run ends with its root.
        if !trace.waiting.is_empty() {
            release_children(trace, &mut self.waiting, &mut self.counts, out);
        }
        if let Some(a) = agent
            && !ev.names_agent
        {
            self.counts.inherited += u64::from(!Arc::ptr_eq(&a, &ev.identity));
            ev.identity = a;
        }
        out.push(ev);
    }

    /// Applies spans that waited too long (to the process's one agent, else their
    /// resource); once a minute, forgets idle traces and processes. Call once a tick.
    pub fn expire(&mut self, now_ms: u64, wait_ms: u64, out: &mut Vec<SpanEvent>) {
        let (traces, resources) = (&mut self.traces, &self.resources);
        let (waiting, counts, agentless) =
            (&mut self.waiting, &mut self.counts, &mut self.agentless);
        self.waiting_traces.retain(|id| {
            let Some(trace) = traces.get_mut(id) else {
                return false;
            };
            let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut trace.waiting)
                .into_iter()
                .partition(|(_, at)| now_ms.saturating_sub(*at) >= wait_ms);
            trace.waiting = keep;
            for (mut ev, _) in due {
                *waiting -= 1;
                counts.timed_out += 1;
                match resources.get(&ev.resource.worker_id) {
                    Some(r) if !r.several => ev.identity = r.agent.clone(),
                    Some(_) => {}
                    None => {
                        if agentless.len() < 10_000 {
                            agentless.insert(ev.resource.worker_id.clone());
                        }
                    }
                }
                out.push(ev);
            }
            !trace.waiting.is_empty()
        });
        if now_ms.saturating_sub(self.swept_ms) >= IDLE_SWEEP_MS {
            self.forget_idle(now_ms);
        }
    }

    /// Forgets traces with nothing waiting and no span for [`TRACE_IDLE_MS`], and
    /// processes not seen running their agent for [`RESOURCE_AGENT_MS`].
    fn forget_idle(&mut self, now_ms: u64) {
        self.swept_ms = now_ms;
        let mut forgotten = 0;
        self.traces.retain(|_, t| {
            let idle = t.waiting.is_empty() && now_ms.saturating_sub(t.last_ms) >= TRACE_IDLE_MS;
            if idle {
                forgotten += t.nodes.len();
            }
            !idle
        });
        self.nodes = self.nodes.saturating_sub(forgotten);
        self.order.retain(|id| self.traces.contains_key(id));
        self.resources
            .retain(|_, r| now_ms.saturating_sub(r.last_ms) < RESOURCE_AGENT_MS);
    }

    /// The one top-level agent a process (by its resource's worker id) runs, if that is
    /// all it has run lately: where its metrics, which carry no trace, belong.
    pub fn agent_of_resource(&self, resource: &str, now_ms: u64) -> Option<Arc<Identity>> {
        self.resources
            .get(resource)
            .filter(|r| !r.several && now_ms.saturating_sub(r.last_ms) < RESOURCE_AGENT_MS)
            .map(|r| r.agent.clone())
    }

    /// Notes that a process's spans carry token counts (its metrics are then the same
    /// tokens again).
    pub fn note_span_usage(&mut self, resource: &str) {
        if !self.span_usage.contains(resource) && self.span_usage.len() < 10_000 {
            self.span_usage.insert(resource.to_string());
        }
    }

    /// Whether a process's spans carry token counts.
    pub fn spans_carry_usage(&self, resource: &str) -> bool {
        self.span_usage.contains(resource)
    }

    /// Spans waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Remembers which agent a process runs. Only a process whose agent spans are all
    /// trace roots, all of one agent, is taken to run one agent: an agent span with a
    /// parent may be a sub-agent (an orchestrator's), and then an orphan call could be
    /// any of them.
    fn note_resource_agent(&mut self, ev: &SpanEvent, now_ms: u64) {
        self.agentless.remove(&ev.resource.worker_id);
        let nested = ev.parent_span_id.is_some();
        match self.resources.get_mut(&ev.resource.worker_id) {
            Some(r) => {
                if nested || r.agent.worker_id != ev.identity.worker_id {
                    r.several = true;
                }
                r.last_ms = now_ms;
            }
            None => {
                if self.resources.len() < 10_000 {
                    self.resources.insert(
                        ev.resource.worker_id.clone(),
                        ResourceAgents {
                            agent: ev.identity.clone(),
                            several: nested,
                            last_ms: now_ms,
                        },
                    );
                }
            }
        }
    }

    /// Evicts the oldest traces while over the node budget; their waiting spans go to
    /// their resources.
    fn make_room(&mut self, out: &mut Vec<SpanEvent>) {
        while self.nodes >= MAX_NODES {
            let Some(id) = self.order.pop_front() else {
                break;
            };
            if let Some(t) = self.traces.remove(&id) {
                self.nodes = self.nodes.saturating_sub(t.nodes.len());
                for (ev, _) in t.waiting {
                    self.waiting -= 1;
                    self.counts.overflowed += 1;
                    out.push(ev);
                }
            }
        }
    }
}

enum Resolved {
    /// An ancestor names (or inherited) this agent.
    Agent(Arc<Identity>),
    /// The chain reached its root without an agent: the span is its resource's.
    Resource,
    /// An ancestor has not arrived yet.
    Unknown,
}

fn resolve(nodes: &FxHashMap<[u8; 8], Node>, mut parent: Option<[u8; 8]>) -> Resolved {
    for _ in 0..MAX_DEPTH {
        let Some(p) = parent else {
            return Resolved::Resource;
        };
        match nodes.get(&p) {
            None => return Resolved::Unknown,
            Some(n) => {
                if let Some(a) = &n.agent {
                    return Resolved::Agent(a.clone());
                }
                parent = n.parent;
            }
        }
    }
    Resolved::Resource
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Dims;

    fn identity(worker: &str) -> Arc<Identity> {
        Arc::new(Identity {
            worker_id: worker.into(),
            ..Default::default()
        })
    }

    /// A span of a process that does not name its worker, in trace `trace`.
    fn span(trace: u8, id: u8, parent: Option<u8>) -> SpanEvent {
        SpanEvent {
            identity: identity("proc"),
            agent_name: None,
            trace_id: [trace; 16],
            span_id: [id; 8],
            parent_span_id: parent.map(|p| [p; 8]),
            start_ns: 0,
            end_ns: 1,
            error: false,
            error_type: None,
            operation: Operation::Inference,
            provider: None,
            model: None,
            usage: None,
            tool: None,
            tool_args_hash: None,
            task_id: None,
            expected_duration_s: None,
            task_root: false,
            dims: Dims::default(),
            names_agent: false,
            resource: identity("proc"),
            resource_names_worker: false,
        }
    }

    /// A child whose parent never comes waits `wait_ms`, then is applied once; a trace
    /// with nothing new for `TRACE_IDLE_MS` is forgotten by the next minute's sweep, not
    /// by every tick.
    #[test]
    fn waiting_spans_time_out_each_tick_and_idle_traces_go_once_a_minute() {
        let mut l = Lineage::default();
        let mut out = Vec::new();
        l.admit(span(1, 2, Some(9)), 1_000, &mut out);
        assert!(out.is_empty(), "its parent is not known: it waits");
        l.admit(span(2, 1, None), 1_000, &mut out);
        assert_eq!(out.len(), 1, "a root is its resource's at once");
        out.clear();

        l.expire(1_500, 1_000, &mut out);
        assert!(out.is_empty(), "not waited long enough");
        l.expire(2_000, 1_000, &mut out);
        assert_eq!(out.len(), 1, "waited its time: applied");
        assert_eq!((l.waiting, l.counts.timed_out), (0, 1));
        l.expire(3_000, 1_000, &mut out);
        assert_eq!(out.len(), 1, "applied once");
        assert!(l.waiting_traces.is_empty());

        assert_eq!(l.traces.len(), 2);
        l.expire(1_000 + TRACE_IDLE_MS, 1_000, &mut out);
        assert_eq!(l.traces.len(), 0, "idle for ten minutes: forgotten");
        assert_eq!((l.nodes, l.order.len()), (0, 0));

        let t3 = 1_000 + TRACE_IDLE_MS;
        l.admit(span(3, 1, None), t3, &mut out);
        l.expire(t3 + TRACE_IDLE_MS - 1, 1_000, &mut out);
        assert_eq!(l.traces.len(), 1, "not idle long enough at that sweep");
        l.expire(t3 + TRACE_IDLE_MS + 1, 1_000, &mut out);
        assert_eq!(
            l.traces.len(),
            1,
            "idle now, but the last sweep was 2 ms ago"
        );
        l.expire(t3 + TRACE_IDLE_MS - 1 + IDLE_SWEEP_MS, 1_000, &mut out);
        assert_eq!(l.traces.len(), 0);
    }
}
