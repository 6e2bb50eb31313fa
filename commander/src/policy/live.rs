//! The one live snapshot: the routing table from the config, the model registry, the
//! routing rubric and the policy, checked together and swapped whole behind one `ArcSwap`
//! (held by [`super::PolicyEngine`]). A decision reads one `Live` and so sees one
//! combination that was checked as a whole; its [`Generation`] names that combination.
//!
//! A change to any source builds a new `Live` from the one in force with that source
//! replaced, under the engine's gate, after every cross-check (`sources.rs` for the
//! registry and the rubric, [`super::PolicyEngine::parse_and_swap`] for policies).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::classify::rubric::Rubric;
use crate::config::PoolConfig;
use crate::domain::Generation;
use crate::hot::SourceFile;
use crate::registry::Registry;
use crate::route::{PolicyHints, RoutingTable};

use super::Source;
use super::load::{CheckAgainst, Policy};
use super::throttle::Throttles;

/// Dispatch refused for one scope by a `block` intervention (docs/alerts.md).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Block {
    pub scope: super::schema::BlockScope,
    pub value: String,
    /// The intervention that set it, and its alert's message.
    pub intervention: String,
    pub reason: String,
}

/// The first block a task routed to `pool` and `model` falls under.
pub fn blocked<'b>(
    blocks: &'b [Block],
    dims: &crate::domain::TaskDims,
    pool: &str,
    model: &str,
) -> Option<&'b Block> {
    use super::schema::BlockScope as S;
    blocks.iter().find(|b| match b.scope {
        S::Pool => b.value == pool,
        S::Model => b.value == model,
        S::Team => dims.team.as_deref() == Some(b.value.as_str()),
        S::Feature => dims.feature.as_deref() == Some(b.value.as_str()),
    })
}

/// The routing hints a decision reads: the policy's (`evaluate::hints`), with the reroute
/// interventions in force first (they win over the policy's own) and the operators' pool
/// weights. Built when one of them changes, never per decision.
pub fn hints(
    mut hints: PolicyHints,
    reroutes: &[crate::route::decide::PolicyReroute],
    weights: &[(String, f64)],
) -> PolicyHints {
    hints.reroutes.splice(0..0, reroutes.iter().cloned());
    hints.pool_weights = weights.to_vec();
    hints
}

/// Everything a decision reads besides the task and the fleet, swapped as one.
#[derive(Debug)]
pub struct Live {
    /// The policy in force.
    pub policy: Arc<Policy>,
    /// Its routing hints, with the reroute interventions in force first and the pool
    /// weights (`hints`).
    pub hints: PolicyHints,
    pub throttles: Throttles,
    /// Revision in the policy bucket (0: not from the bucket).
    pub revision: u64,
    /// Where the policy in force came from, who applied it and when.
    pub source: Source,
    pub identity: String,
    pub applied_at_ms: u64,
    /// The config's pools and routing settings (fixed while the commander runs).
    pub routing: Arc<RoutingTable>,
    pub registry: Arc<Registry>,
    /// 1 at start, +1 per accepted edit of the registry file.
    pub registry_generation: u64,
    pub rubric: Arc<Rubric>,
    /// 1 at start, +1 per accepted edit of the rubric file (the classifier's cache keys
    /// include it, so an edited rubric is never answered from stale entries).
    pub rubric_generation: u64,
    /// Scopes refused dispatch by `block` interventions in force.
    pub blocks: Arc<Vec<Block>>,
    /// Pools sent to their fallback by `reroute` interventions in force (also in `hints`,
    /// first).
    pub reroutes: Arc<Vec<crate::route::decide::PolicyReroute>>,
    /// Pool weights operators set (`weight_pool`), also in `hints`.
    pub weights: Arc<Vec<(String, f64)>>,
}

impl Live {
    /// The versions a decision made under this snapshot records.
    pub fn generation(&self) -> Generation {
        Generation {
            policy: self.policy.version.clone(),
            rubric: self.rubric_generation,
            registry: self.registry_generation,
        }
    }

    /// The configured pools, when there are any (none: any pool name is accepted).
    pub fn pools(&self) -> Option<&BTreeMap<String, PoolConfig>> {
        (!self.routing.pools.is_empty()).then_some(&self.routing.pools)
    }

    /// What a policy is checked against: these pools, this registry and this rubric.
    pub fn check_against(&self) -> CheckAgainst<'_> {
        CheckAgainst {
            pools: self.pools(),
            registry: &self.registry,
            rubric: &self.rubric,
        }
    }

    /// This snapshot with another registry (already checked against the rest).
    pub fn with_registry(&self, registry: Registry) -> Live {
        Live {
            registry: Arc::new(registry),
            registry_generation: self.registry_generation + 1,
            ..self.sources_kept()
        }
    }

    /// This snapshot with another rubric (already checked against the rest).
    pub fn with_rubric(&self, rubric: Rubric) -> Live {
        Live {
            rubric: Arc::new(rubric),
            rubric_generation: self.rubric_generation + 1,
            ..self.sources_kept()
        }
    }

    /// A copy sharing every part (the parts are shared, not cloned deeply).
    pub(super) fn sources_kept(&self) -> Live {
        Live {
            policy: self.policy.clone(),
            hints: self.hints.clone(),
            throttles: self.throttles.clone(),
            revision: self.revision,
            source: self.source,
            identity: self.identity.clone(),
            applied_at_ms: self.applied_at_ms,
            routing: self.routing.clone(),
            registry: self.registry.clone(),
            registry_generation: self.registry_generation,
            rubric: self.rubric.clone(),
            rubric_generation: self.rubric_generation,
            blocks: self.blocks.clone(),
            reroutes: self.reroutes.clone(),
            weights: self.weights.clone(),
        }
    }
}

/// What the commander starts on: the config's routing table, the registry and rubric as
/// loaded (and checked) at start, the files they are re-read from, and the policy to
/// start with (the built-in one until the bucket or the directory says otherwise).
#[derive(Debug)]
pub struct Start {
    pub routing: RoutingTable,
    pub registry: Registry,
    pub registry_file: Option<PathBuf>,
    pub rubric: Rubric,
    pub rubric_file: Option<PathBuf>,
    pub policy: Policy,
}

/// The files the registry and the rubric are re-read from, and the gate every change of
/// any source passes through.
#[derive(Debug, Clone)]
pub struct SourceFiles {
    pub registry: Arc<SourceFile>,
    pub rubric: Arc<SourceFile>,
    /// Held while a policy, registry or rubric change is checked against the others and
    /// swapped in, so a change is always checked against the snapshot it replaces.
    pub gate: Arc<std::sync::Mutex<()>>,
}
