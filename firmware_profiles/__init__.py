"""Hardware profiles as validated data files.

>>> from firmware_profiles import load_profile
>>> load_profile("rpi5").artifacts[0].format
<ArtifactFormat.ONNX_INT8: 'onnx-int8'>
"""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from firmware_profiles.schema import (
    SCHEMA_VERSION,
    ArtifactFormat,
    ArtifactTarget,
    CalibrationMethod,
    FidelityFloor,
    LatencyPolicy,
    Profile,
    QuantDtype,
    QuantFormat,
    QuantizationScheme,
)

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactFormat",
    "ArtifactTarget",
    "CalibrationMethod",
    "FidelityFloor",
    "LatencyPolicy",
    "Profile",
    "ProfileError",
    "QuantDtype",
    "QuantFormat",
    "QuantizationScheme",
    "builtin_profile_ids",
    "load_profile",
    "load_profile_file",
]


class ProfileError(ValueError):
    """A profile that does not exist or does not validate. The message names the file and the field."""


def _builtin_dir() -> Path:
    return Path(str(resources.files("firmware_profiles") / "profiles"))


def builtin_profile_ids() -> list[str]:
    return sorted(p.stem for p in _builtin_dir().glob("*.toml"))


def load_profile_file(path: Path) -> Profile:
    """Read and validate one profile file; the file's stem must equal the profile's id."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ProfileError(f"{path}: no such profile file") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from e
    try:
        profile = Profile.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()
        )
        raise ProfileError(f"{path}: {problems}") from e
    if profile.id != path.stem:
        raise ProfileError(f"{path}: id: {profile.id!r} does not match the file name {path.stem!r}")
    return profile


@cache
def _load_builtin(profile_id: str) -> Profile:
    return load_profile_file(_builtin_dir() / f"{profile_id}.toml")


def load_profile(id_or_path: str | Path) -> Profile:
    """A built-in profile by id (``rpi5``), or a profile file by path (``./my-board.toml``)."""
    text = str(id_or_path)
    if text.endswith(".toml") or "/" in text:
        return load_profile_file(Path(text))
    if text not in builtin_profile_ids():
        known = ", ".join(builtin_profile_ids())
        raise ProfileError(f"unknown profile {text!r}; known profiles: {known}")
    return _load_builtin(text)
