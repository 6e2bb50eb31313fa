//! The policy's verdict on one classified task: pure, so the intake loop, the embedded
//! `[[test]]` cases and shadow replay all run the same code.
//!
//! Steps: route the task (`route::decide`, with the policy's reroutes); check the routed
//! task against every budget that applies; a soft threshold that asks for it routes a
//! marginal task one tier lower; a budget at 100% applies its action — `reject`, `defer`,
//! or `downgrade` (the cheapest acceptable tier, then the budget's `then`). When several
//! budgets are over, the most severe action wins (reject > defer > downgrade). Throttles
//! are applied after the verdict by the caller (they hold state).

use std::collections::BTreeMap;

use fleet_worker::message::Task;

use super::budget::{self, Check, Ledger, TaskDims};
use super::load::Policy;
use super::schema::{Fallback, LimitAction};
use crate::classify::Answer;
use crate::classify::rubric::Rubric;
use crate::registry::Registry;
use crate::route::{
    self, DecideInput, Decision, NoRoute, PolicyHints, RouteSnapshot, RoutingTable,
};

/// Everything a verdict depends on.
#[derive(Clone, Copy, Debug)]
pub struct EvalInput<'a, 'p> {
    pub task: &'a Task,
    pub class: &'a Answer,
    pub dims: &'a TaskDims,
    pub rubric: &'a Rubric,
    pub registry: &'a Registry,
    pub fleet: &'a RouteSnapshot,
    pub table: &'a RoutingTable,
    pub policy: &'p Policy,
    /// The routing hints derived from `policy` (version, reroutes), with the reroute
    /// interventions in force first (`Live::hints`).
    pub hints: &'a PolicyHints,
    pub ledger: &'a Ledger,
    /// Deferred tasks waiting per (budget, value): new tasks queue behind them.
    pub queued: &'a BTreeMap<(String, String), usize>,
    /// The task comes out of the deferred queue (it does not queue behind itself).
    pub released: bool,
    /// The task ran already and is decided again for the record (a dispatch lost in a
    /// restart, docs/rubrics.md): nothing can hold it back any more, so interventions,
    /// deferred queues and limits do not bind, and the budgets it counts against are
    /// still checked, so that its cost is charged to them.
    pub ran: bool,
    pub now_ms: u64,
    pub seed: u64,
    /// Scopes refused dispatch by interventions in force.
    pub blocks: &'a [super::live::Block],
}

/// What the policy says.
#[derive(Debug)]
pub enum Verdict<'a> {
    /// Route it; reserve the estimate in `check.cells`.
    Dispatch {
        decision: Decision,
        check: Check<'a>,
    },
    /// Keep it until the budget has room.
    Defer {
        decision: Decision,
        reason: String,
        until_ms: Option<u64>,
        /// (budget, value) queues it waits in.
        queues: Vec<(String, String)>,
    },
    /// Answer the producer with `reason`.
    Reject {
        decision: Decision,
        reason: String,
        /// `budget_exceeded` or `blocked`.
        code: &'static str,
    },
    /// Routing found no pool.
    NoRoute(NoRoute),
}

impl Verdict<'_> {
    pub fn action(&self) -> &'static str {
        match self {
            Verdict::Dispatch { .. } => "dispatch",
            Verdict::Defer { .. } => "defer",
            Verdict::Reject { .. } | Verdict::NoRoute(_) => "reject",
        }
    }
}

/// The rejection codes a verdict carries.
pub const BUDGET_EXCEEDED: &str = "budget_exceeded";
pub const BLOCKED: &str = "blocked";

/// Builds the routing hints of a policy.
pub fn hints(policy: &Policy) -> PolicyHints {
    PolicyHints {
        downgrade: None,
        downgrade_to: None,
        reroutes: policy
            .reroutes
            .iter()
            .map(|r| route::decide::PolicyReroute {
                from: r.spec.from.clone(),
                to: r.spec.to.clone(),
                error_rate_above: r.spec.error_rate_above,
                p95_latency_ms_above: r.spec.p95_latency_ms_above,
                forced: None,
            })
            .collect(),
        pool_weights: Vec::new(),
    }
}

fn severity(a: LimitAction) -> u8 {
    match a {
        LimitAction::Reject => 2,
        LimitAction::Defer => 1,
        LimitAction::Downgrade => 0,
    }
}

/// The verdict. See the module docs for the steps.
pub fn evaluate<'p>(i: EvalInput<'_, 'p>) -> Verdict<'p> {
    let decision = match decide(&i, i.hints) {
        Ok(d) => d,
        Err(e) => return Verdict::NoRoute(e),
    };
    if i.ran {
        return ran(&i, decision);
    }
    if let Some(b) = super::live::blocked(i.blocks, i.dims, &decision.pool, &decision.model) {
        let reason = format!(
            "{} {} is blocked by intervention {} ({})",
            b.scope.as_str(),
            b.value,
            b.intervention,
            b.reason
        );
        return Verdict::Reject {
            decision,
            reason,
            code: BLOCKED,
        };
    }
    if i.policy.budgets.is_empty() {
        return Verdict::Dispatch {
            decision,
            check: Check::default(),
        };
    }
    let c = check(&i, &decision);
    if !i.released
        && c.over.is_empty()
        && let Some((reason, queues)) = queued_ahead(&i, &c)
    {
        return Verdict::Defer {
            decision,
            reason,
            until_ms: None,
            queues,
        };
    }
    if c.over.is_empty() {
        if let Some(why) = c.downgrade_reason()
            && let Some((decision, check)) = downgraded(&i, &decision.tier, why, None)
        {
            return Verdict::Dispatch { decision, check };
        }
        return Verdict::Dispatch { decision, check: c };
    }
    over_limit(&i, decision, c)
}

/// The verdict on a task that ran already ([`EvalInput::ran`]): its dispatch, charged to
/// every budget it counts against, over its limit or not.
fn ran<'p>(i: &EvalInput<'_, 'p>, decision: Decision) -> Verdict<'p> {
    let mut c = check(i, &decision);
    for o in std::mem::take(&mut c.over) {
        c.cells.push(budget::CellKey {
            budget: o.budget.spec.name.clone(),
            value: o.value,
            bucket: o.budget.window.bucket(i.now_ms),
        });
    }
    Verdict::Dispatch { decision, check: c }
}

fn decide(i: &EvalInput<'_, '_>, hints: &PolicyHints) -> Result<Decision, NoRoute> {
    route::decide(DecideInput {
        task: i.task,
        class: i.class,
        rubric: i.rubric,
        registry: i.registry,
        fleet: i.fleet,
        table: i.table,
        policy: hints,
        seed: i.seed,
    })
}

fn check<'p>(i: &EvalInput<'_, 'p>, d: &Decision) -> Check<'p> {
    budget::check(
        i.policy,
        i.ledger,
        &BTreeMap::new(),
        budget::Routed {
            dims: i.dims,
            pool: &d.pool,
            model: &d.model,
            est: d.est_cost_usd.unwrap_or(0.0),
            priority: i.task.priority,
        },
        i.now_ms,
    )
}

/// The task routed again on a lower tier than `base_tier` (one lower, or `to`), if that
/// fits every budget. A task that named its model is never downgraded.
fn downgraded<'p>(
    i: &EvalInput<'_, 'p>,
    base_tier: &str,
    why: String,
    to: Option<usize>,
) -> Option<(Decision, Check<'p>)> {
    if i.task.model.is_some() {
        return None;
    }
    let mut h = i.hints.clone();
    h.downgrade = Some(why);
    h.downgrade_to = to;
    let d2 = decide(i, &h).ok().filter(|d2| d2.tier != base_tier)?;
    let c2 = check(i, &d2);
    c2.over.is_empty().then_some((d2, c2))
}

/// Tasks already deferred under one of the budgets this task counts against go first:
/// the reason it waits, and the (budget, value) queues it waits in.
fn queued_ahead(i: &EvalInput<'_, '_>, c: &Check<'_>) -> Option<(String, Vec<(String, String)>)> {
    if i.queued.is_empty() {
        return None;
    }
    let ahead: Vec<(String, String, usize)> = c
        .cells
        .iter()
        .map(|k| (k.budget.clone(), k.value.clone()))
        .filter_map(|(b, v)| {
            let n = i.queued.get(&(b.clone(), v.clone())).copied().unwrap_or(0);
            (n > 0).then_some((b, v, n))
        })
        .collect();
    let (b, v, n) = ahead.first()?;
    let reason = format!(
        "{n} task(s) deferred under budget {b} ({v}) are ahead of it; released in priority order when the budget has room (policy {})",
        i.policy.version
    );
    Some((reason, ahead.into_iter().map(|(b, v, _)| (b, v)).collect()))
}

/// A budget at 100%: the most severe action of the budgets over wins.
fn over_limit<'p>(i: &EvalInput<'_, 'p>, decision: Decision, c: Check<'p>) -> Verdict<'p> {
    let worst = c
        .over
        .iter()
        .map(|o| o.budget.spec.action)
        .max_by_key(|a| severity(*a))
        .unwrap_or(LimitAction::Defer);
    let over_text = c
        .over
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let version = &i.policy.version;
    let fallback = match worst {
        LimitAction::Reject => Fallback::Reject,
        LimitAction::Defer => Fallback::Defer,
        LimitAction::Downgrade => {
            // The lowest tier every budget over allows.
            let floor = c
                .over
                .iter()
                .map(|o| {
                    o.budget
                        .spec
                        .min_tier
                        .as_deref()
                        .and_then(|t| i.rubric.tier_index(t))
                        .unwrap_or(0)
                })
                .max()
                .unwrap_or(0);
            let why = format!("{over_text}; downgraded by policy {version}");
            if let Some((decision, check)) = downgraded(i, &decision.tier, why, Some(floor)) {
                return Verdict::Dispatch { decision, check };
            }
            c.over
                .iter()
                .filter(|o| o.budget.spec.action == LimitAction::Downgrade)
                .map(|o| o.budget.spec.then)
                .max_by_key(|f| matches!(f, Fallback::Reject))
                .unwrap_or_default()
        }
    };
    match fallback {
        Fallback::Reject => Verdict::Reject {
            decision,
            reason: format!("{over_text}; rejected by policy {version}"),
            code: BUDGET_EXCEEDED,
        },
        Fallback::Defer => {
            let until = c.over.iter().filter_map(|o| o.resets_at).max();
            let queues = c
                .over
                .iter()
                .map(|o| (o.budget.spec.name.clone(), o.value.clone()))
                .collect();
            let when = until
                .map(|t| format!("deferred until {}", budget::rfc3339(t)))
                .unwrap_or_else(|| "deferred until the limit is raised".into());
            Verdict::Defer {
                decision,
                reason: format!("{over_text}; {when} (policy {version})"),
                until_ms: until,
                queues,
            }
        }
    }
}
