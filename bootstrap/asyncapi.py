"""The AsyncAPI 3.0 document of carelog's Kafka topics: `schemas/asyncapi.json`.

Built from the definitions the code publishes with, so it cannot say something else:
the contracts (`domain.contracts`, `domain.billing`) give each topic's message types
and versions, msgspec's JSON Schema generation gives each message's payload (the
envelope with `data` set to that event's payload, as in `schemas/<topic>/*.json`),
`runtime.publisher.headers_for` gives the Kafka headers every message carries, and
the services' group constants name who consumes what. `carelog schemas write` writes
it beside the JSON Schemas, `carelog schemas check` fails when it drifts, and the
gateway serves it as `/api-docs/events`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec

from billing_grpc.config import BillingConfig
from commands.reactions import GROUP as REMOVALS_GROUP
from domain import contracts
from domain.billing import BILLING_CONTRACTS, BILLING_STREAM
from domain.contracts import Contract, Envelope
from notifications.intake import GROUP as NOTIFIER_GROUP
from projections.analytics import GROUP as ANALYTICS_GROUP
from projections.appointments import GROUP as APPOINTMENTS_GROUP
from projections.worker import GROUP as DIRECTORY_GROUP
from runtime.kafka import EVENT_PARTITIONS
from runtime.publisher import headers_for
from runtime.settings import Settings

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING = "0.5.0"
"""The version of AsyncAPI's Kafka bindings the `bindings` objects follow."""

PREFIX_NOTE = (
    "Every topic name and consumer group is prefixed with CARELOG_TOPIC_PREFIX"
    " (empty by default; test runs set one to stay apart from the live stack)."
)


@dataclass(frozen=True)
class Producer:
    """A process that publishes a stream, through runtime.publisher (key = aggregate id)."""

    name: str
    description: str
    streams: tuple[str, ...]


@dataclass(frozen=True)
class Consumer:
    """A consumer group, the streams it reads, and where it sets aside what it cannot apply."""

    group: str
    description: str
    streams: tuple[str, ...]
    dead_letters: str
    """The base name of its dead-letter topic, `<base>.dlq.<group>`."""

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.dead_letters}.dlq.{self.group}"


PRODUCERS = (
    Producer(
        "relay",
        "The relay (`carelog relay`) publishes the event store's global log in order.",
        tuple(sorted({c.stream for c in contracts.CONTRACTS.values()})),
    ),
    Producer(
        "billing",
        "Billing (`carelog serve billing`) publishes its outbox in order.",
        (BILLING_STREAM,),
    ),
)

PATIENTS, APPOINTMENTS = contracts.PATIENT_STREAM, contracts.APPOINTMENT_STREAM

CONSUMERS = (
    Consumer(
        DIRECTORY_GROUP,
        "The patient directory projection (`carelog project directory`).",
        (PATIENTS,),
        PATIENTS,
    ),
    Consumer(
        APPOINTMENTS_GROUP,
        "The appointments projection (`carelog project appointments`).",
        (APPOINTMENTS,),
        APPOINTMENTS,
    ),
    Consumer(
        ANALYTICS_GROUP,
        "The analytics projection (`carelog project analytics`).",
        (PATIENTS, APPOINTMENTS, BILLING_STREAM),
        "analytics",
    ),
    Consumer(
        REMOVALS_GROUP,
        "The process manager that cancels removed patients' appointments"
        " (`carelog react patient-removals`).",
        (PATIENTS,),
        PATIENTS,
    ),
    Consumer(
        NOTIFIER_GROUP,
        "The notifier (`carelog notify`): emails patients from events.",
        (PATIENTS, APPOINTMENTS),
        "notifications",
    ),
    Consumer(
        BillingConfig().consumer_group,
        "Billing (`carelog serve billing`): opens an account per registered patient.",
        (PATIENTS,),
        PATIENTS,
    ),
)

STREAM_DESCRIPTIONS = {
    PATIENTS: "Patients' lifecycle events, keyed by patient id.",
    APPOINTMENTS: "Appointments and the clinicians they are booked with, keyed by aggregate id.",
    BILLING_STREAM: "Billing accounts' events (no personal data), keyed by account id.",
}

HEADERS: dict[str, tuple[dict[str, Any], str]] = {
    "event-type": ({"type": "string"}, "The envelope's `type`."),
    "schema-version": ({"type": "string"}, "The envelope's `schemaVersion`, in decimal."),
    "aggregate-type": ({"type": "string"}, "The envelope's `aggregateType`."),
    "aggregate-id": ({"type": "string", "format": "uuid"}, "The envelope's `aggregateId`."),
    "aggregate-version": (
        {"type": "string", "pattern": "^[0-9]+$"},
        "The envelope's `aggregateVersion`, in decimal.",
    ),
    "position": (
        {"type": "string", "pattern": "^[0-9]+$"},
        "The envelope's `position` (its source's global log), in decimal.",
    ),
    "occurred-at": (
        {"type": "string", "format": "date-time"},
        "The envelope's `occurredAt`, ISO 8601 with its offset.",
    ),
    "event-id": ({"type": "string", "format": "uuid"}, "The envelope's `eventId`."),
    "content-type": ({"type": "string"}, "How the value is encoded."),
    "correlation-id": (
        {"type": "string"},
        "The envelope's `correlationId`: the request that caused the event; absent when none.",
    ),
    "actor-id": (
        {"type": "string"},
        "The envelope's `actorId`: the user who caused the event (the access token's subject),"
        " or `system:<process>`; absent when none was recorded.",
    ),
    "actor-role": (
        {"type": "string"},
        "The envelope's `actorRole`: the role the actor acted in (`system` for a process);"
        " absent when none was recorded.",
    ),
}
"""What each Kafka header `headers_for` sets holds (all are UTF-8 text)."""

FIXED_PER_MESSAGE = ("event-type", "schema-version", "aggregate-type", "content-type")
"""Headers whose value is the same for every message of one type and version."""


def _sample(contract: Contract, optional: str | None) -> Envelope[Any]:
    """An envelope of this contract, to read the headers `headers_for` gives it; `optional`
    fills the envelope's optional facts (correlation id, actor), or leaves them out."""
    return Envelope(
        event_id=UUID(int=1),
        type=contract.type,
        schema_version=contract.version,
        aggregate_type=contract.aggregate_type,
        aggregate_id=UUID(int=2),
        aggregate_version=1,
        position=1,
        occurred_at=datetime(2000, 1, 1, tzinfo=UTC),
        correlation_id=optional,
        actor_id=optional,
        actor_role=optional,
        data=None,
    )


HEADERS_SCHEMA = "EventHeaders"
"""The components.schemas entry of the headers every event carries."""


def event_headers(every: list[Contract]) -> dict[str, Any]:
    """The Kafka headers `headers_for` sets on each event, whatever its type."""
    names = {tuple(k for k, _ in headers_for(_sample(c, "sample"))) for c in every}
    always = {tuple(k for k, _ in headers_for(_sample(c, None))) for c in every}
    if len(names) != 1 or len(always) != 1:
        raise ValueError("headers_for sets different headers on different event types")
    (set_,), (required,) = names, always
    undocumented = set(set_) - set(HEADERS)
    if undocumented:
        raise KeyError(f"headers_for sets headers HEADERS does not describe: {undocumented}")
    properties = {name: {**HEADERS[name][0], "description": HEADERS[name][1]} for name in set_}
    return {"type": "object", "properties": properties, "required": list(required)}


def headers_schema(contract: Contract) -> dict[str, Any]:
    """This contract's messages' headers: the shared ones, with their fixed values."""
    fixed = {
        name: {"const": value.decode()}
        for name, value in headers_for(_sample(contract, None))
        if name in FIXED_PER_MESSAGE
    }
    return {
        "type": "object",
        "allOf": [{"$ref": f"#/components/schemas/{HEADERS_SCHEMA}"}],
        "properties": fixed,
    }


def message_id(contract: Contract) -> str:
    return f"{contract.type}.v{contract.version}"


def _published() -> list[Contract]:
    return [*contracts.CONTRACTS.values(), *BILLING_CONTRACTS.values()]


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every topic, message, producer and consumer group."""
    current = _published()
    superseded = list(contracts.SUPERSEDED)
    every = current + superseded
    payloads, components = msgspec.json.schema_components(
        [Envelope[c.payload] for c in every],  # type: ignore[name-defined]
        ref_template="#/components/schemas/{name}",
    )
    if HEADERS_SCHEMA in components:
        raise ValueError(f"a payload is named {HEADERS_SCHEMA}, like the headers' schema")
    components[HEADERS_SCHEMA] = event_headers(every)
    messages: dict[str, Any] = {}
    for contract, payload in zip(every, payloads, strict=True):
        old = contract in superseded
        messages[message_id(contract)] = {
            "name": contract.type,
            "title": f"{contract.type} v{contract.version}",
            "summary": (
                f"No longer published; messages already on {contract.stream} are read"
                " as the next version (upcast)."
                if old
                else f"A {contract.aggregate_type}'s {contract.type} event, version"
                f" {contract.version}."
            ),
            "contentType": "application/json",
            "payload": payload,
            "headers": headers_schema(contract),
            "correlationId": {"location": "$message.header#/correlation-id"},
            "bindings": {
                "kafka": {
                    "key": {
                        "type": "string",
                        "format": "uuid",
                        "description": "The aggregate id: one aggregate's events stay in one"
                        " partition, in order.",
                    },
                    "bindingVersion": KAFKA_BINDING,
                }
            },
        }
    messages["DeadLetter"] = {
        "name": "DeadLetter",
        "title": "A dead letter",
        "summary": "An event a consumer could never apply, set aside instead of skipped.",
        "description": "The value is the message as the consumer read it: the event's envelope"
        " (see its topic's messages), or the bytes that did not decode as one. It has no key"
        " and none of the event's headers, only `error`.",
        "payload": {},
        "headers": {
            "type": "object",
            "properties": {
                "error": {
                    "type": "string",
                    "maxLength": 500,
                    "description": "Why it was set aside; its kind is the text before the"
                    " first colon.",
                }
            },
            "required": ["error"],
        },
    }

    channels: dict[str, Any] = {}
    for stream in sorted({c.stream for c in every}):
        channels[stream] = {
            "address": stream,
            "title": stream,
            "description": f"{STREAM_DESCRIPTIONS[stream]} {PREFIX_NOTE}",
            "messages": {
                message_id(c): {"$ref": f"#/components/messages/{message_id(c)}"}
                for c in every
                if c.stream == stream
            },
            "bindings": {
                "kafka": {
                    "topic": stream,
                    "partitions": EVENT_PARTITIONS,
                    "bindingVersion": KAFKA_BINDING,
                }
            },
        }
    for consumer in CONSUMERS:
        topic = consumer.dead_letter_topic
        channels[topic] = {
            "address": topic,
            "title": topic,
            "description": f"The dead letters of consumer group {consumer.group}. {PREFIX_NOTE}",
            "messages": {"DeadLetter": {"$ref": "#/components/messages/DeadLetter"}},
            "bindings": {
                "kafka": {"topic": topic, "partitions": 1, "bindingVersion": KAFKA_BINDING}
            },
        }

    def refs(stream: str, published: list[Contract]) -> list[dict[str, str]]:
        return [
            {"$ref": f"#/channels/{stream}/messages/{message_id(c)}"}
            for c in published
            if c.stream == stream
        ]

    operations: dict[str, Any] = {}
    for producer in PRODUCERS:
        for stream in producer.streams:
            operations[f"{producer.name}.send.{stream}"] = {
                "action": "send",
                "title": f"{producer.name} publishes {stream}",
                "description": f"{producer.description} Each message is sent with key ="
                " aggregate id (idempotent producer, acks=all); its position is recorded only"
                " after Kafka acknowledged it, so a crash resends rather than loses.",
                "channel": {"$ref": f"#/channels/{stream}"},
                "messages": refs(stream, current),
            }
    for consumer in CONSUMERS:
        group = {"type": "string", "const": consumer.group}
        for stream in consumer.streams:
            operations[f"{consumer.group}.receive.{stream}"] = {
                "action": "receive",
                "title": f"{consumer.group} reads {stream}",
                "description": f"{consumer.description} Consumer group {consumer.group}; it"
                " reads every version still on the topic and applies each event once.",
                "channel": {"$ref": f"#/channels/{stream}"},
                "messages": refs(stream, every),
                "bindings": {"kafka": {"groupId": group, "bindingVersion": KAFKA_BINDING}},
            }
        topic = consumer.dead_letter_topic
        operations[f"{consumer.group}.dead-letter"] = {
            "action": "send",
            "title": f"{consumer.group} dead-letters",
            "description": f"What {consumer.group} can never apply goes to {topic}.",
            "channel": {"$ref": f"#/channels/{topic}"},
            "messages": [{"$ref": f"#/channels/{topic}/messages/DeadLetter"}],
        }

    development = Settings.from_env({"CARELOG_ENV": "development"}, stack_secrets=None)
    mechanism = development.kafka_sasl_mechanism
    scheme = {"SCRAM-SHA-512": "scramSha512", "SCRAM-SHA-256": "scramSha256", "PLAIN": "plain"}
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "carelog events",
            "version": "1.0.0",
            "description": "The Kafka topics carelog publishes: each event type and version,"
            " its JSON envelope, its key and its headers. Generated from the code"
            " (`make schemas`); a published version never changes, a new shape is a new"
            f" version. {PREFIX_NOTE}",
        },
        "defaultContentType": "application/json",
        "servers": {
            "development": {
                "host": development.kafka_bootstrap,
                "protocol": "kafka",
                "description": "The local stack's broker (CARELOG_KAFKA_BOOTSTRAP). It requires"
                f" SASL {mechanism} over CARELOG_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT with the"
                " credentials `make up` generates into .stack/secrets. Production refuses a broker"
                " without SASL (SASL_SSL with TLS) unless CARELOG_TRUSTED_NETWORK is set.",
                "security": [{"$ref": "#/components/securitySchemes/sasl"}],
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": components,
            "messages": messages,
            "securitySchemes": {
                "sasl": {
                    "type": scheme[mechanism],
                    "description": f"SASL {mechanism}: CARELOG_KAFKA_USERNAME and"
                    " CARELOG_KAFKA_PASSWORD (CARELOG_KAFKA_SASL_MECHANISM).",
                }
            },
        },
    }
