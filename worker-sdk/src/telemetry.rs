//! GenAI spans for what a handler does: LLM calls and tool calls, as children of the
//! worker's process span, with the current OpenTelemetry GenAI attribute names.
//!
//! A handler reports each call through [`TaskTelemetry`] (on its [`crate::TaskContext`]);
//! the worker batches the spans to the commander with everything else it emits. A handler
//! that reports nothing still gets a task span, and an LLM span summarising the usage it
//! returned in its result.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::span::{AttrValue, SpanExporter, SpanKind, SpanRecord};
use crate::trace::{SpanId, TraceId};

/// One LLM call, as the handler saw it.
#[derive(Clone, Debug)]
pub struct LlmCall {
    /// `gen_ai.provider.name`: `openai`, `anthropic`, `gcp.gemini` …
    pub provider: String,
    /// The model requested.
    pub model: String,
    /// The model that answered, when the provider says.
    pub response_model: Option<String>,
    /// `chat` (default), `text_completion`, `generate_content` or `embeddings`.
    pub operation: String,
    /// All input tokens, cached ones included.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Input tokens read from the provider's cache.
    pub cache_read_tokens: u64,
    /// Input tokens written to the provider's cache.
    pub cache_write_tokens: u64,
    pub started: SystemTime,
    pub finished: SystemTime,
    /// `error.type` when the call failed.
    pub error: Option<String>,
}

impl LlmCall {
    /// A chat call that started now; set the counts and call [`LlmCall::finish`].
    pub fn chat(provider: impl Into<String>, model: impl Into<String>) -> Self {
        let now = SystemTime::now();
        Self {
            provider: provider.into(),
            model: model.into(),
            response_model: None,
            operation: "chat".into(),
            input_tokens: 0,
            output_tokens: 0,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            started: now,
            finished: now,
            error: None,
        }
    }

    pub fn tokens(mut self, input: u64, output: u64) -> Self {
        self.input_tokens = input;
        self.output_tokens = output;
        self
    }

    pub fn finish(mut self) -> Self {
        self.finished = SystemTime::now();
        self
    }
}

/// One tool call.
#[derive(Clone, Debug)]
pub struct ToolCall {
    pub name: String,
    /// `gen_ai.tool.call.id`, e.g. `call_…`.
    pub call_id: Option<String>,
    /// `gen_ai.tool.call.arguments` (JSON, as the model wrote it). The commander hashes
    /// it to see the same call made again and again in one run (a tool loop); it is
    /// opt-in in the semantic conventions because it can hold user data.
    pub arguments: Option<String>,
    pub started: SystemTime,
    pub finished: SystemTime,
    pub error: Option<String>,
}

impl ToolCall {
    pub fn new(name: impl Into<String>) -> Self {
        let now = SystemTime::now();
        Self {
            name: name.into(),
            call_id: None,
            arguments: None,
            started: now,
            finished: now,
            error: None,
        }
    }

    pub fn finish(mut self) -> Self {
        self.finished = SystemTime::now();
        self
    }

    pub fn arguments(mut self, json: impl Into<String>) -> Self {
        self.arguments = Some(json.into());
        self
    }
}

/// What the handler reported so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallTotals {
    pub llm_calls: u64,
    pub tool_calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Records a task's LLM and tool calls as spans under its process span.
#[derive(Clone, Debug)]
pub struct TaskTelemetry {
    exporter: Option<SpanExporter>,
    trace_id: TraceId,
    parent: SpanId,
    /// Put on every span: task id, type, expected duration, pool, worker, baggage.
    common: Arc<Vec<(String, AttrValue)>>,
    totals: Arc<Mutex<CallTotals>>,
}

impl TaskTelemetry {
    pub(crate) fn new(
        exporter: SpanExporter,
        trace_id: TraceId,
        parent: SpanId,
        common: Vec<(String, AttrValue)>,
    ) -> Self {
        Self {
            exporter: Some(exporter),
            trace_id,
            parent,
            common: Arc::new(common),
            totals: Arc::new(Mutex::new(CallTotals::default())),
        }
    }

    /// A recorder that records nothing (for handlers run outside a worker, e.g. in tests).
    pub fn disabled() -> Self {
        Self {
            exporter: None,
            trace_id: TraceId([0; 16]),
            parent: SpanId([0; 8]),
            common: Arc::new(Vec::new()),
            totals: Arc::new(Mutex::new(CallTotals::default())),
        }
    }

    fn span(&self, name: String, kind: SpanKind) -> SpanRecord {
        let mut s = SpanRecord::new(name, kind, self.trace_id, SpanId::random());
        s.parent_span_id = Some(self.parent);
        for (k, v) in self.common.iter() {
            s.attributes.push((k.clone(), v.clone()));
        }
        s
    }

    /// Records an LLM call span (`chat gpt-4o`, kind CLIENT).
    pub fn llm_call(&self, call: &LlmCall) {
        if let Ok(mut t) = self.totals.lock() {
            t.llm_calls += 1;
            t.input_tokens += call.input_tokens;
            t.output_tokens += call.output_tokens;
        }
        let Some(exporter) = &self.exporter else {
            return;
        };
        let mut s = self.span(
            format!("{} {}", call.operation, call.model),
            SpanKind::Client,
        );
        s.start = call.started;
        s.end = call.finished.max(call.started);
        s.attr("gen_ai.operation.name", call.operation.clone())
            .attr("gen_ai.provider.name", call.provider.clone())
            .attr("gen_ai.request.model", call.model.clone())
            .attr("gen_ai.usage.input_tokens", call.input_tokens as i64)
            .attr("gen_ai.usage.output_tokens", call.output_tokens as i64);
        if let Some(m) = &call.response_model {
            s.attr("gen_ai.response.model", m.clone());
        }
        if call.cache_read_tokens > 0 {
            s.attr(
                "gen_ai.usage.cache_read.input_tokens",
                call.cache_read_tokens as i64,
            );
        }
        if call.cache_write_tokens > 0 {
            s.attr(
                "gen_ai.usage.cache_creation.input_tokens",
                call.cache_write_tokens as i64,
            );
        }
        if let Some(e) = &call.error {
            s.attr("error.type", e.clone());
            s.error = Some(e.clone());
        }
        exporter.record(s);
    }

    /// Records a tool call span (`execute_tool web_search`, kind INTERNAL).
    pub fn tool_call(&self, call: &ToolCall) {
        if let Ok(mut t) = self.totals.lock() {
            t.tool_calls += 1;
        }
        let Some(exporter) = &self.exporter else {
            return;
        };
        let mut s = self.span(format!("execute_tool {}", call.name), SpanKind::Internal);
        s.start = call.started;
        s.end = call.finished.max(call.started);
        s.attr("gen_ai.operation.name", "execute_tool")
            .attr("gen_ai.tool.name", call.name.clone())
            .attr("gen_ai.tool.type", "function");
        if let Some(id) = &call.call_id {
            s.attr("gen_ai.tool.call.id", id.clone());
        }
        if let Some(args) = &call.arguments {
            s.attr("gen_ai.tool.call.arguments", args.clone());
        }
        if let Some(e) = &call.error {
            s.attr("error.type", e.clone());
            s.error = Some(e.clone());
        }
        exporter.record(s);
    }

    pub fn totals(&self) -> CallTotals {
        self.totals.lock().map(|t| *t).unwrap_or_default()
    }
}
