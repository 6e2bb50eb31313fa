//! `GET /v1/tasks?state=finished|completed|failed|rejected`: the tasks that have ended,
//! newest first, from the store's retention queue (the order they finished in), with
//! filters. Shapes: docs/api.md "Tasks".

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use fleet_worker::message::ResultStatus;

use super::ApiError;
use crate::store::{FinishedPage, TaskRecord, TaskState};

/// The query of `GET /v1/tasks`: `state`, the page, and the filters of a listing of
/// finished tasks.
#[derive(Debug, Default, Deserialize)]
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

pub fn list(store: &crate::store::Store, state: &str, q: TasksQuery) -> Result<Response, ApiError> {
    let filter = Filter {
        states: states(state).unwrap_or_default(),
        status: q.status.as_deref().map(status).transpose()?,
        code: q.code,
        pool: q.pool,
        worker: q.worker,
        model: q.model,
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
    let page = store
        .finished(
            before.as_ref().map(|(ms, id)| (*ms, id.as_str())),
            q.since_ms.unwrap_or(0),
            MAX_SCAN,
            limit,
            |rec| filter.keeps(rec),
        )
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(answer(state, page)).into_response())
}

fn status(s: &str) -> Result<ResultStatus, ApiError> {
    serde_json::from_value(json!(s)).map_err(|_| {
        ApiError::BadRequest(format!(
            "status={s}: one of ok, failed, cancelled, rejected"
        ))
    })
}

fn answer(state: &str, page: FinishedPage) -> Value {
    let tasks: Vec<Value> = page
        .tasks
        .iter()
        .map(|(ms, rec)| {
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
            })
        })
        .collect();
    json!({
        "state": state,
        "tasks": tasks,
        "next": page.next.map(|(ms, id)| cursor(ms, &id)),
        "scanned": page.scanned,
    })
}

/// A page's `next`: the last task examined (its finish time and id), in hex.
fn cursor(ms: u64, id: &str) -> String {
    let mut key = ms.to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    crate::domain::hex(&key)
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
