//! The worker against a real nats-server: redelivery dedup, graceful drain, handler panics.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code: a failed step is a failed test"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use fleet_testkit::NatsServer;
use fleet_worker::message::Timings;
use fleet_worker::protocol::pool_consumer_name;
use fleet_worker::{
    Producer, ResultStatus, Subjects, Task, TaskOutput, TaskResult, Worker, WorkerConfig,
};
use futures::StreamExt;

const POOL: &str = "delta";

async fn setup(ack_wait: Duration) -> (NatsServer, async_nats::Client, jetstream::Context) {
    let nats = NatsServer::start().expect("nats-server");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let s = Subjects::default();
    js.get_or_create_stream(s.work_stream_config())
        .await
        .unwrap();
    js.get_or_create_stream(s.results_stream_config())
        .await
        .unwrap();
    let work = js.get_stream(s.work_stream()).await.unwrap();
    work.get_or_create_consumer(
        &pool_consumer_name(POOL),
        s.pool_consumer_config(POOL, ack_wait),
    )
    .await
    .unwrap();
    (nats, client, js)
}

async fn dispatch(js: &jetstream::Context, id: &str) {
    let mut task = Task::new(format!("work {id}"));
    task.id = Some(id.to_string());
    let mut h = HeaderMap::new();
    h.insert("Fleet-Task-Id", id);
    h.insert("Fleet-Attempt", "1");
    js.publish_with_headers(
        Subjects::default().work(POOL),
        h,
        serde_json::to_vec(&task).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn config(ack_wait: Duration, max_in_flight: usize) -> WorkerConfig {
    let mut c = WorkerConfig::new(POOL, "w1");
    c.ack_wait = ack_wait;
    c.max_in_flight = max_in_flight;
    c.fetch_expires = Duration::from_millis(500);
    c
}

#[tokio::test]
async fn a_redelivered_task_whose_result_exists_is_acked_without_running_again() {
    let ack_wait = Duration::from_secs(1);
    let (_nats, client, js) = setup(ack_wait).await;
    dispatch(&js, "dup-1").await;

    // A worker takes the task, publishes its result, and dies before acking.
    let work = js
        .get_stream(Subjects::default().work_stream())
        .await
        .unwrap();
    let consumer: jetstream::consumer::PullConsumer =
        work.get_consumer(&pool_consumer_name(POOL)).await.unwrap();
    let mut first = consumer.fetch().max_messages(1).messages().await.unwrap();
    let taken = first.next().await.unwrap().unwrap();
    assert_eq!(taken.info().unwrap().delivered, 1);
    let result = TaskResult {
        schema: 1,
        task_id: "dup-1".into(),
        attempt: 1,
        status: ResultStatus::Ok,
        output: serde_json::json!("done by the worker that died"),
        error: None,
        usage: None,
        timings: Timings::default(),
        worker_id: Some("dead".into()),
        pool: Some(POOL.into()),
    };
    let mut h = HeaderMap::new();
    h.insert("Fleet-Attempt", "1");
    js.publish_with_headers(
        "fleet.results.dup-1",
        h,
        serde_json::to_vec(&result).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    drop(taken);

    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let worker = Worker::start(client.clone(), config(ack_wait, 2), move |_ctx| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Ok(TaskOutput::default()) }
    })
    .await
    .unwrap();
    let stats = worker.stats_arc();
    wait_until("the redelivery is recognised", || {
        stats.skipped_duplicates.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the handler did not run again"
    );

    // A task without a result does run.
    dispatch(&js, "fresh-1").await;
    wait_until("the fresh task runs", || {
        stats.completed.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    worker.shutdown().await;
    let mut consumer = consumer;
    let info = consumer.info().await.unwrap();
    assert_eq!(
        (info.num_pending, info.num_ack_pending as u64),
        (0, 0),
        "both messages are acked"
    );
}

#[tokio::test]
async fn drain_finishes_what_is_in_flight_and_leaves_the_rest_queued() {
    let ack_wait = Duration::from_secs(30);
    let (_nats, client, js) = setup(ack_wait).await;
    for i in 0..6 {
        dispatch(&js, &format!("drain-{i}")).await;
    }
    let started = Arc::new(AtomicU32::new(0));
    let s = started.clone();
    let worker = Worker::start(client.clone(), config(ack_wait, 2), move |_ctx| {
        s.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok(TaskOutput::default())
        }
    })
    .await
    .unwrap();
    wait_until("two tasks in flight", || {
        started.load(Ordering::SeqCst) == 2
    })
    .await;
    let stats = worker.shutdown().await;
    assert_eq!(
        stats.completed.load(Ordering::SeqCst),
        2,
        "in-flight tasks finished before shutdown returned"
    );
    assert_eq!(
        started.load(Ordering::SeqCst),
        2,
        "nothing new was started while draining"
    );
    let work = js
        .get_stream(Subjects::default().work_stream())
        .await
        .unwrap();
    let mut consumer: jetstream::consumer::PullConsumer =
        work.get_consumer(&pool_consumer_name(POOL)).await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(
        info.num_pending + info.num_ack_pending as u64,
        4,
        "the other four wait for the next worker"
    );
    // Producers read the two results.
    let producer = Producer::new(client, Subjects::default());
    let r = producer
        .await_result("drain-0", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status, ResultStatus::Ok);
}

#[tokio::test]
async fn a_panicking_handler_yields_a_failed_result_and_the_worker_carries_on() {
    let ack_wait = Duration::from_secs(30);
    let (_nats, client, js) = setup(ack_wait).await;
    let worker = Worker::start(client.clone(), config(ack_wait, 1), move |ctx| async move {
        if ctx.task_id == "boom" {
            panic!("handler bug");
        }
        Ok(TaskOutput {
            output: serde_json::json!("fine"),
            usage: None,
        })
    })
    .await
    .unwrap();
    dispatch(&js, "boom").await;
    dispatch(&js, "after").await;
    let producer = Producer::new(client, Subjects::default());
    let r = producer
        .await_result("boom", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status, ResultStatus::Failed);
    assert_eq!(r.error.unwrap().code, "handler_panicked");
    let r = producer
        .await_result("after", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status, ResultStatus::Ok);
    worker.shutdown().await;
}

/// A submit whose PubAck never comes (the broker died) is sent again, the same message,
/// until the broker is back: the task is stored once, under its own id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_without_an_ack_is_retried_and_stored_once() {
    let (mut nats, client, js) = setup(Duration::from_secs(30)).await;
    let s = Subjects::default();
    js.get_or_create_stream(s.intake_stream_config())
        .await
        .unwrap();
    nats.kill9();
    let producer = Producer::new(client.clone(), Subjects::default());
    let mut task = Task::new("submitted through an outage");
    task.id = Some("retry-1".into());
    let submit = tokio::spawn(async move { producer.submit(&task, Default::default()).await });
    // Longer than JetStream's 5 s wait for a PubAck: the first try fails for sure.
    tokio::time::sleep(Duration::from_secs(7)).await;
    nats.restart().expect("nats-server restarts");
    let receipt = tokio::time::timeout(Duration::from_secs(60), submit)
        .await
        .expect("the submit finishes once the broker is back")
        .unwrap()
        .expect("accepted");
    assert_eq!(receipt.task_id, "retry-1");
    let mut intake = js.get_stream(s.intake_stream()).await.unwrap();
    assert_eq!(
        intake.info().await.unwrap().state.messages,
        1,
        "stored once"
    );
}
