"""Content-addressed artifact storage. Files are named by their sha256; uploads stream through a hash into a temp
file and are renamed into place, so a file under its name is always complete and correct. ``ArtifactStore`` is the
seam where an S3-compatible store replaces the local one."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

SHA = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


class ArtifactError(Exception):
    """Unknown artifact, or an upload that breaks a limit."""


class ArtifactStore(Protocol):
    async def put_stream(self, chunks: AsyncIterator[bytes], *, max_bytes: int) -> tuple[str, int]: ...

    def path(self, sha256: str) -> Path: ...

    def exists(self, sha256: str) -> bool: ...

    def put_bytes(self, data: bytes) -> str: ...


class LocalArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA.match(sha256):
            raise ArtifactError(f"{sha256!r} is not a sha256")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    async def put_stream(self, chunks: AsyncIterator[bytes], *, max_bytes: int) -> tuple[str, int]:
        """Store what the iterator yields; never holds more than one chunk in memory."""
        digest, size = hashlib.sha256(), 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise ArtifactError(f"upload exceeds the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            sha = digest.hexdigest()
            dest = self.path(sha)
            dest.parent.mkdir(exist_ok=True)
            os.replace(tmp, dest)  # same content, same name: a repeated upload is harmless
            return sha, size
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, data: bytes) -> str:
        """Store a small payload the server made itself (a delta, a per-device ciphertext)."""
        sha = hashlib.sha256(data).hexdigest()
        dest = self.path(sha)
        if dest.is_file():
            return sha
        dest.parent.mkdir(exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, dest)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
        return sha
