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
    let mut raw_rates = Vec::new();
    let mut cmd_rates = Vec::new();

    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut toml = String::from("[intake]\nbatch_size = 256\n");
    if let Some(d) = &args.policy_dir {
        let d = d
            .canonicalize()
            .map_err(|e| format!("{}: {e}", d.display()))?;
        toml.push_str(&format!("[policy]\ndir = {:?}\n", d.display().to_string()));
    }
    for p in &pools {
        toml.push_str(&format!("[pools.{p}]\n"));
    }
    // The classifier: a local scripted LLM, so the run measures the commander, not a
    // provider; after the first sight of each distinct text every answer is cached.
    let llm = FakeLlm::start().map_err(|e| e.to_string())?;
    llm.otherwise(Reply::classification("bench", "simple", &[], 0.9));
    let rubric_path = dir.path().join("bench-rubric.toml");
    std::fs::write(&rubric_path, bench_rubric(&pools)).map_err(|e| e.to_string())?;
    toml = format!(
        "[classifier]\nendpoint = {:?}\nrubric = {:?}\n{toml}",
        llm.url(),
        rubric_path.display().to_string()
    );
    let bin = args.commander_bin.clone().unwrap_or_else(commander_bin);
    let commander = Commander::start(&CommanderOptions {
        bin,
        nats_url: Some(url.clone()),
        config_toml: toml,
        data_dir: dir.path().join("commander"),
        extra_env: vec![("RUST_LOG".into(), "warn,fleet_commander::serve=info".into())],
        extra_args: vec![],
    })
    .map_err(|e| e.to_string())?;

    for round in 0..args.rounds {
        let prefix = format!("rawbench{round}");
        let raw = run_pipe(&client, &args, &pools, Pipe::Raw { prefix }).await?;
        println!("round {round}: raw JetStream relay  {raw:>9.0} tasks/s");
        raw_rates.push(raw);
        let cmd = match run_pipe(&client, &args, &pools, Pipe::Commander).await {
            Ok(c) => c,
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
        println!(
            "round {round}: through commander   {cmd:>9.0} tasks/s (ratio {:.2})",
            ratio(cmd, raw)
        );
        cmd_rates.push(cmd);
    }
    drop(commander);
    print_summary(
        &args,
        &client.server_info().version,
        llm.requests(),
        &raw_rates,
        &cmd_rates,
    );
    Ok(())
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
    raw_rates: &[f64],
    cmd_rates: &[f64],
) {
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
        "  ratio              : {:.2} (goal >= 0.50)",
        ratio(cmd, raw)
    );
    let ratios: Vec<f64> = raw_rates
        .iter()
        .zip(cmd_rates)
        .map(|(r, c)| ratio(*c, *r))
        .collect();
    if let (Some(first), Some(last)) = (cmd_rates.first(), cmd_rates.last()) {
        println!(
            "  per round          : ratio best {:.2}, worst {:.2}; the commander's last round {:.0} % of its first",
            best(&ratios),
            ratios.iter().cloned().fold(f64::INFINITY, f64::min),
            ratio(*last, *first) * 100.0
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
        "  policy             : {}",
        args.policy_dir
            .as_ref()
            .map(|d| format!("the policies in {}", d.display()))
            .unwrap_or_else(|| "built in (no budgets or throttles)".into())
    );
}

enum Pipe {
    Raw { prefix: String },
    Commander,
}

/// One measured run: start workers, submit `tasks`, wait until the workers have handled
/// all of them; tasks/s from the first submission to the last completion.
async fn run_pipe(
    client: &async_nats::Client,
    args: &DispatchArgs,
    pools: &[String],
    pipe: Pipe,
) -> Result<f64, String> {
    let subjects = match &pipe {
        Pipe::Raw { prefix } => Subjects::new(prefix).map_err(|e| e.to_string())?,
        Pipe::Commander => Subjects::default(),
    };
    let js = jetstream::new(client.clone());
    let done = Arc::new(AtomicU64::new(0));
    let mut workers: Vec<WorkerHandle> = Vec::new();
    for w in 0..args.workers {
        let pool = &pools[w % pools.len()];
        let mut cfg = WorkerConfig::new(pool, format!("{pool}-w{w}"));
        cfg.subjects = subjects.clone();
        cfg.max_in_flight = args.concurrency;
        cfg.targeted = false;
        let done = done.clone();
        let handle = Worker::start(client.clone(), cfg, move |_ctx| {
            let done = done.clone();
            async move {
                done.fetch_add(1, Ordering::Relaxed);
                Ok(TaskOutput::default())
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        workers.push(handle);
    }
    let relay = match &pipe {
        Pipe::Raw { .. } => Some(start_relay(&js, &subjects, pools).await?),
        Pipe::Commander => None,
    };

    let run_id = fleet_worker::producer::random_id();
    let started = Instant::now();
    let mut pending = Vec::with_capacity(1024);
    for i in 0..args.tasks {
        let mut task = Task::new(format!(
            "benchmark task {}",
            i as usize % args.distinct_tasks.max(1)
        ));
        let id = format!("{}-{i}", &run_id[..12]);
        task.id = Some(id.clone());
        if args.explicit_pool || matches!(pipe, Pipe::Raw { .. }) {
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
        if pending.len() >= 1024 {
            for p in pending.drain(..) {
                p.await.map_err(|e| e.to_string())?;
            }
        }
    }
    for p in pending.drain(..) {
        p.await.map_err(|e| e.to_string())?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while done.load(Ordering::Relaxed) < args.tasks {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} tasks done after 10 minutes",
                done.load(Ordering::Relaxed),
                args.tasks
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    for w in workers {
        w.shutdown().await;
    }
    if let Some(r) = relay {
        r.abort();
    }
    Ok(args.tasks as f64 / elapsed.as_secs_f64())
}

/// The raw pipe: consume the intake stream, republish each message with its headers to a
/// pool subject of the work stream, ack in batches — the commander's job minus everything
/// the commander adds (validation, routing, trace continuation, store, spans, results).
async fn start_relay(
    js: &jetstream::Context,
    subjects: &Subjects,
    pools: &[String],
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
            "relay",
            consumer::pull::Config {
                durable_name: Some("relay".into()),
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
            for a in acks {
                let _ = a.await;
            }
            for m in msgs {
                let _ = m.ack().await;
            }
        }
    }))
}
