//! Durable local state in sled: one record per task, with its state history.
//!
//! JetStream is the source of truth for tasks in flight; this store is what the commander
//! knows about each task (where it went, under which trace, how it ended). Updates are
//! atomic read-modify-writes that never move a task backwards, because the intake and
//! results loops race: a fast worker's result can be processed before the intake loop
//! records the dispatch.

use std::path::Path;
use std::time::SystemTime;

use fleet_worker::message::{ErrorInfo, ResultStatus, TaskResult, Usage, now_rfc3339};
use serde::{Deserialize, Serialize};

pub mod codec;
pub mod lz4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record for {id} does not decode: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("store flush did not run: {0}")]
    Flush(String),
}

/// Where a task is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Received,
    /// Held by a budget (see `policy::deferred`); released to intake when it has room.
    Deferred,
    Dispatched,
    Completed,
    Failed,
    Rejected,
}

impl TaskState {
    /// Terminal states are never left.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Failed | TaskState::Rejected
        )
    }
    fn rank(self) -> u8 {
        match self {
            TaskState::Received => 0,
            TaskState::Deferred => 1,
            TaskState::Dispatched => 2,
            _ => 3,
        }
    }
}

/// One state change with its time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    pub state: TaskState,
    pub at: String,
}

/// The trace a task travels under.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceInfo {
    pub trace_id: String,
    /// The commander's PRODUCER `send` span; parent of the worker's process span.
    pub dispatch_span_id: String,
    /// The producer's span (parent of the dispatch span), when its traceparent was valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    /// The refused traceparent and why, when the producer's was invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_traceparent: Option<String>,
    /// The `traceparent` sent to the worker.
    pub traceparent: String,
}

/// How a task ended, as its result said.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub status: ResultStatus,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// Everything the commander knows about one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub state: TaskState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Why this pool (or why none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_reason: Option<String>,
    /// The model routing chose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The decision that routed it (see the decision log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_id: Option<String>,
    /// When that decision was logged (its key in the decision log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_at_ms: Option<u64>,
    pub attempt: u32,
    pub priority: u8,
    /// Sequence of the submission in the intake stream.
    pub intake_sequence: u64,
    /// When the intake stream stored the submission (unix ms), kept for tasks sent without
    /// an id: it tells a redelivery of the same message from a new message that a
    /// restarted nats-server gave a sequence it had handed out before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intake_stored_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection: Option<ErrorInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// The budget reservation made at dispatch, settled by the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::domain::Reservation>,
    /// Why and until when the task is (or was last) deferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred: Option<DeferInfo>,
    /// Policy version of the task's latest decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    /// The sources' generations of that decision (see `decisions::Generation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<crate::domain::Generation>,
    pub history: Vec<StateChange>,
}

/// A deferral, as the producer reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeferInfo {
    pub reason: String,
    /// When the budget's window resets (absent: when the limit is raised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    pub deferred_at: String,
    /// Times it left the deferred queue (released back to intake), whether it was then
    /// dispatched or deferred again.
    pub releases: u32,
}

impl TaskRecord {
    pub fn new(id: &str, intake_sequence: u64) -> Self {
        Self {
            id: id.to_string(),
            state: TaskState::Received,
            pool: None,
            route_reason: None,
            model: None,
            decision_id: None,
            decision_at_ms: None,
            attempt: 0,
            priority: 5,
            intake_sequence,
            intake_stored_ms: None,
            reply_to: None,
            trace: None,
            rejection: None,
            outcome: None,
            budget: None,
            deferred: None,
            policy_version: None,
            generation: None,
            history: Vec::new(),
        }
    }

    /// Moves to `state` unless that would go backwards; the change is recorded either way
    /// (a dispatch recorded after the result still has its time), but the state stays.
    pub fn advance(&mut self, state: TaskState) {
        self.advance_at(state, now_rfc3339());
    }

    /// [`TaskRecord::advance`] with the time the change happened.
    pub fn advance_at(&mut self, state: TaskState, at: String) {
        self.history.push(StateChange { state, at });
        if state.rank() >= self.state.rank() && !self.state.is_terminal() {
            self.state = state;
        }
    }

    /// Applies a worker's result.
    pub fn finish(&mut self, result: &TaskResult) {
        let state = match result.status {
            ResultStatus::Ok => TaskState::Completed,
            ResultStatus::Rejected => TaskState::Rejected,
            ResultStatus::Failed | ResultStatus::Cancelled => TaskState::Failed,
        };
        if self.state.is_terminal() {
            return;
        }
        self.outcome = Some(Outcome {
            status: result.status,
            attempt: result.attempt,
            worker_id: result.worker_id.clone(),
            error: result.error.clone(),
            usage: result.usage.clone(),
            duration_ms: result.timings.duration_ms,
        });
        self.advance(state);
    }
}

/// The sled database and its trees.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    /// Task records in the order they were first written: [`record_key`] (a record number
    /// from sled's `generate_id`, big-endian, then the task id) → the record. Producers'
    /// ids are random, and a tree keyed by them takes every write at a random leaf, so
    /// all of it stays hot and each write cost more as it grew (`bench dispatch
    /// --random-ids`: 84 → 144 µs of commander CPU per task over a million tasks, keyed
    /// by id). In creation order, the writes of a running commander land in the last few
    /// leaves whatever the ids are.
    tasks: sled::Tree,
    /// Task id → record number, for every record in `tasks`: rebuilt from their keys when
    /// the store opens (kept in memory, bounded by the records retention keeps).
    index: std::sync::Arc<dashmap::DashMap<Box<str>, u64>>,
    /// Retention index, in time order: (finish time in ms, big-endian) ++ task id → ()
    /// for a task indexed by its own update, or (time in ms) ++ `0x00` ++ a unique id →
    /// a page naming every task of a results batch (see [`Store::index_finishing`]). Lets
    /// the sweeper find old finished tasks without reading every record.
    finished: sled::Tree,
    flushes: std::sync::Arc<Flushes>,
}

/// One flush at a time, shared by everyone who waits for it (group commit).
///
/// sled's `flush_async` parks a thread of sled's own I/O pool until the log is stable,
/// and the log is written by that same pool: with every loop flushing its batches at once
/// the pool filled with waiters and nothing was left to write (seen in `bench dispatch`
/// after a million tasks: eight `sled-io` threads in `make_stable`, the commander
/// stopped). Here one flush runs at a time, on tokio's blocking pool, and a caller whose
/// writes a flush that began after it arrived already covered returns without another.
#[derive(Debug, Default)]
struct Flushes {
    turn: tokio::sync::Mutex<()>,
    /// Flushes begun.
    started: std::sync::atomic::AtomicU64,
    /// The last flush finished (they run one at a time, so in order).
    done: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Opens with sled's default cache (1 GiB).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, 1 << 30)
    }

    /// Opens with a page cache of `cache_bytes` (`store.cache_mib`).
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            // sled's default (LowSpace) rewrites pages eagerly to save disk; the task path
            // is write-heavy and retention bounds the size, so write throughput wins.
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(Some(1000))
            .open()?;
        let tasks = db.open_tree(RECORDS_TREE)?;
        let finished = db.open_tree("finished")?;
        let store = Self {
            db,
            tasks,
            index: Default::default(),
            finished,
            flushes: Default::default(),
        };
        store.load_index()?;
        store.migrate_by_id()?;
        Ok(store)
    }

    /// Fills the id index from the records' keys (values are not read). Two records of
    /// one id (a result racing the sweep that removed its task) keep the later one.
    fn load_index(&self) -> Result<(), StoreError> {
        for key in self.tasks.iter().keys() {
            let key = key?;
            let Some((n, id)) = split_record_key(&key) else {
                tracing::warn!(key = %crate::domain::hex(&key), "a task record key that is not one; skipped");
                continue;
            };
            if let Some(before) = self.index.insert(id.into(), n) {
                // Keys come in record-number order: the earlier one goes.
                tracing::warn!(task_id = id, "two records of one task; keeping the later");
                self.tasks.remove(record_key(before, id))?;
            }
        }
        Ok(())
    }

    /// Moves records from the tree keyed by task id (the layout before December 2026) to
    /// [`RECORDS_TREE`], then drops it. Idempotent: sled makes writes durable in the order
    /// they were made, so after a crash a record is in the new tree (and maybe still in
    /// the old one, which then just goes) or only in the old one.
    fn migrate_by_id(&self) -> Result<(), StoreError> {
        let old = self.db.open_tree(OLD_RECORDS_TREE)?;
        let mut moved = 0u64;
        for entry in old.iter() {
            let (id, value) = entry?;
            match std::str::from_utf8(&id) {
                Ok(id) if !self.index.contains_key(id) => {
                    let n = self.db.generate_id()?;
                    self.tasks.insert(record_key(n, id), value)?;
                    self.index.insert(id.into(), n);
                    moved += 1;
                }
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(key = %crate::domain::hex(&id), "a task record whose id is not UTF-8; dropped")
                }
            }
            old.remove(&id)?;
        }
        self.db.drop_tree(OLD_RECORDS_TREE)?;
        if moved > 0 {
            tracing::info!(
                moved,
                "task records moved to creation-ordered keys (the store's layout before December 2026)"
            );
        }
        Ok(())
    }

    /// The record number of a task id that has a record.
    fn number_of(&self, id: &str) -> Option<u64> {
        self.index.get(id).map(|n| *n)
    }

    /// The record number of a task id, a new one if it has none yet; `true` when this
    /// call numbered it.
    fn number_for(&self, id: &str) -> Result<(u64, bool), StoreError> {
        if let Some(n) = self.number_of(id) {
            return Ok((n, false));
        }
        let fresh = self.db.generate_id()?;
        // Another writer may have numbered it since: theirs stands.
        let n = *self.index.entry(id.into()).or_insert(fresh);
        Ok((n, n == fresh))
    }

    pub fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let Some(n) = self.number_of(id) else {
            return Ok(None);
        };
        match self.tasks.get(record_key(n, id))? {
            None => Ok(None),
            Some(bytes) => decode(id, &bytes).map(Some),
        }
    }

    /// Atomically updates (or creates) a task record. `f` may run more than once under
    /// contention, so it must be a pure function of the record it is given. The update
    /// that makes the task terminal also names it in the retention index.
    pub fn update(
        &self,
        id: &str,
        create: impl Fn() -> TaskRecord,
        f: impl Fn(&mut TaskRecord),
    ) -> Result<TaskRecord, StoreError> {
        let (n, _) = self.number_for(id)?;
        self.update_with(id, n, create, f, Index::OnFinish)
    }

    /// [`Store::update`] for a record that is most likely not there yet (a task's first
    /// dispatch): it is written only if the id is still absent, which saves the read and
    /// decode of the old value that `update_and_fetch` starts with. When a record is there
    /// after all (a result that overtook its dispatch, a task released from the deferred
    /// queue), this is [`Store::update`].
    pub fn create_or_update(
        &self,
        id: &str,
        create: impl Fn() -> TaskRecord,
        f: impl Fn(&mut TaskRecord),
    ) -> Result<TaskRecord, StoreError> {
        let (n, fresh) = self.number_for(id)?;
        if fresh && let Some(rec) = self.create_absent(id, n, &create, &f)? {
            return Ok(rec);
        }
        self.update_with(id, n, create, f, Index::OnFinish)
    }

    /// Writes the record `f` makes of `create()` under number `n` if no record is there;
    /// `None` when one is (another writer found the number since).
    fn create_absent(
        &self,
        id: &str,
        n: u64,
        create: impl Fn() -> TaskRecord,
        f: impl Fn(&mut TaskRecord),
    ) -> Result<Option<TaskRecord>, StoreError> {
        let mut rec = create();
        f(&mut rec);
        let bytes = codec::encode(&rec).map_err(|e| StoreError::Corrupt {
            id: id.to_string(),
            reason: format!("record did not encode: {e}"),
        })?;
        let absent = self
            .tasks
            .compare_and_swap(record_key(n, id), None as Option<&[u8]>, Some(bytes))?
            .is_ok();
        if !absent {
            return Ok(None);
        }
        if rec.state.is_terminal() {
            self.index_finished(id)?;
        }
        Ok(Some(rec))
    }

    /// [`Store::update`] for a task already named in the retention index by
    /// [`Store::index_finishing`]: the update does not index it again.
    pub fn update_indexed(
        &self,
        id: &str,
        create: impl Fn() -> TaskRecord,
        f: impl Fn(&mut TaskRecord),
    ) -> Result<TaskRecord, StoreError> {
        let (n, _) = self.number_for(id)?;
        self.update_with(id, n, create, f, Index::Already)
    }

    /// Names every task in `ids` in the retention index under the time now, with one write
    /// for all of them (or a few, each at most [`PAGE_BYTES`]): a batch of results, each
    /// of which will make its task terminal (through [`Store::update_indexed`]). One sled
    /// write costs about the same whatever it holds, and an entry per task was a fifth of
    /// a result's store work.
    ///
    /// Written *before* those updates, so a record can never be terminal on disk without
    /// an entry (sled flushes in the background too; an entry written after could be lost
    /// in a crash, and the redelivered result would find the task terminal already and
    /// index nothing). The sweep removes only the named records that are terminal.
    pub fn index_finishing(&self, ids: &[&str]) -> Result<(), StoreError> {
        let at_ms = unix_millis(SystemTime::now());
        let mut rest = ids;
        while !rest.is_empty() {
            // As many ids as fit PAGE_BYTES (an id is at most 128 bytes, plus postcard's
            // length prefix), at least one.
            let mut bytes = 0;
            let fit = rest
                .iter()
                .take_while(|id| {
                    bytes += id.len() + 2;
                    bytes <= PAGE_BYTES
                })
                .count()
                .max(1);
            // `fit` is at most `rest.len()`: a count of its items, or 1 of a non-empty slice.
            let (page_ids, later) = rest.split_at(fit);
            rest = later;
            let page = postcard::to_extend(page_ids, vec![FINISHED_PAGE_V1]).map_err(|e| {
                StoreError::Corrupt {
                    id: page_ids.first().copied().unwrap_or_default().to_string(),
                    reason: format!("retention page did not encode: {e}"),
                }
            })?;
            self.finished.insert(self.page_key(at_ms)?, page)?;
        }
        Ok(())
    }

    /// Updates (or creates) the record of `id`, numbered `n`.
    fn update_with(
        &self,
        id: &str,
        n: u64,
        create: impl Fn() -> TaskRecord,
        f: impl Fn(&mut TaskRecord),
        index: Index,
    ) -> Result<TaskRecord, StoreError> {
        let mut last_err = None;
        // Set by the closure's last run (the one whose result was stored): whether this
        // update made the task terminal, and the record it wrote (returned as is rather
        // than decoded again from the stored bytes).
        let became_terminal = std::cell::Cell::new(false);
        let written: std::cell::RefCell<Option<TaskRecord>> = std::cell::RefCell::new(None);
        self.tasks.update_and_fetch(record_key(n, id), |old| {
            let mut rec = match old.map(codec::decode) {
                Some(Ok(r)) => r,
                Some(Err(e)) => {
                    last_err = Some(e.to_string());
                    create()
                }
                None => create(),
            };
            let was_terminal = rec.state.is_terminal();
            f(&mut rec);
            became_terminal.set(!was_terminal && rec.state.is_terminal());
            // Returning None would delete the key: on an (impossible) encode failure keep the
            // old bytes rather than lose the record.
            match codec::encode(&rec) {
                Ok(bytes) => {
                    *written.borrow_mut() = Some(rec);
                    Some(bytes)
                }
                Err(_) => {
                    *written.borrow_mut() = None;
                    old.map(<[u8]>::to_vec)
                }
            }
        })?;
        if let Some(reason) = last_err {
            tracing::warn!(task_id = id, reason, "replaced an undecodable task record");
        }
        if became_terminal.get() && index == Index::OnFinish {
            self.index_finished(id)?;
        }
        match written.into_inner() {
            Some(rec) => Ok(rec),
            None => Err(StoreError::Corrupt {
                id: id.to_string(),
                reason: "record did not encode".into(),
            }),
        }
    }

    /// Names a task that just became terminal in the retention index, under the time now.
    fn index_finished(&self, id: &str) -> Result<(), StoreError> {
        self.finished
            .insert(finished_key(unix_millis(SystemTime::now()), id), &[])?;
        Ok(())
    }

    /// Deletes tasks that finished before `cutoff`; returns how many went. Stops once
    /// `limit` have gone (a batch's page of the index is taken whole, so by up to one
    /// page more). Tasks still in flight are never swept: a record a page names is removed
    /// only when it is terminal (a crash between the page and the update leaves it in
    /// flight; its redelivered result indexes it again).
    pub fn sweep(&self, cutoff: SystemTime, limit: usize) -> Result<usize, StoreError> {
        let end = unix_millis(cutoff).to_be_bytes();
        let mut removed = 0;
        for entry in self.finished.range(..end.as_slice()) {
            if removed >= limit {
                break;
            }
            let (key, value) = entry?;
            for id in indexed_ids(&key, &value) {
                if self.remove_if_terminal(id)? {
                    removed += 1;
                }
            }
            self.finished.remove(key)?;
        }
        Ok(removed)
    }

    /// Removes a task's record if it is terminal; `true` when one went. A record that
    /// does not decode is removed too: it was indexed as finished, and cannot be read.
    fn remove_if_terminal(&self, id: &[u8]) -> Result<bool, StoreError> {
        let Some((id, n)) = std::str::from_utf8(id)
            .ok()
            .and_then(|id| Some((id, self.number_of(id)?)))
        else {
            return Ok(false);
        };
        let key = record_key(n, id);
        let Some(bytes) = self.tasks.get(&key)? else {
            return Ok(false);
        };
        let terminal = codec::decode(&bytes).map_or(true, |r| r.state.is_terminal());
        if terminal {
            // The id first: a write that comes after numbers a new record.
            self.index.remove_if(id, |_, v| *v == n);
            self.tasks.remove(key)?;
        }
        Ok(terminal)
    }

    /// Makes everything written so far durable (see [`Flushes`]).
    pub async fn flush(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let f = &self.flushes;
        let arrived = f.started.load(SeqCst);
        let _turn = f.turn.lock().await;
        if f.done.load(SeqCst) > arrived {
            // A flush that began after this caller's writes has finished.
            return Ok(());
        }
        let n = f.started.fetch_add(1, SeqCst) + 1;
        let db = self.db.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || db.flush())
                    .await
                    .map_err(|e| StoreError::Flush(e.to_string()))??;
            }
            // Outside a runtime (tests driving the store by hand): flush right here.
            Err(_) => {
                db.flush()?;
            }
        }
        f.done.store(n, SeqCst);
        Ok(())
    }

    /// Another tree in the same database (the decision log), flushed with the tasks.
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// The key of a page of entries written at `at_ms` in a time-ordered tree (the
    /// retention index, the decision log): `at_ms` (big-endian) ++ [`PAGE_MARK`] ++ a
    /// number sled never hands out twice, across restarts (`generate_id`, increasing, so
    /// the pages of one millisecond keep the order they were written in). A per-entry key
    /// in the same tree is `at_ms ++ task id`, and a task id never starts with the mark.
    pub fn page_key(&self, at_ms: u64) -> Result<Vec<u8>, StoreError> {
        let mut k = Vec::with_capacity(PAGE_KEY_LEN + 1);
        k.extend_from_slice(&at_ms.to_be_bytes());
        k.push(PAGE_MARK);
        k.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
        Ok(k)
    }

    /// Removes a tree and everything in it (a layout migrated away from); `false` when
    /// there was none.
    pub fn drop_tree(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.db.drop_tree(name)?)
    }

    /// Task records held (constant time: the index's size).
    pub fn task_count(&self) -> usize {
        self.index.len()
    }
}

/// Whether an update names a task that became terminal in the retention index itself.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Index {
    OnFinish,
    /// The caller wrote a page naming it first ([`Store::index_finishing`]).
    Already,
}

/// The tree of task records, keyed by [`record_key`].
const RECORDS_TREE: &str = "task_records";

/// The tree that held task records keyed by their id until December 2026 (migrated at
/// open by [`Store::migrate_by_id`]).
const OLD_RECORDS_TREE: &str = "tasks";

/// A task record's key: its record number (big-endian, so records sort in the order
/// they were first written) then its id.
fn record_key(n: u64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    k.extend_from_slice(&n.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// The record number and task id of a [`record_key`].
fn split_record_key(key: &[u8]) -> Option<(u64, &str)> {
    let (n, id) = key.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*n), std::str::from_utf8(id).ok()?))
}

/// Byte 8 of a page's key ([`Store::page_key`]): a task id, a printable subject token,
/// never starts with it.
pub const PAGE_MARK: u8 = 0;

/// Bytes of [`Store::page_key`]: `at_ms` 8, mark 1, unique id 8.
pub const PAGE_KEY_LEN: usize = 17;

/// Most bytes a page of a time-ordered tree (the retention index, the decision log) may
/// take. sled splits a leaf at 17 entries and writes a node over 128 KiB (a quarter of
/// its 512 KiB segment) to a file of its own, created, written and later deleted on every
/// rewrite of that leaf: 17 pages of 7 KiB stay under it. Uncompressed pages of 32
/// decisions (~25 KB) made every leaf of the decision log such a file, about 6 % of the
/// commander's CPU in `bench dispatch`, most of it creating files.
pub const PAGE_BYTES: usize = 7 * 1024;

/// First byte of a retention page: format 1, then postcard of the task ids.
const FINISHED_PAGE_V1: u8 = 1;

/// The task ids a retention entry names: the one in its key (a per-task entry, empty
/// value), or every id of its page. A page that does not decode names none (logged): its
/// tasks stay until removed some other way, rather than guessing.
fn indexed_ids<'a>(key: &'a [u8], value: &'a [u8]) -> Vec<&'a [u8]> {
    if value.is_empty() {
        return key.get(8..).into_iter().collect();
    }
    let page = match value.split_first() {
        Some((&FINISHED_PAGE_V1, body)) => postcard::from_bytes::<Vec<&str>>(body).ok(),
        _ => None,
    };
    match page {
        Some(ids) => ids.into_iter().map(str::as_bytes).collect(),
        None => {
            tracing::warn!(
                bytes = value.len(),
                "a retention page does not decode; its tasks are not swept"
            );
            Vec::new()
        }
    }
}

fn finished_key(at_ms: u64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn decode(id: &str, bytes: &[u8]) -> Result<TaskRecord, StoreError> {
    codec::decode(bytes).map_err(|e| StoreError::Corrupt {
        id: id.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
impl Store {
    /// Opens the store again in the same process, as after a restart. sled's background
    /// flusher lets go of the previous handle's file lock a moment after the last handle
    /// is dropped, so this waits for it (up to 10 s).
    pub(crate) fn reopen(dir: &Path) -> Self {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Self::open(dir) {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() >= deadline => {
                    panic!("store at {} not reopened: {e}", dir.display())
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A result that finishes its task successfully.
    fn ok_result() -> TaskResult {
        let mut ok = TaskResult::rejected("x", "x", "x");
        ok.status = ResultStatus::Ok;
        ok
    }

    #[test]
    fn sweep_removes_only_tasks_finished_before_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ok = ok_result();
        for id in ["done-1", "done-2", "running"] {
            store
                .update(
                    id,
                    || TaskRecord::new(id, 1),
                    |r| r.advance(TaskState::Dispatched),
                )
                .unwrap();
        }
        for id in ["done-1", "done-2"] {
            store
                .update(id, || TaskRecord::new(id, 1), |r| r.finish(&ok))
                .unwrap();
            // A second terminal update does not index the task twice.
            store
                .update(id, || TaskRecord::new(id, 1), |r| r.finish(&ok))
                .unwrap();
        }
        let past = SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(
            store.sweep(past, 100).unwrap(),
            0,
            "nothing finished an hour ago"
        );
        let future = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(store.sweep(future, 1).unwrap(), 1, "the limit holds");
        assert_eq!(store.sweep(future, 100).unwrap(), 1);
        assert!(store.get("done-1").unwrap().is_none() && store.get("done-2").unwrap().is_none());
        assert!(
            store.get("running").unwrap().is_some(),
            "tasks in flight are kept"
        );
        assert_eq!(store.task_count(), 1);
    }

    /// A results batch names its tasks in one page before recording them; the sweep
    /// removes the terminal ones it names, keeps one whose update never happened (a crash
    /// between page and update), and reads per-task entries beside pages.
    #[test]
    fn a_page_of_the_retention_index_sweeps_the_finished_tasks_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ok = ok_result();
        let ids: Vec<String> = (0..300).map(|i| format!("paged-{i}")).collect();
        for id in ids
            .iter()
            .chain(["crashed".to_string(), "alone".to_string()].iter())
        {
            store
                .update(
                    id,
                    || TaskRecord::new(id, 1),
                    |r| r.advance(TaskState::Dispatched),
                )
                .unwrap();
        }
        let mut named: Vec<&str> = ids.iter().map(String::as_str).collect();
        named.push("crashed");
        store.index_finishing(&named).unwrap();
        for id in &ids {
            store
                .update_indexed(id, || TaskRecord::new(id, 1), |r| r.finish(&ok))
                .unwrap();
        }
        // Indexed on its own, the way every other path finishes a task.
        store
            .update("alone", || TaskRecord::new("alone", 1), |r| r.finish(&ok))
            .unwrap();
        assert_eq!(store.finished.len(), 2, "one page and one per-task entry");

        let past = SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(store.sweep(past, 1_000).unwrap(), 0);
        let future = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(store.sweep(future, 1_000).unwrap(), 301);
        assert_eq!(store.finished.len(), 0);
        assert!(ids.iter().all(|id| store.get(id).unwrap().is_none()));
        assert!(store.get("alone").unwrap().is_none());
        let kept = store.get("crashed").unwrap().expect("in flight, so kept");
        assert_eq!(kept.state, TaskState::Dispatched);
        assert_eq!(store.task_count(), 1);
    }

    #[test]
    fn long_task_ids_are_indexed_in_several_pages_that_each_fit_a_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ok = ok_result();
        // The longest ids a task may have (128 bytes), a full results batch of them.
        let ids: Vec<String> = (0..256).map(|i| format!("{i:0>128}")).collect();
        let named: Vec<&str> = ids.iter().map(String::as_str).collect();
        store.index_finishing(&named).unwrap();
        for id in &ids {
            store
                .update_indexed(id, || TaskRecord::new(id, 1), |r| r.finish(&ok))
                .unwrap();
        }
        let pages: Vec<_> = store.finished.iter().map(|e| e.unwrap().1).collect();
        assert!(pages.len() > 1, "{} pages", pages.len());
        assert!(pages.iter().all(|p| p.len() <= PAGE_BYTES));
        let future = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(store.sweep(future, 1_000).unwrap(), 256);
        assert_eq!(store.task_count(), 0);
    }

    #[test]
    fn an_empty_batch_writes_no_page_and_a_page_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.index_finishing(&[]).unwrap();
            assert_eq!(store.finished.len(), 0);
            let ok = ok_result();
            store.index_finishing(&["a", "b"]).unwrap();
            for id in ["a", "b"] {
                store
                    .update_indexed(id, || TaskRecord::new(id, 1), |r| r.finish(&ok))
                    .unwrap();
            }
            futures::executor::block_on(store.flush()).unwrap();
        }
        let store = Store::reopen(dir.path());
        let future = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(store.sweep(future, 1).unwrap(), 2, "a page goes whole");
        assert_eq!(store.task_count(), 0);
    }

    #[test]
    fn state_never_moves_backwards_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mk = || TaskRecord::new("t1", 7);
            store
                .update("t1", mk, |r| r.advance(TaskState::Received))
                .unwrap();
            let mut result = TaskResult::rejected("t1", "x", "y");
            result.status = ResultStatus::Ok;
            store.update("t1", mk, |r| r.finish(&result)).unwrap();
            // The dispatch is recorded after the result: the state stays completed.
            let rec = store
                .update("t1", mk, |r| r.advance(TaskState::Dispatched))
                .unwrap();
            assert_eq!(rec.state, TaskState::Completed);
            assert_eq!(rec.history.len(), 3);
            futures::executor::block_on(store.flush()).unwrap();
        }
        let store = Store::reopen(dir.path());
        let rec = store.get("t1").unwrap().unwrap();
        assert_eq!(rec.state, TaskState::Completed);
        assert_eq!(rec.intake_sequence, 7);
        assert!(store.get("nope").unwrap().is_none());
    }

    /// `create_or_update` writes a new record whole, and merges into one that is there
    /// (a result that overtook its dispatch) exactly as `update` does; a record it
    /// creates terminal is indexed for retention.
    #[test]
    fn create_or_update_creates_or_merges_as_update_does() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let dispatch = |r: &mut TaskRecord| {
            r.pool = Some("research".into());
            r.advance(TaskState::Dispatched);
        };
        let rec = store
            .create_or_update("new", || TaskRecord::new("new", 3), dispatch)
            .unwrap();
        assert_eq!(rec.state, TaskState::Dispatched);
        assert_eq!(store.get("new").unwrap(), Some(rec));

        let ok = ok_result();
        store
            .update(
                "overtaken",
                || TaskRecord::new("overtaken", 4),
                |r| r.finish(&ok),
            )
            .unwrap();
        let rec = store
            .create_or_update("overtaken", || TaskRecord::new("overtaken", 4), dispatch)
            .unwrap();
        assert_eq!(rec.state, TaskState::Completed, "never backwards");
        assert_eq!(
            rec.pool.as_deref(),
            Some("research"),
            "the dispatch merged in"
        );
        assert_eq!(rec.history.len(), 2);
        assert!(rec.outcome.is_some(), "the result kept");
        assert_eq!(store.get("overtaken").unwrap(), Some(rec));

        store
            .create_or_update(
                "born-done",
                || TaskRecord::new("born-done", 5),
                |r| r.advance(TaskState::Rejected),
            )
            .unwrap();
        let future = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(store.sweep(future, 100).unwrap(), 2);
        assert!(store.get("born-done").unwrap().is_none());
        assert!(store.get("overtaken").unwrap().is_none());
        assert!(store.get("new").unwrap().is_some(), "in flight: kept");
    }

    /// A store in the layout before December 2026 (records keyed by task id, in the tree
    /// `tasks`) opens with every record moved to creation-ordered keys and the old tree
    /// gone; a move cut short by a crash (a record already in both trees) is finished,
    /// and reopening again changes nothing.
    #[test]
    fn records_keyed_by_task_id_are_moved_to_record_numbers_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let written: Vec<TaskRecord> = (0..300)
            .map(|i| {
                let mut rec = codec::tests::full_record(&format!("{:08x}-old", i * 7919 % 300));
                rec.attempt = i;
                rec
            })
            .collect();
        {
            let db = sled::open(dir.path()).unwrap();
            let old = db.open_tree(OLD_RECORDS_TREE).unwrap();
            for rec in &written {
                old.insert(rec.id.as_bytes(), codec::encode(rec).unwrap())
                    .unwrap();
            }
            // Moved already, then the crash: in both trees.
            let new = db.open_tree(RECORDS_TREE).unwrap();
            let first = &written[0];
            new.insert(record_key(7, &first.id), codec::encode(first).unwrap())
                .unwrap();
            db.flush().unwrap();
        }
        for _ in 0..2 {
            let store = Store::reopen(dir.path());
            assert_eq!(store.task_count(), 300);
            assert_eq!(store.tasks.len(), 300, "one record per task");
            for rec in &written {
                assert_eq!(store.get(&rec.id).unwrap().as_ref(), Some(rec));
            }
            assert_eq!(
                store.number_of(&written[0].id),
                Some(7),
                "the moved one kept"
            );
            assert!(
                !store
                    .db
                    .tree_names()
                    .iter()
                    .any(|n| n.as_ref() == OLD_RECORDS_TREE.as_bytes()),
                "the old tree is dropped"
            );
            futures::executor::block_on(store.flush()).unwrap();
        }
    }

    /// New records are keyed in the order they are first written, whatever their ids,
    /// and the index comes back from the keys alone at reopen.
    #[test]
    fn records_are_keyed_in_creation_order_and_the_index_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..200u64)
            .map(|i| format!("{:016x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            .collect();
        {
            let store = Store::open(dir.path()).unwrap();
            for (i, id) in ids.iter().enumerate() {
                store
                    .create_or_update(
                        id,
                        || TaskRecord::new(id, i as u64),
                        |r| r.advance(TaskState::Dispatched),
                    )
                    .unwrap();
            }
            let in_key_order: Vec<String> = store
                .tasks
                .iter()
                .keys()
                .map(|k| split_record_key(&k.unwrap()).unwrap().1.to_string())
                .collect();
            assert_eq!(in_key_order, ids, "creation order, not id order");
            futures::executor::block_on(store.flush()).unwrap();
        }
        let store = Store::reopen(dir.path());
        assert_eq!(store.task_count(), 200);
        for (i, id) in ids.iter().enumerate() {
            let rec = store.get(id).unwrap().unwrap();
            assert_eq!(
                (rec.intake_sequence, rec.state),
                (i as u64, TaskState::Dispatched)
            );
        }
        // A new task after the reopen is numbered after all of them.
        store
            .create_or_update("after", || TaskRecord::new("after", 0), |_| {})
            .unwrap();
        let last = store.tasks.iter().keys().next_back().unwrap().unwrap();
        assert_eq!(split_record_key(&last).unwrap().1, "after");
    }

    /// A store written by the previous format (format 1: every record JSON, as
    /// `serde_json::to_vec(&TaskRecord)` wrote it until issue 19) opens, and every record
    /// reads back whole; an update writes format 2; retention still finds them.
    #[test]
    fn a_store_written_in_the_json_format_is_read_and_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let mut written = Vec::new();
        {
            let db = sled::open(dir.path()).unwrap();
            let tasks = db.open_tree("tasks").unwrap();
            for i in 0..500 {
                let mut rec = if i % 2 == 0 {
                    codec::tests::full_record(&format!("old-{i}"))
                } else {
                    TaskRecord::new(&format!("old-{i}"), i)
                };
                rec.attempt = i as u32;
                tasks
                    .insert(rec.id.as_bytes(), serde_json::to_vec(&rec).unwrap())
                    .unwrap();
                written.push(rec);
            }
            db.flush().unwrap();
        }
        let store = Store::reopen(dir.path());
        assert_eq!(store.task_count(), 500);
        for rec in &written {
            assert_eq!(store.get(&rec.id).unwrap().as_ref(), Some(rec));
        }
        let raw = |id: &str| {
            let key = record_key(store.number_of(id).unwrap(), id);
            store.tasks.get(key).unwrap().unwrap()
        };
        assert_eq!(
            codec::format_of(&raw("old-1")).unwrap(),
            codec::Format::Json
        );
        let mut ok = TaskResult::rejected("old-1", "x", "x");
        ok.status = ResultStatus::Ok;
        let rec = store
            .update("old-1", || unreachable!(), |r| r.finish(&ok))
            .unwrap();
        assert_eq!(rec.state, TaskState::Completed);
        assert_eq!(
            rec.intake_sequence, 1,
            "the JSON record was updated, not replaced"
        );
        assert_eq!(codec::format_of(&raw("old-1")).unwrap(), codec::Format::V2);
        assert_eq!(store.get("old-1").unwrap(), Some(rec));
        let future = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(store.sweep(future, 100).unwrap(), 1);
        assert_eq!(store.task_count(), 499);
    }
}
