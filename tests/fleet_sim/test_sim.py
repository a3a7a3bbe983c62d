"""The simulator's side of the wire, without a broker: which topics and payloads a simulated device accepts, and an
update that arrives as binary chunk frames (or, from an older server, as base64 JSON) and ends committed."""

import hashlib
import os
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from fleet_protocol import messages, topics
from fleet_protocol.chunks import manifest_for
from fleet_protocol.errors import MalformedError, TopicError
from fleet_protocol.keys import generate_signer
from fleet_protocol.metadata import ArtifactInfo, Probe, Provenance, Scope, UpdateSpec, build_root, build_update
from fleet_protocol.vocabulary import Reason, UpdateResult, UpdateState
from fleet_sim.sim import ASK_BINARY_CHUNKS, SimFleet, parse_received

DEV = "sim-1"
CMD, DL, REQ = topics.topic(DEV, "cmd"), topics.topic(DEV, "dl", "job-1"), topics.topic(DEV, "dl-req", "job-1")
CHUNK = messages.ChunkData(job="job-1", index=2, data=b"\x00raw\xffbytes")


@pytest.mark.parametrize(("topic", "payload", "expected"), [
    (CMD, messages.Ping(nonce="n-1").to_bytes(), messages.Ping(nonce="n-1")),
    (CMD, messages.RollbackOrder(job="job-1", reason="gate").to_bytes(), messages.RollbackOrder(job="job-1",
                                                                                                 reason="gate")),
    (DL, messages.chunk_frame("job-1", 2, CHUNK.data), CHUNK),  # what a server that honours the property sends
    (DL, CHUNK.to_bytes(), CHUNK),  # what an older server sends
])
def test_a_device_parses_what_its_topic_kind_carries(topic, payload, expected):
    got = parse_received(DEV, topic, payload)
    assert type(got) is type(expected) and got.model_dump() == expected.model_dump()


@pytest.mark.parametrize(("topic", "payload", "error"), [
    (CMD, messages.chunk_frame("job-1", 0, b"x"), MalformedError),  # a frame is a chunk only on a dl topic
    (CMD, CHUNK.to_bytes(), MalformedError),  # a chunk does not come on cmd
    (DL, messages.Ping(nonce="n-1").to_bytes(), MalformedError),  # nor a command on dl
    (DL, messages.CHUNK_FRAME_MAGIC + b"\x40job", MalformedError),  # a truncated frame
    (DL, b"not json", MalformedError),
    (REQ, messages.ChunkRequest(job="job-1", path="p", indices=(0,)).to_bytes(), MalformedError),  # sent, not received
    (topics.topic(DEV, "evt"), b"{}", MalformedError),
    (topics.topic("sim-2", "cmd"), messages.Ping(nonce="n-1").to_bytes(), TopicError),  # another device's topic
    ("somewhere/else", b"{}", TopicError),
])
def test_a_device_refuses_what_does_not_belong_on_the_topic(topic, payload, error):
    with pytest.raises(error):
        parse_received(DEV, topic, payload)


def test_chunk_requests_ask_for_binary_frames():
    assert ASK_BINARY_CHUNKS.UserProperty == [(messages.CHUNK_ENCODINGS_PROPERTY, messages.BINARY_CHUNKS)]


# ----------------------------------------------------------------------------- one update, no broker

ONLINE = generate_signer()
EXPIRES = datetime.now(UTC) + timedelta(days=1)  # the device verifies against the wall clock
ROOT = build_root([generate_signer()], [ONLINE], expires=EXPIRES)


def offer(artifact: bytes, probe: bytes) -> messages.UpdateOffer:
    manifest = manifest_for(artifact, chunk_size=1000)
    h = hashlib.sha256(b"").hexdigest()
    spec = UpdateSpec(
        scope=Scope(devices=(DEV,), profile="rpi5"),
        artifact=ArtifactInfo(path="models/cls/2.0/model.int8.onnx", sha256=manifest.sha256, length=len(artifact),
                              format="onnx-int8", profile="rpi5", model="cls", model_version="2.0", chunks=manifest),
        probe=Probe(inputs_sha256=hashlib.sha256(probe).hexdigest(), atol=0, rtol=0, min_cosine=1),
        provenance=Provenance(source_sha256=h, calibration_sha256=h, converter_version="0"))
    return messages.UpdateOffer(job="job-1", metadata=build_update(spec, [ONLINE], version=1, expires=EXPIRES),
                                probe=probe)


@pytest.fixture
def device():
    """One unconnected device whose publishes are recorded instead of sent."""
    fleet = SimFleet("mqtt://127.0.0.1:1", ROOT)
    dev = fleet.add(DEV, profile="rpi5", active_sha256=None)
    dev.sent = []
    dev.client.publish = lambda topic, payload, qos=0, retain=False, properties=None: dev.sent.append(
        (topic, payload, properties))
    yield dev
    fleet.close()


def deliver(dev, topic: str, payload: bytes) -> None:
    dev._on_message(dev.client, None, SimpleNamespace(topic=topic, payload=payload))


def events(dev) -> list[tuple[UpdateState, UpdateResult, Reason]]:
    found = [messages.parse_for("evt", payload) for topic, payload, _ in dev.sent if topic.endswith("/evt")]
    return [(e.state, e.result, e.reason) for e in found]


@pytest.mark.parametrize("encode", [
    lambda i, data: messages.chunk_frame("job-1", i, data),
    lambda i, data: messages.ChunkData(job="job-1", index=i, data=data).to_bytes(),
], ids=["binary frames", "base64 json"])
def test_an_update_in_chunks_is_verified_and_committed(device, encode):
    artifact = os.urandom(2500)
    deliver(device, CMD, offer(artifact, probe=b"golden").to_bytes())
    [(topic, payload, props)] = [s for s in device.sent if s[0] == REQ]
    assert props is ASK_BINARY_CHUNKS and messages.parse_for("dl-req", payload).indices == (0, 1, 2)
    for i in (2, 0, 1, 1):  # any order, and a duplicate
        deliver(device, DL, encode(i, artifact[i * 1000:(i + 1) * 1000]))
    assert device.active == hashlib.sha256(artifact).hexdigest() and device.installed == ["job-1"]
    assert events(device) == [(UpdateState.DOWNLOADING, UpdateResult.PENDING, Reason.OK),
                              (UpdateState.COMMITTED, UpdateResult.OK, Reason.OK)]


def test_a_chunk_that_does_not_match_its_hash_is_dropped(device):
    artifact = os.urandom(1500)
    deliver(device, CMD, offer(artifact, probe=b"golden").to_bytes())
    deliver(device, DL, messages.chunk_frame("job-1", 0, b"forged" + artifact[6:1000]))
    assert device.fleet.counts["bad_chunk"] == 1 and device.download is not None and not device.download.parts


def test_a_message_that_does_not_parse_is_counted_not_raised(device):
    deliver(device, DL, messages.CHUNK_FRAME_MAGIC)
    deliver(device, CMD, messages.chunk_frame("job-1", 0, b"x"))
    assert device.fleet.counts["invalid"] == 2 and not device.sent


def reports(dev, kind: str) -> list:
    return [messages.parse_for(kind, payload) for topic, payload, _ in dev.sent if topic.endswith(f"/{kind}")]


def test_state_reports_name_the_running_version_and_slot_as_an_agent_does(device):
    device.report_state()
    artifact = os.urandom(1200)
    deliver(device, CMD, offer(artifact, probe=b"golden").to_bytes())
    for i in (0, 1):
        deliver(device, DL, messages.chunk_frame("job-1", i, artifact[i * 1000:(i + 1) * 1000]))
    before, after = reports(device, "state")
    assert (before.active_version, before.active_sha256, before.active_slot) == (None, None, None)
    assert after.active_version == "cls 2.0"  # the agent's label: "model version" (agent.slots.version_label)
    assert after.active_sha256 == hashlib.sha256(artifact).hexdigest() and after.active_slot == "a"
    assert after.root_version == 1 and after.update_version == 1


def test_telemetry_carries_bounded_resources_that_repeat_per_device_id():
    def windows(device_id: str, slow: float = 1.0) -> list[messages.TelemetryBatch]:
        fleet = SimFleet("mqtt://127.0.0.1:1", ROOT)
        dev = fleet.add(device_id, profile="rpi5", active_sha256=None)
        dev.sent, dev.slow = [], slow
        dev.client.publish = lambda topic, payload, qos=0, retain=False, properties=None: dev.sent.append(
            (topic, payload, properties))
        for requests in (0, 40, 100, 5000):
            dev.telemetry(requests, window_s=1.0)
        fleet.close()
        return reports(dev, "tm")

    first, again, other = windows("sim-1"), windows("sim-1"), windows("sim-2")
    figures = [(w.cpu_percent, w.rss_mb, w.temperature_c) for w in first]
    assert figures == [(w.cpu_percent, w.rss_mb, w.temperature_c) for w in again]
    assert figures != [(w.cpu_percent, w.rss_mb, w.temperature_c) for w in other]
    for w in first + other + windows("sim-3", slow=50.0):
        assert 0 < w.cpu_percent <= 100 and 16 <= w.rss_mb <= 1024 and 25 <= w.temperature_c <= 90
    assert first[0].cpu_percent < first[2].cpu_percent  # CPU follows the load
