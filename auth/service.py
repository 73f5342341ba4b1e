"""The identity use cases: users, login, refresh rotation with reuse detection, logout.

Storage is the `auth` schema of the shared database. Refresh tokens are opaque
random strings stored only as SHA-256 hashes; each login starts a family, each
refresh spends a token and issues its successor in the same family, and a spent
token presented again revokes the whole family (someone else holds a copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from auth.config import AuthSettings
from auth.errors import (
    Busy,
    EmailTaken,
    InvalidCredentials,
    InvalidRefreshToken,
    NotYourToken,
    SelfLockout,
    UserNotFound,
)
from auth.keys import KeyRing
from auth.passwords import (
    check_strength,
    hash_password,
    needs_rehash,
    normalise_email,
    verify_password,
)
from auth.tokens import issue_access_token
from domain.roles import Role

log = structlog.get_logger(__name__)

DEV_EMAIL = "testuser@test.com"
DEV_PASSWORD = "password123"  # noqa: S105 (the seed's development-only user; never in production)


_USER_COLUMNS = "id, email, role, disabled, created_at"


@dataclass(frozen=True)
class User:
    id: uuid.UUID
    email: str
    role: Role
    disabled: bool
    created_at: datetime


@dataclass(frozen=True)
class Session:
    """What a login or a refresh hands the client."""

    token: str
    refresh_token: str
    expires_in: int


def _user(row: Any) -> User:
    return User(id=row[0], email=row[1], role=Role(row[2]), disabled=row[3], created_at=row[4])


def _digest(refresh_token: str) -> bytes:
    return hashlib.sha256(refresh_token.encode()).digest()


class AuthService:
    """Users, sessions and tokens, stored in the `auth` schema."""

    def __init__(
        self, pool: AsyncConnectionPool[Any], ring: KeyRing, settings: AuthSettings
    ) -> None:
        self.pool = pool
        self.ring = ring
        self.settings = settings
        self.hashing = anyio.CapacityLimiter(settings.hash_workers)
        self.max_waiting = 16 * settings.hash_workers
        self._decoy = hash_password(secrets.token_urlsafe(16))

    async def _in_hasher(self, fn: Any, *args: Any) -> Any:
        """Runs a password hash or check on the bounded hashing threads (or raises Busy)."""
        if self.hashing.statistics().tasks_waiting >= self.max_waiting:
            raise Busy()
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.hashing)

    def _access_token(self, user_id: uuid.UUID, role: Role) -> str:
        self.ring.refresh()
        return issue_access_token(self.ring.current, str(user_id), role, self.settings)

    async def _new_session(
        self, conn: psycopg.AsyncConnection[Any], user_id: uuid.UUID, role: Role, family: uuid.UUID
    ) -> Session:
        refresh_token = secrets.token_urlsafe(32)
        await conn.execute(
            "INSERT INTO auth.refresh_tokens (token_hash, family, user_id, expires_at)"
            " VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
            [_digest(refresh_token), family, user_id, self.settings.refresh_ttl_seconds],
        )
        return Session(
            self._access_token(user_id, role), refresh_token, self.settings.access_ttl_seconds
        )

    async def login(self, email: str, password: str) -> Session:
        """A new session for valid credentials; InvalidCredentials otherwise, alike."""
        key = email.strip().lower()
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT id, password_hash, role, disabled FROM auth.users WHERE email = %s",
                    [key],
                )
            ).fetchone()
        # An unknown email costs one hash too, so timing does not tell who exists.
        ok = await self._in_hasher(verify_password, row[1] if row else self._decoy, password)
        if row is None or not ok or row[3]:
            raise InvalidCredentials()
        user_id, role = row[0], Role(row[2])
        if needs_rehash(row[1]):
            new_hash = await self._in_hasher(hash_password, password)
            async with self.pool.connection() as conn:
                await conn.execute(
                    "UPDATE auth.users SET password_hash = %s WHERE id = %s", [new_hash, user_id]
                )
        async with self.pool.connection() as conn, conn.transaction():
            return await self._new_session(conn, user_id, role, uuid.uuid4())

    async def refresh(self, refresh_token: str) -> Session:
        """Spends the refresh token for a new session; reuse revokes its whole family."""
        reused = False
        async with self.pool.connection() as conn, conn.transaction():
            row = await (
                await conn.execute(
                    "SELECT t.family, t.user_id, t.used_at, t.revoked_at,"
                    " t.expires_at < now(), u.role, u.disabled"
                    " FROM auth.refresh_tokens t JOIN auth.users u ON u.id = t.user_id"
                    " WHERE t.token_hash = %s FOR UPDATE OF t",
                    [_digest(refresh_token)],
                )
            ).fetchone()
            if row is None:
                raise InvalidRefreshToken()
            family, user_id, used_at, revoked_at, expired, role, disabled = row
            if used_at is not None or revoked_at is not None:
                reused = used_at is not None and revoked_at is None
                await self._revoke_family(conn, family)
            elif not expired and not disabled:
                await conn.execute(
                    "UPDATE auth.refresh_tokens SET used_at = now() WHERE token_hash = %s",
                    [_digest(refresh_token)],
                )
                return await self._new_session(conn, user_id, Role(role), family)
        if reused:
            log.warning("refresh token reused; family revoked", user_id=str(user_id))
        raise InvalidRefreshToken()

    async def _revoke_family(self, conn: psycopg.AsyncConnection[Any], family: uuid.UUID) -> None:
        await conn.execute(
            "UPDATE auth.refresh_tokens SET revoked_at = now()"
            " WHERE family = %s AND revoked_at IS NULL",
            [family],
        )

    async def logout(self, refresh_token: str, subject: str) -> None:
        """Revokes the session (the refresh token's family) of the token's own user."""
        async with self.pool.connection() as conn, conn.transaction():
            row = await (
                await conn.execute(
                    "SELECT family, user_id FROM auth.refresh_tokens WHERE token_hash = %s",
                    [_digest(refresh_token)],
                )
            ).fetchone()
            if row is None:
                return
            if str(row[1]) != subject:
                raise NotYourToken()
            await self._revoke_family(conn, row[0])

    async def create_user(
        self, email: str, password: str, role: Role, development_only: bool = False
    ) -> User:
        """A new user; InvalidInput for a malformed email or a weak password."""
        email = normalise_email(email)
        if not development_only:
            check_strength(password, email)
        password_hash = await self._in_hasher(hash_password, password)
        try:
            async with self.pool.connection() as conn:
                row = await (
                    await conn.execute(
                        "INSERT INTO auth.users (id, email, password_hash, role, development_only)"
                        f" VALUES (%s, %s, %s, %s, %s) RETURNING {_USER_COLUMNS}",
                        [uuid.uuid4(), email, password_hash, role.value, development_only],
                    )
                ).fetchone()
        except psycopg.errors.UniqueViolation:
            raise EmailTaken() from None
        log.info("user created", user_id=str(row[0]), role=role.value)
        return _user(row)

    async def list_users(self, limit: int, after: str | None) -> list[User]:
        """Users in email order, `limit` at a time after the email `after`."""
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(
                    f"SELECT {_USER_COLUMNS} FROM auth.users WHERE email > %s"
                    " ORDER BY email LIMIT %s",
                    [after or "", limit],
                )
            ).fetchall()
        return [_user(r) for r in rows]

    async def get_user(self, user_id: uuid.UUID) -> User:
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    f"SELECT {_USER_COLUMNS} FROM auth.users WHERE id = %s", [user_id]
                )
            ).fetchone()
        if row is None:
            raise UserNotFound()
        return _user(row)

    async def change_role(self, user_id: uuid.UUID, role: Role, actor: str) -> User:
        """Gives the user a new role; takes effect at their next login or refresh."""
        if str(user_id) == actor and role is not Role.ADMIN:
            raise SelfLockout()
        return await self._update(user_id, "role = %s", role.value)

    async def set_disabled(self, user_id: uuid.UUID, disabled: bool, actor: str) -> User:
        """Disables (or enables) a user; disabling ends every session they have."""
        if str(user_id) == actor and disabled:
            raise SelfLockout()
        user = await self._update(user_id, "disabled = %s", disabled)
        if disabled:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "UPDATE auth.refresh_tokens SET revoked_at = now()"
                    " WHERE user_id = %s AND revoked_at IS NULL",
                    [user_id],
                )
        log.info("user disabled" if disabled else "user enabled", user_id=str(user_id))
        return user

    async def _update(self, user_id: uuid.UUID, assignment: str, value: Any) -> User:
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    f"UPDATE auth.users SET {assignment}, updated_at = now()"
                    f" WHERE id = %s RETURNING {_USER_COLUMNS}",
                    [value, user_id],
                )
            ).fetchone()
        if row is None:
            raise UserNotFound()
        return _user(row)

    async def active(self, subject: str) -> bool:
        """Whether the token's user still exists and is not disabled."""
        try:
            user_id = uuid.UUID(subject)
        except ValueError:
            return False
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute("SELECT disabled FROM auth.users WHERE id = %s", [user_id])
            ).fetchone()
        return row is not None and not row[0]

    async def provision_development_user(self, development: bool) -> None:
        """The seed's dev admin exists in development mode and is deleted otherwise."""
        if not development:
            async with self.pool.connection() as conn:
                deleted = await conn.execute("DELETE FROM auth.users WHERE development_only")
            if deleted.rowcount:
                log.warning("development user removed: not in development mode")
            return
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute("SELECT 1 FROM auth.users WHERE email = %s", [DEV_EMAIL])
            ).fetchone()
        if row is None:
            # EmailTaken: another auth process created it at the same moment.
            with contextlib.suppress(EmailTaken):
                await self.create_user(DEV_EMAIL, DEV_PASSWORD, Role.ADMIN, development_only=True)
