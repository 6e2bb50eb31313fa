//! OTLP export of kept (redacted) traces to any number of endpoints.
//!
//! Each endpoint has a bounded queue and a task of its own: the keeper only offers (a full
//! queue drops the trace, counted), so an endpoint that is slow or down never slows
//! ingest or the keeper. The task batches spans (`batch_spans`, `batch_delay_ms`) and
//! retries what OTLP calls retryable with jittered exponential backoff: HTTP 429, 502, 503
//! and 504 (honouring `Retry-After`), gRPC UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED,
//! CANCELLED, OUT_OF_RANGE and DATA_LOSS, and RESOURCE_EXHAUSTED only when it carries
//! RetryInfo (whose delay it waits). Anything else drops the batch, counted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic_types::StatusExt;

use crate::config::{ExportConfig, ExportProtocol};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExportLabels {
    pub endpoint: String,
    /// `sent`, `rejected` (partial success), `dropped_queue_full`, `dropped_failed`.
    pub outcome: &'static str,
}

/// Spans per endpoint and outcome; requests retried per endpoint.
#[derive(Debug, Default)]
pub struct ExportCounters {
    pub spans: Family<ExportLabels, Counter>,
    pub retries: Family<ExportLabels, Counter>,
}

impl ExportCounters {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "trace_export_spans",
            "Spans of kept traces per export endpoint and outcome",
            self.spans.clone(),
        );
        r.register(
            "trace_export_retries",
            "Export requests retried per endpoint",
            self.retries.clone(),
        );
    }

    fn add(&self, endpoint: &str, outcome: &'static str, n: u64) {
        self.spans
            .get_or_create(&ExportLabels {
                endpoint: endpoint.to_string(),
                outcome,
            })
            .inc_by(n);
    }
}

/// One kept trace, as sent.
pub type Batch = Arc<Vec<ResourceSpans>>;

/// The keeper's side of one endpoint.
#[derive(Clone, Debug)]
pub struct Exporter {
    name: String,
    tx: mpsc::Sender<(Batch, u64)>,
    counters: Arc<ExportCounters>,
    /// How long it waits to fill a batch (`batch_delay_ms`).
    batch_delay: Duration,
}

impl Exporter {
    /// Queues a trace of `spans` spans; drops it (counted) when the queue is full.
    pub fn offer(&self, trace: Batch, spans: u64) {
        if self.tx.try_send((trace, spans)).is_err() {
            self.counters.add(&self.name, "dropped_queue_full", spans);
        }
    }

    /// Traces its queue holds at most (`queue_traces`).
    pub fn capacity(&self) -> usize {
        self.tx.max_capacity()
    }

    /// How long it waits to fill a batch (`batch_delay_ms`).
    pub fn batch_delay(&self) -> Duration {
        self.batch_delay
    }
}

#[cfg(test)]
impl Exporter {
    /// An endpoint whose queue the test reads.
    pub fn channel(name: &str, capacity: usize) -> (Self, mpsc::Receiver<(Batch, u64)>) {
        let (tx, rx) = mpsc::channel(capacity);
        let exporter = Exporter {
            name: name.into(),
            tx,
            counters: Arc::default(),
            batch_delay: Duration::from_millis(100),
        };
        (exporter, rx)
    }
}

/// How long a replica that does not lead holds a kept trace back. The replica that leads
/// exports the same traces; when it dies, the lease runs out (`detect::lead::EXPIRES`,
/// then a look every `RENEW`) before another takes the lead, and what that one kept
/// meanwhile, and what the dead one had not yet sent, would reach no endpoint. So the one
/// that takes the lead exports what it held back first: at most this long (longer than
/// the lease takes to change hands, `serve` checks), and only from a little before it last
/// heard the old leader ([`LEADER_LAG`]): what was kept before then, the old leader sent.
pub const STANDBY_FOR: Duration = Duration::from_secs(15);

/// How long before the old leader was last heard (it renewed the lease) a trace may have
/// been kept and still not sent by it: the lease's look every second, both replicas'
/// decisions a tick apart, and the send itself; an endpoint's `batch_delay_ms` comes on
/// top.
pub const LEADER_LAG: Duration = Duration::from_secs(3);

/// The kept traces a replica that does not lead holds back (see [`STANDBY_FOR`]), oldest
/// first, at most as many as an endpoint's queue holds.
#[derive(Debug, Default)]
pub struct Standby {
    held: VecDeque<(Instant, Batch, u64)>,
}

impl Standby {
    /// Holds a trace of `spans` spans kept at `now`; the oldest goes past `max`.
    pub fn hold(&mut self, now: Instant, trace: Batch, spans: u64, max: usize) {
        self.expire(now);
        if max == 0 {
            return;
        }
        while self.held.len() >= max {
            self.held.pop_front();
        }
        self.held.push_back((now, trace, spans));
    }

    /// Lets go of what was held back for longer than [`STANDBY_FOR`]: the leader exported it.
    pub fn expire(&mut self, now: Instant) {
        while self
            .held
            .front()
            .is_some_and(|(at, _, _)| now.saturating_duration_since(*at) > STANDBY_FOR)
        {
            self.held.pop_front();
        }
    }

    /// What to export on taking the lead, oldest first: what was held back for at most
    /// [`STANDBY_FOR`] and kept `from` on (`None`: all of it). Empties the standby.
    pub fn take(&mut self, now: Instant, from: Option<Instant>) -> Vec<(Batch, u64)> {
        self.expire(now);
        self.held
            .drain(..)
            .filter(|(at, _, _)| from.is_none_or(|f| *at >= f))
            .map(|(_, t, n)| (t, n))
            .collect()
    }

    /// How many traces are held back.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("export endpoint {name}: {why}")]
    Setup { name: String, why: String },
}

/// What one request came to.
#[derive(Debug, PartialEq)]
enum Outcome {
    Sent { rejected: u64 },
    Retry(Option<Duration>, String),
    Fail(String),
}

enum Client {
    Http {
        http: reqwest::Client,
        url: String,
        headers: reqwest::header::HeaderMap,
    },
    Grpc {
        client: TraceServiceClient<tonic::transport::Channel>,
        headers: Vec<(
            tonic::metadata::AsciiMetadataKey,
            tonic::metadata::AsciiMetadataValue,
        )>,
        timeout: Duration,
    },
}

/// Starts the endpoint's task; the handle offers traces to it.
pub fn spawn(
    cfg: &ExportConfig,
    counters: Arc<ExportCounters>,
    stop: watch::Receiver<bool>,
) -> Result<(Exporter, tokio::task::JoinHandle<()>), ExportError> {
    let client = client(cfg)?;
    let (tx, rx) = mpsc::channel(cfg.queue_traces.max(1));
    let exporter = Exporter {
        name: cfg.name.clone(),
        tx,
        counters: counters.clone(),
        batch_delay: Duration::from_millis(cfg.batch_delay_ms),
    };
    let task = tokio::spawn(run(cfg.clone(), client, rx, counters, stop));
    Ok((exporter, task))
}

fn headers(cfg: &ExportConfig) -> Result<Vec<(String, String)>, ExportError> {
    let mut out: Vec<(String, String)> = cfg
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    for (h, var) in &cfg.headers_env {
        let v = std::env::var(var).map_err(|_| ExportError::Setup {
            name: cfg.name.clone(),
            why: format!("header {h}: environment variable {var} is not set"),
        })?;
        out.push((h.to_ascii_lowercase(), v));
    }
    Ok(out)
}

fn client(cfg: &ExportConfig) -> Result<Client, ExportError> {
    let setup = |why: String| ExportError::Setup {
        name: cfg.name.clone(),
        why,
    };
    let pairs = headers(cfg)?;
    let timeout = Duration::from_millis(cfg.timeout_ms);
    match cfg.protocol {
        ExportProtocol::Http => {
            let mut headers = reqwest::header::HeaderMap::new();
            for (k, v) in pairs {
                let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|e| setup(format!("header {k}: {e}")))?;
                // The value is never shown: it may be a secret.
                let mut value = reqwest::header::HeaderValue::from_str(&v)
                    .map_err(|_| setup(format!("header {k}: the value is not valid")))?;
                value.set_sensitive(true);
                headers.insert(name, value);
            }
            let http = reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .map_err(|e| setup(e.to_string()))?;
            let mut url = cfg.endpoint.clone();
            if reqwest::Url::parse(&url).is_ok_and(|u| u.path() == "/" || u.path().is_empty()) {
                url = format!("{}/v1/traces", url.trim_end_matches('/'));
            }
            Ok(Client::Http { http, url, headers })
        }
        ExportProtocol::Grpc => {
            let channel = tonic::transport::Endpoint::from_shared(cfg.endpoint.clone())
                .map_err(|e| setup(e.to_string()))?
                .connect_timeout(timeout)
                .timeout(timeout)
                .connect_lazy();
            let mut headers = Vec::new();
            for (k, v) in pairs {
                let key = k
                    .parse::<tonic::metadata::AsciiMetadataKey>()
                    .map_err(|_| setup(format!("header {k}: not a metadata key")))?;
                let value = v
                    .parse::<tonic::metadata::AsciiMetadataValue>()
                    .map_err(|_| setup(format!("header {k}: the value is not valid")))?;
                headers.push((key, value));
            }
            Ok(Client::Grpc {
                client: TraceServiceClient::new(channel),
                headers,
                timeout,
            })
        }
    }
}

async fn run(
    cfg: ExportConfig,
    mut client: Client,
    mut rx: mpsc::Receiver<(Batch, u64)>,
    counters: Arc<ExportCounters>,
    mut stop: watch::Receiver<bool>,
) {
    let delay = Duration::from_millis(cfg.batch_delay_ms);
    loop {
        // Wait for the first trace of a batch, then fill it until full or late. Not until
        // `stop`: at shutdown the keeper decides the traces still assembling and offers
        // them, then lets go of its side of the queue; what the queue holds goes out
        // until then (within the shutdown grace; a retry's wait ends at `stop`).
        let Some(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        let mut spans = batch[0].1;
        let deadline = tokio::time::Instant::now() + delay;
        while spans < cfg.batch_spans as u64 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(t)) => {
                    spans += t.1;
                    batch.push(t);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let request = ExportTraceServiceRequest {
            resource_spans: batch.iter().flat_map(|(t, _)| t.iter().cloned()).collect(),
        };
        send_with_retries(&cfg, &mut client, &request, spans, &counters, &mut stop).await;
    }
}

async fn send_with_retries(
    cfg: &ExportConfig,
    client: &mut Client,
    request: &ExportTraceServiceRequest,
    spans: u64,
    counters: &ExportCounters,
    stop: &mut watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    for attempt in 1..=cfg.max_attempts.max(1) {
        let why = match send(client, request).await {
            Outcome::Sent { rejected } => {
                counters.add(&cfg.name, "sent", spans.saturating_sub(rejected));
                if rejected > 0 {
                    counters.add(&cfg.name, "rejected", rejected);
                }
                return;
            }
            Outcome::Fail(why) => {
                tracing::warn!(endpoint = %cfg.name, error = %why, spans, "trace export refused; batch dropped");
                counters.add(&cfg.name, "dropped_failed", spans);
                return;
            }
            Outcome::Retry(after, why) => {
                if attempt == cfg.max_attempts.max(1) {
                    why
                } else {
                    counters
                        .retries
                        .get_or_create(&ExportLabels {
                            endpoint: cfg.name.clone(),
                            outcome: "retry",
                        })
                        .inc();
                    let wait = after
                        .unwrap_or_else(|| crate::domain::jitter(backoff))
                        .min(Duration::from_secs(60));
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    tracing::debug!(endpoint = %cfg.name, error = %why, wait_ms = wait.as_millis() as u64, "trace export retried");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => {
                            counters.add(&cfg.name, "dropped_failed", spans);
                            return;
                        }
                    }
                    continue;
                }
            }
        };
        tracing::warn!(endpoint = %cfg.name, error = %why, spans, attempts = attempt, "trace export failed; batch dropped");
        counters.add(&cfg.name, "dropped_failed", spans);
    }
}

async fn send(client: &mut Client, request: &ExportTraceServiceRequest) -> Outcome {
    match client {
        Client::Http { http, url, headers } => {
            let resp = http
                .post(url.as_str())
                .headers(headers.clone())
                .header("content-type", "application/x-protobuf")
                .body(request.encode_to_vec())
                .send()
                .await;
            match resp {
                Ok(r) => http_outcome(r).await,
                Err(e) => Outcome::Retry(None, format!("{e}")),
            }
        }
        Client::Grpc {
            client,
            headers,
            timeout,
        } => {
            let mut req = tonic::Request::new(request.clone());
            req.set_timeout(*timeout);
            for (k, v) in headers.iter() {
                req.metadata_mut().insert(k.clone(), v.clone());
            }
            match client.export(req).await {
                Ok(r) => Outcome::Sent {
                    rejected: rejected(Some(r.get_ref())),
                },
                Err(status) => grpc_outcome(&status),
            }
        }
    }
}

fn rejected(r: Option<&ExportTraceServiceResponse>) -> u64 {
    r.and_then(|r| r.partial_success.as_ref())
        .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
}

async fn http_outcome(r: reqwest::Response) -> Outcome {
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    match status {
        200..=299 => {
            let body = r.bytes().await.unwrap_or_default();
            let resp = ExportTraceServiceResponse::decode(body.as_ref()).ok();
            Outcome::Sent {
                rejected: rejected(resp.as_ref()),
            }
        }
        429 | 502 | 503 | 504 => Outcome::Retry(retry_after, format!("HTTP {status}")),
        _ => Outcome::Fail(format!("HTTP {status}")),
    }
}

fn grpc_outcome(s: &tonic::Status) -> Outcome {
    use tonic::Code;
    let why = format!("{:?}: {}", s.code(), s.message());
    match s.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled
        | Code::OutOfRange
        | Code::DataLoss => Outcome::Retry(retry_info(s), why),
        Code::ResourceExhausted => match retry_info(s) {
            Some(d) => Outcome::Retry(Some(d), why),
            None => Outcome::Fail(why),
        },
        _ => Outcome::Fail(why),
    }
}

fn retry_info(s: &tonic::Status) -> Option<Duration> {
    s.get_details_retry_info().and_then(|r| r.retry_delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::ErrorDetails;

    /// What a replica that does not lead holds back: at most `max`, the oldest going first,
    /// and nothing older than `STANDBY_FOR` when it takes the lead.
    #[test]
    fn a_standby_holds_the_last_seconds_of_kept_traces_within_its_bound() {
        let t0 = Instant::now();
        let trace = |n: u64| -> Batch {
            Arc::new(vec![ResourceSpans {
                schema_url: n.to_string(),
                ..Default::default()
            }])
        };
        let names = |held: Vec<(Batch, u64)>| -> Vec<String> {
            held.iter().map(|(t, _)| t[0].schema_url.clone()).collect()
        };
        let mut s = Standby::default();
        for n in 0..4 {
            s.hold(t0 + Duration::from_secs(n * 5), trace(n), 2, 3);
        }
        assert_eq!(s.held(), 3, "the oldest went past the bound");
        // At 21 s, what was kept at 5 s is 16 s old: the leader exported it long ago.
        let held = s.take(t0 + Duration::from_secs(21), None);
        assert_eq!(names(held), ["2", "3"]);
        // The old leader was heard at 12 s: from 9 s on it may not have sent what it kept.
        for n in 0..4 {
            s.hold(t0 + Duration::from_secs(n * 5), trace(n), 2, 10);
        }
        let from = t0 + Duration::from_secs(12) - LEADER_LAG;
        let held = s.take(t0 + Duration::from_secs(16), Some(from));
        assert_eq!(names(held), ["2", "3"]);
        assert_eq!(s.held(), 0);
        s.hold(t0, trace(9), 1, 0);
        assert_eq!(s.held(), 0, "no endpoint queue, nothing held");
        s.hold(t0, trace(7), 1, 5);
        s.expire(t0 + STANDBY_FOR + Duration::from_millis(1));
        assert_eq!(s.held(), 0);
    }

    #[test]
    fn grpc_codes_follow_the_otlp_retry_rules() {
        let unavailable = tonic::Status::unavailable("down");
        assert!(matches!(
            grpc_outcome(&unavailable),
            Outcome::Retry(None, _)
        ));
        let plain = tonic::Status::resource_exhausted("full");
        assert!(matches!(grpc_outcome(&plain), Outcome::Fail(_)));
        let with_info = tonic::Status::with_error_details(
            tonic::Code::ResourceExhausted,
            "full",
            ErrorDetails::with_retry_info(Some(Duration::from_secs(3))),
        );
        assert_eq!(
            grpc_outcome(&with_info),
            Outcome::Retry(
                Some(Duration::from_secs(3)),
                "ResourceExhausted: full".into()
            )
        );
        assert!(matches!(
            grpc_outcome(&tonic::Status::invalid_argument("bad")),
            Outcome::Fail(_)
        ));
    }
}
