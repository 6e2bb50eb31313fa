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

use super::Ctx;

/// Refused releases are logged once per 10 s: a full intake stream refuses every pass.
static REFUSED_LOG: crate::domain::LogEvery = crate::domain::LogEvery::new(Duration::from_secs(10));

/// The soonest the loop wakes again for a parked turn.
const MIN_TURN_SLEEP: Duration = Duration::from_millis(5);

pub async fn run(ctx: Arc<Ctx>, every: Duration, batch: usize, mut stop: watch::Receiver<bool>) {
    // After a pass JetStream refused, the next waits the interval, not the next turn
    // (which is then already due): no tight loop while the intake stream is unavailable.
    let mut refused_last = false;
    loop {
        let sleep = match next_wake_in(&ctx) {
            Some(t) if !refused_last => t.clamp(MIN_TURN_SLEEP, every),
            _ => every,
        };
        let swapped = tokio::select! {
            _ = tokio::time::sleep(sleep) => false,
            _ = ctx.core.policy.changed.notified() => true,
            _ = stop.changed() => return,
        };
        let live = ctx.core.policy.live();
        let now = ctx.core.policy.now_ms();
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
            let void: Option<&dyn Fn(&crate::domain::ThrottleTurn) -> bool> =
                swapped.then_some(&void);
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
        refused_last = false;
        if due.is_empty() {
            continue;
        }
        let mut pending = Vec::with_capacity(due.len());
        for t in due {
            let mut h = HeaderMap::new();
            for (k, v) in &t.headers {
                let _ = protocol::set_header(&mut h, k, v);
            }
            let n = t.releases + 1;
            let _ = protocol::set_header(&mut h, headers::TASK_ID, &t.id);
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
            let fut = ctx
                .js
                .publish_with_headers(ctx.subjects.submit(), h, Bytes::from(t.task_json.clone()))
                .await;
            pending.push((t, fut));
        }
        let (mut released, mut unparked) = (0u64, 0u64);
        let (mut refused, mut last_error) = (0u64, None);
        for (t, fut) in pending {
            let acked = match fut {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match acked {
                Ok(()) => {
                    if let Err(e) = ctx.core.policy.deferrals.remove(&t) {
                        tracing::error!(task_id = %t.id, error = %e, "released task not removed from the deferred queue");
                    }
                    if t.turn.is_some() {
                        unparked += 1;
                    } else {
                        released += 1;
                    }
                }
                Err(e) => {
                    refused += 1;
                    last_error = Some((t.id, e));
                }
            }
        }
        refused_last = refused > 0;
        if let Some((task_id, error)) = last_error
            && let Some(held_back) = REFUSED_LOG.due(now)
        {
            tracing::warn!(refused, %task_id, %error, similar_lines_held_back = held_back, "the intake stream did not acknowledge released tasks; they stay deferred and are released again (one line per 10 s)");
        }
        if let Err(e) = ctx.core.store.flush().await {
            tracing::error!(error = %e, "store flush after release failed");
        }
        ctx.core.policy.counters.released.inc_by(released);
        if released > 0 {
            tracing::info!(released, version = %live.policy.version, "deferred tasks released");
        }
        tracing::debug!(unparked, "parked tasks back at their turn");
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
