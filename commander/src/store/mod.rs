//! Durable local state: one record per task, with its state history, the decision log's
//! pages and the budget ledger in the task log ([`log`]), and sled's trees beside it for
//! the rest (traces, alerts, the deferred queue, ...).
//!
//! JetStream is the source of truth for tasks in flight; this store is what the commander
//! knows about each task (where it went, under which trace, how it ended). Updates are
//! atomic read-modify-writes that never move a task backwards, because the intake and
//! results loops race: a fast worker's result can be processed before the intake loop
//! records the dispatch.

use std::path::Path;
use std::time::SystemTime;

use fleet_worker::message::{ErrorInfo, ResultStatus, TaskResult, Usage};
use serde::{Deserialize, Serialize};

use crate::domain::{Cell, CellKey};

pub mod codec;
pub mod log;
pub mod lz4;
mod stamp;
pub mod stubs;

pub use stamp::Stamp;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record for {id} does not decode: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("store flush did not run: {0}")]
    Flush(String),
    #[error("task log: {0}")]
    Io(String),
    /// sled's lock on its directory is held: by another commander on the same
    /// `store.data_dir`, most likely.
    #[error(
        "another process holds its lock (a commander already running on this store.data_dir?): stop that one, or give each commander replica a store of its own"
    )]
    InUse,
}

/// Whether sled's open error says its directory lock is held by another process.
fn is_lock_held(message: &str) -> bool {
    message.starts_with("could not acquire lock") && message.contains("WouldBlock")
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
    pub at: Stamp,
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
    /// Sequence of its latest dispatch's message in the work stream (the PubAck's), so an
    /// operator can cancel it while it waits there for a worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_sequence: Option<u64>,
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
    /// The replica that keeps this task's full record, when another replica ran it: this
    /// record is then a copy that only says how the task ended (an HTTP submission here, or
    /// a task deferred here and released). Set from the result's `Fleet-Replica`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_by: Option<String>,
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
    /// Parked by a throttle: the turn it was given (absent: deferred by a budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn: Option<crate::domain::ThrottleTurn>,
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
            work_sequence: None,
            trace: None,
            rejection: None,
            outcome: None,
            budget: None,
            deferred: None,
            policy_version: None,
            generation: None,
            kept_by: None,
            history: Vec::new(),
        }
    }

    /// Written by an HTTP submission (`POST /v1/tasks`) and taken by no intake loop here:
    /// the intake loop's record always has a history ([`stubs`]).
    pub fn is_stub(&self) -> bool {
        self.state == TaskState::Received && self.history.is_empty()
    }

    /// Moves to `state` unless that would go backwards; the change is recorded either way
    /// (a dispatch recorded after the result still has its time), but the state stays.
    pub fn advance(&mut self, state: TaskState) {
        self.advance_at(state, Stamp::now());
    }

    /// [`TaskRecord::advance`] with the time the change happened.
    pub fn advance_at(&mut self, state: TaskState, at: Stamp) {
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

/// What a record's budget reservation holds in the ledger: its cells, and the estimate
/// (while the task runs) or the charge (once it finished) in each.
pub(crate) fn ledger_share(rec: &TaskRecord) -> Option<(&[CellKey], Cell)> {
    let r = rec.budget.as_ref()?;
    Some((&r.cells, r.share(rec.state.is_terminal())?))
}

/// What a record that held `before` and now holds `after` ([`ledger_share`]) changes in
/// the budget ledger, per cell (nothing, for almost every update: only a dispatch with a
/// reservation and the result that charges it change what a record holds).
pub(crate) fn ledger_change(
    before: Option<(&[CellKey], Cell)>,
    after: Option<(&[CellKey], Cell)>,
) -> Vec<(CellKey, Cell)> {
    if before == after {
        return Vec::new();
    }
    let mut change: Vec<(CellKey, Cell)> = Vec::new();
    // Where each cell sits in `change`: a record holds a cell per budget that applied, and
    // a policy may have thousands, so finding one by scanning made this quadratic.
    let mut at: rustc_hash::FxHashMap<&CellKey, usize> = rustc_hash::FxHashMap::default();
    let sides = [(before, -1.0), (after, 1.0)];
    for (cells, c, sign) in sides
        .iter()
        .filter_map(|&(side, sign)| side.map(|(cells, c)| (cells, c, sign)))
    {
        for k in cells {
            let d = Cell {
                spent: sign * c.spent,
                reserved: sign * c.reserved,
            };
            match at.get(k) {
                Some(&i) => {
                    let sum = &mut change[i].1;
                    sum.spent += d.spent;
                    sum.reserved += d.reserved;
                }
                None => {
                    at.insert(k, change.len());
                    change.push((k.clone(), d));
                }
            }
        }
    }
    change.retain(|(_, c)| c.spent != 0.0 || c.reserved != 0.0);
    change
}

/// Whether `db` has a tree named `name`, without creating it.
fn tree_exists(db: &sled::Db, name: &str) -> bool {
    db.tree_names()
        .iter()
        .any(|n| n.as_ref() == name.as_bytes())
}

/// The task log and the sled database beside it.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    /// Task records ([`log`]): appended, never rewritten in place, with an index in
    /// memory. They lived in sled trees until December 2026 and are moved out at open
    /// ([`Store::move_records_out_of_sled`]).
    tasks: std::sync::Arc<log::TaskLog>,
    flushes: std::sync::Arc<Flushes>,
    trouble: std::sync::Arc<Trouble>,
    /// The records HTTP submissions wrote that no intake loop here has taken ([`stubs`]).
    stubs: std::sync::Arc<stubs::Stubs>,
}

/// How the store's flushes are going. A task log write that fails (a full disk) is tried
/// again by the next flush, and succeeds once there is room; sled, once a write of its
/// own failed, refuses every later one until it is reopened (its log on disk is then what
/// it recovers from), so a sled failure ends the commander (`Store::failed`).
#[derive(Debug)]
struct Trouble {
    /// Flushes failed in a row.
    in_a_row: std::sync::atomic::AtomicU32,
    /// Why the last one failed, while they keep failing.
    reason: std::sync::Mutex<Option<String>>,
    /// Set once sled failed.
    fatal: tokio::sync::watch::Sender<Option<String>>,
    /// `fleet_store_flush_errors_total`.
    errors: prometheus_client::metrics::counter::Counter,
}

impl Default for Trouble {
    fn default() -> Self {
        Trouble {
            in_a_row: Default::default(),
            reason: Default::default(),
            fatal: tokio::sync::watch::Sender::new(None),
            errors: Default::default(),
        }
    }
}

impl Trouble {
    fn cleared(&self) {
        if self.in_a_row.swap(0, std::sync::atomic::Ordering::SeqCst) > 0 {
            tracing::info!("store flushes succeed again");
            *log::lock(&self.reason) = None;
        }
    }

    /// Notes a failed flush; then, unless sled failed (for good: the commander stops),
    /// pauses its caller ([`flush_backoff`]).
    async fn failed(&self, e: &StoreError, sled_failed: bool) {
        self.errors.inc();
        let in_a_row = self
            .in_a_row
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            .saturating_add(1);
        *log::lock(&self.reason) = Some(e.to_string());
        if sled_failed {
            self.fatal.send_if_modified(|fatal| {
                let first = fatal.is_none();
                if first {
                    *fatal = Some(e.to_string());
                }
                first
            });
        } else if tokio::runtime::Handle::try_current().is_ok() {
            tokio::time::sleep(flush_backoff(in_a_row)).await;
        }
    }
}

/// The pause after a failed flush: 1 s, doubling to 30 s while they keep failing. The
/// loops that flush hand their batch back and read the next (or the same again) at once,
/// so without it a full disk is retried, and logged, as fast as they can go.
fn flush_backoff(in_a_row: u32) -> std::time::Duration {
    crate::domain::doubling(
        std::time::Duration::from_secs(1),
        in_a_row,
        std::time::Duration::from_secs(30),
    )
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

/// The task log's folder in the store's directory.
pub const TASK_LOG_DIR: &str = "task_log";

impl Store {
    /// Opens with sled's default cache (1 GiB).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, 1 << 30)
    }

    /// Opens with a page cache of `cache_bytes` (`store.cache_mib`).
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        // sled first: it locks its directory, so a second commander on the same store
        // stops here, before it could touch the task log.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            // sled's default (LowSpace) rewrites pages eagerly to save disk; its trees
            // (kept traces above all) are write-heavy and retention bounds the size, so
            // write throughput wins.
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(|e| match e {
                // sled (vendor/sled, config.rs) says so in an `Other` error of its own
                // words, the lock's error inside: the words are all there is to tell it by.
                sled::Error::Io(io) if is_lock_held(&io.to_string()) => StoreError::InUse,
                e => StoreError::Sled(e),
            })?;
        let older_ledger = || Self::ledger_in_sled(&db);
        let (tasks, opened) =
            log::TaskLog::open_adopting(&dir.join(TASK_LOG_DIR), log::SEGMENT_BYTES, older_ledger)?;
        tracing::info!(
            segments = opened.segments,
            records = opened.records,
            pages = opened.pages,
            ledger_cells = opened.ledger_cells,
            ledger_cells_from_sled = opened.ledger_adopted,
            truncated_bytes = opened.truncated,
            damaged_segments = opened.damaged,
            "task log opened"
        );
        let store = Self {
            db,
            tasks: std::sync::Arc::new(tasks),
            flushes: Default::default(),
            trouble: Default::default(),
            stubs: Default::default(),
        };
        store.move_records_out_of_sled()?;
        store.watch_stubs_found();
        if store.has_tree(LEDGER_TREE) {
            // Taken in by the open above (or by an earlier one, when the log had a copy
            // of the ledger already): what is left is stale.
            store.db.drop_tree(LEDGER_TREE)?;
            store.db.flush()?;
        }
        Ok(store)
    }

    /// The budget ledger's cells in sled's `budget_ledger` tree, where they were kept
    /// until December 2026 (the task log takes them in at its first open; see
    /// [`log::TaskLog::open_adopting`]).
    fn ledger_in_sled(db: &sled::Db) -> Result<Vec<(CellKey, Cell)>, StoreError> {
        if !tree_exists(db, LEDGER_TREE) {
            return Ok(Vec::new());
        }
        let mut cells = Vec::new();
        for item in db.open_tree(LEDGER_TREE)?.iter() {
            let (k, v) = item?;
            match (CellKey::decode(&k), serde_json::from_slice::<Cell>(&v)) {
                (Some(key), Ok(cell)) => cells.push((key, cell)),
                _ => {
                    tracing::warn!(key = %crate::domain::hex(&k), "a budget ledger cell in sled that does not decode; dropped")
                }
            }
        }
        tracing::info!(
            cells = cells.len(),
            "budget ledger moved from sled to the task log (the store's layout before December 2026)"
        );
        Ok(cells)
    }

    /// Moves task records from the sled trees of older layouts into the task log, then
    /// drops those trees: `task_records` (keyed by record number, until December 2026),
    /// `tasks` (keyed by task id, before that) and `finished` (their retention index; the
    /// log's comes from the records). Idempotent: a move cut short by a crash left the
    /// trees in place, and a record already in the log is not moved again (nothing
    /// updates records before this has run).
    fn move_records_out_of_sled(&self) -> Result<(), StoreError> {
        let names = self.db.tree_names();
        let has = |name: &str| names.iter().any(|n| n.as_ref() == name.as_bytes());
        if !has(RECORDS_TREE) && !has(OLD_RECORDS_TREE) && !has(OLD_FINISHED_TREE) {
            return Ok(());
        }
        let now_ms = unix_millis(SystemTime::now());
        let mut moved = 0u64;
        // Newest first: of two records of one task (a result that raced the sweep), the
        // later is the one kept; `task_records` was written after `tasks`.
        if has(RECORDS_TREE) {
            for entry in self.db.open_tree(RECORDS_TREE)?.iter().rev() {
                let (key, value) = entry?;
                let Some((_, id)) = split_record_key(&key) else {
                    tracing::warn!(key = %crate::domain::hex(&key), "a task record key that is not one; dropped");
                    continue;
                };
                moved += u64::from(self.move_record(id, &value, now_ms)?);
            }
        }
        if has(OLD_RECORDS_TREE) {
            for entry in self.db.open_tree(OLD_RECORDS_TREE)?.iter() {
                let (id, value) = entry?;
                match std::str::from_utf8(&id) {
                    Ok(id) => moved += u64::from(self.move_record(id, &value, now_ms)?),
                    Err(_) => {
                        tracing::warn!(key = %crate::domain::hex(&id), "a task record whose id is not UTF-8; dropped")
                    }
                }
            }
        }
        self.tasks.sort_finished();
        // Durable in the log before the trees go.
        self.tasks.sync()?;
        for name in [RECORDS_TREE, OLD_RECORDS_TREE, OLD_FINISHED_TREE] {
            self.db.drop_tree(name)?;
        }
        self.db.flush()?;
        tracing::info!(
            moved,
            "task records moved from sled to the task log (the store's layout before December 2026)"
        );
        Ok(())
    }

    /// Moves one record from a sled tree into the log (in the current format when it
    /// decodes, as it was when it does not); `false` when the log has the task already.
    fn move_record(&self, id: &str, value: &[u8], now_ms: u64) -> Result<bool, StoreError> {
        if self.tasks.contains(id) {
            return Ok(false);
        }
        let (bytes, finished_ms) = match codec::decode(value) {
            Ok(rec) => {
                let finished_ms = finished_ms_of(&rec, now_ms);
                match codec::encode(&rec) {
                    Ok(bytes) => (bytes, finished_ms),
                    Err(_) => (value.to_vec(), finished_ms),
                }
            }
            Err(e) => {
                // Kept as it is, so an operator can still see what was there; `get`
                // reports it as corrupt.
                tracing::warn!(task_id = id, reason = %e, "moving a task record that does not decode");
                (value.to_vec(), 0)
            }
        };
        self.tasks.put_raw(id, finished_ms, &bytes)?;
        Ok(true)
    }

    pub fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        match self.tasks.get_bytes(id)? {
            None => Ok(None),
            Some(bytes) => decode(id, &bytes).map(Some),
        }
    }

    /// Atomically updates (or creates) a task record: `f` runs on the latest record (or on
    /// `create()`, when there is none), and what it leaves is written. The update that
    /// makes the task terminal starts its retention period.
    pub fn update(
        &self,
        id: &str,
        create: impl Fn() -> TaskRecord,
        f: impl Fn(&mut TaskRecord),
    ) -> Result<TaskRecord, StoreError> {
        let now_ms = unix_millis(SystemTime::now());
        Ok(self.tasks.update(id, now_ms, create, f)?.0)
    }

    /// [`Store::update`] for a record that is most likely not there yet (a task's first
    /// dispatch). The log reads nothing for an absent id either way, so this is
    /// [`Store::update`]; the name says what the caller expects.
    pub fn create_or_update(
        &self,
        id: &str,
        create: impl Fn() -> TaskRecord,
        f: impl Fn(&mut TaskRecord),
    ) -> Result<TaskRecord, StoreError> {
        self.update(id, create, f)
    }

    /// Records a task `POST /v1/tasks` has just had accepted by the intake stream (at
    /// `seq`): a stub, found at once, until an intake loop takes the task. A record that
    /// is already there is kept (the intake loop was quicker, or this is a copy).
    pub fn accepted(&self, id: &str, seq: u64) -> Result<(), StoreError> {
        let rec = self.update(id, || TaskRecord::new(id, seq), |_| {})?;
        if rec.is_stub() {
            let now_ms = unix_millis(SystemTime::now());
            if !self.stubs.watch(id, Some(now_ms), now_ms) {
                tracing::warn!(
                    task_id = id,
                    max = stubs::MAX_WATCHED,
                    "too many stubs watched; this one is watched again after a restart"
                );
            }
        }
        Ok(())
    }

    /// Finishes the record of `id` with `result`, a run another commander replica
    /// dispatched: a stub ([`TaskRecord::is_stub`]) of a task submitted here, or a task
    /// this replica deferred and released to the intake stream, where another took it.
    /// Only the record changes: the dispatching replica charges the run's budgets,
    /// counts it and forwards its result (a reservation made here is released). `None`
    /// when there is no record, or it has ended: nothing is written then.
    /// `keeper` is the replica that ran it (the result's `Fleet-Replica`), named in the
    /// record's `kept_by` when it is a replica's id.
    pub fn finish_elsewhere(
        &self,
        id: &str,
        result: &TaskResult,
        keeper: &str,
    ) -> Result<Option<TaskRecord>, StoreError> {
        if self.get(id)?.is_none_or(|r| r.state.is_terminal()) {
            self.stubs.forget(id);
            return Ok(None);
        }
        let finished = std::cell::Cell::new(false);
        let rec = self.update(
            id,
            || TaskRecord::new(id, 0),
            |r| {
                finished.set(!r.state.is_terminal());
                if r.pool.is_none() {
                    r.pool = result.pool.clone();
                }
                if is_replica_id(keeper) {
                    r.kept_by = Some(keeper.to_string());
                }
                r.finish(result);
            },
        )?;
        self.stubs.forget(id);
        Ok(finished.get().then_some(rec))
    }

    /// The id of the commander replica this store belongs to: 16 hex digits, made at the
    /// store's first open and kept with it, so a restart is the same replica (and reads
    /// on from its own results consumer) and a new store is a new one.
    pub fn replica_id(&self) -> Result<String, StoreError> {
        let meta = self.db.open_tree(META_TREE)?;
        if let Some(v) = meta.get(REPLICA_KEY)?
            && let Ok(id) = std::str::from_utf8(&v)
            && is_replica_id(id)
        {
            return Ok(id.to_string());
        }
        let id = crate::domain::hex(&rand::random::<[u8; 8]>());
        meta.insert(REPLICA_KEY, id.as_bytes())?;
        meta.flush()?;
        Ok(id)
    }

    /// The stubs watched ([`stubs`]).
    pub fn stubs(&self) -> &stubs::Stubs {
        &self.stubs
    }

    /// Watches the stubs the store holds at open: written before a restart, or by a
    /// commander that had no watch.
    fn watch_stubs_found(&self) {
        let now_ms = unix_millis(SystemTime::now());
        let mut found = 0usize;
        for id in self.tasks.unfinished() {
            if let Ok(Some(r)) = self.get(&id)
                && r.is_stub()
                && self.stubs.watch(&id, None, now_ms)
            {
                found += 1;
            }
        }
        if found > 0 {
            tracing::info!(
                stubs = found,
                "watching tasks accepted over HTTP that no intake loop here has taken"
            );
        }
    }

    /// Deletes tasks that finished before `cutoff`, and the oldest finished beyond the
    /// newest `keep`, at most `limit` of them; returns how many went. Tasks still in
    /// flight are never swept.
    pub fn sweep(
        &self,
        cutoff: SystemTime,
        keep: usize,
        limit: usize,
    ) -> Result<usize, StoreError> {
        self.tasks.sweep(unix_millis(cutoff), keep, limit)
    }

    /// Makes everything written so far durable, the task log and sled's trees (see
    /// [`Flushes`]).
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
        let (db, tasks) = (self.db.clone(), self.tasks.clone());
        let (log, sled) = match tokio::runtime::Handle::try_current() {
            // Both at once, each on a thread of tokio's blocking pool: a batch waits for
            // the slower of the two syncs, not their sum.
            Ok(rt) => {
                let (log, sled) = tokio::join!(
                    rt.spawn_blocking(move || tasks.sync()),
                    rt.spawn_blocking(move || db.flush().map(drop).map_err(StoreError::from)),
                );
                let joined = |r: Result<Result<(), StoreError>, tokio::task::JoinError>| {
                    r.map_err(|e| StoreError::Flush(e.to_string()))?
                };
                (joined(log), joined(sled))
            }
            // Outside a runtime (tests driving the store by hand): flush right here.
            Err(_) => (tasks.sync(), db.flush().map(drop).map_err(StoreError::from)),
        };
        let sled_failed = matches!(sled, Err(StoreError::Sled(_)));
        match sled.and(log) {
            Ok(()) => {
                self.trouble.cleared();
                f.done.store(n, SeqCst);
                Ok(())
            }
            Err(e) => {
                // Still holding the turn: every loop that flushes waits with this one.
                self.trouble.failed(&e, sled_failed).await;
                Err(e)
            }
        }
    }

    /// Why the store's flushes are failing, while they keep failing (the last error).
    pub fn trouble(&self) -> Option<String> {
        log::lock(&self.trouble.reason).clone()
    }

    /// Resolves, with the error, once the store can write nothing more until it is
    /// reopened (a sled write failed); never while it can.
    pub async fn failed(&self) -> String {
        let mut rx = self.trouble.fatal.subscribe();
        let reason = rx.wait_for(Option::is_some).await.map(|r| r.clone());
        match reason {
            Ok(reason) => reason.unwrap_or_default(),
            // The sender lives as long as this store.
            Err(_) => std::future::pending().await,
        }
    }

    /// Why the store can write nothing more, once it cannot ([`Store::failed`]).
    pub fn failure(&self) -> Option<String> {
        self.trouble.fatal.borrow().clone()
    }

    /// Registers `fleet_store_flush_errors_total`.
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "store_flush_errors",
            "Store flushes that failed (nothing in them was acknowledged; retried after a pause)",
            self.trouble.errors.clone(),
        );
    }

    #[cfg(test)]
    fn flush_errors(&self) -> u64 {
        self.trouble.errors.get()
    }

    /// Another tree in the same database (traces, alerts, the deferred queue ...), flushed
    /// with the tasks.
    ///
    /// On the task path, write it with plain inserts, not a `sled::Batch`: sled rolls its
    /// log buffer over before and after every batch (`PageCache::pin_log`), which wakes
    /// its I/O threads to write it, several times the cost of the inserts. What a batch
    /// of the task path writes reaches the disk with this store's next flush, before the
    /// ack; a batch cut short by a crash is delivered again, so its writes need no
    /// atomicity between them.
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Whether a tree exists, without creating it.
    pub fn has_tree(&self, name: &str) -> bool {
        tree_exists(&self.db, name)
    }

    /// Removes a tree and everything in it (a layout migrated away from); `false` when
    /// there was none.
    pub fn drop_tree(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.db.drop_tree(name)?)
    }

    /// The log the task records are in, which also keeps the decision log's pages (one
    /// sync for both).
    pub fn log(&self) -> &log::TaskLog {
        &self.tasks
    }

    /// Task records held (constant time: the index's size).
    pub fn task_count(&self) -> usize {
        self.tasks.records()
    }
}

/// The sled tree of task records keyed by record number and task id (read with
/// [`split_record_key`]; December 2026, moved to the task log at open).
const RECORDS_TREE: &str = "task_records";

/// The sled tree the budget ledger was kept in until December 2026.
const LEDGER_TREE: &str = "budget_ledger";
/// What the store says of itself: its replica id.
const META_TREE: &str = "meta";
const REPLICA_KEY: &[u8] = b"replica";

/// The sled tree that held task records keyed by their id until December 2026.
const OLD_RECORDS_TREE: &str = "tasks";

/// The sled tree that indexed those records for retention.
const OLD_FINISHED_TREE: &str = "finished";

/// A task record's key in [`RECORDS_TREE`]: its record number (big-endian) then its id.
#[cfg(test)]
fn record_key(n: u64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    k.extend_from_slice(&n.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// The record number and task id of a key in [`RECORDS_TREE`].
fn split_record_key(key: &[u8]) -> Option<(u64, &str)> {
    let (n, id) = key.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*n), std::str::from_utf8(id).ok()?))
}

/// Most bytes a piece of a time-ordered sled tree (the trace store) may take. sled splits
/// a leaf at 17 entries and writes a node over 128 KiB (a quarter of its 512 KiB segment)
/// to a file of its own, created, written and later deleted on every rewrite of that
/// leaf: 17 pieces of 7 KiB stay under it. Uncompressed pages of 32 decisions (~25 KB),
/// when the decision log was a sled tree, made every leaf such a file, about 6 % of the
/// commander's CPU in `bench dispatch`, most of it creating files.
pub const PAGE_BYTES: usize = 7 * 1024;

/// When a record moved in from sled finished: the time of its last change to a terminal
/// state, `now_ms` when that does not parse (retention then counts from the move); 0 for
/// a task not terminal.
fn finished_ms_of(rec: &TaskRecord, now_ms: u64) -> u64 {
    if !rec.state.is_terminal() {
        return 0;
    }
    rec.history
        .iter()
        .rev()
        .find(|c| c.state.is_terminal())
        .and_then(|c| c.at.unix_ms())
        .unwrap_or(now_ms)
        .max(1)
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

/// Whether `id` is a replica's id as [`Store::replica_id`] makes them: 16 hex digits.
pub fn is_replica_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A page of finished tasks ([`Store::finished`]).
#[derive(Debug, Default)]
pub struct FinishedPage {
    /// Each task's finish time (unix ms) and record, newest first.
    pub tasks: Vec<(u64, TaskRecord)>,
    /// Finished tasks examined.
    pub scanned: usize,
    /// Where the next page starts (the last task examined), when there may be more.
    pub next: Option<(u64, String)>,
}

impl Store {
    /// Finished tasks, newest first, that finished before `before` (finish time, then
    /// id) and at or after `since_ms`: those `keep` accepts, up to `limit`, examining at
    /// most `scan`. Read from the retention queue, which is in finishing order, so no
    /// index is scanned; a record that does not decode is skipped (and logged).
    pub fn finished(
        &self,
        before: Option<(u64, &str)>,
        since_ms: u64,
        scan: usize,
        limit: usize,
        keep: impl Fn(&TaskRecord) -> bool,
    ) -> Result<FinishedPage, StoreError> {
        let entries = self.tasks.finished_before(before, scan);
        let mut page = FinishedPage::default();
        let mut last = None;
        let mut ended = entries.len() < scan;
        for (ms, id) in &entries {
            if *ms < since_ms {
                ended = true;
                break;
            }
            page.scanned += 1;
            last = Some((*ms, id));
            let Some(bytes) = self.tasks.finished_record(*ms, id)? else {
                continue;
            };
            match decode(id, &bytes) {
                Ok(rec) if keep(&rec) => page.tasks.push((*ms, rec)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(task_id = %id, error = %e, "finished task's record not listed")
                }
            }
            if page.tasks.len() == limit {
                ended = ended && page.scanned == entries.len();
                break;
            }
        }
        if !ended {
            page.next = last.map(|(ms, id)| (ms, id.to_string()));
        }
        Ok(page)
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
    fn a_store_keeps_its_replica_id() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap().replica_id().unwrap();
        assert_eq!(first.len(), 16);
        let store = Store::reopen(dir.path());
        assert_eq!(
            store.replica_id().unwrap(),
            first,
            "the same replica after a restart"
        );
        let other = tempfile::tempdir().unwrap();
        let second = Store::open(other.path()).unwrap().replica_id().unwrap();
        assert_ne!(second, first, "a new store is a new replica");
    }

    #[test]
    fn stubs_are_watched_until_finished_and_found_again_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.accepted("stub", 1).unwrap();
            store.accepted("done", 2).unwrap();
            // Taken by the intake loop here: a record with a history, not a stub.
            store.accepted("taken", 3).unwrap();
            store
                .update(
                    "taken",
                    || unreachable!(),
                    |r| r.advance(TaskState::Dispatched),
                )
                .unwrap();
            let mut result = ok_result();
            result.task_id = "done".into();
            let rec = store
                .finish_elsewhere("done", &result, "00000000000000bb")
                .unwrap()
                .unwrap();
            assert_eq!(rec.state, TaskState::Completed);
            assert!(
                store
                    .finish_elsewhere("done", &result, "00000000000000bb")
                    .unwrap()
                    .is_none(),
                "once"
            );
            assert!(
                store
                    .finish_elsewhere("absent", &result, "00000000000000bb")
                    .unwrap()
                    .is_none()
            );
            assert!(!store.tasks.contains("absent"), "nothing made up");
            assert!(store.stubs().accepted_ms("stub").is_some());
            assert_eq!(
                store.stubs().len(),
                2,
                "the stub, and taken until looked at"
            );
            // Any record still open is finished: a task deferred here and taken elsewhere.
            result.task_id = "taken".into();
            let rec = store
                .finish_elsewhere("taken", &result, "00000000000000bb")
                .unwrap()
                .unwrap();
            assert_eq!(rec.state, TaskState::Completed);
            assert_eq!(store.stubs().len(), 1, "only the stub is watched");
            futures::executor::block_on(store.flush()).unwrap();
        }
        let store = Store::reopen(dir.path());
        assert_eq!(store.stubs().len(), 1, "only the stub");
        assert_eq!(
            store.stubs().accepted_ms("stub"),
            None,
            "found, not accepted"
        );
        let due = store.stubs().due(u64::MAX, 10);
        assert_eq!(&*due[0].0, "stub");
        // A finished stub is swept as any finished record is.
        let cutoff = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(store.sweep(cutoff, usize::MAX, 100).unwrap(), 2);
        assert!(store.get("done").unwrap().is_none());
    }

    /// Records `id` as dispatched (in flight).
    fn dispatched(store: &Store, id: &str) {
        store
            .update(
                id,
                || TaskRecord::new(id, 1),
                |r| r.advance(TaskState::Dispatched),
            )
            .unwrap();
    }

    #[test]
    fn sweep_removes_only_tasks_finished_before_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ok = ok_result();
        for id in ["done-1", "done-2", "running"] {
            dispatched(&store, id);
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
            store.sweep(past, usize::MAX, 100).unwrap(),
            0,
            "nothing finished an hour ago"
        );
        let future = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(
            store.sweep(future, usize::MAX, 1).unwrap(),
            1,
            "the limit holds"
        );
        assert_eq!(store.sweep(future, usize::MAX, 100).unwrap(), 1);
        assert!(store.get("done-1").unwrap().is_none() && store.get("done-2").unwrap().is_none());
        assert!(
            store.get("running").unwrap().is_some(),
            "tasks in flight are kept"
        );
        assert_eq!(store.task_count(), 1);
    }

    /// A flush the task log cannot write (a full disk: here its file is `/dev/full`) fails,
    /// is reported by `trouble` and paces its callers; once there is room the next flush
    /// writes what was held back, and the store was never failed for good (that is sled's
    /// case alone).
    #[tokio::test(start_paused = true)]
    async fn a_full_disk_fails_flushes_until_there_is_room_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ok = ok_result();
        {
            let store = Store::open(dir.path()).unwrap();
            let full = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap();
            let segment = store.log().swap_active_file(std::sync::Arc::new(full));
            store
                .update("t-1", || TaskRecord::new("t-1", 1), |r| r.finish(&ok))
                .unwrap();
            let before = tokio::time::Instant::now();
            for in_a_row in 1..=3u32 {
                let e = store.flush().await.unwrap_err();
                assert!(e.to_string().contains("No space left"), "{e}");
                assert_eq!(before.elapsed().as_secs(), (1u64 << in_a_row) - 1, "paced");
            }
            assert!(store.trouble().unwrap().contains("No space left"));
            assert_eq!(store.flush_errors(), 3);
            let failed = store.failed();
            assert!(
                futures::FutureExt::now_or_never(failed).is_none(),
                "not for good"
            );
            store.log().swap_active_file(segment);
            store.flush().await.unwrap();
            assert_eq!(store.trouble(), None);
        }
        let store = Store::reopen(dir.path());
        assert_eq!(
            store.get("t-1").unwrap().unwrap().state,
            TaskState::Completed
        );
    }

    /// Past `keep` finished records the oldest finished go before their retention; tasks in
    /// flight are never counted or swept, and a reopen goes on from the same order.
    #[test]
    fn sweep_keeps_at_most_the_newest_finished_records() {
        let dir = tempfile::tempdir().unwrap();
        let ok = ok_result();
        {
            let store = Store::open(dir.path()).unwrap();
            for id in ["running-1", "running-2"] {
                dispatched(&store, id);
            }
            for i in 0..6 {
                let id = format!("done-{i}");
                store
                    .update(&id, || TaskRecord::new(&id, 1), |r| r.finish(&ok))
                    .unwrap();
            }
            let past = SystemTime::now() - Duration::from_secs(3600);
            assert_eq!(store.sweep(past, 4, 1).unwrap(), 1, "the limit holds");
            assert_eq!(store.sweep(past, 4, 100).unwrap(), 1);
            assert_eq!(store.sweep(past, 4, 100).unwrap(), 0, "four kept");
            assert!(
                store.get("done-0").unwrap().is_none() && store.get("done-1").unwrap().is_none()
            );
            futures::executor::block_on(store.flush()).unwrap();
        }
        let store = Store::reopen(dir.path());
        let past = SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(
            store.sweep(past, 1, 100).unwrap(),
            3,
            "the oldest three of four"
        );
        assert!(
            store.get("done-5").unwrap().is_some(),
            "the newest finished is kept"
        );
        for id in ["running-1", "running-2"] {
            assert!(store.get(id).unwrap().is_some(), "tasks in flight are kept");
        }
        assert_eq!(store.task_count(), 3);
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
        assert_eq!(store.sweep(future, usize::MAX, 100).unwrap(), 2);
        assert!(store.get("born-done").unwrap().is_none());
        assert!(store.get("overtaken").unwrap().is_none());
        assert!(store.get("new").unwrap().is_some(), "in flight: kept");
    }

    /// A store in the layouts before the task log (records in sled, keyed by task id in
    /// `tasks` or by record number in `task_records`) opens with every record moved to
    /// the log and the trees gone; a move cut short by a crash (records in the log and
    /// the trees both) is finished, and reopening again changes nothing.
    #[test]
    fn records_in_sled_trees_are_moved_to_the_task_log_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let written: Vec<TaskRecord> = (0..300)
            .map(|i| {
                let mut rec = codec::tests::full_record(&format!("{:08x}-old", i * 7919 % 300));
                rec.attempt = i;
                rec
            })
            .collect();
        let (by_id, numbered) = written.split_at(150);
        {
            let db = sled::open(dir.path()).unwrap();
            let old = db.open_tree(OLD_RECORDS_TREE).unwrap();
            for rec in by_id {
                old.insert(rec.id.as_bytes(), codec::encode(rec).unwrap())
                    .unwrap();
            }
            let new = db.open_tree(RECORDS_TREE).unwrap();
            for (n, rec) in numbered.iter().enumerate() {
                new.insert(record_key(n as u64, &rec.id), codec::encode(rec).unwrap())
                    .unwrap();
            }
            // Two records of one task: the later (higher number) is the one kept.
            let mut stale = numbered[0].clone();
            stale.attempt = 999;
            new.insert(record_key(0, &stale.id), codec::encode(&stale).unwrap())
                .unwrap();
            new.insert(
                record_key(1_000, &numbered[0].id),
                codec::encode(&numbered[0]).unwrap(),
            )
            .unwrap();
            db.open_tree(OLD_FINISHED_TREE)
                .unwrap()
                .insert(b"x", &[])
                .unwrap();
            db.flush().unwrap();
            // Moved already, then the crash: in the log and in a tree.
            let (log, _) = log::TaskLog::open(&dir.path().join(TASK_LOG_DIR)).unwrap();
            log.put_raw(&by_id[0].id, 0, &codec::encode(&by_id[0]).unwrap())
                .unwrap();
            log.sync().unwrap();
        }
        for _ in 0..2 {
            let store = Store::reopen(dir.path());
            assert_eq!(store.task_count(), 300);
            for rec in &written {
                assert_eq!(store.get(&rec.id).unwrap().as_ref(), Some(rec));
            }
            let trees = store.db.tree_names();
            for gone in [OLD_RECORDS_TREE, RECORDS_TREE, OLD_FINISHED_TREE] {
                assert!(
                    !trees.iter().any(|n| n.as_ref() == gone.as_bytes()),
                    "{gone} is dropped"
                );
            }
            futures::executor::block_on(store.flush()).unwrap();
        }
    }

    /// A terminal record moved in from sled keeps its retention period from when it
    /// finished (its history), not from the move.
    #[test]
    fn a_record_moved_from_sled_is_swept_by_when_it_finished() {
        let dir = tempfile::tempdir().unwrap();
        let day_ago = SystemTime::now() - Duration::from_secs(86_400);
        {
            let db = sled::open(dir.path()).unwrap();
            let tree = db.open_tree(RECORDS_TREE).unwrap();
            for (n, id) in ["old-done", "old-running"].into_iter().enumerate() {
                let mut rec = TaskRecord::new(id, 1);
                let at = Stamp::from_text(&humantime::format_rfc3339_millis(day_ago).to_string());
                rec.advance_at(TaskState::Dispatched, at.clone());
                if id == "old-done" {
                    rec.advance_at(TaskState::Completed, at);
                }
                tree.insert(record_key(n as u64, id), codec::encode(&rec).unwrap())
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let store = Store::reopen(dir.path());
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(store.sweep(hour_ago, usize::MAX, 100).unwrap(), 1);
        assert!(store.get("old-done").unwrap().is_none());
        assert!(store.get("old-running").unwrap().is_some());
    }

    /// Records and removals survive a reopen, and retention goes on from where it was.
    #[test]
    fn records_and_retention_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ok = ok_result();
        {
            let store = Store::open(dir.path()).unwrap();
            for i in 0..200 {
                let id = format!("t{i}");
                store
                    .create_or_update(
                        &id,
                        || TaskRecord::new(&id, i),
                        |r| r.advance(TaskState::Dispatched),
                    )
                    .unwrap();
                if i % 2 == 0 {
                    store
                        .update(&id, || unreachable!(), |r| r.finish(&ok))
                        .unwrap();
                }
            }
            // Half the finished ones swept before the restart.
            let future = SystemTime::now() + Duration::from_secs(1);
            assert_eq!(store.sweep(future, usize::MAX, 50).unwrap(), 50);
            futures::executor::block_on(store.flush()).unwrap();
        }
        let store = Store::reopen(dir.path());
        assert_eq!(store.task_count(), 150, "the sweep's removals held");
        for i in (1..200).step_by(2) {
            let rec = store.get(&format!("t{i}")).unwrap().unwrap();
            assert_eq!((rec.intake_sequence, rec.state), (i, TaskState::Dispatched));
        }
        let future = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(store.sweep(future, usize::MAX, 1_000).unwrap(), 50);
        assert_eq!(store.task_count(), 100);
    }

    /// A store written by the previous format (format 1: every record JSON, as
    /// `serde_json::to_vec(&TaskRecord)` wrote it until issue 19, in sled) opens with
    /// every record moved to the task log in the current format and reading back whole; updates
    /// work on them, and retention finds every terminal one.
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
        let raw = |id: &str| store.tasks.get_bytes(id).unwrap().unwrap();
        assert_eq!(
            codec::format_of(&raw("old-1")).unwrap(),
            codec::Format::V7,
            "moved to the log in the current format"
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
        assert_eq!(store.get("old-1").unwrap(), Some(rec));
        let future = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(
            store.sweep(future, usize::MAX, 1_000).unwrap(),
            251,
            "the 250 moved in completed, and the one completed since"
        );
        assert_eq!(store.task_count(), 249);
    }

    /// A task log of 300 records `<prefix>-<i>` (every third with every field set) written
    /// by `encode` in an older format (which first drops from the record what that format
    /// does not keep), opened again: every record reads back whole and is still in
    /// `format`. Returns the store and the records as written.
    fn log_of_older_records(
        dir: &Path,
        prefix: &str,
        format: codec::Format,
        encode: impl Fn(&mut TaskRecord) -> Vec<u8>,
    ) -> (Store, Vec<TaskRecord>) {
        let mut written = Vec::new();
        {
            let store = Store::reopen(dir);
            for i in 0..300u64 {
                let id = format!("{prefix}-{i}");
                let mut rec = if i % 3 == 0 {
                    codec::tests::full_record(&id)
                } else {
                    TaskRecord::new(&id, i)
                };
                rec.intake_sequence = i;
                let bytes = encode(&mut rec);
                store.tasks.put_raw(&rec.id, 0, &bytes).unwrap();
                written.push(rec);
            }
            store.tasks.sync().unwrap();
        }
        let store = Store::reopen(dir);
        assert_eq!(store.task_count(), 300);
        for rec in &written {
            assert_eq!(store.get(&rec.id).unwrap().as_ref(), Some(rec));
            let raw = store.tasks.get_bytes(&rec.id).unwrap().unwrap();
            assert_eq!(codec::format_of(&raw).unwrap(), format);
        }
        (store, written)
    }

    /// A task log whose records are in format 3 (what the commander wrote before format 4)
    /// opens with every record reading back whole. Records stay as they are until their
    /// next update, which writes the current format (7).
    #[test]
    fn a_task_log_of_format_3_records_is_read_and_updated_in_the_current_format() {
        let dir = tempfile::tempdir().unwrap();
        // Format 3 has no throttle turn, work sequence or keeper.
        let (store, written) = log_of_older_records(dir.path(), "v3", codec::Format::V3, |rec| {
            if let Some(d) = rec.deferred.as_mut() {
                d.turn = None;
            }
            rec.work_sequence = None;
            rec.kept_by = None;
            codec::encode_v3(rec).unwrap()
        });
        let raw = |id: &str| store.tasks.get_bytes(id).unwrap().unwrap();
        let mut ok = TaskResult::rejected("v3-1", "x", "x");
        ok.status = ResultStatus::Ok;
        let rec = store
            .update("v3-1", || unreachable!(), |r| r.finish(&ok))
            .unwrap();
        assert_eq!((rec.state, rec.intake_sequence), (TaskState::Completed, 1));
        assert_eq!(codec::format_of(&raw("v3-1")).unwrap(), codec::Format::V7);
        store.tasks.sync().unwrap();
        drop(store);
        let store = Store::reopen(dir.path());
        assert_eq!(store.get("v3-1").unwrap(), Some(rec));
        assert_eq!(store.get("v3-0").unwrap().as_ref(), Some(&written[0]));
    }

    /// Finished tasks are listed newest first from the retention queue: in finishing order
    /// (ties by id) whatever order the updates came in, tasks still running and tasks
    /// retention removed left out; a page continues where the last one stopped, and stops
    /// at `since_ms` and at the scan bound.
    #[test]
    fn finished_tasks_are_listed_newest_first_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::reopen(dir.path());
        let mut ok = TaskResult::rejected("x", "x", "x");
        ok.status = ResultStatus::Ok;
        for (id, ms) in [
            ("a", 1000),
            ("b", 3000),
            ("c", 2000),
            ("d", 2000),
            ("e", 4000),
        ] {
            let pool = if id == "c" { "x" } else { "y" };
            store
                .tasks
                .update(
                    id,
                    ms,
                    || TaskRecord::new(id, 0),
                    |r| {
                        r.pool = Some(pool.into());
                        r.finish(&ok);
                    },
                )
                .unwrap();
        }
        store
            .tasks
            .update(
                "live",
                5000,
                || TaskRecord::new("live", 0),
                |r| r.advance(TaskState::Dispatched),
            )
            .unwrap();
        let ids = |p: &FinishedPage| {
            p.tasks
                .iter()
                .map(|(ms, r)| (*ms, r.id.clone()))
                .collect::<Vec<_>>()
        };
        let owned = |v: &[(u64, &str)]| {
            v.iter()
                .map(|(ms, id)| (*ms, id.to_string()))
                .collect::<Vec<_>>()
        };
        let all = store.finished(None, 0, 100, 100, |_| true).unwrap();
        assert_eq!(
            ids(&all),
            owned(&[
                (4000, "e"),
                (3000, "b"),
                (2000, "d"),
                (2000, "c"),
                (1000, "a")
            ])
        );
        assert_eq!((all.scanned, all.next), (5, None));
        // Pages of two.
        let p1 = store.finished(None, 0, 100, 2, |_| true).unwrap();
        assert_eq!(ids(&p1), owned(&[(4000, "e"), (3000, "b")]));
        let next = p1.next.clone().unwrap();
        let p2 = store
            .finished(Some((next.0, &next.1)), 0, 100, 2, |_| true)
            .unwrap();
        assert_eq!(ids(&p2), owned(&[(2000, "d"), (2000, "c")]));
        let next = p2.next.clone().unwrap();
        let p3 = store
            .finished(Some((next.0, &next.1)), 0, 100, 2, |_| true)
            .unwrap();
        assert_eq!(ids(&p3), owned(&[(1000, "a")]));
        assert_eq!(p3.next, None);
        // A filter that matches nothing past the scan bound says where to go on.
        let bounded = store
            .finished(None, 0, 2, 10, |r| r.pool.as_deref() == Some("x"))
            .unwrap();
        assert!(bounded.tasks.is_empty());
        assert_eq!(bounded.scanned, 2);
        assert_eq!(bounded.next, Some((3000, "b".to_string())));
        // `since_ms` ends the listing.
        let since = store.finished(None, 2000, 100, 100, |_| true).unwrap();
        assert_eq!(ids(&since).len(), 4);
        assert_eq!(since.next, None);
        // Retention's removals are not listed.
        let cutoff = std::time::UNIX_EPOCH + Duration::from_millis(1500);
        assert_eq!(store.sweep(cutoff, usize::MAX, 100).unwrap(), 1);
        let kept = store.finished(None, 0, 100, 100, |_| true).unwrap();
        assert_eq!(kept.tasks.len(), 4);
        assert!(kept.tasks.iter().all(|(_, r)| r.id != "a"));
    }

    /// A task log of format 5 (what the commander wrote before the work sequence) opens
    /// with every record whole; a record's next update writes format 7 with its sequence.
    #[test]
    fn a_task_log_of_format_5_records_is_read_and_updated_in_the_current_format() {
        let dir = tempfile::tempdir().unwrap();
        let (store, written) = log_of_older_records(dir.path(), "v5", codec::Format::V5, |rec| {
            rec.work_sequence = None;
            rec.kept_by = None;
            codec::encode_v5(rec).unwrap()
        });
        let raw = |id: &str| store.tasks.get_bytes(id).unwrap().unwrap();
        let rec = store
            .update("v5-1", || unreachable!(), |r| r.work_sequence = Some(77))
            .unwrap();
        assert_eq!(codec::format_of(&raw("v5-1")).unwrap(), codec::Format::V7);
        store.tasks.sync().unwrap();
        drop(store);
        let store = Store::reopen(dir.path());
        assert_eq!(store.get("v5-1").unwrap(), Some(rec));
        assert_eq!(store.get("v5-1").unwrap().unwrap().work_sequence, Some(77));
        assert_eq!(store.get("v5-0").unwrap().as_ref(), Some(&written[0]));
    }

    /// A task log of format 6 (what the commander wrote before `kept_by`) opens with every
    /// record whole; a record another replica's result finishes is written in format 7,
    /// naming that replica.
    #[test]
    fn a_task_log_of_format_6_records_is_read_and_a_copy_names_its_keeper() {
        let dir = tempfile::tempdir().unwrap();
        let (store, written) = log_of_older_records(dir.path(), "v6", codec::Format::V6, |rec| {
            rec.kept_by = None;
            rec.state = TaskState::Deferred;
            codec::encode_v6(rec).unwrap()
        });
        let raw = |id: &str| store.tasks.get_bytes(id).unwrap().unwrap();
        let mut ok = TaskResult::rejected("v6-1", "x", "x");
        ok.status = ResultStatus::Ok;
        let rec = store
            .finish_elsewhere("v6-1", &ok, "00000000000000bb")
            .unwrap()
            .expect("an open record is finished");
        assert_eq!(rec.state, TaskState::Completed);
        assert_eq!(rec.kept_by.as_deref(), Some("00000000000000bb"));
        assert_eq!(codec::format_of(&raw("v6-1")).unwrap(), codec::Format::V7);
        store.tasks.sync().unwrap();
        drop(store);
        let store = Store::reopen(dir.path());
        assert_eq!(store.get("v6-1").unwrap(), Some(rec));
        assert_eq!(store.get("v6-0").unwrap().as_ref(), Some(&written[0]));
    }

    fn cell_key(budget: &str) -> CellKey {
        CellKey {
            budget: budget.into(),
            value: "*".into(),
            bucket: 1_764_000_000_000,
        }
    }

    /// A store of the layout before the ledger moved into the task log: a log of format
    /// 2 (records without charges) and the ledger's cells in sled's `budget_ledger` tree.
    /// It opens with the cells in the log and the tree gone; a task that was running
    /// finishes and is charged on top of them; a tree left behind by a crash after the
    /// move is stale and not taken in again.
    #[test]
    fn a_ledger_in_sled_is_moved_into_the_task_log_once() {
        let dir = tempfile::tempdir().unwrap();
        let (day, team) = (cell_key("fleet-day"), cell_key("team-day"));
        let cells = [
            (
                day.clone(),
                Cell {
                    spent: 1.2,
                    reserved: 0.3,
                },
            ),
            (
                team.clone(),
                Cell {
                    spent: 0.4,
                    reserved: 0.0,
                },
            ),
        ];
        let write_tree = |db: &sled::Db| {
            let tree = db.open_tree(LEDGER_TREE).unwrap();
            for (k, c) in &cells {
                tree.insert(k.encode(), serde_json::to_vec(c).unwrap())
                    .unwrap();
            }
            db.flush().unwrap();
        };
        {
            let db = sled::open(dir.path()).unwrap();
            write_tree(&db);
            // The running task that holds the $0.30, in a segment of format 2 as that
            // layout wrote it: magic, then one record entry (kind 1).
            let mut rec = TaskRecord::new("running", 9);
            rec.budget = Some(crate::domain::Reservation {
                cells: vec![day.clone()],
                est_usd: 0.3,
                charged_usd: None,
            });
            rec.advance(TaskState::Dispatched);
            let mut body = vec![1u8];
            body.extend_from_slice(&0u64.to_le_bytes());
            body.extend_from_slice(&7u16.to_le_bytes());
            body.extend_from_slice(b"running");
            body.extend_from_slice(&codec::encode_v2(&rec).unwrap());
            let mut segment = b"FCTASKS\x02".to_vec();
            segment.extend_from_slice(&(body.len() as u32).to_le_bytes());
            segment.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
            segment.extend_from_slice(&body);
            let logs = dir.path().join(TASK_LOG_DIR);
            std::fs::create_dir_all(&logs).unwrap();
            std::fs::write(logs.join("00000001.log"), segment).unwrap();
        }
        let ledger = |store: &Store| -> Vec<(CellKey, Cell)> { store.log().ledger() };
        {
            let store = Store::reopen(dir.path());
            assert_eq!(ledger(&store), cells);
            assert!(!store.has_tree(LEDGER_TREE), "the tree is dropped");
            assert_eq!(
                store.get("running").unwrap().unwrap().state,
                TaskState::Dispatched
            );
            store
                .update(
                    "running",
                    || unreachable!(),
                    |r| {
                        r.advance(TaskState::Completed);
                        if let Some(b) = r.budget.as_mut() {
                            b.charged_usd = Some(0.25);
                        }
                    },
                )
                .unwrap();
            futures::executor::block_on(store.flush()).unwrap();
        }
        let settled = |store: &Store| {
            let got = ledger(store);
            assert_eq!(got.len(), 2);
            assert_eq!(got[0].0, day);
            assert!((got[0].1.spent - 1.45).abs() < 1e-12, "{got:?}");
            assert!(got[0].1.reserved.abs() < 1e-12, "{got:?}");
            assert_eq!(got[1], cells[1]);
        };
        {
            let store = Store::reopen(dir.path());
            settled(&store);
            // A crash between the move and the drop leaves the tree: stale now.
            write_tree(&store.db);
        }
        let store = Store::reopen(dir.path());
        settled(&store);
        assert!(!store.has_tree(LEDGER_TREE));
    }

    /// What a record holds in the ledger changes only at a dispatch with a reservation
    /// (its estimate, reserved) and at the result that charges it (the estimate released,
    /// the charge spent); a result that came first gets its charge with the dispatch.
    #[test]
    fn a_record_changes_the_ledger_by_its_reservation_and_its_charge() {
        let (a, b) = (cell_key("a"), cell_key("b"));
        let running = {
            let mut r = TaskRecord::new("t", 1);
            r.advance(TaskState::Dispatched);
            r.budget = Some(crate::domain::Reservation {
                cells: vec![a.clone(), b.clone()],
                est_usd: 0.5,
                charged_usd: None,
            });
            r
        };
        let cell = |spent, reserved| Cell { spent, reserved };
        assert_eq!(
            ledger_change(None, ledger_share(&running)),
            [(a.clone(), cell(0.0, 0.5)), (b.clone(), cell(0.0, 0.5))]
        );
        assert!(ledger_change(ledger_share(&running), ledger_share(&running)).is_empty());
        let mut done = running.clone();
        done.advance(TaskState::Completed);
        if let Some(r) = done.budget.as_mut() {
            r.charged_usd = Some(0.2);
        }
        assert_eq!(
            ledger_change(ledger_share(&running), ledger_share(&done)),
            [(a.clone(), cell(0.2, -0.5)), (b.clone(), cell(0.2, -0.5))]
        );
        // The result first (no reservation yet), then the dispatch with its charge.
        let mut result_first = TaskRecord::new("t", 0);
        result_first.advance(TaskState::Completed);
        assert!(ledger_change(None, ledger_share(&result_first)).is_empty());
        assert_eq!(
            ledger_change(ledger_share(&result_first), ledger_share(&done)),
            [(a.clone(), cell(0.2, 0.0)), (b, cell(0.2, 0.0))]
        );
        // A finished record of before charges were recorded holds nothing more.
        let mut settled_before = running;
        settled_before.advance(TaskState::Completed);
        let mut touched = settled_before.clone();
        touched.priority = 1;
        assert!(ledger_change(ledger_share(&settled_before), ledger_share(&touched)).is_empty());
        assert!(ledger_change(None, ledger_share(&settled_before)).is_empty());
    }
}
