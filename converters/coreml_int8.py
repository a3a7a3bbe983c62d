"""ONNX → Core ML ``.mlpackage`` with 8-bit weights for ``ios-*`` profiles.

The conversion runs in ``converters.coreml_worker`` (a child process: coremltools and torch stay out of the
converter's own process, and the child's peak RSS is the per-target memory figure). This module prepares the job,
reads the result and turns it into what the pipeline judges:

* **structure**: the package loads as an ML program; its inputs and outputs are the source's (names, shapes); every
  weight tensor at or above the threshold is stored as INT8;
* **the PyTorch route**: the intermediate PyTorch model reproduces the ONNX model in FP32 (catches a wrong op
  translation before anyone blames quantization);
* **fidelity**: on macOS, the package's own predictions; elsewhere a host simulation (INT8 weights as Core ML stores
  them, FP16 compute), reported as a simulation — Core ML's numerics were not measured on this host. A model whose
  numbers do not survive FP16 compute is built again computing in FP32 (the pass decides, the report says so).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converters.calibration import Sample
from converters.source import SourceModel
from converters.workers import run_worker

WORKER_TIMEOUT_S = 1200
MIN_IOS = 16  # constexpr (compressed) weights need the iOS 16 ML program opset
ROUTE_MIN_COSINE = 0.9999  # the FP32 PyTorch route must reproduce the ONNX model to this


@dataclass
class CoremlBuild:
    package: Path
    ios: int
    structure: dict
    torch_fp32: dict[str, np.ndarray]  # the FP32 PyTorch route, per ONNX output name
    judged: dict[str, np.ndarray]  # what the fidelity figures compare: predictions on macOS, else the simulation
    measured_by: str
    predicted: bool  # True when ``judged`` came from Core ML itself
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    compute: str = "fp16"


def ios_version(runtime_versions: str) -> int:
    """The minimum iOS a profile's ``runtime_versions`` (e.g. ``>=16``) allows; Core ML 8-bit weights need 16+."""
    m = re.search(r">=?\s*(\d+)", runtime_versions)
    version = int(m.group(1)) if m else MIN_IOS
    return max(version, MIN_IOS)


def build(source: SourceModel, samples: list[Sample], workdir: Path, *, ios: int, metadata: dict,
          compute: str = "fp16") -> CoremlBuild:
    """``compute``: the precision the package computes in — "fp16" (Core ML's default; what the Neural Engine runs)
    or "fp32" (CPU and GPU only, for models whose numbers do not fit FP16). Weights are 8-bit either way."""
    out = workdir / f"coreml-ios{ios}-{compute}"
    out.mkdir(parents=True, exist_ok=True)
    names = [i.name for i in source.inputs]
    np.savez(out / "samples.npz", **{f"s{i}_{k}": s[n] for i, s in enumerate(samples) for k, n in enumerate(names)})
    job = {"onnx": str(source.path), "out": str(out), "samples": str(out / "samples.npz"), "inputs": names,
           "outputs": [o.name for o in source.outputs], "target": ios, "metadata": metadata, "compute": compute,
           "pt2": str(source.original) if source.original.suffix == ".pt2" else None}
    result, seconds = run_worker("converters.coreml_worker", job, out, what="Core ML conversion",
                                 timeout_s=WORKER_TIMEOUT_S)
    outputs = [o.name for o in source.outputs]
    predicted = result["predicted"] is not None
    return CoremlBuild(
        package=Path(result["mlpackage"]), ios=ios, structure=result["structure"],
        torch_fp32=_named(result["torch_fp32"], outputs), judged=_named(result["predicted"] or result["simulated"],
                                                                        outputs),
        measured_by="Core ML predictions on macOS" if predicted else f"simulated: {result['simulation']}",
        predicted=predicted, notes=result["notes"], seconds=seconds, peak_rss_mb=result["peak_rss_mb"],
        compute=compute)


def _named(npz: str, outputs: list[str]) -> dict[str, np.ndarray]:
    with np.load(npz) as z:
        return {name: z[str(k)] for k, name in enumerate(outputs)}


def package_files(package: Path) -> list[Path]:
    """Every file of a package, in a stable order."""
    return sorted((p for p in package.rglob("*") if p.is_file()), key=lambda p: p.relative_to(package).as_posix())


def package_bytes(package: Path) -> int:
    return sum(p.stat().st_size for p in package_files(package))


def tree_sha256(package: Path) -> str:
    """One hash for a directory artifact: sha256 over its sorted ``relative/path\\0sha256\\n`` lines."""
    from converters.source import sha256_file

    digest = hashlib.sha256()
    for p in package_files(package):
        digest.update(f"{p.relative_to(package).as_posix()}\0{sha256_file(p)}\n".encode())
    return digest.hexdigest()


def structural_problems(source: SourceModel, facts: dict, example: Sample) -> list[str]:
    """What is wrong with the package's structure, as sentences; empty when it is what the source promised."""
    problems = []
    if facts["model_type"] != "mlProgram":
        problems.append(f"the package is a {facts['model_type']}, not an ML program")
    renamed = facts.get("renamed") or {}  # source name → the Core ML name coremltools made of it
    want_in = {renamed.get(i.name, i.name): list(example[i.name].shape) for i in source.inputs}
    got_in = {n: f["shape"] for n, f in facts["inputs"].items()}
    if want_in != got_in:
        problems.append(f"inputs {got_in} differ from the source's {want_in}")
    want_out = [renamed.get(o.name, o.name) for o in source.outputs]
    if sorted(facts["outputs"]) != sorted(want_out):
        problems.append(f"outputs {sorted(facts['outputs'])} differ from the source's {sorted(want_out)}")
    if facts["float_weight_tensors"]:
        problems.append(f"{len(facts['float_weight_tensors'])} weight tensor(s) were not stored as 8-bit: "
                        + ", ".join(facts["float_weight_tensors"][:5]))
    return problems
