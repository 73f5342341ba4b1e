"""Signing keys: a directory of ES256 private keys, one `<kid>.pem` each.

`current` names the key that signs; every key in the directory is published in
the JWKS, so tokens signed by an older key stay valid until they expire. A
rotation adds a key (published, not yet signing), lets the gateway and the
services learn it, then promotes it; `prune` deletes keys retired for longer
than an access token lives.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from runtime.security import ALGORITHM, KID
from runtime.settings import SettingsError

_CURRENT = "current"


class KeyDirectoryError(SettingsError):
    """The key directory is missing, empty, or holds something that is not a key."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(self.public_key, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": ALGORITHM}

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def new_kid() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with (directory / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _generate(directory: Path) -> str:
    kid = new_kid()
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(directory / f"{kid}.pem", pem, 0o600)
    return kid


class KeyRing:
    """The keys of one directory; `refresh()` re-reads it when it has changed."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.keys: dict[str, SigningKey] = {}
        self.current_kid = ""
        self._stamp = -1

    def ensure(self, development: bool) -> KeyRing:
        """Loads the keys; development mode creates a first key, production insists on one."""
        if development and not self.directory.exists():
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.directory.is_dir():
            raise KeyDirectoryError(f"key directory {self.directory} does not exist")
        with _locked(self.directory):
            if not any(self.directory.glob("*.pem")):
                if not development:
                    raise KeyDirectoryError(f"no signing key (*.pem) in {self.directory}")
                kid = _generate(self.directory)
                _write_atomically(self.directory / _CURRENT, kid.encode(), 0o600)
        self.refresh(force=True)
        return self

    def refresh(self, force: bool = False) -> None:
        """Re-reads the directory if it changed since the last look (one stat call)."""
        try:
            stamp = self.directory.stat().st_mtime_ns
        except FileNotFoundError:
            raise KeyDirectoryError(f"key directory {self.directory} does not exist") from None
        if stamp == self._stamp and not force:
            return
        keys: dict[str, SigningKey] = {}
        for path in sorted(self.directory.glob("*.pem")):
            kid = path.stem
            if not KID.match(kid):
                raise KeyDirectoryError(
                    f"{path.name}: a key id may hold only letters, digits, _ and -"
                )
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != (
                "secp256r1"
            ):
                raise KeyDirectoryError(f"{path.name} is not a P-256 (ES256) private key")
            keys[kid] = SigningKey(kid, loaded)
        if not keys:
            raise KeyDirectoryError(f"no signing key (*.pem) in {self.directory}")
        current_file = self.directory / _CURRENT
        current = current_file.read_text().strip() if current_file.exists() else ""
        if current not in keys:
            live = [k for k in keys if not (self.directory / f"{k}.retired").exists()]
            current = max(live or keys)
        self.keys, self.current_kid, self._stamp = keys, current, stamp

    @property
    def current(self) -> SigningKey:
        return self.keys[self.current_kid]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.jwk() for key in self.keys.values()]}


def _current_kid(directory: Path) -> str:
    ring = KeyRing(directory)
    ring.refresh(force=True)
    return ring.current_kid


def add_key(directory: Path) -> str:
    """A new key, published but not yet signing; returns its kid."""
    with _locked(directory):
        return _generate(directory)


def promote(directory: Path, kid: str) -> None:
    """Makes `kid` the signing key and marks the one it replaces as retired now."""
    with _locked(directory):
        if not (directory / f"{kid}.pem").exists():
            raise KeyDirectoryError(f"no key {kid} in {directory}")
        previous = _current_kid(directory)
        if previous != kid:
            stamp = datetime.now(UTC).isoformat().encode()
            _write_atomically(directory / f"{previous}.retired", stamp, 0o600)
        _write_atomically(directory / _CURRENT, kid.encode(), 0o600)


def prune(directory: Path, older_than_seconds: float) -> list[str]:
    """Deletes keys retired longer ago than `older_than_seconds`; returns their kids."""
    removed = []
    with _locked(directory):
        current = _current_kid(directory)
        for marker in directory.glob("*.retired"):
            kid = marker.name.removesuffix(".retired")
            retired = datetime.fromisoformat(marker.read_text().strip())
            age = (datetime.now(UTC) - retired).total_seconds()
            if kid != current and age > older_than_seconds:
                (directory / f"{kid}.pem").unlink(missing_ok=True)
                marker.unlink()
                removed.append(kid)
    return removed
