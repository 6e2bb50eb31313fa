//! The audit trail: every policy change attempt, accepted or not, in sled (tree
//! `policy_audit`, keyed by a sequence number), with the documents, their sha256, where
//! the attempt came from, who made it, and a diff summary against the policy it would
//! replace. Bounded by count; the newest records are kept.

use serde::{Deserialize, Serialize};

use super::load::Document;
use crate::store::{Store, StoreError};

/// Where a policy, or a change to a source it is checked against, came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The built-in policy (no directory configured, nothing in the bucket).
    Builtin,
    /// The policy directory (at start or on an edit).
    File,
    /// `fleet.policy.push`.
    Nats,
    /// `PUT /v1/policy`.
    Http,
    /// An edit of the model registry file (checked against the rubric and the policy).
    Registry,
    /// An edit of the routing rubric file (checked against the registry, pools, policy).
    Rubric,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Builtin => "builtin",
            Source::File => "file",
            Source::Nats => "nats",
            Source::Http => "http",
            Source::Registry => "registry",
            Source::Rubric => "rubric",
        }
    }
}

/// One attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    /// The version it became (accepted) or none (rejected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The version in force when the attempt was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// A stored version this replica refused: a bucket entry it could not build (written
    /// by an older commander, or valid only against another replica's pools and models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_version: Option<String>,
    /// Where an HTTP attempt came from (the peer's address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    pub sha256: String,
    pub source: Source,
    /// Who: the pusher's identity, the file names, or the replica.
    pub identity: String,
    pub at: String,
    pub at_ms: u64,
    pub accepted: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// What would change (accepted: what changed), for people.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diff: Vec<String>,
    /// The documents as submitted (left out of list responses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub documents: Vec<Document>,
}

#[derive(Clone, Debug)]
pub struct AuditLog {
    tree: sled::Tree,
    db: Store,
    max_records: usize,
}

impl AuditLog {
    pub fn open(store: &Store, max_records: usize) -> Result<Self, StoreError> {
        Ok(Self {
            tree: store.tree("policy_audit")?,
            db: store.clone(),
            max_records: max_records.max(1),
        })
    }

    /// Appends a record (its `seq` is assigned here), durably, and prunes the oldest past
    /// the bound.
    pub async fn append(&self, mut rec: AuditRecord) -> Result<AuditRecord, StoreError> {
        let last = self
            .tree
            .last()?
            .and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        rec.seq = last + 1;
        let bytes = serde_json::to_vec(&rec).map_err(|e| StoreError::Corrupt {
            id: format!("audit {}", rec.seq),
            reason: e.to_string(),
        })?;
        self.tree.insert(rec.seq.to_be_bytes(), bytes)?;
        while self.tree.len() > self.max_records {
            if self.tree.pop_min()?.is_none() {
                break;
            }
        }
        self.db.flush().await?;
        Ok(rec)
    }

    /// Newest first, at most `limit`, before `before` (a seq) when given.
    pub fn list(&self, limit: usize, before: Option<u64>) -> Result<Vec<AuditRecord>, StoreError> {
        let end = before.unwrap_or(u64::MAX).to_be_bytes();
        let mut out = Vec::new();
        for item in self.tree.range(..end.as_slice()).rev().take(limit) {
            let (_, v) = item?;
            if let Ok(r) = serde_json::from_slice::<AuditRecord>(&v) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// The accepted record of a version (`v12`), newest first if several replicas applied it.
    pub fn version(&self, version: &str) -> Result<Option<AuditRecord>, StoreError> {
        for item in self.tree.iter().rev() {
            let (_, v) = item?;
            if let Ok(r) = serde_json::from_slice::<AuditRecord>(&v)
                && r.version.as_deref() == Some(version)
            {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }
}
