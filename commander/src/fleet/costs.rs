//! Cost attribution: spend, tokens and calls by every dimension, per minute, for 24 hours.
//!
//! Each billed call is booked under one key (team, feature, user tier, prompt variant, task
//! type, tenant, pool, model). Keys are interned once; a minute bucket maps key ids to
//! sums. A query adds up the buckets of its window and groups by the dimensions asked for.
//! Both the number of keys and the number of buckets are bounded.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde::Serialize;

use crate::ingest::normalise::Dims;

const MINUTE_MS: u64 = 60_000;
/// 24 hours of minute buckets.
const MAX_MINUTES: usize = 1_440;
const OTHER: &str = "_other";

/// The dimensions a cost can be grouped by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Team,
    Feature,
    UserTier,
    PromptVariant,
    TaskType,
    Tenant,
    Pool,
    Model,
    Worker,
}

impl Dim {
    pub const NAMES: &'static str =
        "team, feature, user_tier, prompt_variant, task_type, tenant, pool, model, worker";

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim() {
            "team" => Dim::Team,
            "feature" => Dim::Feature,
            "user_tier" => Dim::UserTier,
            "prompt_variant" => Dim::PromptVariant,
            "task_type" => Dim::TaskType,
            "tenant" => Dim::Tenant,
            "pool" => Dim::Pool,
            "model" => Dim::Model,
            "worker" => Dim::Worker,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Dim::Team => "team",
            Dim::Feature => "feature",
            Dim::UserTier => "user_tier",
            Dim::PromptVariant => "prompt_variant",
            Dim::TaskType => "task_type",
            Dim::Tenant => "tenant",
            Dim::Pool => "pool",
            Dim::Model => "model",
            Dim::Worker => "worker",
        }
    }
}

/// Everything a cost is attributed to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CostKey {
    pub dims: Dims,
    pub pool: Option<String>,
    pub model: Option<String>,
    pub worker: Option<String>,
}

impl CostKey {
    fn get(&self, d: Dim) -> Option<&str> {
        match d {
            Dim::Team => self.dims.team.as_deref(),
            Dim::Feature => self.dims.feature.as_deref(),
            Dim::UserTier => self.dims.user_tier.as_deref(),
            Dim::PromptVariant => self.dims.prompt_variant.as_deref(),
            Dim::TaskType => self.dims.task_type.as_deref(),
            Dim::Tenant => self.dims.tenant.as_deref(),
            Dim::Pool => self.pool.as_deref(),
            Dim::Model => self.model.as_deref(),
            Dim::Worker => self.worker.as_deref(),
        }
    }

    fn other() -> Self {
        Self {
            worker: Some(OTHER.into()),
            ..Default::default()
        }
    }
}

/// Sums under one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CostCell {
    /// USD of calls whose model has a price.
    pub cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub calls: u64,
    /// Calls whose model the registry does not know: their cost is not in `cost_usd`.
    pub unknown_cost_calls: u64,
}

impl CostCell {
    fn add(&mut self, o: &CostCell) {
        self.cost_usd += o.cost_usd;
        self.input_tokens += o.input_tokens;
        self.output_tokens += o.output_tokens;
        self.calls += o.calls;
        self.unknown_cost_calls += o.unknown_cost_calls;
    }
}

/// The attribution ledger.
#[derive(Debug, Default)]
pub struct CostLedger {
    keys: Vec<Arc<CostKey>>,
    ids: HashMap<Arc<CostKey>, u32>,
    minutes: VecDeque<(u64, HashMap<u32, CostCell>)>,
    max_keys: usize,
    /// Bookings folded into `_other` because the key table was full.
    pub overflowed: u64,
}

/// One row of a cost query.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostRow {
    /// The group's value per requested dimension (`null`: not set on the spans).
    pub group: BTreeMap<&'static str, Option<String>>,
    #[serde(flatten)]
    pub cell: CostCell,
}

impl CostLedger {
    pub fn new(max_keys: usize) -> Self {
        Self {
            max_keys: max_keys.max(1),
            ..Default::default()
        }
    }

    fn intern(&mut self, key: CostKey) -> u32 {
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        let key = if self.keys.len() >= self.max_keys {
            self.overflowed += 1;
            let other = CostKey::other();
            if let Some(&id) = self.ids.get(&other) {
                return id;
            }
            other
        } else {
            key
        };
        let id = self.keys.len() as u32;
        let key = Arc::new(key);
        self.keys.push(key.clone());
        self.ids.insert(key, id);
        id
    }

    pub fn book(&mut self, now_ms: u64, key: CostKey, cell: CostCell) {
        let id = self.intern(key);
        let minute = now_ms / MINUTE_MS;
        if self.minutes.back().is_none_or(|(m, _)| minute > *m) {
            if self.minutes.len() == MAX_MINUTES {
                self.minutes.pop_front();
            }
            self.minutes.push_back((minute, HashMap::new()));
            self.compact();
        }
        if let Some((_, cells)) = self.minutes.back_mut() {
            cells.entry(id).or_default().add(&cell);
        }
    }

    /// Drops interned keys no bucket uses any more, so the key table tracks the last 24 h.
    fn compact(&mut self) {
        if self.keys.len() < self.max_keys / 2 {
            return;
        }
        let mut used = vec![false; self.keys.len()];
        for (_, cells) in &self.minutes {
            for id in cells.keys() {
                used[*id as usize] = true;
            }
        }
        if used.iter().all(|u| *u) {
            return;
        }
        let mut remap = vec![u32::MAX; self.keys.len()];
        let mut keys = Vec::new();
        for (old, key) in self.keys.iter().enumerate() {
            if used[old] {
                remap[old] = keys.len() as u32;
                keys.push(key.clone());
            }
        }
        for (_, cells) in &mut self.minutes {
            *cells = cells
                .drain()
                .map(|(id, c)| (remap[id as usize], c))
                .collect();
        }
        self.ids = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), i as u32))
            .collect();
        self.keys = keys;
    }

    /// Sums over the last `window_ms`, grouped by `by` (no dimensions: one total row).
    /// Rows are ordered by cost, highest first.
    pub fn query(&self, now_ms: u64, window_ms: u64, by: &[Dim]) -> Vec<CostRow> {
        let from = now_ms.saturating_sub(window_ms) / MINUTE_MS;
        let mut groups: HashMap<Vec<Option<&str>>, CostCell> = HashMap::new();
        for (minute, cells) in self.minutes.iter().rev() {
            if *minute < from {
                break;
            }
            for (id, cell) in cells {
                let key = &self.keys[*id as usize];
                let g: Vec<Option<&str>> = by.iter().map(|d| key.get(*d)).collect();
                groups.entry(g).or_default().add(cell);
            }
        }
        let mut rows: Vec<CostRow> = groups
            .into_iter()
            .map(|(g, cell)| CostRow {
                group: by
                    .iter()
                    .zip(g)
                    .map(|(d, v)| (d.name(), v.map(str::to_string)))
                    .collect(),
                cell,
            })
            .collect();
        rows.sort_by(|a, b| {
            b.cell
                .cost_usd
                .total_cmp(&a.cell.cost_usd)
                .then_with(|| a.group.cmp(&b.group))
        });
        rows
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(team: &str, feature: &str, model: &str) -> CostKey {
        CostKey {
            dims: Dims {
                team: Some(team.into()),
                feature: Some(feature.into()),
                ..Default::default()
            },
            model: Some(model.into()),
            ..Default::default()
        }
    }

    fn cell(cost: f64) -> CostCell {
        CostCell {
            cost_usd: cost,
            calls: 1,
            ..Default::default()
        }
    }

    #[test]
    fn groups_by_requested_dimensions_within_the_window() {
        let mut l = CostLedger::new(100);
        l.book(0, key("a", "x", "m1"), cell(1.0));
        l.book(61_000, key("a", "y", "m1"), cell(2.0));
        l.book(62_000, key("b", "x", "m2"), cell(4.0));
        let by_team = l.query(62_000, 3_600_000, &[Dim::Team]);
        assert_eq!(by_team.len(), 2);
        assert_eq!(by_team[0].group["team"].as_deref(), Some("b"));
        assert_eq!(by_team[1].cell.cost_usd, 3.0);
        assert_eq!(by_team[1].cell.calls, 2);
        let both = l.query(62_000, 3_600_000, &[Dim::Team, Dim::Feature]);
        assert_eq!(both.len(), 3);
        // Only the last minute.
        let recent = l.query(62_000, 1_000, &[]);
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[0].cell.cost_usd, 6.0);
        let unset = l.query(62_000, 3_600_000, &[Dim::Tenant]);
        assert_eq!(unset[0].group["tenant"], None);
    }

    #[test]
    fn key_table_is_bounded() {
        let mut l = CostLedger::new(10);
        for i in 0..100 {
            l.book(0, key(&format!("t{i}"), "f", "m"), cell(1.0));
        }
        assert!(l.key_count() <= 11);
        assert_eq!(l.overflowed, 90);
        let total = l.query(0, 60_000, &[]);
        assert_eq!(total[0].cell.cost_usd, 100.0);
    }
}
