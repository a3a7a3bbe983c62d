"""The golden-probe file format: what the conversion writes, the agent reads back, and every malformed file is one
ProbeDataError (a MalformedError, so the agent reports it as malformed) before anything big is unpacked."""

import io
import pickle

import numpy as np
import pytest

from fleet_protocol.errors import MalformedError
from fleet_protocol.probe import (
    MAX_PROBE_BYTES,
    MAX_PROBE_UNPACKED_BYTES,
    ProbeDataError,
    read_golden,
    write_golden,
)

RNG = np.random.default_rng(0)
INPUTS = {"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32), "input.1": np.arange(4, dtype=np.int64),
          "serving_default_x:0": np.array([True, False]), "features/ids": np.zeros((2, 0), np.int8)}
OUTPUTS = {"logits": RNG.standard_normal((1, 10)).astype(np.float32), "score": np.float16(0.5),
           "boxes/xyxy": RNG.standard_normal((1, 4, 4))}
GOOD = write_golden(INPUTS, OUTPUTS)


def npz(compressed: bool = False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


@pytest.mark.parametrize(("inputs", "outputs"), [
    (INPUTS, OUTPUTS),
    ({"x": np.ones((1, 4), np.float32)}, {"y": np.arange(4.0).reshape(1, 4)}),
    ({"a": np.uint8(7)}, {"b": np.array([], np.float32)}),  # scalars and empty arrays survive too
])
def test_written_probe_reads_back_exactly(inputs, outputs):
    golden = read_golden(write_golden(inputs, outputs))
    assert set(golden.inputs) == set(inputs) and set(golden.expected) == set(outputs)
    for name, value in [*inputs.items(), *outputs.items()]:
        got = golden.inputs.get(name, golden.expected.get(name))
        assert got.dtype == np.asarray(value).dtype and np.array_equal(got, value)


def test_a_hand_made_npz_with_the_same_members_reads_like_a_written_one():
    golden = read_golden(npz(**{"in/x": INPUTS["x"], "out/logits": OUTPUTS["logits"]}))
    assert np.array_equal(golden.inputs["x"], INPUTS["x"]) and np.array_equal(golden.expected["logits"],
                                                                               OUTPUTS["logits"])


def test_compressed_npz_is_read_too():
    assert set(read_golden(npz(compressed=True, **{"in/x": INPUTS["x"], "out/y": OUTPUTS["logits"]})).inputs) == {"x"}


BOMB = npz(compressed=True, **{"in/x": np.zeros(MAX_PROBE_UNPACKED_BYTES // 8 + 1, np.float64),
                               "out/y": np.zeros(1)})

MALFORMED = {
    "empty": (b"", "not an npz"),
    "text": (b"not an npz", "not an npz"),
    "a bare .npy": (npy(np.ones(3)), "not an npz"),
    "a pickle": (pickle.dumps({"in/x": np.ones(3)}), "not an npz"),
    "truncated to its magic": (GOOD[:4], "not a readable npz"),
    "truncated in the middle": (GOOD[: len(GOOD) // 2], "not a readable npz"),
    "truncated by one byte": (GOOD[:-1], "not a readable npz"),
    "array data corrupted": (flip(GOOD, len(GOOD) // 3), "not a readable npz"),
    "compressed data corrupted": (flip(npz(compressed=True, **{"in/x": np.arange(5000.0), "out/y": np.ones(3)}), 200),
                                  "not a readable npz"),
    "pickled object array": (npz(**{"in/x": np.array([{"a": 1}], dtype=object), "out/y": np.ones(2)}),
                             "not a readable npz"),
    "too large": (GOOD + b"\0" * (MAX_PROBE_BYTES - len(GOOD) + 1), f"limit {MAX_PROBE_BYTES}"),
    "unpacks too large": (BOMB, f"limit {MAX_PROBE_UNPACKED_BYTES}"),
    "no outputs": (npz(**{"in/x": np.ones(2)}), "needs in/<name> and out/<name>"),
    "no inputs": (npz(**{"out/y": np.ones(2)}), "needs in/<name> and out/<name>"),
    "neither": (npz(x=np.ones(2), y=np.ones(2)), "needs in/<name> and out/<name>"),
    "no arrays at all": (npz(), "not an npz"),  # an empty zip has only its end record
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_probe_is_refused_as_probe_data(case):
    data, message = MALFORMED[case]
    with pytest.raises(ProbeDataError, match=message.replace("<", ".").replace(">", ".")):
        read_golden(data)


def test_the_bomb_is_small_on_the_wire():
    assert len(BOMB) < MAX_PROBE_BYTES  # refused for what it would unpack to, not for its own size


def test_probe_errors_are_malformed_protocol_data():
    assert issubclass(ProbeDataError, MalformedError)
