//! A worker: joins a pool, pulls tasks with bounded in-flight, runs the handler under the
//! task's trace context, publishes the result durably, then acks.
//!
//! Delivery is at-least-once (JetStream); the worker makes execution effectively once per
//! (task id, attempt): a message whose result is already in the results stream, looked up
//! on every delivery, is acked without running the handler again. When the lookup itself
//! fails the message is handed back (nak with a delay) rather than run blind.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::HeaderMap;
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::{self, AckKind, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::control::{Controls, Mode};
use crate::message::{
    ErrorInfo, Heartbeat, ResultStatus, Task, TaskResult, Timings, Usage, WorkerState, now_rfc3339,
};
use crate::protocol::{self, SCHEMA_VERSION, Subjects, header, headers, is_subject_token, kinds};
use crate::span::{AttrValue, ExportConfig, SpanExporter, SpanKind, SpanRecord};
use crate::telemetry::{LlmCall, TaskTelemetry};
use crate::trace::{Baggage, SpanId, TraceParent, parse_tracestate};

/// How a worker joins the fleet.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Pool to pull from (a subject token).
    pub pool: String,
    /// This worker's id, unique in the fleet (a subject token).
    pub worker_id: String,
    pub subjects: Subjects,
    /// Tasks run at once (1 to [`protocol::MAX_IN_FLIGHT`]); the worker never pulls more
    /// than it can start.
    pub max_in_flight: usize,
    pub heartbeat_interval: Duration,
    /// Redelivery timeout of the pool consumer; progress is signalled at a third of it.
    pub ack_wait: Duration,
    /// How long one pull request waits for tasks.
    pub fetch_expires: Duration,
    /// How long a finished task's result is published again while JetStream does not
    /// acknowledge it (a broker outage) before the task is handed back; the result is kept
    /// in memory and published, not recomputed, on the next delivery.
    pub result_retry_for: Duration,
    /// After the connection comes back, how long a task the broker stored before the
    /// outage waits before it may run here, when it has no result yet. A restarted
    /// nats-server can hand out again a task whose earlier delivery is still being finished
    /// by another worker (the delivery's state was lost in the crash); that worker stores
    /// its result within this time, and this delivery then finds it.
    pub reconnect_grace: Duration,
    /// Also pull tasks dispatched to this worker by name (`<prefix>.work.<pool>.<worker>`).
    pub targeted: bool,
    pub capabilities: Vec<String>,
    /// The model this worker's agent uses (heartbeats, and the usage span of handlers
    /// that report no LLM calls themselves).
    pub model: Option<String>,
    /// `gen_ai.provider.name` of that model (`openai`, `anthropic` …).
    pub provider: Option<String>,
    pub export: ExportConfig,
}

impl WorkerConfig {
    pub fn new(pool: impl Into<String>, worker_id: impl Into<String>) -> Self {
        Self {
            pool: pool.into(),
            worker_id: worker_id.into(),
            subjects: Subjects::default(),
            max_in_flight: 8,
            heartbeat_interval: Duration::from_secs(5),
            ack_wait: protocol::DEFAULT_ACK_WAIT,
            fetch_expires: Duration::from_secs(2),
            result_retry_for: Duration::from_secs(30),
            reconnect_grace: Duration::from_secs(2),
            targeted: true,
            capabilities: Vec::new(),
            model: None,
            provider: None,
            export: ExportConfig::default(),
        }
    }
}

/// What the handler gets: the task and the context it runs in.
#[derive(Clone, Debug)]
pub struct TaskContext {
    pub task: Task,
    pub task_id: String,
    /// Dispatch attempt (from `Fleet-Attempt`).
    pub attempt: u32,
    /// JetStream delivery count of this message (1 on first delivery).
    pub delivered: i64,
    /// The worker's own process span: create child spans and outgoing calls under it.
    pub span: TraceParent,
    /// The span this one continues (the commander's dispatch span), when the header was valid.
    pub parent_span_id: Option<SpanId>,
    pub tracestate: Option<String>,
    pub baggage: Baggage,
    /// Model chosen by the commander (`Fleet-Model`), if any.
    pub model: Option<String>,
    pub deadline: Option<SystemTime>,
    /// Report LLM and tool calls here: they become GenAI spans under the process span.
    pub telemetry: TaskTelemetry,
}

/// A successful handler outcome.
#[derive(Clone, Debug, Default)]
pub struct TaskOutput {
    pub output: serde_json::Value,
    pub usage: Option<Usage>,
}

/// A handler failure.
#[derive(Clone, Debug)]
pub struct TaskFailure {
    pub status: ResultStatus,
    pub error: ErrorInfo,
    pub usage: Option<Usage>,
}

impl TaskFailure {
    pub fn failed(code: &str, message: impl Into<String>) -> Self {
        Self {
            status: ResultStatus::Failed,
            error: ErrorInfo {
                code: code.into(),
                message: message.into(),
            },
            usage: None,
        }
    }
}

pub type HandlerResult = Result<TaskOutput, TaskFailure>;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("pool and worker id must be 1-128 letters, digits, '-' or '_'")]
    BadIdentity,
    #[error("max_in_flight must be 1-10000")]
    BadConcurrency,
    #[error("could not set up JetStream stream or consumer: {0}")]
    Setup(String),
}

/// Counters a worker keeps.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Handler runs started.
    pub started: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    /// Redeliveries acked without running because the result already existed.
    pub skipped_duplicates: AtomicU64,
    /// Messages naked back because the worker was stopping, paused or draining.
    pub returned_on_drain: AtomicU64,
    /// Results not acknowledged within `result_retry_for` (the message is naked for
    /// redelivery; the kept result is published then).
    pub result_publish_errors: AtomicU64,
    /// Deliveries answered by publishing a kept result again instead of running.
    pub results_republished: AtomicU64,
    /// Handler runs aborted by a `restart` command (their deliveries handed back).
    pub restarted: AtomicU64,
}

/// A running worker. [`WorkerHandle::shutdown`] drains it.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    stats: Arc<WorkerStats>,
}

impl WorkerHandle {
    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }

    pub fn stats_arc(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// Graceful drain: pull nothing new, finish what is in flight, publish a last heartbeat.
    pub async fn shutdown(self) -> Arc<WorkerStats> {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "worker task ended abnormally");
        }
        self.stats
    }
}

/// A result message as published: kept so it can be published again, not recomputed.
#[derive(Clone)]
struct ResultMessage {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

type Key = (String, u32);

/// Bounded memory of executions this worker finished, for redelivery dedup, with the
/// result messages of the most recent ones: a result the broker acknowledged and then lost
/// in a crash, or one it never acknowledged, is published again from here instead of
/// running the handler a second time.
struct Completed {
    order: VecDeque<Key>,
    results: HashMap<Key, Option<ResultMessage>>,
    capacity: usize,
    /// Keys whose message is still held, oldest first, and their total size.
    kept: VecDeque<Key>,
    kept_bytes: usize,
    kept_max_bytes: usize,
}

impl Completed {
    fn new(capacity: usize, kept_max_bytes: usize) -> Self {
        Self {
            order: VecDeque::new(),
            results: HashMap::new(),
            capacity,
            kept: VecDeque::new(),
            kept_bytes: 0,
            kept_max_bytes,
        }
    }

    /// Whether this process finished the execution, and its message if still held.
    fn get(&self, key: &Key) -> Option<Option<ResultMessage>> {
        self.results.get(key).cloned()
    }

    fn insert(&mut self, key: Key, msg: ResultMessage) {
        let size = msg.payload.len();
        match self.results.insert(key.clone(), Some(msg)) {
            None => {
                self.order.push_back(key.clone());
                self.kept.push_back(key);
            }
            Some(None) => self.kept.push_back(key),
            Some(Some(old)) => self.kept_bytes = self.kept_bytes.saturating_sub(old.payload.len()),
        }
        self.kept_bytes += size;
        while self.kept_bytes > self.kept_max_bytes
            && let Some(old) = self.kept.pop_front()
        {
            if let Some(slot) = self.results.get_mut(&old)
                && let Some(m) = slot.take()
            {
                self.kept_bytes = self.kept_bytes.saturating_sub(m.payload.len());
            }
        }
        while self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            if let Some(Some(m)) = self.results.remove(&old) {
                self.kept_bytes = self.kept_bytes.saturating_sub(m.payload.len());
            }
        }
    }
}

struct Shared<H> {
    config: WorkerConfig,
    /// The connection, for the server's `max_payload` (which a reconnect may change).
    client: async_nats::Client,
    js: jetstream::Context,
    results: stream::Stream,
    handler: H,
    exporter: SpanExporter,
    stats: Arc<WorkerStats>,
    completed: Mutex<Completed>,
    /// Executions between their checks and their ack, so a second delivery of one of
    /// them to this process waits instead of running alongside.
    in_hand: Mutex<HashSet<Key>>,
    restarts: Restarts,
    started_at: String,
    /// The tasks running now, and pause, drain, throttle and cancel as control commands
    /// set them.
    controls: Arc<Controls>,
}

/// What the worker knows about its connection coming back, for [`WorkerConfig::reconnect_grace`].
struct Restarts {
    connection: Arc<async_nats::Statistics>,
    work: stream::Stream,
    last: tokio::sync::Mutex<LastReconnect>,
    /// The connect count with no grace in force: a delivery on it needs no lock.
    quiet: AtomicU64,
}

struct LastReconnect {
    /// The client's connect count when last looked at.
    connects: u64,
    /// When a reconnect was noticed, and the last work-stream sequence the broker held then.
    since: Option<(Instant, u64)>,
}

impl Restarts {
    /// How long a delivery of work-stream sequence `seq` should wait before it may run, if
    /// the broker stored it before the connection last came back and the grace is not over.
    async fn wait_for(&self, seq: u64, grace: Duration) -> Option<Duration> {
        let connects = self.connection.connects.load(Ordering::Relaxed);
        if connects == self.quiet.load(Ordering::Relaxed) {
            return None;
        }
        let mut last = self.last.lock().await;
        if last.connects != connects {
            // Everything stored up to now predates this connection. Unknown: all of it.
            let held = tokio::time::timeout(Duration::from_secs(2), self.work.get_info())
                .await
                .ok()
                .and_then(Result::ok)
                .map_or(u64::MAX, |i| i.state.last_sequence);
            *last = LastReconnect {
                connects,
                since: Some((Instant::now(), held)),
            };
        }
        let Some((at, held)) = last.since else {
            self.quiet.store(last.connects, Ordering::Relaxed);
            return None;
        };
        match grace.checked_sub(at.elapsed()).filter(|l| !l.is_zero()) {
            Some(left) => (seq <= held).then_some(left),
            None => {
                self.quiet.store(last.connects, Ordering::Relaxed);
                None
            }
        }
    }
}

/// Entry point: `Worker::start(client, config, handler)`.
#[derive(Debug)]
pub struct Worker;

impl Worker {
    /// Creates the pool's streams and consumers if missing, then starts pulling.
    pub async fn start<H, Fut>(
        client: async_nats::Client,
        config: WorkerConfig,
        handler: H,
    ) -> Result<WorkerHandle, WorkerError>
    where
        H: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        if !is_subject_token(&config.pool) || !is_subject_token(&config.worker_id) {
            return Err(WorkerError::BadIdentity);
        }
        if !(1..=protocol::MAX_IN_FLIGHT as usize).contains(&config.max_in_flight) {
            return Err(WorkerError::BadConcurrency);
        }
        let js = jetstream::new(client.clone());
        let s = &config.subjects;
        let setup = |e: &dyn std::fmt::Display| WorkerError::Setup(e.to_string());
        let work = js
            .get_or_create_stream(s.work_stream_config())
            .await
            .map_err(|e| setup(&e))?;
        let results = js
            .get_or_create_stream(s.results_stream_config())
            .await
            .map_err(|e| setup(&e))?;
        let pool = work
            .get_or_create_consumer(
                &protocol::pool_consumer_name(&config.pool),
                s.pool_consumer_config(&config.pool, config.ack_wait),
            )
            .await
            .map_err(|e| setup(&e))?;
        let targeted = if config.targeted {
            let cfg = s.targeted_consumer_config(&config.pool, &config.worker_id, config.ack_wait);
            let name = cfg.durable_name.clone().unwrap_or_default();
            Some(
                work.get_or_create_consumer(&name, cfg)
                    .await
                    .map_err(|e| setup(&e))?,
            )
        } else {
            None
        };

        let (exporter, exporter_task) = start_exporter(&client, &config);
        // Subscribed before start returns, so a command sent right after is obeyed.
        let control = client
            .subscribe(s.control(&config.worker_id))
            .await
            .map_err(|e| setup(&e))?;
        let stats = Arc::new(WorkerStats::default());
        let shared = Arc::new(Shared {
            client: client.clone(),
            js,
            results,
            handler,
            exporter,
            stats: stats.clone(),
            completed: Mutex::new(Completed::new(100_000, KEPT_RESULT_BYTES)),
            in_hand: Mutex::new(HashSet::new()),
            restarts: {
                let connection = client.statistics();
                let connects = connection.connects.load(Ordering::Relaxed);
                Restarts {
                    connection,
                    last: tokio::sync::Mutex::new(LastReconnect {
                        connects,
                        since: None,
                    }),
                    quiet: AtomicU64::new(connects),
                    work,
                }
            },
            started_at: now_rfc3339(),
            controls: Arc::new(Controls::new()),
            config,
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            client,
            shared,
            (pool, targeted),
            control,
            stop_rx,
            exporter_task,
        ));
        Ok(WorkerHandle { stop, task, stats })
    }
}

/// The worker's span exporter, its resource naming the worker and its pool.
fn start_exporter(
    client: &async_nats::Client,
    config: &WorkerConfig,
) -> (SpanExporter, JoinHandle<()>) {
    let resource = vec![
        ("service.name".to_string(), AttrValue::from("fleet-worker")),
        (
            "service.instance.id".to_string(),
            AttrValue::from(config.worker_id.clone()),
        ),
        (
            "fleet.pool".to_string(),
            AttrValue::from(config.pool.clone()),
        ),
        (
            "fleet.worker.id".to_string(),
            AttrValue::from(config.worker_id.clone()),
        ),
    ];
    SpanExporter::start(
        client.clone(),
        config.subjects.telemetry(&config.pool, &config.worker_id),
        resource,
        config.export.clone(),
    )
}

async fn run<H, Fut>(
    client: async_nats::Client,
    shared: Arc<Shared<H>>,
    (pool, targeted): (PullConsumer, Option<PullConsumer>),
    control: async_nats::Subscriber,
    stop: watch::Receiver<bool>,
    exporter_task: JoinHandle<()>,
) where
    H: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let max = shared.config.max_in_flight;
    let permits = Arc::new(Semaphore::new(max));
    let heartbeat = tokio::spawn(heartbeats(client.clone(), shared.clone(), stop.clone()));
    let control = tokio::spawn(crate::control::listen(
        client.clone(),
        control,
        shared.config.worker_id.clone(),
        shared.controls.clone(),
        stop.clone(),
    ));
    pull(
        &client,
        shared.clone(),
        pool,
        targeted,
        permits.clone(),
        stop,
    )
    .await;
    // Drained: every permit back means nothing is in flight.
    let _ = permits.acquire_many(max as u32).await;
    let _ = heartbeat.await;
    let _ = control.await;
    publish_heartbeat(&client, &shared, WorkerState::Draining).await;
    // Told to stop rather than left to the last drop: a handler may keep a clone of its
    // `TaskTelemetry` (and so of the exporter) in a task that outlives it.
    shared.exporter.shutdown();
    drop(shared);
    let _ = exporter_task.await;
    let _ = client.flush().await;
}

type PullConsumer = consumer::Consumer<consumer::pull::Config>;

/// One pull loop for both consumers, so they never compete for the same permits: take the
/// free permits, give targeted tasks first call (a no-wait fetch), then long-poll the pool
/// consumer for the rest. Never pulls more than can start now: bounded in-flight, fair
/// sharing with the pool's other workers, and no task waiting out its ack timer in a buffer.
async fn pull<H, Fut>(
    client: &async_nats::Client,
    shared: Arc<Shared<H>>,
    pool: PullConsumer,
    targeted: Option<PullConsumer>,
    permits: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let mut backoff = Duration::from_millis(100);
    let mut mode = shared.controls.watch_mode();
    loop {
        if *stop.borrow() || !obeyed(&shared.controls, &mut mode, &mut stop).await {
            return;
        }
        let first = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
            _ = mode.changed() => continue,
        };
        let mut held = vec![first];
        let extra = permits.available_permits();
        if shared.controls.tasks_per_s().is_none()
            && extra > 0
            && let Ok(more) = permits.clone().try_acquire_many_owned(extra as u32)
        {
            held.extend(split_permits(more));
        }
        if let Some(t) = &targeted {
            match t.fetch().max_messages(held.len()).messages().await {
                Ok(batch) => {
                    let limit = FETCH_LIMIT;
                    drain(client, &shared, batch, &mut held, &stop, limit).await;
                }
                Err(e) => tracing::debug!(error = %e, "targeted fetch failed"),
            }
            if held.is_empty() {
                continue;
            }
        }
        let batch = pool
            .batch()
            .max_messages(held.len())
            .expires(shared.config.fetch_expires)
            .messages()
            .await;
        let batch = match batch {
            Ok(b) => {
                backoff = Duration::from_millis(100);
                b
            }
            Err(e) => {
                tracing::warn!(error = %e, "pull request failed; retrying");
                drop(held);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let limit = shared.config.fetch_expires + FETCH_LIMIT;
        drain(client, &shared, batch, &mut held, &stop, limit).await;
    }
}

/// Waits while the worker is paused or draining, and for the next start under a throttle.
/// Returns false when the worker stops meanwhile.
async fn obeyed(
    controls: &Controls,
    mode: &mut watch::Receiver<Mode>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        if *mode.borrow_and_update() != Mode::Running {
            tokio::select! {
                _ = mode.changed() => continue,
                _ = stop.changed() => return false,
            }
        }
        // Under a throttle, ask for one task when it may start, not before.
        let Some(at) = controls.next_start() else {
            return true;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(at) => return true,
            // A pause or a new rate while waiting: look again.
            _ = mode.changed() => continue,
            _ = stop.changed() => return false,
        }
    }
}

/// Under a throttle, the longest a delivered task is held for its start; one due later is
/// handed back.
const THROTTLE_HOLD: Duration = Duration::from_millis(250);

/// The longest a pull request is waited on past its own expiry.
const FETCH_LIMIT: Duration = Duration::from_secs(2);
/// How often a pending pull request checks whether the connection was re-established.
const RECONNECT_CHECK: Duration = Duration::from_millis(100);

/// Starts the messages of one pull request until it ends. It is abandoned when the client
/// has reconnected since it was sent (a restarted nats-server never answers a request
/// that its predecessor held, so waiting would stall work until the client's own timer)
/// or after `limit`.
async fn drain<H, Fut, B>(
    client: &async_nats::Client,
    shared: &Arc<Shared<H>>,
    mut batch: B,
    held: &mut Vec<tokio::sync::OwnedSemaphorePermit>,
    stop: &watch::Receiver<bool>,
    limit: Duration,
) where
    H: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
    B: futures::Stream<Item = Result<jetstream::Message, async_nats::Error>> + Unpin,
{
    let stats = client.statistics();
    let connects = stats.connects.load(Ordering::Relaxed);
    let give_up = tokio::time::sleep(limit);
    tokio::pin!(give_up);
    let mut check = tokio::time::interval(RECONNECT_CHECK);
    loop {
        tokio::select! {
            msg = batch.next() => match msg {
                Some(Ok(msg)) => start_task(shared, msg, held, stop).await,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "pull batch ended");
                    return;
                }
                None => return,
            },
            _ = check.tick() => {
                if stats.connects.load(Ordering::Relaxed) != connects {
                    tracing::debug!("reconnected while a pull request was pending; asking again");
                    return;
                }
            }
            _ = &mut give_up => {
                tracing::debug!("pull request unanswered; asking again");
                return;
            }
        }
    }
}

/// Spawns the handling of one message with one of the held permits, or hands the message
/// back when draining.
async fn start_task<H, Fut>(
    shared: &Arc<Shared<H>>,
    msg: jetstream::Message,
    held: &mut Vec<tokio::sync::OwnedSemaphorePermit>,
    stop: &watch::Receiver<bool>,
) where
    H: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    if *stop.borrow() || shared.controls.mode() != Mode::Running {
        // Stopping, paused or draining: hand it straight back so another worker takes it now.
        let _ = msg.ack_with(AckKind::Nak(None)).await;
        shared
            .stats
            .returned_on_drain
            .fetch_add(1, Ordering::Relaxed);
        return;
    }
    let Some(permit) = held.pop() else {
        // The server sent more than asked for; never run unbounded.
        let _ = msg.ack_with(AckKind::Nak(None)).await;
        return;
    };
    match shared.controls.reserve_start(THROTTLE_HOLD) {
        Ok(None) => {}
        Ok(Some(at)) => tokio::time::sleep_until(at).await,
        Err(()) => {
            // Throttled since this pull was asked for: hand the rest back, not hold them.
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            return;
        }
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        handle(&shared, msg).await;
        drop(permit);
    });
}

/// Splits a multi-permit into single permits so each spawned task returns exactly one.
fn split_permits(
    mut p: tokio::sync::OwnedSemaphorePermit,
) -> Vec<tokio::sync::OwnedSemaphorePermit> {
    let mut out = Vec::new();
    while p.num_permits() > 1 {
        if let Some(one) = p.split(1) {
            out.push(one);
        } else {
            break;
        }
    }
    out.push(p);
    out
}

/// One delivery: read it, decide whether it may run here now, run it, settle it.
async fn handle<H, Fut>(shared: &Arc<Shared<H>>, msg: jetstream::Message)
where
    H: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let Some(work) = read_work(&msg).await else {
        return;
    };
    let Some(_in_hand) = may_run(shared, &msg, &work).await else {
        return;
    };
    execute(shared, msg, work).await;
}

/// A delivery's task and who it is.
struct Work {
    task: Task,
    task_id: String,
    attempt: u32,
    /// JetStream's delivery count of this message.
    delivered: i64,
}

impl Work {
    fn key(&self) -> Key {
        (self.task_id.clone(), self.attempt)
    }
}

/// The task of a work message; a message that is not one is terminated (a redelivery
/// would fail the same way).
async fn read_work(msg: &jetstream::Message) -> Option<Work> {
    let hdrs = msg.headers.as_ref();
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    let attempt = header(hdrs, headers::ATTEMPT)
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(1);
    let task = match serde_json::from_slice::<Task>(&msg.payload) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, subject = %msg.subject, "work message is not a task; terminating it");
            let _ = msg.ack_with(AckKind::Term).await;
            return None;
        }
    };
    let Some(task_id) = header(hdrs, headers::TASK_ID)
        .map(str::to_string)
        .or_else(|| task.id.clone())
        .filter(|id| is_subject_token(id))
    else {
        tracing::error!(subject = %msg.subject, "work message has no valid task id; terminating it");
        let _ = msg.ack_with(AckKind::Term).await;
        return None;
    };
    Some(Work {
        task,
        task_id,
        attempt,
        delivered,
    })
}

/// Whether this delivery may run the handler now; when not, it has been answered (acked,
/// its kept result published again, or handed back). The returned guard marks the
/// execution as in hand until dropped.
async fn may_run<'a, H>(
    shared: &'a Shared<H>,
    msg: &jetstream::Message,
    work: &Work,
) -> Option<InHand<'a>> {
    let (task_id, attempt, delivered) = (&work.task_id, work.attempt, work.delivered);
    let key = work.key();
    let ran_here = shared.completed.lock().ok().and_then(|c| c.get(&key));
    match (stored_result(shared, &key).await, ran_here) {
        (Prior::Stored, _) => {
            shared
                .stats
                .skipped_duplicates
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                task_id,
                attempt,
                delivered,
                "task already has a result for this attempt; acking without running"
            );
            let _ = msg.ack().await;
            return None;
        }
        (Prior::Missing, Some(Some(kept))) => {
            // This process ran it, but the results stream does not have the result: it was
            // never acknowledged, or a nats-server crash lost it. Publish it again.
            shared
                .stats
                .results_republished
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                task_id,
                attempt,
                delivered,
                "result missing from the results stream; publishing the kept result again instead of running the task"
            );
            settle(shared, msg, &kept, task_id).await;
            return None;
        }
        (Prior::Missing, Some(None)) => {
            tracing::warn!(
                task_id,
                attempt,
                "this worker ran the task, its result is gone from the results stream (lost in a broker crash) and no longer held here; running it again"
            );
        }
        (Prior::Missing, None) => {}
        (Prior::Unknown(e), _) => {
            // Running without knowing could run it twice; the broker hands it out again.
            tracing::info!(task_id, attempt, error = %e, "could not check for an earlier result; the task will be delivered again");
            let _ = msg.ack_with(AckKind::Nak(Some(UNKNOWN_PRIOR_RETRY))).await;
            return None;
        }
    }
    let Some(in_hand) = InHand::claim(&shared.in_hand, &key) else {
        tracing::info!(
            task_id,
            attempt,
            "this worker is already handling the task; the second delivery waits for its result"
        );
        let _ = msg.ack_with(AckKind::Nak(Some(UNKNOWN_PRIOR_RETRY))).await;
        return None;
    };
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    if let Some(wait) = shared
        .restarts
        .wait_for(seq, shared.config.reconnect_grace)
        .await
    {
        tracing::info!(
            task_id,
            attempt,
            wait_ms = wait.as_millis() as u64,
            "task stored before the broker came back and without a result yet; waiting out the reconnect grace in case another worker is finishing it"
        );
        let _ = msg.ack_with(AckKind::Nak(Some(wait))).await;
        return None;
    }
    Some(in_hand)
}

/// The trace a task runs under, from the work message's headers.
struct Trace {
    span: TraceParent,
    parent_span_id: Option<SpanId>,
    /// The refused `traceparent` and why.
    bad_traceparent: Option<String>,
    tracestate: Option<String>,
    baggage: Baggage,
}

/// Continues the trace from the dispatch span, or starts one and says why.
fn trace_of(hdrs: Option<&HeaderMap>) -> Trace {
    let (span, parent_span_id, bad_traceparent) = match header(hdrs, headers::TRACEPARENT) {
        Some(v) => match TraceParent::parse(v) {
            Ok(parent) => (parent.child(), Some(parent.span_id), None),
            Err(e) => (TraceParent::new_root(), None, Some(format!("{v:?}: {e}"))),
        },
        None => (TraceParent::new_root(), None, None),
    };
    let tracestate = parent_span_id
        .and_then(|_| header(hdrs, headers::TRACESTATE))
        .and_then(parse_tracestate);
    let baggage = header(hdrs, headers::BAGGAGE)
        .map(Baggage::parse)
        .unwrap_or_default();
    Trace {
        span,
        parent_span_id,
        bad_traceparent,
        tracestate,
        baggage,
    }
}

/// The process span of one execution, and the telemetry handle whose spans carry what
/// every span of the task carries (the live state attributes them by it).
fn process_span<H>(
    shared: &Shared<H>,
    msg: &jetstream::Message,
    work: &Work,
    trace: &Trace,
) -> (SpanRecord, TaskTelemetry) {
    let cfg = &shared.config;
    let mut span = SpanRecord::new(
        format!("process {}", cfg.subjects.work(&cfg.pool)),
        SpanKind::Consumer,
        trace.span.trace_id,
        trace.span.span_id,
    );
    span.parent_span_id = trace.parent_span_id;
    span.attr("messaging.system", "nats")
        .attr("messaging.operation.type", "process")
        .attr("messaging.operation.name", "process")
        .attr("messaging.destination.name", msg.subject.to_string())
        .attr(
            "messaging.consumer.group.name",
            protocol::pool_consumer_name(&cfg.pool),
        )
        .attr("fleet.task.id", work.task_id.clone())
        .attr("fleet.attempt", work.attempt)
        .attr("fleet.delivered", work.delivered)
        .attr("fleet.pool", cfg.pool.clone())
        .attr("fleet.worker.id", cfg.worker_id.clone());
    if let Some(bad) = &trace.bad_traceparent {
        span.attr("fleet.traceparent.invalid", bad.clone());
    }
    let mut common: Vec<(String, AttrValue)> =
        vec![("fleet.task.id".into(), work.task_id.clone().into())];
    if let Some(tt) = work.task.attributes.get("task_type") {
        common.push(("fleet.task.type".into(), tt.clone().into()));
    }
    if let Some(e) = work.task.expected_duration_s {
        common.push((
            "fleet.task.expected_duration_s".into(),
            AttrValue::Double(e),
        ));
    }
    for (k, v) in trace.baggage.iter() {
        common.push((k.to_string(), v.to_string().into()));
    }
    for (k, v) in &common[1..] {
        span.attributes.push((k.clone(), v.clone()));
    }
    let telemetry = TaskTelemetry::new(
        shared.exporter.clone(),
        trace.span.trace_id,
        trace.span.span_id,
        common,
    );
    (span, telemetry)
}

/// Runs the handler under the task's trace, builds the result, publishes it durably and
/// acks.
async fn execute<H, Fut>(shared: &Arc<Shared<H>>, msg: jetstream::Message, work: Work)
where
    H: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let cfg = &shared.config;
    let hdrs = msg.headers.as_ref();
    let trace = trace_of(hdrs);
    let model = header(hdrs, headers::MODEL).map(str::to_string);
    let reply_to = header(hdrs, headers::REPLY_TO)
        .filter(|r| protocol::is_publish_subject(r))
        .map(str::to_string);
    let replica = header(hdrs, headers::REPLICA)
        .filter(|r| protocol::is_subject_token(r))
        .map(str::to_string);
    let deadline = work.task.deadline_time();
    let (mut span, telemetry) = process_span(shared, &msg, &work, &trace);
    let key = work.key();
    let (task_id, attempt) = (work.task_id.clone(), work.attempt);
    let ctx = TaskContext {
        task: work.task,
        task_id: task_id.clone(),
        attempt,
        delivered: work.delivered,
        span: trace.span,
        parent_span_id: trace.parent_span_id,
        tracestate: trace.tracestate.clone(),
        baggage: trace.baggage.clone(),
        model: model.clone(),
        deadline,
        telemetry: telemetry.clone(),
    };

    let received_at = now_rfc3339();
    shared.stats.started.fetch_add(1, Ordering::Relaxed);
    let abort = shared.controls.started(&task_id);
    let started = Instant::now();
    let outcome = if deadline.is_some_and(|d| d <= SystemTime::now()) {
        Err(TaskFailure {
            status: ResultStatus::Cancelled,
            error: ErrorInfo {
                code: "deadline_exceeded".into(),
                message: "the deadline passed before the task started".into(),
            },
            usage: None,
        })
    } else {
        match run_handler(shared, &msg, ctx, abort).await {
            Ran::Done(outcome) => outcome,
            Ran::Restart(reason) => {
                shared.controls.finished(&task_id);
                restart(shared, &msg, &task_id, &reason, span).await;
                return;
            }
        }
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    shared.controls.finished(&task_id);

    let result = task_result(
        cfg,
        (&task_id, attempt),
        received_at,
        duration_ms,
        outcome,
        &mut span,
    );
    report_unreported_usage(cfg, &result, model, &span, &telemetry);

    let carry = Carry {
        span: &trace.span,
        tracestate: trace.tracestate.as_deref(),
        baggage: &trace.baggage,
        reply_to: reply_to.as_deref(),
        replica: replica.as_deref(),
    };
    let max_payload = shared.client.max_payload();
    let built = result_message(&cfg.subjects, &result, &carry).and_then(|message| {
        let size = wire_len(&message);
        if size <= max_payload {
            return Ok((result, message));
        }
        // JetStream can never store it: every try would be refused until the task is
        // dead-lettered, its work lost without a word on why.
        tracing::warn!(
            task_id,
            size,
            max_payload,
            "result larger than the server's max_payload; publishing a failed result instead"
        );
        let result = too_large(result, size, max_payload);
        span.error = result.error.as_ref().map(|e| e.message.clone());
        result_message(&cfg.subjects, &result, &carry).map(|m| (result, m))
    });
    match built {
        Ok((result, message)) => {
            if result.status == ResultStatus::Ok {
                shared.stats.completed.fetch_add(1, Ordering::Relaxed);
            } else {
                shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(mut c) = shared.completed.lock() {
                c.insert(key, message.clone());
            }
            if !settle(shared, &msg, &message, &task_id).await {
                span.error = Some("result not acknowledged by the results stream".into());
            }
        }
        Err(e) => {
            // Not expected (the id and reply subject were checked on arrival); handed back,
            // it ends as a dead letter with a reason once its deliveries run out.
            tracing::error!(error = %e, task_id, "result cannot be encoded; returning the task");
            span.error = Some(format!("result not encodable: {e}"));
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
    span.finish();
    shared.exporter.record(span);
}

/// A `restart`: the aborted run publishes no result; its delivery is handed back after
/// `RESTART_DELAY` (so another worker of the pool may pull it first), and JetStream
/// delivers it again, counted against the pool's `max_deliver` like any redelivery.
async fn restart<H>(
    shared: &Shared<H>,
    msg: &jetstream::Message,
    task_id: &str,
    reason: &str,
    mut span: SpanRecord,
) {
    tracing::warn!(
        task_id,
        reason,
        "restart: handler aborted, the task goes back to its pool"
    );
    shared.stats.restarted.fetch_add(1, Ordering::Relaxed);
    span.error = Some(format!("restarted: {reason}"));
    span.attr("fleet.task.restarted", true);
    let _ = msg.ack_with(AckKind::Nak(Some(RESTART_DELAY))).await;
    span.finish();
    shared.exporter.record(span);
}

/// How long a restarted task's delivery waits before JetStream offers it again.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// The result of one execution; a failure is also marked on the process span.
fn task_result(
    cfg: &WorkerConfig,
    (task_id, attempt): (&str, u32),
    received_at: String,
    duration_ms: u64,
    outcome: HandlerResult,
    span: &mut SpanRecord,
) -> TaskResult {
    let mut result = TaskResult {
        schema: SCHEMA_VERSION,
        task_id: task_id.to_string(),
        attempt,
        status: ResultStatus::Ok,
        output: serde_json::Value::Null,
        error: None,
        usage: None,
        timings: Timings {
            received_at: Some(received_at.clone()),
            started_at: Some(received_at),
            finished_at: Some(now_rfc3339()),
            duration_ms: Some(duration_ms),
        },
        worker_id: Some(cfg.worker_id.clone()),
        pool: Some(cfg.pool.clone()),
    };
    match outcome {
        Ok(out) => {
            result.output = out.output;
            result.usage = out.usage;
        }
        Err(f) => {
            span.error = Some(format!("{}: {}", f.error.code, f.error.message));
            span.attr("error.type", f.error.code.clone());
            result.status = f.status;
            result.error = Some(f.error);
            result.usage = f.usage;
        }
    }
    result
}

/// Usage the handler returned without reporting its calls becomes one LLM span, so the
/// commander can price it; reported calls are already spans (and are not counted twice).
fn report_unreported_usage(
    cfg: &WorkerConfig,
    result: &TaskResult,
    model: Option<String>,
    span: &SpanRecord,
    telemetry: &TaskTelemetry,
) {
    let Some(u) = &result.usage else {
        return;
    };
    if telemetry.totals().llm_calls != 0 || u.input_tokens + u.output_tokens == 0 {
        return;
    }
    let model_name = u
        .model
        .clone()
        .or(model)
        .or_else(|| cfg.model.clone())
        .unwrap_or_else(|| "unknown".into());
    let mut call = LlmCall::chat(
        cfg.provider.clone().unwrap_or_else(|| "unknown".into()),
        model_name,
    )
    .tokens(u.input_tokens, u.output_tokens);
    call.started = span.start;
    call.finished = SystemTime::now();
    telemetry.llm_call(&call);
}

/// How a handler's run ended.
enum Ran {
    /// With a result to publish.
    Done(HandlerResult),
    /// Aborted by a `restart` command (the reason): the delivery goes back, no result.
    Restart(String),
}

/// Runs the handler in its own task (a panic becomes a failed result, not a dead worker)
/// while telling JetStream we are still working on it. A `cancel` command aborts it: the
/// result is `cancelled`, with the command's reason; a `restart` aborts it with no result.
async fn run_handler<H, Fut>(
    shared: &Arc<Shared<H>>,
    msg: &jetstream::Message,
    ctx: TaskContext,
    mut abort: tokio::sync::oneshot::Receiver<crate::control::Abort>,
) -> Ran
where
    H: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let fut = (shared.handler)(ctx);
    let mut job = tokio::spawn(fut);
    let every = (shared.config.ack_wait / 3).max(Duration::from_millis(100));
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut abortable = true;
    loop {
        tokio::select! {
            reason = &mut abort, if abortable => {
                // Err: the sender was dropped without a cancel (nothing to obey).
                abortable = false;
                match reason {
                    Ok(crate::control::Abort::Cancel(reason)) => {
                        job.abort();
                        return Ran::Done(Err(TaskFailure {
                            status: ResultStatus::Cancelled,
                            error: ErrorInfo { code: "cancelled".into(), message: reason },
                            usage: None,
                        }));
                    }
                    Ok(crate::control::Abort::Restart(reason)) => {
                        job.abort();
                        return Ran::Restart(reason);
                    }
                    Err(_) => {}
                }
            }
            done = &mut job => {
                return Ran::Done(match done {
                    Ok(r) => r,
                    Err(e) if e.is_panic() => Err(TaskFailure::failed("handler_panicked", "the handler panicked")),
                    Err(e) => Err(TaskFailure::failed("handler_aborted", e.to_string())),
                });
            }
            _ = progress.tick() => {
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        }
    }
}

/// Durable result first, ack second: a crash in between means a redelivery that the check
/// on every delivery answers from the results stream (or from the kept message). Returns
/// whether the result was acknowledged.
async fn settle<H>(
    shared: &Shared<H>,
    msg: &jetstream::Message,
    result: &ResultMessage,
    task_id: &str,
) -> bool {
    match publish_with_retry(shared, result, msg).await {
        Ok(()) => {
            if let Err(e) = msg.ack().await {
                tracing::warn!(error = %e, task_id, "ack failed; a redelivery will be deduplicated");
            }
            true
        }
        Err(e) => {
            shared
                .stats
                .result_publish_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, task_id, "result not acknowledged; returning the task, whose next delivery publishes the kept result");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            false
        }
    }
}

/// An execution this process has in hand, released when dropped.
struct InHand<'a> {
    set: &'a Mutex<HashSet<Key>>,
    key: Key,
}

impl<'a> InHand<'a> {
    /// None when the key is in hand already.
    fn claim(set: &'a Mutex<HashSet<Key>>, key: &Key) -> Option<Self> {
        // A poisoned set (a panic while holding it) is treated as empty: at worst a run.
        let fresh = set
            .lock()
            .map(|mut s| s.insert(key.clone()))
            .unwrap_or(true);
        fresh.then(|| Self {
            set,
            key: key.clone(),
        })
    }
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(&self.key);
        }
    }
}

/// Whether a result for (task id, attempt) is in the results stream.
enum Prior {
    Stored,
    Missing,
    /// The check itself failed (the broker is restarting, a timeout).
    Unknown(String),
}

/// How long a task waits for its next delivery when the results stream could not be asked.
const UNKNOWN_PRIOR_RETRY: Duration = Duration::from_secs(1);

async fn stored_result<H>(shared: &Shared<H>, key: &(String, u32)) -> Prior {
    // Every delivery, not only redeliveries: a nats-server restarted after a crash can hand
    // out again, as a first delivery, a message whose result was stored and which was acked
    // just before the crash. One direct get per task keeps the handler from running twice.
    let subject = shared.config.subjects.result(&key.0);
    match shared.results.direct_get_last_for_subject(subject).await {
        Ok(prev) => {
            let prev_attempt =
                header(Some(&prev.headers), headers::ATTEMPT).and_then(|a| a.parse::<u32>().ok());
            if prev_attempt == Some(key.1) {
                Prior::Stored
            } else {
                Prior::Missing
            }
        }
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Prior::Missing,
        Err(e) => Prior::Unknown(e.to_string()),
    }
}

/// What travels from the work message onto the result message.
struct Carry<'a> {
    span: &'a TraceParent,
    tracestate: Option<&'a str>,
    baggage: &'a Baggage,
    reply_to: Option<&'a str>,
    /// The dispatching commander replica (`Fleet-Replica`).
    replica: Option<&'a str>,
}

/// What a result message counts against the server's `max_payload`.
fn wire_len(m: &ResultMessage) -> usize {
    protocol::wire_len(&m.headers, m.payload.len())
}

/// The result that replaces one the server cannot take: `failed`, `result_too_large`,
/// no output, and the usage the run cost (it was spent all the same).
fn too_large(result: TaskResult, size: usize, max_payload: usize) -> TaskResult {
    TaskResult {
        status: ResultStatus::Failed,
        output: serde_json::Value::Null,
        error: Some(ErrorInfo {
            code: "result_too_large".into(),
            message: format!(
                "the result is {size} bytes; the NATS server takes at most {max_payload} bytes per message (max_payload): return less, or store large output elsewhere and return a reference to it"
            ),
        }),
        ..result
    }
}

fn result_message(
    subjects: &Subjects,
    result: &TaskResult,
    carry: &Carry<'_>,
) -> Result<ResultMessage, String> {
    let Carry {
        span,
        tracestate,
        baggage,
        reply_to,
        replica,
    } = *carry;
    let payload = serde_json::to_vec(result).map_err(|e| e.to_string())?;
    let mut h = HeaderMap::new();
    let set = |h: &mut HeaderMap, k: &'static str, v: String| {
        protocol::set_known_header(h, k, v).map_err(|e| e.to_string())
    };
    set(&mut h, headers::TRACEPARENT, span.to_header())?;
    if let Some(ts) = tracestate {
        set(&mut h, headers::TRACESTATE, ts.to_string())?;
    }
    if !baggage.is_empty() {
        set(&mut h, headers::BAGGAGE, baggage.to_header())?;
    }
    set(&mut h, headers::TASK_ID, result.task_id.clone())?;
    set(&mut h, headers::ATTEMPT, result.attempt.to_string())?;
    set(
        &mut h,
        headers::NATS_MSG_ID,
        format!("{}:{}:result", result.task_id, result.attempt),
    )?;
    if let Some(r) = reply_to {
        set(&mut h, headers::REPLY_TO, r.to_string())?;
    }
    if let Some(r) = replica {
        set(&mut h, headers::REPLICA, r.to_string())?;
    }
    Ok(ResultMessage {
        subject: subjects.result(&result.task_id),
        headers: h,
        payload: Bytes::from(payload),
    })
}

/// Bytes of recent result messages a worker keeps to publish again (see [`Completed`]).
const KEPT_RESULT_BYTES: usize = 64 * 1024 * 1024;

/// Publishes a result until JetStream acknowledges it, for up to `retry_for`: an outage
/// shorter than that costs a wait, not a second run. Each try is the same message (same
/// `Nats-Msg-Id`), and the work message is kept from redelivery meanwhile.
async fn publish_with_retry<H>(
    shared: &Shared<H>,
    result: &ResultMessage,
    work: &jetstream::Message,
) -> Result<(), String> {
    let deadline = Instant::now() + shared.config.result_retry_for;
    let mut backoff = Duration::from_millis(100);
    let connection = &shared.restarts.connection;
    loop {
        let connects = connection.connects.load(Ordering::Relaxed);
        let tried = async {
            let ack = shared
                .js
                .publish_with_headers(
                    result.subject.clone(),
                    result.headers.clone(),
                    result.payload.clone(),
                )
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map(|_| ()).map_err(|e| e.to_string())
        };
        // A publish sent just before the connection dropped is never acknowledged; waiting
        // out the PubAck timeout would leave the task looking unfinished to other workers.
        let reconnected = async {
            let mut check = tokio::time::interval(RECONNECT_CHECK);
            while connection.connects.load(Ordering::Relaxed) == connects {
                check.tick().await;
            }
        };
        let outcome = tokio::select! {
            r = tried => r,
            () = reconnected => Err("the connection was re-established".to_string()),
        };
        match outcome {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() + backoff >= deadline => return Err(e),
            Err(e) => {
                tracing::info!(error = %e, subject = %result.subject, "result not acknowledged yet; publishing it again");
                let _ = work.ack_with(AckKind::Progress).await;
                if connection.connects.load(Ordering::Relaxed) == connects {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

async fn heartbeats<H>(
    client: async_nats::Client,
    shared: Arc<Shared<H>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(shared.config.heartbeat_interval);
    let mut mode = shared.controls.watch_mode();
    loop {
        tokio::select! {
            // A pause, drain or resume is told at once, so routing stops (or starts) at once.
            Ok(()) = mode.changed() => tick.reset_immediately(),
            _ = tick.tick() => {
                let state = match shared.controls.mode() {
                    Mode::Paused => WorkerState::Paused,
                    Mode::Draining => WorkerState::Draining,
                    Mode::Running if shared.controls.running_tasks().is_empty() => WorkerState::Idle,
                    Mode::Running => WorkerState::Active,
                };
                publish_heartbeat(&client, &shared, state).await;
            }
            _ = stop.changed() => {
                publish_heartbeat(&client, &shared, WorkerState::Draining).await;
                return;
            }
        }
    }
}

async fn publish_heartbeat<H>(client: &async_nats::Client, shared: &Shared<H>, state: WorkerState) {
    let cfg = &shared.config;
    let hb = Heartbeat {
        schema: SCHEMA_VERSION,
        worker_id: cfg.worker_id.clone(),
        pool: cfg.pool.clone(),
        state,
        model: cfg.model.clone(),
        current_tasks: shared.controls.running_tasks(),
        max_in_flight: cfg.max_in_flight as u32,
        context_tokens: None,
        capabilities: cfg.capabilities.clone(),
        completed: shared.stats.completed.load(Ordering::Relaxed),
        failed: shared.stats.failed.load(Ordering::Relaxed),
        sdk_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        started_at: shared.started_at.clone(),
        sent_at: now_rfc3339(),
    };
    let Ok(payload) = serde_json::to_vec(&hb) else {
        return;
    };
    let mut h = HeaderMap::new();
    h.insert(headers::KIND, kinds::HEARTBEAT);
    h.insert(headers::CONTENT_TYPE, "application/json");
    if let Err(e) = client
        .publish_with_headers(
            cfg.subjects.telemetry(&cfg.pool, &cfg.worker_id),
            h,
            payload.into(),
        )
        .await
    {
        tracing::debug!(error = %e, "heartbeat not published");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(bytes: usize) -> ResultMessage {
        ResultMessage {
            subject: "fleet.results.t".into(),
            headers: HeaderMap::new(),
            payload: Bytes::from(vec![b'x'; bytes]),
        }
    }

    fn key(i: u32) -> Key {
        (format!("t{i}"), 1)
    }

    /// A result carries on what the commander needs of its work message: where the
    /// producer wants it, and which commander replica dispatched the run.
    #[test]
    fn a_result_carries_the_reply_subject_and_the_dispatching_replica() {
        let span = TraceParent::new_root();
        let baggage = Baggage::new();
        let result = TaskResult::rejected("t-1", "x", "x");
        let carry = Carry {
            span: &span,
            tracestate: None,
            baggage: &baggage,
            reply_to: Some("_INBOX.p"),
            replica: Some("0123456789abcdef"),
        };
        let m = result_message(&Subjects::default(), &result, &carry).unwrap();
        assert_eq!(m.subject, "fleet.results.t-1");
        assert_eq!(
            header(Some(&m.headers), headers::REPLY_TO),
            Some("_INBOX.p")
        );
        assert_eq!(
            header(Some(&m.headers), headers::REPLICA),
            Some("0123456789abcdef")
        );
        let carry = Carry {
            reply_to: None,
            replica: None,
            ..carry
        };
        let m = result_message(&Subjects::default(), &result, &carry).unwrap();
        assert_eq!(header(Some(&m.headers), headers::REPLICA), None);
    }

    /// The size checked against `max_payload` is the one the server counts for `HPUB`:
    /// the header block as sent and the payload.
    #[test]
    fn a_message_s_wire_length_counts_its_header_block() {
        let mut m = message(100);
        assert_eq!(wire_len(&m), 100, "no headers: sent without a header block");
        m.headers.insert("Fleet-Task-Id", "t-1");
        m.headers.append("Fleet-Attempt", "2");
        let block = "NATS/1.0\r\nFleet-Task-Id: t-1\r\nFleet-Attempt: 2\r\n\r\n";
        assert_eq!(wire_len(&m), 100 + block.len());
    }

    #[test]
    fn kept_results_are_bounded_by_bytes_and_keys_by_count() {
        let mut c = Completed::new(4, 250);
        for i in 0..3 {
            c.insert(key(i), message(100));
        }
        // 300 bytes > 250: the oldest message is let go, its key is still known.
        assert!(matches!(c.get(&key(0)), Some(None)));
        assert!(matches!(c.get(&key(1)), Some(Some(_))));
        assert!(matches!(c.get(&key(2)), Some(Some(_))));
        assert_eq!(c.kept_bytes, 200);
        for i in 3..6 {
            c.insert(key(i), message(10));
        }
        // Six keys > 4: the two oldest are forgotten.
        assert!(c.get(&key(0)).is_none());
        assert!(c.get(&key(1)).is_none());
        assert_eq!(c.order.len(), 4);
        assert_eq!(c.kept_bytes, 100 + 30);
    }

    #[test]
    fn keeping_the_same_result_twice_counts_it_once() {
        let mut c = Completed::new(10, 1_000);
        c.insert(key(1), message(100));
        c.insert(key(1), message(100));
        assert_eq!(c.kept_bytes, 100);
        assert_eq!(c.order.len(), 1);
    }
}
