"""The golden probe of a converted artifact: one evaluation sample and what this very artifact answers to it.

A device replays it before switching to the artifact. The answer is computed with the device's own runtime wrapper
(``fleet_runtime.runtimes``: same loader, same feed checks), so the device compares like with like; the file format is
``fleet_protocol.probe``'s, the one the agent reads.

For ONNX the answer is the artifact's own QDQ arithmetic (``exact``), not this host's fused integer kernels: those
differ between hosts (an x86 CPU without VNNI adds u8×s8 pairs in saturating int16; ARM and VNNI accumulate in
int32), and a device's kernels are judged against what the artifact means, within the signed tolerance (fused
against exact on our artifacts: cosine ≥ 0.9995). A device whose optimized path computes something else fails
its probe and keeps serving its last good model: on ONNX Runtime 1.32 one 16-bit-activation graph answered all
zeros fused, and a golden answer taken from the fused path had zeros for the device to agree with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fleet_protocol.probe import write_golden
from fleet_runtime.runtimes import check_feeds, load

# The formats a device runtime can replay (a Core ML package has no runtime on a Linux host or device).
PROBED_SUFFIXES = (".onnx", ".tflite")


def golden_probe(artifact: Path, sample: dict[str, np.ndarray]) -> bytes:
    model = load(artifact, threads=1, exact=True)
    outputs = model.run(check_feeds(model, sample))
    return write_golden(sample, outputs)
