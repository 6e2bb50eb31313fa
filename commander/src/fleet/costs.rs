//! Cost attribution: spend, tokens and calls by every dimension: per minute for the last
//! hour, per hour for the 24 hours before.
//!
//! Each billed call is booked under one key (team, feature, user tier, prompt variant, task
//! type, tenant, pool, model); per-worker spend lives in each worker's own state, so the
//! ledger's size does not grow with the fleet. Keys are interned once; a bucket maps key
//! ids to sums. A query adds up the buckets of its window (windows over an hour count their
//! oldest part in whole hours) and groups by the dimensions asked for. Keys (capped) and
//! buckets (60 + 24) are bounded: at most 84 × `max_cost_keys` cells.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use rustc_hash::{FxHashMap, FxHasher};
use serde::Serialize;

use crate::domain::Dims;

const MINUTE_MS: u64 = 60_000;
/// The last hour is kept per minute…
const MAX_MINUTES: usize = 60;
/// …and the 24 hours before it per hour.
const MAX_HOURS: usize = 24;
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
}

impl Dim {
    pub const NAMES: &'static str =
        "team, feature, user_tier, prompt_variant, task_type, tenant, pool, model";

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
        }
    }
}

/// Everything a cost is attributed to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CostKey {
    pub dims: Dims,
    pub pool: Option<String>,
    pub model: Option<String>,
}

/// A cost key made of borrowed parts: booking a call allocates only for a new key.
#[derive(Clone, Copy, Debug)]
pub struct CostKeyRef<'a> {
    pub dims: &'a Dims,
    /// Used when `dims.task_type` is unset (the run's type).
    pub task_type: Option<&'a str>,
    pub pool: Option<&'a str>,
    pub model: Option<&'a str>,
}

const ALL_DIMS: [Dim; 8] = [
    Dim::Team,
    Dim::Feature,
    Dim::UserTier,
    Dim::PromptVariant,
    Dim::TaskType,
    Dim::Tenant,
    Dim::Pool,
    Dim::Model,
];

impl<'a> CostKeyRef<'a> {
    fn get(&self, d: Dim) -> Option<&'a str> {
        match d {
            Dim::Team => self.dims.team.as_deref(),
            Dim::Feature => self.dims.feature.as_deref(),
            Dim::UserTier => self.dims.user_tier.as_deref(),
            Dim::PromptVariant => self.dims.prompt_variant.as_deref(),
            Dim::TaskType => self.dims.task_type.as_deref().or(self.task_type),
            Dim::Tenant => self.dims.tenant.as_deref(),
            Dim::Pool => self.pool,
            Dim::Model => self.model,
        }
    }

    fn hash64(&self) -> u64 {
        let mut h = FxHasher::default();
        for d in ALL_DIMS {
            self.get(d).hash(&mut h);
        }
        h.finish()
    }

    fn matches(&self, k: &CostKey) -> bool {
        ALL_DIMS.iter().all(|d| self.get(*d) == k.get(*d))
    }

    fn to_key(self) -> CostKey {
        let own = |v: Option<&str>| v.map(str::to_string);
        CostKey {
            dims: Dims {
                team: own(self.get(Dim::Team)),
                feature: own(self.get(Dim::Feature)),
                user_tier: own(self.get(Dim::UserTier)),
                prompt_variant: own(self.get(Dim::PromptVariant)),
                task_type: own(self.get(Dim::TaskType)),
                tenant: own(self.get(Dim::Tenant)),
            },
            pool: own(self.pool),
            model: own(self.model),
        }
    }
}

fn key_hash(k: &CostKey) -> u64 {
    CostKeyRef {
        dims: &k.dims,
        task_type: None,
        pool: k.pool.as_deref(),
        model: k.model.as_deref(),
    }
    .hash64()
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
        }
    }

    fn other() -> Self {
        Self {
            dims: Dims {
                team: Some(OTHER.into()),
                ..Default::default()
            },
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
    keys: Vec<CostKey>,
    /// Key hash → ids with that hash (collisions are compared field by field).
    ids: FxHashMap<u64, Vec<u32>>,
    minutes: VecDeque<(u64, FxHashMap<u32, CostCell>)>,
    /// Minute buckets older than an hour, folded per hour (hour number, sums).
    hours: VecDeque<(u64, FxHashMap<u32, CostCell>)>,
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

    fn find(&self, hash: u64, key: &CostKeyRef<'_>) -> Option<u32> {
        self.ids
            .get(&hash)?
            .iter()
            .copied()
            .find(|id| key.matches(&self.keys[*id as usize]))
    }

    fn intern(&mut self, key: CostKeyRef<'_>) -> u32 {
        let hash = key.hash64();
        if let Some(id) = self.find(hash, &key) {
            return id;
        }
        let owned = if self.keys.len() >= self.max_keys {
            self.overflowed += 1;
            let other = CostKey::other();
            let h = key_hash(&other);
            let r = CostKeyRef {
                dims: &other.dims,
                task_type: None,
                pool: None,
                model: None,
            };
            if let Some(id) = self.find(h, &r) {
                return id;
            }
            other
        } else {
            key.to_key()
        };
        let id = self.keys.len() as u32;
        self.ids.entry(key_hash(&owned)).or_default().push(id);
        self.keys.push(owned);
        id
    }

    /// Books `cell` in the minute of `at_ms` (the event's own time, which the caller bounds
    /// by its arrival and a lateness allowance); one older than every minute kept lands in
    /// the oldest.
    pub fn book(&mut self, at_ms: u64, key: CostKeyRef<'_>, cell: CostCell) {
        let id = self.intern(key);
        let minute = at_ms / MINUTE_MS;
        if let Some((newest, _)) = self.minutes.back()
            && minute < *newest
        {
            let i = match self.minutes.binary_search_by_key(&minute, |(m, _)| *m) {
                Ok(i) => i,
                Err(0) => 0,
                Err(i) => {
                    self.minutes.insert(i, (minute, FxHashMap::default()));
                    i
                }
            };
            if let Some((_, cells)) = self.minutes.get_mut(i) {
                cells.entry(id).or_default().add(&cell);
            }
            while self.minutes.len() > MAX_MINUTES
                && let Some((old, cells)) = self.minutes.pop_front()
            {
                self.fold_into_hour(old / 60, cells);
            }
            return;
        }
        if self.minutes.back().is_none_or(|(m, _)| minute > *m) {
            while self.minutes.len() >= MAX_MINUTES
                && let Some((old, cells)) = self.minutes.pop_front()
            {
                self.fold_into_hour(old / 60, cells);
            }
            self.minutes.push_back((minute, FxHashMap::default()));
            self.compact();
        }
        if let Some((_, cells)) = self.minutes.back_mut() {
            cells.entry(id).or_default().add(&cell);
        }
    }

    fn fold_into_hour(&mut self, hour: u64, cells: FxHashMap<u32, CostCell>) {
        if self.hours.back().is_none_or(|(h, _)| hour > *h) {
            if self.hours.len() == MAX_HOURS {
                self.hours.pop_front();
            }
            self.hours.push_back((hour, FxHashMap::default()));
        }
        if let Some((_, sums)) = self.hours.back_mut() {
            for (id, c) in cells {
                sums.entry(id).or_default().add(&c);
            }
        }
    }

    /// Drops interned keys no bucket uses any more, so the key table tracks the last 24 h.
    fn compact(&mut self) {
        if self.keys.len() < self.max_keys / 2 {
            return;
        }
        let mut used = vec![false; self.keys.len()];
        for (_, cells) in self.minutes.iter().chain(&self.hours) {
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
        for (_, cells) in self.minutes.iter_mut().chain(self.hours.iter_mut()) {
            *cells = cells
                .drain()
                .map(|(id, c)| (remap[id as usize], c))
                .collect();
        }
        let mut ids: FxHashMap<u64, Vec<u32>> = FxHashMap::default();
        for (i, k) in keys.iter().enumerate() {
            ids.entry(key_hash(k)).or_default().push(i as u32);
        }
        self.ids = ids;
        self.keys = keys;
    }

    /// Sums over the last `window_ms`, grouped by `by` (no dimensions: one total row).
    /// Rows are ordered by cost, highest first.
    pub fn query(&self, now_ms: u64, window_ms: u64, by: &[Dim]) -> Vec<CostRow> {
        let from = now_ms.saturating_sub(window_ms) / MINUTE_MS;
        let mut groups: HashMap<Vec<Option<&str>>, CostCell> = HashMap::new();
        // The last hour per minute; older spans of the window in whole hours.
        let minutes = self.minutes.iter().rev().take_while(|(m, _)| *m >= from);
        let hours = self
            .hours
            .iter()
            .rev()
            .take_while(|(h, _)| (h + 1) * 60 > from);
        for (_, cells) in minutes.chain(hours) {
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

    fn dims(team: &str, feature: &str) -> Dims {
        Dims {
            team: Some(team.into()),
            feature: Some(feature.into()),
            ..Default::default()
        }
    }

    fn key<'a>(dims: &'a Dims, model: &'a str) -> CostKeyRef<'a> {
        CostKeyRef {
            dims,
            task_type: None,
            pool: None,
            model: Some(model),
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
        l.book(0, key(&dims("a", "x"), "m1"), cell(1.0));
        l.book(61_000, key(&dims("a", "y"), "m1"), cell(2.0));
        l.book(62_000, key(&dims("b", "x"), "m2"), cell(4.0));
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
    fn minutes_older_than_an_hour_fold_into_hours() {
        let mut l = CostLedger::new(100);
        let d = dims("a", "x");
        l.book(0, key(&d, "m"), cell(1.0));
        l.book(30 * 60_000, key(&d, "m"), cell(2.0));
        // 61 more minutes: the first two buckets move to hour 0.
        for m in 0..61 {
            l.book((31 + m) * 60_000, key(&d, "m"), cell(0.0));
        }
        assert!(l.minutes.len() <= MAX_MINUTES);
        assert_eq!(l.hours.len(), 1);
        let now = 91 * 60_000;
        assert_eq!(l.query(now, 3 * 3_600_000, &[])[0].cell.cost_usd, 3.0);
        assert_eq!(l.query(now, 30 * 60_000, &[])[0].cell.cost_usd, 0.0);
        // 25 hours later everything has aged out.
        for h in 2..30 {
            l.book(h * 3_600_000, key(&d, "m"), cell(0.0));
        }
        assert!(l.hours.len() <= MAX_HOURS);
        assert_eq!(
            l.query(30 * 3_600_000, 24 * 3_600_000, &[])[0]
                .cell
                .cost_usd,
            0.0
        );
    }

    #[test]
    fn key_table_is_bounded() {
        let mut l = CostLedger::new(10);
        for i in 0..100 {
            l.book(0, key(&dims(&format!("t{i}"), "f"), "m"), cell(1.0));
        }
        assert!(l.key_count() <= 11);
        assert_eq!(l.overflowed, 90);
        let total = l.query(0, 60_000, &[]);
        assert_eq!(total[0].cell.cost_usd, 100.0);
    }
}
