//! Tool failures by time and agent, for the burst rule (`detect/bursts.rs`). Ten agents
//! whose calls of one tool fail within thirty seconds is an outage of that tool, yet it is
//! too small a share of a slice's fifteen minutes for the failure-slice test to see: the
//! burst rule needs each failure's time and agent, and the tool's own failure rate over
//! the hour as its baseline.
//!
//! Failures are judged against the calls made: agents do not call evenly in time (runs
//! start together, steps come in lockstep, a batch exporter delivers late), and a second
//! with three times the calls has three times the failures without anything being wrong.
//! So each tool's calls are counted too, per second for `LISTED_MS` and per ten seconds
//! over the hour.
//!
//! In a large fleet a busy tool fails for ten agents every half-minute by chance, so the
//! rule also asks how many agents failed the tool *again* within the window: background
//! failures rarely hit one agent twice in seconds, an outage hits every call its agents
//! make. For that baseline each failure is timed against the same agent's previous
//! failure of the tool, and the hour counts repeats by how soon they came (`REPEAT_WITHIN_MS`).
//!
//! Bounded: at most `MAX_TOOLS` tools (a new one beyond that is not tracked, and counted),
//! at most `MAX_LISTED` failures listed per tool (the oldest leave first), and as many
//! agents' last failures (a new agent beyond that is not timed: its failure counts, not as a
//! repeat); a tool not called for an hour is forgotten.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

/// Failures are listed for this long: the longest burst window the policy accepts.
pub const LISTED_MS: u64 = 120_000;
/// Tools tracked at most.
pub const MAX_TOOLS: usize = 1_024;
/// Failures listed per tool at most (a burst of more agents is found long before).
const MAX_LISTED: usize = 4_096;
const BUCKET_MS: u64 = 10_000;
/// Ten-second buckets of failures: one hour.
const BUCKETS: usize = 360;
const HOUR_MS: u64 = BUCKET_MS * BUCKETS as u64;
/// A repeat is counted in every class whose bound its gap is within: the burst rule reads
/// the tightest class that holds its scanned length (1 s to the 120 s `LISTED_MS`).
pub const REPEAT_WITHIN_MS: [u64; 8] =
    [1_000, 2_000, 5_000, 10_000, 20_000, 30_000, 60_000, 120_000];
/// Repeats are counted per minute: the hour's baseline needs no finer grain.
const REPEAT_BUCKET_MS: u64 = 60_000;
const REPEAT_BUCKETS: usize = 60;

/// Calls are counted per second for `LISTED_MS`: the burst rule's lengths are whole
/// seconds.
const CALL_SECOND_MS: u64 = 1_000;
const CALL_SECONDS: usize = (LISTED_MS / CALL_SECOND_MS) as usize;

/// Repeats of one minute: (minute number, repeats per class of `REPEAT_WITHIN_MS`).
type RepeatBucket = (u64, [u32; REPEAT_WITHIN_MS.len()]);

/// Ten seconds of the hour: its failures and calls (beside its bucket number).
#[derive(Clone, Copy, Debug, Default)]
struct HourCounts {
    failures: u32,
    calls: u32,
}

#[derive(Debug)]
struct Tool {
    /// Failures of the last `LISTED_MS` (event time, worker), in arrival order.
    listed: VecDeque<(u64, String)>,
    /// Failures and calls per ten-second bucket, over the hour.
    buckets: Box<[(u64, HourCounts); BUCKETS]>,
    /// Calls per second of the last `LISTED_MS`: (second number, calls).
    seconds: Box<[(u64, u32); CALL_SECONDS]>,
    /// Each agent's latest failure of the tool (event ms), kept for `LISTED_MS`.
    last_failure: FxHashMap<String, u64>,
    /// Repeats per minute, by how soon after the agent's previous failure they came.
    repeats: Box<[RepeatBucket; REPEAT_BUCKETS]>,
    first_ms: u64,
    last_ms: u64,
}

/// One tool with a failure in the last `LISTED_MS`, as the detector reads it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ToolFailuresView {
    pub tool: String,
    /// Its failures of the last `LISTED_MS`: (event ms, worker id).
    pub failures: Vec<(u64, String)>,
    /// Its failures over the last hour, those listed included.
    pub hour_failures: u64,
    /// Its calls over the last hour, failed or not, those of `calls` included.
    pub hour_calls: u64,
    /// Its calls per second of the last `LISTED_MS`: (the second's start in ms, calls), the
    /// seconds with a call only, oldest first.
    pub calls: Vec<(u64, u32)>,
    /// Its failures over the last hour that came within `REPEAT_WITHIN_MS[c]` of the same
    /// agent's previous failure of it, for each class `c`.
    pub hour_repeats: [u64; REPEAT_WITHIN_MS.len()],
    /// How long it has been called, in ms (at most an hour): how much baseline there is.
    pub seen_ms: u64,
}

/// Every tool's recent failures.
#[derive(Debug, Default)]
pub struct ToolBursts {
    tools: FxHashMap<String, Tool>,
    /// New tools not tracked because `MAX_TOOLS` were.
    pub refused: u64,
}

impl ToolBursts {
    /// Counts one call of `tool` by `worker` at `at_ms` (event time), and its failure.
    pub fn count(&mut self, tool: &str, worker: &str, failed: bool, at_ms: u64) {
        let t = match self.tools.get_mut(tool) {
            Some(t) => t,
            None => {
                if self.tools.len() >= MAX_TOOLS {
                    self.refused += 1;
                    return;
                }
                self.tools.entry(tool.to_string()).or_insert_with(|| Tool {
                    listed: VecDeque::new(),
                    buckets: Box::new([(0, HourCounts::default()); BUCKETS]),
                    seconds: Box::new([(0, 0); CALL_SECONDS]),
                    last_failure: FxHashMap::default(),
                    repeats: Box::new([(0, [0; REPEAT_WITHIN_MS.len()]); REPEAT_BUCKETS]),
                    first_ms: at_ms,
                    last_ms: at_ms,
                })
            }
        };
        t.first_ms = t.first_ms.min(at_ms);
        t.last_ms = t.last_ms.max(at_ms);
        t.count_call(at_ms, failed);
        if !failed {
            return;
        }
        t.time_repeat(worker, at_ms);
        if t.listed.len() >= MAX_LISTED {
            t.listed.pop_front();
        }
        t.listed.push_back((at_ms, worker.to_string()));
    }

    /// Drops listed failures older than `LISTED_MS` and forgets tools not called for an
    /// hour.
    pub fn sweep(&mut self, now_ms: u64) {
        let cutoff = now_ms.saturating_sub(LISTED_MS);
        self.tools
            .retain(|_, t| now_ms.saturating_sub(t.last_ms) < HOUR_MS);
        for t in self.tools.values_mut() {
            t.listed.retain(|(at, _)| *at >= cutoff);
            t.last_failure.retain(|_, at| *at >= cutoff);
        }
    }

    /// The tools with a failure in the last `LISTED_MS` (sorted by name), and how many
    /// tools are tracked.
    pub fn view(&self, now_ms: u64) -> (Vec<ToolFailuresView>, usize) {
        let cutoff = now_ms.saturating_sub(LISTED_MS);
        let oldest_bucket = now_ms.saturating_sub(HOUR_MS) / BUCKET_MS;
        let mut out: Vec<ToolFailuresView> = self
            .tools
            .iter()
            .filter_map(|(name, t)| {
                let failures: Vec<(u64, String)> = t
                    .listed
                    .iter()
                    .filter(|(at, _)| *at >= cutoff)
                    .cloned()
                    .collect();
                if failures.is_empty() {
                    return None;
                }
                let (hour_failures, hour_calls) = t
                    .buckets
                    .iter()
                    .filter(|(b, _)| *b > oldest_bucket)
                    .fold((0u64, 0u64), |(f, c), (_, n)| {
                        (f + u64::from(n.failures), c + u64::from(n.calls))
                    });
                Some(ToolFailuresView {
                    tool: name.clone(),
                    failures,
                    hour_failures,
                    hour_calls,
                    calls: t.recent_calls(cutoff),
                    hour_repeats: t.hour_repeats(now_ms),
                    seen_ms: now_ms.saturating_sub(t.first_ms).min(HOUR_MS),
                })
            })
            .collect();
        out.sort_by(|a, b| a.tool.cmp(&b.tool));
        (out, self.tools.len())
    }
}

/// Ring slot `number` (of seconds, buckets or minutes), emptied when it last held an older
/// number; `None` when it holds a newer one (the event is older than the ring keeps).
fn slot<T: Default>(ring: &mut [(u64, T)], number: u64) -> Option<&mut T> {
    let len = ring.len().max(1) as u64;
    let cell = ring.get_mut((number % len) as usize)?;
    if cell.0 < number {
        *cell = (number, T::default());
    }
    (cell.0 == number).then_some(&mut cell.1)
}

impl Tool {
    /// Counts a call at `at_ms` in its ten seconds of the hour and, unless a newer second
    /// already holds its place (a call arriving later than `LISTED_MS`), in its second.
    fn count_call(&mut self, at_ms: u64, failed: bool) {
        if let Some(cell) = slot(&mut self.buckets[..], at_ms / BUCKET_MS) {
            cell.calls = cell.calls.saturating_add(1);
            if failed {
                cell.failures = cell.failures.saturating_add(1);
            }
        }
        if let Some(n) = slot(&mut self.seconds[..], at_ms / CALL_SECOND_MS) {
            *n = n.saturating_add(1);
        }
    }

    /// The calls of each second from `cutoff_ms` on (the second holding it included).
    fn recent_calls(&self, cutoff_ms: u64) -> Vec<(u64, u32)> {
        let from = cutoff_ms / CALL_SECOND_MS;
        let mut out: Vec<(u64, u32)> = self
            .seconds
            .iter()
            .filter(|(s, n)| *n > 0 && *s >= from)
            .map(|(s, n)| (s * CALL_SECOND_MS, *n))
            .collect();
        out.sort_unstable();
        out
    }

    /// Books `worker`'s failure at `at_ms` against its previous one: a repeat in every
    /// class its gap is within. Spans arrive out of order, so the gap is either way.
    fn time_repeat(&mut self, worker: &str, at_ms: u64) {
        let previous = match self.last_failure.get_mut(worker) {
            Some(last) => {
                let before = *last;
                *last = before.max(at_ms);
                Some(before)
            }
            None => {
                if self.last_failure.len() < MAX_LISTED {
                    self.last_failure.insert(worker.to_string(), at_ms);
                }
                None
            }
        };
        let Some(gap) = previous.map(|p| p.abs_diff(at_ms)) else {
            return;
        };
        let Some(cell) = slot(&mut self.repeats[..], at_ms / REPEAT_BUCKET_MS) else {
            return;
        };
        for (n, bound) in cell.iter_mut().zip(REPEAT_WITHIN_MS) {
            if gap <= bound {
                *n = n.saturating_add(1);
            }
        }
    }

    /// The hour's repeats per class.
    fn hour_repeats(&self, now_ms: u64) -> [u64; REPEAT_WITHIN_MS.len()] {
        let oldest = now_ms.saturating_sub(HOUR_MS) / REPEAT_BUCKET_MS;
        let mut sum = [0u64; REPEAT_WITHIN_MS.len()];
        for (minute, counts) in self.repeats.iter() {
            if *minute > oldest {
                for (s, n) in sum.iter_mut().zip(counts) {
                    *s += u64::from(*n);
                }
            }
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_listed_for_two_minutes_and_counted_for_an_hour() {
        let mut b = ToolBursts::default();
        let t0 = 10_000_000;
        b.count("web_search", "a1", false, t0);
        b.count("web_search", "a1", true, t0 + 1_000);
        b.count("web_search", "a2", true, t0 + 200_000);
        b.count("read_page", "a3", false, t0 + 200_000);
        let (v, tracked) = b.view(t0 + 200_000);
        assert_eq!(tracked, 2);
        assert_eq!(v.len(), 1, "only tools with a failure listed: {v:?}");
        assert_eq!(v[0].failures, vec![(t0 + 200_000, "a2".to_string())]);
        assert_eq!(v[0].hour_failures, 2);
        assert_eq!(v[0].seen_ms, 200_000);
        // An hour on, the first failure has left the hour.
        b.count("web_search", "a4", true, t0 + 3_601_000);
        let (v, _) = b.view(t0 + 3_601_000);
        assert_eq!(v[0].hour_failures, 2);
        assert_eq!(v[0].seen_ms, HOUR_MS);
        b.sweep(t0 + 3_601_000);
        assert_eq!(b.tools["web_search"].listed.len(), 1);
        assert!(b.tools.contains_key("read_page"));
        // Two minutes on, the failure is no longer listed; read_page was last called
        // more than an hour before and is forgotten.
        b.sweep(t0 + 3_801_000);
        assert!(b.tools["web_search"].listed.is_empty());
        assert!(!b.tools.contains_key("read_page"));
    }

    #[test]
    fn calls_are_counted_per_second_for_two_minutes_and_for_the_hour() {
        let mut b = ToolBursts::default();
        let t0 = 10_000_000;
        for i in 0..5 {
            b.count("read_page", "a1", false, t0 + i * 300);
        }
        b.count("read_page", "a2", true, t0 + 1_500);
        b.count("read_page", "a3", false, t0 + 130_000);
        b.count("read_page", "a3", true, t0 + 130_200);
        let (v, _) = b.view(t0 + 130_200);
        // The first six calls are past the two minutes, still in the hour.
        assert_eq!(v[0].calls, vec![(t0 + 130_000, 2)]);
        assert_eq!((v[0].hour_calls, v[0].hour_failures), (8, 2));
        // A call arriving later than two minutes does not take a newer second's place.
        b.count("read_page", "a4", false, t0 + 10_000);
        b.count("read_page", "a4", false, t0 + 130_500);
        let (v, _) = b.view(t0 + 130_500);
        assert_eq!(v[0].calls, vec![(t0 + 130_000, 3)]);
        assert_eq!(v[0].hour_calls, 10);
        let (v, _) = b.view(t0 + 3_640_000);
        assert!(v.is_empty(), "no failure listed: {v:?}");
        b.count("read_page", "a5", true, t0 + 3_640_000);
        let (v, _) = b.view(t0 + 3_640_000);
        assert_eq!((v[0].hour_calls, v[0].hour_failures), (4, 2), "{v:?}");
        assert_eq!(v[0].calls, vec![(t0 + 3_640_000, 1)]);
    }

    #[test]
    fn repeats_are_counted_by_how_soon_the_agent_failed_again() {
        let mut b = ToolBursts::default();
        let t0 = 10_000_000;
        b.count("run_code", "a1", true, t0);
        b.count("run_code", "a2", true, t0 + 500);
        // Out of order: 1.5 s before a1's first.
        b.count("run_code", "a1", true, t0 - 1_500);
        b.count("run_code", "a1", true, t0 + 40_000);
        b.count("web_search", "a1", true, t0 + 40_500);
        let (v, _) = b.view(t0 + 40_000);
        assert_eq!(v[0].tool, "run_code");
        // Gaps 1.5 s (a1 after its later failure) and 40 s.
        assert_eq!(v[0].hour_repeats, [0, 1, 1, 1, 1, 1, 2, 2]);
        assert_eq!(v[1].hour_repeats, [0; REPEAT_WITHIN_MS.len()]);
        // Past LISTED_MS the agent's last failure is forgotten: no repeat to time.
        b.sweep(t0 + 40_000 + LISTED_MS + 1);
        b.count("run_code", "a1", true, t0 + 40_000 + LISTED_MS + 1);
        let (v, _) = b.view(t0 + 40_000 + LISTED_MS + 1);
        assert_eq!(v[0].hour_repeats, [0, 1, 1, 1, 1, 1, 2, 2]);
        // An hour on, they have left the hour.
        b.count("run_code", "a3", true, t0 + 3_700_000);
        let (v, _) = b.view(t0 + 3_700_000);
        assert_eq!(v[0].hour_repeats, [0; REPEAT_WITHIN_MS.len()]);
    }

    #[test]
    fn tools_and_listed_failures_are_bounded() {
        let mut b = ToolBursts::default();
        for i in 0..MAX_TOOLS + 5 {
            b.count(&format!("tool{i}"), "w", true, 1_000);
        }
        assert_eq!(b.tools.len(), MAX_TOOLS);
        assert_eq!(b.refused, 5);
        for i in 0..MAX_LISTED as u64 + 10 {
            b.count("tool0", "w", true, 1_000 + i);
        }
        assert_eq!(b.tools["tool0"].listed.len(), MAX_LISTED);
        for i in 0..MAX_LISTED as u64 + 10 {
            b.count("tool0", &format!("w{i}"), true, 2_000);
        }
        assert_eq!(b.tools["tool0"].last_failure.len(), MAX_LISTED);
    }
}
