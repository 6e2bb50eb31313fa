//! Finishes the stubs ([`crate::store::stubs`]) of tasks another replica took: a task
//! accepted over HTTP here and run by a replica sharing the intake stream has its record
//! there, and its stub here is finished with the result the results stream keeps, so
//! that `GET /v1/tasks/{id}` here tells how it ended and retention can sweep it.
//!
//! A pass every [`EVERY`] looks at the stubs that are due ([`PER_PASS`] at most): one
//! that an intake loop here has taken since is forgotten; one whose task has a result is
//! finished with it; the rest are looked at again later. `GET /v1/tasks/{id}` on a stub
//! looks at once, the same way.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::DirectGetErrorKind;
use fleet_worker::message::TaskResult;
use fleet_worker::protocol::{header, headers};
use tokio::sync::watch;

use super::{Core, Ctx};
use crate::store::TaskRecord;

/// How often the watched stubs are looked at.
const EVERY: Duration = Duration::from_secs(5);
/// Stubs looked at in one pass, at most (one direct get each).
const PER_PASS: usize = 500;
/// How much earlier than this commander's acceptance the results stream may have stored
/// a task's result and it still be this task's: the NATS server's clock and this host's
/// may differ by this much. A result stored before that is an earlier task's under the
/// same id (one swept by retention and submitted again).
const CLOCK_SLACK_MS: u64 = 30_000;

pub async fn run(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
        }
        pass(&ctx).await;
    }
}

async fn pass(ctx: &Ctx) {
    let stubs = ctx.core.store.stubs();
    let due = stubs.due(now_ms(), PER_PASS);
    if due.is_empty() {
        return;
    }
    let results = match ctx
        .js
        .get_stream_no_info(ctx.subjects.results_stream())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "results stream not reachable; stubs looked at later");
            for (id, w) in due {
                stubs.again(id, w, now_ms());
            }
            return;
        }
    };
    for (id, w) in due {
        match ctx.core.store.get(&id) {
            Ok(Some(r)) if r.is_stub() => {}
            // Taken by the intake loop here, or gone: nothing to watch.
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(task_id = %id, error = %e, "stub not readable; looked at later");
                stubs.again(id, w, now_ms());
                continue;
            }
        }
        let found = match results
            .direct_get_last_for_subject(ctx.subjects.result(&id))
            .await
        {
            Ok(m) => {
                let stored = Stored {
                    payload: &m.payload,
                    headers: Some(&m.headers),
                    stored_ms: fleet_worker::message::unix_ms(m.time),
                };
                finish(&ctx.core, &id, stored, w.accepted_ms).is_some()
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => false,
            Err(e) => {
                tracing::debug!(task_id = %id, error = %e, "results stream did not answer; stub looked at later");
                false
            }
        };
        if !found {
            stubs.again(id, w, now_ms());
        }
    }
}

/// A task's result as the results stream keeps it.
#[derive(Debug)]
pub struct Stored<'a> {
    pub payload: &'a [u8],
    pub headers: Option<&'a async_nats::HeaderMap>,
    /// When the stream stored it (unix ms, the NATS server's clock).
    pub stored_ms: Option<u64>,
}

/// Finishes the stub of `id` with `stored`, when that is the result of a run another
/// replica dispatched (its `Fleet-Replica` names another) of this task: it names the
/// task, and was not stored before this commander accepted the task (`accepted_ms`, less
/// the clocks' slack). A result without `Fleet-Replica` is left to the results loop,
/// which has it too. The finished record, or `None` (nothing written).
pub fn finish(
    core: &Core,
    id: &str,
    stored: Stored<'_>,
    accepted_ms: Option<u64>,
) -> Option<TaskRecord> {
    let replica = header(stored.headers, headers::REPLICA)?;
    if replica == &*core.replica {
        return None;
    }
    if let (Some(at), Some(accepted)) = (stored.stored_ms, accepted_ms)
        && at.saturating_add(CLOCK_SLACK_MS) < accepted
    {
        return None;
    }
    let result: TaskResult = serde_json::from_slice(stored.payload).ok()?;
    if result.task_id != id {
        return None;
    }
    match core.store.finish_elsewhere(id, &result, replica) {
        Ok(Some(rec)) => {
            finished_elsewhere(core, &rec);
            tracing::debug!(task_id = id, state = ?rec.state, replica, "task accepted here and run by another replica: its record here is finished from the results stream");
            Some(rec)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(task_id = id, error = %e, "stub not finished; looked at later");
            None
        }
    }
}

/// What a record finished by another replica's run ([`crate::store::Store::finish_elsewhere`])
/// tells the rest: it is counted, and a reservation it made here is given back to the
/// live ledger uncharged (the dispatching replica charges the run).
pub(crate) fn finished_elsewhere(core: &Core, rec: &TaskRecord) {
    core.metrics.tasks_finished_elsewhere.inc();
    if let Some(r) = &rec.budget
        && r.charged_usd.is_none()
    {
        core.policy.unreserve(r);
    }
}

/// Wall time: compared with the NATS server's timestamps, not a decision's clock.
fn now_ms() -> u64 {
    crate::domain::Clock::now_ms(&crate::domain::SystemClock)
}
