//! Policies over HTTP: `GET|PUT /v1/policy`, `POST /v1/policy/check`,
//! `POST /v1/policy/replay`, `GET /v1/policy/history[/{version}]`, and the deferred queue
//! at `GET /v1/tasks?state=deferred`. Shapes: docs/api.md and docs/policy.md.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap as HttpHeaders;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::listing::{Keyed, Order};
use super::{ApiError, AppState};
use crate::policy::{Document, PolicyError, Source, replay, sync, testcase};

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::Invalid(p) => ApiError::Invalid(p),
            PolicyError::Forbidden(m) => ApiError::Forbidden(m),
            PolicyError::Read { .. } => ApiError::BadRequest(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// `GET /v1/policy`: the policy in force, where budgets stand, the last rejection.
pub async fn current(State(s): State<AppState>) -> Result<Response, ApiError> {
    let engine = &s.core.policy;
    let live = engine.live();
    let p = &live.policy;
    let c = &engine.counters;
    Ok(Json(json!({
        "version": p.version,
        "revision": live.revision,
        "sha256": p.sha256,
        "source": live.source,
        "identity": live.identity,
        "applied_at": crate::policy::budget::rfc3339(live.applied_at_ms),
        "summary": p.summary(),
        "documents": p.documents.iter().map(|d| &d.name).collect::<Vec<_>>(),
        "budgets": p.budgets,
        "throttles": p.throttles,
        "reroutes": p.reroutes,
        "alerts": p.alerts,
        "escalation": p.escalation,
        "redaction": p.redaction,
        "sampling": p.sampling,
        "tests": p.tests.len(),
        "standing": engine.standing(),
        // Replicas sharing the intake, this one included: each throttle's rate is
        // divided among them (docs/policy.md, "Throttles").
        "replicas": engine.replicas(),
        "deferred": engine.deferrals.len(),
        "last_rejection": engine.last_rejection(),
        "counters": {
            "swaps": c.swaps.get(),
            "rejected_changes": c.rejected.get(),
            "deferred": c.deferred.get(),
            "released": c.released.get(),
            "throttled": c.throttled.get(),
            "budget_rejected": c.budget_rejected.get(),
        },
    }))
    .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutQuery {
    /// The document's name (default `pushed.policy.toml`), for a TOML body.
    pub name: Option<String>,
}

/// The documents of a request body: a JSON `{"documents":[{"name","text"}]}`, or one
/// TOML document.
fn documents(body: &Bytes, name: Option<String>) -> Result<Vec<Document>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::BadRequest("the policy is not UTF-8 text".into()))?;
    if text.trim_start().starts_with('{') {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Docs {
            documents: Vec<Document>,
        }
        let d: Docs = serde_json::from_str(text)
            .map_err(|e| ApiError::BadRequest(format!("policy JSON: {e}")))?;
        if d.documents.is_empty() {
            return Err(ApiError::BadRequest("documents must not be empty".into()));
        }
        return Ok(d.documents);
    }
    let name = name
        .filter(|n| !n.is_empty() && n.len() <= 200)
        .unwrap_or_else(|| "pushed.policy.toml".into());
    Ok(vec![Document {
        name,
        text: text.to_string(),
    }])
}

/// `PUT /v1/policy[?name=]`: validate, store in the policy bucket, swap in. Needs the
/// compliance token.
pub async fn put(
    State(s): State<AppState>,
    remote: super::RemoteAddr,
    headers: HttpHeaders,
    caller: Option<axum::Extension<super::auth::Caller>>,
    q: Result<Query<PutQuery>, QueryRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // With roles configured the middleware has checked the compliance role; in local mode
    // pushes still need the compliance token, as before roles.
    let proven = caller
        .as_ref()
        .is_some_and(|c| c.role == Some(crate::config::Role::Compliance));
    let checked = if proven {
        Ok(())
    } else {
        sync::check_token(s.compliance_token.as_deref(), auth)
    };
    if let Err(why) = checked {
        s.core
            .policy
            .refuse_unauthorised(
                Source::Http,
                &super::auth::identity(&headers),
                remote.0.map(|a| a.ip().to_string()),
                why.clone(),
            )
            .await;
        return Err(if s.compliance_token.is_none() {
            ApiError::Forbidden(why)
        } else {
            ApiError::Unauthorized(why)
        });
    }
    let docs = documents(&body, q.name)?;
    let who = super::auth::who(caller, &headers);
    let version = s.policies.propose(docs, Source::Http, &who).await?;
    Ok(Json(json!({ "accepted": true, "version": version })).into_response())
}

/// `POST /v1/policy/check`: validate and run the embedded tests; changes nothing.
pub async fn check(
    State(s): State<AppState>,
    q: Result<Query<PutQuery>, QueryRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let docs = documents(&body, q.name)?;
    let live = s.core.policy.live();
    let policy = crate::policy::Policy::parse(docs, live.check_against())?;
    let tests = testcase::run(&policy, &live.rubric, &live.registry, &live.routing);
    Ok(Json(json!({
        "valid": true,
        "sha256": policy.sha256,
        "summary": policy.summary(),
        "diff": crate::policy::load::diff(&live.policy, &policy),
        "tests": tests,
    }))
    .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayQuery {
    /// How far back (`1h`, `30m`, `2d`); default 1h.
    pub last: Option<String>,
    pub name: Option<String>,
    /// Most decisions replayed (1-1,000,000, default 100,000).
    pub max: Option<usize>,
}

/// `POST /v1/policy/replay?last=1h`: the recent decisions under a candidate policy.
pub async fn shadow_replay(
    State(s): State<AppState>,
    q: Result<Query<ReplayQuery>, QueryRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let last = humantime::parse_duration(q.last.as_deref().unwrap_or("1h"))
        .map_err(|e| ApiError::BadRequest(format!("last: {e}")))?;
    let max = super::count_param("max", q.max, 100_000, 1_000_000)?;
    let docs = documents(&body, q.name)?;
    let live = s.core.policy.live();
    let mut candidate = crate::policy::Policy::parse(docs, live.check_against())?;
    candidate.version = "candidate".into();
    let until = crate::fleet::now_ms();
    let since = until.saturating_sub(last.as_millis() as u64);
    let log = s.core.decisions.clone();
    let fleet = s.core.route_snapshot(&live.routing);
    // The log's pages are read from files (blocking), and decided one at a time as they
    // come, so the span is never held whole.
    let report = tokio::task::spawn_blocking(move || {
        let mut replay = replay::Replay::new(&candidate, &live, &fleet, since, until);
        log.walk_range(since, until, max, |d| replay.push(&d))?;
        Ok::<_, crate::decisions::DecisionLogError>(replay.finish())
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let mut report = report;
    let replicas = s.core.policy.replicas();
    if replicas > 1 {
        report.caveats.push(format!(
            "only this replica's decisions: {replicas} commander replicas share the intake and each logs its own (replay on each for the whole fleet)"
        ));
    }
    Ok(Json(report).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    pub limit: Option<usize>,
    /// Records before this sequence number (the previous page's last `seq`).
    pub before: Option<u64>,
}

/// `GET /v1/policy/history`: every attempt, newest first (documents left out).
pub async fn history(
    State(s): State<AppState>,
    q: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = super::count_param("limit", q.limit, 50, 500)?;
    let mut records = s
        .core
        .policy
        .audit
        .list(limit, q.before)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    for r in &mut records {
        r.documents.clear();
    }
    Ok(Json(json!({ "records": records })).into_response())
}

/// `GET /v1/policy/history/{version}`: one version's record with its documents.
pub async fn version(
    State(s): State<AppState>,
    Path(version): Path<String>,
) -> Result<Response, ApiError> {
    match s
        .core
        .policy
        .audit
        .version(&version)
        .map_err(|e| ApiError::Internal(e.to_string()))?
    {
        Some(r) => Ok(Json(r).into_response()),
        None => Err(ApiError::NotFound(format!(
            "policy version {version} not in the audit trail"
        ))),
    }
}

/// `GET /v1/tasks?state=deferred|parked[&limit=&cursor=]`: the deferred queue in release
/// order, or the tasks throttles parked in turn order, a page at a time; `next` (the last
/// listed task's key, in hex) continues after it, so a page stays right while tasks ahead
/// of it are released. `state=finished|completed|failed|rejected` lists the tasks that
/// have ended ([`super::finished`]).
pub async fn tasks(
    State(s): State<AppState>,
    q: Result<Query<super::finished::TasksQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let parked = match q.state.as_deref() {
        Some("deferred") => false,
        Some("parked") => true,
        Some(state) if super::finished::listable(state) => {
            let state = state.to_string();
            return super::finished::list(&s, &state, q).await;
        }
        other => {
            return Err(ApiError::BadRequest(format!(
                "state={} is not listable; use state=deferred, parked, finished, completed, failed or rejected (GET /v1/tasks/{{id}} for one task)",
                other.unwrap_or("")
            )));
        }
    };
    let only_finished = q.finished_filters();
    if !only_finished.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "{} filter(s) only a listing of finished tasks takes (state=finished, completed, failed or rejected)",
            only_finished.join(", ")
        )));
    }
    let limit = super::count_param("limit", q.limit, 100, MAX_LISTED)?;
    let after = match q.cursor.as_deref() {
        None => None,
        Some(c) => Some(waiting_key(parked, c).ok_or_else(|| {
            ApiError::BadRequest(format!("cursor {c:?} is not one this API returned"))
        })?),
    };
    // One more than asked, from this replica and each other that runs: the keys order
    // the fleet's queues as one.
    let (local, mut total) = waiting_page(&s, parked, after.as_deref(), limit + 1)?;
    let state = if parked { "parked" } else { "deferred" };
    let pages = s.peers.waiting(state, q.cursor.as_deref(), limit + 1).await;
    let replicas = 1 + pages.len();
    // A replica with more than its page has examined up to the page's last task.
    let reached =
        |entries: &Keyed, more: bool| entries.last().filter(|_| more).map(|(k, _)| k.clone());
    let local_reached = reached(&local, local.len() > limit);
    let mut sources = vec![(local, local_reached)];
    for page in pages {
        total = total.saturating_add(page.total);
        let entries: Keyed = page
            .tasks
            .into_iter()
            .filter_map(|e| Some((waiting_key(parked, &e.key)?, e.task)))
            .collect();
        let page_reached = reached(&entries, page.more);
        sources.push((entries, page_reached));
    }
    let (tasks, next) = super::listing::merge(sources, limit, Order::Ascending);
    let next = next.map(|k| crate::domain::hex(&k));
    let mut page = json!({
        "state": state,
        "total": total,
        "replicas": replicas,
        "tasks": tasks,
    });
    // Absent on the last page (docs/api.md).
    if let Some(next) = next {
        page["next"] = json!(next);
    }
    Ok(Json(page).into_response())
}

/// The most tasks one page of a listing of waiting tasks shows.
pub(crate) const MAX_LISTED: usize = 1000;

/// A waiting task's key (its place in the queue's order) from a listing's cursor.
pub(crate) fn waiting_key(parked: bool, cursor: &str) -> Option<Vec<u8>> {
    if parked {
        crate::policy::parked_cursor(cursor)
    } else {
        crate::policy::deferred_cursor(cursor)
    }
}

/// This replica's deferred queue in release order, or its parked tasks in turn order: at
/// most `limit` after the key `after`, each with its key and as the listing shows it
/// (`replica` says this one), and how many wait here in all.
pub(crate) fn waiting_page(
    s: &AppState,
    parked: bool,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<(Keyed, usize), ApiError> {
    let deferrals = &s.core.policy.deferrals;
    let list = if parked {
        deferrals.list_parked(limit, after)
    } else {
        deferrals.list(limit, after)
    }
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let entries = list
        .into_iter()
        .map(|t| {
            let key = t.key();
            let mut v = json!({
                "task_id": t.id,
                "priority": t.priority,
                "deferred_at": t.deferred_at,
                "until": t.until,
                "reason": t.reason,
                "pool": t.pool,
                "model": t.model,
                "est_cost_usd": t.est_usd,
                "releases": t.releases,
                "policy_version": t.policy_version,
                "replica": &*s.core.replica,
            });
            if let Some(turn) = t.turn {
                v["turn"] = json!(turn);
            }
            if let Some(ms) = t.deadline_ms {
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
                v["deadline"] = json!(humantime::format_rfc3339_millis(at).to_string());
            }
            if let Some(reason) = t.cancelled {
                v["cancelled"] = json!(reason);
            }
            (key, v)
        })
        .collect();
    let total = if parked {
        deferrals.parked_len()
    } else {
        deferrals.len()
    };
    Ok((entries, total))
}
