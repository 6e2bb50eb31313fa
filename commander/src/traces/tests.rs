//! The keeper on a manual clock, with a real sled store: assembly, sampling, redaction of a
//! PII corpus, storage, late spans and hot-reloaded rules.

use std::collections::BTreeMap;
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, KeyValue, KeyValueList, any_value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};

use super::*;
use crate::classify::rubric::Rubric;
use crate::domain::ManualClock;
use crate::fleet::view::{FleetSnapshot, TaskTypeView};
use crate::fleet::window::Percentiles;
use crate::policy::audit::Source;
use crate::policy::live::Start;
use crate::policy::load::{CheckAgainst, Document};
use crate::registry::Registry;
use crate::route::RoutingTable;
use crate::store::Store;

const T0: u64 = 1_796_169_540_000;

fn s(v: &str) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(any_value::Value::StringValue(v.into())),
    })
}

fn i(v: i64) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(any_value::Value::IntValue(v)),
    })
}

fn kv(k: &str, value: Option<AnyValue>) -> KeyValue {
    KeyValue {
        key: k.into(),
        value,
        ..Default::default()
    }
}

/// Personal data of every kind the shipped rules cover, each found by its rule.
const CORPUS: &[&str] = &[
    "jane.doe@example.com",
    "J.Smith+billing@mail.example.co.uk",
    "+1 415 555 2671",
    "(415) 555-2671",
    "+442079460958",
    "4111 1111 1111 1111",
    "5500-0000-0000-0004",
    "sk-proj-AbCdEf0123456789AbCdEf0123",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_0123456789abcdefghijABCDEFGHIJ012345",
    "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJlX3Nob3VsZF9nbw",
    "192.168.10.42",
    "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
];

/// Digits that look like a card but fail the Luhn check, and other things that must stay.
const NOT_PII: &[&str] = &["4111111111111112", "gpt-4o-mini", "v1.2.3"];

struct Fixture {
    keeper: Keeper,
    clock: Arc<ManualClock>,
    engine: Arc<PolicyEngine>,
    store: TraceStore,
    fleet: FleetHandle,
    flags: Flags,
    _dir: tempfile::TempDir,
    _rx: crate::fleet::DetachedReceivers,
}

fn policy(engine: &PolicyEngine, text: &str) -> crate::policy::Policy {
    let live = engine.live();
    crate::policy::Policy::parse(
        vec![Document {
            name: "t.policy.toml".into(),
            text: text.into(),
        }],
        CheckAgainst {
            pools: None,
            registry: &live.registry,
            rubric: &live.rubric,
        },
    )
    .unwrap()
}

fn fixture(policy_text: &str, config: TracesConfig) -> Fixture {
    fixture_exporting(policy_text, config, Vec::new(), Default::default())
}

/// A keeper that offers to `exporters` while `leading` says this replica leads.
fn fixture_exporting(
    policy_text: &str,
    config: TracesConfig,
    exporters: Vec<export::Exporter>,
    leading: crate::domain::Leading,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let clock = ManualClock::at(T0);
    let registry = Registry::builtin().unwrap();
    let rubric = Rubric::builtin().unwrap();
    let p = crate::policy::Policy::parse(
        vec![Document {
            name: "t.policy.toml".into(),
            text: policy_text.into(),
        }],
        CheckAgainst {
            pools: None,
            registry: &registry,
            rubric: &rubric,
        },
    )
    .unwrap();
    let engine = PolicyEngine::open(
        &store,
        Start {
            routing: RoutingTable {
                pools: BTreeMap::new(),
                routing: Default::default(),
            },
            registry,
            registry_file: None,
            rubric,
            rubric_file: None,
            policy: p,
        },
        clock.clone(),
        100,
        100,
    )
    .unwrap();
    let (fleet, rx) = FleetHandle::detached(4);
    let trace_store = TraceStore::open(&store).unwrap();
    let flags = Flags::default();
    let w = Arc::new(Wiring {
        config,
        store: trace_store.clone(),
        engine: engine.clone(),
        flags: flags.clone(),
        exporters,
        counters: Arc::default(),
        clock: clock.clone(),
        shed: Arc::default(),
        leading,
    });
    Fixture {
        keeper: Keeper::new(w),
        clock,
        engine,
        store: trace_store,
        fleet,
        flags,
        _dir: dir,
        _rx: rx,
    }
}

fn config() -> TracesConfig {
    TracesConfig {
        decision_wait_ms: 1_000,
        max_trace_s: 30,
        ..Default::default()
    }
}

fn id16(n: u64) -> Vec<u8> {
    let mut a = vec![0xAB; 16];
    a[8..].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
    a
}

fn id8(trace: u64, n: u64) -> Vec<u8> {
    (trace.wrapping_mul(31).wrapping_add(n) | 1 << 60)
        .to_be_bytes()
        .to_vec()
}

/// A task run: a root consumer span and `calls` LLM calls under it, the content
/// carrying `pii`; the root failed when `error`.
fn run(trace: u64, task: &str, worker: &str, calls: u64, pii: &str, error: bool) -> Vec<Span> {
    let t = id16(trace);
    let root_id = id8(trace, 0);
    let start = T0 * 1_000_000;
    let mut spans = Vec::new();
    for c in 1..=calls {
        spans.push(Span {
            trace_id: t.clone(),
            span_id: id8(trace, c),
            parent_span_id: root_id.clone(),
            name: "chat gpt-4o-mini".into(),
            kind: span::SpanKind::Client as i32,
            start_time_unix_nano: start + c * 1_000_000,
            end_time_unix_nano: start + c * 1_000_000 + 500_000,
            attributes: vec![
                kv("gen_ai.operation.name", s("chat")),
                kv("gen_ai.request.model", s("gpt-4o-mini")),
                kv("gen_ai.usage.input_tokens", i(1_000)),
                kv("gen_ai.usage.output_tokens", i(200)),
                kv("gen_ai.input.messages", s(&format!(
                    r#"[{{"role":"user","parts":[{{"type":"text","content":"mail me at {pii} please"}}]}}]"#
                ))),
                kv("gen_ai.tool.call.arguments", s(&format!(r#"{{"to":"{pii}"}}"#))),
                kv("user.id", s("user-4242")),
                kv("http.request.header.authorization", s("Basic dXNlcjpwYXNz")),
                kv(
                    "nested",
                    Some(AnyValue {
                        value: Some(any_value::Value::KvlistValue(KeyValueList {
                            values: vec![kv(
                                "list",
                                Some(AnyValue {
                                    value: Some(any_value::Value::ArrayValue(ArrayValue {
                                        values: vec![s(pii).unwrap_or_default()],
                                    })),
                                }),
                            )],
                        })),
                    }),
                ),
            ],
            events: vec![span::Event {
                time_unix_nano: start + c * 1_000_000 + 1,
                name: "gen_ai.content.prompt".into(),
                attributes: vec![kv("gen_ai.prompt", s(&format!("contact {pii}")))],
                dropped_attributes_count: 0,
            }],
            ..Default::default()
        });
    }
    spans.push(Span {
        trace_id: t,
        span_id: root_id,
        name: "process task".into(),
        kind: span::SpanKind::Consumer as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: start + (calls + 1) * 1_000_000,
        attributes: vec![kv("fleet.task.id", s(task)), kv("fleet.task.type", s("qa"))],
        status: Some(Status {
            code: if error { 2 } else { 1 },
            message: if error {
                format!("upstream refused {pii}")
            } else {
                String::new()
            },
        }),
        ..Default::default()
    });
    let _ = worker;
    spans
}

fn export(worker: &str, pii: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", s("agent")),
                    kv("fleet.worker.id", s(worker)),
                    kv("fleet.pool", s("docs")),
                    kv("host.ip", s(pii)),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            schema_url: String::new(),
        }],
    }
}

impl Fixture {
    fn tick(&mut self) {
        let snap = self.fleet.snapshot();
        self.keeper.tick(&snap);
    }
}

/// A fleet whose `qa` runs cost $0.0004 on average, $0.002 at P99, and take a second.
fn measured_qa() -> FleetSnapshot {
    let mut snap = FleetSnapshot::default();
    let p = |p99: f64, mean: f64| Percentiles {
        count: 100,
        p99: Some(p99),
        mean: Some(mean),
        ..Default::default()
    };
    snap.fleet.task_types.push(TaskTypeView {
        task_type: "qa".into(),
        tasks: 100,
        cost_usd: p(0.002, 0.0004),
        duration_ms: p(60_000.0, 1_000.0),
        ..Default::default()
    });
    snap
}

fn feed(f: &mut Fixture, req: ExportTraceServiceRequest) {
    use prost::Message;
    f.keeper
        .add(TraceBatch::read(req.encode_to_vec().into()).unwrap());
}

fn every_string(rs: &[ResourceSpans]) -> String {
    // The JSON of the stored spans holds every string they carry.
    serde_json::to_string(rs).unwrap()
}

const KEEP_ALL: &str = r#"
[sampling]
healthy_rate = 1.0

[privacy]
deny_attributes = ["http.request.header.*"]
hash_salt_env = "CARGO_PKG_NAME"

[[redaction]]
name = "user_ids"
attributes = ["user.id"]
action = "hash"
"#;

/// Every replica keeps the same traces, and the one that leads exports them: one that does
/// not holds what it keeps back, and exports it when it takes the lead (the old leader may
/// have died before sending it); once leading, it exports as it keeps.
#[test]
fn a_replica_exports_what_it_keeps_only_while_it_leads() {
    let (exporter, mut queue) = export::Exporter::channel("collector", 16);
    let leading = crate::domain::Leading::default();
    let mut f = fixture_exporting(KEEP_ALL, config(), vec![exporter], leading.clone());
    let queued = |q: &mut tokio::sync::mpsc::Receiver<(export::Batch, u64)>| {
        let mut traces = Vec::new();
        while let Ok((t, spans)) = q.try_recv() {
            traces.push((t[0].scope_spans[0].spans[0].trace_id.clone(), spans));
        }
        traces
    };
    feed(
        &mut f,
        export("w-1", "x", run(1, "task-1", "w-1", 2, "x", false)),
    );
    f.clock.set(T0 + 5_000);
    f.tick();
    assert_eq!(f.store.len(), 1, "kept and stored by every replica");
    assert!(
        queued(&mut queue).is_empty(),
        "not exported: another replica leads"
    );
    assert_eq!(f.keeper.standby.held(), 1);

    leading.set(true);
    feed(
        &mut f,
        export("w-1", "x", run(2, "task-2", "w-1", 1, "x", false)),
    );
    f.clock.set(T0 + 10_000);
    f.tick();
    assert_eq!(
        queued(&mut queue),
        [(id16(1), 3), (id16(2), 2)],
        "what it held back first, then what it keeps"
    );
    assert_eq!(f.keeper.standby.held(), 0);

    leading.set(false);
    feed(
        &mut f,
        export("w-1", "x", run(3, "task-3", "w-1", 1, "x", false)),
    );
    f.clock.set(T0 + 15_000);
    f.tick();
    assert!(queued(&mut queue).is_empty(), "another leads again");
    assert_eq!(f.store.len(), 3);
}

#[test]
fn a_pii_corpus_is_gone_from_stored_traces_while_tokens_models_and_ids_stay() {
    // The salt's variable: one cargo sets for every test binary it runs.
    let mut f = fixture(KEEP_ALL, config());
    for (n, pii) in CORPUS.iter().chain(NOT_PII).enumerate() {
        let n = n as u64;
        let task = format!("task-{n}");
        f.clock.set(T0 + n);
        feed(
            &mut f,
            export(
                "w-1",
                pii,
                run(n, &task, "w-1", 2, pii, n.is_multiple_of(3)),
            ),
        );
    }
    f.clock.set(T0 + 5_000);
    f.tick();
    assert_eq!(f.store.len(), CORPUS.len() + NOT_PII.len());
    let mut hashes = std::collections::BTreeSet::new();
    for (n, pii) in CORPUS.iter().chain(NOT_PII).enumerate() {
        let n = n as u64;
        let stored = f.store.get(&id16(n)).unwrap().unwrap();
        let text = every_string(&stored.resource_spans);
        let is_pii = n < CORPUS.len() as u64;
        assert_eq!(
            text.contains(pii),
            !is_pii,
            "{pii:?} {} in the stored trace: {text}",
            if is_pii { "still" } else { "not kept whole" }
        );
        assert!(!text.contains("user-4242"), "user.id hashed");
        assert!(!text.contains("dXNlcjpwYXNz"), "denied header removed");
        assert!(!text.contains("http.request.header.authorization"));
        // Figures and identifiers are untouched.
        for kept in [
            "gpt-4o-mini",
            "w-1",
            "\"docs\"",
            &format!("task-{n}"),
            "process task",
        ] {
            assert!(text.contains(kept), "{kept} kept: {text}");
        }
        let s = &stored.summary;
        assert_eq!((s.input_tokens, s.output_tokens), (2_000, 400));
        assert_eq!(s.task_ids, vec![format!("task-{n}")]);
        assert_eq!(s.workers, vec!["w-1".to_string()]);
        assert!(s.cost_usd > 0.0, "priced from the registry");
        assert_eq!(s.spans, 3);
        let h = text.find("hash:").map(|i| &text[i..i + 21]).unwrap();
        hashes.insert(h.to_string());
        // What the API serves reads the same figures back.
        let view = tree::view(stored, &f.engine.live().registry);
        assert_eq!(view.span_tree.len(), 3);
        assert_eq!(view.span_tree[0].name, "process task");
        assert_eq!(view.span_tree[0].subtree.input_tokens, 2_000);
        assert_eq!(view.span_tree[1].depth, 1);
        assert_eq!(view.span_tree[1].tokens.unwrap().input, 1_000);
    }
    assert_eq!(
        hashes.len(),
        1,
        "one user id, one hash everywhere: {hashes:?}"
    );
    let counts = &f.keeper.w.counters.redactions;
    for rule in [
        "email",
        "phone",
        "payment_card",
        "api_key",
        "bearer_token",
        "ip_address",
    ] {
        let n = counts
            .get_or_create(&RuleLabels { rule: rule.into() })
            .get();
        assert!(n > 0, "rule {rule} counted");
    }
}

#[test]
fn a_trace_waits_for_its_root_and_its_late_children_and_errors_tails_and_flags_are_kept() {
    let mut f = fixture("[sampling]\nhealthy_rate = 0.0\n", config());
    f.fleet.set_snapshot(measured_qa());
    // Children first; the root later: nothing is decided before root + wait.
    let mut spans = run(1, "t-1", "w-1", 3, "x", true);
    let root = spans.pop().unwrap();
    feed(&mut f, export("w-1", "x", spans));
    f.clock.set(T0 + 10_000);
    f.tick();
    assert_eq!(f.store.len(), 0);
    assert_eq!(f.keeper.assembler.traces(), 1);
    feed(&mut f, export("w-1", "x", vec![root]));
    f.clock.set(T0 + 10_500);
    f.tick();
    assert_eq!(f.store.len(), 0, "within the decision wait");
    f.clock.set(T0 + 11_001);
    f.tick();
    let s = f.store.summary(&id16(1)).unwrap().unwrap();
    assert_eq!(s.why, vec![Why::Error]);
    assert_eq!(
        (s.spans, s.ending.as_str(), s.status.as_str()),
        (4, "complete", "error")
    );
    // A late child joins the kept trace.
    let late = Span {
        trace_id: id16(1),
        span_id: id8(1, 99),
        parent_span_id: id8(1, 0),
        name: "late tool".into(),
        ..Default::default()
    };
    feed(&mut f, export("w-1", "x", vec![late]));
    assert_eq!(f.store.summary(&id16(1)).unwrap().unwrap().spans, 5);
    // A healthy run is dropped; its late span too.
    feed(
        &mut f,
        export("w-1", "x", run(2, "t-2", "w-1", 1, "x", false)),
    );
    f.clock.set(T0 + 13_000);
    f.tick();
    assert!(f.store.summary(&id16(2)).unwrap().is_none());
    // A failed task, a flagged worker and an expensive run are kept, with their reasons.
    f.flags.task_failed("t-3", T0);
    feed(
        &mut f,
        export("w-1", "x", run(3, "t-3", "w-1", 1, "x", false)),
    );
    f.flags.flag_worker("w-9", "tool_loop", T0, T0 + 60_000);
    feed(
        &mut f,
        export("w-9", "x", run(4, "t-4", "w-9", 1, "x", false)),
    );
    feed(
        &mut f,
        export("w-1", "x", run(5, "t-5", "w-1", 8, "x", false)),
    );
    f.clock.set(T0 + 15_000);
    f.tick();
    let why = |n| f.store.summary(&id16(n)).unwrap().unwrap().why;
    assert_eq!(why(3), vec![Why::TaskFailed]);
    assert_eq!(why(4), vec![Why::Flagged]);
    assert_eq!(why(5), vec![Why::P99Cost, Why::CostMultiple]);
    // No root: decided at the end of its lifetime.
    let mut orphan = run(6, "t-6", "w-1", 1, "x", true);
    orphan.pop();
    orphan[0].status = Some(Status {
        code: 2,
        message: "timeout".into(),
    });
    feed(&mut f, export("w-1", "x", orphan));
    f.clock.set(T0 + 15_000 + 30_000);
    f.tick();
    assert_eq!(
        f.store.summary(&id16(6)).unwrap().unwrap().ending,
        "lifetime"
    );
    // The API's filters.
    let q = |filter: store::Filter| {
        f.store
            .query(&filter)
            .unwrap()
            .traces
            .into_iter()
            .map(|t| t.trace_id)
            .collect::<Vec<_>>()
    };
    let hexid = |n| store::hex(&id16(n));
    assert_eq!(
        q(store::Filter {
            why: Some("flagged".into()),
            ..Default::default()
        }),
        vec![hexid(4)]
    );
    assert_eq!(
        q(store::Filter {
            worker: Some("w-1".into()),
            status: Some("error".into()),
            ..Default::default()
        }),
        vec![hexid(6), hexid(3), hexid(1)]
    );
    assert_eq!(
        q(store::Filter {
            min_cost_usd: Some(0.001),
            ..Default::default()
        }),
        vec![hexid(5)]
    );
    let first = f
        .store
        .query(&store::Filter {
            limit: Some(2),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(first.traces.len(), 2);
    let rest = q(store::Filter {
        cursor: first.next,
        ..Default::default()
    });
    assert_eq!(rest.len(), 3);
    assert!(f.store.contains(&id16(3)));
    assert!(!f.store.contains(&id16(99)));
}

#[test]
fn the_byte_budget_decides_the_oldest_early_and_the_store_keeps_to_its_budget_and_age() {
    let cfg = TracesConfig {
        buffer_bytes: 20_000,
        store_bytes: 30_000,
        retention_hours: 1,
        ..config()
    };
    let mut f = fixture("[sampling]\nhealthy_rate = 1.0\n", cfg);
    for n in 0..40u64 {
        let mut spans = run(n, &format!("t-{n}"), "w-1", 2, "x", false);
        spans.pop(); // no root: only the budget or the lifetime decides them
        f.clock.set(T0 + n);
        feed(&mut f, export("w-1", "x", spans));
        f.tick();
        assert!(f.keeper.assembler.bytes() <= 20_000 + 5_000);
    }
    let evicted = f
        .keeper
        .w
        .counters
        .decided
        .get_or_create(&EndingLabels {
            ending: "evicted",
            decision: "kept",
        })
        .get();
    assert!(evicted >= 20, "oldest decided early: {evicted}");
    f.keeper.prune();
    assert!(f.store.bytes() <= 30_000, "{}", f.store.bytes());
    assert!(f.store.len() < 40);
    f.clock.set(T0 + 2 * 3_600_000);
    f.keeper.prune();
    assert_eq!((f.store.len(), f.store.bytes()), (0, 0));
}

#[test]
fn a_new_redaction_rule_applies_to_the_next_kept_trace() {
    let mut f = fixture("[sampling]\nhealthy_rate = 1.0\n", config());
    feed(
        &mut f,
        export("w-1", "x", run(1, "t-1", "w-1", 1, "ORDER-77", false)),
    );
    f.clock.set(T0 + 2_000);
    f.tick();
    let text = every_string(&f.store.get(&id16(1)).unwrap().unwrap().resource_spans);
    assert!(text.contains("ORDER-77"));
    let p = policy(
        &f.engine,
        "[sampling]\nhealthy_rate = 1.0\n[[redaction]]\nname = \"orders\"\npattern = \"ORDER-\\\\d+\"\nreplacement = \"[ORDER]\"\n",
    );
    assert!(f.engine.swap(p, 0, Source::File, "test"));
    feed(
        &mut f,
        export("w-1", "x", run(2, "t-2", "w-1", 1, "ORDER-77", false)),
    );
    f.clock.set(T0 + 4_000);
    f.tick();
    let text = every_string(&f.store.get(&id16(2)).unwrap().unwrap().resource_spans);
    assert!(
        !text.contains("ORDER-77") && text.contains("[ORDER]"),
        "{text}"
    );
}

#[test]
fn shipped_patterns_compile_and_the_luhn_check_tells_cards_from_numbers() {
    assert!(redact::builtins_compile());
    assert!(redact::luhn("4111 1111 1111 1111"));
    assert!(!redact::luhn("4111 1111 1111 1112"));
    assert!(!redact::luhn("1234"));
}

/// The span bytes the keeper holds are the export's own, read shallowly, and equal to
/// what encoding the decoded span gives; spans without valid ids are skipped in step, a
/// root keeps its name, and bytes that are not an export are refused.
#[test]
fn held_spans_are_the_exports_own_bytes() {
    use prost::Message;
    let mut req = export(
        "w-1",
        "a@b.example",
        run(7, "t-7", "w-1", 3, "a@b.example", false),
    );
    req.resource_spans.push(req.resource_spans[0].clone());
    req.resource_spans[1].scope_spans.push(ScopeSpans {
        spans: run(8, "t-8", "w-1", 1, "c@d.example", true),
        ..Default::default()
    });
    // A span without a valid trace id is skipped, and the reading stays in step.
    req.resource_spans[0].scope_spans[0].spans[1].trace_id = vec![0; 16];
    let body = bytes::Bytes::from(req.encode_to_vec());
    let held = super::assemble::spans_of(&body).unwrap();
    let valid: Vec<&Span> = req
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .filter(|s| s.trace_id != vec![0; 16])
        .collect();
    assert_eq!(held.len(), 4 + 4 + 2 - 1);
    assert_eq!(held.len(), valid.len());
    for (h, s) in held.iter().zip(&valid) {
        assert_eq!(h.span_id.as_slice(), s.span_id.as_slice());
        assert_eq!(h.bytes, s.encode_to_vec());
        let root = s.parent_span_id.is_empty() || s.kind == span::SpanKind::Consumer as i32;
        assert_eq!(h.name.as_deref(), root.then_some(s.name.as_str()));
        assert_eq!(h.origin.resource, req.resource_spans[0].resource);
    }
    assert!(super::assemble::spans_of(&body.slice(..body.len() / 2)).is_none());
}

/// A commander's own export for trace `n`: its dispatch span (no parent: the producer sent
/// no trace context), which failed to please nobody in particular (error status: it must
/// not decide the trace), and a classifier call with tokens (they must not price the run).
fn commander_export(n: u64, attempt: i64) -> TraceBatch {
    use prost::Message;
    let start = T0 * 1_000_000 - 5_000_000;
    let spans = vec![
        Span {
            trace_id: id16(n),
            span_id: id8(n, 50 + attempt as u64),
            name: "send fleet.work.docs".into(),
            kind: span::SpanKind::Producer as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + 1_000_000,
            attributes: vec![
                kv("fleet.task.id", s(&format!("t-{n}"))),
                kv("fleet.attempt", i(attempt)),
                kv("team", s("payments")),
            ],
            status: Some(Status {
                code: 2,
                message: "not the run's".into(),
            }),
            ..Default::default()
        },
        Span {
            trace_id: id16(n),
            span_id: id8(n, 60 + attempt as u64),
            name: "chat gpt-4o-mini".into(),
            kind: span::SpanKind::Client as i32,
            start_time_unix_nano: start - 2_000_000,
            end_time_unix_nano: start - 1_000_000,
            attributes: vec![
                kv("gen_ai.operation.name", s("chat")),
                kv("gen_ai.request.model", s("gpt-4o-mini")),
                kv("gen_ai.usage.input_tokens", i(1_000_000)),
                kv("gen_ai.usage.output_tokens", i(1_000_000)),
            ],
            ..Default::default()
        },
    ];
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", s("fleet-commander"))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            schema_url: String::new(),
        }],
    };
    TraceBatch::commander(req.encode_to_vec().into())
}

/// A run of trace `n` whose root is a child of the commander's dispatch span.
fn dispatched_run(n: u64, error: bool) -> Vec<Span> {
    let mut spans = run(n, &format!("t-{n}"), "w-1", 2, "x", error);
    if let Some(root) = spans.last_mut() {
        root.parent_span_id = id8(n, 51);
    }
    spans
}

fn span_count(f: &Fixture, outcome: &'static str) -> u64 {
    f.keeper
        .w
        .counters
        .spans
        .get_or_create(&SpanLabels { outcome })
        .get()
}

fn stored_names(f: &Fixture, n: u64) -> Vec<String> {
    let stored = f.store.get(&id16(n)).unwrap().unwrap();
    let mut names: Vec<String> = stored
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .map(|s| s.name.clone())
        .collect();
    names.sort();
    names
}

/// The commander's own spans (its dispatch span, its classifier calls) are kept with the
/// trace they belong to, whichever comes first, and follow the decision when they come
/// after it; they never make a trace complete, keep it, or add to its cost; and those
/// whose trace never comes leave after the lifetime, counted.
#[test]
fn a_commanders_own_spans_join_their_trace_without_deciding_it() {
    // The dispatch span carries the producer's baggage (`team`): a rule on it does not
    // read the commander's spans either.
    const POLICY: &str = r#"
[sampling]
healthy_rate = 0.0
rule = [{ attribute = "team", value = "payments", rate = 1.0 }]
"#;
    let mut f = fixture(POLICY, config());
    f.fleet.set_snapshot(measured_qa());
    let worker_only = {
        let mut g = fixture(POLICY, config());
        g.fleet.set_snapshot(measured_qa());
        feed(&mut g, export("w-1", "x", dispatched_run(1, true)));
        g.clock.set(T0 + 2_000);
        g.tick();
        g.store.summary(&id16(1)).unwrap().unwrap()
    };
    // Trace 1: the commander's spans come first and wait; then the failed run.
    f.keeper.add(commander_export(1, 1));
    assert_eq!(f.keeper.assembler.traces(), 0, "they do not start a trace");
    f.clock.set(T0 + 500);
    f.tick();
    feed(&mut f, export("w-1", "x", dispatched_run(1, true)));
    // Trace 2: the run's children, then the commander's spans, then the run's root.
    let mut two = dispatched_run(2, true);
    let root = two.pop().unwrap();
    feed(&mut f, export("w-1", "x", two));
    f.keeper.add(commander_export(2, 1));
    feed(&mut f, export("w-1", "x", vec![root]));
    // Trace 3: a healthy run; the commander's failed dispatch span does not keep it.
    f.keeper.add(commander_export(3, 1));
    feed(&mut f, export("w-1", "x", dispatched_run(3, false)));
    f.clock.set(T0 + 2_000);
    f.tick();
    let want = [
        "chat gpt-4o-mini",
        "chat gpt-4o-mini",
        "chat gpt-4o-mini",
        "process task",
        "send fleet.work.docs",
    ];
    for n in [1, 2] {
        assert_eq!(stored_names(&f, n), want, "trace {n}");
        let s = f.store.summary(&id16(n)).unwrap().unwrap();
        assert_eq!(s.spans, 5);
        assert_eq!(s.why, worker_only.why, "decided on the run alone");
        assert_eq!(s.cost_usd, worker_only.cost_usd);
        assert_eq!(s.input_tokens, worker_only.input_tokens);
        assert_eq!(s.workers, vec!["w-1".to_string()]);
        assert_eq!(s.root_name.as_deref(), Some("process task"));
        assert_eq!(
            s.start_unix_ms,
            T0 - 7,
            "the trace starts at the classifier call"
        );
        assert_eq!(s.duration_ms, worker_only.duration_ms);
    }
    assert!(f.store.summary(&id16(3)).unwrap().is_none());
    assert_eq!(span_count(&f, "commander"), 6);
    // After the decision: a kept trace takes a second attempt's spans, a dropped one not.
    f.keeper.add(commander_export(1, 2));
    f.keeper.add(commander_export(3, 2));
    assert_eq!(f.store.summary(&id16(1)).unwrap().unwrap().spans, 7);
    assert_eq!(
        (span_count(&f, "late_kept"), span_count(&f, "late_dropped")),
        (2, 2)
    );
    // Trace 4's run never comes: its spans leave, unmatched, after the lifetime.
    f.keeper.add(commander_export(4, 1));
    f.clock.set(T0 + 2_000 + 29_000);
    f.tick();
    assert_eq!(span_count(&f, "commander_unmatched"), 0);
    f.clock.set(T0 + 2_000 + 30_000);
    f.tick();
    assert_eq!(span_count(&f, "commander_unmatched"), 2);
    assert!(f.store.summary(&id16(4)).unwrap().is_none());
    assert_eq!(f.keeper.assembler.traces(), 0);
}

/// Commander spans waiting for their trace hold a quarter of the assembling budget at
/// most: past it the oldest leave, counted, and their run is kept without them.
#[test]
fn commander_spans_waiting_for_their_trace_keep_to_their_budget() {
    let cfg = TracesConfig {
        buffer_bytes: 8_000,
        ..config()
    };
    let mut f = fixture("[sampling]\nhealthy_rate = 1.0\n", cfg);
    for n in 1..=10 {
        f.keeper.add(commander_export(n, 1));
    }
    let unmatched = span_count(&f, "commander_unmatched");
    f.tick();
    let unmatched = unmatched + span_count(&f, "commander_unmatched");
    assert!((10..20).contains(&unmatched), "{unmatched}");
    for n in [1, 10] {
        feed(&mut f, export("w-1", "x", dispatched_run(n, false)));
    }
    f.clock.set(T0 + 2_000);
    f.tick();
    assert_eq!(f.store.summary(&id16(1)).unwrap().unwrap().spans, 3);
    assert_eq!(f.store.summary(&id16(10)).unwrap().unwrap().spans, 5);
}
