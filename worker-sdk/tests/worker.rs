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
use fleet_worker::control::{ControlReply, Mode};
use fleet_worker::message::Timings;
use fleet_worker::message::{Heartbeat, WorkerState};
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
    dispatch_task(js, id, Task::new(format!("work {id}"))).await;
}

async fn dispatch_task(js: &jetstream::Context, id: &str, mut task: Task) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_while_a_handler_s_telemetry_outlives_it() {
    let ack_wait = Duration::from_secs(30);
    let (_nats, client, js) = setup(ack_wait).await;
    let mut spans = client
        .subscribe(Subjects::default().telemetry(POOL, "w1"))
        .await
        .unwrap();
    dispatch(&js, "keeps-telemetry").await;
    let done = Arc::new(AtomicU32::new(0));
    let d = done.clone();
    let worker = Worker::start(client.clone(), config(ack_wait, 1), move |ctx| {
        // A background task that keeps the handler's recorder (and so the exporter) for
        // good, as a handler that spawns a poller or a cache refresher would.
        let kept = ctx.telemetry.clone();
        tokio::spawn(async move {
            let _kept = kept;
            std::future::pending::<()>().await;
        });
        d.fetch_add(1, Ordering::SeqCst);
        async { Ok(TaskOutput::default()) }
    })
    .await
    .unwrap();
    wait_until("the task ran", || done.load(Ordering::SeqCst) == 1).await;
    let stats = tokio::time::timeout(Duration::from_secs(30), worker.shutdown())
        .await
        .expect("shutdown returns though a clone of the exporter is still held");
    assert_eq!(stats.completed.load(Ordering::SeqCst), 1);
    let first = tokio::time::timeout(Duration::from_secs(5), spans.next())
        .await
        .expect("the task's spans were published before shutdown returned");
    assert!(first.is_some());
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

/// An output larger than the server's `max_payload` can never be stored: the worker
/// publishes a `failed` result that says so (keeping the usage the run cost), at once,
/// instead of retrying a message the server refuses until the task is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_too_large_for_the_server_is_a_failed_result_that_says_so() {
    let ack_wait = Duration::from_secs(30);
    let (_nats, client, js) = setup(ack_wait).await;
    let max = client.server_info().max_payload;
    let runs = Arc::new(AtomicU32::new(0));
    let seen = runs.clone();
    let worker = Worker::start(client.clone(), config(ack_wait, 1), move |ctx| {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            let size = if ctx.task_id == "huge" { max + 1 } else { 10 };
            Ok(TaskOutput {
                output: serde_json::json!("x".repeat(size)),
                usage: Some(fleet_worker::message::Usage {
                    model: Some("gpt-4o".into()),
                    input_tokens: 1000,
                    output_tokens: 400_000,
                    cost_usd: Some(4.2),
                }),
            })
        }
    })
    .await
    .unwrap();
    dispatch(&js, "huge").await;
    dispatch(&js, "small").await;
    let producer = Producer::new(client, Subjects::default());
    let r = producer
        .await_result("huge", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status, ResultStatus::Failed, "{r:?}");
    let e = r.error.as_ref().unwrap();
    assert_eq!(e.code, "result_too_large", "{r:?}");
    assert!(e.message.contains(&max.to_string()), "{r:?}");
    assert_eq!(r.output, serde_json::Value::Null);
    assert_eq!(
        r.usage.as_ref().and_then(|u| u.cost_usd),
        Some(4.2),
        "{r:?}"
    );
    let r = producer
        .await_result("small", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status, ResultStatus::Ok);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each ran once");
    // A producer is told at once, not after its retry period: no retry can help.
    let mut task = Task::new("summarise this");
    task.input = serde_json::json!("z".repeat(max));
    match producer.submit(&task, Default::default()).await {
        Err(fleet_worker::ProducerError::TooLarge { size, max: m }) => {
            assert!(size > max && m == max, "{size} {m}");
        }
        other => panic!("{other:?}"),
    }
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

/// A task submitted again under the same idempotency key is a copy JetStream drops; the
/// receipt names the trace the task travels under, the first copy's, not the one this
/// submission would have started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_s_receipt_names_the_first_copy_s_trace() {
    let (_nats, client, js) = setup(Duration::from_secs(30)).await;
    let s = Subjects::default();
    js.get_or_create_stream(s.intake_stream_config())
        .await
        .unwrap();
    let producer = Producer::new(client, Subjects::default());
    let task = Task::new("submitted twice");
    let opts = || fleet_worker::SubmitOptions {
        idempotency_key: Some("twice-1".into()),
        ..Default::default()
    };
    let first = producer.submit(&task, opts()).await.unwrap();
    let copy = producer.submit(&task, opts()).await.unwrap();
    assert!(!first.duplicate);
    assert!(copy.duplicate);
    assert_eq!(copy.stream_sequence, first.stream_sequence);
    assert_eq!(
        copy.traceparent.to_header(),
        first.traceparent.to_header(),
        "the copy started no trace of its own"
    );
}

/// Sends a control request and reads the worker's reply.
async fn control(client: &async_nats::Client, body: serde_json::Value) -> ControlReply {
    let reply = client
        .request(
            Subjects::default().control("w1"),
            serde_json::to_vec(&body).unwrap().into(),
        )
        .await
        .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

/// Heartbeats of worker w1, newest last.
async fn heartbeat_states(client: &async_nats::Client) -> Arc<std::sync::Mutex<Vec<WorkerState>>> {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut sub = client
        .subscribe(Subjects::default().telemetry(POOL, "w1"))
        .await
        .unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Ok(hb) = serde_json::from_slice::<Heartbeat>(&m.payload) {
                s.lock().unwrap().push(hb.state);
            }
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_drain_and_unknown_commands_over_the_control_subject() {
    let ack_wait = Duration::from_secs(30);
    let (_nats, client, js) = setup(ack_wait).await;
    let states = heartbeat_states(&client).await;
    let started = Arc::new(AtomicU32::new(0));
    let s = started.clone();
    let worker = Worker::start(client.clone(), config(ack_wait, 2), move |_ctx| {
        s.fetch_add(1, Ordering::SeqCst);
        async { Ok(TaskOutput::default()) }
    })
    .await
    .unwrap();
    dispatch(&js, "before").await;
    wait_until("the first task ran", || started.load(Ordering::SeqCst) == 1).await;

    let r = control(
        &client,
        serde_json::json!({"schema": 1, "command": "pause", "id": "i-1", "reason": "test"}),
    )
    .await;
    assert!(r.ok, "{r:?}");
    assert_eq!((r.mode, r.id.as_deref()), (Mode::Paused, Some("i-1")));
    wait_until("the heartbeat says paused", || {
        states.lock().unwrap().last() == Some(&WorkerState::Paused)
    })
    .await;
    for i in 0..3 {
        dispatch(&js, &format!("while-paused-{i}")).await;
    }
    // A paused worker leaves the tasks queued: a second worker of the pool takes them.
    let mut other = config(ack_wait, 4);
    other.worker_id = "w2".into();
    let taken = Arc::new(AtomicU32::new(0));
    let t = taken.clone();
    let w2 = Worker::start(client.clone(), other, move |_ctx| {
        t.fetch_add(1, Ordering::SeqCst);
        async { Ok(TaskOutput::default()) }
    })
    .await
    .unwrap();
    wait_until("the other worker ran the three", || {
        taken.load(Ordering::SeqCst) == 3
    })
    .await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "the paused worker started nothing"
    );
    w2.shutdown().await;

    // Unknown and malformed commands change nothing and say why.
    let r = control(
        &client,
        serde_json::json!({"schema": 1, "command": "self-destruct"}),
    )
    .await;
    assert!(!r.ok);
    assert_eq!(r.error.as_ref().unwrap().code, "unknown_command");
    assert_eq!(r.mode, Mode::Paused);
    let r = control(
        &client,
        serde_json::json!({"schema": 1, "command": "throttle", "tasks_per_s": -1}),
    )
    .await;
    assert_eq!(r.error.as_ref().unwrap().code, "bad_request");
    assert_eq!(r.tasks_per_s, None);

    let r = control(
        &client,
        serde_json::json!({"schema": 1, "command": "resume"}),
    )
    .await;
    assert_eq!(r.mode, Mode::Running);
    dispatch(&js, "after-resume").await;
    wait_until("the resumed worker runs again", || {
        started.load(Ordering::SeqCst) == 2
    })
    .await;

    let r = control(
        &client,
        serde_json::json!({"schema": 1, "command": "drain"}),
    )
    .await;
    assert_eq!(r.mode, Mode::Draining);
    wait_until("the heartbeat says draining", || {
        states.lock().unwrap().last() == Some(&WorkerState::Draining)
    })
    .await;
    dispatch(&js, "after-drain").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        2,
        "a drained worker starts nothing"
    );
    control(
        &client,
        serde_json::json!({"schema": 1, "command": "resume"}),
    )
    .await;
    wait_until("resumed after the drain", || {
        started.load(Ordering::SeqCst) == 3
    })
    .await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_aborts_the_handler_and_the_result_says_cancelled() {
    let ack_wait = Duration::from_secs(30);
    let (_nats, client, js) = setup(ack_wait).await;
    let dropped = Arc::new(AtomicU32::new(0));
    let d = dropped.clone();
    struct OnDrop(Arc<AtomicU32>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let running = Arc::new(AtomicU32::new(0));
    let r2 = running.clone();
    let worker = Worker::start(client.clone(), config(ack_wait, 2), move |_ctx| {
        let guard = OnDrop(d.clone());
        r2.fetch_add(1, Ordering::SeqCst);
        async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(TaskOutput::default())
        }
    })
    .await
    .unwrap();
    dispatch(&js, "forever").await;
    wait_until("the handler runs", || running.load(Ordering::SeqCst) == 1).await;
    let r = control(
        &client,
        serde_json::json!({"schema": 1, "command": "cancel", "task_id": "nope"}),
    )
    .await;
    assert_eq!(r.error.unwrap().code, "not_running");
    let r = control(&client, serde_json::json!({"schema": 1, "command": "cancel", "task_id": "forever", "reason": "stuck for 3 h"})).await;
    assert!(r.ok, "{r:?}");
    let producer = Producer::new(client, Subjects::default());
    let result = producer
        .await_result("forever", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(result.status, ResultStatus::Cancelled);
    let err = result.error.unwrap();
    assert_eq!(
        (err.code.as_str(), err.message.as_str()),
        ("cancelled", "stuck for 3 h")
    );
    wait_until("the handler's future was dropped", || {
        dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_worker_spaces_its_starts() {
    let ack_wait = Duration::from_secs(30);
    let (_nats, client, js) = setup(ack_wait).await;
    let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = starts.clone();
    let worker = Worker::start(client.clone(), config(ack_wait, 8), move |_ctx| {
        s.lock().unwrap().push(Instant::now());
        async { Ok(TaskOutput::default()) }
    })
    .await
    .unwrap();
    let r = control(
        &client,
        serde_json::json!({"schema": 1, "command": "throttle", "tasks_per_s": 5.0}),
    )
    .await;
    assert_eq!(r.tasks_per_s, Some(5.0));
    for i in 0..5 {
        dispatch(&js, &format!("paced-{i}")).await;
    }
    wait_until("all five ran", || starts.lock().unwrap().len() == 5).await;
    let starts = starts.lock().unwrap().clone();
    for pair in starts.windows(2) {
        // 200 ms apart at 5/s; a few ms of timer slack allowed, never a burst.
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(180),
            "{:?}",
            pair[1] - pair[0]
        );
    }
    let r = control(
        &client,
        serde_json::json!({"schema": 1, "command": "unthrottle"}),
    )
    .await;
    assert_eq!(r.tasks_per_s, None);
    worker.shutdown().await;
}

/// A deadline is an instant whatever offset it is written in: one that passed half an hour
/// ago, written at +01:00 (it reads "half an hour from now" if the offset is dropped) or at
/// -05:00, gets a cancelled result without running; one an hour away, at +14:00, runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_with_utc_offsets_are_read_as_the_instants_they_name() {
    let ack_wait = Duration::from_secs(30);
    let (_nats, client, js) = setup(ack_wait).await;
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let worker = Worker::start(client.clone(), config(ack_wait, 4), move |_ctx| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Ok(TaskOutput::default()) }
    })
    .await
    .unwrap();
    // `at` written in the local time of `offset_s` east of UTC.
    let local = |at: std::time::SystemTime, offset_s: i64, offset: &str| {
        let shifted = if offset_s >= 0 {
            at + Duration::from_secs(offset_s.unsigned_abs())
        } else {
            at - Duration::from_secs(offset_s.unsigned_abs())
        };
        let utc = humantime::format_rfc3339_millis(shifted).to_string();
        format!("{}{offset}", utc.trim_end_matches('Z'))
    };
    let now = std::time::SystemTime::now();
    let half_an_hour_ago = now - Duration::from_secs(1800);
    let in_an_hour = now + Duration::from_secs(3600);
    let cases = [
        (
            "past-east",
            local(half_an_hour_ago, 3600, "+01:00"),
            ResultStatus::Cancelled,
        ),
        (
            "past-west",
            local(half_an_hour_ago, -5 * 3600, "-05:00"),
            ResultStatus::Cancelled,
        ),
        (
            "future-east",
            local(in_an_hour, 14 * 3600, "+14:00"),
            ResultStatus::Ok,
        ),
    ];
    for (id, deadline, _) in &cases {
        let mut task = Task::new(format!("work {id}"));
        task.deadline = Some(deadline.clone());
        task.validate().unwrap();
        dispatch_task(&js, id, task).await;
    }
    let producer = Producer::new(client, Subjects::default());
    for (id, deadline, status) in &cases {
        let result = producer
            .await_result(id, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(result.status, *status, "{id}: deadline {deadline}");
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "only the future deadline ran"
    );
    worker.shutdown().await;
}

/// An exporter's tap sees every batch it publishes, the same bytes in the same order, with
/// the number of spans in each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exporter_s_tap_sees_every_batch_it_publishes() {
    use fleet_worker::span::{ExportConfig, SpanExporter, SpanKind, SpanRecord};
    use fleet_worker::trace::{SpanId, TraceId};
    let nats = NatsServer::start().expect("nats-server");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut sub = client.subscribe("spans.test").await.unwrap();
    client.flush().await.unwrap();
    let seen: Arc<std::sync::Mutex<Vec<(bytes::Bytes, u64)>>> = Arc::default();
    let tap = {
        let seen = seen.clone();
        Box::new(move |b: &bytes::Bytes, n: u64| seen.lock().unwrap().push((b.clone(), n)))
    };
    let (exporter, task) = SpanExporter::start_tapped(
        client.clone(),
        "spans.test".into(),
        vec![("service.name".into(), "tapped".into())],
        ExportConfig {
            max_batch: 2,
            flush_interval: Duration::from_secs(60),
            ..Default::default()
        },
        Some(tap),
    );
    for n in 0..5u8 {
        let mut s = SpanRecord::new(
            "op",
            SpanKind::Internal,
            TraceId([n + 1; 16]),
            SpanId([9; 8]),
        );
        s.end = std::time::SystemTime::now();
        exporter.record(s);
    }
    exporter.shutdown();
    task.await.unwrap();
    let mut published = Vec::new();
    while published.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("three batches published")
            .unwrap();
        published.push(m.payload);
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [2, 2, 1]);
    assert_eq!(
        seen.into_iter().map(|(b, _)| b).collect::<Vec<_>>(),
        published
    );
}
