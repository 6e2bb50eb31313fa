//! Task records across commander replicas. Each replica keeps the records of the tasks it
//! took from the intake stream (docs/protocol.md §3, "Several commander replicas"). One
//! asked about a task it has no record of, or only the record of its HTTP submission,
//! asks the others over NATS (`<prefix>.records.<task_id>`, request/reply), and the
//! replica that keeps the record answers with it, as its own `GET /v1/tasks/{id}` would.
//!
//! An operator's cancel of such a task goes the same way: once a replica has answered
//! that it keeps the record, the cancel is sent on to it (`<prefix>.records.<task_id>.cancel`),
//! it cancels as its own API would, and the answer comes back. The replica the operator
//! used audits the command; the one that keeps the record logs it.
//!
//! A replica asks only while another is running: one whose results consumer
//! (`commander-results-<replica>`) has a pull request waiting, looked up at most every
//! 10 s, or every half second while the budget ledger counts other replicas than the last
//! look found (`broker::OtherReplicas`). A lone commander answers an unknown id at once.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{ApiError, AppState};

/// The longest a lookup waits for another replica's answer.
const PEER_WAIT: Duration = Duration::from_millis(500);
/// The longest a cancel sent on waits: the replica that keeps the record may ask a worker
/// first (a control request).
const CANCEL_WAIT: Duration = Duration::from_secs(15);
/// Cancels from other replicas handled at once; past it, one is answered as busy.
const CANCELS_AT_ONCE: usize = 16;

/// One replica's page of its waiting tasks (`GET /v1/tasks?state=deferred|parked`),
/// answered to another replica that lists the fleet's.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Page {
    /// Tasks waiting on that replica in all.
    pub total: usize,
    pub tasks: Vec<PageEntry>,
    /// More wait there beyond the last of `tasks` (a page cut to fit a NATS message, or
    /// as long as asked).
    pub more: bool,
}

/// The most a page answered to another replica takes in a NATS message (the server's
/// default `max_payload` is 1 MiB): past it, it is cut and says `more`.
const MAX_PAGE_BYTES: usize = 512 * 1024;

/// A waiting task as a listing shows it, with its key (hex): its place in the order of
/// the fleet's queues, which every replica's keys share.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PageEntry {
    pub key: String,
    pub task: serde_json::Value,
}

/// One replica's page of its finished tasks (`GET /v1/tasks?state=finished|…`), answered
/// to another replica that lists the fleet's.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FinishedPage {
    /// The replica that answers.
    pub replica: String,
    /// Newest first, each with its key (finish time, then id) in hex.
    pub tasks: Vec<PageEntry>,
    /// The last key it examined, when it may have more past it.
    pub next: Option<String>,
    /// Finished tasks it examined.
    pub scanned: usize,
}

impl From<(Vec<u8>, serde_json::Value)> for PageEntry {
    fn from((key, task): (Vec<u8>, serde_json::Value)) -> Self {
        PageEntry {
            key: crate::domain::hex(&key),
            task,
        }
    }
}

impl From<super::finished::Source> for FinishedPage {
    fn from(local: super::finished::Source) -> Self {
        FinishedPage {
            replica: local.replica,
            tasks: local.entries.into_iter().map(PageEntry::from).collect(),
            next: local.next.map(|k| crate::domain::hex(&k)),
            scanned: local.scanned,
        }
    }
}

/// What a replica asks the others for a listing of finished tasks: its own query.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct FinishedRequest {
    /// The replica that asks (it does not answer itself).
    from: String,
    query: super::finished::TasksQuery,
}

/// Listings of finished tasks answered for other replicas at once (each reads up to
/// `finished::MAX_SCAN` records); past it, a request goes unanswered and the asker lists
/// without this replica.
const FINISHED_AT_ONCE: usize = 4;

/// What a replica asks the others for a listing.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PageRequest {
    /// The replica that asks: it hears its own request too, and does not answer it.
    from: String,
    state: String,
    cursor: Option<String>,
    limit: usize,
}

/// Where the API finds a task's record that another replica keeps.
pub trait Peers: Send + Sync + std::fmt::Debug {
    /// Another replica's record of `task_id` (its `GET /v1/tasks/{id}` answer), if one
    /// answers in time.
    fn record<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Option<serde_json::Value>>;

    /// The latest routing decision the other replicas logged for `task_id` (as their
    /// `GET /v1/decisions/{task_id}` would show it), from those that answer in time.
    fn decision<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Option<serde_json::Value>>;

    /// Cancels `task_id` on the replica that keeps its record, as `who`: its answer, or
    /// `None` when no other replica keeps it.
    fn cancel<'a>(
        &'a self,
        task_id: &'a str,
        who: &'a str,
        reason: Option<&'a str>,
    ) -> BoxFuture<'a, Option<Result<serde_json::Value, ApiError>>>;

    /// The other replicas' pages of their waiting tasks (`state`: `deferred` or
    /// `parked`), `limit` each after `cursor`: from each that answers in time.
    fn waiting<'a>(
        &'a self,
        state: &'a str,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Vec<Page>>;

    /// The other replicas' pages of their finished tasks, as `query` asks (its `state`,
    /// filters, cursor and limit): from each that answers in time.
    fn finished<'a>(
        &'a self,
        query: &'a super::finished::TasksQuery,
    ) -> BoxFuture<'a, Vec<FinishedPage>>;
}

/// The other replicas, over NATS.
#[derive(Debug)]
pub struct NatsPeers {
    client: async_nats::Client,
    subjects: fleet_worker::Subjects,
    /// Whether another replica runs.
    others: Arc<crate::broker::OtherReplicas>,
}

impl NatsPeers {
    pub fn new(
        client: async_nats::Client,
        subjects: fleet_worker::Subjects,
        others: Arc<crate::broker::OtherReplicas>,
    ) -> Self {
        NatsPeers {
            client,
            subjects,
            others,
        }
    }

    /// Whether another replica runs: its results consumer has a pull request waiting.
    async fn others_run(&self) -> bool {
        self.others.run().await
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

    fn decision<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Option<serde_json::Value>> {
        Box::pin(async move {
            let answers: Vec<serde_json::Value> = self
                .gather(
                    self.subjects.decision_lookup(task_id),
                    &serde_json::json!({ "from": self.others.replica() }),
                )
                .await;
            super::decisions::latest(task_id, answers)
        })
    }

    fn cancel<'a>(
        &'a self,
        task_id: &'a str,
        who: &'a str,
        reason: Option<&'a str>,
    ) -> BoxFuture<'a, Option<Result<serde_json::Value, ApiError>>> {
        Box::pin(async move {
            // Only once a replica says it keeps the record: a cancel nobody answers would
            // wait the whole of CANCEL_WAIT.
            let keeper = self.record(task_id).await?;
            let body = serde_json::json!({ "who": who, "reason": reason }).to_string();
            let ask = self
                .client
                .request(self.subjects.record_cancel(task_id), body.into());
            let answer = match tokio::time::timeout(CANCEL_WAIT, ask).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    return Some(Err(ApiError::Busy(format!(
                        "replica {} keeps task {task_id} and did not answer: {e}",
                        keeper["replica"]
                    ))));
                }
                Err(_) => {
                    return Some(Err(ApiError::Busy(format!(
                        "replica {} keeps task {task_id} and did not answer within {} s",
                        keeper["replica"],
                        CANCEL_WAIT.as_secs()
                    ))));
                }
            };
            Some(read_cancel_answer(&answer.payload))
        })
    }

    fn waiting<'a>(
        &'a self,
        state: &'a str,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Vec<Page>> {
        Box::pin(async move {
            let ask = PageRequest {
                from: self.others.replica().to_string(),
                state: state.to_string(),
                cursor: cursor.map(str::to_string),
                limit,
            };
            self.gather(self.subjects.waiting_listings(), &ask).await
        })
    }

    fn finished<'a>(
        &'a self,
        query: &'a super::finished::TasksQuery,
    ) -> BoxFuture<'a, Vec<FinishedPage>> {
        Box::pin(async move {
            let ask = FinishedRequest {
                from: self.others.replica().to_string(),
                query: query.clone(),
            };
            self.gather(self.subjects.finished_listings(), &ask).await
        })
    }
}

impl NatsPeers {
    /// Scatter, then gather: asks every other replica that runs on `subject`, and takes
    /// one answer from each, for at most [`PEER_WAIT`]. An answer that does not parse is
    /// left out.
    async fn gather<T: serde::de::DeserializeOwned>(
        &self,
        subject: String,
        ask: &impl serde::Serialize,
    ) -> Vec<T> {
        let others = self.others.count().await;
        if others == 0 {
            return Vec::new();
        }
        let inbox = self.client.new_inbox();
        let Ok(mut answers) = self.client.subscribe(inbox.clone()).await else {
            return Vec::new();
        };
        let Ok(body) = serde_json::to_vec(ask) else {
            return Vec::new();
        };
        if self
            .client
            .publish_with_reply(subject, inbox, body.into())
            .await
            .is_err()
        {
            return Vec::new();
        }
        let until = tokio::time::Instant::now() + PEER_WAIT;
        let mut pages = Vec::with_capacity(others);
        while pages.len() < others {
            match tokio::time::timeout_at(until, answers.next()).await {
                Ok(Some(m)) => {
                    if let Ok(page) = serde_json::from_slice::<T>(&m.payload) {
                        pages.push(page);
                    }
                }
                _ => break,
            }
        }
        pages
    }
}

/// A forwarded cancel's answer: `{"ok":true,"result":…}` or
/// `{"ok":false,"code":…,"message":…}` (the codes of the API's errors).
fn read_cancel_answer(payload: &[u8]) -> Result<serde_json::Value, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| ApiError::Internal(format!("a replica's answer does not parse: {e}")))?;
    if v["ok"] == true {
        return Ok(v["result"].clone());
    }
    let message = v["message"].as_str().unwrap_or_default().to_string();
    Err(match v["code"].as_str().unwrap_or_default() {
        "not_found" => ApiError::NotFound(message),
        "conflict" => ApiError::Conflict(message),
        "bad_request" => ApiError::BadRequest(message),
        "unavailable" => ApiError::Busy(message),
        _ => ApiError::Internal(message),
    })
}

fn cancel_answer(result: Result<serde_json::Value, ApiError>) -> serde_json::Value {
    match result {
        Ok(v) => serde_json::json!({ "ok": true, "result": v }),
        Err(e) => serde_json::json!({ "ok": false, "code": e.code(), "message": e.to_string() }),
    }
}

/// No other replica: the API's tests.
#[derive(Debug)]
pub struct NoPeers;

impl Peers for NoPeers {
    fn record<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Option<serde_json::Value>> {
        Box::pin(async { None })
    }

    fn decision<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Option<serde_json::Value>> {
        Box::pin(async { None })
    }

    fn cancel<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: Option<&'a str>,
    ) -> BoxFuture<'a, Option<Result<serde_json::Value, ApiError>>> {
        Box::pin(async { None })
    }

    fn waiting<'a>(&'a self, _: &'a str, _: Option<&'a str>, _: usize) -> BoxFuture<'a, Vec<Page>> {
        Box::pin(async { Vec::new() })
    }

    fn finished<'a>(
        &'a self,
        _: &'a super::finished::TasksQuery,
    ) -> BoxFuture<'a, Vec<FinishedPage>> {
        Box::pin(async { Vec::new() })
    }
}

/// Answers the other replicas' lookups with this replica's records, and carries out the
/// cancels they send on: only for a task it took from the intake stream, never for one
/// whose record here is an HTTP submission another replica took (that one asks too). No
/// record, no answer: the replica that has it answers.
pub async fn answer_lookups(
    state: AppState,
    client: async_nats::Client,
    subjects: fleet_worker::Subjects,
    mut stop: watch::Receiver<bool>,
) {
    let (Some(mut sub), Some(mut listings), Some(mut finished)) = (
        subscribe(&client, subjects.record_requests()).await,
        subscribe(&client, subjects.waiting_listings()).await,
        subscribe(&client, subjects.finished_listings()).await,
    ) else {
        return;
    };
    let stem = format!("{}.records.", subjects.prefix());
    let cancels = std::sync::Arc::new(tokio::sync::Semaphore::new(CANCELS_AT_ONCE));
    let finished_listings = std::sync::Arc::new(tokio::sync::Semaphore::new(FINISHED_AT_ONCE));
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return },
            m = listings.next() => match m {
                Some(m) => {
                    answer_listing(&state, &client, m).await;
                    continue;
                }
                None => return,
            },
            m = finished.next() => match m {
                Some(m) => {
                    if let Ok(permit) = finished_listings.clone().try_acquire_owned() {
                        let (st, c) = (state.clone(), client.clone());
                        tokio::spawn(async move {
                            answer_finished(&st, &c, m).await;
                            drop(permit);
                        });
                    }
                    continue;
                }
                None => return,
            },
            _ = stop.changed() => return,
        };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let Some(rest) = msg.subject.strip_prefix(stem.as_str()) else {
            continue;
        };
        let (id, cancel) = match rest.split_once('.') {
            None => (rest, false),
            Some((id, "cancel")) => (id, true),
            Some((id, "decision")) => {
                answer_decision(&state, &client, id, &msg.payload, reply).await;
                continue;
            }
            Some(_) => continue,
        };
        let Ok(Some(rec)) = state.core.store.get(id) else {
            continue;
        };
        if !super::answers_for(&state, &rec) {
            continue;
        }
        if cancel {
            let Ok(permit) = cancels.clone().try_acquire_owned() else {
                let busy = ApiError::Busy("too many cancels from other replicas at once".into());
                let _ = client
                    .publish(reply, cancel_answer(Err(busy)).to_string().into())
                    .await;
                continue;
            };
            let (st, c, id) = (state.clone(), client.clone(), id.to_string());
            let asked: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
            tokio::spawn(async move {
                let who = asked["who"].as_str().unwrap_or("another replica");
                let reason = asked["reason"].as_str();
                tracing::info!(task_id = %id, who, "cancel sent on by another replica");
                let answer =
                    cancel_answer(super::control::cancel(&st, &id, who, reason).await.map(
                        |mut v| {
                            v["replica"] = serde_json::json!(&*st.core.replica);
                            v
                        },
                    ));
                let _ = c.publish(reply, answer.to_string().into()).await;
                drop(permit);
            });
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

/// Subscribes to what other replicas ask on `subject`; `None`, logged, when the server
/// refuses (this replica then answers none of it, and the others go on without it).
async fn subscribe(client: &async_nats::Client, subject: String) -> Option<async_nats::Subscriber> {
    match client.subscribe(subject.clone()).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, subject, "cannot answer other replicas' lookups and listings");
            None
        }
    }
}

/// Answers another replica's listing of the fleet's waiting tasks with this replica's
/// page: as asked, cut to fit a NATS message ([`MAX_PAGE_BYTES`]). A request this
/// replica cannot read gets no answer (the asker lists without this replica).
async fn answer_listing(state: &AppState, client: &async_nats::Client, msg: async_nats::Message) {
    let Some((reply, ask)) = from_another::<PageRequest>(state, &msg, |a| &a.from) else {
        return;
    };
    let parked = match ask.state.as_str() {
        "deferred" => false,
        "parked" => true,
        _ => return,
    };
    let after = match ask.cursor.as_deref() {
        None => None,
        Some(c) => match super::policy::waiting_key(parked, c) {
            Some(k) => Some(k),
            None => return,
        },
    };
    let limit = ask.limit.clamp(1, super::policy::MAX_LISTED + 1);
    let Ok((entries, total)) = super::policy::waiting_page(state, parked, after.as_deref(), limit)
    else {
        return;
    };
    let mut page = Page {
        total,
        more: entries.len() >= limit,
        tasks: entries.into_iter().map(PageEntry::from).collect(),
    };
    let fitted = fit(
        &mut page,
        |p| p.tasks.len(),
        |p| {
            p.tasks.truncate(p.tasks.len() / 2);
            p.more = true;
        },
    );
    answer(client, reply, fitted).await;
}

/// Answers another replica's listing of the fleet's finished tasks with this replica's
/// page, as asked, cut to fit a NATS message ([`MAX_PAGE_BYTES`]; `next` is then the
/// last task kept). A request this replica cannot read, or a query its own API would
/// refuse, gets no answer.
async fn answer_finished(state: &AppState, client: &async_nats::Client, msg: async_nats::Message) {
    let Some((reply, ask)) = from_another::<FinishedRequest>(state, &msg, |a| &a.from) else {
        return;
    };
    let Some(listed) = ask
        .query
        .state
        .as_deref()
        .filter(|s| super::finished::listable(s))
    else {
        return;
    };
    let Ok(checked) = super::finished::check(listed, &ask.query) else {
        return;
    };
    let store = state.core.store.clone();
    let replica = state.core.replica.clone();
    let local = tokio::task::spawn_blocking(move || {
        super::finished::local_page(&store, &replica, &checked)
    });
    let Ok(Ok(local)) = local.await else {
        return;
    };
    let mut page = FinishedPage::from(local);
    let fitted = fit(
        &mut page,
        |p| p.tasks.len(),
        |p| {
            p.tasks.truncate(p.tasks.len() / 2);
            p.next = p.tasks.last().map(|e| e.key.clone());
        },
    );
    answer(client, reply, fitted).await;
}

/// A request another replica sent for this one to answer (`from` names who sent it):
/// its reply subject and body. `None` for one without a reply subject, one that does
/// not parse, and this replica's own, which it hears too.
fn from_another<T: serde::de::DeserializeOwned>(
    state: &AppState,
    msg: &async_nats::Message,
    from: impl Fn(&T) -> &str,
) -> Option<(async_nats::Subject, T)> {
    let reply = msg.reply.clone()?;
    let ask: T = serde_json::from_slice(&msg.payload).ok()?;
    (from(&ask) != &*state.core.replica).then_some((reply, ask))
}

/// A page encoded to fit a NATS message ([`MAX_PAGE_BYTES`]): `halve` cuts it (and says
/// that more is left) until it fits or holds one task (`len`).
fn fit<T: serde::Serialize>(
    page: &mut T,
    len: impl Fn(&T) -> usize,
    halve: impl Fn(&mut T),
) -> Option<Vec<u8>> {
    loop {
        let body = serde_json::to_vec(page).ok()?;
        if body.len() <= MAX_PAGE_BYTES || len(page) <= 1 {
            return Some(body);
        }
        halve(page);
    }
}

/// Publishes an answer to another replica's listing (none when it could not be made).
async fn answer(client: &async_nats::Client, reply: async_nats::Subject, body: Option<Vec<u8>>) {
    let Some(body) = body else {
        return;
    };
    if let Err(e) = client.publish(reply, body.into()).await {
        tracing::debug!(error = %e, "listing not answered");
    }
}

/// Answers another replica's lookup of a task's decision (`{from}`: the replica that
/// asks, which hears its own request and does not answer it) with the latest this
/// replica logged, whether or not it keeps the task's record (the asker takes the latest
/// of the answers). No decision here, no answer.
async fn answer_decision(
    state: &AppState,
    client: &async_nats::Client,
    id: &str,
    asked: &[u8],
    reply: async_nats::Subject,
) {
    let asked: serde_json::Value = serde_json::from_slice(asked).unwrap_or_default();
    if asked["from"] == *state.core.replica {
        return;
    }
    let Ok(Some(view)) = super::decisions::view(state, id) else {
        return;
    };
    if let Err(e) = client.publish(reply, view.to_string().into()).await {
        tracing::debug!(task_id = id, error = %e, "decision lookup not answered");
    }
}
