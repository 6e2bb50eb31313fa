//! The commander's own counters, exposed as OpenMetrics on `/metrics`.
//!
//! Names follow Prometheus conventions; prometheus-client appends `_total` to counters.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which server: `api`, `otlp_http` or `otlp_grpc`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabel {
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishLabels {
    pub pool: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: String,
}

/// Telemetry item counters: items are spans, metric data points, log records or heartbeats.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TelemetryLabels {
    /// `grpc`, `http` or `nats`.
    pub transport: &'static str,
    /// `traces`, `metrics`, `logs` or `heartbeats`.
    pub signal: &'static str,
    /// `received`, `accepted`, `rejected` (bad data) or `dropped` (shed under load).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub pool: String,
    pub model: String,
    /// Route rule, or the rejection code.
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BucketLabel {
    pub bucket: &'static str,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Gauges for dashboards, set from the fleet snapshot when `/metrics` is read.
#[derive(Debug, Default)]
pub struct FleetGauges {
    /// Spend rate of the last 5 minutes, per hour: the fleet, and per pool.
    pub burn_rate: FloatGauge,
    pub pool_burn_rate: Family<PoolLabel, FloatGauge>,
    /// Output tokens per second over the last minute: the fleet, and per pool.
    pub output_tokens_per_s: FloatGauge,
    pub pool_output_tokens_per_s: Family<PoolLabel, FloatGauge>,
    pub input_tokens_per_s: FloatGauge,
    /// Failed share of LLM calls, tool calls and runs over 5 minutes (NaN-free: 0 with no
    /// operations).
    pub error_rate: FloatGauge,
    /// Per pool: queue depth (pending + unacknowledged), runs in progress, and the sum of
    /// its workers' slots.
    pub pool_queue_depth: Family<PoolLabel, Gauge>,
    pub pool_in_flight: Family<PoolLabel, Gauge>,
    pub pool_capacity: Family<PoolLabel, Gauge>,
    /// Workers by context utilisation bucket (a gauge histogram of the fleet now).
    pub context_utilisation: Family<BucketLabel, Gauge>,
    /// Workers by pool and state (lost ones under `LOST`).
    pub pool_workers: Family<PoolStateLabels, Gauge>,
    /// The pools whose series the last scrape set: a pool the live state has since
    /// forgotten has its series dropped, not left at their last values.
    pub exported_pools: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolStateLabels {
    pub pool: String,
    pub state: &'static str,
}

impl FleetGauges {
    /// Drops the series of every pool an earlier call exported that is not in `pools`
    /// (`states`: the state labels its `pool_workers` series may carry), and remembers
    /// `pools` as exported.
    pub fn keep_only_pools(
        &self,
        pools: std::collections::BTreeSet<String>,
        states: &[&'static str],
    ) {
        let mut exported = match self.exported_pools.lock() {
            Ok(e) => e,
            Err(poisoned) => poisoned.into_inner(),
        };
        for gone in exported.difference(&pools) {
            let l = PoolLabel { pool: gone.clone() };
            for family in [
                &self.pool_queue_depth,
                &self.pool_in_flight,
                &self.pool_capacity,
            ] {
                family.remove(&l);
            }
            self.pool_burn_rate.remove(&l);
            self.pool_output_tokens_per_s.remove(&l);
            for &state in states {
                self.pool_workers.remove(&PoolStateLabels {
                    pool: gone.clone(),
                    state,
                });
            }
        }
        *exported = pools;
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "burn_rate_usd_per_hour",
            "Fleet spend of the last 5 minutes, per hour",
            self.burn_rate.clone(),
        );
        r.register(
            "pool_burn_rate_usd_per_hour",
            "Spend of the last 5 minutes per hour, by pool",
            self.pool_burn_rate.clone(),
        );
        r.register(
            "output_tokens_per_second",
            "Fleet output tokens per second, last minute",
            self.output_tokens_per_s.clone(),
        );
        r.register(
            "pool_output_tokens_per_second",
            "Output tokens per second over the last minute, by pool",
            self.pool_output_tokens_per_s.clone(),
        );
        r.register(
            "input_tokens_per_second",
            "Fleet input tokens per second, last minute",
            self.input_tokens_per_s.clone(),
        );
        r.register(
            "error_rate",
            "Failed share of LLM calls, tool calls and runs over 5 minutes",
            self.error_rate.clone(),
        );
        r.register(
            "pool_queue_depth",
            "Tasks queued for a pool (pending + unacknowledged)",
            self.pool_queue_depth.clone(),
        );
        r.register(
            "pool_in_flight",
            "Runs in progress, by pool",
            self.pool_in_flight.clone(),
        );
        r.register(
            "pool_capacity",
            "Sum of the pool's workers' max_in_flight",
            self.pool_capacity.clone(),
        );
        r.register(
            "pool_workers",
            "Workers by pool and state (lost workers under LOST)",
            self.pool_workers.clone(),
        );
        r.register(
            "workers_by_context_utilisation",
            "Workers by context utilisation now (buckets 0-50, 50-80, 80-95, 95-100 %, unknown)",
            self.context_utilisation.clone(),
        );
    }
}

/// Every counter the task path keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Intake messages read (NATS and HTTP both arrive through the intake stream).
    pub tasks_received: Counter,
    /// Tasks refused, by reason code (bad_json, invalid_task, unknown_pool …).
    pub tasks_rejected: Family<ReasonLabel, Counter>,
    /// Tasks the commander ended as `cancelled` (`deadline_exceeded`) because their
    /// deadline passed before it could dispatch them (at intake, deferred or parked).
    pub tasks_expired: Counter,
    /// Deferred or parked tasks an operator cancelled while they waited.
    pub waiting_cancelled: Counter,
    /// Dispatched tasks an operator cancelled while they waited in their pool's queue.
    pub queued_cancelled: Counter,
    /// Tasks published to a pool subject.
    pub tasks_dispatched: Family<PoolLabel, Counter>,
    /// Tasks that reached a terminal state through a result.
    pub tasks_finished: Family<FinishLabels, Counter>,
    /// Redelivered intake messages for tasks already dispatched.
    pub intake_duplicates: Counter,
    /// Redelivered intake messages of tasks that finished before their dispatch was
    /// recorded (a restart in between): decided again for the record, not dispatched.
    pub intake_recovered: Counter,
    /// Dispatches whose publish failed (the intake message is retried).
    pub dispatch_errors: Counter,
    /// Producer traceparent headers refused (a new trace was started).
    pub traceparent_invalid: Counter,
    /// Results forwarded to a producer's reply subject.
    pub results_forwarded: Counter,
    /// Result messages that did not parse.
    pub results_invalid: Counter,
    /// Tasks accepted over HTTP here and taken by another replica, whose record here was
    /// finished from the results stream.
    pub tasks_finished_elsewhere: Counter,
    /// `Fleet-Reply-To` subjects refused (system, fleet or not allowed subjects).
    pub reply_to_refused: Counter,
    /// Tasks that failed because no delivery of them was acked (max deliveries).
    pub tasks_dead_lettered: Counter,
    /// Targeted tasks sent again to their pool (their worker was lost or never bound).
    pub tasks_retargeted: Counter,
    /// Tasks accepted over HTTP.
    pub http_submissions: Counter,
    /// Task records in the store (in flight and finished), as of the last sweep.
    pub task_records: Gauge,
    /// Finished task records the sweeper deleted.
    pub task_records_swept: Counter,
    /// Requests refused at the HTTP edge before reaching the intake stream, by transport.
    pub http_rejected: Family<TransportLabel, Counter>,
    /// Telemetry items by transport, signal and outcome.
    pub telemetry: Family<TelemetryLabels, Counter>,
    /// Workers tracked, by state (lost workers under `LOST`).
    pub workers: Family<StateLabel, Gauge>,
    /// 1 while the NATS connection is up, 0 while it is being re-established.
    pub nats_connected: Gauge,
    /// Routing decisions by pool, model and rule (rejections: pool/model `none`).
    pub decisions: Family<DecisionLabels, Counter>,
    /// API requests refused before their handler, by reason (missing_token,
    /// unknown_token, wrong_role).
    pub auth_refused: Family<ReasonLabel, Counter>,
    /// HTTP connections open, by server (`httpd`).
    pub http_connections: Family<ServerLabel, Gauge>,
    /// HTTP connections closed as soon as accepted because `http.max_connections` were
    /// open, by server.
    pub http_connections_refused: Family<ServerLabel, Counter>,
    /// From an intake batch in hand to each of its dispatches' PubAck (seconds).
    pub intake_dispatch: IntakeDispatch,
    pub fleet: FleetGauges,
}

/// `fleet_intake_dispatch_seconds`: the commander's own share of a task's way, from the
/// intake batch it arrived in being read to the work stream's PubAck of its dispatch.
/// Buckets are fine below 5 ms, where this lives when the commander keeps up.
#[derive(Debug, Clone)]
pub struct IntakeDispatch(pub prometheus_client::metrics::histogram::Histogram);

/// Bucket bounds of [`IntakeDispatch`], seconds.
pub const INTAKE_DISPATCH_BUCKETS: [f64; 25] = [
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.00175, 0.002, 0.0025, 0.003, 0.004,
    0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
];

impl Default for IntakeDispatch {
    fn default() -> Self {
        Self(prometheus_client::metrics::histogram::Histogram::new(
            INTAKE_DISPATCH_BUCKETS,
        ))
    }
}

impl Metrics {
    /// The connection figures of one server (`api`, `otlp_http`, `otlp_grpc`): open, refused.
    pub fn http_server(&self, server: &str) -> (Gauge, Counter) {
        let label = ServerLabel {
            server: server.to_string(),
        };
        (
            self.http_connections.get_or_create(&label).clone(),
            self.http_connections_refused.get_or_create(&label).clone(),
        )
    }

    /// Registers these counters with a fresh registry (`fleet_` prefix); the modules that
    /// own other counters register theirs with it (`StateCounters::register` …).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("fleet");
        self.register_task_path(&mut r);
        self.register_edges(&mut r);
        r
    }

    /// The task path's counters: decisions, intake, dispatch, results, the task records.
    fn register_task_path(&self, r: &mut Registry) {
        r.register(
            "decisions",
            "Routing decisions, by pool, model and rule",
            self.decisions.clone(),
        );
        r.register(
            "tasks_received",
            "Intake messages read",
            self.tasks_received.clone(),
        );
        r.register(
            "tasks_rejected",
            "Tasks refused, by reason",
            self.tasks_rejected.clone(),
        );
        r.register(
            "tasks_expired",
            "Tasks ended as cancelled (deadline_exceeded) because their deadline passed before dispatch",
            self.tasks_expired.clone(),
        );
        r.register(
            "waiting_tasks_cancelled",
            "Deferred or parked tasks an operator cancelled while they waited",
            self.waiting_cancelled.clone(),
        );
        r.register(
            "queued_tasks_cancelled",
            "Dispatched tasks an operator cancelled while they waited in their pool's queue for a worker",
            self.queued_cancelled.clone(),
        );
        r.register(
            "tasks_dispatched",
            "Tasks published to a pool subject",
            self.tasks_dispatched.clone(),
        );
        r.register(
            "tasks_finished",
            "Tasks finished, by pool and status",
            self.tasks_finished.clone(),
        );
        r.register(
            "intake_duplicates",
            "Redelivered intake messages already handled",
            self.intake_duplicates.clone(),
        );
        r.register(
            "intake_recovered",
            "Redelivered intake messages of tasks that finished before their dispatch was recorded: decided again for the record, not dispatched",
            self.intake_recovered.clone(),
        );
        r.register(
            "task_records",
            "Task records in the store, in flight and finished, as of the last sweep (once a minute); store.max_records bounds the finished ones",
            self.task_records.clone(),
        );
        r.register(
            "task_records_swept",
            "Finished task records deleted, past store.retention_hours or beyond store.max_records",
            self.task_records_swept.clone(),
        );
        r.register(
            "dispatch_errors",
            "Dispatch publishes that failed and will be retried",
            self.dispatch_errors.clone(),
        );
        r.register(
            "traceparent_invalid",
            "Invalid producer traceparent headers",
            self.traceparent_invalid.clone(),
        );
        r.register(
            "results_forwarded",
            "Results forwarded to a reply subject",
            self.results_forwarded.clone(),
        );
        r.register(
            "tasks_finished_elsewhere",
            "Tasks accepted over HTTP here, run by another replica, finished here from the results stream",
            self.tasks_finished_elsewhere.clone(),
        );
        r.register(
            "results_invalid",
            "Result messages that did not parse",
            self.results_invalid.clone(),
        );
        r.register(
            "reply_to_refused",
            "Fleet-Reply-To subjects refused: system, fleet or not allowed subjects",
            self.reply_to_refused.clone(),
        );
        r.register(
            "tasks_dead_lettered",
            "Tasks failed as dead_lettered: delivered the maximum number of times without an ack",
            self.tasks_dead_lettered.clone(),
        );
        r.register(
            "tasks_retargeted",
            "Targeted tasks re-dispatched to their pool: the worker was lost or never bound its consumer",
            self.tasks_retargeted.clone(),
        );
        r.register(
            "intake_dispatch_seconds",
            "From an intake batch being read to the PubAck of each of its dispatches",
            self.intake_dispatch.0.clone(),
        );
    }

    /// What reaches the commander from outside: HTTP, telemetry, workers, NATS.
    fn register_edges(&self, r: &mut Registry) {
        r.register(
            "http_submissions",
            "Tasks accepted over HTTP",
            self.http_submissions.clone(),
        );
        r.register(
            "http_rejected",
            "HTTP submissions refused at the edge",
            self.http_rejected.clone(),
        );
        r.register(
            "telemetry_items",
            "Telemetry items (spans, metric points, log records, heartbeats) by transport, signal and outcome",
            self.telemetry.clone(),
        );
        r.register("workers", "Workers tracked, by state", self.workers.clone());
        r.register(
            "api_auth_refused",
            "API requests refused before their handler, by reason",
            self.auth_refused.clone(),
        );
        r.register(
            "http_connections",
            "HTTP connections open, by server (api, otlp_http, otlp_grpc)",
            self.http_connections.clone(),
        );
        r.register(
            "http_connections_refused",
            "HTTP connections closed as soon as accepted because http.max_connections were open, by server",
            self.http_connections_refused.clone(),
        );
        self.fleet.register(r);
        r.register(
            "nats_connected",
            "1 while the NATS connection is up, 0 while it is being re-established",
            self.nats_connected.clone(),
        );
    }

    /// Adds `n` to a telemetry counter.
    pub fn telemetry(
        &self,
        transport: &'static str,
        signal: &'static str,
        outcome: &'static str,
        n: u64,
    ) {
        if n > 0 {
            self.telemetry
                .get_or_create(&TelemetryLabels {
                    transport,
                    signal,
                    outcome,
                })
                .inc_by(n);
        }
    }

    pub fn auth_refused(&self, reason: &str) {
        self.auth_refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn reject(&self, reason: &str) {
        self.tasks_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }
}
