//! Silences: an operator's "I know, stop telling me" for the alerts that match, until it
//! expires. A silenced alert still lives (pending, firing, resolved), is stored and
//! counted, and shows in `GET /v1/alerts` with `silenced_by`; it is not published on NATS
//! nor delivered to sinks while the silence is active. Every silence, with who made it,
//! why and who ended it, is kept in sled (bounded): the record of what was muted.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use super::lifecycle::Alert;
use crate::store::{Store, StoreError};

/// Silences kept (active and ended), oldest dropped first.
const MAX_SILENCES: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    pub id: String,
    /// `rule` and label names (`worker`, `pool`) to the value they must have; every one
    /// must match. Empty matches nothing (a silence of everything is refused).
    pub matchers: BTreeMap<String, String>,
    pub author: String,
    pub comment: String,
    pub created_ms: u64,
    pub ends_ms: u64,
    /// Ended by hand before `ends_ms`: when, and by whom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_by: Option<String>,
}

impl Silence {
    pub fn active(&self, now_ms: u64) -> bool {
        self.created_ms <= now_ms && now_ms < self.ends_ms && self.expired_ms.is_none()
    }

    pub fn matches(&self, a: &Alert) -> bool {
        !self.matchers.is_empty()
            && self.matchers.iter().all(|(k, v)| match k.as_str() {
                "rule" => a.rule.as_str() == v,
                "severity" => a.severity.as_str() == v,
                label => a.labels.get(label) == Some(v),
            })
    }
}

/// The silences, in sled and (for the detector's every send) in memory.
#[derive(Clone, Debug)]
pub struct Silences {
    tree: sled::Tree,
    all: Arc<ArcSwap<Vec<Silence>>>,
}

impl Silences {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        let tree = store.tree("silences")?;
        let mut all = Vec::new();
        for item in tree.iter() {
            let (_, v) = item?;
            if let Ok(s) = serde_json::from_slice::<Silence>(&v) {
                all.push(s);
            }
        }
        Ok(Self {
            tree,
            all: Arc::new(ArcSwap::from_pointee(all)),
        })
    }

    /// The active silence that mutes `a` now, if one does.
    pub fn muting(&self, a: &Alert, now_ms: u64) -> Option<String> {
        self.all
            .load()
            .iter()
            .find(|s| s.active(now_ms) && s.matches(a))
            .map(|s| s.id.clone())
    }

    /// Every silence, newest first.
    pub fn list(&self) -> Vec<Silence> {
        let mut v = self.all.load().as_ref().clone();
        v.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(b.id.cmp(&a.id)));
        v
    }

    fn write(&self, s: &Silence) -> Result<(), StoreError> {
        let body = serde_json::to_vec(s).map_err(|e| StoreError::Corrupt {
            id: s.id.clone(),
            reason: e.to_string(),
        })?;
        let mut key = s.created_ms.to_be_bytes().to_vec();
        key.extend_from_slice(s.id.as_bytes());
        self.tree.insert(key, body)?;
        while self.tree.len() > MAX_SILENCES {
            if self.tree.pop_min()?.is_none() {
                break;
            }
        }
        self.tree.flush()?;
        Ok(())
    }

    fn replace(&self, s: Silence) {
        let mut v: Vec<Silence> = self.all.load().as_ref().clone();
        v.retain(|x| x.id != s.id);
        v.push(s);
        if v.len() > MAX_SILENCES {
            v.sort_by_key(|x| x.created_ms);
            let excess = v.len() - MAX_SILENCES;
            v.drain(..excess);
        }
        self.all.store(Arc::new(v));
    }

    /// Stores a new silence.
    pub fn add(&self, s: Silence) -> Result<Silence, StoreError> {
        self.write(&s)?;
        tracing::info!(silence = %s.id, author = %s.author, matchers = ?s.matchers, ends_ms = s.ends_ms, comment = %s.comment, "silence created");
        self.replace(s.clone());
        Ok(s)
    }

    /// Keeps a silence as another replica made or ended it (`detect::shared`).
    pub fn take_on(&self, s: Silence) {
        if let Err(e) = self.write(&s) {
            tracing::error!(silence = %s.id, error = %e, "silence from another replica not stored");
            return;
        }
        tracing::info!(silence = %s.id, author = %s.author, ended_by = s.expired_by.as_deref().unwrap_or(""), "silence taken on from another replica");
        self.replace(s);
    }

    /// Ends a silence now; `None` when there is no such silence.
    pub fn expire(&self, id: &str, by: &str, now_ms: u64) -> Result<Option<Silence>, StoreError> {
        let Some(mut s) = self.all.load().iter().find(|s| s.id == id).cloned() else {
            return Ok(None);
        };
        if s.expired_ms.is_none() {
            s.expired_ms = Some(now_ms);
            s.expired_by = Some(by.to_string());
            self.write(&s)?;
            tracing::info!(silence = %s.id, by, "silence expired");
            self.replace(s.clone());
        }
        Ok(Some(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::lifecycle::AlertState;

    fn alert(rule: &str, worker: &str) -> Alert {
        serde_json::from_value(serde_json::json!({
            "id": format!("{rule}:worker={worker}:1"), "rule": rule, "severity": "critical",
            "labels": {"worker": worker, "pool": "alpha"}, "state": AlertState::Firing,
            "value": 0.97, "threshold": 0.95, "message": "m", "started_ms": 1u64,
            "links": {},
        }))
        .unwrap()
    }

    fn silence(matchers: &[(&str, &str)], ends_ms: u64) -> Silence {
        Silence {
            id: format!("s-{ends_ms}"),
            matchers: matchers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            author: "ops".into(),
            comment: "maintenance".into(),
            created_ms: 1_000,
            ends_ms,
            expired_ms: None,
            expired_by: None,
        }
    }

    #[test]
    fn every_matcher_must_match_and_an_empty_silence_matches_nothing() {
        let a = alert("context_critical", "ctx-2");
        assert!(silence(&[("worker", "ctx-2")], 9_000).matches(&a));
        assert!(silence(&[("rule", "context_critical"), ("pool", "alpha")], 9_000).matches(&a));
        assert!(!silence(&[("rule", "token_loop"), ("worker", "ctx-2")], 9_000).matches(&a));
        assert!(!silence(&[("worker", "ctx-3")], 9_000).matches(&a));
        assert!(!silence(&[], 9_000).matches(&a));
    }

    #[test]
    fn a_silence_lasts_until_it_ends_or_is_expired_and_is_kept_with_who_ended_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = Silences::open(&store).unwrap();
        s.add(silence(&[("worker", "ctx-2")], 9_000)).unwrap();
        let a = alert("context_critical", "ctx-2");
        assert_eq!(s.muting(&a, 5_000).as_deref(), Some("s-9000"));
        assert_eq!(s.muting(&a, 9_000), None, "ended");
        assert_eq!(s.muting(&a, 500), None, "not yet made");
        let ended = s.expire("s-9000", "alice", 6_000).unwrap().unwrap();
        assert_eq!(ended.expired_by.as_deref(), Some("alice"));
        assert_eq!(s.muting(&a, 7_000), None, "expired by hand");
        assert!(s.expire("nope", "alice", 6_000).unwrap().is_none());
        // Kept across a restart, with who ended it.
        drop(s);
        let again = Silences::open(&store).unwrap();
        let list = again.list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].expired_ms, Some(6_000));
        assert_eq!(list[0].author, "ops");
    }
}
