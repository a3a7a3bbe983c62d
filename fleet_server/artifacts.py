"""Content-addressed artifact storage. Files are named by their sha256; an upload streams through a hash into a
temporary object and only then takes its name, so an artifact under its name is always complete and correct.

Two stores behind one protocol, chosen by settings (``open_store``): ``LocalArtifactStore`` (files under the data
folder: the embedded default) and ``S3ArtifactStore`` (any S3-compatible object storage through boto3: AWS S3, MinIO,
Ceph RGW...). Readers never assume a local file: they read bytes, ranges or a stream, and browsers and devices
download an S3 artifact straight from the storage through a presigned URL (HTTP Range included).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

SHA = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


class ArtifactError(Exception):
    """Unknown artifact, or an upload that breaks a limit."""


class ArtifactStore(Protocol):
    async def put_stream(self, chunks: AsyncIterator[bytes], *, max_bytes: int) -> tuple[str, int]: ...

    def put_bytes(self, data: bytes) -> str: ...

    def exists(self, sha256: str) -> bool: ...

    def size(self, sha256: str) -> int: ...

    def read_bytes(self, sha256: str) -> bytes: ...

    def read_range(self, sha256: str, offset: int, length: int) -> bytes: ...

    def open(self, sha256: str) -> IO[bytes]: ...

    def local_path(self, sha256: str) -> Path | None: ...

    def download_url(self, sha256: str) -> str | None: ...


def checked(sha256: str) -> str:
    if not SHA.match(sha256):
        raise ArtifactError(f"{sha256!r} is not a sha256")
    return sha256


class LocalArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / checked(sha256)[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self._existing(sha256).stat().st_size

    def read_bytes(self, sha256: str) -> bytes:
        return self._existing(sha256).read_bytes()

    def read_range(self, sha256: str, offset: int, length: int) -> bytes:
        with open(self._existing(sha256), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def open(self, sha256: str) -> IO[bytes]:
        return open(self._existing(sha256), "rb")

    def local_path(self, sha256: str) -> Path | None:
        path = self.path(sha256)
        return path if path.is_file() else None

    def download_url(self, sha256: str) -> str | None:
        return None  # the API serves local files itself

    def _existing(self, sha256: str) -> Path:
        path = self.path(sha256)
        if not path.is_file():
            raise ArtifactError(f"no artifact {sha256}")
        return path

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


class S3ArtifactStore:
    """Artifacts as objects ``<prefix><sha[:2]>/<sha>`` in one bucket of S3-compatible storage.

    An upload goes to a temporary key as a multipart upload, one part (``PART`` bytes) in memory at a time, hashed
    on the way; once complete it is copied server-side under its sha256 and the temporary object deleted. An
    interrupted or refused upload is aborted: nothing partial ever carries an artifact's name. Reads are ranged
    GETs; ``download_url`` presigns a GET that devices and browsers use directly (Range works on it).
    """

    PART = 8 << 20  # S3's multipart minimum is 5 MiB (all parts but the last)

    def __init__(self, bucket: str, *, endpoint_url: str | None = None, region: str = "us-east-1",
                 prefix: str = "artifacts/", access_key: str | None = None, secret_key: str | None = None,
                 public_endpoint_url: str | None = None, presign_seconds: int = 3600):
        import boto3
        from botocore.config import Config

        config = Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                        retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32)
        credentials = {"aws_access_key_id": access_key, "aws_secret_access_key": secret_key} if access_key else {}
        self.bucket, self.prefix, self.presign_seconds = bucket, prefix, presign_seconds
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config,
                                   **credentials)
        # Presigned URLs name the host devices reach, which may differ from the one the server uses.
        self._signer = self.client if not public_endpoint_url else boto3.client(
            "s3", endpoint_url=public_endpoint_url, region_name=region, config=config, **credentials)

    def key(self, sha256: str) -> str:
        return f"{self.prefix}{checked(sha256)[:2]}/{sha256}"

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist (a development convenience; production buckets are made by
        whoever owns the storage)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    # ------------------------------------------------------------------ reads

    def _head(self, sha256: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def exists(self, sha256: str) -> bool:
        return self._head(sha256) is not None

    def size(self, sha256: str) -> int:
        head = self._head(sha256)
        if head is None:
            raise ArtifactError(f"no artifact {sha256}")
        return int(head["ContentLength"])

    def _get(self, sha256: str, **extra):
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(sha256), **extra)["Body"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise ArtifactError(f"no artifact {sha256}") from e
            raise

    def read_bytes(self, sha256: str) -> bytes:
        with self._get(sha256) as body:
            return body.read()

    def read_range(self, sha256: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        with self._get(sha256, Range=f"bytes={offset}-{offset + length - 1}") as body:
            return body.read()

    def open(self, sha256: str) -> IO[bytes]:
        return self._get(sha256)  # a streaming body: read(n) pulls from the connection

    def local_path(self, sha256: str) -> Path | None:
        return None

    def download_url(self, sha256: str) -> str | None:
        return self._signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(sha256)}, ExpiresIn=self.presign_seconds)

    # ------------------------------------------------------------------ writes

    async def put_stream(self, chunks: AsyncIterator[bytes], *, max_bytes: int) -> tuple[str, int]:
        tmp = f"{self.prefix}tmp/{uuid.uuid4().hex}"
        digest, size = hashlib.sha256(), 0
        upload = await asyncio.to_thread(self.client.create_multipart_upload, Bucket=self.bucket, Key=tmp)
        upload_id, parts = upload["UploadId"], []
        pending: list[bytes] = []  # this part's chunks: joined once, when a part's worth has arrived
        pending_bytes = 0

        def send(data: bytes) -> None:
            number = len(parts) + 1
            etag = self.client.upload_part(Bucket=self.bucket, Key=tmp, UploadId=upload_id, PartNumber=number,
                                           Body=data)["ETag"]
            parts.append({"ETag": etag, "PartNumber": number})

        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise ArtifactError(f"upload exceeds the limit of {max_bytes} bytes")
                digest.update(chunk)
                pending.append(chunk)
                pending_bytes += len(chunk)
                if pending_bytes >= self.PART:  # parts may differ in size: no need to cut at exactly PART
                    part = b"".join(pending)
                    pending.clear()
                    pending_bytes = 0
                    await asyncio.to_thread(send, part)
                    del part
            if pending or not parts:
                part = b"".join(pending)
                pending.clear()
                await asyncio.to_thread(send, part)
            await asyncio.to_thread(self.client.complete_multipart_upload, Bucket=self.bucket, Key=tmp,
                                    UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            await asyncio.to_thread(self._abort, tmp, upload_id)
            raise
        sha = digest.hexdigest()
        try:
            if not await asyncio.to_thread(self.exists, sha):  # same content, same name: a repeat is harmless
                await asyncio.to_thread(self._copy, tmp, self.key(sha), size)
        finally:
            await asyncio.to_thread(self.client.delete_object, Bucket=self.bucket, Key=tmp)
        return sha, size

    def _copy(self, source: str, dest: str, size: int) -> None:
        if size < 5 << 30:  # one CopyObject up to 5 GiB
            self.client.copy_object(Bucket=self.bucket, Key=dest, CopySource={"Bucket": self.bucket, "Key": source})
        else:
            self.client.copy({"Bucket": self.bucket, "Key": source}, self.bucket, dest)  # managed multipart copy

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception:  # best effort: the bucket's lifecycle rule (abort incomplete uploads) reaps the rest
            return

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.exists(sha):
            self.client.put_object(Bucket=self.bucket, Key=self.key(sha), Body=data)
        return sha


@dataclass(frozen=True)
class StoreConfig:
    """Which store, and how to reach it: picklable, so a worker process or another machine opens the same one."""

    kind: str = "local"  # "local" | "s3"
    local_root: str = "./fleet-data/artifacts"
    bucket: str = ""
    endpoint_url: str | None = None
    public_endpoint_url: str | None = None
    region: str = "us-east-1"
    prefix: str = "artifacts/"
    access_key: str | None = None
    secret_key: str | None = None
    presign_seconds: int = 3600

    @classmethod
    def from_settings(cls, settings) -> StoreConfig:
        return cls(kind=settings.artifact_store, local_root=str(Path(settings.data_dir) / "artifacts"),
                   bucket=settings.s3_bucket, endpoint_url=settings.s3_endpoint_url,
                   public_endpoint_url=settings.s3_public_endpoint_url, region=settings.s3_region,
                   prefix=settings.s3_prefix, access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                   presign_seconds=settings.s3_presign_seconds)


def open_store(config: StoreConfig) -> LocalArtifactStore | S3ArtifactStore:
    if config.kind == "s3":
        if not config.bucket:
            raise ArtifactError("artifact_store is s3 but no s3_bucket is set")
        return S3ArtifactStore(config.bucket, endpoint_url=config.endpoint_url, region=config.region,
                               prefix=config.prefix, access_key=config.access_key, secret_key=config.secret_key,
                               public_endpoint_url=config.public_endpoint_url,
                               presign_seconds=config.presign_seconds)
    return LocalArtifactStore(Path(config.local_root))


def copy_out(store: ArtifactStore, sha256: str, dest: Path) -> Path:
    """Stream an artifact into a local file (a sandbox's input), one chunk in memory at a time."""
    with store.open(sha256) as source, open(dest, "wb") as out:
        shutil.copyfileobj(source, out, CHUNK)
    return dest
