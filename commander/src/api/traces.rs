//! Kept traces over HTTP: `/v1/traces` and `/v1/traces/{trace_id}`; the trace link of a
//! task and of a decision. Shapes: docs/api.md, docs/traces.md.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{ApiError, AppState};
use crate::traces::store::{Filter, TraceStore, TraceStoreError, unhex};

impl From<TraceStoreError> for ApiError {
    fn from(e: TraceStoreError) -> Self {
        match e {
            TraceStoreError::BadCursor(_) => ApiError::BadRequest(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

fn store(s: &AppState) -> Result<TraceStore, ApiError> {
    s.core.traces.store.clone().ok_or_else(|| {
        ApiError::NotFound("traces are not kept here ([traces] enabled = false)".into())
    })
}

/// `GET /v1/traces?worker=&pool=&task_type=&task_id=&status=&why=&since_ms=&until_ms=&min_cost_usd=&min_duration_ms=&limit=&cursor=`
pub async fn list(
    State(s): State<AppState>,
    q: Result<Query<Filter>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(mut filter) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let store = store(&s)?;
    filter.limit = Some(super::count_param(
        "limit",
        filter.limit,
        Filter::DEFAULT_LIMIT,
        Filter::MAX_LIMIT,
    )?);
    if let Some(w) = &filter.why
        && crate::traces::sample::Why::parse(w).is_none()
    {
        return Err(ApiError::BadRequest(format!(
            "why={w:?} is not a reason a trace is kept for (docs/traces.md)"
        )));
    }
    for (name, v) in [
        ("min_cost_usd", filter.min_cost_usd),
        ("min_duration_ms", filter.min_duration_ms),
    ] {
        if let Some(v) = v.filter(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err(ApiError::BadRequest(format!(
                "{name}={v} must be a finite number >= 0"
            )));
        }
    }
    if let Some(st) = &filter.status
        && st != "ok"
        && st != "error"
    {
        return Err(ApiError::BadRequest(format!(
            "status={st:?}: use ok or error"
        )));
    }
    // sled reads are blocking; a deep scan should not hold up the runtime.
    let page = tokio::task::spawn_blocking(move || store.query(&filter))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(page).into_response())
}

/// `GET /v1/traces/{trace_id}`: the summary, the tasks it ran and its span tree.
pub async fn one(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let bytes = unhex(&id.to_ascii_lowercase())
        .filter(|b| b.len() == 16)
        .ok_or_else(|| ApiError::BadRequest(format!("{id:?} is not a trace id (32 hex digits)")))?;
    let store = store(&s)?;
    let stored = tokio::task::spawn_blocking(move || store.get(&bytes))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??
        .ok_or_else(|| ApiError::NotFound(format!("trace {id} was not kept (or has expired)")))?;
    let registry = s.core.policy.live().registry.clone();
    Ok(Json(crate::traces::tree::view(stored, &registry)).into_response())
}

/// `{"trace_id", "href"}` of a task's kept trace, or null: the trace kept under the task's
/// own trace id (`trace_id`, from its record or its decision), when one was kept.
pub fn kept_link(s: &AppState, trace_id: Option<&str>) -> serde_json::Value {
    let kept = match (&s.core.traces.store, trace_id.and_then(unhex)) {
        (Some(store), Some(id)) => store.contains(&id),
        _ => false,
    };
    match trace_id {
        Some(t) if kept => json!({ "trace_id": t, "href": format!("/v1/traces/{t}") }),
        _ => serde_json::Value::Null,
    }
}
