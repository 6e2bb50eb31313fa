//! Behaviour fingerprints: what finished runs did, kept per group (a pool, a task type, a
//! prompt variant) so the drift detector (`detect/drift.rs`) can compare the last
//! `RECENT_BUCKETS` × 5 minutes with the rest of the hour. A run's print is the tools it
//! called, in the order the calls started, and its step count.
//!
//! Bounded: each 5-minute bucket of a group keeps a uniform sample of at most
//! `PER_BUCKET` runs (reservoir sampling), so a busy group keeps a fair picture of every
//! part of the hour rather than only its last minute; at most `MAX_GROUPS` groups (a new
//! one beyond that is not kept, and counted) and `MAX_TOOL_NAMES` tool names (more are
//! booked as one "other" tool). A group with no run for an hour is forgotten.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::worker::TaskSummary;

/// Groups kept at most.
pub const MAX_GROUPS: usize = 256;
/// Distinct tool names kept; beyond this, calls count as `OTHER_TOOL`.
const MAX_TOOL_NAMES: usize = 1_024;
/// The name calls past `MAX_TOOL_NAMES` are booked under.
pub const OTHER_TOOL: &str = "(other)";
const BUCKET_MS: u64 = 5 * 60_000;
/// An hour of buckets.
const BUCKETS: usize = 12;
/// The recent window, in buckets (15 minutes); the rest of the hour is the baseline.
pub const RECENT_BUCKETS: u64 = 3;
/// Runs sampled per group and bucket.
pub const PER_BUCKET: usize = 64;
/// How often the readers' copy is rebuilt: the detector tests drift every few minutes, so a
/// copy half a minute old costs it nothing and spares the owner a rebuild each second.
const VIEW_EVERY_MS: u64 = 30_000;

/// The group dimensions a run is booked under.
pub const DIMENSIONS: [&str; 3] = ["pool", "task_type", "prompt_variant"];

/// One finished run's behaviour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunPrint {
    /// Ids into `PrintsView::tools`, in call order.
    pub tools: Box<[u16]>,
    /// LLM calls + tool calls.
    pub steps: u32,
}

#[derive(Debug, Default)]
struct Bucket {
    index: u64,
    /// Runs offered to this bucket (the reservoir's denominator).
    seen: u64,
    runs: Vec<Arc<RunPrint>>,
}

#[derive(Debug)]
struct Group {
    buckets: Vec<Bucket>,
    last_bucket: u64,
}

/// One group's sample as the detector reads it.
#[derive(Clone, Debug)]
pub struct GroupPrints {
    /// `pool`, `task_type` or `prompt_variant`.
    pub dimension: &'static str,
    pub value: String,
    /// Runs sampled in the last `RECENT_BUCKETS` buckets, and in the rest of the hour.
    pub recent: Vec<Arc<RunPrint>>,
    pub baseline: Vec<Arc<RunPrint>>,
    /// Runs that finished in each window (the samples above are at most `PER_BUCKET` per
    /// 5 minutes of them).
    pub recent_runs: u64,
    pub baseline_runs: u64,
}

/// Every group's sample, and the tool names its ids point at.
#[derive(Clone, Debug, Default)]
pub struct PrintsView {
    pub at_ms: u64,
    pub tools: Arc<Vec<String>>,
    pub groups: Vec<GroupPrints>,
}

impl PrintsView {
    pub fn tool(&self, id: u16) -> &str {
        self.tools
            .get(usize::from(id))
            .map_or(OTHER_TOOL, String::as_str)
    }
}

/// The fingerprints of the last hour, owned by the fleet owner.
#[derive(Debug)]
pub struct Prints {
    names: Vec<String>,
    ids: FxHashMap<String, u16>,
    /// One map per `DIMENSIONS` entry (a lookup borrows the run's value).
    groups: [FxHashMap<String, Group>; 3],
    /// New groups not kept because `MAX_GROUPS` were.
    pub refused: u64,
    /// xorshift64 state for the reservoirs (seeded: a replay samples the same runs).
    rng: u64,
    view: Arc<PrintsView>,
}

impl Default for Prints {
    fn default() -> Self {
        Prints {
            names: vec![OTHER_TOOL.to_string()],
            ids: FxHashMap::default(),
            groups: Default::default(),
            refused: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            view: Arc::new(PrintsView::default()),
        }
    }
}

impl Prints {
    /// Books a finished run under each of its groups.
    pub fn add(&mut self, pool: Option<&str>, run: &TaskSummary, now_ms: u64) {
        let keys = [
            pool,
            run.task_type.as_deref(),
            run.prompt_variant.as_deref(),
        ];
        if keys.iter().all(Option::is_none) {
            return;
        }
        let bucket = now_ms / BUCKET_MS;
        let Prints {
            names,
            ids,
            groups,
            refused,
            rng,
            ..
        } = self;
        let kept: usize = groups.iter().map(FxHashMap::len).sum();
        // Built only when some group keeps the run: a busy group's reservoir turns most
        // runs away, and those cost a draw and a lookup.
        let mut print: Option<Arc<RunPrint>> = None;
        for (map, value) in groups.iter_mut().zip(keys) {
            let Some(value) = value else { continue };
            let draw = xorshift(rng);
            let group = match map.get_mut(value) {
                Some(g) => g,
                None if kept < MAX_GROUPS => {
                    map.entry(value.to_string()).or_insert_with(Group::new)
                }
                None => {
                    *refused += 1;
                    continue;
                }
            };
            if let Some(slot) = group.reserve(bucket, draw) {
                let p = print.get_or_insert_with(|| {
                    Arc::new(RunPrint {
                        tools: run.tools.iter().map(|t| intern(names, ids, t)).collect(),
                        steps: run.steps,
                    })
                });
                group.place(bucket, slot, Arc::clone(p));
            }
        }
    }

    /// Forgets groups silent for an hour and, every `VIEW_EVERY_MS`, rebuilds the readers'
    /// copy.
    pub fn tick(&mut self, now_ms: u64) {
        let bucket = now_ms / BUCKET_MS;
        for map in &mut self.groups {
            map.retain(|_, g| bucket.saturating_sub(g.last_bucket) < BUCKETS as u64);
        }
        if now_ms.saturating_sub(self.view.at_ms) >= VIEW_EVERY_MS {
            self.view = Arc::new(self.build_view(now_ms));
        }
    }

    pub fn view(&self) -> Arc<PrintsView> {
        Arc::clone(&self.view)
    }

    fn build_view(&self, now_ms: u64) -> PrintsView {
        let now_bucket = now_ms / BUCKET_MS;
        let mut groups: Vec<GroupPrints> = DIMENSIONS
            .into_iter()
            .zip(&self.groups)
            .flat_map(|(dimension, map)| map.iter().map(move |(value, g)| (dimension, value, g)))
            .map(|(dimension, value, g)| {
                let mut out = GroupPrints {
                    dimension,
                    value: value.clone(),
                    recent: Vec::new(),
                    baseline: Vec::new(),
                    recent_runs: 0,
                    baseline_runs: 0,
                };
                for b in g.buckets.iter().filter(|b| b.seen > 0) {
                    let age = now_bucket.saturating_sub(b.index);
                    if b.index > now_bucket || age >= BUCKETS as u64 {
                        continue;
                    }
                    if age < RECENT_BUCKETS {
                        out.recent.extend(b.runs.iter().cloned());
                        out.recent_runs += b.seen;
                    } else {
                        out.baseline.extend(b.runs.iter().cloned());
                        out.baseline_runs += b.seen;
                    }
                }
                out
            })
            .collect();
        groups.sort_by(|a, b| (a.dimension, &a.value).cmp(&(b.dimension, &b.value)));
        PrintsView {
            at_ms: now_ms,
            tools: Arc::new(self.names.clone()),
            groups,
        }
    }
}

/// The id of a tool name, interned (ids past `MAX_TOOL_NAMES` are `OTHER_TOOL`'s, 0).
fn intern(names: &mut Vec<String>, ids: &mut FxHashMap<String, u16>, tool: &str) -> u16 {
    if let Some(id) = ids.get(tool) {
        return *id;
    }
    if names.len() >= MAX_TOOL_NAMES {
        return 0;
    }
    // Below MAX_TOOL_NAMES (1,024), so it fits in u16.
    let id = names.len() as u16;
    names.push(tool.to_string());
    ids.insert(tool.to_string(), id);
    id
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// Where a run offered to a bucket goes.
#[derive(Clone, Copy, Debug)]
enum Slot {
    Push,
    At(usize),
}

impl Group {
    fn new() -> Self {
        Group {
            buckets: (0..BUCKETS).map(|_| Bucket::default()).collect(),
            last_bucket: 0,
        }
    }

    /// Algorithm R: the n-th run of a bucket replaces a sampled one with probability
    /// `PER_BUCKET / n`, so every run of the bucket is equally likely to be kept. Counts
    /// the run and says where it goes, if anywhere.
    fn reserve(&mut self, bucket: u64, draw: u64) -> Option<Slot> {
        self.last_bucket = self.last_bucket.max(bucket);
        let b = self.buckets.get_mut((bucket % BUCKETS as u64) as usize)?;
        if b.index != bucket || b.seen == 0 {
            *b = Bucket {
                index: bucket,
                seen: 0,
                runs: Vec::with_capacity(PER_BUCKET),
            };
        }
        b.seen += 1;
        if b.runs.len() < PER_BUCKET {
            return Some(Slot::Push);
        }
        let at = (draw % b.seen) as usize;
        (at < PER_BUCKET).then_some(Slot::At(at))
    }

    fn place(&mut self, bucket: u64, slot: Slot, print: Arc<RunPrint>) {
        let Some(b) = self.buckets.get_mut((bucket % BUCKETS as u64) as usize) else {
            return;
        };
        match slot {
            Slot::Push => b.runs.push(print),
            Slot::At(i) => {
                if let Some(r) = b.runs.get_mut(i) {
                    *r = print;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tools: &[&str], variant: &str) -> TaskSummary {
        TaskSummary {
            task_type: Some("research".into()),
            steps: tools.len() as u32 * 2,
            prompt_variant: Some(variant.into()),
            tools: tools.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn runs_are_split_into_the_recent_window_and_the_hour_before() {
        let mut p = Prints::default();
        let t0 = 100 * BUCKET_MS;
        for i in 0..10 {
            p.add(Some("code"), &run(&["search", "read"], "v1"), t0 + i * 1000);
        }
        // 40 minutes later: the first runs are baseline, these are recent.
        let t1 = t0 + 8 * BUCKET_MS;
        for i in 0..5 {
            p.add(Some("code"), &run(&["search"], "v2"), t1 + i * 1000);
        }
        p.tick(t1 + 10_000);
        let v = p.view();
        let pool = v.groups.iter().find(|g| g.dimension == "pool").unwrap();
        assert_eq!((pool.recent.len(), pool.baseline.len()), (5, 10));
        assert_eq!((pool.recent_runs, pool.baseline_runs), (5, 10));
        assert_eq!(v.tool(pool.recent[0].tools[0]), "search");
        let v2 = v
            .groups
            .iter()
            .find(|g| g.dimension == "prompt_variant" && g.value == "v2")
            .unwrap();
        assert_eq!((v2.recent.len(), v2.baseline.len()), (5, 0));
        // An hour and more later, the group is forgotten.
        p.tick(t1 + 13 * BUCKET_MS);
        assert!(p.view().groups.is_empty());
    }

    #[test]
    fn a_busy_bucket_keeps_a_bounded_uniform_sample() {
        let mut p = Prints::default();
        let t0 = 10 * BUCKET_MS;
        // 1,000 runs: the first half call `a`, the second half `b`.
        for i in 0..1_000u64 {
            let tool = if i < 500 { "a" } else { "b" };
            p.add(Some("code"), &run(&[tool], "v1"), t0 + i);
        }
        p.tick(t0 + 60_000);
        let v = p.view();
        let g = v.groups.iter().find(|g| g.dimension == "pool").unwrap();
        assert_eq!(g.recent.len(), PER_BUCKET);
        assert_eq!(g.recent_runs, 1_000);
        let b = g
            .recent
            .iter()
            .filter(|r| v.tool(r.tools[0]) == "b")
            .count();
        // A sample of the whole bucket, not its last 64 runs (those are all `b`).
        assert!(
            (16..=48).contains(&b),
            "{b} of {PER_BUCKET} sampled runs are b"
        );
    }

    #[test]
    fn groups_and_tool_names_are_bounded() {
        let mut p = Prints::default();
        for i in 0..(MAX_GROUPS + 10) {
            p.add(None, &run(&["x"], &format!("v{i}")), 1_000);
        }
        // task_type "research" is one group; prompt variants fill the rest.
        assert_eq!(
            p.groups.iter().map(FxHashMap::len).sum::<usize>(),
            MAX_GROUPS
        );
        assert_eq!(p.refused, 11);
        let mut q = Prints::default();
        let names: Vec<String> = (0..(MAX_TOOL_NAMES + 5)).map(|i| format!("t{i}")).collect();
        for n in &names {
            intern(&mut q.names, &mut q.ids, n);
        }
        assert_eq!(q.names.len(), MAX_TOOL_NAMES);
        assert_eq!(intern(&mut q.names, &mut q.ids, "t99999"), 0);
    }
}
