"""A/B model slots on disk, power-safe.

Layout under the state directory::

    slots/a/model.onnx   slots/a/slot.json     (slot.json written last: a slot without it is empty)
    slots/b/model.tflite slots/b/slot.json
    active.json          {"slot": "a", "previous": "b"}

Every write is a temp file in the same directory, fsync, ``os.replace``, fsync of the directory: after a power cut
a file is either the old one or the new one. ``slot.json`` records the model's sha256, and a slot is only used when
its file still hashes to it, so a half-written or bit-rotted slot is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

SLOTS = ("a", "b")
SUFFIX = {"onnx-int8": ".onnx", "tflite-int8": ".tflite"}


class SlotError(Exception):
    """A slot cannot be used (empty, corrupt, or an unknown format)."""


@dataclass(frozen=True)
class SlotInfo:
    slot: str
    filename: str
    sha256: str
    length: int
    format: str
    model: str
    model_version: str
    job: str

    @property
    def version_label(self) -> str:
        return f"{self.model} {self.model_version}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SlotStore:
    def __init__(self, state_dir: Path, *, create: bool = True):
        """``create=False`` reads what is there and makes no folder (``fleet-agent status``)."""
        self.root = Path(state_dir)
        for s in SLOTS if create else ():
            (self.root / "slots" / s).mkdir(parents=True, exist_ok=True)
        self._pointer = self.root / "active.json"

    # ------------------------------------------------------------------ reading

    def pointer(self) -> dict:
        try:
            data = json.loads(self._pointer.read_text())
        except FileNotFoundError:
            return {"slot": None, "previous": None}
        except (OSError, ValueError) as e:  # os.replace makes this unreachable short of disk corruption
            raise SlotError(f"{self._pointer} is unreadable: {e}") from e
        return {"slot": data.get("slot"), "previous": data.get("previous")}

    def info(self, slot: str) -> SlotInfo | None:
        meta = self.root / "slots" / slot / "slot.json"
        try:
            return SlotInfo(**json.loads(meta.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            raise SlotError(f"slot {slot}: slot.json is unreadable: {e}") from e

    def path(self, info: SlotInfo) -> Path:
        return self.root / "slots" / info.slot / info.filename

    def verified(self, slot: str | None) -> SlotInfo | None:
        """The slot's info when its model file still hashes to what slot.json says, else None."""
        if slot not in SLOTS:
            return None
        info = self.info(slot)  # type: ignore[arg-type]
        if info is None:
            return None
        path = self.path(info)
        if not path.exists() or path.stat().st_size != info.length or sha256_file(path) != info.sha256:
            return None
        return info

    def active(self) -> SlotInfo | None:
        return self.verified(self.pointer()["slot"])

    def inactive_slot(self) -> str:
        current = self.pointer()["slot"]
        return "b" if current == "a" else "a"

    # ------------------------------------------------------------------ writing

    def stage(self, source: Path, *, sha256: str, fmt: str, model: str, model_version: str, job: str) -> SlotInfo:
        """Copy a verified model file into the inactive slot (never the active one), durably."""
        if fmt not in SUFFIX:
            raise SlotError(f"format {fmt!r} cannot be served by this agent (known: {', '.join(SUFFIX)})")
        slot = self.inactive_slot()
        folder = self.root / "slots" / slot
        meta = folder / "slot.json"
        if meta.exists():  # empty the slot first: a crash below leaves it empty, never mislabelled
            meta.unlink()
            fsync_dir(folder)
        for old in folder.iterdir():
            if old.is_file():
                old.unlink()
        target = folder / f"model{SUFFIX[fmt]}"
        tmp = folder / f".{target.name}.tmp"
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
        info = SlotInfo(slot=slot, filename=target.name, sha256=sha256, length=target.stat().st_size, format=fmt,
                        model=model, model_version=model_version, job=job)
        if sha256_file(target) != sha256:
            raise SlotError(f"slot {slot}: the written model does not hash to {sha256[:12]}… (disk error?)")
        atomic_write(meta, json.dumps(asdict(info)).encode())
        return info

    def switch_to(self, slot: str) -> None:
        """Make ``slot`` active (idempotent); the one it replaces becomes ``previous``."""
        if self.verified(slot) is None:
            raise SlotError(f"slot {slot} holds no verified model")
        current = self.pointer()
        if current["slot"] == slot:
            return
        atomic_write(self._pointer, json.dumps({"slot": slot, "previous": current["slot"]}).encode())

    def restore(self, slot: str | None) -> None:
        """Point back at ``slot`` (the one active before the update), or at nothing if there was none."""
        current = self.pointer()
        if current["slot"] == slot:
            return
        if slot is not None and self.verified(slot) is None:
            raise SlotError(f"slot {slot} no longer holds a verified model")
        atomic_write(self._pointer, json.dumps({"slot": slot, "previous": current["slot"]}).encode())
