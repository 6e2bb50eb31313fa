//! `GET /v1/stream`: the live event stream (Server-Sent Events) the dashboard runs on, and
//! the once-a-second feed that turns the fleet snapshot, the open alerts and the policy in
//! force into `fleet_snapshot`, `agent_update`, `alert` and `policy` events. Decisions
//! and interventions are published where they are recorded. The hub, its ring and its
//! counters are `crate::events`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use super::{ApiError, AppState};
use crate::events::{Event, Hub, Kind, StreamCounters};
use crate::fleet::view::{FleetSnapshot, WorkerView};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Only events about this pool (and fleet-wide ones).
    pool: Option<String>,
    /// Only events about this worker (and fleet-wide ones).
    worker: Option<String>,
    /// Comma-separated kinds; default all.
    kinds: Option<String>,
    /// Like the `Last-Event-ID` header, for clients that cannot set it.
    last_event_id: Option<u64>,
}

/// What a client asked to see.
#[derive(Debug, Clone)]
struct Wanted {
    pool: Option<String>,
    worker: Option<String>,
    kinds: BTreeSet<Kind>,
}

impl Wanted {
    fn admits(&self, e: &Event) -> bool {
        self.kinds.contains(&e.kind)
            && self
                .pool
                .as_deref()
                .is_none_or(|p| e.pool.as_deref().is_none_or(|x| x == p))
            && self
                .worker
                .as_deref()
                .is_none_or(|w| e.worker.as_deref().is_none_or(|x| x == w))
    }
}

/// A connected client, for as long as its stream lives: counted, and holding its place
/// among `http.max_streams` (given back when it ends).
struct Connected {
    counters: Arc<StreamCounters>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Connected {
    fn new(counters: Arc<StreamCounters>, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        counters.clients.inc();
        Connected {
            counters,
            _slot: slot,
        }
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.counters.clients.dec();
    }
}

struct Feed {
    replay: std::vec::IntoIter<Arc<Event>>,
    rx: broadcast::Receiver<Arc<Event>>,
    wanted: Wanted,
    first: Option<Bytes>,
    done: bool,
    keep_alive: tokio::time::Interval,
    /// The hub's shutdown flag: the stream ends when it turns true.
    closing: watch::Receiver<bool>,
    connected: Connected,
}

/// An SSE comment: keeps proxies and the client's idle timers from closing the stream.
const KEEP_ALIVE: &[u8] = b":\n\n";
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);

/// The client's frames: the resync notice, the replay, then live events; each event's
/// frame was encoded once by the hub and is only reference-counted here.
fn frames(f: Feed) -> impl Stream<Item = Result<Bytes, Infallible>> {
    futures::stream::unfold(f, |mut f| async move {
        if f.done {
            return None;
        }
        if let Some(first) = f.first.take() {
            return Some((Ok(first), f));
        }
        if let Some(e) = f.replay.by_ref().find(|e| f.wanted.admits(e)) {
            return Some((Ok(e.frame.clone()), f));
        }
        loop {
            if *f.closing.borrow() {
                return None;
            }
            let got = tokio::select! {
                got = f.rx.recv() => got,
                _ = f.keep_alive.tick() => return Some((Ok(Bytes::from_static(KEEP_ALIVE)), f)),
                // The commander is shutting down: the client reconnects (to another
                // replica, or to this one once it is back) with Last-Event-ID.
                _ = f.closing.changed() => return None,
            };
            match got {
                Ok(e) if f.wanted.admits(&e) => return Some((Ok(e.frame.clone()), f)),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Fell a whole channel behind: dropped, told why, and it may resume
                    // from its last id.
                    f.connected.counters.dropped.inc();
                    tracing::info!(missed = n, "slow stream client dropped");
                    f.done = true;
                    let bye = format!(
                        "event: dropped\ndata: {{\"reason\":\"fell behind by {n} events\"}}\n\n"
                    );
                    return Some((Ok(Bytes::from(bye)), f));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

/// `GET /v1/stream?pool=&worker=&kinds=`.
pub async fn stream(
    State(s): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let kinds = match q.kinds.as_deref().filter(|k| !k.trim().is_empty()) {
        None => Kind::ALL.into_iter().collect(),
        Some(list) => list
            .split(',')
            .map(|k| {
                Kind::parse(k.trim()).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "kind {k:?} is not one of {}",
                        Kind::ALL.map(Kind::as_str).join(", ")
                    ))
                })
            })
            .collect::<Result<BTreeSet<Kind>, ApiError>>()?,
    };
    let last_id = match headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
    {
        Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
            ApiError::BadRequest(format!("Last-Event-ID {v:?} is not an event id"))
        })?),
        None => q.last_event_id,
    };
    let slot = s.events.slot().ok_or_else(|| {
        ApiError::Busy("every stream place (http.max_streams) is taken; retry later".into())
    })?;
    let sub = s.events.subscribe(last_id);
    let first = sub.gap.then(|| {
        Bytes::from_static(
            b"event: resync\ndata: {\"reason\":\"events since Last-Event-ID left the ring, or it is not an id this commander sent; fetch the state again\"}\n\n",
        )
    });
    let connected = Connected::new(s.events.counters(), slot);
    let feed = Feed {
        replay: sub.replay.into_iter(),
        rx: sub.rx,
        wanted: Wanted {
            pool: q.pool,
            worker: q.worker,
            kinds,
        },
        first,
        done: false,
        closing: s.events.closing(),
        keep_alive: {
            let mut i = tokio::time::interval_at(
                tokio::time::Instant::now() + KEEP_ALIVE_EVERY,
                KEEP_ALIVE_EVERY,
            );
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        },
        connected,
    };
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        axum::body::Body::from_stream(frames(feed)),
    )
        .into_response())
}

/// What changes in a worker make an `agent_update`.
#[derive(PartialEq)]
struct Seen {
    state: &'static str,
    since: u64,
    task: Option<String>,
    paused: bool,
    draining: bool,
    lost: bool,
    done: u64,
    failed: u64,
}

fn seen(w: &WorkerView) -> Seen {
    Seen {
        state: w.state.as_str(),
        since: w.state_since_ms,
        task: w.current_task.clone(),
        paused: w.paused,
        draining: w.draining,
        lost: w.lost,
        done: w.tasks_completed,
        failed: w.tasks_failed,
    }
}

/// Most `agent_update` events a tick sends; past it the rest of the changes wait for the
/// next tick, which starts after the last worker sent (the snapshot event carries the
/// counts all the same). Starting from the first worker every tick, a fleet where more
/// than this many workers change every second never updated the workers late in id order.
const MAX_UPDATES_PER_TICK: usize = 500;

/// `items` (in id order) from the first one after `after`, round to the one at `after`.
fn from_after<'a, T>(
    items: &'a [T],
    id: impl Fn(&T) -> &String,
    after: Option<&str>,
) -> impl Iterator<Item = &'a T> {
    let start = after.map_or(0, |a| items.partition_point(|t| id(t).as_str() <= a));
    let (before, rest) = items.split_at(start);
    rest.iter().chain(before)
}

#[derive(Serialize)]
struct SnapshotEvent<'a> {
    fleet: &'a crate::fleet::view::FleetView,
    pools: &'a [crate::fleet::view::PoolView],
    alerts_firing: usize,
    policy_version: &'a str,
    /// Each configured pool's `max_queue_depth` (what its queue gauge is drawn against).
    max_queue_depth: BTreeMap<&'a str, u64>,
}

/// The feed's memory between ticks.
#[derive(Default)]
struct FeedState {
    workers: HashMap<String, Seen>,
    /// Where the next tick's `agent_update`s start: after the last one a full tick sent.
    resume_after: Option<String>,
    alerts: HashMap<String, String>,
    policy: String,
}

/// Publishes the once-a-second events until `stop`.
pub async fn feed(
    hub: Hub,
    fleet: crate::fleet::FleetHandle,
    alerts: crate::detect::run::Alerts,
    engine: Arc<crate::policy::PolicyEngine>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut st = FeedState::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !hub.watched() {
            // Nobody listens: start afresh when someone does.
            st = FeedState::default();
            continue;
        }
        let snap = fleet.snapshot();
        let open = alerts.open.load_full();
        let live = engine.live();
        let cap = engine.cost_cap();
        publish_tick(&hub, &mut st, &snap, &open, (&live, cap.as_ref()));
    }
}

/// One tick's events; the feed has checked that someone listens.
fn publish_tick(
    hub: &Hub,
    st: &mut FeedState,
    snap: &FleetSnapshot,
    open: &[crate::detect::Alert],
    (live, cap): (&crate::policy::Live, Option<&crate::policy::CostCap>),
) {
    let policy = &live.policy;
    let firing = open
        .iter()
        .filter(|a| a.state == crate::detect::AlertState::Firing)
        .count();
    hub.publish_watched(
        Kind::FleetSnapshot,
        None,
        None,
        &SnapshotEvent {
            fleet: &snap.fleet,
            pools: &snap.pools,
            alerts_firing: firing,
            policy_version: &policy.version,
            max_queue_depth: live
                .routing
                .pools
                .iter()
                .filter_map(|(name, p)| Some((name.as_str(), p.max_queue_depth?)))
                .collect(),
        },
    );
    let mut sent = 0;
    let resume_after = st.resume_after.take();
    for w in from_after(&snap.workers, |w| &w.id, resume_after.as_deref()) {
        if sent >= MAX_UPDATES_PER_TICK {
            break;
        }
        let now = seen(w);
        if st.workers.get(&w.id) != Some(&now) {
            hub.publish_watched(Kind::AgentUpdate, w.pool.as_deref(), Some(&w.id), w);
            st.workers.insert(w.id.clone(), now);
            sent += 1;
            if sent == MAX_UPDATES_PER_TICK {
                st.resume_after = Some(w.id.clone());
            }
        }
    }
    if st.workers.len() > snap.workers.len() {
        st.workers
            .retain(|id, _| snap.workers.binary_search_by(|w| w.id.cmp(id)).is_ok());
    }
    let mut still = HashMap::with_capacity(open.len());
    for a in open {
        let state = format!("{:?}/{:?}", a.state, a.silenced_by);
        if st.alerts.get(&a.id) != Some(&state) {
            hub.publish_watched(
                Kind::Alert,
                a.labels.get("pool").map(String::as_str),
                a.labels.get("worker").map(String::as_str),
                a,
            );
        }
        still.insert(a.id.clone(), state);
    }
    for gone in st.alerts.keys().filter(|id| !still.contains_key(*id)) {
        hub.publish_watched(
            Kind::Alert,
            None,
            None,
            &serde_json::json!({"id": gone, "state": "resolved"}),
        );
    }
    st.alerts = still;
    // The cost cap is set by operators, not by a policy push: a change of it alone is a
    // change of what is in force too (another operator's Policy page shows it).
    let version = format!("{}:{}:{:?}", policy.version, policy.sha256, cap);
    if st.policy != version {
        hub.publish_watched(
            Kind::Policy,
            None,
            None,
            &serde_json::json!({"version": policy.version, "sha256": policy.sha256,
                "budgets": policy.budgets.len(), "throttles": policy.throttles.len(),
                "cost_cap": cap}),
        );
        st.policy = version;
    }
}

#[cfg(test)]
mod tests {
    /// A tick that hits the cap ends where the next one starts, round the list, so every
    /// worker's change goes out within a few ticks however many change every second.
    #[test]
    fn worker_updates_go_round_the_fleet() {
        let ids: Vec<String> = (0..5).map(|i| format!("w{i}")).collect();
        let order = |after: Option<&str>| -> Vec<&str> {
            super::from_after(&ids, |s| s, after)
                .map(String::as_str)
                .collect()
        };
        assert_eq!(order(None), ["w0", "w1", "w2", "w3", "w4"]);
        assert_eq!(order(Some("w1")), ["w2", "w3", "w4", "w0", "w1"]);
        assert_eq!(order(Some("w4")), ["w0", "w1", "w2", "w3", "w4"]);
        // The worker it stopped at has left the fleet: it starts after where it was.
        assert_eq!(order(Some("w2x")), ["w3", "w4", "w0", "w1", "w2"]);
        assert_eq!(order(Some("a")), ["w0", "w1", "w2", "w3", "w4"]);
    }
}
