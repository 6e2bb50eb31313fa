//! The commander's configuration: one struct tree, read from TOML, every field documented.
//!
//! Precedence: command-line flag > environment variable > config file > default. Syntax
//! errors carry the file, line and column (from the TOML parser); semantic errors are all
//! collected and reported together, each with its key path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_worker::protocol::{DEFAULT_PREFIX, Subjects, is_subject_token};
use serde::{Deserialize, Serialize};

use crate::domain::ProblemKind::{self, *};
use crate::domain::{Location, Problem};

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How to reach NATS.
    #[serde(default)]
    pub nats: NatsConfig,
    /// The HTTP API.
    #[serde(default)]
    pub http: HttpConfig,
    /// Where durable local state lives.
    #[serde(default)]
    pub store: StoreConfig,
    /// Task intake processing.
    #[serde(default)]
    pub intake: IntakeConfig,
    /// How tasks find pools and models: the decision's rules and thresholds.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// The task classifier: rubric, LLM endpoint, retries, breaker, cache.
    #[serde(default)]
    pub classifier: ClassifierConfig,
    /// The decision log.
    #[serde(default)]
    pub decisions: DecisionLogConfig,
    /// Detection: how often the rules run and how many alerts are kept (the thresholds
    /// are the policy's `[alerts]`).
    #[serde(default)]
    pub detect: DetectConfig,
    /// Pools by name (`[pools.code]`). Empty means "any pool a task names is accepted".
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
    /// Telemetry ingest: OTLP listeners, NATS, limits, the model registry.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Live fleet state: state machine thresholds and memory bounds.
    #[serde(default)]
    pub fleet: FleetConfig,
    /// Policies: where they are read from, who may push them, the deferred queue.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Kept traces: assembly bounds, the trace store, OTLP export (which traces are kept
    /// and what they may contain is the policy's `[sampling]` and redaction).
    #[serde(default)]
    pub traces: TracesConfig,
    /// Who may call what: bearer tokens with roles, the control plane's limits
    /// (docs/api.md, "Roles").
    #[serde(default)]
    pub auth: AuthConfig,
    /// Fleet time: leave it alone in production. A simulation lab compresses it.
    #[serde(default)]
    pub clock: ClockConfig,
}

/// `[clock]`: compressed fleet time for simulation labs (`fleet-sim scenario --stack`).
/// From the wall-clock instant `origin_ms`, fleet time runs `speed` times faster: every
/// window, rate, state timer, alert, budget and trace decision follows it, and the fleet
/// owner's and the detector's once-a-second loops run `speed` times a second.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClockConfig {
    /// Fleet seconds per wall-clock second, 1 to 1000. 1 (the default) is the wall clock.
    pub speed: f64,
    /// The wall-clock instant (Unix milliseconds) fleet time starts running fast from;
    /// unset: when the commander starts.
    pub origin_ms: Option<u64>,
}

impl Default for ClockConfig {
    fn default() -> Self {
        Self {
            speed: 1.0,
            origin_ms: None,
        }
    }
}

impl ClockConfig {
    /// The clock this section asks for.
    pub fn build(&self) -> std::sync::Arc<dyn crate::domain::Clock> {
        if self.speed == 1.0 {
            return std::sync::Arc::new(crate::domain::SystemClock);
        }
        let origin = self
            .origin_ms
            .unwrap_or_else(|| crate::domain::Clock::now_ms(&crate::domain::SystemClock));
        std::sync::Arc::new(crate::domain::ScaledClock::new(origin, self.speed))
    }
}

/// A role a bearer token holds (docs/api.md has the matrix of what each may call).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads everything: the dashboard, the API, `/metrics`, the live stream.
    Viewer,
    /// A viewer who may also act: pause, drain, resume, cancel, cap, silence, revert.
    Operator,
    /// A viewer who may also change policy.
    Compliance,
    /// Submits tasks and reads their records; nothing else.
    Producer,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::Viewer,
        Role::Operator,
        Role::Compliance,
        Role::Producer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Compliance => "compliance",
            Role::Producer => "producer",
        }
    }
}

/// `[auth]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer tokens, each read from an environment variable and holding one role. None
    /// (and no compliance token either): local mode, where every caller may do everything
    /// and the API binds loopback only.
    pub tokens: Vec<TokenConfig>,
    /// Local mode binds a non-loopback `http.listen` only when this is true.
    pub allow_remote_without_tokens: bool,
    /// Origins (`https://ops.example.com`) whose pages may open `/v1/control`, besides
    /// the commander's own.
    pub allowed_origins: Vec<String>,
    /// Control commands per caller per second (a token bucket).
    pub control_per_s: u32,
    /// Control commands a caller may send at once before the rate applies.
    pub control_burst: u32,
    /// Control commands kept in the audit log (newest).
    pub audit_records: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            allow_remote_without_tokens: false,
            allowed_origins: Vec::new(),
            control_per_s: 5,
            control_burst: 20,
            audit_records: 10_000,
        }
    }
}

/// One `[[auth.tokens]]` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it: written in the audit of what it does (the token never is).
    pub name: String,
    pub role: Role,
    /// Environment variable holding the token. Unset or empty at start-up: the entry is
    /// skipped, with a warning.
    pub token_env: String,
}

impl AuthConfig {
    /// The configured tokens whose variables are set: (name, role, token).
    pub fn resolve(&self) -> Vec<(String, Role, String)> {
        self.tokens
            .iter()
            .filter_map(|t| {
                let v = std::env::var(&t.token_env).ok()?;
                let v = v.trim();
                if v.is_empty() {
                    tracing::warn!(token = %t.name, env = %t.token_env, "auth token variable unset or empty: entry skipped");
                    return None;
                }
                Some((t.name.clone(), t.role, v.to_string()))
            })
            .collect()
    }
}

/// `[traces]` (docs/traces.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracesConfig {
    /// Assemble, sample and keep traces. Off: spans feed the live state only.
    pub enabled: bool,
    /// After a trace's root arrives, how long late children are waited for.
    pub decision_wait_ms: u64,
    /// A trace whose root never comes is decided this long after its first span.
    pub max_trace_s: u64,
    /// Spans held while their traces assemble, in bytes; past it the oldest traces are
    /// decided early (`fleet_traces_decided_total{ending="evicted"}`).
    pub buffer_bytes: usize,
    /// Exports waiting for the keeper; past it their spans are shed from trace keeping
    /// (the live state still gets them), counted.
    pub queue_batches: usize,
    /// Bytes of those exports at most; past it, the same.
    pub queue_bytes: usize,
    /// Decided traces remembered, so late spans follow their trace's decision.
    pub remember_traces: usize,
    /// Kept traces on disk, in bytes (oldest removed first).
    pub store_bytes: u64,
    /// Kept traces older than this are removed.
    pub retention_hours: u64,
    /// Where kept (redacted) traces are sent, over OTLP.
    pub export: Vec<ExportConfig>,
}

impl Default for TracesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            decision_wait_ms: 2_000,
            max_trace_s: 300,
            buffer_bytes: 64 << 20,
            queue_batches: 1_024,
            queue_bytes: 256 << 20,
            remember_traces: 100_000,
            store_bytes: 1 << 30,
            retention_hours: 72,
            export: Vec::new(),
        }
    }
}

/// `[[traces.export]]`: one OTLP endpoint (Phoenix, Langfuse, Tempo, Jaeger, a collector).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Unique; names the endpoint in logs and counters.
    pub name: String,
    pub protocol: ExportProtocol,
    /// gRPC: `http://host:4317`. HTTP: the full traces URL (`http://host:4318/v1/traces`);
    /// a URL with no path gets `/v1/traces`.
    pub endpoint: String,
    /// Headers sent with every export (not secrets: they are shown by `config check`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Headers whose value is read from an environment variable (`authorization =
    /// "PHOENIX_API_KEY"`): for secrets. Never logged.
    #[serde(default)]
    pub headers_env: BTreeMap<String, String>,
    /// Traces waiting to be sent at most; more are dropped and counted.
    #[serde(default = "default_export_queue")]
    pub queue_traces: usize,
    /// Spans per export request at most.
    #[serde(default = "default_batch_spans")]
    pub batch_spans: usize,
    /// A partial batch is sent after this long.
    #[serde(default = "default_batch_delay_ms")]
    pub batch_delay_ms: u64,
    /// Tries per batch (the first included) on retryable answers.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Per request.
    #[serde(default = "default_export_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_export_queue() -> usize {
    4_096
}
fn default_batch_spans() -> usize {
    512
}
fn default_batch_delay_ms() -> u64 {
    1_000
}
fn default_export_timeout_ms() -> u64 {
    10_000
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportProtocol {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    Http,
}

/// `[policy]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of `*.policy.toml` files, watched and hot-reloaded. Unset: the built-in
    /// policy (`policies/default.policy.toml`) until one is pushed.
    pub dir: Option<PathBuf>,
    /// Environment variable holding the compliance role's token, required by
    /// `PUT /v1/policy` and `<prefix>.policy.push` (`Authorization: Bearer <token>`).
    /// Unset or empty variable: pushes are refused.
    pub compliance_token_env: Option<String>,
    /// Audit records kept (newest).
    pub audit_records: usize,
    /// Most tasks in the deferred queue; past it, a task a budget would defer is rejected
    /// with that reason.
    pub max_deferred: usize,
    /// How often the deferred queue is checked for tasks whose budget has room, in ms
    /// (also checked at once after every policy swap).
    pub release_interval_ms: u64,
    /// Most tasks released per check.
    pub release_batch: usize,
    /// How often, in seconds, the policy directory, the model registry and the routing
    /// rubric are read again whatever their file events say: a change that raises no event
    /// where the commander watches (a symlink swapped above the directory, a network
    /// filesystem changed from another machine) applies within this.
    pub rescan_secs: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            dir: None,
            compliance_token_env: Some("FLEET_COMPLIANCE_TOKEN".into()),
            audit_records: 10_000,
            max_deferred: 1_000_000,
            release_interval_ms: 1_000,
            release_batch: 1_000,
            rescan_secs: 10,
        }
    }
}

impl PolicyConfig {
    /// The compliance token, read from its environment variable.
    pub fn compliance_token(&self) -> Option<String> {
        self.compliance_token_env
            .as_deref()
            .and_then(|v| std::env::var(v).ok())
            .filter(|t| !t.trim().is_empty())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Serve OTLP/gRPC (TraceService, MetricsService, LogsService).
    #[serde(default = "yes")]
    pub grpc: bool,
    /// OTLP/gRPC address; port 0 picks a free port (logged). Env: `FLEET_OTLP_GRPC_LISTEN`.
    #[serde(default = "default_grpc_listen")]
    pub grpc_listen: SocketAddr,
    /// Serve OTLP/HTTP (`/v1/traces`, `/v1/metrics`, `/v1/logs`; protobuf or JSON; gzip).
    #[serde(default = "yes")]
    pub http: bool,
    /// OTLP/HTTP address. Env: `FLEET_OTLP_HTTP_LISTEN`.
    #[serde(default = "default_otlp_http_listen")]
    pub http_listen: SocketAddr,
    /// Read OTLP payloads and heartbeats from NATS `<prefix>.telemetry.>`.
    #[serde(default = "yes")]
    pub nats: bool,
    /// Largest OTLP request after decompression, in bytes (OTLP recommends 64 MiB).
    #[serde(default = "default_max_request")]
    pub max_request_bytes: usize,
    /// Most messages (spans, attributes, values, events, links, data points, log
    /// records …) one OTLP request may hold; more is refused with RESOURCE_EXHAUSTED / 413
    /// before decoding.
    #[serde(default = "default_max_items")]
    pub max_items_per_request: usize,
    /// Deepest nesting of attribute values (arrays and key-value lists inside each other).
    #[serde(default = "default_max_value_depth")]
    pub max_value_depth: usize,
    /// Most memory one OTLP request may take once decoded (estimated from the wire before
    /// decoding); more is refused with RESOURCE_EXHAUSTED / 413.
    #[serde(default = "default_max_decoded")]
    pub max_decoded_bytes: usize,
    /// Decoded batches waiting for the state owner. When full, exports are refused with
    /// RESOURCE_EXHAUSTED / 429 and counted; the task path is never slowed.
    #[serde(default = "default_ingest_queue")]
    pub queue_batches: usize,
    /// Model registry file (TOML), hot-reloaded. Unset: the built-in `policies/models.toml`.
    #[serde(default)]
    pub model_registry: Option<PathBuf>,
    /// How often pool queue depths are read from JetStream, in milliseconds.
    #[serde(default = "default_queue_poll_ms")]
    pub queue_poll_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            grpc: true,
            grpc_listen: default_grpc_listen(),
            http: true,
            http_listen: default_otlp_http_listen(),
            nats: true,
            max_request_bytes: default_max_request(),
            max_items_per_request: default_max_items(),
            max_value_depth: default_max_value_depth(),
            max_decoded_bytes: default_max_decoded(),
            queue_batches: default_ingest_queue(),
            model_registry: None,
            queue_poll_ms: default_queue_poll_ms(),
        }
    }
}

fn default_lateness_ms() -> u64 {
    300_000
}

fn default_identity_wait_ms() -> u64 {
    60_000
}

fn default_max_items() -> usize {
    crate::domain::DecodeLimits::default().max_items
}
fn default_max_value_depth() -> usize {
    crate::domain::DecodeLimits::default().max_depth
}
fn default_max_decoded() -> usize {
    crate::domain::DecodeLimits::default().max_decoded_bytes
}

impl TelemetryConfig {
    /// What one OTLP request may expand to.
    pub fn decode_limits(&self) -> crate::domain::DecodeLimits {
        crate::domain::DecodeLimits {
            max_request_bytes: self.max_request_bytes,
            max_items: self.max_items_per_request,
            max_depth: self.max_value_depth,
            max_decoded_bytes: self.max_decoded_bytes,
        }
    }
}

/// Thresholds of the worker state machine and the bounds of the live state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// STUCK when a run has had no span for this many times its expected duration (k).
    #[serde(default = "default_stuck_factor")]
    pub stuck_factor: f64,
    /// STUCK when one tool is called more than this many times in one run (N).
    #[serde(default = "default_tool_repeat_limit")]
    pub tool_repeat_limit: u32,
    /// WAITING when a run has had no span for this long, in milliseconds.
    #[serde(default = "default_waiting_after_ms")]
    pub waiting_after_ms: u64,
    /// Expected duration of a task that states none and whose type has no baseline yet, s.
    #[serde(default = "default_expected_s")]
    pub default_expected_duration_s: f64,
    /// ERROR after this many failed LLM or tool calls in a row.
    #[serde(default = "default_error_streak")]
    pub error_streak: u32,
    /// A heartbeating worker is lost after this long without a heartbeat, in ms.
    #[serde(default = "default_lost_after_ms")]
    pub lost_after_ms: u64,
    /// A worker that only sends spans is lost after this long without any, in ms.
    #[serde(default = "default_silent_lost_after_ms")]
    pub silent_lost_after_ms: u64,
    /// How long a span from a resource that names no worker waits for an ancestor that
    /// names its agent (milliseconds); then it goes to the process's one agent, or to its
    /// resource.
    #[serde(default = "default_identity_wait_ms")]
    pub identity_wait_ms: u64,
    /// How late a span or metric point may be stamped and still count in its own time's
    /// buckets (series, rates, per-minute costs), in milliseconds; one stamped earlier
    /// counts at arrival minus this, one stamped in the future at its arrival.
    #[serde(default = "default_lateness_ms")]
    pub lateness_ms: u64,
    /// A lost worker is forgotten after this long, in ms.
    #[serde(default = "default_worker_retention_ms")]
    pub retention_ms: u64,
    /// Most workers tracked; signals from more are counted and dropped.
    #[serde(default = "default_max_workers")]
    pub max_workers: usize,
    /// Most runs tracked per worker at once.
    #[serde(default = "default_max_runs")]
    pub max_runs_per_worker: usize,
    /// Finished runs kept per worker (the "last N tasks").
    #[serde(default = "default_recent_tasks")]
    pub recent_tasks: usize,
    /// Distinct tools tracked per worker; more are summed under `_other`.
    #[serde(default = "default_max_tools")]
    pub max_tools_per_worker: usize,
    /// Distinct attribution keys (dimension combinations) tracked; more are summed under
    /// team `_other`.
    #[serde(default = "default_max_cost_keys")]
    pub max_cost_keys: usize,
    /// A run is never STUCK for silence shorter than this, whatever its expected duration
    /// (task types whose runs take milliseconds would otherwise trip on any hiccup).
    #[serde(default = "default_min_stuck_after_ms")]
    pub min_stuck_after_ms: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            stuck_factor: default_stuck_factor(),
            tool_repeat_limit: default_tool_repeat_limit(),
            waiting_after_ms: default_waiting_after_ms(),
            default_expected_duration_s: default_expected_s(),
            error_streak: default_error_streak(),
            lost_after_ms: default_lost_after_ms(),
            silent_lost_after_ms: default_silent_lost_after_ms(),
            identity_wait_ms: default_identity_wait_ms(),
            lateness_ms: default_lateness_ms(),
            retention_ms: default_worker_retention_ms(),
            max_workers: default_max_workers(),
            max_runs_per_worker: default_max_runs(),
            recent_tasks: default_recent_tasks(),
            max_tools_per_worker: default_max_tools(),
            max_cost_keys: default_max_cost_keys(),
            min_stuck_after_ms: default_min_stuck_after_ms(),
        }
    }
}

impl FleetConfig {
    pub fn default_expected_duration_ms(&self) -> u64 {
        (self.default_expected_duration_s * 1000.0) as u64
    }
}

fn default_grpc_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4317))
}
fn default_otlp_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4318))
}
fn default_max_request() -> usize {
    64 * 1024 * 1024
}
fn default_ingest_queue() -> usize {
    1024
}
fn default_queue_poll_ms() -> u64 {
    2_000
}
fn default_stuck_factor() -> f64 {
    3.0
}
fn default_tool_repeat_limit() -> u32 {
    10
}
fn default_waiting_after_ms() -> u64 {
    10_000
}
fn default_expected_s() -> f64 {
    120.0
}
fn default_error_streak() -> u32 {
    3
}
fn default_lost_after_ms() -> u64 {
    15_000
}
fn default_silent_lost_after_ms() -> u64 {
    300_000
}
fn default_worker_retention_ms() -> u64 {
    3_600_000
}
fn default_max_workers() -> usize {
    50_000
}
fn default_max_runs() -> usize {
    64
}
fn default_recent_tasks() -> usize {
    20
}
fn default_max_tools() -> usize {
    32
}
fn default_max_cost_keys() -> usize {
    10_000
}
fn default_min_stuck_after_ms() -> u64 {
    30_000
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// NATS server URL. Unset: use 127.0.0.1:4222 if something listens there, else start
    /// a local `nats-server` (see `auto_start`). Env: `FLEET_NATS_URL`.
    #[serde(default)]
    pub url: Option<String>,
    /// Subject prefix shared by the whole fleet.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// With no URL and nothing on 127.0.0.1:4222, start `nats-server` as a child process.
    #[serde(default = "yes")]
    pub auto_start: bool,
    /// How long to wait for the server at start, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Address probed when no URL is set, and where an auto-started server listens.
    #[serde(default = "default_local")]
    pub local_default: SocketAddr,
    /// A NATS credentials file (`.creds`: a user JWT and its NKey seed, as `nsc` and
    /// Synadia Cloud hand out).
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// A file holding an NKey seed (`SU…`), for a server that lists its users by NKey.
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    /// A user name, signed in with the password in `password_env`.
    #[serde(default)]
    pub user: Option<String>,
    /// The environment variable holding `user`'s password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// The environment variable holding a token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// PEM file of the CAs that sign the server's certificate (a private CA); with it the
    /// connection must be TLS.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, for a server that verifies its clients; with `tls_key_file`.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// Copies JetStream keeps of each stream and bucket the commander creates (1–5): 3 in
    /// a three-node cluster, so accepted tasks survive the loss of a node.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
}

fn default_replicas() -> usize {
    1
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: None,
            prefix: default_prefix(),
            auto_start: true,
            connect_timeout_ms: default_connect_timeout_ms(),
            local_default: default_local(),
            credentials_file: None,
            nkey_seed_file: None,
            user: None,
            password_env: None,
            token_env: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            replicas: default_replicas(),
        }
    }
}

impl NatsConfig {
    /// How to sign in, with the secrets read from their files and environment variables.
    /// The settings' shape was checked with the rest of the config; what can only be
    /// known now (a file that cannot be read, a variable unset) is an error naming it.
    pub fn auth(&self) -> Result<crate::broker::Auth, crate::broker::BrokerError> {
        self.auth_from(|var| std::env::var(var).ok())
    }

    /// [`Self::auth`], reading variables through `var`.
    pub fn auth_from(
        &self,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<crate::broker::Auth, crate::broker::BrokerError> {
        use crate::broker::{Auth, BrokerError, SignIn};
        let read = |key: &str, path: &Path| {
            std::fs::read_to_string(path).map_err(|e| {
                BrokerError::Auth(format!("{key}: cannot read {}: {e}", path.display()))
            })
        };
        let env = |key: &str, name: &str| {
            var(name).filter(|v| !v.is_empty()).ok_or_else(|| {
                BrokerError::Auth(format!("{key}: the variable {name} is unset or empty"))
            })
        };
        let sign_in = if let Some(path) = &self.credentials_file {
            SignIn::Credentials(read("nats.credentials_file", path)?)
        } else if let Some(path) = &self.nkey_seed_file {
            let seed = read("nats.nkey_seed_file", path)?.trim().to_string();
            if let Err(e) = nkeys::KeyPair::from_seed(&seed) {
                return Err(BrokerError::Auth(format!(
                    "nats.nkey_seed_file: {} holds no NKey seed: {e}",
                    path.display()
                )));
            }
            SignIn::NKey(seed)
        } else if let (Some(user), Some(var)) = (&self.user, &self.password_env) {
            SignIn::UserPassword(user.clone(), env("nats.password_env", var)?)
        } else if let Some(var) = &self.token_env {
            SignIn::Token(env("nats.token_env", var)?)
        } else {
            SignIn::FromUrl
        };
        for (key, path) in [
            ("nats.tls_ca_file", &self.tls_ca_file),
            ("nats.tls_cert_file", &self.tls_cert_file),
            ("nats.tls_key_file", &self.tls_key_file),
        ] {
            if let Some(path) = path {
                read(key, path)?;
            }
        }
        let client = self.tls_cert_file.clone().zip(self.tls_key_file.clone());
        Ok(Auth::new(sign_in, self.tls_ca_file.clone(), client))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address the API binds; port 0 picks a free port (logged). Env: `FLEET_HTTP_LISTEN`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest accepted request body, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Most `/v1/stream` clients connected at once; one more is answered 503.
    #[serde(default = "default_max_streams")]
    pub max_streams: usize,
    /// Most control WebSockets (`GET /v1/control`) open at once; one more is answered 503.
    #[serde(default = "default_max_control_sockets")]
    pub max_control_sockets: usize,
    /// Most connections open at once on each HTTP server (the API, OTLP/HTTP); one more
    /// is closed as soon as it is accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: default_max_body(),
            max_streams: crate::events::DEFAULT_MAX_STREAMS,
            max_control_sockets: default_max_control_sockets(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_max_streams() -> usize {
    crate::events::DEFAULT_MAX_STREAMS
}

impl HttpConfig {
    /// What each server allows a client (`httpd`): these connections, and the headers'
    /// timeout.
    pub fn connection_limits(&self) -> crate::httpd::Limits {
        crate::httpd::Limits {
            max_connections: self.max_connections,
            header_read_timeout: crate::httpd::HEADER_READ_TIMEOUT,
            shutdown_grace: crate::httpd::SHUTDOWN_GRACE,
        }
    }
}

fn default_max_connections() -> usize {
    crate::httpd::DEFAULT_MAX_CONNECTIONS
}

/// One per dashboard tab an operator keeps open; a hundred is a large operations floor.
fn default_max_control_sockets() -> usize {
    100
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Directory for the sled store (and an auto-started nats-server's JetStream files).
    /// Env: `FLEET_DATA_DIR`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Hours a finished task's record is kept (the results stream keeps results 7 days).
    #[serde(default = "default_retention_hours")]
    pub retention_hours: u64,
    /// Finished task records kept at most: past it the oldest finished go before their
    /// retention. Each costs memory (the id index) and start-up time (the log is read).
    #[serde(default = "default_max_records")]
    pub max_records: usize,
    /// sled's page cache, MiB (the commander's RSS grows to about this plus its live
    /// state). Once the store outgrows it, pages are read back from the file.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            retention_hours: default_retention_hours(),
            max_records: default_max_records(),
            cache_mib: default_cache_mib(),
        }
    }
}

/// sled's own default (1 GiB).
fn default_cache_mib() -> u64 {
    1024
}

fn default_retention_hours() -> u64 {
    7 * 24
}

/// About 850 MiB of id index and 10 s of start-up on a 2-core machine (docs/configuration.md).
fn default_max_records() -> usize {
    5_000_000
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeConfig {
    /// Most intake messages handled per batch (one store flush and one round of acks each).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Seconds the commander has to dispatch a batch before JetStream redelivers it (to
    /// this or another replica). A batch takes milliseconds; this bounds the stall after
    /// a crash.
    #[serde(default = "default_intake_ack_wait_secs")]
    pub ack_wait_secs: u64,
    /// Seconds a worker has to ack (or signal progress) before redelivery.
    #[serde(default = "default_ack_wait_secs")]
    pub work_ack_wait_secs: u64,
    /// Subjects a producer may name in `Fleet-Reply-To` start with one of these. System
    /// subjects (`$…`) and the fleet's own (`<prefix>.…`) are refused whatever this says;
    /// a task naming any other subject is rejected with `bad_reply_to`.
    #[serde(default = "default_reply_prefixes")]
    pub reply_prefixes: Vec<String>,
    /// Seconds a SIGTERM waits for the task path to finish the batches in hand and flush
    /// the store; past it the commander exits all the same (with NATS unreachable, say).
    /// Nothing acked is lost: JetStream redelivers what was not acked.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
}

fn default_shutdown_grace_secs() -> u64 {
    10
}

fn default_reply_prefixes() -> Vec<String> {
    fleet_worker::protocol::DEFAULT_REPLY_PREFIXES
        .iter()
        .map(|p| p.to_string())
        .collect()
}

impl Default for IntakeConfig {
    fn default() -> Self {
        Self {
            batch_size: default_batch(),
            ack_wait_secs: default_intake_ack_wait_secs(),
            work_ack_wait_secs: default_ack_wait_secs(),
            reply_prefixes: default_reply_prefixes(),
            shutdown_grace_secs: default_shutdown_grace_secs(),
        }
    }
}

impl IntakeConfig {
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
    }
    pub fn work_ack_wait(&self) -> Duration {
        Duration::from_secs(self.work_ack_wait_secs)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Pool for tasks that no rubric candidate can take and that name no pool. Unset:
    /// such tasks are rejected with a reason.
    pub default_pool: Option<String>,
    /// A producer's `pool` is honoured (when the pool exists). Off: it is ignored.
    pub allow_explicit_pool: bool,
    /// A producer's `model` is honoured (when the registry knows it). Off: ignored.
    pub allow_explicit_model: bool,
    /// Workers above this context utilisation (0-1) get no long-context task.
    pub context_threshold: f64,
    /// A pool whose error rate over the last minute is above this is avoided (its
    /// `fallback_pool` takes its tasks). Per-pool `max_error_rate` overrides it.
    pub max_error_rate: f64,
    /// Finished tasks a pool needs in the last minute before its error rate counts.
    pub min_error_samples: u64,
    /// Long-context tasks go to one chosen worker (its own subject) instead of the pool
    /// queue, so the context rule picks the worker, not just the pool.
    pub target_long_context: bool,
    /// A task targeted at a worker goes back to its pool's queue when the worker is lost,
    /// or has not bound its consumer, this long after the dispatch (milliseconds).
    pub target_bind_timeout_ms: u64,
    /// How much load weighs against cost when two models are close: a candidate's
    /// score is estimated cost × (1 + load_weight × load).
    pub load_weight: f64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            default_pool: None,
            allow_explicit_pool: true,
            allow_explicit_model: true,
            context_threshold: 0.8,
            max_error_rate: 0.25,
            min_error_samples: 10,
            target_long_context: true,
            target_bind_timeout_ms: 30_000,
            load_weight: 1.0,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// What this pool's workers can do; a task goes only to pools that have every
    /// capability it needs.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// For operators.
    #[serde(default)]
    pub description: Option<String>,
    /// Where this pool's tasks go while its error rate is over the threshold.
    #[serde(default)]
    pub fallback_pool: Option<String>,
    /// This pool's error-rate threshold (overrides `routing.max_error_rate`).
    #[serde(default)]
    pub max_error_rate: Option<f64>,
    /// Queue depth at which the pool counts as saturated and takes no new tasks unless
    /// nothing else can. Unset: never saturated.
    #[serde(default)]
    pub max_queue_depth: Option<u64>,
    /// Operators' switch: a paused pool gets no new tasks.
    #[serde(default)]
    pub paused: bool,
}

/// `[classifier]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierConfig {
    /// The routing rubric file (hot-reloaded). Unset: the built-in
    /// `routing-rubrics/default.toml`.
    pub rubric: Option<PathBuf>,
    /// Base URL of the classifier LLM (`https://api.openai.com`, `http://localhost:11434`).
    /// Unset: every task is classified by the rubric's deterministic fallback.
    pub endpoint: Option<String>,
    /// `openai` (chat completions; also vLLM, Ollama, llama.cpp, LiteLLM) or `anthropic`.
    pub protocol: crate::domain::Protocol,
    /// The model to ask. Unset: the rubric's `classifier.model`.
    pub model: Option<String>,
    /// Environment variable holding the API key (the key itself never appears in config
    /// or logs). Unset: no key is sent.
    pub api_key_env: Option<String>,
    /// Per-attempt timeout.
    pub timeout_ms: u64,
    /// Retries after the first attempt, on timeouts, connection errors, 429 and 5xx.
    pub max_retries: u32,
    /// First retry waits about this long (jittered), doubling up to `max_backoff_ms`;
    /// a `Retry-After` is honoured up to the same cap.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Consecutive failed classifications that open the circuit.
    pub breaker_failures: u32,
    /// How long the circuit stays open before one probe is let through.
    pub breaker_open_ms: u64,
    /// Cached classifications (LRU) and how long one is trusted.
    pub cache_entries: usize,
    pub cache_ttl_s: u64,
    /// `max_tokens` of the classifier's answer.
    pub max_tokens: u32,
    /// Classifier calls in flight at once.
    pub concurrency: usize,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self {
            rubric: None,
            endpoint: None,
            protocol: crate::domain::Protocol::Openai,
            model: None,
            api_key_env: None,
            timeout_ms: 2_000,
            max_retries: 2,
            backoff_ms: 100,
            max_backoff_ms: 2_000,
            breaker_failures: 5,
            breaker_open_ms: 30_000,
            cache_entries: 10_000,
            cache_ttl_s: 3_600,
            max_tokens: 200,
            concurrency: 32,
        }
    }
}

/// `[decisions]`: the decision log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecisionLogConfig {
    /// Decisions older than this are pruned.
    pub retention_hours: u64,
    /// At most this many are kept (oldest pruned first).
    pub max_records: u64,
    /// Publish each decision on `<prefix>.decisions.<pool>`.
    pub publish: bool,
}

impl Default for DecisionLogConfig {
    fn default() -> Self {
        Self {
            retention_hours: 72,
            max_records: 1_000_000,
            publish: true,
        }
    }
}

/// `[detect]`: the detector's pace and bounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectConfig {
    /// How often the rules run over the fleet snapshot (it is rebuilt once a second).
    pub interval_ms: u64,
    /// Open (pending and firing) alerts at most; more are refused and counted.
    pub max_open: usize,
    /// Alerts kept in the alert log (oldest dropped first).
    pub max_records: usize,
    /// Where alerts are delivered besides NATS (docs/alerts.md).
    pub sinks: Vec<SinkConfig>,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            interval_ms: 1_000,
            max_open: 10_000,
            max_records: 100_000,
            sinks: Vec::new(),
        }
    }
}

/// Where alerts go (`[[detect.sinks]]` in the config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Unique; names the sink in logs, counters and the API.
    pub name: String,
    pub kind: SinkKind,
    /// Alertmanager: its base URL (`http://alertmanager:9093`); the others: the endpoint.
    pub url: String,
    /// Webhook: the variable holding the signing secret(s) (`whsec_…`; several,
    /// space-separated, sign with each: rotation). PagerDuty: the routing key.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Alerts below this severity are not sent here.
    #[serde(default = "default_min_severity")]
    pub min_severity: SinkSeverity,
    /// Tries per delivery (the first included).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Deliveries failed in a row that disable the sink.
    #[serde(default = "default_disable_after")]
    pub disable_after: u32,
    /// Waiting deliveries at most; more are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Per request.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Alertmanager: firing alerts are sent again this often (it resolves an alert that
    /// is not re-sent within its `resolve_timeout`, 5 minutes by default).
    #[serde(default = "default_resend_s")]
    pub resend_s: u64,
}

fn default_min_severity() -> SinkSeverity {
    SinkSeverity::Warning
}
fn default_attempts() -> u32 {
    5
}
fn default_disable_after() -> u32 {
    10
}
fn default_queue() -> usize {
    1_024
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_resend_s() -> u64 {
    60
}

/// The least severity a sink takes (the detector's severities, in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkSeverity {
    Info,
    Warning,
    Critical,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    Alertmanager,
    Webhook,
    Slack,
    Pagerduty,
}

/// The largest `http.max_body_bytes` may be: 64 MiB, far above any task or policy.
const MAX_BODY_BYTES_LIMIT: usize = 64 << 20;

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_string()
}
fn yes() -> bool {
    true
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4222))
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_body() -> usize {
    1024 * 1024
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_batch() -> usize {
    256
}
fn default_intake_ack_wait_secs() -> u64 {
    10
}
fn default_ack_wait_secs() -> u64 {
    30
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {} problem(s):\n{}", .problems.len(), .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// A problem with the value of one dotted key (`intake.batch_size`), before it is placed
/// at a line of the file. The message starts with the key.
#[derive(Debug)]
struct Keyed {
    key: String,
    kind: ProblemKind,
    message: String,
}

impl Keyed {
    /// `message` is `key: what is wrong`.
    fn new(kind: ProblemKind, message: String) -> Self {
        let key = message
            .split_once(": ")
            .map_or(message.as_str(), |(k, _)| k)
            .to_string();
        Self { key, kind, message }
    }
}

/// The line of dotted `key` in TOML `text`: the `name =` line inside its table (`[a.b]`
/// for `a.b.name`), else the table's header; `None` when the file does not set it.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let (table, name) = key.rsplit_once('.').unwrap_or(("", key));
    let mut in_table = table.is_empty();
    let mut header = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(h) = line.strip_prefix('[') {
            let h = h.trim_start_matches('[').trim_end_matches(']').trim();
            in_table = h == table;
            if in_table {
                header = Some(i + 1);
            }
            continue;
        }
        if in_table
            && let Some(rest) = line.strip_prefix(name)
            && rest.trim_start().starts_with('=')
        {
            return Some(i + 1);
        }
    }
    // `pools.code.capabilities` may sit in `[pools.code]`; `pools.code` is that header.
    header.or_else(|| {
        let header_of_key = format!("[{key}]");
        text.lines()
            .position(|l| l.trim() == header_of_key)
            .map(|i| i + 1)
    })
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: Config = crate::tomlread::from_toml(text, &origin.display().to_string())
            .map_err(|problems| ConfigError::Invalid {
                path: origin.to_path_buf(),
                problems,
            })?;
        config.validate_at(origin, Some(text))?;
        Ok(config)
    }

    /// Every semantic problem at once, each placed in `origin` at the line of its key
    /// when the file's `text` is given (a value from a flag or the environment, or a
    /// default, has no line).
    pub fn validate_at(&self, origin: &Path, text: Option<&str>) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            return Ok(());
        }
        let file = origin.display().to_string();
        Err(ConfigError::Invalid {
            path: origin.to_path_buf(),
            problems: problems
                .into_iter()
                .map(|k| {
                    let line = text.and_then(|t| key_line(t, &k.key));
                    Location {
                        file: file.clone(),
                        line,
                        column: None,
                    }
                    .problem(k.kind, k.message)
                })
                .collect(),
        })
    }

    /// Every semantic problem, each with its dotted key.
    fn problems(&self) -> Vec<Keyed> {
        let mut p = Vec::new();
        self.check_transport(&mut p);
        self.check_pool_names(&mut p);
        self.check_routing(&mut p);
        self.check_classifier(&mut p);
        self.check_fleet_and_policy(&mut p);
        self.check_sinks(&mut p);
        self.check_traces(&mut p);
        self.check_auth(&mut p);
        p
    }

    /// `[auth]`.
    fn check_auth(&self, p: &mut Vec<Keyed>) {
        let a = &self.auth;
        let mut names = std::collections::BTreeSet::new();
        for (i, t) in a.tokens.iter().enumerate() {
            if t.name.trim().is_empty() || !names.insert(t.name.as_str()) {
                p.push(Keyed::new(
                    BadValue,
                    format!(
                        "auth.tokens: entry {i}: name {:?} must be set and unique",
                        t.name
                    ),
                ));
            }
            if t.token_env.trim().is_empty() {
                p.push(Keyed::new(
                    Missing,
                    format!(
                        "auth.tokens: entry {i} ({}): token_env must name a variable",
                        t.name
                    ),
                ));
            }
        }
        if a.control_per_s == 0 || a.control_burst == 0 {
            p.push(Keyed::new(
                OutOfRange,
                "auth.control_per_s: control_per_s and control_burst must be at least 1".into(),
            ));
        }
        for o in &a.allowed_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                p.push(Keyed::new(
                    BadValue,
                    format!("auth.allowed_origins: {o:?} must be scheme://host[:port], no path"),
                ));
            }
        }
    }

    /// `[traces]` and `[[traces.export]]`.
    fn check_traces(&self, p: &mut Vec<Keyed>) {
        let t = &self.traces;
        for (what, v) in [
            ("max_trace_s", t.max_trace_s),
            ("buffer_bytes", t.buffer_bytes as u64),
            ("queue_batches", t.queue_batches as u64),
            ("queue_bytes", t.queue_bytes as u64),
            ("store_bytes", t.store_bytes),
            ("retention_hours", t.retention_hours),
        ] {
            if v == 0 {
                p.push(Keyed::new(
                    OutOfRange,
                    format!("traces.{what} must be at least 1"),
                ));
            }
        }
        if t.decision_wait_ms / 1000 >= t.max_trace_s {
            p.push(Keyed::new(
                OutOfRange,
                "traces.decision_wait_ms must be shorter than traces.max_trace_s".to_string(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for e in &t.export {
            let key = format!("traces.export.{}", e.name);
            if e.name.trim().is_empty() || !names.insert(e.name.as_str()) {
                p.push(Keyed::new(
                    Duplicate,
                    format!("traces.export: name {:?} is empty or used twice", e.name),
                ));
            }
            let url_ok = reqwest::Url::parse(&e.endpoint)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            if !url_ok {
                p.push(Keyed::new(
                    BadValue,
                    format!("{key}: endpoint must be an http:// or https:// URL"),
                ));
            }
            let bad_header = e.headers.keys().chain(e.headers_env.keys()).find(|h| {
                reqwest::header::HeaderName::from_bytes(h.as_bytes()).is_err()
                    || h.starts_with("grpc-")
            });
            if let Some(h) = bad_header {
                p.push(Keyed::new(
                    BadValue,
                    format!("{key}: {h:?} is not a header name one may set"),
                ));
            }
            for (what, v) in [
                ("queue_traces", e.queue_traces as u64),
                ("batch_spans", e.batch_spans as u64),
                ("batch_delay_ms", e.batch_delay_ms),
                ("max_attempts", u64::from(e.max_attempts)),
                ("timeout_ms", e.timeout_ms),
            ] {
                if v == 0 {
                    p.push(Keyed::new(
                        OutOfRange,
                        format!("{key}: {what} must be at least 1"),
                    ));
                }
            }
        }
    }

    /// `[[detect.sinks]]`: names, URLs, secrets and bounds.
    fn check_sinks(&self, p: &mut Vec<Keyed>) {
        let mut names = std::collections::BTreeSet::new();
        for s in &self.detect.sinks {
            let key = format!("detect.sinks.{}", s.name);
            if s.name.trim().is_empty() || !names.insert(s.name.as_str()) {
                p.push(Keyed::new(
                    Duplicate,
                    format!(
                        "detect.sinks: sink name {:?} is empty or used twice",
                        s.name
                    ),
                ));
            }
            let scheme_ok = reqwest::Url::parse(&s.url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            if !scheme_ok {
                p.push(Keyed::new(
                    BadValue,
                    format!("{key}: url must be an http:// or https:// URL"),
                ));
            }
            if matches!(s.kind, SinkKind::Webhook | SinkKind::Pagerduty) && s.secret_env.is_none() {
                p.push(Keyed::new(
                    Missing,
                    format!("{key}: secret_env must name the variable holding its secret"),
                ));
            }
            for (what, v) in [
                ("max_attempts", u64::from(s.max_attempts)),
                ("disable_after", u64::from(s.disable_after)),
                ("queue", s.queue as u64),
                ("timeout_ms", s.timeout_ms),
                ("resend_s", s.resend_s),
            ] {
                if v == 0 {
                    p.push(Keyed::new(
                        OutOfRange,
                        format!("{key}: {what} must be at least 1"),
                    ));
                }
            }
        }
    }

    /// At most one way to sign in to NATS, each with what it needs.
    fn check_nats_auth(&self, p: &mut Vec<Keyed>) {
        let n = &self.nats;
        let ways: Vec<&str> = [
            ("credentials_file", n.credentials_file.is_some()),
            ("nkey_seed_file", n.nkey_seed_file.is_some()),
            ("user", n.user.is_some()),
            ("token_env", n.token_env.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        if ways.len() > 1 {
            p.push(Keyed::new(
                BadValue,
                format!(
                    "nats: {} are different ways to sign in; set one",
                    ways.join(", ")
                ),
            ));
        }
        if n.user.is_some() != n.password_env.is_some() {
            p.push(Keyed::new(
                Missing,
                "nats.user and nats.password_env go together (the variable holds the user's password)"
                    .to_string(),
            ));
        }
        if n.tls_cert_file.is_some() != n.tls_key_file.is_some() {
            p.push(Keyed::new(
                Missing,
                "nats.tls_cert_file and nats.tls_key_file go together".to_string(),
            ));
        }
        for (key, empty) in [
            ("nats.user", n.user.as_deref().is_some_and(str::is_empty)),
            (
                "nats.password_env",
                n.password_env.as_deref().is_some_and(str::is_empty),
            ),
            (
                "nats.token_env",
                n.token_env.as_deref().is_some_and(str::is_empty),
            ),
        ] {
            if empty {
                p.push(Keyed::new(Missing, format!("{key}: must not be empty")));
            }
        }
    }

    /// NATS, the store, intake and the OTLP decode bounds.
    fn check_transport(&self, p: &mut Vec<Keyed>) {
        if Subjects::new(&self.nats.prefix).is_err() {
            p.push(Keyed::new(
                BadValue,
                format!(
                    "nats.prefix: {:?} must be dot-separated tokens of letters, digits, '-' or '_'",
                    self.nats.prefix
                ),
            ));
        }
        if let Some(url) = &self.nats.url
            && url.trim().is_empty()
        {
            p.push(Keyed::new(
                Missing,
                "nats.url: must not be empty (leave it out to auto-detect)".to_string(),
            ));
        }
        self.check_nats_auth(p);
        if !(1..=5).contains(&self.nats.replicas) {
            p.push(Keyed::new(
                OutOfRange,
                format!(
                    "nats.replicas: {} must be between 1 and 5 (JetStream's limit)",
                    self.nats.replicas
                ),
            ));
        }
        if self.store.retention_hours == 0 {
            p.push(Keyed::new(
                OutOfRange,
                "store.retention_hours: must be at least 1".to_string(),
            ));
        }
        if self.store.data_dir.as_os_str().is_empty() {
            p.push(Keyed::new(
                Missing,
                "store.data_dir: must not be empty (leave it out for \"data\")".to_string(),
            ));
        }
        range_check(
            p,
            "store.max_records",
            self.store.max_records,
            1_000..=1_000_000_000,
        );
        range_check(p, "http.max_streams", self.http.max_streams, 1..=100_000);
        range_check(
            p,
            "http.max_connections",
            self.http.max_connections,
            16..=1_000_000,
        );
        range_check(
            p,
            "http.max_control_sockets",
            self.http.max_control_sockets,
            1..=10_000,
        );
        // Under a kilobyte no policy push fits, and at 0 every task is refused as too large.
        range_check(
            p,
            "http.max_body_bytes",
            self.http.max_body_bytes,
            1024..=MAX_BODY_BYTES_LIMIT,
        );
        range_check(p, "store.cache_mib", self.store.cache_mib, 16..=1_048_576);
        if self.intake.batch_size == 0 || self.intake.batch_size > 10_000 {
            p.push(Keyed::new(
                OutOfRange,
                format!(
                    "intake.batch_size: {} is out of range 1-10000",
                    self.intake.batch_size
                ),
            ));
        }
        if self.intake.ack_wait_secs == 0 {
            p.push(Keyed::new(
                OutOfRange,
                "intake.ack_wait_secs: must be at least 1".to_string(),
            ));
        }
        if self.intake.work_ack_wait_secs == 0 {
            p.push(Keyed::new(
                OutOfRange,
                "intake.work_ack_wait_secs: must be at least 1".to_string(),
            ));
        }
        if self.telemetry.max_value_depth > 32 {
            // prost refuses deeper messages anyway (its recursion limit is 100 levels).
            p.push(Keyed::new(
                OutOfRange,
                format!(
                    "telemetry.max_value_depth: {} is out of range 1-32",
                    self.telemetry.max_value_depth
                ),
            ));
        }
        if self.intake.reply_prefixes.is_empty() {
            p.push(Keyed::new(
                Missing,
                "intake.reply_prefixes: name at least one prefix (default \"_INBOX.\")".to_string(),
            ));
        }
        for prefix in &self.intake.reply_prefixes {
            // A prefix is good when a subject made from it is one the rule accepts.
            let sample = format!("{prefix}x");
            if let Some(why) = fleet_worker::protocol::reply_subject_problem(
                &sample,
                std::slice::from_ref(prefix),
                &self.nats.prefix,
            ) {
                p.push(Keyed::new(
                    BadValue,
                    format!("intake.reply_prefixes: {prefix:?} cannot be used: {why}"),
                ));
            }
        }
    }

    /// Pool names and capabilities.
    fn check_pool_names(&self, p: &mut Vec<Keyed>) {
        for (name, pool) in &self.pools {
            if !is_subject_token(name) {
                p.push(Keyed::new(
                    BadValue,
                    format!("pools.{name}: a pool name must be 1-128 letters, digits, '-' or '_'"),
                ));
            }
            if pool.capabilities.iter().any(|c| c.is_empty()) {
                p.push(Keyed::new(
                    Missing,
                    format!("pools.{name}.capabilities: must not contain empty strings"),
                ));
            }
        }
    }

    /// The routing section and each pool's fallback and error threshold.
    fn check_routing(&self, p: &mut Vec<Keyed>) {
        if let Some(d) = &self.routing.default_pool {
            if !is_subject_token(d) {
                p.push(Keyed::new(
                    BadValue,
                    format!("routing.default_pool: {d:?} is not a valid pool name"),
                ));
            } else if !self.pools.is_empty() && !self.pools.contains_key(d) {
                p.push(Keyed::new(
                    UnknownName,
                    format!("routing.default_pool: {d:?} is not one of the configured pools"),
                ));
            }
        }
        let r = &self.routing;
        for (key, v) in [
            ("routing.context_threshold", r.context_threshold),
            ("routing.max_error_rate", r.max_error_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                p.push(Keyed::new(
                    OutOfRange,
                    format!("{key}: {v} must be between 0 and 1"),
                ));
            }
        }
        if r.target_bind_timeout_ms == 0 {
            p.push(Keyed::new(
                OutOfRange,
                "routing.target_bind_timeout_ms: must be at least 1".to_string(),
            ));
        }
        if !(r.load_weight.is_finite() && r.load_weight >= 0.0) {
            p.push(Keyed::new(
                OutOfRange,
                format!("routing.load_weight: {} must be >= 0", r.load_weight),
            ));
        }
        for (name, pool) in &self.pools {
            if let Some(fb) = &pool.fallback_pool
                && (fb == name || !self.pools.contains_key(fb))
            {
                p.push(Keyed::new(
                    UnknownName,
                    format!("pools.{name}.fallback_pool: {fb:?} must be another configured pool"),
                ));
            }
            if let Some(m) = pool.max_error_rate
                && !(0.0..=1.0).contains(&m)
            {
                p.push(Keyed::new(
                    OutOfRange,
                    format!("pools.{name}.max_error_rate: {m} must be between 0 and 1"),
                ));
            }
        }
    }

    /// The classifier and the decision log.
    fn check_classifier(&self, p: &mut Vec<Keyed>) {
        let c = &self.classifier;
        if let Some(e) = &c.endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            p.push(Keyed::new(
                BadValue,
                format!("classifier.endpoint: {e:?} must be an http:// or https:// URL"),
            ));
        }
        for (key, v) in [
            ("classifier.timeout_ms", c.timeout_ms),
            ("classifier.breaker_failures", u64::from(c.breaker_failures)),
            ("classifier.cache_entries", c.cache_entries as u64),
            ("classifier.max_tokens", u64::from(c.max_tokens)),
            ("classifier.concurrency", c.concurrency as u64),
            ("decisions.retention_hours", self.decisions.retention_hours),
            ("decisions.max_records", self.decisions.max_records),
            ("detect.interval_ms", self.detect.interval_ms),
            ("detect.max_open", self.detect.max_open as u64),
            ("detect.max_records", self.detect.max_records as u64),
        ] {
            if v == 0 {
                p.push(Keyed::new(OutOfRange, format!("{key}: must be at least 1")));
            }
        }
    }

    /// The live state's bounds, telemetry queues and the policy engine's.
    fn check_fleet_and_policy(&self, p: &mut Vec<Keyed>) {
        let f = &self.fleet;
        let speed = self.clock.speed;
        if !(speed.is_finite() && (1.0..=1000.0).contains(&speed)) {
            p.push(Keyed::new(
                OutOfRange,
                format!("clock.speed: {speed} must be between 1 and 1000"),
            ));
        }
        if !(f.stuck_factor.is_finite() && f.stuck_factor >= 1.0) {
            p.push(Keyed::new(
                OutOfRange,
                format!("fleet.stuck_factor: {} must be at least 1", f.stuck_factor),
            ));
        }
        if f.tool_repeat_limit == 0 {
            p.push(Keyed::new(
                OutOfRange,
                "fleet.tool_repeat_limit: must be at least 1".to_string(),
            ));
        }
        if !(f.default_expected_duration_s.is_finite() && f.default_expected_duration_s > 0.0) {
            p.push(Keyed::new(
                OutOfRange,
                "fleet.default_expected_duration_s: must be above 0".to_string(),
            ));
        }
        if f.error_streak == 0 {
            p.push(Keyed::new(
                OutOfRange,
                "fleet.error_streak: must be at least 1".to_string(),
            ));
        }
        for (key, v) in [
            ("fleet.max_workers", f.max_workers),
            ("fleet.max_runs_per_worker", f.max_runs_per_worker),
            ("fleet.recent_tasks", f.recent_tasks),
            ("fleet.max_tools_per_worker", f.max_tools_per_worker),
            ("fleet.max_cost_keys", f.max_cost_keys),
            ("telemetry.queue_batches", self.telemetry.queue_batches),
            (
                "telemetry.max_request_bytes",
                self.telemetry.max_request_bytes,
            ),
            (
                "telemetry.max_items_per_request",
                self.telemetry.max_items_per_request,
            ),
            ("telemetry.max_value_depth", self.telemetry.max_value_depth),
            (
                "telemetry.max_decoded_bytes",
                self.telemetry.max_decoded_bytes,
            ),
        ] {
            if v == 0 {
                p.push(Keyed::new(OutOfRange, format!("{key}: must be at least 1")));
            }
        }
        let pc = &self.policy;
        for (key, v) in [
            ("policy.audit_records", pc.audit_records as u64),
            ("policy.max_deferred", pc.max_deferred as u64),
            ("policy.release_interval_ms", pc.release_interval_ms),
            ("policy.release_batch", pc.release_batch as u64),
            ("policy.rescan_secs", pc.rescan_secs),
        ] {
            if v == 0 {
                p.push(Keyed::new(OutOfRange, format!("{key}: must be at least 1")));
            }
        }
        if pc.rescan_secs > 86_400 {
            p.push(Keyed::new(
                OutOfRange,
                format!(
                    "policy.rescan_secs: {} must be at most 86400 (a day)",
                    pc.rescan_secs
                ),
            ));
        }
        if let Some(d) = &pc.dir
            && d.as_os_str().is_empty()
        {
            p.push(Keyed::new(
                Missing,
                "policy.dir: must not be empty (leave it out for the built-in policy)".to_string(),
            ));
        }
        if self.telemetry.queue_poll_ms == 0 {
            p.push(Keyed::new(
                OutOfRange,
                "telemetry.queue_poll_ms: must be at least 1".to_string(),
            ));
        }
    }

    pub fn subjects(&self) -> Subjects {
        // Validated in `validate`; a bad prefix falls back to the default rather than panic.
        Subjects::new(&self.nats.prefix).unwrap_or_default()
    }
}

/// A setting outside its range, worded as every range check words it.
fn range_check<T: PartialOrd + std::fmt::Display>(
    p: &mut Vec<Keyed>,
    key: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) {
    if !range.contains(&value) {
        p.push(Keyed::new(
            ProblemKind::OutOfRange,
            format!(
                "{key}: {value} is out of range ({} to {})",
                range.start(),
                range.end()
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The keys the first cell of each table row of a doc names: `section.key`, a bare
    /// `key` after one (`classifier.backoff_ms` / `max_backoff_ms`), `[[section.key]]`;
    /// keys without a section (docs/traces.md's `[traces]` table) under `bare`.
    fn documented_keys(doc: &str, bare: &str) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for line in doc.lines().filter(|l| l.starts_with("| `")) {
            let first = line.split(" | ").next().unwrap_or("");
            let mut section = bare.to_string();
            for (i, token) in first.split('`').enumerate() {
                if i % 2 == 0 {
                    continue;
                }
                let token = token.trim_start_matches("[[").trim_end_matches("]]");
                match token.rsplit_once('.') {
                    Some((s, _)) => {
                        section = s.to_string();
                        keys.insert(token.to_string());
                    }
                    None => {
                        keys.insert(format!("{section}.{token}"));
                    }
                }
            }
        }
        keys
    }

    /// Every key a config may set is in the docs a user reads: a row of
    /// docs/configuration.md's tables (a pool's as `pools.<name>.key`), or of docs/traces.md's
    /// `[traces]` table. (The entries of arrays of tables, `[[traces.export]]`,
    /// `[[detect.sinks]]`, `[[auth.tokens]]`, have no default to read their keys from.)
    #[test]
    fn every_config_key_is_documented() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap();
        let mut documented = documented_keys(&read("docs/configuration.md"), "");
        documented.extend(documented_keys(&read("docs/traces.md"), "traces"));
        let mut c = Config::default();
        c.pools.insert("p".into(), PoolConfig::default());
        let v = serde_json::to_value(&c).unwrap();
        let mut keys = Vec::new();
        for (section, entries) in v.as_object().unwrap() {
            for (key, value) in entries.as_object().into_iter().flatten() {
                match section.as_str() {
                    "pools" => keys.extend(
                        (value.as_object().into_iter().flatten())
                            .map(|(k, _)| format!("pools.<name>.{k}")),
                    ),
                    _ => keys.push(format!("{section}.{key}")),
                }
            }
        }
        assert!(keys.len() > 100, "{} keys read", keys.len());
        let missing: Vec<&String> = keys.iter().filter(|k| !documented.contains(*k)).collect();
        assert!(missing.is_empty(), "keys no doc names: {missing:?}");
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.nats.prefix, "fleet");
    }

    #[test]
    fn unknown_fields_are_each_an_error_at_their_line_and_column() {
        let err = Config::parse(
            "[nats]\nprefix = \"fleet\"\nurll = \"x\"\n[pools.a]\ncolour = 1\n[pools.b]\nsize = 2\n",
            Path::new("c.toml"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Invalid { .. }));
        assert!(
            msg.contains("3 problem(s)")
                && msg.contains("c.toml:3:1: unknown field `urll`")
                && msg.contains("c.toml:5:1: unknown field `colour`")
                && msg.contains("c.toml:7:1: unknown field `size`"),
            "{msg}"
        );
    }

    #[test]
    fn nats_sign_in_is_one_way_with_what_it_needs() {
        let text = "[nats]\nuser = \"alice\"\ntoken_env = \"T\"\ntls_cert_file = \"c.pem\"\n";
        let ConfigError::Invalid { problems, .. } =
            Config::parse(text, Path::new("c.toml")).unwrap_err()
        else {
            panic!("should be invalid")
        };
        let text = crate::domain::render(&problems).join("\n");
        assert!(
            text.contains("user, token_env are different ways to sign in"),
            "{text}"
        );
        assert!(
            text.contains("nats.user and nats.password_env go together"),
            "{text}"
        );
        assert!(
            text.contains("nats.tls_cert_file and nats.tls_key_file go together"),
            "{text}"
        );
        assert_eq!(problems.len(), 3, "{text}");
    }

    #[test]
    fn all_semantic_problems_are_reported_together() {
        let text = "[nats]\nprefix = \"a.*\"\n[intake]\nbatch_size = 0\n[routing]\ndefault_pool = \"nope\"\n[pools.code]\ncapabilities = [\"\"]\n[http]\nmax_body_bytes = 0\nmax_control_sockets = 0\n[store]\ndata_dir = \"\"\n";
        let ConfigError::Invalid { problems, .. } =
            Config::parse(text, Path::new("c.toml")).unwrap_err()
        else {
            panic!("should be invalid")
        };
        let got: Vec<_> = problems.iter().map(|p| (p.at.line, p.kind)).collect();
        assert_eq!(
            got,
            [
                (Some(2), ProblemKind::BadValue),
                (Some(13), ProblemKind::Missing),
                (Some(11), ProblemKind::OutOfRange),
                (Some(10), ProblemKind::OutOfRange),
                (Some(4), ProblemKind::OutOfRange),
                (Some(8), ProblemKind::Missing),
                (Some(6), ProblemKind::UnknownName),
            ],
            "{problems:?}"
        );
        assert!(problems.iter().all(|p| p.at.file == "c.toml"));
    }
}
