//! Bad input gets a clear error and changes nothing else.

use std::time::Duration;

use fleet_worker::{Producer, ResultStatus, Subjects, SubmitOptions, Task, TaskResult};
use futures::StreamExt;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_task_json_is_rejected_with_a_reason_terminated_and_counted() {
    let stack = Stack::start(TWO_POOLS).await;
    let (seen, worker) = watched_worker(&stack.client, "alpha", "a1", 4).await;
    let mut replies = stack.client.subscribe("_INBOX.bad").await.unwrap();

    let cases: &[(&str, &str, &str, &str)] = &[
        ("bad-json", "{not json", "bad_json", "does not parse"),
        (
            "no-description",
            r#"{"schema":1}"#,
            "invalid_task",
            "description: is required",
        ),
        (
            "typo-field",
            r#"{"schema":1,"description":"x","priorty":3}"#,
            "invalid_task",
            "priorty: unknown field (did you mean \"priority\"?)",
        ),
        (
            "every-problem",
            r#"{"schema":1,"descripton":"typo","priority":99}"#,
            "invalid_task",
            "descripton: unknown field (did you mean \"description\"?); description: is required; priority: 99 is out of range 0-9",
        ),
        (
            "bad-fields",
            r#"{"schema":1,"description":"x","priority":12,"max_cost_usd":-1}"#,
            "invalid_task",
            "priority",
        ),
        (
            "unknown-pool",
            r#"{"schema":1,"description":"x","pool":"nowhere"}"#,
            "unknown_pool",
            "nowhere",
        ),
        (
            "wrong-schema",
            r#"{"schema":7,"description":"x"}"#,
            "invalid_task",
            "schema",
        ),
    ];
    for (id, body, _, _) in cases {
        publish_raw(
            &stack.client,
            &[("Fleet-Task-Id", id), ("Fleet-Reply-To", "_INBOX.bad")],
            body,
        )
        .await;
    }
    // No id anywhere: the task is known by its intake sequence.
    let seq = publish_raw(&stack.client, &[], "[]").await;

    let producer = Producer::new(stack.client.clone(), Subjects::default());
    for (id, _, code, needle) in cases {
        // On the reply subject the producer asked for …
        let msg = tokio::time::timeout(WAIT, replies.next())
            .await
            .unwrap()
            .unwrap();
        let r: TaskResult = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(r.status, ResultStatus::Rejected);
        // … and durably on fleet.results.<id>.
        let stored = producer.await_result(id, WAIT).await.unwrap();
        assert_eq!(stored.status, ResultStatus::Rejected, "{id}");
        let err = stored.error.unwrap();
        assert_eq!(err.code, *code, "{id}: {}", err.message);
        assert!(
            err.message.contains(needle),
            "{id}: {:?} should mention {needle:?}",
            err.message
        );
        let rec = task_record(stack.commander.http(), id).await.unwrap();
        assert_eq!(rec["state"], "rejected");
        assert_eq!(rec["rejection"]["code"], *code);
    }
    // A task that fits the intake stream but not a work message (the commander adds its
    // headers and fields): rejected with why, not retried for good.
    let max = stack.client.server_info().max_payload;
    let big = format!(
        r#"{{"schema":1,"description":"x","input":"{}"}}"#,
        "y".repeat(max - 300)
    );
    publish_raw(
        &stack.client,
        &[
            ("Fleet-Task-Id", "too-big"),
            ("Fleet-Reply-To", "_INBOX.bad"),
        ],
        &big,
    )
    .await;
    let msg = tokio::time::timeout(WAIT, replies.next())
        .await
        .unwrap()
        .unwrap();
    let r: TaskResult = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(r.task_id, "too-big");
    let err = r.error.unwrap();
    assert_eq!(err.code, "task_too_large", "{}", err.message);
    assert!(err.message.contains(&max.to_string()), "{}", err.message);
    let rec = task_record(stack.commander.http(), "too-big")
        .await
        .unwrap();
    assert_eq!(rec["state"], "rejected");
    eventually(
        "the id-less task is recorded by sequence",
        WAIT,
        async || {
            task_record(stack.commander.http(), &format!("seq-{seq}"))
                .await
                .is_some_and(|r| r["state"] == "rejected")
        },
    )
    .await;

    // Counted by reason; terminated, not redelivered: the intake stream is empty.
    eventually("rejections counted", WAIT, async || {
        stack
            .metric("fleet_tasks_rejected_total{reason=\"bad_json\"}")
            .await
            == 2.0
    })
    .await;
    assert_eq!(
        stack
            .metric("fleet_tasks_rejected_total{reason=\"invalid_task\"}")
            .await,
        5.0
    );
    assert_eq!(
        stack
            .metric("fleet_tasks_rejected_total{reason=\"unknown_pool\"}")
            .await,
        1.0
    );
    let js = async_nats::jetstream::new(stack.client.clone());
    let mut intake = js.get_stream("FLEET_INTAKE").await.unwrap();
    assert_eq!(
        intake.info().await.unwrap().state.messages,
        0,
        "bad tasks are not left to be redelivered"
    );

    // Nothing else changed: no handler ran, and a good task still flows.
    assert!(seen.lock().unwrap().runs.is_empty());
    let receipt = producer
        .submit(&Task::new("a good one"), SubmitOptions::default())
        .await
        .unwrap();
    let r = producer.await_result(&receipt.task_id, WAIT).await.unwrap();
    assert_eq!(r.status, ResultStatus::Ok);
    assert_eq!(stack.metric("fleet_dispatch_errors_total").await, 0.0);
    assert_eq!(
        stack
            .metric("fleet_tasks_rejected_total{reason=\"task_too_large\"}")
            .await,
        1.0
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_traceparent_starts_a_new_trace_records_why_and_the_task_still_flows() {
    let stack = Stack::start(TWO_POOLS).await;
    let spans = collect_spans(&stack.client).await;
    let (seen, worker) = watched_worker(&stack.client, "alpha", "a1", 4).await;
    let bad = [
        (
            "tp-version",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        (
            "tp-zero-trace",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ),
        (
            "tp-zero-span",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ),
        (
            "tp-bad-hex",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ),
        ("tp-garbage", "not a traceparent"),
    ];
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    for (id, tp) in bad {
        let body =
            serde_json::json!({"schema": 1, "id": id, "description": "trace me"}).to_string();
        publish_raw(
            &stack.client,
            &[
                ("traceparent", tp),
                ("tracestate", "vendor=1"),
                ("baggage", "team=obs"),
            ],
            &body,
        )
        .await;
    }
    for (id, tp) in bad {
        let r = producer.await_result(id, WAIT).await.unwrap();
        assert_eq!(r.status, ResultStatus::Ok, "{id} still flows");
        let rec = task_record(stack.commander.http(), id).await.unwrap();
        let trace = &rec["trace"];
        let invalid = trace["invalid_traceparent"].as_str().unwrap();
        assert!(
            invalid.contains(tp),
            "{id}: the refused value is recorded: {invalid}"
        );
        let trace_id = trace["trace_id"].as_str().unwrap();
        assert_eq!(trace_id.len(), 32);
        assert_ne!(trace_id, "0".repeat(32));
        assert_ne!(
            trace_id, "4bf92f3577b34da6a3ce929d0e0e4736",
            "{id}: a new trace, not the refused one"
        );
        assert!(trace["parent_span_id"].is_null());
        let (worker_trace, worker_parent) = seen.lock().unwrap().spans[id].clone();
        assert_eq!(
            worker_trace, trace_id,
            "{id}: the worker continues the new trace"
        );
        assert_eq!(worker_parent.as_deref(), trace["dispatch_span_id"].as_str());
    }
    eventually(
        "dispatch spans record the refused traceparent",
        WAIT,
        async || {
            let s = spans.lock().unwrap();
            bad.iter().all(|(id, tp)| {
                s.iter().any(|sp| {
                    sp.service == "fleet-commander"
                        && sp.attrs.get("fleet.task.id").map(String::as_str) == Some(*id)
                        && sp
                            .attrs
                            .get("fleet.traceparent.invalid")
                            .is_some_and(|v| v.contains(tp))
                        && sp.parent_span_id.is_empty()
                })
            })
        },
    )
    .await;
    assert_eq!(
        stack.metric("fleet_traceparent_invalid_total").await,
        bad.len() as f64
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_submission_validates_takes_the_durable_path_and_continues_the_trace() {
    let stack = Stack::start(TWO_POOLS).await;
    let worker = recording_worker(
        &stack.client,
        "beta",
        "b1",
        4,
        Duration::ZERO,
        SeenLog::default(),
    )
    .await;
    let http = reqwest::Client::new();
    let url = stack.http("/v1/tasks");

    let resp = http.post(&url).body("{nope").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_json");

    let resp = http
        .post(&url)
        .body(r#"{"schema":1,"description":"","priority":11}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_task");
    let fields: Vec<_> = body["error"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["description", "priority"]);

    // Unknown, missing and out-of-range fields: all of them in one answer.
    let resp = http
        .post(&url)
        .body(r#"{"schema":1,"descripton":"typo","priority":99}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_task");
    let fields: Vec<_> = body["error"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["descripton", "description", "priority"]);

    // Within the HTTP body limit, but not within what NATS takes in one message: 413,
    // with why (a retry, which a 503 would ask for, can never succeed).
    let max = stack.client.server_info().max_payload;
    let big = format!(
        r#"{{"schema":1,"description":"x","input":"{}"}}"#,
        "y".repeat(max - 100)
    );
    let resp = http.post(&url).body(big).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_payload"), "{message}");

    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let task = r#"{"schema":1,"description":"review this","capabilities":["code"]}"#;
    let send = || {
        http.post(&url)
            .header("traceparent", tp)
            .header("baggage", "team=web")
            .header("Idempotency-Key", "http-1")
            .body(task)
            .send()
    };
    let resp = send().await.unwrap();
    assert_eq!(resp.status(), 202);
    let accepted: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(accepted["task_id"], "http-1");
    assert_eq!(accepted["traceparent"], tp);
    assert_eq!(accepted["duplicate"], false);
    let again: serde_json::Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(
        again["duplicate"], true,
        "the idempotency key de-duplicates"
    );

    let status_url = stack.http(accepted["status_url"].as_str().unwrap());
    eventually("the HTTP task completes", WAIT, async || {
        let rec: serde_json::Value = http
            .get(&status_url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        rec["state"] == "completed"
    })
    .await;
    let rec: serde_json::Value = http
        .get(&status_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rec["pool"], "beta");
    assert_eq!(rec["trace"]["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(rec["trace"]["parent_span_id"], "b7ad6b7169203331");
    // A retry that does not send the trace context again (a client whose first POST timed
    // out) is told the trace the task travels under: the first copy's, read from the
    // task's record now that the commander has taken it off the intake stream.
    let retry: serde_json::Value = http
        .post(&url)
        .header("Idempotency-Key", "http-1")
        .body(task)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(retry["duplicate"], true, "{retry}");
    assert_eq!(retry["traceparent"], tp, "{retry}");
    for (path, status) in [("/v1/tasks/nope", 404), ("/healthz", 200), ("/readyz", 200)] {
        let got = http.get(stack.http(path)).send().await.unwrap().status();
        assert_eq!(got, status, "GET {path}");
    }
    // OpenMetrics to a scraper that asks for it (Prometheus does), the classic text
    // format otherwise.
    let metrics = http
        .get(stack.http("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        metrics.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(metrics.text().await.unwrap().ends_with("# EOF\n"));
    let metrics = http.get(stack.http("/metrics")).send().await.unwrap();
    assert_eq!(
        metrics.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = metrics.text().await.unwrap();
    assert!(!text.contains("# EOF"));
    assert!(text.contains("# TYPE fleet_http_submissions_total counter"));
    // The task, its copy and the retry: each was accepted (two as copies).
    assert_eq!(stack.metric("fleet_http_submissions_total").await, 3.0);
    worker.shutdown().await;
}

/// A result the commander cannot read (a worker in another language that gets the shape
/// wrong, or garbage) is dropped and acked, counted, and the log says why, once for a
/// burst: JetStream would redeliver it forever otherwise, and a worker publishing garbage
/// as fast as it can must not fill the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_the_commander_cannot_read_are_dropped_counted_and_said_once() {
    let stack = Stack::start(TWO_POOLS).await;
    let (_seen, worker) = watched_worker(&stack.client, "alpha", "a1", 4).await;
    let js = async_nats::jetstream::new(stack.client.clone());
    for (subject, body) in [
        ("fleet.results.r1", r#"{"schema": 1, "task_id": "r1"}"#),
        ("fleet.results.r2", "not json"),
        (
            "fleet.results.r3",
            r#"{"schema": 1, "task_id": "a b", "status": "ok"}"#,
        ),
    ] {
        js.publish(subject, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    eventually("the three are counted", WAIT, async || {
        stack.metric("fleet_results_invalid_total").await == 3.0
    })
    .await;
    let lines: Vec<String> = stack
        .commander
        .log_text()
        .lines()
        .filter(|l| l.contains("result dropped"))
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 1, "one line for the burst: {lines:?}");
    assert!(
        lines[0].contains("WARN")
            && lines[0].contains("fleet.results.r1")
            && lines[0].contains("missing field `status`"),
        "{}",
        lines[0]
    );
    // Acked, not left for redelivery: the commander's results consumer has nothing
    // pending, and a real task still ends.
    let results = js.get_stream("FLEET_RESULTS").await.unwrap();
    let consumers: Vec<_> = results
        .consumer_names()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let receipt = producer
        .submit(&Task::new("still flows"), SubmitOptions::default())
        .await
        .unwrap();
    let r = producer.await_result(&receipt.task_id, WAIT).await.unwrap();
    assert_eq!(r.status, ResultStatus::Ok);
    for name in consumers {
        eventually("every result acked", WAIT, async || {
            let mut c: async_nats::jetstream::consumer::PullConsumer =
                results.get_consumer(&name).await.unwrap();
            let info = c.info().await.unwrap();
            info.num_ack_pending == 0 && info.num_pending == 0
        })
        .await;
    }
    assert_eq!(stack.metric("fleet_results_invalid_total").await, 3.0);
    worker.shutdown().await;
}
