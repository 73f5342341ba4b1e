"""`carelog dlq list|show|replay`: the events a read model's consumer set aside.

A consumer dead-letters an event it can never apply (see `runtime.consumers`): to
`<topic>.dlq.<group>`, with the reason in an `error` header. Here an operator
lists them (`<model>:<offset>` ids, event type, aggregate id, error kind: never
personal data), shows one (its data redacted unless `--reveal`, which first appends
a record to the disclosure audit, `runtime.audit`, and reveals nothing without it),
and replays one or all once the cause is fixed. Replaying goes through the
projection's own idempotent apply, so replaying twice changes nothing.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import msgspec
import psycopg
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from bootstrap.rebuild import MODELS, Model
from domain import contracts
from readmodels.directory import DirectoryCache
from runtime import audit
from runtime.cache import redis_for
from runtime.consumers import UnappliableEvent
from runtime.kafka import client_options, partitions_of
from runtime.settings import Settings

log = structlog.get_logger("carelog.audit")


class DlqError(Exception):
    """A message for the operator."""


@dataclass(frozen=True)
class Letter:
    model: str
    topic: str
    offset: int
    headers: dict[str, str]
    body: bytes

    @property
    def id(self) -> str:
        return f"{self.model}:{self.offset}"

    @property
    def error(self) -> str:
        return self.headers.get("error", "")

    @property
    def kind(self) -> str:
        """The error's kind: its text up to the first colon (no values)."""
        return self.error.split(":", 1)[0][:80]

    def summary(self) -> dict[str, Any]:
        line: dict[str, Any] = {"id": self.id, "topic": self.topic, "error": self.kind}
        try:
            envelope, _ = contracts.decode(self.body)
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError):
            return line | {"type": None, "aggregateId": None}
        return line | {
            "type": f"{envelope.type} v{envelope.schema_version}",
            "aggregateId": str(envelope.aggregate_id),
            "position": envelope.position,
        }


def dlq_topic(settings: Settings, model: Model) -> str:
    return model.dead_letter_topic(settings)


async def letters(settings: Settings, only: str | None = None) -> list[Letter]:
    """Every dead letter of the read models (or of one topic or model), oldest first."""
    found: list[Letter] = []
    wanted = {
        dlq_topic(settings, model): model
        for model in MODELS.values()
        if only is None or only in (dlq_topic(settings, model), model.name)
    }
    known = await partitions_of(settings, wanted)
    if not known:
        return found
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        for topic, numbers in known.items():
            partitions = [TopicPartition(topic, p) for p in numbers]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            for tp in partitions:
                while await consumer.position(tp) < ends[tp]:
                    batch = await consumer.getmany(tp, timeout_ms=1000)
                    for record in batch.get(tp, []):
                        headers = {k: v.decode(errors="replace") for k, v in record.headers or ()}
                        found.append(
                            Letter(wanted[topic].name, topic, record.offset, headers, record.value)
                        )
    finally:
        await consumer.stop()
    return found


async def find(settings: Settings, letter_id: str) -> Letter:
    model, _, offset = letter_id.partition(":")
    if model not in MODELS or not offset.isdigit():
        raise DlqError(f"{letter_id!r} is not a dead-letter id (<model>:<offset>, see `dlq list`)")
    for letter in await letters(settings, model):
        if letter.offset == int(offset):
            return letter
    raise DlqError(f"no dead letter {letter_id}")


def _patients_in(letter: Letter) -> list[UUID]:
    """The patients a letter's body is about (best effort: an undecodable body names none)."""
    try:
        envelope, data = contracts.decode(letter.body)
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError):
        return []
    found = [envelope.aggregate_id] if envelope.aggregate_type == "Patient" else []
    if isinstance(patient := getattr(data, "patient_id", None), UUID):
        found.append(patient)
    return found


def show(settings: Settings, letter: Letter, reveal: bool) -> str:
    shown: dict[str, Any] = letter.summary() | {"headers": letter.headers}
    if reveal:
        disclosure = audit.at_the_command_line("cli.dlq.reveal", _patients_in(letter))
        try:
            audit.record_now(settings.database_url, disclosure)
        except audit.AuditUnavailable as exc:
            raise DlqError(f"the audit cannot be written ({exc}): nothing is revealed") from None
        log.warning(
            "personal data revealed",
            actor=disclosure.actor,
            operation="carelog dlq show --reveal",
            dead_letter=letter.id,
            correlation_id=disclosure.correlation_id,
        )
        shown["body"] = json.loads(letter.body) if _is_json(letter.body) else repr(letter.body)
    else:
        shown["body"] = "<redacted: --reveal to show>"
    return json.dumps(shown, indent=2, default=str)


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


async def replay(settings: Settings, chosen: list[Letter]) -> dict[str, str]:
    """Applies each letter through its model's projection; letter id → outcome."""
    outcomes: dict[str, str] = {}
    redis = redis_for(settings)
    try:
        async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
            for letter in chosen:
                model = MODELS[letter.model]
                try:
                    decoded = contracts.decode(letter.body)
                except (msgspec.DecodeError, msgspec.ValidationError, KeyError):
                    outcomes[letter.id] = "undecodable: still cannot be read"
                    continue
                projection = model.copy("")  # the live tables, through the same apply
                try:
                    outcome = await projection.apply(conn, [decoded])
                except UnappliableEvent as exc:
                    outcomes[letter.id] = f"still unappliable: {str(exc).split(':', 1)[0]}"
                    continue
                if model.name == "directory":
                    cache = DirectoryCache(redis, prefix=settings.cache_prefix)
                    await cache.changed(outcome.changed)
                applied = outcome.applied if hasattr(outcome, "applied") else outcome[0]
                outcomes[letter.id] = "applied" if applied else "already applied: no change"
    finally:
        await redis.aclose()
    return outcomes


def fail(message: str) -> int:
    print(f"carelog dlq: {message}", file=sys.stderr)
    return 1
