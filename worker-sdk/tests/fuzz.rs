//! Property tests of the wire contract's parsers: task JSON and its headers, result and
//! heartbeat JSON, W3C `traceparent`, `tracestate` and `baggage`, reply subjects. Every
//! one of them reads what a producer, a worker or another hop sent, so none may panic, and
//! what they accept must be what they promise.
//!
//! `cargo test` runs 256 cases per property (seconds). The long run, documented in
//! README.md ("Fuzzing"): `PROPTEST_CASES=100000 cargo test -p fleet-worker --test fuzz`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step is a failed test"
)]

use fleet_worker::message::{Heartbeat, Task, TaskError, TaskResult};
use fleet_worker::protocol::{
    DEFAULT_REPLY_PREFIXES, header, is_publish_subject, reply_subject_problem, set_header,
};
use fleet_worker::trace::{Baggage, TraceParent, parse_tracestate};
use proptest::prelude::*;

/// Strings that have broken parsers before, or break naive ones: non-ASCII (a byte
/// offset inside a character), long, control characters, separators.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("ééééééé".to_string()),
        Just("日本語のテキスト".to_string()),
        Just("x".repeat(65_536)),
        Just("\u{0}\u{7f}\u{ffff}".to_string()),
        Just("-v".to_string()),
        Just("@".to_string()),
        Just("$JS.API.STREAM.PURGE.FLEET_RESULTS".to_string()),
        "\\PC{0,64}",
        ".{0,64}",
        "[ -~]{0,80}",
    ]
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)),
        hostile_text().prop_map(serde_json::Value::from),
        Just(serde_json::Value::from(u64::MAX)),
        Just(serde_json::Value::from(-1)),
        Just(serde_json::Value::from(1e308)),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A task-shaped object: the real field names (and misspellings) with any values.
fn task_like() -> impl Strategy<Value = serde_json::Value> {
    let keys = prop::sample::select(vec![
        "schema",
        "id",
        "description",
        "descripton",
        "input",
        "pool",
        "model",
        "capabilities",
        "priority",
        "deadline",
        "max_cost_usd",
        "expected_duration_s",
        "attributes",
        "unknown",
    ]);
    prop::collection::btree_map(keys, json_value(), 0..10).prop_map(|m| {
        serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    })
}

proptest! {
    #[test]
    fn task_json_never_panics_and_accepted_tasks_validate(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(t) = Task::from_json(&bytes) {
            prop_assert!(t.validate().is_ok());
        }
    }

    #[test]
    fn task_shaped_json_gets_an_answer(v in task_like()) {
        let bytes = serde_json::to_vec(&v).unwrap();
        match Task::from_json(&bytes) {
            Ok(t) => {
                prop_assert!(t.validate().is_ok());
                prop_assert!(t.priority <= 9);
            }
            Err(TaskError::Invalid(problems)) => prop_assert!(!problems.is_empty()),
            Err(TaskError::Parse(msg)) => prop_assert!(!msg.is_empty()),
        }
    }

    #[test]
    fn results_and_heartbeats_never_panic(v in json_value(), bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let text = serde_json::to_vec(&v).unwrap();
        let _ = serde_json::from_slice::<TaskResult>(&text);
        let _ = serde_json::from_slice::<Heartbeat>(&text);
        let _ = serde_json::from_slice::<TaskResult>(&bytes);
        let _ = serde_json::from_slice::<Heartbeat>(&bytes);
    }

    #[test]
    fn traceparent_parses_or_says_why(s in prop_oneof![
        hostile_text(),
        "[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.{0,8})?",
        "[0-9a-fA-F-]{50,60}",
    ]) {
        if let Ok(tp) = TraceParent::parse(&s) {
            // What is accepted round-trips to a version-00 header that parses the same.
            let again = TraceParent::parse(&tp.to_header()).unwrap();
            prop_assert_eq!(again, tp);
        }
    }

    #[test]
    fn baggage_and_tracestate_never_panic(s in prop_oneof![
        hostile_text(),
        "([a-z]{1,8}=[^,;]{0,12}(;p=1)?,){0,80}",
        "([a-z0-9_@*/-]{1,20}=[ -~]{0,20},){0,40}",
    ]) {
        let b = Baggage::parse(&s);
        prop_assert!(b.len() <= 64);
        // What is kept re-encodes to a header that parses to the same entries.
        let again = Baggage::parse(&b.to_header());
        prop_assert_eq!(again.iter().collect::<Vec<_>>(), b.iter().collect::<Vec<_>>());
        let _ = parse_tracestate(&s);
    }

    #[test]
    fn reply_subjects_never_reach_system_or_fleet_subjects(s in prop_oneof![
        hostile_text(),
        "\\$(JS|SYS|KV)\\.[A-Z.]{0,20}",
        "(fleet|_INBOX|orders)\\.[a-zA-Z0-9.*>]{0,20}",
    ]) {
        if reply_subject_problem(&s, DEFAULT_REPLY_PREFIXES, "fleet").is_none() {
            prop_assert!(is_publish_subject(&s));
            prop_assert!(s.starts_with("_INBOX."));
            prop_assert!(!s.starts_with('$'));
        }
        // Whatever prefixes are allowed, system and fleet subjects stay closed.
        if reply_subject_problem(&s, &[""], "fleet").is_none() {
            prop_assert!(!s.starts_with('$'));
            prop_assert!(s != "fleet" && !s.starts_with("fleet."));
        }
    }

    #[test]
    fn header_names_and_values_are_refused_not_panicked_on(name in hostile_text(), value in hostile_text()) {
        let mut h = async_nats::HeaderMap::new();
        if set_header(&mut h, &name, &value).is_ok() {
            prop_assert_eq!(header(Some(&h), &name), Some(value.as_str()));
        }
        let _ = header(Some(&h), &value);
    }
}

/// The finding that started this file: every problem of this task must be reported, and
/// nothing may panic on its way.
#[test]
fn seed_cases_answer_without_panicking() {
    for body in [
        r#"{"schema":1,"descripton":"typo","priority":99}"#,
        r#"{"schema":1,"description":"x","model":"ééééééé"}"#,
        r#"{"schema":1,"description":"x","pool":"日本語のテキスト"}"#,
        r#"{"schema":1,"description":"x","priority":-1}"#,
        r#"{"schema":1,"description":"x","max_cost_usd":1e309}"#,
        r#"{"schema":18446744073709551616,"description":"x"}"#,
    ] {
        assert!(Task::from_json(body.as_bytes()).is_err(), "{body}");
    }
    assert!(TraceParent::parse("00-ééééééééééééééééééééééééééééééé-00f067aa0ba902b7-01").is_err());
}
