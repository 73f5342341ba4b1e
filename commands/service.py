"""Use cases of the command side: one method each, get → call → save."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError, PersistenceError

from commands.group_commit import GroupCommit
from commands.store import EventStore, fresh
from domain.errors import EmailTaken, PatientErased, PatientNotFound, StaleVersion
from domain.events import correlated
from domain.patients import EmailClaim, Patient, PatientDetails, email_claim_id
from runtime.threads import in_thread

R = TypeVar("R")

# A save loses to a concurrent writer only on an aggregate's version; the retry
# decides again on fresh state (and so answers 409 or 412 where that is right).
_SAVE_ATTEMPTS = 5


@dataclass(frozen=True)
class Written:
    """What a command changed: the patient's new version and the event's position."""

    patient_id: UUID
    version: int
    position: int | None
    patient: Patient


def today() -> date:
    return datetime.now(UTC).date()


class PatientService:
    """Registers, changes and removes patients in the event store."""

    def __init__(self, store: EventStore, claim_key: bytes):
        """`claim_key`: the secret email claims are keyed under (`email_claim_id`)."""
        self.store = store
        self.writer = GroupCommit(store)
        self._claim_key = claim_key

    async def register_async(
        self, details: PatientDetails, registered_date: date, correlation_id: str | None = None
    ) -> Written:
        """`register` from an event loop. A new email's registration (the most common
        command) is decided in the loop and saved through the group commit with no thread
        of its own; anything that must read the store first (an email this process
        knows, a retry after a conflict) goes to a thread as `register`."""
        claim_id = self.claim_id(details.email)
        if self.store.knows(claim_id):
            return await in_thread(self.register, details, registered_date, correlation_id)
        with correlated(correlation_id):
            patient = Patient.register(details, registered_date)
            claim = EmailClaim.take(claim_id, patient.id)
        try:
            recordings = await self.writer.save_async(patient, claim)
        except IntegrityError:
            # The email was taken after all (by another process), or this save landed
            # though its answer was lost: decided again on fresh state, in a thread.
            return await in_thread(
                self.register, details, registered_date, correlation_id, None, patient.id
            )
        return self._written(patient, recordings)

    def register(
        self,
        details: PatientDetails,
        registered_date: date,
        correlation_id: str | None = None,
        patient_id: UUID | None = None,
        retried_from: UUID | None = None,
    ) -> Written:
        """Registers a new patient; EmailTaken if a current patient has the email.

        With `patient_id` (an idempotent create's), a patient already stored under it is
        the answer: this registration's earlier request saved it. `retried_from`: the
        patient a first attempt (`register_async`) tried to save, which conflicted.
        """

        tries = 0 if retried_from is None else 1
        attempted: set[UUID] = set() if retried_from is None else {retried_from}

        def attempt() -> Written:
            nonlocal tries
            tries += 1
            if patient_id is not None and (stored := self._already_saved(patient_id)) is not None:
                return stored
            if tries > 1:
                landed = self._landed(details.email, attempted)
                if landed is not None:
                    return landed
            patient = Patient.register(details, registered_date, patient_id)
            attempted.add(patient.id)
            if tries == 1 and not self.store.knows(self.claim_id(details.email)):
                # Most emails are new: take the claim without reading it first. If it
                # exists after all, the save conflicts and the retry reads it.
                claim = EmailClaim.take(self.claim_id(details.email), patient.id)
            else:
                claim = self._claim(details.email, patient.id)
            return self._save(patient, claim)

        return retrying(attempt, correlation_id, self.store.caches, reread=retried_from is not None)

    async def change_async(
        self,
        patient_id: UUID,
        details: PatientDetails,
        expected_version: int | None = None,
        correlation_id: str | None = None,
    ) -> Written:
        """`change` from an event loop. The common change (of a patient this process has
        cached, at the version the client expects, keeping the email's claim) is decided
        in the loop and saved through the group commit with no thread of its own; the rest
        goes to a thread as `change`: what must read the store first (a patient not
        cached; a new email's claim; a refusal, which is decided on fresh state, so a 412
        names the store's version) and a retry after the save lost."""
        patient = self.store.cached(patient_id)
        retried = False
        if (
            isinstance(patient, Patient)
            and not patient.removed
            and not patient.erased
            and expected_version in (None, patient.version)
            and self.claim_id(details.email) == self.claim_id(patient.email)
        ):
            with correlated(correlation_id):
                patient.change_details(details)
            try:
                recordings = await self.writer.save_async(patient)
            except PersistenceError as exc:
                if not is_conflict(exc):
                    raise
                # Another process wrote this patient since this one cached it: decided
                # again on fresh state (so a stale If-Match is refused, not overwritten).
                retried = True
            except Exception:
                # As `retrying` does: a failure met on cached state (the patient erased
                # elsewhere, their key gone) is met again on fresh state, or not at all.
                retried = True
            else:
                return self._written(patient, recordings)
        return await in_thread(
            self.change, patient_id, details, expected_version, correlation_id, retried
        )

    def change(
        self,
        patient_id: UUID,
        details: PatientDetails,
        expected_version: int | None = None,
        correlation_id: str | None = None,
        retried: bool = False,
    ) -> Written:
        """Replaces a patient's details; StaleVersion if `expected_version` is not current.

        `retried`: a first attempt (`change_async`) lost its save, so every attempt reads
        fresh state.
        """

        def attempt() -> Written:
            patient = self._current(patient_id, expected_version)
            changed: list[Any] = [patient]
            if self.claim_id(details.email) != self.claim_id(patient.email):
                changed.append(self._claim(details.email, patient.id))
                old = self._existing_claim(patient.email)
                if old is not None:
                    old.release(patient.id)
                    changed.append(old)
            patient.change_details(details)
            return self._save(*changed)

        return retrying(attempt, correlation_id, self.store.caches, reread=retried)

    def remove(
        self,
        patient_id: UUID,
        expected_version: int | None = None,
        correlation_id: str | None = None,
    ) -> Written:
        """Removes a patient (the history stays) and frees the email."""

        def attempt() -> Written:
            patient = self._current(patient_id, expected_version)
            patient.remove()
            claim = self._existing_claim(patient.email)
            if claim is not None:
                claim.release(patient.id)
            return self._save(patient, claim)

        return retrying(attempt, correlation_id, self.store.caches)

    def set_preferences(
        self,
        patient_id: UUID,
        reminders: bool,
        expected_version: int | None = None,
        correlation_id: str | None = None,
    ) -> Written:
        """Records whether the patient wants reminders (confirmations are always sent)."""

        def attempt() -> Written:
            patient = self._current(patient_id, expected_version)
            patient.set_preferences(reminders)
            return self._save(patient)

        return retrying(attempt, correlation_id, self.store.caches)

    def keep_claim(self, patient_id: UUID) -> bool:
        """Takes the claim on a current patient's email if it lacks one (after the claim
        key changed); True if it took it. EmailTaken if another patient holds it."""

        def attempt() -> bool:
            patient = self.get(patient_id)
            claim = self._claim(patient.email, patient.id)
            if not claim.pending_events:
                return False
            self._save(patient, claim)
            return True

        return retrying(attempt, None, self.store.caches)

    def erase(
        self, patient_id: UUID, reason: str, erased_by: str, correlation_id: str | None = None
    ) -> Written:
        """Erases a patient (removed or not): destroys their data key, then records who
        erased them and why. PatientErased if they already are.

        The key goes first: once it is gone the erasure holds, in every copy, even if the
        event is never saved (a retry then saves it). The email is freed as on removal.
        """

        def attempt() -> Written:
            patient = self._stored(patient_id)
            claim = None
            if not patient.removed and patient.email is not None:
                claim = self._existing_claim(patient.email)
                if claim is not None:
                    claim.release(patient.id)
            patient.erase(reason, erased_by)
            if self.store.keyring is not None:
                self.store.keyring.destroy(patient.id)
            return self._save(patient, claim)

        return retrying(attempt, correlation_id, self.store.caches)

    def _landed(self, email: str, attempted: set[UUID]) -> Written | None:
        """The patient an earlier attempt of this registration stored, if one did.

        When the connection breaks while a commit is under way, the commit may land
        though its answer is lost; the store's retry then conflicts with it. The
        email's claim, held by one of this registration's own patients, says so.
        """
        claim = self._existing_claim(email)
        if claim is None or claim.holder not in attempted:
            return None
        stored = self.get(claim.holder)
        return Written(stored.id, stored.version, None, stored)

    def _already_saved(self, patient_id: UUID) -> Written | None:
        """The patient stored under `patient_id`, as a registration answers it; None if
        there is none yet; PatientNotFound if it has been removed since, PatientErased if
        erased."""
        try:
            self.store.load(patient_id)
        except AggregateNotFoundError:
            return None
        stored = self.get(patient_id)
        position = self.store.position_of(stored.id, stored.version)
        return Written(stored.id, stored.version, position, stored)

    def _current(self, patient_id: UUID, expected_version: int | None) -> Patient:
        patient = self.get(patient_id)
        if expected_version is not None and patient.version != expected_version:
            raise StaleVersion(expected_version, patient.version)
        return patient

    def get(self, patient_id: UUID) -> Patient:
        """The current patient; PatientNotFound if unknown or removed, PatientErased if
        erased."""
        patient = self._stored(patient_id)
        if patient.removed:
            raise PatientNotFound(str(patient_id))
        return patient

    def _stored(self, patient_id: UUID) -> Patient:
        """The patient, removed or not; PatientNotFound if unknown, PatientErased if erased."""
        try:
            patient: object = self.store.load(patient_id)
        except AggregateNotFoundError:
            raise PatientNotFound(str(patient_id)) from None
        if not isinstance(patient, Patient):
            raise PatientNotFound(str(patient_id))
        if patient.erased:
            raise PatientErased(str(patient_id))
        return patient

    def claim_id(self, email: str) -> UUID:
        """The id of the claim on `email`, keyed under this service's claim key."""
        return email_claim_id(email, self._claim_key)

    def _existing_claim(self, email: str) -> EmailClaim | None:
        try:
            claim: object = self.store.load(self.claim_id(email))
        except AggregateNotFoundError:
            return None
        assert isinstance(claim, EmailClaim)
        return claim

    def _claim(self, email: str, patient_id: UUID) -> EmailClaim:
        claim = self._existing_claim(email)
        if claim is None:
            return EmailClaim.take(self.claim_id(email), patient_id)
        claim.claim(patient_id)
        return claim

    def _save(self, patient: Patient, *others: Any) -> Written:
        return self._written(patient, self.writer.save(patient, *others))

    @staticmethod
    def _written(patient: Patient, recordings: list[Any]) -> Written:
        position = next(
            (r.notification.id for r in recordings if r.domain_event.originator_id == patient.id),
            None,
        )
        return Written(patient.id, patient.version, position, patient)


def retrying(
    attempt: Callable[[], R],
    correlation_id: str | None,
    recheck: bool = False,
    reread: bool = False,
) -> R:
    """Runs `attempt` until it saves; its events record `correlation_id`.

    A save loses to a concurrent writer only on an aggregate's version; the retry
    decides again on fresh state, read from the store (and so answers 409 or 412
    where that is right). With `recheck` (the store caches aggregates, which may be
    stale), a refusal decided on cached state is decided once more on fresh state. With
    `reread`, even the first attempt reads fresh state (a conflict came before it).
    """
    for remaining in range(_SAVE_ATTEMPTS - 1, -1, -1):
        try:
            with correlated(correlation_id), fresh() if reread else _as_is():
                return attempt()
        except IntegrityError:
            if remaining == 0:
                raise
            reread = True
        except PersistenceError:
            raise
        except Exception:
            if reread or not recheck:
                raise
            reread = True
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _as_is() -> Iterator[None]:
    yield


def is_conflict(error: BaseException) -> bool:
    return isinstance(error, IntegrityError)


__all__ = ["EmailTaken", "PatientService", "Written", "today"]
