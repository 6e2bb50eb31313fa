//! `GET /v1/alerts`: the alerts open now (pending and firing) and the alert log (fired and
//! resolved), newest first, with filters and a cursor. Shapes: docs/alerts.md.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap as HttpHeaders;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

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
            Severity::parse,
            "info, warning, critical",
        )?,
        worker: q.worker,
        pool: q.pool,
        before_ms: q.before,
    };
    let limit = super::count_param("limit", q.limit, 100, 1000)?;
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

/// `GET /v1/silences`: every silence (active and ended), newest first.
pub async fn silences(State(s): State<AppState>) -> Response {
    let now = s.core.policy.now_ms();
    let all: Vec<Value> = s
        .alerts
        .silences
        .list()
        .into_iter()
        .map(|x| {
            let active = x.active(now);
            let mut v = serde_json::to_value(x).unwrap_or(Value::Null);
            v["active"] = json!(active);
            v
        })
        .collect();
    Json(json!({ "silences": all })).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSilence {
    /// `rule`, `severity`, `worker`, `pool` … to the value they must have (all must match).
    pub matchers: std::collections::BTreeMap<String, String>,
    /// How long it lasts, in seconds (at most 30 days).
    pub duration_s: u64,
    pub author: String,
    #[serde(default)]
    pub comment: String,
}

/// `POST /v1/silences`: mutes the alerts that match, for `duration_s`.
pub async fn add_silence(
    State(s): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let n = super::json_body::<NewSilence>(&body)?;
    let mut problems = Vec::new();
    if n.matchers.is_empty() {
        problems
            .push("matchers: name at least one (a silence of everything is refused)".to_string());
    }
    if let Some(r) = n.matchers.get("rule")
        && Rule::parse(r).is_none()
    {
        problems.push(format!("matchers.rule {r:?} is not a rule"));
    }
    if let Some(v) = n.matchers.get("severity")
        && Severity::parse(v).is_none()
    {
        problems.push(format!(
            "matchers.severity {v:?} is not a severity (info, warning, critical)"
        ));
    }
    if !(1..=30 * 24 * 3600).contains(&n.duration_s) {
        problems.push(format!(
            "duration_s {} must be 1 to 2592000 (30 days)",
            n.duration_s
        ));
    }
    if n.author.trim().is_empty() || n.author.chars().count() > 200 {
        problems.push("author must be 1-200 characters".to_string());
    }
    // Kept in sled, 10,000 silences deep: each is bounded, not just the request body.
    if n.comment.chars().count() > 1_000 {
        problems.push("comment must be at most 1000 characters".to_string());
    }
    if n.matchers.len() > 8
        || n.matchers
            .iter()
            .any(|(k, v)| k.chars().count() > 64 || v.chars().count() > 256)
    {
        problems.push(
            "matchers: at most 8, each a name of at most 64 characters and a value of at most 256"
                .to_string(),
        );
    }
    if !problems.is_empty() {
        return Err(ApiError::BadRequest(problems.join("; ")));
    }
    let now = s.core.policy.now_ms();
    let silence = crate::detect::silence::Silence {
        id: format!("silence-{now}-{:08x}", rand::random::<u32>()),
        matchers: n.matchers,
        author: n.author,
        comment: n.comment,
        created_ms: now,
        ends_ms: now + n.duration_s * 1000,
        expired_ms: None,
        expired_by: None,
    };
    let edit = crate::detect::shared::Edit::Silence(silence.clone());
    if let Some(shared) = &s.alerts.shared {
        shared.room_for(&edit).map_err(ApiError::Conflict)?;
    }
    let silences = s.alerts.silences.clone();
    let saved = tokio::task::spawn_blocking(move || silences.add(silence))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    s.alerts.share(edit);
    Ok((axum::http::StatusCode::CREATED, Json(saved)).into_response())
}

/// `DELETE /v1/silences/{id}`: ends a silence now.
pub async fn expire_silence(
    State(s): State<AppState>,
    headers: HttpHeaders,
    caller: Option<axum::Extension<super::auth::Caller>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let by = super::auth::who(caller, &headers);
    let now = s.core.policy.now_ms();
    let silences = s.alerts.silences.clone();
    let ended = tokio::task::spawn_blocking(move || silences.expire(&id, &by, now))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    match ended {
        Some(x) => {
            s.alerts
                .share(crate::detect::shared::Edit::Silence(x.clone()));
            Ok(Json(x).into_response())
        }
        None => Err(ApiError::NotFound("no such silence".into())),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterventionsQuery {
    /// `active` (in force now), `done`, `skipped`, `reverted` or `all` (default).
    pub state: Option<String>,
    /// Only those of this alert.
    pub alert: Option<String>,
    /// Only those reaching this worker (its own, or its pool's).
    pub worker: Option<String>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<usize>,
}

/// `GET /v1/interventions`: the escalation steps taken, newest first.
pub async fn interventions(
    State(s): State<AppState>,
    q: Result<Query<InterventionsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    use crate::detect::intervene::{InterventionState, Target};
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let state = match q.state.as_deref() {
        None | Some("all") => None,
        Some(x) => Some(InterventionState::parse(x).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "state {x:?}: use one of active, done, skipped, reverted, all"
            ))
        })?),
    };
    let limit = super::count_param("limit", q.limit, 100, 1000)?;
    let log = s.alerts.interventions.clone();
    let list = tokio::task::spawn_blocking(move || {
        log.list(limit, |i| {
            state.is_none_or(|st| st == i.state)
                && q.alert.as_ref().is_none_or(|a| a == &i.alert_id)
                && q.worker.as_ref().is_none_or(|w| {
                    i.target == Target::Worker(w.clone())
                        || i.workers.iter().any(|o| &o.worker == w)
                })
        })
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    // What decisions refuse right now, as the live snapshot holds it.
    let live = s.core.policy.live();
    let reroutes: Vec<Value> = live
        .reroutes
        .iter()
        .map(|r| json!({"from": r.from, "to": r.to, "reason": r.forced}))
        .collect();
    Ok(Json(json!({
        "interventions": list,
        "blocks": *live.blocks,
        "reroutes": reroutes,
    }))
    .into_response())
}

/// `POST /v1/interventions/{id}/revert`: ends an intervention in force by hand (an
/// operator); its workers are told at once. It is not
/// applied again while the same alert fires. An operator's intervention ends on every
/// replica.
pub async fn revert_intervention(
    State(s): State<AppState>,
    headers: HttpHeaders,
    caller: Option<axum::Extension<super::auth::Caller>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let by = format!("operator {}", super::auth::who(caller, &headers));
    let now = s.core.policy.now_ms();
    let log = s.alerts.interventions.clone();
    let done = tokio::task::spawn_blocking(move || log.revert(&id, &by, now))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    if crate::detect::shared::is_operators(&done) {
        s.alerts
            .share(crate::detect::shared::Edit::End(done.clone()));
    }
    s.alerts.kick.notify_one();
    Ok(Json(done).into_response())
}

impl From<crate::detect::act::InterventionError> for ApiError {
    fn from(e: crate::detect::act::InterventionError) -> Self {
        use crate::detect::act::InterventionError as E;
        match e {
            E::NotFound(_) => ApiError::NotFound(e.to_string()),
            E::NotActive { .. } => ApiError::Conflict(e.to_string()),
            E::Store(e) => ApiError::Internal(e.to_string()),
        }
    }
}
