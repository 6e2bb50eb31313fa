//! `fleet-sim bench dispatch`: how many tasks/s go producer → commander → pool subject →
//! workers acked, and, in the same run on the same server, the raw JetStream pipe without
//! the commander (a relay that consumes one stream and republishes to another with the
//! same headers). Same producer, same workers, same task count: only the middle differs.

#![expect(
    clippy::print_stdout,
    reason = "the figures on stdout are what the benchmark is for"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use clap::Subcommand;
use fleet_testkit::fake_llm::{FakeLlm, Reply};
use fleet_testkit::{Commander, CommanderOptions, NatsServer, commander_bin};
use fleet_worker::protocol::{self, headers};
use fleet_worker::{Subjects, Task, TaskOutput, TraceParent, Worker, WorkerConfig, WorkerHandle};
use futures::StreamExt;

mod detect;
mod policy;
pub mod stream;
pub mod telemetry;
pub mod traces;

#[derive(Subcommand)]
pub enum Which {
    /// Commander dispatch throughput vs the raw JetStream pipe.
    Dispatch(DispatchArgs),
    /// OTLP spans/s into the live state on one core vs prost decode alone.
    Ingest(telemetry::IngestArgs),
    /// Commander memory with many simulated workers sending heartbeats and spans.
    Rss(telemetry::RssArgs),
    /// Policy file write -> first decision under the new version, under load.
    Policy(policy::PolicyArgs),
    /// One detector evaluation (rules, lifecycle, ladder) over a large simulated fleet.
    Detect(detect::DetectArgs),
    /// Kept traces on a realistic mix: share of spans and bytes kept vs keeping everything.
    Traces(traces::TracesArgs),
    /// The operator's surface on a large fleet: stream fan-out CPU, first paint, assets.
    Dashboard(stream::DashboardArgs),
}

#[derive(clap::Args)]
pub struct DispatchArgs {
    /// Tasks per measured run.
    #[arg(long, default_value_t = 20_000)]
    tasks: u64,
    /// Pools (workers are spread over them).
    #[arg(long, default_value_t = 2)]
    pools: usize,
    /// Workers in total.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// In-flight tasks per worker.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Rounds of each pipe (the best of each is reported, and every round is printed).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Use this server instead of starting a private one.
    #[arg(long)]
    nats_url: Option<String>,
    /// The commander binary (default: next to this one).
    #[arg(long)]
    commander_bin: Option<std::path::PathBuf>,
    /// Producers name the pool (the `requested` rule) instead of leaving the choice to
    /// the classifier and router.
    #[arg(long)]
    explicit_pool: bool,
    /// Distinct task texts; each is classified by the (local, scripted) LLM once and then
    /// answered from the classification cache.
    #[arg(long, default_value_t = 32)]
    distinct_tasks: usize,
    /// Run the commander under the policies in this directory (`*.policy.toml`), to see
    /// what budgets and throttles cost on the task path (`simulations/bench-policies`: two
    /// budgets and a throttle that apply to every task and never bind).
    #[arg(long)]
    policy_dir: Option<std::path::PathBuf>,
    /// Tasks per latency phase: after the rounds, tasks are submitted at a steady 50 % and
    /// then 90 % of the commander's best round (or of `--latency-rate`), and their
    /// latencies measured (0: skip).
    #[arg(long, default_value_t = 20_000)]
    latency_tasks: u64,
    /// The rate (tasks/s) the latency phases take their 50 % and 90 % of, instead of the
    /// commander's best round: the same offered load for every run, so that two builds
    /// compare on equal terms (a steady rate's batches are small, and the commander's CPU
    /// per task depends on how small).
    #[arg(long)]
    latency_rate: Option<f64>,
    /// The commander's `store.cache_mib` (sled's page cache; default 1024).
    #[arg(long)]
    store_cache_mib: Option<u64>,
    /// Run the commander with `[traces] enabled = false`, to see what keeping traces
    /// costs the task path.
    #[arg(long)]
    no_traces: bool,
    /// Producers give every task a random id, as the SDK's producer does when none is
    /// set (32 hex digits), instead of one prefix per run and a counter: whatever is
    /// keyed by task id (the kept traces' task index) then takes each task at a random
    /// place, as it does in production.
    #[arg(long)]
    random_ids: bool,
    /// The commander's data directory (its store), kept after the run instead of a
    /// temporary one. Given a directory an earlier run filled, the commander starts on a
    /// store that already holds those tasks, against a fresh broker: what the commander's
    /// own cost per task owes to the tasks that came before, apart from the broker's.
    #[arg(long)]
    store_dir: Option<std::path::PathBuf>,
}

/// A rubric for the bench pools: one model on every pool, so load balancing (not price)
/// spreads the tasks, as the raw relay's round robin does.
fn bench_rubric(pools: &[String]) -> String {
    let list = pools
        .iter()
        .map(|p| format!("{p:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"name = "bench"
[classifier]
model = "gpt-4o-mini"
default_task_type = "bench"
[[task_type]]
name = "bench"
description = "a benchmark task"
default_tier = "simple"
[[tier]]
name = "simple"
description = "anything"
default_model = "gpt-4o-mini"
[[tier.candidate]]
model = "gpt-4o-mini"
pools = [{list}]
"#
    )
}

/// A private nats-server and a commander on it for a simulated fleet, with its pid; the
/// server and the temporary directory live as long as this does.
struct SimulatedFleet {
    server: NatsServer,
    commander: Commander,
    pid: u32,
    _dir: tempfile::TempDir,
}

/// A commander on a private nats-server for `workers` simulated agents in eight pools
/// (`pool0`…`pool7`, each with `pool_settings`), none of them taken for lost during a run.
fn simulated_fleet(
    bin: Option<std::path::PathBuf>,
    workers: usize,
    pool_settings: &str,
) -> Result<SimulatedFleet, String> {
    let server = NatsServer::start().map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut toml = String::new();
    for p in 0..8 {
        toml.push_str(&format!("[pools.pool{p}]\n{pool_settings}"));
    }
    toml.push_str(&format!(
        "[fleet]\nlost_after_ms = 600000\nmax_workers = {}\n",
        workers.max(1) * 2
    ));
    let commander = Commander::start(&CommanderOptions {
        bin: bin.unwrap_or_else(commander_bin),
        nats_url: Some(server.url().to_string()),
        config_toml: toml,
        data_dir: dir.path().join("cmd"),
        extra_env: vec![],
        extra_args: vec![],
    })
    .map_err(|e| e.to_string())?;
    let pid = commander.pid().ok_or("commander has no pid")?;
    Ok(SimulatedFleet {
        server,
        commander,
        pid,
        _dir: dir,
    })
}

pub async fn run(which: Which) -> Result<(), String> {
    if matches!(
        which,
        Which::Ingest(_) | Which::Detect(_) | Which::Traces(_)
    ) {
        // These run the commander's code in this process: with the commander's page
        // setting. Not for the others: a child inherits it, and nats-server runs as it
        // would anywhere.
        fleet_commander::cli::small_pages_only();
    }
    match which {
        Which::Dispatch(args) => dispatch(args).await,
        Which::Ingest(args) => telemetry::ingest(args),
        Which::Rss(args) => telemetry::rss(args).await,
        Which::Policy(args) => policy::run(args).await,
        Which::Detect(args) => detect::run(args),
        Which::Traces(args) => traces::storage(args),
        Which::Dashboard(args) => stream::run(args).await,
    }
}

async fn dispatch(args: DispatchArgs) -> Result<(), String> {
    if let Some(r) = args.latency_rate
        && (!r.is_finite() || r <= 0.0)
    {
        return Err(format!(
            "--latency-rate {r}: must be a positive number of tasks per second"
        ));
    }
    let own_server = match &args.nats_url {
        Some(_) => None,
        None => Some(NatsServer::start().map_err(|e| e.to_string())?),
    };
    let url = args
        .nats_url
        .clone()
        .or_else(|| own_server.as_ref().map(|s| s.url().to_string()))
        .unwrap_or_default();
    let client = async_nats::connect(&url).await.map_err(|e| e.to_string())?;
    let pools: Vec<String> = (0..args.pools).map(|i| format!("bench{i}")).collect();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    // The classifier: a local scripted LLM, so the run measures the commander, not a
    // provider; after the first sight of each distinct text every answer is cached.
    let llm = FakeLlm::start().map_err(|e| e.to_string())?;
    llm.otherwise(Reply::classification("bench", "simple", &[], 0.9));
    let bin = args.commander_bin.clone().unwrap_or_else(commander_bin);
    let data_dir = args
        .store_dir
        .clone()
        .unwrap_or_else(|| dir.path().join("commander"));
    let store_bytes_before = dir_bytes(&data_dir);
    let commander = Commander::start(&CommanderOptions {
        bin,
        nats_url: Some(url.clone()),
        config_toml: commander_config(&args, &pools, dir.path(), &llm)?,
        data_dir: data_dir.clone(),
        extra_env: vec![("RUST_LOG".into(), "warn,fleet_commander::serve=info".into())],
        extra_args: vec![],
    })
    .map_err(|e| e.to_string())?;

    let pids = Pids {
        nats: own_server.as_ref().and_then(NatsServer::pid),
        commander: commander.pid(),
    };
    let rounds = throughput_rounds(&client, &args, &pools, &commander, pids).await?;
    let best_cmd = rounds.cmd_rates.iter().cloned().fold(0.0, f64::max);
    let full_rate = args.latency_rate.unwrap_or(best_cmd);
    let phases = latency_phases(&client, &args, &pools, &commander, pids, full_rate).await?;
    let through = args.tasks * args.rounds as u64 + args.latency_tasks * phases.len() as u64;
    let end = EndState {
        tasks: through,
        store_bytes_before,
        store_bytes: dir_bytes(&data_dir),
        rss_kib: pids.commander.and_then(telemetry::rss_kib),
        nats_rss_kib: pids.nats.and_then(telemetry::rss_kib),
    };
    drop(commander);
    print_summary(
        &args,
        &client.server_info().version,
        llm.requests(),
        &rounds,
    );
    print_latency(&phases, args.latency_rate);
    end.print();
    Ok(())
}

/// The bench commander's config: the bench pools, the local classifier and the bench
/// rubric (written into `dir`), and what the arguments ask for.
fn commander_config(
    args: &DispatchArgs,
    pools: &[String],
    dir: &std::path::Path,
    llm: &FakeLlm,
) -> Result<String, String> {
    let rubric_path = dir.join("bench-rubric.toml");
    std::fs::write(&rubric_path, bench_rubric(pools)).map_err(|e| e.to_string())?;
    let mut toml = String::new();
    if let Some(mib) = args.store_cache_mib {
        // The test kit opens the config with the `[store]` table; keys before our first
        // table header belong to it.
        toml.push_str(&format!("cache_mib = {mib}\n"));
    }
    toml.push_str(&format!(
        "[classifier]\nendpoint = {:?}\nrubric = {:?}\n[intake]\nbatch_size = 256\n",
        llm.url(),
        rubric_path.display().to_string()
    ));
    if let Some(d) = &args.policy_dir {
        let d = d
            .canonicalize()
            .map_err(|e| format!("{}: {e}", d.display()))?;
        toml.push_str(&format!("[policy]\ndir = {:?}\n", d.display().to_string()));
    }
    if args.no_traces {
        toml.push_str("[traces]\nenabled = false\n");
    }
    for p in pools {
        toml.push_str(&format!("[pools.{p}]\n"));
    }
    Ok(toml)
}

/// Every round's figures: each pipe's rate and where its CPU went.
struct Rounds {
    raw_rates: Vec<f64>,
    cmd_rates: Vec<f64>,
    raw_split: Vec<CpuSplit>,
    cmd_split: Vec<CpuSplit>,
}

/// The processes whose CPU a run of a pipe is split between.
#[derive(Clone, Copy)]
struct Pids {
    nats: Option<u32>,
    commander: Option<u32>,
}

/// CPU per task of each process over one run of a pipe: when the pipes saturate the
/// machine, the ratio of their rates is the inverse ratio of what a task costs the
/// machine in each, and this says which process that cost is in. (How busy the machine
/// was comes from the run's timed window instead, `PipeRun::machine_busy`: the meter's
/// window also holds setting up and draining the streams, idle time that would dilute
/// it but costs next to no CPU.)
#[derive(Clone, Copy, Default)]
struct CpuSplit {
    /// nats-server (none when the bench was given `--nats-url`).
    nats_us: Option<f64>,
    /// This process: producers and workers, and in the raw pipe the relay too.
    bench_us: Option<f64>,
    commander_us: Option<f64>,
    /// How busy the machine was while the pipe ran, per cent (`PipeRun::machine_busy`).
    busy_pct: Option<f64>,
}

impl CpuSplit {
    /// The processes' sum; `with_commander` false for the raw pipe, which has none.
    fn total_us(&self, with_commander: bool) -> Option<f64> {
        let commander = if with_commander {
            self.commander_us?
        } else {
            0.0
        };
        Some(self.nats_us? + self.bench_us? + commander)
    }

    /// Each figure's mean over `splits`; `None` where a split lacks it.
    fn mean(splits: &[CpuSplit]) -> CpuSplit {
        let mean = |f: fn(&CpuSplit) -> Option<f64>| {
            let v: Option<Vec<f64>> = splits.iter().map(f).collect();
            v.filter(|v| !v.is_empty())
                .map(|v| v.iter().sum::<f64>() / v.len() as f64)
        };
        CpuSplit {
            nats_us: mean(|s| s.nats_us),
            bench_us: mean(|s| s.bench_us),
            commander_us: mean(|s| s.commander_us),
            busy_pct: mean(|s| s.busy_pct),
        }
    }
}

/// Readings taken before a run, turned into a [`CpuSplit`] after it.
struct CpuMeter {
    pids: Pids,
    nats: Option<f64>,
    bench: Option<f64>,
    commander: Option<f64>,
}

impl CpuMeter {
    fn start(pids: Pids) -> Self {
        Self {
            pids,
            nats: pids.nats.and_then(stream::cpu_s),
            bench: stream::cpu_s(std::process::id()),
            commander: pids.commander.and_then(stream::cpu_s),
        }
    }

    /// Each process's CPU per task since [`CpuMeter::start`], with how busy the run kept
    /// the machine (`PipeRun::machine_busy`).
    fn per_task(&self, tasks: u64, busy_pct: Option<f64>) -> CpuSplit {
        let us = |pid: Option<u32>, before: Option<f64>| {
            let after = pid.and_then(stream::cpu_s)?;
            Some((after - before?) * 1e6 / tasks.max(1) as f64)
        };
        CpuSplit {
            nats_us: us(self.pids.nats, self.nats),
            bench_us: us(Some(std::process::id()), self.bench),
            commander_us: us(self.pids.commander, self.commander),
            busy_pct,
        }
    }
}

/// `12` or `-`.
fn us_or_dash(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

/// `args.rounds` rounds of the raw pipe, then the commander, at full speed; each printed.
async fn throughput_rounds(
    client: &async_nats::Client,
    args: &DispatchArgs,
    pools: &[String],
    commander: &Commander,
    pids: Pids,
) -> Result<Rounds, String> {
    let mut r = Rounds {
        raw_rates: Vec::new(),
        cmd_rates: Vec::new(),
        raw_split: Vec::new(),
        cmd_split: Vec::new(),
    };
    for round in 0..args.rounds {
        let meter = CpuMeter::start(pids);
        let run = run_pipe(client, args, pools, Pipe::Raw, None).await?;
        let (raw, split) = (run.rate, meter.per_task(args.tasks, run.machine_busy));
        println!(
            "round {round}: raw JetStream relay  {raw:>9.0} tasks/s (machine {} % busy; CPU per task: nats-server {} us, bench and relay {} us)",
            us_or_dash(run.machine_busy),
            us_or_dash(split.nats_us),
            us_or_dash(split.bench_us),
        );
        r.raw_rates.push(raw);
        r.raw_split.push(split);
        let meter = CpuMeter::start(pids);
        let (cmd, busy) = match run_pipe(client, args, pools, Pipe::Commander, None).await {
            Ok(c) => (c.rate, c.machine_busy),
            Err(e) => {
                // Why the commander fell behind is in its log: keep its last lines.
                let log = commander.log_text();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                tracing::error!(
                    round,
                    "the commander's last log lines:\n{}",
                    tail.join("\n")
                );
                return Err(e);
            }
        };
        // The commander's own CPU per task: what throughput on two shared cores hides
        // in noise (it includes the results and the workers' telemetry of the round).
        let split = meter.per_task(args.tasks, busy);
        println!(
            "round {round}: through commander   {cmd:>9.0} tasks/s (ratio {:.2}, {} tasks through it so far; machine {} % busy; commander CPU {} us/task; nats-server {} us, bench {} us)",
            ratio(cmd, raw),
            (round as u64 + 1) * args.tasks,
            us_or_dash(busy),
            us_or_dash(split.commander_us),
            us_or_dash(split.nats_us),
            us_or_dash(split.bench_us),
        );
        r.cmd_rates.push(cmd);
        r.cmd_split.push(split);
    }
    Ok(r)
}

/// After the rounds, tasks submitted at a steady 50 % and then 90 % of `full_rate` (the
/// commander's best round, or `--latency-rate`; none when `latency_tasks` is 0), each
/// rate through the raw pipe first.
async fn latency_phases(
    client: &async_nats::Client,
    args: &DispatchArgs,
    pools: &[String],
    commander: &Commander,
    pids: Pids,
    full_rate: f64,
) -> Result<Vec<LatencyPhase>, String> {
    let mut phases = Vec::new();
    if args.latency_tasks == 0 || full_rate.is_nan() || full_rate <= 0.0 {
        return Ok(phases);
    }
    for load in [0.5, 0.9] {
        let pace = Some((full_rate * load, args.latency_tasks));
        // The raw pipe at the same rate first: what JetStream and the workers alone
        // take from submit to receipt on this machine.
        let raw = run_pipe(client, args, pools, Pipe::Raw, pace).await?;
        let before = intake_dispatch_buckets(commander.http()).await?;
        let meter = CpuMeter::start(pids);
        let paced = run_pipe(client, args, pools, Pipe::Commander, pace).await?;
        let cmd_cpu_us = meter
            .per_task(args.latency_tasks, paced.machine_busy)
            .commander_us;
        let after = intake_dispatch_buckets(commander.http()).await?;
        phases.push(LatencyPhase {
            load,
            rate: paced.rate,
            intake_dispatch: bucket_delta(&before, &after),
            receipt_us: paced.receipt_us,
            raw_receipt_us: raw.receipt_us,
            raw_dispatch_us: raw.relay_dispatch_us,
            cmd_cpu_us,
            machine_busy: paced.machine_busy,
            raw_machine_busy: raw.machine_busy,
        });
    }
    Ok(phases)
}

/// One steady-rate phase's figures.
struct LatencyPhase {
    /// Share of the best round's rate it was submitted at.
    load: f64,
    rate: f64,
    /// `fleet_intake_dispatch_seconds` buckets filled during the phase: (upper bound, count).
    intake_dispatch: Vec<(f64, u64)>,
    /// Submit to worker receipt, microseconds, one per task.
    receipt_us: Vec<u64>,
    /// The same through the raw pipe at the same rate.
    raw_receipt_us: Vec<u64>,
    /// The raw relay's intake read to PubAck at the same rate.
    raw_dispatch_us: Vec<u64>,
    /// The commander's CPU per task over the phase, microseconds: more than in the rounds
    /// when a steady rate makes its batches small.
    cmd_cpu_us: Option<f64>,
    /// How busy the whole machine was over the phase (commander, nats-server, the bench's
    /// producers and workers), percent of all its cores.
    machine_busy: Option<f64>,
    /// The same for the raw pipe at the same rate.
    raw_machine_busy: Option<f64>,
}

/// What one commander on one store looks like after the whole run.
struct EndState {
    tasks: u64,
    /// What the store held when the commander started (0 unless `--store-dir` named a
    /// store an earlier run filled).
    store_bytes_before: u64,
    store_bytes: u64,
    /// (now, peak) KiB.
    rss_kib: Option<(u64, u64)>,
    /// nats-server's, (now, peak) KiB; none when the bench was given `--nats-url`. It
    /// holds both pipes' streams: what a broker needs for this many tasks, whose ids its
    /// duplicate windows (20 min) and whose results (7 days) it keeps.
    nats_rss_kib: Option<(u64, u64)>,
}

impl EndState {
    /// The store's size, per million tasks of this run: on a store an earlier run filled
    /// (`--store-dir`), per million of what this run added.
    fn store_line(&self) -> String {
        let mib = |b: f64| b / (1024.0 * 1024.0);
        let per_million = |b: f64| mib(b) * 1e6 / self.tasks.max(1) as f64;
        let (after, before) = (self.store_bytes as f64, self.store_bytes_before as f64);
        if self.store_bytes_before == 0 {
            format!(
                "{:.0} MiB on disk after {} tasks ({:.0} MiB per million)",
                mib(after),
                self.tasks,
                per_million(after)
            )
        } else {
            // Retention may have removed more than this run added: the growth can be
            // negative.
            format!(
                "{:.0} MiB on disk after {} tasks, on a store that held {:.0} MiB before them ({:.0} MiB per million of this run's)",
                mib(after),
                self.tasks,
                mib(before),
                per_million(after - before)
            )
        }
    }

    fn print(&self) {
        println!("  store              : {}", self.store_line());
        match self.rss_kib {
            Some((now, peak)) => println!(
                "  commander RSS      : {:.0} MiB at the end (peak {:.0} MiB)",
                now as f64 / 1024.0,
                peak as f64 / 1024.0
            ),
            None => println!("  commander RSS      : not readable"),
        }
        if let Some((now, peak)) = self.nats_rss_kib {
            println!(
                "  nats-server RSS    : {:.0} MiB at the end (peak {:.0} MiB), after {} tasks through both pipes",
                now as f64 / 1024.0,
                peak as f64 / 1024.0,
                // The raw pipe runs as many tasks as the commander's.
                2 * self.tasks
            );
        }
    }
}

/// Bytes of every file under `dir`.
pub(crate) fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// `fleet_intake_dispatch_seconds` as cumulative (upper bound, count) pairs from `/metrics`.
async fn intake_dispatch_buckets(http: &str) -> Result<Vec<(f64, u64)>, String> {
    let text = reqwest::get(format!("{http}/metrics"))
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("fleet_intake_dispatch_seconds_bucket{le=\"") else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"} ") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().map_err(|_| format!("bucket bound {le:?}"))?
        };
        let count = count
            .split_whitespace()
            .next()
            .and_then(|c| c.parse::<f64>().ok())
            .ok_or_else(|| format!("bucket count in {line:?}"))?;
        out.push((le, count as u64));
    }
    if out.is_empty() {
        return Err("/metrics has no fleet_intake_dispatch_seconds".into());
    }
    Ok(out)
}

/// Per-bucket counts filled between two cumulative readings.
fn bucket_delta(before: &[(f64, u64)], after: &[(f64, u64)]) -> Vec<(f64, u64)> {
    let mut prev = 0;
    after
        .iter()
        .map(|(le, n)| {
            let was = before
                .iter()
                .find(|(b, _)| b == le)
                .map(|(_, c)| *c)
                .unwrap_or(0);
            let cum = n.saturating_sub(was);
            let own = cum.saturating_sub(prev);
            prev = cum;
            (*le, own)
        })
        .collect()
}

/// The `q` quantile of bucketed counts, interpolated linearly inside its bucket (as
/// Prometheus' `histogram_quantile` does); the open top bucket answers its lower bound.
fn bucket_quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut seen, mut lower) = (0u64, 0.0);
    for (le, n) in buckets {
        if *n > 0 && (seen + n) as f64 >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let within = (rank - seen as f64) / *n as f64;
            return Some(lower + (le - lower) * within.clamp(0.0, 1.0));
        }
        seen += n;
        if le.is_finite() {
            lower = *le;
        }
    }
    Some(lower)
}

/// The `q` quantile of raw samples (nearest rank).
fn sample_quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted.get(i).copied()
}

fn print_latency(phases: &[LatencyPhase], pinned: Option<f64>) {
    if let Some(r) = pinned
        && !phases.is_empty()
    {
        println!(
            "  latency phases     : shares of {r:.0} tasks/s (--latency-rate), not of the best round"
        );
    }
    for p in phases {
        let ms = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        let whole = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.0}"));
        let id = |q| bucket_quantile(&p.intake_dispatch, q).map(|s| s * 1e3);
        let mut r = p.receipt_us.clone();
        r.sort_unstable();
        let rc = |q| sample_quantile(&r, q).map(|us| us as f64 / 1e3);
        let mut raw = p.raw_receipt_us.clone();
        raw.sort_unstable();
        let rr = |q| sample_quantile(&raw, q).map(|us| us as f64 / 1e3);
        let mut relay = p.raw_dispatch_us.clone();
        relay.sort_unstable();
        let rd = |q| sample_quantile(&relay, q).map(|us| us as f64 / 1e3);
        let goal = if p.load <= 0.5 {
            format!(
                " (goal p99 <= 2 ms: {})",
                if id(0.99).is_some_and(|v| v <= 2.0) {
                    "met"
                } else {
                    "missed"
                }
            )
        } else {
            String::new()
        };
        println!(
            "  latency at {:>3.0} %   : {:.0} tasks/s submitted steadily, {} tasks; commander CPU {} us/task, machine {} % busy",
            p.load * 100.0,
            p.rate,
            r.len(),
            whole(p.cmd_cpu_us),
            whole(p.machine_busy),
        );
        println!(
            "    intake -> dispatch PubAck : p50 {} ms, p99 {} ms, p99.9 {} ms{goal} (commander histogram, interpolated in its buckets)",
            ms(id(0.5)),
            ms(id(0.99)),
            ms(id(0.999)),
        );
        println!(
            "      raw relay, same rate    : p50 {} ms, p99 {} ms, p99.9 {} ms (its own read -> PubAck, every task)",
            ms(rd(0.5)),
            ms(rd(0.99)),
            ms(rd(0.999)),
        );
        println!(
            "    submit -> worker receipt  : p50 {} ms, p99 {} ms, p99.9 {} ms (every task)",
            ms(rc(0.5)),
            ms(rc(0.99)),
            ms(rc(0.999)),
        );
        println!(
            "      raw pipe, same rate     : p50 {} ms, p99 {} ms, p99.9 {} ms; machine {} % busy",
            ms(rr(0.5)),
            ms(rr(0.99)),
            ms(rr(0.999)),
            whole(p.raw_machine_busy),
        );
    }
}

/// `cmd` as a share of `raw` (0 when raw is).
fn ratio(cmd: f64, raw: f64) -> f64 {
    if raw > 0.0 { cmd / raw } else { 0.0 }
}

/// The run's figures: the best of each pipe, their ratio, the best and worst round, and the
/// commander's last round against its first.
fn print_summary(
    args: &DispatchArgs,
    nats_version: &str,
    classifier_requests: usize,
    rounds: &Rounds,
) {
    let (raw_rates, cmd_rates) = (&rounds.raw_rates, &rounds.cmd_rates);
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let (raw, cmd) = (best(raw_rates), best(cmd_rates));
    println!();
    println!(
        "bench dispatch: {} tasks/run, {} pools, {} workers x {} in flight, nats-server {nats_version}",
        args.tasks, args.pools, args.workers, args.concurrency,
    );
    println!(
        "  raw JetStream pipe : {raw:>9.0} tasks/s (best of {})",
        raw_rates.len()
    );
    println!(
        "  commander pipe     : {cmd:>9.0} tasks/s (best of {})",
        cmd_rates.len()
    );
    println!(
        "  ratio              : {:.2} (best vs best)",
        ratio(cmd, raw)
    );
    let ratios: Vec<f64> = raw_rates
        .iter()
        .zip(cmd_rates.iter())
        .map(|(r, c)| ratio(*c, *r))
        .collect();
    if let (Some(first), Some(last)) = (cmd_rates.first(), cmd_rates.last()) {
        let worst = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
        let kept = ratio(*last, *first);
        // The raw relay's own fall over the same run, so that a reader can tell a
        // commander that slows as its store grows from a machine (or broker) that does.
        let raw_kept = match (raw_rates.first(), raw_rates.last()) {
            (Some(f), Some(l)) => format!("; the raw relay's {:.0} %", ratio(*l, *f) * 100.0),
            _ => String::new(),
        };
        println!(
            "  per round          : ratio best {:.2}, worst {worst:.2} (goal every round >= {RATIO_GOAL:.2}: {}); the commander's last round {:.0} % of its first (goal >= 90 %: {}){raw_kept}",
            best(&ratios),
            if worst >= RATIO_GOAL { "met" } else { "missed" },
            kept * 100.0,
            if kept >= 0.9 { "met" } else { "missed" },
        );
    }
    println!(
        "  routing            : {}; classifier requests {classifier_requests} for {} distinct texts (the rest cached)",
        if args.explicit_pool {
            "producer-named pools"
        } else {
            "classified + decided per task"
        },
        args.distinct_tasks
    );
    println!(
        "  task ids           : {}",
        if args.random_ids {
            "random, as the SDK producer's (--random-ids)"
        } else {
            "one prefix per run and a counter (neighbouring ids)"
        }
    );
    println!(
        "  policy             : {}",
        args.policy_dir
            .as_ref()
            .map(|d| format!("the policies in {}", d.display()))
            .unwrap_or_else(|| "built in (no budgets or throttles)".into())
    );
    let cpu: Vec<f64> = rounds
        .cmd_split
        .iter()
        .filter_map(|s| s.commander_us)
        .collect();
    if let (Some(first), Some(last)) = (cpu.first(), cpu.last()) {
        let lo = cpu.iter().cloned().fold(f64::INFINITY, f64::min);
        println!(
            "  commander CPU      : {lo:.0} us/task at best, {first:.0} in the first round, {last:.0} in the last"
        );
    }
    let (raw, cmd) = (
        CpuSplit::mean(&rounds.raw_split),
        CpuSplit::mean(&rounds.cmd_split),
    );
    println!(
        "  CPU per task       : raw pipe {} us (nats-server {}, bench and relay {}); commander pipe {} us (nats-server {}, bench {}, commander {}); means of the rounds",
        us_or_dash(raw.total_us(false)),
        us_or_dash(raw.nats_us),
        us_or_dash(raw.bench_us),
        us_or_dash(cmd.total_us(true)),
        us_or_dash(cmd.nats_us),
        us_or_dash(cmd.bench_us),
        us_or_dash(cmd.commander_us),
    );
    if let Some(b) = commander_budget_us(&raw, &cmd, RATIO_GOAL) {
        println!(
            "  ratio goal in CPU  : {RATIO_GOAL:.2} allows the commander pipe {:.0} us per task (the machine {:.0} % busy in it, {:.0} % in the raw pipe); after this run's nats-server and bench, {} for the commander, which used {}",
            b.pipe_us,
            cmd.busy_pct.unwrap_or(0.0),
            raw.busy_pct.unwrap_or(0.0),
            if b.commander_us > 0.0 {
                format!("{:.0} us", b.commander_us)
            } else {
                // `abs`, not negation: a share of exactly 0 would print as "-0".
                format!(
                    "nothing (they alone are {:.0} us over)",
                    b.commander_us.abs()
                )
            },
            us_or_dash(cmd.commander_us),
        );
    }
}

/// The round ratio the bench checks every round against.
const RATIO_GOAL: f64 = 0.8;

/// What the ratio goal allows, in CPU per task ([`commander_budget_us`]).
#[derive(Debug, PartialEq)]
struct Budget {
    /// The commander pipe as a whole.
    pipe_us: f64,
    /// The commander, once the pipe's nats-server and bench are paid; negative when they
    /// alone exceed `pipe_us`.
    commander_us: f64,
}

/// The CPU per task the commander pipe, and within it the commander, may use for the pipe
/// to reach `goal` times the raw pipe's rate. A pipe's rate is the CPU it keeps busy over
/// its CPU per task: the machine's cores times its busy share, over the sum of the
/// processes' CPU per task. So the ratio of the rates is `(busy_cmd / cpu_cmd) /
/// (busy_raw / cpu_raw)`, and `goal` needs `cpu_cmd <= cpu_raw * busy_cmd / (busy_raw *
/// goal)`, if the commander pipe keeps the machine as busy as it did. `None` without a
/// figure for each.
fn commander_budget_us(raw: &CpuSplit, cmd: &CpuSplit, goal: f64) -> Option<Budget> {
    let (busy_raw, busy_cmd) = (raw.busy_pct?, cmd.busy_pct?);
    if busy_raw <= 0.0 || goal <= 0.0 {
        return None;
    }
    let pipe_us = raw.total_us(false)? * busy_cmd / (busy_raw * goal);
    Some(Budget {
        pipe_us,
        commander_us: pipe_us - cmd.nats_us? - cmd.bench_us?,
    })
}

enum Pipe {
    Raw,
    Commander,
}

/// The raw pipe's subject prefix, the same in every run of a bench: its streams, as the
/// commander's, keep what earlier runs left in them (the results stream keeps every
/// result), so that a later round of either pipe meets the same broker.
const RAW_PREFIX: &str = "rawbench";

/// What one run of a pipe measured.
struct PipeRun {
    /// Tasks/s from the first submission to the last completion.
    rate: f64,
    /// Submit to worker receipt per task, microseconds (paced runs only).
    receipt_us: Vec<u64>,
    /// The raw relay's own intake read to PubAck of its republish, microseconds, per
    /// task (raw runs only): what the commander's `fleet_intake_dispatch_seconds`
    /// measures, for a middle that does nothing but relay.
    relay_dispatch_us: Vec<u64>,
    /// How busy the whole machine was from the first submission to the last receipt,
    /// percent of all its cores.
    machine_busy: Option<f64>,
}

/// Microseconds since the Unix epoch: the producer stamps it into the task and the worker
/// (same machine, same clock) subtracts it on receipt.
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One measured run: start workers, submit `tasks` (as fast as JetStream acks them, or
/// at `paced`'s rate for its task count), wait until the workers have handled all of them.
async fn run_pipe(
    client: &async_nats::Client,
    args: &DispatchArgs,
    pools: &[String],
    pipe: Pipe,
    paced: Option<(f64, u64)>,
) -> Result<PipeRun, String> {
    let tasks = paced.map(|(_, n)| n).unwrap_or(args.tasks);
    let tally = Arc::new(Tally::new(paced.map(|_| tasks)));
    let (subjects, raw) = match &pipe {
        Pipe::Raw => (Subjects::new(RAW_PREFIX).map_err(|e| e.to_string())?, true),
        Pipe::Commander => (Subjects::default(), false),
    };
    let js = jetstream::new(client.clone());
    let workers = start_workers(client, args, pools, &subjects, &tally).await?;
    let relay_dispatch_us = Arc::new(std::sync::Mutex::new(Vec::new()));
    let relay = match raw {
        true => Some(start_relay(&js, &subjects, pools, relay_dispatch_us.clone()).await?),
        false => None,
    };
    let started = Instant::now();
    let machine_before = stream::machine_ticks();
    submit(&js, args, pools, &subjects, raw, paced, tasks, &tally).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while tally.done.load(Ordering::Relaxed) < tasks {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} tasks done after 10 minutes",
                tally.done.load(Ordering::Relaxed),
                tasks
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let machine_busy = machine_before
        .zip(stream::machine_ticks())
        .and_then(|(b, a)| stream::busy_percent(b, a));
    for w in workers {
        w.shutdown().await;
    }
    if let Some(r) = relay {
        r.abort();
        // The relay's pull request outlives its task on the server: a next run's relay
        // would share the consumer with it, and the messages handed to it would wait out
        // the ack wait. Without the consumer the request is gone.
        let removing =
            |e: &dyn std::fmt::Display| format!("removing the relay's consumer after the run: {e}");
        js.get_stream(subjects.intake_stream())
            .await
            .map_err(|e| removing(&e))?
            .delete_consumer(RELAY_CONSUMER)
            .await
            .map_err(|e| removing(&e))?;
    }
    let receipt_us = tally
        .receipts
        .lock()
        .map(|mut r| std::mem::take(&mut *r))
        .unwrap_or_default();
    let relay_dispatch_us = relay_dispatch_us
        .lock()
        .map(|mut r| std::mem::take(&mut *r))
        .unwrap_or_default();
    Ok(PipeRun {
        rate: tasks as f64 / elapsed.as_secs_f64(),
        receipt_us,
        relay_dispatch_us,
        machine_busy,
    })
}

/// What the producer and the workers of one run share.
struct Tally {
    /// Tasks the workers have handled.
    done: AtomicU64,
    /// When each task was submitted (µs), by its index, which ends its id: the task itself
    /// stays as it is, so the classification cache still answers every repeat of a text.
    /// Empty when latency is not measured.
    sent: Vec<AtomicU64>,
    /// Submit to receipt per task, µs.
    receipts: std::sync::Mutex<Vec<u64>>,
}

impl Tally {
    fn new(timed_tasks: Option<u64>) -> Self {
        Self {
            done: AtomicU64::new(0),
            sent: (0..timed_tasks.unwrap_or(0))
                .map(|_| AtomicU64::new(0))
                .collect(),
            receipts: Default::default(),
        }
    }

    /// A worker received the task with this id.
    fn received(&self, id: Option<&str>) {
        let at = id
            .and_then(|id| id.rsplit_once('-'))
            .and_then(|(_, i)| i.parse::<usize>().ok())
            .and_then(|i| self.sent.get(i))
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|at| *at > 0);
        if let Some(at) = at
            && let Ok(mut r) = self.receipts.lock()
        {
            r.push(now_us().saturating_sub(at));
        }
    }
}

/// `args.workers` SDK workers spread over `pools`, each counting what it handles.
async fn start_workers(
    client: &async_nats::Client,
    args: &DispatchArgs,
    pools: &[String],
    subjects: &Subjects,
    tally: &Arc<Tally>,
) -> Result<Vec<WorkerHandle>, String> {
    let mut workers = Vec::with_capacity(args.workers);
    for w in 0..args.workers {
        let pool = &pools[w % pools.len()];
        let mut cfg = WorkerConfig::new(pool, format!("{pool}-w{w}"));
        cfg.subjects = subjects.clone();
        cfg.max_in_flight = args.concurrency;
        cfg.targeted = false;
        let tally = tally.clone();
        let handle = Worker::start(client.clone(), cfg, move |ctx| {
            tally.received(ctx.task.id.as_deref());
            let tally = tally.clone();
            async move {
                tally.done.fetch_add(1, Ordering::Relaxed);
                Ok(TaskOutput::default())
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        workers.push(handle);
    }
    Ok(workers)
}

/// Submits `tasks` to the intake subject, as fast as JetStream acks them or at `paced`'s
/// rate; returns once every PubAck is in.
#[expect(
    clippy::too_many_arguments,
    reason = "one run's settings, each used once"
)]
async fn submit(
    js: &jetstream::Context,
    args: &DispatchArgs,
    pools: &[String],
    subjects: &Subjects,
    raw: bool,
    paced: Option<(f64, u64)>,
    tasks: u64,
    tally: &Tally,
) -> Result<(), String> {
    let run_id = fleet_worker::producer::random_id();
    let started = Instant::now();
    // Paced, PubAcks are collected as they come rather than held for a whole window.
    let window = if paced.is_some() { 64 } else { 1024 };
    let mut pending = Vec::with_capacity(window);
    for i in 0..tasks {
        if let Some((rate, _)) = paced {
            // Steady arrivals: task i leaves at i / rate seconds, not in bursts.
            let due = started + Duration::from_secs_f64(i as f64 / rate.max(1.0));
            tokio::time::sleep_until(due.into()).await;
        }
        let mut task = Task::new(format!(
            "benchmark task {}",
            i as usize % args.distinct_tasks.max(1)
        ));
        if let Some(at) = tally.sent.get(i as usize) {
            at.store(now_us(), Ordering::Relaxed);
        }
        // The counter ends every id either way: the workers' tally reads it back.
        let id = match args.random_ids {
            true => format!("{}-{i}", fleet_worker::producer::random_id()),
            false => format!("{}-{i}", &run_id[..12]),
        };
        task.id = Some(id.clone());
        if args.explicit_pool || raw {
            task.pool = Some(pools[(i as usize) % pools.len()].clone());
        }
        let mut h = async_nats::HeaderMap::new();
        let tp = TraceParent::new_root().to_header();
        protocol::set_header(&mut h, headers::TRACEPARENT, &tp).map_err(|e| e.to_string())?;
        protocol::set_header(&mut h, headers::BAGGAGE, "team=bench,feature=dispatch")
            .map_err(|e| e.to_string())?;
        protocol::set_header(&mut h, headers::NATS_MSG_ID, &id).map_err(|e| e.to_string())?;
        protocol::set_header(&mut h, headers::TASK_ID, &id).map_err(|e| e.to_string())?;
        let payload = Bytes::from(serde_json::to_vec(&task).map_err(|e| e.to_string())?);
        pending.push(
            js.publish_with_headers(subjects.submit(), h, payload)
                .await
                .map_err(|e| e.to_string())?,
        );
        if pending.len() >= window {
            for p in pending.drain(..) {
                p.await.map_err(|e| e.to_string())?;
            }
        }
    }
    for p in pending.drain(..) {
        p.await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The raw relay's durable consumer on the raw pipe's intake stream.
const RELAY_CONSUMER: &str = "relay";

/// The raw pipe: consume the intake stream, republish each message with its headers to a
/// pool subject of the work stream, ack in batches — the commander's job minus everything
/// the commander adds (validation, routing, trace continuation, store, spans, results).
/// Each republish's time from its batch's read to its PubAck goes to `dispatch_us`.
async fn start_relay(
    js: &jetstream::Context,
    subjects: &Subjects,
    pools: &[String],
    dispatch_us: Arc<std::sync::Mutex<Vec<u64>>>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let intake = js
        .get_or_create_stream(subjects.intake_stream_config())
        .await
        .map_err(|e| e.to_string())?;
    js.get_or_create_stream(subjects.work_stream_config())
        .await
        .map_err(|e| e.to_string())?;
    let consumer = intake
        .get_or_create_consumer(
            RELAY_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(RELAY_CONSUMER.into()),
                filter_subject: subjects.submit(),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: 2048,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let js = js.clone();
    let subjects = subjects.clone();
    let pools = pools.to_vec();
    Ok(tokio::spawn(async move {
        let Ok(messages) = consumer
            .stream()
            .max_messages_per_batch(256)
            .messages()
            .await
        else {
            return;
        };
        let mut chunks = messages.ready_chunks(256);
        let mut n = 0usize;
        while let Some(chunk) = chunks.next().await {
            let read_at = Instant::now();
            let msgs: Vec<_> = chunk.into_iter().filter_map(Result::ok).collect();
            let mut acks = Vec::with_capacity(msgs.len());
            for m in &msgs {
                let pool = &pools[n % pools.len()];
                n += 1;
                let h = m.headers.clone().unwrap_or_default();
                if let Ok(f) = js
                    .publish_with_headers(subjects.work(pool), h, m.payload.clone())
                    .await
                {
                    acks.push(f);
                }
            }
            let mut took = Vec::with_capacity(acks.len());
            for a in acks {
                if a.await.is_ok() {
                    took.push(read_at.elapsed().as_micros() as u64);
                }
            }
            if let Ok(mut d) = dispatch_us.lock() {
                d.extend(took);
            }
            for m in msgs {
                let _ = m.ack().await;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(nats: Option<f64>, bench: f64, commander: Option<f64>) -> CpuSplit {
        CpuSplit {
            nats_us: nats,
            bench_us: Some(bench),
            commander_us: commander,
            busy_pct: None,
        }
    }

    #[test]
    fn the_commanders_share_of_the_ratio_goal_is_what_the_broker_and_bench_leave() {
        let busy = |s: CpuSplit, pct: f64| CpuSplit {
            busy_pct: Some(pct),
            ..s
        };
        let raw = busy(split(Some(70.0), 50.0, None), 90.0);
        let close = |b: Option<Budget>, pipe: f64, commander: f64| {
            let b = b.expect("a budget");
            assert!((b.pipe_us - pipe).abs() < 1e-9, "{b:?}");
            assert!((b.commander_us - commander).abs() < 1e-9, "{b:?}");
        };
        // Equally busy: 120 us raw, so 0.8 allows the pipe 150; 80 + 55 leaves 15.
        let cmd = split(Some(80.0), 55.0, Some(75.0));
        close(
            commander_budget_us(&raw, &busy(cmd, 90.0), 0.8),
            150.0,
            15.0,
        );
        // A pipe that keeps the machine busier may cost more per task for the same
        // rate: at 99 % against 90 %, 165.
        close(
            commander_budget_us(&raw, &busy(cmd, 99.0), 0.8),
            165.0,
            30.0,
        );
        // The broker and bench alone over it: a negative share, not a clamp at 0.
        let heavy = busy(split(Some(100.0), 60.0, Some(75.0)), 90.0);
        close(commander_budget_us(&raw, &heavy, 0.8), 150.0, -10.0);
        // Without the broker's figure (`--nats-url`) or a busy share, none.
        let no_nats = busy(split(None, 50.0, None), 90.0);
        assert_eq!(commander_budget_us(&no_nats, &busy(cmd, 90.0), 0.8), None);
        assert_eq!(commander_budget_us(&raw, &cmd, 0.8), None);
    }

    #[test]
    fn the_busy_share_is_averaged_over_the_rounds_with_the_rest() {
        let rounds = [
            CpuSplit {
                busy_pct: Some(80.0),
                ..split(Some(70.0), 50.0, None)
            },
            CpuSplit {
                busy_pct: Some(90.0),
                ..split(Some(70.0), 50.0, None)
            },
        ];
        assert_eq!(CpuSplit::mean(&rounds).busy_pct, Some(85.0));
    }

    #[test]
    fn a_pipes_cpu_per_task_is_its_processes_sum() {
        let s = split(Some(60.0), 50.0, Some(70.0));
        assert_eq!(
            s.total_us(false),
            Some(110.0),
            "the raw pipe has no commander"
        );
        assert_eq!(s.total_us(true), Some(180.0));
        // Without nats-server's figure (`--nats-url`) there is no sum to give.
        assert_eq!(split(None, 50.0, Some(70.0)).total_us(true), None);
        assert_eq!(split(Some(60.0), 50.0, None).total_us(true), None);
    }

    #[test]
    fn the_store_is_measured_per_million_of_this_runs_tasks() {
        const MIB: u64 = 1024 * 1024;
        let end = |before: u64, after: u64| EndState {
            tasks: 200_000,
            store_bytes_before: before,
            store_bytes: after,
            rss_kib: None,
            nats_rss_kib: None,
        };
        assert_eq!(
            end(0, 230 * MIB).store_line(),
            "230 MiB on disk after 200000 tasks (1150 MiB per million)"
        );
        // A store an earlier run filled: only what this run added counts per million.
        assert_eq!(
            end(1135 * MIB, 1365 * MIB).store_line(),
            "1365 MiB on disk after 200000 tasks, on a store that held 1135 MiB before them (1150 MiB per million of this run's)"
        );
        // Retention took more than the run added.
        assert!(
            end(1000 * MIB, 990 * MIB)
                .store_line()
                .ends_with("(-50 MiB per million of this run's)")
        );
    }

    #[test]
    fn the_mean_of_the_rounds_is_taken_per_process() {
        let m = CpuSplit::mean(&[
            split(Some(60.0), 50.0, Some(70.0)),
            split(Some(80.0), 30.0, Some(50.0)),
        ]);
        assert_eq!(
            (m.nats_us, m.bench_us, m.commander_us),
            (Some(70.0), Some(40.0), Some(60.0))
        );
        // A round without a figure leaves that process's mean out rather than skew it.
        let m = CpuSplit::mean(&[split(Some(60.0), 50.0, None), split(None, 30.0, None)]);
        assert_eq!(
            (m.nats_us, m.bench_us, m.commander_us),
            (None, Some(40.0), None)
        );
        let none = CpuSplit::mean(&[]);
        assert_eq!((none.nats_us, none.bench_us), (None, None));
    }
}
