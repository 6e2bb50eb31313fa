//! OTLP → one internal event per span or metric point.
//!
//! The GenAI conventions are experimental and senders emit several generations of names
//! at once, so every current and older name in STANDARDS.md B.1.9 is accepted here and
//! nothing downstream sees the difference. Spans are read from [`wire`]'s form of the
//! export, whose strings are slices of the request body: this runs once per span on the
//! hot path, and only the few strings an event keeps are copied.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{AggregationTemporality, metric};

use crate::domain::{MAX_CUMULATIVE_TOKENS, MAX_TOKENS_PER_REPORT};

pub mod wire;

pub use crate::domain::{
    Dims, Identity, MetricKind, MetricPoint, Operation, SpanEvent, TokenUsage,
};

impl Operation {
    fn parse(v: &str) -> Self {
        match v {
            "chat" | "text_completion" | "generate_content" | "completion" => Self::Inference,
            "embeddings" => Self::Embeddings,
            "execute_tool" => Self::ExecuteTool,
            "invoke_agent" | "create_agent" | "handle_conversation_turn" => Self::InvokeAgent,
            "invoke_workflow" => Self::InvokeWorkflow,
            _ => Self::OtherGenAi,
        }
    }

    /// Spans whose tokens are billed: LLM calls. Agent and workflow spans often repeat
    /// their children's totals, so counting them too would double the cost.
    pub fn is_billed(self) -> bool {
        matches!(self, Self::Inference | Self::Embeddings)
    }
}

impl Dims {
    fn fill_from(&mut self, other: &Dims) {
        for (mine, theirs) in [
            (&mut self.team, &other.team),
            (&mut self.feature, &other.feature),
            (&mut self.user_tier, &other.user_tier),
            (&mut self.prompt_variant, &other.prompt_variant),
            (&mut self.task_type, &other.task_type),
            (&mut self.tenant, &other.tenant),
        ] {
            if mine.is_none() {
                mine.clone_from(theirs);
            }
        }
    }

    /// Sets a dimension from an attribute, if its key names one.
    fn take(&mut self, kv: &mut impl Attribute) -> bool {
        use crate::domain::{Attribution, attribution_of_key};
        let slot = match attribution_of_key(kv.key()) {
            Some(Attribution::Team) => &mut self.team,
            Some(Attribution::Feature) => &mut self.feature,
            Some(Attribution::UserTier) => &mut self.user_tier,
            Some(Attribution::PromptVariant) => &mut self.prompt_variant,
            Some(Attribution::TaskType) => &mut self.task_type,
            Some(Attribution::Tenant) => &mut self.tenant,
            Some(Attribution::Producer) | None => return false,
        };
        if slot.is_none() {
            *slot = kv.text();
        }
        true
    }
}

/// Spans refused and why (OTLP `partial_success`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rejections {
    pub count: u64,
    pub first_reason: Option<String>,
}

impl Rejections {
    fn add(&mut self, reason: impl FnOnce() -> String) {
        self.count += 1;
        if self.first_reason.is_none() {
            self.first_reason = Some(reason());
        }
    }

    pub fn message(&self) -> String {
        match &self.first_reason {
            Some(r) if self.count > 1 => format!("{} rejected; first: {r}", self.count),
            Some(r) => r.clone(),
            None => String::new(),
        }
    }
}

/// An attribute in either form the normaliser reads: a span's ([`wire`], its strings
/// slices of the body) or a metric resource's (the generated types, whose strings are
/// moved out: the request is dropped afterwards).
trait Attribute {
    fn key(&self) -> &str;
    /// The value as text (a string, or a number or bool written out).
    fn text(&mut self) -> Option<String>;
}

impl Attribute for &wire::KeyValue<'_> {
    fn key(&self) -> &str {
        self.key
    }

    fn text(&mut self) -> Option<String> {
        text(self.value)
    }
}

impl Attribute for &mut KeyValue {
    fn key(&self) -> &str {
        &self.key
    }

    fn text(&mut self) -> Option<String> {
        match self.value.as_mut()?.value.as_mut()? {
            any_value::Value::StringValue(s) => Some(std::mem::take(s)),
            any_value::Value::IntValue(i) => Some(i.to_string()),
            any_value::Value::DoubleValue(d) => Some(d.to_string()),
            any_value::Value::BoolValue(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

/// A value as text, copied out of the body.
fn text(v: Option<wire::Value<'_>>) -> Option<String> {
    match v? {
        wire::Value::Str(s) => Some(s.to_owned()),
        wire::Value::Int(i) => Some(i.to_string()),
        wire::Value::Double(d) => Some(d.to_string()),
        wire::Value::Bool(b) => Some(b.to_string()),
        wire::Value::Other => None,
    }
}

/// A string value, borrowed (for values only parsed or hashed).
fn str_of(v: Option<wire::Value<'_>>) -> Option<&str> {
    match v? {
        wire::Value::Str(s) => Some(s),
        _ => None,
    }
}

fn int_of(v: Option<wire::Value<'_>>) -> Option<u64> {
    match v? {
        wire::Value::Int(i) => u64::try_from(i).ok(),
        wire::Value::Double(d) if d >= 0.0 && d.is_finite() => Some(d as u64),
        wire::Value::Str(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn float_of(v: Option<wire::Value<'_>>) -> Option<f64> {
    match v? {
        wire::Value::Int(i) => Some(i as f64),
        wire::Value::Double(d) => Some(d),
        wire::Value::Str(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn bool_of(v: Option<wire::Value<'_>>) -> bool {
    match v {
        Some(wire::Value::Bool(b)) => b,
        Some(wire::Value::Str(s)) => s == "true",
        _ => false,
    }
}

/// Maps old provider names (`gen_ai.system` values) to the current ones.
fn provider_name(v: String) -> String {
    match v.as_str() {
        "vertex_ai" => "gcp.vertex_ai".into(),
        "gemini" => "gcp.gemini".into(),
        "az.ai.inference" => "azure.ai.inference".into(),
        "az.ai.openai" => "azure.ai.openai".into(),
        "xai" => "x_ai".into(),
        _ => v,
    }
}

/// Identity fields found in one attribute list, before precedence is applied.
#[derive(Clone, Default)]
struct IdentityParts {
    fleet_worker: Option<String>,
    agent_id: Option<String>,
    instance: Option<String>,
    agent_name: Option<String>,
    service: Option<String>,
    pool: Option<String>,
    version: Option<String>,
}

impl IdentityParts {
    fn take(&mut self, kv: &mut impl Attribute) -> bool {
        let slot = match kv.key() {
            "fleet.worker.id" => &mut self.fleet_worker,
            "gen_ai.agent.id" => &mut self.agent_id,
            "service.instance.id" => &mut self.instance,
            "gen_ai.agent.name" => &mut self.agent_name,
            "service.name" => &mut self.service,
            "fleet.pool" => &mut self.pool,
            "gen_ai.agent.version" | "service.version" => &mut self.version,
            _ => return false,
        };
        if slot.is_none() {
            *slot = kv.text();
        }
        true
    }

    fn resolve(self) -> Identity {
        // An OpenTelemetry service instance is (service.name, service.instance.id); SDKs
        // give every process its own instance id, shared by all its services.
        let instance = match (&self.service, &self.instance) {
            (Some(s), Some(i)) => Some(format!("{s}@{i}")),
            (None, Some(i)) => Some(i.clone()),
            _ => None,
        };
        let worker_id = self
            .fleet_worker
            .clone()
            .or_else(|| self.agent_id.clone())
            .or(instance)
            .or_else(|| self.agent_name.clone())
            .or_else(|| self.service.clone())
            .unwrap_or_else(|| "unknown_service".into());
        Identity {
            worker_id,
            pool: self.pool,
            agent_name: self.agent_name,
            version: self.version,
            service: self.service,
        }
    }
}

struct ResourceInfo {
    identity: Arc<Identity>,
    dims: Dims,
    /// The resource's identity fields, for span-level overrides.
    raw: IdentityParts,
}

fn resource_info(attrs: impl IntoIterator<Item = impl Attribute>) -> ResourceInfo {
    let mut parts = IdentityParts::default();
    let mut dims = Dims::default();
    for mut kv in attrs {
        if !parts.take(&mut kv) {
            dims.take(&mut kv);
        }
    }
    let raw = parts.clone();
    ResourceInfo {
        identity: Arc::new(parts.resolve()),
        dims,
        raw,
    }
}

fn id16(b: &[u8]) -> Option<[u8; 16]> {
    let a: [u8; 16] = b.try_into().ok()?;
    (a != [0; 16]).then_some(a)
}

fn id8(b: &[u8]) -> Option<[u8; 8]> {
    let a: [u8; 8] = b.try_into().ok()?;
    (a != [0; 8]).then_some(a)
}

const SPAN_KIND_CONSUMER: i32 = 5;
const STATUS_CODE_ERROR: i32 = 2;

/// Normalises every span of a trace export (as [`wire::TraceRequest::parse`] reads it
/// from the body). Spans without a valid trace or span id are rejected and counted; the
/// rest are returned.
pub fn span_events(req: &wire::TraceRequest<'_>) -> (Vec<SpanEvent>, Rejections) {
    let mut out = Vec::new();
    let mut rejected = Rejections::default();
    for rs in &req.resource_spans {
        let res = resource_info(&rs.resource);
        for ss in &rs.scope_spans {
            out.reserve(ss.spans.len());
            for span in &ss.spans {
                let Some(trace_id) = id16(span.trace_id) else {
                    rejected.add(|| {
                        format!(
                            "span {:?}: trace_id must be 16 bytes and not all zero (got {})",
                            span.name,
                            span.trace_id.len()
                        )
                    });
                    continue;
                };
                let Some(span_id) = id8(span.span_id) else {
                    rejected.add(|| {
                        format!(
                            "span {:?}: span_id must be 8 bytes and not all zero (got {})",
                            span.name,
                            span.span_id.len()
                        )
                    });
                    continue;
                };
                match one_span(&res, trace_id, span_id, span) {
                    Ok(ev) => out.push(ev),
                    Err(why) => rejected.add(|| why),
                }
            }
        }
    }
    (out, rejected)
}

/// [`span_events`] of an export in the generated types (the trace view, tests), read
/// through the same form.
pub fn spans(req: &ExportTraceServiceRequest) -> (Vec<SpanEvent>, Rejections) {
    use prost::Message;
    let body = req.encode_to_vec();
    // What prost encodes, prost reads, and so does `wire`: a generated message holds only
    // valid UTF-8 and well-formed fields. Nothing is the answer all the same if not.
    match wire::TraceRequest::parse(&body) {
        Ok(r) => span_events(&r),
        Err(_) => Default::default(),
    }
}

/// What a span's own attributes say, read in one pass.
#[derive(Default)]
struct SpanAttrs {
    parts: IdentityParts,
    dims: Dims,
    operation: Operation,
    provider: Option<String>,
    old_provider: Option<String>,
    request_model: Option<String>,
    response_model: Option<String>,
    usage: TokenUsage,
    any_usage: bool,
    tool: Option<String>,
    /// `gen_ai.tool.call.arguments`, hashed in canonical form.
    tool_args: Option<u64>,
    task_id: Option<String>,
    expected: Option<f64>,
    error_type: Option<String>,
    root_flag: bool,
    /// The first token count over [`MAX_TOKENS_PER_REPORT`], as `key value`: the span is
    /// refused.
    out_of_range: Option<String>,
}

impl SpanAttrs {
    /// Every GenAI name generation, the fleet's own keys, identity and attribution.
    fn read(attributes: &[wire::KeyValue<'_>]) -> Self {
        let mut a = SpanAttrs::default();
        for kv in attributes {
            let v = kv.value;
            match kv.key {
                "gen_ai.operation.name" => {
                    if let Some(v) = str_of(v) {
                        a.operation = Operation::parse(v);
                    }
                }
                "gen_ai.provider.name" => a.provider = text(v),
                "gen_ai.system" => a.old_provider = text(v),
                "gen_ai.request.model" => a.request_model = text(v),
                "gen_ai.response.model" => a.response_model = text(v),
                "gen_ai.usage.input_tokens" | "gen_ai.usage.prompt_tokens" => {
                    a.count(kv.key, v, |u, n| u.input = n);
                }
                "gen_ai.usage.output_tokens" | "gen_ai.usage.completion_tokens" => {
                    a.count(kv.key, v, |u, n| u.output = n);
                }
                "gen_ai.usage.cache_read.input_tokens" | "gen_ai.usage.cache_read_input_tokens" => {
                    a.count(kv.key, v, |u, n| u.cache_read = n);
                }
                "gen_ai.usage.cache_write.input_tokens"
                | "gen_ai.usage.cache_creation.input_tokens"
                | "gen_ai.usage.cache_creation_input_tokens" => {
                    a.count(kv.key, v, |u, n| u.cache_write = n);
                }
                "gen_ai.tool.name" => a.tool = text(v),
                "gen_ai.tool.call.arguments" => {
                    a.tool_args = str_of(v).map(crate::domain::arguments_hash);
                }
                "fleet.task.id" => a.task_id = text(v),
                "fleet.task.expected_duration_s" => a.expected = float_of(v),
                "fleet.task.root" => a.root_flag = bool_of(v),
                "error.type" => a.error_type = text(v),
                _ => {
                    let mut kv = kv;
                    if !a.parts.take(&mut kv) {
                        a.dims.take(&mut kv);
                    }
                }
            }
        }
        a
    }

    fn count(
        &mut self,
        key: &str,
        v: Option<wire::Value<'_>>,
        set: impl FnOnce(&mut TokenUsage, u64),
    ) {
        match int_of(v) {
            Some(n) if n > MAX_TOKENS_PER_REPORT => {
                self.out_of_range
                    .get_or_insert_with(|| format!("{key} {n}"));
            }
            Some(n) => {
                set(&mut self.usage, n);
                self.any_usage = true;
            }
            None => {}
        }
    }
}

/// Who a span is about: the resource's identity, shared without allocating, unless the
/// span names a worker of its own. A span's agent name changes who the worker is only when
/// the resource names no worker, agent id or instance; otherwise it is just the agent's
/// display name. Returns the identity, the span's agent name, and whether it names one.
fn span_identity(
    res: &ResourceInfo,
    parts: IdentityParts,
) -> (Arc<Identity>, Option<String>, bool) {
    let r = &res.raw;
    let names_worker = parts.fleet_worker.is_some()
        || parts.agent_id.is_some()
        || (parts.pool.is_some() && parts.pool != r.pool)
        || (parts.agent_name.is_some()
            && r.fleet_worker.is_none()
            && r.agent_id.is_none()
            && r.instance.is_none());
    if !names_worker {
        return (res.identity.clone(), parts.agent_name, false);
    }
    let span_agent_name = parts.agent_name.clone();
    // The span says who it is: the span's own fields win, the resource fills gaps.
    let merged = IdentityParts {
        fleet_worker: parts.fleet_worker.or_else(|| r.fleet_worker.clone()),
        agent_id: parts.agent_id.or_else(|| r.agent_id.clone()),
        instance: r.instance.clone(),
        agent_name: parts.agent_name.or_else(|| r.agent_name.clone()),
        service: r.service.clone(),
        pool: parts.pool.or_else(|| r.pool.clone()),
        version: parts.version.or_else(|| r.version.clone()),
    };
    let id = merged.resolve();
    let identity = if id == *res.identity {
        res.identity.clone()
    } else {
        Arc::new(id)
    };
    (identity, span_agent_name, true)
}

/// A span as an event, or why it is refused.
fn one_span(
    res: &ResourceInfo,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    span: &wire::Span<'_>,
) -> Result<SpanEvent, String> {
    let SpanAttrs {
        parts,
        mut dims,
        mut operation,
        provider,
        old_provider,
        request_model,
        response_model,
        usage,
        any_usage,
        tool,
        tool_args,
        task_id,
        expected,
        error_type,
        root_flag,
        out_of_range,
    } = SpanAttrs::read(&span.attributes);
    if let Some(what) = out_of_range {
        return Err(format!(
            "span {:?}: {what} is out of range (at most {MAX_TOKENS_PER_REPORT} tokens)",
            span.name
        ));
    }
    // A tool span that forgot its operation name is still a tool call.
    if operation == Operation::None && tool.is_some() {
        operation = Operation::ExecuteTool;
    }
    // Old instrumentations set only the model and token counts. A task's root span with
    // totals is not a call (its calls are its children).
    let consumer_task = span.kind == SPAN_KIND_CONSUMER && task_id.is_some();
    if operation == Operation::None
        && any_usage
        && !root_flag
        && !consumer_task
        && (request_model.is_some() || response_model.is_some())
    {
        operation = Operation::Inference;
    }
    let status_error = span.status_code == STATUS_CODE_ERROR;
    let parent_span_id = id8(span.parent_span_id);
    let task_root = root_flag
        || consumer_task
        || (parent_span_id.is_none()
            && matches!(
                operation,
                Operation::InvokeAgent | Operation::InvokeWorkflow
            ));
    let (identity, span_agent_name, names_worker) = span_identity(res, parts);
    dims.fill_from(&res.dims);
    let r = &res.raw;
    Ok(SpanEvent {
        identity,
        agent_name: span_agent_name,
        trace_id,
        span_id,
        parent_span_id,
        start_ns: span.start_time_unix_nano,
        end_ns: span.end_time_unix_nano.max(span.start_time_unix_nano),
        error: status_error || error_type.is_some(),
        error_type,
        operation,
        provider: provider.or(old_provider.map(provider_name)),
        model: response_model.or(request_model),
        usage: any_usage.then_some(usage),
        tool,
        tool_args_hash: tool_args,
        task_id,
        expected_duration_s: expected.filter(|d| d.is_finite() && *d > 0.0),
        task_root,
        dims,
        names_agent: names_worker,
        resource: res.identity.clone(),
        resource_names_worker: r.fleet_worker.is_some() || r.agent_id.is_some(),
    })
}

fn series_key(metric: &str, attrs: &[KeyValue]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    metric.hash(&mut h);
    for kv in attrs {
        kv.key.hash(&mut h);
        if let Some(v) = kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            match v {
                any_value::Value::StringValue(s) => s.hash(&mut h),
                any_value::Value::IntValue(i) => i.hash(&mut h),
                any_value::Value::BoolValue(b) => b.hash(&mut h),
                any_value::Value::DoubleValue(d) => d.to_bits().hash(&mut h),
                _ => {}
            }
        }
    }
    h.finish()
}

struct PointAttrs {
    token_type: Option<String>,
    model: Option<String>,
    error: bool,
}

fn point_attrs(attrs: &[KeyValue]) -> PointAttrs {
    let mut p = PointAttrs {
        token_type: None,
        model: None,
        error: false,
    };
    let mut request_model = None;
    for kv in attrs {
        let s = || match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        };
        match kv.key.as_str() {
            "gen_ai.token.type" => p.token_type = s(),
            "gen_ai.response.model" => p.model = s(),
            "gen_ai.request.model" => request_model = s(),
            "error.type" => p.error = true,
            _ => {}
        }
    }
    if p.model.is_none() {
        p.model = request_model;
    }
    p
}

/// Normalises the GenAI metrics of a metrics export: `gen_ai.client.token.usage` and
/// `gen_ai.client.operation.duration`, and the newer per-kind token counters and
/// `gen_ai.client.inference.duration`. Other metrics are counted by the caller as accepted
/// and otherwise ignored.
///
/// Returns the points, how many points the export held, and the points refused: a token
/// count that is negative, not a number, or over [`MAX_TOKENS_PER_REPORT`] (a delta) or
/// [`MAX_CUMULATIVE_TOKENS`] (a cumulative total).
pub fn metrics(req: ExportMetricsServiceRequest) -> (Vec<MetricPoint>, u64, Rejections) {
    let mut out = Vec::new();
    let mut total_points = 0u64;
    let mut rejected = Rejections::default();
    for rm in req.resource_metrics {
        let mut rm = rm;
        let res = resource_info(rm.resource.iter_mut().flat_map(|r| &mut r.attributes));
        for sm in rm.scope_metrics {
            for m in sm.metrics {
                let fixed_kind = match m.name.as_str() {
                    "gen_ai.client.token.usage" => None,
                    "gen_ai.client.operation.duration" | "gen_ai.client.inference.duration" => {
                        Some(MetricKind::OperationDuration)
                    }
                    "gen_ai.client.inference.usage.input_tokens" => Some(MetricKind::InputTokens),
                    "gen_ai.client.inference.usage.output_tokens" => Some(MetricKind::OutputTokens),
                    "gen_ai.client.inference.usage.cache_read.input_tokens" => {
                        Some(MetricKind::CacheReadTokens)
                    }
                    "gen_ai.client.inference.usage.cache_write.input_tokens" => {
                        Some(MetricKind::CacheWriteTokens)
                    }
                    _ => {
                        total_points += count_points(&m.data);
                        continue;
                    }
                };
                let name = m.name;
                match m.data {
                    Some(metric::Data::Histogram(h)) => {
                        let cumulative =
                            h.aggregation_temporality == AggregationTemporality::Cumulative as i32;
                        for dp in h.data_points {
                            total_points += 1;
                            let a = point_attrs(&dp.attributes);
                            let kind = match fixed_kind {
                                Some(k) => k,
                                None => match a.token_type.as_deref() {
                                    Some("input") | Some("prompt") => MetricKind::InputTokens,
                                    Some("output") | Some("completion") => MetricKind::OutputTokens,
                                    _ => continue,
                                },
                            };
                            let at = (dp.start_time_unix_nano, dp.time_unix_nano);
                            let sum = dp.sum.unwrap_or(0.0);
                            if let Some(why) = tokens_out_of_range(&name, kind, cumulative, sum) {
                                rejected.add(|| why);
                                continue;
                            }
                            let series = series_key(&name, &dp.attributes);
                            let value = (sum, dp.count);
                            out.push(point(&res, kind, a, series, cumulative, at, value));
                        }
                    }
                    Some(metric::Data::Sum(s)) => {
                        let cumulative =
                            s.aggregation_temporality == AggregationTemporality::Cumulative as i32;
                        for dp in s.data_points {
                            total_points += 1;
                            let Some(kind) = fixed_kind else { continue };
                            let a = point_attrs(&dp.attributes);
                            let value = match dp.value {
                                Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(i)) => i as f64,
                                Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(d)) => d,
                                None => continue,
                            };
                            if let Some(why) = tokens_out_of_range(&name, kind, cumulative, value) {
                                rejected.add(|| why);
                                continue;
                            }
                            let at = (dp.start_time_unix_nano, dp.time_unix_nano);
                            let series = series_key(&name, &dp.attributes);
                            out.push(point(&res, kind, a, series, cumulative, at, (value, 0)));
                        }
                    }
                    other => total_points += count_points(&other),
                }
            }
        }
    }
    (out, total_points, rejected)
}

/// Why a token point cannot be booked, when it cannot: a count is a number from 0 to
/// [`MAX_TOKENS_PER_REPORT`] (a delta point) or [`MAX_CUMULATIVE_TOKENS`] (a cumulative
/// total). Durations are not booked and not checked.
fn tokens_out_of_range(
    name: &str,
    kind: MetricKind,
    cumulative: bool,
    value: f64,
) -> Option<String> {
    if kind == MetricKind::OperationDuration {
        return None;
    }
    let max = match cumulative {
        true => MAX_CUMULATIVE_TOKENS,
        false => MAX_TOKENS_PER_REPORT as f64,
    };
    if value.is_finite() && (0.0..=max).contains(&value) {
        return None;
    }
    // 1e308 written out is 309 digits.
    let shown = match value.abs() < 1e16 {
        true => format!("{value}"),
        false => format!("{value:e}"),
    };
    Some(format!(
        "{name}: {shown} tokens is out of range (0 to {max})"
    ))
}

/// One metric point of `res`: `at` is (start, time) in ns, `value` is (sum, count).
fn point(
    res: &ResourceInfo,
    kind: MetricKind,
    attrs: PointAttrs,
    series: u64,
    cumulative: bool,
    at: (u64, u64),
    value: (f64, u64),
) -> MetricPoint {
    MetricPoint {
        identity: res.identity.clone(),
        kind,
        model: attrs.model,
        series,
        cumulative,
        start_ns: at.0,
        time_ns: at.1,
        value: value.0,
        count: value.1,
        error: attrs.error,
    }
}

fn count_points(data: &Option<metric::Data>) -> u64 {
    match data {
        Some(metric::Data::Gauge(g)) => g.data_points.len() as u64,
        Some(metric::Data::Sum(s)) => s.data_points.len() as u64,
        Some(metric::Data::Histogram(h)) => h.data_points.len() as u64,
        Some(metric::Data::ExponentialHistogram(h)) => h.data_points.len() as u64,
        Some(metric::Data::Summary(s)) => s.data_points.len() as u64,
        None => 0,
    }
}

#[cfg(test)]
mod tests;
