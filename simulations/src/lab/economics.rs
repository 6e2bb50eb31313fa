//! Routing economics: one seeded task mix, routed by the commander's own decision
//! (`route::decide`, the pure function the task path calls) over the default rubric, the
//! built-in model registry and a healthy fleet of the example's pools, and priced against
//! two fleets that do not route: every task on the frontier model (the top tier's default)
//! and every task on the model that is cheapest over the mix.
//!
//! The mix: six task types of the default rubric in fixed shares; each task's tier is its
//! type's default, one tier up for 15 % of tasks and one down for 15 % (what a classifier
//! reading the task itself would say); tokens are the type's typical counts times a
//! log-uniform factor between 0.5 and 2. The quality proxy is the share of tasks served by
//! a model the rubric lists at or above the task's classified tier.

use std::collections::BTreeMap;

use fleet_commander::classify::Answer;
use fleet_commander::classify::rubric::Rubric;
use fleet_commander::config::{PoolConfig, RoutingConfig};
use fleet_commander::registry::{Registry, TokenUsage};
use fleet_commander::route::snapshot::{PoolState, WorkerSlot};
use fleet_commander::route::{DecideInput, PolicyHints, RouteSnapshot, RoutingTable, decide};
use fleet_worker::message::Task;

use super::agents::Rng;

/// Task types and their share of the mix.
const MIX: [(&str, f64); 6] = [
    ("classification", 0.20),
    ("extraction", 0.15),
    ("summarisation", 0.25),
    ("code_review", 0.15),
    ("code_generation", 0.10),
    ("research", 0.15),
];

/// What one way of serving the mix cost, and how well it served it.
#[derive(Clone, Debug, Default)]
pub struct Served {
    pub usd: f64,
    /// Tasks served by a model listed at or above their tier.
    pub at_tier: u64,
    /// Tasks and USD per model.
    pub by_model: BTreeMap<String, (u64, f64)>,
}

/// The mix under the commander's routing, the frontier model and the cheapest.
#[derive(Clone, Debug)]
pub struct Economics {
    pub tasks: u64,
    pub seed: u64,
    pub routed: Served,
    pub frontier_model: String,
    pub frontier: Served,
    pub cheapest_model: String,
    pub cheapest: Served,
    /// Tasks per classified tier.
    pub tiers: BTreeMap<String, u64>,
}

impl Economics {
    /// Routed cost as a share of always-frontier.
    pub fn ratio(&self) -> f64 {
        self.routed.usd / self.frontier.usd.max(1e-12)
    }
}

/// One task of the mix: its classification and its tokens.
struct Drawn {
    class: Answer,
    usage: TokenUsage,
}

/// The example fleet's pools that the default rubric names, each with eight healthy
/// workers.
fn fleet() -> (RoutingTable, RouteSnapshot) {
    let mut pools = BTreeMap::new();
    for (name, caps) in [
        ("code", vec!["code", "review"]),
        ("docs", vec!["summarise", "extract"]),
        ("general", vec![]),
    ] {
        pools.insert(
            name.to_string(),
            PoolConfig {
                capabilities: caps.into_iter().map(String::from).collect(),
                ..Default::default()
            },
        );
    }
    let states = pools
        .keys()
        .map(|name| PoolState {
            name: name.clone(),
            healthy: 8,
            capacity: 8,
            long_context_slots: (0..8)
                .map(|i| WorkerSlot {
                    id: format!("{name}-w{i}"),
                    context: 0.1,
                    free: 1,
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    let table = RoutingTable {
        pools,
        routing: RoutingConfig {
            default_pool: Some("general".into()),
            ..Default::default()
        },
    };
    (table, RouteSnapshot::from_pools(0, states))
}

fn draw(rng: &mut Rng, rubric: &Rubric) -> Result<Drawn, String> {
    let u = rng.unit();
    let mut acc = 0.0;
    let mut name = MIX[MIX.len() - 1].0;
    for (t, share) in MIX {
        acc += share;
        if u < acc {
            name = t;
            break;
        }
    }
    let spec = rubric
        .task_types
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| format!("the default rubric has no task type {name}"))?;
    let base = rubric
        .tier_index(&spec.default_tier)
        .ok_or_else(|| format!("task type {name} names an unknown tier"))?;
    let top = rubric.tiers.len().saturating_sub(1);
    let tier = match rng.unit() {
        x if x < 0.15 => base.saturating_sub(1),
        x if x < 0.30 => (base + 1).min(top),
        _ => base,
    };
    // Log-uniform between 0.5× and 2× the type's typical tokens.
    let factor = |rng: &mut Rng| (2f64).powf(rng.unit() * 2.0 - 1.0);
    let input = (spec.input_tokens as f64 * factor(rng)).round() as u64;
    let output = (spec.output_tokens as f64 * factor(rng)).round() as u64;
    Ok(Drawn {
        class: Answer {
            task_type: spec.name.clone(),
            tier: rubric.tiers[tier].name.clone(),
            capabilities: spec.capabilities.clone(),
            input_tokens: input,
            output_tokens: output,
            confidence: 0.9,
        },
        usage: TokenUsage {
            input,
            output,
            ..Default::default()
        },
    })
}

/// The highest tier that lists `model` as a candidate.
fn model_tier(rubric: &Rubric, model: &str) -> Option<usize> {
    rubric
        .tiers
        .iter()
        .rposition(|t| t.candidates.iter().any(|c| c.model == model))
}

fn serve(
    served: &mut Served,
    registry: &Registry,
    rubric: &Rubric,
    model: &str,
    d: &Drawn,
) -> Result<(), String> {
    let entry = registry
        .lookup(model)
        .ok_or_else(|| format!("model {model} is not in the registry"))?;
    let usd = entry.cost(&d.usage);
    served.usd += usd;
    let slot = served.by_model.entry(model.to_string()).or_default();
    slot.0 += 1;
    slot.1 += usd;
    if model_tier(rubric, model) >= rubric.tier_index(&d.class.tier) {
        served.at_tier += 1;
    }
    Ok(())
}

/// Routes `tasks` tasks of the mix drawn with `seed`.
pub fn run(tasks: u64, seed: u64) -> Result<Economics, String> {
    let rubric = Rubric::builtin().map_err(|e| e.to_string())?;
    let registry = Registry::builtin().map_err(|e| e.to_string())?;
    let (table, snapshot) = fleet();
    let policy = PolicyHints::default();
    let mut rng = Rng::new(seed);
    let drawn: Vec<Drawn> = (0..tasks)
        .map(|_| draw(&mut rng, &rubric))
        .collect::<Result<_, _>>()?;
    let frontier_model = rubric
        .tiers
        .last()
        .map(|t| t.default_model.clone())
        .ok_or("the default rubric has no tiers")?;
    // The cheapest: of every model the rubric lists, the one the whole mix costs least on.
    let mut listed: Vec<&str> = rubric
        .tiers
        .iter()
        .flat_map(|t| t.candidates.iter().map(|c| c.model.as_str()))
        .collect();
    listed.sort_unstable();
    listed.dedup();
    let mix_cost = |model: &str| {
        registry.lookup(model).map_or(f64::INFINITY, |m| {
            drawn.iter().map(|d| m.cost(&d.usage)).sum::<f64>()
        })
    };
    let cheapest_model = listed
        .iter()
        .min_by(|a, b| mix_cost(a).total_cmp(&mix_cost(b)))
        .map(|m| m.to_string())
        .ok_or("the default rubric lists no model")?;
    let mut e = Economics {
        tasks,
        seed,
        routed: Served::default(),
        frontier_model: frontier_model.clone(),
        frontier: Served::default(),
        cheapest_model: cheapest_model.clone(),
        cheapest: Served::default(),
        tiers: BTreeMap::new(),
    };
    for (n, d) in drawn.iter().enumerate() {
        *e.tiers.entry(d.class.tier.clone()).or_default() += 1;
        let mut task = Task::new("a task of the routing-economics mix");
        task.id = Some(format!("mix-{n}"));
        let decision = decide(DecideInput {
            task: &task,
            class: &d.class,
            rubric: &rubric,
            registry: &registry,
            fleet: &snapshot,
            table: &table,
            policy: &policy,
            seed: seed.wrapping_add(n as u64),
        })
        .map_err(|e| format!("task {n} ({}) has no route: {e}", d.class.task_type))?;
        serve(&mut e.routed, &registry, &rubric, &decision.model, d)?;
        serve(&mut e.frontier, &registry, &rubric, &frontier_model, d)?;
        serve(&mut e.cheapest, &registry, &rubric, &cheapest_model, d)?;
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_serves_every_task_at_its_tier_for_less_than_the_frontier() {
        let e = run(2_000, 7).unwrap();
        assert_eq!(e.routed.at_tier, e.tasks, "{:?}", e.routed.by_model);
        assert_eq!(e.frontier.at_tier, e.tasks);
        // The cheapest model serves only what its tiers cover.
        assert!(e.cheapest.at_tier < e.tasks);
        assert!(e.cheapest.usd <= e.routed.usd && e.routed.usd < e.frontier.usd);
        assert!(e.ratio() > 0.0 && e.ratio() < 1.0, "{}", e.ratio());
    }

    #[test]
    fn the_same_seed_draws_the_same_mix() {
        let (a, b) = (run(500, 3).unwrap(), run(500, 3).unwrap());
        assert_eq!(a.routed.usd, b.routed.usd);
        assert_eq!(a.tiers, b.tiers);
    }
}
