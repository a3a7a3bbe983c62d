"""Signed update metadata (TUF-grade) on python-tuf's metadata API, and its verification.

Roles: an offline **root** (threshold ≥ 1) lists the keys allowed to sign update metadata; **update metadata** is TUF
``targets`` metadata signed by an online key, naming one artifact for one device or cohort and profile, with its
deltas, its health probe and its conversion provenance. Our fields travel in the signed part under ``x-edgefleet``.

:class:`UpdateVerifier` is the one place verification happens: bytes in, verified values out, typed errors for
everything else; it never touches disk or network (python-tuf's ``TrustedMetadataSet`` is the model).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, ValidationError
from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, Role, Root, TargetFile, Targets
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from fleet_protocol.chunks import ChunkManifest
from fleet_protocol.errors import (
    ExpiredError,
    MalformedError,
    MixAndMatchError,
    OversizedError,
    RollbackError,
    SignatureError,
    TargetMismatchError,
    ThresholdError,
    UntrustedKeyError,
    VerificationError,
)
from fleet_protocol.windows import Window

FIELD = "x-edgefleet"
# Canonical JSON (what TUF signs) has no floats: real numbers travel as decimal strings and parse back on validation.
Real = Annotated[float, PlainSerializer(lambda v: repr(float(v)), return_type=str, when_used="json")]
DeltaAlgorithm = Literal["bsdiff4", "zstd-patch", "onnx-tensors"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_M = TypeVar("_M", bound=_Model)


class ArtifactInfo(_Model):
    path: str = Field(min_length=1, max_length=512)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    length: int = Field(ge=0)
    format: str
    profile: str
    model: str
    model_version: str
    chunks: ChunkManifest | None = None  # per-chunk hashes for transfer over MQTT


class DeltaInfo(_Model):
    path: str = Field(min_length=1, max_length=512)
    algorithm: DeltaAlgorithm
    base_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    length: int = Field(ge=0)
    chunks: ChunkManifest | None = None


class Probe(_Model):
    """The agent's health check: run the golden inputs, compare with the expected outputs."""

    inputs_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    atol: Real = Field(ge=0)
    rtol: Real = Field(ge=0)
    min_cosine: Real = Field(ge=-1, le=1)


class Provenance(_Model):
    source_sha256: str
    calibration_sha256: str
    converter_version: str
    fidelity: dict[str, Real] = {}


class Scope(_Model):
    """Who may install this: listed devices, or every device of a cohort; always one hardware profile."""

    devices: tuple[str, ...] = ()
    cohort: str | None = None
    profile: str


class UpdateSpec(_Model):
    scope: Scope
    artifact: ArtifactInfo
    deltas: tuple[DeltaInfo, ...] = ()
    probe: Probe
    provenance: Provenance
    encrypted_for: str | None = None  # the device key id the artifact is encrypted to, if it is
    # Maintenance windows (fleet_protocol.windows): the switch waits until one of the rollout's windows and one of
    # the device's site windows (its tags') are open; empty: no constraint. Signed: a broker or a forged offer cannot
    # move an install into business hours.
    windows: tuple[Window, ...] = Field(default=(), max_length=16)
    site_windows: tuple[Window, ...] = Field(default=(), max_length=16)

    @property
    def window_sets(self) -> tuple[tuple[Window, ...], ...]:
        return tuple(ws for ws in (self.windows, self.site_windows) if ws)


CONFIG_FIELD = "x-edgefleet-config"


class ConfigSpec(_Model):
    """A device's desired settings (fleet_protocol.config), signed like an update. The settings travel as JSON text:
    canonical JSON, which TUF signs, has no floats."""

    device: str = Field(min_length=1, max_length=64)
    settings_json: str = Field(max_length=16 * 1024)

    def settings(self) -> dict:
        try:
            value = json.loads(self.settings_json)
        except ValueError as e:
            raise MalformedError(f"config settings are not JSON: {e}") from e
        if not isinstance(value, dict) or not all(isinstance(v, str | int | float | bool | None) for v in
                                                  value.values()):
            raise MalformedError("config settings must be an object of scalar values")
        return value


@dataclass(frozen=True)
class VerifiedConfig:
    version: int
    spec: ConfigSpec


@dataclass(frozen=True)
class VerifiedUpdate:
    version: int
    expires: datetime
    spec: UpdateSpec

    def delta_from(self, base_sha256: str) -> DeltaInfo | None:
        return next((d for d in self.spec.deltas if d.base_sha256 == base_sha256), None)


@dataclass(frozen=True)
class Limits:
    """Explicit upper bounds on untrusted metadata (python-tuf keeps them in its updater config)."""

    max_root_bytes: int = 512 * 1024
    max_update_bytes: int = 256 * 1024


# ----------------------------------------------------------------------------- building (server side)


def _sign(md: Metadata, signers: Iterable[Signer]) -> bytes:
    for s in signers:
        md.sign(s, append=True)
    return md.to_bytes(JSONSerializer(compact=True))


def build_root(root_signers: list[Signer], online_signers: list[Signer], *, root_threshold: int = 1,
               online_threshold: int = 1, version: int = 1, expires: datetime) -> bytes:
    """Root metadata: root keys (offline) and the keys that may sign update metadata (online)."""
    keys = {s.public_key.keyid: s.public_key for s in [*root_signers, *online_signers]}
    online = [s.public_key.keyid for s in online_signers]
    roles = {
        "root": Role([s.public_key.keyid for s in root_signers], root_threshold),
        "targets": Role(online, online_threshold),
        # TUF's root names all four top-level roles; the fleet uses targets only, so the online keys hold the rest.
        "snapshot": Role(online, 1),
        "timestamp": Role(online, 1),
    }
    root = Root(version=version, expires=expires, keys=keys, roles=roles, consistent_snapshot=False)
    return _sign(Metadata(root), root_signers)


def rotate_root(old_root: bytes, new_root_signers: list[Signer], online_signers: list[Signer], *,
                old_root_signers: list[Signer], root_threshold: int = 1, online_threshold: int = 1,
                expires: datetime) -> bytes:
    """The next root, signed by the old root keys (a threshold of them) and by its own."""
    old = Metadata[Root].from_bytes(old_root)
    new = Metadata[Root].from_bytes(build_root(new_root_signers, online_signers, root_threshold=root_threshold,
                                               online_threshold=online_threshold, version=old.signed.version + 1,
                                               expires=expires))
    return _sign(new, [s for s in old_root_signers if s.public_key.keyid not in new.signatures])


def build_update(spec: UpdateSpec, signers: list[Signer], *, version: int, expires: datetime) -> bytes:
    """Update metadata for one device or cohort: TUF targets carrying the artifact, its deltas and our fields."""
    files = {spec.artifact.path: TargetFile(spec.artifact.length, {"sha256": spec.artifact.sha256},
                                            spec.artifact.path)}
    for d in spec.deltas:
        files[d.path] = TargetFile(d.length, {"sha256": d.sha256}, d.path)
    # Fields an older agent does not know travel only when used (it refuses unknown fields: better than ignoring a
    # window it cannot read).
    ours = spec.model_dump(mode="json", exclude={k for k in ("windows", "site_windows") if not getattr(spec, k)})
    targets = Targets(version=version, expires=expires, targets=files, unrecognized_fields={FIELD: ours})
    return _sign(Metadata(targets), signers)


def build_config(spec: ConfigSpec, signers: list[Signer], *, version: int, expires: datetime) -> bytes:
    """A device's desired settings as TUF targets metadata with no target files (same keys, same checks)."""
    targets = Targets(version=version, expires=expires, targets={},
                      unrecognized_fields={CONFIG_FIELD: spec.model_dump(mode="json")})
    return _sign(Metadata(targets), signers)


# ----------------------------------------------------------------------------- verification (device side)


def _parse(data: bytes, limit: int, kind: str) -> Metadata:
    if not isinstance(data, bytes | bytearray):
        raise MalformedError(f"{kind} metadata must be bytes, got {type(data).__name__}")
    if len(data) > limit:
        raise OversizedError(f"{kind} metadata is {len(data)} bytes; the limit is {limit}")
    try:
        md = Metadata.from_bytes(bytes(data))
    except DeserializationError as e:
        raise MalformedError(f"{kind} metadata is malformed: {e}") from e
    except Exception as e:  # the deserializer can raise assorted errors on hostile input
        raise MalformedError(f"{kind} metadata is malformed: {type(e).__name__}: {e}") from e
    if md.signed.type != kind:
        raise MalformedError(f"expected {kind} metadata, got {md.signed.type}")
    return md


def _check_signatures(trusted: Metadata[Root], role: str, md: Metadata) -> None:
    """Threshold of valid signatures from keys the trusted root lists for ``role``; say precisely what failed."""
    result = trusted.signed.get_verification_result(role, md.signed_bytes, md.signatures)
    if result.verified:
        return
    listed = set(trusted.signed.roles[role].keyids)
    sigs = set(md.signatures)
    if sigs and not sigs & listed:
        raise UntrustedKeyError(f"{role} metadata is signed only by keys the trusted root does not list for "
                                f"'{role}': {', '.join(sorted(k[:12] for k in sigs))}")
    bad = (sigs & listed) - set(result.signed)
    if bad:
        raise SignatureError(f"{role} metadata has {len(bad)} invalid signature(s) from listed key(s) "
                             f"{', '.join(sorted(k[:12] for k in bad))}")
    raise ThresholdError(f"{role} metadata has {len(result.signed)} valid signature(s); the threshold is "
                         f"{result.threshold}")


class UpdateVerifier:
    """Verifies root rotations and update metadata against a pinned root, for one device.

    State is the trusted root and the highest update-metadata version accepted so far; both are plain values the
    caller persists (``root_bytes``, ``update_version``) and hands back after a restart.
    """

    def __init__(self, pinned_root: bytes, *, device_id: str, profile: str, cohort: str | None = None,
                 update_version: int = 0, limits: Limits | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.limits = limits or Limits()
        self._clock = clock
        self.device_id, self.profile, self.cohort = device_id, profile, cohort
        root = _parse(pinned_root, self.limits.max_root_bytes, "root")
        _check_signatures(root, "root", root)  # the pinned root must at least be self-consistent
        self._root: Metadata[Root] = root
        self._root_bytes = bytes(pinned_root)
        self.update_version = update_version

    @property
    def root_bytes(self) -> bytes:
        return self._root_bytes

    @property
    def root_version(self) -> int:
        return self._root.signed.version

    def update_root(self, data: bytes) -> int:
        """Follow one root rotation: version N+1, signed by a threshold of root N's keys and of its own."""
        new = _parse(data, self.limits.max_root_bytes, "root")
        _check_signatures(self._root, "root", new)
        _check_signatures(new, "root", new)
        if new.signed.version != self._root.signed.version + 1:
            raise RollbackError(f"root version {new.signed.version} does not follow trusted version "
                                f"{self._root.signed.version}")
        self._root, self._root_bytes = new, bytes(data)
        return new.signed.version

    def verify_update(self, data: bytes) -> VerifiedUpdate:
        signed = self._signed_targets(data, after_version=self.update_version, what="update metadata",
                                      baseline="trusted")
        spec = _section(signed, FIELD, UpdateSpec, "update metadata")
        self._check_scope(spec.scope)
        self._check_consistent(signed, spec)
        self.update_version = signed.version
        return VerifiedUpdate(signed.version, signed.expires, spec)

    def verify_config(self, data: bytes, *, after_version: int) -> VerifiedConfig:
        """A desired-settings document: signed by the online keys the trusted root lists, newer than
        ``after_version`` (the last one applied; its own counter, not the updates'), unexpired, for this device."""
        signed = self._signed_targets(data, after_version=after_version, what="config metadata", baseline="applied")
        spec = _section(signed, CONFIG_FIELD, ConfigSpec, "config metadata")
        if spec.device != self.device_id:
            raise MixAndMatchError(f"config is for device {spec.device!r}, not {self.device_id!r}")
        spec.settings()
        return VerifiedConfig(signed.version, spec)

    def _signed_targets(self, data: bytes, *, after_version: int, what: str, baseline: str) -> Targets:
        """Targets metadata signed by the online keys the trusted root lists, newer than ``after_version``, and
        unexpired (the trusted root too)."""
        md = _parse(data, self.limits.max_update_bytes, "targets")
        _check_signatures(self._root, "targets", md)
        signed: Targets = md.signed
        if signed.version <= after_version:
            raise RollbackError(f"{what} version {signed.version} is not newer than {baseline} version "
                                f"{after_version}")
        now = self._clock()
        if signed.is_expired(now):
            raise ExpiredError(f"{what} expired at {signed.expires.isoformat()} (now {now.isoformat()})")
        if self._root.signed.is_expired(now):
            raise ExpiredError(f"trusted root expired at {self._root.signed.expires.isoformat()}")
        return signed

    def _check_scope(self, scope: Scope) -> None:
        if scope.profile != self.profile:
            raise MixAndMatchError(f"update is for profile {scope.profile!r}, this device is {self.profile!r}")
        for_me = self.device_id in scope.devices or (scope.cohort is not None and scope.cohort == self.cohort)
        if not for_me:
            raise MixAndMatchError(f"update is for devices {list(scope.devices)} / cohort {scope.cohort!r}, not "
                                   f"device {self.device_id!r} in cohort {self.cohort!r}")

    @staticmethod
    def _check_consistent(signed: Targets, spec: UpdateSpec) -> None:
        """The TUF target entries and our section must describe the same bytes."""
        items: list[ArtifactInfo | DeltaInfo] = [spec.artifact, *spec.deltas]
        for item in items:
            tf = signed.targets.get(item.path)
            if tf is None or tf.hashes.get("sha256") != item.sha256 or tf.length != item.length:
                raise MalformedError(f"update metadata lists {item.path!r} inconsistently")
            if item.chunks is not None and (item.chunks.sha256 != item.sha256 or item.chunks.length != item.length):
                raise MalformedError(f"the chunk list of {item.path!r} describes other bytes")


def _section(signed: Targets, field: str, model: type[_M], what: str) -> _M:
    """Our section of targets metadata, validated; MalformedError when it is missing or invalid."""
    try:
        return model.model_validate(signed.unrecognized_fields[field])
    except KeyError as e:
        raise MalformedError(f"{what} has no {field} section") from e
    except ValidationError as e:
        raise MalformedError(f"{what} {field} section is invalid: {e.errors()[0]['msg']} at "
                             f"{'.'.join(map(str, e.errors()[0]['loc']))}") from e


def verify_bytes(data: bytes, *, sha256: str, length: int, what: str = "artifact") -> None:
    """Length first (cheap, and stops endless data), then the hash."""
    if len(data) != length:
        raise TargetMismatchError(f"{what}: {len(data)} bytes, signed metadata says {length}")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise TargetMismatchError(f"{what}: sha256 differs from the signed metadata")


__all__ = [
    "ArtifactInfo", "DeltaInfo", "Limits", "Probe", "Provenance", "Scope", "UpdateSpec", "UpdateVerifier",
    "VerificationError", "VerifiedUpdate", "build_root", "build_update", "rotate_root",
    "verify_bytes",
]
