//! The router on its own, driven with `oneshot`: every status the API documents for bad
//! requests, auth, and an accepted submission. The store, the fleet owner, the decision
//! log and the policy engine are the real ones (sled in a temp dir); what reaches NATS in
//! service (the intake and results streams, the policy bucket) is scripted here and run
//! against a real broker in the end-to-end tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use fleet_worker::message::Task;
use fleet_worker::producer::{ProducerError, StoredResult, SubmitOptions, SubmitReceipt};
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

/// The replica id of the commander under test.
const HERE: &str = "00000000000000aa";

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
    /// The results stream's answers by task id.
    results: Mutex<HashMap<String, StreamAnswer>>,
}

/// A stored result, or a scripted error.
type StreamAnswer = Result<StoredResult, fn() -> ProducerError>;

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

    fn result<'a>(
        &'a self,
        task_id: &'a str,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Option<StoredResult>, ProducerError>> {
        Box::pin(async move {
            let answer = self.results.lock().unwrap().get(task_id).cloned();
            match answer {
                Some(Ok(stored)) => Ok(Some(stored)),
                Some(Err(e)) => Err(e()),
                // Nothing comes: the whole wait passes, as on the stream.
                None => {
                    tokio::time::sleep(wait).await;
                    Ok(None)
                }
            }
        })
    }
}

/// The other replicas' records by task id, as they would answer a lookup.
#[derive(Debug, Default)]
struct ScriptedPeers {
    records: Mutex<HashMap<String, Value>>,
    /// Each other replica's waiting tasks (deferred ones), in key order.
    waiting: Mutex<Vec<Vec<crate::policy::DeferredTask>>>,
    /// Each other replica's id and store, whose finished tasks it lists.
    finished: Mutex<Vec<(String, Arc<Store>)>>,
    /// The decisions the other replicas logged, as they would answer a lookup.
    decisions: Mutex<Vec<Value>>,
}

impl super::peers::Peers for ScriptedPeers {
    fn record<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Option<Value>> {
        Box::pin(async move { self.records.lock().unwrap().get(task_id).cloned() })
    }

    fn decision<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Option<Value>> {
        Box::pin(async move {
            let answers = self.decisions.lock().unwrap().clone();
            super::decisions::latest(task_id, answers)
        })
    }

    /// The replica that keeps the record answers as a cancel there would: here, with
    /// what it was asked.
    fn cancel<'a>(
        &'a self,
        task_id: &'a str,
        who: &'a str,
        reason: Option<&'a str>,
    ) -> BoxFuture<'a, Option<Result<Value, super::ApiError>>> {
        Box::pin(async move {
            let rec = self.records.lock().unwrap().get(task_id).cloned()?;
            Some(Ok(serde_json::json!({
                "task_id": task_id, "replica": rec["replica"], "who": who, "reason": reason
            })))
        })
    }

    /// Each replica answers with its deferred tasks after the cursor, as many as asked.
    fn waiting<'a>(
        &'a self,
        _: &'a str,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Vec<super::peers::Page>> {
        Box::pin(async move {
            let after = cursor.and_then(crate::policy::deferred_cursor);
            let replicas = self.waiting.lock().unwrap().clone();
            replicas
                .into_iter()
                .enumerate()
                .map(|(i, tasks)| {
                    let after_cursor: Vec<_> = tasks
                        .iter()
                        .filter(|t| after.as_ref().is_none_or(|a| t.key() > *a))
                        .collect();
                    super::peers::Page {
                        total: tasks.len(),
                        more: after_cursor.len() > limit,
                        tasks: after_cursor
                            .into_iter()
                            .take(limit)
                            .map(|t| super::peers::PageEntry {
                                key: crate::domain::hex(&t.key()),
                                task: serde_json::json!({"task_id": t.id, "replica": format!("peer-{i}")}),
                            })
                            .collect(),
                    }
                })
                .collect()
        })
    }

    /// Each replica answers from its store as it would over NATS.
    fn finished<'a>(
        &'a self,
        query: &'a super::finished::TasksQuery,
    ) -> BoxFuture<'a, Vec<super::peers::FinishedPage>> {
        Box::pin(async move {
            let peers = self.finished.lock().unwrap().clone();
            let state = query.state.clone().unwrap_or_default();
            peers
                .iter()
                .map(|(replica, store)| {
                    let checked = super::finished::check(&state, query).unwrap();
                    let page = super::finished::local_page(store, replica, &checked).unwrap();
                    super::peers::FinishedPage::from(page)
                })
                .collect()
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
    peers: Arc<ScriptedPeers>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::watch::Sender<bool>,
}

const TOKEN: &str = "s3cret-token";

/// Workers are out of reach here: the control plane's cancel runs against real workers
/// in the end-to-end tests.
#[derive(Debug)]
struct NoWorkers;

impl super::control::Tell for NoWorkers {
    fn tell<'a>(
        &'a self,
        worker: &'a str,
        _req: fleet_worker::control::ControlRequest,
    ) -> BoxFuture<'a, Result<fleet_worker::control::ControlReply, String>> {
        Box::pin(async move { Err(format!("worker {worker} is out of reach in unit tests")) })
    }

    fn withdraw<'a>(
        &'a self,
        _task: &'a crate::pipeline::cancel::Queued,
        _reason: &'a str,
    ) -> BoxFuture<
        'a,
        Result<crate::pipeline::cancel::Withdrawn, crate::pipeline::cancel::WithdrawError>,
    > {
        Box::pin(async move {
            Err(crate::pipeline::cancel::WithdrawError::Broker(
                "the work stream is out of reach in unit tests".into(),
            ))
        })
    }
    fn withdraw_pool<'a>(
        &'a self,
        _pool: &'a str,
        _reason: &'a str,
        _max: usize,
    ) -> BoxFuture<
        'a,
        Result<crate::pipeline::cancel::PoolWithdrawal, crate::pipeline::cancel::WithdrawError>,
    > {
        Box::pin(async move {
            Err(crate::pipeline::cancel::WithdrawError::Broker(
                "the work stream is out of reach in unit tests".into(),
            ))
        })
    }
}

fn api(token: Option<&str>, max_body_bytes: usize) -> Api {
    api_with_roles(
        token,
        max_body_bytes,
        Vec::new(),
        crate::config::AuthConfig::default(),
    )
}

fn api_with_roles(
    token: Option<&str>,
    max_body_bytes: usize,
    roles: Vec<(String, crate::config::Role, String)>,
    auth: crate::config::AuthConfig,
) -> Api {
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
    let (fleet, _owner) = crate::fleet::spawn(
        state,
        4,
        Arc::new(crate::domain::SystemClock),
        stop_rx,
        Default::default(),
    );
    let intake = Arc::new(ScriptedIntake::default());
    let peers = Arc::new(ScriptedPeers::default());
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
            replica: Arc::from(HERE),
        },
        intake: intake.clone(),
        policies: Arc::new(DirectPolicies(engine)),
        peers: peers.clone(),
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
        auth: super::auth::Keys::new(roles, token.map(str::to_string)),
        events: crate::events::Hub::new(64, 64, 2),
        control: super::control::Control::open(&store, &auth, 2, Arc::new(NoWorkers)).unwrap(),
    };
    Api {
        state,
        intake,
        peers,
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

    /// Asserts `req` is answered 400, and gives back the error's message.
    async fn bad_request(&self, req: Request<Body>) -> String {
        let uri = req.uri().to_string();
        let (status, _, json) = self.call(req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {json}");
        json["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A listing of tasks (`GET /v1/tasks?…`, which must answer 200): the ids it lists,
    /// in order, and the whole answer.
    async fn listed(&self, uri: &str) -> (Vec<String>, Value) {
        let req = Request::get(uri).body(Body::empty()).unwrap();
        let (status, _, json) = self.call(req).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {json}");
        let ids = json["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["task_id"].as_str().unwrap().to_string())
            .collect();
        (ids, json)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        let (s, _, b) = self.get_with_headers(uri).await;
        (s, b)
    }

    async fn get_with_headers(&self, uri: &str) -> (StatusCode, axum::http::HeaderMap, Value) {
        self.call(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }
}

fn post_task() -> axum::http::request::Builder {
    Request::post("/v1/tasks").header(header::CONTENT_TYPE, "application/json")
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// A pool's gauges follow the live state: a pool it forgot leaves `/metrics`, every series
/// of it, and the pools still there keep theirs.
#[test]
fn a_pool_the_live_state_forgot_leaves_the_metrics() {
    use crate::fleet::view::{FleetSnapshot, PoolView};
    let metrics = Metrics::default();
    let registry = metrics.registry();
    let pool = |name: &str| PoolView {
        name: name.into(),
        states: [("IDLE", 1)].into_iter().collect(),
        ..Default::default()
    };
    let text = || {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    };
    let series_of = |text: &str, pool: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&format!("pool=\"{pool}\"")))
            .count()
    };
    let mut snap = FleetSnapshot {
        pools: vec![pool("code"), pool("cdoe")],
        ..Default::default()
    };
    super::set_fleet_gauges(&metrics.fleet, &snap);
    let before = text();
    assert!(series_of(&before, "cdoe") >= 5, "{before}");
    let code = series_of(&before, "code");
    snap.pools.retain(|p| p.name == "code");
    super::set_fleet_gauges(&metrics.fleet, &snap);
    let after = text();
    assert_eq!(series_of(&after, "cdoe"), 0, "{after}");
    assert_eq!(series_of(&after, "code"), code, "{after}");
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
    assert_eq!(json["result_url"], "/v1/tasks/t-1/result");
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

/// A task links the trace kept under its own trace id, and nothing else: not a kept trace
/// of another id, not when its trace was not kept, not when it has no trace yet.
#[tokio::test]
async fn a_task_links_the_trace_kept_under_its_own_trace_id() {
    use crate::store::{TaskRecord, TraceInfo};
    use crate::traces::store::{TraceStore, TraceSummary, hex};
    let mut api = api(None, 1 << 20);
    let traces = TraceStore::open(&api.state.core.store).unwrap();
    api.state.core.traces.store = Some(traces.clone());
    let (kept, not_kept) = ([7u8; 16], [8u8; 16]);
    let mut summary = TraceSummary {
        trace_id: hex(&kept),
        kept_at_ms: 1_000,
        // The trace names another task only: the link comes from the task's own id.
        task_ids: vec!["t-elsewhere".into()],
        ..Default::default()
    };
    traces.put(&kept, &mut summary, Vec::new()).unwrap();
    for (task, trace) in [
        ("t-kept", Some(kept)),
        ("t-not-kept", Some(not_kept)),
        ("t-none", None),
    ] {
        api.state
            .core
            .store
            .update(
                task,
                || TaskRecord::new(task, 1),
                |r| {
                    r.trace = trace.map(|t| TraceInfo {
                        trace_id: hex(&t),
                        ..Default::default()
                    });
                },
            )
            .unwrap();
    }
    let (status, rec) = api.get("/v1/tasks/t-kept").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rec["kept_trace"]["trace_id"], hex(&kept).as_str());
    assert_eq!(
        rec["kept_trace"]["href"],
        format!("/v1/traces/{}", hex(&kept)).as_str()
    );
    for task in ["t-not-kept", "t-none"] {
        let (status, rec) = api.get(&format!("/v1/tasks/{task}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(rec["kept_trace"], Value::Null, "{task}");
    }
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
    // The cause is in the answer: whether anything was sent is the producer's to know.
    assert_eq!(
        json["error"]["message"],
        "task intake is unavailable (task intake did not acknowledge the task: no responders); retry later"
    );
    assert_eq!(api.get("/v1/tasks/t-2").await.0, StatusCode::NOT_FOUND);
}

/// `GET /v1/tasks/{id}/result`: the result as published (200), where the task is while it
/// has none (202), nothing known (404), a finished task whose result aged out (410), and a
/// results stream that did not answer (503). The real stream is read in the e2e tests.
#[tokio::test]
async fn a_task_s_result_is_answered_as_published_or_says_where_the_task_is() {
    use crate::store::{TaskRecord, TaskState};
    let api = api(None, 1 << 20);
    let published = br#"{"schema":1,"task_id":"t-done","attempt":1,"status":"ok","output":{"summary":"x"},"extra_field":"kept"}"#;
    let mut stored_headers = async_nats::HeaderMap::new();
    stored_headers.insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    stored_headers.insert("Fleet-Attempt", "1");
    api.intake.results.lock().unwrap().insert(
        "t-done".into(),
        Ok(StoredResult {
            payload: bytes::Bytes::from_static(published),
            headers: stored_headers,
            stored_ms: None,
        }),
    );
    let resp = router(api.state.clone())
        .oneshot(
            Request::get("/v1/tasks/t-done/result")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    assert_eq!(
        resp.headers()["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(resp.headers()["fleet-attempt"], "1");
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], &published[..], "the JSON exactly as published");

    // A record and no result: where the task is, and when to ask again.
    let recorded = |id: &str, state: TaskState| {
        api.state
            .core
            .store
            .update(id, || TaskRecord::new(id, 7), |r| r.advance(state))
            .unwrap();
    };
    recorded("t-running", TaskState::Dispatched);
    let (status, headers, json) = api
        .get_with_headers("/v1/tasks/t-running/result?wait_s=1")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert_eq!(json["task_id"], "t-running");
    assert_eq!(json["state"], "dispatched");
    assert_eq!(json["status_url"], "/v1/tasks/t-running");

    // Nothing at all: 404 when asked at once; told "not known yet" after a wait, since a
    // task submitted over NATS is recorded only when the intake loop takes it.
    let (status, json) = api.get("/v1/tasks/t-nobody/result").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{json}");
    assert_eq!(code(&json), "not_found");
    let (status, json) = api.get("/v1/tasks/t-nobody/result?wait_s=1").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    assert_eq!(json["state"], Value::Null);

    // Finished, but its result is no longer in the stream.
    recorded("t-old", TaskState::Completed);
    let (status, json) = api.get("/v1/tasks/t-old/result").await;
    assert_eq!(status, StatusCode::GONE, "{json}");
    assert_eq!(code(&json), "gone");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("GET /v1/tasks/t-old"),
        "{json}"
    );

    // The stream did not answer: unknown, so retry.
    api.intake.results.lock().unwrap().insert(
        "t-old".into(),
        Err(|| ProducerError::Nats("the results stream did not answer: timed out".into())),
    );
    let (status, headers, json) = api.get_with_headers("/v1/tasks/t-old/result").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{json}"
    );

    // A shutdown ends a long poll at once with where the task is: the caller asks again
    // (waiting on would hold the shutdown, then drop the connection unanswered).
    let polling = tokio::spawn(
        router(api.state.clone()).oneshot(
            Request::get("/v1/tasks/t-running/result?wait_s=60")
                .body(Body::empty())
                .unwrap(),
        ),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!polling.is_finished(), "the poll waits for a result");
    api.state.events.close();
    let resp = tokio::time::timeout(Duration::from_secs(10), polling)
        .await
        .expect("the poll ends when the commander shuts down")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);

    // What the route refuses.
    for bad in [
        "/v1/tasks/t-done/result?wait_s=61",
        "/v1/tasks/t-done/result?wait_s=-1",
        "/v1/tasks/t-done/result?wait=5",
        "/v1/tasks/a.b/result",
    ] {
        let (status, json) = api.get(bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {json}");
    }
}

/// A live-state query the fleet's owner cannot take is a 503 that says so, not one that
/// blames the task intake (the answer these routes gave before).
#[tokio::test]
async fn a_fleet_query_its_owner_cannot_take_is_a_503_that_says_so() {
    let mut api = api(None, 1 << 20);
    let (fleet, receivers) = crate::fleet::FleetHandle::detached(1);
    drop(receivers);
    api.state.core.fleet = fleet;
    for uri in ["/v1/costs", "/v1/workers/w1", "/v1/fleet?series=1h"] {
        let (status, json) = api.get(uri).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {json}");
        assert_eq!(code(&json), "unavailable");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("the live fleet state did not answer"),
            "{uri}: {message}"
        );
    }
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
        // Finer than the ledger's minute: it could only be answered with a whole minute.
        (
            Request::get("/v1/costs?window=30s")
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Request::get("/v1/fleet?series=5s")
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        // Closed sets and numbers are checked, not matched against nothing.
        (
            Request::get("/v1/decisions?source=guess")
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
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            assert_eq!(
                json["error"]["message"],
                "the request body is over the limit of 512 bytes (http.max_body_bytes)"
            );
        }
        assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{what}");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {json}"
        );
    }
}

/// Every list route takes `limit` within its documented range and refuses one outside it
/// with a 400 that names the range, rather than answering a page of another size.
#[tokio::test]
async fn every_list_route_refuses_a_limit_outside_its_range() {
    let mut api = api(None, 4096);
    let traces = crate::traces::store::TraceStore::open(&api.state.core.store).unwrap();
    api.state.core.traces.store = Some(traces);
    let routes = [
        ("/v1/workers", 1000),
        ("/v1/decisions", 500),
        ("/v1/traces", 500),
        ("/v1/alerts", 1000),
        ("/v1/alerts?state=all", 1000),
        ("/v1/interventions", 1000),
        ("/v1/policy/history", 500),
        ("/v1/tasks?state=deferred", 1000),
        ("/v1/tasks?state=finished", 1000),
        ("/v1/control/audit", 1000),
    ];
    for (route, max) in routes {
        let sep = if route.contains('?') { '&' } else { '?' };
        for (limit, ok) in [(0, false), (1, true), (max, true), (max + 1, false)] {
            let uri = format!("{route}{sep}limit={limit}");
            let req = Request::get(uri.as_str()).body(Body::empty()).unwrap();
            if ok {
                let (status, _, json) = api.call(req).await;
                assert_eq!(status, StatusCode::OK, "{uri}: {json}");
            } else {
                let message = api.bad_request(req).await;
                assert!(message.contains(&format!("1-{max}")), "{uri}: {message}");
            }
        }
    }
    for max in [0, 1_000_001] {
        let uri = format!("/v1/policy/replay?last=1h&max={max}");
        let req = Request::post(uri.as_str()).body(Body::empty()).unwrap();
        let message = api.bad_request(req).await;
        assert!(message.starts_with("max="), "{uri}: {message}");
    }
    // A threshold that is not a number matches nothing; it is refused instead.
    for q in ["min_cost_usd=NaN", "min_duration_ms=-1", "min_cost_usd=inf"] {
        let uri = format!("/v1/traces?{q}");
        let req = Request::get(uri.as_str()).body(Body::empty()).unwrap();
        let (status, _, json) = api.call(req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {json}");
    }
}

/// The deferred queue is listed a page at a time in release order (priority, then age), and
/// `next` goes on after the last listed task even when tasks ahead of it have left.
#[tokio::test]
async fn the_deferred_queue_is_paged_with_a_cursor_in_release_order() {
    let api = api(None, 4096);
    let deferrals = &api.state.core.policy.deferrals;
    let task = |id: &str, priority: u8, at_ms: u64| {
        crate::policy::tests::deferred(id, priority, at_ms, 0.01)
    };
    // Release order: p9 first, then oldest first among the p5s.
    let tasks = [
        task("p5-old", 5, 1_000),
        task("p5-new", 5, 3_000),
        task("p9", 9, 5_000),
        task("p5-mid", 5, 2_000),
        task("p0", 0, 500),
    ];
    for t in &tasks {
        deferrals.insert(t).unwrap();
    }
    let page = |uri: String, total: u64| {
        let api = &api;
        async move {
            let (ids, json) = api.listed(&uri).await;
            assert_eq!(json["total"], total, "{json}");
            // A string, or absent on the last page (never `null`).
            assert!(json.get("next").is_none_or(Value::is_string), "{json}");
            (ids, json["next"].as_str().map(str::to_string))
        }
    };
    let (first, next) = page("/v1/tasks?state=deferred&limit=2".into(), 5).await;
    assert_eq!(first, ["p9", "p5-old"]);
    let next = next.expect("more to come");
    // The first task is released meanwhile: the next page still starts after p5-old.
    deferrals.remove(&tasks[2]).unwrap();
    let (second, next) = page(format!("/v1/tasks?state=deferred&limit=2&cursor={next}"), 4).await;
    assert_eq!(second, ["p5-mid", "p5-new"]);
    let cursor = next.expect("one more");
    let (last, end) = page(
        format!("/v1/tasks?state=deferred&limit=2&cursor={cursor}"),
        4,
    )
    .await;
    assert_eq!((last, end), (vec!["p0".to_string()], None));
    // A page that holds the rest exactly has no next.
    let (all, end) = page("/v1/tasks?state=deferred&limit=4".into(), 4).await;
    assert_eq!((all.len(), end), (4, None));
    for bad in [
        "zz",
        "0a",
        "",
        "0500000000000003e8",       // no task id
        "0a00000000000003e87039",   // rank 10
        "0500000000000003e8703500", // a NUL in the id
    ] {
        let uri = format!("/v1/tasks?state=deferred&cursor={bad}");
        let req = Request::get(uri.as_str()).body(Body::empty()).unwrap();
        let message = api.bad_request(req).await;
        assert!(message.contains("cursor"), "{uri}: {message}");
    }
}

/// `state=finished` (and `completed`, `failed`, `rejected`) lists the tasks that ended,
/// newest first, with their outcome: filtered by status, error code, pool and worker,
/// paged with a cursor; a filter a listing does not take, or a bad value, is a 400.
#[tokio::test]
async fn finished_tasks_are_listed_newest_first_with_filters_and_pages() {
    use fleet_worker::message::{ResultStatus, TaskResult};
    let api = api(None, 4096);
    let store = &api.state.core.store;
    let end = |id: &str, pool: &str, result: TaskResult| {
        store
            .update(
                id,
                || crate::store::TaskRecord::new(id, 1),
                |r| {
                    r.pool = Some(pool.into());
                    r.model = Some(
                        if pool == "code" {
                            "gpt-4o"
                        } else {
                            "claude-haiku-4-5"
                        }
                        .into(),
                    );
                    r.finish(&result);
                },
            )
            .unwrap();
    };
    let run = |status: ResultStatus, worker: &str, code: Option<&str>| {
        let mut r = TaskResult::rejected("x", code.unwrap_or(""), "why");
        r.status = status;
        r.attempt = 1;
        r.worker_id = Some(worker.into());
        if code.is_none() {
            r.error = None;
        }
        r
    };
    // Ended in this order: one millisecond apart at least, so the order is theirs.
    let ends: [(&str, &str, TaskResult); 5] = [
        ("t1", "code", run(ResultStatus::Ok, "w1", None)),
        (
            "t2",
            "code",
            run(ResultStatus::Failed, "w1", Some("tool_error")),
        ),
        (
            "t3",
            "docs",
            run(ResultStatus::Cancelled, "w2", Some("deadline_exceeded")),
        ),
        (
            "t4",
            "docs",
            TaskResult::rejected("t4", "unknown_pool", "no pool docs-x"),
        ),
        ("t5", "code", run(ResultStatus::Ok, "w2", None)),
    ];
    for (id, pool, result) in ends {
        end(id, pool, result);
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    store
        .update(
            "running",
            || crate::store::TaskRecord::new("running", 1),
            |r| r.advance(crate::store::TaskState::Dispatched),
        )
        .unwrap();
    let (ids, all) = api.listed("/v1/tasks?state=finished").await;
    assert_eq!(ids, ["t5", "t4", "t3", "t2", "t1"], "{all}");
    assert_eq!(all["scanned"], 5);
    // Absent on the last page, as docs/api.md says (it was `null`).
    assert!(all.get("next").is_none(), "{all}");
    let t3 = &all["tasks"][2];
    assert_eq!(t3["state"], "failed");
    assert_eq!(t3["pool"], "docs");
    assert_eq!(t3["outcome"]["status"], "cancelled");
    assert_eq!(t3["outcome"]["error"]["code"], "deadline_exceeded");
    assert!(t3["finished_ms"].as_u64().unwrap() > 0);
    for (uri, want) in [
        ("/v1/tasks?state=completed", vec!["t5", "t1"]),
        ("/v1/tasks?state=failed", vec!["t3", "t2"]),
        ("/v1/tasks?state=rejected", vec!["t4"]),
        ("/v1/tasks?state=failed&status=cancelled", vec!["t3"]),
        ("/v1/tasks?state=finished&code=unknown_pool", vec!["t4"]),
        ("/v1/tasks?state=finished&code=tool_error", vec!["t2"]),
        ("/v1/tasks?state=finished&pool=docs", vec!["t4", "t3"]),
        ("/v1/tasks?state=finished&worker=w2", vec!["t5", "t3"]),
        (
            "/v1/tasks?state=finished&model=gpt-4o",
            vec!["t5", "t2", "t1"],
        ),
        ("/v1/tasks?state=failed&model=claude-haiku-4-5", vec!["t3"]),
    ] {
        assert_eq!(api.listed(uri).await.0, want, "{uri}");
    }
    // Since and until bound the finish times.
    let t2_ms = all["tasks"][3]["finished_ms"].as_u64().unwrap();
    assert_eq!(
        api.listed(&format!("/v1/tasks?state=finished&since_ms={t2_ms}"))
            .await
            .0,
        ["t5", "t4", "t3", "t2"]
    );
    assert_eq!(
        api.listed(&format!("/v1/tasks?state=finished&until_ms={t2_ms}"))
            .await
            .0,
        ["t2", "t1"]
    );
    // Pages of two.
    let (first, page) = api.listed("/v1/tasks?state=finished&limit=2").await;
    assert_eq!(first, ["t5", "t4"]);
    let next = page["next"].as_str().unwrap();
    let (second, page) = api
        .listed(&format!("/v1/tasks?state=finished&limit=2&cursor={next}"))
        .await;
    assert_eq!(second, ["t3", "t2"]);
    let next = page["next"].as_str().unwrap();
    let (third, page) = api
        .listed(&format!("/v1/tasks?state=finished&limit=2&cursor={next}"))
        .await;
    assert_eq!(
        (third, page["next"].clone()),
        (vec!["t1".to_string()], Value::Null)
    );
    for (uri, says) in [
        ("/v1/tasks?state=finished&status=done", "status=done"),
        ("/v1/tasks?state=finished&cursor=zz", "cursor"),
        ("/v1/tasks?state=finished&cursor=00", "cursor"),
        ("/v1/tasks?state=deferred&pool=code", "pool"),
        ("/v1/tasks?state=deferred&model=gpt-4o", "model"),
        (
            "/v1/tasks?state=parked&status=ok&since_ms=1",
            "status, since_ms",
        ),
        ("/v1/tasks?state=finished&limit=0", "limit"),
        ("/v1/tasks?state=running", "state=running"),
        ("/v1/tasks?state=finished&colour=red", "colour"),
    ] {
        let req = Request::get(uri).body(Body::empty()).unwrap();
        let message = api.bad_request(req).await;
        assert!(message.contains(says), "{uri}: {message}");
    }
}

/// `state=parked` lists the tasks throttles parked, in turn order, each with its turn,
/// paged the same way; the budget queue's listing does not show them.
#[tokio::test]
async fn parked_tasks_are_listed_in_turn_order_with_their_turns() {
    let api = api(None, 4096);
    let deferrals = &api.state.core.policy.deferrals;
    let parked = |id: &str, at_ms: u64| crate::policy::DeferredTask {
        queues: vec![],
        turn: Some(crate::domain::ThrottleTurn {
            throttle: "noisy-team".into(),
            key: "noisy".into(),
            at_ms,
            spec: 7,
        }),
        ..crate::policy::tests::deferred(id, 5, 1_000, 0.0)
    };
    for (id, at) in [("c", 3_000), ("a", 1_000), ("b", 2_000)] {
        deferrals.insert(&parked(id, at)).unwrap();
    }
    deferrals
        .insert(&crate::policy::tests::deferred("budget", 5, 1_000, 0.01))
        .unwrap();
    let get = |uri: String| {
        let api = &api;
        async move {
            let req = Request::get(uri.as_str()).body(Body::empty()).unwrap();
            let (status, _, json) = api.call(req).await;
            assert_eq!(status, StatusCode::OK, "{uri}: {json}");
            json
        }
    };
    let ids = |json: &serde_json::Value| -> Vec<String> {
        json["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["task_id"].as_str().unwrap().to_string())
            .collect()
    };
    let first = get("/v1/tasks?state=parked&limit=2".into()).await;
    assert_eq!(
        (first["state"].as_str(), first["total"].as_u64()),
        (Some("parked"), Some(3))
    );
    assert_eq!(ids(&first), ["a", "b"]);
    assert_eq!(
        first["tasks"][0]["turn"]["throttle"], "noisy-team",
        "{first}"
    );
    assert_eq!(first["tasks"][0]["turn"]["at_ms"], 1_000, "{first}");
    let next = first["next"].as_str().expect("more to come").to_string();
    let rest = get(format!("/v1/tasks?state=parked&cursor={next}")).await;
    assert_eq!(
        (ids(&rest), rest.get("next").and_then(|n| n.as_str())),
        (vec!["c".to_string()], None)
    );
    let budget = get("/v1/tasks?state=deferred".into()).await;
    assert_eq!(ids(&budget), ["budget"]);
    assert!(budget["tasks"][0].get("turn").is_none(), "{budget}");
    for bad in ["zz", "00000000000003e8", "00000000000003e800"] {
        let uri = format!("/v1/tasks?state=parked&cursor={bad}");
        let req = Request::get(uri.as_str()).body(Body::empty()).unwrap();
        let message = api.bad_request(req).await;
        assert!(message.contains("cursor"), "{uri}: {message}");
    }
    let req = Request::get("/v1/tasks?state=dispatched")
        .body(Body::empty())
        .unwrap();
    let message = api.bad_request(req).await;
    assert!(
        message.contains("use state=deferred, parked, finished"),
        "{message}"
    );
}

/// Serves the API on a real listener (a WebSocket upgrade needs a connection): its address.
async fn listening(state: &AppState) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(state.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The control socket's handshake, with its subprotocol.
fn control_socket_request(
    addr: std::net::SocketAddr,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/v1/control")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        super::control::PROTOCOL.parse().unwrap(),
    );
    req
}

/// `GET /v1/stream`, its response (the body streams until it ends).
async fn open_stream(api: &Api) -> axum::response::Response {
    router(api.state.clone())
        .oneshot(Request::get("/v1/stream").body(Body::empty()).unwrap())
        .await
        .unwrap()
}

/// Streams are bounded: past `http.max_streams` (two here) one more is a 503 to retry, and
/// a place comes back when a stream ends.
#[tokio::test]
async fn streams_past_the_limit_are_refused_until_one_ends() {
    let api = api(None, 4096);
    let open = || open_stream(&api);
    let (first, second) = (open().await, open().await);
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let (status, headers, json) = api
        .call(Request::get("/v1/stream").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(code(&json), "unavailable");
    assert!(headers.contains_key(header::RETRY_AFTER));
    assert_eq!(api.state.events.counters().refused.get(), 1);
    drop(first);
    assert_eq!(open().await.status(), StatusCode::OK, "the place came back");
    drop(second);
}

/// A live stream ends when the commander shuts down (the hub closes), and one opened
/// after ends at once: a stream that never ends held the shutdown, which waits for every
/// connection, for as long as a dashboard stayed open.
#[tokio::test]
async fn streams_end_when_the_commander_shuts_down() {
    use http_body_util::BodyExt;
    let api = api(None, 4096);
    let open = || open_stream(&api);
    let stream = open().await;
    assert_eq!(stream.status(), StatusCode::OK);
    let body = tokio::spawn(stream.into_body().collect());
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!body.is_finished(), "a live stream stays open");
    api.state.events.close();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), body).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(_)))),
        "the stream ended: {ended:?}"
    );
    let late = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        open().await.into_body().collect(),
    )
    .await;
    assert!(late.is_ok(), "a stream opened during shutdown ends at once");
    assert_eq!(api.state.events.counters().clients.get(), 0);
}

/// Control sockets are bounded as streams are: past `http.max_control_sockets` (two here)
/// the handshake is a 503 to retry, and a place comes back when a socket closes. Served
/// over a real listener, since an upgrade needs a connection.
#[tokio::test]
async fn control_sockets_past_the_limit_are_refused_until_one_closes() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite;
    let api = api(None, 4096);
    let addr = listening(&api.state).await;
    let connect = || async move {
        match tokio_tungstenite::connect_async(control_socket_request(addr)).await {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::Error::Http(r)) => Err(r.status()),
            Err(e) => panic!("websocket: {e}"),
        }
    };
    let counters = api.state.control.counters.clone();
    let first = connect().await.expect("the first socket opens");
    let _second = connect().await.expect("the second socket opens");
    assert_eq!(counters.sockets.get(), 2);
    assert_eq!(
        connect().await.err(),
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "the third is refused"
    );
    assert_eq!(counters.sockets_refused.get(), 1);

    let mut first = first;
    first.close(None).await.unwrap();
    // The server ends the session on the close frame; wait for its end of the handshake.
    while first.next().await.is_some() {}
    let mut reopened = None;
    for _ in 0..100 {
        if counters.sockets.get() < 2 {
            reopened = connect().await.ok();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(reopened.is_some(), "the place came back");
    assert_eq!(counters.sockets.get(), 2);
}

/// A control socket whose client stopped answering pings (its machine slept, its network
/// changed) is closed and gives its place back; one whose client answers stays open.
#[tokio::test]
async fn a_control_socket_whose_client_is_gone_is_closed() {
    use futures::StreamExt;
    let mut api = api(None, 4096);
    api.state.control.socket_ping = super::control::SocketPing {
        every: std::time::Duration::from_millis(50),
        silent_for: std::time::Duration::from_millis(300),
    };
    let addr = listening(&api.state).await;
    let connect = || async move {
        tokio_tungstenite::connect_async(control_socket_request(addr))
            .await
            .unwrap()
            .0
    };
    let counters = api.state.control.counters.clone();
    // This client never reads, so it never answers a ping.
    let _gone = connect().await;
    let alive = connect().await;
    let (pings_tx, mut pings) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut alive = alive;
        // Reading answers pings (tungstenite queues the pong and sends it as it reads).
        while let Some(Ok(m)) = alive.next().await {
            if m.is_ping() {
                let _ = pings_tx.send(());
            }
        }
    });
    assert_eq!(counters.sockets.get(), 2);
    let mut left = None;
    for _ in 0..500 {
        if counters.sockets.get() == 1 {
            left = Some(());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(left.is_some(), "the silent client's socket was closed");
    // Well past silent_for, the answering client is still open and still pinged.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    while pings.try_recv().is_ok() {}
    assert!(
        tokio::time::timeout(std::time::Duration::from_secs(10), pings.recv())
            .await
            .is_ok()
    );
    assert_eq!(counters.sockets.get(), 1);
    assert!(!reader.is_finished());
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

mod roles {
    use super::*;
    use crate::config::Role;

    fn keyed() -> Api {
        let roles = [
            ("vera", Role::Viewer, "t-viewer"),
            ("otto", Role::Operator, "t-operator"),
            ("cora", Role::Compliance, "t-compliance"),
            ("pete", Role::Producer, "t-producer"),
        ]
        .into_iter()
        .map(|(n, r, t)| (n.to_string(), r, t.to_string()))
        .collect();
        let auth = crate::config::AuthConfig {
            control_per_s: 1,
            control_burst: 3,
            ..Default::default()
        };
        api_with_roles(None, 1 << 20, roles, auth)
    }

    fn request(method: &str, path: &str, token: Option<&str>) -> Request<Body> {
        // Path parameters get a plausible value; the body is whatever the route reads.
        let uri = path.replace("{*file}", "app.js").replace(['{', '}'], "");
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        b.header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .unwrap()
    }

    #[tokio::test]
    async fn every_route_answers_401_without_a_token_and_403_to_a_role_it_does_not_admit() {
        let api = keyed();
        let token = |r: Role| match r {
            Role::Viewer => "t-viewer",
            Role::Operator => "t-operator",
            Role::Compliance => "t-compliance",
            Role::Producer => "t-producer",
        };
        for (method, path, access) in super::super::auth::ROUTES {
            if *path == "/v1/stream" || (*path == "/v1/control" && *method == "GET") {
                continue; // long-lived: checked below
            }
            let (status, _, body) = api.call(request(method, path, None)).await;
            match access {
                super::super::auth::Access::Public => {
                    assert_ne!(status, StatusCode::UNAUTHORIZED, "{method} {path}")
                }
                super::super::auth::Access::Roles(admitted) => {
                    assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
                    let (status, _, _) = api.call(request(method, path, Some("nope"))).await;
                    assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
                    for r in Role::ALL {
                        let (status, _, body) =
                            api.call(request(method, path, Some(token(r)))).await;
                        if admitted.contains(&r) {
                            assert!(
                                status != StatusCode::UNAUTHORIZED
                                    && status != StatusCode::FORBIDDEN,
                                "{method} {path} as {r:?}: {status} {body}"
                            );
                        } else {
                            assert_eq!(
                                status,
                                StatusCode::FORBIDDEN,
                                "{method} {path} as {r:?}: {body}"
                            );
                        }
                    }
                }
            }
        }
        for path in ["/v1/stream", "/v1/control"] {
            let (status, _, _) = api.call(request("GET", path, None)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
            let (status, _, _) = api.call(request("GET", path, Some("t-producer"))).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        }
        let refused =
            api.state
                .core
                .metrics
                .auth_refused
                .get_or_create(&crate::metrics::ReasonLabel {
                    reason: "wrong_role".into(),
                });
        assert!(refused.get() > 0);
    }

    #[test]
    fn every_route_of_the_router_declares_its_roles_and_the_docs_print_the_matrix() {
        let src = include_str!("mod.rs");
        let mut routed = Vec::new();
        for chunk in src.split(".route(").skip(1) {
            let path = chunk.trim_start().trim_start_matches('"');
            let path = &path[..path.find('"').unwrap()];
            routed.push(path.to_string());
        }
        assert!(routed.len() > 30, "{routed:?}");
        for path in &routed {
            assert!(
                super::super::auth::ROUTES.iter().any(|(_, p, _)| p == path),
                "route {path} declares no roles in auth::ROUTES"
            );
        }
        let docs = include_str!("../../../docs/api.md");
        assert!(
            docs.contains(&super::super::auth::matrix()),
            "docs/api.md must carry auth::matrix() as printed:\n{}",
            super::super::auth::matrix()
        );
    }

    #[tokio::test]
    async fn local_mode_lets_every_caller_do_everything_and_whoami_says_so() {
        let api = api(None, 1 << 20);
        let (status, body) = api.get("/v1/whoami").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["local_mode"], true);
        assert_eq!(body["roles"].as_array().unwrap().len(), 4);
        let keyed = keyed();
        let (_, _, body) = keyed
            .call(request("GET", "/v1/whoami", Some("t-operator")))
            .await;
        assert_eq!(body["name"], "otto");
        assert_eq!(body["roles"], serde_json::json!(["operator"]));
        assert_eq!(body["local_mode"], false);
    }

    /// Labelled as `curl -d` labels a body: a command is read as JSON whatever the label.
    fn command(token: &str, body: Value) -> Request<Body> {
        Request::post("/v1/control")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header("fleet-identity", "alice")
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    /// A dispatched task no worker reports running is cancelled in its pool's queue when
    /// its record knows its work message; without one it is a 409 that says why, and a
    /// queue that cannot be reached is a 503 that says the task was not cancelled.
    #[tokio::test]
    async fn a_dispatched_task_no_worker_runs_is_cancelled_in_its_queue_or_refused_with_why() {
        let api = keyed();
        let dispatched = |id: &str, seq: Option<u64>| {
            api.state
                .core
                .store
                .update(
                    id,
                    || crate::store::TaskRecord::new(id, 1),
                    |r| {
                        r.pool = Some("code".into());
                        r.attempt = 1;
                        r.work_sequence = seq;
                        r.advance(crate::store::TaskState::Dispatched);
                    },
                )
                .unwrap();
        };
        dispatched("old", None);
        dispatched("queued", Some(12));
        api.state
            .core
            .store
            .update("new", || crate::store::TaskRecord::new("new", 1), |_| {})
            .unwrap();
        let cancel = |id: &str| {
            command(
                "t-operator",
                serde_json::json!({"command": "cancel", "task_id": id}),
            )
        };
        for (id, says) in [
            ("old", "not known to wait in a pool's queue"),
            ("new", "has not been routed yet"),
        ] {
            let (status, _, ack) = api.call(cancel(id)).await;
            assert_eq!(status, StatusCode::CONFLICT, "{ack}");
            assert!(
                ack["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(says)),
                "{ack}"
            );
        }
        let (status, _, ack) = api.call(cancel("queued")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ack}");
        assert_eq!(
            ack["error"]["message"],
            "task queued was not cancelled: the work stream is out of reach in unit tests; retry"
        );
        let rec = api.state.core.store.get("queued").unwrap().unwrap();
        assert_eq!(
            rec.state,
            crate::store::TaskState::Dispatched,
            "nothing changed"
        );
    }

    #[tokio::test]
    async fn control_commands_are_acked_audited_and_rate_limited() {
        let api = keyed();
        // A pool the config knows: pausing it is an operator intervention in force.
        let (status, _, ack) = api
            .call(command("t-operator", serde_json::json!({"id": "c1", "command": "pause", "pool": "code", "reason": "deploy"})))
            .await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        assert_eq!(ack["id"], "c1");
        assert_eq!(ack["ok"], true);
        let i = &ack["state"]["intervention"];
        assert_eq!(i["action"], "pause");
        assert_eq!(i["state"], "active");
        assert_eq!(i["rule"], "operator");
        let active = api.state.alerts.interventions.active();
        assert_eq!(active.len(), 1);
        // An unknown worker is refused, with why.
        let (status, _, ack) = api
            .call(command(
                "t-operator",
                serde_json::json!({"command": "drain", "worker": "ghost"}),
            ))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{ack}");
        assert_eq!(ack["ok"], false);
        assert_eq!(ack["error"]["code"], "not_found");
        // Resume ends the pause.
        let (status, _, ack) = api
            .call(command(
                "t-operator",
                serde_json::json!({"command": "resume", "pool": "code"}),
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        assert_eq!(ack["state"]["ended"].as_array().unwrap().len(), 1);
        assert!(api.state.alerts.interventions.active().is_empty());
        // The burst (3) is spent: the next is refused 429 and audited too.
        let (status, _, ack) = api
            .call(command(
                "t-operator",
                serde_json::json!({"command": "resume", "pool": "code"}),
            ))
            .await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{ack}");
        assert_eq!(ack["error"]["code"], "rate_limited");
        let (_, _, log) = api
            .call(request("GET", "/v1/control/audit", Some("t-viewer")))
            .await;
        let records = log["records"].as_array().unwrap();
        assert_eq!(records.len(), 4, "{log}");
        assert_eq!(records[3]["who"], "otto (alice)");
        assert_eq!(records[3]["request"]["reason"], "deploy");
        assert_eq!(records[3]["ok"], true);
        assert_eq!(records[0]["result"]["code"], "rate_limited");
        // A viewer may read but not act.
        let (status, _, _) = api
            .call(command(
                "t-viewer",
                serde_json::json!({"command": "lift_cost_cap"}),
            ))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

    /// A command's text is bounded: a `reason` over 1,000 characters is refused, and what
    /// the audit keeps of any field, refused commands' included, is cut to 1,000.
    #[tokio::test]
    async fn a_command_s_text_is_bounded_in_what_it_asks_and_what_the_audit_keeps() {
        let api = api(None, 1 << 20);
        let lift = |reason: String| {
            command(
                "x",
                serde_json::json!({"command": "lift_cost_cap", "reason": reason}),
            )
        };
        let (status, _, ack) = api.call(lift("r".repeat(1_001))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{ack}");
        assert_eq!(
            ack["error"]["message"],
            "reason is 1001 characters; at most 1000"
        );
        let (status, _, ack) = api.call(lift("é".repeat(1_000))).await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        let (status, _, ack) = api
            .call(command(
                "x",
                serde_json::json!({"command": "drain", "worker": "w".repeat(5_000)}),
            ))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{ack}");
        let (_, _, log) = api.call(request("GET", "/v1/control/audit", None)).await;
        let kept = log["records"][0]["request"]["worker"].as_str().unwrap();
        assert_eq!(kept, format!("{}…", "w".repeat(1_000)));
    }

    #[tokio::test]
    async fn routing_changes_and_the_cost_cap_take_effect_in_the_live_snapshot_at_once() {
        let api = api(None, 1 << 20);
        let (status, _, ack) = api
            .call(command(
                "x",
                serde_json::json!({"command": "block_pool", "pool": "docs"}),
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        assert_eq!(ack["state"]["blocked"], true);
        let live = api.state.core.policy.live();
        assert_eq!(live.blocks.len(), 1);
        let (_, _, ack) = api
            .call(command(
                "x",
                serde_json::json!({"command": "reroute_pool", "pool": "code", "to": "docs"}),
            ))
            .await;
        assert_eq!(ack["state"]["rerouted_to"], "docs", "{ack}");
        let (_, _, ack) = api
            .call(command(
                "x",
                serde_json::json!({"command": "weight_pool", "pool": "docs", "weight": 3.0}),
            ))
            .await;
        assert_eq!(ack["state"]["weight"], 3.0, "{ack}");
        let (_, _, ack) = api
            .call(command(
                "x",
                serde_json::json!({"command": "weight_pool", "pool": "docs", "weight": 0.5}),
            ))
            .await;
        assert_eq!(
            ack["state"]["weight"], 0.5,
            "a new weight replaces the old: {ack}"
        );
        assert_eq!(
            api.state.core.policy.live().hints.pool_weights,
            vec![("docs".to_string(), 0.5)]
        );
        let (status, _, _) = api
            .call(command(
                "x",
                serde_json::json!({"command": "weight_pool", "pool": "docs", "weight": 0.0}),
            ))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (_, _, ack) = api
            .call(command(
                "x",
                serde_json::json!({"command": "restore_pool", "pool": "docs"}),
            ))
            .await;
        assert_eq!(ack["state"]["blocked"], false, "{ack}");
        assert_eq!(
            ack["state"]["weight"], 1.0,
            "restore ends the weight too: {ack}"
        );
        assert!(api.state.core.policy.live().hints.pool_weights.is_empty());
        assert_eq!(api.state.core.policy.live().reroutes.len(), 1);

        let (status, _, ack) = api
            .call(command(
                "x",
                serde_json::json!({"command": "cost_cap", "usd": 2.5, "window": "1h"}),
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        let budgets = &api.state.core.policy.live().policy.budgets;
        let cap = budgets
            .iter()
            .find(|b| b.spec.name == crate::policy::COST_CAP_BUDGET)
            .expect("the cap is a budget in force");
        assert_eq!(cap.spec.limit_usd, 2.5);
        // A policy swap keeps it.
        let (status, _, _) = api.call(put_policy(None, GOOD_POLICY)).await;
        assert_ne!(
            status,
            StatusCode::OK,
            "local mode still needs the compliance token to push"
        );
        let policy = api
            .state
            .core
            .policy
            .parse(vec![Document {
                name: "ops.policy.toml".into(),
                text: GOOD_POLICY.into(),
            }])
            .unwrap();
        api.state.core.policy.swap(policy, 7, Source::Http, "test");
        let names: Vec<String> = api
            .state
            .core
            .policy
            .live()
            .policy
            .budgets
            .iter()
            .map(|b| b.spec.name.clone())
            .collect();
        assert_eq!(
            names,
            vec![
                "daily".to_string(),
                crate::policy::COST_CAP_BUDGET.to_string()
            ]
        );
        let (_, _, ack) = api
            .call(command(
                "x",
                serde_json::json!({"command": "cost_cap", "usd": 1.0, "window": "fortnight"}),
            ))
            .await;
        assert_eq!(ack["ok"], false, "{ack}");
        let (_, _, ack) = api
            .call(command(
                "x",
                serde_json::json!({"command": "lift_cost_cap"}),
            ))
            .await;
        assert_eq!(ack["ok"], true, "{ack}");
        assert_eq!(api.state.core.policy.live().policy.budgets.len(), 1);
    }

    /// Another operator's Policy page reloads on `policy` events: setting, changing or
    /// lifting the cost cap is one, though the policy's version and hash stay the same.
    #[tokio::test]
    async fn the_feed_sends_a_policy_event_when_the_cost_cap_changes() {
        let api = api(None, 1 << 20);
        let s = &api.state;
        let mut sub = s.events.subscribe(None);
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        tokio::spawn(crate::api::stream::feed(
            s.events.clone(),
            s.core.fleet.clone(),
            s.alerts.clone(),
            s.core.policy.clone(),
            stop,
        ));
        // The feed sends a snapshot every second: the wait is for the next policy event.
        let mut next_policy = async || -> Value {
            let policy_event = async {
                loop {
                    let ev = sub.rx.recv().await.unwrap();
                    if ev.kind == crate::events::Kind::Policy {
                        break ev;
                    }
                }
            };
            let ev = tokio::time::timeout(std::time::Duration::from_secs(10), policy_event)
                .await
                .expect("a policy event within 10 s");
            let frame = std::str::from_utf8(&ev.frame).unwrap();
            let data = frame.lines().find_map(|l| l.strip_prefix("data: "));
            serde_json::from_str(data.unwrap()).unwrap()
        };
        let first = next_policy().await;
        assert_eq!(first["cost_cap"], Value::Null, "{first}");
        s.core
            .policy
            .set_cost_cap(Some((5.0, "1h")), "ops")
            .unwrap();
        let set = next_policy().await;
        assert_eq!(set["version"], first["version"]);
        assert_eq!(set["sha256"], first["sha256"]);
        assert_eq!(set["cost_cap"]["limit_usd"], 5.0, "{set}");
        assert_eq!(set["cost_cap"]["set_by"], "ops", "{set}");
        s.core
            .policy
            .set_cost_cap(Some((2.5, "1h")), "oncall")
            .unwrap();
        assert_eq!(next_policy().await["cost_cap"]["limit_usd"], 2.5);
        s.core.policy.set_cost_cap(None, "oncall").unwrap();
        assert_eq!(next_policy().await["cost_cap"], Value::Null);
    }

    #[tokio::test]
    async fn the_stream_sends_typed_events_with_ids_filters_them_and_resumes() {
        use http_body_util::BodyExt;
        let api = api(None, 1 << 20);
        let open = |uri: &str, last: Option<&str>| {
            let mut b = Request::get(uri);
            if let Some(l) = last {
                b = b.header("last-event-id", l);
            }
            router(api.state.clone()).oneshot(b.body(Body::empty()).unwrap())
        };
        let resp = open("/v1/stream?kinds=decision,alert&pool=code", None)
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE].to_str().unwrap(),
            "text/event-stream"
        );
        let hub = &api.state.events;
        hub.publish(
            crate::events::Kind::Decision,
            Some("docs"),
            None,
            &"other pool",
        );
        hub.publish(crate::events::Kind::Policy, None, None, &"not asked for");
        hub.publish(crate::events::Kind::Decision, Some("code"), None, &"mine");
        let mut first = resp.into_body();
        let frame = tokio::time::timeout(std::time::Duration::from_secs(5), first.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let text = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
        assert_eq!(text, "id: 3\nevent: decision\ndata: \"mine\"\n\n");
        // A client that saw event 1 gets 2 and 3 again (its filters apply).
        let resp = open("/v1/stream", Some("1")).await.unwrap();
        let mut second = resp.into_body();
        let mut got = String::new();
        while !got.contains("id: 3") {
            let f = tokio::time::timeout(std::time::Duration::from_secs(5), second.frame())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            got.push_str(std::str::from_utf8(&f.into_data().unwrap()).unwrap());
        }
        assert!(got.starts_with("id: 2\nevent: policy"), "{got}");
        let (status, _) = api.get("/v1/stream?kinds=gossip").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(api.state.events.counters().clients.get(), 2);
        drop((first, second));
        assert_eq!(api.state.events.counters().clients.get(), 0);
    }
}

/// With several replicas sharing the intake stream, a task accepted here may be run by
/// another: its record here is the stub `POST /v1/tasks` wrote, which no intake loop here
/// replaces. `GET /v1/tasks/{id}` finishes it from the results stream, once the task has
/// a result there that is this task's, from a run another replica dispatched.
#[tokio::test]
async fn a_task_accepted_here_and_run_elsewhere_is_told_from_its_result() {
    let api = api(None, 1 << 20);
    let from = |replica: Option<&str>, payload: &'static [u8], stored_ms: u64| {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(r) = replica {
            headers.insert("Fleet-Replica", r);
        }
        Ok(StoredResult {
            payload: bytes::Bytes::from_static(payload),
            headers,
            stored_ms: Some(stored_ms),
        })
    };
    let stored =
        |payload: &'static [u8], stored_ms: u64| from(Some("00000000000000bb"), payload, stored_ms);
    let now_ms = crate::domain::Clock::now_ms(&crate::domain::SystemClock);
    for id in ["t-far", "t-old-result", "t-other"] {
        let body = format!(r#"{{"schema":1,"id":"{id}","description":"x"}}"#);
        let (status, _, json) = api.call(post_task().body(Body::from(body)).unwrap()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    }
    assert_eq!(
        api.state.core.store.stubs().len(),
        3,
        "every stub is watched"
    );

    // No result yet: `received`, as before. Nor when the result names no replica, or
    // this one: the results loop applies those (this replica dispatched the run, and its
    // record of the dispatch may not be written yet).
    let (status, json) = api.get("/v1/tasks/t-far").await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["state"], "received");
    let far = br#"{"schema":1,"task_id":"t-far","attempt":1,"status":"ok"}"#;
    for replica in [None, Some(HERE)] {
        api.intake
            .results
            .lock()
            .unwrap()
            .insert("t-far".into(), from(replica, far, now_ms + 1_000));
        let (_, json) = api.get("/v1/tasks/t-far").await;
        assert_eq!(json["state"], "received", "{replica:?}: {json}");
    }

    // Its result is in the stream: the record tells how it ended, and stays so.
    api.intake.results.lock().unwrap().insert(
        "t-far".into(),
        stored(
            br#"{"schema":1,"task_id":"t-far","attempt":1,"status":"failed","pool":"code","worker_id":"w9","error":{"code":"tool_error","message":"boom"}}"#,
            now_ms + 1_000,
        ),
    );
    let (status, json) = api.get("/v1/tasks/t-far").await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["state"], "failed", "{json}");
    assert_eq!(json["pool"], "code");
    assert_eq!(json["outcome"]["worker_id"], "w9");
    assert_eq!(json["outcome"]["error"]["code"], "tool_error");
    assert_eq!(json["history"][0]["state"], "failed");
    api.intake.results.lock().unwrap().clear();
    let rec = api.state.core.store.get("t-far").unwrap().unwrap();
    assert_eq!(
        rec.state,
        crate::store::TaskState::Failed,
        "written, not only shown"
    );
    assert_eq!(api.state.core.metrics.tasks_finished_elsewhere.get(), 1);
    assert_eq!(api.state.core.store.stubs().len(), 2, "no longer watched");

    // A result stored long before this commander accepted the task is an earlier task's
    // under the same id; a result naming another task is not this one's.
    api.intake.results.lock().unwrap().insert(
        "t-old-result".into(),
        stored(
            br#"{"schema":1,"task_id":"t-old-result","attempt":1,"status":"ok"}"#,
            now_ms - 3_600_000,
        ),
    );
    api.intake.results.lock().unwrap().insert(
        "t-other".into(),
        stored(
            br#"{"schema":1,"task_id":"t-far","attempt":1,"status":"ok"}"#,
            now_ms + 1_000,
        ),
    );
    for id in ["t-old-result", "t-other"] {
        let (status, json) = api.get(&format!("/v1/tasks/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        assert_eq!(json["state"], "received", "{id}: {json}");
    }

    // A record the intake loop wrote here is never touched by the results stream.
    api.state
        .core
        .store
        .update(
            "t-other",
            || unreachable!("the stub is there"),
            |r| r.advance(crate::store::TaskState::Dispatched),
        )
        .unwrap();
    api.intake.results.lock().unwrap().insert(
        "t-other".into(),
        stored(
            br#"{"schema":1,"task_id":"t-other","attempt":1,"status":"ok"}"#,
            now_ms + 1_000,
        ),
    );
    let (_, json) = api.get("/v1/tasks/t-other").await;
    assert_eq!(json["state"], "dispatched", "{json}");
    assert_eq!(json["replica"], HERE, "the replica that keeps the record");
    assert_eq!(api.state.core.metrics.tasks_finished_elsewhere.get(), 1);
}

/// A replica without a record of a task, or with only the record of its HTTP submission,
/// answers with the record of the replica that keeps it; a task no replica knows is 404.
#[tokio::test]
async fn a_task_another_replica_keeps_is_answered_with_its_record() {
    let api = api(None, 1 << 20);
    let theirs = |id: &str, state: &str| serde_json::json!({"id": id, "state": state, "replica": "00000000000000bb", "history": []});
    api.peers
        .records
        .lock()
        .unwrap()
        .insert("t-there".into(), theirs("t-there", "dispatched"));
    let (status, json) = api.get("/v1/tasks/t-there").await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json, theirs("t-there", "dispatched"));

    let body = r#"{"schema":1,"id":"t-sent-here","description":"x"}"#;
    let (status, _, json) = api.call(post_task().body(Body::from(body)).unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    let (_, json) = api.get("/v1/tasks/t-sent-here").await;
    assert_eq!(json["state"], "received", "no replica has more: {json}");
    assert_eq!(json["replica"], HERE);
    api.peers
        .records
        .lock()
        .unwrap()
        .insert("t-sent-here".into(), theirs("t-sent-here", "deferred"));
    let (_, json) = api.get("/v1/tasks/t-sent-here").await;
    assert_eq!(
        json,
        theirs("t-sent-here", "deferred"),
        "the replica that took it"
    );

    let (status, json) = api.get("/v1/tasks/t-nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{json}");
    assert_eq!(code(&json), "not_found");

    // An operator's cancel goes to the replica that keeps the record, and its answer back.
    let cancel = |id: &str| {
        Request::post("/v1/control")
            .header("fleet-identity", "alice")
            .body(Body::from(
                serde_json::json!({"command": "cancel", "task_id": id, "reason": "loop"})
                    .to_string(),
            ))
            .unwrap()
    };
    let (status, _, ack) = api.call(cancel("t-there")).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(ack["state"]["replica"], "00000000000000bb", "{ack}");
    assert_eq!(ack["state"]["reason"], "loop", "{ack}");
    let (status, _, ack) = api.call(cancel("t-nowhere")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{ack}");
}

/// A record here that says `deferred` answers for the task while the task waits here. Once
/// it no longer does (released to the intake stream, or handed to the other replicas as
/// this one stopped), the replica that keeps the task now answers, and takes the cancel;
/// this one used to answer with its own `deferred` record, and refuse the cancel (409, "it
/// was released a moment ago") for as long as the task ran elsewhere.
#[tokio::test]
async fn a_task_deferred_here_and_let_go_is_answered_by_the_replica_that_keeps_it() {
    let api = api(None, 1 << 20);
    let id = "t-let-go";
    api.state
        .core
        .store
        .update(
            id,
            || crate::store::TaskRecord::new(id, 3),
            |r| r.advance(crate::store::TaskState::Deferred),
        )
        .unwrap();
    let waiting = crate::policy::tests::deferred(id, 5, 1_000, 0.01);
    let deferrals = &api.state.core.policy.deferrals;
    deferrals.insert(&waiting).unwrap();
    let theirs = serde_json::json!({"id": id, "state": "dispatched", "replica": "00000000000000bb", "history": []});
    api.peers
        .records
        .lock()
        .unwrap()
        .insert(id.into(), theirs.clone());
    let (_, json) = api.get(&format!("/v1/tasks/{id}")).await;
    assert_eq!(json["state"], "deferred", "it waits here: {json}");
    assert_eq!(json["replica"], HERE, "{json}");

    deferrals.remove(&waiting).unwrap();
    let (_, json) = api.get(&format!("/v1/tasks/{id}")).await;
    assert_eq!(json, theirs, "the replica that took it");
    let cancel = Request::post("/v1/control")
        .header("fleet-identity", "alice")
        .body(Body::from(
            serde_json::json!({"command": "cancel", "task_id": id}).to_string(),
        ))
        .unwrap();
    let (status, _, ack) = api.call(cancel).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack["state"]["replica"], "00000000000000bb", "{ack}");

    // No other replica keeps it (on its way through the intake stream): this record.
    api.peers.records.lock().unwrap().clear();
    let (_, json) = api.get(&format!("/v1/tasks/{id}")).await;
    assert_eq!(json["state"], "deferred", "{json}");
    assert_eq!(json["replica"], HERE, "{json}");
}

/// With other replicas running, the deferred listing is the fleet's: each replica's queue
/// merged in release order (priority, then age), paged with one cursor, every task once,
/// the total summed, each task saying which replica holds it. Each replica used to list
/// its own queue only: an operator behind a load balancer saw a part of what waited,
/// another part at each refresh.
#[tokio::test]
async fn the_deferred_listing_merges_every_replica_s_queue_in_release_order() {
    let api = api(None, 4096);
    let task = |id: &str, priority: u8, at_ms: u64| {
        crate::policy::tests::deferred(id, priority, at_ms, 0.01)
    };
    for t in [
        task("here-p9", 9, 3_000),
        task("here-old", 5, 1_000),
        task("here-new", 5, 6_000),
    ] {
        api.state.core.policy.deferrals.insert(&t).unwrap();
    }
    let peer = |mut tasks: Vec<crate::policy::DeferredTask>| {
        tasks.sort_by_key(|t| t.key());
        tasks
    };
    *api.peers.waiting.lock().unwrap() = vec![
        peer(vec![
            task("b-p9", 9, 4_000),
            task("b-mid", 5, 2_000),
            task("b-low", 1, 500),
        ]),
        peer(vec![task("c-mid", 5, 5_000), task("here-new", 5, 6_000)]),
    ];
    let mut listed = Vec::new();
    let mut uri = "/v1/tasks?state=deferred&limit=2".to_string();
    loop {
        let (ids, json) = api.listed(&uri).await;
        assert_eq!(json["total"], 8, "{json}");
        assert_eq!(json["replicas"], 3, "{json}");
        listed.extend(ids);
        match json["next"].as_str() {
            Some(next) => uri = format!("/v1/tasks?state=deferred&limit=2&cursor={next}"),
            None => break,
        }
        assert!(listed.len() < 20, "pages do not end: {listed:?}");
    }
    // A task handed over between two replicas is listed once.
    assert_eq!(
        listed,
        [
            "here-p9", "b-p9", "here-old", "b-mid", "c-mid", "here-new", "b-low"
        ]
    );
    let (_, json) = api.listed("/v1/tasks?state=deferred&limit=3").await;
    let replicas: Vec<_> = json["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["replica"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(replicas, [HERE, "peer-0", HERE], "{json}");
}

/// `state=finished` is the fleet's: every replica's tasks, newest first, paged by the keys
/// they share; a task that another replica ran is listed once, by that replica, while it
/// answers, and by the one keeping a copy of how it ended when it does not.
#[tokio::test]
async fn the_finished_listing_merges_every_replica_s_tasks_newest_first_each_once() {
    use fleet_worker::message::{ResultStatus, TaskResult};
    const B: &str = "00000000000000bb";
    const C: &str = "00000000000000cc";
    const GONE: &str = "00000000000000dd";
    let api = api(None, 4096);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let b = Arc::new(Store::open(dirs[0].path()).unwrap());
    let c = Arc::new(Store::open(dirs[1].path()).unwrap());
    *api.peers.finished.lock().unwrap() = vec![(B.into(), b.clone()), (C.into(), c.clone())];
    let ok = |id: &str| {
        let mut r = TaskResult::rejected(id, "x", "x");
        r.status = ResultStatus::Ok;
        r.error = None;
        r
    };
    let end = |store: &Store, id: &str| {
        store
            .update(
                id,
                || crate::store::TaskRecord::new(id, 1),
                |r| r.finish(&ok(id)),
            )
            .unwrap();
    };
    // A copy: submitted (or deferred) on `store`, run by `keeper`.
    let copy = |store: &Store, id: &str, keeper: &str| {
        store.accepted(id, 1).unwrap();
        store
            .finish_elsewhere(id, &ok(id), keeper)
            .unwrap()
            .unwrap();
    };
    let here = &api.state.core.store;
    for step in 0..8 {
        match step {
            0 => end(here, "h1"),
            1 => end(&b, "b2"),
            2 => end(here, "h3"),
            3 => end(&c, "c4"),
            4 => end(&b, "sub"),
            5 => copy(here, "sub", B),
            6 => end(&b, "b7"),
            _ => copy(&c, "orphan", GONE),
        }
        // One millisecond apart at least, so the order is theirs.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let want = ["orphan", "b7", "sub", "c4", "h3", "b2", "h1"];
    for limit in [1, 2, 3, 100] {
        let mut listed = Vec::new();
        let mut uri = format!("/v1/tasks?state=finished&limit={limit}");
        loop {
            let (ids, json) = api.listed(&uri).await;
            assert_eq!(json["replicas"], 3, "{json}");
            assert!(ids.len() <= limit, "{json}");
            listed.extend(ids);
            match json["next"].as_str() {
                Some(next) => uri = format!("/v1/tasks?state=finished&limit={limit}&cursor={next}"),
                None => break,
            }
            assert!(listed.len() < 20, "pages do not end: {listed:?}");
        }
        assert_eq!(listed, want, "limit {limit}");
    }
    let (_, json) = api.listed("/v1/tasks?state=finished").await;
    let keepers: Vec<_> = json["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["replica"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keepers, [GONE, B, B, C, HERE, B, HERE], "{json}");
    // Examined: 3 here (with the copy), 3 on b and 2 on c.
    assert_eq!(json["scanned"], 8, "{json}");
    // The copy here, with the replica that ran it named. `GET /v1/tasks/sub` here answers
    // with that replica's record, and with the copy while that one does not answer.
    let rec = here.get("sub").unwrap().unwrap();
    assert_eq!(rec.kept_by.as_deref(), Some(B));
    let theirs =
        serde_json::json!({"id": "sub", "state": "completed", "replica": B, "history": []});
    api.peers
        .records
        .lock()
        .unwrap()
        .insert("sub".into(), theirs.clone());
    assert_eq!(api.get("/v1/tasks/sub").await.1, theirs);
    api.peers.records.lock().unwrap().clear();
    let (_, copy) = api.get("/v1/tasks/sub").await;
    assert_eq!(
        (&copy["replica"], &copy["kept_by"]),
        (&serde_json::json!(HERE), &serde_json::json!(B)),
        "{copy}"
    );
    // With b gone, its tasks are not listed, and the copy here stands in for it.
    api.peers.finished.lock().unwrap().remove(0);
    let (ids, json) = api.listed("/v1/tasks?state=finished").await;
    assert_eq!(ids, ["orphan", "sub", "c4", "h3", "h1"], "{json}");
    assert_eq!(json["replicas"], 2);
    assert_eq!(json["tasks"][1]["replica"], B);
}

/// `GET /v1/decisions/{task_id}` answers on any replica: a replica that does not keep the
/// task's record shows the latest decision the replicas logged for it (a task deferred
/// here and released may have been decided again elsewhere); one that keeps it shows its
/// own. Before, a replica showed its own log only: 404 for a task another replica
/// decided, and the old deferral for one released from here.
#[tokio::test]
async fn a_decision_is_found_on_the_replica_that_made_it_from_any_replica() {
    use crate::store::TaskState;
    let api = api(None, 4096);
    let store = &api.state.core.store;
    let log = &api.state.core.decisions;
    let decide = |id: &str, at_ms: u64, outcome: crate::decisions::Outcome, state: TaskState| {
        let mut d = crate::decisions::tests::rec(id, at_ms, "alpha", "cost_tier");
        d.outcome = outcome;
        log.record(&d).unwrap();
        store
            .update(
                id,
                || crate::store::TaskRecord::new(id, 1),
                |r| {
                    r.decision_at_ms = Some(at_ms);
                    r.advance(state);
                },
            )
            .unwrap();
    };
    let theirs = |id: &str, at_ms: u64| serde_json::json!({"task_id": id, "at_ms": at_ms, "outcome": "dispatched", "pool": "alpha"});
    // Deferred here, released (it waits here no more), and dispatched elsewhere.
    decide(
        "let-go",
        1_000,
        crate::decisions::Outcome::Deferred,
        TaskState::Deferred,
    );
    // Kept here: its own decision, whatever another replica says.
    decide(
        "mine",
        3_000,
        crate::decisions::Outcome::Dispatched,
        TaskState::Dispatched,
    );
    *api.peers.decisions.lock().unwrap() = vec![
        theirs("let-go", 2_000),
        theirs("mine", 9_000),
        theirs("elsewhere", 5),
        theirs("elsewhere", 7),
    ];
    let (status, d) = api.get("/v1/decisions/let-go").await;
    assert_eq!((status, &d), (StatusCode::OK, &theirs("let-go", 2_000)));
    let (_, d) = api.get("/v1/decisions/mine").await;
    assert_eq!(
        (&d["at_ms"], &d["outcome"]),
        (&serde_json::json!(3_000), &serde_json::json!("dispatched")),
        "{d}"
    );
    let (_, d) = api.get("/v1/decisions/elsewhere").await;
    assert_eq!(d, theirs("elsewhere", 7), "the latest of the answers");
    let (status, _) = api.get("/v1/decisions/nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // With no other replica answering, the deferral logged here.
    api.peers.decisions.lock().unwrap().clear();
    let (_, d) = api.get("/v1/decisions/let-go").await;
    assert_eq!(
        (&d["at_ms"], &d["outcome"]),
        (&serde_json::json!(1_000), &serde_json::json!("deferred")),
        "{d}"
    );
}

/// A shadow replay re-decides this replica's decisions; with other replicas sharing the
/// intake it says so among its caveats, since it covers about 1/N of the fleet's.
#[tokio::test]
async fn a_replay_says_it_covers_this_replica_s_decisions_only() {
    let api = api(None, 4096);
    let candidate = "[[throttle]]\nname = \"slow\"\nscope = \"pool\"\ntasks_per_s = 1\n";
    let replay = async || {
        let req = Request::post("/v1/policy/replay?last=1h")
            .body(Body::from(candidate))
            .unwrap();
        let (status, _, json) = api.call(req).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        json["caveats"].as_array().unwrap().clone()
    };
    let says_replicas = |caveats: &[Value]| {
        caveats.iter().any(|c| {
            c.as_str()
                .unwrap()
                .contains("commander replicas share the intake")
        })
    };
    assert!(!says_replicas(&replay().await), "alone: the whole fleet's");
    api.state.core.policy.set_replicas(3);
    let caveats = replay().await;
    assert!(says_replicas(&caveats), "{caveats:?}");
    assert!(caveats.iter().any(|c| {
        c.as_str()
            .unwrap()
            .starts_with("only this replica's decisions: 3")
    }));
}
