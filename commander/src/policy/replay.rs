//! Shadow replay: the recent decisions re-run under a candidate policy, dispatching
//! nothing, with what would change.
//!
//! Each logged decision is decided again from what it recorded (classification, priority,
//! the producer's pool / model / cost cap, attribution) by the same
//! [`evaluate`](super::evaluate) as the intake loop. What replay cannot know exactly, it
//! says: pool health is today's (the snapshot at replay time), and budgets count from the
//! start of the replayed span, each admitted task charged at its estimate.

use std::collections::BTreeMap;

use fleet_worker::message::Task;
use serde::Serialize;

use super::budget::Ledger;
use super::evaluate::{self, EvalInput, Verdict};
use super::load::Policy;
use crate::classify::rubric::Rubric;
use crate::decisions::{DecisionRecord, Outcome};
use crate::registry::Registry;
use crate::route::{RouteSnapshot, RoutingTable};

/// Changes listed one by one (the counts cover all).
const MAX_LISTED: usize = 200;

#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplayReport {
    pub candidate_sha256: String,
    pub candidate_summary: String,
    pub since: String,
    pub until: String,
    pub decisions: usize,
    pub unchanged: usize,
    /// Dispatched to another pool.
    pub rerouted: usize,
    /// Same pool, another model (downgrades, mostly).
    pub model_changed: usize,
    /// Would be deferred now (and were not).
    pub deferred: usize,
    /// Would be rejected now (and were not).
    pub rejected: usize,
    /// Were deferred or rejected, would be dispatched now.
    pub newly_dispatched: usize,
    /// Sum of estimates of what was dispatched, and of what would be.
    pub cost_before_usd: f64,
    pub cost_after_usd: f64,
    pub cost_delta_usd: f64,
    pub changes: Vec<ReplayChange>,
    /// What the replay could not know exactly.
    pub caveats: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplayChange {
    pub task_id: String,
    pub at: String,
    pub before: String,
    pub after: String,
    pub reason: String,
}

fn describe(outcome: &str, pool: Option<&str>, model: Option<&str>) -> String {
    match (pool, model) {
        (Some(p), Some(m)) => format!("{outcome} {p}/{m}"),
        _ => outcome.to_string(),
    }
}

/// Replays `decisions` (oldest first) under `candidate`, with the routing table, rubric
/// and registry of `live` and the fleet as it is now.
pub fn replay(
    candidate: &Policy,
    decisions: &[DecisionRecord],
    live: &super::Live,
    fleet: &RouteSnapshot,
    since_ms: u64,
    until_ms: u64,
) -> ReplayReport {
    let (rubric, registry, table): (&Rubric, &Registry, &RoutingTable) =
        (&live.rubric, &live.registry, &live.routing);
    let mut r = ReplayReport {
        candidate_sha256: candidate.sha256.clone(),
        candidate_summary: candidate.summary(),
        since: super::budget::rfc3339(since_ms),
        until: super::budget::rfc3339(until_ms),
        caveats: vec![
            "pool health is the fleet's state at replay time".into(),
            "budgets count from the start of the replayed span; admitted tasks are charged at their estimates".into(),
            "deferred tasks are not released within the replay".into(),
        ],
        ..Default::default()
    };
    let hints = evaluate::hints(candidate);
    let mut ledger = Ledger::default();
    let queued: BTreeMap<(String, String), usize> = BTreeMap::new();
    for d in decisions
        .iter()
        .filter(|d| d.outcome != Outcome::Intervened)
    {
        r.decisions += 1;
        let task = replayed_task(d);
        if d.outcome == Outcome::Dispatched {
            r.cost_before_usd += d.est_cost_usd.unwrap_or(0.0);
        }
        let verdict = evaluate::evaluate(EvalInput {
            task: &task,
            class: &d.classification.answer,
            dims: &d.inputs.dims,
            rubric,
            registry,
            fleet,
            table,
            policy: candidate,
            hints: &hints,
            ledger: &ledger,
            queued: &queued,
            released: false,
            ran: false,
            now_ms: d.at_ms,
            seed: crate::domain::fnv1a(&[b"seed", d.task_id.as_bytes()]),
            // Shadow replay judges the candidate policy alone, not interventions.
            blocks: &[],
        });
        let after = After::of(d, verdict, &mut ledger, &mut r.cost_after_usd);
        r.count(d, after);
    }
    r.cost_delta_usd = r.cost_after_usd - r.cost_before_usd;
    r
}

/// The task as the decision log recorded its inputs.
fn replayed_task(d: &DecisionRecord) -> Task {
    let mut task = Task::new("replayed");
    task.id = Some(d.task_id.clone());
    task.priority = d.priority;
    task.pool = d.inputs.requested_pool.clone();
    task.model = d.inputs.requested_model.clone();
    task.max_cost_usd = d.inputs.max_cost_usd;
    task
}

/// What the candidate policy does with one logged task, and how that differs.
struct After {
    text: String,
    reason: String,
    /// `None`: what happened before; else rerouted, model, dispatched, deferred, rejected.
    changed: Option<&'static str>,
}

impl After {
    /// A dispatch reserves its estimate in `ledger` (later tasks see it) and adds it to
    /// `cost_after`.
    fn of(
        d: &DecisionRecord,
        verdict: Verdict<'_>,
        ledger: &mut Ledger,
        cost_after: &mut f64,
    ) -> Self {
        let (text, reason, changed) = match verdict {
            Verdict::Dispatch { decision, check } => {
                let est = decision.est_cost_usd.unwrap_or(0.0);
                ledger.reserve(&check.cells, est);
                *cost_after += est;
                let kind = match d.outcome {
                    Outcome::Dispatched if d.pool.as_deref() != Some(decision.pool.as_str()) => {
                        Some("rerouted")
                    }
                    Outcome::Dispatched if d.model.as_deref() != Some(decision.model.as_str()) => {
                        Some("model")
                    }
                    Outcome::Dispatched => None,
                    _ => Some("dispatched"),
                };
                (
                    describe("dispatch", Some(&decision.pool), Some(&decision.model)),
                    decision.reason,
                    kind,
                )
            }
            Verdict::Defer {
                decision, reason, ..
            } => (
                describe("defer", Some(&decision.pool), Some(&decision.model)),
                reason,
                (d.outcome != Outcome::Deferred).then_some("deferred"),
            ),
            Verdict::Reject { reason, .. } => (
                "reject".into(),
                reason,
                (d.outcome != Outcome::Rejected).then_some("rejected"),
            ),
            Verdict::NoRoute(n) => (
                "reject".into(),
                n.to_string(),
                (d.outcome != Outcome::Rejected).then_some("rejected"),
            ),
        };
        Self {
            text,
            reason,
            changed,
        }
    }
}

impl ReplayReport {
    /// Counts one replayed decision, listing it (up to [`MAX_LISTED`]) when it changed.
    fn count(&mut self, d: &DecisionRecord, after: After) {
        let Some(kind) = after.changed else {
            self.unchanged += 1;
            return;
        };
        match kind {
            "rerouted" => self.rerouted += 1,
            "model" => self.model_changed += 1,
            "deferred" => self.deferred += 1,
            "rejected" => self.rejected += 1,
            _ => self.newly_dispatched += 1,
        }
        if self.changes.len() < MAX_LISTED {
            let before = describe(
                match d.outcome {
                    Outcome::Dispatched => "dispatch",
                    Outcome::Rejected => "reject",
                    Outcome::Deferred => "defer",
                    Outcome::Intervened => "intervene",
                },
                d.pool.as_deref(),
                d.model.as_deref(),
            );
            self.changes.push(ReplayChange {
                task_id: d.task_id.clone(),
                at: d.at.clone(),
                before,
                after: after.text,
                reason: after.reason,
            });
        }
    }
}
