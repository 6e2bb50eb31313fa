//! Classification: what kind of task this is, how hard, what it needs, how many tokens.
//!
//! Paths, in order: the producer declared type and tier (`declared`); the bounded cache of
//! earlier LLM answers (`cache`); the cheap LLM against the rubric (`llm`); the
//! deterministic rubric fallback (`fallback`), which answers whenever the others cannot:
//! no endpoint configured, breaker open, call failed, answer garbage or unsure. The
//! classification records which path answered and why, and never fails.

pub mod heuristic;
pub mod llm;
pub mod rubric;

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fleet_worker::message::Task;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::ClassifierConfig;
use crate::registry::{Registry, TokenUsage};
use llm::{CallError, LlmClient};
use rubric::{LONG_CONTEXT, Rubric};

/// Largest token estimate taken from a classifier (beyond it the answer is garbage).
const MAX_TOKENS_ESTIMATE: u64 = 10_000_000;

/// Which path produced a classification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Declared,
    Cache,
    Llm,
    Fallback,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Declared => "declared",
            Source::Cache => "cache",
            Source::Llm => "llm",
            Source::Fallback => "fallback",
        }
    }
}

/// The validated content of a classification.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub task_type: String,
    pub tier: String,
    pub capabilities: Vec<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub confidence: f64,
}

impl Answer {
    pub fn is_long_context(&self) -> bool {
        self.capabilities.iter().any(|c| c == LONG_CONTEXT)
    }
}

/// A classification and how it came about.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    #[serde(flatten)]
    pub answer: Answer,
    pub source: Source,
    /// Why this path answered (e.g. "fallback: classifier HTTP 429 after 3 attempts").
    pub reason: String,
    /// For the fallback: a stable code of what the LLM path lacked (`no_endpoint`,
    /// `breaker_open`, `timeout`, `rate_limited`, `server_error`, `connect`, `garbage`,
    /// `low_confidence` …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_cause: Option<String>,
    /// The classifier model, when an LLM call was made for this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// What the classifier call(s) for this task cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    pub attempts: u32,
    pub latency_ms: u64,
}

/// One classifier call, for the commander's own span and cost line.
#[derive(Clone, Debug)]
pub struct CallRecord {
    pub task_id: Option<String>,
    pub provider: &'static str,
    pub server: String,
    pub request_model: String,
    pub response_model: Option<String>,
    pub usage: Option<TokenUsage>,
    pub cost_usd: Option<f64>,
    pub start: SystemTime,
    pub end: SystemTime,
    /// The error code when the call failed or its answer was garbage.
    pub error: Option<&'static str>,
    pub attempt: u32,
    /// W3C trace to attach the span to: (trace id, parent span id).
    pub trace: Option<([u8; 16], Option<[u8; 8]>)>,
}

/// Receives every classifier call (wired to spans and the cost ledger at startup).
pub type CallHook = Arc<dyn Fn(CallRecord) + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassifyLabels {
    pub source: &'static str,
    /// `none` unless the fallback answered.
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `ok`, `garbage` or an error code.
    pub outcome: &'static str,
}

/// The classifier's counters on `/metrics`.
#[derive(Debug, Default)]
pub struct ClassifierCounters {
    pub classifications: Family<ClassifyLabels, Counter>,
    pub calls: Family<CallLabels, Counter>,
    /// Breaker transitions to open.
    pub breaker_opened: Counter,
    /// USD spent on classification, in micro-dollars (counters are integers).
    pub cost_micro_usd: Counter,
}

impl ClassifierCounters {
    /// Registers these counters (the registry carries the `fleet_` prefix).
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "classifications",
            "Task classifications, by the path that answered and the fallback's cause",
            self.classifications.clone(),
        );
        r.register(
            "classifier_calls",
            "Classifier LLM requests, by outcome",
            self.calls.clone(),
        );
        r.register(
            "classifier_breaker_opened",
            "Times the classifier circuit opened",
            self.breaker_opened.clone(),
        );
        r.register(
            "classifier_cost_micro_usd",
            "What classification cost, in millionths of a dollar",
            self.cost_micro_usd.clone(),
        );
    }
}

/// Where a task's classifier span hangs in its trace.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceCtx {
    pub trace_id: [u8; 16],
    pub parent_span_id: Option<[u8; 8]>,
}

#[derive(Debug)]
enum Breaker {
    Closed {
        failures: u32,
    },
    Open {
        /// Unix ms on the classifier's clock.
        until_ms: u64,
        failures: u32,
    },
    /// One probe is out; everyone else falls back until it answers.
    HalfOpen,
}

#[derive(Debug)]
struct CacheEntry {
    answer: Answer,
    model: Option<String>,
    /// Unix ms on the classifier's clock.
    at_ms: u64,
}

/// One call to the classifier LLM: what it was for and when it ran.
#[derive(Clone, Copy)]
struct Call<'a> {
    rubric: &'a Rubric,
    /// Prices the call.
    registry: &'a Registry,
    task: &'a Task,
    trace: Option<TraceCtx>,
    key: [u8; 32],
    client: &'a LlmClient,
    attempt: u32,
    start: SystemTime,
    end: SystemTime,
}

impl Call<'_> {
    /// The call as the hook receives it, before anything is known of its answer.
    fn record(&self) -> CallRecord {
        CallRecord {
            task_id: self.task.id.clone(),
            provider: self.client.protocol().provider(),
            server: self.client.server(),
            request_model: self.client.model.clone(),
            response_model: None,
            usage: None,
            cost_usd: None,
            start: self.start,
            end: self.end,
            error: None,
            attempt: self.attempt,
            trace: self.trace.map(|t| (t.trace_id, t.parent_span_id)),
        }
    }
}

/// What a classification reads: the rubric (and its generation, part of every cache key)
/// and the registry that prices the classifier's own call, from the live snapshot the
/// intake batch reads once.
#[derive(Clone, Copy, Debug)]
pub struct Grounds<'a> {
    pub rubric: &'a Rubric,
    pub rubric_generation: u64,
    pub registry: &'a Registry,
}

/// The classifier: shared by every intake batch.
pub struct Classifier {
    client: Option<LlmClient>,
    cfg: ClassifierConfig,
    cache: Mutex<lru::LruCache<[u8; 32], CacheEntry>>,
    breaker: Mutex<Breaker>,
    permits: tokio::sync::Semaphore,
    /// Classifications in progress, by cache key (single flight).
    inflight: Mutex<rustc_hash::FxHashMap<[u8; 32], Arc<tokio::sync::OnceCell<Classification>>>>,
    pub counters: Arc<ClassifierCounters>,
    on_call: Option<CallHook>,
    /// The breaker, the cache's age and the retry backoff read it (tests move it by hand).
    clock: Arc<dyn crate::domain::Clock>,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("endpoint", &self.cfg.endpoint)
            .field("protocol", &self.cfg.protocol)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    #[error("classifier.api_key_env: environment variable {0} is not set")]
    MissingKey(String),
    #[error("classifier client: {0}")]
    Client(#[from] CallError),
}

impl Classifier {
    /// Builds the classifier; the API key is read from `cfg.api_key_env`.
    pub fn new(
        cfg: ClassifierConfig,
        rubric: &Rubric,
        on_call: Option<CallHook>,
    ) -> Result<Self, ClassifierError> {
        let api_key = match &cfg.api_key_env {
            None => None,
            Some(var) => {
                Some(std::env::var(var).map_err(|_| ClassifierError::MissingKey(var.clone()))?)
            }
        };
        Self::with_key(cfg, api_key, rubric, on_call)
    }

    /// Builds the classifier with the API key given directly.
    pub fn with_key(
        cfg: ClassifierConfig,
        api_key: Option<String>,
        rubric: &Rubric,
        on_call: Option<CallHook>,
    ) -> Result<Self, ClassifierError> {
        let client = match &cfg.endpoint {
            None => None,
            Some(endpoint) => {
                let model = cfg
                    .model
                    .clone()
                    .unwrap_or_else(|| rubric.classifier.model.clone());
                Some(LlmClient::new(
                    cfg.protocol,
                    endpoint,
                    model,
                    api_key,
                    cfg.max_tokens,
                )?)
            }
        };
        let entries = NonZeroUsize::new(cfg.cache_entries).unwrap_or(NonZeroUsize::MIN);
        Ok(Self {
            client,
            cache: Mutex::new(lru::LruCache::new(entries)),
            breaker: Mutex::new(Breaker::Closed { failures: 0 }),
            permits: tokio::sync::Semaphore::new(cfg.concurrency.max(1)),
            inflight: Mutex::new(Default::default()),
            counters: Arc::new(ClassifierCounters::default()),
            on_call,
            clock: Arc::new(crate::domain::SystemClock),
            cfg,
        })
    }

    /// The same classifier on another clock.
    pub fn with_clock(mut self, clock: Arc<dyn crate::domain::Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn endpoint(&self) -> Option<&str> {
        self.cfg.endpoint.as_deref()
    }

    pub fn protocol(&self) -> llm::Protocol {
        self.cfg.protocol
    }

    /// The model asked, when an endpoint is configured.
    pub fn model(&self) -> Option<&str> {
        self.client.as_ref().map(|c| c.model.as_str())
    }

    /// Classifies one task against the rubric of `g` (the live snapshot its batch reads).
    /// Never fails: the fallback answers when nothing else can.
    pub async fn classify(
        &self,
        g: Grounds<'_>,
        task: &Task,
        trace: Option<TraceCtx>,
    ) -> Classification {
        let started = Instant::now();
        let mut c = self.classify_inner(g, task, trace).await;
        c.latency_ms = started.elapsed().as_millis() as u64;
        self.counters
            .classifications
            .get_or_create(&ClassifyLabels {
                source: c.source.as_str(),
                cause: c.fallback_cause.clone().unwrap_or_else(|| "none".into()),
            })
            .inc();
        c
    }

    async fn classify_inner(
        &self,
        g: Grounds<'_>,
        task: &Task,
        trace: Option<TraceCtx>,
    ) -> Classification {
        if let Some(c) = declared(g.rubric, task) {
            return c;
        }
        let key = self.cache_key(g.rubric_generation, task);
        if let Some(c) = self.cached(&key) {
            return c;
        }
        // Single flight: identical tasks arriving together wait for one call instead of
        // each making their own (a burst of one text would otherwise miss the cache N times).
        let cell = match self.inflight.lock() {
            Ok(mut m) => m.entry(key).or_default().clone(),
            Err(_) => Arc::new(tokio::sync::OnceCell::new()),
        };
        let led = std::sync::atomic::AtomicBool::new(false);
        let shared = cell
            .get_or_init(|| async {
                led.store(true, std::sync::atomic::Ordering::Relaxed);
                self.llm_path(g, task, trace, key).await
            })
            .await;
        // Whoever sees it settled clears it (the cache answers from now on).
        if let Ok(mut m) = self.inflight.lock()
            && m.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell))
        {
            m.remove(&key);
        }
        if led.load(std::sync::atomic::Ordering::Relaxed) {
            return shared.clone();
        }
        let mut c = shared.clone();
        c.cost_usd = None;
        c.attempts = 0;
        if c.source == Source::Llm {
            c.source = Source::Cache;
            c.reason = format!("shared answer of a concurrent identical task: {}", c.reason);
            c.model = None;
        }
        c
    }

    /// The LLM call (with retries and the breaker), or the fallback when it cannot answer.
    async fn llm_path(
        &self,
        g: Grounds<'_>,
        task: &Task,
        trace: Option<TraceCtx>,
        key: [u8; 32],
    ) -> Classification {
        let rubric = g.rubric;
        let Some(client) = &self.client else {
            return fallback(
                rubric,
                task,
                "no_endpoint",
                "no classifier endpoint is configured".into(),
                None,
                0,
            );
        };
        if let Err(until) = self.admit() {
            return fallback(
                rubric,
                task,
                "breaker_open",
                format!(
                    "classifier circuit open for {}ms more after repeated failures",
                    until.as_millis()
                ),
                None,
                0,
            );
        }
        let _permit = self.permits.acquire().await;
        let user = task_text(task, rubric.classifier.max_task_chars);
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let mut attempt = 0;
        let mut cost = 0.0;
        let mut backoff = Duration::from_millis(self.cfg.backoff_ms);
        loop {
            attempt += 1;
            let start = SystemTime::now();
            let result = client.call(&rubric.system_prompt, &user, timeout).await;
            let end = SystemTime::now();
            let call = Call {
                rubric,
                registry: g.registry,
                task,
                trace,
                key,
                client,
                attempt,
                start,
                end,
            };
            match result {
                Ok(reply) => {
                    self.record_success();
                    return self.answered(&call, reply, &mut cost);
                }
                Err(e) => {
                    self.report(CallRecord {
                        error: Some(e.code()),
                        ..call.record()
                    });
                    if e.retryable() && attempt <= self.cfg.max_retries {
                        let wait = match &e {
                            CallError::Status {
                                retry_after: Some(r),
                                ..
                            } => *r,
                            _ => jitter(backoff, attempt),
                        }
                        .min(Duration::from_millis(self.cfg.max_backoff_ms));
                        self.clock.sleep(wait).await;
                        backoff = (backoff * 2).min(Duration::from_millis(self.cfg.max_backoff_ms));
                        continue;
                    }
                    self.record_failure();
                    let mut c = fallback(
                        rubric,
                        task,
                        e.code(),
                        format!("classifier call failed after {attempt} attempt(s): {e}"),
                        (cost > 0.0).then_some(cost),
                        attempt,
                    );
                    c.model = Some(client.model.clone());
                    return c;
                }
            }
        }
    }

    /// What an answered call comes to: the LLM's classification, or the fallback when the
    /// answer is garbage or not confident enough. Reports the call and adds its cost.
    fn answered(&self, call: &Call<'_>, reply: llm::Reply, cost: &mut f64) -> Classification {
        let Call {
            rubric,
            registry,
            task,
            key,
            client,
            attempt,
            ..
        } = *call;
        let usage = match (reply.input_tokens, reply.output_tokens) {
            (None, None) => None,
            (i, o) => Some(TokenUsage {
                input: i.unwrap_or(0),
                output: o.unwrap_or(0),
                ..Default::default()
            }),
        };
        let call_cost = usage.and_then(|u| {
            registry
                .lookup(reply.model.as_deref().unwrap_or(&client.model))
                .map(|m| m.cost(&u))
        });
        *cost += call_cost.unwrap_or(0.0);
        let parsed = parse_answer(rubric, task, &reply.text);
        self.report(CallRecord {
            response_model: reply.model.clone(),
            usage,
            cost_usd: call_cost,
            error: parsed.as_ref().err().map(|_| "garbage"),
            ..call.record()
        });
        let cost_usd = (*cost > 0.0).then_some(*cost);
        match parsed {
            Err(why) => {
                let mut c = fallback(
                    rubric,
                    task,
                    "garbage",
                    format!("classifier answer rejected: {why}"),
                    cost_usd,
                    attempt,
                );
                c.model = Some(client.model.clone());
                c
            }
            Ok(answer) if answer.confidence < rubric.classifier.min_confidence => {
                let mut c = fallback(
                    rubric,
                    task,
                    "low_confidence",
                    format!(
                        "classifier said {}/{} with confidence {:.2} < {:.2}",
                        answer.task_type,
                        answer.tier,
                        answer.confidence,
                        rubric.classifier.min_confidence
                    ),
                    cost_usd,
                    attempt,
                );
                c.model = Some(client.model.clone());
                c
            }
            Ok(answer) => {
                self.store(
                    key,
                    &answer,
                    reply.model.clone().or(Some(client.model.clone())),
                );
                Classification {
                    reason: format!(
                        "{} classified it {}/{} (confidence {:.2}){}",
                        client.model,
                        answer.task_type,
                        answer.tier,
                        answer.confidence,
                        if attempt > 1 {
                            format!(" on attempt {attempt}")
                        } else {
                            String::new()
                        }
                    ),
                    answer,
                    source: Source::Llm,
                    fallback_cause: None,
                    model: Some(client.model.clone()),
                    cost_usd,
                    attempts: attempt,
                    latency_ms: 0,
                }
            }
        }
    }

    fn report(&self, rec: CallRecord) {
        self.counters
            .calls
            .get_or_create(&CallLabels {
                outcome: rec.error.unwrap_or("ok"),
            })
            .inc();
        if let Some(c) = rec.cost_usd {
            self.counters
                .cost_micro_usd
                .inc_by((c * 1e6).round() as u64);
        }
        if let Some(hook) = &self.on_call {
            hook(rec);
        }
    }

    /// The normalised content a classification depends on, hashed; the rubric
    /// generation is part of it so an edited rubric is never answered from stale entries.
    fn cache_key(&self, rubric_generation: u64, task: &Task) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(rubric_generation.to_le_bytes());
        // Words lowercased and single-spaced, fed through a small buffer (no allocation
        // per word: this runs for every task).
        let mut buf = [0u8; 256];
        let mut n = 0;
        let mut push = |h: &mut Sha256, bytes: &[u8]| {
            if n + bytes.len() > buf.len() {
                h.update(&buf[..n]);
                n = 0;
            }
            if bytes.len() > buf.len() {
                h.update(bytes);
            } else {
                buf[n..n + bytes.len()].copy_from_slice(bytes);
                n += bytes.len();
            }
        };
        let input = match &task.input {
            serde_json::Value::Null => None,
            serde_json::Value::String(t) => Some(std::borrow::Cow::Borrowed(t.as_str())),
            other => Some(std::borrow::Cow::Owned(other.to_string())),
        };
        for part in std::iter::once(task.description.as_str()).chain(input.as_deref()) {
            for word in part.split_whitespace() {
                for ch in word.chars().flat_map(char::to_lowercase) {
                    let mut tmp = [0u8; 4];
                    push(&mut h, ch.encode_utf8(&mut tmp).as_bytes());
                }
                push(&mut h, b" ");
            }
        }
        h.update(&buf[..n]);
        let mut caps = task.capabilities.clone();
        caps.sort();
        for c in caps {
            h.update(b"\0cap:");
            h.update(c.as_bytes());
        }
        h.finalize().into()
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Classification> {
        let ttl = Duration::from_secs(self.cfg.cache_ttl_s);
        let mut cache = self.cache.lock().ok()?;
        let hit = cache.get(key)?;
        let age = Duration::from_millis(self.clock.now_ms().saturating_sub(hit.at_ms));
        if age > ttl {
            cache.pop(key);
            return None;
        }
        Some(Classification {
            reason: format!(
                "cached answer of {}",
                hit.model.as_deref().unwrap_or("the classifier")
            ),
            answer: hit.answer.clone(),
            source: Source::Cache,
            fallback_cause: None,
            model: None,
            cost_usd: None,
            attempts: 0,
            latency_ms: 0,
        })
    }

    fn store(&self, key: [u8; 32], answer: &Answer, model: Option<String>) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.put(
                key,
                CacheEntry {
                    answer: answer.clone(),
                    model,
                    at_ms: self.clock.now_ms(),
                },
            );
        }
    }

    /// Whether a call may go out now; `Err(remaining)` while the breaker is open.
    fn admit(&self) -> Result<(), Duration> {
        let Ok(mut b) = self.breaker.lock() else {
            return Ok(());
        };
        match *b {
            Breaker::Closed { .. } => Ok(()),
            Breaker::HalfOpen => Err(Duration::ZERO),
            Breaker::Open { until_ms, .. } => {
                let now = self.clock.now_ms();
                if now >= until_ms {
                    *b = Breaker::HalfOpen;
                    Ok(())
                } else {
                    Err(Duration::from_millis(until_ms - now))
                }
            }
        }
    }

    fn record_success(&self) {
        if let Ok(mut b) = self.breaker.lock() {
            *b = Breaker::Closed { failures: 0 };
        }
    }

    fn record_failure(&self) {
        let Ok(mut b) = self.breaker.lock() else {
            return;
        };
        let until_ms = self.clock.now_ms().saturating_add(self.cfg.breaker_open_ms);
        *b = match *b {
            Breaker::Closed { failures } if failures + 1 < self.cfg.breaker_failures => {
                Breaker::Closed {
                    failures: failures + 1,
                }
            }
            Breaker::Closed { failures } | Breaker::Open { failures, .. } => {
                self.counters.breaker_opened.inc();
                tracing::warn!(
                    failures = failures + 1,
                    open_ms = self.cfg.breaker_open_ms,
                    "classifier circuit opened; the fallback classifies meanwhile"
                );
                Breaker::Open {
                    until_ms,
                    failures: failures + 1,
                }
            }
            Breaker::HalfOpen => {
                self.counters.breaker_opened.inc();
                tracing::warn!("classifier probe failed; circuit open again");
                Breaker::Open {
                    until_ms,
                    failures: self.cfg.breaker_failures,
                }
            }
        };
    }

    /// `closed`, `open` or `half_open`, for the API.
    pub fn breaker_state(&self) -> &'static str {
        match self.breaker.lock().map(|b| match *b {
            Breaker::Closed { .. } => "closed",
            Breaker::Open { .. } => "open",
            Breaker::HalfOpen => "half_open",
        }) {
            Ok(s) => s,
            Err(_) => "unknown",
        }
    }
}

/// Full jitter: a random wait up to the backoff (spreads retries of many tasks).
fn jitter(backoff: Duration, attempt: u32) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(attempt);
    let frac = f64::from(nanos % 1000) / 1000.0;
    backoff.mul_f64(0.5 + frac / 2.0)
}

/// The text a task is classified on: description, then its input when it is a string
/// (or compact JSON), cut to `max` characters on a char boundary.
pub fn task_text(task: &Task, max: usize) -> String {
    let mut s = task.description.clone();
    match &task.input {
        serde_json::Value::Null => {}
        serde_json::Value::String(t) => {
            s.push('\n');
            s.push_str(t);
        }
        other => {
            s.push('\n');
            s.push_str(&other.to_string());
        }
    }
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// How a task is classified without the LLM: declared type, else the deterministic
/// fallback (policy test cases and shadow replay use it).
pub fn offline(rubric: &Rubric, task: &Task) -> Classification {
    declared(rubric, task)
        .unwrap_or_else(|| fallback(rubric, task, "offline", "no LLM call".into(), None, 0))
}

/// A producer that names a known task type (and optionally a known tier; else the
/// type's default tier) is believed: it knows its own work, and it saves a call.
fn declared(rubric: &Rubric, task: &Task) -> Option<Classification> {
    let ty = rubric.task_type(task.attributes.get("task_type")?)?;
    let tier = match task.attributes.get("tier") {
        Some(t) => {
            rubric.tier_index(t)?;
            t.clone()
        }
        None => ty.default_tier.clone(),
    };
    let (mut answer, _) = heuristic::classify(rubric, task);
    answer.task_type = ty.name.clone();
    answer.tier = tier.clone();
    answer.output_tokens = ty.output_tokens;
    for c in &ty.capabilities {
        if !answer.capabilities.contains(c) {
            answer.capabilities.push(c.clone());
        }
    }
    answer.confidence = 1.0;
    Some(Classification {
        reason: format!("producer declared task_type {} (tier {tier})", ty.name),
        answer,
        source: Source::Declared,
        fallback_cause: None,
        model: None,
        cost_usd: None,
        attempts: 0,
        latency_ms: 0,
    })
}

fn fallback(
    rubric: &Rubric,
    task: &Task,
    cause: &str,
    why: String,
    cost_usd: Option<f64>,
    attempts: u32,
) -> Classification {
    let (answer, how) = heuristic::classify(rubric, task);
    Classification {
        reason: format!("fallback ({why}): {how}"),
        answer,
        source: Source::Fallback,
        fallback_cause: Some(cause.to_string()),
        model: None,
        cost_usd,
        attempts,
        latency_ms: 0,
    }
}

/// The answer shape the classifier must return, exactly.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireAnswer {
    task_type: String,
    tier: String,
    capabilities: Vec<String>,
    estimated_input_tokens: u64,
    estimated_output_tokens: u64,
    confidence: f64,
}

/// Parses and validates a classifier's text against the rubric. Anything but one JSON
/// object of the required shape with known names and in-range numbers is garbage. (A
/// surrounding Markdown code fence is tolerated: models add one even when told not to.)
pub fn parse_answer(rubric: &Rubric, task: &Task, text: &str) -> Result<Answer, String> {
    let mut t = text.trim();
    if let Some(rest) = t.strip_prefix("```") {
        let rest = rest.strip_prefix("json").unwrap_or(rest);
        t = rest.strip_suffix("```").unwrap_or(rest).trim();
    }
    let w: WireAnswer = serde_json::from_str(t).map_err(|e| {
        let shown: String = text.chars().take(80).collect();
        format!("not the JSON asked for ({e}): {shown:?}")
    })?;
    let mut problems = Vec::new();
    if rubric.task_type(&w.task_type).is_none() {
        problems.push(format!("unknown task_type {:?}", w.task_type));
    }
    if rubric.tier_index(&w.tier).is_none() {
        problems.push(format!("unknown tier {:?}", w.tier));
    }
    for c in &w.capabilities {
        if !rubric.capabilities.contains(c) {
            problems.push(format!("unknown capability {c:?}"));
        }
    }
    if !(w.confidence.is_finite() && (0.0..=1.0).contains(&w.confidence)) {
        problems.push(format!(
            "confidence {} is not between 0 and 1",
            w.confidence
        ));
    }
    for (k, v) in [
        ("estimated_input_tokens", w.estimated_input_tokens),
        ("estimated_output_tokens", w.estimated_output_tokens),
    ] {
        if v > MAX_TOKENS_ESTIMATE {
            problems.push(format!("{k} {v} is out of range"));
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let mut capabilities = w.capabilities;
    // What the producer declared is required whatever the classifier thinks.
    for c in &task.capabilities {
        if !capabilities.contains(c) {
            capabilities.push(c.clone());
        }
    }
    // The text's own size is a floor for the input estimate.
    let own = heuristic::estimate_tokens(task_text(task, usize::MAX).len());
    let input_tokens = w.estimated_input_tokens.max(own);
    if input_tokens > rubric.classifier.long_context_tokens
        && !capabilities.iter().any(|c| c == LONG_CONTEXT)
    {
        capabilities.push(LONG_CONTEXT.to_string());
    }
    Ok(Answer {
        task_type: w.task_type,
        tier: w.tier,
        capabilities,
        input_tokens,
        output_tokens: w.estimated_output_tokens,
        confidence: w.confidence,
    })
}

#[cfg(test)]
mod tests;
