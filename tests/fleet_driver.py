"""Test infrastructure that plays the real parts: a Mosquitto broker on a free loopback port, and a small fleet
"server" that signs offers with fleet_protocol and serves chunks over MQTT (the agent tests' driver).

Nothing here is a mock: the broker is the Mosquitto binary, the metadata is real TUF metadata signed with Ed25519,
the chunks are fleet_protocol's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet_protocol import delta, messages, topics
from fleet_protocol.chunks import chunks, manifest_for
from fleet_protocol.crypto import key_id
from fleet_protocol.keys import generate_signer
from fleet_protocol.metadata import (
    ArtifactInfo,
    DeltaInfo,
    Probe,
    Provenance,
    Scope,
    UpdateSpec,
    build_root,
    build_update,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def wait_path(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Path(path).exists():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{path} never appeared")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not found:
        raise RuntimeError("mosquitto is not installed (make test installs it)")
    return found


class Broker:
    """A real Mosquitto on 127.0.0.1, restartable on the same port with its sessions persisted."""

    def __init__(self, workdir: Path, port: int | None = None, extra: str = ""):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.dir}/\nautosave_interval 1\nuser root\nmax_queued_messages 100000\n"
            f"log_dest file {self.dir}/mosquitto.log\n{extra}")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Broker:
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # saves the persistence file
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass
class Release:
    """One model version the driver can offer: its bytes and golden probe data."""

    model: str
    version: str
    data: bytes
    probe: bytes
    fmt: str = "onnx-int8"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def golden(model_path: Path, inputs: dict[str, np.ndarray]) -> bytes:
    """Probe data for a model: inputs and the outputs ONNX Runtime gives for them."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, inputs)
    buf = io.BytesIO()
    np.savez(buf, **{f"in/{k}": v for k, v in inputs.items()},
             **{f"out/{o.name}": v for o, v in zip(sess.get_outputs(), outs, strict=True)})
    return buf.getvalue()


@dataclass
class FleetDriver:
    """The server's part: keys, signed offers, chunk serving, and what the device reported."""

    broker_url: str
    device_id: str
    profile: str = "rpi5"
    chunk_size: int = 16 * 1024
    events: list = field(default_factory=list)
    telemetry: list = field(default_factory=list)
    states: list = field(default_factory=list)
    online: list = field(default_factory=list)
    chunk_requests: list = field(default_factory=list)
    serve_chunks: bool = True
    # "negotiate": binary chunk frames to a request that carries the ("ef-chunks", "bin1") user property, JSON to one
    # that does not (the fleet server's rule); "json": always JSON (how an older server answers)
    chunk_encoding: Literal["negotiate", "json"] = "negotiate"
    chunks_sent: dict = field(default_factory=lambda: {"binary": 0, "json": 0})

    def __post_init__(self) -> None:
        self.root_signer, self.online_signer = generate_signer(), generate_signer()
        self.root = build_root([self.root_signer], [self.online_signer],
                               expires=datetime.now(UTC) + timedelta(days=365))
        self.version = 0
        self.files: dict[tuple[str, str], bytes] = {}  # (job, path) → payload
        self.by_path: dict[str, bytes] = {}  # what the HTTP file server serves
        self._lock = threading.Lock()
        host, port = self.broker_url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"driver-{self.device_id}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self._connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: (self._subscribe(), self._connected.set())
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600  # the broker queues for the driver while it reconnects, too
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect(host, int(port), clean_start=False, properties=props)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("driver could not connect to the broker")

    def _subscribe(self) -> None:
        d = self.device_id
        for kind in ("evt", "tm", "state", "online"):
            self.client.subscribe(topics.topic(d, kind), qos=1)
        self.client.subscribe(f"{topics.ROOT}/d/{d}/dl/+/req", qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    # ------------------------------------------------------------------ what the device says

    def _on_message(self, client, userdata, msg) -> None:
        try:
            m = messages.parse_for(topics.parse(msg.topic).kind, msg.payload)
        except Exception:
            return
        with self._lock:
            if isinstance(m, messages.UpdateEvent):
                self.events.append(m)
            elif isinstance(m, messages.TelemetryBatch):
                self.telemetry.append(m)
            elif isinstance(m, messages.DeviceState):
                self.states.append(m)
            elif isinstance(m, messages.Online):
                self.online.append(m)
            elif isinstance(m, messages.ChunkRequest):
                self.chunk_requests.append(m)
        if isinstance(m, messages.ChunkRequest) and self.serve_chunks:
            offered = dict(getattr(msg.properties, "UserProperty", None) or [])
            binary = offered.get(messages.CHUNK_ENCODINGS_PROPERTY) == messages.BINARY_CHUNKS
            self._serve(m, binary=binary and self.chunk_encoding == "negotiate")

    def _serve(self, req: messages.ChunkRequest, *, binary: bool) -> None:
        payload = self.files.get((req.job, req.path or ""))
        if payload is None:
            return
        manifest = manifest_for(payload, self.chunk_size)
        parts = dict(chunks(payload, manifest))
        for i in req.indices:
            if i in parts:
                body = messages.chunk_frame(req.job, i, parts[i]) if binary else \
                    messages.ChunkData(job=req.job, index=i, data=parts[i]).to_bytes()
                self.client.publish(topics.topic(self.device_id, "dl", req.job), body, qos=1)
                with self._lock:
                    self.chunks_sent["binary" if binary else "json"] += 1

    def wait_online(self, timeout: float = 20.0, after: int = 0) -> None:
        """Until the device said online=true (its subscriptions precede that message on the same connection)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if any(o.online for o in self.online[after:]):
                    return
            time.sleep(0.02)
        raise TimeoutError(f"device {self.device_id} never came online")

    def results(self, job: str) -> list:
        with self._lock:
            return [e for e in self.events if e.job == job and e.result != "pending"]

    def wait_result(self, job: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.results(job)
            if done:
                return done[-1]
            time.sleep(0.05)
        raise TimeoutError(f"no result for job {job}; events: {[(e.job, e.state) for e in self.events][-10:]}")

    # ------------------------------------------------------------------ offers

    def offer(self, job: str, release: Release, *, base: Release | None = None, probe: bytes | None = None,
              atol: float = 1e-3, rtol: float = 1e-3, min_cosine: float = 0.999, tamper: str | None = None,
              expires_in: timedelta = timedelta(hours=1), url: str | None = None, send: bool = True,
              profile: str | None = None, wrong_delta: bool = False,
              encrypt_to: bytes | None = None) -> messages.UpdateOffer:
        """Sign and publish an offer for ``release`` (a delta from ``base`` when given, and the full file; the full
        file encrypted to the device's X25519 key when ``encrypt_to`` is given)."""
        full_path = f"{release.model}/{release.version}/model{'.onnx' if release.fmt == 'onnx-int8' else '.tflite'}"
        body = release.data
        if encrypt_to is not None:
            from fleet_protocol.crypto import encrypt_for

            body = encrypt_for(encrypt_to, release.data, aad=self.device_id.encode())
        artifact = ArtifactInfo(path=full_path, sha256=hashlib.sha256(body).hexdigest(), length=len(body),
                                format=release.fmt, profile=profile or self.profile, model=release.model,
                                model_version=release.version, chunks=manifest_for(body, self.chunk_size))
        self.files[(job, full_path)] = body
        self.by_path[full_path] = body
        deltas = ()
        if base is not None:
            patch = delta.encode(base.data, release.data).data
            if wrong_delta:  # a well-formed patch whose output is not the target (signed consistently)
                patch = delta.encode(base.data, base.data[:-1] + bytes([base.data[-1] ^ 1])).data
            dpath = f"{full_path}.from-{base.sha256[:12]}.patch"
            deltas = (DeltaInfo(path=dpath, algorithm="bsdiff4", base_sha256=base.sha256,
                                sha256=hashlib.sha256(patch).hexdigest(), length=len(patch),
                                chunks=manifest_for(patch, self.chunk_size)),)
            self.files[(job, dpath)] = patch
            self.by_path[dpath] = patch
        probe_bytes = probe if probe is not None else release.probe
        spec = UpdateSpec(scope=Scope(devices=(self.device_id,), profile=profile or self.profile), artifact=artifact,
                          deltas=deltas, probe=Probe(inputs_sha256=hashlib.sha256(probe_bytes).hexdigest(),
                                                     atol=atol, rtol=rtol, min_cosine=min_cosine),
                          provenance=Provenance(source_sha256="0" * 64, calibration_sha256="0" * 64,
                                                converter_version="test"),
                          encrypted_for=key_id(encrypt_to) if encrypt_to is not None else None)
        self.version += 1
        signer = self.online_signer if tamper != "untrusted_key" else generate_signer()
        md = build_update(spec, [signer], version=self.version, expires=datetime.now(UTC) + expires_in)
        if tamper == "flip":  # one byte of the signed part changed after signing
            md = md.replace(release.sha256.encode(), (("0" if release.sha256[0] != "0" else "1")
                                                      + release.sha256[1:]).encode())
        if tamper == "truncate":
            md = md[: len(md) // 2]
        if tamper == "probe":
            probe_bytes = probe_bytes[:-1] + bytes([probe_bytes[-1] ^ 1])
        offer = messages.UpdateOffer(job=job, metadata=md, url=url, probe=probe_bytes,
                                     base_sha256=base.sha256 if base else None)
        if send:
            self.client.publish(topics.topic(self.device_id, "cmd"), offer.to_bytes(), qos=1)
        return offer

    def rollback(self, job: str, reason: str = "operator") -> None:
        msg = messages.RollbackOrder(job=job, reason=reason)
        self.client.publish(topics.topic(self.device_id, "cmd"), msg.to_bytes(), qos=1)


class RangeFileServer:
    """An HTTP server for the driver's files that honours Range requests (as a CDN or the fleet server does)."""

    def __init__(self, files: dict[str, bytes], *, cut_first: bool = False):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[str | None] = []
        self.cut_first = cut_first  # the first response stops halfway (a dropped connection)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                data = files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                rng = self.headers.get("Range")
                outer.requests.append(rng)
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                part = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if outer.cut_first:
                    outer.cut_first = False
                    self.wfile.write(part[: len(part) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(part)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def agent_config(path: Path, *, device_id: str, broker_url: str, root: bytes, state_dir: Path, port: int,
                 **extra) -> Path:
    (path.parent / f"{device_id}-root.json").write_bytes(root)
    lines = {"device_id": device_id, "profile": extra.pop("profile", "rpi5"), "broker_url": broker_url,
             "trust_root": str(path.parent / f"{device_id}-root.json"), "state_dir": str(state_dir),
             "api_port": port, "telemetry_interval_s": extra.pop("telemetry_interval_s", 1.0),
             "chunk_timeout_s": extra.pop("chunk_timeout_s", 1.0), **extra}
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in lines.items()))
    return path


class AgentProcess:
    """``fleet-agent run`` as a real subprocess."""

    def __init__(self, config: Path, port: int, env: dict | None = None, log: Path | None = None,
                 driver: FleetDriver | None = None, socket: Path | None = None):
        self.config, self.port, self.env = config, port, env or {}
        # what runs, before ``--config``: the daemon, or a test entry point such as tests.agent.paused_agent
        self.entry: list[str] = ["-m", "agent.cli", "run"]
        self.socket = socket  # the local API listens here instead of on the port
        self.driver = driver  # when given, start() waits until the device says it is online
        self.log = log or config.with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = False, timeout: float = 30.0) -> AgentProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        seen = len(self.driver.online) if self.driver else 0
        self._log_file = open(self.log, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([sys.executable, *self.entry, "--config", str(self.config)],
                                     stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(Path(__file__).resolve().parent.parent))
        if self.socket is not None:
            wait_path(self.socket, timeout)
        else:
            wait_port(self.port, timeout)
        if self.driver is not None:
            self.driver.wait_online(after=seen)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("the agent never became ready")

    def model(self) -> dict:
        if self.socket is not None:
            from agent.cli import _UnixConnection

            conn = _UnixConnection(str(self.socket))
            conn.request("GET", "/v1/model")
            body = conn.getresponse().read()
            conn.close()
            return json.loads(body)
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/model", timeout=5) as r:
            return json.loads(r.read())

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")
