//! `fleet-sim`: simulated workers and load runs against the real stack.
//!
//! - `fleet-sim worker`: a worker process with scripted behaviour (delay, failures, hang),
//!   for demos and fault tests (a hanging worker is `kill -9`ed mid-task in the e2e suite).
//! - `fleet-sim bench dispatch`: tasks/s through the commander, and the raw JetStream pipe
//!   measured in the same run, with the ratio.
//! - `fleet-sim bench ingest`: OTLP spans/s into the live state vs prost decode alone.
//! - `fleet-sim bench rss`: commander memory with 10,000 simulated workers.
//! - `fleet-sim bench detect`: what detection costs over 10,000 agents.
//! - `fleet-sim scenario <name>|all|list`: a fault per detector injected into a simulated
//!   fleet run through the commander's live state and detector on a simulated clock, and
//!   a healthy run where nothing may fire; `--stack` runs it against nats-server and the
//!   commander binary with compressed time.
//! - `fleet-sim report`: the lab's report with plots (`simulations/reports/<date>/`).

mod bench;
mod lab;
mod otlp;

/// The commander's allocator (commander/src/main.rs), so the benchmarks measure its code
/// as it runs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use clap::{Parser, Subcommand};
use fleet_worker::{Subjects, TaskContext, TaskFailure, TaskOutput, Usage, Worker, WorkerConfig};

#[derive(Parser)]
#[command(
    name = "fleet-sim",
    about = "Simulated fleets and load runs against the real stack"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one simulated worker until Ctrl-C / SIGTERM (then drain).
    Worker(WorkerArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// Fault scenarios for the detectors (and a healthy run) on a simulated clock, in
    /// process or (`--stack`) against nats-server and the commander binary.
    Scenario(lab::ScenarioArgs),
    /// The lab's report: detection quality with plots, the stack runs, routing economics,
    /// the τ-bench replay and tail sampling (`simulations/reports/<date>/report.md`).
    Report(lab::report::ReportArgs),
}

#[derive(clap::Args)]
struct WorkerArgs {
    /// NATS server.
    #[arg(long, env = "FLEET_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The fleet's subject prefix (the commander's `nats.prefix`).
    #[arg(long, default_value = "fleet")]
    prefix: String,
    /// Pool to join.
    #[arg(long)]
    pool: String,
    /// Worker id (unique in the fleet).
    #[arg(long)]
    id: String,
    /// Tasks at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Time each task takes, in milliseconds.
    #[arg(long, default_value_t = 100)]
    delay_ms: u64,
    /// Fail every Nth task (0 = never).
    #[arg(long, default_value_t = 0)]
    fail_every: u64,
    /// Start tasks and never finish them (to be killed mid-task).
    #[arg(long)]
    hang: bool,
    /// Model to report in usage when the commander names none; the model it chose for
    /// the task (`Fleet-Model`, `task.model`) wins, so costs follow routing.
    #[arg(long, default_value = "gpt-4o-mini")]
    model: String,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Worker(args) => run_worker(args).await,
            Command::Bench { which } => bench::run(which).await,
            Command::Scenario(args) => lab::main(args).await,
            Command::Report(args) => lab::report::main(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_worker(args: WorkerArgs) -> Result<(), String> {
    let client = async_nats::connect(&args.nats_url)
        .await
        .map_err(|e| e.to_string())?;
    let mut config = WorkerConfig::new(&args.pool, &args.id);
    config.subjects = Subjects::new(&args.prefix).map_err(|e| e.to_string())?;
    config.max_in_flight = args.concurrency;
    config.model = Some(args.model.clone());
    let delay = Duration::from_millis(args.delay_ms);
    let (hang, fail_every, model) = (args.hang, args.fail_every, args.model.clone());
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let handle = Worker::start(client, config, move |ctx: TaskContext| {
        let model = model.clone();
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        async move {
            tracing::info!(task_id = %ctx.task_id, attempt = ctx.attempt, delivered = ctx.delivered, "task started");
            if hang {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(delay).await;
            let model = ctx.model.clone().or_else(|| ctx.task.model.clone()).unwrap_or(model);
            let usage = Some(Usage { model: Some(model), input_tokens: 800, output_tokens: 200, cost_usd: None });
            if fail_every > 0 && n.is_multiple_of(fail_every) {
                let mut f = TaskFailure::failed("simulated_failure", format!("task {n} fails by script"));
                f.usage = usage;
                return Err(f);
            }
            Ok(TaskOutput { output: serde_json::json!({ "done_by": ctx.task_id }), usage })
        }
    })
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!(pool = %args.pool, id = %args.id, "worker ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    handle.shutdown().await;
    Ok(())
}
