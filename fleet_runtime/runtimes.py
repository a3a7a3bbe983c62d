"""Inference runtimes behind one interface: ONNX Runtime for ``.onnx``, LiteRT (or tflite-runtime) for ``.tflite``.

A loaded :class:`Model` says what it takes and returns (names, shapes with ``None`` for dynamic dimensions, dtypes)
and runs one feed dict. TFLite models with INT8 inputs/outputs take and give float32 like their ONNX siblings: the
backend applies the model's own quantization parameters, so a client does not care which format its device got.

Imports are lazy: an agent that serves an ``.onnx`` never loads TensorFlow Lite, and vice versa. This module needs
numpy only, so it also runs in the small numpy<2 environment that ``tflite-runtime`` needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool"}


class RuntimeLoadError(Exception):
    """The model file cannot be loaded by any available runtime."""


class InputError(ValueError):
    """A request's tensors do not fit the model (names, shapes, dtypes)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def describe(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


class Model(Protocol):
    backend: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


NCHW_TO_NHWC = (0, 2, 3, 1)


def _fits(shape: tuple[int, ...], spec: tuple[int | None, ...]) -> bool:
    return len(shape) == len(spec) and all(d is None or d == s for d, s in zip(spec, shape, strict=True))


def check_feeds(model: Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Names, ranks, fixed dimensions and dtypes against the model; float64/int lists are cast where lossless."""
    want = {t.name: t for t in model.inputs}
    if set(feeds) != set(want):
        raise InputError(f"inputs {sorted(feeds)} do not match the model's {sorted(want)}")
    out = {}
    for name, value in feeds.items():
        spec = want[name]
        arr = np.asarray(value)
        if not _fits(arr.shape, spec.shape) and getattr(model, "nhwc_from_nchw", False) and arr.ndim == 4 \
                and _fits(arr.shape[:1] + arr.shape[2:] + arr.shape[1:2], spec.shape):
            arr = arr.transpose(NCHW_TO_NHWC)  # the source model's NCHW, as the converter made it NHWC for TFLite
        if not _fits(arr.shape, spec.shape):
            raise InputError(f"input {name!r}: shape {list(arr.shape)} does not fit {list(spec.shape)} "
                             "(None = any)")
        if arr.dtype != np.dtype(spec.dtype):
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                raise InputError(f"input {name!r}: dtype {arr.dtype} cannot be used as {spec.dtype}")
            arr = arr.astype(spec.dtype)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InputError(f"input {name!r}: contains NaN or infinity")
        out[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    return out


class OnnxModel:
    backend = "onnxruntime"

    def __init__(self, path: Path, *, threads: int = 2, providers: list[str] | None = None, exact: bool = False):
        """``exact``: basic graph optimizations only, so QDQ pairs run as written (the artifact's own arithmetic,
        the same on every host) rather than fused into the host's integer kernels; for golden answers, not
        serving."""
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = [p for p in (providers or []) if p in available]  # absent providers are not an error
        chosen = [*dict.fromkeys([*wanted, "CPUExecutionProvider"])]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        if exact:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=chosen)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise RuntimeLoadError(f"ONNX Runtime cannot load {path.name}: {str(e).splitlines()[0][:300]}") from e
        self.providers = self.session.get_providers()
        self.inputs = [TensorInfo(i.name, _dims(i.shape), ORT_DTYPES.get(i.type, i.type))
                       for i in self.session.get_inputs()]
        self.outputs = [TensorInfo(o.name, _dims(o.shape), ORT_DTYPES.get(o.type, o.type))
                        for o in self.session.get_outputs()]
        self._names = [o.name for o in self.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._names, self.session.run(self._names, feeds), strict=True))


def _dims(shape) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)


def tflite_interpreter_class(prefer: str | None = None):
    """LiteRT (``ai-edge-litert``) first, ``tflite-runtime`` as the fallback (or as asked)."""
    order = ["tflite_runtime", "ai_edge_litert"] if prefer == "tflite_runtime" else ["ai_edge_litert",
                                                                                      "tflite_runtime"]
    errors = []
    for module in order:
        try:
            if module == "ai_edge_litert":
                from ai_edge_litert.interpreter import Interpreter
            else:
                from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found,no-redef]
            return module, Interpreter
        except ImportError as e:
            errors.append(f"{module}: {e}")
    raise RuntimeLoadError("no TFLite runtime is installed (" + "; ".join(errors) + ")")


class TfliteModel:
    """A .tflite behind the same interface as ONNX: quantized I/O presented as float32, and 4-D inputs accepted
    in the ONNX source's NCHW as well (the converter makes image inputs NHWC for TFLite; an application talking to
    devices of several profiles sends one layout). A shape that fits as given is always taken as given."""

    nhwc_from_nchw = True

    def __init__(self, path: Path, *, threads: int = 2, prefer: str | None = None):
        module, interpreter = tflite_interpreter_class(prefer)
        self.backend = module
        try:
            self.interpreter = interpreter(model_path=str(path), num_threads=threads)
            self.runner = self.interpreter.get_signature_runner()
        except (ValueError, RuntimeError) as e:
            raise RuntimeLoadError(f"{module} cannot load {path.name}: {str(e).splitlines()[0][:300]}") from e
        self._in = self.runner.get_input_details()
        self._out = self.runner.get_output_details()
        self.inputs = [TensorInfo(n, tuple(int(x) for x in d["shape"]), _logical(d)) for n, d in self._in.items()]
        self.outputs = [TensorInfo(n, tuple(int(x) for x in d["shape"]), _logical(d)) for n, d in self._out.items()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raw = {}
        for name, value in feeds.items():
            d = self._in[name]
            if d["dtype"] in (np.int8, np.uint8) and value.dtype.kind == "f":
                scale, zero = d["quantization"]
                info = np.iinfo(d["dtype"])
                value = np.clip(np.round(value / scale + zero), info.min, info.max).astype(d["dtype"])
            raw[name] = value
        got = self.runner(**raw)
        out = {}
        for name, value in got.items():
            d = self._out[name]
            if d["dtype"] in (np.int8, np.uint8) and d["quantization"][0]:
                scale, zero = d["quantization"]
                value = (value.astype(np.float32) - zero) * scale
            out[name] = value
        return out


def _logical(d: dict) -> str:
    """Quantized I/O is presented as float32 (the backend quantizes); other dtypes as they are."""
    if d["dtype"] in (np.int8, np.uint8) and d["quantization"][0]:
        return "float32"
    return np.dtype(d["dtype"]).name


def load(path: Path, *, threads: int = 2, providers: list[str] | None = None, tflite: str | None = None,
         exact: bool = False) -> Model:
    suffix = Path(path).suffix
    if suffix == ".onnx":
        return OnnxModel(path, threads=threads, providers=providers, exact=exact)
    if suffix == ".tflite":
        return TfliteModel(path, threads=threads, prefer=tflite)
    raise RuntimeLoadError(f"{Path(path).name}: no runtime serves {suffix or 'this file'} (.onnx, .tflite)")
