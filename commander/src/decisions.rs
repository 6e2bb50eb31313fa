//! The decision log: every routing decision (and every rejection) with the classification
//! and every candidate, kept in the store's log beside the task records, with bounded
//! retention.
//!
//! A batch's decisions are written as pages of the store's log ([`crate::store::log`]):
//! the decisions made in one millisecond, up to [`PAGE_MAX`] to a page, under the key
//! (`at_ms`, a number the log never hands out twice). A page costs one append to the
//! log's buffer, made durable by the same sync as the batch's task records; retention
//! drops the oldest pages, and the log deletes a segment once nothing in it is kept. A
//! task's record keeps its decision's `at_ms`, which finds the decision by task id among
//! that millisecond's pages, without a second index to write for every task.
//!
//! A page's bytes are format 5: byte `5`, the length of a JSON array of records, then the
//! array as an LZ4 block. Each record in it is the JSON that `<prefix>.decisions.<pool>`
//! publishes, encoded once ([`to_json`]) for both. The log keeps names, unlike the task
//! record's positional format, because decisions gain fields more often and a
//! self-describing record reads old and new alike. Format 4 (the same, with a MessagePack
//! array of named records) was written until December 2026 and is still read.
//!
//! Until December 2026 the log was the sled tree `decisions`; opening moves what it holds
//! into the store's log as it is stored (see [`DecisionLog::open`]) and drops the tree.
//! Its values are read as pages too: format 3 (byte `3`, then the array uncompressed), and
//! single decisions in format 2 (byte `2`, then one record) or format 1 (JSON, starting
//! with `{`).

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::classify::Classification;
use crate::route::Candidate;
use crate::store::log::{PageKey, PageLoc};
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
    /// Decided again after a restart, for the record only: the task had been dispatched
    /// and had finished before its dispatch was recorded (docs/rubrics.md). The decision
    /// that sent it was lost; this one is what the router decided when the task came back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
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
    pub source: Option<crate::classify::Source>,
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
    /// A page's size when `limit` is not given, and the most it may be.
    pub const DEFAULT_LIMIT: usize = 100;
    pub const MAX_LIMIT: usize = 500;

    fn matches(&self, d: &DecisionRecord) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| Some(w) == have)
        };
        eq(&self.pool, d.pool.as_deref())
            && eq(&self.model, d.model.as_deref())
            && eq(&self.task_type, Some(&d.task_type))
            && eq(&self.rule, Some(&d.rule))
            && self.source.is_none_or(|s| s == d.classification.source)
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
    Encode(#[from] serde_json::Error),
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

/// Pages a walk takes from the log's index at a time.
const WALK_CHUNK: usize = 64;

#[derive(Clone, Debug)]
pub struct DecisionLog {
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
    /// Opens the log in `store`, moving in the sled tree of the layout before December
    /// 2026 if there is one.
    pub fn open(store: &Store) -> Result<Self, DecisionLogError> {
        move_out_of_sled(store)?;
        Ok(Self {
            store: store.clone(),
            events: None,
        })
    }

    /// Announces every decision recorded from now on to `hub`.
    pub fn with_events(mut self, hub: crate::events::Hub) -> Self {
        self.events = Some(hub);
        self
    }

    /// Writes one decision (made durable by the store's next flush) and announces it.
    pub fn record(&self, d: &DecisionRecord) -> Result<(), DecisionLogError> {
        let json = to_json(d)?;
        self.write_many([(d, &json[..])])?;
        self.announce([d]);
        Ok(())
    }

    /// Writes many decisions, in pages of those made in the same millisecond (see the
    /// module's doc). The caller records each decision's `at_ms` on its task record
    /// afterwards: the log is written in order, so a task record that names a decision
    /// is never durable without it. Announcing them ([`DecisionLog::announce`]) waits for
    /// those records, so a reader of the event finds the decision by its task.
    ///
    /// Each item is a decision and its JSON ([`to_json`]), which the page holds as it is.
    pub fn write_many<'a>(
        &self,
        items: impl IntoIterator<Item = (&'a DecisionRecord, &'a [u8])>,
    ) -> Result<(), DecisionLogError> {
        let mut by_time: Vec<(&DecisionRecord, &[u8])> = items.into_iter().collect();
        by_time.sort_by_key(|(d, _)| d.at_ms);
        for same_ms in by_time.chunk_by(|(a, _), (b, _)| a.at_ms == b.at_ms) {
            for page in same_ms.chunks(PAGE_MAX) {
                self.append_pages(page)?;
            }
        }
        Ok(())
    }

    /// Announces decisions written to the log as `decision` events of `/v1/stream`.
    pub fn announce<'a>(&self, items: impl IntoIterator<Item = &'a DecisionRecord>) {
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
    }

    /// Appends `page` (decisions of one millisecond) as one page, or, when it compresses
    /// to more than [`PAGE_BYTES`], as two halves (and so on).
    fn append_pages(&self, page: &[(&DecisionRecord, &[u8])]) -> Result<(), DecisionLogError> {
        let Some((first, _)) = page.first() else {
            return Ok(());
        };
        let value = encode_page(page)?;
        if value.len() > PAGE_BYTES && page.len() > 1 {
            let (older, newer) = page.split_at(page.len() / 2);
            self.append_pages(older)?;
            return self.append_pages(newer);
        }
        // At most PAGE_MAX decisions: fits u16.
        let count = u16::try_from(page.len()).unwrap_or(u16::MAX);
        self.store
            .log()
            .append_page(first.at_ms, count, false, &value)?;
        Ok(())
    }

    /// The decision for a task, found through the task record's `decision_at_ms` among
    /// the pages of that millisecond.
    pub fn get(&self, task_id: &str) -> Result<Option<DecisionRecord>, DecisionLogError> {
        let Some(at_ms) = self.store.get(task_id)?.and_then(|r| r.decision_at_ms) else {
            return Ok(None);
        };
        let log = self.store.log();
        let that_ms = log.pages_between(
            PageKey::first_at(at_ms),
            PageKey {
                at_ms,
                seq: u64::MAX,
            },
            false,
            usize::MAX,
        );
        let mut found = None;
        for (_, loc) in that_ms {
            // The last one: a task decided twice in one millisecond keeps the later. A
            // page that does not read or decode is passed over, as a query passes it.
            if let Ok(page) = read_page(log, loc) {
                found = page.into_iter().rfind(|d| d.task_id == task_id).or(found);
            }
        }
        Ok(found)
    }

    /// Newest first, filtered, paginated. A cursor is the key of the page the last answer
    /// stopped in, with how many of that page's decisions are still to come.
    pub fn query(&self, f: &Filter) -> Result<Page, DecisionLogError> {
        let limit = f
            .limit
            .unwrap_or(Filter::DEFAULT_LIMIT)
            .clamp(1, Filter::MAX_LIMIT);
        let lower = PageKey::first_at(f.since_ms.unwrap_or(0));
        let mut upper = PageKey::first_at(f.until_ms.unwrap_or(u64::MAX));
        let mut resume = None;
        if let Some(c) = &f.cursor {
            let (key, before) =
                parse_cursor(c).ok_or_else(|| DecisionLogError::BadCursor(c.clone()))?;
            upper = key;
            resume = Some((key, before));
        }
        let log = self.store.log();
        let mut scan = Scan {
            log,
            filter: f,
            limit,
            out: Vec::with_capacity(limit),
            scanned: 0,
            next: None,
        };
        if let Some((key, before)) = resume
            && key >= lower
            && let Some(loc) = log.page(key)
            && scan.page(key, loc, before)
        {
            return Ok(scan.into_page());
        }
        loop {
            let chunk = log.pages_between(lower, upper, true, WALK_CHUNK);
            let Some(&(oldest, _)) = chunk.last() else {
                break;
            };
            for (key, loc) in chunk {
                if scan.page(key, loc, usize::MAX) {
                    return Ok(scan.into_page());
                }
            }
            upper = oldest;
        }
        Ok(scan.into_page())
    }

    /// Decisions made in [`since_ms`, `until_ms`), oldest first, at most `max`, collected:
    /// for tests. The commander walks a span ([`DecisionLog::walk_range`]) instead of
    /// holding it.
    #[cfg(test)]
    pub fn range(
        &self,
        since_ms: u64,
        until_ms: u64,
        max: usize,
    ) -> Result<Vec<DecisionRecord>, DecisionLogError> {
        let mut out = Vec::new();
        self.walk_range(since_ms, until_ms, max, |d| out.push(d))?;
        Ok(out)
    }

    /// Hands `visit` the decisions made in [`since_ms`, `until_ms`), oldest first, at
    /// most `max`, and returns how many. It holds one page at a time: a replay of a busy
    /// day would hold about 4 KiB per decision if it were collected first. A page that
    /// does not read or decode is passed over, as a query passes it.
    pub fn walk_range(
        &self,
        since_ms: u64,
        until_ms: u64,
        max: usize,
        mut visit: impl FnMut(DecisionRecord),
    ) -> Result<usize, DecisionLogError> {
        let log = self.store.log();
        let mut visited = 0;
        let mut lower = PageKey::first_at(since_ms);
        let upper = PageKey::first_at(until_ms);
        while visited < max {
            let chunk = log.pages_between(lower, upper, false, WALK_CHUNK);
            let Some(&(newest, _)) = chunk.last() else {
                break;
            };
            for (_, loc) in chunk {
                for d in read_page(log, loc).unwrap_or_default() {
                    if visited == max {
                        return Ok(visited);
                    }
                    visit(d);
                    visited += 1;
                }
            }
            lower = PageKey {
                at_ms: newest.at_ms,
                seq: newest.seq.saturating_add(1),
            };
        }
        Ok(visited)
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
        // Oldest first, through the log's time index: nothing newer is ever read.
        Ok(self.store.log().drop_pages(limit, |key, kept| {
            key.at_ms < cutoff_ms || kept > max_records
        })?)
    }

    /// Records in the log (kept, not counted: constant time).
    pub fn len(&self) -> u64 {
        self.store.log().page_entries()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Moves the sled tree of the layout before December 2026 into the store's log, each
/// value as it is stored (a page, or a single decision as a page of one), then drops the
/// tree. Idempotent: until the tree is gone, pages moved in by an earlier try (cut short
/// by a crash) are dropped first and the whole tree is moved again.
fn move_out_of_sled(store: &Store) -> Result<(), DecisionLogError> {
    if !store.has_tree(SLED_TREE) {
        return Ok(());
    }
    let log = store.log();
    let stale = log.drop_moved_pages()?;
    let mut moved = 0u64;
    for entry in store.tree(SLED_TREE)?.iter() {
        let (k, v) = entry?;
        let Some(at_ms) = k.first_chunk::<8>().map(|b| u64::from_be_bytes(*b)) else {
            tracing::warn!(key = %crate::domain::hex(&k), "a decision log key that is not one; dropped");
            continue;
        };
        let count = sled_entry_count(&k);
        log.append_page(at_ms, count, true, &v)?;
        moved += u64::from(count);
    }
    // Durable in the log before the tree goes.
    log.sync()?;
    store.drop_tree(SLED_TREE)?;
    tracing::info!(
        moved,
        stale_pages = stale,
        "decisions moved from sled to the store's log (the layout before December 2026)"
    );
    Ok(())
}

/// One newest-first walk of [`DecisionLog::query`]: what matched so far and where it
/// stopped.
struct Scan<'a> {
    log: &'a crate::store::log::TaskLog,
    filter: &'a Filter,
    limit: usize,
    out: Vec<DecisionRecord>,
    scanned: usize,
    next: Option<String>,
}

impl Scan<'_> {
    /// Looks at one page's decisions, newest first (its first `before` only); `true` when
    /// the answer is full or the scan bound is reached.
    fn page(&mut self, key: PageKey, loc: PageLoc, before: usize) -> bool {
        let Ok(mut decisions) = read_page(self.log, loc) else {
            // Unreadable (or gone since the index was read): counted against the bound,
            // and skipped.
            self.scanned += 1;
            if self.scanned >= MAX_SCAN {
                self.next = Some(cursor(key, 0));
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
                self.next = Some(cursor(key, decisions.len()));
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

/// Decisions to a page at most.
const PAGE_MAX: usize = 32;

/// Most bytes a page may take compressed (a larger one is split): reading one decision
/// reads its whole page.
const PAGE_BYTES: usize = 64 << 10;

/// Most bytes a page may claim to hold uncompressed, checked before allocating them.
const PAGE_RAW_MAX: usize = 64 << 20;

/// The version byte of an uncompressed page of decisions (written before format 4).
const FORMAT_PAGE: u8 = 3;

/// The version byte of a compressed page written before December 2026: then the length
/// of a MessagePack array of named records (u32, little-endian) and the array as an LZ4
/// block.
const FORMAT_PAGE_LZ4: u8 = 4;

/// The version byte of a compressed page: then the length of a JSON array of records
/// (u32, little-endian) and the array as an LZ4 block.
const FORMAT_PAGE_JSON_LZ4: u8 = 5;

/// Room for a typical decision's JSON (a few candidates, each with its reason), so
/// encoding one does not grow its buffer by doubling.
const TYPICAL_JSON_BYTES: usize = 3072;

/// Bytes before a compressed page's block.
const LZ4_HEADER: usize = 5;

/// Where a query that stopped in the page at `key`, with `before` of its decisions still
/// to come, goes on: `at_ms`, `seq` (big-endian) and `before` (u16), in hex.
fn cursor(key: PageKey, before: usize) -> String {
    let mut c = Vec::with_capacity(CURSOR_LEN);
    c.extend_from_slice(&key.at_ms.to_be_bytes());
    c.extend_from_slice(&key.seq.to_be_bytes());
    c.extend_from_slice(&u16::try_from(before).unwrap_or(u16::MAX).to_be_bytes());
    crate::domain::hex(&c)
}

/// Bytes of a cursor.
const CURSOR_LEN: usize = 18;

/// A cursor's page and how many of its decisions are still to come.
fn parse_cursor(c: &str) -> Option<(PageKey, usize)> {
    if c.len() != 2 * CURSOR_LEN {
        return None;
    }
    let bytes = crate::domain::unhex(c)?;
    let (at_ms, rest) = bytes.split_first_chunk::<8>()?;
    let (seq, before) = rest.split_first_chunk::<8>()?;
    let before: [u8; 2] = before.try_into().ok()?;
    Some((
        PageKey {
            at_ms: u64::from_be_bytes(*at_ms),
            seq: u64::from_be_bytes(*seq),
        },
        usize::from(u16::from_be_bytes(before)),
    ))
}

/// A decision as JSON: what a page of the log holds and `<prefix>.decisions.<pool>`
/// publishes (the shape of `GET /v1/decisions/{task_id}`).
pub fn to_json(d: &DecisionRecord) -> Result<bytes::Bytes, DecisionLogError> {
    let mut out = Vec::with_capacity(TYPICAL_JSON_BYTES);
    serde_json::to_writer(&mut out, d)?;
    Ok(bytes::Bytes::from(out))
}

/// A page in format 5 from its decisions' JSON: the array is written around them, so no
/// record is encoded again.
fn encode_page(page: &[(&DecisionRecord, &[u8])]) -> Result<Vec<u8>, DecisionLogError> {
    let len = page.iter().map(|(_, j)| j.len() + 1).sum::<usize>() + 1;
    let mut raw = Vec::with_capacity(len);
    raw.push(b'[');
    for (i, (_, json)) in page.iter().enumerate() {
        if i > 0 {
            raw.push(b',');
        }
        raw.extend_from_slice(json);
    }
    raw.push(b']');
    compress_page(FORMAT_PAGE_JSON_LZ4, &raw)
}

/// A compressed page (formats 4 and 5) holding the array `raw`: its format byte, the
/// array's length, then the array as an LZ4 block. [`decompress_page`] reads it back.
fn compress_page(format: u8, raw: &[u8]) -> Result<Vec<u8>, DecisionLogError> {
    let raw_len = u32::try_from(raw.len())
        .ok()
        .filter(|&n| n as usize <= PAGE_RAW_MAX)
        .ok_or(DecisionLogError::PageTooLarge(raw.len()))?;
    let mut out =
        crate::store::lz4::compress(LZ4_HEADER, raw).map_err(DecisionLogError::Compress)?;
    out[0] = format;
    out[1..LZ4_HEADER].copy_from_slice(&raw_len.to_le_bytes());
    Ok(out)
}

/// The decisions of the page at `loc`, read from the log and decoded.
fn read_page(
    log: &crate::store::log::TaskLog,
    loc: PageLoc,
) -> Result<Vec<DecisionRecord>, DecisionLogError> {
    decode_page(&log.read_page(loc)?)
}

/// The decisions of a page, oldest first, in any format the log has held.
fn decode_page(bytes: &[u8]) -> Result<Vec<DecisionRecord>, DecisionLogError> {
    let corrupt = |why: String| DecisionLogError::Decode(why);
    match bytes.split_first() {
        Some((&FORMAT_PAGE_JSON_LZ4, rest)) => {
            serde_json::from_slice(&decompress_page(rest)?).map_err(|e| corrupt(e.to_string()))
        }
        Some((&FORMAT_PAGE_LZ4, rest)) => {
            rmp_serde::from_slice(&decompress_page(rest)?).map_err(|e| corrupt(e.to_string()))
        }
        Some((&FORMAT_PAGE, body)) => {
            rmp_serde::from_slice(body).map_err(|e| corrupt(e.to_string()))
        }
        Some((&FORMAT_V2, body)) => rmp_serde::from_slice(body)
            .map(|d| vec![d])
            .map_err(|e| corrupt(e.to_string())),
        Some((b'{', _)) => serde_json::from_slice(bytes)
            .map(|d| vec![d])
            .map_err(|e| corrupt(e.to_string())),
        Some((other, _)) => Err(corrupt(format!(
            "format {other} is not one this commander reads"
        ))),
        None => Err(corrupt("an empty page".into())),
    }
}

/// The array a compressed page holds (formats 4 and 5), from what follows its format
/// byte: the array's length, checked before it is allocated, then the LZ4 block.
fn decompress_page(rest: &[u8]) -> Result<Vec<u8>, DecisionLogError> {
    let corrupt = |why: String| DecisionLogError::Decode(why);
    let (len, block) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| corrupt("a compressed page ends in its header".into()))?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > PAGE_RAW_MAX {
        return Err(corrupt(format!(
            "a compressed page claims {len} bytes, over the {PAGE_RAW_MAX} a page may hold"
        )));
    }
    crate::store::lz4::decompress(block, len).map_err(|e| corrupt(format!("a compressed page {e}")))
}

/// The version byte of a single decision in the sled tree (before pages).
const FORMAT_V2: u8 = 2;

/// The sled tree the log was until December 2026.
const SLED_TREE: &str = "decisions";

/// Bytes of a page's key in [`SLED_TREE`]: `at_ms` (8, big-endian), a zero byte, a unique
/// id (8), the page's count (1). A single decision's key was `at_ms ++ task id`, and a
/// task id never starts with the zero byte.
const SLED_PAGE_KEY_LEN: usize = 18;

/// Decisions an entry of [`SLED_TREE`] holds, read from its key alone.
fn sled_entry_count(k: &[u8]) -> u16 {
    match (k.len(), k.get(8), k.last()) {
        (SLED_PAGE_KEY_LEN, Some(0), Some(&n)) => u16::from(n),
        _ => 1,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::classify::{Answer, Source};

    /// Gives `d`'s task a record that keeps its decision's time, as dispatch does.
    fn point_task_at(store: &Store, d: &DecisionRecord) {
        store
            .update(
                &d.task_id,
                || crate::store::TaskRecord::new(&d.task_id, 1),
                |r| r.decision_at_ms = Some(d.at_ms),
            )
            .unwrap();
    }

    /// Writes `batch` as the task path does: each decision's JSON encoded once, then logged.
    fn write(log: &DecisionLog, batch: &[DecisionRecord]) {
        let json: Vec<_> = batch.iter().map(|d| to_json(d).unwrap()).collect();
        log.write_many(batch.iter().zip(json.iter().map(|j| &j[..])))
            .unwrap();
    }

    /// A page as format 4 wrote it (before December 2026): a MessagePack array of named
    /// records, LZ4-compressed.
    fn format_4_page(page: &[DecisionRecord]) -> Vec<u8> {
        compress_page(FORMAT_PAGE_LZ4, &rmp_serde::to_vec_named(page).unwrap()).unwrap()
    }

    pub(crate) fn rec(task: &str, at_ms: u64, pool: &str, rule: &str) -> DecisionRecord {
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
            recovered: false,
        }
    }

    #[test]
    fn query_filters_paginates_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = DecisionLog::open(&store).unwrap();
        let record = |d: DecisionRecord| {
            log.record(&d).unwrap();
            point_task_at(&store, &d);
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
            write(&log, &batch);
            for d in &batch {
                point_task_at(&store, d);
            }
            // One decision written alone keeps its own key.
            log.record(&rec("single", 999, "docs", "retarget")).unwrap();
            assert_eq!(log.len(), 101);
            assert_eq!(
                all_pages(&store).len(),
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
        let mut walked = Vec::new();
        let n = log
            .walk_range(0, u64::MAX, 45, |d| walked.push(d.at_ms))
            .unwrap();
        assert_eq!((n, walked.len()), (45, 45), "stops at max, mid-page");
        assert!(walked.is_sorted(), "oldest first: {walked:?}");

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
        write(&log, &batch);
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

    fn all_pages(store: &Store) -> Vec<(PageKey, PageLoc)> {
        store.log().pages_between(
            PageKey::first_at(0),
            PageKey::first_at(u64::MAX),
            false,
            usize::MAX,
        )
    }

    /// Alike decisions compress well; decisions that do not are split into pages under
    /// `PAGE_BYTES`, read back in order, each once; a damaged page is an error, never a
    /// huge allocation or a panic.
    #[test]
    fn pages_are_compressed_and_split_to_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = DecisionLog::open(&store).unwrap();

        let alike: Vec<_> = (0..32)
            .map(|i| rec(&format!("a-{i}"), 1_000, "docs", "cost_tier"))
            .collect();
        write(&log, &alike);
        let pages = all_pages(&store);
        assert_eq!(pages.len(), 1);
        let stored = store.log().read_page(pages[0].1).unwrap();
        let raw = serde_json::to_vec(&alike).unwrap();
        assert_eq!(stored[0], FORMAT_PAGE_JSON_LZ4);
        assert!(
            stored.len() * 3 < raw.len(),
            "{} bytes stored for {} raw",
            stored.len(),
            raw.len()
        );

        // 8 KB of random reasons each: 256 KB that does not compress.
        let noisy: Vec<_> = (0..32)
            .map(|i| {
                let mut d = rec(&format!("n-{i:02}"), 2_000, "code", "cost_tier");
                d.reason = (0..512)
                    .map(|_| format!("{:016x}", rand::random::<u64>()))
                    .collect();
                d
            })
            .collect();
        write(&log, &noisy);
        let pages: Vec<_> = all_pages(&store).into_iter().skip(1).collect();
        assert!(pages.len() >= 4, "split into {} pages", pages.len());
        for (_, loc) in &pages {
            assert!(store.log().read_page(*loc).unwrap().len() <= PAGE_BYTES);
        }
        assert_eq!(
            pages.iter().map(|(_, l)| u64::from(l.count)).sum::<u64>(),
            32
        );
        assert_eq!(
            log.range(2_000, 2_001, 100).unwrap(),
            noisy,
            "in order, each once"
        );
        assert_eq!(log.len(), 64);

        for format in [FORMAT_PAGE_JSON_LZ4, FORMAT_PAGE_LZ4] {
            let mut huge = vec![format];
            huge.extend_from_slice(&u32::MAX.to_le_bytes());
            huge.extend_from_slice(&[0; 16]);
            assert!(decode_page(&huge).is_err());
            assert!(decode_page(&[format, 1, 0]).is_err());
        }
        let json: Vec<_> = alike.iter().map(|d| to_json(d).unwrap()).collect();
        let page: Vec<_> = alike.iter().zip(json.iter().map(|j| &j[..])).collect();
        for mut cut in [encode_page(&page).unwrap(), format_4_page(&alike)] {
            cut.truncate(cut.len() / 2);
            assert!(decode_page(&cut).is_err());
        }
        assert!(decode_page(&[7, 1]).is_err() && decode_page(&[]).is_err());
    }

    /// A log written before December 2026 holds format-4 pages: each still reads, beside
    /// the format-5 pages written after it, by task, by query and by range.
    #[test]
    fn format_4_pages_read_beside_format_5_pages() {
        let dir = tempfile::tempdir().unwrap();
        let old: Vec<_> = (0..6)
            .map(|i| rec(&format!("old-{i}"), 3_000, "docs", "cost_tier"))
            .collect();
        let new: Vec<_> = (0..6)
            .map(|i| rec(&format!("new-{i}"), 3_001, "code", "cost_tier"))
            .collect();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .log()
                .append_page(3_000, old.len() as u16, false, &format_4_page(&old))
                .unwrap();
            for d in &old {
                point_task_at(&store, d);
            }
            futures::executor::block_on(store.flush()).unwrap();
        }
        let store = Store::reopen(dir.path());
        let log = DecisionLog::open(&store).unwrap();
        write(&log, &new);
        for d in &new {
            point_task_at(&store, d);
        }
        let formats: Vec<u8> = all_pages(&store)
            .iter()
            .map(|(_, loc)| store.log().read_page(*loc).unwrap()[0])
            .collect();
        assert_eq!(formats, [FORMAT_PAGE_LZ4, FORMAT_PAGE_JSON_LZ4]);
        for d in old.iter().chain(&new) {
            assert_eq!(log.get(&d.task_id).unwrap().as_ref(), Some(d));
        }
        let all: Vec<_> = old.iter().chain(&new).cloned().collect();
        assert_eq!(log.range(0, u64::MAX, 100).unwrap(), all);
        let docs = log
            .query(&Filter {
                pool: Some("docs".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(docs.decisions.len(), old.len());
    }

    /// A decision log in the sled tree of the layout before December 2026, with values in
    /// every format it held (JSON and format-2 single decisions, format-3 and format-4
    /// pages), is moved into the store's log at open: every record reads back whole, by
    /// task, by query and by range, and the tree is gone. A move cut short by a crash is
    /// done again without duplicates.
    #[test]
    fn a_sled_decision_log_of_every_format_moves_to_the_store_log() {
        let mut full = rec("t-full", 5_000, "docs", "cost_tier");
        full.classification.answer.capabilities = vec!["code".into(), "long_context".into()];
        full.classification.model = Some("gpt-4o-mini".into());
        full.policy_version = Some("v".repeat(64));
        full.inputs.requested_pool = Some("docs".into());
        full.candidates = vec![
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
        let json = rec("t-json", 4_000, "code", "requested");
        let v3: Vec<_> = (0..5)
            .map(|i| rec(&format!("v3-{i}"), 6_000, "docs", "cost_tier"))
            .collect();
        let v4: Vec<_> = (0..7)
            .map(|i| rec(&format!("v4-{i}"), 6_000, "code", "cost_tier"))
            .collect();
        let sled_page_key = |at_ms: u64, unique: u64, count: usize| {
            let mut k = at_ms.to_be_bytes().to_vec();
            k.push(0);
            k.extend_from_slice(&unique.to_be_bytes());
            k.push(count as u8);
            k
        };
        let single_key = |d: &DecisionRecord| {
            let mut k = d.at_ms.to_be_bytes().to_vec();
            k.extend_from_slice(d.task_id.as_bytes());
            k
        };
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let tree = store.tree(SLED_TREE).unwrap();
            tree.insert(single_key(&json), serde_json::to_vec(&json).unwrap())
                .unwrap();
            let mut v2 = vec![FORMAT_V2];
            v2.extend(rmp_serde::to_vec_named(&full).unwrap());
            tree.insert(single_key(&full), v2).unwrap();
            let mut page3 = vec![FORMAT_PAGE];
            page3.extend(rmp_serde::to_vec_named(&v3.iter().collect::<Vec<_>>()).unwrap());
            tree.insert(sled_page_key(6_000, 1, v3.len()), page3)
                .unwrap();
            tree.insert(sled_page_key(6_000, 2, v4.len()), format_4_page(&v4))
                .unwrap();
            for d in [&json, &full].into_iter().chain(&v3).chain(&v4) {
                point_task_at(&store, d);
            }
            // A move cut short: part of the tree already in the log, the tree still there.
            store
                .log()
                .append_page(6_000, v4.len() as u16, true, &format_4_page(&v4))
                .unwrap();
            futures::executor::block_on(store.flush()).unwrap();
        }
        let want: Vec<DecisionRecord> = [json.clone(), full.clone()]
            .into_iter()
            .chain(v3.iter().cloned())
            .chain(v4.iter().cloned())
            .collect();
        let check = |log: &DecisionLog, want: &[DecisionRecord]| {
            assert_eq!(log.len(), want.len() as u64, "each once");
            assert_eq!(log.range(0, u64::MAX, 100).unwrap(), want);
            for d in want {
                assert_eq!(log.get(&d.task_id).unwrap().as_ref(), Some(d));
            }
            let page = log.query(&Filter::default()).unwrap();
            let ids: Vec<&str> = page.decisions.iter().map(|d| d.task_id.as_str()).collect();
            let newest_first: Vec<&str> = want.iter().rev().map(|d| d.task_id.as_str()).collect();
            assert_eq!(ids, newest_first);
        };
        {
            let store = Store::reopen(dir.path());
            let log = DecisionLog::open(&store).unwrap();
            assert!(!store.has_tree(SLED_TREE));
            check(&log, &want);
            // Retention drops the oldest (the JSON one) for the count bound.
            assert_eq!(log.prune(SystemTime::UNIX_EPOCH, 13, 100).unwrap(), 1);
            futures::executor::block_on(store.flush()).unwrap();
        }
        let store = Store::reopen(dir.path());
        let log = DecisionLog::open(&store).unwrap();
        assert!(log.get("t-json").unwrap().is_none(), "the drop is durable");
        check(&log, &want[1..]);
    }
}
