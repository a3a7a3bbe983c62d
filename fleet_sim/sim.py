"""Many lightweight simulated devices in one process that speak the real protocol, for benchmarks and scale tests.

Each device is a real paho MQTT 5 client with its own client id (and credentials when given): it subscribes to its
``cmd`` and ``dl/+`` topics, reports online and its state (the artifact it runs), verifies every offer with
``fleet_protocol``'s ``UpdateVerifier`` against the pinned root (signature, device, profile, version, expiry), fetches
the delta for the artifact it runs (or the full file) in chunks over MQTT, checks every chunk and the whole file
against the signed hashes, rebuilds the target, reports ``committed`` and its new state, and follows rollback
orders. Its state reports name the version it runs and its slot, as an agent's do; it sends telemetry batches on
demand (requests, a latency histogram labelled with that version, and CPU, RSS and temperature figures drawn from
``SimResources``: deterministic per device id, bounded, so a console shows what a real fleet would).
What it leaves out is the model itself: no runtime, no probe run (the probe's signed hash is checked), no slots on
disk. Failures on command: ``fail_probe`` (reports ``probe_failed``), ``slow`` (its latency is multiplied, as a
slower model would make it), ``SimFleet.drop`` (the connection is cut without a DISCONNECT: the broker publishes
the device's will, and ``SimFleet.reconnect`` brings it back on the same persistent session).

Chunks come as raw-bytes frames: every chunk request carries the MQTT 5 user property that asks for them
(``messages.CHUNK_ENCODINGS_PROPERTY``), and what arrives is parsed per topic kind with ``messages.parse_for``, which
also accepts the base64 JSON a server that does not know the property still sends.

Paho's own network loop (one thread per client, ``select()``) stops near 339 clients per process here; this drives
all clients from one ``epoll`` loop through ``loop_read`` / ``loop_write`` / ``loop_misc``. Applying the same
delta to the same base gives the same bytes, so the rebuilt target is computed once per (base, patch) pair and
shared; every device still receives and verifies its own patch bytes.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import random
import resource
import select
import socket
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_protocol import delta, messages, topics
from fleet_protocol.errors import MalformedError, ProtocolError
from fleet_protocol.messages import LATENCY_EDGES_MS
from fleet_protocol.metadata import UpdateVerifier
from fleet_protocol.vocabulary import Reason, UpdateResult, UpdateState

REQUEST_TIMEOUT_S = 3.0
CPU_PERCENT_MAX = 100.0  # one core's worth: what the agent's process-time measure gives on a busy single thread
RSS_MB_RANGE = (16.0, 1024.0)
TEMPERATURE_C_RANGE = (25.0, 90.0)
RECEIVED_KINDS = ("cmd", "dl")  # what a device subscribes to (topics.device_subscriptions)
_rebuilt: dict[tuple[str, str], str] = {}  # (base, patch) → the rebuilt target's sha256


def chunk_request_properties() -> Properties:
    """The PUBLISH properties of a chunk request that asks the server for raw-bytes frames instead of base64 JSON."""
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [(messages.CHUNK_ENCODINGS_PROPERTY, messages.BINARY_CHUNKS)]
    return props


ASK_BINARY_CHUNKS = chunk_request_properties()  # shared by every request: paho only reads it when packing


def parse_received(device_id: str, topic: str, payload: bytes):
    """What arrived on one of ``device_id``'s own topics → the message its kind carries (an offer, a rollback order,
    a ping, a chunk as a binary frame or JSON). ProtocolError for anything else: a foreign or unknown topic, a kind a
    device never receives, a message of the wrong type for its topic, bytes that do not parse."""
    kind = topics.parse_own(topic, device_id).kind
    if kind not in RECEIVED_KINDS:
        raise MalformedError(f"a device receives nothing on a {kind!r} topic")
    return messages.parse_for(kind, payload)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class SimResources:
    """A device's CPU, RSS and temperature figures for each telemetry window. Each device has its own baseline
    (seeded by its id, so a re-run reports the same) and a little noise per window; CPU follows the load, RSS grows
    a little with a newer model, temperature follows CPU. Its own random stream: the latency draws (and with them
    every benchmark built on fleet-sim) stay what they were."""

    def __init__(self, device_id: str):
        self.rng = random.Random(f"{device_id}/resources")
        self.cpu_base = self.rng.uniform(8.0, 30.0)  # % at 100 requests a window
        self.rss_base = self.rng.uniform(70.0, 160.0)
        self.temperature_base = self.rng.uniform(40.0, 56.0)

    def window(self, requests: int, window_s: float, slow: float, updates: int) -> tuple[float, float, float]:
        """(cpu_percent, rss_mb, temperature_c) for one window, each clamped to its plausible range."""
        load = min(requests / max(window_s, 1e-3) / 100.0, 10.0)  # requests per second over a nominal 100
        cpu = _clamp(self.cpu_base * load * slow + self.rng.gauss(0, 1.5), 0.5, CPU_PERCENT_MAX)
        rss = _clamp(self.rss_base + 6.0 * min(updates, 10) + self.rng.gauss(0, 0.8), *RSS_MB_RANGE)
        temperature = _clamp(self.temperature_base + 0.15 * cpu + self.rng.gauss(0, 0.4), *TEMPERATURE_C_RANGE)
        return round(cpu, 1), round(rss, 1), round(temperature, 1)


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


@dataclass
class _Download:
    job: str
    path: str
    sha256: str
    length: int
    chunk_size: int
    chunk_sha256: tuple[str, ...]
    target_sha256: str
    base_sha256: str | None  # a delta's base, or None for the full file
    label: str
    parts: dict[int, bytes] = field(default_factory=dict)
    asked_at: float = 0.0
    started: float = field(default_factory=time.monotonic)


class SimDevice:
    def __init__(self, fleet: SimFleet, device_id: str, *, profile: str, active_sha256: str | None,
                 password: str | None = None, fail_probe: bool = False, slow: float = 1.0,
                 base_latency_ms: float = 2.0, active_label: str | None = None):
        self.fleet, self.id, self.profile = fleet, device_id, profile
        self.active = active_sha256
        self.previous: str | None = None  # what a rollback order goes back to
        self.label = active_label  # "model version", as agents label telemetry
        self.previous_label: str | None = None
        self.slot: str | None = "a" if active_sha256 else None  # which of an agent's two slots runs the model
        self.fail_probe = fail_probe
        self.slow, self.base_latency_ms = slow, base_latency_ms
        self.slow_after_update = False  # fleet-sim's "a model that regressed": slow once an update is installed
        self.rng = random.Random(device_id)
        self.resources = SimResources(device_id)
        self.verifier = UpdateVerifier(fleet.root, device_id=device_id, profile=profile)
        self.download: _Download | None = None
        self.installed: list[str] = []  # jobs committed
        self.update_seconds: list[float] = []
        self.seq = 0
        self.connected = False
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        if password is not None:
            self.client.username_pw_set(device_id, password)
        if fleet.tls is not None:
            self.client.tls_set_context(fleet.tls)
        will = messages.Online(online=False).to_bytes()
        self.client.will_set(topics.topic(device_id, "online"), will, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    # ------------------------------------------------------------------ MQTT

    def connect(self, host: str, port: int) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(host, port, keepalive=60, clean_start=False, properties=props)

    def publish(self, kind: str, msg) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topics.topic(self.id, kind), msg.to_bytes(), qos=1,
                                   retain=kind in ("online", "state"))

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.fleet.counts["connect_refused"] += 1
            return
        for t in topics.device_subscriptions(self.id):
            client.subscribe(t, qos=1)
        self.connected = True
        self.publish("online", messages.Online(online=True, ts=time.time()))
        self.report_state()

    def report_state(self) -> None:
        """The agent's state report: the active slot's "model version" label, its sha256 and slot, and the same again
        as its one named model in ``models`` (as an agent with several models lists each), with its update in
        progress."""
        self.publish("state", messages.DeviceState(active_version=self.label, active_sha256=self.active,
                                                   active_slot=self.slot,  # type: ignore[arg-type]
                                                   root_version=self.verifier.root_version,
                                                   update_version=self.verifier.update_version, ts=time.time(),
                                                   models=self.models()))

    def models(self) -> tuple[messages.ModelState, ...]:
        """The one named model, once the device runs a labelled one (the name is the label's first word)."""
        if not self.label:
            return ()
        dl = self.download
        return (messages.ModelState(name=self.label.split(" ", 1)[0], active_version=self.label,
                                    active_sha256=self.active, active_slot=self.slot,  # type: ignore[arg-type]
                                    update_state=UpdateState.DOWNLOADING if dl else UpdateState.IDLE,
                                    job=dl.job if dl else None),)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            m = parse_received(self.id, msg.topic, msg.payload)
        except (ProtocolError, ValueError):  # ValueError: paho decoding a topic that is not UTF-8
            self.fleet.counts["invalid"] += 1
            return
        if isinstance(m, messages.UpdateOffer):
            self._offer(m)
        elif isinstance(m, messages.ChunkData):
            # what the link carried for the download: payload, topic and the PUBLISH packet's framing (~10 bytes)
            self.fleet.counts["dl_wire_bytes"] += len(msg.payload) + len(msg.topic) + 10
            self._chunk(m)
        elif isinstance(m, messages.RollbackOrder):
            self._rollback(m)

    # ------------------------------------------------------------------ updates

    def _event(self, job: str, state: UpdateState, result: UpdateResult, reason: Reason = Reason.OK,
               detail: str = "") -> None:
        progress = 0.0 if result is UpdateResult.PENDING else 1.0
        self.publish("evt", messages.UpdateEvent(job=job, state=state, result=result, reason=reason, detail=detail,
                                                 progress=progress, ts=time.time()))

    def _failed(self, job: str, reason: Reason, detail: str) -> None:
        self._event(job, UpdateState.FAILED, UpdateResult.FAILED, reason, detail)

    def _offer(self, offer: messages.UpdateOffer) -> None:
        if self.download is not None:
            if self.download.job != offer.job:
                self._event(offer.job, UpdateState.REJECTED, UpdateResult.FAILED, Reason.INTERNAL, "busy")
            return
        if offer.job in self.installed:
            return  # a redelivery of what is done
        try:
            verified = self.verifier.verify_update(offer.metadata)
        except ProtocolError as e:
            self.fleet.counts["offer_refused"] += 1
            self._failed(offer.job, Reason.BAD_SIGNATURE, str(e)[:200])
            return
        spec = verified.spec
        if offer.probe is None or hashlib.sha256(offer.probe).hexdigest() != spec.probe.inputs_sha256:
            self._failed(offer.job, Reason.MALFORMED, "probe data does not match")
            return
        d = verified.delta_from(self.active) if self.active else None
        info = d if d is not None else spec.artifact
        manifest = info.chunks
        if manifest is None:
            self._failed(offer.job, Reason.MALFORMED, "no chunk manifest")
            return
        self.download = _Download(job=offer.job, path=info.path, sha256=info.sha256, length=info.length,
                                  chunk_size=manifest.chunk_size, chunk_sha256=manifest.chunk_sha256,
                                  target_sha256=spec.artifact.sha256, base_sha256=self.active if d else None,
                                  label=f"{spec.artifact.model} {spec.artifact.model_version}")
        self.fleet.counts["delta" if d else "full"] += 1
        self._event(offer.job, UpdateState.DOWNLOADING, UpdateResult.PENDING)
        self._ask()

    def _ask(self) -> None:
        dl = self.download
        if dl is None:
            return
        missing = [i for i in range(len(dl.chunk_sha256)) if i not in dl.parts]
        for k in range(0, len(missing), 4096):
            req = messages.ChunkRequest(job=dl.job, path=dl.path, indices=tuple(missing[k:k + 4096]))
            self.client.publish(topics.topic(self.id, "dl-req", dl.job), req.to_bytes(), qos=1,
                                properties=ASK_BINARY_CHUNKS)
        dl.asked_at = time.monotonic()

    def _chunk(self, m: messages.ChunkData) -> None:
        dl = self.download
        if dl is None or m.job != dl.job or m.index >= len(dl.chunk_sha256) or m.index in dl.parts:
            return
        if hashlib.sha256(m.data).hexdigest() != dl.chunk_sha256[m.index]:
            self.fleet.counts["bad_chunk"] += 1
            return
        dl.parts[m.index] = m.data
        # progress resets the stall timer, as the agent's downloader does: re-asking while chunks still flow (a wave
        # queued at the server) fetched 10 % of a rollout's bytes twice
        dl.asked_at = time.monotonic()
        if len(dl.parts) == len(dl.chunk_sha256):
            self._finish(dl)

    def _finish(self, dl: _Download) -> None:
        self.download = None
        self.fleet.counts["dl_file_bytes"] += dl.length
        payload = b"".join(dl.parts[i] for i in range(len(dl.chunk_sha256)))
        if len(payload) != dl.length or hashlib.sha256(payload).hexdigest() != dl.sha256:
            self._failed(dl.job, Reason.HASH_MISMATCH, "download does not match")
            return
        if dl.base_sha256 is not None:
            key = (dl.base_sha256, dl.sha256)
            if key not in _rebuilt:
                base = self.fleet.blobs.get(dl.base_sha256)
                if base is None:
                    self._failed(dl.job, Reason.DELTA_FAILED, "base not held")
                    return
                _rebuilt[key] = hashlib.sha256(delta.apply(base, payload)).hexdigest()  # apply checks it too
            if _rebuilt[key] != dl.target_sha256:
                self._failed(dl.job, Reason.DELTA_FAILED, "rebuilt target mismatch")
                return
        if self.fail_probe:
            self._failed(dl.job, Reason.PROBE_FAILED, "simulated probe failure")
            return
        self.previous, self.active = self.active, dl.target_sha256
        self.previous_label, self.label = self.label, dl.label
        self.slot = "b" if self.slot == "a" else "a"  # installed into the inactive slot, which becomes active
        self.installed.append(dl.job)
        self.update_seconds.append(time.monotonic() - dl.started)
        self._event(dl.job, UpdateState.COMMITTED, UpdateResult.OK)
        self.report_state()

    def _rollback(self, order: messages.RollbackOrder) -> None:
        if self.previous is None:
            return
        self.active, self.previous = self.previous, None
        self.label, self.previous_label = self.previous_label, None
        self.slot = "b" if self.slot == "a" else "a"  # back to the slot that ran before
        self._event(order.job, UpdateState.ROLLED_BACK, UpdateResult.OK, Reason.ROLLED_BACK, order.reason)
        self.report_state()

    def tick(self, now: float) -> None:
        if self.download is not None and now - self.download.asked_at > REQUEST_TIMEOUT_S:
            self.fleet.counts["re_requests"] += 1
            self._ask()

    def telemetry(self, requests: int = 100, model_version: str | None = None, window_s: float = 1.0,
                  errors: int = 0) -> mqtt.MQTTMessageInfo:
        """One window: ``requests`` latencies around ``base_latency_ms`` (log-normal, × ``slow``), binned on the
        agent's own edges, labelled with the version this device runs, with its CPU, RSS and temperature."""
        edges = LATENCY_EDGES_MS
        counts = [0] * (len(edges) - 1)
        for _ in range(requests):
            ms = self.base_latency_ms * self.slow * self.rng.lognormvariate(0, 0.25)
            counts[min(max(bisect.bisect_right(edges, ms) - 1, 0), len(counts) - 1)] += 1
        cpu, rss, temperature = self.resources.window(requests, window_s, self.slow, len(self.installed))
        now = time.time()
        batch = messages.TelemetryBatch(seq=self.seq, window_start=now - window_s, window_end=now,
                                        model_version=model_version or self.label, slot=self.slot,  # type: ignore[arg-type]
                                        requests=requests, errors={"runtime": errors} if errors else {},
                                        latency_ms=messages.Histogram(edges=edges, counts=tuple(counts)),
                                        cpu_percent=cpu, rss_mb=rss, temperature_c=temperature)
        info = self.publish("tm", batch)
        self.seq += 1
        return info


class SimFleet:
    """The devices of one process and the epoll loop that drives them."""

    def __init__(self, broker_url: str, root: bytes, *, blobs: dict[str, bytes] | None = None,
                 ca_file: str | None = None):
        from collections import Counter

        u = urlparse(broker_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or (8883 if u.scheme == "mqtts" else 1883)
        self.tls: ssl.SSLContext | None = None
        if u.scheme == "mqtts":  # one context for every device: the broker's certificate is verified
            self.tls = ssl.create_default_context(cafile=ca_file)
        self.root = root
        self.blobs = blobs or {}  # sha256 → bytes the devices already hold (delta bases)
        self.devices: list[SimDevice] = []
        self.counts: Counter = Counter()
        self._epoll = select.epoll()
        self._by_fd: dict[int, SimDevice] = {}
        raise_fd_limit()

    def add(self, device_id: str, **kw) -> SimDevice:
        d = SimDevice(self, device_id, **kw)
        self.devices.append(d)
        return d

    def connect_all(self, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        for d in self.devices:
            d.connect(self.host, self.port)
            self._watch(d)
        self.run(lambda: all(d.connected for d in self.devices), timeout)
        return time.monotonic() - t0

    def _watch(self, d: SimDevice) -> None:
        sock = d.client.socket()
        if sock is None:  # paho's connect() raises rather than leave none; a device without one is not watched
            return
        self._by_fd[sock.fileno()] = d
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        d.client.loop_write()

    def drop(self, d: SimDevice) -> None:
        """Cut the device's connection without a DISCONNECT, as a lost network does: the broker publishes its
        will (``online: false``) once it notices; the session and its queued messages stay."""
        sock = d.client.socket()
        if sock is None:
            return
        with contextlib.suppress(OSError, KeyError, ValueError):
            self._epoll.unregister(sock.fileno())
            del self._by_fd[sock.fileno()]
        with contextlib.suppress(OSError):
            if isinstance(sock, socket.socket):  # TCP or TLS (ssl.SSLSocket is one), what paho opens
                sock.shutdown(socket.SHUT_RDWR)
        d.client.loop_read()  # paho sees the closed socket and marks the connection lost
        d.connected = False
        self.counts["dropped"] += 1

    def reconnect(self, d: SimDevice) -> None:
        d.client.reconnect()
        self._watch(d)
        self.counts["reconnected"] += 1

    def run(self, until, timeout: float, every=None) -> bool:
        """Drive every client until ``until()`` is true or ``timeout`` passes; True if it became true. ``every``
        (if given) is called with the monotonic time on each turn of the loop (~50 per second)."""
        deadline = time.monotonic() + timeout
        last_misc = 0.0
        while time.monotonic() < deadline:
            if every is not None:
                every(time.monotonic())
            for fd, _ in self._epoll.poll(0.02):
                d = self._by_fd.get(fd)
                if d is not None:
                    d.client.loop_read(100)
            now = time.monotonic()
            for d in self.devices:
                if d.client.want_write():
                    d.client.loop_write()
            if now - last_misc > 0.5:
                last_misc = now
                for d in self.devices:
                    d.client.loop_misc()
                    d.tick(now)
            if until():
                return True
        return False

    def close(self) -> None:
        for d in self.devices:
            with contextlib.suppress(Exception):  # best effort on the way out
                d.client.disconnect()
                d.client.loop_write()
        self._epoll.close()
