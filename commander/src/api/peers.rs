//! Task records across commander replicas. Each replica keeps the records of the tasks it
//! took from the intake stream (docs/protocol.md §3, "Several commander replicas"). One
//! asked about a task it has no record of, or only the record of its HTTP submission,
//! asks the others over NATS (`<prefix>.records.<task_id>`, request/reply), and the
//! replica that keeps the record answers with it, as its own `GET /v1/tasks/{id}` would.
//!
//! A replica asks only while another is running: one whose results consumer
//! (`commander-results-<replica>`) has a pull request waiting, looked up at most every
//! [`RUNNING_FOR`]. A lone commander answers an unknown id at once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::watch;

use super::AppState;
use crate::broker::results_consumer_name;

/// The longest a lookup waits for another replica's answer.
const PEER_WAIT: Duration = Duration::from_millis(500);
/// How long a look at which replicas run holds.
const RUNNING_FOR: Duration = Duration::from_secs(10);

/// Where the API finds a task's record that another replica keeps.
pub trait Peers: Send + Sync + std::fmt::Debug {
    /// Another replica's record of `task_id` (its `GET /v1/tasks/{id}` answer), if one
    /// answers in time.
    fn record<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Option<serde_json::Value>>;
}

/// The other replicas, over NATS.
#[derive(Debug)]
pub struct NatsPeers {
    client: async_nats::Client,
    subjects: fleet_worker::Subjects,
    js: jetstream::Context,
    /// This replica's results consumer, which is not another replica's.
    own_consumer: String,
    /// Whether another replica ran at the last look, and when that was.
    running: Mutex<Option<(Instant, bool)>>,
}

impl NatsPeers {
    pub fn new(
        client: async_nats::Client,
        subjects: fleet_worker::Subjects,
        replica: &str,
    ) -> Self {
        NatsPeers {
            js: jetstream::new(client.clone()),
            client,
            subjects,
            own_consumer: results_consumer_name(replica),
            running: Mutex::new(None),
        }
    }

    /// Whether another replica runs: its results consumer has a pull request waiting.
    async fn others_run(&self) -> bool {
        if let Ok(guard) = self.running.lock()
            && let Some((at, running)) = *guard
            && at.elapsed() < RUNNING_FOR
        {
            return running;
        }
        let running = self.look_for_others().await;
        if let Ok(mut guard) = self.running.lock() {
            *guard = Some((Instant::now(), running));
        }
        running
    }

    async fn look_for_others(&self) -> bool {
        let Ok(stream) = self
            .js
            .get_stream_no_info(self.subjects.results_stream())
            .await
        else {
            return false;
        };
        let prefix = results_consumer_name("");
        let mut consumers = stream.consumers();
        while let Some(Ok(info)) = consumers.next().await {
            if info.name.starts_with(&prefix)
                && info.name != self.own_consumer
                && info.num_waiting > 0
            {
                return true;
            }
        }
        false
    }
}

impl Peers for NatsPeers {
    fn record<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Option<serde_json::Value>> {
        Box::pin(async move {
            if !self.others_run().await {
                return None;
            }
            let ask = self
                .client
                .request(self.subjects.record_lookup(task_id), bytes::Bytes::new());
            let answer = tokio::time::timeout(PEER_WAIT, ask).await.ok()?.ok()?;
            serde_json::from_slice::<serde_json::Value>(&answer.payload)
                .ok()
                .filter(|v| v["id"] == task_id)
        })
    }
}

/// No other replica: the API's tests.
#[derive(Debug)]
pub struct NoPeers;

impl Peers for NoPeers {
    fn record<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Option<serde_json::Value>> {
        Box::pin(async { None })
    }
}

/// Answers the other replicas' lookups with this replica's records: a record of a task it
/// took from the intake stream, never the record of an HTTP submission another replica
/// took (that one asks too). No record, no answer: the replica that has it answers.
pub async fn answer_lookups(
    state: AppState,
    client: async_nats::Client,
    subject: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut sub = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, subject, "cannot answer other replicas' record lookups");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return },
            _ = stop.changed() => return,
        };
        let (Some(reply), Some(id)) = (msg.reply.clone(), msg.subject.rsplit('.').next()) else {
            continue;
        };
        let Ok(Some(rec)) = state.core.store.get(id) else {
            continue;
        };
        if rec.is_stub() {
            continue;
        }
        let Ok(view) = super::record_view(&state, rec) else {
            continue;
        };
        if let Err(e) = client.publish(reply, view.to_string().into()).await {
            tracing::debug!(task_id = id, error = %e, "record lookup not answered");
        }
    }
}
