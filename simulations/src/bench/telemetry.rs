//! Telemetry benchmarks.
//!
//! - `fleet-sim bench ingest`: OTLP spans/s into the live state on one core (decode +
//!   normalise + apply), and, in the same run over the same batches, prost decode alone;
//!   both figures and the ratio. Batches of 512 spans with ~15 attributes each. Then the
//!   same with trace keeping on (the built-in policy's sampling and redaction): the keeper
//!   on the same thread (the whole cost, in series), and on a thread of its own behind a
//!   bounded queue as in the commander (the ingest thread's rate, the keeper's, what was
//!   shed).
//! - `fleet-sim bench rss`: the commander's resident memory with N simulated workers
//!   sending heartbeats and GenAI spans over NATS.

use std::hint::black_box;
use std::time::{Duration, Instant};

use crate::otlp::{i, s};
use bytes::Bytes;
use fleet_commander::config::FleetConfig;
use fleet_commander::domain::SpanFacts;
use fleet_commander::fleet::{FleetState, now_ms};
use fleet_commander::ingest::normalise;
use fleet_commander::ingest::normalise::wire::TraceRequest;
use fleet_commander::registry::Registry;
use fleet_worker::message::{Heartbeat, WorkerState, now_rfc3339};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;

#[derive(clap::Args)]
pub struct IngestArgs {
    /// Batches per round.
    #[arg(long, default_value_t = 400)]
    batches: usize,
    /// Spans per batch.
    #[arg(long, default_value_t = 512)]
    spans_per_batch: usize,
    /// Distinct workers the spans come from.
    #[arg(long, default_value_t = 1_000)]
    workers: usize,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(clap::Args)]
pub struct RssArgs {
    /// Simulated workers.
    #[arg(long, default_value_t = 10_000)]
    workers: usize,
    /// Rounds of one heartbeat and one task's spans (chat, tool, task) per worker.
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Pause between rounds, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    interval_ms: u64,
    /// The commander binary (default: next to this one).
    #[arg(long)]
    commander_bin: Option<std::path::PathBuf>,
    /// Also measure, in this process, the live state with every worker's hour of 10 s
    /// buckets full (the per-worker ceiling), driven by a simulated clock.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    full_hour: bool,
}

const MODELS: [&str; 4] = [
    "claude-sonnet-4-5",
    "gpt-4o",
    "gemini-2.0-flash",
    "gpt-4o-mini",
];
const TEAMS: [&str; 4] = ["search", "ads", "payments", "support"];

/// Task `task`'s trace id: the task number, then bits that look random, as W3C trace ids
/// are (the healthy sample reads them).
fn trace_of(task: u64) -> Vec<u8> {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&task.to_be_bytes());
    t[8..].copy_from_slice(&crate::lab::agents::Rng::new(task).next().to_be_bytes());
    t.to_vec()
}

/// One span of a task run: an LLM call, a tool call or (every fourth) the task's root.
/// LLM spans carry 15 attributes, tool and root spans 14-15.
fn sim_span(n: u64, task: u64) -> Span {
    let task_id = format!("task-{task}");
    let start = 1_700_000_000_000_000_000 + n * 1_000_000;
    // The task's root is its fourth span; the others are its children. Its own parent is
    // the commander's dispatch span, not in this export.
    // Span ids are unique within their task's trace: 1-3 the calls, 4 the root.
    let root_id = 4u64.to_be_bytes();
    let is_root = n % 4 == 3;
    let mut span = Span {
        trace_id: trace_of(task),
        span_id: (n % 4 + 1).to_be_bytes().to_vec(),
        parent_span_id: if is_root {
            vec![0xab; 8]
        } else {
            root_id.to_vec()
        },
        start_time_unix_nano: start,
        end_time_unix_nano: start + 800_000_000,
        ..Default::default()
    };
    let common = [
        s("fleet.task.id", task_id),
        s("team", TEAMS[(task % 4) as usize]),
        s("feature", format!("feature-{}", task % 13)),
        s(
            "user_tier",
            if task.is_multiple_of(5) {
                "enterprise"
            } else {
                "free"
            },
        ),
        // One task type per model, as a rubric routes a type to its tier's model.
        s(
            "fleet.task.type",
            ["code_review", "qa", "summarisation", "extraction"][(task % 4) as usize],
        ),
    ];
    match n % 4 {
        0 | 1 => {
            let model = MODELS[(task % 4) as usize];
            span.name = format!("chat {model}");
            span.kind = 3;
            span.attributes = vec![
                s("gen_ai.operation.name", "chat"),
                s("gen_ai.provider.name", "openai"),
                s("gen_ai.request.model", model),
                s("gen_ai.response.model", model),
                s("gen_ai.response.id", format!("chatcmpl-{n}")),
                i("gen_ai.usage.input_tokens", 1_000 + (n % 5_000) as i64),
                i("gen_ai.usage.output_tokens", 100 + (n % 700) as i64),
                i("gen_ai.usage.cache_read.input_tokens", (n % 500) as i64),
                s("server.address", "api.openai.com"),
                i("server.port", 443),
            ];
        }
        2 => {
            span.name = "execute_tool grep".into();
            span.attributes = vec![
                s("gen_ai.operation.name", "execute_tool"),
                s(
                    "gen_ai.tool.name",
                    ["grep", "read_file", "web_search"][(n % 3) as usize],
                ),
                s("gen_ai.tool.call.id", format!("call_{n}")),
                s("gen_ai.tool.type", "function"),
                s("code.function", "run_tool"),
                s("thread.name", "worker-1"),
                i("thread.id", 7),
                s("code.filepath", "agent/tools.py"),
                s("gen_ai.agent.name", "reviewer"),
            ];
        }
        _ => {
            span.name = "process fleet.work.code".into();
            span.kind = 5;
            span.attributes = vec![
                s("messaging.system", "nats"),
                s("messaging.operation.type", "process"),
                s("messaging.destination.name", "fleet.work.code"),
                s("messaging.consumer.group.name", "pool-code"),
                i("fleet.attempt", 1),
                i("fleet.delivered", 1),
                s("fleet.pool", "code"),
                s("messaging.message.id", format!("{task}:1")),
                s("messaging.client.id", "worker-7"),
            ];
        }
    }
    span.attributes.extend(common);
    span
}

fn worker_resource(w: usize) -> Resource {
    Resource {
        attributes: vec![
            s("service.name", "fleet-worker"),
            s("service.instance.id", format!("sim-{w}")),
            s("fleet.worker.id", format!("sim-{w}")),
            s("fleet.pool", format!("pool{}", w % 8)),
            s("service.version", "1.0.0"),
        ],
        ..Default::default()
    }
}

/// Worker `w`'s spans as one OTLP resource.
fn worker_spans(w: usize, spans: Vec<Span>) -> ResourceSpans {
    ResourceSpans {
        resource: Some(worker_resource(w)),
        scope_spans: vec![ScopeSpans {
            spans,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// One finished task per worker (LLM call, tool call, root span); worker `w`'s task is
/// number `first_task + w`.
fn one_task_each(workers: &[usize], first_task: u64) -> Vec<ResourceSpans> {
    workers
        .iter()
        .map(|&w| {
            let t = first_task + w as u64;
            let spans = [0u64, 2, 3]
                .iter()
                .map(|k| sim_span(t * 4 + k, t))
                .collect();
            worker_spans(w, spans)
        })
        .collect()
}

/// One OTLP batch: `spans` spans from 8 workers.
fn batch(b: usize, spans: usize, workers: usize) -> ExportTraceServiceRequest {
    batch_of_round(b, spans, workers, 0)
}

/// Batch `b` of round `round`: the same shape, other traces (task numbers moved on by a
/// billion a round), so a keeper that lives through the rounds meets new traces.
fn batch_of_round(b: usize, spans: usize, workers: usize, round: u64) -> ExportTraceServiceRequest {
    let per = spans.div_ceil(8);
    let resource_spans = (0..8)
        .map(|r| {
            let w = (b * 8 + r) % workers.max(1);
            let spans = (0..per)
                .map(|k| {
                    let n = (b * spans + r * per + k) as u64;
                    sim_span(n, n / 4 + round * 1_000_000_000)
                })
                .collect();
            worker_spans(w, spans)
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

#[expect(
    clippy::print_stdout,
    reason = "the figures are what the benchmark prints"
)]
pub fn ingest(args: IngestArgs) -> Result<(), String> {
    let registry = fleet_commander::hot::fixed(Registry::builtin().map_err(|e| e.to_string())?);
    let batches: Vec<Bytes> = (0..args.batches)
        .map(|b| Bytes::from(batch(b, args.spans_per_batch, args.workers).encode_to_vec()))
        .collect();
    let spans: usize = batches
        .iter()
        .map(|b| {
            ExportTraceServiceRequest::decode(b.as_ref())
                .map(|r| {
                    r.resource_spans
                        .iter()
                        .map(|rs| rs.scope_spans[0].spans.len())
                        .sum::<usize>()
                })
                .unwrap_or(0)
        })
        .sum();
    let attrs: usize = ExportTraceServiceRequest::decode(batches[0].as_ref())
        .map(|r| {
            r.resource_spans[0].scope_spans[0]
                .spans
                .iter()
                .map(|s| s.attributes.len())
                .sum::<usize>()
                / r.resource_spans[0].scope_spans[0].spans.len()
        })
        .unwrap_or(0);
    let bytes: usize = batches.iter().map(Bytes::len).sum();
    println!(
        "ingest bench: {} batches × {} spans ({} spans, {:.1} attributes/span on average, {:.0} bytes/span), {} workers, one thread",
        args.batches,
        args.spans_per_batch,
        spans,
        attrs,
        bytes as f64 / spans as f64,
        args.workers
    );
    let (mut best_decode, mut best_full, mut best_kept) = (0f64, 0f64, 0f64);
    // One keeper for every round, as in a commander that runs on: from the second round
    // on it holds and decides at its steady state (the first fills its buffer).
    let mut rig = super::traces::Rig::new(None, now_ms())?;
    let mut piped_rig = super::traces::Rig::new(None, now_ms())?;
    let mut piped_state = FleetState::new(
        FleetConfig::default(),
        registry.clone(),
        std::iter::empty::<&str>(),
    );
    let (mut best_piped, mut best_keeper) = (0f64, 0f64);
    let mut kept_state = FleetState::new(
        FleetConfig::default(),
        registry.clone(),
        std::iter::empty::<&str>(),
    );
    for round in 1..=args.rounds {
        let decode = decode_alone(&batches, spans)?;
        let full = into_live_state(&batches, spans, &registry)?;
        let fresh: Vec<Bytes> = (0..args.batches)
            .map(|b| {
                let r = batch_of_round(b, args.spans_per_batch, args.workers, round as u64);
                Bytes::from(r.encode_to_vec())
            })
            .collect();
        let kept = with_keeper(&mut rig, &mut kept_state, &fresh, spans)?;
        let piped = keeper_beside(&mut piped_rig, &mut piped_state, &fresh, spans)?;
        best_piped = best_piped.max(piped.0);
        best_keeper = best_keeper.max(piped.1);
        println!(
            "round {round}: prost decode alone {decode:>10.0} spans/s | decode + normalise + live state {full:>10.0} spans/s (ratio {:.2}) | + trace keeper {kept:>10.0} spans/s (ratio {:.2})",
            full / decode,
            kept / decode
        );
        println!(
            "         keeper on its own thread: into live state {:>10.0} spans/s (ratio {:.2}) | the keeper {:>10.0} spans/s | shed {} spans",
            piped.0,
            piped.0 / decode,
            piped.1,
            piped.2
        );
        best_decode = best_decode.max(decode);
        best_full = best_full.max(full);
        best_kept = best_kept.max(kept);
    }
    println!(
        "best: decode alone {best_decode:.0} spans/s, into live state {best_full:.0} spans/s, ratio {:.2} (goal >= 0.5)",
        best_full / best_decode
    );
    println!(
        "best with sampling and redaction on the same thread: {best_kept:.0} spans/s, ratio {:.2}",
        best_kept / best_decode
    );
    println!(
        "best with the keeper on its own thread, as in the commander: into live state {best_piped:.0} spans/s, ratio {:.2} (goal >= 0.5); the keeper {best_keeper:.0} spans/s",
        best_piped / best_decode
    );
    Ok(())
}

/// Prost decode alone of `batches`: spans/s.
fn decode_alone(batches: &[Bytes], spans: usize) -> Result<f64, String> {
    let t = Instant::now();
    for b in batches {
        let req = ExportTraceServiceRequest::decode(b.as_ref()).map_err(|e| e.to_string())?;
        black_box(req);
    }
    Ok(spans as f64 / t.elapsed().as_secs_f64())
}

/// Decode, normalise and apply `batches` to a fresh live state: spans/s.
fn into_live_state(
    batches: &[Bytes],
    spans: usize,
    registry: &std::sync::Arc<dyn fleet_commander::hot::InForce<Registry>>,
) -> Result<f64, String> {
    let mut state = FleetState::new(
        FleetConfig::default(),
        registry.clone(),
        std::iter::empty::<&str>(),
    );
    let t = Instant::now();
    for b in batches {
        let req = TraceRequest::parse(b).map_err(|e| e.to_string())?;
        let (events, rejected) = normalise::span_events(&req);
        black_box(rejected);
        state.apply_spans(events, now_ms());
    }
    let rate = spans as f64 / t.elapsed().as_secs_f64();
    black_box(state.worker_count());
    Ok(rate)
}

/// The same batches into the live state and `rig`'s trace keeper (the built-in policy:
/// 10 % healthy, the shipped redaction rules, sled), all on this thread. Both live through
/// the rounds, as in a commander that runs on. The keeper's clock moves 20 ms a batch
/// (25,600 spans/s: the held spans fit the default 64 MiB buffer), so traces are decided
/// 2 s (100 batches) after their root, within the round. Spans/s.
fn with_keeper(
    rig: &mut super::traces::Rig,
    state: &mut FleetState,
    batches: &[Bytes],
    spans: usize,
) -> Result<f64, String> {
    let start = fleet_commander::domain::Clock::now_ms(rig.clock.as_ref()) + 10;
    let mut snap = fleet_commander::fleet::view::FleetSnapshot::default();
    let t = Instant::now();
    for (k, b) in batches.iter().enumerate() {
        let at = start + k as u64 * 20;
        rig.clock.set(at);
        let req = TraceRequest::parse(b).map_err(|e| e.to_string())?;
        let (events, rejected) = normalise::span_events(&req);
        black_box(rejected);
        let facts = events.iter().map(SpanFacts::of).collect();
        state.apply_spans(events, at);
        rig.keeper
            .add(fleet_commander::ingest::TraceBatch::new(b.clone(), facts));
        // The owner rebuilds its snapshot once a second; here every 100 batches.
        if k % 100 == 0 {
            snap = state.snapshot(at);
        }
        rig.keeper.tick(&snap);
    }
    let rate = spans as f64 / t.elapsed().as_secs_f64();
    black_box(rig.store.len());
    Ok(rate)
}

/// As `with_keeper`, with the keeper on a second thread behind a bounded queue of 1,024
/// exports, as the commander runs it (`ingest::TraceTap`; a full queue sheds, counted).
/// Returns spans/s into the live state (the ingest thread's rate), spans/s through the
/// keeper (until it has taken the last export), and spans shed.
fn keeper_beside(
    rig: &mut super::traces::Rig,
    state: &mut FleetState,
    batches: &[Bytes],
    spans: usize,
) -> Result<(f64, f64, u64), String> {
    use std::sync::{Arc, Mutex, mpsc};
    let start = fleet_commander::domain::Clock::now_ms(rig.clock.as_ref()) + 10;
    let snap = Arc::new(Mutex::new(Arc::new(
        fleet_commander::fleet::view::FleetSnapshot::default(),
    )));
    let (tx, rx) = mpsc::sync_channel::<fleet_commander::ingest::TraceBatch>(1_024);
    let clock = rig.clock.clone();
    let keeper = &mut rig.keeper;
    let t = Instant::now();
    let (ingest_s, keeper_s, shed) = std::thread::scope(|scope| {
        let shared = snap.clone();
        let worker = scope.spawn(move || {
            for b in rx {
                keeper.add(b);
                let s = shared.lock().map(|g| g.clone()).unwrap_or_default();
                keeper.tick(&s);
            }
            t.elapsed().as_secs_f64()
        });
        let mut shed = 0u64;
        for (k, b) in batches.iter().enumerate() {
            let at = start + k as u64 * 20;
            clock.set(at);
            let Ok(req) = TraceRequest::parse(b) else {
                continue;
            };
            let (events, rejected) = normalise::span_events(&req);
            black_box(rejected);
            let n = events.len() as u64;
            // As ingest does: the keeper's facts are read before the live state takes
            // the events.
            let facts = events.iter().map(SpanFacts::of).collect();
            state.apply_spans(events, at);
            if tx
                .try_send(fleet_commander::ingest::TraceBatch::new(b.clone(), facts))
                .is_err()
            {
                shed += n;
            }
            if k % 100 == 0
                && let Ok(mut g) = snap.lock()
            {
                *g = Arc::new(state.snapshot(at));
            }
        }
        let ingest_s = t.elapsed().as_secs_f64();
        drop(tx);
        let keeper_s = worker.join().unwrap_or(f64::INFINITY);
        (ingest_s, keeper_s, shed)
    });
    Ok((spans as f64 / ingest_s, spans as f64 / keeper_s, shed))
}

/// Resident memory now and at its peak (VmRSS, VmHWM), in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

async fn fleet_json(http: &str) -> Result<serde_json::Value, String> {
    reqwest::get(format!("{http}/v1/fleet"))
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())
}

/// The memory benchmark as one script (about 120 lines), kept whole so the order of load
/// and measurement is visible in one place.
#[expect(
    clippy::print_stdout,
    reason = "the figures are what the benchmark prints"
)]
pub async fn rss(args: RssArgs) -> Result<(), String> {
    let fleet = super::simulated_fleet(args.commander_bin.clone(), args.workers, "")?;
    let (server, cmd, pid) = (&fleet.server, &fleet.commander, fleet.pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle, _) = rss_kib(pid).ok_or("cannot read /proc")?;
    println!(
        "rss bench: {} workers, {} rounds of heartbeat + chat/tool/task spans, {} ms apart",
        args.workers, args.rounds, args.interval_ms
    );
    println!("commander idle RSS: {:.1} MiB", idle as f64 / 1024.0);

    let client = async_nats::connect(server.url())
        .await
        .map_err(|e| e.to_string())?;
    let started = now_rfc3339();
    let mut task = 0u64;
    for round in 0..args.rounds {
        let t = Instant::now();
        for chunk in (0..args.workers).collect::<Vec<_>>().chunks(16) {
            for &w in chunk {
                let hb = Heartbeat {
                    schema: 1,
                    worker_id: format!("sim-{w}"),
                    pool: format!("pool{}", w % 8),
                    state: WorkerState::Active,
                    model: Some(MODELS[w % 4].into()),
                    current_tasks: vec![format!("task-{}", task + w as u64)],
                    max_in_flight: 4,
                    context_tokens: Some(10_000),
                    capabilities: vec!["code".into()],
                    completed: round as u64,
                    failed: 0,
                    sdk_version: Some("0.1.0".into()),
                    started_at: started.clone(),
                    sent_at: now_rfc3339(),
                };
                let mut h = async_nats::HeaderMap::new();
                h.insert("Fleet-Kind", "heartbeat");
                let body = serde_json::to_vec(&hb).map_err(|e| e.to_string())?;
                client
                    .publish_with_headers(
                        format!("fleet.telemetry.pool{}.sim-{w}", w % 8),
                        h,
                        body.into(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
            }
            // One OTLP export per 16 workers: each worker's task, as chat + tool + root.
            let resource_spans = one_task_each(chunk, task);
            let mut h = async_nats::HeaderMap::new();
            h.insert("Fleet-Kind", "otlp-traces");
            client
                .publish_with_headers(
                    "fleet.telemetry.sim.batch",
                    h,
                    ExportTraceServiceRequest { resource_spans }
                        .encode_to_vec()
                        .into(),
                )
                .await
                .map_err(|e| e.to_string())?;
            if chunk[0].is_multiple_of(1024) {
                // Pace the burst below the subscription buffer.
                client.flush().await.map_err(|e| e.to_string())?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        client.flush().await.map_err(|e| e.to_string())?;
        task += args.workers as u64;
        println!(
            "round {}: sent in {:.2} s",
            round + 1,
            t.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut fleet = fleet_json(cmd.http()).await?;
    while fleet["workers"].as_u64() != Some(args.workers as u64) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        fleet = fleet_json(cmd.http()).await?;
    }
    // Let a few snapshots be built and freed, then read.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss, hwm) = rss_kib(pid).ok_or("cannot read /proc")?;
    println!(
        "workers tracked: {} (states {})",
        fleet["workers"], fleet["states"]
    );
    println!(
        "commander RSS with {} workers: {:.1} MiB (peak {:.1} MiB); {:.1} KiB per worker above idle (goal <= 256 MiB)",
        args.workers,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        (rss.saturating_sub(idle)) as f64 / args.workers.max(1) as f64
    );
    drop(fleet);
    if args.full_hour {
        full_hour(args.workers)?;
    }
    Ok(())
}

/// The ceiling: every worker active in every 10 s bucket of an hour (360 buckets each), 20
/// recent runs, several tools, measured as this process's RSS growth.
#[expect(
    clippy::print_stdout,
    reason = "the figures are what the benchmark prints"
)]
fn full_hour(workers: usize) -> Result<(), String> {
    let pid = std::process::id();
    let registry = fleet_commander::hot::fixed(Registry::builtin().map_err(|e| e.to_string())?);
    let cfg = FleetConfig {
        max_workers: workers * 2,
        lost_after_ms: u64::MAX / 4,
        silent_lost_after_ms: u64::MAX / 4,
        ..FleetConfig::default()
    };
    let (before, _) = rss_kib(pid).ok_or("cannot read /proc")?;
    let mut state = FleetState::new(cfg, registry, std::iter::empty::<&str>());
    let t0 = now_ms();
    let started = Instant::now();
    for bucket in 0..WORKER_BUCKETS_FULL {
        let now = t0 + bucket * 10_000;
        for chunk in (0..workers).collect::<Vec<_>>().chunks(64) {
            let resource_spans = one_task_each(chunk, bucket * workers as u64);
            let (events, _) = normalise::spans(&ExportTraceServiceRequest { resource_spans });
            state.apply_spans(events, now);
        }
        if bucket % 60 == 59 {
            state.tick(now);
        }
    }
    let snap = state.snapshot(t0 + 3_600_000);
    let (after, _) = rss_kib(pid).ok_or("cannot read /proc")?;
    println!(
        "full hour, in process: {} workers × 360 buckets ({} spans in {:.0} s): live state {:.1} MiB, {:.1} KiB per worker",
        snap.workers.len(),
        360 * 3 * workers,
        started.elapsed().as_secs_f64(),
        after.saturating_sub(before) as f64 / 1024.0,
        after.saturating_sub(before) as f64 / workers.max(1) as f64
    );
    Ok(())
}

/// Buckets in an hour of 10 s buckets.
pub const WORKER_BUCKETS_FULL: u64 = 360;
