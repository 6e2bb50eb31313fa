//! Failures by slice: for each operation (an LLM call or a tool call) the fleet owner counts
//! one operation, and one failure when it failed, in every slice it belongs to: each of its
//! dimensions alone (`tool`, `model`, `prompt_variant`, `user_tier`, `task_type`) and the
//! pairs an engineer asks about (a tool with the prompt variant, the model or the user
//! tier; a model with the prompt variant). Counts are kept per minute for an hour, so the
//! detector can compare a slice's last minutes with its own past and with the rest of the
//! fleet (`detect/slices.rs`).
//!
//! Bounded: at most `MAX_SLICES` slices (a new one beyond that is not counted, and the
//! refusals are counted); a slice with no operation for an hour is forgotten.

use rustc_hash::FxHashMap;

use crate::domain::{Operation, SpanEvent, fnv1a};

/// Slices tracked at most.
pub const MAX_SLICES: usize = 4_096;
/// Minutes of history per slice.
const MINUTES: usize = 60;
const MINUTE_MS: u64 = 60_000;
/// The recent window a slice is judged on, in minutes (the rest of the hour is its past).
pub const RECENT_MINUTES: u64 = 15;

/// The dimension pairs counted, besides every dimension alone.
const PAIRS: [(&str, &str); 4] = [
    ("tool", "prompt_variant"),
    ("tool", "model"),
    ("tool", "user_tier"),
    ("model", "prompt_variant"),
];

#[derive(Clone, Copy, Debug, Default)]
struct Minute {
    minute: u64,
    ops: u32,
    failures: u32,
}

#[derive(Debug)]
struct Slice {
    dims: Vec<(&'static str, String)>,
    minutes: [Minute; MINUTES],
    last_minute: u64,
}

/// One slice as the detector reads it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SliceView {
    /// The slice's dimensions, e.g. `[("tool", "web_search"), ("prompt_variant", "v7")]`.
    pub dims: Vec<(&'static str, String)>,
    /// Operations and failures in the last `RECENT_MINUTES`.
    pub recent_ops: u64,
    pub recent_failures: u64,
    /// The same over the rest of the hour before.
    pub past_ops: u64,
    pub past_failures: u64,
}

/// The fleet's recent operations and failures, as the baselines of slices compared with
/// "the rest of the fleet": a tool slice is compared with the other tool calls, a model
/// slice with the other LLM calls (tool calls fail more often than LLM calls, so mixing
/// them would make every tool look worse than the fleet), anything else with all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceTotals {
    /// (operations, failures) in the last `RECENT_MINUTES`.
    pub all: (u64, u64),
    pub tools: (u64, u64),
    pub llm: (u64, u64),
    /// Recent operations of each slice that had no recent failure (not listed in the
    /// snapshot's slices, but tested all the same: they count in the multiple-testing
    /// correction).
    pub quiet_ops: Vec<u64>,
    /// The fleet has counted operations for less than `WARM_UP_MS`: too few seconds of
    /// counts for the rest of the fleet to be a slice's baseline.
    pub warming_up: bool,
}

/// How long the fleet owner counts operations before a slice without a past of its own is
/// compared with the rest of the fleet. On a few seconds of counts a slice failing 3 × the
/// rest is common, and tested again every second as the counts grow, one would page soon
/// after every start (one healthy hour in 299 at 1,000 agents did, 23 s in).
pub const WARM_UP_MS: u64 = 5 * MINUTE_MS;

/// Every slice's per-minute counts.
#[derive(Debug)]
pub struct Slices {
    slices: FxHashMap<u64, Slice>,
    /// New slices not tracked because `MAX_SLICES` were.
    pub refused: u64,
    /// Operations and failures of the whole fleet per minute (the "rest of the fleet"),
    /// of its tool calls, and of its LLM calls.
    total: [Minute; MINUTES],
    tools: [Minute; MINUTES],
    llm: [Minute; MINUTES],
    /// When the first operation was counted.
    first_ms: Option<u64>,
}

impl Default for Slices {
    fn default() -> Self {
        Slices {
            slices: FxHashMap::default(),
            refused: 0,
            total: [Minute::default(); MINUTES],
            tools: [Minute::default(); MINUTES],
            llm: [Minute::default(); MINUTES],
            first_ms: None,
        }
    }
}

fn bump(m: &mut [Minute; MINUTES], minute: u64, failed: bool) {
    let cell = &mut m[(minute % MINUTES as u64) as usize];
    if cell.minute != minute {
        *cell = Minute {
            minute,
            ..Default::default()
        };
    }
    cell.ops = cell.ops.saturating_add(1);
    cell.failures = cell.failures.saturating_add(u32::from(failed));
}

/// (recent ops, recent failures, past ops, past failures) as of `now_minute`.
fn sums(m: &[Minute; MINUTES], now_minute: u64) -> (u64, u64, u64, u64) {
    let mut s = (0, 0, 0, 0);
    for cell in m.iter().filter(|c| c.ops > 0) {
        let age = now_minute.saturating_sub(cell.minute);
        if cell.minute > now_minute || age >= MINUTES as u64 {
            continue;
        }
        if age < RECENT_MINUTES {
            s.0 += u64::from(cell.ops);
            s.1 += u64::from(cell.failures);
        } else {
            s.2 += u64::from(cell.ops);
            s.3 += u64::from(cell.failures);
        }
    }
    s
}

impl Slices {
    /// Counts one span, when it is an operation, in each of its slices.
    pub fn count(&mut self, ev: &SpanEvent, model: Option<&str>, at_ms: u64) {
        let tool = (ev.operation == Operation::ExecuteTool)
            .then_some(ev.tool.as_deref())
            .flatten();
        let model = ev.operation.is_billed().then_some(model).flatten();
        if tool.is_none() && model.is_none() {
            return;
        }
        self.first_ms.get_or_insert(at_ms);
        let minute = at_ms / MINUTE_MS;
        bump(&mut self.total, minute, ev.error);
        if tool.is_some() {
            bump(&mut self.tools, minute, ev.error);
        } else {
            bump(&mut self.llm, minute, ev.error);
        }
        let dims: [(&'static str, Option<&str>); 5] = [
            ("tool", tool),
            ("model", model),
            ("prompt_variant", ev.dims.prompt_variant.as_deref()),
            ("user_tier", ev.dims.user_tier.as_deref()),
            ("task_type", ev.dims.task_type.as_deref()),
        ];
        let value = |name: &str| dims.iter().find(|(n, _)| *n == name).and_then(|(_, v)| *v);
        for (name, v) in dims {
            if let Some(v) = v {
                self.bump(&[(name, v)], minute, ev.error);
            }
        }
        for (a, b) in PAIRS {
            if let (Some(x), Some(y)) = (value(a), value(b)) {
                self.bump(&[(a, x), (b, y)], minute, ev.error);
            }
        }
    }

    fn bump(&mut self, dims: &[(&'static str, &str)], minute: u64, failed: bool) {
        let key = match dims {
            [(a, x)] => fnv1a(&[a.as_bytes(), x.as_bytes()]),
            [(a, x), (b, y)] => fnv1a(&[a.as_bytes(), x.as_bytes(), b.as_bytes(), y.as_bytes()]),
            _ => return,
        };
        if let Some(s) = self.slices.get_mut(&key) {
            bump(&mut s.minutes, minute, failed);
            s.last_minute = s.last_minute.max(minute);
            return;
        }
        if self.slices.len() >= MAX_SLICES {
            self.refused += 1;
            return;
        }
        let mut s = Slice {
            dims: dims.iter().map(|(n, v)| (*n, v.to_string())).collect(),
            minutes: [Minute::default(); MINUTES],
            last_minute: minute,
        };
        bump(&mut s.minutes, minute, failed);
        self.slices.insert(key, s);
    }

    /// Forgets slices with no operation for an hour.
    pub fn sweep(&mut self, now_ms: u64) {
        let now = now_ms / MINUTE_MS;
        self.slices
            .retain(|_, s| now.saturating_sub(s.last_minute) < MINUTES as u64);
    }

    /// The slices with a failure in the recent window, and the fleet's recent totals.
    pub fn view(&self, now_ms: u64) -> (Vec<SliceView>, SliceTotals) {
        let now = now_ms / MINUTE_MS;
        let mut quiet_ops = Vec::new();
        let mut out: Vec<SliceView> = self
            .slices
            .values()
            .filter_map(|s| {
                let (ro, rf, po, pf) = sums(&s.minutes, now);
                if rf == 0 {
                    if ro > 0 {
                        quiet_ops.push(ro);
                    }
                    return None;
                }
                Some(SliceView {
                    dims: s.dims.clone(),
                    recent_ops: ro,
                    recent_failures: rf,
                    past_ops: po,
                    past_failures: pf,
                })
            })
            .collect();
        out.sort_by(|a, b| a.dims.cmp(&b.dims));
        let recent = |m: &[Minute; MINUTES]| {
            let (ro, rf, _, _) = sums(m, now);
            (ro, rf)
        };
        let totals = SliceTotals {
            all: recent(&self.total),
            tools: recent(&self.tools),
            llm: recent(&self.llm),
            quiet_ops,
            warming_up: self
                .first_ms
                .is_none_or(|first| now_ms.saturating_sub(first) < WARM_UP_MS),
        };
        (out, totals)
    }
}
