//! The decision log: every routing decision (and every rejection) with the classification
//! and every candidate, in sled (in the store that also holds the task log), with bounded
//! retention.
//!
//! Keys are in time order. A batch's decisions are written as pages: the decisions made
//! in one millisecond, up to [`PAGE_MAX`] to a page, under `at_ms (8 bytes, big-endian) ++
//! 0x00 ++ a unique id (8 bytes, increasing) ++ count (1 byte)`. One sled write costs about the same
//! whatever it holds (measured: 9.4 µs of CPU per decision written one by one, 2.3 µs in
//! pages of 32), and a decision a task writes per dispatch was the task path's largest
//! store cost. A decision written on its own (a retarget, an intervention) keeps the
//! per-decision key `at_ms ++ task id`. A task's record in the store keeps its decision's
//! `at_ms`, which finds the decision by task id among that millisecond's keys, without a
//! second index to write for every task.
//!
//! Values: a single decision is format 2, a version byte (`2`), then the record as
//! MessagePack with field names (`rmp_serde::to_vec_named`), about 60 % of the JSON. A
//! page is format 4: byte `4`, the length of a MessagePack array of such records, then
//! the array as an LZ4 block, at most [`PAGE_BYTES`] in all (sled leaves, see there); format 3
//! (byte `3`, then the array uncompressed) was written before and is still read. The log keeps
//! names, unlike the task record's positional format, because decisions gain fields more
//! often and a self-describing record reads old and new alike. Format 1 (JSON, starting
//! with `{`) is still read; it leaves through retention.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::classify::Classification;
use crate::route::Candidate;
use crate::store::{Store, StoreError};

/// The `<pool>` token of `<prefix>.decisions.<pool>` for rejections.
pub const REJECTED_TOKEN: &str = "_rejected";

/// What became of the task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Dispatched,
    Rejected,
    /// Held by a budget until it has room (see `policy::deferred`).
    Deferred,
    /// Not a routing decision: an intervention acted on the task after it was dispatched
    /// (`cancel_task`, `restart_task`); `rule` is `intervention_<action>` and `reason`
    /// names the intervention and its alert. The routing decision stays the task's own.
    Intervened,
}

/// One decision as logged, served and published.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Decision id; also in the dispatched message's `Fleet-Decision-Id` header.
    pub id: String,
    pub task_id: String,
    pub at_ms: u64,
    pub at: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// The route rule (`cost_tier`, `health_reroute` …) or, for a rejection, its code.
    pub rule: String,
    pub reason: String,
    pub task_type: String,
    pub tier: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub est_cost_usd: Option<f64>,
    pub priority: u8,
    pub classification: Classification,
    pub candidates: Vec<Candidate>,
    /// Rubric (name) the task was classified against.
    pub rubric: String,
    /// Policy version the decision was made under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    /// Everything the decision read from reloadable sources, by generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<crate::domain::Generation>,
    /// What of the task itself the decision read (shadow replay decides again from it).
    #[serde(default)]
    pub inputs: DecisionInputs,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// The task's own inputs to its decision, beyond the classification.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DecisionInputs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    #[serde(default)]
    pub dims: crate::domain::TaskDims,
}

/// Filters for [`DecisionLog::query`]; all optional, all must hold.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub pool: Option<String>,
    pub model: Option<String>,
    pub task_type: Option<String>,
    /// Route rule or rejection code, exactly.
    pub rule: Option<String>,
    /// Case-insensitive substring of the reason.
    pub reason: Option<String>,
    /// Classification path: declared, cache, llm, fallback.
    pub source: Option<String>,
    pub outcome: Option<Outcome>,
    /// Time range, Unix ms (inclusive since, exclusive until).
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    /// Page size (1-500, default 100).
    pub limit: Option<usize>,
    /// From a previous page's `next`.
    pub cursor: Option<String>,
}

impl Filter {
    fn matches(&self, d: &DecisionRecord) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| Some(w) == have)
        };
        eq(&self.pool, d.pool.as_deref())
            && eq(&self.model, d.model.as_deref())
            && eq(&self.task_type, Some(&d.task_type))
            && eq(&self.rule, Some(&d.rule))
            && eq(&self.source, Some(d.classification.source.as_str()))
            && self.outcome.is_none_or(|o| o == d.outcome)
            && self
                .reason
                .as_deref()
                .is_none_or(|r| d.reason.to_lowercase().contains(&r.to_lowercase()))
    }
}

/// A page of decisions, newest first.
#[derive(Clone, Debug, Serialize)]
pub struct Page {
    pub decisions: Vec<DecisionRecord>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// Records examined for this page (filters that match rarely scan more).
    pub scanned: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DecisionLogError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("decision record does not encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("a page of decisions is {0} bytes uncompressed, too large to store")]
    PageTooLarge(usize),
    #[error("a page of decisions does not compress: {0}")]
    Compress(String),
    #[error("stored decision does not decode: {0}")]
    Decode(String),
    #[error("cursor {0:?} is not one this API returned")]
    BadCursor(String),
}

/// Most records one query examines, so a filter that matches nothing cannot scan a
/// million records per request; the page's `next` continues from where it stopped.
const MAX_SCAN: usize = 20_000;

#[derive(Clone, Debug)]
pub struct DecisionLog {
    by_time: sled::Tree,
    /// Records in `by_time`, counted once at open and kept as records come and go, so
    /// retention by count never walks the tree (sled's `len` does).
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    store: Store,
    /// Where each decision is announced (`decision` events of `/v1/stream`).
    events: Option<crate::events::Hub>,
}

/// What a `decision` event carries: enough for a live tail line; the whole record is
/// `GET /v1/decisions/{task_id}`.
#[derive(Debug, Serialize)]
struct DecisionEvent<'a> {
    id: &'a str,
    task_id: &'a str,
    at_ms: u64,
    outcome: &'a Outcome,
    pool: Option<&'a str>,
    model: Option<&'a str>,
    worker: Option<&'a str>,
    rule: &'a str,
    reason: &'a str,
    task_type: &'a str,
    tier: &'a str,
    est_cost_usd: Option<f64>,
    candidates: usize,
}

impl DecisionLog {
    pub fn open(store: &Store) -> Result<Self, DecisionLogError> {
        let by_time = store.tree("decisions")?;
        // Counted from the keys alone (a page's key holds its count), as sled's `len`
        // would walk them: no value is read.
        let mut records = 0;
        for k in by_time.iter().keys() {
            records += entry_count(&k?);
        }
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(records));
        Ok(Self {
            by_time,
            count,
            store: store.clone(),
            events: None,
        })
    }

    /// Announces every decision recorded from now on to `hub`.
    pub fn with_events(mut self, hub: crate::events::Hub) -> Self {
        self.events = Some(hub);
        self
    }

    /// Writes one decision (made durable by the store's next flush).
    pub fn record(&self, d: &DecisionRecord) -> Result<(), DecisionLogError> {
        self.record_many(std::slice::from_ref(d))
    }

    /// Writes many decisions, in pages of those made in the same millisecond (see the
    /// module's doc), each page with a plain insert ([`Store::tree`] says why not a
    /// `sled::Batch`). The caller records each decision's `at_ms` on its task record.
    pub fn record_many(&self, items: &[DecisionRecord]) -> Result<(), DecisionLogError> {
        let mut by_time: Vec<&DecisionRecord> = items.iter().collect();
        by_time.sort_by_key(|d| d.at_ms);
        for same_ms in by_time.chunk_by(|a, b| a.at_ms == b.at_ms) {
            for page in same_ms.chunks(PAGE_MAX) {
                self.insert_pages(page)?;
            }
        }
        if let Some(hub) = self.events.as_ref().filter(|h| h.watched()) {
            for d in items {
                hub.publish_watched(
                    crate::events::Kind::Decision,
                    d.pool.as_deref(),
                    d.worker.as_deref(),
                    &DecisionEvent {
                        id: &d.id,
                        task_id: &d.task_id,
                        at_ms: d.at_ms,
                        outcome: &d.outcome,
                        pool: d.pool.as_deref(),
                        model: d.model.as_deref(),
                        worker: d.worker.as_deref(),
                        rule: &d.rule,
                        reason: &d.reason,
                        task_type: &d.task_type,
                        tier: &d.tier,
                        est_cost_usd: d.est_cost_usd,
                        candidates: d.candidates.len(),
                    },
                );
            }
        }
        Ok(())
    }

    /// Inserts `page` as one page, or, when it compresses to more than [`PAGE_BYTES`],
    /// as two halves (and so on): a decision alone keeps its own key. Each entry is
    /// counted once it is in.
    fn insert_pages(&self, page: &[&DecisionRecord]) -> Result<(), DecisionLogError> {
        let (key, value) = match page {
            [] => return Ok(()),
            [d] => (key(d.at_ms, &d.task_id), encode(d)?),
            [first, ..] => {
                let value = encode_page(page)?;
                if value.len() > PAGE_BYTES {
                    let (older, newer) = page.split_at(page.len() / 2);
                    self.insert_pages(older)?;
                    return self.insert_pages(newer);
                }
                (page_key(&self.store, first.at_ms, page.len())?, value)
            }
        };
        self.by_time.insert(key, value)?;
        // A key is a decision's time and task: a task decided again (a redelivery, a
        // release) is decided at a new time, so every insert is a new record.
        self.count
            .fetch_add(page.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The decision for a task, found through the task record's `decision_at_ms`: its own
    /// key, else the pages of that millisecond.
    pub fn get(&self, task_id: &str) -> Result<Option<DecisionRecord>, DecisionLogError> {
        let Some(at_ms) = self.store.get(task_id)?.and_then(|r| r.decision_at_ms) else {
            return Ok(None);
        };
        if let Some(v) = self.by_time.get(key(at_ms, task_id))? {
            return decode(&v).map(Some);
        }
        let mut found = None;
        let that_ms = key(at_ms, "")..key(at_ms.saturating_add(1), "");
        for entry in self.by_time.range(that_ms) {
            let (k, v) = entry?;
            // The last one: a task decided twice in one millisecond keeps the later. A
            // page that does not decode is passed over, as a query passes it.
            if is_page_key(&k)
                && let Ok(page) = decode_page(&v)
            {
                found = page.into_iter().rfind(|d| d.task_id == task_id).or(found);
            }
        }
        Ok(found)
    }

    /// Newest first, filtered, paginated. A cursor is the key of the entry the last page
    /// stopped at, with (for a page of decisions) how many of that page's decisions are
    /// still to come.
    pub fn query(&self, f: &Filter) -> Result<Page, DecisionLogError> {
        let limit = f.limit.unwrap_or(100).clamp(1, 500);
        let lower = key(f.since_ms.unwrap_or(0), "");
        let mut upper = key(f.until_ms.unwrap_or(u64::MAX), "");
        let mut resume = None;
        if let Some(c) = &f.cursor {
            let bytes = hex_decode(c).ok_or_else(|| DecisionLogError::BadCursor(c.clone()))?;
            if bytes.len() < 8 {
                return Err(DecisionLogError::BadCursor(c.clone()));
            }
            match split_page_cursor(&bytes) {
                Some((page, before)) => {
                    upper = page.to_vec();
                    resume = Some((page.to_vec(), before));
                }
                None => upper = bytes,
            }
        }
        let mut scan = Scan {
            filter: f,
            limit,
            out: Vec::with_capacity(limit),
            scanned: 0,
            next: None,
        };
        if let Some((page, before)) = resume
            && page >= lower
            && let Some(v) = self.by_time.get(&page)?
            && scan.entry(&page, &v, before)
        {
            return Ok(scan.into_page());
        }
        if lower < upper {
            for entry in self.by_time.range(lower..upper).rev() {
                let (k, v) = entry?;
                if scan.entry(&k, &v, usize::MAX) {
                    break;
                }
            }
        }
        Ok(scan.into_page())
    }

    /// Decisions made in [`since_ms`, `until_ms`), oldest first, at most `max`.
    pub fn range(
        &self,
        since_ms: u64,
        until_ms: u64,
        max: usize,
    ) -> Result<Vec<DecisionRecord>, DecisionLogError> {
        let mut out = Vec::new();
        let (lower, upper) = (key(since_ms, ""), key(until_ms, ""));
        if lower >= upper {
            return Ok(out);
        }
        for entry in self.by_time.range(lower..upper) {
            let (k, v) = entry?;
            out.extend(decode_entry(&k, &v).unwrap_or_default());
            if out.len() >= max {
                out.truncate(max);
                break;
            }
        }
        Ok(out)
    }

    /// Drops decisions older than `cutoff`, then the oldest beyond `max_records`; stops
    /// once `limit` went (a page goes whole, so by up to a page more). Returns how many
    /// went.
    pub fn prune(
        &self,
        cutoff: SystemTime,
        max_records: u64,
        limit: usize,
    ) -> Result<usize, DecisionLogError> {
        let cutoff_ms = cutoff
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let end = key(cutoff_ms, "");
        let mut removed = 0;
        let over = self.len().saturating_sub(max_records) as usize;
        // Oldest first, through the time-ordered keys: nothing newer is ever read.
        for entry in self.by_time.iter().keys() {
            if removed >= limit {
                break;
            }
            let k = entry?;
            if k.as_ref() >= end.as_slice() && removed >= over {
                break;
            }
            let n = entry_count(&k);
            if self.by_time.remove(&k)?.is_some() {
                self.count
                    .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
            }
            removed += n as usize;
        }
        Ok(removed)
    }

    /// Records in the log (kept, not counted: constant time).
    pub fn len(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One newest-first walk of [`DecisionLog::query`]: what matched so far and where it
/// stopped.
struct Scan<'a> {
    filter: &'a Filter,
    limit: usize,
    out: Vec<DecisionRecord>,
    scanned: usize,
    next: Option<String>,
}

impl Scan<'_> {
    /// Looks at one entry's decisions, newest first (a page's first `before` only);
    /// `true` when the page of answers is full or the scan bound is reached.
    fn entry(&mut self, k: &[u8], v: &[u8], before: usize) -> bool {
        let Ok(mut decisions) = decode_entry(k, v) else {
            // Unreadable: counted against the bound, and skipped.
            self.scanned += 1;
            if self.scanned >= MAX_SCAN {
                self.next = Some(crate::domain::hex(k));
                return true;
            }
            return false;
        };
        decisions.truncate(before);
        while let Some(d) = decisions.pop() {
            self.scanned += 1;
            if self.filter.matches(&d) {
                self.out.push(d);
            }
            if self.out.len() == self.limit || self.scanned >= MAX_SCAN {
                self.next = Some(cursor(k, decisions.len()));
                return true;
            }
        }
        false
    }

    fn into_page(self) -> Page {
        Page {
            decisions: self.out,
            next: self.next,
            scanned: self.scanned,
        }
    }
}

/// Decisions to a page at most (the count must fit the key's last byte).
const PAGE_MAX: usize = 32;

/// Most bytes a stored page may take; `store::PAGE_BYTES` says why.
const PAGE_BYTES: usize = crate::store::PAGE_BYTES;

/// Most bytes a page may claim to hold uncompressed, checked before allocating them.
const PAGE_RAW_MAX: usize = 64 << 20;

/// The version byte of an uncompressed page of decisions (written before format 4).
const FORMAT_PAGE: u8 = 3;

/// The version byte of a compressed page: then the MessagePack array's length (u32,
/// little-endian) and the array as an LZ4 block.
const FORMAT_PAGE_LZ4: u8 = 4;

/// Bytes before a compressed page's block.
const LZ4_HEADER: usize = 5;

/// The store's page key ([`Store::page_key`]), then the page's count (1 byte), so the
/// count is known from the key alone.
const PAGE_KEY_LEN: usize = crate::store::PAGE_KEY_LEN + 1;

fn page_key(store: &Store, at_ms: u64, count: usize) -> Result<Vec<u8>, DecisionLogError> {
    let mut k = store.page_key(at_ms)?;
    // PAGE_MAX fits a byte.
    k.push(u8::try_from(count).unwrap_or(u8::MAX));
    Ok(k)
}

fn is_page_key(k: &[u8]) -> bool {
    k.len() == PAGE_KEY_LEN && k.get(8) == Some(&crate::store::PAGE_MARK)
}

/// Decisions an entry holds, read from its key alone.
fn entry_count(k: &[u8]) -> u64 {
    match k.get(PAGE_KEY_LEN - 1) {
        Some(&n) if is_page_key(k) => u64::from(n),
        _ => 1,
    }
}

/// Where a query that stopped at entry `k`, with `before` of its decisions still to come,
/// goes on: a page's key and that number, or (a single decision) the key, below which
/// the next page starts.
fn cursor(k: &[u8], before: usize) -> String {
    if !is_page_key(k) {
        return crate::domain::hex(k);
    }
    let mut c = k.to_vec();
    c.extend_from_slice(&u16::try_from(before).unwrap_or(u16::MAX).to_be_bytes());
    crate::domain::hex(&c)
}

/// A page cursor's key and how many of its decisions are still to come.
fn split_page_cursor(c: &[u8]) -> Option<(&[u8], usize)> {
    let (k, before) = c.split_at_checked(PAGE_KEY_LEN)?;
    let before: [u8; 2] = before.try_into().ok()?;
    is_page_key(k).then_some((k, usize::from(u16::from_be_bytes(before))))
}

fn encode_page(page: &[&DecisionRecord]) -> Result<Vec<u8>, DecisionLogError> {
    let raw = rmp_serde::to_vec_named(page)?;
    let raw_len = u32::try_from(raw.len())
        .ok()
        .filter(|&n| n as usize <= PAGE_RAW_MAX)
        .ok_or(DecisionLogError::PageTooLarge(raw.len()))?;
    let mut out =
        crate::store::lz4::compress(LZ4_HEADER, &raw).map_err(DecisionLogError::Compress)?;
    out[0] = FORMAT_PAGE_LZ4;
    out[1..LZ4_HEADER].copy_from_slice(&raw_len.to_le_bytes());
    Ok(out)
}

fn decode_page(bytes: &[u8]) -> Result<Vec<DecisionRecord>, DecisionLogError> {
    let corrupt = |why: String| DecisionLogError::Decode(why);
    match bytes.split_first() {
        Some((&FORMAT_PAGE_LZ4, rest)) => {
            let (len, block) = rest
                .split_first_chunk::<4>()
                .ok_or_else(|| corrupt("a compressed page ends in its header".into()))?;
            let len = u32::from_le_bytes(*len) as usize;
            if len > PAGE_RAW_MAX {
                return Err(corrupt(format!(
                    "a compressed page claims {len} bytes, over the {PAGE_RAW_MAX} a page may hold"
                )));
            }
            let raw = crate::store::lz4::decompress(block, len)
                .map_err(|e| corrupt(format!("a compressed page {e}")))?;
            rmp_serde::from_slice(&raw).map_err(|e| corrupt(e.to_string()))
        }
        Some((&FORMAT_PAGE, body)) => {
            rmp_serde::from_slice(body).map_err(|e| corrupt(e.to_string()))
        }
        _ => Err(corrupt(
            "a page of decisions does not start with format 3 or 4".into(),
        )),
    }
}

/// The decisions of one entry of the log, oldest first.
fn decode_entry(k: &[u8], v: &[u8]) -> Result<Vec<DecisionRecord>, DecisionLogError> {
    if is_page_key(k) {
        decode_page(v)
    } else {
        decode(v).map(|d| vec![d])
    }
}

/// The version byte of a format-2 value.
const FORMAT_V2: u8 = 2;

fn encode(d: &DecisionRecord) -> Result<Vec<u8>, DecisionLogError> {
    let mut out = Vec::with_capacity(1024);
    out.push(FORMAT_V2);
    let mut ser = rmp_serde::Serializer::new(&mut out).with_struct_map();
    d.serialize(&mut ser)?;
    Ok(out)
}

/// A stored decision in either format.
fn decode(bytes: &[u8]) -> Result<DecisionRecord, DecisionLogError> {
    match bytes.split_first() {
        Some((b'{', _)) => {
            serde_json::from_slice(bytes).map_err(|e| DecisionLogError::Decode(e.to_string()))
        }
        Some((&FORMAT_V2, body)) => {
            rmp_serde::from_slice(body).map_err(|e| DecisionLogError::Decode(e.to_string()))
        }
        Some((other, _)) => Err(DecisionLogError::Decode(format!(
            "format {other} is not one this commander reads"
        ))),
        None => Err(DecisionLogError::Decode("empty value".into())),
    }
}

fn key(at_ms: u64, task_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + task_id.len());
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(task_id.as_bytes());
    k
}

/// A cursor's bytes: hex, and no longer than a key can be.
fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() > 600 {
        return None;
    }
    crate::domain::unhex(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{Answer, Source};

    fn rec(task: &str, at_ms: u64, pool: &str, rule: &str) -> DecisionRecord {
        DecisionRecord {
            id: format!("d-{task}"),
            task_id: task.into(),
            at_ms,
            at: String::new(),
            outcome: Outcome::Dispatched,
            pool: Some(pool.into()),
            model: Some("gpt-4o-mini".into()),
            worker: None,
            rule: rule.into(),
            reason: format!("{rule} reason"),
            task_type: "summarisation".into(),
            tier: "simple".into(),
            est_cost_usd: Some(0.001),
            priority: 5,
            classification: Classification {
                answer: Answer {
                    task_type: "summarisation".into(),
                    tier: "simple".into(),
                    capabilities: vec![],
                    input_tokens: 10,
                    output_tokens: 10,
                    confidence: 0.9,
                },
                source: Source::Fallback,
                reason: String::new(),
                fallback_cause: Some("no_endpoint".into()),
                model: None,
                cost_usd: None,
                attempts: 0,
                latency_ms: 0,
            },
            candidates: vec![],
            rubric: "default".into(),
            policy_version: None,
            generation: None,
            inputs: Default::default(),
            trace_id: None,
        }
    }

    #[test]
    fn query_filters_paginates_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = DecisionLog::open(&store).unwrap();
        let record = |d: DecisionRecord| {
            log.record(&d).unwrap();
            store
                .update(
                    &d.task_id,
                    || crate::store::TaskRecord::new(&d.task_id, 1),
                    |r| r.decision_at_ms = Some(d.at_ms),
                )
                .unwrap();
        };
        for i in 1..25u64 {
            let pool = if i % 2 == 0 { "docs" } else { "code" };
            record(rec(&format!("t{i}"), 1_000 + i, pool, "cost_tier"));
        }
        record(rec("t0", 2_000, "general", "default_pool"));
        assert_eq!(log.len(), 25);
        assert!(log.get("t-none").unwrap().is_none());
        assert_eq!(
            log.get("t0").unwrap().unwrap().pool.as_deref(),
            Some("general")
        );

        let mut f = Filter {
            pool: Some("docs".into()),
            limit: Some(5),
            ..Default::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = log.query(&f).unwrap();
            seen.extend(page.decisions.iter().map(|d| d.task_id.clone()));
            match page.next {
                Some(n) => f.cursor = Some(n),
                None => break,
            }
        }
        // t0 moved to `general`; the other even tasks, newest first.
        let want: Vec<String> = (1..=12).rev().map(|i| format!("t{}", i * 2)).collect();
        assert_eq!(seen, want);

        let page = log
            .query(&Filter {
                rule: Some("default_pool".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(page.decisions.len(), 1);
        assert!(
            log.query(&Filter {
                cursor: Some("zz".into()),
                ..Default::default()
            })
            .is_err()
        );

        // Time range.
        let page = log
            .query(&Filter {
                since_ms: Some(1_010),
                until_ms: Some(1_015),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(page.decisions.len(), 5);

        // Retention by age, then by count.
        let cutoff = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_010);
        assert_eq!(log.prune(cutoff, 1_000, 10_000).unwrap(), 9); // t1..t9
        assert!(log.get("t5").unwrap().is_none());
        assert_eq!(log.prune(cutoff, 10, 10_000).unwrap(), 6);
        assert_eq!(log.len(), 10);
        assert!(log.get("t0").unwrap().is_some(), "the newest survive");
    }

    /// A batch's decisions go in pages (per millisecond, at most `PAGE_MAX` each): every
    /// one is found by its task, counted, listed newest first across page boundaries by a
    /// cursor, filtered, kept over a reopen, ranged and pruned page by page.
    #[test]
    fn a_batch_is_written_in_pages_and_read_as_single_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let mut batch = Vec::new();
        for i in 0..100u64 {
            // 40 decisions at 1,000 ms, 50 at 1,001 (two pages), 10 at 1,002, out of order.
            let at = match i % 10 {
                0..=3 => 1_000,
                4..=8 => 1_001,
                _ => 1_002,
            };
            let pool = if i % 3 == 0 { "docs" } else { "code" };
            batch.push(rec(&format!("p{i}"), at, pool, "cost_tier"));
        }
        let mut newest_first: Vec<&DecisionRecord> = batch.iter().collect();
        newest_first.sort_by_key(|d| d.at_ms);
        newest_first.reverse();
        {
            let store = Store::open(dir.path()).unwrap();
            let log = DecisionLog::open(&store).unwrap();
            log.record_many(&batch).unwrap();
            for d in &batch {
                store
                    .update(
                        &d.task_id,
                        || crate::store::TaskRecord::new(&d.task_id, 1),
                        |r| r.decision_at_ms = Some(d.at_ms),
                    )
                    .unwrap();
            }
            // One decision written alone keeps its own key.
            log.record(&rec("single", 999, "docs", "retarget")).unwrap();
            assert_eq!(log.len(), 101);
            assert_eq!(
                log.by_time.len(),
                6,
                "pages of 32 + 8, 32 + 18 and 10, and one single decision"
            );
            futures::executor::block_on(store.flush()).unwrap();
        }
        let store = Store::reopen(dir.path());
        let log = DecisionLog::open(&store).unwrap();
        assert_eq!(log.len(), 101, "counted from the keys again");
        for d in &batch {
            assert_eq!(log.get(&d.task_id).unwrap().as_ref(), Some(d));
        }

        let walk = |mut f: Filter| {
            let mut seen = Vec::new();
            loop {
                let page = log.query(&f).unwrap();
                assert!(page.decisions.len() <= f.limit.unwrap_or(100));
                seen.extend(page.decisions.into_iter().map(|d| d.task_id));
                match page.next {
                    Some(n) => f.cursor = Some(n),
                    None => return seen,
                }
            }
        };
        let mut want: Vec<String> = newest_first.iter().map(|d| d.task_id.clone()).collect();
        want.push("single".into());
        let all = walk(Filter {
            limit: Some(7),
            ..Default::default()
        });
        assert_eq!(all, want, "every decision once, newest first");
        let docs = walk(Filter {
            pool: Some("docs".into()),
            limit: Some(4),
            ..Default::default()
        });
        let want_docs: Vec<String> = newest_first
            .iter()
            .filter(|d| d.pool.as_deref() == Some("docs"))
            .map(|d| d.task_id.clone())
            .chain(["single".to_string()])
            .collect();
        assert_eq!(docs, want_docs);
        let one_ms = log
            .query(&Filter {
                since_ms: Some(1_001),
                until_ms: Some(1_002),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(one_ms.decisions.len(), 50);
        assert!(
            log.query(&Filter {
                since_ms: Some(1_002),
                until_ms: Some(1_000),
                ..Default::default()
            })
            .unwrap()
            .decisions
            .is_empty(),
            "an empty range is an empty answer"
        );
        assert_eq!(log.range(1_000, 1_002, 1_000).unwrap().len(), 90);
        assert_eq!(log.range(0, u64::MAX, 45).unwrap().len(), 45);

        // Age: the single decision and the 40 at 1,000 ms; pages go whole.
        let cutoff = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_001);
        assert_eq!(log.prune(cutoff, 1_000, 10_000).unwrap(), 41);
        assert_eq!(log.len(), 60);
        assert!(log.get("p0").unwrap().is_none());
        // Count: the oldest page of 1,001 ms (32) goes to get under 40.
        assert_eq!(log.prune(cutoff, 40, 10_000).unwrap(), 32);
        assert_eq!(log.len(), 28);
        assert_eq!(log.range(0, u64::MAX, 1_000).unwrap().len(), 28);
    }

    #[test]
    fn a_page_cursor_is_checked_and_survives_its_page_going() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = DecisionLog::open(&store).unwrap();
        let batch: Vec<DecisionRecord> = (0..10u64)
            .map(|i| rec(&format!("c{i}"), 2_000 + i / 5, "docs", "cost_tier"))
            .collect();
        log.record_many(&batch).unwrap();
        let first = log
            .query(&Filter {
                limit: Some(3),
                ..Default::default()
            })
            .unwrap();
        let ids: Vec<&str> = first.decisions.iter().map(|d| d.task_id.as_str()).collect();
        assert_eq!(ids, ["c9", "c8", "c7"]);
        let next = first.next.unwrap();
        // The older page (2,000 ms) goes: the walk ends with the cursor's own page.
        let cutoff = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(5_000);
        assert_eq!(log.prune(cutoff, 1_000, 1).unwrap(), 5, "a page goes whole");
        let rest = log
            .query(&Filter {
                cursor: Some(next.clone()),
                ..Default::default()
            })
            .unwrap();
        let ids: Vec<&str> = rest.decisions.iter().map(|d| d.task_id.as_str()).collect();
        assert_eq!(ids, ["c6", "c5"]);
        // Then the cursor's page goes too: an empty answer, not an error.
        assert_eq!(log.prune(cutoff, 1_000, 1).unwrap(), 5);
        let rest = log
            .query(&Filter {
                cursor: Some(next.clone()),
                ..Default::default()
            })
            .unwrap();
        assert!(rest.decisions.is_empty() && rest.next.is_none());
        let garbage = format!("{}ff", &next[..next.len() - 2]);
        assert!(
            log.query(&Filter {
                cursor: Some(garbage),
                ..Default::default()
            })
            .is_ok(),
            "a cursor's count past its page reads what the page has"
        );
    }

    /// Format 2 keeps every field (the flattened answer, candidates with and without
    /// scores); a log written in format 1 (JSON) reads back whole, and its count is known.
    #[test]
    fn pages_are_compressed_split_to_fit_a_leaf_and_format_3_pages_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = DecisionLog::open(&store).unwrap();
        let tree = store.tree("decisions").unwrap();
        let values = || -> Vec<(Vec<u8>, sled::IVec)> {
            tree.iter()
                .map(|e| e.unwrap())
                .map(|(k, v)| (k.to_vec(), v))
                .collect()
        };

        // Alike decisions compress: one page of 32, well under its raw size.
        let alike: Vec<_> = (0..32)
            .map(|i| rec(&format!("a-{i}"), 1_000, "docs", "cost_tier"))
            .collect();
        log.record_many(&alike).unwrap();
        let stored = values();
        assert_eq!(stored.len(), 1);
        let raw = rmp_serde::to_vec_named(&alike.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(stored[0].1[0], FORMAT_PAGE_LZ4);
        assert!(
            stored[0].1.len() * 3 < raw.len(),
            "{} bytes stored for {} raw",
            stored[0].1.len(),
            raw.len()
        );

        // Decisions that do not compress (2 KB of random reasons each) are split into
        // pages that each fit PAGE_BYTES, so a leaf of them stays inline in sled.
        let noisy: Vec<_> = (0..32)
            .map(|i| {
                let mut d = rec(&format!("n-{i:02}"), 2_000, "code", "cost_tier");
                d.reason = (0..128)
                    .map(|_| format!("{:016x}", rand::random::<u64>()))
                    .collect();
                d
            })
            .collect();
        log.record_many(&noisy).unwrap();
        let stored: Vec<_> = values().into_iter().skip(1).collect();
        assert!(stored.len() > 4, "split into {} entries", stored.len());
        assert!(
            stored
                .iter()
                .all(|(k, v)| v.len() <= PAGE_BYTES || !is_page_key(k))
        );
        let counted: u64 = stored.iter().map(|(k, _)| entry_count(k)).sum();
        assert_eq!(counted, 32);
        assert_eq!(
            log.range(2_000, 2_001, 100).unwrap(),
            noisy,
            "in order, each once"
        );

        // A page written before compression (format 3) reads as before.
        let old: Vec<_> = (0..5)
            .map(|i| rec(&format!("o-{i}"), 500, "docs", "requested"))
            .collect();
        let mut v3 = vec![FORMAT_PAGE];
        v3.extend(rmp_serde::to_vec_named(&old.iter().collect::<Vec<_>>()).unwrap());
        tree.insert(page_key(&store, 500, old.len()).unwrap(), v3)
            .unwrap();
        futures::executor::block_on(store.flush()).unwrap();
        drop((log, tree, store));
        let store = Store::reopen(dir.path());
        let log = DecisionLog::open(&store).unwrap();
        assert_eq!(log.len(), 69);
        assert_eq!(log.range(0, 1_000, 100).unwrap(), old);
        let all = log.range(0, u64::MAX, 1_000).unwrap();
        assert_eq!(all.len(), 69);

        // A damaged page is an error, never a huge allocation or a panic.
        let mut huge = vec![FORMAT_PAGE_LZ4];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 16]);
        assert!(decode_page(&huge).is_err());
        assert!(decode_page(&[FORMAT_PAGE_LZ4, 1, 0]).is_err());
        let mut cut = encode_page(&alike.iter().collect::<Vec<_>>()).unwrap();
        cut.truncate(cut.len() / 2);
        assert!(decode_page(&cut).is_err());
    }

    #[test]
    fn format_2_round_trips_and_a_json_log_still_reads() {
        let mut d = rec("t-full", 5_000, "docs", "cost_tier");
        d.classification.answer.capabilities = vec!["code".into(), "long_context".into()];
        d.classification.model = Some("gpt-4o-mini".into());
        d.policy_version = Some("v".repeat(64));
        d.inputs.requested_pool = Some("docs".into());
        d.candidates = vec![
            crate::route::Candidate {
                pool: "docs".into(),
                model: "gpt-4o-mini".into(),
                tier: "simple".into(),
                est_cost_usd: Some(0.002),
                load: Some(0.5),
                score: Some(1.25),
                code: "chosen".into(),
                reason: "cheapest".into(),
            },
            crate::route::Candidate {
                pool: "code".into(),
                model: "o3".into(),
                tier: "frontier".into(),
                est_cost_usd: None,
                load: None,
                score: None,
                code: "tier_mismatch".into(),
                reason: "not this tier".into(),
            },
        ];
        let v2 = encode(&d).unwrap();
        let json = serde_json::to_vec(&d).unwrap();
        assert_eq!(decode(&v2).unwrap(), d);
        assert_eq!(decode(&json).unwrap(), d);
        assert!(v2.len() < json.len(), "{} vs {}", v2.len(), json.len());
        assert!(decode(&[7, 1]).is_err() && decode(&[]).is_err());

        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let tree = store.tree("decisions").unwrap();
            tree.insert(key(d.at_ms, &d.task_id), json).unwrap();
            futures::executor::block_on(store.flush()).unwrap();
        }
        let store = Store::reopen(dir.path());
        let log = DecisionLog::open(&store).unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log.range(0, u64::MAX, 10).unwrap(), vec![d.clone()]);
        log.record(&rec("t-new", 6_000, "code", "cost_tier"))
            .unwrap();
        assert_eq!(log.len(), 2);
        let page = log.query(&Filter::default()).unwrap();
        let ids: Vec<&str> = page.decisions.iter().map(|d| d.task_id.as_str()).collect();
        assert_eq!(ids, ["t-new", "t-full"]);
        assert_eq!(
            log.prune(SystemTime::UNIX_EPOCH, 1, 100).unwrap(),
            1,
            "the count bound drops the oldest"
        );
        assert_eq!(log.len(), 1);
    }
}
