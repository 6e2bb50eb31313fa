//! An example worker: joins a pool and "does" each task by describing it back, pretending
//! to be an LLM call that takes a little while and uses some tokens.
//!
//! cargo run -p fleet-worker --example worker -- --pool code --id code-1

use std::time::Duration;

use clap::Parser;
use fleet_worker::{LlmCall, TaskContext, TaskOutput, ToolCall, Usage, Worker, WorkerConfig};

#[derive(Parser)]
struct Args {
    /// NATS server.
    #[arg(long, env = "FLEET_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Pool to join.
    #[arg(long, default_value = "general")]
    pool: String,
    /// Worker id (unique in the fleet).
    #[arg(long)]
    id: String,
    /// Tasks at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Simulated work time per task, in milliseconds.
    #[arg(long, default_value_t = 200)]
    work_ms: u64,
    /// Model this worker uses when the commander names none. The model the commander
    /// chose for a task (`Fleet-Model`, also in `task.model`) wins, so the spans and the
    /// costs follow routing.
    #[arg(long, default_value = "claude-sonnet-4-5")]
    model: String,
}

/// The GenAI provider name of a model, from its family.
fn provider_of(model: &str) -> &'static str {
    let m = model.to_ascii_lowercase();
    if m.starts_with("claude") {
        "anthropic"
    } else if m.starts_with("gemini") {
        "gcp.gemini"
    } else if m.starts_with("gpt") || m.starts_with('o') {
        "openai"
    } else {
        "unknown"
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let client = async_nats::connect(&args.nats_url).await?;
    let mut config = WorkerConfig::new(&args.pool, &args.id);
    config.max_in_flight = args.concurrency;
    config.model = Some(args.model.clone());
    let work = Duration::from_millis(args.work_ms);
    let model = args.model.clone();
    let handle = Worker::start(client, config, move |ctx: TaskContext| {
        let model = ctx
            .model
            .clone()
            .or_else(|| ctx.task.model.clone())
            .unwrap_or_else(|| model.clone());
        async move {
            tracing::info!(task_id = %ctx.task_id, attempt = ctx.attempt, model, "task started");
            // A stand-in agent: one tool call, then one LLM call, each reported as a
            // GenAI span (the commander prices the call from its model registry).
            let lookup = ToolCall::new("lookup");
            tokio::time::sleep(work / 4).await;
            ctx.telemetry.tool_call(&lookup.finish());
            let call = LlmCall::chat(provider_of(&model), model.clone());
            tokio::time::sleep(work - work / 4).await;
            let input = ctx.task.description.len() as u64 * 2 + 200;
            ctx.telemetry.llm_call(&call.tokens(input, 120).finish());
            let team = ctx.baggage.get("team").unwrap_or("unknown").to_string();
            tracing::info!(task_id = %ctx.task_id, trace_id = %ctx.span.trace_id, team, "done");
            Ok(TaskOutput {
                output: serde_json::json!({ "answer": format!("handled: {}", ctx.task.description) }),
                usage: Some(Usage {
                    model: Some(model),
                    input_tokens: input,
                    output_tokens: 120,
                    cost_usd: None,
                }),
            })
        }
    })
    .await?;
    tracing::info!(pool = %args.pool, id = %args.id, "worker running; Ctrl-C drains and stops");
    tokio::signal::ctrl_c().await?;
    let stats = handle.shutdown().await;
    tracing::info!(
        completed = stats.completed.load(std::sync::atomic::Ordering::Relaxed),
        "drained"
    );
    Ok(())
}
