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
use crate::policy::throttle::{Asking, ThrottleKeys, Throttled, Wait};
use crate::policy::{self, DeferredTask, EvalInput, Reservation, TaskDims, Verdict};
use crate::route::{self, Decision};
use crate::store::{DeferInfo, Stamp, TaskRecord, TaskState, TraceInfo};

/// The attempt number of a first dispatch. Re-dispatch after failure (a later issue)
/// increments it; redelivery of the same dispatch does not.
pub(super) const FIRST_ATTEMPT: u32 = 1;

/// Decision-log rules of the policy's own outcomes.
pub(super) const BUDGET_DEFER: &str = "budget_defer";
pub(super) const BUDGET_REJECT: &str = "budget_reject";
/// The decision-log rule of a task a throttle parked until its turn.
pub(super) const THROTTLE_DEFER: &str = "throttle_defer";
/// The decision-log rule of a task refused by a `block` intervention.
pub(super) const INTERVENTION_BLOCK: &str = "intervention_block";

/// One intake message, worked out.
pub(super) enum Plan {
    /// Already handled (a redelivery after a crash): just ack.
    Duplicate,
    Dispatch(Box<Dispatch>),
    Reject(Box<Reject>),
    Defer(Box<DeferPlan>),
    /// A throttle holds it back for a turn close at hand: left in the intake stream,
    /// redelivered after the wait.
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

impl Dispatch {
    /// Recorded, not published: the task ran already ([`Prepared::recovering`]); its
    /// decision says so.
    pub(super) fn recovered(&self) -> bool {
        self.decision.recovered
    }
}

/// A task a budget holds: stored in the deferred queue, then acked.
pub(super) struct DeferPlan {
    pub(super) id: String,
    pub(super) seq: u64,
    pub(super) entry: DeferredTask,
    pub(super) info: DeferInfo,
    pub(super) reply_to: Option<String>,
    pub(super) received_at: Stamp,
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
    pub(super) received_at: Stamp,
    /// The budget reservation, settled when the result comes.
    pub(super) reservation: Option<Reservation>,
    pub(super) policy_version: String,
    pub(super) generation: Option<crate::domain::Generation>,
    /// Times the task left the deferred queue, when this dispatch is a release.
    pub(super) releases: Option<u32>,
}

impl DispatchRecord {
    /// `recovered`: recorded after the task finished ([`Prepared::recovering`]); its
    /// history keeps what it has, since when it was received and dispatched is not known.
    pub(super) fn apply(&self, r: &mut TaskRecord, pool: &str, recovered: bool) {
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
        if !recovered {
            r.advance_at(TaskState::Received, self.received_at.clone());
            r.advance(TaskState::Dispatched);
        }
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

    /// A rejection the decision log explains.
    pub(super) fn decided(
        id: String,
        seq: u64,
        code: &str,
        message: String,
        reply_to: Option<String>,
        decision: DecisionRecord,
    ) -> Plan {
        let mut plan = Self::plan(id, seq, code, message, reply_to);
        if let Plan::Reject(r) = &mut plan {
            r.decision = Some(decision);
        }
        plan
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
            expired: false,
        }))
    }

    /// A task whose deadline passed before it could be dispatched: ended as `cancelled`
    /// with `deadline_exceeded`, as a worker ends one it receives too late, but before
    /// any classifier call or decision is spent on it.
    pub(super) fn expired(id: String, seq: u64, deadline: &str, reply_to: Option<String>) -> Plan {
        let mut plan = Self::plan(
            id,
            seq,
            "deadline_exceeded",
            format!("the deadline {deadline} passed before the task could be dispatched"),
            reply_to,
        );
        if let Plan::Reject(r) = &mut plan {
            r.expired = true;
        }
        plan
    }

    /// The result it ends its task with.
    pub(super) fn result(&self) -> fleet_worker::message::TaskResult {
        use fleet_worker::message::TaskResult;
        let end = if self.expired {
            TaskResult::cancelled
        } else {
            TaskResult::rejected
        };
        end(&self.id, &self.error.code, self.error.message.clone())
    }
}

pub(super) struct Reject {
    pub(super) id: String,
    pub(super) seq: u64,
    pub(super) error: ErrorInfo,
    pub(super) reply_to: Option<String>,
    /// When routing refused the task: the decision that says why.
    pub(super) decision: Option<DecisionRecord>,
    /// Not refused but ended: its deadline passed first (the result is `cancelled`).
    pub(super) expired: bool,
}

/// A valid task and everything known about it before routing.
pub(super) struct Prepared {
    pub(super) started: SystemTime,
    pub(super) received_at: Stamp,
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
    /// Out of the parked queue: the turn a throttle gave it, as its record kept it.
    pub(super) turn: Option<crate::domain::ThrottleTurn>,
    /// The task ran already: dispatched before the commander stopped, its dispatch never
    /// recorded, its result recorded since. It is decided again to record the decision and
    /// the dispatch (and to charge its cost to its budgets), but not published. Nothing
    /// holds it back (no throttle, and the policy lets it through: `EvalInput::ran`); when
    /// no pool would take it now, nothing is recorded.
    pub(super) recovering: bool,
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
    Throttled {
        decision: Decision,
        throttled: Throttled,
    },
    /// A budget has room, but this replica has taken its part of it until the other
    /// replicas' spending is seen again: handed back for a moment (`budget::Check::wait`).
    WaitForReplicas {
        budget: String,
    },
    Defer {
        decision: Decision,
        reason: String,
        until_ms: Option<u64>,
        queues: Vec<(String, String)>,
    },
    /// Refused by the policy: a budget at its limit, or a `block` intervention.
    PolicyReject {
        decision: Decision,
        reason: String,
        code: &'static str,
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
    /// The turn it was parked with, coming back from the parked queue.
    turn: Option<&'a crate::domain::ThrottleTurn>,
    /// Decided again for the record only ([`Prepared::recovering`]): nothing holds it back.
    recovering: bool,
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
        turn,
        recovering,
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
            ran: recovering,
            now_ms: view.now_ms,
            seed: fnv1a(&[b"seed", id.as_bytes()]),
            blocks: &live.blocks,
        });
        match verdict {
            Verdict::Dispatch { decision, check } => {
                if let Some(b) = check.wait.first()
                    && !recovering
                {
                    return Step::WaitForReplicas {
                        budget: b.spec.name.clone(),
                    };
                }
                if !live.throttles.is_empty() && !recovering {
                    let keys = ThrottleKeys {
                        pool: &decision.pool,
                        team: dims.team.as_deref(),
                        producer: dims.producer.as_deref(),
                        worker: decision.worker.as_deref(),
                    };
                    let tokens = class.answer.input_tokens + class.answer.output_tokens;
                    let ask = Asking {
                        task_id: id,
                        now_ms: view.now_ms,
                        turn,
                        inline_cap: ctx.throttle_inline_cap,
                    };
                    if let Err(throttled) = live.throttles.admit(keys, tokens, ask) {
                        return Step::Throttled {
                            decision,
                            throttled,
                        };
                    }
                }
                let est = decision.est_cost_usd.unwrap_or(0.0);
                let reservation = (!check.cells.is_empty()).then(|| Reservation {
                    cells: check.cells.clone(),
                    est_usd: est,
                    charged_usd: None,
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
            Verdict::Reject {
                decision,
                reason,
                code,
            } => Step::PolicyReject {
                decision,
                reason,
                code,
            },
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
            let bucket = h.budget.window.bucket(now_ms);
            serde_json::json!({
                "alert": "budget_soft_threshold",
                "id": super::notices::id(&h.budget.spec.name, &h.value, bucket, h.at),
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
    let dims = TaskDims::from_task(&p.task.attributes, p.baggage.iter());
    let step = {
        let _span = tracing::debug_span!("decide", task_id = %p.id).entered();
        decide_step(
            ctx,
            Deciding {
                id: &p.id,
                task: &p.task,
                class: &class,
                dims: &dims,
                released: p.release.is_some(),
                turn: p.turn.as_ref(),
                recovering: p.recovering,
                view,
            },
        )
    };
    let draft = Draft::new(&p, class, &dims, view);
    if p.recovering {
        return recovered_plan(ctx, p, &draft, step);
    }
    match step {
        Step::Go {
            decision,
            reservation,
            alerts,
        } => {
            view.fleet.note_routed(&decision.pool);
            dispatch_plan(ctx, p, &draft, decision, reservation, alerts)
        }
        Step::Throttled {
            decision,
            throttled,
        } => throttled_plan(ctx, p, &draft, throttled, (decision, dims, view.now_ms)),
        Step::WaitForReplicas { budget } => {
            ctx.core.policy.counters.budget_waits.inc();
            tracing::debug!(task_id = %p.id, budget, "waits for the other replicas' spending");
            Plan::Throttle(REPLICAS_WAIT)
        }
        Step::NoRoute(no_route) => {
            let reason = no_route.to_string();
            let logged = draft.record(
                Outcome::Rejected,
                None,
                no_route.code(),
                reason.clone(),
                no_route.candidates().to_vec(),
            );
            Reject::decided(p.id, p.seq, no_route.code(), reason, p.reply_to, logged)
        }
        Step::PolicyReject {
            decision,
            reason,
            code,
        } => {
            let rule = if code == policy::evaluate::BLOCKED {
                INTERVENTION_BLOCK
            } else {
                ctx.core.policy.counters.budget_rejected.inc();
                BUDGET_REJECT
            };
            let logged = draft.record(
                Outcome::Rejected,
                Some(&decision),
                rule,
                reason.clone(),
                decision.candidates.clone(),
            );
            Reject::decided(p.id, p.seq, code, reason, p.reply_to, logged)
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
                return Reject::plan(p.id, p.seq, "deferred_queue_full", why, p.reply_to);
            }
            let held = Held {
                decision,
                reason,
                until_ms,
                turn: None,
                queues,
                dims,
                now_ms: view.now_ms,
            };
            defer_plan(p, &draft, held, BUDGET_DEFER)
        }
    }
}

/// How long a task waits in the intake stream for the other replicas' spending: a few of
/// their shares (`policy::ledger_share::EVERY`).
const REPLICAS_WAIT: Duration = Duration::from_millis(50);

/// The plan of a task a throttle holds back: handed back to wait in the intake stream
/// for a turn close at hand, else parked with its turn (`routed`: where it would have
/// gone, its dimensions, and the batch's time).
fn throttled_plan(
    ctx: &Ctx,
    p: Prepared,
    draft: &Draft,
    t: Throttled,
    routed: (Decision, TaskDims, u64),
) -> Plan {
    ctx.core.policy.counters.throttled.inc();
    tracing::debug!(task_id = %p.id, throttle = %t.turn.throttle, key = %t.turn.key, wait_ms = t.wait.as_millis() as u64, parked = t.wait_in == Wait::Park, "throttled");
    if t.wait_in == Wait::Inline {
        return Plan::Throttle(t.wait);
    }
    if ctx.core.policy.deferrals.is_full() {
        // No room to park: it waits in the stream and asks again, as a newcomer.
        return Plan::Throttle(t.wait.min(PARK_FULL_RETRY));
    }
    let (decision, dims, now_ms) = routed;
    let held = Held {
        decision,
        reason: format!(
            "throttle `{}` ({} for `{}`) holds it back: its turn is at {}",
            t.turn.throttle,
            t.rate,
            t.turn.key,
            crate::policy::budget::rfc3339(t.turn.at_ms)
        ),
        until_ms: Some(t.turn.at_ms),
        turn: Some(t.turn),
        queues: Vec::new(),
        dims,
        now_ms,
    };
    defer_plan(p, draft, held, THROTTLE_DEFER)
}

/// The plan of a task that ran before its dispatch was recorded: its dispatch, decided
/// again and marked `recovered`, to be recorded but not published. The policy lets every
/// task that ran through (`EvalInput::ran`); one that no pool would take now is left
/// without a decision, and the message is acked as before.
fn recovered_plan(ctx: &Ctx, p: Prepared, draft: &Draft, step: Step) -> Plan {
    let Step::Go {
        mut decision,
        reservation,
        alerts,
    } = step
    else {
        tracing::warn!(task_id = %p.id, "task that finished before its dispatch was recorded has no route now; left without a decision");
        return Plan::Duplicate;
    };
    decision.reason = format!("{RECOVERED_PREFIX}{reason}", reason = decision.reason);
    let id = p.id.clone();
    match dispatch_plan(ctx, p, draft, decision, reservation, alerts) {
        Plan::Dispatch(mut d) => {
            d.decision.recovered = true;
            Plan::Dispatch(d)
        }
        // Only a task that does not serialise again gets another plan (its reservation
        // released): never refuse a task that ran.
        _ => {
            tracing::warn!(task_id = %id, "task that finished before its dispatch was recorded cannot be planned again; left without a decision");
            Plan::Duplicate
        }
    }
}

/// How the reason of a recovered decision begins (docs/rubrics.md quotes it).
const RECOVERED_PREFIX: &str = "decided again after a restart, for the record: the task had been dispatched and had finished, but the commander stopped before it recorded the dispatch; now: ";

/// What every decision record of one task shares, whatever becomes of it.
struct Draft {
    decision_id: String,
    task_id: String,
    received_at: Stamp,
    class: Classification,
    priority: u8,
    rubric: String,
    version: String,
    generation: crate::domain::Generation,
    inputs: DecisionInputs,
    trace_id: String,
}

impl Draft {
    /// Takes the classification over (each record clones it once, as it always did).
    fn new(p: &Prepared, class: Classification, dims: &TaskDims, view: &View) -> Self {
        Self {
            decision_id: derived_decision_id(&p.id, p.seq, FIRST_ATTEMPT),
            task_id: p.id.clone(),
            received_at: p.received_at.clone(),
            class,
            priority: p.task.priority,
            rubric: view.live.rubric.name.clone(),
            version: view.live.policy.version.clone(),
            generation: view.live.generation(),
            inputs: DecisionInputs {
                requested_pool: p.task.pool.clone(),
                requested_model: p.task.model.clone(),
                max_cost_usd: p.task.max_cost_usd,
                dims: dims.clone(),
            },
            trace_id: p.dispatch.trace_id.to_hex(),
        }
    }

    /// The decision-log record of `outcome` (made by `rule`, because `reason`).
    fn record(
        &self,
        outcome: Outcome,
        d: Option<&Decision>,
        rule: &str,
        reason: String,
        candidates: Vec<route::Candidate>,
    ) -> DecisionRecord {
        DecisionRecord {
            id: self.decision_id.clone(),
            task_id: self.task_id.clone(),
            at_ms: crate::fleet::now_ms(),
            at: self.received_at.to_string(),
            outcome,
            pool: d.map(|d| d.pool.clone()),
            model: d.map(|d| d.model.clone()),
            worker: d.and_then(|d| d.worker.clone()),
            rule: rule.to_string(),
            reason,
            task_type: self.class.answer.task_type.clone(),
            tier: d
                .map(|d| d.tier.clone())
                .unwrap_or_else(|| self.class.answer.tier.clone()),
            est_cost_usd: d.and_then(|d| d.est_cost_usd),
            priority: self.priority,
            classification: self.class.clone(),
            candidates,
            rubric: self.rubric.clone(),
            policy_version: Some(self.version.clone()),
            generation: Some(self.generation.clone()),
            inputs: self.inputs.clone(),
            trace_id: Some(self.trace_id.clone()),
            recovered: false,
        }
    }
}

/// With the parked queue full, how long a task a throttle would park waits in the intake
/// stream before it asks again.
const PARK_FULL_RETRY: Duration = Duration::from_secs(30);

/// A task a budget or a throttle holds back, and why.
struct Held {
    decision: Decision,
    reason: String,
    until_ms: Option<u64>,
    /// Parked by a throttle: its turn.
    turn: Option<crate::domain::ThrottleTurn>,
    queues: Vec<(String, String)>,
    dims: TaskDims,
    now_ms: u64,
}

/// The deferred-queue entry of a held task (the task as submitted and the headers it
/// comes back to intake with), and its decision, logged under `rule`.
fn defer_plan(p: Prepared, draft: &Draft, held: Held, rule: &str) -> Plan {
    let logged = draft.record(
        Outcome::Deferred,
        Some(&held.decision),
        rule,
        held.reason.clone(),
        held.decision.candidates.clone(),
    );
    let Held {
        decision,
        reason,
        until_ms,
        turn,
        queues,
        dims,
        now_ms,
    } = held;
    let (deferred_at_ms, releases) = p.release.unwrap_or((now_ms, 0));
    let mut hdrs = Vec::new();
    if let Some(parent) = p.parent {
        hdrs.push((headers::TRACEPARENT.to_string(), parent.to_header()));
        if let Some(ts) = &p.tracestate {
            hdrs.push((headers::TRACESTATE.to_string(), ts.clone()));
        }
    }
    if !p.baggage.is_empty() {
        hdrs.push((headers::BAGGAGE.to_string(), p.baggage.to_header()));
    }
    if let Some(r) = &p.reply_to {
        hdrs.push((headers::REPLY_TO.to_string(), r.clone()));
    }
    let task_json = match serde_json::to_string(&p.task) {
        Ok(j) => j,
        Err(e) => return Reject::unserialisable(p.id, p.seq, &e, p.reply_to),
    };
    let until = until_ms.map(crate::policy::budget::rfc3339);
    let entry = DeferredTask {
        id: p.id.clone(),
        priority: p.task.priority,
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
        policy_version: draft.version.clone(),
        task_json,
        headers: hdrs,
        releases,
        turn: turn.clone(),
        deadline_ms: deadline_ms(&p.task),
        cancelled: None,
    };
    let info = DeferInfo {
        reason,
        until,
        deferred_at: entry.deferred_at.clone(),
        releases,
        turn,
    };
    Plan::Defer(Box::new(DeferPlan {
        id: p.id,
        seq: p.seq,
        entry,
        info,
        reply_to: p.reply_to,
        received_at: p.received_at,
        decision: logged,
    }))
}

/// A task's `deadline` in unix ms (one before 1970 is 0: long past).
pub(super) fn deadline_ms(task: &fleet_worker::message::Task) -> Option<u64> {
    let at = fleet_worker::message::parse_rfc3339(task.deadline.as_deref()?)?;
    Some(
        at.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    )
}

/// The dispatch of a routed task: its subject, headers, payload, dispatch span, decision
/// record and store record.
fn dispatch_plan(
    ctx: &Ctx,
    p: Prepared,
    draft: &Draft,
    mut decision: Decision,
    reservation: Option<Reservation>,
    alerts: Vec<serde_json::Value>,
) -> Plan {
    let mut p = p;
    p.task.pool = Some(decision.pool.clone());
    p.task.model = Some(decision.model.clone());
    let subject = match &decision.worker {
        Some(w) => ctx.subjects.work_targeted(&decision.pool, w),
        None => ctx.subjects.work(&decision.pool),
    };
    let payload = match serde_json::to_vec(&p.task) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            // Not dispatched: what the decision reserved goes back.
            if let Some(r) = &reservation {
                ctx.core.policy.unreserve(r);
            }
            return Reject::unserialisable(p.id, p.seq, &e, p.reply_to);
        }
    };
    let headers = dispatch_headers(&p, &decision, draft);
    // The work message adds the commander's headers and fields to the task as submitted:
    // one over the server's max_payload would be refused at every try, for good.
    let (size, max) = (
        protocol::wire_len(&headers, payload.len()),
        ctx.client.max_payload(),
    );
    if max > 0 && size > max {
        if let Some(r) = &reservation {
            ctx.core.policy.unreserve(r);
        }
        let why = format!(
            "the task is {size} bytes as dispatched (with the fields and headers the commander adds), and the NATS server takes at most {max} bytes per message (max_payload): send less, and put large input in an object store with a reference to it in the task"
        );
        return Reject::plan(p.id, p.seq, "task_too_large", why, p.reply_to);
    }
    let span = dispatch_span(&subject, &p, draft, &decision);
    tracing::debug!(task_id = %p.id, pool = %decision.pool, model = %decision.model, rule = decision.rule.as_str(), trace_id = %p.dispatch.trace_id, "dispatching");
    let candidates = std::mem::take(&mut decision.candidates);
    let logged = draft.record(
        Outcome::Dispatched,
        Some(&decision),
        decision.rule.as_str(),
        decision.reason.clone(),
        candidates,
    );
    let record = DispatchRecord {
        seq: p.seq,
        route_reason: decision.reason.clone(),
        model: decision.model.clone(),
        decision_id: draft.decision_id.clone(),
        decision_at_ms: logged.at_ms,
        priority: p.task.priority,
        reply_to: p.reply_to,
        trace: TraceInfo {
            trace_id: p.dispatch.trace_id.to_hex(),
            dispatch_span_id: p.dispatch.span_id.to_hex(),
            parent_span_id: p.parent.map(|pt| pt.span_id.to_hex()),
            invalid_traceparent: p.invalid,
            traceparent: p.dispatch.to_header(),
        },
        received_at: p.received_at,
        reservation,
        policy_version: draft.version.clone(),
        generation: logged.generation.clone(),
        releases: p.release.map(|(_, n)| n),
    };
    Plan::Dispatch(Box::new(Dispatch {
        id: p.id,
        pool: decision.pool,
        subject,
        headers,
        payload,
        span,
        expected_ms: p.task.expected_duration_s.map(|s| (s * 1000.0) as u64),
        task_type: Some(draft.class.answer.task_type.clone()),
        record,
        decision: logged,
        alerts,
    }))
}

/// The work message's headers (docs/protocol.md §5): the dispatch span's traceparent, the
/// producer's tracestate and baggage, the idempotency key of this attempt, and what the
/// worker needs to know before it reads the body.
fn dispatch_headers(p: &Prepared, decision: &Decision, draft: &Draft) -> HeaderMap {
    let (id, task) = (p.id.as_str(), &p.task);
    let mut h = HeaderMap::new();
    // Every dispatch sets these: the names are the protocol's constants and the values
    // are moved in, so nothing is copied twice.
    let mut set = |k: &'static str, v: String| {
        if let Err(e) = protocol::set_known_header(&mut h, k, v) {
            tracing::warn!(error = %e, "header left out");
        }
    };
    set(headers::TRACEPARENT, p.dispatch.to_header());
    if let Some(ts) = &p.tracestate {
        set(headers::TRACESTATE, ts.clone());
    }
    if !p.baggage.is_empty() {
        set(headers::BAGGAGE, p.baggage.to_header());
    }
    set(headers::NATS_MSG_ID, format!("{id}:{FIRST_ATTEMPT}"));
    set(headers::TASK_ID, id.to_string());
    set(headers::ATTEMPT, FIRST_ATTEMPT.to_string());
    set(headers::MODEL, decision.model.clone());
    set(headers::DECISION_ID, draft.decision_id.clone());
    if let Some(d) = &task.deadline {
        set(headers::DEADLINE, d.clone());
    }
    if let Some(r) = &p.reply_to {
        set(headers::REPLY_TO, r.clone());
    }
    h
}

/// How many attributes a dispatch span can have besides the producer's baggage.
const DISPATCH_SPAN_ATTRS: usize = 18;

/// The commander's dispatch span: a PRODUCER span, child of the producer's, that the
/// worker's process span continues.
fn dispatch_span(subject: &str, p: &Prepared, draft: &Draft, decision: &Decision) -> SpanRecord {
    let mut span = SpanRecord::new(
        format!("send {subject}"),
        SpanKind::Producer,
        p.dispatch.trace_id,
        p.dispatch.span_id,
    );
    span.start = p.started;
    span.parent_span_id = p.parent.map(|pt| pt.span_id);
    // The attributes below, then the optional ones and the baggage: one allocation.
    span.attributes
        .reserve(DISPATCH_SPAN_ATTRS + p.baggage.len());
    span.attr("messaging.system", "nats")
        .attr("messaging.operation.type", "send")
        .attr("messaging.operation.name", "send")
        .attr("messaging.destination.name", subject.to_string())
        .attr("fleet.task.id", p.id.clone())
        .attr("fleet.attempt", FIRST_ATTEMPT)
        .attr("fleet.pool", decision.pool.clone())
        .attr("fleet.decision.id", draft.decision_id.clone())
        .attr("fleet.route.rule", decision.rule.as_str())
        .attr("fleet.task.type", draft.class.answer.task_type.clone())
        .attr("fleet.task.tier", decision.tier.clone())
        .attr("fleet.classification.source", draft.class.source.as_str())
        .attr(
            "fleet.decision.candidates",
            decision.candidates.len() as i64,
        )
        .attr("gen_ai.request.model", decision.model.clone())
        .attr("fleet.intake.sequence", p.seq as i64);
    if let Some(c) = decision.est_cost_usd {
        span.attr("fleet.decision.est_cost_usd", c);
    }
    if let Some(w) = &decision.worker {
        span.attr("fleet.worker.target", w.clone());
    }
    if let Some(bad) = &p.invalid {
        span.attr("fleet.traceparent.invalid", bad.clone());
    }
    for (k, v) in p.baggage.iter() {
        span.attr(k, v);
    }
    span
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
