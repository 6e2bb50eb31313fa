//! Kept traces in sled, bounded by bytes and by age.
//!
//! Trees, keyed by a trace's time key, (kept ms, big-endian) ++ trace id:
//! `trace_spans_by_time` (the OTLP `TracesData` protobuf, redacted, LZ4-compressed and
//! split into entries of at most [`store::PAGE_BYTES`](crate::store::PAGE_BYTES): see
//! [`FORMAT_LZ4`]), `trace_summaries_by_time` (JSON summary) and `trace_times` (stored
//! bytes, big-endian u64: the index that listing, retention and the byte budget walk
//! without reading records). A trace is found by its id through an index in memory (trace
//! id → kept ms), rebuilt from `trace_times`'s keys at open, which reads them all anyway.
//!
//! No tree is keyed by anything random. Until December 2026 two were, and each made every
//! kept trace read and rewrite a page anywhere in a tree that grew with the store: the id
//! index `trace_ids`, and `trace_tasks` (task id → trace id), which linked a task to its
//! kept trace. A task's kept trace is the one under its own trace id (its record's
//! `trace.trace_id`, its decision's `trace_id`), which the index in memory answers. Both
//! trees are dropped at open.
//!
//! The big values go in by time, so a store of a million tasks writes its newest pages
//! and retention takes its oldest. Keyed by trace id (random), as until December 2026
//! (`trace_spans` and `trace_summaries`), every kept trace rewrote a page anywhere in
//! trees larger than sled's cache: `bench dispatch` spent ~20 % more CPU per task after
//! 160,000 tasks with a 128 MiB cache, and none more with traces off. A store in that
//! layout is moved over when it is opened ([`TraceStore::open`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, TracesData};
use prost::Message;
use serde::{Deserialize, Serialize};

use super::sample::Why;
pub use crate::domain::{hex, unhex};
use crate::store::{PAGE_BYTES, Store, StoreError};

/// The first byte of a spans value written before format 2: the `TracesData` protobuf
/// follows, whole, in one entry. Still read.
const FORMAT_V1: u8 = 1;

/// Format 2: byte `2`, the protobuf's length (u32, little-endian), the LZ4 block's length
/// (u32, little-endian), then the block (`lz4_flex`). The value is cut into pieces of at
/// most [`PAGE_BYTES`]: the first under the trace's time key, the rest under the time key
/// ++ the piece's number (u32, big-endian, from 1), so they sort right after it. Traces
/// that carry message content run to tens or hundreds of KB; whole, a leaf of them went
/// over the size at which sled writes a node to a file of its own on every rewrite
/// (`store::PAGE_BYTES` says why), and one over 128 KiB was such a file by itself.
const FORMAT_LZ4: u8 = 2;

/// Bytes before a format-2 value's block.
const LZ4_HEADER: usize = 9;

/// A trace's spans as stored in format 2, whole (before it is cut into pieces).
fn encode_spans(data: &TracesData) -> Result<Vec<u8>, String> {
    let raw = data.encode_to_vec();
    let raw_len = u32::try_from(raw.len()).map_err(|_| {
        format!(
            "{} bytes of spans, over the 4 GiB a trace may hold",
            raw.len()
        )
    })?;
    let mut out = crate::store::lz4::compress(LZ4_HEADER, &raw)?;
    // The block is never longer than its input, plus a little: it fits a u32 as raw did.
    let block_len = u32::try_from(out.len() - LZ4_HEADER).map_err(|e| e.to_string())?;
    out[0] = FORMAT_LZ4;
    out[1..5].copy_from_slice(&raw_len.to_le_bytes());
    out[5..9].copy_from_slice(&block_len.to_le_bytes());
    Ok(out)
}

/// The key of piece `n` of the value under `time_key`: the time key itself for the first
/// (`n` = 0), then the time key ++ `n`.
fn piece_key(time_key: &[u8], n: usize) -> Result<Vec<u8>, String> {
    if n == 0 {
        return Ok(time_key.to_vec());
    }
    let n = u32::try_from(n).map_err(|_| format!("a trace in {n} pieces is too large"))?;
    let mut k = Vec::with_capacity(time_key.len() + 4);
    k.extend_from_slice(time_key);
    k.extend_from_slice(&n.to_be_bytes());
    Ok(k)
}

/// The `TracesData` protobuf from a stored value's pieces, in key order (the first under
/// the time key itself).
fn decode_spans(pieces: &[sled::IVec]) -> Result<TracesData, String> {
    let Some(first) = pieces.first() else {
        return Err("no spans stored".into());
    };
    let raw = match first.split_first() {
        Some((&FORMAT_V1, body)) if pieces.len() == 1 => {
            return TracesData::decode(body).map_err(|e| e.to_string());
        }
        Some((&FORMAT_LZ4, rest)) => {
            let (raw_len, rest) = rest
                .split_first_chunk::<4>()
                .ok_or("the spans end in their header")?;
            let (block_len, head) = rest
                .split_first_chunk::<4>()
                .ok_or("the spans end in their header")?;
            let raw_len = u32::from_le_bytes(*raw_len) as usize;
            let block_len = u32::from_le_bytes(*block_len) as usize;
            let held: usize = head.len() + pieces[1..].iter().map(|p| p.len()).sum::<usize>();
            if held != block_len {
                return Err(format!(
                    "the spans' block is {block_len} bytes, but {held} are stored"
                ));
            }
            let decompressed = if pieces.len() == 1 {
                crate::store::lz4::decompress(head, raw_len)
            } else {
                let mut block = Vec::with_capacity(block_len);
                block.extend_from_slice(head);
                for p in &pieces[1..] {
                    block.extend_from_slice(p);
                }
                crate::store::lz4::decompress(&block, raw_len)
            };
            decompressed.map_err(|e| format!("the spans' block {e}"))?
        }
        other => {
            return Err(format!(
                "unknown format {:?} in {} pieces",
                other.map(|(b, _)| b),
                pieces.len()
            ));
        }
    };
    TracesData::decode(raw.as_slice()).map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum TraceStoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("trace store: {0}")]
    Sled(#[from] sled::Error),
    #[error("trace summary does not encode: {0}")]
    Json(#[from] serde_json::Error),
    #[error("stored trace {0} is not readable: {1}")]
    Corrupt(String, String),
    #[error("cursor {0:?} is not one this API returned")]
    BadCursor(String),
}

/// What is known of a kept trace without reading its spans.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceSummary {
    pub trace_id: String,
    pub kept_at_ms: u64,
    /// Every reason it was kept.
    pub why: Vec<Why>,
    /// The alert rules (or causes) that flagged it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flagged_by: Vec<String>,
    /// `complete`, `lifetime` (decided without its root) or `evicted` (decided early by
    /// the memory budget).
    pub ending: String,
    /// `error` when a span failed or its task did, else `ok`.
    pub status: String,
    pub start_unix_ms: u64,
    pub duration_ms: f64,
    pub spans: u64,
    /// Stored size of the spans (redacted, compressed).
    pub bytes: u64,
    pub cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub root_name: Option<String>,
    pub task_type: Option<String>,
    /// At most 16 of each.
    pub task_ids: Vec<String>,
    pub workers: Vec<String>,
    pub pools: Vec<String>,
    pub models: Vec<String>,
    /// Values the redaction rules changed or removed.
    pub redactions: u64,
}

/// Filters for [`TraceStore::query`]; all optional, all must hold.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub worker: Option<String>,
    pub pool: Option<String>,
    pub task_type: Option<String>,
    pub task_id: Option<String>,
    /// `ok` or `error`.
    pub status: Option<String>,
    /// A reason it was kept (`error`, `p99_cost`, `flagged`, `healthy` …).
    pub why: Option<String>,
    /// When it was kept, Unix ms (inclusive since, exclusive until).
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub min_cost_usd: Option<f64>,
    pub min_duration_ms: Option<f64>,
    /// Page size (1-500, default 50).
    pub limit: Option<usize>,
    /// From a previous page's `next`.
    pub cursor: Option<String>,
}

impl Filter {
    /// A page's size when `limit` is not given, and the most it may be.
    pub const DEFAULT_LIMIT: usize = 50;
    pub const MAX_LIMIT: usize = 500;

    fn matches(&self, t: &TraceSummary) -> bool {
        let has = |want: &Option<String>, list: &[String]| {
            want.as_ref().is_none_or(|w| list.iter().any(|x| x == w))
        };
        has(&self.worker, &t.workers)
            && has(&self.pool, &t.pools)
            && has(&self.task_id, &t.task_ids)
            && self
                .task_type
                .as_ref()
                .is_none_or(|w| t.task_type.as_ref() == Some(w))
            && self.status.as_ref().is_none_or(|s| *s == t.status)
            && self
                .why
                .as_deref()
                .is_none_or(|w| t.why.iter().any(|x| x.as_str() == w))
            && self.min_cost_usd.is_none_or(|c| t.cost_usd >= c)
            && self.min_duration_ms.is_none_or(|d| t.duration_ms >= d)
    }
}

/// A page of kept traces, newest first.
#[derive(Clone, Debug, Serialize)]
pub struct Page {
    pub traces: Vec<TraceSummary>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    pub scanned: usize,
}

/// Most index entries one query examines.
const MAX_SCAN: usize = 20_000;

/// A stored trace: its summary and its spans.
#[derive(Clone, Debug)]
pub struct Stored {
    pub summary: TraceSummary,
    pub resource_spans: Vec<ResourceSpans>,
}

#[derive(Clone, Debug)]
pub struct TraceStore {
    /// Time key → spans.
    spans: sled::Tree,
    /// Time key → summary.
    summaries: sled::Tree,
    times: sled::Tree,
    /// Trace id → kept ms, for every trace `times` holds (see the module's docs).
    ids: Arc<DashMap<[u8; 16], u64>>,
    /// Bytes stored (spans and summaries), kept in step with `times`.
    bytes: Arc<AtomicU64>,
    /// Traces stored, kept in step with `times`: sled's `len` walks the whole tree, and
    /// retention reports the count every minute.
    count: Arc<AtomicU64>,
}

fn time_key(at_ms: u64, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(id);
    k
}

fn u64_of(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// A time key's kept ms and trace id; `None` for a key that is not one.
fn split_time_key(k: &[u8]) -> Option<(u64, [u8; 16])> {
    let (at, id) = k.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*at), id.try_into().ok()?))
}

/// The sled trees that were the id index and the task index until December 2026 (see
/// the module's docs).
const OLD_IDS_TREE: &str = "trace_ids";
const OLD_TASKS_TREE: &str = "trace_tasks";

impl TraceStore {
    pub fn open(store: &Store) -> Result<Self, TraceStoreError> {
        let times = store.tree("trace_times")?;
        let (mut total, mut count) = (0u64, 0u64);
        let ids = DashMap::new();
        for entry in times.iter() {
            let (k, v) = entry?;
            total += u64_of(&v);
            count += 1;
            if let Some((at, id)) = split_time_key(&k) {
                ids.insert(id, at);
            }
        }
        let this = Self {
            spans: store.tree("trace_spans_by_time")?,
            summaries: store.tree("trace_summaries_by_time")?,
            times,
            ids: Arc::new(ids),
            bytes: Arc::new(AtomicU64::new(total)),
            count: Arc::new(AtomicU64::new(count)),
        };
        this.migrate_by_id(store)?;
        // The id index of the layouts before December 2026, rebuilt above from the keys,
        // and their task index, which a task's own trace id replaces.
        store.drop_tree(OLD_IDS_TREE)?;
        store.drop_tree(OLD_TASKS_TREE)?;
        Ok(this)
    }

    /// Moves traces stored by trace id (the layout before the time keys) to their time
    /// keys, then drops the old trees. Idempotent: a move cut short by a crash is taken
    /// up again from what is left in them.
    fn migrate_by_id(&self, store: &Store) -> Result<(), TraceStoreError> {
        let (old_spans, old_summaries) =
            (store.tree("trace_spans")?, store.tree("trace_summaries")?);
        if old_spans.is_empty() && old_summaries.is_empty() {
            store.drop_tree("trace_spans")?;
            store.drop_tree("trace_summaries")?;
            return Ok(());
        }
        let mut moved = 0u64;
        for entry in self.times.iter() {
            let (key, _) = entry?;
            let Some(id) = key.get(8..) else { continue };
            let (Some(spans), Some(summary)) = (old_spans.get(id)?, old_summaries.get(id)?) else {
                continue;
            };
            self.spans.insert(&key, spans)?;
            self.summaries.insert(&key, summary)?;
            if let Some((at, id)) = split_time_key(&key) {
                self.ids.insert(id, at);
            }
            old_spans.remove(id)?;
            old_summaries.remove(id)?;
            moved += 1;
        }
        store.drop_tree("trace_spans")?;
        store.drop_tree("trace_summaries")?;
        tracing::info!(
            moved,
            "kept traces moved to time-ordered keys (the trace store's layout before December 2026)"
        );
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        usize::try_from(self.count.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a trace is kept (constant time, in memory).
    pub fn contains(&self, trace_id: &[u8]) -> bool {
        <[u8; 16]>::try_from(trace_id).is_ok_and(|id| self.ids.contains_key(&id))
    }

    /// The time key of a stored trace.
    fn key_of(&self, trace_id: &[u8]) -> Result<Option<Vec<u8>>, TraceStoreError> {
        let Ok(id) = <[u8; 16]>::try_from(trace_id) else {
            return Ok(None);
        };
        Ok(self.ids.get(&id).map(|at| time_key(*at, trace_id)))
    }

    /// Stores a kept trace (or adds late spans to one stored before).
    pub fn put(
        &self,
        trace_id: &[u8; 16],
        summary: &mut TraceSummary,
        resource_spans: Vec<ResourceSpans>,
    ) -> Result<(), TraceStoreError> {
        let mut resource_spans = resource_spans;
        // Traces are kept by one task, so a trace the index does not name is new: its
        // time key holds nothing, and is not read.
        let stored_before = self.ids.contains_key(trace_id);
        if let Some(old) = self.get(trace_id)? {
            // Late spans: the stored ones first, the summary's figures added up.
            let mut all = old.resource_spans;
            all.append(&mut resource_spans);
            resource_spans = all;
            summary.spans += old.summary.spans;
            summary.cost_usd += old.summary.cost_usd;
            summary.input_tokens += old.summary.input_tokens;
            summary.output_tokens += old.summary.output_tokens;
            summary.redactions += old.summary.redactions;
            summary.kept_at_ms = old.summary.kept_at_ms;
            if old.summary.status == "error" {
                summary.status = old.summary.status;
            }
            summary.ending = old.summary.ending;
            summary.root_name = old.summary.root_name.or(summary.root_name.take());
            summary.task_type = old.summary.task_type.or(summary.task_type.take());
            summary.start_unix_ms = old.summary.start_unix_ms.min(summary.start_unix_ms);
            summary.duration_ms = old.summary.duration_ms.max(summary.duration_ms);
            for (mine, theirs) in [
                (&mut summary.task_ids, old.summary.task_ids),
                (&mut summary.workers, old.summary.workers),
                (&mut summary.pools, old.summary.pools),
                (&mut summary.models, old.summary.models),
                (&mut summary.flagged_by, old.summary.flagged_by),
            ] {
                let new = std::mem::replace(mine, theirs);
                for v in new {
                    if mine.len() < 16 && !mine.contains(&v) {
                        mine.push(v);
                    }
                }
            }
            for w in old.summary.why {
                if !summary.why.contains(&w) {
                    summary.why.push(w);
                }
            }
            summary.why.sort();
        }
        let data = TracesData { resource_spans };
        let corrupt = |why: String| TraceStoreError::Corrupt(hex(trace_id), why);
        let value = encode_spans(&data).map_err(corrupt)?;
        summary.bytes = value.len() as u64;
        let json = serde_json::to_vec(&summary)?;
        let stored = summary.bytes + json.len() as u64;
        let key = time_key(summary.kept_at_ms, trace_id);
        // A trace stored before keeps its time key (`kept_at_ms` is kept), under which
        // the index holds all it took up: spans and summary, not the spans alone.
        let pieces = value
            .chunks(PAGE_BYTES)
            .enumerate()
            .map(|(n, piece)| piece_key(&key, n).map(|k| (k, piece)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(corrupt)?;
        let before = if stored_before {
            self.times.get(&key)?
        } else {
            None
        };
        match before {
            Some(before) => {
                self.bytes.fetch_sub(u64_of(&before), Ordering::Relaxed);
                // Late spans (rare): the old pieces go and the new ones come in one batch,
                // so a reader never sees a mix of the two.
                let mut batch = sled::Batch::default();
                for k in self.spans.scan_prefix(&key).keys() {
                    batch.remove(k?);
                }
                for (k, piece) in pieces {
                    batch.insert(k, piece);
                }
                self.spans.apply_batch(batch)?;
            }
            None => {
                self.count.fetch_add(1, Ordering::Relaxed);
                // A new trace, with plain inserts: a sled batch rolls the log's buffer
                // over, several times the cost of an insert. Nothing finds the trace
                // before `ids` names it, below; the head (the first piece) goes last all
                // the same.
                for (k, piece) in pieces.into_iter().rev() {
                    self.spans.insert(k, piece)?;
                }
            }
        };
        self.summaries.insert(&key, json)?;
        self.ids.insert(*trace_id, summary.kept_at_ms);
        self.times.insert(key, &stored.to_be_bytes())?;
        self.bytes.fetch_add(stored, Ordering::Relaxed);
        Ok(())
    }

    pub fn summary(&self, trace_id: &[u8]) -> Result<Option<TraceSummary>, TraceStoreError> {
        match self.key_of(trace_id)? {
            Some(key) => self.summary_at(&key),
            None => Ok(None),
        }
    }

    /// The summary under a time key.
    fn summary_at(&self, key: &[u8]) -> Result<Option<TraceSummary>, TraceStoreError> {
        match self.summaries.get(key)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    pub fn get(&self, trace_id: &[u8]) -> Result<Option<Stored>, TraceStoreError> {
        let Some(key) = self.key_of(trace_id)? else {
            return Ok(None);
        };
        let Some(summary) = self.summary_at(&key)? else {
            return Ok(None);
        };
        let mut pieces = Vec::new();
        for entry in self.spans.scan_prefix(&key) {
            let (k, v) = entry?;
            if pieces.is_empty() && *k != *key {
                // Pieces without their head: the trace is being removed (head first).
                return Ok(None);
            }
            pieces.push(v);
        }
        if pieces.is_empty() {
            return Ok(None);
        }
        let data =
            decode_spans(&pieces).map_err(|why| TraceStoreError::Corrupt(hex(trace_id), why))?;
        Ok(Some(Stored {
            summary,
            resource_spans: data.resource_spans,
        }))
    }

    /// Newest first, filtered, paginated.
    pub fn query(&self, f: &Filter) -> Result<Page, TraceStoreError> {
        let limit = f
            .limit
            .unwrap_or(Filter::DEFAULT_LIMIT)
            .clamp(1, Filter::MAX_LIMIT);
        let lower = time_key(f.since_ms.unwrap_or(0), &[]);
        let mut upper = time_key(f.until_ms.unwrap_or(u64::MAX), &[]);
        if let Some(c) = &f.cursor {
            match unhex(c) {
                Some(b) if b.len() == 24 => upper = b,
                _ => return Err(TraceStoreError::BadCursor(c.clone())),
            }
        }
        let mut out = Vec::with_capacity(limit);
        let (mut scanned, mut next) = (0, None);
        for entry in self.times.range(lower..upper).rev() {
            let (k, _) = entry?;
            scanned += 1;
            if let Some(s) = self.summary_at(&k)?
                && f.matches(&s)
            {
                out.push(s);
                if out.len() == limit {
                    next = Some(hex(&k));
                    break;
                }
            }
            if scanned >= MAX_SCAN {
                next = Some(hex(&k));
                break;
            }
        }
        Ok(Page {
            traces: out,
            next,
            scanned,
        })
    }

    /// Removes traces kept before `cutoff_ms`, then the oldest while over `max_bytes`; at
    /// most `limit` per call. Returns how many went.
    pub fn prune(
        &self,
        cutoff_ms: u64,
        max_bytes: u64,
        limit: usize,
    ) -> Result<usize, TraceStoreError> {
        let mut removed = 0;
        while removed < limit {
            let Some((k, v)) = self.times.first()? else {
                break;
            };
            let at = k.get(..8).map_or(0, u64_of);
            if at >= cutoff_ms && self.bytes() <= max_bytes {
                break;
            }
            self.remove(&k, u64_of(&v))?;
            removed += 1;
        }
        Ok(removed)
    }

    fn remove(&self, time_key: &[u8], stored: u64) -> Result<(), TraceStoreError> {
        // The head first, so a reader finds the trace whole or not at all; then its other
        // pieces.
        self.spans.remove(time_key)?;
        for k in self.spans.scan_prefix(time_key).keys() {
            self.spans.remove(k?)?;
        }
        self.summaries.remove(time_key)?;
        if let Some((at, id)) = split_time_key(time_key) {
            // Only if it still points here.
            self.ids.remove_if(&id, |_, kept| *kept == at);
        }
        if self.times.remove(time_key)?.is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        self.bytes.fetch_sub(stored, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(kept_at_ms: u64) -> TraceSummary {
        TraceSummary {
            kept_at_ms,
            ending: "complete".into(),
            status: "ok".into(),
            ..Default::default()
        }
    }

    /// The count `len` answers (without walking the tree) follows puts, late spans,
    /// retention and a reopen.
    #[test]
    fn the_trace_count_is_kept_without_a_scan() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        {
            let store = Store::open(dir.path()).unwrap();
            let traces = TraceStore::open(&store).unwrap();
            assert!(traces.is_empty());
            traces.put(&a, &mut summary(1_000), Vec::new()).unwrap();
            traces.put(&b, &mut summary(2_000), Vec::new()).unwrap();
            // Late spans for a stored trace: still two traces.
            traces.put(&a, &mut summary(3_000), Vec::new()).unwrap();
            assert_eq!(traces.len(), 2);
            assert_eq!(traces.times.len(), 2);
            futures::executor::block_on(store.flush()).unwrap();
        }
        let store = Store::reopen(dir.path());
        let traces = TraceStore::open(&store).unwrap();
        assert_eq!(traces.len(), 2, "counted again on open");
        assert_eq!(traces.prune(1_500, u64::MAX, 10).unwrap(), 1);
        assert_eq!(traces.len(), 1);
        assert_eq!(traces.prune(u64::MAX, u64::MAX, 10).unwrap(), 1);
        assert!(traces.is_empty());
    }

    /// A trace is found by its id after a reopen (the index in memory is rebuilt from the
    /// time keys), and the sled trees that were the id and task indexes before are dropped;
    /// a trace removed by retention is found no more.
    #[test]
    fn traces_are_found_by_id_after_a_reopen_without_the_old_id_tree() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = ([3u8; 16], [4u8; 16]);
        {
            let store = Store::open(dir.path()).unwrap();
            let traces = TraceStore::open(&store).unwrap();
            traces.put(&a, &mut summary(1_000), Vec::new()).unwrap();
            traces.put(&b, &mut summary(2_000), Vec::new()).unwrap();
            // What a commander of the layout before left: the old index, stale.
            let old = store.tree(OLD_IDS_TREE).unwrap();
            old.insert(a, &9u64.to_be_bytes()).unwrap();
            let old_tasks = store.tree(OLD_TASKS_TREE).unwrap();
            old_tasks.insert(b"task-a", &a[..]).unwrap();
            futures::executor::block_on(store.flush()).unwrap();
        }
        let store = Store::reopen(dir.path());
        let traces = TraceStore::open(&store).unwrap();
        assert!(!store.has_tree(OLD_IDS_TREE) && !store.has_tree(OLD_TASKS_TREE));
        assert!(traces.contains(&a) && traces.contains(&b) && !traces.contains(&[5u8; 16]));
        assert_eq!(traces.summary(&a).unwrap().unwrap().kept_at_ms, 1_000);
        assert_eq!(traces.summary(&b).unwrap().unwrap().kept_at_ms, 2_000);
        assert!(traces.summary(&[5u8; 16]).unwrap().is_none());
        assert!(traces.summary(b"short").unwrap().is_none());
        // Late spans keep the trace's time key.
        traces.put(&a, &mut summary(3_000), Vec::new()).unwrap();
        assert_eq!(traces.summary(&a).unwrap().unwrap().kept_at_ms, 1_000);
        assert_eq!(traces.prune(1_500, u64::MAX, 10).unwrap(), 1);
        assert!(traces.get(&a).unwrap().is_none());
        assert!(traces.get(&b).unwrap().is_some());
    }

    /// Late spans replace what the trace took up (spans and summary) in the byte count,
    /// which stays the sum the index holds, as a reopen counts it.
    #[test]
    fn late_spans_keep_the_byte_count_exact() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let traces = TraceStore::open(&store).unwrap();
        let a = [7u8; 16];
        for n in 0..5 {
            traces.put(&a, &mut summary(1_000 + n), Vec::new()).unwrap();
        }
        let indexed: u64 = traces.times.iter().map(|e| u64_of(&e.unwrap().1)).sum();
        assert_eq!(traces.bytes(), indexed);
        assert_eq!(TraceStore::open(&store).unwrap().bytes(), indexed);
    }

    /// A trace whose protobuf is `bytes` long or so: one span with that much text, in
    /// words drawn from a small generator so that it compresses as prose does, not to
    /// nothing.
    fn big_trace(id: [u8; 16], bytes: usize, seed: u64) -> Vec<ResourceSpans> {
        use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
        use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span};
        const WORDS: [&str; 16] = [
            "the", "customer", "asks", "for", "a", "refund", "of", "invoice", "charged", "twice",
            "and", "billing", "says", "card", "was", "declined",
        ];
        let mut x = seed | 1;
        let mut text = String::with_capacity(bytes + 16);
        while text.len() < bytes {
            // xorshift picks the words, and a number now and then.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            text.push_str(WORDS[(x % 16) as usize]);
            if x.is_multiple_of(7) {
                text.push_str(&(x % 100_000).to_string());
            }
            text.push(' ');
        }
        vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: id.to_vec(),
                    span_id: seed.to_be_bytes().to_vec(),
                    name: "chat".into(),
                    attributes: vec![KeyValue {
                        key: "gen_ai.input.messages".into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(text)),
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }]
    }

    /// Format 2: a trace of 300 KB is stored compressed, in pieces that each fit
    /// `PAGE_BYTES` (so a leaf of them stays in sled's log), and reads back whole; late
    /// spans make it larger and it still reads whole; retention removes every piece.
    #[test]
    fn a_large_trace_is_stored_compressed_in_pieces_and_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let traces = TraceStore::open(&store).unwrap();
        let id = [9u8; 16];
        let first = big_trace(id, 300_000, 1);
        let raw = TracesData {
            resource_spans: first.clone(),
        }
        .encoded_len();
        let mut s = summary(1_000);
        traces.put(&id, &mut s, first.clone()).unwrap();
        assert!(
            s.bytes < raw as u64 * 3 / 4,
            "compressed: {} of {raw}",
            s.bytes
        );
        let pieces: Vec<_> = traces.spans.iter().map(|e| e.unwrap()).collect();
        assert!(pieces.len() > 10, "{} pieces", pieces.len());
        assert!(pieces.iter().all(|(_, v)| v.len() <= PAGE_BYTES));
        assert_eq!(
            pieces.iter().map(|(_, v)| v.len() as u64).sum::<u64>(),
            s.bytes
        );
        assert_eq!(traces.get(&id).unwrap().unwrap().resource_spans, first);

        // Late spans: stored with the first, more pieces under the same time key.
        let late = big_trace(id, 100_000, 2);
        traces.put(&id, &mut summary(2_000), late.clone()).unwrap();
        let got = traces.get(&id).unwrap().unwrap();
        assert_eq!(got.summary.kept_at_ms, 1_000);
        assert_eq!(got.resource_spans, [first, late].concat());
        assert!(traces.spans.len() > pieces.len());
        // A small trace next to it is one entry.
        let small = [3u8; 16];
        traces
            .put(&small, &mut summary(1_500), big_trace(small, 500, 3))
            .unwrap();
        assert_eq!(traces.spans.scan_prefix(time_key(1_500, &small)).count(), 1);

        assert_eq!(traces.prune(1_200, u64::MAX, 10).unwrap(), 1);
        assert!(traces.get(&id).unwrap().is_none());
        assert_eq!(traces.spans.len(), 1, "every piece of the big trace went");
        assert!(traces.get(&small).unwrap().is_some());
    }

    /// Spans stored in format 1 (a format byte and the protobuf, whole: the format
    /// before compression) still read; damaged format-2 values are errors, never a
    /// panic or an allocation of what they claim.
    #[test]
    fn format_1_spans_still_read_and_damaged_ones_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let traces = TraceStore::open(&store).unwrap();
        let old = [1u8; 16];
        let spans = big_trace(old, 2_000, 1);
        traces
            .put(&old, &mut summary(1_000), spans.clone())
            .unwrap();
        let key = time_key(1_000, &old);
        let mut v1 = vec![FORMAT_V1];
        TracesData {
            resource_spans: spans.clone(),
        }
        .encode(&mut v1)
        .unwrap();
        traces.spans.insert(&key, v1).unwrap();
        assert_eq!(traces.get(&old).unwrap().unwrap().resource_spans, spans);

        let id = [2u8; 16];
        traces
            .put(&id, &mut summary(2_000), big_trace(id, 50_000, 2))
            .unwrap();
        let key = time_key(2_000, &id);
        let head = traces.spans.get(&key).unwrap().unwrap().to_vec();
        let is_corrupt = |t: &TraceStore| matches!(t.get(&id), Err(TraceStoreError::Corrupt(_, _)));
        // A claim of 4 GiB from a small block.
        let mut claim = head.clone();
        claim[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        traces.spans.insert(&key, claim).unwrap();
        assert!(is_corrupt(&traces));
        // Cut inside the header.
        traces.spans.insert(&key, &head[..6]).unwrap();
        assert!(is_corrupt(&traces));
        // A piece missing.
        traces.spans.insert(&key, head).unwrap();
        assert!(traces.get(&id).unwrap().is_some());
        traces.spans.remove(piece_key(&key, 1).unwrap()).unwrap();
        assert!(is_corrupt(&traces));
    }

    /// A store in the layout before time keys (spans and summaries keyed by trace id, in
    /// `trace_spans` and `trace_summaries`) opens with every trace readable by id, listed
    /// and pruned as before; the old trees, the task index among them, are gone.
    #[test]
    fn a_store_keyed_by_trace_id_is_moved_to_time_keys() {
        use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span};
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<[u8; 16]> = (1..=50u8).map(|i| [i; 16]).collect();
        {
            let store = Store::open(dir.path()).unwrap();
            let (spans, summaries, times, tasks) = (
                store.tree("trace_spans").unwrap(),
                store.tree("trace_summaries").unwrap(),
                store.tree("trace_times").unwrap(),
                store.tree("trace_tasks").unwrap(),
            );
            for (n, id) in ids.iter().enumerate() {
                let data = TracesData {
                    resource_spans: vec![ResourceSpans {
                        scope_spans: vec![ScopeSpans {
                            spans: vec![Span {
                                trace_id: id.to_vec(),
                                span_id: vec![n as u8 + 1; 8],
                                name: format!("run {n}"),
                                ..Default::default()
                            }],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                };
                let mut value = vec![FORMAT_V1];
                data.encode(&mut value).unwrap();
                let mut s = summary(1_000 + n as u64);
                s.trace_id = hex(id);
                s.task_ids = vec![format!("task-{n}")];
                s.spans = 1;
                let json = serde_json::to_vec(&s).unwrap();
                let stored = (value.len() + json.len()) as u64;
                spans.insert(id, value).unwrap();
                summaries.insert(id, json).unwrap();
                times
                    .insert(time_key(s.kept_at_ms, id), &stored.to_be_bytes())
                    .unwrap();
                tasks
                    .insert(format!("task-{n}").as_bytes(), &id[..])
                    .unwrap();
            }
            futures::executor::block_on(store.flush()).unwrap();
        }
        let store = Store::reopen(dir.path());
        let traces = TraceStore::open(&store).unwrap();
        assert_eq!(traces.len(), 50);
        for (n, id) in ids.iter().enumerate() {
            let t = traces.get(id).unwrap().expect("moved");
            assert_eq!(t.summary.kept_at_ms, 1_000 + n as u64);
            assert_eq!(
                t.resource_spans[0].scope_spans[0].spans[0].name,
                format!("run {n}")
            );
            assert!(traces.contains(id));
        }
        assert!(
            store.tree("trace_spans").unwrap().is_empty(),
            "the old tree was dropped (opening it again makes an empty one)"
        );
        assert!(!store.has_tree(OLD_TASKS_TREE));
        let page = traces.query(&Filter::default()).unwrap();
        assert_eq!(page.traces.len(), 50);
        assert_eq!(page.traces[0].kept_at_ms, 1_049, "newest first");
        // Opening again moves nothing and loses nothing.
        let again = TraceStore::open(&store).unwrap();
        assert_eq!(again.len(), 50);
        assert!(again.get(&ids[0]).unwrap().is_some());
        assert_eq!(again.prune(1_025, u64::MAX, 100).unwrap(), 25);
        assert!(again.get(&ids[0]).unwrap().is_none());
        assert!(!again.contains(&ids[0]));
        assert!(again.get(&ids[49]).unwrap().is_some());
    }
}
