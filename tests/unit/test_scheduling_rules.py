"""The appointments slice's rules: parsing, working hours across DST, time off, free slots,
the status machine, schedules - and, with Hypothesis, that booking through schedules as the
service does never lets an owner's active appointments overlap, even when bookers race,
and that replaying every aggregate's events (through the store's own transcoder) rebuilds it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from itertools import combinations, pairwise
from typing import Any, cast
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import JSONTranscoder, Mapper
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from commands.store import EventStore
from domain.errors import DomainError, InvalidData
from domain.scheduling import (
    DURATION_MAX,
    DURATION_MIN,
    DURATION_STEP,
    WEEKDAYS,
    Appointment,
    AppointmentNotFound,
    AppointmentStatus,
    Booking,
    Clinician,
    ClinicianBusy,
    ClinicianNotFound,
    InvalidTransition,
    LocalInterval,
    OutsideWorkingHours,
    PatientBusy,
    PatientRemoved,
    Schedule,
    SlotTaken,
    Timing,
    WorkingHours,
    free_slots,
    local_day_utc,
    parse_booking,
    parse_cancellation,
    parse_clinician,
    parse_reschedule,
    parse_working_hours,
    schedule_days,
    schedule_id,
    schedule_keys,
)

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
PATIENT_ID = UUID("0b0d8a54-6a43-4d7a-9f55-8a1f1b2c3d4e")
CLINICIAN_ID = UUID("5e2a7c10-93b1-4f0e-8d6c-2a4b6c8d0e1f")
NINE_TO_FIVE = {day: [["09:00", "17:00"]] for day in WEEKDAYS}


def at(text: str) -> datetime:
    """An instant from an ISO string with an offset."""
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() is not None
    return moment


def clinician(timezone: str = "Europe/London", hours: Any = None) -> Clinician:
    details = parse_clinician(
        name="Dr Jane Bloggs",
        email="jane@example.org",
        timezone=timezone,
        working_hours=NINE_TO_FIVE if hours is None else hours,
    )
    return Clinician.register(details)


def booking(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "patient_id": str(PATIENT_ID),
        "clinician_id": str(CLINICIAN_ID),
        "start": "2026-07-01T09:30:00+01:00",
        "duration_minutes": 30,
        "reason": "Follow-up on blood pressure",
        "now": NOW,
    }
    return fields | overrides


# --- Parsing -------------------------------------------------------------------------


def test_a_valid_booking_parses_with_its_start_in_utc():
    parsed = parse_booking(**booking())
    assert parsed == Booking(
        PATIENT_ID,
        CLINICIAN_ID,
        Timing(datetime(2026, 7, 1, 8, 30, tzinfo=UTC), 30),
        "Follow-up on blood pressure",
    )
    assert parsed.end == datetime(2026, 7, 1, 9, 0, tzinfo=UTC)
    assert parsed.start.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "start",
    [
        "2026-07-01T08:30:00Z",
        "2026-07-01t08:30:00z",
        "2026-07-01T08:30:00.000Z",
        "2026-07-01T08:30:00+00:00",
        "2026-07-01T08:30:00-00:00",
        "2026-07-01T04:30:00-04:00",
    ],
)
def test_every_rfc_3339_spelling_of_one_instant_parses_the_same(start: str):
    assert parse_booking(**booking(start=start)).start == datetime(2026, 7, 1, 8, 30, tzinfo=UTC)


RFC_3339 = "must be an RFC 3339 date-time (e.g. 2026-07-01T09:00:00+01:00)"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("patient_id", None, "is required"),
        ("patient_id", "not-a-uuid", "must be a UUID"),
        ("patient_id", 42, "must be a UUID"),
        ("clinician_id", "5e2a7c1093b14f0e8d6c2a4b6c8d0e1f", "must be a UUID"),
        ("clinician_id", "{5e2a7c10-93b1-4f0e-8d6c-2a4b6c8d0e1f}", "must be a UUID"),
        ("clinician_id", "5e2a7c10-93b1-4f0e-8d6c-2a4b6c8d0e1f\n", "must be a UUID"),
        ("start", None, "is required"),
        ("start", 1_780_000_000, "must be an RFC 3339 date-time string"),
        ("start", "2026-07-01T09:30:00", "must include a UTC offset (Z or +HH:MM)"),
        ("start", "2026-07-01", RFC_3339),
        ("start", "2026-07-01 09:30:00Z", RFC_3339),
        ("start", "2026-07-01T09:30Z", RFC_3339),
        ("start", "2026-07-01T09:30:00Z\n", RFC_3339),
        ("start", "\u0662026-07-01T09:30:00Z", RFC_3339),
        ("start", "2026-02-30T09:30:00Z", RFC_3339),
        ("start", "2026-07-01T09:30:00+24:00", RFC_3339),
        ("start", "2026-07-01T09:30:15Z", "must be on a whole minute"),
        ("start", "2026-07-01T09:30:00.5Z", "must be on a whole minute"),
        ("start", "2026-07-01T09:30:00.000000001Z", "must be on a whole minute"),
        ("start", "2026-06-15T12:00:00Z", "must be in the future"),
        ("start", "2026-06-15T12:30:00+01:00", "must be in the future"),
        ("start", "9999-12-31T23:00:00Z", "is out of range"),
        ("duration_minutes", None, "is required"),
        ("duration_minutes", True, "must be an integer"),
        ("duration_minutes", 30.0, "must be an integer"),
        ("duration_minutes", "30", "must be an integer"),
        ("duration_minutes", 0, "must be between 5 and 240"),
        ("duration_minutes", 245, "must be between 5 and 240"),
        ("duration_minutes", -5, "must be between 5 and 240"),
        ("duration_minutes", 32, "must be a multiple of 5"),
        ("reason", None, "is required"),
        ("reason", 7, "must be a string"),
        ("reason", "   ", "must not be blank"),
        ("reason", "x" * 501, "must be at most 500 characters"),
        ("reason", "pain\nin knee", "must not contain control characters"),
    ],
)
def test_each_booking_rule_names_its_field(field: str, value: Any, message: str):
    wire = {
        "patient_id": "patientId",
        "clinician_id": "clinicianId",
        "duration_minutes": "durationMinutes",
    }.get(field, field)
    with pytest.raises(InvalidData) as raised:
        parse_booking(**booking(**{field: value}))
    assert raised.value.errors == {wire: message}


@pytest.mark.parametrize("minutes", [DURATION_MIN, 30, 60, DURATION_MAX])
def test_durations_from_5_to_240_in_steps_of_5_are_accepted(minutes: int):
    assert parse_booking(**booking(duration_minutes=minutes)).timing.duration_minutes == minutes


def test_a_start_one_minute_from_now_is_in_the_future():
    parsed = parse_booking(**booking(start="2026-06-15T12:01:00Z"))
    assert parsed.start == NOW + timedelta(minutes=1)


def test_every_wrong_booking_field_is_reported_at_once():
    with pytest.raises(InvalidData) as raised:
        parse_booking(
            patient_id="x",
            clinician_id=None,
            start="2026-07-01T09:30:00",
            duration_minutes=True,
            reason="",
            now=NOW,
        )
    assert raised.value.errors == {
        "patientId": "must be a UUID",
        "clinicianId": "is required",
        "start": "must include a UTC offset (Z or +HH:MM)",
        "durationMinutes": "must be an integer",
        "reason": "must not be blank",
    }


def test_a_past_start_and_a_bad_duration_are_reported_together():
    with pytest.raises(InvalidData) as raised:
        parse_reschedule(start="2026-06-01T09:00:00Z", duration_minutes=241, now=NOW)
    assert raised.value.errors == {
        "start": "must be in the future",
        "durationMinutes": "must be between 5 and 240",
    }


def test_a_valid_reschedule_parses():
    timing = parse_reschedule(start="2026-07-02T10:00:00+02:00", duration_minutes=45, now=NOW)
    assert timing == Timing(datetime(2026, 7, 2, 8, 0, tzinfo=UTC), 45)
    assert timing.end == datetime(2026, 7, 2, 8, 45, tzinfo=UTC)


def test_now_must_be_aware():
    with pytest.raises(ValueError, match="aware"):
        parse_reschedule(
            start="2026-07-02T10:00:00Z", duration_minutes=45, now=datetime(2026, 1, 1)
        )


def test_a_cancellation_reason_follows_the_reason_rules():
    assert parse_cancellation(reason="  Feeling better  ") == "Feeling better"
    with pytest.raises(InvalidData) as raised:
        parse_cancellation(reason="")
    assert raised.value.errors == {"reason": "must not be blank"}


def test_a_valid_clinician_parses():
    details = parse_clinician(
        name=" Dr Jane Bloggs ",
        email="jane@example.org",
        timezone="America/New_York",
        working_hours={"mon": [["13:00", "17:00"], ["08:00", "12:00"]], "fri": []},
    )
    assert details.name == "Dr Jane Bloggs"
    assert details.timezone == "America/New_York"
    assert details.working_hours.on(0) == (LocalInterval(480, 720), LocalInterval(780, 1020))
    assert all(details.working_hours.on(day) == () for day in range(1, 7))


@pytest.mark.parametrize(
    "zone",
    ["Europe/london", "Mars/Olympus_Mons", "localtime", "Factory", "../etc/passwd", "Europe"],
)
def test_a_timezone_must_be_an_iana_zone(zone: str):
    with pytest.raises(InvalidData) as raised:
        parse_clinician(
            name="Dr A", email="a@example.org", timezone=zone, working_hours=NINE_TO_FIVE
        )
    assert raised.value.errors == {
        "timezone": "must be an IANA time zone name (e.g. Europe/London)"
    }


def test_every_wrong_clinician_field_is_reported_at_once():
    with pytest.raises(InvalidData) as raised:
        parse_clinician(
            name="",
            email="jane@",
            timezone=None,
            working_hours={"mon": [["09:00", "08:00"]], "fun": [], "tue": [["9", "17:00"]]},
        )
    assert raised.value.errors == {
        "name": "must not be blank",
        "email": "must be a valid email address",
        "timezone": "is required",
        "workingHours.fun": "is not a weekday (mon, tue, wed, thu, fri, sat, sun)",
        "workingHours.mon[0]": "start must be before end",
        "workingHours.tue[0]": "start must be a time from 00:00 to 23:59",
    }


@pytest.mark.parametrize(
    ("hours", "errors"),
    [
        (None, {"workingHours": "is required"}),
        ([], {"workingHours": "must be an object with weekday keys (mon..sun)"}),
        ({"mon": "09:00-17:00"}, {"workingHours.mon": "must be a list of [start, end] pairs"}),
        (
            {"mon": [["09:00"]]},
            {"workingHours.mon[0]": "must be a [start, end] pair of HH:MM times"},
        ),
        ({"mon": ["09:00"]}, {"workingHours.mon[0]": "must be a [start, end] pair of HH:MM times"}),
        (
            {"mon": [["24:00", "24:00"]]},
            {"workingHours.mon[0]": "start must be a time from 00:00 to 23:59"},
        ),
        (
            {"mon": [["09:00", "24:01"]]},
            {"workingHours.mon[0]": "end must be a time from 00:00 to 24:00"},
        ),
        (
            {"mon": [["09:60", "10:00"]]},
            {"workingHours.mon[0]": "start must be a time from 00:00 to 23:59"},
        ),
        (
            {"mon": [["09:00", 17]]},
            {"workingHours.mon[0]": "end must be a time from 00:00 to 24:00"},
        ),
        (
            {"mon": [["x", "y"]]},
            {
                "workingHours.mon[0]": "start must be a time from 00:00 to 23:59; "
                "end must be a time from 00:00 to 24:00"
            },
        ),
        ({"mon": [["09:00", "09:00"]]}, {"workingHours.mon[0]": "start must be before end"}),
        (
            {"mon": [["09:00\n", "\u0661\u0667:00"]]},
            {
                "workingHours.mon[0]": "start must be a time from 00:00 to 23:59; "
                "end must be a time from 00:00 to 24:00"
            },
        ),
        (
            {"mon": [["09:00", "12:00"], ["13:00", "17:00"], ["11:00", "14:00"]]},
            {"workingHours.mon[2]": "overlaps workingHours.mon[0]"},
        ),
        (
            {"sun": [["00:00", "24:00"], ["10:00", "11:00"], ["12:00", "13:00"]]},
            {
                "workingHours.sun[1]": "overlaps workingHours.sun[0]",
                "workingHours.sun[2]": "overlaps workingHours.sun[0]",
            },
        ),
        (
            {"wed": [["09:00", "09:05"]] * 25},
            {"workingHours.wed": "must have at most 24 intervals"},
        ),
    ],
)
def test_each_working_hours_rule_names_its_interval(hours: Any, errors: dict[str, str]):
    with pytest.raises(InvalidData) as raised:
        parse_working_hours(hours)
    assert raised.value.errors == errors


def test_touching_intervals_and_a_day_that_ends_at_24_00_are_allowed():
    hours = parse_working_hours(
        {"mon": [["12:00", "17:00"], ["09:00", "12:00"]], "tue": [["00:00", "24:00"]]}
    )
    assert hours.on(0) == (LocalInterval(540, 720), LocalInterval(720, 1020))
    assert hours.on(1) == (LocalInterval(0, 1440),)
    assert hours.to_wire()["tue"] == [["00:00", "24:00"]]


clock = st.integers(min_value=0, max_value=1440)


@st.composite
def days_of_intervals(draw: st.DrawFn) -> list[list[str]]:
    """A day of disjoint intervals, in random order, written as the API takes them."""
    cuts = sorted(draw(st.sets(clock, max_size=8)))
    pairs = [
        [f"{a // 60:02d}:{a % 60:02d}", f"{b // 60:02d}:{b % 60:02d}"]
        for a, b in zip(cuts[::2], cuts[1::2], strict=False)
    ]
    return draw(st.permutations(pairs))


week_wire = st.fixed_dictionaries({}, optional={day: days_of_intervals() for day in WEEKDAYS})


@given(week_wire)
def test_any_valid_week_round_trips_through_its_wire_form(wire: dict[str, list[list[str]]]):
    hours = parse_working_hours(wire)
    assert parse_working_hours(hours.to_wire()) == hours
    assert WorkingHours.from_wire(hours.to_wire()) == hours
    for key, day in zip(WEEKDAYS, hours.days, strict=True):
        assert sorted(map(tuple, wire.get(key, []))) == [tuple(i.to_wire()) for i in day]


# --- Working hours, DST and midnight ---------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "working"),
    [
        # Saturday 28 March 2026, GMT: 09:00 local is 09:00 UTC.
        ("2026-03-28T09:00:00Z", "2026-03-28T10:00:00Z", True),
        ("2026-03-28T08:00:00Z", "2026-03-28T09:00:00Z", False),
        ("2026-03-28T16:00:00Z", "2026-03-28T17:00:00Z", True),
        # Sunday 29 March 2026, clocks go forward at 01:00 UTC: 09:00 BST is 08:00 UTC.
        ("2026-03-29T08:00:00Z", "2026-03-29T09:00:00Z", True),
        ("2026-03-29T07:55:00Z", "2026-03-29T08:30:00Z", False),
        ("2026-03-29T15:30:00Z", "2026-03-29T16:00:00Z", True),
        ("2026-03-29T16:00:00Z", "2026-03-29T16:05:00Z", False),
        # Saturday 24 October 2026, still BST.
        ("2026-10-24T08:00:00Z", "2026-10-24T09:00:00Z", True),
        # Sunday 25 October 2026, clocks go back at 01:00 UTC: 09:00 GMT is 09:00 UTC.
        ("2026-10-25T08:00:00Z", "2026-10-25T09:00:00Z", False),
        ("2026-10-25T09:00:00Z", "2026-10-25T17:00:00Z", True),
        ("2026-10-25T16:30:00Z", "2026-10-25T17:30:00Z", False),
    ],
)
def test_working_hours_are_local_time_on_both_sides_of_a_dst_change(
    start: str, end: str, working: bool
):
    assert clinician().working_at(at(start), at(end)) is working


def test_hours_in_the_small_hours_of_dst_days_last_real_time():
    night = clinician(hours={"sun": [["00:00", "03:00"]]})
    # Spring: 00:00 GMT to 03:00 BST is two real hours, 00:00-02:00 UTC.
    assert night.working_at(at("2026-03-29T00:00:00Z"), at("2026-03-29T02:00:00Z"))
    assert not night.working_at(at("2026-03-29T01:00:00Z"), at("2026-03-29T02:05:00Z"))
    # Autumn: 00:00 BST to 03:00 GMT is four real hours, 23:00-03:00 UTC.
    assert night.working_at(at("2026-10-24T23:00:00Z"), at("2026-10-25T03:00:00Z"))
    assert not night.working_at(at("2026-10-24T22:55:00Z"), at("2026-10-24T23:30:00Z"))


def test_a_skipped_time_means_the_jump_and_a_repeated_time_its_first_showing():
    odd = clinician(hours={"sun": [["01:30", "02:30"]]})
    # 29 March: 01:30 and 02:30 is skipped... 01:30 is; it starts at the jump (01:00 UTC),
    # and 02:30 BST is 01:30 UTC.
    assert odd.working_at(at("2026-03-29T01:00:00Z"), at("2026-03-29T01:30:00Z"))
    assert not odd.working_at(at("2026-03-29T00:55:00Z"), at("2026-03-29T01:30:00Z"))
    assert not odd.working_at(at("2026-03-29T01:00:00Z"), at("2026-03-29T01:35:00Z"))
    # 25 October: 01:30 is shown twice; work starts at its first showing (01:30 BST, 00:30
    # UTC) and runs to 02:30 GMT (02:30 UTC).
    assert odd.working_at(at("2026-10-25T00:30:00Z"), at("2026-10-25T02:30:00Z"))
    assert not odd.working_at(at("2026-10-25T00:25:00Z"), at("2026-10-25T01:00:00Z"))


def test_a_local_day_lasts_23_24_or_25_hours():
    def hours(zone: str, day: date) -> float:
        start, end = local_day_utc(zone, day)
        return (end - start) / timedelta(hours=1)

    assert hours("Europe/London", date(2026, 3, 29)) == 23
    assert hours("Europe/London", date(2026, 6, 1)) == 24
    assert hours("Europe/London", date(2026, 10, 25)) == 25
    assert local_day_utc("Europe/London", date(2026, 6, 1))[0] == at("2026-05-31T23:00:00Z")


def test_an_appointment_may_cross_midnight_only_where_the_days_join():
    joined = clinician(
        timezone="UTC", hours={"mon": [["20:00", "24:00"]], "tue": [["00:00", "04:00"]]}
    )
    gap = clinician(
        timezone="UTC", hours={"mon": [["20:00", "24:00"]], "tue": [["00:30", "04:00"]]}
    )
    # Monday 6 July 2026 23:00 to Tuesday 01:00.
    start, end = at("2026-07-06T23:00:00Z"), at("2026-07-07T01:00:00Z")
    assert joined.working_at(start, end)
    assert not gap.working_at(start, end)
    assert gap.working_at(start, at("2026-07-07T00:00:00Z"))


def test_the_week_wraps_from_sunday_to_monday():
    wrap = clinician(
        timezone="UTC", hours={"sun": [["22:00", "24:00"]], "mon": [["00:00", "02:00"]]}
    )
    assert wrap.working_at(at("2026-07-05T23:00:00Z"), at("2026-07-06T01:00:00Z"))


def test_a_midnight_dst_jump_still_joins_the_days():
    # America/Santiago moves its clocks from Saturday 24:00 to Sunday 01:00 on 6 September
    # 2026: Sunday's 00:00 never happens. Saturday's 24:00 and Sunday's 00:00 are the jump.
    chile = clinician(
        timezone="America/Santiago",
        hours={"sat": [["22:00", "24:00"]], "sun": [["00:00", "02:00"]]},
    )
    assert chile.working_at(at("2026-09-06T02:00:00Z"), at("2026-09-06T05:00:00Z"))
    assert not chile.working_at(at("2026-09-06T02:00:00Z"), at("2026-09-06T05:05:00Z"))
    assert free_slots(chile, date(2026, 9, 6), 60, []) == [
        (at("2026-09-06T04:00:00Z"), at("2026-09-06T05:00:00Z"))
    ]


def test_intervals_that_touch_are_one_stretch_of_work():
    split = clinician(hours={"mon": [["09:00", "12:00"], ["12:00", "17:00"]]})
    lunch = clinician(hours={"mon": [["09:00", "12:00"], ["13:00", "17:00"]]})
    start, end = at("2026-07-06T11:30:00+01:00"), at("2026-07-06T12:30:00+01:00")
    assert split.working_at(start, end)
    assert not lunch.working_at(start, end)


def test_working_at_needs_an_aware_non_empty_span():
    c = clinician()
    with pytest.raises(ValueError, match="aware"):
        c.working_at(datetime(2026, 7, 6, 9), datetime(2026, 7, 6, 10))
    with pytest.raises(ValueError, match="after"):
        c.working_at(at("2026-07-06T10:00:00Z"), at("2026-07-06T10:00:00Z"))


# --- Time off ------------------------------------------------------------------------


def test_time_off_is_kept_in_utc_and_blocks_only_what_it_overlaps():
    c = clinician()
    off = uuid4()
    c.add_time_off(off, at("2026-07-06T13:00:00+01:00"), at("2026-07-06T14:00:00+01:00"))
    assert c.time_off == {off: (at("2026-07-06T12:00:00Z"), at("2026-07-06T13:00:00Z"))}
    assert c.off_at(at("2026-07-06T12:55:00Z"), at("2026-07-06T13:05:00Z"))
    assert c.off_at(at("2026-07-06T11:00:00Z"), at("2026-07-06T15:00:00Z"))
    assert not c.off_at(at("2026-07-06T11:00:00Z"), at("2026-07-06T12:00:00Z"))
    assert not c.off_at(at("2026-07-06T13:00:00Z"), at("2026-07-06T13:30:00Z"))
    with pytest.raises(OutsideWorkingHours) as raised:
        c.require_available(at("2026-07-06T12:30:00Z"), at("2026-07-06T13:00:00Z"))
    assert raised.value.reason == "outside-working-hours"
    c.require_available(at("2026-07-06T13:00:00Z"), at("2026-07-06T13:30:00Z"))
    with pytest.raises(OutsideWorkingHours):
        c.require_available(at("2026-07-06T05:00:00Z"), at("2026-07-06T05:30:00Z"))


def test_time_off_is_checked_and_adding_it_again_is_a_retry():
    c = clinician()
    off = uuid4()
    start, end = at("2026-07-06T12:00:00Z"), at("2026-07-06T13:00:00Z")
    with pytest.raises(InvalidData) as raised:
        c.add_time_off(off, datetime(2026, 7, 6, 12), datetime(2026, 7, 6, 13))
    assert raised.value.errors == {
        "start": "must have a UTC offset",
        "end": "must have a UTC offset",
    }
    with pytest.raises(InvalidData) as raised:
        c.add_time_off(off, end, start)
    assert raised.value.errors == {"end": "must be after start"}
    c.collect_events()
    c.add_time_off(off, start, end)
    c.add_time_off(off, start.astimezone(timezone(timedelta(hours=2))), end)
    assert len(c.collect_events()) == 1
    with pytest.raises(InvalidData) as raised:
        c.add_time_off(off, start, end + timedelta(minutes=5))
    assert raised.value.errors == {"timeOffId": "is already used for other time off"}
    c.remove_time_off(off)
    c.remove_time_off(off)
    c.remove_time_off(uuid4())
    assert [type(e).__name__ for e in c.collect_events()] == ["TimeOffRemoved"]
    assert c.time_off == {}


def test_hours_and_user_changes_that_change_nothing_record_nothing():
    c = clinician()
    c.collect_events()
    c.change_working_hours(parse_working_hours(NINE_TO_FIVE))
    user = uuid4()
    c.link_user(user)
    c.link_user(user)
    c.change_working_hours(parse_working_hours({"mon": [["10:00", "11:00"]]}))
    assert [type(e).__name__ for e in c.collect_events()] == ["UserLinked", "WorkingHoursChanged"]
    assert c.user_id == user
    assert c.working_hours.on(0) == (LocalInterval(600, 660),)
    assert c.details.working_hours == c.working_hours


# --- Free slots ----------------------------------------------------------------------


def utc_slots(*pairs: tuple[str, str]) -> list[tuple[datetime, datetime]]:
    return [(at(f"{s}Z"), at(f"{e}Z")) for s, e in pairs]


def test_free_slots_are_back_to_back_from_each_stretch_start():
    c = clinician(timezone="UTC", hours={"mon": [["09:00", "10:00"], ["10:15", "11:40"]]})
    assert free_slots(c, date(2026, 7, 6), 30, []) == utc_slots(
        ("2026-07-06T09:00", "2026-07-06T09:30"),
        ("2026-07-06T09:30", "2026-07-06T10:00"),
        ("2026-07-06T10:15", "2026-07-06T10:45"),
        ("2026-07-06T10:45", "2026-07-06T11:15"),
    )
    assert free_slots(c, date(2026, 7, 6), 60, []) == utc_slots(
        ("2026-07-06T09:00", "2026-07-06T10:00"), ("2026-07-06T10:15", "2026-07-06T11:15")
    )
    assert free_slots(c, date(2026, 7, 7), 30, []) == []


def test_free_slots_leave_out_what_is_busy_or_off_without_shifting_the_grid():
    c = clinician(timezone="Europe/London", hours={"mon": [["09:00", "13:00"]]})
    c.add_time_off(uuid4(), at("2026-07-06T09:00:00+01:00"), at("2026-07-06T09:30:00+01:00"))
    busy = [(at("2026-07-06T10:30:00+01:00"), at("2026-07-06T10:45:00+01:00"))]
    assert free_slots(c, date(2026, 7, 6), 60, busy) == utc_slots(
        ("2026-07-06T10:00", "2026-07-06T11:00"), ("2026-07-06T11:00", "2026-07-06T12:00")
    )


def test_touching_intervals_give_one_grid():
    c = clinician(timezone="UTC", hours={"mon": [["09:00", "09:50"], ["09:50", "11:00"]]})
    assert free_slots(c, date(2026, 7, 6), 60, []) == utc_slots(
        ("2026-07-06T09:00", "2026-07-06T10:00"), ("2026-07-06T10:00", "2026-07-06T11:00")
    )


def test_free_slots_on_dst_days_are_real_hours():
    night = clinician(hours={"sun": [["00:00", "03:00"]]})
    assert free_slots(night, date(2026, 3, 29), 60, []) == utc_slots(
        ("2026-03-29T00:00", "2026-03-29T01:00"), ("2026-03-29T01:00", "2026-03-29T02:00")
    )
    assert free_slots(night, date(2026, 10, 25), 60, []) == utc_slots(
        ("2026-10-24T23:00", "2026-10-25T00:00"),
        ("2026-10-25T00:00", "2026-10-25T01:00"),
        ("2026-10-25T01:00", "2026-10-25T02:00"),
        ("2026-10-25T02:00", "2026-10-25T03:00"),
    )
    day = clinician()
    assert free_slots(day, date(2026, 3, 29), 240, []) == utc_slots(
        ("2026-03-29T08:00", "2026-03-29T12:00"), ("2026-03-29T12:00", "2026-03-29T16:00")
    )
    assert free_slots(day, date(2026, 10, 25), 240, []) == utc_slots(
        ("2026-10-25T09:00", "2026-10-25T13:00"), ("2026-10-25T13:00", "2026-10-25T17:00")
    )


@pytest.mark.parametrize("minutes", [0, 7, 245, True])
def test_free_slots_take_only_a_valid_duration(minutes: int):
    with pytest.raises(InvalidData) as raised:
        free_slots(clinician(), date(2026, 7, 6), minutes, [])
    assert set(raised.value.errors) == {"durationMinutes"}


durations = st.sampled_from(range(DURATION_MIN, DURATION_MAX + 1, DURATION_STEP))


@settings(max_examples=150, deadline=None)
@given(
    wire=week_wire,
    zone=st.sampled_from(["Europe/London", "America/Santiago", "Australia/Lord_Howe", "UTC"]),
    day=st.dates(min_value=date(2026, 1, 1), max_value=date(2027, 12, 31)),
    minutes=durations,
    busy_starts=st.lists(st.integers(min_value=-120, max_value=26 * 60), max_size=4),
)
def test_every_free_slot_is_bookable_and_no_bookable_grid_slot_is_missed(
    wire: dict[str, list[list[str]]], zone: str, day: date, minutes: int, busy_starts: list[int]
):
    c = clinician(timezone=zone, hours=wire)
    first, _ = local_day_utc(zone, day)
    busy = [(first + timedelta(minutes=m), first + timedelta(minutes=m + 25)) for m in busy_starts]
    slots = free_slots(c, day, minutes, busy)
    length = timedelta(minutes=minutes)
    for start, end in slots:
        assert end - start == length
        assert c.working_at(start, end)
        assert not c.off_at(start, end)
        assert not any(start < b_end and b_start < end for b_start, b_end in busy)
    for (_, end), (start, _) in pairwise(slots):
        assert end <= start
    unblocked = free_slots(c, day, minutes, [])
    assert set(slots) <= set(unblocked)
    assert all(
        (s, e) in slots for s, e in unblocked if not any(s < be and bs < e for bs, be in busy)
    )


# --- The status machine --------------------------------------------------------------

BOOKED, CHECKED_IN, COMPLETED, CANCELLED, NO_SHOW = (
    AppointmentStatus.BOOKED,
    AppointmentStatus.CHECKED_IN,
    AppointmentStatus.COMPLETED,
    AppointmentStatus.CANCELLED,
    AppointmentStatus.NO_SHOW,
)
LATER = Timing(datetime(2026, 7, 2, 10, 0, tzinfo=UTC), 60)
ACTIONS: dict[str, Callable[[Appointment], None]] = {
    "reschedule": lambda a: a.reschedule(LATER),
    "cancel": lambda a: a.cancel("Feeling better"),
    "check-in": Appointment.check_in,
    "complete": Appointment.complete,
    "mark-no-show": Appointment.mark_no_show,
}
REACH: dict[AppointmentStatus, list[str]] = {
    BOOKED: [],
    CHECKED_IN: ["check-in"],
    COMPLETED: ["check-in", "complete"],
    CANCELLED: ["cancel"],
    NO_SHOW: ["mark-no-show"],
}
ALLOWED = {
    (BOOKED, "reschedule"): BOOKED,
    (BOOKED, "cancel"): CANCELLED,
    (BOOKED, "check-in"): CHECKED_IN,
    (BOOKED, "mark-no-show"): NO_SHOW,
    (CHECKED_IN, "complete"): COMPLETED,
}


def appointment_in(status: AppointmentStatus) -> Appointment:
    appointment = Appointment.book(parse_booking(**booking()))
    for action in REACH[status]:
        ACTIONS[action](appointment)
    assert appointment.status == status
    return appointment


@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize("status", list(AppointmentStatus))
def test_every_transition_is_allowed_or_refused(status: AppointmentStatus, action: str):
    appointment = appointment_in(status)
    appointment.collect_events()
    if (status, action) in ALLOWED:
        ACTIONS[action](appointment)
        assert appointment.status == ALLOWED[status, action]
        assert len(appointment.collect_events()) == 1
        assert appointment.active is (appointment.status in (BOOKED, CHECKED_IN))
    else:
        with pytest.raises(InvalidTransition) as raised:
            ACTIONS[action](appointment)
        assert (raised.value.reason, raised.value.current_status, raised.value.action) == (
            "invalid-transition",
            str(status),
            action,
        )
        assert appointment.status == status
        assert appointment.collect_events() == []


def test_a_booked_appointment_records_what_was_asked():
    appointment = Appointment.book(parse_booking(**booking()))
    assert appointment.status == "booked"
    assert (appointment.patient_id, appointment.clinician_id) == (PATIENT_ID, CLINICIAN_ID)
    assert (appointment.start, appointment.end) == (
        at("2026-07-01T08:30:00Z"),
        at("2026-07-01T09:00:00Z"),
    )
    assert appointment.cancellation_reason is None


def test_rescheduling_moves_the_appointment_and_moving_nowhere_records_nothing():
    appointment = appointment_in(BOOKED)
    appointment.collect_events()
    appointment.reschedule(appointment.timing)
    assert appointment.collect_events() == []
    appointment.reschedule(Timing(at("2026-07-02T12:00:00+02:00"), 90))
    assert (appointment.start, appointment.end) == (
        at("2026-07-02T10:00:00Z"),
        at("2026-07-02T11:30:00Z"),
    )
    assert appointment.start.utcoffset() == timedelta(0)
    with pytest.raises(InvalidData) as raised:
        appointment.reschedule(Timing(at("2026-07-02T12:00:00Z"), 7))
    assert raised.value.errors == {"durationMinutes": "must be a multiple of 5"}


def test_a_cancellation_keeps_its_checked_reason():
    appointment = appointment_in(BOOKED)
    with pytest.raises(InvalidData):
        appointment.cancel("   ")
    assert appointment.status == BOOKED
    appointment.cancel("  Feeling better ")
    assert appointment.cancellation_reason == "Feeling better"


def test_errors_carry_machine_readable_reasons():
    other = uuid4()
    assert isinstance(ClinicianBusy(other), DomainError)
    assert (ClinicianBusy(other).reason, ClinicianBusy(other).appointment_id) == (
        "clinician-busy",
        other,
    )
    assert (PatientBusy(other).reason, PatientBusy(other).appointment_id) == ("patient-busy", other)
    assert OutsideWorkingHours().reason == "outside-working-hours"
    assert PatientRemoved().reason == "patient-removed"
    assert ClinicianNotFound().reason == "clinician-not-found"
    assert AppointmentNotFound().reason == "appointment-not-found"
    clinician_busy = SlotTaken(other, "clinician").busy()
    patient_busy = SlotTaken(other, "patient").busy()
    assert isinstance(clinician_busy, ClinicianBusy)
    assert isinstance(patient_busy, PatientBusy)
    assert patient_busy.appointment_id == other


# --- Schedules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "days"),
    [
        ("2026-07-01T23:00:00Z", "2026-07-02T00:00:00Z", [date(2026, 7, 1)]),
        ("2026-07-01T23:00:00Z", "2026-07-02T00:05:00Z", [date(2026, 7, 1), date(2026, 7, 2)]),
        ("2026-07-02T00:00:00Z", "2026-07-02T04:00:00Z", [date(2026, 7, 2)]),
        ("2026-07-01T23:59:00Z", "2026-07-02T00:00:00Z", [date(2026, 7, 1)]),
        (
            "2026-07-02T00:30:00+01:00",
            "2026-07-02T01:30:00+01:00",
            [date(2026, 7, 1), date(2026, 7, 2)],
        ),
        ("2026-12-31T22:00:00Z", "2027-01-01T02:00:00Z", [date(2026, 12, 31), date(2027, 1, 1)]),
    ],
)
def test_schedule_days_are_the_utc_days_touched_end_exclusive(
    start: str, end: str, days: list[date]
):
    assert schedule_days(at(start), at(end)) == days


def test_schedule_ids_are_derived_from_kind_owner_and_day():
    owner, day = uuid4(), date(2026, 7, 1)
    assert schedule_id("clinician", owner, day) == schedule_id("clinician", owner, day)
    assert schedule_id("clinician", owner, day) == Schedule.open("clinician", owner, day).id
    others = {
        schedule_id("patient", owner, day),
        schedule_id("clinician", uuid4(), day),
        schedule_id("clinician", owner, date(2026, 7, 2)),
    }
    assert schedule_id("clinician", owner, day) not in others
    assert len(others) == 3
    with pytest.raises(ValueError, match="kind"):
        schedule_id(cast(Any, "nurse"), owner, day)
    with pytest.raises(ValueError, match="kind"):
        Schedule.open(cast(Any, "nurse"), owner, day)


def test_schedule_keys_cover_both_owners_on_every_touched_day():
    keys = schedule_keys(
        CLINICIAN_ID, PATIENT_ID, at("2026-07-01T23:00:00Z"), at("2026-07-02T01:00:00Z")
    )
    assert keys == [
        ("clinician", CLINICIAN_ID, date(2026, 7, 1)),
        ("clinician", CLINICIAN_ID, date(2026, 7, 2)),
        ("patient", PATIENT_ID, date(2026, 7, 1)),
        ("patient", PATIENT_ID, date(2026, 7, 2)),
    ]


def test_a_schedule_refuses_overlaps_but_not_touching_entries():
    schedule = Schedule.open("patient", PATIENT_ID, date(2026, 7, 1))
    first, second, third = uuid4(), uuid4(), uuid4()
    schedule.reserve(first, at("2026-07-01T09:00:00Z"), at("2026-07-01T10:00:00Z"))
    schedule.reserve(second, at("2026-07-01T10:00:00Z"), at("2026-07-01T11:00:00Z"))
    schedule.reserve(third, at("2026-07-01T08:00:00Z"), at("2026-07-01T09:00:00Z"))
    with pytest.raises(SlotTaken) as raised:
        schedule.reserve(uuid4(), at("2026-07-01T09:55:00Z"), at("2026-07-01T10:05:00Z"))
    assert (raised.value.appointment_id, raised.value.kind) == (first, "patient")
    assert isinstance(raised.value.busy(), PatientBusy)
    with pytest.raises(SlotTaken) as raised:
        schedule.reserve(uuid4(), at("2026-07-01T11:30:00+01:00"), at("2026-07-01T12:00:00Z"))
    assert raised.value.appointment_id == second
    assert schedule.busy() == utc_slots(
        ("2026-07-01T08:00", "2026-07-01T09:00"),
        ("2026-07-01T09:00", "2026-07-01T10:00"),
        ("2026-07-01T10:00", "2026-07-01T11:00"),
    )


def test_an_appointment_may_move_within_its_own_entry_and_released_time_is_free_again():
    schedule = Schedule.open("clinician", CLINICIAN_ID, date(2026, 7, 1))
    mine, other = uuid4(), uuid4()
    schedule.reserve(mine, at("2026-07-01T09:00:00Z"), at("2026-07-01T10:00:00Z"))
    schedule.collect_events()
    schedule.reserve(mine, at("2026-07-01T09:00:00Z"), at("2026-07-01T10:00:00Z"))
    assert schedule.collect_events() == []
    schedule.reserve(mine, at("2026-07-01T09:30:00Z"), at("2026-07-01T10:30:00Z"))
    assert schedule.entries == {mine: (at("2026-07-01T09:30:00Z"), at("2026-07-01T10:30:00Z"))}
    with pytest.raises(SlotTaken):
        schedule.reserve(other, at("2026-07-01T10:00:00Z"), at("2026-07-01T11:00:00Z"))
    schedule.release(mine)
    schedule.release(mine)
    schedule.reserve(other, at("2026-07-01T10:00:00Z"), at("2026-07-01T11:00:00Z"))
    assert [type(e).__name__ for e in schedule.collect_events()] == [
        "Reserved",
        "Released",
        "Reserved",
    ]


def test_a_schedule_takes_only_entries_that_touch_its_day():
    schedule = Schedule.open("clinician", CLINICIAN_ID, date(2026, 7, 1))
    with pytest.raises(ValueError, match="does not touch"):
        schedule.reserve(uuid4(), at("2026-07-02T00:00:00Z"), at("2026-07-02T01:00:00Z"))
    with pytest.raises(ValueError, match="does not touch"):
        schedule.reserve(uuid4(), at("2026-06-30T23:00:00Z"), at("2026-07-01T00:00:00Z"))
    schedule.reserve(uuid4(), at("2026-06-30T23:00:00Z"), at("2026-07-01T00:05:00Z"))
    with pytest.raises(ValueError, match="aware"):
        schedule.reserve(uuid4(), datetime(2026, 7, 1, 9), datetime(2026, 7, 1, 10))


# --- Replay --------------------------------------------------------------------------


def store_mapper() -> Mapper[UUID]:
    """Converts events exactly as the event store does: its own transcodings."""
    transcoder = JSONTranscoder()
    EventStore.register_transcodings(object.__new__(EventStore), transcoder)
    return Mapper(transcoder=transcoder)


MAPPER = store_mapper()


def through_the_store(events: list[Any]) -> list[Any]:
    return [MAPPER.to_domain_event(MAPPER.to_stored_event(e)) for e in events]


def replay(events: list[Any]) -> Any:
    return functools.reduce(lambda aggregate, e: e.mutate(aggregate), events, None)


def state_of(aggregate: Any) -> dict[str, Any]:
    state = {k: v for k, v in vars(aggregate).items() if not k.startswith("_")}
    return state | {"id": aggregate.id, "version": aggregate.version}


def test_replaying_a_clinicians_stored_events_rebuilds_it():
    c = clinician(timezone="America/Santiago")
    c.add_time_off(uuid4(), at("2026-07-06T12:00:00Z"), at("2026-07-06T13:00:00Z"))
    gone = uuid4()
    c.add_time_off(gone, at("2026-07-07T12:00:00Z"), at("2026-07-07T13:00:00Z"))
    c.remove_time_off(gone)
    c.change_working_hours(parse_working_hours({"sat": [["22:00", "24:00"], ["08:00", "09:00"]]}))
    c.link_user(uuid4())
    events = c.collect_events()
    rebuilt = replay(through_the_store(events))
    assert isinstance(rebuilt, Clinician)
    assert state_of(rebuilt) == state_of(c)
    assert rebuilt.details == c.details


def test_replaying_an_appointments_and_a_schedules_stored_events_rebuilds_them():
    appointment = appointment_in(BOOKED)
    appointment.reschedule(LATER)
    appointment.check_in()
    appointment.complete()
    schedule = Schedule.open("patient", PATIENT_ID, date(2026, 7, 2))
    schedule.reserve(appointment.id, appointment.start, appointment.end)
    schedule.reserve(uuid4(), at("2026-07-02T23:00:00Z"), at("2026-07-03T01:00:00Z"))
    schedule.release(appointment.id)
    for aggregate in (appointment, schedule):
        rebuilt = replay(through_the_store(aggregate.collect_events()))
        assert type(rebuilt) is type(aggregate)
        assert state_of(rebuilt) == state_of(aggregate)
    assert replay([]) is None


# --- Booking through schedules, as the service does -------------------------------------


class Conflict(Exception):
    """Another writer saved one of these aggregates first (the store's version check)."""


class MemoryStore:
    """Streams of stored events with the event store's all-or-nothing version check."""

    def __init__(self) -> None:
        self.streams: dict[UUID, list[Any]] = {}

    def get(self, aggregate_id: UUID) -> Any:
        stored = self.streams.get(aggregate_id)
        return replay([MAPPER.to_domain_event(s) for s in stored]) if stored else None

    def save(self, *aggregates: Any) -> None:
        pending = [(a, a.collect_events()) for a in aggregates]
        for aggregate, events in pending:
            held = len(self.streams.get(aggregate.id, []))
            if events and events[0].originator_version != held + 1:
                raise Conflict(aggregate.id)
        for aggregate, events in pending:
            self.streams.setdefault(aggregate.id, []).extend(map(MAPPER.to_stored_event, events))
            # (b) replaying everything recorded, through the store's transcoder, rebuilds it
            assert state_of(self.get(aggregate.id)) == state_of(aggregate)

    def all_of(self, kind: type) -> list[Any]:
        loaded = [self.get(i) for i in self.streams]
        return [a for a in loaded if isinstance(a, kind)]


Key = tuple[str, UUID, date]


def load_schedules(store: MemoryStore, keys: list[Any]) -> dict[Key, Schedule]:
    return {k: store.get(schedule_id(*k)) or Schedule.open(*k) for k in keys}


def prepare_booking(store: MemoryStore, request: Booking) -> list[Any]:
    """Everything a booking changes, on fresh state; raises a domain error if refused."""
    found = store.get(request.clinician_id)
    if not isinstance(found, Clinician):
        raise ClinicianNotFound()
    found.require_available(request.start, request.end)
    appointment = Appointment.book(request)
    keys = schedule_keys(request.clinician_id, request.patient_id, request.start, request.end)
    schedules = load_schedules(store, keys)
    try:
        for schedule in schedules.values():
            schedule.reserve(appointment.id, request.start, request.end)
    except SlotTaken as taken:
        raise taken.busy() from None
    return [appointment, *schedules.values()]


def prepare_change(
    store: MemoryStore, appointment_id: UUID, action: str, timing: Timing
) -> list[Any]:
    appointment = store.get(appointment_id)
    if not isinstance(appointment, Appointment):
        raise AppointmentNotFound()
    old = schedule_keys(
        appointment.clinician_id, appointment.patient_id, appointment.start, appointment.end
    )
    if action == "reschedule":
        appointment.reschedule(timing)
        found = store.get(appointment.clinician_id)
        assert isinstance(found, Clinician)
        found.require_available(appointment.start, appointment.end)
    else:
        ACTIONS[action](appointment)
    new = (
        schedule_keys(
            appointment.clinician_id, appointment.patient_id, appointment.start, appointment.end
        )
        if appointment.active
        else []
    )
    schedules = load_schedules(store, list(dict.fromkeys(old + new)))
    try:
        for key in new:
            schedules[key].reserve(appointment.id, appointment.start, appointment.end)
    except SlotTaken as taken:
        raise taken.busy() from None
    for key in old:
        if key not in new:
            schedules[key].release(appointment.id)
    return [appointment, *schedules.values()]


def with_retries(store: MemoryStore, prepare: Callable[[], list[Any]]) -> list[Any]:
    """Prepares and saves; a version conflict means retrying on fresh state."""
    for _ in range(3):
        changed = prepare()
        try:
            store.save(*changed)
        except Conflict:
            continue
        return changed
    raise AssertionError("a single writer never conflicts three times")


def overlap(a: Appointment, b: Appointment) -> bool:
    return a.start < b.end and b.start < a.end


BASE = datetime(2026, 7, 1, 18, 0, tzinfo=UTC)
starts = st.integers(min_value=0, max_value=16).map(lambda k: BASE + timedelta(minutes=30 * k))
lengths = st.sampled_from([30, 60, 90, 120, 240])


class BookingThroughSchedules(RuleBasedStateMachine):
    """Books, reschedules, checks in, completes and cancels for two clinicians and three
    patients exactly as the service does, sometimes with two bookers racing; an owner's
    active appointments never overlap and the schedules always hold exactly them."""

    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore()
        # Every day and all day in UTC: stretches join across midnight.
        always = clinician(timezone="UTC", hours={d: [["00:00", "24:00"]] for d in WEEKDAYS})
        # 20:00-03:00 London time (BST in July: 19:00-02:00 UTC), across midnight.
        evenings = clinician(
            timezone="Europe/London",
            hours={d: [["00:00", "03:00"], ["20:00", "24:00"]] for d in WEEKDAYS},
        )
        self.store.save(always, evenings)
        self.clinicians = [always.id, evenings.id]
        self.patients = [uuid4() for _ in range(3)]
        self.appointments: list[UUID] = []
        self.refusals: set[str] = set()
        self.conflicts = 0

    def request(self, c: int, p: int, start: datetime, minutes: int) -> Booking:
        return Booking(self.patients[p], self.clinicians[c], Timing(start, minutes), "Check-up")

    def check_refusal(self, error: DomainError, request: Booking, appointment_id: UUID) -> None:
        """A refusal is never spurious: the conflict it names is real and current."""
        self.refusals.add(type(error).__name__)
        if isinstance(error, OutsideWorkingHours):
            found = self.store.get(request.clinician_id)
            assert not found.working_at(request.start, request.end)
            return
        assert isinstance(error, ClinicianBusy | PatientBusy)
        other = self.store.get(error.appointment_id)
        assert other.active and other.id != appointment_id
        assert other.start < request.end and request.start < other.end
        if isinstance(error, ClinicianBusy):
            assert other.clinician_id == request.clinician_id
        else:
            assert other.patient_id == request.patient_id

    @initialize()
    def first_booking(self) -> None:
        """So that there is always an appointment to change."""
        self.book(0, 0, BASE, 60)
        assert self.appointments

    @rule(c=st.integers(0, 1), p=st.integers(0, 2), start=starts, minutes=lengths)
    def book(self, c: int, p: int, start: datetime, minutes: int) -> None:
        request = self.request(c, p, start, minutes)
        try:
            changed = with_retries(self.store, lambda: prepare_booking(self.store, request))
        except (OutsideWorkingHours, ClinicianBusy, PatientBusy) as error:
            self.check_refusal(error, request, uuid4())
        else:
            self.appointments.append(changed[0].id)

    @rule(
        first=st.tuples(st.integers(0, 1), st.integers(0, 2), starts, lengths),
        second=st.tuples(st.integers(0, 1), st.integers(0, 2), starts, lengths),
    )
    def race_two_bookers(
        self, first: tuple[int, int, datetime, int], second: tuple[int, int, datetime, int]
    ) -> None:
        """Both read the same state; the first commits; the second's commit conflicts if it
        shares a schedule with the first, and it retries on fresh state."""
        requests = [self.request(*first), self.request(*second)]
        prepared: list[list[Any] | DomainError] = []
        for request in requests:
            try:
                prepared.append(prepare_booking(self.store, request))
            except (OutsideWorkingHours, ClinicianBusy, PatientBusy) as error:
                self.check_refusal(error, request, uuid4())
                prepared.append(error)
        for request, attempt in zip(requests, prepared, strict=True):
            if isinstance(attempt, DomainError):
                continue
            try:
                self.store.save(*attempt)
            except Conflict:
                self.conflicts += 1
                try:
                    attempt = with_retries(
                        self.store, lambda r=request: prepare_booking(self.store, r)
                    )
                except (ClinicianBusy, PatientBusy) as error:
                    self.check_refusal(error, request, uuid4())
                    continue
            self.appointments.append(attempt[0].id)

    @rule(data=st.data(), start=starts, minutes=lengths)
    def reschedule(self, data: st.DataObject, start: datetime, minutes: int) -> None:
        self.change(data.draw(st.sampled_from(self.appointments)), "reschedule", start, minutes)

    @rule(
        data=st.data(),
        action=st.sampled_from(["cancel", "check-in", "complete", "mark-no-show"]),
    )
    def move_on(self, data: st.DataObject, action: str) -> None:
        self.change(data.draw(st.sampled_from(self.appointments)), action, BASE, 30)

    def change(self, appointment_id: UUID, action: str, start: datetime, minutes: int) -> None:
        timing = Timing(start, minutes)
        before = self.store.get(appointment_id)
        try:
            with_retries(
                self.store, lambda: prepare_change(self.store, appointment_id, action, timing)
            )
        except InvalidTransition:
            self.refusals.add("InvalidTransition")
            assert (before.status, action) not in ALLOWED
        except (OutsideWorkingHours, ClinicianBusy, PatientBusy) as error:
            request = Booking(before.patient_id, before.clinician_id, timing, before.reason)
            self.check_refusal(error, request, appointment_id)
        else:
            after = self.store.get(appointment_id)
            assert after.status == ALLOWED[before.status, action]
            return
        assert state_of(self.store.get(appointment_id)) == state_of(before)

    @invariant()
    def no_owner_has_overlapping_active_appointments(self) -> None:
        active = [a for a in self.store.all_of(Appointment) if a.active]
        for a, b in combinations(active, 2):
            if a.clinician_id == b.clinician_id or a.patient_id == b.patient_id:
                assert not overlap(a, b), (a.id, b.id)

    @invariant()
    def the_schedules_hold_exactly_the_active_appointments(self) -> None:
        expected: dict[UUID, dict[UUID, tuple[datetime, datetime]]] = {}
        for a in self.store.all_of(Appointment):
            if a.active:
                for key in schedule_keys(a.clinician_id, a.patient_id, a.start, a.end):
                    expected.setdefault(schedule_id(*key), {})[a.id] = (a.start, a.end)
        held = {s.id: s.entries for s in self.store.all_of(Schedule) if s.entries}
        assert held == expected


TestBookingThroughSchedules = BookingThroughSchedules.TestCase
TestBookingThroughSchedules.settings = settings(
    max_examples=80, stateful_step_count=25, deadline=None
)


def test_the_machine_meets_every_kind_of_refusal_and_a_lost_race():
    """Guards the machine above against testing nothing: its rules can reach every refusal,
    and a racing booker does lose on the schedule's version."""
    machine = BookingThroughSchedules()
    hour = timedelta(hours=1)
    machine.book(0, 0, BASE + hour, 120)  # 19:00-21:00 UTC
    machine.book(0, 1, BASE + 1.5 * hour, 60)  # the clinician is busy
    machine.book(1, 0, BASE + 2 * hour, 30)  # the patient is busy
    machine.book(1, 2, BASE, 30)  # 18:00 UTC is 19:00 BST: not working
    machine.race_two_bookers((1, 1, BASE + 4 * hour, 60), (1, 2, BASE + 4.5 * hour, 60))
    first, raced = machine.appointments
    machine.change(first, "complete", BASE, 30)  # booked cannot be completed
    assert machine.refusals == {
        "ClinicianBusy",
        "PatientBusy",
        "OutsideWorkingHours",
        "InvalidTransition",
    }
    assert machine.conflicts == 1
    machine.no_owner_has_overlapping_active_appointments()
    machine.the_schedules_hold_exactly_the_active_appointments()
    machine.change(first, "cancel", BASE, 30)  # cancelling frees the time for others
    machine.book(0, 2, BASE + hour, 60)
    machine.change(raced, "reschedule", BASE + 7 * hour, 240)  # 01:00-05:00 UTC: too late
    assert len(machine.appointments) == 3
    assert machine.store.get(raced).start == BASE + 4 * hour
    machine.change(raced, "reschedule", BASE + 6 * hour, 60)  # across midnight UTC
    assert len(schedule_days(machine.store.get(raced).start, machine.store.get(raced).end)) == 1
    machine.change(raced, "reschedule", BASE + 5.5 * hour, 60)
    machine.the_schedules_hold_exactly_the_active_appointments()
    assert sum(1 for s in machine.store.all_of(Schedule) if raced in s.entries) == 4
