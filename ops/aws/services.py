"""The carelog processes the AWS stack runs: one ECS Fargate service each.

The same table as the local stack's (ops/local/stack.sh) and compose.yaml: the command,
the port its `/health/ready` answers on, and here also its size, how far it scales and
which secrets it may read. Kafka consumers scale on their consumer group's lag as well as
on CPU; a group never has more useful members than its topic has partitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from domain.contracts import APPOINTMENT_STREAM, PATIENT_STREAM
from runtime.kafka import EVENT_PARTITIONS

DATABASE = "database"
REDIS = "redis"
KAFKA = "kafka"
SIGNING_KEYS = "signing-keys"
MASTER_KEY = "master-key"
CLAIM_KEY = "claim-key"
SMTP = "smtp"

SECRET_NAMES = {
    DATABASE: "carelog/database",
    REDIS: "carelog/redis",
    # MSK takes SCRAM users only from secrets whose names start with AmazonMSK_.
    KAFKA: "AmazonMSK_carelog",
    SIGNING_KEYS: "carelog/auth/signing-keys",
    MASTER_KEY: "carelog/master-key",
    CLAIM_KEY: "carelog/claim-key",
    SMTP: "carelog/notifier/smtp",
}
"""Each secret's name in Secrets Manager."""

BACKEND = (DATABASE, REDIS, KAFKA)
"""What every process's settings require: the database, Redis and Kafka credentials."""


@dataclass(frozen=True)
class Lag:
    """Scale a consumer on its group's lag (MSK's SumOffsetLag) over these topics."""

    group: str
    topics: tuple[str, ...]


@dataclass(frozen=True)
class Service:
    name: str
    command: tuple[str, ...]
    health_port: int
    cpu: int = 512
    memory: int = 1024
    min_tasks: int = 2
    max_tasks: int = 6
    secrets: tuple[str, ...] = BACKEND
    lag: Lag | None = None
    extra_ports: tuple[int, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    migrates: bool = True
    """Runs `carelog db migrate` first (yoyo's lock serialises concurrent runs): each
    process refuses to start on a database that lacks a migration."""

    @property
    def scales(self) -> bool:
        return self.max_tasks > self.min_tasks


SERVICES: tuple[Service, ...] = (
    Service(
        "commands",
        ("carelog", "serve", "commands"),
        4000,
        cpu=1024,
        memory=2048,
        max_tasks=10,
        secrets=(*BACKEND, MASTER_KEY, CLAIM_KEY),
    ),
    Service(
        "read-api",
        ("carelog", "serve", "read-api"),
        4003,
        cpu=1024,
        memory=2048,
        max_tasks=10,
        secrets=(*BACKEND, MASTER_KEY),
    ),
    Service(
        "auth",
        ("carelog", "serve", "auth"),
        4005,
        cpu=1024,
        memory=2048,
        max_tasks=6,
        secrets=(*BACKEND, SIGNING_KEYS),
    ),
    # One publisher: it records its position after every acknowledgement, so a second
    # relay would only publish everything twice (consumers drop the copies).
    Service("relay", ("carelog", "relay"), 4010, min_tasks=1, max_tasks=1),
    Service(
        "directory",
        ("carelog", "project", "directory"),
        4011,
        max_tasks=EVENT_PARTITIONS,
        lag=Lag("carelog-directory", (PATIENT_STREAM,)),
        secrets=(*BACKEND, MASTER_KEY),
    ),
    Service(
        "appointments",
        ("carelog", "project", "appointments"),
        4012,
        max_tasks=EVENT_PARTITIONS,
        lag=Lag("carelog-appointments", (APPOINTMENT_STREAM,)),
        secrets=(*BACKEND, MASTER_KEY),
    ),
    Service(
        "patient-removals",
        ("carelog", "react", "patient-removals"),
        4013,
        max_tasks=EVENT_PARTITIONS,
        lag=Lag("carelog-patient-removals", (PATIENT_STREAM,)),
        secrets=(*BACKEND, MASTER_KEY),
    ),
    Service(
        "analytics",
        ("carelog", "project", "analytics"),
        4014,
        max_tasks=EVENT_PARTITIONS,
        lag=Lag("carelog-analytics", (PATIENT_STREAM, APPOINTMENT_STREAM)),
        secrets=(*BACKEND, MASTER_KEY),
    ),
    Service(
        "notifier",
        ("carelog", "notify"),
        4015,
        max_tasks=EVENT_PARTITIONS,
        secrets=(*BACKEND, MASTER_KEY, SMTP),
        lag=Lag("carelog-notifier", (PATIENT_STREAM, APPOINTMENT_STREAM)),
    ),
    Service(
        "billing",
        ("carelog", "serve", "billing"),
        4001,
        cpu=1024,
        memory=2048,
        max_tasks=EVENT_PARTITIONS,
        secrets=(*BACKEND, MASTER_KEY),
        lag=Lag("carelog-billing", (PATIENT_STREAM,)),
        extra_ports=(9001,),
    ),
)

BY_NAME = {s.name: s for s in SERVICES}

BEHIND_GATEWAY = {"commands": 4000, "read-api": 4003, "auth": 4005}
"""What the HAProxy gateway routes to, by port (the internal load balancer's listeners)."""

GATEWAY_PORT = 4004
BILLING_GRPC_PORT = 9001
