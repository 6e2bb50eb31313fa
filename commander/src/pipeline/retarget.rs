//! Targeted tasks whose worker is gone. A long-context task is dispatched to one worker's
//! own subject (`<prefix>.work.<pool>.<worker>`); if that worker dies, or never binds its
//! consumer, nobody else will ever pull it. Each targeted dispatch is remembered (sled
//! tree `targeted`, so a restart keeps watching) with its work-stream sequence. A loop
//! checks them: when the worker is lost, or has not bound `worker-<pool>-<worker>` within
//! `routing.target_bind_timeout_ms`, the task is published again on its pool's subject
//! (next attempt) and only then is the targeted copy deleted, so it is never lost (at
//! worst a worker that wakes between the two steps runs it too, and the result's
//! `Nats-Msg-Id` keeps one result). The task history, the decision log (rule `retarget`)
//! and `fleet_tasks_retargeted_total` record it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use fleet_worker::protocol::{self, headers};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Ctx;
use crate::store::{StoreError, TaskState};

/// One targeted dispatch still in flight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Targeted {
    pub task_id: String,
    pub pool: String,
    pub worker: String,
    /// Sequence of the work message in the work stream.
    pub seq: u64,
    pub attempt: u32,
    pub at_ms: u64,
}

/// The targeted dispatches, in sled.
#[derive(Clone, Debug)]
pub struct Targets {
    tree: sled::Tree,
}

impl Targets {
    pub fn open(store: &crate::store::Store) -> Result<Self, StoreError> {
        Ok(Self {
            tree: store.tree("targeted")?,
        })
    }

    pub fn insert(&self, t: &Targeted) -> Result<(), StoreError> {
        let v = serde_json::to_vec(t).map_err(|e| StoreError::Corrupt {
            id: t.task_id.clone(),
            reason: e.to_string(),
        })?;
        self.tree.insert(t.task_id.as_bytes(), v)?;
        Ok(())
    }

    fn remove(&self, task_id: &str) {
        let _ = self.tree.remove(task_id.as_bytes());
    }

    /// Every entry (one per targeted task in flight: bounded by the tasks in flight).
    fn all(&self) -> Vec<Targeted> {
        self.tree
            .iter()
            .filter_map(|kv| kv.ok())
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Checks the targeted dispatches every `every` until `stop`.
pub async fn run(ctx: Arc<Ctx>, bind_timeout: Duration, mut stop: watch::Receiver<bool>) {
    let every = (bind_timeout / 2).clamp(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        if ctx.targets.is_empty() {
            continue;
        }
        let snapshot = ctx.core.fleet.snapshot();
        for t in ctx.targets.all() {
            check(&ctx, &t, &snapshot, bind_timeout).await;
        }
    }
}

async fn check(
    ctx: &Ctx,
    t: &Targeted,
    fleet: &crate::fleet::view::FleetSnapshot,
    bind_timeout: Duration,
) {
    // Finished, or already sent elsewhere: nothing to watch.
    match ctx.core.store.get(&t.task_id) {
        Ok(Some(r)) if r.state.is_terminal() || r.attempt > t.attempt => {
            ctx.targets.remove(&t.task_id);
            return;
        }
        Ok(None) => {
            ctx.targets.remove(&t.task_id);
            return;
        }
        _ => {}
    }
    let lost = match fleet
        .workers
        .binary_search_by(|w| w.id.as_str().cmp(&t.worker))
    {
        Ok(i) => fleet.workers.get(i).is_none_or(|w| w.lost),
        Err(_) => true,
    };
    let waited = now_ms().saturating_sub(t.at_ms) >= bind_timeout.as_millis() as u64;
    let why = if lost && waited {
        format!("worker {} is lost", t.worker)
    } else if waited && !bound(ctx, t).await {
        format!(
            "worker {} did not bind its consumer within {} ms",
            t.worker,
            bind_timeout.as_millis()
        )
    } else {
        return;
    };
    if let Err(e) = retarget(ctx, t, &why).await {
        tracing::warn!(task_id = %t.task_id, error = %e, "re-dispatch of a targeted task failed; will retry");
    }
}

/// Whether the worker's own consumer exists.
async fn bound(ctx: &Ctx, t: &Targeted) -> bool {
    let Ok(stream) = ctx.js.get_stream(ctx.subjects.work_stream()).await else {
        return true;
    };
    let name = protocol::targeted_consumer_name(&t.pool, &t.worker);
    stream.consumer_info(&name).await.is_ok()
}

async fn retarget(ctx: &Ctx, t: &Targeted, why: &str) -> Result<(), String> {
    let stream = ctx
        .js
        .get_stream(ctx.subjects.work_stream())
        .await
        .map_err(|e| e.to_string())?;
    let Ok(msg) = stream.get_raw_message(t.seq).await else {
        // Taken and acked after all.
        ctx.targets.remove(&t.task_id);
        return Ok(());
    };
    let attempt = t.attempt + 1;
    let mut h = HeaderMap::new();
    for (name, values) in msg.headers.iter() {
        let name: &str = name.as_ref();
        if name.eq_ignore_ascii_case(headers::ATTEMPT)
            || name.eq_ignore_ascii_case(headers::NATS_MSG_ID)
        {
            continue;
        }
        if let Some(v) = values.first() {
            let _ = protocol::set_header(&mut h, name, v.as_str());
        }
    }
    let _ = protocol::set_header(&mut h, headers::ATTEMPT, &attempt.to_string());
    let _ = protocol::set_header(
        &mut h,
        headers::NATS_MSG_ID,
        &format!("{}:{attempt}", t.task_id),
    );
    // The new copy first: until JetStream has it, the targeted one stays.
    let copy = ctx
        .js
        .publish_with_headers(ctx.subjects.work(&t.pool), h, msg.payload.clone())
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    if let Err(e) = stream.delete_message(t.seq).await {
        tracing::warn!(task_id = %t.task_id, error = %e, "targeted copy not deleted; its worker may still run it");
    }
    let reason = format!("re-dispatched to pool {}: {why}", t.pool);
    let now = now_ms();
    // The decision log gets the re-dispatch as a decision of its own (the first one's
    // classification and candidates, rule `retarget`); the task record points at it.
    let logged = match ctx.core.decisions.get(&t.task_id) {
        Ok(Some(mut d)) => {
            d.id = format!("{}-retarget-{attempt}", d.id);
            d.at_ms = now;
            d.at = crate::policy::budget::rfc3339(now);
            d.worker = None;
            d.rule = "retarget".into();
            d.reason = reason.clone();
            match ctx.core.decisions.record(&d) {
                Ok(()) => Some((d.id, d.at_ms)),
                Err(e) => {
                    tracing::warn!(task_id = %t.task_id, error = %e, "retarget decision not logged");
                    None
                }
            }
        }
        _ => None,
    };
    ctx.core
        .store
        .update(
            &t.task_id,
            || crate::store::TaskRecord::new(&t.task_id, 0),
            |r| {
                r.attempt = r.attempt.max(attempt);
                r.work_sequence = Some(copy.sequence);
                r.route_reason = Some(reason.clone());
                if let Some((id, at)) = &logged {
                    r.decision_id = Some(id.clone());
                    r.decision_at_ms = Some(*at);
                }
                r.advance(TaskState::Dispatched);
            },
        )
        .map_err(|e| e.to_string())?;
    ctx.targets.remove(&t.task_id);
    ctx.core.metrics.tasks_retargeted.inc();
    tracing::warn!(task_id = %t.task_id, pool = %t.pool, worker = %t.worker, attempt, why, "targeted task re-dispatched to its pool");
    Ok(())
}
