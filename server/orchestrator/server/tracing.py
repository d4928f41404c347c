"""OpenTelemetry tracing: exporters from the standard OTEL_* variables, and the W3C trace
context a run keeps so its steps' spans join the trace of the call that submitted it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from opentelemetry import context, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from orchestrator.server.settings import SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

_propagator = TraceContextTextMapPropagator()


OTLP_PROTOCOLS = ("grpc", "http/protobuf")


def configure_tracing() -> None:
    """Install a tracer provider when OTEL_TRACES_EXPORTER (otlp, console) or an OTLP endpoint
    is set; otherwise tracing stays off (the API's no-op provider). OTLP goes over gRPC or
    HTTP as OTEL_EXPORTER_OTLP_TRACES_PROTOCOL / OTEL_EXPORTER_OTLP_PROTOCOL say (default
    grpc); the exporters read the rest of the OTEL_EXPORTER_OTLP_* variables themselves.
    A protocol they do not speak is a SettingsError."""
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if not exporter_name and (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        exporter_name = "otlp"
    if exporter_name in ("", "none"):
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
    )

    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    elif exporter_name == "otlp":
        exporter = _otlp_exporter()
    else:
        raise SettingsError(
            f"OTEL_TRACES_EXPORTER={exporter_name!r}: must be otlp, console or none"
        )
    service = os.environ.get("OTEL_SERVICE_NAME", "orchestrator")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def _otlp_exporter() -> SpanExporter:
    variable = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    protocol = os.environ.get(variable, "")
    if not protocol:
        variable = "OTEL_EXPORTER_OTLP_PROTOCOL"
        protocol = os.environ.get(variable, "grpc")
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        return HTTPSpanExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise SettingsError(f"{variable}={protocol!r}: must be one of {', '.join(OTLP_PROTOCOLS)}")


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
