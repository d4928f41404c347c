"""OpenTelemetry tracing: exporters from the standard OTEL_* variables, and the W3C trace
context a run keeps so its steps' spans join the trace of the call that submitted it."""

from __future__ import annotations

import os

from opentelemetry import context, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()


def configure_tracing() -> None:
    """Install a tracer provider when OTEL_TRACES_EXPORTER (otlp, console) or an OTLP endpoint
    is set; otherwise tracing stays off (the API's no-op provider)."""
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if not exporter_name and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        exporter_name = "otlp"
    if exporter_name in ("", "none"):
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    service = os.environ.get("OTEL_SERVICE_NAME", "orchestrator")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def tracing_on(provider: trace.TracerProvider | None = None) -> bool:
    """Whether spans go anywhere: a provider given, or one installed globally."""
    if provider is None:
        provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def current_traceparent() -> str:
    """The W3C traceparent of the current span ("" when not tracing)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def parent_context(traceparent: str) -> context.Context | None:
    """A context whose current span is the one `traceparent` names."""
    if not traceparent:
        return None
    return _propagator.extract({"traceparent": traceparent})
