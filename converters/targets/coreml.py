"""Core ML (iOS): an 8-bit-weight ML program package through the ONNX → PyTorch → coremltools route.

One build per minimum iOS version, shared by every profile that asks for it. Besides the profile's floor, the gate
checks that the PyTorch route reproduces the ONNX model and that the package's structure matches the source; where
Core ML cannot predict (off macOS) the fidelity figures come from the build's simulation and the report says so.
"""

from __future__ import annotations

from converters import coreml_int8, onnx_int8
from converters.errors import QuantizationError
from converters.fidelity import cosine_per_sample
from converters.gate import Check, failed
from converters.report import CoremlInfo
from converters.targets.base import Attempt, SharedWork, TargetResult, fidelity, judge_attempt
from firmware_profiles import ArtifactTarget, Profile


class CoremlPass:
    def __init__(self, work: SharedWork):
        self.work = work
        self._builds: dict[tuple[int, str], coreml_int8.CoremlBuild | QuantizationError] = {}

    def run(self, profile: Profile, target: ArtifactTarget) -> TargetResult:
        """FP16 compute first (Core ML's default, what the Neural Engine runs); when only the numbers fail, the same
        8-bit package computing in FP32 (CPU and GPU: a DB text detector's probability map, for one, does not survive
        FP16 accumulation)."""
        ios = coreml_int8.ios_version(target.runtime_versions)
        result = self._judge(profile, self.build(ios, "fp16"))
        numbers = [c for c in failed(result.checks) if c.fixable]
        if numbers and len(numbers) == len(failed(result.checks)):
            try:
                wide = self._judge(profile, self.build(ios, "fp32"))
            except QuantizationError as e:
                result.notes.append(f"FP32 compute was tried after FP16 failed and could not be built ({e})")
                return result
            if not failed(wide.checks):
                wide.notes.append("FP16 compute failed the floor (" + "; ".join(c.line() for c in numbers[:2]) +
                                  "): the package computes in FP32 (CPU and GPU; the Neural Engine runs FP16 only), "
                                  "its weights are still 8-bit")
                return wide
            result.notes.append("FP32 compute was tried after FP16 failed and did not hold the floor either (" +
                                "; ".join(c.line() for c in failed(wide.checks)[:2]) + ")")
        return result

    def _judge(self, profile: Profile, build: coreml_int8.CoremlBuild) -> TargetResult:
        work = self.work
        facts = build.structure
        route = min(float(cosine_per_sample(work.fp32_outputs[n], build.torch_fp32[n]).min())
                    for n in work.fp32_outputs)
        stats = onnx_int8.WeightStats(facts["int8_weight_tensors"], facts["int8_weight_elements"],
                                      len(facts["float_weight_tensors"]), facts["float_weight_elements"], 0, 0)
        attempt = Attempt(onnx_int8.Quantized(build.package, True, [], list(build.notes)), stats,
                          coreml_int8.package_bytes(build.package), fidelity(work.tasks, work.fp32_outputs,
                                                                             build.judged, truth=work.truth))
        checks = judge_attempt(profile, attempt, work.source.size_bytes, latency_ratio=None)
        checks.append(_route_check(route))
        for problem in coreml_int8.structural_problems(work.source, facts, work.evaluation.samples[0]):
            checks.append(Check(name="package structure", value=None, bound=None, passed=False, detail=problem))
        notes = [] if build.predicted else [
            "Core ML numeric fidelity was not measured on this host (prediction needs macOS); the fidelity figures "
            f"are {build.measured_by}; the package's structure was validated (loads, interface matches the source, "
            "8-bit weights)"]
        return TargetResult(attempt, checks, coreml=_coreml_info(build, route), notes=notes)

    def build(self, ios: int, compute: str = "fp16") -> coreml_int8.CoremlBuild:
        """Build once per (minimum iOS version, compute precision); a failure is remembered for the next profile."""
        key = (ios, compute)
        if key not in self._builds:
            self.work.progress(f"converting to Core ML (iOS {ios}+, {compute.upper()} compute)")
            try:
                self._builds[key] = coreml_int8.build(self.work.source, self.work.evaluation.samples,
                                                      self.work.workdir, ios=ios, metadata=self._metadata(),
                                                      compute=compute)
            except QuantizationError as e:
                self._builds[key] = e
        found = self._builds[key]
        if isinstance(found, QuantizationError):
            raise found
        return found

    def _metadata(self) -> dict:
        """What the package says about itself (Xcode shows it; the app can read it)."""
        work, options = self.work, self.work.options
        return {
            "author": options.author, "version": options.model_version, "labels": list(options.labels),
            "short_description": f"{options.model_name} {options.model_version}: 8-bit weights, converted by "
                                 f"edgefleet from ONNX (sha256 {work.source.sha256[:16]}…)",
            "input_descriptions": {i.name: f"{i.describe()}, layout as in the source model"
                                   for i in work.source.inputs},
            "output_descriptions": {o.name: f"{o.describe()} ({work.tasks[o.name].kind.value})"
                                    for o in work.source.outputs},
            "user": {"edgefleet.model": options.model_name, "edgefleet.source_sha256": work.source.sha256,
                     "edgefleet.calibration_sha256": work.calibration.sha256()},
        }


def _route_check(route_cosine: float) -> Check:
    passed = route_cosine >= coreml_int8.ROUTE_MIN_COSINE
    return Check(name="PyTorch route cosine vs ONNX", value=route_cosine, bound=coreml_int8.ROUTE_MIN_COSINE,
                 passed=passed, detail="" if passed else "the ONNX → PyTorch translation changed the model's numbers")


def _coreml_info(build: coreml_int8.CoremlBuild, route_cosine: float) -> CoremlInfo:
    facts = build.structure
    total = facts["int8_weight_elements"] + facts["float_weight_elements"]
    return CoremlInfo(
        minimum_ios=build.ios, model_type=facts["model_type"], spec_version=facts["spec_version"],
        inputs=facts["inputs"], outputs=facts["outputs"], int8_weight_tensors=facts["int8_weight_tensors"],
        int8_weight_fraction=facts["int8_weight_elements"] / total if total else 0.0,
        float_weight_tensors=facts["float_weight_tensors"], ops=facts["ops"], pytorch_route_cosine=route_cosine,
        numeric_fidelity_measured=build.predicted, fidelity_measured_by=build.measured_by,
        conversion_seconds=build.seconds, conversion_peak_rss_mb=build.peak_rss_mb, compute_precision=build.compute)
