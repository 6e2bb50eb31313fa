//! The rules: what each one watches in the fleet snapshot (and the detector's own short
//! history of it), as observations the lifecycle turns into alerts. Pure: a snapshot, the
//! thresholds in force and the history in; observations out.
//!
//! Each observation says whether its condition holds now (`active`) and whether a firing
//! alert should keep firing (`holding`: the value has not yet fallen back past the resolve
//! level, which sits below the firing threshold so an alert does not flap around it).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::history::History;
use crate::config::PoolConfig;
use crate::fleet::view::{FleetSnapshot, WorkerView};
use crate::fleet::window::Percentiles;
use crate::fleet::worker::State;
use crate::policy::schema::AlertSpec;

/// Every rule the detector evaluates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    ContextOverflowRisk,
    ContextCritical,
    CostRunaway,
    TokenLoop,
    ToolLoop,
    ToolLoopRunaway,
    StuckAgent,
    ErrorRateSpike,
    QueueSaturation,
    QueueUnserved,
    ThroughputDrop,
    StuckWave,
    CostConcentration,
    OverProvisioned,
    FailureSlice,
    ToolFailureRate,
    ToolFailureBurst,
    CostJump,
    DurationJump,
    DepthTail,
    BehaviourDrift,
    TokensJump,
}

/// How loud an alert is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Critical];

    pub fn parse(s: &str) -> Option<Severity> {
        Severity::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl Rule {
    pub const ALL: [Rule; 22] = [
        Rule::ContextOverflowRisk,
        Rule::ContextCritical,
        Rule::CostRunaway,
        Rule::TokenLoop,
        Rule::StuckAgent,
        Rule::ErrorRateSpike,
        Rule::QueueSaturation,
        Rule::QueueUnserved,
        Rule::ThroughputDrop,
        Rule::StuckWave,
        Rule::CostConcentration,
        Rule::OverProvisioned,
        Rule::ToolLoop,
        Rule::ToolLoopRunaway,
        Rule::FailureSlice,
        Rule::ToolFailureRate,
        Rule::ToolFailureBurst,
        Rule::CostJump,
        Rule::DurationJump,
        Rule::DepthTail,
        Rule::BehaviourDrift,
        Rule::TokensJump,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::ContextOverflowRisk => "context_overflow_risk",
            Rule::ContextCritical => "context_critical",
            Rule::CostRunaway => "cost_runaway",
            Rule::TokenLoop => "token_loop",
            Rule::StuckAgent => "stuck_agent",
            Rule::ErrorRateSpike => "error_rate_spike",
            Rule::QueueSaturation => "queue_saturation",
            Rule::QueueUnserved => "queue_unserved",
            Rule::ThroughputDrop => "throughput_drop",
            Rule::StuckWave => "stuck_wave",
            Rule::CostConcentration => "cost_concentration",
            Rule::OverProvisioned => "over_provisioned",
            Rule::ToolLoop => "tool_loop",
            Rule::ToolLoopRunaway => "tool_loop_runaway",
            Rule::FailureSlice => "failure_slice",
            Rule::ToolFailureRate => "tool_failure_rate",
            Rule::ToolFailureBurst => "tool_failure_burst",
            Rule::CostJump => "cost_jump",
            Rule::DurationJump => "duration_jump",
            Rule::DepthTail => "depth_tail",
            Rule::BehaviourDrift => "behaviour_drift",
            Rule::TokensJump => "tokens_jump",
        }
    }

    pub fn parse(s: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn severity(self) -> Severity {
        match self {
            Rule::ContextCritical
            | Rule::CostRunaway
            | Rule::ErrorRateSpike
            | Rule::StuckWave
            | Rule::ToolLoopRunaway => Severity::Critical,
            Rule::OverProvisioned => Severity::Info,
            _ => Severity::Warning,
        }
    }

    /// How long the condition must hold before the alert fires (its `for`).
    pub fn for_ms(self, spec: &AlertSpec) -> u64 {
        match self {
            Rule::OverProvisioned => spec.over_provisioned_for_s * 1000,
            // A count within one run does not flap: it fires as it is seen.
            Rule::ContextCritical
            | Rule::StuckAgent
            | Rule::StuckWave
            | Rule::ToolLoop
            | Rule::ToolLoopRunaway
            // Already tests over 15 minutes of evidence.
            | Rule::FailureSlice
            // A burst is over within its window: the test is the evidence.
            | Rule::ToolFailureBurst
            | Rule::BehaviourDrift => 0,
            _ => spec.pending_s * 1000,
        }
    }
}

/// Where an alert points: the worker, task, trace and decision it is about.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Links {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The decision of `task` (`GET /v1/decisions/{task}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// What one rule sees for one scope at one tick.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub rule: Rule,
    /// The scope (`worker`, `pool`, or none for the fleet): with the rule, the alert's
    /// identity.
    pub labels: BTreeMap<String, String>,
    pub value: f64,
    pub threshold: f64,
    /// The condition holds now.
    pub active: bool,
    /// A firing alert keeps firing: the value has not fallen back past the resolve level.
    pub holding: bool,
    pub message: String,
    pub links: Links,
}

/// How far below its threshold a value must fall before a firing alert resolves, as a
/// share of the threshold (rules with a count or a state use their own resolve level).
const HYSTERESIS: f64 = 0.05;

/// The thresholds, the pools' limits and the snapshot a tick reads.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub snapshot: &'a FleetSnapshot,
    pub spec: &'a AlertSpec,
    pub pools: &'a BTreeMap<String, PoolConfig>,
    pub history: &'a History,
}

/// Every rule's observations for this tick.
pub fn observe(i: &Inputs<'_>) -> Vec<Observation> {
    let mut out = Vec::new();
    let peers = peer_hourly_costs(i);
    for w in i.snapshot.workers.iter().filter(|w| !w.lost) {
        let peer = w.pool.as_deref().and_then(|p| peers.get(p)).copied();
        worker_rules(i, w, peer, &mut out);
    }
    fleet_rules(i, &mut out);
    pool_rules(i, &mut out);
    slice_rules(i, &mut out);
    tool_rules(i, &mut out);
    burst_rules(i, &mut out);
    task_type_rules(i, &mut out);
    out
}

/// Distribution jumps per task type, from the fleet's windowed sketches: P95 cost and
/// tokens per run and P99 duration over the last 20 minutes against the 40 before, and the
/// depth tail (P99 calls per run against the median) over the hour.
fn task_type_rules(i: &Inputs<'_>, out: &mut Vec<Observation>) {
    let spec = i.spec;
    let min = spec.min_samples;
    let jump = 1.0 + spec.distribution_jump;
    for t in &i.snapshot.fleet.task_types {
        let mut e = Emitter::new(out, || Scope::labelled("task_type", &t.task_type));
        let whose = format!("{} tasks", t.task_type);
        p95_jumps(
            &mut e,
            &whose,
            (&t.cost_recent_usd, &t.cost_earlier_usd),
            (&t.tokens_recent, &t.tokens_earlier),
            (min, jump),
        );
        if let Some((name, now, before)) = duration_jump(t, min) {
            e.emit(
                Rule::DurationJump,
                (now / before, jump),
                above(now / before, jump),
                &|| {
                    format!(
                        "{name} duration of {} runs is {:.1} s, up {:.0}% from {:.1} s earlier in the hour",
                        t.task_type,
                        now / 1000.0,
                        (now / before - 1.0) * 100.0,
                        before / 1000.0
                    )
                },
            );
        }
        if let (Some(p99), Some(p50)) = (t.depth.p99, t.depth.p50)
            && t.depth.count >= min
            && p50 > 0.0
        {
            let ratio = p99 / p50;
            e.emit(
                Rule::DepthTail,
                (ratio, spec.depth_tail_multiple),
                above(ratio, spec.depth_tail_multiple),
                &|| {
                    format!(
                        "P99 depth of {} runs is {p99:.0} calls, {ratio:.1}x the median ({p50:.0}) over the last hour",
                        t.task_type
                    )
                },
            );
        }
    }
    for a in &i.snapshot.fleet.attributions {
        let mut e = Emitter::new(out, || Scope::labelled(a.dimension, &a.value));
        let whose = format!("{} {}", a.dimension.replace('_', " "), a.value);
        p95_jumps(
            &mut e,
            &whose,
            (&a.cost_recent_usd, &a.cost_earlier_usd),
            (&a.tokens_recent, &a.tokens_earlier),
            (min, jump),
        );
    }
}

/// `cost_jump` and `tokens_jump`: the P95 per run of the last 20 minutes above `jump` ×
/// that of the 40 minutes before (each side with at least `min` runs).
fn p95_jumps(
    e: &mut Emitter<'_, impl Fn() -> Scope>,
    whose: &str,
    cost: (&Percentiles, &Percentiles),
    tokens: (&Percentiles, &Percentiles),
    (min, jump): (u64, f64),
) {
    let p95 = |p: &Percentiles| p.p95;
    if let Some((now, before)) = compared(cost.0, cost.1, p95, min) {
        e.emit(
            Rule::CostJump,
            (now / before, jump),
            above(now / before, jump),
            &|| {
                format!(
                    "P95 cost per run of {whose} is ${now:.4}, up {:.0}% from ${before:.4} earlier in the hour",
                    (now / before - 1.0) * 100.0
                )
            },
        );
    }
    if let Some((now, before)) = compared(tokens.0, tokens.1, p95, min) {
        e.emit(
            Rule::TokensJump,
            (now / before, jump),
            above(now / before, jump),
            &|| {
                format!(
                    "P95 tokens per run of {whose} is {now:.0}, up {:.0}% from {before:.0} earlier in the hour",
                    (now / before - 1.0) * 100.0
                )
            },
        );
    }
}

/// Runs on each side needed before P99.9 says more than P99.
const P999_MIN_RUNS: u64 = 1_000;

/// The larger jump of P99 and (over enough runs) P99.9 run duration: (which, now, before).
fn duration_jump(
    t: &crate::fleet::view::TaskTypeView,
    min: u64,
) -> Option<(&'static str, f64, f64)> {
    let (recent, earlier) = (&t.duration_recent_ms, &t.duration_earlier_ms);
    let p99 = compared(recent, earlier, |p| p.p99, min).map(|(n, b)| ("P99", n, b));
    let p999 =
        compared(recent, earlier, |p| p.p999, min.max(P999_MIN_RUNS)).map(|(n, b)| ("P99.9", n, b));
    [p99, p999]
        .into_iter()
        .flatten()
        .max_by(|a, b| (a.1 / a.2).total_cmp(&(b.1 / b.2)))
}

/// A quantile of the recent window and of the one before, when both hold `min` values and
/// the earlier one is above 0 (so the ratio means something).
fn compared(
    recent: &Percentiles,
    earlier: &Percentiles,
    quantile: impl Fn(&Percentiles) -> Option<f64>,
    min: u64,
) -> Option<(f64, f64)> {
    let (now, before) = (quantile(recent)?, quantile(earlier)?);
    (recent.count >= min && earlier.count >= min && before > 0.0).then_some((now, before))
}

/// `stuck_agent`: the agent is STUCK (the fleet's state, config `fleet.stuck_factor`), or a
/// run's silence is past the policy's `active_duration_multiple` × its expected duration
/// (and the `fleet.min_stuck_after_ms` floor): the policy can make the alert earlier than
/// the state, never later.
fn stuck_rule(spec: &AlertSpec, w: &WorkerView, e: &mut Emitter<'_, impl Fn() -> Scope>) {
    let silent = w
        .silent_run
        .as_ref()
        .filter(|r| r.quiet_ms as f64 > r.limit_ms(spec.active_duration_multiple));
    let stuck = w.state == State::Stuck || silent.is_some();
    let message = || match (w.state == State::Stuck, silent) {
        (false, Some(r)) => format!(
            "Agent {} is stuck: task {}: no span for {} s, over {} × its expected {} s",
            w.id,
            r.task_id,
            r.quiet_ms / 1000,
            spec.active_duration_multiple,
            r.expected_ms as f64 / 1000.0
        ),
        _ => format!(
            "Agent {} is stuck: {}",
            w.id,
            w.stuck_reason.as_deref().unwrap_or("no progress")
        ),
    };
    e.emit(
        Rule::StuckAgent,
        (f64::from(u8::from(stuck)), 1.0),
        (stuck, stuck),
        &message,
    );
    // The alert is about the silent run's task, which may not be the worker's newest.
    if let (Some(r), Some(o)) = (silent, e.out.last_mut())
        && o.rule == Rule::StuckAgent
    {
        o.links.task = Some(r.task_id.clone());
        o.links.decision = Some(r.task_id.clone());
    }
}

/// The same tool call made again and again in one run: a warning at `tool_loop_calls`, and
/// at `tool_loop_critical_calls` a critical alert the warning stands aside for.
fn tool_loop_rules(
    spec: &AlertSpec,
    worker: &str,
    rc: &crate::fleet::worker::RepeatedCall,
    e: &mut Emitter<'_, impl Fn() -> Scope>,
) {
    let n = f64::from(rc.calls);
    let (warn, critical) = (
        f64::from(spec.tool_loop_calls),
        f64::from(spec.tool_loop_critical_calls),
    );
    let message = |threshold: f64| {
        format!(
            "Agent {worker} called {} with the same arguments {} times in task {} (alert at {threshold})",
            rc.tool, rc.calls, rc.task_id
        )
    };
    let runaway = (n >= critical, n >= critical);
    e.emit(Rule::ToolLoopRunaway, (n, critical), runaway, &|| {
        message(critical)
    });
    let warning = n >= warn && !runaway.0;
    e.emit(Rule::ToolLoop, (n, warn), (warning, warning), &|| {
        message(warn)
    });
}

/// A tool whose calls across the fleet succeed less than `tool_success_below` of the time
/// over the slices' recent window (at least `min_samples` calls).
fn tool_rules(i: &Inputs<'_>, out: &mut Vec<Observation>) {
    let spec = i.spec;
    let limit = 1.0 - spec.tool_success_below;
    for s in &i.snapshot.slices {
        let [(dim, tool)] = s.dims.as_slice() else {
            continue;
        };
        if *dim != "tool" || s.recent_ops < spec.min_samples {
            continue;
        }
        let failing = s.recent_failures as f64 / s.recent_ops as f64;
        let state = above(failing, limit);
        if keep(state) {
            let scope = Scope::labelled("tool", tool);
            let message = format!(
                "Tool {tool} succeeded in {:.0}% of {} calls across the fleet in the last {} minutes (alert below {:.0}%)",
                (1.0 - failing) * 100.0,
                s.recent_ops,
                crate::fleet::slices::RECENT_MINUTES,
                spec.tool_success_below * 100.0
            );
            out.push(scope.observe(
                Rule::ToolFailureRate,
                (1.0 - failing, spec.tool_success_below),
                state,
                message,
            ));
        }
    }
}

/// One observation per tool whose failures came in a burst (`detect/bursts.rs`).
fn burst_rules(i: &Inputs<'_>, out: &mut Vec<Observation>) {
    let s = i.snapshot;
    for b in super::bursts::findings(&s.tool_failures, s.tools_tracked, s.fleet.at_ms, i.spec) {
        let message = b.message();
        let scope = Scope::labelled("tool", b.tool);
        out.push(scope.observe(
            Rule::ToolFailureBurst,
            (b.agents.len() as f64, f64::from(i.spec.tool_burst_agents)),
            (b.active, b.holding),
            message,
        ));
    }
}

/// One observation per failure slice found (`detect/slices.rs`), labelled by its dimensions.
fn slice_rules(i: &Inputs<'_>, out: &mut Vec<Observation>) {
    if i.snapshot.slices.is_empty() {
        return;
    }
    for f in super::slices::findings(
        &i.snapshot.slices,
        &i.snapshot.slice_totals,
        i.spec,
        HYSTERESIS,
    ) {
        out.push(Observation {
            rule: Rule::FailureSlice,
            labels: f
                .dims
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            value: f.lift,
            threshold: i.spec.failure_slice_lift,
            active: f.active,
            holding: true,
            message: f.message(),
            links: Links::default(),
        });
    }
}

fn worker_labels(w: &WorkerView) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([("worker".to_string(), w.id.clone())]);
    if let Some(p) = &w.pool {
        l.insert("pool".into(), p.clone());
    }
    l
}

fn worker_links(w: &WorkerView) -> Links {
    Links {
        worker: Some(w.id.clone()),
        task: w.current_task.clone(),
        decision: w.current_task.clone(),
        pool: w.pool.clone(),
    }
}

/// `value > threshold` fires; it holds while above `threshold × (1 − HYSTERESIS)`.
fn above(value: f64, threshold: f64) -> (bool, bool) {
    (value > threshold, value > threshold * (1.0 - HYSTERESIS))
}

/// An observation is kept only when its condition holds or a firing alert would keep
/// firing: a healthy scope costs a comparison, not an allocation. An open alert whose
/// scope is present but not observed is recovering (see the lifecycle).
fn keep((active, holding): (bool, bool)) -> bool {
    active || holding
}

/// Builds the observations of one scope.
struct Scope {
    labels: BTreeMap<String, String>,
    links: Links,
}

impl Scope {
    fn worker(w: &WorkerView) -> Self {
        Self {
            labels: worker_labels(w),
            links: worker_links(w),
        }
    }

    fn fleet() -> Self {
        Self {
            labels: BTreeMap::new(),
            links: Links::default(),
        }
    }

    /// A scope named by one label (`task_type`, `tool` …) with no links.
    fn labelled(key: &str, value: &str) -> Self {
        Self {
            labels: BTreeMap::from([(key.to_string(), value.to_string())]),
            links: Links::default(),
        }
    }

    fn pool(name: &str) -> Self {
        Self {
            labels: BTreeMap::from([("pool".to_string(), name.to_string())]),
            links: Links {
                pool: Some(name.to_string()),
                ..Default::default()
            },
        }
    }

    fn observe(
        &self,
        rule: Rule,
        (value, threshold): (f64, f64),
        (active, holding): (bool, bool),
        message: String,
    ) -> Observation {
        Observation {
            rule,
            labels: self.labels.clone(),
            value,
            threshold,
            active,
            holding,
            message,
            links: self.links.clone(),
        }
    }
}

/// Pushes the observations of one scope; the scope (labels and links) is built only when
/// a rule has something to say about it, so a healthy scope costs a comparison.
struct Emitter<'o, F: Fn() -> Scope> {
    out: &'o mut Vec<Observation>,
    scope: Option<Scope>,
    make: F,
}

impl<'o, F: Fn() -> Scope> Emitter<'o, F> {
    fn new(out: &'o mut Vec<Observation>, make: F) -> Self {
        Self {
            out,
            scope: None,
            make,
        }
    }

    fn emit(
        &mut self,
        rule: Rule,
        vt: (f64, f64),
        state: (bool, bool),
        message: &dyn Fn() -> String,
    ) {
        if keep(state) {
            let scope = self.scope.get_or_insert_with(&self.make);
            self.out.push(scope.observe(rule, vt, state, message()));
        }
    }
}

/// Each pool's mean hourly spend per agent (agents with an hour's history, not lost).
fn peer_hourly_costs<'s>(i: &Inputs<'s>) -> BTreeMap<&'s str, f64> {
    let mut sums: BTreeMap<&str, (f64, u32)> = BTreeMap::new();
    for w in i.snapshot.workers.iter().filter(|w| !w.lost) {
        if let (Some(pool), Some(c)) = (w.pool.as_deref(), i.history.worker_hourly_cost(&w.id)) {
            let e = sums.entry(pool).or_default();
            e.0 += c;
            e.1 += 1;
        }
    }
    sums.into_iter()
        .map(|(p, (sum, n))| (p, sum / f64::from(n.max(1))))
        .collect()
}

fn worker_rules(
    i: &Inputs<'_>,
    w: &WorkerView,
    peer_hourly: Option<f64>,
    out: &mut Vec<Observation>,
) {
    let spec = i.spec;
    let mut e = Emitter::new(out, || Scope::worker(w));
    if let Some(u) = w.context_utilisation {
        let critical = above(u, spec.context_critical);
        e.emit(
            Rule::ContextCritical,
            (u, spec.context_critical),
            critical,
            &|| {
                format!(
                    "Context of agent {} at {:.0}% of its window (critical above {:.0}%)",
                    w.id,
                    u * 100.0,
                    spec.context_critical * 100.0
                )
            },
        );
        // The warning stands aside while the critical alert covers the same agent.
        let (warn, warn_holding) = above(u, spec.context_warning);
        e.emit(
            Rule::ContextOverflowRisk,
            (u, spec.context_warning),
            (warn && !critical.0, warn_holding && !critical.0),
            &|| {
                format!(
                    "Context of agent {} at {:.0}% of its window (warning above {:.0}%)",
                    w.id,
                    u * 100.0,
                    spec.context_warning * 100.0
                )
            },
        );
    }
    if let Some(r) = w.token_rate_vs_baseline {
        e.emit(
            Rule::TokenLoop,
            (r, spec.output_rate_multiple),
            above(r, spec.output_rate_multiple),
            &|| {
                format!(
                    "Agent {} is writing output tokens at {r:.1}x its task type's usual rate{}",
                    w.id,
                    w.current_task_type
                        .as_deref()
                        .map(|t| format!(" ({t})"))
                        .unwrap_or_default()
                )
            },
        );
    }
    if let Some(rc) = &w.repeated_call {
        tool_loop_rules(spec, &w.id, rc, &mut e);
    }
    stuck_rule(spec, w, &mut e);
    if let Some(avg) = i.history.worker_hourly_cost(&w.id)
        && avg >= spec.min_cost_usd_per_h
    {
        // An agent that was idle for most of the hour and then busy for five minutes
        // spends several times its own average without anything being wrong; so its
        // baseline is the larger of its own average and its pool's per-agent average (an
        // agent busy all the time spends about that).
        let peer = peer_hourly.unwrap_or(0.0);
        let base = avg.max(peer);
        let threshold = spec.cost_rate_multiple * base;
        let burn = w.burn_rate_usd_per_h;
        e.emit(
            Rule::CostRunaway,
            (burn, threshold),
            above(burn, threshold),
            &|| {
                let basis = if peer > avg {
                    format!(
                        "its pool's per-agent average of the last hour (${peer:.2}/h; its own ${avg:.2}/h)"
                    )
                } else {
                    format!("its average of the last hour (${avg:.2}/h)")
                };
                format!(
                    "Agent {} is spending ${burn:.2}/h, {:.1}x {basis}",
                    w.id,
                    burn / base
                )
            },
        );
    }
}

/// Operations and failures of the fleet over the last `window_s` (in 10 s buckets, at
/// most the hour the snapshot holds; the 5-minute totals when it holds no buckets).
fn window_errors(f: &crate::fleet::view::FleetView, window_s: u64) -> (u64, u64) {
    if f.series_10s.is_empty() {
        let errors = f
            .error_rate_5m
            .map_or(0, |r| (r * f.ops_5m as f64).round() as u64);
        return (f.ops_5m, errors);
    }
    let n = window_s.div_ceil(10).clamp(1, f.series_10s.len() as u64) as usize;
    f.series_10s
        .iter()
        .rev()
        .take(n)
        .fold((0, 0), |(o, e), b| (o + b.ops, e + b.errors))
}

/// Output tokens/s over the last 30 s and over the 5 minutes that ended a minute before
/// them (`history::THROUGHPUT_GAP_MS`), from the snapshot's complete 10 s buckets (the one
/// in progress would read as a drop); the detector's own samples when the snapshot
/// carries no buckets.
fn throughput(f: &crate::fleet::view::FleetView, history: &History) -> Option<(f64, f64)> {
    const NOW: usize = 3;
    const GAP: usize = (super::history::THROUGHPUT_GAP_MS / 10_000) as usize;
    const BEFORE: usize = 30;
    if f.series_10s.is_empty() {
        return history.throughput();
    }
    let done = f.series_10s.len() - 1;
    if done < NOW + GAP + BEFORE {
        return None;
    }
    let tokens = |from: usize, to: usize| -> f64 {
        f.series_10s
            .get(from..to)
            .unwrap_or_default()
            .iter()
            .map(|b| b.output_tokens as f64)
            .sum()
    };
    let now = tokens(done - NOW, done) / (NOW as f64 * 10.0);
    let before = tokens(done - NOW - GAP - BEFORE, done - NOW - GAP) / (BEFORE as f64 * 10.0);
    Some((now, before))
}

fn window_words(s: u64) -> String {
    match s {
        s if s % 60 == 0 && s >= 120 => format!("{} minutes", s / 60),
        60 => "minute".to_string(),
        s => format!("{s} s"),
    }
}

fn fleet_rules(i: &Inputs<'_>, out: &mut Vec<Observation>) {
    let spec = i.spec;
    let f = &i.snapshot.fleet;
    let mut e = Emitter::new(out, Scope::fleet);
    let (ops, errors) = window_errors(f, spec.fleet_error_window_s);
    if ops >= spec.min_samples.max(1) {
        let rate = errors as f64 / ops as f64;
        e.emit(
            Rule::ErrorRateSpike,
            (rate, spec.fleet_error_rate),
            above(rate, spec.fleet_error_rate),
            &|| {
                format!(
                    "Fleet error rate {:.1}% over the last {} (threshold {:.1}%)",
                    rate * 100.0,
                    window_words(spec.fleet_error_window_s),
                    spec.fleet_error_rate * 100.0
                )
            },
        );
    }
    if let Some(avg) = i.history.fleet_hourly_cost(f.cost_last_hour_usd)
        && avg >= spec.min_cost_usd_per_h
    {
        let threshold = spec.cost_rate_multiple * avg;
        e.emit(
            Rule::CostRunaway,
            (f.burn_rate_usd_per_h, threshold),
            above(f.burn_rate_usd_per_h, threshold),
            &|| {
                format!(
                    "Fleet spending ${:.2}/h, {:.1}x its average of the last hour (${avg:.2}/h)",
                    f.burn_rate_usd_per_h,
                    f.burn_rate_usd_per_h / avg
                )
            },
        );
    }
    if let Some((now, baseline)) = throughput(f, i.history)
        && baseline >= spec.min_tokens_per_s
    {
        let drop = 1.0 - now / baseline;
        e.emit(
            Rule::ThroughputDrop,
            (drop, spec.token_rate_drop),
            above(drop, spec.token_rate_drop),
            &|| {
                format!(
                    "Fleet output {now:.0} tokens/s, down {:.0}% from its 5-minute baseline of {baseline:.0}",
                    drop * 100.0
                )
            },
        );
    }
    if let Some((now, before)) = i.history.stuck_change() {
        // Up by the configured share and by at least `stuck_wave_min` agents; it holds
        // while more are stuck than before the wave.
        let threshold = (before as f64 * (1.0 + spec.stuck_wave_rise))
            .max(before as f64 + spec.stuck_wave_min as f64);
        let active = now as f64 >= threshold;
        e.emit(
            Rule::StuckWave,
            (now as f64, threshold),
            (active, active || now > before),
            &|| format!("{now} agents stuck, up from {before} five minutes ago"),
        );
    }
    cost_concentration(i, out);
}

fn cost_concentration(i: &Inputs<'_>, out: &mut Vec<Observation>) {
    let spec = i.spec;
    let Some(shares) = i.history.hour_shares() else {
        return;
    };
    if shares.total_cost < spec.min_cost_usd_per_h {
        return;
    }
    for s in shares.workers {
        let active = s.cost_share >= spec.cost_concentration_share
            && s.task_share <= spec.cost_concentration_tasks;
        let holding = s.cost_share >= spec.cost_concentration_share * (1.0 - HYSTERESIS);
        if !keep((active, holding)) {
            continue;
        }
        let mut labels = BTreeMap::from([("worker".to_string(), s.worker.clone())]);
        if let Some(p) = &s.pool {
            labels.insert("pool".into(), p.clone());
        }
        out.push(Observation {
            rule: Rule::CostConcentration,
            labels,
            value: s.cost_share,
            threshold: spec.cost_concentration_share,
            active,
            holding,
            message: format!(
                "Agent {} spent {:.0}% of the fleet's last hour while doing {:.0}% of its tasks",
                s.worker,
                s.cost_share * 100.0,
                s.task_share * 100.0
            ),
            links: Links {
                worker: Some(s.worker.clone()),
                pool: s.pool.clone(),
                ..Default::default()
            },
        });
    }
}

fn pool_rules(i: &Inputs<'_>, out: &mut Vec<Observation>) {
    let spec = i.spec;
    for p in &i.snapshot.pools {
        let mut e = Emitter::new(&mut *out, || Scope::pool(&p.name));
        if p.tasks_per_min >= spec.min_samples {
            let rate = p.failed_per_min as f64 / p.tasks_per_min as f64;
            e.emit(
                Rule::ErrorRateSpike,
                (rate, spec.fleet_error_rate),
                above(rate, spec.fleet_error_rate),
                &|| {
                    format!(
                        "Pool {} failed {:.1}% of its tasks in the last minute ({} of {})",
                        p.name,
                        rate * 100.0,
                        p.failed_per_min,
                        p.tasks_per_min
                    )
                },
            );
        }
        let depth = p.queue.as_ref().map(|q| q.depth);
        let max = i
            .pools
            .get(&p.name)
            .and_then(|c| c.max_queue_depth)
            .filter(|m| *m > 0);
        if let (Some(depth), Some(max)) = (depth, max) {
            let ratio = depth as f64 / max as f64;
            e.emit(
                Rule::QueueSaturation,
                (ratio, spec.queue_ratio),
                above(ratio, spec.queue_ratio),
                &|| {
                    format!(
                        "Pool {} queue at {depth} of its {max} maximum ({:.0}%)",
                        p.name,
                        ratio * 100.0
                    )
                },
            );
        }
        if let Some(waiting) = unserved(p, i.snapshot.fleet.at_ms) {
            e.emit(Rule::QueueUnserved, (waiting as f64, 0.0), (true, true), &|| {
                let whose = if p.configured {
                    format!("Pool {}", p.name)
                } else {
                    format!("Pool {}, which is not configured,", p.name)
                };
                let why = match p.lost {
                    0 => "none is connected".to_string(),
                    1 => "its one worker is lost".to_string(),
                    n => format!("its {n} workers are lost"),
                };
                format!("{whose} has {waiting} tasks waiting in its queue and no worker to take them: {why}")
            });
        }
        // Nothing waiting (what runs is in the utilisation, not in the queue).
        let waiting = p.queue.as_ref().map(|q| q.pending);
        if let (Some(0), Some(u)) = (waiting, p.utilisation)
            && p.workers > 0
        {
            let idle = u < spec.over_provisioned_utilisation;
            e.emit(
                Rule::OverProvisioned,
                (u, spec.over_provisioned_utilisation),
                (idle, idle),
                &|| {
                    format!(
                        "Pool {}{} has an empty queue and {:.0}% of its {} workers busy",
                        p.name,
                        // With no pools configured, every pool a task names is taken.
                        if p.configured || i.pools.is_empty() {
                            ""
                        } else {
                            " (not configured: the commander routes it no task)"
                        },
                        u * 100.0,
                        p.workers
                    )
                },
            );
        }
    }
}

/// How long a queue reading stays evidence: the poll reads every 2 s by default
/// (`telemetry.queue_poll_ms`); a reading older than this (NATS unreachable) says nothing.
const QUEUE_READING_MS: u64 = 30_000;

/// The tasks waiting in a pool's queue that nobody is there to take, if so: tasks wait
/// (`num_pending` > 0), none of the queue's is out with a worker (`num_ack_pending` 0),
/// and the pool has no worker that is not lost (none connected, or every one silent). A
/// pool whose workers are paused or draining has workers: an operator chose that. A
/// worker that pulls without heartbeats would hold tasks unacknowledged, so it is not
/// missed.
fn unserved(p: &crate::fleet::view::PoolView, now_ms: u64) -> Option<u64> {
    let q = p.queue.as_ref()?;
    let fresh = now_ms.saturating_sub(q.read_at_ms) <= QUEUE_READING_MS;
    (fresh && q.pending > 0 && q.ack_pending == 0 && p.workers == 0).then_some(q.pending)
}
