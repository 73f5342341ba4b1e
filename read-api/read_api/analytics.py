"""The query API's analytics routes (admin and analyst): counts and sums, never
personal data, bucketed in the practice's time zone (CARELOG_PRACTICE_TIMEZONE)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
import psycopg_pool
from litestar import Response, get
from litestar.di import NamedDependency
from litestar.params import Parameter

from domain.errors import InvalidData
from domain.roles import ANALYTICS_READERS
from read_api.waiting import await_position
from readmodels import analytics as model
from runtime.http import QUERY_RULES, answers
from runtime.security import requires

MAX_DAYS = 3_700
"""The longest range one answer covers (about ten years)."""


@dataclass(frozen=True)
class Analytics:
    pool: psycopg_pool.AsyncConnectionPool[Any]
    read_wait_seconds: float
    timezone: str
    tables: model.Tables = model.LIVE


_encoder = msgspec.json.Encoder()

From = Annotated[date, Parameter(query="from", description="First day, YYYY-MM-DD")]
To = Annotated[date, Parameter(query="to", description="Last day (included), YYYY-MM-DD")]
Interval = Annotated[Literal["day", "week", "month"], Parameter(description="Bucket size")]
MinPosition = Annotated[
    int | None, Parameter(ge=1, description="Answer only once the model reflects this position")
]


class RegistrationBucket(msgspec.Struct, kw_only=True):
    start: date
    registrations: int
    removals: int


class AppointmentBucket(msgspec.Struct, rename="camel", kw_only=True):
    start: date
    booked: int
    completed: int
    cancelled: int
    no_show: int
    no_show_rate: Annotated[
        float | None, msgspec.Meta(description="No-shows over completed plus no-shows")
    ]
    median_lead_hours: float | None


class BillingBucket(msgspec.Struct, rename="camel", kw_only=True):
    currency: str
    start: date
    invoiced_minor: int
    paid_minor: int
    outstanding_minor: int


class _Series(msgspec.Struct, kw_only=True):
    start: date = msgspec.field(name="from")
    end: date = msgspec.field(name="to")
    interval: Literal["day", "week", "month"]
    timezone: Annotated[str, msgspec.Meta(description="The practice's time zone (IANA)")]


class RegistrationCounts(_Series, kw_only=True):
    buckets: list[RegistrationBucket]


class AppointmentCounts(_Series, kw_only=True):
    buckets: list[AppointmentBucket]


class BillingSums(_Series, kw_only=True):
    buckets: list[BillingBucket]


class AgeBands(msgspec.Struct, kw_only=True):
    at: date
    bands: Annotated[dict[str, int], msgspec.Meta(description="Patients per age band")]
    timezone: str


def _range(start: date, end: date) -> None:
    if end < start:
        raise InvalidData({"to": "must not be before from"})
    if (end - start).days > MAX_DAYS:
        raise InvalidData({"to": f"must be at most {MAX_DAYS} days after from"})


def _range_rule(values: Mapping[str, Any]) -> None:
    """`_range` over a request's typed parameters, when both dates are there and typed."""
    if "from" in values and "to" in values:
        _range(values["from"], values["to"])


async def _wait(source: Analytics, position: int | None) -> None:
    await await_position(source.pool, source.tables.positions, position, source.read_wait_seconds)


def _answer(source: Analytics, body: dict[str, Any]) -> Response[bytes]:
    return Response(
        _encoder.encode(body | {"timezone": source.timezone}), media_type="application/json"
    )


@get(
    "/analytics/registrations",
    summary="New patients (by registeredDate) and removals per bucket",
    tags=["analytics"],
    guards=[requires(ANALYTICS_READERS)],
    responses=answers(RegistrationCounts, "Counts per bucket"),
    opt={QUERY_RULES: _range_rule},
)
async def registrations(
    analytics: NamedDependency[Analytics],
    start: From,
    end: To,
    interval: Interval = "day",
    minPosition: MinPosition = None,
) -> Response[bytes]:
    _range(start, end)
    await _wait(analytics, minPosition)
    async with analytics.pool.connection() as conn:
        buckets = await model.registrations(
            conn, start, end, interval, analytics.timezone, analytics.tables
        )
    return _answer(analytics, {"from": start, "to": end, "interval": interval, "buckets": buckets})


@get(
    "/analytics/patients/age-bands",
    summary="Current patients per age band on a day",
    tags=["analytics"],
    guards=[requires(ANALYTICS_READERS)],
    responses=answers(AgeBands, "Counts per age band"),
)
async def age_bands(
    analytics: NamedDependency[Analytics],
    at: Annotated[date, Parameter(description="The day, YYYY-MM-DD")],
    minPosition: MinPosition = None,
) -> Response[bytes]:
    await _wait(analytics, minPosition)
    async with analytics.pool.connection() as conn:
        bands = await model.age_bands(conn, at, analytics.timezone, analytics.tables)
    return _answer(analytics, {"at": at, "bands": bands})


@get(
    "/analytics/appointments",
    summary="Appointments per bucket of start time: booked, completed, cancelled, no-shows",
    description="With the no-show rate (no-shows over completed plus no-shows) and the "
    "median lead time from booking to start, in hours.",
    tags=["analytics"],
    guards=[requires(ANALYTICS_READERS)],
    responses=answers(AppointmentCounts, "Counts per bucket"),
    opt={QUERY_RULES: _range_rule},
)
async def appointments(
    analytics: NamedDependency[Analytics],
    start: From,
    end: To,
    interval: Interval = "day",
    clinicianId: Annotated[UUID | None, Parameter(description="Only this clinician's")] = None,
    minPosition: MinPosition = None,
) -> Response[bytes]:
    _range(start, end)
    await _wait(analytics, minPosition)
    async with analytics.pool.connection() as conn:
        buckets = await model.appointments(
            conn, start, end, interval, analytics.timezone, clinicianId, analytics.tables
        )
    return _answer(analytics, {"from": start, "to": end, "interval": interval, "buckets": buckets})


@get(
    "/analytics/billing",
    summary="Invoiced, paid and outstanding per currency and bucket, in minor units",
    tags=["analytics"],
    guards=[requires(ANALYTICS_READERS)],
    responses=answers(BillingSums, "Sums per currency and bucket"),
    opt={QUERY_RULES: _range_rule},
)
async def billing(
    analytics: NamedDependency[Analytics],
    start: From,
    end: To,
    interval: Interval = "day",
    currency: Annotated[
        str | None, Parameter(pattern="^[A-Z]{3}$", description="ISO 4217, e.g. GBP")
    ] = None,
    minPosition: MinPosition = None,
) -> Response[bytes]:
    _range(start, end)
    await _wait(analytics, minPosition)
    async with analytics.pool.connection() as conn:
        buckets = await model.billing(
            conn, start, end, interval, analytics.timezone, currency, analytics.tables
        )
    return _answer(analytics, {"from": start, "to": end, "interval": interval, "buckets": buckets})


ROUTES = [registrations, age_bands, appointments, billing]
