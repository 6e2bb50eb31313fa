//! The release loop: deferred tasks whose budget has room again go back to the intake
//! stream, priority first, then oldest. It wakes every `policy.release_interval_ms` and
//! at once after a policy swap (a raised limit or a removed budget frees tasks without
//! waiting for a window to reset). A task leaves the deferred queue only after JetStream
//! acknowledged its republication, and the intake loop re-decides it like any task (it
//! may be deferred again, in the same place in the queue).

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use fleet_worker::protocol::{self, headers};
use tokio::sync::watch;

use super::Ctx;

/// Refused releases are logged once per 10 s: a full intake stream refuses every pass.
static REFUSED_LOG: crate::domain::LogEvery = crate::domain::LogEvery::new(Duration::from_secs(10));

pub async fn run(ctx: Arc<Ctx>, every: Duration, batch: usize, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = ctx.core.policy.changed.notified() => {}
            _ = stop.changed() => return,
        }
        if ctx.core.policy.deferrals.is_empty() {
            continue;
        }
        let live = ctx.core.policy.live();
        let now = ctx.core.policy.now_ms();
        let due = ctx
            .core
            .policy
            .with_ledger(|l| ctx.core.policy.deferrals.due(&live.policy, l, now, batch));
        let due = match due {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "deferred queue unreadable");
                continue;
            }
        };
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
        let (mut released, mut refused, mut last_error) = (0u64, 0u64, None);
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
                    released += 1;
                }
                Err(e) => {
                    refused += 1;
                    last_error = Some((t.id, e));
                }
            }
        }
        if let Some((task_id, error)) = last_error
            && let Some(held_back) = REFUSED_LOG.due(now)
        {
            tracing::warn!(refused, %task_id, %error, similar_lines_held_back = held_back, "the intake stream did not acknowledge released tasks; they stay deferred and are released again (one line per 10 s)");
        }
        if let Err(e) = ctx.core.store.flush().await {
            tracing::error!(error = %e, "store flush after release failed");
        }
        ctx.core.policy.counters.released.inc_by(released);
        tracing::info!(released, version = %live.policy.version, "deferred tasks released");
    }
}
