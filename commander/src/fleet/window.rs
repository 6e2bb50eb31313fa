//! Time buckets and windowed quantile sketches: the bounded memory of the live state.
//!
//! Every ring holds at most a fixed number of buckets and forgets the oldest; a bucket is
//! only stored once something happened in it, so an idle worker costs nothing.

use std::collections::VecDeque;

use serde::Serialize;
use sketches_ddsketch::{Config as SketchConfig, DDSketch};

/// Sparkline resolution.
pub const BUCKET_MS: u64 = 10_000;
/// Per-worker history: one hour of 10 s buckets.
pub const WORKER_BUCKETS: usize = 360;
/// Fleet history: 24 hours of 10 s buckets.
pub const FLEET_BUCKETS: usize = 8_640;

pub fn bucket_of(ms: u64) -> u64 {
    ms / BUCKET_MS
}

/// What one worker did in one 10 s bucket. Compact on purpose (28 bytes): 10,000 workers
/// × 360 buckets is the per-worker ceiling.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WorkerBucket {
    /// Bucket number (ms / 10,000), truncated to u32 (wraps in year 3331).
    pub epoch: u32,
    pub llm_calls: u16,
    pub tool_calls: u16,
    /// Failed LLM calls, tool calls and task runs.
    pub errors: u16,
    pub tasks_ok: u16,
    pub tasks_failed: u16,
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// Micro-USD (saturates at $4,294 per worker per 10 s).
    pub cost_micros: u32,
}

/// When an event counts in windows and rates: its own time (`time_ns`, the span's end or
/// the metric point's time), bounded by its arrival (`now_ms`: nothing counts in the
/// future) and `lateness_ms` before it (batch exporters hold spans for seconds; a replay
/// stamped hours ago counts at the edge of the allowance, not in buckets long gone).
pub fn event_ms(time_ns: u64, now_ms: u64, lateness_ms: u64) -> u64 {
    (time_ns / 1_000_000).clamp(now_ms.saturating_sub(lateness_ms), now_ms)
}

/// A sparse ring of per-worker buckets.
#[derive(Clone, Debug, Default)]
pub struct WorkerRing {
    buckets: VecDeque<WorkerBucket>,
}

impl WorkerRing {
    /// The bucket for `ms`, created if needed. A late event (the caller bounds how late)
    /// lands in its own bucket; one older than every bucket kept lands in the oldest.
    pub fn at(&mut self, ms: u64) -> &mut WorkerBucket {
        let epoch = bucket_of(ms) as u32;
        let newest = self.buckets.back().map(|b| b.epoch);
        if let Some(n) = newest
            && epoch < n
        {
            let i = match self.buckets.binary_search_by_key(&epoch, |b| b.epoch) {
                Ok(i) => i,
                Err(0) if self.buckets.len() == WORKER_BUCKETS => 0,
                Err(i) => {
                    if self.buckets.len() == WORKER_BUCKETS {
                        self.buckets.pop_front();
                        self.buckets.insert(
                            i - 1,
                            WorkerBucket {
                                epoch,
                                ..Default::default()
                            },
                        );
                        i - 1
                    } else {
                        self.buckets.insert(
                            i,
                            WorkerBucket {
                                epoch,
                                ..Default::default()
                            },
                        );
                        i
                    }
                }
            };
            return &mut self.buckets.make_contiguous()[i];
        }
        if newest.is_none_or(|n| epoch > n) {
            if self.buckets.len() == WORKER_BUCKETS {
                self.buckets.pop_front();
            } else if self.buckets.len() == self.buckets.capacity() {
                // Grow by doubling, but never past the ceiling (plain doubling would end at
                // 512 slots for 360 buckets: 40% more memory per worker).
                let target = (self.buckets.capacity().max(4) * 2).min(WORKER_BUCKETS);
                self.buckets.reserve_exact(target - self.buckets.len());
            }
            self.buckets.push_back(WorkerBucket {
                epoch,
                ..Default::default()
            });
        }
        // Just pushed or already present: the deque is not empty.
        let len = self.buckets.len();
        &mut self.buckets.make_contiguous()[len - 1]
    }

    /// Buckets whose start lies within `window_ms` before `now_ms`.
    pub fn recent(&self, now_ms: u64, window_ms: u64) -> impl Iterator<Item = &WorkerBucket> {
        let from = bucket_of(now_ms.saturating_sub(window_ms)) as u32;
        self.buckets
            .iter()
            .rev()
            .take_while(move |b| b.epoch >= from)
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Dense series for the last hour, oldest first (zeros where nothing happened).
    pub fn series(&self, now_ms: u64) -> Vec<SeriesPoint> {
        let now = bucket_of(now_ms);
        let first = now.saturating_sub(WORKER_BUCKETS as u64 - 1);
        let mut out: Vec<SeriesPoint> = (first..=now)
            .map(|e| SeriesPoint {
                t: e * BUCKET_MS / 1000,
                ..Default::default()
            })
            .collect();
        for b in &self.buckets {
            let e = u64::from(b.epoch);
            if e >= first && e <= now {
                let p = &mut out[(e - first) as usize];
                p.llm_calls = u64::from(b.llm_calls);
                p.tool_calls = u64::from(b.tool_calls);
                p.errors = u64::from(b.errors);
                p.tasks = u64::from(b.tasks_ok) + u64::from(b.tasks_failed);
                p.input_tokens = u64::from(b.input_tokens);
                p.output_tokens = u64::from(b.output_tokens);
                p.cost_usd = f64::from(b.cost_micros) / 1e6;
            }
        }
        out
    }
}

/// One sparkline point (a 10 s bucket).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct SeriesPoint {
    /// Bucket start, Unix seconds.
    pub t: u64,
    pub llm_calls: u64,
    pub tool_calls: u64,
    pub errors: u64,
    pub tasks: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    /// Fleet series only: most workers running a task at once in the bucket.
    pub parallel_agents: u64,
}

/// A dense ring for the fleet: `FLEET_BUCKETS` slots indexed by epoch.
#[derive(Clone, Debug)]
pub struct FleetRing {
    slots: Vec<SeriesPoint>,
    epochs: Vec<u64>,
}

impl Default for FleetRing {
    fn default() -> Self {
        Self {
            slots: vec![SeriesPoint::default(); FLEET_BUCKETS],
            epochs: vec![u64::MAX; FLEET_BUCKETS],
        }
    }
}

impl FleetRing {
    pub fn at(&mut self, ms: u64) -> &mut SeriesPoint {
        let epoch = bucket_of(ms);
        let i = (epoch % FLEET_BUCKETS as u64) as usize;
        if self.epochs[i] != epoch {
            self.epochs[i] = epoch;
            self.slots[i] = SeriesPoint {
                t: epoch * BUCKET_MS / 1000,
                ..Default::default()
            };
        }
        &mut self.slots[i]
    }

    /// Points of the last `window_ms`, oldest first, zeros where nothing happened.
    pub fn series(&self, now_ms: u64, window_ms: u64) -> Vec<SeriesPoint> {
        let now = bucket_of(now_ms);
        let n = (window_ms / BUCKET_MS).clamp(1, FLEET_BUCKETS as u64);
        let first = now + 1 - n.min(now + 1);
        (first..=now)
            .map(|e| {
                let i = (e % FLEET_BUCKETS as u64) as usize;
                if self.epochs[i] == e {
                    self.slots[i]
                } else {
                    SeriesPoint {
                        t: e * BUCKET_MS / 1000,
                        ..Default::default()
                    }
                }
            })
            .collect()
    }

    /// Sum over the last `window_ms`.
    pub fn total(&self, now_ms: u64, window_ms: u64) -> SeriesPoint {
        let mut t = SeriesPoint::default();
        for p in self.series(now_ms, window_ms) {
            t.llm_calls += p.llm_calls;
            t.tool_calls += p.tool_calls;
            t.errors += p.errors;
            t.tasks += p.tasks;
            t.input_tokens += p.input_tokens;
            t.output_tokens += p.output_tokens;
            t.cost_usd += p.cost_usd;
            t.parallel_agents = t.parallel_agents.max(p.parallel_agents);
        }
        t
    }
}

/// Percentiles of a quantity over a rolling window: one mergeable DDSketch per slice
/// (relative error 1%), merged when read.
#[derive(Clone)]
pub struct WindowedSketch {
    slice_ms: u64,
    slices: VecDeque<(u64, DDSketch)>,
    max_slices: usize,
}

impl std::fmt::Debug for WindowedSketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowedSketch")
            .field("slice_ms", &self.slice_ms)
            .field("slices", &self.slices.len())
            .finish()
    }
}

/// The sketches' relative accuracy: a percentile they give is within this fraction of
/// the true one, on either side.
pub const SKETCH_ACCURACY: f64 = 0.01;

fn sketch() -> DDSketch {
    // At most 1,024 bins per sketch (a few KiB).
    DDSketch::new(SketchConfig::new(SKETCH_ACCURACY, 1024, 1e-9))
}

/// P50 / P95 / P99 of a window, plus how many values it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    /// P99.9: meaningful over a thousand values or more.
    pub p999: Option<f64>,
    /// The average.
    pub mean: Option<f64>,
}

impl WindowedSketch {
    /// A window of `slices` slices of `slice_ms` each.
    pub fn new(slice_ms: u64, slices: usize) -> Self {
        Self {
            slice_ms: slice_ms.max(1),
            slices: VecDeque::new(),
            max_slices: slices.max(1),
        }
    }

    pub fn add(&mut self, now_ms: u64, v: f64) {
        if !v.is_finite() || v < 0.0 {
            return;
        }
        let slice = now_ms / self.slice_ms;
        if self.slices.back().is_none_or(|(s, _)| slice > *s) {
            if self.slices.len() == self.max_slices {
                self.slices.pop_front();
            }
            self.slices.push_back((slice, sketch()));
        }
        if let Some((_, s)) = self.slices.back_mut() {
            s.add(v);
        }
    }

    pub fn percentiles(&self, now_ms: u64) -> Percentiles {
        let now = now_ms / self.slice_ms;
        self.between(now.saturating_sub(self.max_slices as u64 - 1), now)
    }

    /// The window split in two: its newest `recent` slices (the current one included) and
    /// the slices before them, so a change within the window shows.
    pub fn split(&self, now_ms: u64, recent: usize) -> (Percentiles, Percentiles) {
        let now = now_ms / self.slice_ms;
        let first_recent = now.saturating_sub(recent.max(1) as u64 - 1);
        let oldest = now.saturating_sub(self.max_slices as u64 - 1);
        (
            self.between(first_recent, now),
            self.between(oldest, first_recent.saturating_sub(1)),
        )
    }

    /// Percentiles over the slices `from..=to` (empty when `to < from`).
    fn between(&self, from: u64, to: u64) -> Percentiles {
        let mut merged = sketch();
        for (slice, s) in &self.slices {
            if (from..=to).contains(slice) {
                // Same config on both sides, so merge cannot fail.
                let _ = merged.merge(s);
            }
        }
        let q = |q| merged.quantile(q).ok().flatten();
        Percentiles {
            count: merged.count() as u64,
            p50: q(0.5),
            p95: q(0.95),
            p99: q(0.99),
            p999: q(0.999),
            mean: merged.sum().map(|s| s / merged.count().max(1) as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ring_is_sparse_and_bounded() {
        let mut r = WorkerRing::default();
        r.at(5_000).llm_calls += 1;
        r.at(9_999).llm_calls += 1;
        r.at(10_000).llm_calls += 1;
        assert_eq!(r.len(), 2);
        for i in 0..1_000u64 {
            r.at(20_000 + i * BUCKET_MS).tool_calls += 1;
        }
        assert_eq!(r.len(), WORKER_BUCKETS);
        let now = 20_000 + 999 * BUCKET_MS;
        assert_eq!(r.recent(now, 60_000).count(), 7);
        let s = r.series(now);
        assert_eq!(s.len(), WORKER_BUCKETS);
        assert!(s.iter().all(|p| p.tool_calls == 1));
    }

    #[test]
    fn fleet_ring_wraps_and_zeroes_stale_slots() {
        let mut r = FleetRing::default();
        r.at(0).tasks = 5;
        let later = FLEET_BUCKETS as u64 * BUCKET_MS;
        r.at(later).tasks = 1;
        assert_eq!(r.total(later, 3_600_000).tasks, 1);
        assert_eq!(r.series(later, 60_000).len(), 6);
    }

    #[test]
    fn windowed_percentiles_forget_old_slices() {
        let mut w = WindowedSketch::new(60_000, 5);
        for i in 1..=100 {
            w.add(0, f64::from(i));
        }
        let p = w.percentiles(0);
        assert_eq!(p.count, 100);
        let p50 = p.p50.unwrap();
        assert!((p50 - 50.0).abs() <= 1.5, "{p50}");
        assert!((p.p99.unwrap() - 99.0).abs() <= 2.0);
        w.add(10 * 60_000, 1000.0);
        let p = w.percentiles(10 * 60_000);
        assert_eq!(p.count, 1);
        assert!((p.p50.unwrap() - 1000.0).abs() < 20.0);
    }

    #[test]
    fn a_split_window_shows_a_change_the_whole_hour_dilutes() {
        const TEN_MIN: u64 = 600_000;
        let mut w = WindowedSketch::new(TEN_MIN, 6);
        for slice in 0..4u64 {
            for _ in 0..100 {
                w.add(slice * TEN_MIN, 1.0);
            }
        }
        for slice in 4..6u64 {
            for _ in 0..100 {
                w.add(slice * TEN_MIN, 2.0);
            }
        }
        let now = 5 * TEN_MIN + 1;
        let (recent, earlier) = w.split(now, 2);
        assert_eq!((recent.count, earlier.count), (200, 400));
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < b * 0.02);
        assert!(
            close(recent.p50, 2.0) && close(earlier.p50, 1.0),
            "{recent:?} {earlier:?}"
        );
        assert_eq!(w.percentiles(now).count, 600);
    }
}
