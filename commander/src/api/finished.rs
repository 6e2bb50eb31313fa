//! `GET /v1/tasks?state=finished|completed|failed|rejected`: the tasks that have ended,
//! newest first, from the store's retention queue (the order they finished in), with
//! filters. Shapes: docs/api.md "Tasks".
//!
//! The listing is the fleet's: the replica asked gathers a page from every other that
//! runs (`<prefix>.listings.finished`, [`super::peers`]) and merges them by their keys
//! (finish time, then id), which order every replica's tasks as one. A task another
//! replica ran is listed by that one (its record's `kept_by`), not by the replica that
//! keeps a copy of how it ended, unless that one did not answer.

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use fleet_worker::message::ResultStatus;

use super::listing::{Keyed, Order};
use super::{ApiError, AppState};
use crate::store::{TaskRecord, TaskState};

/// The query of `GET /v1/tasks`: `state`, the page, and the filters of a listing of
/// finished tasks.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TasksQuery {
    pub state: Option<String>,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
    /// The filters of a listing of finished tasks (docs/api.md "Tasks").
    pub status: Option<String>,
    pub code: Option<String>,
    pub pool: Option<String>,
    pub worker: Option<String>,
    /// The model routing chose for the task (the record's `model`).
    pub model: Option<String>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
}

impl TasksQuery {
    /// The filters given that only a listing of finished tasks takes.
    pub(super) fn finished_filters(&self) -> Vec<&'static str> {
        [
            ("status", self.status.is_some()),
            ("code", self.code.is_some()),
            ("pool", self.pool.is_some()),
            ("worker", self.worker.is_some()),
            ("model", self.model.is_some()),
            ("since_ms", self.since_ms.is_some()),
            ("until_ms", self.until_ms.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }
}

/// Records one page examines at most, whatever its filters: a filter that matches
/// nothing costs a bounded scan, and `next` continues from where it stopped.
pub const MAX_SCAN: usize = 20_000;

/// The states this listing takes, and which terminal states each names.
fn states(state: &str) -> Option<&'static [TaskState]> {
    match state {
        "finished" => Some(&[TaskState::Completed, TaskState::Failed, TaskState::Rejected]),
        "completed" => Some(&[TaskState::Completed]),
        "failed" => Some(&[TaskState::Failed]),
        "rejected" => Some(&[TaskState::Rejected]),
        _ => None,
    }
}

pub fn listable(state: &str) -> bool {
    states(state).is_some()
}

/// The filters of one listing, checked.
struct Filter {
    states: &'static [TaskState],
    status: Option<ResultStatus>,
    code: Option<String>,
    pool: Option<String>,
    worker: Option<String>,
    model: Option<String>,
}

impl Filter {
    fn keeps(&self, rec: &TaskRecord) -> bool {
        let outcome = rec.outcome.as_ref();
        let code = outcome
            .and_then(|o| o.error.as_ref())
            .or(rec.rejection.as_ref())
            .map(|e| e.code.as_str());
        self.states.contains(&rec.state)
            && self
                .status
                .is_none_or(|s| outcome.is_some_and(|o| o.status == s))
            && self.code.as_deref().is_none_or(|c| code == Some(c))
            && self
                .pool
                .as_deref()
                .is_none_or(|p| rec.pool.as_deref() == Some(p))
            && self
                .worker
                .as_deref()
                .is_none_or(|w| outcome.and_then(|o| o.worker_id.as_deref()) == Some(w))
            && self
                .model
                .as_deref()
                .is_none_or(|m| rec.model.as_deref() == Some(m))
    }
}

/// A listing's query, checked: what one replica's page holds.
pub(super) struct Checked {
    filter: Filter,
    limit: usize,
    /// Finished before this (finish time, id): the cursor, or the millisecond after
    /// `until_ms`.
    before: Option<(u64, String)>,
    since_ms: u64,
}

/// Checks a listing's query: a 400 for a bad filter, limit or cursor.
pub(super) fn check(state: &str, q: &TasksQuery) -> Result<Checked, ApiError> {
    let filter = Filter {
        states: states(state).unwrap_or_default(),
        status: q.status.as_deref().map(status).transpose()?,
        code: q.code.clone(),
        pool: q.pool.clone(),
        worker: q.worker.clone(),
        model: q.model.clone(),
    };
    let limit = super::count_param("limit", q.limit, 100, 1000)?;
    let cursor = match q.cursor.as_deref() {
        None => None,
        Some(c) => Some(parse_cursor(c).ok_or_else(|| {
            ApiError::BadRequest(format!("cursor {c:?} is not one this API returned"))
        })?),
    };
    // Finished at or before `until_ms`: before the first key of the millisecond after.
    let until = q.until_ms.map(|ms| (ms.saturating_add(1), String::new()));
    let before = match (cursor, until) {
        (Some(c), Some(u)) => Some(c.min(u)),
        (c, u) => c.or(u),
    };
    Ok(Checked {
        filter,
        limit,
        before,
        since_ms: q.since_ms.unwrap_or(0),
    })
}

/// One replica's page of finished tasks.
#[derive(Debug, Default)]
pub(super) struct Source {
    /// The replica whose store the page is from.
    pub replica: String,
    /// Its tasks by key (finish time, then id), newest first, as the listing shows them.
    pub entries: Keyed,
    /// The last key it examined, when it may have more past it.
    pub next: Option<Vec<u8>>,
    pub scanned: usize,
}

/// This replica's page: up to `limit` finished tasks from its store (reading up to
/// [`MAX_SCAN`] records: call it off the async threads). Each names the replica that keeps
/// its record: this one, or the one that ran it when this record is a copy.
pub(super) fn local_page(
    store: &crate::store::Store,
    replica: &str,
    q: &Checked,
) -> Result<Source, ApiError> {
    let page = store
        .finished(
            q.before.as_ref().map(|(ms, id)| (*ms, id.as_str())),
            q.since_ms,
            MAX_SCAN,
            q.limit,
            |rec| q.filter.keeps(rec),
        )
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Source {
        replica: replica.to_string(),
        entries: page
            .tasks
            .iter()
            .map(|(ms, rec)| (key(*ms, &rec.id), entry(*ms, rec, replica)))
            .collect(),
        next: page.next.map(|(ms, id)| key(ms, &id)),
        scanned: page.scanned,
    })
}

/// The listing: this replica's page and every other running replica's, merged.
pub async fn list(s: &AppState, state: &str, q: TasksQuery) -> Result<Response, ApiError> {
    let checked = check(state, &q)?;
    let limit = checked.limit;
    let store = s.core.store.clone();
    let replica = s.core.replica.clone();
    // Up to `MAX_SCAN` records read from disk: off the async threads.
    let local = tokio::task::spawn_blocking(move || local_page(&store, &replica, &checked));
    let (local, pages) = tokio::join!(local, s.peers.finished(&q));
    let local = local.map_err(|e| ApiError::Internal(e.to_string()))??;
    let replicas = 1 + pages.len();
    let mut sources = vec![local];
    sources.extend(pages.into_iter().map(|p| {
        Source {
            replica: p.replica,
            entries: p
                .tasks
                .into_iter()
                .filter_map(|e| Some((crate::domain::unhex(&e.key)?, e.task)))
                .collect(),
            next: p.next.as_deref().and_then(crate::domain::unhex),
            scanned: p.scanned,
        }
    }));
    let (tasks, next, scanned) = merge(sources, limit);
    let mut page = json!({
        "state": state,
        "replicas": replicas,
        "tasks": tasks,
        "scanned": scanned,
    });
    // Absent on the last page (docs/api.md), as the decision log's `next` is.
    if let Some(k) = next {
        page["next"] = json!(crate::domain::hex(&k));
    }
    Ok(Json(page).into_response())
}

/// One page of the fleet's finished tasks from each replica's page: newest first, at
/// most `limit`, with the next page's key and the records examined in all
/// ([`super::listing::merge`]: nothing older than the newest key some replica stopped at).
/// A task listed by a replica that keeps only a copy of how it ended is left out when the
/// replica that ran it answered: that one lists it.
pub(super) fn merge(sources: Vec<Source>, limit: usize) -> (Vec<Value>, Option<Vec<u8>>, usize) {
    let answered: std::collections::HashSet<String> =
        sources.iter().map(|s| s.replica.clone()).collect();
    let scanned = sources.iter().map(|s| s.scanned).sum();
    let pages = sources
        .into_iter()
        .map(|s| {
            let from = s.replica;
            let entries = s
                .entries
                .into_iter()
                .filter(|(_, t)| {
                    let keeper = t["replica"].as_str().unwrap_or(&from);
                    keeper == from || !answered.contains(keeper)
                })
                .collect();
            (entries, s.next)
        })
        .collect();
    let (tasks, next) = super::listing::merge(pages, limit, Order::Descending);
    (tasks, next, scanned)
}

fn status(s: &str) -> Result<ResultStatus, ApiError> {
    serde_json::from_value(json!(s)).map_err(|_| {
        ApiError::BadRequest(format!(
            "status={s}: one of ok, failed, cancelled, rejected"
        ))
    })
}

/// A finished task as the listing shows it; `replica` keeps its record.
fn entry(ms: u64, rec: &TaskRecord, here: &str) -> Value {
    json!({
        "task_id": rec.id,
        "state": rec.state,
        "finished_ms": ms,
        "pool": rec.pool,
        "model": rec.model,
        "attempt": rec.attempt,
        "priority": rec.priority,
        "outcome": rec.outcome,
        "rejection": rec.rejection,
        "charged_usd": rec.budget.as_ref().and_then(|b| b.charged_usd),
        "policy_version": rec.policy_version,
        "trace_id": rec.trace.as_ref().map(|t| &t.trace_id),
        "replica": rec.kept_by.as_deref().unwrap_or(here),
    })
}

/// A finished task's key: its finish time (big-endian) and id, so that byte order is
/// (finish time, id) order on every replica; in hex, a page's `next`.
fn key(ms: u64, id: &str) -> Vec<u8> {
    let mut key = ms.to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

fn parse_cursor(c: &str) -> Option<(u64, String)> {
    if c.len() > 2 * (8 + 256) {
        return None;
    }
    let key = crate::domain::unhex(c)?;
    let (ms, id) = key.split_at_checked(8)?;
    let ms = u64::from_be_bytes(ms.try_into().ok()?);
    let id = std::str::from_utf8(id).ok()?;
    (!id.is_empty()).then(|| (ms, id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(replica: &str, tasks: &[(u64, &str, &str)], next: Option<u64>) -> Source {
        Source {
            replica: replica.into(),
            entries: tasks
                .iter()
                .map(|(ms, id, keeper)| (key(*ms, id), json!({"task_id": id, "replica": keeper})))
                .collect(),
            next: next.map(|ms| key(ms, "")),
            scanned: tasks.len(),
        }
    }

    /// A page whose copies are all left out holds fewer than `limit`: it still ends where
    /// the replica that stopped soonest stopped, so the next page lists none twice.
    #[test]
    fn a_page_ends_where_a_replica_with_more_stopped() {
        // Here: copies of b's tasks (finished a moment after b's), then one of its own.
        let here = source("a", &[(5, "k2", "b"), (3, "k1", "b")], Some(3));
        let b = source("b", &[(4, "k2", "b"), (2, "k1", "b")], None);
        let (tasks, next, scanned) = merge(vec![here, b], 2);
        let ids: Vec<_> = tasks.iter().map(|t| t["task_id"].clone()).collect();
        assert_eq!(ids, [json!("k2")], "k1 is past where a stopped");
        assert_eq!(next, Some(key(3, "")));
        assert_eq!(scanned, 4);
        let here = source("a", &[(1, "h0", "a")], None);
        let b = source("b", &[(2, "k1", "b")], None);
        let (tasks, next, _) = merge(vec![here, b], 2);
        let ids: Vec<_> = tasks.iter().map(|t| t["task_id"].clone()).collect();
        assert_eq!((ids, next), (vec![json!("k1"), json!("h0")], None));
    }
}
