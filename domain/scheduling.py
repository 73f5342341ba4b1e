"""The appointments slice: clinicians, their hours, appointments and the schedules
that make double-booking impossible. No I/O happens here.

A `Clinician` has a time zone and weekly working hours in local wall-clock time,
plus time off. An `Appointment` moves through a small status machine (booked,
checked-in, completed, cancelled, no-show). Neither can see the other
appointments of the same clinician or patient, so neither can stop two
appointments from overlapping. That is the `Schedule`'s job.

Why a Schedule per owner and UTC day
------------------------------------
Overlap is a rule across aggregates, and the only thing the event store makes
atomic is a version check per aggregate within one transaction. So every
appointment is entered in a `Schedule` aggregate for each (owner kind, owner id,
UTC calendar day) that it touches: the clinician's schedules and the patient's.
The id of a schedule is derived (uuid5) from that triple, so every writer finds
the same one without a lookup, and creating it twice conflicts like any other
write. A schedule holds the active (booked or checked-in) entries that touch its
day, and `reserve` refuses an entry that overlaps another appointment's.

The command service, in ONE event-store transaction, saves the Appointment and
every schedule it touched. Two bookers racing for one slot both load version n
of the same schedule; both reserve on their copy; the first to commit writes
version n+1 and the second's insert of n+1 conflicts, so its whole transaction
(appointment included) is rolled back. It retries on fresh state, where
`reserve` now raises `SlotTaken` - which the service reports as `ClinicianBusy`
or `PatientBusy` by the schedule's kind (`SlotTaken.busy()`). Bookers of slots
that do not share a day of one owner never touch the same aggregate, so they
never contend.

An appointment lasts at most `DURATION_MAX` (240) minutes, so it touches at most
two UTC days: at most four schedules per booking. Days are UTC, not the
clinician's local days, because a UTC day is the same for every owner and every
reader, has always 24 hours, and two appointments that overlap in time always
share a UTC day, whatever the time zones of the people involved.

Time
----
Every instant kept in state or events is an aware datetime in UTC. Working hours
are local wall-clock times, turned into instants with `zoneinfo` for each local
date, so daylight-saving days are right: a working interval starts at the first
instant at which the local clock shows its start (or a later time) and ends at
the first instant at which the clock shows its end (or a later time). So a time
the clock skips (spring forward) means the moment of the jump, and a time the
clock shows twice (autumn) means its first showing. Slot lengths are real
elapsed minutes.

Events are facts: replaying them never re-validates (rules may tighten later,
history must still load), so event bodies only convert recorded data to state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from functools import cache
from typing import ClassVar, Literal
from uuid import UUID, uuid4, uuid5
from zoneinfo import ZoneInfo, available_timezones

from eventsourcing.domain import event

from domain.errors import DomainError, InvalidData
from domain.events import TracedAggregate
from domain.patients import _EMAIL, EMAIL_MAX, NAME_MAX, _text

DURATION_MIN = 5
DURATION_MAX = 240
DURATION_STEP = 5
REASON_MAX = 500
TIMEZONE_MAX = 64
INTERVALS_PER_DAY_MAX = 24
"""More would be no working pattern anyone has; the cap keeps a request small."""

WEEKDAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
"""The working-hours keys, in `date.weekday()` order (Monday is 0)."""

CLINICIAN: Literal["clinician"] = "clinician"
PATIENT: Literal["patient"] = "patient"
ScheduleKind = Literal["clinician", "patient"]
SCHEDULE_KINDS: tuple[ScheduleKind, ...] = (CLINICIAN, PATIENT)

Interval = tuple[datetime, datetime]
"""A half-open [start, end) span of time between two aware datetimes."""

_SCHEDULES = UUID("c4a1e0d2-5b7f-4e3a-9c86-1f2d3e4a5b60")
_DAY_MINUTES = 24 * 60
# Matched with fullmatch, and with [0-9] rather than \d (which takes any script's digits).
_HHMM = re.compile(r"([0-9]{2}):([0-9]{2})")
_UUID = re.compile(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})?"
)
_LATEST_START = datetime(9999, 12, 30, tzinfo=UTC)
"""Far enough from datetime's end that adding a duration cannot overflow."""
_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})
"""Names a zoneinfo directory may hold that are not places: the host's own setting, a
template, and tzdata's "no zone configured" placeholder."""


# --- Errors --------------------------------------------------------------------------


class SchedulingError(DomainError):
    """Base class of scheduling's expected failures; `reason` is machine-readable."""

    reason: ClassVar[str] = "scheduling-error"


class ClinicianNotFound(SchedulingError):
    """No clinician has this id."""

    reason = "clinician-not-found"


class AppointmentNotFound(SchedulingError):
    """No appointment has this id."""

    reason = "appointment-not-found"


class PatientRemoved(SchedulingError):
    """The patient was removed: nothing new may be booked for them."""

    reason = "patient-removed"


class OutsideWorkingHours(SchedulingError):
    """The clinician does not work then: outside their hours, or on time off."""

    reason = "outside-working-hours"


class _Busy(SchedulingError):
    def __init__(self, appointment_id: UUID):
        self.appointment_id = appointment_id
        super().__init__(f"overlaps appointment {appointment_id}")


class ClinicianBusy(_Busy):
    """The clinician has another active appointment (`appointment_id`) that overlaps."""

    reason = "clinician-busy"


class PatientBusy(_Busy):
    """The patient has another active appointment (`appointment_id`) that overlaps."""

    reason = "patient-busy"


class SlotTaken(SchedulingError):
    """A schedule already holds an overlapping entry of another appointment.

    Raised by `Schedule.reserve`, which knows only its own kind of owner; the service
    reports it as the owner's error with `busy()`.
    """

    reason = "slot-taken"

    def __init__(self, appointment_id: UUID, kind: ScheduleKind | None = None):
        self.appointment_id = appointment_id
        self.kind = kind
        super().__init__(f"overlaps appointment {appointment_id}")

    def busy(self) -> ClinicianBusy | PatientBusy:
        """The error to report: whose time it is that is taken."""
        if self.kind == PATIENT:
            return PatientBusy(self.appointment_id)
        return ClinicianBusy(self.appointment_id)


class InvalidTransition(SchedulingError):
    """The appointment's status does not allow this action (e.g. completing a cancellation)."""

    reason = "invalid-transition"

    def __init__(self, current_status: str, action: str):
        self.current_status = str(current_status)
        self.action = action
        super().__init__(f"cannot {action} an appointment that is {self.current_status}")


# --- Working hours -------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class LocalInterval:
    """A [start, end) span of local wall-clock time in minutes after midnight.

    `end` may be 1440 ("24:00"): the interval runs to the end of the day.
    """

    start: int
    end: int

    def to_wire(self) -> list[str]:
        return [_hhmm(self.start), _hhmm(self.end)]


@dataclass(frozen=True)
class WorkingHours:
    """A week of working intervals: seven tuples, Monday first, each sorted, none overlapping.

    Intervals of one day may touch (09:00-12:00 and 12:00-17:00): they are then one
    stretch of work, and an appointment may run across the boundary.
    """

    days: tuple[tuple[LocalInterval, ...], ...]

    @classmethod
    def none(cls) -> WorkingHours:
        return cls(((),) * 7)

    def on(self, weekday: int) -> tuple[LocalInterval, ...]:
        """The intervals of a weekday, `date.weekday()` numbering."""
        return self.days[weekday]

    def to_wire(self) -> dict[str, list[list[str]]]:
        """The JSON form, as recorded in events and accepted by `parse_working_hours`."""
        return {
            key: [i.to_wire() for i in day] for key, day in zip(WEEKDAYS, self.days, strict=True)
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Sequence[Sequence[str]]]) -> WorkingHours:
        """Rebuilds recorded hours without checking them again (events are facts)."""
        return cls(
            tuple(
                tuple(sorted(LocalInterval(_minutes(s), _minutes(e)) for s, e in wire.get(key, ())))
                for key in WEEKDAYS
            )
        )


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def parse_working_hours(value: object) -> WorkingHours:
    """Checks a week of working hours and reports every wrong interval at once.

    The form is {"mon": [["09:00", "17:00"], ...], ...}; a missing weekday has no hours.
    Errors are keyed like `workingHours.mon[0]`.
    """
    errors: dict[str, str] = {}
    hours = _working_hours(errors, "workingHours", value)
    if hours is None:
        raise InvalidData(errors)
    return hours


def _working_hours(errors: dict[str, str], field: str, value: object) -> WorkingHours | None:
    if value is None:
        errors[field] = "is required"
        return None
    if not isinstance(value, Mapping):
        errors[field] = "must be an object with weekday keys (mon..sun)"
        return None
    before = len(errors)
    for key in value:
        if key not in WEEKDAYS:
            errors[f"{field}.{key}"] = "is not a weekday (mon, tue, wed, thu, fri, sat, sun)"
    days = tuple(_day(errors, f"{field}.{key}", value.get(key, [])) for key in WEEKDAYS)
    if len(errors) > before:
        return None
    return WorkingHours(days)


def _day(errors: dict[str, str], field: str, value: object) -> tuple[LocalInterval, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        errors[field] = "must be a list of [start, end] pairs"
        return ()
    if len(value) > INTERVALS_PER_DAY_MAX:
        errors[field] = f"must have at most {INTERVALS_PER_DAY_MAX} intervals"
        return ()
    parsed: list[tuple[int, LocalInterval]] = []
    for index, item in enumerate(value):
        interval = _interval(errors, f"{field}[{index}]", item)
        if interval is not None:
            parsed.append((index, interval))
    for later, (index, interval) in enumerate(parsed):
        for earlier_index, earlier in parsed[:later]:
            if interval.start < earlier.end and earlier.start < interval.end:
                errors[f"{field}[{index}]"] = f"overlaps {field}[{earlier_index}]"
                break
    return tuple(sorted(interval for _, interval in parsed))


def _interval(errors: dict[str, str], field: str, value: object) -> LocalInterval | None:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != 2:
        errors[field] = "must be a [start, end] pair of HH:MM times"
        return None
    start, end = _clock(value[0], last=_DAY_MINUTES - 1), _clock(value[1], last=_DAY_MINUTES)
    wrong = []
    if start is None:
        wrong.append("start must be a time from 00:00 to 23:59")
    if end is None:
        wrong.append("end must be a time from 00:00 to 24:00")
    if start is not None and end is not None and start >= end:
        wrong.append("start must be before end")
    if wrong or start is None or end is None:
        errors[field] = "; ".join(wrong)
        return None
    return LocalInterval(start, end)


def _clock(value: object, last: int) -> int | None:
    """Minutes after midnight of an "HH:MM" time, or None if it is not one up to `last`."""
    if not isinstance(value, str) or not (match := _HHMM.fullmatch(value)):
        return None
    hours, minutes = int(match[1]), int(match[2])
    if minutes > 59 or hours * 60 + minutes > last:
        return None
    return hours * 60 + minutes


# --- Clinicians ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClinicianDetails:
    """The facts about a clinician, already checked. `timezone` is an IANA zone name."""

    name: str
    email: str
    timezone: str
    working_hours: WorkingHours


def parse_clinician(
    *, name: object, email: object, timezone: object, working_hours: object
) -> ClinicianDetails:
    """Checks a clinician's fields and reports all that are wrong at once.

    Names and emails follow the patients' rules (same limits, same email shape).
    """
    errors: dict[str, str] = {}
    clean_name = _text(errors, "name", name, NAME_MAX)
    clean_email = _text(errors, "email", email, EMAIL_MAX)
    if "email" not in errors and not _EMAIL.match(clean_email):
        errors["email"] = "must be a valid email address"
    zone = _timezone(errors, "timezone", timezone)
    hours = _working_hours(errors, "workingHours", working_hours)
    if errors or zone is None or hours is None:
        raise InvalidData(errors)
    return ClinicianDetails(clean_name, clean_email, zone, hours)


def _timezone(errors: dict[str, str], field: str, value: object) -> str | None:
    before = len(errors)
    key = _text(errors, field, value, TIMEZONE_MAX)
    if len(errors) > before:
        return None
    if key not in _NOT_ZONES and key in _zone_names():
        try:
            ZoneInfo(key)
        except (ValueError, KeyError, OSError):
            pass
        else:
            return key
    errors[field] = "must be an IANA time zone name (e.g. Europe/London)"
    return None


@cache
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones())


class Clinician(TracedAggregate):
    """A clinician: time zone, weekly working hours, time off, and the user who signs in.

    Time off is kept per id, so a retried "add" is recognised and "remove" names what
    it removes. Whether existing appointments fall in new hours or time off is the
    service's question: this aggregate cannot see appointments.
    """

    @staticmethod
    def create_id() -> UUID:
        return uuid4()

    @classmethod
    def register(cls, details: ClinicianDetails) -> Clinician:
        return cls(
            name=details.name,
            email=details.email,
            timezone=details.timezone,
            working_hours=details.working_hours.to_wire(),
        )

    @event("Registered")
    def __init__(
        self, name: str, email: str, timezone: str, working_hours: dict[str, list[list[str]]]
    ):
        self.name = name
        self.email = email
        self.timezone = timezone
        self.working_hours = WorkingHours.from_wire(working_hours)
        self.time_off: dict[UUID, Interval] = {}
        self.user_id: UUID | None = None

    @property
    def details(self) -> ClinicianDetails:
        return ClinicianDetails(self.name, self.email, self.timezone, self.working_hours)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def change_working_hours(self, hours: WorkingHours) -> None:
        """Records the new hours; a change that changes nothing records nothing."""
        if hours != self.working_hours:
            self._working_hours_changed(working_hours=hours.to_wire())

    @event("WorkingHoursChanged")
    def _working_hours_changed(self, working_hours: dict[str, list[list[str]]]) -> None:
        self.working_hours = WorkingHours.from_wire(working_hours)

    def add_time_off(self, time_off_id: UUID, start: datetime, end: datetime) -> None:
        """Records time off [start, end). Adding the same id again with the same span is a
        retry and records nothing; with another span it is refused."""
        errors: dict[str, str] = {}
        if not _aware(start):
            errors["start"] = "must have a UTC offset"
        if not _aware(end):
            errors["end"] = "must have a UTC offset"
        elif not errors and end <= start:
            errors["end"] = "must be after start"
        if errors:
            raise InvalidData(errors)
        span = (start.astimezone(UTC), end.astimezone(UTC))
        known = self.time_off.get(time_off_id)
        if known == span:
            return
        if known is not None:
            raise InvalidData({"timeOffId": "is already used for other time off"})
        self._time_off_added(time_off_id=time_off_id, start=span[0], end=span[1])

    @event("TimeOffAdded")
    def _time_off_added(self, time_off_id: UUID, start: datetime, end: datetime) -> None:
        self.time_off[time_off_id] = (start, end)

    def remove_time_off(self, time_off_id: UUID) -> None:
        """Removes time off; removing what is not there records nothing (a retry)."""
        if time_off_id in self.time_off:
            self._time_off_removed(time_off_id=time_off_id)

    @event("TimeOffRemoved")
    def _time_off_removed(self, time_off_id: UUID) -> None:
        del self.time_off[time_off_id]

    def link_user(self, user_id: UUID) -> None:
        """Links the user account that acts as this clinician; relinking replaces it."""
        if user_id != self.user_id:
            self._user_linked(user_id=user_id)

    @event("UserLinked")
    def _user_linked(self, user_id: UUID) -> None:
        self.user_id = user_id

    def working_at(self, start_utc: datetime, end_utc: datetime) -> bool:
        """Whether all of [start, end) lies inside one stretch of working time.

        A stretch is a working interval of a local date, joined with any interval that
        touches it - including across midnight: a day that ends at 24:00 and a next day
        that starts at 00:00 are one stretch, so an appointment may run across midnight
        then and only then.
        """
        _require_span(start_utc, end_utc)
        zone = self.zone
        day = start_utc.astimezone(zone).date()
        last = end_utc.astimezone(zone).date()
        spans: list[Interval] = []
        while day <= last:
            spans += _day_spans(zone, day, self.working_hours.on(day.weekday()))
            day += timedelta(days=1)
        return any(s <= start_utc and end_utc <= e for s, e in _merged(spans))

    def off_at(self, start_utc: datetime, end_utc: datetime) -> bool:
        """Whether [start, end) overlaps any time off."""
        _require_span(start_utc, end_utc)
        return any(_overlaps((start_utc, end_utc), off) for off in self.time_off.values())

    def require_available(self, start_utc: datetime, end_utc: datetime) -> None:
        """Raises `OutsideWorkingHours` unless the clinician works all of [start, end)."""
        if not self.working_at(start_utc, end_utc):
            raise OutsideWorkingHours("the clinician does not work then")
        if self.off_at(start_utc, end_utc):
            raise OutsideWorkingHours("the clinician has time off then")


def local_day_utc(timezone: str, day: date) -> Interval:
    """The UTC span of a local calendar date (23, 24 or 25 hours around DST changes)."""
    zone = ZoneInfo(timezone)
    return _first_showing(zone, day, 0), _first_showing(zone, day, _DAY_MINUTES)


def free_slots(
    clinician: Clinician, day_local: date, duration_minutes: int, busy: Iterable[Interval]
) -> list[Interval]:
    """The bookable [start, end) slots of `duration_minutes` on the clinician's local date.

    The grid: each stretch of the day's working time (its intervals, joined where they
    touch) is cut into back-to-back slots of the requested length from the stretch's
    start; a remainder too short for a slot is not offered. So a 30-minute request in
    09:00-17:00 offers 09:00, 09:30, ... 16:30, and slots never overlap each other. A
    slot that overlaps time off or anything in `busy` is left out (not shifted). Slots
    are real elapsed time: on a DST day the stretch is an hour shorter or longer, and
    slots run across the jump. Slots are not filtered by "now": the caller does that.
    """
    return free_slots_in(
        clinician.timezone,
        clinician.working_hours,
        clinician.time_off.values(),
        day_local,
        duration_minutes,
        busy,
    )


def free_slots_in(
    timezone: str,
    working_hours: WorkingHours,
    time_off: Iterable[Interval],
    day_local: date,
    duration_minutes: int,
    busy: Iterable[Interval],
) -> list[Interval]:
    """`free_slots` from a clinician's facts as a read model keeps them."""
    errors: dict[str, str] = {}
    _duration(errors, "durationMinutes", duration_minutes)
    if errors:
        raise InvalidData(errors)
    length = timedelta(minutes=duration_minutes)
    blocked = sorted([*busy, *time_off])
    slots: list[Interval] = []
    for stretch_start, stretch_end in _day_spans(
        ZoneInfo(timezone), day_local, working_hours.on(day_local.weekday())
    ):
        slot_start = stretch_start
        while slot_start + length <= stretch_end:
            slot = (slot_start, slot_start + length)
            if not any(_overlaps(slot, b) for b in blocked):
                slots.append(slot)
            slot_start += length
    return slots


def _day_spans(zone: ZoneInfo, day: date, intervals: Iterable[LocalInterval]) -> list[Interval]:
    """A local date's working intervals as UTC spans, joined where they touch."""
    spans = [
        (_first_showing(zone, day, i.start), _first_showing(zone, day, i.end)) for i in intervals
    ]
    return _merged([(s, e) for s, e in spans if s < e])


def _merged(spans: Iterable[Interval]) -> list[Interval]:
    """Sorted spans with those that overlap or touch joined."""
    joined: list[Interval] = []
    for start, end in sorted(spans):
        if joined and start <= joined[-1][1]:
            joined[-1] = (joined[-1][0], max(end, joined[-1][1]))
        else:
            joined.append((start, end))
    return joined


def _first_showing(zone: ZoneInfo, day: date, minute: int) -> datetime:
    """The first instant at which the local clock on `day` shows `minute` after midnight
    or a later time (minute 1440 is the next day's 00:00).

    Normally that is simply the wall time's instant. A time shown twice (autumn) is its
    first showing (`fold=0`). A time the clock skips (spring forward) is the instant of
    the jump, found by bisection between the instants the skipped time would have under
    the offsets before and after it.
    """
    wall = datetime.combine(day, time()) + timedelta(minutes=minute)
    after = wall.replace(tzinfo=zone).astimezone(UTC)
    if after.astimezone(zone).replace(tzinfo=None) == wall:
        return after
    before = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if before >= after:  # no forward jump after all (never so in tzdata): take the reading
        return after
    lo, hi = int(before.timestamp()), int(after.timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, zone).replace(tzinfo=None) >= wall:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def _aware(value: object) -> bool:
    return isinstance(value, datetime) and value.utcoffset() is not None


def _require_span(start: datetime, end: datetime) -> None:
    if not (_aware(start) and _aware(end)):
        raise ValueError("start and end must be aware datetimes")
    if end <= start:
        raise ValueError("end must be after start")


def _overlaps(a: Interval, b: Interval) -> bool:
    """Whether two half-open spans share an instant; touching (a.end == b.start) is not."""
    return a[0] < b[1] and b[0] < a[1]


# --- Booking requests ----------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """When an appointment is: its start (UTC, on a whole minute) and length."""

    start: datetime
    duration_minutes: int

    @property
    def end(self) -> datetime:
        return self.start + timedelta(minutes=self.duration_minutes)


@dataclass(frozen=True)
class Booking:
    """A checked request to book: who, with whom, when, and why."""

    patient_id: UUID
    clinician_id: UUID
    timing: Timing
    reason: str

    @property
    def start(self) -> datetime:
        return self.timing.start

    @property
    def end(self) -> datetime:
        return self.timing.end


def parse_booking(
    *,
    patient_id: object,
    clinician_id: object,
    start: object,
    duration_minutes: object,
    reason: object,
    now: datetime,
) -> Booking:
    """Checks a booking's fields and reports all that are wrong at once."""
    errors: dict[str, str] = {}
    patient = _uuid(errors, "patientId", patient_id)
    clinician = _uuid(errors, "clinicianId", clinician_id)
    timing = _timing(errors, start, duration_minutes, now)
    clean_reason = _text(errors, "reason", reason, REASON_MAX)
    if errors or patient is None or clinician is None or timing is None:
        raise InvalidData(errors)
    return Booking(patient, clinician, timing, clean_reason)


def parse_reschedule(*, start: object, duration_minutes: object, now: datetime) -> Timing:
    """Checks a reschedule's new start and length and reports all that are wrong at once."""
    errors: dict[str, str] = {}
    timing = _timing(errors, start, duration_minutes, now)
    if errors or timing is None:
        raise InvalidData(errors)
    return timing


def parse_cancellation(*, reason: object) -> str:
    """Checks why an appointment is cancelled: the same rules as a booking's reason."""
    errors: dict[str, str] = {}
    clean = _text(errors, "reason", reason, REASON_MAX)
    if errors:
        raise InvalidData(errors)
    return clean


def parse_time_off(*, start: object, end: object) -> Interval:
    """Checks a time-off span: two RFC 3339 date-times with offsets, start before end."""
    errors: dict[str, str] = {}
    first = _instant(errors, "start", start)
    last = _instant(errors, "end", end)
    if first is not None and last is not None and last <= first:
        errors["end"] = "must be after start"
    if errors or first is None or last is None:
        raise InvalidData(errors)
    return first, last


def parse_user_link(*, user_id: object) -> UUID:
    """Checks the id of the auth user a clinician signs in as."""
    errors: dict[str, str] = {}
    user = _uuid(errors, "userId", user_id)
    if errors or user is None:
        raise InvalidData(errors)
    return user


def _timing(
    errors: dict[str, str], start: object, duration_minutes: object, now: datetime
) -> Timing | None:
    if not _aware(now):
        raise ValueError("now must be an aware datetime")
    when = _instant(errors, "start", start)
    if when is not None and when <= now:
        errors["start"] = "must be in the future"
    minutes = _duration(errors, "durationMinutes", duration_minutes)
    if when is None or minutes is None or "start" in errors:
        return None
    return Timing(when, minutes)


def _instant(errors: dict[str, str], field: str, value: object) -> datetime | None:
    """An RFC 3339 date-time with an offset, as UTC, on a whole minute."""
    if value is None:
        errors[field] = "is required"
        return None
    if not isinstance(value, str):
        errors[field] = "must be an RFC 3339 date-time string"
        return None
    match = _RFC3339.fullmatch(value)
    if match is None:
        errors[field] = "must be an RFC 3339 date-time (e.g. 2026-07-01T09:00:00+01:00)"
        return None
    seconds, fraction, offset = match.groups()
    if offset is None:
        errors[field] = "must include a UTC offset (Z or +HH:MM)"
        return None
    try:
        instant = datetime.fromisoformat(value.upper()).astimezone(UTC)
    except (ValueError, OverflowError):
        errors[field] = "must be an RFC 3339 date-time (e.g. 2026-07-01T09:00:00+01:00)"
        return None
    if seconds != "00" or (fraction or "0").strip("0"):
        errors[field] = "must be on a whole minute"
        return None
    if instant > _LATEST_START:
        errors[field] = "is out of range"
        return None
    return instant


def _duration(errors: dict[str, str], field: str, value: object) -> int | None:
    if value is None:
        errors[field] = "is required"
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        errors[field] = "must be an integer"
        return None
    if not DURATION_MIN <= value <= DURATION_MAX:
        errors[field] = f"must be between {DURATION_MIN} and {DURATION_MAX}"
        return None
    if value % DURATION_STEP:
        errors[field] = f"must be a multiple of {DURATION_STEP}"
        return None
    return value


def _uuid(errors: dict[str, str], field: str, value: object) -> UUID | None:
    if isinstance(value, UUID):
        return value
    if value is None:
        errors[field] = "is required"
        return None
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        errors[field] = "must be a UUID"
        return None
    return UUID(value)


# --- Appointments --------------------------------------------------------------------


class AppointmentStatus(StrEnum):
    BOOKED = "booked"
    CHECKED_IN = "checked-in"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    NO_SHOW = "no-show"


ACTIVE_STATUSES = frozenset({AppointmentStatus.BOOKED, AppointmentStatus.CHECKED_IN})
"""The statuses that hold time in schedules."""

_ALLOWED: dict[AppointmentStatus, frozenset[str]] = {
    AppointmentStatus.BOOKED: frozenset({"reschedule", "cancel", "check-in", "mark-no-show"}),
    AppointmentStatus.CHECKED_IN: frozenset({"complete"}),
    AppointmentStatus.COMPLETED: frozenset(),
    AppointmentStatus.CANCELLED: frozenset(),
    AppointmentStatus.NO_SHOW: frozenset(),
}
"""booked -> booked (rescheduled), cancelled, checked-in or no-show; checked-in -> completed.
Completed, cancelled and no-show are final."""


class Appointment(TracedAggregate):
    """A patient's appointment with a clinician. Whether it overlaps others is kept by the
    schedules, which the service updates in the same transaction."""

    @staticmethod
    def create_id() -> UUID:
        return uuid4()

    @classmethod
    def book(cls, booking: Booking, appointment_id: UUID | None = None) -> Appointment:
        """A new appointment; `appointment_id` chosen by the caller (an idempotent create)."""
        # `_create` is what calling the class does, with the id chosen here when given.
        return cls._create(
            cls.Booked,  # type: ignore[attr-defined]  # made by @event("Booked")
            id=appointment_id,
            patient_id=booking.patient_id,
            clinician_id=booking.clinician_id,
            start=booking.start,
            duration_minutes=booking.timing.duration_minutes,
            reason=booking.reason,
        )

    @event("Booked")
    def __init__(
        self,
        patient_id: UUID,
        clinician_id: UUID,
        start: datetime,
        duration_minutes: int,
        reason: str,
    ):
        self.patient_id = patient_id
        self.clinician_id = clinician_id
        self.start = start
        self.duration_minutes = duration_minutes
        self.reason = reason
        self.status = AppointmentStatus.BOOKED
        self.cancellation_reason: str | None = None

    @property
    def end(self) -> datetime:
        return self.start + timedelta(minutes=self.duration_minutes)

    @property
    def timing(self) -> Timing:
        return Timing(self.start, self.duration_minutes)

    @property
    def active(self) -> bool:
        """Whether the appointment holds its time in the schedules."""
        return self.status in ACTIVE_STATUSES

    def reschedule(self, timing: Timing) -> None:
        """Moves a booked appointment; moving it to where it is records nothing."""
        self._require("reschedule")
        if not _aware(timing.start):
            raise ValueError("start must be an aware datetime")
        errors: dict[str, str] = {}
        _duration(errors, "durationMinutes", timing.duration_minutes)
        if errors:
            raise InvalidData(errors)
        if timing != self.timing:
            self._rescheduled(
                start=timing.start.astimezone(UTC), duration_minutes=timing.duration_minutes
            )

    @event("Rescheduled")
    def _rescheduled(self, start: datetime, duration_minutes: int) -> None:
        self.start = start
        self.duration_minutes = duration_minutes

    def cancel(self, reason: str) -> None:
        self._require("cancel")
        self._cancelled(reason=parse_cancellation(reason=reason))

    @event("Cancelled")
    def _cancelled(self, reason: str) -> None:
        self.status = AppointmentStatus.CANCELLED
        self.cancellation_reason = reason

    def check_in(self) -> None:
        self._require("check-in")
        self._checked_in()

    @event("CheckedIn")
    def _checked_in(self) -> None:
        self.status = AppointmentStatus.CHECKED_IN

    def complete(self) -> None:
        self._require("complete")
        self._completed()

    @event("Completed")
    def _completed(self) -> None:
        self.status = AppointmentStatus.COMPLETED

    def mark_no_show(self) -> None:
        self._require("mark-no-show")
        self._marked_no_show()

    @event("MarkedNoShow")
    def _marked_no_show(self) -> None:
        self.status = AppointmentStatus.NO_SHOW

    def _require(self, action: str) -> None:
        if action not in _ALLOWED[self.status]:
            raise InvalidTransition(self.status, action)


# --- Schedules -----------------------------------------------------------------------


def schedule_id(kind: ScheduleKind, owner_id: UUID, day: date) -> UUID:
    """The id of an owner's schedule for a UTC day: the same for every writer."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"kind must be one of {SCHEDULE_KINDS}, not {kind!r}")
    return uuid5(_SCHEDULES, f"{kind}:{owner_id}:{day.isoformat()}")


def schedule_days(start_utc: datetime, end_utc: datetime) -> list[date]:
    """The UTC days that [start, end) touches. The end is exclusive: an appointment that
    ends at 00:00 UTC does not touch the next day."""
    _require_span(start_utc, end_utc)
    day = start_utc.astimezone(UTC).date()
    last = (end_utc.astimezone(UTC) - timedelta(microseconds=1)).date()
    days = []
    while day <= last:
        days.append(day)
        day += timedelta(days=1)
    return days


def schedule_keys(
    clinician_id: UUID, patient_id: UUID, start_utc: datetime, end_utc: datetime
) -> list[tuple[ScheduleKind, UUID, date]]:
    """The (kind, owner id, day) of every schedule an appointment at [start, end) is
    entered in: the clinician's first, then the patient's, each day by day. A service
    reserves in all of them (or, on a reschedule, releases those it no longer touches)."""
    days = schedule_days(start_utc, end_utc)
    return [(CLINICIAN, clinician_id, day) for day in days] + [
        (PATIENT, patient_id, day) for day in days
    ]


def _day_bounds(day: date) -> Interval:
    start = datetime.combine(day, time(), tzinfo=UTC)
    return start, start + timedelta(days=1)


class Schedule(TracedAggregate):
    """One owner's active appointments that touch one UTC day: the consistency boundary
    that keeps an owner's appointments from overlapping (see the module docstring)."""

    @staticmethod
    def create_id(kind: ScheduleKind, owner_id: UUID, day: date) -> UUID:
        return schedule_id(kind, owner_id, day)

    @classmethod
    def open(cls, kind: ScheduleKind, owner_id: UUID, day: date) -> Schedule:
        """A new, empty schedule. Two writers opening the same one conflict on its id."""
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"kind must be one of {SCHEDULE_KINDS}, not {kind!r}")
        return cls(kind=kind, owner_id=owner_id, day=day)

    @event("Opened")
    def __init__(self, kind: ScheduleKind, owner_id: UUID, day: date):
        self.kind: ScheduleKind = kind
        self.owner_id = owner_id
        self.day = day
        self.entries: dict[UUID, Interval] = {}

    def reserve(self, appointment_id: UUID, start: datetime, end: datetime) -> None:
        """Enters [start, end) for the appointment, replacing its earlier entry if any.

        Raises `SlotTaken` with the earliest overlapping entry of another appointment.
        Entering the same span again records nothing (a retry).
        """
        _require_span(start, end)
        span = (start.astimezone(UTC), end.astimezone(UTC))
        if not _overlaps(span, _day_bounds(self.day)):
            raise ValueError(f"[{start}, {end}) does not touch {self.day}")
        if self.entries.get(appointment_id) == span:
            return
        for other, taken in sorted(self.entries.items(), key=lambda item: (item[1], item[0])):
            if other != appointment_id and _overlaps(span, taken):
                raise SlotTaken(other, self.kind)
        self._reserved(appointment_id=appointment_id, start=span[0], end=span[1])

    @event("Reserved")
    def _reserved(self, appointment_id: UUID, start: datetime, end: datetime) -> None:
        self.entries[appointment_id] = (start, end)

    def release(self, appointment_id: UUID) -> None:
        """Removes the appointment's entry; releasing what is not held records nothing."""
        if appointment_id in self.entries:
            self._released(appointment_id=appointment_id)

    @event("Released")
    def _released(self, appointment_id: UUID) -> None:
        del self.entries[appointment_id]

    def busy(self) -> list[Interval]:
        """The held spans, earliest first (for `free_slots`)."""
        return sorted(self.entries.values())
