//! Table tests per rule on a hand-moved clock: each fires on its fault, stays quiet on
//! healthy data, and resolves with hysteresis (or for lack of data).

use std::collections::BTreeMap;

use super::*;
use crate::config::PoolConfig;
use crate::fleet::view::{FleetView, PoolView, QueueView, WorkerView};
use crate::fleet::worker::State;

const T0: u64 = 1_800_000_000_000;
const S: u64 = 1_000;
const MIN: u64 = 60 * S;

fn worker(id: &str) -> WorkerView {
    WorkerView {
        id: id.into(),
        pool: Some("code".into()),
        agent_name: None,
        state: State::Active,
        state_since_ms: T0,
        lost: false,
        stuck_reason: None,
        silent_run: None,
        model: None,
        model_reported: None,
        provider: None,
        model_unknown: false,
        version: None,
        sdk_version: None,
        current_task: Some(format!("{id}-task")),
        current_task_type: Some("code_review".into()),
        running: 1,
        max_in_flight: Some(1),
        draining: false,
        paused: false,
        repeated_call: None,
        capabilities: vec![],
        context_tokens: None,
        context_limit_tokens: None,
        context_utilisation: Some(0.3),
        output_tokens_per_s: 20.0,
        last_call_output_tokens_per_s: None,
        token_rate_vs_baseline: Some(1.0),
        error_rate_5m: None,
        tasks_completed: 0,
        tasks_failed: 0,
        cost_usd: 0.0,
        cost_per_task_usd: None,
        burn_rate_usd_per_h: 0.0,
        unknown_cost_calls: 0,
        input_tokens: 0,
        output_tokens: 0,
        uptime_s: 0,
        first_seen_ms: T0,
        last_seen_ms: T0,
        last_heartbeat_ms: None,
    }
}

fn pool(name: &str, depth: Option<u64>, workers: u64, active: u64) -> PoolView {
    PoolView {
        name: name.into(),
        configured: true,
        workers,
        active,
        utilisation: (workers > 0).then(|| active as f64 / workers as f64),
        queue: depth.map(|d| QueueView {
            depth: d,
            pending: d,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn snapshot(workers: Vec<WorkerView>, pools: Vec<PoolView>, fleet: FleetView) -> FleetSnapshot {
    let mut states = BTreeMap::new();
    for w in &workers {
        *states.entry(w.state.as_str()).or_insert(0) += 1;
    }
    let mut workers = workers;
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    FleetSnapshot {
        fleet: FleetView {
            states,
            workers: workers.len() as u64,
            ..fleet
        },
        pools,
        workers,
        ..Default::default()
    }
}

fn pools_config() -> BTreeMap<String, PoolConfig> {
    BTreeMap::from([(
        "code".to_string(),
        PoolConfig {
            max_queue_depth: Some(100),
            ..Default::default()
        },
    )])
}

/// A fleet view holding only the hour's 10 s buckets.
fn with_series(buckets: Vec<crate::fleet::view::TenSeconds>) -> FleetSnapshot {
    snapshot(
        vec![],
        vec![],
        FleetView {
            series_10s: buckets,
            ..Default::default()
        },
    )
}

/// A detector driven tick by tick; `run` returns the changes of every tick, with when.
struct Run {
    d: Detector,
    spec: AlertSpec,
    pools: BTreeMap<String, PoolConfig>,
    now: u64,
}

impl Run {
    fn new() -> Self {
        Self {
            d: Detector::new(100),
            spec: AlertSpec::default(),
            pools: pools_config(),
            now: T0,
        }
    }

    /// Ticks once a second for `for_ms` on snapshots made by `make(now)`.
    fn run(
        &mut self,
        for_ms: u64,
        mut make: impl FnMut(u64) -> FleetSnapshot,
    ) -> Vec<(u64, Change, Alert)> {
        let mut out = Vec::new();
        let end = self.now + for_ms;
        while self.now < end {
            self.now += S;
            let snap = make(self.now);
            // As the loop does, off the tick (here at once rather than a tick later).
            if let Some(job) = self.d.drift_job(&snap, &self.spec, self.now) {
                self.d.drift_done(job.run());
            }
            for (c, a) in self.d.tick(&snap, &self.spec, &self.pools, self.now) {
                out.push((self.now, c, a));
            }
        }
        out
    }

    fn firing(&self) -> Vec<(Rule, BTreeMap<String, String>)> {
        self.d
            .open()
            .into_iter()
            .filter(|a| a.state == AlertState::Firing)
            .map(|a| (a.rule, a.labels))
            .collect()
    }
}

fn sent(changes: &[(u64, Change, Alert)], rule: Rule) -> Vec<(u64, Change)> {
    changes
        .iter()
        .filter(|(_, c, a)| a.rule == rule && c.is_sent())
        .map(|(t, c, _)| (*t, *c))
        .collect()
}

fn with_context(u: f64) -> impl FnMut(u64) -> FleetSnapshot {
    move |_| {
        let mut w = worker("w1");
        w.context_utilisation = Some(u);
        snapshot(vec![w, worker("w2")], vec![], FleetView::default())
    }
}

#[test]
fn context_warning_fires_after_its_for_and_resolves_only_below_the_resolve_level() {
    let mut r = Run::new();
    let start = r.now;
    let c = r.run(2 * MIN, with_context(0.85));
    let fired = sent(&c, Rule::ContextOverflowRisk);
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(
        fired[0],
        (start + S + 60 * S, Change::Firing),
        "fires after pending_s"
    );
    let a = &c.iter().find(|(_, ch, _)| *ch == Change::Firing).unwrap().2;
    assert_eq!(a.labels["worker"], "w1");
    assert_eq!(a.severity, Severity::Warning);
    assert!(a.message.contains("85%"), "{}", a.message);
    assert_eq!(a.links.task.as_deref(), Some("w1-task"));

    // Just under the threshold, above the resolve level (0.80 × 0.95): still firing.
    let c = r.run(5 * MIN, with_context(0.78));
    assert!(sent(&c, Rule::ContextOverflowRisk).is_empty(), "{c:?}");
    // Below the resolve level: resolves after resolve_s.
    let from = r.now;
    let c = r.run(2 * MIN, with_context(0.5));
    let resolved = sent(&c, Rule::ContextOverflowRisk);
    assert_eq!(resolved, [(from + 60 * S, Change::Resolved)]);
    assert!(r.firing().is_empty());
}

#[test]
fn context_critical_fires_at_once_and_the_warning_stands_aside() {
    let mut r = Run::new();
    r.run(2 * MIN, with_context(0.85));
    let c = r.run(10 * S, with_context(0.97));
    assert_eq!(sent(&c, Rule::ContextCritical).len(), 1);
    assert_eq!(sent(&c, Rule::ContextCritical)[0].0, r.now - 9 * S);
    let c = r.run(2 * MIN, with_context(0.97));
    let warning = sent(&c, Rule::ContextOverflowRisk);
    assert_eq!(warning.len(), 1, "{warning:?}");
    assert_eq!(
        warning[0].1,
        Change::Resolved,
        "the warning resolves while the critical alert covers the agent"
    );
    let firing = r.firing();
    assert_eq!(firing.len(), 1, "{firing:?}");
    assert_eq!(firing[0].0, Rule::ContextCritical);
}

#[test]
fn a_stuck_agent_fires_at_once_and_resolves_when_it_moves_again() {
    let mut r = Run::new();
    let stuck = |_| {
        let mut w = worker("w1");
        w.state = State::Stuck;
        w.stuck_reason = Some("no span for 95 s (3x expected 30 s)".into());
        snapshot(vec![w], vec![], FleetView::default())
    };
    let c = r.run(5 * S, stuck);
    let s = sent(&c, Rule::StuckAgent);
    assert_eq!(s.len(), 1);
    assert!(
        c.iter()
            .any(|(_, _, a)| a.message.contains("no span for 95 s")),
        "{c:?}"
    );
    let c = r.run(2 * MIN, |_| {
        snapshot(vec![worker("w1")], vec![], FleetView::default())
    });
    assert_eq!(sent(&c, Rule::StuckAgent).len(), 1);
    assert_eq!(sent(&c, Rule::StuckAgent)[0].1, Change::Resolved);
}

#[test]
fn the_policys_active_duration_multiple_makes_the_stuck_alert_earlier_than_the_state() {
    use crate::fleet::worker::SilentRun;
    let silent = |quiet_s: u64| {
        move |_| {
            let mut w = worker("w1");
            w.silent_run = Some(SilentRun {
                task_id: "t-9".into(),
                quiet_ms: quiet_s * S,
                expected_ms: 30 * S,
                floor_ms: 30 * S,
            });
            snapshot(vec![w], vec![], FleetView::default())
        }
    };
    // 70 s of silence for a 30 s task: not past 3 × (the default), so quiet …
    let mut r = Run::new();
    assert!(sent(&r.run(5 * S, silent(70)), Rule::StuckAgent).is_empty());
    // … past 2 × when the policy says so, though the fleet's STUCK state (3 ×) is not.
    let mut r = Run::new();
    r.spec.active_duration_multiple = 2.0;
    let c = r.run(5 * S, silent(70));
    assert_eq!(sent(&c, Rule::StuckAgent).len(), 1, "{c:?}");
    let a = &c
        .iter()
        .find(|(_, _, a)| a.rule == Rule::StuckAgent)
        .unwrap()
        .2;
    assert_eq!(
        a.message,
        "Agent w1 is stuck: task t-9: no span for 70 s, over 2 × its expected 30 s"
    );
    assert_eq!(a.links.task.as_deref(), Some("t-9"));
    // The floor holds: 50 s of silence for a 10 s task at 2 × is under the 60 s floor.
    let mut r = Run::new();
    r.spec.active_duration_multiple = 2.0;
    let short = |_| {
        let mut w = worker("w1");
        w.silent_run = Some(SilentRun {
            task_id: "t-1".into(),
            quiet_ms: 50 * S,
            expected_ms: 10 * S,
            floor_ms: 60 * S,
        });
        snapshot(vec![w], vec![], FleetView::default())
    };
    assert!(sent(&r.run(5 * S, short), Rule::StuckAgent).is_empty());
}

#[test]
fn a_token_loop_fires_on_five_times_the_baseline_rate_and_not_on_a_burst() {
    let mut r = Run::new();
    let rate = |x: f64| {
        move |_| {
            let mut w = worker("w1");
            w.token_rate_vs_baseline = Some(x);
            snapshot(vec![w], vec![], FleetView::default())
        }
    };
    // A 30-second burst is dropped while pending.
    let c = r.run(30 * S, rate(7.0));
    assert!(sent(&c, Rule::TokenLoop).is_empty());
    let c = r.run(5 * S, rate(1.0));
    assert!(
        c.iter()
            .any(|(_, ch, a)| *ch == Change::Dropped && a.rule == Rule::TokenLoop)
    );
    let c = r.run(2 * MIN, rate(6.0));
    assert_eq!(sent(&c, Rule::TokenLoop).len(), 1);
}

#[test]
fn error_rate_spikes_need_enough_samples_fleet_and_pool() {
    let mut r = Run::new();
    let fleet = |rate: f64, ops: u64| {
        move |_| {
            snapshot(
                vec![worker("w1")],
                vec![PoolView {
                    tasks_per_min: ops,
                    failed_per_min: (ops as f64 * rate) as u64,
                    ..pool("code", Some(0), 1, 1)
                }],
                FleetView {
                    error_rate_5m: Some(rate),
                    ops_5m: ops,
                    ..Default::default()
                },
            )
        }
    };
    let c = r.run(3 * MIN, fleet(0.5, 5));
    assert!(sent(&c, Rule::ErrorRateSpike).is_empty(), "too few samples");
    let c = r.run(3 * MIN, fleet(0.02, 500));
    assert!(sent(&c, Rule::ErrorRateSpike).is_empty(), "healthy");
    let c = r.run(3 * MIN, fleet(0.10, 500));
    let scopes: Vec<_> = c
        .iter()
        .filter(|(_, ch, a)| a.rule == Rule::ErrorRateSpike && *ch == Change::Firing)
        .map(|(_, _, a)| a.labels.clone())
        .collect();
    assert_eq!(scopes.len(), 2, "the fleet and the pool: {scopes:?}");
    assert!(scopes.iter().any(|l| l.is_empty()));
    assert!(
        scopes
            .iter()
            .any(|l| l.get("pool").map(String::as_str) == Some("code"))
    );
}

#[test]
fn queue_saturation_and_over_provisioning_follow_the_pool() {
    let mut r = Run::new();
    let c = r.run(3 * MIN, |_| {
        snapshot(
            vec![],
            vec![pool("code", Some(95), 4, 4)],
            FleetView::default(),
        )
    });
    assert_eq!(sent(&c, Rule::QueueSaturation).len(), 1);
    let c = r.run(14 * MIN, |_| {
        snapshot(
            vec![],
            vec![pool("code", Some(0), 10, 1)],
            FleetView::default(),
        )
    });
    assert_eq!(
        sent(&c, Rule::QueueSaturation),
        [(r.now - 14 * MIN + 60 * S, Change::Resolved)]
    );
    assert!(
        sent(&c, Rule::OverProvisioned).is_empty(),
        "not yet 15 minutes"
    );
    let c = r.run(2 * MIN, |_| {
        snapshot(
            vec![],
            vec![pool("code", Some(0), 10, 1)],
            FleetView::default(),
        )
    });
    let o = sent(&c, Rule::OverProvisioned);
    assert_eq!(o.len(), 1);
    let a = c
        .iter()
        .find(|(_, _, a)| a.rule == Rule::OverProvisioned)
        .unwrap();
    assert_eq!(a.2.severity, Severity::Info);
}

/// `queue_unserved`: tasks wait in a pool's queue, none is out with a worker, and the pool
/// has no worker that is not lost. Workers (paused ones too: an operator's choice), tasks
/// being run, or a reading too old to tell keep it quiet.
#[test]
fn a_queue_no_worker_is_there_to_take_is_alerted_until_it_is_served() {
    let at = |now: u64, workers: u64, ack_pending: u64, read_at: u64| {
        let mut p = pool("gone", Some(3 + ack_pending), workers, 0);
        p.configured = false;
        if let Some(q) = p.queue.as_mut() {
            q.pending = 3;
            q.ack_pending = ack_pending;
            q.read_at_ms = read_at;
        }
        snapshot(
            vec![],
            vec![p],
            FleetView {
                at_ms: now,
                ..Default::default()
            },
        )
    };
    let mut r = Run::new();
    let c = r.run(30 * S, |now| at(now, 0, 0, now));
    assert!(sent(&c, Rule::QueueUnserved).is_empty(), "not yet its for");
    let c = r.run(40 * S, |now| at(now, 0, 0, now));
    assert_eq!(sent(&c, Rule::QueueUnserved).len(), 1);
    let (_, _, a) = c
        .iter()
        .find(|(_, _, a)| a.rule == Rule::QueueUnserved)
        .unwrap();
    assert_eq!(a.severity, Severity::Warning);
    assert_eq!(a.labels.get("pool").map(String::as_str), Some("gone"));
    assert!(
        a.message.contains("not configured") && a.message.contains("3 tasks waiting"),
        "{}",
        a.message
    );
    // A worker connects (paused or not, it is the pool's): the alert resolves.
    let c = r.run(3 * MIN, |now| at(now, 1, 0, now));
    assert_eq!(
        sent(&c, Rule::QueueUnserved)
            .iter()
            .map(|(_, ch)| *ch)
            .collect::<Vec<_>>(),
        [Change::Resolved]
    );
    // Tasks out with a worker that sends no heartbeats: served.
    let c = r.run(3 * MIN, |now| at(now, 0, 2, now));
    assert!(sent(&c, Rule::QueueUnserved).is_empty());
    // The queue was last read 31 s ago (NATS out of reach): nothing to tell.
    let c = r.run(3 * MIN, |now| at(now, 0, 0, now - 31 * S));
    assert!(sent(&c, Rule::QueueUnserved).is_empty());
}

/// An idle pool the config does not name gets no routed task at all, and its
/// `over_provisioned` alert says so; where no pool is configured every pool a task names
/// is taken, and it does not.
#[test]
fn an_idle_pool_that_is_not_configured_is_said_to_get_no_task() {
    let message = |pools: BTreeMap<String, PoolConfig>| {
        let mut r = Run::new();
        r.pools = pools;
        let c = r.run(16 * MIN, |_| {
            let mut p = pool("alpah", Some(0), 2, 0);
            p.configured = false;
            snapshot(vec![], vec![p], FleetView::default())
        });
        c.iter()
            .find(|(_, _, a)| a.rule == Rule::OverProvisioned)
            .map(|(_, _, a)| a.message.clone())
            .unwrap()
    };
    let said = message(pools_config());
    assert!(
        said.contains("alpah (not configured: the commander routes it no task)"),
        "{said}"
    );
    let said = message(BTreeMap::new());
    assert!(!said.contains("not configured"), "{said}");
}

#[test]
fn a_stuck_wave_is_a_rise_across_the_fleet_within_five_minutes() {
    let mut r = Run::new();
    let fleet = |stuck: usize| {
        move |_| {
            let workers = (0..20)
                .map(|i| {
                    let mut w = worker(&format!("w{i:02}"));
                    if i < stuck {
                        w.state = State::Stuck;
                    }
                    w
                })
                .collect();
            snapshot(workers, vec![], FleetView::default())
        }
    };
    let c = r.run(6 * MIN, fleet(1));
    assert!(
        sent(&c, Rule::StuckWave).is_empty(),
        "one stuck agent is not a wave"
    );
    let c = r.run(10 * S, fleet(6));
    assert_eq!(
        sent(&c, Rule::StuckWave).len(),
        1,
        "{:?}",
        sent(&c, Rule::StuckWave)
    );
}

#[test]
fn throughput_drop_is_against_the_five_minute_baseline() {
    let mut r = Run::new();
    let fleet = |tps: f64| {
        move |_| {
            snapshot(
                vec![worker("w1")],
                vec![],
                FleetView {
                    output_tokens_per_s: tps,
                    ..Default::default()
                },
            )
        }
    };
    let c = r.run(6 * MIN, fleet(100.0));
    assert!(sent(&c, Rule::ThroughputDrop).is_empty());
    let c = r.run(3 * MIN, fleet(60.0));
    assert_eq!(sent(&c, Rule::ThroughputDrop).len(), 1);
    // A 20% dip is not a 30% drop.
    let mut r = Run::new();
    r.run(6 * MIN, fleet(100.0));
    let c = r.run(3 * MIN, fleet(82.0));
    assert!(sent(&c, Rule::ThroughputDrop).is_empty());
}

#[test]
fn throughput_is_the_last_thirty_seconds_of_complete_buckets() {
    use crate::fleet::view::TenSeconds;
    // 100 tokens/s for the hour; then `last` tokens in each of the newest three complete
    // buckets; the bucket in progress has only just begun.
    let fleet = |last: u64| {
        move |_| {
            let mut buckets: Vec<TenSeconds> = (0..360)
                .map(|i| TenSeconds {
                    ops: 10,
                    errors: 0,
                    output_tokens: if (357..360).contains(&i) { last } else { 1_000 },
                })
                .collect();
            buckets.push(TenSeconds::default());
            with_series(buckets)
        }
    };
    let mut r = Run::new();
    r.spec.pending_s = 0;
    assert!(
        sent(&r.run(5 * S, fleet(1_000)), Rule::ThroughputDrop).is_empty(),
        "an empty bucket in progress is not a drop"
    );
    assert!(sent(&r.run(5 * S, fleet(800)), Rule::ThroughputDrop).is_empty());
    let c = r.run(5 * S, fleet(600));
    let a = &c
        .iter()
        .find(|(_, ch, a)| a.rule == Rule::ThroughputDrop && *ch == Change::Firing)
        .expect("a 40% drop")
        .2;
    assert_eq!(
        a.message,
        "Fleet output 60 tokens/s, down 40% from its 5-minute baseline of 100"
    );
}

#[test]
fn a_bursty_agent_is_measured_against_its_pools_agents_not_only_its_own_quiet_hour() {
    // Ten agents at $1/h; w0 idled for 20 minutes ($0.10/h), then works like the others.
    let mut r = Run::new();
    let costs = std::cell::RefCell::new(vec![0.0f64; 10]);
    let tick = |w0_rate: f64| {
        let costs = &costs;
        move |_now: u64| {
            let mut costs = costs.borrow_mut();
            let workers = (0..10)
                .map(|i| {
                    let rate = if i == 0 { w0_rate } else { 1.0 };
                    costs[i] += rate / 3600.0;
                    let mut w = worker(&format!("w{i}"));
                    w.cost_usd = costs[i];
                    w.burn_rate_usd_per_h = rate;
                    w
                })
                .collect();
            snapshot(workers, vec![], FleetView::default())
        }
    };
    r.run(20 * MIN, tick(0.1));
    // $1/h is 10x its own average but no more than its peers spend: no runaway.
    let c = r.run(10 * MIN, tick(1.0));
    assert!(sent(&c, Rule::CostRunaway).is_empty(), "{c:?}");
    // $4/h is 4x what its peers spend: a runaway.
    let c = r.run(5 * MIN, tick(4.0));
    let a = &c
        .iter()
        .find(|(_, ch, a)| a.rule == Rule::CostRunaway && *ch == Change::Firing)
        .expect("runaway")
        .2;
    assert!(
        a.message
            .contains("its pool's per-agent average of the last hour"),
        "{}",
        a.message
    );
}

#[test]
fn cost_runaway_and_concentration_read_the_last_hour() {
    let mut r = Run::new();
    // Ten agents spend $1/h each and finish a task every 2 s; then w0 burns at $30/h and
    // finishes none.
    let costs = std::cell::RefCell::new(vec![0.0f64; 10]);
    let tasks = std::cell::RefCell::new(vec![0u64; 10]);
    let tick = |w0_rate: f64| {
        let (costs, tasks) = (&costs, &tasks);
        move |now: u64| {
            let mut costs = costs.borrow_mut();
            let mut tasks = tasks.borrow_mut();
            let workers = (0..10)
                .map(|i| {
                    let rate = if i == 0 { w0_rate } else { 1.0 };
                    costs[i] += rate / 3600.0;
                    if (i > 0 || w0_rate <= 1.0) && now.is_multiple_of(2 * S) {
                        tasks[i] += 1;
                    }
                    let mut w = worker(&format!("w{i}"));
                    w.cost_usd = costs[i];
                    w.burn_rate_usd_per_h = rate;
                    w.tasks_completed = tasks[i];
                    w
                })
                .collect();
            snapshot(workers, vec![], FleetView::default())
        }
    };
    let c = r.run(20 * MIN, tick(1.0));
    assert!(sent(&c, Rule::CostRunaway).is_empty(), "steady spend");
    assert!(sent(&c, Rule::CostConcentration).is_empty(), "even spend");
    let c = r.run(30 * MIN, tick(30.0));
    let fired = |rule: Rule| -> Vec<String> {
        c.iter()
            .filter(|(_, ch, a)| a.rule == rule && *ch == Change::Firing)
            .map(|(_, _, a)| a.labels["worker"].clone())
            .collect()
    };
    assert_eq!(fired(Rule::CostRunaway), ["w0"]);
    assert_eq!(fired(Rule::CostConcentration), ["w0"]);
    let runaway = c
        .iter()
        .find(|(_, ch, a)| a.rule == Rule::CostRunaway && *ch == Change::Firing)
        .unwrap();
    assert_eq!(runaway.2.severity, Severity::Critical);
    assert!(
        runaway.2.message.contains("$30.00/h"),
        "{}",
        runaway.2.message
    );
}

#[test]
fn a_healthy_fleet_raises_nothing_in_an_hour() {
    let mut r = Run::new();
    let c = r.run(60 * MIN, |now| {
        let workers = (0..50)
            .map(|i| {
                let mut w = worker(&format!("w{i:02}"));
                w.context_utilisation = Some(0.2 + (i as f64) / 100.0);
                w.token_rate_vs_baseline = Some(0.8 + ((now / S + i) % 5) as f64 / 10.0);
                w.cost_usd = (now - T0) as f64 / 3_600_000.0;
                w.burn_rate_usd_per_h = 1.0;
                w.tasks_completed = (now - T0) / (30 * S);
                w
            })
            .collect();
        snapshot(
            workers,
            vec![pool("code", Some(5), 50, 40)],
            FleetView {
                output_tokens_per_s: 1000.0 + ((now / S) % 7) as f64 * 10.0,
                error_rate_5m: Some(0.01),
                ops_5m: 5_000,
                ..Default::default()
            },
        )
    });
    let sent_any: Vec<_> = c.iter().filter(|(_, ch, _)| ch.is_sent()).collect();
    assert!(sent_any.is_empty(), "{sent_any:?}");
}

#[test]
fn an_alert_whose_agent_is_lost_resolves_for_lack_of_data_and_firing_ones_renotify() {
    let mut r = Run::new();
    r.spec.renotify_s = 120;
    let stuck = |lost: bool| {
        move |_| {
            let mut w = worker("w1");
            w.state = State::Stuck;
            w.lost = lost;
            snapshot(vec![w], vec![], FleetView::default())
        }
    };
    let c = r.run(5 * MIN, stuck(false));
    let s = sent(&c, Rule::StuckAgent);
    assert_eq!(
        s.iter().filter(|(_, c)| *c == Change::Renotify).count(),
        2,
        "{s:?}"
    );
    let from = r.now;
    let c = r.run(6 * MIN, stuck(true));
    let s = sent(&c, Rule::StuckAgent);
    assert_eq!(
        s,
        [(from + 300 * S, Change::Resolved)],
        "no data for no_data_s"
    );
    let resolved = &c
        .iter()
        .find(|(_, ch, _)| *ch == Change::Resolved)
        .unwrap()
        .2;
    assert_eq!(resolved.ended_reason.as_deref(), Some("no_data"));
    let states: Vec<_> = resolved.history.iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [
            AlertState::Pending,
            AlertState::Firing,
            AlertState::Resolved
        ]
    );
}

#[test]
fn open_alerts_are_bounded_and_the_excess_is_counted() {
    let mut r = Run::new();
    r.d = Detector::new(3);
    r.run(5 * S, |_| {
        let workers = (0..10)
            .map(|i| {
                let mut w = worker(&format!("w{i}"));
                w.state = State::Stuck;
                w
            })
            .collect();
        snapshot(workers, vec![], FleetView::default())
    });
    assert_eq!(r.d.open().len(), 3);
    assert!(r.d.refused() > 0);
}

#[test]
fn a_tool_loop_warns_at_three_same_calls_is_critical_at_ten_and_ends_with_the_run() {
    use crate::fleet::worker::RepeatedCall;
    let mut r = Run::new();
    r.spec.resolve_s = 5;
    let looping = |calls: u32| {
        move |_| {
            let mut w = worker("w1");
            w.repeated_call = (calls > 0).then(|| RepeatedCall {
                task_id: "t1".into(),
                tool: "web_search".into(),
                calls,
            });
            snapshot(vec![w, worker("w2")], vec![], FleetView::default())
        }
    };
    assert!(r.run(5 * S, looping(2)).is_empty(), "twice is not a loop");
    let c = r.run(S, looping(3));
    assert_eq!(sent(&c, Rule::ToolLoop), [(r.now, Change::Firing)]);
    let msg = &c
        .iter()
        .find(|(_, _, a)| a.rule == Rule::ToolLoop)
        .unwrap()
        .2
        .message;
    assert!(
        msg.contains("web_search with the same arguments 3 times in task t1"),
        "{msg}"
    );
    let c = r.run(S, looping(10));
    assert_eq!(sent(&c, Rule::ToolLoopRunaway), [(r.now, Change::Firing)]);
    // The warning stands aside: it resolves after `resolve_s` while the critical fires.
    let c = r.run(6 * S, looping(10));
    assert_eq!(sent(&c, Rule::ToolLoop).last().unwrap().1, Change::Resolved);
    assert_eq!(
        r.firing().iter().map(|(rule, _)| *rule).collect::<Vec<_>>(),
        [Rule::ToolLoopRunaway],
        "the warning stands aside"
    );
    let c = r.run(10 * S, looping(0));
    assert_eq!(
        sent(&c, Rule::ToolLoopRunaway).last().unwrap().1,
        Change::Resolved
    );
    assert!(r.firing().is_empty());
}

#[test]
fn ten_agents_failing_their_web_search_at_once_fire_one_alert() {
    use crate::fleet::slices::SliceView;
    let mut r = Run::new();
    let slice = |dims: &[(&'static str, &str)], recent: (u64, u64)| SliceView {
        dims: dims.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        recent_ops: recent.0,
        recent_failures: recent.1,
        past_ops: 400,
        past_failures: 2,
    };
    let failing = |_| {
        let mut s = snapshot(vec![worker("w1")], vec![], FleetView::default());
        s.slices = vec![
            slice(&[("tool", "web_search")], (10, 10)),
            slice(&[("tool", "web_search"), ("model", "gpt-4o")], (10, 10)),
            slice(&[("tool", "web_search"), ("user_tier", "free")], (6, 6)),
            slice(&[("tool", "web_search"), ("user_tier", "pro")], (4, 4)),
        ];
        s.slice_totals.all = (500, 10);
        s.slice_totals.tools = (500, 10);
        s
    };
    let c = r.run(30 * S, failing);
    let fired: Vec<&Alert> = c
        .iter()
        .filter(|(_, ch, a)| *ch == Change::Firing && a.rule == Rule::FailureSlice)
        .map(|(_, _, a)| a)
        .collect();
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(
        fired[0].labels,
        BTreeMap::from([("tool".to_string(), "web_search".to_string())])
    );
    assert!(
        fired[0]
            .message
            .starts_with("Error rate on web_search tool: up"),
        "{}",
        fired[0].message
    );
    // Quiet again once the failures age out of the window.
    let c = r.run(70 * S, |_| {
        snapshot(vec![worker("w1")], vec![], FleetView::default())
    });
    assert_eq!(
        sent(&c, Rule::FailureSlice).last().unwrap().1,
        Change::Resolved
    );
}

#[test]
fn a_tool_failing_across_the_fleet_fires_below_seventy_percent_success() {
    use crate::fleet::slices::SliceView;
    let mut r = Run::new();
    r.spec.pending_s = 0;
    r.spec.resolve_s = 2;
    let with = |calls: u64, failures: u64| {
        move |_| {
            let mut s = snapshot(vec![worker("w1")], vec![], FleetView::default());
            s.slices = vec![SliceView {
                dims: vec![("tool", "pdf_reader".to_string())],
                recent_ops: calls,
                recent_failures: failures,
                past_ops: calls,
                past_failures: failures,
            }];
            s.slice_totals.all = (calls, failures);
            s.slice_totals.tools = (calls, failures);
            s
        }
    };
    assert!(
        sent(&r.run(3 * S, with(100, 25)), Rule::ToolFailureRate).is_empty(),
        "75% succeed"
    );
    assert!(
        sent(&r.run(3 * S, with(10, 9)), Rule::ToolFailureRate).is_empty(),
        "too few calls"
    );
    let c = r.run(2 * S, with(100, 40));
    assert_eq!(
        sent(&c, Rule::ToolFailureRate).first().unwrap().1,
        Change::Firing
    );
    let a = c
        .iter()
        .find(|(_, _, a)| a.rule == Rule::ToolFailureRate)
        .unwrap();
    assert!(
        a.2.message
            .starts_with("Tool pdf_reader succeeded in 60% of 100 calls"),
        "{}",
        a.2.message
    );
    assert_eq!(a.2.labels["tool"], "pdf_reader");
    let c = r.run(5 * S, with(100, 10));
    assert_eq!(
        sent(&c, Rule::ToolFailureRate).last().unwrap().1,
        Change::Resolved
    );
}

#[test]
fn distribution_jumps_per_task_type_and_team_fire_on_the_jump_and_not_on_a_steady_hour() {
    use crate::fleet::view::{AttributionView, TaskTypeView};
    use crate::fleet::window::Percentiles;
    let p = |p50: f64, p95: f64, p99: f64| Percentiles {
        count: 50,
        p50: Some(p50),
        p95: Some(p95),
        p99: Some(p99),
        p999: Some(p99),
        mean: Some(p50),
    };
    let hour = |cost_now: f64, dur_now: f64, depth_p99: f64, tokens_now: f64| {
        move |_| {
            let t = TaskTypeView {
                task_type: "code_review".into(),
                tasks: 100,
                cost_recent_usd: p(0.1, cost_now, cost_now),
                cost_earlier_usd: p(0.1, 0.29, 0.3),
                duration_recent_ms: p(20_000.0, dur_now, dur_now),
                duration_earlier_ms: p(20_000.0, 50_000.0, 52_000.0),
                depth: p(7.0, 12.0, depth_p99),
                tokens_recent: p(3_000.0, tokens_now, tokens_now),
                tokens_earlier: p(3_000.0, 8_000.0, 9_000.0),
                ..Default::default()
            };
            // The search team's runs read more context; its spend per run is steady.
            let team = AttributionView {
                dimension: "team",
                value: "search".into(),
                runs: 100,
                cost_recent_usd: p(0.1, 0.2, 0.2),
                cost_earlier_usd: p(0.1, 0.2, 0.2),
                tokens_recent: p(3_000.0, tokens_now, tokens_now),
                tokens_earlier: p(3_000.0, 8_000.0, 9_000.0),
                ..Default::default()
            };
            snapshot(
                vec![worker("w1")],
                vec![],
                FleetView {
                    task_types: vec![t],
                    attributions: vec![team],
                    ..Default::default()
                },
            )
        }
    };
    let rules = [
        Rule::CostJump,
        Rule::DurationJump,
        Rule::DepthTail,
        Rule::TokensJump,
    ];
    let mut r = Run::new();
    r.spec.pending_s = 0;
    let quiet = r.run(10 * S, hour(0.31, 55_000.0, 14.0, 9_000.0));
    for rule in rules {
        assert!(sent(&quiet, rule).is_empty(), "{rule:?} on a steady hour");
    }
    let c = r.run(2 * S, hour(0.42, 84_000.0, 31.0, 10_900.0));
    for rule in rules {
        assert_eq!(
            sent(&c, rule).first().map(|x| x.1),
            Some(Change::Firing),
            "{rule:?}"
        );
    }
    let team_tokens: Vec<&Alert> = c
        .iter()
        .filter(|(_, _, a)| a.rule == Rule::TokensJump && a.labels.contains_key("team"))
        .map(|(_, _, a)| a)
        .collect();
    assert_eq!(team_tokens.len(), 1, "{c:?}");
    assert_eq!(
        team_tokens[0].message,
        "P95 tokens per run of team search is 10900, up 36% from 8000 earlier in the hour"
    );
    assert!(
        !c.iter()
            .any(|(_, _, a)| a.rule == Rule::CostJump && a.labels.contains_key("team")),
        "the team's cost per run did not move"
    );
    let msg = |rule| {
        c.iter()
            .find(|(_, _, a)| a.rule == rule && a.labels.contains_key("task_type"))
            .map(|(_, _, a)| a.message.clone())
            .unwrap()
    };
    assert!(
        msg(Rule::CostJump)
            .contains("P95 cost per run of code_review tasks is $0.4200, up 45% from $0.2900"),
        "{}",
        msg(Rule::CostJump)
    );
    assert!(
        msg(Rule::DurationJump).contains("is 84.0 s, up 62% from 52.0 s"),
        "{}",
        msg(Rule::DurationJump)
    );
    assert!(
        msg(Rule::DepthTail).contains("31 calls, 4.4x the median (7)"),
        "{}",
        msg(Rule::DepthTail)
    );
}

mod ladder {
    use super::*;
    use crate::detect::intervene::{self, InterventionState, Target};
    use crate::policy::schema::{ALERT_RULES, EscalationAction, EscalationSpec};
    use fleet_worker::control::{Command, Mode};

    fn step(name: &str, action: EscalationAction, after_s: u64) -> EscalationSpec {
        EscalationSpec {
            name: name.into(),
            rules: vec![],
            severity: "warning".into(),
            after_s,
            action,
            tasks_per_s: (action == EscalationAction::Throttle).then_some(0.5),
            sink: (action == EscalationAction::Notify).then(|| "oncall".into()),
            block: None,
            sticky: false,
        }
    }

    /// A context_critical alert firing on w1 from the first tick, and its snapshot.
    fn critical_on_w1() -> (Run, FleetSnapshot) {
        let mut r = Run::new();
        r.run(2 * S, with_context(0.97));
        let snap = with_context(0.97)(r.now);
        (r, snap)
    }

    #[test]
    fn the_policy_names_every_detector_rule() {
        assert_eq!(ALERT_RULES.to_vec(), Rule::ALL.map(Rule::as_str).to_vec());
    }

    #[test]
    fn steps_are_due_once_after_their_delay_and_only_for_matching_alerts() {
        let (r, snap) = critical_on_w1();
        let open = r.d.open();
        let firing_ms = open[0].firing_ms.unwrap();
        let mut only_loops = step("loops", EscalationAction::Pause, 0);
        only_loops.rules = vec!["token_loop".into()];
        let mut critical_only = step("crit", EscalationAction::Log, 0);
        critical_only.severity = "critical".into();
        let steps = [
            step("brake", EscalationAction::Throttle, 0),
            step("stop", EscalationAction::Pause, 60),
            only_loops,
            critical_only,
        ];
        let now = firing_ms + 30 * S;
        let due = intervene::due(&open, &steps, &snap, |_| false, now);
        let names: Vec<&str> = due.iter().map(|i| i.step.as_str()).collect();
        assert_eq!(
            names,
            ["brake", "crit"],
            "pause waits 60 s; loops is another rule"
        );
        let brake = &due[0];
        assert_eq!(brake.id, format!("{}:brake", open[0].id));
        assert_eq!(brake.target, Target::Worker("w1".into()));
        assert_eq!((brake.state, brake.level), (InterventionState::Active, 4));
        assert_eq!(due[1].state, InterventionState::Done);
        // Once taken, a step is not due again for the same alert.
        let taken: Vec<String> = due.iter().map(|i| i.id.clone()).collect();
        let later = intervene::due(
            &open,
            &steps,
            &snap,
            |id| taken.iter().any(|t| t == id),
            firing_ms + 61 * S,
        );
        let names: Vec<&str> = later.iter().map(|i| i.step.as_str()).collect();
        assert_eq!(names, ["stop"]);
    }

    #[test]
    fn a_fleet_alert_skips_worker_steps_and_cancel_names_the_running_task() {
        let (r, snap) = critical_on_w1();
        let mut open = r.d.open();
        let now = open[0].firing_ms.unwrap();
        let cancel = intervene::due(
            &open,
            &[step("c", EscalationAction::CancelTask, 0)],
            &snap,
            |_| false,
            now,
        );
        assert_eq!(cancel[0].task_id.as_deref(), Some("w1-task"));
        assert_eq!(cancel[0].state, InterventionState::Done);
        open[0].labels.clear();
        let skipped = intervene::due(
            &open,
            &[step("p", EscalationAction::Pause, 0)],
            &snap,
            |_| false,
            now,
        );
        assert_eq!(skipped[0].state, InterventionState::Skipped);
        assert!(
            skipped[0].note.contains("fleet-wide"),
            "{}",
            skipped[0].note
        );
    }

    #[test]
    fn interventions_end_when_their_alert_resolves_unless_sticky() {
        let (mut r, snap) = critical_on_w1();
        let open = r.d.open();
        let now = open[0].firing_ms.unwrap();
        let mut sticky = step("keep", EscalationAction::Drain, 0);
        sticky.sticky = true;
        let taken = intervene::due(
            &open,
            &[step("brake", EscalationAction::Throttle, 0), sticky],
            &snap,
            |_| false,
            now,
        );
        assert!(intervene::ended(&taken, &open).is_empty(), "still firing");
        r.run(10 * MIN, with_context(0.2));
        assert!(r.d.open().is_empty(), "resolved");
        let ended = intervene::ended(&taken, &r.d.open());
        assert_eq!(ended, [taken[0].id.clone()], "the sticky drain stays");
    }

    #[test]
    fn a_block_step_blocks_the_labelled_scope_or_is_skipped_without_it() {
        use crate::policy::schema::BlockScope;
        let (r, snap) = critical_on_w1();
        let open = r.d.open();
        let now = open[0].firing_ms.unwrap();
        let mut guard = step("guard", EscalationAction::Block, 0);
        guard.block = Some(BlockScope::Pool);
        let by_pool = intervene::due(&open, std::slice::from_ref(&guard), &snap, |_| false, now);
        assert_eq!(by_pool[0].state, InterventionState::Active);
        assert_eq!(by_pool[0].level, 5);
        let blocks = intervene::blocks(&by_pool);
        assert_eq!(
            (blocks[0].scope, blocks[0].value.as_str()),
            (BlockScope::Pool, "code")
        );
        assert!(
            blocks[0].reason.contains("Context of agent w1"),
            "{}",
            blocks[0].reason
        );
        guard.block = Some(BlockScope::Team);
        let no_team = intervene::due(&open, &[guard], &snap, |_| false, now);
        assert_eq!(no_team[0].state, InterventionState::Skipped);
        assert!(intervene::blocks(&no_team).is_empty());
    }

    #[test]
    fn a_reroute_step_moves_the_alerts_pool_once_its_fallback_is_known() {
        let (r, snap) = critical_on_w1();
        let open = r.d.open();
        let now = open[0].firing_ms.unwrap();
        let mut due = intervene::due(
            &open,
            &[step("move", EscalationAction::Reroute, 0)],
            &snap,
            |_| false,
            now,
        );
        assert_eq!(due[0].state, InterventionState::Active);
        assert!(
            intervene::reroutes(&due).is_empty(),
            "the fallback is filled in by act.rs"
        );
        due[0].reroute = Some(("code".into(), "code-b".into()));
        let rr = intervene::reroutes(&due);
        assert_eq!((rr[0].from.as_str(), rr[0].to.as_str()), ("code", "code-b"));
        assert!(rr[0].forced.as_deref().unwrap().contains(&due[0].id));
    }

    #[test]
    fn workers_are_told_the_strongest_mode_and_the_lowest_throttle() {
        let (r, _) = critical_on_w1();
        let snap = snapshot(
            vec![worker("w1"), worker("w2"), {
                let mut w = worker("w3");
                w.lost = true;
                w
            }],
            vec![],
            FleetView::default(),
        );
        let open = r.d.open();
        let now = open[0].firing_ms.unwrap();
        let mut all = intervene::due(
            &open,
            &[
                step("brake", EscalationAction::Throttle, 0),
                step("drain", EscalationAction::Drain, 0),
            ],
            &snap,
            |_| false,
            now,
        );
        // A pool-wide pause at 0.2/s from another alert.
        let mut pool_pause = all[1].clone();
        pool_pause.id = "other/pause".into();
        pool_pause.action = EscalationAction::Pause;
        pool_pause.target = Target::Pool("code".into());
        let mut pool_throttle = all[0].clone();
        pool_throttle.id = "other/brake".into();
        pool_throttle.target = Target::Pool("code".into());
        pool_throttle.tasks_per_s = Some(0.2);
        all.extend([pool_pause, pool_throttle]);
        let want = intervene::desired(&all, &snap);
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            ["w1", "w2"],
            "not the lost one"
        );
        assert_eq!(
            (want["w1"].mode, want["w1"].tasks_per_s),
            (Mode::Paused, Some(0.2))
        );
        assert_eq!(want["w1"].because.len(), 4);
        assert_eq!(
            (want["w2"].mode, want["w2"].because.len()),
            (Mode::Paused, 2)
        );
        let idle = intervene::WorkerControl::default();
        assert_eq!(
            intervene::commands(&idle, &want["w1"]),
            [Command::Pause, Command::Throttle { tasks_per_s: 0.2 }]
        );
        assert_eq!(
            intervene::commands(&want["w1"], &idle),
            [Command::Resume, Command::Unthrottle]
        );
        assert!(
            intervene::commands(&want["w1"], &want["w1"]).is_empty(),
            "idempotent"
        );
        // Reverting the pool pause leaves w1 draining.
        all.retain(|i| i.id != "other/pause");
        assert_eq!(intervene::desired(&all, &snap)["w1"].mode, Mode::Draining);
    }
}

/// A fleet whose runs call tools from a mix, 12 a minute per prompt variant; `v7`'s mix
/// changes at `shift_at` while every run still completes.
fn drifting(shift_at: u64) -> impl FnMut(u64) -> FleetSnapshot {
    use crate::fleet::prints::Prints;
    use crate::fleet::worker::TaskSummary;
    let mut prints = Prints::default();
    let mut next = T0;
    let mut n = 0u64;
    move |now| {
        while next <= now {
            n += 1;
            for variant in ["v6", "v7"] {
                let shifted = variant == "v7" && next >= shift_at;
                // Before: search, read, read, summarise (with some runs skipping a read).
                // After: search, search, search, summarise: more searching, no reading.
                let tools: Vec<&str> = match (shifted, n % 4) {
                    (false, 0) => vec!["web_search", "read_page", "summarise"],
                    (false, _) => vec!["web_search", "read_page", "read_page", "summarise"],
                    (true, 0) => vec!["web_search", "web_search", "summarise"],
                    (true, _) => vec!["web_search", "web_search", "web_search", "summarise"],
                };
                let run = TaskSummary {
                    task_id: format!("t{n}"),
                    steps: 2 * tools.len() as u32,
                    prompt_variant: Some(variant.into()),
                    tools: tools.into_iter().map(String::from).collect(),
                    ..Default::default()
                };
                prints.add(None, &run, next);
            }
            next += 5 * S;
        }
        prints.tick(now);
        FleetSnapshot {
            prints: prints.view(),
            ..snapshot(vec![], vec![], FleetView::default())
        }
    }
}

#[test]
fn behaviour_drift_fires_on_a_tool_mix_shift_and_settles_into_the_new_normal() {
    // Healthy: two steady variants for two hours raise nothing.
    let mut r = Run::new();
    let quiet = r.run(120 * MIN, drifting(u64::MAX));
    assert!(sent(&quiet, Rule::BehaviourDrift).is_empty(), "{quiet:?}");

    // v7's runs search instead of reading from minute 60; every run still completes.
    let mut r = Run::new();
    let shift = T0 + 60 * MIN;
    let mut make = drifting(shift);
    let changes = r.run(200 * MIN, &mut make);
    let drift: Vec<&Alert> = changes
        .iter()
        .filter(|(_, c, a)| a.rule == Rule::BehaviourDrift && *c == Change::Firing)
        .map(|(_, _, a)| a)
        .collect();
    assert_eq!(drift.len(), 1, "one alert, for v7 only: {drift:?}");
    let a = drift[0];
    assert_eq!(
        a.labels,
        BTreeMap::from([("prompt_variant".into(), "v7".into())])
    );
    assert!(
        a.message.contains("read_page") && a.message.contains("web_search"),
        "{}",
        a.message
    );
    assert!(a.value > a.threshold, "{a:?}");
    let fired_at = changes
        .iter()
        .find(|(_, c, a)| a.rule == Rule::BehaviourDrift && *c == Change::Firing)
        .map(|(t, _, _)| *t)
        .unwrap();
    // Within two evaluations (5 minutes each) of the shift …
    assert!(
        fired_at > shift && fired_at <= shift + 10 * MIN,
        "fired {} s after",
        (fired_at - shift) / S
    );
    // … and resolved once the new mix is the whole hour's (the new normal).
    let resolved = sent(&changes, Rule::BehaviourDrift)
        .into_iter()
        .find(|(_, c)| *c == Change::Resolved)
        .map(|(t, _)| t)
        .expect("resolved");
    eprintln!(
        "fired {} s after the shift: {}; resolved {} min after",
        (fired_at - shift) / S,
        a.message,
        (resolved - shift) / MIN
    );
    assert!(
        resolved > shift + 45 * MIN && resolved < shift + 75 * MIN,
        "resolved {} min after",
        (resolved - shift) / MIN
    );
}

#[test]
fn the_fleet_error_window_is_the_policys() {
    // An hour of 10 s buckets of 10 operations; the last minute fails 2 in 10.
    let fleet = |_| {
        let buckets = (0..360)
            .map(|i| crate::fleet::view::TenSeconds {
                ops: 10,
                errors: if i >= 354 { 2 } else { 0 },
                output_tokens: 0,
            })
            .collect();
        with_series(buckets)
    };
    let mut r = Run::new();
    r.spec.pending_s = 0;
    // Over 5 minutes that is 12 of 300: 4 %, under 5 %.
    assert!(sent(&r.run(5 * S, fleet), Rule::ErrorRateSpike).is_empty());
    let mut r = Run::new();
    r.spec.pending_s = 0;
    r.spec.fleet_error_window_s = 60;
    let c = r.run(5 * S, fleet);
    assert_eq!(sent(&c, Rule::ErrorRateSpike).len(), 1, "{c:?}");
    let a = &c
        .iter()
        .find(|(_, _, a)| a.rule == Rule::ErrorRateSpike)
        .unwrap()
        .2;
    assert_eq!(a.value, 0.2);
    assert!(
        a.message.contains("20.0% over the last minute"),
        "{}",
        a.message
    );
}

#[test]
fn a_jump_in_the_slowest_tenth_of_a_percent_shows_over_enough_runs() {
    use crate::fleet::view::TaskTypeView;
    use crate::fleet::window::Percentiles;
    let p = |count: u64, p99: f64, p999: f64| Percentiles {
        count,
        p50: Some(10_000.0),
        p95: Some(20_000.0),
        p99: Some(p99),
        p999: Some(p999),
        mean: Some(12_000.0),
    };
    // P99 steady at 30 s; P99.9 from 40 s to 90 s.
    let fleet = |count: u64| {
        move |_| {
            let t = TaskTypeView {
                task_type: "research".into(),
                duration_recent_ms: p(count, 30_000.0, 90_000.0),
                duration_earlier_ms: p(count, 30_000.0, 40_000.0),
                ..Default::default()
            };
            snapshot(
                vec![],
                vec![],
                FleetView {
                    task_types: vec![t],
                    ..Default::default()
                },
            )
        }
    };
    let mut r = Run::new();
    r.spec.pending_s = 0;
    assert!(
        sent(&r.run(3 * S, fleet(500)), Rule::DurationJump).is_empty(),
        "500 runs say nothing about P99.9"
    );
    let c = r.run(3 * S, fleet(2_000));
    let a = &c
        .iter()
        .find(|(_, ch, a)| a.rule == Rule::DurationJump && *ch == Change::Firing)
        .expect("P99.9 jumped")
        .2;
    assert_eq!(
        a.message,
        "P99.9 duration of research runs is 90.0 s, up 125% from 40.0 s earlier in the hour"
    );
}
