"""Tracing is off unless an OTLP endpoint is configured (CARELOG_OTLP_ENDPOINT wins over
OpenTelemetry's standard variable); a billing gRPC call is a span."""

from __future__ import annotations

import pytest
from grpclib import GRPCError
from grpclib.const import Status
from litestar import get
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from billing_grpc.api import rpc
from billing_grpc.service import CORRELATION_ID
from domain.billing import AccountNotFound
from runtime import tracing
from runtime.http import service_app, traced
from runtime.settings import Settings
from tests.unit.test_broker_settings import SECURED


def test_no_endpoint_means_no_tracing():
    assert Settings.from_env(SECURED).otlp_endpoint == ""
    assert tracing.configure_tracing("", "test") is False
    assert not tracing.enabled()
    assert not tracing.tracer().start_span("nothing").is_recording()


def test_the_standard_variable_is_read_and_ours_wins():
    standard = {**SECURED, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert Settings.from_env(standard).otlp_endpoint == "http://collector:4318"
    ours = {**standard, "CARELOG_OTLP_ENDPOINT": "http://ours:4318"}
    assert Settings.from_env(ours).otlp_endpoint == "http://ours:4318"


def test_an_untraced_service_has_no_tracing_middleware():
    @get("/ping", sync_to_thread=False)
    def ping() -> str:
        return "pong"

    app = service_app("test", [ping], title="test", description="test")
    assert traced not in app.middleware


async def test_a_grpc_call_is_a_span_with_its_status_and_correlation_id():
    @rpc
    async def get_billing_account() -> None:
        raise AccountNotFound("no such account")

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    CORRELATION_ID.set("corr-1")
    try:
        with pytest.raises(GRPCError):
            await get_billing_account()
    finally:
        tracing.use_provider(None)
    (span,) = exporter.get_finished_spans()
    assert span.name == "carelog.billing.v1.BillingService/GetBillingAccount"
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == Status.NOT_FOUND.value
    assert span.attributes[tracing.CORRELATION_ID] == "corr-1"
    assert span.status.is_ok  # the caller's mistake, not the service's fault
