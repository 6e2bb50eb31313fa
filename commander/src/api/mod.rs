//! The HTTP API: health, task submission and lookup, metrics.
//!
//! `POST /v1/tasks` takes the same durable path as NATS submissions: it validates, then
//! publishes to the intake stream and answers only after JetStream has stored the task.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap as HttpHeaders, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fleet_worker::message::{FieldProblem, Task, TaskError};
use fleet_worker::producer::{Producer, ProducerError, StoredResult, SubmitOptions, SubmitReceipt};
use fleet_worker::protocol::{headers, is_subject_token};
use fleet_worker::trace::{Baggage, TraceParent, parse_tracestate};
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::json;

use crate::metrics::{StateLabel, TransportLabel};

mod alerts;
pub mod auth;
pub mod console;
pub mod control;
mod decisions;
mod finished;
mod fleet;
mod listing;
pub mod peers;
mod policy;
mod result;
pub mod stream;
#[cfg(test)]
mod tests;
mod traces;
use crate::store::TaskRecord;
use crate::supervise::Supervisor;

/// Where `POST /v1/tasks` puts a task, and where `GET /v1/tasks/{id}/result` reads its
/// result: in service the intake and results streams, through the same [`Producer`] a
/// NATS producer uses; a submission's answer is the stream's durable ack.
pub trait Intake: Send + Sync + std::fmt::Debug {
    fn submit<'a>(
        &'a self,
        task: &'a Task,
        opts: SubmitOptions,
    ) -> BoxFuture<'a, Result<SubmitReceipt, ProducerError>>;

    /// The task's latest result as published, waiting up to `wait` for one (zero: look
    /// once); `Ok(None)` when there is none in that time.
    fn result<'a>(
        &'a self,
        task_id: &'a str,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Option<StoredResult>, ProducerError>>;
}

impl Intake for Producer {
    fn submit<'a>(
        &'a self,
        task: &'a Task,
        opts: SubmitOptions,
    ) -> BoxFuture<'a, Result<SubmitReceipt, ProducerError>> {
        Box::pin(Producer::submit(self, task, opts))
    }

    fn result<'a>(
        &'a self,
        task_id: &'a str,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Option<StoredResult>, ProducerError>> {
        Box::pin(Producer::stored_result(self, task_id, wait))
    }
}

/// Where `PUT /v1/policy` sends a checked, authorised policy: in service the policy
/// bucket every replica follows ([`crate::policy::sync::PolicySync::propose`]). Returns
/// the version in force afterwards.
pub trait PolicyWriter: Send + Sync + std::fmt::Debug {
    fn propose<'a>(
        &'a self,
        docs: Vec<crate::policy::Document>,
        source: crate::policy::Source,
        identity: &'a str,
    ) -> BoxFuture<'a, Result<String, crate::policy::PolicyError>>;
}

impl PolicyWriter for crate::policy::sync::PolicySync {
    fn propose<'a>(
        &'a self,
        docs: Vec<crate::policy::Document>,
        source: crate::policy::Source,
        identity: &'a str,
    ) -> BoxFuture<'a, Result<String, crate::policy::PolicyError>> {
        Box::pin(crate::policy::sync::PolicySync::propose(
            self, docs, source, identity,
        ))
    }
}

/// What handlers share. Nothing in it needs a live broker: the two writes that reach NATS
/// go through [`Intake`] and [`PolicyWriter`].
#[derive(Clone, Debug)]
pub struct AppState {
    /// What the task path and the API share: the store, metrics, live fleet state,
    /// decision log, classifier, and the policy engine with the live snapshot.
    pub core: crate::pipeline::Core,
    /// Takes HTTP submissions, exactly as a NATS producer's would be taken.
    pub intake: Arc<dyn Intake>,
    /// Takes authorised policy pushes.
    pub policies: Arc<dyn PolicyWriter>,
    /// The other commander replicas, asked for the records this one does not keep.
    pub peers: Arc<dyn peers::Peers>,
    /// The open alerts and the alert log.
    pub alerts: crate::detect::run::Alerts,
    /// The Prometheus registry `/metrics` renders.
    pub registry: Arc<Registry>,
    /// Set once NATS is connected and the streams exist; cleared on shutdown.
    pub ready: Arc<AtomicBool>,
    pub max_body_bytes: usize,
    /// Required by `PUT /v1/policy` (`Authorization: Bearer …`); unset refuses pushes.
    pub compliance_token: Option<String>,
    /// Which long-lived tasks are down (for `/readyz`); counts panics.
    pub supervisor: Supervisor,
    /// The bearer tokens and their roles (none: local mode).
    pub auth: auth::Keys,
    /// The live event hub `/v1/stream` serves.
    pub events: crate::events::Hub,
    /// The control plane: its audit, rate limit and how it reaches workers.
    pub control: control::Control,
}

/// The one error type of the API; the only place errors become HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadTask(#[from] TaskError),
    #[error("{0}")]
    BadRequest(String),
    /// What was not found, in words ("task t-1 not found").
    #[error("{0}")]
    NotFound(String),
    /// What existed and is no longer kept (a result older than the results stream keeps).
    #[error("{0}")]
    Gone(String),
    /// A policy (or other document) with these problems.
    #[error("{} problem(s)", .0.len())]
    Invalid(Vec<crate::domain::Problem>),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// The request does not fit the resource's state ("intervention x is reverted").
    #[error("{0}")]
    Conflict(String),
    /// Too many requests from this caller (the control plane's rate limit).
    #[error("{0}")]
    RateLimited(String),
    /// The intake stream did not take a submission: the cause says whether anything was
    /// sent ("not connected … nothing was sent") or the answer is unknown (no PubAck).
    #[error("task intake is unavailable ({0}); retry later")]
    Unavailable(String),
    /// Larger than NATS takes in one message (`max_payload`): sending it again cannot help.
    #[error("{0}")]
    TooLarge(String),
    /// A bounded resource is full (every `/v1/stream` place taken), or a peer did not
    /// answer in time (a worker told to cancel): retry later. The message says which.
    #[error("{0}")]
    Busy(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status and the error code of the one error shape.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadTask(TaskError::Invalid(_)) => (StatusCode::BAD_REQUEST, "invalid_task"),
            ApiError::BadTask(TaskError::Parse(_)) => (StatusCode::BAD_REQUEST, "bad_json"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Gone(_) => (StatusCode::GONE, "gone"),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::Unavailable(_) | ApiError::Busy(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status_and_code().0
    }

    pub fn code(&self) -> &'static str {
        self.status_and_code().1
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let problems: Vec<FieldProblem> = match &self {
            ApiError::BadTask(TaskError::Invalid(p)) => p.clone(),
            _ => Vec::new(),
        };
        match &self {
            ApiError::Unavailable(detail) => tracing::warn!(detail, "intake unavailable"),
            ApiError::Internal(detail) => tracing::error!(detail, "internal error in API"),
            _ => {}
        }
        let mut body = error_body(code, &self.to_string());
        if !problems.is_empty() {
            body["error"]["problems"] = json!(problems);
        }
        if let ApiError::Invalid(problems) = &self {
            body["accepted"] = json!(false);
            body["errors"] = json!(crate::domain::render(problems));
            body["problems"] = json!(problems);
        }
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"fleet-commander\""),
            );
        }
        resp
    }
}

/// A count a route takes from its query (a list's `limit`, a replay's `max`): as asked,
/// else `default`. Outside `1..=max` it is a 400 naming the range, so a caller who asks
/// for 0, or for more than one answer may hold, learns why instead of getting a count it
/// did not ask for.
pub fn count_param(
    name: &str,
    value: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match value {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "{name}={n}: must be 1-{max} (default {default})"
        ))),
    }
}

/// The peer's address, when the server was started with connect info (`serve.rs` does;
/// a router driven by `oneshot` in tests has none).
#[derive(Clone, Copy, Debug)]
pub struct RemoteAddr(pub Option<std::net::SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RemoteAddr {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(RemoteAddr(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// The one error shape: `{"error": {"code", "message"}}`.
fn error_body(code: &str, message: &str) -> serde_json::Value {
    json!({ "error": { "code": code, "message": message } })
}

/// The error code of a status that did not come from an [`ApiError`] (axum's own
/// rejections, unmatched routes and methods, the body limit).
fn code_of(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

/// Gives every error response that is not already JSON the one error shape: axum's
/// extractor rejections (a bad query string, a bad path parameter, a body over the limit)
/// answer plain text, and some have no body at all. Their text becomes the message; a
/// 5xx says nothing of its cause.
async fn json_errors(resp: Response, body_limit: usize) -> Response {
    let mut resp = resp;
    let status = resp.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The body was not read to its end: the connection cannot carry another request.
        resp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // Rejection texts are a line or two; anything longer is cut, not buffered.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let message = if status.is_server_error() {
        "internal error".to_string()
    } else if status == StatusCode::PAYLOAD_TOO_LARGE {
        // axum's words ("Failed to buffer the request body: length limit exceeded") say
        // neither the limit nor what sets it; the API's own 413s are JSON already.
        format!("the request body is over the limit of {body_limit} bytes (http.max_body_bytes)")
    } else {
        let t = String::from_utf8_lossy(&text).trim().to_string();
        if t.is_empty() {
            status
                .canonical_reason()
                .unwrap_or("request refused")
                .to_string()
        } else {
            t
        }
    };
    let body = error_body(code_of(status), &message).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let body = error_body(
        "method_not_allowed",
        &format!("{} does not take {method}", uri.path()),
    );
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

/// A handler that panicked answers 500 in the one error shape, and is counted; the
/// connection and the commander carry on.
fn panic_response(
    supervisor: Supervisor,
) -> impl Fn(Box<dyn std::any::Any + Send + 'static>) -> Response + Clone {
    move |payload| {
        supervisor.caught("api", payload.as_ref());
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(error_body("internal", "internal error")),
        )
            .into_response()
    }
}

/// All routes.
pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    let supervisor = state.supervisor.clone();
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/tasks", post(submit_task).get(policy::tasks))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/result", get(result::result))
        .route("/v1/fleet", get(fleet::overview))
        .route("/v1/workers", get(fleet::workers))
        .route("/v1/workers/{id}", get(fleet::worker))
        .route("/v1/pools", get(fleet::pools))
        .route("/v1/costs", get(fleet::costs))
        .route("/v1/models", get(fleet::models))
        .route("/v1/decisions", get(decisions::list))
        .route("/v1/decisions/{task_id}", get(decisions::one))
        .route("/v1/classifier", get(decisions::classifier))
        .route("/v1/traces", get(traces::list))
        .route("/v1/traces/{trace_id}", get(traces::one))
        .route("/v1/alerts", get(alerts::list))
        .route("/v1/alerts/sinks", get(alerts::sinks))
        .route(
            "/v1/silences",
            get(alerts::silences).post(alerts::add_silence),
        )
        .route(
            "/v1/silences/{id}",
            axum::routing::delete(alerts::expire_silence),
        )
        .route("/v1/interventions", get(alerts::interventions))
        .route(
            "/v1/interventions/{id}/revert",
            axum::routing::post(alerts::revert_intervention),
        )
        .route("/v1/policy", get(policy::current).put(policy::put))
        .route("/v1/policy/check", post(policy::check))
        .route("/v1/policy/replay", post(policy::shadow_replay))
        .route("/v1/policy/history", get(policy::history))
        .route("/v1/policy/history/{version}", get(policy::version))
        .route("/v1/whoami", get(auth::whoami))
        .route("/v1/stream", get(stream::stream))
        .route("/v1/control", get(control::socket).post(control::post))
        .route("/v1/control/audit", get(control::audit))
        .route("/v1/control/state", get(control::state))
        .merge(
            // Only the dashboard's files are compressed: SSE and JSON answers are not
            // held back by a compressor's buffer.
            Router::new()
                .route("/", get(console::index))
                .route("/ui/{*file}", get(console::asset))
                .layer(tower_http::compression::CompressionLayer::new()),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorise,
        ))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::map_response(move |r| {
            json_errors(r, limit)
        }))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response(supervisor),
        ))
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// 200 when the commander takes work; 503 while it starts or stops, or while a
/// long-lived task is down (named, with why).
async fn readyz(State(s): State<AppState>) -> Response {
    let mut down = s.supervisor.health.down();
    if let Some(reason) = s.core.store.trouble() {
        down.push(crate::supervise::Down {
            component: "store",
            reason: format!("store flushes are failing, so no task is acknowledged: {reason}"),
        });
    }
    if s.ready.load(Ordering::Relaxed) && down.is_empty() {
        axum::Json(json!({ "status": "ready" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "not_ready", "down": down })),
        )
            .into_response()
    }
}

/// The dashboard gauges, from the snapshot the fleet owner published last.
fn set_fleet_gauges(g: &crate::metrics::FleetGauges, snap: &crate::fleet::view::FleetSnapshot) {
    use crate::metrics::{BucketLabel, PoolLabel};
    let f = &snap.fleet;
    g.burn_rate.set(f.burn_rate_usd_per_h);
    g.output_tokens_per_s.set(f.output_tokens_per_s);
    g.input_tokens_per_s.set(f.input_tokens_per_s);
    g.error_rate.set(f.error_rate_5m.unwrap_or(0.0));
    let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    for p in &snap.pools {
        let l = PoolLabel {
            pool: p.name.clone(),
        };
        g.pool_queue_depth
            .get_or_create(&l)
            .set(to_i64(p.queue.as_ref().map_or(0, |q| q.depth)));
        g.pool_in_flight.get_or_create(&l).set(to_i64(p.in_flight));
        g.pool_capacity.get_or_create(&l).set(to_i64(p.capacity));
        for (state, n) in &p.states {
            g.pool_workers
                .get_or_create(&crate::metrics::PoolStateLabels {
                    pool: p.name.clone(),
                    state,
                })
                .set(to_i64(*n));
        }
        g.pool_workers
            .get_or_create(&crate::metrics::PoolStateLabels {
                pool: p.name.clone(),
                state: "LOST",
            })
            .set(to_i64(p.lost));
        g.pool_burn_rate.get_or_create(&l).set(0.0);
        g.pool_output_tokens_per_s.get_or_create(&l).set(0.0);
    }
    let mut by_pool: std::collections::BTreeMap<&str, (f64, f64)> = Default::default();
    let mut buckets = [0i64; 5];
    for w in snap.workers.iter().filter(|w| !w.lost) {
        if let Some(p) = &w.pool {
            let e = by_pool.entry(p).or_default();
            e.0 += w.burn_rate_usd_per_h;
            e.1 += w.output_tokens_per_s;
        }
        let i = match w.context_utilisation {
            Some(u) if u > 0.95 => 3,
            Some(u) if u > 0.80 => 2,
            Some(u) if u > 0.50 => 1,
            Some(_) => 0,
            None => 4,
        };
        buckets[i] += 1;
    }
    let mut exported: std::collections::BTreeSet<String> =
        snap.pools.iter().map(|p| p.name.clone()).collect();
    for (pool, (burn, tps)) in by_pool {
        let l = PoolLabel {
            pool: pool.to_string(),
        };
        g.pool_burn_rate.get_or_create(&l).set(burn);
        g.pool_output_tokens_per_s.get_or_create(&l).set(tps);
        exported.insert(l.pool);
    }
    // A pool the live state forgot (crate::fleet::FleetState::forget_idle_pools) leaves
    // /metrics with it.
    let mut states: Vec<&'static str> = crate::fleet::worker::State::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    states.push("LOST");
    g.keep_only_pools(exported, &states);
    for (bucket, n) in ["0-50", "50-80", "80-95", "95-100", "unknown"]
        .into_iter()
        .zip(buckets)
    {
        g.context_utilisation
            .get_or_create(&BucketLabel { bucket })
            .set(n);
    }
}

async fn metrics(State(s): State<AppState>, headers: HttpHeaders) -> Result<Response, ApiError> {
    let snap = s.core.fleet.snapshot();
    for (state, n) in &snap.fleet.states {
        s.core
            .metrics
            .workers
            .get_or_create(&StateLabel { state })
            .set(*n as i64);
    }
    s.core
        .metrics
        .workers
        .get_or_create(&StateLabel { state: "LOST" })
        .set(snap.fleet.lost as i64);
    set_fleet_gauges(&s.core.metrics.fleet, &snap);
    let engine = &s.core.policy;
    engine
        .counters
        .deferred_now
        .set(engine.deferrals.len() as i64);
    engine
        .counters
        .parked_now
        .set(engine.deferrals.parked_len() as i64);
    engine.counters.revision.set(engine.live().revision as i64);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &s.registry)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if openmetrics {
        return Ok((
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response());
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        classic_text(&out),
    )
        .into_response())
}

/// OpenMetrics text as the classic Prometheus text format (0.0.4), for scrapers and
/// tools that do not ask for OpenMetrics (`promtool check metrics`, older Prometheus):
/// a counter's `# HELP`/`# TYPE` name its `_total` samples, and `# UNIT` and `# EOF` go.
pub fn classic_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# EOF") || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// A request body read as JSON whatever its `Content-Type` says, as a task submission is:
/// `curl -d` labels a body form-encoded unless told otherwise, and the body is what the
/// caller meant.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not what this route takes: {e}")))
}

async fn get_task(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if !is_subject_token(&id) {
        return Err(ApiError::BadRequest(format!(
            "{id:?} is not a valid task id"
        )));
    }
    let local = s
        .core
        .store
        .get(&id)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let view = match local {
        Some(rec) if answers_for(&s, &rec) => record_view(&s, rec)?,
        // Accepted here over HTTP, or deferred here and let go to the intake stream, and
        // maybe taken by another replica: how it ended, else that replica's record, else
        // this one's (`received`, `deferred`, or a copy of how it ended).
        Some(mine) => {
            let ended = match mine.kept_by {
                Some(_) => None,
                None => finished_elsewhere(&s, &id).await,
            };
            match ended {
                Some(rec) => record_view(&s, rec)?,
                None => match s.peers.record(&id).await {
                    Some(theirs) => theirs,
                    None => record_view(&s, mine)?,
                },
            }
        }
        None => s
            .peers
            .record(&id)
            .await
            .ok_or_else(|| ApiError::NotFound(format!("task {id} not found")))?,
    };
    Ok(axum::Json(view).into_response())
}

/// Whether this replica answers for a task with its own record of it. Not when the
/// record is a stub of an HTTP submission (another replica may have taken the task), nor
/// when it says `deferred` but the task no longer waits here: released to the intake
/// stream, or handed to the other replicas at a clean stop, so another replica may keep
/// it now. The record here then says `deferred` until the task's result comes. Nor when
/// it is a copy of how a task another replica ran ended (`kept_by`): that one keeps the
/// whole record.
pub(crate) fn answers_for(s: &AppState, rec: &TaskRecord) -> bool {
    !rec.is_stub()
        && rec.kept_by.is_none()
        && (rec.state != crate::store::TaskState::Deferred
            || s.core.policy.deferrals.waits(&rec.id))
}

/// A task record as `GET /v1/tasks/{id}` shows it: with its kept trace's link, and the
/// replica that keeps it.
pub(crate) fn record_view(s: &AppState, rec: TaskRecord) -> Result<serde_json::Value, ApiError> {
    let trace_id = rec.trace.as_ref().map(|t| t.trace_id.clone());
    let link = traces::kept_link(s, trace_id.as_deref());
    let mut v = serde_json::to_value(rec).map_err(|e| ApiError::Internal(e.to_string()))?;
    v["kept_trace"] = link;
    v["replica"] = json!(&*s.core.replica);
    Ok(v)
}

/// The record of a task accepted here that another replica took (its stub here still
/// says `received`), finished with its result if the results stream has one.
async fn finished_elsewhere(s: &AppState, id: &str) -> Option<TaskRecord> {
    let stored = s.intake.result(id, Duration::ZERO).await.ok()??;
    let accepted_ms = s.core.store.stubs().accepted_ms(id);
    let stored = crate::pipeline::stubs::Stored {
        payload: &stored.payload,
        headers: Some(&stored.headers),
        stored_ms: stored.stored_ms,
    };
    crate::pipeline::stubs::finish(&s.core, id, stored, accepted_ms)
}

/// The answer to an accepted submission.
#[derive(Debug, Serialize)]
struct Accepted {
    task_id: String,
    /// The trace the task travels under; the dispatch span will be its child.
    traceparent: String,
    stream_sequence: u64,
    duplicate: bool,
    status_url: String,
    /// Where the result will be: `GET` it, with `?wait_s=` to wait for it.
    result_url: String,
}

/// The producer's trace context of a task the intake loop has taken, from its record:
/// what a copy's answer names, since the task travels under the first copy's trace. The
/// dispatch span is the producer span's child, so it carries the producer's flags.
fn recorded_traceparent(s: &AppState, task_id: &str) -> Option<TraceParent> {
    let trace = s.core.store.get(task_id).ok()??.trace?;
    let dispatch = TraceParent::parse(&trace.traceparent).ok()?;
    let span_id = fleet_worker::trace::SpanId::from_hex(trace.parent_span_id.as_deref()?).ok()?;
    Some(TraceParent {
        span_id,
        ..dispatch
    })
}

fn http_header<'a>(h: &'a HttpHeaders, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

async fn submit_task(
    State(s): State<AppState>,
    req_headers: HttpHeaders,
    body: Bytes,
) -> Result<Response, ApiError> {
    let rejected = |s: &AppState| {
        s.core
            .metrics
            .http_rejected
            .get_or_create(&TransportLabel {
                transport: "http".into(),
            })
            .inc()
    };
    let task = match Task::from_json(&body) {
        Ok(t) => t,
        Err(e) => {
            rejected(&s);
            return Err(e.into());
        }
    };
    // The caller's span is the parent; an absent or invalid one starts a new trace here,
    // at the edge, and that is the trace the response names.
    let raw_tp = http_header(&req_headers, headers::TRACEPARENT);
    let parent = match raw_tp.map(TraceParent::parse) {
        Some(Ok(tp)) => Some(tp),
        Some(Err(e)) => {
            s.core.metrics.traceparent_invalid.inc();
            tracing::info!(traceparent = raw_tp, reason = %e, "invalid traceparent on HTTP submission; starting a new trace");
            None
        }
        None => None,
    };
    let opts = SubmitOptions {
        idempotency_key: http_header(&req_headers, "idempotency-key").map(str::to_string),
        parent,
        tracestate: parent
            .and(http_header(&req_headers, headers::TRACESTATE))
            .and_then(parse_tracestate),
        baggage: http_header(&req_headers, headers::BAGGAGE)
            .map(Baggage::parse)
            .unwrap_or_default(),
        reply_to: None,
    };
    // The same path as a NATS producer: the task is accepted once the intake stream has it.
    let receipt = s.intake.submit(&task, opts).await.map_err(|e| match e {
        ProducerError::InvalidTask(e) => ApiError::BadTask(e),
        ProducerError::BadIdempotencyKey | ProducerError::BadReplyTo(_) => {
            rejected(&s);
            ApiError::BadRequest(e.to_string())
        }
        ProducerError::NotAccepted(_) | ProducerError::Nats(_) => {
            ApiError::Unavailable(e.to_string())
        }
        ProducerError::TooLarge { .. } => {
            rejected(&s);
            ApiError::TooLarge(e.to_string())
        }
        other => ApiError::Internal(other.to_string()),
    })?;
    s.core.metrics.http_submissions.inc();
    // Found from the moment it is accepted: `received` until the intake loop, which
    // treats a `received` record as its own, takes it (an existing record is kept).
    let (id, seq) = (receipt.task_id.clone(), receipt.stream_sequence);
    if let Err(e) = s.core.store.accepted(&id, seq) {
        tracing::warn!(task_id = %id, error = %e, "accepted task not recorded as received yet");
    }
    let traceparent = match receipt.duplicate {
        true => recorded_traceparent(&s, &id).unwrap_or(receipt.traceparent),
        false => receipt.traceparent,
    };
    let accepted = Accepted {
        status_url: format!("/v1/tasks/{}", receipt.task_id),
        result_url: format!("/v1/tasks/{}/result", receipt.task_id),
        task_id: receipt.task_id,
        traceparent: traceparent.to_header(),
        stream_sequence: receipt.stream_sequence,
        duplicate: receipt.duplicate,
    };
    Ok((StatusCode::ACCEPTED, axum::Json(accepted)).into_response())
}
