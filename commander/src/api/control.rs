//! The control plane: what an operator does to the fleet, over `POST /v1/control` (one
//! command per request, for scripts and `commander ctl`) or the `GET /v1/control`
//! WebSocket (one JSON command per message, one ack each, for the dashboard).
//!
//! Commands become operator interventions beside the escalation ladder's
//! (`detect::intervene`): a pause, drain, block or reroute is a sticky intervention named
//! `op-…` that stays in force until an operator ends it, and the detector's loop (woken at
//! once) tells the workers; a resume ends the pauses and drains on its target, a
//! `restore_pool` the blocks and reroutes on its pool. A cancel is a control command to
//! the worker running the task. The cost cap is a fleet budget the policy engine adds to
//! the policy in force (`PolicyEngine::set_cost_cap`).
//!
//! Every command is rate-limited per caller, answered with an ack (its id, ok or the
//! error, and the resulting state), and audited (who, what, when, result) in sled.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use fleet_worker::control::{Command, ControlReply, ControlRequest};
use futures::future::BoxFuture;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::auth::Caller;
use super::{ApiError, AppState};
use crate::detect::intervene::{self, Intervention, InterventionState, Target};
use crate::detect::shared;
use crate::pipeline::cancel::{PoolWithdrawal, Queued, WithdrawError, Withdrawn};
use crate::policy::schema::{BlockScope, EscalationAction};
use crate::store::{Store, StoreError, TaskRecord};

/// How the control plane reaches workers and their queues (in service: NATS).
pub trait Tell: Send + Sync + std::fmt::Debug {
    /// Sends one control command to a worker and returns its answer (a NATS request on
    /// `<prefix>.control.<worker>`).
    fn tell<'a>(
        &'a self,
        worker: &'a str,
        req: ControlRequest,
    ) -> BoxFuture<'a, Result<ControlReply, String>>;

    /// Takes a task that waits in its pool's queue out of it, ending it as `cancelled`
    /// with `reason` ([`crate::pipeline::cancel`]).
    fn withdraw<'a>(
        &'a self,
        task: &'a Queued,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<Withdrawn, WithdrawError>>;

    /// Cancels up to `max` of the tasks that wait in `pool`'s queue, oldest first.
    fn withdraw_pool<'a>(
        &'a self,
        pool: &'a str,
        reason: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<PoolWithdrawal, WithdrawError>>;
}

/// One command, as sent (JSON). Which fields a command takes: docs/api.md, "Control".
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Echoed in the ack; one is made up when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// `reroute_pool`: where the pool's tasks go instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// `weight_pool`: multiplies the pool's candidate scores (0.01 to 100; above 1 the
    /// pool is chosen less, below 1 more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// `cost_cap`: the fleet's limit in USD per `window`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd: Option<f64>,
    /// `cost_cap`: a rolling window (`1h`, `30m`, `1d`) or `hour`/`day`/`month`; default `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Why, in words: kept in the audit and on the intervention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A checked command.
#[derive(Clone, Debug, PartialEq)]
enum Op {
    Mode(EscalationAction, Target),
    Resume(Target),
    Cancel(String),
    Purge(String),
    Block(String),
    Reroute { pool: String, to: String },
    Weight { pool: String, weight: f64 },
    Restore(String),
    Cap { usd: f64, window: String },
    LiftCap,
}

/// Every command name, for the error that lists them.
pub const COMMANDS: &[&str] = &[
    "pause",
    "resume",
    "drain",
    "cancel",
    "purge_pool",
    "block_pool",
    "reroute_pool",
    "weight_pool",
    "restore_pool",
    "cost_cap",
    "lift_cost_cap",
];

fn need<'a>(v: &'a Option<String>, what: &str, cmd: &str) -> Result<&'a str, ApiError> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::BadRequest(format!("{cmd} needs {what}")))
}

fn target(r: &Request) -> Result<Target, ApiError> {
    match (&r.worker, &r.pool) {
        (Some(w), None) if !w.trim().is_empty() => Ok(Target::Worker(w.trim().to_string())),
        (None, Some(p)) if !p.trim().is_empty() => Ok(Target::Pool(p.trim().to_string())),
        _ => Err(ApiError::BadRequest(format!(
            "{} needs exactly one of worker or pool",
            r.command
        ))),
    }
}

/// The fields each command takes besides `command`, `id` and `reason`.
fn fields_of(command: &str) -> Option<&'static [&'static str]> {
    Some(match command {
        "pause" | "drain" | "resume" => &["worker", "pool"],
        "cancel" => &["task_id"],
        "block_pool" | "restore_pool" | "purge_pool" => &["pool"],
        "reroute_pool" => &["pool", "to"],
        "weight_pool" => &["pool", "weight"],
        "cost_cap" => &["usd", "window"],
        "lift_cost_cap" => &[],
        _ => return None,
    })
}

/// The longest `reason` a command may give, in characters.
const MAX_REASON_CHARS: usize = 1_000;

/// What the audit keeps of any one text field of a request (refused ones included): the
/// audit holds `auth.audit_records` requests, and each could otherwise be as long as
/// the body limit allows.
const AUDIT_FIELD_CHARS: usize = 1_000;

/// `text` cut to `max` characters (at a character boundary), marked with `…` when cut.
fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", text.get(..at).unwrap_or_default()),
        None => text.to_string(),
    }
}

impl Request {
    /// The request as the audit keeps it: every text field at most [`AUDIT_FIELD_CHARS`].
    fn for_audit(&self) -> Request {
        let c = |t: &Option<String>| t.as_deref().map(|t| cut(t, AUDIT_FIELD_CHARS));
        Request {
            id: c(&self.id),
            command: cut(&self.command, AUDIT_FIELD_CHARS),
            worker: c(&self.worker),
            pool: c(&self.pool),
            task_id: c(&self.task_id),
            to: c(&self.to),
            weight: self.weight,
            usd: self.usd,
            window: c(&self.window),
            reason: c(&self.reason),
        }
    }

    /// The optional fields that were sent.
    fn present(&self) -> Vec<&'static str> {
        [
            ("worker", self.worker.is_some()),
            ("pool", self.pool.is_some()),
            ("task_id", self.task_id.is_some()),
            ("to", self.to.is_some()),
            ("weight", self.weight.is_some()),
            ("usd", self.usd.is_some()),
            ("window", self.window.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }

    fn op(&self) -> Result<Op, ApiError> {
        let c = self.command.as_str();
        let takes = fields_of(c).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "unknown command {c:?}: one of {}",
                COMMANDS.join(", ")
            ))
        })?;
        if let Some(extra) = self.present().into_iter().find(|f| !takes.contains(f)) {
            return Err(ApiError::BadRequest(format!("{c} does not take {extra}")));
        }
        if let Some(n) = self
            .reason
            .as_deref()
            .map(|r| r.chars().count())
            .filter(|n| *n > MAX_REASON_CHARS)
        {
            return Err(ApiError::BadRequest(format!(
                "reason is {n} characters; at most {MAX_REASON_CHARS}"
            )));
        }
        let pool = || need(&self.pool, "pool", c).map(str::to_string);
        Ok(match c {
            "pause" => Op::Mode(EscalationAction::Pause, target(self)?),
            "drain" => Op::Mode(EscalationAction::Drain, target(self)?),
            "resume" => Op::Resume(target(self)?),
            "cancel" => Op::Cancel(need(&self.task_id, "task_id", c)?.to_string()),
            "block_pool" => Op::Block(pool()?),
            "purge_pool" => Op::Purge(pool()?),
            "restore_pool" => Op::Restore(pool()?),
            "reroute_pool" => {
                let (pool, to) = (
                    pool()?,
                    need(&self.to, "to (the pool that takes its tasks)", c)?,
                );
                if pool == to {
                    return Err(ApiError::BadRequest(format!(
                        "reroute_pool: {pool} cannot take its own tasks"
                    )));
                }
                Op::Reroute {
                    pool,
                    to: to.to_string(),
                }
            }
            "weight_pool" => {
                let weight = self
                    .weight
                    .ok_or_else(|| ApiError::BadRequest("weight_pool needs weight".into()))?;
                if !(weight.is_finite() && (0.01..=100.0).contains(&weight)) {
                    return Err(ApiError::BadRequest(format!(
                        "weight_pool: weight {weight} must be 0.01 to 100"
                    )));
                }
                Op::Weight {
                    pool: pool()?,
                    weight,
                }
            }
            "cost_cap" => {
                let usd = self.usd.ok_or_else(|| {
                    ApiError::BadRequest("cost_cap needs usd (the fleet's limit)".into())
                })?;
                if !(usd.is_finite() && usd >= 0.0) {
                    return Err(ApiError::BadRequest(format!(
                        "cost_cap: usd {usd} must be a number >= 0"
                    )));
                }
                Op::Cap {
                    usd,
                    window: self.window.clone().unwrap_or_else(|| "1h".into()),
                }
            }
            // `fields_of` knows no other command.
            _ => Op::LiftCap,
        })
    }
}

/// The answer to one command.
#[derive(Debug, Serialize)]
pub struct Ack {
    pub id: String,
    pub command: String,
    pub ok: bool,
    /// The id of the audit record.
    pub audit_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

/// One audited command.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditRecord {
    pub id: String,
    pub at_ms: u64,
    /// The token's name (`local` in local mode), and the `fleet-identity` header if sent.
    pub who: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// `http` or `websocket`.
    pub via: String,
    pub request: Request,
    pub ok: bool,
    /// The resulting state, or the error.
    pub result: Value,
}

/// The control plane's state: the audit log, the rate limiter, counters.
#[derive(Clone)]
pub struct Control {
    tree: sled::Tree,
    count: Arc<AtomicUsize>,
    max_records: usize,
    seq: Arc<AtomicU64>,
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
    pub allowed_origins: Arc<Vec<String>>,
    pub tell: Arc<dyn Tell>,
    pub counters: Arc<ControlCounters>,
    /// One permit per open control socket (`http.max_control_sockets`).
    sockets: Arc<tokio::sync::Semaphore>,
    /// How open sockets are watched for clients that have gone.
    pub socket_ping: SocketPing,
}

/// How often an open control socket is pinged, and how long it may stay without sending
/// anything (a pong included) before it is closed: a client whose machine slept or whose
/// network changed never closes its socket, and would hold one of
/// `http.max_control_sockets` for good. Every WebSocket client answers pings by itself.
#[derive(Clone, Copy, Debug)]
pub struct SocketPing {
    pub every: std::time::Duration,
    pub silent_for: std::time::Duration,
}

impl Default for SocketPing {
    fn default() -> Self {
        SocketPing {
            every: std::time::Duration::from_secs(30),
            silent_for: std::time::Duration::from_secs(75),
        }
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("records", &self.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct CommandLabels {
    pub command: String,
    pub outcome: &'static str,
}

/// `fleet_control_requests_total{command, outcome}`, `fleet_control_sockets` and
/// `fleet_control_sockets_refused_total`.
#[derive(Debug, Default)]
pub struct ControlCounters {
    pub requests: prometheus_client::metrics::family::Family<
        CommandLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    pub sockets: prometheus_client::metrics::gauge::Gauge,
    pub sockets_refused: prometheus_client::metrics::counter::Counter,
}

impl ControlCounters {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "control_requests",
            "Operator control commands, by command and outcome (ok, refused, rate_limited)",
            self.requests.clone(),
        );
        r.register(
            "control_sockets",
            "Control WebSockets open now",
            self.sockets.clone(),
        );
        r.register(
            "control_sockets_refused",
            "Control WebSockets refused because http.max_control_sockets were open",
            self.sockets_refused.clone(),
        );
    }
}

impl Control {
    /// `max_sockets` is `http.max_control_sockets`.
    pub fn open(
        store: &Store,
        cfg: &crate::config::AuthConfig,
        max_sockets: usize,
        tell: Arc<dyn Tell>,
    ) -> Result<Self, StoreError> {
        let tree = store.tree("control_audit")?;
        let last = tree
            .last()?
            .and_then(|(k, _)| k.get(8..16).and_then(|b| b.try_into().ok()))
            .map_or(0, u64::from_be_bytes);
        let per_s = NonZeroU32::new(cfg.control_per_s).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(cfg.control_burst).unwrap_or(NonZeroU32::MIN);
        Ok(Control {
            count: Arc::new(AtomicUsize::new(tree.len())),
            tree,
            max_records: cfg.audit_records.max(1),
            seq: Arc::new(AtomicU64::new(last + 1)),
            limiter: Arc::new(RateLimiter::keyed(
                Quota::per_second(per_s).allow_burst(burst),
            )),
            allowed_origins: Arc::new(cfg.allowed_origins.clone()),
            tell,
            counters: Arc::new(ControlCounters::default()),
            sockets: Arc::new(tokio::sync::Semaphore::new(max_sockets)),
            socket_ping: SocketPing::default(),
        })
    }

    /// A place for one more control socket, held until the socket closes; `None` (and
    /// counted) when `http.max_control_sockets` are open.
    fn socket_place(&self) -> Option<SocketPlace> {
        match self.sockets.clone().try_acquire_owned() {
            Ok(permit) => {
                self.counters.sockets.inc();
                Some(SocketPlace {
                    _permit: permit,
                    counters: self.counters.clone(),
                })
            }
            Err(_) => {
                self.counters.sockets_refused.inc();
                None
            }
        }
    }

    fn audit(&self, mut rec: AuditRecord) -> Result<String, StoreError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        rec.id = format!("ctl-{seq}");
        let mut key = rec.at_ms.to_be_bytes().to_vec();
        key.extend_from_slice(&seq.to_be_bytes());
        let body = serde_json::to_vec(&rec).map_err(|e| StoreError::Corrupt {
            id: rec.id.clone(),
            reason: e.to_string(),
        })?;
        self.tree.insert(key, body)?;
        if self.count.fetch_add(1, Ordering::Relaxed) + 1 > self.max_records
            && self.tree.pop_min()?.is_some()
        {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(rec.id)
    }

    /// The newest audit records, at most `limit`.
    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter().rev().take(limit) {
            let (_, v) = item?;
            if let Ok(r) = serde_json::from_slice(&v) {
                out.push(r);
            }
        }
        Ok(out)
    }
}

/// Who sent a command and over what, for the audit.
struct Who<'a> {
    caller: &'a Caller,
    identity: Option<String>,
    remote: Option<String>,
    via: &'static str,
}

/// Checks, rate-limits, applies and audits one command; the ack is the answer whatever
/// happened.
async fn handle(s: &AppState, from: &Who<'_>, req: Request) -> (Ack, Option<ApiError>) {
    let id = req
        .id
        .clone()
        .filter(|i| !i.is_empty() && i.len() <= 128)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let now = s.core.policy.now_ms();
    let result = if s.control.limiter.check_key(&from.caller.name).is_err() {
        Err(ApiError::RateLimited(format!(
            "{} sends control commands faster than auth.control_per_s allows; slow down",
            from.caller.name
        )))
    } else {
        match req.op() {
            Ok(op) => apply(s, from, &op, req.reason.as_deref(), now).await,
            Err(e) => Err(e),
        }
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(ApiError::RateLimited(_)) => "rate_limited",
        Err(_) => "refused",
    };
    s.control
        .counters
        .requests
        .get_or_create(&CommandLabels {
            command: if COMMANDS.contains(&req.command.as_str()) {
                req.command.clone()
            } else {
                "unknown".into()
            },
            outcome,
        })
        .inc();
    let (ok, state, error) = match &result {
        Ok(v) => (true, Some(v.clone()), None),
        Err(e) => (
            false,
            None,
            Some(json!({"code": e.code(), "message": e.to_string()})),
        ),
    };
    let who = match &from.identity {
        Some(i) if *i != from.caller.name => format!("{} ({i})", from.caller.name),
        _ => from.caller.name.clone(),
    };
    let rec = AuditRecord {
        id: String::new(),
        at_ms: now,
        who: who.clone(),
        remote: from.remote.clone(),
        via: from.via.into(),
        request: req.for_audit(),
        ok,
        result: state
            .clone()
            .or_else(|| error.clone())
            .unwrap_or(Value::Null),
    };
    let audit_id = match s.control.audit(rec) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "control command not audited");
            String::new()
        }
    };
    tracing::info!(who, command = %req.command, ok, audit = %audit_id, via = from.via, "control command");
    let ack = Ack {
        id,
        command: req.command,
        ok,
        audit_id,
        state,
        error,
    };
    (ack, result.err())
}

/// Ends (as `who`) every intervention in force that `matches`, on every replica for an
/// operator's; returns their ids.
fn end_matching(
    alerts: &crate::detect::run::Alerts,
    who: &str,
    now: u64,
    matches: impl Fn(&Intervention) -> bool,
) -> Result<Vec<String>, ApiError> {
    let log = &alerts.interventions;
    let mut ended = Vec::new();
    for i in log
        .active()
        .iter()
        .filter(|i| i.state == InterventionState::Active && matches(i))
    {
        let done = log.revert(&i.id, who, now)?;
        if shared::is_operators(&done) {
            alerts.share(shared::Edit::End(done));
        }
        ended.push(i.id.clone());
    }
    Ok(ended)
}

/// Stores a new operator intervention (it is in force from now, here at once and on the
/// other replicas once they follow the control bucket). 409 when `shared::MAX_ACTIVE` are
/// in force.
fn start(alerts: &crate::detect::run::Alerts, i: &Intervention) -> Result<(), ApiError> {
    let log = &alerts.interventions;
    let in_force = log
        .active()
        .iter()
        .filter(|x| shared::is_operators(x))
        .count();
    if in_force >= shared::MAX_ACTIVE {
        return Err(ApiError::Conflict(format!(
            "{in_force} operator interventions are in force, the most there may be: end some first (resume, restore_pool)"
        )));
    }
    let edit = shared::Edit::Start(i.clone());
    if let Some(share) = &alerts.shared {
        share.room_for(&edit).map_err(ApiError::Conflict)?;
    }
    log.record(i)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    alerts.share(edit);
    Ok(())
}

async fn apply(
    s: &AppState,
    from: &Who<'_>,
    op: &Op,
    reason: Option<&str>,
    now: u64,
) -> Result<Value, ApiError> {
    let alerts = &s.alerts;
    let who = from.caller.name.as_str();
    let why = reason.map_or(String::new(), |r| format!(": {r}"));
    let snap = s.core.fleet.snapshot();
    match op {
        Op::Mode(action, t) => {
            known_target(s, &snap, t).await?;
            let verb = action.as_str();
            let i = operator_intervention(*action, t.clone(), format!("{verb} by {who}{why}"), now);
            start(alerts, &i)?;
            s.alerts.kick.notify_one();
            Ok(state_of(s, t, Some(&i)))
        }
        Op::Resume(t) => {
            let ended = end_matching(alerts, who, now, |i| {
                i.target == *t
                    && matches!(i.action, EscalationAction::Pause | EscalationAction::Drain)
            })?;
            s.alerts.kick.notify_one();
            let mut v = state_of(s, t, None);
            v["ended"] = json!(ended);
            if ended.is_empty() {
                v["note"] = json!("nothing paused or drained this target");
            }
            Ok(v)
        }
        Op::Weight { pool, weight } => {
            known_target(s, &snap, &Target::Pool(pool.clone())).await?;
            let mut i = operator_intervention(
                EscalationAction::Reroute,
                Target::Pool(pool.clone()),
                format!("pool {pool} weighs {weight} in routing, by {who}{why}"),
                now,
            );
            i.step = "weight_pool".into();
            i.weight = Some((pool.clone(), *weight));
            // A new weight replaces the pool's previous one.
            end_matching(alerts, who, now, |x| {
                x.weight.as_ref().is_some_and(|(p, _)| p == pool)
            })?;
            start(alerts, &i)?;
            apply_routing(s);
            Ok(state_of(s, &Target::Pool(pool.clone()), Some(&i)))
        }
        Op::Block(pool) | Op::Reroute { pool, .. } => {
            configured_pool(s, pool)?;
            let mut i = operator_intervention(
                EscalationAction::Block,
                Target::Pool(pool.clone()),
                format!("pool {pool} blocked by {who}{why}"),
                now,
            );
            if let Op::Reroute { to, .. } = op {
                configured_pool(s, to)?;
                i.action = EscalationAction::Reroute;
                i.step = "reroute_pool".into();
                i.level = EscalationAction::Reroute.level();
                i.reroute = Some((pool.clone(), to.clone()));
                i.note = format!("pool {pool}'s tasks go to {to}, by {who}{why}");
            } else {
                i.block = Some((BlockScope::Pool, pool.clone()));
            }
            start(alerts, &i)?;
            apply_routing(s);
            Ok(state_of(s, &Target::Pool(pool.clone()), Some(&i)))
        }
        Op::Restore(pool) => {
            let ended = end_matching(alerts, who, now, |i| {
                i.block
                    .as_ref()
                    .is_some_and(|(sc, v)| *sc == BlockScope::Pool && v == pool)
                    || i.reroute.as_ref().is_some_and(|(from, _)| from == pool)
                    || i.weight.as_ref().is_some_and(|(p, _)| p == pool)
            })?;
            apply_routing(s);
            let mut v = state_of(s, &Target::Pool(pool.clone()), None);
            v["ended"] = json!(ended);
            Ok(v)
        }
        Op::Cancel(task) => cancel(s, task, who, reason).await,
        Op::Purge(pool) => purge(s, pool, who, reason).await,
        Op::Cap { usd, window } => set_cap(s, Some((*usd, window.as_str())), who),
        Op::LiftCap => set_cap(s, None, who),
    }
}

/// Sets or lifts the emergency cost cap, here at once and on the other replicas once they
/// follow the control bucket.
fn set_cap(s: &AppState, cap: Option<(f64, &str)>, who: &str) -> Result<Value, ApiError> {
    let cap = s
        .core
        .policy
        .set_cost_cap(cap, who)
        .map_err(ApiError::BadRequest)?;
    s.alerts.share(shared::Edit::Cap(cap.clone()));
    Ok(json!({ "cost_cap": cap }))
}

/// A 404 for a pool the routing table does not name (one with no pools configured takes
/// any).
fn configured_pool(s: &AppState, pool: &str) -> Result<(), ApiError> {
    let live = s.core.policy.live();
    if !live.routing.pools.is_empty() && !live.routing.pools.contains_key(pool) {
        return Err(ApiError::NotFound(format!("pool {pool} is not configured")));
    }
    Ok(())
}

/// A pool whose queue a purge may empty: a configured one, or one the live state found a
/// queue for (a pool taken out of the config, whose tasks still wait there:
/// docs/configuration.md, "Taking a pool out").
fn purgeable_pool(s: &AppState, pool: &str) -> Result<(), ApiError> {
    if configured_pool(s, pool).is_ok() {
        return Ok(());
    }
    let snap = s.core.fleet.snapshot();
    if snap
        .pools
        .iter()
        .any(|p| p.name == pool && p.queue.is_some())
    {
        return Ok(());
    }
    Err(ApiError::NotFound(format!(
        "pool {pool} is not configured and has no queue the commander has read"
    )))
}

/// Blocks, reroutes and weights take effect in the live snapshot at once (the detector's
/// next tick would do the same within a second).
fn apply_routing(s: &AppState) {
    crate::detect::act::put_routing_in_force(&s.core.policy, &s.alerts.interventions.active());
}

/// A worker the fleet has seen, or a pool it knows (configured, or with workers). The
/// snapshot is a second old at most; a worker new since then is asked of the live state.
async fn known_target(
    s: &AppState,
    snap: &crate::fleet::view::FleetSnapshot,
    t: &Target,
) -> Result<(), ApiError> {
    match t {
        Target::Worker(w) if snap.workers.binary_search_by(|x| x.id.cmp(w)).is_err() => {
            match s.core.fleet.worker(w.clone()).await? {
                Some(_) => Ok(()),
                None => Err(ApiError::NotFound(format!(
                    "worker {w} is not in the fleet"
                ))),
            }
        }
        Target::Pool(p)
            if !s.core.policy.live().routing.pools.contains_key(p)
                && !snap.workers.iter().any(|x| x.pool.as_deref() == Some(p)) =>
        {
            Err(ApiError::NotFound(format!(
                "pool {p} is neither configured nor has workers"
            )))
        }
        _ => Ok(()),
    }
}

fn operator_intervention(
    action: EscalationAction,
    target: Target,
    note: String,
    now: u64,
) -> Intervention {
    Intervention {
        id: format!("op-{}", uuid::Uuid::now_v7()),
        alert_id: String::new(),
        rule: "operator".into(),
        step: action.as_str().into(),
        action,
        level: action.level(),
        target,
        task_id: None,
        tasks_per_s: None,
        sink: None,
        block: None,
        reroute: None,
        weight: None,
        // Ends when an operator ends it, not with an alert.
        sticky: true,
        state: InterventionState::Active,
        note,
        applied_ms: now,
        reverted_ms: None,
        reverted_by: None,
        workers: Vec::new(),
    }
}

/// What the target is told now: each worker's mode and throttle and the interventions
/// that ask for it; for a pool, its blocks and reroutes too.
fn state_of(s: &AppState, t: &Target, new: Option<&Intervention>) -> Value {
    let snap = s.core.fleet.snapshot();
    let active = s.alerts.interventions.active();
    let want = intervene::desired(&active, &snap);
    let ids: Vec<&str> = match t {
        // Named even when it joined after the snapshot was taken.
        Target::Worker(x) => vec![x.as_str()],
        Target::Pool(p) => snap
            .workers
            .iter()
            .filter(|w| w.pool.as_deref() == Some(p.as_str()) && !w.lost)
            .map(|w| w.id.as_str())
            .collect(),
        Target::Fleet => Vec::new(),
    };
    let workers: BTreeMap<&str, Value> = ids
        .into_iter()
        .map(|id| {
            let c = want.get(id).cloned().unwrap_or_default();
            let reported = snap
                .workers
                .binary_search_by(|x| x.id.as_str().cmp(id))
                .ok()
                .map(|i| json!({"paused": snap.workers[i].paused, "draining": snap.workers[i].draining}));
            (
                id,
                json!({"mode": c.mode, "tasks_per_s": c.tasks_per_s, "because": c.because,
                       "reported": reported}),
            )
        })
        .collect();
    let mut v = json!({"target": t, "workers": workers});
    if let Target::Pool(p) = t {
        let live = s.core.policy.live();
        v["blocked"] = json!(
            live.blocks
                .iter()
                .any(|b| b.scope == BlockScope::Pool && &b.value == p)
        );
        v["rerouted_to"] = json!(
            live.reroutes
                .iter()
                .find(|r| &r.from == p)
                .map(|r| r.to.clone())
        );
        v["weight"] = json!(
            live.weights
                .iter()
                .find(|(x, _)| x == p)
                .map_or(1.0, |(_, w)| *w)
        );
    }
    if let Some(i) = new {
        v["intervention"] = json!(i);
    }
    v
}

/// Cancels `task`: on this replica when it keeps the task's record, else on the replica
/// that does (`peers`), and 404 when none does.
pub(crate) async fn cancel(
    s: &AppState,
    task: &str,
    who: &str,
    reason: Option<&str>,
) -> Result<Value, ApiError> {
    let local = s
        .core
        .store
        .get(task)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let record = match local {
        Some(r) if super::answers_for(s, &r) => r,
        other => {
            if let Some(answer) = s.peers.cancel(task, who, reason).await {
                return answer;
            }
            other.ok_or_else(|| ApiError::NotFound(format!("task {task} not found")))?
        }
    };
    if record.state.is_terminal() {
        return Err(ApiError::Conflict(format!(
            "task {task} has finished ({}); only a running, queued, deferred or parked task can be cancelled",
            serde_json::to_value(record.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        )));
    }
    let reason = format!(
        "cancelled by {who}{}",
        reason.map_or(String::new(), |r| format!(": {r}"))
    );
    if record.state == crate::store::TaskState::Deferred {
        return cancel_waiting(s, task, &reason).await;
    }
    // The live state knows which worker's spans and heartbeats carry the task.
    let Some(worker) = s.core.fleet.task_worker(task.to_string()).await? else {
        return cancel_queued(s, &record, &reason).await;
    };
    let req = ControlRequest::new(Command::Cancel {
        task_id: task.to_string(),
    })
    .reason(reason);
    match s.control.tell.tell(&worker, req).await {
        Ok(r) if r.ok => Ok(json!({"task_id": task, "worker": worker, "answer": r})),
        Ok(r) => Err(ApiError::Conflict(format!(
            "worker {worker} refused: {}",
            r.error.map_or_else(
                || "no reason given".into(),
                |e| format!("{}: {}", e.code, e.message)
            )
        ))),
        Err(e) => Err(ApiError::Busy(format!(
            "worker {worker} did not answer: {e}"
        ))),
    }
}

/// Cancels a dispatched task no worker reports running: it waits in its pool's queue, or
/// a worker has just been handed it.
async fn cancel_queued(s: &AppState, record: &TaskRecord, reason: &str) -> Result<Value, ApiError> {
    let task = &record.id;
    if record.state == crate::store::TaskState::Received {
        return Err(ApiError::Conflict(format!(
            "task {task} has not been routed yet (the intake has it); cancel it again in a moment"
        )));
    }
    let (Some(pool), Some(work_sequence), crate::store::TaskState::Dispatched) =
        (&record.pool, record.work_sequence, record.state)
    else {
        return Err(ApiError::Conflict(format!(
            "no worker reports running task {task} yet and it is not known to wait in a pool's queue (it was dispatched before the commander kept work sequences); only a running, queued, deferred or parked task can be cancelled"
        )));
    };
    let queued = Queued {
        task_id: task.clone(),
        pool: pool.clone(),
        attempt: record.attempt,
        work_sequence,
        reply_to: record.reply_to.clone(),
        replica: None,
    };
    match s.control.tell.withdraw(&queued, reason).await {
        Ok(w) => {
            s.core.metrics.queued_cancelled.inc();
            let mut ack = json!({
                "task_id": task,
                "was": "queued",
                "pool": pool,
                "result": "cancelled",
                "reason": reason,
            });
            if w.maybe_taken {
                ack["note"] = json!(
                    "a worker was handed the task as it was cancelled: if it runs it, its result is dropped as a copy of the cancel's"
                );
            }
            Ok(ack)
        }
        Err(WithdrawError::NotQueued(m)) => Err(ApiError::Conflict(m)),
        Err(WithdrawError::Broker(m)) => Err(ApiError::Busy(format!(
            "task {task} was not cancelled: {m}; retry"
        ))),
    }
}

/// Tasks one `purge_pool` cancels at most: each costs a few broker round trips, and the
/// command answers when it is done. `more` in the ack says to send it again.
pub const PURGE_MAX: usize = 1_000;

/// Cancels the tasks that wait in a pool's queue for a worker (not those running, and
/// not those a budget or a throttle holds back).
async fn purge(
    s: &AppState,
    pool: &str,
    who: &str,
    reason: Option<&str>,
) -> Result<Value, ApiError> {
    purgeable_pool(s, pool)?;
    let reason = format!(
        "cancelled by {who} with pool {pool}'s queue{}",
        reason.map_or(String::new(), |r| format!(": {r}"))
    );
    let done = s
        .control
        .tell
        .withdraw_pool(pool, &reason, PURGE_MAX)
        .await
        .map_err(|e| ApiError::Busy(format!("pool {pool}'s queue was not purged: {e}; retry")))?;
    s.core
        .metrics
        .queued_cancelled
        .inc_by(done.cancelled.len() as u64);
    let listed = 100;
    Ok(json!({
        "pool": pool,
        "reason": reason,
        "cancelled": done.cancelled.len(),
        "task_ids": done.cancelled.iter().take(listed).collect::<Vec<_>>(),
        "not_cancelled": done
            .not_cancelled
            .iter()
            .take(listed)
            .map(|(task_id, why)| json!({"task_id": task_id, "why": why}))
            .collect::<Vec<_>>(),
        "more": done.more,
        "stopped": done.stopped,
    }))
}

/// Cancels a task a budget deferred or a throttle parked: marked in the queue (stored
/// before the answer) and due at once, so the release loop publishes its `cancelled`
/// result, records it and removes it, instead of ever releasing it. The mark is made
/// between the loop's passes, so the task is never on its way to a worker meanwhile.
async fn cancel_waiting(s: &AppState, task: &str, reason: &str) -> Result<Value, ApiError> {
    let deferrals = &s.core.policy.deferrals;
    let marked = {
        let _pass = tokio::time::timeout(CANCEL_WAIT, deferrals.pass())
            .await
            .map_err(|_| {
                ApiError::Busy(format!(
                    "the release loop did not let task {task} be cancelled within {} s",
                    CANCEL_WAIT.as_secs()
                ))
            })?;
        let marked = deferrals
            .mark_cancelled(task, reason)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        s.core
            .store
            .flush()
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        marked
    };
    let Some(t) = marked else {
        return Err(ApiError::Conflict(format!(
            "task {task} no longer waits: it was released to intake a moment ago and is on its way to a worker; cancel it once it runs"
        )));
    };
    deferrals.wake.notify_one();
    Ok(json!({
        "task_id": task,
        "was": if t.turn.is_some() { "parked" } else { "deferred" },
        "result": "cancelled",
        "reason": t.cancelled,
    }))
}

/// How long a cancel of a waiting task waits for the release loop's pass to end.
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `POST /v1/control`: one command; the ack is the body (its status says how it went).
pub async fn post(
    State(s): State<AppState>,
    remote: super::RemoteAddr,
    headers: HeaderMap,
    caller: Option<axum::Extension<Caller>>,
    body: axum::body::Bytes,
) -> Response {
    let req = match super::json_body::<Request>(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let caller = Caller::of(caller);
    let from = Who {
        caller: &caller,
        identity: identity(&headers),
        remote: remote.0.map(|a| a.ip().to_string()),
        via: "http",
    };
    let (ack, err) = handle(&s, &from, req).await;
    let status = err.map_or(axum::http::StatusCode::OK, |e| e.status());
    (status, Json(ack)).into_response()
}

fn identity(h: &HeaderMap) -> Option<String> {
    Some(super::auth::identity(h)).filter(|i| i != "http")
}

/// Whether a browser page from `origin` may open the control socket: the commander's
/// own origin (the `Host` it was reached at) or one of `auth.allowed_origins`. A client
/// that sends no `Origin` is not a browser page and passes (it authenticated).
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if allowed.iter().any(|a| a == origin) {
        return true;
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|o| !host.is_empty() && o == host)
}

/// The subprotocol the dashboard speaks (it also offers `bearer.<token>`).
pub const PROTOCOL: &str = "fleet.control.v1";

/// `GET /v1/control`: the WebSocket. One JSON command per text message, one ack each.
pub async fn socket(
    State(s): State<AppState>,
    remote: super::RemoteAddr,
    headers: HeaderMap,
    caller: Option<axum::Extension<Caller>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if !origin_allowed(&headers, &s.control.allowed_origins) {
        s.core.metrics.auth_refused("bad_origin");
        return ApiError::Forbidden(
            "this Origin may not open the control socket (auth.allowed_origins)".into(),
        )
        .into_response();
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::BadRequest(format!(
                "GET /v1/control is a WebSocket (or POST a command): {e}"
            ))
            .into_response();
        }
    };
    let Some(place) = s.control.socket_place() else {
        return ApiError::Busy(
            "every control socket place (http.max_control_sockets) is taken; retry later".into(),
        )
        .into_response();
    };
    let caller = Caller::of(caller);
    let identity = identity(&headers);
    let remote = remote.0.map(|a| a.ip().to_string());
    ws.protocols([PROTOCOL])
        .max_message_size(64 * 1024)
        .on_upgrade(move |socket| session(s, socket, place, caller, identity, remote))
}

/// An open control socket's place among `http.max_control_sockets`; given back (and the
/// gauge lowered) when the session ends, or when the upgrade never happens.
struct SocketPlace {
    _permit: tokio::sync::OwnedSemaphorePermit,
    counters: Arc<ControlCounters>,
}

impl Drop for SocketPlace {
    fn drop(&mut self) {
        self.counters.sockets.dec();
    }
}

async fn session(
    s: AppState,
    mut socket: WebSocket,
    _place: SocketPlace,
    caller: Caller,
    identity: Option<String>,
    remote: Option<String>,
) {
    tracing::info!(who = %caller.name, "control socket opened");
    let SocketPing { every, silent_for } = s.control.socket_ping;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = tokio::time::Instant::now();
    loop {
        let msg = tokio::select! {
            msg = socket.recv() => msg,
            _ = ticks.tick() => {
                if heard.elapsed() >= silent_for {
                    tracing::info!(who = %caller.name, silent_s = heard.elapsed().as_secs(), "control socket closed: its client stopped answering pings");
                    break;
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let Some(Ok(msg)) = msg else { break };
        heard = tokio::time::Instant::now();
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => break,
            // Pings are answered by the library; pongs and binary frames are not commands.
            _ => continue,
        };
        let from = Who {
            caller: &caller,
            identity: identity.clone(),
            remote: remote.clone(),
            via: "websocket",
        };
        let ack = match serde_json::from_str::<Request>(text.as_str()) {
            Ok(req) => handle(&s, &from, req).await.0,
            Err(e) => Ack {
                id: String::new(),
                command: String::new(),
                ok: false,
                audit_id: String::new(),
                state: None,
                error: Some(
                    json!({"code": "bad_request", "message": format!("not a control command: {e}")}),
                ),
            },
        };
        let body = serde_json::to_string(&ack).unwrap_or_default();
        if socket.send(Message::Text(body.into())).await.is_err() {
            break;
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Default 100, at most 1000.
    limit: Option<usize>,
}

/// `GET /v1/control/audit`.
pub async fn audit(
    State(s): State<AppState>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = super::count_param("limit", q.limit, 100, 1000)?;
    let records = s
        .control
        .audit_log(limit)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(json!({ "records": records })).into_response())
}

/// `GET /v1/control/state`: operator interventions in force, what every worker touched
/// by any intervention is told, blocks, reroutes and the cost cap.
pub async fn state(State(s): State<AppState>) -> Response {
    let snap = s.core.fleet.snapshot();
    let active = s.alerts.interventions.active();
    let want = intervene::desired(&active, &snap);
    let live = s.core.policy.live();
    Json(json!({
        "operator_interventions": active.iter().filter(|i| i.rule == "operator").collect::<Vec<_>>(),
        "workers": want.iter().map(|(w, c)| (w.clone(), json!({"mode": c.mode, "tasks_per_s": c.tasks_per_s, "because": c.because}))).collect::<BTreeMap<_, _>>(),
        "blocks": *live.blocks,
        "reroutes": live.reroutes.iter().map(|r| json!({"from": r.from, "to": r.to})).collect::<Vec<_>>(),
        "weights": live.weights.iter().map(|(p, w)| json!({"pool": p, "weight": w})).collect::<Vec<_>>(),
        "cost_cap": s.core.policy.cost_cap(),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> Result<Op, ApiError> {
        serde_json::from_value::<Request>(v).unwrap().op()
    }

    #[test]
    fn commands_take_exactly_their_fields() {
        assert_eq!(
            req(json!({"command": "pause", "worker": "w1"})).unwrap(),
            Op::Mode(EscalationAction::Pause, Target::Worker("w1".into()))
        );
        assert_eq!(
            req(json!({"command": "drain", "pool": "p"})).unwrap(),
            Op::Mode(EscalationAction::Drain, Target::Pool("p".into()))
        );
        for bad in [
            json!({"command": "pause"}),
            json!({"command": "pause", "worker": "w", "pool": "p"}),
            json!({"command": "pause", "worker": "w", "usd": 1.0}),
            json!({"command": "cancel"}),
            json!({"command": "cancel", "task_id": "t", "worker": "w"}),
            json!({"command": "reroute_pool", "pool": "a"}),
            json!({"command": "reroute_pool", "pool": "a", "to": "a"}),
            json!({"command": "cost_cap"}),
            json!({"command": "cost_cap", "usd": -1.0}),
            json!({"command": "explode"}),
        ] {
            let e = req(bad.clone()).unwrap_err();
            assert!(matches!(e, ApiError::BadRequest(_)), "{bad}: {e}");
        }
        assert!(
            serde_json::from_value::<Request>(json!({"command": "pause", "wrker": "w"})).is_err()
        );
        assert_eq!(
            req(json!({"command": "cost_cap", "usd": 5.0})).unwrap(),
            Op::Cap {
                usd: 5.0,
                window: "1h".into()
            }
        );
    }

    #[test]
    fn a_page_from_elsewhere_may_not_open_the_socket() {
        let mut h = HeaderMap::new();
        h.insert("host", "127.0.0.1:8080".parse().unwrap());
        assert!(origin_allowed(&h, &[]), "no Origin: not a browser");
        h.insert("origin", "http://127.0.0.1:8080".parse().unwrap());
        assert!(origin_allowed(&h, &[]));
        h.insert("origin", "https://evil.example".parse().unwrap());
        assert!(!origin_allowed(&h, &[]));
        assert!(origin_allowed(&h, &["https://evil.example".to_string()]));
    }
}
