//! One worker's live state and its state machine.
//!
//! States: IDLE (no run), ACTIVE (a run with a span within `waiting_after`), WAITING (a run,
//! no span for longer than that: the agent waits on an LLM, a tool or a person), STUCK (a
//! run with no span for `stuck_factor` × its expected duration, or one tool called more
//! than `tool_repeat_limit` times in the run), ERROR (the last run failed, or
//! `error_streak` operations in a row failed). `lost` is set when heartbeats stop.
//!
//! A run is one task: it starts with the first span (or heartbeat) that names it and ends
//! with its root span (the worker's CONSUMER span, or the trace's root span). Spans arrive
//! when they end, so a run's start is only known once its first child ends.
//!
//! Everything here is a pure function of the events and `now_ms`: the tests drive it with
//! their own clock.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};

use rustc_hash::FxHashMap;

use fleet_worker::message::{Heartbeat, WorkerState as HbState};
use serde::Serialize;

use super::window::WorkerRing;
use crate::config::FleetConfig;
use crate::domain::{Operation, SpanEvent};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Idle,
    Active,
    Waiting,
    Stuck,
    Error,
}

impl State {
    pub const ALL: [State; 5] = [
        State::Idle,
        State::Active,
        State::Waiting,
        State::Stuck,
        State::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "IDLE",
            State::Active => "ACTIVE",
            State::Waiting => "WAITING",
            State::Stuck => "STUCK",
            State::Error => "ERROR",
        }
    }

    /// Busy with a run (counts towards parallel agents and pool utilisation).
    pub fn is_busy(self) -> bool {
        matches!(self, State::Active | State::Waiting | State::Stuck)
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunEnd {
    #[default]
    Completed,
    Failed,
}

/// A finished run, kept in the worker's recent list and handed to fleet aggregates.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TaskSummary {
    pub task_id: String,
    pub status: RunEnd,
    pub task_type: Option<String>,
    pub model: Option<String>,
    /// Unix ms when the run started / ended.
    pub started_ms: u64,
    pub ended_ms: u64,
    pub duration_ms: u64,
    /// None when a call in the run used a model the registry does not know.
    pub cost_usd: Option<f64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// LLM calls + tool calls in the run (the execution depth).
    pub steps: u32,
    /// The attribution the run's spans carried (the first value seen of each).
    pub prompt_variant: Option<String>,
    pub team: Option<String>,
    pub feature: Option<String>,
    /// The tools the run called, in the order the calls started (the first
    /// `MAX_TOOL_SEQUENCE`): its behaviour's fingerprint (`fleet/prints.rs`).
    pub tools: Vec<String>,
}

/// A run in progress.
#[derive(Clone, Debug)]
struct Run {
    task_id: String,
    trace_id: Option<[u8; 16]>,
    started_ms: u64,
    /// Last span (or the start): STUCK is measured from here.
    last_span_ms: u64,
    expected_ms: Option<u64>,
    task_type: Option<String>,
    model: Option<String>,
    tool_counts: FxHashMap<String, u32>,
    /// Set when one tool was called more than the limit.
    looping_tool: Option<(String, u32)>,
    /// Calls per (tool, arguments) hash, for calls that said their arguments.
    same_calls: FxHashMap<u64, u32>,
    /// The most repeated (tool, arguments) call of the run and how often it was made.
    repeated_call: Option<(String, u32)>,
    steps: u32,
    cost: f64,
    cost_unknown: bool,
    input_tokens: u64,
    output_tokens: u64,
    /// Started from a heartbeat, no span seen yet.
    from_heartbeat: bool,
    prompt_variant: Option<String>,
    team: Option<String>,
    feature: Option<String>,
    /// (start ms, tool) of the first `MAX_TOOL_SEQUENCE` tool calls, in arrival order
    /// (spans come in batches, not in order: sorted when the run ends).
    tool_seq: Vec<(u64, String)>,
}

impl Run {
    /// What one span adds to its task's run: time, model, tokens, cost, steps, tool loops.
    fn add_span(
        &mut self,
        ev: &SpanEvent,
        cost: Option<f64>,
        start_ms: u64,
        now_ms: u64,
        cfg: &FleetConfig,
    ) {
        let billed = ev.operation.is_billed();
        self.from_heartbeat = false;
        self.trace_id.get_or_insert(ev.trace_id);
        self.started_ms = self.started_ms.min(start_ms.max(1));
        self.last_span_ms = now_ms;
        if let Some(e) = ev.expected_duration_s {
            self.expected_ms = Some((e * 1000.0) as u64);
        }
        for (mine, theirs) in [
            (&mut self.task_type, &ev.dims.task_type),
            (&mut self.prompt_variant, &ev.dims.prompt_variant),
            (&mut self.team, &ev.dims.team),
            (&mut self.feature, &ev.dims.feature),
        ] {
            if mine.is_none() {
                mine.clone_from(theirs);
            }
        }
        if billed {
            self.steps += 1;
            if ev.model.is_some() {
                self.model.clone_from(&ev.model);
            }
            if let Some(u) = &ev.usage {
                self.input_tokens += u.input;
                self.output_tokens += u.output;
                match cost {
                    Some(c) => self.cost += c,
                    None => self.cost_unknown = true,
                }
            }
        }
        if ev.operation == Operation::ExecuteTool {
            self.steps += 1;
            if let Some(tool) = &ev.tool {
                if self.tool_seq.len() < MAX_TOOL_SEQUENCE {
                    self.tool_seq.push((start_ms, tool.clone()));
                }
                let n = if let Some(n) = self.tool_counts.get_mut(tool) {
                    *n += 1;
                    *n
                } else if self.tool_counts.len() < MAX_TOOLS_PER_RUN {
                    self.tool_counts.insert(tool.clone(), 1);
                    1
                } else {
                    0
                };
                if n > cfg.tool_repeat_limit && self.looping_tool.is_none() {
                    self.looping_tool = Some((tool.clone(), n));
                }
                if let Some(args) = ev.tool_args_hash {
                    self.count_same_call(tool, args);
                }
            }
        }
    }
}

impl Run {
    /// What the run is expected to take: the task's own figure, else its type's baseline,
    /// else the configured default.
    fn expected_ms(&self, baseline_ms: &dyn Fn(&str) -> Option<u64>, cfg: &FleetConfig) -> u64 {
        self.expected_ms
            .or_else(|| self.task_type.as_deref().and_then(baseline_ms))
            .unwrap_or(cfg.default_expected_duration_ms())
    }

    /// Counts a call by its tool and arguments (bounded like the tool counts).
    fn count_same_call(&mut self, tool: &str, args: u64) {
        let key = crate::domain::fnv1a(&[tool.as_bytes(), &args.to_le_bytes()]);
        let n = if let Some(n) = self.same_calls.get_mut(&key) {
            *n += 1;
            *n
        } else if self.same_calls.len() < MAX_TOOLS_PER_RUN {
            self.same_calls.insert(key, 1);
            1
        } else {
            0
        };
        if self.repeated_call.as_ref().is_none_or(|(_, max)| n > *max) {
            self.repeated_call = Some((tool.to_string(), n));
        }
    }
}

/// The run that has gone longest without a span for what it is expected to take: what the
/// `stuck_agent` alert weighs against the policy's `active_duration_multiple`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SilentRun {
    pub task_id: String,
    /// Since its last span (or its start).
    pub quiet_ms: u64,
    /// Its expected duration: the task's own, else its type's baseline, else the default.
    pub expected_ms: u64,
    /// `fleet.min_stuck_after_ms`: shorter silences never count.
    pub floor_ms: u64,
}

impl SilentRun {
    /// The silence past which the run is stuck at `multiple` × its expected duration
    /// (never under the floor), in ms.
    pub fn limit_ms(&self, multiple: f64) -> f64 {
        (self.expected_ms as f64 * multiple).max(self.floor_ms as f64)
    }
}

/// The same tool called with the same arguments, again and again, in one run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RepeatedCall {
    pub task_id: String,
    pub tool: String,
    /// How many times that exact call was made.
    pub calls: u32,
}

/// Calls, failures and latency of one tool.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ToolStats {
    pub calls: u64,
    pub failures: u64,
    pub total_ms: u64,
    pub max_ms: u64,
}

/// A state change, for operators (the last few per worker).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Transition {
    pub at_ms: u64,
    pub from: State,
    pub to: State,
    pub reason: Cow<'static, str>,
}

/// What the owner needs to know about a span after the worker took it in.
#[derive(Debug, Default)]
pub struct SpanEffect {
    /// The span ended a run: its summary is the worker's newest recent task.
    pub finished: bool,
    /// A run began with this span (first sight of the task on this worker).
    pub started: Option<(String, u64)>,
}

#[derive(Clone, Debug, Default)]
struct HeartbeatInfo {
    max_in_flight: u32,
    capabilities: Vec<String>,
    completed: u64,
    failed: u64,
    draining: bool,
    paused: bool,
}

const MAX_TOOLS_PER_RUN: usize = 64;
/// Tool calls of a run kept in order for its fingerprint.
pub const MAX_TOOL_SEQUENCE: usize = 64;
const MAX_LISTED: usize = 32;
/// What a cumulative metric point adds ([`Worker::metric_delta`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SeriesStep {
    /// The series grew by this much since the point before (all of it: a new series
    /// that started while the commander watched, or a reset).
    Grew(f64),
    /// The first point of a series that started before the commander watched: kept as
    /// the baseline, nothing booked.
    Baseline,
    /// The worker has [`MAX_METRIC_SERIES`] series already: not followed, not booked.
    Untracked,
}

/// Cumulative metric series followed per worker: token and duration counters by model and
/// type are a handful; past this a series' points are not booked (and counted).
pub const MAX_METRIC_SERIES: usize = 64;

/// A worker's cumulative metric series: the last (start time, value) of each.
pub type MetricSeries = HashMap<u64, (u64, f64)>;
const TRANSITIONS_KEPT: usize = 16;
const OTHER_TOOL: &str = "_other";

/// Everything the commander knows about one worker. Size is bounded by the constants
/// above and by `FleetConfig::{max_runs_per_worker, recent_tasks, max_tools_per_worker}`.
#[derive(Clone, Debug)]
pub struct Worker {
    pub id: String,
    pub pool: Option<String>,
    pub agent_name: Option<String>,
    pub version: Option<String>,
    pub sdk_version: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    state: State,
    state_since_ms: u64,
    stuck_reason: Option<String>,
    pub lost: bool,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    last_heartbeat_ms: Option<u64>,
    /// Worker process start (from its heartbeat), else first sighting.
    pub started_ms: u64,
    heartbeat: Option<HeartbeatInfo>,
    runs: Vec<Run>,
    /// The last run failed; cleared when the next one starts.
    last_run_failed: bool,
    consecutive_errors: u32,
    pub context_tokens: Option<u64>,
    pub context_limit: Option<u64>,
    /// Output tokens per second of the last LLM call.
    pub last_output_rate: Option<f64>,
    tools: FxHashMap<String, ToolStats>,
    recent: VecDeque<TaskSummary>,
    transitions: VecDeque<Transition>,
    pub ring: WorkerRing,
    pub total_cost_usd: f64,
    pub unknown_cost_calls: u64,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    pub tasks_completed: u64,
    pub tasks_failed: u64,
    /// Spans of this worker carried token counts: its token metrics are not booked again.
    pub span_usage_seen: bool,
    /// Cumulative metric series: last (start, value) per series, for deltas; at most
    /// [`MAX_METRIC_SERIES`].
    metric_series: MetricSeries,
}

impl Worker {
    pub fn new(id: String, now_ms: u64) -> Self {
        Self {
            id,
            pool: None,
            agent_name: None,
            version: None,
            sdk_version: None,
            model: None,
            provider: None,
            state: State::Idle,
            state_since_ms: now_ms,
            stuck_reason: None,
            lost: false,
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
            last_heartbeat_ms: None,
            started_ms: now_ms,
            heartbeat: None,
            runs: Vec::new(),
            last_run_failed: false,
            consecutive_errors: 0,
            context_tokens: None,
            context_limit: None,
            last_output_rate: None,
            tools: FxHashMap::default(),
            recent: VecDeque::new(),
            transitions: VecDeque::new(),
            ring: WorkerRing::default(),
            total_cost_usd: 0.0,
            unknown_cost_calls: 0,
            total_input_tokens: 0,
            total_output_tokens: 0,
            tasks_completed: 0,
            tasks_failed: 0,
            span_usage_seen: false,
            metric_series: HashMap::new(),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }
    pub fn state_since_ms(&self) -> u64 {
        self.state_since_ms
    }
    /// The run with the longest silence for its expected duration.
    pub fn silent_run(
        &self,
        now_ms: u64,
        baseline_ms: impl Fn(&str) -> Option<u64>,
        cfg: &FleetConfig,
    ) -> Option<SilentRun> {
        let (r, quiet_ms, expected_ms) = self
            .runs
            .iter()
            .map(|r| {
                let expected = r.expected_ms(&baseline_ms, cfg).max(1);
                (r, now_ms.saturating_sub(r.last_span_ms), expected)
            })
            .max_by(|a, b| (a.1 as f64 / a.2 as f64).total_cmp(&(b.1 as f64 / b.2 as f64)))?;
        Some(SilentRun {
            task_id: r.task_id.clone(),
            quiet_ms,
            expected_ms,
            floor_ms: cfg.min_stuck_after_ms,
        })
    }

    pub fn stuck_reason(&self) -> Option<&str> {
        self.stuck_reason.as_deref()
    }
    pub fn transitions(&self) -> impl Iterator<Item = &Transition> {
        self.transitions.iter()
    }
    pub fn recent_tasks(&self) -> impl Iterator<Item = &TaskSummary> {
        self.recent.iter()
    }
    /// Whether this worker runs (or recently ran) `task_id`.
    pub fn ran(&self, task_id: &str) -> bool {
        self.runs.iter().any(|r| r.task_id == task_id)
            || self.recent.iter().any(|r| r.task_id == task_id)
    }
    /// The run that ended last.
    pub fn last_task(&self) -> Option<&TaskSummary> {
        self.recent.back()
    }
    pub fn tools(&self) -> &FxHashMap<String, ToolStats> {
        &self.tools
    }
    pub fn current_task(&self) -> Option<&str> {
        self.runs
            .iter()
            .max_by_key(|r| r.started_ms)
            .map(|r| r.task_id.as_str())
    }
    pub fn running(&self) -> usize {
        self.runs.len()
    }
    /// The most repeated identical tool call of the runs in progress (twice or more).
    pub fn repeated_call(&self) -> Option<RepeatedCall> {
        self.runs
            .iter()
            .filter_map(|r| r.repeated_call.as_ref().map(|(t, n)| (r, t, *n)))
            .filter(|(_, _, n)| *n >= 2)
            .max_by_key(|(_, _, n)| *n)
            .map(|(r, tool, calls)| RepeatedCall {
                task_id: r.task_id.clone(),
                tool: tool.clone(),
                calls,
            })
    }
    pub fn max_in_flight(&self) -> Option<u32> {
        self.heartbeat.as_ref().map(|h| h.max_in_flight)
    }
    pub fn capabilities(&self) -> &[String] {
        self.heartbeat
            .as_ref()
            .map(|h| h.capabilities.as_slice())
            .unwrap_or(&[])
    }
    pub fn draining(&self) -> bool {
        self.heartbeat.as_ref().is_some_and(|h| h.draining)
    }
    /// Paused by a control command: takes no work until resumed.
    pub fn paused(&self) -> bool {
        self.heartbeat.as_ref().is_some_and(|h| h.paused)
    }
    pub fn heartbeat_counts(&self) -> Option<(u64, u64)> {
        self.heartbeat.as_ref().map(|h| (h.completed, h.failed))
    }
    pub fn last_heartbeat_ms(&self) -> Option<u64> {
        self.last_heartbeat_ms
    }
    /// Task type of the newest run.
    pub fn current_task_type(&self) -> Option<&str> {
        self.runs
            .iter()
            .max_by_key(|r| r.started_ms)
            .and_then(|r| r.task_type.as_deref())
    }
    /// How long the newest run has been going.
    pub fn current_run_ms(&self, now_ms: u64) -> Option<u64> {
        self.runs
            .iter()
            .map(|r| now_ms.saturating_sub(r.started_ms))
            .max()
    }

    /// Latest input tokens over the model's context window.
    pub fn context_utilisation(&self) -> Option<f64> {
        match (self.context_tokens, self.context_limit) {
            (Some(t), Some(l)) if l > 0 => Some(t as f64 / l as f64),
            _ => None,
        }
    }

    fn find_run(&self, task_id: Option<&str>, trace: &[u8; 16]) -> Option<usize> {
        if let Some(id) = task_id
            && let Some(i) = self.runs.iter().position(|r| r.task_id == id)
        {
            return Some(i);
        }
        self.runs.iter().position(|r| r.trace_id == Some(*trace))
    }

    fn start_run(
        &mut self,
        task_id: String,
        trace_id: Option<[u8; 16]>,
        started_ms: u64,
        cfg: &FleetConfig,
    ) -> usize {
        if self.runs.len() >= cfg.max_runs_per_worker {
            // Forget the run we heard from least recently; the bound beats completeness.
            if let Some((i, _)) = self
                .runs
                .iter()
                .enumerate()
                .min_by_key(|(_, r)| r.last_span_ms)
            {
                self.runs.swap_remove(i);
            }
        }
        self.last_run_failed = false;
        self.runs.push(Run {
            task_id,
            trace_id,
            started_ms,
            last_span_ms: started_ms,
            expected_ms: None,
            task_type: None,
            model: None,
            tool_counts: FxHashMap::default(),
            looping_tool: None,
            same_calls: FxHashMap::default(),
            repeated_call: None,
            steps: 0,
            cost: 0.0,
            cost_unknown: false,
            input_tokens: 0,
            output_tokens: 0,
            from_heartbeat: false,
            prompt_variant: None,
            team: None,
            feature: None,
            tool_seq: Vec::new(),
        });
        self.runs.len() - 1
    }

    /// Takes in one span. `cost` is the span's price from the registry (None: unknown
    /// model, or no tokens); `context_limit` the model's window.
    pub fn apply_span(
        &mut self,
        ev: &SpanEvent,
        cost: Option<f64>,
        context_limit: Option<u64>,
        now_ms: u64,
        cfg: &FleetConfig,
    ) -> SpanEffect {
        let mut effect = SpanEffect::default();
        self.last_seen_ms = now_ms;
        self.lost = false;
        self.note_identity(ev);
        let start_ms = ev.start_ns / 1_000_000;
        let end_ms = ev.end_ns / 1_000_000;
        let bucket_ms = super::window::event_ms(ev.end_ns, now_ms, cfg.lateness_ms);
        let idx = match self.find_run(ev.task_id.as_deref(), &ev.trace_id) {
            Some(i) => i,
            None => {
                let id = ev
                    .task_id
                    .clone()
                    .unwrap_or_else(|| crate::domain::hex(&ev.trace_id));
                let started = start_ms.min(now_ms);
                effect.started = Some((id.clone(), started));
                self.start_run(id, Some(ev.trace_id), started, cfg)
            }
        };
        self.runs[idx].add_span(ev, cost, start_ms, now_ms, cfg);
        let dur_ms = end_ms.saturating_sub(start_ms);
        self.count_span(ev, cost, context_limit, bucket_ms, dur_ms, cfg);
        // The root span ends the run.
        if ev.task_root || ev.parent_span_id.is_none() {
            self.end_run(idx, ev.error, (start_ms, end_ms), bucket_ms, cfg);
            effect.finished = true;
        }
        self.evaluate(now_ms, cfg, &|_| None, "span");
        effect
    }

    /// Pool, agent name and version, from the span and its resource.
    fn note_identity(&mut self, ev: &SpanEvent) {
        if let Some(p) = &ev.identity.pool {
            self.pool.get_or_insert_with(|| p.clone());
        }
        // An agent name on the span beats the service name the resource gives.
        if let Some(name) = ev.agent_name.as_ref().or(ev.identity.agent_name.as_ref()) {
            if self.agent_name.as_ref() != Some(name) {
                self.agent_name = Some(name.clone());
            }
        } else if self.agent_name.is_none() {
            self.agent_name.clone_from(&ev.identity.service);
        }
        if ev.identity.version.is_some() && self.version != ev.identity.version {
            self.version.clone_from(&ev.identity.version);
        }
    }

    /// The worker's own counters, the sparkline bucket and the tool table.
    fn count_span(
        &mut self,
        ev: &SpanEvent,
        cost: Option<f64>,
        context_limit: Option<u64>,
        bucket_ms: u64,
        dur_ms: u64,
        cfg: &FleetConfig,
    ) {
        let billed = ev.operation.is_billed();
        let tool = ev.operation == Operation::ExecuteTool;
        let b = self.ring.at(bucket_ms);
        if billed {
            b.llm_calls = b.llm_calls.saturating_add(1);
            if let Some(u) = &ev.usage {
                b.input_tokens = b.input_tokens.saturating_add(clamp32(u.input));
                b.output_tokens = b.output_tokens.saturating_add(clamp32(u.output));
                if let Some(c) = cost {
                    b.cost_micros = b.cost_micros.saturating_add((c * 1e6) as u32);
                }
            }
        }
        if tool {
            b.tool_calls = b.tool_calls.saturating_add(1);
        }
        if ev.error && (billed || tool) {
            b.errors = b.errors.saturating_add(1);
        }
        if billed {
            if ev.model.is_some() {
                self.model.clone_from(&ev.model);
            }
            if ev.provider.is_some() {
                self.provider.clone_from(&ev.provider);
            }
            if let Some(u) = &ev.usage {
                self.span_usage_seen = true;
                self.total_input_tokens += u.input;
                self.total_output_tokens += u.output;
                match cost {
                    Some(c) => self.total_cost_usd += c,
                    None => self.unknown_cost_calls += 1,
                }
                if u.input > 0 {
                    self.context_tokens = Some(u.input);
                    self.context_limit = context_limit;
                }
                if dur_ms > 0 && u.output > 0 {
                    self.last_output_rate = Some(u.output as f64 * 1000.0 / dur_ms as f64);
                }
            }
        }
        // tool_slot gives the tool's slot, or `_other` once the cap is reached.
        if tool
            && let Some(name) = &ev.tool
            && let Some(t) = tool_slot(&mut self.tools, name, cfg.max_tools_per_worker)
        {
            t.calls += 1;
            if ev.error {
                t.failures += 1;
            }
            t.total_ms += dur_ms;
            t.max_ms = t.max_ms.max(dur_ms);
        }
        if billed || tool {
            if ev.error {
                self.consecutive_errors += 1;
            } else {
                self.consecutive_errors = 0;
            }
        }
    }

    /// Ends run `idx` (its root span arrived): a summary in the recent tasks, and the
    /// counters.
    fn end_run(
        &mut self,
        idx: usize,
        failed: bool,
        (start_ms, end_ms): (u64, u64),
        bucket_ms: u64,
        cfg: &FleetConfig,
    ) {
        let mut run = self.runs.swap_remove(idx);
        let started_ms = run.started_ms.min(start_ms);
        // Stable: calls that started in the same millisecond keep their arrival order.
        run.tool_seq.sort_by_key(|(start, _)| *start);
        let summary = TaskSummary {
            task_id: run.task_id,
            status: if failed {
                RunEnd::Failed
            } else {
                RunEnd::Completed
            },
            task_type: run.task_type,
            model: run.model,
            started_ms,
            ended_ms: end_ms,
            duration_ms: end_ms.saturating_sub(started_ms),
            cost_usd: (!run.cost_unknown).then_some(run.cost),
            input_tokens: run.input_tokens,
            output_tokens: run.output_tokens,
            steps: run.steps,
            prompt_variant: run.prompt_variant,
            team: run.team,
            feature: run.feature,
            tools: run.tool_seq.into_iter().map(|(_, t)| t).collect(),
        };
        let b = self.ring.at(bucket_ms);
        if failed {
            b.tasks_failed = b.tasks_failed.saturating_add(1);
            b.errors = b.errors.saturating_add(1);
            self.tasks_failed += 1;
        } else {
            b.tasks_ok = b.tasks_ok.saturating_add(1);
            self.tasks_completed += 1;
        }
        self.last_run_failed = failed;
        if self.recent.len() >= cfg.recent_tasks {
            self.recent.pop_front();
        }
        self.recent.push_back(summary);
    }

    /// Sets the expected duration and task type of a run the commander dispatched.
    pub fn note_dispatch(
        &mut self,
        task_id: &str,
        expected_ms: Option<u64>,
        task_type: Option<&str>,
    ) {
        if let Some(r) = self.runs.iter_mut().find(|r| r.task_id == task_id) {
            if r.expected_ms.is_none() {
                r.expected_ms = expected_ms;
            }
            if r.task_type.is_none() {
                r.task_type = task_type.map(str::to_string);
            }
        }
    }

    /// Takes in a heartbeat. Returns the task ids of runs it started.
    pub fn apply_heartbeat(
        &mut self,
        hb: &Heartbeat,
        now_ms: u64,
        cfg: &FleetConfig,
    ) -> Vec<String> {
        self.last_seen_ms = now_ms;
        self.last_heartbeat_ms = Some(now_ms);
        self.lost = false;
        self.pool = Some(hb.pool.clone());
        // The model of its last LLM call says more than the one it announces.
        if hb.model.is_some() && !self.span_usage_seen {
            self.model.clone_from(&hb.model);
        }
        if hb.sdk_version.is_some() {
            self.sdk_version.clone_from(&hb.sdk_version);
        }
        if let Some(ms) = fleet_worker::message::rfc3339_unix_ms(&hb.started_at) {
            self.started_ms = ms;
        }
        if let Some(c) = hb.context_tokens {
            self.context_tokens = Some(c);
        }
        let mut started = Vec::new();
        for id in hb.current_tasks.iter().take(cfg.max_runs_per_worker) {
            if !self.runs.iter().any(|r| &r.task_id == id) {
                let i = self.start_run(id.clone(), None, now_ms, cfg);
                self.runs[i].from_heartbeat = true;
                started.push(id.clone());
            }
        }
        // A run the worker no longer lists and that has no span yet ended without telling
        // us how; its result is recorded by the task path. Runs with spans wait for their
        // root span.
        self.runs
            .retain(|r| !r.from_heartbeat || hb.current_tasks.contains(&r.task_id));
        self.heartbeat = Some(HeartbeatInfo {
            max_in_flight: hb.max_in_flight,
            capabilities: hb.capabilities.iter().take(MAX_LISTED).cloned().collect(),
            completed: hb.completed,
            failed: hb.failed,
            draining: hb.state == HbState::Draining,
            paused: hb.state == HbState::Paused,
        });
        self.evaluate(now_ms, cfg, &|_| None, "heartbeat");
        started
    }

    /// The worker's cumulative series, taken out as it is forgotten (evicted).
    pub fn take_metric_series(&mut self) -> MetricSeries {
        std::mem::take(&mut self.metric_series)
    }

    /// The series it had when it was forgotten: a worker that comes back goes on from the
    /// totals booked then, instead of booking them again.
    pub fn restore_metric_series(&mut self, series: MetricSeries) {
        self.metric_series = series;
    }

    /// Cumulative-to-delta for a metric series: what it grew by since its last point, as
    /// the OpenTelemetry Collector's `cumulativetodelta` does with `initial_value: auto`.
    /// A series' first point counts in full only when the series started (its start time)
    /// while the commander was watching (`watching_since_ms`). One that started earlier (a
    /// worker that ran before the commander, or a commander restarted under it) holds
    /// totals that were booked already or never seen, so its first point is the baseline
    /// only; so is one with no start time. A reset (a lower value or a new start time)
    /// counts in full: the series was watched, and started again.
    pub fn metric_delta(
        &mut self,
        series: u64,
        start_ns: u64,
        value: f64,
        watching_since_ms: u64,
    ) -> SeriesStep {
        let followed = self.metric_series.len();
        match self.metric_series.get_mut(&series) {
            Some((start, last)) if *start == start_ns && value >= *last => {
                let d = value - *last;
                *last = value;
                SeriesStep::Grew(d)
            }
            Some(slot) => {
                *slot = (start_ns, value);
                SeriesStep::Grew(value)
            }
            None if followed >= MAX_METRIC_SERIES => SeriesStep::Untracked,
            None => {
                self.metric_series.insert(series, (start_ns, value));
                if start_ns > 0 && start_ns / 1_000_000 >= watching_since_ms {
                    SeriesStep::Grew(value)
                } else {
                    SeriesStep::Baseline
                }
            }
        }
    }

    /// Any export from the worker (spans or metrics) is a sign of life; one that shows new
    /// LLM tokens is also progress for its runs (an OTLP-only agent's metrics arrive every
    /// ~15 s while a long call produces no span until it ends).
    pub fn note_export(&mut self, now_ms: u64, progressed: bool) {
        self.last_seen_ms = self.last_seen_ms.max(now_ms);
        if progressed {
            for r in &mut self.runs {
                r.last_span_ms = r.last_span_ms.max(now_ms);
            }
        }
    }

    /// Books tokens reported only through metrics (no span carried them).
    /// `at_ms` is the point's own time, bounded (`window::event_ms`); `now_ms` its arrival.
    pub fn apply_metric_tokens(
        &mut self,
        input: u64,
        output: u64,
        cost: Option<f64>,
        at_ms: u64,
        now_ms: u64,
    ) {
        self.last_seen_ms = self.last_seen_ms.max(now_ms);
        self.total_input_tokens += input;
        self.total_output_tokens += output;
        let b = self.ring.at(at_ms);
        b.input_tokens = b.input_tokens.saturating_add(clamp32(input));
        b.output_tokens = b.output_tokens.saturating_add(clamp32(output));
        match cost {
            Some(c) => {
                self.total_cost_usd += c;
                b.cost_micros = b.cost_micros.saturating_add((c * 1e6) as u32);
            }
            None if input + output > 0 => self.unknown_cost_calls += 1,
            None => {}
        }
    }

    /// Re-derives the state at `now_ms`. `baseline_ms` gives the expected duration of a
    /// task type when the run does not carry its own.
    pub fn evaluate(
        &mut self,
        now_ms: u64,
        cfg: &FleetConfig,
        baseline_ms: &dyn Fn(&str) -> Option<u64>,
        cause: &'static str,
    ) {
        let (next, reason) = self.derive(now_ms, cfg, baseline_ms);
        if next == State::Stuck {
            if self.stuck_reason.as_deref() != Some(&*reason) {
                self.stuck_reason = Some(reason.to_string());
            }
        } else {
            self.stuck_reason = None;
        }
        if next != self.state {
            if self.transitions.len() >= TRANSITIONS_KEPT {
                self.transitions.pop_front();
            }
            self.transitions.push_back(Transition {
                at_ms: now_ms,
                from: self.state,
                to: next,
                reason: if reason.is_empty() {
                    Cow::Borrowed(cause)
                } else {
                    reason
                },
            });
            self.state = next;
            self.state_since_ms = now_ms;
        }
    }

    fn derive(
        &self,
        now_ms: u64,
        cfg: &FleetConfig,
        baseline_ms: &dyn Fn(&str) -> Option<u64>,
    ) -> (State, Cow<'static, str>) {
        if self.runs.is_empty() {
            if self.last_run_failed {
                return (State::Error, "the last run failed".into());
            }
            if self.consecutive_errors >= cfg.error_streak {
                return (
                    State::Error,
                    format!("{} operations failed in a row", self.consecutive_errors).into(),
                );
            }
            return (State::Idle, "no run in progress".into());
        }
        for r in &self.runs {
            if let Some((tool, n)) = &r.looping_tool {
                return (
                    State::Stuck,
                    format!(
                        "task {}: tool {tool:?} called {n} times in one run (limit {})",
                        r.task_id, cfg.tool_repeat_limit
                    )
                    .into(),
                );
            }
            let expected = r.expected_ms(baseline_ms, cfg);
            // A floor: a task type whose runs take milliseconds would otherwise make every
            // short scheduling hiccup look like a stuck agent.
            let limit = ((expected as f64 * cfg.stuck_factor) as u64).max(cfg.min_stuck_after_ms);
            let quiet = now_ms.saturating_sub(r.last_span_ms);
            if quiet > limit {
                return (
                    State::Stuck,
                    format!(
                        "task {}: no span for {} s, over {} × the expected {} s",
                        r.task_id,
                        quiet / 1000,
                        cfg.stuck_factor,
                        expected as f64 / 1000.0
                    )
                    .into(),
                );
            }
        }
        if self.consecutive_errors >= cfg.error_streak {
            return (
                State::Error,
                format!("{} operations failed in a row", self.consecutive_errors).into(),
            );
        }
        let newest = self.runs.iter().map(|r| r.last_span_ms).max().unwrap_or(0);
        if now_ms.saturating_sub(newest) > cfg.waiting_after_ms {
            (
                State::Waiting,
                format!(
                    "no span for over {} s",
                    cfg.waiting_after_ms as f64 / 1000.0
                )
                .into(),
            )
        } else {
            (State::Active, "".into())
        }
    }

    /// Updates `lost` from the heartbeat or silence timers. Returns true when it changed.
    pub fn check_lost(&mut self, now_ms: u64, cfg: &FleetConfig) -> bool {
        let lost = match self.last_heartbeat_ms {
            Some(hb) => now_ms.saturating_sub(hb) > cfg.lost_after_ms,
            None => now_ms.saturating_sub(self.last_seen_ms) > cfg.silent_lost_after_ms,
        };
        let changed = lost != self.lost;
        self.lost = lost;
        changed
    }
}

/// The stats of `tool`, or of `_other` once `cap` tools are tracked. Allocates only for
/// a tool seen for the first time.
fn tool_slot<'a>(
    tools: &'a mut FxHashMap<String, ToolStats>,
    tool: &str,
    cap: usize,
) -> Option<&'a mut ToolStats> {
    let key = if tools.contains_key(tool) || tools.len() < cap {
        tool
    } else {
        OTHER_TOOL
    };
    if !tools.contains_key(key) {
        tools.insert(key.to_string(), ToolStats::default());
    }
    tools.get_mut(key)
}

fn clamp32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
