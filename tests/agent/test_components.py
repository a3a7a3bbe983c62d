"""Slots, the store's journal and outbox, the probe verdict, telemetry: each against the real thing (files, SQLite)."""

import hashlib
import json

import numpy as np
import pytest

from agent.machine import Snapshot, State
from agent.probe import ProbeDataError, judge, read_golden
from agent.slots import SlotError, SlotStore
from agent.store import Store
from agent.telemetry import LATENCY_EDGES_MS, Telemetry


def model_file(tmp_path, content: bytes):
    p = tmp_path / "incoming.onnx"
    p.write_bytes(content)
    return p, hashlib.sha256(content).hexdigest()


def test_slots_stage_into_the_inactive_slot_and_switch_atomically(tmp_path):
    slots = SlotStore(tmp_path)
    assert slots.active() is None and slots.inactive_slot() == "a"
    src, sha = model_file(tmp_path, b"model one")
    a = slots.stage(src, sha256=sha, fmt="onnx-int8", model="m", model_version="1", job="j1")
    assert a.slot == "a" and slots.active() is None  # staged is not active
    slots.switch_to("a")
    src, sha2 = model_file(tmp_path, b"model two")
    b = slots.stage(src, sha256=sha2, fmt="onnx-int8", model="m", model_version="2", job="j2")
    assert b.slot == "b" and slots.active().model_version == "1"  # never written over the active slot
    slots.switch_to("b")
    assert slots.pointer() == {"slot": "b", "previous": "a"}
    slots.restore("a")
    assert slots.active().model_version == "1"


def test_a_half_written_or_corrupted_slot_is_never_used(tmp_path):
    slots = SlotStore(tmp_path)
    src, sha = model_file(tmp_path, b"model one")
    slots.stage(src, sha256=sha, fmt="onnx-int8", model="m", model_version="1", job="j1")
    slots.switch_to("a")
    (tmp_path / "slots" / "a" / "model.onnx").write_bytes(b"model 0ne")  # bit rot / torn write
    assert slots.active() is None
    with pytest.raises(SlotError):
        slots.switch_to("a")
    with pytest.raises(SlotError, match="cannot be served"):
        slots.stage(src, sha256=sha, fmt="coreml-int8", model="m", model_version="1", job="j1")
    with pytest.raises(SlotError, match="does not hash"):
        slots.stage(src, sha256="0" * 64, fmt="onnx-int8", model="m", model_version="1", job="j1")
    assert not (tmp_path / "slots" / "b" / "slot.json").exists()  # a failed stage leaves the slot empty


def test_journal_round_trip_and_atomic_trust_update(tmp_path):
    store = Store(tmp_path / "agent.db")
    assert store.load_journal("m") == (Snapshot(), {})
    snap = Snapshot(state=State.PROBING, job="j1", restarts=1, transitions=3)
    store.save_journal("m", snap, {"job": "j1", "n": 1}, root=b"root-bytes", **{"update_version:m": b"7"})
    store.close()
    again = Store(tmp_path / "agent.db")
    assert again.load_journal("m") == (snap, {"job": "j1", "n": 1})
    assert again.load_journal("other") == (Snapshot(), {})  # each model has its own journal
    assert (again.get("root"), again.get("update_version:m")) == (b"root-bytes", b"7")


def test_outbox_keeps_order_and_drops_oldest_first_counting_them(tmp_path):
    store = Store(tmp_path / "agent.db")
    for i in range(10):
        store.enqueue("t", str(i).encode(), max_rows=6)
    rows = store.pending()
    assert [p for _, _, p in rows] == [str(i).encode() for i in range(4, 10)]
    assert store.take_dropped() == 4 and store.take_dropped() == 0
    store.acknowledge(rows[0][0])
    assert store.outbox_size() == 5


def probe_bytes(**arrays):
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_probe_verdicts():
    g = read_golden(probe_bytes(**{"in/x": np.ones((1, 4), np.float32), "out/y": np.arange(4.0).reshape(1, 4)}))
    assert set(g.inputs) == {"x"} and set(g.expected) == {"y"}
    ok = judge(g.expected, {"y": g.expected["y"] + 1e-4}, atol=1e-3, rtol=0, min_cosine=0.999)
    assert ok.passed
    close_in_direction = judge(g.expected, {"y": g.expected["y"] * 1.1}, atol=1e-3, rtol=0, min_cosine=0.999)
    assert close_in_direction.passed  # an INT8 model may drift in scale within the signed cosine bound
    bad = judge(g.expected, {"y": -g.expected["y"]}, atol=1e-3, rtol=0, min_cosine=0.999)
    assert not bad.passed and "cosine" in bad.detail
    assert not judge(g.expected, {"z": g.expected["y"]}, atol=1, rtol=1, min_cosine=0).passed
    assert not judge(g.expected, {"y": np.full((1, 4), np.nan)}, atol=1, rtol=1, min_cosine=0).passed
    assert not judge(g.expected, {"y": np.zeros((4,))}, atol=1, rtol=1, min_cosine=0).passed
    with pytest.raises(ProbeDataError):
        read_golden(b"not an npz")
    with pytest.raises(ProbeDataError):
        read_golden(probe_bytes(**{"in/x": np.ones(2)}))


def test_telemetry_window_percentiles_histograms_and_input_stats():
    clock = iter(range(1000)).__next__
    t = Telemetry(clock=lambda: float(clock()))
    rng = np.random.default_rng(0)
    lat = rng.uniform(1, 3, 500)
    for v in lat:
        t.record(float(v), inputs={"x": rng.standard_normal((1, 8)).astype(np.float32)})
    t.record(0.0, error="bad_input")
    batch = t.harvest(seq=3, model_version="m 1", slot="a", dropped=2)
    assert (batch.seq, batch.requests, batch.errors, batch.dropped_batches) == (3, 501, {"bad_input": 1}, 2)
    assert abs(batch.p50_ms - np.percentile(lat, 50)) < 1e-9 and batch.p99_ms <= 3
    big = Telemetry()
    big.record(1.0, inputs={"img": np.arange(128 * 128 * 3, dtype=np.float32)})
    s_big = big.harvest(seq=0, model_version=None, slot=None).inputs[0]
    assert s_big.count == 128 * 128 * 3 and sum(s_big.histogram.counts) <= 1024  # a strided sample per request
    assert s_big.min == 0 and abs(s_big.mean - 128 * 128 * 3 / 2) < 100
    assert sum(batch.latency_ms.counts) == 500 and batch.latency_ms.edges == LATENCY_EDGES_MS
    stats = batch.inputs[0]
    assert stats.name == "x" and stats.count == 4000 and abs(stats.mean) < 0.1 and abs(stats.std - 1) < 0.1
    assert sum(stats.histogram.counts) == 8 * 256  # the histogram is of the reservoir: 256 requests' samples
    json.loads(batch.to_bytes())  # a valid message
    empty = t.harvest(seq=4, model_version=None, slot=None)
    assert empty.requests == 0 and empty.p50_ms is None and empty.inputs == ()
