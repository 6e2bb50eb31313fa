//! `GET /v1/alerts`: the alerts open now (pending and firing) and the alert log (fired and
//! resolved), newest first, with filters and a cursor. Shapes: docs/alerts.md.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState};
use crate::detect::{AlertState, Filter, Rule, Severity};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    /// `open` (default: pending and firing), `firing`, `pending`, `resolved`, `all`.
    pub state: Option<String>,
    pub rule: Option<String>,
    pub severity: Option<String>,
    pub worker: Option<String>,
    pub pool: Option<String>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<usize>,
    /// Only alerts that started before this (Unix ms): the `next_before` of a page.
    pub before: Option<u64>,
}

fn parse<T>(
    what: &str,
    v: Option<&str>,
    f: impl Fn(&str) -> Option<T>,
    words: &str,
) -> Result<Option<T>, ApiError> {
    match v {
        None => Ok(None),
        Some(s) => f(s)
            .map(Some)
            .ok_or_else(|| ApiError::BadRequest(format!("{what} {s:?}: use one of {words}"))),
    }
}

pub async fn list(
    State(s): State<AppState>,
    q: Result<Query<AlertsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let which = q.state.as_deref().unwrap_or("open");
    if !matches!(which, "open" | "firing" | "pending" | "resolved" | "all") {
        return Err(ApiError::BadRequest(format!(
            "state {which:?}: use one of open, firing, pending, resolved, all"
        )));
    }
    let rule_names = Rule::ALL.map(Rule::as_str).join(", ");
    let filter = Filter {
        state: match which {
            "firing" => Some(AlertState::Firing),
            "pending" => Some(AlertState::Pending),
            "resolved" => Some(AlertState::Resolved),
            _ => None,
        },
        rule: parse("rule", q.rule.as_deref(), Rule::parse, &rule_names)?,
        severity: parse(
            "severity",
            q.severity.as_deref(),
            |s| {
                [Severity::Info, Severity::Warning, Severity::Critical]
                    .into_iter()
                    .find(|v| v.as_str() == s)
            },
            "info, warning, critical",
        )?,
        worker: q.worker,
        pool: q.pool,
        before_ms: q.before,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    // Open alerts live in the detector; fired ones are also in the log (their latest
    // state), so the log answers `resolved` and `all` and the open set answers the rest.
    let alerts = match which {
        "open" | "firing" | "pending" => s
            .alerts
            .open
            .load()
            .iter()
            .filter(|a| filter.matches(a))
            .take(limit)
            .cloned()
            .collect::<Vec<_>>(),
        _ => {
            let log = s.alerts.log.clone();
            let f = filter.clone();
            tokio::task::spawn_blocking(move || log.list(&f, limit))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .map_err(|e| ApiError::Internal(e.to_string()))?
        }
    };
    let next_before = (alerts.len() == limit)
        .then(|| alerts.last().map(|a| a.started_ms))
        .flatten();
    Ok(Json(json!({
        "state": which,
        "alerts": alerts,
        "next_before": next_before,
    }))
    .into_response())
}

/// `GET /v1/alerts/sinks`: each sink's delivery state and counters.
pub async fn sinks(State(s): State<AppState>) -> Response {
    Json(json!({ "sinks": s.alerts.sinks.states() })).into_response()
}
