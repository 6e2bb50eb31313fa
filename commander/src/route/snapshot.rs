//! What routing needs from the live fleet state, aggregated per pool once per fleet
//! snapshot (every second) so that a decision costs the same with 10 workers or 10,000.

use std::sync::atomic::{AtomicU64, Ordering};

use rustc_hash::FxHashMap;

use crate::fleet::view::FleetSnapshot;
use crate::fleet::worker::State;

use super::RoutingTable;

/// A worker that could take a targeted long-context task now.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerSlot {
    pub id: String,
    /// Context utilisation 0-1 (0 when unknown).
    pub context: f64,
    /// Free task slots (max in flight − running).
    pub free: u32,
}

/// Why workers of a pool cannot take work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unavailable {
    pub stuck: u32,
    pub error: u32,
    pub lost: u32,
    pub draining: u32,
    pub paused: u32,
}

impl Unavailable {
    pub fn total(&self) -> u32 {
        self.stuck + self.error + self.lost + self.draining + self.paused
    }
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (n, what) in [
            (self.stuck, "STUCK"),
            (self.error, "ERROR"),
            (self.lost, "lost"),
            (self.draining, "draining"),
            (self.paused, "paused"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        parts.join(", ")
    }
}

/// One pool as routing sees it.
#[derive(Debug, Default)]
pub struct PoolState {
    pub name: String,
    /// Workers that can take work: not STUCK, ERROR, lost, draining or paused.
    pub healthy: u32,
    pub unavailable: Unavailable,
    /// Healthy workers above the context threshold.
    pub over_context: u32,
    /// Healthy workers at or under the context threshold with a free slot.
    pub long_context_slots: Vec<WorkerSlot>,
    pub queue_depth: u64,
    pub in_flight: u64,
    pub capacity: u64,
    /// Share of failed tasks over the last minute, when there were enough of them.
    pub error_rate: Option<f64>,
    pub finished_1m: u64,
    /// p95 dispatch latency (intake read → worker receipt) over the last 5 minutes, ms.
    pub p95_latency_ms: Option<f64>,
    /// Tasks this commander routed here since the snapshot was taken (so a burst does not
    /// all land on the pool that looked idlest a second ago).
    pub routed_since: AtomicU64,
}

impl PoolState {
    pub fn workers_seen(&self) -> u32 {
        self.healthy + self.unavailable.total()
    }

    /// Work waiting or running per unit of capacity (capacity 0 counts as 1).
    pub fn load(&self) -> f64 {
        let work = self.queue_depth + self.in_flight + self.routed_since.load(Ordering::Relaxed);
        work as f64 / self.capacity.max(1) as f64
    }
}

/// The fleet as routing sees it.
#[derive(Debug, Default)]
pub struct RouteSnapshot {
    pub at_ms: u64,
    pools: FxHashMap<String, PoolState>,
}

impl RouteSnapshot {
    /// Aggregates `fleet` per pool. Thresholds come from `table` (context threshold,
    /// minimum error samples).
    pub fn build(fleet: &FleetSnapshot, table: &RoutingTable) -> Self {
        let mut pools: FxHashMap<String, PoolState> = FxHashMap::default();
        for name in table.pools.keys() {
            pools.insert(
                name.clone(),
                PoolState {
                    name: name.clone(),
                    ..Default::default()
                },
            );
        }
        for p in &fleet.pools {
            let s = pools.entry(p.name.clone()).or_insert_with(|| PoolState {
                name: p.name.clone(),
                ..Default::default()
            });
            s.queue_depth = p.queue.as_ref().map(|q| q.depth).unwrap_or(0);
            s.in_flight = p.in_flight;
            s.capacity = p.capacity;
            s.finished_1m = p.tasks_per_min;
            s.p95_latency_ms = p.dispatch_latency_ms.p95;
            s.error_rate = (p.tasks_per_min >= table.routing.min_error_samples.max(1))
                .then(|| p.failed_per_min as f64 / p.tasks_per_min as f64);
        }
        let threshold = table.routing.context_threshold;
        for w in &fleet.workers {
            let Some(pool) = w.pool.as_deref() else {
                continue;
            };
            let s = pools.entry(pool.to_string()).or_insert_with(|| PoolState {
                name: pool.to_string(),
                ..Default::default()
            });
            if w.lost {
                s.unavailable.lost += 1;
            } else if w.state == State::Stuck {
                s.unavailable.stuck += 1;
            } else if w.state == State::Error {
                s.unavailable.error += 1;
            } else if w.draining {
                s.unavailable.draining += 1;
            } else if w.paused {
                s.unavailable.paused += 1;
            } else {
                s.healthy += 1;
                let ctx = w.context_utilisation.unwrap_or(0.0);
                if ctx > threshold {
                    s.over_context += 1;
                } else {
                    let max = w.max_in_flight.unwrap_or(1);
                    let free = max.saturating_sub(w.running as u32);
                    if free > 0 {
                        s.long_context_slots.push(WorkerSlot {
                            id: w.id.clone(),
                            context: ctx,
                            free,
                        });
                    }
                }
            }
        }
        Self {
            at_ms: fleet.fleet.at_ms,
            pools,
        }
    }

    pub fn pool(&self, name: &str) -> Option<&PoolState> {
        self.pools.get(name)
    }

    /// For tests and benches: a snapshot from pool states directly.
    pub fn from_pools(at_ms: u64, pools: Vec<PoolState>) -> Self {
        Self {
            at_ms,
            pools: pools.into_iter().map(|p| (p.name.clone(), p)).collect(),
        }
    }

    /// Counts a task routed to `pool` until the next snapshot.
    pub fn note_routed(&self, pool: &str) {
        if let Some(p) = self.pools.get(pool) {
            p.routed_since.fetch_add(1, Ordering::Relaxed);
        }
    }
}
