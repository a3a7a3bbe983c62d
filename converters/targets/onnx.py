"""ONNX INT8 (QDQ): a bounded search for the quantization that ships, judged in the terms of each output's task.

1. **Choices** that matter for the target, best-first: the weight-bearing ops only (Conv, MatMul, Gemm: elementwise
   ops, decode tails and gates keep their float ranges) with the profile's calibration, then other calibrations;
   where some MatMul input has outlier channels, the best of those after SmoothQuant (``converters.smoothing``;
   each α scored on the calibration split, the best judged); then every quantizable op. The first that passes the
   profile's gate on the evaluation set ships; one that misses its floor on the calibration split is not judged
   on the evaluation set at all.
2. **Mixed precision** from the best choice (scored on the calibration split, never on the evaluation set): the
   weight-bearing nodes in graph order are cut into blocks; each round floats the block that most improves the
   whole-output task score, until the floor holds on the calibration split; then floated nodes go back to INT8,
   half a block at a time, while it still holds. Or, when only latency failed, grouped convolutions, then the
   slowest INT8 kernels (measured per node), go back to float, within the profile's float budget.
3. The result is judged once more on the evaluation set. Everything tried is reported, with its score.

Profiles with the same scheme share attempts (two Jetsons quantize identically); each applies its own floor.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from dataclasses import dataclass

import numpy as np
import onnx

from converters import onnx_int8, runtime, smoothing
from converters.errors import QuantizationError
from converters.fidelity import OutputFidelity, task_score
from converters.gate import Check, Measured, failed, fixable, judge
from converters.report import MixedPrecision, QuantizationInfo, SearchInfo, Tried
from converters.source import model_files
from converters.targets.base import Attempt, SharedWork, TargetResult, fidelity, judge_attempt
from firmware_profiles import ArtifactTarget, Profile, QuantizationScheme
from firmware_profiles.schema import CalibrationMethod

log = logging.getLogger(__name__)

LATENCY_WHERE = f"host CPU ({platform.machine()}), ONNX Runtime CPU EP, batch 1"
# Latency rescue: float the fewest slow INT8 kernels covering these shares of the integer-kernel time.
LATENCY_SHARES = (0.5, 0.75, 0.9, 0.95)
BLOCKS = 8

Plan = tuple[str, frozenset[str]]  # why, and the nodes kept in float


class SearchClock:
    """The search's time budget, counted in this process's CPU seconds (all threads): the same work fits in it on a
    busy machine as on an idle one, where a wall-clock budget would cut the search short whenever the host is
    shared; on an idle host it ends no later than the same budget of wall time."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.start = time.process_time()

    def spent(self) -> float:
        return time.process_time() - self.start

    def over(self) -> bool:
        return self.spent() > self.budget_s


@dataclass
class Candidate:
    """One quantized model on disk and what it measured on each split (measured lazily)."""

    attempt: Attempt
    search: list[OutputFidelity]


class OnnxInt8Pass:
    """The ONNX INT8 target: one candidate per (scheme, choice, float nodes), shared by every profile."""

    def __init__(self, work: SharedWork):
        self.work = work
        self._candidates: dict[tuple[str, str, frozenset[str], frozenset[str]], Candidate] = {}
        self._weights: dict[str, int] | None = None  # weight elements per node of the prepared graph
        self._smoother: smoothing.Smoother | None = None
        self._smoothed: dict[float, tuple[onnx_int8.Prepared, smoothing.Smoothed]] = {}

    # ------------------------------------------------------------------ the pass

    def run(self, profile: Profile, target: ArtifactTarget) -> TargetResult:
        scheme = target.quantization
        started = time.monotonic()
        deadline = SearchClock(self.work.options.search_seconds)
        tried: list[Tried] = []
        errors: list[QuantizationError] = []
        best: tuple[float, Candidate, list[Check]] | None = None
        pending = choices(scheme)
        smoothing_tried = False
        while pending:
            choice = pending.pop(0)
            if best is not None and deadline.over():
                break
            if best is not None and not fixable(best[2]) and choice.ops == "weighted":
                continue  # what failed (nothing quantized, not smaller) is not a matter of calibration
            if choice.ops == "all" and not smoothing_tried and best is not None and fixable(best[2]):
                smoothing_tried = True
                smoothed = self._best_smoothing(scheme, best[1], tried, deadline)
                if smoothed is not None:
                    pending = [smoothed, choice, *pending]
                    continue
            self.work.progress(f"{profile.id}: quantizing ({choice.label()})")
            try:
                cand = self.candidate(scheme, choice, frozenset(), evaluate=False)
            except QuantizationError as e:  # one choice failing (a calibration method) leaves the others
                errors.append(e)
                tried.append(Tried(what=choice.label(), float_nodes=0, split="evaluation", score=0.0, passed=False,
                                   failed=[str(e)]))
                continue
            if self._holds_on_search(profile, cand):
                checks = self._judge(profile, self._evaluate(cand).attempt, with_latency=False)
                if not failed(checks):
                    checks = self._judge(profile, cand.attempt, with_latency=True)
                tried.append(_tried(choice.label(), 0, "evaluation", task_score(cand.attempt.outputs), checks))
                if not failed(checks):
                    return self._result(profile, scheme, cand, checks, tried, started, None, "passed")
            else:  # what fails on the calibration split is not judged on the evaluation set (a 90 MB encoder's
                # 512 evaluation sentences took the search's whole budget before its first block)
                checks = self._search_checks(profile, cand)
                tried.append(_tried(choice.label(), 0, "calibration", task_score(cand.search), checks))
            score = task_score(cand.search)
            if best is None or score > best[0]:
                best = (score, cand, checks)
        if best is None:
            raise errors[0]
        _, base, base_checks = best
        if not base.attempt.outputs:  # the report and the mixed-precision figures are the evaluation set's
            base_checks = self._judge(profile, self._evaluate(base).attempt, with_latency=False)
        if not fixable(base_checks):
            return self._result(profile, scheme, base, base_checks, tried, started, None, "not fixable by float")
        if all(c.name.startswith("latency") for c in failed(base_checks)):
            found = self._latency_search(profile, scheme, base, tried)
        else:
            found = self._fidelity_search(profile, target, base, tried, deadline)
        if found is None:
            checks = [*base_checks, Check(
                name="mixed precision", value=None, bound=None, passed=False,
                detail=f"the search ({len(tried)} candidates, {deadline.spent():.0f} CPU s of "
                       f"{self.work.options.search_seconds:.0f}) found no mix of INT8 and float that holds the "
                       "floor within the budget")]
            return self._result(profile, scheme, base, checks, tried, started, None, "no candidate held the floor")
        cand, why, checks = found
        mixed = self._mixed(profile, base, cand, base_checks, why, len(tried))
        return self._result(profile, scheme, cand, checks, tried, started, mixed,
                            "passed" if not failed(checks) else "held on calibration data, not on evaluation")

    # ------------------------------------------------------------------ candidates

    def candidate(self, scheme: QuantizationScheme, choice: onnx_int8.Choice, exclude: frozenset[str], *,
                  evaluate: bool = True, wide: frozenset[str] = frozenset()) -> Candidate:
        key = (scheme_key(scheme), choice.key(), exclude, wide)
        cand = self._candidates.get(key)
        if cand is None:
            work = self.work
            folder = work.workdir / scheme_key(scheme)
            out = folder / f"attempt{len(self._candidates)}.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            quantized = onnx_int8.quantize(self.prepared(choice), work.calibration.samples, scheme, out, choice=choice,
                                           exclude=exclude, external_data=work.source.external_data,
                                           cache=onnx_int8.calibration_cache(folder, scheme, choice), wide=wide)
            if wide:  # a device runs the fused kernels: they must compute what the exact scoring below judges
                agree = runtime.optimized_path_cosine(out, work.search_samples[:4], threads=work.options.threads)
                if agree < runtime.OPTIMIZED_PATH_MIN_COSINE:
                    raise QuantizationError(f"ONNX Runtime's optimized kernels answer otherwise for 16-bit "
                                            f"activations here (cosine {agree:.3f} against the artifact's own "
                                            "arithmetic): not shipped")
            session = runtime.session(out, threads=work.options.threads, exact=True)
            search = fidelity(work.tasks, work.search_fp32, runtime.run_all(session, work.search_samples))
            size = sum(p.stat().st_size for p in model_files(out))
            cand = Candidate(Attempt(quantized, onnx_int8.weight_stats(out), size, []), search)
            self._candidates[key] = cand
        return self._evaluate(cand) if evaluate else cand

    def _evaluate(self, cand: Candidate) -> Candidate:
        """The candidate measured on the evaluation set (once)."""
        if not cand.attempt.outputs:
            work = self.work
            session = runtime.session(cand.attempt.quantized.path, threads=work.options.threads, exact=True)
            got = runtime.run_all(session, work.evaluation.samples)
            cand.attempt.outputs = fidelity(work.tasks, work.fp32_outputs, got, truth=work.truth)
        return cand

    def prepared(self, choice: onnx_int8.Choice) -> onnx_int8.Prepared:
        """The float model a choice quantizes: the prepared one, or its SmoothQuant version."""
        if not choice.smooth:
            return self.work.prepared
        smoothed = self.smoothed(choice.smooth)
        if smoothed is None:
            raise QuantizationError("SmoothQuant found no MatMul input with outlier channels")
        return smoothed[0]

    def smoothed(self, alpha: float) -> tuple[onnx_int8.Prepared, smoothing.Smoothed] | None:
        """The prepared model after SmoothQuant with ``alpha``, made once (the channel maxima, measured once for every
        α, cost one pass over the calibration samples); None when no weight-bearing MatMul reads a tensor with
        outlier channels."""
        work = self.work
        if self._smoother is None:
            work.progress("SmoothQuant: channel ranges of MatMul inputs")
            self._smoother = smoothing.Smoother(work.prepared.path, work.calibration.samples)
        if alpha not in self._smoothed and self._smoother.worthwhile():
            out = work.workdir / f"smoothed-{alpha:g}.onnx"
            found = self._smoother.write(out, alpha)
            if found is not None:
                graph = onnx.load(str(out), load_external_data=False)
                self._smoothed[alpha] = (onnx_int8.Prepared(out, graph, list(work.prepared.notes)), found)
        return self._smoothed.get(alpha)

    def _best_smoothing(self, scheme: QuantizationScheme, best: Candidate, tried: list[Tried],
                        deadline: SearchClock) -> onnx_int8.Choice | None:
        """SmoothQuant on the best choice so far: each α in ``smoothing.ALPHAS`` scored on the calibration split; the
        best, if it beats the unsmoothed choice there, is the next choice to judge. None when nothing has outlier
        channels or nothing beat it."""
        base = best.attempt.quantized.choice or onnx_int8.profile_choice(scheme)
        if base.ops != "weighted":
            return None
        try:
            if self.smoothed(smoothing.ALPHA) is None:
                return None
        except QuantizationError as e:  # the search goes on without it
            tried.append(Tried(what="SmoothQuant", float_nodes=0, split="calibration", score=0.0, passed=False,
                               failed=[str(e)]))
            return None
        winner, top = None, task_score(best.search)
        for alpha in smoothing.ALPHAS:
            if deadline.over():
                break
            choice = onnx_int8.Choice(base.ops, base.method, base.percentile, alpha)
            cand = self._try(scheme, choice, frozenset(), tried, "SmoothQuant")
            if cand is None:
                continue
            score = task_score(cand.search)
            tried.append(_tried(choice.label(), 0, "calibration", score, None, holds=None))
            if score > top:
                winner, top = choice, score
        return winner

    def _try(self, scheme: QuantizationScheme, choice: onnx_int8.Choice, exclude: frozenset[str],
             tried: list[Tried], label: str, *, evaluate: bool = False,
             wide: frozenset[str] = frozenset()) -> Candidate | None:
        """A search candidate, or None (recorded as tried) when ONNX Runtime cannot build or load it."""
        try:
            return self.candidate(scheme, choice, exclude, evaluate=evaluate, wide=wide)
        except QuantizationError as e:
            tried.append(Tried(what=f"{choice.label()}; {label}", float_nodes=len(exclude), split="calibration",
                               score=0.0, passed=False, failed=[str(e)[:300]]))
            return None

    def _weight_share(self, nodes) -> float:
        """The share of the model's weights that ``nodes`` read (what keeping them in float costs in size)."""
        if self._weights is None:
            self._weights = onnx_int8.node_weight_elements(self.work.prepared.graph)
        total = sum(self._weights.values())
        return sum(self._weights.get(n, 0) for n in nodes) / total if total else 0.0

    def measure_latency(self, attempt: Attempt) -> runtime.Latency:
        if attempt.latency is None:
            work = self.work
            work.progress("timing FP32 vs INT8")
            int8 = runtime.session(attempt.quantized.path, threads=work.options.threads)
            attempt.latency = runtime.compare_latency(work.fp32_session, int8, work.evaluation.samples[0],
                                                      runs=work.options.latency_runs)
        return attempt.latency

    def _judge(self, profile: Profile, attempt: Attempt, *, with_latency: bool) -> list[Check]:
        latency = self.measure_latency(attempt).ratio if with_latency else None
        caveat = None if self.work.options.enforce_host_latency else runtime.int8_latency_caveat()
        return judge_attempt(profile, attempt, self.work.source.size_bytes, latency, latency_caveat=caveat)

    def _search_checks(self, profile: Profile, cand: Candidate) -> list[Check]:
        """The profile's gate over the calibration split (latency is judged on the evaluation set only)."""
        m = Measured(outputs=cand.search, artifact_bytes=cand.attempt.size_bytes,
                     source_bytes=self.work.source.size_bytes, quantized_tensors=cand.attempt.stats.quantized_tensors,
                     source_has_weights=True)
        return judge(m, profile.fidelity, max_artifact_bytes=int(profile.memory.max_artifact_mb * 1e6))

    def _holds_on_search(self, profile: Profile, cand: Candidate) -> bool:
        """The profile's fidelity floor over the calibration split (sizes and latency are judged at the end)."""
        return not [c for c in failed(self._search_checks(profile, cand)) if c.fixable and not c.upper]

    # ------------------------------------------------------------------ the searches

    def _fidelity_search(self, profile: Profile, target: ArtifactTarget, base: Candidate, tried: list[Tried],
                         deadline: SearchClock) -> tuple[Candidate, str, list[Check]] | None:
        """Where the runtime runs 16-bit activations, first the block search that widens activations (no bytes
        lost); when that finds nothing, or its result fails on the evaluation set (latency included), the block
        search that keeps nodes in float."""
        scheme = target.quantization
        last = None
        modes = [True, False] if onnx_int8.sixteen_bit_supported(target.runtime, target.runtime_versions,
                                                                  target.execution_providers) else [False]
        for wide in modes:
            target = None
            for _ in range(2):  # again with a margin when the result held on calibration but not on evaluation
                if deadline.over():
                    break
                found = self._block_search(profile, scheme, base, tried, deadline, wide=wide, target=target)
                if found is None:
                    break
                cand, why = found
                checks = self._judge(profile, cand.attempt, with_latency=True)
                label = "16-bit activations" if wide else "float nodes"
                tried.append(_tried(f"{label}: the search's result", len(cand.attempt.quantized.excluded),
                                    "evaluation", task_score(cand.attempt.outputs), checks))
                last = (cand, why, checks)
                if not failed(checks):
                    return last
                gap = task_score(cand.search) - task_score(cand.attempt.outputs)
                if not fixable(checks) or gap <= 0:
                    break
                # The calibration split flatters the ranges calibrated on it (all-MiniLM-L6-v2 on jetson-orin-nano:
                # the floor held there, cosine 0.9889 on evaluation): the next pass must beat this result there by
                # that gap.
                target = task_score(cand.search) + gap
        return last

    def _block_search(self, profile: Profile, scheme: QuantizationScheme, base: Candidate, tried: list[Tried],
                      deadline: SearchClock, *, wide: bool,
                      target: float | None = None) -> tuple[Candidate, str] | None:
        """Greedy block search on the whole-output task score over the calibration split, then give back.

        ``wide``: a chosen block gets 16-bit activations (its weights stay INT8, so the float-weight budget does not
        apply); otherwise it is kept in float. ``target``: a candidate holds only if its task score on the
        calibration split also reaches it (a margin for what that split flatters)."""
        choice = base.attempt.quantized.choice or onnx_int8.profile_choice(scheme)
        excluded = frozenset(base.attempt.quantized.excluded)
        blocks = self._blocks(choice, excluded)
        chosen: frozenset[str] = frozenset()
        current = task_score(base.search)
        reached = None
        verb = "with 16-bit activations" if wide else "in float"

        def holds(cand: Candidate) -> bool:
            return self._holds_on_search(profile, cand) and (target is None or task_score(cand.search) >= target)

        def build(nodes: frozenset[str], label: str) -> Candidate | None:
            if wide:
                return self._try(scheme, choice, excluded, tried, label, wide=nodes)
            return self._try(scheme, choice, excluded | nodes, tried, label)

        while blocks and not deadline.over():
            self.work.progress(f"{profile.id}: mixed precision ({'16-bit' if wide else 'float'}), round {len(tried)}")
            scored = []
            for label, block in blocks:
                if deadline.over():
                    break
                if not wide and self._weight_share(chosen | block) > profile.fidelity.max_float_weight_fraction:
                    continue  # over the profile's float budget: not worth measuring
                cand = build(chosen | block, label)
                if cand is None:
                    continue
                score = task_score(cand.search)
                tried.append(_tried(f"{choice.label()}; {label} {verb}", len(chosen | block), "calibration",
                                    score, None, holds=holds(cand)))
                scored.append((score, label, block, cand))
            if not scored:
                break
            score, label, block, cand = max(scored, key=lambda s: s[0])
            if score <= current and not holds(cand):
                break  # no block helps any more
            chosen, current = chosen | block, score
            blocks = [(lab, b) for lab, b in blocks if b is not block]
            if holds(cand):
                reached = cand
                break
        if reached is None:
            return None
        chosen = self._give_back(choice, chosen, tried, deadline, build, holds)
        final = self._try(scheme, choice, excluded if wide else excluded | chosen, tried, "the search's result",
                          evaluate=True, wide=chosen if wide else frozenset())
        if final is None:
            return None
        what = "with 16-bit activations (weights INT8)" if wide else "kept in float"
        return final, (f"{len(chosen)} weight-bearing node(s) {what}: greedy block search on the whole-output task "
                       "score over the calibration split, then nodes given back to INT8 while the floor held")

    def _give_back(self, choice: onnx_int8.Choice, chosen: frozenset[str], tried: list[Tried], deadline: SearchClock,
                   build, holds) -> frozenset[str]:
        """Put chosen nodes back into plain INT8, halves first, while the floor holds on the calibration split."""
        order = [n for n in self._weighted_nodes(choice, ()) if n in chosen]
        pending = [order]
        while pending and not deadline.over():
            group = pending.pop(0)
            trial = chosen - set(group)
            label = f"{len(group)} node(s) given back to INT8"
            cand = build(trial, label)
            kept = cand is not None and holds(cand)
            if cand is not None:
                tried.append(_tried(f"{choice.label()}; {label}", len(trial), "calibration",
                                    task_score(cand.search), None, holds=kept))
            if kept:
                chosen = trial
            elif len(group) > 1:
                half = len(group) // 2
                pending += [group[:half], group[half:]]
        return chosen

    def _latency_search(self, profile: Profile, scheme: QuantizationScheme, base: Candidate,
                        tried: list[Tried]) -> tuple[Candidate, str, list[Check]] | None:
        self.work.progress("profiling INT8 kernels")
        times = runtime.integer_node_times(base.attempt.quantized.path, self.work.evaluation.samples[0],
                                           threads=self.work.options.threads)
        graph = self.work.prepared.graph.graph
        known = {n.name for n in graph.node}
        grouped = frozenset(n.name for n in graph.node
                            if n.op_type == "Conv" and onnx_int8.int_attribute(n, "group", 1) > 1)
        choice = base.attempt.quantized.choice or onnx_int8.profile_choice(scheme)
        budget = profile.fidelity.max_float_weight_fraction
        for why, nodes in latency_plans(times, known, self.work.options.max_rounds, grouped=grouped,
                                        weight_share=self._weight_share, budget=budget):
            cand = self._try(scheme, choice, frozenset(nodes) | frozenset(base.attempt.quantized.excluded), tried,
                             why, evaluate=True)
            if cand is None:
                continue
            checks = self._judge(profile, cand.attempt, with_latency=True)
            tried.append(_tried(f"{choice.label()}; {why}", len(nodes), "evaluation", task_score(cand.attempt.outputs),
                                checks))
            if not failed(checks):
                return cand, why, checks
        return None

    # ------------------------------------------------------------------ graph structure

    def _weighted_nodes(self, choice: onnx_int8.Choice, excluded) -> list[str]:
        """Nodes the choice quantizes that carry weights, in graph order."""
        graph = self.work.prepared.graph
        skip = set(excluded) | set(onnx_int8.activation_gathers(graph))
        return [n.name for n in graph.graph.node if n.op_type in onnx_int8.WEIGHTED_OPS and n.name not in skip]

    def _blocks(self, choice: onnx_int8.Choice, excluded) -> list[tuple[str, frozenset[str]]]:
        """Contiguous blocks of weight-bearing nodes, plus the attention products (activation × activation MatMul)
        as a block of their own: they carry no weights, so floating them costs no bytes."""
        graph = self.work.prepared.graph.graph
        weights = {i.name for i in graph.initializer}
        nodes = self._weighted_nodes(choice, excluded)
        attention = frozenset(n.name for n in graph.node if n.name in set(nodes) and n.op_type == "MatMul"
                              and not any(i in weights for i in n.input))
        rest = [n for n in nodes if n not in attention]
        out: list[tuple[str, frozenset[str]]] = []
        if attention:
            out.append((f"the {len(attention)} attention MatMul(s)", attention))
        count = min(BLOCKS, len(rest))
        for i, part in enumerate(np.array_split(np.array(rest, dtype=object), count) if count else []):
            if len(part):
                out.append((f"block {i + 1}/{count} ({part[0]} … {part[-1]}, {len(part)} nodes)",
                            frozenset(str(p) for p in part)))
        return out

    # ------------------------------------------------------------------ report

    def _mixed(self, profile: Profile, base: Candidate, cand: Candidate, base_checks: list[Check], why: str,
               rounds: int) -> MixedPrecision:
        floated = sorted(set(cand.attempt.quantized.excluded) - set(base.attempt.quantized.excluded))
        share = self._weight_share(floated)
        base_latency = self.measure_latency(base.attempt)
        return MixedPrecision(
            float_nodes=floated, sixteen_bit_nodes=sorted(cand.attempt.quantized.wide),
            float_weight_fraction=share, rounds=rounds, why=why,
            full_int8_failed=[c.line() for c in failed(base_checks)],
            size_cost_bytes=cand.attempt.size_bytes - base.attempt.size_bytes,
            latency_cost_ms=self.measure_latency(cand.attempt).int8_ms - base_latency.int8_ms)

    def _result(self, profile: Profile, scheme: QuantizationScheme, cand: Candidate, checks: list[Check],
                tried: list[Tried], started: float, mixed: MixedPrecision | None, stopped: str) -> TargetResult:
        attempt = cand.attempt
        if mixed is not None and mixed.float_weight_fraction > profile.fidelity.max_float_weight_fraction:
            checks = [*checks, Check(name="float weight fraction", value=mixed.float_weight_fraction,
                                     bound=profile.fidelity.max_float_weight_fraction, upper=True, passed=False,
                                     detail="mixed precision keeps more of the weights in float than the profile "
                                            "allows")]
        choice = attempt.quantized.choice or onnx_int8.profile_choice(scheme)
        search = SearchInfo(choice=choice.label(), tried=tried, seconds=time.monotonic() - started,
                            budget_seconds=self.work.options.search_seconds, stopped=stopped)
        info = quantization_info(scheme, attempt)
        if choice.smooth in self._smoothed:
            info.smoothing = self._smoothed[choice.smooth][1].summary(choice.smooth)
        return TargetResult(attempt, checks, latency_where=LATENCY_WHERE, quantization=info, mixed_precision=mixed,
                            search=search)


def choices(scheme: QuantizationScheme) -> list[onnx_int8.Choice]:
    """The quantization choices worth trying for a scheme, best-first: the profile's calibration on the weight-bearing
    ops, the other calibrations (percentile 99.999 keeps detector heads, 99.99 recognizers; min/max for everything
    that has no outliers), then every quantizable op with the profile's calibration."""
    own = onnx_int8.profile_choice(scheme)
    out = [own]
    for method, p in ((CalibrationMethod.PERCENTILE, 99.999), (CalibrationMethod.PERCENTILE, 99.99),
                      (CalibrationMethod.MINMAX, 99.999)):
        alt = onnx_int8.Choice("weighted", method, p)
        if alt.key() not in {c.key() for c in out}:
            out.append(alt)
    out.append(onnx_int8.Choice("all", own.method, own.percentile))
    return out


def _tried(what: str, float_nodes: int, split: str, score: float, checks: list[Check] | None, *,
           holds: bool | None = None) -> Tried:
    bad = failed(checks) if checks is not None else []
    return Tried(what=what, float_nodes=float_nodes, split=split, score=round(score, 6),
                 passed=(not bad) if checks is not None else holds, failed=[c.line() for c in bad][:4])


def latency_plans(times: dict[str, float], known: set[str], max_rounds: int, *,
                  grouped: frozenset[str] = frozenset(), weight_share=None, budget: float = 1.0) -> list[Plan]:
    """INT8 slower than the profile allows: nodes go back to float.

    First the grouped (depthwise) convolutions of ``grouped``: ONNX Runtime's x86 QLinearConv has no fast path for
    them, and they are light (PP-OCR's text-direction classifier on rpi4: 1.33× FP32 all-INT8, 1.11× with its 11
    depthwise convolutions float, 17% of its weights). Then the slowest integer kernels (measured) of ``known``
    (the prepared graph's nodes): each plan floats the fewest that together took 50%, 75%, 90% or 95% of their
    integer-kernel time, passing over any that would take the float weights (``weight_share``) past ``budget``; at
    least one kernel always stays INT8 (floating them all would ship a float model as INT8). Plans that float the
    same nodes as an earlier one are dropped.
    """
    share_of = weight_share or (lambda nodes: 0.0)
    plans: list[Plan] = []
    ranked = [n for n in sorted(times, key=times.__getitem__, reverse=True) if n in known]
    total = sum(times[n] for n in ranked)
    light = frozenset(n for n in grouped if n in known)
    if light and set(ranked) - light and share_of(light) <= budget:
        plans.append((f"{len(light)} grouped convolution(s) kept in float (ONNX Runtime's x86 INT8 kernels have no "
                      "fast path for them)", light))
    for share in LATENCY_SHARES:
        chosen: list[str] = []
        covered, passed_over = 0.0, 0
        for node in ranked:
            if covered >= share * total or len(chosen) == len(ranked) - 1:
                break
            if share_of(frozenset([*chosen, node])) > budget:
                passed_over += 1
                continue
            chosen.append(node)
            covered += times[node]
        nodes = frozenset(chosen)
        if nodes and all(nodes != p for _, p in plans):
            within = f", {passed_over} slower one(s) over the float budget passed over" if passed_over else ""
            plans.append((f"{len(nodes)} slowest INT8 kernel(s), {covered / total:.0%} of integer-kernel time, kept "
                          f"in float (measured per node{within})", nodes))
    return plans[:max_rounds]


def quantization_info(scheme: QuantizationScheme, attempt: Attempt) -> QuantizationInfo:
    """The scheme the profile asked for beside what the quantizer did with it."""
    s = attempt.stats
    choice = attempt.quantized.choice or onnx_int8.profile_choice(scheme)
    return QuantizationInfo(
        format=scheme.format.value, per_channel_requested=scheme.per_channel,
        per_channel_used=attempt.quantized.per_channel, activation_type=scheme.activation_type.value,
        weight_type=scheme.weight_type.value, activation_symmetric=scheme.activation_symmetric,
        weight_symmetric=scheme.weight_symmetric, calibration_method=choice.method.value,
        percentile=choice.percentile if choice.method is CalibrationMethod.PERCENTILE else None,
        op_types="Conv, ConvTranspose, MatMul, Gemm, Gather (tables)" if choice.ops == "weighted" else "all",
        quantized_weight_tensors=s.quantized_tensors, float_weight_tensors=s.float_tensors,
        quantized_weight_fraction=s.quantized_fraction, subgraph_float_weights=s.subgraph_float_elements,
        qdq_nodes=s.qdq_nodes)


def scheme_key(scheme: QuantizationScheme) -> str:
    """Attempts (and their work folder) are shared by every profile with an identical scheme."""
    return hashlib.sha256(scheme.model_dump_json().encode()).hexdigest()[:12]
