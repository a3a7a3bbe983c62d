"""The update driver: performs the state machine's actions (``agent.machine``), one job at a time, on one thread.

Everything arrives as an input on one queue — offers, rollback orders, chunks, (re)connects, ticks — and is handled
in order, so no two steps race. Each transition is journaled (``Store.save_journal``, durable) before its actions
run; an action's outcome comes back as the next event. Verification is ``fleet_protocol``'s; bad data is refused
and reported with a reason code, and the model being served is never touched until a verified, probed replacement
is switched in atomically.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import os
import queue
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent import probe as probing
from agent.api import Loaded, Serving
from agent.machine import Action, Event, Snapshot, State, step
from agent.outbox import Outbox
from agent.runtimes import Model, RuntimeLoadError, check_feeds
from agent.slots import SlotError, SlotInfo, SlotStore, sha256_file
from agent.store import Store
from agent.telemetry import Telemetry
from fleet_protocol import topics
from fleet_protocol.chunks import ChunkAssembler, ChunkManifest
from fleet_protocol.errors import (
    ChunkError,
    DecryptError,
    DeltaError,
    ExpiredError,
    MalformedError,
    MixAndMatchError,
    ProtocolError,
    RollbackError,
    SignatureError,
    TargetMismatchError,
    ThresholdError,
    UntrustedKeyError,
)
from fleet_protocol.messages import (
    ChunkData,
    ChunkRequest,
    DeviceState,
    Reason,
    RollbackOrder,
    UpdateEvent,
    UpdateOffer,
)
from fleet_protocol.metadata import UpdateVerifier, VerifiedUpdate

log = logging.getLogger(__name__)

REASONS: list[tuple[type[Exception], Reason]] = [
    (UntrustedKeyError, Reason.BAD_SIGNATURE), (SignatureError, Reason.BAD_SIGNATURE),
    (ThresholdError, Reason.BAD_SIGNATURE), (RollbackError, Reason.ROLLBACK_ATTACK), (ExpiredError, Reason.EXPIRED),
    (MixAndMatchError, Reason.WRONG_DEVICE), (TargetMismatchError, Reason.HASH_MISMATCH),
    (ChunkError, Reason.HASH_MISMATCH), (DeltaError, Reason.DELTA_FAILED), (DecryptError, Reason.DECRYPT_FAILED),
    (MalformedError, Reason.MALFORMED), (probing.ProbeDataError, Reason.MALFORMED),
    (RuntimeLoadError, Reason.LOAD_FAILED),
]


def reason_for(e: Exception) -> Reason:
    return next((r for cls, r in REASONS if isinstance(e, cls)), Reason.INTERNAL)


HTTP_ATTEMPTS = 5


class StepFailed(Exception):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class UpdaterConfig:
    device_id: str
    profile: str
    cohort: str | None
    work_dir: Path
    chunk_window: int = 64  # chunks asked for at once
    chunk_timeout_s: float = 5.0  # no progress for this long (while connected): ask again for what is missing
    max_stalls: int = 24  # then the download fails
    threads: int = 2
    providers: list[str] = field(default_factory=list)
    device_key: bytes | None = None  # X25519 private key for encrypted delivery
    pause_at: str | None = None  # test hook: sleep after journaling this state, before its actions
    pause_after: str | None = None  # test hook: sleep after this action, before its outcome is journaled


class Updater:
    def __init__(self, config: UpdaterConfig, *, store: Store, slots: SlotStore, serving: Serving,
                 telemetry: Telemetry, outbox: Outbox, send: Callable[[str, bytes, bool], int | None],
                 loader: Callable[[Path], Model], pinned_root: bytes):
        self.c = config
        self.store, self.slots, self.serving, self.telemetry, self.outbox = store, slots, serving, telemetry, outbox
        self._send, self._loader = send, loader
        root = store.get("root") or pinned_root
        version = int(store.get("update_version") or b"0")
        self.verifier = UpdateVerifier(root, device_id=config.device_id, profile=config.profile,
                                       cohort=config.cohort, update_version=version)
        self.snap, self.job = store.load_journal()
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._assembler: ChunkAssembler | None = None
        self._staged: Loaded | None = None
        self._verified_job: tuple[str, VerifiedUpdate] | None = None
        self._last_progress = 0.0
        self._stalls = 0
        self._connected = False
        self.c.work_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ inputs (any thread)

    def submit(self, kind: str, payload: object = None) -> None:
        self._inbox.put((kind, payload))

    def start(self) -> None:
        self._serve_active()
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self._thread.start()
        self.submit("event", (Event.RESTART, {}))

    def stop(self, timeout: float = 10.0) -> None:
        self.submit("stop")
        if self._thread is not None:
            self._thread.join(timeout)

    def status(self) -> dict:
        return {"update": {"state": self.snap.state.value, "job": self.snap.job, "reason": self.snap.reason,
                           "detail": self.snap.detail}}

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get(timeout=1.0)
            except queue.Empty:
                kind, payload = "tick", None
            if kind == "stop":
                return
            try:
                self._handle(kind, payload)
            except Exception:  # a bug in one input must not stop the updater
                log.exception("updater failed on %s", kind)

    def _handle(self, kind: str, payload) -> None:
        if kind == "message":
            msg = payload
            if isinstance(msg, UpdateOffer):
                self._offer(msg)
            elif isinstance(msg, RollbackOrder):
                self._dispatch(Event.ROLLBACK_ORDER, job=msg.job, detail=msg.reason)
            elif isinstance(msg, ChunkData):
                self._chunk(msg)
        elif kind == "event":
            event, kw = payload
            self._dispatch(event, **kw)
        elif kind == "connected":
            self._connected = True
            self.publish_state()
            if self.snap.state is State.DOWNLOADING:
                self._request_missing()
        elif kind == "disconnected":
            self._connected = False
        elif kind == "tick" and self.snap.state is State.DOWNLOADING:
            self._check_stall()

    def _dispatch(self, event: Event, *, job: str | None = None, reason: str = "", detail: str = "",
                  job_data: dict | None = None, trust: dict[str, bytes] | None = None) -> None:
        s = step(self.snap, event, job=job, reason=reason, detail=detail)
        if s.ignored:
            log.debug("ignored %s in %s", event.value, self.snap.state.value)
            return
        if s.snapshot.state is State.IDLE:
            data: dict = {}
        elif event in (Event.OFFER, Event.ROLLBACK_ORDER) and self.snap.state is State.IDLE:
            data = job_data or self._rollback_job(s.snapshot)
        else:
            data = self.job
        self.store.save_journal(s.snapshot, data, **(trust or {}))  # persisted before any side effect
        self.snap, self.job = s.snapshot, data
        log.info("update %s: %s → %s %s", s.snapshot.job, event.value, s.snapshot.state.value,
                 [a.value for a in s.actions])
        self._hook(self.c.pause_at, s.snapshot.state.value)
        for action in s.actions:
            nxt = self._perform(action)
            self._hook(self.c.pause_after, action.value)
            if nxt is not None:
                self.submit("event", nxt)

    def _hook(self, wanted: str | None, here: str) -> None:
        if wanted and wanted == here and self.snap.job:
            log.warning("test hook: pausing at %s", here)
            time.sleep(3600)

    # ------------------------------------------------------------------ offers

    def _offer(self, offer: UpdateOffer) -> None:
        if self.snap.state is not State.IDLE:
            s = step(self.snap, Event.OFFER, job=offer.job)
            if s.actions == (Action.REJECT_BUSY,):
                self._event(offer.job, "rejected", "failed", Reason.INTERNAL,
                            f"busy with job {self.snap.job} ({self.snap.state.value})")
            return
        trust_before = (self.verifier.root_bytes, self.verifier.update_version)
        try:
            for root in offer.roots:
                if root != self.verifier.root_bytes:
                    self.verifier.update_root(root)
            verified = self.verifier.verify_update(offer.metadata)
            golden = self._check_probe(offer, verified)
            self._check_format(verified)
        except (ProtocolError, probing.ProbeDataError, StepFailed) as e:
            self._restore_verifier(*trust_before)
            reason = e.reason if isinstance(e, StepFailed) else reason_for(e)
            log.warning("offer %s refused: %s", offer.job, e)
            self._event(offer.job, "rejected", "failed", reason, str(e)[:900])
            return
        current = self.slots.pointer()
        job = {"job": offer.job, "metadata": _b64(offer.metadata), "probe": _b64(golden),
               "url": offer.url, "previous_slot": current["slot"], "received": time.time(), "timings": {}}
        trust = {"root": self.verifier.root_bytes, "update_version": str(self.verifier.update_version).encode()}
        self._dispatch(Event.OFFER, job=offer.job, job_data=job, trust=trust)

    def _restore_verifier(self, root: bytes, version: int) -> None:
        self.verifier = UpdateVerifier(root, device_id=self.c.device_id, profile=self.c.profile,
                                       cohort=self.c.cohort, update_version=version)

    @staticmethod
    def _check_probe(offer: UpdateOffer, verified: VerifiedUpdate) -> bytes:
        if offer.probe is None:
            raise StepFailed(Reason.MALFORMED, "the offer carries no probe data")
        if hashlib.sha256(offer.probe).hexdigest() != verified.spec.probe.inputs_sha256:
            raise StepFailed(Reason.HASH_MISMATCH, "probe data does not match its signed sha256")
        probing.read_golden(offer.probe)
        return offer.probe

    @staticmethod
    def _check_format(verified: VerifiedUpdate) -> None:
        if verified.spec.artifact.format not in ("onnx-int8", "tflite-int8"):
            raise StepFailed(Reason.MALFORMED, f"artifact format {verified.spec.artifact.format} is not served "
                                               "by the agent")

    def _rollback_job(self, snap: Snapshot) -> dict:
        """A rollback order while idle: go back to the slot that was active before the current one."""
        return {"job": snap.job, "previous_slot": self.slots.pointer()["previous"], "timings": {}}

    def _verified(self) -> VerifiedUpdate:
        """The journaled offer's metadata, verified again (signature and scope) without advancing the version: once
        per job in this process (fetch, stage and probe all need it; after a restart it is checked afresh)."""
        if self._verified_job is None or self._verified_job[0] != self.snap.job:
            v = UpdateVerifier(self.verifier.root_bytes, device_id=self.c.device_id, profile=self.c.profile,
                               cohort=self.c.cohort, update_version=0)
            self._verified_job = (str(self.snap.job), v.verify_update(base64.b64decode(self.job["metadata"])))
        return self._verified_job[1]

    # ------------------------------------------------------------------ actions

    def _perform(self, action: Action) -> tuple[Event, dict] | None:
        try:
            if action is Action.FETCH:
                return self._fetch()
            if action is Action.STAGE:
                return self._timed("stage_ms", self._stage)
            if action is Action.PROBE:
                return self._timed("probe_ms", self._probe)
            if action is Action.SWITCH:
                return self._timed("switch_ms", self._switch)
            if action is Action.RESTORE_PREVIOUS:
                return self._restore()
        except StepFailed as e:
            return Event.FAILED, {"reason": e.reason.value, "detail": str(e)[:900]}
        except (ProtocolError, probing.ProbeDataError, RuntimeLoadError, SlotError, OSError) as e:
            return Event.FAILED, {"reason": reason_for(e).value, "detail": f"{type(e).__name__}: {e}"[:900]}
        if action is Action.REPORT_PROGRESS:
            self._event(self.snap.job, self.snap.state.value, "pending", Reason.OK, "")
        elif action is Action.REPORT_OK:
            self._event(self.snap.job, "committed", "ok", Reason.OK, f"active slot {self.slots.pointer()['slot']}")
            self.publish_state()
            return Event.REPORTED, {}
        elif action is Action.REPORT_FAILED:
            ordered = self.snap.ordered_rollback
            self._event(self.snap.job, "rolled_back" if ordered else "failed", "ok" if ordered else "failed",
                        Reason(self.snap.reason) if self.snap.reason in Reason.__members__.values() else
                        Reason.INTERNAL, self.snap.detail)
            self.publish_state()
            return Event.REPORTED, {}
        elif action is Action.CLEANUP:
            self._cleanup()
        return None

    def _timed(self, key: str, fn: Callable[[], tuple[Event, dict]]) -> tuple[Event, dict]:
        t0 = time.perf_counter()
        out = fn()
        self.job.setdefault("timings", {})[key] = (time.perf_counter() - t0) * 1e3
        return out

    def _job_dir(self) -> Path:
        d = self.c.work_dir / str(self.snap.job)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _payload_choice(self, verified: VerifiedUpdate) -> tuple[str, ChunkManifest | None, str, int, str]:
        """(kind, chunk manifest, sha256, length, path) of what to download: a delta from the active artifact when
        the metadata offers one, else the full artifact."""
        active = self.slots.active()
        d = verified.delta_from(active.sha256) if active is not None and not verified.spec.encrypted_for else None
        if d is not None:
            return "delta", d.chunks, d.sha256, d.length, d.path
        a = verified.spec.artifact
        return "full", a.chunks, a.sha256, a.length, a.path

    def _fetch(self) -> tuple[Event, dict] | None:
        verified = self._verified()
        kind, manifest, sha, length, path = self._payload_choice(verified)
        self.job["payload"] = {"kind": kind, "sha256": sha, "length": length, "path": path}
        self.job.setdefault("timings", {}).setdefault("download_start", time.time())
        target = self._job_dir() / "payload"
        if self.job.get("url"):  # the offer's base URL serves every signed file at URL/<path>
            self._http_download(f"{self.job['url'].rstrip('/')}/{path}", target, length)
            return self._downloaded(target, sha, length)
        if manifest is None:
            raise StepFailed(Reason.MALFORMED, "no URL and no chunk list for the payload")
        self._assembler = ChunkAssembler(manifest, target)
        if self._assembler.complete:
            return self._downloaded(target, sha, length)
        self._last_progress, self._stalls = time.monotonic(), 0
        self._request_missing()
        return None

    def _http_download(self, url: str, target: Path, length: int) -> None:
        """Resumable HTTP(S) download: each attempt asks only for the bytes not yet on disk (Range); the hash is
        checked afterwards."""
        for attempt in range(HTTP_ATTEMPTS):
            have = target.stat().st_size if target.exists() else 0
            if have > length:
                target.unlink()
                have = 0
            if have == length:
                return
            req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp, open(target, "ab") as f:
                    if have and resp.status != 206:  # the server ignored Range: start over
                        f.truncate(0)
                    shutil.copyfileobj(resp, f, 1 << 20)
                    f.flush()
                    os.fsync(f.fileno())
            except (OSError, http.client.HTTPException) as e:
                log.warning("HTTP download attempt %d failed: %s", attempt + 1, e)
                time.sleep(min(5.0, 0.2 * 2 ** attempt))
        if not target.exists() or target.stat().st_size != length:
            raise StepFailed(Reason.DOWNLOAD_FAILED, f"HTTP download of {url} incomplete after {HTTP_ATTEMPTS} "
                                                     "attempts")

    def _downloaded(self, path: Path, sha: str, length: int) -> tuple[Event, dict]:
        if path.stat().st_size != length or sha256_file(path) != sha:
            path.unlink(missing_ok=True)  # never keep bytes that do not match
            raise StepFailed(Reason.HASH_MISMATCH, "downloaded payload does not match the signed hash")
        timings = self.job.setdefault("timings", {})
        timings["download_ms"] = (time.time() - timings.pop("download_start", time.time())) * 1e3
        return Event.DOWNLOADED, {}

    def _request_missing(self) -> None:
        if self._assembler is None:
            return
        missing = self._assembler.missing()[: self.c.chunk_window]
        if missing and self._connected:
            req = ChunkRequest(job=str(self.snap.job), path=self.job["payload"]["path"], indices=tuple(missing))
            self._send(topics.topic(self.c.device_id, "dl-req", str(self.snap.job)), req.to_bytes(), False)

    def _chunk(self, msg: ChunkData) -> None:
        if self.snap.state is not State.DOWNLOADING or msg.job != self.snap.job or self._assembler is None:
            return  # late or foreign chunk
        try:
            fresh = self._assembler.accept(msg.index, msg.data)
        except ChunkError as e:
            log.warning("chunk %s/%d refused: %s", msg.job, msg.index, e)  # a bad chunk is asked for again
            return
        if fresh:
            self._last_progress, self._stalls = time.monotonic(), 0
        if self._assembler.complete:
            p = self.job["payload"]
            try:
                self.submit("event", self._downloaded(self._assembler.path, p["sha256"], p["length"]))
            except StepFailed as e:
                self.submit("event", (Event.FAILED, {"reason": e.reason.value, "detail": str(e)}))
            self._assembler = None
        elif fresh and len(self._assembler.missing()) % self.c.chunk_window == 0:
            self._request_missing()  # the window was delivered: ask for the next one

    def _check_stall(self) -> None:
        if not self._connected or self._assembler is None:
            return
        if time.monotonic() - self._last_progress < self.c.chunk_timeout_s:
            return
        self._stalls += 1
        if self._stalls > self.c.max_stalls:
            self._assembler = None
            self.submit("event", (Event.FAILED, {"reason": Reason.DOWNLOAD_FAILED.value,
                                                 "detail": f"no chunk for {self._stalls} × "
                                                           f"{self.c.chunk_timeout_s:.0f} s while connected"}))
            return
        self._last_progress = time.monotonic()
        self._request_missing()

    def _stage(self) -> tuple[Event, dict]:
        verified = self._verified()
        spec = verified.spec
        p = self.job["payload"]
        payload_path = self._job_dir() / "payload"
        data = payload_path.read_bytes()
        if len(data) != p["length"] or hashlib.sha256(data).hexdigest() != p["sha256"]:
            raise StepFailed(Reason.HASH_MISMATCH, "the downloaded payload changed on disk")
        if spec.encrypted_for:
            if self.c.device_key is None:
                raise StepFailed(Reason.DECRYPT_FAILED, "the artifact is encrypted and this agent has no key")
            from fleet_protocol.crypto import decrypt  # imported when needed: the daemon's RSS counts on a device

            data = decrypt(self.c.device_key, data, aad=self.c.device_id.encode())
        if p["kind"] == "delta":
            previous = self.slots.verified(self.job.get("previous_slot"))
            if previous is None:
                raise StepFailed(Reason.DELTA_FAILED, "the delta's base (the active model) is gone")
            from fleet_protocol import delta  # bsdiff4 + zstandard, loaded on the first delta

            data = delta.apply(self.slots.path(previous).read_bytes(), data)
        model_sha = hashlib.sha256(data).hexdigest()
        if p["kind"] == "delta" and model_sha != spec.artifact.sha256:
            raise StepFailed(Reason.HASH_MISMATCH, "the patched model does not match the signed target hash")
        plain = self._job_dir() / "model"
        plain.write_bytes(data)
        info = self.slots.stage(plain, sha256=model_sha, fmt=spec.artifact.format, model=spec.artifact.model,
                                model_version=spec.artifact.model_version, job=str(self.snap.job))
        self.job["target_slot"] = info.slot
        return Event.STAGED, {}

    def _staged_info(self) -> SlotInfo:
        info = self.slots.verified(self.job.get("target_slot"))
        if info is None or info.job != self.snap.job:
            raise StepFailed(Reason.INTERNAL, "the staged slot no longer holds this job's model")
        return info

    def _probe(self) -> tuple[Event, dict]:
        info = self._staged_info()
        verified = self._verified()
        model = self._loader(self.slots.path(info))
        golden = probing.read_golden(base64.b64decode(self.job["probe"]))
        try:
            got = model.run(check_feeds(model, dict(golden.inputs)))  # the same path as a request takes
        except Exception as e:  # the runtime's own error types
            raise StepFailed(Reason.PROBE_FAILED, f"the model fails on the golden inputs: {str(e)[:300]}") from e
        pr = verified.spec.probe
        verdict = probing.judge(golden.expected, got, atol=pr.atol, rtol=pr.rtol, min_cosine=pr.min_cosine)
        self.job["probe_result"] = verdict.detail
        if not verdict.passed:
            raise StepFailed(Reason.PROBE_FAILED, verdict.detail)
        self._staged = Loaded(model, info)
        return Event.PROBE_PASSED, {}

    def _switch(self) -> tuple[Event, dict]:
        info = self._staged_info()
        loaded = self._staged if self._staged is not None and self._staged.info == info else \
            Loaded(self._loader(self.slots.path(info)), info)  # after a restart: load it again
        self.slots.switch_to(info.slot)
        self.serving.swap(loaded)  # new requests go to the new model; running ones finish on the old
        self.telemetry.model_changed()
        self._staged = None
        return Event.SWITCHED, {}

    def _restore(self) -> tuple[Event, dict]:
        previous = self.job.get("previous_slot")
        if (previous is None or self.slots.verified(previous) is None) and self.snap.ordered_rollback:
            raise StepFailed(Reason.INTERNAL, "no previous model to roll back to")
        self.slots.restore(previous)
        self._serve_active()
        self.telemetry.model_changed()
        return Event.ROLLED_BACK, {}

    def _cleanup(self) -> None:
        if self.snap.job:
            shutil.rmtree(self.c.work_dir / str(self.snap.job), ignore_errors=True)
        self._assembler, self._staged = None, None

    # ------------------------------------------------------------------ serving and reporting

    def _serve_active(self) -> None:
        """Load whatever the pointer says is active (startup, rollback); an unusable slot serves nothing."""
        info = self.slots.active()
        current = self.serving.current
        if info is None:
            self.serving.swap(None)
            return
        if current is not None and current.info == info:
            return
        try:
            self.serving.swap(Loaded(self._loader(self.slots.path(info)), info))
        except RuntimeLoadError:
            log.exception("the active slot %s cannot be loaded", info.slot)
            self.serving.swap(None)

    def _event(self, job: str | None, state: str, result: str, reason: Reason, detail: str) -> None:
        msg = UpdateEvent(job=job or "none", state=state[:32], result=result, reason=reason,  # type: ignore[arg-type]
                          detail=detail[:1000], progress=1.0 if result != "pending" else 0.0,
                          timings_ms={k: float(v) for k, v in (self.job.get("timings") or {}).items()
                                      if k.endswith("_ms")}, ts=time.time())
        self.outbox.put(topics.topic(self.c.device_id, "evt"), msg.to_bytes())

    def publish_state(self) -> None:
        active = self.slots.active()
        state = DeviceState(active_version=active.version_label if active else None,
                            active_sha256=active.sha256 if active else None,
                            active_slot=active.slot if active else None,  # type: ignore[arg-type]
                            staged_version=None, root_version=self.verifier.root_version,
                            update_version=self.verifier.update_version, ts=time.time())
        self._send(topics.topic(self.c.device_id, "state"), state.to_bytes(), True)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()
