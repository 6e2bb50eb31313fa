//! Policy tests: validation (every bad-policy case, with file:line), the budget check, and
//! deferral and release across a window reset with a hand-moved clock and a real sled.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleet_worker::message::Task;

use super::budget::{CellKey, Ledger, TaskDims, Window};
use super::deferred::DeferredTask;
use super::load::{CheckAgainst, Document, Policy};
use super::{ManualClock, PolicyEngine, PolicyError, Start, evaluate};
use crate::classify::rubric::Rubric;
use crate::config::PoolConfig;
use crate::domain::{Problem, ProblemKind};
use crate::registry::Registry;
use crate::route::{RouteSnapshot, RoutingTable};
use crate::store::Store;

/// Runs `policy`'s test cases against the built-in rubric and registry and [`pools`].
fn run_cases(policy: &Policy) -> Vec<super::testcase::TestOutcome> {
    super::testcase::run(
        policy,
        &Rubric::builtin().unwrap(),
        &Registry::builtin().unwrap(),
        &RoutingTable {
            pools: pools(),
            routing: Default::default(),
        },
    )
}

fn pools() -> BTreeMap<String, PoolConfig> {
    [
        ("code", &["code", "review"][..]),
        ("code-standby", &["code", "review"][..]),
        ("docs", &["summarise", "extract"][..]),
        ("general", &[][..]),
    ]
    .into_iter()
    .map(|(p, caps)| {
        let cfg = PoolConfig {
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        (p.to_string(), cfg)
    })
    .collect()
}

pub(crate) fn parse(files: &[(&str, &str)]) -> Result<Policy, PolicyError> {
    let registry = Registry::builtin().unwrap();
    let rubric = Rubric::builtin().unwrap();
    let pools = pools();
    Policy::parse(
        files
            .iter()
            .map(|(n, t)| Document {
                name: n.to_string(),
                text: t.to_string(),
            })
            .collect(),
        CheckAgainst {
            pools: Some(&pools),
            registry: &registry,
            rubric: &rubric,
        },
    )
}

fn problems(files: &[(&str, &str)]) -> Vec<Problem> {
    match parse(files) {
        Err(PolicyError::Invalid(p)) => p,
        other => panic!("expected invalid, got {other:?}"),
    }
}

/// Whether `p` holds a problem of `kind` in `file` at `line`.
fn has(p: &[Problem], file: &str, line: usize, kind: ProblemKind) -> bool {
    p.iter()
        .any(|x| x.at.file == file && x.at.line == Some(line) && x.kind == kind)
}

pub(crate) const BUDGET: &str = r#"
[[budget]]
name = "team-daily"
scope = "team"
window = "day"
limit_usd = 1.0
action = "defer"
"#;

#[test]
fn the_shipped_policies_are_valid() {
    parse(&[(super::load::BUILTIN_NAME, super::load::BUILTIN)]).unwrap();
    let example = include_str!("../../../policies/example.policy.toml");
    let p = parse(&[
        ("default.policy.toml", super::load::BUILTIN),
        ("example.policy.toml", example),
    ])
    .unwrap();
    assert_eq!(p.budgets.len(), 2);
    assert!(p.tests.len() >= 5);
}

#[test]
fn syntax_error_names_file_and_line() {
    let p = problems(&[(
        "a.policy.toml",
        "[[budget]]\nname = \"x\"\nlimit_usd = = 3\n",
    )]);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(has(&p, "a.policy.toml", 3, ProblemKind::Syntax), "{p:?}");
    assert!(p[0].at.column.is_some(), "{p:?}");
}

#[test]
fn unknown_field_names_file_and_line() {
    let text = format!("{BUDGET}limt_usd = 4.0\n");
    let p = problems(&[("b.policy.toml", &text)]);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (p[0].at.file.as_str(), p[0].kind),
        ("b.policy.toml", ProblemKind::UnknownField),
        "{p:?}"
    );
    assert!(p[0].message.contains("limt_usd"), "{p:?}");
}

#[test]
fn every_semantic_problem_is_reported_at_once_with_its_line() {
    let text = r#"
[[budget]]
name = "neg"
scope = "team"
window = "day"
limit_usd = -5.0
action = "reject"

[[budget]]
name = "pool-budget"
scope = "pool"
match = "gpu"
window = "fortnightly"
limit_usd = 10.0
action = "defer"

[[budget]]
name = "model-budget"
scope = "model"
match = "gpt-9-ultra"
window = "month"
limit_usd = 10.0
action = "defer"

[[throttle]]
name = "t"
scope = "pool"
match = "nowhere"
tasks_per_s = 0

[[reroute]]
from = "code"
to = "mainframe"
error_rate_above = 0.2
"#;
    let p = problems(&[("c.policy.toml", text)]);
    // Each problem names the line of the key at fault, not the entry's header.
    let mut got: Vec<_> = p.iter().map(|x| (x.at.line.unwrap_or(0), x.kind)).collect();
    got.sort();
    use ProblemKind::*;
    assert_eq!(
        got,
        [
            (6, OutOfRange),   // limit_usd -5
            (12, UnknownName), // pool "gpu"
            (13, BadValue),    // window "fortnightly"
            (20, UnknownName), // model "gpt-9-ultra"
            (28, UnknownName), // throttle pool "nowhere"
            (29, BadValue),    // tasks_per_s 0
            (33, UnknownName), // reroute to "mainframe"
        ],
        "{p:?}"
    );
    assert!(p.iter().all(|x| x.at.file == "c.policy.toml"));
}

#[test]
fn overlapping_budgets_with_conflicting_actions_are_refused_across_files() {
    let other = r#"
[[budget]]
name = "search-daily"
scope = "team"
match = "search"
window = "day"
limit_usd = 3.0
action = "reject"
"#;
    let p = problems(&[("a.policy.toml", BUDGET), ("b.policy.toml", other)]);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(has(&p, "b.policy.toml", 2, ProblemKind::Conflict), "{p:?}");
    // The message names the other budget and where it is.
    assert!(p[0].message.contains("at a.policy.toml:2"), "{p:?}");
    // Same scope, another window, or the same action: no conflict.
    let monthly = other.replace("\"day\"", "\"month\"");
    parse(&[("a.policy.toml", BUDGET), ("b.policy.toml", &monthly)]).unwrap();
    let same = other.replace("\"reject\"", "\"defer\"");
    parse(&[("a.policy.toml", BUDGET), ("b.policy.toml", &same)]).unwrap();
}

#[test]
fn duplicate_names_and_sections_are_refused() {
    let p = problems(&[
        ("a.policy.toml", &format!("{BUDGET}\n[alerts]\n")),
        (
            "b.policy.toml",
            &format!("{BUDGET}\n[alerts]\ncontext_warning = 0.99\n"),
        ),
    ]);
    let kinds: Vec<_> = p.iter().map(|x| (x.at.file.as_str(), x.kind)).collect();
    use ProblemKind::*;
    assert!(
        kinds.contains(&("b.policy.toml", Duplicate)),
        "budget twice: {p:?}"
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == ("b.policy.toml", Duplicate))
            .count(),
        2,
        "the budget and [alerts]: {p:?}"
    );
    assert!(
        kinds.contains(&("b.policy.toml", OutOfRange)),
        "warning above critical: {p:?}"
    );
}

#[test]
fn bad_redaction_pattern_and_soft_thresholds() {
    let text = r#"
[[budget]]
name = "b"
scope = "fleet"
window = "day"
limit_usd = 1.0
action = "downgrade"
min_tier = "galactic"
soft = [{ at = 0.9, action = "alert" }, { at = 0.8, action = "alert" }]

[[redaction]]
attributes = ["user.email"]
pattern = "([a-z"
"#;
    let p = problems(&[("r.policy.toml", text)]);
    let f = "r.policy.toml";
    assert!(
        has(&p, f, 9, ProblemKind::OutOfRange),
        "soft thresholds must rise: {p:?}"
    );
    assert!(
        has(&p, f, 8, ProblemKind::UnknownName),
        "min_tier galactic: {p:?}"
    );
    assert!(
        has(&p, f, 13, ProblemKind::BadValue),
        "pattern does not compile: {p:?}"
    );
}

#[test]
fn drift_keys_out_of_range_are_each_placed_at_their_line() {
    let text =
        "[alerts]\ndrift_interval_s = 5\ndrift_min_runs = 2\ndrift_false_alarms_per_hour = 0\n";
    let p = problems(&[("d.policy.toml", text)]);
    for line in [2, 3, 4] {
        assert!(
            has(&p, "d.policy.toml", line, ProblemKind::OutOfRange),
            "line {line}: {p:?}"
        );
    }
    let ok =
        "[alerts]\ndrift_interval_s = 60\ndrift_min_runs = 20\ndrift_false_alarms_per_hour = 0.5\n";
    assert!(parse(&[("d.policy.toml", ok)]).is_ok());
}

#[test]
fn burst_keys_out_of_range_are_each_placed_at_their_line() {
    let text = "[alerts]\ntool_burst_agents = 1\ntool_burst_window_s = 600\ntool_burst_false_alarms_per_hour = -1\n";
    let p = problems(&[("b.policy.toml", text)]);
    for line in [2, 3, 4] {
        assert!(
            has(&p, "b.policy.toml", line, ProblemKind::OutOfRange),
            "line {line}: {p:?}"
        );
    }
    let ok = "[alerts]\ntool_burst_agents = 5\ntool_burst_window_s = 60\ntool_burst_false_alarms_per_hour = 0.01\n";
    assert!(parse(&[("b.policy.toml", ok)]).is_ok());
}

#[test]
fn diff_summarises_what_changed() {
    let a = parse(&[("a.policy.toml", BUDGET)]).unwrap();
    let b = parse(&[(
        "a.policy.toml",
        &format!(
            "{}\n[[throttle]]\nname = \"t\"\nscope = \"pool\"\ntasks_per_s = 5\n",
            BUDGET.replace("1.0", "2.5")
        ),
    )])
    .unwrap();
    let d = super::load::diff(&a, &b);
    assert!(
        d.iter().any(|l| l.contains("budget team-daily changed")
            && l.contains("$1.00/day")
            && l.contains("$2.50/day")),
        "{d:?}"
    );
    assert!(d.iter().any(|l| l.contains("throttle t added")), "{d:?}");
    assert_eq!(super::load::diff(&a, &a), vec!["no change".to_string()]);
}

/// 2026-12-01T23:59:00Z.
pub(crate) const BEFORE_MIDNIGHT: u64 = 1_796_169_540_000;
const MIN: u64 = 60_000;

pub(crate) fn engine(clock: Arc<ManualClock>, store: &Store, policy: Policy) -> Arc<PolicyEngine> {
    PolicyEngine::open(
        store,
        Start {
            routing: RoutingTable {
                pools: pools(),
                routing: Default::default(),
            },
            registry: Registry::builtin().unwrap(),
            registry_file: None,
            rubric: Rubric::builtin().unwrap(),
            rubric_file: None,
            policy,
        },
        clock,
        1000,
        100,
    )
    .unwrap()
}

/// A task throttle `t` parked in `key`'s line, with its turn at `at_ms`, given by the
/// spec whose fingerprint is `spec`.
fn parked_task(id: &str, key: &str, at_ms: u64, spec: u64) -> DeferredTask {
    DeferredTask {
        queues: vec![],
        turn: Some(crate::domain::ThrottleTurn {
            throttle: "t".into(),
            key: key.into(),
            at_ms,
            spec,
        }),
        ..deferred(id, 5, 1_000, 0.0)
    }
}

/// A deferred task of team `search` waiting in `team-daily`, for tests here and in the API.
pub(crate) fn deferred(id: &str, priority: u8, at_ms: u64, est: f64) -> DeferredTask {
    DeferredTask {
        id: id.into(),
        priority,
        deferred_at_ms: at_ms,
        deferred_at: super::budget::rfc3339(at_ms),
        reason: "test".into(),
        until_ms: None,
        until: None,
        queues: vec![("team-daily".into(), "search".into())],
        pool: "docs".into(),
        model: "gpt-4o-mini".into(),
        est_usd: est,
        dims: TaskDims {
            team: Some("search".into()),
            ..Default::default()
        },
        policy_version: "v1".into(),
        task_json: "{}".into(),
        headers: vec![],
        releases: 0,
        turn: None,
        deadline_ms: None,
        cancelled: None,
    }
}

/// Parked tasks come out in the order of their turns once each has come, apart from the
/// budget-deferred queue but sharing its bound; a swap's check releases void turns early.
#[test]
fn parked_tasks_are_due_at_their_turns_and_void_ones_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let q = super::Deferrals::open(&store, 5).unwrap();
    let parked = |id: &str, at_ms, spec| parked_task(id, "noisy", at_ms, spec);
    // Inserted out of turn order.
    for (id, at) in [("c", 3_000), ("a", 1_000), ("b", 2_000), ("d", 9_000)] {
        q.insert(&parked(id, at, 7)).unwrap();
    }
    q.insert(&deferred("budget", 5, 1_000, 0.1)).unwrap();
    assert_eq!((q.len(), q.parked_len()), (1, 4));
    assert!(q.is_full(), "deferred and parked share policy.max_deferred");
    assert_eq!(q.next_turn_ms(), Some(1_000));
    let ids = |v: Vec<DeferredTask>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
    assert!(q.parked_due(999, 10, None).unwrap().is_empty());
    assert_eq!(ids(q.parked_due(2_000, 10, None).unwrap()), ["a", "b"]);
    assert_eq!(
        ids(q.parked_due(5_000, 2, None).unwrap()),
        ["a", "b"],
        "limit"
    );
    // After a swap: every turn the throttles no longer honour, due or not.
    let void = |t: &crate::domain::ThrottleTurn| t.spec != 7 || t.at_ms == 9_000;
    assert_eq!(
        ids(q.parked_due(2_000, 10, Some(&void)).unwrap()),
        ["a", "b", "d"]
    );
    assert_eq!(q.parked_turns().len(), 4);
    q.remove(&parked("a", 1_000, 7)).unwrap();
    q.remove(&parked("a", 1_000, 7)).unwrap();
    assert_eq!((q.len(), q.parked_len()), (1, 3), "removed once");
    assert_eq!(q.next_turn_ms(), Some(2_000));
    // The count survives a reopen.
    drop(q);
    let q = super::Deferrals::open(&store, 5).unwrap();
    assert_eq!((q.len(), q.parked_len()), (1, 3));
    // A corrupt entry at the head of the line is dropped, not skipped for ever (the
    // release loop wakes at the first turn).
    q.insert_parked_raw(&500u64.to_be_bytes(), b"not json");
    assert_eq!((q.next_turn_ms(), q.parked_len()), (Some(500), 4));
    assert_eq!(ids(q.parked_due(2_000, 10, None).unwrap()), ["b"]);
    assert_eq!((q.next_turn_ms(), q.parked_len()), (Some(2_000), 3));
}

/// The release loop sleeps until the soonest turn or deadline it saw, for as long as
/// `policy.release_interval_ms`: a task stored with a sooner one wakes it, a later one
/// does not. Before, only a cancel woke it, so with `release_interval_ms = 600000` a
/// parked task waited up to ten minutes past its turn.
#[test]
fn a_sooner_turn_or_deadline_wakes_the_release_loop() {
    use futures::FutureExt;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let q = super::Deferrals::open(&store, 100).unwrap();
    let woken = |q: &super::Deferrals| q.wake.notified().now_or_never().is_some();
    let parked = |id: &str, at_ms| parked_task(id, "k", at_ms, 1);
    let with_deadline = |id: &str, deadline_ms: u64| DeferredTask {
        deadline_ms: Some(deadline_ms),
        ..deferred(id, 5, 1_000, 0.0)
    };
    assert!(!woken(&q));
    q.insert(&parked("first", 5_000)).unwrap();
    assert!(woken(&q), "the first turn");
    q.insert(&parked("later", 6_000)).unwrap();
    assert!(!woken(&q), "a turn after one the loop knows");
    q.insert(&parked("sooner", 4_000)).unwrap();
    assert!(woken(&q), "a sooner turn");
    q.insert(&deferred("budget", 5, 1_000, 0.1)).unwrap();
    assert!(!woken(&q), "a budget's task has neither");
    q.insert(&with_deadline("due", 9_000)).unwrap();
    assert!(woken(&q), "the first deadline");
    q.insert(&with_deadline("due-later", 9_500)).unwrap();
    assert!(!woken(&q));
    q.insert(&with_deadline("due-sooner", 3_000)).unwrap();
    assert!(woken(&q), "a sooner deadline");
}

/// Deferred and parked tasks with a deadline are found by it, in deadline order, without
/// reading either queue; the index follows removals (a re-deferred copy keeps its own
/// entry) and reopens, and an entry whose task is gone is dropped.
#[test]
fn waiting_tasks_are_found_by_their_deadlines() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let q = super::Deferrals::open(&store, 100).unwrap();
    let with = |t: DeferredTask, deadline_ms: Option<u64>| DeferredTask { deadline_ms, ..t };
    let parked = |id: &str, at_ms| parked_task(id, "k", at_ms, 7);
    let ids = |v: Vec<DeferredTask>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(q.next_deadline_ms(), None);
    q.insert(&with(deferred("none", 5, 1_000, 0.1), None))
        .unwrap();
    q.insert(&with(deferred("b3", 9, 1_000, 0.1), Some(3_000)))
        .unwrap();
    q.insert(&with(parked("p2", 50_000), Some(2_000))).unwrap();
    q.insert(&with(deferred("b9", 0, 900, 0.1), Some(9_000)))
        .unwrap();
    assert_eq!(q.next_deadline_ms(), Some(2_000));
    assert!(q.expired(1_999, 10).unwrap().is_empty());
    assert_eq!(ids(q.expired(3_000, 10).unwrap()), ["p2", "b3"]);
    assert_eq!(ids(q.expired(3_000, 1).unwrap()), ["p2"], "limit");
    // Expired entries come back whole, from their own tree.
    let p2 = q.expired(2_000, 10).unwrap().remove(0);
    assert_eq!(p2.turn.as_ref().map(|t| t.at_ms), Some(50_000));
    // Removing an entry removes its index entry; the index survives a reopen.
    q.remove(&p2).unwrap();
    assert_eq!(q.next_deadline_ms(), Some(3_000));
    drop(q);
    let q = super::Deferrals::open(&store, 100).unwrap();
    assert_eq!(ids(q.expired(u64::MAX, 10).unwrap()), ["b3", "b9"]);
    // A released copy deferred again before its first entry was removed (a later release
    // count, the same key): removing the first leaves the second and its index entry.
    let first = with(deferred("b3", 9, 1_000, 0.1), Some(3_000));
    q.insert(&DeferredTask {
        releases: 1,
        ..first.clone()
    })
    .unwrap();
    q.remove(&first).unwrap();
    assert_eq!(ids(q.expired(3_000, 10).unwrap()), ["b3"]);
    // An index entry whose task is gone (a crash between the two writes) is dropped.
    q.tree_remove_raw(&first.key());
    assert!(q.expired(3_000, 10).unwrap().is_empty());
    assert_eq!(q.next_deadline_ms(), Some(9_000));
}

/// A waiting task is found by its id and marked cancelled in place: it is due at once
/// through the deadline index, no budget pass releases it, its removal clears both
/// indexes, and a mark that did not complete leaves nothing that releases a task early.
#[test]
fn a_cancelled_waiting_task_is_due_at_once_and_never_released() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let policy = parse(&[("a.policy.toml", BUDGET)]).unwrap();
    let ledger = super::budget::Ledger::default();
    let q = super::Deferrals::open(&store, 100).unwrap();
    let ids = |v: Vec<DeferredTask>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
    let waiting = DeferredTask {
        deadline_ms: Some(50_000),
        ..deferred("w", 5, 1_000, 0.1)
    };
    q.insert(&waiting).unwrap();
    q.insert(&deferred("other", 5, 2_000, 0.1)).unwrap();
    assert_eq!(q.find("w").unwrap().as_ref(), Some(&waiting));
    assert_eq!(q.find("nobody").unwrap(), None);
    assert_eq!(q.mark_cancelled("nobody", "r").unwrap(), None);
    assert_eq!(ids(q.due(&policy, &ledger, 0, 10).unwrap()), ["w", "other"]);

    let marked = q
        .mark_cancelled("w", "cancelled by alice")
        .unwrap()
        .unwrap();
    assert_eq!(marked.cancelled.as_deref(), Some("cancelled by alice"));
    assert_eq!(q.len(), 1 + 1, "marked in place");
    // Due at once through the index (its deadline's entry is gone), not by the budget.
    assert_eq!(q.next_deadline_ms(), Some(0));
    assert_eq!(ids(q.due(&policy, &ledger, 0, 10).unwrap()), ["other"]);
    let due = q.expired(0, 10).unwrap();
    assert_eq!(due, std::slice::from_ref(&marked));
    // Marking again changes nothing.
    assert_eq!(
        q.mark_cancelled("w", "again").unwrap(),
        Some(marked.clone())
    );
    // Once removed, neither index names it.
    q.remove(&marked).unwrap();
    assert_eq!(q.find("w").unwrap(), None);
    assert_eq!(q.next_deadline_ms(), None);
    assert_eq!(q.len(), 1);
    // An index entry at time 0 for a task that is not marked (a cancel cut short) is
    // dropped, not taken for a cancelled task.
    let other = q.find("other").unwrap().unwrap();
    let half = DeferredTask {
        cancelled: Some("x".into()),
        ..other.clone()
    };
    q.insert_deadline_raw(&half);
    assert!(q.expired(0, 10).unwrap().is_empty());
    assert_eq!(q.next_deadline_ms(), None);
    // The id index is built for entries stored before it existed.
    q.clear_ids_raw();
    drop(q);
    let q = super::Deferrals::open(&store, 100).unwrap();
    assert_eq!(q.find("other").unwrap(), Some(other));
}

/// A line's last parked turn is found under its prefix alone, follows removals, and an
/// index entry whose task is not parked (a crash between the writes) is dropped.
#[test]
fn a_line_s_last_parked_turn_is_found_by_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let q = super::Deferrals::open(&store, 100).unwrap();
    let parked = |id: &str, key: &str, at_ms| parked_task(id, key, at_ms, 7);
    let (a1, a2, b1) = (
        parked("a1", "a", 1_000),
        parked("a2", "a", 5_000),
        parked("b1", "b", 9_000),
    );
    for t in [&a2, &a1, &b1] {
        q.insert(t).unwrap();
    }
    q.insert(&deferred("budget", 5, 1_000, 0.1)).unwrap();
    let last = |key| q.last_parked_turn_ms("t", key).unwrap();
    assert_eq!(
        (last("a"), last("b"), last("c")),
        (Some(5_000), Some(9_000), None)
    );
    // A key that is a prefix of another is its own line.
    assert_eq!(q.last_parked_turn_ms("t", "").unwrap(), None);
    q.remove(&a2).unwrap();
    assert_eq!(last("a"), Some(1_000));
    q.remove(&a1).unwrap();
    assert_eq!(last("a"), None);
    // The index entry of a task that is gone from the parked tree is passed over.
    q.insert(&a2).unwrap();
    q.parked_remove_raw(&a2.key());
    assert_eq!(last("a"), None);
    q.insert(&a1).unwrap();
    assert_eq!(last("a"), Some(1_000));
}

#[test]
fn deferred_tasks_are_released_after_the_window_resets_priority_first_then_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::at(BEFORE_MIDNIGHT);
    let policy = parse(&[("a.policy.toml", BUDGET)]).unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let e = engine(clock.clone(), &store, policy.clone());
        // Today's budget is spent.
        let today = CellKey {
            budget: "team-daily".into(),
            value: "search".into(),
            bucket: Window::Day.bucket(BEFORE_MIDNIGHT),
        };
        // A dispatched task holds $1.00 of it: reserved in the ledger the task path decides
        // on, and written in its record, which the task log keeps the ledger from.
        let held = crate::domain::Reservation {
            cells: vec![today.clone()],
            est_usd: 1.0,
            charged_usd: None,
        };
        e.with_ledger(|l| l.reserve(&held.cells, held.est_usd));
        store
            .update(
                "holds-today",
                || crate::store::TaskRecord::new("holds-today", 1),
                |r| {
                    r.budget = Some(held.clone());
                    r.advance(crate::store::TaskState::Dispatched);
                },
            )
            .unwrap();
        // Five tasks of $0.30 wait: two of priority 8, three of priority 5.
        for (id, prio, at) in [
            ("old-5", 5, BEFORE_MIDNIGHT - 5 * MIN),
            ("new-8", 8, BEFORE_MIDNIGHT - MIN),
            ("mid-5", 5, BEFORE_MIDNIGHT - 3 * MIN),
            ("old-8", 8, BEFORE_MIDNIGHT - 4 * MIN),
            ("new-5", 5, BEFORE_MIDNIGHT - 2 * MIN),
        ] {
            e.deferrals.insert(&deferred(id, prio, at, 0.30)).unwrap();
        }
        futures::executor::block_on(store.flush()).unwrap();
        assert_eq!(
            e.deferrals.queued()[&("team-daily".into(), "search".into())],
            5
        );
        let due = e
            .with_ledger(|l| {
                e.deferrals.due(
                    &e.live().policy,
                    l,
                    clock.0.load(std::sync::atomic::Ordering::SeqCst),
                    100,
                )
            })
            .unwrap();
        assert!(due.is_empty(), "nothing fits before midnight: {due:?}");
    }
    // Restart: the queue comes back from sled, the ledger from the task log.
    let store = Store::reopen(dir.path());
    let e = engine(clock.clone(), &store, policy.clone());
    assert_eq!(e.deferrals.len(), 5);
    let now = BEFORE_MIDNIGHT + 30_000;
    let due = e
        .with_ledger(|l| e.deferrals.due(&e.live().policy, l, now, 100))
        .unwrap();
    assert!(due.is_empty(), "still 23:59:30");

    // Past midnight: $1.00 of room fits three tasks of $0.30, in priority-then-age order.
    clock.set(BEFORE_MIDNIGHT + 2 * MIN);
    let now = e.now_ms();
    let due = e
        .with_ledger(|l| e.deferrals.due(&e.live().policy, l, now, 100))
        .unwrap();
    let got: Vec<&str> = due.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(got, ["old-8", "new-8", "old-5"]);
    let mut released = Vec::new();
    for t in &due {
        // What the intake loop does on the released task: reserve its estimate.
        let cell = CellKey {
            budget: "team-daily".into(),
            value: "search".into(),
            bucket: Window::Day.bucket(now),
        };
        e.with_ledger(|l| l.reserve(&[cell], t.est_usd));
        e.deferrals.remove(t).unwrap();
        released.push(t.id.clone());
    }
    let due = e
        .with_ledger(|l| e.deferrals.due(&e.live().policy, l, now, 100))
        .unwrap();
    assert!(due.is_empty(), "the budget is full again: {due:?}");

    // The limit is raised: the rest go, each exactly once.
    let raised = parse(&[("a.policy.toml", &BUDGET.replace("1.0", "2.0"))]).unwrap();
    assert!(e.swap(raised, 7, super::Source::Http, "test"));
    let due = e
        .with_ledger(|l| e.deferrals.due(&e.live().policy, l, now, 100))
        .unwrap();
    for t in &due {
        e.deferrals.remove(t).unwrap();
        released.push(t.id.clone());
    }
    released.sort();
    let mut unique = released.clone();
    unique.dedup();
    assert_eq!(released, unique, "no task released twice");
    assert_eq!(released.len(), 5, "no task lost");
    assert!(e.deferrals.is_empty() && e.deferrals.queued().is_empty());
}

#[test]
fn concurrent_admissions_never_pass_the_limit() {
    // Eight threads race to reserve $0.10 tasks against a $1.00 budget, through the same
    // check-and-reserve step the intake loop takes under the ledger lock.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let clock = ManualClock::at(BEFORE_MIDNIGHT - 60 * MIN);
    let policy = parse(&[("a.policy.toml", &BUDGET.replace("\"defer\"", "\"reject\""))]).unwrap();
    let e = engine(clock, &store, policy);
    let registry = Registry::builtin().unwrap();
    let rubric = Rubric::builtin().unwrap();
    let table = RoutingTable {
        pools: pools(),
        routing: Default::default(),
    };
    let fleet = RouteSnapshot::default();
    let admitted = std::sync::atomic::AtomicUsize::new(0);
    let refused = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..8 {
            let (e, registry, rubric, table, fleet) = (&e, &registry, &rubric, &table, &fleet);
            let (admitted, refused) = (&admitted, &refused);
            s.spawn(move || {
                for i in 0..50 {
                    let mut task = Task::new("Summarise this incident report");
                    task.id = Some(format!("t{t}-{i}"));
                    task.attributes.insert("team".into(), "search".into());
                    let mut class = crate::classify::offline(rubric, &task).answer;
                    class.input_tokens = 10_000;
                    class.output_tokens = 10_000;
                    let dims = TaskDims::from_task(&task.attributes, std::iter::empty());
                    let live = e.live();
                    let now = e.now_ms();
                    let queued = BTreeMap::new();
                    e.with_ledger(|l| {
                        let v = evaluate::evaluate(evaluate::EvalInput {
                            task: &task,
                            class: &class,
                            dims: &dims,
                            rubric,
                            registry,
                            fleet,
                            table,
                            policy: &live.policy,
                            hints: &live.hints,
                            ledger: l,
                            queued: &queued,
                            released: false,
                            ran: false,
                            now_ms: now,
                            seed: i,
                            blocks: &[],
                        });
                        match v {
                            evaluate::Verdict::Dispatch { decision, check } => {
                                let est = decision.est_cost_usd.unwrap();
                                l.reserve(&check.cells, est);
                                admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            evaluate::Verdict::Reject { .. } => {
                                refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            other => panic!("unexpected {other:?}"),
                        }
                    });
                }
            });
        }
    });
    let now = e.now_ms();
    let committed = e.with_ledger(|l| l.committed("team-daily", "search", Window::Day, now));
    let admitted = admitted.into_inner();
    assert!(
        committed <= 1.0 + 1e-9,
        "committed {committed} is over the limit"
    );
    // Every task has the same estimate: the budget took as many as fit, and no more.
    let est = committed / admitted as f64;
    assert_eq!(admitted, (1.0 / est + 1e-9).floor() as usize, "est {est}");
    assert_eq!(admitted + refused.into_inner(), 400);
}

#[test]
fn a_task_that_ran_is_charged_to_a_budget_over_its_limit_and_not_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let clock = ManualClock::at(BEFORE_MIDNIGHT - 60 * MIN);
    let policy = parse(&[("a.policy.toml", &BUDGET.replace("\"defer\"", "\"reject\""))]).unwrap();
    let e = engine(clock, &store, policy);
    let (registry, rubric) = (Registry::builtin().unwrap(), Rubric::builtin().unwrap());
    let table = RoutingTable {
        pools: pools(),
        routing: Default::default(),
    };
    let fleet = RouteSnapshot::default();
    let mut task = Task::new("Summarise this incident report");
    task.attributes.insert("team".into(), "search".into());
    let class = crate::classify::offline(&rubric, &task).answer;
    let dims = TaskDims::from_task(&task.attributes, std::iter::empty());
    let (live, now, queued) = (e.live(), e.now_ms(), BTreeMap::new());
    let today = CellKey {
        budget: "team-daily".into(),
        value: "search".into(),
        bucket: Window::Day.bucket(now),
    };
    e.with_ledger(|l| l.set_spent(today.clone(), 1.0));
    for ran in [false, true] {
        let verdict = e.with_ledger(|l| {
            let v = evaluate::evaluate(evaluate::EvalInput {
                task: &task,
                class: &class,
                dims: &dims,
                rubric: &rubric,
                registry: &registry,
                fleet: &fleet,
                table: &table,
                policy: &live.policy,
                hints: &live.hints,
                ledger: l,
                queued: &queued,
                released: false,
                ran,
                now_ms: now,
                seed: 1,
                blocks: &[],
            });
            match v {
                evaluate::Verdict::Dispatch { check, .. } => Ok(check.cells),
                other => Err(other.action()),
            }
        });
        match ran {
            false => assert_eq!(verdict, Err("reject"), "a new task is refused"),
            true => assert_eq!(
                verdict,
                Ok(vec![today.clone()]),
                "the task that ran is charged"
            ),
        }
    }
}

#[test]
fn ledger_prune_keeps_open_reservations() {
    let policy = parse(&[("a.policy.toml", BUDGET)]).unwrap();
    let mut l = Ledger::default();
    let old = CellKey {
        budget: "team-daily".into(),
        value: "search".into(),
        bucket: Window::Day.bucket(BEFORE_MIDNIGHT) - 3 * 86_400_000,
    };
    let older = CellKey {
        bucket: old.bucket - 86_400_000,
        ..old.clone()
    };
    l.reserve(std::slice::from_ref(&old), 1.0);
    l.set_spent(older.clone(), 2.0);
    let gone = l.prune(&policy, BEFORE_MIDNIGHT);
    assert_eq!(gone, vec![older]);
    assert_eq!(
        l.cell(&old).reserved,
        1.0,
        "a task still in flight keeps its cell"
    );
}

/// A spent team's queue does not hold back another team's: the release pass passes over
/// every task behind a blocked queue and still reaches the one whose budget has room, and
/// the queue's length is kept as entries come and go (sled would count them by walking).
#[test]
fn a_blocked_queue_holds_back_only_its_own_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::at(BEFORE_MIDNIGHT);
    let store = Store::open(dir.path()).unwrap();
    let e = engine(
        clock.clone(),
        &store,
        parse(&[("a.policy.toml", BUDGET)]).unwrap(),
    );
    let spent = CellKey {
        budget: "team-daily".into(),
        value: "search".into(),
        bucket: Window::Day.bucket(BEFORE_MIDNIGHT),
    };
    e.with_ledger(|l| l.reserve(&[spent], 1.0));
    for i in 0..50u64 {
        let t = deferred(
            &format!("search-{i}"),
            5,
            BEFORE_MIDNIGHT - 100 * MIN + i,
            0.3,
        );
        e.deferrals.insert(&t).unwrap();
    }
    let mut payments = deferred("payments-1", 5, BEFORE_MIDNIGHT - MIN, 0.3);
    payments.queues = vec![("team-daily".into(), "payments".into())];
    payments.dims.team = Some("payments".into());
    e.deferrals.insert(&payments).unwrap();
    assert_eq!(e.deferrals.len(), 51);
    let due = e
        .with_ledger(|l| e.deferrals.due(&e.live().policy, l, BEFORE_MIDNIGHT, 100))
        .unwrap();
    let got: Vec<&str> = due.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(got, ["payments-1"]);
    e.deferrals.remove(&payments).unwrap();
    e.deferrals.remove(&payments).unwrap();
    assert_eq!(e.deferrals.len(), 50, "removed once");
    // With every queue blocked nothing is due, and the count survives a reopen.
    let due = e
        .with_ledger(|l| e.deferrals.due(&e.live().policy, l, BEFORE_MIDNIGHT, 100))
        .unwrap();
    assert!(due.is_empty());
    futures::executor::block_on(store.flush()).unwrap();
    drop((e, store));
    let store = Store::reopen(dir.path());
    assert_eq!(super::Deferrals::open(&store, 10).unwrap().len(), 50);
}

#[test]
fn removing_a_released_task_keeps_its_re_deferral() {
    // The intake loop may defer the released copy again (same key, a later release
    // count) before the release loop deletes the entry it released: that entry must stay.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let q = super::Deferrals::open(&store, 10).unwrap();
    let first = deferred("t1", 5, BEFORE_MIDNIGHT, 0.1);
    q.insert(&first).unwrap();
    let mut again = first.clone();
    again.releases = 1;
    again.reason = "still over".into();
    q.insert(&again).unwrap();
    assert_eq!(q.len(), 1, "one entry, written twice");
    q.remove(&first).unwrap();
    assert_eq!(q.len(), 1, "the re-deferral stays");
    let left = q.list(10, None).unwrap();
    assert_eq!(left, vec![again.clone()]);
    assert_eq!(q.queued()[&("team-daily".into(), "search".into())], 1);
    q.remove(&again).unwrap();
    assert!(q.is_empty() && q.queued().is_empty());
    assert_eq!(q.len(), 0, "the count agrees");
}

#[test]
fn downgrade_at_the_limit_picks_the_cheapest_acceptable_tier_then_falls_back() {
    // Code generation is a complex-tier task (claude-sonnet-4-5, est $0.0249 here); at
    // 100% the budget moves it to the cheapest tier (claude-haiku-4-5, $0.0083) if that
    // fits, else `then` applies.
    let text = r#"
[[budget]]
name = "code-daily"
scope = "team"
window = "day"
limit_usd = 1.0
action = "downgrade"
min_tier = "simple"
then = "reject"

[[test]]
name = "room for the cheap tier only: downgraded"
task = { description = "Write a rate limiter in Go", priority = 8, attributes = { team = "core", task_type = "code_generation" } }
fleet = { spent = { code-daily = 0.985 } }
expect = { action = "dispatch", model = "claude-haiku-4-5", rule = "budget_downgrade", reason_contains = "downgraded by policy" }

[[test]]
name = "no room at all: rejected"
task = { description = "Write a rate limiter in Go", priority = 8, attributes = { team = "core", task_type = "code_generation" } }
fleet = { spent = { code-daily = 0.995 } }
expect = { action = "reject", reason_contains = "budget code-daily" }

[[test]]
name = "within budget: its own tier"
task = { description = "Write a rate limiter in Go", priority = 8, attributes = { team = "core", task_type = "code_generation" } }
expect = { action = "dispatch", model = "claude-sonnet-4-5", rule = "cost_tier" }
"#;
    let policy = parse(&[("d.policy.toml", text)]).unwrap();
    let results = run_cases(&policy);
    for r in &results {
        assert!(r.passed, "{}: {} {:?}", r.name, r.got, r.failures);
    }
    assert_eq!(results.len(), 3);
}

/// A case runs at its `now`: calendar windows and the reset times in reasons follow it,
/// the outcome says it, and a `now` that is no instant is a problem at its line.
#[test]
fn a_test_case_runs_at_its_own_instant() {
    let text = r#"
[[budget]]
name = "fleet-monthly"
scope = "fleet"
window = "month"
limit_usd = 100.0
action = "reject"

[[test]]
name = "mid-june: room again on the first of July"
task = { description = "Summarise this incident report", attributes = { task_type = "summarisation" } }
fleet = { spent = { fleet-monthly = 100.0 } }
expect = { action = "reject", reason_contains = "room again at 2026-07-01T00:00:00Z" }

[[test]]
name = "new year's eve: room again at the new year"
now = "2026-12-31T23:00:00+00:00"
task = { description = "Summarise this incident report", attributes = { task_type = "summarisation" } }
fleet = { spent = { fleet-monthly = 100.0 } }
expect = { action = "reject", reason_contains = "room again at 2027-01-01T00:00:00Z" }
"#;
    let policy = parse(&[("n.policy.toml", text)]).unwrap();
    let results = run_cases(&policy);
    for r in &results {
        assert!(r.passed, "{}: {} {:?}", r.name, r.got, r.failures);
    }
    let nows: Vec<&str> = results.iter().map(|r| r.now.as_str()).collect();
    assert_eq!(nows, ["2026-06-15T12:00:00Z", "2026-12-31T23:00:00Z"]);
    // The last instant allowed, with the longest rolling window: its reset is still a time
    // RFC 3339 writes.
    let edge = r#"
[[budget]]
name = "long"
scope = "fleet"
window = "366d"
limit_usd = 1.0
action = "reject"

[[test]]
name = "the last year"
now = "9997-12-31T23:59:59Z"
task = { description = "Summarise this incident report", attributes = { task_type = "summarisation" } }
fleet = { spent = { long = 1.0 } }
expect = { action = "reject", reason_contains = "room again at 9999-01-01" }
"#;
    let policy = parse(&[("e.policy.toml", edge)]).unwrap();
    let results = run_cases(&policy);
    assert!(
        results[0].passed,
        "{} {:?}",
        results[0].got, results[0].failures
    );
    for bad in ["yesterday", "1969-12-31T23:59:59Z", "9998-01-01T00:00:00Z"] {
        let text = format!(
            "[[test]]\nname = \"t\"\nnow = {bad:?}\ntask = {{ description = \"x\" }}\nexpect = {{ action = \"dispatch\" }}\n"
        );
        let p = problems(&[("b.policy.toml", &text)]);
        assert!(
            has(&p, "b.policy.toml", 3, ProblemKind::BadValue),
            "{bad}: {p:?}"
        );
        assert!(p[0].message.contains("not an RFC 3339 instant"), "{p:?}");
    }
}

#[test]
fn escalation_steps_are_checked_field_by_field() {
    let text = r#"
[[escalation]]
name = "brake"
rules = ["token_loop"]
action = "throttle"
tasks_per_s = 0.5

[[escalation]]
name = "bad name!"
rules = ["telepathy"]
severity = "urgent"
action = "throttle"

[[escalation]]
name = "brake"
action = "pause"
tasks_per_s = 1.0
sink = "oncall"

[[escalation]]
name = "tell"
action = "notify"
"#;
    let p = problems(&[("e.policy.toml", text)]);
    let f = "e.policy.toml";
    use ProblemKind::*;
    for (line, kind, what) in [
        (9, BadValue, "the name"),
        (10, BadValue, "an unknown rule"),
        (11, BadValue, "an unknown severity"),
        (8, BadValue, "a throttle without a rate"),
        (14, Duplicate, "the name twice"),
        (17, BadValue, "a rate on a pause"),
        (18, BadValue, "a sink on a pause"),
        (20, BadValue, "a notify without a sink"),
    ] {
        assert!(has(&p, f, line, kind), "{what} (line {line}): {p:?}");
    }
    assert_eq!(p.len(), 8, "{p:?}");
    let good = parse(&[(
        "e.policy.toml",
        &text[..text.find("\n[[escalation]]\nname = \"bad").unwrap()],
    )])
    .unwrap();
    assert_eq!(good.escalation[0].severity, "warning", "the default");
}

#[test]
fn a_block_in_force_refuses_dispatch_to_its_scope_and_says_why() {
    use crate::policy::live::Block;
    use crate::policy::schema::BlockScope;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let e = engine(
        ManualClock::at(BEFORE_MIDNIGHT),
        &store,
        parse(&[]).unwrap(),
    );
    let (registry, rubric) = (Registry::builtin().unwrap(), Rubric::builtin().unwrap());
    let table = RoutingTable {
        pools: pools(),
        routing: Default::default(),
    };
    let mut task = Task::new("Summarise this incident report");
    task.attributes.insert("team".into(), "search".into());
    let class = crate::classify::offline(&rubric, &task).answer;
    let dims = TaskDims::from_task(&task.attributes, std::iter::empty());
    let verdict = |blocks: &[Block]| {
        let live = e.live();
        e.with_ledger(|l| {
            match evaluate::evaluate(evaluate::EvalInput {
                task: &task,
                class: &class,
                dims: &dims,
                rubric: &rubric,
                registry: &registry,
                fleet: &RouteSnapshot::default(),
                table: &table,
                policy: &live.policy,
                hints: &live.hints,
                ledger: l,
                queued: &BTreeMap::new(),
                released: false,
                ran: false,
                now_ms: e.now_ms(),
                seed: 1,
                blocks,
            }) {
                evaluate::Verdict::Reject { reason, code, .. } => Some((code, reason)),
                _ => None,
            }
        })
    };
    let block = |scope, value: &str| Block {
        scope,
        value: value.into(),
        intervention: "failure_slice:team=search:1:guard".into(),
        reason: "team search blocked while this lasts".into(),
    };
    assert_eq!(verdict(&[]), None);
    assert_eq!(
        verdict(&[block(BlockScope::Team, "ads")]),
        None,
        "another team"
    );
    let (code, reason) = verdict(&[block(BlockScope::Team, "search")]).unwrap();
    assert_eq!(code, evaluate::BLOCKED);
    assert!(
        reason.starts_with(
            "team search is blocked by intervention failure_slice:team=search:1:guard"
        ),
        "{reason}"
    );
    // Blocks ride in the live snapshot; setting the same ones again changes nothing.
    assert!(e.set_interventions(vec![block(BlockScope::Team, "search")], vec![]));
    assert!(!e.set_interventions(vec![block(BlockScope::Team, "search")], vec![]));
    assert_eq!(e.live().blocks.len(), 1);
    assert!(e.set_interventions(vec![], vec![]));

    // A reroute intervention is in the live hints, ahead of the policy's own, and a policy
    // swap keeps it there until the intervention ends.
    let forced = crate::route::decide::PolicyReroute {
        from: "alpha".into(),
        to: "beta".into(),
        error_rate_above: None,
        p95_latency_ms_above: None,
        forced: Some("intervention x".into()),
    };
    assert!(e.set_interventions(vec![], vec![forced.clone()]));
    assert_eq!(e.live().hints.reroutes.first(), Some(&forced));
    let next = parse(&[("a.policy.toml", BUDGET)]).unwrap();
    assert!(e.swap(next, 99, super::Source::Http, "test"));
    assert_eq!(e.live().hints.reroutes.first(), Some(&forced));
    assert!(e.set_interventions(vec![], vec![]));
    assert!(e.live().hints.reroutes.iter().all(|r| r.forced.is_none()));
}

#[test]
fn redaction_privacy_and_sampling_problems_are_each_placed_at_their_line() {
    let a = r#"
[[redaction]]
name = "ids"
attributes = ["user.id"]
action = "hash"

[[redaction]]
pattern = "x+"
builtin = "email"

[[redaction]]
name = "ids"
builtin = "phone"
action = "drop"
replacement = "[gone]"

[sampling]
healthy_rate = 1.5
cost_multiple = 0.5

[privacy]
deny_attributes = ["*"]
"#;
    let b = "[privacy]\ndefault_rules = false\n";
    let p = problems(&[("a.policy.toml", a), ("b.policy.toml", b)]);
    let f = "a.policy.toml";
    assert!(
        has(&p, f, 2, ProblemKind::Missing),
        "hash without a salt: {p:?}"
    );
    assert!(
        has(&p, f, 9, ProblemKind::BadValue),
        "pattern and builtin: {p:?}"
    );
    assert!(
        has(&p, f, 11, ProblemKind::Duplicate),
        "name used twice: {p:?}"
    );
    assert!(
        has(&p, f, 15, ProblemKind::BadValue),
        "replacement on drop: {p:?}"
    );
    assert!(
        has(&p, f, 18, ProblemKind::OutOfRange),
        "healthy rate: {p:?}"
    );
    assert!(
        has(&p, f, 19, ProblemKind::OutOfRange),
        "cost multiple: {p:?}"
    );
    assert!(has(&p, f, 22, ProblemKind::BadValue), "deny `*`: {p:?}");
    assert!(
        p.iter()
            .any(|x| x.kind == ProblemKind::Duplicate && x.message.contains("[privacy]")),
        "[privacy] in two files: {p:?}"
    );
    // The older name of healthy_rate is still read.
    let old = parse(&[("c.policy.toml", "[sampling]\ndefault_rate = 0.3\n")]).unwrap();
    assert_eq!(old.sampling.healthy_rate, 0.3);
}

/// A budget keeps cells for at most `MAX_VALUES_PER_BUDGET` scope values: a task naming a
/// new value past that is counted under `(other)`, which such tasks share (and which the
/// limit applies to), while the values it knows keep their own cells.
#[test]
fn a_budget_past_its_value_limit_counts_new_values_together() {
    use super::budget::{MAX_VALUES_PER_BUDGET, OTHER_VALUE, Routed, check};
    let policy = parse(&[("a.policy.toml", BUDGET)]).unwrap();
    let now = BEFORE_MIDNIGHT;
    let bucket = Window::Day.bucket(now);
    let mut ledger = Ledger::default();
    let team_check = |ledger: &Ledger, team: &str, est: f64| {
        let dims = TaskDims {
            team: Some(team.into()),
            ..Default::default()
        };
        let routed = Routed {
            dims: &dims,
            pool: "docs",
            model: "gpt-4o-mini",
            est,
            priority: 5,
        };
        let c = check(&policy, ledger, &BTreeMap::new(), routed, now);
        (
            c.cells.iter().map(|k| k.value.clone()).collect::<Vec<_>>(),
            c.over.iter().map(|o| o.value.clone()).collect::<Vec<_>>(),
        )
    };
    for i in 0..MAX_VALUES_PER_BUDGET - 1 {
        let key = CellKey {
            budget: "team-daily".into(),
            value: format!("team-{i}"),
            bucket,
        };
        ledger.reserve(&[key], 0.01);
    }
    // One value left: a new team still gets its own.
    assert_eq!(team_check(&ledger, "newcomer", 0.5).0, ["newcomer"]);
    let newcomer = CellKey {
        budget: "team-daily".into(),
        value: "newcomer".into(),
        bucket,
    };
    ledger.reserve(std::slice::from_ref(&newcomer), 0.5);
    // Full: known values keep theirs, new ones share one.
    assert_eq!(team_check(&ledger, "team-7", 0.5).0, ["team-7"]);
    assert_eq!(team_check(&ledger, "newcomer", 0.4).0, ["newcomer"]);
    assert_eq!(team_check(&ledger, "another", 0.5).0, [OTHER_VALUE]);
    let other = CellKey {
        budget: "team-daily".into(),
        value: OTHER_VALUE.into(),
        bucket,
    };
    ledger.reserve(std::slice::from_ref(&other), 0.8);
    // The shared value is held to the limit like any other: $0.80 of $1.00 is committed.
    let (cells, over) = team_check(&ledger, "yet-another", 0.5);
    assert!(cells.is_empty(), "{cells:?}");
    assert_eq!(over, [OTHER_VALUE]);
    assert_eq!(ledger.values("team-daily").len(), MAX_VALUES_PER_BUDGET + 1);
}

/// Shadow replay blames the candidate only for what the policy in force would not also do
/// now: a pool that was busy when the span was logged and is idle at replay time moves
/// the tasks under any policy, the one in force included.
#[test]
fn shadow_replay_counts_what_the_fleet_moved_as_drift_not_as_the_candidates_change() {
    use crate::decisions::{DecisionInputs, DecisionRecord, Outcome};
    use crate::route::snapshot::PoolState;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let e = engine(
        ManualClock::at(BEFORE_MIDNIGHT),
        &store,
        parse(&[("a.policy.toml", BUDGET)]).unwrap(),
    );
    let live = e.live();
    // Only the load differs between the two fleets: every pool has a healthy worker.
    let fleet = |busy: &str| {
        let pools = ["code", "code-standby", "docs", "general"].map(|name| PoolState {
            name: name.into(),
            healthy: 1,
            capacity: 1,
            queue_depth: if name == busy { 5 } else { 0 },
            ..Default::default()
        });
        RouteSnapshot::from_pools(BEFORE_MIDNIGHT, pools.into())
    };
    let (then, now) = (fleet("general"), fleet("docs"));
    // The span as the intake logged it, under the policy in force and the fleet of then.
    let logged: Vec<DecisionRecord> = (0..6u64)
        .map(|i| {
            // Classified as a task no capability is needed for: docs and general both
            // take it, at the same price, so their load decides.
            let mut task = Task::new("x");
            task.id = Some(format!("t-{i}"));
            task.attributes.insert("team".into(), "search".into());
            let classification = crate::classify::offline(&live.rubric, &task);
            let dims = TaskDims::from_task(&task.attributes, std::iter::empty());
            let at_ms = BEFORE_MIDNIGHT - 10 * MIN + i;
            let verdict = evaluate::evaluate(evaluate::EvalInput {
                task: &task,
                class: &classification.answer,
                dims: &dims,
                rubric: &live.rubric,
                registry: &live.registry,
                fleet: &then,
                table: &live.routing,
                policy: &live.policy,
                hints: &evaluate::hints(&live.policy),
                ledger: &Ledger::default(),
                queued: &BTreeMap::new(),
                released: false,
                ran: false,
                now_ms: at_ms,
                seed: 1,
                blocks: &[],
            });
            let evaluate::Verdict::Dispatch { decision, .. } = verdict else {
                panic!("logged task {i} not dispatched");
            };
            DecisionRecord {
                id: format!("d-{i}"),
                task_id: format!("t-{i}"),
                at_ms,
                at: String::new(),
                outcome: Outcome::Dispatched,
                pool: Some(decision.pool),
                model: Some(decision.model),
                worker: None,
                rule: decision.rule.as_str().into(),
                reason: decision.reason,
                task_type: classification.answer.task_type.clone(),
                tier: decision.tier,
                est_cost_usd: decision.est_cost_usd,
                priority: task.priority,
                classification,
                candidates: decision.candidates,
                rubric: live.rubric.name.clone(),
                policy_version: None,
                generation: None,
                inputs: DecisionInputs {
                    dims,
                    ..Default::default()
                },
                trace_id: None,
                recovered: false,
            }
        })
        .collect();
    assert!(
        logged.iter().all(|d| d.pool.as_deref() == Some("docs")),
        "general was busy then: {:?}",
        logged.iter().map(|d| &d.pool).collect::<Vec<_>>()
    );
    let (since, until) = (BEFORE_MIDNIGHT - MIN * 60, BEFORE_MIDNIGHT);

    // The policy in force against the fleet of then: nothing changes, nothing drifts.
    let same = super::replay::replay(&live.policy, &logged, &live, &then, since, until);
    assert_eq!((same.unchanged, same.drifted), (6, 0), "{same:?}");

    // The policy in force against today's fleet: every task would go to general now, under
    // it as under any candidate. That is drift, not a change the candidate makes.
    let moved = super::replay::replay(&live.policy, &logged, &live, &now, since, until);
    assert_eq!((moved.unchanged, moved.drifted), (0, 6), "{moved:?}");
    assert_eq!(moved.rerouted, 0, "{moved:?}");
    assert!(moved.changes.is_empty(), "{moved:?}");

    // A candidate that rejects the team's work is blamed for every rejection: the policy
    // in force would dispatch those tasks today.
    let tight = parse(&[(
        "tight.policy.toml",
        &BUDGET
            .replace("limit_usd = 1.0", "limit_usd = 0.000001")
            .replace("\"defer\"", "\"reject\""),
    )])
    .unwrap();
    let rejects = super::replay::replay(&tight, &logged, &live, &now, since, until);
    assert_eq!(
        (rejects.rejected, rejects.drifted, rejects.changes.len()),
        (6, 0, 6),
        "{rejects:?}"
    );
}

/// A throttle `slow` on every producer at `rate` tasks a second, and its limiters, on a
/// policy clock at [`THROTTLE_NOW`] that the test moves.
fn producer_throttle(rate: &str) -> (Policy, super::throttle::Throttles, Arc<ManualClock>) {
    let toml =
        format!("[[throttle]]\nname = \"slow\"\nscope = \"producer\"\ntasks_per_s = {rate}\n");
    let policy = parse(&[("t.policy.toml", &toml)]).unwrap();
    let clock = ManualClock::at(THROTTLE_NOW);
    let throttles = limiters(&clock).build(&policy, &Vec::new);
    (policy, throttles, clock)
}

/// A limiter cache on `clock`.
fn limiters(clock: &Arc<ManualClock>) -> super::throttle::LimiterCache {
    super::throttle::LimiterCache::new(clock.clone())
}

/// What a task of `producer` is throttled by.
fn producer_keys(producer: &str) -> super::throttle::ThrottleKeys<'_> {
    super::throttle::ThrottleKeys {
        pool: "docs",
        producer: Some(producer),
        ..Default::default()
    }
}

/// The policy clock's time in the throttle tests.
const THROTTLE_NOW: u64 = 1_764_000_000_000;

/// Task `id` asking at `now_ms`, with no turn yet.
fn asking(id: &str, now_ms: u64) -> super::throttle::Asking<'_> {
    super::throttle::Asking {
        task_id: id,
        now_ms,
        turn: None,
        inline_cap: 100,
    }
}

/// Parked tasks that leave their line before their turns (cancelled, or past their
/// deadline) give their places back: the line ends at the last turn still parked, and
/// with none it is gone, so a newcomer waits for the limiter's next permit only.
#[test]
fn a_line_shrinks_to_the_turns_still_parked_in_it() {
    use std::time::Duration;

    let (_, throttles, _) = producer_throttle("0.1");
    let ask = |id| asking(id, THROTTLE_NOW);
    let held = |id| {
        throttles
            .admit(producer_keys("a"), 10, ask(id))
            .unwrap_err()
    };
    assert!(throttles.admit(producer_keys("a"), 10, ask("t0")).is_ok());
    // Turns 10, 20, 30 and 40 s off.
    let turns: Vec<_> = ["t1", "t2", "t3", "t4"].map(|id| held(id).turn).into();
    let near = |w: Duration, s: u64| w.abs_diff(Duration::from_secs(s)) < Duration::from_secs(1);
    // What the parked queue would say: the last of these turns, per line.
    let still = |parked: Vec<super::throttle::Turn>| {
        move |throttle: &str, key: &str| {
            parked
                .iter()
                .filter(|t| t.throttle == throttle && t.key == key)
                .map(|t| t.at_ms)
                .max()
        }
    };
    // t2 and t4 leave; t1 and t3 still wait: a newcomer comes after t3, not after t4.
    throttles.shrink_lines(
        &[turns[1].clone(), turns[3].clone()],
        &still(vec![turns[0].clone(), turns[2].clone()]),
    );
    let n1 = held("n1");
    assert!(near(n1.wait, 40), "{n1:?}");
    // A turn of another key, or another throttle, changes nothing here.
    let other = super::throttle::Turn {
        key: "b".into(),
        ..turns[0].clone()
    };
    let foreign = super::throttle::Turn {
        throttle: "gone".into(),
        ..turns[0].clone()
    };
    throttles.shrink_lines(&[other, foreign], &still(vec![]));
    assert!(near(held("n2").wait, 50));
    // Every one of them leaves: the line is gone, and the next newcomer waits only for
    // the limiter's next permit (t0 took the last one).
    let all: Vec<_> = [&turns[0], &turns[2], &n1.turn]
        .into_iter()
        .cloned()
        .chain([held("n3").turn])
        .collect();
    throttles.shrink_lines(&all, &still(vec![]));
    let n4 = held("n4");
    assert!(near(n4.wait, 10), "{n4:?}");
}

/// Tasks back at their turns late together (a release pass, a slow redelivery) find one
/// permit between them: the one that takes it passes, and each of the others gets its own
/// later permit, one interval apart, instead of all coming back for the next one again
/// (at 20 tasks/s with a burst of 1, a backlog of 100 was held back 806 times before).
/// They all pass at those turns, on the policy clock.
#[test]
fn tasks_back_late_together_get_the_next_permits_one_apart() {
    use super::throttle::Asking;
    const NOW: u64 = THROTTLE_NOW;
    let (_, throttles, clock) = producer_throttle("2");
    let keys = producer_keys;
    assert!(throttles.admit(keys("a"), 10, asking("t0", NOW)).is_ok());
    let held: Vec<_> = ["t1", "t2", "t3", "t4"]
        .into_iter()
        .map(|id| throttles.admit(keys("a"), 10, asking(id, NOW)).unwrap_err())
        .collect();
    let turns: Vec<u64> = held.iter().map(|t| t.turn.at_ms).collect();
    assert_eq!(turns, [NOW + 500, NOW + 1000, NOW + 1500, NOW + 2000]);
    let back = |id, turn, now_ms| {
        throttles.admit(
            keys("a"),
            10,
            Asking {
                task_id: id,
                now_ms,
                turn,
                inline_cap: 100,
            },
        )
    };
    // All four back at t4's turn: t1 takes the one permit there is.
    let late = NOW + 2000;
    clock.set(late);
    assert!(back("t1", None, late).is_ok());
    let again: Vec<u64> = [
        ("t2", None),
        ("t3", Some(&held[2].turn)),
        ("t4", Some(&held[3].turn)),
    ]
    .into_iter()
    .map(|(id, turn)| back(id, turn, late).unwrap_err().turn.at_ms)
    .collect();
    assert_eq!(
        again,
        [late + 500, late + 1000, late + 1500],
        "one permit apart"
    );
    // Each passes at its new turn, remembered by its id while it waits in the stream
    // (t3 and t4 still carry the turn they were parked with).
    for (i, id) in ["t2", "t3", "t4"].into_iter().enumerate() {
        clock.set(again[i]);
        let carried = (i > 0).then_some(&held[i + 1].turn);
        assert!(back(id, carried, again[i]).is_ok(), "{id} at its new turn");
    }
}

/// Held-back tasks of one key get turns one permit apart, after the limiter's next permit;
/// a turn close at hand is waited out in the stream, one further off is parked; while a
/// key has a line, newcomers join its end, and a task back at its turn passes.
#[test]
fn held_back_tasks_get_turns_in_a_line_newcomers_join_it() {
    use std::time::Duration;

    use super::throttle::{Asking, Wait, spec_hash};
    let (policy, throttles, clock) = producer_throttle("2");
    let keys = producer_keys;
    const NOW: u64 = THROTTLE_NOW;
    let ask = asking;
    assert!(
        throttles.admit(keys("a"), 10, ask("t0", NOW)).is_ok(),
        "the burst of one"
    );
    let held: Vec<_> = ["t1", "t2", "t3", "t4", "t5"]
        .into_iter()
        .map(|id| throttles.admit(keys("a"), 10, ask(id, NOW)).unwrap_err())
        .collect();
    for (i, t) in held.iter().enumerate() {
        // The next permit is 500 ms off; each later task's turn is 500 ms after the last.
        let expected = Duration::from_millis(500 * (i as u64 + 1));
        assert!(
            t.wait.abs_diff(expected) < Duration::from_millis(100),
            "turn {i}: {:?}, expected about {expected:?} ({held:?})",
            t.wait
        );
        let at = NOW + t.wait.as_millis() as u64;
        assert!(t.turn.at_ms.abs_diff(at) <= 1, "{t:?}");
        assert_eq!(
            (t.turn.throttle.as_str(), t.turn.key.as_str()),
            ("slow", "a")
        );
        assert_eq!(t.turn.spec, spec_hash(&policy.throttles[0].spec));
        // Within a second: waited out in the stream; further: parked.
        let expect = if t.wait <= Duration::from_secs(1) {
            Wait::Inline
        } else {
            Wait::Park
        };
        assert_eq!(t.wait_in, expect, "{t:?}");
        assert_eq!(t.rate, "2 task(s)/s");
    }
    // Another key has its own line.
    assert!(throttles.admit(keys("b"), 10, ask("b0", NOW)).is_ok());
    let w = throttles
        .admit(keys("b"), 10, ask("b1", NOW))
        .unwrap_err()
        .wait;
    assert!(w <= Duration::from_millis(500), "{w:?}");

    // When t1's turn comes, a newcomer does not take its permit: it joins the line's end.
    // (The limiters run on the policy clock, as the turns do.)
    let t1_at = held[0].turn.at_ms;
    clock.set(t1_at);
    let late = throttles
        .admit(keys("a"), 10, ask("new", t1_at))
        .unwrap_err();
    assert_eq!(late.turn.at_ms, held[4].turn.at_ms + 500, "{late:?}");
    // t1, waiting in the stream, is remembered by its id and passes at its turn, with
    // the permit the newcomer left.
    clock.set(t1_at + 5);
    assert!(throttles.admit(keys("a"), 10, ask("t1", t1_at + 5)).is_ok());
    // t3 was parked: it passes with the turn its record kept, not before it.
    let t3 = &held[2];
    let parked = |task_id, turn, now_ms| Asking {
        task_id,
        now_ms,
        turn: Some(turn),
        inline_cap: 100,
    };
    clock.set(t3.turn.at_ms - 400);
    let early = throttles
        .admit(keys("a"), 10, parked("t3", &t3.turn, t3.turn.at_ms - 400))
        .unwrap_err();
    assert_eq!(early.turn, t3.turn, "back early, it keeps its turn");
    clock.set(t3.turn.at_ms);
    assert!(
        throttles
            .admit(keys("a"), 10, parked("t3", &t3.turn, t3.turn.at_ms))
            .is_ok()
    );
    // t2 (in the stream) and t4 (parked) come back late together, at t4's turn: t2 takes
    // the permit, and t4 keeps its place for the next one instead of passing too (the
    // GCRA bound holds for tasks back late together).
    let t4_at = held[3].turn.at_ms;
    clock.set(t4_at);
    assert!(throttles.admit(keys("a"), 10, ask("t2", t4_at)).is_ok());
    let t4 = throttles
        .admit(keys("a"), 10, parked("t4", &held[3].turn, t4_at))
        .unwrap_err();
    assert_eq!(t4.wait_in, Wait::Inline, "{t4:?}");
    assert!(
        t4.wait.abs_diff(Duration::from_millis(500)) <= Duration::from_millis(1),
        "{t4:?}"
    );
    // A turn from another spec (the throttle changed since) is not honoured.
    let mut stale = t3.turn.clone();
    stale.spec ^= 1;
    assert!(!throttles.honours(&stale) && throttles.honours(&t3.turn));
    let forged = Asking {
        task_id: "t9",
        now_ms: t4_at,
        turn: Some(&stale),
        inline_cap: 100,
    };
    assert!(throttles.admit(keys("a"), 10, forged).is_err());

    // With no room for more in-stream turns, even a near turn is parked.
    let at_now = ManualClock::at(NOW);
    let fresh = limiters(&at_now).build(&policy, &Vec::new);
    let cap0 = Asking {
        task_id: "x1",
        now_ms: NOW,
        turn: None,
        inline_cap: 0,
    };
    assert!(fresh.admit(keys("c"), 10, cap0).is_ok());
    assert_eq!(
        fresh.admit(keys("c"), 10, cap0).unwrap_err().wait_in,
        Wait::Park
    );

    // Limiters built while tasks are parked resume their lines behind the parked turns
    // (a restart forgets lines, not parked tasks).
    let last = held[4].turn.clone();
    let restarted = limiters(&at_now).build(&policy, &|| vec![last.clone()]);
    let t = restarted
        .admit(keys("a"), 10, ask("after", NOW))
        .unwrap_err();
    assert_eq!(t.turn.at_ms, last.at_ms + 500, "{t:?}");
}

/// With several replicas sharing the intake each lets through its part of a throttle:
/// two replicas at a throttle of 1 task/s and a burst of 4 take 2 at once each, and
/// then one every 2 s each, so together the throttle's rate.
#[test]
fn a_throttle_is_divided_among_the_replicas_sharing_the_intake() {
    use std::time::Duration;

    let toml = "[[throttle]]\nname = \"slow\"\nscope = \"producer\"\ntasks_per_s = 1\nburst = 4\n";
    let policy = parse(&[("t.policy.toml", toml)]).unwrap();
    let clock = ManualClock::at(THROTTLE_NOW);
    let cache = limiters(&clock);
    // How many pass at once, and how long the first held back waits for its turn.
    let burst = |throttles: &super::throttle::Throttles, prefix: &str| {
        let mut passed = 0;
        loop {
            let id = format!("{prefix}{passed}");
            match throttles.admit(producer_keys("a"), 10, asking(&id, THROTTLE_NOW)) {
                Ok(()) => passed += 1,
                Err(held) => return (passed, held.wait),
            }
        }
    };
    let near = |w: Duration, s: u64| w.abs_diff(Duration::from_secs(s)) < Duration::from_millis(50);
    let (alone, wait) = burst(&cache.build(&policy, &Vec::new), "one-");
    assert!(
        alone == 4 && near(wait, 1),
        "alone: the burst, then the rate ({alone}, {wait:?})"
    );
    assert!(cache.set_replicas(2));
    assert!(!cache.set_replicas(2), "no change");
    let (half, wait) = burst(&cache.build(&policy, &Vec::new), "two-");
    assert!(
        half == 2 && near(wait, 2),
        "one of two: half the burst and the rate ({half}, {wait:?})"
    );
    // The spec's own division: never below the smallest rate or one task.
    let spec = &policy.throttles[0].spec;
    let third = spec.divided(3);
    assert_eq!((third.tasks_per_s, third.burst), (Some(1.0 / 3.0), Some(2)));
    let tiny = super::schema::ThrottleSpec {
        tasks_per_s: Some(super::schema::MIN_TASKS_PER_S),
        tokens_per_min: Some(1),
        burst: Some(1),
        ..spec.clone()
    }
    .divided(5);
    assert_eq!(
        (tiny.tasks_per_s, tiny.tokens_per_min, tiny.burst),
        (Some(super::schema::MIN_TASKS_PER_S), Some(1), Some(1))
    );
    assert_eq!(spec.divided(1), *spec);
}
