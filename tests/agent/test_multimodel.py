"""Several named models per device: each with its own slots, journal, update and telemetry. The migration of a
single-model state directory against real files and SQLite; the rest with real agent processes, a real Mosquitto
and real signed offers."""

import io
import json
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import numpy as np
import onnxruntime as ort
import pytest

from agent.daemon import Agent
from agent.machine import Snapshot
from agent.models import MIGRATING, estimated_bytes, migrate_single_model
from agent.settings import AgentSettings
from agent.slots import SlotStore, sha256_file
from agent.store import Store
from fleet_protocol.keys import generate_signer
from fleet_protocol.messages import MAX_MODELS
from fleet_protocol.metadata import build_root
from fleet_protocol.vocabulary import Reason
from tests import zoo
from tests.fleet_driver import Release, golden

from .test_power_loss_e2e import wait_log
from .test_update_steps import signed_offer

X = np.random.default_rng(42).standard_normal((1, 3, 16, 16)).astype(np.float32)


def post(port: int, path: str, x: np.ndarray = X) -> tuple[int, bytes]:
    buf = io.BytesIO()
    np.save(buf, x)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=buf.getvalue(),
                                 headers={"Content-Type": "application/x-npy"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def predict(port: int, model: str, x: np.ndarray = X) -> np.ndarray:
    status, body = post(port, f"/v1/models/{model}/predict", x)
    assert status == 200, body
    return np.load(io.BytesIO(body))


def get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


def reference(release: Release, x: np.ndarray = X) -> np.ndarray:
    return ort.InferenceSession(release.data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def wait_models_idle(port: int, timeout: float = 20.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        listed = {m["name"]: m for m in get(port, "/v1/models")["models"]}
        if all(m["update"]["state"] == "idle" for m in listed.values()) or time.monotonic() > deadline:
            return listed
        time.sleep(0.05)


def install(fleet, agent, job: str, release: Release, **kw) -> None:
    fleet.offer(job, release, **kw)
    result = fleet.wait_result(job)
    assert result.result == "ok" and result.state == "committed", (result, agent.output()[-3000:])
    wait_models_idle(agent.port)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A second model, named "detector" (the releases fixture's are "classifier")."""
    d = tmp_path_factory.mktemp("detector")
    out = {}
    for version, seed in (("1.0.0", 7), ("2.0.0", 8)):
        path = zoo.mlp_opset(d / f"det-{version}.onnx", opset=13, seed=seed)
        out[version] = Release("detector", version, path.read_bytes(), golden(path, {"x": X}))
    return out


# ------------------------------------------------------------------ migration (real files, real SQLite)


def legacy_state(tmp_path, release: Release, *, journal: bool = True) -> tuple:
    """A state directory as an agent serving one model left it: slots/, active.json, the journal key."""
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "m.onnx").write_bytes(release.data)
    slots = SlotStore(state)  # the old layout: the slot store at the state directory's root
    info = slots.stage(tmp_path / "m.onnx", sha256=release.sha256, fmt="onnx-int8", model=release.model,
                       model_version=release.version, job="j1")
    slots.switch_to(info.slot)
    store = Store(state / "agent.db")
    if journal:
        store.put(journal=json.dumps({"snapshot": {"state": "idle"}, "job": {}}).encode(), update_version=b"41")
    return state, store, info


def test_multimodel_single_model_state_directory_migrates_on_first_start(tmp_path, releases):
    state, store, info = legacy_state(tmp_path, releases["1.0.0"])
    assert migrate_single_model(state, store) == "classifier"
    moved = SlotStore(state / "models" / "classifier")
    assert moved.active() == info and moved.pointer() == {"slot": "a", "previous": None}
    assert sha256_file(moved.path(info)) == releases["1.0.0"].sha256
    assert not (state / "slots").exists() and not (state / "active.json").exists()
    assert store.get("journal") is None and store.get("update_version:classifier") == b"41"
    assert store.get("update_version") == b"41"  # kept: the floor of any model's first offer
    assert store.load_journal("classifier")[0] == Snapshot()
    assert migrate_single_model(state, store) is None  # done: nothing moves twice


def test_multimodel_migration_resumes_after_a_power_cut_between_its_moves(tmp_path, releases):
    state, store, info = legacy_state(tmp_path, releases["1.0.0"])
    (state / "models" / "classifier").mkdir(parents=True)
    (state / "models" / MIGRATING).write_text("classifier")  # cut after the slots moved, before active.json
    (state / "slots").rename(state / "models" / "classifier" / "slots")
    assert migrate_single_model(state, store) == "classifier"
    assert SlotStore(state / "models" / "classifier").active() == info
    assert not (state / "models" / MIGRATING).exists() and store.get("update_version:classifier") == b"41"


def test_multimodel_migration_resumes_over_empty_slot_folders_made_meanwhile(tmp_path, releases):
    """Cut after the marker and the model's folder were made; then something opened a slot store there, which
    makes empty slot folders: the slots still move, and the device serves its model."""
    state, store, info = legacy_state(tmp_path, releases["1.0.0"])
    (state / "models").mkdir()
    (state / "models" / MIGRATING).write_text("classifier")
    SlotStore(state / "models" / "classifier")  # empty slots/a, slots/b
    assert migrate_single_model(state, store) == "classifier"
    assert SlotStore(state / "models" / "classifier").active() == info and not (state / "slots").exists()


def test_multimodel_an_empty_single_model_directory_leaves_no_model_behind(tmp_path):
    state = tmp_path / "state"
    SlotStore(state)  # what an agent that never installed anything left: empty slot folders
    store = Store(state / "agent.db")
    assert migrate_single_model(state, store) is None
    assert not (state / "slots").exists() and not (state / "models").exists()


def test_multimodel_a_migrated_agent_serves_its_model_under_its_name(fleet, releases, tmp_path):
    legacy_state(tmp_path, releases["1.0.0"])[1].close()
    agent = fleet.agent().start(wait_ready=True)
    assert [m["name"] for m in get(agent.port, "/v1/models")["models"]] == ["classifier"]
    np.testing.assert_allclose(predict(agent.port, "classifier"), reference(releases["1.0.0"]), rtol=1e-5, atol=1e-5)
    status, body = post(agent.port, "/v1/predict")  # one model: the old path serves it as before
    assert status == 200
    assert agent.model()["version"] == "1.0.0"


# ------------------------------------------------------------------ real agents


def hammer(port: int, model: str, stop: threading.Event, outcomes: list) -> None:
    """Requests on one keep-alive-less loop until told to stop (bounded by the caller's timeout too)."""
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        status, body = post(port, f"/v1/models/{model}/predict")
        outcomes.append((status, body if status != 200 else np.load(io.BytesIO(body))))


@pytest.mark.slow
def test_multimodel_two_models_serve_side_by_side_and_one_updates_under_load_on_the_other(fleet, releases,
                                                                                         detector):
    agent = fleet.agent().start()
    install(fleet, agent, "c1", releases["1.0.0"])
    install(fleet, agent, "d1", detector["1.0.0"])
    listed = wait_models_idle(agent.port)
    assert {n: (m["version"], m["loaded"]) for n, m in listed.items()} == {
        "classifier": ("1.0.0", True), "detector": ("1.0.0", True)}
    np.testing.assert_allclose(predict(agent.port, "classifier"), reference(releases["1.0.0"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predict(agent.port, "detector"), reference(detector["1.0.0"]), rtol=1e-5, atol=1e-5)
    status, body = post(agent.port, "/v1/predict")
    assert status == 409 and b"classifier" in body and b"detector" in body  # which one? the caller must say
    assert post(agent.port, "/v1/models/nope/predict")[0] == 404
    assert get(agent.port, "/ready") == {"ready": True}

    state = fleet.states[-1]
    assert {m.name: m.active_sha256 for m in state.models} == {
        "classifier": releases["1.0.0"].sha256, "detector": detector["1.0.0"].sha256}
    assert state.active_sha256 == releases["1.0.0"].sha256  # the first model by name, for older servers

    stop, outcomes = threading.Event(), []
    load = threading.Thread(target=hammer, args=(agent.port, "detector", stop, outcomes))
    load.start()
    try:
        time.sleep(0.5)
        install(fleet, agent, "c2", releases["1.1.0"], base=releases["1.0.0"])
        time.sleep(0.5)
    finally:
        stop.set()
        load.join(30)
    assert len(outcomes) > 20
    assert [s for s, _ in outcomes if s != 200] == []  # not one request of the other model failed
    expected = reference(detector["1.0.0"])
    assert all(np.allclose(out, expected, rtol=1e-5, atol=1e-5) for _, out in outcomes)
    listed = wait_models_idle(agent.port)
    assert (listed["classifier"]["version"], listed["detector"]["version"]) == ("1.1.0", "1.0.0")

    def served() -> int:
        return sum(t.requests for t in fleet.telemetry if t.model_version == "detector 1.0.0")

    deadline = time.monotonic() + 15  # one telemetry batch per model, each under its own label and seq
    while time.monotonic() < deadline and not ("classifier 1.1.0" in {t.model_version for t in fleet.telemetry}
                                               and served() >= len(outcomes)):
        time.sleep(0.1)
    assert "classifier 1.1.0" in {t.model_version for t in fleet.telemetry}
    assert served() >= len(outcomes)
    seqs = [t.seq for t in fleet.telemetry]
    assert len(seqs) == len(set(seqs))

    fleet.rollback("c2")  # the order names the job: only the model that ran it goes back
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not [e for e in fleet.results("c2") if e.state == "rolled_back"]:
        time.sleep(0.05)
    assert [e.result for e in fleet.results("c2") if e.state == "rolled_back"] == ["ok"]
    listed = wait_models_idle(agent.port)
    assert (listed["classifier"]["version"], listed["detector"]["version"]) == ("1.0.0", "1.0.0")


@pytest.mark.slow
def test_multimodel_kill_9_during_one_models_update_leaves_every_model_serving(fleet, releases, detector):
    agent = fleet.agent()
    agent.start()
    install(fleet, agent, "c1", releases["1.0.0"])
    install(fleet, agent, "d1", detector["1.0.0"])
    agent.stop()

    agent.entry = ["-m", "tests.agent.paused_agent", "--pause-at", "probing"]
    agent.start()
    fleet.offer("d2", detector["2.0.0"], base=detector["1.0.0"])
    wait_log(agent, "test hook: pausing at probing")
    np.testing.assert_allclose(predict(agent.port, "classifier"), reference(releases["1.0.0"]), rtol=1e-5, atol=1e-5)
    agent.kill9()

    agent.entry = ["-m", "agent.cli", "run"]
    agent.start()
    np.testing.assert_allclose(predict(agent.port, "classifier"), reference(releases["1.0.0"]), rtol=1e-5, atol=1e-5)
    old_or_new = predict(agent.port, "detector")  # right after the restart, before the update resumes
    assert any(np.allclose(old_or_new, reference(r), rtol=1e-5, atol=1e-5) for r in detector.values())
    result = fleet.wait_result("d2")
    listed = wait_models_idle(agent.port)
    want = detector["2.0.0"] if result.result == "ok" else detector["1.0.0"]
    assert (listed["detector"]["sha256"], listed["classifier"]["sha256"]) == (want.sha256, releases["1.0.0"].sha256)
    np.testing.assert_allclose(predict(agent.port, "detector"), reference(want), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_multimodel_an_offer_past_the_memory_budget_is_refused_and_the_others_keep_serving(fleet, releases,
                                                                                           detector, tmp_path):
    # room for one model and not for a second beside it
    one = estimated_bytes(len(releases["1.0.0"].data))
    agent = fleet.agent(model_memory_budget_mb=1.5 * one / 2**20).start()
    install(fleet, agent, "c1", releases["1.0.0"])
    fleet.offer("d1", detector["1.0.0"])
    result = fleet.wait_result("d1")
    assert (result.state, result.result, result.reason) == ("rejected", "failed", "memory_budget"), result
    assert "exceeds the memory budget" in result.detail and "classifier" in result.detail
    np.testing.assert_allclose(predict(agent.port, "classifier"), reference(releases["1.0.0"]), rtol=1e-5, atol=1e-5)
    assert get(agent.port, "/ready") == {"ready": True}  # the refused model is no model of this device
    assert [m["name"] for m in get(agent.port, "/v1/models")["models"]] == ["classifier"]
    agent.stop()
    agent.start(wait_ready=True)  # what the refused offer left behind is cleared on the next start
    assert sorted(p.name for p in (tmp_path / "state" / "models").iterdir()) == ["classifier"]
    assert [m.name for m in fleet.states[-1].models] == ["classifier"]


@pytest.mark.slow
def test_multimodel_a_rollback_order_right_behind_its_offer_reaches_that_model(fleet, releases, detector):
    """The broker hands a reconnecting device an offer and its rollback order back to back: the order goes to the
    model the offer was for even before that model's updater has taken the offer."""
    agent = fleet.agent().start()
    install(fleet, agent, "c1", releases["1.0.0"])
    install(fleet, agent, "d1", detector["1.0.0"])
    fleet.offer("d2", detector["2.0.0"], base=detector["1.0.0"])
    fleet.rollback("d2")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(e.state == "rolled_back" for e in fleet.results("d2")):
        time.sleep(0.05)
    assert [e.reason for e in fleet.results("d2") if e.state == "rejected"] == []
    assert any(e.state == "rolled_back" and e.result == "ok" for e in fleet.results("d2")), fleet.results("d2")
    listed = wait_models_idle(agent.port)
    assert (listed["detector"]["version"], listed["classifier"]["version"]) == ("1.0.0", "1.0.0")


@pytest.mark.slow
def test_multimodel_two_first_installs_at_once_count_each_other_against_the_budget(fleet, releases, detector):
    """Admitted but not yet loaded, an install still counts: of two models offered at once to a budget with room
    for one, one installs and the other is refused."""
    one = estimated_bytes(len(releases["1.0.0"].data))
    agent = fleet.agent(model_memory_budget_mb=1.5 * one / 2**20).start()
    fleet.offer("c1", releases["1.0.0"])
    fleet.offer("d1", detector["1.0.0"])
    results = {job: fleet.wait_result(job) for job in ("c1", "d1")}
    outcomes = sorted((r.state, r.reason) for r in results.values())
    assert outcomes == [("committed", "ok"), ("rejected", "memory_budget")], results
    assert len([m for m in wait_models_idle(agent.port).values() if m["loaded"]]) == 1


def test_multimodel_a_device_takes_at_most_max_models(tmp_path, monkeypatch):
    """Every name the server signs makes a lane; the device state lists at most MAX_MODELS, so past that a new
    model is refused (and the models it has are kept)."""
    root_signer, online = generate_signer(), generate_signer()
    (tmp_path / "root.json").write_bytes(build_root([root_signer], [online],
                                                    expires=datetime.now(UTC) + timedelta(days=1)))
    agent = Agent(AgentSettings(device_id="d1", profile="rpi5", trust_root=tmp_path / "root.json",
                                state_dir=tmp_path / "state"))
    events = []
    monkeypatch.setattr(agent.reporter, "event", lambda job, state, result, reason=None, detail="", timings=None:
                        events.append((job, reason)))
    monkeypatch.setattr("agent.models.ModelLane.present", lambda lane: True)  # as if each had installed
    agent.models.start()
    try:
        for i in range(MAX_MODELS + 1):
            agent.models.offer(signed_offer(online, job=f"j{i}", version=i + 1, model=f"m{i:02d}"))
        assert len(agent.models.lanes()) == MAX_MODELS
        assert (f"j{MAX_MODELS}", Reason.MEMORY_BUDGET) in events
        agent.models.offer(signed_offer(online, job="again", version=99, model="m00"))  # a model it has: routed
        assert len(agent.models.lanes()) == MAX_MODELS and ("again", Reason.MEMORY_BUDGET) not in events
        # a redelivery of an offer (same job, same version) reaches its model's updater, not the replay check
        agent.models.offer(signed_offer(online, job="j3", version=4, model="m03"))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len([e for e in events if e[0] == "j3"]) < 2:
            time.sleep(0.02)
        assert [reason for job, reason in events if job == "j3"] == [Reason.HASH_MISMATCH] * 2  # (its probe data)
    finally:
        agent.models.stop()
        agent.store.close()
