//! Tail sampling: which finished traces are kept, and why. Pure: the trace's summary, the
//! task types' figures from the fleet snapshot, the flags and the policy's `[sampling]` in;
//! the reasons out (none: dropped).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::policy::schema::SamplingSpec;

/// Why a trace was kept. A trace records every reason that held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Why {
    /// A span with error status or `error.type`.
    Error,
    /// Its task failed, timed out or was dead-lettered.
    TaskFailed,
    /// Above its task type's P99 cost.
    P99Cost,
    /// Above its task type's P99 duration.
    P99Duration,
    /// Over `cost_multiple` × its task type's average cost.
    CostMultiple,
    /// Slower than `keep_slower_than_ms`.
    Slow,
    /// A run of a task type with under `MIN_RUNS` runs in the last hour: no P99 or average
    /// to compare it with yet, so it is kept.
    Unmeasured,
    /// A detector or an alert flagged its worker, task or trace.
    Flagged,
    /// A per-pool sentinel.
    Sentinel,
    /// The healthy sample (by trace id).
    Healthy,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::TaskFailed => "task_failed",
            Self::P99Cost => "p99_cost",
            Self::P99Duration => "p99_duration",
            Self::CostMultiple => "cost_multiple",
            Self::Slow => "slow",
            Self::Unmeasured => "unmeasured",
            Self::Flagged => "flagged",
            Self::Sentinel => "sentinel",
            Self::Healthy => "healthy",
        }
    }

    pub const ALL: [Why; 10] = [
        Self::Error,
        Self::TaskFailed,
        Self::P99Cost,
        Self::P99Duration,
        Self::CostMultiple,
        Self::Slow,
        Self::Unmeasured,
        Self::Flagged,
        Self::Sentinel,
        Self::Healthy,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.as_str() == s)
    }

    /// Reasons that keep 100 % of their traces, whatever the healthy rate.
    pub fn is_always(self) -> bool {
        !matches!(self, Self::Sentinel | Self::Healthy)
    }
}

/// What the sampler reads of a finished trace.
#[derive(Clone, Debug, Default)]
pub struct Shape {
    pub trace_id: [u8; 16],
    pub error: bool,
    pub task_failed: bool,
    /// The rule (or cause) of each flag that applies.
    pub flagged_by: Vec<String>,
    pub task_type: Option<String>,
    /// The first pool its spans name.
    pub pool: Option<String>,
    pub cost_usd: f64,
    pub duration_ms: f64,
    /// A run (a task root) is in it: only runs are compared with their type's figures.
    pub has_run: bool,
    /// The highest healthy rate of the `[sampling] rule`s its attributes match.
    pub rule_rate: Option<f64>,
}

/// A task type's figures over the last hour (from the fleet snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TypeFigures {
    pub runs: u64,
    pub p99_cost_usd: Option<f64>,
    pub p99_duration_ms: Option<f64>,
    pub mean_cost_usd: Option<f64>,
}

/// Runs a type needs in the last hour before its P99 and average mean anything (a P99 of
/// fewer values is little more than their maximum).
pub const MIN_RUNS: u64 = 100;

/// Sentinels kept per pool in the current minute.
#[derive(Debug, Default)]
pub struct Sentinels {
    minute: u64,
    kept: HashMap<String, u32>,
}

impl Sentinels {
    /// Takes a sentinel place for `pool` in the minute of `now_ms`, if one is left.
    fn take(&mut self, pool: &str, per_minute: u32, now_ms: u64) -> bool {
        let minute = now_ms / 60_000;
        if minute != self.minute {
            self.minute = minute;
            self.kept.clear();
        }
        if !self.kept.contains_key(pool) && self.kept.len() >= 10_000 {
            return false;
        }
        let n = self.kept.entry(pool.to_string()).or_default();
        if *n >= per_minute {
            return false;
        }
        *n += 1;
        true
    }
}

/// The OpenTelemetry consistent-sampling randomness of a trace id: its rightmost 56 bits.
/// W3C random trace ids are random there, so the same id gives the same answer on every
/// replica (and agrees with OpenTelemetry's own probability samplers).
pub fn randomness(trace_id: &[u8; 16]) -> u64 {
    trace_id[9..16]
        .iter()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

/// Kept at `rate`: randomness at or above the rejection threshold (1 - rate) × 2^56.
pub fn kept_at(trace_id: &[u8; 16], rate: f64) -> bool {
    if rate >= 1.0 {
        return true;
    }
    if rate.is_nan() || rate <= 0.0 {
        return false;
    }
    let threshold = ((1.0 - rate) * (1u64 << 56) as f64) as u64;
    randomness(trace_id) >= threshold
}

/// The least a value must exceed to be above a P99 the fleet's sketches gave: the sketch
/// may give up to its accuracy less than the true P99. Runs that all cost the same (one
/// model, a fixed prompt) would otherwise be "above their P99" half the time, every one of
/// them: the example fleet kept 40 % of its traces as `p99_cost`.
fn above_p99(p99: f64) -> f64 {
    // The true value v is at most α·v from the estimate, so at most estimate / (1 − α).
    p99 / (1.0 - crate::fleet::window::SKETCH_ACCURACY)
}

/// Why `t` is kept under `spec` (empty: dropped).
pub fn decide(
    t: &Shape,
    figures: Option<&TypeFigures>,
    spec: &SamplingSpec,
    sentinels: &mut Sentinels,
    now_ms: u64,
) -> Vec<Why> {
    let mut why = Vec::new();
    if spec.keep_errors && t.error {
        why.push(Why::Error);
    }
    if spec.keep_errors && t.task_failed {
        why.push(Why::TaskFailed);
    }
    let measured = figures.filter(|f| f.runs >= MIN_RUNS);
    let tail_checked = spec.keep_p99 || spec.cost_multiple > 0.0;
    if tail_checked && t.has_run && t.task_type.is_some() && measured.is_none() {
        why.push(Why::Unmeasured);
    }
    if let (true, Some(f)) = (t.has_run, measured) {
        if spec.keep_p99 {
            if f.p99_cost_usd.is_some_and(|p| t.cost_usd > above_p99(p)) {
                why.push(Why::P99Cost);
            }
            if f.p99_duration_ms
                .is_some_and(|p| t.duration_ms > above_p99(p))
            {
                why.push(Why::P99Duration);
            }
        }
        if spec.cost_multiple > 0.0
            && f.mean_cost_usd
                .is_some_and(|m| m > 0.0 && t.cost_usd > spec.cost_multiple * m)
        {
            why.push(Why::CostMultiple);
        }
    }
    if spec
        .keep_slower_than_ms
        .is_some_and(|ms| t.duration_ms > ms as f64)
    {
        why.push(Why::Slow);
    }
    if spec.keep_flagged && !t.flagged_by.is_empty() {
        why.push(Why::Flagged);
    }
    let rate = t.rule_rate.map_or(spec.healthy_rate, |r| r.max(0.0));
    if kept_at(&t.trace_id, rate) {
        why.push(Why::Healthy);
    } else if why.is_empty()
        && spec.sentinels_per_pool_per_minute > 0
        && let Some(pool) = &t.pool
        && sentinels.take(pool, spec.sentinels_per_pool_per_minute, now_ms)
    {
        why.push(Why::Sentinel);
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> [u8; 16] {
        // Spread like random ids: a multiplicative hash of n in the low bytes.
        let mut a = [7u8; 16];
        a[8..].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
        a
    }

    #[test]
    fn the_healthy_sample_is_by_trace_id_and_near_its_rate() {
        for rate in [0.0, 0.1, 0.2, 0.5, 1.0] {
            let kept = (0..100_000).filter(|n| kept_at(&id(*n), rate)).count();
            let share = kept as f64 / 100_000.0;
            assert!((share - rate).abs() < 0.01, "rate {rate}: kept {share}");
        }
        // The same id, the same answer; a higher rate keeps a superset.
        for n in 0..10_000 {
            assert_eq!(kept_at(&id(n), 0.1), kept_at(&id(n), 0.1));
            if kept_at(&id(n), 0.1) {
                assert!(kept_at(&id(n), 0.2));
            }
        }
    }

    /// A type with a baseline that an ordinary run stays well inside.
    const MEASURED: TypeFigures = TypeFigures {
        runs: 500,
        p99_cost_usd: Some(1.0),
        p99_duration_ms: Some(1e9),
        mean_cost_usd: Some(1.0),
    };

    fn healthy(n: u64) -> Shape {
        Shape {
            trace_id: id(n),
            task_type: Some("qa".into()),
            pool: Some("docs".into()),
            cost_usd: 0.01,
            duration_ms: 1_000.0,
            has_run: true,
            ..Default::default()
        }
    }

    /// Runs that all cost and last the same are not above their P99, whatever side of
    /// the true value the fleet's sketch puts it; one a little over it still is.
    #[test]
    fn runs_tied_at_their_p99_are_not_its_tail() {
        let spec = SamplingSpec {
            healthy_rate: 0.0,
            cost_multiple: 0.0,
            ..Default::default()
        };
        let mut s = Sentinels::default();
        let mut kept = 0;
        for i in 1..200 {
            let same = 0.000_137 * i as f64;
            let mut sketch = crate::fleet::window::WindowedSketch::new(60_000, 60);
            for _ in 0..1_000 {
                sketch.add(1_000, same);
            }
            let p99 = sketch.percentiles(1_000).p99;
            let f = TypeFigures {
                runs: 1_000,
                p99_cost_usd: p99,
                p99_duration_ms: p99,
                mean_cost_usd: p99,
            };
            let t = Shape {
                cost_usd: same,
                duration_ms: same,
                ..healthy(i)
            };
            kept += decide(&t, Some(&f), &spec, &mut s, 0).len();
            let over = Shape {
                cost_usd: same * 1.03,
                duration_ms: same,
                ..healthy(i)
            };
            assert_eq!(decide(&over, Some(&f), &spec, &mut s, 0), [Why::P99Cost]);
        }
        assert_eq!(kept, 0, "tied runs kept as the tail");
    }

    #[test]
    fn errors_tails_and_flags_are_always_kept_with_every_reason() {
        let spec = SamplingSpec {
            healthy_rate: 0.0,
            keep_slower_than_ms: Some(60_000),
            ..Default::default()
        };
        let f = TypeFigures {
            runs: 500,
            p99_cost_usd: Some(0.05),
            p99_duration_ms: Some(8_000.0),
            mean_cost_usd: Some(0.012),
        };
        let mut s = Sentinels::default();
        assert!(decide(&healthy(1), Some(&f), &spec, &mut s, 0).is_empty());
        let t = Shape {
            error: true,
            task_failed: true,
            cost_usd: 0.08,
            duration_ms: 70_000.0,
            flagged_by: vec!["tool_loop".into()],
            ..healthy(2)
        };
        let why = decide(&t, Some(&f), &spec, &mut s, 0);
        assert_eq!(
            why,
            vec![
                Why::Error,
                Why::TaskFailed,
                Why::P99Cost,
                Why::P99Duration,
                Why::CostMultiple,
                Why::Slow,
                Why::Flagged
            ]
        );
        // 3 × the average, under the P99.
        let t = Shape {
            cost_usd: 0.04,
            ..healthy(3)
        };
        assert_eq!(
            decide(&t, Some(&f), &spec, &mut s, 0),
            vec![Why::CostMultiple]
        );
        // Too few runs of the type: its P99 means nothing yet, so the run is kept as
        // unmeasured, whatever it cost.
        let few = TypeFigures { runs: 5, ..f };
        let t = Shape {
            cost_usd: 1.0,
            ..healthy(4)
        };
        assert_eq!(
            decide(&t, Some(&few), &spec, &mut s, 0),
            vec![Why::Unmeasured]
        );
        assert_eq!(
            decide(&healthy(4), None, &spec, &mut s, 0),
            vec![Why::Unmeasured]
        );
        // Each switch off turns its reason off.
        let off = SamplingSpec {
            healthy_rate: 0.0,
            keep_errors: false,
            keep_p99: false,
            cost_multiple: 0.0,
            keep_flagged: false,
            ..Default::default()
        };
        let t = Shape {
            error: true,
            cost_usd: 1.0,
            flagged_by: vec!["x".into()],
            ..healthy(5)
        };
        assert!(decide(&t, Some(&f), &off, &mut s, 0).is_empty());
    }

    #[test]
    fn sentinels_keep_a_fixed_number_per_pool_per_minute_and_rules_raise_the_rate() {
        let spec = SamplingSpec {
            healthy_rate: 0.0,
            sentinels_per_pool_per_minute: 2,
            ..Default::default()
        };
        let mut s = Sentinels::default();
        let kept = |s: &mut Sentinels, n: u64, pool: &str, at: u64| {
            let t = Shape {
                pool: Some(pool.into()),
                ..healthy(n)
            };
            decide(&t, Some(&MEASURED), &spec, s, at) == vec![Why::Sentinel]
        };
        assert!(kept(&mut s, 1, "a", 0));
        assert!(kept(&mut s, 2, "a", 1_000));
        assert!(!kept(&mut s, 3, "a", 2_000));
        assert!(kept(&mut s, 4, "b", 2_000));
        assert!(kept(&mut s, 5, "a", 60_000), "a new minute");
        let t = Shape {
            rule_rate: Some(1.0),
            ..healthy(9)
        };
        let spec = SamplingSpec {
            healthy_rate: 0.0,
            ..Default::default()
        };
        assert_eq!(
            decide(&t, Some(&MEASURED), &spec, &mut s, 0),
            vec![Why::Healthy]
        );
    }
}
