"""The per-profile pipeline: the work every target shares, one pass per target format, and the report.

The source's FP32 reference outputs and its pre-processed graph are computed once and read by every pass
(``converters/targets/``); each pass returns its candidate and the report fields of its format, and this module
assembles the report, writes the artifact to ``OUTDIR/<profile>/<artifact name>`` with ``<format>.report.json``
beside it, and writes nothing but the report for a refusal (removing an earlier run's artifact).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from converters import coreml_int8, onnx_int8, runtime
from converters.calibration import DataSet
from converters.errors import CalibrationError, QuantizationError
from converters.gate import failed
from converters.report import ArtifactReport, DataInfo, LatencyInfo, SizeInfo, SourceInfo, Status
from converters.source import SourceModel, model_files, save_model, sha256_file
from converters.targets.base import TargetPass, TargetResult
from converters.targets.coreml import CoremlPass
from converters.targets.onnx import OnnxInt8Pass
from converters.targets.tflite import TflitePass
from converters.tasks import OutputKind, OutputTask, declared, infer_task
from converters.truth import Truth, check_against
from firmware_profiles import ArtifactFormat, ArtifactTarget, Profile, QuantizationScheme

ARTIFACT_NAMES = {ArtifactFormat.ONNX_INT8: "model.int8.onnx", ArtifactFormat.TFLITE_INT8: "model.int8.tflite",
                  ArtifactFormat.COREML_INT8: "model.int8.mlpackage"}


@dataclass(frozen=True)
class ConvertOptions:
    latency_runs: int = 30
    threads: int = 2
    max_rounds: int = 6  # latency rescue: plans of slow kernels kept in float
    search_seconds: float = 240.0  # per scheme, in CPU seconds: the search for what ships stops after this
    search_samples: int = 32  # calibration samples the search scores candidates on
    output_kinds: dict[str, OutputKind] = field(default_factory=dict)  # declared by the user
    inference_calls: int = 8  # calibration samples whose outputs decide each output's task
    # Judge INT8 latency on this host even where its INT8 kernels do not stand for the targets' (x86 without VNNI,
    # see ``runtime.int8_latency_caveat``): for a build host the operator knows to be representative.
    enforce_host_latency: bool = False
    # What the artifact says about itself (Core ML metadata, bundle manifests).
    model_name: str = "model"
    model_version: str = "0.0.0"
    author: str = "edgefleet fleet-convert"
    labels: tuple[str, ...] = ()


ProgressFn = Callable[[str], None]


class Converter:
    """Converts one source model for any number of profiles, sharing the work that profiles have in common.

    It is the passes' ``SharedWork``: the source, its data, and the lazily computed pre-processed graph and FP32
    reference outputs.
    """

    def __init__(self, source: SourceModel, calibration: DataSet, evaluation: DataSet, workdir: Path,
                 options: ConvertOptions | None = None, progress: ProgressFn | None = None,
                 truth: Truth | None = None):
        self.source, self.calibration, self.evaluation = source, calibration, evaluation
        self.workdir, self.options = workdir, options or ConvertOptions()
        self.progress: ProgressFn = progress or (lambda _msg: None)
        self.truth = truth
        if truth is not None:
            check_against(truth, [o.name for o in source.outputs], len(evaluation))
        unknown = sorted(set(self.options.output_kinds) - {o.name for o in source.outputs})
        if unknown:
            raise CalibrationError(f"declared output kind for {', '.join(unknown)}: the model has no such output "
                                   f"(its outputs: {', '.join(o.name for o in source.outputs)})")
        self._tasks: dict[str, OutputTask] | None = None
        self._prepared: onnx_int8.Prepared | None = None
        self._fp32: dict[str, np.ndarray] | None = None
        self._search_fp32: dict[str, np.ndarray] | None = None
        self._fp32_session: ort.InferenceSession | None = None
        self._passes: dict[ArtifactFormat, TargetPass] = {
            ArtifactFormat.ONNX_INT8: OnnxInt8Pass(self), ArtifactFormat.TFLITE_INT8: TflitePass(self),
            ArtifactFormat.COREML_INT8: CoremlPass(self)}

    # ------------------------------------------------------------------ shared work

    @property
    def prepared(self) -> onnx_int8.Prepared:
        if self._prepared is None:
            self.progress("pre-processing (shape inference, graph optimization)")
            self._prepared = onnx_int8.prepare(self.source, self.workdir)
        return self._prepared

    @property
    def fp32_session(self) -> ort.InferenceSession:
        if self._fp32_session is None:
            self._fp32_session = runtime.session(self.source.path, threads=self.options.threads)
        return self._fp32_session

    @property
    def fp32_outputs(self) -> dict[str, np.ndarray]:
        if self._fp32 is None:
            self._fp32 = runtime.run_all(self.fp32_session, self.evaluation.samples)
        return self._fp32

    @property
    def search_samples(self) -> list[dict[str, np.ndarray]]:
        return self.calibration.samples[: self.options.search_samples]

    @property
    def search_fp32(self) -> dict[str, np.ndarray]:
        if self._search_fp32 is None:
            self._search_fp32 = runtime.run_all(self.fp32_session, self.search_samples)
        return self._search_fp32

    @property
    def tasks(self) -> dict[str, OutputTask]:
        """Each output's task: inferred from what it returns on calibration samples, then the user's declarations
        and the truth file's parameters on top."""
        if self._tasks is None:
            self.progress("reading what each output is for")
            names = [o.name for o in self.fp32_session.get_outputs()]
            calls = [dict(zip(names, self.fp32_session.run(names, s), strict=True))
                     for s in self.calibration.samples[: self.options.inference_calls]]
            hints = onnx_int8.output_hints(self.source.path)
            tasks = {}
            for name in names:
                task = infer_task(name, [c[name] for c in calls], **hints.get(name, {}))
                if name in self.options.output_kinds:
                    task = declared(task, self.options.output_kinds[name])
                if self.truth is not None and self.truth.output == name:
                    task = declared(task, self.truth.kind, **self.truth.decoder_params()) \
                        if task.kind is not self.truth.kind or self.truth.decoder_params() else task
                tasks[name] = task
            self._tasks = tasks
        return self._tasks

    # ------------------------------------------------------------------ per profile

    def convert(self, profile: Profile, outdir: Path,
                formats: set[ArtifactFormat] | None = None) -> list[ArtifactReport]:
        """One report per artifact format of ``profile`` (or only those in ``formats``)."""
        reports = []
        for target in profile.artifacts:
            if formats is not None and target.format not in formats:
                continue
            try:
                result = self._passes[target.format].run(profile, target)
                report = self._report(profile, target, result, outdir / profile.id)
            except QuantizationError as e:
                report = ArtifactReport(profile=profile.id, profile_version=profile.version,
                                        format=target.format.value, status=Status.FAILED, shippable=False,
                                        reasons=[str(e)], source=self._source_info())
            report.peak_rss_mb = peak_rss_mb()
            report.write(outdir / profile.id / f"{target.format.value}.report.json")
            reports.append(report)
        return reports

    def _report(self, profile: Profile, target: ArtifactTarget, result: TargetResult,
                outdir: Path) -> ArtifactReport:
        """The pass's result as a report; the artifact written beside it only if every check passed."""
        bad = failed(result.checks)
        a, lat = result.attempt, result.attempt.latency
        report = ArtifactReport(
            profile=profile.id, profile_version=profile.version, format=target.format.value,
            status=Status.REFUSED if bad else Status.SHIPPABLE, shippable=not bad, reasons=[c.line() for c in bad],
            source=self._source_info(),
            calibration=_data_info(self.calibration), evaluation=_data_info(self.evaluation),
            quantization=result.quantization,
            size=SizeInfo(fp32_bytes=self.source.size_bytes, int8_bytes=a.size_bytes,
                          ratio=a.size_bytes / self.source.size_bytes),
            latency=LatencyInfo(fp32_ms=lat.fp32_ms, int8_ms=lat.int8_ms, ratio=lat.ratio, runs=lat.runs,
                                threads=self.options.threads, regression=lat.ratio > 1.0,
                                where=result.latency_where) if lat else None,
            fidelity=a.outputs, mixed_precision=result.mixed_precision, search=result.search, tflite=result.tflite,
            coreml=result.coreml,
            checks=result.checks,
            notes=[*self.source.notes, *(self._prepared.notes if self._prepared else []), *a.quantized.notes,
                   *self.calibration.notes,
                   *(_fallback_notes(target.quantization) if a.quantized.excluded else []),
                   *([f"truth file keys not used by the gate: {', '.join(self.truth.ignored_keys)}"]
                     if self.truth is not None and self.truth.ignored_keys else [])])
        if a.stats.subgraph_float_elements:
            report.notes.append(f"{a.stats.subgraph_float_elements} weights inside If/Loop/Scan subgraphs stay "
                                "float (the quantizer does not enter control flow)")
        if lat and lat.ratio > 1.0:
            report.notes.append(f"latency regression: INT8 {lat.int8_ms:.2f} ms vs FP32 {lat.fp32_ms:.2f} ms on this "
                                f"CPU; profile policy '{profile.fidelity.latency_regression.value}'")
        report.notes.extend(result.notes)
        dest = outdir / ARTIFACT_NAMES[target.format]
        if not bad:
            _copy_model(result.artifact, dest)
            report.artifact = dest.name
            report.artifact_sha256 = coreml_int8.tree_sha256(dest) if dest.is_dir() else sha256_file(dest)
        else:
            _remove(dest)  # never leave an earlier run's artifact beside a refusal
        return report

    def _source_info(self) -> SourceInfo:
        s = self.source
        return SourceInfo(path=str(s.original), sha256=s.sha256, size_bytes=s.size_bytes, opset=s.opset,
                          original_opset=s.original_opset, inputs=[i.describe() for i in s.inputs],
                          outputs=[o.describe() for o in s.outputs])


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (VmHWM), in MB; None where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _fallback_notes(scheme: QuantizationScheme) -> list[str]:
    if scheme.fallback_precision.value == "fp16":
        return ["nodes kept in float run in FP16 on the device (the profile's fallback precision)"]
    return []


def _data_info(d: DataSet) -> DataInfo:
    return DataInfo(origin=d.origin, samples=len(d), sha256=d.sha256(), synthetic=d.synthetic)


def _remove(dest: Path) -> None:
    if dest.is_dir():
        shutil.rmtree(dest)
    elif dest.exists():
        dest.unlink()


def _copy_model(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():  # a Core ML package: replace the whole tree
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    elif src.suffix != ".onnx" or len(model_files(src)) == 1:
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    else:
        save_model(onnx.load(str(src)), dest)
