//! The decision log: every routing decision (and every rejection) with the classification
//! and every candidate, in sled next to the task records, with bounded retention.
//!
//! Keys are `at_ms (8 bytes, big-endian) ++ task id`, so a range scan is a time range and
//! the newest come last. A task's record in the store keeps its decision's `at_ms`, which
//! finds the decision by task id without a second index to write for every task.
//!
//! Values are format 2: a version byte (`2`), then the record as MessagePack with field
//! names (`rmp_serde::to_vec_named`), about 60 % of the JSON and cheaper to write and read.
//! The log keeps names, unlike the task record's positional format, because decisions
//! gain fields more often and a self-describing record reads old and new alike. Format 1
//! (JSON, starting with `{`) is still read; it leaves through retention.

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
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(by_time.len() as u64));
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

    /// Writes many decisions in one batch: sled copies a leaf for every write, so one
    /// batch per intake batch is much cheaper than one insert per decision. The caller
    /// records each decision's `at_ms` on its task record.
    pub fn record_many(&self, items: &[DecisionRecord]) -> Result<(), DecisionLogError> {
        let mut batch = sled::Batch::default();
        for d in items {
            batch.insert(key(d.at_ms, &d.task_id), encode(d)?);
        }
        self.by_time.apply_batch(batch)?;
        // A key is a decision's time and task: a task decided again (a redelivery, a
        // release) is decided at a new time, so every insert is a new record.
        self.count
            .fetch_add(items.len() as u64, std::sync::atomic::Ordering::Relaxed);
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

    /// The decision for a task, found through the task record's `decision_at_ms`.
    pub fn get(&self, task_id: &str) -> Result<Option<DecisionRecord>, DecisionLogError> {
        let Some(at_ms) = self.store.get(task_id)?.and_then(|r| r.decision_at_ms) else {
            return Ok(None);
        };
        match self.by_time.get(key(at_ms, task_id))? {
            Some(v) => decode(&v).map(Some),
            None => Ok(None),
        }
    }

    /// Newest first, filtered, paginated.
    pub fn query(&self, f: &Filter) -> Result<Page, DecisionLogError> {
        let limit = f.limit.unwrap_or(100).clamp(1, 500);
        let lower = key(f.since_ms.unwrap_or(0), "");
        let mut upper = key(f.until_ms.unwrap_or(u64::MAX), "");
        if let Some(c) = &f.cursor {
            let bytes = hex_decode(c).ok_or_else(|| DecisionLogError::BadCursor(c.clone()))?;
            if bytes.len() < 8 {
                return Err(DecisionLogError::BadCursor(c.clone()));
            }
            upper = bytes;
        }
        let mut out = Vec::with_capacity(limit);
        let mut scanned = 0;
        let mut next = None;
        for entry in self.by_time.range(lower..upper).rev() {
            let (k, v) = entry?;
            scanned += 1;
            let Ok(d) = decode(&v) else {
                continue;
            };
            if f.matches(&d) {
                out.push(d);
                if out.len() == limit {
                    next = Some(crate::domain::hex(&k));
                    break;
                }
            }
            if scanned >= MAX_SCAN {
                next = Some(crate::domain::hex(&k));
                break;
            }
        }
        Ok(Page {
            decisions: out,
            next,
            scanned,
        })
    }

    /// Decisions made in [`since_ms`, `until_ms`), oldest first, at most `max`.
    pub fn range(
        &self,
        since_ms: u64,
        until_ms: u64,
        max: usize,
    ) -> Result<Vec<DecisionRecord>, DecisionLogError> {
        let mut out = Vec::new();
        for entry in self
            .by_time
            .range(key(since_ms, "")..key(until_ms, ""))
            .take(max)
        {
            let (_, v) = entry?;
            if let Ok(d) = decode(&v) {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Drops decisions older than `cutoff`, then the oldest beyond `max_records`; at most
    /// `limit` per call. Returns how many went.
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
        for entry in self.by_time.iter().keys().take(limit) {
            let k = entry?;
            if k.as_ref() >= end.as_slice() && removed >= over {
                break;
            }
            if self.by_time.remove(&k)?.is_some() {
                self.count
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            removed += 1;
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

    /// Format 2 keeps every field (the flattened answer, candidates with and without
    /// scores); a log written in format 1 (JSON) reads back whole, and its count is known.
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
