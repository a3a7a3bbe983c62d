"""TFLite INT8: onnx2tf → TFLiteConverter with our calibration data, measured under LiteRT against the FP32 .tflite.

One conversion per (I/O type, float-op policy), shared by every profile that asks for it; a conversion that failed
fails the same way for the next profile without being tried again.
"""

from __future__ import annotations

import platform

from converters import onnx_int8, tflite_int8
from converters.errors import QuantizationError
from converters.report import TfliteInfo
from converters.targets.base import Attempt, SharedWork, TargetResult, fidelity, judge_attempt
from firmware_profiles import ArtifactTarget, Profile

LATENCY_WHERE = f"host CPU ({platform.machine()}), LiteRT (XNNPACK), FP32 vs INT8 .tflite, batch 1"
NCHW_LAYOUT = "NHWC (transposed from the ONNX NCHW)"


class TflitePass:
    def __init__(self, work: SharedWork):
        self.work = work
        self._builds: dict[tuple[str, bool], tuple[tflite_int8.TfliteBuild, Attempt] | QuantizationError] = {}

    def run(self, profile: Profile, target: ArtifactTarget) -> TargetResult:
        build, attempt = self.attempt(target.io_type, allow_float_ops=profile.fidelity.max_float_node_fraction > 0)
        checks = judge_attempt(profile, attempt, self.work.source.size_bytes,
                               attempt.latency.ratio if attempt.latency else None)
        info = TfliteInfo(
            io_type=target.io_type,
            input_layouts={n: NCHW_LAYOUT if perm else "as in the ONNX model" for n, perm in build.input_perm.items()},
            float_ops=build.float_ops, conversion_seconds=build.seconds, conversion_peak_rss_mb=build.peak_rss_mb)
        notes = [f"ops left in float in the INT8 model: {', '.join(build.float_ops)}"] if build.float_ops else []
        return TargetResult(attempt, checks, latency_where=LATENCY_WHERE, tflite=info, notes=notes)

    def attempt(self, io_type: str, *, allow_float_ops: bool) -> tuple[tflite_int8.TfliteBuild, Attempt]:
        """Convert once per (I/O type, float-op policy) and measure with LiteRT; profiles share the result."""
        key = (io_type, allow_float_ops)
        if key not in self._builds:
            try:
                self._builds[key] = self._build(io_type, allow_float_ops)
            except QuantizationError as e:  # remembered: the next profile with this scheme fails the same way
                self._builds[key] = e
        found = self._builds[key]
        if isinstance(found, QuantizationError):
            raise found
        return found

    def _build(self, io_type: str, allow_float_ops: bool) -> tuple[tflite_int8.TfliteBuild, Attempt]:
        work = self.work
        work.progress(f"converting to TFLite ({io_type} I/O)")
        build = tflite_int8.build(work.source, work.prepared.path, work.calibration.samples, work.workdir,
                                  io_type=io_type, allow_float_ops=allow_float_ops)
        try:
            int8 = tflite_int8.LiteRTModel(build.int8, build.input_perm, work.options.threads)
            fp32 = tflite_int8.LiteRTModel(build.fp32, build.input_perm, work.options.threads)
            got = int8.run_all(work.evaluation.samples, work.fp32_outputs)
            latency = tflite_int8.compare_latency(fp32, int8, work.evaluation.samples[0],
                                                  runs=work.options.latency_runs)
        except RuntimeError as e:  # LiteRT refuses to run what the converter produced
            raise QuantizationError(f"the INT8 TFLite model fails at inference under LiteRT: "
                                    f"{str(e).splitlines()[0][:300]}") from e
        stats = onnx_int8.WeightStats(int(int8.has_int8_weights()), 0, 0, 0, 0, 0)
        attempt = Attempt(onnx_int8.Quantized(build.int8, True, [], list(build.notes)), stats,
                          build.int8.stat().st_size, fidelity(work.kinds, work.fp32_outputs, got), latency)
        return build, attempt
