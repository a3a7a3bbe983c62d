"""The health probe: golden inputs from the offer, the expected outputs, and the tolerance the signed metadata
states. Pure: arrays in, a verdict out.

The probe file's format (``in/<name>`` and ``out/<name>`` arrays in an ``.npz``) has its home in
``fleet_protocol.probe``, which the conversion writes with; its sha256 is signed in the update metadata
(``probe.inputs_sha256``) and its bytes are carried by the offer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleet_protocol.probe import MAX_PROBE_BYTES, Golden, ProbeDataError, read_golden

# The agent's probe is the format's reader plus the judgement; the updater reaches both through this module.
__all__ = ["MAX_PROBE_BYTES", "Golden", "ProbeDataError", "Verdict", "judge", "read_golden"]


@dataclass(frozen=True)
class Verdict:
    passed: bool
    detail: str
    worst_cosine: float
    worst_abs_error: float


def judge(expected: dict[str, np.ndarray], got: dict[str, np.ndarray], *, atol: float, rtol: float,
          min_cosine: float) -> Verdict:
    """Every expected output must be present, shaped alike, within atol + rtol·|expected| element-wise or at least
    ``min_cosine`` similar (INT8 artifacts differ from their FP32 reference by design; both bounds are signed)."""
    worst_cos, worst_err = 1.0, 0.0
    for name, want in expected.items():
        if name not in got:
            return Verdict(False, f"output {name!r} missing (model gives {sorted(got)})", -1.0, float("inf"))
        have = np.asarray(got[name])
        if have.shape != want.shape:
            return Verdict(False, f"output {name!r}: shape {list(have.shape)}, expected {list(want.shape)}", -1.0,
                           float("inf"))
        a, b = want.astype(np.float64).ravel(), have.astype(np.float64).ravel()
        if not np.isfinite(b).all():
            return Verdict(False, f"output {name!r} contains NaN or infinity", -1.0, float("inf"))
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        cos = 1.0 if na == nb == 0 else float(a @ b) / max(na * nb, 1e-30)
        worst_cos, worst_err = min(worst_cos, cos), max(worst_err, err)
        close = bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(a)))
        if not close and cos < min_cosine:
            return Verdict(False, f"output {name!r}: cosine {cos:.5f} < {min_cosine} and max error {err:.4g} beyond "
                                  f"atol {atol} + rtol {rtol}", worst_cos, worst_err)
    return Verdict(True, f"worst cosine {worst_cos:.5f}, max error {worst_err:.4g}", worst_cos, worst_err)
