//! The task records' own log: append-only segment files with an index in memory. It also
//! keeps the decision log's pages (see "Pages" below), so one sync makes a batch's task
//! records and decisions durable together.
//!
//! Every write of a task record appends the whole new version (a few hundred bytes of
//! [`super::codec`]) to the active segment, and the in-memory index points the task's id
//! at it. Nothing is rewritten in place: the cost of a write does not depend on how many
//! records came before, which sled's tree did (its log wrote each task's bytes about 5.6
//! times, and a task's write cost rose by a quarter over a million tasks).
//!
//! ## On disk
//!
//! `<store dir>/task_log/NNNNNNNN.log`, numbered from 1. Each file starts with [`MAGIC`]
//! (whose last byte is the log format, 3), then entries:
//!
//! ```text
//! body length  u32 LE
//! crc32 of the body  u32 LE
//! body:  kind u8
//!        kind 1 (record):       finished_ms u64 LE (0: not terminal), id length u16 LE, id,
//!                               the record (codec format byte, then its body)
//!        kind 2 (removed):      id length u16 LE, id
//!        kind 3 (page):         at_ms u64 LE, seq u64 LE, count u16 LE, flags u8 (bit 0:
//!                               moved in from sled), the page (its owner's bytes)
//!        kind 4 (pages dropped): (at_ms u64 LE, seq u64 LE) for each page dropped
//!        kind 5 (record and ledger change): finished_ms u64 LE, id length u16 LE, id,
//!                               change length u32 LE, the change (cells), the record
//!        kind 6 (ledger):       part u32 LE, parts u32 LE, cells
//! ```
//!
//! where `cells` is a run of postcard-encoded `(CellKey, Cell)` pairs.
//!
//! The last entry of a task id in segment order is its record; a `removed` entry (the
//! retention sweep) ends it. A segment rolls over at [`SEGMENT_BYTES`]. Formats 1 (kinds
//! 1 and 2) and 2 (kinds 1 to 4) are still read; a commander opening a segment of an
//! older format last starts a new segment, so a commander that reads only that format
//! refuses the directory instead of cutting the newer kinds off as torn entries.
//!
//! ## The budget ledger
//!
//! The log also keeps the budget ledger's cells (spent and reserved USD per budget, scope
//! value and bucket; see `policy::budget`), so that they are durable exactly when the
//! task records they come from are. A record's reservation holds its estimate in its
//! cells while the task runs and its charge once it has finished
//! ([`crate::domain::Reservation::share`]); an update that changes what a record holds is
//! written as kind 5, with the change. The log adds each change to its own copy of the
//! ledger as it appends it, and writes that copy whole (kind 6, in parts of at most
//! [`LEDGER_PART_BYTES`]) as the first entries of every segment it starts, and at open
//! when the last segment has none. Opening takes the last whole copy and adds the changes
//! written after it. There is never a moment at which a crash leaves a reservation or a
//! charge durable without its record, or the reverse: a redelivered dispatch or result
//! that finds its record missing reserves or charges again, and the lost one was never on
//! disk. The active segment (never deleted) always holds the last copy.
//!
//! ## Pages
//!
//! A page is a group of entries of another log, kept in time order: the decision log
//! writes a batch's decisions as pages (`decisions.rs`). Their index in memory maps
//! (`at_ms`, `seq`) to where each page is; `seq` is never handed out twice, so pages of
//! one millisecond keep the order they were written in. Retention drops the oldest pages
//! ([`TaskLog::drop_pages`]) with a `pages dropped` entry, which (like `removed`) is
//! always in the same segment as its pages or a later one, so it outlives them.
//!
//! ## Durability
//!
//! Appends collect in a buffer (at most [`BUFFER_BYTES`]) and reach the file in order;
//! [`TaskLog::sync`] writes the buffer out and `fdatasync`s. A crash can only cut the
//! last entry of the last segment short: opening truncates the file at the first entry
//! whose length or checksum is wrong there. A bad entry in an older segment (which a crash
//! cannot make) is reported and the rest of that segment skipped.
//!
//! ## Space
//!
//! Retention ([`TaskLog::sweep`]) removes terminal records in the order they finished,
//! from an in-memory queue rebuilt at open from the records' `finished_ms` and kept in
//! that order: it never scans. The same queue, read from its end, lists the tasks that
//! finished last ([`TaskLog::finished_before`]). Segments are deleted oldest first, once
//! no task's latest version and no page still kept is in them (so a `removed` entry
//! always outlives the record it removes). An oldest segment held only by a few
//! long-lived tasks (deferred for days, say) has them copied forward first; pages are
//! never copied, so a segment waits for its pages' retention (the decision log's, 72
//! hours by default, like the tasks').

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::{StoreError, TaskRecord, codec};
use crate::domain::{Cell, CellKey};

/// First bytes of every segment file written now: a name, then the log format (3).
pub const MAGIC: [u8; 8] = *b"FCTASKS\x03";

/// First bytes of a segment of format 1 (no pages) or 2 (no ledger), still read.
const MAGIC_V1: [u8; 8] = *b"FCTASKS\x01";
const MAGIC_V2: [u8; 8] = *b"FCTASKS\x02";

/// A segment rolls over once it would pass this.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Appends wait in memory up to this much before they are written to the file.
const BUFFER_BYTES: usize = 256 << 10;

/// Bytes of an entry's length and checksum.
const HEADER: usize = 8;

/// Largest body an entry may have. Records are a few hundred bytes; the limit keeps a
/// corrupt length from reading (or allocating) gigabytes, and offsets within u32.
const MAX_BODY: usize = 4 << 20;

const KIND_RECORD: u8 = 1;
const KIND_REMOVED: u8 = 2;
const KIND_PAGE: u8 = 3;
const KIND_PAGES_DROPPED: u8 = 4;
const KIND_RECORD_CHANGE: u8 = 5;
const KIND_LEDGER: u8 = 6;

/// A copy of the ledger is written in parts of about this many bytes at most.
pub const LEDGER_PART_BYTES: usize = 1 << 20;

/// Bytes of a page entry's body before the page: kind, at_ms, seq, count, flags.
const PAGE_HEAD: usize = 1 + 8 + 8 + 2 + 1;

/// Pages one `pages dropped` entry names at most: dropped a chunk at a time, so the lock
/// that pages are appended under is never held for long.
const DROP_CHUNK: usize = 256;

/// A page's flag: moved in from a sled tree at open (see [`TaskLog::drop_moved_pages`]).
const PAGE_MOVED_IN: u8 = 1;

/// A page's place in time order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageKey {
    /// When its entries were made (unix ms).
    pub at_ms: u64,
    /// Never handed out twice: pages of one millisecond keep their order.
    pub seq: u64,
}

impl PageKey {
    /// The first key of millisecond `at_ms`.
    pub fn first_at(at_ms: u64) -> Self {
        Self { at_ms, seq: 0 }
    }
}

/// Where a page is, and how many entries it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLoc {
    segment: u32,
    /// The page's bytes, past the entry's head.
    offset: u32,
    len: u32,
    pub count: u16,
    moved_in: bool,
}

/// The pages kept, in time order.
#[derive(Debug, Default)]
struct Pages {
    index: BTreeMap<PageKey, PageLoc>,
    /// Entries in all pages (the sum of their counts).
    entries: u64,
    /// The next page's `seq`.
    next_seq: u64,
}

impl Pages {
    fn insert(&mut self, key: PageKey, loc: PageLoc) {
        self.next_seq = self.next_seq.max(key.seq.saturating_add(1));
        self.entries += u64::from(loc.count);
        if let Some(old) = self.index.insert(key, loc) {
            // Keys are never handed out twice; if a damaged store repeats one, the later
            // page stands and the count stays right.
            self.entries = self.entries.saturating_sub(u64::from(old.count));
        }
    }

    fn remove(&mut self, key: &PageKey) -> Option<PageLoc> {
        let loc = self.index.remove(key)?;
        self.entries = self.entries.saturating_sub(u64::from(loc.count));
        Some(loc)
    }
}

/// Where the latest version of a task's record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    segment: u32,
    /// The record's bytes (codec format byte first), not the entry's start.
    offset: u32,
    len: u32,
    /// When the task became terminal (unix ms); 0 while it is not.
    finished_ms: u64,
}

/// One segment file.
#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    /// Bytes in the file (the active segment's buffer not counted).
    len: u64,
    /// Entries in it, how many are some task's latest version, and how many are pages
    /// still kept.
    entries: u64,
    live: u64,
    pages: u64,
}

#[derive(Debug)]
struct Writer {
    dir: PathBuf,
    segments: BTreeMap<u32, Segment>,
    active: u32,
    /// Entries appended to the active segment and not yet written to its file.
    buffer: Vec<u8>,
    /// Bytes the next roll-over waits for: a segment is never smaller than one entry.
    segment_bytes: u64,
    /// The budget ledger as the entries appended so far leave it (see the module's docs).
    ledger: BTreeMap<CellKey, Cell>,
    /// Entries and bytes of the copy of the ledger the active segment starts with (none
    /// when it was not started by a roll-over): not counted against `segment_bytes`, so a
    /// large ledger does not make segments hold fewer records.
    copy: (u64, u64),
}

/// The task log (see the module's docs).
#[derive(Debug)]
pub struct TaskLog {
    index: DashMap<Arc<str>, Loc>,
    writer: Mutex<Writer>,
    /// Terminal tasks in the order they finished: (finished_ms, id), kept sorted. An entry
    /// whose task has since been removed, or finished again under another time, is
    /// skipped.
    finished: Mutex<VecDeque<(u64, Arc<str>)>>,
    /// Pages kept (see the module's docs). When both are held, taken after the writer's
    /// lock, never before it.
    pages: Mutex<Pages>,
}

/// What [`TaskLog::open`] found, for its log line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Opened {
    pub segments: usize,
    pub records: usize,
    /// Pages kept.
    pub pages: usize,
    /// Bytes cut from the end of the last segment (an append a crash cut short).
    pub truncated: u64,
    /// Segments with a bad entry before their end, whose rest was skipped.
    pub damaged: usize,
    /// A copy of the budget ledger was found (absent in a store written before the ledger
    /// moved into the log, whose cells are in sled: see [`TaskLog::open_adopting`]).
    pub ledger_found: bool,
    /// Cells taken in from the older place (see [`TaskLog::open_adopting`]).
    pub ledger_adopted: usize,
    /// Ledger cells held.
    pub ledger_cells: usize,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves nothing half-done that matters here: the
    // buffer and counters are updated after the fallible steps.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", path.display()))
}

fn segment_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{n:08}.log"))
}

impl TaskLog {
    /// Opens (or creates) the log in `dir`, reading every segment to rebuild the index.
    pub fn open(dir: &Path) -> Result<(Self, Opened), StoreError> {
        Self::open_adopting(dir, SEGMENT_BYTES, || Ok(Vec::new()))
    }

    #[cfg(test)]
    pub(crate) fn open_with_segment_bytes(
        dir: &Path,
        segment_bytes: u64,
    ) -> Result<(Self, Opened), StoreError> {
        Self::open_adopting(dir, segment_bytes, || Ok(Vec::new()))
    }

    /// [`TaskLog::open`], taking in the ledger cells `older_ledger` returns when the log
    /// holds no copy of the ledger yet (a store of the layout before the ledger moved into
    /// the log, whose cells are in sled). Every copy of the ledger the log holds once this
    /// returns (durably) includes them, so a log with a copy has taken them in: if the
    /// caller's drop of the older place is cut short by a crash, what is left there is
    /// stale, never to be taken in twice.
    pub fn open_adopting(
        dir: &Path,
        segment_bytes: u64,
        older_ledger: impl FnOnce() -> Result<Vec<(CellKey, Cell)>, StoreError>,
    ) -> Result<(Self, Opened), StoreError> {
        if segment_bytes > 1 << 30 {
            return Err(StoreError::Io(format!(
                "task log segments of {segment_bytes} bytes: at most 1 GiB"
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
        let numbers = segment_numbers(dir)?;
        let index: DashMap<Arc<str>, Loc> = DashMap::new();
        let mut pages = Pages::default();
        let mut segments = BTreeMap::new();
        let mut opened = Opened::default();
        let mut ledger = LedgerScan::default();
        let last = numbers.last().copied();
        let mut last_is_older = false;
        let mut active_has_copy = false;
        for &n in &numbers {
            let mut scan = Scan {
                index: &index,
                pages: &mut pages,
                segments: &mut segments,
                ledger: &mut ledger,
            };
            let (segment, found) = scan.segment(dir, n, Some(n) == last)?;
            opened.truncated += found.truncated;
            opened.damaged += usize::from(found.damaged);
            last_is_older = found.older;
            active_has_copy = found.ledger_copy;
            segments.insert(n, segment);
        }
        let active = match last {
            Some(n) => n,
            None => {
                let segment = create_segment(dir, 1)?;
                segments.insert(1, segment);
                1
            }
        };
        let mut finished: Vec<(u64, Arc<str>)> = index
            .iter()
            .filter(|e| e.finished_ms > 0)
            .map(|e| (e.finished_ms, e.key().clone()))
            .collect();
        finished.sort_unstable();
        opened.records = index.len();
        opened.pages = pages.index.len();
        opened.ledger_found = ledger.found;
        if !ledger.found {
            let older = older_ledger()?;
            opened.ledger_adopted = older.len();
            ledger.change(older);
        }
        opened.ledger_cells = ledger.cells.len();
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            segments,
            active,
            buffer: Vec::with_capacity(BUFFER_BYTES),
            segment_bytes,
            ledger: ledger.cells,
            copy: (0, 0),
        };
        if last_is_older {
            // Appends go to a segment of this format (see the module's docs); it starts
            // with a copy of the ledger.
            writer.roll()?;
        } else if !active_has_copy {
            // A new log, or a crash between starting a segment and writing its copy: the
            // active segment, which is never deleted, must hold the last one.
            writer.copy_ledger()?;
            writer.write_out()?;
            writer.sync_active()?;
        }
        opened.segments = writer.segments.len();
        let log = Self {
            index,
            writer: Mutex::new(writer),
            finished: Mutex::new(finished.into()),
            pages: Mutex::new(pages),
        };
        Ok((log, opened))
    }

    /// Records held.
    pub fn records(&self) -> usize {
        self.index.len()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.index.contains_key(id)
    }

    /// The tasks whose records are not terminal.
    pub fn unfinished(&self) -> Vec<Arc<str>> {
        self.index
            .iter()
            .filter(|e| e.finished_ms == 0)
            .map(|e| e.key().clone())
            .collect()
    }

    /// The latest record of `id`, as stored (codec bytes).
    pub fn get_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(loc) = self.index.get(id).map(|l| *l) else {
            return Ok(None);
        };
        self.read(loc).map(Some)
    }

    /// Updates (or creates) the record of `id` atomically: `f` runs once, on the latest
    /// record (or on `create()`), and its result is appended. `now_ms` is the time the
    /// task finished if this update makes it terminal. Returns the record written and
    /// whether this update made it terminal.
    pub fn update(
        &self,
        id: &str,
        now_ms: u64,
        create: impl Fn() -> TaskRecord,
        f: impl Fn(&mut TaskRecord),
    ) -> Result<(TaskRecord, bool), StoreError> {
        // The shard lock of `id`'s index entry is held from the read to the append: two
        // updates of one task (a result overtaking its dispatch) never interleave.
        // A task that became terminal is queued for retention under the finish time its
        // record carries.
        if let Some(mut loc) = self.index.get_mut(id) {
            let (rec, became) = self.rewrite(id, &mut loc, now_ms, create, f)?;
            if became {
                self.queue_finished(loc.finished_ms, loc.key());
            }
            return Ok((rec, became));
        }
        match self.index.entry(Arc::from(id)) {
            Entry::Occupied(mut o) => {
                let (rec, became) = self.rewrite(id, o.get_mut(), now_ms, create, f)?;
                if became {
                    self.queue_finished(o.get().finished_ms, o.key());
                }
                Ok((rec, became))
            }
            Entry::Vacant(v) => {
                let mut rec = create();
                f(&mut rec);
                let terminal = rec.state.is_terminal();
                let finished_ms = if terminal { now_ms.max(1) } else { 0 };
                let bytes = encode(id, &rec)?;
                let change = super::ledger_change(None, super::ledger_share(&rec));
                let loc = self.append_record(id, finished_ms, &bytes, &change, None)?;
                let key = v.key().clone();
                v.insert(loc);
                if terminal {
                    self.queue_finished(finished_ms, &key);
                }
                Ok((rec, terminal))
            }
        }
    }

    /// Applies `f` to the record at `loc` and appends the result, moving `loc` to it.
    fn rewrite(
        &self,
        id: &str,
        loc: &mut Loc,
        now_ms: u64,
        create: impl Fn() -> TaskRecord,
        f: impl Fn(&mut TaskRecord),
    ) -> Result<(TaskRecord, bool), StoreError> {
        let old = self.read(*loc)?;
        let (mut rec, before) = match codec::decode(&old) {
            Ok(rec) => {
                // Owned only when there is a reservation (tasks under a budget).
                let before = super::ledger_share(&rec).map(|(cells, c)| (cells.to_vec(), c));
                (rec, before)
            }
            Err(e) => {
                tracing::warn!(task_id = id, reason = %e, "replaced an undecodable task record");
                (create(), None)
            }
        };
        let was_terminal = rec.state.is_terminal();
        f(&mut rec);
        let became = !was_terminal && rec.state.is_terminal();
        let finished_ms = match (loc.finished_ms, rec.state.is_terminal()) {
            (0, true) => now_ms.max(1),
            (_, true) => loc.finished_ms,
            (_, false) => 0,
        };
        let bytes = encode(id, &rec)?;
        let before = before.as_ref().map(|(cells, c)| (cells.as_slice(), *c));
        let change = super::ledger_change(before, super::ledger_share(&rec));
        *loc = self.append_record(id, finished_ms, &bytes, &change, Some(*loc))?;
        Ok((rec, became))
    }

    /// Writes `bytes` (an encoded record) as it is: a record moved in from elsewhere (the
    /// sled tree of an older layout). Replaces whatever the log has for `id`.
    pub fn put_raw(&self, id: &str, finished_ms: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let key;
        match self.index.entry(Arc::from(id)) {
            Entry::Occupied(mut o) => {
                let old = *o.get();
                *o.get_mut() = self.append_record(id, finished_ms, bytes, &[], Some(old))?;
                key = o.key().clone();
            }
            Entry::Vacant(v) => {
                let loc = self.append_record(id, finished_ms, bytes, &[], None)?;
                key = v.key().clone();
                v.insert(loc);
            }
        }
        if finished_ms > 0 {
            // Moved-in records come in no particular finishing order: they are pushed,
            // and the caller sorts once it has put them all (`sort_finished`); inserting
            // each in place would move half the queue per record. A replaced record's
            // earlier entry, if any, no longer matches and is skipped by the sweep.
            lock(&self.finished).push_back((finished_ms, key));
        }
        Ok(())
    }

    /// Queues a terminal task for retention under the finish time its record carries,
    /// keeping the queue in (finish time, id) order: updates on other threads can arrive
    /// a little out of order, and the listing of finished tasks pages by that order.
    fn queue_finished(&self, finished_ms: u64, id: &Arc<str>) {
        let e = (finished_ms, id.clone());
        let mut q = lock(&self.finished);
        if q.back().is_none_or(|b| *b <= e) {
            q.push_back(e);
        } else {
            // Near the back: the insert moves the few entries after it.
            let at = q.partition_point(|x| *x <= e);
            q.insert(at, e);
        }
    }

    /// Up to `n` finished tasks, newest first, that finished before `before` (finish
    /// time, then id): the retention queue's entries, copied so that the lock is held for
    /// no more than that. An entry whose task was since removed or finished again is
    /// among them; [`TaskLog::finished_record`] skips it.
    pub fn finished_before(&self, before: Option<(u64, &str)>, n: usize) -> Vec<(u64, Arc<str>)> {
        let q = lock(&self.finished);
        let end = match before {
            None => q.len(),
            Some((ms, id)) => q.partition_point(|(m, i)| (*m, &**i) < (ms, id)),
        };
        q.range(..end).rev().take(n).cloned().collect()
    }

    /// The record an entry of [`TaskLog::finished_before`] names, when it is still the
    /// task's latest and finished then.
    pub fn finished_record(
        &self,
        finished_ms: u64,
        id: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(loc) = self
            .index
            .get(id)
            .map(|l| *l)
            .filter(|l| l.finished_ms == finished_ms)
        else {
            return Ok(None);
        };
        self.read(loc).map(Some)
    }

    /// Puts the retention queue in finishing order (after [`TaskLog::put_raw`]).
    pub fn sort_finished(&self) {
        lock(&self.finished).make_contiguous().sort_unstable();
    }

    /// Removes terminal records that finished before `cutoff_ms`, and the oldest finished
    /// beyond the newest `keep`, at most `limit` of them, then deletes the segments that
    /// leaves unused. Returns how many went.
    pub fn sweep(&self, cutoff_ms: u64, keep: usize, limit: usize) -> Result<usize, StoreError> {
        let due: Vec<(u64, Arc<str>)> = {
            let mut q = lock(&self.finished);
            let mut due = Vec::new();
            // The queue may also hold a few entries of records finished again since (they
            // are skipped below), so `keep` is reached a little early at worst.
            while due.len() < limit
                && q.front()
                    .is_some_and(|(ms, _)| *ms < cutoff_ms || q.len() > keep)
            {
                due.extend(q.pop_front());
            }
            due
        };
        let mut removed = 0;
        for (ms, id) in due {
            if let Entry::Occupied(o) = self.index.entry(id) {
                // Finished again since (removed, then a late result made a new one): not
                // this entry's to remove.
                if o.get().finished_ms != ms {
                    continue;
                }
                self.append_removed(o.key(), *o.get())?;
                o.remove();
                removed += 1;
            }
        }
        self.reclaim()?;
        Ok(removed)
    }

    /// Deletes segments from the oldest while no task's latest record and no page kept is
    /// in them. An oldest segment without pages where at most a quarter of the entries
    /// are still live has those copied forward first (made durable before the file goes).
    fn reclaim(&self) -> Result<(), StoreError> {
        loop {
            let (n, file, len) = {
                let mut w = lock(&self.writer);
                let Some((&n, oldest)) = w.segments.first_key_value() else {
                    return Ok(());
                };
                if n == w.active {
                    return Ok(());
                }
                if oldest.live == 0 && oldest.pages == 0 {
                    let path = segment_path(&w.dir, n);
                    w.segments.remove(&n);
                    std::fs::remove_file(&path).map_err(|e| io("removing", &path, e))?;
                    tracing::debug!(segment = n, "task log segment deleted");
                    continue;
                }
                // Pages are not copied: the segment waits for their retention.
                if oldest.pages > 0 || oldest.live * 4 > oldest.entries {
                    return Ok(());
                }
                (n, oldest.file.clone(), oldest.len)
            };
            let moved = self.copy_forward(n, &file, len)?;
            self.sync()?;
            tracing::info!(
                segment = n,
                moved,
                "task log: live records copied out of the oldest segment"
            );
            let counted = lock(&self.writer).segments.get(&n).map_or(0, |s| s.live);
            if counted > 0 {
                // Nothing writes to a sealed segment, so every live record was found and
                // the count is off. Count again, the slow way, before letting it go (not
                // under the writer's lock: updates take an index shard, then it).
                let really = self.index.iter().filter(|e| e.segment == n).count() as u64;
                tracing::warn!(
                    segment = n,
                    counted,
                    really,
                    "task log: a segment's live count was off"
                );
                if let Some(s) = lock(&self.writer).segments.get_mut(&n) {
                    s.live = really;
                }
                if really > 0 {
                    return Ok(());
                }
            }
        }
    }

    /// Appends again every record of segment `n` that is its task's latest version.
    fn copy_forward(&self, n: u32, file: &File, len: u64) -> Result<u64, StoreError> {
        let mut bytes = vec![0; usize::try_from(len).unwrap_or(usize::MAX)];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|e| StoreError::Io(format!("reading task log segment {n}: {e}")))?;
        let mut moved = 0;
        for entry in Entries::new(&bytes) {
            let Ok(Parsed::Record {
                id,
                finished_ms,
                record,
                record_at,
                ..
            }) = entry
            else {
                continue;
            };
            if let Some(mut loc) = self.index.get_mut(id)
                && loc.segment == n
                && loc.offset as usize == record_at
            {
                // The same version again: its change to the ledger was counted when it
                // was first written.
                *loc = self.append_record(id, finished_ms, record, &[], Some(*loc))?;
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Appends a page of `count` entries made at `at_ms` (`moved_in`: moved in from a sled
    /// tree, see [`TaskLog::drop_moved_pages`]); returns its key. Durable with the next
    /// [`TaskLog::sync`].
    pub fn append_page(
        &self,
        at_ms: u64,
        count: u16,
        moved_in: bool,
        page: &[u8],
    ) -> Result<PageKey, StoreError> {
        // Taken before the append and under the pages' lock: two pages never share a key.
        let seq = {
            let mut p = lock(&self.pages);
            let seq = p.next_seq;
            p.next_seq += 1;
            seq
        };
        let key = PageKey { at_ms, seq };
        let mut body = Vec::with_capacity(PAGE_HEAD + page.len());
        body.push(KIND_PAGE);
        body.extend_from_slice(&at_ms.to_le_bytes());
        body.extend_from_slice(&seq.to_le_bytes());
        body.extend_from_slice(&count.to_le_bytes());
        body.push(if moved_in { PAGE_MOVED_IN } else { 0 });
        body.extend_from_slice(page);
        let (segment, entry_at) = lock(&self.writer).append(&body, None, Counted::Page, &[])?;
        let loc = PageLoc {
            segment,
            // Within u32, as a record's offset is (see `append_record`).
            offset: (entry_at + (HEADER + PAGE_HEAD) as u64) as u32,
            len: u32::try_from(page.len()).unwrap_or(u32::MAX),
            count,
            moved_in,
        };
        lock(&self.pages).insert(key, loc);
        Ok(key)
    }

    /// Pages with keys in [`from`, `to`), oldest first or newest first, at most `max`.
    pub fn pages_between(
        &self,
        from: PageKey,
        to: PageKey,
        newest_first: bool,
        max: usize,
    ) -> Vec<(PageKey, PageLoc)> {
        if from >= to {
            return Vec::new();
        }
        let p = lock(&self.pages);
        let range = p.index.range(from..to).map(|(k, l)| (*k, *l));
        if newest_first {
            range.rev().take(max).collect()
        } else {
            range.take(max).collect()
        }
    }

    /// The page at `key`, when it is still kept.
    pub fn page(&self, key: PageKey) -> Option<PageLoc> {
        lock(&self.pages).index.get(&key).copied()
    }

    /// A page's bytes.
    pub fn read_page(&self, loc: PageLoc) -> Result<Vec<u8>, StoreError> {
        self.read(Loc {
            segment: loc.segment,
            offset: loc.offset,
            len: loc.len,
            finished_ms: 0,
        })
    }

    /// Entries in all pages kept (constant time).
    pub fn page_entries(&self) -> u64 {
        lock(&self.pages).entries
    }

    /// Drops the oldest pages while `drop(key, entries kept)` says so, at most `limit`
    /// entries' worth (a page goes whole, so by up to a page more), then deletes the
    /// segments that leaves unused. Returns how many entries went.
    pub fn drop_pages(
        &self,
        limit: usize,
        drop: impl Fn(PageKey, u64) -> bool,
    ) -> Result<usize, StoreError> {
        let mut dropped = 0;
        while dropped < limit {
            let chunk: Vec<(PageKey, PageLoc)> = {
                let p = lock(&self.pages);
                let mut kept = p.entries;
                let mut chunk = Vec::new();
                for (&key, &loc) in &p.index {
                    if chunk.len() == DROP_CHUNK || dropped >= limit || !drop(key, kept) {
                        break;
                    }
                    kept = kept.saturating_sub(u64::from(loc.count));
                    dropped += usize::from(loc.count);
                    chunk.push((key, loc));
                }
                chunk
            };
            if chunk.is_empty() {
                break;
            }
            let done = chunk.len() < DROP_CHUNK;
            self.forget_pages(&chunk)?;
            if done {
                break;
            }
        }
        self.reclaim()?;
        Ok(dropped)
    }

    /// Drops every page moved in from sled: what a move cut short by a crash left (the
    /// tree it was moving is still there, and is moved again whole).
    pub fn drop_moved_pages(&self) -> Result<usize, StoreError> {
        let moved: Vec<(PageKey, PageLoc)> = lock(&self.pages)
            .index
            .iter()
            .filter(|(_, l)| l.moved_in)
            .map(|(k, l)| (*k, *l))
            .collect();
        for chunk in moved.chunks(DROP_CHUNK) {
            self.forget_pages(chunk)?;
        }
        Ok(moved.len())
    }

    /// Writes one `pages dropped` entry for `pages`, then takes them out of the index and
    /// of their segments' counts.
    fn forget_pages(&self, pages: &[(PageKey, PageLoc)]) -> Result<(), StoreError> {
        let mut body = Vec::with_capacity(1 + 16 * pages.len());
        body.push(KIND_PAGES_DROPPED);
        for (key, _) in pages {
            body.extend_from_slice(&key.at_ms.to_le_bytes());
            body.extend_from_slice(&key.seq.to_le_bytes());
        }
        let mut w = lock(&self.writer);
        w.append(&body, None, Counted::Neither, &[])?;
        let mut p = lock(&self.pages);
        for (key, _) in pages {
            if let Some(loc) = p.remove(key)
                && let Some(s) = w.segments.get_mut(&loc.segment)
            {
                s.pages = s.pages.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Puts `file` in place of the active segment's file, and gives that back: a test
    /// writes to `/dev/full` for a while (every write fails with ENOSPC, as on a full
    /// disk), then puts the segment's file back.
    #[cfg(test)]
    pub(crate) fn swap_active_file(&self, file: Arc<File>) -> Arc<File> {
        let mut w = lock(&self.writer);
        let active = w.active;
        match w.segments.get_mut(&active) {
            Some(segment) => std::mem::replace(&mut segment.file, file),
            None => file,
        }
    }

    /// Writes the buffered appends to the file and makes everything appended so far
    /// durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        let file = {
            let mut w = lock(&self.writer);
            w.write_out()?;
            w.active_segment()?.file.clone()
        };
        // Older segments were made durable when they rolled over.
        file.sync_data()
            .map_err(|e| StoreError::Io(format!("syncing the task log: {e}")))
    }

    fn read(&self, loc: Loc) -> Result<Vec<u8>, StoreError> {
        let start = u64::from(loc.offset);
        let len = loc.len as usize;
        let file = {
            let w = lock(&self.writer);
            let segment = w.segments.get(&loc.segment).ok_or_else(|| {
                StoreError::Io(format!("task log segment {} is gone", loc.segment))
            })?;
            if loc.segment == w.active && start >= segment.len {
                // Still in the buffer, which begins where the file ends.
                let from = usize::try_from(start - segment.len).unwrap_or(usize::MAX);
                return w
                    .buffer
                    .get(from..from.saturating_add(len))
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| StoreError::Io("task log buffer shorter than an entry".into()));
            }
            segment.file.clone()
        };
        let mut bytes = vec![0; len];
        file.read_exact_at(&mut bytes, start).map_err(|e| {
            StoreError::Io(format!(
                "reading task log segment {} at {start}: {e}",
                loc.segment
            ))
        })?;
        Ok(bytes)
    }

    /// Appends a record; `change`: what it changes in the ledger (kind 5 when any).
    fn append_record(
        &self,
        id: &str,
        finished_ms: u64,
        record: &[u8],
        change: &[(CellKey, Cell)],
        replaces: Option<Loc>,
    ) -> Result<Loc, StoreError> {
        let id_len = id_len(id)?;
        let mut body = Vec::with_capacity(1 + 8 + 2 + id.len() + 4 + record.len());
        body.push(if change.is_empty() {
            KIND_RECORD
        } else {
            KIND_RECORD_CHANGE
        });
        body.extend_from_slice(&finished_ms.to_le_bytes());
        body.extend_from_slice(&id_len.to_le_bytes());
        body.extend_from_slice(id.as_bytes());
        if !change.is_empty() {
            let at = body.len();
            body.extend_from_slice(&[0; 4]);
            encode_cells(change.iter().map(|(k, c)| (k, c)), &mut body)?;
            let len = u32::try_from(body.len() - at - 4).unwrap_or(u32::MAX);
            body[at..at + 4].copy_from_slice(&len.to_le_bytes());
        }
        let record_in_body = body.len();
        body.extend_from_slice(record);
        let mut w = lock(&self.writer);
        let (segment, entry_at) = w.append(&body, replaces, Counted::Record, change)?;
        let offset = entry_at + (HEADER + record_in_body) as u64;
        Ok(Loc {
            segment,
            // Segments end below `segment_bytes` (at most 1 GiB, checked at open) plus one
            // entry of at most MAX_BODY, far within u32.
            offset: offset as u32,
            len: u32::try_from(record.len()).unwrap_or(u32::MAX),
            finished_ms,
        })
    }

    fn append_removed(&self, id: &str, replaces: Loc) -> Result<(), StoreError> {
        let id_len = id_len(id)?;
        let mut body = Vec::with_capacity(3 + id.len());
        body.push(KIND_REMOVED);
        body.extend_from_slice(&id_len.to_le_bytes());
        body.extend_from_slice(id.as_bytes());
        lock(&self.writer).append(&body, Some(replaces), Counted::Neither, &[])?;
        Ok(())
    }

    /// The budget ledger as the log holds it: what the records written so far leave it.
    pub fn ledger(&self) -> Vec<(CellKey, Cell)> {
        lock(&self.writer)
            .ledger
            .iter()
            .map(|(k, c)| (k.clone(), *c))
            .collect()
    }

    /// Drops cells from the log's ledger (expired: see `policy::budget::Ledger::prune`).
    /// Not written: the next copy leaves them out, and a reopen before it brings back
    /// cells that the next prune drops again.
    pub fn forget_ledger_cells(&self, keys: &[CellKey]) {
        let mut w = lock(&self.writer);
        for k in keys {
            w.ledger.remove(k);
        }
    }
}

/// What an appended entry is live as, in its segment's counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    /// A task's latest record.
    Record,
    /// A page kept.
    Page,
    /// A removal, dropped pages: never live.
    Neither,
}

impl Writer {
    fn active_segment(&mut self) -> Result<&mut Segment, StoreError> {
        let n = self.active;
        self.segments
            .get_mut(&n)
            .ok_or_else(|| StoreError::Io(format!("active task log segment {n} missing")))
    }

    /// Appends one entry to the active segment (rolling over first when it is full);
    /// returns the segment and the entry's offset. `counted`: what the entry is live as.
    /// `replaces`: the record it supersedes, no longer live. `change`: what the entry
    /// changes in the ledger.
    fn append(
        &mut self,
        body: &[u8],
        replaces: Option<Loc>,
        counted: Counted,
        change: &[(CellKey, Cell)],
    ) -> Result<(u32, u64), StoreError> {
        check_body(body)?;
        // Every fallible step first: once the entry is counted below, nothing may fail,
        // or the counts and the index (which the caller updates only on success) would
        // disagree about which record is live.
        if self.buffer.len() >= BUFFER_BYTES {
            self.write_out()?;
        }
        let buffered = self.buffer.len() as u64;
        let (copy_entries, copy_bytes) = self.copy;
        let (end, empty) = {
            let active = self.active_segment()?;
            (
                active.len + buffered - copy_bytes,
                active.entries <= copy_entries,
            )
        };
        if end + (HEADER + body.len()) as u64 > self.segment_bytes && !empty {
            // The new segment's copy of the ledger is taken before this entry's change.
            self.roll()?;
        }
        let placed = self.push(body, counted)?;
        if let Some(old) = replaces
            && let Some(s) = self.segments.get_mut(&old.segment)
        {
            s.live = s.live.saturating_sub(1);
        }
        for (k, c) in change {
            apply_change(&mut self.ledger, k, *c);
        }
        Ok(placed)
    }

    /// Puts one entry (of at most [`MAX_BODY`]) in the buffer, counted in the active
    /// segment, without rolling over; fails only when there is no active segment, before
    /// anything changed.
    fn push(&mut self, body: &[u8], counted: Counted) -> Result<(u32, u64), StoreError> {
        let buffered = self.buffer.len() as u64;
        let active = self.active;
        let segment = self.active_segment()?;
        let entry_at = segment.len + buffered;
        segment.entries += 1;
        match counted {
            Counted::Record => segment.live += 1,
            Counted::Page => segment.pages += 1,
            Counted::Neither => {}
        }
        // Body length fits u32: it is at most MAX_BODY.
        self.buffer
            .extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.buffer
            .extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        self.buffer.extend_from_slice(body);
        Ok((active, entry_at))
    }

    /// Appends a copy of the whole ledger (kind 6 entries, in parts) to the active
    /// segment, without rolling over.
    fn copy_ledger(&mut self) -> Result<(), StoreError> {
        let mut parts: Vec<Vec<u8>> = Vec::new();
        let mut part = Vec::new();
        for (k, c) in &self.ledger {
            if part.len() >= LEDGER_PART_BYTES {
                parts.push(std::mem::take(&mut part));
            }
            encode_cells(std::iter::once((k, c)), &mut part)?;
        }
        parts.push(part);
        let count = u32::try_from(parts.len()).unwrap_or(u32::MAX);
        for (i, cells) in parts.iter().enumerate() {
            let mut body = Vec::with_capacity(1 + 8 + cells.len());
            body.push(KIND_LEDGER);
            body.extend_from_slice(&u32::try_from(i).unwrap_or(u32::MAX).to_le_bytes());
            body.extend_from_slice(&count.to_le_bytes());
            body.extend_from_slice(cells);
            check_body(&body)?;
            if self.buffer.len() >= BUFFER_BYTES {
                self.write_out()?;
            }
            self.push(&body, Counted::Neither)?;
        }
        Ok(())
    }

    fn sync_active(&mut self) -> Result<(), StoreError> {
        let n = self.active;
        self.active_segment()?
            .file
            .sync_data()
            .map_err(|e| StoreError::Io(format!("syncing task log segment {n}: {e}")))
    }

    /// Writes the buffer to the active segment's file (not synced).
    fn write_out(&mut self) -> Result<(), StoreError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let n = self.active;
        let segment = self
            .segments
            .get_mut(&n)
            .ok_or_else(|| StoreError::Io(format!("active task log segment {n} missing")))?;
        segment
            .file
            .write_all_at(&self.buffer, segment.len)
            .map_err(|e| StoreError::Io(format!("writing task log segment {n}: {e}")))?;
        segment.len += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    /// Seals the active segment (written out and synced) and starts the next with a
    /// copy of the ledger, made durable at once: older segments (and the copy in them)
    /// may be deleted from now on.
    fn roll(&mut self) -> Result<(), StoreError> {
        self.write_out()?;
        self.sync_active()?;
        let next = self.active + 1;
        let segment = create_segment(&self.dir, next)?;
        self.segments.insert(next, segment);
        self.active = next;
        self.copy = (0, 0);
        self.copy_ledger()?;
        self.write_out()?;
        let segment = self.active_segment()?;
        self.copy = (segment.entries, segment.len - MAGIC.len() as u64);
        self.sync_active()
    }
}

/// Adds a change to one cell of a ledger kept by key (the key is cloned only for a new
/// cell: a change on the task path mostly meets one that exists).
fn apply_change(ledger: &mut BTreeMap<CellKey, Cell>, k: &CellKey, c: Cell) {
    match ledger.get_mut(k) {
        Some(cell) => cell.apply(c),
        None => ledger.entry(k.clone()).or_default().apply(c),
    }
}

fn check_body(body: &[u8]) -> Result<(), StoreError> {
    if body.len() > MAX_BODY {
        return Err(StoreError::Io(format!(
            "a task log entry of {} bytes is over the {MAX_BODY} limit",
            body.len()
        )));
    }
    Ok(())
}

/// Appends ledger cells (or changes) to `out`, one postcard-encoded pair after another.
fn encode_cells<'a>(
    cells: impl Iterator<Item = (&'a CellKey, &'a Cell)>,
    out: &mut Vec<u8>,
) -> Result<(), StoreError> {
    for pair in cells {
        let bytes = postcard::to_extend(&pair, std::mem::take(out))
            .map_err(|e| StoreError::Io(format!("encoding a ledger cell: {e}")))?;
        *out = bytes;
    }
    Ok(())
}

/// The pairs [`encode_cells`] wrote; `None` when the bytes are not such a run.
fn decode_cells(mut bytes: &[u8]) -> Option<Vec<(CellKey, Cell)>> {
    let mut cells = Vec::new();
    while !bytes.is_empty() {
        let (pair, rest) = postcard::take_from_bytes::<(CellKey, Cell)>(bytes).ok()?;
        cells.push(pair);
        bytes = rest;
    }
    Some(cells)
}

fn id_len(id: &str) -> Result<u16, StoreError> {
    u16::try_from(id.len()).map_err(|_| StoreError::Corrupt {
        id: id.chars().take(64).collect(),
        reason: "task id longer than 65535 bytes".into(),
    })
}

fn encode(id: &str, rec: &TaskRecord) -> Result<Vec<u8>, StoreError> {
    codec::encode(rec).map_err(|e| StoreError::Corrupt {
        id: id.to_string(),
        reason: format!("record did not encode: {e}"),
    })
}

/// The numbers of the segment files in `dir`, in order.
fn segment_numbers(dir: &Path) -> Result<Vec<u32>, StoreError> {
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io("listing", dir, e))? {
        let entry = entry.map_err(|e| io("listing", dir, e))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_suffix(".log"))
            .filter(|s| s.len() == 8)
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        numbers.push(n);
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Creates segment `n` with its header, and makes the file's name durable.
fn create_segment(dir: &Path, n: u32) -> Result<Segment, StoreError> {
    let path = segment_path(dir, n);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io("creating", &path, e))?;
    file.write_all(&MAGIC)
        .and_then(|()| file.sync_data())
        .map_err(|e| io("writing", &path, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing", dir, e))?;
    Ok(Segment {
        file: Arc::new(file),
        len: MAGIC.len() as u64,
        entries: 0,
        live: 0,
        pages: 0,
    })
}

/// What scanning one segment found.
struct Scanned {
    truncated: u64,
    damaged: bool,
    /// The segment is of an older format (1 or 2).
    older: bool,
    /// The segment holds a whole copy of the ledger.
    ledger_copy: bool,
}

/// The ledger as the segments read so far leave it.
#[derive(Default)]
struct LedgerScan {
    cells: BTreeMap<CellKey, Cell>,
    /// A whole copy was read.
    found: bool,
    /// The parts of a copy being read: the next part expected, of how many, and the
    /// cells so far.
    reading: Option<(u32, u32, BTreeMap<CellKey, Cell>)>,
}

impl LedgerScan {
    /// One part of a copy; returns whether it completed one. A part out of order (which
    /// only a damaged segment could hold) drops the copy being read.
    fn part(&mut self, part: u32, parts: u32, cells: Vec<(CellKey, Cell)>) -> bool {
        let mut reading = match self.reading.take() {
            _ if part == 0 => (0, parts, BTreeMap::new()),
            Some(r) if r.0 == part && r.1 == parts => r,
            _ => return false,
        };
        reading.2.extend(cells);
        reading.0 += 1;
        if reading.0 < reading.1 {
            self.reading = Some(reading);
            return false;
        }
        self.cells = reading.2;
        self.found = true;
        true
    }

    fn change(&mut self, change: Vec<(CellKey, Cell)>) {
        for (k, c) in &change {
            apply_change(&mut self.cells, k, *c);
        }
    }
}

/// What [`TaskLog::open`] builds from the segments, read one at a time in order.
struct Scan<'a> {
    index: &'a DashMap<Arc<str>, Loc>,
    pages: &'a mut Pages,
    /// The segments read before this one.
    segments: &'a mut BTreeMap<u32, Segment>,
    ledger: &'a mut LedgerScan,
}

impl Scan<'_> {
    /// Reads segment `n` into the indexes. The last segment is cut at a torn entry (and
    /// its header rewritten if a crash left it shorter than that).
    fn segment(
        &mut self,
        dir: &Path,
        n: u32,
        last: bool,
    ) -> Result<(Segment, Scanned), StoreError> {
        let path = segment_path(dir, n);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io("opening", &path, e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| io("reading", &path, e))?;
        let mut found = Scanned {
            truncated: 0,
            damaged: false,
            older: false,
            ledger_copy: false,
        };
        if bytes.len() < MAGIC.len() && last && MAGIC.starts_with(&bytes) {
            // Created, then the crash before its header was durable.
            file.set_len(0)
                .and_then(|()| file.write_all_at(&MAGIC, 0))
                .and_then(|()| file.sync_data())
                .map_err(|e| io("repairing", &path, e))?;
            found.truncated = bytes.len() as u64;
            bytes = MAGIC.to_vec();
        }
        match bytes.get(..MAGIC.len()) {
            Some(m) if m == MAGIC => {}
            Some(m) if m == MAGIC_V1 || m == MAGIC_V2 => found.older = true,
            _ => {
                return Err(StoreError::Io(format!(
                    "{} is not a task log segment of a format this commander reads",
                    path.display()
                )));
            }
        }
        let mut segment = Segment {
            file: Arc::new(file),
            len: bytes.len() as u64,
            entries: 0,
            live: 0,
            pages: 0,
        };
        let mut entries = Entries::new(&bytes);
        for entry in entries.by_ref() {
            let Ok(parsed) = entry else {
                break;
            };
            found.ledger_copy |= self.entry(parsed, n, &mut segment);
        }
        let good = entries.at as u64;
        if good < bytes.len() as u64 {
            if last {
                segment
                    .file
                    .set_len(good)
                    .and_then(|()| segment.file.sync_data())
                    .map_err(|e| io("truncating", &path, e))?;
                found.truncated += bytes.len() as u64 - good;
                tracing::warn!(
                    segment = n,
                    cut = bytes.len() as u64 - good,
                    "task log: an append cut short by a crash was dropped"
                );
            } else {
                found.damaged = true;
                tracing::error!(
                    segment = n,
                    at = good,
                    "task log: a damaged entry; the rest of this segment is skipped"
                );
            }
            segment.len = good;
        }
        Ok((segment, found))
    }

    /// Counts one entry read from segment `n` (`segment`) and points an index at it (a
    /// record, a page) or takes what it ends out (a removal, dropped pages); the entry
    /// it replaces or ends is no longer live in its segment. A change to the ledger is
    /// added to it. Returns whether the entry completed a copy of the ledger.
    fn entry(&mut self, parsed: Parsed<'_>, n: u32, segment: &mut Segment) -> bool {
        segment.entries += 1;
        match parsed {
            Parsed::Record {
                id,
                finished_ms,
                record,
                record_at,
                change,
            } => {
                self.ledger.change(change);
                segment.live += 1;
                let loc = Loc {
                    segment: n,
                    offset: u32::try_from(record_at).unwrap_or(u32::MAX),
                    len: u32::try_from(record.len()).unwrap_or(u32::MAX),
                    finished_ms,
                };
                let replaced = match self.index.get_mut(id) {
                    Some(mut old) => Some(std::mem::replace(&mut *old, loc)),
                    None => self.index.insert(Arc::from(id), loc),
                };
                if let Some(old) = replaced {
                    self.in_segment(old.segment, n, segment, |s| &mut s.live);
                }
            }
            Parsed::Removed { id } => {
                if let Some((_, old)) = self.index.remove(id) {
                    self.in_segment(old.segment, n, segment, |s| &mut s.live);
                }
            }
            Parsed::Page { key, loc } => {
                segment.pages += 1;
                let loc = PageLoc { segment: n, ..loc };
                self.pages.insert(key, loc);
            }
            Parsed::PagesDropped { keys } => {
                for key in keys {
                    // A key named here is never handed out again, even once its page's
                    // segment is gone: this entry would drop the new page at a reopen.
                    self.pages.next_seq = self.pages.next_seq.max(key.seq.saturating_add(1));
                    if let Some(old) = self.pages.remove(&key) {
                        self.in_segment(old.segment, n, segment, |s| &mut s.pages);
                    }
                }
            }
            Parsed::Ledger { part, parts, cells } => {
                return self.ledger.part(part, parts, cells);
            }
        }
        false
    }

    /// Takes one off the count `which` of segment `of` (`n`, being read, is `current`).
    fn in_segment(
        &mut self,
        of: u32,
        n: u32,
        current: &mut Segment,
        which: impl Fn(&mut Segment) -> &mut u64,
    ) {
        let s = if of == n {
            Some(current)
        } else {
            self.segments.get_mut(&of)
        };
        if let Some(s) = s {
            let count = which(s);
            *count = count.saturating_sub(1);
        }
    }
}

/// One entry of a segment.
enum Parsed<'a> {
    Record {
        id: &'a str,
        finished_ms: u64,
        record: &'a [u8],
        /// Offset of `record` in the segment.
        record_at: usize,
        /// What it changes in the ledger (kind 5).
        change: Vec<(CellKey, Cell)>,
    },
    Removed {
        id: &'a str,
    },
    /// `loc` without its segment, which the reader knows.
    Page {
        key: PageKey,
        loc: PageLoc,
    },
    PagesDropped {
        keys: Vec<PageKey>,
    },
    /// A part of a copy of the ledger.
    Ledger {
        part: u32,
        parts: u32,
        cells: Vec<(CellKey, Cell)>,
    },
}

/// The entries of a segment's bytes, in order, until the first that is not whole and
/// sound (an `Err`, after which iteration stops); `at` is then where the good ones end.
struct Entries<'a> {
    bytes: &'a [u8],
    at: usize,
    done: bool,
}

impl<'a> Entries<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            at: MAGIC.len(),
            done: false,
        }
    }

    fn parse(&self) -> Option<(Parsed<'a>, usize)> {
        let header = self.bytes.get(self.at..self.at.checked_add(HEADER)?)?;
        let (len, crc) = header.split_at(4);
        let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
        let crc = u32::from_le_bytes(crc.try_into().ok()?);
        if len == 0 || len > MAX_BODY {
            return None;
        }
        let body_at = self.at + HEADER;
        let body = self.bytes.get(body_at..body_at.checked_add(len)?)?;
        if crc32fast::hash(body) != crc {
            return None;
        }
        let (&kind, rest) = body.split_first()?;
        let parsed = match kind {
            KIND_RECORD | KIND_RECORD_CHANGE => {
                let (ms, rest) = rest.split_first_chunk::<8>()?;
                let (id, rest) = split_id(rest)?;
                let (change, record) = if kind == KIND_RECORD_CHANGE {
                    let (len, rest) = rest.split_first_chunk::<4>()?;
                    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
                    let change = rest.get(..len)?;
                    (decode_cells(change)?, rest.get(len..)?)
                } else {
                    (Vec::new(), rest)
                };
                let record_at = body_at + body.len() - record.len();
                Parsed::Record {
                    id,
                    finished_ms: u64::from_le_bytes(*ms),
                    record,
                    record_at,
                    change,
                }
            }
            KIND_REMOVED => {
                let (id, rest) = split_id(rest)?;
                if !rest.is_empty() {
                    return None;
                }
                Parsed::Removed { id }
            }
            KIND_PAGE => {
                let (at_ms, rest) = rest.split_first_chunk::<8>()?;
                let (seq, rest) = rest.split_first_chunk::<8>()?;
                let (count, rest) = rest.split_first_chunk::<2>()?;
                let (&flags, page) = rest.split_first()?;
                Parsed::Page {
                    key: PageKey {
                        at_ms: u64::from_le_bytes(*at_ms),
                        seq: u64::from_le_bytes(*seq),
                    },
                    loc: PageLoc {
                        segment: 0,
                        // Within the segment, which is within u32 (see `append_page`).
                        offset: u32::try_from(body_at + PAGE_HEAD).ok()?,
                        len: u32::try_from(page.len()).ok()?,
                        count: u16::from_le_bytes(*count),
                        moved_in: flags & PAGE_MOVED_IN != 0,
                    },
                }
            }
            KIND_PAGES_DROPPED => {
                if rest.len() % 16 != 0 {
                    return None;
                }
                let keys = rest
                    .chunks_exact(16)
                    .map(|k| {
                        let (at_ms, seq) = k.split_at(8);
                        Some(PageKey {
                            at_ms: u64::from_le_bytes(at_ms.try_into().ok()?),
                            seq: u64::from_le_bytes(seq.try_into().ok()?),
                        })
                    })
                    .collect::<Option<Vec<_>>>()?;
                Parsed::PagesDropped { keys }
            }
            KIND_LEDGER => {
                let (part, rest) = rest.split_first_chunk::<4>()?;
                let (parts, cells) = rest.split_first_chunk::<4>()?;
                Parsed::Ledger {
                    part: u32::from_le_bytes(*part),
                    parts: u32::from_le_bytes(*parts),
                    cells: decode_cells(cells)?,
                }
            }
            _ => return None,
        };
        Some((parsed, body_at + len))
    }
}

/// An id (u16 length, UTF-8) and what follows it.
fn split_id(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_le_bytes(*len));
    let id = rest.get(..len)?;
    Some((std::str::from_utf8(id).ok()?, rest.get(len..)?))
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Parsed<'a>, ()>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.at >= self.bytes.len() {
            return None;
        }
        match self.parse() {
            Some((parsed, next)) => {
                self.at = next;
                Some(Ok(parsed))
            }
            None => {
                self.done = true;
                Some(Err(()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TaskState;

    fn dispatch(log: &TaskLog, id: &str) {
        log.update(
            id,
            1,
            || TaskRecord::new(id, 7),
            |r| r.advance(TaskState::Dispatched),
        )
        .unwrap();
    }

    fn finish(log: &TaskLog, id: &str, at_ms: u64) {
        log.update(
            id,
            at_ms,
            || unreachable!(),
            |r| r.advance(TaskState::Completed),
        )
        .unwrap();
    }

    fn state(log: &TaskLog, id: &str) -> Option<TaskState> {
        log.get_bytes(id)
            .unwrap()
            .map(|b| codec::decode(&b).unwrap().state)
    }

    fn segment_files(dir: &Path) -> Vec<u32> {
        segment_numbers(dir).unwrap()
    }

    fn cell(bucket: u64) -> CellKey {
        CellKey {
            budget: "fleet-day".into(),
            value: "*".into(),
            bucket,
        }
    }

    /// Dispatches `id` holding `est` in `cells`, as the intake does.
    fn reserve(log: &TaskLog, id: &str, cells: &[CellKey], est: f64) {
        log.update(
            id,
            1,
            || TaskRecord::new(id, 7),
            |r| {
                r.budget = Some(crate::domain::Reservation {
                    cells: cells.to_vec(),
                    est_usd: est,
                    charged_usd: None,
                });
                r.advance(TaskState::Dispatched);
            },
        )
        .unwrap();
    }

    /// Finishes `id`, charging `cost`, as the results loop does.
    fn charge(log: &TaskLog, id: &str, cost: f64) {
        log.update(
            id,
            2,
            || unreachable!(),
            |r| {
                r.advance(TaskState::Completed);
                if let Some(b) = r.budget.as_mut() {
                    b.charged_usd = Some(cost);
                }
            },
        )
        .unwrap();
    }

    fn ledger_of(log: &TaskLog) -> BTreeMap<CellKey, Cell> {
        log.ledger().into_iter().collect()
    }

    fn close(a: &BTreeMap<CellKey, Cell>, b: &BTreeMap<CellKey, Cell>) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|((ka, ca), (kb, cb))| {
                ka == kb
                    && (ca.spent - cb.spent).abs() < 1e-9
                    && (ca.reserved - cb.reserved).abs() < 1e-9
            })
    }

    /// The ledger is what the records' reservations and charges add up to, and it comes
    /// back so after a reopen: across segments rolled over (each starting with a copy),
    /// after the oldest were deleted by the sweep, and with a part of the records swept.
    #[test]
    fn the_ledger_is_kept_from_the_records_across_rollovers_sweeps_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (cell(1_000), cell(2_000));
        let mut expected: BTreeMap<CellKey, Cell> = BTreeMap::new();
        {
            let (log, opened) = TaskLog::open_with_segment_bytes(dir.path(), 2048).unwrap();
            assert!(!opened.ledger_found, "a new log has none to find");
            for i in 0..120u32 {
                let id = format!("t{i:03}");
                let cells = if i % 3 == 0 {
                    vec![a.clone(), b.clone()]
                } else {
                    vec![a.clone()]
                };
                let est = 0.01 * f64::from(i % 7 + 1);
                reserve(&log, &id, &cells, est);
                let done = i % 4 != 0;
                let cost = 0.003 * f64::from(i % 5);
                if done {
                    charge(&log, &id, cost);
                }
                for k in &cells {
                    let c = expected.entry(k.clone()).or_default();
                    if done {
                        c.spent += cost;
                    } else {
                        c.reserved += est;
                    }
                }
                // Updates that change nothing the ledger holds.
                log.update(&id, 3, || unreachable!(), |r| r.priority = 9)
                    .unwrap();
            }
            assert!(close(&ledger_of(&log), &expected), "{:?}", ledger_of(&log));
            let before = segment_files(dir.path());
            assert!(before.len() > 10, "{before:?}");
            assert!(log.sweep(u64::MAX, usize::MAX, usize::MAX).unwrap() > 80);
            let after = segment_files(dir.path());
            assert!(after.first() > before.first(), "{before:?} -> {after:?}");
            // Swept records leave what they were charged in the ledger.
            assert!(close(&ledger_of(&log), &expected));
            log.sync().unwrap();
        }
        let (log, opened) = TaskLog::open_with_segment_bytes(dir.path(), 2048).unwrap();
        assert!(opened.ledger_found);
        assert_eq!(opened.ledger_cells, 2);
        assert!(close(&ledger_of(&log), &expected), "{:?}", ledger_of(&log));
        // The ones still running finish after the restart.
        for i in (0..120u32).step_by(4) {
            charge(&log, &format!("t{i:03}"), 0.5);
        }
        let spent_a: f64 = expected[&a].spent + 0.5 * 30.0;
        let got = ledger_of(&log);
        assert!((got[&a].spent - spent_a).abs() < 1e-9, "{got:?}");
        assert!(got[&a].reserved.abs() < 1e-9 && got[&b].reserved.abs() < 1e-9);
        log.sync().unwrap();
        drop(log);
        let (log, _) = TaskLog::open_with_segment_bytes(dir.path(), 2048).unwrap();
        assert!(close(&ledger_of(&log), &got));
    }

    /// A crash that cuts a record's entry short cuts its change to the ledger with it: the
    /// reservation (or charge) is on disk exactly when its record is. (Before the ledger
    /// was in the log, the two were made durable by different syncs.)
    #[test]
    fn a_torn_record_takes_its_ledger_change_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = cell(1_000);
        let path = segment_path(dir.path(), 1);
        let after_first = {
            let (log, _) = TaskLog::open(dir.path()).unwrap();
            reserve(&log, "first", std::slice::from_ref(&a), 0.25);
            log.sync().unwrap();
            let len = std::fs::metadata(&path).unwrap().len();
            reserve(&log, "second", std::slice::from_ref(&a), 0.5);
            charge(&log, "first", 0.2);
            log.sync().unwrap();
            len
        };
        let whole = std::fs::metadata(&path).unwrap().len();
        // Cut inside the second record's entry, as a crash mid-write would.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(after_first + 20).unwrap();
        drop(file);
        let (log, opened) = TaskLog::open(dir.path()).unwrap();
        assert_eq!(opened.truncated, 20);
        assert!(!log.contains("second"));
        assert_eq!(state(&log, "first"), Some(TaskState::Dispatched));
        assert_eq!(
            ledger_of(&log)[&a],
            Cell {
                spent: 0.0,
                reserved: 0.25
            },
            "the second reservation and the first charge went with their records"
        );
        assert!(whole > after_first + 20);
        // Done again, as the redelivered dispatch and result do: counted once.
        reserve(&log, "second", std::slice::from_ref(&a), 0.5);
        charge(&log, "first", 0.2);
        let c = ledger_of(&log)[&a];
        assert!(
            (c.spent - 0.2).abs() < 1e-12 && (c.reserved - 0.5).abs() < 1e-12,
            "{c:?}"
        );
    }

    /// A log without a copy of the ledger (one of the layout before it moved here) takes
    /// in the cells kept elsewhere, once: a reopen finds the copy and does not ask again.
    /// A ledger larger than one part is written and read in parts.
    #[test]
    fn an_older_ledger_is_taken_in_once_and_a_large_one_is_copied_in_parts() {
        let dir = tempfile::tempdir().unwrap();
        let older: Vec<(CellKey, Cell)> = (0..60_000u64)
            .map(|i| {
                let k = CellKey {
                    budget: format!("team-{}", i % 40),
                    value: format!("value-{i}"),
                    bucket: 1_700_000_000_000 + i,
                };
                let c = Cell {
                    spent: i as f64 * 0.001,
                    reserved: 0.5,
                };
                (k, c)
            })
            .collect();
        {
            let (log, opened) =
                TaskLog::open_adopting(dir.path(), SEGMENT_BYTES, || Ok(older.clone())).unwrap();
            assert_eq!(opened.ledger_adopted, 60_000);
            assert_eq!(log.ledger().len(), 60_000);
        }
        let bytes = std::fs::read(segment_path(dir.path(), 1)).unwrap();
        let parts = Entries::new(&bytes)
            .filter(|e| matches!(e, Ok(Parsed::Ledger { .. })))
            .count();
        assert!(parts >= 2, "{parts} part(s) for {} bytes", bytes.len());
        let (log, opened) =
            TaskLog::open_adopting(dir.path(), SEGMENT_BYTES, || panic!("asked again")).unwrap();
        assert!(opened.ledger_found);
        assert_eq!(opened.ledger_adopted, 0);
        let mut sorted = older;
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        assert!(log.ledger() == sorted, "read back as written");
    }

    /// A ledger larger than a segment does not make segments hold fewer records: its copy
    /// is not counted against the segment's size.
    #[test]
    fn a_ledger_larger_than_a_segment_leaves_segments_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let older: Vec<(CellKey, Cell)> = (0..200u64).map(|i| (cell(i), Cell::default())).collect();
        let (log, _) = TaskLog::open_adopting(dir.path(), 2048, || Ok(older)).unwrap();
        for i in 0..200 {
            dispatch(&log, &format!("t{i:03}"));
        }
        log.sync().unwrap();
        let segments = segment_files(dir.path());
        let total: u64 = segments
            .iter()
            .map(|n| {
                std::fs::metadata(segment_path(dir.path(), *n))
                    .unwrap()
                    .len()
            })
            .sum();
        let copy = std::fs::metadata(segment_path(dir.path(), 1))
            .unwrap()
            .len();
        assert!(copy > 2048, "the copy alone is {copy} bytes");
        // About (total - copies) / 2048 segments, not one per record.
        assert!(
            segments.len() < 40,
            "{} segments for {total} bytes",
            segments.len()
        );
        drop(log);
        let (log, opened) = TaskLog::open_with_segment_bytes(dir.path(), 2048).unwrap();
        assert_eq!(opened.records, 200);
        assert_eq!(log.ledger().len(), 200);
    }

    /// Expired cells dropped from the log's ledger are left out of the next copy.
    #[test]
    fn forgotten_cells_leave_the_next_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (cell(1_000), cell(2_000));
        {
            let (log, _) = TaskLog::open_with_segment_bytes(dir.path(), 1024).unwrap();
            reserve(&log, "old", std::slice::from_ref(&old), 0.1);
            charge(&log, "old", 0.1);
            log.forget_ledger_cells(std::slice::from_ref(&old));
            for i in 0..20 {
                reserve(&log, &format!("new-{i}"), std::slice::from_ref(&new), 0.1);
            }
            assert!(segment_files(dir.path()).len() > 2);
            log.sync().unwrap();
        }
        let (log, _) = TaskLog::open_with_segment_bytes(dir.path(), 1024).unwrap();
        let got = ledger_of(&log);
        assert_eq!(got.keys().collect::<Vec<_>>(), [&new]);
        assert!((got[&new].reserved - 2.0).abs() < 1e-9);
    }

    /// A crash can leave the last append half-written: the reopen cuts it off, keeps
    /// everything before it, and appends after the cut.
    #[test]
    fn a_torn_last_entry_is_cut_off_at_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = TaskLog::open(dir.path()).unwrap();
            for i in 0..10 {
                dispatch(&log, &format!("t{i}"));
            }
            log.sync().unwrap();
        }
        let path = segment_path(dir.path(), 1);
        let whole = std::fs::metadata(&path).unwrap().len();
        // Half of one more entry, as a crash mid-write leaves it.
        let file = OpenOptions::new().append(true).open(&path).unwrap();
        (&file).write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 1, 0]).unwrap();
        drop(file);
        let (log, opened) = TaskLog::open(dir.path()).unwrap();
        assert_eq!(opened.truncated, 10);
        assert_eq!(opened.records, 10);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        finish(&log, "t3", 5);
        log.sync().unwrap();
        drop(log);
        let (log, opened) = TaskLog::open(dir.path()).unwrap();
        assert_eq!(opened.truncated, 0);
        assert_eq!(state(&log, "t3"), Some(TaskState::Completed));
        assert_eq!(state(&log, "t4"), Some(TaskState::Dispatched));
    }

    /// A flipped byte in an older segment (which a crash cannot make) loses the rest of
    /// that segment only, and is reported.
    #[test]
    fn a_damaged_older_segment_loses_only_its_rest() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = TaskLog::open_with_segment_bytes(dir.path(), 1024).unwrap();
            for i in 0..40 {
                dispatch(&log, &format!("t{i:02}"));
            }
            log.sync().unwrap();
        }
        assert!(segment_files(dir.path()).len() >= 3);
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (log, opened) = TaskLog::open_with_segment_bytes(dir.path(), 1024).unwrap();
        assert_eq!(opened.damaged, 1);
        assert!(opened.records < 40 && opened.records > 20, "{opened:?}");
        assert_eq!(state(&log, "t00"), Some(TaskState::Dispatched));
        assert_eq!(state(&log, "t39"), Some(TaskState::Dispatched));
    }

    /// Segments roll over; the sweep deletes the oldest once nothing in them is live,
    /// and copies the few records still live in an old segment forward first. Everything
    /// reads the same after a reopen.
    #[test]
    fn swept_segments_are_deleted_and_long_lived_records_copied_forward() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..200).map(|i| format!("task-{i:03}")).collect();
        {
            let (log, _) = TaskLog::open_with_segment_bytes(dir.path(), 2048).unwrap();
            for id in &ids {
                dispatch(&log, id);
            }
            // All but every 50th finish, at times in order.
            for (i, id) in ids.iter().enumerate() {
                if i % 50 != 0 {
                    finish(&log, id, 1_000 + i as u64);
                }
            }
            let before = segment_files(dir.path());
            assert!(before.len() > 10, "{before:?}");
            // Half of them past retention.
            let removed = log.sweep(1_100, usize::MAX, usize::MAX).unwrap();
            assert_eq!(removed, 98, "task-001 .. task-099 but task-050");
            let after = segment_files(dir.path());
            assert!(after.len() < before.len(), "{before:?} -> {after:?}");
            assert!(
                after.first() > before.first(),
                "the oldest went: {before:?} -> {after:?}"
            );
            // The long-lived ones were among the first written; still there.
            assert_eq!(state(&log, "task-000"), Some(TaskState::Dispatched));
            assert_eq!(state(&log, "task-050"), Some(TaskState::Dispatched));
            assert_eq!(state(&log, "task-001"), None);
            log.sync().unwrap();
        }
        let (log, opened) = TaskLog::open_with_segment_bytes(dir.path(), 2048).unwrap();
        assert_eq!(opened.records, 102);
        assert_eq!(state(&log, "task-000"), Some(TaskState::Dispatched));
        assert_eq!(state(&log, "task-050"), Some(TaskState::Dispatched));
        assert_eq!(state(&log, "task-001"), None);
        assert_eq!(state(&log, "task-199"), Some(TaskState::Completed));
        // Retention resumes from the records themselves.
        assert_eq!(log.sweep(u64::MAX, usize::MAX, usize::MAX).unwrap(), 98);
        assert_eq!(log.records(), 4, "every 50th, never finished");
    }

    /// Updates of one task from several threads at once are each applied once, on top of
    /// one another.
    #[test]
    fn concurrent_updates_of_one_task_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = TaskLog::open(dir.path()).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..250 {
                        log.update(
                            "shared",
                            1,
                            || TaskRecord::new("shared", 0),
                            |r| r.attempt += 1,
                        )
                        .unwrap();
                    }
                });
            }
        });
        let rec = codec::decode(&log.get_bytes("shared").unwrap().unwrap()).unwrap();
        assert_eq!(rec.attempt, 1_000);
    }

    /// A file that is not a segment of this format is refused, not overwritten.
    #[test]
    fn a_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(segment_path(dir.path(), 1), b"not a task log at all").unwrap();
        let err = TaskLog::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a task log segment"), "{err}");
    }

    fn page_keys(log: &TaskLog) -> Vec<PageKey> {
        log.pages_between(
            PageKey::first_at(0),
            PageKey::first_at(u64::MAX),
            false,
            usize::MAX,
        )
        .into_iter()
        .map(|(k, _)| k)
        .collect()
    }

    /// Pages are kept in time order (a page of an earlier millisecond written later sorts
    /// before), read back after a reopen; dropping the oldest is durable; a segment whose
    /// tasks are all gone waits for its pages, and goes once they are dropped.
    #[test]
    fn pages_keep_time_order_drop_durably_and_hold_their_segments() {
        let dir = tempfile::tempdir().unwrap();
        let page = |i: u64| format!("page {i}").repeat(20).into_bytes();
        {
            let (log, _) = TaskLog::open_with_segment_bytes(dir.path(), 2048).unwrap();
            for i in 0..30u64 {
                // Task records finishing at once, and pages, interleaved.
                dispatch(&log, &format!("t{i}"));
                finish(&log, &format!("t{i}"), 100);
                let at_ms = 1_000 + i - (i % 3 == 2) as u64 * 2;
                log.append_page(at_ms, 2, false, &page(i)).unwrap();
            }
            assert_eq!(log.page_entries(), 60);
            let keys = page_keys(&log);
            assert!(keys.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(keys[0].at_ms, 1_000);
            // The tasks go; their segments stay for the pages in them.
            let before = segment_files(dir.path());
            assert_eq!(log.sweep(u64::MAX, usize::MAX, usize::MAX).unwrap(), 30);
            let swept = segment_files(dir.path());
            assert!(
                swept.starts_with(&before),
                "held by pages: {before:?} -> {swept:?}"
            );
            // Pages at 1,000 .. 1,014 go.
            let dropped = log.drop_pages(usize::MAX, |k, _| k.at_ms < 1_015).unwrap();
            assert_eq!(dropped, 30);
            let after = segment_files(dir.path());
            assert!(after.first() > before.first(), "{before:?} -> {after:?}");
            log.sync().unwrap();
        }
        let (log, opened) = TaskLog::open_with_segment_bytes(dir.path(), 2048).unwrap();
        assert_eq!(opened.pages, 15);
        assert_eq!(log.page_entries(), 30);
        let kept = log.pages_between(
            PageKey::first_at(0),
            PageKey::first_at(u64::MAX),
            true,
            usize::MAX,
        );
        assert!(kept.iter().all(|(k, _)| k.at_ms >= 1_015));
        assert_eq!(
            log.read_page(kept[0].1).unwrap(),
            page(28),
            "1,028 ms, the newest"
        );
        // A new page never takes the key of one before the reopen.
        let key = log.append_page(2_000, 1, false, b"x").unwrap();
        assert!(kept.iter().all(|(k, _)| k.seq < key.seq));
        // By count: keep at most 10 entries.
        assert_eq!(log.drop_pages(usize::MAX, |_, kept| kept > 10).unwrap(), 22);
        assert_eq!(log.page_entries(), 9);
    }

    /// A store written in format 1 (before pages) reads as it was, and appends go to a new
    /// segment of format 2, which a commander that reads format 1 only would refuse rather
    /// than cut as torn.
    #[test]
    fn a_format_1_segment_is_read_and_appends_go_to_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = TaskLog::open(dir.path()).unwrap();
            for i in 0..5 {
                dispatch(&log, &format!("t{i}"));
            }
            log.sync().unwrap();
        }
        // Segment 1 as format 1 wrote it: the same entries under the older magic.
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..MAGIC.len()].copy_from_slice(&MAGIC_V1);
        std::fs::write(&path, &bytes).unwrap();
        let (log, opened) = TaskLog::open(dir.path()).unwrap();
        assert_eq!(opened.records, 5);
        assert_eq!(segment_files(dir.path()), [1, 2]);
        log.append_page(1, 1, false, b"p").unwrap();
        finish(&log, "t0", 5);
        log.sync().unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "format 1 left as it was"
        );
        drop(log);
        let (log, _) = TaskLog::open(dir.path()).unwrap();
        assert_eq!(state(&log, "t0"), Some(TaskState::Completed));
        assert_eq!(state(&log, "t4"), Some(TaskState::Dispatched));
        assert_eq!(log.page_entries(), 1);
    }
}
