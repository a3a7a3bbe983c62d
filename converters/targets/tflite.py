"""TFLite INT8: onnx2tf → TFLiteConverter with our calibration data, measured under LiteRT against the FP32 .tflite.

One conversion per (I/O type, float-op policy), shared by every profile that asks for it; a conversion that failed
fails the same way for the next profile without being tried again. Where the profile allows float ops, the
conversion also yields further variants from the same calibration: float-elementwise
(``tflite_worker.ELEMENTWISE_FLOAT_OPS`` in float), then float-outlier-layers (also the weight-bearing ops whose
calibrated output range dwarfs the others', ``tflite_tail.outlier_layers``). They are measured only when full INT8
fails the profile's gate on checks mixed precision can fix, in that order, and the first that passes ships.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

from converters import onnx_int8, tflite_int8, tflite_prepare
from converters.errors import QuantizationError
from converters.gate import Check, failed, fixable
from converters.report import TfliteInfo
from converters.runtime import Latency
from converters.targets.base import Attempt, SharedWork, TargetResult, fidelity, judge_attempt
from firmware_profiles import ArtifactTarget, Profile

LATENCY_WHERE = f"host CPU ({platform.machine()}), LiteRT (XNNPACK), FP32 vs INT8 .tflite, batch 1"
NCHW_LAYOUT = "NHWC (transposed from the ONNX NCHW)"


@dataclass
class Measured:
    """One .tflite candidate measured under LiteRT."""

    attempt: Attempt
    float_ops: list[str]


class TflitePass:
    def __init__(self, work: SharedWork):
        self.work = work
        self._builds: dict[tuple[str, bool], tuple[tflite_int8.TfliteBuild, Attempt] | QuantizationError] = {}
        self._variants: dict[tuple[str, bool, str], Measured | str] = {}  # str: why it could not be measured
        self._prepared: tflite_prepare.TflitePrepared | None = None

    def run(self, profile: Profile, target: ArtifactTarget) -> TargetResult:
        allow_float_ops = profile.fidelity.max_float_weight_fraction > 0
        build, attempt = self.attempt(target.io_type, allow_float_ops=allow_float_ops)
        checks = self._judge(profile, attempt)
        float_ops, notes, variant = build.float_ops, [], "full-int8"
        if allow_float_ops and fixable(checks):
            chosen = self._try_variant(profile, (target.io_type, allow_float_ops), build, checks)
            notes.append(chosen.note)
            if chosen.measured is not None:
                attempt, checks, float_ops = chosen.measured.attempt, chosen.checks, chosen.measured.float_ops
                variant = chosen.name
        info = TfliteInfo(
            io_type=target.io_type,
            input_layouts={n: NCHW_LAYOUT if perm else "as in the ONNX model" for n, perm in build.input_perm.items()},
            float_ops=float_ops, variant=variant, conversion_seconds=build.seconds,
            conversion_peak_rss_mb=build.peak_rss_mb)
        if float_ops:
            notes.insert(0, f"ops left in float in the INT8 model: {', '.join(float_ops)}")
        return TargetResult(attempt, checks, latency_where=LATENCY_WHERE, tflite=info, notes=notes)

    def _judge(self, profile: Profile, attempt: Attempt) -> list[Check]:
        return judge_attempt(profile, attempt, self.work.source.size_bytes,
                             attempt.latency.ratio if attempt.latency else None)

    def _try_variant(self, profile: Profile, key: tuple[str, bool], build: tflite_int8.TfliteBuild,
                     full_checks: list[Check]) -> VariantChoice:
        """Judge the build's variants in order (float-elementwise, then float-outlier-layers, fewest float layers
        first) after full INT8 failed ``full_checks``; ship the first that passes. The next is judged only while the
        last one failed on checks more float precision can fix."""
        why = "; ".join(c.line() for c in failed(full_checks))
        tried: list[str] = []
        for variant in build.variants:
            measured = self._variant(key, build, variant)
            if isinstance(measured, str):
                tried.append(f"{variant.label}: {measured}")
                continue
            checks = self._judge(profile, measured.attempt)
            if not failed(checks):
                return VariantChoice(measured, checks, variant.name, _shipped_note(variant, why, tried))
            tried.append(f"{variant.label} failed too ({'; '.join(c.line() for c in failed(checks))})")
            if not fixable(checks):
                break
        tried += build.variant_notes
        variants = "; ".join(tried) if tried else "no variant was built"
        return VariantChoice(None, [], "full-int8", f"full INT8 failed ({why}); variants tried: {variants}; "
                                                    "reported: full INT8")

    def _variant(self, key: tuple[str, bool], build: tflite_int8.TfliteBuild,
                 variant: tflite_int8.FloatVariant) -> Measured | str:
        """A variant measured under LiteRT once per build, on first need; a string says why it could not be."""
        cache = (*key, str(variant.path))
        if cache not in self._variants:
            self.work.progress(f"measuring the {variant.label} TFLite variant")
            try:
                attempt = self._measure(build, variant.path, [*build.notes, *variant.notes])
                self._variants[cache] = Measured(attempt, variant.float_ops)
            except QuantizationError as e:
                self._variants[cache] = f"could not be measured: {e}"
        return self._variants[cache]

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

    def _prepared_graph(self) -> tflite_prepare.TflitePrepared:
        """Pinned and folded once for every (I/O type, float-op policy); not the ONNX pass's graph, whose dynamic
        dimensions onnx2tf cannot convert."""
        if self._prepared is None:
            work = self.work
            work.progress("pinning input shapes from the data and folding the graph for TFLite")
            self._prepared = tflite_prepare.prepare(work.source, work.calibration.samples + work.evaluation.samples,
                                                    work.workdir / "tflite")
        return self._prepared

    def _build(self, io_type: str, allow_float_ops: bool) -> tuple[tflite_int8.TfliteBuild, Attempt]:
        work = self.work
        work.progress(f"converting to TFLite ({io_type} I/O)")
        # The evaluation samples run through the same static-shape model, so they must share the pinned shapes.
        prepared = self._prepared_graph()
        build = tflite_int8.build(work.source, prepared.path, work.calibration.samples, work.workdir,
                                  io_type=io_type, allow_float_ops=allow_float_ops)
        build.notes[:0] = prepared.notes
        return build, self._measure(build, build.int8, list(build.notes))

    def _measure(self, build: tflite_int8.TfliteBuild, path, notes: list[str]) -> Attempt:
        """``path`` (an INT8 .tflite of ``build``) under LiteRT: task fidelity and latency against the FP32 .tflite."""
        work = self.work
        try:
            int8 = tflite_int8.LiteRTModel(path, build.input_perm, work.options.threads)
            fp32 = tflite_int8.LiteRTModel(build.fp32, build.input_perm, work.options.threads)
            got = int8.run_all(work.evaluation.samples, work.fp32_outputs)
            latency: Latency = tflite_int8.compare_latency(fp32, int8, work.evaluation.samples[0],
                                                           runs=work.options.latency_runs)
        except RuntimeError as e:  # LiteRT refuses to run what the converter produced
            raise QuantizationError(f"the INT8 TFLite model fails at inference under LiteRT: "
                                    f"{str(e).splitlines()[0][:300]}") from e
        stats = onnx_int8.WeightStats(int(int8.has_int8_weights()), 0, 0, 0, 0, 0)
        return Attempt(onnx_int8.Quantized(path, True, [], notes), stats, path.stat().st_size,
                       fidelity(work.tasks, work.fp32_outputs, got, truth=work.truth), latency)


@dataclass
class VariantChoice:
    """What the variant step decided: the variant to ship (None: keep full INT8), its name and the report's note."""

    measured: Measured | None
    checks: list[Check]
    name: str
    note: str


def _shipped_note(variant: tflite_int8.FloatVariant, why: str, tried: list[str]) -> str:
    before = f"; before it: {'; '.join(tried)}" if tried else ""
    what = ("weight-bearing ops INT8, elementwise ops float" if not variant.float_layers else
            f"elementwise ops and {variant.float_layers} outlier-range weight-bearing ops float, the rest INT8")
    return f"shipped variant: {variant.label} ({what}), because full INT8 failed: {why}{before}"
