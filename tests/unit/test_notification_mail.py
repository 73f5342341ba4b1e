"""The notifier's message bytes read back by the standard library's parser as the message
meant: headers, both parts, and names beyond ASCII, all in 7-bit lines."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage
from uuid import uuid4

import pytest

from notifications.mail import Headers, compose

SUBJECTS = {"welcome": "Welcome to {practice}"}


def headers(practice: str, mail_from: str = "carelog <no-reply@carelog.invalid>") -> Headers:
    return Headers.of(mail_from, {p: s.format(practice=practice) for p, s in SUBJECTS.items()})


def parsed(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def content(message: EmailMessage, subtype: str) -> str:
    part = message.get_body((subtype,))
    assert part is not None and part.get_content_type() == f"text/{subtype}"
    return str(part.get_content()).replace("\r\n", "\n")


def wire_lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    lines = data[:-2].split(b"\r\n")
    assert not any(b"\n" in line or b"\r" in line for line in lines), "a bare line break"
    return lines


def test_names_beyond_ascii_round_trip():
    practice, name = "Clínica Sør-Øst", "Zoë Ångström-Nguyễn"
    message_id = uuid4()
    mail = compose(
        headers(practice, "Praxis Müller <no-reply@carelog.invalid>"),
        recipient="zoe@example.org",
        message_id=message_id,
        purpose="welcome",
        text=f"Dear {name},\n\nWelcome to {practice}.\n",
        html=f"<p>Dear {name},</p>\n<p>Welcome to {practice}.</p>",
    )
    message = parsed(mail.data)
    assert message["Subject"] == f"Welcome to {practice}"
    assert message["From"].addresses[0].display_name == "Praxis Müller"
    assert message["From"].addresses[0].addr_spec == "no-reply@carelog.invalid"
    assert message["To"] == "zoe@example.org"
    assert message["Message-ID"] == f"<{message_id}@carelog>"
    assert message["X-Carelog-Purpose"] == "welcome"
    assert message["Date"].datetime is not None
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    assert content(message, "plain") == f"Dear {name},\n\nWelcome to {practice}.\n"
    assert content(message, "html") == f"<p>Dear {name},</p>\n<p>Welcome to {practice}.</p>\n"
    assert max(map(len, wire_lines(mail.data))) <= 998
    assert mail.options == [] and mail.data.isascii(), "nothing needs 8BITMIME or SMTPUTF8"
    assert mail.mail_from == "no-reply@carelog.invalid" and mail.recipient == "zoe@example.org"


def test_ascii_bodies_go_as_they_are_and_long_lines_stay_within_the_limit():
    long = "x" * 2000
    mail = compose(
        headers("the practice"),
        recipient="ann@example.org",
        message_id=uuid4(),
        purpose="welcome",
        text="Dear Ann,\n\nWelcome.",
        html=f"<p>{long}</p>",
    )
    lines = wire_lines(mail.data)
    assert b"Dear Ann," in lines  # readable as sent: 7bit
    assert max(map(len, lines)) <= 998
    message = parsed(mail.data)
    assert message["Subject"] == "Welcome to the practice"
    assert content(message, "plain") == "Dear Ann,\n\nWelcome.\n"
    assert content(message, "html") == f"<p>{long}</p>\n"


def test_a_body_holding_the_boundary_gets_another():
    message_id = uuid4()
    trap = f"--=_carelog_{message_id.hex}"
    mail = compose(
        headers("the practice"),
        recipient="ann@example.org",
        message_id=message_id,
        purpose="welcome",
        text=trap,
        html="<p>hi</p>",
    )
    message = parsed(mail.data)
    assert content(message, "plain") == f"{trap}\n"
    assert content(message, "html") == "<p>hi</p>\n"


def test_an_address_beyond_ascii_needs_smtputf8():
    mail = compose(
        headers("the practice"),
        recipient="zoë@exämple.org",
        message_id=uuid4(),
        purpose="welcome",
        text="Dear Zoë,",
        html="<p>Dear Zoë,</p>",
    )
    assert mail.options == ["SMTPUTF8", "BODY=8BITMIME"]
    assert parsed(mail.data)["To"] == "zoë@exämple.org"


def test_no_header_can_be_smuggled_in_through_an_address():
    with pytest.raises(ValueError, match="line break"):
        compose(
            headers("the practice"),
            recipient="ann@example.org\r\nBcc: eve@example.org",
            message_id=uuid4(),
            purpose="welcome",
            text="Dear Ann,",
            html="<p>Dear Ann,</p>",
        )
