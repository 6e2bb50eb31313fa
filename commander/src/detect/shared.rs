//! The operator's control state, shared by every commander replica on one NATS: the
//! operator interventions in force (pauses, drains, blocks, reroutes, pool weights), the
//! emergency cost cap and the silences.
//!
//! A command is carried out by the replica it was sent to, at once, as a lone commander
//! does; the change is then written to the JetStream key-value bucket `<prefix>_control`
//! (key `operator`) with compare-and-set, so changes are linear. Every replica follows the
//! key's watch and takes on what the others did: it records their interventions in its own
//! log (and tells the workers, and routes by them), ends those that ended elsewhere, puts
//! their cost cap in force, and keeps their silences. The key holds what is in force (and the last ended
//! interventions, so a follower knows who ended them), not the history: each replica's
//! log keeps that.
//!
//! Writes go through one task per replica, in the order they were made, so an operator's
//! ack never waits for NATS; a write NATS refuses is tried again every few seconds.
//! The ladder's own interventions are not shared: each replica runs its own detector.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};

use super::act::InterventionLog;
use super::intervene::{Intervention, InterventionState};
use super::silence::{Silence, Silences};
use crate::policy::{CostCap, PolicyEngine};

/// The key in the bucket that holds the operator's state.
pub const KEY: &str = "operator";
/// Revisions of the key the bucket keeps.
pub const HISTORY: i64 = 16;
/// Ended interventions the key keeps, newest last.
const MAX_ENDED: usize = 50;
/// Operator interventions in force at once, on one replica and so in the bucket: one more
/// is refused.
pub const MAX_ACTIVE: usize = 500;
/// The most the key's value may hold when an operator adds to it: it must fit in one NATS
/// message (`max_payload`, 1 MiB by default) with the ended interventions it keeps on top
/// (at most `MAX_ENDED`, each a few KB at most). An intervention or silence that would
/// take it past this is refused.
pub const MAX_BYTES: usize = 640 * 1024;
/// How long a silence ended by hand stays in the key after it ended (so every replica
/// hears of its end); one that ran its course leaves it at its end.
const ENDED_SILENCE_KEPT_MS: u64 = 24 * 3_600_000;
/// Changes waiting to be written; past it a change is dropped, logged and counted.
const MAX_PENDING: usize = 10_000;
/// How often a write NATS refused is tried again.
const RETRY: Duration = Duration::from_secs(2);

/// The bucket's name for a subject prefix.
pub fn bucket_name(prefix: &str) -> String {
    format!("{}_control", prefix.replace('.', "_"))
}

/// What the key holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Operator interventions in force (their workers' answers left out: each replica
    /// notes the answers it gets).
    #[serde(default)]
    pub active: Vec<Intervention>,
    /// The last interventions ended, newest last.
    #[serde(default)]
    pub ended: Vec<Intervention>,
    /// The emergency cost cap in force.
    #[serde(default)]
    pub cost_cap: Option<CostCap>,
    /// The silences not yet at their end: in force, or ended by hand in the last day.
    #[serde(default)]
    pub silences: Vec<Silence>,
    /// The replica that wrote this revision.
    #[serde(default)]
    pub replica: String,
}

/// One change an operator made on this replica.
#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    /// An operator intervention came into force.
    Start(Intervention),
    /// One ended (reverted, as stored).
    End(Intervention),
    /// The cost cap was set or lifted.
    Cap(Option<CostCap>),
    /// A silence was made or ended by hand (as stored).
    Silence(Silence),
}

impl State {
    /// The state with `edit` made (pure).
    pub fn with(mut self, edit: &Edit) -> State {
        match edit {
            Edit::Start(i) => {
                let mut i = i.clone();
                i.workers.clear();
                self.active.retain(|x| x.id != i.id);
                if !self.ended.iter().any(|x| x.id == i.id) {
                    self.active.push(i);
                }
            }
            Edit::End(i) => {
                let mut i = i.clone();
                i.workers.clear();
                self.active.retain(|x| x.id != i.id);
                self.ended.retain(|x| x.id != i.id);
                self.ended.push(i);
                let extra = self.ended.len().saturating_sub(MAX_ENDED);
                self.ended.drain(..extra);
            }
            Edit::Cap(c) => self.cost_cap = c.clone(),
            Edit::Silence(x) => {
                let at = x.expired_ms.unwrap_or(x.created_ms);
                self.silences.retain(|s| {
                    s.id != x.id
                        && s.ends_ms > at
                        && s.expired_ms
                            .is_none_or(|e| e.saturating_add(ENDED_SILENCE_KEPT_MS) > at)
                });
                if x.ends_ms > at {
                    self.silences.push(x.clone());
                }
            }
        }
        self
    }

    /// Its size as written to the bucket.
    pub fn bytes(&self) -> usize {
        serde_json::to_vec(self).map_or(usize::MAX, |b| b.len())
    }
}

/// Whether an intervention is an operator's (shared), not the ladder's (per replica).
pub fn is_operators(i: &Intervention) -> bool {
    i.rule == "operator"
}

/// This replica's side of the shared state: where its operators' changes go, and what it
/// took on from the others.
#[derive(Debug)]
pub struct Share {
    kv: kv::Store,
    log: InterventionLog,
    engine: Arc<PolicyEngine>,
    /// Wakes the detector's loop, which tells the workers what is in force.
    kick: Arc<Notify>,
    replica: String,
    /// Operator interventions in force here that a revision of the bucket has held: one of
    /// them gone from a later revision ended elsewhere. One not yet there is still to be
    /// written from here.
    seen: sled::Tree,
    silences: Silences,
    /// Silences in force here that a revision of the bucket has held (as `seen`).
    seen_silences: sled::Tree,
    /// Holds [`CAP_UNSHARED`] while a cost cap change made here is not yet written: until
    /// then, here and across a restart, the bucket's cap is older than this replica's.
    cap_unshared: sled::Tree,
    /// The bucket's state as last read or written here: what an operator's addition is
    /// measured against.
    last: std::sync::Mutex<State>,
    outbox: mpsc::Sender<Edit>,
    /// The writer's end of `outbox` (one writer: [`Share::run`]).
    inbox: tokio::sync::Mutex<mpsc::Receiver<Edit>>,
    /// Changes dropped because `MAX_PENDING` were waiting.
    pub dropped: prometheus_client::metrics::counter::Counter,
}

/// What [`Share::start`] needs.
#[derive(Debug)]
pub struct Parts {
    pub kv: kv::Store,
    pub log: InterventionLog,
    pub engine: Arc<PolicyEngine>,
    pub kick: Arc<Notify>,
    pub replica: String,
    pub seen: sled::Tree,
    pub silences: Silences,
    pub seen_silences: sled::Tree,
    pub cap_unshared: sled::Tree,
}

/// The key of `Share::cap_unshared`.
const CAP_UNSHARED: &[u8] = b"cap";

/// The writer's state: changes not yet written, and the last revision it wrote.
#[derive(Debug, Default)]
pub struct Writer {
    pending: VecDeque<Edit>,
    written: u64,
}

impl Writer {
    /// Whether a change to the same thing as `edit` (the same intervention's end, the same
    /// silence, the cap) waits to be written.
    fn waits_with(&self, edit: &Edit) -> bool {
        self.pending.iter().any(|e| match (e, edit) {
            (Edit::End(a), Edit::End(b)) => a.id == b.id,
            (Edit::Silence(a), Edit::Silence(b)) => a.id == b.id,
            (Edit::Cap(_), Edit::Cap(_)) => true,
            _ => false,
        })
    }
}

impl Share {
    /// Takes on the bucket's state (writing this replica's own when the bucket has none,
    /// as on the first start of this release) and queues what this replica has in force
    /// that the bucket never held. [`Share::run`] then writes and follows.
    pub async fn start(p: Parts) -> Result<Arc<Self>, String> {
        let (outbox, inbox) = mpsc::channel(MAX_PENDING);
        let me = Arc::new(Self {
            kv: p.kv,
            log: p.log,
            engine: p.engine,
            kick: p.kick,
            replica: p.replica,
            seen: p.seen,
            silences: p.silences,
            seen_silences: p.seen_silences,
            cap_unshared: p.cap_unshared,
            last: Default::default(),
            outbox,
            inbox: tokio::sync::Mutex::new(inbox),
            dropped: Default::default(),
        });
        let mut writer = Writer::default();
        let held = match me.kv.entry(KEY).await.map_err(|e| e.to_string())? {
            Some(entry) => me.follow(&entry, &writer).unwrap_or_default(),
            None => {
                let mut first = State {
                    cost_cap: me.engine.cost_cap(),
                    ..State::default()
                };
                for i in me.own_active() {
                    first = first.with(&Edit::Start(i));
                }
                for x in me.own_silences() {
                    first = first.with(&Edit::Silence(x));
                }
                // Another replica may have made the key first: what was written is on
                // top of its state.
                let (revision, written) = me.write_edits(&[], Some(first)).await?;
                writer.written = revision;
                me.remember(&written);
                written
            }
        };
        for i in me.own_active() {
            if !was_seen(&me.seen, &i.id) && !held.active.iter().any(|h| h.id == i.id) {
                me.offer(Edit::Start(i));
            }
        }
        for x in me.own_silences() {
            if !was_seen(&me.seen_silences, &x.id) && !held.silences.iter().any(|h| h.id == x.id) {
                me.offer(Edit::Silence(x));
            }
        }
        if me.cap_is_unshared() {
            // Set or lifted here before a stop, never written: this replica's is newer.
            me.offer(Edit::Cap(me.engine.cost_cap()));
        }
        Ok(me)
    }

    /// Whether `edit` leaves the bucket's value small enough to be written (`MAX_BYTES`).
    pub fn room_for(&self, edit: &Edit) -> Result<(), String> {
        // A poisoned lock only means a panic elsewhere mid-assignment of plain data.
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let bytes = last.with(edit).bytes();
        if bytes > MAX_BYTES {
            return Err(format!(
                "the operator state every replica shares would take {bytes} bytes, more than the {MAX_BYTES} it may: end some interventions or silences first"
            ));
        }
        Ok(())
    }

    fn cap_is_unshared(&self) -> bool {
        self.cap_unshared
            .contains_key(CAP_UNSHARED)
            .unwrap_or(false)
    }

    fn remember(&self, state: &State) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = state.clone();
    }

    /// Queues `edit` for the bucket (never waits: an operator's ack does not wait for
    /// NATS).
    pub fn offer(&self, edit: Edit) {
        if matches!(edit, Edit::Cap(_))
            && let Err(e) = self.cap_unshared.insert(CAP_UNSHARED, &[])
        {
            tracing::warn!(error = %e, "cannot note an unshared cost cap change");
        }
        if let Err(e) = self.outbox.try_send(edit) {
            self.dropped.inc();
            tracing::error!(error = %e, "operator change not shared with the other replicas: too many waiting");
        }
    }

    /// Writes queued changes and follows the bucket until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut inbox = self.inbox.lock().await;
        let mut writer = Writer::default();
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The latest revision first, then every later one.
            let mut w = match self.kv.watch_with_history(KEY).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the control bucket; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY) => continue,
                        _ = stop.changed() => return,
                    }
                }
            };
            loop {
                tokio::select! {
                    e = w.next() => match e {
                        Some(Ok(entry)) => {
                            // What was changed here meanwhile is not undone by an older
                            // revision.
                            while let Ok(more) = inbox.try_recv() {
                                writer.pending.push_back(more);
                            }
                            self.follow(&entry, &writer);
                        }
                        Some(Err(e)) => tracing::warn!(error = %e, "control bucket watch error"),
                        None => break,
                    },
                    Some(edit) = inbox.recv() => {
                        writer.pending.push_back(edit);
                        while let Ok(more) = inbox.try_recv() {
                            writer.pending.push_back(more);
                        }
                        self.flush(&mut writer).await;
                    }
                    _ = retry.tick(), if !writer.pending.is_empty() => self.flush(&mut writer).await,
                    _ = stop.changed() => return,
                }
            }
        }
    }

    /// Writes every pending change in one revision; they stay pending when NATS refuses.
    async fn flush(&self, writer: &mut Writer) {
        let edits: Vec<Edit> = writer.pending.iter().cloned().collect();
        match self.write_edits(&edits, None).await {
            Ok((revision, state)) => {
                self.remember(&state);
                writer.written = writer.written.max(revision);
                writer.pending.clear();
                if edits.iter().any(|e| matches!(e, Edit::Cap(_))) {
                    let _ = self.cap_unshared.remove(CAP_UNSHARED);
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                waiting = writer.pending.len(),
                "operator changes not yet shared with the other replicas; trying again"
            ),
        }
    }

    /// Writes `edits` on top of the bucket's state (or `fresh` when the bucket has none),
    /// with compare-and-set, again on top of a newer revision as long as another replica
    /// keeps writing first. Returns the revision and the state written.
    async fn write_edits(
        &self,
        edits: &[Edit],
        fresh: Option<State>,
    ) -> Result<(u64, State), String> {
        for _ in 0..16 {
            let entry = self.kv.entry(KEY).await.map_err(|e| e.to_string())?;
            let (base, revision) = match &entry {
                Some(e) if matches!(e.operation, kv::Operation::Put) => {
                    (decode(&e.value).unwrap_or_default(), e.revision)
                }
                Some(e) => (State::default(), e.revision),
                None => (fresh.clone().unwrap_or_default(), 0),
            };
            let mut next = edits.iter().fold(base, |s, e| s.with(e));
            next.replica = self.replica.clone();
            let body = Bytes::from(serde_json::to_vec(&next).map_err(|e| e.to_string())?);
            let written = if revision == 0 {
                self.kv.create(KEY, body).await.map_err(|e| {
                    matches!(e.kind(), kv::CreateErrorKind::AlreadyExists)
                        .then_some(())
                        .ok_or_else(|| e.to_string())
                })
            } else {
                self.kv.update(KEY, body, revision).await.map_err(|e| {
                    matches!(e.kind(), kv::UpdateErrorKind::WrongLastRevision)
                        .then_some(())
                        .ok_or_else(|| e.to_string())
                })
            };
            match written {
                Ok(revision) => return Ok((revision, next)),
                // Another replica wrote first: write again on top of it.
                Err(Ok(())) => continue,
                Err(Err(e)) => return Err(e),
            }
        }
        Err("the control bucket kept changing under this write".into())
    }

    fn own_active(&self) -> Vec<Intervention> {
        self.log.active().into_iter().filter(is_operators).collect()
    }

    /// This replica's silences in force.
    fn own_silences(&self) -> Vec<Silence> {
        let now = self.engine.now_ms();
        self.silences
            .list()
            .into_iter()
            .filter(|x| x.active(now))
            .collect()
    }

    /// Takes on one revision of the bucket, and returns it. One older than this replica's
    /// last write is passed over: the watch brings that write's revision, or a later one,
    /// next.
    fn follow(&self, entry: &kv::Entry, writer: &Writer) -> Option<State> {
        if !matches!(entry.operation, kv::Operation::Put) || entry.revision < writer.written {
            return None;
        }
        let Some(state) = decode(&entry.value) else {
            tracing::warn!(
                revision = entry.revision,
                "control bucket entry unreadable; ignored"
            );
            return None;
        };
        self.remember(&state);
        let now = self.engine.now_ms();
        let (changed, to_end) = self.reconcile(&state, now);
        let silences = self.reconcile_silences(&state, now);
        // Ended here but in force there, and not waiting to be written: the end's write
        // was lost (a crash, or NATS was down until a restart). Write it again.
        let again = to_end.into_iter().map(Edit::End);
        for edit in again.chain(silences.into_iter().map(Edit::Silence)) {
            if !writer.waits_with(&edit) {
                self.offer(edit);
            }
        }
        let cap_waiting = self.cap_is_unshared() || writer.waits_with(&Edit::Cap(None));
        if !cap_waiting && state.cost_cap != self.engine.cost_cap() {
            match self.engine.adopt_cost_cap(state.cost_cap.clone()) {
                Ok(cap) => {
                    tracing::info!(cap = ?cap, replica = %state.replica, "cost cap taken on from another replica")
                }
                Err(e) => tracing::warn!(error = %e, "another replica's cost cap not taken on"),
            }
        }
        if changed {
            super::act::put_routing_in_force(&self.engine, &self.log.active());
            self.kick.notify_one();
        }
        Some(state)
    }

    /// Makes this replica's operator interventions those in `state`; returns whether any
    /// changed, and those ended here that `state` holds in force.
    fn reconcile(&self, state: &State, now: u64) -> (bool, Vec<Intervention>) {
        let mut changed = false;
        let mut to_end = Vec::new();
        for i in &state.active {
            match self.log.get(&i.id) {
                Ok(Some(mine)) if mine.state == InterventionState::Active => {}
                // Ended here, which is final: the bucket is told again.
                Ok(Some(mine)) => {
                    to_end.push(mine);
                    continue;
                }
                Ok(None) => {
                    tracing::info!(intervention = %i.id, replica = %state.replica, note = %i.note, "operator intervention taken on from another replica");
                    if let Err(e) = self.log.record(i) {
                        tracing::error!(intervention = %i.id, error = %e, "intervention not stored");
                        continue;
                    }
                    changed = true;
                }
                Err(e) => {
                    tracing::error!(intervention = %i.id, error = %e, "intervention not read");
                    continue;
                }
            }
            mark_seen(&self.seen, &i.id);
        }
        let in_force: BTreeSet<&str> = state.active.iter().map(|i| i.id.as_str()).collect();
        for mine in self.own_active() {
            if in_force.contains(mine.id.as_str()) {
                continue;
            }
            if let Some(ended) = state.ended.iter().find(|e| e.id == mine.id) {
                let mut ended = ended.clone();
                ended.workers = mine.workers;
                if let Err(e) = self.log.record(&ended) {
                    tracing::error!(intervention = %ended.id, error = %e, "intervention not stored");
                    continue;
                }
                tracing::info!(intervention = %ended.id, by = ended.reverted_by.as_deref().unwrap_or(""), "operator intervention ended on another replica");
            } else if was_seen(&self.seen, &mine.id) {
                // Ended elsewhere longer ago than the bucket remembers who ended it.
                if let Err(e) = self.log.revert(&mine.id, "another replica", now) {
                    tracing::warn!(intervention = %mine.id, error = %e, "intervention not ended");
                    continue;
                }
            } else {
                // Made here and not yet written: the writer has it.
                continue;
            }
            changed = true;
        }
        self.forget_ended();
        (changed, to_end)
    }

    /// Drops from `seen` what is no longer in force here (ended here or elsewhere).
    fn forget_ended(&self) {
        let active: BTreeSet<String> = self.own_active().into_iter().map(|i| i.id).collect();
        forget_others(&self.seen, &active);
    }

    /// Makes this replica's silences those in `state`: keeps the others' new ones and
    /// their ends, ends those the bucket once held and no longer does; returns those ended
    /// here that `state` holds in force (to be written again).
    fn reconcile_silences(&self, state: &State, now: u64) -> Vec<Silence> {
        let mine = self.silences.list();
        let mut again = Vec::new();
        for x in &state.silences {
            match mine.iter().find(|m| m.id == x.id) {
                None => self.silences.take_on(x.clone()),
                Some(m) if m.expired_ms.is_none() && x.expired_ms.is_some() => {
                    self.silences.take_on(x.clone())
                }
                Some(m) if m.expired_ms.is_some() && x.expired_ms.is_none() => {
                    again.push(m.clone())
                }
                Some(_) => {}
            }
            if x.active(now) {
                mark_seen(&self.seen_silences, &x.id);
            }
        }
        for m in mine.iter().filter(|m| m.active(now)) {
            if !state.silences.iter().any(|x| x.id == m.id) && was_seen(&self.seen_silences, &m.id)
            {
                // Ended elsewhere longer ago than the bucket remembers.
                if let Err(e) = self.silences.expire(&m.id, "another replica", now) {
                    tracing::warn!(silence = %m.id, error = %e, "silence not ended");
                }
            }
        }
        let active: BTreeSet<String> = self.own_silences().into_iter().map(|x| x.id).collect();
        forget_others(&self.seen_silences, &active);
        again
    }
}

/// Notes that the bucket held `id` (an intervention or silence in force here).
fn mark_seen(tree: &sled::Tree, id: &str) {
    if let Err(e) = tree.insert(id.as_bytes(), &[]) {
        tracing::warn!(id, error = %e, "cannot note what the control bucket held");
    }
}

fn was_seen(tree: &sled::Tree, id: &str) -> bool {
    tree.contains_key(id.as_bytes()).unwrap_or(false)
}

/// Drops from `tree` the ids `keep` does not name.
fn forget_others(tree: &sled::Tree, keep: &BTreeSet<String>) {
    for key in tree.iter().keys().flatten() {
        if !keep.contains(String::from_utf8_lossy(&key).as_ref()) {
            let _ = tree.remove(key);
        }
    }
}

fn decode(body: &[u8]) -> Option<State> {
    serde_json::from_slice(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::intervene::Target;
    use crate::policy::schema::EscalationAction;

    fn op(id: &str) -> Intervention {
        Intervention {
            id: id.into(),
            alert_id: String::new(),
            rule: "operator".into(),
            step: "pause".into(),
            action: EscalationAction::Pause,
            level: EscalationAction::Pause.level(),
            target: Target::Pool("code".into()),
            task_id: None,
            tasks_per_s: None,
            sink: None,
            block: None,
            reroute: None,
            weight: None,
            sticky: true,
            state: InterventionState::Active,
            note: "pause by oncall".into(),
            applied_ms: 1,
            reverted_ms: None,
            reverted_by: None,
            workers: Vec::new(),
        }
    }

    fn ended(id: &str) -> Intervention {
        let mut i = op(id);
        i.state = InterventionState::Reverted;
        i.reverted_by = Some("alice".into());
        i.reverted_ms = Some(2);
        i
    }

    /// One replica's parts: its store, intervention log and policy engine.
    struct Replica {
        _dir: tempfile::TempDir,
        store: crate::store::Store,
        log: InterventionLog,
        engine: Arc<PolicyEngine>,
        silences: Silences,
    }

    fn replica() -> Replica {
        use crate::classify::rubric::Rubric;
        use crate::registry::Registry;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let (registry, rubric) = (Registry::builtin().unwrap(), Rubric::builtin().unwrap());
        let policy = crate::policy::Policy::builtin(crate::policy::CheckAgainst {
            pools: None,
            registry: &registry,
            rubric: &rubric,
        })
        .unwrap();
        let engine = PolicyEngine::open(
            &store,
            crate::policy::Start {
                routing: crate::route::RoutingTable {
                    pools: Default::default(),
                    routing: Default::default(),
                },
                registry,
                registry_file: None,
                rubric,
                rubric_file: None,
                policy,
            },
            crate::policy::ManualClock::at(1_800_000_000_000),
            100,
            100,
        )
        .unwrap();
        let log = InterventionLog::open(&store, 100).unwrap();
        let silences = Silences::open(&store).unwrap();
        Replica {
            _dir: dir,
            store,
            log,
            engine,
            silences,
        }
    }

    async fn share(kv: &kv::Store, r: &Replica, name: &str) -> Arc<Share> {
        Share::start(Parts {
            kv: kv.clone(),
            log: r.log.clone(),
            engine: r.engine.clone(),
            kick: Arc::default(),
            replica: name.into(),
            seen: r.store.tree("operator_shared").unwrap(),
            silences: r.silences.clone(),
            seen_silences: r.store.tree("silences_shared").unwrap(),
            cap_unshared: r.store.tree("cost_cap_unshared").unwrap(),
        })
        .await
        .unwrap()
    }

    async fn bucket_state(kv: &kv::Store) -> State {
        decode(&kv.entry(KEY).await.unwrap().unwrap().value).unwrap()
    }

    async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
        for _ in 0..500 {
            if done().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for: {what}");
    }

    /// What a crash or a long absence leaves behind is mended at the next start: an end
    /// made here but never written is written; an intervention the bucket no longer holds,
    /// which it once did, ended elsewhere; one it never held was made here, and is written.
    #[tokio::test]
    async fn a_replica_mends_at_start_what_a_crash_or_an_absence_left_behind() {
        let nats = fleet_testkit::NatsServer::start().expect("nats-server");
        let kv = crate::broker::control_bucket_for_tests(nats.url()).await;
        let x = replica();
        for id in ["op-lost-end", "op-ended-long-ago", "op-made-offline"] {
            x.log.record(&op(id)).unwrap();
        }
        // The first replica of this release writes what it has in force.
        let first = share(&kv, &x, "x").await;
        let held = bucket_state(&kv).await;
        assert_eq!(held.active.len(), 3, "{held:?}");
        assert_eq!(held.replica, "x");
        drop(first);
        // While x is down: another replica ends one (and the bucket forgets who did), x
        // had ended one itself without writing it (a crash), and made one.
        let mut gone = held.clone().with(&Edit::End(ended("op-ended-long-ago")));
        gone.ended.clear();
        kv.put(KEY, serde_json::to_vec(&gone).unwrap().into())
            .await
            .unwrap();
        for id in ["op-lost-end", "op-ended-long-ago"] {
            x.store
                .tree("operator_shared")
                .unwrap()
                .insert(id.as_bytes(), &[])
                .unwrap();
        }
        x.log.revert("op-lost-end", "alice", 5).unwrap();
        x.store
            .tree("operator_shared")
            .unwrap()
            .remove("op-made-offline".as_bytes())
            .unwrap();
        x.log.record(&op("op-new")).unwrap();

        let again = share(&kv, &x, "x").await;
        let ended_here = x.log.get("op-ended-long-ago").unwrap().unwrap();
        assert_eq!(ended_here.state, InterventionState::Reverted);
        assert_eq!(ended_here.reverted_by.as_deref(), Some("another replica"));
        let (stop_tx, stop) = watch::channel(false);
        let running = tokio::spawn(again.clone().run(stop));
        until(
            "the lost end and the new intervention are written",
            async || {
                let s = bucket_state(&kv).await;
                let ids: Vec<&str> = s.active.iter().map(|i| i.id.as_str()).collect();
                ids == ["op-made-offline", "op-new"]
                    && s.ended
                        .iter()
                        .any(|i| i.id == "op-lost-end" && i.reverted_by.as_deref() == Some("alice"))
            },
        )
        .await;

        // A second replica takes it all on at start, and x takes on what it changes.
        let y = replica();
        let cap = y.engine.set_cost_cap(Some((3.0, "1h")), "bob").unwrap();
        let second = share(&kv, &y, "y").await;
        let mut mine: Vec<String> = y.log.active().into_iter().map(|i| i.id).collect();
        mine.sort();
        assert_eq!(mine, ["op-made-offline", "op-new"]);
        assert_eq!(y.engine.cost_cap(), None, "the bucket's cap wins at start");
        let (_stop_y, stop) = watch::channel(false);
        tokio::spawn(second.clone().run(stop));
        let new = y.log.revert("op-new", "bob", 9).unwrap();
        second.offer(Edit::End(new));
        second.offer(Edit::Cap(cap.clone()));
        until("x takes on y's end and cap", async || {
            x.log.get("op-new").unwrap().unwrap().state == InterventionState::Reverted
                && x.engine.cost_cap() == cap
        })
        .await;
        // A silence made on x reaches y; its end on y reaches x.
        let now = x.engine.now_ms();
        let made = x
            .silences
            .add(silence("s-1", now, now + 3_600_000))
            .unwrap();
        again.offer(Edit::Silence(made));
        until("y keeps x's silence", async || {
            y.silences
                .list()
                .iter()
                .any(|s| s.id == "s-1" && s.active(now))
        })
        .await;
        let ended = y.silences.expire("s-1", "carol", now + 1).unwrap().unwrap();
        second.offer(Edit::Silence(ended));
        until("x ends it", async || {
            x.silences
                .list()
                .iter()
                .any(|s| s.id == "s-1" && s.expired_by.as_deref() == Some("carol"))
        })
        .await;
        assert_eq!(
            x.log.get("op-new").unwrap().unwrap().reverted_by.as_deref(),
            Some("bob")
        );
        let _ = stop_tx.send(true);
        running.await.unwrap();
    }

    fn silence(id: &str, created_ms: u64, ends_ms: u64) -> Silence {
        Silence {
            id: id.into(),
            matchers: [("worker".to_string(), "w1".to_string())].into(),
            author: "alice".into(),
            comment: "deploy".into(),
            created_ms,
            ends_ms,
            expired_ms: None,
            expired_by: None,
        }
    }

    /// The key holds the silences not yet at their end: one ended by hand stays a day, so
    /// every replica hears of its end; one past its end leaves at the next change.
    #[test]
    fn silences_stay_in_the_state_until_their_end() {
        const H: u64 = 3_600_000;
        let s = State::default()
            .with(&Edit::Silence(silence("s1", 0, 2 * H)))
            .with(&Edit::Silence(silence("s2", 0, 48 * H)));
        assert_eq!(s.silences.len(), 2);
        let mut ended = silence("s2", 0, 48 * H);
        ended.expired_ms = Some(H);
        ended.expired_by = Some("bob".into());
        let s = s.with(&Edit::Silence(ended.clone()));
        assert_eq!(s.silences.len(), 2, "an end replaces the silence");
        assert_eq!(s.silences[1], ended);
        // Three hours on: s1 ran its course; s2's end is kept for a day.
        let s = s.with(&Edit::Silence(silence("s3", 3 * H, 4 * H)));
        let ids: Vec<&str> = s.silences.iter().map(|x| x.id.as_str()).collect();
        assert_eq!(ids, ["s2", "s3"]);
        let s = s.with(&Edit::Silence(silence("s4", 26 * H, 30 * H)));
        let ids: Vec<&str> = s.silences.iter().map(|x| x.id.as_str()).collect();
        assert_eq!(ids, ["s4"]);
    }

    /// An emergency cost cap set while NATS was away, and not yet written when the
    /// replica stopped, is this replica's newest word: at the next start it stays in force
    /// and is written, rather than replaced by the bucket's older cap.
    #[tokio::test]
    async fn a_cost_cap_not_yet_written_survives_a_restart_and_is_written() {
        let nats = fleet_testkit::NatsServer::start().expect("nats-server");
        let kv = crate::broker::control_bucket_for_tests(nats.url()).await;
        let x = replica();
        let first = share(&kv, &x, "x").await;
        // Set here; the writer never runs (NATS away), then the replica stops.
        let cap = x.engine.set_cost_cap(Some((7.0, "1d")), "oncall").unwrap();
        first.offer(Edit::Cap(cap.clone()));
        drop(first);
        assert_eq!(bucket_state(&kv).await.cost_cap, None);

        let again = share(&kv, &x, "x").await;
        assert_eq!(
            x.engine.cost_cap(),
            cap,
            "the bucket's older cap does not win"
        );
        let (_stop, rx) = watch::channel(false);
        tokio::spawn(again.clone().run(rx));
        until("x writes its cap", async || {
            bucket_state(&kv).await.cost_cap == cap
        })
        .await;
        until("the cap is no longer unshared", async || {
            !again.cap_is_unshared()
        })
        .await;
        // Another replica's later change is then taken on as usual.
        let y = replica();
        let other = share(&kv, &y, "y").await;
        assert_eq!(y.engine.cost_cap(), cap);
        let (_stop_y, rx) = watch::channel(false);
        tokio::spawn(other.clone().run(rx));
        y.engine.set_cost_cap(None, "bob").unwrap();
        other.offer(Edit::Cap(None));
        until("x lifts it", async || x.engine.cost_cap().is_none()).await;
    }

    #[test]
    fn edits_make_the_state_in_force() {
        let s = State::default()
            .with(&Edit::Start(op("op-1")))
            .with(&Edit::Start(op("op-2")))
            .with(&Edit::End(ended("op-1")));
        assert_eq!(s.active.iter().map(|i| &i.id).collect::<Vec<_>>(), ["op-2"]);
        assert_eq!(s.ended.iter().map(|i| &i.id).collect::<Vec<_>>(), ["op-1"]);
        // An ended intervention never comes back, and a start written twice is one.
        let s = s
            .with(&Edit::Start(op("op-1")))
            .with(&Edit::Start(op("op-2")));
        assert_eq!(s.active.len(), 1);
        let s = s.with(&Edit::End(ended("op-1")));
        assert_eq!(s.ended.len(), 1, "an end written twice is kept once");
        let cap = CostCap {
            limit_usd: 5.0,
            window: "1h".into(),
            set_by: "oncall".into(),
            set_at_ms: 3,
        };
        let s = s.with(&Edit::Cap(Some(cap.clone())));
        assert_eq!(s.cost_cap, Some(cap));
        assert_eq!(s.with(&Edit::Cap(None)).cost_cap, None);
    }

    #[test]
    fn the_state_remembers_the_last_ended_only_and_not_the_workers_answers() {
        let mut s = State::default();
        for n in 0..(MAX_ENDED + 5) {
            s = s.with(&Edit::Start(op(&format!("op-{n}"))));
            s = s.with(&Edit::End(ended(&format!("op-{n}"))));
        }
        assert!(s.active.is_empty());
        assert_eq!(s.ended.len(), MAX_ENDED);
        assert_eq!(s.ended[0].id, "op-5");
        let mut i = op("op-x");
        i.workers.push(crate::detect::intervene::WorkerOutcome {
            worker: "w1".into(),
            commands: vec!["pause".into()],
            ok: true,
            refused: false,
            error: None,
            at_ms: 1,
        });
        let s = s.with(&Edit::Start(i));
        assert!(s.active[0].workers.is_empty());
        let back: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
