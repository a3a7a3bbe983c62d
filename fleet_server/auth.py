"""API tokens and the audit log: who may call what, and a record of every mutating call, of every failed one, and
(bounded) of unauthenticated attempts."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet_server.models import RANK, ApiToken, AuditEntry, Role

TOKEN_PREFIX = "eft_"
PRINCIPAL_SCOPE_KEY = "edgefleet.principal"  # set by the request guard, which authenticates before the body is read
_bearer = HTTPBearer(auto_error=False)


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, from the app's engine (built by create_app, never global)."""
    with Session(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def new_secret(prefix: str, nbytes: int = 32) -> str:
    return prefix + secrets.token_urlsafe(nbytes)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue_token(session: Session, *, name: str, role: Role, created_by: str, nbytes: int = 32) -> tuple[ApiToken, str]:
    token = new_secret(TOKEN_PREFIX, nbytes)
    row = ApiToken(name=name, role=role, token_hash=hash_secret(token), created_by=created_by)
    session.add(row)
    session.commit()
    session.refresh(row)
    return row, token


@dataclass
class RequestAudit:
    """What the audit log knows of the request being served: the client's address, and whether a route already
    recorded its failure (then no generic row is added for it)."""

    source: str = ""
    failure_recorded: bool = False


# The request being served, set by the request guard. A context variable because ``audit`` is called from routes in
# many modules with only a session; a sync route runs in a thread with a copy of the context that still refers to
# the same RequestAudit object, so its mark is seen when the response is built.
_request_audit: ContextVar[RequestAudit | None] = ContextVar("request_audit", default=None)


@contextlib.contextmanager
def request_audit(source: str) -> Iterator[RequestAudit]:
    """The audit context of one request, for as long as it is served."""
    state = RequestAudit(source=source[:64])
    token = _request_audit.set(state)
    try:
        yield state
    finally:
        _request_audit.reset(token)


def current_request_audit() -> RequestAudit | None:
    return _request_audit.get()


def audit(session: Session, *, actor: str, action: str, target: str = "", outcome: str = "ok", status_code: int = 200,
          detail: str = "") -> None:
    request = _request_audit.get()
    if request is not None and outcome != "ok":
        request.failure_recorded = True
    session.add(AuditEntry(actor=_storable(actor, 100), action=_storable(action, 100), target=_storable(target, 200),
                           outcome=outcome, status=status_code, detail=_storable(detail, 1000),
                           source=_storable(request.source if request else "", 64)))
    session.commit()


def _storable(text: str, limit: int) -> str:
    """Within the column, and without NUL (PostgreSQL refuses it): a refused request's path may hold one."""
    return text.replace("\x00", "\ufffd")[:limit]


def audit_with_engine(engine: Engine, **entry) -> None:
    """``audit`` in a session of its own (blocking: call it in a thread from async code)."""
    with Session(engine) as session:
        audit(session, **entry)


class AuditLimiter:
    """Bounds the audit rows unauthenticated callers can cause: at most ``per_source`` a minute from one address and
    ``total`` a minute from all of them; the rest are only counted (``on_drop``). Failures of authenticated callers
    are not limited: they are accountable, and their volume is their own."""

    def __init__(self, *, per_source: int = 10, total: int = 120, clock: Callable[[], float] = time.monotonic,
                 on_drop: Callable[[], None] = lambda: None):
        self.per_source, self.total, self.clock, self.on_drop = per_source, total, clock, on_drop
        self._lock = threading.Lock()
        self._minute, self._admitted = -1, 0
        self._counts: dict[str, int] = {}  # admitted addresses only: never more than ``total`` entries

    def admit(self, source: str) -> bool:
        with self._lock:
            minute = int(self.clock() // 60)
            if minute != self._minute:
                self._minute, self._admitted, self._counts = minute, 0, {}
            seen = self._counts.get(source, 0)
            if seen >= self.per_source or self._admitted >= self.total:
                self.on_drop()
                return False
            self._counts[source], self._admitted = seen + 1, self._admitted + 1
            return True


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API token's id, name and role (never its secret)."""

    id: int
    name: str
    role: Role


class TokenCache:
    """Token hash → principal, for ``ttl_s`` seconds, so a read costs no database round trip for its caller.

    A revocation through this server clears the cache at once; another replica sees it within ``ttl_s``. Unknown
    tokens are not cached (a flood of random tokens cannot fill it)."""

    def __init__(self, engine: Engine, ttl_s: float = 5.0, max_entries: int = 10_000):
        self.engine, self.ttl_s, self.max_entries = engine, ttl_s, max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def cached(self, token_hash: str) -> Principal | None:
        hit = self._entries.get(token_hash)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return None

    def lookup(self, token_hash: str) -> Principal | None:
        """From the database (blocking); caches a live token."""
        with Session(self.engine) as session:
            row = session.exec(select(ApiToken).where(ApiToken.token_hash == token_hash)).first()
            if row is None or row.revoked_at is not None or row.id is None:
                return None
            principal = Principal(id=row.id, name=row.name, role=row.role)
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[token_hash] = (time.monotonic() + self.ttl_s, principal)
        return principal

    def revoked_name(self, token_hash: str) -> str | None:
        """The name of a revoked token with this hash (blocking), for the audit log of a refused call."""
        with Session(self.engine) as session:
            row = session.exec(select(ApiToken).where(ApiToken.token_hash == token_hash)).first()
            return row.name if row is not None and row.revoked_at is not None else None

    def invalidate(self) -> None:
        with self._lock:
            self._entries.clear()


MISSING_TOKEN = "missing bearer token"
INVALID_TOKEN = "invalid or revoked token"


def bearer_token(authorization: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer <token>`` header, as HTTPBearer reads them."""
    scheme, _, credentials = (authorization or "").partition(" ")
    return credentials if scheme.lower() == "bearer" and credentials else None


async def authenticate(cache: TokenCache, token: str) -> Principal | None:
    """The live API token ``token`` is, or None. Async: a cache hit costs no thread hop."""
    token_hash = hash_secret(token)
    return cache.cached(token_hash) or await run_in_threadpool(cache.lookup, token_hash)


async def caller(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    """The API token behind the request, or 401. The request guard has normally authenticated it already, before the
    body was read (its 401s are audited there); this check stands for an app served without the guard."""
    known = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if isinstance(known, Principal):
        return known
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, MISSING_TOKEN, headers={"WWW-Authenticate": "Bearer"})
    principal = await authenticate(request.app.state.tokens, credentials.credentials)
    if principal is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, INVALID_TOKEN, headers={"WWW-Authenticate": "Bearer"})
    return principal


def require(role: Role):
    """A dependency that admits callers with at least ``role``; 403 (audited) otherwise."""

    async def check(request: Request, principal: Annotated[Principal, Depends(caller)]) -> Principal:
        if RANK[principal.role] < RANK[role]:
            await run_in_threadpool(audit_with_engine, request.app.state.engine, actor=principal.name,
                                    action=f"{request.method} {request.url.path}", outcome="denied", status_code=403,
                                    detail=f"needs {role.value}, has {principal.role.value}")
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this needs the {role.value} role")
        return principal

    return check


Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
