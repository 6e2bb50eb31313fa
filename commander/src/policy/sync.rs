//! Where policies come from, and how every replica ends up on the same one.
//!
//! Every change — an edit in the policy directory, a push on `<prefix>.policy.push`, a
//! `PUT /v1/policy` — is validated first; a refused one changes nothing and is logged,
//! shown on the API and audited. An accepted one is written to the JetStream key-value
//! bucket `<prefix>_policy` (key `active`) with compare-and-set on the revision the
//! replica has in force, so changes are linear; its revision is the version (`v<rev>`).
//! The replica that accepted it swaps it in at once; the others follow the bucket's watch.
//! On 2.9 servers the bucket's stream is created by hand (STANDARDS B.3).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::load::{self, Document};
use super::{PolicyEngine, PolicyError, Source};

/// The key in the bucket that holds the policy in force.
pub const ACTIVE_KEY: &str = "active";
/// Revisions of the policy the bucket keeps.
const HISTORY: i64 = 64;

/// What the bucket stores.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stored {
    pub documents: Vec<Document>,
    pub source: Source,
    pub identity: String,
    pub sha256: String,
    /// sha256 of the policy directory as last applied, carried across pushes, so a
    /// restart re-applies the directory only when its files changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_sha: Option<String>,
    pub at: String,
}

/// The bucket's name for a subject prefix.
pub fn bucket_name(prefix: &str) -> String {
    format!("{}_policy", prefix.replace('.', "_"))
}

/// Opens the policy bucket, creating its stream when missing (works on 2.9.10, where
/// `create_key_value` fails client-side).
pub async fn open_bucket(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<kv::Store, PolicyError> {
    crate::broker::open_kv(
        js,
        crate::broker::KvBucket {
            name: bucket,
            description: "fleet commander: the policy in force",
            history: HISTORY,
            replicas,
            max_age: std::time::Duration::ZERO,
        },
    )
    .await
    .map_err(PolicyError::Bucket)
}

/// The policy sources of one replica.
#[derive(Debug)]
pub struct PolicySync {
    pub engine: Arc<PolicyEngine>,
    kv: kv::Store,
    dir: Option<PathBuf>,
    files_sha: Mutex<Option<String>>,
    /// What of the directory was last judged (applied, found in force, or refused): its
    /// bundle's sha, or why it could not be read; empty when it must be tried again. Kept
    /// here, not in the watch loop, so a restarted loop does not judge the same files again
    /// (and so replace a pushed policy with them).
    judged: Mutex<String>,
    /// The newest bucket revision this replica has handled, applied or refused. A refused
    /// one is not in force, but it is the revision the next write must follow.
    seen: AtomicU64,
}

impl PolicySync {
    /// Converges on the bucket's policy, then applies the directory if its files changed
    /// since they were last applied. A bad directory at start is an error when there is
    /// no policy in the bucket to run on; otherwise it is refused like any bad edit.
    pub async fn start(
        engine: Arc<PolicyEngine>,
        kv: kv::Store,
        dir: Option<PathBuf>,
    ) -> Result<Arc<Self>, PolicyError> {
        let me = Arc::new(Self {
            engine,
            kv,
            dir,
            files_sha: Mutex::new(None),
            judged: Mutex::default(),
            seen: AtomicU64::new(0),
        });
        if let Some(entry) = me
            .kv
            .entry(ACTIVE_KEY)
            .await
            .map_err(|e| PolicyError::Bucket(e.to_string()))?
        {
            me.follow(entry).await;
        }
        if me.engine.live().revision == 0 && me.seen() > 0 {
            // The stored policy could not be built here: run on the last one that was.
            me.restore_last_good().await;
        }
        if let Some(dir) = me.dir.clone() {
            let docs = load::read_dir(&dir)?;
            let sha = load::bundle_sha(&docs);
            let seen = me.files_sha.lock().ok().and_then(|s| s.clone());
            let mut judged = true;
            if seen.as_deref() != Some(sha.as_str()) {
                let identity = identity_of_dir(&dir);
                if me.engine.live().revision == 0 {
                    // Nothing to fall back on: a broken directory refuses to start.
                    me.engine.parse(docs.clone())?;
                    me.propose(docs, Source::File, &identity).await?;
                } else if let Err(e) = me.propose(docs, Source::File, &identity).await {
                    // The bucket's policy stays in force; the refusal is logged and audited.
                    tracing::error!(error = %e, "policy directory not applied at start");
                    judged = matches!(e, PolicyError::Invalid(_));
                }
            }
            if judged {
                me.set_judged(sha);
            }
        }
        Ok(me)
    }

    /// Validates and, when valid and different, writes `docs` as the new policy and
    /// swaps it in. Returns the version in force afterwards.
    pub async fn propose(
        &self,
        docs: Vec<Document>,
        source: Source,
        identity: &str,
    ) -> Result<String, PolicyError> {
        let policy = match self.engine.parse(docs.clone()) {
            Ok(p) => p,
            Err(e) => {
                self.engine
                    .refuse(docs, source, identity, e.problems())
                    .await;
                return Err(e);
            }
        };
        for _attempt in 0..5 {
            let live = self.engine.live();
            let last_revision = live.revision.max(self.seen());
            if policy.sha256 == live.policy.sha256 && live.revision != 0 {
                if source == Source::File {
                    self.set_files_sha(Some(policy.sha256.clone()));
                }
                return Ok(live.policy.version.clone());
            }
            let files_sha = if source == Source::File {
                Some(policy.sha256.clone())
            } else {
                self.files_sha.lock().ok().and_then(|s| s.clone())
            };
            let now = self.engine.now_ms();
            let stored = Stored {
                documents: policy.documents.clone(),
                source,
                identity: identity.to_string(),
                sha256: policy.sha256.clone(),
                files_sha: files_sha.clone(),
                at: super::budget::rfc3339(now),
            };
            let body = Bytes::from(
                serde_json::to_vec(&stored).map_err(|e| PolicyError::Bucket(e.to_string()))?,
            );
            let written = if last_revision == 0 {
                self.kv.create(ACTIVE_KEY, body).await.map_err(|e| {
                    matches!(e.kind(), kv::CreateErrorKind::AlreadyExists)
                        .then_some(())
                        .ok_or_else(|| e.to_string())
                })
            } else {
                self.kv
                    .update(ACTIVE_KEY, body, last_revision)
                    .await
                    .map_err(|e| {
                        matches!(e.kind(), kv::UpdateErrorKind::WrongLastRevision)
                            .then_some(())
                            .ok_or_else(|| e.to_string())
                    })
            };
            match written {
                Ok(rev) => {
                    // Every replica, this one included, applies it from the bucket's watch
                    // (one path, one audit record); if the watch lags, apply it here.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                    while self.engine.live().revision < rev
                        && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    if self.engine.live().revision < rev {
                        self.apply(stored, rev).await;
                    }
                    return Ok(format!("v{rev}"));
                }
                // Another replica wrote first: follow it, then try again on top of it.
                Err(Ok(())) => {
                    if let Ok(Some(entry)) = self.kv.entry(ACTIVE_KEY).await {
                        self.follow(entry).await;
                    }
                }
                Err(Err(e)) => return Err(PolicyError::Bucket(e)),
            }
        }
        Err(PolicyError::Bucket(
            "the policy bucket kept changing under this write; try again".into(),
        ))
    }

    fn set_judged(&self, what: String) {
        if let Ok(mut j) = self.judged.lock() {
            *j = what;
        }
    }

    fn set_files_sha(&self, sha: Option<String>) {
        if let Ok(mut s) = self.files_sha.lock() {
            *s = sha;
        }
    }

    fn seen(&self) -> u64 {
        self.seen.load(Ordering::SeqCst)
    }

    /// Applies a bucket entry (written by this replica, another one, or before a restart),
    /// once: an entry refused here is not looked at again.
    async fn follow(&self, entry: kv::Entry) {
        if !matches!(entry.operation, kv::Operation::Put) {
            return;
        }
        if entry.revision <= self.engine.live().revision.max(self.seen()) {
            return;
        }
        self.seen.fetch_max(entry.revision, Ordering::SeqCst);
        match serde_json::from_slice::<Stored>(&entry.value) {
            Ok(stored) => self.apply(stored, entry.revision).await,
            Err(e) => {
                let version = format!("v{}", entry.revision);
                self.engine
                    .refuse_attempt(super::Refusal {
                        documents: Vec::new(),
                        source: Source::Builtin,
                        identity: "policy bucket".into(),
                        remote: None,
                        errors: vec![format!("stored policy {version} does not decode: {e}")],
                        refused_version: Some(version),
                    })
                    .await;
            }
        }
    }

    /// Swaps in the newest earlier version in the bucket's history that builds, when the
    /// bucket's own cannot be built (say, written by an older commander that let a bad
    /// rate through): the commander starts on the last good one instead of crash-looping.
    /// The bucket keeps the last 64 revisions.
    async fn restore_last_good(&self) {
        let mut history = match self.kv.history(ACTIVE_KEY).await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the policy bucket's history for the last good policy");
                return;
            }
        };
        let mut earlier = Vec::new();
        while let Some(entry) = history.next().await {
            match entry {
                Ok(e) if e.revision < self.seen() && matches!(e.operation, kv::Operation::Put) => {
                    earlier.push(e)
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "policy bucket history read stopped early");
                    break;
                }
            }
        }
        for entry in earlier.into_iter().rev() {
            let version = format!("v{}", entry.revision);
            let Ok(stored) = serde_json::from_slice::<Stored>(&entry.value) else {
                continue;
            };
            match self.engine.parse_and_swap(
                stored.documents.clone(),
                entry.revision,
                stored.source,
                &stored.identity,
            ) {
                Ok(swapped) => {
                    self.set_files_sha(stored.files_sha.clone());
                    if swapped {
                        tracing::warn!(
                            version,
                            refused = format!("v{}", self.seen()),
                            "stored policy refused; running on the last good version"
                        );
                    }
                    return;
                }
                Err(e) => tracing::warn!(
                    version,
                    errors = %e.problems().join(" | "),
                    "an earlier policy does not build either"
                ),
            }
        }
        tracing::warn!(
            "stored policy refused and no earlier version builds; running on the built-in policy"
        );
    }

    /// Validates a stored policy again (pools, registry and rubric are this replica's) and
    /// swaps it in as `revision`; the replica whose swap wins writes the audit record.
    async fn apply(&self, stored: Stored, revision: u64) {
        self.seen.fetch_max(revision, Ordering::SeqCst);
        let live = self.engine.live();
        if revision <= live.revision {
            return;
        }
        match self.engine.parse_and_swap(
            stored.documents.clone(),
            revision,
            stored.source,
            &stored.identity,
        ) {
            Ok(swapped) => {
                self.set_files_sha(stored.files_sha.clone());
                if swapped {
                    self.engine
                        .record_applied(&live.policy, stored.source, &stored.identity)
                        .await;
                }
            }
            Err(e) => {
                // Valid where it was written (other pools or registry there), or written by
                // a commander that validated less: keep ours, and say which version.
                self.engine
                    .refuse_attempt(super::Refusal {
                        documents: stored.documents,
                        source: stored.source,
                        identity: stored.identity,
                        remote: None,
                        errors: e.problems(),
                        refused_version: Some(format!("v{revision}")),
                    })
                    .await;
            }
        }
    }

    /// Follows the bucket until shutdown.
    pub async fn watch_bucket(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let mut w = match self.kv.watch(ACTIVE_KEY).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the policy bucket; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.changed() => return,
                    }
                }
            };
            loop {
                tokio::select! {
                    e = w.next() => match e {
                        Some(Ok(entry)) => self.follow(entry).await,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "policy bucket watch error");
                        }
                        None => break,
                    },
                    _ = stop.changed() => return,
                }
            }
            // The watch ended (server restart): catch up, then watch again.
            if let Ok(Some(entry)) = self.kv.entry(ACTIVE_KEY).await {
                self.follow(entry).await;
            }
        }
    }

    /// Re-reads the policy directory after every change (debounced) and every `rescan`,
    /// until shutdown; proposes its files whenever they differ from those last judged.
    pub async fn watch_dir(self: Arc<Self>, rescan: Duration, mut stop: watch::Receiver<bool>) {
        let Some(dir) = self.dir.clone() else { return };
        let mut watch = crate::hot::DirWatch::new(&dir, rescan);
        // The same content is judged once, however many events or rescans see it.
        let judged = |what: &str| self.judged.lock().is_ok_and(|j| *j == what);
        loop {
            tokio::select! {
                // Editors write in several steps: wait for the burst to end.
                () = watch.changed(Duration::from_millis(100)) => {}
                _ = stop.changed() => return,
            }
            let identity = identity_of_dir(&dir);
            match read_stable(&dir).await {
                Ok(docs) => {
                    let sha = load::bundle_sha(&docs);
                    if judged(&sha) {
                        continue;
                    }
                    match self.propose(docs, Source::File, &identity).await {
                        // Refused (and audited) is judged too.
                        Ok(_) | Err(PolicyError::Invalid(_)) => self.set_judged(sha),
                        Err(e) => tracing::error!(
                            error = %e,
                            "policy directory change not confirmed by the policy bucket; tried again at the next rescan (a write that timed out may still land when NATS is back)"
                        ),
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    if judged(&why) {
                        continue;
                    }
                    self.set_judged(why);
                    self.engine
                        .refuse(Vec::new(), Source::File, &identity, e.problems())
                        .await
                }
            }
        }
    }

    /// Answers `<prefix>.policy.push` requests (one replica per request: queue group).
    /// The body is one policy document (TOML); headers: `Fleet-Identity` (who),
    /// `Fleet-Policy-Name` (the document's name), `Authorization: Bearer <token>` when a
    /// compliance token is configured. The reply is JSON: `{"accepted":true,"version":…}`
    /// or `{"accepted":false,"errors":[…]}`.
    pub async fn serve_push(
        self: Arc<Self>,
        client: async_nats::Client,
        subject: String,
        token: Option<String>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut sub = match client
            .queue_subscribe(subject.clone(), "commander".into())
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, subject, "cannot serve policy pushes");
                return;
            }
        };
        loop {
            let msg = tokio::select! {
                m = sub.next() => match m { Some(m) => m, None => return },
                _ = stop.changed() => return,
            };
            let Some(reply) = msg.reply.clone() else {
                tracing::warn!("policy push without a reply subject ignored (use request/reply)");
                continue;
            };
            let h = msg.headers.as_ref();
            let get = |name: &str| fleet_worker::protocol::header(h, name).map(str::to_string);
            let identity = get("Fleet-Identity").unwrap_or_else(|| "nats".into());
            let answer = match check_token(token.as_deref(), get("Authorization").as_deref()) {
                Err(why) => {
                    self.engine
                        .refuse_unauthorised(Source::Nats, &identity, None, why.clone())
                        .await;
                    serde_json::json!({ "accepted": false, "errors": [why] })
                }
                Ok(()) => match std::str::from_utf8(&msg.payload) {
                    Err(_) => {
                        serde_json::json!({ "accepted": false, "errors": ["the policy is not UTF-8 text"] })
                    }
                    Ok(text) => {
                        let name = get("Fleet-Policy-Name")
                            .filter(|n| !n.is_empty() && n.len() <= 200)
                            .unwrap_or_else(|| "pushed.policy.toml".into());
                        let doc = Document {
                            name,
                            text: text.to_string(),
                        };
                        match self.propose(vec![doc], Source::Nats, &identity).await {
                            Ok(v) => serde_json::json!({ "accepted": true, "version": v }),
                            Err(e) => {
                                serde_json::json!({ "accepted": false, "errors": e.problems() })
                            }
                        }
                    }
                },
            };
            let body = Bytes::from(answer.to_string());
            if let Err(e) = client.publish(reply, body).await {
                tracing::warn!(error = %e, "policy push reply not sent");
            }
        }
    }
}

/// Reads the directory until two reads 50 ms apart agree, so a file caught between its
/// truncation and its new content (a writer that does not rename into place) is not
/// taken for an empty policy.
async fn read_stable(dir: &Path) -> Result<Vec<Document>, PolicyError> {
    let mut docs = load::read_dir(dir)?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let again = load::read_dir(dir)?;
        if again == docs {
            return Ok(docs);
        }
        docs = again;
    }
    Ok(docs)
}

/// Checks a bearer token against the configured compliance token.
pub fn check_token(expected: Option<&str>, authorization: Option<&str>) -> Result<(), String> {
    let Some(expected) = expected.filter(|t| !t.is_empty()) else {
        return Err("policy pushes are disabled: no compliance token is configured (policy.compliance_token_env)".into());
    };
    let given = authorization
        .and_then(|a| {
            a.strip_prefix("Bearer ")
                .or_else(|| a.strip_prefix("bearer "))
        })
        .map(str::trim);
    match given {
        None => Err("missing compliance token (Authorization: Bearer …)".into()),
        Some(t) if crate::domain::constant_time_eq(t.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err("wrong compliance token".into()),
    }
}

fn identity_of_dir(dir: &Path) -> String {
    format!("files in {}", dir.display())
}
