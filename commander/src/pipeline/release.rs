//! The release loop: deferred tasks whose budget has room again go back to the intake
//! stream, priority first, then oldest. It wakes every `policy.release_interval_ms` and
//! at once after a policy swap (a raised limit or a removed budget frees tasks without
//! waiting for a window to reset). A task leaves the deferred queue only after JetStream
//! acknowledged its republication, and the intake loop re-decides it like any task (it
//! may be deferred again, in the same place in the queue).
//!
//! Tasks a throttle parked go back the same way once their turn has come: the loop wakes
//! at the next turn when that is sooner than its interval. After a swap, parked tasks
//! whose throttle changed or went go back at once, to be given a turn as it is now.
//!
//! A deferred or parked task whose `deadline` passes goes back at its deadline, whatever
//! holds it: the intake loop ends it as `cancelled` (`deadline_exceeded`) without
//! classifying it, so its producer hears at the deadline, not at a release weeks later.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use fleet_worker::protocol::{self, headers};
use tokio::sync::watch;

use fleet_worker::message::TaskResult;

use super::Ctx;
use crate::policy::DeferredTask;

/// Refused releases are logged once per 10 s: a full intake stream refuses every pass.
static REFUSED_LOG: crate::domain::LogEvery = crate::domain::LogEvery::new(Duration::from_secs(10));

/// The soonest the loop wakes again for a parked turn.
const MIN_TURN_SLEEP: Duration = Duration::from_millis(5);

pub async fn run(ctx: Arc<Ctx>, every: Duration, batch: usize, mut stop: watch::Receiver<bool>) {
    // After a pass JetStream refused, the next waits the interval, not the next turn
    // (which is then already due): no tight loop while the intake stream is unavailable.
    let mut refused_last = false;
    loop {
        let next = next_wake_in(&ctx).filter(|_| !refused_last);
        let sleep = sleep_for(next, every, ctx.core.policy.clock.as_ref());
        let deferrals = &ctx.core.policy.deferrals;
        let swapped = tokio::select! {
            _ = tokio::time::sleep(sleep) => false,
            _ = ctx.core.policy.changed.notified() => true,
            _ = deferrals.wake.notified() => false,
            _ = stop.changed() => return,
        };
        // No cancel marks a task while it is on its way back to intake.
        let _pass = deferrals.pass().await;
        let now = ctx.core.policy.now_ms();
        let due = due_now(&ctx, swapped, now, batch);
        refused_last = false;
        if due.is_empty() {
            continue;
        }
        let mut tally = Tally::default();
        send(&ctx, due, now, &mut tally).await;
        if !tally.left_early.is_empty() {
            // Their places in their lines are free: newcomers need not queue behind them.
            let last_parked = |throttle: &str, key: &str| {
                deferrals
                    .last_parked_turn_ms(throttle, key)
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "parked lines unreadable; the line is kept");
                        Some(u64::MAX)
                    })
            };
            let live = ctx.core.policy.live();
            live.throttles.shrink_lines(&tally.left_early, &last_parked);
        }
        refused_last = tally.refused > 0;
        if let Some((task_id, error)) = tally.last_error
            && let Some(held_back) = REFUSED_LOG.due(now)
        {
            tracing::warn!(refused = tally.refused, %task_id, %error, similar_lines_held_back = held_back, "the intake stream did not acknowledge released tasks; they stay deferred and are released again (one line per 10 s)");
        }
        if let Err(e) = ctx.core.store.flush().await {
            tracing::error!(error = %e, "store flush after release failed");
        }
        ctx.core.policy.counters.released.inc_by(tally.released);
        if tally.released > 0 {
            let version = ctx.core.policy.live().policy.version.clone();
            tracing::info!(released = tally.released, %version, "deferred tasks released");
        }
        tracing::debug!(unparked = tally.unparked, "parked tasks back at their turn");
    }
}

/// Publishes `due` to the intake stream (cancelled ones' results to the results stream)
/// and settles each as JetStream answers: out of the queue once acknowledged. At most
/// [`super::RELEASE_WINDOW`] PubAcks are awaited at once, whatever `policy.release_batch`
/// (a pass holding more than the JetStream context's bound waited for ever).
async fn send(ctx: &Ctx, due: Vec<DeferredTask>, now: u64, tally: &mut Tally) {
    let mut due = due.into_iter().peekable();
    while due.peek().is_some() {
        let mut pending = Vec::with_capacity(super::RELEASE_WINDOW);
        for t in due.by_ref().take(super::RELEASE_WINDOW) {
            let fut = publish(ctx, &t).await;
            pending.push((t, fut));
        }
        for (t, fut) in pending {
            let acked = match fut {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            settle(ctx, t, acked, now, tally);
        }
    }
}

/// What [`hand_over`] did: tasks handed to the intake stream, and those still waiting
/// here.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HandedOver {
    pub handed: u64,
    pub left: usize,
}

/// As this replica stops cleanly while others run: every task waiting here, deferred
/// or parked, goes back to the intake stream, for the other replicas to decide again (a
/// replica scaled down for good, or replaced by one with a fresh store, would otherwise
/// keep them where nobody releases them). Each goes as a release does: a budget's
/// deferral keeps its place in the queue wherever it is deferred next (its first
/// deferral time travels in `Fleet-Release`); a parked task gets a turn from the
/// throttle where it lands; a cancelled one's result is published instead. Call it once
/// this replica's intake and release loops have stopped, so that it does not take them
/// back itself. It stops at the first refusal (NATS away, the intake stream full) or
/// after `within`: what is left waits here for this replica's restart.
pub async fn hand_over(ctx: &Ctx, batch: usize, within: Duration) -> HandedOver {
    let deferrals = &ctx.core.policy.deferrals;
    let mut tally = Tally::default();
    let until = tokio::time::Instant::now() + within;
    // A batch, once sent, is settled whatever the time: cut in between, its tasks would
    // be both in the intake stream and here.
    if let Ok(_pass) = tokio::time::timeout_at(until, deferrals.pass()).await {
        // Cursors, not the queue's head: an entry that cannot be removed is passed over.
        let (mut after_deferred, mut after_parked) = (None::<Vec<u8>>, None::<Vec<u8>>);
        while tokio::time::Instant::now() < until {
            let listed = deferrals
                .list(batch, after_deferred.as_deref())
                .and_then(|mut d| {
                    d.extend(deferrals.list_parked(batch, after_parked.as_deref())?);
                    Ok(d)
                });
            let due = match listed {
                Ok(d) if !d.is_empty() => d,
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, "waiting tasks unreadable; the rest wait here");
                    break;
                }
            };
            for t in &due {
                let after = if t.turn.is_some() {
                    &mut after_parked
                } else {
                    &mut after_deferred
                };
                *after = Some(t.key());
            }
            send(ctx, due, ctx.core.policy.now_ms(), &mut tally).await;
            if let Err(e) = ctx.core.store.flush().await {
                tracing::error!(error = %e, "store flush while handing over failed");
            }
            if tally.refused > 0 {
                break;
            }
        }
    }
    let left = deferrals.len() + deferrals.parked_len();
    if let Some((task_id, error)) = &tally.last_error {
        tracing::warn!(refused = tally.refused, %task_id, %error, left, "the intake stream did not take every waiting task; the rest wait here for this replica's restart");
    }
    HandedOver {
        handed: tally.released + tally.unparked + tally.cancelled,
        left,
    }
}

/// What a pass did.
#[derive(Default)]
struct Tally {
    released: u64,
    unparked: u64,
    cancelled: u64,
    refused: u64,
    last_error: Option<(String, String)>,
    /// Turns of parked tasks that left before them (cancelled, or past their deadline).
    left_early: Vec<crate::domain::ThrottleTurn>,
}

/// The waiting tasks to let go now, each once: deferred ones their budgets have room
/// for, parked ones at their turns (after a swap, also those whose turns went void), and
/// those whose deadline passed or that were cancelled.
fn due_now(ctx: &Ctx, swapped: bool, now: u64, batch: usize) -> Vec<DeferredTask> {
    let live = ctx.core.policy.live();
    let deferrals = &ctx.core.policy.deferrals;
    let mut due = Vec::new();
    if !deferrals.is_empty() {
        match ctx
            .core
            .policy
            .with_ledger(|l| deferrals.due(&live.policy, l, now, batch))
        {
            Ok(d) => due = d,
            Err(e) => tracing::error!(error = %e, "deferred queue unreadable"),
        }
    }
    if deferrals.parked_len() > 0 {
        let void = |t: &crate::domain::ThrottleTurn| !live.throttles.honours(t);
        let void: Option<&dyn Fn(&crate::domain::ThrottleTurn) -> bool> = swapped.then_some(&void);
        match deferrals.parked_due(now, batch, void) {
            Ok(d) => due.extend(d),
            Err(e) => tracing::error!(error = %e, "parked queue unreadable"),
        }
    }
    if deferrals.next_deadline_ms().is_some_and(|at| at <= now) {
        match deferrals.expired(now, batch) {
            Ok(expired) => {
                let mut ids: std::collections::HashSet<String> =
                    due.iter().map(|t| t.id.clone()).collect();
                due.extend(expired.into_iter().filter(|t| ids.insert(t.id.clone())));
            }
            Err(e) => tracing::error!(error = %e, "deadline index unreadable"),
        }
    }
    due
}

/// Puts a waiting task back on intake, or, when it was cancelled, publishes its
/// `cancelled` result to the results stream (as a rejection is published) instead.
async fn publish(
    ctx: &Ctx,
    t: &DeferredTask,
) -> Result<
    async_nats::jetstream::context::PublishAckFuture,
    async_nats::jetstream::context::PublishError,
> {
    if let Some(reason) = &t.cancelled {
        let reply_to = t.headers.iter().find(|(k, _)| k == headers::REPLY_TO);
        let reply_to = reply_to.map(|(_, r)| r.as_str());
        return super::publish_own_result(
            ctx,
            &TaskResult::cancelled(&t.id, "cancelled", reason),
            reply_to,
        )
        .await;
    }
    let mut h = HeaderMap::new();
    let _ = protocol::set_header(&mut h, headers::TASK_ID, &t.id);
    for (k, v) in &t.headers {
        let _ = protocol::set_header(&mut h, k, v);
    }
    let n = t.releases + 1;
    let _ = protocol::set_header(
        &mut h,
        headers::RELEASE,
        &format!("{}:{n}", t.deferred_at_ms),
    );
    // Unique per release, so a second release after a re-deferral is not dropped
    // as a duplicate; the same release published twice (a crash) is.
    let _ = protocol::set_header(
        &mut h,
        headers::NATS_MSG_ID,
        &format!("{}:release:{}:{n}", t.id, t.deferred_at_ms),
    );
    ctx.js
        .publish_with_headers(ctx.subjects.submit(), h, Bytes::from(t.task_json.clone()))
        .await
}

/// After JetStream answered for one task: out of the queue once acknowledged (a
/// cancelled one's end recorded first), else kept for the next pass.
fn settle(ctx: &Ctx, t: DeferredTask, acked: Result<(), String>, now: u64, tally: &mut Tally) {
    if let Err(e) = acked {
        tally.refused += 1;
        tally.last_error = Some((t.id, e));
        return;
    }
    if let Some(turn) = &t.turn
        && (t.cancelled.is_some() || turn.at_ms > now)
    {
        tally.left_early.push(turn.clone());
    }
    if let Some(reason) = &t.cancelled {
        let result = TaskResult::cancelled(&t.id, "cancelled", reason);
        let recorded = ctx.core.store.update(
            &t.id,
            || crate::store::TaskRecord::new(&t.id, 0),
            |r| r.finish(&result),
        );
        if let Err(e) = recorded {
            // The result is in the results stream, which records it too.
            tracing::error!(task_id = %t.id, error = %e, "cancelled task's end not recorded here");
        }
        ctx.core.metrics.waiting_cancelled.inc();
        tally.cancelled += 1;
        tracing::info!(task_id = %t.id, %reason, "waiting task cancelled");
    } else if t.turn.is_some() {
        tally.unparked += 1;
    } else {
        tally.released += 1;
    }
    if let Err(e) = ctx.core.policy.deferrals.remove(&t) {
        tracing::error!(task_id = %t.id, error = %e, "released task not removed from the deferred queue");
    }
}

/// How long the loop sleeps: until the next turn or deadline (`next`, in policy time),
/// on the wall clock, at least [`MIN_TURN_SLEEP`] and at most `every`; `every` alone
/// without one. `every` (`policy.release_interval_ms`) may be under the minimum: it wins.
fn sleep_for(
    next: Option<Duration>,
    every: Duration,
    clock: &dyn crate::domain::Clock,
) -> Duration {
    match next {
        Some(t) => clock.wall(t).max(MIN_TURN_SLEEP).min(every),
        None => every,
    }
}

/// How long until the next parked turn or deadline, if a waiting task has one.
fn next_wake_in(ctx: &Ctx) -> Option<Duration> {
    let d = &ctx.core.policy.deferrals;
    let at = match (d.next_turn_ms(), d.next_deadline_ms()) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    Some(Duration::from_millis(
        at.saturating_sub(ctx.core.policy.now_ms()),
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::domain::{ScaledClock, SystemClock};

    /// The sleep to the next turn is that turn's wall time, kept between the minimum and
    /// the interval; an interval under the minimum (`release_interval_ms = 2`) is the
    /// sleep, where the clamp it replaces panicked (min > max) and left every parked task
    /// where it was.
    #[test]
    fn the_sleep_to_the_next_turn_is_its_wall_time_within_the_interval() {
        let ms = Duration::from_millis;
        let sleep = |next, every| super::sleep_for(next, every, &SystemClock);
        assert_eq!(sleep(Some(ms(300)), ms(1_000)), ms(300));
        assert_eq!(sleep(Some(ms(0)), ms(1_000)), super::MIN_TURN_SLEEP);
        assert_eq!(sleep(Some(ms(5_000)), ms(1_000)), ms(1_000));
        assert_eq!(sleep(None, ms(1_000)), ms(1_000));
        assert_eq!(sleep(Some(ms(300)), ms(2)), ms(2));
        assert_eq!(sleep(Some(ms(0)), ms(1)), ms(1));
        // Fleet time at 60×: a turn a minute off is a second of wall time.
        let lab = ScaledClock::new(0, 60.0);
        assert_eq!(
            super::sleep_for(Some(ms(60_000)), ms(5_000), &lab),
            ms(1_000)
        );
    }
}
