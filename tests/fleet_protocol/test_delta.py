import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from fleet_protocol import delta
from fleet_protocol.errors import DeltaError
from tests import zoo


def retrained(model_bytes: bytes, *, which: str, seed: int = 1) -> bytes:
    """The same architecture with the head retrained (``head``) or every weight fine-tuned (``all``)."""
    m = onnx.load_from_string(model_bytes)
    rng = np.random.default_rng(seed)
    head = {i for n in m.graph.node if n.op_type == "Gemm" for i in n.input[1:]}
    chosen = [i for i in m.graph.initializer if which == "all" or i.name in head]
    for init in chosen:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array((a + rng.normal(0, 0.01, a.shape)).astype(np.float32), init.name))
    return m.SerializeToString()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> bytes:
    return zoo.mobilenet_like(tmp_path_factory.mktemp("d") / "m.onnx", width=32, blocks=3).read_bytes()


def test_identical_artifact_patch_is_tiny(base):
    p = delta.encode(base, base)
    assert len(p.data) <= 1024 and delta.apply(base, p.data) == base


def test_retrained_head_patch_is_small_and_tensor_aware_beats_bsdiff(base):
    target = retrained(base, which="head")
    p = delta.encode(base, target)
    assert delta.apply(base, p.data) == target
    assert len(p.data) <= 0.05 * len(target)
    assert p.tried["onnx-tensors"] <= p.tried["bsdiff4"]
    assert len(delta.read_header(p.data)[1]) == min(p.tried.values())  # the smallest candidate was chosen


def test_full_fine_tune_falls_back_to_the_smallest_and_still_rebuilds_exactly(base):
    target = retrained(base, which="all")
    p = delta.encode(base, target)
    assert delta.apply(base, p.data) == target
    # fine-tuned floats keep their high bytes: the plane-split tensor delta beats every byte-level algorithm
    assert p.algorithm == "onnx-tensors" and p.tried["onnx-tensors"] < 0.9 * p.tried["full"]
    assert p.tried["onnx-tensors"] <= p.tried["bsdiff4"]


def test_unrelated_bytes_fall_back_to_full_compression():
    rng = np.random.default_rng(0)
    a, b = rng.bytes(50_000), rng.bytes(50_000)
    p = delta.encode(a, b)
    assert p.algorithm == "full" and "onnx-tensors" not in p.tried  # not ONNX: that encoder stepped aside
    assert delta.apply(None, p.data) == b


def test_tensor_spans_find_every_raw_initializer(base):
    m = onnx.load_from_string(base)
    spans = delta.tensor_spans(base)
    raw = {i.name for i in m.graph.initializer if i.raw_data}
    assert set(spans) == raw
    for init in m.graph.initializer:
        if init.name in spans:
            s, e = spans[init.name]
            assert base[s:e] == init.raw_data


def test_wrong_base_is_a_clear_error_never_a_wrong_model(base):
    target = retrained(base, which="head")
    p = delta.encode(base, target)
    other = retrained(base, which="head", seed=9)
    with pytest.raises(DeltaError, match="wrong base"):
        delta.apply(other, p.data)
    with pytest.raises(DeltaError, match="wrong base"):
        delta.apply(None, p.data)


@pytest.mark.parametrize("alg", ["bsdiff4", "zstd-patch", "onnx-tensors"])
def test_each_algorithm_round_trips_and_detects_a_corrupt_payload(base, alg):
    target = retrained(base, which="head")
    patch = delta.encode_as(alg, base, target)
    assert delta.read_header(patch)[0]["alg"] == alg and delta.apply(base, patch) == target
    bad = bytearray(patch)
    bad[-20] ^= 0xFF
    with pytest.raises(DeltaError):
        delta.apply(base, bytes(bad))


@pytest.mark.parametrize("patch", [b"", b"EFD1", b"ABCD\x00\x00\x00\x02{}", b"EFD1\xff\xff\xff\xff{}",
                                   b'EFD1\x00\x00\x00\x02{}', b'EFD1\x00\x00\x00\x10{"alg": "magic"}'])
def test_malformed_patch_headers(patch):
    with pytest.raises(DeltaError):
        delta.apply(b"base", patch)


def test_truncated_patch(base):
    target = retrained(base, which="head")
    p = delta.encode(base, target)
    for cut in (10, len(p.data) // 2, len(p.data) - 1):
        with pytest.raises(DeltaError):
            delta.apply(base, p.data[:cut])


BASE = bytes(range(256)) * 40
TARGET = BASE[:5000] + b"new bytes" + BASE[5000:]
PATCHES = {alg: delta.encode(BASE, TARGET, delta.EncodeOptions(algorithms=(alg,))).data
           for alg in ("bsdiff4", "zstd-patch")}


def mutate_and_apply(base: bytes, target: bytes, patch: bytes, data) -> None:
    """Flip bytes or truncate, then apply: a DeltaError, or exactly the hash-checked target — nothing else."""
    blob = bytearray(patch)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(blob) - 1))
        if data.draw(st.booleans()):
            blob[i] ^= data.draw(st.integers(1, 255))
        else:
            del blob[i:]
            if not blob:
                break
    try:
        out = delta.apply(base, bytes(blob))
    except DeltaError:
        return
    assert out == target


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(PATCHES)), st.data())
def test_fuzzed_patches_end_in_delta_error_or_the_exact_target(alg, data):
    mutate_and_apply(BASE, TARGET, PATCHES[alg], data)


def test_bsdiff4_is_not_tried_above_its_encode_budget():
    rng = np.random.default_rng(3)
    a = rng.bytes(300_000)
    b = a[:1000] + b"changed" + a[1000:]
    p = delta.encode(a, b, delta.EncodeOptions(bsdiff_max_bytes=100_000))
    assert "bsdiff4" not in p.tried and p.algorithm == "zstd-patch"
    assert len(p.data) < 2_000 and delta.apply(a, p.data) == b


def test_zstd_patch_is_not_tried_above_its_budget_and_full_carries_the_update():
    rng = np.random.default_rng(4)
    a = rng.bytes(200_000)
    b = a[:500] + b"changed" + a[500:]
    p = delta.encode(a, b, delta.EncodeOptions(bsdiff_max_bytes=0, zstd_patch_max_bytes=100_000))
    assert set(p.tried) == {"full"} and p.algorithm == "full"  # random bytes, not ONNX: only the fallback
    assert delta.apply(a, p.data) == b


@functools.cache
def onnx_pair() -> tuple[bytes, bytes, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        base = zoo.mlp_opset(Path(tmp) / "m.onnx", opset=13).read_bytes()
    target = retrained(base, which="head")
    return base, target, delta.encode_as("onnx-tensors", base, target)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzzed_tensor_aware_patches_end_in_delta_error_or_the_exact_target(data):
    mutate_and_apply(*onnx_pair(), data)
