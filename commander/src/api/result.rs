//! `GET /v1/tasks/{id}/result`: a task's result for a producer that speaks HTTP only.
//!
//! The result is read from the results stream, where its publisher (a worker, or the
//! commander for a task that never ran) stored it, and answered as published: the same
//! JSON a NATS producer reads on `<prefix>.results.<id>`. The task record keeps the outcome
//! but never the output, so the stream is the one place that has it.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleet_worker::protocol::{self, headers, is_subject_token};
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState};
use crate::store::TaskState;

/// The longest a caller may ask to wait: a long poll, not a subscription. A caller that
/// wants longer asks again.
pub const MAX_WAIT_S: u64 = 60;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultQuery {
    /// How long to wait for a result not yet published, in seconds (0–60, default 0).
    wait_s: Option<u64>,
}

/// The answer while a task has no result yet.
#[derive(Debug, Serialize)]
struct Pending {
    task_id: String,
    /// The record's state (`received`, `deferred`, `dispatched`); `null` for a task the
    /// commander has no record of yet (submitted over NATS a moment ago).
    state: Option<TaskState>,
    status_url: String,
}

pub async fn result(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<ResultQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if !is_subject_token(&id) {
        return Err(ApiError::BadRequest(format!(
            "{id:?} is not a valid task id"
        )));
    }
    let wait_s = q.wait_s.unwrap_or(0);
    if wait_s > MAX_WAIT_S {
        return Err(ApiError::BadRequest(format!(
            "wait_s={wait_s}: must be 0-{MAX_WAIT_S} (default 0)"
        )));
    }
    // A shutdown ends the wait at once, answered as a wait with no result yet is (202):
    // the caller asks again, of this commander once it is back or of another replica.
    // Waiting on would hold the shutdown for the rest of `wait_s`, then drop the
    // connection with no answer.
    let mut closing = s.events.closing();
    let shutdown = async move {
        // An error is a hub dropped: no shutdown to wait for.
        if closing.wait_for(|closing| *closing).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let looked = tokio::select! {
        looked = s.intake.result(&id, Duration::from_secs(wait_s)) => looked,
        () = shutdown => s.intake.result(&id, Duration::ZERO).await,
    };
    let stored = looked.map_err(|e| {
        ApiError::Busy(format!(
            "the result of task {id} cannot be read now: {e}; retry later"
        ))
    })?;
    if let Some(stored) = stored {
        return Ok(published(stored));
    }
    let record = s
        .core
        .store
        .get(&id)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    match record {
        // Finished, yet nothing on its result subject: results are kept 7 days
        // (docs/protocol.md §2), records longer.
        Some(rec) if rec.state.is_terminal() => Err(ApiError::Gone(format!(
            "the result of task {id} is no longer kept (the results stream keeps a result 7 days); its record still has the outcome: GET /v1/tasks/{id}"
        ))),
        Some(rec) => Ok(pending(&id, Some(rec.state))),
        // A task submitted over NATS is in the intake stream before the commander records
        // it: a caller who waited and still finds nothing is told so, not sent away.
        None if wait_s > 0 => Ok(pending(&id, None)),
        None => Err(ApiError::NotFound(format!(
            "task {id} not found: no record and no result"
        ))),
    }
}

/// 200 with the result as published, and the trace context it carries: a worker's
/// process span, or for a dead letter the dispatch span (the commander's own rejections
/// and cancels carry none).
fn published(stored: fleet_worker::StoredResult) -> Response {
    let mut resp = (StatusCode::OK, stored.payload).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for name in [headers::TRACEPARENT, headers::TRACESTATE, headers::ATTEMPT] {
        let value = protocol::header(Some(&stored.headers), name)
            .and_then(|v| HeaderValue::from_str(v).ok());
        if let Some(value) = value {
            h.insert(name, value);
        }
    }
    resp
}

/// 202 with where the task is, and when to ask again.
fn pending(id: &str, state: Option<TaskState>) -> Response {
    let body = Pending {
        task_id: id.to_string(),
        state,
        status_url: format!("/v1/tasks/{id}"),
    };
    let mut resp = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}
