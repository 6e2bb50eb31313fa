//! Telemetry in, live state out: SDK workers over NATS, OTLP over gRPC and HTTP, and bad
//! input on every transport, through the real commander binary.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use fleet_worker::message::ResultStatus;
use fleet_worker::{
    Baggage, LlmCall, Producer, Subjects, SubmitOptions, Task, TaskContext, TaskOutput, ToolCall,
    Worker, WorkerConfig,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use serde_json::Value;

use crate::common::{Stack, WAIT, commander_options, eventually, metric_at};

const POOLS: &str = r#"
[pools.code]
capabilities = ["code"]
"#;

/// GET as JSON, or `null` while the resource does not exist yet (for `eventually`).
async fn get_or_null(stack: &Stack, path: &str) -> Value {
    let r = reqwest::get(stack.http(path)).await.unwrap();
    if r.status() == reqwest::StatusCode::NOT_FOUND {
        return Value::Null;
    }
    assert!(r.status().is_success(), "GET {path}: {}", r.status());
    r.json().await.unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sdk_worker_spans_and_heartbeats_drive_the_live_state() {
    const TASKS: usize = 20;
    let stack = Stack::start(POOLS).await;
    let mut cfg = WorkerConfig::new("code", "coder-1");
    cfg.max_in_flight = 4;
    cfg.heartbeat_interval = Duration::from_millis(500);
    cfg.model = Some("claude-sonnet-4-5".into());
    cfg.export.flush_interval = Duration::from_millis(50);
    let worker = Worker::start(stack.client.clone(), cfg, |ctx: TaskContext| async move {
        let t = ToolCall::new("read_file");
        tokio::time::sleep(Duration::from_millis(5)).await;
        ctx.telemetry.tool_call(&t.finish());
        let c = LlmCall::chat("anthropic", "claude-sonnet-4-5-20250929").tokens(1_000, 200);
        tokio::time::sleep(Duration::from_millis(5)).await;
        ctx.telemetry.llm_call(&c.finish());
        Ok(TaskOutput::default())
    })
    .await
    .unwrap();

    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut inbox = producer.result_inbox().await.unwrap();
    for i in 0..TASKS {
        let mut task = Task::new(format!("refactor module {i}"));
        task.capabilities = vec!["code".into()];
        task.expected_duration_s = Some(30.0);
        task.attributes
            .insert("task_type".into(), "code_generation".into());
        let mut baggage = Baggage::new();
        baggage.insert("team", if i % 2 == 0 { "search" } else { "ads" });
        baggage.insert("feature", "refactor");
        producer
            .submit(
                &task,
                SubmitOptions {
                    baggage,
                    reply_to: Some(inbox.subject().to_string()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    for _ in 0..TASKS {
        let r = tokio::time::timeout(WAIT, inbox.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(r.status, ResultStatus::Ok);
    }

    // Sonnet 4.5: 1,000 × $3 + 200 × $15 per 1M = $0.006 per task.
    let per_task = 0.006;
    let mut last = Value::Null;
    eventually(
        "the worker's 20 runs are in the live state",
        WAIT,
        async || {
            last = stack.get_json("/v1/workers?pool=code").await;
            last["workers"][0]["tasks_completed"] == TASKS
        },
    )
    .await;
    let w = &last["workers"][0];
    assert_eq!(last["total"], 1);
    assert_eq!(w["id"], "coder-1");
    assert_eq!(w["pool"], "code");
    assert_eq!(w["state"], "IDLE");
    assert_eq!(w["lost"], false);
    // The registry's name, and the dated snapshot the spans reported beside it.
    assert_eq!(w["model"], "claude-sonnet-4-5");
    assert_eq!(w["model_reported"], "claude-sonnet-4-5-20250929");
    assert_eq!(w["model_unknown"], false);
    assert_eq!(w["provider"], "anthropic");
    assert_eq!(w["input_tokens"], 1_000 * TASKS);
    assert_eq!(w["output_tokens"], 200 * TASKS);
    assert!(
        close(w["cost_usd"].as_f64().unwrap(), per_task * TASKS as f64),
        "{w}"
    );
    assert!(
        close(w["cost_per_task_usd"].as_f64().unwrap(), per_task),
        "{w}"
    );
    assert_eq!(w["context_limit_tokens"], 200_000);
    assert!(close(w["context_utilisation"].as_f64().unwrap(), 0.005));
    assert_eq!(w["max_in_flight"], 4);
    assert_eq!(w["sdk_version"], env!("CARGO_PKG_VERSION"));
    assert!(w["burn_rate_usd_per_h"].as_f64().unwrap() > 0.0);

    let detail = stack.get_json("/v1/workers/coder-1").await;
    assert_eq!(detail["tools"]["read_file"]["calls"], TASKS);
    assert_eq!(detail["tools"]["read_file"]["success_rate"], 1.0);
    assert_eq!(detail["recent_tasks"].as_array().unwrap().len(), TASKS);
    assert_eq!(detail["recent_tasks"][0]["task_type"], "code_generation");
    assert_eq!(detail["recent_tasks"][0]["steps"], 2);
    assert_eq!(detail["series"].as_array().unwrap().len(), 360);
    let r = reqwest::get(stack.http("/v1/workers/nobody"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Costs by the baggage dimensions.
    let costs = stack.get_json("/v1/costs?by=team,feature&window=1h").await;
    let rows = costs["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{costs}");
    for row in rows {
        assert_eq!(row["group"]["feature"], "refactor");
        assert!(
            close(row["cost_usd"].as_f64().unwrap(), per_task * 10.0),
            "{row}"
        );
        assert_eq!(row["calls"], 10);
    }
    assert!(close(costs["total_usd"].as_f64().unwrap(), per_task * 20.0));
    let bad = reqwest::get(stack.http("/v1/costs?by=colour"))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let bad = reqwest::get(stack.http("/v1/costs?window=forever"))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // Pools: the commander's own numbers (dispatch latency, results) and the queue.
    let mut pools = Value::Null;
    eventually("pool figures", WAIT, async || {
        pools = stack.get_json("/v1/pools").await;
        pools["pools"][0]["queue"].is_object()
    })
    .await;
    let p = &pools["pools"][0];
    assert_eq!(p["name"], "code");
    assert_eq!(p["configured"], true);
    assert_eq!(p["workers"], 1);
    assert_eq!(p["tasks_per_min"], TASKS);
    assert_eq!(p["dispatch_latency_ms"]["count"], TASKS);
    let q = |k: &str| p["dispatch_latency_ms"][k].as_f64().unwrap_or(f64::NAN);
    assert!(
        q("p50") <= q("p95") && q("p95") <= q("p99") && q("p99") < 60_000.0,
        "quantiles in order and within the test's minute: {}",
        p["dispatch_latency_ms"]
    );
    assert_eq!(p["queue"]["depth"], 0);
    assert_eq!(p["capacity"], 4);

    // Fleet overview.
    let f = stack.get_json("/v1/fleet?series=5m").await;
    assert_eq!(f["workers"], 1);
    assert_eq!(f["states"]["IDLE"], 1);
    assert_eq!(f["models"][0]["model"], "claude-sonnet-4-5");
    assert_eq!(f["models"][0]["share"], 1.0);
    let tt = &f["task_types"][0];
    assert_eq!(tt["task_type"], "code_generation");
    assert_eq!(tt["tasks"], TASKS);
    assert!((tt["cost_usd"]["p50"].as_f64().unwrap() - per_task).abs() < per_task * 0.02);
    assert!((tt["depth"]["p99"].as_f64().unwrap() - 2.0).abs() < 0.05);
    assert!(close(
        f["cost_last_hour_usd"].as_f64().unwrap(),
        per_task * 20.0
    ));
    assert_eq!(f["series"].as_array().unwrap().len(), 30);
    assert!(f["projected_monthly_usd"].as_f64().unwrap() > 0.0);

    // Counted on /metrics.
    assert!(
        stack
            .metric(r#"fleet_telemetry_items_total{transport="nats",signal="traces",outcome="accepted"}"#)
            .await
            >= (3 * TASKS) as f64
    );
    assert_eq!(stack.metric(r#"fleet_workers{state="IDLE"}"#).await, 1.0);
    worker.shutdown().await;
}

fn s(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

fn i(k: &str, v: i64) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(v)),
        }),
        ..Default::default()
    }
}

fn chat_span(trace: u8, span: u8, model: &str) -> Span {
    Span {
        trace_id: vec![trace; 16],
        span_id: vec![span; 8],
        parent_span_id: vec![9; 8],
        name: format!("chat {model}"),
        kind: 3,
        start_time_unix_nano: 1,
        end_time_unix_nano: 2,
        attributes: vec![
            s("gen_ai.operation.name", "chat"),
            s("gen_ai.system", "openai"),
            s("gen_ai.request.model", model),
            i("gen_ai.usage.prompt_tokens", 1_000),
            i("gen_ai.usage.completion_tokens", 100),
        ],
        ..Default::default()
    }
}

fn export(worker: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![s("service.name", worker)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// A message whose field 1 is not a valid ResourceSpans: undecodable as a trace export.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbage {
    #[prost(bytes = "vec", tag = "1")]
    junk: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn otlp_receivers_answer_bad_input_with_otlp_codes_and_keep_the_rest() {
    // Its spans name parents that are never sent: they wait for them (to learn their
    // agent) only briefly here.
    let stack = Stack::start(&format!(
        "{POOLS}\n[telemetry]\nmax_request_bytes = 65536\n[fleet]\nidentity_wait_ms = 500\n"
    ))
    .await;
    let grpc = stack.commander.otlp_grpc().unwrap().to_string();
    let http = stack.commander.otlp_http().unwrap().to_string();
    let mut client = TraceServiceClient::connect(grpc.clone()).await.unwrap();

    // One good span and one without ids: the good one is taken, the other reported.
    let mut bad = chat_span(1, 2, "gpt-4o");
    bad.span_id = vec![];
    let resp = client
        .export(export("grpc-agent", vec![chat_span(1, 1, "gpt-4o"), bad]))
        .await
        .unwrap()
        .into_inner();
    let ps = resp.partial_success.unwrap();
    assert_eq!(ps.rejected_spans, 1);
    assert!(ps.error_message.contains("span_id"), "{}", ps.error_message);
    // An all-good export leaves partial_success unset.
    let resp = client
        .export(export("grpc-agent", vec![chat_span(2, 1, "gpt-4o")]))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.partial_success.is_none());

    // Undecodable protobuf → INVALID_ARGUMENT.
    let mut raw = tonic::client::Grpc::new(
        tonic::transport::Endpoint::from_shared(grpc.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    raw.ready().await.unwrap();
    let err = raw
        .unary::<Garbage, ExportTraceServiceResponse, _>(
            tonic::Request::new(Garbage {
                junk: vec![0xff; 16],
            }),
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
                .parse()
                .unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // Over the 64 KiB limit → RESOURCE_EXHAUSTED, without retry info.
    let big: Vec<Span> = (0..2_000u32)
        .map(|n| chat_span(3, (n % 250) as u8 + 1, "gpt-4o"))
        .collect();
    let err = client
        .export(export("grpc-agent", big.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");

    let h = reqwest::Client::new();
    let post = |path: &str, ct: &str, body: Vec<u8>| {
        h.post(format!("{http}{path}"))
            .header("content-type", ct)
            .body(body)
    };
    // HTTP protobuf, gzip.
    let body = gzip(&export("http-agent", vec![chat_span(4, 1, "gpt-4o-mini")]).encode_to_vec());
    let r = post("/v1/traces", "application/x-protobuf", body)
        .header("content-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-protobuf");
    let parsed = ExportTraceServiceResponse::decode(r.bytes().await.unwrap()).unwrap();
    assert!(parsed.partial_success.is_none());
    // HTTP JSON (hex ids, string int64s), with a span missing its trace id.
    let json = serde_json::json!({
        "resourceSpans": [{
            "resource": { "attributes": [{ "key": "service.name", "value": { "stringValue": "json-agent" } }] },
            "scopeSpans": [{ "spans": [
                { "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
                  "parentSpanId": "eee19b7ec3c1b173", "name": "chat gemini-2.0-flash", "kind": 3,
                  "startTimeUnixNano": "1544712660000000000", "endTimeUnixNano": "1544712661000000000",
                  "attributes": [
                    { "key": "gen_ai.operation.name", "value": { "stringValue": "chat" } },
                    { "key": "gen_ai.request.model", "value": { "stringValue": "gemini-2.0-flash" } },
                    { "key": "gen_ai.usage.input_tokens", "value": { "intValue": "2000" } },
                    { "key": "gen_ai.usage.output_tokens", "value": { "intValue": 300 } }
                  ], "unknownField": true },
                { "spanId": "eee19b7ec3c1b175", "name": "no trace id" }
            ]}]
        }]
    });
    let r = post(
        "/v1/traces",
        "application/json",
        serde_json::to_vec(&json).unwrap(),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let rejected = &v["partialSuccess"]["rejectedSpans"];
    assert!(rejected == "1" || rejected == 1, "{v}");
    // Bad bodies.
    for (ct, body, status) in [
        ("application/x-protobuf", vec![0xff, 0xff, 0xff], 400),
        ("application/json", b"{not json".to_vec(), 400),
        ("text/plain", b"hello".to_vec(), 415),
        (
            "application/x-protobuf",
            export("http-agent", big.clone()).encode_to_vec(),
            413,
        ),
    ] {
        let r = post("/v1/traces", ct, body).send().await.unwrap();
        assert_eq!(r.status(), status, "{ct}");
        if status == 400 && ct == "application/json" {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["code"], 3);
            assert!(v["message"].as_str().unwrap().contains("JSON"));
        }
    }
    // Small compressed, huge decompressed: refused after decompression.
    let bomb = gzip(&vec![0u8; 1 << 20]);
    let r = post("/v1/traces", "application/x-protobuf", bomb)
        .header("content-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = post("/v1/traces", "application/x-protobuf", vec![])
        .header("content-encoding", "br")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);

    // NATS: garbage heartbeat, garbage OTLP, unknown kind.
    for (kind, payload) in [
        ("heartbeat", b"{\"worker_id\":".to_vec()),
        ("otlp-traces", vec![0xff, 0x01]),
        ("mystery", b"x".to_vec()),
    ] {
        let mut hm = async_nats::HeaderMap::new();
        hm.insert("Fleet-Kind", kind);
        stack
            .client
            .publish_with_headers("fleet.telemetry.code.junk", hm, payload.into())
            .await
            .unwrap();
    }
    stack.client.flush().await.unwrap();

    // What was good is there, priced, and nothing else changed.
    let mut workers: HashMap<String, Value> = HashMap::new();
    eventually("three agents from three transports", WAIT, async || {
        let v = stack.get_json("/v1/workers").await;
        workers = v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| (w["id"].as_str().unwrap().to_string(), w.clone()))
            .collect();
        workers.len() == 3
            && workers
                .get("grpc-agent")
                .is_some_and(|w| w["input_tokens"] == 2_000)
    })
    .await;
    assert_eq!(workers["http-agent"]["model"], "gpt-4o-mini");
    // Gemini 2.0 Flash: 2,000 × $0.075 + 300 × $0.30 per 1M.
    assert!(close(
        workers["json-agent"]["cost_usd"].as_f64().unwrap(),
        (2_000.0 * 0.075 + 300.0 * 0.30) / 1e6
    ));
    assert!(!workers.contains_key("junk"));
    let rejected = stack
        .metric(
            r#"fleet_telemetry_items_total{transport="http",signal="traces",outcome="rejected"}"#,
        )
        .await;
    assert!(rejected >= 5.0, "{rejected}");
    eventually("NATS rejections counted", WAIT, async || {
        stack
            .metric(r#"fleet_telemetry_items_total{transport="nats",signal="heartbeats",outcome="rejected"}"#)
            .await
            == 1.0
            && stack
                .metric(r#"fleet_telemetry_items_total{transport="nats",signal="unknown",outcome="rejected"}"#)
                .await
                == 1.0
    })
    .await;
    // Core NATS has no answer to give: the log says why, once for the burst (the other
    // two came within 10 s, so they are at debug).
    let refused: Vec<String> = stack
        .commander
        .log_text()
        .lines()
        .filter(|l| l.contains("telemetry message refused"))
        .map(str::to_string)
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("WARN")
            && refused[0].contains("fleet.telemetry.code.junk")
            && refused[0].contains("heartbeat JSON"),
        "{}",
        refused[0]
    );
    // A heartbeat with only the four fields docs/protocol.md §5.3 requires is a worker;
    // one whose max_in_flight no worker can have is dropped and counted.
    for (id, extra) in [("py-min", ""), ("py-huge", r#", "max_in_flight": 20000"#)] {
        let mut hm = async_nats::HeaderMap::new();
        hm.insert("Fleet-Kind", "heartbeat");
        let body = format!(
            r#"{{"schema": 1, "worker_id": "{id}", "pool": "code", "state": "idle"{extra}}}"#
        );
        stack
            .client
            .publish_with_headers(format!("fleet.telemetry.code.{id}"), hm, body.into())
            .await
            .unwrap();
    }
    eventually(
        "the minimal heartbeat's worker is there",
        WAIT,
        async || {
            get_or_null(&stack, "/v1/workers/py-min").await["state"] == "IDLE"
                && stack.metric("fleet_heartbeats_invalid_total").await == 1.0
        },
    )
    .await;
    assert_eq!(
        stack
            .get("/v1/workers/py-huge")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // The task path is untouched.
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut t = Task::new("still works");
    t.capabilities = vec!["code".into()];
    producer.submit(&t, SubmitOptions::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_registry_edits_apply_live_and_bad_edits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("models.toml");
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/models.toml"
    ))
    .unwrap();
    std::fs::write(&path, &shipped).unwrap();
    // Its spans name a parent that is never sent: they wait for it (to learn their agent)
    // only briefly here, not the default minute.
    let stack = Stack::start(&format!(
        "[telemetry]\nmodel_registry = {path:?}\n[fleet]\nidentity_wait_ms = 500\n"
    ))
    .await;
    let v = stack.get_json("/v1/models").await;
    let n = v["models"].as_array().unwrap().len();
    assert_eq!(v["source"], path.display().to_string());
    assert!(v["last_reload_error"].is_null());

    // An unknown model is flagged, its cost unknown, not zero.
    let http = stack.commander.otlp_http().unwrap().to_string();
    let send = |trace: u8| {
        let body = export("house-agent", vec![chat_span(trace, 1, "house-model")]).encode_to_vec();
        reqwest::Client::new()
            .post(format!("{http}/v1/traces"))
            .header("content-type", "application/x-protobuf")
            .body(body)
            .send()
    };
    assert_eq!(send(1).await.unwrap().status(), 200);
    let mut w = Value::Null;
    eventually("the house agent", WAIT, async || {
        w = get_or_null(&stack, "/v1/workers/house-agent").await;
        w["unknown_cost_calls"] == 1
    })
    .await;
    assert_eq!(w["model_unknown"], true);
    assert_eq!(w["cost_usd"], 0.0);

    // Add the model: the running commander picks it up.
    let added = format!(
        "{shipped}\n[[model]]\nname = \"house-model\"\nprovider = \"openai\"\ncontext_window = 32000\ntier = \"economy\"\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n"
    );
    std::fs::write(&path, &added).unwrap();
    eventually("the new model is live", WAIT, async || {
        stack.get_json("/v1/models").await["models"]
            .as_array()
            .unwrap()
            .len()
            == n + 1
    })
    .await;
    assert_eq!(send(2).await.unwrap().status(), 200);
    eventually("the call is priced", WAIT, async || {
        let w = get_or_null(&stack, "/v1/workers/house-agent").await;
        // 1,000 × $1 + 100 × $2 per 1M (old-style prompt/completion token names).
        w["cost_usd"].as_f64().is_some_and(|c| close(c, 0.0012)) && w["model_unknown"] == false
    })
    .await;

    // A broken edit is refused with file and line; the last good registry stays.
    std::fs::write(
        &path,
        format!("{added}\n[[model]]\nname = \"x\"\nprise = 3\n"),
    )
    .unwrap();
    let mut v = Value::Null;
    eventually("the rejection is visible", WAIT, async || {
        v = stack.get_json("/v1/models").await;
        v["last_reload_error"].is_string()
    })
    .await;
    let err = v["last_reload_error"].as_str().unwrap();
    assert!(
        err.contains(&format!("{}:", path.display())) && err.contains("prise"),
        "{err}"
    );
    assert_eq!(v["models"].as_array().unwrap().len(), n + 1);
}

/// OTLP sent to one commander replica reaches every replica (docs/protocol.md §3, "Several
/// commander replicas"): each passes the exports its live state took on over NATS while
/// another replica runs, so every replica's workers, costs and alerts cover the whole
/// fleet. Before, OTLP sent to one replica was seen by that replica alone. A lone
/// commander passes nothing on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn otlp_sent_to_one_replica_is_seen_by_every_replica() {
    // Its spans name a parent that is never sent: they wait for it (to learn their agent)
    // only briefly here.
    let config = format!("{POOLS}\n[fleet]\nidentity_wait_ms = 500\n");
    let a = Stack::start(&config).await;
    let a_api = a.commander.http().to_string();
    let a_otlp = a.commander.otlp_http().unwrap().to_string();
    let send = async |otlp: &str, worker: &str, trace: u8| {
        let body = export(worker, vec![chat_span(trace, 1, "gpt-4o")]).encode_to_vec();
        let r = reqwest::Client::new()
            .post(format!("{otlp}/v1/traces"))
            .header("content-type", "application/x-protobuf")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    };
    let known = async |api: &str, worker: &str| {
        let r = reqwest::get(format!("{api}/v1/workers/{worker}"))
            .await
            .unwrap();
        r.status().is_success()
            && r.json::<Value>().await.unwrap()["cost_usd"]
                .as_f64()
                .is_some_and(|c| c > 0.0)
    };
    let relayed = async |api: &str| {
        metric_at(
            api,
            r#"fleet_telemetry_relayed_total{signal="traces",outcome="relayed"}"#,
        )
        .await
    };
    send(&a_otlp, "lone-agent", 1).await;
    eventually("a lone commander takes its OTLP", WAIT, async || {
        known(&a_api, "lone-agent").await
    })
    .await;
    assert_eq!(
        relayed(&a_api).await,
        0.0,
        "a lone commander passes nothing on"
    );

    let b = fleet_testkit::Commander::start(&commander_options(
        &a.nats,
        a.dir.path().join("replica-b"),
        &config,
    ))
    .expect("replica b");
    let (b_api, b_otlp) = (b.http().to_string(), b.otlp_http().unwrap().to_string());
    // Each replica looks for the other every 10 s: exports sent before it found it stay
    // where they were sent (each send is a new trace).
    let mut trace: u8 = 10;
    eventually("OTLP sent to b reaches a", WAIT, async || {
        trace = trace.wrapping_add(1);
        send(&b_otlp, "b-agent", trace).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        known(&a_api, "b-agent").await
    })
    .await;
    eventually("OTLP sent to a reaches b", WAIT, async || {
        trace = trace.wrapping_add(1);
        send(&a_otlp, "a-agent", trace).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        known(&b_api, "a-agent").await
    })
    .await;
    assert!(known(&b_api, "b-agent").await);
    assert!(relayed(&b_api).await >= 1.0);
    assert!(relayed(&a_api).await >= 1.0);
    // What a replica read from NATS is not passed on again: nothing goes round.
    let before = (relayed(&a_api).await, relayed(&b_api).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!((relayed(&a_api).await, relayed(&b_api).await), before);
}
