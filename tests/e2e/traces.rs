//! Kept traces end to end: a commander tail-samples and redacts, stores and exports; a
//! second commander (a real OTLP/gRPC receiver) and an OTLP/HTTP collector receive exactly
//! the kept traces, redacted; an unreachable endpoint changes nothing; a task record and
//! its decision link to the trace kept for it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use fleet_testkit::{Commander, NatsServer};
use fleet_worker::telemetry::ToolCall;
use fleet_worker::{
    Producer, ResultStatus, Subjects, SubmitOptions, Task, TaskContext, TaskFailure, Worker,
    WorkerConfig,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use serde_json::Value;

use crate::common::{Stack, WAIT, commander_options, eventually, hex, leader_of, metric_at};

/// Personal data the shipped rules remove, one kind per trace (by trace number).
const PII: &[&str] = &[
    "jane.doe@example.com",
    "+1 415 555 2671",
    "4111 1111 1111 1111",
    "sk-proj-AbCdEf0123456789AbCdEf0123",
    "Bearer abcdefghijklmnopqrstuvwxyz012345",
    "10.20.30.40",
];

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

fn int(k: &str, v: i64) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(v)),
        }),
        ..Default::default()
    }
}

fn trace_id(n: u64) -> Vec<u8> {
    let mut t = vec![0x5A; 16];
    t[8..].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
    t
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// An agent's run: a root `invoke_agent` span and one chat call carrying `pii` in its
/// messages; the call failed when `error`.
fn agent_run(n: u64, pii: &str, error: bool) -> ExportTraceServiceRequest {
    let now = now_ns();
    let root = (n << 8 | 1).to_be_bytes().to_vec();
    let spans = vec![
        Span {
            trace_id: trace_id(n),
            span_id: (n << 8 | 2).to_be_bytes().to_vec(),
            parent_span_id: root.clone(),
            name: "chat gpt-4o-mini".into(),
            start_time_unix_nano: now - 50_000_000,
            end_time_unix_nano: now - 10_000_000,
            attributes: vec![
                kv("gen_ai.operation.name", "chat"),
                kv("gen_ai.request.model", "gpt-4o-mini"),
                int("gen_ai.usage.input_tokens", 700),
                int("gen_ai.usage.output_tokens", 50),
                kv(
                    "gen_ai.input.messages",
                    &format!(
                        r#"[{{"role":"user","parts":[{{"type":"text","content":"reach me at {pii}"}}]}}]"#
                    ),
                ),
            ],
            status: error.then(|| Status {
                code: 2,
                message: "rate limited".into(),
            }),
            ..Default::default()
        },
        Span {
            trace_id: trace_id(n),
            span_id: root,
            name: "invoke_agent helper".into(),
            start_time_unix_nano: now - 60_000_000,
            end_time_unix_nano: now,
            attributes: vec![kv("gen_ai.operation.name", "invoke_agent")],
            ..Default::default()
        },
    ];
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", "helper"),
                    kv("fleet.worker.id", &format!("helper-{}", n % 3)),
                    kv("fleet.pool", "code"),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            schema_url: String::new(),
        }],
    }
}

/// What the OTLP/HTTP collector received.
#[derive(Default)]
struct Collected {
    requests: u32,
    traces: BTreeSet<String>,
    /// Spans received per trace.
    spans: std::collections::BTreeMap<String, u32>,
    bodies: Vec<String>,
    bad_auth: u32,
}

/// An OTLP/HTTP collector: the first request is answered 503 with `Retry-After: 1`.
async fn collector() -> (String, Arc<Mutex<Collected>>) {
    collector_busy_first(true).await
}

/// An OTLP/HTTP collector; `busy_first`: its first request is answered 503 with
/// `Retry-After: 1`.
async fn collector_busy_first(busy_first: bool) -> (String, Arc<Mutex<Collected>>) {
    let seen = Arc::new(Mutex::new(Collected {
        requests: u32::from(!busy_first),
        ..Default::default()
    }));
    async fn take(
        State(seen): State<Arc<Mutex<Collected>>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> axum::response::Response {
        let mut s = seen.lock().unwrap();
        s.requests += 1;
        if s.requests == 1 {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "1")],
                "busy",
            )
                .into_response();
        }
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer test-key") {
            s.bad_auth += 1;
        }
        let req = ExportTraceServiceRequest::decode(body.as_ref()).unwrap();
        for rs in &req.resource_spans {
            for ss in &rs.scope_spans {
                for sp in &ss.spans {
                    s.traces.insert(hex(&sp.trace_id));
                    *s.spans.entry(hex(&sp.trace_id)).or_default() += 1;
                }
            }
        }
        s.bodies
            .push(serde_json::to_string(&req.resource_spans).unwrap());
        let ok = ExportTraceServiceResponse::default().encode_to_vec();
        (
            StatusCode::OK,
            [("content-type", "application/x-protobuf")],
            ok,
        )
            .into_response()
    }
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(take))
        .with_state(seen.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, seen)
}

async fn kept(commander: &Commander) -> BTreeSet<String> {
    let v: Value = reqwest::get(format!("{}/v1/traces?limit=500", commander.http()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["traces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["trace_id"].as_str().unwrap().to_string())
        .collect()
}

async fn decided(stack: &Stack) -> f64 {
    let mut n = 0.0;
    for ending in ["complete", "lifetime", "evicted"] {
        for d in ["kept", "dropped"] {
            n += stack
                .metric(&format!(
                    "fleet_traces_decided_total{{ending=\"{ending}\",decision=\"{d}\"}}"
                ))
                .await;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kept_traces_reach_a_second_commander_and_a_collector_exactly_and_redacted() {
    const RUNS: u64 = 60;
    // The receiver: a second commander that keeps everything it is sent, as it is.
    let nats_b = NatsServer::start().expect("nats-server");
    let dir_b = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir_b.path().join("policies")).unwrap();
    std::fs::write(
        dir_b.path().join("policies/keep.policy.toml"),
        "[sampling]\nhealthy_rate = 1.0\n[privacy]\ndefault_rules = false\n",
    )
    .unwrap();
    let receiver = Commander::start(&commander_options(
        &nats_b,
        dir_b.path().join("cmd"),
        &format!(
            "[traces]\ndecision_wait_ms = 300\n[policy]\ndir = {:?}\n",
            dir_b.path().join("policies")
        ),
    ))
    .expect("receiving commander");
    let (collector_url, collected) = collector().await;

    // The sender: keeps errors, failed tasks and a fifth of the rest; exports to both, and
    // to a port nobody listens on.
    let dir_a = tempfile::tempdir().unwrap();
    std::fs::write(
        dir_a.path().join("sample.policy.toml"),
        "[sampling]\nhealthy_rate = 0.2\n",
    )
    .unwrap();
    let config = format!(
        r#"
[routing]
default_pool = "code"
[pools.code]
capabilities = ["code"]
[policy]
dir = {policies:?}
[traces]
decision_wait_ms = 300
[[traces.export]]
name = "second"
protocol = "grpc"
endpoint = "{grpc}"
batch_delay_ms = 100
[[traces.export]]
name = "collector"
protocol = "http"
endpoint = "{collector_url}"
headers_env = {{ authorization = "COLLECTOR_AUTH" }}
batch_delay_ms = 100
[[traces.export]]
name = "nowhere"
protocol = "http"
endpoint = "http://127.0.0.1:9/v1/traces"
batch_delay_ms = 100
max_attempts = 2
timeout_ms = 500
"#,
        policies = dir_a.path(),
        grpc = receiver.otlp_grpc().unwrap(),
    );
    let stack = Stack::start_with_env(&config, &[("COLLECTOR_AUTH", "Bearer test-key")]).await;

    // One real task that fails on an SDK worker, its tool call's arguments carrying an
    // e-mail address.
    let mut cfg = WorkerConfig::new("code", "coder-1");
    cfg.export.flush_interval = Duration::from_millis(50);
    let _worker = Worker::start(stack.client.clone(), cfg, |ctx: TaskContext| async move {
        let t = ToolCall::new("send_mail").arguments(r#"{"to":"ops@example.org"}"#);
        ctx.telemetry.tool_call(&t.finish());
        Err::<fleet_worker::TaskOutput, _>(TaskFailure::failed("smtp", "mailbox full"))
    })
    .await
    .unwrap();
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut inbox = producer.result_inbox().await.unwrap();
    let mut task = Task::new("mail the report");
    task.capabilities = vec!["code".into()];
    let task_id = "mail-report-1".to_string();
    task.id = Some(task_id.clone());
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
    let r = tokio::time::timeout(WAIT, inbox.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.status, ResultStatus::Failed);

    // Another replica's own spans, on its subject: garbage is refused; the dispatch span
    // of run 0 (kept: its call fails) waits for its trace and is kept with it.
    let other = "fleet.telemetry._commander.commander-4242";
    let mut h = async_nats::HeaderMap::new();
    h.insert(
        fleet_worker::protocol::headers::KIND,
        fleet_worker::protocol::kinds::OTLP_TRACES,
    );
    stack
        .client
        .publish_with_headers(other, h.clone(), "not an export".into())
        .await
        .unwrap();
    let dispatch = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "fleet-commander")],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: trace_id(0),
                    span_id: vec![0xD1; 8],
                    name: "send fleet.work.code".into(),
                    kind: 4,
                    start_time_unix_nano: now_ns() - 100_000_000,
                    end_time_unix_nano: now_ns() - 99_000_000,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            schema_url: String::new(),
        }],
    };
    stack
        .client
        .publish_with_headers(other, h, dispatch.encode_to_vec().into())
        .await
        .unwrap();
    stack.client.flush().await.unwrap();
    eventually("the other replica's span is taken in", WAIT, async || {
        stack
            .metric("fleet_trace_spans_total{outcome=\"commander\"}")
            .await
            >= 2.0
    })
    .await;

    // Sixty agent runs over OTLP/HTTP, every tenth failing.
    let http = reqwest::Client::new();
    let otlp = format!("{}/v1/traces", stack.commander.otlp_http().unwrap());
    for n in 0..RUNS {
        let body = agent_run(n, PII[n as usize % PII.len()], n % 10 == 0).encode_to_vec();
        let r = http
            .post(&otlp)
            .header("content-type", "application/x-protobuf")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    eventually("every trace is decided", WAIT, async || {
        decided(&stack).await >= (RUNS + 1) as f64
    })
    .await;

    // What the sender kept: every error, the failed task's trace, and the healthy runs the
    // trace id picks at 20 %.
    let kept_a = kept(&stack.commander).await;
    let expected: BTreeSet<String> = (0..RUNS)
        .filter(|n| {
            let id: [u8; 16] = trace_id(*n).try_into().unwrap();
            n % 10 == 0 || fleet_commander::traces::sample::kept_at(&id, 0.2)
        })
        .map(|n| hex(&trace_id(n)))
        .collect();
    let task_trace =
        stack.get_json(&format!("/v1/tasks/{task_id}")).await["kept_trace"]["trace_id"]
            .as_str()
            .expect("the failed task's record links its kept trace")
            .to_string();
    assert!(expected.len() < RUNS as usize / 2, "{}", expected.len());
    let mut want = expected.clone();
    want.insert(task_trace.clone());
    assert_eq!(kept_a, want);
    let decision = stack.get_json(&format!("/v1/decisions/{task_id}")).await;
    assert_eq!(decision["kept_trace"]["trace_id"], task_trace.as_str());
    let tree = stack.get_json(&format!("/v1/traces/{task_trace}")).await;
    assert!(
        tree["why"]
            .as_array()
            .unwrap()
            .contains(&"task_failed".into()),
        "{tree}"
    );
    assert_eq!(tree["tasks"][0]["task_id"], task_id.as_str());
    let names: Vec<&str> = tree["span_tree"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(names.iter().any(|n| n.contains("send_mail")), "{names:?}");
    // The trace starts at the commander: its dispatch span, the worker's run under it.
    let spans = tree["span_tree"].as_array().unwrap();
    let send = spans
        .iter()
        .find(|s| s["name"] == "send fleet.work.code")
        .unwrap_or_else(|| panic!("the commander's dispatch span is kept: {names:?}"));
    assert_eq!(send["attributes"]["fleet.task.id"], task_id.as_str());
    assert_eq!(send["attributes"]["fleet.pool"], "code");
    // Every attribute docs/rubrics.md lists for it.
    for key in [
        "fleet.attempt",
        "fleet.decision.id",
        "fleet.route.rule",
        "fleet.task.type",
        "fleet.task.tier",
        "fleet.classification.source",
        "fleet.decision.candidates",
        "gen_ai.request.model",
        "fleet.intake.sequence",
        "messaging.destination.name",
    ] {
        assert!(!send["attributes"][key].is_null(), "{key} on {send}");
    }
    assert_eq!(
        send["attributes"]["fleet.decision.id"], decision["id"],
        "{decision}"
    );
    let process = spans
        .iter()
        .find(|s| s["kind"] == "consumer")
        .expect("the worker's run");
    assert_eq!(process["parent_span_id"], send["span_id"]);
    assert_eq!(
        process["depth"].as_u64().unwrap(),
        send["depth"].as_u64().unwrap() + 1
    );
    assert_eq!(tree["spans"].as_u64().unwrap() as usize, spans.len());
    assert!(
        !tree.to_string().contains("ops@example.org"),
        "redacted before storage"
    );
    let run0 = stack
        .get_json(&format!("/v1/traces/{}", hex(&trace_id(0))))
        .await;
    assert_eq!(run0["spans"], 3, "{run0}");
    assert_eq!(
        run0["span_tree"][0]["name"], "send fleet.work.code",
        "{run0}"
    );

    // The receivers get exactly those traces, redacted.
    eventually(
        "the second commander holds every kept trace",
        WAIT,
        async || kept(&receiver).await == want,
    )
    .await;
    eventually("the collector holds every kept trace", WAIT, async || {
        collected.lock().unwrap().traces == want
    })
    .await;
    for t in &want {
        let a: Value = stack.get_json(&format!("/v1/traces/{t}")).await;
        let b: Value = reqwest::get(format!("{}/v1/traces/{t}", receiver.http()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(a["spans"], b["spans"], "{t}: every span arrived");
        assert_eq!(a["input_tokens"], b["input_tokens"], "{t}: figures kept");
        let text = b.to_string();
        for pii in PII.iter().chain(&["ops@example.org"]) {
            assert!(!text.contains(pii), "{pii} reached the receiver: {text}");
        }
    }
    {
        let c = collected.lock().unwrap();
        assert_eq!(c.bad_auth, 0, "the header from headers_env on every export");
        assert!(c.requests >= 2, "retried after the 503");
        for body in &c.bodies {
            for pii in PII {
                assert!(!body.contains(pii), "{pii} reached the collector");
            }
        }
    }
    let sample = |endpoint: &str, outcome: &str| {
        format!("fleet_trace_export_spans_total{{endpoint=\"{endpoint}\",outcome=\"{outcome}\"}}")
    };
    eventually(
        "the unreachable endpoint's spans are counted as dropped",
        WAIT,
        async || stack.metric(&sample("nowhere", "dropped_failed")).await > 0.0,
    )
    .await;
    assert!(stack.metric(&sample("second", "sent")).await > 0.0);
    assert_eq!(stack.metric(&sample("second", "dropped_failed")).await, 0.0);
    assert!(
        stack
            .metric("fleet_trace_export_retries_total{endpoint=\"collector\",outcome=\"retry\"}")
            .await
            >= 1.0
    );
    assert!(
        stack
            .metric("fleet_trace_redactions_total{rule=\"email\"}")
            .await
            > 0.0
    );
    // The live state saw every run, kept or not.
    let fleet = stack.get_json("/v1/workers?pool=code").await;
    assert!(fleet["total"].as_u64().unwrap() >= 3, "{fleet}");
    // ... and no commander among the workers.
    let all = stack.get_json("/v1/workers").await;
    assert!(!all.to_string().contains("fleet-commander"), "{all}");
}

/// A NATS server and commanders that keep every trace and export to one collector.
struct KeepAll {
    nats: NatsServer,
    dir: tempfile::TempDir,
    config: String,
}

impl KeepAll {
    /// `traces`: the `[traces]` settings; `export`: the endpoint's further settings.
    fn new(collector_url: &str, traces: &str, export: &str) -> Self {
        let nats = NatsServer::start().expect("nats-server");
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(
            policies.join("keep.policy.toml"),
            "[sampling]\nhealthy_rate = 1.0\n",
        )
        .unwrap();
        let config = format!(
            r#"
[routing]
default_pool = "code"
[pools.code]
capabilities = ["code"]
[policy]
dir = {policies:?}
[traces]
{traces}
[[traces.export]]
name = "collector"
protocol = "http"
endpoint = "{collector_url}"
headers_env = {{ authorization = "COLLECTOR_AUTH" }}
{export}
"#
        );
        KeepAll { nats, dir, config }
    }

    fn start(&self, name: &str) -> Commander {
        let mut o = commander_options(&self.nats, self.dir.path().join(name), &self.config);
        o.extra_env = vec![("COLLECTOR_AUTH".into(), "Bearer test-key".into())];
        Commander::start(&o).expect("commander")
    }
}

/// Each trace the collector has came with its two spans once, not once per replica.
fn each_trace_once(collected: &Mutex<Collected>) {
    let c = collected.lock().unwrap();
    assert!(c.spans.values().all(|&n| n == 2), "{:?}", c.spans);
}

/// Agents' runs `runs` on NATS, which every replica reads.
async fn send_runs(client: &async_nats::Client, runs: std::ops::Range<u64>) {
    for n in runs {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Fleet-Kind", "otlp-traces");
        let body = agent_run(n, "nothing personal", false).encode_to_vec();
        client
            .publish_with_headers("fleet.telemetry.code.helper-1", headers, body.into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
}

/// Two replicas on one NATS read the same telemetry and keep the same traces; the one that
/// leads exports them (docs/traces.md, "Several replicas"): each kept trace reaches the
/// collector once, not once per replica. When the leader dies, the other takes the lead
/// and exports what it kept before it led, so the traces of the lease's last seconds are
/// not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_export_each_kept_trace_once_and_the_survivor_takes_over() {
    let (collector_url, collected) = collector().await;
    let fleet = KeepAll::new(
        &collector_url,
        "decision_wait_ms = 300",
        "batch_delay_ms = 100",
    );
    let mut replicas = [fleet.start("a"), fleet.start("b")];
    let apis: Vec<String> = replicas.iter().map(|c| c.http().to_string()).collect();
    let leader = leader_of(&apis).await;
    let client = async_nats::connect(fleet.nats.url()).await.unwrap();
    let spans_sent = async || {
        let sent = "fleet_trace_export_spans_total{endpoint=\"collector\",outcome=\"sent\"}";
        metric_at(&apis[0], sent).await + metric_at(&apis[1], sent).await
    };

    send_runs(&client, 0..20).await;
    eventually("both replicas keep the 20 traces", WAIT, async || {
        kept(&replicas[0]).await.len() == 20 && kept(&replicas[1]).await.len() == 20
    })
    .await;
    eventually("the collector has them", WAIT, async || {
        collected.lock().unwrap().traces.len() == 20
    })
    .await;
    // A second copy would come as soon (batched every 100 ms, and a 503 retried after 1 s).
    // The wait also puts these traces well before the leader's last renewal, which the
    // survivor will have heard: it exports only what the leader may not have sent.
    tokio::time::sleep(Duration::from_secs(5)).await;
    each_trace_once(&collected);
    assert_eq!(spans_sent().await, 40.0, "sent by one replica");

    // The leader dies; runs go on. The survivor keeps them while the lease runs out, then
    // leads and exports them.
    replicas[leader].kill9();
    let survivor = 1 - leader;
    send_runs(&client, 100..120).await;
    eventually(
        "the survivor exports the traces it kept before it led",
        WAIT,
        async || collected.lock().unwrap().traces.len() == 40,
    )
    .await;
    eventually("the survivor leads", WAIT, async || {
        metric_at(&apis[survivor], "fleet_alerts_leader").await == 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    each_trace_once(&collected);
    assert_eq!(collected.lock().unwrap().bad_auth, 0);
}

/// A commander that stops cleanly decides the traces still assembling and sends them, and
/// what its export queues hold, before it exits (docs/traces.md, "Export downstream").
/// Before, each endpoint's task stopped at the signal: the keeper's last decisions found
/// its queue closed and were counted `dropped_queue_full`, and none was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn traces_still_assembling_at_shutdown_are_kept_and_exported() {
    let (collector_url, collected) = collector_busy_first(false).await;
    // A minute's wait for late children: every trace is still assembling at the stop.
    let fleet = KeepAll::new(&collector_url, "decision_wait_ms = 60000", "");
    let mut commander = fleet.start("cmd");
    let api = commander.http().to_string();
    eventually("the commander leads (it exports)", WAIT, async || {
        metric_at(&api, "fleet_alerts_leader").await == 1.0
    })
    .await;
    let client = async_nats::connect(fleet.nats.url()).await.unwrap();
    send_runs(&client, 0..10).await;
    eventually("the keeper holds their 20 spans", WAIT, async || {
        metric_at(&api, "fleet_trace_spans_total{outcome=\"held\"}").await >= 20.0
    })
    .await;
    assert!(kept(&commander).await.is_empty(), "none decided yet");
    assert!(collected.lock().unwrap().traces.is_empty());

    assert_eq!(commander.terminate(WAIT), Some(0));
    let c = collected.lock().unwrap();
    assert_eq!(c.traces.len(), 10, "every trace sent before the exit");
    assert!(c.spans.values().all(|&n| n == 2), "{:?}", c.spans);
    assert_eq!(c.bad_auth, 0);
}
