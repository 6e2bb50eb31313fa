//! The router on its own, driven with `oneshot`: every status the API documents for bad
//! requests, auth, and an accepted submission. The store, the fleet owner, the decision
//! log and the policy engine are the real ones (sled in a temp dir); the two writes that
//! reach NATS in service (the intake stream, the policy bucket) are scripted here and run
//! against a real broker in the end-to-end tests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use fleet_worker::message::Task;
use fleet_worker::producer::{ProducerError, SubmitOptions, SubmitReceipt};
use fleet_worker::trace::TraceParent;
use futures::future::BoxFuture;
use serde_json::Value;
use tower::ServiceExt;

use super::{AppState, Intake, PolicyWriter, router};
use crate::classify::Classifier;
use crate::classify::rubric::Rubric;
use crate::config::{ClassifierConfig, FleetConfig, PoolConfig};
use crate::decisions::DecisionLog;
use crate::fleet::FleetState;
use crate::metrics::Metrics;
use crate::pipeline::Core;
use crate::policy::{Document, ManualClock, Policy, PolicyEngine, PolicyError, Source, Start};
use crate::registry::Registry;
use crate::route::RoutingTable;
use crate::store::Store;

/// What the scripted intake answers next.
#[derive(Debug, Default)]
enum Answer {
    #[default]
    Accept,
    Refuse(fn() -> ProducerError),
}

/// Takes submissions as the intake stream would: a sequence per task, or a scripted error.
#[derive(Debug, Default)]
struct ScriptedIntake {
    next: Mutex<Answer>,
    seq: AtomicU64,
    seen: Mutex<Vec<(Task, SubmitOptions)>>,
}

impl Intake for ScriptedIntake {
    fn submit<'a>(
        &'a self,
        task: &'a Task,
        opts: SubmitOptions,
    ) -> BoxFuture<'a, Result<SubmitReceipt, ProducerError>> {
        Box::pin(async move {
            if let Answer::Refuse(e) = std::mem::take(&mut *self.next.lock().unwrap()) {
                return Err(e());
            }
            let parent = opts.parent;
            let task_id = task
                .id
                .clone()
                .or_else(|| opts.idempotency_key.clone())
                .unwrap_or_else(|| "generated".into());
            self.seen.lock().unwrap().push((task.clone(), opts));
            Ok(SubmitReceipt {
                task_id,
                stream_sequence: self.seq.fetch_add(1, Ordering::SeqCst) + 1,
                duplicate: false,
                traceparent: parent
                    .map(|p| p.child())
                    .unwrap_or_else(TraceParent::new_root),
            })
        })
    }
}

/// Applies a pushed policy to the engine as the bucket's watch would, after the same check.
#[derive(Debug)]
struct DirectPolicies(Arc<PolicyEngine>);

impl PolicyWriter for DirectPolicies {
    fn propose<'a>(
        &'a self,
        docs: Vec<Document>,
        source: Source,
        identity: &'a str,
    ) -> BoxFuture<'a, Result<String, PolicyError>> {
        Box::pin(async move {
            let revision = self.0.live().revision + 1;
            self.0.parse_and_swap(docs, revision, source, identity)?;
            Ok(self.0.live().policy.version.clone())
        })
    }
}

struct Api {
    state: AppState,
    intake: Arc<ScriptedIntake>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::watch::Sender<bool>,
}

const TOKEN: &str = "s3cret-token";

fn api(token: Option<&str>, max_body_bytes: usize) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("sled")).unwrap();
    let pools: std::collections::BTreeMap<String, PoolConfig> =
        [("code", "code"), ("docs", "summarise")]
            .into_iter()
            .map(|(p, c)| {
                let cfg = PoolConfig {
                    capabilities: vec![c.to_string()],
                    ..Default::default()
                };
                (p.to_string(), cfg)
            })
            .collect();
    let (registry, rubric) = (Registry::builtin().unwrap(), Rubric::builtin().unwrap());
    let policy = Policy::builtin(crate::policy::CheckAgainst {
        pools: Some(&pools),
        registry: &registry,
        rubric: &rubric,
    })
    .unwrap();
    let classifier = Classifier::new(ClassifierConfig::default(), &rubric, None).unwrap();
    let engine = PolicyEngine::open(
        &store,
        Start {
            routing: RoutingTable {
                pools: pools.clone(),
                routing: Default::default(),
            },
            registry,
            registry_file: None,
            rubric,
            rubric_file: None,
            policy,
        },
        ManualClock::at(1_800_000_000_000),
        100,
        100,
    )
    .unwrap();
    let metrics = Arc::new(Metrics::default());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let state = FleetState::new(
        FleetConfig::default(),
        engine.clone(),
        pools.keys().map(String::as_str),
    );
    let (fleet, _owner) = crate::fleet::spawn(state, 4, stop_rx, Default::default());
    let intake = Arc::new(ScriptedIntake::default());
    let state = AppState {
        core: Core {
            traces: Default::default(),
            store: store.clone(),
            metrics: metrics.clone(),
            fleet,
            classifier: Arc::new(classifier),
            decisions: DecisionLog::open(&store).unwrap(),
            policy: engine.clone(),
            route_cache: Default::default(),
        },
        intake: intake.clone(),
        policies: Arc::new(DirectPolicies(engine)),
        alerts: crate::detect::run::Alerts::new(
            crate::detect::AlertLog::open(&store, 100).unwrap(),
            Default::default(),
            crate::detect::silence::Silences::open(&store).unwrap(),
            crate::detect::act::InterventionLog::open(&store, 100).unwrap(),
        ),
        registry: Arc::new(metrics.registry()),
        ready: Arc::new(AtomicBool::new(true)),
        max_body_bytes,
        compliance_token: token.map(str::to_string),
        supervisor: Default::default(),
    };
    Api {
        state,
        intake,
        _dir: dir,
        _stop: stop,
    }
}

impl Api {
    async fn call(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let resp = router(self.state.clone()).oneshot(req).await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (status, headers, json)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        let (s, _, b) = self
            .call(Request::get(uri).body(Body::empty()).unwrap())
            .await;
        (s, b)
    }
}

fn post_task() -> axum::http::request::Builder {
    Request::post("/v1/tasks").header(header::CONTENT_TYPE, "application/json")
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn health_and_readiness() {
    let api = api(None, 1 << 20);
    assert_eq!(api.get("/healthz").await.0, StatusCode::OK);
    assert_eq!(api.get("/readyz").await.0, StatusCode::OK);
    api.state.ready.store(false, Ordering::Relaxed);
    let (status, body) = api.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "not_ready");
}

#[tokio::test]
async fn an_accepted_task_is_answered_202_continues_the_callers_trace_and_is_found_at_once() {
    let api = api(None, 1 << 20);
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let body = r#"{"schema":1,"id":"t-1","description":"summarise the minutes"}"#;
    let (status, headers, json) = api
        .call(
            post_task()
                .header("traceparent", parent)
                .header("baggage", "team=search")
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    assert!(headers.get(header::RETRY_AFTER).is_none());
    assert_eq!(json["task_id"], "t-1");
    assert_eq!(json["stream_sequence"], 1);
    assert_eq!(json["duplicate"], false);
    assert_eq!(json["status_url"], "/v1/tasks/t-1");
    let tp = TraceParent::parse(json["traceparent"].as_str().unwrap()).unwrap();
    assert_eq!(tp.trace_id.to_hex(), "0af7651916cd43dd8448eb211c80319c");
    {
        let seen = api.intake.seen.lock().unwrap();
        let (task, opts) = &seen[0];
        assert_eq!(task.description, "summarise the minutes");
        assert_eq!(opts.baggage.get("team"), Some("search"));
    }
    let (status, rec) = api.get("/v1/tasks/t-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rec["state"], "received");
}

#[tokio::test]
async fn bad_submissions_get_400s_that_name_the_problem_and_reach_no_intake() {
    let api = api(None, 1 << 20);
    for (body, want) in [
        ("{not json", "bad_json"),
        (r#"{"schema":1}"#, "invalid_task"),
        ("[1, 2]", "bad_json"),
        (
            r#"{"schema":1,"description":"x","colour":"red"}"#,
            "invalid_task",
        ),
        (
            r#"{"schema":1,"description":"x","priority":99}"#,
            "invalid_task",
        ),
    ] {
        let (status, _, json) = api.call(post_task().body(Body::from(body)).unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {json}");
        assert_eq!(code(&json), want, "{body}: {json}");
        if want == "invalid_task" {
            assert!(
                !json["error"]["problems"].as_array().unwrap().is_empty(),
                "{json}"
            );
        }
    }
    assert!(api.intake.seen.lock().unwrap().is_empty());

    // What the intake refuses for the request's own sake is a 400 too.
    *api.intake.next.lock().unwrap() = Answer::Refuse(|| ProducerError::BadIdempotencyKey);
    let body = r#"{"schema":1,"description":"x"}"#;
    let (status, _, json) = api
        .call(
            post_task()
                .header("idempotency-key", "has spaces")
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
    assert_eq!(code(&json), "bad_request");
}

#[tokio::test]
async fn an_intake_that_cannot_take_the_task_is_a_503_to_retry() {
    let api = api(None, 1 << 20);
    *api.intake.next.lock().unwrap() =
        Answer::Refuse(|| ProducerError::NotAccepted("no responders".into()));
    let body = r#"{"schema":1,"id":"t-2","description":"x"}"#;
    let (status, headers, json) = api.call(post_task().body(Body::from(body)).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert_eq!(code(&json), "unavailable");
    assert_eq!(api.get("/v1/tasks/t-2").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn routes_methods_ids_queries_and_sizes_answer_in_the_one_error_shape() {
    let api = api(None, 512);
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            Request::get("/v1/nothing-here")
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Request::delete("/v1/tasks").body(Body::empty()).unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Request::get("/v1/tasks/a.b").body(Body::empty()).unwrap(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Request::get("/v1/tasks/unknown")
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Request::get("/v1/costs?by=colour")
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Request::get("/v1/decisions?limit=lots")
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            post_task()
                .body(Body::from(format!(
                    r#"{{"schema":1,"description":"{}"}}"#,
                    "x".repeat(1024)
                )))
                .unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (req, want_status, want_code) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let (status, headers, json) = api.call(req).await;
        assert_eq!(status, want_status, "{what}: {json}");
        assert_eq!(code(&json), want_code, "{what}: {json}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{what}");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {json}"
        );
    }
}

fn put_policy(auth: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::put("/v1/policy?name=ops.policy.toml");
    if let Some(a) = auth {
        b = b.header(header::AUTHORIZATION, a);
    }
    b.body(Body::from(body.to_string())).unwrap()
}

const GOOD_POLICY: &str = "[[budget]]\nname = \"daily\"\nscope = \"fleet\"\nwindow = \"1d\"\nlimit_usd = 50.0\naction = \"defer\"\n";

#[tokio::test]
async fn policy_pushes_need_the_token_and_a_valid_policy() {
    // No token configured: pushes are refused outright.
    let api_closed = api(None, 1 << 20);
    let (status, _, json) = api_closed
        .call(put_policy(Some(&format!("Bearer {TOKEN}")), GOOD_POLICY))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
    assert_eq!(code(&json), "forbidden");

    let api = api(Some(TOKEN), 1 << 20);
    for auth in [None, Some("Bearer wrong"), Some(TOKEN)] {
        let (status, _, json) = api.call(put_policy(auth, GOOD_POLICY)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}: {json}");
        assert_eq!(code(&json), "unauthorized");
    }
    let unaudited = api.state.core.policy.counters.unauthorised.get();
    assert_eq!(unaudited, 3, "every refused push is counted");

    // A broken policy: 422 with every problem, naming the file and line; nothing changes.
    let before = api.state.core.policy.live().policy.version.clone();
    let broken = "[[budget]]\nname = \"daily\"\nscope = \"fleet\"\nwindow = \"1d\"\nlimit_usd = -5.0\naction = \"defer\"\n";
    let (status, _, json) = api
        .call(put_policy(Some(&format!("Bearer {TOKEN}")), broken))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{json}");
    assert_eq!(json["accepted"], false);
    let errors = json["errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap().starts_with("ops.policy.toml:5")),
        "{json}"
    );
    assert_eq!(api.state.core.policy.live().policy.version, before);

    let (status, _, json) = api
        .call(put_policy(Some(&format!("Bearer {TOKEN}")), GOOD_POLICY))
        .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["accepted"], true);
    assert_eq!(json["version"], "v1");
    let (status, current) = api.get("/v1/policy").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(current["version"], "v1");
    assert_eq!(current["budgets"][0]["name"], "daily");
}
