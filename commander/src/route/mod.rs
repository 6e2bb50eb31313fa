//! Routing: which pool, model and (for long-context work) worker gets a task, and why.
//!
//! [`decide()`] is pure; [`snapshot::RouteSnapshot`] is what it knows of the live fleet,
//! rebuilt from the fleet snapshot once a second.

pub mod decide;
pub mod snapshot;

use std::collections::BTreeMap;

use crate::config::{PoolConfig, RoutingConfig};

pub use decide::{Candidate, DecideInput, Decision, NoRoute, PolicyHints, RouteRule, decide};
pub use snapshot::RouteSnapshot;

/// The configured pools and routing thresholds.
#[derive(Clone, Debug, Default)]
pub struct RoutingTable {
    pub pools: BTreeMap<String, PoolConfig>,
    pub routing: RoutingConfig,
}

#[cfg(test)]
mod tests;
