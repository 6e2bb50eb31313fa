//! Budgets: the cost ledger and the pure check of a routed task against every
//! budget that applies to it.
//!
//! The ledger counts, per (budget, scope value, bucket), what was **spent** (actual costs
//! of finished tasks) and what is **reserved** (estimates of tasks dispatched and not yet
//! finished). A task is admitted only when `spent + reserved + its estimate` stays within
//! the limit, and its estimate is reserved in the same step (under one lock), so the
//! limit can be passed only by tasks whose actual cost came out above their estimate:
//! the overspend is bounded by the estimates of tasks in flight when the limit was
//! reached. At the task's result the estimate is released and the actual cost charged to
//! the bucket the reservation was made in. The reservation and the charge are written in
//! the task's record, and the task log keeps the ledger from them, in the same entries
//! (`store::log`): a restart finds the ledger exactly as the records it has left it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::load::{Budget, Policy};
use super::schema::{Scope, SoftAction};

pub use super::window::{Window, rfc3339, usd};
pub use crate::domain::{Cell, CellKey, Reservation, TaskDims};

/// Cells nested by budget, then value, then bucket start, so the task path looks cells up
/// by `&str` without allocating.
pub type Cells = BTreeMap<String, BTreeMap<String, BTreeMap<u64, Cell>>>;

/// The ledger: every cell, in memory. What is durable is kept by the task log, from the
/// task records' reservations and charges (see `store::log`), not from this.
///
/// With several replicas each keeps its own cells (its own records') and adds, wherever
/// a task is checked, what the other replicas last shared (`policy::ledger_share`): a
/// budget holds for the fleet, not per replica.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    cells: Cells,
    /// The other replicas' cells as they last shared them, summed. Never stored: each
    /// replica's own cells are durable in its own store.
    others: Cells,
    /// Bumped by every change to this replica's cells: the share writes only when it moved.
    changes: u64,
    /// The replicas spending the budgets, this one included (1: a lone commander).
    replicas: usize,
    /// This replica's shares not yet known to be seen by every other, oldest first: the
    /// revision of its key each was written at, and what it had committed per budget and
    /// value then. At most [`SHARES_KEPT`].
    shares: std::collections::VecDeque<(u64, Committed)>,
    /// The newest revision of this replica's key that every other replica sharing the
    /// intake has taken on (each says so in its own key); `None`: one has not yet.
    acked: Option<u64>,
    /// What this replica had committed as of `acked`: what every other counts in its
    /// checks. What it commits beyond it, the others may not count yet.
    seen: Committed,
}

/// Committed (spent and reserved) per budget, then value.
type Committed = BTreeMap<String, BTreeMap<String, f64>>;

/// This replica's shares kept while the others have not taken them on (more than a second
/// of shares every 20 ms; the others take one on within moments). An acknowledgement
/// older than all of them counts as none, which only makes this replica wait.
pub const SHARES_KEPT: usize = 64;

fn buckets_of<'a>(cells: &'a Cells, budget: &str, value: &str) -> Option<&'a BTreeMap<u64, Cell>> {
    cells.get(budget)?.get(value)
}

/// Spent and reserved of `buckets` from `from` on.
fn sums_from(buckets: Option<&BTreeMap<u64, Cell>>, from: u64) -> (f64, f64) {
    buckets
        .map(|b| {
            b.range(from..)
                .fold((0.0, 0.0), |(s, r), (_, c)| (s + c.spent, r + c.reserved))
        })
        .unwrap_or((0.0, 0.0))
}

impl Ledger {
    pub fn insert(&mut self, key: CellKey, cell: Cell) {
        *self.entry(&key) = cell;
    }

    fn buckets(&self, budget: &str, value: &str) -> Option<&BTreeMap<u64, Cell>> {
        buckets_of(&self.cells, budget, value)
    }

    /// Puts what the other replicas shared in place of what they shared before.
    pub fn set_others(&mut self, others: Cells) {
        self.others = others;
    }

    /// How many replicas spend the budgets, this one included.
    pub fn set_replicas(&mut self, n: usize) {
        self.replicas = n.max(1);
    }

    /// Notes what this replica shared (its cells as [`Self::own_counting`] gave them) at
    /// `revision` of its key: what it commits beyond that is its own until every other
    /// replica has taken it on ([`Self::set_acked`]).
    pub fn mark_shared(&mut self, revision: u64, cells: &[(CellKey, Cell)]) {
        let mut committed = Committed::new();
        for (k, c) in cells {
            *committed
                .entry(k.budget.clone())
                .or_default()
                .entry(k.value.clone())
                .or_default() += c.spent + c.reserved;
        }
        if self.shares.len() >= SHARES_KEPT {
            self.shares.pop_front();
        }
        self.shares.push_back((revision, committed));
        self.settle_seen();
    }

    /// The newest revision of this replica's key that every other replica sharing the
    /// intake has taken on, as their keys say; `None` when one has not said yet.
    pub fn set_acked(&mut self, acked: Option<u64>) {
        if self.acked != acked {
            self.acked = acked;
            self.settle_seen();
        }
    }

    /// What the others have seen: the newest share at or before `acked`, or nothing.
    fn settle_seen(&mut self) {
        let Some(acked) = self.acked else {
            self.seen.clear();
            return;
        };
        // Older shares are no longer needed: the acknowledgement only moves on, unless a
        // replica joins (its own is then `None`, above).
        while self.shares.get(1).is_some_and(|(r, _)| *r <= acked) {
            self.shares.pop_front();
        }
        match self.shares.front() {
            Some((r, c)) if *r <= acked => self.seen.clone_from(c),
            _ => self.seen.clear(),
        }
    }

    /// With several replicas, whether this replica may take `est` more of a budget value
    /// now. Beyond what every other replica has taken on of its shares, each replica takes
    /// at most its part (1/N) of the room left as it last saw the others' spending, or one
    /// task when it has taken none beyond: replicas that admit at once cannot together
    /// pass the limit by more than about one task each. Always true for a lone replica
    /// (the limit check alone decides).
    /// `(own, others)` are what [`Self::committed_parts`] gave the check.
    fn my_part_fits(
        &self,
        budget: &Budget,
        value: &str,
        est: f64,
        (own, others): (f64, f64),
    ) -> bool {
        if self.replicas <= 1 {
            return true;
        }
        let name = budget.spec.name.as_str();
        let base = self
            .seen
            .get(name)
            .and_then(|v| v.get(value))
            .copied()
            .unwrap_or(0.0)
            .min(own);
        let since = own - base;
        if since <= 1e-12 {
            return true;
        }
        let room = budget.spec.limit_usd - base - others;
        (self.replicas as f64) * (since + est) <= room * (1.0 + 1e-9)
    }

    /// How many times this replica's cells changed (never goes back).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// This replica's cells that count now under `policy`, with something in them:
    /// what it shares with the other replicas.
    pub fn own_counting(&self, policy: &Policy, now_ms: u64) -> Vec<(CellKey, Cell)> {
        let mut out = Vec::new();
        for (budget, values) in &self.cells {
            let Some(b) = policy.budget(budget) else {
                continue;
            };
            let from = b.window.counting_from(now_ms);
            for (value, buckets) in values {
                for (bucket, c) in buckets.range(from..) {
                    if c.spent.abs() > 1e-12 || c.reserved.abs() > 1e-12 {
                        let key = CellKey {
                            budget: budget.clone(),
                            value: value.clone(),
                            bucket: *bucket,
                        };
                        out.push((key, *c));
                    }
                }
            }
        }
        out
    }

    pub fn cell(&self, key: &CellKey) -> Cell {
        self.buckets(&key.budget, &key.value)
            .and_then(|b| b.get(&key.bucket))
            .copied()
            .unwrap_or_default()
    }

    /// Spent + reserved in the window of `budget` for `value` at `now_ms`, by every
    /// replica.
    pub fn committed(&self, budget: &str, value: &str, window: Window, now_ms: u64) -> f64 {
        let (own, others) = self.committed_parts(budget, value, window, now_ms);
        own + others
    }

    /// Spent + reserved in the window at `now_ms`: this replica's, and the others'.
    fn committed_parts(
        &self,
        budget: &str,
        value: &str,
        window: Window,
        now_ms: u64,
    ) -> (f64, f64) {
        let from = window.counting_from(now_ms);
        let (spent, reserved) = self.sums(budget, value, from);
        let (o_spent, o_reserved) = self.others_sums(budget, value, from);
        (spent + reserved, o_spent + o_reserved)
    }

    /// Whether a budget has cells for `value`, and for how many values it has any.
    fn knows(&self, budget: &str, value: &str) -> (bool, usize) {
        self.cells
            .get(budget)
            .map_or((false, 0), |v| (v.contains_key(value), v.len()))
    }

    /// The values a budget has cells for, here or on another replica.
    pub fn values(&self, budget: &str) -> Vec<String> {
        let mut values = BTreeSet::new();
        for cells in [&self.cells, &self.others] {
            if let Some(v) = cells.get(budget) {
                values.extend(v.keys().cloned());
            }
        }
        values.into_iter().collect()
    }

    /// Spent and reserved of a budget value in this replica's buckets from `from`.
    pub fn sums(&self, budget: &str, value: &str, from: u64) -> (f64, f64) {
        sums_from(self.buckets(budget, value), from)
    }

    /// Spent and reserved of a budget value in the other replicas' buckets from `from`.
    pub fn others_sums(&self, budget: &str, value: &str, from: u64) -> (f64, f64) {
        sums_from(buckets_of(&self.others, budget, value), from)
    }

    /// The buckets of a budget value that count at `now_ms`, every replica's together,
    /// oldest first.
    fn counting(&self, budget: &str, value: &str, window: Window, now_ms: u64) -> Vec<(u64, f64)> {
        let from = window.counting_from(now_ms);
        let mut out: BTreeMap<u64, f64> = BTreeMap::new();
        for cells in [&self.cells, &self.others] {
            for (k, c) in buckets_of(cells, budget, value)
                .into_iter()
                .flat_map(|b| b.range(from..))
            {
                *out.entry(*k).or_default() += c.spent + c.reserved;
            }
        }
        out.into_iter().collect()
    }

    pub fn reserve(&mut self, keys: &[CellKey], est: f64) {
        for k in keys {
            self.with_cell(k, |c| c.reserved += est);
        }
    }

    /// Releases a reservation and charges the actual cost in its place.
    pub fn settle(&mut self, r: &Reservation, actual: f64) {
        for k in &r.cells {
            self.with_cell(k, |c| {
                c.apply(Cell {
                    spent: actual,
                    reserved: -r.est_usd,
                })
            });
        }
    }

    /// Sets what a cell has committed (test cases and replay start from a situation).
    pub fn set_spent(&mut self, key: CellKey, spent: f64) {
        self.entry(&key).spent = spent;
    }

    /// Runs `f` on the cell at `k` (made when absent); the task path's way in, which
    /// allocates nothing for a cell that exists.
    fn with_cell(&mut self, k: &CellKey, f: impl FnOnce(&mut Cell)) {
        self.changes += 1;
        if let Some(c) = self
            .cells
            .get_mut(&k.budget)
            .and_then(|v| v.get_mut(&k.value))
            .and_then(|b| b.get_mut(&k.bucket))
        {
            f(c);
            return;
        }
        f(self.entry(k));
    }

    fn entry(&mut self, k: &CellKey) -> &mut Cell {
        self.changes += 1;
        self.cells
            .entry(k.budget.clone())
            .or_default()
            .entry(k.value.clone())
            .or_default()
            .entry(k.bucket)
            .or_default()
    }

    /// Drops buckets that expired more than a window ago (kept one window for reports);
    /// returns their keys so the store can drop them too. Cells of budgets the policy no
    /// longer has are kept until they expire by the longest window, a month.
    pub fn prune(&mut self, policy: &Policy, now_ms: u64) -> Vec<CellKey> {
        let mut gone = Vec::new();
        for (budget, values) in &mut self.cells {
            let window = policy
                .budget(budget)
                .map(|b| b.window)
                .unwrap_or(Window::Month);
            let keep_from = window.counting_from(window.counting_from(now_ms).saturating_sub(1));
            for (value, buckets) in values.iter_mut() {
                let old: Vec<u64> = buckets.range(..keep_from).map(|(k, _)| *k).collect();
                for b in old {
                    if buckets.get(&b).is_some_and(|c| c.reserved > 1e-12) {
                        // A reservation still open: its task has not finished yet.
                        continue;
                    }
                    buckets.remove(&b);
                    gone.push(CellKey {
                        budget: budget.clone(),
                        value: value.clone(),
                        bucket: b,
                    });
                }
            }
            values.retain(|_, b| !b.is_empty());
        }
        self.cells.retain(|_, v| !v.is_empty());
        gone
    }
}

/// Scope values one budget keeps cells for at most; a task naming another value once a
/// budget has this many is counted under [`OTHER_VALUE`]. Task attributes come from
/// producers, and without a bound a producer naming a new team on every task would grow
/// the ledger (and every copy of it the task log writes) without end.
pub const MAX_VALUES_PER_BUDGET: usize = 10_000;

/// The value tasks beyond [`MAX_VALUES_PER_BUDGET`] share.
pub const OTHER_VALUE: &str = "(other)";

/// Which value of a budget's scope a task falls under, if the budget applies to it.
pub fn scope_value(b: &Budget, dims: &TaskDims, pool: &str, model: &str) -> Option<String> {
    let v = match b.spec.scope {
        Scope::Fleet => return Some("*".into()),
        Scope::Team => dims.team.as_deref()?,
        Scope::Feature => dims.feature.as_deref()?,
        Scope::UserTier => dims.user_tier.as_deref()?,
        Scope::Pool => pool,
        Scope::Model => model,
    };
    match &b.spec.matches {
        Some(m) if m != v => None,
        _ => Some(v.to_string()),
    }
}

/// One budget that a task is over.
#[derive(Clone, Debug, PartialEq)]
pub struct Over<'a> {
    pub budget: &'a Budget,
    pub value: String,
    pub committed: f64,
    /// When the window has room for the task again, if nothing else is spent: the next
    /// calendar boundary, or when enough of a rolling window has expired. `None` when
    /// the task costs more than the whole limit.
    pub resets_at: Option<u64>,
}

impl fmt::Display for Over<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.budget.spec;
        let who = match s.scope {
            Scope::Fleet => "fleet".to_string(),
            scope => format!("{} {}", scope.as_str(), self.value),
        };
        write!(
            f,
            "budget {} ({who}, ${} per {}) has ${:.4} committed",
            s.name,
            usd(s.limit_usd),
            s.window,
            self.committed
        )?;
        match self.resets_at {
            Some(t) => write!(f, "; room again at {}", rfc3339(t)),
            None => write!(f, "; the task's estimate is larger than the whole limit"),
        }
    }
}

/// A soft threshold a task's budget has crossed.
#[derive(Clone, Debug, PartialEq)]
pub struct SoftHit<'a> {
    pub budget: &'a Budget,
    pub value: String,
    pub at: f64,
    pub fraction: f64,
    pub alert: bool,
    /// The task is marginal under this threshold and should be downgraded.
    pub downgrade: bool,
}

/// Every budget a routed task meets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Check<'a> {
    /// Cells to reserve the estimate in when the task is admitted.
    pub cells: Vec<CellKey>,
    pub over: Vec<Over<'a>>,
    pub soft: Vec<SoftHit<'a>>,
    /// Budgets with room for the task, where this replica has taken its part of the
    /// room until the others' spending is seen again (several replicas): the task waits
    /// a moment and is decided again.
    pub wait: Vec<&'a Budget>,
}

impl Check<'_> {
    /// A soft threshold asks for a downgrade: why, in words.
    pub fn downgrade_reason(&self) -> Option<String> {
        self.soft.iter().find(|h| h.downgrade).map(|h| {
            format!(
                "budget {} at {:.0}% (soft threshold {:.0}%)",
                h.budget.spec.name,
                h.fraction * 100.0,
                h.at * 100.0
            )
        })
    }
}

/// A task as routed: its attribution, where it goes, what it is estimated to cost.
#[derive(Clone, Copy, Debug)]
pub struct Routed<'a> {
    pub dims: &'a TaskDims,
    pub pool: &'a str,
    pub model: &'a str,
    /// Estimated cost in USD.
    pub est: f64,
    pub priority: u8,
}

/// Checks a routed task against every budget. Pure: reads the ledger, changes nothing.
/// `extra` adds tentative spending per cell (the release pass counts tasks it is about to
/// release).
pub fn check<'a>(
    policy: &'a Policy,
    ledger: &Ledger,
    extra: &BTreeMap<(String, String), f64>,
    task: Routed<'_>,
    now_ms: u64,
) -> Check<'a> {
    let Routed {
        dims,
        pool,
        model,
        est,
        priority,
    } = task;
    let mut out = Check::default();
    for b in &policy.budgets {
        let Some(mut value) = scope_value(b, dims, pool, model) else {
            continue;
        };
        let name = b.spec.name.as_str();
        if let (false, held) = ledger.knows(name, &value)
            && held >= MAX_VALUES_PER_BUDGET
        {
            value = OTHER_VALUE.to_string();
        }
        let parts = ledger.committed_parts(name, &value, b.window, now_ms);
        let mut committed = parts.0 + parts.1;
        if !extra.is_empty() {
            committed += extra
                .get(&(name.to_string(), value.clone()))
                .copied()
                .unwrap_or(0.0);
        }
        let limit = b.spec.limit_usd;
        // A tiny tolerance so that a budget of exactly N × estimate admits N tasks.
        if committed + est > limit * (1.0 + 1e-9) {
            let resets_at = room_at(ledger, b, &value, est, now_ms);
            out.over.push(Over {
                budget: b,
                value,
                committed,
                resets_at,
            });
            continue;
        }
        if !ledger.my_part_fits(b, &value, est, parts) {
            out.wait.push(b);
        }
        let fraction = (committed + est) / limit;
        if let Some(s) = b.spec.soft.iter().rev().find(|s| fraction >= s.at) {
            out.soft.push(SoftHit {
                budget: b,
                value: value.clone(),
                at: s.at,
                fraction,
                alert: matches!(s.action, SoftAction::Alert | SoftAction::AlertAndDowngrade),
                downgrade: matches!(
                    s.action,
                    SoftAction::Downgrade | SoftAction::AlertAndDowngrade
                ) && priority <= s.max_priority,
            });
        }
        out.cells.push(CellKey {
            budget: name.to_string(),
            value,
            bucket: b.window.bucket(now_ms),
        });
    }
    out
}

/// When `value` of budget `b` has room for `est` again, if nothing more is spent.
fn room_at(ledger: &Ledger, b: &Budget, value: &str, est: f64, now_ms: u64) -> Option<u64> {
    let limit = b.spec.limit_usd;
    if est > limit {
        return None;
    }
    match b.window {
        Window::Rolling(_) => {
            let buckets = ledger.counting(&b.spec.name, value, b.window, now_ms);
            let mut committed: f64 = buckets.iter().map(|(_, c)| c).sum();
            for (start, c) in buckets {
                committed -= c;
                if committed + est <= limit * (1.0 + 1e-9) {
                    return Some(b.window.bucket_expires(start));
                }
            }
            Some(now_ms)
        }
        w => Some(w.bucket_expires(w.bucket(now_ms))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::window::{DAY_MS, HOUR_MS};

    #[test]
    fn amounts_keep_the_precision_they_were_configured_with() {
        assert_eq!(usd(25.0), "25.00");
        assert_eq!(usd(12.5), "12.50");
        assert_eq!(usd(0.0025), "0.0025");
        assert_eq!(usd(0.123456), "0.123456");
        assert_eq!(usd(1000.0), "1000.00");
    }

    #[test]
    fn calendar_windows() {
        // 2026-12-01T13:45:10Z
        let t = 1_796_132_710_000u64;
        assert_eq!(rfc3339(Window::Hour.bucket(t)), "2026-12-01T13:00:00Z");
        assert_eq!(rfc3339(Window::Day.bucket(t)), "2026-12-01T00:00:00Z");
        assert_eq!(rfc3339(Window::Month.bucket(t)), "2026-12-01T00:00:00Z");
        assert_eq!(
            rfc3339(Window::Month.bucket_expires(Window::Month.bucket(t))),
            "2027-01-01T00:00:00Z"
        );
        assert_eq!(
            rfc3339(Window::Month.bucket(t - 40 * DAY_MS)),
            "2026-10-01T00:00:00Z"
        );
        assert_eq!(
            rfc3339(Window::Day.bucket_expires(Window::Day.bucket(t))),
            "2026-12-02T00:00:00Z"
        );
    }

    #[test]
    fn rolling_window_counts_the_last_duration() {
        let w = Window::parse("1h").unwrap();
        let mut l = Ledger::default();
        let t0 = 10 * HOUR_MS;
        let k = |t: u64| CellKey {
            budget: "b".into(),
            value: "*".into(),
            bucket: w.bucket(t),
        };
        l.reserve(&[k(t0)], 1.0);
        l.reserve(&[k(t0 + 30 * 60_000)], 2.0);
        assert_eq!(l.committed("b", "*", w, t0 + 31 * 60_000), 3.0);
        assert_eq!(
            l.committed("b", "*", w, t0 + HOUR_MS + 60_000),
            2.0,
            "the first left"
        );
        assert_eq!(l.committed("b", "*", w, t0 + 2 * HOUR_MS), 0.0);
    }

    /// Team search's budget of $1 a day (`policy::tests::BUDGET`) just before midnight:
    /// the replica tests' situation.
    struct TeamSearch {
        policy: Policy,
        now: u64,
        day: u64,
        /// Today's cell.
        key: CellKey,
        dims: TaskDims,
    }

    impl TeamSearch {
        fn new() -> Self {
            let policy =
                crate::policy::tests::parse(&[("a.policy.toml", crate::policy::tests::BUDGET)])
                    .unwrap();
            let now = crate::policy::tests::BEFORE_MIDNIGHT;
            let day = Window::Day.bucket(now);
            let key = CellKey {
                budget: "team-daily".into(),
                value: "search".into(),
                bucket: day,
            };
            let dims = TaskDims {
                team: Some("search".into()),
                ..Default::default()
            };
            Self {
                policy,
                now,
                day,
                key,
                dims,
            }
        }

        /// A task of team search estimated at `est`.
        fn task(&self, est: f64) -> Routed<'_> {
            Routed {
                dims: &self.dims,
                pool: "docs",
                model: "gpt-4o-mini",
                est,
                priority: 5,
            }
        }

        /// The other replicas' cells: `cell` in today's.
        fn others(&self, cell: Cell) -> Cells {
            let mut others = Cells::new();
            others
                .entry("team-daily".into())
                .or_default()
                .entry("search".into())
                .or_default()
                .insert(self.day, cell);
            others
        }

        fn check(&self, l: &Ledger, est: f64) -> Check<'_> {
            check(&self.policy, l, &BTreeMap::new(), self.task(est), self.now)
        }
    }

    /// What the other replicas shared counts in every check (and in when there is room
    /// again) beside this replica's own cells, and is never this replica's to share.
    #[test]
    fn what_other_replicas_shared_counts_toward_every_check() {
        let t = TeamSearch::new();
        let (now, day) = (t.now, t.day);
        let mut l = Ledger::default();
        l.reserve(std::slice::from_ref(&t.key), 0.25);
        let changes = l.changes();
        l.set_others(t.others(Cell {
            spent: 0.5,
            reserved: 0.125,
        }));
        assert_eq!(l.changes(), changes, "not a change of this replica's own");
        assert_eq!(l.committed("team-daily", "search", Window::Day, now), 0.875);
        assert_eq!(l.sums("team-daily", "search", day), (0.0, 0.25));
        assert_eq!(l.others_sums("team-daily", "search", day), (0.5, 0.125));
        assert_eq!(
            l.own_counting(&t.policy, now),
            vec![(
                t.key.clone(),
                Cell {
                    spent: 0.0,
                    reserved: 0.25
                }
            )]
        );
        let fits = t.check(&l, 0.125);
        assert!(fits.over.is_empty(), "{fits:?}");
        let over = t.check(&l, 0.25);
        assert_eq!(over.over[0].committed, 0.875, "{over:?}");
        assert_eq!(over.over[0].resets_at, Some(day + DAY_MS));
    }

    /// With two replicas each takes at most half the room it sees beyond what the other
    /// has taken on of its shares, or one task: replicas that admit at once cannot together
    /// pass the limit. A share the other has not acknowledged changes nothing, however
    /// long ago it was written. Alone, the limit alone decides.
    #[test]
    fn beyond_what_the_others_took_on_a_replica_takes_its_part_of_the_room() {
        let t = TeamSearch::new();
        let mut l = Ledger::default();
        l.set_others(t.others(Cell {
            spent: 0.2,
            reserved: 0.0,
        }));
        // How many tasks of 0.1 this replica takes before it waits, or the limit stops it.
        let take = |l: &mut Ledger| {
            let mut n = 0;
            loop {
                let c = t.check(l, 0.1);
                if !c.over.is_empty() || !c.wait.is_empty() {
                    return (n, c.over.is_empty());
                }
                l.reserve(std::slice::from_ref(&t.key), 0.1);
                n += 1;
            }
        };
        let mut revision = 0;
        // Shared at the next revision; `ack`: and the other took it on.
        let share = |l: &mut Ledger, revision: &mut u64, ack: bool| {
            *revision += 1;
            let shared = l.own_counting(&t.policy, t.now);
            l.mark_shared(*revision, &shared);
            if ack {
                l.set_acked(Some(*revision));
            }
        };
        let mut alone = l.clone();
        assert_eq!(take(&mut alone), (8, false), "alone: up to the limit");
        l.set_replicas(2);
        // Room 0.8 as seen: half of it, then it waits with room left.
        assert_eq!(take(&mut l), (4, true));
        // Shared, but the other has not taken it on: still waiting.
        share(&mut l, &mut revision, false);
        assert_eq!(take(&mut l), (0, true));
        // It took it on: half the room left (0.4).
        l.set_acked(Some(revision));
        assert_eq!(take(&mut l), (2, true));
        // Shared again and again: however long ago, not taken on, nothing changes; nor
        // when the other says again that it took on the first.
        for _ in 0..3 {
            share(&mut l, &mut revision, false);
            assert_eq!(take(&mut l), (0, true));
        }
        l.set_acked(Some(1));
        assert_eq!(take(&mut l), (0, true));
        // It took on the second (it may lag behind the shares): one task, as half the room
        // left (0.1 of 0.2) is less than one.
        l.set_acked(Some(2));
        assert_eq!(take(&mut l), (1, true));
        // A replica joins: it has taken on nothing yet, so nothing counts as seen.
        l.set_acked(None);
        assert_eq!(take(&mut l), (0, true));
        share(&mut l, &mut revision, true);
        assert_eq!(
            take(&mut l),
            (1, false),
            "the last task that fits, then the limit"
        );
    }

    #[test]
    fn cell_keys_round_trip() {
        let k = CellKey {
            budget: "team-daily".into(),
            value: "search".into(),
            bucket: 123_456,
        };
        assert_eq!(CellKey::decode(&k.encode()), Some(k));
        assert_eq!(CellKey::decode(b"\x00"), None);
    }
}
