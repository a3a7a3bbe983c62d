"""The local inference API: answers on the device with no network beyond it (loopback TCP or a Unix socket).

The standard library's threaded HTTP/1.1 server, not an ASGI stack: per request it costs a fraction of a
millisecond and a few MB of RSS, which is what a Raspberry Pi wants (see ``bench/agent_bench.py``).

    POST /v1/predict   application/json  {"inputs": {name: {"data": [...], "shape": [...], "dtype": "float32"}}}
                       application/x-npy (single-input models) or application/x-npz (one array per input name);
                       the answer comes in the same encoding (npz for several outputs)
    GET  /v1/model     the active model: version, slot, format, runtime, inputs and outputs; the update state
    GET  /health       the process is up        GET /ready   a model is loaded (503 otherwise)
    GET  /metrics      Prometheus text format
    POST /v1/rollback  switch back to the previous slot (what ``fleet-agent rollback`` calls)

Requests run on whatever model is active when they start; an update swaps the model reference atomically, so
in-flight requests finish on the old model and no request fails because of an update.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agent.batching import MicroBatcher, batchable
from agent.runtimes import InputError, Model, check_feeds
from agent.slots import SlotInfo
from agent.telemetry import Telemetry

log = logging.getLogger(__name__)

NPY, NPZ, JSON = "application/x-npy", "application/x-npz", "application/json"
MAX_JSON_ELEMENTS = 4_000_000


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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("edgefleet_agent_requests", "Predict requests", ["outcome"], registry=self.registry)
        self.latency = Histogram("edgefleet_agent_predict_seconds", "Model run time per request",
                                 registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.model_info = Gauge("edgefleet_agent_model_loaded", "1 when a model is loaded", registry=self.registry)
        self.update_state = Gauge("edgefleet_agent_update_busy", "1 while an update is in progress",
                                  registry=self.registry)
        self.outbox = Gauge("edgefleet_agent_outbox_messages", "Messages waiting for the broker",
                            registry=self.registry)


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class LocalApi:
    def __init__(self, serving: Serving, telemetry: Telemetry, *, max_request_bytes: int,
                 status: Callable[[], dict], metrics: Metrics | None = None,
                 rollback: Callable[[], None] | None = None, batcher: MicroBatcher | None = None):
        self.serving, self.telemetry, self.max_request_bytes = serving, telemetry, max_request_bytes
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
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="local-api", daemon=True)
        self._thread.start()
        return where

    def stop(self, drain_s: float = 10.0) -> None:
        if self._server is None:
            return
        self._server.shutdown()  # stop accepting; handler threads already running go on
        self.serving.drain(drain_s)
        self._server.server_close()
        if self.batcher is not None:
            self.batcher.close()

    # ------------------------------------------------------------------ requests

    def predict(self, content_type: str, body: bytes) -> tuple[str, bytes]:
        feeds_raw, encoding = _decode(content_type, body)
        loaded = self.serving.enter()
        try:
            if loaded is None:
                raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "no model is loaded yet")
            if encoding == NPY:
                if len(loaded.model.inputs) != 1:
                    raise ApiError(HTTPStatus.BAD_REQUEST, f"application/x-npy carries one input; this model takes "
                                                          f"{[t.name for t in loaded.model.inputs]} (use x-npz)")
                feeds_raw = {loaded.model.inputs[0].name: feeds_raw[""]}
            try:
                feeds = check_feeds(loaded.model, feeds_raw)
            except InputError as e:
                self.telemetry.record(0.0, error="bad_input")
                self.metrics.requests.labels("bad_input").inc()
                raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from e
            t0 = time.perf_counter()
            try:
                if self.batcher is not None and batchable(loaded.model):
                    outputs = self.batcher.run(loaded.model, feeds)
                else:
                    outputs = loaded.model.run(feeds)
            except Exception as e:  # a runtime failure on valid input: count it, answer 500, keep serving
                self.telemetry.record(0.0, error="runtime")
                self.metrics.requests.labels("runtime_error").inc()
                raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"the model failed: {str(e)[:300]}") from e
            seconds = time.perf_counter() - t0
        finally:
            self.serving.leave()
        # outputs ride along as "out/<name>": the server compares their distributions (drift, A/B tests)
        self.telemetry.record(seconds * 1e3, inputs={**feeds, **{f"out/{k}": v for k, v in outputs.items()}})
        self.metrics.requests.labels("ok").inc()
        self.metrics.latency.observe(seconds)
        return _encode(encoding, outputs, loaded, seconds)

    def model_info(self) -> dict:
        loaded = self.serving.current
        info = {"loaded": loaded is not None, **self.status()}
        if loaded is not None:
            i = loaded.info
            info.update(model=i.model, version=i.model_version, slot=i.slot, format=i.format, sha256=i.sha256,
                        runtime=loaded.model.backend, inputs=[t.describe() for t in loaded.model.inputs],
                        outputs=[t.describe() for t in loaded.model.outputs])
        return info


def _decode(content_type: str, body: bytes) -> tuple[dict[str, np.ndarray], str]:
    kind = content_type.split(";")[0].strip().lower()
    try:
        if kind == NPY:
            return {"": read_npy(body)}, NPY
        if kind == NPZ:
            with np.load(io.BytesIO(body), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}, NPZ
    except (ValueError, OSError, EOFError) as e:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not valid {kind}: {e}") from e
    if kind != JSON:
        raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"content type {kind or '(none)'}; use {JSON}, {NPY} or "
                                                          f"{NPZ}")
    try:
        doc = json.loads(body)
        spec = doc["inputs"]
        if not isinstance(spec, dict) or not spec:
            raise TypeError("'inputs' must be an object of name → tensor")
        feeds = {}
        for name, t in spec.items():
            data, dtype = (t.get("data"), t.get("dtype", "float32")) if isinstance(t, dict) else (t, "float32")
            arr = np.asarray(data, dtype=np.dtype(dtype))
            if arr.size > MAX_JSON_ELEMENTS:
                raise ValueError(f"input {name!r} has {arr.size} elements (JSON limit {MAX_JSON_ELEMENTS}); use "
                                 f"{NPY} or {NPZ}")
            if isinstance(t, dict) and "shape" in t:
                arr = arr.reshape([int(d) for d in t["shape"]])
            feeds[name] = arr
    except (ValueError, TypeError, KeyError, json.JSONDecodeError, RecursionError) as e:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"bad JSON request: {e}") from e
    return feeds, JSON


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


_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=][a-z]\d{1,2})', 'fortran_order': False, 'shape': \(([\d, ]*)\), \}")
_NPY_DTYPES = {"f4", "f2", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}


def read_npy(body: bytes) -> np.ndarray:
    """An .npy body. The plain C-ordered numeric layout every client writes is parsed directly (numpy's reader
    spends ~0.15 ms per call in ``ast.literal_eval`` on the header); anything else goes through ``np.load``."""
    if body[:8] in (b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00") and len(body) > 12:
        size = int.from_bytes(body[8:10] if body[6] == 1 else body[8:12], "little")
        start = (10 if body[6] == 1 else 12) + size
        m = _NPY_HEADER.match(body[start - size:start].rstrip(b" \n"))
        if m and m.group(1).decode()[1:] in _NPY_DTYPES:
            shape = tuple(int(d) for d in m.group(2).split(b",") if d.strip())
            dtype = np.dtype(m.group(1).decode())
            count = int(np.prod(shape)) if shape else 1
            if len(body) - start != count * dtype.itemsize:
                raise ValueError(f"{len(body) - start} data bytes for shape {list(shape)} of {dtype}")
            return np.frombuffer(body, dtype, count, start).reshape(shape)
    return np.load(io.BytesIO(body), allow_pickle=False)


def write_npy(a: np.ndarray) -> bytes:
    """``np.save``'s format 1.0 bytes, without its per-call overhead."""
    a = a if a.flags.c_contiguous else a.copy(order="C")  # (np.ascontiguousarray makes 0-d arrays 1-d)
    header = f"{{'descr': '{a.dtype.str}', 'fortran_order': False, 'shape': {a.shape!r}, }}"
    pad = 63 - (10 + len(header)) % 64
    return b"\x93NUMPY\x01\x00" + (len(header) + pad + 1).to_bytes(2, "little") + header.encode() + \
        b" " * pad + b"\n" + a.tobytes()


MAX_HEADERS = 100
MAX_HEADER_LINE = 8192


class _Headers(dict):
    """Request headers by lower-case name (what the handler reads: Content-Length, Content-Type, Connection)."""

    def get(self, key, default=None):  # type: ignore[override]
        return super().get(key.lower(), default)


class _TcpHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

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

        def parse_request(self) -> bool:
            """HTTP/1.1 request line and headers, lean: the standard parser runs every header block through
            ``email.parser`` (~0.1 ms a request, a fifth of the API's whole overhead)."""
            self.command = None
            self.request_version = version = self.default_request_version
            self.close_connection = True
            line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
            self.requestline = line
            parts = line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                self.send_error(HTTPStatus.BAD_REQUEST, f"bad request line {line[:100]!r}")
                return False
            self.command, self.path, self.request_version = parts
            version = parts[2]
            headers = _Headers()
            for _ in range(MAX_HEADERS + 1):
                raw = self.rfile.readline(MAX_HEADER_LINE + 1)
                if len(raw) > MAX_HEADER_LINE:
                    self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header line too long")
                    return False
                if raw in (b"\r\n", b"\n", b""):
                    break
                name, _, value = raw.decode("iso-8859-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            else:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
                return False
            self.headers = headers  # type: ignore[assignment]
            connection = headers.get("connection", "").lower()
            self.close_connection = connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive")
            return True

        def log_message(self, format: str, *args) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: HTTPStatus, message: str) -> None:
            self._send(status, JSON, json.dumps({"error": message, "status": int(status)}).encode())

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/health":
                self._send(HTTPStatus.OK, JSON, b'{"status":"ok"}')
            elif path == "/ready":
                ready = api.serving.current is not None
                self._send(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, JSON,
                           json.dumps({"ready": ready}).encode())
            elif path == "/v1/model":
                self._send(HTTPStatus.OK, JSON, json.dumps(api.model_info()).encode())
            elif path == "/metrics":
                api.metrics.model_info.set(1 if api.serving.current else 0)
                self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(api.metrics.registry))
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such endpoint {path}")

        def do_POST(self) -> None:
            if self.path.split("?")[0] == "/v1/rollback" and api.rollback is not None:
                self._drain_body()
                api.rollback()
                self._send(HTTPStatus.ACCEPTED, JSON, b'{"rollback":"requested"}')
                return
            if self.path.split("?")[0] != "/v1/predict":
                self._drain_body()
                self._error(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path}")
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
                return
            if length > api.max_request_bytes:
                self.close_connection = True  # do not read an oversized body
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"body of {length} bytes exceeds the limit of {api.max_request_bytes}")
                return
            body = self.rfile.read(length)
            try:
                content_type, payload = api.predict(self.headers.get("Content-Type", ""), body)
            except ApiError as e:
                self._error(e.status, str(e))
                return
            except Exception:  # never let one request take the server down
                log.exception("predict failed")
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
                return
            self._send(HTTPStatus.OK, content_type, payload)

        def _drain_body(self) -> None:
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = 0
            if 0 < length <= api.max_request_bytes:
                self.rfile.read(length)
            elif length:
                self.close_connection = True

        do_PUT = do_DELETE = do_PATCH = lambda self: self._error(HTTPStatus.METHOD_NOT_ALLOWED,
                                                                 f"{self.command} is not allowed")

    return Handler
