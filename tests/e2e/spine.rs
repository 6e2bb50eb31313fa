//! The spine: 10,000 tasks through the real commander to 4 workers in 2 pools.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use fleet_worker::{Baggage, Producer, ResultStatus, Subjects, SubmitOptions, Task, TraceParent};

use crate::common::*;

const TASKS: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_tasks_complete_exactly_once_traced_with_baggage() {
    let stack = Stack::start(TWO_POOLS).await;
    let spans = collect_spans(&stack.client).await;
    let seen = SeenLog::default();
    let workers = two_workers_per_pool(&stack.client, 16, Duration::ZERO, &seen).await;

    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut inbox = producer.result_inbox().await.unwrap();
    let mut sent: HashMap<String, (TraceParent, Baggage, &str)> = HashMap::new();
    let mut acks = Vec::new();
    for i in 0..TASKS {
        let (caps, pool): (&[&str], &str) = if i % 2 == 0 {
            (&["summarise"], "alpha")
        } else {
            (&["code"], "beta")
        };
        let mut task = Task::new(format!("task number {i}"));
        task.capabilities = caps.iter().map(|c| c.to_string()).collect();
        let id = format!("spine-{i}");
        let parent = TraceParent::new_root();
        let mut baggage = Baggage::new();
        baggage.insert("team", ["payments", "search", "growth"][i % 3]);
        baggage.insert("feature", &format!("feature {}", i % 7));
        baggage.insert("user_tier", if i % 5 == 0 { "enterprise" } else { "free" });
        baggage.insert("prompt_variant", &format!("v{}", i % 2));
        sent.insert(id.clone(), (parent, baggage.clone(), pool));
        let opts = SubmitOptions {
            idempotency_key: Some(id),
            parent: Some(parent),
            baggage,
            reply_to: Some(inbox.subject().to_string()),
            ..Default::default()
        };
        acks.push(producer.submit_pipelined(&task, opts).await.unwrap());
        if acks.len() == 500 {
            for a in acks.drain(..) {
                let receipt = a.await.unwrap();
                assert!(!receipt.duplicate);
            }
        }
    }
    for a in acks.drain(..) {
        assert!(!a.await.unwrap().duplicate);
    }

    // Every task's result reaches the producer, each exactly once.
    let mut results = HashMap::new();
    while results.len() < TASKS {
        let r = tokio::time::timeout(WAIT, inbox.next())
            .await
            .expect("results keep coming")
            .unwrap()
            .unwrap();
        assert_eq!(r.status, ResultStatus::Ok, "{r:?}");
        let expected_pool = sent[&r.task_id].2;
        assert_eq!(
            r.pool.as_deref(),
            Some(expected_pool),
            "task {} ran in the wrong pool",
            r.task_id
        );
        assert!(results.insert(r.task_id.clone(), r).is_none());
    }
    // Nothing more arrives: no result was forwarded twice.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), inbox.next())
            .await
            .is_err(),
        "an extra result arrived"
    );
    assert_eq!(
        inbox.duplicates(),
        0,
        "results were forwarded more than once"
    );

    // Each handler ran once per task and attempt, and saw the producer's baggage intact.
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.runs.len(), TASKS);
        assert!(
            seen.runs
                .iter()
                .all(|((_, attempt), n)| *n == 1 && *attempt == 1),
            "a handler ran twice"
        );
        for (id, (_, baggage, _)) in &sent {
            assert_eq!(
                &seen.baggage[id], baggage,
                "baggage of {id} changed in transit"
            );
        }
    }

    // Spans: worker process span -> commander dispatch span -> producer span, one trace.
    eventually("all spans exported", WAIT, async || {
        let s = spans.lock().unwrap();
        s.iter().filter(|s| s.service == "fleet-worker").count() >= 2 * TASKS
            && s.iter().filter(|s| s.service == "fleet-commander").count() >= TASKS
    })
    .await;
    let spans = spans.lock().unwrap().clone();
    let dispatch: HashMap<&str, &SeenSpan> = spans
        .iter()
        .filter(|s| s.service == "fleet-commander")
        .map(|s| (s.attrs["fleet.task.id"].as_str(), s))
        .collect();
    // The handler returned usage without reporting calls: one `chat` span under each
    // process span carries it (the commander prices it).
    let process_ids: HashSet<&str> = spans
        .iter()
        .filter(|s| s.service == "fleet-worker" && s.kind == 5)
        .map(|s| s.span_id.as_str())
        .collect();
    let chats: Vec<&SeenSpan> = spans
        .iter()
        .filter(|s| s.service == "fleet-worker" && s.name == "chat gpt-4o-mini")
        .collect();
    assert_eq!(chats.len(), TASKS);
    assert!(
        chats
            .iter()
            .all(|c| process_ids.contains(c.parent_span_id.as_str())
                && c.attrs["gen_ai.usage.input_tokens"] == "10")
    );
    let mut checked = HashSet::new();
    for w in spans
        .iter()
        .filter(|s| s.service == "fleet-worker" && s.kind == 5)
    {
        let id = w.attrs["fleet.task.id"].as_str();
        let (producer_span, baggage, pool) = &sent[id];
        let d = dispatch[id];
        assert_eq!(
            w.trace_id,
            producer_span.trace_id.to_hex(),
            "worker span of {id} is not in the producer's trace"
        );
        assert_eq!(
            w.parent_span_id, d.span_id,
            "worker span of {id} is not a child of the dispatch span"
        );
        assert_eq!(w.kind, 5, "worker span is CONSUMER");
        assert_eq!(d.trace_id, producer_span.trace_id.to_hex());
        assert_eq!(
            d.parent_span_id,
            producer_span.span_id.to_hex(),
            "dispatch span is not a child of the producer span"
        );
        assert_eq!(d.kind, 4, "dispatch span is PRODUCER");
        assert_eq!(d.name, format!("send fleet.work.{pool}"));
        assert_eq!(w.attrs["messaging.system"], "nats");
        for (k, v) in baggage.iter() {
            assert_eq!(
                w.attrs.get(k).map(String::as_str),
                Some(v),
                "baggage {k} not on the worker span"
            );
            assert_eq!(
                d.attrs.get(k).map(String::as_str),
                Some(v),
                "baggage {k} not on the dispatch span"
            );
        }
        checked.insert(id);
    }
    assert_eq!(checked.len(), TASKS);

    // The commander's record agrees with what travelled.
    for i in (0..TASKS).step_by(97) {
        let id = format!("spine-{i}");
        let rec = task_record(stack.commander.http(), &id)
            .await
            .expect("record");
        assert_eq!(rec["state"], "completed");
        assert_eq!(rec["trace"]["trace_id"], sent[&id].0.trace_id.to_hex());
        assert_eq!(
            rec["trace"]["dispatch_span_id"].as_str(),
            Some(dispatch[id.as_str()].span_id.as_str())
        );
        let states: Vec<_> = rec["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["state"].as_str().unwrap().to_string())
            .collect();
        assert!(
            states.contains(&"received".to_string()) && states.contains(&"dispatched".to_string())
        );
    }
    assert_eq!(
        stack.metric("fleet_tasks_received_total").await,
        TASKS as f64
    );
    assert_eq!(
        stack.metric("fleet_results_forwarded_total").await,
        TASKS as f64
    );

    for w in workers {
        w.shutdown().await;
    }
}

/// A control command (`POST /v1/control`, local mode) to the commander at `base`: its ack.
async fn control(base: &str, body: &'static str) -> serde_json::Value {
    reqwest::Client::new()
        .post(format!("{base}/v1/control"))
        .header("fleet-identity", "alice")
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Submits a task over HTTP to `base` and waits for its result there.
async fn submitted_result(base: &str, id: &str) -> serde_json::Value {
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v1/tasks"))
        .body(format!(
            r#"{{"schema":1,"id":"{id}","description":"summarise {id}"}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    get_json_at(base, &format!("/v1/tasks/{id}/result?wait_s=30")).await
}

/// A budget holds for the fleet, not per replica (docs/policy.md, "Replicas"): each replica
/// counts what the others committed. Before, each checked tasks against its own ledger
/// only, and N replicas sharing intake could spend N times a limit; a replica that
/// started knew nothing of what the others had spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_holds_across_replicas() {
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("main.policy.toml"),
        "[[budget]]\nname = \"fleet-day\"\nscope = \"fleet\"\nwindow = \"day\"\nlimit_usd = 1.0\naction = \"reject\"\n",
    )
    .unwrap();
    let config = format!("{TWO_POOLS}\n[policy]\ndir = {:?}\n", policies.path());
    let a = Stack::start(&config).await;
    let a_http = a.commander.http().to_string();
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Every run costs $0.25: four fill the day's dollar.
    let _worker = fleet_worker::Worker::start(
        a.client.clone(),
        fleet_worker::WorkerConfig::new("alpha", "w1"),
        {
            let runs = runs.clone();
            move |_ctx: fleet_worker::TaskContext| {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    Ok(fleet_worker::TaskOutput {
                        output: serde_json::json!({ "done": true }),
                        usage: Some(fleet_worker::Usage {
                            model: Some("gpt-4o-mini".into()),
                            input_tokens: 10,
                            output_tokens: 5,
                            cost_usd: Some(0.25),
                        }),
                    })
                }
            }
        },
    )
    .await
    .expect("worker starts");
    let standing = async |base: &str| get_json_at(base, "/v1/policy").await["standing"][0].clone();

    // a alone spends half.
    for i in 0..2 {
        let r = submitted_result(&a_http, &format!("early-{i}")).await;
        assert_eq!(r["status"], "ok", "{r}");
    }
    // b starts and counts what a spent.
    let b_opts = commander_options(&a.nats, a.dir.path().join("replica-b"), &config);
    let b = fleet_testkit::Commander::start(&b_opts).expect("replica b");
    let b_http = b.http().to_string();
    eventually("b counts a's spending", WAIT, async || {
        let s = standing(&b_http).await;
        s["spent_usd"] == 0.5 && s["other_replicas_usd"] == 0.5
    })
    .await;
    // Two more, decided by either replica, fill the budget.
    for i in 0..2 {
        let r = submitted_result(&b_http, &format!("late-{i}")).await;
        assert_eq!(r["status"], "ok", "{r}");
    }
    eventually("both count the fleet's whole dollar", WAIT, async || {
        standing(&a_http).await["spent_usd"] == 1.0 && standing(&b_http).await["spent_usd"] == 1.0
    })
    .await;
    // Whichever replica decides, nothing more runs.
    for i in 0..8 {
        let base = if i % 2 == 0 { &a_http } else { &b_http };
        let r = submitted_result(base, &format!("over-{i}")).await;
        assert_eq!(r["status"], "rejected", "over-{i}: {r}");
        assert_eq!(r["error"]["code"], "budget_exceeded", "over-{i}: {r}");
    }
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 4);
}

/// An operator's command sent to one replica holds on every replica (docs/protocol.md §3,
/// "Several commander replicas"): with a shared intake, a pool blocked through one replica
/// was still dispatched to by the other, a pause set through one could not be resumed
/// through the other (which knew nothing of it), and a cost cap held on one replica only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operators_command_on_one_replica_holds_on_every_replica() {
    let a = Stack::start(TWO_POOLS).await;
    let a_http = a.commander.http().to_string();
    let b_opts = commander_options(&a.nats, a.dir.path().join("replica-b"), TWO_POOLS);
    let mut b = fleet_testkit::Commander::start(&b_opts).expect("replica b");
    let (seen, _worker) = watched_worker(&a.client, "alpha", "w1", 16).await;
    let state = async |base: &str| get_json_at(base, "/v1/control/state").await;

    // Blocked through a: whichever replica takes a task for alpha refuses it.
    let ack = control(
        &a_http,
        r#"{"command":"block_pool","pool":"alpha","reason":"incident 7"}"#,
    )
    .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let b_http = b.http().to_string();
    eventually("b takes on the block", WAIT, async || {
        state(&b_http).await["blocks"]
            .as_array()
            .is_some_and(|x| x.iter().any(|b| b["value"] == "alpha"))
    })
    .await;
    for i in 0..10 {
        let id = format!("blocked-{i}");
        let r = submitted_result(&b_http, &id).await;
        assert_eq!(r["status"], "rejected", "{id}: {r}");
        assert_eq!(r["error"]["code"], "blocked", "{id}: {r}");
    }
    assert!(seen.lock().unwrap().runs_per_task().is_empty());

    // Restored through b: ended on a too, by whoever ended it on b.
    let ack = control(&b_http, r#"{"command":"restore_pool","pool":"alpha"}"#).await;
    assert_eq!(
        ack["state"]["ended"].as_array().map(Vec::len),
        Some(1),
        "{ack}"
    );
    eventually("a ends the block", WAIT, async || {
        let s = state(&a_http).await;
        s["blocks"] == serde_json::json!([]) && s["operator_interventions"] == serde_json::json!([])
    })
    .await;
    let on_a = get_json_at(&a_http, "/v1/interventions?state=reverted").await;
    let on_b = get_json_at(&b_http, "/v1/interventions?state=reverted").await;
    let by = &on_a["interventions"][0]["reverted_by"];
    assert_eq!(
        *by, on_b["interventions"][0]["reverted_by"],
        "{on_a} {on_b}"
    );
    assert_eq!(on_a["interventions"][0]["state"], "reverted", "{on_a}");
    assert!(by.as_str().is_some_and(|w| !w.is_empty()), "{on_a}");
    for i in 0..4 {
        let id = format!("open-{i}");
        let r = submitted_result(&a_http, &id).await;
        assert_eq!(r["status"], "ok", "{id}: {r}");
    }

    // Paused through b, resumed through a.
    let ack = control(&b_http, r#"{"command":"pause","pool":"alpha"}"#).await;
    assert_eq!(ack["ok"], true, "{ack}");
    eventually("a tells the worker it is paused", WAIT, async || {
        state(&a_http).await["workers"]["w1"]["mode"] == "paused"
    })
    .await;
    let ack = control(&a_http, r#"{"command":"resume","pool":"alpha"}"#).await;
    assert_eq!(
        ack["state"]["ended"].as_array().map(Vec::len),
        Some(1),
        "{ack}"
    );
    eventually("b ends the pause", WAIT, async || {
        let s = state(&b_http).await;
        s["operator_interventions"] == serde_json::json!([])
            && s["workers"] == serde_json::json!({})
    })
    .await;

    // The cost cap: set through a, lifted through b.
    let ack = control(&a_http, r#"{"command":"cost_cap","usd":5,"window":"1h"}"#).await;
    assert_eq!(ack["ok"], true, "{ack}");
    eventually("b caps the fleet's spend", WAIT, async || {
        let cap = &state(&b_http).await["cost_cap"];
        cap["limit_usd"] == 5.0 && cap["set_at_ms"] == ack["state"]["cost_cap"]["set_at_ms"]
    })
    .await;
    let policy = get_json_at(&b_http, "/v1/policy").await;
    assert!(policy.to_string().contains("operator_cost_cap"), "{policy}");
    let ack = control(&b_http, r#"{"command":"lift_cost_cap"}"#).await;
    assert_eq!(ack["ok"], true, "{ack}");
    eventually("a lifts the cap", WAIT, async || {
        state(&a_http).await["cost_cap"].is_null()
    })
    .await;

    // A silence made through b mutes on a (the replica that notifies may be either);
    // ended through a, it ends on b.
    let made: serde_json::Value = reqwest::Client::new()
        .post(format!("{b_http}/v1/silences"))
        .body(r#"{"matchers":{"pool":"alpha"},"duration_s":3600,"author":"alice","comment":"deploy"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sid = made["id"].as_str().expect("a silence id").to_string();
    let silence_on = async |base: &str| {
        get_json_at(base, "/v1/silences").await["silences"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["id"] == sid.as_str()).cloned())
    };
    eventually("a keeps b's silence", WAIT, async || {
        silence_on(&a_http)
            .await
            .is_some_and(|x| x["active"] == true)
    })
    .await;
    let r = reqwest::Client::new()
        .delete(format!("{a_http}/v1/silences/{sid}"))
        .header("fleet-identity", "bob")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    eventually("b ends it", WAIT, async || {
        silence_on(&b_http)
            .await
            .is_some_and(|x| x["active"] == false && x["expired_ms"].is_u64())
    })
    .await;

    // A replica that was down takes on, as it starts, what changed meanwhile.
    assert_eq!(b.terminate(Duration::from_secs(20)), Some(0));
    let ack = control(
        &a_http,
        r#"{"command":"reroute_pool","pool":"beta","to":"alpha"}"#,
    )
    .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let b = fleet_testkit::Commander::start(&b_opts).expect("replica b again");
    let s = state(b.http()).await;
    assert_eq!(s["reroutes"][0]["from"], "beta", "{s}");
    assert_eq!(
        s["operator_interventions"].as_array().map(Vec::len),
        Some(1),
        "{s}"
    );
}

/// Two commanders share one intake stream (docs/protocol.md §3, "Several commander
/// replicas"), so a task
/// submitted over HTTP to one may be run by the other, which keeps its record. The one it
/// was submitted to still tells how it ended: unasked, it finishes its own record of the
/// task from the results stream (and so can sweep it, as any finished record). Before, that
/// record said `received` for ever, and was never swept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_submitted_to_one_replica_and_run_by_another_is_told_on_both() {
    const N: usize = 40;
    let a = Stack::start(TWO_POOLS).await;
    let b_opts = commander_options(&a.nats, a.dir.path().join("replica-b"), TWO_POOLS);
    let b = fleet_testkit::Commander::start(&b_opts).expect("replica b");
    let (seen, _worker) = watched_worker(&a.client, "alpha", "w1", 16).await;
    let http = reqwest::Client::new();
    for i in 0..N {
        let r = http
            .post(a.http("/v1/tasks"))
            .body(format!(
                r#"{{"schema":1,"id":"rep-{i}","description":"summarise {i}"}}"#
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    }
    eventually("every task runs", WAIT, async || {
        seen.lock().unwrap().runs_per_task().len() == N
    })
    .await;
    assert!(
        seen.lock()
            .unwrap()
            .runs_per_task()
            .values()
            .all(|n| *n == 1)
    );

    // The tasks replica b took from the intake stream: it keeps their records (b answers
    // for the others with a's records, which name a).
    let b_id = replica_of(&b.log_text());
    let mut on_b = Vec::new();
    for i in 0..N {
        let id = format!("rep-{i}");
        let mut kept_by = String::new();
        eventually(&format!("b tells how {id} ended"), WAIT, async || {
            let rec = task_record(b.http(), &id).await;
            let done = rec.as_ref().is_some_and(|r| r["state"] == "completed");
            if let Some(r) = rec.filter(|_| done) {
                kept_by = r["replica"].as_str().unwrap_or_default().to_string();
            }
            done
        })
        .await;
        if kept_by == b_id {
            on_b.push(id);
        }
    }
    assert!(
        !on_b.is_empty(),
        "replica b took none of {N} tasks: is the intake shared?"
    );

    // Replica a finishes its records of those from the results stream (each replica
    // reads every result; `Fleet-Replica` says which dispatched the run) without being
    // asked: nothing has read them on a yet.
    let expected = on_b.len() as f64;
    eventually(
        "a finishes the records of the tasks b ran",
        WAIT,
        async || a.metric("fleet_tasks_finished_elsewhere_total").await == expected,
    )
    .await;
    for i in 0..N {
        let id = format!("rep-{i}");
        let rec = task_record(a.commander.http(), &id)
            .await
            .unwrap_or_else(|| panic!("{id} is on the replica it was submitted to"));
        assert_eq!(rec["state"], "completed", "{rec}");
        assert_eq!(rec["outcome"]["worker_id"], "w1", "{rec}");
        assert_eq!(rec["outcome"]["status"], "ok", "{rec}");
    }
    // Each run is counted once, by the replica that dispatched it, and b made up no
    // record of a task it did not take.
    let b_metrics = reqwest::get(format!("{}/metrics", b.http()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let ok = r#"fleet_tasks_finished_total{pool="alpha",status="ok"}"#;
    assert_eq!(sample_value(&b_metrics, ok), expected);
    assert_eq!(a.metric(ok).await, N as f64 - expected);
    assert_eq!(
        sample_value(&b_metrics, "fleet_tasks_finished_elsewhere_total"),
        0.0
    );
    // The listing of finished tasks is the fleet's, on either replica: each task once,
    // listed by the replica that ran it (a's copies of how b's runs ended are not listed
    // while b answers). Before, b listed only the tasks it ran.
    for (name, http) in [("a", a.commander.http()), ("b", b.http())] {
        let uri = format!("/v1/tasks?state=finished&limit={}", 2 * N);
        // A replica looks for the others at most every 10 s.
        let mut finished = serde_json::Value::Null;
        eventually(&format!("{name} counts both replicas"), WAIT, async || {
            finished = get_json_at(http, &uri).await;
            finished["replicas"] == 2
        })
        .await;
        let tasks = finished["tasks"].as_array().unwrap();
        let mut listed: Vec<_> = tasks
            .iter()
            .map(|t| t["task_id"].as_str().unwrap())
            .collect();
        listed.sort_unstable();
        listed.dedup();
        assert_eq!(
            (tasks.len(), listed.len()),
            (N, N),
            "{name} lists each task once: {finished}"
        );
        for t in tasks {
            let ran_on_b = on_b.iter().any(|id| t["task_id"] == id.as_str());
            assert_eq!(t["replica"] == b_id.as_str(), ran_on_b, "{name}: {t}");
            // The record of the replica that ran it (a copy knows no attempt or model).
            assert_eq!(
                (&t["attempt"], &t["model"]),
                (&serde_json::json!(1), &serde_json::json!("gpt-4o-mini")),
                "{name}: {t}"
            );
        }
        // A page at a time: still each once.
        let mut paged = Vec::new();
        let mut cursor = String::new();
        loop {
            let page =
                get_json_at(http, &format!("/v1/tasks?state=finished&limit=7{cursor}")).await;
            for t in page["tasks"].as_array().unwrap() {
                paged.push(t["task_id"].as_str().unwrap().to_string());
            }
            match page["next"].as_str() {
                Some(next) => cursor = format!("&cursor={next}"),
                None => break,
            }
            assert!(paged.len() <= 2 * N, "{name}: pages do not end: {paged:?}");
        }
        let mut unique = paged.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!((paged.len(), unique.len()), (N, N), "{name}: {paged:?}");
    }
    // The decisions too: a keeps no decision for the tasks b took (its records of them are
    // HTTP submissions), and shows b's. Before, a answered 404.
    for id in &on_b {
        let d = get_json_at(a.commander.http(), &format!("/v1/decisions/{id}")).await;
        assert_eq!(
            (&d["task_id"], &d["pool"]),
            (&serde_json::json!(id), &serde_json::json!("alpha")),
            "{d}"
        );
        assert_eq!(d["outcome"], "dispatched", "{d}");
    }

    // Submitted over NATS, a task has its record on the replica that took it alone; the
    // other answers `GET /v1/tasks/{id}` with that record, asked over NATS.
    const M: usize = 10;
    let producer = Producer::new(a.client.clone(), Subjects::default());
    for i in 0..M {
        let opts = SubmitOptions {
            idempotency_key: Some(format!("nats-{i}")),
            ..Default::default()
        };
        producer
            .submit(&Task::new(format!("summarise over NATS {i}")), opts)
            .await
            .unwrap();
    }
    eventually("the NATS tasks run", WAIT, async || {
        seen.lock().unwrap().runs_per_task().len() == N + M
    })
    .await;
    let mut keepers = HashSet::new();
    for i in 0..M {
        let id = format!("nats-{i}");
        eventually(
            &format!("both replicas tell how {id} ended"),
            WAIT,
            async || {
                let on_a = task_record(a.commander.http(), &id).await;
                let on_b = task_record(b.http(), &id).await;
                match (on_a, on_b) {
                    (Some(x), Some(y)) => {
                        x["state"] == "completed" && x == y && {
                            keepers.insert(x["replica"].to_string());
                            true
                        }
                    }
                    _ => false,
                }
            },
        )
        .await;
    }
    assert!(
        keepers.iter().all(|k| k.len() == 18),
        "each record names the replica that keeps it: {keepers:?}"
    );

    // An operator's cancel sent to the replica that does not keep the task is carried
    // out by the one that does: here a task queued for pool beta, which has no worker.
    let mut task = Task::new("review PR 7");
    task.capabilities = vec!["code".into()];
    let opts = SubmitOptions {
        idempotency_key: Some("queued-beta".into()),
        ..Default::default()
    };
    producer.submit(&task, opts).await.unwrap();
    let mut keeper = String::new();
    eventually(
        "a replica dispatches the beta task",
        WAIT,
        async || match task_record(b.http(), "queued-beta").await {
            Some(r) if r["state"] == "dispatched" => {
                keeper = r["replica"].as_str().unwrap_or_default().to_string();
                true
            }
            _ => false,
        },
    )
    .await;
    let other = if keeper == b_id {
        a.commander.http()
    } else {
        b.http()
    };
    let ack = control(
        other,
        r#"{"command":"cancel","task_id":"queued-beta","reason":"not wanted"}"#,
    )
    .await;
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(ack["state"]["replica"], keeper.as_str(), "{ack}");
    for replica in [a.commander.http(), b.http()] {
        eventually(
            "both replicas tell the task was cancelled",
            WAIT,
            async || {
                task_record(replica, "queued-beta")
                    .await
                    .is_some_and(|r| r["outcome"]["status"] == "cancelled")
            },
        )
        .await;
    }

    // A purge of beta's queue through one replica cancels the tasks either dispatched,
    // and each cancel is recorded by the replica that dispatched the task: the purging
    // one makes up no record of the other's.
    const Q: usize = 6;
    for i in 0..Q {
        let opts = SubmitOptions {
            idempotency_key: Some(format!("purged-{i}")),
            ..Default::default()
        };
        producer.submit(&task, opts).await.unwrap();
    }
    let mut dispatched_by = HashMap::new();
    for i in 0..Q {
        let id = format!("purged-{i}");
        eventually(
            &format!("{id} waits in beta's queue"),
            WAIT,
            async || match task_record(a.commander.http(), &id).await {
                Some(r) if r["state"] == "dispatched" => {
                    dispatched_by.insert(id.clone(), r["replica"].clone());
                    true
                }
                _ => false,
            },
        )
        .await;
    }
    let ack = control(
        a.commander.http(),
        r#"{"command":"purge_pool","pool":"beta","reason":"not wanted"}"#,
    )
    .await;
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(ack["state"]["cancelled"], Q, "{ack}");
    let kept_by: HashSet<String> = dispatched_by.values().map(|v| v.to_string()).collect();
    for (id, by) in &dispatched_by {
        for replica in [a.commander.http(), b.http()] {
            eventually(
                &format!("{id} is told cancelled by its dispatcher"),
                WAIT,
                async || {
                    task_record(replica, id).await.is_some_and(|r| {
                        r["outcome"]["status"] == "cancelled" && r["replica"] == *by
                    })
                },
            )
            .await;
        }
    }
    eprintln!("purged tasks dispatched by {} replica(s)", kept_by.len());
}
