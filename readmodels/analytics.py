"""The analytics read model's contract: its fact tables and the aggregate queries.

The analytics projection keeps one row of facts per patient, appointment and money
movement (`bootstrap/migrations/0007.analytics.sql`); the query API answers with
counts and sums over them, bucketed by day, week (ISO, from Monday) or month in
the practice's time zone. Nothing personal is kept: ids, dates, statuses, amounts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any, Literal

import psycopg
from psycopg import sql

NAME = "analytics"

Interval = Literal["day", "week", "month"]
AGE_BANDS: tuple[tuple[str, int, int | None], ...] = (
    ("0-17", 0, 17),
    ("18-39", 18, 39),
    ("40-64", 40, 64),
    ("65+", 65, None),
)


@dataclass(frozen=True)
class Tables:
    patients: str = "analytics_patients"
    appointments: str = "analytics_appointments"
    money: str = "analytics_money"
    positions: str = "analytics_positions"
    tracking: str = "projection_tracking"


LIVE = Tables()


def _buckets(interval: Interval) -> sql.Composed:
    """The bucket starts from %(from)s to %(to)s (dates), as a `buckets(start)` relation."""
    return sql.SQL(
        "SELECT generate_series(date_trunc({i}, %(from)s::date::timestamp),"
        " date_trunc({i}, %(to)s::date::timestamp), {step}::interval)::date AS start"
    ).format(i=sql.Literal(interval), step=sql.Literal(f"1 {interval}"))


def _local_bucket(column: str, interval: Interval) -> sql.Composed:
    return sql.SQL("date_trunc({}, {} AT TIME ZONE %(tz)s)::date").format(
        sql.Literal(interval), sql.Identifier(column)
    )


def _local_day(column: str) -> sql.Composed:
    return sql.SQL("({} AT TIME ZONE %(tz)s)::date").format(sql.Identifier(column))


async def registrations(
    conn: psycopg.AsyncConnection[Any],
    start: date,
    end: date,
    interval: Interval,
    timezone: str,
    tables: Tables = LIVE,
) -> list[dict[str, Any]]:
    """Per bucket: patients registered (by `registeredDate`) and patients removed."""
    statement = sql.SQL(
        "WITH buckets AS ({b}),"
        " registered AS (SELECT date_trunc({i}, registered_date::timestamp)::date AS start,"
        "  count(*) AS n"
        "  FROM {p} WHERE registered_date BETWEEN %(from)s AND %(to)s GROUP BY 1),"
        " removed AS (SELECT {rb} AS start, count(*) AS n FROM {p}"
        "  WHERE removed_at IS NOT NULL AND {rd} BETWEEN %(from)s AND %(to)s GROUP BY 1)"
        " SELECT b.start, coalesce(r.n, 0), coalesce(x.n, 0) FROM buckets b"
        " LEFT JOIN registered r USING (start) LEFT JOIN removed x USING (start) ORDER BY 1"
    ).format(
        b=_buckets(interval),
        i=sql.Literal(interval),
        p=sql.Identifier(tables.patients),
        rb=_local_bucket("removed_at", interval),
        rd=_local_day("removed_at"),
    )
    cur = await conn.execute(statement, {"from": start, "to": end, "tz": timezone})
    return [
        {"start": row[0], "registrations": int(row[1]), "removals": int(row[2])}
        for row in await cur.fetchall()
    ]


async def age_bands(
    conn: psycopg.AsyncConnection[Any], at: date, timezone: str, tables: Tables = LIVE
) -> dict[str, int]:
    """Current patients on `at` (registered by then, not removed by then) per age band."""
    cases = sql.SQL(" ").join(
        sql.SQL("WHEN age >= {} {} THEN {}").format(
            sql.Literal(low),
            sql.SQL("AND age <= {}").format(sql.Literal(high)) if high is not None else sql.SQL(""),
            sql.Literal(name),
        )
        for name, low, high in AGE_BANDS
    )
    statement = sql.SQL(
        "SELECT band, count(*) FROM (SELECT CASE {cases} END AS band FROM"
        " (SELECT extract(year FROM age(%(at)s::date, date_of_birth))::int AS age FROM {p}"
        "  WHERE registered_date <= %(at)s AND date_of_birth <= %(at)s"
        "  AND (removed_at IS NULL OR {rd} > %(at)s)) a) banded GROUP BY band"
    ).format(cases=cases, p=sql.Identifier(tables.patients), rd=_local_day("removed_at"))
    cur = await conn.execute(statement, {"at": at, "tz": timezone})
    counted = {row[0]: int(row[1]) for row in await cur.fetchall()}
    return {name: counted.get(name, 0) for name, _, _ in AGE_BANDS}


async def appointments(
    conn: psycopg.AsyncConnection[Any],
    start: date,
    end: date,
    interval: Interval,
    timezone: str,
    clinician_id: Any = None,
    tables: Tables = LIVE,
) -> list[dict[str, Any]]:
    """Per bucket of start time: appointments booked (all, whatever became of them),
    completed, cancelled and no-shows; the no-show rate (no-shows over completed plus
    no-shows) and the median lead time from booking to start, in hours."""
    clinician = sql.SQL("AND clinician_id = %(clinician)s") if clinician_id else sql.SQL("")
    statement = sql.SQL(
        "WITH buckets AS ({b}),"
        " counted AS (SELECT {sb} AS start, count(*) AS booked,"
        "  count(*) FILTER (WHERE status = 'completed') AS completed,"
        "  count(*) FILTER (WHERE status = 'cancelled') AS cancelled,"
        "  count(*) FILTER (WHERE status = 'no-show') AS no_show,"
        "  percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM start_at - booked_at))"
        "   AS lead_seconds"
        "  FROM {a} WHERE {sd} BETWEEN %(from)s AND %(to)s {c} GROUP BY 1)"
        " SELECT b.start, coalesce(n.booked, 0), coalesce(n.completed, 0),"
        " coalesce(n.cancelled, 0), coalesce(n.no_show, 0), n.lead_seconds"
        " FROM buckets b LEFT JOIN counted n USING (start) ORDER BY 1"
    ).format(
        b=_buckets(interval),
        sb=_local_bucket("start_at", interval),
        sd=_local_day("start_at"),
        a=sql.Identifier(tables.appointments),
        c=clinician,
    )
    cur = await conn.execute(
        statement, {"from": start, "to": end, "tz": timezone, "clinician": clinician_id}
    )
    out = []
    for when, booked, completed, cancelled, no_show, lead in await cur.fetchall():
        attended = completed + no_show
        out.append(
            {
                "start": when,
                "booked": int(booked),
                "completed": int(completed),
                "cancelled": int(cancelled),
                "noShow": int(no_show),
                "noShowRate": round(no_show / attended, 4) if attended else None,
                "medianLeadHours": round(float(lead) / 3600, 2) if lead is not None else None,
            }
        )
    return out


async def billing(
    conn: psycopg.AsyncConnection[Any],
    start: date,
    end: date,
    interval: Interval,
    timezone: str,
    currency: str | None = None,
    tables: Tables = LIVE,
) -> list[dict[str, Any]]:
    """Per currency and bucket: invoiced and paid in the bucket, and outstanding (all
    invoiced minus all paid, ever) at the bucket's end; amounts in minor units."""
    only = sql.SQL("AND currency = %(currency)s") if currency else sql.SQL("")
    statement = sql.SQL(
        "WITH buckets AS ({b}), currencies AS (SELECT DISTINCT currency FROM {m} WHERE true {o}),"
        " moved AS (SELECT currency, {mb} AS start,"
        "  sum(amount_minor) FILTER (WHERE kind = 'invoiced') AS invoiced,"
        "  sum(amount_minor) FILTER (WHERE kind = 'paid') AS paid"
        "  FROM {m} WHERE {md} BETWEEN %(from)s AND %(to)s {o} GROUP BY 1, 2)"
        " SELECT c.currency, b.start, coalesce(v.invoiced, 0), coalesce(v.paid, 0),"
        "  (SELECT coalesce(sum(CASE kind WHEN 'invoiced' THEN amount_minor"
        "    ELSE -amount_minor END), 0) FROM {m} x WHERE x.currency = c.currency"
        "    AND {xd} < (b.start + {step}::interval)::date)"
        " FROM currencies c CROSS JOIN buckets b"
        " LEFT JOIN moved v ON v.currency = c.currency AND v.start = b.start"
        " ORDER BY 1, 2"
    ).format(
        b=_buckets(interval),
        m=sql.Identifier(tables.money),
        o=only,
        mb=_local_bucket("occurred_at", interval),
        md=_local_day("occurred_at"),
        xd=sql.SQL("(x.occurred_at AT TIME ZONE %(tz)s)::date"),
        step=sql.Literal(f"1 {interval}"),
    )
    cur = await conn.execute(
        statement, {"from": start, "to": end, "tz": timezone, "currency": currency}
    )
    return [
        {
            "currency": row[0].strip(),
            "start": row[1],
            "invoicedMinor": int(row[2]),
            "paidMinor": int(row[3]),
            "outstandingMinor": int(row[4]),
        }
        for row in await cur.fetchall()
    ]
