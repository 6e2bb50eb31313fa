//! Intake: read submitted tasks, validate, classify, plan each (`plan.rs`: policy verdict,
//! dispatch span), publish to the pool subject, record, ack.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use fleet_worker::message::Task;
use fleet_worker::protocol::{header, headers, is_subject_token};
use fleet_worker::trace::{Baggage, FLAG_SAMPLED, SpanId, TraceId, TraceParent, parse_tracestate};
use tracing::Instrument;

use super::plan::{FIRST_ATTEMPT, Plan, Prepared, Reject, View, plan};
use super::{Ctx, fnv1a};
use crate::classify::TraceCtx;
use crate::fleet::TaskEvent;
use crate::metrics::PoolLabel;
use crate::store::{Stamp, TaskRecord, TaskState};

/// Handles one batch: plan each message, publish, make the store durable, ack.
pub async fn handle_batch(ctx: &Ctx, batch: Vec<jetstream::Message>) {
    let read_at = std::time::Instant::now();
    let span = tracing::info_span!("intake_batch", size = batch.len());
    let replies: Vec<_> = batch.iter().filter_map(|m| m.reply.clone()).collect();
    let work = async {
        let mut plans = plan_batch(ctx, &batch).await;
        let published = publish_batch(ctx, &mut plans, read_at).await;
        let json = log_decisions(ctx, &plans, &published);
        let mut settled = Settled::default();
        let each = batch.into_iter().zip(plans).zip(published).zip(json);
        for (((msg, plan), outcome), json) in each {
            settle_one(ctx, msg, plan, outcome, json, &mut settled).await;
        }
        finish_batch(ctx, settled).await;
    }
    .instrument(span);
    keep_in_hand(ctx, &replies, work).await
}

/// Reads every message, classifies the valid tasks concurrently (cache hits and the
/// fallback answer at once; LLM calls are bounded by the classifier's timeouts), then
/// decides and plans each in order, all under one load of the live snapshot. `None`: a
/// message to hand back for redelivery.
async fn plan_batch(ctx: &Ctx, batch: &[jetstream::Message]) -> Vec<Option<Plan>> {
    let mut reads = Vec::with_capacity(batch.len());
    for msg in batch {
        ctx.core.metrics.tasks_received.inc();
        reads.push(match read(ctx, msg) {
            Ok(r) => Some(r),
            Err(e) => {
                // Store trouble: leave the message for redelivery rather than guess.
                tracing::error!(error = %e, "cannot record intake message; will retry");
                None
            }
        });
    }
    // The one live snapshot every classification and decision of the batch reads: the
    // rubric, registry, policy and routing table in force were checked together.
    let live = ctx.core.policy.live();
    let grounds = crate::classify::Grounds {
        rubric: &live.rubric,
        rubric_generation: live.rubric_generation,
        registry: &live.registry,
    };
    let classifications = futures::future::join_all(reads.iter().map(|r| async move {
        let Some(Read::Ready(p)) = r else {
            return None;
        };
        let trace = TraceCtx {
            trace_id: p.dispatch.trace_id.0,
            parent_span_id: Some(p.dispatch.span_id.0),
        };
        Some(
            ctx.core
                .classifier
                .classify(grounds, &p.task, Some(trace))
                .await,
        )
    }))
    .await;
    // What every decision of the batch reads, taken once.
    let mut view = View {
        fleet: ctx.core.route_snapshot(&live.routing),
        live: live.clone(),
        queued: ctx.core.policy.deferrals.queued(),
        now_ms: ctx.core.policy.now_ms(),
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
    plans
}

/// Publishes every dispatch and rejection first (pipelined), then waits for all the
/// PubAcks: the work stream's sequence of each, or why it was not acknowledged.
/// Each dispatch's time from `read_at` to its PubAck goes to `fleet_intake_dispatch_seconds`.
/// A dispatch's subject, headers and body are only for its message: they are moved into
/// it, not copied.
async fn publish_batch(
    ctx: &Ctx,
    plans: &mut [Option<Plan>],
    read_at: std::time::Instant,
) -> Vec<Option<Result<u64, String>>> {
    let mut pending = Vec::with_capacity(plans.len());
    for plan in plans.iter_mut() {
        let fut = match plan {
            // It ran already: recorded, not sent again.
            Some(Plan::Dispatch(d)) if d.recovered() => None,
            Some(Plan::Dispatch(d)) => {
                let mut h = std::mem::take(&mut d.headers);
                let _ = fleet_worker::protocol::set_known_header(
                    &mut h,
                    headers::REPLICA,
                    ctx.core.replica.to_string(),
                );
                Some((
                    true,
                    ctx.js
                        .publish_with_headers(
                            std::mem::take(&mut d.subject),
                            h,
                            std::mem::take(&mut d.payload),
                        )
                        .await,
                ))
            }
            // The rejection is the task's result, stored durably: the producer reads it on
            // `<prefix>.results.<id>` (and on its reply subject, via the results loop).
            Some(Plan::Reject(r)) => Some((
                false,
                super::publish_own_result(ctx, &r.result(), r.reply_to.as_deref()).await,
            )),
            _ => None,
        };
        pending.push(fut);
    }
    let mut published = Vec::with_capacity(pending.len());
    for fut in pending {
        published.push(match fut {
            Some((dispatch, Ok(ack))) => {
                let acked = ack.await.map(|a| a.sequence).map_err(|e| e.to_string());
                if dispatch && acked.is_ok() {
                    ctx.core
                        .metrics
                        .intake_dispatch
                        .0
                        .observe(read_at.elapsed().as_secs_f64());
                }
                Some(acked)
            }
            Some((_, Err(e))) => Some(Err(e.to_string())),
            None => None,
        });
    }
    published
}

/// Logs the decisions of the batch's tasks that are about to be recorded (dispatched and
/// rejected tasks whose publish JetStream acknowledged, deferred ones), in pages appended
/// to the task log before any of their task records: the log is written in order, so a
/// record that names its decision is never durable without it, even when another loop's
/// flush writes the log out between the two. (A redelivered task whose record is on disk
/// is not decided again.) A deferral whose store write then fails is handed back and
/// decided again on redelivery, so its first decision stays in the log too.
///
/// Gives back each plan's decision JSON, in the plans' order (`None` for a plan with no
/// decision logged): what the batch publishes once its records are written.
fn log_decisions(
    ctx: &Ctx,
    plans: &[Option<Plan>],
    published: &[Option<Result<u64, String>>],
) -> Vec<Option<bytes::Bytes>> {
    let logged: Vec<Option<&crate::decisions::DecisionRecord>> = plans
        .iter()
        .zip(published)
        .map(|(plan, outcome)| match (plan.as_ref()?, outcome) {
            (_, Some(Err(_))) => None,
            (Plan::Dispatch(d), _) => Some(&d.decision),
            (Plan::Reject(r), _) => r.decision.as_ref(),
            (Plan::Defer(d), _) => Some(&d.decision),
            _ => None,
        })
        .collect();
    let decided: Vec<_> = logged.iter().flatten().copied().collect();
    let mut json = ctx.log_decisions(&decided).into_iter();
    logged
        .iter()
        .map(|d| d.and_then(|_| json.next().flatten()))
        .collect()
}

/// The batch's decisions announced (their task records are written now), the store
/// (decisions, and the ledger with the records) made durable with one flush, then the
/// acks, then the informational notices.
async fn finish_batch(ctx: &Ctx, settled: Settled) {
    let Settled {
        acks,
        decided,
        notices,
    } = settled;
    ctx.announce_decisions(&decided).await;
    // One flush for the batch, then the acks: what was acked is on disk.
    if let Err(e) = ctx.core.store.flush().await {
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
        if task_id.is_empty() {
            super::notices::send_once(ctx, body);
            continue;
        }
        let _ = ctx
            .client
            .publish(
                ctx.subjects.status(&task_id),
                bytes::Bytes::from(body.to_string()),
            )
            .await;
    }
}

/// A message read and checked, waiting for its classification.
enum Read {
    /// Nothing to classify: a duplicate or a rejection already worked out.
    Done(Plan),
    Ready(Box<Prepared>),
}

/// What a batch learned, written and acked together once every message is settled.
#[derive(Default)]
struct Settled {
    acks: Vec<jetstream::Message>,
    /// Decisions logged and recorded, to announce.
    decided: Vec<super::Decided>,
    /// Status notices (deferrals, by task id) and budget alerts (empty id).
    notices: Vec<(String, serde_json::Value)>,
}

/// Settles one message of a batch after the publishes: records what became of it, and
/// either queues its ack or hands it back.
async fn settle_one(
    ctx: &Ctx,
    msg: jetstream::Message,
    plan: Option<Plan>,
    outcome: Option<Result<u64, String>>,
    json: Option<bytes::Bytes>,
    s: &mut Settled,
) {
    match (plan, outcome) {
        (None, _) => {
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
        (Some(Plan::Duplicate), _) => s.acks.push(msg),
        (Some(Plan::Throttle(wait)), _) => {
            // Back at its turn (the throttle gave each held-back task its own, one
            // permit apart); a few milliseconds late at most, so it finds the permit.
            // The turn is in policy time: the redelivery waits it out on the wall clock.
            let late = Duration::from_millis(rand::random_range(1..=10));
            let delay = ctx.core.policy.clock.wall(wait + late);
            let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
        }
        (Some(plan), Some(Err(e))) => {
            ctx.core.metrics.dispatch_errors.inc();
            let delivered = msg.info().map_or(1, |i| i.delivered);
            let retry_in = publish_retry_delay(delivered);
            let (task_id, pool) = match &plan {
                Plan::Dispatch(d) => (d.id.as_str(), d.pool.as_str()),
                Plan::Reject(r) => (r.id.as_str(), "none"),
                _ => ("", ""),
            };
            if let Some(held_back) = PUBLISH_FAILURES_LOG.due(ctx.core.policy.now_ms()) {
                tracing::warn!(%task_id, %pool, error = %e, delivered, retry_in_ms = retry_in.as_millis() as u64, similar_lines_held_back = held_back, "JetStream did not acknowledge a dispatch or rejection; the task stays in the intake stream and is retried (fleet_dispatch_errors_total counts them; one line per 10 s)");
            }
            if let Plan::Dispatch(d) = plan
                && let Some(r) = &d.record.reservation
            {
                ctx.core.policy.unreserve(r);
            }
            let _ = msg.ack_with(AckKind::Nak(Some(retry_in))).await;
        }
        (Some(Plan::Defer(d)), _) => keep_deferral(ctx, msg, d, json, s).await,
        (Some(Plan::Dispatch(d)), outcome) => keep_dispatch(ctx, msg, d, outcome, json, s),
        (Some(Plan::Reject(r)), _) => {
            // Recorded only now that the rejection is durably the task's result, so
            // a redelivery before this point publishes it again instead of skipping.
            if let Err(e) = record_rejection(ctx, &r) {
                tracing::error!(task_id = %r.id, error = %e, "rejected but not recorded");
            }
            if r.expired {
                ctx.core.metrics.tasks_expired.inc();
                tracing::info!(task_id = %r.id, reason = %r.error.message, "task cancelled: its deadline passed before dispatch");
            } else {
                ctx.core.metrics.reject(&r.error.code);
                tracing::info!(task_id = %r.id, code = %r.error.code, reason = %r.error.message, "task rejected");
            }
            s.decided
                .extend(r.decision.map(|record| super::Decided { record, json }));
            s.acks.push(msg);
        }
    }
}

/// Failed dispatch and rejection publishes are logged once per 10 s: a broker that
/// refuses writes (its storage full) refuses every task in hand, again at every retry.
static PUBLISH_FAILURES_LOG: crate::domain::LogEvery =
    crate::domain::LogEvery::new(Duration::from_secs(10));

/// How long an intake message whose dispatch (or rejection) JetStream did not acknowledge
/// waits before it is read again: 500 ms, doubling with each delivery up to 30 s, so a
/// broker that stays full is asked a few times a minute per task, not twice a second.
fn publish_retry_delay(delivered: i64) -> Duration {
    let n = u32::try_from(delivered).unwrap_or(0);
    crate::domain::doubling(Duration::from_millis(500), n, Duration::from_secs(30))
}

/// A deferral: recorded and queued (then acked), or handed back when it cannot be stored.
async fn keep_deferral(
    ctx: &Ctx,
    msg: jetstream::Message,
    d: Box<super::plan::DeferPlan>,
    json: Option<bytes::Bytes>,
    s: &mut Settled,
) {
    let d = *d;
    let recorded = ctx.core.store.update(
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
            r.generation = d.decision.generation.clone();
            r.pool = Some(d.entry.pool.clone());
            r.model = Some(d.entry.model.clone());
            r.route_reason = Some(d.info.reason.clone());
            r.advance_at(TaskState::Received, d.received_at.clone());
            r.advance(TaskState::Deferred);
        },
    );
    let stored = recorded.and_then(|_| ctx.core.policy.deferrals.insert(&d.entry));
    if let Err(e) = stored {
        // Not kept, so not acked: the intake stream still has it.
        tracing::error!(task_id = %d.id, error = %e, "deferral not stored; will retry");
        let _ = msg
            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
            .await;
        return;
    }
    if d.entry.turn.is_some() {
        tracing::debug!(task_id = %d.id, reason = %d.info.reason, "task parked until its turn");
    } else {
        ctx.core.policy.counters.deferred.inc();
        tracing::info!(task_id = %d.id, reason = %d.info.reason, "task deferred");
    }
    s.notices.push((
        d.id.clone(),
        serde_json::json!({
            "task_id": d.id,
            "state": "deferred",
            "reason": d.info.reason,
            "until": d.info.until,
            "policy_version": d.entry.policy_version,
        }),
    ));
    s.decided.push(super::Decided {
        record: d.decision,
        json,
    });
    s.acks.push(msg);
}

/// A dispatch JetStream acknowledged: recorded, watched when targeted, counted, acked.
fn keep_dispatch(
    ctx: &Ctx,
    msg: jetstream::Message,
    d: Box<super::plan::Dispatch>,
    outcome: Option<Result<u64, String>>,
    json: Option<bytes::Bytes>,
    s: &mut Settled,
) {
    let mut d = *d;
    let recovered = d.recovered();
    // A task sent to one worker is watched until it finishes, in case that
    // worker is gone (retarget.rs).
    if let (Some(worker), Some(Ok(seq))) = (&d.decision.worker, &outcome) {
        let t = super::retarget::Targeted {
            task_id: d.id.clone(),
            pool: d.pool.clone(),
            worker: worker.clone(),
            seq: *seq,
            attempt: super::plan::FIRST_ATTEMPT,
            at_ms: d.decision.at_ms,
        };
        if let Err(e) = ctx.targets.insert(&t) {
            tracing::warn!(task_id = %d.id, error = %e, "targeted dispatch not remembered");
        }
    }
    if recovered {
        // Counted as recorded, not as detected: one that is then refused or has no route
        // records nothing.
        ctx.core.metrics.intake_recovered.inc();
    }
    // Most dispatches are a task's first record.
    let recorded = ctx.core.store.create_or_update(
        &d.id,
        || TaskRecord::new(&d.id, d.record.seq),
        |r| {
            d.record.apply(r, &d.pool, recovered);
            if let Some(Ok(seq)) = &outcome {
                r.work_sequence = Some(*seq);
            }
            // The result was processed first and found no reservation to settle: the
            // charge goes in with the reservation.
            super::results::charge(ctx, r);
        },
    );
    match recorded {
        Err(e) => {
            tracing::error!(task_id = %d.id, error = %e, "dispatched but not recorded")
        }
        Ok(rec) if rec.state.is_terminal() => super::results::settle_budget(ctx, &rec),
        Ok(_) => {}
    }
    s.decided.push(super::Decided {
        record: d.decision,
        json,
    });
    for a in d.alerts.drain(..) {
        tracing::warn!(alert = %a, "budget soft threshold crossed");
        s.notices.push((String::new(), a));
    }
    s.acks.push(msg);
    if recovered {
        // Dispatched by the commander before the restart, and finished: nothing to
        // count or watch now, and the dispatch span went with the first run's memory.
        return;
    }
    ctx.core
        .metrics
        .tasks_dispatched
        .get_or_create(&PoolLabel {
            pool: d.pool.clone(),
        })
        .inc();
    ctx.core.fleet.task_event(TaskEvent::Dispatched {
        task_id: d.id.clone(),
        pool: d.pool.clone(),
        expected_ms: d.expected_ms,
        task_type: d.task_type.take(),
    });
    d.span.finish();
    ctx.spans.record(d.span);
}

/// Runs the handling of a batch while telling JetStream, every third of the intake ack
/// wait, that its messages are still in hand: a slow classifier never gets healthy work
/// handed out again, so the ack wait only has to cover a crashed commander, and can be
/// short.
async fn keep_in_hand<T>(
    ctx: &Ctx,
    replies: &[async_nats::Subject],
    work: impl std::future::Future<Output = T>,
) -> T {
    let every = (ctx.intake_ack_wait / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                for reply in replies {
                    // `+WPI` (work in progress) on an acked message is ignored.
                    let _ = ctx.client.publish(reply.clone(), Bytes::from_static(b"+WPI")).await;
                }
            }
        }
    }
}

/// Whether an intake message was handled before (by id), or is new; a new one may be the
/// release of a deferred task.
enum Handled {
    Before,
    /// Out of the deferred queue: (first deferral ms, releases so far), and the turn a
    /// throttle parked it with.
    No {
        release: Option<(u64, u32)>,
        turn: Option<crate::domain::ThrottleTurn>,
    },
    /// Dispatched, run and finished, but its dispatch was never recorded: the commander
    /// stopped between the dispatch's PubAck and the batch's store flush, and after the
    /// restart the worker's result reached the store before this redelivery. It is
    /// decided again and recorded, not published ([`super::plan::Prepared::recovering`]).
    Unrecorded,
}

fn already_handled(
    ctx: &Ctx,
    msg: &jetstream::Message,
    id: &str,
    seq: u64,
) -> Result<Handled, crate::store::StoreError> {
    let hdrs = msg.headers.as_ref();
    // A release of a deferred task carries the header; the commander is the only one
    // that sets it, and it counts only for a task that is deferred right now, here or,
    // when this replica keeps no record of it but its HTTP submission's stub, on the
    // replica that released it or handed it over as it stopped (so the budget's queue
    // keeps the task's place wherever it waits next).
    let existing = ctx.core.store.get(id)?;
    let release = header(hdrs, headers::RELEASE).and_then(|v| {
        let (at, n) = v.split_once(':')?;
        Some((at.parse::<u64>().ok()?, n.parse::<u32>().ok()?))
    });
    let release = release.filter(|_| {
        existing
            .as_ref()
            .is_none_or(|r| r.state == TaskState::Deferred || r.is_stub())
    });
    let turn = release
        .and(existing.as_ref())
        .and_then(|r| r.deferred.as_ref()?.turn.clone());
    let Some(existing) = existing.filter(|e| e.state != TaskState::Received && release.is_none())
    else {
        return Ok(Handled::No { release, turn });
    };
    if dispatch_unrecorded(&existing, seq) {
        tracing::warn!(task_id = %id, seq, "task finished before its dispatch was recorded (the commander stopped in between); recording its decision again without dispatching it");
        return Ok(Handled::Unrecorded);
    }
    ctx.core.metrics.intake_duplicates.inc();
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    if delivered > 1 || existing.intake_sequence == seq || existing.intake_sequence == 0 {
        // The same message again: a crash or a lost ack between handling and acking.
        tracing::info!(task_id = %id, seq, delivered, "intake message redelivered after an interruption; it was already handled");
    } else {
        tracing::warn!(task_id = %id, first = existing.intake_sequence, again = seq, "task id submitted again; keeping the first submission");
    }
    Ok(Handled::Before)
}

/// Whether `existing` is this submission's task finished by a result that came without any
/// record of the task's dispatch, deferral or rejection: the results loop made the record
/// (intake sequence 0) or found the HTTP intake's `received` one (the same sequence).
fn dispatch_unrecorded(existing: &TaskRecord, seq: u64) -> bool {
    existing.state.is_terminal()
        && existing.decision_id.is_none()
        && existing.decision_at_ms.is_none()
        && existing.rejection.is_none()
        && existing.deferred.is_none()
        && (existing.intake_sequence == 0 || existing.intake_sequence == seq)
}

/// The producer's span (when its traceparent is valid), the dispatch span's context, and
/// why an invalid traceparent was refused. Ids are derived, not drawn, so a redelivered
/// submission gets the same dispatch span as the (de-duplicated) first publication that
/// the worker will see.
fn trace_of(
    ctx: &Ctx,
    hdrs: Option<&async_nats::HeaderMap>,
    id: &str,
    seq: u64,
) -> (Option<TraceParent>, TraceParent, Option<String>) {
    let raw_tp = header(hdrs, headers::TRACEPARENT);
    let (parent, invalid) = match raw_tp.map(TraceParent::parse) {
        Some(Ok(p)) => (Some(p), None),
        Some(Err(e)) => {
            ctx.core.metrics.traceparent_invalid.inc();
            (None, raw_tp.map(|v| format!("{v:?}: {e}")))
        }
        None => (None, None),
    };
    let trace_id = parent
        .map(|p| p.trace_id)
        .unwrap_or_else(|| derived_trace_id(id, seq));
    let flags = parent.map(|p| p.flags).unwrap_or(FLAG_SAMPLED);
    let dispatch = TraceParent {
        trace_id,
        span_id: derived_span_id(&trace_id, id, FIRST_ATTEMPT),
        flags,
    };
    (parent, dispatch, invalid)
}

/// Reads one message: the id, duplicates, the task JSON, the trace context.
fn read(ctx: &Ctx, msg: &jetstream::Message) -> Result<Read, crate::store::StoreError> {
    let started = SystemTime::now();
    let received_at = Stamp::now();
    let hdrs = msg.headers.as_ref();
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    // A reply subject outside the allowed inboxes is never published to: the task is
    // rejected below (its result goes to the results stream only).
    let (reply_to, reply_problem) = match header(hdrs, headers::REPLY_TO) {
        None => (None, None),
        Some(r) => match ctx.reply_problem(r) {
            None => (Some(r.to_string()), None),
            Some(why) => (None, Some(why)),
        },
    };

    let parsed = Task::from_json(&msg.payload);
    // The id: from the body, else the headers, else the stream sequence (which the
    // producer learned from its publish ack).
    let header_id = header(hdrs, headers::TASK_ID)
        .or_else(|| header(hdrs, headers::NATS_MSG_ID))
        .filter(|id| is_subject_token(id))
        .map(str::to_string);
    let body_id = parsed.as_ref().ok().and_then(|t| t.id.clone());
    let id = match body_id.or(header_id) {
        Some(id) => id,
        None => sequence_id(ctx, msg, seq)?,
    };

    let (release, turn, recovering) = match already_handled(ctx, msg, &id, seq)? {
        Handled::Before => return Ok(Read::Done(Plan::Duplicate)),
        Handled::No { release, turn } => (release, turn, false),
        Handled::Unrecorded => (None, None, true),
    };
    // A task that ran is never refused after the fact: only a dispatch is recorded for it.
    let refused = reply_problem.is_some() || parsed.is_err();
    if recovering && refused {
        tracing::warn!(task_id = %id, "task that finished before its dispatch was recorded would now be refused; left without a decision");
        return Ok(Read::Done(Plan::Duplicate));
    }
    if let Some(why) = reply_problem {
        ctx.core.metrics.reply_to_refused.inc();
        tracing::warn!(task_id = %id, reason = %why, "task refused: Fleet-Reply-To is not an allowed reply subject");
        return Ok(Read::Done(Reject::plan(id, seq, "bad_reply_to", why, None)));
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
    // Past its deadline nobody wants its result: ended before a classifier call is
    // spent on it. (A task that ran already is only recorded, never ended after the fact.)
    if !recovering
        && let Some(at) = super::plan::deadline_ms(&task)
        && at <= ctx.core.policy.now_ms()
    {
        let deadline = task.deadline.as_deref().unwrap_or_default();
        return Ok(Read::Done(Reject::expired(id, seq, deadline, reply_to)));
    }

    let (parent, dispatch, invalid) = trace_of(ctx, hdrs, &id, seq);
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
        turn,
        recovering,
    })))
}

/// The id of a task sent without one: `seq-<N>`, N being the intake sequence the producer
/// got in its PubAck. A restarted nats-server that lost the tail of the intake stream hands
/// the same sequences out again; a second message under a sequence already taken (told apart
/// by the time the stream stored it) is `seq-<N>-<stored unix ms>` instead of being taken
/// for a redelivery of the first.
fn sequence_id(
    ctx: &Ctx,
    msg: &jetstream::Message,
    seq: u64,
) -> Result<String, crate::store::StoreError> {
    let base = format!("seq-{seq}");
    let Some(stamp) = msg
        .info()
        .ok()
        .and_then(|i| u64::try_from(i.published.unix_timestamp_nanos() / 1_000_000).ok())
    else {
        return Ok(base);
    };
    let id = match ctx.core.store.get(&base)?.and_then(|r| r.intake_stored_ms) {
        Some(first) if first != stamp => {
            let id = format!("{base}-{stamp}");
            tracing::warn!(task_id = %id, seq, first_stored_ms = first, stored_ms = stamp, "intake sequence used a second time (nats-server lost messages in a crash); the task without an id gets its own id");
            id
        }
        _ => base,
    };
    ctx.core.store.update(
        &id,
        || {
            let mut r = TaskRecord::new(&id, seq);
            r.intake_stored_ms = Some(stamp);
            r
        },
        |r| {
            r.intake_stored_ms.get_or_insert(stamp);
        },
    )?;
    Ok(id)
}

/// Records a rejection (why, and its outcome), or an expired task's end (`failed`, with
/// the `cancelled` outcome a worker's result would have given it).
fn record_rejection(ctx: &Ctx, rej: &Reject) -> Result<(), crate::store::StoreError> {
    let result = rej.result();
    ctx.core.store.update(
        &rej.id,
        || TaskRecord::new(&rej.id, rej.seq),
        |r| {
            r.reply_to = rej.reply_to.clone();
            if !rej.expired {
                r.decision_at_ms = rej.decision.as_ref().map(|d| d.at_ms);
                r.rejection = Some(rej.error.clone());
            }
            // The results loop records the same result when it reads it back, usually
            // first: whichever writes first sets the outcome and the change (once), and
            // the other finds the record finished. Either way the record reads the same.
            r.finish(&result);
        },
    )?;
    Ok(())
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

fn derived_span_id(trace: &TraceId, id: &str, attempt: u32) -> SpanId {
    let mut h = fnv1a(&[b"dispatch", &trace.0, id.as_bytes(), &attempt.to_le_bytes()]);
    if h == 0 {
        h = 1;
    }
    SpanId(h.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_refused_publish_is_retried_later_with_each_delivery() {
        let ms = |delivered| super::publish_retry_delay(delivered).as_millis();
        assert_eq!(
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 1_000].map(ms),
            [
                500, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000
            ]
        );
        assert_eq!(
            super::publish_retry_delay(i64::MIN),
            Duration::from_millis(500)
        );
    }
}
