//! `route::decide` against fleets of 1,000 and 10,000 workers, and the per-second
//! routing snapshot those decisions read.
//!
//! `cargo bench -p fleet-commander --bench decide` prints criterion's figures, then a
//! latency distribution of single decisions (each timed on its own, 200,000 per fleet
//! size) with the p50 / p99 / p99.9 the goal is stated in (p99 ≤ 20 µs at 1,000).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    reason = "benchmark: a failed setup is a failed run, and the figures are its output"
)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use fleet_commander::classify::Answer;
use fleet_commander::classify::rubric::Rubric;
use fleet_commander::config::{FleetConfig, PoolConfig, RoutingConfig};
use fleet_commander::fleet::FleetState;
use fleet_commander::registry::Registry;
use fleet_commander::route::{DecideInput, PolicyHints, RouteSnapshot, RoutingTable, decide};
use fleet_worker::message::{Heartbeat, Task, WorkerState, now_rfc3339};

const POOLS: [(&str, &[&str]); 6] = [
    ("code", &["code", "review"]),
    ("docs", &["summarise", "extract"]),
    ("general", &[]),
    ("code-b", &["code", "review"]),
    ("docs-b", &["summarise", "extract"]),
    ("batch", &[]),
];

struct Setup {
    rubric: Rubric,
    registry: Registry,
    table: RoutingTable,
    fleet: FleetState,
    now: u64,
    tasks: Vec<(Task, Answer)>,
}

fn setup(workers: usize) -> Setup {
    let mut table = RoutingTable {
        pools: Default::default(),
        routing: RoutingConfig {
            default_pool: Some("general".into()),
            ..Default::default()
        },
    };
    for (name, caps) in POOLS {
        table.pools.insert(
            name.into(),
            PoolConfig {
                capabilities: caps.iter().map(|c| c.to_string()).collect(),
                fallback_pool: name
                    .strip_suffix("-b")
                    .is_none()
                    .then(|| format!("{name}-b"))
                    .filter(|f| POOLS.iter().any(|(p, _)| p == f)),
                ..Default::default()
            },
        );
    }
    let registry = fleet_commander::hot::fixed(Registry::builtin().unwrap());
    let mut fleet = FleetState::new(
        FleetConfig {
            max_workers: workers * 2,
            ..Default::default()
        },
        registry.clone(),
        table.pools.keys().map(String::as_str),
    );
    let now = 1_800_000_000_000;
    for i in 0..workers {
        let (pool, caps) = POOLS[i % POOLS.len()];
        let hb = Heartbeat {
            schema: 1,
            worker_id: format!("w{i}"),
            pool: pool.into(),
            state: if i % 3 == 0 {
                WorkerState::Active
            } else {
                WorkerState::Idle
            },
            model: Some("claude-sonnet-4-5".into()),
            current_tasks: if i % 3 == 0 {
                vec![format!("t{i}")]
            } else {
                vec![]
            },
            max_in_flight: 4,
            // Context from 0 to 100% across the fleet.
            context_tokens: Some((i as u64 * 7919) % 200_000),
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            completed: 10,
            failed: 0,
            sdk_version: None,
            started_at: now_rfc3339(),
            sent_at: now_rfc3339(),
        };
        fleet.apply_heartbeat(&hb, now);
    }
    let answer = |ty: &str, tier: &str, caps: &[&str], input: u64| Answer {
        task_type: ty.into(),
        tier: tier.into(),
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
        input_tokens: input,
        output_tokens: 600,
        confidence: 0.9,
    };
    let mut tasks = Vec::new();
    for (i, a) in [
        answer("code_review", "standard", &["code", "review"], 6_000),
        answer("summarisation", "simple", &["summarise"], 4_000),
        answer(
            "summarisation",
            "simple",
            &["summarise", "long-context"],
            90_000,
        ),
        answer("extraction", "simple", &["extract"], 2_000),
        answer("classification", "simple", &[], 800),
        answer("research", "complex", &[], 8_000),
        answer("code_generation", "complex", &["code"], 2_000),
    ]
    .into_iter()
    .enumerate()
    {
        let mut t = Task::new("bench");
        t.id = Some(format!("bench-{i}"));
        tasks.push((t, a));
    }
    Setup {
        rubric: Rubric::builtin().unwrap(),
        registry: Registry::builtin().unwrap(),
        table,
        fleet,
        now,
        tasks,
    }
}

fn one(s: &Setup, snap: &RouteSnapshot, policy: &PolicyHints, i: usize) {
    let (task, class) = &s.tasks[i % s.tasks.len()];
    let d = decide(DecideInput {
        task,
        class,
        rubric: &s.rubric,
        registry: &s.registry,
        fleet: snap,
        table: &s.table,
        policy,
        seed: i as u64,
    });
    black_box(d).ok();
}

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    let sizes = [1_000usize, 10_000];
    let setups: Vec<(usize, Setup)> = sizes.iter().map(|&n| (n, setup(n))).collect();
    let policy = PolicyHints::default();
    {
        let mut g = c.benchmark_group("decide");
        for (n, s) in &setups {
            let snap = RouteSnapshot::build(&s.fleet.snapshot(s.now), &s.table);
            let mut i = 0usize;
            g.bench_with_input(BenchmarkId::from_parameter(n), n, |b, _| {
                b.iter(|| {
                    i += 1;
                    one(s, &snap, &policy, i)
                })
            });
        }
        g.finish();
    }
    {
        // What the intake pays once a second (per new fleet snapshot), not per task.
        let mut g = c.benchmark_group("route_snapshot_build");
        for (n, s) in &setups {
            let fleet = s.fleet.snapshot(s.now);
            g.bench_with_input(BenchmarkId::from_parameter(n), n, |b, _| {
                b.iter(|| black_box(RouteSnapshot::build(&fleet, &s.table)))
            });
        }
        g.finish();
    }
    c.final_summary();

    println!("\nsingle-decision latency (each call timed alone, 200,000 calls, 7 task shapes):");
    for (n, s) in &setups {
        let snap = RouteSnapshot::build(&s.fleet.snapshot(s.now), &s.table);
        for i in 0..20_000 {
            one(s, &snap, &policy, i);
        }
        let mut ns: Vec<u64> = Vec::with_capacity(200_000);
        for i in 0..200_000 {
            let t = Instant::now();
            one(s, &snap, &policy, i);
            ns.push(t.elapsed().as_nanos() as u64);
        }
        ns.sort_unstable();
        let q = |p: f64| ns[((ns.len() as f64 * p) as usize).min(ns.len() - 1)] as f64 / 1000.0;
        let build = {
            let fleet = s.fleet.snapshot(s.now);
            let t = Instant::now();
            for _ in 0..10 {
                black_box(RouteSnapshot::build(&fleet, &s.table));
            }
            t.elapsed() / 10
        };
        println!(
            "  {n:>6} workers: p50 {:.2} µs  p99 {:.2} µs  p99.9 {:.2} µs  max {:.1} µs  (snapshot build {:.2} ms, once a second){}",
            q(0.50),
            q(0.99),
            q(0.999),
            q(1.0),
            build.as_secs_f64() * 1e3,
            if *n == 1_000 {
                format!(
                    "  goal p99 <= 20 µs: {}",
                    if q(0.99) <= 20.0 { "met" } else { "NOT met" }
                )
            } else {
                String::new()
            }
        );
    }
}
