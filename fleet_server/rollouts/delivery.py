"""Per-device update delivery: pick the delivery (a cached delta from what the device's slot of this model runs, else
the full artifact, encrypted to the device when asked), sign the update metadata for that one device, and serve the
chunks it asks for.

Files are named in the signed metadata by content (``blobs/<sha256>``), so serving a chunk needs only the job's list
of files (a device may fetch nothing else) and the artifact store.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlmodel import Session, select

from fleet_protocol import delta, messages
from fleet_protocol.chunks import DEFAULT_CHUNK_SIZE, ChunkManifest, manifest_for
from fleet_protocol.metadata import ArtifactInfo, DeltaInfo, Probe, Provenance, Scope, UpdateSpec, build_update
from fleet_protocol.windows import Window
from fleet_protocol.windows import next_all_open as windows_next_all_open
from fleet_server import device_models, keys
from fleet_server.models import ConvertedArtifact, DeltaCache, Device, ModelVersion, RolloutDevice, TagWindows

log = logging.getLogger(__name__)
CHUNK_SIZE = DEFAULT_CHUNK_SIZE  # 256 KiB: a few MB move in a dozen messages per device
OFFER_TTL = timedelta(days=7)
MAX_SITE_WINDOWS = 16
MANIFEST_CACHE = 10_000
CHUNK_CACHE = 128  # encoded chunks kept (~45 MB at 256 KiB): a wave asks for the same few files
DELTA_ALGORITHMS = {"bsdiff4", "zstd-patch", "onnx-tensors"}


def site_windows(session: Session, tags: list[str]) -> tuple[Window, ...]:
    """The maintenance windows of a device's tags (any of them open allows the switch); more than an offer carries
    is refused rather than cut (the member shows why)."""
    if not tags:
        return ()
    rows = session.exec(select(TagWindows).where(TagWindows.tag.in_(tags))).all()  # type: ignore[attr-defined]
    found = {Window.model_validate(w) for row in rows for w in row.windows}
    if len(found) > MAX_SITE_WINDOWS:
        raise DeliveryError(f"the device's tags carry {len(found)} maintenance windows; an offer carries at most "
                            f"{MAX_SITE_WINDOWS}")
    return tuple(sorted(found, key=lambda w: (w.cron, w.duration_s, w.tz)))


def offer_expiry(spec: UpdateSpec, now: datetime) -> datetime:
    """``OFFER_TTL`` from now, or from when the offer's windows first all open: a device that waits for its window
    (and reboots meanwhile, verifying the offer again) must still find it valid then."""
    if not spec.window_sets:
        return now + OFFER_TTL
    opens = windows_next_all_open(spec.window_sets, now.timestamp())
    if opens is None:
        raise DeliveryError("the rollout's maintenance windows and the device's site windows are never open at the "
                            "same time within a year")
    return datetime.fromtimestamp(opens, UTC) + OFFER_TTL


class DeliveryError(Exception):
    """This device cannot be offered this artifact (the reason goes to its rollout row)."""


class Delivery:
    def __init__(self, data_dir: Path, store, chunk_size: int = CHUNK_SIZE, http_base: str | None = None):
        """``http_base``: the API's /v1/deliveries URL when devices download over HTTP (else chunks over MQTT)."""
        self.data_dir, self.store, self.chunk_size = Path(data_dir), store, chunk_size
        self.http_base = http_base.rstrip("/") if http_base else None
        self._manifests: dict[str, ChunkManifest] = {}
        # (sha, index, raw) → the chunk's bytes (binary frames) or base64 text (JSON), LRU
        self._chunk_cache: OrderedDict[tuple[str, int, bool], bytes | str] = OrderedDict()
        self._lock = threading.Lock()
        self._last_version = 0

    def next_version(self) -> int:
        """Signed metadata versions only grow for a device: milliseconds, strictly increasing in this process."""
        with self._lock:
            self._last_version = max(int(time.time() * 1000), self._last_version + 1)
            return self._last_version

    def _manifest(self, sha: str, payload: bytes | None = None) -> ChunkManifest:
        m = self._manifests.get(sha)
        if m is None:
            m = manifest_for(payload if payload is not None else self.store.read_bytes(sha), self.chunk_size)
            if len(self._manifests) >= MANIFEST_CACHE:  # per-device ciphertexts would otherwise grow it forever
                self._manifests.clear()
            self._manifests[sha] = m
        return m

    def best_delta(self, session: Session, base_sha: str, target_sha: str) -> DeltaCache | None:
        """The cached delta for this pair, computed once (None when the full file is as small or no base is known)."""
        row = session.exec(select(DeltaCache).where(DeltaCache.base_sha256 == base_sha,
                                                    DeltaCache.target_sha256 == target_sha)).first()
        if row is None:
            if not self.store.exists(base_sha):
                return None
            patch = delta.encode(self.store.read_bytes(base_sha), self.store.read_bytes(target_sha))
            sha = None
            if patch.algorithm in DELTA_ALGORITHMS:
                sha = hashlib.sha256(patch.data).hexdigest()
                self.store.put_bytes(patch.data)
            row = DeltaCache(base_sha256=base_sha, target_sha256=target_sha, algorithm=patch.algorithm,
                             delta_sha256=sha, length=len(patch.data))
            session.add(row)
            session.commit()
            session.refresh(row)
        return row if row.delta_sha256 else None

    def offer(self, session: Session, *, member: RolloutDevice, device: Device, mv: ModelVersion,
              art: ConvertedArtifact, encrypt: bool, windows: tuple[Window, ...] = ()) -> messages.UpdateOffer:
        """Sign the offer for one device and fill in the member's files and delivery (the caller commits). The
        rollout's maintenance ``windows`` and the device's site windows (its tags') travel signed."""
        if art.artifact_sha256 is None:
            raise DeliveryError("no artifact")
        target = art.artifact_sha256
        probe_bytes = self.store.read_bytes(art.probe_sha256) if art.probe_sha256 else None
        if probe_bytes is None:
            raise DeliveryError("the artifact has no probe data (convert it again)")
        files = {}
        body_sha, length = target, art.size or self.store.size(target)
        encrypted_for = None
        if encrypt:
            if not device.x25519_public_key:
                raise DeliveryError("encrypted delivery asked, but the device registered no X25519 key")
            from fleet_protocol.crypto import encrypt_for, key_id

            recipient = bytes.fromhex(device.x25519_public_key)
            body = encrypt_for(recipient, self.store.read_bytes(target), aad=device.id.encode())
            body_sha, length = self.store.put_bytes(body), len(body)  # stored: served after a restart too
            manifest = self._manifest(body_sha, body)
            encrypted_for = key_id(recipient)
        else:
            manifest = self._manifest(target)
        path = f"blobs/{body_sha}"
        files[path] = body_sha
        artifact = ArtifactInfo(path=path, sha256=body_sha, length=length, format=art.format, profile=art.profile,
                                model=mv.name, model_version=mv.version, chunks=manifest)
        deltas: tuple[DeltaInfo, ...] = ()
        delivery = "encrypted" if encrypt else "full"
        offered_bytes = length
        # the base is what this model's slot runs: a device serves several models (issue 17), and a delta from
        # another model's artifact is one the agent cannot apply
        base = device_models.delta_base(device_models.sha256_by_model(session, device.id), model=mv.name,
                                        active_version=device.active_version, active_sha256=device.active_sha256)
        if not encrypt and base and base != target:
            cached = self.best_delta(session, base, target)
            if cached is not None and cached.delta_sha256 and cached.length < length:
                dpath = f"blobs/{cached.delta_sha256}"
                deltas = (DeltaInfo(path=dpath, algorithm=cached.algorithm,  # type: ignore[arg-type]
                                    base_sha256=base, sha256=cached.delta_sha256,
                                    length=cached.length, chunks=self._manifest(cached.delta_sha256)),)
                files[dpath] = cached.delta_sha256
                delivery, offered_bytes = "delta", cached.length
        fidelity = {"min_cosine": art.fidelity} if art.fidelity is not None else {}
        spec = UpdateSpec(scope=Scope(devices=(device.id,), profile=device.profile), artifact=artifact, deltas=deltas,
                          probe=Probe(inputs_sha256=hashlib.sha256(probe_bytes).hexdigest(), atol=1e-2, rtol=1e-2,
                                      min_cosine=0.999),
                          provenance=Provenance(source_sha256=mv.source_sha256,
                                                calibration_sha256=mv.calibration_sha256,
                                                converter_version="edgefleet", fidelity=fidelity),
                          encrypted_for=encrypted_for, windows=windows,
                          site_windows=site_windows(session, device.tags))
        metadata = build_update(spec, [keys.online_signer(self.data_dir)], version=self.next_version(),
                                expires=offer_expiry(spec, datetime.now(UTC)))
        roots = tuple(keys.root_versions(self.data_dir)[1:])  # rotations after the root devices pinned
        member.files, member.delivery, member.bytes_offered = files, delivery, offered_bytes
        member.base_sha256, member.artifact_sha256 = base, target
        url = f"{self.http_base}/{member.job}" if self.http_base else None  # files at <url>/blobs/<sha256>
        return messages.UpdateOffer(job=member.job, metadata=metadata, roots=roots, probe=probe_bytes, url=url,
                                    base_sha256=base if deltas else None)

    def chunks(self, job: str, files: dict, request: messages.ChunkRequest, *, binary: bool = False) -> list[bytes]:
        """The requested chunks of one of the job's files, as wire bytes (nothing for a file the job does not list):
        binary frames for a device that asked for them, else base64 JSON (what agents before binary chunks read).
        Each chunk is read (and encoded) once and reused for every device that asks for it."""
        sha = files.get(request.path or next(iter(files), ""))
        if sha is None or not self.store.exists(sha):
            return []
        manifest = self._manifest(sha)
        wanted = [i for i in sorted(set(request.indices)) if i < manifest.count]
        if binary:
            return [messages.chunk_frame(job, i, self._cached(sha, i, manifest.chunk_size, raw=True)) for i in wanted]
        return [messages.chunk_bytes(job, i, self._cached(sha, i, manifest.chunk_size, raw=False)) for i in wanted]

    def _cached(self, sha: str, index: int, chunk_size: int, *, raw: bool):
        key = (sha, index, raw)
        with self._lock:
            hit = self._chunk_cache.get(key)
            if hit is not None:
                self._chunk_cache.move_to_end(key)
                return hit
        data = self.store.read_range(sha, index * chunk_size, chunk_size)
        value = data if raw else base64.b64encode(data).decode("ascii")
        with self._lock:
            self._chunk_cache[key] = value
            while len(self._chunk_cache) > CHUNK_CACHE:
                self._chunk_cache.popitem(last=False)
        return value
