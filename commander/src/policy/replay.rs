//! Shadow replay: the recent decisions re-run under a candidate policy, dispatching
//! nothing, with what would change.
//!
//! Each logged decision is decided again from what it recorded (classification, priority,
//! the producer's pool / model / cost cap, attribution) by the same
//! [`evaluate`] as the intake loop. What replay cannot know exactly, it
//! says: pool health and load are today's (the snapshot at replay time), and budgets count
//! from the start of the replayed span, each admitted task charged at its estimate.
//!
//! So that neither of those is blamed on the candidate, each decision is also decided
//! again under the policy in force, against the same fleet and from the same empty
//! ledger. Where the candidate differs from what was logged but the policy in force would
//! decide the same as the candidate now, the difference is the fleet's or the span's, not
//! the candidate's: it is counted as `drifted`, not as a change. Replaying the policy in
//! force therefore reports no changes.

use std::collections::BTreeMap;

use fleet_worker::message::Task;
use serde::Serialize;

use super::budget::Ledger;
use super::evaluate::{self, EvalInput, Verdict};
use super::load::Policy;
use crate::decisions::{DecisionRecord, Outcome};
use crate::route::RouteSnapshot;
use crate::route::decide::PolicyHints;

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
    /// Would be decided differently now, but the policy in force would decide them the
    /// same way as the candidate: the fleet's health or load, or the budgets' start,
    /// moved. Not counted among the changes above, nor listed.
    pub drifted: usize,
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

/// Replays `decisions` (oldest first) under `candidate`: [`Replay`] over a slice, for
/// tests (the API feeds [`Replay`] from the log a page at a time).
#[cfg(test)]
pub fn replay(
    candidate: &Policy,
    decisions: &[DecisionRecord],
    live: &super::Live,
    fleet: &RouteSnapshot,
    since_ms: u64,
    until_ms: u64,
) -> ReplayReport {
    let mut r = Replay::new(candidate, live, fleet, since_ms, until_ms);
    for d in decisions {
        r.push(d);
    }
    r.finish()
}

/// A shadow replay fed one logged decision at a time, oldest first, so that it holds
/// the report and the ledgers, never the span. Decides under `candidate`, with the
/// routing table, rubric and registry of `live` and the fleet as it is now, beside the
/// policy in force under the same conditions (see the module's doc).
#[derive(Debug)]
pub struct Replay<'a> {
    live: &'a super::Live,
    fleet: &'a RouteSnapshot,
    candidate: Shadow<'a>,
    in_force: Shadow<'a>,
    report: ReplayReport,
}

impl<'a> Replay<'a> {
    pub fn new(
        candidate: &'a Policy,
        live: &'a super::Live,
        fleet: &'a RouteSnapshot,
        since_ms: u64,
        until_ms: u64,
    ) -> Self {
        let report = ReplayReport {
            candidate_sha256: candidate.sha256.clone(),
            candidate_summary: candidate.summary(),
            since: super::budget::rfc3339(since_ms),
            until: super::budget::rfc3339(until_ms),
            caveats: vec![
                "pool health and load are the fleet's state at replay time".into(),
                "budgets count from the start of the replayed span; admitted tasks are charged at their estimates".into(),
                "deferred tasks are not released within the replay".into(),
                "a decision the policy in force would also make differently now is counted as drifted, not as the candidate's change".into(),
            ],
            ..Default::default()
        };
        Self {
            live,
            fleet,
            candidate: Shadow::new(candidate),
            in_force: Shadow::new(&live.policy),
            report,
        }
    }

    /// Decides the logged decision `d` again under both policies and counts the outcome.
    /// An intervention's record is not a routing decision and is passed over.
    pub fn push(&mut self, d: &DecisionRecord) {
        if d.outcome == Outcome::Intervened {
            return;
        }
        let r = &mut self.report;
        r.decisions += 1;
        let task = replayed_task(d);
        if d.outcome == Outcome::Dispatched {
            r.cost_before_usd += d.est_cost_usd.unwrap_or(0.0);
        }
        let (live, fleet) = (self.live, self.fleet);
        let after = self.candidate.decide(d, &task, live, fleet);
        let now = self.in_force.decide(d, &task, live, fleet);
        if after.changed.is_some() && after.text == now.text {
            r.drifted += 1;
        } else {
            r.count(d, after);
        }
    }

    pub fn finish(mut self) -> ReplayReport {
        let r = &mut self.report;
        r.cost_after_usd = self.candidate.dispatched_usd;
        r.cost_delta_usd = r.cost_after_usd - r.cost_before_usd;
        self.report
    }
}

/// One policy deciding the replayed span in order, with the ledger its own admissions
/// fill and the sum of the estimates it dispatched.
#[derive(Debug)]
struct Shadow<'p> {
    policy: &'p Policy,
    hints: PolicyHints,
    ledger: Ledger,
    dispatched_usd: f64,
}

impl<'p> Shadow<'p> {
    fn new(policy: &'p Policy) -> Self {
        Self {
            policy,
            hints: evaluate::hints(policy),
            ledger: Ledger::default(),
            dispatched_usd: 0.0,
        }
    }

    /// What this policy does with the logged task `d` now; a dispatch adds its estimate
    /// to `dispatched_usd`.
    fn decide(
        &mut self,
        d: &DecisionRecord,
        task: &Task,
        live: &super::Live,
        fleet: &RouteSnapshot,
    ) -> After {
        let verdict = evaluate::evaluate(EvalInput {
            task,
            class: &d.classification.answer,
            dims: &d.inputs.dims,
            rubric: &live.rubric,
            registry: &live.registry,
            fleet,
            table: &live.routing,
            policy: self.policy,
            hints: &self.hints,
            ledger: &self.ledger,
            queued: &BTreeMap::new(),
            released: false,
            ran: false,
            now_ms: d.at_ms,
            seed: crate::domain::fnv1a(&[b"seed", d.task_id.as_bytes()]),
            // Shadow replay judges a policy alone, not the interventions in force.
            blocks: &[],
        });
        After::of(d, verdict, &mut self.ledger, &mut self.dispatched_usd)
    }
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
