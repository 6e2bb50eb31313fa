//! Tool failure bursts: many agents whose calls of one tool fail within a short window
//! (`tool_burst_window_s`, 30 s), found from each failure's time and agent
//! (`fleet/bursts.rs`). Pure.
//!
//! Ten failing agents is an outage on a tool that fails once an hour, and an ordinary
//! half-minute on a tool a thousand agents call every few seconds at a 2 % failure rate.
//! So a count alone is not the rule: the burst must also be improbable at the tool's own
//! failure rate over the hour before the window. That rate is a share of calls, not of
//! time: agents do not call evenly (runs start together, steps come in lockstep), and a
//! few seconds with three times the calls bring three times the failures. So the failures
//! within a length are taken as Binomial over the calls made within it, at the share of
//! the hour's calls that failed; the test is its upper tail at the number of distinct
//! agents (failures are at least as many, so counting agents is conservative, and one
//! agent retrying a broken tool in a loop is the tool-loop rules' case, not this one).
//!
//! In a fleet of a thousand agents a busy tool fails for twenty of them every half-minute,
//! and ten more is no longer improbable by count. What still sets an outage apart is that
//! it fails every call its agents make: the same agent failing the tool again within
//! seconds is rare among background failures. So the scan also tests the agents that
//! failed the tool at least twice within the length, against the rate of such repeats
//! over the hour before (`fleet/bursts.rs` times each failure against the agent's last).
//!
//! An outage starts sharply: ten agents failing within three seconds is far stronger
//! evidence than the same ten spread over thirty on top of the usual failures. So the
//! test is a scan over the window and its last third and sixth (30, 10 and 5 s), and the
//! tightest significant one speaks. The level is a false-alarm budget per fleet-hour
//! spread over every tool, every length and every window of that length in the hour, as
//! behavioural drift spreads its own.

use crate::fleet::bursts::{REPEAT_WITHIN_MS, ToolFailuresView};
use crate::policy::schema::AlertSpec;

/// Windows of history a tool needs before its rate is a baseline: a commander that just
/// started (or a tool just seen) knows too little to call anything a burst.
pub const MIN_BASELINE_WINDOWS: u64 = 10;

/// A tool with at least `tool_burst_agents` failing agents in the window.
#[derive(Clone, Debug, PartialEq)]
pub struct Burst<'a> {
    pub tool: &'a str,
    /// The scanned length the agents failed within, in ms.
    pub within_ms: u64,
    /// The agents whose calls failed in the window (with `repeated`: at least twice),
    /// sorted.
    pub agents: Vec<&'a str>,
    /// The test that spoke counted agents that failed the tool again within the length.
    pub repeated: bool,
    /// Failures in the window.
    pub failures: u64,
    /// Calls of the tool in the window (by whole seconds).
    pub calls: u64,
    /// Failures expected of those calls at the share of calls that failed over the hour
    /// before (with `repeated`: repeat failures expected in one window at their rate over
    /// the hour before).
    pub expected: f64,
    /// The share of calls that failed over the hour before.
    pub failure_share: f64,
    /// The chance of at least this many failing agents in one window at that rate.
    pub p: f64,
    /// The count is improbable: the alert's condition.
    pub active: bool,
    /// The count still stands (a firing alert keeps firing while it does).
    pub holding: bool,
}

impl Burst<'_> {
    pub fn message(&self) -> String {
        let named: Vec<&str> = self.agents.iter().take(3).copied().collect();
        let more = self.agents.len().saturating_sub(named.len());
        let who = if more > 0 {
            format!("{} and {more} more", named.join(", "))
        } else {
            named.join(", ")
        };
        let within = self.within_ms as f64 / 1000.0;
        if self.repeated {
            return format!(
                "Tool {} failed repeatedly for {} agents within {within} s ({who}; {} failures, {:.2} repeats expected per {within} s at their rate over the last hour; p = {:.1e})",
                self.tool,
                self.agents.len(),
                self.failures,
                self.expected,
                self.p
            );
        }
        format!(
            "Tool {} failed for {} agents within {within} s ({who}; {} failures in {} calls, {:.2} expected at the {} % of its calls that failed over the last hour; p = {:.1e})",
            self.tool,
            self.agents.len(),
            self.failures,
            self.calls,
            self.expected,
            percent(self.failure_share),
            self.p
        )
    }
}

/// A share as a percentage with two significant digits below 10 % (a rare tool's 0.084 %
/// would read 0.1 % or 0.0 % at a fixed precision).
fn percent(share: f64) -> String {
    let pct = share * 100.0;
    let decimals = if pct >= 10.0 || pct <= 0.0 || !pct.is_finite() {
        0
    } else {
        // 1 for 1-10 %, 2 for 0.1-1 %, 3 for 0.01-0.1 % …; at most 6.
        ((1.0 - pct.log10().floor()).max(1.0) as usize).min(6)
    };
    format!("{pct:.decimals$}")
}

/// The scanned lengths, as shares of the window: its last sixth, third and all of it.
const SCAN: [u64; 3] = [6, 3, 1];

/// The tests per scanned length: failing agents, and agents failing again.
const TESTS: usize = 2;

/// The tools whose failures within the window (or its last third or sixth) came from at
/// least `tool_burst_agents` agents (or as many failing again), judged against their own
/// past.
pub fn findings<'a>(
    views: &'a [ToolFailuresView],
    tools_tracked: usize,
    now_ms: u64,
    spec: &AlertSpec,
) -> Vec<Burst<'a>> {
    // Validation keeps the window at 5-120 s; max(1) only guards the divisions.
    let window_ms = spec.tool_burst_window_s.max(1) * 1000;
    let need = spec.tool_burst_agents as usize;
    let mut out = Vec::new();
    for v in views {
        if v.seen_ms < MIN_BASELINE_WINDOWS * window_ms {
            continue;
        }
        let span_ms = v.seen_ms.saturating_sub(window_ms).max(window_ms);
        // The baselines are the hour before the window: what the window holds is taken out.
        let whole = Within::of(v, now_ms.saturating_sub(window_ms));
        let before = Before {
            failures: v.hour_failures.saturating_sub(whole.failures),
            calls: v.hour_calls.saturating_sub(whole.calls),
            whole: &whole,
            span_ms,
        };
        let mut best: Option<(f64, Burst<'a>)> = None;
        for share in SCAN {
            let len_ms = (window_ms / share).max(1000);
            let windows_per_hour = (3_600_000 / len_ms).max(1) as f64;
            let alpha = spec.tool_burst_false_alarms_per_hour
                / (tools_tracked.max(1) as f64 * windows_per_hour * (SCAN.len() * TESTS) as f64);
            // The whole window is the last length scanned: it was read above.
            let part;
            let within = if len_ms == window_ms {
                &whole
            } else {
                part = Within::of(v, now_ms.saturating_sub(len_ms));
                &part
            };
            let agents = within.agents_test(v, &before, len_ms);
            for burst in std::iter::once(agents).chain(within.repeats_test(v, &before, len_ms)) {
                if burst.agents.len() < need {
                    continue;
                }
                let strength = burst.p / alpha;
                if best.as_ref().is_none_or(|(s, _)| strength < *s) {
                    best = Some((
                        strength,
                        Burst {
                            active: burst.p <= alpha,
                            ..burst
                        },
                    ));
                }
            }
        }
        out.extend(best.map(|(_, b)| b));
    }
    out
}

/// What the hour before the window held, as the baselines read it.
struct Before<'w, 'a> {
    failures: u64,
    calls: u64,
    /// The whole window, whose repeats are taken out of each class's hour count.
    whole: &'w Within<'a>,
    /// The hour before the window, or as much of it as the tool was called.
    span_ms: u64,
}

/// A tool's failures within one scanned length.
struct Within<'a> {
    /// The distinct agents (sorted), and those among them that failed more than once.
    agents: Vec<&'a str>,
    again: Vec<&'a str>,
    /// The gaps between one agent's failures, sorted.
    gaps: Vec<u64>,
    failures: u64,
    /// Calls in the seconds the length touches (never fewer than its failures).
    calls: u64,
}

impl<'a> Within<'a> {
    fn of(v: &'a ToolFailuresView, from_ms: u64) -> Self {
        let mut all: Vec<(&str, u64)> = v
            .failures
            .iter()
            .filter(|(at, _)| *at >= from_ms)
            .map(|(at, w)| (w.as_str(), *at))
            .collect();
        let failures = all.len() as u64;
        all.sort_unstable();
        // Sorted by agent, then time: each adjacent pair of one agent's is a repeat, and
        // its gap is never negative.
        let (mut gaps, mut again) = (Vec::new(), Vec::new());
        for p in all.windows(2) {
            if p[0].0 == p[1].0 {
                gaps.push(p[1].1 - p[0].1);
                if again.last() != Some(&p[0].0) {
                    again.push(p[0].0);
                }
            }
        }
        gaps.sort_unstable();
        let mut agents: Vec<&str> = all.iter().map(|(w, _)| *w).collect();
        agents.dedup();
        // A second partly inside the length counts whole: more calls, a weaker test.
        let calls: u64 = v
            .calls
            .iter()
            .filter(|(second_ms, _)| second_ms.saturating_add(1_000) > from_ms)
            .map(|(_, n)| u64::from(*n))
            .sum();
        Within {
            agents,
            again,
            gaps,
            failures,
            calls: calls.max(failures),
        }
    }

    /// The repeats here that came within `bound_ms` of the agent's previous failure.
    fn repeats_within(&self, bound_ms: u64) -> u64 {
        self.gaps.partition_point(|g| *g <= bound_ms) as u64
    }

    /// Distinct failing agents against the calls made within the length, each failing at
    /// the share of the hour's calls before the window that failed. Half a failure of
    /// prior: a tool that never failed still has a finite share.
    fn agents_test(
        &self,
        v: &'a ToolFailuresView,
        before: &Before<'_, 'a>,
        len_ms: u64,
    ) -> Burst<'a> {
        let share = ((before.failures as f64 + 0.5) / (before.calls as f64 + 1.0)).min(1.0);
        Burst {
            expected: self.calls as f64 * share,
            failure_share: share,
            p: binomial_tail(self.agents.len() as u64, self.calls, share),
            ..self.burst(v, self.agents.clone(), false, len_ms)
        }
    }

    /// Agents failing again within the length, against the hour's repeats as soon (the
    /// tightest class that holds the length; a looser one only raises the baseline).
    fn repeats_test(
        &self,
        v: &'a ToolFailuresView,
        before: &Before<'_, 'a>,
        len_ms: u64,
    ) -> Option<Burst<'a>> {
        let class = REPEAT_WITHIN_MS.iter().position(|b| *b >= len_ms)?;
        let past = v.hour_repeats[class]
            .saturating_sub(before.whole.repeats_within(REPEAT_WITHIN_MS[class]));
        let expected = (past as f64 + 0.5) / before.span_ms as f64 * len_ms as f64;
        Some(Burst {
            expected,
            p: poisson_tail(self.again.len() as u64, expected),
            ..self.burst(v, self.again.clone(), true, len_ms)
        })
    }

    /// The burst of `agents`, its test not yet made (`p` 1).
    fn burst(
        &self,
        v: &'a ToolFailuresView,
        agents: Vec<&'a str>,
        repeated: bool,
        len_ms: u64,
    ) -> Burst<'a> {
        Burst {
            tool: &v.tool,
            within_ms: len_ms,
            agents,
            repeated,
            failures: self.failures,
            calls: self.calls,
            expected: 0.0,
            failure_share: 0.0,
            p: 1.0,
            active: false,
            holding: true,
        }
    }
}

/// P(X ≥ k) for X ~ Binomial(n, q), summed in log space like `poisson_tail`.
pub fn binomial_tail(k: u64, n: u64, q: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n || !(q.is_finite() && q > 0.0) {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let (ln_q, ln_rest) = (q.ln(), (-q).ln_1p());
    let ln_n_fact = libm::lgamma(n as f64 + 1.0);
    let term = |i: u64| {
        (ln_n_fact - libm::lgamma(i as f64 + 1.0) - libm::lgamma((n - i) as f64 + 1.0)
            + i as f64 * ln_q
            + (n - i) as f64 * ln_rest)
            .exp()
    };
    // Below the mean the tail is most of the mass: take the complement of the head.
    if (k as f64) <= n as f64 * q {
        let head: f64 = (0..k).map(term).sum();
        return (1.0 - head).clamp(0.0, 1.0);
    }
    let mut sum = 0.0;
    for i in k..=n {
        let t = term(i);
        sum += t;
        if t <= sum * 1e-15 {
            break;
        }
    }
    sum.clamp(0.0, 1.0)
}

/// P(X ≥ k) for X ~ Poisson(λ), summed from k upward in log space, so it stays exact
/// where it matters here: far in the tail.
pub fn poisson_tail(k: u64, lambda: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if !(lambda.is_finite() && lambda > 0.0) {
        return 0.0;
    }
    let ln_lambda = lambda.ln();
    let term = |i: u64| (-lambda + i as f64 * ln_lambda - libm::lgamma(i as f64 + 1.0)).exp();
    // Below the mean the tail is most of the mass: take the complement of the head.
    if (k as f64) <= lambda {
        let head: f64 = (0..k).map(term).sum();
        return (1.0 - head).clamp(0.0, 1.0);
    }
    let mut sum = 0.0;
    for i in k..k.saturating_add(10_000) {
        let t = term(i);
        sum += t;
        if t <= sum * 1e-15 {
            break;
        }
    }
    sum.clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tool called `per_s` times a second for `seen_ms` up to `now`, `hour` of its calls
    /// failed, and `failures` the recent ones.
    fn view(
        tool: &str,
        failures: &[(u64, &str)],
        (hour, per_s): (u64, u32),
        now: u64,
        seen_ms: u64,
    ) -> ToolFailuresView {
        ToolFailuresView {
            tool: tool.into(),
            failures: failures.iter().map(|(t, w)| (*t, w.to_string())).collect(),
            hour_failures: hour,
            hour_calls: u64::from(per_s) * seen_ms / 1000,
            calls: steady_calls(now, per_s),
            hour_repeats: [0; REPEAT_WITHIN_MS.len()],
            seen_ms,
        }
    }

    /// `per_s` calls in each second of the last two minutes up to `now`.
    fn steady_calls(now: u64, per_s: u32) -> Vec<(u64, u32)> {
        (0..120).rev().map(|s| (now - s * 1_000, per_s)).collect()
    }

    /// A tool a thousand agents call: 34 calls a second all hour, 20 of them failing per
    /// 30 s (2 %), of which `repeats`
    /// per hour came within 30 s of the same agent's last (fewer within less). Now 12
    /// agents failed it once in the last 20 s, and `outage` more failed every call, 3 s
    /// apart, since 25 s ago.
    fn busy_tool(now: u64, repeats: u64, outage: usize) -> ToolFailuresView {
        let mut failures: Vec<(u64, String)> = (0..12)
            .map(|i| (now - 20_000 + i * 1_000, format!("b{i:02}")))
            .collect();
        for a in 0..outage {
            for k in 0..8u64 {
                failures.push((
                    now - 25_000 + a as u64 * 100 + k * 3_000,
                    format!("o{a:02}"),
                ));
            }
        }
        failures.sort_unstable();
        let in_window = failures.len() as u64;
        ToolFailuresView {
            tool: "run_code".into(),
            failures,
            hour_failures: 2_400 + in_window,
            hour_calls: 34 * 3_600,
            calls: steady_calls(now, 34),
            // Of the classes 1, 2, 5, 10, 20, 30, 60 and 120 s.
            hour_repeats: [0, 0, 1, 2, 4, 6, 12, 24].map(|share| repeats * share / 6),
            seen_ms: 3_600_000,
        }
    }

    #[test]
    fn the_poisson_tail_is_the_textbook_one() {
        // P(X >= 1 | 1) = 1 - e^-1; P(X >= 3 | 2) = 1 - 5 e^-2.
        assert!((poisson_tail(1, 1.0) - (1.0 - (-1.0f64).exp())).abs() < 1e-12);
        assert!((poisson_tail(3, 2.0) - (1.0 - 5.0 * (-2.0f64).exp())).abs() < 1e-12);
        assert_eq!(poisson_tail(0, 3.0), 1.0);
        // Far in the tail: P(X >= 10 | 0.5) = 1.708e-10 (e^-0.5 0.5^10 / 10! is 1.632e-10,
        // and the terms after it add 4.7 %).
        let p = poisson_tail(10, 0.5);
        assert!((1.70e-10..1.72e-10).contains(&p), "{p}");
        assert!(poisson_tail(5, 0.0) == 0.0 && poisson_tail(5, f64::NAN) == 0.0);
    }

    #[test]
    fn the_binomial_tail_is_the_textbook_one() {
        // P(X >= 1 | 2, 1/2) = 3/4; P(X >= 2 | 3, 1/2) = 1/2; P(X >= 10 | 10, 0.1) = 1e-10.
        assert!((binomial_tail(1, 2, 0.5) - 0.75).abs() < 1e-12);
        assert!((binomial_tail(2, 3, 0.5) - 0.5).abs() < 1e-12);
        let p = binomial_tail(10, 10, 0.1);
        assert!((p - 1e-10).abs() < 1e-20, "{p}");
        // P(X >= 3 | 100, 1 %) = 1 - (0.99^100 + 100 0.01 0.99^99 + 4950 0.01^2 0.99^98).
        let head = 0.99f64.powi(100) + 0.99f64.powi(99) + 0.495 * 0.99f64.powi(98);
        assert!((binomial_tail(3, 100, 0.01) - (1.0 - head)).abs() < 1e-12);
        assert_eq!(binomial_tail(0, 5, 0.1), 1.0);
        assert_eq!(binomial_tail(6, 5, 0.1), 0.0);
        assert_eq!(binomial_tail(2, 5, 0.0), 0.0);
        assert_eq!(binomial_tail(2, 5, f64::NAN), 0.0);
        assert_eq!(binomial_tail(2, 5, 1.0), 1.0);
    }

    #[test]
    fn shares_read_with_two_significant_digits() {
        let read: Vec<String> = [0.25, 0.0198, 0.005, 0.00084, 0.0000123, 0.0, 1.0]
            .into_iter()
            .map(percent)
            .collect();
        assert_eq!(read, ["25", "2.0", "0.50", "0.084", "0.0012", "0", "100"]);
    }

    #[test]
    fn failures_that_come_with_a_surge_of_calls_are_not_a_burst() {
        let spec = AlertSpec::default();
        let now = 10_000_000;
        // 30 agents failing within 5 s, on a tool 5 calls a second all hour, 2 % of them
        // failing: about 0.6 failures per 5 s, so 30 is an outage …
        let names: Vec<String> = (0..30).map(|i| format!("a{i:02}")).collect();
        let thirty: Vec<(u64, &str)> = names
            .iter()
            .enumerate()
            .map(|(i, w)| (now - 4_000 + i as u64 * 100, w.as_str()))
            .collect();
        let steady = [view("read_page", &thirty, (360, 5), now, 3_600_000)];
        let found = findings(&steady, 4, now, &spec);
        assert!(found[0].active && !found[0].repeated, "{:?}", found[0]);
        assert_eq!(found[0].within_ms, 5_000);
        // … unless those seconds brought 300 calls each: 2 % of 1,800 is 36 failures.
        let mut surge = steady.clone();
        for (second, n) in surge[0].calls.iter_mut() {
            if *second + 6_000 > now {
                *n = 300;
            }
        }
        surge[0].hour_calls += 6 * 295;
        let found = findings(&surge, 4, now, &spec);
        assert!(!found[0].active, "{:?}", found[0]);
        // The least improbable length speaks: the whole window, 31 seconds of calls, six of
        // them the surge's.
        assert!(
            found[0].message().contains("30 failures in 1925 calls"),
            "{}",
            found[0].message()
        );
    }

    #[test]
    fn ten_agents_failing_a_quiet_tool_within_the_window_is_a_burst() {
        let spec = AlertSpec::default();
        let now = 10_000_000;
        let ten: Vec<(u64, String)> = (0..10)
            .map(|i| (now - 25_000 + i * 2_000, format!("a{i}")))
            .collect();
        let ten: Vec<(u64, &str)> = ten.iter().map(|(t, w)| (*t, w.as_str())).collect();
        // Two failures of 3,000 calls in the 50 minutes before: 0.03 expected of the 31
        // calls in the seconds the window touches.
        let quiet = [view("send_mail", &ten, (12, 1), now, 3_000_000)];
        let found = findings(&quiet, 4, now, &spec);
        assert_eq!(found.len(), 1);
        let b = &found[0];
        assert!(b.active, "{b:?}");
        assert_eq!(b.agents.len(), 10);
        assert_eq!(
            b.within_ms, 30_000,
            "spread over 18 s: only the whole window holds ten"
        );
        assert!(b.message().starts_with(
            "Tool send_mail failed for 10 agents within 30 s (a0, a1, a2 and 7 more; 10 failures in 31 calls, 0.03 expected at the 0.084 % of its calls that failed over the last hour; p = "
        ), "{}", b.message());
    }

    #[test]
    fn what_a_busy_tool_does_every_half_minute_is_not_a_burst() {
        let spec = AlertSpec::default();
        let now = 10_000_000;
        // 12 agents failing in 30 s, on a tool that fails 20 times per 30 s all hour (2 %
        // of 34 calls a second).
        let twelve: Vec<(u64, String)> = (0..12)
            .map(|i| (now - 20_000 + i, format!("a{i}")))
            .collect();
        let twelve: Vec<(u64, &str)> = twelve.iter().map(|(t, w)| (*t, w.as_str())).collect();
        let busy = [view("web_search", &twelve, (2_400, 34), now, 3_600_000)];
        let found = findings(&busy, 4, now, &spec);
        assert_eq!(found.len(), 1, "the count stands …");
        assert!(
            !found[0].active,
            "… but it is what the tool always does: {:?}",
            found[0]
        );
    }

    #[test]
    fn ten_agents_failing_every_call_of_a_busy_tool_is_a_burst() {
        let spec = AlertSpec::default();
        let now = 10_000_000;
        // 12 agents in 30 s against 21 failures expected: nothing. Ten more make 22, by
        // count alone still nothing (P(X >= 22) of Binomial(1054, 2 %) is about 0.43) …
        let quiet = busy_tool(now, 36, 0);
        assert!(!findings(std::slice::from_ref(&quiet), 4, now, &spec)[0].active);
        let outage = busy_tool(now, 36, 10);
        let found = findings(std::slice::from_ref(&outage), 4, now, &spec);
        let b = &found[0];
        // … but ten of them failed again within seconds, where the whole fleet repeats
        // a failure that soon a few times an hour.
        assert!(b.active && b.repeated, "{b:?}");
        assert_eq!(b.agents.len(), 10);
        assert!(
            b.agents.iter().all(|a| a.starts_with('o')),
            "{:?}",
            b.agents
        );
        assert!(
            b.message()
                .starts_with("Tool run_code failed repeatedly for 10 agents within"),
            "{}",
            b.message()
        );
        // On a tool whose failures come in retries all the time, it is nothing new.
        let retried = busy_tool(now, 60 * 120 * 6, 10);
        let found = findings(std::slice::from_ref(&retried), 4, now, &spec);
        assert!(!found[0].active, "{:?}", found[0]);
    }

    #[test]
    fn too_few_agents_old_failures_and_a_short_history_raise_nothing() {
        let spec = AlertSpec::default();
        let now = 10_000_000;
        // One agent failing ten times is the tool-loop rules' case.
        let one: Vec<(u64, &str)> = (0..10).map(|i| (now - 1_000 * i, "a1")).collect();
        assert!(findings(&[view("t", &one, (10, 1), now, 3_600_000)], 1, now, &spec).is_empty());
        // Ten agents, but 40-60 s ago: outside the 30 s window.
        let names: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
        let old: Vec<(u64, &str)> = names
            .iter()
            .enumerate()
            .map(|(i, w)| (now - 40_000 - i as u64 * 2_000, w.as_str()))
            .collect();
        assert!(findings(&[view("t", &old, (10, 1), now, 3_600_000)], 1, now, &spec).is_empty());
        // Ten agents in the window, on a tool seen for less than ten windows.
        let fresh: Vec<(u64, &str)> = names.iter().map(|w| (now - 1_000, w.as_str())).collect();
        assert!(findings(&[view("t", &fresh, (10, 1), now, 200_000)], 1, now, &spec).is_empty());
        assert_eq!(
            findings(&[view("t", &fresh, (10, 1), now, 300_000)], 1, now, &spec).len(),
            1
        );
    }

    #[test]
    fn the_level_is_spread_over_tools_lengths_and_windows() {
        let now = 10_000_000;
        let names: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
        // Ten agents, one every 3 s: no shorter length holds ten.
        let spread: Vec<(u64, &str)> = names
            .iter()
            .enumerate()
            .map(|(i, w)| (now - 500 - 3_000 * i as u64, w.as_str()))
            .collect();
        // 1 % of 10 calls a second failed before: of the 310 calls in the seconds the
        // window touches, 3.1 expected, and P(X >= 10) is about 1.4e-3.
        let v = [view("t", &spread, (370, 10), now, 3_600_000)];
        let mut spec = AlertSpec::default();
        assert!(!findings(&v, 1, now, &spec)[0].active);
        spec.tool_burst_false_alarms_per_hour = 10.0;
        // 10 / (120 windows x 3 lengths x 2 tests) = 0.014 for one tool: active; over 100
        // tools, not.
        assert!(findings(&v, 1, now, &spec)[0].active);
        assert!(!findings(&v, 100, now, &spec)[0].active);
    }

    #[test]
    fn ten_agents_within_seconds_stand_out_where_thirty_seconds_would_not() {
        let now = 10_000_000;
        let names: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
        let sharp: Vec<(u64, &str)> = names
            .iter()
            .enumerate()
            .map(|(i, w)| (now - 500 - 300 * i as u64, w.as_str()))
            .collect();
        // The same tool as above (1 % of 10 calls a second), default budget: ten agents
        // within 3 s, of the 60 calls in the seconds the last 5 s touch, is P(X >= 10) of
        // Binomial(60, 1 %), about 5.3e-10.
        let v = [view("t", &sharp, (370, 10), now, 3_600_000)];
        let found = findings(&v, 1, now, &AlertSpec::default());
        assert!(found[0].active, "{:?}", found[0]);
        assert_eq!(found[0].within_ms, 5_000);
        assert!(
            found[0]
                .message()
                .contains("failed for 10 agents within 5 s")
        );
    }
}
