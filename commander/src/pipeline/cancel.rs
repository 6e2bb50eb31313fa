//! Cancelling a task that waits in its pool's queue: dispatched, and not yet handed to a
//! worker (every worker of the pool busy, or none there).
//!
//! The task's message stays in the work stream until a worker acks it, at the sequence
//! its dispatch's PubAck gave (`TaskRecord::work_sequence`). A cancel, in this order:
//!
//! 1. reads that message, to be sure it is still there and is this task's;
//! 2. asks its consumer how far it has delivered: a message at or before that point has
//!    been handed to a worker, which runs it (the cancel is refused, to be sent to that
//!    worker once it reports the task running);
//! 3. publishes the task's `cancelled` result as the attempt the message carries, on
//!    condition that the task's results subject has had no new message since it looked
//!    (`Nats-Expected-Last-Subject-Sequence`): a result that arrived meanwhile wins, and
//!    the cancel is refused;
//! 4. deletes the message.
//!
//! The result goes first because it is what makes the cancel hold whatever happens next.
//! A worker looks up the results stream on every delivery and acks without running a
//! message whose attempt already has a result (docs/protocol.md §7), so a message the
//! delete missed (the broker went away between the two) is never run. A worker handed the
//! message between steps 2 and 3 runs it, but its result carries the same idempotency key
//! (`<id>:<attempt>:result`), so JetStream drops it as a copy: the task has one result,
//! the cancel's. The consumer is asked again after the delete, and the answer says whether
//! that may have happened.
//!
//! `purge_pool` ([`WorkQueue::withdraw_pool`]) does steps 2 to 4 for each message on the
//! pool's subject past what its consumer has handed out, oldest first and a bounded
//! number at a time; the message itself is step 1's check.
//!
//! The results loop then records the result like any other: the record ends `failed`
//! with the outcome `cancelled`, and the budget reservation is settled at zero cost (the
//! result's usage says `cost_usd: 0`: the task never ran).

use async_nats::jetstream;
use async_nats::jetstream::stream::DirectGetErrorKind;
use fleet_worker::message::{TaskResult, Usage};
use fleet_worker::protocol::{self, Subjects, headers};

/// A stream handle fetched without its info (`get_stream_no_info`).
type Stream = jetstream::stream::Stream<()>;

/// A task that waits in its pool's queue, as its record knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub task_id: String,
    pub pool: String,
    /// The attempt its latest dispatch carries.
    pub attempt: u32,
    /// Its message's sequence in the work stream.
    pub work_sequence: u64,
    /// The producer's reply subject, which the result is forwarded to.
    pub reply_to: Option<String>,
    /// The commander replica that dispatched it (its work message's `Fleet-Replica`),
    /// named on the `cancelled` result, so that replica records it as its run's result;
    /// `None`: this one.
    pub replica: Option<String>,
}

/// A cancel that took the task out of the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Withdrawn {
    /// A worker was handed the message while it was cancelled: if it runs it, its result
    /// is dropped as a copy of the cancel's.
    pub maybe_taken: bool,
}

/// What cancelling a pool's queue did ([`WorkQueue::withdraw_pool`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolWithdrawal {
    /// The tasks cancelled, oldest first.
    pub cancelled: Vec<String>,
    /// Tasks met in the queue and left there, with why (a worker was handed one, one
    /// finished meanwhile).
    pub not_cancelled: Vec<(String, String)>,
    /// The bound was reached with tasks still waiting.
    pub more: bool,
    /// The broker stopped answering, and why: the queue may hold more.
    pub stopped: Option<String>,
}

/// Why a task was not taken out of its queue.
#[derive(Debug, thiserror::Error)]
pub enum WithdrawError {
    /// It is not (or no longer) waiting there: a worker has it, or it has finished. The
    /// message says which, as far as the broker tells.
    #[error("{0}")]
    NotQueued(String),
    /// The broker could not be asked, or did not answer: nothing is known to have changed.
    #[error("{0}")]
    Broker(String),
}

/// What a cancel needs of NATS.
#[derive(Clone, Debug)]
pub struct WorkQueue {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub subjects: Subjects,
    /// This commander replica, named on the `cancelled` results it publishes.
    pub replica: String,
}

impl WorkQueue {
    /// Takes `q` out of its pool's queue and publishes its `cancelled` result with
    /// `reason` (see the module's comment for the order and why).
    pub async fn withdraw(&self, q: &Queued, reason: &str) -> Result<Withdrawn, WithdrawError> {
        let work = self.work_stream().await?;
        let consumer = self.waiting_message(&work, q).await?;
        self.take(&work, &consumer, q, reason).await
    }

    /// Cancels every task that waits in `pool`'s queue (`<prefix>.work.<pool>`, not yet
    /// handed to a worker), as [`WorkQueue::withdraw`] cancels one, oldest first: at most
    /// `max`, and none published after this began (so a producer still sending cannot
    /// keep it going). Tasks targeted at one worker of the pool are left alone. A broker
    /// that stops answering ends it early; what was cancelled until then stays cancelled.
    pub async fn withdraw_pool(
        &self,
        pool: &str,
        reason: &str,
        max: usize,
    ) -> Result<PoolWithdrawal, WithdrawError> {
        let work = self.work_stream().await?;
        let last = work
            .get_info()
            .await
            .map_err(|e| WithdrawError::Broker(format!("the work stream did not answer: {e}")))?
            .state
            .last_sequence;
        let consumer = protocol::pool_consumer_name(pool);
        let subject = self.subjects.work(pool);
        let mut out = PoolWithdrawal::default();
        let mut from = delivered_up_to(&work, &consumer).await?.saturating_add(1);
        while from <= last {
            let msg = match work
                .direct_get_next_for_subject(subject.as_str(), Some(from))
                .await
            {
                Ok(m) if m.sequence <= last => m,
                Ok(_) => break,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
                Err(e) => {
                    out.stopped = Some(format!("the work stream did not answer: {e}"));
                    break;
                }
            };
            if out.cancelled.len() + out.not_cancelled.len() == max {
                out.more = true;
                break;
            }
            from = msg.sequence.saturating_add(1);
            let h = Some(&msg.headers);
            let Some(task_id) = protocol::header(h, headers::TASK_ID) else {
                out.not_cancelled.push((
                    format!("seq {}", msg.sequence),
                    "the message names no task (no Fleet-Task-Id)".into(),
                ));
                continue;
            };
            let q = Queued {
                task_id: task_id.to_string(),
                pool: pool.to_string(),
                attempt: protocol::header(h, headers::ATTEMPT)
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(1),
                work_sequence: msg.sequence,
                reply_to: protocol::header(h, headers::REPLY_TO).map(str::to_string),
                replica: protocol::header(h, headers::REPLICA)
                    .filter(|r| protocol::is_subject_token(r))
                    .map(str::to_string),
            };
            match self.take(&work, &consumer, &q, reason).await {
                Ok(_) => out.cancelled.push(q.task_id),
                Err(WithdrawError::NotQueued(why)) => out.not_cancelled.push((q.task_id, why)),
                Err(WithdrawError::Broker(why)) => {
                    out.not_cancelled.push((q.task_id, why.clone()));
                    out.stopped = Some(why);
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The work stream, without asking for its info: the steps need none (one request
    /// less per cancel).
    async fn work_stream(&self) -> Result<Stream, WithdrawError> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(WithdrawError::Broker(
                "not connected to the NATS server".into(),
            ));
        }
        self.js
            .get_stream_no_info(self.subjects.work_stream())
            .await
            .map_err(|e| WithdrawError::Broker(format!("the work stream did not answer: {e}")))
    }

    /// Steps 2 to 4 for a message found to be `q`'s, handed out by `consumer`.
    async fn take(
        &self,
        work: &Stream,
        consumer: &str,
        q: &Queued,
        reason: &str,
    ) -> Result<Withdrawn, WithdrawError> {
        let seq = q.work_sequence;
        if delivered_up_to(work, consumer).await? >= seq {
            return Err(WithdrawError::NotQueued(format!(
                "a worker has been handed task {} and has not yet reported it running; cancel it again once it runs",
                q.task_id
            )));
        }
        let last = self.last_result(q).await?;
        self.publish_cancel(q, reason, last).await?;
        // Past this point the cancel holds: the message is only tidied away.
        if let Err(e) = work.delete_message(seq).await {
            tracing::warn!(task_id = %q.task_id, seq, error = %e, "cancelled task's work message not deleted; a worker that gets it finds the result and acks it unrun");
        }
        let maybe_taken = match delivered_up_to(work, consumer).await {
            Ok(d) => d >= seq,
            Err(e) => {
                tracing::warn!(task_id = %q.task_id, error = %e, "whether a worker took the cancelled task is unknown");
                true
            }
        };
        Ok(Withdrawn { maybe_taken })
    }

    /// The consumer that hands out `q`'s message, once the message is found to be there
    /// and to be `q`'s. A sequence a restarted broker handed out again names another
    /// task's message, which is left alone.
    async fn waiting_message(&self, work: &Stream, q: &Queued) -> Result<String, WithdrawError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind as Kind;
        let msg = match work.get_raw_message(q.work_sequence).await {
            Ok(m) => m,
            Err(e) if e.kind() == Kind::NoMessageFound => {
                return Err(WithdrawError::NotQueued(format!(
                    "task {} is no longer in its pool's queue: a worker has taken it, or it has just finished",
                    q.task_id
                )));
            }
            Err(e) => {
                return Err(WithdrawError::Broker(format!(
                    "the work stream did not answer: {e}"
                )));
            }
        };
        if protocol::header(Some(&msg.headers), headers::TASK_ID) != Some(q.task_id.as_str()) {
            return Err(WithdrawError::NotQueued(format!(
                "task {} is no longer in its pool's queue (its work message is gone)",
                q.task_id
            )));
        }
        let subject = msg.subject.as_str();
        let rest = subject.strip_prefix(self.subjects.work(&q.pool).as_str());
        if rest == Some("") {
            return Ok(protocol::pool_consumer_name(&q.pool));
        }
        match rest.and_then(|r| r.strip_prefix('.')) {
            Some(worker) if protocol::is_subject_token(worker) => {
                Ok(protocol::targeted_consumer_name(&q.pool, worker))
            }
            _ => Err(WithdrawError::NotQueued(format!(
                "task {}'s work message is on {subject}, which is not its pool's",
                q.task_id
            ))),
        }
    }

    /// The sequence of the last message on the task's results subject (0: none), so the
    /// cancel is only stored if nothing came after it. A result of this attempt means the
    /// task has finished.
    async fn last_result(&self, q: &Queued) -> Result<u64, WithdrawError> {
        let results = self
            .js
            .get_stream_no_info(self.subjects.results_stream())
            .await
            .map_err(|e| {
                WithdrawError::Broker(format!("the results stream did not answer: {e}"))
            })?;
        match results
            .direct_get_last_for_subject(self.subjects.result(&q.task_id))
            .await
        {
            Ok(m) => {
                let attempt = protocol::header(Some(&m.headers), headers::ATTEMPT)
                    .and_then(|a| a.parse::<u32>().ok());
                if attempt == Some(q.attempt) {
                    return Err(finished(q));
                }
                Ok(m.sequence)
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(0),
            Err(e) => Err(WithdrawError::Broker(format!(
                "the results stream did not answer: {e}"
            ))),
        }
    }

    async fn publish_cancel(
        &self,
        q: &Queued,
        reason: &str,
        last: u64,
    ) -> Result<(), WithdrawError> {
        let result = cancelled_result(q, reason);
        let replica = q.replica.as_deref().unwrap_or(&self.replica);
        let (mut h, payload) = super::own_result_message(&result, q.reply_to.as_deref(), replica);
        let _ = protocol::set_header(
            &mut h,
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE.as_ref(),
            &last.to_string(),
        );
        let ack = self
            .js
            .publish_with_headers(self.subjects.result(&q.task_id), h, payload)
            .await
            .map_err(|e| WithdrawError::Broker(format!("the cancel's result was not sent: {e}")))?
            .await;
        use async_nats::jetstream::context::PublishErrorKind;
        match ack {
            // A copy: this attempt's result was stored first (a worker's).
            Ok(a) if a.duplicate => Err(finished(q)),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(finished(q)),
            Err(e) => Err(WithdrawError::Broker(format!(
                "the cancel's result was not acknowledged, so whether it is stored is unknown: {e}"
            ))),
        }
    }
}

fn finished(q: &Queued) -> WithdrawError {
    WithdrawError::NotQueued(format!(
        "task {} has a result already: it finished a moment ago",
        q.task_id
    ))
}

/// The result a cancelled queued task ends with: `cancelled`, as the attempt it was
/// dispatched as, with a usage that says it cost nothing (it never ran; a result without
/// one would be charged its estimate).
pub fn cancelled_result(q: &Queued, reason: &str) -> TaskResult {
    let mut r = TaskResult::cancelled(&q.task_id, "cancelled", reason);
    r.attempt = q.attempt;
    r.pool = Some(q.pool.clone());
    r.usage = Some(Usage {
        cost_usd: Some(0.0),
        ..Default::default()
    });
    r
}

/// The highest work-stream sequence `consumer` has handed to a worker: none when the
/// consumer does not exist (no worker of the pool, or none targeted, ever bound it).
async fn delivered_up_to(work: &Stream, consumer: &str) -> Result<u64, WithdrawError> {
    use async_nats::jetstream::context::ConsumerInfoErrorKind;
    match work.consumer_info(consumer).await {
        Ok(i) => Ok(i.delivered.stream_sequence),
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => Ok(0),
        Err(e) => Err(WithdrawError::Broker(format!(
            "consumer {consumer} did not answer: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_nats::HeaderMap;
    use futures::StreamExt;

    use super::*;

    /// A work stream and a results stream on a real nats-server, with pool `p`'s consumer.
    async fn queue() -> (fleet_testkit::NatsServer, WorkQueue) {
        let nats = fleet_testkit::NatsServer::start().expect("nats-server");
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = jetstream::new(client.clone());
        let subjects = Subjects::default();
        let work = js
            .create_stream(subjects.work_stream_config())
            .await
            .unwrap();
        js.create_stream(subjects.results_stream_config())
            .await
            .unwrap();
        work.create_consumer(subjects.pool_consumer_config("p", Duration::from_secs(30)))
            .await
            .unwrap();
        let q = WorkQueue {
            client,
            js,
            subjects,
            replica: "0123456789abcdef".into(),
        };
        (nats, q)
    }

    async fn dispatch(q: &WorkQueue, subject: &str, id: &str, attempt: u32) -> u64 {
        let mut h = HeaderMap::new();
        h.insert(headers::TASK_ID, id);
        h.insert(headers::ATTEMPT, attempt.to_string().as_str());
        h.insert(headers::REPLY_TO, "_INBOX.producer");
        q.js.publish_with_headers(subject.to_string(), h, "{}".into())
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    async fn stored_attempt(q: &WorkQueue, id: &str) -> Option<String> {
        let results = q.js.get_stream(q.subjects.results_stream()).await.unwrap();
        let m = results
            .direct_get_last_for_subject(q.subjects.result(id))
            .await
            .ok()?;
        protocol::header(Some(&m.headers), headers::ATTEMPT).map(str::to_string)
    }

    /// A pool's queue is cancelled oldest first, a bounded number at a time: a task a
    /// worker was handed is not visited, one that already has its result is left with
    /// why, a task targeted at one worker is left alone, and each cancelled task's
    /// result is stored as the attempt it was dispatched as.
    #[tokio::test]
    async fn a_pool_s_queue_is_cancelled_oldest_first_a_bounded_number_at_a_time() {
        let (_nats, q) = queue().await;
        let pool = q.subjects.work("p");
        dispatch(&q, &pool, "handed", 1).await;
        for i in 0..5 {
            dispatch(&q, &pool, &format!("t{i}"), 1).await;
        }
        dispatch(&q, &pool, "done", 2).await;
        dispatch(&q, &q.subjects.work_targeted("p", "w1"), "targeted", 1).await;
        // A worker holds the oldest.
        let work = q.js.get_stream(q.subjects.work_stream()).await.unwrap();
        let consumer: jetstream::consumer::PullConsumer =
            work.get_consumer("pool-p").await.unwrap();
        let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
        let held = batch.next().await.unwrap().unwrap();
        assert_eq!(
            protocol::header(held.headers.as_ref(), headers::TASK_ID),
            Some("handed")
        );
        // `done` has its result for this attempt already.
        let mut h = HeaderMap::new();
        h.insert(headers::ATTEMPT, "2");
        q.js.publish_with_headers(q.subjects.result("done"), h, "{}".into())
            .await
            .unwrap()
            .await
            .unwrap();

        let first = q.withdraw_pool("p", "purged", 3).await.unwrap();
        assert_eq!(first.cancelled, ["t0", "t1", "t2"]);
        assert!(first.not_cancelled.is_empty());
        assert!(first.more);
        assert_eq!(first.stopped, None);
        let rest = q.withdraw_pool("p", "purged", 100).await.unwrap();
        assert_eq!(rest.cancelled, ["t3", "t4"]);
        assert_eq!(rest.not_cancelled.len(), 1, "{rest:?}");
        assert_eq!(rest.not_cancelled[0].0, "done");
        assert!(
            rest.not_cancelled[0].1.contains("has a result already"),
            "{rest:?}"
        );
        assert!(!rest.more);
        for i in 0..5 {
            assert_eq!(
                stored_attempt(&q, &format!("t{i}")).await.as_deref(),
                Some("1")
            );
        }
        assert_eq!(
            stored_attempt(&q, "handed").await,
            None,
            "a handed task is the worker's"
        );
        assert_eq!(stored_attempt(&q, "targeted").await, None);
        // Left in the stream: the handed task, `done` and the targeted one.
        let info = q.js.get_stream(q.subjects.work_stream()).await.unwrap();
        assert_eq!(info.cached_info().state.messages, 3);
        let again = q.withdraw_pool("p", "purged", 100).await.unwrap();
        assert!(again.cancelled.is_empty());
    }
}
