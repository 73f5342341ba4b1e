"""Traces: OpenTelemetry spans, exported over OTLP when an endpoint is configured.

One call per process (`configure_tracing`, from the composition root beside the
logging set-up) installs an SDK tracer provider that batches spans to
`CARELOG_OTLP_ENDPOINT` (or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`). Without
an endpoint nothing is installed: `tracer()` is OpenTelemetry's no-op tracer and
the HTTP middleware is not even added, so tracing costs nothing.

A request's work crosses processes through the event store, which keeps no trace
context (events are forever; their schemas do not grow for tracing). Spans are
therefore joined two ways: inside a process and across Kafka as parent and child
(the relay writes the W3C `traceparent` of its publish span into each message's
headers, and a consumer's batch span continues the first message's trace and links
the others); and across the store by the `carelog.correlation_id` attribute, which
every span carries and every event already records. Attributes are ids, event
types and positions only, never personal data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

CORRELATION_ID = "carelog.correlation_id"
"""The attribute every carelog span carries: what joins a request's spans across the store."""

_propagator = TraceContextTextMapPropagator()
_PROPAGATED = ("traceparent", "tracestate")

QUIET: dict[str, Any] = {"record_exception": False, "set_status_on_exception": False}
"""Span options: a failure is recorded by `mark_failed`, by kind only, since an
exception's message may quote the data that caused it."""

MAX_LINKS = 32
"""Links a consumer's batch span keeps to the publish spans of the batch's other messages."""


_provider: TracerProvider | None = None


def configure_tracing(endpoint: str, service: str) -> bool:
    """Exports this process's spans to the OTLP/HTTP collector at `endpoint` (its base
    URL, e.g. http://collector:4318); with no endpoint, does nothing. True if enabled."""
    if not endpoint or enabled():
        return enabled()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"carelog-{service}"}))
    traces = endpoint.rstrip("/")
    if not traces.endswith("/v1/traces"):
        traces += "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces)))
    trace.set_tracer_provider(provider)  # for any library that traces through the API
    use_provider(provider)
    return True


def use_provider(provider: TracerProvider | None) -> None:
    """Records carelog's spans with `provider` from now on (None: stop recording). The
    composition root calls it through `configure_tracing`; tests hand it an in-memory one."""
    global _provider
    _provider = provider


def enabled() -> bool:
    """Whether spans are recorded in this process."""
    return _provider is not None


def tracer() -> trace.Tracer:
    """carelog's tracer (OpenTelemetry's no-op tracer when spans are not recorded)."""
    if _provider is None:
        return trace.NoOpTracer()
    return _provider.get_tracer("carelog")


def mark_failed(span: Span, exc: BaseException) -> None:
    """Records that the span's work failed, naming only the kind of error (a message may
    quote data)."""
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
    span.set_attribute("error.type", type(exc).__name__)


# --- Kafka headers ---------------------------------------------------------------------


def inject(headers: list[tuple[str, bytes]], span: Span | None = None) -> None:
    """Adds the W3C trace context of `span` (default: the current span) to a Kafka
    message's headers."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span) if span else None)
    headers.extend((name, value.encode()) for name, value in carrier.items())


def _carrier(headers: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, str]:
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    carrier = {}
    for name, value in pairs:
        if name in _PROPAGATED:
            carrier[name] = value.decode() if isinstance(value, bytes) else str(value)
    return carrier


def extract(headers: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> Context:
    """The trace context a message's headers carry (an empty context if none)."""
    return _propagator.extract(_carrier(headers))


def consumer_span(
    name: str, batch_headers: Sequence[Mapping[str, Any]], attributes: Mapping[str, Any]
) -> Any:
    """A span for one consumed batch: the child of the first message's publish span,
    linked to the publish spans of the others (a batch joins several traces)."""
    parent = extract(batch_headers[0]) if batch_headers else None
    first = trace.get_current_span(parent).get_span_context() if parent is not None else None
    links: list[Link] = []
    seen = {(first.trace_id, first.span_id)} if first is not None else set()
    for headers in batch_headers[1:]:
        context = trace.get_current_span(extract(headers)).get_span_context()
        key = (context.trace_id, context.span_id)
        if context.is_valid and key not in seen and len(links) < MAX_LINKS:
            seen.add(key)
            links.append(Link(context))
    return tracer().start_as_current_span(
        name,
        context=parent,
        kind=SpanKind.CONSUMER,
        links=links,
        attributes=dict(attributes),
        **QUIET,
    )


__all__ = [
    "CORRELATION_ID",
    "QUIET",
    "SpanKind",
    "Status",
    "StatusCode",
    "configure_tracing",
    "consumer_span",
    "enabled",
    "extract",
    "inject",
    "mark_failed",
    "tracer",
    "use_provider",
]
