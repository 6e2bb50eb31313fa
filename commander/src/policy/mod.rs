//! Policies that compliance teams change while the fleet runs: budgets (with deferral),
//! throttles, reroutes, alert thresholds, escalation, redaction and sampling.
//!
//! - `schema.rs`: the file format; `load.rs`: parse + validate (every problem at once,
//!   `file:line`), sha256, diff summaries.
//! - `evaluate.rs`: the pure verdict on one task (route, budgets, downgrade, defer, reject).
//! - `budget.rs`: windows and the ledger; `throttle.rs`: governor limiters;
//!   `deferred.rs`: the deferred queue in sled; `audit.rs`: the audit trail in sled.
//! - `ledger_share.rs`: the ledger's cells shared with the other replicas, so a budget
//!   holds for the fleet.
//! - `sync.rs`: where policies come from — the watched directory, `fleet.policy.push`,
//!   `PUT /v1/policy` — and the JetStream key-value bucket every replica follows.
//! - `testcase.rs`: the embedded `[[test]]` runner; `replay.rs`: shadow replay.
//!
//! [`PolicyEngine`] owns the live policy (one `ArcSwap`, swapped whole), the ledger (one
//! mutex, held for microseconds and never across an `.await`), the deferred queue and the
//! audit trail.

pub mod audit;
pub mod budget;
pub mod deferred;
pub mod evaluate;
pub mod ledger_share;
pub mod live;
pub mod load;
pub mod replay;
pub mod schema;
pub mod sync;
pub mod testcase;
pub mod throttle;
pub mod window;

#[cfg(test)]
pub(crate) mod tests;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;

pub use audit::{AuditLog, AuditRecord, Source};
pub use budget::{Ledger, Reservation, TaskDims};
pub use deferred::{Deferrals, DeferredTask, deferred_cursor, parked_cursor};
pub use evaluate::{EvalInput, Verdict, evaluate};
pub use live::{Live, SourceFiles, Start};
pub use load::{CheckAgainst, Document, Policy};

use crate::classify::rubric::Rubric;
use crate::hot::{InForce, SourceFile};
use crate::registry::Registry;
use crate::store::{Store, StoreError};
use throttle::LimiterCache;

/// Everything that can go wrong with policies.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: cannot read: {reason}")]
    Read { path: String, reason: String },
    #[error("{} problem(s):\n{}", .0.len(), .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<crate::domain::Problem>),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("policy bucket: {0}")]
    Bucket(String),
    #[error("not allowed: {0}")]
    Forbidden(String),
}

impl PolicyError {
    /// The problems, one per line, for API answers.
    pub fn problems(&self) -> Vec<String> {
        match self {
            PolicyError::Invalid(p) => crate::domain::render(p),
            other => vec![other.to_string()],
        }
    }
}

pub use crate::domain::{Clock, ManualClock, SystemClock};

/// A refused policy change attempt, for the audit trail.
#[derive(Debug)]
pub struct Refusal {
    pub documents: Vec<Document>,
    pub source: Source,
    pub identity: String,
    /// The peer's address, for HTTP.
    pub remote: Option<String>,
    pub errors: Vec<String>,
    /// The stored bucket version this replica could not build.
    pub refused_version: Option<String>,
}

/// The last refused attempt, for the API.
#[derive(Clone, Debug, Serialize)]
pub struct Rejection {
    pub at: String,
    pub source: Source,
    pub identity: String,
    pub errors: Vec<String>,
}

/// A registry or rubric edit, for the audit trail.
#[derive(Debug, Clone)]
pub struct SourceChange {
    pub source: Source,
    pub file: String,
    pub text: String,
    /// Who: the replica that read the edit.
    pub identity: String,
    /// Empty: accepted.
    pub errors: Vec<String>,
    pub diff: Vec<String>,
}

/// Counters of the policy engine (on `/metrics` with the `fleet_` prefix).
#[derive(Debug, Default)]
pub struct PolicyCounters {
    /// Policies swapped in.
    pub swaps: Counter,
    /// Policy changes refused.
    pub rejected: Counter,
    /// Tasks put in the deferred queue (a re-deferral counts again).
    pub deferred: Counter,
    /// Tasks released from it.
    pub released: Counter,
    /// Intake deliveries a throttle held back (each comes back later).
    pub throttled: Counter,
    /// Tasks a budget rejected.
    pub budget_rejected: Counter,
    /// Intake deliveries handed back for a moment: this replica had taken its part of a
    /// budget's room until the other replicas' spending is seen again.
    pub budget_waits: Counter,
    /// Policy pushes without a valid token (HTTP and NATS).
    pub unauthorised: Counter,
    /// Tasks in the deferred queue now (set at each scrape).
    pub deferred_now: Gauge,
    /// Tasks parked by throttles until their turn now (set at each scrape).
    pub parked_now: Gauge,
    /// Revision of the policy in force (set at each scrape).
    pub revision: Gauge,
}

impl PolicyCounters {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register("policy_swaps", "Policies swapped in", self.swaps.clone());
        r.register(
            "policy_rejected",
            "Policy changes refused",
            self.rejected.clone(),
        );
        r.register(
            "policy_revision",
            "Revision of the policy in force",
            self.revision.clone(),
        );
        r.register(
            "tasks_deferred",
            "Tasks a budget deferred",
            self.deferred.clone(),
        );
        r.register(
            "tasks_released",
            "Deferred tasks released",
            self.released.clone(),
        );
        r.register(
            "deferred_tasks",
            "Tasks in the deferred queue",
            self.deferred_now.clone(),
        );
        r.register(
            "parked_tasks",
            "Tasks a throttle parked until their turn",
            self.parked_now.clone(),
        );
        r.register(
            "tasks_throttled",
            "Intake deliveries a throttle held back",
            self.throttled.clone(),
        );
        r.register(
            "budget_rejections",
            "Tasks a budget rejected",
            self.budget_rejected.clone(),
        );
        r.register(
            "budget_waits",
            "Intake deliveries handed back for a moment: this replica had taken its part of a budget's room until the other replicas' spending is seen again",
            self.budget_waits.clone(),
        );
        r.register(
            "policy_unauthorised",
            "Policy pushes refused for a missing or wrong token",
            self.unauthorised.clone(),
        );
    }
}

/// The one live snapshot (routing table, registry, rubric, policy), the ledger, the
/// deferred queue and the audit trail.
#[derive(Debug)]
pub struct PolicyEngine {
    live: ArcSwap<Live>,
    limiters: LimiterCache,
    /// What the task path decides on. What is durable is the task log's copy, kept
    /// from the records (`store::log`): this one is loaded from it at open.
    ledger: Mutex<Ledger>,
    /// For the log's ledger (pruned with this one).
    store: Store,
    pub deferrals: Deferrals,
    pub audit: AuditLog,
    /// Where the registry and the rubric are re-read from, and the gate of every change.
    pub files: SourceFiles,
    last_rejection: ArcSwap<Option<Rejection>>,
    pub clock: Arc<dyn Clock>,
    pub counters: PolicyCounters,
    /// Wakes the release loop (a swap may have raised a limit).
    pub changed: tokio::sync::Notify,
    /// Soft-threshold alerts already raised: (budget, value, bucket, threshold ‰).
    alerted: Mutex<std::collections::BTreeSet<(String, String, u64, u32)>>,
    /// When an unauthorised push from (source, peer) was last audited.
    unauthorised_seen: Mutex<std::collections::HashMap<String, u64>>,
    /// The operators' emergency cost cap: a fleet budget added to every policy in force
    /// until lifted (kept in sled across restarts).
    cap: Mutex<Option<CostCap>>,
    cap_tree: sled::Tree,
}

/// The budget name of the operators' emergency cost cap.
pub const COST_CAP_BUDGET: &str = "operator_cost_cap";

/// An emergency cost cap as set (`POST /v1/control` `cost_cap`).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct CostCap {
    pub limit_usd: f64,
    /// A rolling window (`1h`) or `hour`, `day`, `month`.
    pub window: String,
    pub set_by: String,
    pub set_at_ms: u64,
}

impl CostCap {
    fn budget(&self) -> Result<load::Budget, String> {
        Ok(load::Budget {
            window: window::Window::parse(&self.window)?,
            spec: schema::BudgetSpec {
                name: COST_CAP_BUDGET.into(),
                scope: schema::Scope::Fleet,
                matches: None,
                window: self.window.clone(),
                limit_usd: self.limit_usd,
                soft: Vec::new(),
                action: schema::LimitAction::Defer,
                min_tier: None,
                then: schema::Fallback::Defer,
            },
            at: crate::domain::Location::file("control plane (cost_cap)"),
        })
    }
}

impl PolicyEngine {
    /// Opens the ledger, deferred queue and audit trail in `store`; starts on `start`.
    pub fn open(
        store: &Store,
        start: Start,
        clock: Arc<dyn Clock>,
        max_deferred: usize,
        audit_records: usize,
    ) -> Result<Arc<Self>, PolicyError> {
        let mut ledger = Ledger::default();
        for (key, cell) in store.log().ledger() {
            ledger.insert(key, cell);
        }
        let limiters = LimiterCache::new(clock.clone());
        let now = clock.now_ms();
        let cap_tree = store.tree("cost_cap")?;
        let cap: Option<CostCap> = cap_tree
            .get(b"cap")
            .map_err(StoreError::from)?
            .and_then(|v| serde_json::from_slice(&v).ok());
        let Start {
            routing,
            registry,
            registry_file,
            rubric,
            rubric_file,
            policy,
        } = start;
        let policy = with_cap(policy, cap.as_ref());
        let deferrals = Deferrals::open(store, max_deferred)?;
        let live = Live {
            hints: evaluate::hints(&policy),
            throttles: limiters.build(&policy, &|| deferrals.parked_turns()),
            policy: Arc::new(policy),
            revision: 0,
            source: Source::Builtin,
            identity: "commander".into(),
            applied_at_ms: now,
            routing: Arc::new(routing),
            registry: Arc::new(registry),
            registry_generation: 1,
            rubric: Arc::new(rubric),
            rubric_generation: 1,
            blocks: Arc::default(),
            reroutes: Arc::default(),
            weights: Arc::default(),
        };
        let files = SourceFiles {
            registry: SourceFile::new(registry_file),
            rubric: SourceFile::new(rubric_file),
            gate: Arc::default(),
        };
        Ok(Arc::new(Self {
            live: ArcSwap::from_pointee(live),
            limiters,
            ledger: Mutex::new(ledger),
            store: store.clone(),
            deferrals,
            audit: AuditLog::open(store, audit_records)?,
            files,
            last_rejection: ArcSwap::from_pointee(None),
            clock,
            counters: PolicyCounters::default(),
            changed: tokio::sync::Notify::new(),
            alerted: Mutex::new(Default::default()),
            unauthorised_seen: Mutex::new(Default::default()),
            cap: Mutex::new(cap),
            cap_tree,
        }))
    }

    /// The emergency cost cap in force, if any.
    pub fn cost_cap(&self) -> Option<CostCap> {
        self.cap.lock().map_or(None, |c| c.clone())
    }

    /// Sets (`Some((usd, window))`) or lifts the emergency cost cap: a fleet budget that
    /// defers tasks past its limit, in force from the next decision and kept across
    /// policy swaps and restarts. Spending counts from when it is first set.
    pub fn set_cost_cap(
        &self,
        cap: Option<(f64, &str)>,
        who: &str,
    ) -> Result<Option<CostCap>, String> {
        let cap = cap.map(|(usd, window)| CostCap {
            limit_usd: usd,
            window: window.to_string(),
            set_by: who.to_string(),
            set_at_ms: self.now_ms(),
        });
        self.put_cost_cap(cap, who)
    }

    /// Puts in force the cost cap another replica set or lifted (`detect::shared`), as
    /// it was set there (its limit, window, who and when).
    pub fn adopt_cost_cap(&self, cap: Option<CostCap>) -> Result<Option<CostCap>, String> {
        self.put_cost_cap(cap, "another replica")
    }

    fn put_cost_cap(&self, cap: Option<CostCap>, who: &str) -> Result<Option<CostCap>, String> {
        if let Some(c) = &cap {
            c.budget()?;
        }
        self.with_gate(|| {
            match &cap {
                Some(c) => {
                    let body = serde_json::to_vec(c).map_err(|e| e.to_string())?;
                    self.cap_tree
                        .insert(b"cap", body)
                        .map_err(|e| e.to_string())?;
                }
                None => {
                    self.cap_tree.remove(b"cap").map_err(|e| e.to_string())?;
                }
            }
            // A poisoned lock only means a panic elsewhere mid-assignment.
            *self.cap.lock().unwrap_or_else(|p| p.into_inner()) = cap.clone();
            let current = self.live();
            let policy = with_cap((*current.policy).clone(), cap.as_ref());
            self.live.store(Arc::new(Live {
                policy: Arc::new(policy),
                ..current.sources_kept()
            }));
            Ok::<(), String>(())
        })?;
        self.changed.notify_one();
        tracing::warn!(cap = ?cap, who, "emergency cost cap changed");
        Ok(cap)
    }

    /// The one live snapshot: read it once per decision (or batch of decisions).
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Checks `docs` against the pools, registry and rubric in force.
    pub fn parse(&self, docs: Vec<Document>) -> Result<Policy, PolicyError> {
        Policy::parse(docs, self.live().check_against())
    }

    /// Runs `f` holding the gate that serialises every change of a source (policy,
    /// registry, rubric) with its cross-checks.
    pub fn with_gate<R>(&self, f: impl FnOnce() -> R) -> R {
        // A poisoned gate only means a panic elsewhere mid-check; every check starts afresh.
        let _gate = self
            .files
            .gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f()
    }

    /// Swaps in the live snapshot with the registry or the rubric replaced, as `change`
    /// builds it from the one in force. Call it inside [`Self::with_gate`], after the new
    /// source was checked against that same snapshot. Returns what is now in force.
    pub fn swap_source(&self, change: impl FnOnce(&Live) -> Live) -> Arc<Live> {
        let next = Arc::new(change(&self.live()));
        self.live.store(next.clone());
        next
    }

    /// Puts the `block` and `reroute` interventions in force into the live snapshot (under
    /// the gate, so no source change in between loses them). Returns whether they changed.
    pub fn set_interventions(
        &self,
        blocks: Vec<live::Block>,
        reroutes: Vec<crate::route::decide::PolicyReroute>,
    ) -> bool {
        self.with_gate(|| {
            let current = self.live();
            if *current.blocks == blocks && *current.reroutes == reroutes {
                return false;
            }
            self.live.store(Arc::new(Live {
                hints: live::hints(
                    evaluate::hints(&current.policy),
                    &reroutes,
                    &current.weights,
                ),
                blocks: Arc::new(blocks),
                reroutes: Arc::new(reroutes),
                ..current.sources_kept()
            }));
            true
        })
    }

    /// Puts the operators' pool weights in force in the live snapshot (under the gate).
    /// Returns whether they changed.
    pub fn set_pool_weights(&self, weights: Vec<(String, f64)>) -> bool {
        self.with_gate(|| {
            let current = self.live();
            if *current.weights == weights {
                return false;
            }
            self.live.store(Arc::new(Live {
                hints: live::hints(
                    evaluate::hints(&current.policy),
                    &current.reroutes,
                    &weights,
                ),
                weights: Arc::new(weights),
                ..current.sources_kept()
            }));
            true
        })
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The replicas sharing the intake, this one included (`ledger_share` counts them).
    pub fn replicas(&self) -> usize {
        self.limiters.replicas()
    }

    /// Divides every throttle among `n` replicas sharing the intake (each lets through
    /// its part, so together they hold the throttle's rate): the limiters are made afresh
    /// at their new part, under the gate; and tells the ledger, which then keeps each
    /// replica to its part of a budget's room between shares. Returns whether the count
    /// changed.
    pub fn set_replicas(&self, n: usize) -> bool {
        self.with_ledger(|l| l.set_replicas(n));
        self.with_gate(|| {
            if !self.limiters.set_replicas(n) {
                return false;
            }
            let current = self.live();
            self.live.store(Arc::new(Live {
                throttles: self
                    .limiters
                    .build(&current.policy, &|| self.deferrals.parked_turns()),
                ..current.sources_kept()
            }));
            tracing::info!(
                replicas = n,
                "replicas sharing the intake changed: each throttle's rate is divided among them"
            );
            true
        })
    }

    pub fn last_rejection(&self) -> Option<Rejection> {
        self.last_rejection.load().as_ref().clone()
    }

    /// Checks `docs` against this replica's pools, registry and rubric and swaps the result
    /// in as `revision` (see [`Self::swap`]), under the gate: no registry or rubric change
    /// comes in between.
    pub fn parse_and_swap(
        &self,
        docs: Vec<Document>,
        revision: u64,
        source: Source,
        identity: &str,
    ) -> Result<bool, PolicyError> {
        self.with_gate(|| {
            let policy = self.parse(docs)?;
            Ok(self.swap(policy, revision, source, identity))
        })
    }

    /// Records a checked edit of the registry or the rubric in the audit trail: `file` and
    /// its `text`, accepted or refused with its errors, and what it changed.
    pub async fn audit_source_change(&self, change: SourceChange) {
        let live = self.live();
        let now = self.now_ms();
        let document = Document {
            name: change.file,
            text: change.text,
        };
        let rec = AuditRecord {
            seq: 0,
            version: None,
            previous: Some(live.policy.version.clone()),
            refused_version: None,
            remote: None,
            sha256: load::bundle_sha(std::slice::from_ref(&document)),
            source: change.source,
            identity: change.identity,
            at: budget::rfc3339(now),
            at_ms: now,
            accepted: change.errors.is_empty(),
            errors: change.errors,
            diff: change.diff,
            documents: vec![document],
        };
        if let Err(e) = self.audit.append(rec).await {
            tracing::error!(error = %e, "source change not audited");
        }
    }

    /// Swaps `policy` in (already checked against the snapshot in force, under the gate)
    /// as `revision`, unless a newer one is in force. Returns whether it was applied.
    pub fn swap(&self, mut policy: Policy, revision: u64, source: Source, identity: &str) -> bool {
        let current = self.live();
        if revision != 0 && revision <= current.revision {
            return false;
        }
        if revision != 0 {
            policy.version = format!("v{revision}");
        }
        let version = policy.version.clone();
        let policy = with_cap(policy, self.cost_cap().as_ref());
        let live = Arc::new(Live {
            hints: live::hints(
                evaluate::hints(&policy),
                &current.reroutes,
                &current.weights,
            ),
            throttles: self
                .limiters
                .build(&policy, &|| self.deferrals.parked_turns()),
            policy: Arc::new(policy),
            revision,
            source,
            identity: identity.to_string(),
            applied_at_ms: self.now_ms(),
            ..current.sources_kept()
        });
        // Compare-and-swap: of two callers applying the same revision, one wins.
        let prev = self.live.compare_and_swap(&current, live.clone());
        if !Arc::ptr_eq(&prev, &current) {
            return false;
        }
        tracing::info!(
            version,
            source = source.as_str(),
            identity,
            summary = %live.policy.summary(),
            "policy in force"
        );
        self.counters.swaps.inc();
        self.changed.notify_one();
        true
    }

    /// Records a refused attempt (log, API, audit).
    pub async fn refuse(
        &self,
        docs: Vec<Document>,
        source: Source,
        identity: &str,
        errors: Vec<String>,
    ) {
        self.refuse_attempt(Refusal {
            documents: docs,
            source,
            identity: identity.to_string(),
            remote: None,
            errors,
            refused_version: None,
        })
        .await
    }

    /// Records an attempt without the right token. Its documents are not kept (whoever
    /// sent them had no right to), and one record per source and peer a minute is
    /// enough: a flood of bad pushes is counted
    /// (`fleet_policy_unauthorised_total`), and cannot push real history out of the
    /// bounded trail.
    pub async fn refuse_unauthorised(
        &self,
        source: Source,
        identity: &str,
        remote: Option<String>,
        reason: String,
    ) {
        self.counters.unauthorised.inc();
        let now = self.now_ms();
        let key = format!("{}|{}", source.as_str(), remote.as_deref().unwrap_or(""));
        let recent = match self.unauthorised_seen.lock() {
            Ok(mut seen) => {
                if seen.len() > 1024 {
                    seen.clear();
                }
                let last = seen.insert(key, now).unwrap_or(0);
                now.saturating_sub(last) < 60_000
            }
            Err(_) => false,
        };
        if recent {
            self.counters.rejected.inc();
            tracing::warn!(
                source = source.as_str(),
                identity,
                remote = remote.as_deref().unwrap_or(""),
                reason,
                "policy push refused: no valid token (repeat, not audited again this minute)"
            );
            return;
        }
        self.refuse_attempt(Refusal {
            documents: Vec::new(),
            source,
            identity: identity.to_string(),
            remote,
            errors: vec![reason],
            refused_version: None,
        })
        .await
    }

    /// Records a refused attempt of any kind (log, API, audit).
    pub async fn refuse_attempt(&self, r: Refusal) {
        let Refusal {
            documents,
            source,
            identity,
            remote,
            errors,
            refused_version,
        } = r;
        let live = self.live();
        tracing::error!(
            source = source.as_str(),
            identity,
            remote = remote.as_deref().unwrap_or(""),
            errors = %errors.join(" | "),
            version = %live.policy.version,
            refused_version = refused_version.as_deref().unwrap_or(""),
            "policy change rejected; keeping the policy in force"
        );
        self.counters.rejected.inc();
        let now = self.now_ms();
        self.last_rejection.store(Arc::new(Some(Rejection {
            at: budget::rfc3339(now),
            source,
            identity: identity.clone(),
            errors: errors.clone(),
        })));
        let rec = AuditRecord {
            seq: 0,
            version: None,
            previous: Some(live.policy.version.clone()),
            refused_version,
            remote,
            sha256: load::bundle_sha(&documents),
            source,
            identity,
            at: budget::rfc3339(now),
            at_ms: now,
            accepted: false,
            errors,
            diff: Vec::new(),
            documents,
        };
        if let Err(e) = self.audit.append(rec).await {
            tracing::error!(error = %e, "policy rejection not audited");
        }
    }

    /// Records an applied version in the audit trail, with its diff against `previous`.
    pub async fn record_applied(&self, previous: &Policy, source: Source, identity: &str) {
        let live = self.live();
        let now = self.now_ms();
        let rec = AuditRecord {
            seq: 0,
            version: Some(live.policy.version.clone()),
            previous: Some(previous.version.clone()),
            refused_version: None,
            remote: None,
            sha256: live.policy.sha256.clone(),
            source,
            identity: identity.to_string(),
            at: budget::rfc3339(now),
            at_ms: now,
            accepted: true,
            errors: Vec::new(),
            diff: load::diff(previous, &live.policy),
            documents: live.policy.documents.clone(),
        };
        if let Err(e) = self.audit.append(rec).await {
            tracing::error!(error = %e, "policy change not audited");
        }
    }

    /// Runs `f` with the ledger locked (microseconds; never across an `.await`).
    pub fn with_ledger<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> R {
        match self.ledger.lock() {
            Ok(mut l) => f(&mut l),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Releases a finished task's reservation and charges its actual cost.
    pub fn settle(&self, r: &Reservation, actual: f64) {
        self.with_ledger(|l| l.settle(r, actual));
    }

    /// Gives a reservation back (the dispatch did not happen).
    pub fn unreserve(&self, r: &Reservation) {
        self.with_ledger(|l| l.settle(r, 0.0));
    }

    /// Drops expired ledger cells (memory and store).
    pub fn prune_ledger(&self) -> Result<usize, StoreError> {
        let policy = self.live().policy.clone();
        let now = self.now_ms();
        let gone = self.with_ledger(|l| l.prune(&policy, now));
        self.store.log().forget_ledger_cells(&gone);
        if let Ok(mut a) = self.alerted.lock() {
            a.retain(|(b, v, bucket, _)| {
                !gone
                    .iter()
                    .any(|k| &k.budget == b && &k.value == v && k.bucket == *bucket)
            });
        }
        Ok(gone.len())
    }

    /// Whether a soft-threshold alert is new (raised once per bucket and threshold).
    pub fn first_alert(&self, budget: &str, value: &str, bucket: u64, at: f64) -> bool {
        self.alerted
            .lock()
            .map(|mut a| a.insert((budget.into(), value.into(), bucket, (at * 1000.0) as u32)))
            .unwrap_or(false)
    }

    /// Where every budget stands now, for the API.
    pub fn standing(&self) -> Vec<BudgetStanding> {
        let live = self.live();
        let now = self.now_ms();
        let queued = self.deferrals.queued();
        self.with_ledger(|l| {
            let mut out = Vec::new();
            for b in &live.policy.budgets {
                let values = l.values(&b.spec.name);
                let values = if values.is_empty() {
                    vec![b.spec.matches.clone().unwrap_or_else(|| "*".into())]
                } else {
                    values
                };
                for v in values {
                    let from = b.window.counting_from(now);
                    let (spent, reserved) = l.sums(&b.spec.name, &v, from);
                    let (o_spent, o_reserved) = l.others_sums(&b.spec.name, &v, from);
                    let (spent, reserved) = (spent + o_spent, reserved + o_reserved);
                    out.push(BudgetStanding {
                        budget: b.spec.name.clone(),
                        scope: b.spec.scope.as_str(),
                        value: v.clone(),
                        window: b.spec.window.clone(),
                        limit_usd: b.spec.limit_usd,
                        spent_usd: spent,
                        reserved_usd: reserved,
                        used: (spent + reserved) / b.spec.limit_usd,
                        other_replicas_usd: o_spent + o_reserved,
                        window_resets_at: match b.window {
                            budget::Window::Rolling(_) => None,
                            w => Some(budget::rfc3339(w.bucket_expires(w.bucket(now)))),
                        },
                        deferred: queued.get(&(b.spec.name.clone(), v)).copied().unwrap_or(0),
                        action: b.spec.action.as_str(),
                    });
                }
            }
            out
        })
    }
}

/// One budget value's standing.
#[derive(Clone, Debug, Serialize)]
pub struct BudgetStanding {
    pub budget: String,
    pub scope: &'static str,
    pub value: String,
    pub window: String,
    pub limit_usd: f64,
    /// Spent and reserved by every replica (this one's and what the others last shared).
    pub spent_usd: f64,
    pub reserved_usd: f64,
    /// (spent + reserved) / limit.
    pub used: f64,
    /// Of spent + reserved, what the other replicas committed (0 for a lone commander).
    pub other_replicas_usd: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_resets_at: Option<String>,
    pub deferred: usize,
    pub action: &'static str,
}

/// The fleet owner and the classifier read prices from the registry in force through this.
impl InForce<Registry> for PolicyEngine {
    fn in_force(&self) -> Arc<Registry> {
        self.live.load().registry.clone()
    }
}

impl InForce<Rubric> for PolicyEngine {
    fn in_force(&self) -> Arc<Rubric> {
        self.live.load().rubric.clone()
    }
}

/// `policy` with the emergency cost cap as its last budget (or without one).
fn with_cap(mut policy: Policy, cap: Option<&CostCap>) -> Policy {
    policy.budgets.retain(|b| b.spec.name != COST_CAP_BUDGET);
    if let Some(b) = cap.and_then(|c| c.budget().ok()) {
        policy.budgets.push(b);
    }
    policy
}
