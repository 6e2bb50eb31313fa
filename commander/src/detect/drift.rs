//! Behavioural drift: has what runs *do* changed, even where every run still passes? Per
//! group (a pool, a task type, a prompt variant), the runs of the last 15 minutes are
//! compared with the runs of the 45 minutes before (`fleet/prints.rs` samples both) on
//! three distributions: the tools called (unigrams), the tool-to-tool steps (bigrams, with
//! the run's start and end as tokens, so "calls nothing" and "ends right after search"
//! count too) and the number of steps per run. The statistic is the sum of the three
//! Jensen–Shannon divergences (base 2, each in [0, 1]).
//!
//! JSD of two samples is above 0 even when both come from one distribution, and more so
//! the smaller the samples, so no fixed threshold is right for every group. The threshold
//! is a permutation null instead: the runs of both windows are pooled and split at random
//! into two groups of the same sizes, many times, and the observed divergence is
//! significant when at most a share `alpha` of the random splits diverge as much. That is
//! exact for any sample size, and `alpha` is chosen from a false-alarm budget per
//! fleet-hour (`run`'s caller spreads it over the groups and evaluations in an hour).
//!
//! Permutations stop as soon as the answer is settled (Besag–Clifford): on a healthy group
//! a handful of splits already diverge as much, and no more are drawn. Pure: the samples,
//! the level and a seed in; a verdict out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::rules::{Links, Observation, Rule};
use crate::fleet::prints::{GroupPrints, PrintsView, RunPrint};
use crate::policy::schema::AlertSpec;

/// Splits drawn at most for one group (enough for a level of 4e-5).
pub const MAX_PERMUTATIONS: usize = 50_000;
/// A firing drift alert keeps firing while its group's p-value stays at or below this.
pub const HOLD_LEVEL: f64 = 0.05;

/// One evaluation of every group, handed to a blocking thread (a drifting group can take
/// tens of thousands of splits).
#[derive(Clone, Debug)]
pub struct Job {
    pub view: Arc<PrintsView>,
    pub min_runs: usize,
    /// Tests per hour per group (`3600 / drift_interval_s`).
    pub evaluations_per_hour: f64,
    pub false_alarms_per_hour: f64,
    /// Groups whose alert fired or held at the last evaluation: held at `HOLD_LEVEL`.
    pub firing: BTreeSet<(&'static str, String)>,
    pub seed: u64,
}

impl Job {
    pub fn new(
        view: Arc<PrintsView>,
        spec: &AlertSpec,
        firing: BTreeSet<(&'static str, String)>,
        seed: u64,
    ) -> Self {
        Job {
            view,
            min_runs: spec.drift_min_runs as usize,
            evaluations_per_hour: 3600.0 / spec.drift_interval_s.max(1) as f64,
            false_alarms_per_hour: spec.drift_false_alarms_per_hour,
            firing,
            seed,
        }
    }

    /// The groups with enough runs in both windows.
    fn eligible(&self) -> impl Iterator<Item = &GroupPrints> {
        self.view
            .groups
            .iter()
            .filter(|g| g.recent.len() >= self.min_runs && g.baseline.len() >= self.min_runs)
    }

    /// The level of one test: the budget spread over the groups tested and the
    /// evaluations of an hour (a union bound; overlapping windows make successive tests
    /// of a group agree, so the real rate is lower).
    pub fn level(&self) -> f64 {
        let tests = self.eligible().count().max(1) as f64 * self.evaluations_per_hour;
        (self.false_alarms_per_hour / tests).min(HOLD_LEVEL)
    }

    /// Every eligible group's verdict, as observations of the drifted or holding ones.
    pub fn run(&self) -> Vec<Observation> {
        let level = self.level();
        let permutations = permutations_for(level, MAX_PERMUTATIONS);
        let mut out = Vec::new();
        for g in self.eligible() {
            let key = (g.dimension, g.value.clone());
            let plan = Plan {
                level,
                hold_level: if self.firing.contains(&key) {
                    HOLD_LEVEL
                } else {
                    level
                },
                permutations,
            };
            let seed =
                self.seed ^ crate::domain::fnv1a(&[g.dimension.as_bytes(), g.value.as_bytes()]);
            let v = test(g, plan, seed);
            if v.significant || v.holding {
                out.push(self.observation(g, &v));
            }
        }
        out
    }

    fn observation(&self, g: &GroupPrints, v: &Verdict) -> Observation {
        let moves: Vec<String> = shifts(g, &self.view, 2)
            .iter()
            .map(|s| {
                format!(
                    "{} {:.0}% → {:.0}%",
                    s.tool,
                    s.before * 100.0,
                    s.now * 100.0
                )
            })
            .collect();
        let steps = match (median_steps(&g.baseline), median_steps(&g.recent)) {
            (Some(b), Some(n)) => format!("median steps {b} → {n}"),
            _ => String::new(),
        };
        let message = format!(
            "Behaviour of {} {} runs drifted in the last 15 minutes: {} of tool calls; {steps} \
             (JSD {:.3} = tools {:.3} + bigrams {:.3} + steps {:.3}; p = {:.2e} against {} random splits of {} recent and {} earlier runs)",
            g.dimension.replace('_', " "),
            g.value,
            if moves.is_empty() {
                "no tool calls".to_string()
            } else {
                moves.join(", ")
            },
            v.statistic,
            v.tools_jsd,
            v.bigrams_jsd,
            v.steps_jsd,
            v.p_value,
            v.permutations,
            v.recent_runs,
            v.baseline_runs,
        );
        Observation {
            rule: Rule::BehaviourDrift,
            labels: BTreeMap::from([(g.dimension.to_string(), g.value.clone())]),
            value: v.statistic,
            threshold: v.critical.unwrap_or(v.statistic),
            active: v.significant,
            holding: v.holding,
            message,
            links: Links {
                pool: (g.dimension == "pool").then(|| g.value.clone()),
                ..Default::default()
            },
        }
    }
}

/// Step-count bins: 0..=15 one each, then doubling (16-31, 32-63 …).
const STEP_BINS: usize = 24;
const START: u32 = u32::MAX - 1;
const END: u32 = u32::MAX;

/// The verdict on one group.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// The observed divergences: tools, bigrams, steps, and their sum (the statistic).
    pub tools_jsd: f64,
    pub bigrams_jsd: f64,
    pub steps_jsd: f64,
    pub statistic: f64,
    /// `(1 + splits at least as divergent) / (1 + splits drawn)`.
    pub p_value: f64,
    pub permutations: usize,
    /// `p <= plan.level`: the group drifted.
    pub significant: bool,
    /// `p <= plan.hold_level`: a firing alert keeps firing.
    pub holding: bool,
    /// The null's divergence at the `level` edge: the threshold in the statistic's own
    /// units (known when every planned split was drawn).
    pub critical: Option<f64>,
    pub recent_runs: usize,
    pub baseline_runs: usize,
}

/// A tool's share of the tool calls before and now.
#[derive(Clone, Debug, PartialEq)]
pub struct Shift {
    pub tool: String,
    pub before: f64,
    pub now: f64,
}

/// The pooled runs of one group, each as a list of feature indices (with repeats).
struct Pooled {
    /// Per run, `offsets[i]..offsets[i + 1]` in `features`.
    offsets: Vec<usize>,
    features: Vec<u32>,
    /// Feature index ranges of the three blocks: tools, bigrams, steps.
    blocks: [std::ops::Range<usize>; 3],
    /// How many runs are recent (the first ones).
    recent: usize,
}

impl Pooled {
    fn new(recent: &[Arc<RunPrint>], baseline: &[Arc<RunPrint>]) -> Self {
        let mut tools: FxHashMap<u32, u32> = FxHashMap::default();
        let mut bigrams: FxHashMap<(u32, u32), u32> = FxHashMap::default();
        for r in recent.iter().chain(baseline) {
            let mut prev = START;
            for t in r.tools.iter().map(|t| u32::from(*t)).chain([END]) {
                if t != END {
                    let n = tools.len() as u32;
                    tools.entry(t).or_insert(n);
                }
                let n = bigrams.len() as u32;
                bigrams.entry((prev, t)).or_insert(n);
                prev = t;
            }
        }
        let (nt, nb) = (tools.len(), bigrams.len());
        let mut offsets = Vec::with_capacity(recent.len() + baseline.len() + 1);
        let mut features = Vec::new();
        offsets.push(0);
        for r in recent.iter().chain(baseline) {
            let mut prev = START;
            for t in r.tools.iter().map(|t| u32::from(*t)).chain([END]) {
                if let Some(i) = tools.get(&t) {
                    features.push(*i);
                }
                if let Some(i) = bigrams.get(&(prev, t)) {
                    features.push(nt as u32 + *i);
                }
                prev = t;
            }
            features.push((nt + nb + step_bin(r.steps)) as u32);
            offsets.push(features.len());
        }
        Pooled {
            offsets,
            features,
            blocks: [0..nt, nt..nt + nb, nt + nb..nt + nb + STEP_BINS],
            recent: recent.len(),
        }
    }

    fn width(&self) -> usize {
        self.blocks[2].end
    }

    fn runs(&self) -> usize {
        self.offsets.len() - 1
    }

    fn add_run(&self, run: usize, into: &mut [f64]) {
        let (Some(a), Some(b)) = (self.offsets.get(run), self.offsets.get(run + 1)) else {
            return;
        };
        for f in self.features.get(*a..*b).unwrap_or_default() {
            if let Some(c) = into.get_mut(*f as usize) {
                *c += 1.0;
            }
        }
    }

    /// The three divergences of `a` (one side's counts) against `total - a`.
    fn divergences(&self, a: &[f64], total: &[f64]) -> [f64; 3] {
        self.blocks.clone().map(|r| {
            let (Some(x), Some(t)) = (a.get(r.clone()), total.get(r)) else {
                return 0.0;
            };
            jsd_split(x, t)
        })
    }
}

fn step_bin(steps: u32) -> usize {
    if steps < 16 {
        steps as usize
    } else {
        // 16.. → 16 + floor(log2(steps / 16)), capped.
        (16 + (31 - (steps / 16).leading_zeros()) as usize).min(STEP_BINS - 1)
    }
}

/// JSD (bits) between the distribution of counts `a` and that of `total - a`.
fn jsd_split(a: &[f64], total: &[f64]) -> f64 {
    let na: f64 = a.iter().sum();
    let nt: f64 = total.iter().sum();
    let nb = nt - na;
    if na <= 0.0 || nb <= 0.0 {
        return 0.0;
    }
    let mut h_m = 0.0;
    let mut h_p = 0.0;
    let mut h_q = 0.0;
    for (x, t) in a.iter().zip(total) {
        let p = x / na;
        let q = (t - x) / nb;
        let m = 0.5 * (p + q);
        h_m -= plogp(m);
        h_p -= plogp(p);
        h_q -= plogp(q);
    }
    (h_m - 0.5 * (h_p + h_q)).clamp(0.0, 1.0)
}

fn plogp(p: f64) -> f64 {
    if p > 0.0 { p * p.log2() } else { 0.0 }
}

/// A small deterministic generator for the splits (seeded per group and evaluation, so a
/// verdict can be reproduced).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by Lemire's multiply-shift (bias below 2^-32 for the
    /// sizes here).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// Permutations to draw so a p-value of `level` can be reached with one split to spare:
/// `(1 + e) / (1 + B) <= level` needs `B + 1 >= (1 + e) / level`.
pub fn permutations_for(level: f64, cap: usize) -> usize {
    if level.is_nan() || level <= 0.0 {
        return cap;
    }
    ((2.0 / level).ceil() as usize)
        .saturating_sub(1)
        .clamp(19, cap)
}

/// How one group is tested.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    /// The false-alarm rate of one test: significant when `p <= level`.
    pub level: f64,
    /// Splits are drawn until `p <= hold_level` is out of reach (at least `level`; above it
    /// for a group whose alert fires, which keeps firing while `p <= hold_level`).
    pub hold_level: f64,
    pub permutations: usize,
}

/// Tests one group.
pub fn test(g: &GroupPrints, plan: Plan, seed: u64) -> Verdict {
    let pooled = Pooled::new(&g.recent, &g.baseline);
    let width = pooled.width();
    let mut total = vec![0.0; width];
    for i in 0..pooled.runs() {
        pooled.add_run(i, &mut total);
    }
    let mut side = vec![0.0; width];
    for i in 0..pooled.recent {
        pooled.add_run(i, &mut side);
    }
    let [tools_jsd, bigrams_jsd, steps_jsd] = pooled.divergences(&side, &total);
    let statistic = tools_jsd + bigrams_jsd + steps_jsd;
    let b = plan.permutations;
    // `(1 + e) / (1 + b) <= level` holds exactly while `e < floor(level * (1 + b))`: once
    // that many splits diverge as much, the answer is settled and no more are drawn
    // (Besag–Clifford).
    let cut = |level: f64| (level * (b as f64 + 1.0)).floor().max(1.0) as usize;
    let give_up = cut(plan.hold_level.max(plan.level));
    let mut rng = SplitMix(seed);
    let mut order: Vec<usize> = (0..pooled.runs()).collect();
    let mut null = Vec::with_capacity(b.min(4_096));
    let mut exceed = 0usize;
    let k = pooled.recent.min(pooled.runs() - pooled.recent);
    for _ in 0..b {
        // A random `k`-subset by partial Fisher–Yates; it plays the smaller side (JSD is
        // symmetric, so which side it is does not matter).
        for i in 0..k {
            let j = i + rng.below(order.len() - i);
            order.swap(i, j);
        }
        side.iter_mut().for_each(|c| *c = 0.0);
        for &run in &order[..k] {
            pooled.add_run(run, &mut side);
        }
        let s: f64 = pooled.divergences(&side, &total).iter().sum();
        null.push(s);
        // A hair of tolerance: a split that equals the observed one counts against it.
        if s >= statistic - 1e-12 {
            exceed += 1;
            if exceed >= give_up {
                break;
            }
        }
    }
    let completed = exceed < give_up;
    let significant = completed && exceed < cut(plan.level);
    let critical = completed.then(|| {
        null.sort_by(|a, b| b.total_cmp(a));
        // The split at the `level` edge of the null: above it is significant.
        null.get(cut(plan.level) - 1).copied().unwrap_or(0.0)
    });
    Verdict {
        tools_jsd,
        bigrams_jsd,
        steps_jsd,
        statistic,
        p_value: (1 + exceed) as f64 / (1 + null.len()) as f64,
        permutations: null.len(),
        significant,
        holding: completed,
        critical,
        recent_runs: g.recent.len(),
        baseline_runs: g.baseline.len(),
    }
}

/// The tools whose share of calls moved most, largest move first (at most `n`).
pub fn shifts(g: &GroupPrints, view: &PrintsView, n: usize) -> Vec<Shift> {
    let shares = |runs: &[Arc<RunPrint>]| {
        let mut c: FxHashMap<u16, f64> = FxHashMap::default();
        let mut total = 0.0;
        for t in runs.iter().flat_map(|r| r.tools.iter()) {
            *c.entry(*t).or_default() += 1.0;
            total += 1.0;
        }
        if total > 0.0 {
            c.values_mut().for_each(|v| *v /= total);
        }
        c
    };
    let (now, before) = (shares(&g.recent), shares(&g.baseline));
    let mut tools: Vec<u16> = now.keys().chain(before.keys()).copied().collect();
    tools.sort_unstable();
    tools.dedup();
    let mut out: Vec<Shift> = tools
        .into_iter()
        .map(|t| Shift {
            tool: view.tool(t).to_string(),
            before: before.get(&t).copied().unwrap_or(0.0),
            now: now.get(&t).copied().unwrap_or(0.0),
        })
        .collect();
    out.sort_by(|a, b| {
        (b.now - b.before)
            .abs()
            .total_cmp(&(a.now - a.before).abs())
            .then(a.tool.cmp(&b.tool))
    });
    out.truncate(n);
    out
}

/// The median step count of some runs.
pub fn median_steps(runs: &[Arc<RunPrint>]) -> Option<u32> {
    let mut s: Vec<u32> = runs.iter().map(|r| r.steps).collect();
    s.sort_unstable();
    s.get(s.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs drawn from a tool mix: each run makes `len` calls, each call `tools[i]` with
    /// probability `weights[i]`.
    fn runs(rng: &mut SplitMix, n: usize, weights: &[f64], len: usize) -> Vec<Arc<RunPrint>> {
        (0..n)
            .map(|_| {
                let tools: Box<[u16]> = (0..len)
                    .map(|_| {
                        let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
                        let mut acc = 0.0;
                        let mut pick = weights.len() - 1;
                        for (i, w) in weights.iter().enumerate() {
                            acc += w;
                            if u < acc {
                                pick = i;
                                break;
                            }
                        }
                        pick as u16 + 1
                    })
                    .collect();
                Arc::new(RunPrint {
                    steps: 2 * tools.len() as u32,
                    tools,
                })
            })
            .collect()
    }

    fn plan(level: f64) -> Plan {
        Plan {
            level,
            hold_level: level,
            permutations: permutations_for(level, 50_000),
        }
    }

    #[test]
    fn a_firing_group_is_held_at_the_hold_level() {
        // A mild shift: not significant at 0.001 on these samples, still below 0.05.
        let mut rng = SplitMix(11);
        let before = runs(&mut rng, 120, &[0.3, 0.5, 0.2], 4);
        let now = runs(&mut rng, 40, &[0.42, 0.4, 0.18], 4);
        let g = group(now, before);
        let strict = test(&g, plan(0.0005), 9);
        let held = test(
            &g,
            Plan {
                hold_level: 0.2,
                ..plan(0.0005)
            },
            9,
        );
        assert!(held.holding, "{held:?}");
        assert_eq!(held.significant, strict.significant);
        assert!(held.permutations >= strict.permutations);
    }

    fn group(recent: Vec<Arc<RunPrint>>, baseline: Vec<Arc<RunPrint>>) -> GroupPrints {
        GroupPrints {
            dimension: "prompt_variant",
            value: "v8".into(),
            recent_runs: recent.len() as u64,
            baseline_runs: baseline.len() as u64,
            recent,
            baseline,
        }
    }

    #[test]
    fn a_tool_mix_shift_is_found_where_every_run_still_passes() {
        let mut rng = SplitMix(7);
        // Before: search 20 %, read 60 %, write 20 %. Now: search 45 %, read 35 %.
        let before = runs(&mut rng, 300, &[0.2, 0.6, 0.2], 5);
        let now = runs(&mut rng, 100, &[0.45, 0.35, 0.2], 5);
        let v = test(&group(now, before), plan(0.001), 1);
        assert!(v.significant && v.holding, "{v:?}");
        assert!(v.p_value <= 0.001, "{v:?}");
        assert!(v.statistic > v.critical.unwrap(), "{v:?}");
        assert!(v.tools_jsd > 0.02, "{v:?}");
    }

    #[test]
    fn a_steady_mix_is_quiet_and_stops_early() {
        // The false-alarm rate at level 0.01 over 300 healthy groups of small samples
        // (where the JSD itself is well above 0): about 3 expected, never near 15.
        let mut alarms = 0;
        let mut drawn = 0;
        for seed in 0..300u64 {
            let mut rng = SplitMix(seed * 31 + 5);
            let before = runs(&mut rng, 60, &[0.3, 0.5, 0.2], 4);
            let now = runs(&mut rng, 25, &[0.3, 0.5, 0.2], 4);
            let v = test(&group(now, before), plan(0.01), seed);
            assert!(v.statistic > 0.0);
            drawn += v.permutations;
            if v.significant {
                alarms += 1;
            }
        }
        eprintln!("healthy: {alarms} alarms, {drawn} permutations");
        assert!(alarms <= 9, "{alarms} false alarms in 300 tests at 1%");
        // Healthy groups settle after a few splits, not the 199 planned.
        assert!(
            drawn < 300 * 40,
            "{drawn} permutations for 300 healthy groups"
        );
    }

    #[test]
    fn step_counts_alone_can_drift() {
        let mk = |steps: u32, n: usize| -> Vec<Arc<RunPrint>> {
            (0..n)
                .map(|i| {
                    Arc::new(RunPrint {
                        tools: vec![1, 2].into_boxed_slice(),
                        steps: steps + (i % 3) as u32,
                    })
                })
                .collect()
        };
        let v = test(&group(mk(9, 60), mk(4, 200)), plan(0.001), 3);
        assert_eq!(v.tools_jsd, 0.0);
        assert!(v.steps_jsd > 0.5 && v.p_value <= 0.001, "{v:?}");
    }

    #[test]
    fn the_order_of_calls_counts_through_bigrams() {
        // The same tools in the same numbers, in another order.
        let mk = |tools: [u16; 3], n: usize| -> Vec<Arc<RunPrint>> {
            (0..n)
                .map(|_| {
                    Arc::new(RunPrint {
                        tools: tools.to_vec().into_boxed_slice(),
                        steps: 6,
                    })
                })
                .collect()
        };
        let v = test(
            &group(mk([1, 2, 3], 40), mk([3, 2, 1], 120)),
            plan(0.001),
            4,
        );
        assert_eq!(v.tools_jsd, 0.0);
        assert!(v.bigrams_jsd > 0.5 && v.p_value <= 0.001, "{v:?}");
    }

    #[test]
    fn jsd_and_bins_behave() {
        assert_eq!(jsd_split(&[1.0, 0.0], &[1.0, 1.0]), 1.0);
        assert_eq!(jsd_split(&[2.0, 2.0], &[4.0, 4.0]), 0.0);
        assert_eq!(jsd_split(&[0.0, 0.0], &[4.0, 4.0]), 0.0);
        assert_eq!(step_bin(0), 0);
        assert_eq!(step_bin(15), 15);
        assert_eq!(step_bin(16), 16);
        assert_eq!(step_bin(32), 17);
        assert_eq!(step_bin(u32::MAX), STEP_BINS - 1);
        assert_eq!(permutations_for(0.01, 50_000), 199);
        assert_eq!(permutations_for(1e-9, 50_000), 50_000);
        assert_eq!(permutations_for(0.5, 50_000), 19);
    }
}
