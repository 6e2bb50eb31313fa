//! Hostile input against the real binary: each finding of the black-box fuzzing run is a
//! regression test here. One policy push could brick policy updates and the next start;
//! one span could stop all telemetry; a reply subject could purge a stream; a body of
//! empty messages could cost gigabytes; some errors were not JSON.

use std::time::Duration;

use async_nats::HeaderMap;
use fleet_testkit::{Commander, NatsServer};
use fleet_worker::{Producer, ResultStatus, Subjects, SubmitOptions, Task};
use prost::Message;
use serde_json::{Value, json};

use crate::common::*;

const TOKEN: &str = "compliance-secret";

fn throttle_policy(rate: &str) -> String {
    format!(
        r#"description = "throttled alpha"

[[throttle]]
name = "alpha-rate"
scope = "pool"
match = "alpha"
tasks_per_s = {rate}
burst = 10
"#
    )
}

fn start_with_policy(nats: &NatsServer, dir: &std::path::Path) -> Commander {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    if !policies.join("main.policy.toml").exists() {
        std::fs::write(policies.join("main.policy.toml"), throttle_policy("50")).unwrap();
    }
    let config = format!("{TWO_POOLS}\n[policy]\ndir = {policies:?}\n");
    let mut opts = commander_options(nats, dir.join("cmd"), &config);
    opts.extra_env
        .push(("FLEET_COMPLIANCE_TOKEN".into(), TOKEN.into()));
    Commander::start(&opts).expect("commander")
}

async fn get(base: &str, path: &str) -> Value {
    reqwest::get(format!("{base}{path}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn put_policy(base: &str, toml: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .put(format!("{base}/v1/policy"))
        .bearer_auth(TOKEN)
        .header("fleet-identity", "mallory")
        .body(toml.to_string())
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn ready(base: &str) -> u16 {
    reqwest::get(format!("{base}/readyz"))
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_no_limiter_can_hold_is_refused_and_a_stored_one_does_not_stop_a_restart() {
    let nats = NatsServer::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let mut commander = start_with_policy(&nats, dir.path());
    let base = commander.http().to_string();
    assert_eq!(get(&base, "/v1/policy").await["version"], "v1");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let kv = js.get_key_value("fleet_policy").await.unwrap();
    let revision = kv.entry("active").await.unwrap().unwrap().revision;

    // The push of the finding: refused with file and line, never stored, audited.
    let bad = throttle_policy("1e-45");
    let (status, body) = put_policy(&base, &bad).await;
    assert_eq!(status, 422, "{body}");
    let errors = body["errors"].as_array().unwrap();
    assert!(
        errors.iter().any(|e| {
            let e = e.as_str().unwrap();
            e.contains(".toml:") && e.contains("tasks_per_s 1e-45")
        }),
        "{errors:?}"
    );
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/policy/check"))
        .body(bad.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422, "check calls it invalid too");
    assert_eq!(
        kv.entry("active").await.unwrap().unwrap().revision,
        revision,
        "nothing reached the bucket"
    );
    let history = get(&base, "/v1/policy/history").await;
    assert_eq!(history["records"][0]["accepted"], false);
    assert_eq!(get(&base, "/v1/policy").await["version"], "v1");

    // Policy updates still work.
    let (status, body) = put_policy(&base, &throttle_policy("40")).await;
    assert_eq!(
        (status, body["version"].as_str()),
        (200, Some("v2")),
        "{body}"
    );

    // A commander that validated less wrote the bad policy to the bucket: this one
    // refuses that version, says which, and keeps running on v2.
    let stored = json!({
        "documents": [{"name": "main.policy.toml", "text": bad}],
        "source": "http",
        "identity": "an older commander",
        "sha256": "0",
        "at": "2026-12-01T00:00:00Z",
    });
    let bad_rev = kv
        .put("active", serde_json::to_vec(&stored).unwrap().into())
        .await
        .unwrap();
    let refused = format!("v{bad_rev}");
    eventually("the stored version is refused", WAIT, async || {
        get(&base, "/v1/policy/history").await["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["refused_version"] == refused.as_str())
    })
    .await;
    assert_eq!(get(&base, "/v1/policy").await["version"], "v2");
    assert_eq!(ready(&base).await, 200);

    // A restart on the same stores starts, on the last good version, and is ready.
    commander.kill9();
    let mut commander = start_with_policy(&nats, dir.path());
    let base = commander.http().to_string();
    assert_eq!(ready(&base).await, 200);
    assert_eq!(get(&base, "/v1/policy").await["version"], "v2");
    assert!(
        commander.wait_for_log("running on the last good version", Duration::from_secs(10)),
        "{}",
        commander.log_text()
    );
    assert!(!commander.logged("panicked"), "{}", commander.log_text());

    // And the next push goes on top of the refused revision.
    let (status, body) = put_policy(&base, &throttle_policy("30")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], format!("v{}", bad_rev + 1));
    assert_eq!(commander.terminate(Duration::from_secs(20)), Some(0));
}

fn span_with_model(trace: u8, model: &str) -> Value {
    json!({
        "traceId": format!("{:032x}", u128::from(trace) + 1),
        "spanId": format!("{:016x}", u64::from(trace) + 1),
        "name": "chat",
        "kind": 3,
        "startTimeUnixNano": "1800000000000000000",
        "endTimeUnixNano": "1800000001000000000",
        "attributes": [
            {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
            {"key": "gen_ai.request.model", "value": {"stringValue": model}},
            {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "100"}},
            {"key": "gen_ai.usage.output_tokens", "value": {"intValue": "10"}}
        ]
    })
}

fn export_json(agent: &str, spans: Vec<Value>) -> Value {
    json!({"resourceSpans": [{
        "resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": agent}},
            {"key": "fleet.pool", "value": {"stringValue": "alpha"}}
        ]},
        "scopeSpans": [{"spans": spans}]
    }]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_ascii_or_huge_model_name_leaves_telemetry_flowing() {
    let stack = Stack::start(TWO_POOLS).await;
    let otlp = stack.commander.otlp_http().unwrap().to_string();
    let http = reqwest::Client::new();
    let huge = "m".repeat(65_536);
    for (i, model) in ["ééééééé", "日本語のテキスト", "é-2024-08-06", huge.as_str()]
        .into_iter()
        .enumerate()
    {
        let resp = http
            .post(format!("{otlp}/v1/traces"))
            .header("content-type", "application/json")
            .body(export_json("hostile-agent", vec![span_with_model(i as u8, model)]).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{model:.20}");
        // A full success leaves partialSuccess out (OTLP/JSON): `{}`.
        assert_eq!(resp.text().await.unwrap(), "{}");
    }
    // A heartbeat with a 65,536-character model, over NATS.
    let mut h = HeaderMap::new();
    h.insert("Fleet-Kind", "heartbeat");
    let now = fleet_worker::message::now_rfc3339();
    let hb = json!({"schema": 1, "worker_id": "hb-hostile", "pool": "alpha", "state": "idle",
                    "model": huge, "max_in_flight": 1, "started_at": now, "sent_at": now});
    stack
        .client
        .publish_with_headers("fleet.telemetry.alpha.hb-hostile", h, hb.to_string().into())
        .await
        .unwrap();

    // Telemetry still flows: a plain span afterwards shows up with its cost.
    let resp = http
        .post(format!("{otlp}/v1/traces"))
        .header("content-type", "application/json")
        .body(export_json("plain-agent", vec![span_with_model(50, "gpt-4o")]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    eventually("the plain agent is on the fleet view", WAIT, async || {
        let r = reqwest::get(stack.http("/v1/workers/plain-agent"))
            .await
            .unwrap();
        r.status() == 200
    })
    .await;
    eventually(
        "the heartbeat with the huge model is taken",
        WAIT,
        async || {
            reqwest::get(stack.http("/v1/workers/hb-hostile"))
                .await
                .unwrap()
                .status()
                == 200
        },
    )
    .await;
    for path in [
        "/v1/workers/hostile-agent",
        "/v1/costs?by=model",
        "/v1/fleet",
        "/readyz",
    ] {
        let r = reqwest::get(stack.http(path)).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
    assert_eq!(
        stack
            .metric("fleet_task_panics_total{task=\"fleet\"}")
            .await,
        0.0
    );
    assert!(
        !stack.commander.logged("panic"),
        "{}",
        stack.commander.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_subjects_outside_inboxes_are_refused_and_the_results_stream_keeps_its_messages() {
    let stack = Stack::start(TWO_POOLS).await;
    let (seen, worker) = watched_worker(&stack.client, "alpha", "a1", 8).await;
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    for i in 0..20 {
        let mut t = Task::new("fill the results stream");
        t.id = Some(format!("fill-{i}"));
        producer.submit(&t, SubmitOptions::default()).await.unwrap();
    }
    for i in 0..20 {
        let r = producer
            .await_result(&format!("fill-{i}"), WAIT)
            .await
            .unwrap();
        assert_eq!(r.status, ResultStatus::Ok);
    }
    let js = async_nats::jetstream::new(stack.client.clone());
    let results = || async {
        js.get_stream("FLEET_RESULTS")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    };
    let before = results().await;
    assert!(before >= 20);

    // A task naming each hostile subject is rejected, and nothing is published there.
    let hostile = [
        ("purge", "$JS.API.STREAM.PURGE.FLEET_RESULTS"),
        ("info", "$JS.API.STREAM.INFO.FLEET_INTAKE"),
        ("sys", "$SYS.REQ.SERVER.PING"),
        ("kv", "$KV.fleet_policy.active"),
        ("submit", "fleet.tasks.submit"),
        ("elsewhere", "orders.created"),
    ];
    for (id, subject) in hostile {
        let mut h = HeaderMap::new();
        h.insert("Fleet-Task-Id", id);
        h.insert("Fleet-Reply-To", subject);
        let body = json!({"schema": 1, "id": id, "description": "reply elsewhere"});
        js.publish_with_headers("fleet.tasks.submit", h, body.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    for (id, subject) in hostile {
        let r = producer.await_result(id, WAIT).await.unwrap();
        assert_eq!(r.status, ResultStatus::Rejected, "{id}");
        let err = r.error.unwrap();
        assert_eq!(err.code, "bad_reply_to", "{id}: {}", err.message);
        assert!(err.message.contains(subject), "{}", err.message);
    }
    // Every earlier result is still there, plus the six rejections.
    assert_eq!(results().await, before + hostile.len() as u64);
    assert_eq!(
        stack
            .metric("fleet_tasks_rejected_total{reason=\"bad_reply_to\"}")
            .await,
        hostile.len() as f64
    );

    // A result message that names a hostile reply subject is not forwarded there.
    let mut h = HeaderMap::new();
    h.insert("Fleet-Task-Id", "forged");
    h.insert("Fleet-Reply-To", "$JS.API.STREAM.PURGE.FLEET_RESULTS");
    let forged = json!({"schema": 1, "task_id": "forged", "status": "ok", "attempt": 1});
    js.publish_with_headers("fleet.results.forged", h, forged.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    eventually("the forged reply subject is refused", WAIT, async || {
        stack.metric("fleet_reply_to_refused_total").await >= 7.0
    })
    .await;
    assert_eq!(results().await, before + hostile.len() as u64 + 1);

    // An inbox still gets its result, and no handler ran for the refused tasks.
    let mut inbox = producer.result_inbox().await.unwrap();
    let receipt = producer
        .submit(
            &Task::new("reply to my inbox"),
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
    assert_eq!(r.task_id, receipt.task_id);
    assert_eq!(r.status, ResultStatus::Ok);
    assert_eq!(seen.lock().unwrap().runs.len(), 21);
    worker.shutdown().await;
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_amplification_body_is_refused_within_a_bounded_rss() {
    let stack = Stack::start(TWO_POOLS).await;
    let pid = stack.commander.pid().unwrap();
    let otlp = stack.commander.otlp_http().unwrap().to_string();
    let grpc = stack.commander.otlp_grpc().unwrap().to_string();
    // 8 MB of empty ResourceSpans: 4 million messages, ~400 MB if decoded.
    let mut body = Vec::with_capacity(8_000_000);
    for _ in 0..4_000_000 {
        body.extend_from_slice(&[0x0a, 0x00]);
    }
    let http = reqwest::Client::new();
    let before = rss_bytes(pid);
    for _ in 0..3 {
        let resp = http
            .post(format!("{otlp}/v1/traces"))
            .header("content-type", "application/x-protobuf")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 413);
        let status = RpcStatus::decode(resp.bytes().await.unwrap()).unwrap();
        assert_eq!(status.code, tonic::Code::ResourceExhausted as i32);
        assert!(status.message.contains("items"), "{}", status.message);
    }
    // The same over gRPC: RESOURCE_EXHAUSTED without RetryInfo (not retried).
    let mut raw = tonic::client::Grpc::new(
        tonic::transport::Endpoint::from_shared(grpc)
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .max_encoding_message_size(64 << 20);
    raw.ready().await.unwrap();
    let err = raw
        .unary::<RawBody, RpcStatus, _>(
            tonic::Request::new(RawBody {
                bytes: body.clone(),
            }),
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
                .parse()
                .unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    // OTLP/JSON of the same shape.
    let json = format!(
        r#"{{"resourceSpans":[{}]}}"#,
        vec!["{}"; 1_500_000].join(",")
    );
    let resp = http
        .post(format!("{otlp}/v1/traces"))
        .header("content-type", "application/json")
        .body(json)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    let after = rss_bytes(pid);
    // Refused before decoding: what remains is the bodies' buffers, not the
    // hundreds of megabytes their messages would have taken.
    let grown = after.saturating_sub(before);
    assert!(
        grown < 96 << 20,
        "RSS grew by {} MB ({} → {} MB)",
        grown >> 20,
        before >> 20,
        after >> 20
    );
    assert_eq!(ready(stack.commander.http()).await, 200);
}

/// The body of a hand-made gRPC request: the bytes as they are.
#[derive(Clone, Debug, Default, PartialEq)]
struct RawBody {
    bytes: Vec<u8>,
}

impl prost::Message for RawBody {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.bytes);
    }
    fn merge_field(
        &mut self,
        _tag: u32,
        _wire_type: prost::encoding::WireType,
        _buf: &mut impl bytes::Buf,
        _ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        Ok(())
    }
    fn encoded_len(&self) -> usize {
        self.bytes.len()
    }
    fn clear(&mut self) {
        self.bytes.clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_body_is_the_documented_json() {
    let stack = Stack::start(TWO_POOLS).await;
    let http = reqwest::Client::new();
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            http.get(stack.http("/v1/workers?limit=abc")),
            400,
            "bad_request",
        ),
        (
            http.get(stack.http("/v1/decisions?since=yesterday")),
            400,
            "bad_request",
        ),
        (
            http.get(stack.http("/v1/policy/history?limit=-1")),
            400,
            "bad_request",
        ),
        (http.get(stack.http("/v1/tasks/a%20b")), 400, "bad_request"),
        (http.get(stack.http("/v1/tasks/nope")), 404, "not_found"),
        (http.get(stack.http("/v1/nothing-here")), 404, "not_found"),
        (http.get(stack.http("/nothing-here")), 404, "not_found"),
        (http.get(stack.http("/ui/missing.js")), 404, "not_found"),
        (
            http.delete(stack.http("/v1/tasks")),
            405,
            "method_not_allowed",
        ),
        (
            http.post(stack.http("/v1/fleet")),
            405,
            "method_not_allowed",
        ),
        (
            http.post(stack.http("/v1/tasks")).body("{not json"),
            400,
            "bad_json",
        ),
        (
            http.post(stack.http("/v1/tasks"))
                .body(r#"{"schema":1,"description":"x","priority":99}"#),
            400,
            "invalid_task",
        ),
        (
            http.put(stack.http("/v1/policy")).body("x = 1"),
            403,
            "forbidden",
        ),
    ];
    // One byte over http.max_body_bytes (1 MiB by default): the server reads all of it
    // before it answers, so the answer is never cut short by an unread body.
    let resp = http
        .post(stack.http("/v1/tasks"))
        .body("x".repeat((1 << 20) + 1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");

    for (req, status, code) in cases {
        let req = req.build().unwrap();
        let what = format!("{} {}", req.method(), req.url());
        let resp = http.execute(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        assert!(ct.starts_with("application/json"), "{what}: {ct}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(!message.is_empty(), "{what}: {body}");
    }
}
