//! What a new user met when they tried the commander from README.md and docs/ alone: a
//! task the API accepted that it could not find, and a demo whose costs ignored routing.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_the_api_accepted_is_found_at_once() {
    let stack = Stack::start(TWO_POOLS).await;
    let http = reqwest::Client::new();
    // No worker: the tasks stay in flight, and each lookup races the intake loop.
    for i in 0..200 {
        let resp = http
            .post(stack.http("/v1/tasks"))
            .body(format!(
                r#"{{"schema":1,"id":"found-{i}","description":"find me"}}"#
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
        let rec = reqwest::get(stack.http(&format!("/v1/tasks/found-{i}")))
            .await
            .unwrap();
        assert_eq!(rec.status().as_u16(), 200, "found-{i} right after its 202");
        let rec: Value = rec.json().await.unwrap();
        assert!(
            ["received", "dispatched"].contains(&rec["state"].as_str().unwrap()),
            "{rec}"
        );
    }
    // The intake loop takes the received records over: every task is dispatched.
    eventually("every task dispatched", WAIT, async || {
        stack
            .metric("fleet_tasks_dispatched_total{pool=\"alpha\"}")
            .await
            >= 200.0
    })
    .await;
    assert_eq!(stack.metric("fleet_intake_duplicates_total").await, 0.0);
}

/// A producer that speaks HTTP only gets its result over HTTP: the JSON the worker (or
/// the commander, for a task that never ran) published, waited for with `wait_s`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_producer_reads_its_result_over_http() {
    let mut stack = Stack::start(TWO_POOLS).await;
    let accepted: Value = stack
        .post("/v1/tasks")
        .body(r#"{"schema":1,"id":"over-http","description":"summarise over http"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let result_url = accepted["result_url"].as_str().unwrap().to_string();
    assert_eq!(result_url, "/v1/tasks/over-http/result");
    // No worker yet: where the task is, and when to ask again.
    let early = stack.get(&result_url).send().await.unwrap();
    assert_eq!(early.status().as_u16(), 202);
    assert_eq!(early.headers()["retry-after"], "1");
    let early: Value = early.json().await.unwrap();
    assert!(
        ["received", "dispatched"].contains(&early["state"].as_str().unwrap()),
        "{early}"
    );
    // A long poll that a worker answers while it waits.
    let waiting = tokio::spawn(stack.get(&format!("{result_url}?wait_s=60")).send());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (seen, _worker) = watched_worker(&stack.client, "alpha", "http-w1", 1).await;
    let resp = waiting.await.unwrap().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let trace_id = accepted["traceparent"].as_str().unwrap()[3..35].to_string();
    let result_tp = resp.headers()["traceparent"].to_str().unwrap().to_string();
    assert_eq!(
        &result_tp[3..35],
        trace_id,
        "the result's trace is the task's"
    );
    let result: Value = resp.json().await.unwrap();
    assert_eq!(result["task_id"], "over-http");
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["output"]["echo"], "summarise over http");
    assert_eq!(result["worker_id"], "http-w1");
    assert_eq!(seen.lock().unwrap().runs_per_task()["over-http"], 1);
    // Asked again, at once: the same result.
    assert_eq!(stack.get_json(&result_url).await, result);

    // A task the commander refused: its rejection is its result.
    stack
        .post("/v1/tasks")
        .body(r#"{"schema":1,"id":"nowhere","description":"x","pool":"omega"}"#)
        .send()
        .await
        .unwrap();
    let refused = stack
        .get("/v1/tasks/nowhere/result?wait_s=60")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 200);
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(refused["status"], "rejected", "{refused}");
    assert_eq!(refused["error"]["code"], "unknown_pool", "{refused}");
    // Recorded by the intake loop and by the results loop, which reads the published
    // rejection: one change in its history, not two.
    let mut rec = Value::Null;
    eventually("the rejection recorded", WAIT, async || {
        rec = task_record(stack.commander.http(), "nowhere")
            .await
            .unwrap_or_default();
        rec["rejection"]["code"] == "unknown_pool" && rec["outcome"]["status"] == "rejected"
    })
    .await;
    let changes: Vec<&str> = rec["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["state"].as_str())
        .collect();
    assert_eq!(changes, ["rejected"], "{rec}");

    // Unknown to the commander.
    let unknown = stack
        .get("/v1/tasks/never-sent/result")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);

    // A finished task whose result left the results stream (kept 7 days): 410, pointing
    // at the record, which keeps the outcome.
    let js = async_nats::jetstream::new(stack.client.clone());
    js.get_stream("FLEET_RESULTS")
        .await
        .unwrap()
        .purge()
        .filter("fleet.results.over-http")
        .await
        .unwrap();
    let gone = stack.get(&result_url).send().await.unwrap();
    assert_eq!(gone.status().as_u16(), 410);
    let gone: Value = gone.json().await.unwrap();
    assert_eq!(gone["error"]["code"], "gone", "{gone}");
    let rec = task_record(stack.commander.http(), "over-http")
        .await
        .unwrap();
    assert_eq!(rec["outcome"]["status"], "ok", "{rec}");

    // With the broker gone, whether there is a result is unknown: 503, saying why, at
    // once and after a wait alike (not after the NATS client's request timeout).
    stack.nats.kill9();
    for url in [
        "/v1/tasks/nowhere/result",
        "/v1/tasks/nowhere/result?wait_s=1",
    ] {
        let mut body = Value::Null;
        eventually("the commander sees the broker gone", WAIT, async || {
            let r = stack.get(url).send().await.unwrap();
            body = r.json().await.unwrap_or_default();
            body["error"]["code"] == "unavailable"
        })
        .await;
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("not connected"), "{url}: {message}");
    }
    // A submission meanwhile is refused without being sent: once the broker is back,
    // it has not been stored (a publish made while disconnected waits in the client's
    // buffer, and would have been stored on the reconnect after its 503).
    let down = stack
        .post("/v1/tasks")
        .body(r#"{"schema":1,"id":"while-down","description":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(down.status().as_u16(), 503);
    let down: Value = down.json().await.unwrap();
    let message = down["error"]["message"].as_str().unwrap();
    assert!(message.contains("nothing was sent"), "{message}");
    stack.nats.restart().unwrap();
    eventually("the commander is back", WAIT, async || {
        stack
            .post("/v1/tasks")
            .body(r#"{"schema":1,"id":"after-restart","description":"x"}"#)
            .send()
            .await
            .unwrap()
            .status()
            == 202
    })
    .await;
    let after = stack
        .get("/v1/tasks/after-restart/result?wait_s=60")
        .send()
        .await
        .unwrap();
    assert_eq!(after.status().as_u16(), 200);
    assert_eq!(
        stack
            .get("/v1/tasks/while-down")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
}

/// Kills the child when dropped, so a failing assertion cannot leave it running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_worker_reports_the_model_the_commander_chose() {
    let stack = Stack::start("[pools.gamma]\n").await;
    let bin = fleet_testkit::sibling_bin("examples/worker");
    let _worker = KillOnDrop(
        std::process::Command::new(&bin)
            .args(["--pool", "gamma", "--id", "demo-1", "--work-ms", "20"])
            .args(["--model", "claude-sonnet-4-5"])
            .args(["--nats-url", stack.nats.url()])
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} ({e})", bin.display())),
    );
    eventually("the worker heartbeats", WAIT, async || {
        reqwest::get(stack.http("/v1/workers/demo-1"))
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;
    let http = reqwest::Client::new();
    for i in 0..3 {
        let resp = http
            .post(stack.http("/v1/tasks"))
            // The producer asks for gpt-4o; the worker was started with claude-sonnet-4-5.
            .body(format!(
                r#"{{"schema":1,"id":"routed-{i}","description":"routed to gpt-4o","pool":"gamma","model":"gpt-4o"}}"#
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
    }
    eventually("the three tasks completed", WAIT, async || {
        let mut done = 0;
        for i in 0..3 {
            if task_record(stack.commander.http(), &format!("routed-{i}"))
                .await
                .is_some_and(|r| r["state"] == "completed")
            {
                done += 1;
            }
        }
        done == 3
    })
    .await;
    let rec = task_record(stack.commander.http(), "routed-0")
        .await
        .unwrap();
    assert_eq!(rec["model"], "gpt-4o", "{rec}");
    // The spend is on the model routing chose, not the one on the worker's command line.
    let mut costs = Value::Null;
    eventually("gpt-4o spend shows", WAIT, async || {
        costs = reqwest::get(stack.http("/v1/costs?by=model"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        costs["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["group"]["model"] == "gpt-4o" && r["calls"].as_u64().unwrap_or(0) >= 3)
    })
    .await;
    let models: Vec<&str> = costs["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["group"]["model"].as_str())
        .collect();
    assert!(!models.contains(&"claude-sonnet-4-5"), "{costs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_no_worker_can_finish_is_dead_lettered_not_stranded() {
    use fleet_worker::{Producer, ResultStatus, Subjects, SubmitOptions, Task};

    let stack = Stack::start("[pools.gamma]\n").await;
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut inbox = producer.result_inbox().await.unwrap();
    let mut task = Task::new("nobody can do this");
    task.id = Some("poison".into());
    task.pool = Some("gamma".into());
    producer
        .submit(
            &task,
            SubmitOptions {
                reply_to: Some(inbox.subject().to_string()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let js = async_nats::jetstream::new(stack.client.clone());
    let (deliveries, naker) = nak_every_delivery(&stack.client, "gamma").await;
    // The producer hears that it failed, on its reply subject and in the results stream.
    let r = tokio::time::timeout(WAIT, inbox.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.task_id, "poison");
    assert_eq!(r.status, ResultStatus::Failed);
    let err = r.error.unwrap();
    assert_eq!(err.code, "dead_lettered");
    assert!(
        err.message.contains("delivered 10 times"),
        "{}",
        err.message
    );
    assert_eq!(r.attempt, 1);
    let stored = producer.await_result("poison", WAIT).await.unwrap();
    assert_eq!(stored.error.unwrap().code, "dead_lettered");
    let rec = task_record(stack.commander.http(), "poison").await.unwrap();
    assert_eq!(rec["state"], "failed", "{rec}");
    assert_eq!(rec["outcome"]["error"]["code"], "dead_lettered", "{rec}");
    assert_eq!(stack.metric("fleet_tasks_dead_lettered_total").await, 1.0);
    naker.abort();
    assert_eq!(
        deliveries.load(std::sync::atomic::Ordering::SeqCst),
        10,
        "never delivered past max_deliver"
    );
    // The exhausted work message is gone, not left in the stream.
    eventually("the work message is deleted", WAIT, async || {
        js.get_stream("FLEET_WORK")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
            == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_targeted_at_a_worker_that_never_binds_goes_back_to_its_pool() {
    use fleet_worker::{Producer, ResultStatus, Subjects, SubmitOptions, Task};

    let stack = Stack::start(
        "[routing]\ntarget_bind_timeout_ms = 1500\n[pools.lc]\ncapabilities = [\"long-context\"]\n",
    )
    .await;
    // A worker that heartbeats with context to spare but never binds its own consumer.
    let client = stack.client.clone();
    let ghost = tokio::spawn(async move {
        loop {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Fleet-Kind", "heartbeat");
            let now = fleet_worker::message::now_rfc3339();
            let hb = serde_json::json!({"schema": 1, "worker_id": "ghost", "pool": "lc",
                "state": "idle", "max_in_flight": 4, "capabilities": ["long-context"],
                "started_at": now, "sent_at": now});
            let _ = client
                .publish_with_headers("fleet.telemetry.lc.ghost", h, hb.to_string().into())
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    eventually("the ghost is on the fleet view", WAIT, async || {
        let pools: Value = reqwest::get(stack.http("/v1/pools"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        pools["pools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "lc" && p["workers"].as_u64().unwrap_or(0) >= 1)
    })
    .await;
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut inbox = producer.result_inbox().await.unwrap();
    let mut task = Task::new("read this whole book");
    task.id = Some("long-1".into());
    task.capabilities = vec!["long-context".into()];
    task.pool = Some("lc".into());
    producer
        .submit(
            &task,
            SubmitOptions {
                reply_to: Some(inbox.subject().to_string()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut decision = Value::Null;
    eventually("the task is targeted at the ghost", WAIT, async || {
        decision = reqwest::get(stack.http("/v1/decisions/long-1"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or(Value::Null);
        decision["worker"] == "ghost"
    })
    .await;
    // A real worker joins the pool; the ghost never pulls.
    let (seen, real) = watched_worker(&stack.client, "lc", "real-1", 4).await;
    let r = tokio::time::timeout(WAIT, inbox.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.task_id, "long-1");
    assert_eq!(r.status, ResultStatus::Ok);
    assert_eq!(r.attempt, 2, "the re-dispatch is the next attempt");
    assert_eq!(r.worker_id.as_deref(), Some("real-1"));
    let rec = task_record(stack.commander.http(), "long-1").await.unwrap();
    assert_eq!(rec["state"], "completed", "{rec}");
    let dispatched = rec["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["state"] == "dispatched")
        .count();
    assert_eq!(dispatched, 2, "both dispatches in the history: {rec}");
    assert!(
        rec["route_reason"]
            .as_str()
            .unwrap()
            .contains("ghost did not bind its consumer"),
        "{rec}"
    );
    let d: Value = reqwest::get(stack.http("/v1/decisions/long-1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(d["rule"], "retarget", "{d}");
    assert_eq!(stack.metric("fleet_tasks_retargeted_total").await, 1.0);
    assert_eq!(seen.lock().unwrap().runs.len(), 1, "ran once");
    ghost.abort();
    real.shutdown().await;
}
