"""The golden-probe file: what a converted artifact answers to one evaluation sample, which a device replays before
it switches to that artifact. The conversion writes it, the server signs its sha256 into the update metadata
(``probe.inputs_sha256``) and carries its bytes in the offer, the agent reads it back.

The format is an ``.npz`` (a zip of ``.npy`` members) holding ``in/<input name>`` and ``out/<output name>`` arrays.
Reading it is bytes in, a ``Golden`` or a ``ProbeDataError`` out: size bounded before anything is unpacked, never a
pickle. Standard library and numpy only, since devices import it.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleet_protocol.errors import MalformedError

MAX_PROBE_BYTES = 768 * 1024
# The members' declared sizes bound what unpacking writes (zipfile stops at them and checks the CRC), so a small
# deflated file cannot expand into the device's memory.
MAX_PROBE_UNPACKED_BYTES = 64 * 1024 * 1024
INPUT_PREFIX, OUTPUT_PREFIX = "in/", "out/"
ZIP_MAGIC = b"PK\x03\x04"
# What numpy's and zipfile's readers raise on bytes that are not a well-formed npz (an unknown compression method is
# NotImplementedError, an encrypted member RuntimeError, a corrupt deflate stream zlib.error).
_UNREADABLE = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


class ProbeDataError(MalformedError):
    """The probe file cannot be read (not an npz, too large, no inputs or outputs, pickled objects)."""


@dataclass(frozen=True)
class Golden:
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


def write_golden(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> bytes:
    """The probe file for these inputs and the outputs the artifact gave for them."""
    arrays: dict[str, Any] = {f"{INPUT_PREFIX}{k}": np.asarray(v) for k, v in inputs.items()}
    arrays.update({f"{OUTPUT_PREFIX}{k}": np.asarray(v) for k, v in outputs.items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_golden(data: bytes) -> Golden:
    if len(data) > MAX_PROBE_BYTES:
        raise ProbeDataError(f"probe data is {len(data)} bytes (limit {MAX_PROBE_BYTES})")
    arrays = _unpack(data)
    inputs = {k.removeprefix(INPUT_PREFIX): v for k, v in arrays.items() if k.startswith(INPUT_PREFIX)}
    expected = {k.removeprefix(OUTPUT_PREFIX): v for k, v in arrays.items() if k.startswith(OUTPUT_PREFIX)}
    if not inputs or not expected:
        raise ProbeDataError(f"probe data needs {INPUT_PREFIX}<name> and {OUTPUT_PREFIX}<name> arrays")
    return Golden(inputs, expected)


def _unpack(data: bytes) -> dict[str, np.ndarray]:
    if not data.startswith(ZIP_MAGIC):  # np.load would also take a bare .npy (one array) or a pickle
        raise ProbeDataError("probe data is not an npz")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            unpacked = sum(info.file_size for info in zf.infolist())
        if unpacked > MAX_PROBE_UNPACKED_BYTES:
            raise ProbeDataError(f"probe data unpacks to {unpacked} bytes (limit {MAX_PROBE_UNPACKED_BYTES})")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except _UNREADABLE as e:
        raise ProbeDataError(f"probe data is not a readable npz: {e}") from e
