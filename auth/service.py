"""The identity use cases: users, login, refresh rotation with reuse detection, logout.

Storage is the `auth` schema of the shared database. Refresh tokens are opaque
random strings stored only as SHA-256 hashes; each login starts a family, each
refresh spends a token and issues its successor in the same family, and a spent
token presented again revokes the whole family (someone else holds a copy).

A family is a session: its access tokens carry the family as `sid`. Ending a
session (logout, reuse) revokes its access tokens too, and disabling a user revokes
every access token issued to them until then; both are rows of `auth.revocations`,
which every verifier follows (runtime/security.py's RevocationFeed).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
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
from runtime.security import LEEWAY_SECONDS

log = structlog.get_logger(__name__)

DEV_EMAIL = "testuser@test.com"
DEV_PASSWORD = "password123"  # noqa: S105 (the seed's development-only user; never in production)


_USER_COLUMNS = "id, email, role, disabled, created_at"
_CUTOFF = (
    "(SELECT floor(extract(epoch FROM r.revoked_at))::bigint FROM auth.revocations r"
    " WHERE r.kind = 'subject' AND r.key = u.id::text)"
)
"""The user `u`'s revocation cutoff: their tokens issued at or before it are refused."""


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

    def _access_token(
        self, user_id: uuid.UUID, role: Role, family: uuid.UUID, cutoff: int | None
    ) -> str:
        # A user enabled again within the second of their disable still gets a token the
        # cutoff does not refuse: its iat is at most a second ahead (verifiers allow five).
        now = time.time() if cutoff is None else max(time.time(), cutoff + 1)
        self.ring.refresh()
        return issue_access_token(
            self.ring.current, str(user_id), role, self.settings, now=now, session=str(family)
        )

    async def _new_session(
        self,
        conn: psycopg.AsyncConnection[Any],
        user_id: uuid.UUID,
        role: Role,
        family: uuid.UUID,
        cutoff: int | None,
    ) -> Session:
        refresh_token = secrets.token_urlsafe(32)
        await conn.execute(
            "INSERT INTO auth.refresh_tokens (token_hash, family, user_id, expires_at)"
            " VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
            [_digest(refresh_token), family, user_id, self.settings.refresh_ttl_seconds],
        )
        return Session(
            self._access_token(user_id, role, family, cutoff),
            refresh_token,
            self.settings.access_ttl_seconds,
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
        user_id = row[0]
        if needs_rehash(row[1]):
            new_hash = await self._in_hasher(hash_password, password)
            async with self.pool.connection() as conn:
                await conn.execute(
                    "UPDATE auth.users SET password_hash = %s WHERE id = %s", [new_hash, user_id]
                )
        async with self.pool.connection() as conn, conn.transaction():
            # Again, holding the user's row: a disable that committed while the password was
            # checked is seen here, and one that comes later takes a cutoff after this token.
            row = await (
                await conn.execute(
                    f"SELECT u.role, u.disabled, {_CUTOFF} FROM auth.users u"
                    " WHERE u.id = %s FOR SHARE OF u",
                    [user_id],
                )
            ).fetchone()
            if row is None or row[1]:
                raise InvalidCredentials()
            return await self._new_session(conn, user_id, Role(row[0]), uuid.uuid4(), row[2])

    async def refresh(self, refresh_token: str) -> Session:
        """Spends the refresh token for a new session; reuse revokes its whole family."""
        reused = False
        async with self.pool.connection() as conn, conn.transaction():
            row = await (
                await conn.execute(
                    "SELECT t.family, t.user_id, t.used_at, t.revoked_at,"
                    f" t.expires_at < now(), u.role, u.disabled, {_CUTOFF}"
                    " FROM auth.refresh_tokens t JOIN auth.users u ON u.id = t.user_id"
                    " WHERE t.token_hash = %s FOR UPDATE OF t",
                    [_digest(refresh_token)],
                )
            ).fetchone()
            if row is None:
                raise InvalidRefreshToken()
            family, user_id, used_at, revoked_at, expired, role, disabled, cutoff = row
            if used_at is not None or revoked_at is not None:
                reused = used_at is not None and revoked_at is None
                await self._revoke_family(conn, family)
            elif not expired and not disabled:
                await conn.execute(
                    "UPDATE auth.refresh_tokens SET used_at = now() WHERE token_hash = %s",
                    [_digest(refresh_token)],
                )
                return await self._new_session(conn, user_id, Role(role), family, cutoff)
        if reused:
            log.warning("refresh token reused; family revoked", user_id=str(user_id))
        raise InvalidRefreshToken()

    async def _revoke_family(self, conn: psycopg.AsyncConnection[Any], family: uuid.UUID) -> None:
        """Ends a session: its refresh tokens, and (if it was live) its access tokens."""
        ended = await conn.execute(
            "UPDATE auth.refresh_tokens SET revoked_at = now()"
            " WHERE family = %s AND revoked_at IS NULL",
            [family],
        )
        if ended.rowcount:
            await self._revoke(conn, "session", str(family))

    async def _revoke(self, conn: psycopg.AsyncConnection[Any], kind: str, key: str) -> None:
        """Records a revocation (a trigger announces it at commit), kept while any token it
        refuses may still be unexpired; drops those whose tokens have all expired.

        A repeated one moves the cutoff at least a second on, past any token a login issued
        after the previous one (whose `iat` may be that second plus one)."""
        cutoff = int(time.time())  # the clock that stamps `iat`, not the database's
        await conn.execute("DELETE FROM auth.revocations WHERE expires_at < now()")
        await conn.execute(
            "INSERT INTO auth.revocations AS r (kind, key, revoked_at, expires_at)"
            " VALUES (%s, %s, to_timestamp(%s), to_timestamp(%s))"
            " ON CONFLICT (kind, key) DO UPDATE SET"
            " revoked_at = greatest(r.revoked_at + interval '1 second', excluded.revoked_at),"
            " expires_at = greatest(r.expires_at + interval '1 second', excluded.expires_at)",
            [kind, key, cutoff, cutoff + self.settings.access_ttl_seconds + LEEWAY_SECONDS],
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
        async with self.pool.connection() as conn:
            return await self._update(conn, user_id, "role = %s", role.value)

    async def set_disabled(self, user_id: uuid.UUID, disabled: bool, actor: str) -> User:
        """Disables (or enables) a user; disabling ends every session they have and revokes
        every access token issued to them so far (enabling does not bring those back)."""
        if str(user_id) == actor and disabled:
            raise SelfLockout()
        async with self.pool.connection() as conn, conn.transaction():
            user = await self._update(conn, user_id, "disabled = %s", disabled)
            if disabled:
                await conn.execute(
                    "UPDATE auth.refresh_tokens SET revoked_at = now()"
                    " WHERE user_id = %s AND revoked_at IS NULL",
                    [user_id],
                )
                await self._revoke(conn, "subject", str(user_id))
        log.info("user disabled" if disabled else "user enabled", user_id=str(user_id))
        return user

    async def _update(
        self, conn: psycopg.AsyncConnection[Any], user_id: uuid.UUID, assignment: str, value: Any
    ) -> User:
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
