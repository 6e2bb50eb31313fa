"""An agent whose LLM calls go through the real `openai` client, instrumented by
opentelemetry-instrumentation-openai-v2 (its `chat` spans carry no agent id, and it sends
gen_ai.client.* metrics too), against a local OpenAI-compatible server. The agent
framework's own `invoke_agent` span is the only one that names the agent. Run by
tests/e2e/interop.rs.

usage: openai_agent.py OTLP_ENDPOINT grpc|http LLM_BASE_URL AGENT_ID RUNS
"""

import sys

import openai
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

endpoint, protocol, base_url, agent_id, runs = sys.argv[1:6]
if protocol == "grpc":
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    spans = OTLPSpanExporter(endpoint=endpoint, insecure=True)
    points = OTLPMetricExporter(endpoint=endpoint, insecure=True)
else:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    spans = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")
    points = OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics")

resource = Resource.create({"service.name": f"openai-{protocol}-app", "fleet.pool": "research"})
tracer_provider = TracerProvider(resource=resource)
tracer_provider.add_span_processor(BatchSpanProcessor(spans))
trace.set_tracer_provider(tracer_provider)
meter_provider = MeterProvider(
    resource=resource,
    metric_readers=[PeriodicExportingMetricReader(points, export_interval_millis=500)],
)
metrics.set_meter_provider(meter_provider)
OpenAIInstrumentor().instrument()

client = openai.OpenAI(base_url=base_url, api_key="not-a-real-key")
tracer = trace.get_tracer("an-agent-framework")
for run in range(int(runs)):
    with tracer.start_as_current_span(f"invoke_agent {agent_id}") as agent:
        agent.set_attribute("gen_ai.operation.name", "invoke_agent")
        agent.set_attribute("gen_ai.agent.id", agent_id)
        agent.set_attribute("gen_ai.agent.name", "support-bot")
        for question in range(2):
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"run {run}, question {question}"}],
            )

tracer_provider.force_flush()
meter_provider.force_flush()
tracer_provider.shutdown()
meter_provider.shutdown()
