//! Deferred tasks: kept in sled (tree `deferred`) until their budget has room, in release
//! order — priority first, then oldest — because the key is (9 − priority, first
//! deferral time, id). Releasing republishes the task to the intake stream (the only way
//! into `<prefix>.work.*` stays the intake loop) and deletes the entry only after
//! JetStream acknowledged the republication, so a crash in between releases it twice at
//! worst, and the intake loop recognises the second copy as a duplicate.
//!
//! Tasks a throttle parked (`throttle.rs`) wait beside them in tree `throttle_parked`, in
//! the order of their turns (key: turn time, id), and are released the same way once
//! their turn has come, or at once when the throttle that gave the turn changed. The two
//! share `policy.max_deferred`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use super::budget::{self, Ledger, TaskDims};
use super::load::Policy;
use crate::store::{Store, StoreError};

/// One deferred task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeferredTask {
    pub id: String,
    pub priority: u8,
    /// When it was first deferred (its place in the queue).
    pub deferred_at_ms: u64,
    pub deferred_at: String,
    /// The producer-readable reason ("budget … deferred until …").
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// The (budget, value) queues it waits in; never empty (a task is deferred by a budget,
    /// or behind tasks a budget deferred), which lets a release pass stop once every
    /// queue is blocked.
    pub queues: Vec<(String, String)>,
    /// Where routing would have sent it, and its estimate: the release check uses them.
    pub pool: String,
    pub model: String,
    pub est_usd: f64,
    pub dims: TaskDims,
    pub policy_version: String,
    /// The task JSON as submitted, and the headers to republish it with.
    pub task_json: String,
    pub headers: Vec<(String, String)>,
    /// Times it has left the deferred queue before (and was deferred again).
    pub releases: u32,
    /// Parked by a throttle, with this turn (absent: deferred by a budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn: Option<crate::domain::ThrottleTurn>,
    /// The task's `deadline` in unix ms: it is released then, whatever holds it, so the
    /// intake loop ends it as `cancelled` (`deadline_exceeded`) at its deadline rather
    /// than at its release, which may be weeks later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Cancelled by an operator while it waited, with this reason: the release loop
    /// publishes its `cancelled` result instead of releasing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled: Option<String>,
}

impl DeferredTask {
    /// Its key: in the parked tree its turn's time, then its id; in the deferred queue
    /// its release order.
    pub fn key(&self) -> Vec<u8> {
        if let Some(turn) = &self.turn {
            let mut k = Vec::with_capacity(8 + self.id.len());
            k.extend_from_slice(&turn.at_ms.to_be_bytes());
            k.extend_from_slice(self.id.as_bytes());
            return k;
        }
        let mut k = Vec::with_capacity(9 + self.id.len());
        k.push(9u8.saturating_sub(self.priority.min(9)));
        k.extend_from_slice(&self.deferred_at_ms.to_be_bytes());
        k.extend_from_slice(self.id.as_bytes());
        k
    }

    /// Its key in the deadline index, if it has a deadline: the deadline's time, then
    /// its id. A cancelled task is due at once (time 0).
    fn deadline_key(&self) -> Option<Vec<u8>> {
        let at = if self.cancelled.is_some() {
            0
        } else {
            self.deadline_ms?
        };
        let mut k = Vec::with_capacity(8 + self.id.len());
        k.extend_from_slice(&at.to_be_bytes());
        k.extend_from_slice(self.id.as_bytes());
        Some(k)
    }

    /// Its key in the index of parked tasks by line, if parked: the line (throttle and
    /// key, each length-prefixed, as both may hold any byte), then its turn and id, so a
    /// line's last turn is the last key under its prefix.
    fn line_key(&self) -> Option<Vec<u8>> {
        let turn = self.turn.as_ref()?;
        let mut k = line_prefix(&turn.throttle, &turn.key);
        k.extend_from_slice(&turn.at_ms.to_be_bytes());
        k.extend_from_slice(self.id.as_bytes());
        Some(k)
    }

    /// Where it is, as the indexes hold it: which tree (`PARKED` or `DEFERRED`), then its
    /// key there.
    fn location(&self) -> Vec<u8> {
        let mut v = vec![if self.turn.is_some() {
            PARKED
        } else {
            DEFERRED
        }];
        v.extend_from_slice(&self.key());
        v
    }
}

/// The prefix of a throttle line's entries in the index of parked tasks by line.
fn line_prefix(throttle: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + throttle.len() + key.len() + 8 + 16);
    for part in [throttle, key] {
        let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
        k.extend_from_slice(&len.to_be_bytes());
        k.extend_from_slice(part.as_bytes().get(..usize::from(len)).unwrap_or_default());
    }
    k
}

/// The tags of the tree an entry is in, in the deadline and id indexes' values.
const DEFERRED: u8 = 0;
const PARKED: u8 = 1;

/// The queue key a listing cursor names (`DeferredTask::key` in hex), if it is one: a
/// priority rank (0-9), eight bytes of time and a task id as the protocol allows it.
pub fn deferred_cursor(cursor: &str) -> Option<Vec<u8>> {
    if cursor.len() > 2 * (9 + 128) {
        return None;
    }
    let key = crate::domain::unhex(cursor)?;
    let (&rank, rest) = key.split_first()?;
    let id = std::str::from_utf8(rest.get(8..)?).ok()?;
    (rank <= 9 && fleet_worker::protocol::is_subject_token(id)).then_some(key)
}

/// The parked-tree key a listing cursor names (`DeferredTask::key` of a parked task, in
/// hex), if it is one: eight bytes of turn time and a task id as the protocol allows it.
pub fn parked_cursor(cursor: &str) -> Option<Vec<u8>> {
    if cursor.len() > 2 * (8 + 128) {
        return None;
    }
    let key = crate::domain::unhex(cursor)?;
    let id = std::str::from_utf8(key.get(8..)?).ok()?;
    fleet_worker::protocol::is_subject_token(id).then_some(key)
}

/// The deferred queue.
#[derive(Debug)]
pub struct Deferrals {
    tree: sled::Tree,
    /// Tasks waiting per (budget, value), so new tasks can queue behind them.
    queued: Mutex<BTreeMap<(String, String), usize>>,
    /// Entries in `tree`, kept here because sled counts a tree by walking all of it, and
    /// the queue is asked whether it is full at every deferral.
    count: AtomicUsize,
    /// Tasks parked by throttles, by turn.
    parked: sled::Tree,
    parked_count: AtomicUsize,
    /// Deferred and parked tasks that have a deadline, by deadline (key: deadline time,
    /// id; value: the entry's tree tag and key), so the release loop finds the next one
    /// without reading either queue.
    deadlines: sled::Tree,
    /// Every deferred and parked task by id (value: its location), to cancel one.
    ids: sled::Tree,
    /// Parked tasks by line, then turn ([`DeferredTask::line_key`]), to find a line's
    /// last turn without reading the parked tree.
    lines: sled::Tree,
    /// Held by the release loop through each pass, and by a cancel while it marks its
    /// task: a task is never released to intake while it is being cancelled.
    pass: tokio::sync::Mutex<()>,
    /// Wakes the release loop: a task was cancelled (its result is to be published), or
    /// one was stored with a turn or deadline sooner than any the loop knew of when it
    /// went to sleep.
    pub wake: tokio::sync::Notify,
    max: usize,
}

impl Deferrals {
    pub fn open(store: &Store, max: usize) -> Result<Self, StoreError> {
        let tree = store.tree("deferred")?;
        let mut queued = BTreeMap::new();
        let mut count = 0;
        for item in tree.iter() {
            let (_, v) = item?;
            count += 1;
            if let Ok(t) = serde_json::from_slice::<DeferredTask>(&v) {
                for q in t.queues {
                    *queued.entry(q).or_insert(0) += 1;
                }
            }
        }
        let parked = store.tree("throttle_parked")?;
        let parked_count = parked.len();
        let deadlines = store.tree("deferred_deadlines")?;
        let ids = store.tree("deferred_ids")?;
        let lines = store.tree("parked_lines")?;
        if ids.is_empty() {
            // Entries stored before the indexes existed (December 2026) are indexed once.
            for item in tree.iter().chain(parked.iter()) {
                let (_, v) = item?;
                if let Ok(t) = serde_json::from_slice::<DeferredTask>(&v) {
                    ids.insert(t.id.as_bytes(), t.location())?;
                    if let Some(k) = t.line_key() {
                        lines.insert(k, &[])?;
                    }
                }
            }
        }
        Ok(Self {
            tree,
            queued: Mutex::new(queued),
            count: AtomicUsize::new(count),
            parked,
            parked_count: AtomicUsize::new(parked_count),
            deadlines,
            ids,
            lines,
            pass: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            max: max.max(1),
        })
    }

    /// Tasks deferred by budgets.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Tasks parked by throttles.
    pub fn parked_len(&self) -> usize {
        self.parked_count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Deferred and parked together fill `policy.max_deferred`.
    pub fn is_full(&self) -> bool {
        self.len() + self.parked_len() >= self.max
    }

    /// Tasks waiting per (budget, value).
    pub fn queued(&self) -> BTreeMap<(String, String), usize> {
        self.queued.lock().map(|q| q.clone()).unwrap_or_default()
    }

    /// Where `t` is kept, and that tree's count: parked when it has a turn.
    fn tree_of(&self, t: &DeferredTask) -> (&sled::Tree, &AtomicUsize) {
        if t.turn.is_some() {
            (&self.parked, &self.parked_count)
        } else {
            (&self.tree, &self.count)
        }
    }

    /// Stores a task (durable with the caller's next flush): parked when it has a turn.
    pub fn insert(&self, t: &DeferredTask) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(t).map_err(|e| StoreError::Corrupt {
            id: t.id.clone(),
            reason: e.to_string(),
        })?;
        let (tree, count) = self.tree_of(t);
        // The release loop sleeps until the soonest turn or deadline it saw (at most
        // `policy.release_interval_ms`): a sooner one wakes it, or its task would wait
        // past its turn for as long as that interval.
        // (Each queue's first entry is read only for a task that has a time of its kind.)
        let wake = t
            .turn
            .as_ref()
            .is_some_and(|u| self.next_turn_ms().is_none_or(|f| u.at_ms < f))
            || t.deadline_ms
                .is_some_and(|d| self.next_deadline_ms().is_none_or(|f| d < f));
        // The index first: an entry is never stored without it (a crash in between
        // leaves an index entry whose task is not there, which `expired` drops).
        if let Some(k) = t.deadline_key() {
            self.deadlines.insert(k, t.location())?;
        }
        self.ids.insert(t.id.as_bytes(), t.location())?;
        if let Some(k) = t.line_key() {
            self.lines.insert(k, &[])?;
        }
        if tree.insert(t.key(), bytes)?.is_none() {
            count.fetch_add(1, Ordering::Relaxed);
            // A parked task waits in no budget queue (`queues` is empty).
            if let Ok(mut q) = self.queued.lock() {
                for k in &t.queues {
                    *q.entry(k.clone()).or_insert(0) += 1;
                }
            }
        }
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Removes a released task — only the entry as it was released: if the intake loop
    /// already deferred the released copy again (same key, a later release count), that
    /// new entry stays.
    pub fn remove(&self, t: &DeferredTask) -> Result<(), StoreError> {
        let old = serde_json::to_vec(t).map_err(|e| StoreError::Corrupt {
            id: t.id.clone(),
            reason: e.to_string(),
        })?;
        let (tree, count) = self.tree_of(t);
        let removed = matches!(
            tree.compare_and_swap(t.key(), Some(old), None as Option<&[u8]>)?,
            Ok(())
        );
        if removed {
            count.fetch_sub(1, Ordering::Relaxed);
            // Only the index entry that points at this very entry: a copy deferred
            // again since then has another key in its tree, and its own index entry.
            let at = t.location();
            if let Some(k) = t.deadline_key() {
                let _ = self
                    .deadlines
                    .compare_and_swap(k, Some(&at), None as Option<&[u8]>)?;
            }
            let _ = self
                .ids
                .compare_and_swap(t.id.as_bytes(), Some(at), None as Option<&[u8]>)?;
            if let Some(k) = t.line_key() {
                self.lines.remove(k)?;
            }
        }
        if removed && let Ok(mut q) = self.queued.lock() {
            for k in &t.queues {
                if let Some(n) = q.get_mut(k) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        q.remove(k);
                    }
                }
            }
        }
        Ok(())
    }

    /// In release order, at most `limit`, after `after` (a key) when given.
    pub fn list(
        &self,
        limit: usize,
        after: Option<&[u8]>,
    ) -> Result<Vec<DeferredTask>, StoreError> {
        list_tree(&self.tree, limit, after)
    }

    /// Parked tasks in turn order, at most `limit`, after `after` (a key) when given.
    pub fn list_parked(
        &self,
        limit: usize,
        after: Option<&[u8]>,
    ) -> Result<Vec<DeferredTask>, StoreError> {
        list_tree(&self.parked, limit, after)
    }

    /// Parked tasks whose turn has come (in turn order, at most `limit`), and, with
    /// `void`, every parked task whose turn no policy throttle honours any more (after a
    /// swap: released at once, to be given a turn by the throttle as it is now).
    pub fn parked_due(
        &self,
        now_ms: u64,
        limit: usize,
        void: Option<&dyn Fn(&crate::domain::ThrottleTurn) -> bool>,
    ) -> Result<Vec<DeferredTask>, StoreError> {
        let mut out = Vec::new();
        let due_end = now_ms.saturating_add(1).to_be_bytes();
        for item in self.parked.range(..due_end.as_slice()) {
            if out.len() >= limit {
                return Ok(out);
            }
            let (k, v) = item?;
            match serde_json::from_slice::<DeferredTask>(&v) {
                Ok(t) => out.push(t),
                Err(e) => {
                    // It can never be released, and left first in turn order it would
                    // wake the release loop at once, every time.
                    tracing::error!(key = %crate::domain::hex(&k), error = %e, "undecodable parked task dropped");
                    if self.parked.remove(&k)?.is_some() {
                        self.parked_count.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
        let Some(void) = void else { return Ok(out) };
        for item in self.parked.range(due_end.as_slice()..) {
            if out.len() >= limit {
                break;
            }
            let (_, v) = item?;
            if let Ok(t) = serde_json::from_slice::<DeferredTask>(&v)
                && t.turn.as_ref().is_some_and(void)
            {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Writes raw bytes under a parked key (tests: a corrupt entry).
    #[cfg(test)]
    pub(crate) fn insert_parked_raw(&self, key: &[u8], value: &[u8]) {
        if self.parked.insert(key, value).ok().flatten().is_none() {
            self.parked_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Held through a release pass, and while a task is marked cancelled.
    pub async fn pass(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.pass.lock().await
    }

    /// The stored entry at a location as the indexes hold it ([`DeferredTask::location`]).
    fn entry_at(&self, location: &[u8]) -> Result<Option<sled::IVec>, StoreError> {
        Ok(match location.split_first() {
            Some((&PARKED, key)) => self.parked.get(key)?,
            Some((_, key)) => self.tree.get(key)?,
            None => None,
        })
    }

    /// Whether the task `id` waits here (deferred or parked). An index the store cannot
    /// read counts as waiting: the record then answers as it says.
    pub fn waits(&self, id: &str) -> bool {
        self.ids.contains_key(id.as_bytes()).unwrap_or(true)
    }

    /// The deferred or parked task `id`, if it waits.
    pub fn find(&self, id: &str) -> Result<Option<DeferredTask>, StoreError> {
        Ok(self.find_raw(id)?.map(|(t, _)| t))
    }

    fn find_raw(&self, id: &str) -> Result<Option<(DeferredTask, sled::IVec)>, StoreError> {
        let Some(at) = self.ids.get(id.as_bytes())? else {
            return Ok(None);
        };
        Ok(self.entry_at(&at)?.and_then(|b| {
            let t = serde_json::from_slice::<DeferredTask>(&b).ok()?;
            (t.id == id).then_some((t, b))
        }))
    }

    /// Marks the waiting task `id` cancelled (durable with the caller's next flush) and
    /// due at once, so the release loop publishes its `cancelled` result and removes it.
    /// `None`: it does not wait (any more). Call it holding [`Deferrals::pass`].
    pub fn mark_cancelled(
        &self,
        id: &str,
        reason: &str,
    ) -> Result<Option<DeferredTask>, StoreError> {
        // The intake loop may store the entry again meanwhile (a copy released before
        // this pass, deferred again): then the new one is marked.
        for _ in 0..3 {
            let Some((t, old)) = self.find_raw(id)? else {
                return Ok(None);
            };
            if t.cancelled.is_some() {
                return Ok(Some(t));
            }
            let marked = DeferredTask {
                cancelled: Some(reason.to_string()),
                ..t.clone()
            };
            let bytes = serde_json::to_vec(&marked).map_err(|e| StoreError::Corrupt {
                id: id.to_string(),
                reason: e.to_string(),
            })?;
            let (tree, _) = self.tree_of(&t);
            if let Some(k) = marked.deadline_key() {
                self.deadlines.insert(k, marked.location())?;
            }
            if tree
                .compare_and_swap(t.key(), Some(old), Some(bytes))?
                .is_ok()
            {
                if let Some(k) = t.deadline_key() {
                    let _ = self.deadlines.compare_and_swap(
                        k,
                        Some(t.location()),
                        None as Option<&[u8]>,
                    )?;
                }
                return Ok(Some(marked));
            }
        }
        Err(StoreError::Corrupt {
            id: id.to_string(),
            reason: "its deferred entry kept changing while it was being cancelled".into(),
        })
    }

    /// Deferred and parked tasks whose deadline has passed (by deadline, at most
    /// `limit`): released at once, so the intake loop ends each as `cancelled`.
    pub fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<DeferredTask>, StoreError> {
        let mut out = Vec::new();
        let end = now_ms.saturating_add(1).to_be_bytes();
        for item in self.deadlines.range(..end.as_slice()) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            match self
                .entry_at(&v)?
                .map(|e| serde_json::from_slice::<DeferredTask>(&e))
            {
                Some(Ok(t)) if t.deadline_key().as_deref() == Some(&k[..]) => out.push(t),
                // Its task left without its index entry (a crash between the two
                // writes), is not the one it was written for (a cancel that did not
                // complete), or cannot be read (the release passes report that): it
                // would come first for good.
                _ => {
                    self.deadlines.remove(&k)?;
                }
            }
        }
        Ok(out)
    }

    /// The next deadline of a deferred or parked task, if one has a deadline.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let (k, _) = self.deadlines.first().ok()??;
        Some(u64::from_be_bytes(k.get(..8)?.try_into().ok()?))
    }

    /// Deletes a budget-deferred entry by key alone, leaving its index entries (tests:
    /// a crash between the writes).
    #[cfg(test)]
    pub(crate) fn tree_remove_raw(&self, key: &[u8]) {
        if self.tree.remove(key).ok().flatten().is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Writes `t`'s deadline index entry alone (tests: a cancel cut short).
    #[cfg(test)]
    pub(crate) fn insert_deadline_raw(&self, t: &DeferredTask) {
        if let Some(k) = t.deadline_key() {
            let _ = self.deadlines.insert(k, t.location());
        }
    }

    /// Deletes a parked entry by key alone, leaving its index entries (tests: a crash
    /// between the writes).
    #[cfg(test)]
    pub(crate) fn parked_remove_raw(&self, key: &[u8]) {
        if self.parked.remove(key).ok().flatten().is_some() {
            self.parked_count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Empties the id index (tests: a store from before it existed).
    #[cfg(test)]
    pub(crate) fn clear_ids_raw(&self) {
        let _ = self.ids.clear();
    }

    /// When the next parked turn comes, if any task is parked.
    pub fn next_turn_ms(&self) -> Option<u64> {
        let (k, _) = self.parked.first().ok()??;
        Some(u64::from_be_bytes(k.get(..8)?.try_into().ok()?))
    }

    /// The last turn (unix ms) still parked in `throttle`'s line for `key`, if any. An
    /// index entry whose task is not parked there (a crash between the two writes) is
    /// dropped on the way.
    pub fn last_parked_turn_ms(
        &self,
        throttle: &str,
        key: &str,
    ) -> Result<Option<u64>, StoreError> {
        let prefix = line_prefix(throttle, key);
        while let Some((k, _)) = self.lines.scan_prefix(&prefix).next_back().transpose()? {
            let rest = k.get(prefix.len()..).unwrap_or_default();
            let at = rest
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes);
            // The parked tree's key is the same turn and id.
            if let Some(at) = at
                && self.parked.contains_key(rest)?
            {
                return Ok(Some(at));
            }
            self.lines.remove(&k)?;
        }
        Ok(None)
    }

    /// Every parked task's turn, in turn order (to resume the throttles' lines at start).
    pub fn parked_turns(&self) -> Vec<crate::domain::ThrottleTurn> {
        self.parked
            .iter()
            .filter_map(|item| item.ok())
            .filter_map(|(_, v)| serde_json::from_slice::<DeferredTask>(&v).ok()?.turn)
            .collect()
    }

    /// The tasks that fit now, in release order, at most `limit`: each is checked against
    /// the budgets of `policy` as if the ones chosen before it were already spent.
    pub fn due(
        &self,
        policy: &Policy,
        ledger: &Ledger,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<DeferredTask>, StoreError> {
        let mut extra: BTreeMap<(String, String), f64> = BTreeMap::new();
        let mut out = Vec::new();
        // Once a queue is blocked, nothing behind it in that queue may pass it.
        let mut blocked: std::collections::BTreeSet<(String, String)> = Default::default();
        // Every task waits in at least one queue, so once all of them are blocked nothing
        // further can be released: the pass stops there instead of reading the whole queue
        // (a million entries at most) every second while the budgets stay spent.
        let queues = self.queued();
        let mut queues_blocked = 0;
        for item in self.tree.iter() {
            if out.len() >= limit || (!queues.is_empty() && queues_blocked == queues.len()) {
                break;
            }
            let (_, v) = item?;
            let Ok(t) = serde_json::from_slice::<DeferredTask>(&v) else {
                continue;
            };
            // A cancelled one leaves through the deadline index, without its budget.
            if t.cancelled.is_some() || t.queues.iter().any(|q| blocked.contains(q)) {
                continue;
            }
            let routed = budget::Routed {
                dims: &t.dims,
                pool: &t.pool,
                model: &t.model,
                est: t.est_usd,
                priority: t.priority,
            };
            let c = budget::check(policy, ledger, &extra, routed, now_ms);
            if c.over.is_empty() {
                for k in &c.cells {
                    *extra
                        .entry((k.budget.clone(), k.value.clone()))
                        .or_insert(0.0) += t.est_usd;
                }
                out.push(t);
            } else {
                let over = c
                    .over
                    .iter()
                    .map(|o| (o.budget.spec.name.clone(), o.value.clone()));
                for q in t.queues.iter().cloned().chain(over) {
                    if queues.contains_key(&q) && !blocked.contains(&q) {
                        queues_blocked += 1;
                    }
                    blocked.insert(q);
                }
            }
        }
        Ok(out)
    }
}

/// A tree's tasks in key order, at most `limit`, after `after` (a key) when given.
fn list_tree(
    tree: &sled::Tree,
    limit: usize,
    after: Option<&[u8]>,
) -> Result<Vec<DeferredTask>, StoreError> {
    let iter = match after {
        Some(a) => tree.range((
            std::ops::Bound::Excluded(a.to_vec()),
            std::ops::Bound::Unbounded,
        )),
        None => tree.iter(),
    };
    let mut out = Vec::new();
    for item in iter.take(limit) {
        let (_, v) = item?;
        match serde_json::from_slice::<DeferredTask>(&v) {
            Ok(t) => out.push(t),
            Err(e) => tracing::warn!(error = %e, "undecodable deferred task skipped"),
        }
    }
    Ok(out)
}
