//! The broker goes away: the commander says so (readiness, a gauge, one log line each
//! way) and takes work again when it is back.

use std::time::Duration;

use fleet_worker::{Producer, ResultStatus, Subjects, SubmitOptions, Task};
use serde_json::Value;

use crate::common::*;

async fn readyz(stack: &Stack) -> (u16, Value) {
    let r = reqwest::get(stack.http("/readyz")).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_tells_the_truth_through_a_nats_server_crash() {
    let mut stack = Stack::start(TWO_POOLS).await;
    assert_eq!(readyz(&stack).await.0, 200);
    assert_eq!(stack.metric("fleet_nats_connected").await, 1.0);

    stack.nats.kill9();
    let mut answer = Value::Null;
    eventually("not ready while NATS is gone", WAIT, async || {
        let (status, body) = readyz(&stack).await;
        answer = body;
        status == 503
    })
    .await;
    assert!(
        answer["down"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["component"] == "nats"),
        "{answer}"
    );
    assert_eq!(stack.metric("fleet_nats_connected").await, 0.0);
    assert!(
        stack
            .commander
            .wait_for_log("lost the NATS connection", Duration::from_secs(10))
    );

    stack
        .nats
        .restart()
        .expect("nats-server restarts on its port and store");
    eventually("ready again once NATS is back", WAIT, async || {
        readyz(&stack).await.0 == 200
    })
    .await;
    assert_eq!(stack.metric("fleet_nats_connected").await, 1.0);
    assert!(
        stack
            .commander
            .wait_for_log("NATS connection back", Duration::from_secs(10))
    );

    // And it takes work again.
    let seen = SeenLog::default();
    let worker = recording_worker(
        &stack.client,
        "alpha",
        "a1",
        4,
        Duration::ZERO,
        seen.clone(),
    )
    .await;
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let receipt = producer
        .submit(&Task::new("after the outage"), SubmitOptions::default())
        .await
        .unwrap();
    let r = producer.await_result(&receipt.task_id, WAIT).await.unwrap();
    assert_eq!(r.status, ResultStatus::Ok);
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nats_gone_exits_within_the_grace_period() {
    let mut stack =
        Stack::start(&format!("{TWO_POOLS}\n[intake]\nshutdown_grace_secs = 3\n")).await;
    // Work in hand when the broker dies: a task submitted, no worker to take it.
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    producer
        .submit(&Task::new("in flight"), SubmitOptions::default())
        .await
        .unwrap();
    stack.nats.kill9();
    eventually("not ready while NATS is gone", WAIT, async || {
        readyz(&stack).await.0 == 503
    })
    .await;
    let started = std::time::Instant::now();
    let code = stack.commander.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", stack.commander.log_text());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        stack.commander.logged("stopped"),
        "{}",
        stack.commander.log_text()
    );
}
