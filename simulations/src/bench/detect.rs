//! `fleet-sim bench detect`: what detection costs. The detector runs once a second over the
//! fleet snapshot the fleet owner builds anyway (it adds nothing to the ingest path), so
//! its cost is the time of one evaluation: every rule over every agent and pool, the
//! alert lifecycle, and the escalation ladder's planning. The run feeds it snapshots of a
//! simulated fleet that moves every second (context, token rates, cost, queues), with a
//! few agents in trouble so alerts fire, renotify and resolve, and prints the time per
//! evaluation and the share of one core that is at 1 Hz.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleet_commander::config::PoolConfig;
use fleet_commander::detect::{Detector, intervene};
use fleet_commander::fleet::view::{FleetSnapshot, FleetView, PoolView, QueueView, WorkerView};
use fleet_commander::fleet::worker::{RepeatedCall, State};
use fleet_commander::policy::schema::{AlertSpec, EscalationAction, EscalationSpec};

#[derive(clap::Args)]
pub struct DetectArgs {
    /// Agents in the simulated fleet.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Pools they are spread over.
    #[arg(long, default_value_t = 20)]
    pools: usize,
    /// Evaluations (simulated seconds).
    #[arg(long, default_value_t = 600)]
    ticks: u64,
    /// Share of agents in trouble at any time (context, loops, stuck).
    #[arg(long, default_value_t = 0.01)]
    faulty: f64,
}

/// A cheap deterministic mix, so runs are comparable.
fn mix(a: u64, b: u64) -> u64 {
    let mut x = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_add(0xD1B5_4A32_D192_ED03);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}

fn unit(a: u64, b: u64) -> f64 {
    (mix(a, b) % 10_000) as f64 / 10_000.0
}

fn worker(i: usize, pools: usize, tick: u64, faulty: f64, now_ms: u64) -> WorkerView {
    let id = i as u64;
    // Trouble moves around the fleet every few minutes.
    let epoch = tick / 180;
    let in_trouble = unit(id, epoch) < faulty;
    let kind = mix(id, epoch) % 3;
    let context = if in_trouble && kind == 0 {
        0.96
    } else {
        0.2 + 0.5 * unit(id, tick)
    };
    let state = if in_trouble && kind == 2 {
        State::Stuck
    } else if unit(id, tick / 10) < 0.7 {
        State::Active
    } else {
        State::Idle
    };
    WorkerView {
        id: format!("agent-{i:05}"),
        pool: Some(format!("pool-{}", i % pools)),
        agent_name: None,
        state,
        state_since_ms: now_ms.saturating_sub(30_000),
        lost: false,
        stuck_reason: (state == State::Stuck).then(|| "no span for 15 minutes".into()),
        silent_run: Some(fleet_commander::fleet::worker::SilentRun {
            task_id: format!("task-{i}-{}", tick / 20),
            quiet_ms: if state == State::Stuck {
                900_000
            } else {
                2_000
            },
            expected_ms: 60_000,
            floor_ms: 30_000,
        }),
        model: Some("gpt-4o".into()),
        model_reported: None,
        provider: Some("openai".into()),
        model_unknown: false,
        version: None,
        sdk_version: Some("0.1.0".into()),
        current_task: Some(format!("task-{i}-{}", tick / 20)),
        current_task_type: Some(["summarisation", "code_review", "search"][i % 3].into()),
        running: 1,
        max_in_flight: Some(4),
        draining: false,
        paused: false,
        repeated_call: (in_trouble && kind == 1).then(|| RepeatedCall {
            task_id: format!("task-{i}-{}", tick / 20),
            tool: "web_search".into(),
            calls: 2 + (tick % 20) as u32,
        }),
        capabilities: vec![],
        context_tokens: Some((context * 128_000.0) as u64),
        context_limit_tokens: Some(128_000),
        context_utilisation: Some(context),
        output_tokens_per_s: 20.0 + 10.0 * unit(id, tick),
        last_call_output_tokens_per_s: Some(40.0),
        token_rate_vs_baseline: Some(0.8 + 0.4 * unit(id, tick + 1)),
        error_rate_5m: Some(0.01),
        tasks_completed: tick,
        tasks_failed: 0,
        cost_usd: 0.01 * tick as f64,
        cost_per_task_usd: Some(0.01),
        burn_rate_usd_per_h: 0.5 + 0.2 * unit(id, tick),
        unknown_cost_calls: 0,
        input_tokens: 1_000 * tick,
        output_tokens: 100 * tick,
        uptime_s: tick,
        first_seen_ms: 0,
        last_seen_ms: now_ms,
        last_heartbeat_ms: Some(now_ms),
    }
}

fn snapshot(args: &DetectArgs, tick: u64, now_ms: u64) -> FleetSnapshot {
    let mut workers: Vec<WorkerView> = (0..args.agents)
        .map(|i| worker(i, args.pools, tick, args.faulty, now_ms))
        .collect();
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    let mut states = BTreeMap::new();
    for w in &workers {
        *states.entry(w.state.as_str()).or_insert(0u64) += 1;
    }
    let per_pool = (args.agents / args.pools.max(1)) as u64;
    let pools = (0..args.pools)
        .map(|p| PoolView {
            name: format!("pool-{p}"),
            configured: true,
            workers: per_pool,
            active: per_pool * 7 / 10,
            utilisation: Some(0.7),
            queue: Some(QueueView {
                pending: 10 + (mix(p as u64, tick) % 50),
                ack_pending: 5,
                depth: 15 + (mix(p as u64, tick) % 50),
                read_at_ms: now_ms,
            }),
            tasks_per_min: 300,
            failed_per_min: 3,
            ..Default::default()
        })
        .collect();
    FleetSnapshot {
        fleet: FleetView {
            at_ms: now_ms,
            workers: args.agents as u64,
            states,
            output_tokens_per_s: 25.0 * args.agents as f64,
            burn_rate_usd_per_h: 0.6 * args.agents as f64,
            cost_last_hour_usd: 0.6 * args.agents as f64,
            error_rate_5m: Some(0.01),
            ops_5m: 100_000,
            ..Default::default()
        },
        pools,
        workers,
        ..Default::default()
    }
}

fn steps() -> Vec<EscalationSpec> {
    let step = |name: &str, rules: &[&str], action, tasks_per_s| EscalationSpec {
        name: name.into(),
        rules: rules.iter().map(|r| r.to_string()).collect(),
        severity: "warning".into(),
        after_s: 30,
        action,
        tasks_per_s,
        sink: None,
        block: None,
        sticky: false,
    };
    vec![
        step(
            "brake",
            &["tool_loop", "context_overflow_risk"],
            EscalationAction::Throttle,
            Some(0.5),
        ),
        step(
            "stop",
            &["tool_loop_runaway", "context_critical"],
            EscalationAction::Pause,
            None,
        ),
        step("log", &[], EscalationAction::Log, None),
    ]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn run(args: DetectArgs) -> Result<(), String> {
    let spec = AlertSpec::default();
    let pools: BTreeMap<String, PoolConfig> = (0..args.pools)
        .map(|p| {
            (
                format!("pool-{p}"),
                PoolConfig {
                    max_queue_depth: Some(1_000),
                    ..Default::default()
                },
            )
        })
        .collect();
    let steps = steps();
    let mut detector = Detector::new(100_000);
    let mut taken = std::collections::HashSet::new();
    let mut eval = Vec::with_capacity(args.ticks as usize);
    let mut built = Vec::with_capacity(args.ticks as usize);
    let (mut changes, mut peak_open, mut interventions) = (0usize, 0usize, 0usize);
    let t0 = 1_800_000_000_000u64;
    for tick in 0..args.ticks {
        let now_ms = t0 + tick * 1000;
        let b = Instant::now();
        let snap = snapshot(&args, tick, now_ms);
        built.push(b.elapsed());
        let start = Instant::now();
        let changed = detector.tick(&snap, &spec, &pools, now_ms);
        let open = detector.open();
        let due = intervene::due(&open, &steps, &snap, |id| taken.contains(id), now_ms);
        let active: Vec<_> = due
            .iter()
            .filter(|i| i.controls_workers())
            .cloned()
            .collect();
        let want = intervene::desired(&active, &snap);
        eval.push(start.elapsed());
        changes += changed.len();
        peak_open = peak_open.max(open.len());
        interventions += due.len();
        for i in due {
            taken.insert(i.id);
        }
        std::hint::black_box(want);
    }
    let mut sorted = eval.clone();
    sorted.sort();
    let pct = |p: f64| sorted[((sorted.len() as f64 - 1.0) * p) as usize];
    let mean = eval.iter().sum::<Duration>() / eval.len().max(1) as u32;
    let build_mean = built.iter().sum::<Duration>() / built.len().max(1) as u32;
    let share = mean.as_secs_f64() * 100.0;
    println!(
        "detect: {} agents, {} pools, {} evaluations at 1 Hz ({} alert changes, at most {} open, {} interventions planned)",
        args.agents, args.pools, args.ticks, changes, peak_open, interventions
    );
    println!(
        "  per evaluation: mean {:.2} ms, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(mean),
        ms(pct(0.5)),
        ms(pct(0.99)),
        ms(*sorted.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "  = {share:.2}% of one core at 1 Hz (target <= 5%): {}",
        if share <= 5.0 { "met" } else { "NOT met" }
    );
    println!(
        "  (the snapshot itself, built by the fleet owner each second whether or not anything detects: {:.2} ms here)",
        ms(build_mean)
    );
    drift(&args, &spec);
    Ok(())
}

/// Behavioural drift: an hour of finished runs (each agent finishes one a minute) booked
/// into the fingerprints, one prompt variant's tool mix shifted in the last 15 minutes,
/// and one evaluation of every group timed (it runs every `drift_interval_s`, on a
/// blocking thread).
fn drift(args: &DetectArgs, spec: &AlertSpec) {
    use fleet_commander::detect::drift::Job;
    use fleet_commander::fleet::prints::Prints;
    use fleet_commander::fleet::worker::TaskSummary;
    let t0 = 1_800_000_000_000u64;
    let hour = 3_600_000u64;
    let mut prints = Prints::default();
    let tools = [
        "web_search",
        "read_page",
        "summarise",
        "run_code",
        "ask_user",
    ];
    let mut booked = Duration::ZERO;
    let mut runs = 0u64;
    for minute in 0..60u64 {
        for i in 0..args.agents {
            let id = i as u64;
            let variant = i % 5;
            let shifted = variant == 3 && minute >= 45;
            let len = 2 + (mix(id, minute) % 5) as usize;
            let calls: Vec<String> = (0..len)
                .map(|k| {
                    let u = unit(id ^ (k as u64) << 32, minute);
                    let t = if shifted && u < 0.5 {
                        0
                    } else {
                        (u * tools.len() as f64) as usize % tools.len()
                    };
                    tools[t].to_string()
                })
                .collect();
            let run = TaskSummary {
                task_type: Some(["summarisation", "code_review", "search"][i % 3].into()),
                steps: 2 * len as u32,
                prompt_variant: Some(format!("v{variant}")),
                tools: calls,
                ..Default::default()
            };
            let pool = format!("pool-{}", i % args.pools);
            let at = t0 + minute * 60_000 + (id * 60_000 / args.agents.max(1) as u64);
            let start = Instant::now();
            prints.add(Some(&pool), &run, at);
            booked += start.elapsed();
            runs += 1;
        }
    }
    let start = Instant::now();
    prints.tick(t0 + hour);
    let view_built = start.elapsed();
    let view = prints.view();
    let job = Job::new(view, spec, Default::default(), 1);
    let start = Instant::now();
    let found = job.run();
    let took = start.elapsed();
    let share = took.as_secs_f64() * 100.0 / spec.drift_interval_s as f64;
    println!(
        "drift: {} groups, {} runs booked ({:.2} µs each, on the owner per finished run), readers' copy rebuilt in {:.2} ms (every 30 s)",
        job.view.groups.len(),
        runs,
        booked.as_secs_f64() * 1e6 / runs.max(1) as f64,
        ms(view_built),
    );
    println!(
        "  one evaluation at level {:.1e}: {:.2} ms = {share:.3}% of one core at one per {} s; drifted: {}",
        job.level(),
        ms(took),
        spec.drift_interval_s,
        found
            .iter()
            .filter(|o| o.active)
            .map(|o| format!("{:?}", o.labels))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
