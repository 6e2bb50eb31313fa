//! The worker state machine, driven through the fleet state with an explicit clock.

use std::sync::Arc;

use fleet_worker::message::{Heartbeat, WorkerState as HbState};

use super::*;
use crate::domain::{Dims, Identity, MetricKind, MetricPoint};
use crate::fleet::costs::Dim;
use crate::fleet::{FleetState, TaskEvent};
use crate::registry::{Registry, TokenUsage};

const S: u64 = 1_000;
const T0: u64 = 1_700_000_000_000;

fn cfg() -> FleetConfig {
    FleetConfig {
        stuck_factor: 3.0,
        tool_repeat_limit: 3,
        waiting_after_ms: 10 * S,
        lost_after_ms: 15 * S,
        retention_ms: 60 * S,
        min_stuck_after_ms: S,
        ..FleetConfig::default()
    }
}

fn fleet() -> FleetState {
    let reg = crate::hot::fixed(Registry::builtin().unwrap());
    FleetState::new(cfg(), reg, ["code"])
}

fn identity(worker: &str) -> Arc<Identity> {
    Arc::new(Identity {
        worker_id: worker.into(),
        pool: Some("code".into()),
        ..Default::default()
    })
}

/// A span of `worker` in task `task` that ended at `at_ms` after `dur_ms`.
fn span(worker: &str, task: &str, op: Operation, at_ms: u64, dur_ms: u64) -> SpanEvent {
    SpanEvent {
        identity: identity(worker),
        agent_name: None,
        trace_id: {
            let mut t = [7u8; 16];
            t[..task.len().min(16)].copy_from_slice(&task.as_bytes()[..task.len().min(16)]);
            t
        },
        span_id: [1; 8],
        parent_span_id: Some([2; 8]),
        start_ns: (at_ms - dur_ms) * 1_000_000,
        end_ns: at_ms * 1_000_000,
        error: false,
        error_type: None,
        operation: op,
        provider: None,
        model: None,
        usage: None,
        tool: None,
        tool_args_hash: None,
        task_id: Some(task.into()),
        expected_duration_s: None,
        task_root: false,
        dims: Dims::default(),
        names_agent: false,
        resource: identity(worker),
        resource_names_worker: true,
    }
}

fn chat(worker: &str, task: &str, at_ms: u64, model: &str, input: u64, output: u64) -> SpanEvent {
    let mut s = span(worker, task, Operation::Inference, at_ms, 1_000);
    s.model = Some(model.into());
    s.usage = Some(TokenUsage {
        input,
        output,
        ..Default::default()
    });
    s
}

fn tool(worker: &str, task: &str, at_ms: u64, name: &str) -> SpanEvent {
    let mut s = span(worker, task, Operation::ExecuteTool, at_ms, 200);
    s.tool = Some(name.into());
    s
}

fn root(worker: &str, task: &str, at_ms: u64, dur_ms: u64, failed: bool) -> SpanEvent {
    let mut s = span(worker, task, Operation::None, at_ms, dur_ms);
    s.task_root = true;
    s.error = failed;
    s
}

fn state_of(f: &FleetState, w: &str) -> State {
    f.worker(w).unwrap().state()
}

#[test]
fn active_waiting_stuck_active_idle() {
    let mut f = fleet();
    let mut first = chat("w1", "t1", T0, "gpt-4o", 1_000, 100);
    first.expected_duration_s = Some(10.0);
    f.apply_spans(vec![first], T0);
    assert_eq!(state_of(&f, "w1"), State::Active);
    assert_eq!(f.worker("w1").unwrap().current_task(), Some("t1"));

    f.tick(T0 + 5 * S);
    assert_eq!(state_of(&f, "w1"), State::Active);
    f.tick(T0 + 11 * S);
    assert_eq!(state_of(&f, "w1"), State::Waiting);
    // k × expected = 30 s without a span.
    f.tick(T0 + 30 * S);
    assert_eq!(state_of(&f, "w1"), State::Waiting);
    f.tick(T0 + 31 * S);
    assert_eq!(state_of(&f, "w1"), State::Stuck);
    let reason = f.worker("w1").unwrap().stuck_reason().unwrap().to_string();
    assert!(
        reason.contains("t1") && reason.contains("expected 10 s"),
        "{reason}"
    );

    f.apply_spans(vec![tool("w1", "t1", T0 + 32 * S, "search")], T0 + 32 * S);
    assert_eq!(state_of(&f, "w1"), State::Active);
    assert_eq!(f.worker("w1").unwrap().stuck_reason(), None);

    f.apply_spans(
        vec![root("w1", "t1", T0 + 33 * S, 33 * S, false)],
        T0 + 33 * S,
    );
    let w = f.worker("w1").unwrap();
    assert_eq!(w.state(), State::Idle);
    assert_eq!(w.current_task(), None);
    let path: Vec<State> = w.transitions().map(|t| t.to).collect();
    assert_eq!(
        path,
        [
            State::Active,
            State::Waiting,
            State::Stuck,
            State::Active,
            State::Idle
        ]
    );
    let done: Vec<_> = w.recent_tasks().collect();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, RunEnd::Completed);
    assert_eq!(done[0].steps, 2);
    // From the first span's start (the chat began 1 s before T0) to the root's end.
    assert_eq!(done[0].duration_ms, 34 * S);
    // gpt-4o: 1,000 × $2.50 + 100 × $10 per 1M.
    assert!((done[0].cost_usd.unwrap() - 0.0035).abs() < 1e-12);
}

#[test]
fn the_same_tool_called_n_plus_one_times_is_stuck() {
    let mut f = fleet();
    for i in 0..3 {
        f.apply_spans(vec![tool("w1", "t1", T0 + i * S, "grep")], T0 + i * S);
        assert_eq!(state_of(&f, "w1"), State::Active, "call {}", i + 1);
    }
    // Other tools do not count towards grep's limit.
    f.apply_spans(vec![tool("w1", "t1", T0 + 3 * S, "ls")], T0 + 3 * S);
    assert_eq!(state_of(&f, "w1"), State::Active);
    f.apply_spans(vec![tool("w1", "t1", T0 + 4 * S, "grep")], T0 + 4 * S);
    let w = f.worker("w1").unwrap();
    assert_eq!(w.state(), State::Stuck);
    let reason = w.stuck_reason().unwrap();
    assert!(
        reason.contains("\"grep\" called 4 times") && reason.contains("limit 3"),
        "{reason}"
    );
    assert_eq!(w.tools()["grep"].calls, 4);
    // The run ending clears it; the next run starts clean.
    f.apply_spans(vec![root("w1", "t1", T0 + 5 * S, 5 * S, false)], T0 + 5 * S);
    assert_eq!(state_of(&f, "w1"), State::Idle);
    f.apply_spans(vec![tool("w1", "t2", T0 + 6 * S, "grep")], T0 + 6 * S);
    assert_eq!(state_of(&f, "w1"), State::Active);
}

#[test]
fn the_same_call_is_counted_by_tool_and_arguments() {
    let mut f = fleet();
    let call = |at: u64, name: &str, args: &str| {
        let mut s = tool("w1", "t1", at, name);
        s.tool_args_hash = Some(crate::domain::arguments_hash(args));
        s
    };
    let same = [r#"{"q":"rust","n":5}"#, r#"{ "n": 5, "q": "rust" }"#];
    for i in 0..4u64 {
        let at = T0 + i * 100;
        f.apply_spans(vec![call(at, "search", same[(i % 2) as usize])], at);
    }
    // Another query, another tool with the same arguments, a call without arguments.
    f.apply_spans(
        vec![
            call(T0 + 500, "search", r#"{"q":"go","n":5}"#),
            call(T0 + 600, "fetch", same[0]),
            tool("w1", "t1", T0 + 700, "search"),
        ],
        T0 + 700,
    );
    let rc = f.worker("w1").unwrap().repeated_call().unwrap();
    assert_eq!(
        (rc.task_id.as_str(), rc.tool.as_str(), rc.calls),
        ("t1", "search", 4)
    );
    f.apply_spans(vec![root("w1", "t1", T0 + S, S, false)], T0 + S);
    assert_eq!(
        f.worker("w1").unwrap().repeated_call(),
        None,
        "the run ended"
    );
}

fn heartbeat(worker: &str, tasks: &[&str]) -> Heartbeat {
    Heartbeat {
        schema: 1,
        worker_id: worker.into(),
        pool: "code".into(),
        state: if tasks.is_empty() {
            HbState::Idle
        } else {
            HbState::Active
        },
        model: Some("claude-sonnet-4-5".into()),
        current_tasks: tasks.iter().map(|t| t.to_string()).collect(),
        max_in_flight: 4,
        context_tokens: None,
        capabilities: vec!["rust".into()],
        completed: 0,
        failed: 0,
        sdk_version: Some("0.1.0".into()),
        started_at: "2023-11-14T22:13:20Z".into(),
        sent_at: "2023-11-14T22:13:20Z".into(),
    }
}

/// A heartbeat with figures no worker has is dropped and counted, and changes nothing: a
/// pool of four billion slots would look idle to routing for ever.
#[test]
fn heartbeats_out_of_range_are_dropped_and_counted() {
    let mut f = fleet();
    let mut wide = heartbeat("w-wide", &[]);
    wide.max_in_flight = u32::MAX;
    let mut full = heartbeat("w-full", &[]);
    full.context_tokens = Some(u64::MAX);
    f.apply_heartbeat(&wide, T0);
    f.apply_heartbeat(&full, T0);
    assert!(f.worker("w-wide").is_none() && f.worker("w-full").is_none());
    assert_eq!(f.counters.heartbeats_invalid.get(), 2);
    let mut edge = heartbeat("w-edge", &[]);
    edge.max_in_flight = fleet_worker::protocol::MAX_IN_FLIGHT;
    edge.context_tokens = Some(crate::domain::MAX_TOKENS_PER_REPORT);
    f.apply_heartbeat(&edge, T0);
    assert!(
        f.worker("w-edge").is_some(),
        "the limits themselves are read"
    );
    assert_eq!(f.counters.heartbeats_invalid.get(), 2);
}

#[test]
fn lost_when_heartbeats_stop_and_forgotten_after_retention() {
    let mut f = fleet();
    f.apply_heartbeat(&heartbeat("w1", &[]), T0);
    f.tick(T0 + 15 * S);
    assert!(!f.worker("w1").unwrap().lost);
    f.tick(T0 + 16 * S);
    assert!(f.worker("w1").unwrap().lost);
    let snap = f.snapshot(T0 + 16 * S);
    assert_eq!(snap.fleet.lost_workers, ["w1"]);
    assert_eq!(snap.pools[0].lost, 1);
    // It comes back.
    f.apply_heartbeat(&heartbeat("w1", &[]), T0 + 20 * S);
    assert!(!f.worker("w1").unwrap().lost);
    // Silent for longer than lost_after + retention: dropped.
    f.tick(T0 + 36 * S);
    assert!(f.worker("w1").unwrap().lost);
    f.tick(T0 + 81 * S);
    assert!(f.worker("w1").is_none());
    assert_eq!(f.counters.workers_evicted.get(), 1);
}

/// A pool that is not configured leaves the live state as its lost workers do: once no
/// worker of it is tracked, its queue is empty and nothing was heard of it for the
/// retention. A configured pool stays, as does one with tasks in its queue, and one whose
/// worker is still heard of (here by its spans alone); a pool forgotten is taken in again
/// when it is heard of again.
#[test]
fn a_pool_that_is_not_configured_is_forgotten_a_retention_after_it_was_last_heard_of() {
    let mut f = fleet();
    let of_pool = |worker: &str, pool: &str| Heartbeat {
        pool: pool.into(),
        ..heartbeat(worker, &[])
    };
    let queue = |pool: &str, pending| TaskEvent::Queue {
        pool: pool.into(),
        pending,
        ack_pending: 0,
    };
    let names = |f: &FleetState, at| {
        f.snapshot(at)
            .pools
            .iter()
            .map(|p| p.name.clone())
            .collect::<Vec<_>>()
    };
    f.apply_heartbeat(&of_pool("w-typo", "cdoe"), T0);
    f.apply_heartbeat(&of_pool("w-spans", "delta"), T0);
    f.apply_task(queue("beta", 3), T0);
    f.apply_task(
        TaskEvent::Dispatched {
            task_id: "t1".into(),
            pool: "gamma".into(),
            expected_ms: None,
            task_type: None,
        },
        T0,
    );
    assert_eq!(names(&f, T0), ["beta", "cdoe", "code", "delta", "gamma"]);
    // Every queue is read every 2 s; an empty one (gamma's) keeps nothing.
    for s in (2..=80).step_by(2) {
        let at = T0 + s * S;
        f.apply_task(queue("beta", 3), at);
        f.apply_task(queue("gamma", 0), at);
        f.apply_task(queue("code", 0), at);
        f.apply_spans(vec![tool("w-spans", "t9", at, "grep")], at);
        f.tick(at);
        if s == 60 {
            assert_eq!(
                names(&f, at),
                ["beta", "cdoe", "code", "delta", "gamma"],
                "within the retention"
            );
        }
    }
    let at = T0 + 80 * S;
    assert!(f.worker("w-typo").is_none(), "its worker forgotten first");
    assert_eq!(names(&f, at), ["beta", "code", "delta"]);
    // Its queue purged, beta goes a retention later.
    f.apply_task(queue("beta", 0), at);
    f.tick(at + 60 * S);
    assert_eq!(names(&f, at + 60 * S), ["beta", "code", "delta"]);
    f.tick(at + 61 * S);
    assert_eq!(names(&f, at + 61 * S), ["code", "delta"]);
    // The typo'd worker starts again: its pool is back.
    f.apply_heartbeat(&of_pool("w-typo", "cdoe"), at + 62 * S);
    assert_eq!(names(&f, at + 62 * S), ["cdoe", "code", "delta"]);
}

/// The live state tracks at most `MAX_POOLS` pools: a new one past them is counted, not
/// taken in, until pools that are not configured are forgotten and make room.
#[test]
fn pools_past_the_bound_are_counted_and_room_comes_back_as_idle_ones_leave() {
    let mut f = fleet();
    let max = crate::fleet::MAX_POOLS;
    // `code` is configured: max - 1 more fit, and three do not.
    for i in 0..max + 2 {
        let hb = Heartbeat {
            pool: format!("p{i}"),
            ..heartbeat(&format!("w{i}"), &[])
        };
        f.apply_heartbeat(&hb, T0);
    }
    assert_eq!(f.snapshot(T0).pools.len(), max);
    assert_eq!(f.counters.pools_refused.get(), 3);
    // Every worker stops: lost, then forgotten with its pool a retention later.
    f.tick(T0 + 80 * S);
    let left: Vec<String> = f
        .snapshot(T0 + 80 * S)
        .pools
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(left, ["code"]);
    let late = Heartbeat {
        pool: "late".into(),
        ..heartbeat("w-late", &[])
    };
    f.apply_heartbeat(&late, T0 + 81 * S);
    assert_eq!(f.snapshot(T0 + 81 * S).pools.len(), 2, "room again");
    assert_eq!(f.counters.pools_refused.get(), 3);
}

#[test]
fn a_full_table_makes_room_by_forgetting_the_longest_silent_lost_worker() {
    let reg = crate::hot::fixed(Registry::builtin().unwrap());
    let mut f = FleetState::new(
        FleetConfig {
            max_workers: 3,
            ..cfg()
        },
        reg,
        ["code"],
    );
    f.apply_heartbeat(&heartbeat("w1", &[]), T0);
    f.apply_heartbeat(&heartbeat("w2", &[]), T0);
    f.apply_heartbeat(&heartbeat("w3", &[]), T0 + S);
    f.tick(T0 + 17 * S);
    assert!(f.worker("w3").unwrap().lost, "all three lost");
    // w1 is back before the new ones come: only lost workers make room.
    f.apply_heartbeat(&heartbeat("w1", &[]), T0 + 18 * S);
    f.apply_heartbeat(&heartbeat("n1", &[]), T0 + 19 * S);
    assert!(f.worker("n1").is_some(), "a new worker is seen");
    assert!(
        f.worker("w2").is_none(),
        "w2, silent the longest, made room"
    );
    f.apply_heartbeat(&heartbeat("n2", &[]), T0 + 19 * S);
    assert!(f.worker("n2").is_some());
    assert!(f.worker("w3").is_none());
    assert_eq!(f.counters.workers_displaced.get(), 2);
    // Every tracked worker is live now: a new one is refused, as before.
    f.apply_heartbeat(&heartbeat("n3", &[]), T0 + 21 * S);
    assert!(f.worker("n3").is_none());
    assert_eq!(f.counters.workers_refused.get(), 1);
    assert_eq!(f.worker_count(), 3);
    // Displaced is not evicted after the retention period.
    assert_eq!(f.counters.workers_evicted.get(), 0);
}

#[test]
fn a_heartbeat_run_uses_the_dispatched_expected_duration() {
    let mut f = fleet();
    f.apply_task(
        TaskEvent::Dispatched {
            task_id: "t9".into(),
            pool: "code".into(),
            expected_ms: Some(2 * S),
            task_type: Some("summarisation".into()),
        },
        T0,
    );
    f.apply_heartbeat(&heartbeat("w1", &["t9"]), T0);
    assert_eq!(state_of(&f, "w1"), State::Active);
    let snap = f.snapshot(T0);
    assert_eq!(snap.workers[0].current_task.as_deref(), Some("t9"));
    assert_eq!(
        snap.workers[0].current_task_type.as_deref(),
        Some("summarisation")
    );
    // 3 × 2 s without a span.
    f.tick(T0 + 7 * S);
    assert_eq!(state_of(&f, "w1"), State::Stuck);
    // The next heartbeat no longer lists it: the run ended without spans.
    f.apply_heartbeat(&heartbeat("w1", &[]), T0 + 8 * S);
    assert_eq!(state_of(&f, "w1"), State::Idle);
}

#[test]
fn failed_run_is_error_until_the_next_run() {
    let mut f = fleet();
    f.apply_spans(vec![root("w1", "t1", T0, 100, true)], T0);
    assert_eq!(state_of(&f, "w1"), State::Error);
    f.tick(T0 + 100 * S);
    assert_eq!(state_of(&f, "w1"), State::Error);
    f.apply_spans(vec![tool("w1", "t2", T0 + 101 * S, "x")], T0 + 101 * S);
    assert_eq!(state_of(&f, "w1"), State::Active);
    // Three failed calls in a row inside a run.
    for i in 0..3 {
        let mut s = chat("w1", "t2", T0 + (102 + i) * S, "gpt-4o", 1, 1);
        s.error = true;
        f.apply_spans(vec![s], T0 + (102 + i) * S);
    }
    assert_eq!(state_of(&f, "w1"), State::Error);
}

#[test]
fn context_utilisation_and_unknown_models() {
    let mut f = fleet();
    f.apply_spans(
        vec![chat("w1", "t1", T0, "gpt-4o-2024-08-06", 64_000, 10)],
        T0,
    );
    let v = &f.snapshot(T0).workers[0];
    assert_eq!(v.context_limit_tokens, Some(128_000));
    assert_eq!(v.context_utilisation, Some(0.5));
    assert!(!v.model_unknown);
    assert!(v.cost_usd > 0.0);

    f.apply_spans(vec![chat("w2", "t2", T0, "my-finetune", 5_000, 500)], T0);
    let snap = f.snapshot(T0);
    let v = snap.workers.iter().find(|w| w.id == "w2").unwrap();
    assert!(v.model_unknown);
    assert_eq!(v.unknown_cost_calls, 1);
    assert_eq!(v.cost_usd, 0.0);
    assert_eq!(v.context_utilisation, None);
    let m = snap
        .fleet
        .models
        .iter()
        .find(|m| m.model == "my-finetune")
        .unwrap();
    assert!(m.unknown);
    let report = f.costs(&[Dim::Model], 3_600_000, T0);
    assert_eq!(report.unknown_cost_calls, 1);
}

#[test]
fn attribution_and_task_type_percentiles() {
    let mut f = fleet();
    for i in 0..10u64 {
        let task = format!("t{i}");
        let mut c = chat(
            "w1",
            &task,
            T0 + i * S,
            "claude-sonnet-4-5",
            1_000 * (i + 1),
            100,
        );
        c.dims.team = Some(if i % 2 == 0 { "search" } else { "ads" }.into());
        c.dims.task_type = Some("summarisation".into());
        f.apply_spans(vec![c], T0 + i * S);
        f.apply_spans(vec![root("w1", &task, T0 + i * S, 500, false)], T0 + i * S);
    }
    let report = f.costs(&[Dim::Team], 3_600_000, T0 + 10 * S);
    assert_eq!(report.rows.len(), 2);
    assert_eq!(report.rows[0].group["team"].as_deref(), Some("ads"));
    assert!((report.total_usd - f.worker("w1").unwrap().total_cost_usd).abs() < 1e-12);
    let snap = f.snapshot(T0 + 10 * S);
    let tt = &snap.fleet.task_types[0];
    assert_eq!(tt.task_type, "summarisation");
    assert_eq!(tt.tasks, 10);
    // One LLM call per run.
    assert!((tt.depth.p50.unwrap() - 1.0).abs() < 0.02);
    assert!(tt.cost_usd.p99.unwrap() > tt.cost_usd.p50.unwrap());
    assert_eq!(snap.fleet.states["IDLE"], 1);
}

#[test]
fn metric_tokens_are_booked_only_for_workers_without_span_usage() {
    let mut f = fleet();
    let point = |worker: &str, kind, value: f64| MetricPoint {
        identity: identity(worker),
        kind,
        model: Some("gpt-4o-mini".into()),
        series: kind as u64,
        cumulative: true,
        start_ns: 1,
        time_ns: 2,
        value,
        count: 1,
        error: false,
    };
    // Cumulative: 100 then 250 is 250 in all, not 350.
    f.apply_metrics(vec![point("m1", MetricKind::InputTokens, 100.0)], T0);
    f.apply_metrics(vec![point("m1", MetricKind::InputTokens, 250.0)], T0 + S);
    f.apply_metrics(vec![point("m1", MetricKind::OutputTokens, 40.0)], T0 + S);
    let w = f.worker("m1").unwrap();
    assert_eq!((w.total_input_tokens, w.total_output_tokens), (250, 40));
    assert!(w.total_cost_usd > 0.0);
    // A worker whose spans carry usage: its metrics are the same tokens again.
    f.apply_spans(vec![chat("s1", "t1", T0, "gpt-4o-mini", 300, 30)], T0);
    f.apply_metrics(vec![point("s1", MetricKind::InputTokens, 300.0)], T0 + S);
    assert_eq!(f.worker("s1").unwrap().total_input_tokens, 300);
    // A counter that jumps by more than one report may hold moves on without booking the
    // jump; its next step counts again.
    let cost = f.worker("m1").unwrap().total_cost_usd;
    f.apply_metrics(vec![point("m1", MetricKind::InputTokens, 2e9)], T0 + 2 * S);
    let w = f.worker("m1").unwrap();
    assert_eq!(w.total_input_tokens, 250);
    assert_eq!(w.total_cost_usd, cost);
    assert_eq!(f.counters.metric_steps_out_of_range.get(), 1);
    f.apply_metrics(
        vec![point("m1", MetricKind::InputTokens, 2e9 + 50.0)],
        T0 + 3 * S,
    );
    assert_eq!(f.worker("m1").unwrap().total_input_tokens, 300);
}

#[test]
fn per_worker_memory_is_bounded() {
    let mut f = fleet();
    for i in 0..200u64 {
        let at = T0 + i * 20 * S;
        f.apply_spans(
            vec![
                tool("w1", &format!("t{i}"), at, &format!("tool{i}")),
                root("w1", &format!("t{i}"), at, 10, false),
            ],
            at,
        );
    }
    let w = f.worker("w1").unwrap();
    assert!(w.recent_tasks().count() <= cfg().recent_tasks);
    assert!(w.tools().len() <= cfg().max_tools_per_worker + 1);
    assert!(w.tools().contains_key("_other"));
    assert!(w.ring.len() <= crate::fleet::window::WORKER_BUCKETS);
    assert!(w.transitions().count() <= 16);
}

#[test]
fn a_millisecond_baseline_does_not_make_every_hiccup_stuck() {
    let mut f = FleetState::new(
        FleetConfig {
            min_stuck_after_ms: 30 * S,
            ..cfg()
        },
        crate::hot::fixed(Registry::builtin().unwrap()),
        ["code"],
    );
    f.apply_task(
        TaskEvent::Dispatched {
            task_id: "fast".into(),
            pool: "code".into(),
            expected_ms: Some(5),
            task_type: Some("classification".into()),
        },
        T0,
    );
    f.apply_heartbeat(&heartbeat("w1", &["fast"]), T0);
    // 3 × 5 ms is long past, but not the 30 s floor: busy, not stuck.
    f.tick(T0 + 2 * S);
    assert_ne!(state_of(&f, "w1"), State::Stuck);
    f.tick(T0 + 31 * S);
    assert_eq!(state_of(&f, "w1"), State::Stuck);
}

#[test]
fn the_expected_duration_is_the_task_types_median_not_its_last_few_runs() {
    let mut f = fleet();
    let typed = |mut s: SpanEvent| {
        s.dims.task_type = Some("qa".into());
        s
    };
    // 25 runs of 10 s, then 5 slow ones of 60 s: smoothing over the last few runs would
    // expect about 44 s; the median of the hour is still 10 s.
    let mut at = T0;
    for i in 0..30u64 {
        let dur = if i < 25 { 10 * S } else { 60 * S };
        at += dur + S;
        let task = format!("r{i}");
        f.apply_spans(vec![typed(root("w0", &task, at, dur, false))], at);
    }
    f.tick(at);
    let start = at + S;
    f.apply_spans(
        vec![typed(chat("w1", "new", start, "gpt-4o", 100, 10))],
        start,
    );
    // 3 × 10 s without a span.
    f.tick(start + 29 * S);
    assert_ne!(state_of(&f, "w1"), State::Stuck);
    f.tick(start + 31 * S);
    assert_eq!(state_of(&f, "w1"), State::Stuck);
    let reason = f.worker("w1").unwrap().stuck_reason().unwrap().to_string();
    // The median from the duration sketch (1 % relative accuracy).
    assert!(reason.contains("the expected 9.999 s"), "{reason}");
}

/// A cumulative series counts from where the commander began watching: one that started
/// before (a commander restarted under a long-running worker) is taken from its first
/// point on, not booked whole; one that started after counts in full; a worker's series
/// past the limit are not followed. All counted.
#[test]
fn cumulative_series_that_started_before_the_commander_watched_count_from_their_first_point() {
    let mut f = fleet();
    f.watching_since(T0);
    let point = |worker: &str, series: u64, start_ms: u64, value: f64| MetricPoint {
        identity: identity(worker),
        kind: MetricKind::InputTokens,
        model: Some("gpt-4o-mini".into()),
        series,
        cumulative: true,
        start_ns: start_ms * 1_000_000,
        time_ns: (T0 + S) * 1_000_000,
        value,
        count: 1,
        error: false,
    };
    let input = |f: &FleetState, worker: &str| f.worker(worker).unwrap().total_input_tokens;
    // Three days of a worker's spend, reported once the commander is back: the baseline.
    f.apply_metrics(vec![point("old", 1, T0 - 3 * 86_400 * S, 5e7)], T0 + S);
    assert_eq!(input(&f, "old"), 0);
    f.apply_metrics(
        vec![point("old", 1, T0 - 3 * 86_400 * S, 5e7 + 700.0)],
        T0 + 2 * S,
    );
    assert_eq!(input(&f, "old"), 700, "what it grew by since");
    // No start time: nothing says what the total covers.
    f.apply_metrics(vec![point("old", 2, 0, 900.0)], T0 + 2 * S);
    assert_eq!(input(&f, "old"), 700);
    // A worker (or a meter) that started after the commander: all of it was seen.
    f.apply_metrics(vec![point("new", 1, T0 + S, 400.0)], T0 + 2 * S);
    assert_eq!(input(&f, "new"), 400);
    // A reset of a watched series counts in full.
    f.apply_metrics(vec![point("old", 1, T0 + 2 * S, 50.0)], T0 + 3 * S);
    assert_eq!(input(&f, "old"), 750);
    assert_eq!(f.counters.metric_series_baselined.get(), 2);
    // Past the series a worker may have, a point is neither followed nor booked whole.
    let many: Vec<_> = (0..crate::fleet::worker::MAX_METRIC_SERIES as u64 + 1)
        .map(|i| point("wide", i, T0 + S, 10.0))
        .collect();
    f.apply_metrics(many, T0 + 3 * S);
    assert_eq!(
        input(&f, "wide"),
        10 * crate::fleet::worker::MAX_METRIC_SERIES as u64
    );
    f.apply_metrics(vec![point("wide", 999, T0 + S, 10.0)], T0 + 4 * S);
    assert_eq!(f.counters.metric_series_untracked.get(), 2);
    assert_eq!(
        input(&f, "wide"),
        10 * crate::fleet::worker::MAX_METRIC_SERIES as u64
    );
}

/// A worker forgotten after `retention_ms` that comes back goes on from the totals booked
/// before: its counters kept counting from them, so its next point is not booked whole.
#[test]
fn a_worker_forgotten_and_back_goes_on_from_its_booked_totals() {
    let mut f = fleet();
    f.watching_since(T0);
    let point = |value: f64, at_ms: u64| MetricPoint {
        identity: identity("w1"),
        kind: MetricKind::InputTokens,
        model: Some("gpt-4o-mini".into()),
        series: 1,
        cumulative: true,
        start_ns: (T0 + S) * 1_000_000,
        time_ns: at_ms * 1_000_000,
        value,
        count: 1,
        error: false,
    };
    let input = |f: &FleetState| f.worker("w1").unwrap().total_input_tokens;
    f.apply_metrics(vec![point(400.0, T0 + 2 * S)], T0 + 2 * S);
    assert_eq!(input(&f), 400, "started after the commander: in full");
    // Silent past silent_lost_after_ms and retention_ms.
    f.tick(T0 + 10_000 * S);
    assert!(f.worker("w1").is_none(), "forgotten");
    f.apply_metrics(vec![point(500.0, T0 + 10_001 * S)], T0 + 10_001 * S);
    assert_eq!(
        input(&f),
        100,
        "what it grew by while away, not its whole total"
    );
}

#[test]
fn metric_exports_are_signs_of_life_and_new_tokens_are_progress() {
    let mut f = fleet();
    let mut first = chat("w1", "t1", T0, "gpt-4o", 1_000, 100);
    first.expected_duration_s = Some(10.0);
    f.apply_spans(vec![first], T0);
    let point = |value: f64, time_ns: u64| MetricPoint {
        identity: identity("w1"),
        kind: MetricKind::OutputTokens,
        model: Some("gpt-4o".into()),
        series: 9,
        cumulative: true,
        start_ns: 1,
        time_ns,
        value,
        count: 1,
        error: false,
    };
    // Metrics every 15 s showing the tokens grow: the run is working, never STUCK.
    f.apply_metrics(vec![point(100.0, 1)], T0 + 15 * S);
    f.apply_metrics(vec![point(200.0, 2)], T0 + 28 * S);
    f.tick(T0 + 31 * S);
    assert_eq!(state_of(&f, "w1"), State::Active, "new tokens 3 s ago");
    f.apply_metrics(vec![point(300.0, 3)], T0 + 43 * S);
    f.tick(T0 + 58 * S);
    assert_ne!(state_of(&f, "w1"), State::Stuck);
    // Exports with nothing new keep the worker alive but are no progress.
    f.apply_metrics(vec![point(300.0, 4)], T0 + 60 * S);
    f.apply_metrics(vec![point(300.0, 5)], T0 + 70 * S);
    f.tick(T0 + 74 * S);
    assert_eq!(state_of(&f, "w1"), State::Stuck);
    assert!(f.worker("w1").unwrap().last_seen_ms >= T0 + 70 * S);
}

#[test]
fn models_show_by_their_registry_name_with_the_reported_one_beside_it() {
    let mut f = fleet();
    f.apply_spans(
        vec![chat("w1", "t1", T0, "gpt-4o-2024-08-06", 1_000, 100)],
        T0,
    );
    f.apply_spans(vec![chat("w2", "t2", T0, "openai/gpt-4o", 1_000, 100)], T0);
    f.tick(T0 + S);
    let snap = f.snapshot(T0 + S);
    let w1 = snap.workers.iter().find(|w| w.id == "w1").unwrap();
    assert_eq!(w1.model.as_deref(), Some("gpt-4o"));
    assert_eq!(w1.model_reported.as_deref(), Some("gpt-4o-2024-08-06"));
    let report = f.costs(&[Dim::Model], 3_600_000, T0 + S);
    let models: Vec<_> = report
        .rows
        .iter()
        .map(|r| r.group.get("model").cloned().flatten())
        .collect();
    assert_eq!(
        models,
        vec![Some("gpt-4o".to_string())],
        "one model, one row"
    );
    assert_eq!(report.rows[0].cell.calls, 2);
    // Its calls' latency, where models are listed (each call took 1 s).
    let listed = &snap.fleet.models[0];
    assert_eq!(listed.model, "gpt-4o");
    assert_eq!(listed.latency_ms.count, 2);
    let p50 = listed.latency_ms.p50.unwrap();
    assert!((p50 - 1_000.0).abs() < 20.0, "{p50}");
}

/// A span as an OpenTelemetry-instrumented process sends it: its resource names no worker
/// (`service.name@service.instance.id`); `agent` is set on the spans that name one.
fn otel(
    resource: &Arc<Identity>,
    trace: u8,
    span_id: u8,
    parent: Option<u8>,
    op: Operation,
    agent: Option<&str>,
    at_ms: u64,
) -> SpanEvent {
    let mut s = span(&resource.worker_id, "x", op, at_ms, 500);
    s.trace_id = [trace; 16];
    s.span_id = [span_id; 8];
    s.parent_span_id = parent.map(|p| [p; 8]);
    s.task_id = None;
    s.resource = resource.clone();
    s.resource_names_worker = false;
    if let Some(a) = agent {
        s.identity = Arc::new(Identity {
            worker_id: a.into(),
            ..Default::default()
        });
        s.names_agent = true;
        // A root invoke_agent span is the run's root (normalise says so).
        s.task_root = parent.is_none();
    } else {
        s.identity = resource.clone();
    }
    if op == Operation::Inference {
        s.model = Some("gpt-4o-mini".into());
        s.usage = Some(TokenUsage {
            input: 100,
            output: 10,
            ..Default::default()
        });
    }
    s
}

fn svc() -> Arc<Identity> {
    Arc::new(Identity {
        worker_id: "agent-svc@inst-1".into(),
        service: Some("agent-svc".into()),
        ..Default::default()
    })
}

#[test]
fn an_agents_llm_calls_are_the_agents_even_when_they_arrive_first() {
    let mut f = fleet();
    let res = svc();
    // The instrumented chat calls end (and are exported) before the agent span.
    f.apply_spans(
        vec![
            otel(&res, 1, 2, Some(1), Operation::Inference, None, T0),
            otel(&res, 1, 3, Some(1), Operation::Inference, None, T0 + S),
        ],
        T0 + S,
    );
    assert!(f.worker("agent-svc@inst-1").is_none(), "no ghost worker");
    f.apply_spans(
        vec![otel(
            &res,
            1,
            1,
            None,
            Operation::InvokeAgent,
            Some("agent-7"),
            T0 + 2 * S,
        )],
        T0 + 2 * S,
    );
    let w = f.worker("agent-7").unwrap();
    assert_eq!((w.total_input_tokens, w.total_output_tokens), (200, 20));
    assert_eq!(w.tasks_completed, 1, "the run ended with its root span");
    assert_eq!(w.running(), 0);
    assert!(f.worker("agent-svc@inst-1").is_none());
    assert_eq!(f.counters.spans_inherited.get(), 2);
    assert_eq!(f.counters.spans_waited.get(), 2);
    // The next run of the same process is the agent's as its calls arrive: live.
    f.apply_spans(
        vec![otel(
            &res,
            2,
            2,
            Some(1),
            Operation::Inference,
            None,
            T0 + 3 * S,
        )],
        T0 + 3 * S,
    );
    let w = f.worker("agent-7").unwrap();
    assert_eq!(w.total_input_tokens, 300);
    assert_eq!(w.running(), 1);
    assert_eq!(w.state(), State::Active);
    f.apply_spans(
        vec![otel(
            &res,
            2,
            1,
            None,
            Operation::InvokeAgent,
            Some("agent-7"),
            T0 + 4 * S,
        )],
        T0 + 4 * S,
    );
    assert_eq!(f.worker("agent-7").unwrap().tasks_completed, 2);
    f.tick(T0 + 5 * S);
    assert_eq!(state_of(&f, "agent-7"), State::Idle);
}

#[test]
fn nested_agents_are_each_their_own_worker() {
    let mut f = fleet();
    let res = svc();
    let t = 3;
    // orchestrator 1 → sub-agents 10 and 20 → their chat calls; leaves first.
    f.apply_spans(
        vec![
            otel(&res, t, 11, Some(10), Operation::Inference, None, T0),
            otel(
                &res,
                t,
                10,
                Some(1),
                Operation::InvokeAgent,
                Some("researcher"),
                T0 + S,
            ),
            otel(&res, t, 21, Some(20), Operation::Inference, None, T0 + S),
            otel(&res, t, 22, Some(20), Operation::Inference, None, T0 + S),
        ],
        T0 + S,
    );
    f.apply_spans(
        vec![
            otel(
                &res,
                t,
                20,
                Some(1),
                Operation::InvokeAgent,
                Some("writer"),
                T0 + 2 * S,
            ),
            otel(
                &res,
                t,
                1,
                None,
                Operation::InvokeAgent,
                Some("orchestrator"),
                T0 + 3 * S,
            ),
        ],
        T0 + 3 * S,
    );
    let tokens = |f: &FleetState, id: &str| f.worker(id).map(|w| w.total_input_tokens);
    assert_eq!(tokens(&f, "researcher"), Some(100));
    assert_eq!(tokens(&f, "writer"), Some(200));
    assert_eq!(tokens(&f, "orchestrator"), Some(0));
    for id in ["researcher", "writer", "orchestrator"] {
        let w = f.worker(id).unwrap();
        assert_eq!((w.tasks_completed, w.running()), (1, 0), "{id}");
    }
    assert!(f.worker("agent-svc@inst-1").is_none());
    // A process that runs several agents: its next orphan call waits for its ancestor.
    f.apply_spans(
        vec![otel(
            &res,
            4,
            2,
            Some(1),
            Operation::Inference,
            None,
            T0 + 4 * S,
        )],
        T0 + 4 * S,
    );
    assert_eq!(tokens(&f, "researcher"), Some(100));
    assert_eq!(tokens(&f, "writer"), Some(200));
    // The ancestor never comes: after the wait it is the resource's, and counted.
    f.tick(T0 + 4 * S + FleetConfig::default().identity_wait_ms);
    assert_eq!(tokens(&f, "agent-svc@inst-1"), Some(100));
    assert_eq!(f.counters.spans_wait_timed_out.get(), 1);
}

#[test]
fn a_service_that_shows_no_agent_waits_only_once() {
    let mut f = fleet();
    let plain = Arc::new(Identity {
        worker_id: "rag-svc@inst-9".into(),
        ..Default::default()
    });
    let wait = FleetConfig::default().identity_wait_ms;
    // Its parent is another service's span, never sent here.
    f.apply_spans(
        vec![otel(&plain, 6, 2, Some(1), Operation::Inference, None, T0)],
        T0,
    );
    assert!(f.worker("rag-svc@inst-9").is_none());
    f.tick(T0 + wait);
    assert_eq!(f.worker("rag-svc@inst-9").unwrap().total_input_tokens, 100);
    // From now on its spans apply at once.
    f.apply_spans(
        vec![otel(
            &plain,
            7,
            2,
            Some(1),
            Operation::Inference,
            None,
            T0 + wait + S,
        )],
        T0 + wait + S,
    );
    assert_eq!(f.worker("rag-svc@inst-9").unwrap().total_input_tokens, 200);
    assert_eq!(f.counters.spans_waited.get(), 1);
}

#[test]
fn spans_of_a_resource_that_names_its_worker_never_wait() {
    let mut f = fleet();
    // The SDK's spans: the resource says fleet.worker.id; the process span's parent is
    // the commander's dispatch span, which never arrives here.
    f.apply_spans(vec![chat("w1", "t1", T0, "gpt-4o", 1_000, 100)], T0);
    assert_eq!(f.worker("w1").unwrap().total_input_tokens, 1_000);
    assert_eq!(f.counters.spans_waited.get(), 0);
}

#[test]
fn spans_that_waited_for_a_root_that_names_no_agent_go_to_their_resource_before_it() {
    let mut f = fleet();
    let res = svc();
    f.apply_spans(
        vec![otel(&res, 5, 2, Some(1), Operation::Inference, None, T0)],
        T0,
    );
    assert!(f.worker("agent-svc@inst-1").is_none(), "waiting");
    let mut root = otel(&res, 5, 1, None, Operation::InvokeAgent, None, T0 + S);
    root.task_root = true;
    f.apply_spans(vec![root], T0 + S);
    let w = f.worker("agent-svc@inst-1").unwrap();
    assert_eq!(w.total_input_tokens, 100);
    assert_eq!((w.tasks_completed, w.running()), (1, 0));
}

#[test]
fn windows_follow_the_spans_own_time_within_the_lateness_allowance() {
    let mut f = fleet();
    let now = T0 + 3_600 * S;
    // Exported two minutes after the call ended: it counts two minutes ago.
    f.apply_spans(
        vec![chat("w1", "t1", now - 120 * S, "gpt-4o", 1_000, 100)],
        now,
    );
    let last_minute = f.costs(&[Dim::Model], 60 * S, now);
    assert!(last_minute.rows.is_empty(), "{last_minute:?}");
    let three = f.costs(&[Dim::Model], 180 * S, now);
    assert_eq!(three.rows.len(), 1);
    let series = f.fleet_series(300 * S, now);
    let at = series.iter().find(|p| p.llm_calls > 0).unwrap();
    assert_eq!(at.t, (now - 120 * S) / 10_000 * 10);
    // Stamped half an hour ago (a replay): at the edge of the 5-minute allowance.
    f.apply_spans(
        vec![chat("w2", "t2", now - 1_800 * S, "gpt-4o", 1_000, 100)],
        now,
    );
    let series = f.fleet_series(600 * S, now);
    let edge = (now - FleetConfig::default().lateness_ms) / 10_000 * 10;
    assert_eq!(series.iter().find(|p| p.t == edge).unwrap().llm_calls, 1);
    // Stamped in the future: now.
    f.apply_spans(
        vec![chat("w3", "t3", now + 3_600 * S, "gpt-4o", 1_000, 100)],
        now,
    );
    let series = f.fleet_series(10 * S, now);
    assert_eq!(series.last().unwrap().llm_calls, 1);
}

#[test]
fn a_process_that_reports_some_calls_only_as_metrics_is_counted_in_full_once() {
    let mut f = fleet();
    let point = |value: f64| MetricPoint {
        identity: identity("mix-1"),
        kind: MetricKind::InputTokens,
        model: Some("gpt-4o-mini".into()),
        series: 1,
        cumulative: true,
        start_ns: 1,
        time_ns: 2,
        value,
        count: 1,
        error: false,
    };
    // One call reported as a span (300 tokens) and as metric; one only as metric (200).
    f.apply_spans(vec![chat("mix-1", "t1", T0, "gpt-4o-mini", 300, 30)], T0);
    f.apply_metrics(vec![point(500.0)], T0 + S);
    f.tick(T0 + 2 * S);
    assert_eq!(
        f.worker("mix-1").unwrap().total_input_tokens,
        300,
        "not before the grace"
    );
    f.tick(T0 + 40 * S);
    assert_eq!(
        f.worker("mix-1").unwrap().total_input_tokens,
        500,
        "the metric-only call"
    );
    // Later exports of the same totals add nothing.
    f.apply_metrics(vec![point(500.0)], T0 + 60 * S);
    f.tick(T0 + 100 * S);
    assert_eq!(f.worker("mix-1").unwrap().total_input_tokens, 500);
    let costs = f.costs(&[Dim::Model], 3_600_000, T0 + 100 * S);
    assert_eq!(costs.rows[0].cell.input_tokens, 500);
}

#[test]
fn failures_are_counted_per_slice_and_pair_and_judged_on_the_last_fifteen_minutes() {
    let mut f = fleet();
    let call = |w: &str, at: u64, failed: bool, variant: &str| {
        let mut s = tool(w, &format!("t-{w}-{at}"), at, "web_search");
        s.error = failed;
        s.dims.prompt_variant = Some(variant.into());
        s
    };
    // Half an hour ago: web_search works for everyone.
    let past = T0 - 30 * 60 * S;
    let ok: Vec<SpanEvent> = (0..40)
        .map(|i| call(&format!("w{i}"), past + i * S, false, "v6"))
        .collect();
    f.apply_spans(ok, past + 40 * S);
    // Now ten agents fail it within thirty seconds.
    let now = T0;
    let bad: Vec<SpanEvent> = (0..10)
        .map(|i| call(&format!("w{i}"), now + i * 3 * S, true, "v7"))
        .collect();
    f.apply_spans(bad, now + 30 * S);
    let snap = f.snapshot(now + 30 * S);
    let get = |dims: &[(&str, &str)]| {
        snap.slices
            .iter()
            .find(|s| {
                s.dims
                    .iter()
                    .map(|(k, v)| (*k, v.as_str()))
                    .collect::<Vec<_>>()
                    == dims
            })
            .cloned()
    };
    let tool_slice = get(&[("tool", "web_search")]).expect("the tool's slice");
    assert_eq!(
        (
            tool_slice.recent_ops,
            tool_slice.recent_failures,
            tool_slice.past_ops,
            tool_slice.past_failures
        ),
        (10, 10, 40, 0)
    );
    let pair = get(&[("tool", "web_search"), ("prompt_variant", "v7")]).expect("the pair");
    assert_eq!((pair.recent_failures, pair.past_ops), (10, 0));
    assert!(
        get(&[("tool", "web_search"), ("prompt_variant", "v6")]).is_none(),
        "no recent failure"
    );
    assert_eq!(snap.slice_totals.all, (10, 10));
    assert_eq!(snap.slice_totals.tools, (10, 10));
    assert_eq!(snap.slice_totals.llm, (0, 0));
    assert!(!snap.slice_totals.warming_up, "counting for half an hour");
    // A fleet owner that just started counting warms up for five minutes.
    let mut g = fleet();
    assert!(g.snapshot(T0).slice_totals.warming_up, "nothing counted");
    g.apply_spans(vec![call("w1", T0, true, "v7")], T0);
    assert!(g.snapshot(T0 + 4 * 60 * S).slice_totals.warming_up);
    assert!(!g.snapshot(T0 + 5 * 60 * S).slice_totals.warming_up);
}
