//! Planning one intake message: the policy's verdict (route, budgets, throttles) turned
//! into what the batch will do with it — dispatch (headers, payload, dispatch span, the
//! store record), defer, reject, or hold back for a throttle. Pure but for the ledger's
//! check-and-reserve and the routing snapshot's routed-since counter.

use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use bytes::Bytes;
use fleet_worker::message::{ErrorInfo, Task};
use fleet_worker::protocol::{self, headers};
use fleet_worker::span::{SpanKind, SpanRecord};
use fleet_worker::trace::{Baggage, TraceParent};

use super::{Ctx, fnv1a};
use crate::classify::Classification;
use crate::decisions::{DecisionInputs, DecisionRecord, Outcome};
use crate::policy::throttle::{ThrottleKeys, Throttled};
use crate::policy::{self, DeferredTask, EvalInput, Reservation, TaskDims, Verdict};
use crate::route::{self, Decision};
use crate::store::{DeferInfo, TaskRecord, TaskState, TraceInfo};

/// The attempt number of a first dispatch. Re-dispatch after failure (a later issue)
/// increments it; redelivery of the same dispatch does not.
pub(super) const FIRST_ATTEMPT: u32 = 1;

/// Decision-log rules of the policy's own outcomes.
pub(super) const BUDGET_DEFER: &str = "budget_defer";
pub(super) const BUDGET_REJECT: &str = "budget_reject";

/// One intake message, worked out.
pub(super) enum Plan {
    /// Already handled (a redelivery after a crash): just ack.
    Duplicate,
    Dispatch(Box<Dispatch>),
    Reject(Box<Reject>),
    Defer(Box<DeferPlan>),
    /// A throttle holds it back: left in the intake stream, redelivered after the wait.
    Throttle(Duration),
}

pub(super) struct Dispatch {
    pub(super) id: String,
    pub(super) pool: String,
    pub(super) subject: String,
    pub(super) headers: HeaderMap,
    pub(super) payload: Bytes,
    pub(super) span: SpanRecord,
    /// For the live state: how long the task should take, and its type.
    pub(super) expected_ms: Option<u64>,
    pub(super) task_type: Option<String>,
    /// Written once the work stream has acknowledged the dispatch.
    pub(super) record: DispatchRecord,
    /// Logged and published once the dispatch is acknowledged.
    pub(super) decision: DecisionRecord,
    /// Budget soft-threshold alerts this task raised, published after the batch.
    pub(super) alerts: Vec<serde_json::Value>,
}

/// A task a budget holds: stored in the deferred queue, then acked.
pub(super) struct DeferPlan {
    pub(super) id: String,
    pub(super) seq: u64,
    pub(super) entry: DeferredTask,
    pub(super) info: DeferInfo,
    pub(super) reply_to: Option<String>,
    pub(super) received_at: String,
    pub(super) decision: DecisionRecord,
}

/// What the store learns about a dispatched task, in one write.
pub(super) struct DispatchRecord {
    pub(super) seq: u64,
    pub(super) route_reason: String,
    pub(super) model: String,
    pub(super) decision_id: String,
    pub(super) decision_at_ms: u64,
    pub(super) priority: u8,
    pub(super) reply_to: Option<String>,
    pub(super) trace: TraceInfo,
    pub(super) received_at: String,
    /// The budget reservation, settled when the result comes.
    pub(super) reservation: Option<Reservation>,
    pub(super) policy_version: String,
    pub(super) generation: Option<crate::domain::Generation>,
    /// Times the task left the deferred queue, when this dispatch is a release.
    pub(super) releases: Option<u32>,
}

impl DispatchRecord {
    pub(super) fn apply(&self, r: &mut TaskRecord, pool: &str) {
        r.intake_sequence = self.seq;
        r.pool = Some(pool.to_string());
        r.route_reason = Some(self.route_reason.clone());
        r.model = Some(self.model.clone());
        r.decision_id = Some(self.decision_id.clone());
        r.decision_at_ms = Some(self.decision_at_ms);
        r.priority = self.priority;
        r.attempt = FIRST_ATTEMPT;
        r.reply_to = self.reply_to.clone();
        r.trace = Some(self.trace.clone());
        r.budget = self.reservation.clone();
        r.policy_version = Some(self.policy_version.clone());
        r.generation = self.generation.clone();
        if let (Some(n), Some(d)) = (self.releases, r.deferred.as_mut()) {
            d.releases = n;
        }
        r.advance_at(TaskState::Received, self.received_at.clone());
        r.advance(TaskState::Dispatched);
    }
}

impl Reject {
    /// A validated task always serialises; refuse rather than panic if one does not.
    pub(super) fn unserialisable(
        id: String,
        seq: u64,
        e: &serde_json::Error,
        reply_to: Option<String>,
    ) -> Plan {
        Self::plan(
            id,
            seq,
            "internal",
            format!("task did not serialise: {e}"),
            reply_to,
        )
    }

    pub(super) fn plan(
        id: String,
        seq: u64,
        code: &str,
        message: String,
        reply_to: Option<String>,
    ) -> Plan {
        let error = ErrorInfo {
            code: code.to_string(),
            message,
        };
        Plan::Reject(Box::new(Reject {
            id,
            seq,
            error,
            reply_to,
            decision: None,
        }))
    }
}

pub(super) struct Reject {
    pub(super) id: String,
    pub(super) seq: u64,
    pub(super) error: ErrorInfo,
    pub(super) reply_to: Option<String>,
    /// When routing refused the task: the decision that says why.
    pub(super) decision: Option<DecisionRecord>,
}

/// A valid task and everything known about it before routing.
pub(super) struct Prepared {
    pub(super) started: SystemTime,
    pub(super) received_at: String,
    pub(super) id: String,
    pub(super) seq: u64,
    pub(super) reply_to: Option<String>,
    pub(super) task: Task,
    pub(super) parent: Option<TraceParent>,
    /// The dispatch span's context (trace id + derived span id).
    pub(super) dispatch: TraceParent,
    pub(super) invalid: Option<String>,
    pub(super) tracestate: Option<String>,
    pub(super) baggage: Baggage,
    /// Out of the deferred queue: (first deferral ms, releases so far).
    pub(super) release: Option<(u64, u32)>,
}

/// The routing and policy inputs shared by a batch, read once.
pub(super) struct View {
    pub(super) fleet: std::sync::Arc<route::RouteSnapshot>,
    /// The one live snapshot (routing table, registry, rubric, policy), read once.
    pub(super) live: std::sync::Arc<crate::policy::Live>,
    /// Deferred tasks waiting per (budget, value).
    pub(super) queued: std::collections::BTreeMap<(String, String), usize>,
    pub(super) now_ms: u64,
}

/// What the policy made of a task, owned (the verdict borrows the policy).
pub(super) enum Step {
    Go {
        decision: Decision,
        reservation: Option<Reservation>,
        alerts: Vec<serde_json::Value>,
    },
    Throttled(Throttled),
    Defer {
        decision: Decision,
        reason: String,
        until_ms: Option<u64>,
        queues: Vec<(String, String)>,
    },
    BudgetReject {
        decision: Decision,
        reason: String,
    },
    NoRoute(route::NoRoute),
}

/// What one decision reads besides the context.
struct Deciding<'a> {
    id: &'a str,
    task: &'a Task,
    class: &'a Classification,
    dims: &'a TaskDims,
    /// The task is coming back from the deferred queue.
    released: bool,
    view: &'a View,
}

/// The policy's verdict on a task, then its throttles, and its budget reservation: checked
/// and reserved under one lock, so concurrent batches cannot both take the last of a
/// budget.
fn decide_step(ctx: &Ctx, d: Deciding<'_>) -> Step {
    let Deciding {
        id,
        task,
        class,
        dims,
        released,
        view,
    } = d;
    let live = &view.live;
    ctx.core.policy.with_ledger(|ledger| {
        let verdict = policy::evaluate(EvalInput {
            task,
            class: &class.answer,
            dims,
            rubric: &live.rubric,
            registry: &live.registry,
            fleet: &view.fleet,
            table: &live.routing,
            policy: &live.policy,
            hints: &live.hints,
            ledger,
            queued: &view.queued,
            released,
            now_ms: view.now_ms,
            seed: fnv1a(&[b"seed", id.as_bytes()]),
        });
        match verdict {
            Verdict::Dispatch { decision, check } => {
                if !live.throttles.is_empty() {
                    let keys = ThrottleKeys {
                        pool: &decision.pool,
                        team: dims.team.as_deref(),
                        producer: dims.producer.as_deref(),
                        worker: decision.worker.as_deref(),
                    };
                    let tokens = class.answer.input_tokens + class.answer.output_tokens;
                    if let Err(t) = live.throttles.admit(keys, tokens) {
                        return Step::Throttled(t);
                    }
                }
                let est = decision.est_cost_usd.unwrap_or(0.0);
                let reservation = (!check.cells.is_empty()).then(|| Reservation {
                    cells: check.cells.clone(),
                    est_usd: est,
                });
                if let Some(r) = &reservation {
                    ledger.reserve(&r.cells, est);
                }
                let alerts = soft_alerts(ctx, &check, id, &live.policy.version, view.now_ms);
                Step::Go {
                    decision,
                    reservation,
                    alerts,
                }
            }
            Verdict::Defer {
                decision,
                reason,
                until_ms,
                queues,
            } => Step::Defer {
                decision,
                reason,
                until_ms,
                queues,
            },
            Verdict::Reject { decision, reason } => Step::BudgetReject { decision, reason },
            Verdict::NoRoute(n) => Step::NoRoute(n),
        }
    })
}

/// A budget's soft threshold crossed for the first time in its window: one alert each.
fn soft_alerts(
    ctx: &Ctx,
    check: &policy::budget::Check<'_>,
    task_id: &str,
    version: &str,
    now_ms: u64,
) -> Vec<serde_json::Value> {
    check
        .soft
        .iter()
        .filter(|h| {
            h.alert
                && ctx.core.policy.first_alert(
                    &h.budget.spec.name,
                    &h.value,
                    h.budget.window.bucket(now_ms),
                    h.at,
                )
        })
        .map(|h| {
            serde_json::json!({
                "alert": "budget_soft_threshold",
                "severity": "warning",
                "budget": h.budget.spec.name,
                "value": h.value,
                "threshold": h.at,
                "used": h.fraction,
                "limit_usd": h.budget.spec.limit_usd,
                "window": h.budget.spec.window,
                "policy_version": version,
                "task_id": task_id,
            })
        })
        .collect()
}

/// Decides where a classified task goes (route, budgets, throttles) and builds its
/// dispatch, deferral or rejection.
pub(super) fn plan(ctx: &Ctx, p: Prepared, class: Classification, view: &View) -> Plan {
    let Prepared {
        started,
        received_at,
        id,
        seq,
        reply_to,
        mut task,
        parent,
        dispatch,
        invalid,
        tracestate,
        baggage,
        release,
    } = p;
    let trace_id = dispatch.trace_id;
    let View {
        fleet,
        live,
        now_ms,
        ..
    } = view;
    let version = live.policy.version.clone();
    let generation = live.generation();
    let dims = TaskDims::from_task(&task.attributes, baggage.iter());
    let decision_id = derived_decision_id(&id, seq, FIRST_ATTEMPT);
    let step = {
        let _span = tracing::debug_span!("decide", task_id = %id).entered();
        decide_step(
            ctx,
            Deciding {
                id: &id,
                task: &task,
                class: &class,
                dims: &dims,
                released: release.is_some(),
                view,
            },
        )
    };
    let inputs = DecisionInputs {
        requested_pool: task.pool.clone(),
        requested_model: task.model.clone(),
        max_cost_usd: task.max_cost_usd,
        dims: dims.clone(),
    };
    let record = |outcome: Outcome,
                  d: Option<&Decision>,
                  rule: &str,
                  reason: String,
                  candidates: Vec<route::Candidate>| {
        DecisionRecord {
            id: decision_id.clone(),
            task_id: id.clone(),
            at_ms: crate::fleet::now_ms(),
            at: received_at.clone(),
            outcome,
            pool: d.map(|d| d.pool.clone()),
            model: d.map(|d| d.model.clone()),
            worker: d.and_then(|d| d.worker.clone()),
            rule: rule.to_string(),
            reason,
            task_type: class.answer.task_type.clone(),
            tier: d
                .map(|d| d.tier.clone())
                .unwrap_or_else(|| class.answer.tier.clone()),
            est_cost_usd: d.and_then(|d| d.est_cost_usd),
            priority: task.priority,
            classification: class.clone(),
            candidates,
            rubric: live.rubric.name.clone(),
            policy_version: Some(version.clone()),
            generation: Some(generation.clone()),
            inputs: inputs.clone(),
            trace_id: Some(trace_id.to_hex()),
        }
    };
    let (mut decision, reservation, alerts) = match step {
        Step::Go {
            decision,
            reservation,
            alerts,
        } => (decision, reservation, alerts),
        Step::Throttled(t) => {
            ctx.core.policy.counters.throttled.inc();
            tracing::debug!(task_id = %id, throttle = %t.name, key = %t.key, wait_ms = t.wait.as_millis() as u64, "throttled");
            return Plan::Throttle(t.wait);
        }
        Step::NoRoute(no_route) => {
            let reason = no_route.to_string();
            let logged = record(
                Outcome::Rejected,
                None,
                no_route.code(),
                reason.clone(),
                no_route.candidates().to_vec(),
            );
            let mut plan = Reject::plan(id, seq, no_route.code(), reason, reply_to);
            if let Plan::Reject(r) = &mut plan {
                r.decision = Some(logged);
            }
            return plan;
        }
        Step::BudgetReject { decision, reason } => {
            ctx.core.policy.counters.budget_rejected.inc();
            let logged = record(
                Outcome::Rejected,
                Some(&decision),
                BUDGET_REJECT,
                reason.clone(),
                decision.candidates.clone(),
            );
            let mut plan = Reject::plan(id, seq, "budget_exceeded", reason, reply_to);
            if let Plan::Reject(r) = &mut plan {
                r.decision = Some(logged);
            }
            return plan;
        }
        Step::Defer {
            decision,
            reason,
            until_ms,
            queues,
        } => {
            if ctx.core.policy.deferrals.is_full() {
                let why = format!(
                    "{reason}; but the deferred queue is full ({} tasks), so it is rejected",
                    ctx.core.policy.deferrals.len()
                );
                return Reject::plan(id, seq, "deferred_queue_full", why, reply_to);
            }
            let (deferred_at_ms, releases) = release.unwrap_or((*now_ms, 0));
            let logged = record(
                Outcome::Deferred,
                Some(&decision),
                BUDGET_DEFER,
                reason.clone(),
                decision.candidates.clone(),
            );
            let mut hdrs = Vec::new();
            if let Some(p) = parent {
                hdrs.push((headers::TRACEPARENT.to_string(), p.to_header()));
                if let Some(ts) = &tracestate {
                    hdrs.push((headers::TRACESTATE.to_string(), ts.clone()));
                }
            }
            if !baggage.is_empty() {
                hdrs.push((headers::BAGGAGE.to_string(), baggage.to_header()));
            }
            if let Some(r) = &reply_to {
                hdrs.push((headers::REPLY_TO.to_string(), r.clone()));
            }
            let task_json = match serde_json::to_string(&task) {
                Ok(j) => j,
                Err(e) => return Reject::unserialisable(id, seq, &e, reply_to),
            };
            let until = until_ms.map(crate::policy::budget::rfc3339);
            let entry = DeferredTask {
                id: id.clone(),
                priority: task.priority,
                deferred_at_ms,
                deferred_at: crate::policy::budget::rfc3339(deferred_at_ms),
                reason: reason.clone(),
                until_ms,
                until: until.clone(),
                queues,
                pool: decision.pool.clone(),
                model: decision.model.clone(),
                est_usd: decision.est_cost_usd.unwrap_or(0.0),
                dims,
                policy_version: version.clone(),
                task_json,
                headers: hdrs,
                releases,
            };
            let info = DeferInfo {
                reason,
                until,
                deferred_at: entry.deferred_at.clone(),
                releases,
            };
            return Plan::Defer(Box::new(DeferPlan {
                id,
                seq,
                entry,
                info,
                reply_to,
                received_at,
                decision: logged,
            }));
        }
    };
    fleet.note_routed(&decision.pool);
    task.pool = Some(decision.pool.clone());
    task.model = Some(decision.model.clone());
    let subject = match &decision.worker {
        Some(w) => ctx.subjects.work_targeted(&decision.pool, w),
        None => ctx.subjects.work(&decision.pool),
    };

    let trace_info = TraceInfo {
        trace_id: trace_id.to_hex(),
        dispatch_span_id: dispatch.span_id.to_hex(),
        parent_span_id: parent.map(|p| p.span_id.to_hex()),
        invalid_traceparent: invalid.clone(),
        traceparent: dispatch.to_header(),
    };
    let mut h = HeaderMap::new();
    let mut set = |k: &str, v: &str| {
        if let Err(e) = protocol::set_header(&mut h, k, v) {
            tracing::warn!(error = %e, "header left out");
        }
    };
    set(headers::TRACEPARENT, &dispatch.to_header());
    if let Some(ts) = &tracestate {
        set(headers::TRACESTATE, ts);
    }
    if !baggage.is_empty() {
        set(headers::BAGGAGE, &baggage.to_header());
    }
    set(headers::NATS_MSG_ID, &format!("{id}:{FIRST_ATTEMPT}"));
    set(headers::TASK_ID, &id);
    set(headers::ATTEMPT, &FIRST_ATTEMPT.to_string());
    set(headers::MODEL, &decision.model);
    set(headers::DECISION_ID, &decision_id);
    if let Some(d) = &task.deadline {
        set(headers::DEADLINE, d);
    }
    if let Some(r) = &reply_to {
        set(headers::REPLY_TO, r);
    }
    let payload = match serde_json::to_vec(&task) {
        Ok(p) => Bytes::from(p),
        Err(e) => return Reject::unserialisable(id, seq, &e, reply_to),
    };

    let mut span = SpanRecord::new(
        format!("send {subject}"),
        SpanKind::Producer,
        trace_id,
        dispatch.span_id,
    );
    span.start = started;
    span.parent_span_id = parent.map(|p| p.span_id);
    span.attr("messaging.system", "nats")
        .attr("messaging.operation.type", "send")
        .attr("messaging.operation.name", "send")
        .attr("messaging.destination.name", subject.clone())
        .attr("fleet.task.id", id.clone())
        .attr("fleet.attempt", FIRST_ATTEMPT)
        .attr("fleet.pool", decision.pool.clone())
        .attr("fleet.decision.id", decision_id.clone())
        .attr("fleet.route.rule", decision.rule.as_str())
        .attr("fleet.task.type", class.answer.task_type.clone())
        .attr("fleet.task.tier", decision.tier.clone())
        .attr("fleet.classification.source", class.source.as_str())
        .attr(
            "fleet.decision.candidates",
            decision.candidates.len() as i64,
        )
        .attr("gen_ai.request.model", decision.model.clone())
        .attr("fleet.intake.sequence", seq as i64);
    if let Some(c) = decision.est_cost_usd {
        span.attr("fleet.decision.est_cost_usd", c);
    }
    if let Some(w) = &decision.worker {
        span.attr("fleet.worker.target", w.clone());
    }
    if let Some(bad) = &invalid {
        span.attr("fleet.traceparent.invalid", bad.clone());
    }
    for (k, v) in baggage.iter() {
        span.attr(k, v);
    }
    tracing::debug!(task_id = %id, pool = %decision.pool, model = %decision.model, rule = decision.rule.as_str(), trace_id = %trace_id, "dispatching");
    let candidates = std::mem::take(&mut decision.candidates);
    let logged = record(
        Outcome::Dispatched,
        Some(&decision),
        decision.rule.as_str(),
        decision.reason.clone(),
        candidates,
    );
    let record = DispatchRecord {
        seq,
        route_reason: decision.reason.clone(),
        model: decision.model.clone(),
        decision_id,
        decision_at_ms: logged.at_ms,
        priority: task.priority,
        reply_to,
        trace: trace_info,
        received_at,
        reservation,
        policy_version: version,
        generation: logged.generation.clone(),
        releases: release.map(|(_, n)| n),
    };
    Plan::Dispatch(Box::new(Dispatch {
        id,
        pool: decision.pool,
        subject,
        headers: h,
        payload,
        span,
        expected_ms: task.expected_duration_s.map(|s| (s * 1000.0) as u64),
        task_type: Some(class.answer.task_type),
        record,
        decision: logged,
        alerts,
    }))
}

/// Same task, same submission, same attempt: same decision id (a redelivery replaces the
/// logged decision instead of adding one).
pub(super) fn derived_decision_id(id: &str, seq: u64, attempt: u32) -> String {
    let h = fnv1a(&[
        b"decision",
        id.as_bytes(),
        &seq.to_le_bytes(),
        &attempt.to_le_bytes(),
    ]);
    format!("dec-{h:016x}")
}
