"""Run an ONNX model over prepared samples with ONNX Runtime (CPU), one batch-1 call per sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.realzoo.recipe import Outputs


def run_onnx(model: Path, samples: list[dict[str, np.ndarray]], *, threads: int = 2) -> Outputs:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(None, sample), strict=True)) for sample in samples]
