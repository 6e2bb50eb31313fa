//! Results: record how each task ended, make it durable, then forward the result to the
//! producer's reply subject. Forwarding is at-least-once (a crash between forward and ack
//! forwards again); the SDK's result inbox drops the copies by task id.

use async_nats::jetstream::{self, AckKind};
use fleet_worker::message::{ResultStatus, TaskResult};
use fleet_worker::protocol::{header, headers, is_subject_token};
use tracing::Instrument;

use super::Ctx;
use crate::fleet::TaskEvent;
use crate::metrics::FinishLabels;
use crate::store::{TaskRecord, TaskState};

/// Handles one batch of result messages: records every outcome, makes the batch durable
/// with one flush, and only then forwards each result to its producer and acks it. A
/// producer that holds a result can rely on the commander's record of it: a crash right
/// after the forward (the producer kills the commander as soon as its result lands, say)
/// loses nothing the producer saw.
pub async fn handle_batch(ctx: &Ctx, batch: Vec<jetstream::Message>) {
    let span = tracing::info_span!("results_batch", size = batch.len());
    async {
        let read: Vec<_> = batch
            .into_iter()
            .map(|msg| {
                let result = read_result(ctx, &msg);
                (msg, result)
            })
            .collect();
        let mut recorded = Vec::with_capacity(read.len());
        for (msg, result) in read {
            let Some(result) = result else {
                // Unreadable: dropped (counted), not retried.
                recorded.push((msg, None));
                continue;
            };
            match record_one(ctx, &msg, result) {
                Ok(forward) => recorded.push((msg, forward)),
                Err(Retry) => nak(&msg).await,
            }
        }
        if let Err(e) = ctx.core.store.flush().await {
            tracing::error!(error = %e, "store flush failed; leaving the results for redelivery");
            return;
        }
        for (msg, forward) in recorded {
            if let Some(f) = forward
                && forward_one(ctx, &msg, f).await.is_err()
            {
                nak(&msg).await;
                continue;
            }
            if let Err(e) = msg.ack().await {
                tracing::warn!(error = %e, "result ack failed; the redelivery will be recognised");
            }
        }
    }
    .instrument(span)
    .await
}

/// Hands a result back for redelivery in a second (recording it again is idempotent).
async fn nak(msg: &jetstream::Message) {
    let _ = msg
        .ack_with(AckKind::Nak(Some(std::time::Duration::from_secs(1))))
        .await;
}

/// The message should be retried later.
struct Retry;

/// Where a recorded result goes once the batch is durable: the producer's reply subject.
struct Forward {
    reply_to: String,
    task_id: String,
}

/// The result a message carries, or `None` (counted, logged) when it cannot be read: such
/// a result is dropped, not retried.
fn read_result(ctx: &Ctx, msg: &jetstream::Message) -> Option<TaskResult> {
    let problem = match serde_json::from_slice::<TaskResult>(&msg.payload) {
        Ok(r) if is_subject_token(&r.task_id) => return Some(r),
        Ok(_) => "its task_id is not a subject token".to_string(),
        Err(e) => format!("it does not parse: {e}"),
    };
    ctx.core.metrics.results_invalid.inc();
    // A worker that publishes garbage as fast as it can must not fill the log with it.
    if let Some(held_back) = INVALID_RESULTS_LOG.due(ctx.core.policy.now_ms()) {
        tracing::warn!(subject = %msg.subject, %problem, similar_lines_held_back = held_back, "result dropped (fleet_results_invalid_total counts them; one line per 10 s)");
    }
    None
}

static INVALID_RESULTS_LOG: crate::domain::LogEvery =
    crate::domain::LogEvery::new(std::time::Duration::from_secs(10));

/// Records one result in the task's record (and, the first time it ends the task, the
/// budget, live state and counters); says where to forward it. The batch has named the
/// task in the retention index already.
fn record_one(
    ctx: &Ctx,
    msg: &jetstream::Message,
    result: TaskResult,
) -> Result<Option<Forward>, Retry> {
    let hdrs = msg.headers.as_ref();
    let id = result.task_id.as_str();
    // Another replica's run: its reply subject is that replica's to check and use.
    if let Some(keeper) = header(hdrs, headers::REPLICA).filter(|r| *r != &*ctx.core.replica) {
        return finish_elsewhere(ctx, id, &result, keeper);
    }
    // Workers echo the producer's reply subject; it is checked again, since a result is
    // as untrusted as a task.
    let reply_header = header(hdrs, headers::REPLY_TO).and_then(|r| {
        match ctx.reply_problem(r) {
            None => Some(r.to_string()),
            Some(why) => {
                ctx.core.metrics.reply_to_refused.inc();
                tracing::warn!(task_id = %result.task_id, reason = %why, "result names a reply subject that is not allowed; not forwarding it there");
                None
            }
        }
    });
    // Whether this message moved the task to a terminal state (the closure may run more
    // than once under contention; the last run is the one that stuck).
    let finished_now = std::cell::Cell::new(false);
    let rec = ctx
        .core
        .store
        .update(
            id,
            || TaskRecord::new(id, 0),
            |r| {
                let was_terminal = r.state.is_terminal();
                r.finish(&result);
                finished_now.set(!was_terminal && r.state.is_terminal());
                charge(ctx, r);
                if r.reply_to.is_none() {
                    r.reply_to = reply_header.clone();
                }
            },
        )
        .map_err(|e| {
            tracing::error!(task_id = id, error = %e, "store update failed");
            Retry
        })?;
    if finished_now.get() {
        finished(ctx, id, &rec, &result);
    }
    Ok(rec.reply_to.map(|reply_to| Forward {
        reply_to,
        task_id: id.to_string(),
    }))
}

/// A run another replica dispatched (its `Fleet-Replica`): that replica charges its
/// budgets, counts it and forwards its result. Here there is at most a record to finish:
/// the stub of a task submitted here over HTTP, or a task this replica deferred and
/// released to the intake stream, where the other took it. Nothing is made up for a task
/// this replica does not know.
fn finish_elsewhere(
    ctx: &Ctx,
    id: &str,
    result: &TaskResult,
    keeper: &str,
) -> Result<Option<Forward>, Retry> {
    match ctx.core.store.finish_elsewhere(id, result, keeper) {
        Ok(Some(rec)) => super::stubs::finished_elsewhere(&ctx.core, &rec),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(task_id = id, error = %e, "store update failed");
            return Err(Retry);
        }
    }
    Ok(None)
}

/// Forwards a recorded result to its producer's reply subject, with the trace and task
/// headers it came with. Forwarded every time a result message is handled: that is once,
/// unless the message is redelivered after a crash, and the producer's inbox drops the
/// copy.
async fn forward_one(ctx: &Ctx, msg: &jetstream::Message, f: Forward) -> Result<(), Retry> {
    let h = super::carried_headers(
        msg.headers.as_ref(),
        &[
            headers::TRACEPARENT,
            headers::TRACESTATE,
            headers::BAGGAGE,
            headers::TASK_ID,
            headers::ATTEMPT,
        ],
    );
    if let Err(e) = ctx
        .client
        .publish_with_headers(f.reply_to, h, msg.payload.clone())
        .await
    {
        tracing::warn!(task_id = %f.task_id, error = %e, "forwarding the result failed; will retry");
        return Err(Retry);
    }
    ctx.core.metrics.results_forwarded.inc();
    Ok(())
}

/// What a task's first terminal result tells the rest: the budget is settled, the live
/// state and the counters hear of it, and a failed, timed-out (cancelled at its deadline)
/// or dead-lettered task's trace is marked to be kept whatever the sample says.
fn finished(ctx: &Ctx, id: &str, rec: &TaskRecord, result: &TaskResult) {
    settle_budget(ctx, rec);
    let pool = rec
        .pool
        .clone()
        .or_else(|| result.pool.clone())
        .unwrap_or_default();
    let status = serde_json::to_value(result.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    if matches!(
        result.status,
        ResultStatus::Failed | ResultStatus::Cancelled
    ) {
        ctx.core
            .traces
            .flags
            .task_failed(id, ctx.core.policy.now_ms());
    }
    ctx.core.fleet.task_event(TaskEvent::Finished {
        task_id: id.to_string(),
        pool: pool.clone(),
        ok: result.status == ResultStatus::Ok,
        dispatch_latency_ms: dispatch_latency_ms(rec, result),
    });
    ctx.core
        .metrics
        .tasks_finished
        .get_or_create(&FinishLabels { pool, status })
        .inc();
}

/// Records on a finished task's budget reservation what the task cost, once: the
/// worker's figure, else its token usage at the registry's price of the model it used (or
/// was routed to), else — neither known — the estimate (a cost is never invented as
/// zero). Runs inside the record's update, so the charge is written (and the task log's
/// ledger changed) with the record that finishes the task, or with the dispatch when the
/// result came first.
pub(crate) fn charge(ctx: &Ctx, rec: &mut TaskRecord) {
    if !rec.state.is_terminal() {
        return;
    }
    let cost = match &rec.budget {
        Some(r) if r.charged_usd.is_none() => cost_of(ctx, rec, r.est_usd),
        _ => return,
    };
    if let Some(r) = rec.budget.as_mut() {
        r.charged_usd = Some(cost);
    }
}

/// The most one task's result may say it cost; over it, the figure is not believed (the
/// tokens, else the estimate, are charged). One result claiming 1e300 would otherwise
/// exhaust its budgets for the rest of their window.
const MAX_TASK_COST_USD: f64 = 1_000_000.0;

/// What a finished task cost (see [`charge`]); `est` when its result says nothing
/// believable.
fn cost_of(ctx: &Ctx, rec: &TaskRecord, est: f64) -> f64 {
    let live = ctx.core.policy.live();
    rec.outcome
        .as_ref()
        .and_then(|o| o.usage.as_ref())
        .and_then(|u| reported_cost(u, rec.model.as_deref(), &live.registry))
        .unwrap_or(est)
}

/// What a result's usage says the task cost: the worker's `cost_usd`, else its tokens at
/// the registry's price of the model it names (or the task was routed to). A figure out of
/// range (a cost over [`MAX_TASK_COST_USD`], a token count over
/// `domain::MAX_TOKENS_PER_REPORT`) says nothing.
fn reported_cost(
    u: &fleet_worker::message::Usage,
    routed_model: Option<&str>,
    registry: &crate::registry::Registry,
) -> Option<f64> {
    if let Some(c) = u
        .cost_usd
        .filter(|c| c.is_finite() && (0.0..=MAX_TASK_COST_USD).contains(c))
    {
        return Some(c);
    }
    let max = crate::domain::MAX_TOKENS_PER_REPORT;
    if u.input_tokens > max || u.output_tokens > max {
        return None;
    }
    let entry = registry.lookup(u.model.as_deref().or(routed_model)?)?;
    Some(entry.cost(&crate::registry::TokenUsage {
        input: u.input_tokens,
        output: u.output_tokens,
        ..Default::default()
    }))
}

/// Settles a finished task's reservation in the ledger the task path decides on, with
/// the charge its record holds ([`charge`]). Called by whichever of the result and the
/// dispatch record reaches the store second.
pub(crate) fn settle_budget(ctx: &Ctx, rec: &TaskRecord) {
    if let Some(r) = &rec.budget
        && let Some(cost) = r.charged_usd
    {
        ctx.core.policy.settle(r, cost);
    }
}

/// Dispatch latency: from the commander taking the task off the intake stream (the last
/// time, for a task released from the deferred queue) to the worker
/// receiving it (routing, publishing and the wait in the pool's queue), from the store's
/// history and the result's timings.
fn dispatch_latency_ms(rec: &TaskRecord, result: &TaskResult) -> Option<u64> {
    let dispatched = rec
        .history
        .iter()
        .rev()
        .find(|c| c.state == TaskState::Received)
        .and_then(|c| c.at.unix_ms())?;
    let received = fleet_worker::message::rfc3339_unix_ms(result.timings.received_at.as_deref()?)?;
    // Clocks of different machines: a receipt "before" dispatch counts as zero.
    Some(received.saturating_sub(dispatched))
}

#[cfg(test)]
mod tests {
    use fleet_worker::message::Usage;

    use super::*;
    use crate::registry::Registry;

    /// A result's own figures are charged while they are believable; a cost or a token
    /// count no task can have says nothing, and the next source (or the estimate) is used.
    #[test]
    fn a_result_s_cost_is_believed_only_in_range() {
        let registry = Registry::builtin().unwrap();
        let usage = |cost_usd: Option<f64>, input_tokens: u64| Usage {
            model: Some("gpt-4o".into()),
            input_tokens,
            output_tokens: 0,
            cost_usd,
        };
        let priced = |n: u64| {
            registry
                .lookup("gpt-4o")
                .unwrap()
                .cost(&crate::registry::TokenUsage {
                    input: n,
                    ..Default::default()
                })
        };
        assert_eq!(
            reported_cost(&usage(Some(0.25), 10), None, &registry),
            Some(0.25)
        );
        assert_eq!(
            reported_cost(&usage(Some(MAX_TASK_COST_USD), 10), None, &registry),
            Some(MAX_TASK_COST_USD)
        );
        // Not believed: the tokens are priced instead.
        for absurd in [1e300, f64::INFINITY, -1.0, f64::NAN] {
            assert_eq!(
                reported_cost(&usage(Some(absurd), 1_000), None, &registry),
                Some(priced(1_000)),
                "{absurd}"
            );
        }
        let max = crate::domain::MAX_TOKENS_PER_REPORT;
        assert_eq!(
            reported_cost(&usage(None, max), None, &registry),
            Some(priced(max))
        );
        assert_eq!(reported_cost(&usage(None, u64::MAX), None, &registry), None);
        assert_eq!(
            reported_cost(&usage(Some(1e300), max + 1), None, &registry),
            None
        );
    }
}
