"""The request guard: an ASGI middleware that runs before any route, so a hostile request costs the server
almost nothing. In order: the bearer token (a request to an authenticated route with no valid token gets 401
before a byte of its body is read: FastAPI reads and parses bodies before running dependencies), NUL characters in
the path or query (PostgreSQL cannot store them), the body's size against its route's limit (413 on a declared
length, counted while streaming otherwise), and NUL characters in JSON bodies. Error answers never echo the input,
and failed or refused operator actions are audited with the caller's address."""

from __future__ import annotations

import json
from dataclasses import dataclass

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.engine import Engine
from starlette.exceptions import HTTPException
from starlette.routing import get_route_path

from fleet_server.auth import (
    INVALID_TOKEN,
    MISSING_TOKEN,
    PRINCIPAL_SCOPE_KEY,
    AuditLimiter,
    Principal,
    TokenCache,
    audit_with_engine,
    authenticate,
    bearer_token,
    caller,
    current_request_audit,
    hash_secret,
    request_audit,
)

JSON_BODY_LIMIT = 64 * 1024  # every JSON body of the API fits: the largest, an enrollment with its CSR, is < 20 KiB
SELECTOR_BODY_LIMIT = 1024 * 1024  # rollouts and A/B tests may name up to 10,000 devices
_SELECTOR_ROUTES = {("POST", "/v1/rollouts"), ("POST", "/v1/abtests")}
_STREAMED_ROUTES = {("POST", "/v1/artifacts")}  # the body is the artifact, streamed to disk by the route
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
NUL_MESSAGE = "NUL characters are not allowed"  # PostgreSQL cannot store them: refused before any route sees one
MAX_ERRORS = 20  # validation errors listed in one 422


class BodyTooLargeError(HTTPException):
    """A request body over its route's limit (a starlette HTTPException: FastAPI passes it on from body parsing)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


@dataclass(frozen=True)
class RoutePolicy:
    """What the guard enforces before a route runs."""

    needs_token: bool
    body_limit: int
    streamed: bool = False  # the route reads its body as a stream: counted here, never buffered


DEFAULT_POLICY = RoutePolicy(needs_token=False, body_limit=JSON_BODY_LIMIT)


def _needs_token(dependant: Dependant) -> bool:
    return any(d.call is caller or _needs_token(d) for d in dependant.dependencies)


def route_policies(routes: list[APIRoute], *, upload_limit: int) -> list[tuple[APIRoute, RoutePolicy]]:
    """Each route's policy, found from the route itself: a token when its dependencies include ``caller``."""
    policies, named = [], set()
    for route in routes:
        keys = {(method, route.path) for method in route.methods or ()}
        named |= keys & (_STREAMED_ROUTES | _SELECTOR_ROUTES)
        policy = RoutePolicy(needs_token=_needs_token(route.dependant), body_limit=JSON_BODY_LIMIT)
        if keys & _STREAMED_ROUTES:
            policy = RoutePolicy(policy.needs_token, upload_limit, streamed=True)
        elif keys & _SELECTOR_ROUTES:
            policy = RoutePolicy(policy.needs_token, SELECTOR_BODY_LIMIT)
        policies.append((route, policy))
    if missing := (_STREAMED_ROUTES | _SELECTOR_ROUTES) - named:  # a renamed route would get the small limit
        raise RuntimeError(f"no route for body limits of {sorted(missing)}")
    return policies


class RequestGuard:
    """What is checked before a request's body is read, as a plain ASGI middleware (FastAPI reads and parses a body
    before it runs a route's dependencies, so a token check there comes after a 100 MB body is in memory):

    1. the bearer token, on routes that need one: 401 (audited, bounded per address) without reading the body;
    2. NUL characters in the path or query string: 422;
    3. the body's size against the route's limit: 413 on a declared Content-Length, and counted as it arrives
       otherwise; JSON bodies are read here (at most the limit) and refused with 422 when a string holds a NUL.
    """

    def __init__(self, app, *, policies: list[tuple[APIRoute, RoutePolicy]], tokens: TokenCache, engine: Engine,
                 limiter: AuditLimiter):
        self.app, self.policies, self.tokens, self.engine, self.limiter = app, policies, tokens, engine, limiter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        with request_audit(client[0] if client else ""):
            await self._guard(scope, receive, send)

    async def _guard(self, scope, receive, send):
        route, policy = self._match(scope)
        if route is not None:
            scope["route"] = route  # as the router will set it: metrics and the audit name refusals by route
        if policy.needs_token and not await self._authenticated(scope, receive, send):
            return
        if (where := _nul_in_url(scope)) is not None:
            await self._refuse(scope, receive, send, 422, _nul_error([where]))
            return
        declared = _content_length(scope)
        if declared is not None and declared > policy.body_limit:
            await self._refuse(scope, receive, send, 413, BodyTooLargeError(policy.body_limit).detail)
            return
        if policy.streamed:
            await self.app(scope, _counting(receive, policy.body_limit), send)
            return
        if _has_body(scope):
            try:
                body = await _read_body(receive, policy.body_limit)
            except BodyTooLargeError as e:
                await self._refuse(scope, receive, send, 413, e.detail)
                return
            if body is None:  # the client went away
                return
            if (loc := _nul_in_json(body)) is not None:
                await self._refuse(scope, receive, send, 422, _nul_error(loc))
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _match(self, scope) -> tuple[APIRoute | None, RoutePolicy]:
        """The route the router will pick (the first whose path and method match, in the same order)."""
        path, method = get_route_path(scope), scope["method"]
        for route, policy in self.policies:
            if method in (route.methods or ()) and route.path_regex.match(path):
                return route, policy
        return None, DEFAULT_POLICY  # the router answers 404 or 405

    async def _authenticated(self, scope, receive, send) -> bool:
        """Puts the caller's principal in the scope, or answers 401."""
        token = bearer_token(_header(scope, b"authorization"))
        principal = await authenticate(self.tokens, token) if token is not None else None
        if principal is not None:
            scope[PRINCIPAL_SCOPE_KEY] = principal
            return True
        problem = MISSING_TOKEN if token is None else INVALID_TOKEN
        request = current_request_audit()
        if request is not None and self.limiter.admit(request.source):
            await run_in_threadpool(self._audit_unauthenticated, scope, problem,
                                    hash_secret(token) if token is not None else None)
        response = JSONResponse({"detail": problem}, 401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
        return False

    def _audit_unauthenticated(self, scope, problem: str, token_hash: str | None) -> None:
        revoked = self.tokens.revoked_name(token_hash) if token_hash else None
        audit_with_engine(self.engine, actor=revoked or "anonymous", action=_action(scope), target=scope["path"],
                          outcome="denied", status_code=401, detail="revoked token" if revoked else problem)

    async def _refuse(self, scope, receive, send, status_code: int, detail) -> None:
        await _record_failure(scope, self.engine, status_code, detail)
        await JSONResponse({"detail": detail}, status_code)(scope, receive, send)


def _action(scope) -> str:
    route = scope.get("route")
    return f"{scope['method']} {getattr(route, 'path', None) or scope['path']}"


async def _record_failure(scope, engine: Engine, status_code: int, detail) -> None:
    """An audit row for a failed mutating call by an authenticated caller, unless its route wrote one."""
    principal = scope.get(PRINCIPAL_SCOPE_KEY)
    request = current_request_audit()
    if scope["method"] not in MUTATING or not isinstance(principal, Principal) or request is None \
            or request.failure_recorded:
        return
    await run_in_threadpool(audit_with_engine, engine, actor=principal.name, action=_action(scope),
                            target=scope["path"], outcome="failed", status_code=status_code,
                            detail=_describe(detail))


def _describe(detail) -> str:
    if isinstance(detail, list):  # validation errors: where, not what was sent
        return "invalid " + ", ".join(".".join(map(str, e.get("loc", ()))) for e in detail if isinstance(e, dict))
    return str(detail)


async def http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's answer to an HTTPException, bounded, with the failure audited."""
    assert isinstance(exc, HTTPException)
    if isinstance(exc.detail, str) and len(exc.detail) > 500:
        exc = HTTPException(exc.status_code, exc.detail[:500] + "…", headers=exc.headers)
    await _record_failure(request.scope, request.app.state.engine, exc.status_code, exc.detail)
    return await http_exception_handler(request, exc)


async def validation_error(request: Request, exc: Exception) -> Response:
    """422 with where and why for each error, never the input (FastAPI's own answer echoes it, whole)."""
    assert isinstance(exc, RequestValidationError)
    errors = [{"type": str(e.get("type", "")), "loc": [_bounded(part) for part in e.get("loc", ())][:10],
               "msg": str(e.get("msg", ""))[:200]} for e in exc.errors()[:MAX_ERRORS]]
    await _record_failure(request.scope, request.app.state.engine, 422, errors)
    return JSONResponse({"detail": errors}, 422)


def _bounded(part):
    return part if isinstance(part, int) else str(part)[:64]


def _nul_error(loc: list) -> list[dict]:
    return [{"type": "nul_character", "loc": [_bounded(part) for part in loc][:10], "msg": NUL_MESSAGE}]


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None


def _content_length(scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


def _has_body(scope) -> bool:
    """A body to read: chunked, or a Content-Length that is not 0 (an unreadable one too: read within the limit)."""
    declared = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is not None or (declared is not None and declared.strip() != "0")


def _nul_in_url(scope) -> str | None:
    if "\x00" in scope["path"] or b"%00" in (scope.get("raw_path") or b""):
        return "path"
    query = scope.get("query_string", b"")
    if b"%00" in query or b"\x00" in query:
        return "query"
    return None


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole body, at most ``limit`` bytes (BodyTooLargeError past that); None when the client went away."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive that gives the body already read, then whatever the client sends next (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def _counting(receive, limit: int):
    seen = 0

    async def counted():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLargeError(limit)
        return message

    return counted


def _nul_in_json(body: bytes) -> list | None:
    """Where a JSON body holds a NUL in a string or key, or None. Parsed only when the bytes may hold one (an escaped
    NUL, or NUL bytes: UTF-16 JSON); a body that is not JSON is left to the route to refuse."""
    if b"\\u0000" not in body and b"\x00" not in body:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[object, list]] = [(doc, ["body"])]  # iterative: nesting depth is the client's choice
    while stack:
        value, loc = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return loc
        elif isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in key:
                    return loc
                stack.append((item, [*loc, key]))
        elif isinstance(value, list):
            stack.extend((item, [*loc, i]) for i, item in enumerate(value))
    return None
