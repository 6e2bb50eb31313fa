//! Normalisation over real-shaped spans: what current and older instrumentations emit.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::metrics::v1::{
    Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

use super::*;

fn s(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}
fn i(k: &str, v: i64) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(v)),
        }),
        ..Default::default()
    }
}
fn d(k: &str, v: f64) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(Value::DoubleValue(v)),
        }),
        ..Default::default()
    }
}

fn span(name: &str, attrs: Vec<KeyValue>) -> Span {
    Span {
        trace_id: vec![1; 16],
        span_id: vec![2; 8],
        parent_span_id: vec![3; 8],
        name: name.into(),
        kind: 3,
        start_time_unix_nano: 1_000,
        end_time_unix_nano: 2_000,
        attributes: attrs,
        ..Default::default()
    }
}

fn export(resource: Vec<KeyValue>, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
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
    }
}

fn one(resource: Vec<KeyValue>, span: Span) -> SpanEvent {
    let (mut out, rej) = spans(&export(resource, vec![span]));
    assert_eq!(rej.count, 0, "{rej:?}");
    assert_eq!(out.len(), 1);
    out.remove(0)
}

fn svc() -> Vec<KeyValue> {
    vec![s("service.name", "support-bot")]
}

fn usage(input: u64, output: u64, cache_read: u64, cache_write: u64) -> Option<TokenUsage> {
    Some(TokenUsage {
        input,
        output,
        cache_read,
        cache_write,
    })
}

/// (case, resource, span, expected operation, provider, model, usage)
#[test]
fn inference_spans_old_and_new_names() {
    type Case = (
        &'static str,
        Span,
        Operation,
        Option<&'static str>,
        Option<&'static str>,
        Option<TokenUsage>,
    );
    let cases: Vec<Case> = vec![
        (
            "current names (semconv 1.37+), response model wins",
            span(
                "chat gpt-4o",
                vec![
                    s("gen_ai.operation.name", "chat"),
                    s("gen_ai.provider.name", "openai"),
                    s("gen_ai.request.model", "gpt-4o"),
                    s("gen_ai.response.model", "gpt-4o-2024-08-06"),
                    i("gen_ai.usage.input_tokens", 1200),
                    i("gen_ai.usage.output_tokens", 300),
                    i("gen_ai.usage.cache_read.input_tokens", 1000),
                ],
            ),
            Operation::Inference,
            Some("openai"),
            Some("gpt-4o-2024-08-06"),
            usage(1200, 300, 1000, 0),
        ),
        (
            "pre-1.27 token names and gen_ai.system",
            span(
                "chat gpt-4o-mini",
                vec![
                    s("gen_ai.operation.name", "chat"),
                    s("gen_ai.system", "openai"),
                    s("gen_ai.request.model", "gpt-4o-mini"),
                    i("gen_ai.usage.prompt_tokens", 50),
                    i("gen_ai.usage.completion_tokens", 7),
                ],
            ),
            Operation::Inference,
            Some("openai"),
            Some("gpt-4o-mini"),
            usage(50, 7, 0, 0),
        ),
        (
            "anthropic with cache_creation (current registry name)",
            span(
                "chat claude-sonnet-4-5",
                vec![
                    s("gen_ai.operation.name", "chat"),
                    s("gen_ai.provider.name", "anthropic"),
                    s("gen_ai.request.model", "claude-sonnet-4-5"),
                    i("gen_ai.usage.input_tokens", 5000),
                    i("gen_ai.usage.output_tokens", 800),
                    i("gen_ai.usage.cache_read.input_tokens", 3000),
                    i("gen_ai.usage.cache_creation.input_tokens", 1000),
                ],
            ),
            Operation::Inference,
            Some("anthropic"),
            Some("claude-sonnet-4-5"),
            usage(5000, 800, 3000, 1000),
        ),
        (
            "cache_write (in-flight rename) and text_completion",
            span(
                "text_completion claude-haiku-4-5",
                vec![
                    s("gen_ai.operation.name", "text_completion"),
                    s("gen_ai.provider.name", "anthropic"),
                    s("gen_ai.request.model", "claude-haiku-4-5"),
                    i("gen_ai.usage.input_tokens", 10),
                    i("gen_ai.usage.output_tokens", 1),
                    i("gen_ai.usage.cache_write.input_tokens", 4),
                ],
            ),
            Operation::Inference,
            Some("anthropic"),
            Some("claude-haiku-4-5"),
            usage(10, 1, 0, 4),
        ),
        (
            "old vertex_ai provider value, generate_content, tokens as double and string",
            span(
                "generate_content gemini-2.0-flash",
                vec![
                    s("gen_ai.operation.name", "generate_content"),
                    s("gen_ai.system", "vertex_ai"),
                    s("gen_ai.request.model", "gemini-2.0-flash"),
                    d("gen_ai.usage.input_tokens", 42.0),
                    s("gen_ai.usage.output_tokens", "9"),
                ],
            ),
            Operation::Inference,
            Some("gcp.vertex_ai"),
            Some("gemini-2.0-flash"),
            usage(42, 9, 0, 0),
        ),
        (
            "provider.name wins over gen_ai.system when both are sent",
            span(
                "chat",
                vec![
                    s("gen_ai.system", "az.ai.openai"),
                    s("gen_ai.provider.name", "azure.ai.openai"),
                    s("gen_ai.operation.name", "chat"),
                ],
            ),
            Operation::Inference,
            Some("azure.ai.openai"),
            None,
            None,
        ),
        (
            "no operation name: model + tokens (OpenLLMetry-era) is an LLM call",
            span(
                "openai.chat",
                vec![
                    s("gen_ai.system", "openai"),
                    s("gen_ai.request.model", "gpt-4o"),
                    i("gen_ai.usage.prompt_tokens", 3),
                    i("gen_ai.usage.completion_tokens", 4),
                ],
            ),
            Operation::Inference,
            Some("openai"),
            Some("gpt-4o"),
            usage(3, 4, 0, 0),
        ),
        (
            "embeddings",
            span(
                "embeddings text-embedding-3-small",
                vec![
                    s("gen_ai.operation.name", "embeddings"),
                    s("gen_ai.provider.name", "openai"),
                    s("gen_ai.request.model", "text-embedding-3-small"),
                    i("gen_ai.usage.input_tokens", 64),
                ],
            ),
            Operation::Embeddings,
            Some("openai"),
            Some("text-embedding-3-small"),
            usage(64, 0, 0, 0),
        ),
        (
            "an HTTP span is not GenAI",
            span("GET /health", vec![s("http.request.method", "GET")]),
            Operation::None,
            None,
            None,
            None,
        ),
    ];
    for (case, sp, op, provider, model, u) in cases {
        let e = one(svc(), sp);
        assert_eq!(e.operation, op, "{case}");
        assert_eq!(e.provider.as_deref(), provider, "{case}");
        assert_eq!(e.model.as_deref(), model, "{case}");
        assert_eq!(e.usage, u, "{case}");
        assert!(!e.error, "{case}");
    }
}

#[test]
fn tool_spans_with_and_without_operation_name() {
    let e = one(
        svc(),
        span(
            "execute_tool web_search",
            vec![
                s("gen_ai.operation.name", "execute_tool"),
                s("gen_ai.tool.name", "web_search"),
                s("gen_ai.tool.call.id", "call_1"),
                s("gen_ai.tool.type", "function"),
            ],
        ),
    );
    assert_eq!(e.operation, Operation::ExecuteTool);
    assert_eq!(e.tool.as_deref(), Some("web_search"));
    let e = one(svc(), span("tool", vec![s("gen_ai.tool.name", "grep")]));
    assert_eq!(e.operation, Operation::ExecuteTool);
    assert!(!e.operation.is_billed());
}

#[test]
fn tool_arguments_are_hashed_in_canonical_form() {
    let args = |a: &str| {
        one(
            svc(),
            span(
                "t",
                vec![
                    s("gen_ai.tool.name", "search"),
                    s("gen_ai.tool.call.arguments", a),
                ],
            ),
        )
        .tool_args_hash
    };
    assert_eq!(
        args(r#"{"q":"rust","n":5}"#),
        args(r#"{ "n": 5,  "q": "rust" }"#)
    );
    assert_ne!(args(r#"{"q":"rust"}"#), args(r#"{"q":"go"}"#));
    assert_eq!(args("not json"), args("not json"), "anything else as it is");
    assert!(
        one(svc(), span("t", vec![s("gen_ai.tool.name", "x")]))
            .tool_args_hash
            .is_none()
    );
}

#[test]
fn errors_from_status_or_error_type() {
    let mut sp = span("chat gpt-4o", vec![s("gen_ai.operation.name", "chat")]);
    sp.status = Some(Status {
        code: 2,
        message: "boom".into(),
    });
    assert!(one(svc(), sp).error);
    let e = one(
        svc(),
        span(
            "chat gpt-4o",
            vec![
                s("gen_ai.operation.name", "chat"),
                s("error.type", "rate_limit_exceeded"),
            ],
        ),
    );
    assert!(e.error);
    assert_eq!(e.error_type.as_deref(), Some("rate_limit_exceeded"));
}

#[test]
fn task_roots() {
    // The worker SDK's CONSUMER process span.
    let mut sp = span("process fleet.work.code", vec![s("fleet.task.id", "t-1")]);
    sp.kind = 5;
    let e = one(svc(), sp);
    assert!(e.task_root);
    assert_eq!(e.task_id.as_deref(), Some("t-1"));
    // A root invoke_agent span from an agent framework.
    let mut sp = span(
        "invoke_agent researcher",
        vec![
            s("gen_ai.operation.name", "invoke_agent"),
            s("gen_ai.agent.name", "researcher"),
        ],
    );
    sp.parent_span_id = vec![];
    let e = one(svc(), sp);
    assert!(e.task_root);
    assert_eq!(e.operation, Operation::InvokeAgent);
    // A nested agent is a step, not a run.
    let e = one(
        svc(),
        span(
            "invoke_agent helper",
            vec![s("gen_ai.operation.name", "invoke_agent")],
        ),
    );
    assert!(!e.task_root);
    // An explicit marker.
    let e = one(
        svc(),
        span(
            "run",
            vec![
                KeyValue {
                    key: "fleet.task.root".into(),
                    value: Some(AnyValue {
                        value: Some(Value::BoolValue(true)),
                    }),
                    ..Default::default()
                },
                d("fleet.task.expected_duration_s", 30.0),
            ],
        ),
    );
    assert!(e.task_root);
    assert_eq!(e.expected_duration_s, Some(30.0));
}

#[test]
fn identity_precedence() {
    let res = vec![
        s("service.name", "agents"),
        s("service.instance.id", "pod-7"),
        s("fleet.pool", "code"),
        s("service.version", "1.4.2"),
    ];
    // Resource: the service instance (name@instance) beats the bare service name.
    let e = one(res.clone(), span("chat", vec![]));
    assert_eq!(e.identity.worker_id, "agents@pod-7");
    assert_eq!(e.identity.pool.as_deref(), Some("code"));
    assert_eq!(e.identity.version.as_deref(), Some("1.4.2"));
    assert_eq!(e.identity.agent_name, None);
    assert_eq!(e.identity.service.as_deref(), Some("agents"));
    // fleet.worker.id on the resource beats everything on the resource.
    let mut r2 = res.clone();
    r2.push(s("fleet.worker.id", "w-1"));
    assert_eq!(one(r2, span("chat", vec![])).identity.worker_id, "w-1");
    // A span's gen_ai.agent.id names the worker; the resource fills the pool.
    let e = one(
        res.clone(),
        span(
            "invoke_agent",
            vec![
                s("gen_ai.agent.id", "asst_123"),
                s("gen_ai.agent.name", "planner"),
            ],
        ),
    );
    assert_eq!(e.identity.worker_id, "asst_123");
    assert_eq!(e.identity.agent_name.as_deref(), Some("planner"));
    assert_eq!(e.identity.pool.as_deref(), Some("code"));
    // Only service.name: that is the worker.
    assert_eq!(
        one(svc(), span("chat", vec![])).identity.worker_id,
        "support-bot"
    );
    // Nothing at all.
    assert_eq!(
        one(vec![], span("chat", vec![])).identity.worker_id,
        "unknown_service"
    );
}

#[test]
fn attribution_from_span_baggage_and_resource() {
    let res = vec![
        s("service.name", "x"),
        s("fleet.team", "platform"),
        s("tenant.id", "acme"),
    ];
    // Baggage entries copied onto spans arrive under their plain keys.
    let e = one(
        res,
        span(
            "chat",
            vec![
                s("team", "search"),
                s("feature", "autocomplete"),
                s("user_tier", "pro"),
                s("prompt_variant", "b"),
                s("task_type", "summarisation"),
            ],
        ),
    );
    assert_eq!(
        e.dims,
        Dims {
            team: Some("search".into()),
            feature: Some("autocomplete".into()),
            user_tier: Some("pro".into()),
            prompt_variant: Some("b".into()),
            task_type: Some("summarisation".into()),
            tenant: Some("acme".into()),
        }
    );
}

#[test]
fn spans_missing_ids_are_rejected_and_counted_the_rest_kept() {
    let good = span("chat", vec![]);
    let mut no_trace = span("no-trace", vec![]);
    no_trace.trace_id = vec![];
    let mut zero_span = span("zero-span", vec![]);
    zero_span.span_id = vec![0; 8];
    let mut short = span("short", vec![]);
    short.trace_id = vec![1; 8];
    let (out, rej) = spans(&export(svc(), vec![no_trace, good, zero_span, short]));
    assert_eq!(out.len(), 1);
    assert_eq!(rej.count, 3);
    let msg = rej.message();
    assert!(
        msg.starts_with("3 rejected; first: span \"no-trace\": trace_id"),
        "{msg}"
    );
}

/// A metrics export of worker `w-9` holding `metric_list`.
fn metrics_of_w9(metric_list: Vec<Metric>) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![s("fleet.worker.id", "w-9")],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: metric_list,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn hist_point(attrs: Vec<KeyValue>, sum: f64, count: u64) -> HistogramDataPoint {
    HistogramDataPoint {
        attributes: attrs,
        start_time_unix_nano: 1,
        time_unix_nano: 2,
        count,
        sum: Some(sum),
        ..Default::default()
    }
}

#[test]
fn genai_metrics_old_and_new() {
    let metric_list = vec![
        Metric {
            name: "gen_ai.client.token.usage".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: vec![
                    hist_point(
                        vec![
                            s("gen_ai.token.type", "input"),
                            s("gen_ai.request.model", "gpt-4o"),
                        ],
                        1000.0,
                        4,
                    ),
                    hist_point(
                        vec![
                            s("gen_ai.token.type", "output"),
                            s("gen_ai.request.model", "gpt-4o"),
                        ],
                        200.0,
                        4,
                    ),
                ],
                aggregation_temporality: 2,
            })),
            ..Default::default()
        },
        Metric {
            name: "gen_ai.client.operation.duration".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: vec![hist_point(
                    vec![
                        s("gen_ai.request.model", "gpt-4o"),
                        s("error.type", "timeout"),
                    ],
                    3.5,
                    2,
                )],
                aggregation_temporality: 1,
            })),
            ..Default::default()
        },
        Metric {
            name: "gen_ai.client.inference.usage.cache_read.input_tokens".into(),
            data: Some(metric::Data::Sum(Sum {
                data_points: vec![NumberDataPoint {
                    value: Some(number_data_point::Value::AsInt(77)),
                    ..Default::default()
                }],
                aggregation_temporality: 1,
                is_monotonic: true,
            })),
            ..Default::default()
        },
        Metric {
            name: "http.server.request.duration".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: vec![hist_point(vec![], 1.0, 1)],
                aggregation_temporality: 2,
            })),
            ..Default::default()
        },
    ];
    let req = metrics_of_w9(metric_list);
    let (points, total, _) = metrics(req);
    assert_eq!(total, 5);
    assert_eq!(points.len(), 4);
    assert_eq!(points[0].kind, MetricKind::InputTokens);
    assert!(points[0].cumulative);
    assert_eq!(points[0].value, 1000.0);
    assert_eq!(points[0].identity.worker_id, "w-9");
    assert_eq!(points[1].kind, MetricKind::OutputTokens);
    assert_ne!(points[0].series, points[1].series);
    assert_eq!(points[2].kind, MetricKind::OperationDuration);
    assert!(points[2].error && !points[2].cumulative);
    assert_eq!(points[2].count, 2);
    assert_eq!(points[3].kind, MetricKind::CacheReadTokens);
    assert_eq!(points[3].value, 77.0);
}

/// A token count no call can have is refused before it reaches any sum: the span (with
/// its reason), or the metric point. Counts at the limit are read.
#[test]
fn token_counts_out_of_range_are_refused_with_the_span_or_point() {
    let max = MAX_TOKENS_PER_REPORT as i64;
    let chat = |name: &str, key: &str, n: i64| {
        span(
            name,
            vec![
                s("gen_ai.operation.name", "chat"),
                s("gen_ai.request.model", "gpt-4o"),
                i(key, n),
            ],
        )
    };
    let (out, rej) = spans(&export(
        svc(),
        vec![
            chat("at the limit", "gen_ai.usage.input_tokens", max),
            chat("huge", "gen_ai.usage.input_tokens", i64::MAX),
            chat("one over", "gen_ai.usage.output_tokens", max + 1),
        ],
    ));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].usage.map(|u| u.input), Some(MAX_TOKENS_PER_REPORT));
    assert_eq!(rej.count, 2, "{rej:?}");
    assert_eq!(
        rej.first_reason.as_deref(),
        Some(
            "span \"huge\": gen_ai.usage.input_tokens 9223372036854775807 is out of range (at most 1000000000 tokens)"
        )
    );

    let sum = |value: f64, temporality: i32| Metric {
        name: "gen_ai.client.inference.usage.input_tokens".into(),
        data: Some(metric::Data::Sum(Sum {
            data_points: vec![NumberDataPoint {
                value: Some(number_data_point::Value::AsDouble(value)),
                ..Default::default()
            }],
            aggregation_temporality: temporality,
            is_monotonic: true,
        })),
        ..Default::default()
    };
    let (cumulative, delta) = (2, 1);
    let metric_list = vec![
        sum(1e308, cumulative),
        sum(f64::NAN, cumulative),
        sum(-5.0, delta),
        sum(MAX_TOKENS_PER_REPORT as f64 + 1.0, delta),
        sum(MAX_TOKENS_PER_REPORT as f64, delta),
        sum(5e12, cumulative),
        Metric {
            name: "gen_ai.client.token.usage".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: vec![hist_point(
                    vec![s("gen_ai.token.type", "output")],
                    f64::INFINITY,
                    1,
                )],
                aggregation_temporality: cumulative,
            })),
            ..Default::default()
        },
    ];
    let req = metrics_of_w9(metric_list);
    let (points, total, rej) = metrics(req);
    assert_eq!(total, 7);
    let values: Vec<f64> = points.iter().map(|p| p.value).collect();
    assert_eq!(values, [MAX_TOKENS_PER_REPORT as f64, 5e12], "{rej:?}");
    assert_eq!(rej.count, 5, "{rej:?}");
    assert!(
        rej.first_reason
            .as_deref()
            .is_some_and(|r| r.contains("1e308 tokens is out of range")),
        "{rej:?}"
    );
}
