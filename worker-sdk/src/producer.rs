//! A producer: submits tasks with an idempotency key and gets a durable ack, then the result.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use rand::RngCore;

use crate::message::{Task, TaskResult};
use crate::protocol::{self, Subjects, headers, is_subject_token, reply_subject_problem};
use crate::trace::{Baggage, TraceParent};

#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    #[error("task is invalid: {0}")]
    InvalidTask(#[from] crate::message::TaskError),
    #[error("idempotency key must be 1-128 letters, digits, '-' or '_'")]
    BadIdempotencyKey,
    #[error("{0}")]
    BadReplyTo(String),
    #[error("task intake did not acknowledge the task: {0}")]
    NotAccepted(String),
    /// Larger than the server takes in one message: sending it again cannot help.
    #[error(
        "the task is {size} bytes as published; the NATS server takes at most {max} bytes per message (max_payload): send less, and put large input in an object store with a reference to it in the task"
    )]
    TooLarge { size: usize, max: usize },
    #[error("NATS error: {0}")]
    Nats(String),
    #[error("no result for task {0} within the timeout")]
    Timeout(String),
    #[error("result for task {task_id} does not parse: {reason}")]
    BadResult { task_id: String, reason: String },
}

/// Options for one submission.
#[derive(Clone, Debug, Default)]
pub struct SubmitOptions {
    /// De-duplicates resubmissions (JetStream `Nats-Msg-Id`); also the task id when the
    /// task has none.
    pub idempotency_key: Option<String>,
    /// The producer's current span; the commander's dispatch span becomes its child.
    /// `None` starts a new trace.
    pub parent: Option<TraceParent>,
    pub tracestate: Option<String>,
    pub baggage: Baggage,
    /// A core NATS subject that also receives the result.
    pub reply_to: Option<String>,
}

/// The durable ack for a submission.
#[derive(Clone, Debug)]
pub struct SubmitReceipt {
    pub task_id: String,
    /// Sequence in the intake stream.
    pub stream_sequence: u64,
    /// True when JetStream had already seen this idempotency key.
    pub duplicate: bool,
    /// The trace context the task travels under. For a copy (`duplicate`), that is the
    /// first copy's, read back from the intake stream while the first copy is still
    /// there; once a commander has taken it, this submission's (the commander's
    /// `GET /v1/tasks/{id}` has the task's trace).
    pub traceparent: TraceParent,
}

/// The `traceparent` of the message JetStream kept at `sequence` of the intake stream: the
/// first copy of a task submitted twice, which the task travels under. `None` once it has
/// left the stream (a commander took it), or when it cannot be read.
async fn first_copy_traceparent(
    js: &jetstream::Context,
    intake: &str,
    sequence: u64,
) -> Option<TraceParent> {
    let stream = js.get_stream_no_info(intake).await.ok()?;
    let first = stream.direct_get(sequence).await.ok()?;
    let value = protocol::header(Some(&first.headers), headers::TRACEPARENT)?;
    TraceParent::parse(value).ok()
}

/// Submits tasks and awaits results.
#[derive(Clone, Debug)]
pub struct Producer {
    client: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    /// The intake stream's name, made once: each submission's ack future holds it, to
    /// read a copy's first message back.
    intake: std::sync::Arc<str>,
    retry_for: Duration,
}

/// How long [`Producer::submit`] retries by default when no PubAck came.
pub const DEFAULT_SUBMIT_RETRY: Duration = Duration::from_secs(30);

/// A task ready to publish: the same bytes and headers on every try.
struct Prepared {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    task_id: String,
    traceparent: TraceParent,
}

impl Producer {
    /// Submissions from [`Producer::submit_pipelined`] that may await their acks at once
    /// (async-nats' bound on a JetStream context).
    pub const MAX_PIPELINED: usize = 5_000;

    pub fn new(client: async_nats::Client, subjects: Subjects) -> Self {
        let js = jetstream::ContextBuilder::new()
            .max_ack_inflight(Self::MAX_PIPELINED)
            .build(client.clone());
        Self {
            client,
            js,
            intake: subjects.intake_stream().into(),
            subjects,
            retry_for: DEFAULT_SUBMIT_RETRY,
        }
    }

    /// How long [`Producer::submit`] keeps trying when no PubAck comes (a timeout, a
    /// broker restart): the outcome is unknown, so it publishes the very same message
    /// again (same task id, same `Nats-Msg-Id`), and a copy that did get stored is
    /// recognised. Zero: one try.
    pub fn with_retry_for(mut self, retry_for: Duration) -> Self {
        self.retry_for = retry_for;
        self
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// Validates and publishes a task to the intake stream; returns once JetStream has
    /// stored it. Without a PubAck the outcome is unknown: the same message is published
    /// again, with backoff, for up to the retry period (`with_retry_for`).
    pub async fn submit(
        &self,
        task: &Task,
        opts: SubmitOptions,
    ) -> Result<SubmitReceipt, ProducerError> {
        let prepared = self.prepare(task, &opts)?;
        let deadline = tokio::time::Instant::now() + self.retry_for;
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.publish(&prepared).await {
                Ok(pending) => match pending.await {
                    Ok(r) => return Ok(r),
                    Err(e) => {
                        if tokio::time::Instant::now() + backoff >= deadline {
                            return Err(e);
                        }
                        tracing::warn!(task_id = %prepared.task_id, error = %e, "no acknowledgement from the intake stream; submitting the same task again");
                    }
                },
                Err(e) => {
                    if tokio::time::Instant::now() + backoff >= deadline {
                        return Err(e);
                    }
                    tracing::warn!(task_id = %prepared.task_id, error = %e, "submission not sent; trying again");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Like [`Producer::submit`] but does not wait for the ack (and does not retry); await
    /// the returned future for it. Lets a producer pipeline many submissions.
    ///
    /// At most [`Producer::MAX_PIPELINED`] of one producer's submissions await their acks
    /// at once: past that, this waits until one of those futures is awaited or dropped.
    /// Await them as you go (in chunks, or from another task): a loop that submits more
    /// than that before it awaits any waits for ever.
    pub async fn submit_pipelined(
        &self,
        task: &Task,
        opts: SubmitOptions,
    ) -> Result<impl Future<Output = Result<SubmitReceipt, ProducerError>> + use<>, ProducerError>
    {
        let prepared = self.prepare(task, &opts)?;
        self.publish(&prepared).await
    }

    async fn publish(
        &self,
        p: &Prepared,
    ) -> Result<impl Future<Output = Result<SubmitReceipt, ProducerError>> + use<>, ProducerError>
    {
        // Published while the connection is down, the message would wait in the client's
        // buffer and its PubAck time out (5 s) with the outcome unknown; not sent, it is
        // known not to be stored, and said so at once (`submit` tries again meanwhile).
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(ProducerError::NotAccepted(
                "not connected to the NATS server: nothing was sent".into(),
            ));
        }
        let pending = self
            .js
            .publish_with_headers(p.subject.clone(), p.headers.clone(), p.payload.clone())
            .await
            .map_err(|e| ProducerError::NotAccepted(e.to_string()))?;
        let (task_id, traceparent) = (p.task_id.clone(), p.traceparent);
        let (js, intake) = (self.js.clone(), self.intake.clone());
        Ok(async move {
            let ack = pending
                .await
                .map_err(|e| ProducerError::NotAccepted(e.to_string()))?;
            let traceparent = match ack.duplicate {
                true => first_copy_traceparent(&js, &intake, ack.sequence)
                    .await
                    .unwrap_or(traceparent),
                false => traceparent,
            };
            Ok(SubmitReceipt {
                task_id,
                stream_sequence: ack.sequence,
                duplicate: ack.duplicate,
                traceparent,
            })
        })
    }

    fn prepare(&self, task: &Task, opts: &SubmitOptions) -> Result<Prepared, ProducerError> {
        let prepared = self.prepare_message(task, opts)?;
        let (size, max) = (
            protocol::wire_len(&prepared.headers, prepared.payload.len()),
            self.client.max_payload(),
        );
        // `max` is 0 only before the first `INFO`, when nothing can be known yet.
        if max > 0 && size > max {
            return Err(ProducerError::TooLarge { size, max });
        }
        Ok(prepared)
    }

    fn prepare_message(
        &self,
        task: &Task,
        opts: &SubmitOptions,
    ) -> Result<Prepared, ProducerError> {
        task.validate()?;
        if let Some(k) = &opts.idempotency_key
            && !is_subject_token(k)
        {
            return Err(ProducerError::BadIdempotencyKey);
        }
        // The commander's allowed prefixes are its configuration; what is never allowed
        // (system and fleet subjects, unpublishable ones) is refused here already.
        if let Some(r) = &opts.reply_to
            && let Some(why) = reply_subject_problem(r, &[""], self.subjects.prefix())
        {
            return Err(ProducerError::BadReplyTo(why));
        }
        let task_id = task
            .id
            .clone()
            .or_else(|| opts.idempotency_key.clone())
            .unwrap_or_else(random_id);
        let mut task = task.clone();
        task.id = Some(task_id.clone());
        let traceparent = opts.parent.unwrap_or_else(TraceParent::new_root);
        let mut h = HeaderMap::new();
        let bad = |e: protocol::ProtocolError| ProducerError::Nats(e.to_string());
        protocol::set_known_header(
            &mut h,
            headers::NATS_MSG_ID,
            opts.idempotency_key
                .clone()
                .unwrap_or_else(|| task_id.clone()),
        )
        .map_err(bad)?;
        protocol::set_known_header(&mut h, headers::TASK_ID, task_id.clone()).map_err(bad)?;
        protocol::set_known_header(&mut h, headers::TRACEPARENT, traceparent.to_header())
            .map_err(bad)?;
        if let Some(ts) = &opts.tracestate {
            protocol::set_known_header(&mut h, headers::TRACESTATE, ts.clone()).map_err(bad)?;
        }
        if !opts.baggage.is_empty() {
            protocol::set_known_header(&mut h, headers::BAGGAGE, opts.baggage.to_header())
                .map_err(bad)?;
        }
        if let Some(r) = &opts.reply_to {
            protocol::set_known_header(&mut h, headers::REPLY_TO, r.clone()).map_err(bad)?;
        }
        let payload = serde_json::to_vec(&task).map_err(|e| ProducerError::Nats(e.to_string()))?;
        Ok(Prepared {
            subject: self.subjects.submit(),
            headers: h,
            payload: Bytes::from(payload),
            task_id,
            traceparent,
        })
    }

    /// Waits for the result of one task: from the results stream if it is already there,
    /// else as it arrives. Safe to call at any time after submitting.
    pub async fn await_result(
        &self,
        task_id: &str,
        timeout: Duration,
    ) -> Result<TaskResult, ProducerError> {
        match self.stored_result(task_id, timeout).await? {
            Some(stored) => parse_result(task_id, &stored.payload),
            None => Err(ProducerError::Timeout(task_id.to_string())),
        }
    }

    /// The latest result of one task as its publisher sent it (the JSON unparsed, and its
    /// headers), from the results stream if it is already there, else as it arrives within
    /// `wait` (zero: look once). `Ok(None)`: none in that time. An error: the results
    /// stream could not be asked, so whether there is a result is not known.
    pub async fn stored_result(
        &self,
        task_id: &str,
        wait: Duration,
    ) -> Result<Option<StoredResult>, ProducerError> {
        let subject = self.subjects.result(task_id);
        let results = self.results_stream().await?;
        if wait.is_zero() {
            return look_up_result(&self.client, &results, &subject).await;
        }
        // Subscribe before looking, so a result published in between is not missed.
        let mut sub = self
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|e| ProducerError::Nats(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = FIRST_LOOK_PAUSE;
        loop {
            // Not there yet, or the server was too slow to answer (a loaded server times
            // the request out): either way, wait a little on the subscription and look
            // again, so a result stored before the subscription took effect (in a
            // cluster, before its interest reached the server that stored it) is not
            // missed. The pauses double: a waiter costs the server a few looks, not one
            // a second (a thousand HTTP long polls made a thousand requests a second).
            let looked = look_up_result(&self.client, &results, &subject).await;
            if let Ok(Some(stored)) = looked {
                return Ok(Some(stored));
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                // The last look says whether "none" is known or only not asked.
                return looked;
            }
            let waited = left.min(pause);
            pause = pause.saturating_mul(2).min(LAST_LOOK_PAUSE);
            match tokio::time::timeout(waited, sub.next()).await {
                Ok(Some(msg)) => {
                    return Ok(Some(StoredResult {
                        payload: msg.payload,
                        headers: msg.headers.unwrap_or_default(),
                        // Published just now, as it was stored.
                        stored_ms: None,
                    }));
                }
                Ok(None) => return Err(ProducerError::Nats("subscription closed".into())),
                Err(_) => continue,
            }
        }
    }

    async fn results_stream(&self) -> Result<stream::Stream<()>, ProducerError> {
        self.js
            .get_stream_no_info(self.subjects.results_stream())
            .await
            .map_err(|e| ProducerError::Nats(e.to_string()))
    }

    /// A private reply subject: pass its [`ResultInbox::subject`] as `reply_to` and read
    /// every result there, each task once (redeliveries are filtered out).
    pub async fn result_inbox(&self) -> Result<ResultInbox, ProducerError> {
        let subject = self.client.new_inbox();
        let sub = self
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|e| ProducerError::Nats(e.to_string()))?;
        Ok(ResultInbox {
            subject,
            sub,
            seen: HashSet::new(),
            order: VecDeque::new(),
            duplicates: 0,
        })
    }
}

/// How long [`Producer::stored_result`] waits on its subscription before it looks in the
/// stream again, at first and at most (the pause doubles in between).
const FIRST_LOOK_PAUSE: Duration = Duration::from_secs(1);
const LAST_LOOK_PAUSE: Duration = Duration::from_secs(8);

/// The longest one look in the results stream may take (a direct get answers in well
/// under a millisecond on a server that is up).
const LOOK_TIMEOUT: Duration = Duration::from_secs(2);

/// A result as its publisher sent it: a worker, or the commander for a task that never
/// ran (docs/protocol.md §5.2).
#[derive(Clone, Debug)]
pub struct StoredResult {
    /// The result JSON, unparsed.
    pub payload: Bytes,
    /// Its headers (`traceparent`, `Fleet-Task-Id`, `Fleet-Attempt`, …).
    pub headers: HeaderMap,
    /// When the results stream stored it (unix ms, the NATS server's clock); `None` for a
    /// result seen as it was published.
    pub stored_ms: Option<u64>,
}

/// The last message on a task's result subject: `Ok(None)` when the stream has none.
/// An error at once while the client is not connected, and after [`LOOK_TIMEOUT`] when
/// the server does not answer: a caller waiting for a result keeps waiting on its
/// subscription meanwhile, and one that asked once learns that the answer is unknown,
/// instead of waiting out the client's request timeout, past what it asked to wait.
async fn look_up_result(
    client: &async_nats::Client,
    results: &stream::Stream<()>,
    subject: &str,
) -> Result<Option<StoredResult>, ProducerError> {
    if client.connection_state() != async_nats::connection::State::Connected {
        return Err(ProducerError::Nats(
            "not connected to the NATS server".into(),
        ));
    }
    let asked = tokio::time::timeout(LOOK_TIMEOUT, results.direct_get_last_for_subject(subject));
    match asked.await {
        Ok(Ok(m)) => Ok(Some(StoredResult {
            stored_ms: crate::message::unix_ms(m.time),
            payload: m.payload,
            headers: m.headers,
        })),
        Ok(Err(e)) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
        Ok(Err(e)) => Err(ProducerError::Nats(format!(
            "the results stream did not answer: {e}"
        ))),
        Err(_) => Err(ProducerError::Nats(format!(
            "the results stream did not answer within {} s",
            LOOK_TIMEOUT.as_secs()
        ))),
    }
}

/// Results delivered to a producer's reply subject, each task id once.
#[derive(Debug)]
pub struct ResultInbox {
    subject: String,
    sub: async_nats::Subscriber,
    seen: HashSet<String>,
    order: VecDeque<String>,
    duplicates: u64,
}

/// Task ids remembered for de-duplication.
const INBOX_MEMORY: usize = 1_000_000;

impl ResultInbox {
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Copies of a result already delivered (at-least-once forwarding) that were dropped.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// The next result not seen before; `None` when the subscription ends.
    pub async fn next(&mut self) -> Option<Result<TaskResult, ProducerError>> {
        loop {
            let msg = self.sub.next().await?;
            let result = match serde_json::from_slice::<TaskResult>(&msg.payload) {
                Ok(r) => r,
                Err(e) => {
                    return Some(Err(ProducerError::BadResult {
                        task_id: String::new(),
                        reason: e.to_string(),
                    }));
                }
            };
            if !self.seen.insert(result.task_id.clone()) {
                self.duplicates += 1;
                continue;
            }
            self.order.push_back(result.task_id.clone());
            if self.order.len() > INBOX_MEMORY
                && let Some(old) = self.order.pop_front()
            {
                self.seen.remove(&old);
            }
            return Some(Ok(result));
        }
    }
}

fn parse_result(task_id: &str, payload: &[u8]) -> Result<TaskResult, ProducerError> {
    serde_json::from_slice(payload).map_err(|e| ProducerError::BadResult {
        task_id: task_id.to_string(),
        reason: e.to_string(),
    })
}

/// 128 random bits as 32 hex characters.
pub fn random_id() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}
