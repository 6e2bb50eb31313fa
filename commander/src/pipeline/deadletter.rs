//! Tasks no worker could finish. A work message delivered `max_deliver` times (10) without
//! an ack is never delivered again: JetStream says so with a max-deliveries advisory and
//! leaves the message in the work-queue stream. Without this loop such a task would stay
//! `dispatched` forever. Here it becomes a `failed` result (`dead_lettered`, naming the
//! attempt, the deliveries and the last worker telemetry saw it on), published to the
//! results stream like any worker's result: the results loop then records it, settles
//! the budget reservation and tells the producer on its reply subject and on
//! `<prefix>.results.<id>`. The work message is deleted after the result is stored.
//!
//! JetStream publishes the advisory on core NATS; the commander keeps them in a stream
//! (`broker::advisories_stream_config`), so one sent while no commander was connected waits
//! for the next one instead of stranding its task. Each advisory is acked once its task's
//! failed result is stored (or its work message turned out to be gone), and handed back
//! when the broker cannot be reached, so it is handled again.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use fleet_worker::message::{ErrorInfo, ResultStatus, TaskResult, Timings, now_rfc3339};
use fleet_worker::protocol::{self, header, headers};
use serde::Deserialize;
use std::time::Duration;

use super::Ctx;

/// `io.nats.jetstream.advisory.v1.max_deliver`, the fields used.
#[derive(Debug, Deserialize)]
struct MaxDeliver {
    stream_seq: u64,
    deliveries: u64,
    #[serde(default)]
    consumer: String,
}

/// Handles one batch of kept advisories: each is acked when handled and handed back (with
/// a delay) when the broker could not be reached. One that does not parse is not an
/// advisory of ours and is dropped.
pub async fn handle_batch(ctx: &Ctx, batch: Vec<jetstream::Message>) {
    for msg in batch {
        let done = match serde_json::from_slice::<MaxDeliver>(&msg.payload) {
            Ok(a) => dead_letter(ctx, &a).await,
            Err(e) => {
                tracing::warn!(error = %e, subject = %msg.subject, "max-deliveries advisory does not parse; dropping it");
                true
            }
        };
        let ack = if done {
            msg.ack().await
        } else {
            msg.ack_with(AckKind::Nak(Some(RETRY_AFTER))).await
        };
        if let Err(e) = ack {
            // Not acked: the advisory comes back after the ack wait and is handled again,
            // which is harmless (the result is stored once per attempt).
            tracing::debug!(error = %e, "advisory ack not sent");
        }
    }
}

/// How long an advisory that could not be handled waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Whether the advisory is settled: its task has a stored failed result, or its work
/// message is gone (acked after all).
async fn dead_letter(ctx: &Ctx, a: &MaxDeliver) -> bool {
    let stream = match ctx.js.get_stream(ctx.subjects.work_stream()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, seq = a.stream_seq, "dead letter: work stream not reachable");
            return false;
        }
    };
    let work = match stream.get_raw_message(a.stream_seq).await {
        Ok(m) => m,
        Err(e)
            if matches!(
                e.kind(),
                jetstream::stream::RawMessageErrorKind::NoMessageFound
            ) =>
        {
            // Acked (or deleted) after all: nothing is stranded.
            tracing::debug!(seq = a.stream_seq, "dead letter: work message already gone");
            return true;
        }
        Err(e) => {
            tracing::warn!(error = %e, seq = a.stream_seq, "dead letter: work message not readable now");
            return false;
        }
    };
    let hdrs = Some(&work.headers);
    let Some(task_id) = header(hdrs, headers::TASK_ID)
        .filter(|id| protocol::is_subject_token(id))
        .map(str::to_string)
    else {
        tracing::warn!(
            seq = a.stream_seq,
            "dead letter without a task id; deleting it"
        );
        let _ = stream.delete_message(a.stream_seq).await;
        return true;
    };
    let attempt: u32 = header(hdrs, headers::ATTEMPT)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let last_worker = ctx
        .core
        .fleet
        .task_worker(task_id.clone())
        .await
        .ok()
        .flatten();
    let pool = work
        .subject
        .strip_prefix(&format!("{}.work.", ctx.subjects.prefix()))
        .and_then(|rest| rest.split('.').next())
        .map(str::to_string);
    let result = failed_result(a, (&task_id, attempt), last_worker, pool);
    let Ok(body) = serde_json::to_vec(&result) else {
        // Not reachable: the result is plain data with string keys.
        return true;
    };
    let h = result_headers(hdrs, &task_id, attempt);
    let stored = match ctx
        .js
        .publish_with_headers(ctx.subjects.result(&task_id), h, Bytes::from(body))
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = stored {
        tracing::error!(task_id, error = %e, "dead-letter result not stored yet; the advisory is tried again");
        return false;
    }
    ctx.core.metrics.tasks_dead_lettered.inc();
    tracing::warn!(
        task_id,
        attempt,
        deliveries = a.deliveries,
        "task dead-lettered: failed after its last delivery"
    );
    if let Err(e) = stream.delete_message(a.stream_seq).await {
        tracing::warn!(task_id, error = %e, "dead-lettered work message not deleted");
    }
    true
}

/// The `failed` result of an exhausted work message: `dead_lettered`, naming the
/// deliveries, the consumer and the last worker seen on it.
fn failed_result(
    a: &MaxDeliver,
    (task_id, attempt): (&str, u32),
    last_worker: Option<String>,
    pool: Option<String>,
) -> TaskResult {
    let message = format!(
        "no worker finished the task: delivered {} times (the limit) on consumer {}; last seen on worker {}",
        a.deliveries,
        a.consumer,
        last_worker.as_deref().unwrap_or("unknown")
    );
    TaskResult {
        schema: fleet_worker::protocol::SCHEMA_VERSION,
        task_id: task_id.to_string(),
        attempt,
        status: ResultStatus::Failed,
        output: serde_json::Value::Null,
        error: Some(ErrorInfo {
            code: "dead_lettered".into(),
            message,
        }),
        usage: None,
        timings: Timings {
            finished_at: Some(now_rfc3339()),
            ..Default::default()
        },
        worker_id: last_worker,
        pool,
    }
}

/// The failed result's headers: the work message's trace context, baggage and reply
/// subject carried over, and an idempotency key of its own per attempt.
fn result_headers(hdrs: Option<&HeaderMap>, task_id: &str, attempt: u32) -> HeaderMap {
    let mut h = super::carried_headers(
        hdrs,
        &[
            headers::TRACEPARENT,
            headers::TRACESTATE,
            headers::BAGGAGE,
            headers::REPLY_TO,
            headers::REPLICA,
        ],
    );
    let _ = protocol::set_header(&mut h, headers::TASK_ID, task_id);
    let _ = protocol::set_header(&mut h, headers::ATTEMPT, &attempt.to_string());
    // Once per attempt, whichever replica (or retry) publishes it.
    let _ = protocol::set_header(
        &mut h,
        headers::NATS_MSG_ID,
        &format!("{task_id}:{attempt}:dead"),
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advisory_parses_and_its_subject_covers_every_work_consumer() {
        let a: MaxDeliver = serde_json::from_str(
            r#"{"type":"io.nats.jetstream.advisory.v1.max_deliver","id":"x","timestamp":"2026-12-01T00:00:00Z",
                "stream":"FLEET_WORK","consumer":"pool-code","stream_seq":42,"deliveries":10}"#,
        )
        .unwrap();
        assert_eq!((a.stream_seq, a.deliveries), (42, 10));
        assert_eq!(
            crate::broker::max_deliveries_subject("FLEET_WORK"),
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.FLEET_WORK.*"
        );
        let kept = crate::broker::advisories_stream_config(&fleet_worker::Subjects::default());
        assert_eq!(kept.name, "FLEET_ADVISORIES");
        assert_eq!(
            kept.subjects,
            ["$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.FLEET_WORK.*"]
        );
    }
}
