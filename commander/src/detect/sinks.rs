//! Delivery of alerts to the tools on-call teams already use: Alertmanager (API v2),
//! webhooks signed per Standard Webhooks 1.0, Slack incoming webhooks and PagerDuty
//! Events v2. Each sink has its own bounded queue and task: the detector only offers
//! (never waits), a full queue drops and counts, a failing endpoint is retried with
//! jittered backoff (honouring `Retry-After`), a 410 disables it, and so do
//! `disable_after` deliveries in a row that failed. Secrets come from environment
//! variables and are never logged; a sink's URL is shown by its host only (a Slack
//! webhook URL is itself a secret).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::{mpsc, watch};

use super::lifecycle::{Alert, Change};
use super::rules::Severity;
use crate::domain::Clock;

pub use crate::config::{SinkConfig, SinkKind, SinkSeverity};

/// A sink as the API shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SinkState {
    pub name: String,
    pub kind: Option<SinkKind>,
    /// The endpoint's host (the full URL may be a secret).
    pub host: String,
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    pub delivered: u64,
    /// Deliveries that failed every attempt.
    pub failed: u64,
    /// Requests that failed (each attempt counts).
    pub errors: u64,
    /// Offered while the queue was full or the sink disabled.
    pub dropped: u64,
    pub consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_delivered_ms: Option<u64>,
}

struct Sink {
    cfg: SinkConfig,
    state: Mutex<SinkState>,
    tx: mpsc::Sender<(Change, Alert)>,
}

/// Every configured sink.
#[derive(Clone, Default)]
pub struct Sinks {
    sinks: Vec<Arc<Sink>>,
}

impl Sink {
    /// Puts the alert in this sink's queue unless it is disabled or full (then counted as
    /// dropped). Returns whether it was queued.
    fn queue(&self, change: Change, alert: &Alert) -> bool {
        let enabled = self.state.lock().map(|st| st.enabled).unwrap_or(false);
        let queued = enabled && self.tx.try_send((change, alert.clone())).is_ok();
        if !queued {
            lock(&self.state).dropped += 1;
        }
        queued
    }
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.sinks.iter().map(|s| &s.cfg.name))
            .finish()
    }
}

/// Why a sink cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink {0}: environment variable {1} is not set")]
    MissingSecret(String, String),
    #[error("sink {0}: a webhook needs secret_env (its whsec_ signing secret)")]
    NoSecret(String),
    #[error("sink {0}: secret in {1} is not a whsec_ base64 secret")]
    BadSecret(String, String),
    #[error("sink client: {0}")]
    Client(String),
}

/// What a sink task needs besides its config.
struct Endpoint {
    http: reqwest::Client,
    /// Webhook: the decoded signing keys. PagerDuty: the routing key (as the only entry).
    secrets: Vec<Vec<u8>>,
    routing_key: Option<String>,
    clock: Arc<dyn Clock>,
    /// Links in alerts point here (the commander's API).
    generator_url: String,
}

impl Sinks {
    /// Starts one task per sink (secrets from the environment); each runs until `stop`.
    pub fn start(
        configs: &[SinkConfig],
        generator_url: &str,
        clock: Arc<dyn Clock>,
        stop: watch::Receiver<bool>,
    ) -> Result<(Self, Vec<tokio::task::JoinHandle<()>>), SinkError> {
        Self::start_with(configs, generator_url, clock, stop, &|v| {
            std::env::var(v).ok()
        })
    }

    /// [`Self::start`] with the secrets read by `env` (tests pass their own).
    pub fn start_with(
        configs: &[SinkConfig],
        generator_url: &str,
        clock: Arc<dyn Clock>,
        stop: watch::Receiver<bool>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(Self, Vec<tokio::task::JoinHandle<()>>), SinkError> {
        let mut sinks = Vec::new();
        let mut tasks = Vec::new();
        for cfg in configs {
            let secret = match &cfg.secret_env {
                Some(var) => Some(
                    env(var)
                        .ok_or_else(|| SinkError::MissingSecret(cfg.name.clone(), var.clone()))?,
                ),
                None => None,
            };
            let (secrets, routing_key) = match cfg.kind {
                SinkKind::Webhook => {
                    let s = secret.ok_or_else(|| SinkError::NoSecret(cfg.name.clone()))?;
                    let keys = webhook_keys(&s).ok_or_else(|| {
                        SinkError::BadSecret(
                            cfg.name.clone(),
                            cfg.secret_env.clone().unwrap_or_default(),
                        )
                    })?;
                    (keys, None)
                }
                SinkKind::Pagerduty => (Vec::new(), secret),
                _ => (Vec::new(), None),
            };
            let http = reqwest::Client::builder()
                .timeout(Duration::from_millis(cfg.timeout_ms))
                .build()
                .map_err(|e| SinkError::Client(e.to_string()))?;
            let (tx, rx) = mpsc::channel(cfg.queue.max(1));
            let sink = Arc::new(Sink {
                cfg: cfg.clone(),
                state: Mutex::new(SinkState {
                    name: cfg.name.clone(),
                    kind: Some(cfg.kind),
                    host: host_of(&cfg.url),
                    enabled: true,
                    ..Default::default()
                }),
                tx,
            });
            let endpoint = Endpoint {
                http,
                secrets,
                routing_key,
                clock: clock.clone(),
                generator_url: generator_url.to_string(),
            };
            tasks.push(tokio::spawn(deliver(
                sink.clone(),
                endpoint,
                rx,
                stop.clone(),
            )));
            sinks.push(sink);
        }
        Ok((Self { sinks }, tasks))
    }

    /// Hands a sent change to every sink that takes its severity; never waits.
    pub fn offer(&self, change: Change, alert: &Alert) {
        let severity = match alert.severity {
            Severity::Info => SinkSeverity::Info,
            Severity::Warning => SinkSeverity::Warning,
            Severity::Critical => SinkSeverity::Critical,
        };
        for s in self.sinks.iter().filter(|s| severity >= s.cfg.min_severity) {
            s.queue(change, alert);
        }
    }

    /// Offers the alert to the sink named `name` whatever its `min_severity` (an
    /// escalation's notify step). False when there is no such sink, or it is disabled or
    /// full.
    pub fn offer_to(&self, name: &str, change: Change, alert: &Alert) -> bool {
        self.sinks
            .iter()
            .find(|s| s.cfg.name == name)
            .is_some_and(|s| s.queue(change, alert))
    }

    pub fn states(&self) -> Vec<SinkState> {
        self.sinks
            .iter()
            .filter_map(|s| s.state.lock().ok().map(|st| st.clone()))
            .collect()
    }
}

fn host_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.host_str().map(|h| match u.port() {
                Some(p) => format!("{h}:{p}"),
                None => h.to_string(),
            })
        })
        .unwrap_or_else(|| "?".into())
}

/// The signing keys of a `whsec_…` secret (several, space-separated).
pub fn webhook_keys(secret: &str) -> Option<Vec<Vec<u8>>> {
    let keys: Option<Vec<Vec<u8>>> = secret
        .split_whitespace()
        .map(|s| {
            base64::engine::general_purpose::STANDARD
                .decode(s.strip_prefix("whsec_")?)
                .ok()
        })
        .collect();
    keys.filter(|k| !k.is_empty())
}

/// `webhook-signature`: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` per key,
/// space-separated.
pub fn sign(keys: &[Vec<u8>], id: &str, timestamp: u64, body: &[u8]) -> String {
    keys.iter()
        .filter_map(|k| {
            let mut mac = Hmac::<Sha256>::new_from_slice(k).ok()?;
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            Some(format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
            ))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn rfc3339(ms: u64) -> String {
    crate::policy::budget::rfc3339(ms)
}

/// The alert as Alertmanager's `POST /api/v2/alerts` takes it (one element of the array).
pub fn alertmanager_alert(a: &Alert, generator_url: &str) -> Value {
    let mut labels = serde_json::Map::new();
    labels.insert("alertname".into(), json!(a.rule.as_str()));
    labels.insert("severity".into(), json!(a.severity.as_str()));
    labels.insert("source".into(), json!("fleet-commander"));
    for (k, v) in &a.labels {
        labels.insert(k.clone(), json!(v));
    }
    let mut am = json!({
        "labels": labels,
        "annotations": {
            "summary": a.message,
            "value": a.value.to_string(),
            "threshold": a.threshold.to_string(),
            "alert_id": a.id,
        },
        "startsAt": rfc3339(a.firing_ms.unwrap_or(a.started_ms)),
        "generatorURL": format!("{generator_url}/v1/alerts?rule={}", a.rule.as_str()),
    });
    if let Some(end) = a.ended_ms {
        am["endsAt"] = json!(rfc3339(end));
    }
    am
}

/// Standard Webhooks payload: `{type, timestamp, data}`.
pub fn webhook_body(change: Change, a: &Alert, now_ms: u64) -> Value {
    json!({
        "type": format!("alert.{}", change.as_str()),
        "timestamp": rfc3339(now_ms),
        "data": {"event": change.as_str(), "alert": a},
    })
}

/// A Slack incoming-webhook message: `text` for notifications, `blocks` for the channel.
pub fn slack_body(change: Change, a: &Alert) -> Value {
    let icon = match (change, a.severity) {
        (Change::Resolved, _) => ":white_check_mark:",
        (_, Severity::Critical) => ":rotating_light:",
        (_, Severity::Warning) => ":warning:",
        _ => ":information_source:",
    };
    let head = format!(
        "{icon} [{}] {} {}",
        a.severity.as_str().to_uppercase(),
        a.rule.as_str(),
        if change == Change::Resolved {
            "resolved"
        } else {
            "firing"
        }
    );
    let scope: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    json!({
        "text": format!("{head}: {}", a.message),
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": format!("*{head}*\n{}", a.message)}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": format!(
                "{} · value {:.3} (threshold {:.3}) · alert `{}`",
                if scope.is_empty() { "fleet".to_string() } else { scope.join(", ") },
                a.value, a.threshold, a.id)}]}
        ],
    })
}

/// A PagerDuty Events v2 event: trigger while firing, resolve when resolved; the alert
/// id is the dedup key, so one incident per alert.
pub fn pagerduty_body(change: Change, a: &Alert, routing_key: &str) -> Value {
    let action = if change == Change::Resolved {
        "resolve"
    } else {
        "trigger"
    };
    json!({
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": a.id,
        "payload": {
            "summary": a.message,
            "source": a.labels.get("worker").or(a.labels.get("pool")).map_or("fleet", String::as_str),
            "severity": a.severity.as_str(),
            "component": a.labels.get("pool").map_or("fleet", String::as_str),
            "class": a.rule.as_str(),
            "custom_details": {"value": a.value, "threshold": a.threshold, "labels": a.labels},
        },
    })
}

/// What one attempt came to.
enum Outcome {
    Delivered,
    /// Try again after this long (the endpoint's `Retry-After`), or after the backoff.
    Retry(Option<Duration>, String),
    /// 410: the endpoint is gone.
    Gone,
    /// A 4xx other than 408, 409, 425 and 429: sending the same again will not help.
    Refused(String),
}

async fn post(e: &Endpoint, url: &str, body: &[u8], headers: &[(&str, String)]) -> Outcome {
    let mut req = e
        .http
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(err) => return Outcome::Retry(None, without_url(&err)),
    };
    let status = resp.status();
    if status.is_success() {
        return Outcome::Delivered;
    }
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    match status.as_u16() {
        410 => Outcome::Gone,
        408 | 409 | 425 | 429 => Outcome::Retry(retry_after, format!("HTTP {status}")),
        s if s >= 500 => Outcome::Retry(retry_after, format!("HTTP {status}")),
        _ => Outcome::Refused(format!("HTTP {status}")),
    }
}

/// An HTTP client error without its URL (which may carry a secret).
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    kind.to_string()
}

/// The request a change becomes at this sink: URL, body, headers.
fn request(
    cfg: &SinkConfig,
    e: &Endpoint,
    change: Change,
    a: &Alert,
) -> (String, Vec<u8>, Vec<(&'static str, String)>) {
    let now_ms = e.clock.now_ms();
    match cfg.kind {
        SinkKind::Alertmanager => (
            format!("{}/api/v2/alerts", cfg.url.trim_end_matches('/')),
            json!([alertmanager_alert(a, &e.generator_url)])
                .to_string()
                .into_bytes(),
            Vec::new(),
        ),
        SinkKind::Webhook => {
            let body = webhook_body(change, a, now_ms).to_string().into_bytes();
            let id = format!(
                "msg_{}_{}_{now_ms}",
                a.id.replace([':', ',', '='], "_"),
                change.as_str()
            );
            let ts = now_ms / 1000;
            let signature = sign(&e.secrets, &id, ts, &body);
            (
                cfg.url.clone(),
                body,
                vec![
                    ("webhook-id", id),
                    ("webhook-timestamp", ts.to_string()),
                    ("webhook-signature", signature),
                ],
            )
        }
        SinkKind::Slack => (
            cfg.url.clone(),
            slack_body(change, a).to_string().into_bytes(),
            Vec::new(),
        ),
        SinkKind::Pagerduty => (
            cfg.url.clone(),
            pagerduty_body(change, a, e.routing_key.as_deref().unwrap_or(""))
                .to_string()
                .into_bytes(),
            Vec::new(),
        ),
    }
}

/// The sink's task: deliveries in order, each retried; Alertmanager's firing alerts sent
/// again every `resend_s`.
async fn deliver(
    sink: Arc<Sink>,
    e: Endpoint,
    mut rx: mpsc::Receiver<(Change, Alert)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut firing: HashMap<String, Alert> = HashMap::new();
    let mut resend = tokio::time::interval(Duration::from_secs(sink.cfg.resend_s.max(1)));
    resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let (change, alert) = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            _ = resend.tick(), if sink.cfg.kind == SinkKind::Alertmanager && !firing.is_empty() => {
                for a in firing.values() {
                    deliver_one(&sink, &e, Change::Renotify, a).await;
                }
                continue;
            }
            _ = stop.changed() => return,
        };
        if sink.cfg.kind == SinkKind::Alertmanager {
            if change == Change::Resolved {
                firing.remove(&alert.id);
            } else {
                firing.insert(alert.id.clone(), alert.clone());
            }
        }
        deliver_one(&sink, &e, change, &alert).await;
    }
}

async fn deliver_one(sink: &Sink, e: &Endpoint, change: Change, alert: &Alert) {
    if !sink.state.lock().map(|s| s.enabled).unwrap_or(false) {
        return;
    }
    let cfg = &sink.cfg;
    let (url, body, headers) = request(cfg, e, change, alert);
    let mut backoff = Duration::from_millis(250);
    for attempt in 1..=cfg.max_attempts.max(1) {
        let outcome = post(e, &url, &body, &headers).await;
        // The state is locked only between awaits.
        let retry_after = {
            let mut st = lock(&sink.state);
            match outcome {
                Outcome::Delivered => {
                    st.delivered += 1;
                    st.consecutive_failures = 0;
                    st.last_delivered_ms = Some(e.clock.now_ms());
                    return;
                }
                Outcome::Gone => {
                    st.errors += 1;
                    disable(&mut st, "the endpoint answered 410 Gone");
                    return;
                }
                Outcome::Refused(why) => {
                    st.errors += 1;
                    st.last_error = Some(why);
                    break;
                }
                Outcome::Retry(after, why) => {
                    st.errors += 1;
                    st.last_error = Some(why);
                    after
                }
            }
        };
        if attempt < cfg.max_attempts {
            let wait = retry_after
                .unwrap_or_else(|| crate::domain::jitter(backoff))
                .min(Duration::from_secs(60));
            e.clock.sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
    let mut st = lock(&sink.state);
    st.failed += 1;
    st.consecutive_failures += 1;
    tracing::warn!(sink = %cfg.name, alert = %alert.id, error = st.last_error.as_deref().unwrap_or(""), "alert not delivered");
    if st.consecutive_failures >= cfg.disable_after {
        let why = format!("{} deliveries in a row failed", st.consecutive_failures);
        disable(&mut st, &why);
    }
}

/// The state, even after a panic elsewhere poisoned its lock (counters stay usable).
fn lock(m: &Mutex<SinkState>) -> std::sync::MutexGuard<'_, SinkState> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn disable(st: &mut SinkState, why: &str) {
    st.enabled = false;
    st.disabled_reason = Some(why.to_string());
    tracing::error!(sink = %st.name, reason = why, "alert sink disabled");
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex as StdMutex;

    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;

    use super::*;
    use crate::detect::lifecycle::{AlertState, Transition};
    use crate::detect::rules::{Links, Rule};

    fn alert(state: AlertState) -> Alert {
        let mut labels = BTreeMap::new();
        labels.insert("worker".to_string(), "code-1".to_string());
        labels.insert("pool".to_string(), "code".to_string());
        let a = serde_json::json!({
            "id": "token_loop:pool=code,worker=code-1:1796169540000",
            "rule": "token_loop", "severity": "warning", "labels": labels,
            "state": state, "value": 6.5, "threshold": 5.0,
            "message": "Agent code-1 is writing output tokens at 6.5x its task type's usual rate",
            "started_ms": 1796169540000u64, "firing_ms": 1796169600000u64,
            "links": Links { worker: Some("code-1".into()), ..Default::default() },
            "history": [Transition { at_ms: 1796169540000, state: AlertState::Pending, value: 6.5 }],
        });
        let mut a: Alert = serde_json::from_value(a).unwrap();
        if state == AlertState::Resolved {
            a.ended_ms = Some(1796169900000);
        }
        assert_eq!(a.rule, Rule::TokenLoop);
        a
    }

    #[test]
    fn alertmanager_gets_labels_annotations_and_an_end_on_resolve() {
        let am = alertmanager_alert(&alert(AlertState::Firing), "http://cmd:8080");
        assert_eq!(am["labels"]["alertname"], "token_loop");
        assert_eq!(am["labels"]["severity"], "warning");
        assert_eq!(am["labels"]["worker"], "code-1");
        assert!(
            am["annotations"]["summary"]
                .as_str()
                .unwrap()
                .contains("6.5x")
        );
        assert_eq!(am["startsAt"], "2026-12-02T00:00:00Z");
        assert!(am.get("endsAt").is_none());
        assert_eq!(
            am["generatorURL"],
            "http://cmd:8080/v1/alerts?rule=token_loop"
        );
        let am = alertmanager_alert(&alert(AlertState::Resolved), "http://cmd:8080");
        assert_eq!(am["endsAt"], "2026-12-02T00:05:00Z");
    }

    #[test]
    fn slack_and_pagerduty_shapes() {
        let s = slack_body(Change::Firing, &alert(AlertState::Firing));
        assert!(
            s["text"]
                .as_str()
                .unwrap()
                .starts_with(":warning: [WARNING] token_loop firing")
        );
        assert_eq!(s["blocks"][0]["type"], "section");
        let p = pagerduty_body(Change::Firing, &alert(AlertState::Firing), "rk-1");
        assert_eq!(p["event_action"], "trigger");
        assert_eq!(p["routing_key"], "rk-1");
        assert_eq!(
            p["dedup_key"],
            "token_loop:pool=code,worker=code-1:1796169540000"
        );
        assert_eq!(p["payload"]["severity"], "warning");
        assert_eq!(p["payload"]["source"], "code-1");
        let p = pagerduty_body(Change::Resolved, &alert(AlertState::Resolved), "rk-1");
        assert_eq!(p["event_action"], "resolve");
    }

    /// The Standard Webhooks reference vector: secret, id, timestamp and body from the
    /// specification's example, and the signature it gives.
    #[test]
    fn signatures_follow_standard_webhooks() {
        let keys = webhook_keys("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &keys,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        // Rotation: one signature per secret.
        let keys = webhook_keys("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw whsec_AAAA").unwrap();
        assert_eq!(sign(&keys, "m", 1, b"{}").split(' ').count(), 2);
        assert!(webhook_keys("not-a-secret").is_none());
    }

    /// A status to answer, and a `Retry-After` to send with it.
    type Answer = (u16, Option<&'static str>);

    /// A receiver that answers from a script and keeps what it got.
    #[derive(Clone, Default)]
    struct Receiver {
        answers: Arc<StdMutex<Vec<Answer>>>,
        got: Arc<StdMutex<Vec<(HeaderMap, String)>>>,
    }

    async fn receive(
        State(r): State<Receiver>,
        headers: HeaderMap,
        body: String,
    ) -> (StatusCode, HeaderMap) {
        r.got.lock().unwrap().push((headers, body));
        let (status, retry_after) = {
            let mut a = r.answers.lock().unwrap();
            if a.is_empty() {
                (200, None)
            } else {
                a.remove(0)
            }
        };
        let mut h = HeaderMap::new();
        if let Some(ra) = retry_after {
            h.insert("retry-after", ra.parse().unwrap());
        }
        (StatusCode::from_u16(status).unwrap(), h)
    }

    async fn receiver(answers: Vec<(u16, Option<&'static str>)>) -> (String, Receiver) {
        let r = Receiver::default();
        *r.answers.lock().unwrap() = answers;
        let app = axum::Router::new()
            .route("/hook", post(receive))
            .route("/api/v2/alerts", post(receive))
            .with_state(r.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        (url, r)
    }

    fn config(kind: SinkKind, url: &str) -> SinkConfig {
        SinkConfig {
            name: "test".into(),
            kind,
            url: url.into(),
            secret_env: None,
            min_severity: SinkSeverity::Warning,
            max_attempts: 3,
            disable_after: 2,
            queue: 8,
            timeout_ms: 2_000,
            resend_s: 60,
        }
    }

    async fn settle_until(s: &Sinks, what: &str, f: impl Fn(&SinkState) -> bool) -> SinkState {
        for _ in 0..400 {
            let st = s.states().remove(0);
            if f(&st) {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for: {what}: {:?}", s.states());
    }

    #[tokio::test]
    async fn a_signed_webhook_is_retried_through_a_500_and_a_429_and_verifies() {
        let (url, r) = receiver(vec![(500, None), (429, Some("0"))]).await;
        let mut cfg = config(SinkKind::Webhook, &url);
        cfg.secret_env = Some("FLEET_TEST_WEBHOOK_SECRET_A".into());
        let (_stop_tx, stop) = watch::channel(false);
        let clock = crate::domain::ManualClock::at(1_796_169_600_000);
        let env = |v: &str| {
            (v == "FLEET_TEST_WEBHOOK_SECRET_A")
                .then(|| "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string())
        };
        let (sinks, _tasks) = Sinks::start_with(&[cfg], "http://cmd", clock, stop, &env).unwrap();
        sinks.offer(Change::Firing, &alert(AlertState::Firing));
        let st = settle_until(&sinks, "delivered", |s| s.delivered == 1).await;
        assert_eq!((st.errors, st.failed, st.consecutive_failures), (2, 0, 0));
        let got = r.got.lock().unwrap().clone();
        assert_eq!(got.len(), 3, "two retries then the delivery");
        let (h, body) = &got[2];
        let id = h["webhook-id"].to_str().unwrap();
        let ts: u64 = h["webhook-timestamp"].to_str().unwrap().parse().unwrap();
        // Verify the way a receiver would: HMAC of id.timestamp.body with the secret.
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{ts}.{body}").as_bytes());
        let want = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(h["webhook-signature"].to_str().unwrap(), want);
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["type"], "alert.firing");
        assert_eq!(v["data"]["alert"]["rule"], "token_loop");
        // Retries are the same message: same id and signature.
        assert_eq!(got[0].0["webhook-id"], got[2].0["webhook-id"]);
    }

    #[tokio::test]
    async fn a_410_disables_the_sink_and_repeated_failures_do_too() {
        let (_stop_tx, stop) = watch::channel(false);
        let clock = crate::domain::ManualClock::at(1_796_169_600_000);
        let (url, _r) = receiver(vec![(410, None)]).await;
        let (sinks, _t) = Sinks::start(
            &[config(SinkKind::Slack, &url)],
            "http://cmd",
            clock.clone(),
            stop.clone(),
        )
        .unwrap();
        sinks.offer(Change::Firing, &alert(AlertState::Firing));
        let st = settle_until(&sinks, "disabled", |s| !s.enabled).await;
        assert!(st.disabled_reason.unwrap().contains("410"));
        sinks.offer(Change::Resolved, &alert(AlertState::Resolved));
        assert_eq!(
            sinks.states()[0].dropped,
            1,
            "a disabled sink drops and counts"
        );

        // Nothing listens: every attempt fails; after `disable_after` deliveries it stops.
        let dead = "http://127.0.0.1:9/hook".to_string();
        let mut pd = config(SinkKind::Pagerduty, &dead);
        pd.secret_env = Some("PD_KEY".into());
        let env = |_: &str| Some("rk-1".to_string());
        let (sinks, _t) = Sinks::start_with(&[pd], "http://cmd", clock, stop, &env).unwrap();
        sinks.offer(Change::Firing, &alert(AlertState::Firing));
        sinks.offer(Change::Renotify, &alert(AlertState::Firing));
        let st = settle_until(&sinks, "disabled after two failed deliveries", |s| {
            !s.enabled
        })
        .await;
        assert_eq!(st.failed, 2);
        assert_eq!(st.errors, 6, "three attempts each");
        assert_eq!(st.host, "127.0.0.1:9");
        assert!(
            !format!("{st:?}").contains("/hook"),
            "the path is not shown"
        );
    }

    #[tokio::test]
    async fn info_alerts_do_not_reach_a_warning_sink_and_a_full_queue_drops() {
        let (_stop_tx, stop) = watch::channel(false);
        let clock = crate::domain::ManualClock::at(1_796_169_600_000);
        let (url, r) = receiver(vec![]).await;
        let mut cfg = config(SinkKind::Alertmanager, url.trim_end_matches("/hook"));
        cfg.queue = 1;
        let (sinks, _t) = Sinks::start(&[cfg], "http://cmd", clock, stop).unwrap();
        let mut info = alert(AlertState::Firing);
        info.severity = Severity::Info;
        sinks.offer(Change::Firing, &info);
        for _ in 0..50 {
            sinks.offer(Change::Firing, &alert(AlertState::Firing));
        }
        let st = settle_until(&sinks, "some delivered", |s| s.delivered >= 1).await;
        assert!(st.dropped > 0, "{st:?}");
        assert!(
            r.got
                .lock()
                .unwrap()
                .iter()
                .all(|(_, b)| !b.contains("\"severity\":\"info\""))
        );
    }
}
