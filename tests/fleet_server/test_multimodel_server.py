"""Several named models per device on the server (issue 17): what the ingest stores from a state report, reconcile,
the delta base per model, the health gate's baseline, and the device and telemetry views.

Ingest runs through its real entry point (``Ingest.submit``) on SQLite and PostgreSQL; the views through the app on
both; delivery and the engine on SQLite with a real artifact store and fleet keys.
"""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime

import pytest
from sqlmodel import Session, select

from fleet_protocol import messages, topics
from fleet_protocol.messages import LATENCY_EDGES_MS
from fleet_protocol.vocabulary import UpdateState
from fleet_server import device_models
from fleet_server.artifacts import LocalArtifactStore
from fleet_server.db import make_engine
from fleet_server.ingest import Ingest
from fleet_server.keys import init_keys
from fleet_server.migrate import upgrade
from fleet_server.models import (
    ConversionJob,
    ConvertedArtifact,
    Device,
    DeviceModel,
    ModelVersion,
    Rollout,
    RolloutDevice,
    TelemetryWindow,
)
from fleet_server.rollouts.delivery import Delivery
from fleet_server.rollouts.engine import RolloutEngine, new_job_id
from fleet_server.rollouts.gates import Side, window_side
from tests.fleet_server.live_fleet import LiveFleet

A1, A2, B1, B2 = (hashlib.sha256(x.encode()).hexdigest() for x in ("a1", "a2", "b1", "b2"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def add_devices(engine, *ids: str, **fields) -> None:
    with Session(engine) as s:
        for d in ids:
            s.add(Device(id=d, profile="rpi5", signing_public_key=sha(d.encode()), mqtt_password_hash="x", **fields))
        s.commit()


def model(name: str, version: str | None, sha256: str | None, slot: str | None = "a", **extra) -> messages.ModelState:
    return messages.ModelState(name=name, active_version=f"{name} {version}" if version else None,
                               active_sha256=sha256, active_slot=slot, **extra)


def state(*models: messages.ModelState, **top) -> messages.DeviceState:
    """A state report as an agent with several models sends it: ``active_*`` describe the first model by name."""
    first = min(models, key=lambda m: m.name) if models else None
    fields = {"active_version": first.active_version, "active_sha256": first.active_sha256,
              "active_slot": first.active_slot} if first else {}
    return messages.DeviceState(root_version=1, update_version=0, ts=time.time(), models=models, **{**fields, **top})


def rows(engine, device_id: str) -> dict[str, DeviceModel]:
    with Session(engine) as s:
        return {r.model: r for r in s.exec(select(DeviceModel).where(DeviceModel.device_id == device_id))}


def ingest_states(engine, reports: list[tuple[str, bytes]]) -> Ingest:
    """Each report submitted as the broker hands it over, one batch after another; the ingest stopped after."""
    ingest = Ingest(engine).start()
    try:
        for n, (device_id, payload) in enumerate(reports, 1):
            ingest.submit(topics.topic(device_id, "state"), payload)
            LiveFleet.wait(lambda n=n: ingest.counts["state"] + ingest.counts["invalid"] >= n, 10, "the report written")
    finally:
        ingest.stop()
    return ingest


@pytest.fixture
def db(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    add_devices(engine, "d1", "d2")
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_db(tmp_path):
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    upgrade(url)
    engine = make_engine(url)
    add_devices(engine, "d1", "d2")
    yield engine
    engine.dispose()


# ----------------------------------------------------------------------------- migration


def test_multimodel_migration_gives_each_device_that_runs_a_model_its_row(database_url):
    """Devices send their state again only when they reconnect or update: the upgrade itself fills device_model from
    what the device rows say (an unlabelled model, or one with no name the registry could hold, gets none)."""
    upgrade(database_url, "0013")
    engine = make_engine(database_url)
    try:
        add_devices(engine, "runs", active_version="detector 1.0", active_sha256=A1)
        add_devices(engine, "nothing")
        add_devices(engine, "unlabelled", active_sha256=A1)
        add_devices(engine, "odd", active_version="<b>x</b> 1", active_sha256=A1)
        upgrade(database_url)
        with Session(engine) as s:
            stored = [(r.device_id, r.model, r.active_version, r.active_sha256, r.update_state)
                      for r in s.exec(select(DeviceModel))]
    finally:
        engine.dispose()
    assert stored == [("runs", "detector", "detector 1.0", A1, "idle")]


# ----------------------------------------------------------------------------- ingest


def test_multimodel_state_rows_are_stored_and_a_dropped_model_disappears(db):
    both = state(model("detector", "1.0", A1, job="r1-job", update_state=UpdateState.DOWNLOADING),
                 model("recognizer", "2.0", B1, slot="b"))
    ingest_states(db, [("d1", both.to_bytes()), ("d2", state(model("detector", "1.0", A1)).to_bytes())])
    stored = rows(db, "d1")
    assert set(stored) == {"detector", "recognizer"}
    assert (stored["detector"].active_version, stored["detector"].active_sha256, stored["detector"].active_slot,
            stored["detector"].update_state, stored["detector"].job) == ("detector 1.0", A1, "a", "downloading",
                                                                         "r1-job")
    assert (stored["recognizer"].active_version, stored["recognizer"].active_sha256, stored["recognizer"].active_slot,
            stored["recognizer"].update_state, stored["recognizer"].job) == ("recognizer 2.0", B1, "b", "idle", None)
    with Session(db) as s:  # the device row keeps describing the first model, as before several models
        assert (s.get(Device, "d1").active_version, s.get(Device, "d1").active_sha256) == ("detector 1.0", A1)

    # the recognizer is removed from d1 (and detector updated); d2 is untouched by d1's report
    ingest_states(db, [("d1", state(model("detector", "1.1", A2)).to_bytes())])
    assert {m: (r.active_version, r.active_sha256, r.update_state) for m, r in rows(db, "d1").items()} == {
        "detector": ("detector 1.1", A2, "idle")}
    assert set(rows(db, "d2")) == {"detector"}
    ingest_states(db, [("d1", state().to_bytes())])  # a report of no model at all leaves no row
    assert rows(db, "d1") == {}


def test_multimodel_reports_in_one_batch_keep_the_newest_per_device(sqlite_db):
    """Several reports of one device in one batch (a reconnect after an update): its last report wins."""
    ingest = Ingest(sqlite_db)  # queued before its thread starts: one batch
    ingest.submit(topics.topic("d1", "state"), state(model("detector", "1.0", A1),
                                                      model("recognizer", "2.0", B1)).to_bytes())
    ingest.submit(topics.topic("d2", "state"), state(model("detector", "1.0", A1)).to_bytes())
    ingest.submit(topics.topic("d1", "state"), state(model("recognizer", "2.1", B2)).to_bytes())
    ingest.start().stop()
    assert ingest.counts["state"] == 3
    assert {m: r.active_sha256 for m, r in rows(sqlite_db, "d1").items()} == {"recognizer": B2}
    assert set(rows(sqlite_db, "d2")) == {"detector"}


def test_multimodel_an_old_agents_state_keeps_one_row_named_by_its_label(sqlite_db):
    old = messages.DeviceState(active_version="detector 1.0", active_sha256=A1, active_slot="b", root_version=1,
                               update_version=0, ts=time.time())
    ingest_states(sqlite_db, [("d1", old.to_bytes())])
    stored = rows(sqlite_db, "d1")
    assert list(stored) == ["detector"]
    assert (stored["detector"].active_version, stored["detector"].active_sha256, stored["detector"].active_slot,
            stored["detector"].update_state) == ("detector 1.0", A1, "b", "idle")

    # an old agent that runs nothing yet, or labels its model with no name the registry could hold: no row
    nothing = messages.DeviceState(root_version=1, update_version=0, ts=time.time())
    odd = messages.DeviceState(active_version="<img src=x> 1.0", active_sha256=A1, root_version=1,
                               update_version=0, ts=time.time())
    ingest_states(sqlite_db, [("d1", nothing.to_bytes()), ("d2", odd.to_bytes())])
    assert rows(sqlite_db, "d1") == {} and rows(sqlite_db, "d2") == {}


@pytest.mark.parametrize("payload", [
    # a model listed twice, a name the registry cannot hold, a slot that does not exist: refused by the parser
    b'{"v":1,"type":"state","root_version":1,"update_version":0,"ts":1,"models":[{"name":"m"},{"name":"m"}]}',
    b'{"v":1,"type":"state","root_version":1,"update_version":0,"ts":1,"models":[{"name":"../m"}]}',
    b'{"v":1,"type":"state","root_version":1,"update_version":0,"ts":1,"models":[{"name":"m","active_slot":"c"}]}',
])
def test_multimodel_a_bad_model_list_is_refused_and_stores_nothing(sqlite_db, payload):
    ingest = ingest_states(sqlite_db, [("d1", payload)])
    assert ingest.counts["invalid"] == 1 and rows(sqlite_db, "d1") == {}


def test_multimodel_reconcile_installs_a_member_whose_artifact_the_second_model_runs(sqlite_db):
    with Session(sqlite_db) as s:
        mv = ModelVersion(name="recognizer", version="2.1", source_sha256=B2, source_format="onnx",
                          calibration_sha256=B2)
        s.add(mv)
        s.commit()
        r = Rollout(model_version_id=mv.id, state="running")
        s.add(r)
        s.commit()
        for d in ("d1", "d2"):
            s.add(RolloutDevice(rollout_id=r.id, device_id=d, job=new_job_id(r.id), status="offered",
                                artifact_sha256=B2, offered_at=time.time()))
        s.commit()
    # d1's first model is the detector: only its second model runs the rollout's artifact; d2 runs the old one
    ingest = ingest_states(sqlite_db, [
        ("d1", state(model("detector", "1.0", A1), model("recognizer", "2.1", B2)).to_bytes()),
        ("d2", state(model("detector", "1.0", A1), model("recognizer", "2.0", B1)).to_bytes())])
    with Session(sqlite_db) as s:
        status = {m.device_id: (m.status, m.detail) for m in s.exec(select(RolloutDevice))}
    assert status == {"d1": ("installed", "reconciled from the device's state report"), "d2": ("offered", "")}
    assert ingest.counts["reconciled"] == 1


# ----------------------------------------------------------------------------- delta base per model


@pytest.mark.parametrize(("models", "model_name", "active_version", "active_sha256", "base"), [
    ({"A": A1, "B": B1}, "B", "A 1", A1, B1),  # the rollout's model's own slot, not the device's first model
    ({"A": A1, "B": B1}, "C", "A 1", A1, None),  # a model the device never had: the full file
    ({"A": A1, "B": None}, "B", "A 1", A1, None),  # listed, but not installed yet
    ({}, "A", "A 1", A1, A1),  # no rows yet (not heard from since the upgrade): its one model, when it is this one
    ({}, "B", "A 1", A1, None),
    ({}, "A", "AB 1", A1, None),  # another model whose name starts with this one's
    ({}, "A", None, A1, None),  # an unlabelled model is no model's base
])
def test_multimodel_delta_base_table(models, model_name, active_version, active_sha256, base):
    assert device_models.delta_base(models, model=model_name, active_version=active_version,
                                    active_sha256=active_sha256) == base


def _register(s: Session, store: LocalArtifactStore, name: str, version: str, data: bytes) -> ConvertedArtifact:
    mv = ModelVersion(name=name, version=version, source_sha256=sha(data), source_format="onnx",
                      calibration_sha256=sha(data))
    s.add(mv)
    s.commit()
    job = ConversionJob(model_version_id=mv.id, profiles=["rpi5"], status="succeeded")
    s.add(job)
    s.commit()
    art = ConvertedArtifact(job_id=job.id, model_version_id=mv.id, profile="rpi5", format="onnx-int8",
                            status="shippable", artifact_sha256=store.put_bytes(data), size=len(data),
                            report_sha256=store.put_bytes(b"{}"), probe_sha256=store.put_bytes(b"probe"))
    s.add(art)
    s.commit()
    return art


def test_multimodel_delta_base_is_what_the_rollouts_model_runs_on_the_device(sqlite_db, tmp_path):
    """A device with model A v1 and B v1 gets a B v2 update as a delta from B v1 (not from A v1, its first model), and
    model C, which it never had, as the full file."""
    store = LocalArtifactStore(tmp_path / "artifacts")
    init_keys(tmp_path / "data", tmp_path / "root.pem")
    delivery = Delivery(tmp_path / "data", store)
    a1, b1 = os.urandom(200_000), os.urandom(200_000)
    b2 = b1[:100_000] + b"changed weights" + b1[100_100:]
    with Session(sqlite_db, expire_on_commit=False) as s:  # the artifacts are read after
        _register(s, store, "A", "1", a1)
        _register(s, store, "B", "1", b1)
        target_b2 = _register(s, store, "B", "2", b2)
        target_c1 = _register(s, store, "C", "1", os.urandom(50_000))
        device_models.replace(s, {"d1": state(model("A", "1", sha(a1)), model("B", "1", sha(b1)))},
                              now=datetime.now(UTC))
        d1 = s.get(Device, "d1")  # as the ingest keeps it: the first model
        d1.active_version, d1.active_sha256 = "A 1", sha(a1)
        s.add(d1)
        s.commit()

    def offer(device_id: str, art: ConvertedArtifact) -> tuple[RolloutDevice, messages.UpdateOffer]:
        with Session(sqlite_db) as s:
            mv = s.get(ModelVersion, art.model_version_id)
            member = RolloutDevice(rollout_id=0, device_id=device_id, job=new_job_id(0))
            sent = delivery.offer(s, member=member, device=s.get(Device, device_id), mv=mv, art=art, encrypt=False)
            return member, sent

    member, sent = offer("d1", target_b2)
    assert (member.delivery, member.base_sha256, sent.base_sha256) == ("delta", sha(b1), sha(b1))
    assert member.bytes_offered < len(b2) // 10
    member, sent = offer("d1", target_c1)
    assert (member.delivery, member.base_sha256, sent.base_sha256) == ("full", None, None)

    # a device not heard from since the upgrade (no model rows): its one model is the base, for that model only
    with Session(sqlite_db) as s:
        d2 = s.get(Device, "d2")
        d2.active_version, d2.active_sha256 = "B 1", sha(b1)
        s.add(d2)
        s.commit()
    member, _ = offer("d2", target_b2)
    assert (member.delivery, member.base_sha256) == ("delta", sha(b1))
    member, _ = offer("d2", target_c1)
    assert (member.delivery, member.base_sha256) == ("full", None)


# ----------------------------------------------------------------------------- the health gate's baseline


@pytest.mark.parametrize(("label", "end", "side"), [
    ("B 2", 300.0, Side.AFTER),  # the new version, after the install
    ("B 2", 150.0, None),  # the new version before the install finished (staging, probing)
    ("B 1", 50.0, Side.BEFORE),  # the same model's previous version, before the offer: the baseline
    ("B 1", 300.0, None),  # the previous version after the offer (still serving while it downloads, or back)
    ("A 1", 50.0, None),  # another model of the device: never the baseline
    ("A 1", 300.0, None),
    ("BB 1", 50.0, None),  # a model whose name starts with this one's
    (None, 50.0, None),
])
def test_multimodel_window_side_table(label, end, side):
    assert window_side(label, end, model="B", version_label="B 2", offered_at=100.0, finished_at=200.0) is side


def _window(device_id: str, seq: int, label: str, end: float, *, ms: float, requests: int, errors: int = 0):
    counts = [0] * (len(LATENCY_EDGES_MS) - 1)
    counts[max(i for i, edge in enumerate(LATENCY_EDGES_MS[:-1]) if edge <= ms)] = requests
    return TelemetryWindow(device_id=device_id, seq=seq, window_start=end - 10, window_end=end, model_version=label,
                           requests=requests, errors=errors, latency_edges=list(LATENCY_EDGES_MS),
                           latency_counts=counts, inputs=[])


def test_multimodel_gate_baseline_ignores_the_other_models_windows(sqlite_db, tmp_path):
    """d1 serves a fast, busy model A and a slow model B; B 2 is as slow as B 1. Judged against A's latency (any
    other label), B 2 looked 10× slower and the rollout halted; judged against B 1 it passes."""
    now = time.time()
    offered, finished = now - 600, now - 300
    with Session(sqlite_db) as s:
        mv = ModelVersion(name="B", version="2", source_sha256=B2, source_format="onnx", calibration_sha256=B2)
        s.add(mv)
        s.commit()
        r = Rollout(model_version_id=mv.id, state="running",
                    gates={"max_p99_ratio": 1.5, "max_error_rate": 0.05, "min_requests": 20})
        s.add(r)
        s.commit()
        rollout_id = r.id
        s.add(RolloutDevice(rollout_id=r.id, device_id="d1", job=new_job_id(r.id), status="installed",
                            artifact_sha256=B2, offered_at=offered, finished_at=finished))
        s.add(RolloutDevice(rollout_id=r.id, device_id="d2", job=new_job_id(r.id), status="skipped"))
        seq = iter(range(1000))
        for k in range(5):
            s.add(_window("d1", next(seq), "A 1", offered - 100 * k, ms=1.0, requests=20_000))  # fast and busy
            s.add(_window("d1", next(seq), "B 1", offered - 100 * k, ms=10.0, requests=100))
            s.add(_window("d1", next(seq), "B 2", finished + 10 + k, ms=10.0, requests=100))
            s.add(_window("d1", next(seq), "A 1", finished + 10 + k, ms=1.0, requests=100, errors=50))  # not B's
        s.commit()
    engine = RolloutEngine(sqlite_db, Delivery(tmp_path / "data", LocalArtifactStore(tmp_path / "artifacts")),
                           lambda *a, **k: None)
    engine.step(rollout_id, now)
    with Session(sqlite_db) as s:
        r = s.get(Rollout, rollout_id)
        figures = r.evaluation["figures"]
        assert r.evaluation["verdict"] == "pass", r.evaluation
        assert r.state == "completed"
    assert figures["error_rate"] == 0 and 0.9 <= figures["p99_ratio"] <= 1.1
    assert figures["p99_before_ms"] >= 10.0


# ----------------------------------------------------------------------------- views


def _report(server, device_id: str, report: messages.DeviceState) -> None:
    with Session(server.app.state.engine) as s:
        device_models.replace(s, {device_id: report}, now=datetime.now(UTC))
        d = s.get(Device, device_id)
        d.active_version, d.active_sha256 = report.active_version, report.active_sha256
        s.add(d)
        s.commit()


def test_multimodel_device_views_list_every_model_and_filter_on_any(server):
    add_devices(server.app.state.engine, "m-both", "m-det", "m-none", "m-old")
    _report(server, "m-both", state(model("detector", "1.0", A1), model("recognizer", "2.0", B1, slot="b",
                                                                      update_state=UpdateState.STAGING, job="r3-j")))
    _report(server, "m-det", state(model("detector", "1.1", A2)))
    _report(server, "m-old", messages.DeviceState(active_version="recognizer 2.0", active_sha256=B1, root_version=1,
                                                  update_version=0, ts=time.time()))
    viewer = server.as_("viewer")
    page = server.get("/v1/devices", headers=viewer).json()
    by_id = {d["id"]: d for d in page["items"]}
    assert [m["name"] for m in by_id["m-both"]["models"]] == ["detector", "recognizer"]
    recognizer = by_id["m-both"]["models"][1]
    assert {k: recognizer[k] for k in ("active_version", "active_sha256", "active_slot", "update_state", "job")} == {
        "active_version": "recognizer 2.0", "active_sha256": B1, "active_slot": "b", "update_state": "staging",
        "job": "r3-j"}
    assert recognizer["updated_at"].endswith("Z")
    assert by_id["m-none"]["models"] == [] and [m["name"] for m in by_id["m-old"]["models"]] == ["recognizer"]
    assert by_id["m-both"]["active_version"] == "detector 1.0"  # the first model, as before

    detail = server.get("/v1/devices/m-both", headers=viewer).json()
    assert [(m["name"], m["active_version"]) for m in detail["models"]] == [("detector", "detector 1.0"),
                                                                            ("recognizer", "recognizer 2.0")]
    assert detail["models"][1]["updated_at"].endswith("Z")
    patched = server.patch("/v1/devices/m-both", json={"tags": ["site:lab"]}, headers=server.as_("operator")).json()
    assert [m["name"] for m in patched["models"]] == ["detector", "recognizer"]

    def ids(**params) -> list[str]:
        return [d["id"] for d in server.get("/v1/devices", params=params, headers=viewer).json()["items"]]

    assert ids(model_version="recognizer 2.0") == ["m-both", "m-old"]  # the second model's label matches too
    assert ids(model_version="detector 1.0") == ["m-both"]
    assert ids(model="detector") == ["m-both", "m-det"]
    assert ids(model="recognizer", tag="site:lab") == ["m-both"]
    assert ids(model="detector", model_version="detector 1.1") == ["m-det"]
    assert ids(model="detect") == [] and ids(model_version="recognizer") == []
    assert server.get("/v1/devices", params={"model": "x" * 65}, headers=viewer).status_code == 422

    # the console: versions counted per model label, its device table filtered on any model's label
    versions = server.get("/v1/console/fleet", headers=viewer).json()["versions"]
    assert versions == {"detector 1.0": 1, "detector 1.1": 1, "recognizer 2.0": 2, "none": 1}
    console = server.get("/v1/console/devices", params={"version": "recognizer 2.0"}, headers=viewer).json()
    assert [d["id"] for d in console["items"]] == ["m-both", "m-old"]
    assert [m["name"] for m in console["items"][0]["models"]] == ["detector", "recognizer"]
    none = server.get("/v1/console/devices", params={"version": "none"}, headers=viewer).json()
    assert [d["id"] for d in none["items"]] == ["m-none"]


def test_multimodel_telemetry_filters_on_the_model_name(server):
    engine = server.app.state.engine
    add_devices(engine, "t1", "t2")
    now = time.time()
    with Session(engine) as s:
        for device_id in ("t1", "t2"):
            for k in range(3):
                s.add(_window(device_id, 2 * k, "detector 1.0", now - 10 * k, ms=1.0, requests=10))
                s.add(_window(device_id, 2 * k + 1, "recognizer 2.0", now - 10 * k, ms=10.0, requests=30))
        s.add(_window("t1", 100, "detector_x 1.0", now, ms=1.0, requests=1))  # "_" is no wildcard
        s.add(_window("t1", 101, "detectorx 1.0", now, ms=1.0, requests=1))
        s.commit()
    viewer = server.as_("viewer")
    windows = server.get("/v1/devices/t1/telemetry", params={"model": "recognizer"}, headers=viewer).json()["windows"]
    assert len(windows) == 3 and {w["model_version"] for w in windows} == {"recognizer 2.0"}
    windows = server.get("/v1/devices/t1/telemetry", params={"model": "detector"}, headers=viewer).json()["windows"]
    assert {w["model_version"] for w in windows} == {"detector 1.0"}
    assert len(server.get("/v1/devices/t1/telemetry", headers=viewer).json()["windows"]) == 8
    cohort = server.get("/v1/telemetry", params={"model": "recognizer", "since": now - 100, "bucket_s": 3600},
                        headers=viewer).json()
    assert cohort["windows"] == 6 and sum(b["requests"] for b in cohort["series"]) == 180
    assert all(b["p50_ms"] >= 10 for b in cohort["series"])
    cohort = server.get("/v1/telemetry", params={"model": "detector_", "since": now - 100}, headers=viewer).json()
    assert cohort["windows"] == 0


def test_multimodel_console_drift_shows_each_model_of_a_device(server):
    """With two models the device page's drift was whichever model reported last (it flipped between polls): now one
    entry per model, by name, each from its own newest label's windows."""
    engine = server.app.state.engine
    add_devices(engine, "dr1")
    now = time.time()
    with Session(engine) as s:
        for k in range(3):
            s.add(_window("dr1", 2 * k, "detector 1.0", now - 10 * k, ms=1.0, requests=10))
            s.add(_window("dr1", 2 * k + 1, "recognizer 2.0", now - 10 * k - 1, ms=1.0, requests=10))
        s.add(_window("dr1", 9, "recognizer 1.0", now - 100, ms=1.0, requests=10))  # the version before
        s.commit()
    doc = server.get("/v1/console/devices/dr1/drift", headers=server.as_("viewer")).json()
    assert [(m["model_version"], m["windows"]) for m in doc["models"]] == [("detector 1.0", 3), ("recognizer 2.0", 3)]
    assert doc["model_version"] == "detector 1.0" and doc["windows"] == 7


# ----------------------------------------------------------------------------- fleet_sim


def test_multimodel_simulated_devices_report_their_model_and_the_ingest_stores_it(sqlite_db):
    """The simulator's state report (what the benchmarks send at scale) lists its one named model, and the ingest
    stores it as such."""
    from fleet_protocol.keys import generate_signer
    from fleet_protocol.metadata import build_root
    from fleet_sim.sim import SimFleet

    fleet = SimFleet("mqtt://127.0.0.1:1", build_root([generate_signer()], [generate_signer()],
                                                      expires=datetime.now(UTC).replace(year=2100)))
    sent: list[tuple[str, bytes]] = []
    try:
        labelled = fleet.add("d1", profile="rpi5", active_sha256=B1, active_label="recognizer 2.0")
        bare = fleet.add("d2", profile="rpi5", active_sha256=None)
        for dev in (labelled, bare):
            dev.client.publish = lambda topic, payload, qos=0, retain=False, properties=None: sent.append(
                (topic, payload))
            dev.report_state()
    finally:
        fleet.close()
    reports = {topics.parse(t).device: messages.parse_for("state", p) for t, p in sent}
    assert reports["d1"].models == (messages.ModelState(name="recognizer", active_version="recognizer 2.0",
                                                        active_sha256=B1, active_slot="a"),)
    assert reports["d2"].models == ()
    ingest_states(sqlite_db, [(topics.parse(t).device, p) for t, p in sent])
    assert {m: (r.active_version, r.active_sha256) for m, r in rows(sqlite_db, "d1").items()} == {
        "recognizer": ("recognizer 2.0", B1)}
    assert rows(sqlite_db, "d2") == {}
