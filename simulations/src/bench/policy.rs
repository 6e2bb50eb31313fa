//! `fleet-sim bench policy`: how long from writing a policy file to the first routing
//! decision made under the new version, while a producer keeps tasks flowing. The clock
//! starts when the file is renamed into the watched directory and stops when a decision
//! carrying the new version arrives on `<prefix>.decisions.>` (the commander publishes
//! each decision as it logs it).

use std::time::{Duration, Instant};

use fleet_testkit::{Commander, CommanderOptions, NatsServer, commander_bin};
use fleet_worker::{Producer, Subjects, SubmitOptions, Task, TaskOutput, Worker, WorkerConfig};
use futures::StreamExt;

#[derive(clap::Args)]
pub struct PolicyArgs {
    /// Policy changes to measure.
    #[arg(long, default_value_t = 20)]
    swaps: usize,
    /// Tasks per second submitted throughout.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// The commander binary (default: next to this one).
    #[arg(long)]
    commander_bin: Option<std::path::PathBuf>,
}

fn policy_text(i: usize) -> String {
    // Each swap changes a limit, so every file is a new version.
    format!(
        "[[budget]]\nname = \"fleet-day\"\nscope = \"fleet\"\nwindow = \"day\"\nlimit_usd = {}\naction = \"defer\"\n\n[[throttle]]\nname = \"bench-rate\"\nscope = \"pool\"\nmatch = \"bench0\"\ntasks_per_s = {}\nburst = 100\n",
        1_000 + i,
        10_000 + i
    )
}

/// Starts the broker and a commander on a policy directory, drives load, swaps the policy
/// file N times measuring each swap to the first decision under it, and prints.
pub async fn run(args: PolicyArgs) -> Result<(), String> {
    let nats = NatsServer::start().map_err(|e| e.to_string())?;
    let client = async_nats::connect(nats.url())
        .await
        .map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).map_err(|e| e.to_string())?;
    let file = policies.join("bench.policy.toml");
    std::fs::write(&file, policy_text(0)).map_err(|e| e.to_string())?;
    let commander = Commander::start(&CommanderOptions {
        bin: args.commander_bin.clone().unwrap_or_else(commander_bin),
        nats_url: Some(nats.url().to_string()),
        config_toml: format!("[pools.bench0]\n[policy]\ndir = {:?}\n", policies),
        data_dir: dir.path().join("commander"),
        extra_env: vec![("RUST_LOG".into(), "warn,fleet_commander::serve=info".into())],
        extra_args: vec![],
    })
    .map_err(|e| e.to_string())?;

    let workers = start_workers(&client).await?;

    // Decisions as they are made: (arrival, policy version).
    let mut decisions = client
        .subscribe("fleet.decisions.>")
        .await
        .map_err(|e| e.to_string())?;
    let _ = client.flush().await;

    let feeder = steady_producer(&client, args.rate.max(1));

    let http = commander.http().to_string();
    let version = async || -> Result<String, String> {
        let v: serde_json::Value = reqwest::get(format!("{http}/v1/policy"))
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        Ok(v["version"].as_str().unwrap_or_default().to_string())
    };
    let mut samples = Vec::new();
    let mut current = version().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 1..=args.swaps {
        // Drain what arrived before the swap.
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(1), decisions.next()).await
        {}
        let tmp = policies.join(".bench.tmp");
        std::fs::write(&tmp, policy_text(i)).map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        std::fs::rename(&tmp, &file).map_err(|e| e.to_string())?;
        let (lat, v) = first_decision_after(&mut decisions, &current, t0)
            .await
            .ok_or_else(|| format!("swap {i}: no decision under a new version within 10 s"))?;
        println!(
            "swap {i:>3}: {current} -> {v}: first decision after {:>6.1} ms",
            lat.as_secs_f64() * 1000.0
        );
        samples.push(lat);
        current = v;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    feeder.abort();
    drop(workers);
    drop(commander);
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    println!();
    println!(
        "bench policy: {} swaps under {} tasks/s, nats-server {}",
        samples.len(),
        args.rate,
        client.server_info().version
    );
    println!(
        "  file write -> first decision under the new version: p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms (goal <= 1000 ms)",
        ms(pct(0.5)),
        ms(pct(0.95)),
        ms(*samples.last().unwrap_or(&Duration::ZERO))
    );
    println!("  (includes the watcher's 100 ms debounce and the 50 ms stable-read check)");
    Ok(())
}

/// Two workers on pool `bench0` that answer at once.
async fn start_workers(
    client: &async_nats::Client,
) -> Result<Vec<fleet_worker::WorkerHandle>, String> {
    let mut workers = Vec::new();
    for w in 0..2 {
        let mut cfg = WorkerConfig::new("bench0", format!("bench0-w{w}"));
        cfg.max_in_flight = 64;
        workers.push(
            Worker::start(client.clone(), cfg, |_ctx| async {
                Ok(TaskOutput {
                    output: serde_json::Value::Null,
                    usage: None,
                })
            })
            .await
            .map_err(|e| e.to_string())?,
        );
    }
    Ok(workers)
}

/// Submits `rate` tasks a second to `bench0` until aborted.
fn steady_producer(client: &async_nats::Client, rate: u64) -> tokio::task::JoinHandle<()> {
    let producer = Producer::new(client.clone(), Subjects::default());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        let mut i = 0u64;
        loop {
            tick.tick().await;
            let mut t = Task::new(format!("bench task {}", i % 64));
            t.pool = Some("bench0".into());
            if let Ok(ack) = producer
                .submit_pipelined(&t, SubmitOptions::default())
                .await
            {
                tokio::spawn(ack);
            }
            i += 1;
        }
    })
}

/// The time from `t0` to the first decision made under a version other than `current`,
/// and that version; `None` after 10 s.
async fn first_decision_after(
    decisions: &mut async_nats::Subscriber,
    current: &str,
    t0: Instant,
) -> Option<(Duration, String)> {
    let deadline = t0 + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(1), decisions.next()).await
        else {
            continue;
        };
        let d: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
        let v = d["policy_version"].as_str().unwrap_or_default();
        if !v.is_empty() && v != current {
            return Some((t0.elapsed(), v.to_string()));
        }
    }
    None
}
