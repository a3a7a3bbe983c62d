"""Getting a signed payload onto disk: over MQTT in windows of chunks, or over HTTP(S) with Range, both resumable.

Neither trusts what it receives: each MQTT chunk is checked against the signed chunk list as it arrives (a bad one
is dropped and asked for again), and the whole file against the signed hash at the end (``check_payload``). Both
write into one file per job under the work directory, so a restart resumes with what is already there.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.job import StepFailed
from agent.metering import Hold, Metering
from agent.slots import sha256_file
from fleet_protocol.chunks import ChunkAssembler, ChunkManifest
from fleet_protocol.errors import ChunkError
from fleet_protocol.messages import ChunkData, ChunkRequest
from fleet_protocol.vocabulary import Reason

log = logging.getLogger(__name__)

HTTP_ATTEMPTS = 5


def check_payload(path: Path, *, sha256: str, length: int) -> None:
    """The downloaded file is exactly the signed payload; otherwise it is deleted (never keep bytes that do not
    match) and the download fails."""
    if path.stat().st_size != length or sha256_file(path) != sha256:
        path.unlink(missing_ok=True)
        raise StepFailed(Reason.HASH_MISMATCH, "downloaded payload does not match the signed hash")


def http_download(url: str, target: Path, length: int, *, attempts: int = HTTP_ATTEMPTS,
                  sleep: Callable[[float], None] = time.sleep, meter: Metering | None = None) -> Hold | None:
    """Resumable HTTP(S) download: each attempt asks only for the bytes not yet on disk (Range); the hash is checked
    afterwards (``check_payload``). Under a link policy the read is paced to its cap and stops (what arrived stays)
    when the link becomes metered or the day's budget is spent: the hold is returned, and a later call resumes."""
    for attempt in range(attempts):
        have = target.stat().st_size if target.exists() else 0
        if have > length:
            target.unlink()
            have = 0
        if have == length:
            return None
        if meter is not None and (held := meter.hold()) is not None:
            return held
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp, open(target, "ab") as f:
                if have and resp.status != 206:  # the server ignored Range: start over
                    f.truncate(0)
                held = _copy(resp, f, meter, sleep)
                f.flush()
                os.fsync(f.fileno())
            if held is not None:
                return held
        except (OSError, http.client.HTTPException) as e:
            log.warning("HTTP download attempt %d failed: %s", attempt + 1, e)
            sleep(min(5.0, 0.2 * 2 ** attempt))
        finally:
            if meter is not None:
                meter.save()
    if not target.exists() or target.stat().st_size != length:
        raise StepFailed(Reason.DOWNLOAD_FAILED, f"HTTP download of {url} incomplete after {attempts} attempts")
    return None


HTTP_BLOCK = 64 * 1024


def _copy(src, dst, meter: Metering | None, sleep: Callable[[float], None]) -> Hold | None:
    if meter is None or meter.policy.unlimited:
        shutil.copyfileobj(src, dst, 1 << 20)
        return None
    while True:
        if (held := meter.hold()) is not None:
            return held
        left = meter.budget_left()
        block = HTTP_BLOCK if left is None else min(HTTP_BLOCK, left)
        meter.pace(block, sleep)
        data = src.read(block)
        if not data:
            return None
        dst.write(data)
        meter.spend(len(data))


@dataclass(frozen=True)
class WindowConfig:
    window: int = 64  # chunks asked for at once
    timeout_s: float = 5.0  # no progress for this long (while connected): ask again for what is missing
    max_stalls: int = 24  # then the download fails


class ChunkWindow:
    """One payload over MQTT: asks for a window of missing chunks, the next window once it is delivered, and again
    for what is missing after a reconnect or a stall. Under a link policy (``meter``) a request holds while the link
    is metered or the budget is spent, and is sized to the bandwidth cap; ``held`` says why it waits. Called on the
    updater's thread only."""

    def __init__(self, config: WindowConfig, *, request: Callable[[ChunkRequest], None],
                 clock: Callable[[], float] = time.monotonic, meter: Metering | None = None):
        self.config = config
        self._request, self._clock, self._meter = request, clock, meter
        self._assembler: ChunkAssembler | None = None
        self._job, self._path = "", ""
        self._outstanding: set[int] = set()  # asked for and not yet here
        self._last_progress = 0.0
        self._stalls = 0
        self.connected = False
        self.held: Hold | None = None

    @property
    def active(self) -> bool:
        return self._assembler is not None

    def outstanding_bytes(self) -> int:
        a = self._assembler
        return 0 if a is None else sum(a.manifest.span(i)[1] - a.manifest.span(i)[0] for i in a.missing())

    def begin(self, job: str, path: str, manifest: ChunkManifest, target: Path) -> bool:
        """Start (or resume, from what ``target`` already holds) the download; True when nothing is missing."""
        self._assembler, self._job, self._path = ChunkAssembler(manifest, target), job, path
        if self._assembler.complete:
            self._assembler = None
            return True
        self._last_progress, self._stalls = self._clock(), 0
        self.request_missing()
        return False

    def cancel(self) -> None:
        self._assembler = None
        self._outstanding = set()
        self.held = None

    def request_missing(self) -> None:
        assembler = self._assembler
        if assembler is None or not self.connected:
            return
        missing = assembler.missing()[: self.config.window]
        if self._meter is not None:
            self.held = self._meter.hold()
            if self.held is not None:
                self._outstanding = set()
                self._meter.save()
                return
            spans = [assembler.manifest.span(i) for i in missing]
            missing = missing[: self._meter.grant([end - start for start, end in spans])]
        self._outstanding = set(missing)
        if missing:
            self._request(ChunkRequest(job=self._job, path=self._path, indices=tuple(missing)))

    def accept(self, chunk: ChunkData) -> Path | None:
        """Store a chunk of this job; the assembled file once the last one is in (then the window is done)."""
        assembler = self._assembler
        if assembler is None or chunk.job != self._job:
            return None  # late or foreign chunk
        try:
            fresh = assembler.accept(chunk.index, chunk.data)
        except ChunkError as e:
            log.warning("chunk %s/%d refused: %s", chunk.job, chunk.index, e)  # a bad chunk is asked for again
            return None
        if fresh:
            self._last_progress, self._stalls = self._clock(), 0
            if self._meter is not None:
                self._meter.spend(len(chunk.data))
        if assembler.complete:
            self._assembler, self._outstanding = None, set()
            if self._meter is not None:
                self._meter.save()
            return assembler.path
        self._outstanding.discard(chunk.index)
        if not self._outstanding:
            self.request_missing()  # what was asked for is here: ask for the next
        return None

    def tick(self) -> None:
        """Ask when nothing is outstanding (a hold may have lifted, the bucket refilled); ask again when nothing
        arrived for ``timeout_s`` while connected; fail after ``max_stalls`` such asks."""
        if not self.connected or self._assembler is None:
            return
        if not self._outstanding:
            self._last_progress = self._clock()
            self.request_missing()
            return
        if self._clock() - self._last_progress < self.config.timeout_s:
            return
        self._stalls += 1
        if self._stalls > self.config.max_stalls:
            self._assembler = None
            raise StepFailed(Reason.DOWNLOAD_FAILED, f"no chunk for {self._stalls} × {self.config.timeout_s:.0f} s "
                                                     "while connected")
        self._last_progress = self._clock()
        self.request_missing()
