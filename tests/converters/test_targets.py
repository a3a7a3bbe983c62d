"""The per-target passes' pure parts: latency rescue plans, shared attempts per scheme, the result's artifact."""

from pathlib import Path

import pytest

from converters.onnx_int8 import Quantized, WeightStats
from converters.targets.base import Attempt, TargetResult
from converters.targets.onnx import latency_plans, scheme_key
from firmware_profiles import load_profile

KNOWN = {"a", "b", "c", "d"}

# times per integer kernel, the prepared graph's node names, max rounds → the float node sets, in order
LATENCY_PLANS = {
    "shares 50/75/90%; 95% floats the same three, dropped": (
        {"a": 5.0, "b": 3.0, "c": 1.0, "d": 1.0}, KNOWN, 6, [{"a"}, {"a", "b"}, {"a", "b", "c"}]),
    "one kernel dominates: one plan": ({"a": 100.0, "b": 1.0}, KNOWN, 6, [{"a"}]),
    "rounds cap the plans": ({"a": 5.0, "b": 3.0, "c": 1.0, "d": 1.0}, KNOWN, 1, [{"a"}]),
    "a single kernel always stays INT8": ({"a": 5.0}, KNOWN, 6, []),
    "kernels the graph does not name are ignored": ({"a": 5.0, "fused_1": 100.0, "b": 5.0}, KNOWN, 6, [{"a"}]),
    "nothing timed": ({}, KNOWN, 6, []),
}


@pytest.mark.parametrize("case", list(LATENCY_PLANS))
def test_latency_plans_float_the_fewest_slowest_kernels(case):
    times, known, rounds, expected = LATENCY_PLANS[case]
    plans = latency_plans(times, known, rounds)
    assert [set(nodes) for _, nodes in plans] == expected
    for why, nodes in plans:
        assert why.startswith(f"{len(nodes)} slowest INT8 kernel(s), ") and "measured per node" in why


def test_latency_plans_start_with_grouped_convolutions_and_keep_to_the_float_budget():
    times = {"a": 5.0, "b": 3.0, "c": 1.0, "d": 1.0}
    weights = {"a": 0.6, "b": 0.1, "c": 0.05, "d": 0.05}  # "a" alone is over a 0.25 budget

    def share(nodes):
        return sum(weights[n] for n in nodes)

    plans = latency_plans(times, KNOWN, 6, grouped=frozenset({"c", "d"}), weight_share=share, budget=0.25)
    assert [set(nodes) for _, nodes in plans] == [{"c", "d"}, {"b", "c", "d"}]  # "a" never, one kernel stays INT8
    assert plans[0][0].startswith("2 grouped convolution(s) kept in float")
    assert "1 slower one(s) over the float budget passed over" in plans[1][0]
    assert all(share(nodes) <= 0.25 for _, nodes in plans)
    # grouped convolutions that are every integer kernel: floating them would ship a float model
    assert latency_plans({"c": 1.0, "d": 1.0}, KNOWN, 6, grouped=frozenset({"c", "d"}))[0][0].startswith("1 slowest")


def test_latency_plan_says_how_much_time_it_covers():
    [(why, _)] = latency_plans({"a": 3.0, "b": 1.0}, {"a", "b"}, 6)
    assert "75% of integer-kernel time" in why


SCHEME = next(iter(load_profile("jetson-orin-nano").artifacts)).quantization


@pytest.mark.parametrize(("other", "shared"), [
    (SCHEME.model_copy(), True),
    (SCHEME.model_copy(update={"per_channel": not SCHEME.per_channel}), False),
    (SCHEME.model_copy(update={"float_ops": (*SCHEME.float_ops, "Softmax")}), False),
])
def test_profiles_share_attempts_exactly_when_their_schemes_are_equal(other, shared):
    assert (scheme_key(SCHEME) == scheme_key(other)) is shared


def test_the_result_artifact_is_the_attempt_it_settled_on(tmp_path: Path):
    attempt = Attempt(Quantized(tmp_path / "attempt3.onnx", True, ["n1"]), WeightStats(1, 10, 0, 0, 0, 0), 10, [])
    result = TargetResult(attempt, checks=[])
    assert result.artifact == tmp_path / "attempt3.onnx" and result.notes == [] and result.quantization is None


def test_a_search_result_that_fails_on_evaluation_is_searched_again_with_the_calibration_gap_as_margin(monkeypatch):
    """The block search's result held on the calibration split (task score 1.010) and missed on the evaluation set
    (1.004): the next pass must beat it there by that gap (1.016); its result ships."""
    from types import SimpleNamespace

    from converters.gate import Check
    from converters.targets import onnx as onnx_target

    def candidate(search: float, evaluation: float):
        attempt = SimpleNamespace(outputs=[evaluation], quantized=SimpleNamespace(excluded=[]))
        return SimpleNamespace(search=[search], attempt=attempt)

    results = [candidate(1.010, 1.004), candidate(1.020, 1.012)]
    targets = []

    class Pass(onnx_target.OnnxInt8Pass):
        def _block_search(self, profile, scheme, base, tried, deadline, *, wide, target=None):
            targets.append(target)
            return results[len(targets) - 1], "why"

        def _judge(self, profile, attempt, *, with_latency):
            ok = attempt.outputs[0] >= 1.01
            return [Check(name="cosine", value=attempt.outputs[0], bound=1.01, passed=ok, fixable=True)]

    monkeypatch.setattr(onnx_target, "task_score", lambda outputs: outputs[0])
    monkeypatch.setattr(onnx_target.onnx_int8, "sixteen_bit_supported", lambda *a: False)
    target = SimpleNamespace(quantization=None, runtime="onnxruntime-gpu", runtime_versions=">=1.17",
                             execution_providers=[])
    tried = []
    found = Pass(SimpleNamespace())._fidelity_search(None, target, None, tried, onnx_target.SearchClock(60))
    assert targets == [None, pytest.approx(1.016)]
    assert found[0] is results[1] and not [c for c in found[2] if not c.passed]
    assert [t.passed for t in tried] == [False, True]
