"""Log lines: one JSON object each, with the service, level and time, and never a patient's
personal data, whatever a caller passes."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime

import structlog

from runtime.logs import configure_logging


class Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


def test_a_log_line_is_json_and_personal_data_is_redacted(capsys):
    before = structlog.get_config()
    handlers = logging.getLogger().handlers[:]
    try:
        configure_logging("info", "logs-test")
        patient = uuid.uuid4()
        structlog.get_logger("t").info(
            "patient registered",
            patient_id=patient,
            email="someone@example.org",
            name="Some One",
            at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
            thing=Opaque(),
            position=7,
        )
        structlog.get_logger("t").info("odd keys", counts={1: "one"})
        logging.getLogger("library").warning("from the standard library")
    finally:
        structlog.configure(**before)
        logging.getLogger().handlers[:] = handlers
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    first, odd, library = lines
    assert first["event"] == "patient registered" and first["service"] == "logs-test"
    assert first["level"] == "info" and first["timestamp"].endswith("Z")
    assert first["patient_id"] == str(patient) and first["position"] == 7
    assert first["email"] == "[redacted]" and first["name"] == "[redacted]"
    assert first["at"] == "2024-01-02T03:04:05Z" and first["thing"] == "<opaque>"
    assert odd["counts"] == {"1": "one"}
    assert library["event"] == "from the standard library" and library["level"] == "warning"
