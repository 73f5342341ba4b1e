"""A notification's bytes on the wire: multipart/alternative (text, then HTML), UTF-8.

Written directly rather than through the standard library's message objects: their
header parsing, folding and flattening cost more CPU than the rest of a message's
sending, and every message here has the same simple shape. What stays the same from
one message to the next (the sender, the subjects) is folded once, with the standard
library's own policy, by `Headers`; only the recipient, the ids and the date are
written per message.

Lines end in CRLF and stay within 998 octets. A body of ASCII lines goes as it is
(7bit: readable as sent); any other is quoted-printable, so a message needs nothing
of the server but plain SMTP. A header with anything but ASCII (a practice named with
accents) is RFC 2047-encoded; only an address beyond ASCII needs SMTPUTF8.
"""

from __future__ import annotations

import binascii
import email.policy
import email.utils
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from uuid import UUID

_MAX_LINE = 998
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_PLAIN_ADDRESS = re.compile(rf"{_DOT_ATOM.pattern}@{_DOT_ATOM.pattern}")


def header(name: str, value: str, utf8: bool = False) -> bytes:
    """One header line (folded as needed), CRLF-terminated.

    Raises ValueError for a value holding a line break: nothing read from the data may
    add headers of its own.
    """
    if "\r" in value or "\n" in value:
        raise ValueError(f"a line break in the {name} header")
    line = f"{name}: {value}\r\n"
    if value.isascii() and len(line) <= 78 and (name not in ("From", "To") or _plain(value)):
        return line.encode("ascii")
    policy = email.policy.SMTPUTF8 if utf8 else email.policy.SMTP
    return (
        policy.header_factory(name, value).fold(policy=policy).encode("utf-8" if utf8 else "ascii")
    )


def _plain(address: str) -> bool:
    """An address written the same way whatever the header parser makes of it."""
    return _PLAIN_ADDRESS.fullmatch(address) is not None


@dataclass(frozen=True)
class Headers:
    """The headers every message from one sender shares, folded once."""

    mail_from: str
    """The envelope sender (the address of the From header)."""
    utf8: bool
    """The sender's address needs SMTPUTF8."""
    from_line: bytes
    subjects: Mapping[str, bytes]
    """Subject lines, by purpose."""

    @classmethod
    def of(cls, mail_from: str, subjects: Mapping[str, str]) -> Headers:
        address = email.utils.parseaddr(mail_from)[1] or mail_from.strip()
        utf8 = not address.isascii()
        return cls(
            mail_from=address,
            utf8=utf8,
            from_line=header("From", mail_from, utf8),
            subjects={purpose: header("Subject", subject) for purpose, subject in subjects.items()},
        )


@dataclass(frozen=True)
class Mail:
    """What the SMTP transaction needs: the envelope, its options, and the message."""

    mail_from: str
    recipient: str
    options: list[str]
    data: bytes


def compose(
    headers: Headers,
    *,
    recipient: str,
    message_id: UUID,
    purpose: str,
    text: str,
    html: str,
    date: str | None = None,
) -> Mail:
    """The message to `recipient` (`date` is now unless given)."""
    utf8 = headers.utf8 or not recipient.isascii()
    plain, plain_cte = _body(text)
    rich, rich_cte = _body(html)
    boundary = f"=_carelog_{message_id.hex}"
    while boundary.encode() in plain or boundary.encode() in rich:
        boundary = f"=_carelog_{secrets.token_hex(16)}"
    date = date or email.utils.formatdate(localtime=False)
    data = b"".join(
        (
            headers.from_line,
            header("To", recipient, utf8),
            headers.subjects[purpose],
            (
                f"Message-ID: <{message_id}@carelog>\r\nDate: {date}\r\n"
                f"X-Carelog-Purpose: {purpose}\r\nMIME-Version: 1.0\r\n"
                f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n'
                f'\r\n--{boundary}\r\nContent-Type: text/plain; charset="utf-8"\r\n'
                f"Content-Transfer-Encoding: {plain_cte}\r\n\r\n"
            ).encode(),
            plain,
            (
                f'\r\n--{boundary}\r\nContent-Type: text/html; charset="utf-8"\r\n'
                f"Content-Transfer-Encoding: {rich_cte}\r\n\r\n"
            ).encode(),
            rich,
            f"\r\n--{boundary}--\r\n".encode(),
        )
    )
    options = ["SMTPUTF8", "BODY=8BITMIME"] if utf8 else []
    return Mail(headers.mail_from, recipient, options, data)


def _body(text: str) -> tuple[bytes, str]:
    """A part's body and its Content-Transfer-Encoding. The body ends in a line break
    of its own: the one before the next boundary belongs to the boundary."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    raw = text.encode()
    if raw.isascii() and max(map(len, raw.split(b"\n"))) <= _MAX_LINE:
        return raw.replace(b"\n", b"\r\n"), "7bit"
    return binascii.b2a_qp(raw, istext=True).replace(b"\n", b"\r\n"), "quoted-printable"
