//! Intake: read submitted tasks, validate, route, dispatch to the pool subject under a
//! dispatch span, record, ack.

use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use fleet_worker::message::{ErrorInfo, Task, TaskResult, now_rfc3339};
use fleet_worker::protocol::{self, header, headers, is_publish_subject, is_subject_token};
use fleet_worker::span::{SpanKind, SpanRecord};
use fleet_worker::trace::{Baggage, FLAG_SAMPLED, SpanId, TraceId, TraceParent, parse_tracestate};
use tracing::Instrument;

use super::{Ctx, fnv1a};
use crate::classify::{Classification, TraceCtx};
use crate::decisions::{DecisionInputs, DecisionRecord, Outcome};
use crate::fleet::TaskEvent;
use crate::metrics::PoolLabel;
use crate::policy::throttle::{ThrottleKeys, Throttled};
use crate::policy::{self, DeferredTask, EvalInput, Reservation, TaskDims, Verdict};
use crate::route::{self, Decision};
use crate::store::DeferInfo;
use crate::store::{TaskRecord, TaskState, TraceInfo};

/// The attempt number of a first dispatch. Re-dispatch after failure (a later issue)
/// increments it; redelivery of the same dispatch does not.
const FIRST_ATTEMPT: u32 = 1;

/// Decision-log rules of the policy's own outcomes.
const BUDGET_DEFER: &str = "budget_defer";
const BUDGET_REJECT: &str = "budget_reject";

/// One intake message, worked out.
enum Plan {
    /// Already handled (a redelivery after a crash): just ack.
    Duplicate,
    Dispatch(Box<Dispatch>),
    Reject(Box<Reject>),
    Defer(Box<DeferPlan>),
    /// A throttle holds it back: left in the intake stream, redelivered after the wait.
    Throttle(Duration),
}

struct Dispatch {
    id: String,
    pool: String,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    span: SpanRecord,
    /// For the live state: how long the task should take, and its type.
    expected_ms: Option<u64>,
    task_type: Option<String>,
    /// Written once the work stream has acknowledged the dispatch.
    record: DispatchRecord,
    /// Logged and published once the dispatch is acknowledged.
    decision: DecisionRecord,
    /// Budget soft-threshold alerts this task raised, published after the batch.
    alerts: Vec<serde_json::Value>,
}

/// A task a budget holds: stored in the deferred queue, then acked.
struct DeferPlan {
    id: String,
    seq: u64,
    entry: DeferredTask,
    info: DeferInfo,
    reply_to: Option<String>,
    received_at: String,
    decision: DecisionRecord,
}

/// What the store learns about a dispatched task, in one write.
struct DispatchRecord {
    seq: u64,
    route_reason: String,
    model: String,
    decision_id: String,
    decision_at_ms: u64,
    priority: u8,
    reply_to: Option<String>,
    trace: TraceInfo,
    received_at: String,
    /// The budget reservation, settled when the result comes.
    reservation: Option<Reservation>,
    policy_version: String,
}

impl DispatchRecord {
    fn apply(&self, r: &mut TaskRecord, pool: &str) {
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
        r.advance_at(TaskState::Received, self.received_at.clone());
        r.advance(TaskState::Dispatched);
    }
}

impl Reject {
    /// A validated task always serialises; refuse rather than panic if one does not.
    fn unserialisable(
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

    fn plan(id: String, seq: u64, code: &str, message: String, reply_to: Option<String>) -> Plan {
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

struct Reject {
    id: String,
    seq: u64,
    error: ErrorInfo,
    reply_to: Option<String>,
    /// When routing refused the task: the decision that says why.
    decision: Option<DecisionRecord>,
}

/// Handles one batch: plan each message, publish, make the store durable, ack.
pub async fn handle_batch(ctx: &Ctx, batch: Vec<jetstream::Message>) {
    let span = tracing::info_span!("intake_batch", size = batch.len());
    async {
        // Read every message, classify the valid tasks concurrently (cache hits and the
        // fallback answer at once; LLM calls are bounded by the classifier's timeouts),
        // then decide and plan each in order.
        let mut reads = Vec::with_capacity(batch.len());
        for msg in &batch {
            ctx.metrics.tasks_received.inc();
            reads.push(match read(ctx, msg) {
                Ok(r) => Some(r),
                Err(e) => {
                    // Store trouble: leave the message for redelivery rather than guess.
                    tracing::error!(error = %e, "cannot record intake message; will retry");
                    None
                }
            });
        }
        let classifications = futures::future::join_all(reads.iter().map(|r| async move {
            match r {
                Some(Read::Ready(p)) => Some(
                    ctx.classifier
                        .classify(
                            &p.task,
                            Some(TraceCtx {
                                trace_id: p.dispatch.trace_id.0,
                                parent_span_id: Some(p.dispatch.span_id.0),
                            }),
                        )
                        .await,
                ),
                _ => None,
            }
        }))
        .await;
        // What every decision of the batch reads, taken once.
        let mut view = View {
            fleet: ctx.route_snapshot(),
            rubric: ctx.classifier.rubric(),
            registry: ctx.registry.current(),
            live: ctx.policy.live(),
            queued: ctx.policy.deferrals.queued(),
            now_ms: ctx.policy.now_ms(),
        };
        let mut plans = Vec::with_capacity(batch.len());
        for (r, class) in reads.into_iter().zip(classifications) {
            plans.push(match (r, class) {
                (None, _) => None,
                (Some(Read::Done(plan)), _) => Some(plan),
                (Some(Read::Ready(p)), Some(c)) => {
                    let planned = plan(ctx, *p, c, &view);
                    // Later tasks of this batch queue behind a deferral made in it.
                    if let Plan::Defer(d) = &planned {
                        for q in &d.entry.queues {
                            *view.queued.entry(q.clone()).or_insert(0) += 1;
                        }
                    }
                    Some(planned)
                }
                (Some(Read::Ready(_)), None) => None,
            });
        }

        // Publish everything first (pipelined), then wait for all the acks.
        let mut pending = Vec::with_capacity(plans.len());
        for plan in &plans {
            let fut = match plan {
                Some(Plan::Dispatch(d)) => Some(
                    ctx.js.publish_with_headers(d.subject.clone(), d.headers.clone(), d.payload.clone()).await,
                ),
                Some(Plan::Reject(r)) => Some(publish_rejection(ctx, r).await),
                _ => None,
            };
            pending.push(fut);
        }
        let mut published = Vec::with_capacity(pending.len());
        for fut in pending {
            published.push(match fut {
                Some(Ok(ack)) => Some(ack.await.map(|_| ()).map_err(|e| e.to_string())),
                Some(Err(e)) => Some(Err(e.to_string())),
                None => None,
            });
        }

        let mut acks = Vec::with_capacity(batch.len());
        let mut decided = Vec::with_capacity(batch.len());
        let mut notices: Vec<(String, serde_json::Value)> = Vec::new();
        for ((msg, plan), outcome) in batch.into_iter().zip(plans).zip(published) {
            match (plan, outcome) {
                (None, _) => {
                    let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
                (Some(Plan::Duplicate), _) => acks.push(msg),
                (Some(Plan::Throttle(wait)), _) => {
                    // Spread the comebacks so they do not all arrive together.
                    let jitter = rand::random_range(0..=wait.as_millis().min(1_000) as u64 / 2 + 20);
                    let delay = (wait + Duration::from_millis(jitter)).min(Duration::from_secs(30));
                    let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
                }
                (Some(plan), Some(Err(e))) => {
                    ctx.metrics.dispatch_errors.inc();
                    tracing::warn!(error = %e, "publish failed; the task will be retried");
                    if let Plan::Dispatch(d) = plan {
                        tracing::warn!(task_id = %d.id, pool = %d.pool, "dispatch not acknowledged by JetStream");
                        if let Some(r) = &d.record.reservation {
                            ctx.policy.unreserve(r);
                        }
                    }
                    let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_millis(500)))).await;
                }
                (Some(Plan::Defer(d)), _) => {
                    let d = *d;
                    let recorded = ctx.store.update(
                        &d.id,
                        || TaskRecord::new(&d.id, d.seq),
                        |r| {
                            r.intake_sequence = d.seq;
                            r.priority = d.entry.priority;
                            r.reply_to = d.reply_to.clone();
                            r.deferred = Some(d.info.clone());
                            r.decision_id = Some(d.decision.id.clone());
                            r.decision_at_ms = Some(d.decision.at_ms);
                            r.policy_version = Some(d.entry.policy_version.clone());
                            r.pool = Some(d.entry.pool.clone());
                            r.model = Some(d.entry.model.clone());
                            r.route_reason = Some(d.info.reason.clone());
                            r.advance_at(TaskState::Received, d.received_at.clone());
                            r.advance(TaskState::Deferred);
                        },
                    );
                    let stored = recorded.and_then(|_| ctx.policy.deferrals.insert(&d.entry));
                    if let Err(e) = stored {
                        // Not kept, so not acked: the intake stream still has it.
                        tracing::error!(task_id = %d.id, error = %e, "deferral not stored; will retry");
                        let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                        continue;
                    }
                    ctx.policy.counters.deferred.inc();
                    tracing::info!(task_id = %d.id, reason = %d.info.reason, "task deferred");
                    notices.push((
                        d.id.clone(),
                        serde_json::json!({
                            "task_id": d.id,
                            "state": "deferred",
                            "reason": d.info.reason,
                            "until": d.info.until,
                            "policy_version": d.entry.policy_version,
                        }),
                    ));
                    decided.push(d.decision);
                    acks.push(msg);
                }
                (Some(Plan::Dispatch(d)), _) => {
                    let mut d = *d;
                    let recorded = ctx.store.update(
                        &d.id,
                        || TaskRecord::new(&d.id, d.record.seq),
                        |r| d.record.apply(r, &d.pool),
                    );
                    match recorded {
                        Err(e) => {
                            tracing::error!(task_id = %d.id, error = %e, "dispatched but not recorded")
                        }
                        // The result was processed first and found no reservation to
                        // settle: settle it here.
                        Ok(rec) if rec.state.is_terminal() => {
                            if let Some(r) = &d.record.reservation {
                                let usage = rec.outcome.as_ref().and_then(|o| o.usage.as_ref());
                                let actual = super::results::actual_cost(ctx, usage, rec.model.as_deref())
                                    .unwrap_or(r.est_usd);
                                ctx.policy.settle(r, actual);
                            }
                        }
                        Ok(_) => {}
                    }
                    decided.push(d.decision);
                    for a in d.alerts.drain(..) {
                        tracing::warn!(alert = %a, "budget soft threshold crossed");
                        notices.push((String::new(), a));
                    }
                    ctx.metrics.tasks_dispatched.get_or_create(&PoolLabel { pool: d.pool.clone() }).inc();
                    ctx.fleet.task_event(TaskEvent::Dispatched {
                        task_id: d.id.clone(),
                        pool: d.pool.clone(),
                        expected_ms: d.expected_ms,
                        task_type: d.task_type.take(),
                    });
                    d.span.finish();
                    ctx.spans.record(d.span);
                    acks.push(msg);
                }
                (Some(Plan::Reject(r)), _) => {
                    // Recorded only now that the rejection is durably the task's result, so
                    // a redelivery before this point publishes it again instead of skipping.
                    let decided_at = r.decision.as_ref().map(|d| d.at_ms);
                    if let Err(e) = record_rejection(ctx, &r.id, r.seq, r.reply_to.clone(), &r.error, decided_at) {
                        tracing::error!(task_id = %r.id, error = %e, "rejected but not recorded");
                    }
                    if let Some(d) = r.decision {
                        decided.push(d);
                    }
                    ctx.metrics.reject(&r.error.code);
                    tracing::info!(task_id = %r.id, code = %r.error.code, reason = %r.error.message, "task rejected");
                    acks.push(msg);
                }
            }
        }

        // The batch's decisions in one write per tree (sled copies a leaf per write, and
        // decisions are big), made durable by the same flush.
        ctx.log_decisions(&decided).await;

        if let Err(e) = ctx.policy.persist_ledger() {
            tracing::error!(error = %e, "budget ledger not written; leaving the batch for redelivery");
            return;
        }
        // One flush for the batch, then the acks: what was acked is on disk.
        if let Err(e) = ctx.store.flush().await {
            tracing::error!(error = %e, "store flush failed; leaving the batch for redelivery");
            return;
        }
        for msg in acks {
            if let Err(e) = msg.ack().await {
                tracing::warn!(error = %e, "intake ack failed; the redelivery will be recognised");
            }
        }
        // Status notices (deferrals) and budget alerts: informational, core NATS.
        for (task_id, body) in notices {
            let subject = if task_id.is_empty() {
                ctx.subjects.alerts("warning")
            } else {
                ctx.subjects.status(&task_id)
            };
            let _ = ctx.client.publish(subject, bytes::Bytes::from(body.to_string())).await;
        }
    }
    .instrument(span)
    .await
}

/// A message read and checked, waiting for its classification.
enum Read {
    /// Nothing to classify: a duplicate or a rejection already worked out.
    Done(Plan),
    Ready(Box<Prepared>),
}

/// A valid task and everything known about it before routing.
struct Prepared {
    started: SystemTime,
    received_at: String,
    id: String,
    seq: u64,
    reply_to: Option<String>,
    task: Task,
    parent: Option<TraceParent>,
    /// The dispatch span's context (trace id + derived span id).
    dispatch: TraceParent,
    invalid: Option<String>,
    tracestate: Option<String>,
    baggage: Baggage,
    /// Out of the deferred queue: (first deferral ms, releases so far).
    release: Option<(u64, u32)>,
}

/// Reads one message: the id, duplicates, the task JSON, the trace context.
fn read(ctx: &Ctx, msg: &jetstream::Message) -> Result<Read, crate::store::StoreError> {
    let started = SystemTime::now();
    let received_at = now_rfc3339();
    let hdrs = msg.headers.as_ref();
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    let reply_to = header(hdrs, headers::REPLY_TO)
        .filter(|r| is_publish_subject(r))
        .map(str::to_string);

    let parsed = Task::from_json(&msg.payload);
    // The id: from the body, else the headers, else the stream sequence (which the
    // producer learned from its publish ack).
    let header_id = header(hdrs, headers::TASK_ID)
        .or_else(|| header(hdrs, headers::NATS_MSG_ID))
        .filter(|id| is_subject_token(id))
        .map(str::to_string);
    let body_id = parsed.as_ref().ok().and_then(|t| t.id.clone());
    let id = body_id
        .or(header_id)
        .unwrap_or_else(|| format!("seq-{seq}"));

    // A release of a deferred task carries the header; the commander is the only one
    // that sets it, and it counts only for a task that is deferred right now.
    let existing = ctx.store.get(&id)?;
    let release = header(hdrs, headers::RELEASE).and_then(|v| {
        let (at, n) = v.split_once(':')?;
        Some((at.parse::<u64>().ok()?, n.parse::<u32>().ok()?))
    });
    let release = release.filter(|_| {
        existing
            .as_ref()
            .is_some_and(|r| r.state == TaskState::Deferred)
    });
    if let Some(existing) = existing
        && existing.state != TaskState::Received
        && release.is_none()
    {
        ctx.metrics.intake_duplicates.inc();
        if existing.intake_sequence != seq {
            tracing::warn!(task_id = %id, first = existing.intake_sequence, again = seq, "task id submitted again; keeping the first submission");
        }
        return Ok(Read::Done(Plan::Duplicate));
    }

    let mut task = match parsed {
        Ok(t) => t,
        Err(e) => {
            return Ok(Read::Done(Reject::plan(
                id,
                seq,
                e.code(),
                e.to_string(),
                reply_to,
            )));
        }
    };
    task.id = Some(id.clone());

    // Continue the producer's trace, or start one and remember why.
    let raw_tp = header(hdrs, headers::TRACEPARENT);
    let (parent, invalid) = match raw_tp.map(TraceParent::parse) {
        Some(Ok(p)) => (Some(p), None),
        Some(Err(e)) => {
            ctx.metrics.traceparent_invalid.inc();
            (None, raw_tp.map(|v| format!("{v:?}: {e}")))
        }
        None => (None, None),
    };
    // Ids are derived, not drawn, so a redelivered submission gets the same dispatch span
    // as the (de-duplicated) first publication that the worker will see.
    let trace_id = parent
        .map(|p| p.trace_id)
        .unwrap_or_else(|| derived_trace_id(&id, seq));
    let flags = parent.map(|p| p.flags).unwrap_or(FLAG_SAMPLED);
    let dispatch = TraceParent {
        trace_id,
        span_id: derived_span_id(&trace_id, &id, FIRST_ATTEMPT),
        flags,
    };
    let tracestate = parent
        .and(header(hdrs, headers::TRACESTATE))
        .and_then(parse_tracestate);
    let baggage = header(hdrs, headers::BAGGAGE)
        .map(Baggage::parse)
        .unwrap_or_default();
    Ok(Read::Ready(Box::new(Prepared {
        started,
        received_at,
        id,
        seq,
        reply_to,
        task,
        parent,
        dispatch,
        invalid,
        tracestate,
        baggage,
        release,
    })))
}

/// The routing and policy inputs shared by a batch, read once.
struct View {
    fleet: std::sync::Arc<route::RouteSnapshot>,
    rubric: std::sync::Arc<crate::classify::rubric::Rubric>,
    registry: std::sync::Arc<crate::registry::Registry>,
    live: std::sync::Arc<crate::policy::Live>,
    /// Deferred tasks waiting per (budget, value).
    queued: std::collections::BTreeMap<(String, String), usize>,
    now_ms: u64,
}

/// What the policy made of a task, owned (the verdict borrows the policy).
enum Step {
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

/// Decides where a classified task goes (route, budgets, throttles) and builds its
/// dispatch, deferral or rejection.
fn plan(ctx: &Ctx, p: Prepared, class: Classification, view: &View) -> Plan {
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
        rubric,
        registry,
        live,
        queued,
        now_ms,
    } = view;
    let version = live.policy.version.clone();
    let dims = TaskDims::from_task(&task.attributes, baggage.iter());
    let decision_id = derived_decision_id(&id, seq, FIRST_ATTEMPT);
    let step = {
        let _span = tracing::debug_span!("decide", task_id = %id).entered();
        // Check and reserve under one lock, so concurrent batches cannot both take the
        // last of a budget.
        ctx.policy.with_ledger(|ledger| {
            let verdict = policy::evaluate(EvalInput {
                task: &task,
                class: &class.answer,
                dims: &dims,
                rubric,
                registry,
                fleet,
                table: &ctx.table,
                policy: &live.policy,
                hints: &live.hints,
                ledger,
                queued,
                released: release.is_some(),
                now_ms: *now_ms,
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
                    let alerts = check
                        .soft
                        .iter()
                        .filter(|h| {
                            h.alert
                                && ctx.policy.first_alert(
                                    &h.budget.spec.name,
                                    &h.value,
                                    h.budget.window.bucket(*now_ms),
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
                                "task_id": id,
                            })
                        })
                        .collect();
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
            rubric: rubric.name.clone(),
            policy_version: Some(version.clone()),
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
            ctx.policy.counters.throttled.inc();
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
            ctx.policy.counters.budget_rejected.inc();
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
            if ctx.policy.deferrals.is_full() {
                let why = format!(
                    "{reason}; but the deferred queue is full ({} tasks), so it is rejected",
                    ctx.policy.deferrals.len()
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

fn record_rejection(
    ctx: &Ctx,
    id: &str,
    seq: u64,
    reply_to: Option<String>,
    error: &ErrorInfo,
    decision_at_ms: Option<u64>,
) -> Result<(), crate::store::StoreError> {
    ctx.store.update(
        id,
        || TaskRecord::new(id, seq),
        |r| {
            r.reply_to = reply_to.clone();
            r.decision_at_ms = decision_at_ms;
            r.rejection = Some(error.clone());
            r.advance(TaskState::Rejected);
        },
    )?;
    Ok(())
}

/// Publishes the rejection as the task's result, durably, so the producer can read it on
/// `<prefix>.results.<id>` (and on its reply subject, via the results loop).
async fn publish_rejection(
    ctx: &Ctx,
    r: &Reject,
) -> Result<
    async_nats::jetstream::context::PublishAckFuture,
    async_nats::jetstream::context::PublishError,
> {
    let result = TaskResult::rejected(&r.id, &r.error.code, r.error.message.clone());
    let payload = serde_json::to_vec(&result).unwrap_or_default();
    let mut h = HeaderMap::new();
    let _ = protocol::set_header(&mut h, headers::TASK_ID, &r.id);
    let _ = protocol::set_header(&mut h, headers::ATTEMPT, "0");
    let _ = protocol::set_header(&mut h, headers::NATS_MSG_ID, &format!("{}:0:result", r.id));
    if let Some(rt) = &r.reply_to {
        let _ = protocol::set_header(&mut h, headers::REPLY_TO, rt);
    }
    ctx.js
        .publish_with_headers(ctx.subjects.result(&r.id), h, Bytes::from(payload))
        .await
}

fn derived_trace_id(id: &str, seq: u64) -> TraceId {
    let a = fnv1a(&[b"trace", id.as_bytes(), &seq.to_le_bytes()]);
    let b = fnv1a(&[b"trace2", id.as_bytes(), &seq.to_le_bytes()]);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a.to_be_bytes());
    bytes[8..].copy_from_slice(&b.to_be_bytes());
    if bytes == [0; 16] {
        bytes[15] = 1;
    }
    TraceId(bytes)
}

/// Same task, same submission, same attempt: same decision id (a redelivery replaces the
/// logged decision instead of adding one).
fn derived_decision_id(id: &str, seq: u64, attempt: u32) -> String {
    let h = fnv1a(&[
        b"decision",
        id.as_bytes(),
        &seq.to_le_bytes(),
        &attempt.to_le_bytes(),
    ]);
    format!("dec-{h:016x}")
}

fn derived_span_id(trace: &TraceId, id: &str, attempt: u32) -> SpanId {
    let mut h = fnv1a(&[b"dispatch", &trace.0, id.as_bytes(), &attempt.to_le_bytes()]);
    if h == 0 {
        h = 1;
    }
    SpanId(h.to_be_bytes())
}
