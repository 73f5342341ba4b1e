"""The auth service (port 4005): login, token refresh and logout, JWKS, and user admin.

Every path is under /auth, as the gateway forwards /auth/** unchanged. Errors are
mapped to statuses in `ERRORS`, in one place.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import msgspec
from litestar import Litestar, Request, Response, get, post, put
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, Parameter
from prometheus_client import Counter

from auth.config import AuthSettings
from auth.errors import (
    Busy,
    EmailTaken,
    InvalidCredentials,
    InvalidInput,
    InvalidRefreshToken,
    NotYourToken,
    SelfLockout,
    UserNotFound,
)
from auth.keys import KeyRing
from auth.service import AuthService, Session, User
from auth.tokens import RingKeys
from domain.roles import ALL_ROLES, USER_ADMINS, Role
from runtime.db import open_pool
from runtime.http import DOCS, EMAIL_FORMAT, Documented, Problems, problem, service_app
from runtime.security import Claims, RevocationFeed, TokenVerifier, requires
from runtime.settings import Settings

LOGINS = Counter("carelog_logins_total", "Login attempts, by outcome", ["outcome"])
REFRESHES = Counter("carelog_token_refreshes_total", "Token refreshes, by outcome", ["outcome"])

MAX_BODY_BYTES = 16 * 1024


Email = Annotated[
    str,
    msgspec.Meta(max_length=254, examples=["ada@example.org"], extra_json_schema=EMAIL_FORMAT),
]


class Credentials(msgspec.Struct, kw_only=True):
    email: Email
    password: Annotated[str, msgspec.Meta(max_length=1024)]


class RefreshInput(msgspec.Struct, rename="camel", kw_only=True):
    refresh_token: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class NewUser(msgspec.Struct, kw_only=True):
    email: Email
    password: Annotated[
        str, msgspec.Meta(max_length=1024, description="12+ characters, not common")
    ]
    role: Role


class RoleChange(msgspec.Struct, kw_only=True):
    role: Role


class SessionOut(msgspec.Struct, rename="camel", kw_only=True):
    token: str
    refresh_token: str
    expires_in: Annotated[int, msgspec.Meta(description="Seconds until `token` expires")]
    token_type: str = "Bearer"  # noqa: S105 (the scheme's name, not a secret)


class UserOut(msgspec.Struct, rename="camel", kw_only=True):
    id: UUID
    email: Annotated[str, msgspec.Meta(extra_json_schema=EMAIL_FORMAT)]
    role: Role
    disabled: bool
    created_at: datetime


class Validity(msgspec.Struct, rename="camel", kw_only=True):
    subject: str
    role: Role
    expires_at: int


def _claims(request: Request[Any, Any, Any]) -> Claims:
    claims: Claims = request.state.claims
    return claims


def _session(session: Session) -> SessionOut:
    return SessionOut(
        token=session.token, refresh_token=session.refresh_token, expires_in=session.expires_in
    )


def _user(user: User) -> UserOut:
    return UserOut(
        id=user.id,
        email=user.email,
        role=user.role,
        disabled=user.disabled,
        created_at=user.created_at,
    )


_ADMIN = [requires(USER_ADMINS)]
_ANYONE = [requires(ALL_ROLES)]


_NO_USER = {404: "No such user"}


@post(
    "/auth/login",
    summary="Log in: an access token and a refresh token",
    status_code=200,
    opt={
        DOCS: Documented(
            problems={
                401: "Wrong email or password, or a disabled user (one answer for all)",
                503: "Too many logins at once, or a dependency is unavailable; retry shortly",
            }
        )
    },
)
async def login(data: JSONBody[Credentials], service: NamedDependency[AuthService]) -> SessionOut:
    try:
        session = await service.login(data.email, data.password)
    except InvalidCredentials:
        LOGINS.labels("refused").inc()
        raise
    LOGINS.labels("ok").inc()
    return _session(session)


@post(
    "/auth/refresh",
    summary="Spend a refresh token for new tokens",
    status_code=200,
    opt={DOCS: Documented(problems={401: "The refresh token is unknown, spent or expired"})},
)
async def refresh(
    data: JSONBody[RefreshInput], service: NamedDependency[AuthService]
) -> SessionOut:
    try:
        session = await service.refresh(data.refresh_token)
    except InvalidRefreshToken:
        REFRESHES.labels("refused").inc()
        raise
    REFRESHES.labels("ok").inc()
    return _session(session)


@post(
    "/auth/logout",
    summary="End the session of a refresh token",
    guards=_ANYONE,
    status_code=204,
    opt={DOCS: Documented(problems={403: "The refresh token is not yours"})},
)
async def logout(
    data: JSONBody[RefreshInput],
    request: Request[Any, Any, Any],
    service: NamedDependency[AuthService],
) -> None:
    await service.logout(data.refresh_token, _claims(request).subject)


@get("/auth/validate", summary="Check a bearer token", guards=_ANYONE)
async def validate(
    request: Request[Any, Any, Any], service: NamedDependency[AuthService]
) -> Response[Validity]:
    claims = _claims(request)
    if not await service.active(claims.subject):
        raise problem(401, "the token's user is disabled or gone")
    return Response(
        Validity(subject=claims.subject, role=claims.role, expires_at=claims.expires_at)
    )


@get("/auth/.well-known/jwks.json", summary="The public keys that verify access tokens")
async def jwks(ring: NamedDependency[KeyRing]) -> Response[dict[str, Any]]:
    ring.refresh()
    return Response(ring.jwks(), headers={"Cache-Control": "public, max-age=60"})


@post(
    "/auth/users",
    summary="Create a user",
    guards=_ADMIN,
    tags=["users"],
    opt={DOCS: Documented(problems={409: "The email is in use"}, location=True)},
)
async def create_user(
    data: JSONBody[NewUser], service: NamedDependency[AuthService]
) -> Response[UserOut]:
    user = await service.create_user(data.email, data.password, data.role)
    return Response(_user(user), status_code=201, headers={"Location": f"/auth/users/{user.id}"})


@get("/auth/users", summary="List users by email", guards=_ADMIN, tags=["users"])
async def list_users(
    service: NamedDependency[AuthService],
    limit: Annotated[int, Parameter(ge=1, le=500)] = 100,
    after: Annotated[
        str | None, Parameter(max_length=254, description="The last email of the previous page")
    ] = None,
) -> list[UserOut]:
    return [_user(u) for u in await service.list_users(limit, after)]


@get(
    "/auth/users/{user_id:uuid}",
    summary="Get a user",
    guards=_ADMIN,
    tags=["users"],
    opt={DOCS: Documented(problems=_NO_USER)},
)
async def get_user(user_id: FromPath[UUID], service: NamedDependency[AuthService]) -> UserOut:
    return _user(await service.get_user(user_id))


@put(
    "/auth/users/{user_id:uuid}/role",
    summary="Change a user's role",
    guards=_ADMIN,
    tags=["users"],
    opt={DOCS: Documented(problems={**_NO_USER, 409: "You may not demote yourself"})},
)
async def change_role(
    user_id: FromPath[UUID],
    data: JSONBody[RoleChange],
    request: Request[Any, Any, Any],
    service: NamedDependency[AuthService],
) -> UserOut:
    actor = _claims(request).subject
    return _user(await service.change_role(user_id, data.role, actor))


@post(
    "/auth/users/{user_id:uuid}/disable",
    summary="Disable a user and end their sessions",
    guards=_ADMIN,
    tags=["users"],
    status_code=200,
    opt={DOCS: Documented(problems={**_NO_USER, 409: "You may not disable yourself"})},
)
async def disable_user(
    user_id: FromPath[UUID], request: Request[Any, Any, Any], service: NamedDependency[AuthService]
) -> UserOut:
    actor = _claims(request).subject
    return _user(await service.set_disabled(user_id, True, actor))


@post(
    "/auth/users/{user_id:uuid}/enable",
    summary="Enable a disabled user",
    guards=_ADMIN,
    tags=["users"],
    status_code=200,
    opt={DOCS: Documented(problems=_NO_USER)},
)
async def enable_user(
    user_id: FromPath[UUID], request: Request[Any, Any, Any], service: NamedDependency[AuthService]
) -> UserOut:
    actor = _claims(request).subject
    return _user(await service.set_disabled(user_id, False, actor))


_SAME_401 = "invalid email or password"

PROBLEMS: Problems = {
    InvalidInput: lambda exc: problem(400, "invalid request", errors=exc.errors),
    InvalidCredentials: lambda _: problem(401, _SAME_401),
    InvalidRefreshToken: lambda _: problem(401, "invalid refresh token"),
    NotYourToken: lambda _: problem(403, "the refresh token is not yours"),
    SelfLockout: lambda _: problem(409, "you may not disable or demote yourself"),
    UserNotFound: lambda _: problem(404, "no such user"),
    EmailTaken: lambda _: problem(
        409, "email already registered", errors={"email": "is already in use"}
    ),
    Busy: lambda _: problem(
        503, "too many logins at once; retry shortly", headers={"Retry-After": "1"}
    ),
}


def create_app(settings: Settings, auth: AuthSettings, ring: KeyRing | None = None) -> Litestar:
    """The auth service; loads its keys (a missing one fails startup) and opens its pool."""
    keyring = ring or KeyRing(auth.keys_dir)
    opened: list[AuthService] = []
    verifier = TokenVerifier(
        RingKeys(keyring), auth.issuer, auth.audience, feed=RevocationFeed(settings.database_url)
    )

    async def start(app: Litestar) -> None:
        keyring.ensure(development=settings.development)
        pool = await open_pool(settings.database_url, min_size=1, max_size=8)
        service = AuthService(pool, keyring, auth)
        opened.append(service)
        await service.provision_development_user(settings.development)
        await verifier.start()

    async def stop(app: Litestar) -> None:
        await verifier.stop()
        for service in opened:  # none when startup failed
            await service.pool.close()

    def auth_service() -> AuthService:
        return opened[0]

    def key_ring() -> KeyRing:
        return keyring

    async def database() -> None:
        async with opened[0].pool.connection() as conn:
            await conn.execute("SELECT 1")

    async def keys() -> None:
        keyring.refresh()

    return service_app(
        "auth",
        [
            login,
            refresh,
            logout,
            validate,
            jwks,
            create_user,
            list_users,
            get_user,
            change_role,
            disable_user,
            enable_user,
        ],
        title="auth",
        description="Users, login, refresh rotation, logout and the JWKS.",
        tags=["users"],
        problems=PROBLEMS,
        checks={"database": database, "keys": keys},
        dependencies={
            "service": Provide(auth_service, sync_to_thread=False),
            "ring": Provide(key_ring, sync_to_thread=False),
        },
        on_startup=[start],
        on_shutdown=[stop],
        max_body_bytes=MAX_BODY_BYTES,
        state={"verifier": verifier},
    )
