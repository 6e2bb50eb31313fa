//! What readers see: the JSON shapes of `/v1/fleet`, `/v1/workers`, `/v1/pools`, `/v1/costs`.
//! Units are in the field names (`_ms`, `_s`, `_usd`, `_per_s`, `_per_min`, `_per_h`);
//! times are Unix milliseconds. Documented in docs/api.md.

use std::collections::BTreeMap;

use serde::Serialize;

use super::costs::CostRow;
use super::window::{Percentiles, SeriesPoint};
use super::worker::{State, TaskSummary, ToolStats, Transition};

/// One worker, summarised (the list and the snapshot route::decide will read).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkerView {
    pub id: String,
    pub pool: Option<String>,
    pub agent_name: Option<String>,
    pub state: State,
    pub state_since_ms: u64,
    /// Heartbeats stopped (or, for span-only workers, all signals).
    pub lost: bool,
    /// Why the worker is STUCK.
    pub stuck_reason: Option<String>,
    /// The run with the longest silence for its expected duration (the `stuck_agent`
    /// alert's measure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub silent_run: Option<super::worker::SilentRun>,
    /// The model, by the model registry's canonical name (`gpt-4.1`).
    pub model: Option<String>,
    /// The model as the worker reported it (`gpt-4.1-2025-04-14`), when the registry
    /// calls it something else.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_reported: Option<String>,
    pub provider: Option<String>,
    /// The model is not in the registry: its cost is unknown.
    pub model_unknown: bool,
    pub version: Option<String>,
    pub sdk_version: Option<String>,
    pub current_task: Option<String>,
    pub current_task_type: Option<String>,
    /// Runs in progress.
    pub running: usize,
    pub max_in_flight: Option<u32>,
    pub draining: bool,
    /// Paused by a control command (it says so in its heartbeat).
    pub paused: bool,
    /// The most repeated identical tool call (same tool, same arguments) of a run in
    /// progress, when a call was made twice or more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeated_call: Option<super::worker::RepeatedCall>,
    pub capabilities: Vec<String>,
    pub context_tokens: Option<u64>,
    pub context_limit_tokens: Option<u64>,
    /// context_tokens / context_limit_tokens.
    pub context_utilisation: Option<f64>,
    /// Output tokens per second over the last minute.
    pub output_tokens_per_s: f64,
    /// Output tokens per second of the last LLM call.
    pub last_call_output_tokens_per_s: Option<f64>,
    /// Last call's output rate over its task type's baseline rate (1.0 = typical).
    pub token_rate_vs_baseline: Option<f64>,
    /// Failed share of LLM calls, tool calls and runs over the last 5 minutes.
    pub error_rate_5m: Option<f64>,
    pub tasks_completed: u64,
    pub tasks_failed: u64,
    /// Spend since first seen (known prices only).
    pub cost_usd: f64,
    /// Mean cost of the recent runs whose cost is known.
    pub cost_per_task_usd: Option<f64>,
    /// Spend of the last 5 minutes, per hour.
    pub burn_rate_usd_per_h: f64,
    /// LLM calls whose model has no price.
    pub unknown_cost_calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub uptime_s: u64,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub last_heartbeat_ms: Option<u64>,
}

/// One worker in full: the summary plus tools, recent runs, transitions and the sparkline.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerDetail {
    #[serde(flatten)]
    pub summary: WorkerView,
    pub tools: BTreeMap<String, ToolView>,
    pub recent_tasks: Vec<TaskSummary>,
    pub transitions: Vec<Transition>,
    /// 10 s buckets for the last hour, oldest first.
    pub series: Vec<SeriesPoint>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ToolView {
    #[serde(flatten)]
    pub stats: ToolStats,
    pub success_rate: f64,
    pub mean_ms: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct QueueView {
    /// Messages not yet delivered to any worker.
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: u64,
    /// pending + ack_pending.
    pub depth: u64,
    pub read_at_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PoolView {
    pub name: String,
    /// Listed in the commander's config (otherwise only seen in telemetry).
    pub configured: bool,
    /// Workers not lost.
    pub workers: u64,
    /// Workers with a run in progress.
    pub active: u64,
    pub lost: u64,
    /// active / workers.
    pub utilisation: Option<f64>,
    /// Runs in progress and the sum of the workers' max_in_flight.
    pub in_flight: u64,
    pub capacity: u64,
    pub queue: Option<QueueView>,
    /// From the commander reading the task to the worker receiving it, last 5 minutes.
    pub dispatch_latency_ms: Percentiles,
    /// Results in the last minute.
    pub tasks_per_min: u64,
    pub failed_per_min: u64,
    pub states: BTreeMap<&'static str, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ModelShare {
    pub model: String,
    pub calls: u64,
    /// Share of the fleet's LLM calls in the last hour.
    pub share: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    /// Not in the registry (cost unknown).
    pub unknown: bool,
    /// Duration of its LLM calls (`gen_ai.client.operation.duration`, from the calls'
    /// spans), the last hour.
    pub latency_ms: Percentiles,
}

/// Runs of one attribution value (`team`, `feature` or `prompt_variant`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AttributionView {
    pub dimension: &'static str,
    pub value: String,
    /// Runs finished in the last hour.
    pub runs: u64,
    pub cost_usd: Percentiles,
    /// Input + output tokens per run.
    pub tokens: Percentiles,
    /// Over the last 20 minutes and the 40 before, so a jump within the hour shows.
    pub cost_recent_usd: Percentiles,
    pub cost_earlier_usd: Percentiles,
    pub tokens_recent: Percentiles,
    pub tokens_earlier: Percentiles,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TaskTypeView {
    pub task_type: String,
    /// Runs finished in the last hour.
    pub tasks: u64,
    pub cost_usd: Percentiles,
    /// LLM + tool calls per run.
    pub depth: Percentiles,
    pub duration_ms: Percentiles,
    /// Cost per run over the last 20 minutes and the 40 before (the hour above, split), so
    /// a jump within the hour shows.
    pub cost_recent_usd: Percentiles,
    pub cost_earlier_usd: Percentiles,
    /// Run duration, split the same way.
    pub duration_recent_ms: Percentiles,
    pub duration_earlier_ms: Percentiles,
    /// Input + output tokens per run, the hour and split the same way.
    pub tokens: Percentiles,
    pub tokens_recent: Percentiles,
    pub tokens_earlier: Percentiles,
    /// Smoothed run duration used as the expected duration for STUCK.
    pub baseline_duration_ms: Option<u64>,
    /// Smoothed output tokens/s of runs of this type.
    pub baseline_output_tokens_per_s: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FleetView {
    pub at_ms: u64,
    pub workers: u64,
    pub lost: u64,
    pub states: BTreeMap<&'static str, u64>,
    /// Workers with a run in progress now.
    pub parallel_agents: u64,
    pub input_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Runs finished in the last minute.
    pub tasks_per_min: u64,
    /// Spend of the last 5 minutes, per hour.
    pub burn_rate_usd_per_h: f64,
    /// burn_rate_usd_per_h × 24 × 30.
    pub projected_monthly_usd: f64,
    pub cost_last_hour_usd: f64,
    pub error_rate_5m: Option<f64>,
    /// LLM calls, tool calls and runs of the last 5 minutes (what `error_rate_5m` is over).
    pub ops_5m: u64,
    /// The last hour in 10 s buckets, oldest first (the newest is the one in progress):
    /// the error-rate rule sums the policy's `fleet_error_window_s` of it, the throughput
    /// rule compares its last 30 s with the 5 minutes before.
    #[serde(skip)]
    pub series_10s: Vec<TenSeconds>,
    /// LLM calls by model, last hour.
    pub models: Vec<ModelShare>,
    pub task_types: Vec<TaskTypeView>,
    /// Cost and tokens per run by team, feature and prompt variant, last hour.
    pub attributions: Vec<AttributionView>,
    /// Workers whose last heartbeat or span is past the limit.
    pub lost_workers: Vec<String>,
}

/// One 10 s bucket of the fleet's work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenSeconds {
    /// LLM calls, tool calls and runs.
    pub ops: u64,
    pub errors: u64,
    pub output_tokens: u64,
}

/// Everything readers get each second.
#[derive(Clone, Debug, Default)]
pub struct FleetSnapshot {
    pub fleet: FleetView,
    pub pools: Vec<PoolView>,
    /// Sorted by id.
    pub workers: Vec<WorkerView>,
    /// Slices (tool, model, prompt variant … and pairs) with a failure in the last
    /// `slices::RECENT_MINUTES`, with their counts then and before.
    pub slices: Vec<super::slices::SliceView>,
    /// The fleet's operations and failures in that recent window (all, tool calls, LLM
    /// calls), and the recent operations of slices without a failure.
    pub slice_totals: super::slices::SliceTotals,
    /// Tools with a failure in the last `bursts::LISTED_MS`: each failure's time and
    /// agent, and the tool's failures over the hour (the burst rule's baseline).
    pub tool_failures: Vec<super::bursts::ToolFailuresView>,
    /// Tools called in the last hour (the burst rule spreads its false-alarm budget
    /// over them).
    pub tools_tracked: usize,
    /// Finished runs' fingerprints per pool, task type and prompt variant (rebuilt every
    /// 30 s, shared between snapshots).
    pub prints: std::sync::Arc<super::prints::PrintsView>,
}

/// `/v1/costs` answer.
#[derive(Clone, Debug, Serialize)]
pub struct CostReport {
    pub window_s: u64,
    pub by: Vec<&'static str>,
    pub rows: Vec<CostRow>,
    pub total_usd: f64,
    /// Calls whose cost is unknown (their model has no price): totals are lower bounds.
    pub unknown_cost_calls: u64,
}
