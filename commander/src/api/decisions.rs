//! The decision log and the classifier over HTTP: `/v1/decisions`,
//! `/v1/decisions/{task_id}`, `/v1/classifier`. Shapes: docs/api.md.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{ApiError, AppState};
use crate::decisions::{DecisionLogError, Filter};

impl From<DecisionLogError> for ApiError {
    fn from(e: DecisionLogError) -> Self {
        match e {
            DecisionLogError::BadCursor(_) => ApiError::BadRequest(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// `GET /v1/decisions?pool=&model=&task_type=&rule=&reason=&source=&outcome=&since_ms=&until_ms=&limit=&cursor=`
pub async fn list(
    State(s): State<AppState>,
    q: Result<Query<Filter>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(mut filter) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    filter.limit = Some(super::count_param(
        "limit",
        filter.limit,
        Filter::DEFAULT_LIMIT,
        Filter::MAX_LIMIT,
    )?);
    let log = s.core.decisions.clone();
    // Reading pages from the log's files blocks; a deep scan should not hold up the
    // runtime.
    let page = tokio::task::spawn_blocking(move || log.query(&filter))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(page).into_response())
}

/// `GET /v1/decisions/{task_id}`: the task's latest decision. With other replicas
/// running, one that does not keep the task's record here (another took it, or it was
/// released or handed over from here) asks them too, and shows the latest of theirs and
/// its own.
pub async fn one(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    // This replica keeps the record: its own decision is the latest.
    let keeps = || {
        s.core
            .store
            .get(&id)
            .ok()
            .flatten()
            .is_some_and(|rec| super::answers_for(&s, &rec))
    };
    let view = match view(&s, &id)? {
        Some(mine) if keeps() => Some(mine),
        // An id that is no NATS subject token is no task's (the API refuses it at submission).
        mine if !fleet_worker::protocol::is_subject_token(&id) => mine,
        mine => {
            let theirs = s.peers.decision(&id).await;
            latest(&id, mine.into_iter().chain(theirs))
        }
    };
    match view {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(ApiError::NotFound(format!("no decision for task {id}"))),
    }
}

/// Of the decisions logged for `task_id` (here and on other replicas), the latest: a task
/// deferred on one replica and released may be decided again on another.
pub(super) fn latest(
    task_id: &str,
    answers: impl IntoIterator<Item = serde_json::Value>,
) -> Option<serde_json::Value> {
    answers
        .into_iter()
        .filter(|d| d["task_id"] == task_id)
        .max_by_key(|d| d["at_ms"].as_u64().unwrap_or(0))
}

/// This replica's latest decision for `task_id` as the API shows it: with its kept
/// trace's link, and this replica, which made it.
pub(crate) fn view(s: &AppState, task_id: &str) -> Result<Option<serde_json::Value>, ApiError> {
    let Some(d) = s.core.decisions.get(task_id)? else {
        return Ok(None);
    };
    let link = super::traces::kept_link(s, d.trace_id.as_deref());
    let mut v = serde_json::to_value(d).map_err(|e| ApiError::Internal(e.to_string()))?;
    v["kept_trace"] = link;
    v["replica"] = json!(&*s.core.replica);
    Ok(Some(v))
}

/// `GET /v1/classifier`: the rubric in force, the endpoint, the breaker.
pub async fn classifier(State(s): State<AppState>) -> Response {
    let c = &s.core.classifier;
    let live = s.core.policy.live();
    let (rubric, generation) = (&live.rubric, live.rubric_generation);
    Json(json!({
        "endpoint": c.endpoint(),
        "protocol": c.protocol().as_str(),
        "model": c.model(),
        "breaker": c.breaker_state(),
        "rubric": {
            "name": rubric.name,
            "source": rubric.source,
            "generation": generation,
            "task_types": rubric.task_types.iter().map(|t| &t.name).collect::<Vec<_>>(),
            "tiers": rubric.tiers.iter().map(|t| json!({
                "name": t.name,
                "default_model": t.default_model,
                "candidates": t.candidates,
            })).collect::<Vec<_>>(),
            "last_reload_error": s.core.policy.files.rubric.last_error(),
        },
    }))
    .into_response()
}
