"""Which onnx2tf options to try, in order, for a graph: the options onnx2tf has for failures it knows.

Measured on real models (2026-12-01, onnx2tf 1.28.8, TF 2.21): a CNN+LSTM recognizer (ddddocr) crashes the
TFLite converter (signal 11) or fails with no builtin for ``TensorListReserve`` when the LSTM stays a loop;
``enable_rnn_unroll`` unrolls it over the pinned sequence length and it converts to full INT8. Pure: no onnx2tf
import here; the worker passes ``options`` to ``onnx2tf.convert``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import onnx

RECURRENT_OPS = {"LSTM", "GRU", "RNN"}
# Our own refusals (profile policy, LiteRT kernels): converting again with other onnx2tf options changes nothing.
FINAL_ERRORS = ("profile allows no float ops", "LiteRT's INT8", "did not finish in")


STAGE_FILE = "stage.txt"


class Stage(Enum):
    """What the worker was doing; it records each before starting it."""

    ONNX2TF = "converting with onnx2tf"
    TFLITE = "converting the onnx2tf model to TFLite and quantizing it"
    LITERT = "running the INT8 model under LiteRT"


# A worker that died after onnx2tf had converted the model died in TF's converter or LiteRT: another onnx2tf option
# set rebuilds the same graph and dies the same way (all-MiniLM-L6-v2: three aborts in LiteRT, 650 s, 2026-12-01).
AFTER_ONNX2TF = (Stage.TFLITE, Stage.LITERT)


@dataclass(frozen=True)
class Attempt:
    label: str
    options: dict
    notes: list[str] = field(default_factory=list)


def attempts(model: Path) -> list[Attempt]:
    """The onnx2tf option sets to try on ``model``, most likely first."""
    ops = {n.op_type for n in onnx.load(str(model), load_external_data=False).graph.node}
    recurrent = sorted(ops & RECURRENT_OPS)
    if recurrent:
        # A recurrent layer left as a loop becomes TensorList ops, which have no TFLite builtin.
        unrolled = Attempt("recurrent layers unrolled (enable_rnn_unroll)", {"enable_rnn_unroll": True},
                           [f"{', '.join(recurrent)} unrolled over the sequence length pinned from the data "
                            "(onnx2tf enable_rnn_unroll): the .tflite has no loop and runs only that length"])
        return [unrolled, Attempt("disable_group_convolution", {"enable_rnn_unroll": True,
                                                               "disable_group_convolution": True}, unrolled.notes)]
    return [Attempt("onnx2tf defaults", {}),
            # Grouped convolutions onnx2tf rewrites into a loop of slices break on some exported graphs.
            Attempt("disable_group_convolution", {"disable_group_convolution": True},
                    ["grouped convolutions converted as split + concat (onnx2tf disable_group_convolution)"]),
            # Strict mode's extra transposition checks fail on some shape-heavy graphs where the plain path works.
            Attempt("disable_strict_mode", {"disable_strict_mode": True},
                    ["onnx2tf's strict transposition checks disabled (disable_strict_mode)"])]


def worth_retrying(error: str) -> bool:
    """Whether converting again with other onnx2tf options could change ``error``."""
    return not any(marker in error for marker in FINAL_ERRORS)


def crash_stage(error: str, recorded: str | None) -> Stage | None:
    """The stage a worker died in after onnx2tf had finished (``error`` says it crashed), else None."""
    if "crashed" not in error or recorded is None:
        return None
    stage = next((st for st in Stage if st.value == recorded.strip()), None)
    return stage if stage in AFTER_ONNX2TF else None
