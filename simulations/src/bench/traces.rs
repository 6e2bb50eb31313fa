//! Trace keeping benchmarks.
//!
//! - The trace keeper as `bench ingest` runs it: a real `traces::Keeper` (sled store in a
//!   temporary directory, the built-in policy: 10 % healthy sample, the shipped redaction
//!   rules) on the ingest thread, on a simulated clock.
//! - `fleet-sim bench traces`: the storage cut on a realistic mix. Runs of LLM and tool
//!   calls with a long cost tail, 5 % failing, two agents flagged for ten minutes, go
//!   through the commander's decode path into a real `FleetState` (whose task-type figures
//!   the sampler reads) and a real keeper; once with the built-in policy, once keeping
//!   everything. Prints the share of spans kept, the bytes stored against keeping
//!   everything, and whether every error, tail and flagged trace was kept.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use crate::lab::agents::Rng;
use crate::otlp::{i, s};
use fleet_commander::classify::rubric::Rubric;
use fleet_commander::config::{FleetConfig, TracesConfig};
use fleet_commander::domain::ManualClock;
use fleet_commander::fleet::FleetState;
use fleet_commander::fleet::view::FleetSnapshot;
use fleet_commander::ingest::{TraceBatch, normalise};
use fleet_commander::policy::load::{CheckAgainst, Document, Policy};
use fleet_commander::policy::{PolicyEngine, Start};
use fleet_commander::registry::Registry;
use fleet_commander::route::RoutingTable;
use fleet_commander::store::Store;
use fleet_commander::traces::flags::Flags;
use fleet_commander::traces::store::TraceStore;
use fleet_commander::traces::{Keeper, TraceCounters, Wiring};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

/// A keeper on its own store, under `policy_text` (`None`: the built-in policy).
pub struct Rig {
    pub keeper: Keeper,
    pub clock: Arc<ManualClock>,
    pub store: TraceStore,
    pub flags: Flags,
    pub counters: Arc<TraceCounters>,
    db: Store,
    dir: tempfile::TempDir,
}

impl Rig {
    pub fn new(policy_text: Option<&str>, start_ms: u64) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let store = Store::open(dir.path()).map_err(|e| e.to_string())?;
        let registry = Registry::builtin().map_err(|e| e.to_string())?;
        let rubric = Rubric::builtin().map_err(|e| e.to_string())?;
        let against = CheckAgainst {
            pools: None,
            registry: &registry,
            rubric: &rubric,
        };
        let policy = match policy_text {
            None => Policy::builtin(against),
            Some(text) => Policy::parse(
                vec![Document {
                    name: "bench.policy.toml".into(),
                    text: text.into(),
                }],
                against,
            ),
        }
        .map_err(|e| e.to_string())?;
        let clock = ManualClock::at(start_ms);
        let engine = PolicyEngine::open(
            &store,
            Start {
                routing: RoutingTable {
                    pools: BTreeMap::new(),
                    routing: Default::default(),
                },
                registry,
                registry_file: None,
                rubric,
                rubric_file: None,
                policy,
            },
            clock.clone(),
            100,
            100,
        )
        .map_err(|e| e.to_string())?;
        let trace_store = TraceStore::open(&store).map_err(|e| e.to_string())?;
        let flags = Flags::default();
        let counters = Arc::new(TraceCounters::default());
        let w = Arc::new(Wiring {
            config: TracesConfig::default(),
            store: trace_store.clone(),
            engine,
            flags: flags.clone(),
            exporters: Vec::new(),
            counters: counters.clone(),
            clock: clock.clone(),
            shed: Arc::default(),
            leading: Default::default(),
        });
        Ok(Self {
            keeper: Keeper::new(w),
            clock,
            store: trace_store,
            flags,
            counters,
            db: store,
            dir,
        })
    }

    /// The store made durable, then its size on disk and the files sled wrote for nodes
    /// too large for its log (`blobs/`), which it creates on every rewrite of such a node.
    pub fn on_disk(&self) -> Result<(u64, usize), String> {
        futures::executor::block_on(self.db.flush()).map_err(|e| e.to_string())?;
        let blobs = std::fs::read_dir(self.dir.path().join("blobs")).map_or(0, Iterator::count);
        Ok((super::dir_bytes(self.dir.path()), blobs))
    }

    /// What the ingest path hands the keeper for one export: its bytes and what the
    /// normaliser read of its spans (read here: this bench measures what is kept, not
    /// ingest's speed).
    pub fn add(&mut self, body: bytes::Bytes) {
        if let Some(batch) = TraceBatch::read(body) {
            self.keeper.add(batch);
        }
    }
}

// --- the storage cut -------------------------------------------------------------------

#[derive(clap::Args)]
pub struct TracesArgs {
    /// Task runs in the simulated hour.
    #[arg(long, default_value_t = 20_000)]
    runs: usize,
    /// Agents the runs are spread over.
    #[arg(long, default_value_t = 200)]
    agents: usize,
    /// Share of runs that fail.
    #[arg(long, default_value_t = 0.05)]
    failing: f64,
    /// Spread of an ordinary run's tokens around its type's median (lognormal sigma).
    #[arg(long, default_value_t = 0.5)]
    sigma: f64,
    /// Share of runaway runs (loops): 8-14 calls at 4-20 times the tokens.
    #[arg(long, default_value_t = 0.03)]
    runaway: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The healthy sample (`[sampling] healthy_rate`); unset: the built-in policy's 10 %.
    #[arg(long)]
    healthy_rate: Option<f64>,
    /// Message content each chat call adds to its run's conversation (bytes of text), as
    /// instrumentations that capture content record it: every call sends the whole
    /// history so far, so a run of n calls carries about n²/2 times this. 0: one short
    /// message per call.
    #[arg(long, default_value_t = 0)]
    content_bytes: usize,
}

impl Default for TracesArgs {
    /// The command's defaults (the lab report measures with them).
    fn default() -> Self {
        Self {
            runs: 20_000,
            agents: 200,
            failing: 0.05,
            sigma: 0.5,
            runaway: 0.03,
            seed: 1,
            healthy_rate: None,
            content_bytes: 0,
        }
    }
}

/// What the storage bench measured.
#[derive(Clone, Debug)]
pub struct StorageFigures {
    pub runs: usize,
    pub spans_kept_pct: f64,
    /// Bytes stored under the policy, as a cut against keeping everything (%).
    pub cut_pct: f64,
    /// (kept, all) of the error runs, the flagged runs, the runs above their type's P99.
    pub errors: (usize, usize),
    pub flagged: (usize, usize),
    pub tail: (usize, usize),
}

const TYPES: [&str; 3] = ["qa", "code_review", "summarisation"];
const START_MS: u64 = 1_796_169_600_000;

/// One simulated run and what is true of it.
struct Run {
    trace: [u8; 16],
    error: bool,
    flagged: bool,
    task_type: &'static str,
    agent: usize,
    at_ms: u64,
    request: ExportTraceServiceRequest,
}

/// One step of run `n`: its `c`-th chat call and the tool call after it.
struct Call<'a> {
    trace: &'a [u8; 16],
    n: usize,
    c: u64,
    root_id: &'a [u8],
}

impl Call<'_> {
    fn span(&self, id: u64, name: &str, start: u64, end: u64) -> Span {
        Span {
            trace_id: self.trace.to_vec(),
            span_id: (self.n as u64 * 64 + id).to_be_bytes().to_vec(),
            parent_span_id: self.root_id.to_vec(),
            name: name.into(),
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            ..Default::default()
        }
    }

    /// The chat call from `t`, its tokens `scale` times the median, and its duration;
    /// `history`: the conversation so far, sent along (empty: none).
    fn chat(&self, scale: f64, t: u64, failed: bool, history: &str) -> (Span, u64) {
        let (n, c) = (self.n, self.c);
        let input = (2_000.0 * scale * (1.0 + c as f64)) as i64;
        let output = (300.0 * scale) as i64;
        let dur = 400_000_000 + (output as u64) * 5_000_000;
        let mut span = self.span(2 + c * 2, "chat gpt-4o-mini", t, t + dur);
        span.kind = 3;
        span.attributes = vec![
            s("gen_ai.operation.name", "chat"),
            s("gen_ai.provider.name", "openai"),
            s("gen_ai.request.model", "gpt-4o-mini"),
            i("gen_ai.usage.input_tokens", input),
            i("gen_ai.usage.output_tokens", output),
            s(
                "gen_ai.input.messages",
                format!(
                    r#"[{{"role":"user","parts":[{{"type":"text","content":"Summarise the ticket from jane{n}@example.com about invoice {n} and the call from +1 415 555 {:04}{history}"}}]}}]"#,
                    n % 10_000
                ),
            ),
            s(
                "gen_ai.output.messages",
                r#"[{"role":"assistant","parts":[{"type":"text","content":"The customer asks for a refund of the duplicate charge; escalate to billing."}],"finish_reason":"stop"}]"#,
            ),
        ];
        span.status = failed.then(|| Status {
            code: 2,
            message: "upstream 429".into(),
        });
        (span, dur)
    }

    /// The tool call from `t`, 120 ms long.
    fn tool(&self, t: u64) -> Span {
        let mut span = self.span(
            3 + self.c * 2,
            "execute_tool search_tickets",
            t,
            t + 120_000_000,
        );
        span.attributes = vec![
            s("gen_ai.operation.name", "execute_tool"),
            s("gen_ai.tool.name", "search_tickets"),
            s(
                "gen_ai.tool.call.arguments",
                format!(r#"{{"query":"invoice {}"}}"#, self.n),
            ),
            s("gen_ai.tool.call.result", r#"{"hits":3}"#),
        ];
        span
    }
}

/// A run: a root consumer span, `calls` chat calls (tokens drawn with a long tail) and a
/// tool call after each, with message content as real instrumentations record it.
fn make_run(rng: &mut Rng, n: usize, hour_ms: u64, a: &TracesArgs) -> Run {
    let (agents, failing) = (a.agents, a.failing);
    let mut trace = [0u8; 16];
    trace[..8].copy_from_slice(&rng.next().to_be_bytes());
    trace[8..].copy_from_slice(&rng.next().to_be_bytes());
    let agent = rng.between(0, agents.max(1) as u64 - 1) as usize;
    let task_type = TYPES[n % TYPES.len()];
    let at_ms = START_MS + (n as u64 * hour_ms) / (a.runs.max(1) as u64);
    let error = rng.unit() < failing;
    // Lognormal tokens around the median; a runaway run loops with far bigger contexts.
    let z: f64 = (0..12).map(|_| rng.unit()).sum::<f64>() - 6.0;
    let runaway = rng.unit() < a.runaway;
    let (calls, scale) = if runaway {
        (
            rng.between(8, 14),
            (z * a.sigma).exp() * (4.0 + 16.0 * rng.unit()),
        )
    } else {
        (rng.between(2, 6), (z * a.sigma).exp())
    };
    let start_ns = at_ms * 1_000_000;
    let root_id = (n as u64 * 64 + 1).to_be_bytes().to_vec();
    let mut spans = Vec::new();
    let mut t = start_ns + 1_000_000;
    let mut history = String::new();
    for c in 0..calls {
        let call = Call {
            trace: &trace,
            n,
            c,
            root_id: &root_id,
        };
        add_words(rng, &mut history, a.content_bytes);
        let (chat, dur) = call.chat(scale, t, error && c == calls - 1, &history);
        spans.push(chat);
        t += dur;
        spans.push(call.tool(t));
        t += 120_000_000;
    }
    spans.push(Span {
        trace_id: trace.to_vec(),
        span_id: root_id,
        name: "process fleet.work.support".into(),
        kind: 5,
        start_time_unix_nano: start_ns,
        end_time_unix_nano: t + 1_000_000,
        attributes: vec![
            s("fleet.task.id", format!("task-{n}")),
            s("fleet.task.type", task_type),
        ],
        status: Some(Status {
            code: if error { 2 } else { 1 },
            message: String::new(),
        }),
        ..Default::default()
    });
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    s("service.name", "support-agent"),
                    s("fleet.worker.id", format!("agent-{agent}")),
                    s("fleet.pool", format!("pool{}", agent % 4)),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            schema_url: String::new(),
        }],
    };
    Run {
        trace,
        error,
        flagged: false,
        task_type,
        agent,
        at_ms,
        request,
    }
}

/// Words of a ticketing conversation, for message content that compresses as prose does.
const WORDS: [&str; 48] = [
    "the",
    "customer",
    "invoice",
    "refund",
    "charge",
    "billing",
    "account",
    "ticket",
    "please",
    "order",
    "shipped",
    "delayed",
    "payment",
    "card",
    "declined",
    "duplicate",
    "support",
    "agent",
    "escalate",
    "resolved",
    "pending",
    "review",
    "policy",
    "credit",
    "and",
    "to",
    "for",
    "was",
    "is",
    "on",
    "with",
    "we",
    "they",
    "our",
    "a",
    "of",
    "subscription",
    "renewal",
    "cancel",
    "plan",
    "upgrade",
    "error",
    "message",
    "tool",
    "search",
    "result",
    "summary",
    "thanks",
];

/// Appends about `bytes` of words (never splitting one) to `text`.
fn add_words(rng: &mut Rng, text: &mut String, bytes: usize) {
    let end = text.len() + bytes;
    while text.len() < end {
        text.push(' ');
        text.push_str(WORDS[rng.between(0, WORDS.len() as u64 - 1) as usize]);
    }
}

/// What one pass over the runs kept.
struct Pass {
    kept: HashSet<[u8; 16]>,
    /// Kept traces per reason (a trace kept for several counts under each).
    why: Vec<(&'static str, u64)>,
    spans_kept: u64,
    bytes: u64,
    seconds: f64,
    /// The store's size on disk, and sled's blob files, at the end.
    disk: (u64, usize),
}

fn one_pass(runs: &[Run], policy: Option<&str>, flagged: &[usize]) -> Result<Pass, String> {
    let registry = fleet_commander::hot::fixed(Registry::builtin().map_err(|e| e.to_string())?);
    let mut state = FleetState::new(FleetConfig::default(), registry, std::iter::empty::<&str>());
    let mut rig = Rig::new(policy, START_MS)?;
    let mut snap = FleetSnapshot::default();
    let mut last_snap = 0;
    let started = Instant::now();
    for r in runs {
        rig.clock.set(r.at_ms);
        // Two agents misbehave for ten minutes from minute 20; the detector flags them.
        let minute = (r.at_ms - START_MS) / 60_000;
        if (20..30).contains(&minute) {
            for a in flagged {
                rig.flags.flag_worker(
                    &format!("agent-{a}"),
                    "tool_loop",
                    START_MS + 20 * 60_000,
                    r.at_ms + 2_000,
                );
            }
        }
        let body = bytes::Bytes::from(prost::Message::encode_to_vec(&r.request));
        // The body as ingest reads it: encoded once, for the keeper and the live state.
        let (events, _) = normalise::wire::TraceRequest::parse(&body)
            .map(|req| normalise::span_events(&req))
            .map_err(|e| e.to_string())?;
        state.apply_spans(events, r.at_ms);
        rig.add(body);
        if r.at_ms >= last_snap + 1_000 {
            snap = state.snapshot(r.at_ms);
            last_snap = r.at_ms;
        }
        rig.keeper.tick(&snap);
    }
    rig.clock
        .set(runs.last().map_or(START_MS, |r| r.at_ms) + 600_000);
    rig.keeper.tick(&snap);
    let seconds = started.elapsed().as_secs_f64();
    let mut kept = HashSet::new();
    let mut spans_kept = 0;
    let mut cursor = None;
    loop {
        let page = rig
            .store
            .query(&fleet_commander::traces::store::Filter {
                limit: Some(500),
                cursor: cursor.take(),
                ..Default::default()
            })
            .map_err(|e| e.to_string())?;
        for t in &page.traces {
            spans_kept += t.spans;
            if let Some(id) = fleet_commander::traces::store::unhex(&t.trace_id)
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
            {
                kept.insert(id);
            }
        }
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    let why = fleet_commander::traces::sample::Why::ALL
        .iter()
        .map(|w| {
            let n = rig
                .counters
                .kept
                .get_or_create(&fleet_commander::traces::WhyLabels { why: w.as_str() })
                .get();
            (w.as_str(), n)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    Ok(Pass {
        kept,
        why,
        spans_kept,
        bytes: rig.store.bytes(),
        seconds,
        disk: rig.on_disk()?,
    })
}

/// The P99 of `xs` (nearest rank).
fn p99(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let k = ((xs.len() as f64) * 0.99).ceil() as usize;
    xs.get(k.saturating_sub(1))
        .copied()
        .unwrap_or(f64::INFINITY)
}

pub fn storage(args: TracesArgs) -> Result<(), String> {
    let (runs, all, sampled) = passes(&args)?;
    print_passes(&args, &runs, &all, &sampled);
    print_ground_truth(&runs, &sampled.kept);
    Ok(())
}

/// The storage bench's figures, without printing.
pub fn measure(args: &TracesArgs) -> Result<StorageFigures, String> {
    let (runs, all, sampled) = passes(args)?;
    let truth = ground_truth(&runs, &sampled.kept);
    Ok(StorageFigures {
        runs: runs.len(),
        spans_kept_pct: 100.0 * sampled.spans_kept as f64 / all.spans_kept.max(1) as f64,
        cut_pct: 100.0 * (1.0 - sampled.bytes as f64 / all.bytes.max(1) as f64),
        errors: truth.errors,
        flagged: truth.flagged,
        tail: truth.tail,
    })
}

/// The mix, and the keeper's two passes over it: keeping everything, and the policy's.
fn passes(args: &TracesArgs) -> Result<(Vec<Run>, Pass, Pass), String> {
    let mut rng = Rng::new(args.seed);
    let hour_ms = 3_600_000u64;
    let mut runs: Vec<Run> = (0..args.runs)
        .map(|n| make_run(&mut rng, n, hour_ms, args))
        .collect();
    let flagged = [3usize, 7];
    for r in &mut runs {
        let minute = (r.at_ms - START_MS) / 60_000;
        // Runs that end while their agent's alert is open.
        r.flagged = flagged.contains(&r.agent) && (20..30).contains(&minute);
    }
    let all = one_pass(&runs, Some("[sampling]\nhealthy_rate = 1.0\n"), &flagged)?;
    let text = args
        .healthy_rate
        .map(|r| format!("[sampling]\nhealthy_rate = {r}\n"));
    let sampled = one_pass(&runs, text.as_deref(), &flagged)?;
    Ok((runs, all, sampled))
}

#[expect(
    clippy::print_stdout,
    reason = "the figures are what the benchmark prints"
)]
fn print_passes(args: &TracesArgs, runs: &[Run], all: &Pass, sampled: &Pass) {
    let spans_total: u64 = runs
        .iter()
        .map(|r| r.request.resource_spans[0].scope_spans[0].spans.len() as u64)
        .sum();
    println!(
        "trace storage bench: {} runs ({} spans) from {} agents over 60 simulated minutes, {:.0} % failing, tokens lognormal sigma {} with {:.0} % runaway runs (8-14 calls, 4-20x tokens), 2 agents flagged for 10 minutes; {} bytes of message content added per call; seed {}",
        runs.len(),
        spans_total,
        args.agents,
        args.failing * 100.0,
        args.sigma,
        args.runaway * 100.0,
        args.content_bytes,
        args.seed
    );
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "keep everything: {} traces, {} spans, {:.1} MiB stored ({:.2} s); on disk {:.1} MiB, {} blob files",
        all.kept.len(),
        all.spans_kept,
        mib(all.bytes),
        all.seconds,
        mib(all.disk.0),
        all.disk.1
    );
    println!(
        "sampled (healthy_rate {}): {} traces, {} spans ({:.1} % of spans), {:.1} MiB stored ({:.2} s); on disk {:.1} MiB, {} blob files",
        args.healthy_rate.unwrap_or(0.1),
        sampled.kept.len(),
        sampled.spans_kept,
        100.0 * sampled.spans_kept as f64 / all.spans_kept.max(1) as f64,
        mib(sampled.bytes),
        sampled.seconds,
        mib(sampled.disk.0),
        sampled.disk.1
    );
    let reasons: Vec<String> = sampled
        .why
        .iter()
        .map(|(w, n)| format!("{w} {n}"))
        .collect();
    println!("kept for: {}", reasons.join(", "));
    println!(
        "storage cut: {:.1} % of the bytes (goal >= 80 %)",
        100.0 * (1.0 - sampled.bytes as f64 / all.bytes.max(1) as f64)
    );
}

/// Tokens priced at gpt-4o-mini's list prices (every run here uses it): a run's cost up to
/// a constant, which is all a P99 within one type needs.
fn run_cost(r: &Run) -> f64 {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    r.request.resource_spans[0].scope_spans[0]
        .spans
        .iter()
        .filter_map(|s| {
            let get = |k: &str| {
                s.attributes.iter().find(|a| a.key == k).and_then(|a| {
                    match a.value.as_ref()?.value.as_ref()? {
                        Value::IntValue(v) => Some(*v as f64),
                        _ => None,
                    }
                })
            };
            Some(
                get("gen_ai.usage.input_tokens")? * 0.15 + get("gen_ai.usage.output_tokens")? * 0.6,
            )
        })
        .sum()
}

/// The root span's duration, in ns.
fn run_duration(r: &Run) -> f64 {
    let root = r.request.resource_spans[0].scope_spans[0].spans.last();
    root.map_or(0.0, |s| {
        (s.end_time_unix_nano - s.start_time_unix_nano) as f64
    })
}

/// (kept, all) of the runs that must be kept, by why.
struct Truth {
    errors: (usize, usize),
    flagged: (usize, usize),
    tail: (usize, usize),
    healthy: (usize, usize),
}

/// Ground truth against what was `kept`: every error and flagged run, and every run above
/// its type's P99 cost or duration over the hour.
fn ground_truth(runs: &[Run], kept: &HashSet<[u8; 16]>) -> Truth {
    let mut by_type: HashMap<&str, (Vec<f64>, Vec<f64>)> = HashMap::new();
    for r in runs {
        let e = by_type.entry(r.task_type).or_default();
        e.0.push(run_cost(r));
        e.1.push(run_duration(r));
    }
    let limits: HashMap<&str, (f64, f64)> = by_type
        .into_iter()
        .map(|(t, (c, d))| (t, (p99(c), p99(d))))
        .collect();
    let share = |pick: &dyn Fn(&Run) -> bool| {
        let want: Vec<&Run> = runs.iter().filter(|r| pick(r)).collect();
        let got = want.iter().filter(|r| kept.contains(&r.trace)).count();
        (got, want.len())
    };
    Truth {
        errors: share(&|r| r.error),
        flagged: share(&|r| r.flagged),
        tail: share(&|r| {
            let (c, d) = limits[r.task_type];
            run_cost(r) > c || run_duration(r) > d
        }),
        healthy: share(&|r| !r.error && !r.flagged),
    }
}

#[expect(
    clippy::print_stdout,
    reason = "the figures are what the benchmark prints"
)]
fn print_ground_truth(runs: &[Run], kept: &HashSet<[u8; 16]>) {
    let t = ground_truth(runs, kept);
    println!(
        "kept: errors {}/{}, flagged {}/{}, above the hour's P99 cost or duration {}/{}",
        t.errors.0, t.errors.1, t.flagged.0, t.flagged.1, t.tail.0, t.tail.1
    );
    println!(
        "healthy runs kept: {}/{} ({:.1} %: the 10 % sample, the tail, the cost multiple, and runs of types still unmeasured)",
        t.healthy.0,
        t.healthy.1,
        100.0 * t.healthy.0 as f64 / t.healthy.1.max(1) as f64
    );
}
