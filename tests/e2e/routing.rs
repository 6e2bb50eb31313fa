//! Classify and route through the real binary: a scripted local LLM classifies mixed
//! tasks, they land on the expected pools and models, the decision log explains each,
//! the classifier's own calls are traced and booked, and `commander decisions tail`
//! streams them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_testkit::fake_llm::{FakeLlm, Reply};
use fleet_worker::message::ResultStatus;
use fleet_worker::{
    Producer, Subjects, SubmitOptions, Task, TaskContext, TaskOutput, Worker, WorkerConfig,
};
use serde_json::Value;

use crate::common::{SeenLog, Stack, WAIT, collect_spans, eventually, recording_worker};

/// Task id → (pool it ran in, model it was dispatched with).
type SeenModels = HashMap<String, (String, Option<String>)>;

fn config(llm: &str) -> String {
    format!(
        r#"
[classifier]
endpoint = "{llm}"
protocol = "openai"
# Generous: no scripted answer here is slow, and a 2-core CI machine running the other
# end-to-end tests beside this one can take longer than 500 ms to serve a local reply
# (a timeout would add an unexpected fallback classification).
timeout_ms = 5000
max_retries = 1
backoff_ms = 10

# This test is about which model and pool a task's needs and price pick; the tasks
# arrive together, so with load balancing on, the ones routed first make a pool look
# busier to the ones after them (route/tests.rs covers load).
[routing]
load_weight = 0.0

[pools.code]
capabilities = ["code", "review"]
[pools.docs]
capabilities = ["summarise", "extract"]
[pools.general]
capabilities = []
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_tasks_land_on_the_expected_pools_and_models_and_every_decision_is_explained() {
    let llm = FakeLlm::start().unwrap();
    llm.on(
        "pull request",
        vec![Reply::classification(
            "code_review",
            "standard",
            &["code", "review"],
            0.92,
        )],
    )
    .on(
        "meeting notes",
        vec![Reply::classification(
            "summarisation",
            "simple",
            &["summarise"],
            0.95,
        )],
    )
    .on(
        "invoice",
        vec![Reply::classification(
            "extraction",
            "simple",
            &["extract"],
            0.9,
        )],
    )
    .on(
        "sentiment",
        vec![Reply::classification("classification", "simple", &[], 0.88)],
    )
    .on(
        "vector database market",
        vec![Reply::classification("research", "complex", &[], 0.8)],
    )
    .on(
        "rate limiter",
        vec![Reply::classification(
            "code_generation",
            "complex",
            &["code"],
            0.9,
        )],
    )
    .on(
        "gibberish",
        vec![Reply::Text("Sure! This looks like a summary task.".into())],
    )
    .on("flaky", vec![Reply::Status(503, None)]);
    let stack = Stack::start(&config(&llm.url())).await;
    let spans = collect_spans(&stack.client).await;

    // One worker per pool, recording the model each task was dispatched with.
    let models: Arc<Mutex<SeenModels>> = Default::default();
    let mut workers = Vec::new();
    for pool in ["code", "docs", "general"] {
        let seen = models.clone();
        let pool_name = pool.to_string();
        let mut cfg = WorkerConfig::new(pool, format!("{pool}-1"));
        cfg.max_in_flight = 4;
        cfg.heartbeat_interval = Duration::from_secs(1);
        let w = Worker::start(stack.client.clone(), cfg, move |ctx: TaskContext| {
            let seen = seen.clone();
            let pool = pool_name.clone();
            async move {
                seen.lock()
                    .unwrap()
                    .insert(ctx.task_id.clone(), (pool, ctx.model.clone()));
                Ok(TaskOutput::default())
            }
        })
        .await
        .unwrap();
        workers.push(w);
    }

    // `commander decisions tail` streams what is decided from now on.
    let mut tail = Command::new(env!("CARGO_BIN_EXE_commander"))
        .args([
            "decisions",
            "tail",
            "--json",
            "--count",
            "9",
            "--nats-url",
            stack.nats.url(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tail_err = BufReader::new(tail.stderr.take().unwrap());
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in tail_err.lines() {
            if line.unwrap().contains("tailing decisions") {
                let _ = ready_tx.send(());
                return;
            }
        }
    });
    // Bounded: a tail that never says it is ready fails the test instead of hanging it.
    assert!(
        ready.recv_timeout(WAIT).is_ok(),
        "decisions tail did not start"
    );
    let tail_out = tail.stdout.take().unwrap();
    let tailed = std::thread::spawn(move || {
        BufReader::new(tail_out)
            .lines()
            .map(|l| l.unwrap())
            .collect::<Vec<_>>()
    });

    // (id, text, capabilities, expected pools, expected model, classification source)
    type Want = (
        &'static str,
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
        &'static str,
        &'static str,
    );
    let cases: Vec<Want> = vec![
        (
            "review",
            "Review pull request #12 for SQL injection",
            &[],
            &["code"],
            "claude-haiku-4-5",
            "llm",
        ),
        (
            "notes",
            "Summarise the attached meeting notes",
            &[],
            &["docs"],
            "gemini-2.0-flash",
            "llm",
        ),
        (
            "invoice",
            "Pull the invoice number and total out of this email",
            &[],
            &["docs"],
            "gemini-2.0-flash",
            "llm",
        ),
        (
            "sentiment",
            "What is the sentiment of this customer message?",
            &[],
            &["docs", "general"],
            "gemini-2.0-flash",
            "llm",
        ),
        (
            "research",
            "Map the vector database market for our board",
            &[],
            &["docs", "general"],
            "gemini-2.5-pro",
            "llm",
        ),
        (
            "ratelimit",
            "Write a token-bucket rate limiter in Go with tests",
            &[],
            &["code"],
            "claude-sonnet-4-5",
            "llm",
        ),
        // Garbage from the classifier, then a failing classifier: the fallback decides.
        (
            "gibberish",
            "gibberish: summarise this paragraph",
            &[],
            &["docs"],
            "gemini-2.0-flash",
            "fallback",
        ),
        (
            "flaky",
            "flaky: extract the dates from this contract",
            &[],
            &["docs"],
            "gemini-2.0-flash",
            "fallback",
        ),
    ];
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut inbox = producer.result_inbox().await.unwrap();
    for (id, text, caps, _, _, _) in &cases {
        let mut t = Task::new(*text);
        t.id = Some(id.to_string());
        t.capabilities = caps.iter().map(|c| c.to_string()).collect();
        producer
            .submit(
                &t,
                SubmitOptions {
                    reply_to: Some(inbox.subject().to_string()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    // A task no pool can serve is rejected with a reason the producer reads.
    let mut gpu = Task::new("Train a diffusion model on the meeting notes");
    gpu.id = Some("gpu".into());
    gpu.capabilities = vec!["gpu".into()];
    producer
        .submit(
            &gpu,
            SubmitOptions {
                reply_to: Some(inbox.subject().to_string()),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let mut results = HashMap::new();
    while results.len() < cases.len() + 1 {
        let r = tokio::time::timeout(WAIT, inbox.next())
            .await
            .expect("results")
            .unwrap()
            .unwrap();
        results.insert(r.task_id.clone(), r);
    }
    let rejected = &results["gpu"];
    assert_eq!(rejected.status, ResultStatus::Rejected);
    let err = rejected.error.as_ref().unwrap();
    assert_eq!(err.code, "no_eligible_pool");
    assert!(err.message.contains("lacks [gpu]"), "{}", err.message);

    let seen = models.lock().unwrap().clone();
    for (id, _, _, pools, model, source) in &cases {
        let r = &results[*id];
        assert_eq!(r.status, ResultStatus::Ok, "{id}: {r:?}");
        let (ran_in, got_model) = &seen[*id];
        assert!(
            pools.contains(&ran_in.as_str()),
            "{id} ran in {ran_in}, want one of {pools:?}"
        );
        assert_eq!(
            got_model.as_deref(),
            Some(*model),
            "{id}: the worker got the chosen model"
        );

        // The decision log explains it: classification, choice, every candidate.
        let d = stack.get_json(&format!("/v1/decisions/{id}")).await;
        assert_eq!(d["pool"], ran_in.as_str(), "{id}: {d}");
        assert_eq!(d["model"], *model, "{id}");
        assert_eq!(d["classification"]["source"], *source, "{id}: {d}");
        assert!(d["id"].as_str().unwrap().starts_with("dec-"));
        let cands = d["candidates"].as_array().unwrap();
        assert!(
            cands.iter().filter(|c| c["code"] == "chosen").count() == 1,
            "{id}: {d}"
        );
        assert!(
            cands
                .iter()
                .all(|c| !c["reason"].as_str().unwrap().is_empty()),
            "{id}"
        );
        assert!(
            d["reason"].as_str().unwrap().contains(model),
            "{id}: {}",
            d["reason"]
        );
    }
    let g = stack.get_json("/v1/decisions/gibberish").await;
    assert_eq!(g["classification"]["fallback_cause"], "garbage", "{g}");
    assert_eq!(
        stack.get_json("/v1/decisions/flaky").await["classification"]["fallback_cause"],
        "server_error"
    );
    let review = stack.get_json("/v1/decisions/review").await;
    let excluded: Vec<&Value> = review["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["code"] == "capability")
        .collect();
    assert!(!excluded.is_empty(), "docs/general lack code: {review}");

    // The same content again is answered from the cache: no new classifier request.
    let before = llm.requests();
    let mut again = Task::new("Summarise the attached meeting notes");
    again.id = Some("notes-again".into());
    producer
        .submit(
            &again,
            SubmitOptions {
                reply_to: Some(inbox.subject().to_string()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let r = tokio::time::timeout(WAIT, inbox.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.task_id, "notes-again");
    assert_eq!(llm.requests(), before);
    assert_eq!(
        stack.get_json("/v1/decisions/notes-again").await["classification"]["source"],
        "cache"
    );

    // Filters and pagination.
    let code = stack.get_json("/v1/decisions?pool=code").await;
    let listed: Vec<(&str, u64)> = code["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["task_id"].as_str().unwrap(), d["at_ms"].as_u64().unwrap()))
        .collect();
    let mut ids: Vec<&str> = listed.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["ratelimit", "review"]);
    // Newest first (two decisions of one batch can share a millisecond).
    assert!(
        listed.windows(2).all(|w| w[0].1 >= w[1].1),
        "newest first: {listed:?}"
    );
    let page = stack.get_json("/v1/decisions?limit=4").await;
    assert_eq!(page["decisions"].as_array().unwrap().len(), 4);
    let next = page["next"].as_str().unwrap();
    let rest = stack
        .get_json(&format!("/v1/decisions?limit=100&cursor={next}"))
        .await;
    assert_eq!(
        rest["decisions"].as_array().unwrap().len(),
        cases.len() + 2 - 4
    );
    let fallbacks = stack.get_json("/v1/decisions?source=fallback").await;
    assert_eq!(fallbacks["decisions"].as_array().unwrap().len(), 2);
    let rejections = stack.get_json("/v1/decisions?outcome=rejected").await;
    assert_eq!(rejections["decisions"][0]["task_id"], "gpu");
    let bad = reqwest::get(stack.http("/v1/decisions?colour=red"))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(
        reqwest::get(stack.http("/v1/decisions/nope"))
            .await
            .unwrap()
            .status(),
        404
    );

    // The tail saw the first nine decisions (eight dispatched, one rejected).
    let lines = tailed.join().unwrap();
    let _ = tail.wait();
    assert_eq!(lines.len(), 9, "{lines:?}");
    let tailed_ids: Vec<String> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["task_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        tailed_ids.contains(&"gpu".to_string()) && tailed_ids.contains(&"review".to_string()),
        "{tailed_ids:?}"
    );
    // What is published on NATS is the decision the log keeps, field for field: the API
    // serves the same record with `kept_trace` and `replica` added (docs/api.md).
    for (line, id) in lines.iter().zip(&tailed_ids) {
        let published: Value = serde_json::from_str(line).unwrap();
        let mut served = stack.get_json(&format!("/v1/decisions/{id}")).await;
        let added = served.as_object_mut().unwrap();
        assert!(added.remove("kept_trace").is_some());
        let replica = added.remove("replica").unwrap_or_default();
        assert_eq!(replica.as_str().map(str::len), Some(16), "{replica}");
        assert_eq!(published, served, "task {id}");
    }

    // The dispatch span carries the decision; the classifier's call is a GenAI span in
    // the task's trace; its cost is on the commander's own line.
    eventually("dispatch and classifier spans", WAIT, async || {
        let spans = spans.lock().unwrap();
        let dispatch = spans.iter().find(|s| {
            s.name.starts_with("send ")
                && s.attrs.get("fleet.task.id").map(String::as_str) == Some("review")
        });
        let classify = spans.iter().find(|s| {
            s.name == "chat gpt-4o-mini"
                && s.attrs.get("fleet.task.id").map(String::as_str) == Some("review")
        });
        match (dispatch, classify) {
            (Some(d), Some(c)) => {
                assert_eq!(d.attrs["fleet.route.rule"], "cost_tier");
                assert_eq!(d.attrs["gen_ai.request.model"], "claude-haiku-4-5");
                assert_eq!(d.attrs["fleet.task.type"], "code_review");
                assert!(d.attrs["fleet.decision.id"].starts_with("dec-"));
                assert_eq!(c.trace_id, d.trace_id);
                assert_eq!(c.parent_span_id, d.span_id);
                assert_eq!(c.attrs["gen_ai.provider.name"], "openai");
                assert_eq!(c.attrs["gen_ai.usage.input_tokens"], "410");
                true
            }
            _ => false,
        }
    })
    .await;
    eventually(
        "classifier cost on the commander's line",
        WAIT,
        async || {
            let costs = stack.get_json("/v1/costs?by=pool,feature").await;
            costs["rows"].as_array().unwrap().iter().any(|r| {
                r["group"]["pool"] == "_commander"
                    && r["group"]["feature"] == "classification"
                    && r["cost_usd"].as_f64().unwrap_or(0.0) > 0.0
            })
        },
    )
    .await;
    let classifier = stack.get_json("/v1/classifier").await;
    assert_eq!(classifier["breaker"], "closed");
    assert_eq!(classifier["rubric"]["name"], "default");
    assert!(
        stack
            .metric("fleet_classifications_total{source=\"fallback\",cause=\"garbage\"}")
            .await
            >= 1.0
    );
    for w in workers {
        w.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classifier_slower_than_the_intake_ack_wait_does_not_get_the_task_handed_out_again() {
    // The batch in hand sends progress every third of the ack wait, so a 1 s ack wait
    // and a 2.5 s classification mean one classification and one dispatch.
    let llm = FakeLlm::start().unwrap();
    llm.otherwise(Reply::Slow(
        Duration::from_millis(2_500),
        Box::new(Reply::classification(
            "summarisation",
            "simple",
            &["summarise"],
            0.9,
        )),
    ));
    let toml = format!("{}\n[intake]\nack_wait_secs = 1\n", config(&llm.url()));
    let stack = Stack::start(&toml).await;
    let seen = SeenLog::default();
    let worker =
        recording_worker(&stack.client, "docs", "d1", 2, Duration::ZERO, seen.clone()).await;
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut task = Task::new("summarise these slow meeting notes");
    task.id = Some("slow-class".into());
    producer
        .submit(&task, SubmitOptions::default())
        .await
        .unwrap();
    let r = producer.await_result("slow-class", WAIT).await.unwrap();
    assert_eq!(r.status, ResultStatus::Ok);
    // The intake message is acked and nothing of it is pending: JetStream will hand
    // nothing back to be classified again.
    let js = async_nats::jetstream::new(stack.client.clone());
    let mut intake = js
        .get_stream("FLEET_INTAKE")
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("commander-intake")
        .await
        .unwrap();
    let mut info = None;
    eventually("the intake message is acked", WAIT, async || {
        let i = intake.info().await.unwrap().clone();
        let done = i.num_ack_pending == 0 && i.num_pending == 0;
        info = Some(i);
        done
    })
    .await;
    let info = info.unwrap();
    assert_eq!(
        info.ack_floor.stream_sequence, info.delivered.stream_sequence,
        "{info:?}"
    );
    // The only intake message was delivered once: each delivery, a redelivery too, takes
    // a consumer sequence.
    assert_eq!(
        info.delivered.consumer_sequence, info.delivered.stream_sequence,
        "handed out once: {info:?}"
    );
    assert_eq!(llm.requests(), 1, "classified once");
    // A copy handed out again would have been decided a second time, sharing the first
    // copy's answer while it was in flight.
    let decision = stack.get_json("/v1/decisions/slow-class").await;
    assert_eq!(
        decision["classification"]["source"], "llm",
        "decided once: {decision}"
    );
    assert!(
        !stack.commander.logged("redelivered"),
        "{}",
        stack.commander.log_text()
    );
    assert_eq!(seen.lock().unwrap().runs_per_task()["slow-class"], 1);
    worker.shutdown().await;
}
