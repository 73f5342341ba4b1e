"""Keyset-paged queries over the patient directory."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any
from uuid import UUID

import msgspec
from psycopg import sql

from domain.errors import InvalidData
from domain.patients import normalise_email
from readmodels.directory import COLUMNS, LIVE, DirectoryRecord, PatientRow, Tables

SORTS = {
    "name": "name_key",
    "registeredDate": "registered_date",
    "dateOfBirth": "date_of_birth",
}
SORT_CHOICES = sorted([*SORTS, *(f"-{s}" for s in SORTS)])


class Cursor(msgspec.Struct, array_like=True):
    sort: str
    key: str
    """The last row's sort value, as text (ISO for dates)."""
    id: UUID


@dataclass(frozen=True)
class PatientQuery:
    limit: int = 50
    sort: str = "name"
    cursor: Cursor | None = None
    name: str | None = None
    email: str | None = None
    date_of_birth_from: date | None = None
    date_of_birth_to: date | None = None
    registered_from: date | None = None
    registered_to: date | None = None

    def check(self) -> None:
        errors = {}
        if self.sort not in SORT_CHOICES:
            errors["sort"] = f"must be one of {', '.join(SORT_CHOICES)}"
        if self.cursor is not None and self.cursor.sort != self.sort:
            errors["cursor"] = "belongs to another sort order; start again without it"
        for field, low, high in (
            ("dateOfBirthTo", self.date_of_birth_from, self.date_of_birth_to),
            ("registeredTo", self.registered_from, self.registered_to),
        ):
            if low and high and high < low:
                errors[field] = "must not be before the matching ...From date"
        if errors:
            raise InvalidData(errors)


def window_errors(values: Mapping[str, Any]) -> dict[str, str]:
    """What is wrong with a listing's `from` and `to` times (typed): each must carry a UTC
    offset, and `to` must come after `from`."""
    errors: dict[str, str] = {}
    start, end = values.get("from"), values.get("to")
    for name, moment in (("from", start), ("to", end)):
        if moment is not None and moment.tzinfo is None:
            errors[name] = "must include a UTC offset"
    if start and end and start.tzinfo and end.tzinfo and end <= start:
        errors["to"] = "must be after from"
    return errors


def patient_query(values: Mapping[str, Any]) -> PatientQuery:
    """The query of a list request's typed parameters (wire names); InvalidData naming
    every parameter that breaks a rule (the cursor's included) at once."""
    errors: dict[str, str] = {}
    cursor = None
    if values.get("cursor"):
        try:
            cursor = decode_cursor(values["cursor"])
        except InvalidData as invalid:
            errors.update(invalid.errors)
    query = PatientQuery(
        limit=values.get("limit", 50),
        sort=values.get("sort", "name"),
        cursor=cursor,
        name=values.get("name") or None,
        email=values.get("email") or None,
        date_of_birth_from=values.get("dateOfBirthFrom"),
        date_of_birth_to=values.get("dateOfBirthTo"),
        registered_from=values.get("registeredFrom"),
        registered_to=values.get("registeredTo"),
    )
    try:
        query.check()
    except InvalidData as invalid:
        errors.update(invalid.errors)
    if errors:
        raise InvalidData(errors)
    return query


def decode_cursor(raw: str) -> Cursor:
    try:
        padded = raw + "=" * (-len(raw) % 4)
        cursor = msgspec.json.decode(base64.urlsafe_b64decode(padded), type=Cursor)
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise InvalidData({"cursor": "is not a cursor this API gave out"}) from None
    if "\x00" in cursor.key:
        raise InvalidData({"cursor": "is not a cursor this API gave out"})
    return cursor


def encode_cursor(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(cursor)).rstrip(b"=").decode()


def _like(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def build(query: PatientQuery, tables: Tables = LIVE) -> tuple[sql.Composed, list[Any]]:
    """The SQL for one page: filters, then the keyset condition, one row more than asked."""
    descending = query.sort.startswith("-")
    column = sql.Identifier(SORTS[query.sort.lstrip("-")])
    where: list[sql.Composable] = [sql.SQL("NOT removed")]
    params: list[Any] = []
    if query.name:
        where.append(sql.SQL("name_key LIKE %s"))
        params.append(_like(query.name))
    if query.email:
        where.append(sql.SQL("email_key = %s"))
        params.append(normalise_email(query.email))
    for col, op, value in (
        ("date_of_birth", ">=", query.date_of_birth_from),
        ("date_of_birth", "<=", query.date_of_birth_to),
        ("registered_date", ">=", query.registered_from),
        ("registered_date", "<=", query.registered_to),
    ):
        if value is not None:
            where.append(sql.SQL("{} {} %s").format(sql.Identifier(col), sql.SQL(op)))
            params.append(value)
    if query.cursor is not None:
        key: Any = query.cursor.key
        if query.sort.lstrip("-") != "name":
            key = _cursor_date(key)
        where.append(
            sql.SQL("({}, id) {} (%s, %s)").format(column, sql.SQL("<" if descending else ">"))
        )
        params.extend([key, query.cursor.id])
    direction = sql.SQL("DESC" if descending else "ASC")
    statement = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {} {}, id {} LIMIT %s").format(
        COLUMNS,
        sql.Identifier(tables.patients),
        sql.SQL(" AND ").join(where),
        column,
        direction,
        direction,
    )
    params.append(query.limit + 1)
    return statement, params


def _cursor_date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidData({"cursor": "is not a cursor this API gave out"}) from None


class Page(msgspec.Struct):
    patients: list[PatientRow]
    next: str | None


def page_from_rows(query: PatientQuery, rows: list[DirectoryRecord]) -> Page:
    """The page for rows selected by `build` (records; one more than the page if there is more)."""
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    patients = [r.patient() for r in rows]
    next_cursor = None
    if more and rows:
        last = rows[-1]
        key = getattr(last, SORTS[query.sort.lstrip("-")])
        next_cursor = encode_cursor(
            Cursor(query.sort, key if isinstance(key, str) else key.isoformat(), last.id)
        )
    return Page(patients=patients, next=next_cursor)
