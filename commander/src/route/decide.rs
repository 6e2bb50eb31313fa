//! `decide`: who does a task, on which model, and why. Pure: the same inputs give the
//! same decision; no I/O, no clock, no randomness (the power-of-two sample is drawn from
//! a seed the caller derives from the task).
//!
//! The steps, each visible in the reasons of the candidates it touches:
//! 1. **tier**: the classification's tier, or the one below it when the budget hook asks
//!    for a downgrade (`budget_downgrade`);
//! 2. **candidates**: the tier's (model, pool) pairs from the rubric, narrowed to the
//!    producer's pool or model when it named one and that is allowed (`requested`);
//! 3. **exclusions**: pool not configured, paused, missing a capability, model context
//!    window too small, over the producer's cost cap, no healthy worker (STUCK / ERROR /
//!    lost / draining), every healthy worker over the context threshold for a
//!    long-context task, error rate over threshold (its fallback pool is added as a
//!    `health_reroute` candidate), saturated queue;
//! 4. **score**: estimated cost × (1 + load_weight × load), lowest wins (cost tiering with
//!    load balancing on queue depth + in-flight per capacity); ties go by the seed;
//! 5. **worker**: for a long-context task, power of two choices among the pool's workers
//!    under the context threshold (less context, then more free slots);
//! 6. when nothing is eligible: the first healthy configured pool with every capability
//!    the task needs that the rubric did not offer (`capability_match`); else the best
//!    candidate held back only by the fleet's present state — paused, unhealthy, over
//!    context, erroring, saturated — queues it (`degraded`); else the **default pool**;
//!    else a rejection listing every reason (only the task's own needs reject it).

use std::fmt::Write as _;

use fleet_worker::message::Task;
use serde::{Deserialize, Serialize};

use crate::classify::Answer;
use crate::classify::rubric::TierSpec;
use crate::classify::rubric::{LONG_CONTEXT, Rubric};
use crate::registry::{Registry, TokenUsage};

use super::RoutingTable;
use super::snapshot::{PoolState, RouteSnapshot, WorkerSlot};

/// What the policy layer tells routing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyHints {
    /// Downgrade this task, and why (e.g. "team search at 91% of its daily budget").
    pub downgrade: Option<String>,
    /// With `downgrade`: the tier (index into the rubric's tiers) to move to; unset, one
    /// tier lower. Never moves a task up.
    pub downgrade_to: Option<usize>,
    /// The policy's reroutes: while `from` is over a threshold its tasks go to `to`.
    pub reroutes: Vec<PolicyReroute>,
    /// Operators' pool weights: a pool's candidate scores are multiplied by its weight
    /// (above 1 it is chosen less, below 1 more; a pool not listed weighs 1).
    pub pool_weights: Vec<(String, f64)>,
}

/// One `[[reroute]]` of the policy, as routing applies it.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyReroute {
    pub from: String,
    pub to: String,
    pub error_rate_above: Option<f64>,
    pub p95_latency_ms_above: Option<u64>,
    /// Rerouted whatever the thresholds, for this reason (a `reroute` intervention).
    pub forced: Option<String>,
}

/// Everything a decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct DecideInput<'a> {
    pub task: &'a Task,
    pub class: &'a Answer,
    pub rubric: &'a Rubric,
    pub registry: &'a Registry,
    pub fleet: &'a RouteSnapshot,
    pub table: &'a RoutingTable,
    pub policy: &'a PolicyHints,
    /// Drives the power-of-two sample and tie breaks; derive it from the task id.
    pub seed: u64,
}

/// The rule that settled the decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteRule {
    /// The producer's pool and/or model, honoured.
    Requested,
    /// The lowest-scoring candidate of the task's tier (cost, then load).
    CostTier,
    /// The chosen pool stands in for one whose error rate is over its threshold.
    HealthReroute,
    /// Chosen from the tier below, because the budget hook asked.
    BudgetDowngrade,
    /// Every capable candidate is held back by the fleet's present state (unhealthy,
    /// over context, erroring, saturated, paused); the best of them queues the task.
    Degraded,
    /// No rubric candidate was eligible; the first configured pool with every
    /// capability the task needs takes it, on the tier's default model.
    CapabilityMatch,
    /// Nothing eligible; the configured default pool takes it.
    DefaultPool,
}

impl RouteRule {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteRule::Requested => "requested",
            RouteRule::CostTier => "cost_tier",
            RouteRule::HealthReroute => "health_reroute",
            RouteRule::BudgetDowngrade => "budget_downgrade",
            RouteRule::Degraded => "degraded",
            RouteRule::CapabilityMatch => "capability_match",
            RouteRule::DefaultPool => "default_pool",
        }
    }
}

/// One alternative and what became of it. `code` is stable: `chosen`, `outscored`,
/// `not_configured`, `paused`, `capability`, `context_window`, `max_cost`, `unhealthy`,
/// `context`, `error_rate`, `policy_reroute`, `saturated`, `not_requested`, `budget_downgrade`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub pool: String,
    pub model: String,
    pub tier: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub est_cost_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<f64>,
    /// Lower is better; set for every candidate that was eligible.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    pub code: String,
    pub reason: String,
}

/// A routing decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub pool: String,
    pub model: String,
    /// Set when the task goes to one worker's own subject.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    pub rule: RouteRule,
    /// One line an operator can read.
    pub reason: String,
    /// The tier the model was picked from (after any downgrade).
    pub tier: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub est_cost_usd: Option<f64>,
    pub candidates: Vec<Candidate>,
}

/// Why no pool can take a task; the message is what the producer reads.
#[derive(Clone, Debug, PartialEq, Serialize, thiserror::Error)]
pub enum NoRoute {
    #[error("pool {pool:?} is not configured (known pools: {known})")]
    UnknownPool { pool: String, known: String },
    #[error("model {model:?} is not in the model registry")]
    UnknownModel { model: String },
    #[error("no pool can take this task and no default pool is configured: {why}")]
    NoEligible {
        why: String,
        candidates: Vec<Candidate>,
    },
}

impl NoRoute {
    pub fn code(&self) -> &'static str {
        match self {
            NoRoute::UnknownPool { .. } => "unknown_pool",
            NoRoute::UnknownModel { .. } => "unknown_model",
            NoRoute::NoEligible { .. } => "no_eligible_pool",
        }
    }
    pub fn candidates(&self) -> &[Candidate] {
        match self {
            NoRoute::NoEligible { candidates, .. } => candidates,
            _ => &[],
        }
    }
}

/// Exclusions that describe the fleet's present state rather than the task's needs.
const SOFT: [&str; 6] = [
    "paused",
    "unhealthy",
    "context",
    "error_rate",
    "policy_reroute",
    "saturated",
];

/// Working state of one candidate.
struct Cand<'a> {
    pool: &'a str,
    model: &'a str,
    tier: &'a str,
    via: Via,
    state: Option<&'a PoolState>,
    est: Option<f64>,
    load: Option<f64>,
    score: Option<f64>,
    excluded: Option<(&'static str, String)>,
    /// Excluded only by the fleet's present state: usable when nothing else is.
    soft: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Tier,
    /// Stands in for a pool over its error threshold.
    Reroute,
}

/// What every step of a decision reads: the input, and what the first look at the task
/// works out once (what it asked for, what it needs, its token estimate).
struct Look<'a> {
    task: &'a Task,
    class: &'a Answer,
    rubric: &'a Rubric,
    registry: &'a Registry,
    fleet: &'a RouteSnapshot,
    table: &'a RoutingTable,
    policy: &'a PolicyHints,
    seed: u64,
    requested_pool: Option<&'a str>,
    requested_model: Option<&'a str>,
    usage: TokenUsage,
    needs: Vec<&'a str>,
    long_context: bool,
}

impl Look<'_> {
    fn requested(&self) -> bool {
        self.requested_pool.is_some() || self.requested_model.is_some()
    }

    fn est(&self, model: &str) -> Option<f64> {
        self.registry.lookup(model).map(|m| m.cost(&self.usage))
    }
}

/// The tier a decision picks from, and the one it was moved down from, if any.
struct TierChoice<'a> {
    tier: &'a TierSpec,
    /// The budget's reason, when the task was downgraded.
    downgrade: Option<&'a String>,
    base: usize,
}

/// Decides. See the module docs for the steps; each is a function below.
pub fn decide(input: DecideInput<'_>) -> Result<Decision, NoRoute> {
    let look = first_look(input)?;
    let tier = pick_tier(&look)?;
    let (mut cands, out) = candidates(&look, &tier);
    apply_exclusions(&look, &mut cands);
    let best = match score(&look, &tier, &mut cands, out) {
        Scored::Best(best, out) => (best, out),
        Scored::Settled(result) => return result,
    };
    Ok(choose(&look, &tier, &cands, best))
}

/// Checks what the producer asked for and works out what the task needs.
fn first_look(input: DecideInput<'_>) -> Result<Look<'_>, NoRoute> {
    let DecideInput {
        task,
        class,
        rubric,
        registry,
        fleet,
        table,
        policy,
        seed,
    } = input;
    let routing = &table.routing;
    let requested_pool = task.pool.as_deref().filter(|_| routing.allow_explicit_pool);
    if let Some(p) = requested_pool
        && !table.pools.is_empty()
        && !table.pools.contains_key(p)
    {
        return Err(NoRoute::UnknownPool {
            pool: p.to_string(),
            known: table.pools.keys().cloned().collect::<Vec<_>>().join(", "),
        });
    }
    let requested_model = task
        .model
        .as_deref()
        .filter(|_| routing.allow_explicit_model);
    if let Some(m) = requested_model
        && registry.lookup(m).is_none()
    {
        return Err(NoRoute::UnknownModel {
            model: m.to_string(),
        });
    }
    Ok(Look {
        task,
        class,
        rubric,
        registry,
        fleet,
        table,
        policy,
        seed,
        requested_pool,
        requested_model,
        usage: TokenUsage {
            input: class.input_tokens,
            output: class.output_tokens,
            ..Default::default()
        },
        needs: class
            .capabilities
            .iter()
            .map(String::as_str)
            .filter(|c| *c != LONG_CONTEXT)
            .collect(),
        long_context: class.is_long_context(),
    })
}

/// Step 1: the classification's tier, or a lower one when the budget asks for it.
fn pick_tier<'a>(look: &Look<'a>) -> Result<TierChoice<'a>, NoRoute> {
    let rubric = look.rubric;
    let base = rubric
        .tier_index(&look.class.tier)
        .unwrap_or(0)
        .min(rubric.tiers.len().saturating_sub(1));
    let downgrade = look
        .policy
        .downgrade
        .as_ref()
        .filter(|_| base > 0 && look.requested_model.is_none());
    let idx = if downgrade.is_some() {
        look.policy
            .downgrade_to
            .map(|t| t.min(base))
            .unwrap_or(base - 1)
    } else {
        base
    };
    let Some(tier) = rubric.tiers.get(idx) else {
        return Err(NoRoute::NoEligible {
            why: "the rubric has no tiers".into(),
            candidates: Vec::new(),
        });
    };
    Ok(TierChoice {
        tier,
        downgrade,
        base,
    })
}

/// Step 2: the tier's (model, pool) pairs, narrowed to what the producer asked for; and
/// the alternatives set aside on the way (the skipped tier's, the ones not asked for).
fn candidates<'a>(look: &Look<'a>, tier: &TierChoice<'a>) -> (Vec<Cand<'a>>, Vec<Candidate>) {
    let rubric = look.rubric;
    let mut cands: Vec<Cand<'_>> = Vec::with_capacity(12);
    let mut out: Vec<Candidate> = Vec::new();
    if let Some(reason) = tier.downgrade
        && let Some(orig) = rubric.tiers.get(tier.base)
    {
        for c in &orig.candidates {
            for p in &c.pools {
                out.push(Candidate {
                    pool: p.clone(),
                    model: c.model.clone(),
                    tier: orig.name.clone(),
                    est_cost_usd: look.est(&c.model),
                    load: None,
                    score: None,
                    code: "budget_downgrade".into(),
                    reason: format!("tier {} skipped: {reason}", orig.name),
                });
            }
        }
    }
    let tier = tier.tier;
    let model_for_request = look.requested_model.map(|m| {
        // The rubric's spelling when it lists the model, so candidates compare equal.
        rubric
            .tiers
            .iter()
            .flat_map(|t| &t.candidates)
            .find(|c| {
                look.registry.lookup(&c.model).map(|e| &e.name)
                    == look.registry.lookup(m).map(|e| &e.name)
            })
            .map(|c| c.model.as_str())
            .unwrap_or(m)
    });
    let fleet = look.fleet;
    match (look.requested_pool, model_for_request) {
        (None, None) => {
            for c in &tier.candidates {
                for p in &c.pools {
                    cands.push(new_cand(p, &c.model, &tier.name, Via::Tier, fleet));
                }
            }
        }
        (pool, model) => {
            // The producer narrowed the choice: keep the tier's pairs that match, else
            // build the pair it asked for.
            for c in &tier.candidates {
                for p in &c.pools {
                    let keep =
                        pool.is_none_or(|rp| rp == p) && model.is_none_or(|rm| rm == c.model);
                    if keep {
                        cands.push(new_cand(p, &c.model, &tier.name, Via::Tier, fleet));
                    } else {
                        out.push(Candidate {
                            pool: p.clone(),
                            model: c.model.clone(),
                            tier: tier.name.clone(),
                            est_cost_usd: look.est(&c.model),
                            load: None,
                            score: None,
                            code: "not_requested".into(),
                            reason: format!("producer asked for {}", describe_request(pool, model)),
                        });
                    }
                }
            }
            if cands.is_empty() {
                cands = requested_pair(look, tier, pool, model);
            }
        }
    }
    (cands, out)
}

/// The pair the producer asked for when the tier offers none that matches.
fn requested_pair<'a>(
    look: &Look<'a>,
    tier: &'a TierSpec,
    pool: Option<&'a str>,
    model: Option<&'a str>,
) -> Vec<Cand<'a>> {
    let fleet = look.fleet;
    match (pool, model) {
        (Some(p), Some(m)) => vec![new_cand(p, m, &tier.name, Via::Tier, fleet)],
        (Some(p), None) => vec![new_cand(
            p,
            &tier.default_model,
            &tier.name,
            Via::Tier,
            fleet,
        )],
        (None, Some(m)) => {
            // Pools that run the model in any tier, else every configured pool.
            let mut pools: Vec<&str> = look
                .rubric
                .tiers
                .iter()
                .flat_map(|t| &t.candidates)
                .filter(|c| c.model == m)
                .flat_map(|c| c.pools.iter().map(String::as_str))
                .collect();
            if pools.is_empty() {
                pools = look.table.pools.keys().map(String::as_str).collect();
            }
            pools.sort_unstable();
            pools.dedup();
            pools
                .into_iter()
                .map(|p| new_cand(p, m, &tier.name, Via::Tier, fleet))
                .collect()
        }
        (None, None) => Vec::new(),
    }
}

/// Step 3: the first rule that excludes each candidate; a pool over its error threshold
/// adds its fallback as a candidate (so this iterates by index).
fn apply_exclusions<'a>(look: &Look<'a>, cands: &mut Vec<Cand<'a>>) {
    let requested = look.requested();
    let mut i = 0;
    while i < cands.len() {
        let (excl, reroute_to) = exclude(&cands[i], look, requested);
        let c = &mut cands[i];
        c.est = look.est(c.model);
        c.load = c.state.map(PoolState::load);
        if let Some((code, why)) = excl {
            c.soft = SOFT.contains(&code);
            c.excluded = Some((code, why));
        }
        if let Some(fb) = reroute_to
            && !cands
                .iter()
                .any(|o| o.pool == fb && o.model == cands[i].model)
        {
            let model = cands[i].model;
            let tier_name = cands[i].tier;
            let pool = look
                .table
                .pools
                .get_key_value(fb)
                .map(|(k, _)| k.as_str())
                .unwrap_or(fb);
            cands.push(new_cand(pool, model, tier_name, Via::Reroute, look.fleet));
        }
        i += 1;
    }
}

/// What scoring came to: the best candidate, or a decision (or rejection) settled without
/// one.
enum Scored {
    Best(usize, Vec<Candidate>),
    Settled(Result<Decision, NoRoute>),
}

/// Step 4, and step 6 when nothing is eligible: scores the eligible candidates; without
/// one, a capability match, else the best held back only by the fleet's present state,
/// else the default pool or a rejection.
fn score(
    look: &Look<'_>,
    tier: &TierChoice<'_>,
    cands: &mut [Cand<'_>],
    out: Vec<Candidate>,
) -> Scored {
    let weight = look.table.routing.load_weight;
    let score = |c: &mut Cand<'_>| {
        // Unknown prices rank after every known one but still rank among themselves.
        let cost = c.est.unwrap_or(1e6);
        c.score = Some(cost * (1.0 + weight * c.load.unwrap_or(0.0)) * pool_weight(look, c.pool));
    };
    cands
        .iter_mut()
        .filter(|c| c.excluded.is_none())
        .for_each(score);
    if let Some(best) = pick_best(cands, look.seed) {
        return Scored::Best(best, out);
    }
    let tier = tier.tier;
    if let Some(mut d) = capability_match(
        cands,
        &look.needs,
        look.table,
        look.fleet,
        look.registry,
        tier,
        &look.usage,
    ) {
        let mut candidates = finish(cands, None, out);
        let why = summarise(&candidates);
        d.reason = format!(
            "no candidate of tier {} was eligible ({why}); {}",
            tier.name, d.reason
        );
        candidates.append(&mut d.candidates);
        d.candidates = candidates;
        return Scored::Settled(Ok(d));
    }
    // Held back only by the fleet's present state (unhealthy, busy, erroring, full,
    // paused): the queue holds the task until the pool recovers, which beats rejecting
    // work a pool can do.
    cands.iter_mut().filter(|c| c.soft).for_each(score);
    if let Some(best) = pick_best(cands, look.seed) {
        return Scored::Best(best, out);
    }
    Scored::Settled(default_pool_or_reject(look, tier, cands, out))
}

/// Step 6's last resort: the default pool, or a rejection that says everything.
fn default_pool_or_reject(
    look: &Look<'_>,
    tier: &TierSpec,
    cands: &[Cand<'_>],
    out: Vec<Candidate>,
) -> Result<Decision, NoRoute> {
    let candidates = finish(cands, None, out);
    let why = summarise(&candidates);
    let Some(dp) = &look.table.routing.default_pool else {
        return Err(NoRoute::NoEligible { why, candidates });
    };
    let model = tier.default_model.clone();
    Ok(Decision {
        pool: dp.clone(),
        est_cost_usd: look.est(&model),
        model,
        worker: None,
        rule: RouteRule::DefaultPool,
        reason: format!(
            "no candidate of tier {} was eligible ({why}); default pool {dp}",
            tier.name
        ),
        tier: tier.name.clone(),
        candidates,
    })
}

/// Step 5 and the decision: the worker for a long-context task, the rule, the reason.
fn choose(
    look: &Look<'_>,
    tier: &TierChoice<'_>,
    cands: &[Cand<'_>],
    (bi, out): (usize, Vec<Candidate>),
) -> Decision {
    let chosen = &cands[bi];
    let worker = if look.long_context && look.table.routing.target_long_context {
        chosen
            .state
            .and_then(|s| two_choices(&s.long_context_slots, look.seed))
    } else {
        None
    };
    let rule = if look.requested() {
        RouteRule::Requested
    } else if chosen.excluded.is_some() {
        RouteRule::Degraded
    } else if chosen.via == Via::Reroute {
        RouteRule::HealthReroute
    } else if tier.downgrade.is_some() {
        RouteRule::BudgetDowngrade
    } else {
        RouteRule::CostTier
    };
    let reason = reason(look, tier, cands, chosen, rule, worker);
    Decision {
        pool: chosen.pool.to_string(),
        model: chosen.model.to_string(),
        worker: worker.map(|w| w.id.clone()),
        rule,
        reason,
        tier: tier.tier.name.clone(),
        est_cost_usd: chosen.est,
        candidates: finish(cands, Some(bi), out),
    }
}

/// The one line an operator reads.
fn reason(
    look: &Look<'_>,
    tier: &TierChoice<'_>,
    cands: &[Cand<'_>],
    chosen: &Cand<'_>,
    rule: RouteRule,
    worker: Option<&WorkerSlot>,
) -> String {
    let mut reason = String::with_capacity(160);
    let _ = match rule {
        RouteRule::Requested => write!(
            reason,
            "producer asked for {}; ",
            describe_request(look.requested_pool, look.requested_model)
        ),
        RouteRule::HealthReroute => write!(reason, "rerouted from an unhealthy pool; "),
        RouteRule::BudgetDowngrade => write!(
            reason,
            "downgraded to tier {} ({}); ",
            tier.tier.name,
            tier.downgrade.map(String::as_str).unwrap_or("")
        ),
        RouteRule::Degraded => write!(
            reason,
            "no pool is fully eligible; queued where only the fleet's state holds it back ({}); ",
            chosen
                .excluded
                .as_ref()
                .map(|(_, w)| w.as_str())
                .unwrap_or("")
        ),
        _ => Ok(()),
    };
    let _ = write!(
        reason,
        "{} on {} for {}/{}: {}",
        chosen.model,
        chosen.pool,
        look.class.task_type,
        tier.tier.name,
        score_text(chosen.est, chosen.load, look.table.routing.load_weight)
    );
    let w = pool_weight(look, chosen.pool);
    if w != 1.0 {
        let _ = write!(reason, " × pool weight {w} (set by an operator)");
    }
    let eligible = cands.iter().filter(|c| c.score.is_some()).count();
    if eligible > 1 {
        let _ = write!(reason, ", lowest of {eligible} eligible");
    }
    if let Some(w) = worker {
        let _ = write!(
            reason,
            "; worker {} (context {:.0}%, {} free)",
            w.id,
            w.context * 100.0,
            w.free
        );
    }
    reason
}

fn better(score: f64, idx: usize, best_score: f64, best: usize, seed: u64) -> bool {
    score < best_score || (score == best_score && tiebreak(idx, seed) < tiebreak(best, seed))
}

fn pick_best(cands: &[Cand<'_>], seed: u64) -> Option<usize> {
    let mut best: Option<(f64, usize)> = None;
    for (i, c) in cands.iter().enumerate() {
        let Some(s) = c.score else { continue };
        match best {
            Some((bs, b)) if !better(s, i, bs, b, seed) => {}
            _ => best = Some((s, i)),
        }
    }
    best.map(|(_, i)| i)
}

/// A per-seed order on candidate positions, so equal scores spread across pools.
fn tiebreak(idx: usize, seed: u64) -> u64 {
    splitmix(seed ^ (idx as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Power of two choices: two workers drawn by the seed, the one with less context (then
/// more free slots) wins.
fn two_choices(slots: &[WorkerSlot], seed: u64) -> Option<&WorkerSlot> {
    match slots.len() {
        0 => None,
        1 => slots.first(),
        n => {
            let a = (splitmix(seed) % n as u64) as usize;
            let mut b = (splitmix(seed.rotate_left(17)) % (n as u64 - 1)) as usize;
            if b >= a {
                b += 1;
            }
            let (x, y) = (&slots[a], &slots[b]);
            let x_first =
                (x.context, std::cmp::Reverse(x.free)) <= (y.context, std::cmp::Reverse(y.free));
            Some(if x_first { x } else { y })
        }
    }
}

fn new_cand<'a>(
    pool: &'a str,
    model: &'a str,
    tier: &'a str,
    via: Via,
    fleet: &'a RouteSnapshot,
) -> Cand<'a> {
    Cand {
        pool,
        model,
        tier,
        via,
        state: fleet.pool(pool),
        est: None,
        load: None,
        score: None,
        excluded: None,
        soft: false,
    }
}

/// Why a candidate is out (its code and reason), and the pool to reroute to when a pool's
/// error rate or the policy sends its work elsewhere.
type Exclusion<'t> = ((&'static str, String), Option<&'t str>);

/// The first rule that excludes a candidate, and the pool to reroute to when the
/// exclusion is the error rate. The task's own needs come first (pool, model), then the
/// fleet's present state, which a producer's explicit request overrides.
fn exclude<'t>(
    c: &Cand<'_>,
    look: &Look<'t>,
    requested: bool,
) -> (Option<(&'static str, String)>, Option<&'t str>) {
    let found = pool_rules(c, look, requested)
        .or_else(|| model_rules(c, look))
        .or_else(|| {
            if requested {
                None
            } else {
                c.state.and_then(|s| fleet_rules(c, s, look))
            }
        });
    match found {
        Some((why, to)) => (Some(why), to),
        None => (None, None),
    }
}

/// The pool: configured, not paused, with every capability the task needs.
fn pool_rules<'t>(c: &Cand<'_>, look: &Look<'t>, requested: bool) -> Option<Exclusion<'t>> {
    let table = look.table;
    let Some(cfg) = table.pools.get(c.pool) else {
        return (!table.pools.is_empty()).then(|| {
            (
                (
                    "not_configured",
                    format!("pool {} is not configured", c.pool),
                ),
                None,
            )
        });
    };
    if cfg.paused {
        return Some((("paused", format!("pool {} is paused", c.pool)), None));
    }
    let missing: Vec<&str> = look
        .needs
        .iter()
        .copied()
        .filter(|n| !cfg.capabilities.iter().any(|h| h == n))
        .collect();
    (!missing.is_empty() && !requested).then(|| {
        (
            (
                "capability",
                format!("pool {} lacks [{}]", c.pool, missing.join(", ")),
            ),
            None,
        )
    })
}

/// The model: a context window that holds the task, a price under the task's cap.
fn model_rules<'t>(c: &Cand<'_>, look: &Look<'t>) -> Option<Exclusion<'t>> {
    let m = look.registry.lookup(c.model)?;
    let want = look.class.input_tokens + look.class.output_tokens;
    if m.context_window < want {
        return Some((
            (
                "context_window",
                format!(
                    "{} holds {} tokens; the task needs ~{want}",
                    c.model, m.context_window
                ),
            ),
            None,
        ));
    }
    let cap = look.task.max_cost_usd?;
    let est = m.cost(&look.usage);
    (est > cap).then(|| {
        (
            (
                "max_cost",
                format!("estimated ${est:.4} is over the task's cap ${cap:.4}"),
            ),
            None,
        )
    })
}

/// The fleet's present state: a healthy worker, context headroom for a long-context task,
/// the policy's reroutes, the pool's error rate, its queue.
fn fleet_rules<'t>(c: &Cand<'_>, s: &PoolState, look: &Look<'t>) -> Option<Exclusion<'t>> {
    let table = look.table;
    if s.workers_seen() > 0 && s.healthy == 0 {
        return Some((
            (
                "unhealthy",
                format!(
                    "no healthy worker in {} ({})",
                    c.pool,
                    s.unavailable.describe()
                ),
            ),
            None,
        ));
    }
    if look.long_context && s.healthy > 0 && s.long_context_slots.is_empty() && s.over_context > 0 {
        return Some((
            (
                "context",
                format!(
                    "all {} healthy workers of {} are over {:.0}% context or busy",
                    s.healthy,
                    c.pool,
                    table.routing.context_threshold * 100.0
                ),
            ),
            None,
        ));
    }
    // The policy's reroutes come first: they name where the work goes.
    if let Some(r) = policy_reroute(c, s, &look.policy.reroutes) {
        return Some(r);
    }
    let pool_cfg = table.pools.get(c.pool);
    let threshold = pool_cfg
        .and_then(|p| p.max_error_rate)
        .unwrap_or(table.routing.max_error_rate);
    if let Some(rate) = s.error_rate
        && rate > threshold
    {
        let fb = pool_cfg.and_then(|p| p.fallback_pool.as_deref());
        let to = fb.map(|f| format!("; rerouted to {f}")).unwrap_or_default();
        return Some((
            (
                "error_rate",
                format!(
                    "{} failed {:.0}% of {} tasks in the last minute (threshold {:.0}%){to}",
                    c.pool,
                    rate * 100.0,
                    s.finished_1m,
                    threshold * 100.0
                ),
            ),
            fb,
        ));
    }
    let max = pool_cfg.and_then(|p| p.max_queue_depth)?;
    (s.queue_depth >= max).then(|| {
        (
            (
                "saturated",
                format!("{} queue {} is at its limit {max}", c.pool, s.queue_depth),
            ),
            None,
        )
    })
}

/// A `[[reroute]]` of the policy whose threshold the candidate's pool is over.
fn policy_reroute<'t>(
    c: &Cand<'_>,
    s: &PoolState,
    reroutes: &'t [PolicyReroute],
) -> Option<Exclusion<'t>> {
    let r = reroutes.iter().find(|r| r.from == c.pool)?;
    let errors = r
        .error_rate_above
        .zip(s.error_rate)
        .filter(|(limit, rate)| rate > limit)
        .map(|(limit, rate)| {
            format!(
                "{} failed {:.0}% of {} tasks in the last minute (policy threshold {:.0}%)",
                c.pool,
                rate * 100.0,
                s.finished_1m,
                limit * 100.0
            )
        });
    let latency = r
        .p95_latency_ms_above
        .zip(s.p95_latency_ms)
        .filter(|(limit, p95)| *p95 > *limit as f64)
        .map(|(limit, p95)| {
            format!(
                "{} p95 dispatch latency {p95:.0} ms is over the policy's {limit} ms",
                c.pool
            )
        });
    let why = r.forced.clone().or(errors).or(latency)?;
    Some((
        ("policy_reroute", format!("{why}; rerouted to {}", r.to)),
        Some(r.to.as_str()),
    ))
}

/// The operators' weight of a pool (1 when none is set).
fn pool_weight(look: &Look<'_>, pool: &str) -> f64 {
    look.policy
        .pool_weights
        .iter()
        .find(|(p, _)| p == pool)
        .map_or(1.0, |(_, w)| *w)
}

fn score_text(est: Option<f64>, load: Option<f64>, weight: f64) -> String {
    match est {
        Some(e) => format!(
            "est ${e:.5} × (1 + {weight} × load {:.2})",
            load.unwrap_or(0.0)
        ),
        None => "price unknown (ranked last)".to_string(),
    }
}

fn describe_request(pool: Option<&str>, model: Option<&str>) -> String {
    match (pool, model) {
        (Some(p), Some(m)) => format!("pool {p} and model {m}"),
        (Some(p), None) => format!("pool {p}"),
        (None, Some(m)) => format!("model {m}"),
        (None, None) => "nothing".into(),
    }
}

fn finish(cands: &[Cand<'_>], chosen: Option<usize>, mut out: Vec<Candidate>) -> Vec<Candidate> {
    let best = chosen.map(|i| (&cands[i], cands[i].score.unwrap_or(0.0)));
    let mut list: Vec<Candidate> = cands
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (code, reason) = if Some(i) == chosen {
                (
                    "chosen".to_string(),
                    match c.via {
                        Via::Reroute => "fallback pool for an unhealthy pool; lowest score".into(),
                        Via::Tier => "lowest score".to_string(),
                    },
                )
            } else if let Some((code, why)) = &c.excluded {
                (code.to_string(), why.clone())
            } else if let (Some(s), Some((b, bs))) = (c.score, best) {
                (
                    "outscored".to_string(),
                    format!("score {s:.6} vs {bs:.6} for {} on {}", b.model, b.pool),
                )
            } else {
                ("outscored".to_string(), "not chosen".to_string())
            };
            Candidate {
                pool: c.pool.to_string(),
                model: c.model.to_string(),
                tier: c.tier.to_string(),
                est_cost_usd: c.est,
                load: c.load,
                score: c.score,
                code,
                reason,
            }
        })
        .collect();
    list.append(&mut out);
    list
}

/// "3 capability, 1 unhealthy: no healthy worker in code (2 STUCK)" — counts by code and
/// the first reason of each.
fn summarise(cands: &[Candidate]) -> String {
    let mut seen: Vec<(&str, usize, &str)> = Vec::new();
    for c in cands {
        match seen.iter_mut().find(|(code, _, _)| *code == c.code) {
            Some(e) => e.1 += 1,
            None => seen.push((&c.code, 1, &c.reason)),
        }
    }
    if seen.is_empty() {
        return "the tier has no candidates".into();
    }
    seen.iter()
        .map(|(code, n, first)| format!("{n}× {code} (e.g. {first})"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The first healthy configured pool with every needed capability that the rubric did
/// not already offer, on the tier's default model.
fn capability_match(
    cands: &[Cand<'_>],
    needs: &[&str],
    table: &RoutingTable,
    fleet: &RouteSnapshot,
    registry: &Registry,
    tier: &crate::classify::rubric::TierSpec,
    usage: &TokenUsage,
) -> Option<Decision> {
    if needs.is_empty() {
        return None;
    }
    let (name, _) = table.pools.iter().find(|(name, cfg)| {
        !cands.iter().any(|c| c.pool == name.as_str())
            && !cfg.paused
            && needs
                .iter()
                .all(|n| cfg.capabilities.iter().any(|h| h == n))
            && fleet
                .pool(name)
                .is_none_or(|s| s.workers_seen() == 0 || s.healthy > 0)
    })?;
    let model = tier.default_model.clone();
    let est = registry.lookup(&model).map(|m| m.cost(usage));
    Some(Decision {
        pool: name.clone(),
        model: model.clone(),
        worker: None,
        rule: RouteRule::CapabilityMatch,
        reason: format!(
            "pool {name} has [{}], tier default model {model}",
            needs.join(", ")
        ),
        tier: tier.name.clone(),
        est_cost_usd: est,
        candidates: vec![Candidate {
            pool: name.clone(),
            model,
            tier: tier.name.clone(),
            est_cost_usd: est,
            load: fleet.pool(name).map(PoolState::load),
            score: None,
            code: "chosen".into(),
            reason: "first configured pool (by name) with every capability".into(),
        }],
    })
}
