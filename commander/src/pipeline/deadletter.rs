//! Tasks no worker could finish. A work message delivered `max_deliver` times (10) without
//! an ack is never delivered again: JetStream says so with a max-deliveries advisory and
//! leaves the message in the work-queue stream. Without this loop such a task would stay
//! `dispatched` forever. Here it becomes a `failed` result (`dead_lettered`, naming the
//! attempt, the deliveries and the last worker telemetry saw it on), published to the
//! results stream like any worker's result: the results loop then records it, settles
//! the budget reservation and tells the producer on its reply subject and on
//! `<prefix>.results.<id>`. The work message is deleted after the result is stored.
//!
//! Advisories are core NATS: one published while no commander listens is missed, and its
//! task stays `dispatched` (the window is documented in docs/protocol.md §7).

use std::sync::Arc;

use async_nats::HeaderMap;
use bytes::Bytes;
use fleet_worker::message::{ErrorInfo, ResultStatus, TaskResult, Timings, now_rfc3339};
use fleet_worker::protocol::{self, header, headers};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::watch;

use super::Ctx;

/// `io.nats.jetstream.advisory.v1.max_deliver`, the fields used.
#[derive(Debug, Deserialize)]
struct MaxDeliver {
    stream_seq: u64,
    deliveries: u64,
    #[serde(default)]
    consumer: String,
}

/// The advisory subject for every consumer of the work stream.
fn advisory_subject(work_stream: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{work_stream}.*")
}

/// Turns each exhausted work message into a failed result, until `stop`.
pub async fn run(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let subject = advisory_subject(&ctx.subjects.work_stream());
    // One replica handles each advisory.
    let mut sub = match ctx
        .client
        .queue_subscribe(subject.clone(), "commander".into())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, subject, "cannot follow max-deliveries advisories");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return },
            _ = stop.changed() => return,
        };
        match serde_json::from_slice::<MaxDeliver>(&msg.payload) {
            Ok(a) => dead_letter(&ctx, &a).await,
            Err(e) => tracing::warn!(error = %e, "max-deliveries advisory does not parse"),
        }
    }
}

async fn dead_letter(ctx: &Ctx, a: &MaxDeliver) {
    let stream = match ctx.js.get_stream(ctx.subjects.work_stream()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, seq = a.stream_seq, "dead letter: work stream not reachable");
            return;
        }
    };
    let work = match stream.get_raw_message(a.stream_seq).await {
        Ok(m) => m,
        Err(e) => {
            // Acked (or deleted) after all: nothing is stranded.
            tracing::debug!(error = %e, seq = a.stream_seq, "dead letter: work message already gone");
            return;
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
        return;
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
    let message = format!(
        "no worker finished the task: delivered {} times (the limit) on consumer {}; last seen on worker {}",
        a.deliveries,
        a.consumer,
        last_worker.as_deref().unwrap_or("unknown")
    );
    let result = TaskResult {
        schema: fleet_worker::protocol::SCHEMA_VERSION,
        task_id: task_id.clone(),
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
    };
    let Ok(body) = serde_json::to_vec(&result) else {
        return;
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
        tracing::error!(task_id, error = %e, "dead-letter result not stored; the task stays dispatched");
        return;
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
}

/// The failed result's headers: the work message's trace context, baggage and reply
/// subject carried over, and an idempotency key of its own per attempt.
fn result_headers(hdrs: Option<&HeaderMap>, task_id: &str, attempt: u32) -> HeaderMap {
    let mut h = HeaderMap::new();
    for name in [
        headers::TRACEPARENT,
        headers::TRACESTATE,
        headers::BAGGAGE,
        headers::REPLY_TO,
    ] {
        if let Some(v) = header(hdrs, name) {
            let _ = protocol::set_header(&mut h, name, v);
        }
    }
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
            advisory_subject("FLEET_WORK"),
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.FLEET_WORK.*"
        );
    }
}
