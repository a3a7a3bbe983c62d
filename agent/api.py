"""The local inference API: answers on the device with no network beyond it (loopback TCP or a Unix socket).

The standard library's threaded HTTP/1.1 server, not an ASGI stack: per request it costs a fraction of a
millisecond and a few MB of RSS, which is what a Raspberry Pi wants (see ``bench/agent_bench.py``).

    POST /v1/models/{name}/predict   application/json  {"inputs": {name: {"data": [...], "shape": [...],
                       "dtype": "float32"}}}, application/x-npy (single-input models) or application/x-npz (one
                       array per input name); the answer comes in the same encoding (npz for several outputs)
    POST /v1/predict   the same, for a device with one model (409 naming the models when it has several)
    GET  /v1/models    every model: version, slot, format, runtime, inputs and outputs, its update state
    GET  /v1/models/{name}   one of them        GET /v1/model   the device's one model (or the list) and status
    GET  /health       the process is up        GET /ready   every model is loaded (503 otherwise)
    GET  /metrics      Prometheus text format, per model
    POST /v1/models/{name}/rollback, POST /v1/rollback   switch back to the previous slot (``fleet-agent rollback``)

Callers are local but not trusted: every size a body declares (dtype, shape, zip members) is checked against
``max_request_bytes`` before anything is allocated, lengths are plain Content-Length only, a connection waits at most
``read_timeout_s`` for a request and gets that long to send it whole, and at most ``max_connections`` are served.

Requests run on whatever model is active when they start; an update swaps the model reference atomically, so
in-flight requests finish on the old model and no request fails because of an update. Each named model has its own
reference (``Serving``) and telemetry: an update of one is invisible to the others' requests.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import socketserver
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agent.batching import MicroBatcher, batchable
from agent.bodies import (
    JSON,
    NPY,
    NPZ,
    BodyError,
    BodyTooLargeError,
    DtypeError,
    json_feeds,
    read_npy,
    read_npz,
    write_npy,
)
from agent.slots import SlotInfo
from agent.telemetry import Telemetry
from fleet_runtime.runtimes import InputError, Model, check_feeds

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Loaded:
    model: Model
    info: SlotInfo


class Serving:
    """The model that answers requests. Swapping is one reference assignment; the old model stays alive for the
    requests that hold it."""

    def __init__(self) -> None:
        self._current: Loaded | None = None
        self.in_flight = 0
        self._cond = threading.Condition()

    @property
    def current(self) -> Loaded | None:
        return self._current

    def swap(self, loaded: Loaded | None) -> Loaded | None:
        old, self._current = self._current, loaded
        return old

    def enter(self) -> Loaded | None:
        with self._cond:
            self.in_flight += 1
            return self._current

    def leave(self) -> None:
        with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait for in-flight requests to finish (shutdown); False if some are still running."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


@dataclass(frozen=True)
class Endpoint:
    """One named model as the API serves it: its reference, its telemetry, its rollback and update status."""

    serving: Serving
    telemetry: Telemetry
    rollback: Callable[[], None] | None = None
    status: Callable[[], dict] = dict
    # False while its first version is being installed: listed, not served nor awaited (asked at each use)
    installed: Callable[[], bool] = lambda: True


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("edgefleet_agent_requests", "Predict requests", ["model", "outcome"],
                                registry=self.registry)
        self.latency = Histogram("edgefleet_agent_predict_seconds", "Model run time per request", ["model"],
                                 registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.model_info = Gauge("edgefleet_agent_model_loaded", "1 when the model is loaded", ["model"],
                                registry=self.registry)
        self.update_state = Gauge("edgefleet_agent_update_busy", "1 while an update is in progress",
                                  registry=self.registry)
        self.outbox = Gauge("edgefleet_agent_outbox_messages", "Messages waiting for the broker",
                            registry=self.registry)


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class LocalApi:
    """``models`` gives the named models to serve (``agent.models.ModelSet.endpoints``); a caller with one model may
    pass its ``serving`` and ``telemetry`` instead (listed under the loaded model's name)."""

    def __init__(self, serving: Serving | None = None, telemetry: Telemetry | None = None, *,
                 max_request_bytes: int, status: Callable[[], dict], metrics: Metrics | None = None,
                 rollback: Callable[[], None] | None = None, batcher: MicroBatcher | None = None,
                 read_timeout_s: float = 30.0, max_connections: int = 256,
                 models: Callable[[], dict[str, Endpoint]] | None = None):
        if models is None:
            if serving is None or telemetry is None:
                raise ValueError("pass models, or serving and telemetry")
            single = {"": Endpoint(serving, telemetry, rollback=rollback)}
            models = lambda: single  # noqa: E731
        self.models, self.max_request_bytes = models, max_request_bytes
        # how long a connection may wait idle for its next request, and how long one request may take to arrive
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections  # each holds a thread and up to max_request_bytes
        self.status, self.rollback, self.batcher = status, rollback, batcher
        self.metrics = metrics or Metrics()
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ serving

    def start(self, *, host: str = "127.0.0.1", port: int = 0, unix_socket: Path | None = None) -> str:
        handler = _handler_for(self)
        if unix_socket is not None:
            if unix_socket.exists():
                unix_socket.unlink()
            server: socketserver.BaseServer = _UnixHTTPServer(str(unix_socket), handler)
            os.chmod(unix_socket, 0o660)
            where = f"unix:{unix_socket}"
        else:
            server = _TcpHTTPServer((host, port), handler)
            where = f"http://{host}:{server.server_address[1]}"  # type: ignore[attr-defined]
        server.slots = threading.BoundedSemaphore(self.max_connections)  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="local-api", daemon=True)
        self._thread.start()
        return where

    def stop(self, drain_s: float = 10.0) -> None:
        if self._server is None:
            return
        self._server.shutdown()  # stop accepting; handler threads already running go on
        for endpoint in self.models().values():
            endpoint.serving.drain(drain_s)
        self._server.server_close()
        if self.batcher is not None:
            self.batcher.close()

    # ------------------------------------------------------------------ requests

    # ------------------------------------------------------------------ which model

    def endpoint(self, name: str | None) -> tuple[str, Endpoint]:
        """The named model (None: the device's one model); ApiError when there is no such model, or no one."""
        endpoints = self.models()
        if name is None:
            endpoints = {k: e for k, e in endpoints.items() if e.installed()}
            if len(endpoints) > 1:
                raise ApiError(HTTPStatus.CONFLICT, f"this device serves several models ({', '.join(endpoints)}): "
                                                    "use /v1/models/{name}/…")
            if not endpoints:
                raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "no model is loaded yet")
            key, found = next(iter(endpoints.items()))
            return key or _loaded_name(found) or "", found
        if name in endpoints:
            return name, endpoints[name]
        for found in endpoints.values():  # a single model passed without its name
            if _loaded_name(found) == name:
                return name, found
        raise ApiError(HTTPStatus.NOT_FOUND, f"no model {name[:64]!r} on this device (models: "
                                             f"{', '.join(self.names()) or 'none'})")

    def names(self) -> list[str]:
        return [key or _loaded_name(e) or "" for key, e in self.models().items()]

    # ------------------------------------------------------------------ requests

    def predict(self, content_type: str, body: bytes, model: str | None = None) -> tuple[str, bytes]:
        name, endpoint = self.endpoint(model)
        feeds_raw, encoding = _decode(content_type, body, self.max_request_bytes)
        telemetry, counted = endpoint.telemetry, self.metrics.requests
        loaded = endpoint.serving.enter()
        try:
            if loaded is None:
                raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"model {name} is not loaded")
            if encoding == NPY:
                if len(loaded.model.inputs) != 1:
                    raise ApiError(HTTPStatus.BAD_REQUEST, f"application/x-npy carries one input; this model takes "
                                                          f"{[t.name for t in loaded.model.inputs]} (use x-npz)")
                feeds_raw = {loaded.model.inputs[0].name: feeds_raw[""]}
            try:
                names = sorted(t.name for t in loaded.model.inputs)
                if sorted(feeds_raw) != names:  # (check_feeds would quote the request's names back)
                    raise InputError(f"the request's inputs do not match the model's {names}")
                feeds = check_feeds(loaded.model, feeds_raw)
            except InputError as e:
                telemetry.record(0.0, error="bad_input")
                counted.labels(name, "bad_input").inc()
                raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from e
            t0 = time.perf_counter()
            try:
                if self.batcher is not None and batchable(loaded.model):
                    outputs = self.batcher.run(loaded.model, feeds)
                else:
                    outputs = loaded.model.run(feeds)
            except Exception as e:  # a runtime failure on valid input: count it, answer 500, keep serving
                telemetry.record(0.0, error="runtime")
                counted.labels(name, "runtime_error").inc()
                raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"the model failed: {str(e)[:300]}") from e
            seconds = time.perf_counter() - t0
        finally:
            endpoint.serving.leave()
        # outputs ride along as "out/<name>": the server compares their distributions (drift, A/B tests)
        telemetry.record(seconds * 1e3, inputs={**feeds, **{f"out/{k}": v for k, v in outputs.items()}})
        counted.labels(name, "ok").inc()
        self.metrics.latency.labels(name).observe(seconds)
        return _encode(encoding, outputs, loaded, seconds)

    def model_info(self, name: str | None = None) -> dict:
        """GET /v1/model (``name`` None): the device's status with its one model, or with the list of several;
        GET /v1/models/{name}: that model."""
        if name is not None:
            return _describe(*self.endpoint(name))
        endpoints = self.models()
        installed = {k: e for k, e in endpoints.items() if e.installed()}
        if len(installed) == 1:  # one model serves (a second one's first install may be under way)
            endpoints = installed
        if len(endpoints) > 1:
            listed = self.list_models()
            return {"loaded": all(m["loaded"] for m in listed), **self.status(), "models": listed}
        if not endpoints:  # no model yet, and no update under way
            return {"loaded": False, **self.status(), "update": {"state": "idle", "job": None, "reason": "",
                                                                 "detail": "", "waiting": None}}
        key, endpoint = next(iter(endpoints.items()))
        return {**self.status(), **_describe(key or _loaded_name(endpoint) or "", endpoint)}

    def list_models(self) -> list[dict]:
        return [_describe(key or _loaded_name(e) or "", e) for key, e in self.models().items()]

    def ready(self) -> bool:
        """Every installed model is loaded (and there is one)."""
        installed = [e for e in self.models().values() if e.installed()]
        return bool(installed) and all(e.serving.current is not None for e in installed)


def _loaded_name(endpoint: Endpoint) -> str | None:
    loaded = endpoint.serving.current
    return loaded.info.model if loaded is not None else None


def _describe(name: str, endpoint: Endpoint) -> dict:
    loaded = endpoint.serving.current
    info: dict = {"name": name, "loaded": loaded is not None, **endpoint.status()}
    if loaded is not None:
        i = loaded.info
        info.update(model=i.model, version=i.model_version, slot=i.slot, format=i.format, sha256=i.sha256,
                    runtime=loaded.model.backend, inputs=[t.describe() for t in loaded.model.inputs],
                    outputs=[t.describe() for t in loaded.model.outputs])
    return info


# ------------------------------------------------------------------ request bodies
#
# Every size is checked against the request limit from what the body declares, before anything is allocated. Peak
# RSS of the serving process (79 MB idle) before these checks: a 64-byte JSON body with dtype "S200000000" 841 MB,
# a 0.5 MB .npz inflating to 512 MiB 592 MB; after: 79 MB for both.

def _decode(content_type: str, body: bytes, limit: int) -> tuple[dict[str, np.ndarray], str]:
    kind = content_type.split(";")[0].strip().lower()
    if kind not in (JSON, NPY, NPZ):
        raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"unsupported content type; use {JSON}, {NPY} or {NPZ}")
    try:
        if kind == NPY:
            return {"": read_npy(body, limit)}, NPY
        if kind == NPZ:
            return read_npz(body, limit), NPZ
        return json_feeds(body, limit), JSON
    except BodyTooLargeError as e:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(e)) from e
    except DtypeError as e:
        raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from e
    except BodyError as e:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"bad JSON request: {e}" if kind == JSON else
                       f"body is not valid {kind}: {e}") from e
    except (zipfile.BadZipFile, zlib.error, struct.error, EOFError, OSError, ValueError) as e:  # (may quote the body)
        raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not valid {kind}") from e


def _encode(encoding: str, outputs: dict[str, np.ndarray], loaded: Loaded, seconds: float) -> tuple[str, bytes]:
    if encoding == JSON:
        doc = {"model": {"name": loaded.info.model, "version": loaded.info.model_version, "slot": loaded.info.slot},
               "latency_ms": seconds * 1e3,
               "outputs": {n: {"shape": list(v.shape), "dtype": v.dtype.name, "data": v.ravel().tolist()}
                           for n, v in outputs.items()}}
        return JSON, json.dumps(doc).encode()
    if encoding == NPY and len(outputs) == 1:
        return NPY, write_npy(next(iter(outputs.values())))
    buf = io.BytesIO()
    np.savez(buf, **outputs)
    return NPZ, buf.getvalue()

def _model_path(path: str, tail: str) -> str | None:
    """The model name in ``/v1/models/{name}{tail}``, or None when ``path`` is not of that form."""
    prefix = "/v1/models/"
    if not (path.startswith(prefix) and path.endswith(tail)):
        return None
    name = path[len(prefix):len(path) - len(tail)]
    return name if name and "/" not in name else None


MAX_HEADERS = 100
MAX_HEADER_LINE = 8192
MAX_REQUEST_LINE = 65536
_SINGLE_HEADERS = {"content-length": "Content-Length", "transfer-encoding": "Transfer-Encoding"}


class _Headers(dict):
    """Request headers by lower-case name (what the handler reads: Content-Length, Content-Type, Connection)."""

    def get(self, key, default=None):  # type: ignore[override]
        return super().get(key.lower(), default)


def _body_length(headers: _Headers, limit: int, *, required: bool) -> int:
    """The body's length from the headers alone, so that a refused body is never read. Only plain ASCII digits:
    ``int()`` also takes "-1" (which made the handler read to end of stream, past the limit), "+5", " 5", "5_0"."""
    if headers.get("transfer-encoding") is not None:
        if headers.get("content-length") is not None:
            raise ApiError(HTTPStatus.BAD_REQUEST, "a request carries Transfer-Encoding or Content-Length, not both")
        raise ApiError(HTTPStatus.LENGTH_REQUIRED,
                       "send the body with a Content-Length (Transfer-Encoding is not accepted)")
    raw = headers.get("content-length")
    if raw is None:
        if required:
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        return 0  # (RFC 9112: no Content-Length and no Transfer-Encoding is an empty body)
    if not (raw.isascii() and raw.isdigit()):
        raise ApiError(HTTPStatus.BAD_REQUEST, "Content-Length must be a decimal number of bytes")
    if len(raw) > 18 or int(raw) > limit:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body exceeds the limit of {limit} bytes")
    return int(raw)


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each waiting at most ``timeout`` while the connection is idle and, once a request has
    begun, only until that request's ``deadline``: a client that sends a byte just before each timeout would
    otherwise hold its thread for ever."""

    def __init__(self, sock: socket.socket, timeout: float):
        super().__init__()
        self.sock, self.timeout = sock, timeout
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        left = self.timeout if self.deadline is None else self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request deadline has passed")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


_BUSY_BODY = json.dumps({"error": "too many connections; retry later", "status": 503}).encode()
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class _BoundedThreads(socketserver.ThreadingMixIn):
    """A thread per connection, at most ``slots`` of them: past that a connection gets 503 at once."""

    daemon_threads = True
    slots: threading.BoundedSemaphore

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(_BUSY)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        # a client that resets or times out its connection is no server error: no traceback on stderr
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _TcpHTTPServer(_BoundedThreads, HTTPServer):
    allow_reuse_address = True
    request_queue_size = 64


class _UnixHTTPServer(_BoundedThreads, socketserver.UnixStreamServer):
    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("unix", 0)  # http.server logs a (host, port) pair


def _handler_for(api: LocalApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: no TCP handshake per request
        server_version = "edgefleet-agent"

        def setup(self) -> None:
            super().setup()
            if isinstance(self.connection, socket.socket) and self.connection.family == socket.AF_INET:
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.rfile.close()  # (closes the socket's file, not the socket) reads go through the deadline instead
            self.reader = _DeadlineReader(self.connection, api.read_timeout_s)
            self.rfile = self.incoming = io.BufferedReader(self.reader, 65536)

        def handle_one_request(self) -> None:
            """One request: wait for it up to the read timeout, then read it whole before its deadline (408 if not).
            The standard library's version waits without a limit."""
            self.command, self.requestline, self.request_version = None, "", "HTTP/1.1"  # type: ignore[assignment]
            self.reader.deadline = None
            try:
                if not self.incoming.peek(1):  # the client closed the connection
                    self.close_connection = True
                    return
                self.reader.deadline = time.monotonic() + api.read_timeout_s
                self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
                if len(self.raw_requestline) > MAX_REQUEST_LINE:
                    self._refuse(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
                    return
                if not self.parse_request():
                    return
                method = getattr(self, f"do_{self.command}", None)
                if method is None:
                    self._refuse(HTTPStatus.NOT_IMPLEMENTED, "method not supported")
                    return
                method()
                self.wfile.flush()
            except TimeoutError:
                self.close_connection = True
                if self.reader.deadline is not None:  # a request had begun: say why it ends
                    with contextlib.suppress(OSError):
                        self._error(HTTPStatus.REQUEST_TIMEOUT, "the request did not arrive in time")

        def parse_request(self) -> bool:
            """HTTP/1.1 request line and headers, lean: the standard parser runs every header block through
            ``email.parser`` (~0.1 ms a request, a fifth of the API's whole overhead)."""
            self.close_connection = True
            line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
            self.requestline = line
            parts = line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                self._refuse(HTTPStatus.BAD_REQUEST, "bad request line")
                return False
            self.command, self.path, self.request_version = parts
            headers = _Headers()
            for _ in range(MAX_HEADERS + 1):
                raw = self.rfile.readline(MAX_HEADER_LINE + 1)
                if len(raw) > MAX_HEADER_LINE:
                    self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header line too long")
                    return False
                if raw in (b"\r\n", b"\n", b""):
                    break
                name, colon, value = raw.decode("iso-8859-1").partition(":")
                if not colon or name[:1] in (" ", "\t"):  # (a folded line could hide a second length)
                    self._refuse(HTTPStatus.BAD_REQUEST, "malformed header line")
                    return False
                name = name.strip().lower()
                if name in _SINGLE_HEADERS and name in headers:  # which one is the body's length?
                    self._refuse(HTTPStatus.BAD_REQUEST, f"duplicate {_SINGLE_HEADERS[name]} header")
                    return False
                headers[name] = value.strip()
            else:
                self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
                return False
            self.headers = headers  # type: ignore[assignment]
            connection = headers.get("connection", "").lower()
            self.close_connection = connection == "close" or (parts[2] == "HTTP/1.0" and connection != "keep-alive")
            if self.command != "POST" and (headers.get("transfer-encoding") is not None
                                           or headers.get("content-length", "0") != "0"):
                self.close_connection = True  # a body no handler reads must not be taken for the next request
            return True

        def log_message(self, format: str, *args) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
            self.reader.deadline = None  # the request is read (or refused): the answer gets the whole timeout
            self.connection.settimeout(api.read_timeout_s)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: HTTPStatus, message: str) -> None:
            self._send(status, JSON, json.dumps({"error": message, "status": int(status)}).encode())

        def _refuse(self, status: HTTPStatus, message: str) -> None:
            """Answer and close: whatever the client sent after this point is not read."""
            self.close_connection = True
            self._error(status, message)

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            try:
                if path == "/health":
                    self._send(HTTPStatus.OK, JSON, b'{"status":"ok"}')
                elif path == "/ready":
                    ready = api.ready()
                    self._send(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, JSON,
                               json.dumps({"ready": ready}).encode())
                elif path == "/v1/model":
                    self._send(HTTPStatus.OK, JSON, json.dumps(api.model_info()).encode())
                elif path == "/v1/models":
                    self._send(HTTPStatus.OK, JSON, json.dumps({"models": api.list_models()}).encode())
                elif (name := _model_path(path, "")) is not None:
                    self._send(HTTPStatus.OK, JSON, json.dumps(api.model_info(name)).encode())
                elif path == "/metrics":
                    for key, endpoint in api.models().items():
                        label = key or _loaded_name(endpoint) or ""
                        api.metrics.model_info.labels(label).set(1 if endpoint.serving.current else 0)
                    self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(api.metrics.registry))
                else:
                    self._error(HTTPStatus.NOT_FOUND, "no such endpoint")
            except ApiError as e:
                self._error(e.status, str(e))

        def do_POST(self) -> None:
            path = self.path.split("?")[0]
            predict = path == "/v1/predict" or _model_path(path, "/predict") is not None
            try:
                length = _body_length(self.headers, api.max_request_bytes,  # type: ignore[arg-type]
                                      required=predict)
            except ApiError as e:
                self._refuse(e.status, str(e))
                return
            body = self.rfile.read(length)  # each socket read bounded by the request's deadline
            if len(body) != length:
                self._refuse(HTTPStatus.BAD_REQUEST, "the body ended before Content-Length bytes")
                return
            if predict:
                self._predict(body, _model_path(path, "/predict"))
            elif path == "/v1/rollback" or (name := _model_path(path, "/rollback")) is not None:
                self._rollback(None if path == "/v1/rollback" else name)
            else:
                self._error(HTTPStatus.NOT_FOUND, "no such endpoint")

        def _rollback(self, name: str | None) -> None:
            try:
                _, endpoint = api.endpoint(name)
            except ApiError as e:
                self._error(e.status, str(e))
                return
            if endpoint.rollback is None:
                self._error(HTTPStatus.NOT_FOUND, "rollback is not available")
                return
            endpoint.rollback()
            self._send(HTTPStatus.ACCEPTED, JSON, b'{"rollback":"requested"}')

        def _predict(self, body: bytes, model: str | None) -> None:
            try:
                content_type, payload = api.predict(self.headers.get("Content-Type", ""), body, model)
            except ApiError as e:
                self._error(e.status, str(e))
                return
            except Exception:  # never let one request take the server down
                log.exception("predict failed")
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
                return
            self._send(HTTPStatus.OK, content_type, payload)

        do_PUT = do_DELETE = do_PATCH = lambda self: self._error(HTTPStatus.METHOD_NOT_ALLOWED,
                                                                 f"{self.command} is not allowed")

    return Handler
