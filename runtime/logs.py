"""Structured logging: JSON lines when not on a terminal, and never patient data."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import msgspec
import structlog

# Keys that could carry personal health information. They are dropped from every
# log line, whatever a caller passes, as a last line of defence.
_PERSONAL_KEYS = frozenset(
    {
        "name",
        "email",
        "address",
        "date_of_birth",
        "dateOfBirth",
        "dob",
        "password",
        "body",
        "details",
    }
)


def _drop_personal_data(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in _PERSONAL_KEYS.intersection(event_dict):
        event_dict[key] = "[redacted]"
    return event_dict


_encoder = msgspec.json.Encoder(enc_hook=repr)


def _json(event_dict: dict[str, Any], **_: Any) -> str:
    """One log line as JSON, written by msgspec (the standard library's encoder took about
    as long as the rest of a log call); a line msgspec refuses (a key that is not a
    string, say) is written by the standard library, values it cannot write as their
    repr, as structlog's own renderer does."""
    try:
        return _encoder.encode(event_dict).decode()
    except (TypeError, ValueError, msgspec.EncodeError):
        return json.dumps(event_dict, default=repr)


def configure_logging(level: str = "info", service: str = "carelog") -> None:
    """Sets up structlog and routes the standard library's logging through it."""
    renderer: Any
    if sys.stderr.isatty():
        # Tracebacks without local variables: those may hold a request's personal data.
        renderer = structlog.dev.ConsoleRenderer(
            exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False)
        )
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_personal_data,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
