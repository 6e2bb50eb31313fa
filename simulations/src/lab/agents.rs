//! Simulated agents: what each does every simulated second, as the wire would carry it.
//! Each pool has a queue fed by seeded Poisson arrivals; an idle agent takes the next task
//! and runs it step by step (an LLM call whose context grows, then a tool call), and ends
//! it with the run's process span. Spans leave in OTLP/protobuf batches every 2 s per
//! agent, as an SDK exporter sends them; heartbeats every 5 s, as protocol.md JSON. A
//! fault changes what some agents do from its onset.

use bytes::Bytes;
use fleet_worker::message::{Heartbeat, WorkerState};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;

use super::Fault;
use crate::otlp::{i as int, s};

/// A pool's `max_queue_depth` in a fleet of `agents`: 100, or twice the pool's agents when
/// that is more (the commander counts tasks in flight against it, and a third of a large
/// fleet is more than 100 busy agents).
pub fn max_queue_depth(agents: usize) -> u64 {
    (2 * agents.div_ceil(POOLS.len()) as u64).max(100)
}

/// Pools of the simulated fleet: name, task type, model; `max_queue_depth` as above.
pub const POOLS: [(&str, &str, &str); 3] = [
    ("research", "research", "gpt-4o"),
    ("code", "code_review", "claude-sonnet-4-5"),
    ("docs", "summarisation", "gpt-4o-mini"),
];
/// The healthy tool mix: (tool, share of calls).
const TOOLS: [(&str, f64); 4] = [
    ("web_search", 0.30),
    ("read_page", 0.40),
    ("run_code", 0.15),
    ("summarise", 0.15),
];
/// A pool's arrivals per second, as a share of what its agents can serve.
const LOAD: f64 = 0.7;
/// Seconds per step (an LLM call of 2 s, then a tool call of 1 s).
const STEP_S: u64 = 3;

/// A seeded generator (SplitMix64): the same seed, the same fleet.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// Poisson(λ) by inversion (λ is small here).
    pub fn poisson(&mut self, lambda: f64) -> u64 {
        let (l, mut k, mut p) = ((-lambda).exp(), 0u64, 1.0);
        loop {
            p *= self.unit();
            if p <= l || k > 1_000 {
                return k;
            }
            k += 1;
        }
    }
}

#[derive(Debug)]
struct Run {
    task_id: String,
    trace: [u8; 16],
    /// The run's process span (sent last, when the run ends): every call's parent.
    root: u64,
    started_ms: u64,
    steps: u32,
    done: u32,
    next_ms: u64,
    context: u64,
    failed: bool,
}

#[derive(Debug)]
struct Agent {
    id: String,
    pool: usize,
    variant: &'static str,
    team: &'static str,
    run: Option<Run>,
    /// Spans waiting for the next export.
    spans: Vec<Span>,
    completed: u64,
    failed: u64,
    /// This agent is one the fault hits.
    faulty: bool,
    /// A stuck agent's run goes silent: no span, heartbeats go on.
    silent: bool,
    /// What the control commands it obeyed left it doing.
    mode: Mode,
    /// Tokens its LLM calls have used.
    tokens: u64,
}

/// An agent's mode, as control commands set it (protocol.md §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Running,
    Paused,
    Draining,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Running => "running",
            Mode::Paused => "paused",
            Mode::Draining => "draining",
        }
    }
}

/// A control command a simulated agent obeys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Pause,
    Drain,
    Resume,
    /// Abort the run of this task; it ends failed.
    Cancel(String),
    /// Abort the run of this task and hand it back to the pool's queue.
    Restart(String),
    Status,
}

impl Command {
    /// The command named `name` (with its task id where it takes one).
    pub fn parse(name: &str, task_id: Option<&str>) -> Option<Self> {
        Some(match (name, task_id) {
            ("pause", _) => Command::Pause,
            ("drain", _) => Command::Drain,
            ("resume", _) => Command::Resume,
            ("status", _) => Command::Status,
            ("cancel", Some(t)) => Command::Cancel(t.to_string()),
            ("restart", Some(t)) => Command::Restart(t.to_string()),
            _ => return None,
        })
    }

    /// The mode it leaves an agent in that was in `before`.
    pub fn mode_after(&self, before: Mode) -> Mode {
        match self {
            Command::Pause => Mode::Paused,
            Command::Drain => Mode::Draining,
            Command::Resume => Mode::Running,
            _ => before,
        }
    }
}

#[derive(Debug)]
struct PoolSim {
    queue: u64,
    agents: usize,
}

/// What the fleet said in one simulated second.
#[derive(Debug, Default)]
pub struct Said {
    /// OTLP `ExportTraceServiceRequest`s, protobuf-encoded: (agent, export, spans in it).
    pub traces: Vec<(usize, Bytes, u64)>,
    /// Heartbeats, JSON as on the wire: (agent, heartbeat).
    pub heartbeats: Vec<(usize, Vec<u8>)>,
    /// (pool, pending, ack pending) as the commander reads them from JetStream.
    pub queues: Vec<(String, u64, u64)>,
}

/// The simulated fleet.
#[derive(Debug)]
pub struct SimFleet {
    agents: Vec<Agent>,
    pools: Vec<PoolSim>,
    rng: Rng,
    seq: u64,
    tasks: u64,
    heartbeats: u64,
}

impl SimFleet {
    /// `n` agents spread over the pools; the fault (if any) hits `hit(n)` of them.
    pub fn new(n: usize, seed: u64, fault: Option<Fault>) -> Self {
        let mut rng = Rng::new(seed);
        let hit = fault.map_or(0, |f| f.agents_hit(n));
        let agents: Vec<Agent> = (0..n)
            .map(|i| Agent {
                id: format!("sim-{i:04}"),
                pool: i % POOLS.len(),
                variant: if i % 2 == 0 { "v6" } else { "v7" },
                team: ["search", "ads", "support"][(i / 3) % 3],
                run: None,
                spans: Vec::new(),
                completed: 0,
                failed: 0,
                faulty: i < hit,
                silent: false,
                mode: Mode::Running,
                tokens: 0,
            })
            .collect();
        let pools = (0..POOLS.len())
            .map(|p| PoolSim {
                queue: 0,
                agents: agents.iter().filter(|a| a.pool == p).count(),
            })
            .collect();
        let seq = rng.next() % 1_000;
        SimFleet {
            agents,
            pools,
            rng,
            seq,
            tasks: 0,
            heartbeats: 0,
        }
    }

    /// Agent `i`'s id and pool.
    pub fn who(&self, i: usize) -> (&str, &'static str) {
        let a = &self.agents[i];
        (&a.id, POOLS[a.pool].0)
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        let i: usize = id.strip_prefix("sim-")?.parse().ok()?;
        (i < self.agents.len()).then_some(i)
    }

    /// Whether `target` (a worker id, or text naming one) is an agent the fault hits.
    pub fn is_hit(&self, target: &str) -> bool {
        self.agents.iter().filter(|a| a.faulty).any(|a| {
            target
                .split(|c: char| !(c.is_alphanumeric() || c == '-'))
                .any(|w| w == a.id)
        })
    }

    /// Tokens used so far by the agents the fault hits.
    pub fn hit_tokens(&self) -> u64 {
        self.agents
            .iter()
            .filter(|a| a.faulty)
            .map(|a| a.tokens)
            .sum()
    }

    pub fn heartbeats_sent(&self) -> u64 {
        self.heartbeats
    }

    /// Agent `worker` obeys `cmd` (protocol.md §10): pause and drain stop it taking new
    /// tasks, resume lets it again, cancel ends its run failed, restart hands its task back
    /// to the pool's queue. False when there is no such agent or nothing to do.
    pub fn obey(&mut self, worker: &str, cmd: &Command, now_ms: u64) -> bool {
        let Some(i) = self.index_of(worker) else {
            return false;
        };
        let running = |a: &Agent, t: &str| a.run.as_ref().is_some_and(|r| r.task_id == t);
        match cmd {
            Command::Cancel(t) if running(&self.agents[i], t) => {
                if let Some(mut run) = self.agents[i].run.take() {
                    run.failed = true;
                    self.agents[i].silent = false;
                    self.end_run(i, &run, now_ms);
                }
            }
            Command::Restart(t) if running(&self.agents[i], t) => {
                self.agents[i].run = None;
                self.agents[i].silent = false;
                self.pools[self.agents[i].pool].queue += 1;
            }
            Command::Cancel(_) | Command::Restart(_) | Command::Status => return false,
            _ => {
                let a = &mut self.agents[i];
                a.mode = cmd.mode_after(a.mode);
            }
        }
        true
    }

    /// One simulated second at `now_ms`; `fault` is the fault in force (past its onset).
    pub fn step(&mut self, sec: u64, now_ms: u64, fault: Option<Fault>) -> Said {
        let mut said = Said::default();
        self.arrivals(fault);
        for i in 0..self.agents.len() {
            if fault == Some(Fault::PoolOutage) && self.agents[i].pool == 0 {
                self.crash(i);
                continue;
            }
            self.step_agent(i, now_ms, fault);
            let a = &self.agents[i];
            if (sec + i as u64).is_multiple_of(2) && !a.spans.is_empty() {
                let spans = a.spans.len() as u64;
                said.traces.push((i, self.export(i), spans));
            }
            if (sec + i as u64).is_multiple_of(5) {
                self.heartbeats += 1;
                said.heartbeats.push((i, self.heartbeat(i, now_ms)));
            }
        }
        if sec.is_multiple_of(5) {
            for (p, pool) in self.pools.iter().enumerate() {
                let busy = self
                    .agents
                    .iter()
                    .filter(|a| a.pool == p && a.run.is_some())
                    .count() as u64;
                said.queues.push((POOLS[p].0.to_string(), pool.queue, busy));
            }
        }
        said
    }

    /// A crashed agent says nothing more; its run (if any) is handed out again.
    fn crash(&mut self, i: usize) {
        let agent = &mut self.agents[i];
        agent.spans.clear();
        agent.silent = false;
        if agent.run.take().is_some() {
            self.pools[agent.pool].queue += 1;
        }
    }

    fn arrivals(&mut self, fault: Option<Fault>) {
        for p in 0..self.pools.len() {
            // An agent serves one task per (mean steps 4.5 × STEP_S) seconds.
            let capacity = self.pools[p].agents as f64 / (4.5 * STEP_S as f64);
            let load = match fault {
                Some(Fault::QueueSaturation) if p == 0 => 3.0,
                Some(Fault::OverProvisioned) if p == 0 => 0.05,
                _ => LOAD,
            };
            let n = self.rng.poisson(capacity * load);
            let q = &mut self.pools[p].queue;
            *q = (*q + n).min(10_000);
        }
    }

    fn step_agent(&mut self, i: usize, now_ms: u64, fault: Option<Fault>) {
        let faulty = self.agents[i].faulty && fault.is_some();
        if self.agents[i].run.is_none() {
            let pool = self.agents[i].pool;
            // Paused or draining: it takes nothing new.
            if self.pools[pool].queue == 0 || self.agents[i].mode != Mode::Running {
                return;
            }
            self.pools[pool].queue -= 1;
            self.tasks += 1;
            let mut steps = self.rng.between(3, 6) as u32;
            if faulty && fault == Some(Fault::DeepRuns) && self.rng.unit() < 0.2 {
                steps *= 6;
            }
            let mut trace = [0u8; 16];
            trace[..8].copy_from_slice(&self.rng.next().to_be_bytes());
            trace[8..].copy_from_slice(&self.tasks.to_be_bytes());
            let failed = self.rng.unit() < 0.01
                || (fault == Some(Fault::ErrorSpike) && self.rng.unit() < 0.15);
            self.seq += 1;
            self.agents[i].run = Some(Run {
                task_id: format!("task-{}", self.tasks),
                trace,
                root: self.seq,
                started_ms: now_ms,
                steps,
                done: 0,
                next_ms: now_ms + STEP_S * 1000,
                context: 2_000,
                failed,
            });
            return;
        }
        if self.agents[i].silent {
            return;
        }
        let due = self.agents[i]
            .run
            .as_ref()
            .is_some_and(|r| now_ms >= r.next_ms);
        if due {
            self.one_step(i, now_ms, if faulty { fault } else { None }, fault);
        }
    }

    /// One step of agent `i`'s run: an LLM call and a tool call; the last one ends the run.
    fn one_step(&mut self, i: usize, now_ms: u64, mine: Option<Fault>, fleet: Option<Fault>) {
        let pool_model = POOLS[self.agents[i].pool].2;
        let model = match mine {
            Some(Fault::CostConcentration) => "claude-opus-4-1",
            _ => pool_model,
        };
        let variant = self.agents[i].variant;
        let Some(mut run) = self.agents[i].run.take() else {
            return;
        };
        run.done += 1;
        let (llm, llm_end, tokens) = self.llm_call(&mut run, model, variant, now_ms, (mine, fleet));
        self.agents[i].tokens += tokens;
        // The concentrating agent fans each step out to parallel calls, as a map-reduce
        // agent does: enough of them that it spends about half the fleet's money at any
        // fleet size (what `cost_concentration` looks for; one call per step reaches 40 %
        // only below about 50 agents).
        if mine == Some(Fault::CostConcentration) {
            for _ in 1..concentration_fan_out(self.agents.len()) {
                let (call, _, tokens) =
                    self.llm_call(&mut run, model, variant, now_ms, (mine, fleet));
                self.agents[i].tokens += tokens;
                self.agents[i].spans.push(call);
            }
        }
        let tool = self.pick_tool(variant, mine, fleet);
        let args = match mine {
            Some(Fault::ToolLoop) => r#"{"query": "the same question"}"#.to_string(),
            _ => format!(r#"{{"query": "q{}"}}"#, self.rng.next() % 1_000_000),
        };
        let tool_fails = self.rng.unit()
            < match (fleet, tool, variant) {
                _ if mine == Some(Fault::ToolOutage) => 1.0,
                (Some(Fault::FailureSlice), "web_search", "v7") => 0.6,
                (Some(Fault::ToolDegradation), "run_code", _) => 0.5,
                (Some(Fault::ErrorSpike), _, _) => 0.25,
                _ => 0.02,
            };
        let tool_span = self.span(
            &run,
            &format!("execute_tool {tool}"),
            1,
            (llm_end, now_ms),
            vec![
                s("gen_ai.operation.name", "execute_tool"),
                s("gen_ai.tool.name", tool),
                s("gen_ai.tool.call.arguments", &args),
            ],
            tool_fails,
        );
        let agent = &mut self.agents[i];
        agent.spans.push(llm);
        agent.spans.push(tool_span);
        // A looping agent does not finish its run.
        let loops = matches!(mine, Some(Fault::ToolLoop | Fault::TokenLoop)) && run.done < 40;
        if run.done >= run.steps && !loops {
            self.end_run(i, &run, now_ms);
            return;
        }
        let slow = mine == Some(Fault::SlowRuns) || mine == Some(Fault::CostConcentration);
        run.next_ms = now_ms + STEP_S * 1000 * if slow { 4 } else { 1 };
        // A stuck agent's spans stop mid-run (its heartbeats go on).
        if matches!(mine, Some(Fault::StuckAgent | Fault::StuckWave)) {
            self.agents[i].silent = true;
        }
        self.agents[i].run = Some(run);
    }

    /// The step's LLM call (its tokens as the faults in force make them), and when it
    /// ended.
    fn llm_call(
        &mut self,
        run: &mut Run,
        model: &str,
        variant: &str,
        now_ms: u64,
        (mine, fleet): (Option<Fault>, Option<Fault>),
    ) -> (Span, u64, u64) {
        let mut input = run.context + self.rng.between(0, 400);
        let mut output = self.rng.between(150, 300);
        let mut llm_ms = 2_000;
        match mine {
            Some(Fault::ContextFill) => input = 110_000 + self.rng.between(0, 2_000),
            Some(Fault::ContextCritical) => input = 124_000 + self.rng.between(0, 1_500),
            // The context balloons: eight times the input, the output as before (so the
            // cost runs away while the output rate does not look like a token loop).
            Some(Fault::CostRunaway) => input *= 8,
            Some(Fault::TokenLoop) => output = 4_000,
            Some(Fault::CostConcentration) => {
                input = 60_000;
                output = 4_000;
                llm_ms = 12_000;
            }
            _ => {}
        }
        // The OpenAI models slow down (research and docs: two thirds of the fleet).
        if fleet == Some(Fault::ThroughputDrop) && model.starts_with("gpt-4o") {
            output /= 3;
        }
        if fleet == Some(Fault::ContextInflation) && variant == "v7" {
            input = input * 2 + 4_000;
        }
        run.context = (run.context + self.rng.between(1_000, 2_500)).min(60_000);
        let step_start = now_ms.saturating_sub(STEP_S * 1000);
        let llm_end = step_start + llm_ms.min(STEP_S * 1000 - 500);
        let span = self.span(
            run,
            &format!("chat {model}"),
            3,
            (step_start, llm_end),
            vec![
                s("gen_ai.operation.name", "chat"),
                s("gen_ai.provider.name", "openai"),
                s("gen_ai.request.model", model),
                s("gen_ai.response.model", model),
                int("gen_ai.usage.input_tokens", input as i64),
                int("gen_ai.usage.output_tokens", output as i64),
            ],
            false,
        );
        (span, llm_end, input + output)
    }

    /// Agent `i`'s run ends: its process span (the root) goes out with its status.
    fn end_run(&mut self, i: usize, run: &Run, now_ms: u64) {
        let pool = self.agents[i].pool;
        let root = self.span(
            run,
            &format!("process fleet.work.{}", POOLS[pool].0),
            5,
            (run.started_ms, now_ms),
            vec![
                s("messaging.system", "nats"),
                s("messaging.operation.type", "process"),
                s("fleet.pool", POOLS[pool].0),
                s("fleet.task.type", POOLS[pool].1),
            ],
            run.failed,
        );
        let agent = &mut self.agents[i];
        agent.spans.push(root);
        if run.failed {
            agent.failed += 1;
        } else {
            agent.completed += 1;
        }
    }

    fn pick_tool(
        &mut self,
        variant: &str,
        mine: Option<Fault>,
        fleet: Option<Fault>,
    ) -> &'static str {
        if mine == Some(Fault::ToolLoop) {
            return "web_search";
        }
        if mine == Some(Fault::ToolOutage) {
            return "run_code";
        }
        // A prompt regression: v7's agents search instead of reading, and every run
        // still succeeds.
        let shifted = fleet == Some(Fault::PromptRegression) && variant == "v7";
        let mix: [(&str, f64); 4] = if shifted {
            [
                ("web_search", 0.55),
                ("read_page", 0.15),
                ("run_code", 0.15),
                ("summarise", 0.15),
            ]
        } else {
            TOOLS
        };
        let u = self.rng.unit();
        let mut acc = 0.0;
        for (t, w) in mix {
            acc += w;
            if u < acc {
                return t;
            }
        }
        "summarise"
    }

    fn span(
        &mut self,
        run: &Run,
        name: &str,
        kind: i32,
        (start_ms, end_ms): (u64, u64),
        mut attributes: Vec<KeyValue>,
        error: bool,
    ) -> Span {
        attributes.push(s("fleet.task.id", &run.task_id));
        // The process span is the run's root; the calls are its children.
        let (id, parent) = if kind == 5 {
            (run.root, None)
        } else {
            self.seq += 1;
            (self.seq, Some(run.root))
        };
        crate::otlp::SpanOf {
            trace: &run.trace,
            id,
            parent,
            name,
            kind,
            start_ms,
            end_ms,
            attributes,
            failed: error,
        }
        .build()
    }

    /// Agent `i`'s waiting spans as one OTLP export (its resource says who it is).
    fn export(&mut self, i: usize) -> Bytes {
        let a = &mut self.agents[i];
        let (_, task_type, _) = POOLS[a.pool];
        let mut spans = std::mem::take(&mut a.spans);
        for sp in &mut spans {
            sp.attributes.push(s("prompt_variant", a.variant));
            sp.attributes.push(s("team", a.team));
            if !sp.attributes.iter().any(|kv| kv.key == "fleet.task.type") {
                sp.attributes.push(s("fleet.task.type", task_type));
            }
        }
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        s("service.name", "sim-agent"),
                        s("fleet.worker.id", &a.id),
                        s("fleet.pool", POOLS[a.pool].0),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        Bytes::from(req.encode_to_vec())
    }

    fn heartbeat(&self, i: usize, now_ms: u64) -> Vec<u8> {
        let a = &self.agents[i];
        let at = humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(now_ms),
        )
        .to_string();
        let hb = Heartbeat {
            schema: 1,
            worker_id: a.id.clone(),
            pool: POOLS[a.pool].0.to_string(),
            state: match (a.mode, a.run.is_some()) {
                (Mode::Paused, _) => WorkerState::Paused,
                (Mode::Draining, _) => WorkerState::Draining,
                (Mode::Running, true) => WorkerState::Active,
                (Mode::Running, false) => WorkerState::Idle,
            },
            model: Some(POOLS[a.pool].2.to_string()),
            current_tasks: a.run.iter().map(|r| r.task_id.clone()).collect(),
            max_in_flight: 1,
            context_tokens: None,
            capabilities: Vec::new(),
            completed: a.completed,
            failed: a.failed,
            sdk_version: Some("sim".into()),
            started_at: at.clone(),
            sent_at: at,
        };
        serde_json::to_vec(&hb).unwrap_or_default()
    }
}

/// Parallel calls per step of the `CostConcentration` agent in a fleet of `n`: one such
/// call costs about 27 times a healthy agent's step, so ⌈(n − 1) / 27⌉ of them make it
/// spend as much as the other `n − 1` together (a share near 55 % over the fault's hour).
fn concentration_fan_out(n: usize) -> usize {
    n.saturating_sub(1).div_ceil(27).max(1)
}
