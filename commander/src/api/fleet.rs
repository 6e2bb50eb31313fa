//! Live fleet state over HTTP: `/v1/fleet`, `/v1/workers`, `/v1/workers/{id}`, `/v1/pools`,
//! `/v1/costs`, `/v1/models`. Shapes and units: docs/api.md.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ApiError, AppState};
use crate::fleet::QueryError;
use crate::fleet::costs::Dim;
use crate::fleet::view::WorkerView;
use crate::fleet::worker::State as WorkerState;

/// Longest window the costs ledger and the fleet series keep.
const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        ApiError::Busy(format!("the live fleet state did not answer: {e}"))
    }
}

/// A query's window: `default` when absent, else `min` (the finest grain that window is
/// kept at, so a shorter one could only be answered with more than it asked for) to 24 h.
fn window(raw: Option<&str>, default: Duration, min: Duration) -> Result<Duration, ApiError> {
    let Some(raw) = raw else { return Ok(default) };
    let w = humantime::parse_duration(raw).map_err(|e| {
        ApiError::BadRequest(format!(
            "window {raw:?} is not a duration like 15m, 1h or 24h: {e}"
        ))
    })?;
    if w < min || w > MAX_WINDOW {
        return Err(ApiError::BadRequest(format!(
            "window {raw:?} must be {} to 24h",
            humantime::format_duration(min)
        )));
    }
    Ok(w)
}

/// The fleet series' grain (10 s) and the cost ledger's (a minute).
const SERIES_GRAIN: Duration = Duration::from_secs(10);
const COSTS_GRAIN: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverviewQuery {
    /// Also return the fleet's 10 s series over this window (e.g. `1h`, up to `24h`).
    series: Option<String>,
}

pub async fn overview(
    State(s): State<AppState>,
    Query(q): Query<OverviewQuery>,
) -> Result<Response, ApiError> {
    let snap = s.core.fleet.snapshot();
    let mut body =
        serde_json::to_value(&snap.fleet).map_err(|e| ApiError::Internal(e.to_string()))?;
    if let Some(raw) = q.series.as_deref() {
        let w = window(Some(raw), Duration::from_secs(3600), SERIES_GRAIN)?;
        let series = s.core.fleet.fleet_series(w.as_millis() as u64).await?;
        body["series"] = json!(series);
    }
    Ok(Json(body).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersQuery {
    pool: Option<String>,
    /// IDLE, ACTIVE, WAITING, STUCK, ERROR or LOST (case-insensitive).
    state: Option<String>,
    model: Option<String>,
    /// Workers whose id contains this (case-insensitive).
    q: Option<String>,
    /// `id` (default), `state`, `pool`, `model`, `cost_usd`, `burn_rate`, `tasks`,
    /// `errors`, `context`, `tokens_per_s` or `uptime`.
    sort: Option<String>,
    /// `asc` (default) or `desc`.
    order: Option<String>,
    /// Default 100, at most 1000.
    limit: Option<usize>,
    offset: Option<usize>,
}

/// The key a worker list is sorted by (ties by id, so pages are stable).
fn sort_workers(ws: &mut [&WorkerView], by: &str, desc: bool) -> Result<(), ApiError> {
    use std::cmp::Ordering;
    let cmp: fn(&WorkerView, &WorkerView) -> Ordering = match by {
        "id" => |_, _| Ordering::Equal,
        "state" => |a, b| (a.lost, a.state.as_str()).cmp(&(b.lost, b.state.as_str())),
        "pool" => |a, b| a.pool.cmp(&b.pool),
        "model" => |a, b| a.model.cmp(&b.model),
        "cost_usd" => |a, b| {
            a.cost_usd
                .partial_cmp(&b.cost_usd)
                .unwrap_or(Ordering::Equal)
        },
        "burn_rate" => |a, b| {
            a.burn_rate_usd_per_h
                .partial_cmp(&b.burn_rate_usd_per_h)
                .unwrap_or(Ordering::Equal)
        },
        "tasks" => |a, b| a.tasks_completed.cmp(&b.tasks_completed),
        "errors" => |a, b| a.tasks_failed.cmp(&b.tasks_failed),
        "context" => |a, b| {
            a.context_utilisation
                .unwrap_or(-1.0)
                .partial_cmp(&b.context_utilisation.unwrap_or(-1.0))
                .unwrap_or(Ordering::Equal)
        },
        "tokens_per_s" => |a, b| {
            a.output_tokens_per_s
                .partial_cmp(&b.output_tokens_per_s)
                .unwrap_or(Ordering::Equal)
        },
        "uptime" => |a, b| a.uptime_s.cmp(&b.uptime_s),
        other => {
            return Err(ApiError::BadRequest(format!(
                "sort {other:?} is not one of id, state, pool, model, cost_usd, burn_rate, tasks, errors, context, tokens_per_s, uptime"
            )));
        }
    };
    ws.sort_by(|a, b| {
        let o = cmp(a, b).then_with(|| a.id.cmp(&b.id));
        if desc { o.reverse() } else { o }
    });
    Ok(())
}

#[derive(Debug, Serialize)]
struct WorkerPage<'a> {
    /// Workers matching the filters.
    total: usize,
    offset: usize,
    limit: usize,
    /// Offset of the next page, if there is one.
    next_offset: Option<usize>,
    workers: Vec<&'a WorkerView>,
}

pub async fn workers(
    State(s): State<AppState>,
    Query(q): Query<WorkersQuery>,
) -> Result<Response, ApiError> {
    let state_filter = match q.state.as_deref().map(str::to_ascii_uppercase) {
        None => None,
        Some(st) if st == "LOST" => Some(None),
        Some(st) => Some(Some(
            WorkerState::ALL
                .into_iter()
                .find(|x| x.as_str() == st)
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "state {st:?} is not one of IDLE, ACTIVE, WAITING, STUCK, ERROR, LOST"
                    ))
                })?,
        )),
    };
    let limit = super::count_param("limit", q.limit, 100, 1000)?;
    let offset = q.offset.unwrap_or(0);
    let snap = s.core.fleet.snapshot();
    let matching: Vec<&WorkerView> = snap
        .workers
        .iter()
        .filter(|w| {
            q.pool
                .as_deref()
                .is_none_or(|p| w.pool.as_deref() == Some(p))
        })
        .filter(|w| {
            q.model
                .as_deref()
                .is_none_or(|m| w.model.as_deref() == Some(m))
        })
        .filter(|w| match state_filter {
            None => true,
            Some(None) => w.lost,
            Some(Some(st)) => !w.lost && w.state == st,
        })
        .collect();
    let mut matching = matching;
    if let Some(needle) =
        q.q.as_deref()
            .map(str::to_lowercase)
            .filter(|n| !n.is_empty())
    {
        matching.retain(|w| w.id.to_lowercase().contains(&needle));
    }
    let desc = match q.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => {
            return Err(ApiError::BadRequest(format!(
                "order {o:?} is not asc or desc"
            )));
        }
    };
    sort_workers(&mut matching, q.sort.as_deref().unwrap_or("id"), desc)?;
    let total = matching.len();
    let page: Vec<&WorkerView> = matching.into_iter().skip(offset).take(limit).collect();
    let next_offset = (offset + page.len() < total).then_some(offset + page.len());
    Ok(Json(WorkerPage {
        total,
        offset,
        limit,
        next_offset,
        workers: page,
    })
    .into_response())
}

pub async fn worker(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match s.core.fleet.worker(id.clone()).await? {
        Some(d) => Ok(Json(d).into_response()),
        None => Err(ApiError::NotFound(format!("worker {id} not found"))),
    }
}

pub async fn pools(State(s): State<AppState>) -> Result<Response, ApiError> {
    let snap = s.core.fleet.snapshot();
    Ok(Json(json!({ "pools": snap.pools })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostsQuery {
    /// Comma-separated dimensions to group by; none: one total row.
    by: Option<String>,
    /// How far back, e.g. `15m`, `1h` (default), `24h`.
    window: Option<String>,
}

pub async fn costs(
    State(s): State<AppState>,
    Query(q): Query<CostsQuery>,
) -> Result<Response, ApiError> {
    let mut by = Vec::new();
    let mut unknown = Vec::new();
    for name in
        q.by.as_deref()
            .unwrap_or("")
            .split(',')
            .filter(|n| !n.trim().is_empty())
    {
        match Dim::parse(name) {
            Some(d) if !by.contains(&d) => by.push(d),
            Some(_) => {}
            None => unknown.push(name.trim().to_string()),
        }
    }
    if !unknown.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "unknown dimension(s) {unknown:?}; use any of: {}",
            Dim::NAMES
        )));
    }
    let w = window(q.window.as_deref(), Duration::from_secs(3600), COSTS_GRAIN)?;
    let report = s.core.fleet.costs(by, w.as_millis() as u64).await?;
    Ok(Json(report).into_response())
}

pub async fn models(State(s): State<AppState>) -> Result<Response, ApiError> {
    let live = s.core.policy.live();
    let reg = &live.registry;
    Ok(Json(json!({
        "source": reg.source,
        "generation": live.registry_generation,
        "models": reg.models(),
        "last_reload_error": s.core.policy.files.registry.last_error(),
    }))
    .into_response())
}
