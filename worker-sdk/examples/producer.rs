//! An example producer: submits tasks of a few kinds, with attribution baggage, and prints
//! each result as it arrives.
//!
//! cargo run -p fleet-worker --example producer -- --count 20

use std::time::Duration;

use clap::Parser;
use fleet_worker::{Baggage, Producer, Subjects, SubmitOptions, Task};

#[derive(Parser)]
struct Args {
    #[arg(long, env = "FLEET_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Tasks to submit (0 = keep going until Ctrl-C).
    #[arg(long, default_value_t = 20)]
    count: u64,
    /// Pause between submissions, in milliseconds.
    #[arg(long, default_value_t = 250)]
    interval_ms: u64,
}

const KINDS: &[(&str, &[&str], &str)] = &[
    (
        "Review the diff in PR 1432 for concurrency bugs",
        &["code", "review"],
        "code_review",
    ),
    (
        "Summarise this incident report for the on-call channel",
        &["summarise"],
        "summarisation",
    ),
    (
        "Extract invoice number, total and due date from the attached PDF",
        &["extract"],
        "extraction",
    ),
    (
        "Write a Rust function that parses RFC 3339 timestamps",
        &["code"],
        "code_generation",
    ),
    (
        "Classify this support ticket by urgency: 'checkout is down'",
        &[],
        "classification",
    ),
];

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
    let producer = Producer::new(client, Subjects::default());
    let mut inbox = producer.result_inbox().await?;
    let reply_to = inbox.subject().to_string();
    let printer = tokio::spawn(async move {
        while let Some(result) = inbox.next().await {
            match result {
                Ok(r) => {
                    tracing::info!(task_id = %r.task_id, status = ?r.status, worker = ?r.worker_id, output = %r.output, error = ?r.error, "result")
                }
                Err(e) => tracing::warn!(error = %e, "bad result"),
            }
        }
    });
    let mut i = 0u64;
    while args.count == 0 || i < args.count {
        let (desc, caps, task_type) = KINDS[(i as usize) % KINDS.len()];
        let mut task = Task::new(desc);
        task.capabilities = caps.iter().map(|c| c.to_string()).collect();
        task.attributes.insert("task_type".into(), task_type.into());
        let mut baggage = Baggage::new();
        baggage.insert(
            "team",
            if i.is_multiple_of(2) {
                "payments"
            } else {
                "search"
            },
        );
        baggage.insert("feature", task_type);
        let receipt = producer
            .submit(
                &task,
                SubmitOptions {
                    baggage,
                    reply_to: Some(reply_to.clone()),
                    ..Default::default()
                },
            )
            .await?;
        tracing::info!(task_id = %receipt.task_id, seq = receipt.stream_sequence, traceparent = %receipt.traceparent, "submitted");
        i += 1;
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    printer.abort();
    Ok(())
}
