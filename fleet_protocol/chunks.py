"""Chunked transfer: fixed-size chunks with per-chunk hashes listed in signed metadata.

The receiver writes each chunk at its offset in a pre-sized file, so the payload is never held in memory; it accepts
chunks in any order, ignores duplicates, refuses a chunk whose size or hash is wrong, and says which are missing.
After a restart it re-hashes what is already on disk to know what it has (no separate state file to get wrong).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleet_protocol.errors import ChunkError, TargetMismatchError

DEFAULT_CHUNK_SIZE = 256 * 1024
MAX_CHUNKS = 1_000_000


class ChunkManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    length: int = Field(ge=0)
    chunk_size: int = Field(gt=0, le=64 * 1024 * 1024)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    chunk_sha256: tuple[str, ...] = Field(max_length=MAX_CHUNKS)

    @model_validator(mode="after")
    def _count_matches(self) -> ChunkManifest:
        if len(self.chunk_sha256) != self.count:
            raise ValueError(f"{len(self.chunk_sha256)} chunk hashes for {self.count} chunks")
        return self

    @property
    def count(self) -> int:
        return -(-self.length // self.chunk_size)

    def span(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(self.length, start + self.chunk_size)


def manifest_for(payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkManifest:
    hashes = tuple(hashlib.sha256(payload[i : i + chunk_size]).hexdigest()
                   for i in range(0, len(payload), chunk_size))
    return ChunkManifest(length=len(payload), chunk_size=chunk_size, sha256=hashlib.sha256(payload).hexdigest(),
                         chunk_sha256=hashes)


def chunks(payload: bytes, manifest: ChunkManifest) -> Iterator[tuple[int, bytes]]:
    for i in range(manifest.count):
        s, e = manifest.span(i)
        yield i, payload[s:e]


class ChunkAssembler:
    """Assemble one payload into ``path`` from chunks that arrive in any order, possibly more than once."""

    def __init__(self, manifest: ChunkManifest, path: Path):
        self.manifest, self.path = manifest, Path(path)
        self._have = [False] * manifest.count
        fresh = not self.path.exists()
        self.path.touch(exist_ok=True)
        if os.path.getsize(self.path) != manifest.length:
            os.truncate(self.path, manifest.length)
        if not fresh:
            self._rescan()

    def _rescan(self) -> None:
        with open(self.path, "rb") as f:
            for i in range(self.manifest.count):
                s, e = self.manifest.span(i)
                f.seek(s)
                self._have[i] = hashlib.sha256(f.read(e - s)).hexdigest() == self.manifest.chunk_sha256[i]

    def accept(self, index: int, data: bytes) -> bool:
        """Store a chunk; False for a duplicate. A wrong index, size or hash raises ChunkError and stores nothing."""
        if not isinstance(index, int) or not 0 <= index < self.manifest.count:
            raise ChunkError(f"chunk index {index!r} outside 0..{self.manifest.count - 1}")
        s, e = self.manifest.span(index)
        if len(data) != e - s:
            raise ChunkError(f"chunk {index}: {len(data)} bytes, expected {e - s}")
        if hashlib.sha256(data).hexdigest() != self.manifest.chunk_sha256[index]:
            raise ChunkError(f"chunk {index}: sha256 does not match the signed chunk list")
        if self._have[index]:
            return False
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, s)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._have[index] = True
        return True

    def missing(self) -> list[int]:
        return [i for i, ok in enumerate(self._have) if not ok]

    @property
    def complete(self) -> bool:
        return all(self._have)

    def finish(self) -> Path:
        """Check the whole payload's hash (streamed) and return the path."""
        if not self.complete:
            raise ChunkError(f"{len(self.missing())} chunk(s) still missing")
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != self.manifest.sha256:
            raise TargetMismatchError("assembled payload does not match the signed sha256")
        return self.path
