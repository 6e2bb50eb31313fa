//! `fleet-sim scenario <name>|all`: a fault per detector, injected into a simulated fleet,
//! and a healthy run where nothing may fire.
//!
//! The fleet is simulated agents (`agents.rs`) that speak what real ones send: OTLP/protobuf
//! span exports and protocol.md heartbeats, and the pool queue figures the commander reads
//! from JetStream. Their bytes go through the commander's own decode path (the OTLP limits
//! check, prost, the normaliser; serde for heartbeats) into its real live state
//! (`FleetState`) and its real detector, with the policy's default `[alerts]`, on a
//! simulated clock: an hour of fleet time runs in seconds, so detectors that compare with
//! the last hour are tested as they run. What it does not include: NATS, the HTTP and gRPC
//! receivers and the sinks (the e2e tests cover those with the real binary).

pub mod agents;
pub mod budget;
pub mod economics;
pub mod report;
pub mod stack;
pub mod tau;

use std::collections::BTreeMap;
use std::time::Instant;

use fleet_commander::config::{FleetConfig, PoolConfig};
use fleet_commander::detect::{Change, Detector, Rule};
use fleet_commander::domain::DecodeLimits;
use fleet_commander::fleet::worker::SilentRun;
use fleet_commander::fleet::{FleetState, TaskEvent};
use fleet_commander::ingest::limits::{Signal, check_protobuf};
use fleet_commander::ingest::normalise;
use fleet_commander::ingest::normalise::wire::TraceRequest;
use fleet_commander::policy::schema::AlertSpec;
use fleet_commander::registry::Registry;
use fleet_worker::message::Heartbeat;

/// What goes wrong, from the scenario's onset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// One agent's context passes 80 % of its model's window.
    ContextFill,
    /// One agent's context passes 95 %.
    ContextCritical,
    /// One agent's input tokens per call go up 8 × (its context balloons).
    CostRunaway,
    /// One agent's LLM calls write 4,000 tokens in 2 s.
    TokenLoop,
    /// One agent calls web_search with the same arguments, step after step.
    ToolLoop,
    /// One agent's run goes silent while its heartbeats go on.
    StuckAgent,
    /// Fleet-wide: a quarter of tool calls and 15 % of runs fail.
    ErrorSpike,
    /// The research pool's arrivals triple its capacity.
    QueueSaturation,
    /// The OpenAI models write a third of the tokens per call (a provider slowdown).
    ThroughputDrop,
    /// A third of the agents go silent at once.
    StuckWave,
    /// One agent on claude-opus-4-1 with 150,000-token prompts, slow runs.
    CostConcentration,
    /// The research pool's arrivals fall to 5 % of its capacity.
    OverProvisioned,
    /// The research pool's agents all crash at once: no heartbeat, span or pull from
    /// then on, while its tasks keep arriving (a run in progress goes back to the queue,
    /// as JetStream hands an unacknowledged task out again).
    PoolOutage,
    /// web_search fails 60 % of the time for agents on prompt variant v7.
    FailureSlice,
    /// run_code fails half the time, for everybody.
    ToolDegradation,
    /// For 30 s, ten agents' tool calls go to run_code and fail: a short outage of one
    /// tool, seen by ten agents at once.
    ToolOutage,
    /// Prompt variant v7's prompts double (context inflation).
    ContextInflation,
    /// A third of the agents take 4 × as long per step.
    SlowRuns,
    /// Half the agents make a fifth of their runs 6 × as deep.
    DeepRuns,
    /// Prompt variant v7's agents search instead of reading; every run still succeeds.
    PromptRegression,
}

impl Fault {
    /// How many of `n` agents it hits (fleet-wide faults act on every agent themselves).
    pub fn agents_hit(self, n: usize) -> usize {
        match self {
            Fault::StuckWave | Fault::SlowRuns => n / 3,
            Fault::DeepRuns => n / 2,
            Fault::ToolOutage => n.min(10),
            Fault::ErrorSpike
            | Fault::QueueSaturation
            | Fault::ThroughputDrop
            | Fault::OverProvisioned
            | Fault::PoolOutage
            | Fault::FailureSlice
            | Fault::ToolDegradation
            | Fault::ContextInflation
            | Fault::PromptRegression => 0,
            _ => 1,
        }
    }

    /// How long it lasts from its onset, in seconds (`None`: to the end of the run).
    pub fn lasts_s(self) -> Option<u64> {
        match self {
            Fault::ToolOutage => Some(30),
            _ => None,
        }
    }
}

/// One scenario: a fault, when it starts, how long the run lasts, what should fire.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub fault: Option<Fault>,
    pub onset_min: u64,
    pub minutes: u64,
    /// Any of these firing after the onset is a detection.
    pub expect: &'static [Rule],
}

/// Every scenario, and the healthy run last.
pub const SCENARIOS: [Scenario; 21] = [
    sc(
        "context_overflow_risk",
        Fault::ContextFill,
        5,
        10,
        &[Rule::ContextOverflowRisk],
    ),
    sc(
        "context_critical",
        Fault::ContextCritical,
        5,
        10,
        &[Rule::ContextCritical],
    ),
    sc(
        "cost_runaway",
        Fault::CostRunaway,
        25,
        40,
        &[Rule::CostRunaway],
    ),
    sc("token_loop", Fault::TokenLoop, 10, 15, &[Rule::TokenLoop]),
    sc(
        "tool_loop",
        Fault::ToolLoop,
        5,
        12,
        &[Rule::ToolLoop, Rule::ToolLoopRunaway],
    ),
    sc("stuck_agent", Fault::StuckAgent, 5, 12, &[Rule::StuckAgent]),
    sc(
        "error_rate_spike",
        Fault::ErrorSpike,
        10,
        18,
        &[Rule::ErrorRateSpike],
    ),
    sc(
        "queue_saturation",
        Fault::QueueSaturation,
        5,
        12,
        &[Rule::QueueSaturation],
    ),
    sc(
        "throughput_drop",
        Fault::ThroughputDrop,
        10,
        15,
        &[Rule::ThroughputDrop],
    ),
    sc("stuck_wave", Fault::StuckWave, 5, 12, &[Rule::StuckWave]),
    sc(
        "cost_concentration",
        Fault::CostConcentration,
        5,
        30,
        &[Rule::CostConcentration],
    ),
    sc(
        "over_provisioned",
        Fault::OverProvisioned,
        5,
        35,
        &[Rule::OverProvisioned],
    ),
    sc(
        "queue_unserved",
        Fault::PoolOutage,
        5,
        12,
        &[Rule::QueueUnserved],
    ),
    sc(
        "failure_slice",
        Fault::FailureSlice,
        20,
        30,
        &[Rule::FailureSlice],
    ),
    sc(
        "tool_failure_rate",
        Fault::ToolDegradation,
        5,
        15,
        &[Rule::ToolFailureRate, Rule::FailureSlice],
    ),
    sc(
        "tool_failure_burst",
        Fault::ToolOutage,
        20,
        25,
        &[Rule::ToolFailureBurst],
    ),
    sc(
        "tokens_jump",
        Fault::ContextInflation,
        40,
        55,
        &[Rule::TokensJump, Rule::CostJump],
    ),
    sc(
        "duration_jump",
        Fault::SlowRuns,
        40,
        55,
        &[Rule::DurationJump],
    ),
    sc("depth_tail", Fault::DeepRuns, 5, 30, &[Rule::DepthTail]),
    sc(
        "behaviour_drift",
        Fault::PromptRegression,
        45,
        62,
        &[Rule::BehaviourDrift],
    ),
    Scenario {
        name: "healthy",
        fault: None,
        onset_min: 0,
        minutes: 65,
        expect: &[],
    },
];

const fn sc(
    name: &'static str,
    fault: Fault,
    onset_min: u64,
    minutes: u64,
    expect: &'static [Rule],
) -> Scenario {
    Scenario {
        name,
        fault: Some(fault),
        onset_min,
        minutes,
        expect,
    }
}

impl Scenario {
    /// The fault in force at second `sec` of the run: from the onset, for as long as it
    /// lasts.
    pub fn fault_at(&self, sec: u64) -> Option<Fault> {
        let onset_s = self.onset_min * 60;
        self.fault.filter(|f| {
            sec >= onset_s && f.lasts_s().is_none_or(|d| sec < onset_s.saturating_add(d))
        })
    }
}

/// One alert that fired.
#[derive(Clone, Debug)]
pub struct Fired {
    pub rule: Rule,
    pub labels: BTreeMap<String, String>,
    pub message: String,
    /// Seconds after the start of the run.
    pub at_s: u64,
    /// A `stuck_agent` alert: how long the run's silence had been past its threshold (the
    /// policy's `active_duration_multiple` × the run's expected duration, as that stood at
    /// each tick) when it fired, in ms; 0 when it fired on something else. In process only.
    pub past_threshold_ms: Option<u64>,
}

/// How a scenario went.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub scenario: Scenario,
    pub agents: usize,
    pub seed: u64,
    /// Every alert that fired, in order.
    pub fired: Vec<Fired>,
    /// The first expected alert after the onset, and seconds from the onset to it.
    pub detection: Option<(Fired, u64)>,
    /// Alerts before the onset (a healthy run: every alert): false alarms.
    pub false_alarms: Vec<Fired>,
    pub spans: u64,
    pub heartbeats: u64,
    /// Wall-clock seconds the simulation took.
    pub took_s: f64,
}

impl Outcome {
    /// A fault was detected and nothing fired before it; a healthy run raised nothing.
    pub fn passed(&self) -> bool {
        self.false_alarms.is_empty() && (self.scenario.fault.is_none() || self.detection.is_some())
    }
}

impl Outcome {
    pub(crate) fn new(scenario: Scenario, agents: usize, seed: u64) -> Self {
        Outcome {
            scenario,
            agents,
            seed,
            fired: Vec::new(),
            detection: None,
            false_alarms: Vec::new(),
            spans: 0,
            heartbeats: 0,
            took_s: 0.0,
        }
    }

    /// Books an alert that fired: a false alarm before the onset (every alert of a healthy
    /// run), the detection if it is the first expected one after it.
    pub fn record(&mut self, f: Fired) {
        let s = self.scenario;
        let onset_s = s.onset_min * 60;
        let after_onset = s.fault.is_some() && f.at_s >= onset_s;
        if !after_onset {
            self.false_alarms.push(f.clone());
        } else if self.detection.is_none() && s.expect.contains(&f.rule) {
            self.detection = Some((f.clone(), f.at_s - onset_s));
        }
        self.fired.push(f);
    }
}

/// The commander's live state and detector, fed the bytes agents send, on the caller's
/// clock: what `run` and the τ-bench replay drive.
pub struct Harness {
    fleet: FleetState,
    detector: Detector,
    spec: AlertSpec,
    pools: BTreeMap<String, PoolConfig>,
    /// Workers whose silent run is past its stuck threshold: the run's task, and when the
    /// silence crossed the threshold in force (`past_threshold_ms` counts from there).
    over_threshold: BTreeMap<String, (String, u64)>,
    /// The time of the last tick.
    last_tick_ms: Option<u64>,
    pub spans: u64,
    pub heartbeats: u64,
}

impl Harness {
    /// A fleet of `pools`, each with `max_queue_depth`, under the `[alerts]` of `spec`.
    pub fn new(pools: &[&str], max_queue_depth: u64, spec: &AlertSpec) -> Result<Self, String> {
        let registry = fleet_commander::hot::fixed(Registry::builtin().map_err(|e| e.to_string())?);
        let pools: BTreeMap<String, PoolConfig> = pools
            .iter()
            .map(|name| {
                (
                    name.to_string(),
                    PoolConfig {
                        max_queue_depth: Some(max_queue_depth),
                        ..Default::default()
                    },
                )
            })
            .collect();
        let fleet = FleetState::new(
            FleetConfig::default(),
            registry,
            pools.keys().map(String::as_str),
        );
        Ok(Harness {
            fleet,
            detector: Detector::new(10_000),
            spec: spec.clone(),
            pools,
            over_threshold: BTreeMap::new(),
            last_tick_ms: None,
            spans: 0,
            heartbeats: 0,
        })
    }

    /// One OTLP/protobuf trace export, through the receivers' limits, prost and the
    /// normaliser, into the live state.
    pub fn feed_traces(&mut self, body: &[u8], now: u64) -> Result<(), String> {
        check_protobuf(Signal::Traces, body, DecodeLimits::default())
            .map_err(|e| format!("a simulated export breaks the OTLP limits: {e}"))?;
        let req = TraceRequest::parse(body)
            .map_err(|e| format!("a simulated export does not decode: {e}"))?;
        let (events, rejected) = normalise::span_events(&req);
        if rejected.count > 0 {
            return Err(format!("spans rejected: {}", rejected.message()));
        }
        self.spans += events.len() as u64;
        self.fleet.apply_spans(events, now);
        Ok(())
    }

    /// One heartbeat, JSON as on the wire.
    pub fn feed_heartbeat(&mut self, body: &[u8], now: u64) -> Result<(), String> {
        let hb: Heartbeat = serde_json::from_slice(body)
            .map_err(|e| format!("a simulated heartbeat does not parse: {e}"))?;
        self.heartbeats += 1;
        self.fleet.apply_heartbeat(&hb, now);
        Ok(())
    }

    /// A pool's queue figures, as the commander reads them from JetStream.
    pub fn feed_queue(&mut self, pool: String, pending: u64, ack_pending: u64, now: u64) {
        self.fleet.apply_task(
            TaskEvent::Queue {
                pool,
                pending,
                ack_pending,
            },
            now,
        );
    }

    /// The fleet's tick and one detector evaluation: the alerts that started firing,
    /// stamped `at_s`.
    pub fn tick(&mut self, now: u64, at_s: u64) -> Vec<Fired> {
        self.fleet.tick(now);
        let snapshot = self.fleet.snapshot(now);
        // As the detector's loop does, on a blocking thread there; here at once.
        if let Some(job) = self.detector.drift_job(&snapshot, &self.spec, now) {
            self.detector.drift_done(job.run());
        }
        self.note_silences(&snapshot, now);
        let fired = self
            .detector
            .tick(&snapshot, &self.spec, &self.pools, now)
            .into_iter()
            .filter(|(change, _)| *change == Change::Firing)
            .map(|(_, alert)| {
                let past_threshold_ms = (alert.rule == Rule::StuckAgent).then(|| {
                    alert
                        .labels
                        .get("worker")
                        .and_then(|id| self.over_threshold.get(id))
                        .map_or(0, |(_, since)| now.saturating_sub(*since))
                });
                Fired {
                    rule: alert.rule,
                    labels: alert.labels.clone(),
                    message: alert.message.clone(),
                    at_s,
                    past_threshold_ms,
                }
            })
            .collect();
        self.last_tick_ms = Some(now);
        fired
    }

    /// Notes when each worker's silent run passed its stuck threshold (the policy's
    /// `active_duration_multiple` × the run's expected duration, at least the floor), as
    /// the threshold stood at each tick. The expected duration is the task type's median,
    /// which moves: measured against the threshold at the firing, a threshold that just
    /// dropped would count seconds in which the run was not yet past it.
    fn note_silences(&mut self, snapshot: &fleet_commander::fleet::view::FleetSnapshot, now: u64) {
        for w in &snapshot.workers {
            self.note_silence(&w.id, w.silent_run.as_ref(), now);
        }
    }

    fn note_silence(&mut self, worker: &str, run: Option<&SilentRun>, now: u64) {
        let multiple = self.spec.active_duration_multiple;
        let over = run.and_then(|r| {
            let excess = r.quiet_ms as f64 - r.limit_ms(multiple);
            (excess > 0.0).then_some((r, excess as u64))
        });
        match over {
            Some((r, excess)) => {
                let known = self
                    .over_threshold
                    .get(worker)
                    .is_some_and(|(task, _)| *task == r.task_id);
                if !known {
                    // Crossed since the last tick, when it was still under.
                    let since = now
                        .saturating_sub(excess)
                        .max(self.last_tick_ms.unwrap_or(0));
                    self.over_threshold
                        .insert(worker.to_string(), (r.task_id.clone(), since));
                }
            }
            None if !self.over_threshold.is_empty() => {
                self.over_threshold.remove(worker);
            }
            None => {}
        }
    }
}

/// The `[alerts]` of the policy in `dir` (every `*.policy.toml` there, as the commander
/// reads a policy directory); none: the built-in policy's.
pub fn alert_spec(dir: Option<&std::path::Path>) -> Result<AlertSpec, String> {
    let Some(dir) = dir else {
        return Ok(AlertSpec::default());
    };
    let mut documents = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.to_string_lossy().ends_with(".policy.toml") {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            documents.push(fleet_commander::policy::load::Document {
                name: path.display().to_string(),
                text,
            });
        }
    }
    let registry = Registry::builtin().map_err(|e| e.to_string())?;
    let rubric = fleet_commander::classify::rubric::Rubric::builtin().map_err(|e| e.to_string())?;
    let policy = fleet_commander::policy::load::Policy::parse(
        documents,
        fleet_commander::policy::load::CheckAgainst {
            pools: None,
            registry: &registry,
            rubric: &rubric,
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(policy.alerts)
}

/// Runs one scenario with `agents` agents and `seed`, under the alert thresholds `spec`.
pub fn run(
    scenario: Scenario,
    agents: usize,
    seed: u64,
    spec: &AlertSpec,
) -> Result<Outcome, String> {
    let started = Instant::now();
    let names: Vec<&str> = agents::POOLS.iter().map(|(name, _, _)| *name).collect();
    let mut h = Harness::new(&names, agents::max_queue_depth(agents), spec)?;
    let mut sim = agents::SimFleet::new(agents, seed, scenario.fault);
    let t0 = 1_800_000_000_000u64;
    let mut out = Outcome::new(scenario, agents, seed);
    for sec in 0..scenario.minutes * 60 {
        let now = t0 + sec * 1000;
        let fault = scenario.fault_at(sec);
        let said = sim.step(sec, now, fault);
        for (_, body, _) in &said.traces {
            h.feed_traces(body, now)?;
        }
        for (_, body) in &said.heartbeats {
            h.feed_heartbeat(body, now)?;
        }
        for (pool, pending, ack_pending) in said.queues {
            h.feed_queue(pool, pending, ack_pending, now);
        }
        for f in h.tick(now, sec) {
            out.record(f);
        }
    }
    out.spans = h.spans;
    out.heartbeats = h.heartbeats;
    out.took_s = started.elapsed().as_secs_f64();
    Ok(out)
}

#[derive(clap::Args)]
pub struct ScenarioArgs {
    /// A scenario's name (`fleet-sim scenario list` names them), or `all`.
    name: String,
    /// Simulated agents.
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    /// The seed of the simulated fleet (of the first run).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs per scenario, with seeds `seed`, `seed + 1` …, spread over the machine's cores:
    /// more than one prints each scenario's detection rate (Wilson 95 % interval), time to
    /// detect and false alarms per fleet-hour instead of each run.
    #[arg(long, default_value_t = 1)]
    runs: u64,
    /// Run on the real stack instead: a nats-server and the commander binary, fleet time
    /// compressed `--speed` times (one run per scenario).
    #[arg(long)]
    stack: bool,
    /// Fleet seconds per wall second on the stack.
    #[arg(long, default_value_t = 10.0)]
    speed: f64,
    /// The commander binary for `--stack` (default: beside this one).
    #[arg(long)]
    commander: Option<std::path::PathBuf>,
    /// The policy directory: its `[alerts]` in process, the whole policy on the stack (the
    /// lab's escalation ladder); a missing directory means the built-in policy.
    #[arg(long, default_value = "simulations/lab-policies")]
    policy_dir: std::path::PathBuf,
}

/// The scenario that runs on the stack only (`budget.rs`): budgets act on real tasks.
pub const BUDGET_OVERRUN: &str = "budget_overrun";

/// Runs the named scenarios and prints what fired; fails when a fault went undetected or
/// anything fired where it should not have.
#[expect(clippy::print_stdout, reason = "the report is what the command prints")]
pub async fn main(args: ScenarioArgs) -> Result<(), String> {
    if args.name == "list" {
        for s in SCENARIOS {
            println!(
                "{:<22} {}",
                s.name,
                s.fault.map_or("no fault".to_string(), |f| format!("{f:?}"))
            );
        }
        println!("{BUDGET_OVERRUN:<22} BudgetOverrun (on the stack only)");
        return Ok(());
    }
    if args.name == BUDGET_OVERRUN {
        if !args.stack {
            return Err(format!(
                "{BUDGET_OVERRUN} runs on the stack only (--stack): budgets act on real tasks"
            ));
        }
        return if run_budget(&args).await? {
            Ok(())
        } else {
            Err(format!("failed: {BUDGET_OVERRUN}"))
        };
    }
    let chosen: Vec<Scenario> = SCENARIOS
        .into_iter()
        .filter(|s| args.name == "all" || s.name == args.name)
        .collect();
    if chosen.is_empty() {
        return Err(format!(
            "no scenario {:?} (`fleet-sim scenario list`)",
            args.name
        ));
    }
    let mut failed = Vec::new();
    let spec = alert_spec(Some(args.policy_dir.as_path()).filter(|p| p.is_dir()))?;
    if args.stack {
        let opts = stack::StackOptions {
            speed: args.speed,
            bin: args.commander.clone(),
            policy_dir: Some(args.policy_dir.clone()).filter(|p| p.is_dir()),
        };
        for s in chosen {
            if let Some(why) = stack::unsupported(s.fault) {
                println!("SKIP {} — in process only: {why}", s.name);
                continue;
            }
            let (o, f) = stack::run(s, args.agents, args.seed, &opts).await?;
            print_outcome(&o);
            stack::print_figures(&f);
            if !o.passed() {
                failed.push(s.name);
            }
        }
        if args.name == "all" && !run_budget(&args).await? {
            failed.push(BUDGET_OVERRUN);
        }
        return if failed.is_empty() {
            Ok(())
        } else {
            Err(format!("failed: {}", failed.join(", ")))
        };
    }
    for s in chosen {
        let outcomes = runs_of(s, args.agents, args.seed, args.runs.max(1), &spec)?;
        if let [o] = outcomes.as_slice() {
            print_outcome(o);
        } else {
            print_rates(&s, &outcomes);
        }
        if outcomes.iter().any(|o| !o.passed()) {
            failed.push(s.name);
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("failed: {}", failed.join(", ")))
    }
}

/// Runs `s` on seeds `seed..seed + n`, on every core.
pub fn runs_of(
    s: Scenario,
    agents: usize,
    seed: u64,
    n: u64,
    spec: &AlertSpec,
) -> Result<Vec<Outcome>, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let bar = progress(n, s.name, "runs");
    let results: Vec<Result<Vec<Outcome>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let bar = bar.clone();
                scope.spawn(move || {
                    (0..n)
                        .filter(|k| k % threads == t)
                        .map(|k| {
                            let o = run(s, agents, seed + k, spec);
                            bar.inc(1);
                            o
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a run panicked".into())))
            .collect()
    });
    bar.finish_and_clear();
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    all.sort_by_key(|o| o.seed);
    Ok(all)
}

/// A progress bar on stderr for a long run: `len` steps of `unit` (runs, fleet seconds),
/// named `what`. indicatif draws it only on a terminal, so logs and CI output stay clean.
pub fn progress(len: u64, what: &str, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let template =
        format!("{{msg:24}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{elapsed}}, {{eta}} left)");
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// The budget overrun on the stack, printed; whether it passed.
async fn run_budget(args: &ScenarioArgs) -> Result<bool, String> {
    let o = budget::run(&budget::BudgetOptions {
        speed: args.speed,
        bin: args.commander.clone(),
        seed: args.seed,
        ..Default::default()
    })
    .await?;
    budget::print(&o);
    Ok(o.passed())
}

/// The `p` quantile of sorted `xs` (the nearest rank); `None` when empty.
pub(crate) fn quantile(xs: &[u64], p: f64) -> Option<u64> {
    if xs.is_empty() {
        return None;
    }
    let k = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs.get(k).copied()
}

/// Wilson score interval (95 %) for `k` successes in `n` trials.
pub(crate) fn wilson(k: u64, n: u64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n, z) = (k as f64, n as f64, 1.96f64);
    let p = k / n;
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z * ((p * (1.0 - p) + z * z / (4.0 * n)) / n).sqrt() / (1.0 + z * z / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[expect(clippy::print_stdout, reason = "the report is what the command prints")]
fn print_rates(s: &Scenario, outcomes: &[Outcome]) {
    let n = outcomes.len() as u64;
    let clean_min = if s.fault.is_some() {
        s.onset_min
    } else {
        s.minutes
    };
    let hours = n as f64 * clean_min as f64 / 60.0;
    let false_alarms: usize = outcomes.iter().map(|o| o.false_alarms.len()).sum();
    let runs_with_false_alarm = outcomes
        .iter()
        .filter(|o| !o.false_alarms.is_empty())
        .count();
    let took: f64 = outcomes.iter().map(|o| o.took_s).sum();
    print!(
        "{:<22} {n} runs of {} agents ({took:.1} s): ",
        s.name, outcomes[0].agents
    );
    if s.fault.is_some() {
        let mut ttd: Vec<u64> = outcomes
            .iter()
            .filter_map(|o| o.detection.as_ref().map(|(_, t)| *t))
            .collect();
        ttd.sort_unstable();
        let k = ttd.len() as u64;
        let (lo, hi) = wilson(k, n);
        print!(
            "detected {k}/{n} ({:.0}%, 95% CI {:.0}-{:.0}%), time to detect median {} s, p95 {} s; ",
            k as f64 * 100.0 / n as f64,
            lo * 100.0,
            hi * 100.0,
            quantile(&ttd, 0.5).map_or("-".into(), |v| v.to_string()),
            quantile(&ttd, 0.95).map_or("-".into(), |v| v.to_string()),
        );
        let mut past: Vec<u64> = outcomes
            .iter()
            .filter_map(|o| o.detection.as_ref()?.0.past_threshold_ms)
            .collect();
        past.sort_unstable();
        if let (Some(median), Some(worst)) = (quantile(&past, 0.5), past.last()) {
            print!(
                "silence past the threshold when it fired median {median} ms, worst {worst} ms; "
            );
        }
    }
    println!(
        "false alarms {false_alarms}, in {runs_with_false_alarm} of {n} runs ({:.2} per fleet-hour before any fault)",
        false_alarms as f64 / hours.max(1e-9)
    );
    for o in outcomes
        .iter()
        .filter(|o| !o.false_alarms.is_empty())
        .take(3)
    {
        for a in o.false_alarms.iter().take(2) {
            println!(
                "    seed {}: {} {:?} at {} s",
                o.seed,
                a.rule.as_str(),
                a.labels,
                a.at_s
            );
        }
    }
}

#[expect(clippy::print_stdout, reason = "the report is what the command prints")]
fn print_outcome(o: &Outcome) {
    let s = &o.scenario;
    let verdict = if o.passed() { "PASS" } else { "FAIL" };
    println!(
        "{verdict} {} — {} agents, seed {}, {} simulated minutes in {:.1} s ({} spans, {} heartbeats)",
        s.name, o.agents, o.seed, s.minutes, o.took_s, o.spans, o.heartbeats
    );
    match (s.fault, &o.detection) {
        (Some(f), Some((a, ttd))) => println!(
            "  fault {f:?} at minute {}: {} fired {ttd} s later {:?}\n  \"{}\"",
            s.onset_min,
            a.rule.as_str(),
            a.labels,
            a.message
        ),
        (Some(f), None) => println!(
            "  fault {f:?} at minute {}: NOT detected (expected {})",
            s.onset_min,
            s.expect
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(" or ")
        ),
        (None, _) => println!("  no fault"),
    }
    for a in &o.false_alarms {
        println!(
            "  false alarm at {} s: {} {:?}: {}",
            a.at_s,
            a.rule.as_str(),
            a.labels,
            a.message
        );
    }
    // By rule, in the order they first fired: a stuck wave fires for hundreds of agents.
    let mut others: Vec<(Rule, Vec<String>)> = Vec::new();
    for a in o
        .fired
        .iter()
        .filter(|a| a.at_s >= s.onset_min * 60 && s.fault.is_some())
        .filter(|a| {
            o.detection
                .as_ref()
                .is_none_or(|(d, _)| d.at_s != a.at_s || d.rule != a.rule)
        })
    {
        let labels = format!("{:?}", a.labels);
        match others.iter_mut().find(|(r, _)| *r == a.rule) {
            Some((_, seen)) => seen.push(labels),
            None => others.push((a.rule, vec![labels])),
        }
    }
    let others: Vec<String> = others
        .iter()
        .map(|(rule, labels)| {
            let shown = labels
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            match labels.len() {
                n if n > 3 => format!("{} x{n} ({shown} ...)", rule.as_str()),
                n if n > 1 => format!("{} x{n} ({shown})", rule.as_str()),
                _ => format!("{} {shown}", rule.as_str()),
            }
        })
        .collect();
    if !others.is_empty() {
        println!("  also fired after the onset: {}", others.join("; "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every detector's scenario, small and seeded: the fault is detected and nothing
    /// fires before it; the healthy hour raises nothing.
    #[test]
    fn every_scenario_detects_its_fault_and_the_healthy_run_is_quiet() {
        let mut failed = Vec::new();
        for s in SCENARIOS {
            let o = run(s, 36, 1, &AlertSpec::default())
                .expect("the simulated fleet speaks the protocol");
            if !o.passed() {
                failed.push(format!(
                    "{}: detection {:?}, false alarms {:?}",
                    s.name,
                    o.detection.map(|(a, t)| (a.rule, t)),
                    o.false_alarms
                        .iter()
                        .map(|a| (a.rule, a.labels.clone(), a.at_s))
                        .collect::<Vec<_>>()
                ));
            }
            assert!(o.spans > 0 && o.heartbeats > 0);
        }
        assert!(failed.is_empty(), "{failed:#?}");
    }

    #[test]
    fn a_fleet_without_the_fault_misses_nothing_it_should_not() {
        // The fault matters: the same seed without it raises none of its rules.
        let s = SCENARIOS[3];
        assert_eq!(s.name, "token_loop");
        let o = run(Scenario { fault: None, ..s }, 36, 1, &AlertSpec::default()).unwrap();
        assert!(
            o.fired.iter().all(|a| !s.expect.contains(&a.rule)),
            "{:?}",
            o.fired
        );
    }

    #[test]
    fn a_stuck_run_counts_from_when_it_passed_the_threshold_in_force() {
        let mut h = Harness::new(&["research"], 10, &AlertSpec::default()).unwrap();
        let run = |quiet_s: u64, expected_ms: u64| SilentRun {
            task_id: "t1".into(),
            quiet_ms: quiet_s * 1000,
            expected_ms,
            floor_ms: 0,
        };
        let t0 = 1_000_000;
        // Under 3 × 14.9 s at 44 s; then the type's median drops to 12 s: over 3 × 12 s by
        // 9 s, but only since the last tick, when it was under the threshold then.
        h.note_silence("w", Some(&run(44, 14_900)), t0);
        h.last_tick_ms = Some(t0);
        h.note_silence("w", Some(&run(45, 12_000)), t0 + 1000);
        h.last_tick_ms = Some(t0 + 1000);
        assert_eq!(h.over_threshold.get("w"), Some(&("t1".to_string(), t0)));
        // Still over a tick later: the crossing stays where it was.
        h.note_silence("w", Some(&run(46, 12_000)), t0 + 2000);
        assert_eq!(h.over_threshold.get("w"), Some(&("t1".to_string(), t0)));
        // Over by 2.5 s, but the last tick (1 s before) saw it under.
        h.note_silence("v", Some(&run(40, 12_500)), t0 + 2000);
        assert_eq!(
            h.over_threshold.get("v"),
            Some(&("t1".to_string(), t0 + 1000))
        );
        // Over by 0.5 s: since then.
        h.note_silence("u", Some(&run(38, 12_500)), t0 + 2000);
        assert_eq!(
            h.over_threshold.get("u"),
            Some(&("t1".to_string(), t0 + 1500))
        );
        // A span ends the silence.
        h.note_silence("w", Some(&run(0, 12_000)), t0 + 3000);
        assert_eq!(h.over_threshold.get("w"), None);
    }

    #[test]
    fn wilson_intervals_are_the_textbook_ones() {
        let (lo, hi) = wilson(20, 20);
        assert!(
            (lo - 0.8389).abs() < 1e-3 && (hi - 1.0).abs() < 1e-9,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson(0, 10);
        assert!(lo == 0.0 && (hi - 0.2775).abs() < 1e-3, "{lo} {hi}");
    }
}
