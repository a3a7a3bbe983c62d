"""ONNX → Core ML ``.mlpackage`` with 8-bit weights, run as a child process: ``python -m converters.coreml_worker JOB``.

The route is ONNX → PyTorch (``onnx2torch``) → TorchScript trace → ``coremltools.convert`` (ML program, FP16
compute, or FP32 when the job asks) → ``linear_quantize_weights`` (INT8, per channel, symmetric). coremltools
cannot run a model on Linux, so the worker also measures what the host can measure:

* the PyTorch model against itself with every weight quantized the way Core ML stores it and FP16 compute (Core ML's
  default precision on the GPU and Neural Engine) — a host-side simulation, labelled as such in the report;
* the structure of the saved package: it loads, its inputs and outputs are the source's, its weights are 8-bit.

On macOS the worker also predicts with the package itself, and those outputs are the ones judged.

The package is written reproducibly: coremltools stamps a conversion date, serialises protobuf maps in hash order
and names its items with random UUIDs; the worker drops the date, re-serialises deterministically and derives the
item identifiers from their paths. Same inputs, same bytes.

JOB is a JSON file: {"onnx", "out", "samples" (npz: ``s{i}_{k}`` = sample i, input k), "inputs" [names],
"outputs" [names], "target" (minimum iOS, e.g. 16), "metadata" {author, version, short_description, labels,
input_descriptions, output_descriptions, user}}. The result is written to ``out/result.json``.
"""

from __future__ import annotations

import json
import sys
import types
import uuid
from pathlib import Path

from converters.coreml_onnx2torch import to_torch
from converters.workers import worker_main

# Tensors with no more elements stay FP16; so do 1-D tensors (biases, norms), which coremltools never compresses.
WEIGHT_THRESHOLD = 512
PACKAGE_NAME = "model.int8.mlpackage"
WEIGHT_TYPES = {"constexpr_affine_dequantize", "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense",
                "const"}


def _isolate_imports() -> None:
    """Keep TensorFlow out (coremltools imports it when present: seconds of startup, and its LLVM clashes with
    torch's) and stand in for torchvision, which ``onnx2torch`` imports for NMS / RoiAlign only: the CPU torch wheel
    has no matching torchvision, so those two ops report themselves unsupported instead of breaking the import."""
    sys.modules["tensorflow"] = None  # type: ignore[assignment]
    try:
        import torchvision.ops  # noqa: F401
    except Exception:  # absent, or a build for another torch
        tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

        def unavailable(*_args, **_kwargs):
            raise NotImplementedError("NonMaxSuppression / RoiAlign need torchvision, which is not installed")

        ops.nms = ops.roi_align = ops.box_convert = unavailable  # type: ignore[attr-defined]
        tv.ops = ops  # type: ignore[attr-defined]
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops


def _load_samples(path: str, n_inputs: int) -> list[list]:
    import numpy as np

    with np.load(path) as z:
        count = len(z.files) // n_inputs
        return [[z[f"s{i}_{k}"] for k in range(n_inputs)] for i in range(count)]


# ONNX revisions that only widened the accepted types (int4, bfloat16, ...) onnx2torch has no converter for: the
# converter of the previous revision translates them exactly (same attributes, same semantics).
def _prelu(x, weight):
    """PReLU as ``where``: coremltools' prelu takes one alpha per channel on rank-4 inputs only (MTCNN's ONet applies
    per-feature PReLU to a rank-2 Linear output)."""
    import torch

    shape = [1] * x.dim()
    if x.dim() > 1:
        shape[1] = -1
    return torch.where(x > 0, x, x * weight.reshape(shape))


def _load_export(pt2_path: str):
    """The source's ExportedProgram, with the decompositions coremltools needs. The source loader already checked
    the archive holds no pickles."""
    import torch

    program = torch.export.load(pt2_path)
    return program.run_decompositions({torch.ops.aten.prelu.default: _prelu,
                                       torch.ops.aten._prelu_kernel.default: _prelu})


def _conv_transpose_weights(module) -> set[str]:
    """Names of the parameters an exported graph uses as transposed-convolution weights (output channels on axis 1)."""
    names = set()
    for node in module.graph.nodes:
        transposed = "conv_transpose" in str(node.target) or (
            str(node.target) == "aten.convolution.default" and len(node.args) > 6 and node.args[6])
        if node.op == "call_function" and transposed and getattr(node.args[1], "op", "") == "get_attr":
            names.add(node.args[1].target)
    return names


_MATMUL_TARGETS = ("matmul", "mm.default", "matmul.default", "OnnxMatMul")


def _matmul_weight_axes(module) -> dict[int, int]:
    """id(tensor) → -1 for every constant a graph feeds as a MatMul's right-hand side (``x @ W``, ``W`` [in, out]).

    coremltools folds ``matmul(x, W) + b`` into ``linear`` with ``W`` transposed and quantizes that per output
    channel: per column of ``W``. An onnx2torch graph (``OnnxMatMul`` modules) or an exported one (``aten.mm``,
    ``aten.matmul``) reads such weights through ``get_attr`` nodes, possibly behind an Identity."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return {}
    axes: dict[int, int] = {}
    for node in graph.nodes:
        kind = type(module.get_submodule(str(node.target))).__name__ if node.op == "call_module" else \
            str(getattr(node.target, "__name__", node.target))
        if not kind.endswith(_MATMUL_TARGETS) or len(node.args) < 2:
            continue
        source = node.args[1]
        while getattr(source, "op", None) == "call_module" and \
                "Identity" in type(module.get_submodule(str(source.target))).__name__ and source.args:
            source = source.args[0]
        if getattr(source, "op", None) == "get_attr":
            tensor = _attr(module, str(source.target))
            if tensor is not None:
                axes[id(tensor)] = -1
    return axes


def _attr(module, path: str):
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _quantize_like_coreml(module, *, exported: bool = False):
    """A copy of ``module`` whose weights went through Core ML's INT8 round trip.

    Conv and Linear weights are quantized per output channel, symmetric, as ``linear_quantize_weights`` stores them,
    and so are the constants a MatMul reads as its weight (per column: ``_matmul_weight_axes``); any other constant
    above the threshold per tensor, which is coarser than Core ML's per-channel choice and so errs on the pessimistic
    side. An exported graph has no Conv / Linear modules: there every tensor of rank ≥ 2 is quantized per channel on
    axis 0 (axis 1 for transposed convolutions, -1 for MatMul weights), as coremltools does.
    """
    import copy

    import torch

    q = copy.deepcopy(module)
    per_channel = {id(m.weight): (1 if isinstance(m, torch.nn.modules.conv._ConvTransposeNd) else 0)
                   for m in q.modules()
                   if isinstance(m, torch.nn.modules.conv._ConvNd | torch.nn.Linear) and m.weight is not None}
    if exported:
        transposed = _conv_transpose_weights(q)
        per_channel = {id(t): (1 if name in transposed else 0)
                       for name, t in [*q.named_parameters(), *q.named_buffers()]}
    per_channel.update(_matmul_weight_axes(q))
    with torch.no_grad():
        for t in [*q.parameters(), *q.buffers()]:
            if not t.is_floating_point() or t.ndim < 2 or t.numel() <= WEIGHT_THRESHOLD:
                continue
            axis = per_channel.get(id(t))
            if axis is None:
                peak = t.abs().max()
            else:
                dims = [d for d in range(t.ndim) if d != axis % t.ndim]
                peak = t.abs().amax(dim=dims, keepdim=True)
            scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
            t.copy_(torch.clamp(torch.round(t / scale), -127, 127) * scale)
    return q


def _run_torch(module, samples: list[list], *, half: bool) -> list[list]:
    import torch

    m = module.half() if half else module
    outs = []
    with torch.no_grad():
        for s in samples:
            args = [torch.from_numpy(v).half() if half and v.dtype.kind == "f" else torch.from_numpy(v) for v in s]
            got = m(*args)
            got = list(got) if isinstance(got, list | tuple) else [got]
            outs.append([g.float().numpy() for g in got])
    return outs


def _save_outputs(path: Path, runs: list[list]) -> None:
    import numpy as np

    np.savez(path, **{str(k): np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))})


def _convert(job: dict, torch_model, example: list, program=None):
    """The 8-bit package: from the ExportedProgram when there is one, else from a TorchScript trace."""
    import coremltools as ct
    import torch
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

    target = getattr(ct.target, f"iOS{job['target']}")
    outputs = [ct.TensorType(name=n) for n in job["outputs"]]
    precision = ct.precision.FLOAT32 if job.get("compute") == "fp32" else ct.precision.FLOAT16
    if program is not None:  # its inputs carry the source's names and static shapes already
        mlmodel = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=target, outputs=outputs,
                             compute_precision=precision)
    else:
        with torch.no_grad():
            traced = torch.jit.trace(torch_model, tuple(torch.from_numpy(v) for v in example))
        mlmodel = ct.convert(
            traced, convert_to="mlprogram", minimum_deployment_target=target, outputs=outputs,
            compute_precision=precision, inputs=[ct.TensorType(name=n, shape=v.shape, dtype=v.dtype)
                    for n, v in zip(job["inputs"], example, strict=True)])
    config = OptimizationConfig(global_config=OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=WEIGHT_THRESHOLD))
    return linear_quantize_weights(mlmodel, config)


def _feature_names(mlmodel, job: dict) -> dict[str, str]:
    """Source name → Core ML feature name, for the names coremltools changed (it makes every name a valid MIL
    identifier: ``save_infer_model/scale_0.tmp_1`` → ``save_infer_model_scale_0_tmp_1``, ``387`` → ``var_387``).
    Features keep the source's order, so they pair up by position."""
    spec = mlmodel.get_spec()
    got = [f.name for f in spec.description.input] + [f.name for f in spec.description.output]
    want = list(job["inputs"]) + list(job["outputs"])
    return {w: g for w, g in zip(want, got, strict=True) if w != g}


def _describe(mlmodel, meta: dict, renamed: dict[str, str]) -> None:
    mlmodel.author = meta.get("author") or ""
    mlmodel.version = meta.get("version") or ""
    mlmodel.short_description = meta.get("short_description") or ""
    for name, text in (meta.get("input_descriptions") or {}).items():
        mlmodel.input_description[renamed.get(name, name)] = text
    for name, text in (meta.get("output_descriptions") or {}).items():
        mlmodel.output_description[renamed.get(name, name)] = text
    user = dict(meta.get("user") or {})
    if meta.get("labels"):
        user["edgefleet.labels"] = json.dumps(meta["labels"])
    if renamed:  # the app can find a feature by the name the model's authors gave it
        user["edgefleet.source_feature_names"] = json.dumps(renamed, sort_keys=True)
    for k, v in user.items():
        mlmodel.user_defined_metadata[k] = v


def make_reproducible(package: Path) -> None:
    """Drop the conversion date, serialise the spec deterministically, derive item ids from their paths."""
    from coremltools.proto import Model_pb2

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entries, root = manifest["itemInfoEntries"], manifest["rootModelIdentifier"]
    ids = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "edgefleet:" + e["path"])).upper() for old, e in entries.items()}
    spec_file = package / "Data" / entries[root]["path"]
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    spec.description.metadata.userDefined.pop("com.github.apple.coremltools.conversion_date", None)
    spec_file.write_bytes(spec.SerializeToString(deterministic=True))
    manifest = {"fileFormatVersion": manifest["fileFormatVersion"],
                "itemInfoEntries": {ids[k]: entries[k] for k in sorted(entries, key=lambda k: ids[k])},
                "rootModelIdentifier": ids[root]}
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def structure(package: Path) -> dict:
    """What can be validated without running the package: it loads, its interface, its weights' types."""
    from coremltools.models.utils import load_spec
    from coremltools.proto import MIL_pb2

    spec = load_spec(str(package))
    kind = spec.WhichOneof("Type")
    facts: dict = {"spec_version": spec.specificationVersion, "model_type": kind, "inputs": {}, "outputs": {},
                   "int8_weight_elements": 0, "float_weight_elements": 0, "float_weight_tensors": [],
                   "int8_weight_tensors": 0, "ops": {}}
    for i in spec.description.input:
        a = i.type.multiArrayType
        facts["inputs"][i.name] = {"shape": list(a.shape), "dtype": _array_dtype(a.dataType)}
    for o in spec.description.output:
        a = o.type.multiArrayType
        facts["outputs"][o.name] = {"shape": list(a.shape), "dtype": _array_dtype(a.dataType)}
    if kind != "mlProgram":
        return facts
    fn = spec.mlProgram.functions["main"]
    facts["opset"] = fn.opset
    for op in fn.block_specializations[fn.opset].operations:
        facts["ops"][op.type] = facts["ops"].get(op.type, 0) + 1
        if op.type not in WEIGHT_TYPES:
            continue
        value = op.attributes.get("quantized_data") or op.attributes.get("data") or op.attributes.get("val")
        if value is None or value.WhichOneof("value") != "blobFileValue":
            continue
        tensor = value.type.tensorType
        elements = 1
        for d in tensor.dimensions:
            elements *= d.constant.size
        dtype = MIL_pb2.DataType.Name(tensor.dataType)
        if op.type == "const" and dtype in ("FLOAT16", "FLOAT32"):
            facts["float_weight_elements"] += elements
            if len(tensor.dimensions) >= 2 and elements > WEIGHT_THRESHOLD:
                facts["float_weight_tensors"].append(f"{op.outputs[0].name} {dtype} {elements}")
        elif dtype in ("INT8", "UINT8"):
            facts["int8_weight_elements"] += elements
            facts["int8_weight_tensors"] += 1
    return facts


def _array_dtype(code: int) -> str:
    from coremltools.proto import FeatureTypes_pb2

    return FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(code).lower()


def _predict(package: Path, names: list[str], samples: list[list], outputs: list[str]) -> list[list]:
    """macOS only: the package's own outputs."""
    import coremltools as ct

    model = ct.models.MLModel(str(package))
    return [[model.predict(dict(zip(names, s, strict=True)))[o] for o in outputs] for s in samples]


def _routes(job: dict, notes: list[str]):
    """(route name, PyTorch module, ExportedProgram or None), best first: the .pt2 source itself (no translation),
    then ONNX via onnx2torch. A route that cannot even load is skipped with a note."""
    if job.get("pt2"):
        try:
            program = _load_export(job["pt2"])
            yield "PyTorch ExportedProgram (.pt2 source) → Core ML", program.module(), program
        except Exception as e:
            notes.append(f"the .pt2 source could not be loaded for Core ML ({_first_line(e)})")
    yield "ONNX → PyTorch (onnx2torch) → TorchScript trace → Core ML", to_torch(job["onnx"], notes), None


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def _simulate(torch_model, samples: list[list], out: Path, exported: bool, notes: list[str], compute: str) -> str:
    simulated = _quantize_like_coreml(torch_model, exported=exported)
    if compute == "fp32":
        _save_outputs(out / "simulated.npz", _run_torch(simulated, samples, half=False))
        return "INT8 weights (Core ML's per-channel round trip), FP32 compute, PyTorch on this host"
    try:
        _save_outputs(out / "simulated.npz", _run_torch(simulated, samples, half=True))
        return "INT8 weights (Core ML's per-channel round trip), FP16 compute, PyTorch on this host"
    except RuntimeError as e:  # an op without a CPU FP16 kernel in this torch build
        simulated = _quantize_like_coreml(torch_model, exported=exported)  # .half() converted the first copy
        _save_outputs(out / "simulated.npz", _run_torch(simulated, samples, half=False))
        notes.append(f"FP16 compute could not be simulated on this host ({str(e).splitlines()[0][:120]})")
        return "INT8 weights (Core ML's per-channel round trip), FP32 compute, PyTorch on this host"


def _build(job: dict, samples: list[list], out: Path, notes: list[str]):
    """Convert by the first route that works; the FP32 and simulated outputs are that route's."""
    failures = []
    for route, torch_model, program in _routes(job, notes):
        try:
            _save_outputs(out / "torch_fp32.npz", _run_torch(torch_model, samples, half=False))
            simulation = _simulate(torch_model, samples, out, program is not None, notes,
                                   job.get("compute", "fp16"))
            mlmodel = _convert(job, torch_model, samples[0], program)
        except Exception as e:
            if program is None:  # the last route: its error is the build's
                raise
            failures.append(f"{route} failed ({_first_line(e)})")
            continue
        notes.extend(f"{f}; used the next route" for f in failures)
        notes.append(f"route: {route}")
        return mlmodel, simulation
    raise AssertionError("unreachable: the ONNX route raises or returns")


def run(job: dict) -> dict:
    _isolate_imports()
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    samples = _load_samples(job["samples"], len(job["inputs"]))
    notes: list[str] = []
    mlmodel, simulation = _build(job, samples, out, notes)
    renamed = _feature_names(mlmodel, job)
    if renamed:
        notes.append("Core ML feature names differ from the source's (coremltools makes them MIL identifiers): "
                     + ", ".join(f"{k} → {v}" for k, v in renamed.items()))
    _describe(mlmodel, job.get("metadata") or {}, renamed)
    package = out / PACKAGE_NAME
    mlmodel.save(str(package))
    make_reproducible(package)
    result = {"mlpackage": str(package), "structure": {**structure(package), "renamed": renamed},
              "torch_fp32": str(out / "torch_fp32.npz"), "simulated": str(out / "simulated.npz"),
              "simulation": simulation, "notes": notes, "predicted": None}
    if sys.platform == "darwin":
        _save_outputs(out / "predicted.npz", _predict(package, job["inputs"], samples, job["outputs"]))
        result["predicted"] = str(out / "predicted.npz")
    return result


if __name__ == "__main__":
    sys.exit(worker_main(run))
