//! The escalation ladder's I/O: carries out what `intervene.rs` plans. Each tick it
//! records the steps now due (logging, notifying a sink, cancelling a task), ends the
//! interventions whose alert resolved, and brings every worker's mode and throttle to what
//! the interventions in force ask for, with control commands on `<prefix>.control.<worker>`
//! (docs/protocol.md §10). A command that gets no answer is sent again next tick; one the
//! worker refuses (it cannot obey it) is recorded and not sent again for that change.
//!
//! Interventions are kept in sled (tree `interventions`, at most `detect.max_records`),
//! so a restarted commander knows what is in force and tells the workers again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_worker::control::{Command, ControlReply, ControlRequest};
use fleet_worker::protocol::Subjects;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::intervene::{self, Intervention, InterventionState, WorkerControl, WorkerOutcome};
use super::lifecycle::{Alert, Change};
use super::sinks::Sinks;
use crate::fleet::view::FleetSnapshot;
use crate::policy::schema::{EscalationAction, EscalationSpec};
use crate::store::{Store, StoreError};

/// How long a worker has to answer a control command.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InterventionLabels {
    pub action: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: &'static str,
}

/// Counters of the ladder (on `/metrics` with the `fleet_` prefix).
#[derive(Debug, Default)]
pub struct InterventionCounters {
    /// Interventions by action and outcome (active, done, skipped, reverted).
    pub total: Family<InterventionLabels, Counter>,
    /// Interventions in force now, by action.
    pub active: Family<ActionLabels, Gauge>,
    /// Control commands sent, by command and whether the worker obeyed.
    pub commands: Family<InterventionLabels, Counter>,
}

impl InterventionCounters {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "interventions",
            "Escalation steps taken, by action and outcome",
            self.total.clone(),
        );
        r.register(
            "interventions_active",
            "Interventions in force now, by action",
            self.active.clone(),
        );
        r.register(
            "control_commands",
            "Control commands sent to workers, by command and outcome (ok, refused, no_answer)",
            self.commands.clone(),
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InterventionError {
    #[error("no intervention {0}")]
    NotFound(String),
    #[error("intervention {id} is {state}: only an active one can be reverted")]
    NotActive { id: String, state: &'static str },
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Every intervention, stored, with the ones in force also held in memory.
#[derive(Clone, Debug)]
pub struct InterventionLog {
    /// `applied_ms (8 bytes, big-endian) ++ id` → the intervention: oldest first out.
    tree: sled::Tree,
    /// id → its key in `tree`.
    by_id: sled::Tree,
    count: Arc<std::sync::atomic::AtomicUsize>,
    max_records: usize,
    active: Arc<Mutex<BTreeMap<String, Intervention>>>,
    pub counters: Arc<InterventionCounters>,
    /// Where each change is announced (`intervention` events of `/v1/stream`).
    events: Option<crate::events::Hub>,
}

fn key(i: &Intervention) -> Vec<u8> {
    let mut k = i.applied_ms.to_be_bytes().to_vec();
    k.extend_from_slice(i.id.as_bytes());
    k
}

fn corrupt(id: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        id: id.to_string(),
        reason: e.to_string(),
    }
}

impl InterventionLog {
    /// Opens the log and reloads the interventions that were in force.
    pub fn open(store: &Store, max_records: usize) -> Result<Self, StoreError> {
        let tree = store.tree("interventions")?;
        let by_id = store.tree("interventions_by_id")?;
        let mut active = BTreeMap::new();
        for item in tree.iter() {
            let (_, v) = item?;
            if let Ok(i) = serde_json::from_slice::<Intervention>(&v)
                && i.state == InterventionState::Active
            {
                active.insert(i.id.clone(), i);
            }
        }
        Ok(Self {
            count: Arc::new(std::sync::atomic::AtomicUsize::new(tree.len())),
            tree,
            by_id,
            max_records: max_records.max(1),
            active: Arc::new(Mutex::new(active)),
            counters: Arc::new(InterventionCounters::default()),
            events: None,
        })
    }

    /// Announces every intervention recorded from now on to `hub`.
    pub fn with_events(mut self, hub: crate::events::Hub) -> Self {
        self.events = Some(hub);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Intervention>> {
        // A poisoned lock only means a panic elsewhere mid-update of plain data.
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, i: &Intervention) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let body = serde_json::to_vec(i).map_err(|e| corrupt(&i.id, e))?;
        let k = key(i);
        if self.tree.insert(k.as_slice(), body)?.is_none() {
            self.count.fetch_add(1, Relaxed);
            self.by_id.insert(i.id.as_bytes(), k)?;
        }
        while self.count.load(Relaxed) > self.max_records {
            let Some((old, _)) = self.tree.pop_min()? else {
                break;
            };
            self.count.fetch_sub(1, Relaxed);
            if let Some(id) = old.get(8..) {
                self.by_id.remove(id)?;
            }
        }
        Ok(())
    }

    /// Stores an intervention as it is now, and holds it while it is active.
    pub fn record(&self, i: &Intervention) -> Result<(), StoreError> {
        self.write(i)?;
        if let Some(hub) = &self.events {
            let (pool, worker) = match &i.target {
                intervene::Target::Worker(w) => (None, Some(w.as_str())),
                intervene::Target::Pool(p) => (Some(p.as_str()), None),
                intervene::Target::Fleet => (None, None),
            };
            hub.publish(crate::events::Kind::Intervention, pool, worker, i);
        }
        let mut active = self.lock();
        if i.state == InterventionState::Active {
            active.insert(i.id.clone(), i.clone());
        } else {
            active.remove(&i.id);
        }
        Ok(())
    }

    pub fn active(&self) -> Vec<Intervention> {
        self.lock().values().cloned().collect()
    }

    pub fn get(&self, id: &str) -> Result<Option<Intervention>, StoreError> {
        if let Some(i) = self.lock().get(id) {
            return Ok(Some(i.clone()));
        }
        let Some(k) = self.by_id.get(id.as_bytes())? else {
            return Ok(None);
        };
        match self.tree.get(k)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| corrupt(id, e)),
            None => Ok(None),
        }
    }

    /// Whether a step was already taken for this id (so it is not taken again). A store
    /// error counts as taken: a step is never taken twice.
    pub fn known(&self, id: &str) -> bool {
        self.lock().contains_key(id) || self.by_id.contains_key(id.as_bytes()).unwrap_or(true)
    }

    /// The newest interventions, at most `limit`, that `keep` accepts.
    pub fn list(
        &self,
        limit: usize,
        keep: impl Fn(&Intervention) -> bool,
    ) -> Result<Vec<Intervention>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter().rev() {
            let (k, v) = item?;
            let i: Intervention =
                serde_json::from_slice(&v).map_err(|e| corrupt(&String::from_utf8_lossy(&k), e))?;
            if keep(&i) {
                out.push(i);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Ends an active intervention (its alert resolved, or `by` reverted it by hand); the
    /// next tick tells its workers.
    pub fn revert(
        &self,
        id: &str,
        by: &str,
        now_ms: u64,
    ) -> Result<Intervention, InterventionError> {
        let mut i = self
            .get(id)?
            .ok_or_else(|| InterventionError::NotFound(id.to_string()))?;
        if i.state != InterventionState::Active {
            return Err(InterventionError::NotActive {
                id: id.to_string(),
                state: i.state.as_str(),
            });
        }
        i.state = InterventionState::Reverted;
        i.reverted_ms = Some(now_ms);
        i.reverted_by = Some(by.to_string());
        self.record(&i)?;
        self.counters
            .total
            .get_or_create(&InterventionLabels {
                action: i.action.as_str(),
                outcome: "reverted",
            })
            .inc();
        tracing::info!(intervention = %i.id, by, "intervention reverted");
        Ok(i)
    }

    /// Records a worker's answer on the interventions it was sent for (in force or just
    /// ended).
    fn note_outcome(&self, ids: &[String], o: &WorkerOutcome) {
        for id in ids {
            let mut active = self.lock();
            if let Some(i) = active.get_mut(id) {
                i.outcome(o.clone());
                let _ = self.write(i);
                continue;
            }
            drop(active);
            if let Ok(Some(mut i)) = self.get(id) {
                i.outcome(o.clone());
                let _ = self.write(&i);
            }
        }
    }
}

/// The ladder's state between ticks: what each worker was last told successfully.
#[derive(Debug, Default)]
pub struct Actor {
    told: HashMap<String, WorkerControl>,
}

/// What a tick needs.
#[derive(Debug)]
pub struct Tick<'a> {
    pub log: &'a InterventionLog,
    pub sinks: &'a Sinks,
    pub client: &'a async_nats::Client,
    pub subjects: &'a Subjects,
    pub steps: &'a [EscalationSpec],
    pub open: &'a [Alert],
    pub snapshot: &'a FleetSnapshot,
    pub now_ms: u64,
    /// Where `block` interventions take effect (the live snapshot decisions read).
    pub engine: &'a crate::policy::PolicyEngine,
    /// Where a cancel or restart is noted beside the task's routing decision.
    pub decisions: Option<&'a crate::decisions::DecisionLog>,
    /// Whether this replica takes the one-shot steps that reach outside it (notify, cancel
    /// or restart a task): one replica does (`lead.rs`).
    pub leading: bool,
}

impl Actor {
    pub async fn tick(&mut self, t: &Tick<'_>) {
        // A silenced alert does not escalate (what it already set stays until it resolves).
        let unmuted: Vec<Alert> = t
            .open
            .iter()
            .filter(|a| a.silenced_by.is_none())
            .cloned()
            .collect();
        for mut i in intervene::due(
            &unmuted,
            t.steps,
            t.snapshot,
            |id| t.log.known(id),
            t.now_ms,
        ) {
            // Left due, unrecorded: taken by this replica if it comes to lead while the
            // alert still fires.
            let outward = matches!(
                i.action,
                EscalationAction::Notify
                    | EscalationAction::CancelTask
                    | EscalationAction::RestartTask
            );
            if outward && !t.leading {
                continue;
            }
            take_step(t, &mut i).await;
            if let Err(e) = t.log.record(&i) {
                tracing::error!(intervention = %i.id, error = %e, "intervention not stored");
            }
            t.log
                .counters
                .total
                .get_or_create(&InterventionLabels {
                    action: i.action.as_str(),
                    outcome: i.state.as_str(),
                })
                .inc();
        }
        for id in intervene::ended(&t.log.active(), t.open) {
            if let Err(e) = t.log.revert(&id, "alert resolved", t.now_ms) {
                tracing::warn!(intervention = %id, error = %e, "intervention not ended");
            }
        }
        let active = t.log.active();
        self.tell_workers(t, &active).await;
        put_routing_in_force(t.engine, &active);
        set_active_gauges(&t.log.counters, &active);
    }

    /// Sends each worker the commands between what it was told and what it should be; a
    /// worker that is gone from the snapshot is forgotten.
    async fn tell_workers(&mut self, t: &Tick<'_>, active: &[Intervention]) {
        let want = intervene::desired(active, t.snapshot);
        // A worker gone from the fleet is forgotten: one that comes back starts untold.
        let workers = &t.snapshot.workers;
        let present = |w: &str| {
            workers
                .binary_search_by(|x| x.id.as_str().cmp(w))
                .is_ok_and(|i| !workers[i].lost)
        };
        self.told.retain(|w, _| want.contains_key(w) || present(w));
        let idle = WorkerControl::default();
        let mut sends = Vec::new();
        let everyone: std::collections::BTreeSet<String> =
            want.keys().chain(self.told.keys()).cloned().collect();
        for worker in everyone {
            let to = want.get(&worker).cloned().unwrap_or_default();
            let from = self.told.get(&worker).cloned().unwrap_or_default();
            let cmds = intervene::commands(&from, &to);
            if cmds.is_empty() {
                continue;
            }
            let why = intervene::changed_by(&from, &to);
            sends.push(async move {
                let outcome = send_all(t, &worker, &cmds, &why).await;
                (worker, to, why, outcome)
            });
        }
        for (worker, to, why, outcome) in futures::future::join_all(sends).await {
            t.log.note_outcome(&why, &outcome);
            // A refusal is an answer: asking again would only be refused again.
            if outcome.ok || outcome.refused {
                if to == idle {
                    self.told.remove(&worker);
                } else {
                    self.told.insert(worker, to);
                }
            }
        }
    }
}

/// Carries out a one-shot step (log, notify, cancel) as it becomes due.
async fn take_step(t: &Tick<'_>, i: &mut Intervention) {
    let Some(alert) = t.open.iter().find(|a| a.id == i.alert_id) else {
        return;
    };
    match (i.action, i.state) {
        (EscalationAction::Reroute, InterventionState::Active) => {
            let live = t.engine.live();
            let pool = alert.labels.get("pool").cloned().unwrap_or_default();
            match live
                .routing
                .pools
                .get(&pool)
                .and_then(|p| p.fallback_pool.clone())
            {
                Some(to) => {
                    i.note = format!("pool {pool}'s work goes to {to} ({})", alert.message);
                    i.reroute = Some((pool, to));
                }
                None => {
                    i.state = InterventionState::Skipped;
                    i.note = format!("pool {pool} has no fallback_pool to reroute to");
                }
            }
        }
        (EscalationAction::Log, _) => {
            tracing::warn!(alert = %alert.id, step = %i.step, rule = %i.rule, "escalation: {}", alert.message);
        }
        (EscalationAction::Notify, _) => {
            let sink = i.sink.as_deref().unwrap_or("");
            if !t.sinks.offer_to(sink, Change::Firing, alert) {
                i.note = format!("sink {sink} is not configured, disabled or full");
            }
        }
        (
            action @ (EscalationAction::CancelTask | EscalationAction::RestartTask),
            InterventionState::Done,
        ) => {
            if let (intervene::Target::Worker(w), Some(task)) = (&i.target, i.task_id.clone()) {
                let cmd = if action == EscalationAction::CancelTask {
                    Command::Cancel {
                        task_id: task.clone(),
                    }
                } else {
                    Command::Restart {
                        task_id: task.clone(),
                    }
                };
                let o = send_all(t, w, &[cmd], std::slice::from_ref(&i.id)).await;
                let obeyed = o.ok;
                i.outcome(o);
                if obeyed {
                    note_on_task(t, i, &task, alert);
                }
            }
        }
        (_, InterventionState::Active) => {
            tracing::warn!(alert = %alert.id, intervention = %i.id, "intervention: {} ({})", i.note, alert.message);
        }
        _ => {}
    }
}

/// Notes a cancel or restart the worker obeyed in the decision log, beside the task's
/// routing decision (whose pool, model and classification it repeats): `GET
/// /v1/decisions?outcome=intervened` lists what interventions did to tasks.
fn note_on_task(t: &Tick<'_>, i: &Intervention, task: &str, alert: &Alert) {
    let Some(log) = t.decisions else { return };
    let routed = match log.get(task) {
        Ok(Some(d)) => d,
        Ok(None) => {
            tracing::debug!(task, intervention = %i.id, "no decision on record to note the intervention beside");
            return;
        }
        Err(e) => {
            tracing::warn!(task, error = %e, "decision log unreadable; intervention not noted");
            return;
        }
    };
    let verb = if i.action == EscalationAction::CancelTask {
        "cancelled"
    } else {
        "restarted (its delivery handed back to run again)"
    };
    let note = crate::decisions::DecisionRecord {
        id: format!("{}/{}", routed.id, i.id),
        at_ms: t.now_ms,
        at: crate::policy::budget::rfc3339(t.now_ms),
        outcome: crate::decisions::Outcome::Intervened,
        worker: alert
            .labels
            .get("worker")
            .cloned()
            .or_else(|| routed.worker.clone()),
        rule: format!("intervention_{}", i.action.as_str()),
        reason: format!(
            "{verb} by intervention {} (step {}): {}",
            i.id, i.step, alert.message
        ),
        candidates: Vec::new(),
        recovered: false,
        ..routed
    };
    if let Err(e) = log.record(&note) {
        tracing::warn!(task, error = %e, "intervention not noted in the decision log");
    }
}

/// Sends `cmds` to one worker, in order, stopping at the first that is not obeyed.
async fn send_all(
    t: &Tick<'_>,
    worker: &str,
    cmds: &[Command],
    because: &[String],
) -> WorkerOutcome {
    let mut names = Vec::new();
    let mut failure = None;
    let mut refused = false;
    for cmd in cmds {
        names.push(cmd.name().to_string());
        let reason = format!("intervention {}", because.join(", "));
        let req = ControlRequest::new(cmd.clone())
            .reason(reason)
            .id(because.first().cloned().unwrap_or_default());
        let outcome = match send(t, worker, &req).await {
            Ok(r) if r.ok => "ok",
            Ok(r) => {
                failure = Some(r.error.map_or_else(
                    || "refused".to_string(),
                    |e| format!("{}: {}", e.code, e.message),
                ));
                refused = true;
                "refused"
            }
            Err(e) => {
                failure = Some(e);
                "no_answer"
            }
        };
        t.log
            .counters
            .commands
            .get_or_create(&InterventionLabels {
                action: cmd.name(),
                outcome,
            })
            .inc();
        if failure.is_some() {
            break;
        }
    }
    if let Some(e) = &failure {
        if refused {
            tracing::warn!(worker, commands = ?names, error = %e, "control command refused by the worker; not sent again for this change");
        } else {
            tracing::warn!(worker, commands = ?names, error = %e, "control command not answered; sent again next tick");
        }
    } else {
        tracing::info!(worker, commands = ?names, interventions = ?because, "worker obeyed");
    }
    WorkerOutcome {
        worker: worker.to_string(),
        commands: names,
        ok: failure.is_none(),
        refused,
        error: failure,
        at_ms: t.now_ms,
    }
}

async fn send(t: &Tick<'_>, worker: &str, req: &ControlRequest) -> Result<ControlReply, String> {
    request(t.client, t.subjects, worker, req).await
}

/// Puts the blocks, reroutes and pool weights of the interventions in force into the live
/// snapshot decisions read (the ladder's tick, and an operator's command at once).
pub fn put_routing_in_force(engine: &crate::policy::PolicyEngine, active: &[Intervention]) {
    let (blocks, reroutes) = (intervene::blocks(active), intervene::reroutes(active));
    let summary = (blocks.len(), reroutes.len());
    if engine.set_pool_weights(intervene::weights(active)) {
        tracing::warn!("pool weights in force changed");
    }
    if engine.set_interventions(blocks, reroutes) {
        tracing::warn!(
            blocks = summary.0,
            reroutes = summary.1,
            "dispatch blocks and reroutes in force changed"
        );
    }
}

/// Sends one control command to a worker over NATS and waits (2 s at most) for its answer.
pub async fn request(
    client: &async_nats::Client,
    subjects: &Subjects,
    worker: &str,
    req: &ControlRequest,
) -> Result<ControlReply, String> {
    let body = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    let subject = subjects.control(worker);
    let reply = tokio::time::timeout(CONTROL_TIMEOUT, client.request(subject, body.into()))
        .await
        .map_err(|_| format!("no answer within {} s", CONTROL_TIMEOUT.as_secs()))?
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&reply.payload).map_err(|e| format!("answer does not parse: {e}"))
}

fn set_active_gauges(c: &InterventionCounters, active: &[Intervention]) {
    for action in [
        EscalationAction::Throttle,
        EscalationAction::Pause,
        EscalationAction::Drain,
        EscalationAction::Block,
        EscalationAction::Reroute,
    ] {
        let n = active.iter().filter(|i| i.action == action).count();
        c.active
            .get_or_create(&ActionLabels {
                action: action.as_str(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
