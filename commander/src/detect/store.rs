//! Alerts that fired, kept in sled with their transitions: `GET /v1/alerts` reads them.
//! Keys are `started_ms (8 bytes, big-endian) ++ id`, so the newest come last and the
//! oldest leave first when more than `max_records` are kept.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::lifecycle::{Alert, AlertState};
use super::rules::{Rule, Severity};
use crate::store::{Store, StoreError};

#[derive(Clone, Debug)]
pub struct AlertLog {
    tree: sled::Tree,
    max_records: usize,
    count: Arc<AtomicUsize>,
}

/// What `GET /v1/alerts` asks for.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub state: Option<AlertState>,
    pub rule: Option<Rule>,
    pub severity: Option<Severity>,
    pub worker: Option<String>,
    pub pool: Option<String>,
    /// Only alerts that started before this (ms): the next page.
    pub before_ms: Option<u64>,
}

impl Filter {
    pub fn matches(&self, a: &Alert) -> bool {
        self.state.is_none_or(|s| s == a.state)
            && self.rule.is_none_or(|r| r == a.rule)
            && self.severity.is_none_or(|s| s == a.severity)
            && self
                .worker
                .as_ref()
                .is_none_or(|w| a.labels.get("worker") == Some(w))
            && self
                .pool
                .as_ref()
                .is_none_or(|p| a.labels.get("pool") == Some(p))
            && self.before_ms.is_none_or(|b| a.started_ms < b)
    }
}

fn key(a: &Alert) -> Vec<u8> {
    let mut k = a.started_ms.to_be_bytes().to_vec();
    k.extend_from_slice(a.id.as_bytes());
    k
}

impl AlertLog {
    pub fn open(store: &Store, max_records: usize) -> Result<Self, StoreError> {
        let tree = store.tree("alerts")?;
        let count = tree.len();
        Ok(Self {
            tree,
            max_records: max_records.max(1),
            count: Arc::new(AtomicUsize::new(count)),
        })
    }

    /// Writes the alert as it is now (a new one, or a transition of a stored one).
    pub fn record(&self, a: &Alert) -> Result<(), StoreError> {
        let body = serde_json::to_vec(a).map_err(|e| StoreError::Corrupt {
            id: a.id.clone(),
            reason: e.to_string(),
        })?;
        if self.tree.insert(key(a), body)?.is_none() {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        while self.count.load(Ordering::Relaxed) > self.max_records {
            match self.tree.pop_min()? {
                Some(_) => self.count.fetch_sub(1, Ordering::Relaxed),
                None => break,
            };
        }
        Ok(())
    }

    /// The newest stored alerts that match, at most `limit`.
    pub fn list(&self, f: &Filter, limit: usize) -> Result<Vec<Alert>, StoreError> {
        let mut out = Vec::new();
        let upper = f.before_ms.map(|b| b.to_be_bytes().to_vec());
        let iter = match upper {
            Some(u) => self.tree.range(..u),
            None => self.tree.range::<Vec<u8>, _>(..),
        };
        for item in iter.rev() {
            let (_, v) = item?;
            let Ok(a) = serde_json::from_slice::<Alert>(&v) else {
                continue;
            };
            if f.matches(&a) {
                out.push(a);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
