//! Property tests of every commander parser that reads outside input: OTLP (protobuf and
//! JSON) through the decode limits, normalisation and the live state; policy, rubric and
//! registry TOML (and the config); model-name lookup. Each is seeded with the inputs that broke the
//! commander when it was fuzzed black-box (a non-ASCII model name, a 1e-45 throttle rate,
//! a body of empty messages).
//!
//! `cargo test` runs 256 cases per property (seconds). The long run, documented in
//! README.md ("Fuzzing"):
//! `PROPTEST_CASES=20000 cargo test -p fleet-commander --test fuzz`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step is a failed test"
)]

use fleet_commander::classify::rubric::{self, Rubric};
use fleet_commander::config::{Config, FleetConfig};
use fleet_commander::fleet::costs::Dim;
use fleet_commander::fleet::{FleetState, Ingest};
use fleet_commander::ingest::limits::{self, DecodeLimits, LimitError, Signal};
use fleet_commander::ingest::normalise;
use fleet_commander::ingest::normalise::wire::TraceRequest;
use fleet_commander::policy::throttle::{Asking, LimiterCache, ThrottleKeys};
use fleet_commander::policy::{self, Document, Policy, testcase};
use fleet_commander::registry::Registry;
use fleet_commander::route::RoutingTable;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use proptest::prelude::*;
use prost::Message;

fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("ééééééé".to_string()),
        Just("日本語のテキスト".to_string()),
        Just("x".repeat(65_536)),
        Just("gpt-4o-2024-08-06".to_string()),
        Just("claude-sonnet-4-5@20250929".to_string()),
        Just("anthropic.claude-sonnet-4-5-v1:0".to_string()),
        Just("é-2024-08-06".to_string()),
        Just("ééééé-20250101".to_string()),
        Just("-v".to_string()),
        Just("@".to_string()),
        "\\PC{0,40}",
        "[a-z0-9./@:-]{0,40}",
        "\\PC{0,20}-[0-9]{4}-[0-9]{2}-[0-9]{2}",
    ]
}

fn any_value() -> impl Strategy<Value = AnyValue> {
    use any_value::Value;
    let leaf = prop_oneof![
        hostile_text().prop_map(Value::StringValue),
        any::<i64>().prop_map(Value::IntValue),
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(-1.0),
            Just(1e308)
        ]
        .prop_map(Value::DoubleValue),
        any::<bool>().prop_map(Value::BoolValue),
        prop::collection::vec(any::<u8>(), 0..16).prop_map(Value::BytesValue),
    ]
    .prop_map(|v| AnyValue { value: Some(v) });
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop::collection::vec(inner, 0..4).prop_map(|values| AnyValue {
            value: Some(any_value::Value::ArrayValue(ArrayValue { values })),
        })
    })
}

/// Attribute keys the commander reads (and some it does not).
fn attribute() -> impl Strategy<Value = KeyValue> {
    let key = prop::sample::select(vec![
        "gen_ai.request.model",
        "gen_ai.response.model",
        "gen_ai.system",
        "gen_ai.provider.name",
        "gen_ai.operation.name",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "gen_ai.usage.prompt_tokens",
        "gen_ai.usage.cost",
        "gen_ai.agent.id",
        "gen_ai.agent.name",
        "gen_ai.tool.name",
        "gen_ai.token.type",
        "fleet.worker.id",
        "fleet.pool",
        "fleet.task.id",
        "fleet.task.expected_duration_s",
        "fleet.task.root",
        "service.name",
        "service.instance.id",
        "error.type",
        "team",
        "feature",
        "task_type",
        "user.tier",
        "other",
    ]);
    (key, any_value()).prop_map(|(k, v)| KeyValue {
        key: k.to_string(),
        value: Some(v),
        ..Default::default()
    })
}

fn id(len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), len..=len),
        prop::collection::vec(any::<u8>(), 0..20),
        Just(vec![0; len]),
    ]
}

fn time() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        any::<u64>(),
        (1_700_000_000_000_000_000u64..1_900_000_000_000_000_000u64),
    ]
}

fn span() -> impl Strategy<Value = Span> {
    (
        id(16),
        id(8),
        id(8),
        hostile_text(),
        0i32..8,
        time(),
        time(),
        prop::collection::vec(attribute(), 0..12),
        prop::option::of(0i32..4),
    )
        .prop_map(
            |(trace_id, span_id, parent, name, kind, start, end, attributes, status)| Span {
                trace_id,
                span_id,
                parent_span_id: parent,
                name,
                kind,
                start_time_unix_nano: start,
                end_time_unix_nano: end,
                attributes,
                status: status.map(|code| Status {
                    code,
                    message: String::new(),
                }),
                ..Default::default()
            },
        )
}

fn trace_request() -> impl Strategy<Value = ExportTraceServiceRequest> {
    (
        prop::collection::vec(attribute(), 0..6),
        prop::collection::vec(span(), 0..8),
    )
        .prop_map(|(resource, spans)| ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: resource,
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        })
}

fn metrics_request() -> impl Strategy<Value = ExportMetricsServiceRequest> {
    let name = prop::sample::select(vec![
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.duration",
        "gen_ai.client.inference.usage.input_tokens",
        "gen_ai.client.inference.usage.output_tokens",
        "gen_ai.client.cost",
        "other",
    ]);
    let point = (
        prop::collection::vec(attribute(), 0..6),
        time(),
        any::<u64>(),
        any::<f64>(),
        prop::collection::vec(any::<u64>(), 0..6),
    );
    (
        prop::collection::vec(attribute(), 0..4),
        name,
        prop::collection::vec(point, 0..4),
        any::<bool>(),
    )
        .prop_map(|(resource, name, points, histogram)| {
            let data = if histogram {
                metric::Data::Histogram(Histogram {
                    data_points: points
                        .into_iter()
                        .map(|(attributes, t, count, sum, buckets)| HistogramDataPoint {
                            attributes,
                            time_unix_nano: t,
                            count,
                            sum: Some(sum),
                            bucket_counts: buckets,
                            ..Default::default()
                        })
                        .collect(),
                    aggregation_temporality: 1,
                })
            } else {
                metric::Data::Sum(Sum {
                    data_points: points
                        .into_iter()
                        .map(|(attributes, t, n, x, _)| NumberDataPoint {
                            attributes,
                            time_unix_nano: t,
                            // Counts up to u64::MAX as i64, and any double (NaN, infinities).
                            value: Some(match n % 2 {
                                0 => number_data_point::Value::AsInt(n as i64),
                                _ => number_data_point::Value::AsDouble(x),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    aggregation_temporality: 2,
                    is_monotonic: true,
                })
            };
            ExportMetricsServiceRequest {
                resource_metrics: vec![ResourceMetrics {
                    resource: Some(Resource {
                        attributes: resource,
                        ..Default::default()
                    }),
                    scope_metrics: vec![ScopeMetrics {
                        metrics: vec![Metric {
                            name: name.to_string(),
                            data: Some(data),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            }
        })
}

fn fleet() -> FleetState {
    let registry = fleet_commander::hot::fixed(Registry::builtin().unwrap());
    FleetState::new(FleetConfig::default(), registry, ["code", "docs"])
}

/// Everything a reader of the live state does, at `now`.
fn exercise(state: &mut FleetState, now: u64) {
    state.tick(now);
    let snap = state.snapshot(now);
    for w in &snap.workers {
        let _ = state.worker_detail(&w.id, now);
    }
    let _ = state.costs(&[Dim::Model, Dim::Team], 3_600_000, now);
    let _ = state.fleet_series(900_000, now);
}

fn now_ms() -> u64 {
    1_800_000_000_000
}

proptest! {
    #[test]
    fn otlp_traces_reach_the_live_state_without_panicking(req in trace_request(), later in 0u64..10_000_000) {
        let body = req.encode_to_vec();
        let cost = limits::check_protobuf(Signal::Traces, &body, DecodeLimits::default()).unwrap();
        prop_assert!(cost.items >= 1);
        // Ingest's own reading (strings as slices of the body) and the generated types'
        // find the same spans.
        let decoded = TraceRequest::parse(&body).unwrap();
        let (events, _rejected) = normalise::span_events(&decoded);
        prop_assert_eq!(events.len(), normalise::spans(&req).0.len());
        let mut state = fleet();
        state.apply(Ingest::Spans(events), now_ms());
        exercise(&mut state, now_ms() + later);
        // The same export as OTLP/JSON passes the JSON scan and decodes.
        let json = serde_json::to_vec(&req).unwrap();
        limits::check_json(&json, DecodeLimits::default()).unwrap();
        let _ = serde_json::from_slice::<ExportTraceServiceRequest>(&json);
    }

    #[test]
    fn otlp_metrics_reach_the_live_state_without_panicking(req in metrics_request()) {
        let body = req.encode_to_vec();
        limits::check_protobuf(Signal::Metrics, &body, DecodeLimits::default()).unwrap();
        let decoded = ExportMetricsServiceRequest::decode(&body[..]).unwrap();
        let (points, _, _) = normalise::metrics(decoded);
        let mut state = fleet();
        state.apply(Ingest::Metrics(points), now_ms());
        exercise(&mut state, now_ms() + 1_000);
    }

    #[test]
    fn mutated_otlp_bytes_are_refused_or_read(req in trace_request(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut body = req.encode_to_vec();
        if body.is_empty() {
            return Ok(());
        }
        for (at, b) in flips {
            let i = at.index(body.len());
            body[i] = b;
        }
        match limits::check_protobuf(Signal::Traces, &body, DecodeLimits::default()) {
            Ok(_) | Err(LimitError::Malformed(_)) => {}
            Err(e) => prop_assert!(false, "a small body broke a limit: {e}"),
        }
        // Ingest's own reading accepts exactly what prost accepts, with the same spans.
        let generated = ExportTraceServiceRequest::decode(&body[..]);
        let read = TraceRequest::parse(&body);
        prop_assert_eq!(generated.is_ok(), read.is_ok(), "prost: {:?}, ingest: {:?}", generated.as_ref().err(), read.as_ref().err());
        if let (Ok(g), Ok(r)) = (&generated, &read) {
            let spans = g.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum::<usize>();
            let read_spans = r.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum::<usize>();
            prop_assert_eq!(spans, read_spans);
            prop_assert_eq!(normalise::spans(g).0.len(), normalise::span_events(r).0.len());
        }
        if let Ok(decoded) = read {
            let (events, _) = normalise::span_events(&decoded);
            let mut state = fleet();
            state.apply(Ingest::Spans(events), now_ms());
            exercise(&mut state, now_ms());
        }
        let _ = limits::check_json(&body, DecodeLimits::default());
    }

    #[test]
    fn config_toml_is_checked_not_panicked_on(text in mutated(EXAMPLE_FLEET)) {
        if let Ok(c) = Config::parse(&text, std::path::Path::new("fuzz.toml")) {
            let _ = c.subjects();
            let _ = c.telemetry.decode_limits();
        }
    }

    #[test]
    fn model_lookup_never_panics(name in hostile_text()) {
        let r = Registry::builtin().unwrap();
        if let Some(m) = r.lookup(&name) {
            prop_assert!(!m.name.is_empty());
        }
    }

    #[test]
    fn registry_toml_is_checked_not_panicked_on(text in mutated(REGISTRY)) {
        if let Ok(r) = Registry::parse(&text, "fuzz.toml") {
            for m in r.models() {
                prop_assert!(r.lookup(&m.name).is_some());
            }
        }
    }

    #[test]
    fn rubric_toml_is_checked_not_panicked_on(text in mutated(RUBRIC)) {
        let registry = Registry::builtin().unwrap();
        let _ = Rubric::parse(&text, "fuzz.toml", rubric::CheckAgainst { registry: Some(&registry), pools: None });
    }

    #[test]
    fn policies_that_validate_build_and_run(text in mutated(POLICY)) {
        let registry = Registry::builtin().unwrap();
        let rubric = Rubric::builtin().unwrap();
        let config = Config::parse(EXAMPLE_FLEET, std::path::Path::new("example.toml")).unwrap();
        let docs = vec![Document { name: "fuzz.policy.toml".into(), text }];
        let against = policy::CheckAgainst { pools: Some(&config.pools), registry: &registry, rubric: &rubric };
        match Policy::parse(docs, against) {
            // What validates builds exactly as the engine builds it, takes permits, and
            // decides its own test cases (budgets, downgrades, reroutes) without panicking.
            Ok(p) => {
                let clock = fleet_commander::domain::ManualClock::at(0);
                let throttles = LimiterCache::new(clock.clone()).build(&p, &Vec::new);
                let keys = ThrottleKeys { pool: "code", team: Some("search"), producer: Some("p"), worker: None };
                for i in 0..3u64 {
                    let id = format!("t{i}");
                    clock.set(1_000 * i);
                    let ask = Asking { task_id: &id, now_ms: 1_000 * i, turn: None, inline_cap: 1 };
                    let _ = throttles.admit(keys, 1_000, ask);
                }
                let table = RoutingTable { pools: config.pools.clone(), routing: config.routing.clone() };
                let _ = testcase::run(&p, &rubric, &registry, &table);
            }
            Err(e) => {
                // Every problem names where it is.
                for problem in e.problems() {
                    prop_assert!(problem.contains("fuzz.policy.toml"), "{problem}");
                }
            }
        }
    }
}

const REGISTRY: &str = include_str!("../../policies/models.toml");
const RUBRIC: &str = include_str!("../../routing-rubrics/default.toml");
const POLICY: &str = include_str!("../../policies/example.policy.toml");
const EXAMPLE_FLEET: &str = include_str!("../../simulations/fleets/example.toml");

/// Values that have broken parsers and the arithmetic behind them.
const HOSTILE_VALUES: &[&str] = &[
    "1e-45",
    "0",
    "-5",
    "nan",
    "inf",
    "-inf",
    "1e308",
    "18446744073709551615",
    "9223372036854775807",
    "0.0000001",
    "\"1000000000000000000000d\"",
    "\"0s\"",
    "\"ééééééé\"",
    "\"日本語のテキスト\"",
    "[]",
    "{}",
];

/// A real document with mutations: a value replaced by a hostile one, a line dropped or
/// cut, bytes replaced. Most mutants are invalid; the point is that each is answered.
fn mutated(base: &'static str) -> impl Strategy<Value = String> {
    let lines: Vec<&'static str> = base.lines().collect();
    let n = lines.len().max(1);
    let edit = prop_oneof![
        (0..n, prop::sample::select(HOSTILE_VALUES)).prop_map(|(i, v)| Edit::Value(i, v)),
        (0..n).prop_map(Edit::Drop),
        (0..n, 0usize..200).prop_map(|(i, at)| Edit::Cut(i, at)),
        (0..n, hostile_text()).prop_map(|(i, s)| Edit::Insert(i, s)),
    ];
    prop::collection::vec(edit, 0..4).prop_map(move |edits| {
        let mut lines: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        for e in edits {
            match e {
                Edit::Value(i, v) => {
                    if let Some(l) = lines.get_mut(i)
                        && let Some((key, _)) = l.split_once('=')
                    {
                        *l = format!("{key}= {v}");
                    }
                }
                Edit::Drop(i) => {
                    if i < lines.len() {
                        lines.remove(i);
                    }
                }
                Edit::Cut(i, at) => {
                    if let Some(l) = lines.get_mut(i) {
                        let cut = l.char_indices().nth(at).map(|(b, _)| b).unwrap_or(l.len());
                        l.truncate(cut);
                    }
                }
                Edit::Insert(i, s) => {
                    if i <= lines.len() {
                        lines.insert(i, s);
                    }
                }
            }
        }
        lines.join("\n")
    })
}

#[derive(Clone, Debug)]
enum Edit {
    Value(usize, &'static str),
    Drop(usize),
    Cut(usize, usize),
    Insert(usize, String),
}

/// The findings of the black-box run, as fixed inputs.
#[test]
fn seed_non_ascii_and_huge_model_names_reach_the_live_state() {
    for model in [
        "ééééééé",
        "日本語のテキスト",
        &"m".repeat(65_536),
        "é-2024-08-06",
    ] {
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        name: format!("chat {model}"),
                        start_time_unix_nano: 1_800_000_000_000_000_000,
                        end_time_unix_nano: 1_800_000_001_000_000_000,
                        attributes: vec![
                            KeyValue {
                                key: "gen_ai.request.model".into(),
                                value: Some(AnyValue {
                                    value: Some(any_value::Value::StringValue(model.to_string())),
                                }),
                                ..Default::default()
                            },
                            KeyValue {
                                key: "gen_ai.operation.name".into(),
                                value: Some(AnyValue {
                                    value: Some(any_value::Value::StringValue("chat".into())),
                                }),
                                ..Default::default()
                            },
                        ],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let (events, _) = normalise::spans(&req);
        let mut state = fleet();
        state.apply(Ingest::Spans(events), now_ms());
        exercise(&mut state, now_ms() + 1_000);
    }
}

#[test]
fn seed_a_1e_45_rate_is_a_file_line_error() {
    let registry = Registry::builtin().unwrap();
    let rubric = Rubric::builtin().unwrap();
    let text = POLICY.replace("tasks_per_s = 50", "tasks_per_s = 1e-45");
    let against = policy::CheckAgainst {
        pools: None,
        registry: &registry,
        rubric: &rubric,
    };
    let err = Policy::parse(
        vec![Document {
            name: "p.policy.toml".into(),
            text,
        }],
        against,
    )
    .unwrap_err();
    let problems = err.problems();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("p.policy.toml:") && p.contains("tasks_per_s 1e-45")),
        "{problems:?}"
    );
}

#[test]
fn seed_the_amplification_body_is_refused() {
    let mut body = Vec::new();
    for _ in 0..2_000_000 {
        body.extend_from_slice(&[0x0a, 0x00]);
    }
    assert!(matches!(
        limits::check_protobuf(Signal::Traces, &body, DecodeLimits::default()),
        Err(LimitError::Items { .. })
    ));
    let json = format!(
        r#"{{"resourceSpans":[{}]}}"#,
        vec!["{}"; 1_500_000].join(",")
    );
    assert!(matches!(
        limits::check_json(json.as_bytes(), DecodeLimits::default()),
        Err(LimitError::Items { .. } | LimitError::Decoded { .. })
    ));
}
