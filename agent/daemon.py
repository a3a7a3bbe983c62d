"""Wiring: settings → store, the device's models (each with slots, updater and telemetry), runtimes, local API,
outbox, MQTT link, telemetry timer.

Start order serves first (the active model answers locally before the network is up); stop order is the reverse:
stop accepting requests and let in-flight ones finish, close the telemetry window into the outbox, give the broker
a moment to take what is queued, then persist and disconnect (the retained ``online=false`` goes out last).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from agent.api import LocalApi, Metrics, Serving
from agent.batching import MicroBatcher
from agent.download import WindowConfig
from agent.link import BrokerConfig, Link
from agent.metering import Metering
from agent.models import ModelSet
from agent.offers import Offers, Scope, version_key
from agent.outbox import Outbox
from agent.remote_config import RemoteConfig
from agent.report import Reporter
from agent.settings import AgentSettings
from agent.slots import SlotStore
from agent.store import LEGACY_VERSION, Store
from agent.telemetry import Telemetry
from agent.updater import StepHook, Updater, UpdaterConfig, no_hook
from fleet_protocol import config, messages, topics
from fleet_protocol.errors import MalformedError, ProtocolError
from fleet_protocol.metadata import VerifiedUpdate
from fleet_runtime import runtimes

log = logging.getLogger(__name__)

# The topic kinds the agent subscribes to (``topics.device_subscriptions``): a message on any other is refused.
INBOUND_KINDS = frozenset({"cmd", "dl", "cfg"})


class Agent:
    """``on_step`` reaches the updater (``Updater``): nothing in production; tests pause the agent with it."""

    def __init__(self, settings: AgentSettings, *, on_step: StepHook = no_hook):
        self.s = settings
        state = Path(settings.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        os.chmod(state, 0o700)
        self.store = Store(state / "agent.db")
        self.metrics = Metrics()
        self.bad_messages = 0
        self._idle_telemetry = Telemetry()  # resources while no model is installed
        self._stop = threading.Event()
        self._link: Link | None = None
        # what remote configuration may change while running (the config file's values until it does)
        self.threads, self.telemetry_interval_s = settings.threads, settings.telemetry_interval_s
        self.outbox = Outbox(self.store, self._send, max_rows=settings.outbox_max_messages)
        # shared by the models: one trust state, one link (and its daily ledger), one reporter
        self.offers = Offers(Scope(settings.device_id, settings.profile, settings.cohort),
                             root=self.store.get("root") or Path(settings.trust_root).read_bytes(),
                             # the version a single-model agent had admitted: a floor for every model's offers
                             seen=int(self.store.get(LEGACY_VERSION) or b"0"))
        (state / "work").mkdir(exist_ok=True)
        self.meter = Metering(settings.link_policy(), state / "work" / "link-ledger.json")
        self.reporter = Reporter(settings.device_id, outbox=self.outbox, send=self._send, offers=self.offers,
                                 models=lambda: self.models.states())
        self._updater_config = UpdaterConfig(
            device_id=settings.device_id, work_dir=state / "work", device_key=settings.device_key(),
            window=WindowConfig(window=settings.chunk_window, timeout_s=settings.chunk_timeout_s))
        self._on_step = on_step
        self.models = ModelSet(state, store=self.store, offers=self.offers, make_updater=self._make_updater,
                               budget_bytes=settings.memory_budget_bytes())
        self.models.reporter = self.reporter
        batcher = MicroBatcher(max_batch=settings.batch_max, max_wait_s=settings.batch_wait_ms / 1e3) \
            if settings.batch_max > 1 else None
        self.api = LocalApi(models=self.models.endpoints, max_request_bytes=settings.max_request_bytes,
                            status=self._status, metrics=self.metrics, batcher=batcher,
                            read_timeout_s=settings.api_read_timeout_s, max_connections=settings.api_max_connections)
        self.api_address = ""
        self.remote_config = RemoteConfig(
            self.store, verifier=lambda: self.offers.verifier, report=self._config_report, appliers={
                "telemetry_interval_s": lambda v: setattr(self, "telemetry_interval_s", float(v)),
                "threads": lambda v: setattr(self, "threads", int(v)),  # the next model load
                "log_level": lambda v: logging.getLogger().setLevel(str(v)),
                "max_download_bps": lambda v: self.meter.set_policy(max_download_bps=v),
                "daily_download_bytes": lambda v: self.meter.set_policy(daily_download_bytes=v),
                "chunk_window": self._set_chunk_window},
            baseline={**{name: getattr(settings, name) for name in config.SETTINGS if hasattr(settings, name)},
                      "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel())})
        self.remote_config.restore()

    def _make_updater(self, name: str, slots: SlotStore, serving: Serving, telemetry: Telemetry,
                      fits: Callable[[VerifiedUpdate], None]) -> Updater:
        self.offers.know(name, int(self.store.get(version_key(name)) or b"0"))
        prefer = None if self.s.tflite_runtime == "auto" else self.s.tflite_runtime
        return Updater(self._updater_config, model=name, store=self.store, slots=slots, serving=serving,
                       telemetry=telemetry, offers=self.offers, reporter=self.reporter, meter=self.meter,
                       send=self._send, fits=fits, on_step=self._on_step,
                       loader=lambda p: runtimes.load(p, threads=self.threads, providers=self.s.execution_providers,
                                                      tflite=prefer))

    def _set_chunk_window(self, value: object) -> None:
        self._updater_config.window = replace(self._updater_config.window, window=int(value))  # type: ignore[call-overload]
        for lane in self.models.lanes():
            lane.updater.set_chunk_window(int(value))  # type: ignore[call-overload]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.models.start()  # migrates a single-model state directory; loads each model, resumes its update
        self.api_address = self.api.start(host=self.s.api_host, port=self.s.api_port,
                                          unix_socket=self.s.api_socket)
        log.info("local API on %s", self.api_address)
        self.outbox.start()
        self._link = Link(self.s.device_id, BrokerConfig(
            url=self.s.broker_url, username=self.s.username or self.s.device_id, password=self.s.broker_password(),
            ca_file=str(self.s.tls_ca) if self.s.tls_ca else None,
            cert_file=str(self.s.tls_cert) if self.s.tls_cert else None,
            key_file=str(self.s.tls_key) if self.s.tls_key else None),
            on_message=self._on_message, on_connected=self._on_connected, on_published=self.outbox.acknowledged,
            on_disconnected=self._on_disconnected)
        self._link.start()
        threading.Thread(target=self._telemetry_loop, name="telemetry", daemon=True).start()
        sd_notify("READY=1")

    def run_until_signalled(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self._stop.wait()
        sd_notify("STOPPING=1")
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self.api.stop(drain_s=10.0)  # finish in-flight requests
        self._emit_telemetry()
        if self._link is not None and self._link.connected:
            self.outbox.flush(timeout=3.0)
        self.outbox.stop()
        self.models.stop()
        if self._link is not None:
            self._link.stop()
        self.store.close()

    # ------------------------------------------------------------------ MQTT

    def _send(self, topic: str, payload: bytes, retain: bool = False, *,
              user_properties: tuple[tuple[str, str], ...] = ()) -> int | None:
        if self._link is None:
            return None
        return self._link.publish(topic, payload, qos=1, retain=retain, user_properties=user_properties)

    def _on_connected(self) -> None:
        self.outbox.connected()
        self.reporter.device_state()
        self.models.broadcast("connected")

    def _on_disconnected(self) -> None:
        self.outbox.connection_lost()
        self.models.broadcast("disconnected")

    def _on_message(self, topic: str, payload: bytes) -> None:
        """Link thread: validate and hand over; a bad message is counted and logged, never fatal."""
        try:
            t = topics.parse_own(topic, self.s.device_id)
            if t.kind not in INBOUND_KINDS:
                raise MalformedError(f"the agent takes no messages on {t.kind!r} topics")
            msg = messages.parse_for(t.kind, payload)  # a chunk may come as a binary frame or as JSON
        except ProtocolError as e:
            self.bad_messages += 1
            log.warning("refused a message on %s: %s", topic, e)
            return
        if isinstance(msg, messages.Ping):
            self.reporter.device_state()
        elif isinstance(msg, messages.ConfigOffer):
            self.remote_config.offer(msg)
        elif isinstance(msg, messages.UpdateOffer):
            self.models.offer(msg)
        elif isinstance(msg, messages.RollbackOrder):
            self.models.rollback(msg)
        elif isinstance(msg, messages.ChunkData):
            self.models.chunk(msg)

    # ------------------------------------------------------------------ telemetry

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.telemetry_interval_s):
            self._emit_telemetry()

    def _emit_telemetry(self) -> None:
        """One batch per model per window (its own ``seq`` and label), or one without a model while none is
        installed, so the server keeps seeing the device's resources."""
        sources = [(lane.telemetry, lane.serving.current) for lane in self.models.lanes() if lane.listed()] or \
            [(self._idle_telemetry, None)]
        seq = int(self.store.get("tm_seq") or b"0")
        dropped = self.store.take_dropped()
        self.store.put(tm_seq=str(seq + len(sources)).encode())
        for i, (telemetry, current) in enumerate(sources):
            batch = telemetry.harvest(seq=seq + i, model_version=current.info.version_label if current else None,
                                      slot=current.info.slot if current else None, dropped=dropped if i == 0 else 0)
            self.outbox.put(topics.topic(self.s.device_id, "tm"), batch.to_bytes())
        self.metrics.outbox.set(self.store.outbox_size())

    def _config_report(self, report: messages.ConfigReport) -> None:
        self.outbox.put(topics.topic(self.s.device_id, "evt"), report.to_bytes())

    # ------------------------------------------------------------------ local API helpers

    def _status(self) -> dict:
        return {"device_id": self.s.device_id, "profile": self.s.profile,
                "connected": bool(self._link and self._link.connected), "outbox": self.store.outbox_size(),
                "bad_messages": self.bad_messages,
                "config": {"version": self.remote_config.version, "applied": self.remote_config.applied}}


def sd_notify(state: str) -> None:
    """systemd's readiness protocol (Type=notify), when started by systemd; a no-op otherwise."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError:
        log.debug("sd_notify failed", exc_info=True)
