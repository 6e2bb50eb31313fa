//! The ground floor: plain values every layer may use and that import nothing of the
//! commander's own. Keep it free of I/O and of the layers above (the tidy test checks).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The time, injected wherever a decision depends on it (budget windows, deferral, the
/// classifier's breaker, cache and backoff), so tests move a clock instead of sleeping.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ms(&self) -> u64;

    /// Waits `d` on this clock: the system clock sleeps; a manual clock moves itself
    /// forward and returns at once.
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(d))
    }

    /// Clock seconds per wall-clock second: loops that run "once a second" of this clock
    /// divide their period by it.
    fn speed(&self) -> f64 {
        1.0
    }

    /// A reading of this clock that never goes back, for measuring intervals (the
    /// throttles' rate limiters): the wall clock can be stepped back, which would stall a
    /// limiter for the length of the step. It runs at [`Clock::speed`]. Only differences
    /// between readings mean anything.
    fn monotonic(&self) -> Duration {
        let elapsed = process_start().elapsed();
        let speed = self.speed();
        if speed == 1.0 {
            return elapsed;
        }
        // A lab's `speed` is finite and at most 1000 (the config checks it), so this
        // fits; a reading that did not would be the largest one, never a panic.
        Duration::try_from_secs_f64(elapsed.as_secs_f64() * speed).unwrap_or(Duration::MAX)
    }

    /// How long `d` of this clock's time takes on the wall clock: what a delay handed to
    /// something outside the commander (a JetStream redelivery, a tokio timer) must be.
    fn wall(&self, d: Duration) -> Duration {
        Duration::try_from_secs_f64(d.as_secs_f64() / self.speed()).unwrap_or(d)
    }
}

/// The instant the process first asked for a monotonic reading.
fn process_start() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

#[derive(Debug, Default)]
pub struct SystemClock;

/// Compressed time for simulation labs (`[clock]` in the config): from the wall-clock
/// instant `origin_ms`, it runs `speed` times faster than the wall clock, so an hour of
/// fleet time passes in minutes. Any process on the machine computes the same time from
/// the same two numbers, which is how a lab's simulated agents stamp what they send.
#[derive(Debug)]
pub struct ScaledClock {
    origin_ms: u64,
    speed: f64,
}

impl ScaledClock {
    /// `speed` must be finite and at least 1 (the config checks it); anything else runs
    /// at 1.
    pub fn new(origin_ms: u64, speed: f64) -> Self {
        let speed = if speed.is_finite() && speed >= 1.0 {
            speed
        } else {
            1.0
        };
        Self { origin_ms, speed }
    }
}

impl Clock for ScaledClock {
    fn now_ms(&self) -> u64 {
        let wall = SystemClock.now_ms();
        let ahead = wall.saturating_sub(self.origin_ms) as f64 * self.speed;
        self.origin_ms.saturating_add(ahead as u64)
    }

    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(d.div_f64(self.speed)))
    }

    fn speed(&self) -> f64 {
        self.speed
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock tests move by hand.
#[derive(Debug, Default)]
pub struct ManualClock(pub AtomicU64);

impl ManualClock {
    pub fn at(ms: u64) -> Arc<Self> {
        Arc::new(Self(AtomicU64::new(ms)))
    }
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.advance(d);
        Box::pin(std::future::ready(()))
    }

    /// The hand-moved time itself, so a test moves the throttles' limiters with it.
    fn monotonic(&self) -> Duration {
        Duration::from_millis(self.now_ms())
    }
}

/// An attribution dimension a key can name (the cost ledger's group-by dimensions, which
/// add pool, model and worker, are `fleet::costs::Dim`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribution {
    Team,
    Feature,
    UserTier,
    PromptVariant,
    TaskType,
    Tenant,
    Producer,
}

/// The one table of keys that name a dimension: span and resource attributes and baggage
/// entries (telemetry, `Dims`) and a task's baggage (budgets and throttles, `TaskDims`)
/// are all read through it.
pub fn attribution_of_key(key: &str) -> Option<Attribution> {
    Some(match key {
        "fleet.team" | "team" | "team.name" | "app.team" => Attribution::Team,
        "fleet.feature" | "feature" | "feature.name" | "app.feature" => Attribution::Feature,
        "fleet.user_tier" | "user_tier" | "user.tier" | "enduser.tier" => Attribution::UserTier,
        "fleet.prompt_variant" | "prompt_variant" | "prompt.variant" => Attribution::PromptVariant,
        "fleet.task.type" | "task_type" | "task.type" => Attribution::TaskType,
        "fleet.tenant" | "tenant" | "tenant.id" => Attribution::Tenant,
        "fleet.producer" | "producer" => Attribution::Producer,
        _ => return None,
    })
}

/// The versions of the reloadable sources a decision was made under, checked together
/// (`sources.rs`): the policy version, and the rubric's and the registry's generations
/// (1 at start, +1 per accepted edit; `GET /v1/classifier` and `GET /v1/models` show the
/// ones in force).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub policy: String,
    pub rubric: u64,
    pub registry: u64,
}

/// Which wire protocol the endpoint speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// `POST {endpoint}/v1/chat/completions`, bearer key.
    Openai,
    /// `POST {endpoint}/v1/messages`, `x-api-key` and `anthropic-version`.
    Anthropic,
}

impl Protocol {
    /// `gen_ai.provider.name` for the call's span.
    pub fn provider(self) -> &'static str {
        match self {
            Protocol::Openai => "openai",
            Protocol::Anthropic => "anthropic",
        }
    }
    pub fn as_str(self) -> &'static str {
        self.provider()
    }
}

/// The attribution of a task that budgets and throttles read: from its attributes, else
/// its baggage (the same keys telemetry reads).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskDims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer: Option<String>,
}

impl TaskDims {
    /// Reads `team`, `feature`, `user_tier` and `producer` from `attributes` first, then
    /// from baggage entries (`team`, `fleet.team`, `app.team` …).
    pub fn from_task<'a>(
        attributes: &std::collections::BTreeMap<String, String>,
        baggage: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let mut d = TaskDims {
            team: attributes.get("team").cloned(),
            feature: attributes.get("feature").cloned(),
            user_tier: attributes.get("user_tier").cloned(),
            producer: attributes.get("producer").cloned(),
        };
        for (k, v) in baggage {
            let slot = match attribution_of_key(k) {
                Some(Attribution::Team) => &mut d.team,
                Some(Attribution::Feature) => &mut d.feature,
                Some(Attribution::UserTier) => &mut d.user_tier,
                Some(Attribution::Producer) => &mut d.producer,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(v.to_string());
            }
        }
        d
    }
}

/// The most tokens one span's count, or one metric point, may report: a billion, a
/// hundred times the largest context window there is. More is a broken or hostile
/// exporter; it is refused before it reaches any sum, where one such report would outweigh
/// the fleet's real spend for as long as it is remembered (docs/telemetry.md, "Limits").
pub const MAX_TOKENS_PER_REPORT: u64 = 1_000_000_000;

/// The most a cumulative token counter may stand at: a million tokens a second for thirty
/// years. Past it, or negative, or not a number, the point is refused.
pub const MAX_CUMULATIVE_TOKENS: f64 = 1e15;

/// A ledger cell's address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CellKey {
    pub budget: String,
    /// The scope's value (`search` for team search; `*` for the fleet).
    pub value: String,
    /// Start of the bucket, unix ms.
    pub bucket: u64,
}

impl CellKey {
    /// sled key: length-prefixed budget and value, then the bucket big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.budget.len() + self.value.len() + 12);
        k.extend_from_slice(&(self.budget.len() as u16).to_be_bytes());
        k.extend_from_slice(self.budget.as_bytes());
        k.extend_from_slice(&(self.value.len() as u16).to_be_bytes());
        k.extend_from_slice(self.value.as_bytes());
        k.extend_from_slice(&self.bucket.to_be_bytes());
        k
    }

    pub fn decode(k: &[u8]) -> Option<Self> {
        let take = |k: &[u8], at: usize| -> Option<(String, usize)> {
            let n = u16::from_be_bytes(k.get(at..at + 2)?.try_into().ok()?) as usize;
            let s = std::str::from_utf8(k.get(at + 2..at + 2 + n)?).ok()?;
            Some((s.to_string(), at + 2 + n))
        };
        let (budget, at) = take(k, 0)?;
        let (value, at) = take(k, at)?;
        let bucket = u64::from_be_bytes(k.get(at..at + 8)?.try_into().ok()?);
        Some(Self {
            budget,
            value,
            bucket,
        })
    }
}

/// A turn a throttle gave a held-back task (`policy::throttle`), kept on its record while
/// the task waits parked: which throttle, which key, when (unix milliseconds of the policy
/// clock), and under which spec (a swap that changes the throttle voids it). The record is
/// what the intake loop trusts when the task comes back, never a header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleTurn {
    pub throttle: String,
    pub key: String,
    pub at_ms: u64,
    /// The fingerprint of the throttle's spec that gave the turn.
    pub spec: u64,
}

/// A reservation made at dispatch, kept on the task's record; its result settles it with
/// what the task cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    pub cells: Vec<CellKey>,
    pub est_usd: f64,
    /// What the task's result charged to these cells in place of the estimate (absent
    /// until it finished). The ledger's state on disk is the sum of what records say
    /// ([`Reservation::share`]), so a charge is durable exactly when its record is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charged_usd: Option<f64>,
}

impl Reservation {
    /// What this reservation holds in each of its cells: its charge once settled, its
    /// estimate while open. `terminal`: the task has finished; one that finished without
    /// a charge was settled before charges were recorded (older records) and holds
    /// nothing the ledger does not already count.
    pub fn share(&self, terminal: bool) -> Option<Cell> {
        match self.charged_usd {
            Some(c) => Some(Cell {
                spent: c,
                reserved: 0.0,
            }),
            None if terminal => None,
            None => Some(Cell {
                spent: 0.0,
                reserved: self.est_usd,
            }),
        }
    }
}

/// Spent and reserved USD of one ledger cell (or a change to them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub spent: f64,
    pub reserved: f64,
}

impl Cell {
    /// Applies a change; a reservation never goes below zero (a settle rounding past it,
    /// or a reservation the ledger lost to a restart before charges were recorded).
    pub fn apply(&mut self, change: Cell) {
        self.spent += change.spent;
        self.reserved = (self.reserved + change.reserved).max(0.0);
    }
}

/// FNV-1a, 64-bit: a stable hash for ids that must come out the same after a restart.
/// Lower-case hex of `b` (trace ids, hashes, cursors).
pub fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            // Writing to a String cannot fail.
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// The bytes of a hex string; `None` for odd lengths or anything but hex digits.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The `n`-th wait (from 1) of a sequence that starts at `first` and doubles up to `cap`
/// (0 counts as 1): what a retry waits after `n` failures in a row.
pub fn doubling(first: Duration, n: u32, cap: Duration) -> Duration {
    first
        .saturating_mul(1u32 << n.saturating_sub(1).min(31))
        .min(cap)
}

/// Lets a repeated log line through at most once per period, and counts the ones held
/// back, so a failure that repeats for hours (a broker refusing every write) leaves a
/// line every period, not one per attempt.
#[derive(Debug)]
pub struct LogEvery {
    period_ms: u64,
    /// When a line last went through (Unix ms); 0: never.
    last_ms: AtomicU64,
    held_back: AtomicU64,
}

impl LogEvery {
    pub const fn new(period: Duration) -> Self {
        LogEvery {
            period_ms: period.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may go out now, `n` the lines held back since the last one;
    /// `None` (counted) when it must not.
    pub fn due(&self, now_ms: u64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= self.period_ms;
        if due
            && self
                .last_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Whether this replica leads the others (`detect::lead` holds the lease and sets it):
/// the one that leads notifies the fleet's alerts and exports kept traces. A lone
/// commander leads as soon as it has taken the lease.
#[derive(Clone, Debug, Default)]
pub struct Leading(Arc<LeadState>);

#[derive(Debug, Default)]
struct LeadState {
    on: AtomicBool,
    /// When this replica last saw another renew the lease (the machine's monotonic clock).
    other_heard: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Leading {
    pub fn now(&self) -> bool {
        self.0.on.load(Ordering::Relaxed)
    }

    /// Sets it; true when that changed it.
    pub fn set(&self, on: bool) -> bool {
        self.0.on.swap(on, Ordering::Relaxed) != on
    }

    /// Another replica renewed the lease (was alive) at `at`.
    pub fn heard_other(&self, at: std::time::Instant) {
        if let Ok(mut h) = self.0.other_heard.lock() {
            *h = Some(at);
        }
    }

    /// When another replica was last seen renewing the lease; `None`: never, since this
    /// process started.
    pub fn other_last_heard(&self) -> Option<std::time::Instant> {
        self.0.other_heard.lock().ok().and_then(|h| *h)
    }
}

/// Half to all of `d`, drawn at random, so retries from many senders do not arrive
/// together.
pub fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(ms / 2 + rand::random_range(0..=ms / 2))
}

pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Bounds on one decoded request (`telemetry.*` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Request size after decompression.
    pub max_request_bytes: usize,
    /// Messages of any kind (resources, scopes, spans, attributes, values, events, links,
    /// data points, log records …) in one request.
    pub max_items: usize,
    /// Nesting of attribute values (arrays and key-value lists inside each other).
    pub max_depth: usize,
    /// Estimated memory of the decoded request.
    pub max_decoded_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_request_bytes: 64 << 20,
            max_items: 1_000_000,
            max_depth: 16,
            max_decoded_bytes: 128 << 20,
        }
    }
}

/// Token counts of one call or one aggregate, GenAI convention: `input` includes the
/// cache-read and cache-write tokens, `output` includes reasoning tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TokenUsage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

/// What a GenAI span was doing (`gen_ai.operation.name`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// chat, text_completion, generate_content: an LLM call.
    Inference,
    Embeddings,
    ExecuteTool,
    InvokeAgent,
    InvokeWorkflow,
    /// Another GenAI operation (retrieval, memory, plan …).
    OtherGenAi,
    /// Not a GenAI span.
    #[default]
    None,
}

/// Who emitted a signal. Shared by every span of one OTLP resource.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// The worker key, first of: `fleet.worker.id`, `gen_ai.agent.id`,
    /// `service.name@service.instance.id`, `gen_ai.agent.name`, `service.name` (span
    /// attributes before resource attributes).
    pub worker_id: String,
    pub pool: Option<String>,
    pub agent_name: Option<String>,
    pub version: Option<String>,
    pub service: Option<String>,
}

/// Cost attribution dimensions (from span attributes, resource attributes or baggage).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Dims {
    pub team: Option<String>,
    pub feature: Option<String>,
    pub user_tier: Option<String>,
    pub prompt_variant: Option<String>,
    pub task_type: Option<String>,
    pub tenant: Option<String>,
}

/// One span, normalised.
#[derive(Clone, Debug)]
pub struct SpanEvent {
    pub identity: std::sync::Arc<Identity>,
    /// `gen_ai.agent.name` on the span itself (the resource's is in `identity`).
    pub agent_name: Option<String>,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Span status ERROR, or `error.type` set.
    pub error: bool,
    pub error_type: Option<String>,
    pub operation: Operation,
    pub provider: Option<String>,
    /// The model that answered (`gen_ai.response.model`), else the one requested.
    pub model: Option<String>,
    /// Token counts, when the span reported any.
    pub usage: Option<TokenUsage>,
    /// `gen_ai.tool.name` on `execute_tool` spans.
    pub tool: Option<String>,
    /// `gen_ai.tool.call.arguments`, hashed in canonical form (same call, same hash).
    pub tool_args_hash: Option<u64>,
    /// The fleet task this span belongs to (`fleet.task.id`).
    pub task_id: Option<String>,
    /// `fleet.task.expected_duration_s`.
    pub expected_duration_s: Option<f64>,
    /// The root span of a task run: the worker's CONSUMER span for a fleet task, or a root
    /// `invoke_agent` / `invoke_workflow` span (or `fleet.task.root = true`).
    pub task_root: bool,
    pub dims: Dims,
    /// The span itself names its agent (`fleet.worker.id`, `gen_ai.agent.id` … on the
    /// span): it is the agent for its descendants (`fleet::lineage`).
    pub names_agent: bool,
    /// The resource's own identity, whatever the span says.
    pub resource: std::sync::Arc<Identity>,
    /// The resource names its worker (`fleet.worker.id` or `gen_ai.agent.id`): its spans
    /// never wait for an ancestor to say whose they are.
    pub resource_names_worker: bool,
}

/// What kind of quantity a metric point carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    InputTokens,
    OutputTokens,
    CacheReadTokens,
    CacheWriteTokens,
    /// `gen_ai.client.operation.duration`: `value` is seconds summed over `count` calls.
    OperationDuration,
}

/// One GenAI metric data point, normalised.
#[derive(Clone, Debug)]
pub struct MetricPoint {
    pub identity: std::sync::Arc<Identity>,
    pub kind: MetricKind,
    pub model: Option<String>,
    /// Identifies the time series (metric name + point attributes) for cumulative deltas.
    pub series: u64,
    pub cumulative: bool,
    pub start_ns: u64,
    pub time_ns: u64,
    /// Sum of the points' values (tokens, or seconds).
    pub value: f64,
    pub count: u64,
    pub error: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One line per period goes through, and it says how many were held back.
    #[test]
    fn log_every_lets_one_line_through_per_period() {
        let every = LogEvery::new(Duration::from_secs(10));
        assert_eq!(every.due(1_000), Some(0));
        assert_eq!(every.due(1_001), None);
        assert_eq!(every.due(10_999), None);
        assert_eq!(every.due(11_000), Some(2));
        assert_eq!(every.due(11_000), None);
        assert_eq!(every.due(50_000), Some(1));
    }

    /// A lab's clock hands delays to the wall clock `speed` times shorter, and its
    /// monotonic reading runs `speed` times faster; a manual clock's is its own time.
    #[test]
    fn clocks_convert_delays_and_read_monotonic_time_at_their_speed() {
        let lab = ScaledClock::new(SystemClock.now_ms(), 60.0);
        assert_eq!(lab.wall(Duration::from_secs(60)), Duration::from_secs(1));
        assert_eq!(
            SystemClock.wall(Duration::from_millis(7)),
            Duration::from_millis(7)
        );
        let started = std::time::Instant::now();
        let lab0 = lab.monotonic();
        std::thread::sleep(Duration::from_millis(50));
        let lab_d = lab.monotonic() - lab0;
        let wall_d = started.elapsed();
        // At least 60 × the sleep, at most 60 × all the wall time around it.
        let ms = Duration::from_millis(1);
        assert!(
            lab_d + ms >= Duration::from_millis(50) * 60 && lab_d <= wall_d * 60 + ms,
            "{lab_d:?} of lab time in {wall_d:?}"
        );
        let manual = ManualClock::at(5_000);
        manual.advance(Duration::from_millis(250));
        assert_eq!(manual.monotonic(), Duration::from_millis(5_250));
        // Out of range is the largest reading or the delay as it was, never a panic.
        assert_eq!(
            ScaledClock::new(0, f64::NAN).wall(Duration::MAX),
            Duration::MAX
        );
    }

    #[test]
    fn budgets_and_telemetry_read_the_same_keys() {
        for key in ["team", "fleet.team", "app.team", "team.name"] {
            assert_eq!(attribution_of_key(key), Some(Attribution::Team), "{key}");
            let dims = TaskDims::from_task(&Default::default(), [(key, "search")].into_iter());
            assert_eq!(dims.team.as_deref(), Some("search"), "{key}");
        }
        for key in ["enduser.tier", "user.tier"] {
            let dims = TaskDims::from_task(&Default::default(), [(key, "pro")].into_iter());
            assert_eq!(dims.user_tier.as_deref(), Some("pro"), "{key}");
        }
        assert_eq!(
            attribution_of_key("fleet.producer"),
            Some(Attribution::Producer)
        );
        assert_eq!(attribution_of_key("teams"), None);
    }
}

/// Where in a file a problem is: `file`, and the 1-based line (and column) when known.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl Location {
    pub fn file(file: &str) -> Self {
        Self {
            file: file.to_string(),
            line: None,
            column: None,
        }
    }

    pub fn line(file: &str, line: usize) -> Self {
        Self {
            file: file.to_string(),
            line: Some(line),
            column: None,
        }
    }

    /// A problem at this place.
    pub fn problem(&self, kind: ProblemKind, message: impl Into<String>) -> Problem {
        Problem {
            at: self.clone(),
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}", self.file),
            (Some(l), None) => write!(f, "{}:{l}", self.file),
            _ => f.write_str(&self.file),
        }
    }
}

/// Written as its text (`file:line`), as the API and the audit trail show it.
impl Serialize for Location {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What is wrong, in kinds a program (and a test) can match on; the words are in
/// [`Problem::message`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The file cannot be read at all.
    Unreadable,
    /// Not TOML (or not the shape of one: a wrong type, a missing table).
    Syntax,
    /// A key the format does not have.
    UnknownField,
    /// A required value is absent or empty.
    Missing,
    /// A number or duration outside what is allowed, or one that must rise and does not.
    OutOfRange,
    /// A value that is not one of the allowed words, or does not parse (a pattern, a window).
    BadValue,
    /// A name (pool, model, tier, task type, capability) that does not exist where it must.
    UnknownName,
    /// Something defined twice.
    Duplicate,
    /// Two entries that contradict each other, or a setting that does not apply here.
    Conflict,
    /// An edit of one file that another file in force no longer holds against.
    BreaksOther,
}

/// One validation problem of a config, policy, rubric or registry file. Every check
/// reports all of them at once; the text a person reads is rendered in one place
/// ([`std::fmt::Display`]: `file:line: message`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Problem {
    pub at: Location,
    pub kind: ProblemKind,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// The text of each problem, for answers and logs.
pub fn render(problems: &[Problem]) -> Vec<String> {
    problems.iter().map(ToString::to_string).collect()
}

/// A tool call's arguments, hashed so that the same call hashes the same however its JSON
/// was written: JSON is re-serialised with sorted keys and no spaces; anything else is
/// hashed as it is.
pub fn arguments_hash(args: &str) -> u64 {
    match serde_json::from_str::<serde_json::Value>(args) {
        // serde_json's map is ordered by key (no `preserve_order`): canonical.
        Ok(v) => fnv1a(&[v.to_string().as_bytes()]),
        Err(_) => fnv1a(&[args.as_bytes()]),
    }
}

/// What the trace keeper needs to know of one span, taken from the `SpanEvent` its own
/// normalising pass made: enough to tell a trace's end, its errors, its cost and whose it
/// is.
#[derive(Clone, Debug)]
pub struct SpanFacts {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub start_ns: u64,
    pub end_ns: u64,
    pub error: bool,
    pub operation: Operation,
    /// The root of a task run (see `SpanEvent::task_root`).
    pub task_root: bool,
    pub usage: Option<TokenUsage>,
    /// Billed spans with usage only: what prices the call.
    pub model: Option<String>,
    pub task_id: Option<String>,
    pub task_type: Option<String>,
    pub identity: std::sync::Arc<Identity>,
}

impl SpanFacts {
    /// What the trace keeper needs of `e`, copied before the live state takes the event:
    /// a few ids and times, and at most three short strings.
    pub fn of(e: &SpanEvent) -> Self {
        let billed = e.operation.is_billed() && e.usage.is_some();
        Self {
            trace_id: e.trace_id,
            span_id: e.span_id,
            parent_span_id: e.parent_span_id,
            start_ns: e.start_ns,
            end_ns: e.end_ns,
            error: e.error,
            operation: e.operation,
            task_root: e.task_root,
            usage: e.usage,
            model: if billed { e.model.clone() } else { None },
            task_id: e.task_id.clone(),
            task_type: e.dims.task_type.clone(),
            identity: e.identity.clone(),
        }
    }
}

/// Whether two secrets are equal, in time that depends only on their lengths (a token
/// check must not tell an attacker how many leading bytes were right).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
