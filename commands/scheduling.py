"""Use cases of the appointments slice: clinicians and appointments, get → decide → save.

Every booking, reschedule and release saves the appointment together with every
`Schedule` it touches (the clinician's and the patient's, per UTC day) in ONE
event-store transaction, so two writers racing for overlapping time conflict on a
schedule's version and the loser decides again on fresh state: it gets
`ClinicianBusy` or `PatientBusy`. The read model is never the judge; it lags.
See docs/appointments.md for the consistency boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID, uuid4

from eventsourcing.application import AggregateNotFoundError

from commands.group_commit import GroupCommit
from commands.service import retrying
from commands.store import EventStore
from domain.errors import InvalidData, PatientNotFound, StaleVersion
from domain.patients import Patient
from domain.scheduling import (
    Appointment,
    AppointmentNotFound,
    Booking,
    Clinician,
    ClinicianDetails,
    ClinicianNotFound,
    PatientRemoved,
    Schedule,
    ScheduleKind,
    SlotTaken,
    Timing,
    WorkingHours,
    schedule_id,
    schedule_keys,
)

A = TypeVar("A")


@dataclass(frozen=True)
class Saved:
    """What a command changed: the aggregate's new version and its last event's position."""

    id: UUID
    version: int
    position: int | None
    aggregate: Any


class NotYourAppointment(Exception):
    """A clinician acted on an appointment with another clinician."""


def now() -> datetime:
    return datetime.now(UTC)


class SchedulingService:
    """Registers clinicians and books, moves and closes appointments in the event store."""

    def __init__(self, store: EventStore, writer: GroupCommit | None = None):
        self.store = store
        self.writer = writer or GroupCommit(store)

    # --- clinicians ---------------------------------------------------------------------

    def register_clinician(
        self, details: ClinicianDetails, correlation_id: str | None = None
    ) -> Saved:
        return retrying(
            lambda: self._save(Clinician.register(details)), correlation_id, self.store.caches
        )

    def change_working_hours(
        self,
        clinician_id: UUID,
        hours: WorkingHours,
        expected_version: int | None = None,
        correlation_id: str | None = None,
    ) -> Saved:
        def attempt() -> Saved:
            clinician = self.clinician(clinician_id, expected_version)
            clinician.change_working_hours(hours)
            return self._save(clinician)

        return retrying(attempt, correlation_id, self.store.caches)

    def add_time_off(
        self,
        clinician_id: UUID,
        start: datetime,
        end: datetime,
        time_off_id: UUID | None = None,
        correlation_id: str | None = None,
    ) -> tuple[UUID, Saved]:
        chosen = time_off_id or uuid4()

        def attempt() -> Saved:
            clinician = self.clinician(clinician_id)
            clinician.add_time_off(chosen, start, end)
            return self._save(clinician)

        return chosen, retrying(attempt, correlation_id, self.store.caches)

    def remove_time_off(
        self, clinician_id: UUID, time_off_id: UUID, correlation_id: str | None = None
    ) -> Saved:
        def attempt() -> Saved:
            clinician = self.clinician(clinician_id)
            if time_off_id not in clinician.time_off:
                raise TimeOffNotFound(str(time_off_id))
            clinician.remove_time_off(time_off_id)
            return self._save(clinician)

        return retrying(attempt, correlation_id, self.store.caches)

    def link_user(
        self, clinician_id: UUID, user_id: UUID, correlation_id: str | None = None
    ) -> Saved:
        def attempt() -> Saved:
            clinician = self.clinician(clinician_id)
            clinician.link_user(user_id)
            return self._save(clinician)

        return retrying(attempt, correlation_id, self.store.caches)

    # --- appointments -------------------------------------------------------------------

    def book(
        self,
        booking: Booking,
        correlation_id: str | None = None,
        appointment_id: UUID | None = None,
    ) -> Saved:
        """Books if the patient is current and both are free; saves it with its schedules.

        With `appointment_id` (an idempotent create's), an appointment already stored
        under it is the answer: this booking's earlier request saved it.
        """

        def attempt() -> Saved:
            if appointment_id is not None:
                try:
                    stored = self._get(appointment_id, Appointment, AppointmentNotFound)
                except AppointmentNotFound:
                    pass
                else:
                    position = self.store.position_of(stored.id, stored.version)
                    return Saved(stored.id, stored.version, position, stored)
            errors: dict[str, str] = {}
            try:
                self._require_patient(booking.patient_id)
            except InvalidData as unknown:
                errors |= unknown.errors
            try:
                clinician = self._known_clinician(booking.clinician_id)
            except InvalidData as unknown:
                errors |= unknown.errors
            if errors:
                raise InvalidData(errors)
            clinician.require_available(booking.start, booking.end)
            appointment = Appointment.book(booking, appointment_id)
            schedules = self._reserve(appointment)
            return self._save(appointment, *schedules)

        return retrying(attempt, correlation_id, self.store.caches)

    def reschedule(
        self,
        appointment_id: UUID,
        timing: Timing,
        expected_version: int | None = None,
        correlation_id: str | None = None,
    ) -> Saved:
        def attempt() -> Saved:
            appointment = self.appointment(appointment_id, expected_version)
            before = self._schedules_of(appointment)
            appointment.reschedule(timing)
            self._require_patient(appointment.patient_id)
            clinician = self.clinician(appointment.clinician_id, current=True)
            clinician.require_available(appointment.start, appointment.end)
            kept = self._reserve(appointment)
            kept_ids = {s.id for s in kept}
            released = [s for s in before if s.id not in kept_ids]
            for schedule in released:
                schedule.release(appointment.id)
            return self._save(appointment, *kept, *released)

        return retrying(attempt, correlation_id, self.store.caches)

    def cancel(
        self,
        appointment_id: UUID,
        reason: str,
        expected_version: int | None = None,
        correlation_id: str | None = None,
    ) -> Saved:
        return self._transition(
            appointment_id, lambda a: a.cancel(reason), expected_version, None, correlation_id
        )

    ATTENDING = {
        "check-in": Appointment.check_in,
        "complete": Appointment.complete,
        "no-show": Appointment.mark_no_show,
    }
    """What a clinician does with an appointment on the day, by its route name."""

    def attend(
        self,
        appointment_id: UUID,
        action: str,
        expected_version: int | None = None,
        acting_user: UUID | None = None,
        correlation_id: str | None = None,
    ) -> Saved:
        """Checks in, completes or marks a no-show; a clinician only on their own."""
        return self._transition(
            appointment_id, self.ATTENDING[action], expected_version, acting_user, correlation_id
        )

    def _transition(
        self,
        appointment_id: UUID,
        change: Any,
        expected_version: int | None,
        acting_user: UUID | None,
        correlation_id: str | None,
    ) -> Saved:
        """Applies a status change; an appointment that stops holding time is released."""

        def attempt() -> Saved:
            appointment = self.appointment(appointment_id, expected_version)
            if acting_user is not None:
                clinician = self.clinician(appointment.clinician_id, current=True)
                if getattr(clinician, "user_id", None) != acting_user:
                    raise NotYourAppointment(str(appointment_id))
            change(appointment)
            released: list[Schedule] = []
            if not appointment.active:
                released = self._schedules_of(appointment)
                for schedule in released:
                    schedule.release(appointment.id)
            return self._save(appointment, *released)

        return retrying(attempt, correlation_id, self.store.caches)

    # --- reading aggregates -------------------------------------------------------------

    def clinician(
        self, clinician_id: UUID, expected_version: int | None = None, *, current: bool = False
    ) -> Clinician:
        """The clinician; `current=True` when the command reads it but does not save it."""
        clinician = self._get(clinician_id, Clinician, ClinicianNotFound, current=current)
        _expect(clinician, expected_version)
        return clinician

    def appointment(self, appointment_id: UUID, expected_version: int | None = None) -> Appointment:
        appointment = self._get(appointment_id, Appointment, AppointmentNotFound)
        _expect(appointment, expected_version)
        return appointment

    def _known_clinician(self, clinician_id: UUID) -> Clinician:
        try:
            return self.clinician(clinician_id, current=True)
        except ClinicianNotFound:
            raise InvalidData({"clinicianId": "no such clinician"}) from None

    def _require_patient(self, patient_id: UUID) -> None:
        try:
            patient = self._get(patient_id, Patient, PatientNotFound, current=True)
        except PatientNotFound:
            raise InvalidData({"patientId": "no such patient"}) from None
        if patient.removed or patient.erased:
            raise PatientRemoved(str(patient_id))

    def _get(
        self, aggregate_id: UUID, kind: type[A], missing: type[Exception], current: bool = False
    ) -> A:
        try:
            found: object = self.store.load(aggregate_id, current=current)
        except AggregateNotFoundError:
            raise missing(str(aggregate_id)) from None
        if not isinstance(found, kind):
            raise missing(str(aggregate_id))
        return found

    def _schedule(self, kind: ScheduleKind, owner_id: UUID, day: Any) -> Schedule:
        try:
            found: object = self.store.load(schedule_id(kind, owner_id, day))
        except AggregateNotFoundError:
            return Schedule.open(kind, owner_id, day)
        assert isinstance(found, Schedule)
        return found

    def _reserve(self, appointment: Appointment) -> list[Schedule]:
        """Enters the appointment in every schedule it touches; SlotTaken → who is busy."""
        keys = schedule_keys(
            appointment.clinician_id, appointment.patient_id, appointment.start, appointment.end
        )
        schedules = [self._schedule(*key) for key in keys]
        try:
            for schedule in schedules:
                schedule.reserve(appointment.id, appointment.start, appointment.end)
        except SlotTaken as taken:
            raise taken.busy() from None
        return schedules

    def _schedules_of(self, appointment: Appointment) -> list[Schedule]:
        keys = schedule_keys(
            appointment.clinician_id, appointment.patient_id, appointment.start, appointment.end
        )
        return [self._schedule(*key) for key in keys]

    def _save(self, main: Any, *others: Any) -> Saved:
        recordings = self.writer.save(main, *others)
        position = max(
            (r.notification.id for r in recordings if r.domain_event.originator_id == main.id),
            default=None,
        )
        return Saved(main.id, main.version, position, main)


class TimeOffNotFound(Exception):
    """The clinician has no time off with this id."""


def _expect(aggregate: Any, expected_version: int | None) -> None:
    if expected_version is not None and aggregate.version != expected_version:
        raise StaleVersion(expected_version, aggregate.version)
