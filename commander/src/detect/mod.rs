//! Detection: the commander watching its fleet. Once a second the detector reads the fleet
//! snapshot the owner already builds (never the ingest path or the task path), runs every
//! rule against the thresholds of the policy in force (`[alerts]`), and steps each alert's
//! life (pending → firing → resolved). What fires or resolves is stored (`store.rs`,
//! `GET /v1/alerts`), published on `<prefix>.alerts.<severity>` and counted
//! (`fleet_alerts_firing`). docs/alerts.md lists the rules and their defaults.
//!
//! - `rules.rs`: the rules, as observations of a snapshot (pure);
//! - `slices.rs`: correlated failure slices (lift, a z-test, Benjamini–Hochberg), pure;
//! - `bursts.rs`: tool failure bursts (many agents failing one tool within seconds,
//!   against a Poisson tail at the tool's own rate), pure;
//! - `drift.rs`: behavioural drift (Jensen–Shannon divergence of tool mixes and step counts
//!   against a permutation null), pure, run every few minutes off the tick;
//! - `history.rs`: the detector's short memory (baselines, hourly averages);
//! - `lifecycle.rs`: pending / firing / resolved with `for`, hysteresis, renotify, no data;
//! - `store.rs`: the alert log in sled;
//! - `sinks.rs`: delivery to Alertmanager, signed webhooks, Slack and PagerDuty;
//! - `silence.rs`: silences (what operators muted, until when, who and why);
//! - `intervene.rs`: the escalation ladder, pure (which steps are due, what each worker
//!   should be told); `act.rs` carries it out (control commands, interventions in sled);
//! - `lead.rs`: the lease that makes one replica the one that notifies alerts;
//! - `shared.rs`: the operator's interventions and cost cap, shared by every replica
//!   through a key-value bucket;
//! - `run.rs`: the once-a-second loop (the I/O: snapshot in, store, NATS, gauges out).

pub mod act;
pub mod bursts;
pub mod drift;
pub mod history;
pub mod intervene;
pub mod lead;
pub mod lifecycle;
pub mod rules;
pub mod run;
pub mod shared;
pub mod silence;
pub mod sinks;
pub mod slices;
pub mod store;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use crate::config::PoolConfig;
use crate::fleet::view::FleetSnapshot;
use crate::policy::schema::AlertSpec;

pub use lifecycle::{Alert, AlertState, Change};
pub use rules::{Rule, Severity};
pub use store::{AlertLog, Filter};

/// The detector's state between ticks: its memory of the fleet and the open alerts.
#[derive(Debug)]
pub struct Detector {
    history: history::History,
    lifecycle: lifecycle::Lifecycle,
    /// Open (pending and firing) alerts at most; more are refused and counted.
    max_open: usize,
    drift: DriftState,
}

/// Drift is tested every `drift_interval_s`, off the tick (`drift::Job`); its last
/// observations stand until the next verdict.
#[derive(Debug, Default)]
struct DriftState {
    next_ms: u64,
    in_flight: bool,
    observations: Vec<rules::Observation>,
}

impl Detector {
    pub fn new(max_open: usize) -> Self {
        Self {
            history: history::History::default(),
            lifecycle: lifecycle::Lifecycle::default(),
            max_open: max_open.max(1),
            drift: DriftState::default(),
        }
    }

    /// The drift evaluation due now, if one is (and none is running). Run it (off the
    /// async runtime: it can take a while) and hand the result to `drift_done`.
    pub fn drift_job(
        &mut self,
        snapshot: &FleetSnapshot,
        spec: &AlertSpec,
        now_ms: u64,
    ) -> Option<drift::Job> {
        if self.drift.in_flight || now_ms < self.drift.next_ms {
            return None;
        }
        self.drift.in_flight = true;
        self.drift.next_ms = now_ms.saturating_add(spec.drift_interval_s.saturating_mul(1000));
        let firing = self
            .drift
            .observations
            .iter()
            .filter_map(|o| o.labels.iter().next())
            .filter_map(|(k, v)| {
                crate::fleet::prints::DIMENSIONS
                    .into_iter()
                    .find(|d| d == k)
                    .map(|d| (d, v.clone()))
            })
            .collect();
        Some(drift::Job::new(
            std::sync::Arc::clone(&snapshot.prints),
            spec,
            firing,
            now_ms,
        ))
    }

    /// The verdicts of the drift evaluation: they stand until the next one.
    pub fn drift_done(&mut self, observations: Vec<rules::Observation>) {
        self.drift.in_flight = false;
        self.drift.observations = observations;
    }

    /// One evaluation: the snapshot made at `now_ms`, the thresholds in force and the
    /// configured pools. Returns what changed.
    pub fn tick(
        &mut self,
        snapshot: &FleetSnapshot,
        spec: &AlertSpec,
        pools: &BTreeMap<String, PoolConfig>,
        now_ms: u64,
    ) -> Vec<(Change, Alert)> {
        self.history.record(snapshot, now_ms);
        let mut observations = rules::observe(&rules::Inputs {
            snapshot,
            spec,
            pools,
            history: &self.history,
        });
        observations.extend(self.drift.observations.iter().cloned());
        self.lifecycle.step(
            observations,
            |labels| present(snapshot, labels),
            spec,
            now_ms,
            self.max_open,
        )
    }

    /// Pending and firing alerts.
    pub fn open(&self) -> Vec<Alert> {
        let mut v: Vec<Alert> = self.lifecycle.open().cloned().collect();
        v.sort_by(|a, b| b.started_ms.cmp(&a.started_ms).then(a.id.cmp(&b.id)));
        v
    }

    /// New alerts refused because `max_open` were open.
    pub fn refused(&self) -> u64 {
        self.lifecycle.refused
    }
}

/// Whether the scope an alert is about still reports: its worker is listed and not lost,
/// its pool is listed; the fleet always is.
fn present(s: &FleetSnapshot, labels: &BTreeMap<String, String>) -> bool {
    if let Some(w) = labels.get("worker") {
        return s
            .workers
            .binary_search_by(|x| x.id.as_str().cmp(w))
            .is_ok_and(|i| !s.workers[i].lost);
    }
    if let Some(p) = labels.get("pool") {
        return s.pools.iter().any(|x| &x.name == p);
    }
    true
}
