//! The docs are the contract a user in another language codes against: every field the
//! API and the live stream answer on a busy fleet is named in docs/. A field added to a
//! response without a word in the docs fails here, naming the route and where it sits.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fleet_worker::{
    Baggage, LlmCall, Producer, Subjects, SubmitOptions, Task, TaskContext, TaskOutput, ToolCall,
    Worker, WorkerConfig,
};
use serde_json::{Value, json};

use crate::common::*;

/// A policy that gives `/v1/policy` something in every list, keeps every trace, and lets
/// an alert fire after a second.
const POLICY: &str = r#"
[[budget]]
name = "team-daily"
scope = "team"
window = "day"
limit_usd = 25.0
action = "defer"
soft = [{ at = 0.80, action = "alert" }, { at = 0.90, action = "downgrade", max_priority = 4 }]
[[throttle]]
name = "alpha-pool"
scope = "pool"
match = "alpha"
tasks_per_s = 50
burst = 10
tokens_per_min = 2000000
[[reroute]]
from = "alpha"
to = "beta"
error_rate_above = 0.95
p95_latency_ms_above = 60000
[[redaction]]
attributes = ["user.email"]
pattern = "[a-z]+@[a-z.]+"
replacement = "[email]"
[[escalation]]
name = "note"
rules = ["queue_unserved"]
action = "log"
[sampling]
healthy_rate = 1.0
[alerts]
pending_s = 1
"#;

/// Keys whose members are data (worker ids, states, tool names, labels, the user's
/// output), not fields: their values are still walked.
const MAPS: &[&str] = &[
    "states",
    "tools",
    "workers",
    "group",
    "labels",
    "attributes",
    "baggage",
    "output",
    "input",
    "match",
];

/// Every identifier inside backticks or a fenced block of docs/*.md: what a field must
/// be among to count as named.
fn documented_words() -> HashSet<String> {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut words = HashSet::new();
    let mut add = |code: &str| {
        for w in code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !w.is_empty() {
                words.insert(w.to_string());
            }
        }
    };
    for e in std::fs::read_dir(docs).unwrap().flatten() {
        if e.path().extension().is_none_or(|x| x != "md") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        // Inline code may run over a line break, not past a paragraph: backticks pair up
        // within a paragraph, the odd pieces being code.
        let mut fenced = false;
        let mut paragraph = String::new();
        for line in text.lines().chain([""]) {
            let fence = line.trim_start().starts_with("```");
            if fenced {
                if fence {
                    fenced = false;
                } else {
                    add(line);
                }
                continue;
            }
            if fence || line.trim().is_empty() {
                for code in paragraph.split('`').skip(1).step_by(2) {
                    add(code);
                }
                paragraph.clear();
                fenced = fence;
            } else {
                paragraph.push_str(line);
                paragraph.push('\n');
            }
        }
    }
    words
}

/// Each object key of `v` not among `words`, as `where: path.key`.
fn unnamed(v: &Value, path: &str, words: &HashSet<String>, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            let data = MAPS.iter().any(|k| path.ends_with(&format!(".{k}")));
            for (k, x) in m {
                let here = if data {
                    format!("{path}.*")
                } else {
                    if !words.contains(k) {
                        out.insert(format!("{path}.{k}"));
                    }
                    format!("{path}.{k}")
                };
                unnamed(x, &here, words, out);
            }
        }
        Value::Array(a) => {
            for x in a {
                unnamed(x, &format!("{path}[]"), words, out);
            }
        }
        _ => {}
    }
}

/// A worker on `alpha` that calls a tool twice with the same arguments and then an LLM
/// for each task; a task whose description says `fail` fails, one that says `hold` runs
/// until `release` is notified.
async fn busy_worker(
    client: &async_nats::Client,
    release: Arc<tokio::sync::Notify>,
) -> fleet_worker::WorkerHandle {
    let mut cfg = WorkerConfig::new("alpha", "fields-1");
    cfg.max_in_flight = 4;
    cfg.heartbeat_interval = Duration::from_millis(300);
    cfg.export.flush_interval = Duration::from_millis(50);
    Worker::start(client.clone(), cfg, move |ctx: TaskContext| {
        let release = release.clone();
        async move {
            for _ in 0..2 {
                let t = ToolCall::new("search").arguments(r#"{"q":"incident"}"#);
                ctx.telemetry.tool_call(&t.finish());
            }
            let c = LlmCall::chat("openai", "gpt-4o-mini").tokens(1_000, 200);
            ctx.telemetry.llm_call(&c.finish());
            let description = ctx.task.description.clone();
            if description.contains("hold") {
                release.notified().await;
            }
            if description.contains("fail") {
                return Err(fleet_worker::TaskFailure::failed(
                    "tool_error",
                    "search failed",
                ));
            }
            Ok(TaskOutput {
                output: json!({"answer": description}),
                usage: None,
            })
        }
    })
    .await
    .unwrap()
}

async fn submit_with_baggage(producer: &Producer, id: &str, description: &str) {
    let mut task = Task::new(description);
    task.id = Some(id.into());
    task.attributes
        .insert("task_type".into(), "summarisation".into());
    let mut baggage = Baggage::new();
    baggage.insert("team", "search");
    baggage.insert("feature", "triage");
    producer
        .submit(
            &task,
            SubmitOptions {
                baggage,
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

/// The events `/v1/stream` sends while `done` is not notified, as (event, data).
fn record_stream(
    stack: &Stack,
    done: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<Vec<(String, Value)>> {
    let url = stack.http("/v1/stream");
    tokio::spawn(async move {
        let mut resp = reqwest::get(url).await.unwrap();
        let mut text = String::new();
        let end = done.notified();
        tokio::pin!(end);
        loop {
            tokio::select! {
                _ = &mut end => break,
                chunk = resp.chunk() => match chunk {
                    Ok(Some(b)) => text.push_str(&String::from_utf8_lossy(&b)),
                    _ => break,
                },
            }
        }
        let mut events = Vec::new();
        let mut event = String::new();
        for line in text.lines() {
            if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_string();
            } else if let Some(d) = line.strip_prefix("data:")
                && let Ok(v) = serde_json::from_str(d.trim())
            {
                events.push((event.clone(), v));
            }
        }
        events
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_the_api_answers_is_named_in_the_docs() {
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(policies.path().join("fields.policy.toml"), POLICY).unwrap();
    let toml = format!(
        "{TWO_POOLS}\n[detect]\ninterval_ms = 200\n[telemetry]\nqueue_poll_ms = 200\n[policy]\ndir = {:?}\n",
        policies.path()
    );
    let stack = Stack::start(&toml).await;
    let stream_done = Arc::new(tokio::sync::Notify::new());
    let stream = record_stream(&stack, stream_done.clone());
    let release = Arc::new(tokio::sync::Notify::new());
    let worker = busy_worker(&stack.client, release.clone()).await;
    let producer = Producer::new(stack.client.clone(), Subjects::default());

    // A task that ends well, one that fails, one a worker holds, one no worker takes
    // (beta has none: its queue goes unserved), and one refused.
    submit_with_baggage(&producer, "fields-ok", "summarise the incident").await;
    submit_with_baggage(&producer, "fields-fail", "summarise and fail").await;
    submit_with_baggage(&producer, "fields-hold", "summarise and hold").await;
    let accepted = stack
        .post("/v1/tasks")
        .body(r#"{"schema":1,"id":"fields-beta","description":"review PR 7","capabilities":["code"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status().as_u16(), 202);
    let accepted: Value = accepted.json().await.unwrap();
    stack
        .post("/v1/tasks")
        .body(r#"{"schema":1,"id":"fields-nowhere","description":"x","pool":"omega"}"#)
        .send()
        .await
        .unwrap();

    eventually("the first two tasks ended", WAIT, async || {
        stack.get_json("/v1/tasks/fields-ok").await["state"] == "completed"
            && stack.get_json("/v1/tasks/fields-fail").await["state"] == "failed"
    })
    .await;
    eventually("the failed task's trace is kept", WAIT, async || {
        stack.get_json("/v1/traces?task_id=fields-fail").await["traces"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
    })
    .await;
    eventually("the held run shows its repeated call", WAIT, async || {
        stack.get_json("/v1/workers/fields-1").await["repeated_call"]["calls"] == 2
    })
    .await;
    eventually("the unserved queue's alert fires", WAIT, async || {
        stack.get_json("/v1/alerts?rule=queue_unserved").await["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["state"] == "firing"))
    })
    .await;
    let mut answers: Vec<(String, Value)> = vec![("POST /v1/tasks".into(), accepted)];
    // The control plane and silences read JSON, the policy routes TOML: bodies as text.
    for (path, body) in [
        (
            "/v1/control",
            json!({"command": "pause", "pool": "beta", "id": "fields-c1"}).to_string(),
        ),
        (
            "/v1/silences",
            json!({"matchers": {"pool": "beta"}, "duration_s": 60, "author": "fields", "comment": "test"})
                .to_string(),
        ),
        ("/v1/policy/check", POLICY.to_string()),
        ("/v1/policy/replay?last=1h", POLICY.to_string()),
    ] {
        let v: Value = stack
            .post(path)
            .body(body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answers.push((format!("POST {path}"), v));
    }

    let trace_id = stack.get_json("/v1/traces?task_id=fields-fail").await["traces"][0]["trace_id"]
        .as_str()
        .unwrap()
        .to_string();
    let version = stack.get_json("/v1/policy").await["version"]
        .as_str()
        .unwrap()
        .to_string();
    let routes = [
        "/v1/fleet?series=1m".to_string(),
        "/v1/workers".into(),
        "/v1/workers/fields-1".into(),
        "/v1/pools".into(),
        "/v1/costs?by=team,feature,user_tier,prompt_variant,task_type,tenant,pool,model".into(),
        "/v1/models".into(),
        "/v1/classifier".into(),
        "/v1/whoami".into(),
        "/v1/tasks/fields-ok".into(),
        "/v1/tasks/fields-fail".into(),
        "/v1/tasks/fields-nowhere".into(),
        "/v1/tasks/fields-ok/result".into(),
        "/v1/tasks/fields-fail/result".into(),
        "/v1/tasks?state=finished".into(),
        "/v1/tasks?state=deferred".into(),
        "/v1/tasks?state=parked".into(),
        "/v1/decisions".into(),
        "/v1/decisions/fields-ok".into(),
        "/v1/decisions/fields-nowhere".into(),
        "/v1/traces".into(),
        format!("/v1/traces/{trace_id}"),
        "/v1/alerts?state=all".into(),
        "/v1/alerts/sinks".into(),
        "/v1/silences".into(),
        "/v1/interventions?state=all".into(),
        "/v1/policy".into(),
        "/v1/policy/history".into(),
        format!("/v1/policy/history/{version}"),
        "/v1/control/state".into(),
        "/v1/control/audit".into(),
        "/readyz".into(),
        "/healthz".into(),
    ];
    for route in &routes {
        answers.push((format!("GET {route}"), stack.get_json(route).await));
    }
    release.notify_one();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream_done.notify_one();
    let events = stream.await.unwrap();
    let kinds: BTreeSet<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    for want in ["agent_update", "decision", "alert", "fleet_snapshot"] {
        assert!(
            kinds.contains(want),
            "no `{want}` event on the stream: {kinds:?}"
        );
    }
    for (event, data) in events {
        answers.push((format!("/v1/stream event {event}"), data));
    }

    let words = documented_words();
    let mut missing = BTreeSet::new();
    for (at, v) in &answers {
        assert!(!v.is_null(), "{at} answered nothing");
        let mut here = BTreeSet::new();
        unnamed(v, "", &words, &mut here);
        missing.extend(here.into_iter().map(|k| format!("{at}: {k}")));
    }
    assert!(
        missing.is_empty(),
        "fields the API answers that docs/ never names:\n{}",
        missing.into_iter().collect::<Vec<_>>().join("\n")
    );
    worker.shutdown().await;
}
