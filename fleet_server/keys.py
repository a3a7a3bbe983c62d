"""Fleet signing keys. ``init`` writes the **root** key to a path the operator moves offline (it signs only root
metadata, rarely); the **online** key that signs update metadata stays in the server's data directory. Root metadata,
every version, is kept for agents (they pin version 1 and follow rotations)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fleet_protocol.keys import generate_signer, signer_from_pem, signer_to_pem
from fleet_protocol.metadata import build_root, rotate_root

ROOT_VALIDITY = timedelta(days=365)


class KeysError(Exception):
    """Keys missing or already present."""


def keys_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "keys"


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def init_keys(data_dir: Path, root_key_out: Path) -> Path:
    """Generate the root and online keys and root metadata version 1; returns the root metadata path."""
    d = keys_dir(data_dir)
    if (d / "online.pem").exists() or (d / "root-1.json").exists():
        raise KeysError(f"{d} already holds fleet keys (rotate instead of re-initialising)")
    root, online = generate_signer(), generate_signer()
    _write_secret(root_key_out, signer_to_pem(root))
    _write_secret(d / "online.pem", signer_to_pem(online))
    metadata = build_root([root], [online], expires=datetime.now(UTC) + ROOT_VALIDITY)
    (d / "root-1.json").write_bytes(metadata)
    return d / "root-1.json"


def root_versions(data_dir: Path) -> list[bytes]:
    d = keys_dir(data_dir)
    files = sorted(d.glob("root-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [p.read_bytes() for p in files]


def pinned_root(data_dir: Path) -> bytes:
    versions = root_versions(data_dir)
    if not versions:
        raise KeysError(f"no root metadata in {keys_dir(data_dir)}: run `fleet-server keys init`")
    return versions[0]


def online_signer(data_dir: Path):
    path = keys_dir(data_dir) / "online.pem"
    if not path.exists():
        raise KeysError(f"{path} is missing: run `fleet-server keys init`")
    return signer_from_pem(path.read_bytes())


def rotate(data_dir: Path, *, old_root_key: Path, new_root_key_out: Path, new_online: bool = False) -> Path:
    """Root metadata N+1 signed by the old root key and a new one (written to ``new_root_key_out``); optionally a
    new online key too (a suspected online-key compromise). Agents follow it when an offer carries it."""
    versions = root_versions(data_dir)
    if not versions:
        raise KeysError("no root metadata to rotate: run `fleet-server keys init`")
    old = signer_from_pem(Path(old_root_key).read_bytes())
    online = online_signer(data_dir)
    new_root = generate_signer()
    if new_online:
        online = generate_signer()
    metadata = rotate_root(versions[-1], [new_root], [online], old_root_signers=[old],
                           expires=datetime.now(UTC) + ROOT_VALIDITY)
    _write_secret(new_root_key_out, signer_to_pem(new_root))
    d = keys_dir(data_dir)
    if new_online:
        tmp = d / "online.pem.new"
        _write_secret(tmp, signer_to_pem(online))
        os.replace(tmp, d / "online.pem")
    path = d / f"root-{len(versions) + 1}.json"
    path.write_bytes(metadata)
    return path
