//! Live fleet state: per worker, per pool, per task type and fleet-wide.
//!
//! [`FleetState`] is a plain struct driven by events and an explicit clock (`now_ms`), so
//! tests run it without I/O or sleeps. [`spawn`] puts it behind one owner task: ingest
//! transports and the task path send it events over bounded channels, readers get an
//! [`Arc<FleetSnapshot>`] rebuilt every second or ask the owner a [`Query`].

pub mod bursts;
pub mod costs;
pub mod lineage;
pub mod mix;
pub mod prints;
pub mod slices;
pub mod view;
pub mod window;
pub mod worker;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use fleet_worker::message::Heartbeat;
use prometheus_client::metrics::counter::Counter;
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot, watch};

use self::costs::{CostCell, CostKeyRef, CostLedger, Dim};
use self::view::{
    AttributionView, CostReport, FleetSnapshot, FleetView, ModelShare, PoolView, QueueView,
    TaskTypeView, ToolView, WorkerDetail, WorkerView,
};
use self::window::{FleetRing, SeriesPoint, WindowedSketch};
use self::worker::{RunEnd, SeriesStep, State, TaskSummary, Worker};
use crate::config::FleetConfig;
use crate::domain::{Dims, MetricKind, MetricPoint, SpanEvent};
use crate::registry::{RegistryInForce, TokenUsage};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Telemetry for the owner (shed when the queue is full).
#[derive(Debug)]
pub enum Ingest {
    Spans(Vec<SpanEvent>),
    Metrics(Vec<MetricPoint>),
    Heartbeat(Box<Heartbeat>),
}

/// Signals from the task path.
#[derive(Debug)]
pub enum TaskEvent {
    Dispatched {
        task_id: String,
        pool: String,
        expected_ms: Option<u64>,
        task_type: Option<String>,
    },
    Finished {
        task_id: String,
        pool: String,
        ok: bool,
        /// From the commander reading the task to the worker receiving it.
        dispatch_latency_ms: Option<u64>,
    },
    Queue {
        pool: String,
        pending: u64,
        ack_pending: u64,
    },
}

/// Questions for the owner that need more than the snapshot.
#[derive(Debug)]
pub enum Query {
    Worker(String, oneshot::Sender<Option<WorkerDetail>>),
    Costs {
        by: Vec<Dim>,
        window_ms: u64,
        reply: oneshot::Sender<CostReport>,
    },
    FleetSeries {
        window_ms: u64,
        reply: oneshot::Sender<Vec<SeriesPoint>>,
    },
    /// The worker that runs (or last ran) a task, as telemetry told.
    TaskWorker(String, oneshot::Sender<Option<String>>),
}

#[derive(Debug)]
struct Dispatch {
    at_ms: u64,
    expected_ms: Option<u64>,
    task_type: Option<String>,
}

const MAX_DISPATCHES: usize = 100_000;
const MAX_TASK_TYPES: usize = 1_024;
const MAX_POOLS: usize = 1_024;
/// How long after a metric export its tokens beyond the spans are booked: the spans of
/// the same calls leave their exporters' batches within seconds.
const MIX_GRACE_MS: u64 = 30_000;
/// Models whose call latencies are kept.
const MAX_MODELS: usize = 256;
const MINUTE: u64 = 60_000;

/// What the live state first heard of a pool by ([`FleetState::take_in_pool`]).
enum Heard<'a> {
    /// A heartbeat of this worker.
    Worker(&'a str),
    /// Its queue's reading, with this many tasks in it.
    Queue(u64),
}

#[derive(Debug)]
struct PoolAgg {
    configured: bool,
    /// When the pool was last heard of (fleet time): a heartbeat of one of its workers, a
    /// task dispatched to it or finished in it, a reading of its queue with tasks in it.
    /// One that is not configured is forgotten `fleet.retention_ms` after
    /// ([`FleetState::forget_idle_pools`]).
    heard_ms: u64,
    queue: Option<QueueView>,
    dispatch_latency: WindowedSketch,
    /// (10 s bucket, ok, failed), last minute.
    finished: VecDeque<(u64, u64, u64)>,
}

impl PoolAgg {
    fn new(configured: bool) -> Self {
        Self {
            configured,
            heard_ms: 0,
            queue: None,
            dispatch_latency: WindowedSketch::new(MINUTE, 5),
            finished: VecDeque::new(),
        }
    }

    /// The pool's view before its workers are counted in ([`PoolView::count`]).
    fn view(&self, name: &str, now_ms: u64) -> PoolView {
        let (ok, failed) = self
            .finished
            .iter()
            .filter(|(e, _, _)| *e + 6 > now_ms / 10_000)
            .fold((0, 0), |(a, b), (_, o, f)| (a + o, b + f));
        PoolView {
            name: name.to_string(),
            configured: self.configured,
            queue: self.queue.clone(),
            dispatch_latency_ms: self.dispatch_latency.percentiles(now_ms),
            tasks_per_min: ok + failed,
            failed_per_min: failed,
            states: State::ALL.iter().map(|s| (s.as_str(), 0)).collect(),
            ..Default::default()
        }
    }
}

impl PoolView {
    /// Counts one of the pool's workers in.
    fn count(&mut self, w: &WorkerView) {
        if w.lost {
            self.lost += 1;
            return;
        }
        self.workers += 1;
        *self.states.entry(w.state.as_str()).or_default() += 1;
        if w.state.is_busy() {
            self.active += 1;
        }
        self.in_flight += w.running as u64;
        self.capacity += u64::from(w.max_in_flight.unwrap_or(1));
    }
}

/// The fleet's workers counted by state and by pool, for a snapshot.
struct Counted {
    states: BTreeMap<&'static str, u64>,
    busy: u64,
    lost_workers: Vec<String>,
    pools: BTreeMap<String, PoolView>,
}

#[derive(Debug)]
struct TaskTypeAgg {
    cost: WindowedSketch,
    /// Input + output tokens per run.
    tokens: WindowedSketch,
    depth: WindowedSketch,
    duration: WindowedSketch,
    /// The smoothed duration of its last completed runs: the expected duration until
    /// `median_ms` has enough runs.
    baseline_ms: Option<f64>,
    /// The median duration of its runs over the last hour, refreshed every tick once at
    /// least `MEDIAN_MIN_RUNS` finished: what a run is expected to take. A smoothed value
    /// of the last few runs moves by seconds from one run to the next, and the stuck
    /// threshold (3 × it) with it.
    median_ms: Option<f64>,
    baseline_tps: Option<f64>,
}

/// Runs of a task type in the hour before its median duration is its expected duration.
const MEDIAN_MIN_RUNS: u64 = 20;

impl TaskTypeAgg {
    fn new() -> Self {
        Self {
            cost: WindowedSketch::new(10 * MINUTE, 6),
            tokens: WindowedSketch::new(10 * MINUTE, 6),
            depth: WindowedSketch::new(10 * MINUTE, 6),
            duration: WindowedSketch::new(10 * MINUTE, 6),
            baseline_ms: None,
            median_ms: None,
            baseline_tps: None,
        }
    }

    /// What a run of this type is expected to take, in ms.
    fn expected_ms(&self) -> Option<u64> {
        self.median_ms.or(self.baseline_ms).map(|v| v as u64)
    }
}

/// Cost and tokens per run of one attribution value (a team, a feature, a prompt
/// variant), for the distribution jumps per attribution dimension.
#[derive(Debug)]
struct AttributionAgg {
    cost: WindowedSketch,
    tokens: WindowedSketch,
    /// The last run booked: a value idle for an hour is forgotten (`FleetState::tick`).
    last_ms: u64,
}

/// The attribution dimensions whose runs' cost and tokens are kept.
const ATTRIBUTION_DIMENSIONS: [&str; 3] = ["team", "feature", "prompt_variant"];
/// Attribution values kept at most (over the three dimensions).
const MAX_ATTRIBUTIONS: usize = 512;

/// Each dimension's values (one map per `ATTRIBUTION_DIMENSIONS` entry, so a lookup
/// borrows the run's value instead of building a key).
type Attributions = [FxHashMap<String, AttributionAgg>; 3];

/// Books a finished run's cost and tokens under each attribution value it carries.
fn book_attributions(aggs: &mut Attributions, run: &TaskSummary, now_ms: u64) {
    let kept: usize = aggs.iter().map(FxHashMap::len).sum();
    let values = [&run.team, &run.feature, &run.prompt_variant];
    let mut room = MAX_ATTRIBUTIONS.saturating_sub(kept);
    for (map, value) in aggs.iter_mut().zip(values) {
        let Some(value) = value else { continue };
        let agg = match map.get_mut(value.as_str()) {
            Some(agg) => agg,
            None if room > 0 => {
                room -= 1;
                map.entry(value.clone()).or_insert_with(|| AttributionAgg {
                    cost: WindowedSketch::new(10 * MINUTE, 6),
                    tokens: WindowedSketch::new(10 * MINUTE, 6),
                    last_ms: now_ms,
                })
            }
            None => continue,
        };
        agg.last_ms = now_ms;
        if let Some(c) = run.cost_usd {
            agg.cost.add(now_ms, c);
        }
        agg.tokens
            .add(now_ms, (run.input_tokens + run.output_tokens) as f64);
    }
}

fn ewma(prev: Option<f64>, v: f64) -> Option<f64> {
    const ALPHA: f64 = 0.2;
    Some(match prev {
        Some(p) => p + ALPHA * (v - p),
        None => v,
    })
}

/// Books a finished run into its task type's figures.
fn finish_run(
    task_types: &mut FxHashMap<String, TaskTypeAgg>,
    dispatched: &mut FxHashMap<String, Dispatch>,
    run: &TaskSummary,
    now_ms: u64,
) {
    dispatched.remove(&run.task_id);
    let Some(tt) = run.task_type.as_deref() else {
        return;
    };
    if !task_types.contains_key(tt) {
        if task_types.len() >= MAX_TASK_TYPES {
            return;
        }
        task_types.insert(tt.to_string(), TaskTypeAgg::new());
    }
    let Some(agg) = task_types.get_mut(tt) else {
        return;
    };
    if let Some(c) = run.cost_usd {
        agg.cost.add(now_ms, c);
    }
    agg.tokens
        .add(now_ms, (run.input_tokens + run.output_tokens) as f64);
    agg.depth.add(now_ms, f64::from(run.steps));
    agg.duration.add(now_ms, run.duration_ms as f64);
    if run.status == RunEnd::Completed {
        agg.baseline_ms = ewma(agg.baseline_ms, run.duration_ms as f64);
        if run.duration_ms > 0 && run.output_tokens > 0 {
            let tps = run.output_tokens as f64 * 1000.0 / run.duration_ms as f64;
            agg.baseline_tps = ewma(agg.baseline_tps, tps);
        }
    }
}

/// Counters the live state keeps about itself (exposed on `/metrics`).
#[derive(Debug)]
pub struct StateCounters {
    /// From the commander reading a task to its worker receiving it, by pool (seconds).
    pub dispatch_latency: prometheus_client::metrics::family::Family<
        crate::metrics::PoolLabel,
        prometheus_client::metrics::histogram::Histogram,
        fn() -> prometheus_client::metrics::histogram::Histogram,
    >,
    /// Signals from new workers refused because `max_workers` were tracked, none lost.
    pub workers_refused: Counter,
    /// Signals naming a new pool while [`MAX_POOLS`] are tracked: not taken in.
    pub pools_refused: Counter,
    /// Lost workers forgotten early to make room for new ones (`max_workers` tracked).
    pub workers_displaced: Counter,
    /// Workers forgotten after the retention period.
    pub workers_evicted: Counter,
    /// Heartbeats with an unusable worker id or pool, or figures out of range.
    pub heartbeats_invalid: Counter,
    /// Task-path events dropped because the owner was behind (the task path never waits).
    pub task_events_dropped: Counter,
    /// Spans given to the agent of an ancestor rather than their resource.
    pub spans_inherited: Counter,
    /// Spans that waited for an ancestor to say whose they are.
    pub spans_waited: Counter,
    /// Waiting spans whose ancestor did not come within `fleet.identity_wait_ms`.
    pub spans_wait_timed_out: Counter,
    /// Spans applied to their resource at once because the lineage was full.
    pub spans_lineage_overflow: Counter,
    /// Cumulative token counters whose step since the last point was over
    /// `domain::MAX_TOKENS_PER_REPORT`: the step is not booked.
    pub metric_steps_out_of_range: Counter,
    /// Cumulative series first seen with a start before the commander was watching (or
    /// none): their first point is the baseline, not booked.
    pub metric_series_baselined: Counter,
    /// Points of cumulative series beyond `worker::MAX_METRIC_SERIES` of one worker: not
    /// booked.
    pub metric_series_untracked: Counter,
}

fn dispatch_latency_histogram() -> prometheus_client::metrics::histogram::Histogram {
    // 1 ms to ~16 s: dispatch takes milliseconds, a queue wait can take seconds.
    prometheus_client::metrics::histogram::Histogram::new(
        prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
    )
}

impl Default for StateCounters {
    fn default() -> Self {
        Self {
            dispatch_latency: prometheus_client::metrics::family::Family::new_with_constructor(
                dispatch_latency_histogram,
            ),
            workers_refused: Counter::default(),
            pools_refused: Counter::default(),
            workers_displaced: Counter::default(),
            workers_evicted: Counter::default(),
            heartbeats_invalid: Counter::default(),
            task_events_dropped: Counter::default(),
            spans_inherited: Counter::default(),
            spans_waited: Counter::default(),
            spans_wait_timed_out: Counter::default(),
            spans_lineage_overflow: Counter::default(),
            metric_steps_out_of_range: Counter::default(),
            metric_series_baselined: Counter::default(),
            metric_series_untracked: Counter::default(),
        }
    }
}

impl StateCounters {
    /// Registers these counters (the registry carries the `fleet_` prefix).
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "dispatch_latency_seconds",
            "From the commander reading a task to its worker receiving it, by pool",
            self.dispatch_latency.clone(),
        );
        r.register(
            "workers_refused",
            "Signals from new workers refused because fleet.max_workers were tracked, none of them lost",
            self.workers_refused.clone(),
        );
        r.register(
            "pools_refused",
            "Signals naming a new pool while the live state tracked its 1,024 pools: the pool is not listed, polled or routed to by load (a pool that is not configured leaves after fleet.retention_ms idle)",
            self.pools_refused.clone(),
        );
        r.register(
            "workers_displaced",
            "Lost workers forgotten before fleet.retention_ms to make room for new ones (fleet.max_workers tracked)",
            self.workers_displaced.clone(),
        );
        r.register(
            "workers_evicted",
            "Lost workers forgotten after fleet.retention_ms",
            self.workers_evicted.clone(),
        );
        r.register(
            "heartbeats_invalid",
            "Heartbeats with an unusable worker id or pool, or figures out of range",
            self.heartbeats_invalid.clone(),
        );
        r.register(
            "task_events_dropped",
            "Task-path events the live state was too busy to take",
            self.task_events_dropped.clone(),
        );
        r.register(
            "spans_inherited",
            "Spans given to the agent of an ancestor span rather than their resource",
            self.spans_inherited.clone(),
        );
        r.register(
            "spans_waited",
            "Spans that waited for an ancestor to say which agent they belong to",
            self.spans_waited.clone(),
        );
        r.register(
            "spans_wait_timed_out",
            "Waiting spans whose ancestor did not arrive within fleet.identity_wait_ms",
            self.spans_wait_timed_out.clone(),
        );
        r.register(
            "metric_steps_out_of_range",
            "Cumulative token counters whose step since their last point was over a billion tokens: not booked",
            self.metric_steps_out_of_range.clone(),
        );
        r.register(
            "metric_series_baselined",
            "Cumulative metric series first seen with a start before the commander was watching, or none: their first point is the baseline, not booked",
            self.metric_series_baselined.clone(),
        );
        r.register(
            "metric_series_untracked",
            "Points of cumulative metric series beyond the 64 followed per worker: not booked",
            self.metric_series_untracked.clone(),
        );
        r.register(
            "spans_lineage_overflow",
            "Spans applied to their resource at once because the lineage bounds were reached",
            self.spans_lineage_overflow.clone(),
        );
    }
}

/// The live state. One owner mutates it; see the module docs.
#[derive(Debug)]
pub struct FleetState {
    cfg: FleetConfig,
    registry: Arc<RegistryInForce>,
    workers: FxHashMap<String, Worker>,
    pools: BTreeMap<String, PoolAgg>,
    task_types: FxHashMap<String, TaskTypeAgg>,
    /// Cost and tokens per run by team, feature and prompt variant, the last hour.
    attributions: Attributions,
    fleet: FleetRing,
    costs: CostLedger,
    dispatched: FxHashMap<String, Dispatch>,
    dispatch_order: VecDeque<String>,
    pub counters: Arc<StateCounters>,
    /// Which agent each trace's spans belong to.
    lineage: lineage::Lineage,
    /// LLM call durations per model (registry name), the last hour.
    model_latency: FxHashMap<String, WindowedSketch>,
    /// Tokens of processes that report them both as spans and as metrics.
    mix: mix::UsageMix,
    /// Operations and failures per slice (tool, model, prompt variant …), the last hour.
    slices: slices::Slices,
    /// Each tool's failures by time and agent, for the burst rule.
    bursts: bursts::ToolBursts,
    /// What finished runs did (tools in order, steps), per pool, task type and prompt
    /// variant, the last hour.
    prints: prints::Prints,
    /// Fleet time the commander began watching (`spawn` sets it): a cumulative metric
    /// series that started before it is taken from its first point on, not from zero.
    watching_since_ms: u64,
    /// Workers forgotten, and those that may be forgotten next to make room.
    forgotten: Forgotten,
}

/// Evicted workers' metric series (the most recently evicted [`EVICTED_SERIES_KEPT`]).
type EvictedSeries = lru::LruCache<String, worker::MetricSeries>;

/// What the live state keeps about forgetting workers.
#[derive(Debug)]
struct Forgotten {
    /// The cumulative series of workers forgotten, for when they come back: their
    /// counters went on from totals booked already.
    series: EvictedSeries,
    /// Lost workers, the longest silent first, that a new worker may displace once
    /// `fleet.max_workers` are tracked. Where workers are ephemeral (a pod name or a job
    /// per run), lost ones filled the table within the retention period, and every new
    /// worker after them went unseen, its spans unbooked, for up to an hour.
    room: VecDeque<String>,
    /// When `room` was last filled (fleet time): one walk of the table a second at most,
    /// so a flood of new ids finds the table full of live workers at the cost of a lookup.
    room_filled_ms: Option<u64>,
}

impl Forgotten {
    fn new() -> Self {
        Self {
            series: lru::LruCache::new(
                std::num::NonZeroUsize::new(EVICTED_SERIES_KEPT)
                    .unwrap_or(std::num::NonZeroUsize::MIN),
            ),
            room: VecDeque::new(),
            room_filled_ms: None,
        }
    }

    /// Forgets `id`, keeping its cumulative series.
    fn forget(&mut self, workers: &mut FxHashMap<String, Worker>, id: &str) {
        if let Some(mut w) = workers.remove(id) {
            let series = w.take_metric_series();
            if !series.is_empty() {
                self.series.put(id.to_string(), series);
            }
        }
    }

    /// Forgets the lost worker silent the longest to make room for a new one; false when
    /// every tracked worker is live (or the table was walked less than a second ago).
    fn make_room(&mut self, workers: &mut FxHashMap<String, Worker>, now_ms: u64) -> bool {
        let next = match self.next_lost(workers) {
            Some(id) => Some(id),
            None if self.fill_room(workers, now_ms) => self.next_lost(workers),
            None => None,
        };
        let Some(id) = next else {
            return false;
        };
        self.forget(workers, &id);
        true
    }

    /// The next worker in `room` that is still lost (it may have come back since the walk).
    fn next_lost(&mut self, workers: &FxHashMap<String, Worker>) -> Option<String> {
        std::iter::from_fn(|| self.room.pop_front())
            .find(|id| workers.get(id).is_some_and(|w| w.lost))
    }

    /// Walks the table for its lost workers, the longest silent first, at most once a
    /// second; false when it did not walk.
    fn fill_room(&mut self, workers: &FxHashMap<String, Worker>, now_ms: u64) -> bool {
        if self
            .room_filled_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < 1_000)
        {
            return false;
        }
        self.room_filled_ms = Some(now_ms);
        let mut lost: Vec<(u64, &String)> = workers
            .iter()
            .filter(|(_, w)| w.lost)
            .map(|(id, w)| (w.last_seen_ms, id))
            .collect();
        lost.sort_unstable();
        self.room = lost.into_iter().map(|(_, id)| id.clone()).collect();
        true
    }
}

/// Workers whose series are kept after eviction: each holds at most
/// `worker::MAX_METRIC_SERIES` (64) series of 24 bytes, so this is at most about 20 MiB.
const EVICTED_SERIES_KEPT: usize = 10_000;

impl FleetState {
    pub fn new<'a>(
        cfg: FleetConfig,
        registry: Arc<RegistryInForce>,
        configured_pools: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let pools = configured_pools
            .into_iter()
            .map(|p| (p.to_string(), PoolAgg::new(true)))
            .collect();
        Self {
            costs: CostLedger::new(cfg.max_cost_keys),
            cfg,
            registry,
            workers: FxHashMap::default(),
            pools,
            task_types: FxHashMap::default(),
            attributions: Default::default(),
            fleet: FleetRing::default(),
            dispatched: FxHashMap::default(),
            dispatch_order: VecDeque::new(),
            counters: Arc::new(StateCounters::default()),
            lineage: Default::default(),
            model_latency: FxHashMap::default(),
            slices: slices::Slices::default(),
            bursts: bursts::ToolBursts::default(),
            prints: prints::Prints::default(),
            mix: Default::default(),
            watching_since_ms: 0,
            forgotten: Forgotten::new(),
        }
    }

    /// From when the commander watches the fleet (fleet time): see `watching_since_ms`.
    pub fn watching_since(&mut self, ms: u64) {
        self.watching_since_ms = ms;
    }

    pub fn worker(&self, id: &str) -> Option<&Worker> {
        self.workers.get(id)
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Takes in a pool the live state does not know yet, on what it first heard of it, and
    /// says so when the config names other pools but not this one: it gets no routed task
    /// (a misspelt `--pool` would otherwise idle unnoticed, and the tasks left in the queue
    /// of a pool taken out of the config wait unseen). Once each time the pool is taken in
    /// (it stays until [`Self::forget_idle_pools`] lets it go); past [`MAX_POOLS`] none is
    /// taken in, and nothing is said (a log line per heartbeat would flood), but each
    /// refusal is counted (`fleet_pools_refused_total`).
    fn take_in_pool(&mut self, pool: &str, heard: Heard<'_>) -> Option<&mut PoolAgg> {
        if self.pools.contains_key(pool) {
            return Self::pool_mut(&mut self.pools, &self.counters, pool);
        }
        let configured = self
            .pools
            .iter()
            .filter(|(_, p)| p.configured)
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let agg = Self::pool_mut(&mut self.pools, &self.counters, pool)?;
        if !configured.is_empty() {
            match heard {
                Heard::Worker(worker) => tracing::warn!(
                    pool,
                    worker,
                    configured,
                    "a worker heartbeats for a pool that is not configured: the commander routes it no task (its --pool misspelt, or the pool taken out of the config?)"
                ),
                Heard::Queue(waiting) => tracing::warn!(
                    pool,
                    waiting,
                    "tasks wait in the queue of a pool that is not configured: a worker of the pool takes them, or `commander ctl purge-pool --pool {pool}` cancels them (docs/configuration.md, \"Taking a pool out\")"
                ),
            }
        }
        Some(agg)
    }

    fn pool_mut<'a>(
        pools: &'a mut BTreeMap<String, PoolAgg>,
        counters: &StateCounters,
        name: &str,
    ) -> Option<&'a mut PoolAgg> {
        if !pools.contains_key(name) && pools.len() >= MAX_POOLS {
            counters.pools_refused.inc();
            return None;
        }
        Some(
            pools
                .entry(name.to_string())
                .or_insert_with(|| PoolAgg::new(false)),
        )
    }

    fn worker_entry<'a>(
        workers: &'a mut FxHashMap<String, Worker>,
        forgotten: &mut Forgotten,
        cfg: &FleetConfig,
        counters: &StateCounters,
        id: &str,
        now_ms: u64,
    ) -> Option<&'a mut Worker> {
        if !workers.contains_key(id) {
            if workers.len() >= cfg.max_workers {
                if !forgotten.make_room(workers, now_ms) {
                    counters.workers_refused.inc();
                    return None;
                }
                counters.workers_displaced.inc();
            }
            let mut w = Worker::new(id.to_string(), now_ms);
            if let Some(series) = forgotten.series.pop(id) {
                w.restore_metric_series(series);
            }
            workers.insert(id.to_string(), w);
        }
        workers.get_mut(id)
    }

    pub fn apply(&mut self, ev: Ingest, now_ms: u64) {
        match ev {
            Ingest::Spans(s) => self.apply_spans(s, now_ms),
            Ingest::Metrics(m) => self.apply_metrics(m, now_ms),
            Ingest::Heartbeat(hb) => self.apply_heartbeat(&hb, now_ms),
        }
    }

    /// Takes spans as they arrive: each is first given to the agent of its trace
    /// (`lineage`), which may hold a child until its ancestor arrives.
    pub fn apply_spans(&mut self, spans: Vec<SpanEvent>, now_ms: u64) {
        let mut ready = Vec::with_capacity(spans.len());
        for ev in spans {
            self.lineage.admit(ev, now_ms, &mut ready);
        }
        self.sync_lineage_counts();
        self.apply_attributed(ready, now_ms);
    }

    fn sync_lineage_counts(&self) {
        let c = self.lineage.counts;
        let set = |counter: &Counter, v: u64| {
            let now = counter.get();
            if v > now {
                counter.inc_by(v - now);
            }
        };
        set(&self.counters.spans_inherited, c.inherited);
        set(&self.counters.spans_waited, c.waited);
        set(&self.counters.spans_wait_timed_out, c.timed_out);
        set(&self.counters.spans_lineage_overflow, c.overflowed);
    }

    /// Applies spans whose worker is settled.
    fn apply_attributed(&mut self, spans: Vec<SpanEvent>, now_ms: u64) {
        let reg = self.registry.in_force();
        for ev in spans {
            let billed = ev.operation.is_billed();
            // One registry lookup per billed call: its price, its window and its name.
            let entry = match &ev.model {
                Some(m) if billed => reg.lookup(m),
                _ => None,
            };
            // The registry's name: dated snapshots and provider prefixes of one model are
            // one model in the cost report and the latency figures.
            let model = ev
                .model
                .as_deref()
                .map(|m| entry.map(|e| e.name.as_str()).unwrap_or(m));
            let (cost, limit) = match (&ev.usage, entry) {
                (Some(u), Some(e)) => (Some(e.cost(u)), Some(e.context_window)),
                // The window is only read with a billed call's usage.
                _ => (None, None),
            };
            let Some(w) = Self::worker_entry(
                &mut self.workers,
                &mut self.forgotten,
                &self.cfg,
                &self.counters,
                &ev.identity.worker_id,
                now_ms,
            ) else {
                continue;
            };
            let effect = w.apply_span(&ev, cost, limit, now_ms, &self.cfg);
            // Windows and rates follow the span's own time (bounded); state timers, its
            // arrival.
            let at = window::event_ms(ev.end_ns, now_ms, self.cfg.lateness_ms);
            if let Some((task_id, _)) = &effect.started
                && let Some(d) = self.dispatched.get(task_id)
            {
                w.note_dispatch(task_id, d.expected_ms, d.task_type.as_deref());
            }
            self.slices.count(&ev, model, at);
            if ev.operation == crate::domain::Operation::ExecuteTool
                && let Some(tool) = &ev.tool
            {
                self.bursts
                    .count(tool, &ev.identity.worker_id, ev.error, at);
            }
            let p = self.fleet.at(at);
            if billed {
                p.llm_calls += 1;
            }
            if ev.operation == crate::domain::Operation::ExecuteTool {
                p.tool_calls += 1;
            }
            if ev.error {
                p.errors += 1;
            }
            if billed && let Some(name) = model {
                let ms = ev.end_ns.saturating_sub(ev.start_ns) as f64 / 1e6;
                let room = self.model_latency.len() < MAX_MODELS;
                if let Some(s) = self.model_latency.get_mut(name) {
                    s.add(at, ms);
                } else if room {
                    let mut s = WindowedSketch::new(10 * MINUTE, 6);
                    s.add(at, ms);
                    self.model_latency.insert(name.to_string(), s);
                }
            }
            if billed && let Some(u) = &ev.usage {
                if let Some(name) = model {
                    self.mix
                        .span(&ev.resource.worker_id, name, u.input, u.output);
                }
                p.input_tokens += u.input;
                p.output_tokens += u.output;
                p.cost_usd += cost.unwrap_or(0.0);
                self.costs.book(
                    at,
                    CostKeyRef {
                        dims: &ev.dims,
                        task_type: w.current_task_type(),
                        pool: w.pool.as_deref(),
                        model,
                    },
                    CostCell {
                        cost_usd: cost.unwrap_or(0.0),
                        input_tokens: u.input,
                        output_tokens: u.output,
                        calls: 1,
                        unknown_cost_calls: u64::from(cost.is_none()),
                    },
                );
            }
            if effect.finished {
                self.fleet.at(at).tasks += 1;
                if let Some(done) = w.last_task() {
                    finish_run(&mut self.task_types, &mut self.dispatched, done, now_ms);
                    book_attributions(&mut self.attributions, done, now_ms);
                    self.prints.add(w.pool.as_deref(), done, now_ms);
                }
            }
        }
    }

    pub fn apply_metrics(&mut self, points: Vec<MetricPoint>, now_ms: u64) {
        let reg = self.registry.in_force();
        for p in points {
            // Metrics carry no trace: they are their process's, and go to the one agent
            // that process runs when its spans say so (else to the resource's worker).
            let agent = self
                .lineage
                .agent_of_resource(&p.identity.worker_id, now_ms);
            let spans_carry_usage = self.lineage.spans_carry_usage(&p.identity.worker_id);
            let worker_id = agent
                .as_ref()
                .map(|a| a.worker_id.as_str())
                .unwrap_or(p.identity.worker_id.as_str());
            let Some(w) = Self::worker_entry(
                &mut self.workers,
                &mut self.forgotten,
                &self.cfg,
                &self.counters,
                worker_id,
                now_ms,
            ) else {
                continue;
            };
            if w.pool.is_none() {
                w.pool.clone_from(&p.identity.pool);
            }
            let value = if p.cumulative {
                match w.metric_delta(p.series, p.start_ns, p.value, self.watching_since_ms) {
                    SeriesStep::Grew(d) => d,
                    SeriesStep::Baseline => {
                        self.counters.metric_series_baselined.inc();
                        w.note_export(now_ms, false);
                        continue;
                    }
                    SeriesStep::Untracked => {
                        self.counters.metric_series_untracked.inc();
                        w.note_export(now_ms, false);
                        continue;
                    }
                }
            } else {
                p.value
            };
            let tokens_moved =
                matches!(p.kind, MetricKind::InputTokens | MetricKind::OutputTokens) && value > 0.0;
            w.note_export(now_ms, tokens_moved);
            // A delta point was checked on the way in; a cumulative one only as a total,
            // so a series that jumps (or starts) by more than one report may is not booked.
            if p.kind != MetricKind::OperationDuration
                && value > crate::domain::MAX_TOKENS_PER_REPORT as f64
            {
                self.counters.metric_steps_out_of_range.inc();
                continue;
            }
            let entry = p.model.as_deref().and_then(|m| reg.lookup(m));
            let model = entry.map(|e| e.name.as_str()).or(p.model.as_deref());
            // Instrumentations that send spans usually send these metrics too: when a
            // process's spans carry token counts, its metrics count only for what they
            // say beyond the spans (`mix`, booked at a tick after a grace period).
            if w.span_usage_seen || spans_carry_usage {
                let side = match p.kind {
                    MetricKind::InputTokens => Some(mix::Side::Input),
                    MetricKind::OutputTokens => Some(mix::Side::Output),
                    _ => None,
                };
                if let (Some(side), Some(name)) = (side, model) {
                    self.mix.metric(
                        &p.identity.worker_id,
                        name,
                        side,
                        value.max(0.0) as u64,
                        now_ms,
                    );
                }
                continue;
            }
            let tokens = value.max(0.0) as u64;
            let usage = match p.kind {
                MetricKind::InputTokens => TokenUsage {
                    input: tokens,
                    ..Default::default()
                },
                MetricKind::OutputTokens => TokenUsage {
                    output: tokens,
                    ..Default::default()
                },
                // Cache counts are already inside input tokens; they only change the price,
                // which a metric split by kind cannot tell apart. Not booked on their own.
                MetricKind::CacheReadTokens | MetricKind::CacheWriteTokens => continue,
                MetricKind::OperationDuration => continue,
            };
            let at = window::event_ms(p.time_ns, now_ms, self.cfg.lateness_ms);
            if p.model.is_some() {
                w.model.clone_from(&p.model);
            }
            book_metric_tokens(
                w,
                &mut self.fleet,
                &mut self.costs,
                MetricTokens {
                    usage,
                    entry,
                    model,
                    at_ms: at,
                    now_ms,
                },
            );
        }
    }

    pub fn apply_heartbeat(&mut self, hb: &Heartbeat, now_ms: u64) {
        // Ingest refuses these first, saying why; this holds for every other caller.
        if heartbeat_problem(hb).is_some() {
            self.counters.heartbeats_invalid.inc();
            return;
        }
        if let Some(p) = self.take_in_pool(&hb.pool, Heard::Worker(&hb.worker_id)) {
            p.heard_ms = now_ms;
        }
        let Some(w) = Self::worker_entry(
            &mut self.workers,
            &mut self.forgotten,
            &self.cfg,
            &self.counters,
            &hb.worker_id,
            now_ms,
        ) else {
            return;
        };
        for task_id in w.apply_heartbeat(hb, now_ms, &self.cfg) {
            if let Some(d) = self.dispatched.get(&task_id) {
                w.note_dispatch(&task_id, d.expected_ms, d.task_type.as_deref());
            }
        }
        if let Some(hb_model) = &hb.model
            && let Some(e) = self.registry.in_force().lookup(hb_model)
        {
            w.context_limit = Some(e.context_window);
        }
    }

    fn forget_dispatch(&mut self, task_id: &str) {
        self.dispatched.remove(task_id);
    }

    pub fn apply_task(&mut self, ev: TaskEvent, now_ms: u64) {
        match ev {
            TaskEvent::Dispatched {
                task_id,
                pool,
                expected_ms,
                task_type,
            } => {
                if let Some(p) = Self::pool_mut(&mut self.pools, &self.counters, &pool) {
                    p.heard_ms = now_ms;
                }
                while self.dispatched.len() >= MAX_DISPATCHES {
                    match self.dispatch_order.pop_front() {
                        Some(old) => {
                            self.dispatched.remove(&old);
                        }
                        None => break,
                    }
                }
                self.dispatch_order.push_back(task_id.clone());
                self.dispatched.insert(
                    task_id,
                    Dispatch {
                        at_ms: now_ms,
                        expected_ms,
                        task_type,
                    },
                );
            }
            TaskEvent::Finished {
                task_id,
                pool,
                ok,
                dispatch_latency_ms,
            } => {
                self.forget_dispatch(&task_id);
                let Some(p) = Self::pool_mut(&mut self.pools, &self.counters, &pool) else {
                    return;
                };
                p.heard_ms = now_ms;
                if let Some(l) = dispatch_latency_ms {
                    p.dispatch_latency.add(now_ms, l as f64);
                    self.counters
                        .dispatch_latency
                        .get_or_create(&crate::metrics::PoolLabel { pool: pool.clone() })
                        .observe(l as f64 / 1000.0);
                }
                let b = now_ms / 10_000;
                if p.finished.back().is_none_or(|(e, _, _)| *e < b) {
                    if p.finished.len() >= 6 {
                        p.finished.pop_front();
                    }
                    p.finished.push_back((b, 0, 0));
                }
                if let Some(last) = p.finished.back_mut() {
                    if ok {
                        last.1 += 1;
                    } else {
                        last.2 += 1;
                    }
                }
            }
            TaskEvent::Queue {
                pool,
                pending,
                ack_pending,
            } => {
                if let Some(p) = self.take_in_pool(&pool, Heard::Queue(pending + ack_pending)) {
                    // A known pool's queue is read every poll: only tasks in it say the
                    // pool is in use.
                    if pending + ack_pending > 0 {
                        p.heard_ms = now_ms;
                    }
                    p.queue = Some(QueueView {
                        pending,
                        ack_pending,
                        depth: pending + ack_pending,
                        read_at_ms: now_ms,
                    });
                }
            }
        }
    }

    /// What a run of `task_type` is expected to take (`TaskTypeAgg::expected_ms`).
    fn expected_ms(&self, task_type: &str) -> Option<u64> {
        self.task_types
            .get(task_type)
            .and_then(TaskTypeAgg::expected_ms)
    }

    /// Time-driven transitions (WAITING, STUCK, lost), eviction, and the parallel-agent
    /// count. Call about once a second.
    /// Books the tokens processes reported as metrics beyond their spans (`mix`).
    fn book_metric_extras(&mut self, now_ms: u64) {
        let reg = self.registry.in_force();
        for e in self.mix.due(now_ms, MIX_GRACE_MS) {
            let agent = self.lineage.agent_of_resource(&e.resource, now_ms);
            let worker_id = agent
                .as_ref()
                .map(|a| a.worker_id.clone())
                .unwrap_or_else(|| e.resource.clone());
            let Some(w) = Self::worker_entry(
                &mut self.workers,
                &mut self.forgotten,
                &self.cfg,
                &self.counters,
                &worker_id,
                now_ms,
            ) else {
                continue;
            };
            let usage = match e.side {
                mix::Side::Input => TokenUsage {
                    input: e.tokens,
                    ..Default::default()
                },
                mix::Side::Output => TokenUsage {
                    output: e.tokens,
                    ..Default::default()
                },
            };
            book_metric_tokens(
                w,
                &mut self.fleet,
                &mut self.costs,
                MetricTokens {
                    usage,
                    entry: reg.lookup(&e.model),
                    model: Some(e.model.as_str()),
                    at_ms: now_ms,
                    now_ms,
                },
            );
        }
    }

    pub fn tick(&mut self, now_ms: u64) {
        self.book_metric_extras(now_ms);
        self.slices.sweep(now_ms);
        self.bursts.sweep(now_ms);
        self.prints.tick(now_ms);
        for map in &mut self.attributions {
            map.retain(|_, a| now_ms.saturating_sub(a.last_ms) < 60 * MINUTE);
        }
        let mut due = Vec::new();
        self.lineage
            .expire(now_ms, self.cfg.identity_wait_ms, &mut due);
        if !due.is_empty() {
            self.sync_lineage_counts();
            self.apply_attributed(due, now_ms);
        }
        for t in self.task_types.values_mut() {
            let d = t.duration.percentiles(now_ms);
            t.median_ms = d.p50.filter(|_| d.count >= MEDIAN_MIN_RUNS);
        }
        let types = &self.task_types;
        let baseline = |tt: &str| types.get(tt).and_then(TaskTypeAgg::expected_ms);
        let mut busy = 0u64;
        let retention = self.cfg.retention_ms;
        let mut evict = Vec::new();
        for (id, w) in &mut self.workers {
            w.check_lost(now_ms, &self.cfg);
            w.evaluate(now_ms, &self.cfg, &baseline, "time");
            if w.lost {
                if now_ms.saturating_sub(w.last_seen_ms) > retention {
                    evict.push(id.clone());
                }
            } else if w.state().is_busy() {
                busy += 1;
            }
        }
        for id in evict {
            self.forgotten.forget(&mut self.workers, &id);
            self.counters.workers_evicted.inc();
        }
        self.forget_idle_pools(now_ms);
        let p = self.fleet.at(now_ms);
        p.parallel_agents = p.parallel_agents.max(busy);
        // Dispatches nobody picked up within an hour are not worth remembering (the order
        // queue may also hold ids already forgotten when their run ended).
        while let Some(front) = self.dispatch_order.front() {
            if self
                .dispatched
                .get(front)
                .is_some_and(|d| now_ms.saturating_sub(d.at_ms) < 3_600_000)
            {
                break;
            }
            if let Some(id) = self.dispatch_order.pop_front() {
                self.dispatched.remove(&id);
            }
        }
    }

    /// Forgets each pool that is not configured once nothing was heard of it for
    /// `fleet.retention_ms`, its queue is empty (or was never read) and no worker of it is
    /// tracked, as lost workers are forgotten: a pool that came and went (a misspelt
    /// `--pool`, a queue purged after the pool left the config) does not stay listed,
    /// polled and counted against [`MAX_POOLS`] for good. Should it come back, it is taken
    /// in again, and said so again.
    fn forget_idle_pools(&mut self, now_ms: u64) {
        let retention = self.cfg.retention_ms;
        let idle: Vec<String> = self
            .pools
            .iter()
            .filter(|(_, p)| {
                !p.configured
                    && now_ms.saturating_sub(p.heard_ms) > retention
                    && p.queue.as_ref().is_none_or(|q| q.depth == 0)
            })
            .map(|(name, _)| name.clone())
            .collect();
        if idle.is_empty() {
            return;
        }
        // Its workers' heartbeats were heard with it, so they are lost past the retention
        // and gone by now; one still tracked (heard of since by its spans alone) keeps it,
        // until a retention later.
        let manned: rustc_hash::FxHashSet<&str> = self
            .workers
            .values()
            .filter_map(|w| w.pool.as_deref())
            .collect();
        for name in idle {
            if manned.contains(name.as_str()) {
                if let Some(p) = self.pools.get_mut(&name) {
                    p.heard_ms = now_ms;
                }
                continue;
            }
            self.pools.remove(&name);
            tracing::info!(pool = %name, retention_ms = retention, "pool that is not configured forgotten: no worker, no task in its queue and nothing heard of it for fleet.retention_ms");
        }
    }

    fn worker_view(&self, w: &Worker, now_ms: u64) -> WorkerView {
        let reg = self.registry.in_force();
        let (mut out_tok, mut ops, mut errs, mut cost5) = (0u64, 0u64, 0u64, 0f64);
        for b in w.ring.recent(now_ms, 5 * MINUTE) {
            ops += u64::from(b.llm_calls)
                + u64::from(b.tool_calls)
                + u64::from(b.tasks_ok)
                + u64::from(b.tasks_failed);
            errs += u64::from(b.errors);
            cost5 += f64::from(b.cost_micros) / 1e6;
        }
        for b in w.ring.recent(now_ms, MINUTE) {
            out_tok += u64::from(b.output_tokens);
        }
        let known: Vec<f64> = w.recent_tasks().filter_map(|t| t.cost_usd).collect();
        let baseline_tps = w
            .current_task_type()
            .or_else(|| w.recent_tasks().last().and_then(|t| t.task_type.as_deref()))
            .and_then(|tt| self.task_types.get(tt))
            .and_then(|t| t.baseline_tps);
        let entry = w.model.as_deref().and_then(|m| reg.lookup(m));
        WorkerView {
            id: w.id.clone(),
            pool: w.pool.clone(),
            agent_name: w.agent_name.clone(),
            state: w.state(),
            state_since_ms: w.state_since_ms(),
            lost: w.lost,
            stuck_reason: w.stuck_reason().map(str::to_string),
            silent_run: w.silent_run(now_ms, |tt| self.expected_ms(tt), &self.cfg),
            model_unknown: w.model.is_some() && entry.is_none(),
            // The registry's canonical name; the name as reported beside it when it differs.
            model: entry.map(|e| e.name.clone()).or_else(|| w.model.clone()),
            model_reported: w
                .model
                .clone()
                .filter(|m| entry.is_some_and(|e| e.name != *m)),
            provider: w.provider.clone(),
            version: w.version.clone(),
            sdk_version: w.sdk_version.clone(),
            current_task: w.current_task().map(str::to_string),
            current_task_type: w.current_task_type().map(str::to_string),
            running: w.running(),
            max_in_flight: w.max_in_flight(),
            draining: w.draining(),
            paused: w.paused(),
            repeated_call: w.repeated_call(),
            capabilities: w.capabilities().to_vec(),
            context_tokens: w.context_tokens,
            context_limit_tokens: w.context_limit,
            context_utilisation: w.context_utilisation(),
            output_tokens_per_s: out_tok as f64 / 60.0,
            last_call_output_tokens_per_s: w.last_output_rate,
            token_rate_vs_baseline: match (w.last_output_rate, baseline_tps) {
                (Some(r), Some(b)) if b > 0.0 => Some(r / b),
                _ => None,
            },
            error_rate_5m: (ops > 0).then(|| errs as f64 / ops as f64),
            tasks_completed: w.tasks_completed,
            tasks_failed: w.tasks_failed,
            cost_usd: w.total_cost_usd,
            cost_per_task_usd: (!known.is_empty())
                .then(|| known.iter().sum::<f64>() / known.len() as f64),
            burn_rate_usd_per_h: cost5 * 12.0,
            unknown_cost_calls: w.unknown_cost_calls,
            input_tokens: w.total_input_tokens,
            output_tokens: w.total_output_tokens,
            uptime_s: now_ms.saturating_sub(w.started_ms) / 1000,
            first_seen_ms: w.first_seen_ms,
            last_seen_ms: w.last_seen_ms,
            last_heartbeat_ms: w.last_heartbeat_ms(),
        }
    }

    pub fn worker_detail(&self, id: &str, now_ms: u64) -> Option<WorkerDetail> {
        let w = self.workers.get(id)?;
        let tools = w
            .tools()
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    ToolView {
                        stats: s.clone(),
                        success_rate: if s.calls == 0 {
                            1.0
                        } else {
                            1.0 - s.failures as f64 / s.calls as f64
                        },
                        mean_ms: if s.calls == 0 {
                            0.0
                        } else {
                            s.total_ms as f64 / s.calls as f64
                        },
                    },
                )
            })
            .collect();
        Some(WorkerDetail {
            summary: self.worker_view(w, now_ms),
            tools,
            recent_tasks: w.recent_tasks().cloned().collect(),
            transitions: w.transitions().cloned().collect(),
            series: w.ring.series(now_ms),
        })
    }

    pub fn costs(&self, by: &[Dim], window_ms: u64, now_ms: u64) -> CostReport {
        let rows = self.costs.query(now_ms, window_ms, by);
        CostReport {
            window_s: window_ms / 1000,
            by: by.iter().map(|d| d.name()).collect(),
            total_usd: rows.iter().map(|r| r.cell.cost_usd).sum(),
            unknown_cost_calls: rows.iter().map(|r| r.cell.unknown_cost_calls).sum(),
            rows,
        }
    }

    /// The worker whose runs hold `task_id` (a scan: asked once per dead-lettered task).
    pub fn worker_of_task(&self, task_id: &str) -> Option<String> {
        self.workers
            .iter()
            .find(|(_, w)| w.ran(task_id))
            .map(|(id, _)| id.clone())
    }

    pub fn fleet_series(&self, window_ms: u64, now_ms: u64) -> Vec<SeriesPoint> {
        self.fleet.series(now_ms, window_ms)
    }

    pub fn snapshot(&self, now_ms: u64) -> FleetSnapshot {
        // Sorted by id before the views are built: a view is hundreds of bytes, and a sort
        // of 10,000 of them spent most of its time moving them (a fifth of a snapshot).
        let mut sorted: Vec<(&String, &Worker)> = self.workers.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let workers: Vec<WorkerView> = sorted
            .into_iter()
            .map(|(_, w)| self.worker_view(w, now_ms))
            .collect();
        let Counted {
            states,
            busy,
            lost_workers,
            pools,
        } = self.count_by_state_and_pool(&workers, now_ms);
        let hour = self.fleet.total(now_ms, 60 * MINUTE);
        let five = self.fleet.total(now_ms, 5 * MINUTE);
        let last_min = self.fleet.total(now_ms, MINUTE);
        let burn = five.cost_usd * 12.0;
        let ops = five.llm_calls + five.tool_calls + five.tasks;
        let (slices, slice_totals) = self.slices.view(now_ms);
        let (tool_failures, tools_tracked) = self.bursts.view(now_ms);
        FleetSnapshot {
            fleet: FleetView {
                at_ms: now_ms,
                workers: workers.len() as u64,
                lost: lost_workers.len() as u64,
                states,
                parallel_agents: busy,
                input_tokens_per_s: last_min.input_tokens as f64 / 60.0,
                output_tokens_per_s: last_min.output_tokens as f64 / 60.0,
                tasks_per_min: last_min.tasks,
                burn_rate_usd_per_h: burn,
                projected_monthly_usd: burn * 24.0 * 30.0,
                cost_last_hour_usd: hour.cost_usd,
                error_rate_5m: (ops > 0).then(|| five.errors as f64 / ops as f64),
                ops_5m: ops,
                series_10s: self
                    .fleet
                    .series(now_ms, 60 * MINUTE)
                    .iter()
                    .map(|p| view::TenSeconds {
                        ops: p.llm_calls + p.tool_calls + p.tasks,
                        errors: p.errors,
                        output_tokens: p.output_tokens,
                    })
                    .collect(),
                models: self.model_shares(now_ms),
                task_types: self.task_type_views(now_ms),
                attributions: self.attribution_views(now_ms),
                lost_workers,
            },
            pools: pools.into_values().collect(),
            workers,
            slices,
            slice_totals,
            tool_failures,
            tools_tracked,
            prints: self.prints.view(),
        }
    }

    /// Workers per state (lost ones apart), how many are busy, and each pool's view.
    fn count_by_state_and_pool(&self, workers: &[WorkerView], now_ms: u64) -> Counted {
        let mut states: BTreeMap<&'static str, u64> =
            State::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        let mut lost_workers = Vec::new();
        let mut pools: BTreeMap<String, PoolView> = self
            .pools
            .iter()
            .map(|(name, p)| (name.clone(), p.view(name, now_ms)))
            .collect();
        let mut busy = 0;
        for w in workers {
            if w.lost {
                lost_workers.push(w.id.clone());
            } else {
                *states.entry(w.state.as_str()).or_default() += 1;
                if w.state.is_busy() {
                    busy += 1;
                }
            }
            if let Some(pool) = w.pool.as_deref()
                && let Some(p) = pools.get_mut(pool)
            {
                p.count(w);
            }
        }
        for p in pools.values_mut() {
            p.utilisation = (p.workers > 0).then(|| p.active as f64 / p.workers as f64);
        }
        Counted {
            states,
            busy,
            lost_workers,
            pools,
        }
    }

    /// Calls, tokens, cost and latency per model over the last hour.
    fn model_shares(&self, now_ms: u64) -> Vec<ModelShare> {
        let reg = self.registry.in_force();
        let by_model = self.costs.query(now_ms, 60 * MINUTE, &[Dim::Model]);
        let total_calls: u64 = by_model.iter().map(|r| r.cell.calls).sum();
        by_model
            .into_iter()
            .filter_map(|r| {
                let model = r.group.get("model").cloned().flatten()?;
                Some(ModelShare {
                    unknown: reg.lookup(&model).is_none(),
                    calls: r.cell.calls,
                    share: if total_calls == 0 {
                        0.0
                    } else {
                        r.cell.calls as f64 / total_calls as f64
                    },
                    input_tokens: r.cell.input_tokens,
                    output_tokens: r.cell.output_tokens,
                    cost_usd: r.cell.cost_usd,
                    latency_ms: self
                        .model_latency
                        .get(&model)
                        .map(|s| s.percentiles(now_ms))
                        .unwrap_or_default(),
                    model,
                })
            })
            .collect()
    }

    /// Duration, cost and depth percentiles and baselines per task type, by name.
    fn task_type_views(&self, now_ms: u64) -> Vec<TaskTypeView> {
        let mut task_types: Vec<TaskTypeView> = self
            .task_types
            .iter()
            .map(|(name, t)| {
                let duration = t.duration.percentiles(now_ms);
                let (cost_recent_usd, cost_earlier_usd) = t.cost.split(now_ms, 2);
                let (duration_recent_ms, duration_earlier_ms) = t.duration.split(now_ms, 2);
                let (tokens_recent, tokens_earlier) = t.tokens.split(now_ms, 2);
                TaskTypeView {
                    tokens: t.tokens.percentiles(now_ms),
                    tokens_recent,
                    tokens_earlier,
                    cost_recent_usd,
                    cost_earlier_usd,
                    duration_recent_ms,
                    duration_earlier_ms,
                    task_type: name.clone(),
                    tasks: duration.count,
                    cost_usd: t.cost.percentiles(now_ms),
                    depth: t.depth.percentiles(now_ms),
                    duration_ms: duration,
                    baseline_duration_ms: t.expected_ms(),
                    baseline_output_tokens_per_s: t.baseline_tps,
                }
            })
            .collect();
        task_types.sort_by(|a, b| a.task_type.cmp(&b.task_type));
        task_types
    }

    /// Cost and tokens per run by attribution value; values with no run for an hour are
    /// left out.
    fn attribution_views(&self, now_ms: u64) -> Vec<AttributionView> {
        let mut out: Vec<AttributionView> = ATTRIBUTION_DIMENSIONS
            .into_iter()
            .zip(&self.attributions)
            .flat_map(|(dimension, map)| map.iter().map(move |(value, a)| (dimension, value, a)))
            .filter_map(|(dimension, value, a)| {
                let tokens = a.tokens.percentiles(now_ms);
                if tokens.count == 0 {
                    return None;
                }
                let (cost_recent_usd, cost_earlier_usd) = a.cost.split(now_ms, 2);
                let (tokens_recent, tokens_earlier) = a.tokens.split(now_ms, 2);
                Some(AttributionView {
                    dimension,
                    value: value.clone(),
                    runs: tokens.count,
                    cost_usd: a.cost.percentiles(now_ms),
                    tokens,
                    cost_recent_usd,
                    cost_earlier_usd,
                    tokens_recent,
                    tokens_earlier,
                })
            })
            .collect();
        out.sort_by(|a, b| (a.dimension, &a.value).cmp(&(b.dimension, &b.value)));
        out
    }
}

/// The receiving ends of a detached handle's channels (kept so the channels stay open).
#[cfg(test)]
pub(crate) type DetachedReceivers = (
    mpsc::Receiver<Ingest>,
    mpsc::Receiver<TaskEvent>,
    mpsc::Receiver<Query>,
);

/// The owner's inbox and the readers' snapshot.
#[derive(Clone, Debug)]
pub struct FleetHandle {
    ingest: mpsc::Sender<Ingest>,
    tasks: mpsc::Sender<TaskEvent>,
    queries: mpsc::Sender<Query>,
    snapshot: Arc<ArcSwap<FleetSnapshot>>,
    pub counters: Arc<StateCounters>,
}

/// Why a heartbeat is dropped, if it is: figures no worker can have would skew routing
/// (a pool whose capacity is four billion always looks idle) and the context detector,
/// and an id that is not a subject token could not be addressed (docs/protocol.md §5.3).
pub fn heartbeat_problem(hb: &Heartbeat) -> Option<String> {
    use fleet_worker::protocol::{MAX_IN_FLIGHT, is_subject_token};
    // Shown clipped: the id came from outside and may be as long as the message.
    let shown = |s: &str| s.chars().take(64).collect::<String>();
    if !is_subject_token(&hb.worker_id) {
        let id = shown(&hb.worker_id);
        return Some(format!("worker_id {id:?} is not a subject token"));
    }
    if !is_subject_token(&hb.pool) {
        let pool = shown(&hb.pool);
        return Some(format!("pool {pool:?} is not a subject token"));
    }
    if hb.max_in_flight > MAX_IN_FLIGHT {
        return Some(format!(
            "max_in_flight {} is over {MAX_IN_FLIGHT}",
            hb.max_in_flight
        ));
    }
    match hb.context_tokens {
        Some(t) if t > crate::domain::MAX_TOKENS_PER_REPORT => Some(format!(
            "context_tokens {t} is over {}",
            crate::domain::MAX_TOKENS_PER_REPORT
        )),
        _ => None,
    }
}

/// Why telemetry was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OfferError {
    #[error("the telemetry queue is full")]
    Full,
    #[error("the fleet state owner has stopped")]
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("the fleet state owner is busy; retry")]
    Busy,
    #[error("the fleet state owner has stopped")]
    Closed,
}

impl FleetHandle {
    /// A handle with no owner behind it, for tests of what transports do when the owner
    /// falls behind: the receivers are returned so the channels stay open.
    #[cfg(test)]
    pub(crate) fn detached(queue_batches: usize) -> (Self, DetachedReceivers) {
        let (ingest, a) = mpsc::channel(queue_batches);
        let (tasks, b) = mpsc::channel(16);
        let (queries, c) = mpsc::channel(1);
        (
            Self {
                ingest,
                tasks,
                queries,
                snapshot: Arc::new(ArcSwap::from_pointee(FleetSnapshot::default())),
                counters: Arc::new(StateCounters::default()),
            },
            (a, b, c),
        )
    }

    /// Hands telemetry to the owner without waiting.
    pub fn offer(&self, ev: Ingest) -> Result<(), OfferError> {
        self.ingest.try_send(ev).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => OfferError::Full,
            mpsc::error::TrySendError::Closed(_) => OfferError::Closed,
        })
    }

    /// Tells the owner about the task path; never waits (dropped and counted when behind).
    pub fn task_event(&self, ev: TaskEvent) {
        if self.tasks.try_send(ev).is_err() {
            self.counters.task_events_dropped.inc();
        }
    }

    pub fn snapshot(&self) -> Arc<FleetSnapshot> {
        self.snapshot.load_full()
    }

    /// Puts a made-up snapshot in place (tests of its readers).
    #[cfg(test)]
    pub(crate) fn set_snapshot(&self, s: FleetSnapshot) {
        self.snapshot.store(Arc::new(s));
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Query,
    ) -> Result<T, QueryError> {
        let (tx, rx) = oneshot::channel();
        self.queries
            .send_timeout(make(tx), Duration::from_secs(2))
            .await
            .map_err(|_| QueryError::Busy)?;
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .map_err(|_| QueryError::Busy)?
            .map_err(|_| QueryError::Closed)
    }

    pub async fn worker(&self, id: String) -> Result<Option<WorkerDetail>, QueryError> {
        self.ask(|tx| Query::Worker(id, tx)).await
    }

    pub async fn task_worker(&self, task_id: String) -> Result<Option<String>, QueryError> {
        self.ask(|tx| Query::TaskWorker(task_id, tx)).await
    }

    pub async fn costs(&self, by: Vec<Dim>, window_ms: u64) -> Result<CostReport, QueryError> {
        self.ask(|reply| Query::Costs {
            by,
            window_ms,
            reply,
        })
        .await
    }

    pub async fn fleet_series(&self, window_ms: u64) -> Result<Vec<SeriesPoint>, QueryError> {
        self.ask(|reply| Query::FleetSeries { window_ms, reply })
            .await
    }
}

/// Tokens a metric reported, to book.
struct MetricTokens<'a> {
    usage: TokenUsage,
    entry: Option<&'a crate::registry::ModelEntry>,
    /// The model's name in the cost report.
    model: Option<&'a str>,
    /// The point's own time (bounded) and its arrival.
    at_ms: u64,
    now_ms: u64,
}

/// Books metric-reported tokens on the worker, the fleet series and the cost ledger (no
/// call is counted: a metric point is not a call).
fn book_metric_tokens(
    w: &mut Worker,
    fleet: &mut FleetRing,
    costs: &mut CostLedger,
    t: MetricTokens<'_>,
) {
    let cost = t.entry.map(|e| e.cost(&t.usage));
    w.apply_metric_tokens(t.usage.input, t.usage.output, cost, t.at_ms, t.now_ms);
    let f = fleet.at(t.at_ms);
    f.input_tokens += t.usage.input;
    f.output_tokens += t.usage.output;
    f.cost_usd += cost.unwrap_or(0.0);
    costs.book(
        t.at_ms,
        CostKeyRef {
            dims: &Dims::default(),
            task_type: None,
            pool: w.pool.as_deref(),
            model: t.model,
        },
        CostCell {
            cost_usd: cost.unwrap_or(0.0),
            input_tokens: t.usage.input,
            output_tokens: t.usage.output,
            calls: 0,
            unknown_cost_calls: u64::from(cost.is_none()),
        },
    );
}

/// Starts the owner. It stops when `stop` turns true. A panic while it applies an event
/// is caught by `supervisor`: the owner carries on with the state as it was, less the
/// batch in hand, and the queues stay open, so telemetry keeps flowing.
pub fn spawn(
    state: FleetState,
    queue_batches: usize,
    clock: Arc<dyn crate::domain::Clock>,
    stop: watch::Receiver<bool>,
    supervisor: crate::supervise::Supervisor,
) -> (FleetHandle, tokio::task::JoinHandle<()>) {
    let (ingest_tx, ingest_rx) = mpsc::channel(queue_batches.max(1));
    let (task_tx, task_rx) = mpsc::channel(65_536);
    let (query_tx, query_rx) = mpsc::channel(64);
    let mut state = state;
    state.watching_since(clock.now_ms());
    let snapshot = Arc::new(ArcSwap::from_pointee(state.snapshot(clock.now_ms())));
    let handle = FleetHandle {
        ingest: ingest_tx,
        tasks: task_tx,
        queries: query_tx,
        snapshot: snapshot.clone(),
        counters: state.counters.clone(),
    };
    // Once a second of fleet time (a lab's `[clock]` makes that more often).
    let mut tick = tokio::time::interval(Duration::from_secs(1).div_f64(clock.speed()));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let owner = Owner {
        clock,
        state,
        ingest_rx,
        task_rx,
        query_rx,
        snapshot,
        stop,
        tick,
        tasks_open: true,
    };
    let task = tokio::spawn(async move {
        supervisor
            .run_with_state("fleet", owner, |o| Box::pin(o.run()))
            .await;
    });
    (handle, task)
}

/// Everything the owner task holds; it outlives a panic inside [`Owner::run`].
struct Owner {
    /// Fleet time: what every window, rate and state timer is measured on.
    clock: Arc<dyn crate::domain::Clock>,
    state: FleetState,
    ingest_rx: mpsc::Receiver<Ingest>,
    task_rx: mpsc::Receiver<TaskEvent>,
    query_rx: mpsc::Receiver<Query>,
    snapshot: Arc<ArcSwap<FleetSnapshot>>,
    stop: watch::Receiver<bool>,
    tick: tokio::time::Interval,
    tasks_open: bool,
}

impl Owner {
    /// Serves until `stop` or until every ingest sender is gone.
    async fn run(&mut self) {
        let mut batch = Vec::with_capacity(64);
        let mut tasks = Vec::with_capacity(256);
        loop {
            tokio::select! {
                biased;
                _ = self.stop.changed() => break,
                _ = self.tick.tick() => {
                    let now = self.clock.now_ms();
                    self.state.tick(now);
                    self.snapshot.store(Arc::new(self.state.snapshot(now)));
                }
                Some(q) = self.query_rx.recv() => {
                    let now = self.clock.now_ms();
                    let state = &mut self.state;
                    match q {
                        Query::Worker(id, tx) => { let _ = tx.send(state.worker_detail(&id, now)); }
                        Query::Costs { by, window_ms, reply } => { let _ = reply.send(state.costs(&by, window_ms, now)); }
                        Query::FleetSeries { window_ms, reply } => { let _ = reply.send(state.fleet_series(window_ms, now)); }
                        Query::TaskWorker(task_id, reply) => { let _ = reply.send(state.worker_of_task(&task_id)); }
                    }
                }
                n = self.task_rx.recv_many(&mut tasks, 256), if self.tasks_open => {
                    if n == 0 { self.tasks_open = false; continue; }
                    let now = self.clock.now_ms();
                    for ev in tasks.drain(..) {
                        self.state.apply_task(ev, now);
                    }
                }
                n = self.ingest_rx.recv_many(&mut batch, 64) => {
                    if n == 0 { break; }
                    let now = self.clock.now_ms();
                    for ev in batch.drain(..) {
                        self.state.apply(ev, now);
                    }
                }
            }
        }
    }
}
