"""The ingest's fast telemetry decoder (fleet_server/fastdecode.py) may only ever be stricter than the protocol's
parser: whatever it accepts, ``fleet_protocol.messages.parse_for`` accepts with the same values. Checked over every
field's boundaries and over generated windows; a protocol change that the mirror does not follow fails here."""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_protocol import messages
from fleet_protocol.errors import ProtocolError
from fleet_server import fastdecode

EDGES = list(messages.LATENCY_EDGES_MS)


def window(**changes) -> dict:
    base = {"v": 1, "type": "telemetry", "seq": 7, "window_start": 1_700_000_000.0, "window_end": 1_700_000_010.5,
            "model_version": "det 1.2.0", "slot": "a", "requests": 120, "errors": {"runtime": 2, "timeout": 1},
            "latency_ms": {"edges": EDGES, "counts": [1] * (len(EDGES) - 1)},
            "p50_ms": 3.5, "p95_ms": 9.0, "p99_ms": 12.0, "cpu_percent": 31.0, "rss_mb": 88.5, "temperature_c": -4.5,
            "inputs": [{"name": "image", "count": 120, "mean": 0.4, "std": 0.2, "min": -1.0, "max": 1.0,
                        "histogram": {"edges": [-1.0, 0.0, 1.0], "counts": [60, 60]}}],
            "dropped_batches": 0}
    for key, value in changes.items():
        if value is DROP:
            base.pop(key, None)
        else:
            base[key] = value
    return base


DROP = object()


def stored(m) -> dict:
    """What the ingest stores of a window, whichever decoder made it."""
    if isinstance(m, fastdecode.TelemetryBatch):
        edges, counts = fastdecode.latency_json(m)
        inputs = json.loads(fastdecode.inputs_json(m))
    else:
        edges = json.dumps(m.latency_ms.edges) if m.latency_ms else None
        counts = json.dumps(list(m.latency_ms.counts)) if m.latency_ms else None
        inputs = [i.model_dump(mode="json") for i in m.inputs]
    return {"seq": m.seq, "window_start": m.window_start, "window_end": m.window_end,
            "model_version": m.model_version, "requests": m.requests, "errors": dict(m.errors),
            "edges": json.loads(edges) if edges else None, "counts": json.loads(counts) if counts else None,
            "cpu": m.cpu_percent, "rss": m.rss_mb, "temperature": m.temperature_c, "inputs": inputs,
            "p": (m.p50_ms, m.p95_ms, m.p99_ms), "slot": m.slot, "dropped": m.dropped_batches}


def protocol(raw: bytes):
    try:
        return messages.parse_for("tm", raw)
    except ProtocolError:
        return None


def check(raw: bytes) -> tuple[bool, bool]:
    """(fast accepted, protocol accepted); fails if the fast decoder accepts what the protocol refuses, or differs."""
    fast, slow = fastdecode.telemetry(raw), protocol(raw)
    if fast is not None:
        assert slow is not None, f"the fast decoder accepted what the protocol refuses: {raw[:300]!r}"
        assert stored(fast) == stored(slow)
    return fast is not None, slow is not None


def test_fastdecode_a_real_window_takes_the_fast_path_with_the_protocols_values():
    assert check(json.dumps(window()).encode()) == (True, True)
    assert check(json.dumps(window(latency_ms=None, inputs=[], errors={})).encode()) == (True, True)
    minimal = {"seq": 0, "window_start": 0, "window_end": 1, "requests": 0}  # defaults, integers for floats
    assert check(json.dumps(minimal).encode()) == (True, True)


BOUNDARIES = [
    # (field, value): each is checked both ways; the fast decoder must refuse whatever the protocol refuses
    ("seq", -1), ("seq", messages.INT64_MAX), ("seq", messages.INT64_MAX + 1), ("seq", 1.0), ("seq", "5"),
    ("seq", True), ("seq", None), ("seq", DROP),
    ("window_start", -0.001), ("window_start", 1e11), ("window_start", 1e11 + 1), ("window_end", "1"),
    ("requests", messages.INT32_MAX), ("requests", messages.INT32_MAX + 1), ("requests", -1),
    ("v", 2), ("v", "1"), ("type", "telemetry2"), ("type", "state"), ("extra", 1),
    ("model_version", "x" * 64), ("model_version", "x" * 65), ("model_version", 5), ("model_version", "é" * 64),
    ("slot", "c"), ("slot", None), ("slot", "A"),
    ("errors", {"": 1}), ("errors", {"x" * 65: 1}), ("errors", {"e": -1}), ("errors", {"e": messages.INT32_MAX + 1}),
    ("errors", {f"e{i}": 1 for i in range(65)}), ("errors", {f"e{i}": 1 for i in range(64)}), ("errors", []),
    ("latency_ms", {"edges": [0.0], "counts": []}), ("latency_ms", {"edges": EDGES, "counts": [1] * len(EDGES)}),
    ("latency_ms", {"edges": [float(i) for i in range(257)], "counts": [0] * 256}),
    ("latency_ms", {"edges": [0.0, 1.0], "counts": [-1]}), ("latency_ms", {"edges": [0.0, 1.0], "counts": [0],
                                                                           "x": 1}),
    ("latency_ms", {"edges": [0.0, "1"], "counts": [0]}), ("latency_ms", {"edges": [0, 1], "counts": [3]}),
    ("latency_ms", {"edges": [0.0, 1e308], "counts": [1]}), ("latency_ms", {"edges": [0.0, 1.0], "counts": [1.0]}),
    ("p50_ms", -0.1), ("cpu_percent", -1), ("rss_mb", 1e308), ("temperature_c", -1e308), ("temperature_c", "hot"),
    ("inputs", [{"name": "x", "count": 1, "mean": 0, "std": -1, "min": 0, "max": 0,
                 "histogram": {"edges": [0, 1], "counts": [1]}}]),
    ("inputs", [{"name": "x" * 129, "count": 1, "mean": 0, "std": 0, "min": 0, "max": 0,
                 "histogram": {"edges": [0, 1], "counts": [1]}}]),
    ("inputs", [{"name": "x", "count": 1, "mean": 0, "std": 0, "min": 0, "max": 0,
                 "histogram": {"edges": [float(i) for i in range(66)], "counts": [1] * 65}}]),
    ("inputs", [{"name": "x", "count": 1, "mean": 0, "std": 0, "min": 0, "max": 0,
                 "histogram": {"edges": [0, 1, 2], "counts": [1]}}]),
    ("inputs", [{"name": "x", "count": 1, "mean": 0, "std": 0, "min": 0, "max": 0, "extra": 1,
                 "histogram": {"edges": [0, 1], "counts": [1]}}]),
    ("inputs", [window()["inputs"][0]] * 65), ("dropped_batches", -1), ("dropped_batches", messages.INT64_MAX + 1),
]


def test_fastdecode_every_boundary_is_refused_wherever_the_protocol_refuses_it():
    outcomes = []
    for field, value in BOUNDARIES:
        outcomes.append((field, check(json.dumps(window(**{field: value})).encode())))
    refused = [field for field, (_, slow) in outcomes if not slow]
    assert len(refused) >= 35  # the table really probes the protocol's refusals, not only valid values
    fast_accepts = [field for field, (fast, _) in outcomes if fast]
    assert len(fast_accepts) >= 8  # ...and the fast path still takes the valid boundaries


def test_fastdecode_non_json_numbers_nul_and_oversize_go_to_the_protocols_parser():
    good = json.dumps(window())
    for raw in [good.replace("31.0", "NaN"), good.replace("31.0", "Infinity"), good.replace("31.0", "1e400"),
                good.replace('"det 1.2.0"', '"det\\u0000"'), good + "x", good[:-1], good.replace('"a"', '"\\ud800"')]:
        fast, _ = check(raw.encode())
        assert not fast
    assert fastdecode.telemetry(b" " * (messages.MAX_MESSAGE_BYTES + 1)) is None
    assert not math.isnan(fastdecode.telemetry(good.encode()).cpu_percent)


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
number = st.one_of(st.integers(min_value=-(2**64), max_value=2**64), finite, st.just(1e11), st.just(-0.0))
scalar = st.one_of(number, st.none(), st.booleans(), st.text(max_size=70))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(["seq", "window_start", "window_end", "requests", "model_version",
                                                "slot", "p50_ms", "cpu_percent", "rss_mb", "temperature_c",
                                                "dropped_batches", "v"]), scalar, max_size=4),
       counts=st.lists(st.integers(min_value=-1, max_value=2**63), min_size=0, max_size=3),
       edges=st.lists(finite, min_size=0, max_size=4))
def test_fastdecode_generated_windows_never_pass_where_the_protocol_refuses(changes, counts, edges):
    check(json.dumps(window(**changes)).encode())
    check(json.dumps(window(latency_ms={"edges": edges, "counts": counts})).encode())
