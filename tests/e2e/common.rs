//! Shared set-up for the end-to-end tests: a real nats-server, the real commander binary,
//! real workers (the SDK, in this process, over NATS), and a span collector.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_testkit::{Commander, CommanderOptions, NatsServer};
use fleet_worker::{Baggage, TaskContext, TaskOutput, Usage, Worker, WorkerConfig, WorkerHandle};
use futures::StreamExt;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;

pub const WAIT: Duration = Duration::from_secs(120);

pub fn commander_options(nats: &NatsServer, data_dir: PathBuf, toml: &str) -> CommanderOptions {
    CommanderOptions {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_commander")),
        nats_url: Some(nats.url().to_string()),
        config_toml: toml.to_string(),
        data_dir,
        extra_env: vec![],
        extra_args: vec![],
    }
}

/// Two pools, and a default.
pub const TWO_POOLS: &str = r#"
[routing]
default_pool = "alpha"
[pools.alpha]
capabilities = ["summarise"]
[pools.beta]
capabilities = ["code", "review"]
"#;

#[allow(
    dead_code,
    reason = "held so the server and temp dir live as long as the stack"
)]
pub struct Stack {
    pub nats: NatsServer,
    pub commander: Commander,
    pub client: async_nats::Client,
    pub dir: tempfile::TempDir,
    /// Sent as the bearer token by `get_json` and `metric` (a stack with `[[auth.tokens]]`).
    pub token: Option<String>,
}

impl Stack {
    pub async fn start(toml: &str) -> Stack {
        Self::start_with_env(toml, &[]).await
    }

    /// A stack whose commander also gets these environment variables (secrets).
    pub async fn start_with_env(toml: &str, env: &[(&str, &str)]) -> Stack {
        let nats = NatsServer::start().expect("nats-server");
        let dir = tempfile::tempdir().unwrap();
        let mut opts = commander_options(&nats, dir.path().join("cmd"), toml);
        opts.extra_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let commander = Commander::start(&opts).expect("commander");
        let client = async_nats::connect(nats.url()).await.unwrap();
        Stack {
            nats,
            commander,
            client,
            dir,
            token: None,
        }
    }

    /// The same stack, reading its API with this bearer token.
    pub fn with_token(mut self, token: &str) -> Stack {
        self.token = Some(token.to_string());
        self
    }

    /// GET `path` on the commander's API, with the stack's token.
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorised(reqwest::Client::new().get(self.http(path)))
    }

    /// POST to `path` on the commander's API, with the stack's token.
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorised(reqwest::Client::new().post(self.http(path)))
    }

    fn authorised(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub fn http(&self, path: &str) -> String {
        format!("{}{path}", self.commander.http())
    }

    /// GET `path` on the commander's API, as JSON (a non-2xx answer fails the test).
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let r = self.get(path).send().await.unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    /// Fetches /metrics and returns the value of one sample line (name with labels).
    pub async fn metric(&self, sample: &str) -> f64 {
        sample_value(&self.metrics_text().await, sample)
    }

    /// `/metrics` as text.
    pub async fn metrics_text(&self) -> String {
        self.get("/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// The value of one sample line (name with labels) of the `/metrics` of the API at `base`.
pub async fn metric_at(base: &str, sample: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    sample_value(&text, sample)
}

/// GET `path` on the API at `base`, as JSON (a non-2xx answer fails the test).
pub async fn get_json_at(base: &str, path: &str) -> serde_json::Value {
    let r = reqwest::get(format!("{base}{path}")).await.unwrap();
    assert!(r.status().is_success(), "GET {base}{path}: {}", r.status());
    r.json().await.unwrap()
}

/// The value of one sample line (name with labels) of a `/metrics` answer; 0 when absent.
pub fn sample_value(metrics: &str, sample: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// What handlers saw, shared with the test.
#[derive(Default)]
pub struct Seen {
    /// Handler runs per (task id, attempt).
    pub runs: HashMap<(String, u32), u32>,
    pub baggage: HashMap<String, Baggage>,
    /// The worker's process span context and its parent, per task.
    pub spans: HashMap<String, (String, Option<String>)>,
    /// When each handler run began, in order.
    pub starts: Vec<Instant>,
}

impl Seen {
    /// Handler runs per task id, over all attempts.
    pub fn runs_per_task(&self) -> HashMap<String, u32> {
        let mut out: HashMap<String, u32> = HashMap::new();
        for ((id, _), n) in &self.runs {
            *out.entry(id.clone()).or_default() += n;
        }
        out
    }
}

pub type SeenLog = Arc<Mutex<Seen>>;

/// A worker that records what it sees and answers after `delay`.
pub async fn recording_worker(
    client: &async_nats::Client,
    pool: &str,
    id: &str,
    concurrency: usize,
    delay: Duration,
    seen: SeenLog,
) -> WorkerHandle {
    let mut cfg = WorkerConfig::new(pool, id);
    cfg.max_in_flight = concurrency;
    cfg.heartbeat_interval = Duration::from_secs(1);
    Worker::start(client.clone(), cfg, move |ctx: TaskContext| {
        let seen = seen.clone();
        async move {
            {
                let mut s = seen.lock().unwrap();
                *s.runs
                    .entry((ctx.task_id.clone(), ctx.attempt))
                    .or_default() += 1;
                s.starts.push(Instant::now());
                s.baggage.insert(ctx.task_id.clone(), ctx.baggage.clone());
                s.spans.insert(
                    ctx.task_id.clone(),
                    (
                        ctx.span.trace_id.to_hex(),
                        ctx.parent_span_id.map(|p| p.to_hex()),
                    ),
                );
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(TaskOutput {
                output: serde_json::json!({ "echo": ctx.task.description }),
                usage: Some(Usage {
                    model: Some("gpt-4o-mini".into()),
                    input_tokens: 10,
                    output_tokens: 5,
                    cost_usd: None,
                }),
            })
        }
    })
    .await
    .expect("worker starts")
}

/// One recording worker that answers at once, and the log of what it saw.
pub async fn watched_worker(
    client: &async_nats::Client,
    pool: &str,
    id: &str,
    concurrency: usize,
) -> (SeenLog, WorkerHandle) {
    let seen = SeenLog::default();
    let worker =
        recording_worker(client, pool, id, concurrency, Duration::ZERO, seen.clone()).await;
    (seen, worker)
}

/// Two recording workers in each of the pools of [`TWO_POOLS`].
pub async fn two_workers_per_pool(
    client: &async_nats::Client,
    concurrency: usize,
    delay: Duration,
    seen: &SeenLog,
) -> Vec<WorkerHandle> {
    let mut workers = Vec::new();
    for (pool, id) in [
        ("alpha", "a1"),
        ("alpha", "a2"),
        ("beta", "b1"),
        ("beta", "b2"),
    ] {
        workers.push(recording_worker(client, pool, id, concurrency, delay, seen.clone()).await);
    }
    workers
}

/// A span as the tests need it.
#[derive(Clone, Debug)]
pub struct SeenSpan {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub kind: i32,
    pub attrs: HashMap<String, String>,
    pub service: String,
}

/// Collects every OTLP span published on the telemetry subjects.
pub async fn collect_spans(client: &async_nats::Client) -> Arc<Mutex<Vec<SeenSpan>>> {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let mut sub = client.subscribe("fleet.telemetry.>").await.unwrap();
    let out = spans.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let kind = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Fleet-Kind"))
                .map(|v| v.as_str().to_string());
            if kind.as_deref() != Some("otlp-traces") {
                continue;
            }
            let req = ExportTraceServiceRequest::decode(msg.payload.as_ref()).expect("valid OTLP");
            let mut got = Vec::new();
            for rs in req.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .find(|kv| kv.key == "service.name")
                    .map(|kv| attr_string(kv.value.as_ref()))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        got.push(SeenSpan {
                            trace_id: hex(&s.trace_id),
                            span_id: hex(&s.span_id),
                            parent_span_id: hex(&s.parent_span_id),
                            name: s.name.clone(),
                            kind: s.kind,
                            attrs: s
                                .attributes
                                .iter()
                                .map(|kv| (kv.key.clone(), attr_string(kv.value.as_ref())))
                                .collect(),
                            service: service.clone(),
                        });
                    }
                }
            }
            out.lock().unwrap().extend(got);
        }
    });
    spans
}

fn attr_string(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Polls `f` until it returns true or the deadline passes.
pub async fn eventually(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GET /v1/tasks/{id} as JSON, or None on 404.
pub async fn task_record(stack_http: &str, id: &str) -> Option<serde_json::Value> {
    let resp = reqwest::get(format!("{stack_http}/v1/tasks/{id}"))
        .await
        .unwrap();
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return None;
    }
    Some(resp.json().await.unwrap())
}

/// Publishes a raw submission through JetStream; returns the intake sequence.
pub async fn publish_raw(client: &async_nats::Client, headers: &[(&str, &str)], body: &str) -> u64 {
    let js = async_nats::jetstream::new(client.clone());
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in headers {
        h.insert(*k, *v);
    }
    js.publish_with_headers("fleet.tasks.submit", h, body.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

/// Waits until every telemetry item the commander accepted before this call has been
/// applied to the live state: the receivers hand items to the fleet owner through one
/// queue in order, so once a marker span sent now is on the fleet view, everything ahead
/// of it is too. The marker is a worker named `telemetry-barrier-<n>`.
#[allow(dead_code, reason = "used by some test modules only")]
pub async fn telemetry_applied(stack: &Stack) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let worker = format!("telemetry-barrier-{n}");
    let otlp = stack
        .commander
        .otlp_http()
        .expect("the commander serves OTLP/HTTP");
    let body = serde_json::json!({"resourceSpans": [{
        "resource": {"attributes": [
            {"key": "fleet.worker.id", "value": {"stringValue": worker}}]},
        "scopeSpans": [{"spans": [{
            "traceId": format!("{:032x}", 0xba_u128 + u128::from(n)),
            "spanId": "00000000000000b1", "name": "barrier", "kind": 1,
            "startTimeUnixNano": "1", "endTimeUnixNano": "2"}]}]}]});
    let resp = reqwest::Client::new()
        .post(format!("{otlp}/v1/traces"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "the barrier span is accepted");
    eventually("telemetry sent before now is applied", WAIT, async || {
        reqwest::get(stack.http(&format!("/v1/workers/{worker}")))
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;
    worker
}

/// [`eventually`] for tests without a runtime.
#[allow(dead_code, reason = "used by some test modules only")]
pub fn eventually_blocking(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A worker of `pool` that gives every delivery back and keeps pulling, counting the
/// deliveries: after the tenth JetStream gives up on the message (it says so, with a
/// max-deliveries advisory, when it would have delivered an eleventh).
pub async fn nak_every_delivery(
    client: &async_nats::Client,
    pool: &str,
) -> (
    Arc<std::sync::atomic::AtomicU32>,
    tokio::task::JoinHandle<()>,
) {
    use async_nats::jetstream::{AckKind, consumer};
    let js = async_nats::jetstream::new(client.clone());
    let work = js.get_stream("FLEET_WORK").await.unwrap();
    let pool: consumer::PullConsumer = work
        .get_consumer(&fleet_worker::protocol::pool_consumer_name(pool))
        .await
        .unwrap();
    let deliveries = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = deliveries.clone();
    let naker = tokio::spawn(async move {
        loop {
            let Ok(mut batch) = pool
                .fetch()
                .max_messages(1)
                .expires(Duration::from_millis(500))
                .messages()
                .await
            else {
                continue;
            };
            while let Some(Ok(msg)) = batch.next().await {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = msg.ack_with(AckKind::Nak(None)).await;
            }
        }
    });
    (deliveries, naker)
}

/// Messages now in `stream`.
pub async fn stream_messages(client: &async_nats::Client, stream: &str) -> u64 {
    let js = async_nats::jetstream::new(client.clone());
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// A port nothing listens on now (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Heartbeats for `worker` of `pool` on model gpt-4o (a 128,000-token window) every 200 ms with the
/// context at `tokens`, until the task is aborted.
pub fn heartbeats(
    client: async_nats::Client,
    worker: &'static str,
    pool: &'static str,
    tokens: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Fleet-Kind", "heartbeat");
            let now = fleet_worker::message::now_rfc3339();
            let hb = serde_json::json!({"schema": 1, "worker_id": worker, "pool": pool,
                "state": "active", "model": "gpt-4o", "context_tokens": tokens,
                "max_in_flight": 1, "current_tasks": ["t-ctx"],
                "started_at": now, "sent_at": now});
            let _ = client
                .publish_with_headers(
                    format!("fleet.telemetry.{pool}.{worker}"),
                    h,
                    hb.to_string().into(),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// Which of two replicas (their API bases) leads: notifies alerts and exports traces
/// (`fleet_alerts_leader`), once one does.
pub async fn leader_of(apis: &[String]) -> usize {
    let mut leader = 0;
    eventually("one replica leads", WAIT, async || {
        let a = metric_at(&apis[0], "fleet_alerts_leader").await;
        let b = metric_at(&apis[1], "fleet_alerts_leader").await;
        leader = if a == 1.0 { 0 } else { 1 };
        a + b == 1.0
    })
    .await;
    leader
}

/// The replica id a commander logged at start.
pub fn replica_of(log: &str) -> String {
    let (_, rest) = log
        .split_once("replica=\"")
        .expect("the commander logs its replica id");
    rest.chars().take(16).collect()
}
