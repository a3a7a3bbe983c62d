"""The golden probe of a converted artifact: one evaluation sample and what this very artifact answers to it.

A device replays it before switching to the artifact. The answer is computed with the device's own runtime wrapper
(``fleet_runtime.runtimes``: same loader, same feed checks), so the device compares like with like; the file format is
``fleet_protocol.probe``'s, the one the agent reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fleet_protocol.probe import write_golden
from fleet_runtime.runtimes import check_feeds, load

# The formats a device runtime can replay (a Core ML package has no runtime on a Linux host or device).
PROBED_SUFFIXES = (".onnx", ".tflite")


def golden_probe(artifact: Path, sample: dict[str, np.ndarray]) -> bytes:
    model = load(artifact, threads=1)
    outputs = model.run(check_feeds(model, sample))
    return write_golden(sample, outputs)
