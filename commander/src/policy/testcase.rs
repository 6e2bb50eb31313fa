//! The embedded `[[test]]` cases: each builds its fleet situation (ledger, pool health,
//! exhausted throttles), classifies its task the way the commander would without an LLM
//! (declared type, else the rubric's deterministic fallback), runs the same
//! [`evaluate`] as the intake loop, and compares the outcome.

use std::collections::BTreeMap;

use fleet_worker::message::Task;
use serde::Serialize;

use super::budget::{CellKey, Ledger, TaskDims};
use super::evaluate::{self, EvalInput, Verdict};
use super::load::{Policy, TestCase};
use super::schema::{Scope, TestExpect, TestSpec, ThrottleScope};
use crate::classify::rubric::Rubric;
use crate::registry::Registry;
use crate::route::snapshot::PoolState;
use crate::route::{RouteSnapshot, RoutingTable};

pub use super::schema::TEST_NOW_MS;

/// One case's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct TestOutcome {
    pub name: String,
    pub at: String,
    /// The instant it ran at (RFC 3339).
    pub now: String,
    pub passed: bool,
    /// What happened: action, pool, model, rule, reason.
    pub got: String,
    /// What did not match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
}

/// Runs every test case of `policy`.
pub fn run(
    policy: &Policy,
    rubric: &Rubric,
    registry: &Registry,
    table: &RoutingTable,
) -> Vec<TestOutcome> {
    policy
        .tests
        .iter()
        .map(|t| run_one(policy, t, rubric, registry, table))
        .collect()
}

fn run_one(
    policy: &Policy,
    t: &TestCase,
    rubric: &Rubric,
    registry: &Registry,
    table: &RoutingTable,
) -> TestOutcome {
    let spec = &t.spec;
    // Checked when the policy was read.
    let now_ms = spec.now_ms().unwrap_or(TEST_NOW_MS);
    let task = test_task(spec);
    let class = crate::classify::offline(rubric, &task);
    let dims = TaskDims::from_task(&task.attributes, std::iter::empty());
    let fleet = test_fleet(spec, table, now_ms);
    let ledger = test_ledger(spec, policy, &dims, table, registry, now_ms);
    let hints = evaluate::hints(policy);
    let queued = BTreeMap::new();
    let verdict = evaluate::evaluate(EvalInput {
        task: &task,
        class: &class.answer,
        dims: &dims,
        rubric,
        registry,
        fleet: &fleet,
        table,
        policy,
        hints: &hints,
        ledger: &ledger,
        queued: &queued,
        released: false,
        ran: false,
        now_ms,
        seed: 1,
        // A test case judges the policy alone, without interventions in force.
        blocks: &[],
    });
    let mut got = Got::of(&verdict);
    if let Some(th) = throttled(spec, policy, &got, &dims) {
        got.action = "throttle";
        got.reason = format!(
            "throttle {} is out of permits; the task waits for its turn (in the intake stream, or parked)",
            th.spec.name
        );
    }
    let failures = got.failures(&spec.expect, registry);
    TestOutcome {
        name: spec.name.clone(),
        at: t.at.to_string(),
        now: super::budget::rfc3339(now_ms),
        passed: failures.is_empty(),
        got: got.summary(),
        failures,
    }
}

/// The case's task.
fn test_task(spec: &TestSpec) -> Task {
    let mut task = Task::new(spec.task.description.clone());
    task.priority = spec.task.priority;
    task.attributes = spec.task.attributes.clone();
    task.pool = spec.task.pool.clone();
    task.model = spec.task.model.clone();
    task.capabilities = spec.task.capabilities.clone();
    task.id = Some("policy-test".into());
    task
}

/// The fleet: every configured pool healthy with one worker, unless the case says.
fn test_fleet(spec: &TestSpec, table: &RoutingTable, now_ms: u64) -> RouteSnapshot {
    let mut names: Vec<String> = table.pools.keys().cloned().collect();
    names.extend(spec.fleet.pools.keys().cloned());
    names.sort();
    names.dedup();
    let pools = names
        .into_iter()
        .map(|name| {
            let s = spec.fleet.pools.get(&name).cloned().unwrap_or_default();
            let workers = if s.workers == 0 { 1 } else { s.workers };
            PoolState {
                name,
                healthy: workers,
                queue_depth: s.queue_depth,
                capacity: u64::from(workers),
                error_rate: s.error_rate,
                finished_1m: if s.error_rate.is_some() { 100 } else { 0 },
                p95_latency_ms: s.p95_latency_ms.map(|v| v as f64),
                ..Default::default()
            }
        })
        .collect();
    RouteSnapshot::from_pools(now_ms, pools)
}

/// The ledger with what the case says each budget has spent (every value the budget
/// could count the task under).
fn test_ledger(
    spec: &TestSpec,
    policy: &Policy,
    dims: &TaskDims,
    table: &RoutingTable,
    registry: &Registry,
    now_ms: u64,
) -> Ledger {
    let mut ledger = Ledger::default();
    for (name, usd) in &spec.fleet.spent {
        let Some(b) = policy.budget(name) else {
            continue;
        };
        let values: Vec<String> = match (b.spec.scope, &b.spec.matches) {
            (Scope::Fleet, _) => vec!["*".into()],
            (_, Some(m)) => vec![m.clone()],
            (Scope::Team, None) => dims.team.iter().cloned().collect(),
            (Scope::Feature, None) => dims.feature.iter().cloned().collect(),
            (Scope::UserTier, None) => dims.user_tier.iter().cloned().collect(),
            (Scope::Pool, None) => table.pools.keys().cloned().collect(),
            (Scope::Model, None) => registry.models().iter().map(|m| m.name.clone()).collect(),
        };
        for value in values {
            ledger.set_spent(
                CellKey {
                    budget: name.clone(),
                    value,
                    bucket: b.window.bucket(now_ms),
                },
                *usd,
            );
        }
    }
    ledger
}

/// A throttle the case marks as out of permits that a dispatched task would meet.
fn throttled<'p>(
    spec: &TestSpec,
    policy: &'p Policy,
    got: &Got,
    dims: &TaskDims,
) -> Option<&'p super::load::Throttle> {
    let pool = got.pool.as_deref().filter(|_| got.action == "dispatch")?;
    policy.throttles.iter().find(|th| {
        spec.fleet.throttled.contains(&th.spec.name) && {
            let value = match th.spec.scope {
                ThrottleScope::Pool => Some(pool),
                ThrottleScope::Team => dims.team.as_deref(),
                ThrottleScope::Producer => dims.producer.as_deref(),
                ThrottleScope::Worker => None,
            };
            value.is_some_and(|v| th.spec.matches.as_deref().is_none_or(|m| m == v))
        }
    })
}

/// What the policy did with the case's task.
struct Got {
    action: &'static str,
    pool: Option<String>,
    model: Option<String>,
    rule: Option<String>,
    reason: String,
}

impl Got {
    fn of(verdict: &Verdict) -> Self {
        let (action, pool, model, rule, reason) = match verdict {
            Verdict::Dispatch { decision: d, .. } => (
                "dispatch",
                Some(d.pool.clone()),
                Some(d.model.clone()),
                Some(d.rule.as_str().to_string()),
                d.reason.clone(),
            ),
            Verdict::Defer {
                decision: d,
                reason,
                ..
            } => (
                "defer",
                Some(d.pool.clone()),
                Some(d.model.clone()),
                Some("budget_defer".into()),
                reason.clone(),
            ),
            Verdict::Reject {
                decision: d,
                reason,
                code,
            } => (
                "reject",
                Some(d.pool.clone()),
                Some(d.model.clone()),
                Some(
                    if *code == evaluate::BLOCKED {
                        "intervention_block"
                    } else {
                        "budget_reject"
                    }
                    .into(),
                ),
                reason.clone(),
            ),
            Verdict::NoRoute(n) => ("reject", None, None, Some(n.code().into()), n.to_string()),
        };
        Self {
            action,
            pool,
            model,
            rule,
            reason,
        }
    }

    /// How this differs from what the case expects (a model matches by any of its names).
    fn failures(&self, e: &TestExpect, registry: &Registry) -> Vec<String> {
        let mut failures = Vec::new();
        if e.action != self.action {
            failures.push(format!(
                "action: expected {}, got {}",
                e.action, self.action
            ));
        }
        for (what, want, got) in [
            ("pool", &e.pool, &self.pool),
            ("model", &e.model, &self.model),
            ("rule", &e.rule, &self.rule),
        ] {
            if let Some(w) = want {
                let same = match what {
                    "model" => got
                        .as_deref()
                        .and_then(|g| registry.lookup(g))
                        .zip(registry.lookup(w))
                        .is_some_and(|(a, b)| a.name == b.name),
                    _ => got.as_deref() == Some(w.as_str()),
                };
                if !same {
                    failures.push(format!(
                        "{what}: expected {w}, got {}",
                        got.as_deref().unwrap_or("none")
                    ));
                }
            }
        }
        if let Some(sub) = &e.reason_contains
            && !self.reason.contains(sub.as_str())
        {
            failures.push(format!("reason: expected it to contain {sub:?}"));
        }
        failures
    }

    fn summary(&self) -> String {
        format!(
            "{} pool={} model={} rule={}: {}",
            self.action,
            self.pool.as_deref().unwrap_or("-"),
            self.model.as_deref().unwrap_or("-"),
            self.rule.as_deref().unwrap_or("-"),
            self.reason,
        )
    }
}
