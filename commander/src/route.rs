//! Routing: which pool gets a task, and why. Pure: no I/O, no clock, no randomness.
//!
//! This is the seam the classifier and the full router (fleet snapshot, policy, models)
//! plug into later: they extend [`RouteInput`] and [`Decision`], the intake path calls
//! [`decide`] and acts on its answer, nothing else changes.

use std::collections::BTreeMap;

use fleet_worker::message::Task;
use serde::Serialize;

use crate::config::{PoolConfig, RoutingConfig};

/// What `decide` knows about the fleet.
#[derive(Clone, Debug, Default)]
pub struct RoutingTable {
    pub pools: BTreeMap<String, PoolConfig>,
    pub routing: RoutingConfig,
}

/// Everything a decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct RouteInput<'a> {
    pub task: &'a Task,
    pub table: &'a RoutingTable,
}

/// How a pool was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteRule {
    /// The producer named the pool.
    Requested,
    /// The pool lists every capability the task needs.
    CapabilityMatch,
    /// Nothing matched; the configured default pool takes it.
    DefaultPool,
}

impl RouteRule {
    /// The snake_case name used on spans and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteRule::Requested => "requested",
            RouteRule::CapabilityMatch => "capability_match",
            RouteRule::DefaultPool => "default_pool",
        }
    }
}

/// A routing decision and its reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub pool: String,
    pub rule: RouteRule,
    /// One line an operator can read.
    pub reason: String,
}

/// Why no pool can take a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
pub enum NoRoute {
    #[error("pool {pool:?} is not configured (known pools: {known})")]
    UnknownPool { pool: String, known: String },
    #[error("no pool has all of the capabilities [{needed}] and no default pool is configured")]
    NoCapablePool { needed: String },
    #[error("the task names no pool and no default pool is configured")]
    NoPool,
}

impl NoRoute {
    /// Stable code for the rejection.
    pub fn code(&self) -> &'static str {
        match self {
            NoRoute::UnknownPool { .. } => "unknown_pool",
            NoRoute::NoCapablePool { .. } => "no_capable_pool",
            NoRoute::NoPool => "no_pool",
        }
    }
}

/// Picks the pool for a task.
///
/// 1. A pool the producer names is honoured if it is configured (or if no pools are
///    configured at all, which means "trust producers").
/// 2. Otherwise the first pool, by name, whose capabilities include all of the task's.
///    A task with no capabilities matches no pool by capability; it goes to the default.
/// 3. Otherwise the default pool, if configured; else the task is rejected with the reason.
pub fn decide(input: RouteInput<'_>) -> Result<Decision, NoRoute> {
    let RouteInput { task, table } = input;
    if let Some(pool) = &task.pool {
        if table.pools.is_empty() || table.pools.contains_key(pool) {
            return Ok(Decision {
                pool: pool.clone(),
                rule: RouteRule::Requested,
                reason: format!("producer requested pool {pool}"),
            });
        }
        return Err(NoRoute::UnknownPool {
            pool: pool.clone(),
            known: table.pools.keys().cloned().collect::<Vec<_>>().join(", "),
        });
    }
    if !task.capabilities.is_empty() {
        let capable = table.pools.iter().find(|(_, p)| {
            task.capabilities
                .iter()
                .all(|need| p.capabilities.iter().any(|have| have == need))
        });
        if let Some((name, _)) = capable {
            return Ok(Decision {
                pool: name.clone(),
                rule: RouteRule::CapabilityMatch,
                reason: format!(
                    "pool {name} has capabilities [{}]",
                    task.capabilities.join(", ")
                ),
            });
        }
    }
    match &table.routing.default_pool {
        Some(pool) => Ok(Decision {
            pool: pool.clone(),
            rule: RouteRule::DefaultPool,
            reason: if task.capabilities.is_empty() {
                format!("no pool requested; default pool {pool}")
            } else {
                format!(
                    "no pool has [{}]; default pool {pool}",
                    task.capabilities.join(", ")
                )
            },
        }),
        None if task.capabilities.is_empty() => Err(NoRoute::NoPool),
        None => Err(NoRoute::NoCapablePool {
            needed: task.capabilities.join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(default: Option<&str>) -> RoutingTable {
        let mut pools = BTreeMap::new();
        pools.insert(
            "code".to_string(),
            PoolConfig {
                capabilities: vec!["code".into(), "review".into()],
                description: None,
            },
        );
        pools.insert(
            "docs".to_string(),
            PoolConfig {
                capabilities: vec!["summarise".into()],
                description: None,
            },
        );
        RoutingTable {
            pools,
            routing: RoutingConfig {
                default_pool: default.map(str::to_string),
            },
        }
    }

    fn task(pool: Option<&str>, caps: &[&str]) -> Task {
        let mut t = Task::new("x");
        t.pool = pool.map(str::to_string);
        t.capabilities = caps.iter().map(|c| c.to_string()).collect();
        t
    }

    #[test]
    fn every_rule_and_its_reason() {
        let with_default = table(Some("docs"));
        let no_default = table(None);
        type Want = Result<(&'static str, RouteRule), &'static str>;
        let cases: Vec<(Task, &RoutingTable, Want)> = vec![
            (
                task(Some("code"), &[]),
                &no_default,
                Ok(("code", RouteRule::Requested)),
            ),
            (task(Some("gpu"), &[]), &no_default, Err("unknown_pool")),
            (
                task(None, &["review"]),
                &no_default,
                Ok(("code", RouteRule::CapabilityMatch)),
            ),
            (
                task(None, &["code", "review"]),
                &no_default,
                Ok(("code", RouteRule::CapabilityMatch)),
            ),
            (
                task(None, &["code", "summarise"]),
                &no_default,
                Err("no_capable_pool"),
            ),
            (
                task(None, &["code", "summarise"]),
                &with_default,
                Ok(("docs", RouteRule::DefaultPool)),
            ),
            (
                task(None, &[]),
                &with_default,
                Ok(("docs", RouteRule::DefaultPool)),
            ),
            (task(None, &[]), &no_default, Err("no_pool")),
        ];
        for (t, tbl, want) in cases {
            let got = decide(RouteInput {
                task: &t,
                table: tbl,
            });
            match (got, want) {
                (Ok(d), Ok((pool, rule))) => {
                    assert_eq!((d.pool.as_str(), d.rule), (pool, rule));
                    assert!(!d.reason.is_empty());
                }
                (Err(e), Err(code)) => assert_eq!(e.code(), code),
                (got, want) => panic!("task {t:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn with_no_pools_configured_any_requested_pool_is_trusted() {
        let empty = RoutingTable::default();
        let d = decide(RouteInput {
            task: &task(Some("anything"), &[]),
            table: &empty,
        })
        .unwrap();
        assert_eq!(d.pool, "anything");
    }
}
