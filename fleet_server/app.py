"""``create_app(settings)``: the fleet web API. Everything it needs is built here and hung on ``app.state``; no
module-level engine or settings."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import uuid
from urllib.parse import urlparse

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from sqlalchemy import text
from sqlmodel import Session

from fleet_server import logs
from fleet_server.artifacts import LocalArtifactStore
from fleet_server.auth import TokenCache
from fleet_server.broker import BrokerSync
from fleet_server.db import make_engine
from fleet_server.ingest import FleetLink, Ingest
from fleet_server.jobs import JobRunner
from fleet_server.pki import FleetCA
from fleet_server.rollouts.delivery import Delivery
from fleet_server.rollouts.engine import RolloutEngine
from fleet_server.routes import artifacts, devices, insights, models, rollouts, telemetry, tokens, trust
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
            _app.state.rollouts.start()
        _app.state.broker_sync.start_refresh(_app.state.engine)  # the CRL's next-update never lapses
        yield
        _app.state.broker_sync.stop_refresh()
        if settings.rollout_engine:
            _app.state.rollouts.stop()
            _app.state.link.stop()
            _app.state.ingest.stop()
        _app.state.jobs.shutdown()
        _app.state.engine.dispose()

    app = FastAPI(lifespan=lifespan, title="edgefleet fleet API", version="1",
                  description="Devices, models, rollouts and telemetry for a fleet of edge devices. "
                              "Authenticate with `Authorization: Bearer <API token>`.")
    app.state.settings = settings
    app.state.engine = make_engine(settings.database_url)
    app.state.tokens = TokenCache(app.state.engine)
    app.state.broker_sync = BrokerSync(settings.broker_files_dir, pid_file=settings.broker_pid_file,
                                       server_user=settings.mqtt_username or "fleet-server",
                                       server_password=settings.mqtt_password, pki_dir=settings.pki_folder)
    if settings.broker_files_dir is not None:  # the broker can start from these before any enrollment
        with Session(app.state.engine) as session:
            app.state.broker_sync.sync(session)
    app.state.artifacts = LocalArtifactStore(settings.data_dir / "artifacts")
    app.state.delivery = Delivery(settings.data_dir, app.state.artifacts)
    app.state.ingest = Ingest(app.state.engine, app.state.delivery, lambda t, p: app.state.link.publish(t, p))
    app.state.link = FleetLink(settings.broker_url, f"fleet-server-{socket.gethostname()}-{instance_slot(settings)}",
                               app.state.ingest.submit, username=settings.mqtt_username,
                               password=settings.mqtt_password, tls=_link_tls(settings))
    app.state.rollouts = RolloutEngine(app.state.engine, app.state.delivery, app.state.link.publish,
                                       tick_s=settings.engine_tick_s, drift_interval_s=settings.drift_interval_s,
                                       drift_window_s=settings.drift_window_s)
    app.state.jobs = JobRunner(settings.database_url, settings.data_dir, workers=settings.conversion_workers)
    registry = CollectorRegistry()
    requests = Counter("edgefleet_api_requests", "API requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("edgefleet_api_request_seconds", "API latency", ["route"], registry=registry)

    app.add_middleware(_Metrics, requests=requests, latency=latency)

    @app.get("/health", tags=["operations"])
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"])
    def ready(response: Response) -> dict:
        checks = {"database": _database_ok(app), "broker": _broker_ok(settings.broker_url)}
        if not all(checks.values()):
            response.status_code = 503
        return {"ready": all(checks.values()), **checks}

    @app.get("/metrics", tags=["operations"])
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(tokens.router)
    app.include_router(devices.router)
    app.include_router(artifacts.router)
    app.include_router(trust.router)
    app.include_router(models.router)
    app.include_router(rollouts.router)
    app.include_router(telemetry.router)
    app.include_router(insights.router)
    return app


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
