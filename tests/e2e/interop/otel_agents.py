"""Agents instrumented with the Python OpenTelemetry SDK, exporting GenAI spans and metrics
to the commander over OTLP gRPC and OTLP HTTP. Run by tests/e2e/interop.rs.

usage: otel_agents.py GRPC_ENDPOINT HTTP_ENDPOINT
"""

import sys

from opentelemetry import baggage, context, trace
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

grpc_endpoint, http_endpoint = sys.argv[1], sys.argv[2]


class BaggageToAttributes(SpanProcessor):
    """What opentelemetry-processor-baggage does: baggage entries onto every span."""

    def on_start(self, span, parent_context=None):
        for key, value in baggage.get_all(parent_context).items():
            span.set_attribute(key, str(value))


def provider(service, exporter):
    p = TracerProvider(resource=Resource.create({
        "service.name": service,
        "service.version": "2.3.1",
        "fleet.pool": "research",
    }))
    p.add_span_processor(BaggageToAttributes())
    p.add_span_processor(BatchSpanProcessor(exporter))
    return p


def run(tracer, model, current_names, fail=False):
    with tracer.start_as_current_span("invoke_agent researcher", kind=SpanKind.INTERNAL) as root:
        root.set_attribute("gen_ai.operation.name", "invoke_agent")
        root.set_attribute("gen_ai.agent.name", "researcher")
        with tracer.start_as_current_span(f"chat {model}", kind=SpanKind.CLIENT) as chat:
            chat.set_attribute("gen_ai.operation.name", "chat")
            chat.set_attribute("gen_ai.request.model", model)
            if current_names:
                chat.set_attribute("gen_ai.provider.name", "openai")
                chat.set_attribute("gen_ai.usage.input_tokens", 1200)
                chat.set_attribute("gen_ai.usage.output_tokens", 300)
            else:
                chat.set_attribute("gen_ai.system", "anthropic")
                chat.set_attribute("gen_ai.usage.prompt_tokens", 1200)
                chat.set_attribute("gen_ai.usage.completion_tokens", 300)
        with tracer.start_as_current_span("execute_tool web_search") as tool:
            tool.set_attribute("gen_ai.operation.name", "execute_tool")
            tool.set_attribute("gen_ai.tool.name", "web_search")
            tool.set_attribute("gen_ai.tool.type", "function")
        if fail:
            root.set_status(Status(StatusCode.ERROR, "the agent gave up"))
            root.set_attribute("error.type", "agent_gave_up")


token = context.attach(baggage.set_baggage("team", "research-team",
                                           baggage.set_baggage("task_type", "research")))
try:
    grpc_tp = provider("py-grpc-agent", GrpcSpanExporter(endpoint=grpc_endpoint, insecure=True))
    for _ in range(3):
        run(grpc_tp.get_tracer("interop"), "gpt-4o", current_names=True)

    http_tp = provider("py-http-agent", HttpSpanExporter(endpoint=f"{http_endpoint}/v1/traces"))
    run(http_tp.get_tracer("interop"), "claude-sonnet-4-5", current_names=False)
    run(http_tp.get_tracer("interop"), "claude-sonnet-4-5", current_names=False, fail=True)
finally:
    context.detach(token)

reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=grpc_endpoint, insecure=True),
                                       export_interval_millis=60_000)
meters = MeterProvider(resource=Resource.create({"service.name": "py-metrics-agent"}),
                       metric_readers=[reader])
usage = meters.get_meter("interop").create_histogram("gen_ai.client.token.usage", unit="{token}")
attrs = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
         "gen_ai.request.model": "gpt-4o-mini"}
usage.record(5000, {**attrs, "gen_ai.token.type": "input"})
usage.record(500, {**attrs, "gen_ai.token.type": "output"})

for p in (grpc_tp, http_tp):
    assert p.force_flush(10_000), "span export did not finish"
    p.shutdown()
assert meters.force_flush(10_000), "metric export did not finish"
meters.shutdown()
print("exported")
