"""ONNX INT8 (QDQ): quantize, measure, gate; below the floor, buy fidelity (or speed) back with mixed precision.

Profiles with the same quantization scheme share their attempts (two Jetsons quantize identically); each profile then
applies its own floor. The search for a mixed-precision attempt follows plans: for fidelity, mixed-range output tails
first, then the most damaged tensors (measured per-slice SQNR), 1, 2, 4, ... of them; for latency, the slowest
integer kernels (measured per node). Each plan must fit the profile's budget of float compute nodes.
"""

from __future__ import annotations

import hashlib
import logging
import platform

from converters import onnx_int8, runtime
from converters.gate import Check, failed, fixable
from converters.report import MixedPrecision, QuantizationInfo
from converters.sensitivity import rank_tensors
from converters.source import model_files
from converters.targets.base import Attempt, SharedWork, TargetResult, fidelity, judge_attempt
from firmware_profiles import ArtifactTarget, Profile, QuantizationScheme

log = logging.getLogger(__name__)

LATENCY_WHERE = f"host CPU ({platform.machine()}), ONNX Runtime CPU EP, batch 1"
# Tensors whose median slice SQNR is below this are candidates for float; above it, quantization is harmless.
DAMAGE_CANDIDATE_DB = 30.0
# Latency rescue: float the fewest slow INT8 kernels covering these shares of the integer-kernel time.
LATENCY_SHARES = (0.5, 0.75, 0.9, 0.95)

Plan = tuple[str, frozenset[str]]  # why, and the nodes kept in float


class OnnxInt8Pass:
    """The ONNX INT8 target: one attempt per (scheme, float nodes), shared by every profile that asks for it."""

    def __init__(self, work: SharedWork):
        self.work = work
        self._attempts: dict[tuple[str, frozenset[str]], Attempt] = {}
        self._rankings: dict[str, list[str]] = {}

    def run(self, profile: Profile, target: ArtifactTarget) -> TargetResult:
        scheme = target.quantization
        self.work.progress(f"{profile.id}: quantizing")
        full = self.attempt(scheme, frozenset())
        checks = self._judge(profile, full, with_latency=False)
        if not failed(checks):  # timing is only worth its cost for a candidate that is otherwise good
            checks = self._judge(profile, full, with_latency=True)
        chosen, mixed = full, None
        if failed(checks) and fixable(checks):
            chosen, checks, mixed = self._mixed_precision(profile, scheme, full, checks)
        return TargetResult(chosen, checks, latency_where=LATENCY_WHERE,
                            quantization=quantization_info(scheme, chosen), mixed_precision=mixed)

    def attempt(self, scheme: QuantizationScheme, exclude: frozenset[str]) -> Attempt:
        key = (scheme_key(scheme), exclude)
        if key not in self._attempts:
            work = self.work
            out = work.workdir / scheme_key(scheme) / f"attempt{len(self._attempts)}.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            work.progress(f"quantizing ({len(exclude)} nodes in float)")
            quantized = onnx_int8.quantize(work.prepared, work.calibration.samples, scheme, out, exclude=exclude,
                                           external_data=work.source.external_data)
            session = runtime.session(out, threads=work.options.threads)
            int8 = runtime.run_all(session, work.evaluation.samples)
            size = sum(p.stat().st_size for p in model_files(out))
            self._attempts[key] = Attempt(quantized, onnx_int8.weight_stats(out), size,
                                          fidelity(work.kinds, work.fp32_outputs, int8))
        return self._attempts[key]

    def measure_latency(self, attempt: Attempt) -> runtime.Latency:
        if attempt.latency is None:
            work = self.work
            work.progress("timing FP32 vs INT8")
            int8 = runtime.session(attempt.quantized.path, threads=work.options.threads)
            attempt.latency = runtime.compare_latency(work.fp32_session, int8, work.evaluation.samples[0],
                                                      runs=work.options.latency_runs)
        return attempt.latency

    def ranking(self, scheme: QuantizationScheme, full: Attempt) -> list[str]:
        """Quantized tensors, most damaged first (measured once per scheme)."""
        key = scheme_key(scheme)
        if key not in self._rankings:
            self.work.progress("measuring per-tensor quantization damage")
            samples = self.work.calibration.samples[: self.work.options.sensitivity_samples]
            damage = rank_tensors(self.work.prepared.path, full.quantized.path, samples)
            self._rankings[key] = [d.tensor for d in damage if d.median_slice_sqnr_db < DAMAGE_CANDIDATE_DB]
        return self._rankings[key]

    def _judge(self, profile: Profile, attempt: Attempt, *, with_latency: bool) -> list[Check]:
        latency = self.measure_latency(attempt).ratio if with_latency else None
        return judge_attempt(profile, attempt, self.work.source.size_bytes, latency)

    def _mixed_precision(self, profile: Profile, scheme: QuantizationScheme, full: Attempt,
                         full_checks: list[Check]) -> tuple[Attempt, list[Check], MixedPrecision | None]:
        """Keep nodes in float, plan by plan, until the floor is met, within the profile's budget."""
        prepared = self.work.prepared
        budget = max(1, int(profile.fidelity.max_float_node_fraction * prepared.compute_nodes))
        if any(c.name.startswith("latency") for c in failed(full_checks)):
            plans = self._latency_plans(full)
        else:
            plans = self._fidelity_plans(scheme, full)
        rounds = 0
        last: tuple[Attempt, list[Check]] = (full, full_checks)
        for why, nodes in plans:
            cost = onnx_int8.compute_nodes(prepared.graph, nodes)
            if cost > budget:
                log.info("%s: %d float compute nodes exceed the budget of %d", profile.id, cost, budget)
                break
            rounds += 1
            candidate = self.attempt(scheme, nodes)
            checks = self._judge(profile, candidate, with_latency=False)
            if not failed(checks):
                checks = self._judge(profile, candidate, with_latency=True)
            last = (candidate, checks)
            if not failed(checks):
                full_latency = self.measure_latency(full)
                mixed = MixedPrecision(
                    float_nodes=sorted(nodes), float_node_fraction=cost / prepared.compute_nodes,
                    rounds=rounds, why=why, full_int8_failed=[c.line() for c in failed(full_checks)],
                    size_cost_bytes=candidate.size_bytes - full.size_bytes,
                    latency_cost_ms=self.measure_latency(candidate).int8_ms - full_latency.int8_ms)
                return candidate, checks, mixed
            if not fixable(checks):
                break
        chosen, checks = last
        if chosen is not full:
            checks = [*checks, Check(name="mixed precision", value=None, bound=None, passed=False,
                                     detail=f"{rounds} round(s) keeping up to {len(chosen.quantized.excluded)} "
                                            f"nodes in float (budget: {budget} compute nodes) did not reach "
                                            "the floor")]
        return chosen, checks, None

    def _fidelity_plans(self, scheme: QuantizationScheme, full: Attempt) -> list[Plan]:
        """Mixed-range output tails first, then the most damaged tensors: 1, 2, 4, ... of them."""
        graph = self.work.prepared.graph
        plans: list[Plan] = []
        tails = {n for o in full.outputs if o.ranges for n in onnx_int8.output_tail(graph, o.name)}
        if tails:
            plans.append(("mixed-range output: its assembling tail kept in float", frozenset(tails)))
        ranked = self.ranking(scheme, full)
        k = 1
        while k <= len(ranked) and len(plans) < self.work.options.max_rounds:
            nodes = frozenset(onnx_int8.neighbours(graph, ranked[:k])) | frozenset(tails)
            plans.append((f"{k} most damaged tensor(s) kept in float (measured per-slice SQNR)", nodes))
            k *= 2
        return plans

    def _latency_plans(self, full: Attempt) -> list[Plan]:
        self.work.progress("profiling INT8 kernels")
        times = runtime.integer_node_times(full.quantized.path, self.work.evaluation.samples[0],
                                           threads=self.work.options.threads)
        known = {n.name for n in self.work.prepared.graph.graph.node}
        return latency_plans(times, known, self.work.options.max_rounds)


def latency_plans(times: dict[str, float], known: set[str], max_rounds: int) -> list[Plan]:
    """INT8 slower than the profile allows: the slowest integer kernels (measured) go back to float.

    Each plan floats the fewest kernels of ``known`` (the prepared graph's nodes) that together took 50%, 75%, 90% or
    95% of their integer-kernel time; at least one kernel always stays INT8 (floating them all would ship a float
    model as INT8). Plans that float the same kernels as an earlier one are dropped.
    """
    ranked = [n for n in sorted(times, key=times.__getitem__, reverse=True) if n in known]
    total = sum(times[n] for n in ranked)
    plans: list[Plan] = []
    for share in LATENCY_SHARES:
        k, covered = 0, 0.0
        while k < len(ranked) - 1 and covered < share * total:
            covered += times[ranked[k]]
            k += 1
        nodes = frozenset(ranked[:k])
        if k and all(nodes != p for _, p in plans):
            plans.append((f"{k} slowest INT8 kernel(s), {covered / total:.0%} of integer-kernel time, kept in "
                          "float (measured per node)", nodes))
    return plans[:max_rounds]


def quantization_info(scheme: QuantizationScheme, attempt: Attempt) -> QuantizationInfo:
    """The scheme the profile asked for beside what the quantizer did with it."""
    s = attempt.stats
    return QuantizationInfo(
        format=scheme.format.value, per_channel_requested=scheme.per_channel,
        per_channel_used=attempt.quantized.per_channel, activation_type=scheme.activation_type.value,
        weight_type=scheme.weight_type.value, activation_symmetric=scheme.activation_symmetric,
        weight_symmetric=scheme.weight_symmetric, calibration_method=scheme.calibration_method.value,
        quantized_weight_tensors=s.quantized_tensors, float_weight_tensors=s.float_tensors,
        quantized_weight_fraction=s.quantized_fraction, subgraph_float_weights=s.subgraph_float_elements,
        qdq_nodes=s.qdq_nodes)


def scheme_key(scheme: QuantizationScheme) -> str:
    """Attempts (and their work folder) are shared by every profile with an identical scheme."""
    return hashlib.sha256(scheme.model_dump_json().encode()).hexdigest()[:12]
