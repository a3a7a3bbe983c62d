"""The update driver's parts without a broker: the journaled job, the chunk window, the handler table, offer
admission and its trust state, the test pause hook, and how the daemon parses what arrives."""

import base64
import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from agent.daemon import Agent
from agent.download import ChunkWindow, WindowConfig, check_payload
from agent.job import Job, Payload, StepFailed
from agent.machine import Action, State
from agent.offers import Offers, Scope
from agent.settings import AgentSettings
from agent.steps import HANDLERS
from fleet_protocol import messages, topics
from fleet_protocol.chunks import chunks, manifest_for
from fleet_protocol.errors import RollbackError
from fleet_protocol.keys import generate_signer
from fleet_protocol.metadata import ArtifactInfo, Probe, Provenance, UpdateSpec, build_root, build_update
from fleet_protocol.metadata import Scope as UpdateScope
from fleet_protocol.vocabulary import Reason
from tests.agent.paused_agent import pause_hook


def test_every_action_has_one_handler_but_the_refusal_of_a_second_offer():
    assert set(HANDLERS) == set(Action) - {Action.REJECT_BUSY}  # that one answers an offer that never becomes a job


# ------------------------------------------------------------------ the journaled job


def test_job_round_trips_through_its_journal_record():
    job = Job(id="j1", metadata=b"signed", probe=b"npz", url=None, previous_slot="a", received=5.0,
              timings={"stage_ms": 2.5}, download_started=4.0, payload=Payload("delta", "0" * 64, 10, "m.patch"),
              target_slot="b", probe_result="cosine 1.0")
    assert Job.from_record(job.to_record()) == job
    assert Job().to_record() == {} and Job.from_record({}) == Job()


def test_a_journal_written_by_the_previous_agent_resumes():
    record = {"job": "j1", "metadata": base64.b64encode(b"md").decode(), "probe": None, "url": "http://x",
              "previous_slot": "a", "received": 1.0, "timings": {"download_start": 3.0, "download_ms": 7.0},
              "payload": {"kind": "full", "sha256": "1" * 64, "length": 3, "path": "p"}, "target_slot": "b"}
    job = Job.from_record(record)
    assert (job.id, job.metadata, job.probe, job.payload.kind, job.target_slot) == ("j1", b"md", None, "full", "b")
    assert job.reported_timings() == {"download_ms": 7.0}  # a wall-clock start is not a duration


# ------------------------------------------------------------------ the chunk window

DATA = bytes(range(48))  # 12 chunks of 4 bytes: three windows of 4


def window(tmp_path, *, connected=True, size=4, clock=None, have=b""):
    asked = []
    w = ChunkWindow(WindowConfig(window=size, timeout_s=5.0, max_stalls=2), request=asked.append,
                    clock=clock or (lambda: 0.0))
    w.connected = connected
    target = tmp_path / "payload"
    if have:
        target.write_bytes(have)
    manifest = manifest_for(DATA, 4)
    done = w.begin("j1", "m.onnx", manifest, target)
    return w, asked, dict(chunks(DATA, manifest)), done


def chunk(index, data, job="j1"):
    return messages.ChunkData(job=job, index=index, data=data)


def test_the_window_asks_for_the_next_window_once_one_is_delivered_and_returns_the_file(tmp_path):
    w, asked, parts, done = window(tmp_path)
    assert not done and [r.indices for r in asked] == [(0, 1, 2, 3)]
    assert (asked[0].job, asked[0].path) == ("j1", "m.onnx")
    for i in (0, 1, 2):
        assert w.accept(chunk(i, parts[i])) is None
    assert len(asked) == 1  # not before the whole window is in
    w.accept(chunk(3, parts[3]))
    assert asked[-1].indices == (4, 5, 6, 7)
    for i in range(4, 11):
        w.accept(chunk(i, parts[i]))
    assert [r.indices for r in asked] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]
    path = w.accept(chunk(11, parts[11]))
    assert path is not None and path.read_bytes() == DATA and not w.active


@pytest.mark.parametrize("bad", [chunk(0, b"xxxx"), chunk(0, b"\0\1\2"), chunk(0, bytes(range(4)), job="j2")])
def test_a_bad_or_foreign_chunk_is_dropped(tmp_path, bad):
    w, asked, parts, _ = window(tmp_path)
    assert w.accept(bad) is None
    assert (tmp_path / "payload").read_bytes()[:4] == b"\0" * 4 and w.active


def test_disconnected_it_waits_then_asks_only_for_what_is_missing(tmp_path):
    have = DATA[:8] + b"\0" * 40  # two chunks survived a restart
    w, asked, parts, _ = window(tmp_path, connected=False, have=have)
    assert asked == []
    w.connected = True
    w.request_missing()
    assert [r.indices for r in asked] == [(2, 3, 4, 5)]


def test_a_payload_already_on_disk_needs_no_request(tmp_path):
    w, asked, _, done = window(tmp_path, have=DATA)
    assert done and asked == [] and not w.active


def test_stalls_ask_again_then_fail_the_download(tmp_path):
    now = [0.0]
    w, asked, _, _ = window(tmp_path, clock=lambda: now[0])
    now[0] = 4.0
    w.tick()
    assert len(asked) == 1
    for n in (2, 3):  # max_stalls = 2 asks again
        now[0] += 5.0
        w.tick()
        assert len(asked) == n
    now[0] += 5.0
    with pytest.raises(StepFailed) as e:
        w.tick()
    assert e.value.reason is Reason.DOWNLOAD_FAILED and not w.active


def test_a_payload_that_does_not_match_its_hash_is_deleted(tmp_path):
    path = tmp_path / "payload"
    path.write_bytes(b"abc")
    check_payload(path, sha256=hashlib.sha256(b"abc").hexdigest(), length=3)
    with pytest.raises(StepFailed) as e:
        check_payload(path, sha256="0" * 64, length=3)
    assert e.value.reason is Reason.HASH_MISMATCH and not path.exists()


# ------------------------------------------------------------------ offers and trust

PROBE = b"not checked before the probe hash"


def signed_offer(online, *, job: str, version: int, profile="rpi5", model="m") -> messages.UpdateOffer:
    body = b"model bytes"
    spec = UpdateSpec(scope=UpdateScope(devices=("d1",), profile=profile),
                      artifact=ArtifactInfo(path="m/1/model.onnx", sha256=hashlib.sha256(body).hexdigest(),
                                            length=len(body), format="onnx-int8", profile=profile, model=model,
                                            model_version="1", chunks=manifest_for(body, 4)),
                      probe=Probe(inputs_sha256="0" * 64, atol=1e-3, rtol=1e-3, min_cosine=0.99),
                      provenance=Provenance(source_sha256="0" * 64, calibration_sha256="0" * 64,
                                            converter_version="test"))
    md = build_update(spec, [online], version=version, expires=datetime.now(UTC) + timedelta(hours=1))
    return messages.UpdateOffer(job=job, metadata=md, probe=PROBE)


@pytest.fixture
def trust():
    root_signer, online = generate_signer(), generate_signer()
    root = build_root([root_signer], [online], expires=datetime.now(UTC) + timedelta(days=1))
    return Offers(Scope("d1", "rpi5", None), root=root, versions={"m": 3}), online


def test_a_refused_offer_changes_no_trust(trust):
    offers, online = trust
    with pytest.raises(StepFailed) as e:  # the signature is fine; the probe data does not match its hash
        offers.admit(signed_offer(online, job="j1", version=4), model="m", previous_slot="a")
    assert e.value.reason is Reason.HASH_MISMATCH and offers.verifier.update_version == 3
    with pytest.raises(RollbackError):
        offers.admit(signed_offer(online, job="j2", version=3), model="m", previous_slot="a")
    assert offers.verifier.update_version == 3


def test_an_admitted_offer_is_trusted_only_once_adopted(trust, monkeypatch):
    offers, online = trust
    monkeypatch.setattr("agent.offers._check_probe", lambda offer, verified: None)
    admission = offers.admit(signed_offer(online, job="j1", version=4), model="m", previous_slot="a")
    assert (admission.job.id, admission.job.previous_slot, admission.job.probe) == ("j1", "a", PROBE)
    assert admission.trust_record["update_version:m"] == b"4" and offers.verifier.update_version == 3
    offers.adopt(admission)  # the driver calls this once the job and the trust record are journaled
    assert offers.verifier.update_version == 4
    assert offers.verified(admission.job).version == 4  # verified again from the journal, version not advanced


def test_multimodel_offers_are_versioned_per_model(trust, monkeypatch):
    """Offers for two models are signed in one order and may be admitted by their two updaters in the other: each
    model keeps its own highest version, so the older offer is not taken for a rollback; a replay to the same model
    still is."""
    offers, online = trust
    monkeypatch.setattr("agent.offers._check_probe", lambda offer, verified: None)
    for_m = signed_offer(online, job="j1", version=10)
    for_k = signed_offer(online, job="j2", version=11, model="k")
    assert offers.model_of(for_m) == "m" and offers.model_of(for_k) == "k"  # routed in the order they were signed
    offers.adopt(offers.admit(for_k, model="k", previous_slot=None))  # admitted in the other
    offers.adopt(offers.admit(for_m, model="m", previous_slot="a"))  # older than k's, newer than m's: admitted
    assert offers.versions == {"m": 10, "k": 11} and offers.verifier.update_version == 11
    with pytest.raises(RollbackError):
        offers.admit(for_m, model="m", previous_slot="a")
    with pytest.raises(StepFailed) as e:  # signed for k: the updater of m refuses it
        offers.admit(signed_offer(online, job="j3", version=12, model="k"), model="m", previous_slot="a")
    assert e.value.reason is Reason.MALFORMED


def test_multimodel_an_old_offer_is_refused_in_arrival_order_even_for_a_model_the_device_lacks(trust):
    """Routing checks every offer against the highest version the device has seen for any model, so a captured old
    offer cannot install a model the device does not have yet."""
    offers, online = trust
    assert offers.model_of(signed_offer(online, job="j1", version=200, model="k")) == "k"
    with pytest.raises(RollbackError):
        offers.model_of(signed_offer(online, job="j0", version=5, model="new"))
    assert offers.model_of(signed_offer(online, job="j2", version=201, model="new")) == "new"


def test_multimodel_an_offer_that_does_not_fit_the_memory_budget_is_refused_and_trusts_nothing(trust, monkeypatch):
    offers, online = trust
    monkeypatch.setattr("agent.offers._check_probe", lambda offer, verified: None)

    def too_big(verified):
        raise StepFailed(Reason.MEMORY_BUDGET, "no room")

    with pytest.raises(StepFailed) as e:
        offers.admit(signed_offer(online, job="j1", version=4), model="m", previous_slot="a", fits=too_big)
    assert e.value.reason is Reason.MEMORY_BUDGET and offers.versions == {"m": 3}


def test_multimodel_a_model_name_that_is_no_directory_name_is_refused(trust):
    offers, online = trust
    with pytest.raises(StepFailed) as e:
        offers.model_of(signed_offer(online, job="j1", version=4, model="../etc"))
    assert e.value.reason is Reason.MALFORMED


# ------------------------------------------------------------------ test hook and inbound messages


def test_the_pause_hook_stops_only_where_it_is_told(monkeypatch):
    slept = []
    monkeypatch.setattr("tests.agent.paused_agent.time.sleep", slept.append)
    at_staging, after_switch = pause_hook(at=State.STAGING, after=None), pause_hook(at=None, after=Action.SWITCH)
    for where in [*State, *Action]:
        at_staging(where)
        after_switch(where)
    assert len(slept) == 2


@pytest.fixture
def agent(tmp_path):
    root = build_root([generate_signer()], [generate_signer()], expires=datetime.now(UTC) + timedelta(days=1))
    (tmp_path / "root.json").write_bytes(root)
    a = Agent(AgentSettings(device_id="d1", profile="rpi5", trust_root=tmp_path / "root.json",
                            state_dir=tmp_path / "state"))
    a.received = []
    a.models.chunk = a.received.append
    a.models.offer = a.models.rollback = a.received.append
    yield a
    a.store.close()


@pytest.mark.parametrize("encode", [lambda c: messages.chunk_frame(c.job, c.index, c.data), lambda c: c.to_bytes()])
def test_the_daemon_takes_chunks_as_binary_frames_or_json(agent, encode):
    sent = messages.ChunkData(job="j1", index=3, data=b"\x00\xffdata")
    agent._on_message(topics.topic("d1", "dl", "j1"), encode(sent))
    assert agent.received == [sent] and agent.bad_messages == 0


@pytest.mark.parametrize("topic,payload", [
    (topics.topic("d1", "cmd"), messages.ChunkData(job="j1", index=0, data=b"x").to_bytes()),  # wrong kind here
    (topics.topic("d1", "dl", "j1"), messages.RollbackOrder(job="r1", reason="x").to_bytes()),
    (topics.topic("d1", "evt"), messages.UpdateEvent(job="j1", state="failed", ts=1.0).to_bytes()),  # not subscribed
    (topics.topic("d2", "cmd"), messages.Ping(nonce="n").to_bytes()),  # another device's
    (topics.topic("d1", "dl", "j1"), messages.CHUNK_FRAME_MAGIC + b"\x05j1"),  # a truncated frame
])
def test_the_daemon_refuses_what_does_not_belong_on_a_topic(agent, topic, payload):
    agent._on_message(topic, payload)
    assert agent.received == [] and agent.bad_messages == 1
