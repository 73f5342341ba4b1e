"""Cursor paging's pure parts: cursors, sort checks and the SQL's shape."""

from __future__ import annotations

from datetime import date
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import InvalidData
from read_api.queries import SORT_CHOICES, Cursor, PatientQuery, build, decode_cursor, encode_cursor


@given(
    st.sampled_from(SORT_CHOICES),
    # Keys come from PostgreSQL text: never NUL, never a lone surrogate.
    st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=120),
    st.uuids(),
)
def test_cursors_round_trip(sort: str, key: str, ident):
    cursor = Cursor(sort, key, ident)
    assert decode_cursor(encode_cursor(cursor)) == cursor


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "!!!",
        "bm90IGpzb24",
        encode_cursor(Cursor("name", "a", uuid4()))[:-3],
        encode_cursor(Cursor("name", "a\x00", uuid4())),
    ],
)
def test_a_forged_cursor_is_a_client_error(raw: str):
    with pytest.raises(InvalidData) as raised:
        decode_cursor(raw)
    assert "cursor" in raised.value.errors


def test_a_cursor_from_another_sort_is_refused():
    query = PatientQuery(sort="-name", cursor=Cursor("name", "a", uuid4()))
    with pytest.raises(InvalidData) as raised:
        query.check()
    assert set(raised.value.errors) == {"cursor"}


def test_an_unknown_sort_and_inverted_ranges_are_refused_together():
    query = PatientQuery(
        sort="age",
        date_of_birth_from=date(2000, 1, 1),
        date_of_birth_to=date(1999, 1, 1),
        registered_from=date(2024, 1, 2),
        registered_to=date(2024, 1, 1),
    )
    with pytest.raises(InvalidData) as raised:
        query.check()
    assert set(raised.value.errors) == {"sort", "dateOfBirthTo", "registeredTo"}


def test_descending_pages_use_the_reverse_keyset_condition():
    statement, params = build(
        PatientQuery(
            sort="-registeredDate", cursor=Cursor("-registeredDate", "2024-01-02", uuid4())
        )
    )
    text = statement.as_string(None)
    assert '("registered_date", id) < (%s, %s)' in text
    assert text.endswith("LIMIT %s")
    assert params[0] == date(2024, 1, 2)
    assert params[-1] == 51


def test_name_filters_escape_like_wildcards():
    _, params = build(PatientQuery(name="50%_OFF"))
    assert params[0] == "%50\\%\\_off%"
