"""``create_app(settings)``: the fleet web API. Everything it needs is built here and hung on ``app.state``; no
module-level engine or settings."""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlmodel import Session
from starlette.exceptions import HTTPException

from fleet_server import logs
from fleet_server.artifacts import StoreConfig, open_store
from fleet_server.auth import AuditLimiter, TokenCache
from fleet_server.broker import BrokerConfigError, BrokerSync, server_account, share_group
from fleet_server.console import api as console_api
from fleet_server.console import mount_console
from fleet_server.db import make_engine
from fleet_server.guard import RequestGuard, http_error, route_policies, validation_error
from fleet_server.ingest import Ingest
from fleet_server.jobs import JobRunner
from fleet_server.models import ServerReplica
from fleet_server.mqtt import FleetLink, FleetRouter
from fleet_server.pki import FleetCA
from fleet_server.queue import QueueRunner
from fleet_server.replicas import Replicas, drain
from fleet_server.rollouts.delivery import Delivery
from fleet_server.rollouts.downloads import Downloads
from fleet_server.rollouts.engine import RolloutEngine
from fleet_server.routes import artifacts, devices, insights, models, rollouts, telemetry, tokens, trust
from fleet_server.sandbox import SandboxConfig
from fleet_server.settings import ServerSettings

log = logging.getLogger(__name__)
access_log = logging.getLogger("fleet_server.access")


def _link_tls(settings: ServerSettings) -> dict[str, str | None]:
    """The server's own TLS to the broker: trust the configured CA file, else the fleet CA, else the system's."""
    ca = settings.broker_ca_file or (settings.pki_folder / "ca.crt" if FleetCA.exists(settings.pki_folder) else None)
    return {"ca_certs": str(ca) if ca else None,
            "certfile": str(settings.broker_cert_file) if settings.broker_cert_file else None,
            "keyfile": str(settings.broker_key_file) if settings.broker_key_file else None}


def create_app(settings: ServerSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        if settings.rollout_engine:
            _app.state.link.start()
            _app.state.ingest.start()
            _app.state.downloads.start()
            _app.state.rollouts.start()
            _app.state.replicas.start()
        _app.state.broker_sync.start_refresh(_app.state.engine)  # the CRL's next-update never lapses
        # The startup heap (modules, ORM mappers, compiled statements: ~1M objects) lives as long as the process:
        # moved out of the cyclic collector's reach, so the collections that ingest's allocations trigger stop
        # rescanning it (bench/ingest_bench.py: server CPU per telemetry message 62–77 µs without this, 42–46 µs with).
        gc.collect()
        gc.freeze()
        yield
        _app.state.broker_sync.stop_refresh()
        if settings.rollout_engine:
            _app.state.replicas.stop()
            _app.state.rollouts.stop()
            _app.state.link.stop()
            _app.state.downloads.stop()
            _app.state.ingest.stop()
        _app.state.jobs.shutdown()
        _app.state.engine.dispose()

    app = FastAPI(lifespan=lifespan, title="edgefleet fleet API", version="1",
                  description="Devices, models, rollouts and telemetry for a fleet of edge devices. "
                              "Authenticate with `Authorization: Bearer <API token>`.")
    app.state.settings = settings
    _private_dir(settings.data_dir)
    app.state.engine = make_engine(settings.database_url)
    app.state.tokens = TokenCache(app.state.engine)
    app.state.broker_sync = BrokerSync(settings.broker_files_dir, pid_file=settings.broker_pid_file,
                                       server_user=settings.mqtt_username or "fleet-server",
                                       server_password=settings.mqtt_password, pki_dir=settings.pki_folder)
    if settings.broker_files_dir is not None:  # the broker can start from these before any enrollment
        with Session(app.state.engine) as session:
            app.state.broker_sync.sync(session)
    store_config = StoreConfig.from_settings(settings)
    app.state.artifacts = open_store(store_config)
    if store_config.kind == "s3":
        try:
            app.state.artifacts.ensure_bucket()
        except Exception as e:  # no right to create buckets: the operator made it; reads will say if not
            log.warning("could not check or create the artifact bucket %r: %s", store_config.bucket, e)
    app.state.delivery = Delivery(settings.data_dir, app.state.artifacts,
                                  http_base=(f"{settings.public_url.rstrip('/')}/v1/deliveries"
                                             if settings.http_downloads else None))
    app.state.ingest = Ingest(app.state.engine, flush_acks=lambda: app.state.link.flush_acks())
    app.state.downloads = Downloads(app.state.engine, app.state.delivery, lambda t, p: app.state.link.publish(t, p))
    client_id, username = _link_identity(settings)
    fleet_router = FleetRouter(app.state.ingest, app.state.downloads)
    app.state.link = FleetLink(settings.broker_url, client_id, username, fleet_router,
                               password=settings.mqtt_password, tls=_link_tls(settings),
                               share_group=share_group(settings.mqtt_password))

    def adopt(row: ServerReplica) -> int:  # a dead replica's session: drained through our router, then ended
        return drain(lambda handler: FleetLink(settings.broker_url, row.client_id, row.username, handler,
                                               password=settings.mqtt_password, tls=_link_tls(settings),
                                               share_group=share_group(settings.mqtt_password), adopt=True),
                     fleet_router)

    app.state.rollouts = RolloutEngine(app.state.engine, app.state.delivery, app.state.link.publish,
                                       tick_s=settings.engine_tick_s, drift_interval_s=settings.drift_interval_s,
                                       drift_window_s=settings.drift_window_s,
                                       config_resend_s=settings.config_resend_s)
    app.state.replicas = Replicas(app.state.engine, client_id, username, adopt=adopt,
                                  leading=lambda: app.state.rollouts.leading)
    if settings.job_queue == "procrastinate":  # parts of jobs on the queue in PostgreSQL, for `fleet-server worker`
        app.state.jobs = QueueRunner(settings, app.state.engine)
    else:
        app.state.jobs = JobRunner(settings.database_url, settings.data_dir, workers=settings.conversion_workers,
                                   sandbox=SandboxConfig.from_settings(settings,
                                                                       timeout_s=settings.sandbox_job_timeout_s),
                                   store=store_config)
    registry = CollectorRegistry()
    requests = Counter("edgefleet_api_requests", "API requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("edgefleet_api_request_seconds", "API latency", ["route"], registry=registry)
    dropped = Counter("edgefleet_audit_rows_dropped", "Audit rows not written for unauthenticated requests over the "
                      "per-address limit", registry=registry)
    app.state.audit_limiter = AuditLimiter(on_drop=dropped.inc)

    @app.get("/health", tags=["operations"])
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"])
    def ready(response: Response) -> dict:
        checks = {"database": _database_ok(app), "broker": _broker_ok(settings.broker_url)}
        if settings.rollout_engine:  # the database answers reads but refuses writes (a full disk): not ready
            checks["ingest"] = app.state.ingest.healthy
        if not all(checks.values()):
            response.status_code = 503
        return {"ready": all(checks.values()), **checks}

    @app.get("/metrics", tags=["operations"])
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    routers = (tokens.router, devices.router, artifacts.router, artifacts.deliveries, trust.router, models.router,
               rollouts.router, telemetry.router, insights.router, console_api.router)
    for router in routers:
        app.include_router(router)
    mount_console(app)  # the operator console under /ui
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
    # The guard inside the metrics: its refusals are counted and logged like any answer. Its routes are read from
    # the routers themselves (FastAPI keeps an included router as one opaque entry of app.routes).
    api_routes = [route for owner in (app.router, *routers) for route in owner.routes if isinstance(route, APIRoute)]
    app.add_middleware(RequestGuard, policies=route_policies(api_routes, upload_limit=settings.max_upload_bytes),
                       tokens=app.state.tokens, engine=app.state.engine, limiter=app.state.audit_limiter)
    app.add_middleware(_Metrics, requests=requests, latency=latency)
    return app


def _link_identity(settings: ServerSettings) -> tuple[str, str | None]:
    """The server's MQTT client id and username. The generated broker configuration binds client ids to usernames
    (so no device can take the server's session), and each replica has an account of its own."""
    instance = settings.server_instance if settings.server_instance is not None else instance_slot(settings)
    if not settings.mqtt_username:  # an open development broker: any stable client id of our own
        return f"fleet-server-{socket.gethostname()}-{instance}", None
    try:
        account = server_account(settings.mqtt_username, instance)
    except BrokerConfigError as e:
        raise SystemExit(f"fleet-server: {e} (set EF_SERVER_SERVER_INSTANCE)") from e
    return account, account


async def _database_unavailable(request: Request, exc: Exception) -> Response:
    """The database is down or refuses writes (disk full): a 503 the client may retry, not a 500."""
    log.error("database unavailable: %s", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    return JSONResponse({"detail": "the database is unavailable; try again later"}, status_code=503,
                        headers={"Retry-After": "5"})


def _private_dir(folder: Path) -> None:
    """The data folder holds the online signing key, the fleet CA and usually the database: this user's only."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o077:
        folder.chmod(0o700)


_slot_locks: list = []  # held for the life of the process


def instance_slot(settings: ServerSettings) -> int:
    """A small number stable across restarts (the lowest free one among this host's server processes), for the
    server's MQTT client id: the broker keeps a persistent session per client id, and a shared subscription hands
    messages round-robin to every session in its group, connected or not. A restarted server must therefore take
    its old session back, or half of what devices send in the meantime would wait in an orphaned one."""
    import fcntl

    folder = settings.data_dir / "instances"
    folder.mkdir(parents=True, exist_ok=True)
    for slot in range(256):
        f = open(folder / f"slot-{slot}.lock", "a")  # noqa: SIM115 - held open on purpose
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        _slot_locks.append(f)
        return slot
    raise RuntimeError(f"more than 256 server processes share {folder}")


def app_from_environment() -> FastAPI:
    """The app factory a multi-worker uvicorn imports in each worker process."""
    from fleet_server.logs import configure

    configure()
    return create_app(ServerSettings())


class _Metrics:
    """Request counts and latency per route, as a plain ASGI middleware (BaseHTTPMiddleware costs a task and
    a stream per request)."""

    def __init__(self, app, *, requests, latency):
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status_code = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_code[0] = message["status"]
            await send(message)

        request_id = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode()[:64] or uuid.uuid4().hex
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], path, str(status_code[0])).inc()
            self.latency.labels(path).observe(time.perf_counter() - t0)
            logs.access(access_log, method=scope["method"], route=path, status=status_code[0], started=t0,
                        request_id=request_id)


def _database_ok(app: FastAPI) -> bool:
    try:
        with app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:  # any driver error means not ready
        log.warning("database not reachable", exc_info=True)
        return False


def _broker_ok(url: str) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 1883), timeout=1.0):
            return True
    except OSError:
        return False
