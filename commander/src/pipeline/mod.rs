//! The task path inside the commander: intake → route → dispatch, and results → producer.
//!
//! Both loops work in batches: read what is ready (up to `batch_size`), do the work, make
//! the store durable once, then ack the whole batch. A crash anywhere before the ack means
//! JetStream redelivers, and every step is idempotent (store updates never go backwards;
//! the work and results streams drop repeated `Nats-Msg-Id`s).

pub mod cancel;
pub mod deadletter;
pub mod intake;
pub mod notices;
mod plan;
pub mod release;
pub mod results;
pub mod retarget;
pub mod stubs;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use fleet_worker::protocol::Subjects;
use fleet_worker::span::SpanExporter;
use futures::StreamExt;
use tokio::sync::watch;

use crate::classify::Classifier;
use crate::decisions::{DecisionLog, DecisionRecord};
use crate::fleet::FleetHandle;
use crate::metrics::{DecisionLabels, Metrics};
use crate::route::{RouteSnapshot, RoutingTable};
use crate::store::Store;

/// What the task path and the API share: the store, the live fleet state, the decision
/// log, the classifier and the policy engine (with the one live snapshot). Nothing here
/// talks to NATS, so the API can be built, and tested, without a broker.
#[derive(Clone, Debug)]
pub struct Core {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// Live state: told about dispatches and results (never waited on).
    pub fleet: FleetHandle,
    pub classifier: Arc<Classifier>,
    pub decisions: DecisionLog,
    /// The live snapshot (routing table, registry, rubric, policy), the budget ledger and
    /// the deferred queue.
    pub policy: Arc<crate::policy::PolicyEngine>,
    /// The routing view of the latest fleet snapshot, rebuilt when a new one appears.
    pub route_cache: Arc<std::sync::Mutex<Option<Arc<RouteSnapshot>>>>,
    /// Kept traces (when `[traces] enabled`) and the marks that keep a trace.
    pub traces: crate::traces::Traces,
    /// This commander replica ([`crate::store::Store::replica_id`]): named on every work
    /// message and result it publishes (`Fleet-Replica`), so that with several replicas the
    /// one that dispatched a run knows its result for its own.
    pub replica: Arc<str>,
}

impl Core {
    /// The routing view of the current fleet snapshot under `table` (the routing table of
    /// the live snapshot; fixed while the commander runs, so the cache is keyed by the
    /// fleet snapshot alone): rebuilt at most once per fleet snapshot, i.e. once a second,
    /// whatever the fleet size.
    pub fn route_snapshot(&self, table: &RoutingTable) -> Arc<RouteSnapshot> {
        let fleet = self.fleet.snapshot();
        let Ok(mut cache) = self.route_cache.lock() else {
            return Arc::new(RouteSnapshot::build(&fleet, table));
        };
        match cache.as_ref() {
            Some(s) if s.at_ms == fleet.fleet.at_ms => s.clone(),
            _ => {
                let s = Arc::new(RouteSnapshot::build(&fleet, table));
                *cache = Some(s.clone());
                s
            }
        }
    }
}

/// What both loops share: the [`Core`] and the task path's side of NATS.
#[derive(Debug)]
pub struct Ctx {
    pub core: Core,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub subjects: Subjects,
    pub spans: SpanExporter,
    /// Publish decisions on `<prefix>.decisions.<pool>`.
    pub publish_decisions: bool,
    /// Prefixes a `Fleet-Reply-To` subject may start with (`intake.reply_prefixes`).
    pub reply_prefixes: Vec<String>,
    /// Targeted dispatches in flight, watched for a worker that is gone.
    pub targets: retarget::Targets,
    /// `intake.ack_wait_secs`: batches in hand send progress every third of it.
    pub intake_ack_wait: std::time::Duration,
    /// Tasks each throttle may hold back in the intake stream at once (a quarter of the
    /// intake consumer's window); past it, held-back tasks are parked.
    pub throttle_inline_cap: usize,
    /// The `<prefix>_notices` bucket: budget notices sent once for the fleet (`notices`).
    pub notices: async_nats::jetstream::kv::Store,
}

impl Ctx {
    /// Why the commander must not publish to `subject` given as `Fleet-Reply-To`, if so.
    pub fn reply_problem(&self, subject: &str) -> Option<String> {
        fleet_worker::protocol::reply_subject_problem(
            subject,
            &self.reply_prefixes,
            self.subjects.prefix(),
        )
    }

    /// Writes a batch's decisions to the log (durable with the batch's store flush) and
    /// counts them, before the task records that name them are written. Gives back each
    /// decision's JSON, in order, for [`Ctx::announce_decisions`] to publish: one encoding
    /// serves both (`None` where a decision did not encode, so was neither logged nor
    /// will be published).
    pub fn log_decisions(&self, decisions: &[&DecisionRecord]) -> Vec<Option<Bytes>> {
        if decisions.is_empty() {
            return Vec::new();
        }
        let json: Vec<Option<Bytes>> = decisions
            .iter()
            .map(|d| match crate::decisions::to_json(d) {
                Ok(j) => Some(j),
                Err(e) => {
                    tracing::error!(task_id = %d.task_id, error = %e, "decision did not encode; not logged");
                    None
                }
            })
            .collect();
        let encoded = decisions
            .iter()
            .zip(&json)
            .filter_map(|(d, j)| Some((*d, &j.as_ref()?[..])));
        if let Err(e) = self.core.decisions.write_many(encoded) {
            tracing::error!(error = %e, count = decisions.len(), "decisions not logged");
        }
        // Counted per distinct label set per batch: one label allocation each, not per task.
        let mut counts: rustc_hash::FxHashMap<(&str, &str, &str), u64> = Default::default();
        for d in decisions {
            let key = (
                d.pool.as_deref().unwrap_or("none"),
                d.model.as_deref().unwrap_or("none"),
                d.rule.as_str(),
            );
            *counts.entry(key).or_default() += 1;
        }
        for ((pool, model, rule), n) in counts {
            self.core
                .metrics
                .decisions
                .get_or_create(&DecisionLabels {
                    pool: pool.into(),
                    model: model.into(),
                    rule: rule.into(),
                })
                .inc_by(n);
        }
        json
    }

    /// Announces a batch's logged decisions once their task records are written: on
    /// `/v1/stream`, and on `<prefix>.decisions.<pool>` as the JSON the log holds.
    pub async fn announce_decisions(&self, decided: &[Decided]) {
        self.core
            .decisions
            .announce(decided.iter().map(|d| &d.record));
        if !self.publish_decisions {
            return;
        }
        for d in decided {
            // One that did not encode was not logged either (said when it was).
            let Some(body) = &d.json else {
                continue;
            };
            let pool = d
                .record
                .pool
                .as_deref()
                .unwrap_or(crate::decisions::REJECTED_TOKEN);
            if let Err(e) = self
                .client
                .publish(self.subjects.decisions(pool), body.clone())
                .await
            {
                tracing::debug!(error = %e, "decision not published");
            }
        }
    }
}

/// A decision of a batch, logged, with the JSON the log's page holds ([`Ctx::log_decisions`]):
/// what [`Ctx::announce_decisions`] announces.
#[derive(Debug)]
pub struct Decided {
    pub record: DecisionRecord,
    pub json: Option<Bytes>,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("NATS: {0}")]
    Nats(String),
}

/// Batches a loop works on at once. More than one lets the next batch be read and planned
/// while the previous one waits for its PubAcks and its store flush; the order in which
/// batches finish does not matter, because every step is idempotent. Each batch is a task
/// of its own, so one batch's synchronous store writes never hold up another's PubAcks:
/// they run on the runtime's other thread.
const BATCHES_IN_FLIGHT: usize = 4;

/// PubAcks the release loop (and the hand-over at shutdown) awaits at once at most: it
/// publishes a pass this many at a time.
pub(crate) const RELEASE_WINDOW: usize = 1_000;

/// Publishes awaiting their PubAck at once, at most, beyond the intake's batches: the
/// release loop's window, and the publishers that await each PubAck before the next
/// (cancels, retargets, dead letters, budget notices), with room to spare.
const OTHER_PENDING_ACKS: usize = RELEASE_WINDOW + 1_024;

/// The bound to give the task path's JetStream context (`max_ack_inflight`). Every
/// publish awaiting its PubAck holds one of the context's permits until it is awaited or
/// dropped, and a publish past the bound waits for one: a publisher that holds more
/// than the bound waits for ever, and every other publisher of the context with it. Each
/// intake batch publishes all its dispatches and rejections before it awaits any (up to
/// `intake.batch_size` each, [`BATCHES_IN_FLIGHT`] batches at once), so the bound is
/// worked out from the batch size. (async-nats' default, 5,000, stalled the whole task
/// path once intake batches or a release pass held more.)
pub fn max_pending_acks(batch_size: usize) -> usize {
    BATCHES_IN_FLIGHT
        .saturating_mul(batch_size)
        .saturating_add(OTHER_PENDING_ACKS)
}

/// Reads batches from a pull consumer and hands each to `work` until shutdown, with up to
/// [`BATCHES_IN_FLIGHT`] running at once; on shutdown, the batches in hand are finished
/// (and acked) first. Survives stream errors (server restarts, missed heartbeats) by
/// re-subscribing with backoff.
pub async fn consume_batches<F, Fut>(
    name: &'static str,
    consumer: consumer::Consumer<consumer::pull::Config>,
    batch_size: usize,
    mut shutdown: watch::Receiver<bool>,
    mut work: F,
) where
    F: FnMut(Vec<jetstream::Message>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Duration::from_millis(100);
    let mut in_flight: futures::stream::FuturesUnordered<tokio::task::JoinHandle<()>> =
        futures::stream::FuturesUnordered::new();
    'outer: loop {
        if *shutdown.borrow() {
            while in_flight.next().await.is_some() {}
            return;
        }
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch_size)
            .expires(Duration::from_secs(30))
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await;
        let messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(loop_name = name, error = %e, "cannot read from consumer; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut chunks = messages.ready_chunks(batch_size);
        loop {
            let chunk = tokio::select! {
                c = chunks.next(), if in_flight.len() < BATCHES_IN_FLIGHT => c,
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    if let Err(e) = done
                        && e.is_panic()
                    {
                        // The loop's supervisor counts it and restarts the loop, as when
                        // batches ran inside it; the batch's messages were not acked, so
                        // JetStream delivers them again.
                        std::panic::resume_unwind(e.into_panic());
                    }
                    continue;
                }
                _ = shutdown.changed() => {
                    while in_flight.next().await.is_some() {}
                    return;
                }
            };
            let Some(chunk) = chunk else {
                tracing::warn!(loop_name = name, "consumer stream ended; re-subscribing");
                continue 'outer;
            };
            let mut batch = Vec::with_capacity(chunk.len());
            for m in chunk {
                match m {
                    Ok(m) => batch.push(m),
                    Err(e) => tracing::warn!(loop_name = name, error = %e, "consumer stream error"),
                }
            }
            if !batch.is_empty() {
                backoff = Duration::from_millis(100);
                in_flight.push(tokio::spawn(work(batch)));
            }
        }
    }
}

pub(crate) use crate::domain::fnv1a;

/// Publishes a result the commander gives a task itself (a rejection, a deadline that
/// passed, an operator's cancel of a waiting task) to `<prefix>.results.<id>` as attempt
/// 0, durably: the results loop forwards it to `reply_to` as it does a worker's.
pub(crate) async fn publish_own_result(
    ctx: &Ctx,
    result: &fleet_worker::message::TaskResult,
    reply_to: Option<&str>,
) -> Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError> {
    let (h, payload) = own_result_message(result, reply_to, &ctx.core.replica);
    ctx.js
        .publish_with_headers(ctx.subjects.result(&result.task_id), h, payload)
        .await
}

/// The headers and body of a result the commander publishes itself, as its
/// `result.attempt`, with the idempotency key a worker's result of that attempt has
/// (`<id>:<attempt>:result`): one result per attempt is stored, whoever sends it first.
pub(crate) fn own_result_message(
    result: &fleet_worker::message::TaskResult,
    reply_to: Option<&str>,
    replica: &str,
) -> (async_nats::HeaderMap, Bytes) {
    use fleet_worker::protocol::{self, headers};
    let (id, attempt) = (&result.task_id, result.attempt);
    let payload = serde_json::to_vec(result).unwrap_or_default();
    let mut h = async_nats::HeaderMap::new();
    let _ = protocol::set_header(&mut h, headers::TASK_ID, id);
    let _ = protocol::set_header(&mut h, headers::ATTEMPT, &attempt.to_string());
    let _ = protocol::set_header(
        &mut h,
        headers::NATS_MSG_ID,
        &format!("{id}:{attempt}:result"),
    );
    if let Some(rt) = reply_to {
        let _ = protocol::set_header(&mut h, headers::REPLY_TO, rt);
    }
    let _ = protocol::set_header(&mut h, headers::REPLICA, replica);
    (h, Bytes::from(payload))
}

/// The headers named in `names` that `from` has, copied into a new map (a result carries
/// its task's trace context, baggage and ids on). A value that cannot be set again is
/// left out: it came from a parsed header, so that does not happen.
pub(crate) fn carried_headers(
    from: Option<&async_nats::HeaderMap>,
    names: &[&'static str],
) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    for &name in names {
        if let Some(v) = fleet_worker::protocol::header(from, name) {
            let _ = fleet_worker::protocol::set_known_header(&mut h, name, v.to_string());
        }
    }
    h
}
