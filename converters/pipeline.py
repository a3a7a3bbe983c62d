"""The per-profile pipeline: quantize, measure, gate; below the floor, buy fidelity back with mixed precision.

Profiles with the same quantization scheme share their attempts (two Jetsons quantize identically); each profile
then applies its own floor. Artifacts land in ``OUTDIR/<profile>/model.int8.onnx`` with ``onnx-int8.report.json``
beside them; a refused artifact is not written at all, only its report.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from converters import coreml_int8, onnx_int8, runtime, tflite_int8
from converters.calibration import DataSet
from converters.errors import QuantizationError
from converters.fidelity import OutputFidelity, OutputKind, cosine_per_sample, output_fidelity
from converters.gate import Check, Measured, failed, fixable, judge
from converters.report import (
    ArtifactReport,
    CoremlInfo,
    DataInfo,
    LatencyInfo,
    MixedPrecision,
    QuantizationInfo,
    SizeInfo,
    SourceInfo,
    Status,
    TfliteInfo,
)
from converters.sensitivity import rank_tensors
from converters.source import SourceModel, model_files, save_model, sha256_file
from firmware_profiles import ArtifactFormat, ArtifactTarget, Profile, QuantizationScheme

log = logging.getLogger(__name__)

ARTIFACT_NAMES = {ArtifactFormat.ONNX_INT8: "model.int8.onnx", ArtifactFormat.TFLITE_INT8: "model.int8.tflite",
                  ArtifactFormat.COREML_INT8: "model.int8.mlpackage"}
LATENCY_WHERE = {
    ArtifactFormat.ONNX_INT8: f"host CPU ({platform.machine()}), ONNX Runtime CPU EP, batch 1",
    ArtifactFormat.TFLITE_INT8: f"host CPU ({platform.machine()}), LiteRT (XNNPACK), FP32 vs INT8 .tflite, batch 1",
}
# Tensors whose median slice SQNR is below this are candidates for float; above it, quantization is harmless.
DAMAGE_CANDIDATE_DB = 30.0
# Latency rescue: float the fewest slow INT8 kernels covering these shares of the integer-kernel time.
LATENCY_SHARES = (0.5, 0.75, 0.9, 0.95)


@dataclass(frozen=True)
class ConvertOptions:
    latency_runs: int = 30
    threads: int = 2
    max_rounds: int = 6  # mixed-precision attempts per scheme, beyond the all-INT8 one
    sensitivity_samples: int = 16
    output_kinds: dict[str, OutputKind] = field(default_factory=dict)
    # What the artifact says about itself (Core ML metadata, bundle manifests).
    model_name: str = "model"
    model_version: str = "0.0.0"
    author: str = "edgefleet fleet-convert"
    labels: tuple[str, ...] = ()


@dataclass
class Attempt:
    """One quantization of the prepared model with a set of nodes kept in float, and what it measured."""

    quantized: onnx_int8.Quantized
    stats: onnx_int8.WeightStats
    size_bytes: int
    outputs: list[OutputFidelity]
    latency: runtime.Latency | None = None


ProgressFn = Callable[[str], None]


class Converter:
    """Converts one source model for any number of profiles, sharing the work that profiles have in common."""

    def __init__(self, source: SourceModel, calibration: DataSet, evaluation: DataSet, workdir: Path,
                 options: ConvertOptions | None = None, progress: ProgressFn | None = None):
        self.source, self.calibration, self.evaluation = source, calibration, evaluation
        self.workdir, self.options = workdir, options or ConvertOptions()
        self._progress = progress or (lambda _msg: None)
        self._prepared: onnx_int8.Prepared | None = None
        self._fp32: dict[str, np.ndarray] | None = None
        self._fp32_session = None
        self._attempts: dict[tuple[str, frozenset[str]], Attempt] = {}
        self._rankings: dict[str, list[str]] = {}
        self._tflite: dict[tuple[str, bool], tuple[tflite_int8.TfliteBuild, Attempt] | QuantizationError] = {}
        self._coreml: dict[int, coreml_int8.CoremlBuild | QuantizationError] = {}
        self.kinds = onnx_int8.output_kinds(source.path, self.options.output_kinds)

    # ------------------------------------------------------------------ shared work

    @property
    def prepared(self) -> onnx_int8.Prepared:
        if self._prepared is None:
            self._progress("pre-processing (shape inference, graph optimization)")
            self._prepared = onnx_int8.prepare(self.source, self.workdir)
        return self._prepared

    @property
    def fp32_outputs(self) -> dict[str, np.ndarray]:
        if self._fp32 is None:
            self._fp32_session = runtime.session(self.source.path, threads=self.options.threads)
            self._fp32 = runtime.run_all(self._fp32_session, self.evaluation.samples)
        return self._fp32

    def attempt(self, scheme: QuantizationScheme, exclude: frozenset[str]) -> Attempt:
        key = (_scheme_key(scheme), exclude)
        if key not in self._attempts:
            n = len(self._attempts)
            out = self.workdir / _scheme_key(scheme) / f"attempt{n}.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            self._progress(f"quantizing ({len(exclude)} nodes in float)")
            q = onnx_int8.quantize(self.prepared, self.calibration.samples, scheme, out, exclude=exclude,
                                   external_data=self.source.external_data)
            sess = runtime.session(out, threads=self.options.threads)
            int8 = runtime.run_all(sess, self.evaluation.samples)
            outputs = [output_fidelity(name, self.kinds[name], ref, int8[name])
                       for name, ref in self.fp32_outputs.items()]
            size = sum(p.stat().st_size for p in model_files(out))
            self._attempts[key] = Attempt(q, onnx_int8.weight_stats(out), size, outputs)
        return self._attempts[key]

    def measure_latency(self, attempt: Attempt) -> runtime.Latency:
        if attempt.latency is None:
            self._progress("timing FP32 vs INT8")
            _ = self.fp32_outputs
            int8 = runtime.session(attempt.quantized.path, threads=self.options.threads)
            attempt.latency = runtime.compare_latency(self._fp32_session, int8, self.evaluation.samples[0],
                                                      runs=self.options.latency_runs)
        return attempt.latency

    def ranking(self, scheme: QuantizationScheme, full: Attempt) -> list[str]:
        """Quantized tensors, most damaged first (measured once per scheme)."""
        key = _scheme_key(scheme)
        if key not in self._rankings:
            self._progress("measuring per-tensor quantization damage")
            samples = self.calibration.samples[: self.options.sensitivity_samples]
            damage = rank_tensors(self.prepared.path, full.quantized.path, samples)
            self._rankings[key] = [d.tensor for d in damage if d.median_slice_sqnr_db < DAMAGE_CANDIDATE_DB]
        return self._rankings[key]

    # ------------------------------------------------------------------ per profile

    def convert(self, profile: Profile, outdir: Path) -> list[ArtifactReport]:
        reports = []
        builders = {ArtifactFormat.ONNX_INT8: self._convert_onnx, ArtifactFormat.TFLITE_INT8: self._convert_tflite,
                    ArtifactFormat.COREML_INT8: self._convert_coreml}
        for target in profile.artifacts:
            try:
                report = builders[target.format](profile, target, outdir / profile.id)
            except QuantizationError as e:
                report = ArtifactReport(profile=profile.id, profile_version=profile.version,
                                        format=target.format.value, status=Status.FAILED, shippable=False,
                                        reasons=[str(e)], source=self._source_info())
            report.write(outdir / profile.id / f"{target.format.value}.report.json")
            reports.append(report)
        return reports

    def _judge(self, profile: Profile, a: Attempt, *, with_latency: bool) -> list[Check]:
        latency = self.measure_latency(a).ratio if with_latency else None
        measured = Measured(outputs=a.outputs, artifact_bytes=a.size_bytes, source_bytes=self.source.size_bytes,
                            quantized_tensors=a.stats.quantized_tensors,
                            source_has_weights=a.stats.quantized_elements + a.stats.float_elements
                            + a.stats.subgraph_float_elements > 0, latency_ratio=latency)
        return judge(measured, profile.fidelity, max_artifact_bytes=int(profile.memory.max_artifact_mb * 1e6))

    def _convert_onnx(self, profile: Profile, target: ArtifactTarget, outdir: Path) -> ArtifactReport:
        scheme = target.quantization
        self._progress(f"{profile.id}: quantizing")
        full = self.attempt(scheme, frozenset())
        checks = self._judge(profile, full, with_latency=False)
        if not failed(checks):  # timing is only worth its cost for a candidate that is otherwise good
            checks = self._judge(profile, full, with_latency=True)
        chosen, mixed = full, None
        if failed(checks) and fixable(checks):
            chosen, checks, mixed = self._mixed_precision(profile, scheme, full, checks)
        return self._finish(profile, target, chosen, checks, mixed, outdir)

    def _mixed_precision(self, profile: Profile, scheme: QuantizationScheme, full: Attempt,
                         full_checks: list[Check]) -> tuple[Attempt, list[Check], MixedPrecision | None]:
        """Keep the most damaging nodes in float until the floor is met, within the profile's budget."""
        budget = max(1, int(profile.fidelity.max_float_node_fraction * self.prepared.compute_nodes))
        if any(c.name.startswith("latency") for c in failed(full_checks)):
            plans = self._latency_plans(full)
        else:
            plans = self._fidelity_plans(scheme, full)
        rounds = 0
        last: tuple[Attempt, list[Check]] = (full, full_checks)
        for why, nodes in plans:
            cost = onnx_int8.compute_nodes(self.prepared.graph, nodes)
            if cost > budget:
                log.info("%s: %d float compute nodes exceed the budget of %d", profile.id, cost, budget)
                break
            rounds += 1
            a = self.attempt(scheme, nodes)
            checks = self._judge(profile, a, with_latency=False)
            if not failed(checks):
                checks = self._judge(profile, a, with_latency=True)
            last = (a, checks)
            if not failed(checks):
                full_lat = self.measure_latency(full)
                mixed = MixedPrecision(
                    float_nodes=sorted(nodes), float_node_fraction=cost / self.prepared.compute_nodes,
                    rounds=rounds, why=why, full_int8_failed=[c.line() for c in failed(full_checks)],
                    size_cost_bytes=a.size_bytes - full.size_bytes,
                    latency_cost_ms=self.measure_latency(a).int8_ms - full_lat.int8_ms)
                return a, checks, mixed
            if not fixable(checks):
                break
        attempt, checks = last
        if attempt is not full:
            checks = [*checks, Check(name="mixed precision", value=None, bound=None, passed=False,
                                     detail=f"{rounds} round(s) keeping up to {len(attempt.quantized.excluded)} "
                                            f"nodes in float (budget: {budget} compute nodes) did not reach "
                                            "the floor")]
        return attempt, checks, None

    # ------------------------------------------------------------------ TFLite

    def _tflite_attempt(self, io_type: str, allow_float_ops: bool) -> tuple[tflite_int8.TfliteBuild, Attempt]:
        """Convert once per (I/O type, float-op policy) and measure with LiteRT; profiles share the result."""
        key = (io_type, allow_float_ops)
        if key not in self._tflite:
            try:
                self._tflite[key] = self._build_tflite(io_type, allow_float_ops)
            except QuantizationError as e:  # remembered: the next profile with this scheme fails the same way
                self._tflite[key] = e
        found = self._tflite[key]
        if isinstance(found, QuantizationError):
            raise found
        return found

    def _build_tflite(self, io_type: str, allow_float_ops: bool) -> tuple[tflite_int8.TfliteBuild, Attempt]:
        self._progress(f"converting to TFLite ({io_type} I/O)")
        build = tflite_int8.build(self.source, self.prepared.path, self.calibration.samples, self.workdir,
                                  io_type=io_type, allow_float_ops=allow_float_ops)
        try:
            int8 = tflite_int8.LiteRTModel(build.int8, build.input_perm, self.options.threads)
            fp32 = tflite_int8.LiteRTModel(build.fp32, build.input_perm, self.options.threads)
            got = int8.run_all(self.evaluation.samples, self.fp32_outputs)
            latency = tflite_int8.compare_latency(fp32, int8, self.evaluation.samples[0],
                                                  runs=self.options.latency_runs)
        except RuntimeError as e:  # LiteRT refuses to run what the converter produced
            raise QuantizationError(f"the INT8 TFLite model fails at inference under LiteRT: "
                                    f"{str(e).splitlines()[0][:300]}") from e
        outputs = [output_fidelity(n, self.kinds[n], ref, got[n]) for n, ref in self.fp32_outputs.items()]
        stats = onnx_int8.WeightStats(int(int8.has_int8_weights()), 0, 0, 0, 0, 0)
        attempt = Attempt(onnx_int8.Quantized(build.int8, True, [], list(build.notes)), stats,
                          build.int8.stat().st_size, outputs, latency)
        return build, attempt

    def _convert_tflite(self, profile: Profile, target: ArtifactTarget, outdir: Path) -> ArtifactReport:
        build, attempt = self._tflite_attempt(target.io_type, profile.fidelity.max_float_node_fraction > 0)
        checks = self._judge(profile, attempt, with_latency=True)
        report = self._finish(profile, target, attempt, checks, None, outdir)
        report.tflite = TfliteInfo(
            io_type=target.io_type,
            input_layouts={n: ("NHWC (transposed from the ONNX NCHW)" if p else "as in the ONNX model")
                           for n, p in build.input_perm.items()},
            float_ops=build.float_ops, conversion_seconds=build.seconds, conversion_peak_rss_mb=build.peak_rss_mb)
        if build.float_ops:
            report.notes.append(f"ops left in float in the INT8 model: {', '.join(build.float_ops)}")
        return report

    # ------------------------------------------------------------------ Core ML

    def _coreml_build(self, ios: int) -> coreml_int8.CoremlBuild:
        if ios not in self._coreml:
            self._progress(f"converting to Core ML (iOS {ios}+)")
            try:
                self._coreml[ios] = coreml_int8.build(self.source, self.evaluation.samples, self.workdir, ios=ios,
                                                      metadata=self._coreml_metadata())
            except QuantizationError as e:
                self._coreml[ios] = e
        found = self._coreml[ios]
        if isinstance(found, QuantizationError):
            raise found
        return found

    def _coreml_metadata(self) -> dict:
        o = self.options
        return {
            "author": o.author, "version": o.model_version, "labels": list(o.labels),
            "short_description": f"{o.model_name} {o.model_version}: 8-bit weights, converted by edgefleet from "
                                 f"ONNX (sha256 {self.source.sha256[:16]}…)",
            "input_descriptions": {i.name: f"{i.describe()}, layout as in the source model"
                                   for i in self.source.inputs},
            "output_descriptions": {o_.name: f"{o_.describe()} ({self.kinds[o_.name].value})"
                                    for o_ in self.source.outputs},
            "user": {"edgefleet.model": o.model_name, "edgefleet.source_sha256": self.source.sha256,
                     "edgefleet.calibration_sha256": self.calibration.sha256()},
        }

    def _convert_coreml(self, profile: Profile, target: ArtifactTarget, outdir: Path) -> ArtifactReport:
        build = self._coreml_build(coreml_int8.ios_version(target.runtime_versions))
        facts = build.structure
        route = min(float(cosine_per_sample(self.fp32_outputs[n], build.torch_fp32[n]).min())
                    for n in self.fp32_outputs)
        outputs = [output_fidelity(n, self.kinds[n], ref, build.judged[n]) for n, ref in self.fp32_outputs.items()]
        size = coreml_int8.package_bytes(build.package)
        stats = onnx_int8.WeightStats(facts["int8_weight_tensors"], facts["int8_weight_elements"],
                                      len(facts["float_weight_tensors"]), facts["float_weight_elements"], 0, 0)
        attempt = Attempt(onnx_int8.Quantized(build.package, True, [], list(build.notes)), stats, size, outputs)
        checks = self._judge(profile, attempt, with_latency=False)
        checks.append(Check(name="PyTorch route cosine vs ONNX", value=route, bound=coreml_int8.ROUTE_MIN_COSINE,
                            passed=route >= coreml_int8.ROUTE_MIN_COSINE,
                            detail="" if route >= coreml_int8.ROUTE_MIN_COSINE else
                            "the ONNX → PyTorch translation changed the model's numbers"))
        for problem in coreml_int8.structural_problems(self.source, facts, self.evaluation.samples[0]):
            checks.append(Check(name="package structure", value=None, bound=None, passed=False, detail=problem))
        report = self._finish(profile, target, attempt, checks, None, outdir)
        total = facts["int8_weight_elements"] + facts["float_weight_elements"]
        report.coreml = CoremlInfo(
            minimum_ios=build.ios, model_type=facts["model_type"], spec_version=facts["spec_version"],
            inputs=facts["inputs"], outputs=facts["outputs"], int8_weight_tensors=facts["int8_weight_tensors"],
            int8_weight_fraction=facts["int8_weight_elements"] / total if total else 0.0,
            float_weight_tensors=facts["float_weight_tensors"], ops=facts["ops"], pytorch_route_cosine=route,
            numeric_fidelity_measured=build.predicted, fidelity_measured_by=build.measured_by,
            conversion_seconds=build.seconds, conversion_peak_rss_mb=build.peak_rss_mb)
        if not build.predicted:
            report.notes.append("Core ML numeric fidelity was not measured on this host (prediction needs macOS); "
                                f"the fidelity figures are {build.measured_by}; the package's structure was "
                                "validated (loads, interface matches the source, 8-bit weights)")
        return report

    def _fidelity_plans(self, scheme: QuantizationScheme, full: Attempt) -> list[tuple[str, frozenset[str]]]:
        """Mixed-range output tails first, then the most damaged tensors: 1, 2, 4, ... of them."""
        plans: list[tuple[str, frozenset[str]]] = []
        tails = {n for o in full.outputs if o.ranges for n in onnx_int8.output_tail(self.prepared.graph, o.name)}
        if tails:
            plans.append(("mixed-range output: its assembling tail kept in float", frozenset(tails)))
        ranked = self.ranking(scheme, full)
        k = 1
        while k <= len(ranked) and len(plans) < self.options.max_rounds:
            nodes = frozenset(onnx_int8.neighbours(self.prepared.graph, ranked[:k])) | frozenset(tails)
            plans.append((f"{k} most damaged tensor(s) kept in float (measured per-slice SQNR)", nodes))
            k *= 2
        return plans

    def _latency_plans(self, full: Attempt) -> list[tuple[str, frozenset[str]]]:
        """INT8 slower than the profile allows: the slowest integer kernels (measured) go back to float.

        Each plan floats the fewest kernels that together took 50%, 75%, 90% or 95% of the integer-kernel time;
        at least one kernel always stays INT8 (floating them all would ship a float model as INT8).
        """
        self._progress("profiling INT8 kernels")
        times = runtime.integer_node_times(full.quantized.path, self.evaluation.samples[0],
                                           threads=self.options.threads)
        known = {n.name for n in self.prepared.graph.graph.node}
        ranked = [n for n in sorted(times, key=times.__getitem__, reverse=True) if n in known]
        total = sum(times[n] for n in ranked)
        plans: list[tuple[str, frozenset[str]]] = []
        for share in LATENCY_SHARES:
            k, covered = 0, 0.0
            while k < len(ranked) - 1 and covered < share * total:
                covered += times[ranked[k]]
                k += 1
            nodes = frozenset(ranked[:k])
            if k and all(nodes != p for _, p in plans):
                plans.append((f"{k} slowest INT8 kernel(s), {covered / total:.0%} of integer-kernel time, kept in "
                              "float (measured per node)", nodes))
        return plans[: self.options.max_rounds]

    def _finish(self, profile: Profile, target: ArtifactTarget, a: Attempt, checks: list[Check],
                mixed: MixedPrecision | None, outdir: Path) -> ArtifactReport:
        bad = failed(checks)
        status = Status.REFUSED if bad else Status.SHIPPABLE
        scheme = target.quantization
        lat = a.latency
        onnx = target.format is ArtifactFormat.ONNX_INT8  # TFLite reports carry their own section instead
        report = ArtifactReport(
            profile=profile.id, profile_version=profile.version, format=target.format.value, status=status,
            shippable=not bad, reasons=[c.line() for c in bad],
            source=self._source_info(),
            calibration=_data_info(self.calibration), evaluation=_data_info(self.evaluation),
            quantization=QuantizationInfo(
                format=scheme.format.value, per_channel_requested=scheme.per_channel,
                per_channel_used=a.quantized.per_channel, activation_type=scheme.activation_type.value,
                weight_type=scheme.weight_type.value, activation_symmetric=scheme.activation_symmetric,
                weight_symmetric=scheme.weight_symmetric, calibration_method=scheme.calibration_method.value,
                quantized_weight_tensors=a.stats.quantized_tensors, float_weight_tensors=a.stats.float_tensors,
                quantized_weight_fraction=a.stats.quantized_fraction,
                subgraph_float_weights=a.stats.subgraph_float_elements, qdq_nodes=a.stats.qdq_nodes) if onnx else None,
            size=SizeInfo(fp32_bytes=self.source.size_bytes, int8_bytes=a.size_bytes,
                          ratio=a.size_bytes / self.source.size_bytes),
            latency=LatencyInfo(fp32_ms=lat.fp32_ms, int8_ms=lat.int8_ms, ratio=lat.ratio, runs=lat.runs,
                                threads=self.options.threads, regression=lat.ratio > 1.0,
                                where=LATENCY_WHERE[target.format]) if lat else None,
            fidelity=a.outputs, mixed_precision=mixed, checks=checks,
            notes=[*self.source.notes, *(self._prepared.notes if self._prepared else []), *a.quantized.notes,
                   *self.calibration.notes,
                   *(self._fallback_notes(scheme) if a.quantized.excluded else [])])
        if a.stats.subgraph_float_elements:
            report.notes.append(f"{a.stats.subgraph_float_elements} weights inside If/Loop/Scan subgraphs stay "
                                "float (the quantizer does not enter control flow)")
        if lat and lat.ratio > 1.0:
            report.notes.append(f"latency regression: INT8 {lat.int8_ms:.2f} ms vs FP32 {lat.fp32_ms:.2f} ms on this "
                                f"CPU; profile policy '{profile.fidelity.latency_regression.value}'")
        dest = outdir / ARTIFACT_NAMES[target.format]
        if not bad:
            _copy_model(a.quantized.path, dest)
            report.artifact = dest.name
            report.artifact_sha256 = coreml_int8.tree_sha256(dest) if dest.is_dir() else sha256_file(dest)
        elif dest.is_dir():  # never leave an earlier run's artifact beside a refusal
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        return report

    def _fallback_notes(self, scheme: QuantizationScheme) -> list[str]:
        if scheme.fallback_precision.value == "fp16":
            return ["nodes kept in float run in FP16 on the device (the profile's fallback precision)"]
        return []

    def _source_info(self) -> SourceInfo:
        s = self.source
        return SourceInfo(path=str(s.original), sha256=s.sha256, size_bytes=s.size_bytes, opset=s.opset,
                          original_opset=s.original_opset, inputs=[i.describe() for i in s.inputs],
                          outputs=[o.describe() for o in s.outputs])


def _scheme_key(scheme: QuantizationScheme) -> str:
    return hashlib.sha256(scheme.model_dump_json().encode()).hexdigest()[:12]


def _data_info(d: DataSet) -> DataInfo:
    return DataInfo(origin=d.origin, samples=len(d), sha256=d.sha256(), synthetic=d.synthetic)


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
