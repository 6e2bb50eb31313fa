//! Correlated failure slices (pure): which slices of the fleet's operations (a tool, a
//! model, a prompt variant, a user tier, a task type, and the pairs counted in
//! `fleet/slices.rs`) fail far more often in the last 15 minutes than they did before.
//!
//! Each slice with enough recent operations and failures is compared with its own past
//! hour when it has one, else with the rest of the fleet over the same minutes, by a
//! one-sided Fisher's exact test. A slice is reported when its lift (recent failure rate
//! over the baseline's) is at least `failure_slice_lift` and its p-value survives the
//! Benjamini–Hochberg correction across every slice tested at `failure_slice_fdr`: with
//! hundreds of slices, a per-slice test at 5 % would cry wolf every hour.
//!
//! One cause, one alert: when a slice and a narrower one (one more dimension) are both
//! reported, the narrower one is kept only if it fails clearly more (1.5× the lift) and
//! carries most of the broader one's failures; else the broader one speaks for both.

use crate::fleet::slices::{RECENT_MINUTES, SliceTotals, SliceView};
use crate::policy::schema::AlertSpec;

/// How much more a narrower slice must fail to be reported instead of (not beside) its
/// broader one.
const NARROWER_LIFT: f64 = 1.5;
/// The share of a broader slice's recent failures a narrower one must carry to replace it.
const NARROWER_SHARE: f64 = 0.8;

/// A slice that fails significantly more than its baseline.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub dims: Vec<(&'static str, String)>,
    pub lift: f64,
    pub p_value: f64,
    pub recent_ops: u64,
    pub recent_failures: u64,
    /// The baseline's failure rate, and whether it is the slice's own past (else the rest
    /// of the fleet).
    pub baseline_rate: f64,
    pub own_past: bool,
    /// Reported (significant after correction, lift at the threshold); else only holding
    /// an alert that already fires (lift within the hysteresis).
    pub active: bool,
}

impl Finding {
    /// "Error rate on web_search tool: up 8.0x for agents with prompt_variant v7 in the
    /// last 15 minutes (12 of 14 failed; 1.5% before)".
    pub fn message(&self) -> String {
        let name = |(k, v): &(&str, String)| match *k {
            "tool" => format!("{v} tool"),
            "model" => format!("model {v}"),
            k => format!("{k} {v}"),
        };
        let subject = self.dims.first().map(name).unwrap_or_default();
        let narrower = self
            .dims
            .get(1)
            .map(|d| format!(" for agents with {}", name(d)))
            .unwrap_or_default();
        let baseline = if self.own_past {
            "before"
        } else {
            "for the rest of the fleet"
        };
        format!(
            "Error rate on {subject}: up {:.1}x{narrower} in the last {RECENT_MINUTES} minutes ({} of {} failed; {:.1}% {baseline})",
            self.lift,
            self.recent_failures,
            self.recent_ops,
            self.baseline_rate * 100.0
        )
    }
}

/// One-sided p-value that the slice fails more than its baseline: Fisher's exact test
/// (the hypergeometric upper tail: of all the failures in slice and baseline together,
/// how likely is it that the slice drew at least as many as it did by chance). Exact at
/// any count, where a z-test on a handful of failures claims far more than it knows.
/// `None` when the test says nothing (no failures at all).
fn p_value(f: u64, n: u64, bf: u64, bn: u64) -> Option<f64> {
    let total = n.checked_add(bn)?;
    let failures = f.checked_add(bf)?;
    if failures == 0 || n == 0 || bn == 0 {
        return None;
    }
    let top = n.min(failures);
    if f > top {
        return None;
    }
    let ln_choose = |a: u64, b: u64| {
        libm::lgamma(a as f64 + 1.0)
            - libm::lgamma(b as f64 + 1.0)
            - libm::lgamma((a - b) as f64 + 1.0)
    };
    // The first term, then each next one from the one before (a ratio of small factors).
    let good = total - failures;
    if n - f > good {
        return None;
    }
    let mut term = (ln_choose(failures, f) + ln_choose(good, n - f) - ln_choose(total, n)).exp();
    let mut sum = term;
    for x in f..top {
        let (x, k, n, g) = (x as f64, failures as f64, n as f64, good as f64);
        term *= (k - x) * (n - x) / ((x + 1.0) * (g - n + x + 1.0));
        sum += term;
        if term < sum * 1e-16 {
            break;
        }
    }
    Some(sum.clamp(0.0, 1.0))
}

struct Tested {
    finding: Finding,
    lift_ok: bool,
}

fn test(s: &SliceView, totals: &SliceTotals, spec: &AlertSpec) -> Option<Tested> {
    let min_ops = u64::from(spec.failure_slice_min_ops);
    if s.recent_ops < min_ops || s.recent_failures == 0 {
        return None;
    }
    // The rest of the fleet doing the same kind of operation.
    let has = |dim: &str| s.dims.iter().any(|(d, _)| *d == dim);
    let rest = if has("tool") {
        totals.tools
    } else if has("model") {
        totals.llm
    } else {
        totals.all
    };
    let (bf, bn, own_past) = if s.past_ops >= min_ops {
        (s.past_failures, s.past_ops, true)
    } else if totals.warming_up {
        return None;
    } else {
        (
            rest.1.saturating_sub(s.recent_failures),
            rest.0.saturating_sub(s.recent_ops),
            false,
        )
    };
    if bn < min_ops {
        return None;
    }
    let rate = s.recent_failures as f64 / s.recent_ops as f64;
    // Half a failure of prior, so a baseline without failures gives a finite lift.
    let smoothed = (bf as f64 + 0.5) / (bn as f64 + 1.0);
    let lift = rate / smoothed;
    let p = p_value(s.recent_failures, s.recent_ops, bf, bn)?;
    Some(Tested {
        finding: Finding {
            dims: s.dims.clone(),
            lift,
            p_value: p,
            recent_ops: s.recent_ops,
            recent_failures: s.recent_failures,
            baseline_rate: bf as f64 / bn as f64,
            own_past,
            active: false,
        },
        lift_ok: lift >= spec.failure_slice_lift
            && s.recent_failures >= u64::from(spec.failure_slice_min_failures),
    })
}

/// The Benjamini–Hochberg cut: the largest p-value p(i) with p(i) <= i/m × q, over every
/// test made (not only the promising ones), or `None` when nothing survives.
fn bh_cut(mut ps: Vec<f64>, q: f64) -> Option<f64> {
    ps.sort_by(f64::total_cmp);
    let m = ps.len() as f64;
    ps.iter()
        .enumerate()
        .filter(|(i, p)| **p <= (*i as f64 + 1.0) / m * q)
        .map(|(_, p)| *p)
        .next_back()
}

fn broader(a: &Finding, b: &Finding) -> bool {
    a.dims.len() < b.dims.len() && a.dims.iter().all(|d| b.dims.contains(d))
}

/// The slices to report (`active`) and those within the hysteresis of the threshold that
/// keep an open alert firing (not `active`).
pub fn findings(
    slices: &[SliceView],
    totals: &SliceTotals,
    spec: &AlertSpec,
    hysteresis: f64,
) -> Vec<Finding> {
    let tested: Vec<Tested> = slices
        .iter()
        .filter_map(|s| test(s, totals, spec))
        .collect();
    // Every slice with enough operations was tested, failures or not: a slice without a
    // recent failure has p = 1, and counting it keeps the correction honest (testing only
    // the slices that failed would shrink m and let noise through).
    let min_ops = u64::from(spec.failure_slice_min_ops);
    let quiet = totals.quiet_ops.iter().filter(|o| **o >= min_ops).count();
    let mut ps: Vec<f64> = tested.iter().map(|t| t.finding.p_value).collect();
    ps.extend(std::iter::repeat_n(1.0, quiet));
    let cut = bh_cut(ps, spec.failure_slice_fdr);
    let significant: Vec<Finding> = tested
        .iter()
        .filter(|t| t.lift_ok && cut.is_some_and(|c| t.finding.p_value <= c))
        .map(|t| Finding {
            active: true,
            ..t.finding.clone()
        })
        .collect();
    let mut out: Vec<Finding> = significant
        .iter()
        .filter(|s| !explained(s, &significant))
        .cloned()
        .collect();
    let hold = spec.failure_slice_lift * (1.0 - hysteresis);
    let holding: Vec<Finding> = tested
        .into_iter()
        .filter(|t| t.finding.lift >= hold && !out.iter().any(|o| o.dims == t.finding.dims))
        .map(|t| t.finding)
        .collect();
    out.extend(holding);
    out
}

/// Whether another reported slice speaks for this one: a narrower one that fails clearly
/// more and carries most of its failures, or a broader one nearly as bad.
fn explained(s: &Finding, all: &[Finding]) -> bool {
    explained_by_narrower(s, all)
        || all.iter().any(|p| {
            broader(p, s) && p.lift * NARROWER_LIFT > s.lift && !explained_by_narrower(p, all)
        })
}

/// A narrower reported slice fails clearly more and carries most of `s`'s failures.
fn explained_by_narrower(s: &Finding, all: &[Finding]) -> bool {
    all.iter().any(|c| {
        broader(s, c)
            && c.lift >= s.lift * NARROWER_LIFT
            && c.recent_failures as f64 >= s.recent_failures as f64 * NARROWER_SHARE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(dims: &[(&'static str, &str)], recent: (u64, u64), past: (u64, u64)) -> SliceView {
        SliceView {
            dims: dims.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            recent_ops: recent.0,
            recent_failures: recent.1,
            past_ops: past.0,
            past_failures: past.1,
        }
    }

    /// Totals where tool calls, LLM calls and the whole fleet fail alike.
    fn same(ops: u64, failures: u64) -> SliceTotals {
        SliceTotals {
            all: (ops, failures),
            tools: (ops, failures),
            llm: (ops, failures),
            quiet_ops: Vec::new(),
            warming_up: false,
        }
    }

    fn active(f: &[Finding]) -> Vec<String> {
        f.iter()
            .filter(|f| f.active)
            .map(|f| {
                f.dims
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect()
    }

    #[test]
    fn ten_agents_failing_one_tool_at_once_is_one_finding() {
        let spec = AlertSpec::default();
        // web_search failed 10 of 12 times just now, 3 of 400 in the hour before; the same
        // failures show in its pairs with the model and the prompt variants.
        let slices = vec![
            slice(&[("tool", "web_search")], (12, 10), (400, 3)),
            slice(
                &[("tool", "web_search"), ("model", "gpt-4o")],
                (12, 10),
                (400, 3),
            ),
            slice(
                &[("tool", "web_search"), ("prompt_variant", "v6")],
                (6, 5),
                (200, 2),
            ),
            slice(
                &[("tool", "web_search"), ("prompt_variant", "v7")],
                (6, 5),
                (200, 1),
            ),
            slice(&[("model", "gpt-4o")], (300, 12), (5_000, 60)),
            slice(&[("tool", "grep")], (50, 1), (900, 15)),
        ];
        let f = findings(&slices, &same(2_000, 14), &spec, 0.05);
        assert_eq!(active(&f), ["tool=web_search"], "{f:?}");
        let msg = f[0].message();
        assert!(
            msg.starts_with("Error rate on web_search tool: up "),
            "{msg}"
        );
        assert!(
            msg.contains("in the last 15 minutes (10 of 12 failed; 0.8% before)"),
            "{msg}"
        );
    }

    #[test]
    fn a_failure_confined_to_one_prompt_variant_is_named_by_it() {
        let spec = AlertSpec::default();
        let slices = vec![
            slice(&[("tool", "web_search")], (60, 14), (800, 8)),
            slice(
                &[("tool", "web_search"), ("prompt_variant", "v7")],
                (15, 13),
                (200, 2),
            ),
            slice(
                &[("tool", "web_search"), ("prompt_variant", "v6")],
                (45, 1),
                (600, 6),
            ),
            slice(&[("prompt_variant", "v7")], (40, 13), (500, 5)),
        ];
        let f = findings(&slices, &same(2_000, 20), &spec, 0.05);
        let got = active(&f);
        assert!(
            got.contains(&"tool=web_search,prompt_variant=v7".to_string()),
            "{got:?}"
        );
        assert!(
            !got.contains(&"tool=web_search".to_string()),
            "the narrower one explains it: {got:?}"
        );
        let msg = f.iter().find(|f| f.dims.len() == 2).unwrap().message();
        assert!(
            msg.contains("on web_search tool: up")
                && msg.contains("for agents with prompt_variant v7"),
            "{msg}"
        );
    }

    #[test]
    fn noise_across_many_slices_raises_nothing() {
        let spec = AlertSpec::default();
        // 300 slices at a steady 2 % failure rate, recent and past alike, with the usual
        // wobble: a few fail 2-3 of 50 recently.
        let slices: Vec<SliceView> = (0..300)
            .map(|i| {
                let v: &'static str = Box::leak(format!("tool-{i}").into_boxed_str());
                slice(&[("tool", v)], (50, [0, 1, 1, 2, 3][i % 5]), (150, 3))
            })
            .collect();
        assert!(active(&findings(&slices, &same(60_000, 1_200), &spec, 0.05)).is_empty());
    }

    #[test]
    fn too_few_samples_or_a_small_lift_are_not_findings() {
        let spec = AlertSpec::default();
        let few = [slice(&[("tool", "x")], (4, 4), (100, 0))];
        assert!(
            active(&findings(&few, &same(1_000, 10), &spec, 0.05)).is_empty(),
            "under min ops"
        );
        let mild = [slice(&[("tool", "x")], (200, 10), (2_000, 40))];
        assert!(
            active(&findings(&mild, &same(10_000, 100), &spec, 0.05)).is_empty(),
            "2.5x is under 3x"
        );
        // No past of its own: the rest of the fleet is the baseline.
        let new_tool = [slice(&[("tool", "new")], (20, 15), (0, 0))];
        let f = findings(&new_tool, &same(1_000, 20), &spec, 0.05);
        assert_eq!(active(&f), ["tool=new"]);
        assert!(
            f[0].message().contains("for the rest of the fleet"),
            "{}",
            f[0].message()
        );
        // Not in the fleet's first minutes: the rest of the fleet is no baseline yet …
        let warming = SliceTotals {
            warming_up: true,
            ..same(1_000, 20)
        };
        assert!(findings(&new_tool, &warming, &spec, 0.05).is_empty());
        // … while a slice with a past of its own is still judged against it.
        let known = [slice(&[("tool", "x")], (20, 15), (400, 2))];
        assert_eq!(active(&findings(&known, &warming, &spec, 0.05)), ["tool=x"]);
    }

    #[test]
    fn benjamini_hochberg_cuts_at_the_largest_passing_rank() {
        assert_eq!(
            bh_cut(vec![0.001, 0.008, 0.039, 0.041, 0.9], 0.05),
            Some(0.008)
        );
        assert_eq!(bh_cut(vec![0.2, 0.3], 0.05), None);
        assert_eq!(bh_cut(vec![], 0.05), None);
    }

    #[test]
    fn a_tool_is_compared_with_other_tool_calls_not_with_llm_calls() {
        // At the level this test was written for (the default is stricter): what it
        // checks is the baseline a tool is compared with and what the correction counts.
        let spec = AlertSpec {
            failure_slice_fdr: 0.01,
            ..AlertSpec::default()
        };
        // summarise failed 5 of 91 times in its first 15 minutes. Tool calls fail 2 % of
        // the time across the fleet and LLM calls never: against every operation (1 %)
        // that is 5x; against the other tool calls it is noise.
        let slices = vec![slice(&[("tool", "summarise")], (91, 5), (0, 0))];
        let mut totals = SliceTotals {
            all: (4_000, 45),
            tools: (2_000, 45),
            llm: (2_000, 0),
            quiet_ops: Vec::new(),
            warming_up: false,
        };
        assert!(active(&findings(&slices, &totals, &spec, 0.05)).is_empty());
        // 8 of 200 where the other tool calls fail 0.7 % stands out (p ≈ 0.0004) …
        let slices = vec![slice(&[("tool", "summarise")], (200, 8), (0, 0))];
        totals.tools = (2_000, 20);
        assert_eq!(
            active(&findings(&slices, &totals, &spec, 0.05)),
            ["tool=summarise"]
        );
        // … unless thousands of quiet slices were tested too (the correction counts them).
        totals.quiet_ops = vec![100; 4_000];
        let strict = findings(&slices, &totals, &spec, 0.05);
        assert!(active(&strict).is_empty(), "{strict:?}");
    }

    #[test]
    fn the_p_value_is_fishers_exact_upper_tail() {
        // Checked against the hypergeometric sums in exact integer arithmetic.
        let close = |a: f64, b: f64| (a - b).abs() <= b * 1e-9;
        let p = |f, n, bf, bn| p_value(f, n, bf, bn).unwrap();
        assert!(
            close(p(5, 78, 3, 330), 0.007884574684120528),
            "{}",
            p(5, 78, 3, 330)
        );
        assert!(close(p(10, 12, 3, 400), 5.352853248680365e-16));
        assert!(close(p(6, 200, 14, 1_800), 0.010842424362194713));
        assert_eq!(p_value(0, 10, 0, 10), None);
        assert!(close(p(0, 10, 5, 10), 1.0));
        // Large counts stay finite and in range.
        let big = p(5_000, 100_000, 20_000, 1_000_000);
        assert!((0.0..=1.0).contains(&big), "{big}");
    }
}
