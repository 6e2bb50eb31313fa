//! Table-driven tests of `decide`: every rule, its code and its reason.

use std::collections::BTreeMap;

use fleet_worker::message::Task;

use super::snapshot::{PoolState, RouteSnapshot, Unavailable, WorkerSlot};
use super::*;
use crate::classify::Answer;
use crate::classify::rubric::Rubric;
use crate::config::{PoolConfig, RoutingConfig};
use crate::registry::Registry;

fn pools_cfg() -> BTreeMap<String, PoolConfig> {
    let mut p = BTreeMap::new();
    for (name, caps) in [
        ("code", vec!["code", "review"]),
        ("docs", vec!["summarise", "extract"]),
        ("general", vec![]),
    ] {
        p.insert(
            name.to_string(),
            PoolConfig {
                capabilities: caps.into_iter().map(String::from).collect(),
                ..Default::default()
            },
        );
    }
    p
}

fn healthy(name: &str, n: u32) -> PoolState {
    PoolState {
        name: name.into(),
        healthy: n,
        capacity: u64::from(n),
        long_context_slots: (0..n)
            .map(|i| WorkerSlot {
                id: format!("{name}-w{i}"),
                context: 0.1,
                free: 1,
            })
            .collect(),
        ..Default::default()
    }
}

fn answer(task_type: &str, tier: &str, caps: &[&str]) -> Answer {
    Answer {
        task_type: task_type.into(),
        tier: tier.into(),
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
        input_tokens: 2_000,
        output_tokens: 500,
        confidence: 0.9,
    }
}

/// One case: how to set it up and what must come out.
struct Case {
    name: &'static str,
    class: Answer,
    task: Box<dyn Fn(&mut Task)>,
    table: Box<dyn Fn(&mut RoutingTable)>,
    fleet: Box<dyn Fn() -> Vec<PoolState>>,
    policy: PolicyHints,
    /// Ok((pool, model, rule)) or Err(rejection code).
    want: Result<(&'static str, &'static str, RouteRule), &'static str>,
    /// (pool, model, code) that must appear among the candidates.
    candidates: Vec<(&'static str, &'static str, &'static str)>,
    /// Text the decision's (or rejection's) reason must contain.
    reason_has: &'static str,
}

/// Tasks for `code` rerouted to `code-b` by a `[[reroute]]` (over `threshold`) or an
/// intervention (`forced`).
fn reroute_case(
    name: &'static str,
    error_rate: f64,
    threshold: Option<f64>,
    forced: Option<&str>,
) -> Case {
    let mut c = base(name, answer("code_review", "standard", &["code", "review"]));
    c.table = Box::new(|t| {
        t.pools.insert(
            "code-b".into(),
            PoolConfig {
                capabilities: vec!["code".into(), "review".into()],
                ..Default::default()
            },
        );
    });
    c.fleet = Box::new(move || {
        let mut code = healthy("code", 4);
        code.error_rate = Some(error_rate);
        code.finished_1m = 50;
        vec![code, healthy("code-b", 2)]
    });
    c.policy = PolicyHints {
        reroutes: vec![crate::route::decide::PolicyReroute {
            from: "code".into(),
            to: "code-b".into(),
            error_rate_above: threshold,
            p95_latency_ms_above: None,
            forced: forced.map(str::to_string),
        }],
        ..Default::default()
    };
    c.want = Ok(("code-b", "claude-haiku-4-5", RouteRule::HealthReroute));
    c.candidates = vec![
        ("code", "claude-haiku-4-5", "policy_reroute"),
        ("code-b", "claude-haiku-4-5", "chosen"),
    ];
    c.reason_has = "rerouted from an unhealthy pool";
    c
}

fn base(name: &'static str, class: Answer) -> Case {
    Case {
        name,
        class,
        task: Box::new(|_| {}),
        table: Box::new(|_| {}),
        fleet: Box::new(|| {
            vec![
                healthy("code", 2),
                healthy("docs", 2),
                healthy("general", 2),
            ]
        }),
        policy: PolicyHints::default(),
        want: Err("unset"),
        candidates: vec![],
        reason_has: "",
    }
}

fn run(case: &Case, rubric: &Rubric, registry: &Registry, seed: u64) -> Result<Decision, NoRoute> {
    let mut task = Task::new("x");
    task.id = Some("task-1".into());
    (case.task)(&mut task);
    let mut table = RoutingTable {
        pools: pools_cfg(),
        routing: RoutingConfig::default(),
    };
    (case.table)(&mut table);
    let fleet = RouteSnapshot::from_pools(0, (case.fleet)());
    decide(DecideInput {
        task: &task,
        class: &case.class,
        rubric,
        registry,
        fleet: &fleet,
        table: &table,
        policy: &case.policy,
        seed,
    })
}

#[test]
fn every_rule_and_its_reason() {
    let rubric = Rubric::builtin().unwrap();
    let registry = Registry::builtin().unwrap();
    let summarise = || answer("summarisation", "simple", &["summarise"]);
    let mut cases = Vec::new();

    let mut c = base("cost tiering: cheapest capable model and pool", summarise());
    c.want = Ok(("docs", "gemini-2.0-flash", RouteRule::CostTier));
    c.candidates = vec![
        ("general", "gemini-2.0-flash", "capability"),
        ("docs", "gpt-4o-mini", "outscored"),
        ("code", "claude-haiku-4-5", "capability"),
    ];
    c.reason_has = "gemini-2.0-flash on docs for summarisation/simple";
    cases.push(c);

    let mut c = base(
        "an operator's pool weights: pools weighed 10 lose to the one left at 1",
        answer("classification", "simple", &[]),
    );
    c.policy = PolicyHints {
        pool_weights: vec![("code".into(), 10.0), ("docs".into(), 10.0)],
        ..Default::default()
    };
    c.fleet = Box::new(|| {
        vec![
            healthy("code", 2),
            healthy("docs", 2),
            healthy("general", 2),
        ]
    });
    c.want = Ok(("general", "gemini-2.0-flash", RouteRule::CostTier));
    c.candidates = vec![("docs", "gemini-2.0-flash", "outscored")];
    c.reason_has = "lowest of";
    cases.push(c);

    let mut c = base(
        "the chosen pool's weight is in the reason",
        answer("classification", "simple", &[]),
    );
    c.policy = PolicyHints {
        pool_weights: vec![
            ("code".into(), 10.0),
            ("docs".into(), 10.0),
            ("general".into(), 0.5),
        ],
        ..Default::default()
    };
    c.fleet = Box::new(|| {
        vec![
            healthy("code", 2),
            healthy("docs", 2),
            healthy("general", 2),
        ]
    });
    c.want = Ok(("general", "gemini-2.0-flash", RouteRule::CostTier));
    c.reason_has = "× pool weight 0.5 (set by an operator)";
    cases.push(c);

    let mut c = base(
        "load balancing: the idle pool beats the busy one",
        answer("classification", "simple", &[]),
    );
    c.fleet = Box::new(|| {
        let mut docs = healthy("docs", 2);
        docs.queue_depth = 40;
        vec![healthy("code", 2), docs, healthy("general", 2)]
    });
    c.want = Ok(("general", "gemini-2.0-flash", RouteRule::CostTier));
    c.candidates = vec![("docs", "gemini-2.0-flash", "outscored")];
    c.reason_has = "load 0.00";
    cases.push(c);

    let mut c = base(
        "load outweighs price when one pool is swamped",
        answer("classification", "simple", &[]),
    );
    c.fleet = Box::new(|| {
        let mut docs = healthy("docs", 1);
        docs.queue_depth = 500;
        let mut general = healthy("general", 1);
        general.queue_depth = 500;
        vec![healthy("code", 4), docs, general]
    });
    c.want = Ok(("code", "claude-haiku-4-5", RouteRule::CostTier));
    c.reason_has = "claude-haiku-4-5 on code";
    cases.push(c);

    let mut c = base(
        "unhealthy: STUCK, ERROR and lost workers leave no pool",
        summarise(),
    );
    c.fleet = Box::new(|| {
        let docs = PoolState {
            name: "docs".into(),
            unavailable: Unavailable {
                stuck: 2,
                error: 1,
                lost: 1,
                draining: 0,
                paused: 0,
            },
            ..Default::default()
        };
        vec![healthy("code", 2), docs, healthy("general", 2)]
    });
    c.want = Ok(("docs", "gemini-2.0-flash", RouteRule::Degraded));
    c.candidates = vec![("docs", "gpt-4o-mini", "unhealthy")];
    c.reason_has = "2 STUCK, 1 ERROR, 1 lost";
    cases.push(c);

    let mut c = base(
        "default pool takes what no capable pool can",
        answer("classification", "simple", &["gpu"]),
    );
    c.table = Box::new(|t| t.routing.default_pool = Some("general".into()));
    c.want = Ok(("general", "gpt-4o-mini", RouteRule::DefaultPool));
    c.candidates = vec![("docs", "gemini-2.0-flash", "capability")];
    c.reason_has = "default pool general";
    cases.push(c);

    let mut c = base("paused pool", summarise());
    c.table = Box::new(|t| t.pools.get_mut("docs").unwrap().paused = true);
    c.want = Ok(("docs", "gemini-2.0-flash", RouteRule::Degraded));
    c.candidates = vec![("docs", "gpt-4o-mini", "paused")];
    c.reason_has = "pool docs is paused";
    cases.push(c);

    let mut c = base(
        "long context: workers over the threshold are not given it",
        {
            let mut a = answer("summarisation", "simple", &["summarise", "long-context"]);
            a.input_tokens = 100_000;
            a
        },
    );
    c.fleet = Box::new(|| {
        let mut docs = healthy("docs", 2);
        docs.long_context_slots.clear();
        docs.over_context = 2;
        vec![healthy("code", 2), docs, healthy("general", 2)]
    });
    c.want = Ok(("docs", "gemini-2.0-flash", RouteRule::Degraded));
    c.candidates = vec![("docs", "gpt-4o-mini", "context")];
    c.reason_has = "over 80% context";
    cases.push(c);

    let mut c = base("long context: a worker under the threshold is targeted", {
        let mut a = answer("summarisation", "simple", &["summarise", "long-context"]);
        a.input_tokens = 100_000;
        a
    });
    c.fleet = Box::new(|| {
        let mut docs = healthy("docs", 2);
        docs.over_context = 1;
        docs.long_context_slots = vec![WorkerSlot {
            id: "docs-cool".into(),
            context: 0.2,
            free: 2,
        }];
        vec![docs]
    });
    c.want = Ok(("docs", "gemini-2.0-flash", RouteRule::CostTier));
    c.reason_has = "worker docs-cool (context 20%";
    cases.push(c);

    let mut c = base("context window: a 128k model cannot take 150k tokens", {
        let mut a = answer("classification", "simple", &[]);
        a.input_tokens = 150_000;
        a
    });
    c.table = Box::new(|t| t.routing.target_long_context = false);
    c.want = Ok(("general", "gemini-2.0-flash", RouteRule::CostTier));
    c.fleet = Box::new(|| {
        let mut docs = healthy("docs", 2);
        docs.queue_depth = 10;
        vec![docs, healthy("general", 2), healthy("code", 2)]
    });
    c.candidates = vec![("general", "gpt-4o-mini", "context_window")];
    c.reason_has = "gemini-2.0-flash on general";
    cases.push(c);

    let mut c = base(
        "health reroute: an erroring pool hands over to its fallback",
        answer("code_review", "standard", &["code", "review"]),
    );
    c.table = Box::new(|t| {
        t.pools.get_mut("code").unwrap().fallback_pool = Some("code-b".into());
        t.pools.insert(
            "code-b".into(),
            PoolConfig {
                capabilities: vec!["code".into(), "review".into()],
                ..Default::default()
            },
        );
    });
    c.fleet = Box::new(|| {
        let mut code = healthy("code", 4);
        code.error_rate = Some(0.5);
        code.finished_1m = 20;
        vec![
            code,
            healthy("code-b", 2),
            healthy("docs", 1),
            healthy("general", 1),
        ]
    });
    c.want = Ok(("code-b", "claude-haiku-4-5", RouteRule::HealthReroute));
    c.candidates = vec![
        ("code", "claude-haiku-4-5", "error_rate"),
        ("code-b", "claude-haiku-4-5", "chosen"),
    ];
    c.reason_has = "rerouted from an unhealthy pool";
    cases.push(c);

    // A policy reroute over its threshold, and a reroute intervention on a healthy pool.
    for (name, error_rate, threshold, forced) in [
        (
            "policy reroute: over the policy's error threshold, work goes where the policy says",
            0.12,
            Some(0.10),
            None,
        ),
        (
            "a reroute intervention moves a healthy pool's work to its fallback",
            0.0,
            None,
            Some("rerouted by intervention x:reroute"),
        ),
    ] {
        cases.push(reroute_case(name, error_rate, threshold, forced));
    }

    let mut c = base(
        "error rate over threshold with no fallback: excluded",
        answer("code_review", "standard", &["code", "review"]),
    );
    c.fleet = Box::new(|| {
        let mut code = healthy("code", 4);
        code.error_rate = Some(0.3);
        code.finished_1m = 40;
        vec![code]
    });
    c.want = Ok(("code", "claude-haiku-4-5", RouteRule::Degraded));
    c.reason_has = "failed 30% of 40 tasks";
    cases.push(c);

    let mut c = base(
        "budget downgrade: one tier cheaper",
        answer("code_review", "standard", &["code", "review"]),
    );
    c.policy = PolicyHints {
        downgrade: Some("team payments at 91% of its daily budget".into()),
        ..Default::default()
    };
    c.want = Ok(("code", "claude-haiku-4-5", RouteRule::BudgetDowngrade));
    c.candidates = vec![("code", "gpt-4o", "budget_downgrade")];
    c.reason_has = "downgraded to tier simple (team payments at 91%";
    cases.push(c);

    let mut c = base(
        "explicit pool honoured (even without the capability)",
        summarise(),
    );
    c.task = Box::new(|t| t.pool = Some("general".into()));
    c.want = Ok(("general", "gemini-2.0-flash", RouteRule::Requested));
    c.candidates = vec![("docs", "gemini-2.0-flash", "not_requested")];
    c.reason_has = "producer asked for pool general";
    cases.push(c);

    let mut c = base("explicit pool ignored when not allowed", summarise());
    c.task = Box::new(|t| t.pool = Some("general".into()));
    c.table = Box::new(|t| t.routing.allow_explicit_pool = false);
    c.want = Ok(("docs", "gemini-2.0-flash", RouteRule::CostTier));
    cases.push(c);

    let mut c = base(
        "explicit model outside the tier: its pools from the rubric",
        answer("classification", "simple", &[]),
    );
    c.task = Box::new(|t| t.model = Some("gpt-4o-2024-08-06".into()));
    c.fleet = Box::new(|| {
        let mut code = healthy("code", 2);
        code.queue_depth = 9;
        vec![code, healthy("general", 2)]
    });
    c.want = Ok(("general", "gpt-4o", RouteRule::Requested));
    c.reason_has = "producer asked for model gpt-4o-2024-08-06";
    cases.push(c);

    let mut c = base(
        "explicit pool and model",
        answer("classification", "simple", &[]),
    );
    c.task = Box::new(|t| {
        t.pool = Some("code".into());
        t.model = Some("claude-sonnet-4-5".into());
    });
    c.want = Ok(("code", "claude-sonnet-4-5", RouteRule::Requested));
    cases.push(c);

    let mut c = base("unknown explicit pool", summarise());
    c.task = Box::new(|t| t.pool = Some("gpu".into()));
    c.want = Err("unknown_pool");
    c.reason_has = "known pools: code, docs, general";
    cases.push(c);

    let mut c = base("unknown explicit model", summarise());
    c.task = Box::new(|t| t.model = Some("gpt-9".into()));
    c.want = Err("unknown_model");
    cases.push(c);

    let mut c = base("producer's cost cap", summarise());
    c.task = Box::new(|t| t.max_cost_usd = Some(0.000_01));
    c.want = Err("no_eligible_pool");
    c.candidates = vec![("docs", "gemini-2.0-flash", "max_cost")];
    c.reason_has = "over the task's cap";
    cases.push(c);

    let mut c = base(
        "saturated pool still takes work when it is the only one",
        summarise(),
    );
    c.table = Box::new(|t| t.pools.get_mut("docs").unwrap().max_queue_depth = Some(10));
    c.fleet = Box::new(|| {
        let mut docs = healthy("docs", 2);
        docs.queue_depth = 25;
        vec![docs]
    });
    c.want = Ok(("docs", "gemini-2.0-flash", RouteRule::Degraded));
    c.reason_has = "no pool is fully eligible";
    cases.push(c);

    let mut c = base(
        "saturated pool loses to an open one",
        answer("classification", "simple", &[]),
    );
    c.table = Box::new(|t| t.pools.get_mut("docs").unwrap().max_queue_depth = Some(10));
    c.fleet = Box::new(|| {
        let mut docs = healthy("docs", 200);
        docs.queue_depth = 10;
        vec![docs, healthy("general", 1)]
    });
    c.want = Ok(("general", "gemini-2.0-flash", RouteRule::CostTier));
    c.candidates = vec![("docs", "gemini-2.0-flash", "saturated")];
    cases.push(c);

    let mut c = base("pool not configured", summarise());
    c.table = Box::new(|t| {
        t.pools.remove("docs");
        t.routing.default_pool = None;
    });
    c.want = Err("no_eligible_pool");
    c.candidates = vec![("docs", "gemini-2.0-flash", "not_configured")];
    cases.push(c);

    let mut c = base(
        "capability match: a configured pool the rubric does not name",
        answer("code_review", "standard", &["code", "review"]),
    );
    c.table = Box::new(|t| {
        t.pools.remove("code");
        t.pools.insert(
            "beta".into(),
            PoolConfig {
                capabilities: vec!["code".into(), "review".into()],
                ..Default::default()
            },
        );
    });
    c.want = Ok(("beta", "claude-haiku-4-5", RouteRule::CapabilityMatch));
    c.candidates = vec![
        ("code", "claude-haiku-4-5", "not_configured"),
        ("beta", "claude-haiku-4-5", "chosen"),
    ];
    c.reason_has = "pool beta has [code, review]";
    cases.push(c);

    let mut c = base(
        "a pool with no workers seen yet still queues work",
        summarise(),
    );
    c.fleet = Box::new(|| vec![healthy("general", 1)]);
    c.want = Ok(("docs", "gemini-2.0-flash", RouteRule::CostTier));
    cases.push(c);

    for case in &cases {
        let got = run(case, &rubric, &registry, 7);
        // Pure: the same inputs, the same answer.
        assert_eq!(
            got,
            run(case, &rubric, &registry, 7),
            "{}: not deterministic",
            case.name
        );
        let (cands, reason) = match (&got, &case.want) {
            (Ok(d), Ok((pool, model, rule))) => {
                assert_eq!(
                    (d.pool.as_str(), d.model.as_str(), d.rule),
                    (*pool, *model, *rule),
                    "{}: {d:#?}",
                    case.name
                );
                assert_eq!(
                    d.candidates.iter().filter(|c| c.code == "chosen").count(),
                    usize::from(d.rule != RouteRule::DefaultPool),
                    "{}",
                    case.name
                );
                (d.candidates.clone(), d.reason.clone())
            }
            (Err(e), Err(code)) => {
                assert_eq!(e.code(), *code, "{}: {e}", case.name);
                (e.candidates().to_vec(), e.to_string())
            }
            (got, want) => panic!("{}: got {got:#?}, want {want:?}", case.name),
        };
        assert!(
            reason.contains(case.reason_has),
            "{}: reason {reason:?} lacks {:?}",
            case.name,
            case.reason_has
        );
        for (pool, model, code) in &case.candidates {
            assert!(
                cands
                    .iter()
                    .any(|c| c.pool == *pool && c.model == *model && c.code == *code),
                "{}: no candidate {pool}/{model} with {code} in {cands:#?}",
                case.name
            );
        }
        for c in &cands {
            assert!(
                !c.reason.is_empty(),
                "{}: candidate without a reason: {c:?}",
                case.name
            );
        }
    }
}

#[test]
fn power_of_two_choices_never_picks_the_fullest_worker_and_spreads() {
    let rubric = Rubric::builtin().unwrap();
    let registry = Registry::builtin().unwrap();
    let mut class = answer("summarisation", "simple", &["summarise", "long-context"]);
    class.input_tokens = 60_000;
    let mut case = base("p2c", class);
    case.fleet = Box::new(|| {
        let mut docs = healthy("docs", 3);
        docs.long_context_slots = vec![
            WorkerSlot {
                id: "a".into(),
                context: 0.5,
                free: 1,
            },
            WorkerSlot {
                id: "b".into(),
                context: 0.1,
                free: 1,
            },
            WorkerSlot {
                id: "c".into(),
                context: 0.7,
                free: 1,
            },
        ];
        vec![docs]
    });
    let mut picked = std::collections::BTreeMap::new();
    for seed in 0..300 {
        let d = run(&case, &rubric, &registry, seed).unwrap();
        *picked.entry(d.worker.unwrap()).or_insert(0) += 1;
    }
    assert!(!picked.contains_key("c"), "{picked:?}");
    assert!(picked["a"] > 0 && picked["b"] > picked["a"], "{picked:?}");
}

#[test]
fn routed_since_snapshot_counts_as_load() {
    let rubric = Rubric::builtin().unwrap();
    let registry = Registry::builtin().unwrap();
    let class = answer("classification", "simple", &[]);
    let table = RoutingTable {
        pools: pools_cfg(),
        routing: RoutingConfig::default(),
    };
    let fleet = RouteSnapshot::from_pools(0, vec![healthy("docs", 4), healthy("general", 4)]);
    let mut task = Task::new("x");
    let mut per_pool = BTreeMap::new();
    for i in 0..40 {
        task.id = Some(format!("t{i}"));
        let d = decide(DecideInput {
            task: &task,
            class: &class,
            rubric: &rubric,
            registry: &registry,
            fleet: &fleet,
            table: &table,
            policy: &PolicyHints::default(),
            seed: i,
        })
        .unwrap();
        fleet.note_routed(&d.pool);
        *per_pool.entry(d.pool).or_insert(0) += 1;
    }
    // A burst between two snapshots spreads instead of piling onto one pool.
    assert_eq!(per_pool.get("docs"), Some(&20), "{per_pool:?}");
    assert_eq!(per_pool.get("general"), Some(&20), "{per_pool:?}");
}
